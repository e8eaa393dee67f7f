//! The volume backends and NBD exports against the real tools: `qemu-img`, `qemu-io`,
//! `qemu-storage-daemon` (and LVM, where the host has device-mapper).
//!
//! The file backend and NBD tests need only the QEMU tools (they fail, saying what to
//! install, when the tools are missing); the block-device export needs root and loop
//! devices, and LVM needs root, the LVM tools and device-mapper: those tests print
//! `skipped: <reason>` and return when the host cannot run them. Every test works in a
//! private temporary directory and, when it ends, passed or failed, kills by pid every
//! `qemu-storage-daemon` whose pidfile lies in it and undoes its loop devices and volume
//! groups. Times are printed, not asserted: these tests share two cores.

use std::net::TcpListener;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, bail, ensure};
use ferro_agent::hypervisor::DiskFormat;
use ferro_agent::volumes::file::{FileBackend, LEFTOVER_AGE};
use ferro_agent::volumes::lvm::{LvmBackend, LvmConfig};
use ferro_agent::volumes::nbd::{NbdExports, is_export_process};
use ferro_agent::volumes::{Content, VolumeBackend, VolumeError, VolumeInfo, VolumeRequest};

const MIB: u64 = 1 << 20;

/// Fails the test, saying what to install, when a tool is missing.
fn require(tool: &str, package: &str) {
    let works = Command::new(tool)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(works, "{tool} is missing: install {package}");
}

fn require_qemu_tools() {
    require("qemu-img", "qemu-utils");
    require("qemu-io", "qemu-utils");
    require(
        "qemu-storage-daemon",
        "qemu-system-common (qemu-storage-daemon)",
    );
}

/// Runs a command; its stdout, or an error with its stderr.
fn run(program: &str, args: &[&str]) -> Result<String> {
    let output = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program}"))?;
    ensure!(
        output.status.success(),
        "{program} {} failed ({}): {}{}",
        args.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// `qemu-io` one command on an image; fails unless it succeeds and, for reads with a
/// pattern, the pattern matched (qemu-io prints "Pattern verification failed" and still
/// exits 0 in some versions).
fn qemu_io(format: &str, image: &str, command: &str) -> Result<String> {
    let out = run("qemu-io", &["-f", format, "-c", command, image])?;
    ensure!(
        !out.contains("failed") && !out.contains("error"),
        "qemu-io {command:?} on {image}: {out}"
    );
    Ok(out)
}

/// Whether `pid` is a live process (a zombie waiting for init counts as gone).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        !matches!(
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next()),
            Some("Z" | "X") | None
        )
    })
}

/// A process's session id, from `/proc/<pid>/stat`.
fn session(pid: u32) -> Result<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .context("stat")?
        .1
        .split_whitespace()
        .collect();
    Ok(fields[3].to_owned())
}

/// The pids of every process whose command line has `--pidfile <a file under dir>`.
fn daemons_under(dir: &Path) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                return false;
            };
            let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
            args.windows(2).any(|pair| {
                pair[0] == b"--pidfile"
                    && Path::new(std::str::from_utf8(pair[1]).unwrap_or("")).starts_with(dir)
            })
        })
        .filter(|pid| alive(*pid))
        .collect()
}

/// A private directory; kills (by pid) every daemon with a pidfile in it, and undoes loop
/// devices and volume groups it was told about, when dropped.
struct Scratch {
    dir: tempfile::TempDir,
    loops: Vec<String>,
    volume_groups: Vec<String>,
}

impl Scratch {
    fn new() -> Scratch {
        Scratch {
            dir: tempfile::Builder::new()
                .prefix("ferro-volumes")
                .tempdir()
                .expect("temp dir"),
            loops: Vec::new(),
            volume_groups: Vec::new(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn backend(&self) -> FileBackend {
        FileBackend::new(self.path("volumes"), "qemu-img".into())
    }

    fn exports(&self, ports: RangeInclusive<u16>) -> NbdExports {
        NbdExports::new(
            self.path("nbd"),
            "qemu-storage-daemon".into(),
            "127.0.0.1".into(),
            ports,
        )
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        for pid in daemons_under(self.dir.path()) {
            eprintln!("cleaning up: killing qemu-storage-daemon {pid}");
            if let Some(target) = rustix::process::Pid::from_raw(pid as i32) {
                let _ = rustix::process::kill_process(target, rustix::process::Signal::KILL);
            }
            let deadline = Instant::now() + Duration::from_secs(5);
            while alive(pid) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        for vg in &self.volume_groups {
            let _ = Command::new("vgremove").args(["-ff", "-y", vg]).output();
        }
        for device in &self.loops {
            let _ = Command::new("pvremove")
                .args(["-ff", "-y", device])
                .output();
            let _ = Command::new("losetup").args(["-d", device]).output();
        }
    }
}

fn empty(uid: &str, size_bytes: u64) -> VolumeRequest {
    VolumeRequest {
        uid: uid.into(),
        size_bytes,
        content: Content::Empty,
    }
}

/// What `qemu-img info` says of a file.
fn image_info(path: &Path) -> Result<serde_json::Value> {
    let out = run(
        "qemu-img",
        &[
            "info",
            "-U",
            "--output=json",
            path.to_str().context("UTF-8")?,
        ],
    )?;
    Ok(serde_json::from_str(&out)?)
}

/// A raw image of `size` bytes whose first MiB is 0x5a.
fn raw_image(path: &Path, size: u64) -> Result<()> {
    let p = path.to_str().context("UTF-8")?;
    run(
        "qemu-img",
        &["create", "-q", "-f", "raw", p, &size.to_string()],
    )?;
    qemu_io("raw", p, "write -P 0x5a 0 1M")?;
    Ok(())
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[tokio::test]
async fn file_volumes_are_made_grown_and_removed() -> Result<()> {
    require_qemu_tools();
    let scratch = Scratch::new();
    let backend = scratch.backend();
    assert_eq!(backend.kind(), "file");

    let made = backend.create(&empty("v1", 64 * MIB)).await?;
    assert_eq!(made.uid, "v1");
    assert_eq!(made.size_bytes, 64 * MIB);
    assert_eq!(made.format, DiskFormat::Qcow2);
    assert_eq!(made.path, scratch.path("volumes/v1.qcow2"));
    let info = image_info(&made.path)?;
    assert_eq!(info["format"], "qcow2");
    assert_eq!(info["virtual-size"], 64 * MIB);
    assert!(info.get("backing-filename").is_none(), "{info}");
    qemu_io(
        "qcow2",
        made.path.to_str().context("UTF-8")?,
        "read -P 0 0 64M",
    )?;

    // Idempotent: the same request, or a smaller one, returns the volume as it is.
    let before = std::fs::metadata(&made.path)?.modified()?;
    assert_eq!(backend.create(&empty("v1", 64 * MIB)).await?, made);
    assert_eq!(backend.create(&empty("v1", 32 * MIB)).await?, made);
    assert_eq!(std::fs::metadata(&made.path)?.modified()?, before);
    // A larger one grows it.
    assert_eq!(
        backend.create(&empty("v1", 96 * MIB)).await?.size_bytes,
        96 * MIB
    );

    let grown = backend.resize("v1", 128 * MIB).await?;
    assert_eq!(grown.size_bytes, 128 * MIB);
    assert_eq!(image_info(&grown.path)?["virtual-size"], 128 * MIB);
    assert_eq!(backend.resize("v1", 128 * MIB).await?, grown);
    match backend.resize("v1", 64 * MIB).await {
        Err(e @ VolumeError::Shrink { .. }) => {
            assert_eq!(e.reason(), "ShrinkRefused");
            assert!(e.to_string().contains(&(128 * MIB).to_string()), "{e}");
        }
        other => bail!("a shrink was not refused: {other:?}"),
    }
    assert_eq!(backend.get("v1").await?, Some(grown.clone()));
    assert!(matches!(
        backend.resize("nope", 128 * MIB).await,
        Err(VolumeError::NotFound(_))
    ));

    backend.create(&empty("v0", MIB)).await?;
    let listed: Vec<String> = backend.list().await?.into_iter().map(|v| v.uid).collect();
    assert_eq!(listed, ["v0", "v1"]);
    // Another backend on the same directory (a restarted agent) sees the same.
    let again = scratch.backend();
    assert_eq!(again.list().await?, backend.list().await?);

    let capacity = backend.capacity().await?;
    assert!(capacity.total_bytes > 0 && capacity.free_bytes <= capacity.total_bytes);

    backend.delete("v1").await?;
    backend.delete("v1").await?;
    assert_eq!(backend.get("v1").await?, None);
    assert!(!grown.path.exists());
    backend.delete("v0").await?;
    assert_eq!(files_in(&scratch.path("volumes")), [] as [String; 0]);
    Ok(())
}

#[tokio::test]
async fn a_volume_from_an_image_is_a_standalone_sparse_copy() -> Result<()> {
    require_qemu_tools();
    let scratch = Scratch::new();
    let backend = scratch.backend();
    let image = scratch.path("image.raw");
    raw_image(&image, 16 * MIB)?;
    let qcow2_image = scratch.path("image.qcow2");
    run(
        "qemu-img",
        &[
            "convert",
            "-q",
            "-f",
            "raw",
            "-O",
            "qcow2",
            image.to_str().context("UTF-8")?,
            qcow2_image.to_str().context("UTF-8")?,
        ],
    )?;

    let started = Instant::now();
    let volume = backend
        .create(&VolumeRequest {
            content: Content::Image {
                path: image.clone(),
                format: DiskFormat::Raw,
            },
            ..empty("from-raw", 256 * MIB)
        })
        .await?;
    println!(
        "a 256 MiB volume from a 16 MiB raw image in {} ms",
        started.elapsed().as_millis()
    );
    assert_eq!(volume.size_bytes, 256 * MIB);
    let info = image_info(&volume.path)?;
    assert!(info.get("backing-filename").is_none(), "{info}");
    let on_disk = info["actual-size"].as_u64().context("actual-size")?;
    assert!(on_disk < 8 * MIB, "not sparse: {on_disk} bytes on disk");

    let from_qcow2 = backend
        .create(&VolumeRequest {
            content: Content::Image {
                path: qcow2_image.clone(),
                format: DiskFormat::Qcow2,
            },
            ..empty("from-qcow2", 16 * MIB)
        })
        .await?;
    assert_eq!(from_qcow2.size_bytes, 16 * MIB);

    // The image cache may evict the image: the volumes keep every byte.
    std::fs::remove_file(&image)?;
    std::fs::remove_file(&qcow2_image)?;
    for v in [&volume, &from_qcow2] {
        let path = v.path.to_str().context("UTF-8")?;
        qemu_io("qcow2", path, "read -P 0x5a 0 1M")?;
        qemu_io("qcow2", path, "read -P 0 1M 15M")?;
    }

    // An image larger than the request is refused, naming both sizes, leaving nothing.
    let big = scratch.path("big.raw");
    raw_image(&big, 32 * MIB)?;
    let refused = backend
        .create(&VolumeRequest {
            content: Content::Image {
                path: big.clone(),
                format: DiskFormat::Raw,
            },
            ..empty("too-small", 16 * MIB)
        })
        .await
        .expect_err("an image larger than the volume");
    let text = refused.to_string();
    assert!(
        matches!(
            refused,
            VolumeError::InvalidRequest {
                field: "size_bytes",
                ..
            }
        ) && text.contains(&(16 * MIB).to_string())
            && text.contains(&(32 * MIB).to_string()),
        "{text}"
    );
    // A missing image is a missing source.
    let missing = backend
        .create(&VolumeRequest {
            content: Content::Image {
                path: scratch.path("gone.raw"),
                format: DiskFormat::Raw,
            },
            ..empty("no-image", 16 * MIB)
        })
        .await
        .expect_err("no image");
    assert_eq!(missing.reason(), "SourceNotFound");
    assert_eq!(
        files_in(&scratch.path("volumes")),
        ["from-qcow2.qcow2", "from-raw.qcow2"]
    );
    Ok(())
}

#[tokio::test]
async fn a_clone_copies_its_source_and_then_goes_its_own_way() -> Result<()> {
    require_qemu_tools();
    let scratch = Scratch::new();
    let backend = scratch.backend();
    let source = backend.create(&empty("source", 32 * MIB)).await?;
    let source_path = source.path.to_str().context("UTF-8")?.to_owned();
    qemu_io("qcow2", &source_path, "write -P 0x11 2M 1M")?;

    let clone = backend
        .create(&VolumeRequest {
            content: Content::Volume {
                uid: "source".into(),
            },
            ..empty("clone", 64 * MIB)
        })
        .await?;
    assert_eq!(clone.size_bytes, 64 * MIB);
    let clone_path = clone.path.to_str().context("UTF-8")?.to_owned();
    assert!(image_info(&clone.path)?.get("backing-filename").is_none());
    qemu_io("qcow2", &clone_path, "read -P 0x11 2M 1M")?;
    qemu_io("qcow2", &clone_path, "write -P 0x22 2M 1M")?;
    qemu_io("qcow2", &source_path, "read -P 0x11 2M 1M")?;
    backend.delete("source").await?;
    qemu_io("qcow2", &clone_path, "read -P 0x22 2M 1M")?;

    let error = backend
        .create(&VolumeRequest {
            content: Content::Volume {
                uid: "source".into(),
            },
            ..empty("orphan", 64 * MIB)
        })
        .await
        .expect_err("no source");
    assert!(
        matches!(&error, VolumeError::SourceNotFound(s) if s == "volume source"),
        "{error}"
    );
    let error = backend
        .create(&VolumeRequest {
            content: Content::Volume {
                uid: "clone".into(),
            },
            ..empty("smaller", 32 * MIB)
        })
        .await
        .expect_err("a clone smaller than its source");
    assert_eq!(error.reason(), "InvalidRequest");
    assert_eq!(files_in(&scratch.path("volumes")), ["clone.qcow2"]);
    Ok(())
}

#[tokio::test]
async fn the_remains_of_an_interrupted_create_are_cleaned() -> Result<()> {
    require_qemu_tools();
    let scratch = Scratch::new();
    let backend = scratch.backend();
    std::fs::create_dir_all(backend.dir())?;
    // What a create killed half-way leaves: bytes under the partial name.
    std::fs::write(backend.partial_path("v1"), b"half a volume")?;
    std::fs::write(backend.partial_path("old"), b"half a volume")?;
    std::fs::write(backend.partial_path("fresh"), b"half a volume")?;
    std::fs::File::options()
        .write(true)
        .open(backend.partial_path("old"))?
        .set_modified(SystemTime::now() - 2 * LEFTOVER_AGE)?;

    assert_eq!(backend.list().await?, [], "a partial is never a volume");
    assert_eq!(backend.get("v1").await?, None);

    // The next create of that uid starts afresh.
    let made = backend.create(&empty("v1", 8 * MIB)).await?;
    assert_eq!(image_info(&made.path)?["virtual-size"], 8 * MIB);
    assert!(!backend.partial_path("v1").exists());

    // The sweep takes old partials and leaves a fresh one (another create may own it).
    let removed = backend.collect_leftovers().await?;
    assert_eq!(removed, [backend.partial_path("old").display().to_string()]);
    assert_eq!(files_in(backend.dir()), ["fresh.qcow2.partial", "v1.qcow2"]);
    Ok(())
}

#[tokio::test]
async fn a_volume_is_served_over_nbd_until_its_export_is_removed() -> Result<()> {
    require_qemu_tools();
    let scratch = Scratch::new();
    let backend = scratch.backend();
    let volume = backend.create(&empty("v1", 64 * MIB)).await?;
    let ports = 21809..=21828;
    // Someone else listens on the first port: the export takes the next.
    let squatter = TcpListener::bind(("127.0.0.1", *ports.start()))?;
    let exports = scratch.exports(ports.clone());

    let started = Instant::now();
    let export = exports.ensure("v1--s1", &volume).await?;
    println!(
        "NBD export started in {} ms: {} (pid {})",
        started.elapsed().as_millis(),
        export.url(),
        export.pid
    );
    assert_eq!(export.port, ports.start() + 1);
    assert_eq!(
        (
            export.id.as_str(),
            export.volume_uid.as_str(),
            export.name.as_str()
        ),
        ("v1--s1", "v1", "v1")
    );
    assert_eq!(export.host, "127.0.0.1");
    assert!(is_export_process(export.pid, &exports.pidfile("v1--s1")));
    // The daemon lives in a session of its own and outlives us.
    assert_ne!(session(export.pid)?, session(std::process::id())?);
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(exports.record_path("v1--s1"))?)?;
    assert_eq!(record["port"], export.port);
    assert_eq!(record["volume_uid"], "v1");

    // A guest elsewhere writes through the export.
    let url = export.url();
    qemu_io("raw", &url, "write -P 0x5a 0 1M")?;
    qemu_io("raw", &url, "read -P 0x5a 0 1M")?;
    // A second export of another volume takes another port.
    let v2 = backend.create(&empty("v2", 8 * MIB)).await?;
    let second = exports.ensure("v2--s1", &v2).await?;
    assert_eq!(second.port, ports.start() + 2);

    // Ensuring again adopts the running daemon.
    assert_eq!(exports.ensure("v1--s1", &volume).await?, export);
    assert_eq!(exports.list().await?, [export.clone(), second.clone()]);

    exports.remove("v1--s1").await?;
    assert!(!alive(export.pid), "the daemon {} still runs", export.pid);
    exports.remove("v1--s1").await?;
    assert_eq!(exports.list().await?, std::slice::from_ref(&second));
    exports.remove("v2--s1").await?;
    assert_eq!(files_in(exports.dir()), [] as [String; 0]);
    drop(squatter);

    // The bytes are in the volume.
    qemu_io(
        "qcow2",
        volume.path.to_str().context("UTF-8")?,
        "read -P 0x5a 0 1M",
    )?;
    Ok(())
}

#[tokio::test]
async fn a_restarted_agent_adopts_exports_and_restarts_dead_ones() -> Result<()> {
    require_qemu_tools();
    let scratch = Scratch::new();
    let backend = scratch.backend();
    let volume = backend.create(&empty("v1", 16 * MIB)).await?;
    let ports = 21909..=21928;
    let first = scratch.exports(ports.clone());
    let export = first.ensure("v1--s1", &volume).await?;
    drop(first);

    // Another NbdExports on the same directory, as after an agent restart.
    let second = scratch.exports(ports.clone());
    assert_eq!(second.list().await?, std::slice::from_ref(&export));
    assert_eq!(second.ensure("v1--s1", &volume).await?, export);

    // The daemon dies: the export is still listed, with pid 0, and keeps its port.
    if let Some(target) = rustix::process::Pid::from_raw(export.pid as i32) {
        rustix::process::kill_process(target, rustix::process::Signal::KILL)?;
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while alive(export.pid) {
        ensure!(
            Instant::now() < deadline,
            "SIGKILL did not end {}",
            export.pid
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let listed = second.list().await?;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].pid, 0);
    assert!(!listed[0].is_running());
    assert_eq!(listed[0].port, export.port);

    let restarted = second.ensure("v1--s1", &volume).await?;
    assert_ne!(restarted.pid, export.pid);
    assert_eq!(restarted.port, export.port);
    qemu_io("raw", &restarted.url(), "write -P 0x33 0 64k")?;

    // A request for another volume under the same id replaces the daemon.
    let v2 = backend.create(&empty("v2", 16 * MIB)).await?;
    let replaced = second.ensure("v1--s1", &v2).await?;
    assert_ne!(replaced.pid, restarted.pid);
    assert!(!alive(restarted.pid));
    assert_eq!(replaced.volume_uid, "v2");
    assert_eq!(replaced.port, export.port);

    second.remove("v1--s1").await?;
    assert!(!alive(replaced.pid));
    assert_eq!(files_in(second.dir()), [] as [String; 0]);
    qemu_io(
        "qcow2",
        volume.path.to_str().context("UTF-8")?,
        "read -P 0x33 0 64k",
    )?;
    Ok(())
}

/// Why this host cannot make loop devices, if it cannot.
fn loop_devices_unavailable() -> Option<String> {
    if !rustix::process::geteuid().is_root() {
        return Some("needs root (loop devices)".into());
    }
    if Command::new("losetup").arg("--version").output().is_err() {
        return Some("losetup is missing (util-linux)".into());
    }
    None
}

/// Attaches a file of `size` bytes to a loop device, undone when `scratch` drops.
fn loop_device(scratch: &mut Scratch, name: &str, size: u64) -> Result<String> {
    let file = scratch.path(name);
    std::fs::File::create(&file)?.set_len(size)?;
    let device = run(
        "losetup",
        &["-f", "--show", file.to_str().context("UTF-8")?],
    )?
    .trim()
    .to_owned();
    scratch.loops.push(device.clone());
    Ok(device)
}

#[tokio::test]
async fn a_block_device_is_exported_with_the_host_device_driver() -> Result<()> {
    require_qemu_tools();
    if let Some(reason) = loop_devices_unavailable() {
        println!("skipped: {reason}");
        return Ok(());
    }
    let mut scratch = Scratch::new();
    let device = loop_device(&mut scratch, "disk.raw", 16 * MIB)?;
    let volume = VolumeInfo {
        uid: "lv1".into(),
        size_bytes: 16 * MIB,
        path: device.clone().into(),
        format: DiskFormat::Raw,
    };
    let exports = scratch.exports(22009..=22028);
    let export = exports.ensure("lv1--s1", &volume).await?;
    qemu_io("raw", &export.url(), "write -P 0x44 1M 1M")?;
    exports.remove("lv1--s1").await?;
    assert!(!alive(export.pid));
    qemu_io("raw", &device, "read -P 0x44 1M 1M")?;
    Ok(())
}

/// Why LVM volumes cannot be tested here, if they cannot.
fn lvm_unavailable() -> Option<String> {
    if let Err(e) = LvmBackend::probe() {
        return Some(e.to_string());
    }
    if Command::new("lvcreate").arg("--version").output().is_err() {
        return Some("lvcreate is missing (install lvm2)".into());
    }
    if Command::new("blkdiscard")
        .arg("--version")
        .output()
        .is_err()
    {
        return Some("blkdiscard is missing (util-linux)".into());
    }
    loop_devices_unavailable()
}

#[tokio::test]
async fn lvm_volumes_in_a_thin_pool_and_thick() -> Result<()> {
    require_qemu_tools();
    if let Some(reason) = lvm_unavailable() {
        println!("skipped: {reason}");
        return Ok(());
    }
    let mut scratch = Scratch::new();
    let device = loop_device(&mut scratch, "pv.raw", 512 * MIB)?;
    let vg = format!(
        "ferro-test-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    run("pvcreate", &["-q", "-y", &device])?;
    run("vgcreate", &["-q", "-y", &vg, &device])?;
    scratch.volume_groups.push(vg.clone());
    run(
        "lvcreate",
        &["-q", "-y", "-L", "192m", "-T", &format!("{vg}/pool")],
    )?;

    let image = scratch.path("image.raw");
    raw_image(&image, 8 * MIB)?;
    for thin_pool in [Some("pool".to_owned()), None] {
        let backend = LvmBackend::new(LvmConfig {
            volume_group: vg.clone(),
            thin_pool: thin_pool.clone(),
            qemu_img: "qemu-img".into(),
        });
        assert_eq!(backend.kind(), "lvm");
        let kind = if thin_pool.is_some() { "thin" } else { "thick" };
        let started = Instant::now();
        let volume = backend
            .create(&VolumeRequest {
                content: Content::Image {
                    path: image.clone(),
                    format: DiskFormat::Raw,
                },
                ..empty("v1", 32 * MIB)
            })
            .await?;
        println!(
            "{kind}: a 32 MiB LV from an 8 MiB image in {} ms",
            started.elapsed().as_millis()
        );
        assert_eq!(volume.format, DiskFormat::Raw);
        assert_eq!(volume.path, Path::new("/dev").join(&vg).join("ferro-v1"));
        assert!(volume.size_bytes >= 32 * MIB);
        let path = volume.path.to_str().context("UTF-8")?.to_owned();
        qemu_io("raw", &path, "read -P 0x5a 0 1M")?;
        qemu_io("raw", &path, "read -P 0 1M 31M")?;
        assert_eq!(backend.create(&empty("v1", 32 * MIB)).await?, volume);

        let clone = backend
            .create(&VolumeRequest {
                content: Content::Volume { uid: "v1".into() },
                ..empty("v2", 32 * MIB)
            })
            .await?;
        qemu_io(
            "raw",
            clone.path.to_str().context("UTF-8")?,
            "read -P 0x5a 0 1M",
        )?;

        let grown = backend.resize("v1", 64 * MIB).await?;
        assert!(grown.size_bytes >= 64 * MIB);
        qemu_io("raw", &path, "read -P 0 32M 32M")?;
        assert_eq!(
            backend
                .resize("v1", 32 * MIB)
                .await
                .expect_err("shrink")
                .reason(),
            "ShrinkRefused"
        );
        let uids: Vec<String> = backend.list().await?.into_iter().map(|v| v.uid).collect();
        assert_eq!(uids, ["v1", "v2"]);
        let capacity = backend.capacity().await?;
        assert!(capacity.total_bytes > 0 && capacity.free_bytes <= capacity.total_bytes);

        for uid in ["v1", "v2"] {
            backend.delete(uid).await?;
            backend.delete(uid).await?;
            assert_eq!(backend.get(uid).await?, None);
        }
    }
    Ok(())
}
