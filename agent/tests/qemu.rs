//! The QEMU driver against real QEMU (TCG), booting Ferro's tiny test guest, with no
//! control plane.
//!
//! The guest is built (once, then cached) by `e2e/images/build-tiny.sh`; its init prints
//! what these tests look for on the serial console (see `e2e/images/tiny-init.sh`). Every
//! test runs its VMs under a private state directory and kills whatever QEMU it finds
//! there when it ends, passed or failed. Timeouts are generous and times are printed, not
//! asserted: these tests share two cores.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use common::{kill, qemu_processes, tiny_guest};
mod common;

use ferro_agent::configdrive::{ConfigDrive, GuestAddress, GuestNic, NetworkData};
use ferro_agent::hypervisor::qemu::{AccelPolicy, QemuConfig, QemuDriver, is_vm_process};
use ferro_agent::hypervisor::{
    Accel, BootDisk, DirectKernel, Disk, DiskFormat, DiskSource, Hypervisor, HypervisorError, Nic,
    StopOutcome, VmSpec, VmState,
};

const BOOT_TIMEOUT: Duration = Duration::from_secs(90);
const KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFerroTinyGuestTestKeyOnlyNotARealKey0 alice@ferro";

/// A private state directory and a driver on it; kills any QEMU left in it when dropped.
struct Host {
    dir: tempfile::TempDir,
    driver: QemuDriver,
}

impl Host {
    fn new() -> Host {
        Self::with_accel(AccelPolicy::Tcg)
    }

    fn with_accel(accel: AccelPolicy) -> Host {
        // Short, so the sockets inside fit the 107-byte limit of unix socket paths.
        let dir = tempfile::Builder::new()
            .prefix("fq")
            .tempdir_in("/tmp")
            .expect("temp dir");
        let driver = QemuDriver::new(Self::config(dir.path(), accel));
        Host { dir, driver }
    }

    fn config(dir: &Path, accel: AccelPolicy) -> QemuConfig {
        QemuConfig {
            accel,
            ..QemuConfig::new(dir)
        }
    }

    /// Another driver on the same state directory, as after an agent restart.
    fn second_driver(&self) -> QemuDriver {
        QemuDriver::new(Self::config(self.dir.path(), AccelPolicy::Tcg))
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        common::kill_vms_under(self.dir.path());
    }
}

/// A process's session id and process group id, from `/proc/<pid>/stat`.
fn session_and_group(pid: u32) -> Result<(String, String)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The fields after the parenthesised name: state, ppid, pgrp, session, ...
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .context("stat")?
        .1
        .split_whitespace()
        .collect();
    Ok((fields[3].to_owned(), fields[2].to_owned()))
}

fn new_uid() -> String {
    uuid::Uuid::new_v4().to_string()
}

fn tiny_spec(uid: &str, hostname: &str, user_data: Option<&str>) -> VmSpec {
    let guest = tiny_guest();
    VmSpec {
        uid: uid.to_owned(),
        name: hostname.to_owned(),
        vcpus: 1,
        memory_mib: 128,
        boot_disk: Some(BootDisk {
            base: guest.disk.clone(),
            base_format: DiskFormat::Raw,
            size_bytes: Some(96 << 20),
        }),
        kernel: Some(DirectKernel {
            kernel: guest.kernel.clone(),
            initrd: Some(guest.initrd.clone()),
            cmdline: guest.cmdline.clone(),
        }),
        config_drive: Some(ConfigDrive {
            uuid: uid.to_owned(),
            name: hostname.to_owned(),
            hostname: hostname.to_owned(),
            availability_zone: "zone-a".into(),
            public_keys: BTreeMap::from([("alice".to_owned(), KEY.to_owned())]),
            user_data: user_data.map(|u| u.as_bytes().to_vec()),
            ..ConfigDrive::default()
        }),
        nics: vec![],
        disks: vec![],
        labels: BTreeMap::from([("server".to_owned(), hostname.to_owned())]),
    }
}

fn log_len(path: &Path) -> usize {
    std::fs::metadata(path)
        .map(|m| m.len() as usize)
        .unwrap_or(0)
}

/// Waits until the serial log, read from byte `from`, holds `marker`; returns everything
/// from `from` on, and the line from the marker on.
async fn wait_for_console(log: &Path, from: usize, marker: &str) -> Result<(String, String)> {
    let deadline = Instant::now() + BOOT_TIMEOUT;
    loop {
        let bytes = std::fs::read(log).unwrap_or_default();
        let text = String::from_utf8_lossy(bytes.get(from..).unwrap_or_default()).into_owned();
        // Lines printed while the console shell shows its prompt follow that prompt.
        if let Some(line) = text.lines().find_map(|l| l.find(marker).map(|at| &l[at..])) {
            let line = line.trim_end().to_owned();
            return Ok((text, line));
        }
        if Instant::now() > deadline {
            bail!("no {marker:?} on the console within {BOOT_TIMEOUT:?}; it shows:\n{text}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Types `command` on the serial console socket and returns what came back once `expect`
/// shows (choose a command whose echo does not already contain it).
async fn console_command(socket: &Path, command: &str, expect: &str) -> Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::UnixStream::connect(socket).await?;
    stream
        .write_all(format!("\n{command}\n").as_bytes())
        .await?;
    let deadline = Instant::now() + BOOT_TIMEOUT;
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_millis(500), stream.read(&mut buf)).await {
            Ok(Ok(0)) => bail!("the console closed"),
            Ok(Ok(n)) => seen.extend_from_slice(&buf[..n]),
            Ok(Err(e)) => return Err(e.into()),
            Err(_) => {}
        }
        let text = String::from_utf8_lossy(&seen);
        if text.contains(expect) {
            return Ok(text.into_owned());
        }
    }
    bail!(
        "no answer on the console: {}",
        String::from_utf8_lossy(&seen)
    )
}

async fn wait_until_gone(pid: u32, uid: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while is_vm_process(pid, uid) {
        ensure!(Instant::now() < deadline, "QEMU {pid} of {uid} still runs");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

async fn destroy_and_check(driver: &QemuDriver, uid: &str) -> Result<()> {
    driver.destroy(uid).await?;
    ensure!(
        qemu_processes(uid).is_empty(),
        "QEMU of {uid} survived destroy"
    );
    ensure!(
        !driver.paths(uid).dir.exists(),
        "files of {uid} survived destroy"
    );
    ensure!(
        driver.status(uid).await?.is_none(),
        "{uid} is still reported after destroy"
    );
    Ok(())
}

#[tokio::test]
async fn boots_the_tiny_guest_with_its_config_drive() -> Result<()> {
    let host = Host::new();
    let uid = new_uid();
    let tap = format!("fq{}", &uid[..8]);
    let mac = "52:54:00:0f:e2:01";
    let spec = VmSpec {
        nics: vec![Nic {
            id: new_uid(),
            tap: tap.clone(),
            mac: mac.into(),
        }],
        ..tiny_spec(&uid, "web-1", None)
    };

    let started = Instant::now();
    let status = host.driver.start(&spec).await?;
    let spawned = started.elapsed();
    ensure!(status.state == VmState::Running, "{status:?}");
    ensure!(status.accel == Some(Accel::Tcg), "{status:?}");
    ensure!(status.started_at.is_some(), "{status:?}");
    let pid = status.pid.context("a running VM has a pid")?;
    let (console, ready) = wait_for_console(&status.serial_log, 0, "FERRO-READY").await?;
    println!(
        "tiny guest boot: QEMU up in {:.2} s, FERRO-READY {:.2} s after start (TCG, q35, PVH; \
         other tests may be booting guests at the same time)",
        spawned.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );

    ensure!(console.contains("ferro-tiny: hostname web-1"), "{console}");
    ensure!(
        console.contains(&format!("ferro-tiny: authorized-key alice {KEY}")),
        "{console}"
    );
    ensure!(
        console.contains("ferro-tiny: disk /dev/vda ferro tiny disk"),
        "{console}"
    );
    ensure!(ready.contains("hostname=web-1 boot-count=1"), "{ready}");
    // The NIC is there and DHCP, with nobody answering, did not hold up the marker.
    ensure!(ready.contains(&format!("nics=eth0@{mac}")), "{ready}");
    ensure!(
        console.contains(&format!("FERRO-NIC eth0 {mac}")),
        "{console}"
    );
    // The uid is on QEMU's command line for operators.
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))?;
    ensure!(String::from_utf8_lossy(&cmdline).contains(&format!("ferro-{uid}")));
    // -daemonize forks twice around setsid: QEMU ends up in a session of its own, away
    // from ours, so signals to our process group or terminal never reach it.
    let (session, group) = session_and_group(pid)?;
    let (our_session, our_group) = session_and_group(std::process::id())?;
    ensure!(
        session != our_session && group != our_group,
        "QEMU shares our session or group"
    );
    ensure!(
        group == session,
        "QEMU's process group is not its session's"
    );
    ensure!(
        Path::new(&format!("/sys/class/net/{tap}")).exists(),
        "tap {tap} missing"
    );

    // The console socket is interactive: a command typed there runs in the guest, and
    // what it prints also lands in the serial log.
    let typed = "echo console-$((6 * 7))-$(hostname)";
    console_command(&status.console_socket, typed, "console-42-web-1").await?;
    wait_for_console(&status.serial_log, 0, "console-42-web-1").await?;

    destroy_and_check(&host.driver, &uid).await?;
    ensure!(
        !Path::new(&format!("/sys/class/net/{tap}")).exists(),
        "tap {tap} survived destroy"
    );
    Ok(())
}

#[tokio::test]
async fn guest_writes_survive_stop_and_start_and_the_base_stays_untouched() -> Result<()> {
    let host = Host::new();
    let uid = new_uid();
    let user_data = "#!/bin/sh\n\
        if [ -f /mnt/disk/note ]; then echo \"found: $(cat /mnt/disk/note)\";\n\
        else echo \"written on $(hostname)\" > /mnt/disk/note; sync; echo wrote the note; fi\n";
    let spec = tiny_spec(&uid, "web-2", Some(user_data));
    let base_before = std::fs::read(&tiny_guest().disk)?;

    let status = host.driver.start(&spec).await?;
    let (console, ready) = wait_for_console(&status.serial_log, 0, "FERRO-READY").await?;
    ensure!(console.contains("user_data: wrote the note"), "{console}");
    ensure!(ready.contains("boot-count=1"), "{ready}");

    let stopping = Instant::now();
    let outcome = host.driver.stop(&uid, Duration::from_secs(60)).await?;
    println!("ACPI stop took {:.2} s", stopping.elapsed().as_secs_f64());
    ensure!(outcome == StopOutcome::Graceful, "{outcome:?}");
    let stopped = host
        .driver
        .status(&uid)
        .await?
        .context("a stopped VM is still known")?;
    ensure!(
        stopped.state == VmState::Stopped && stopped.pid.is_none(),
        "{stopped:?}"
    );
    let log = std::fs::read_to_string(&status.serial_log)?;
    ensure!(
        log.contains("FERRO-POWEROFF"),
        "the guest did not shut down cleanly:\n{log}"
    );
    ensure!(host.driver.stop(&uid, Duration::from_secs(1)).await? == StopOutcome::AlreadyStopped);

    let from = log_len(&status.serial_log);
    host.driver.start(&spec).await?;
    let (console, ready) = wait_for_console(&status.serial_log, from, "FERRO-READY").await?;
    ensure!(
        console.contains("user_data: found: written on web-2"),
        "{console}"
    );
    ensure!(ready.contains("boot-count=2"), "{ready}");

    // The overlay grew to the asked size; the base image is byte for byte what it was.
    let info = Command::new("qemu-img")
        .args(["info", "-U", "--output=json"])
        .arg(&host.driver.paths(&uid).disk)
        .output()?;
    let info: serde_json::Value = serde_json::from_slice(&info.stdout)?;
    ensure!(info["virtual-size"] == 96 << 20, "{info}");
    ensure!(
        info["backing-filename"] == tiny_guest().disk.to_str().unwrap(),
        "{info}"
    );
    destroy_and_check(&host.driver, &uid).await?;
    ensure!(
        std::fs::read(&tiny_guest().disk)? == base_before,
        "the base image changed"
    );
    Ok(())
}

#[tokio::test]
async fn a_second_driver_adopts_the_running_guest() -> Result<()> {
    let host = Host::new();
    let uid = new_uid();
    let spec = tiny_spec(&uid, "web-3", None);
    let first = host.driver.start(&spec).await?;
    wait_for_console(&first.serial_log, 0, "FERRO-READY").await?;

    let second = host.second_driver();
    let listed = second.list().await?;
    ensure!(listed.len() == 1, "{listed:?}");
    ensure!(
        listed[0].uid == uid && listed[0].state == VmState::Running,
        "{listed:?}"
    );
    ensure!(listed[0].pid == first.pid, "{listed:?} vs {first:?}");

    let adopted = second.start(&spec).await?;
    ensure!(adopted.pid == first.pid, "{adopted:?} vs {first:?}");
    let pids = qemu_processes(&uid);
    ensure!(
        pids == vec![first.pid.unwrap()],
        "expected exactly one QEMU, found {pids:?}"
    );
    let console = std::fs::read_to_string(&first.serial_log)?;
    ensure!(
        console.matches("FERRO-READY").count() == 1,
        "the guest booted twice:\n{console}"
    );

    // The adopted guest is fully under the new driver's control: a reset reboots it.
    let from = log_len(&first.serial_log);
    second.reset(&uid).await?;
    let (_, ready) = wait_for_console(&first.serial_log, from, "FERRO-READY").await?;
    ensure!(ready.contains("boot-count=2"), "{ready}");
    let after = second.status(&uid).await?.context("still there")?;
    ensure!(
        after.pid == first.pid && after.state == VmState::Running,
        "{after:?}"
    );

    destroy_and_check(&second, &uid).await?;
    ensure!(host.driver.status(&uid).await?.is_none());
    Ok(())
}

#[tokio::test]
async fn a_guest_killed_by_hand_is_reported_dead() -> Result<()> {
    let host = Host::new();
    let uid = new_uid();
    let spec = tiny_spec(&uid, "web-4", None);
    let status = host.driver.start(&spec).await?;
    wait_for_console(&status.serial_log, 0, "FERRO-READY").await?;
    let pid = status.pid.context("pid")?;

    kill(pid);
    wait_until_gone(pid, &uid).await?;
    let dead = host
        .driver
        .status(&uid)
        .await?
        .context("the dead VM is still known")?;
    ensure!(
        dead.state == VmState::Crashed && dead.pid.is_none(),
        "{dead:?}"
    );
    let listed = host.second_driver().list().await?;
    ensure!(
        listed.len() == 1 && listed[0].state == VmState::Crashed,
        "{listed:?}"
    );

    // Started again, it keeps its disk.
    let from = log_len(&status.serial_log);
    let again = host.driver.start(&spec).await?;
    ensure!(
        again.state == VmState::Running && again.pid != Some(pid),
        "{again:?}"
    );
    let (_, ready) = wait_for_console(&status.serial_log, from, "FERRO-READY").await?;
    ensure!(ready.contains("boot-count=2"), "{ready}");
    destroy_and_check(&host.driver, &uid).await
}

#[tokio::test]
async fn a_guest_that_powers_itself_off_is_told_from_a_stopped_one() -> Result<()> {
    let host = Host::new();
    let uid = new_uid();
    let spec = tiny_spec(&uid, "web-9", Some("#!/bin/sh\nsync\npoweroff -f\n"));
    let status = host.driver.start(&spec).await?;
    let pid = status.pid.context("pid")?;
    wait_until_gone(pid, &uid).await?;
    let off = host.driver.status(&uid).await?.context("still known")?;
    ensure!(
        off.state == VmState::PoweredOff && off.pid.is_none(),
        "{off:?}"
    );
    // What the VM was started with is still known, and says whose it is.
    ensure!(
        off.labels.get("server").map(String::as_str) == Some("web-9"),
        "{off:?}"
    );
    // A stop of an ended VM records that it is down as asked.
    ensure!(host.driver.stop(&uid, Duration::from_secs(1)).await? == StopOutcome::AlreadyStopped);
    let stopped = host.driver.status(&uid).await?.context("still known")?;
    ensure!(stopped.state == VmState::Stopped, "{stopped:?}");
    destroy_and_check(&host.driver, &uid).await
}

#[tokio::test]
async fn stop_ends_a_guest_that_ignores_the_power_button() -> Result<()> {
    let host = Host::new();
    let uid = new_uid();
    let mut spec = tiny_spec(&uid, "web-5", None);
    // Init is a plain `sleep`: nothing listens to ACPI.
    let kernel = spec.kernel.as_mut().unwrap();
    kernel.cmdline = format!("{} rdinit=/bin/sleep -- 3600", kernel.cmdline);
    let status = host.driver.start(&spec).await?;
    let pid = status.pid.context("pid")?;

    let outcome = host.driver.stop(&uid, Duration::from_secs(3)).await?;
    ensure!(outcome == StopOutcome::Forced, "{outcome:?}");
    ensure!(
        !is_vm_process(pid, &uid),
        "QEMU {pid} survived a forced stop"
    );
    let stopped = host.driver.status(&uid).await?.context("still known")?;
    ensure!(
        stopped.state == VmState::Stopped,
        "a forced stop is not a crash: {stopped:?}"
    );
    destroy_and_check(&host.driver, &uid).await
}

#[tokio::test]
async fn the_accelerator_probe_tells_a_booting_kernel_from_a_hang() -> Result<()> {
    let guest = tiny_guest();
    let host = Host::with_accel(AccelPolicy::Auto {
        probe_kernel: Some(guest.kernel.clone()),
        timeout: Duration::from_secs(20),
    });
    // TCG always boots a kernel, so the probe must see it do so.
    ensure!(
        host.driver
            .probe(Accel::Tcg, &guest.kernel, BOOT_TIMEOUT)
            .await?
    );
    // A file that is not a kernel boots nothing.
    ensure!(
        !host
            .driver
            .probe(Accel::Tcg, &guest.initrd, Duration::from_secs(10))
            .await?
    );

    let probing = Instant::now();
    let accel = host.driver.accel().await;
    println!(
        "accelerator probe chose {accel:?} in {:.1} s (/dev/kvm present: {})",
        probing.elapsed().as_secs_f64(),
        Path::new("/dev/kvm").exists()
    );
    // Whatever it chose really boots the guest.
    let uid = new_uid();
    let status = host.driver.start(&tiny_spec(&uid, "web-6", None)).await?;
    ensure!(status.accel == Some(accel), "{status:?}");
    wait_for_console(&status.serial_log, 0, "FERRO-READY").await?;
    destroy_and_check(&host.driver, &uid).await
}

#[tokio::test]
async fn cloud_init_reads_the_config_drive() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let iso = dir.path().join("config-2.iso");
    let drive = ConfigDrive {
        uuid: "8d2f1c3e-0b7a-4c55-9a51-6a0e3f7d2b11".into(),
        name: "db-1".into(),
        hostname: "db-1.internal".into(),
        availability_zone: "zone-b".into(),
        public_keys: BTreeMap::from([("alice".to_owned(), KEY.to_owned())]),
        user_data: Some(b"#cloud-config\nruncmd:\n  - echo hi\n".to_vec()),
        network: Some(NetworkData {
            nics: vec![GuestNic {
                port_uid: "4f2c9a10-7d3e-4b8a-9c61-0e5d2a7b3f11".into(),
                tap: "tap4f2c9a10-7d".into(),
                mac: "52:54:00:0f:e2:0c".into(),
                mtu: Some(1450),
                addresses: vec![GuestAddress {
                    network_uid: "9b7e3c55-1a2b-4c3d-8e9f-a0b1c2d3e4f5".into(),
                    address: "192.0.2.5".parse()?,
                    prefix_len: 24,
                    gateway: Some("192.0.2.1".parse()?),
                    routes: vec![],
                    dns_servers: vec!["192.0.2.2".parse()?],
                }],
            }],
            dns_servers: vec!["192.0.2.2".parse()?],
        }),
    };
    drive.write_iso(&iso, Path::new("genisoimage")).await?;

    // What cloud-init's device discovery keys on: an iso9660 filesystem labelled config-2.
    let probe = Command::new("blkid")
        .args(["-o", "export"])
        .arg(&iso)
        .output()?;
    let probe = String::from_utf8_lossy(&probe.stdout);
    ensure!(
        probe.contains("LABEL=config-2") && probe.contains("TYPE=iso9660"),
        "{probe}"
    );

    // Unpack it without mounting (no privileges needed), then let cloud-init read it.
    let tree = dir.path().join("tree");
    let listing = Command::new("isoinfo")
        .args(["-R", "-f", "-i"])
        .arg(&iso)
        .output()?;
    ensure!(
        listing.status.success(),
        "isoinfo: {}",
        String::from_utf8_lossy(&listing.stderr)
    );
    let names = String::from_utf8(listing.stdout)?;
    let names: Vec<&str> = names.lines().collect();
    for name in &names {
        let path = tree.join(name.trim_start_matches('/'));
        if names
            .iter()
            .any(|other| other.starts_with(&format!("{name}/")))
        {
            std::fs::create_dir_all(&path)?;
            continue;
        }
        let contents = Command::new("isoinfo")
            .args(["-R", "-i"])
            .arg(&iso)
            .args(["-x", name])
            .output()?;
        ensure!(contents.status.success(), "isoinfo -x {name}");
        std::fs::create_dir_all(path.parent().unwrap())?;
        std::fs::write(&path, contents.stdout)?;
    }
    let reader = r#"
import json, sys
from cloudinit.sources.DataSourceConfigDrive import read_config_drive
from cloudinit.sources.helpers.openstack import convert_net_json
r = read_config_drive(sys.argv[1])
ud = r["userdata"]
print(json.dumps({
    "instance-id": r["metadata"].get("instance-id"),
    "local-hostname": r["metadata"].get("local-hostname"),
    "availability_zone": r["metadata"].get("availability_zone"),
    "public_keys": r["metadata"].get("public_keys"),
    "userdata": ud.decode() if isinstance(ud, bytes) else ud,
    "networkdata": r.get("networkdata"),
    "netconfig": convert_net_json(r.get("networkdata"), known_macs={"52:54:00:0f:e2:0c": "eth0"}),
}))
"#;
    let output = Command::new("/usr/bin/python3")
        .args(["-c", reader])
        .arg(&tree)
        .output()
        .context("running Debian's python3 (with the cloud-init package)")?;
    ensure!(
        output.status.success(),
        "cloud-init could not read the drive (is Debian's cloud-init installed?):\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let read: serde_json::Value = serde_json::from_slice(&output.stdout)?;
    println!("cloud-init read: {read}");
    ensure!(read["instance-id"] == drive.uuid.as_str(), "{read}");
    ensure!(read["local-hostname"] == "db-1.internal", "{read}");
    ensure!(read["availability_zone"] == "zone-b", "{read}");
    ensure!(read["public_keys"]["alice"] == KEY, "{read}");
    ensure!(
        read["userdata"] == "#cloud-config\nruncmd:\n  - echo hi\n",
        "{read}"
    );
    // cloud-init turns network_data.json into its own network config: the NIC by its
    // MAC, a static address with the gateway, and the DNS server.
    let config = &read["netconfig"]["config"];
    let nic = config
        .as_array()
        .and_then(|c| c.iter().find(|e| e["type"] == "physical"))
        .context("no physical NIC in cloud-init's network config")?;
    ensure!(
        nic["name"] == "eth0" && nic["mac_address"] == "52:54:00:0f:e2:0c" && nic["mtu"] == 1450,
        "{nic}"
    );
    let subnet = &nic["subnets"][0];
    ensure!(
        subnet["type"] == "static"
            && subnet["address"] == "192.0.2.5"
            && subnet["netmask"] == "255.255.255.0",
        "{subnet}"
    );
    let default_route = subnet["routes"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|r| r["gateway"] == "192.0.2.1" && r["network"] == "0.0.0.0")
        || subnet["gateway"] == "192.0.2.1";
    ensure!(
        default_route,
        "no default route through the gateway: {subnet}"
    );
    ensure!(
        config.to_string().contains("\"192.0.2.2\""),
        "no DNS server: {config}"
    );
    Ok(())
}

#[tokio::test]
async fn a_start_qemu_refuses_reports_what_qemu_said() -> Result<()> {
    let host = Host::new();
    let uid = new_uid();
    let spec = VmSpec {
        memory_mib: 1 << 40,
        ..tiny_spec(&uid, "web-7", None)
    };
    let error = host
        .driver
        .start(&spec)
        .await
        .expect_err("a VM with 1 EiB of memory started");
    let message = error.to_string();
    println!("{message}");
    ensure!(
        message.contains("did not start") && message.contains("qemu-system-x86_64:"),
        "{message}"
    );
    ensure!(qemu_processes(&uid).is_empty());
    destroy_and_check(&host.driver, &uid).await
}

/// A network namespace of the test's own, deleted (with the DHCP server in it) on drop.
struct NetNs {
    name: String,
    dir: tempfile::TempDir,
}

impl NetNs {
    fn new(name: String) -> Result<NetNs> {
        run("ip", &["netns", "add", &name])?;
        let ns = NetNs {
            name,
            dir: tempfile::tempdir()?,
        };
        ns.exec(&["ip", "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    fn exec(&self, command: &[&str]) -> Result<String> {
        let mut args = vec!["netns", "exec", &self.name];
        args.extend_from_slice(command);
        run("ip", &args)
    }

    fn dnsmasq_pidfile(&self) -> PathBuf {
        self.dir.path().join("dnsmasq.pid")
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if let Some(pid) = std::fs::read_to_string(self.dnsmasq_pidfile())
            .ok()
            .and_then(|p| p.trim().parse::<u32>().ok())
        {
            let ours = std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                String::from_utf8_lossy(&c).contains(&self.dir.path().display().to_string())
            });
            if ours {
                kill(pid);
            }
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn run(program: &str, args: &[&str]) -> Result<String> {
    let output = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program}"))?;
    ensure!(
        output.status.success(),
        "{program} {args:?} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

#[tokio::test]
async fn the_tiny_guest_answers_on_the_network() -> Result<()> {
    // The guest's NIC ends up alone in a namespace of this test, with a DHCP server, on
    // the documentation range 192.0.2.0/24: nothing leaves the namespace.
    let uid = new_uid();
    let ns = NetNs::new(format!("fq-{}", &uid[..8]))?;
    let host = Host::new();
    let tap = format!("fq{}", &uid[..8]);
    let mac = "52:54:00:0f:e2:08";
    let spec = VmSpec {
        nics: vec![Nic {
            id: new_uid(),
            tap: tap.clone(),
            mac: mac.into(),
        }],
        ..tiny_spec(&uid, "web-8", None)
    };
    let status = host.driver.start(&spec).await?;
    run("ip", &["link", "set", &tap, "netns", &ns.name])?;
    ns.exec(&["ip", "addr", "add", "192.0.2.1/24", "dev", &tap])?;
    ns.exec(&["ip", "link", "set", &tap, "up"])?;
    let pidfile = ns.dnsmasq_pidfile();
    let leases = ns.dir.path().join("leases");
    ns.exec(&[
        "dnsmasq",
        "--no-hosts",
        "--no-resolv",
        "--conf-file=/dev/null",
        "--port=0",
        "--no-ping",
        "--user=root",
        &format!("--pid-file={}", pidfile.display()),
        &format!("--dhcp-leasefile={}", leases.display()),
        &format!("--interface={tap}"),
        "--bind-interfaces",
        "--dhcp-range=192.0.2.10,static,255.255.255.0,1h",
        &format!("--dhcp-host={mac},192.0.2.10"),
    ])?;

    let (_, addr) = wait_for_console(&status.serial_log, 0, "FERRO-ADDR").await?;
    ensure!(addr == "FERRO-ADDR eth0 192.0.2.10/24", "{addr}");
    // The responders start before the ready marker; the address may come before either.
    wait_for_console(&status.serial_log, 0, "FERRO-READY").await?;
    let ping = ns.exec(&["busybox", "ping", "-c", "1", "-W", "10", "192.0.2.10"])?;
    ensure!(ping.contains("1 packets received"), "{ping}");
    // A plain HTTP request over nc (the host's static busybox wget crashes here).
    let request = "printf 'GET / HTTP/1.0\\r\\n\\r\\n' | busybox nc -w 10 192.0.2.10 80";
    let page = ns.exec(&["sh", "-c", request])?;
    ensure!(
        page.starts_with("HTTP/1.1 200") && page.trim_end().ends_with("\nweb-8"),
        "{page}"
    );
    let hello = ns.exec(&["busybox", "nc", "-w", "10", "192.0.2.10", "7"])?;
    ensure!(hello.starts_with("ferro-tiny web-8"), "{hello}");
    destroy_and_check(&host.driver, &uid).await
}

/// A persistent tap of the test's own, up, as the network reconciler makes them before a
/// NIC is plugged; deleted on drop.
struct Tap(String);

impl Tap {
    fn new(name: String) -> Result<Tap> {
        run("ip", &["tuntap", "add", &name, "mode", "tap"])?;
        let tap = Tap(name);
        run("ip", &["link", "set", &tap.0, "up"])?;
        Ok(tap)
    }

    /// Whether a process holds the tap open: a tap's carrier is up only then.
    fn attached(&self) -> bool {
        std::fs::read_to_string(format!("/sys/class/net/{}/carrier", self.0))
            .is_ok_and(|c| c.trim() == "1")
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", &self.0]).status();
    }
}

#[tokio::test]
async fn nics_are_hot_plugged_and_unplugged_and_survive_a_cold_restart() -> Result<()> {
    let host = Host::new();
    let uid = new_uid();
    let tap_a = Tap::new(format!("fa{}", &uid[..8]))?;
    let tap_b = Tap::new(format!("fb{}", &uid[..8]))?;
    let nic_a = Nic {
        id: new_uid(),
        tap: tap_a.0.clone(),
        mac: "52:54:00:0f:e2:0a".into(),
    };
    let nic_b = Nic {
        id: new_uid(),
        tap: tap_b.0.clone(),
        mac: "52:54:00:0f:e2:0b".into(),
    };
    let spec = VmSpec {
        nics: vec![nic_a.clone()],
        ..tiny_spec(&uid, "web-10", None)
    };
    let status = host.driver.start(&spec).await?;
    let log = status.serial_log.clone();
    let (console, _) = wait_for_console(&log, 0, "FERRO-READY").await?;
    ensure!(
        console.contains(&format!("FERRO-NIC eth0 {}", nic_a.mac)),
        "{console}"
    );
    ensure!(host.driver.nics(&uid).await? == std::slice::from_ref(&nic_a));
    ensure!(tap_a.attached() && !tap_b.attached());

    // Hot-plug: the guest finds the NIC within a few seconds, QEMU lists it, and the
    // recorded spec has both.
    let from = log_len(&log);
    let plugging = Instant::now();
    host.driver.attach_nic(&uid, &nic_b).await?;
    let plugged = plugging.elapsed();
    let (_, seen) = wait_for_console(&log, from, "FERRO-NIC eth1").await?;
    let seen_after = plugging.elapsed();
    println!(
        "hot-plug: attach_nic took {} ms, the guest reported the NIC {} ms after the call \
         (TCG, polling every 0.5 s)",
        plugged.as_millis(),
        seen_after.as_millis()
    );
    ensure!(seen == format!("FERRO-NIC eth1 {}", nic_b.mac), "{seen}");
    ensure!(host.driver.nics(&uid).await? == [nic_a.clone(), nic_b.clone()]);
    ensure!(tap_b.attached(), "QEMU does not hold {}", tap_b.0);
    let recorded = host.driver.recorded_spec(&uid).context("vm.json")?;
    ensure!(
        recorded.nics == [nic_a.clone(), nic_b.clone()],
        "{recorded:?}"
    );
    // Asked again, nothing changes; a restarted agent reads the same from QEMU.
    host.driver.attach_nic(&uid, &nic_b).await?;
    ensure!(host.driver.nics(&uid).await?.len() == 2);
    ensure!(host.second_driver().nics(&uid).await? == [nic_a.clone(), nic_b.clone()]);

    // A cold restart from the recorded spec brings both back, in that order.
    ensure!(host.driver.stop(&uid, Duration::from_secs(60)).await? == StopOutcome::Graceful);
    let from = log_len(&log);
    host.driver
        .start(&VmSpec {
            config_drive: spec.config_drive.clone(),
            ..recorded
        })
        .await?;
    let (console, _) = wait_for_console(&log, from, "FERRO-READY").await?;
    for (ifname, nic) in [("eth0", &nic_a), ("eth1", &nic_b)] {
        ensure!(
            console.contains(&format!("FERRO-NIC {ifname} {}", nic.mac)),
            "{console}"
        );
    }
    ensure!(host.driver.nics(&uid).await? == [nic_a.clone(), nic_b.clone()]);

    // Unplug, cold-plugged NICs too: gone from the guest, from QEMU and from the spec.
    let from = log_len(&log);
    let unplugging = Instant::now();
    host.driver.detach_nic(&uid, &nic_a.id).await?;
    println!(
        "hot-unplug: detach_nic took {} ms",
        unplugging.elapsed().as_millis()
    );
    wait_for_console(&log, from, "FERRO-NIC-GONE eth0").await?;
    ensure!(host.driver.nics(&uid).await? == std::slice::from_ref(&nic_b));
    ensure!(!tap_a.attached(), "QEMU still holds {}", tap_a.0);
    ensure!(
        Path::new(&format!("/sys/class/net/{}", tap_a.0)).exists(),
        "the persistent tap went with the NIC"
    );
    let recorded = host.driver.recorded_spec(&uid).context("vm.json")?;
    ensure!(recorded.nics == [nic_b.clone()], "{recorded:?}");
    host.driver.detach_nic(&uid, &nic_a.id).await?;

    // The freed port takes the NIC again, hot-plugged this time, and lets it go again.
    let from = log_len(&log);
    host.driver.attach_nic(&uid, &nic_a).await?;
    wait_for_console(&log, from, &format!("FERRO-NIC eth0 {}", nic_a.mac)).await?;
    ensure!(host.driver.nics(&uid).await? == [nic_a.clone(), nic_b.clone()]);
    let from = log_len(&log);
    host.driver.detach_nic(&uid, &nic_a.id).await?;
    wait_for_console(&log, from, "FERRO-NIC-GONE eth0").await?;
    ensure!(host.driver.nics(&uid).await? == std::slice::from_ref(&nic_b));
    let recorded = host.driver.recorded_spec(&uid).context("vm.json")?;
    ensure!(recorded.nics == [nic_b.clone()], "{recorded:?}");
    destroy_and_check(&host.driver, &uid).await
}

/// Makes a qcow2 volume file of `size` bytes, as a file volume backend would.
fn create_volume(path: &Path, size: u64) -> Result<()> {
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            path.to_str().context("UTF-8 path")?,
            &size.to_string(),
        ],
    )?;
    Ok(())
}

/// A volume's first bytes, read from its qcow2 file (nothing may hold the file open).
fn volume_head(path: &Path, len: usize) -> Result<Vec<u8>> {
    let out = path.with_extension("head");
    run(
        "qemu-img",
        &[
            "dd",
            "-f",
            "qcow2",
            "-O",
            "raw",
            "bs=512",
            "count=1",
            &format!("if={}", path.display()),
            &format!("of={}", out.display()),
        ],
    )?;
    let mut head = std::fs::read(&out)?;
    head.truncate(len);
    Ok(head)
}

/// The virtual size QEMU's tools see in a qcow2 volume file.
fn volume_size(path: &Path) -> Result<u64> {
    let info = run(
        "qemu-img",
        &[
            "info",
            "-U",
            "--output=json",
            path.to_str().context("UTF-8")?,
        ],
    )?;
    let info: serde_json::Value = serde_json::from_str(&info)?;
    info["virtual-size"].as_u64().context("virtual-size")
}

/// Every block node the VM's QEMU has, as `(node-name, driver, file)`, asked directly
/// over QMP rather than through the driver under test.
async fn block_nodes(driver: &QemuDriver, uid: &str) -> Result<Vec<(String, String, String)>> {
    let mut qmp = driver.qmp(uid).await?;
    let nodes = qmp
        .execute(
            "query-named-block-nodes",
            Some(serde_json::json!({ "flat": true })),
        )
        .await?;
    Ok(nodes
        .as_array()
        .context("a list of nodes")?
        .iter()
        .map(|n| {
            let field = |name: &str| n[name].as_str().unwrap_or_default().to_owned();
            (field("node-name"), field("drv"), field("file"))
        })
        .collect())
}

/// The guest's block device for a disk, from the FERRO-DISK line that announced it:
/// `FERRO-DISK vdc SERIAL BYTES`.
fn guest_device(marker: &str) -> Result<String> {
    marker
        .split_whitespace()
        .nth(1)
        .map(str::to_owned)
        .with_context(|| format!("no device in {marker:?}"))
}

#[tokio::test]
async fn volumes_are_hot_plugged_grown_survive_a_cold_restart_and_unplug_cleanly() -> Result<()> {
    let volumes = tempfile::tempdir()?;
    let host = Host::new();
    let uid = new_uid();
    let spec = tiny_spec(&uid, "web-11", None);
    let status = host.driver.start(&spec).await?;
    let log = status.serial_log.clone();
    wait_for_console(&log, 0, "FERRO-READY").await?;
    ensure!(host.driver.disks(&uid).await?.is_empty());

    let image = volumes.path().join("volume.qcow2");
    create_volume(&image, 64 << 20)?;
    let volume = new_uid();
    let disk = Disk {
        id: volume.clone(),
        source: DiskSource::File {
            path: image.clone(),
            format: DiskFormat::Qcow2,
        },
        serial: volume[..20].to_owned(),
        read_only: false,
    };

    // Hot-plug: the guest finds it behind the boot disk and the config drive, with its
    // serial and size; QEMU lists it; the recorded spec has it.
    let from = log_len(&log);
    let plugging = Instant::now();
    host.driver.attach_disk(&uid, &disk).await?;
    let attached = plugging.elapsed();
    let (_, seen) = wait_for_console(&log, from, "FERRO-DISK ").await?;
    eprintln!(
        "file volume hot-plug: attach_disk took {} ms, the guest reported it {} ms after the call",
        attached.as_millis(),
        plugging.elapsed().as_millis()
    );
    ensure!(
        seen == format!("FERRO-DISK vdc {} {}", disk.serial, 64 << 20),
        "{seen}"
    );
    ensure!(host.driver.disks(&uid).await? == std::slice::from_ref(&disk));
    ensure!(host.second_driver().disks(&uid).await? == std::slice::from_ref(&disk));
    let recorded = host.driver.recorded_spec(&uid).context("vm.json")?;
    ensure!(recorded.disks == [disk.clone()], "{recorded:?}");
    let nodes = block_nodes(&host.driver, &uid).await?;
    ensure!(
        nodes
            .iter()
            .any(|(name, drv, file)| name.starts_with("volume-")
                && drv == "qcow2"
                && file == image.to_str().unwrap()),
        "{nodes:?}"
    );
    // Asked again, nothing changes; the same id with another mode is refused.
    host.driver.attach_disk(&uid, &disk).await?;
    let conflict = host
        .driver
        .attach_disk(
            &uid,
            &Disk {
                read_only: true,
                ..disk.clone()
            },
        )
        .await
        .expect_err("a read-only twin was attached");
    ensure!(
        matches!(conflict, HypervisorError::DiskConflict { .. }),
        "{conflict}"
    );

    // Grown online: QEMU's tools and the guest see the new size; it never shrinks.
    let from = log_len(&log);
    host.driver.resize_disk(&uid, &volume, 128 << 20).await?;
    let grown = format!("FERRO-DISK vdc {} {}", disk.serial, 128 << 20);
    wait_for_console(&log, from, &grown).await?;
    ensure!(volume_size(&image)? == 128 << 20);
    let shrink = host
        .driver
        .resize_disk(&uid, &volume, 64 << 20)
        .await
        .expect_err("the disk shrank");
    ensure!(
        matches!(shrink, HypervisorError::InvalidSpec { .. }),
        "{shrink}"
    );

    // A cold restart from the recorded spec brings it back, as vdc, from the command line.
    ensure!(host.driver.stop(&uid, Duration::from_secs(60)).await? == StopOutcome::Graceful);
    let from = log_len(&log);
    host.driver
        .start(&VmSpec {
            config_drive: spec.config_drive.clone(),
            ..recorded
        })
        .await?;
    let (console, _) = wait_for_console(&log, from, "FERRO-READY").await?;
    ensure!(console.contains(&grown), "{console}");
    ensure!(host.driver.disks(&uid).await? == std::slice::from_ref(&disk));

    // Unplug: gone from the guest, from QEMU (device and block nodes) and from the spec.
    let from = log_len(&log);
    let unplugging = Instant::now();
    host.driver.detach_disk(&uid, &volume).await?;
    eprintln!(
        "file volume hot-unplug: detach_disk took {} ms",
        unplugging.elapsed().as_millis()
    );
    wait_for_console(&log, from, "FERRO-DISK-GONE vdc").await?;
    ensure!(host.driver.disks(&uid).await?.is_empty());
    let nodes = block_nodes(&host.driver, &uid).await?;
    ensure!(
        !nodes.iter().any(
            |(name, _, file)| name.starts_with("vol") || file.contains(image.to_str().unwrap())
        ),
        "block nodes left behind: {nodes:?}"
    );
    let recorded = host.driver.recorded_spec(&uid).context("vm.json")?;
    ensure!(recorded.disks.is_empty(), "{recorded:?}");
    host.driver.detach_disk(&uid, &volume).await?;
    destroy_and_check(&host.driver, &uid).await?;
    // The volume outlives the VM.
    ensure!(volume_size(&image)? == 128 << 20);
    Ok(())
}

/// A `qemu-storage-daemon` exporting one qcow2 volume over NBD on 127.0.0.1, as a storage
/// node serves a volume to guests on other nodes. Tracked by the pid it writes (it
/// daemonizes); killed by that pid on drop, passed or failed.
struct StorageDaemon {
    pid: u32,
    port: u16,
    image: PathBuf,
}

impl StorageDaemon {
    fn start(image: &Path, export: &str, port: u16) -> Result<StorageDaemon> {
        let pidfile = image.with_extension("qsd.pid");
        let _ = std::fs::remove_file(&pidfile);
        run(
            "qemu-storage-daemon",
            &[
                "--blockdev",
                &format!("driver=file,node-name=f,filename={}", image.display()),
                "--blockdev",
                "driver=qcow2,node-name=v,file=f",
                "--nbd-server",
                &format!("addr.type=inet,addr.host=127.0.0.1,addr.port={port}"),
                "--export",
                &format!("type=nbd,id=e,node-name=v,name={export},writable=on"),
                "--pidfile",
                pidfile.to_str().context("UTF-8")?,
                "--daemonize",
            ],
        )?;
        let pid = std::fs::read_to_string(&pidfile)?.trim().parse()?;
        Ok(StorageDaemon {
            pid,
            port,
            image: image.to_owned(),
        })
    }

    fn is_alive(&self) -> bool {
        std::fs::read(format!("/proc/{}/cmdline", self.pid))
            .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&self.image.display().to_string()))
    }

    /// Kills the daemon and waits until it is gone.
    fn stop(&self) -> Result<()> {
        if self.is_alive() {
            kill(self.pid);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.is_alive() {
            ensure!(
                Instant::now() < deadline,
                "qemu-storage-daemon {} lives on",
                self.pid
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }
}

impl Drop for StorageDaemon {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            eprintln!("cleaning up: {e}");
        }
    }
}

/// A TCP port nobody listens on now.
fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

#[tokio::test]
async fn a_volume_served_over_nbd_is_hot_plugged_and_survives_a_daemon_restart() -> Result<()> {
    let volumes = tempfile::tempdir()?;
    let image = volumes.path().join("remote.qcow2");
    create_volume(&image, 64 << 20)?;
    let volume = new_uid();
    let export = format!("volume-{volume}");
    // Declared before the host, so that on failure QEMU is killed before its NBD server.
    let mut daemon = StorageDaemon::start(&image, &export, free_port()?)?;
    let host = Host::new();
    let uid = new_uid();
    let status = host.driver.start(&tiny_spec(&uid, "web-12", None)).await?;
    let log = status.serial_log.clone();
    wait_for_console(&log, 0, "FERRO-READY").await?;

    let disk = Disk {
        id: volume.clone(),
        source: DiskSource::Nbd {
            host: "127.0.0.1".into(),
            port: daemon.port,
            export: export.clone(),
        },
        serial: volume[..20].to_owned(),
        read_only: false,
    };
    let from = log_len(&log);
    let plugging = Instant::now();
    host.driver.attach_disk(&uid, &disk).await?;
    let attached = plugging.elapsed();
    let (_, seen) = wait_for_console(&log, from, "FERRO-DISK ").await?;
    eprintln!(
        "NBD volume hot-plug: attach_disk took {} ms, the guest reported it {} ms after the call",
        attached.as_millis(),
        plugging.elapsed().as_millis()
    );
    ensure!(
        seen == format!("FERRO-DISK vdc {} {}", disk.serial, 64 << 20),
        "{seen}"
    );
    let vd = guest_device(&seen)?;
    ensure!(host.driver.disks(&uid).await? == std::slice::from_ref(&disk));
    let nodes = block_nodes(&host.driver, &uid).await?;
    let url = format!("nbd://127.0.0.1:{}/{export}", daemon.port);
    ensure!(
        nodes
            .iter()
            .any(|(name, drv, file)| name.starts_with("volfile-") && drv == "nbd" && *file == url),
        "{nodes:?}"
    );

    // The guest writes through QEMU's NBD client into the storage node's qcow2.
    let write = |data: &'static str, done: &'static str| {
        format!("echo {data} > /dev/{vd} && sync && echo {done}-$((40 + 2))")
    };
    console_command(
        &status.console_socket,
        &write("ferro-nbd-1", "wrote-one"),
        "wrote-one-42",
    )
    .await?;
    // The storage daemon restarts; QEMU reconnects and the guest's next write lands.
    daemon.stop()?;
    daemon = StorageDaemon::start(&image, &export, daemon.port)?;
    let reconnecting = Instant::now();
    console_command(
        &status.console_socket,
        &write("ferro-nbd-2", "wrote-two"),
        "wrote-two-42",
    )
    .await?;
    eprintln!(
        "NBD volume: the guest's write after the storage daemon restarted took {} ms",
        reconnecting.elapsed().as_millis()
    );

    // QEMU 7.2 cannot grow a disk over NBD: the export must grow on the storage node.
    let grow = host.driver.resize_disk(&uid, &volume, 128 << 20).await;
    eprintln!("NBD volume resize: {grow:?}");
    ensure!(
        matches!(grow, Err(HypervisorError::Control { .. })),
        "{grow:?}"
    );

    let from = log_len(&log);
    let unplugging = Instant::now();
    host.driver.detach_disk(&uid, &volume).await?;
    eprintln!(
        "NBD volume hot-unplug: detach_disk took {} ms",
        unplugging.elapsed().as_millis()
    );
    wait_for_console(&log, from, &format!("FERRO-DISK-GONE {vd}")).await?;
    ensure!(host.driver.disks(&uid).await?.is_empty());
    let nodes = block_nodes(&host.driver, &uid).await?;
    ensure!(
        !nodes
            .iter()
            .any(|(name, drv, _)| name.starts_with("vol") || drv == "nbd"),
        "block nodes left behind: {nodes:?}"
    );
    destroy_and_check(&host.driver, &uid).await?;
    daemon.stop()?;
    let head = volume_head(&image, 12)?;
    ensure!(
        head == b"ferro-nbd-2\n",
        "the volume starts with {:?}",
        String::from_utf8_lossy(&head)
    );
    Ok(())
}
