//! `ferro bench storage`: what moving image and volume bytes through Ferro costs.
//!
//! One run measures, in this order (each group can be skipped):
//!
//! **Images.** Through the [`harness`](super::harness), a real etcd and a real
//! `ferro apiserver` child process with its image store in the scratch directory; a file of
//! `--size-mib` pseudo-random bytes (1 GiB by default; random so that nothing downstream
//! can shortcut zeros):
//! 1. the floor: hashing the file with sha256 in this process (the apiserver hashes every
//!    uploaded byte once; the file is in the page cache by then, as it is after writing);
//! 2. `ferro image upload`'s path, in process: upload throughput from the file to the
//!    stored, hashed, fsynced bytes, and the apiserver's peak resident memory (VmHWM)
//!    before and after — memory must stay flat whatever the image size;
//! 3. a node's read back: a `Download` of the whole image, throughput.
//!
//! **Volumes.** The agent's real drivers, with no control plane: a
//! [`FileBackend`] volume of `--volume-mib` pseudo-random bytes in the scratch directory,
//! the tiny test guest (built by `e2e/images/build-tiny.sh`) running under a
//! [`QemuDriver`] with a private state directory (`/tmp/fsb-…`, short for QEMU's unix
//! sockets), and an [`NbdExports`] `qemu-storage-daemon` serving the volume on 127.0.0.1:
//! 4. hot-plug, `--cycles` times each for the volume as a local file and over NBD: the
//!    `attach_disk` and `detach_disk` calls, and attach → the guest prints `FERRO-DISK`
//!    / detach → `FERRO-DISK-GONE` on its serial console (the serial log is polled every
//!    10 ms). The guest's disk watcher looks every 0.5 s, so that figure holds part of
//!    its period; each cycle starts at a different point of it (cycle `i` of `n` waits
//!    `i/n` of a period first), or every cycle would start just after the watcher looked
//!    and wait a whole period;
//! 5. sequential reads of the whole volume with `qemu-img bench` (1 MiB requests): of the
//!    qcow2 file, and of `nbd://127.0.0.1:PORT/UID` — QEMU's own NBD client, the one a
//!    guest's QEMU uses, against the daemon a guest uses — with the file's pages dropped
//!    from the page cache first (cold) and again with them cached (warm); the median of
//!    [`READ_ROUNDS`] alternating rounds;
//! 6. the same read from inside the guest (`dd` with direct I/O on the hot-plugged
//!    device, timed by the guest's `/proc/uptime`), attached as a file and over NBD.
//!
//! The figures are gathered in [`StorageFigures`], one optional group per phase. The guest
//! is destroyed and the export removed when the run ends, failed or not.

use std::fmt;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use futures::StreamExt;
use sha2::{Digest, Sha256};

use super::harness::{self, Apiserver, Etcd, Figures, Workspace, mib, wait_every};
use crate::cli::image::upload_file;
use ferro_agent::hypervisor::qemu::{AccelPolicy, QemuConfig, QemuDriver};
use ferro_agent::hypervisor::{
    Accel, BootDisk, DirectKernel, Disk, DiskFormat, DiskSource, Hypervisor, VmSpec,
};
use ferro_agent::volumes::file::FileBackend;
use ferro_agent::volumes::nbd::{DEFAULT_PORTS, NbdExports};
use ferro_agent::volumes::{Content, VolumeBackend, VolumeInfo, VolumeRequest};
use ferro_api::v1;

/// The knobs of the storage benchmark.
#[derive(Clone, Debug, clap::Args)]
pub struct StorageBenchArgs {
    /// The size of the uploaded image, in MiB.
    #[arg(long, default_value_t = 1024)]
    pub size_mib: u64,
    /// The size of the volume that is hot-plugged and read, in MiB.
    #[arg(long, default_value_t = 512)]
    pub volume_mib: u64,
    /// Attach/detach cycles for each kind of volume (local file, NBD).
    #[arg(long, default_value_t = 20)]
    pub cycles: usize,
    /// Skips the image upload and download.
    #[arg(long)]
    pub skip_upload: bool,
    /// Skips the volume phases (hot-plug, reads).
    #[arg(long)]
    pub skip_volumes: bool,
    /// Where the scratch directory goes (etcd, the image store, the generated files, the
    /// volume; removed afterwards); the system's temporary directory by default. Put it on
    /// the disk whose speed is wanted: the upload writes and fsyncs every byte.
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    /// The script that builds the tiny test guest.
    #[arg(long, value_name = "PATH", default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/e2e/images/build-tiny.sh"))]
    pub tiny_script: PathBuf,
}

/// The aim for upload throughput on loopback, in MiB/s.
const UPLOAD_AIM_MIB_S: f64 = 300.0;
/// The aim for the apiserver's memory growth during an upload, in MiB.
const RSS_AIM_MIB: f64 = 64.0;
/// The aim for the median attach (and detach) as the guest sees it.
const ATTACH_AIM: Duration = Duration::from_secs(1);
/// The aim for NBD reads against local ones.
const READ_RATIO_AIM: f64 = 0.5;
/// Alternating local / NBD read rounds; the median is reported.
pub const READ_ROUNDS: usize = 3;
/// The size of one read request.
const READ_REQUEST: u64 = 1 << 20;
/// Requests in flight in the host-side reads: one as `dd` issues them, and eight as
/// `qemu-img convert` does by default.
const READ_DEPTHS: [u32; 2] = [1, 8];
/// The test VM's uid (it names its directory and is on QEMU's command line).
const VM_UID: &str = "storage-bench";
/// The volume's uid; its first 20 characters are the serial the guest sees.
const VOLUME_UID: &str = "storage-bench-volume";
/// How long the guest may take to boot.
const BOOT_TIMEOUT: Duration = Duration::from_secs(300);
/// How long a hot-plug may take to show in the guest.
const DISK_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the guest's read of the whole volume may take.
const GUEST_READ_TIMEOUT: Duration = Duration::from_secs(900);
/// How often the serial log is polled.
const POLL: Duration = Duration::from_millis(10);
/// How often the tiny guest's disk watcher looks at `/sys/block`.
const GUEST_WATCH_PERIOD: Duration = Duration::from_millis(500);

/// What one upload cost.
pub struct UploadFigures {
    /// The image's size.
    pub bytes: u64,
    /// sha256 of the same bytes in this process.
    pub hash_floor: Duration,
    /// From the first byte sent to the Image recorded.
    pub upload: Duration,
    /// The apiserver's VmHWM before the upload, in KiB.
    pub rss_before_kib: u64,
    /// Its VmHWM after, in KiB.
    pub rss_after_kib: u64,
    /// A whole Download of the image.
    pub download: Duration,
}

/// Hot-plug latencies of one kind of attachment, one entry per cycle.
#[derive(Default)]
pub struct HotplugFigures {
    /// The `attach_disk` call.
    pub attach_call: Vec<Duration>,
    /// From the `attach_disk` call to the guest's `FERRO-DISK` line.
    pub attach_seen: Vec<Duration>,
    /// The `detach_disk` call (which waits for the guest to release the device).
    pub detach_call: Vec<Duration>,
    /// From the `detach_disk` call to the guest's `FERRO-DISK-GONE` line.
    pub detach_gone: Vec<Duration>,
}

/// Hot-plug latencies of the volume as a local file and over NBD.
pub struct AttachFigures {
    /// The accelerator the guest ran under.
    pub accel: Accel,
    /// The volume attached as its qcow2 file.
    pub file: HotplugFigures,
    /// The volume attached over NBD from `qemu-storage-daemon` on 127.0.0.1.
    pub nbd: HotplugFigures,
}

/// Host-side sequential reads of the whole volume with one setting, one entry per round.
pub struct HostReads {
    /// Requests in flight.
    pub depth: u32,
    /// Whether the volume file's pages were dropped from the page cache before each read.
    pub cold: bool,
    /// `qemu-img bench` of the qcow2 file.
    pub local: Vec<Duration>,
    /// `qemu-img bench` of the NBD export.
    pub nbd: Vec<Duration>,
}

/// Sequential reads of the whole volume.
pub struct ReadFigures {
    /// The volume's size.
    pub bytes: u64,
    /// On the host, per setting.
    pub host: Vec<HostReads>,
    /// In the guest, the volume attached as a file (cold host page cache).
    pub guest_file: Duration,
    /// In the guest, the volume attached over NBD (cold host page cache).
    pub guest_nbd: Duration,
}

/// Everything one run measured.
#[derive(Default)]
pub struct StorageFigures {
    /// The image upload and read-back, when measured.
    pub upload: Option<UploadFigures>,
    /// Volume hot-plug latencies, when measured.
    pub attach: Option<AttachFigures>,
    /// Volume read throughput, when measured.
    pub read: Option<ReadFigures>,
}

fn mib_per_s(bytes: u64, took: Duration) -> f64 {
    bytes as f64 / f64::from(1 << 20) / took.as_secs_f64().max(1e-9)
}

/// The `p` quantile (0..=1) of sorted durations, nearest rank.
fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn median(values: &[Duration]) -> Duration {
    let mut sorted = values.to_vec();
    sorted.sort();
    percentile(&sorted, 0.5)
}

fn met(yes: bool) -> &'static str {
    if yes { "met" } else { "NOT met" }
}

impl HotplugFigures {
    fn write(&self, figures: &mut Figures<'_, '_>, kind: &str) -> fmt::Result {
        let rows = [
            ("attach_disk call", &self.attach_call, false),
            ("attach → guest prints FERRO-DISK", &self.attach_seen, true),
            ("detach_disk call", &self.detach_call, false),
            (
                "detach → guest prints FERRO-DISK-GONE",
                &self.detach_gone,
                true,
            ),
        ];
        for (what, values, aimed) in rows {
            let mut sorted = values.clone();
            sorted.sort();
            let (p50, p99) = (percentile(&sorted, 0.5), percentile(&sorted, 0.99));
            let aim = if aimed {
                format!(
                    "   aim p50 < {} ms: {}",
                    ATTACH_AIM.as_millis(),
                    met(p50 < ATTACH_AIM)
                )
            } else {
                String::new()
            };
            figures.line(
                &format!("{kind}: {what}"),
                format_args!(
                    "{:>6.0} ms {:>6.0} ms{aim}",
                    p50.as_secs_f64() * 1e3,
                    p99.as_secs_f64() * 1e3
                ),
            )?;
        }
        Ok(())
    }
}

impl fmt::Display for StorageFigures {
    fn fmt(&self, out: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut figures = Figures::new(out, 58, format_args!("ferro bench storage"))?;
        if let Some(u) = &self.upload {
            let size = u.bytes as f64 / f64::from(1 << 20);
            figures.line(
                "sha256 of the file in process (floor)",
                format_args!("{:>8.0} MiB/s", mib_per_s(u.bytes, u.hash_floor)),
            )?;
            figures.line(
                &format!("upload of {size:.0} MiB (ferro image upload)"),
                format_args!(
                    "{:>8.0} MiB/s ({:.2} s)",
                    mib_per_s(u.bytes, u.upload),
                    u.upload.as_secs_f64()
                ),
            )?;
            let growth = u.rss_after_kib.saturating_sub(u.rss_before_kib);
            figures.line(
                "apiserver peak RSS (VmHWM) before → after",
                format_args!(
                    "{} → {} (+{})",
                    mib(u.rss_before_kib),
                    mib(u.rss_after_kib),
                    mib(growth)
                ),
            )?;
            figures.line(
                "download of the image (a node's fetch)",
                format_args!(
                    "{:>8.0} MiB/s ({:.2} s)",
                    mib_per_s(u.bytes, u.download),
                    u.download.as_secs_f64()
                ),
            )?;
            let upload_met = mib_per_s(u.bytes, u.upload) >= UPLOAD_AIM_MIB_S;
            let rss_met = (growth as f64 / 1024.0) < RSS_AIM_MIB;
            figures.note(format_args!(
                "aims: upload ≥ {UPLOAD_AIM_MIB_S:.0} MiB/s ({}), RSS growth < {RSS_AIM_MIB:.0} MiB ({})",
                met(upload_met),
                met(rss_met),
            ))?;
        }
        if let Some(a) = &self.attach {
            figures.line(
                &format!(
                    "volume hot-plug, {} cycles each ({} guest)",
                    a.file.attach_call.len(),
                    a.accel.as_str().to_uppercase()
                ),
                format_args!("{:>9} {:>9}", "p50", "p99"),
            )?;
            a.file.write(&mut figures, "file")?;
            a.nbd.write(&mut figures, "NBD")?;
        }
        if let Some(r) = &self.read {
            let size = r.bytes / (1 << 20);
            figures.line(
                &format!(
                    "sequential read of {size} MiB, 1 MiB requests (median of {})",
                    r.host.first().map_or(0, |h| h.local.len())
                ),
                format_args!("{:>11} {:>11} {:>6}", "local", "NBD", "ratio"),
            )?;
            for h in &r.host {
                let (local, nbd) = (
                    mib_per_s(r.bytes, median(&h.local)),
                    mib_per_s(r.bytes, median(&h.nbd)),
                );
                let ratio = nbd / local.max(1e-9);
                figures.line(
                    &format!(
                        "qemu-img bench, {} page cache, {} in flight",
                        if h.cold { "cold" } else { "warm" },
                        h.depth
                    ),
                    format_args!(
                        "{local:>5.0} MiB/s {nbd:>5.0} MiB/s {ratio:>6.2}   aim ≥ {READ_RATIO_AIM}: {}",
                        met(ratio >= READ_RATIO_AIM)
                    ),
                )?;
            }
            let (file, nbd) = (
                mib_per_s(r.bytes, r.guest_file),
                mib_per_s(r.bytes, r.guest_nbd),
            );
            figures.line(
                "in the guest, dd iflag=direct bs=1M: as a file, over NBD",
                format_args!(
                    "{file:>5.0} MiB/s {nbd:>5.0} MiB/s {:>6.2}",
                    nbd / file.max(1e-9)
                ),
            )?;
        }
        Ok(())
    }
}

/// Runs the benchmark and prints its figures.
pub async fn run(args: StorageBenchArgs) -> Result<()> {
    if args.size_mib == 0 || args.volume_mib == 0 || args.cycles == 0 {
        bail!("--size-mib, --volume-mib and --cycles must be at least 1");
    }
    let work = Workspace::new("storage", args.work_dir.as_deref())?;
    let mut figures = StorageFigures::default();
    if !args.skip_upload {
        figures.upload = Some(images(&args, work.path()).await?);
    }
    if !args.skip_volumes {
        let (attach, read) = volumes(&args, work.path()).await?;
        figures.attach = Some(attach);
        figures.read = Some(read);
    }
    println!("{figures}");
    Ok(())
}

/// The image phases: upload, then download, against a real etcd and apiserver (stopped
/// when this returns).
async fn images(args: &StorageBenchArgs, work: &Path) -> Result<UploadFigures> {
    println!(
        "ferro bench storage: etcd, apiserver and image store under {}",
        work.display()
    );
    let etcd = Etcd::start(work.join("etcd")).await?;
    let tokens = harness::token_file(work, &[])?;
    let apiserver = Apiserver::start(work, &etcd, &tokens).await?;
    let admin = apiserver.admin()?;

    let file = work.join("image.raw");
    let bytes = args.size_mib << 20;
    let path = file.clone();
    tokio::task::spawn_blocking(move || write_random(&path, bytes)).await??;
    let path = file.clone();
    let hash_floor = tokio::task::spawn_blocking(move || hash_file(&path)).await??;

    let rss_before_kib = apiserver.peak_rss_kib()?;
    let target = v1::UploadTarget {
        name: "bench".into(),
        disk_format: Some(v1::image_spec::DiskFormat::Raw as i32),
        ..Default::default()
    };
    let uploaded = upload_file(&admin, target, &file, |_| {}).await?;
    let rss_after_kib = apiserver.peak_rss_kib()?;
    if uploaded.bytes != bytes {
        bail!("uploaded {} bytes of {bytes}", uploaded.bytes);
    }

    let began = Instant::now();
    let mut stream = admin.download_image("default", "bench", 0).await?;
    let mut read = 0u64;
    while let Some(chunk) = stream.next().await {
        read += chunk?.data.len() as u64;
    }
    let download = began.elapsed();
    if read != bytes {
        bail!("downloaded {read} bytes of {bytes}");
    }
    std::fs::remove_file(&file)?;
    Ok(UploadFigures {
        bytes,
        hash_floor,
        upload: uploaded.took,
        rss_before_kib,
        rss_after_kib,
        download,
    })
}

/// The guest and the export of the volume phases. [`Rig::teardown`] destroys the one and
/// removes the other; dropping a rig that was not torn down does it too (blocking), so a
/// failure or a panic leaves no QEMU and no daemon behind.
struct Rig {
    driver: QemuDriver,
    exports: NbdExports,
    /// The VM started (or being started).
    vm: Option<String>,
    /// The export made (or being made).
    export: Option<String>,
    /// QEMU's state directory, removed last.
    _state: tempfile::TempDir,
}

impl Rig {
    fn new(work: &Path, probe_kernel: PathBuf) -> Result<Rig> {
        // Short: QEMU's unix sockets live in it, and their paths may not exceed 107 bytes.
        let state = tempfile::Builder::new()
            .prefix("fsb-")
            .tempdir_in("/tmp")
            .context("creating QEMU's state directory")?;
        let driver = QemuDriver::new(QemuConfig {
            accel: AccelPolicy::Auto {
                probe_kernel: Some(probe_kernel),
                timeout: Duration::from_secs(15),
            },
            ..QemuConfig::new(state.path())
        });
        let exports = NbdExports::new(
            work.join("nbd"),
            "qemu-storage-daemon".into(),
            "127.0.0.1".into(),
            DEFAULT_PORTS,
        );
        Ok(Rig {
            driver,
            exports,
            vm: None,
            export: None,
            _state: state,
        })
    }

    async fn teardown(&mut self) -> Result<()> {
        let mut failed = Vec::new();
        // The guest first: it is the export's client.
        if let Some(uid) = self.vm.take()
            && let Err(e) = self.driver.destroy(&uid).await
        {
            failed.push(format!("destroying VM {uid}: {e:#}"));
        }
        if let Some(id) = self.export.take()
            && let Err(e) = self.exports.remove(&id).await
        {
            failed.push(format!("removing NBD export {id}: {e:#}"));
        }
        ensure!(failed.is_empty(), "cleaning up: {}", failed.join("; "));
        Ok(())
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        if self.vm.is_none() && self.export.is_none() {
            return;
        }
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread {
            tokio::task::block_in_place(|| {
                if let Err(e) = handle.block_on(self.teardown()) {
                    eprintln!("{e:#}");
                }
            });
        }
    }
}

/// The running guest: where its console is.
struct Guest {
    uid: String,
    serial_log: PathBuf,
    console: PathBuf,
}

/// The volume phases: hot-plug cycles and reads, the volume as a file and over NBD.
async fn volumes(args: &StorageBenchArgs, work: &Path) -> Result<(AttachFigures, ReadFigures)> {
    let tiny = super::boot::tiny_guest(&args.tiny_script)?;
    let artefact = |key: &str| -> Result<PathBuf> {
        let path = tiny
            .get(key)
            .with_context(|| format!("{} printed no {key}", args.tiny_script.display()))?;
        Ok(std::path::absolute(path)?)
    };
    let (kernel, initrd, disk) = (
        artefact("FERRO_TINY_KERNEL")?,
        artefact("FERRO_TINY_INITRD")?,
        artefact("FERRO_TINY_DISK")?,
    );
    let cmdline = tiny.get("FERRO_TINY_CMDLINE").cloned().unwrap_or_default();

    let bytes = args.volume_mib << 20;
    println!(
        "volumes: a {} MiB volume of pseudo-random bytes under {}",
        args.volume_mib,
        work.display()
    );
    let source = work.join("volume-source.raw");
    let path = source.clone();
    tokio::task::spawn_blocking(move || write_random(&path, bytes)).await??;
    let backend = FileBackend::new(work.join("volumes"), "qemu-img".into());
    let volume = backend
        .create(&VolumeRequest {
            uid: VOLUME_UID.into(),
            size_bytes: bytes,
            content: Content::Image {
                path: source.clone(),
                format: DiskFormat::Raw,
            },
        })
        .await?;
    std::fs::remove_file(&source)?;

    let mut rig = Rig::new(work, kernel.clone())?;
    let spec = VmSpec {
        uid: VM_UID.into(),
        name: VM_UID.into(),
        vcpus: 1,
        memory_mib: 256,
        boot_disk: Some(BootDisk {
            base: disk,
            base_format: DiskFormat::Raw,
            size_bytes: None,
        }),
        kernel: Some(DirectKernel {
            kernel,
            initrd: Some(initrd),
            cmdline,
        }),
        config_drive: None,
        nics: vec![],
        disks: vec![],
        labels: Default::default(),
    };
    // Ctrl-C ends the measuring, not the cleaning up: QEMU and the daemon outlive us.
    let measured = tokio::select! {
        measured = measure_volumes(&mut rig, &spec, &volume, args.cycles) => measured,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
    };
    let cleaned = rig.teardown().await;
    let figures = measured?;
    cleaned?;
    Ok(figures)
}

async fn measure_volumes(
    rig: &mut Rig,
    spec: &VmSpec,
    volume: &VolumeInfo,
    cycles: usize,
) -> Result<(AttachFigures, ReadFigures)> {
    rig.vm = Some(spec.uid.clone());
    let began = Instant::now();
    let status = rig.driver.start(spec).await?;
    let guest = Guest {
        uid: spec.uid.clone(),
        serial_log: status.serial_log.clone(),
        console: status.console_socket.clone(),
    };
    console_line(&guest.serial_log, 0, "FERRO-READY", BOOT_TIMEOUT).await?;
    let accel = status.accel.unwrap_or(Accel::Tcg);
    println!(
        "volumes: guest up ({}) in {:.1} s; {cycles} hot-plug cycles as a file",
        accel.as_str(),
        began.elapsed().as_secs_f64()
    );

    let serial: String = volume.uid.chars().take(20).collect();
    let file = Disk {
        id: volume.uid.clone(),
        source: DiskSource::File {
            path: volume.path.clone(),
            format: volume.format,
        },
        serial: serial.clone(),
        read_only: false,
    };
    let mut file_cycles = HotplugFigures::default();
    for i in 0..cycles {
        let offset = GUEST_WATCH_PERIOD.mul_f64(i as f64 / cycles as f64);
        hotplug_cycle(&rig.driver, &guest, &file, offset, &mut file_cycles).await?;
    }
    println!("volumes: reading it in the guest, attached as a file");
    let guest_file = guest_read(&rig.driver, &guest, &file, volume).await?;

    // Only now: QEMU's image locking keeps a volume a guest has open from being exported.
    let id = format!("{}--{}", volume.uid, spec.uid);
    rig.export = Some(id.clone());
    let export = rig.exports.ensure(&id, volume).await?;
    println!(
        "volumes: exported as {} (qemu-storage-daemon pid {}); host reads",
        export.url(),
        export.pid
    );
    let host = host_reads(volume, &export.url()).await?;

    println!("volumes: {cycles} hot-plug cycles over NBD");
    let nbd = Disk {
        source: DiskSource::Nbd {
            host: export.host.clone(),
            port: export.port,
            export: export.name.clone(),
        },
        ..file
    };
    let mut nbd_cycles = HotplugFigures::default();
    for i in 0..cycles {
        let offset = GUEST_WATCH_PERIOD.mul_f64(i as f64 / cycles as f64);
        hotplug_cycle(&rig.driver, &guest, &nbd, offset, &mut nbd_cycles).await?;
    }
    println!("volumes: reading it in the guest, attached over NBD");
    let guest_nbd = guest_read(&rig.driver, &guest, &nbd, volume).await?;

    Ok((
        AttachFigures {
            accel,
            file: file_cycles,
            nbd: nbd_cycles,
        },
        ReadFigures {
            bytes: volume.size_bytes,
            host,
            guest_file,
            guest_nbd,
        },
    ))
}

/// The length of the serial log so far: where to look for what comes next.
fn log_len(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// Waits until a complete line of the serial log after byte `from` holds `marker`;
/// returns that line from the marker on.
async fn console_line(log: &Path, from: u64, marker: &str, timeout: Duration) -> Result<String> {
    let find = || async {
        let mut file = std::fs::File::open(log).ok()?;
        file.seek(std::io::SeekFrom::Start(from)).ok()?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).ok()?;
        let complete = &bytes[..bytes.iter().rposition(|b| *b == b'\n')? + 1];
        String::from_utf8_lossy(complete)
            .lines()
            .find_map(|l| l.find(marker).map(|at| l[at..].trim_end().to_owned()))
    };
    wait_every(
        &format!("{marker:?} on the guest's console"),
        timeout,
        POLL,
        find,
    )
    .await
    .with_context(|| format!("see {}", log.display()))
}

/// Attaches `disk` and waits for the guest to report it; returns the guest's device name,
/// how long the call took and how long until the report.
async fn attach_and_see(
    driver: &QemuDriver,
    guest: &Guest,
    disk: &Disk,
) -> Result<(String, Duration, Duration)> {
    let from = log_len(&guest.serial_log);
    let began = Instant::now();
    driver.attach_disk(&guest.uid, disk).await?;
    let call = began.elapsed();
    let line = console_line(&guest.serial_log, from, "FERRO-DISK ", DISK_TIMEOUT).await?;
    let seen = began.elapsed();
    // FERRO-DISK DEV SERIAL BYTES
    let words: Vec<&str> = line.split_whitespace().collect();
    ensure!(
        words.len() == 4 && words[2] == disk.serial,
        "the guest reported {line:?} for a disk with serial {}",
        disk.serial
    );
    Ok((words[1].to_owned(), call, seen))
}

/// Detaches `disk` (the guest's `device`) and waits for the guest to report it gone;
/// returns how long the call took and how long until the report.
async fn detach_and_see(
    driver: &QemuDriver,
    guest: &Guest,
    disk: &Disk,
    device: &str,
) -> Result<(Duration, Duration)> {
    let from = log_len(&guest.serial_log);
    let began = Instant::now();
    driver.detach_disk(&guest.uid, &disk.id).await?;
    let call = began.elapsed();
    let gone = format!("FERRO-DISK-GONE {device}");
    console_line(&guest.serial_log, from, &gone, DISK_TIMEOUT).await?;
    Ok((call, began.elapsed()))
}

/// One attach and detach of `disk`, each `offset` after the guest's last report, recorded
/// in `figures`.
async fn hotplug_cycle(
    driver: &QemuDriver,
    guest: &Guest,
    disk: &Disk,
    offset: Duration,
    figures: &mut HotplugFigures,
) -> Result<()> {
    // Each call follows the guest's last report, made just after its watcher looked.
    tokio::time::sleep(offset).await;
    let (device, call, seen) = attach_and_see(driver, guest, disk).await?;
    figures.attach_call.push(call);
    figures.attach_seen.push(seen);
    tokio::time::sleep(offset).await;
    let (call, gone) = detach_and_see(driver, guest, disk, &device).await?;
    figures.detach_call.push(call);
    figures.detach_gone.push(gone);
    Ok(())
}

/// Attaches `disk`, reads all of it in the guest with `dd` (direct I/O, 1 MiB blocks) after
/// dropping the volume file from the host's page cache, and detaches it; returns how long
/// the read took by the guest's clock.
async fn guest_read(
    driver: &QemuDriver,
    guest: &Guest,
    disk: &Disk,
    volume: &VolumeInfo,
) -> Result<Duration> {
    use tokio::io::AsyncWriteExt;
    let (device, _, _) = attach_and_see(driver, guest, disk).await?;
    evict_from_page_cache(&volume.path)?;
    let from = log_len(&guest.serial_log);
    // The marker is computed, so the echo of the typed line does not hold it.
    let command = format!(
        "read a _ </proc/uptime; dd if=/dev/{device} of=/dev/null bs=1M iflag=direct 2>/tmp/dd; \
         s=$?; read b _ </proc/uptime; echo FERRO-DD-$((40 + 2)) $s $a $b $(head -n 1 /tmp/dd)"
    );
    // Held open until the answer is in: QEMU's console takes one client at a time.
    let mut console = tokio::net::UnixStream::connect(&guest.console)
        .await
        .with_context(|| format!("connecting to {}", guest.console.display()))?;
    console
        .write_all(format!("\n{command}\n").as_bytes())
        .await?;
    let line = console_line(&guest.serial_log, from, "FERRO-DD-42 ", GUEST_READ_TIMEOUT).await?;
    drop(console);
    let took = parse_dd_line(&line, volume.size_bytes / READ_REQUEST)?;
    detach_and_see(driver, guest, disk, &device).await?;
    Ok(took)
}

/// Reads `FERRO-DD-42 STATUS START END N+M records in`: the time between the two uptimes,
/// once the status is 0 and `records` whole blocks were read.
fn parse_dd_line(line: &str, records: u64) -> Result<Duration> {
    let words: Vec<&str> = line.split_whitespace().collect();
    ensure!(
        words.len() >= 5 && words[1] == "0",
        "the guest's dd failed: {line:?}"
    );
    ensure!(
        words[4] == format!("{records}+0"),
        "the guest's dd read {} blocks of 1 MiB, not {records}+0: {line:?}",
        words[4]
    );
    let start: f64 = words[2].parse().with_context(|| line.to_owned())?;
    let end: f64 = words[3].parse().with_context(|| line.to_owned())?;
    ensure!(end > start, "the guest's clock went backwards: {line:?}");
    Ok(Duration::from_secs_f64(end - start))
}

/// Drops the file's pages from the page cache (all of them: it is written back first), so
/// the next read comes from the disk.
fn evict_from_page_cache(path: &Path) -> Result<()> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    file.sync_all()?;
    rustix::fs::fadvise(&file, 0, None, rustix::fs::Advice::DontNeed)
        .with_context(|| format!("dropping {} from the page cache", path.display()))?;
    Ok(())
}

/// Host-side reads: for each depth, cold then warm, local then NBD, [`READ_ROUNDS`] times.
async fn host_reads(volume: &VolumeInfo, url: &str) -> Result<Vec<HostReads>> {
    let mut all = Vec::new();
    for depth in READ_DEPTHS {
        for cold in [true, false] {
            all.push(HostReads {
                depth,
                cold,
                local: Vec::new(),
                nbd: Vec::new(),
            });
        }
    }
    let path = volume
        .path
        .to_str()
        .context("the volume's path is not UTF-8")?;
    let format = volume.format.as_str();
    for _ in 0..READ_ROUNDS {
        for reads in &mut all {
            // -U: the daemon holds the file's write lock; nobody writes while we read.
            let local = ["-U", "-f", format, path];
            // The export carries the volume's bytes raw; the daemon reads the qcow2.
            let remote = ["-f", "raw", url];
            for (side, target) in [
                (&mut reads.local, &local[..]),
                (&mut reads.nbd, &remote[..]),
            ] {
                if reads.cold {
                    evict_from_page_cache(&volume.path)?;
                } else {
                    // Warm the cache with a read of the same kind first.
                    qemu_img_bench(target, volume.size_bytes, reads.depth).await?;
                }
                side.push(qemu_img_bench(target, volume.size_bytes, reads.depth).await?);
            }
        }
    }
    Ok(all)
}

/// `qemu-img bench` reading all `bytes` of `target` (options and file name) sequentially in
/// 1 MiB requests, `depth` in flight; returns the time it reports (opening excluded).
async fn qemu_img_bench(target: &[&str], bytes: u64, depth: u32) -> Result<Duration> {
    let count = (bytes / READ_REQUEST).to_string();
    let depth = depth.to_string();
    let output = tokio::process::Command::new("qemu-img")
        .args(["bench", "-c", &count, "-s", "1M", "-d", &depth])
        .args(target)
        .kill_on_drop(true)
        .output()
        .await
        .context("running qemu-img bench")?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    ensure!(
        output.status.success(),
        "qemu-img bench {} failed ({}): {}",
        target.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stderr).trim()
    );
    parse_bench_output(&stdout)
}

/// The time in `qemu-img bench`'s `Run completed in 0.123 seconds.`
fn parse_bench_output(stdout: &str) -> Result<Duration> {
    let seconds = stdout
        .lines()
        .find_map(|l| l.strip_prefix("Run completed in "))
        .and_then(|rest| rest.strip_suffix(" seconds."))
        .with_context(|| format!("no run time in qemu-img bench's output: {stdout:?}"))?;
    Ok(Duration::from_secs_f64(seconds.parse()?))
}

/// Writes `bytes` pseudo-random bytes (xorshift, fast and incompressible enough) to
/// `path`.
fn write_random(path: &Path, bytes: u64) -> Result<()> {
    let mut out = std::io::BufWriter::new(
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
    );
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    let mut block = vec![0u8; 1 << 20];
    let mut left = bytes;
    while left > 0 {
        for word in block.chunks_exact_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            word.copy_from_slice(&state.to_le_bytes());
        }
        let n = left.min(block.len() as u64) as usize;
        out.write_all(&block[..n])?;
        left -= n as u64;
    }
    out.flush()?;
    Ok(())
}

/// How long hashing `path` takes.
fn hash_file(path: &Path) -> Result<Duration> {
    let began = Instant::now();
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    let _ = hasher.finalize();
    Ok(began.elapsed())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn percentiles_and_medians_read_right() {
        let sorted: Vec<Duration> = (1..=20).map(ms).collect();
        assert_eq!(percentile(&sorted, 0.5), ms(11));
        assert_eq!(percentile(&sorted, 0.99), ms(20));
        assert_eq!(percentile(&[], 0.5), Duration::ZERO);
        assert_eq!(median(&[ms(3), ms(1), ms(2)]), ms(2));
    }

    #[test]
    fn qemu_img_bench_output_gives_its_run_time() {
        let out = "Sending 512 read requests, 1048576 bytes each, 8 in parallel (starting at \
                   offset 0, step size 1048576)\nRun completed in 0.156 seconds.\n";
        assert_eq!(parse_bench_output(out).expect("parsed"), ms(156));
        assert!(parse_bench_output("qemu-img: Could not open").is_err());
    }

    #[test]
    fn the_guest_dd_line_must_show_a_whole_successful_read() {
        let line = "FERRO-DD-42 0 12.50 20.75 512+0 records in";
        assert_eq!(parse_dd_line(line, 512).expect("parsed"), ms(8250));
        // A short read, a failed dd, a garbled line.
        assert!(parse_dd_line("FERRO-DD-42 0 12.50 20.75 100+0 records in", 512).is_err());
        assert!(parse_dd_line("FERRO-DD-42 1 12.50 20.75 0+0 records in", 512).is_err());
        assert!(parse_dd_line("FERRO-DD-42 0 12.50", 512).is_err());
    }

    #[test]
    fn figures_print_every_measured_group_with_its_aims() {
        let cycles = HotplugFigures {
            attach_call: vec![ms(40); 20],
            attach_seen: vec![ms(400); 20],
            detach_call: vec![ms(90); 20],
            detach_gone: vec![ms(1500); 20],
        };
        let figures = StorageFigures {
            upload: None,
            attach: Some(AttachFigures {
                accel: Accel::Tcg,
                file: HotplugFigures {
                    attach_call: cycles.attach_call.clone(),
                    attach_seen: cycles.attach_seen.clone(),
                    detach_call: cycles.detach_call.clone(),
                    detach_gone: cycles.detach_gone.clone(),
                },
                nbd: cycles,
            }),
            read: Some(ReadFigures {
                bytes: 512 << 20,
                host: vec![HostReads {
                    depth: 1,
                    cold: true,
                    local: vec![ms(500); 3],
                    nbd: vec![ms(2000); 3],
                }],
                guest_file: ms(4000),
                guest_nbd: ms(8000),
            }),
        };
        let text = figures.to_string();
        assert!(text.contains("20 cycles each (TCG guest)"), "{text}");
        assert!(text.contains("aim p50 < 1000 ms: met"), "{text}");
        assert!(text.contains("aim p50 < 1000 ms: NOT met"), "{text}");
        assert!(
            text.contains("1024 MiB/s   256 MiB/s   0.25   aim ≥ 0.5: NOT met"),
            "{text}"
        );
        assert!(text.contains("128 MiB/s    64 MiB/s   0.50"), "{text}");
        assert!(!text.contains("upload"), "{text}");
    }
}
