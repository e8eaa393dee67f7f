//! The QEMU driver: one `qemu-system-x86_64` per VM, controlled over QMP.
//!
//! Each VM lives in a directory named by its uid under the driver's state directory:
//!
//! ```text
//! <state_dir>/<uid>/
//!   vm.json          the spec it was last started with (without the config drive),
//!                    written before anything else, so its labels name the VM's owner
//!   disk.qcow2       the boot disk: a qcow2 overlay on the base image
//!   config-2.iso     the config drive
//!   qmp.sock         QMP control socket
//!   console.sock     serial console socket (one interactive client at a time)
//!   serial.log       everything the guest printed on its serial console, across starts
//!   qemu.pid         QEMU's own pid, written by QEMU, removed by QEMU on a clean exit
//!   qemu.log         what QEMU itself said (stderr), with a line per start
//!   qemu-debug.log   QEMU's `-D` log (see below)
//!   should-run       present from a successful start until `stop`
//! ```
//!
//! QEMU is started with `-daemonize`: it forks, calls `setsid` and reparents to init, so
//! guests live in their own session and process group and outlive every Ferro process,
//! and the agent never has to reap them. The pid QEMU writes to `qemu.pid` is its own.
//! `-daemonize` points stderr at `/dev/null` unless `-D` names a log file, hence
//! `qemu-debug.log`, which is what keeps QEMU's later messages in `qemu.log`.
//!
//! State is read back from the host, never remembered: a live process whose command line
//! carries `-name ferro-<uid>` is the VM (QMP `query-status` says whether it runs); a
//! pidfile whose process is gone means QEMU died without its clean-exit path (killed,
//! crashed); no pidfile means it ended cleanly, and then `should-run` tells a guest that
//! powered itself off (still there: nobody asked) from one stopped through
//! [`Hypervisor::stop`] or never started (absent). A second driver, or a restarted agent,
//! therefore sees and adopts every guest, and can tell why one is down.
//!
//! The machine is a q35. Every NIC and every data disk sits alone on a `pcie-root-port`
//! (`hotplug<i>`, at a fixed slot of the root bus), and a few more ports are spare: a
//! device on the root bus itself could never be unplugged, while one on a root port can,
//! whether it was there at start or hot-plugged later. Cold-plugged NICs take the first
//! ports in [`VmSpec::nics`] order, which is the order the guest finds them in; the
//! cold-plugged data disks take the next ones in [`VmSpec::disks`] order. A NIC's QEMU
//! names come from its id (`net-<id>` for the tap backend, `nic-<id>` for the virtio-net
//! device), never from its position, so plugging or unplugging one renames no other.
//!
//! The boot disk (`vd-boot`, block node `disk-boot`) and the config drive (`vd-config`,
//! `disk-config`) sit on the root bus, so the guest always finds them first, as `vda`
//! and `vdb`. A data disk ([`super::Disk`]) is a virtio-blk device `vol-<id>` over a
//! format node (qcow2 or raw) over a protocol node (a local file, or an NBD export that
//! QEMU connects to itself, reconnecting for a while if the storage daemon restarts). QEMU
//! limits block node names to 31 bytes, too few for `volume-<uuid>`: the nodes are
//! `volume-<key>` and `volfile-<key>`, where the key is the disk's id when it has at most
//! 23 bytes, and otherwise its first 8 bytes, a `.` and 14 hex digits of the id's sha256
//! (`volume-7d1e0c2a.3f9a0c1b2d4e5f`): an operator recognises the volume by the prefix,
//! and no two ids share a key (ids hold no `.`). The protocol node is created inline with
//! the format node, so deleting the format node deletes both.
//!
//! Hot-plug goes through QMP like every other request, under the VM's lock, in short
//! sessions (QEMU serves one QMP client at a time, and a long one would make the VM look
//! unresponsive to [`Hypervisor::status`]). Which ports are free and which NICs the VM
//! has are read from QEMU each time, never remembered: `qom-list /machine/peripheral`
//! names the devices and ports, each device's `parent_bus` says which port holds it,
//! `qom-get` gives a NIC's MAC and backend, and `info network` the backend's tap; a
//! disk's block node and serial, and `query-named-block-nodes` the node's format,
//! read-only flag, size, and its file or NBD server and export. A plug adds the backend
//! (`netdev_add`, `blockdev-add`) then the device (`device_add`), and removes the backend
//! again if the device is refused; a backend left alone by an interrupted plug or unplug
//! is removed first. An unplug asks the guest (`device_del`), polls until QEMU has
//! dropped the device, then removes the backend (`netdev_del`, `blockdev-del`). The NICs
//! and disks a VM has are also written back into `vm.json`, so that the recorded spec
//! always says what the VM runs with.
//!
//! KVM is used when `/dev/kvm` is there and really boots a kernel (probed once
//! per driver, with a timeout): on hosts whose KVM only runs PVM-aware kernels it does not,
//! and TCG runs instead.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use ferro_runtime::error_chain;
use serde_json::{Value, json};
use tokio::sync::OnceCell;

use super::qmp::{Qmp, QmpError};
use super::{
    Accel, BootDisk, Disk, DiskFormat, DiskSource, Hypervisor, HypervisorError, MAX_DEVICES, Nic,
    StopOutcome, VmSpec, VmState, VmStatus, resolve_disk, validate_nic, validate_spec,
    validate_uid,
};

/// How long `qemu -daemonize` may take to finish initialising.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long QEMU gets to exit after QMP `quit`, before SIGKILL.
const QUIT_GRACE: Duration = Duration::from_secs(5);
/// How long a SIGKILLed QEMU may take to disappear.
const KILL_WAIT: Duration = Duration::from_secs(10);
/// How often process liveness is polled while waiting for an exit.
const POLL: Duration = Duration::from_millis(100);
/// The line written to `qemu.log` before each start; what follows is the current run.
const START_MARK: &str = "--- ferro: starting qemu";
/// The slot of the root bus the first root port takes; port `i` takes slot `0x10 + i`.
/// Fixed, so that a port's address (and the order the guest finds NICs in) does not
/// depend on which disks the machine has; the slots up to `0x1e` are free on a q35.
const FIRST_PORT_SLOT: usize = 0x10;
/// How often an unplug looks whether QEMU has dropped the device.
const UNPLUG_POLL: Duration = Duration::from_millis(100);
/// How long a released disk's block node may stay in use (by the device QEMU is still
/// tearing down) before `blockdev-del` gives up.
const BLOCK_RELEASE_WAIT: Duration = Duration::from_secs(5);
/// Seconds an NBD disk keeps requests waiting for a lost connection to come back (a
/// storage daemon restarting) before failing them; QEMU reconnects meanwhile.
const NBD_RECONNECT_DELAY: u64 = 5;
/// The longest disk id used as it is in block node names: `volfile-` and it make 31
/// bytes, QEMU's limit for node names.
const MAX_PLAIN_NODE_KEY: usize = 23;

/// Which accelerator VMs get.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccelPolicy {
    /// Always KVM.
    Kvm,
    /// Always TCG.
    Tcg,
    /// KVM if `/dev/kvm` opens and really boots `probe_kernel` within `timeout`; TCG
    /// otherwise. Without a probe kernel, the host's own `/boot/vmlinuz-$(uname -r)` is
    /// tried; with none at all, TCG.
    Auto {
        /// A kernel to boot for the probe (no initrd needed: reaching the panic for a
        /// missing root file system proves the CPU runs the guest).
        probe_kernel: Option<PathBuf>,
        /// How long the probe may take.
        timeout: Duration,
    },
}

impl Default for AccelPolicy {
    fn default() -> Self {
        AccelPolicy::Auto {
            probe_kernel: None,
            timeout: Duration::from_secs(15),
        }
    }
}

/// The QEMU driver's settings.
#[derive(Debug, Clone)]
pub struct QemuConfig {
    /// Where VM directories live. Keep it short: unix socket paths inside it are limited
    /// to 107 bytes.
    pub state_dir: PathBuf,
    /// The emulator.
    pub qemu: PathBuf,
    /// `qemu-img`, for overlays.
    pub qemu_img: PathBuf,
    /// `genisoimage`, for config drives.
    pub genisoimage: PathBuf,
    /// Which accelerator to use.
    pub accel: AccelPolicy,
    /// Spare `pcie-root-port`s for hot-plug, besides the one each cold-plugged NIC or data
    /// disk sits on (at most [`MAX_DEVICES`] ports in all).
    pub hotplug_ports: u8,
    /// How long a QMP exchange may take before the VM counts as unresponsive.
    pub control_timeout: Duration,
    /// How long an unplug waits for the guest to release the device.
    pub unplug_timeout: Duration,
    /// Whether taps carry virtio-net headers, so that guests may leave checksums and
    /// segmentation to the host (`vnet_hdr`). Off where the switch is Open vSwitch's
    /// userspace datapath, which completes no checksum: TCP would fail on bad checksums.
    pub tap_offloads: bool,
}

impl QemuConfig {
    /// Settings with the usual binaries from `PATH`, four hot-plug ports and automatic
    /// accelerator choice.
    pub fn new(state_dir: impl Into<PathBuf>) -> Self {
        QemuConfig {
            state_dir: state_dir.into(),
            qemu: "qemu-system-x86_64".into(),
            qemu_img: "qemu-img".into(),
            genisoimage: "genisoimage".into(),
            accel: AccelPolicy::default(),
            hotplug_ports: 4,
            control_timeout: Duration::from_secs(10),
            unplug_timeout: Duration::from_secs(30),
            tap_offloads: true,
        }
    }
}

/// Where one VM's files are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmPaths {
    /// The VM's directory, `<state_dir>/<uid>`.
    pub dir: PathBuf,
    /// The spec it was last started with.
    pub spec: PathBuf,
    /// The boot disk overlay.
    pub disk: PathBuf,
    /// The config drive.
    pub config_drive: PathBuf,
    /// The QMP socket.
    pub qmp: PathBuf,
    /// The serial console socket.
    pub console: PathBuf,
    /// The serial console log.
    pub serial_log: PathBuf,
    /// QEMU's pidfile.
    pub pidfile: PathBuf,
    /// QEMU's own messages.
    pub qemu_log: PathBuf,
    /// QEMU's `-D` log.
    pub debug_log: PathBuf,
    /// Present while the VM is meant to run: from a successful start until a stop.
    pub should_run: PathBuf,
}

impl VmPaths {
    fn new(state_dir: &Path, uid: &str) -> Self {
        let dir = state_dir.join(uid);
        VmPaths {
            spec: dir.join("vm.json"),
            disk: dir.join("disk.qcow2"),
            config_drive: dir.join("config-2.iso"),
            qmp: dir.join("qmp.sock"),
            console: dir.join("console.sock"),
            serial_log: dir.join("serial.log"),
            pidfile: dir.join("qemu.pid"),
            qemu_log: dir.join("qemu.log"),
            debug_log: dir.join("qemu-debug.log"),
            should_run: dir.join("should-run"),
            dir,
        }
    }
}

/// Runs VMs with QEMU. Cheap to create; any number of drivers may look at the same state
/// directory, and each adopts what the others started.
#[derive(Debug)]
pub struct QemuDriver {
    config: QemuConfig,
    accel: OnceCell<Accel>,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl QemuDriver {
    /// A driver with these settings. The state directory is made absolute (QEMU runs with
    /// `/` as its working directory) and is created on first start.
    pub fn new(mut config: QemuConfig) -> Self {
        if let Ok(dir) = std::path::absolute(&config.state_dir) {
            config.state_dir = dir;
        }
        QemuDriver {
            config,
            accel: OnceCell::new(),
            locks: Mutex::new(HashMap::new()),
        }
    }

    /// The driver's settings.
    pub fn config(&self) -> &QemuConfig {
        &self.config
    }

    /// Where the files of VM `uid` are.
    pub fn paths(&self, uid: &str) -> VmPaths {
        VmPaths::new(&self.config.state_dir, uid)
    }

    /// The accelerator new VMs get, decided once per driver (probing KVM if so configured).
    pub async fn accel(&self) -> Accel {
        *self
            .accel
            .get_or_init(|| async {
                let accel = match &self.config.accel {
                    AccelPolicy::Kvm => Accel::Kvm,
                    AccelPolicy::Tcg => Accel::Tcg,
                    AccelPolicy::Auto {
                        probe_kernel,
                        timeout,
                    } => self.choose_accel(probe_kernel.clone(), *timeout).await,
                };
                tracing::info!(accel = accel.as_str(), "QEMU accelerator chosen");
                accel
            })
            .await
    }

    async fn choose_accel(&self, probe_kernel: Option<PathBuf>, timeout: Duration) -> Accel {
        if let Err(e) = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
        {
            tracing::info!(error = %e, "/dev/kvm unusable, using TCG");
            return Accel::Tcg;
        }
        let Some(kernel) = probe_kernel.or_else(host_kernel) else {
            tracing::warn!("no kernel to probe KVM with, using TCG");
            return Accel::Tcg;
        };
        match self.probe(Accel::Kvm, &kernel, timeout).await {
            Ok(true) => Accel::Kvm,
            Ok(false) => {
                tracing::warn!(kernel = %kernel.display(), "KVM did not boot a kernel, using TCG");
                Accel::Tcg
            }
            Err(e) => {
                tracing::warn!(error = %e, "KVM probe failed, using TCG");
                Accel::Tcg
            }
        }
    }

    /// Whether `accel` boots `kernel` within `timeout`: the kernel starts without a root
    /// file system, so reaching its "not syncing" panic (and QEMU's exit, thanks to
    /// `-no-reboot`) proves that guest code really runs. A kernel that hangs, or a QEMU
    /// that fails, is a `false`.
    pub async fn probe(
        &self,
        accel: Accel,
        kernel: &Path,
        timeout: Duration,
    ) -> Result<bool, HypervisorError> {
        let dir = tempfile::Builder::new()
            .prefix("ferro-accel-probe-")
            .tempdir()
            .map_err(io("creating a directory for the accelerator probe".into()))?;
        let log = dir.path().join("serial.log");
        let stderr = std::fs::File::create(dir.path().join("stderr"))
            .map_err(io("creating the probe's log".into()))?;
        let mut command = tokio::process::Command::new(&self.config.qemu);
        command
            .args([
                "-nodefaults",
                "-no-user-config",
                "-display",
                "none",
                "-no-reboot",
            ])
            .args([
                "-machine",
                "q35",
                "-accel",
                accel.as_str(),
                "-cpu",
                cpu_model(accel),
            ])
            .args(["-m", "128M", "-kernel"])
            .arg(kernel)
            .args([
                "-append",
                "console=ttyS0 panic=-1 rdinit=/ferro-accel-probe",
            ])
            .arg("-serial")
            .arg(format!("file:{}", log.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(stderr))
            .kill_on_drop(true);
        let mut child = command
            .spawn()
            .map_err(io(format!("running {}", self.config.qemu.display())))?;
        let status = match tokio::time::timeout(timeout, child.wait()).await {
            Ok(status) => status.map_err(io("waiting for the probe guest".into()))?,
            Err(_) => {
                tracing::info!(
                    accel = accel.as_str(),
                    ?timeout,
                    "probe guest did not finish booting"
                );
                // Kill and reap it now rather than leave a zombie behind.
                let _ = child.kill().await;
                return Ok(false);
            }
        };
        let console = std::fs::read_to_string(&log).unwrap_or_default();
        let booted = status.success() && console.contains("not syncing");
        if !booted {
            let said = std::fs::read_to_string(dir.path().join("stderr")).unwrap_or_default();
            tracing::info!(accel = accel.as_str(), %status, stderr = %said.trim(), "probe guest did not boot");
        }
        Ok(booted)
    }

    /// A QMP session with VM `uid`, for operations the trait does not cover.
    /// QEMU serves one QMP client at a time: drop it promptly.
    pub async fn qmp(&self, uid: &str) -> Result<Qmp, HypervisorError> {
        validate_uid(uid)?;
        Qmp::connect(&self.paths(uid).qmp, self.config.control_timeout)
            .await
            .map_err(|source| HypervisorError::Control {
                uid: uid.to_owned(),
                source,
            })
    }

    /// The spec recorded in VM `uid`'s directory: the one it was last started with, with
    /// the NICs and disks plugged and unplugged since. `None` when there is none.
    pub fn recorded_spec(&self, uid: &str) -> Option<VmSpec> {
        validate_uid(uid).ok()?;
        read_recorded(&self.paths(uid).spec).ok()
    }

    /// QEMU's pid, or why there is none: no such VM, or it does not run.
    fn running_pid(&self, paths: &VmPaths, uid: &str) -> Result<u32, HypervisorError> {
        if !paths.dir.is_dir() {
            return Err(HypervisorError::NotFound(uid.to_owned()));
        }
        self.live_pid(paths, uid)
            .ok_or_else(|| HypervisorError::NotRunning(uid.to_owned()))
    }

    async fn session(&self, paths: &VmPaths, uid: &str) -> Result<Session, HypervisorError> {
        Session::open(&paths.qmp, self.config.control_timeout)
            .await
            .map_err(|source| HypervisorError::Control {
                uid: uid.to_owned(),
                source,
            })
    }

    fn unplug<'a>(&'a self, paths: &'a VmPaths, uid: &'a str) -> Unplug<'a> {
        Unplug {
            qmp: &paths.qmp,
            timeout: self.config.control_timeout,
            unplug_timeout: self.config.unplug_timeout,
            uid,
        }
    }

    async fn lock(&self, uid: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = {
            let mut locks = self.locks.lock().expect("lock table poisoned");
            locks.entry(uid.to_owned()).or_default().clone()
        };
        lock.lock_owned().await
    }

    /// QEMU's pid if the process recorded in the pidfile is alive and is this VM's.
    fn live_pid(&self, paths: &VmPaths, uid: &str) -> Option<u32> {
        let pid = read_pid(&paths.pidfile)?;
        is_vm_process(pid, uid).then_some(pid)
    }

    async fn observe(&self, uid: &str) -> Result<Option<VmStatus>, HypervisorError> {
        let paths = self.paths(uid);
        if !paths.dir.is_dir() {
            return Ok(None);
        }
        let mut status = VmStatus {
            uid: uid.to_owned(),
            state: VmState::Stopped,
            pid: None,
            accel: None,
            detail: None,
            serial_log: paths.serial_log.clone(),
            console_socket: paths.console.clone(),
            started_at: None,
            labels: recorded_labels(&paths.spec),
        };
        let Some(pid) = self.live_pid(&paths, uid) else {
            // QEMU removes its pidfile on a clean exit; one left behind means it was killed.
            // Look again after the liveness check, in case it exited cleanly in between.
            status.state = if paths.pidfile.exists() {
                VmState::Crashed
            } else if paths.should_run.exists() {
                VmState::PoweredOff
            } else {
                VmState::Stopped
            };
            status.detail = start_log(&paths).lines().last().map(str::to_owned);
            return Ok(Some(status));
        };
        status.pid = Some(pid);
        status.started_at = started_at(&paths.pidfile);
        match self.query(&paths).await {
            Ok((run_state, kvm)) => {
                status.state = if run_state == "running" {
                    VmState::Running
                } else {
                    VmState::Paused
                };
                status.accel = Some(if kvm { Accel::Kvm } else { Accel::Tcg });
                status.detail = Some(run_state);
            }
            Err(e) => {
                status.state = VmState::Unresponsive;
                status.detail = Some(error_chain(&e));
            }
        }
        Ok(Some(status))
    }

    /// QEMU's run state (`running`, `paused`, …) and whether KVM is on.
    async fn query(&self, paths: &VmPaths) -> Result<(String, bool), QmpError> {
        let timeout = self.config.control_timeout;
        let mut qmp = Qmp::connect(&paths.qmp, timeout).await?;
        tokio::time::timeout(timeout, async {
            let status = qmp.execute("query-status", None).await?;
            let kvm = qmp.execute("query-kvm", None).await?;
            let run_state = status["status"].as_str().unwrap_or("unknown").to_owned();
            Ok((run_state, kvm["enabled"].as_bool().unwrap_or(false)))
        })
        .await
        .map_err(|_| QmpError::Timeout(timeout))?
    }

    async fn qmp_command(&self, paths: &VmPaths, command: &str) -> Result<Value, QmpError> {
        let timeout = self.config.control_timeout;
        let mut qmp = Qmp::connect(&paths.qmp, timeout).await?;
        tokio::time::timeout(timeout, qmp.execute(command, None))
            .await
            .map_err(|_| QmpError::Timeout(timeout))?
    }

    /// Ends a running VM now: QMP `quit`, then SIGKILL if it lingers.
    async fn end(&self, paths: &VmPaths, uid: &str, pid: u32) -> Result<(), HypervisorError> {
        match self.qmp_command(paths, "quit").await {
            // QEMU may close the socket before its answer to `quit` arrives.
            Ok(_) | Err(QmpError::Closed) => {}
            Err(e) => tracing::warn!(uid, error = %error_chain(&e), "QMP quit failed; killing"),
        }
        if wait_for_exit(pid, uid, QUIT_GRACE).await {
            return Ok(());
        }
        tracing::warn!(uid, pid, "QEMU ignored quit; sending SIGKILL");
        if let Some(raw) = i32::try_from(pid)
            .ok()
            .and_then(rustix::process::Pid::from_raw)
        {
            // The identity check in wait_for_exit just said this pid is still our QEMU.
            let _ = rustix::process::kill_process(raw, rustix::process::Signal::KILL);
        }
        if wait_for_exit(pid, uid, KILL_WAIT).await {
            Ok(())
        } else {
            Err(HypervisorError::WouldNotDie {
                uid: uid.to_owned(),
                pid,
                waited: KILL_WAIT,
            })
        }
    }

    async fn prepare_disk(&self, disk: &BootDisk, paths: &VmPaths) -> Result<(), HypervisorError> {
        let base = std::path::absolute(&disk.base)
            .map_err(io(format!("resolving {}", disk.base.display())))?;
        if !paths.disk.exists() {
            let base_size = self
                .virtual_size(&base, Some(disk.base_format.as_str()))
                .await?;
            let size = disk.size_bytes.unwrap_or(base_size);
            if size < base_size {
                return Err(HypervisorError::InvalidSpec {
                    field: "boot_disk.size_bytes",
                    reason: format!("{size} is smaller than the image's {base_size} bytes"),
                });
            }
            let partial = paths.dir.join("disk.qcow2.partial");
            let mut args: Vec<OsString> = vec!["create".into(), "-q".into(), "-f".into()];
            args.extend([
                "qcow2".into(),
                "-F".into(),
                disk.base_format.as_str().into(),
            ]);
            args.extend(["-b".into(), base.into_os_string(), partial.clone().into()]);
            args.push(size.to_string().into());
            self.qemu_img(&args).await?;
            std::fs::rename(&partial, &paths.disk).map_err(io(format!(
                "moving the overlay to {}",
                paths.disk.display()
            )))?;
        } else if let Some(size) = disk.size_bytes {
            let current = self.virtual_size(&paths.disk, Some("qcow2")).await?;
            if size < current {
                return Err(HypervisorError::InvalidSpec {
                    field: "boot_disk.size_bytes",
                    reason: format!("{size} would shrink the {current}-byte disk"),
                });
            }
            if size > current {
                let mut args: Vec<OsString> = vec!["resize".into(), "-q".into(), "-f".into()];
                args.extend([
                    "qcow2".into(),
                    paths.disk.clone().into(),
                    size.to_string().into(),
                ]);
                self.qemu_img(&args).await?;
            }
        }
        Ok(())
    }

    async fn virtual_size(
        &self,
        image: &Path,
        format: Option<&str>,
    ) -> Result<u64, HypervisorError> {
        let mut args: Vec<OsString> = vec!["info".into(), "-U".into(), "--output=json".into()];
        if let Some(format) = format {
            args.extend(["-f".into(), format.into()]);
        }
        args.push(image.into());
        let out = self.qemu_img(&args).await?;
        serde_json::from_slice::<Value>(&out)
            .ok()
            .and_then(|info| info["virtual-size"].as_u64())
            .ok_or_else(|| HypervisorError::Command {
                program: format!("qemu-img info {}", image.display()),
                status: "0".into(),
                stderr: "no virtual-size in its output".into(),
            })
    }

    async fn qemu_img(&self, args: &[OsString]) -> Result<Vec<u8>, HypervisorError> {
        let program = &self.config.qemu_img;
        let output = tokio::process::Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .await
            .map_err(io(format!("running {}", program.display())))?;
        if !output.status.success() {
            return Err(HypervisorError::Command {
                program: format!("{} {}", program.display(), args[0].to_string_lossy()),
                status: output.status.to_string(),
                stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
            });
        }
        Ok(output.stdout)
    }

    async fn launch(
        &self,
        spec: &VmSpec,
        paths: &VmPaths,
        accel: Accel,
    ) -> Result<(), HypervisorError> {
        for stale in [&paths.qmp, &paths.console, &paths.pidfile] {
            remove_file_if_exists(stale)?;
        }
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&paths.qemu_log)
            .map_err(io(format!("opening {}", paths.qemu_log.display())))?;
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        std::io::Write::write_all(
            &mut log,
            format!(
                "{START_MARK} (accel {}, unix time {})\n",
                accel.as_str(),
                now.as_secs()
            )
            .as_bytes(),
        )
        .map_err(io(format!("writing {}", paths.qemu_log.display())))?;
        let stdout = log
            .try_clone()
            .map_err(io("duplicating the log handle".into()))?;

        let args = command_line(
            spec,
            paths,
            accel,
            self.config.hotplug_ports,
            self.config.tap_offloads,
        )?;
        tracing::info!(uid = %spec.uid, accel = accel.as_str(), "starting QEMU");
        let mut child = tokio::process::Command::new(&self.config.qemu)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .map_err(io(format!(
                "running {} (is qemu-system-x86 installed?)",
                self.config.qemu.display()
            )))?;
        // With -daemonize the first process exits once the VM is fully set up (sockets
        // listening, pidfile written) and its exit status says whether that worked.
        let status = match tokio::time::timeout(START_TIMEOUT, child.wait()).await {
            Ok(status) => status.map_err(io("waiting for QEMU to daemonize".into()))?,
            Err(_) => {
                if let Some(pid) = self.live_pid(paths, &spec.uid) {
                    self.end(paths, &spec.uid, pid).await?;
                }
                return Err(HypervisorError::StartFailed {
                    uid: spec.uid.clone(),
                    log: format!("no answer within {START_TIMEOUT:?}; {}", start_log(paths)),
                });
            }
        };
        if !status.success() || self.live_pid(paths, &spec.uid).is_none() {
            return Err(HypervisorError::StartFailed {
                uid: spec.uid.clone(),
                log: format!("{status}: {}", start_log(paths)),
            });
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl Hypervisor for QemuDriver {
    async fn accel(&self) -> Accel {
        QemuDriver::accel(self).await
    }

    async fn start(&self, spec: &VmSpec) -> Result<VmStatus, HypervisorError> {
        validate_spec(spec)?;
        // Volume paths are recorded and used as the absolute paths QEMU reports back.
        let mut resolved = spec.clone();
        for disk in &mut resolved.disks {
            *disk = resolve_disk(disk)?;
        }
        let spec = &resolved;
        let uid = spec.uid.as_str();
        let _guard = self.lock(uid).await;
        let paths = self.paths(uid);
        if let Some(status) = self.observe(uid).await?
            && status.is_alive()
        {
            tracing::debug!(uid, pid = status.pid, "VM already runs; adopting it");
            return Ok(status);
        }
        check_socket_path(&paths.console)?;
        std::fs::create_dir_all(&paths.dir)
            .map_err(io(format!("creating {}", paths.dir.display())))?;
        // First, so that whatever else is left here by a failed start says whose it is.
        let recorded = serde_json::to_vec_pretty(spec).expect("specs serialise to JSON");
        write_atomically(&paths.spec, &recorded)?;
        let accel = self.accel().await;
        if let Some(disk) = &spec.boot_disk {
            self.prepare_disk(disk, &paths).await?;
        }
        match &spec.config_drive {
            Some(drive) => {
                drive
                    .write_iso(&paths.config_drive, &self.config.genisoimage)
                    .await?
            }
            None => remove_file_if_exists(&paths.config_drive)?,
        }
        self.launch(spec, &paths, accel).await?;
        std::fs::write(&paths.should_run, b"")
            .map_err(io(format!("writing {}", paths.should_run.display())))?;
        self.observe(uid)
            .await?
            .ok_or_else(|| HypervisorError::NotFound(uid.to_owned()))
    }

    async fn stop(&self, uid: &str, grace: Duration) -> Result<StopOutcome, HypervisorError> {
        validate_uid(uid)?;
        let _guard = self.lock(uid).await;
        let paths = self.paths(uid);
        if !paths.dir.is_dir() {
            return Err(HypervisorError::NotFound(uid.to_owned()));
        }
        // Asked to stop: however it ends from here, it did not end on its own.
        remove_file_if_exists(&paths.should_run)?;
        let Some(pid) = self.live_pid(&paths, uid) else {
            // A pidfile left by a killed QEMU: the VM is as stopped as it will get.
            remove_file_if_exists(&paths.pidfile)?;
            return Ok(StopOutcome::AlreadyStopped);
        };
        match self.qmp_command(&paths, "system_powerdown").await {
            Ok(_) => {
                if wait_for_exit(pid, uid, grace).await {
                    return Ok(StopOutcome::Graceful);
                }
                tracing::info!(uid, ?grace, "guest did not power off in time; ending it");
            }
            Err(e) => tracing::warn!(uid, error = %error_chain(&e), "ACPI power-down failed"),
        }
        self.end(&paths, uid, pid).await?;
        remove_file_if_exists(&paths.pidfile)?;
        Ok(StopOutcome::Forced)
    }

    async fn reset(&self, uid: &str) -> Result<(), HypervisorError> {
        validate_uid(uid)?;
        let _guard = self.lock(uid).await;
        let paths = self.paths(uid);
        if !paths.dir.is_dir() {
            return Err(HypervisorError::NotFound(uid.to_owned()));
        }
        if self.live_pid(&paths, uid).is_none() {
            return Err(HypervisorError::NotRunning(uid.to_owned()));
        }
        self.qmp_command(&paths, "system_reset")
            .await
            .map(drop)
            .map_err(|source| HypervisorError::Control {
                uid: uid.to_owned(),
                source,
            })
    }

    async fn destroy(&self, uid: &str) -> Result<(), HypervisorError> {
        validate_uid(uid)?;
        let guard = self.lock(uid).await;
        let paths = self.paths(uid);
        if let Some(pid) = self.live_pid(&paths, uid) {
            self.end(&paths, uid, pid).await?;
        }
        match std::fs::remove_dir_all(&paths.dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(format!("removing {}", paths.dir.display()))(e)),
        }
        drop(guard);
        self.locks.lock().expect("lock table poisoned").remove(uid);
        Ok(())
    }

    async fn status(&self, uid: &str) -> Result<Option<VmStatus>, HypervisorError> {
        validate_uid(uid)?;
        self.observe(uid).await
    }

    async fn attach_nic(&self, uid: &str, nic: &Nic) -> Result<(), HypervisorError> {
        validate_uid(uid)?;
        validate_nic(nic)?;
        let _guard = self.lock(uid).await;
        let paths = self.paths(uid);
        self.running_pid(&paths, uid)?;
        let mut session = self.session(&paths, uid).await?;
        if plug_nic(&mut session, uid, nic, self.config.tap_offloads).await? {
            tracing::info!(uid, nic = %nic.id, tap = %nic.tap, "NIC plugged");
        }
        record(&paths.spec, |spec| {
            match spec.nics.iter_mut().find(|n| n.id == nic.id) {
                Some(recorded) => *recorded = nic.clone(),
                None => spec.nics.push(nic.clone()),
            }
        })
    }

    async fn detach_nic(&self, uid: &str, nic_id: &str) -> Result<(), HypervisorError> {
        validate_uid(uid)?;
        let _guard = self.lock(uid).await;
        let paths = self.paths(uid);
        let pid = self.running_pid(&paths, uid)?;
        self.unplug(&paths, uid)
            .nic(nic_id, || is_vm_process(pid, uid))
            .await?;
        record(&paths.spec, |spec| spec.nics.retain(|n| n.id != nic_id))
    }

    async fn nics(&self, uid: &str) -> Result<Vec<Nic>, HypervisorError> {
        validate_uid(uid)?;
        let paths = self.paths(uid);
        self.running_pid(&paths, uid)?;
        let mut session = self.session(&paths, uid).await?;
        let layout =
            read_layout(&mut session)
                .await
                .map_err(|source| HypervisorError::Control {
                    uid: uid.to_owned(),
                    source,
                })?;
        Ok(layout.nics.into_iter().map(|p| p.nic).collect())
    }

    async fn attach_disk(&self, uid: &str, disk: &Disk) -> Result<(), HypervisorError> {
        validate_uid(uid)?;
        let disk = resolve_disk(disk)?;
        let _guard = self.lock(uid).await;
        let paths = self.paths(uid);
        self.running_pid(&paths, uid)?;
        let mut session = self.session(&paths, uid).await?;
        if plug_disk(&mut session, uid, &disk).await? {
            tracing::info!(uid, disk = %disk.id, "disk plugged");
        }
        record(&paths.spec, |spec| {
            match spec.disks.iter_mut().find(|d| d.id == disk.id) {
                Some(recorded) => *recorded = disk.clone(),
                None => spec.disks.push(disk.clone()),
            }
        })
    }

    async fn detach_disk(&self, uid: &str, disk_id: &str) -> Result<(), HypervisorError> {
        validate_uid(uid)?;
        let _guard = self.lock(uid).await;
        let paths = self.paths(uid);
        let pid = self.running_pid(&paths, uid)?;
        self.unplug(&paths, uid)
            .disk(disk_id, || is_vm_process(pid, uid))
            .await?;
        record(&paths.spec, |spec| spec.disks.retain(|d| d.id != disk_id))
    }

    async fn disks(&self, uid: &str) -> Result<Vec<Disk>, HypervisorError> {
        validate_uid(uid)?;
        let paths = self.paths(uid);
        self.running_pid(&paths, uid)?;
        let mut session = self.session(&paths, uid).await?;
        let layout =
            read_layout(&mut session)
                .await
                .map_err(|source| HypervisorError::Control {
                    uid: uid.to_owned(),
                    source,
                })?;
        Ok(layout.disks.into_iter().map(|p| p.disk).collect())
    }

    async fn resize_disk(
        &self,
        uid: &str,
        disk_id: &str,
        size_bytes: u64,
    ) -> Result<(), HypervisorError> {
        validate_uid(uid)?;
        let _guard = self.lock(uid).await;
        let paths = self.paths(uid);
        self.running_pid(&paths, uid)?;
        let mut session = self.session(&paths, uid).await?;
        if grow_disk(&mut session, uid, disk_id, size_bytes).await? {
            tracing::info!(uid, disk = disk_id, size_bytes, "disk grown");
        }
        Ok(())
    }

    async fn list(&self) -> Result<Vec<VmStatus>, HypervisorError> {
        let entries = match std::fs::read_dir(&self.config.state_dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => {
                return Err(io(format!("listing {}", self.config.state_dir.display()))(
                    e,
                ));
            }
        };
        let mut uids: Vec<String> = entries
            .filter_map(Result::ok)
            .filter(|entry| entry.path().is_dir())
            .filter_map(|entry| entry.file_name().into_string().ok())
            .filter(|name| validate_uid(name).is_ok())
            .collect();
        uids.sort();
        let mut found = Vec::with_capacity(uids.len());
        for uid in uids {
            if let Some(status) = self.observe(&uid).await? {
                found.push(status);
            }
        }
        Ok(found)
    }
}

/// The CPU model for an accelerator: the host's own under KVM; under TCG `qemu64`, which
/// translates a little faster than `max`.
fn cpu_model(accel: Accel) -> &'static str {
    match accel {
        Accel::Kvm => "host",
        Accel::Tcg => "qemu64",
    }
}

/// QEMU's command line for `spec`.
fn command_line(
    spec: &VmSpec,
    paths: &VmPaths,
    accel: Accel,
    hotplug_ports: u8,
    tap_offloads: bool,
) -> Result<Vec<OsString>, HypervisorError> {
    let mut args: Vec<OsString> = Vec::new();
    let mut push = |items: &[&str]| args.extend(items.iter().map(OsString::from));
    let name = format!("ferro-{}", spec.uid);
    push(&["-name", &name]);
    if looks_like_uuid(&spec.uid) {
        // The guest sees it as its SMBIOS system UUID.
        push(&["-uuid", &spec.uid]);
    }
    push(&[
        "-machine",
        "q35",
        "-accel",
        accel.as_str(),
        "-cpu",
        cpu_model(accel),
    ]);
    push(&[
        "-smp",
        &spec.vcpus.to_string(),
        "-m",
        &format!("{}M", spec.memory_mib),
    ]);
    push(&[
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-rtc",
        "base=utc",
    ]);
    push(&["-msg", "timestamp=on", "-daemonize"]);
    push(&[
        "-pidfile",
        &path_str(&paths.pidfile)?,
        "-D",
        &path_str(&paths.debug_log)?,
    ]);
    let qmp = format!(
        "socket,id=qmp,path={},server=on,wait=off",
        opt_value(&paths.qmp)?
    );
    push(&["-chardev", &qmp, "-mon", "chardev=qmp,mode=control"]);
    let console = format!(
        "socket,id=console,path={},server=on,wait=off,logfile={},logappend=on",
        opt_value(&paths.console)?,
        opt_value(&paths.serial_log)?
    );
    push(&["-chardev", &console, "-serial", "chardev:console"]);
    if let Some(kernel) = &spec.kernel {
        push(&["-kernel", &absolute_str(&kernel.kernel)?]);
        if let Some(initrd) = &kernel.initrd {
            push(&["-initrd", &absolute_str(initrd)?]);
        }
        push(&["-append", &kernel.cmdline]);
    }
    // Disks first, so the guest names the boot disk vda and the config drive vdb.
    if spec.boot_disk.is_some() {
        let node = json!({
            "driver": "qcow2",
            "node-name": "disk-boot",
            "file": { "driver": "file", "filename": path_str(&paths.disk)? },
        });
        push(&["-blockdev", &node.to_string()]);
        // A direct kernel boot claims boot index 0 itself.
        let bootindex = if spec.kernel.is_some() {
            ""
        } else {
            ",bootindex=0"
        };
        let device = format!("virtio-blk-pci,id=vd-boot,drive=disk-boot{bootindex}");
        push(&["-device", &device]);
    }
    if spec.config_drive.is_some() {
        let node = json!({
            "driver": "raw",
            "node-name": "disk-config",
            "read-only": true,
            "file": { "driver": "file", "filename": path_str(&paths.config_drive)?, "read-only": true },
        });
        push(&["-blockdev", &node.to_string()]);
        push(&["-device", "virtio-blk-pci,id=vd-config,drive=disk-config"]);
    }
    // A root port for each NIC and disk and the spare ones, before the devices that sit
    // on them.
    let ports = (spec.nics.len() + spec.disks.len() + usize::from(hotplug_ports)).min(MAX_DEVICES);
    for i in 0..ports {
        // Every root port needs its own chassis number.
        let port = format!(
            "pcie-root-port,id={},chassis={},addr={:#x}",
            port_id(i),
            i + 1,
            FIRST_PORT_SLOT + i
        );
        push(&["-device", &port]);
    }
    for (i, nic) in spec.nics.iter().enumerate() {
        let netdev = format!(
            "tap,id={},ifname={},script=no,downscript=no{}",
            netdev_id(&nic.id),
            nic.tap,
            if tap_offloads { "" } else { ",vnet_hdr=off" }
        );
        let device = format!(
            "virtio-net-pci,id={},netdev={},mac={},bus={},addr=0",
            device_id(&nic.id),
            netdev_id(&nic.id),
            nic.mac,
            port_id(i)
        );
        push(&["-netdev", &netdev, "-device", &device]);
    }
    // The data disks on the ports after the NICs', so the guest's NIC order stays put.
    for (i, disk) in spec.disks.iter().enumerate() {
        let disk = resolve_disk(disk)?;
        push(&["-blockdev", &volume_blockdev(&disk)?.to_string()]);
        let serial = if disk.serial.is_empty() {
            String::new()
        } else {
            format!(",serial={}", disk.serial)
        };
        // Without a boot disk or a kernel, the firmware boots the first data disk.
        let bootindex = if i == 0 && spec.boot_disk.is_none() && spec.kernel.is_none() {
            ",bootindex=0"
        } else {
            ""
        };
        let device = format!(
            "virtio-blk-pci,id={},drive={}{serial},bus={},addr=0{bootindex}",
            disk_device_id(&disk.id),
            volume_node(&disk.id),
            port_id(spec.nics.len() + i)
        );
        push(&["-device", &device]);
    }
    push(&["-object", "rng-random,id=rng0,filename=/dev/urandom"]);
    push(&["-device", "virtio-rng-pci,id=rng,rng=rng0"]);
    Ok(args)
}

/// The id of root port `i`.
fn port_id(i: usize) -> String {
    format!("hotplug{i}")
}

/// The index of a root port, from its id; `None` for anything else.
fn port_index(id: &str) -> Option<usize> {
    id.strip_prefix("hotplug")?.parse().ok()
}

/// The id of NIC `nic_id`'s virtio-net device.
fn device_id(nic_id: &str) -> String {
    format!("nic-{nic_id}")
}

/// The id of NIC `nic_id`'s tap backend.
fn netdev_id(nic_id: &str) -> String {
    format!("net-{nic_id}")
}

/// The id of data disk `disk_id`'s virtio-blk device.
fn disk_device_id(disk_id: &str) -> String {
    format!("vol-{disk_id}")
}

/// What names data disk `disk_id`'s block nodes, within QEMU's 31 bytes: the id itself
/// when short enough, otherwise its first 8 bytes, a `.` and 14 hex digits of its sha256.
fn node_key(disk_id: &str) -> String {
    use sha2::{Digest, Sha256};
    if disk_id.len() <= MAX_PLAIN_NODE_KEY {
        return disk_id.to_owned();
    }
    let digest = Sha256::digest(disk_id.as_bytes());
    let hash: String = digest[..7].iter().map(|b| format!("{b:02x}")).collect();
    // Validated ids are ASCII, so byte 8 is a character boundary.
    let prefix = disk_id.get(..8).unwrap_or(disk_id);
    format!("{prefix}.{hash}")
}

/// The name of data disk `disk_id`'s format node, the one its device reads.
fn volume_node(disk_id: &str) -> String {
    format!("volume-{}", node_key(disk_id))
}

/// The name of data disk `disk_id`'s protocol node (the file, or the NBD client).
fn volume_file_node(disk_id: &str) -> String {
    format!("volfile-{}", node_key(disk_id))
}

/// The `-blockdev` / `blockdev-add` definition of a (resolved) data disk: a format node
/// over an inline protocol node, both named after the disk, with the host's page cache.
fn volume_blockdev(disk: &Disk) -> Result<Value, HypervisorError> {
    let (format, mut file) = match &disk.source {
        DiskSource::File { path, format } => (
            format.as_str(),
            json!({ "driver": "file", "filename": path_str(path)? }),
        ),
        // The export carries raw bytes; the volume's format is the storage node's affair.
        DiskSource::Nbd { host, port, export } => (
            "raw",
            json!({
                "driver": "nbd",
                "server": { "type": "inet", "host": host, "port": port.to_string() },
                "export": export,
                "reconnect-delay": NBD_RECONNECT_DELAY,
            }),
        ),
    };
    file["node-name"] = json!(volume_file_node(&disk.id));
    file["read-only"] = json!(disk.read_only);
    file["cache"] = json!({ "direct": false });
    Ok(json!({
        "driver": format,
        "node-name": volume_node(&disk.id),
        "read-only": disk.read_only,
        "cache": { "direct": false },
        "file": file,
    }))
}

/// One QMP session for one operation, each exchange bounded by the control timeout.
struct Session {
    qmp: Qmp,
    timeout: Duration,
}

impl Session {
    async fn open(path: &Path, timeout: Duration) -> Result<Self, QmpError> {
        Ok(Session {
            qmp: Qmp::connect(path, timeout).await?,
            timeout,
        })
    }

    async fn run(&mut self, command: &str, arguments: Value) -> Result<Value, QmpError> {
        let arguments = (!arguments.is_null()).then_some(arguments);
        tokio::time::timeout(self.timeout, self.qmp.execute(command, arguments))
            .await
            .map_err(|_| QmpError::Timeout(self.timeout))?
    }

    /// The names and QOM types of the devices given an id (`-device id=…`, `device_add`).
    async fn peripherals(&mut self) -> Result<Vec<(String, String)>, QmpError> {
        let listed = self
            .run("qom-list", json!({ "path": "/machine/peripheral" }))
            .await?;
        Ok(listed
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| {
                let name = p["name"].as_str()?;
                let kind = p["type"].as_str()?.strip_prefix("child<")?;
                Some((name.to_owned(), kind.trim_end_matches('>').to_owned()))
            })
            .collect())
    }

    /// Every block node, by name (`query-named-block-nodes`, flat).
    async fn block_nodes(&mut self) -> Result<BTreeMap<String, BlockNode>, QmpError> {
        let nodes = self
            .run("query-named-block-nodes", json!({ "flat": true }))
            .await?;
        Ok(nodes
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|node| {
                let name = node["node-name"].as_str()?.to_owned();
                Some((
                    name,
                    BlockNode {
                        driver: node["drv"].as_str().unwrap_or_default().to_owned(),
                        filename: node["file"].as_str().unwrap_or_default().to_owned(),
                        read_only: node["ro"].as_bool().unwrap_or(false),
                        size: node["image"]["virtual-size"].as_u64().unwrap_or(0),
                    },
                ))
            })
            .collect())
    }

    async fn qom_string(&mut self, path: &str, property: &str) -> Result<String, QmpError> {
        let value = self
            .run("qom-get", json!({ "path": path, "property": property }))
            .await?;
        value.as_str().map(str::to_owned).ok_or_else(|| {
            QmpError::Protocol(format!("{path} {property} is not a string: {value}"))
        })
    }
}

/// A NIC found in a running VM, and the root port it sits on.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PluggedNic {
    nic: Nic,
    port: Option<usize>,
}

/// A data disk found in a running VM, the root port it sits on and the block node its
/// device reads.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PluggedDisk {
    disk: Disk,
    port: Option<usize>,
    node: String,
}

/// One block node, as `query-named-block-nodes` describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct BlockNode {
    /// The block driver: a format (`qcow2`, `raw`) or a protocol (`file`, `nbd`).
    driver: String,
    /// What QEMU calls the node's file: a path, `nbd://HOST:PORT/EXPORT`, or `json:{…}`.
    filename: String,
    read_only: bool,
    /// The virtual size in bytes.
    size: u64,
}

/// What a running VM's root ports hold, as QEMU says.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct PortLayout {
    /// Ferro's NICs (devices named `nic-<id>`), by port.
    nics: Vec<PluggedNic>,
    /// Ferro's data disks (devices named `vol-<id>` whose source reads back), by port.
    disks: Vec<PluggedDisk>,
    /// The ids of every device given one (`-device id=…`, `device_add`).
    devices: BTreeSet<String>,
    /// Root ports that hold no device, lowest first.
    free_ports: Vec<usize>,
    /// Tap backends by id, with their interface name; a backend whose device is gone
    /// is still here until `netdev_del`.
    netdevs: BTreeMap<String, String>,
    /// Block nodes by name; a disk's nodes whose device is gone are still here until
    /// `blockdev-del`.
    block_nodes: BTreeMap<String, BlockNode>,
}

impl PortLayout {
    fn nic(&self, nic_id: &str) -> Option<&Nic> {
        self.nics.iter().map(|p| &p.nic).find(|n| n.id == nic_id)
    }

    fn disk(&self, disk_id: &str) -> Option<&PluggedDisk> {
        self.disks.iter().find(|p| p.disk.id == disk_id)
    }
}

/// Reads which devices sit on which root ports, and the NICs among them.
async fn read_layout(session: &mut Session) -> Result<PortLayout, QmpError> {
    let info = session
        .run(
            "human-monitor-command",
            json!({ "command-line": "info network" }),
        )
        .await?;
    let netdevs = tap_backends(info.as_str().unwrap_or_default());
    let block_nodes = session.block_nodes().await?;
    let mut ports = BTreeSet::new();
    let mut occupied = BTreeSet::new();
    let mut devices = BTreeSet::new();
    let mut nics = Vec::new();
    let mut disks = Vec::new();
    for (name, kind) in session.peripherals().await? {
        if kind == "pcie-root-port" {
            if let Some(index) = port_index(&name) {
                ports.insert(index);
            }
            continue;
        }
        devices.insert(name.clone());
        let path = format!("/machine/peripheral/{name}");
        // e.g. /machine/peripheral/hotplug2/hotplug2: a root port's bus is named after it.
        let bus = session.qom_string(&path, "parent_bus").await?;
        let port = bus.rsplit('/').next().and_then(port_index);
        occupied.extend(port);
        match (kind.as_str(), name.split_once('-')) {
            ("virtio-net-pci", Some(("nic", id))) => {
                let mac = session.qom_string(&path, "mac").await?;
                let netdev = session.qom_string(&path, "netdev").await?;
                nics.push(PluggedNic {
                    nic: Nic {
                        id: id.to_owned(),
                        tap: netdevs.get(&netdev).cloned().unwrap_or_default(),
                        mac,
                    },
                    port,
                });
            }
            ("virtio-blk-pci", Some(("vol", id))) => {
                let node = session.qom_string(&path, "drive").await?;
                let serial = session.qom_string(&path, "serial").await?;
                let found = block_nodes.get(&node).and_then(|format| {
                    let protocol = block_nodes.get(&volume_file_node(id));
                    Some((disk_source(format, protocol)?, format.read_only))
                });
                match found {
                    Some((source, read_only)) => disks.push(PluggedDisk {
                        disk: Disk {
                            id: id.to_owned(),
                            source,
                            serial,
                            read_only,
                        },
                        port,
                        node,
                    }),
                    None => tracing::warn!(
                        device = %name,
                        %node,
                        "a volume device whose source does not read back as a Disk"
                    ),
                }
            }
            _ => {}
        }
    }
    nics.sort_by_key(|p| (p.port.is_none(), p.port));
    disks.sort_by_key(|p| (p.port.is_none(), p.port));
    Ok(PortLayout {
        nics,
        disks,
        devices,
        free_ports: ports.difference(&occupied).copied().collect(),
        netdevs,
        block_nodes,
    })
}

/// Where a data disk's bytes are, from its format node and (when it has the name Ferro
/// gives it) its protocol node. `None` for what no [`DiskSource`] describes (say, qcow2
/// over NBD, or a format Ferro does not use).
fn disk_source(format: &BlockNode, protocol: Option<&BlockNode>) -> Option<DiskSource> {
    let filename = protocol.map_or(format.filename.as_str(), |p| p.filename.as_str());
    let over_nbd = match protocol {
        Some(protocol) => protocol.driver == "nbd",
        None => filename.starts_with("nbd") || filename.starts_with("json:"),
    };
    if over_nbd {
        return (format.driver == "raw")
            .then(|| nbd_source(filename))
            .flatten();
    }
    if protocol.is_some_and(|p| p.driver != "file") || filename.starts_with("json:") {
        return None;
    }
    let format = match format.driver.as_str() {
        "qcow2" => DiskFormat::Qcow2,
        "raw" => DiskFormat::Raw,
        _ => return None,
    };
    Some(DiskSource::File {
        path: filename.into(),
        format,
    })
}

/// The NBD server and export in a filename QEMU made for an NBD node: `nbd://HOST:PORT/
/// EXPORT` (QEMU 7.2 writes an IPv6 host without brackets), or `json:{…}` with the
/// node's options when it could make no URL.
fn nbd_source(filename: &str) -> Option<DiskSource> {
    if let Some(json) = filename.strip_prefix("json:") {
        let mut options: Value = serde_json::from_str(json).ok()?;
        // A format node's options hold its protocol node's under "file".
        while options["driver"] != "nbd" {
            options = options.get("file")?.clone();
        }
        let server = &options["server"];
        if server["type"] != "inet" {
            return None;
        }
        let port = match &server["port"] {
            Value::String(port) => port.parse().ok()?,
            port => u16::try_from(port.as_u64()?).ok()?,
        };
        return Some(DiskSource::Nbd {
            host: server["host"].as_str()?.to_owned(),
            port,
            export: options["export"].as_str()?.to_owned(),
        });
    }
    let rest = filename.strip_prefix("nbd://")?;
    let (authority, export) = rest.split_once('/')?;
    let (host, port) = authority.rsplit_once(':')?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    Some(DiskSource::Nbd {
        host: host.to_owned(),
        port: port.parse().ok()?,
        export: export.to_owned(),
    })
}

/// The tap backends in the text of HMP's `info network`, by id, with their interface:
///
/// ```text
/// nic-p1: index=0,type=nic,model=virtio-net-pci,macaddr=52:54:00:12:34:56
///  \ net-p1: index=0,type=tap,ifname=tapp1,script=no,downscript=no
/// ```
///
/// QEMU 7.2 has no QMP command that names a tap backend's interface.
fn tap_backends(info: &str) -> BTreeMap<String, String> {
    info.lines()
        .filter_map(|line| {
            let line = line.trim().trim_start_matches('\\').trim();
            let (id, fields) = line.split_once(": ")?;
            let fields: BTreeMap<_, _> = fields
                .split(',')
                .filter_map(|f| f.split_once('='))
                .collect();
            (fields.get("type") == Some(&"tap")).then(|| {
                (
                    id.to_owned(),
                    fields.get("ifname").unwrap_or(&"").to_string(),
                )
            })
        })
        .collect()
}

/// Plugs `nic` into a free root port, first removing a backend of the same id that an
/// interrupted plug or unplug left behind. Returns false when the NIC was there already.
async fn plug_nic(
    session: &mut Session,
    uid: &str,
    nic: &Nic,
    tap_offloads: bool,
) -> Result<bool, HypervisorError> {
    let control = |source| HypervisorError::Control {
        uid: uid.to_owned(),
        source,
    };
    let layout = read_layout(session).await.map_err(control)?;
    if let Some(found) = layout.nic(&nic.id) {
        if found.tap == nic.tap && found.mac == nic.mac {
            return Ok(false);
        }
        return Err(HypervisorError::NicConflict {
            uid: uid.to_owned(),
            nic: nic.id.clone(),
            found: format!("tap {:?}, MAC {}", found.tap, found.mac),
        });
    }
    let netdev = netdev_id(&nic.id);
    if layout.netdevs.contains_key(&netdev) {
        session
            .run("netdev_del", json!({ "id": netdev }))
            .await
            .map_err(control)?;
    }
    let Some(&port) = layout.free_ports.first() else {
        return Err(HypervisorError::NoFreePort {
            uid: uid.to_owned(),
            device: format!("NIC {}", nic.id),
        });
    };
    session
        .run(
            "netdev_add",
            json!({
                "type": "tap",
                "id": netdev,
                "ifname": nic.tap,
                "script": "no",
                "downscript": "no",
                "vnet_hdr": tap_offloads,
            }),
        )
        .await
        .map_err(control)?;
    let added = session
        .run(
            "device_add",
            json!({
                "driver": "virtio-net-pci",
                "id": device_id(&nic.id),
                "netdev": netdev,
                "mac": nic.mac,
                "bus": port_id(port),
                // A root port has one slot; naming it makes QEMU refuse a taken port.
                "addr": "0",
            }),
        )
        .await;
    if let Err(e) = added {
        // Leave no backend without its device behind.
        let _ = session.run("netdev_del", json!({ "id": netdev })).await;
        return Err(control(e));
    }
    Ok(true)
}

/// What an unplug needs to know: where QMP is, and how long to wait for what.
struct Unplug<'a> {
    qmp: &'a Path,
    timeout: Duration,
    unplug_timeout: Duration,
    uid: &'a str,
}

impl Unplug<'_> {
    fn control(&self) -> impl Fn(QmpError) -> HypervisorError + '_ {
        |source| HypervisorError::Control {
            uid: self.uid.to_owned(),
            source,
        }
    }

    async fn session(&self) -> Result<Session, HypervisorError> {
        Session::open(self.qmp, self.timeout)
            .await
            .map_err(self.control())
    }

    /// Unplugs NIC `nic_id` (see [`Unplug::device`]), then removes its tap backend
    /// (`netdev_del`). A NIC that is not there is not an error.
    async fn nic(&self, nic_id: &str, alive: impl Fn() -> bool) -> Result<(), HypervisorError> {
        let control = self.control();
        let mut session = self.session().await?;
        let mut layout = read_layout(&mut session).await.map_err(&control)?;
        if layout.nic(nic_id).is_some() {
            drop(session);
            let waited = self
                .device(&device_id(nic_id), &format!("NIC {nic_id}"), alive)
                .await?;
            tracing::info!(uid = self.uid, nic = nic_id, ?waited, "NIC unplugged");
            session = self.session().await?;
            layout = read_layout(&mut session).await.map_err(&control)?;
        }
        let netdev = netdev_id(nic_id);
        if layout.netdevs.contains_key(&netdev) {
            session
                .run("netdev_del", json!({ "id": netdev }))
                .await
                .map_err(&control)?;
        }
        Ok(())
    }

    /// Unplugs data disk `disk_id` (see [`Unplug::device`]), then closes its block nodes
    /// (`blockdev-del`). A disk that is not there is not an error.
    async fn disk(&self, disk_id: &str, alive: impl Fn() -> bool) -> Result<(), HypervisorError> {
        let control = self.control();
        let device = disk_device_id(disk_id);
        let mut session = self.session().await?;
        let present = session
            .peripherals()
            .await
            .map_err(&control)?
            .iter()
            .any(|(name, _)| *name == device);
        if present {
            drop(session);
            let waited = self
                .device(&device, &format!("disk {disk_id}"), alive)
                .await?;
            tracing::info!(uid = self.uid, disk = disk_id, ?waited, "disk unplugged");
            session = self.session().await?;
        }
        remove_volume_nodes(&mut session, disk_id, None)
            .await
            .map_err(&control)
    }

    /// Asks the guest to release `device` (`device_del`), then polls in short sessions
    /// (so that status calls meanwhile get their turn on the socket) until QEMU has
    /// dropped it. Gives up after the unplug timeout, or when `alive` says QEMU is gone.
    /// Returns how long the guest took.
    async fn device(
        &self,
        device: &str,
        what: &str,
        alive: impl Fn() -> bool,
    ) -> Result<Duration, HypervisorError> {
        let control = self.control();
        let mut session = self.session().await?;
        match session.run("device_del", json!({ "id": device })).await {
            Ok(_) => {}
            Err(e) if unplug_pending(&e) => {}
            Err(e) => return Err(control(e)),
        }
        drop(session);
        let waiting = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(UNPLUG_POLL).await;
            let mut session = self.session().await?;
            let present = session
                .peripherals()
                .await
                .map_err(&control)?
                .iter()
                .any(|(name, _)| name == device);
            if !present {
                return Ok(waiting.elapsed());
            }
            if waiting.elapsed() >= self.unplug_timeout || !alive() {
                return Err(HypervisorError::UnplugTimeout {
                    uid: self.uid.to_owned(),
                    device: what.to_owned(),
                    waited: waiting.elapsed(),
                });
            }
        }
    }
}

/// Plugs data disk `disk` (resolved) into a free root port: `blockdev-add`, then
/// `device_add`, first removing block nodes of the same disk that an interrupted plug or
/// unplug left without their device. Returns false when the disk was there already.
async fn plug_disk(session: &mut Session, uid: &str, disk: &Disk) -> Result<bool, HypervisorError> {
    let control = |source| HypervisorError::Control {
        uid: uid.to_owned(),
        source,
    };
    let layout = read_layout(session).await.map_err(control)?;
    let device = disk_device_id(&disk.id);
    if layout.devices.contains(&device) {
        let found = layout.disk(&disk.id).map(|p| &p.disk);
        if found == Some(disk) {
            return Ok(false);
        }
        return Err(HypervisorError::DiskConflict {
            uid: uid.to_owned(),
            disk: disk.id.clone(),
            found: found.map_or_else(
                || "a source that does not read back".to_owned(),
                describe_disk,
            ),
        });
    }
    remove_volume_nodes(session, &disk.id, Some(&layout.block_nodes))
        .await
        .map_err(control)?;
    let Some(&port) = layout.free_ports.first() else {
        return Err(HypervisorError::NoFreePort {
            uid: uid.to_owned(),
            device: format!("disk {}", disk.id),
        });
    };
    session
        .run("blockdev-add", volume_blockdev(disk)?)
        .await
        .map_err(control)?;
    let mut device_args = json!({
        "driver": "virtio-blk-pci",
        "id": device,
        "drive": volume_node(&disk.id),
        "bus": port_id(port),
        // A root port has one slot; naming it makes QEMU refuse a taken port.
        "addr": "0",
    });
    if !disk.serial.is_empty() {
        device_args["serial"] = json!(disk.serial);
    }
    if let Err(e) = session.run("device_add", device_args).await {
        // Leave no volume open without its device.
        let _ = remove_volume_nodes(session, &disk.id, None).await;
        return Err(control(e));
    }
    Ok(true)
}

/// How a disk found in a VM differs from others, for a conflict's message.
fn describe_disk(disk: &Disk) -> String {
    let source = match &disk.source {
        DiskSource::File { path, format } => {
            format!("{} file {}", format.as_str(), path.display())
        }
        DiskSource::Nbd { host, port, export } => format!("NBD {host}:{port} export {export}"),
    };
    format!(
        "{source}, serial {:?}{}",
        disk.serial,
        if disk.read_only { ", read-only" } else { "" }
    )
}

/// Removes data disk `disk_id`'s block nodes, format node first (which takes the inline
/// protocol node with it), then a protocol node still there. `known` is a fresh list of
/// the block nodes; without one, QEMU is asked. A node still held by a device QEMU is
/// tearing down is tried again for a while.
async fn remove_volume_nodes(
    session: &mut Session,
    disk_id: &str,
    known: Option<&BTreeMap<String, BlockNode>>,
) -> Result<(), QmpError> {
    let mut nodes = match known {
        Some(nodes) => nodes.clone(),
        None => session.block_nodes().await?,
    };
    for name in [volume_node(disk_id), volume_file_node(disk_id)] {
        if !nodes.contains_key(&name) {
            continue;
        }
        let waiting = tokio::time::Instant::now();
        loop {
            match session
                .run("blockdev-del", json!({ "node-name": name }))
                .await
            {
                Ok(_) => break,
                Err(QmpError::Command { desc, .. })
                    if desc.contains("is in use") && waiting.elapsed() < BLOCK_RELEASE_WAIT =>
                {
                    tokio::time::sleep(UNPLUG_POLL).await;
                }
                Err(e) => return Err(e),
            }
        }
        nodes = session.block_nodes().await?;
    }
    Ok(())
}

/// Grows data disk `disk_id` to `size` bytes (`block_resize` on the node its device
/// reads). Returns false when it has that size already.
async fn grow_disk(
    session: &mut Session,
    uid: &str,
    disk_id: &str,
    size: u64,
) -> Result<bool, HypervisorError> {
    let control = |source| HypervisorError::Control {
        uid: uid.to_owned(),
        source,
    };
    let layout = read_layout(session).await.map_err(control)?;
    let Some(plugged) = layout.disk(disk_id) else {
        return Err(HypervisorError::NoSuchDisk {
            uid: uid.to_owned(),
            disk: disk_id.to_owned(),
        });
    };
    let current = layout
        .block_nodes
        .get(&plugged.node)
        .map_or(0, |node| node.size);
    if size < current {
        // QEMU would shrink it (and the guest's data with it) without a word.
        return Err(HypervisorError::InvalidSpec {
            field: "size_bytes",
            reason: format!("{size} would shrink the {current}-byte disk {disk_id}"),
        });
    }
    if size == current {
        return Ok(false);
    }
    session
        .run(
            "block_resize",
            json!({ "node-name": plugged.node, "size": size }),
        )
        .await
        .map_err(control)?;
    Ok(true)
}

/// Whether QEMU refused a `device_del` because the same unplug is already under way.
fn unplug_pending(error: &QmpError) -> bool {
    matches!(error, QmpError::Command { desc, .. } if desc.contains("process of unplug"))
}

/// Reads the spec recorded in `vm.json`.
fn read_recorded(path: &Path) -> Result<VmSpec, HypervisorError> {
    let bytes = std::fs::read(path).map_err(io(format!("reading {}", path.display())))?;
    serde_json::from_slice(&bytes).map_err(|e| HypervisorError::Io {
        what: format!("reading {}", path.display()),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
    })
}

/// Changes the spec recorded in `vm.json` (its NICs or disks), so a cold start of it
/// brings the VM back with the devices it has now.
fn record(path: &Path, change: impl FnOnce(&mut VmSpec)) -> Result<(), HypervisorError> {
    let mut spec = read_recorded(path)?;
    let before = spec.clone();
    change(&mut spec);
    if spec == before {
        return Ok(());
    }
    let recorded = serde_json::to_vec_pretty(&spec).expect("specs serialise to JSON");
    write_atomically(path, &recorded)
}

fn looks_like_uuid(s: &str) -> bool {
    let groups: Vec<_> = s.split('-').map(str::len).collect();
    groups == [8, 4, 4, 4, 12] && s.bytes().all(|b| b == b'-' || b.is_ascii_hexdigit())
}

/// A path as UTF-8, which QEMU's option syntax needs.
fn path_str(path: &Path) -> Result<String, HypervisorError> {
    path.to_str()
        .map(str::to_owned)
        .ok_or_else(|| HypervisorError::InvalidSpec {
            field: "path",
            reason: format!("{} is not UTF-8", path.display()),
        })
}

fn absolute_str(path: &Path) -> Result<String, HypervisorError> {
    let absolute =
        std::path::absolute(path).map_err(io(format!("resolving {}", path.display())))?;
    path_str(&absolute)
}

/// A path as the value of a `key=value,...` option: commas are doubled.
fn opt_value(path: &Path) -> Result<String, HypervisorError> {
    Ok(path_str(path)?.replace(',', ",,"))
}

/// Unix socket paths are limited to 107 bytes; say so instead of letting QEMU fail.
fn check_socket_path(path: &Path) -> Result<(), HypervisorError> {
    let len = path.as_os_str().len();
    if len > 107 {
        return Err(HypervisorError::InvalidSpec {
            field: "uid",
            reason: format!(
                "socket path {} is {len} bytes, over the 107 allowed: shorten the state directory",
                path.display()
            ),
        });
    }
    Ok(())
}

/// The host's own kernel, to probe KVM with when no other kernel is configured.
fn host_kernel() -> Option<PathBuf> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").ok()?;
    [
        format!("/boot/vmlinuz-{}", release.trim()),
        "/boot/vmlinuz".into(),
        "/vmlinuz".into(),
    ]
    .into_iter()
    .map(PathBuf::from)
    .find(|path| path.is_file())
}

/// The labels recorded in `vm.json`, or none when it is missing or unreadable.
fn recorded_labels(spec: &Path) -> std::collections::BTreeMap<String, String> {
    std::fs::read(spec)
        .ok()
        .and_then(|bytes| serde_json::from_slice::<VmSpec>(&bytes).ok())
        .map(|spec| spec.labels)
        .unwrap_or_default()
}

/// When QEMU started: it writes its pidfile once, at start-up. Whole seconds, so the
/// value is the same on every look.
fn started_at(pidfile: &Path) -> Option<SystemTime> {
    let modified = std::fs::metadata(pidfile).ok()?.modified().ok()?;
    let secs = modified
        .duration_since(SystemTime::UNIX_EPOCH)
        .ok()?
        .as_secs();
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
}

/// Writes a file through a temporary name and a rename, so it is never seen half written.
fn write_atomically(path: &Path, contents: &[u8]) -> Result<(), HypervisorError> {
    let partial = path.with_extension("partial");
    std::fs::write(&partial, contents).map_err(io(format!("writing {}", partial.display())))?;
    std::fs::rename(&partial, path).map_err(io(format!("writing {}", path.display())))
}

fn read_pid(pidfile: &Path) -> Option<u32> {
    std::fs::read_to_string(pidfile).ok()?.trim().parse().ok()
}

/// Whether `pid` is alive (not a zombie) and is the QEMU of VM `uid`: its command line
/// carries `-name ferro-<uid>`. This guards against a recycled pid.
pub fn is_vm_process(pid: u32, uid: &str) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state follows the parenthesised command name, which may itself hold spaces.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next());
    if matches!(state, Some("Z" | "X") | None) {
        return false;
    }
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let name = format!("ferro-{uid}");
    let mut args = cmdline.split(|b| *b == 0);
    while let Some(arg) = args.next() {
        if arg == b"-name" {
            return args.next() == Some(name.as_bytes());
        }
    }
    false
}

/// Waits until `pid` is no longer VM `uid`'s QEMU; false if it still is after `timeout`.
async fn wait_for_exit(pid: u32, uid: &str, timeout: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if !is_vm_process(pid, uid) {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(POLL).await;
    }
}

/// What QEMU said during its last run: the lines of `qemu.log` after the last start mark,
/// at most the last twenty.
fn last_run_log(qemu_log: &Path) -> String {
    let text = std::fs::read_to_string(qemu_log).unwrap_or_default();
    let run = text
        .rsplit_once(START_MARK)
        .map_or(text.as_str(), |(_, run)| run);
    let lines: Vec<_> = run
        .lines()
        .skip(1)
        .filter(|l| !l.trim().is_empty())
        .collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// What QEMU said while starting: its stderr since the last start and its `-D` log.
fn start_log(paths: &VmPaths) -> String {
    let debug = std::fs::read_to_string(&paths.debug_log).unwrap_or_default();
    let said = [last_run_log(&paths.qemu_log), debug.trim().to_owned()];
    said.into_iter()
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join("\n")
}

fn remove_file_if_exists(path: &Path) -> Result<(), HypervisorError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io(format!("removing {}", path.display()))(e)),
    }
}

fn io(what: String) -> impl FnOnce(std::io::Error) -> HypervisorError {
    move |source| HypervisorError::Io { what, source }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::configdrive::ConfigDrive;
    use crate::hypervisor::{DirectKernel, DiskFormat, Nic};

    fn spec() -> VmSpec {
        VmSpec {
            uid: "0b5c3a52-5a9e-4d35-8a1e-2f1c0f3b1a01".into(),
            name: "web-1".into(),
            vcpus: 2,
            memory_mib: 256,
            boot_disk: Some(BootDisk {
                base: "/images/base.raw".into(),
                base_format: DiskFormat::Raw,
                size_bytes: None,
            }),
            kernel: Some(DirectKernel {
                kernel: "/images/vmlinux".into(),
                initrd: Some("/images/initrd".into()),
                cmdline: "console=ttyS0 quiet".into(),
            }),
            config_drive: Some(ConfigDrive::default()),
            nics: vec![
                Nic {
                    id: "7d1e0c2a-1b2c-4d5e-8f90-a1b2c3d4e5f6".into(),
                    tap: "tap7d1e0c2a-1b".into(),
                    mac: "52:54:00:12:34:56".into(),
                },
                Nic {
                    id: "01a2b3c4-0000-4000-8000-000000000002".into(),
                    tap: "tap01a2b3c4-00".into(),
                    mac: "52:54:00:12:34:57".into(),
                },
            ],
            disks: vec![],
            labels: Default::default(),
        }
    }

    const VOLUME: &str = "5e6f7a8b-9c0d-4e1f-a2b3-c4d5e6f7a8b9";

    fn file_disk(id: &str, path: &str) -> Disk {
        Disk {
            id: id.into(),
            source: DiskSource::File {
                path: path.into(),
                format: DiskFormat::Qcow2,
            },
            serial: id.chars().take(20).collect(),
            read_only: false,
        }
    }

    fn nbd_disk(id: &str) -> Disk {
        Disk {
            id: id.into(),
            source: DiskSource::Nbd {
                host: "10.0.0.2".into(),
                port: 10809,
                export: format!("volume-{id}"),
            },
            serial: id.chars().take(20).collect(),
            read_only: true,
        }
    }

    fn args_of(spec: &VmSpec, accel: Accel) -> Vec<String> {
        let paths = VmPaths::new(Path::new("/var/lib/ferro/vms"), &spec.uid);
        command_line(spec, &paths, accel, 3, true)
            .unwrap()
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect()
    }

    fn value_of<'a>(args: &'a [String], flag: &str) -> Vec<&'a str> {
        args.windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].as_str())
            .collect()
    }

    #[test]
    fn command_line_names_the_vm_and_daemonizes_with_a_pidfile() {
        let args = args_of(&spec(), Accel::Tcg);
        let dir = "/var/lib/ferro/vms/0b5c3a52-5a9e-4d35-8a1e-2f1c0f3b1a01";
        assert_eq!(
            value_of(&args, "-name"),
            ["ferro-0b5c3a52-5a9e-4d35-8a1e-2f1c0f3b1a01"]
        );
        assert_eq!(
            value_of(&args, "-uuid"),
            ["0b5c3a52-5a9e-4d35-8a1e-2f1c0f3b1a01"]
        );
        assert!(args.contains(&"-daemonize".to_owned()));
        assert_eq!(value_of(&args, "-pidfile"), [format!("{dir}/qemu.pid")]);
        assert_eq!(value_of(&args, "-machine"), ["q35"]);
        assert_eq!(value_of(&args, "-accel"), ["tcg"]);
        assert_eq!(value_of(&args, "-cpu"), ["qemu64"]);
        assert_eq!(value_of(&args, "-smp"), ["2"]);
        assert_eq!(value_of(&args, "-m"), ["256M"]);
        assert!(
            value_of(&args, "-chardev")
                .iter()
                .any(|c| c.starts_with("socket,id=console,")
                    && c.contains(&format!("logfile={dir}/serial.log")))
        );
        assert_eq!(value_of(&args, "-serial"), ["chardev:console"]);
    }

    #[test]
    fn command_line_boots_the_kernel_from_the_overlay_with_the_config_drive() {
        let args = args_of(&spec(), Accel::Kvm);
        assert_eq!(value_of(&args, "-cpu"), ["host"]);
        assert_eq!(value_of(&args, "-kernel"), ["/images/vmlinux"]);
        assert_eq!(value_of(&args, "-initrd"), ["/images/initrd"]);
        assert_eq!(value_of(&args, "-append"), ["console=ttyS0 quiet"]);
        let blockdevs: Vec<Value> = value_of(&args, "-blockdev")
            .iter()
            .map(|b| serde_json::from_str(b).unwrap())
            .collect();
        assert_eq!(blockdevs[0]["driver"], "qcow2");
        assert!(
            blockdevs[0]["file"]["filename"]
                .as_str()
                .unwrap()
                .ends_with("/disk.qcow2")
        );
        assert_eq!(blockdevs[1]["read-only"], true);
        assert!(
            blockdevs[1]["file"]["filename"]
                .as_str()
                .unwrap()
                .ends_with("/config-2.iso")
        );
        let devices = value_of(&args, "-device");
        let boot = devices
            .iter()
            .position(|d| d.contains("drive=disk-boot"))
            .unwrap();
        let config = devices
            .iter()
            .position(|d| d.contains("drive=disk-config"))
            .unwrap();
        assert!(boot < config, "the boot disk must come first: {devices:?}");
    }

    #[test]
    fn command_line_puts_each_nic_on_a_root_port_of_its_own_named_by_its_id() {
        let args = args_of(&spec(), Accel::Tcg);
        let devices = value_of(&args, "-device");
        // Two ports for the two NICs, three spare; fixed slots from 0x10 on.
        let ports: Vec<_> = devices
            .iter()
            .filter(|d| d.starts_with("pcie-root-port"))
            .collect();
        assert_eq!(
            ports,
            [
                &"pcie-root-port,id=hotplug0,chassis=1,addr=0x10",
                &"pcie-root-port,id=hotplug1,chassis=2,addr=0x11",
                &"pcie-root-port,id=hotplug2,chassis=3,addr=0x12",
                &"pcie-root-port,id=hotplug3,chassis=4,addr=0x13",
                &"pcie-root-port,id=hotplug4,chassis=5,addr=0x14",
            ]
        );
        assert_eq!(
            value_of(&args, "-netdev"),
            [
                "tap,id=net-7d1e0c2a-1b2c-4d5e-8f90-a1b2c3d4e5f6,ifname=tap7d1e0c2a-1b,script=no,downscript=no",
                "tap,id=net-01a2b3c4-0000-4000-8000-000000000002,ifname=tap01a2b3c4-00,script=no,downscript=no",
            ]
        );
        let nics: Vec<_> = devices
            .iter()
            .filter(|d| d.starts_with("virtio-net-pci"))
            .collect();
        // In spec order, on the first ports: the order the guest finds them in.
        assert_eq!(
            nics,
            [
                &"virtio-net-pci,id=nic-7d1e0c2a-1b2c-4d5e-8f90-a1b2c3d4e5f6,\
                  netdev=net-7d1e0c2a-1b2c-4d5e-8f90-a1b2c3d4e5f6,mac=52:54:00:12:34:56,\
                  bus=hotplug0,addr=0",
                &"virtio-net-pci,id=nic-01a2b3c4-0000-4000-8000-000000000002,\
                  netdev=net-01a2b3c4-0000-4000-8000-000000000002,mac=52:54:00:12:34:57,\
                  bus=hotplug1,addr=0",
            ]
        );
        // A port is defined before the NIC that sits on it.
        let first_nic = devices
            .iter()
            .position(|d| d.starts_with("virtio-net"))
            .unwrap();
        let last_port = devices
            .iter()
            .rposition(|d| d.starts_with("pcie-root"))
            .unwrap();
        assert!(last_port < first_nic, "{devices:?}");
        // Dropping the first NIC renames nothing of the second.
        let fewer = VmSpec {
            nics: spec().nics[1..].to_vec(),
            ..spec()
        };
        let args = args_of(&fewer, Accel::Tcg);
        assert!(value_of(&args, "-device").iter().any(|d| d.starts_with(
            "virtio-net-pci,id=nic-01a2b3c4-0000-4000-8000-000000000002,\
             netdev=net-01a2b3c4-0000-4000-8000-000000000002,"
        )));
    }

    #[test]
    fn root_ports_never_outnumber_the_free_slots() {
        let paths = VmPaths::new(Path::new("/v"), "vm1");
        let nics: Vec<Nic> = (0..MAX_DEVICES)
            .map(|i| Nic {
                id: format!("p{i}"),
                tap: format!("tap{i}"),
                mac: format!("52:54:00:00:00:{i:02x}"),
            })
            .collect();
        let args: Vec<String> =
            command_line(&VmSpec { nics, ..spec() }, &paths, Accel::Tcg, 4, true)
                .unwrap()
                .into_iter()
                .map(|a| a.into_string().unwrap())
                .collect();
        let ports = value_of(&args, "-device")
            .into_iter()
            .filter(|d| d.starts_with("pcie-root-port"))
            .count();
        assert_eq!(ports, MAX_DEVICES);
        assert!(args.iter().any(|a| a.ends_with("addr=0x1e")));
        // NICs and disks together, the same.
        let disks: Vec<Disk> = (0..10)
            .map(|i| file_disk(&format!("v{i}"), &format!("/v/{i}.qcow2")))
            .collect();
        let nics = spec().nics;
        let args: Vec<String> = command_line(
            &VmSpec {
                nics,
                disks,
                ..spec()
            },
            &paths,
            Accel::Tcg,
            4,
            true,
        )
        .unwrap()
        .into_iter()
        .map(|a| a.into_string().unwrap())
        .collect();
        let devices = value_of(&args, "-device");
        let ports = devices
            .iter()
            .filter(|d| d.starts_with("pcie-root-port"))
            .count();
        assert_eq!(ports, 2 + 10 + 3);
        assert!(devices.iter().any(|d| d.ends_with("bus=hotplug11,addr=0")));
    }

    #[test]
    fn without_a_boot_disk_or_kernel_the_first_data_disk_boots() {
        let from_volume = VmSpec {
            boot_disk: None,
            kernel: None,
            disks: vec![file_disk(VOLUME, "/v/boot.qcow2"), nbd_disk("v2")],
            ..spec()
        };
        crate::hypervisor::validate_spec(&from_volume).unwrap();
        let args = args_of(&from_volume, Accel::Tcg);
        let booting: Vec<_> = value_of(&args, "-device")
            .into_iter()
            .filter(|d| d.contains("bootindex"))
            .collect();
        assert_eq!(booting.len(), 1, "{booting:?}");
        assert!(booting[0].starts_with(&format!("virtio-blk-pci,id=vol-{VOLUME}")));
        // With a kernel, the kernel boots and no disk claims the boot index.
        let with_kernel = VmSpec {
            boot_disk: None,
            ..from_volume.clone()
        };
        let with_kernel = VmSpec {
            kernel: spec().kernel,
            ..with_kernel
        };
        let args = args_of(&with_kernel, Accel::Tcg);
        assert!(
            !value_of(&args, "-device")
                .iter()
                .any(|d| d.contains("bootindex"))
        );
    }

    #[test]
    fn command_line_puts_each_disk_on_a_port_after_the_nics() {
        let with_disks = VmSpec {
            disks: vec![
                file_disk(VOLUME, "/var/lib/ferro/volumes/a,b.qcow2"),
                nbd_disk("v2"),
            ],
            ..spec()
        };
        let args = args_of(&with_disks, Accel::Tcg);
        let devices = value_of(&args, "-device");
        // Two NICs, two disks, three spare.
        let ports: Vec<_> = devices
            .iter()
            .filter(|d| d.starts_with("pcie-root-port"))
            .collect();
        assert_eq!(ports.len(), 7);
        assert!(ports[6].ends_with("addr=0x16"), "{ports:?}");
        // The NICs keep the first ports; the boot disk and config drive stay on the
        // root bus, so the guest still finds them first.
        assert!(
            devices
                .iter()
                .any(|d| d.starts_with("virtio-net-pci,id=nic-7d1e0c2a")
                    && d.ends_with("bus=hotplug0,addr=0"))
        );
        assert!(devices.contains(&"virtio-blk-pci,id=vd-config,drive=disk-config"));
        let disks: Vec<_> = devices
            .iter()
            .filter(|d| d.starts_with("virtio-blk-pci,id=vol-"))
            .collect();
        assert_eq!(
            disks,
            [
                &"virtio-blk-pci,id=vol-5e6f7a8b-9c0d-4e1f-a2b3-c4d5e6f7a8b9,\
                  drive=volume-5e6f7a8b.e12b03340ad3ca,serial=5e6f7a8b-9c0d-4e1f-a,\
                  bus=hotplug2,addr=0",
                &"virtio-blk-pci,id=vol-v2,drive=volume-v2,serial=v2,bus=hotplug3,addr=0",
            ]
        );
        let blockdevs: Vec<Value> = value_of(&args, "-blockdev")
            .iter()
            .map(|b| serde_json::from_str(b).unwrap())
            .collect();
        assert_eq!(blockdevs.len(), 4, "boot, config and two volumes");
        // JSON needs no escaping of the comma in the path.
        assert_eq!(
            blockdevs[2],
            json!({
                "driver": "qcow2",
                "node-name": "volume-5e6f7a8b.e12b03340ad3ca",
                "read-only": false,
                "cache": {"direct": false},
                "file": {
                    "driver": "file",
                    "node-name": "volfile-5e6f7a8b.e12b03340ad3ca",
                    "filename": "/var/lib/ferro/volumes/a,b.qcow2",
                    "read-only": false,
                    "cache": {"direct": false},
                },
            })
        );
        assert_eq!(
            blockdevs[3],
            json!({
                "driver": "raw",
                "node-name": "volume-v2",
                "read-only": true,
                "cache": {"direct": false},
                "file": {
                    "driver": "nbd",
                    "node-name": "volfile-v2",
                    "server": {"type": "inet", "host": "10.0.0.2", "port": "10809"},
                    "export": "volume-v2",
                    "reconnect-delay": NBD_RECONNECT_DELAY,
                    "read-only": true,
                    "cache": {"direct": false},
                },
            })
        );
        // Each volume's node is defined before the device that reads it.
        let position = |needle: &str| args.iter().position(|a| a.contains(needle)).unwrap();
        assert!(position("\"node-name\":\"volume-v2\"") < position("id=vol-v2"));
        // Without NICs, the disks take the first ports; a relative path is made absolute;
        // a disk without a serial gets none.
        let alone = VmSpec {
            nics: vec![],
            disks: vec![Disk {
                serial: String::new(),
                ..file_disk("v1", "v1.qcow2")
            }],
            ..spec()
        };
        let args = args_of(&alone, Accel::Tcg);
        assert!(
            value_of(&args, "-device")
                .contains(&"virtio-blk-pci,id=vol-v1,drive=volume-v1,bus=hotplug0,addr=0")
        );
        let node: Value = serde_json::from_str(value_of(&args, "-blockdev")[2]).unwrap();
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(
            node["file"]["filename"],
            cwd.join("v1.qcow2").to_str().unwrap()
        );
    }

    #[test]
    fn block_node_names_fit_qemus_31_bytes_and_stay_apart() {
        assert_eq!(volume_node("v1"), "volume-v1");
        assert_eq!(volume_file_node("v1"), "volfile-v1");
        let longest_plain = "a".repeat(MAX_PLAIN_NODE_KEY);
        assert_eq!(volume_file_node(&longest_plain).len(), 31);
        assert_eq!(
            volume_node(&longest_plain),
            format!("volume-{longest_plain}")
        );
        for id in [VOLUME, &"b".repeat(64), &"a".repeat(MAX_PLAIN_NODE_KEY + 1)] {
            let (node, file) = (volume_node(id), volume_file_node(id));
            assert!(node.len() <= 31 && file.len() <= 31, "{node} {file}");
            assert!(node.starts_with(&format!("volume-{}.", &id[..8])), "{node}");
        }
        // Ids that share a prefix get keys of their own.
        let twin = "5e6f7a8b-9c0d-4e1f-a2b3-c4d5e6f7a8ba";
        assert_ne!(volume_node(VOLUME), volume_node(twin));
        assert_eq!(disk_device_id(VOLUME), format!("vol-{VOLUME}"));
    }

    #[test]
    fn nbd_sources_read_back_from_qemus_filenames() {
        let nbd = |host: &str, port, export: &str| DiskSource::Nbd {
            host: host.into(),
            port,
            export: export.into(),
        };
        assert_eq!(
            nbd_source("nbd://10.0.0.2:10809/volume-v1"),
            Some(nbd("10.0.0.2", 10809, "volume-v1"))
        );
        // QEMU 7.2 writes an IPv6 host without brackets.
        assert_eq!(
            nbd_source("nbd://::1:10898/vol-b"),
            Some(nbd("::1", 10898, "vol-b"))
        );
        assert_eq!(
            nbd_source("nbd://[fd00::2]:10809/a/b"),
            Some(nbd("fd00::2", 10809, "a/b"))
        );
        let json = r#"json:{"driver": "raw", "file": {"driver": "nbd", "export": "e", "server": {"type": "inet", "host": "storage-1", "port": "10809"}}}"#;
        assert_eq!(nbd_source(json), Some(nbd("storage-1", 10809, "e")));
        assert_eq!(nbd_source("/var/lib/x.raw"), None);
        assert_eq!(
            nbd_source(r#"json:{"driver": "nbd", "server": {"type": "unix", "path": "/s"}}"#),
            None
        );
    }

    #[test]
    fn command_line_leaves_out_what_the_spec_does_not_ask_for() {
        let bare = VmSpec {
            uid: "vm1".into(),
            boot_disk: None,
            config_drive: None,
            nics: vec![],
            ..spec()
        };
        let args = args_of(&bare, Accel::Tcg);
        assert!(value_of(&args, "-uuid").is_empty());
        assert!(value_of(&args, "-blockdev").is_empty());
        assert!(value_of(&args, "-netdev").is_empty());
    }

    #[test]
    fn commas_in_paths_are_escaped_in_options() {
        assert_eq!(
            opt_value(Path::new("/a,b/qmp.sock")).unwrap(),
            "/a,,b/qmp.sock"
        );
    }

    #[test]
    fn the_log_of_the_last_run_is_what_follows_the_last_start_mark() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("qemu.log");
        std::fs::write(
            &log,
            format!("{START_MARK} (accel tcg)\nold news\n{START_MARK} (accel tcg)\nqemu: terminating on signal 15\n"),
        )
        .unwrap();
        assert_eq!(last_run_log(&log), "qemu: terminating on signal 15");
        assert_eq!(last_run_log(&dir.path().join("missing")), "");
    }

    /// A device of the fake QEMU.
    #[derive(Debug, Clone, Default)]
    struct FakeDevice {
        /// The QOM type, e.g. `virtio-net-pci`.
        kind: String,
        /// The root port it sits on.
        port: String,
        /// A NIC's MAC and tap backend.
        mac: String,
        netdev: String,
        /// A disk's block node and serial.
        drive: String,
        serial: String,
    }

    /// A block node of the fake QEMU.
    #[derive(Debug, Clone)]
    struct FakeNode {
        driver: String,
        filename: String,
        read_only: bool,
        size: u64,
        /// The node this one was created inline under; such a node goes with its parent
        /// and cannot be deleted on its own.
        parent: Option<String>,
    }

    /// A fake QEMU behind a QMP socket, modelling what hot-plug touches: root ports,
    /// devices on them, tap backends, block nodes. The guest releases an unplugged device
    /// after `release_after` further QMP sessions (never, when `None`).
    #[derive(Default)]
    struct FakeQemu {
        ports: Vec<String>,
        devices: BTreeMap<String, FakeDevice>,
        /// Backend id -> tap.
        netdevs: BTreeMap<String, String>,
        /// Block nodes by name.
        nodes: BTreeMap<String, FakeNode>,
        /// Device id -> sessions left before the guest lets go.
        unplugging: BTreeMap<String, u32>,
        release_after: Option<u32>,
        /// Whether `device_add` fails.
        refuse_devices: bool,
        /// Every command but the capabilities negotiation, with its arguments.
        log: Vec<(String, Value)>,
    }

    impl FakeQemu {
        fn new_session(&mut self) {
            for left in self.unplugging.values_mut() {
                *left = left.saturating_sub(1);
            }
            let released: Vec<_> = self
                .unplugging
                .iter()
                .filter(|(_, left)| **left == 0)
                .map(|(id, _)| id.clone())
                .collect();
            for id in released {
                self.unplugging.remove(&id);
                self.devices.remove(&id);
            }
        }

        /// The filename QEMU 7.2 gives a node with these options.
        fn filename(options: &Value) -> String {
            match options["driver"].as_str() {
                Some("file") => options["filename"].as_str().unwrap_or_default().to_owned(),
                Some("nbd") => format!(
                    "nbd://{}:{}/{}",
                    options["server"]["host"].as_str().unwrap_or_default(),
                    options["server"]["port"].as_str().unwrap_or_default(),
                    options["export"].as_str().unwrap_or_default()
                ),
                _ => Self::filename(&options["file"]),
            }
        }

        /// `blockdev-add`: the node and, inline, its protocol node.
        fn add_node(&mut self, options: &Value, parent: Option<String>) -> Result<(), String> {
            let name = match options["node-name"].as_str() {
                Some(name) => name.to_owned(),
                None => format!("#block{}", self.nodes.len()),
            };
            if name.len() > 31 {
                return Err("Node name too long".into());
            }
            if self.nodes.contains_key(&name) {
                return Err(format!("Duplicate nodes with node-name='{name}'"));
            }
            if options["file"].is_object() {
                self.add_node(&options["file"], Some(name.clone()))?;
            }
            self.nodes.insert(
                name,
                FakeNode {
                    driver: options["driver"].as_str().unwrap_or_default().to_owned(),
                    filename: Self::filename(options),
                    read_only: options["read-only"].as_bool().unwrap_or(false),
                    size: 64 << 20,
                    parent,
                },
            );
            Ok(())
        }

        fn answer(&mut self, command: &str, args: &Value) -> Value {
            let error = |desc: &str| json!({"error": {"class": "GenericError", "desc": desc}});
            if command != "qmp_capabilities" {
                self.log.push((command.to_owned(), args.clone()));
            }
            let arg = |name: &str| args[name].as_str().unwrap_or_default().to_owned();
            match command {
                "qmp_capabilities" => json!({"return": {}}),
                "qom-list" => {
                    let mut list: Vec<Value> = self
                        .ports
                        .iter()
                        .map(|p| json!({"name": p, "type": "child<pcie-root-port>"}))
                        .collect();
                    list.push(json!({"name": "vd-boot", "type": "child<virtio-blk-pci>"}));
                    for (id, device) in &self.devices {
                        list.push(json!({"name": id, "type": format!("child<{}>", device.kind)}));
                    }
                    json!({ "return": list })
                }
                "qom-get" => {
                    let name = arg("path").rsplit('/').next().unwrap().to_owned();
                    if name == "vd-boot" {
                        return json!({"return": "/machine/q35/pcie.0"});
                    }
                    let Some(device) = self.devices.get(&name) else {
                        return error("no such device");
                    };
                    let nic = device.kind == "virtio-net-pci";
                    match arg("property").as_str() {
                        "parent_bus" => {
                            json!({"return": format!("/machine/peripheral/{0}/{0}", device.port)})
                        }
                        "mac" if nic => json!({ "return": device.mac }),
                        "netdev" if nic => json!({ "return": device.netdev }),
                        "drive" if !nic => json!({ "return": device.drive }),
                        "serial" if !nic => json!({ "return": device.serial }),
                        _ => error("no such property"),
                    }
                }
                "human-monitor-command" => {
                    let mut text = String::new();
                    for (id, device) in &self.devices {
                        if device.kind != "virtio-net-pci" {
                            continue;
                        }
                        text += &format!(
                            "{id}: index=0,type=nic,model=virtio-net-pci,macaddr={}\r\n",
                            device.mac
                        );
                        if let Some(tap) = self.netdevs.get(&device.netdev) {
                            text += &format!(
                                " \\ {}: index=0,type=tap,ifname={tap},script=no,downscript=no\r\n",
                                device.netdev
                            );
                        }
                    }
                    for (netdev, tap) in &self.netdevs {
                        if !self.devices.values().any(|d| d.netdev == *netdev) {
                            text += &format!(
                                "{netdev}: index=0,type=tap,ifname={tap},script=no,downscript=no\r\n"
                            );
                        }
                    }
                    json!({ "return": text })
                }
                "query-named-block-nodes" => {
                    let nodes: Vec<Value> = self
                        .nodes
                        .iter()
                        .map(|(name, node)| {
                            json!({
                                "node-name": name,
                                "drv": node.driver,
                                "file": node.filename,
                                "ro": node.read_only,
                                "image": {
                                    "virtual-size": node.size,
                                    "filename": node.filename,
                                    "format": node.driver,
                                },
                            })
                        })
                        .collect();
                    json!({ "return": nodes })
                }
                "netdev_add" => {
                    if self.netdevs.contains_key(&arg("id")) {
                        return error("Duplicate ID");
                    }
                    self.netdevs.insert(arg("id"), arg("ifname"));
                    json!({"return": {}})
                }
                "netdev_del" => match self.netdevs.remove(&arg("id")) {
                    Some(_) => json!({"return": {}}),
                    None => error("Device not found"),
                },
                "blockdev-add" => match self.add_node(args, None) {
                    Ok(()) => json!({"return": {}}),
                    Err(e) => error(&e),
                },
                "blockdev-del" => {
                    let name = arg("node-name");
                    let Some(node) = self.nodes.get(&name) else {
                        return error(&format!("Failed to find node with node-name='{name}'"));
                    };
                    if node.parent.is_some() {
                        return error(&format!("Node {name} is not owned by the monitor"));
                    }
                    if self.devices.values().any(|d| d.drive == name) {
                        return error(&format!("Node {name} is in use"));
                    }
                    self.nodes
                        .retain(|n, node| *n != name && node.parent.as_deref() != Some(&name));
                    json!({"return": {}})
                }
                "block_resize" => match self.nodes.get_mut(&arg("node-name")) {
                    // As QEMU, it shrinks as readily as it grows.
                    Some(node) => {
                        node.size = args["size"].as_u64().unwrap();
                        json!({"return": {}})
                    }
                    None => error("Cannot find device"),
                },
                "device_add" => {
                    if self.refuse_devices {
                        return error("refused");
                    }
                    let port = arg("bus");
                    if self.devices.values().any(|d| d.port == port) {
                        return error("PCI: slot 0 function 0 not available");
                    }
                    let drive = arg("drive");
                    if !drive.is_empty() && !self.nodes.contains_key(&drive) {
                        return error(&format!(
                            "Property 'virtio-blk-device.drive' can't find value '{drive}'"
                        ));
                    }
                    let device = FakeDevice {
                        kind: arg("driver"),
                        port,
                        mac: arg("mac"),
                        netdev: arg("netdev"),
                        drive,
                        serial: arg("serial"),
                    };
                    self.devices.insert(arg("id"), device);
                    json!({"return": {}})
                }
                "device_del" => {
                    let id = arg("id");
                    if self.unplugging.contains_key(&id) {
                        return error(&format!("Device {id} is already in the process of unplug"));
                    }
                    if let Some(after) = self.release_after {
                        self.unplugging.insert(id, after);
                    }
                    json!({"return": {}})
                }
                other => error(&format!("unexpected command {other}")),
            }
        }
    }

    /// Serves `fake` on a QMP socket in `dir`, one session after another.
    fn serve(dir: &Path, fake: Arc<Mutex<FakeQemu>>) -> PathBuf {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
        let path = dir.join("qmp.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                fake.lock().unwrap().new_session();
                let (read, mut write) = stream.into_split();
                let mut lines = BufReader::new(read).lines();
                write
                    .write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\r\n")
                    .await
                    .unwrap();
                while let Ok(Some(line)) = lines.next_line().await {
                    let request: Value = serde_json::from_str(&line).unwrap();
                    let mut reply = fake
                        .lock()
                        .unwrap()
                        .answer(request["execute"].as_str().unwrap(), &request["arguments"]);
                    reply["id"] = request["id"].clone();
                    write
                        .write_all(format!("{reply}\r\n").as_bytes())
                        .await
                        .unwrap();
                }
            }
        });
        path
    }

    fn fake_with_one_nic() -> FakeQemu {
        let mut fake = FakeQemu {
            ports: (0..3).map(port_id).collect(),
            release_after: Some(2),
            ..FakeQemu::default()
        };
        fake.devices.insert(
            "nic-p1".into(),
            FakeDevice {
                kind: "virtio-net-pci".into(),
                port: "hotplug0".into(),
                mac: "52:54:00:00:00:01".into(),
                netdev: "net-p1".into(),
                ..FakeDevice::default()
            },
        );
        fake.netdevs.insert("net-p1".into(), "tapp1".into());
        fake
    }

    fn nic(id: &str, mac_last: u8) -> Nic {
        Nic {
            id: id.into(),
            tap: format!("tap{id}"),
            mac: format!("52:54:00:00:00:{mac_last:02x}"),
        }
    }

    fn commands(fake: &Mutex<FakeQemu>) -> Vec<String> {
        let mut fake = fake.lock().unwrap();
        std::mem::take(&mut fake.log)
            .into_iter()
            .map(|(c, _)| c)
            .filter(|c| {
                !matches!(
                    c.as_str(),
                    "qom-list" | "qom-get" | "human-monitor-command" | "query-named-block-nodes"
                )
            })
            .collect()
    }

    #[test]
    fn tap_backends_are_read_from_info_network() {
        let info = "nic-p1: index=0,type=nic,model=virtio-net-pci,macaddr=52:54:00:00:00:01\r\n \
                    \\ net-p1: index=0,type=tap,ifname=tapp1,script=no,downscript=no\r\n\
                    net-p2: index=0,type=tap,ifname=tapp2,script=no,downscript=no\r\n";
        assert_eq!(
            tap_backends(info),
            BTreeMap::from([
                ("net-p1".to_owned(), "tapp1".to_owned()),
                ("net-p2".to_owned(), "tapp2".to_owned()),
            ])
        );
    }

    #[tokio::test]
    async fn hot_plug_reads_the_ports_from_qemu_and_takes_a_free_one() {
        let dir = tempfile::tempdir().unwrap();
        let fake = Arc::new(Mutex::new(fake_with_one_nic()));
        let qmp = serve(dir.path(), fake.clone());
        let timeout = Duration::from_secs(5);
        let mut session = Session::open(&qmp, timeout).await.unwrap();

        let layout = read_layout(&mut session).await.unwrap();
        assert_eq!(
            layout.nics,
            [PluggedNic {
                nic: nic("p1", 1),
                port: Some(0)
            }]
        );
        assert_eq!(layout.free_ports, [1, 2]);

        assert!(
            plug_nic(&mut session, "vm1", &nic("p2", 2), true)
                .await
                .unwrap()
        );
        assert_eq!(commands(&fake), ["netdev_add", "device_add"]);
        let added = fake.lock().unwrap().devices["nic-p2"].clone();
        assert_eq!(added.port, "hotplug1", "the lowest free port");
        // Plugging it again changes nothing; the same id with another MAC is refused.
        assert!(
            !plug_nic(&mut session, "vm1", &nic("p2", 2), true)
                .await
                .unwrap()
        );
        assert!(commands(&fake).is_empty());
        let conflict = plug_nic(&mut session, "vm1", &nic("p2", 9), true)
            .await
            .unwrap_err();
        assert!(
            matches!(conflict, HypervisorError::NicConflict { .. }),
            "{conflict}"
        );
        // The last port, then none.
        plug_nic(&mut session, "vm1", &nic("p3", 3), true)
            .await
            .unwrap();
        let full = plug_nic(&mut session, "vm1", &nic("p4", 4), true)
            .await
            .unwrap_err();
        assert!(matches!(full, HypervisorError::NoFreePort { .. }), "{full}");
        assert!(!fake.lock().unwrap().netdevs.contains_key("net-p4"));
        let layout = read_layout(&mut session).await.unwrap();
        let ids: Vec<_> = layout.nics.iter().map(|p| p.nic.id.as_str()).collect();
        assert_eq!(ids, ["p1", "p2", "p3"], "in port order");
    }

    #[tokio::test]
    async fn a_backend_left_behind_is_replaced_and_a_refused_device_leaves_none() {
        let dir = tempfile::tempdir().unwrap();
        let mut fake = fake_with_one_nic();
        fake.netdevs.insert("net-p2".into(), "tapold".into());
        let fake = Arc::new(Mutex::new(fake));
        let qmp = serve(dir.path(), fake.clone());
        let mut session = Session::open(&qmp, Duration::from_secs(5)).await.unwrap();
        plug_nic(&mut session, "vm1", &nic("p2", 2), true)
            .await
            .unwrap();
        assert_eq!(commands(&fake), ["netdev_del", "netdev_add", "device_add"]);
        assert_eq!(fake.lock().unwrap().netdevs["net-p2"], "tapp2");

        // QEMU refuses the device (say, a MAC it will not take): no backend stays behind.
        fake.lock().unwrap().refuse_devices = true;
        let refused = plug_nic(&mut session, "vm1", &nic("p3", 3), true)
            .await
            .unwrap_err();
        assert!(
            matches!(refused, HypervisorError::Control { .. }),
            "{refused}"
        );
        assert_eq!(commands(&fake), ["netdev_add", "device_add", "netdev_del"]);
        assert!(!fake.lock().unwrap().netdevs.contains_key("net-p3"));
    }

    #[tokio::test]
    async fn unplug_waits_for_the_guest_then_removes_the_backend() {
        let dir = tempfile::tempdir().unwrap();
        let fake = Arc::new(Mutex::new(fake_with_one_nic()));
        let qmp = serve(dir.path(), fake.clone());
        let timeout = Duration::from_secs(5);
        unplugger(&qmp, timeout).nic("p1", || true).await.unwrap();
        assert_eq!(commands(&fake), ["device_del", "netdev_del"]);
        {
            let fake = fake.lock().unwrap();
            assert!(fake.devices.is_empty() && fake.netdevs.is_empty());
        }
        // Nothing there: nothing to do.
        unplugger(&qmp, timeout).nic("p1", || true).await.unwrap();
        assert!(commands(&fake).is_empty());
    }

    #[tokio::test]
    async fn an_unplug_the_guest_ignores_times_out_and_a_retry_waits_again() {
        let dir = tempfile::tempdir().unwrap();
        let mut fake = fake_with_one_nic();
        fake.release_after = Some(1_000);
        let fake = Arc::new(Mutex::new(fake));
        let qmp = serve(dir.path(), fake.clone());
        let timeout = Duration::from_secs(5);
        let error = Unplug {
            unplug_timeout: Duration::from_millis(300),
            ..unplugger(&qmp, timeout)
        }
        .nic("p1", || true)
        .await
        .unwrap_err();
        assert!(
            matches!(error, HypervisorError::UnplugTimeout { .. }),
            "{error}"
        );
        assert!(fake.lock().unwrap().netdevs.contains_key("net-p1"));
        // QEMU says the unplug is under way; the retry waits for it rather than fail.
        fake.lock().unwrap().unplugging.insert("nic-p1".into(), 3);
        unplugger(&qmp, timeout).nic("p1", || true).await.unwrap();
        assert!(fake.lock().unwrap().devices.is_empty());
    }

    fn unplugger(qmp: &Path, timeout: Duration) -> Unplug<'_> {
        Unplug {
            qmp,
            timeout,
            unplug_timeout: timeout,
            uid: "vm1",
        }
    }

    fn volume_nodes(fake: &Mutex<FakeQemu>) -> Vec<String> {
        fake.lock().unwrap().nodes.keys().cloned().collect()
    }

    #[tokio::test]
    async fn disks_hot_plug_on_free_ports_and_read_back_from_qemu() {
        let dir = tempfile::tempdir().unwrap();
        let fake = Arc::new(Mutex::new(fake_with_one_nic()));
        let qmp = serve(dir.path(), fake.clone());
        let mut session = Session::open(&qmp, Duration::from_secs(5)).await.unwrap();
        let local = file_disk(VOLUME, "/var/lib/ferro/volumes/v1.qcow2");

        assert!(plug_disk(&mut session, "vm1", &local).await.unwrap());
        assert_eq!(commands(&fake), ["blockdev-add", "device_add"]);
        {
            let fake = fake.lock().unwrap();
            let device = &fake.devices[&format!("vol-{VOLUME}")];
            assert_eq!(device.port, "hotplug1", "the lowest free port");
            assert_eq!(device.serial, "5e6f7a8b-9c0d-4e1f-a");
            assert_eq!(device.drive, volume_node(VOLUME));
        }
        // Asked again, nothing changes; another source, serial or mode is a conflict.
        assert!(!plug_disk(&mut session, "vm1", &local).await.unwrap());
        assert!(commands(&fake).is_empty());
        for other in [
            file_disk(VOLUME, "/var/lib/ferro/volumes/other.qcow2"),
            Disk {
                serial: "other".into(),
                ..local.clone()
            },
            Disk {
                read_only: true,
                ..local.clone()
            },
        ] {
            let conflict = plug_disk(&mut session, "vm1", &other).await.unwrap_err();
            assert!(
                matches!(&conflict, HypervisorError::DiskConflict { found, .. }
                    if found.contains("/var/lib/ferro/volumes/v1.qcow2")),
                "{conflict}"
            );
        }
        assert!(commands(&fake).is_empty());

        // An NBD export on the last port; both read back from QEMU as they were asked.
        let remote = nbd_disk("v2");
        assert!(plug_disk(&mut session, "vm1", &remote).await.unwrap());
        let layout = read_layout(&mut session).await.unwrap();
        let found: Vec<_> = layout.disks.iter().map(|p| (&p.disk, p.port)).collect();
        assert_eq!(found, [(&local, Some(1)), (&remote, Some(2))]);
        assert_eq!(layout.nics.len(), 1, "the NIC is still read as one");
        assert!(layout.free_ports.is_empty());
        // No port left, for a disk as for a NIC; nothing is left open for it.
        commands(&fake);
        let full = plug_disk(&mut session, "vm1", &file_disk("v3", "/v3.raw"))
            .await
            .unwrap_err();
        assert!(
            matches!(&full, HypervisorError::NoFreePort { device, .. } if device == "disk v3"),
            "{full}"
        );
        let full = plug_nic(&mut session, "vm1", &nic("p2", 2), true)
            .await
            .unwrap_err();
        assert!(
            matches!(&full, HypervisorError::NoFreePort { device, .. } if device == "NIC p2"),
            "{full}"
        );
        assert!(commands(&fake).is_empty());
        assert!(!volume_nodes(&fake).contains(&volume_node("v3")));
    }

    #[tokio::test]
    async fn a_volume_left_open_is_closed_first_and_a_refused_device_leaves_none() {
        let dir = tempfile::tempdir().unwrap();
        let mut fake = fake_with_one_nic();
        // An interrupted plug: the nodes are there, the device is not.
        let stale = file_disk("v1", "/old.qcow2");
        fake.add_node(&volume_blockdev(&stale).unwrap(), None)
            .unwrap();
        let fake = Arc::new(Mutex::new(fake));
        let qmp = serve(dir.path(), fake.clone());
        let mut session = Session::open(&qmp, Duration::from_secs(5)).await.unwrap();
        let disk = file_disk("v1", "/new.qcow2");
        plug_disk(&mut session, "vm1", &disk).await.unwrap();
        assert_eq!(
            commands(&fake),
            ["blockdev-del", "blockdev-add", "device_add"]
        );
        let layout = read_layout(&mut session).await.unwrap();
        assert_eq!(layout.disk("v1").unwrap().disk, disk);

        // QEMU refuses the device: the volume is closed again.
        fake.lock().unwrap().refuse_devices = true;
        let refused = plug_disk(&mut session, "vm1", &nbd_disk("v2"))
            .await
            .unwrap_err();
        assert!(
            matches!(refused, HypervisorError::Control { .. }),
            "{refused}"
        );
        assert_eq!(
            commands(&fake),
            ["blockdev-add", "device_add", "blockdev-del"]
        );
        assert_eq!(volume_nodes(&fake), ["volfile-v1", "volume-v1"]);
    }

    #[tokio::test]
    async fn a_disk_unplug_waits_for_the_guest_then_closes_the_volume() {
        let dir = tempfile::tempdir().unwrap();
        let fake = Arc::new(Mutex::new(fake_with_one_nic()));
        let qmp = serve(dir.path(), fake.clone());
        let timeout = Duration::from_secs(5);
        let mut session = Session::open(&qmp, timeout).await.unwrap();
        plug_disk(&mut session, "vm1", &file_disk(VOLUME, "/v1.qcow2"))
            .await
            .unwrap();
        plug_disk(&mut session, "vm1", &nbd_disk("v2"))
            .await
            .unwrap();
        drop(session);
        commands(&fake);

        unplugger(&qmp, timeout)
            .disk(VOLUME, || true)
            .await
            .unwrap();
        assert_eq!(commands(&fake), ["device_del", "blockdev-del"]);
        assert_eq!(volume_nodes(&fake), ["volfile-v2", "volume-v2"]);
        assert!(
            !fake
                .lock()
                .unwrap()
                .devices
                .contains_key(&disk_device_id(VOLUME))
        );
        // Nothing there: nothing to do.
        unplugger(&qmp, timeout)
            .disk(VOLUME, || true)
            .await
            .unwrap();
        assert!(commands(&fake).is_empty());

        // A guest that holds on: the unplug times out with the volume still open, and a
        // retry waits for the unplug already under way.
        fake.lock().unwrap().release_after = Some(1_000);
        let error = Unplug {
            unplug_timeout: Duration::from_millis(300),
            ..unplugger(&qmp, timeout)
        }
        .disk("v2", || true)
        .await
        .unwrap_err();
        assert!(
            matches!(&error, HypervisorError::UnplugTimeout { device, .. } if device == "disk v2"),
            "{error}"
        );
        assert_eq!(volume_nodes(&fake), ["volfile-v2", "volume-v2"]);
        fake.lock().unwrap().unplugging.insert("vol-v2".into(), 3);
        unplugger(&qmp, timeout).disk("v2", || true).await.unwrap();
        let fake = fake.lock().unwrap();
        assert!(fake.nodes.is_empty(), "{:?}", fake.nodes.keys());
        assert_eq!(fake.devices.len(), 1, "the NIC stays");
    }

    #[tokio::test]
    async fn a_disk_grows_on_the_node_its_device_reads_and_never_shrinks() {
        let dir = tempfile::tempdir().unwrap();
        let fake = Arc::new(Mutex::new(fake_with_one_nic()));
        let qmp = serve(dir.path(), fake.clone());
        let mut session = Session::open(&qmp, Duration::from_secs(5)).await.unwrap();
        plug_disk(&mut session, "vm1", &file_disk(VOLUME, "/v1.qcow2"))
            .await
            .unwrap();
        commands(&fake);

        assert!(
            grow_disk(&mut session, "vm1", VOLUME, 128 << 20)
                .await
                .unwrap()
        );
        let log = std::mem::take(&mut fake.lock().unwrap().log);
        let resize = log.iter().find(|(c, _)| c == "block_resize").unwrap();
        assert_eq!(
            resize.1,
            json!({"node-name": volume_node(VOLUME), "size": 128 << 20})
        );
        assert_eq!(
            fake.lock().unwrap().nodes[&volume_node(VOLUME)].size,
            128 << 20
        );
        // The same size again changes nothing; a smaller one is refused before QEMU
        // could shrink the disk.
        assert!(
            !grow_disk(&mut session, "vm1", VOLUME, 128 << 20)
                .await
                .unwrap()
        );
        let shrink = grow_disk(&mut session, "vm1", VOLUME, 64 << 20)
            .await
            .unwrap_err();
        assert!(
            matches!(
                shrink,
                HypervisorError::InvalidSpec {
                    field: "size_bytes",
                    ..
                }
            ),
            "{shrink}"
        );
        let missing = grow_disk(&mut session, "vm1", "nope", 1 << 30)
            .await
            .unwrap_err();
        assert!(
            matches!(missing, HypervisorError::NoSuchDisk { .. }),
            "{missing}"
        );
        assert!(commands(&fake).is_empty());
    }

    #[test]
    fn a_process_is_ours_only_with_our_name() {
        assert!(!is_vm_process(std::process::id(), "vm1"));
        assert!(!is_vm_process(u32::MAX, "vm1"));
    }
}
