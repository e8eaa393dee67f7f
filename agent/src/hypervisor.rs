//! The hypervisor seam of the node agent: what a VM should be ([`VmSpec`]), what one is
//! ([`VmStatus`]), and the [`Hypervisor`] trait a driver implements.
//!
//! The trait is shaped for reconcilers that never trust their own memory: every call
//! looks at the host first. [`Hypervisor::start`] adopts a VM that already runs instead of
//! starting a second one; [`Hypervisor::status`] and [`Hypervisor::list`] rebuild the
//! picture from what is on disk and in `/proc`, so a restarted agent sees every guest it
//! (or a previous agent) started, and a guest that died is reported as such.
//!
//! Guests outlive the agent. Everything a driver creates for a VM is named from the VM's
//! uid so orphans can be found. Calls for one uid are serialised by the driver; the agent's
//! per-VM task is still the only caller expected to change a given VM.
//!
//! NICs have an identity of their own ([`Nic::id`], the Port's uid) and can be plugged
//! into and out of a running VM ([`Hypervisor::attach_nic`], [`Hypervisor::detach_nic`]);
//! [`Hypervisor::nics`] reads back what the VM really has, so a reconciler restarted
//! after a hot-plug compares the wanted NICs with the hypervisor's, not with its memory.
//!
//! Data disks ([`Disk`], one per attached Volume) work the same way: an identity of their
//! own ([`Disk::id`], the Volume's uid), cold-plugged from [`VmSpec::disks`] at start,
//! hot-plugged with [`Hypervisor::attach_disk`] and [`Hypervisor::detach_disk`], read back
//! with [`Hypervisor::disks`], grown online with [`Hypervisor::resize_disk`]. NICs and
//! disks share the VM's hot-plug slots, [`MAX_DEVICES`] of them at most. The boot disk and
//! the config drive are not data disks: they are fixed for the VM's life.
//!
//! The real driver is [`qemu::QemuDriver`]; [`memory::MemoryHypervisor`] is its in-memory
//! double for tests without root. The driver-level types here deliberately do
//! not depend on the API crate.

pub mod memory;
pub mod qemu;
pub mod qmp;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::configdrive::{ConfigDrive, ConfigDriveError};

/// Everything needed to run one VM. The agent derives it from a Server, its Flavor, Image,
/// Ports and KeyPairs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSpec {
    /// The server's uid: names the VM's directory and appears on QEMU's command line.
    /// Letters, digits, `-` and `_`, at most 64 characters.
    pub uid: String,
    /// The server's name, for people.
    pub name: String,
    /// Virtual CPUs.
    pub vcpus: u32,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// The boot disk: a copy-on-write overlay on a base image, made on first start.
    pub boot_disk: Option<BootDisk>,
    /// Direct kernel boot; without it the firmware boots the boot disk.
    pub kernel: Option<DirectKernel>,
    /// The config drive, regenerated on every (cold) start. Not written to the VM's
    /// directory in any other form: user data may hold secrets.
    #[serde(skip)]
    pub config_drive: Option<ConfigDrive>,
    /// NICs, in the order the guest enumerates them.
    pub nics: Vec<Nic>,
    /// Data disks, cold-plugged at start in this order (after the boot disk and the
    /// config drive, so the guest finds them as `vdc`, `vdd`, …). A VM with neither a boot
    /// disk nor a kernel boots from the first one (a Server booted from a Volume). Specs
    /// recorded before disks existed read back with none.
    #[serde(default)]
    pub disks: Vec<Disk>,
    /// Free-form facts the driver records with the VM and reports back in
    /// [`VmStatus::labels`]: the agent keeps the owning Server's project and name here, so
    /// that a VM whose Server is gone can be recognised as an orphan.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// A boot disk: a qcow2 overlay on `base`, so guest writes never touch the base.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootDisk {
    /// The base image (e.g. from the node's image cache). Opened read-only.
    pub base: PathBuf,
    /// The base image's format.
    pub base_format: DiskFormat,
    /// The disk's virtual size in bytes; `None` keeps the base image's size. It may grow
    /// the disk, never shrink it.
    pub size_bytes: Option<u64>,
}

/// Disk image formats a base image or a volume file may have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    /// A raw image.
    Raw,
    /// A qcow2 image.
    Qcow2,
}

impl DiskFormat {
    /// The name QEMU uses for the format.
    pub fn as_str(self) -> &'static str {
        match self {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
        }
    }
}

/// Boot a kernel directly, as Images with a kernel and ramdisk do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirectKernel {
    /// The kernel; an uncompressed ELF `vmlinux` boots fastest (PVH).
    pub kernel: PathBuf,
    /// The initial ramdisk.
    pub initrd: Option<PathBuf>,
    /// The kernel command line.
    pub cmdline: String,
}

/// A NIC backed by a tap device in the host's namespace (which the agent plugs into the
/// switch). QEMU opens the tap by name; a persistent tap made beforehand is reused, and
/// otherwise QEMU creates one that disappears with it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Nic {
    /// The NIC's identity, which survives hot-plugs and restarts: the Port's uid. The
    /// driver names its devices from it (QEMU's `net-<id>` and `nic-<id>`), so plugging
    /// or unplugging one NIC never renames another. Letters, digits, `-` and `_`, at most
    /// 64 characters. Specs recorded before NICs had ids read back with an empty one.
    #[serde(default)]
    pub id: String,
    /// The tap's interface name (at most 15 bytes), e.g. `tap<port-uid-prefix>`.
    pub tap: String,
    /// The guest-visible MAC address, `aa:bb:cc:dd:ee:ff`.
    pub mac: String,
}

/// A data disk: a Volume attached to a VM, on a root port of its own.
///
/// Data disks have an identity of their own, like NICs: the driver names its devices from
/// [`Disk::id`], so attaching or detaching one disk never renames another.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Disk {
    /// The disk's identity: the Volume's uid. Names QEMU's `vol-<id>` device and (see
    /// [`qemu`]'s notes on block node names) `volume-<id>` block node. Letters, digits,
    /// `-` and `_`, at most 64 characters, as [`Nic::id`].
    pub id: String,
    /// Where the bytes are.
    pub source: DiskSource,
    /// The serial the guest sees (`/sys/block/vdX/serial`), at most 20 bytes of printable
    /// ASCII without `,`: Ferro passes the first 20 characters of the volume uid. Empty
    /// gives the disk no serial.
    pub serial: String,
    /// Attached read-only: the guest cannot write, and neither can the hypervisor.
    #[serde(default)]
    pub read_only: bool,
}

/// Where a data disk's bytes are.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "kind")]
pub enum DiskSource {
    /// A file on this host (a qcow2 or raw volume file).
    File {
        /// The volume file. Made absolute (against the agent's working directory) before
        /// use, so the hypervisor, which may run elsewhere, opens the same file.
        path: PathBuf,
        /// The file's format.
        format: DiskFormat,
    },
    /// An NBD export on another node (`qemu-storage-daemon`), which QEMU connects to
    /// itself (no kernel NBD). The export carries raw bytes: any image format lives on
    /// the storage node's side of it.
    Nbd {
        /// The storage node's address or name.
        host: String,
        /// The NBD server's TCP port.
        port: u16,
        /// The export's name.
        export: String,
    },
}

/// How a VM's CPU is virtualised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// Hardware virtualisation through `/dev/kvm`.
    Kvm,
    /// QEMU's binary translator: slower, but runs anywhere.
    Tcg,
}

impl Accel {
    /// The name QEMU uses for the accelerator.
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// What a VM is doing, as observed on the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmState {
    /// The hypervisor runs and the guest's CPUs run.
    Running,
    /// The hypervisor runs but the guest is paused (or in another non-running state such
    /// as `guest-panicked`; see [`VmStatus::detail`]).
    Paused,
    /// The hypervisor process is alive but does not answer its control socket.
    Unresponsive,
    /// The VM exists on this host but does not run because it was stopped through
    /// [`Hypervisor::stop`], or because it has not been started yet.
    Stopped,
    /// The VM was meant to run and ended cleanly on its own: the guest powered itself off
    /// (or someone else told the hypervisor to quit). Nobody stopped it through the driver.
    PoweredOff,
    /// The hypervisor process is gone without a clean exit (killed, crashed).
    Crashed,
}

/// One VM as found on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmStatus {
    /// The VM's uid.
    pub uid: String,
    /// What it is doing.
    pub state: VmState,
    /// The hypervisor's process id, while it runs.
    pub pid: Option<u32>,
    /// The accelerator it runs with, while it runs.
    pub accel: Option<Accel>,
    /// More words on the state: QEMU's run state, or the last thing QEMU said before it
    /// ended.
    pub detail: Option<String>,
    /// Everything the guest wrote to its serial console, across restarts.
    pub serial_log: PathBuf,
    /// A unix socket speaking the serial console, for one interactive client at a time.
    pub console_socket: PathBuf,
    /// When the hypervisor process started, while it runs (whole seconds).
    pub started_at: Option<SystemTime>,
    /// The labels of the spec the VM was last started with ([`VmSpec::labels`]).
    pub labels: BTreeMap<String, String>,
}

impl VmStatus {
    /// Whether the hypervisor process is alive.
    pub fn is_alive(&self) -> bool {
        matches!(
            self.state,
            VmState::Running | VmState::Paused | VmState::Unresponsive
        )
    }
}

/// The most hot-pluggable devices (NICs and data disks together) one VM can have: each
/// sits on a PCIe root port of its own (so that every one of them can be unplugged), and
/// the driver has this many ports to give, spare hot-plug ports included (the free slots
/// of a q35's root bus).
pub const MAX_DEVICES: usize = 15;

/// How [`Hypervisor::stop`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopOutcome {
    /// Nothing was running.
    AlreadyStopped,
    /// The guest powered off after the ACPI power button, within the grace period.
    Graceful,
    /// The grace period ran out and the VM was ended by force.
    Forced,
}

/// Why a hypervisor call failed.
#[derive(Debug, thiserror::Error)]
pub enum HypervisorError {
    /// The spec cannot be run as it is.
    #[error("invalid VM spec: {field}: {reason}")]
    InvalidSpec {
        /// The offending field.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A file or directory operation failed.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A helper program failed.
    #[error("{program} failed ({status}): {stderr}")]
    Command {
        /// The program, with its most telling arguments.
        program: String,
        /// Its exit status.
        status: String,
        /// What it printed on stderr.
        stderr: String,
    },
    /// The hypervisor did not start.
    #[error("VM {uid} did not start: {log}")]
    StartFailed {
        /// The VM's uid.
        uid: String,
        /// The end of the hypervisor's own log.
        log: String,
    },
    /// The hypervisor's control socket failed.
    #[error("VM {uid}: control socket")]
    Control {
        /// The VM's uid.
        uid: String,
        /// What went wrong.
        #[source]
        source: qmp::QmpError,
    },
    /// A VM would not die.
    #[error("VM {uid} (pid {pid}) still runs after {waited:?}")]
    WouldNotDie {
        /// The VM's uid.
        uid: String,
        /// Its hypervisor process.
        pid: u32,
        /// How long we waited after the kill.
        waited: Duration,
    },
    /// The VM does not exist on this host.
    #[error("no VM {0} on this host")]
    NotFound(String),
    /// The VM exists but its hypervisor does not run.
    #[error("VM {0} is not running")]
    NotRunning(String),
    /// The config drive could not be made.
    #[error("config drive")]
    ConfigDrive(#[from] ConfigDriveError),
    /// Every hot-plug port of the VM holds a device already.
    #[error("VM {uid} has no free hot-plug port for {device}")]
    NoFreePort {
        /// The VM's uid.
        uid: String,
        /// The device that did not fit: `NIC <id>` or `disk <id>`.
        device: String,
    },
    /// The VM has a NIC with this id that is not the one asked for.
    #[error("VM {uid} already has NIC {nic} with {found}")]
    NicConflict {
        /// The VM's uid.
        uid: String,
        /// The NIC's id.
        nic: String,
        /// What the NIC in the VM has (tap and MAC).
        found: String,
    },
    /// The VM has a data disk with this id that is not the one asked for.
    #[error("VM {uid} already has disk {disk} with {found}")]
    DiskConflict {
        /// The VM's uid.
        uid: String,
        /// The disk's id.
        disk: String,
        /// What the disk in the VM has (source, serial, read-only).
        found: String,
    },
    /// The VM has no data disk with this id.
    #[error("VM {uid} has no disk {disk}")]
    NoSuchDisk {
        /// The VM's uid.
        uid: String,
        /// The disk's id.
        disk: String,
    },
    /// The guest did not release a device in time (it may not run an OS that handles
    /// hot-unplug yet). The unplug stays requested; asking again waits again.
    #[error("VM {uid}: the guest did not release {device} within {waited:?}")]
    UnplugTimeout {
        /// The VM's uid.
        uid: String,
        /// The device: `NIC <id>` or `disk <id>`.
        device: String,
        /// How long we waited.
        waited: Duration,
    },
}

/// A hypervisor driver: runs, observes, stops and removes VMs on this host.
///
/// Every method is idempotent and starts by looking at the host.
#[async_trait::async_trait]
pub trait Hypervisor: Send + Sync {
    /// Makes the VM run. If it already runs (started by this or an earlier agent), adopts
    /// it and starts nothing. Otherwise creates what is missing (the directory, the boot
    /// disk overlay; an existing overlay is kept with the guest's writes), regenerates the
    /// config drive and starts the hypervisor.
    async fn start(&self, spec: &VmSpec) -> Result<VmStatus, HypervisorError>;

    /// Stops the VM and keeps its files: presses the ACPI power button, waits up to
    /// `grace` for the guest to power off, then ends it by force. From then on the VM is
    /// [`VmState::Stopped`] (not [`VmState::PoweredOff`]) until it is started again; this
    /// holds for a VM that had already ended, too.
    async fn stop(&self, uid: &str, grace: Duration) -> Result<StopOutcome, HypervisorError>;

    /// Resets the VM as a hardware reset button would; the guest reboots.
    async fn reset(&self, uid: &str) -> Result<(), HypervisorError>;

    /// Ends the VM at once and removes every file it had. Nothing left is not an error.
    async fn destroy(&self, uid: &str) -> Result<(), HypervisorError>;

    /// The VM as found on the host, or `None` if there is no trace of it.
    async fn status(&self, uid: &str) -> Result<Option<VmStatus>, HypervisorError>;

    /// Every VM this driver finds on the host, running or not.
    async fn list(&self) -> Result<Vec<VmStatus>, HypervisorError>;

    /// Plugs `nic` into the running VM, on a free hot-plug port, and records it with the
    /// VM's spec so that a cold start of the recorded spec brings it back. A NIC with
    /// this id that is already there with the same tap and MAC is success; one with
    /// another tap or MAC is [`HypervisorError::NicConflict`] (detach it first). A VM
    /// that does not run is [`HypervisorError::NotRunning`]: its next start takes its NICs
    /// from the spec it is given.
    async fn attach_nic(&self, uid: &str, nic: &Nic) -> Result<(), HypervisorError>;

    /// Unplugs NIC `nic_id` from the running VM: asks the guest to release it, waits until
    /// it has, removes its backend (the tap stays if it was made beforehand) and drops it
    /// from the recorded spec. A NIC that is not there is not an error.
    async fn detach_nic(&self, uid: &str, nic_id: &str) -> Result<(), HypervisorError>;

    /// The NICs the running VM has, read from the hypervisor (never from memory), in the
    /// order of the ports they sit on: cold-plugged NICs in [`VmSpec::nics`] order, then
    /// hot-plugged ones in the ports they got. [`HypervisorError::NotRunning`] when the
    /// VM does not run.
    async fn nics(&self, uid: &str) -> Result<Vec<Nic>, HypervisorError>;

    /// Plugs data disk `disk` into the running VM, on a free hot-plug port, and records it
    /// with the VM's spec so that a cold start of the recorded spec brings it back. A disk
    /// with this id that is already there as asked (source, serial, read-only) is
    /// success; one that differs is [`HypervisorError::DiskConflict`] (detach it first).
    /// [`HypervisorError::NoFreePort`] when every port holds a device;
    /// [`HypervisorError::NotRunning`] when the VM does not run: its next start takes its
    /// disks from the spec it is given. File paths are made absolute first.
    async fn attach_disk(&self, uid: &str, disk: &Disk) -> Result<(), HypervisorError>;

    /// Unplugs data disk `disk_id` from the running VM: asks the guest to release it, waits
    /// until it has, closes the volume (QEMU's block nodes) and drops it from the recorded
    /// spec. A disk that is not there is not an error.
    async fn detach_disk(&self, uid: &str, disk_id: &str) -> Result<(), HypervisorError>;

    /// The data disks the running VM has, read from the hypervisor (never from memory), in
    /// the order of the ports they sit on. [`HypervisorError::NotRunning`] when the VM
    /// does not run.
    async fn disks(&self, uid: &str) -> Result<Vec<Disk>, HypervisorError>;

    /// Grows data disk `disk_id` of the running VM to `size_bytes` while the guest runs
    /// (the guest sees the new capacity at once; growing its file system is its own
    /// business). The same size is success; a smaller one is
    /// [`HypervisorError::InvalidSpec`], as disks never shrink; a disk the VM lacks is
    /// [`HypervisorError::NoSuchDisk`]. QEMU 7.2 grows neither a read-only disk nor one
    /// over NBD (the export has to grow on the storage node, and QEMU's NBD client does
    /// not learn the new size): it refuses, as [`HypervisorError::Control`].
    async fn resize_disk(
        &self,
        uid: &str,
        disk_id: &str,
        size_bytes: u64,
    ) -> Result<(), HypervisorError>;

    /// The accelerator new VMs get, reported in `Node.status.accelerator`. A driver that
    /// has no choice to make keeps this default, TCG.
    async fn accel(&self) -> Accel {
        Accel::Tcg
    }
}

/// Checks the parts of a spec that every driver needs to be true.
pub fn validate_spec(spec: &VmSpec) -> Result<(), HypervisorError> {
    let invalid = |field, reason: &str| {
        Err(HypervisorError::InvalidSpec {
            field,
            reason: reason.to_owned(),
        })
    };
    validate_uid(&spec.uid)?;
    if spec.vcpus == 0 {
        return invalid("vcpus", "must be at least 1");
    }
    if spec.memory_mib < 16 {
        return invalid("memory_mib", "must be at least 16");
    }
    if spec.boot_disk.is_none() && spec.kernel.is_none() && spec.disks.is_empty() {
        return invalid(
            "boot_disk",
            "a VM needs a boot disk, a kernel or a data disk to boot",
        );
    }
    if let Some(kernel) = &spec.kernel
        && kernel.cmdline.contains('\n')
    {
        return invalid("kernel.cmdline", "must be one line");
    }
    if spec.nics.len() + spec.disks.len() > MAX_DEVICES {
        return invalid("nics", "at most 15 NICs and disks together");
    }
    for (i, nic) in spec.nics.iter().enumerate() {
        validate_nic(nic)?;
        if spec.nics[..i].iter().any(|other| other.id == nic.id) {
            return invalid("nics.id", "NIC ids must be unique");
        }
        if spec.nics[..i].iter().any(|other| other.tap == nic.tap) {
            return invalid("nics.tap", "a tap backs one NIC");
        }
    }
    for (i, disk) in spec.disks.iter().enumerate() {
        validate_disk(disk)?;
        if spec.disks[..i].iter().any(|other| other.id == disk.id) {
            return invalid("disks.id", "disk ids must be unique");
        }
    }
    Ok(())
}

/// Checks a data disk: an id fit for device names, a serial the guest can be given, a
/// source that names something. File paths need not be absolute yet: see
/// [`resolve_disk`].
pub fn validate_disk(disk: &Disk) -> Result<(), HypervisorError> {
    let invalid = |field, reason: &str| {
        Err(HypervisorError::InvalidSpec {
            field,
            reason: reason.to_owned(),
        })
    };
    if !is_device_id(&disk.id) {
        return invalid("disks.id", "1 to 64 letters, digits, '-' or '_'");
    }
    // virtio-blk has room for 20 bytes; a comma would end QEMU's option value.
    if disk.serial.len() > 20
        || !disk
            .serial
            .bytes()
            .all(|b| (b' '..=b'~').contains(&b) && b != b',')
    {
        return invalid(
            "disks.serial",
            "at most 20 printable ASCII characters, without ','",
        );
    }
    match &disk.source {
        DiskSource::File { path, .. } => {
            if path.as_os_str().is_empty() {
                return invalid("disks.source.path", "must name a file");
            }
            if path.to_str().is_none() {
                return invalid("disks.source.path", "must be UTF-8");
            }
        }
        DiskSource::Nbd { host, port, export } => {
            if *port == 0 {
                return invalid("disks.source.port", "must not be 0");
            }
            if host.is_empty() || host.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return invalid("disks.source.host", "must name a host");
            }
            if export.is_empty() || export.len() > 4096 || export.chars().any(char::is_control) {
                return invalid("disks.source.export", "1 to 4096 characters, one line");
            }
        }
    }
    Ok(())
}

/// A valid disk with its file path made absolute (`std::path::absolute`, against the
/// agent's working directory), which is how drivers use and record it.
pub fn resolve_disk(disk: &Disk) -> Result<Disk, HypervisorError> {
    validate_disk(disk)?;
    let mut resolved = disk.clone();
    if let DiskSource::File { path, .. } = &mut resolved.source {
        *path = std::path::absolute(&*path).map_err(|source| HypervisorError::Io {
            what: format!("resolving {}", path.display()),
            source,
        })?;
    }
    Ok(resolved)
}

/// Whether `id` is fit to name a device: letters, digits, `-` and `_`, 1 to 64 of them.
fn is_device_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Checks a NIC: an id fit for device names, a tap name the kernel takes, a MAC.
pub fn validate_nic(nic: &Nic) -> Result<(), HypervisorError> {
    let invalid = |field, reason: &str| {
        Err(HypervisorError::InvalidSpec {
            field,
            reason: reason.to_owned(),
        })
    };
    if !is_device_id(&nic.id) {
        return invalid("nics.id", "1 to 64 letters, digits, '-' or '_'");
    }
    if nic.tap.is_empty()
        || nic.tap.len() > 15
        || !nic
            .tap
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return invalid("nics.tap", "1 to 15 letters, digits, '-' or '_'");
    }
    if !is_mac(&nic.mac) {
        return invalid("nics.mac", "must look like 52:54:00:12:34:56");
    }
    Ok(())
}

/// Checks that a uid is safe to use in paths and command lines.
pub fn validate_uid(uid: &str) -> Result<(), HypervisorError> {
    if uid.is_empty()
        || uid.len() > 64
        || !uid
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(HypervisorError::InvalidSpec {
            field: "uid",
            reason: format!("{uid:?}: 1 to 64 letters, digits, '-' or '_'"),
        });
    }
    Ok(())
}

fn is_mac(mac: &str) -> bool {
    let parts: Vec<_> = mac.split(':').collect();
    parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> VmSpec {
        VmSpec {
            uid: "0b5c3a52-5a9e-4d35-8a1e-2f1c0f3b1a01".into(),
            name: "web-1".into(),
            vcpus: 1,
            memory_mib: 128,
            boot_disk: None,
            kernel: Some(DirectKernel {
                kernel: "/k".into(),
                initrd: None,
                cmdline: "console=ttyS0".into(),
            }),
            config_drive: None,
            nics: vec![Nic {
                id: "7d1e0c2a-port".into(),
                tap: "tap0b5c3a52-5a".into(),
                mac: "52:54:00:12:34:56".into(),
            }],
            disks: vec![disk("vol-a")],
            labels: BTreeMap::new(),
        }
    }

    fn disk(id: &str) -> Disk {
        Disk {
            id: id.into(),
            source: DiskSource::File {
                path: format!("/var/lib/ferro/volumes/{id}.qcow2").into(),
                format: DiskFormat::Qcow2,
            },
            serial: id.chars().take(20).collect(),
            read_only: false,
        }
    }

    fn nbd(host: &str, port: u16, export: &str) -> Disk {
        Disk {
            source: DiskSource::Nbd {
                host: host.into(),
                port,
                export: export.into(),
            },
            ..disk("vol-n")
        }
    }

    fn rejected_field(spec: VmSpec) -> &'static str {
        match validate_spec(&spec) {
            Err(HypervisorError::InvalidSpec { field, .. }) => field,
            other => panic!("expected an invalid spec, got {other:?}"),
        }
    }

    #[test]
    fn accepts_a_sound_spec() {
        validate_spec(&spec()).unwrap();
    }

    #[test]
    fn rejects_what_would_escape_or_break_the_host() {
        assert_eq!(
            rejected_field(VmSpec {
                uid: "../etc".into(),
                ..spec()
            }),
            "uid"
        );
        assert_eq!(
            rejected_field(VmSpec {
                uid: String::new(),
                ..spec()
            }),
            "uid"
        );
        assert_eq!(
            rejected_field(VmSpec {
                uid: "a,b".into(),
                ..spec()
            }),
            "uid"
        );
        assert_eq!(rejected_field(VmSpec { vcpus: 0, ..spec() }), "vcpus");
        assert_eq!(
            rejected_field(VmSpec {
                kernel: None,
                disks: vec![],
                ..spec()
            }),
            "boot_disk"
        );
        let long_tap = vec![Nic {
            id: "p1".into(),
            tap: "tap-much-too-long".into(),
            mac: "52:54:00:12:34:56".into(),
        }];
        assert_eq!(
            rejected_field(VmSpec {
                nics: long_tap,
                ..spec()
            }),
            "nics.tap"
        );
        let bad_mac = vec![Nic {
            id: "p1".into(),
            tap: "tap0".into(),
            mac: "52:54:00:12:34".into(),
        }];
        assert_eq!(
            rejected_field(VmSpec {
                nics: bad_mac,
                ..spec()
            }),
            "nics.mac"
        );
        let nic = |id: &str| Nic {
            id: id.into(),
            tap: "tap0".into(),
            mac: "52:54:00:12:34:56".into(),
        };
        assert_eq!(
            rejected_field(VmSpec {
                nics: vec![nic("")],
                ..spec()
            }),
            "nics.id"
        );
        assert_eq!(
            rejected_field(VmSpec {
                nics: vec![nic("a,b")],
                ..spec()
            }),
            "nics.id"
        );
        assert_eq!(
            rejected_field(VmSpec {
                nics: vec![nic("p1"), nic("p1")],
                ..spec()
            }),
            "nics.id"
        );
        assert_eq!(
            rejected_field(VmSpec {
                nics: vec![nic("p1"), nic("p2")],
                ..spec()
            }),
            "nics.tap"
        );
        assert_eq!(
            rejected_field(VmSpec {
                nics: (0..16).map(|i| nic(&format!("p{i}"))).collect(),
                ..spec()
            }),
            "nics"
        );
    }

    #[test]
    fn rejects_disks_the_driver_could_not_name_or_reach() {
        let with = |disks: Vec<Disk>| rejected_field(VmSpec { disks, ..spec() });
        assert_eq!(with(vec![disk("")]), "disks.id");
        assert_eq!(with(vec![disk("a,b")]), "disks.id");
        assert_eq!(with(vec![disk(&"x".repeat(65))]), "disks.id");
        assert_eq!(with(vec![disk("v1"), disk("v1")]), "disks.id");
        let serial = |serial: &str| Disk {
            serial: serial.into(),
            ..disk("v1")
        };
        assert_eq!(with(vec![serial(&"s".repeat(21))]), "disks.serial");
        assert_eq!(with(vec![serial("a,b")]), "disks.serial");
        assert_eq!(with(vec![serial("tab\there")]), "disks.serial");
        assert_eq!(with(vec![serial("né")]), "disks.serial");
        validate_disk(&serial(&"s".repeat(20))).unwrap();
        validate_disk(&serial("")).unwrap();
        let path = |path: &str| Disk {
            source: DiskSource::File {
                path: path.into(),
                format: DiskFormat::Raw,
            },
            ..disk("v1")
        };
        assert_eq!(with(vec![path("")]), "disks.source.path");
        assert_eq!(with(vec![nbd("", 10809, "v")]), "disks.source.host");
        assert_eq!(with(vec![nbd("a b", 10809, "v")]), "disks.source.host");
        assert_eq!(with(vec![nbd("h", 0, "v")]), "disks.source.port");
        assert_eq!(with(vec![nbd("h", 10809, "")]), "disks.source.export");
        validate_disk(&nbd("::1", 10809, "volume-1")).unwrap();
        // NICs and disks share the fifteen ports.
        let nics = spec().nics;
        let disks: Vec<_> = (0..14).map(|i| disk(&format!("v{i}"))).collect();
        validate_spec(&VmSpec {
            disks: disks.clone(),
            ..spec()
        })
        .unwrap();
        let one_too_many = [disks, vec![disk("v14")]].concat();
        assert_eq!(
            rejected_field(VmSpec {
                nics,
                disks: one_too_many,
                ..spec()
            }),
            "nics"
        );
    }

    #[test]
    fn a_relative_volume_path_is_resolved_against_the_working_directory() {
        let relative = Disk {
            source: DiskSource::File {
                path: "volumes/v1.qcow2".into(),
                format: DiskFormat::Qcow2,
            },
            ..disk("v1")
        };
        let resolved = resolve_disk(&relative).unwrap();
        let DiskSource::File { path, .. } = &resolved.source else {
            panic!("{resolved:?}");
        };
        assert_eq!(
            *path,
            std::env::current_dir().unwrap().join("volumes/v1.qcow2")
        );
        // Absolute paths and NBD exports are left as they are.
        assert_eq!(resolve_disk(&disk("v1")).unwrap(), disk("v1"));
        let remote = nbd("10.0.0.2", 10809, "v1");
        assert_eq!(resolve_disk(&remote).unwrap(), remote);
    }

    #[test]
    fn disks_serialise_with_a_tagged_source() {
        let json = serde_json::to_value(nbd("10.0.0.2", 10809, "vol-n")).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "id": "vol-n",
                "source": {"kind": "nbd", "host": "10.0.0.2", "port": 10809, "export": "vol-n"},
                "serial": "vol-n",
                "read_only": false,
            })
        );
        let file: Disk = serde_json::from_str(
            r#"{"id":"v1","serial":"v1","source":{"kind":"file","path":"/v/v1.raw","format":"raw"}}"#,
        )
        .unwrap();
        assert_eq!(
            file.source,
            DiskSource::File {
                path: "/v/v1.raw".into(),
                format: DiskFormat::Raw
            }
        );
        assert!(!file.read_only);
    }

    #[test]
    fn specs_recorded_before_nic_ids_still_read() {
        let old = r#"{"uid":"vm1","name":"vm1","vcpus":1,"memory_mib":128,"boot_disk":null,
            "kernel":null,"nics":[{"tap":"tap1","mac":"52:54:00:12:34:56"}]}"#;
        let spec: VmSpec = serde_json::from_str(old).unwrap();
        assert_eq!(spec.nics[0].id, "");
        assert_eq!(spec.nics[0].tap, "tap1");
        assert!(spec.disks.is_empty());
    }
}
