//! Servers end to end: `ferro up` with a real etcd runs the apiserver, the controllers and
//! this host's agent, which boots real QEMU guests (the tiny test guest of
//! `e2e/images/build-tiny.sh`, under TCG when there is no KVM).
//!
//! One cloud, few boots: three Servers run on the one node at once — `web-1` (restarted
//! `Always`, with a key pair and user data), `manual` (`runStrategy: Manual`) and `late`,
//! whose image does not exist at first (`ImageNotFound`) and which boots once it is
//! applied. A Server with a Flavor far bigger than the host is `NoValidHost`. The serial
//! log shows what the guest was given. After SIGKILL of the agent and then of all of
//! `ferro up`, a restart adopts the guests: still exactly one QEMU each, status right.
//! A killed `Manual` guest stays `Failed`; a killed `Always` guest comes back; a deleted
//! server leaves no process and no files.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, ensure};
use ferro_e2e::{Cloud, Signal, TinyGuest, signal, tiny_guest, wait_for};

/// How long anything that needs a guest to boot may take.
const BOOT: Duration = Duration::from_secs(180);
/// How long the control plane may take to notice and write something.
const SOON: Duration = Duration::from_secs(90);

const KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJ65XlM9xwTrwBb2VYfUbi9VU/mF0doEHYlbtQsEKTh5 alice@ferro";

/// The cloud, brought down with its guests even when the test fails.
struct Guarded(Cloud);

impl Drop for Guarded {
    fn drop(&mut self) {
        let cloud = &mut self.0;
        if cloud.supervisor_pid().is_some() {
            let _ = cloud.ferro(["down", "--purge"]).output();
            let _ = cloud.wait_supervisor_exit(Duration::from_secs(60));
        }
        // Only QEMUs of this cloud: their command lines name its data directory.
        for (pid, cmdline) in cloud.processes() {
            if cmdline.contains("qemu") {
                signal(pid, Signal::KILL);
            }
        }
    }
}

/// Processes running QEMU for the server with this uid.
fn qemus(uid: &str) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let zombie = stat
                .rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'));
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline);
            !zombie && cmdline.contains("qemu") && cmdline.contains(uid)
        })
        .collect()
}

/// A Server's YAML.
fn yaml(cloud: &Cloud, name: &str) -> anyhow::Result<String> {
    cloud.run(["get", "server", name, "-o", "yaml"])
}

/// The value of the first `key: value` line of a YAML text.
fn field(yaml: &str, key: &str) -> Option<String> {
    let prefix = format!("{key}:");
    yaml.lines()
        .find_map(|l| {
            l.trim_start()
                .trim_start_matches("- ")
                .strip_prefix(&prefix)
        })
        .map(|v| v.trim().trim_matches('"').trim_matches('\'').to_owned())
}

/// Waits until a Server's YAML satisfies `check`; returns it.
fn wait_server(
    cloud: &Cloud,
    name: &str,
    what: &str,
    timeout: Duration,
    check: impl Fn(&str) -> bool,
) -> anyhow::Result<String> {
    let mut last = String::new();
    wait_for(&format!("{name} {what}"), timeout, || {
        last = yaml(cloud, name)?;
        Ok(check(&last).then(|| last.clone()))
    })
    .with_context(|| format!("last seen:\n{last}"))
}

fn wait_ready(cloud: &Cloud, name: &str) -> anyhow::Result<()> {
    cloud
        .run([
            "wait",
            &format!("server/{name}"),
            "--for",
            "condition=Ready",
            "--timeout",
            "180s",
        ])
        .map(drop)
        .with_context(|| {
            format!(
                "{name} not Ready: {}",
                yaml(cloud, name).unwrap_or_default()
            )
        })
}

fn uid(cloud: &Cloud, name: &str) -> anyhow::Result<String> {
    field(&yaml(cloud, name)?, "uid").with_context(|| format!("{name} has no uid"))
}

fn vm_dir(cloud: &Cloud, uid: &str) -> PathBuf {
    cloud.data_dir().join("agent/vms").join(uid)
}

fn manifest(guest: &TinyGuest) -> String {
    let server = |name: &str, image: &str, strategy: &str| {
        format!(
            r#"---
apiVersion: ferro/v1
kind: Server
metadata: {{name: {name}}}
spec:
  flavor: m1.tiny
  image: {image}
  keyPair: alice
  hostname: {name}-host
  runStrategy: {strategy}
  userData: |
    #!/bin/sh
    echo "user data ran on $(hostname)"
"#
        )
    };
    format!(
        r#"{images}---
apiVersion: ferro/v1
kind: KeyPair
metadata: {{name: alice}}
spec:
  publicKey: {KEY}
---
apiVersion: ferro/v1
kind: Flavor
metadata: {{name: huge}}
spec: {{vcpus: 1, ramMib: 4000000}}
---
apiVersion: ferro/v1
kind: Server
metadata: {{name: big}}
spec: {{flavor: huge, image: tiny}}
{web}{manual}{late}"#,
        images = guest.image_manifests(),
        web = server("web-1", "tiny", "Always"),
        manual = server("manual", "tiny", "Manual"),
        late = server("late", "later", "Always"),
    )
}

#[test]
fn servers_boot_survive_restarts_and_go_away() -> anyhow::Result<()> {
    let guest = tiny_guest()?;
    let mut guarded = Guarded(Cloud::start()?);
    let cloud = &mut guarded.0;
    wait_for("the local node Ready", SOON, || {
        let nodes = cloud.run(["get", "nodes"])?;
        Ok(nodes
            .lines()
            .skip(1)
            .any(|l| l.contains("True"))
            .then_some(()))
    })?;

    let scratch = tempfile::tempdir()?;
    let file = scratch.path().join("servers.yaml");
    std::fs::write(&file, manifest(&guest))?;
    cloud.run(["apply", "-f", file.to_str().context("path")?])?;

    // Too big for any node: never placed.
    let big = wait_server(cloud, "big", "NoValidHost", SOON, |y| {
        y.contains("NoValidHost")
    })?;
    ensure!(big.contains("type: Scheduled"), "{big}");
    // An image that does not exist: said so.
    wait_for("late ImageNotFound in describe", BOOT, || {
        Ok(cloud
            .run(["describe", "server", "late"])?
            .contains("ImageNotFound")
            .then_some(()))
    })?;

    // web-1 boots with its hostname, key and user data.
    wait_ready(cloud, "web-1")?;
    let logs = wait_for("web-1's ready marker in its logs", SOON, || {
        let logs = cloud.run(["logs", "server/web-1"])?;
        Ok(logs.contains("FERRO-READY").then_some(logs))
    })?;
    ensure!(logs.contains("ferro-tiny: hostname web-1-host"), "{logs}");
    ensure!(
        logs.contains(&format!("ferro-tiny: authorized-key alice {KEY}")),
        "{logs}"
    );
    ensure!(logs.contains("user data ran on web-1-host"), "{logs}");

    // The missing image appears: late boots. Three servers run on the node at once.
    let later = format!(
        "apiVersion: ferro/v1\nkind: Image\nmetadata: {{name: later}}\nspec:\n  source: {{url: \"file://{}\"}}\n  diskFormat: Raw\n  kernel: tiny-kernel\n  ramdisk: tiny-initrd\n  kernelCommandLine: \"{}\"\n",
        guest.disk, guest.cmdline
    );
    let later_file = scratch.path().join("later.yaml");
    std::fs::write(&later_file, later)?;
    cloud.run(["apply", "-f", later_file.to_str().context("path")?])?;
    let names = ["web-1", "manual", "late"];
    for name in names {
        wait_ready(cloud, name)?;
    }
    let mut uids = Vec::new();
    for name in names {
        let y = yaml(cloud, name)?;
        ensure!(field(&y, "phase").as_deref() == Some("Running"), "{y}");
        let uid = uid(cloud, name)?;
        ensure!(qemus(&uid).len() == 1, "{name}: {:?}", qemus(&uid));
        uids.push(uid);
    }

    // SIGKILL the agent, then all of `ferro up`; the guests outlive them.
    let agent_pid: u32 = std::fs::read_to_string(cloud.data_dir().join("run/agent.pid"))?
        .trim()
        .parse()?;
    signal(agent_pid, Signal::KILL);
    wait_for("the killed agent gone", SOON, || {
        let status = std::fs::read_to_string(format!("/proc/{agent_pid}/stat")).unwrap_or_default();
        // Gone, or a zombie its supervisor has yet to reap.
        Ok((status.is_empty() || status.contains(") Z ")).then_some(()))
    })?;
    for uid in &uids {
        ensure!(qemus(uid).len() == 1, "a guest died with its agent: {uid}");
    }
    cloud.kill_supervisor()?;
    let left = wait_for("ferro up's children gone", SOON, || {
        let left: Vec<_> = cloud
            .processes()
            .into_iter()
            // Guests, their DHCP server and the node's switch outlive `ferro up` by
            // design (`ferro down` stops them); everything else must be gone.
            .filter(|(_, c)| {
                !["qemu", "dnsmasq", "ovs-vswitchd", "ovsdb-server"]
                    .iter()
                    .any(|p| c.contains(p))
            })
            .collect();
        Ok(left.is_empty().then_some(()))
    });
    left?;
    cloud.launch()?;
    for (name, uid) in names.iter().zip(&uids) {
        wait_ready(cloud, name)?;
        let y = yaml(cloud, name)?;
        ensure!(field(&y, "phase").as_deref() == Some("Running"), "{y}");
        ensure!(qemus(uid).len() == 1, "{name}: {:?}", qemus(uid));
    }

    // Manual: a killed guest stays dead, and the server is Failed.
    for pid in qemus(&uids[1]) {
        signal(pid, Signal::KILL);
    }
    wait_server(cloud, "manual", "Failed", SOON, |y| {
        field(y, "phase").as_deref() == Some("Failed")
    })?;
    ensure!(qemus(&uids[1]).is_empty());

    // Always: a killed guest comes back.
    for pid in qemus(&uids[0]) {
        signal(pid, Signal::KILL);
    }
    wait_server(cloud, "web-1", "restarted once", BOOT, |y| {
        field(y, "restartCount").as_deref() == Some("1")
    })?;
    wait_ready(cloud, "web-1")?;
    let y = yaml(cloud, "web-1")?;
    ensure!(field(&y, "phase").as_deref() == Some("Running"), "{y}");
    ensure!(qemus(&uids[0]).len() == 1, "{:?}", qemus(&uids[0]));

    // Deleted: no process, no files.
    cloud.run(["delete", "server", "web-1", "--wait"])?;
    wait_for("web-1's QEMU and files gone", SOON, || {
        Ok((qemus(&uids[0]).is_empty() && !vm_dir(cloud, &uids[0]).exists()).then_some(()))
    })?;
    Ok(())
}
