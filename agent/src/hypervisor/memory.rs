//! An in-memory [`Hypervisor`] that behaves like a host, for reconciler tests that run
//! without root, QEMU or KVM.
//!
//! [`MemoryHypervisor`] keeps, per VM, what the QEMU driver keeps on disk and in `/proc`:
//! the spec it was last started with (and so its labels), its files, whether a hypervisor
//! process is alive (and in which run state), whether that process died without a clean
//! exit (QEMU's pidfile left behind) and whether the VM is meant to run (QEMU's
//! `should-run`). The state a call reports is derived from those facts exactly as
//! [`super::qemu`] derives it, so `Crashed`, `PoweredOff` and `Stopped` mean the same
//! here as on a real host:
//!
//! - a failed start leaves the VM's record and files behind, as QEMU's directory is left
//!   (`Stopped`, or `PoweredOff` if it had been running before);
//! - `stop` makes a VM `Stopped` whatever it was; `destroy` removes the VM and its files;
//! - NICs and data disks are plugged into and out of a running VM only, as many as it has
//!   root ports (one per NIC and disk it was launched with, plus [`HOTPLUG_PORTS`], at
//!   most [`MAX_DEVICES`]), and the recorded spec (`vm.json`, [`MemoryHypervisor::spec`])
//!   follows them, as on a QEMU host; a disk has a size (its file's, or
//!   [`DEFAULT_DISK_SIZE`] until a test says otherwise), which only grows, and not at all
//!   over NBD or when read-only (QEMU 7.2 refuses both);
//! - [`MemoryHypervisor::restart`] is a new driver over the same host: the guests outlive
//!   the driver, as they outlive the agent, and the new driver adopts them.
//!
//! Tests change the host behind the driver's back ([`MemoryHypervisor::crash`],
//! [`MemoryHypervisor::power_off_by_guest`], [`MemoryHypervisor::run_behind_our_back`],
//! [`MemoryHypervisor::plant`], …), make the next calls of an operation fail
//! ([`MemoryHypervisor::fail_next`], [`MemoryHypervisor::keep_on_destroy`]), and read
//! what the driver was asked to do from its journal ([`MemoryHypervisor::journal`]).
//!
//! Files are kept in memory, named as in a QEMU VM directory (`vm.json`, `disk.qcow2`,
//! `config-2/openstack/latest/meta_data.json`, …): the config drive is the rendered tree
//! of [`crate::configdrive::ConfigDrive::files`] rather than an ISO, so tests can read
//! what a guest would find on it. This double never stands in for the real driver in a
//! claim that a feature works; the QEMU tests do that.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use super::qmp::QmpError;
use super::{
    Accel, Disk, DiskSource, Hypervisor, HypervisorError, MAX_DEVICES, Nic, StopOutcome, VmSpec,
    VmState, VmStatus, resolve_disk, validate_nic, validate_spec, validate_uid,
};

/// Where the (never created) files of the double's VMs are said to live.
pub const STATE_DIR: &str = "/nonexistent/ferro-memory-hypervisor";

/// The first pid the double hands out.
const FIRST_PID: u32 = 40_000;

/// Spare hot-plug ports a launched VM gets besides one per NIC and data disk, as with the
/// QEMU driver's default settings.
pub const HOTPLUG_PORTS: usize = 4;

/// The size the double gives a data disk it has not been told the size of
/// ([`MemoryHypervisor::set_disk_size`]): 1 GiB.
pub const DEFAULT_DISK_SIZE: u64 = 1 << 30;

/// A driver operation, for failure injection and the journal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Operation {
    /// [`Hypervisor::start`].
    Start,
    /// [`Hypervisor::stop`].
    Stop,
    /// [`Hypervisor::reset`].
    Reset,
    /// [`Hypervisor::destroy`].
    Destroy,
    /// [`Hypervisor::status`].
    Status,
    /// [`Hypervisor::list`].
    List,
    /// [`Hypervisor::attach_nic`].
    AttachNic,
    /// [`Hypervisor::detach_nic`].
    DetachNic,
    /// [`Hypervisor::nics`].
    Nics,
    /// [`Hypervisor::attach_disk`].
    AttachDisk,
    /// [`Hypervisor::detach_disk`].
    DetachDisk,
    /// [`Hypervisor::disks`].
    Disks,
    /// [`Hypervisor::resize_disk`].
    ResizeDisk,
}

impl Operation {
    /// Whether the operation changes the host (as opposed to observing it).
    pub fn is_mutating(self) -> bool {
        matches!(
            self,
            Operation::Start
                | Operation::Stop
                | Operation::Reset
                | Operation::Destroy
                | Operation::AttachNic
                | Operation::DetachNic
                | Operation::AttachDisk
                | Operation::DetachDisk
                | Operation::ResizeDisk
        )
    }
}

/// One call made through the driver, in the order they were made. Calls that failed are
/// recorded too.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    /// What was asked.
    pub operation: Operation,
    /// The VM it was asked of; empty for [`Operation::List`].
    pub uid: String,
    /// What came of it.
    pub outcome: Outcome,
}

/// What came of one [`Call`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// It did what was asked (a start that launched a hypervisor, a stop, …).
    Done,
    /// A start found the VM alive and adopted it: nothing was launched.
    Adopted,
    /// It failed, with this error text.
    Failed(String),
}

impl Call {
    /// Whether the call could have changed the host: a mutating operation that was not
    /// an adoption.
    pub fn changed_the_host(&self) -> bool {
        self.operation.is_mutating() && self.outcome != Outcome::Adopted
    }
}

/// Makes the error an injected failure returns, given the VM's uid.
type MakeError = Arc<dyn Fn(&str) -> HypervisorError + Send + Sync>;

/// What an injected fault does to the call it hits.
#[derive(Clone)]
enum Effect {
    /// The call fails with this error and changes nothing (a failed start leaves what a
    /// failed QEMU launch leaves).
    Fail(MakeError),
    /// `destroy` returns `Ok` but the VM stays as it was.
    KeepOnDestroy,
}

/// A fault waiting for the next calls of one operation.
#[derive(Clone)]
struct Fault {
    operation: Operation,
    /// Only calls for this VM; any VM when `None`.
    uid: Option<String>,
    remaining: u32,
    effect: Effect,
}

/// A hypervisor process of the double.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Process {
    pid: u32,
    started_at: SystemTime,
    /// `Running`, `Paused` or `Unresponsive`.
    state: VmState,
}

/// One VM, as the host holds it.
#[derive(Debug, Clone)]
struct Vm {
    /// The spec it was last started with, or was planted with.
    spec: VmSpec,
    /// Its files, by name inside its directory.
    files: BTreeMap<PathBuf, Vec<u8>>,
    /// The hypervisor process, while one is alive.
    process: Option<Process>,
    /// A process died without a clean exit (QEMU's pidfile left behind).
    died: bool,
    /// Meant to run: from a successful start until a stop (QEMU's `should-run`).
    should_run: bool,
    /// More words on the state: the run state, or how it ended.
    detail: Option<String>,
    /// Whether the guest powers off when the ACPI power button is pressed.
    honours_acpi: bool,
    /// Hypervisor processes launched for this VM (adoptions excluded).
    launches: u32,
    /// Resets performed.
    resets: u32,
    /// Root ports of the running hypervisor, each holding a NIC, a disk or nothing: one
    /// per NIC and disk at launch plus [`HOTPLUG_PORTS`].
    ports: usize,
    /// Whether the guest releases a NIC it is asked to unplug.
    releases_nics: bool,
    /// Whether the guest releases a disk it is asked to unplug.
    releases_disks: bool,
    /// Data disk sizes in bytes, by disk id: what the volume files hold, so they outlive
    /// attachments.
    disk_sizes: BTreeMap<String, u64>,
}

impl Vm {
    fn state(&self) -> VmState {
        match (&self.process, self.died, self.should_run) {
            (Some(process), _, _) => process.state,
            (None, true, _) => VmState::Crashed,
            (None, false, true) => VmState::PoweredOff,
            (None, false, false) => VmState::Stopped,
        }
    }

    fn status(&self) -> VmStatus {
        let dir = Path::new(STATE_DIR).join(&self.spec.uid);
        VmStatus {
            uid: self.spec.uid.clone(),
            state: self.state(),
            pid: self.process.map(|p| p.pid),
            accel: self.process.map(|_| Accel::Tcg),
            detail: self.detail.clone(),
            serial_log: dir.join("serial.log"),
            console_socket: dir.join("console.sock"),
            started_at: self.process.map(|p| p.started_at),
            labels: self.spec.labels.clone(),
        }
    }
}

/// What outlives a driver: the VMs and the pids handed out.
#[derive(Debug)]
struct Host {
    vms: BTreeMap<String, Vm>,
    next_pid: u32,
}

impl Host {
    fn launch(&mut self) -> Process {
        let pid = self.next_pid;
        self.next_pid += 1;
        Process {
            pid,
            started_at: whole_seconds(SystemTime::now()),
            state: VmState::Running,
        }
    }
}

/// An in-memory hypervisor driver; see the module notes. Clones are not new drivers:
/// share one through an `Arc`, and use [`MemoryHypervisor::restart`] for a new driver
/// over the same host.
pub struct MemoryHypervisor {
    host: Arc<Mutex<Host>>,
    faults: Mutex<Vec<Fault>>,
    journal: Mutex<Vec<Call>>,
}

impl Default for MemoryHypervisor {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for MemoryHypervisor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryHypervisor")
            .field("vms", &self.host().vms.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl MemoryHypervisor {
    /// A host with no VMs.
    pub fn new() -> Self {
        MemoryHypervisor {
            host: Arc::new(Mutex::new(Host {
                vms: BTreeMap::new(),
                next_pid: FIRST_PID,
            })),
            faults: Mutex::new(Vec::new()),
            journal: Mutex::new(Vec::new()),
        }
    }

    /// A new driver over the same host, as a restarted agent gets: every VM, running or
    /// not, is still there; the journal starts empty and no fault is pending.
    pub fn restart(&self) -> Self {
        MemoryHypervisor {
            host: self.host.clone(),
            faults: Mutex::new(Vec::new()),
            journal: Mutex::new(Vec::new()),
        }
    }

    fn host(&self) -> MutexGuard<'_, Host> {
        self.host.lock().expect("memory host poisoned")
    }

    fn record(&self, operation: Operation, uid: &str, outcome: Outcome) {
        self.journal.lock().expect("journal poisoned").push(Call {
            operation,
            uid: uid.to_owned(),
            outcome,
        });
    }

    /// Records the call's result and passes it on.
    fn journaled<T>(
        &self,
        operation: Operation,
        uid: &str,
        result: Result<(T, Outcome), HypervisorError>,
    ) -> Result<T, HypervisorError> {
        match result {
            Ok((value, outcome)) => {
                self.record(operation, uid, outcome);
                Ok(value)
            }
            Err(e) => {
                self.record(
                    operation,
                    uid,
                    Outcome::Failed(crate::images::error_chain(&e)),
                );
                Err(e)
            }
        }
    }

    /// The effect of the first pending fault for this call, consuming one of its times.
    fn take_fault(&self, operation: Operation, uid: &str) -> Option<Effect> {
        let mut faults = self.faults.lock().expect("faults poisoned");
        let index = faults
            .iter()
            .position(|f| f.operation == operation && f.uid.as_deref().is_none_or(|u| u == uid))?;
        let fault = &mut faults[index];
        let effect = fault.effect.clone();
        fault.remaining -= 1;
        if fault.remaining == 0 {
            faults.remove(index);
        }
        Some(effect)
    }

    fn injected_error(&self, operation: Operation, uid: &str) -> Option<HypervisorError> {
        match self.take_fault(operation, uid)? {
            Effect::Fail(make) => Some(make(uid)),
            Effect::KeepOnDestroy => None,
        }
    }

    // -----------------------------------------------------------------------------------
    // Failure injection.

    /// Makes the next `times` calls of `operation` (for any VM) fail with the error
    /// `error` makes from the VM's uid. Faults are used in the order they were added.
    pub fn fail_next(
        &self,
        operation: Operation,
        times: u32,
        error: impl Fn(&str) -> HypervisorError + Send + Sync + 'static,
    ) {
        self.add_fault(operation, None, times, Effect::Fail(Arc::new(error)));
    }

    /// Like [`MemoryHypervisor::fail_next`], for calls about one VM only.
    pub fn fail_next_for(
        &self,
        operation: Operation,
        uid: &str,
        times: u32,
        error: impl Fn(&str) -> HypervisorError + Send + Sync + 'static,
    ) {
        self.add_fault(
            operation,
            Some(uid.to_owned()),
            times,
            Effect::Fail(Arc::new(error)),
        );
    }

    /// Makes the next `times` starts fail as QEMU refusing to launch does
    /// ([`HypervisorError::StartFailed`]): after what the start wrote (spec, disk, config
    /// drive), so the VM's record and files stay behind.
    pub fn fail_next_start(&self, times: u32) {
        self.fail_next(Operation::Start, times, |uid| {
            HypervisorError::StartFailed {
                uid: uid.to_owned(),
                log: "exit status: 1: qemu-system-x86_64: could not load the boot disk".to_owned(),
            }
        });
    }

    /// Makes the next `times` destroys fail as a hypervisor that would not die does.
    pub fn fail_next_destroy(&self, times: u32) {
        self.fail_next(Operation::Destroy, times, |uid| {
            HypervisorError::WouldNotDie {
                uid: uid.to_owned(),
                pid: 0,
                waited: Duration::from_secs(10),
            }
        });
    }

    /// Makes the next `times` destroys return `Ok` while the VM stays exactly as it was
    /// (a driver that lies, or a directory that came back).
    pub fn keep_on_destroy(&self, times: u32) {
        self.add_fault(Operation::Destroy, None, times, Effect::KeepOnDestroy);
    }

    fn add_fault(&self, operation: Operation, uid: Option<String>, times: u32, effect: Effect) {
        if times == 0 {
            return;
        }
        self.faults.lock().expect("faults poisoned").push(Fault {
            operation,
            uid,
            remaining: times,
            effect,
        });
    }

    /// Drops every pending fault.
    pub fn clear_faults(&self) {
        self.faults.lock().expect("faults poisoned").clear();
    }

    /// How many calls the pending faults of `operation` will still hit.
    pub fn pending_faults(&self, operation: Operation) -> u32 {
        self.faults
            .lock()
            .expect("faults poisoned")
            .iter()
            .filter(|f| f.operation == operation)
            .map(|f| f.remaining)
            .sum()
    }

    // -----------------------------------------------------------------------------------
    // The journal.

    /// Every call made through this driver, oldest first.
    pub fn journal(&self) -> Vec<Call> {
        self.journal.lock().expect("journal poisoned").clone()
    }

    /// The calls made through this driver since the last take, and forgets them.
    pub fn take_journal(&self) -> Vec<Call> {
        std::mem::take(&mut *self.journal.lock().expect("journal poisoned"))
    }

    /// The calls in the journal that could have changed the host.
    pub fn changes(&self) -> Vec<Call> {
        self.journal()
            .into_iter()
            .filter(Call::changed_the_host)
            .collect()
    }

    // -----------------------------------------------------------------------------------
    // What the host holds.

    /// The uids of every VM on the host.
    pub fn uids(&self) -> Vec<String> {
        self.host().vms.keys().cloned().collect()
    }

    /// The VM's state, or `None` if the host has no trace of it.
    pub fn state(&self, uid: &str) -> Option<VmState> {
        self.host().vms.get(uid).map(Vm::state)
    }

    /// The spec the VM was last started (or planted) with, config drive included.
    pub fn spec(&self, uid: &str) -> Option<VmSpec> {
        self.host().vms.get(uid).map(|vm| vm.spec.clone())
    }

    /// The VM's files by name inside its directory; empty if there is no VM.
    pub fn files(&self, uid: &str) -> BTreeMap<PathBuf, Vec<u8>> {
        self.host()
            .vms
            .get(uid)
            .map(|vm| vm.files.clone())
            .unwrap_or_default()
    }

    /// One file of the VM, e.g. `config-2/openstack/latest/meta_data.json`.
    pub fn file(&self, uid: &str, name: impl AsRef<Path>) -> Option<Vec<u8>> {
        self.host().vms.get(uid)?.files.get(name.as_ref()).cloned()
    }

    /// How many hypervisor processes were launched for the VM (adoptions do not count).
    pub fn launches(&self, uid: &str) -> u32 {
        self.host().vms.get(uid).map_or(0, |vm| vm.launches)
    }

    /// How many times the VM was reset.
    pub fn resets(&self, uid: &str) -> u32 {
        self.host().vms.get(uid).map_or(0, |vm| vm.resets)
    }

    /// The uids of the VMs whose hypervisor process is alive.
    pub fn alive(&self) -> Vec<String> {
        self.host()
            .vms
            .iter()
            .filter(|(_, vm)| vm.process.is_some())
            .map(|(uid, _)| uid.clone())
            .collect()
    }

    // -----------------------------------------------------------------------------------
    // Drift: the host changing behind the driver's back.

    fn with_vm(&self, uid: &str, change: impl FnOnce(&mut Host, &mut Vm)) {
        let mut host = self.host();
        let mut vm = host
            .vms
            .remove(uid)
            .unwrap_or_else(|| panic!("no VM {uid} on the memory host"));
        change(&mut host, &mut vm);
        host.vms.insert(uid.to_owned(), vm);
    }

    /// The hypervisor dies without a clean exit (killed, crashed): `Crashed`, with
    /// `detail` as the last thing it said.
    ///
    /// # Panics
    /// If there is no such VM.
    pub fn crash(&self, uid: &str, detail: &str) {
        self.with_vm(uid, |_, vm| {
            vm.process = None;
            vm.died = true;
            vm.detail = Some(detail.to_owned());
        });
    }

    /// The guest powers itself off; the hypervisor exits cleanly: `PoweredOff` while the
    /// VM was meant to run.
    ///
    /// # Panics
    /// If there is no such VM.
    pub fn power_off_by_guest(&self, uid: &str) {
        self.with_vm(uid, |_, vm| {
            vm.process = None;
            vm.detail = Some("guest shutdown".to_owned());
        });
    }

    /// Someone starts the VM without the driver (QEMU run by hand): a new hypervisor
    /// process, whatever the VM was meant to do.
    ///
    /// # Panics
    /// If there is no such VM.
    pub fn run_behind_our_back(&self, uid: &str) {
        self.with_vm(uid, |host, vm| {
            if vm.process.is_none() {
                vm.process = Some(host.launch());
                vm.ports = root_ports(&vm.spec);
                vm.launches += 1;
            }
            vm.died = false;
            vm.detail = Some("running".to_owned());
        });
    }

    /// The hypervisor pauses the guest (`Paused`), e.g. after a guest panic.
    ///
    /// # Panics
    /// If there is no such VM or it does not run.
    pub fn pause(&self, uid: &str, detail: &str) {
        self.set_process_state(uid, VmState::Paused, detail);
    }

    /// The hypervisor stops answering its control socket (`Unresponsive`).
    ///
    /// # Panics
    /// If there is no such VM or it does not run.
    pub fn hang(&self, uid: &str) {
        self.set_process_state(uid, VmState::Unresponsive, "control socket timed out");
    }

    fn set_process_state(&self, uid: &str, state: VmState, detail: &str) {
        self.with_vm(uid, |_, vm| {
            let process = vm
                .process
                .as_mut()
                .unwrap_or_else(|| panic!("VM {uid} does not run"));
            process.state = state;
            vm.detail = Some(detail.to_owned());
        });
    }

    /// Whether the guest powers off when the ACPI button is pressed; one that does not
    /// is ended by force when the stop's grace period runs out.
    ///
    /// # Panics
    /// If there is no such VM.
    pub fn set_honours_acpi(&self, uid: &str, honours: bool) {
        self.with_vm(uid, |_, vm| vm.honours_acpi = honours);
    }

    /// Whether the guest releases NICs it is asked to unplug; one that does not makes
    /// [`Hypervisor::detach_nic`] time out with the NIC still in.
    ///
    /// # Panics
    /// If there is no such VM.
    pub fn set_releases_nics(&self, uid: &str, releases: bool) {
        self.with_vm(uid, |_, vm| vm.releases_nics = releases);
    }

    /// Whether the guest releases data disks it is asked to unplug; one that does not makes
    /// [`Hypervisor::detach_disk`] time out with the disk still in.
    ///
    /// # Panics
    /// If there is no such VM.
    pub fn set_releases_disks(&self, uid: &str, releases: bool) {
        self.with_vm(uid, |_, vm| vm.releases_disks = releases);
    }

    /// Data disk `disk_id`'s size in bytes as the VM's volume has it, e.g. after a resize;
    /// `None` without such a VM. A disk the double was told nothing about has
    /// [`DEFAULT_DISK_SIZE`].
    pub fn disk_size(&self, uid: &str, disk_id: &str) -> Option<u64> {
        let host = self.host();
        let vm = host.vms.get(uid)?;
        Some(
            vm.disk_sizes
                .get(disk_id)
                .copied()
                .unwrap_or(DEFAULT_DISK_SIZE),
        )
    }

    /// Says how big data disk `disk_id`'s volume is, as a volume file of that size would.
    ///
    /// # Panics
    /// If there is no such VM.
    pub fn set_disk_size(&self, uid: &str, disk_id: &str, size_bytes: u64) {
        self.with_vm(uid, |_, vm| {
            vm.disk_sizes.insert(disk_id.to_owned(), size_bytes);
        });
    }

    /// Someone unplugs a data disk without the driver (QEMU's monitor used by hand): the
    /// VM and its recorded spec lose it.
    ///
    /// # Panics
    /// If there is no such VM.
    pub fn unplug_disk_behind_our_back(&self, uid: &str, disk_id: &str) {
        self.with_vm(uid, |_, vm| {
            vm.spec.disks.retain(|d| d.id != disk_id);
            record_spec(vm);
        });
    }

    /// Someone unplugs a NIC without the driver (QEMU's monitor used by hand): the VM and
    /// its recorded spec lose it.
    ///
    /// # Panics
    /// If there is no such VM.
    pub fn unplug_behind_our_back(&self, uid: &str, nic_id: &str) {
        self.with_vm(uid, |_, vm| {
            vm.spec.nics.retain(|n| n.id != nic_id);
            record_spec(vm);
        });
    }

    /// A VM appears on the host that no call of this driver made: one left by an earlier
    /// agent whose Server is gone, or one an operator made. It carries `labels` (none,
    /// or a Server's project and name) and runs when `running`.
    pub fn plant(&self, uid: &str, labels: BTreeMap<String, String>, running: bool) {
        let spec = VmSpec {
            uid: uid.to_owned(),
            name: uid.to_owned(),
            vcpus: 1,
            memory_mib: 128,
            boot_disk: None,
            kernel: Some(super::DirectKernel {
                kernel: "/nonexistent/vmlinux".into(),
                initrd: None,
                cmdline: "console=ttyS0".to_owned(),
            }),
            config_drive: None,
            nics: Vec::new(),
            disks: Vec::new(),
            labels,
        };
        self.plant_spec(spec, running);
    }

    /// Like [`MemoryHypervisor::plant`], with the whole spec the VM was started with.
    pub fn plant_spec(&self, spec: VmSpec, running: bool) {
        let mut host = self.host();
        let uid = spec.uid.clone();
        let mut vm = new_vm(spec);
        write_files(&mut vm);
        if running {
            vm.process = Some(host.launch());
            vm.ports = root_ports(&vm.spec);
            vm.launches = 1;
            vm.should_run = true;
            vm.detail = Some("running".to_owned());
        }
        host.vms.insert(uid, vm);
    }
}

/// The root ports a hypervisor launched with `spec` has.
fn root_ports(spec: &VmSpec) -> usize {
    (spec.nics.len() + spec.disks.len() + HOTPLUG_PORTS).min(MAX_DEVICES)
}

impl Vm {
    /// Root ports that hold a device.
    fn used_ports(&self) -> usize {
        self.spec.nics.len() + self.spec.disks.len()
    }
}

fn new_vm(spec: VmSpec) -> Vm {
    Vm {
        spec,
        files: BTreeMap::new(),
        process: None,
        died: false,
        should_run: false,
        detail: None,
        honours_acpi: true,
        launches: 0,
        resets: 0,
        ports: 0,
        releases_nics: true,
        releases_disks: true,
        disk_sizes: BTreeMap::new(),
    }
}

/// Writes what a start writes before launching, as the QEMU driver does: the spec first,
/// the boot disk overlay if there is none (an existing one keeps the guest's writes), the
/// config drive afresh.
fn write_files(vm: &mut Vm) {
    record_spec(vm);
    if let Some(disk) = &vm.spec.boot_disk {
        vm.files
            .entry("disk.qcow2".into())
            .or_insert_with(|| format!("overlay on {}", disk.base.display()).into_bytes());
    }
    vm.files.retain(|name, _| !name.starts_with("config-2"));
    if let Some(drive) = &vm.spec.config_drive {
        for (name, contents) in drive.files() {
            vm.files.insert(Path::new("config-2").join(name), contents);
        }
    }
    vm.files.entry("serial.log".into()).or_default();
}

/// Writes `vm.json` from the VM's spec, as the QEMU driver records it.
fn record_spec(vm: &mut Vm) {
    let recorded = serde_json::to_vec_pretty(&vm.spec).expect("specs serialise to JSON");
    vm.files.insert("vm.json".into(), recorded);
}

/// A time as the QEMU driver reports it: whole seconds (a pidfile's mtime).
fn whole_seconds(time: SystemTime) -> SystemTime {
    let since = time
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    SystemTime::UNIX_EPOCH + Duration::from_secs(since.as_secs())
}

/// The VM, if its hypervisor process is alive; otherwise why not, as the QEMU driver says.
fn running_vm<'h>(host: &'h mut Host, uid: &str) -> Result<&'h mut Vm, HypervisorError> {
    let vm = host
        .vms
        .get_mut(uid)
        .ok_or_else(|| HypervisorError::NotFound(uid.to_owned()))?;
    if vm.process.is_none() {
        return Err(HypervisorError::NotRunning(uid.to_owned()));
    }
    Ok(vm)
}

#[async_trait::async_trait]
impl Hypervisor for MemoryHypervisor {
    async fn start(&self, spec: &VmSpec) -> Result<VmStatus, HypervisorError> {
        let uid = spec.uid.clone();
        let result = (|| -> Result<_, HypervisorError> {
            validate_spec(spec)?;
            // As the QEMU driver does, volume paths are used and recorded absolute.
            let mut spec = spec.clone();
            for disk in &mut spec.disks {
                *disk = resolve_disk(disk)?;
            }
            let spec = &spec;
            let mut host = self.host();
            if let Some(vm) = host.vms.get(&uid)
                && vm.process.is_some()
            {
                return Ok((vm.status(), Outcome::Adopted));
            }
            let mut vm = host
                .vms
                .remove(&uid)
                .unwrap_or_else(|| new_vm(spec.clone()));
            vm.spec = spec.clone();
            write_files(&mut vm);
            // The launch: QEMU's stale pidfile is removed before it runs.
            vm.died = false;
            let failed = self.injected_error(Operation::Start, &uid);
            if let Some(e) = failed {
                vm.detail = Some(crate::images::error_chain(&e));
                host.vms.insert(uid.clone(), vm);
                return Err(e);
            }
            vm.process = Some(host.launch());
            vm.ports = root_ports(&vm.spec);
            vm.launches += 1;
            vm.should_run = true;
            vm.detail = Some("running".to_owned());
            let status = vm.status();
            host.vms.insert(uid.clone(), vm);
            Ok((status, Outcome::Done))
        })();
        self.journaled(Operation::Start, &uid, result)
    }

    async fn stop(&self, uid: &str, grace: Duration) -> Result<StopOutcome, HypervisorError> {
        let result = (|| -> Result<_, HypervisorError> {
            validate_uid(uid)?;
            if let Some(e) = self.injected_error(Operation::Stop, uid) {
                return Err(e);
            }
            let mut host = self.host();
            let vm = host
                .vms
                .get_mut(uid)
                .ok_or_else(|| HypervisorError::NotFound(uid.to_owned()))?;
            vm.should_run = false;
            vm.died = false;
            let Some(process) = vm.process.take() else {
                return Ok((StopOutcome::AlreadyStopped, Outcome::Done));
            };
            // An unresponsive hypervisor does not pass the power button on.
            let outcome = if vm.honours_acpi && process.state != VmState::Unresponsive {
                vm.detail = Some("powered off after the ACPI power button".to_owned());
                StopOutcome::Graceful
            } else {
                vm.detail = Some(format!("ended by force after {grace:?}"));
                StopOutcome::Forced
            };
            Ok((outcome, Outcome::Done))
        })();
        self.journaled(Operation::Stop, uid, result)
    }

    async fn reset(&self, uid: &str) -> Result<(), HypervisorError> {
        let result = (|| -> Result<_, HypervisorError> {
            validate_uid(uid)?;
            if let Some(e) = self.injected_error(Operation::Reset, uid) {
                return Err(e);
            }
            let mut host = self.host();
            let vm = host
                .vms
                .get_mut(uid)
                .ok_or_else(|| HypervisorError::NotFound(uid.to_owned()))?;
            match &mut vm.process {
                None => Err(HypervisorError::NotRunning(uid.to_owned())),
                Some(process) => {
                    // A hardware reset gets a paused or panicked guest booting again.
                    if process.state == VmState::Paused {
                        process.state = VmState::Running;
                        vm.detail = Some("running".to_owned());
                    }
                    vm.resets += 1;
                    Ok(((), Outcome::Done))
                }
            }
        })();
        self.journaled(Operation::Reset, uid, result)
    }

    async fn destroy(&self, uid: &str) -> Result<(), HypervisorError> {
        let result = (|| -> Result<_, HypervisorError> {
            validate_uid(uid)?;
            match self.take_fault(Operation::Destroy, uid) {
                Some(Effect::Fail(make)) => return Err(make(uid)),
                Some(Effect::KeepOnDestroy) => return Ok(((), Outcome::Done)),
                None => {}
            }
            self.host().vms.remove(uid);
            Ok(((), Outcome::Done))
        })();
        self.journaled(Operation::Destroy, uid, result)
    }

    async fn status(&self, uid: &str) -> Result<Option<VmStatus>, HypervisorError> {
        let result = (|| -> Result<_, HypervisorError> {
            validate_uid(uid)?;
            if let Some(e) = self.injected_error(Operation::Status, uid) {
                return Err(e);
            }
            Ok((self.host().vms.get(uid).map(Vm::status), Outcome::Done))
        })();
        self.journaled(Operation::Status, uid, result)
    }

    async fn list(&self) -> Result<Vec<VmStatus>, HypervisorError> {
        let result = (|| -> Result<_, HypervisorError> {
            if let Some(e) = self.injected_error(Operation::List, "") {
                return Err(e);
            }
            let host = self.host();
            Ok((host.vms.values().map(Vm::status).collect(), Outcome::Done))
        })();
        self.journaled(Operation::List, "", result)
    }

    async fn attach_nic(&self, uid: &str, nic: &Nic) -> Result<(), HypervisorError> {
        let result = (|| -> Result<_, HypervisorError> {
            validate_uid(uid)?;
            validate_nic(nic)?;
            if let Some(e) = self.injected_error(Operation::AttachNic, uid) {
                return Err(e);
            }
            let mut host = self.host();
            let vm = running_vm(&mut host, uid)?;
            if let Some(found) = vm.spec.nics.iter().find(|n| n.id == nic.id) {
                if found.tap == nic.tap && found.mac == nic.mac {
                    return Ok(((), Outcome::Done));
                }
                return Err(HypervisorError::NicConflict {
                    uid: uid.to_owned(),
                    nic: nic.id.clone(),
                    found: format!("tap {:?}, MAC {}", found.tap, found.mac),
                });
            }
            if vm.used_ports() >= vm.ports {
                return Err(HypervisorError::NoFreePort {
                    uid: uid.to_owned(),
                    device: format!("NIC {}", nic.id),
                });
            }
            vm.spec.nics.push(nic.clone());
            record_spec(vm);
            Ok(((), Outcome::Done))
        })();
        self.journaled(Operation::AttachNic, uid, result)
    }

    async fn detach_nic(&self, uid: &str, nic_id: &str) -> Result<(), HypervisorError> {
        let result = (|| -> Result<_, HypervisorError> {
            validate_uid(uid)?;
            if let Some(e) = self.injected_error(Operation::DetachNic, uid) {
                return Err(e);
            }
            let mut host = self.host();
            let vm = running_vm(&mut host, uid)?;
            if !vm.spec.nics.iter().any(|n| n.id == nic_id) {
                return Ok(((), Outcome::Done));
            }
            if !vm.releases_nics {
                return Err(HypervisorError::UnplugTimeout {
                    uid: uid.to_owned(),
                    device: format!("NIC {nic_id}"),
                    waited: Duration::from_secs(30),
                });
            }
            vm.spec.nics.retain(|n| n.id != nic_id);
            record_spec(vm);
            Ok(((), Outcome::Done))
        })();
        self.journaled(Operation::DetachNic, uid, result)
    }

    async fn nics(&self, uid: &str) -> Result<Vec<Nic>, HypervisorError> {
        let result = (|| -> Result<_, HypervisorError> {
            validate_uid(uid)?;
            if let Some(e) = self.injected_error(Operation::Nics, uid) {
                return Err(e);
            }
            let mut host = self.host();
            let vm = running_vm(&mut host, uid)?;
            Ok((vm.spec.nics.clone(), Outcome::Done))
        })();
        self.journaled(Operation::Nics, uid, result)
    }

    async fn attach_disk(&self, uid: &str, disk: &Disk) -> Result<(), HypervisorError> {
        let result = (|| -> Result<_, HypervisorError> {
            validate_uid(uid)?;
            let disk = resolve_disk(disk)?;
            if let Some(e) = self.injected_error(Operation::AttachDisk, uid) {
                return Err(e);
            }
            let mut host = self.host();
            let vm = running_vm(&mut host, uid)?;
            if let Some(found) = vm.spec.disks.iter().find(|d| d.id == disk.id) {
                if *found == disk {
                    return Ok(((), Outcome::Done));
                }
                return Err(HypervisorError::DiskConflict {
                    uid: uid.to_owned(),
                    disk: disk.id.clone(),
                    found: format!("{:?}", found.source),
                });
            }
            if vm.used_ports() >= vm.ports {
                return Err(HypervisorError::NoFreePort {
                    uid: uid.to_owned(),
                    device: format!("disk {}", disk.id),
                });
            }
            vm.spec.disks.push(disk);
            record_spec(vm);
            Ok(((), Outcome::Done))
        })();
        self.journaled(Operation::AttachDisk, uid, result)
    }

    async fn detach_disk(&self, uid: &str, disk_id: &str) -> Result<(), HypervisorError> {
        let result = (|| -> Result<_, HypervisorError> {
            validate_uid(uid)?;
            if let Some(e) = self.injected_error(Operation::DetachDisk, uid) {
                return Err(e);
            }
            let mut host = self.host();
            let vm = running_vm(&mut host, uid)?;
            if !vm.spec.disks.iter().any(|d| d.id == disk_id) {
                return Ok(((), Outcome::Done));
            }
            if !vm.releases_disks {
                return Err(HypervisorError::UnplugTimeout {
                    uid: uid.to_owned(),
                    device: format!("disk {disk_id}"),
                    waited: Duration::from_secs(30),
                });
            }
            vm.spec.disks.retain(|d| d.id != disk_id);
            record_spec(vm);
            Ok(((), Outcome::Done))
        })();
        self.journaled(Operation::DetachDisk, uid, result)
    }

    async fn disks(&self, uid: &str) -> Result<Vec<Disk>, HypervisorError> {
        let result = (|| -> Result<_, HypervisorError> {
            validate_uid(uid)?;
            if let Some(e) = self.injected_error(Operation::Disks, uid) {
                return Err(e);
            }
            let mut host = self.host();
            let vm = running_vm(&mut host, uid)?;
            Ok((vm.spec.disks.clone(), Outcome::Done))
        })();
        self.journaled(Operation::Disks, uid, result)
    }

    async fn resize_disk(
        &self,
        uid: &str,
        disk_id: &str,
        size_bytes: u64,
    ) -> Result<(), HypervisorError> {
        let result = (|| -> Result<_, HypervisorError> {
            validate_uid(uid)?;
            if let Some(e) = self.injected_error(Operation::ResizeDisk, uid) {
                return Err(e);
            }
            let mut host = self.host();
            let vm = running_vm(&mut host, uid)?;
            let Some(disk) = vm.spec.disks.iter().find(|d| d.id == disk_id) else {
                return Err(HypervisorError::NoSuchDisk {
                    uid: uid.to_owned(),
                    disk: disk_id.to_owned(),
                });
            };
            let current = vm
                .disk_sizes
                .get(disk_id)
                .copied()
                .unwrap_or(DEFAULT_DISK_SIZE);
            if size_bytes < current {
                return Err(HypervisorError::InvalidSpec {
                    field: "size_bytes",
                    reason: format!("{size_bytes} would shrink the {current}-byte disk {disk_id}"),
                });
            }
            // What QEMU 7.2 refuses to grow, it refuses here too, in its words.
            let refusal = match (&disk.source, disk.read_only) {
                (_, true) => Some("Image is read-only"),
                (DiskSource::Nbd { .. }, false) => Some("Cannot grow NBD nodes"),
                (DiskSource::File { .. }, false) => None,
            };
            if let Some(desc) = refusal.filter(|_| size_bytes > current) {
                return Err(HypervisorError::Control {
                    uid: uid.to_owned(),
                    source: QmpError::Command {
                        command: "block_resize".to_owned(),
                        class: "GenericError".to_owned(),
                        desc: desc.to_owned(),
                    },
                });
            }
            vm.disk_sizes.insert(disk_id.to_owned(), size_bytes);
            Ok(((), Outcome::Done))
        })();
        self.journaled(Operation::ResizeDisk, uid, result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::configdrive::ConfigDrive;
    use crate::hypervisor::{BootDisk, DiskFormat};

    fn nic(id: &str, mac_last: u8) -> Nic {
        Nic {
            id: id.into(),
            tap: format!("tap{id}"),
            mac: format!("52:54:00:00:00:{mac_last:02x}"),
        }
    }

    #[tokio::test]
    async fn nics_plug_into_a_running_vm_and_the_recorded_spec_follows() {
        let hv = MemoryHypervisor::new();
        assert!(matches!(
            hv.attach_nic(UID, &nic("p1", 1)).await,
            Err(HypervisorError::NotFound(_))
        ));
        hv.start(&VmSpec {
            nics: vec![nic("p1", 1)],
            ..spec(UID)
        })
        .await
        .unwrap();
        hv.attach_nic(UID, &nic("p2", 2)).await.unwrap();
        hv.attach_nic(UID, &nic("p2", 2)).await.unwrap();
        assert_eq!(hv.nics(UID).await.unwrap(), [nic("p1", 1), nic("p2", 2)]);
        let recorded: VmSpec = serde_json::from_slice(&hv.file(UID, "vm.json").unwrap()).unwrap();
        assert_eq!(recorded.nics, [nic("p1", 1), nic("p2", 2)]);
        assert!(matches!(
            hv.attach_nic(UID, &nic("p2", 9)).await,
            Err(HypervisorError::NicConflict { .. })
        ));
        // One port per NIC at launch plus the spare ones.
        for i in 3..=5 {
            hv.attach_nic(UID, &nic(&format!("p{i}"), i)).await.unwrap();
        }
        assert!(matches!(
            hv.attach_nic(UID, &nic("p6", 6)).await,
            Err(HypervisorError::NoFreePort { .. })
        ));

        hv.detach_nic(UID, "p1").await.unwrap();
        hv.detach_nic(UID, "p1").await.unwrap();
        hv.set_releases_nics(UID, false);
        assert!(matches!(
            hv.detach_nic(UID, "p2").await,
            Err(HypervisorError::UnplugTimeout { .. })
        ));
        let ids: Vec<_> = hv
            .nics(UID)
            .await
            .unwrap()
            .into_iter()
            .map(|n| n.id)
            .collect();
        assert_eq!(ids, ["p2", "p3", "p4", "p5"]);
        hv.unplug_behind_our_back(UID, "p3");
        assert_eq!(hv.spec(UID).unwrap().nics.len(), 3);

        hv.fail_next(Operation::AttachNic, 1, |uid| {
            HypervisorError::NotRunning(uid.to_owned())
        });
        hv.attach_nic(UID, &nic("p3", 3)).await.unwrap_err();
        hv.attach_nic(UID, &nic("p3", 3)).await.unwrap();
        hv.stop(UID, Duration::ZERO).await.unwrap();
        assert!(matches!(
            hv.nics(UID).await,
            Err(HypervisorError::NotRunning(_))
        ));
        assert!(
            hv.changes()
                .iter()
                .any(|c| c.operation == Operation::DetachNic)
        );
    }

    fn disk(id: &str) -> Disk {
        Disk {
            id: id.into(),
            source: DiskSource::File {
                path: format!("/volumes/{id}.qcow2").into(),
                format: DiskFormat::Qcow2,
            },
            serial: id.into(),
            read_only: false,
        }
    }

    #[tokio::test]
    async fn disks_plug_into_a_running_vm_sharing_the_ports_with_nics() {
        let hv = MemoryHypervisor::new();
        assert!(matches!(
            hv.attach_disk(UID, &disk("v1")).await,
            Err(HypervisorError::NotFound(_))
        ));
        hv.start(&VmSpec {
            nics: vec![nic("p1", 1)],
            disks: vec![disk("v1")],
            ..spec(UID)
        })
        .await
        .unwrap();
        assert_eq!(hv.disks(UID).await.unwrap(), [disk("v1")]);
        // Idempotent; another source, serial or mode under the same id is a conflict.
        hv.attach_disk(UID, &disk("v2")).await.unwrap();
        hv.attach_disk(UID, &disk("v2")).await.unwrap();
        let read_only = Disk {
            read_only: true,
            ..disk("v2")
        };
        assert!(matches!(
            hv.attach_disk(UID, &read_only).await,
            Err(HypervisorError::DiskConflict { .. })
        ));
        let remote = Disk {
            source: DiskSource::Nbd {
                host: "10.0.0.2".into(),
                port: 10809,
                export: "v3".into(),
            },
            ..disk("v3")
        };
        hv.attach_disk(UID, &remote).await.unwrap();
        assert_eq!(
            hv.disks(UID).await.unwrap(),
            [disk("v1"), disk("v2"), remote.clone()]
        );
        let recorded: VmSpec = serde_json::from_slice(&hv.file(UID, "vm.json").unwrap()).unwrap();
        assert_eq!(recorded.disks, [disk("v1"), disk("v2"), remote.clone()]);
        // Six ports at launch (a NIC, a disk, four spare): a NIC and three disks fill them.
        hv.attach_nic(UID, &nic("p2", 2)).await.unwrap();
        hv.attach_disk(UID, &disk("v4")).await.unwrap();
        assert!(matches!(
            hv.attach_disk(UID, &disk("v5")).await,
            Err(HypervisorError::NoFreePort { device, .. }) if device == "disk v5"
        ));
        assert!(matches!(
            hv.attach_nic(UID, &nic("p3", 3)).await,
            Err(HypervisorError::NoFreePort { device, .. }) if device == "NIC p3"
        ));
        // A relative path is resolved, as the QEMU driver resolves it.
        hv.detach_disk(UID, "v4").await.unwrap();
        let relative = Disk {
            source: DiskSource::File {
                path: "v4.raw".into(),
                format: DiskFormat::Raw,
            },
            ..disk("v4")
        };
        hv.attach_disk(UID, &relative).await.unwrap();
        let resolved = crate::hypervisor::resolve_disk(&relative).unwrap();
        assert_eq!(hv.disks(UID).await.unwrap()[3], resolved);
        hv.attach_disk(UID, &relative).await.unwrap();

        // Disks grow, never shrink; not over NBD, as with QEMU 7.2.
        assert_eq!(hv.disk_size(UID, "v1"), Some(DEFAULT_DISK_SIZE));
        hv.resize_disk(UID, "v1", 2 << 30).await.unwrap();
        hv.resize_disk(UID, "v1", 2 << 30).await.unwrap();
        assert_eq!(hv.disk_size(UID, "v1"), Some(2 << 30));
        assert!(matches!(
            hv.resize_disk(UID, "v1", 1 << 30).await,
            Err(HypervisorError::InvalidSpec { .. })
        ));
        assert!(matches!(
            hv.resize_disk(UID, "v3", 2 << 30).await,
            Err(HypervisorError::Control { .. })
        ));
        assert!(matches!(
            hv.resize_disk(UID, "nope", 2 << 30).await,
            Err(HypervisorError::NoSuchDisk { .. })
        ));

        hv.detach_disk(UID, "v1").await.unwrap();
        hv.detach_disk(UID, "v1").await.unwrap();
        hv.set_releases_disks(UID, false);
        assert!(matches!(
            hv.detach_disk(UID, "v2").await,
            Err(HypervisorError::UnplugTimeout { .. })
        ));
        hv.unplug_disk_behind_our_back(UID, "v3");
        let ids: Vec<_> = hv
            .disks(UID)
            .await
            .unwrap()
            .into_iter()
            .map(|d| d.id)
            .collect();
        assert_eq!(ids, ["v2", "v4"]);
        assert_eq!(hv.spec(UID).unwrap().disks.len(), 2);
        hv.stop(UID, Duration::ZERO).await.unwrap();
        assert!(matches!(
            hv.disks(UID).await,
            Err(HypervisorError::NotRunning(_))
        ));
        assert!(matches!(
            hv.attach_disk(UID, &disk("v1")).await,
            Err(HypervisorError::NotRunning(_))
        ));
        let changes: Vec<_> = hv.changes().into_iter().map(|c| c.operation).collect();
        assert!(changes.contains(&Operation::ResizeDisk), "{changes:?}");
        assert!(!changes.contains(&Operation::Disks));
    }

    const UID: &str = "0b5c3a52-5a9e-4d35-8a1e-2f1c0f3b1a01";

    fn spec(uid: &str) -> VmSpec {
        VmSpec {
            uid: uid.into(),
            name: "web-1".into(),
            vcpus: 1,
            memory_mib: 128,
            boot_disk: Some(BootDisk {
                base: "/cache/sha256/abc".into(),
                base_format: DiskFormat::Raw,
                size_bytes: None,
            }),
            kernel: None,
            config_drive: Some(ConfigDrive {
                uuid: uid.into(),
                name: "web-1".into(),
                hostname: "web".into(),
                user_data: Some(b"#!/bin/sh\n".to_vec()),
                ..ConfigDrive::default()
            }),
            nics: Vec::new(),
            disks: Vec::new(),
            labels: BTreeMap::from([("ferro.io/server".to_owned(), "web-1".to_owned())]),
        }
    }

    fn ops(calls: &[Call]) -> Vec<(Operation, Outcome)> {
        calls
            .iter()
            .map(|c| (c.operation, c.outcome.clone()))
            .collect()
    }

    #[tokio::test]
    async fn a_started_vm_runs_with_its_files_and_a_second_start_adopts_it() {
        let hv = MemoryHypervisor::new();
        assert_eq!(hv.status(UID).await.unwrap(), None);
        let first = hv.start(&spec(UID)).await.unwrap();
        assert_eq!(first.state, VmState::Running);
        assert!(first.pid.is_some() && first.started_at.is_some());
        assert_eq!(first.labels["ferro.io/server"], "web-1");
        let meta = hv
            .file(UID, "config-2/openstack/latest/meta_data.json")
            .unwrap();
        assert!(
            String::from_utf8(meta)
                .unwrap()
                .contains("\"hostname\": \"web\"")
        );
        assert_eq!(
            hv.file(UID, "config-2/openstack/latest/user_data").unwrap(),
            b"#!/bin/sh\n"
        );
        assert!(hv.files(UID).contains_key(Path::new("disk.qcow2")));

        let again = hv.start(&spec(UID)).await.unwrap();
        assert_eq!(again, first, "the running VM is adopted, not started again");
        assert_eq!(hv.launches(UID), 1);
        assert_eq!(
            ops(&hv.journal()),
            [
                (Operation::Status, Outcome::Done),
                (Operation::Start, Outcome::Done),
                (Operation::Start, Outcome::Adopted),
            ]
        );
        assert_eq!(hv.changes().len(), 1);
        assert_eq!(hv.list().await.unwrap(), [first]);
    }

    #[tokio::test]
    async fn stop_reset_and_destroy_act_as_on_a_host() {
        let hv = MemoryHypervisor::new();
        hv.start(&spec(UID)).await.unwrap();
        hv.reset(UID).await.unwrap();
        assert_eq!(hv.resets(UID), 1);
        assert_eq!(
            hv.stop(UID, Duration::from_secs(1)).await.unwrap(),
            StopOutcome::Graceful
        );
        assert_eq!(hv.state(UID), Some(VmState::Stopped));
        assert!(matches!(
            hv.reset(UID).await,
            Err(HypervisorError::NotRunning(_))
        ));
        assert_eq!(
            hv.stop(UID, Duration::from_secs(1)).await.unwrap(),
            StopOutcome::AlreadyStopped
        );
        // A guest that ignores the power button is ended by force.
        hv.start(&spec(UID)).await.unwrap();
        hv.set_honours_acpi(UID, false);
        assert_eq!(
            hv.stop(UID, Duration::from_secs(1)).await.unwrap(),
            StopOutcome::Forced
        );
        assert_eq!(hv.launches(UID), 2);
        // The overlay survives a restart of the VM; destroy takes everything.
        assert!(!hv.files(UID).is_empty());
        hv.destroy(UID).await.unwrap();
        assert_eq!(hv.status(UID).await.unwrap(), None);
        assert!(hv.files(UID).is_empty());
        hv.destroy(UID).await.unwrap();
        assert!(matches!(
            hv.stop(UID, Duration::from_secs(1)).await,
            Err(HypervisorError::NotFound(_))
        ));
        assert!(matches!(
            hv.start(&VmSpec {
                uid: "../etc".into(),
                ..spec(UID)
            })
            .await,
            Err(HypervisorError::InvalidSpec { field: "uid", .. })
        ));
    }

    #[tokio::test]
    async fn drift_shows_as_the_qemu_driver_shows_it() {
        let hv = MemoryHypervisor::new();
        hv.start(&spec(UID)).await.unwrap();
        hv.crash(UID, "terminating on signal 9");
        let crashed = hv.status(UID).await.unwrap().unwrap();
        assert_eq!(crashed.state, VmState::Crashed);
        assert_eq!(crashed.pid, None);
        assert_eq!(crashed.detail.as_deref(), Some("terminating on signal 9"));
        // A restart clears the crash.
        hv.start(&spec(UID)).await.unwrap();
        hv.power_off_by_guest(UID);
        assert_eq!(hv.state(UID), Some(VmState::PoweredOff));
        // A stop makes any of these Stopped.
        hv.stop(UID, Duration::ZERO).await.unwrap();
        assert_eq!(hv.state(UID), Some(VmState::Stopped));
        hv.run_behind_our_back(UID);
        assert_eq!(hv.state(UID), Some(VmState::Running));
        hv.pause(UID, "guest-panicked");
        assert_eq!(hv.state(UID), Some(VmState::Paused));
        hv.reset(UID).await.unwrap();
        assert_eq!(hv.state(UID), Some(VmState::Running));
        hv.hang(UID);
        assert!(hv.status(UID).await.unwrap().unwrap().is_alive());
        assert_eq!(
            hv.stop(UID, Duration::ZERO).await.unwrap(),
            StopOutcome::Forced
        );
    }

    #[tokio::test]
    async fn planted_vms_and_a_restart_keep_what_the_host_holds() {
        let hv = MemoryHypervisor::new();
        hv.start(&spec(UID)).await.unwrap();
        hv.plant("orphan", BTreeMap::new(), true);
        hv.plant("cold", BTreeMap::new(), false);
        let after = hv.restart();
        assert!(after.journal().is_empty());
        let listed: Vec<_> = after
            .list()
            .await
            .unwrap()
            .into_iter()
            .map(|vm| (vm.uid, vm.state))
            .collect();
        assert_eq!(
            listed,
            [
                (UID.to_owned(), VmState::Running),
                ("cold".to_owned(), VmState::Stopped),
                ("orphan".to_owned(), VmState::Running),
            ]
        );
        assert_eq!(
            after.start(&spec(UID)).await.unwrap().pid,
            hv.status(UID).await.unwrap().unwrap().pid
        );
        assert_eq!(after.launches(UID), 1, "the guest outlived the driver");
        assert!(after.destroy("orphan").await.is_ok());
        assert_eq!(hv.uids(), [UID.to_owned(), "cold".to_owned()]);
    }

    #[tokio::test]
    async fn injected_failures_hit_the_next_calls_then_stop() {
        let hv = MemoryHypervisor::new();
        hv.fail_next_start(2);
        for _ in 0..2 {
            let err = hv.start(&spec(UID)).await.unwrap_err();
            assert!(matches!(err, HypervisorError::StartFailed { .. }), "{err}");
        }
        // A failed launch leaves what the start wrote, and nothing runs.
        assert_eq!(hv.state(UID), Some(VmState::Stopped));
        assert!(hv.files(UID).contains_key(Path::new("vm.json")));
        assert_eq!(hv.launches(UID), 0);
        assert_eq!(hv.start(&spec(UID)).await.unwrap().state, VmState::Running);
        // A restart that fails after a crash leaves a VM meant to run that does not.
        hv.crash(UID, "killed");
        hv.fail_next_start(1);
        hv.start(&spec(UID)).await.unwrap_err();
        assert_eq!(hv.state(UID), Some(VmState::PoweredOff));

        hv.fail_next_destroy(1);
        hv.keep_on_destroy(1);
        assert!(matches!(
            hv.destroy(UID).await,
            Err(HypervisorError::WouldNotDie { .. })
        ));
        hv.destroy(UID).await.unwrap();
        assert_eq!(hv.state(UID), Some(VmState::PoweredOff), "destroy lied");
        assert_eq!(hv.pending_faults(Operation::Destroy), 0);
        hv.destroy(UID).await.unwrap();
        assert_eq!(hv.state(UID), None);

        hv.fail_next_for(Operation::Status, "other", 1, |uid| {
            HypervisorError::NotRunning(uid.to_owned())
        });
        assert_eq!(hv.status(UID).await.unwrap(), None, "another VM's fault");
        hv.status("other").await.unwrap_err();
        hv.fail_next(Operation::List, 5, |_| HypervisorError::Io {
            what: "listing".into(),
            source: std::io::Error::other("disk on fire"),
        });
        hv.list().await.unwrap_err();
        hv.clear_faults();
        assert!(hv.list().await.unwrap().is_empty());
        let failed = hv
            .journal()
            .into_iter()
            .filter(|c| matches!(c.outcome, Outcome::Failed(_)))
            .count();
        assert_eq!(failed, 6);
    }
}
