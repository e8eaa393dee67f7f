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
//! The machine is a q35. Every NIC sits alone on a `pcie-root-port` (`hotplug<i>`, at a
//! fixed slot of the root bus), and a few more ports are spare: a device on the root bus
//! itself could never be unplugged, while one on a root port can, whether it was there at
//! start or hot-plugged later. Cold-plugged NICs take the first ports in [`VmSpec::nics`]
//! order, which is the order the guest finds them in. A NIC's QEMU names come from its
//! id (`net-<id>` for the tap backend, `nic-<id>` for the virtio-net device), never from
//! its position, so plugging or unplugging one renames no other.
//!
//! Hot-plug goes through QMP like every other request, under the VM's lock, in short
//! sessions (QEMU serves one QMP client at a time, and a long one would make the VM look
//! unresponsive to [`Hypervisor::status`]). Which ports are free and which NICs the VM
//! has are read from QEMU each time, never remembered: `qom-list /machine/peripheral`
//! names the devices and ports, each device's `parent_bus` says which port holds it,
//! `qom-get` gives a NIC's MAC and backend, and `info network` the backend's tap. An
//! unplug asks the guest (`device_del`), polls until QEMU has dropped the device, then
//! removes the backend (`netdev_del`). The NICs a VM has are also written back into
//! `vm.json`, so that the recorded spec always says what the VM runs with.
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
    Accel, BootDisk, Hypervisor, HypervisorError, MAX_NICS, Nic, StopOutcome, VmSpec, VmState,
    VmStatus, validate_nic, validate_spec, validate_uid,
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
    /// Spare `pcie-root-port`s for hot-plug, besides the one each cold-plugged NIC sits on
    /// (at most 15 ports in all).
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
    /// the NICs plugged and unplugged since. `None` when there is none.
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
        record_nics(&paths.spec, |nics| {
            match nics.iter_mut().find(|n| n.id == nic.id) {
                Some(recorded) => *recorded = nic.clone(),
                None => nics.push(nic.clone()),
            }
        })
    }

    async fn detach_nic(&self, uid: &str, nic_id: &str) -> Result<(), HypervisorError> {
        validate_uid(uid)?;
        let _guard = self.lock(uid).await;
        let paths = self.paths(uid);
        let pid = self.running_pid(&paths, uid)?;
        unplug_nic(
            &paths.qmp,
            self.config.control_timeout,
            self.config.unplug_timeout,
            uid,
            nic_id,
            || is_vm_process(pid, uid),
        )
        .await?;
        record_nics(&paths.spec, |nics| nics.retain(|n| n.id != nic_id))
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
    // A root port for each NIC and the spare ones, before the devices that sit on them.
    let ports = (spec.nics.len() + usize::from(hotplug_ports)).min(MAX_NICS);
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

/// What a running VM's root ports hold, as QEMU says.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct PortLayout {
    /// Ferro's NICs (devices named `nic-<id>`), by port.
    nics: Vec<PluggedNic>,
    /// Root ports that hold no device, lowest first.
    free_ports: Vec<usize>,
    /// Tap backends by id, with their interface name; a backend whose device is gone
    /// is still here until `netdev_del`.
    netdevs: BTreeMap<String, String>,
}

impl PortLayout {
    fn nic(&self, nic_id: &str) -> Option<&Nic> {
        self.nics.iter().map(|p| &p.nic).find(|n| n.id == nic_id)
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
    let mut ports = BTreeSet::new();
    let mut occupied = BTreeSet::new();
    let mut nics = Vec::new();
    for (name, kind) in session.peripherals().await? {
        if kind == "pcie-root-port" {
            if let Some(index) = port_index(&name) {
                ports.insert(index);
            }
            continue;
        }
        let path = format!("/machine/peripheral/{name}");
        // e.g. /machine/peripheral/hotplug2/hotplug2: a root port's bus is named after it.
        let bus = session.qom_string(&path, "parent_bus").await?;
        let port = bus.rsplit('/').next().and_then(port_index);
        occupied.extend(port);
        if kind != "virtio-net-pci" {
            continue;
        }
        let Some(id) = name.strip_prefix("nic-") else {
            continue;
        };
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
    nics.sort_by_key(|p| (p.port.is_none(), p.port));
    Ok(PortLayout {
        nics,
        free_ports: ports.difference(&occupied).copied().collect(),
        netdevs,
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
            nic: nic.id.clone(),
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

/// Unplugs NIC `nic_id`: `device_del`, then polls in short sessions (so that status
/// calls meanwhile get their turn on the socket) until QEMU has dropped the device, then
/// `netdev_del`. Gives up after `unplug_timeout`, or when `alive` says QEMU is gone.
async fn unplug_nic(
    qmp: &Path,
    timeout: Duration,
    unplug_timeout: Duration,
    uid: &str,
    nic_id: &str,
    alive: impl Fn() -> bool,
) -> Result<(), HypervisorError> {
    let control = |source| HypervisorError::Control {
        uid: uid.to_owned(),
        source,
    };
    let device = device_id(nic_id);
    let mut session = Session::open(qmp, timeout).await.map_err(control)?;
    let mut layout = read_layout(&mut session).await.map_err(control)?;
    if layout.nic(nic_id).is_some() {
        match session.run("device_del", json!({ "id": device })).await {
            Ok(_) => {}
            Err(e) if unplug_pending(&e) => {}
            Err(e) => return Err(control(e)),
        }
        drop(session);
        let waiting = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(UNPLUG_POLL).await;
            let mut session = Session::open(qmp, timeout).await.map_err(control)?;
            let present = session
                .peripherals()
                .await
                .map_err(control)?
                .iter()
                .any(|(name, _)| *name == device);
            if !present {
                break;
            }
            if waiting.elapsed() >= unplug_timeout || !alive() {
                return Err(HypervisorError::UnplugTimeout {
                    uid: uid.to_owned(),
                    nic: nic_id.to_owned(),
                    waited: waiting.elapsed(),
                });
            }
        }
        tracing::info!(uid, nic = nic_id, waited = ?waiting.elapsed(), "NIC unplugged");
        session = Session::open(qmp, timeout).await.map_err(control)?;
        layout = read_layout(&mut session).await.map_err(control)?;
    }
    let netdev = netdev_id(nic_id);
    if layout.netdevs.contains_key(&netdev) {
        session
            .run("netdev_del", json!({ "id": netdev }))
            .await
            .map_err(control)?;
    }
    Ok(())
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

/// Changes the NICs of the spec recorded in `vm.json`, so a cold start of it brings the
/// VM back with the NICs it has now.
fn record_nics(path: &Path, change: impl FnOnce(&mut Vec<Nic>)) -> Result<(), HypervisorError> {
    let mut spec = read_recorded(path)?;
    let before = spec.nics.clone();
    change(&mut spec.nics);
    if spec.nics == before {
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
            labels: Default::default(),
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
        let nics: Vec<Nic> = (0..MAX_NICS)
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
        assert_eq!(ports, MAX_NICS);
        assert!(args.iter().any(|a| a.ends_with("addr=0x1e")));
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

    /// A fake QEMU behind a QMP socket, modelling what hot-plug touches: root ports,
    /// devices on them, tap backends. The guest releases an unplugged device after
    /// `release_after` further QMP sessions (never, when `None`).
    #[derive(Default)]
    struct FakeQemu {
        ports: Vec<String>,
        /// Device id -> (type, port, MAC, backend).
        devices: BTreeMap<String, (String, String, String, String)>,
        /// Backend id -> tap.
        netdevs: BTreeMap<String, String>,
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
                    for (id, (kind, ..)) in &self.devices {
                        list.push(json!({"name": id, "type": format!("child<{kind}>")}));
                    }
                    json!({ "return": list })
                }
                "qom-get" => {
                    let name = arg("path").rsplit('/').next().unwrap().to_owned();
                    if name == "vd-boot" {
                        return json!({"return": "/machine/q35/pcie.0"});
                    }
                    let Some((_, port, mac, netdev)) = self.devices.get(&name) else {
                        return error("no such device");
                    };
                    match arg("property").as_str() {
                        "parent_bus" => {
                            json!({"return": format!("/machine/peripheral/{port}/{port}")})
                        }
                        "mac" => json!({ "return": mac }),
                        "netdev" => json!({ "return": netdev }),
                        _ => error("no such property"),
                    }
                }
                "human-monitor-command" => {
                    let mut text = String::new();
                    for (id, (_, _, mac, netdev)) in &self.devices {
                        text += &format!(
                            "{id}: index=0,type=nic,model=virtio-net-pci,macaddr={mac}\r\n"
                        );
                        if let Some(tap) = self.netdevs.get(netdev) {
                            text += &format!(
                                " \\ {netdev}: index=0,type=tap,ifname={tap},script=no,downscript=no\r\n"
                            );
                        }
                    }
                    for (netdev, tap) in &self.netdevs {
                        if !self.devices.values().any(|d| d.3 == *netdev) {
                            text += &format!(
                                "{netdev}: index=0,type=tap,ifname={tap},script=no,downscript=no\r\n"
                            );
                        }
                    }
                    json!({ "return": text })
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
                "device_add" => {
                    if self.refuse_devices {
                        return error("refused");
                    }
                    let port = arg("bus");
                    if self.devices.values().any(|d| d.1 == port) {
                        return error("PCI: slot 0 function 0 not available");
                    }
                    self.devices
                        .insert(arg("id"), (arg("driver"), port, arg("mac"), arg("netdev")));
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
            (
                "virtio-net-pci".into(),
                "hotplug0".into(),
                "52:54:00:00:00:01".into(),
                "net-p1".into(),
            ),
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
            .filter(|c| !matches!(c.as_str(), "qom-list" | "qom-get" | "human-monitor-command"))
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
        assert_eq!(added.1, "hotplug1", "the lowest free port");
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
        unplug_nic(&qmp, timeout, timeout, "vm1", "p1", || true)
            .await
            .unwrap();
        assert_eq!(commands(&fake), ["device_del", "netdev_del"]);
        {
            let fake = fake.lock().unwrap();
            assert!(fake.devices.is_empty() && fake.netdevs.is_empty());
        }
        // Nothing there: nothing to do.
        unplug_nic(&qmp, timeout, timeout, "vm1", "p1", || true)
            .await
            .unwrap();
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
        let error = unplug_nic(
            &qmp,
            timeout,
            Duration::from_millis(300),
            "vm1",
            "p1",
            || true,
        )
        .await
        .unwrap_err();
        assert!(
            matches!(error, HypervisorError::UnplugTimeout { .. }),
            "{error}"
        );
        assert!(fake.lock().unwrap().netdevs.contains_key("net-p1"));
        // QEMU says the unplug is under way; the retry waits for it rather than fail.
        fake.lock().unwrap().unplugging.insert("nic-p1".into(), 3);
        unplug_nic(&qmp, timeout, timeout, "vm1", "p1", || true)
            .await
            .unwrap();
        assert!(fake.lock().unwrap().devices.is_empty());
    }

    #[test]
    fn a_process_is_ours_only_with_our_name() {
        assert!(!is_vm_process(std::process::id(), "vm1"));
        assert!(!is_vm_process(u32::MAX, "vm1"));
    }
}
