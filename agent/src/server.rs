//! The Server reconciler: makes the guest of each Server bound to this node what the
//! Server asks for, and reports what the host shows.
//!
//! A reconcile takes a Server uid and nothing else. It observes the VM through the
//! driver (never from memory), plans with [`plan::plan`], applies the plan, observes
//! again and writes `status.host` and the `GuestRunning` condition — as writer `agent`,
//! the only part of a Server the agent owns — when they differ from what the Server says.
//! Running it twice is harmless: the second run finds the host as the first left it.
//!
//! - **Starting** resolves what the guest is built from: the Image (in the Server's
//!   project, then among public Images, by [`ferro_api::resolve`] as the controllers do,
//!   so several public Images of the name are `ImageAmbiguous`; the server controller's
//!   resolved uid is checked when it recorded one), the Image's kernel and ramdisk Images
//!   (in the Image's project, then public), and the KeyPair. Their bytes come from the
//!   node's image cache. Sizes come from the Flavor copy in `status.flavor`; a `diskGib`
//!   of 0 keeps the image's size. The config drive carries hostname, key and user data.
//! - **Deleting** (a `deletionTimestamp`) destroys the VM at once — no ACPI — and its
//!   files, checks that the driver no longer finds it, then removes the finalizer
//!   `ferro.io/agent` so the Server can go.
//! - **Orphans**: a VM on the host whose uid is not a Server bound here is destroyed only
//!   after a direct read of the Server its labels name (project and name, recorded when
//!   it was started) finds none, or one with another uid. A VM without such labels, or
//!   whose Server is bound elsewhere, is left alone and logged. Nothing is ever destroyed
//!   because a status field is empty.
//! - **Failures** (a missing Image or KeyPair, a bad checksum, a start QEMU refuses)
//!   become `GuestRunning=False` with a reason (`ImageNotFound`, `ImageChecksumMismatch`,
//!   `UnknownImageFormat`, `DownloadFailed`, `KeyPairNotFound`, `StartFailed`, …) while
//!   no guest runs, and the key is retried with backoff by the queue.
//! - **Boot**: an Image with a `kernel` boots it directly (with its ramdisk and command
//!   line); an Image without one is a bootable disk (what cloud images are), which the
//!   firmware (SeaBIOS) boots.
//! - **Events** about the Server tell its life on this node, each recorded where its
//!   action was applied and derived from the plan and what was observed, never from a
//!   remembered history, so a restarted agent replays nothing: `ImagePulled` (size and
//!   time) or `ImageCached`, `Created` (a new VM), `Started`, `Stopped`, `Rebooted`,
//!   `Crashed` (Warning) or `PoweredOff` when the guest ended by itself — recorded when
//!   `status.host` does not say so yet —, `Adopted` for a running guest this process
//!   finds for the first time (the one event that needs memory: the uids seen), and on
//!   delete `Deleted`. A failed action is a Warning named by its reason (`StartFailed`,
//!   `ImageNotFound`, …); a deletion waiting on a guest that cannot be destroyed is
//!   `DeletionBlocked`.

pub mod plan;

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferro_api::client::{Client, Selection};
use ferro_api::resolve::{Unresolved, resolve};
use ferro_api::v1::image_spec::DiskFormat as ImageFormat;
use ferro_api::v1::server_host_status::PowerState as HostPower;
use ferro_api::{Error, Kind, Resource, auth, owners, v1};

use crate::configdrive::ConfigDrive;
use crate::hypervisor::{
    BootDisk, DirectKernel, Disk, DiskFormat, DiskSource, Hypervisor, HypervisorError, Nic,
    StopOutcome, VmSpec, VmStatus,
};
use crate::images::{CachedFile, ImageCache, ImageError, ImageRef, error_chain};
use crate::volumes::VolumeBackend;
use ferro_runtime::events::Recorder;
use ferro_runtime::{Reconcile, Store, reflector::UID};
use plan::{Action, Applied, Desired, Failure, host_status, needs_write};

/// The VM label naming the owning Server's project.
pub const LABEL_PROJECT: &str = "ferro.io/project";
/// The VM label naming the owning Server.
pub const LABEL_SERVER: &str = "ferro.io/server";
/// The VM label naming the node that started it.
pub const LABEL_NODE: &str = "ferro.io/node";

/// Why a reconcile did not converge.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// The Server has no Flavor copy: it was not placed through Bind.
    #[error("status.flavor is empty: the server was not placed through Bind")]
    NotPlaced,
    /// The Volume the Server boots from cannot be attached (yet).
    #[error("boot volume {name}: {why}")]
    BootVolume {
        /// The Volume.
        name: String,
        /// Why not.
        why: String,
    },
    /// An Image name resolves to no Image, or to several public ones.
    #[error(transparent)]
    ImageUnresolved(Unresolved),
    /// The image the server controller resolved is gone (a new Image took its name).
    #[error("image {name} was replaced: uid {expected} is gone")]
    ImageReplaced {
        /// The name.
        name: String,
        /// The uid recorded in `status.resolved`.
        expected: String,
    },
    /// The Image is not something a guest boots from.
    #[error("image {name} cannot be booted: {reason}")]
    ImageNotBootable {
        /// The Image.
        name: String,
        /// Why not.
        reason: String,
    },
    /// The KeyPair is missing.
    #[error("key pair {name} not found in project {project}")]
    KeyPairNotFound {
        /// The name.
        name: String,
        /// The Server's project.
        project: String,
    },
    /// An Image could not be cached.
    #[error("image {name}")]
    Image {
        /// The Image.
        name: String,
        /// What went wrong.
        #[source]
        source: ImageError,
    },
    /// The Flavor's disk is smaller than the image.
    #[error(
        "the flavor's {flavor_gib} GiB disk is smaller than image {image} ({image_bytes} bytes)"
    )]
    FlavorDiskTooSmall {
        /// `status.flavor.diskGib`.
        flavor_gib: u64,
        /// The Image.
        image: String,
        /// Its virtual size.
        image_bytes: u64,
    },
    /// The driver could not say what the VM is doing.
    #[error("observing the guest")]
    Observe(#[source] HypervisorError),
    /// The VM did not start.
    #[error("starting the guest")]
    Start(#[source] HypervisorError),
    /// The VM did not stop.
    #[error("stopping the guest")]
    Stop(#[source] HypervisorError),
    /// The reset failed.
    #[error("resetting the guest")]
    Reset(#[source] HypervisorError),
    /// The VM could not be destroyed.
    #[error("destroying the guest")]
    Destroy(#[source] HypervisorError),
    /// Destroy returned, yet the driver still finds the VM.
    #[error("VM {0} is still on the host after destroy")]
    StillPresent(String),
    /// Plugging NICs into or out of the running guest failed.
    #[error("hot-plugging NICs")]
    Nics(#[source] HypervisorError),
    /// Attaching volumes to or detaching them from the running guest failed.
    #[error("attaching volumes")]
    Disks(#[source] HypervisorError),
    /// An API call failed.
    #[error("API")]
    Api(#[from] Error),
}

impl ReconcileError {
    /// The `GuestRunning` reason for this error.
    pub fn reason(&self) -> &'static str {
        match self {
            ReconcileError::NotPlaced => "NotPlaced",
            ReconcileError::BootVolume { .. } => "BootVolumeNotReady",
            ReconcileError::ImageUnresolved(Unresolved::NotFound { .. })
            | ReconcileError::ImageReplaced { .. } => "ImageNotFound",
            ReconcileError::ImageUnresolved(Unresolved::Ambiguous { .. }) => "ImageAmbiguous",
            ReconcileError::ImageNotBootable { .. } => "ImageNotBootable",
            ReconcileError::KeyPairNotFound { .. } => "KeyPairNotFound",
            ReconcileError::Image { source, .. } => source.reason(),
            ReconcileError::FlavorDiskTooSmall { .. } => "FlavorDiskTooSmall",
            ReconcileError::Observe(_) => "HypervisorError",
            ReconcileError::Start(_) => "StartFailed",
            ReconcileError::Stop(_) => "StopFailed",
            ReconcileError::Reset(_) => "ResetFailed",
            ReconcileError::Destroy(_) | ReconcileError::StillPresent(_) => "DestroyFailed",
            ReconcileError::Nics(_) => "NicHotplugFailed",
            ReconcileError::Disks(_) => "VolumeAttachFailed",
            ReconcileError::Api(_) => "ApiError",
        }
    }

    /// The error as a condition's reason and message.
    pub fn failure(&self) -> Failure {
        Failure {
            reason: self.reason().to_owned(),
            message: error_chain(self),
        }
    }
}

/// Drives the guests of the Servers bound to one node.
pub struct ServerReconciler {
    /// The API, with the node's token.
    pub client: Client,
    /// The hypervisor driver.
    pub driver: Arc<dyn Hypervisor>,
    /// The node's image cache.
    pub images: Arc<dyn ImageCache>,
    /// The Servers bound to this node (indexed by uid, as every store is).
    pub cache: Store<v1::Server>,
    /// Every Port: a guest's NICs are its Server's Ports once this node plugged them in.
    pub ports: Store<v1::Port>,
    /// This node's name.
    pub node: String,
    /// This node's availability zone, for config drives.
    pub zone: String,
    /// How long a guest gets to power off after the ACPI button before it is forced.
    pub stop_grace: Duration,
    /// Records the Events of each Server's life on this node.
    pub recorder: Recorder,
    /// The guests this process has seen running or started.
    pub seen: SeenGuests,
    /// Every Volume: a guest's disks are its Server's Volumes once they are ready.
    pub volumes: Store<v1::Volume>,
    /// This node's volume backend, which opens the volumes placed here; `None` on a node
    /// that holds none (it reaches every volume over NBD).
    pub volume_backend: Option<Arc<dyn VolumeBackend>>,
}

/// The uids of the guests one agent process has started or found running: a guest found
/// running that is not among them was adopted (the agent restarted under it).
#[derive(Debug, Default)]
pub struct SeenGuests(Mutex<HashSet<String>>);

impl SeenGuests {
    /// Marks `uid` seen; true when it was not yet.
    fn insert(&self, uid: &str) -> bool {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(uid.to_owned())
    }

    /// Forgets `uid` (its guest is gone).
    fn remove(&self, uid: &str) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).remove(uid);
    }
}

/// Maps a change of a Port to the Servers on this node that list it (by uid, the Server
/// reconciler's key): a guest waits for its Ports to be plugged in before it starts.
pub fn servers_of_port(
    servers: Store<v1::Server>,
) -> impl Fn(&ferro_runtime::reflector::Change<v1::Port>) -> Vec<String> + Send + Sync + 'static {
    move |change| {
        let mut keys = Vec::new();
        for port in change.old.iter().chain(change.new.iter()) {
            let Some(m) = &port.metadata else { continue };
            for server in servers.list() {
                let Some(sm) = &server.metadata else { continue };
                let lists = sm.project == m.project
                    && server
                        .status
                        .as_ref()
                        .is_some_and(|s| s.ports.contains(&m.name));
                if lists && !keys.contains(&sm.uid) {
                    keys.push(sm.uid.clone());
                }
            }
        }
        keys
    }
}

/// The Servers bound here whose `spec.volumes` names a changed Volume.
pub fn servers_of_volume(
    servers: Store<v1::Server>,
) -> impl Fn(&ferro_runtime::reflector::Change<v1::Volume>) -> Vec<String> + Send + Sync + 'static {
    move |change| {
        let mut keys = Vec::new();
        for volume in change.old.iter().chain(change.new.iter()) {
            let Some(m) = &volume.metadata else { continue };
            for server in servers.list() {
                let Some(sm) = &server.metadata else { continue };
                let lists = sm.project == m.project
                    && server.spec.as_ref().is_some_and(|s| {
                        s.boot_volume == m.name || s.volumes.iter().any(|v| v.volume == m.name)
                    });
                if lists && !keys.contains(&sm.uid) {
                    keys.push(sm.uid.clone());
                }
            }
        }
        keys
    }
}

/// The component an agent's Events name: `agent/<node>`, which the apiserver also checks
/// before it lets a node bump an Event.
pub fn event_component(node: &str) -> String {
    auth::agent_component(node)
}

impl ServerReconciler {
    /// Reconciles the Server (or stray VM) with this uid.
    pub async fn reconcile(&self, uid: &str) -> Result<(), ReconcileError> {
        if crate::hypervisor::validate_uid(uid).is_err() {
            tracing::warn!(uid, "ignoring a server uid that cannot name a VM");
            return Ok(());
        }
        let observed = self
            .driver
            .status(uid)
            .await
            .map_err(ReconcileError::Observe)?;
        match self.cached_server(uid) {
            Some(server) => self.reconcile_server(server, observed).await,
            None => self.reconcile_stray(uid, observed).await,
        }
    }

    /// The cached Server with this uid, if it is bound here.
    fn cached_server(&self, uid: &str) -> Option<v1::Server> {
        let found = self.cache.by_index(UID, uid).into_iter().next();
        found.map(|server| (*server).clone())
    }

    async fn reconcile_server(
        &self,
        server: v1::Server,
        observed: Option<VmStatus>,
    ) -> Result<(), ReconcileError> {
        let uid = uid_of(&server).to_owned();
        let desired = Desired::of(&server);
        let plan = plan::plan(&desired, observed.as_ref());
        if !desired.deleting
            && observed.as_ref().is_some_and(VmStatus::is_alive)
            && self.seen.insert(&uid)
        {
            let message = match observed.as_ref().and_then(|vm| vm.pid) {
                Some(pid) => format!("found the guest running (pid {pid}) on node {}", self.node),
                None => format!("found the guest running on node {}", self.node),
            };
            self.normal(&server, "Adopted", &message).await;
        }
        let mut applied = Applied::default();
        let mut result = self
            .apply(&server, &plan, observed.as_ref(), &mut applied)
            .await;
        if result.is_ok() && !desired.deleting && observed.as_ref().is_some_and(VmStatus::is_alive)
        {
            result = self.sync_nics(&server).await;
        }
        if result.is_ok() && !desired.deleting && observed.as_ref().is_some_and(VmStatus::is_alive)
        {
            result = self.sync_disks(&server).await;
        }
        if let Err(e) = &result {
            let reason = match e {
                ReconcileError::Destroy(_) | ReconcileError::StillPresent(_) => "DeletionBlocked",
                e => e.reason(),
            };
            self.warning(&server, reason, &error_chain(e)).await;
        }
        if desired.deleting {
            return result;
        }
        let observed = match self.driver.status(&uid).await {
            Ok(observed) => observed,
            Err(e) => return result.and(Err(ReconcileError::Observe(e))),
        };
        let failure = result
            .as_ref()
            .err()
            .map(ReconcileError::failure)
            .or_else(|| {
                applied.waiting.clone().map(|message| Failure {
                    reason: "WaitingForPorts".to_owned(),
                    message,
                })
            });
        let (mut host, guest) = host_status(
            &server,
            &desired,
            &plan,
            observed.as_ref(),
            &applied,
            failure.as_ref(),
        );
        if observed.as_ref().is_some_and(VmStatus::is_alive) {
            // When QEMU does not answer, what was last read stands: an empty list would
            // let the volume be deleted from under the guest.
            host.volumes = match self.attached_volumes(&uid).await {
                Some(volumes) => volumes,
                None => server
                    .status
                    .as_ref()
                    .and_then(|s| s.host.as_ref())
                    .map(|h| h.volumes.clone())
                    .unwrap_or_default(),
            };
        }
        if needs_write(&server, &host, &guest)
            && let Err(e) = self.write_status(&server, host, guest).await
        {
            return result.and(Err(e));
        }
        result
    }

    async fn apply(
        &self,
        server: &v1::Server,
        plan: &plan::Plan,
        observed: Option<&VmStatus>,
        applied: &mut Applied,
    ) -> Result<(), ReconcileError> {
        let uid = uid_of(server);
        let name = display(server);
        self.record_exit(server, plan).await;
        for action in &plan.actions {
            match action {
                Action::Start => {
                    let nics = match self.nics(server) {
                        Ok(nics) => nics,
                        Err(waiting) => {
                            applied.waiting = Some(waiting);
                            continue;
                        }
                    };
                    let mut spec = self.prepare(server).await?;
                    spec.nics = nics;
                    spec.disks.extend(self.disks(server, &[]).await.0);
                    let started = self
                        .driver
                        .start(&spec)
                        .await
                        .map_err(ReconcileError::Start)?;
                    self.seen.insert(uid);
                    applied.restarted = plan.restart;
                    if observed.is_none() {
                        let message = format!(
                            "created the guest on node {}: {} vCPUs, {} MiB",
                            self.node, spec.vcpus, spec.memory_mib
                        );
                        self.normal(server, "Created", &message).await;
                    }
                    let message = if plan.restart {
                        let why = plan
                            .exit
                            .as_ref()
                            .map(plan::Exit::describe)
                            .unwrap_or_default();
                        tracing::info!(server = %name, pid = started.pid, %why, "restarted the guest");
                        format!("restarted the guest after {why}")
                    } else {
                        tracing::info!(server = %name, pid = started.pid, "started the guest");
                        "started the guest".to_owned()
                    };
                    self.normal(server, "Started", &message).await;
                }
                Action::Stop => {
                    let outcome = self
                        .driver
                        .stop(uid, self.stop_grace)
                        .await
                        .map_err(ReconcileError::Stop)?;
                    tracing::info!(server = %name, ?outcome, "stopped the guest");
                    let message = match outcome {
                        StopOutcome::AlreadyStopped => "the guest was not running".to_owned(),
                        StopOutcome::Graceful => {
                            "the guest powered off after the ACPI power button".to_owned()
                        }
                        StopOutcome::Forced => format!(
                            "the guest did not power off within {}s of the ACPI power button; ended it",
                            self.stop_grace.as_secs()
                        ),
                    };
                    self.normal(server, "Stopped", &message).await;
                }
                Action::Reset(request) => {
                    self.driver
                        .reset(uid)
                        .await
                        .map_err(ReconcileError::Reset)?;
                    applied.reboot = Some(request.clone());
                    tracing::info!(server = %name, %request, "reset the guest");
                    let message = format!("reset the guest, as asked at {request}");
                    self.normal(server, "Rebooted", &message).await;
                }
                Action::Destroy => {
                    self.destroy(uid).await?;
                    self.seen.remove(uid);
                    tracing::info!(server = %name, "destroyed the guest and its files");
                    let was = observed.map_or_else(
                        || "gone".to_owned(),
                        |vm| format!("{:?}", vm.state).to_lowercase(),
                    );
                    let message = format!("destroyed the guest ({was}) and its files");
                    self.normal(server, "Deleted", &message).await;
                }
                Action::RemoveFinalizer => {
                    self.remove_finalizer(server).await?;
                    tracing::info!(server = %name, "released the server");
                }
            }
        }
        if let Some(request) = &plan.reboot_without_reset {
            applied.reboot = Some(request.clone());
        }
        Ok(())
    }

    /// The guest's NICs: its Server's Ports in order, each once this node has plugged it
    /// in (`status.node` here and `bound`); otherwise what the start waits for.
    fn nics(&self, server: &v1::Server) -> Result<Vec<Nic>, String> {
        let (nics, unplugged) = self.plugged_nics(server);
        let wanted = server.spec.as_ref().map_or(0, |s| s.networks.len());
        let listed = server.status.as_ref().map_or(0, |s| s.ports.len());
        if listed < wanted {
            return Err(format!(
                "waiting for the server's {wanted} ports to be created"
            ));
        }
        if unplugged.is_empty() {
            Ok(nics)
        } else {
            Err(format!(
                "waiting for node {} to plug in port {}",
                self.node,
                unplugged.join(", ")
            ))
        }
    }

    /// The NICs of the Server's Ports this node has plugged in, in order, and the names of
    /// those it has not (yet).
    fn plugged_nics(&self, server: &v1::Server) -> (Vec<Nic>, Vec<String>) {
        let project = server
            .metadata
            .as_ref()
            .map(|m| m.project.as_str())
            .unwrap_or_default();
        let mut nics = Vec::new();
        let mut unplugged = Vec::new();
        for name in server.status.iter().flat_map(|s| &s.ports) {
            let port = self.ports.get_named(project, name);
            let plugged = port.as_ref().and_then(|port| {
                let status = port.status.as_ref()?;
                let uid = port.metadata.as_ref()?.uid.clone();
                (status.bound && status.node == self.node && !status.mac.is_empty()).then(|| Nic {
                    tap: crate::network::plan::tap_name(&uid),
                    id: uid,
                    mac: status.mac.clone(),
                })
            });
            match plugged {
                Some(nic) => nics.push(nic),
                None => unplugged.push(name.clone()),
            }
        }
        (nics, unplugged)
    }

    /// Hot-plugs into a running guest the NICs of Ports plugged in since it started, and
    /// unplugs those of Ports it no longer has, comparing with what QEMU reports.
    async fn sync_nics(&self, server: &v1::Server) -> Result<(), ReconcileError> {
        let uid = uid_of(server);
        let (wanted, _) = self.plugged_nics(server);
        let current = match self.driver.nics(uid).await {
            Ok(current) => current,
            Err(HypervisorError::NotRunning(_)) => return Ok(()),
            Err(e) => return Err(ReconcileError::Nics(e)),
        };
        let listed: HashSet<String> = {
            let project = server
                .metadata
                .as_ref()
                .map(|m| m.project.as_str())
                .unwrap_or("");
            server
                .status
                .iter()
                .flat_map(|s| &s.ports)
                .filter_map(|name| self.ports.get_named(project, name))
                .filter_map(|p| p.metadata.as_ref().map(|m| m.uid.clone()))
                .collect()
        };
        for nic in &current {
            if !listed.contains(&nic.id) {
                self.driver
                    .detach_nic(uid, &nic.id)
                    .await
                    .map_err(ReconcileError::Nics)?;
                let message = format!(
                    "unplugged NIC {} ({}) from the running guest",
                    nic.tap, nic.mac
                );
                self.normal(server, "NicDetached", &message).await;
            }
        }
        for nic in &wanted {
            if !current.iter().any(|c| c.id == nic.id) {
                self.driver
                    .attach_nic(uid, nic)
                    .await
                    .map_err(ReconcileError::Nics)?;
                let message = format!(
                    "plugged NIC {} ({}) into the running guest",
                    nic.tap, nic.mac
                );
                self.normal(server, "NicAttached", &message).await;
            }
        }
        Ok(())
    }

    /// The guest's data disks: its `spec.volumes` that are ready to attach, in order, and
    /// why the others are not. A volume on this node is opened as a file; one on another
    /// node through the NBD export its node made for this server.
    /// Volumes the guest has already (`attached`) are left out: nothing is read for them.
    async fn disks(&self, server: &v1::Server, attached: &[Disk]) -> (Vec<Disk>, Vec<String>) {
        let meta = server.metadata.clone().unwrap_or_default();
        let mut disks = Vec::new();
        let mut waiting = Vec::new();
        for wanted in server.spec.iter().flat_map(|s| &s.volumes) {
            let name = &wanted.volume;
            let Some(volume) = self.volumes.get_named(&meta.project, name) else {
                waiting.push(format!("volume {name} not found"));
                continue;
            };
            let uid = volume.metadata.as_ref().map(|m| m.uid.as_str());
            if attached.iter().any(|d| Some(d.id.as_str()) == uid) {
                continue;
            }
            match self.disk_of(&meta, &volume).await {
                Ok(disk) => disks.push(disk),
                Err(why) => waiting.push(format!("volume {name}: {why}")),
            }
        }
        (disks, waiting)
    }

    /// How this server's guest reaches `volume`, or why it cannot yet.
    async fn disk_of(&self, server: &v1::ObjectMeta, volume: &v1::Volume) -> Result<Disk, String> {
        let vm = volume.metadata.clone().unwrap_or_default();
        let status = volume.status.clone().unwrap_or_default();
        let spec = volume.spec.clone().unwrap_or_default();
        if vm.deletion_timestamp.is_some() {
            return Err("is being deleted".to_owned());
        }
        if status.phase != v1::volume_status::Phase::Available as i32
            && status.phase != v1::volume_status::Phase::InUse as i32
        {
            return Err("is not ready".to_owned());
        }
        if !spec.multiattach
            && let Some(other) = status.attachments.iter().find(|a| a.server != server.name)
        {
            return Err(format!("is attached to server {}", other.server));
        }
        let serial: String = vm.uid.chars().filter(|c| *c != '-').take(20).collect();
        let source = if status.node == self.node {
            let Some(backend) = &self.volume_backend else {
                return Err(format!("node {} holds no volumes", self.node));
            };
            match backend.get(&vm.uid).await {
                Ok(Some(info)) => DiskSource::File {
                    path: info.path,
                    format: info.format,
                },
                Ok(None) => return Err(format!("not found on node {}", self.node)),
                Err(e) => return Err(error_chain(&e)),
            }
        } else {
            let Some(export) = status.exports.iter().find(|e| e.server_uid == server.uid) else {
                return Err(format!("waiting for node {} to export it", status.node));
            };
            let Some((host, port)) = crate::storage::split_host_port(&export.address) else {
                return Err(format!(
                    "export address {:?} is not host:port",
                    export.address
                ));
            };
            DiskSource::Nbd {
                host,
                port,
                export: export.name.clone(),
            }
        };
        Ok(Disk {
            id: vm.uid,
            source,
            serial,
            read_only: false,
        })
    }

    /// Attaches to the running guest the volumes it should have and lacks, and detaches
    /// those it has and should not, comparing with what the hypervisor reports.
    async fn sync_disks(&self, server: &v1::Server) -> Result<(), ReconcileError> {
        let uid = uid_of(server);
        let current = match self.driver.disks(uid).await {
            Ok(current) => current,
            Err(HypervisorError::NotRunning(_)) => return Ok(()),
            Err(e) => return Err(ReconcileError::Disks(e)),
        };
        let project = server
            .metadata
            .as_ref()
            .map(|m| m.project.clone())
            .unwrap_or_default();
        // The uids of the volumes the spec lists (ready or not): an attached one stays.
        let listed: HashSet<String> = server
            .spec
            .iter()
            .flat_map(|s| s.volumes.iter().map(|v| &v.volume).chain([&s.boot_volume]))
            .filter(|name| !name.is_empty())
            .filter_map(|name| self.volumes.get_named(&project, name))
            .filter(|v| {
                v.metadata
                    .as_ref()
                    .is_some_and(|m| m.deletion_timestamp.is_none())
            })
            .filter_map(|v| v.metadata.as_ref().map(|m| m.uid.clone()))
            .collect();
        for disk in &current {
            if !listed.contains(&disk.id) {
                self.driver
                    .detach_disk(uid, &disk.id)
                    .await
                    .map_err(ReconcileError::Disks)?;
                let name = self.volume_name(&disk.id);
                let message = format!("detached volume {name} from the running guest");
                self.normal(server, "VolumeDetached", &message).await;
            }
        }
        let (wanted, waiting) = self.disks(server, &current).await;
        if !waiting.is_empty() {
            let message = format!("waiting to attach: {}", waiting.join("; "));
            self.normal(server, "WaitingForVolume", &message).await;
        }
        for disk in &wanted {
            if !current.iter().any(|c| c.id == disk.id) {
                let started = std::time::Instant::now();
                self.driver
                    .attach_disk(uid, disk)
                    .await
                    .map_err(ReconcileError::Disks)?;
                let name = self.volume_name(&disk.id);
                let how = match &disk.source {
                    DiskSource::File { .. } => "from this node".to_owned(),
                    DiskSource::Nbd { host, port, .. } => format!("over NBD from {host}:{port}"),
                };
                let message = format!(
                    "attached volume {name} ({how}) to the running guest in {:.2}s, serial {}",
                    started.elapsed().as_secs_f64(),
                    disk.serial
                );
                self.normal(server, "VolumeAttached", &message).await;
            }
        }
        self.grow_disks(server, &current).await
    }

    /// Grows online the attached volumes of this node whose `spec.sizeGib` grew: QEMU
    /// resizes the file it has open, and the guest sees the new size. A volume attached
    /// over NBD keeps its size until detached (QEMU 7.2 cannot grow an NBD disk); its
    /// storage node says so.
    async fn grow_disks(
        &self,
        server: &v1::Server,
        attached: &[Disk],
    ) -> Result<(), ReconcileError> {
        let Some(backend) = &self.volume_backend else {
            return Ok(());
        };
        let uid = uid_of(server);
        for disk in attached {
            if !matches!(disk.source, DiskSource::File { .. }) {
                continue;
            }
            let Some(volume) = self.volumes.by_index(UID, &disk.id).into_iter().next() else {
                continue;
            };
            if volume.status.as_ref().is_none_or(|s| s.node != self.node) {
                continue;
            }
            let wanted = volume.spec.as_ref().map_or(0, |s| s.size_gib) << 30;
            // The size its node reports first: the file is read only when a grow is due.
            let reported = volume.status.as_ref().map_or(0, |s| s.size_gib) << 30;
            if wanted <= reported {
                continue;
            }
            let has = match backend.get(&disk.id).await {
                Ok(Some(info)) => info.size_bytes,
                _ => continue,
            };
            if wanted <= has {
                continue;
            }
            self.driver
                .resize_disk(uid, &disk.id, wanted)
                .await
                .map_err(ReconcileError::Disks)?;
            let message = format!(
                "grew volume {} to {} GiB in the running guest",
                self.volume_name(&disk.id),
                wanted >> 30
            );
            self.normal(server, "VolumeGrown", &message).await;
        }
        Ok(())
    }

    /// The volumes the running guest has, as the hypervisor reports them; `None` when it
    /// could not say.
    async fn attached_volumes(&self, uid: &str) -> Option<Vec<v1::AttachedVolume>> {
        match self.driver.disks(uid).await {
            Ok(disks) => Some(
                disks
                    .into_iter()
                    .map(|d| v1::AttachedVolume {
                        volume: self.volume_name(&d.id),
                        uid: d.id,
                        serial: d.serial,
                    })
                    .collect(),
            ),
            Err(HypervisorError::NotRunning(_)) => Some(Vec::new()),
            Err(e) => {
                tracing::warn!(uid, error = %error_chain(&e), "reading the guest's disks failed; keeping what was last seen");
                None
            }
        }
    }

    fn volume_name(&self, uid: &str) -> String {
        self.volumes
            .by_index(UID, uid)
            .first()
            .and_then(|v| v.metadata.as_ref().map(|m| m.name.clone()))
            .unwrap_or_else(|| uid.to_owned())
    }

    /// Records a Normal event about `server`. The recording future is boxed: it is large,
    /// and inlined at every step it would make each reconcile's future as large.
    async fn normal(&self, server: &v1::Server, reason: &str, message: &str) {
        Box::pin(self.recorder.normal(server, reason, message)).await;
    }

    /// Records a Warning event about `server` (boxed as [`Self::normal`] is).
    async fn warning(&self, server: &v1::Server, reason: &str, message: &str) {
        Box::pin(self.recorder.warning(server, reason, message)).await;
    }

    /// Records how the guest ended by itself, when the plan found it so and `status.host`
    /// does not say so yet: read from the Server, so each exit is told once.
    async fn record_exit(&self, server: &v1::Server, plan: &plan::Plan) {
        let Some(exit) = &plan.exit else { return };
        let recorded = server
            .status
            .as_ref()
            .and_then(|s| s.host.as_ref())
            .map(|h| h.power_state)
            .and_then(|p| HostPower::try_from(p).ok());
        if matches!(recorded, Some(HostPower::Crashed | HostPower::Shutdown)) {
            return;
        }
        match exit {
            plan::Exit::Crashed(_) => {
                self.warning(server, "Crashed", &exit.describe()).await;
            }
            plan::Exit::PoweredOff => {
                self.normal(server, "PoweredOff", &exit.describe()).await;
            }
        }
    }

    async fn destroy(&self, uid: &str) -> Result<(), ReconcileError> {
        self.driver
            .destroy(uid)
            .await
            .map_err(ReconcileError::Destroy)?;
        match self.driver.status(uid).await {
            Ok(None) => Ok(()),
            Ok(Some(_)) => Err(ReconcileError::StillPresent(uid.to_owned())),
            Err(e) => Err(ReconcileError::Observe(e)),
        }
    }

    /// Removes the agent's finalizer from the Server, if it is still this Server (same
    /// uid) and still has it.
    async fn remove_finalizer(&self, server: &v1::Server) -> Result<(), ReconcileError> {
        let meta = server.metadata.clone().unwrap_or_default();
        Ok(crate::node::remove_agent_finalizer::<v1::Server>(&self.client, &meta).await?)
    }

    async fn write_status(
        &self,
        server: &v1::Server,
        host: v1::ServerHostStatus,
        guest: v1::Condition,
    ) -> Result<(), ReconcileError> {
        let meta = server.metadata.clone().unwrap_or_default();
        let patch = v1::Server {
            metadata: Some(v1::ObjectMeta {
                name: meta.name,
                project: meta.project,
                ..Default::default()
            }),
            spec: None,
            status: Some(v1::ServerStatus {
                host: Some(host),
                ..Default::default()
            }),
        };
        match self
            .client
            .update_status(patch.into_object(), owners::AGENT, &["host"], vec![guest])
            .await
        {
            Ok(written) => {
                if let Some(written) = v1::Server::from_object(written)
                    && uid_of(&written) == meta.uid
                {
                    // The next reconcile must see what was just written (restart counts
                    // add up from it), even before the watch delivers it.
                    self.cache.apply(written);
                }
                Ok(())
            }
            // Gone meanwhile (or no longer ours): nothing to report on.
            Err(Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// A VM whose uid is no Server in the cache: a Server the cache has not caught up
    /// with, or an orphan.
    async fn reconcile_stray(
        &self,
        uid: &str,
        observed: Option<VmStatus>,
    ) -> Result<(), ReconcileError> {
        let Some(vm) = observed else {
            return Ok(());
        };
        let (Some(project), Some(name)) =
            (vm.labels.get(LABEL_PROJECT), vm.labels.get(LABEL_SERVER))
        else {
            tracing::warn!(uid, "a VM on this host names no owner; leaving it alone");
            return Ok(());
        };
        match self.client.get_typed::<v1::Server>(project, name).await {
            Ok(server) if uid_of(&server) == uid => {
                let node = server
                    .status
                    .as_ref()
                    .map(|s| s.node.as_str())
                    .unwrap_or_default();
                if node == self.node {
                    return self.reconcile_server(server, Some(vm)).await;
                }
                tracing::warn!(uid, server = %format!("{project}/{name}"), node, "a VM on this host belongs to a server bound to another node; leaving it alone");
                Ok(())
            }
            Ok(_) | Err(Error::NotFound { .. }) => {
                tracing::info!(uid, server = %format!("{project}/{name}"), state = ?vm.state, "destroying an orphaned VM: its server is gone");
                self.destroy(uid).await
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Everything the VM needs: images in the cache, the key, the config drive.
    async fn prepare(&self, server: &v1::Server) -> Result<VmSpec, ReconcileError> {
        let meta = server.metadata.clone().unwrap_or_default();
        let spec = server.spec.clone().unwrap_or_default();
        let status = server.status.clone().unwrap_or_default();
        if status.flavor.is_none() {
            return Err(ReconcileError::NotPlaced);
        }
        // A server booted from a Volume boots the kernel of the Image the volume was made
        // from, if that Image has one, and otherwise the volume itself through firmware.
        let (boot_volume, image) = if spec.image.is_empty() {
            let (disk, image) = self.boot_volume(server).await?;
            (Some(disk), image)
        } else {
            (None, Some(self.server_image(server).await?))
        };
        let image = image.unwrap_or_default();
        let image_spec = image.spec.clone().unwrap_or_default();
        let image_project = image
            .metadata
            .as_ref()
            .map(|m| m.project.clone())
            .unwrap_or_default();
        let kernel = match image_spec.kernel.as_str() {
            "" => None,
            name => Some(self.resolve_image(&image_project, name).await?),
        };
        let ramdisk = match image_spec.ramdisk.as_str() {
            "" => None,
            name => Some(self.resolve_image(&image_project, name).await?),
        };
        let key = match spec.key_pair.as_str() {
            "" => None,
            name => match self
                .client
                .get_typed::<v1::KeyPair>(&meta.project, name)
                .await
            {
                Ok(key) => Some((name.to_owned(), key.spec.unwrap_or_default().public_key)),
                Err(Error::NotFound { .. }) => {
                    return Err(ReconcileError::KeyPairNotFound {
                        name: name.to_owned(),
                        project: meta.project.clone(),
                    });
                }
                Err(e) => return Err(e.into()),
            },
        };
        let disk = if boot_volume.is_none() {
            check_bootable(&image)?;
            Some(self.cached(server, &image).await?)
        } else {
            None
        };
        let kernel = match &kernel {
            Some(k) => Some(self.cached(server, k).await?),
            None => None,
        };
        let initrd = match &ramdisk {
            Some(r) => Some(self.cached(server, r).await?),
            None => None,
        };
        let boot = BootFiles {
            image: spec.image.clone(),
            disk,
            kernel,
            initrd,
            cmdline: image_spec.kernel_command_line,
        };
        let mut vm = vm_spec(server, &boot, key, &self.node, &self.zone)?;
        vm.disks.extend(boot_volume);
        Ok(vm)
    }

    /// The Image of `spec.image`, as the server controller resolved it.
    async fn server_image(&self, server: &v1::Server) -> Result<v1::Image, ReconcileError> {
        let meta = server.metadata.clone().unwrap_or_default();
        let spec = server.spec.clone().unwrap_or_default();
        let status = server.status.clone().unwrap_or_default();
        let resolved = status
            .resolved
            .iter()
            .find(|r| r.kind == Kind::Image.name() && r.name == spec.image);
        match resolved {
            Some(r) if !r.project.is_empty() => {
                let image = self.get_image(&r.project, &spec.image).await?;
                if !r.uid.is_empty() && image.metadata.as_ref().is_some_and(|m| m.uid != r.uid) {
                    return Err(ReconcileError::ImageReplaced {
                        name: spec.image.clone(),
                        expected: r.uid.clone(),
                    });
                }
                Ok(image)
            }
            _ => self.resolve_image(&meta.project, &spec.image).await,
        }
    }

    /// The disk of `spec.bootVolume`, once the volume is bootable and ready, and the Image
    /// it was made from (whose kernel boots it), if that Image is still there.
    async fn boot_volume(
        &self,
        server: &v1::Server,
    ) -> Result<(Disk, Option<v1::Image>), ReconcileError> {
        let meta = server.metadata.clone().unwrap_or_default();
        let name = server
            .spec
            .as_ref()
            .map(|s| s.boot_volume.clone())
            .unwrap_or_default();
        let not_ready = |why: String| ReconcileError::BootVolume {
            name: name.clone(),
            why,
        };
        let volume = self
            .volumes
            .get_named(&meta.project, &name)
            .ok_or_else(|| not_ready(format!("not found in project {}", meta.project)))?;
        let spec = volume.spec.clone().unwrap_or_default();
        if spec.bootable != Some(true) {
            return Err(not_ready(
                "is not bootable (spec.bootable: false)".to_owned(),
            ));
        }
        let disk = self.disk_of(&meta, &volume).await.map_err(not_ready)?;
        let source = spec.source.unwrap_or_default().image;
        let image = if source.is_empty() {
            None
        } else {
            let project = volume
                .metadata
                .as_ref()
                .map(|m| m.project.clone())
                .unwrap_or_default();
            self.resolve_image(&project, &source).await.ok()
        };
        Ok((disk, image))
    }

    /// An Image's file from the node's cache, and the event saying whether it had to be
    /// fetched for `server`.
    async fn cached(
        &self,
        server: &v1::Server,
        image: &v1::Image,
    ) -> Result<CachedFile, ReconcileError> {
        let image = ImageRef::of(image);
        let file = self
            .images
            .ensure(&image)
            .await
            .map_err(|source| ReconcileError::Image {
                name: image.name.clone(),
                source,
            })?;
        match file.fetched_in {
            Some(took) => {
                let message = format!(
                    "pulled image {} ({} bytes) in {:.1}s",
                    image.display(),
                    file.size_bytes,
                    took.as_secs_f64()
                );
                self.normal(server, "ImagePulled", &message).await;
            }
            None => {
                let message = format!("image {} is already on the node", image.display());
                self.normal(server, "ImageCached", &message).await;
            }
        }
        Ok(file)
    }

    async fn get_image(&self, project: &str, name: &str) -> Result<v1::Image, ReconcileError> {
        match self.client.get_typed::<v1::Image>(project, name).await {
            Ok(image) => Ok(image),
            Err(Error::NotFound { .. }) => {
                Err(ReconcileError::ImageUnresolved(Unresolved::NotFound {
                    kind: Kind::Image,
                    name: name.to_owned(),
                    project: project.to_owned(),
                }))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// An Image by name, by [`resolve`]'s rule: in `project`, else the one public Image of
    /// that name. One List of every Image of the name gives the resolver all it needs.
    async fn resolve_image(&self, project: &str, name: &str) -> Result<v1::Image, ReconcileError> {
        let selection = Selection::all().fields(format!("metadata.name={name}"));
        let (objects, _) = self.client.list(Kind::Image, &selection).await?;
        let images: Vec<v1::Image> = objects
            .into_iter()
            .filter_map(v1::Image::from_object)
            .collect();
        resolve(project, name, images.iter())
            .cloned()
            .map_err(ReconcileError::ImageUnresolved)
    }
}

/// The agent's Server reconciler as the runtime runs it: keyed by uid, and done until
/// something changes (the periodic resync looks again anyway).
impl Reconcile<String> for ServerReconciler {
    type Error = ReconcileError;

    async fn reconcile(&self, uid: String) -> Result<ferro_runtime::Action, ReconcileError> {
        ServerReconciler::reconcile(self, &uid).await?;
        Ok(ferro_runtime::Action::AwaitChange)
    }
}

/// A Server's uid, or "" when it has none.
pub fn uid_of(server: &v1::Server) -> &str {
    server.metadata.as_ref().map_or("", |m| m.uid.as_str())
}

/// The key the agent queues a Server under: its uid, which also names its VM.
pub fn key_of(server: &v1::Server) -> Option<String> {
    Some(uid_of(server).to_owned()).filter(|uid| !uid.is_empty())
}

/// The parts of a Server whose change calls for a reconcile: spec, metadata and the
/// placement decisions. Status written by others, and the agent's own status writes
/// coming back through the watch, are left out.
pub fn significant(server: &v1::Server) -> v1::Server {
    let mut metadata = server.metadata.clone().unwrap_or_default();
    metadata.resource_version = 0;
    metadata.managed_keys.clear();
    let status = server.status.as_ref().map(|s| v1::ServerStatus {
        node: s.node.clone(),
        flavor: s.flavor.clone(),
        resolved: s.resolved.clone(),
        ..Default::default()
    });
    v1::Server {
        metadata: Some(metadata),
        spec: server.spec.clone(),
        status,
    }
}

fn display(server: &v1::Server) -> String {
    let meta = server.metadata.clone().unwrap_or_default();
    format!("{}/{}", meta.project, meta.name)
}

/// Refuses Images a guest cannot boot from (kernels, ramdisks, ISOs). vmdk, vdi and vhdx
/// reach the guest converted to qcow2 by the image cache.
fn check_bootable(image: &v1::Image) -> Result<(), ReconcileError> {
    let name = image
        .metadata
        .as_ref()
        .map(|m| m.name.clone())
        .unwrap_or_default();
    let format = image
        .spec
        .as_ref()
        .and_then(|s| s.disk_format)
        .and_then(|f| ImageFormat::try_from(f).ok());
    match format {
        None
        | Some(
            ImageFormat::Unspecified
            | ImageFormat::Raw
            | ImageFormat::Qcow2
            | ImageFormat::Vmdk
            | ImageFormat::Vdi
            | ImageFormat::Vhdx,
        ) => Ok(()),
        Some(other) => Err(ReconcileError::ImageNotBootable {
            name,
            reason: format!(
                "its diskFormat is {}; servers boot raw, qcow2, vmdk, vdi and vhdx disk images",
                other.as_str_name()
            ),
        }),
    }
}

/// The cached files a guest boots from.
#[derive(Debug, Clone)]
pub struct BootFiles {
    /// The Image's name, for messages.
    pub image: String,
    /// The disk image; `None` when the server boots from a Volume.
    pub disk: Option<CachedFile>,
    /// The kernel, for direct boot.
    pub kernel: Option<CachedFile>,
    /// The ramdisk.
    pub initrd: Option<CachedFile>,
    /// The kernel command line (the Image's).
    pub cmdline: String,
}

/// The copy-on-write boot disk on a cached image, sized by the Flavor. Pure.
fn boot_disk(
    boot: &BootFiles,
    disk: &CachedFile,
    flavor_gib: u64,
) -> Result<BootDisk, ReconcileError> {
    let base_format = match disk.format.as_str() {
        "raw" => DiskFormat::Raw,
        "qcow2" => DiskFormat::Qcow2,
        other => {
            return Err(ReconcileError::ImageNotBootable {
                name: boot.image.clone(),
                reason: format!("qemu-img found format {other}; servers boot raw or qcow2"),
            });
        }
    };
    let size_bytes = match flavor_gib {
        0 => None,
        gib => {
            let bytes = gib.saturating_mul(1 << 30);
            if bytes < disk.virtual_size_bytes {
                return Err(ReconcileError::FlavorDiskTooSmall {
                    flavor_gib: gib,
                    image: boot.image.clone(),
                    image_bytes: disk.virtual_size_bytes,
                });
            }
            Some(bytes)
        }
    };
    Ok(BootDisk {
        base: disk.path.clone(),
        base_format,
        size_bytes,
    })
}

/// The VM a Server describes, given its boot files and key. Pure.
pub fn vm_spec(
    server: &v1::Server,
    boot: &BootFiles,
    key: Option<(String, String)>,
    node: &str,
    zone: &str,
) -> Result<VmSpec, ReconcileError> {
    let meta = server.metadata.clone().unwrap_or_default();
    let spec = server.spec.clone().unwrap_or_default();
    let flavor = server
        .status
        .as_ref()
        .and_then(|s| s.flavor.clone())
        .ok_or(ReconcileError::NotPlaced)?;
    let boot_disk = match &boot.disk {
        Some(disk) => Some(boot_disk(boot, disk, flavor.disk_gib)?),
        None => None,
    };
    let kernel = boot.kernel.as_ref().map(|kernel| DirectKernel {
        kernel: kernel.path.clone(),
        initrd: boot.initrd.as_ref().map(|i| i.path.clone()),
        cmdline: if boot.cmdline.is_empty() {
            "console=ttyS0".to_owned()
        } else {
            boot.cmdline.clone()
        },
    });
    let hostname = spec
        .hostname
        .clone()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| meta.name.clone());
    Ok(VmSpec {
        uid: meta.uid.clone(),
        name: meta.name.clone(),
        vcpus: flavor.vcpus.max(1),
        memory_mib: flavor.ram_mib,
        boot_disk,
        kernel,
        config_drive: Some(ConfigDrive {
            uuid: meta.uid.clone(),
            name: meta.name.clone(),
            hostname,
            availability_zone: zone.to_owned(),
            public_keys: key.into_iter().collect(),
            user_data: (!spec.user_data.is_empty()).then(|| spec.user_data.clone().into_bytes()),
            ..ConfigDrive::default()
        }),
        nics: Vec::new(),
        disks: Vec::new(),
        labels: BTreeMap::from([
            (LABEL_PROJECT.to_owned(), meta.project.clone()),
            (LABEL_SERVER.to_owned(), meta.name.clone()),
            (LABEL_NODE.to_owned(), node.to_owned()),
        ]),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(name: &str, format: &str, virtual_size: u64) -> CachedFile {
        CachedFile {
            path: format!("/cache/sha256/{name}").into(),
            checksum: format!("sha256:{name}"),
            format: format.into(),
            source_format: format.into(),
            size_bytes: virtual_size,
            virtual_size_bytes: virtual_size,
            fetched_in: None,
        }
    }

    fn server(disk_gib: u64) -> v1::Server {
        v1::Server {
            metadata: Some(v1::ObjectMeta {
                name: "web-1".into(),
                project: "p".into(),
                uid: "0b5c3a52-5a9e-4d35-8a1e-2f1c0f3b1a01".into(),
                ..Default::default()
            }),
            spec: Some(v1::ServerSpec {
                image: "tiny".into(),
                key_pair: "alice".into(),
                user_data: "#!/bin/sh\necho hi\n".into(),
                hostname: Some("web".into()),
                ..Default::default()
            }),
            status: Some(v1::ServerStatus {
                node: "n1".into(),
                flavor: Some(v1::FlavorSnapshot {
                    vcpus: 2,
                    ram_mib: 256,
                    disk_gib,
                    ..Default::default()
                }),
                ..Default::default()
            }),
        }
    }

    fn boot(disk_format: &str) -> BootFiles {
        BootFiles {
            image: "tiny".into(),
            disk: Some(file("d", disk_format, 64 << 20)),
            kernel: Some(file("k", "raw", 10)),
            initrd: Some(file("i", "raw", 10)),
            cmdline: "console=ttyS0 quiet".into(),
        }
    }

    #[test]
    fn the_vm_is_sized_from_the_flavor_copy_and_carries_its_owner() {
        let key = Some(("alice".to_owned(), "ssh-ed25519 AAAA alice".to_owned()));
        let vm = vm_spec(&server(1), &boot("raw"), key, "n1", "zone-a").unwrap();
        assert_eq!((vm.vcpus, vm.memory_mib), (2, 256));
        let disk = vm.boot_disk.unwrap();
        assert_eq!(disk.base, std::path::PathBuf::from("/cache/sha256/d"));
        assert_eq!(disk.base_format, DiskFormat::Raw);
        assert_eq!(disk.size_bytes, Some(1 << 30));
        let kernel = vm.kernel.unwrap();
        assert_eq!(kernel.initrd, Some("/cache/sha256/i".into()));
        assert_eq!(kernel.cmdline, "console=ttyS0 quiet");
        let drive = vm.config_drive.unwrap();
        assert_eq!(drive.hostname, "web");
        assert_eq!(drive.availability_zone, "zone-a");
        assert_eq!(drive.public_keys["alice"], "ssh-ed25519 AAAA alice");
        assert_eq!(
            drive.user_data.as_deref(),
            Some(&b"#!/bin/sh\necho hi\n"[..])
        );
        assert_eq!(vm.labels[LABEL_PROJECT], "p");
        assert_eq!(vm.labels[LABEL_SERVER], "web-1");
        crate::hypervisor::validate_spec(&VmSpec {
            config_drive: None,
            ..vm_spec(&server(0), &boot("qcow2"), None, "n1", "z").unwrap()
        })
        .unwrap();
    }

    #[test]
    fn a_zero_disk_keeps_the_image_size_and_a_small_one_is_refused() {
        let vm = vm_spec(&server(0), &boot("qcow2"), None, "n1", "z").unwrap();
        let disk = vm.boot_disk.unwrap();
        assert_eq!(
            (disk.size_bytes, disk.base_format),
            (None, DiskFormat::Qcow2)
        );
        let mut big = boot("raw");
        big.disk.as_mut().unwrap().virtual_size_bytes = 3 << 30;
        let err = vm_spec(&server(2), &big, None, "n1", "z").unwrap_err();
        assert_eq!(err.reason(), "FlavorDiskTooSmall");
    }

    #[test]
    fn only_raw_and_qcow2_disks_boot() {
        let err = vm_spec(&server(1), &boot("vmdk"), None, "n1", "z").unwrap_err();
        assert_eq!(err.reason(), "ImageNotBootable");
        let unplaced = v1::Server {
            status: None,
            ..server(1)
        };
        let err = vm_spec(&unplaced, &boot("raw"), None, "n1", "z").unwrap_err();
        assert_eq!(err.reason(), "NotPlaced");
        let kernel = v1::Image {
            spec: Some(v1::ImageSpec {
                disk_format: Some(ImageFormat::Kernel as i32),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(
            check_bootable(&kernel).unwrap_err().reason(),
            "ImageNotBootable"
        );
    }

    #[test]
    fn failures_carry_their_whole_chain() {
        let err = ReconcileError::Image {
            name: "tiny".into(),
            source: ImageError::ChecksumMismatch {
                expected: "sha256:aa".into(),
                actual: "sha256:bb".into(),
            },
        };
        let failure = err.failure();
        assert_eq!(failure.reason, "ImageChecksumMismatch");
        assert_eq!(
            failure.message,
            "image tiny: checksum mismatch: spec.checksum is sha256:aa, the bytes are sha256:bb"
        );
    }

    #[test]
    fn only_changes_that_matter_call_for_a_reconcile() {
        let matters = ferro_runtime::predicates::changed(significant);
        let placed = |rv: i64, power: i32| v1::Server {
            metadata: Some(v1::ObjectMeta {
                name: "s".into(),
                project: "p".into(),
                uid: "u1".into(),
                resource_version: rv,
                ..Default::default()
            }),
            spec: Some(v1::ServerSpec {
                power_state: Some(power),
                ..Default::default()
            }),
            status: Some(v1::ServerStatus {
                node: "n1".into(),
                ..Default::default()
            }),
        };
        // Someone's status write (or the agent's own, coming back): nothing to do.
        let mut written = placed(2, 1);
        written.status.as_mut().unwrap().phase = 3;
        written.status.as_mut().unwrap().host = Some(v1::ServerHostStatus::default());
        assert!(!matters(&placed(1, 1), &written));
        // A spec change, or a new placement, matters.
        assert!(matters(&placed(1, 1), &placed(3, 2)));
        let mut moved = placed(3, 1);
        moved.status.as_mut().unwrap().node = "n2".into();
        assert!(matters(&placed(1, 1), &moved));
        assert_eq!(key_of(&placed(1, 1)).as_deref(), Some("u1"));
        assert_eq!(key_of(&v1::Server::default()), None);
    }
}
