//! The volume controller: places each Volume on a storage node, and says what the volume
//! is — its phase, readiness and attachments — from what the nodes observe.
//!
//! **Placement is a decision.** A Volume goes to a node whose `Ready` is `True`, that
//! declares the `Storage` role, is not cordoned, is in the volume's availability zone (if
//! it names one), whose backend matches `spec.volumeType` (if set: `file` or `lvm`), and
//! that has room for `spec.sizeGib`: the node's backend capacity less the sizes of the
//! volumes placed there. Of those, the one with the most room left, then the first by
//! name. A volume cloned from another goes where its source is, since a backend clones
//! only its own volumes. `status.node` is written once, guarded by the resourceVersion it
//! was decided from; deciding and assuming happen under one lock, so volumes applied
//! together spread before the cache shows any of them placed. When nothing fits,
//! `Scheduled=False` (`NoStorageNode`) says why, and every change of a Node queues the
//! unplaced volumes again. A volume never moves: its bytes are on its node.
//!
//! **The `Provisioned` contract.** The storage node's agent makes the volume and writes
//! `Provisioned` (the agent's, see the owner table in `ferro_api::owners`) with a message
//! beginning `node <name>`; the controller believes it only when it names the volume's
//! node and is of the current generation, so a grown volume is `Creating` again until the
//! agent has grown it.
//!
//! **Attachments are observations.** The agent of each server's node reports in
//! `Server.status.host.volumes` which volumes its running guest has (read from the
//! hypervisor); `status.attachments` is recomputed from those, never remembered. The
//! apiserver refuses to delete a volume with attachments.
//!
//! **Phase**: `Deleting` while being deleted, `Pending` until placed, `Creating` until a
//! current `Provisioned=True`, `Error` on a current `Provisioned=False` that is not still
//! under way, else `InUse` with attachments and `Available` without.
//!
//! **Snapshots.** A VolumeSnapshot is `Available` once its volume's node lists it in the
//! volume's `status.snapshots` (it copies the volume while no guest has it attached;
//! until then `Ready=False`, `VolumeInUse`, says why it waits). A volume restored from a
//! snapshot is placed where the snapshot is held. The finalizer [`SNAPSHOT_FINALIZER`]
//! keeps a deleted snapshot until that node no longer holds its copy, and the apiserver
//! refuses to delete a volume that has snapshots.
//!
//! **Deletion.** The volume carries the agent's finalizer from before it is placed; the
//! storage node's agent removes the bytes and then the finalizer. A volume never placed,
//! or placed on a Node that no longer exists, has nothing to remove: the controller lets
//! it go.

use std::{
    collections::{BTreeSet, HashMap},
    sync::{Arc, Mutex},
    time::Duration,
};

use ferro_api::{Error, Object, auth::AGENT_FINALIZER, owners, v1};

use crate::{api::Api, scheduler::node_ready};
use ferro_runtime::{
    Action, Caches, Controller, ObjectRef, Reconcile, ReconcileError, Store, condition,
    condition_holds,
    controller::Settings,
    events::Recorder,
    finalizer::{self, Step},
    meta,
    metrics::Metrics,
    reflector::UID,
};

/// The condition saying where the volume is, or why nowhere.
pub const SCHEDULED: &str = "Scheduled";
/// The agent's condition: the volume exists on its node with its size.
pub const PROVISIONED: &str = "Provisioned";
/// The condition saying whether the volume can be attached.
pub const READY: &str = "Ready";

/// Condition reasons the volume controller writes.
pub mod reason {
    /// Placed on a node.
    pub const SCHEDULED: &str = "Scheduled";
    /// No storage node fits.
    pub const NO_STORAGE_NODE: &str = "NoStorageNode";
    /// A clone waits for its source volume to be placed.
    pub const WAITING_FOR_SOURCE: &str = "WaitingForSource";
    /// The node has not reported the volume yet.
    pub const CREATING: &str = "Creating";
    /// Placed on a node that is gone.
    pub const NODE_GONE: &str = "NodeGone";
}

/// How often an unplaced volume is looked at again besides node changes.
const RETRY: Duration = Duration::from_secs(30);

/// The index of volumes by the node they are placed on.
const VOLUME_BY_NODE: &str = "volume-node";
/// The index of volumes by the name of the volume they are cloned from.
const VOLUME_BY_SOURCE: &str = "volume-source";
/// The index of servers by the uids of the volumes their guests have attached.
const SERVER_BY_VOLUME: &str = "server-attached-volume";

/// What placement needs to know of a node. Built from a Node and the volumes on it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StorageNode {
    /// The node's name.
    pub name: String,
    /// It declares the `Storage` role.
    pub storage_role: bool,
    /// Node lifecycle says `Ready=True`.
    pub ready: bool,
    /// `spec.unschedulable`.
    pub cordoned: bool,
    /// Its availability zone.
    pub zone: String,
    /// Its volume backend (`file`, `lvm`), empty if it reports none.
    pub backend: String,
    /// The backend's capacity less the sizes of the volumes placed (or assumed) there, in
    /// GiB; negative when overcommitted.
    pub room_gib: i64,
}

/// What a volume asks of its node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Wants {
    /// `spec.sizeGib`.
    pub size_gib: u64,
    /// `spec.availabilityZone`; empty is any.
    pub zone: String,
    /// `spec.volumeType`; empty is any backend.
    pub volume_type: String,
    /// The node the source volume is on, for a clone; `Some("")` when it is not placed yet.
    pub source_node: Option<String>,
}

impl Wants {
    /// What `volume` asks of its node; `source_node` is where its source volume is, if it
    /// is a clone and the source exists.
    pub fn of(volume: &v1::Volume, source_node: Option<String>) -> Wants {
        let spec = volume.spec.clone().unwrap_or_default();
        Wants {
            size_gib: spec.size_gib,
            zone: spec.availability_zone,
            volume_type: spec.volume_type,
            source_node,
        }
    }
}

/// Where a volume goes: a node, or why none fits. Pure.
pub fn place(wants: &Wants, nodes: &[StorageNode]) -> Result<String, (&'static str, String)> {
    if let Some(source) = &wants.source_node
        && source.is_empty()
    {
        return Err((
            reason::WAITING_FOR_SOURCE,
            "waiting for the source volume to be placed".to_owned(),
        ));
    }
    let mut refusals: Vec<String> = Vec::new();
    let mut fitting: Vec<&StorageNode> = Vec::new();
    for node in nodes {
        let why = if !node.storage_role {
            continue;
        } else if !node.ready {
            Some("not ready".to_owned())
        } else if node.cordoned {
            Some("cordoned".to_owned())
        } else if wants.source_node.as_ref().is_some_and(|s| *s != node.name) {
            Some("does not hold the source volume".to_owned())
        } else if !wants.zone.is_empty() && node.zone != wants.zone {
            Some(format!("in zone {:?}", node.zone))
        } else if !wants.volume_type.is_empty() && node.backend != wants.volume_type {
            Some(format!("has backend {:?}", node.backend))
        } else if i64::try_from(wants.size_gib).unwrap_or(i64::MAX) > node.room_gib {
            Some(format!("has {} GiB of room", node.room_gib.max(0)))
        } else {
            None
        };
        match why {
            Some(why) => refusals.push(format!("{}: {why}", node.name)),
            None => fitting.push(node),
        }
    }
    let best = fitting
        .iter()
        .max_by(|a, b| a.room_gib.cmp(&b.room_gib).then(b.name.cmp(&a.name)));
    match best {
        Some(node) => Ok(node.name.clone()),
        None if refusals.is_empty() => Err((
            reason::NO_STORAGE_NODE,
            "no node declares the Storage role".to_owned(),
        )),
        None => Err((
            reason::NO_STORAGE_NODE,
            format!(
                "no storage node fits {} GiB: {}",
                wants.size_gib,
                refusals.join("; ")
            ),
        )),
    }
}

/// The subject a `Provisioned` message begins with for a volume on `node`.
pub fn provisioned_subject(node: &str) -> String {
    format!("node {node}")
}

/// The agent's `Provisioned`, if it speaks of the volume's node at `generation`. Pure.
pub fn provisioned_current<'a>(
    existing: &'a [v1::Condition],
    node: &str,
    generation: i64,
) -> Option<&'a v1::Condition> {
    crate::router::agent_condition_current(
        existing,
        PROVISIONED,
        &provisioned_subject(node),
        generation,
    )
}

/// The attachments of a volume: one per server whose guest has it, by server name. Pure.
pub fn attachments(volume_uid: &str, servers: &[Arc<v1::Server>]) -> Vec<v1::VolumeAttachment> {
    let mut found: Vec<v1::VolumeAttachment> = servers
        .iter()
        .filter_map(|server| {
            let status = server.status.as_ref()?;
            let attached = status
                .host
                .as_ref()?
                .volumes
                .iter()
                .find(|v| v.uid == volume_uid)?;
            Some(v1::VolumeAttachment {
                server: meta(server.as_ref()).name.clone(),
                device: attached.serial.clone(),
                node: status.node.clone(),
            })
        })
        .collect();
    found.sort_by(|a, b| a.server.cmp(&b.server));
    found
}

/// The phase and `Ready` of a volume placed on `node` (or not placed: `None`). Pure.
pub fn phase_and_ready(
    volume: &v1::Volume,
    node: Option<&str>,
    attached: bool,
) -> (v1::volume_status::Phase, v1::Condition) {
    use v1::volume_status::Phase;
    let m = meta(volume);
    if m.deletion_timestamp.is_some() {
        return (
            Phase::Deleting,
            condition(READY, false, "Deleting", "the volume is being deleted"),
        );
    }
    let Some(node) = node else {
        return (
            Phase::Pending,
            condition(READY, false, "Pending", "waiting for a storage node"),
        );
    };
    let conditions = volume
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default();
    match provisioned_current(conditions, node, m.generation) {
        Some(c) if c.status == v1::condition::Status::True as i32 => {
            let phase = if attached {
                Phase::InUse
            } else {
                Phase::Available
            };
            (phase, condition(READY, true, &c.reason, c.message.clone()))
        }
        Some(c) if c.reason != reason::CREATING => (
            Phase::Error,
            condition(READY, false, &c.reason, c.message.clone()),
        ),
        Some(c) => (
            Phase::Creating,
            condition(READY, false, reason::CREATING, c.message.clone()),
        ),
        None => (
            Phase::Creating,
            condition(
                READY,
                false,
                reason::CREATING,
                format!("waiting for node {node} to make the volume"),
            ),
        ),
    }
}

fn recorded_node(volume: &v1::Volume) -> &str {
    volume
        .status
        .as_ref()
        .map(|s| s.node.as_str())
        .unwrap_or_default()
}

fn source_volume(volume: &v1::Volume) -> Option<&str> {
    let source = volume.spec.as_ref()?.source.as_ref()?;
    (!source.volume.is_empty()).then_some(source.volume.as_str())
}

fn source_snapshot(volume: &v1::Volume) -> Option<&str> {
    let source = volume.spec.as_ref()?.source.as_ref()?;
    (!source.snapshot.is_empty()).then_some(source.snapshot.as_str())
}

/// The volume controller: reconciles Volumes.
pub struct VolumeController {
    api: Api,
    recorder: Recorder,
    volumes: Store<v1::Volume>,
    nodes: Store<v1::Node>,
    servers: Store<v1::Server>,
    snapshots: Store<v1::VolumeSnapshot>,
    /// Placements written that the cache does not show yet: volume uid → (node, GiB).
    assumed: Arc<Mutex<HashMap<String, (String, u64)>>>,
}

impl VolumeController {
    /// Builds the controller over the shared caches.
    pub fn build(
        api: &Api,
        caches: &Caches,
        metrics: &Metrics,
        settings: Settings,
    ) -> (Controller, Arc<VolumeController>) {
        let volumes = caches.store::<v1::Volume>();
        let nodes = caches.store::<v1::Node>();
        let servers = caches.store::<v1::Server>();
        let snapshots = caches.store::<v1::VolumeSnapshot>();
        volumes.add_index(VOLUME_BY_NODE, |v: &v1::Volume| {
            vec![recorded_node(v).to_owned()]
        });
        volumes.add_index(VOLUME_BY_SOURCE, |v: &v1::Volume| {
            source_volume(v)
                .or(source_snapshot(v))
                .map(|s| format!("{}/{s}", meta(v).project))
                .into_iter()
                .collect()
        });
        servers.add_index(SERVER_BY_VOLUME, |s: &v1::Server| {
            s.status
                .iter()
                .filter_map(|s| s.host.as_ref())
                .flat_map(|h| &h.volumes)
                .map(|v| v.uid.clone())
                .collect()
        });
        let assumed: Arc<Mutex<HashMap<String, (String, u64)>>> = Arc::default();
        let forget = assumed.clone();
        volumes.listen(move |c| {
            // The cache shows the decision (or the volume is gone): it counts from there.
            let Some(any) = c.new.as_ref().or(c.old.as_ref()) else {
                return;
            };
            let uid = &meta(any.as_ref()).uid;
            let mut assumed = forget.lock().unwrap_or_else(|e| e.into_inner());
            let shown = match (&c.new, assumed.get(uid)) {
                (None, _) => true,
                (Some(new), Some((node, _))) => recorded_node(new) == node,
                (Some(_), None) => false,
            };
            if shown {
                assumed.remove(uid);
            }
        });
        let unplaced = volumes.clone();
        let on_nodes = move |c: &ferro_runtime::reflector::Change<v1::Node>| {
            let mut set: BTreeSet<ObjectRef> = unplaced
                .by_index(VOLUME_BY_NODE, "")
                .iter()
                .map(|v| ObjectRef::of(v.as_ref()))
                .collect();
            // A Node gone lets its deleted volumes go.
            if c.new.is_none()
                && let Some(old) = &c.old
            {
                set.extend(
                    unplaced
                        .by_index(VOLUME_BY_NODE, &meta(old.as_ref()).name)
                        .iter()
                        .map(|v| ObjectRef::of(v.as_ref())),
                );
            }
            set.into_iter().collect()
        };
        let by_uid = volumes.clone();
        let on_servers = move |c: &ferro_runtime::reflector::Change<v1::Server>| {
            let attached = |s: &Option<Arc<v1::Server>>| -> BTreeSet<String> {
                s.iter()
                    .filter_map(|s| s.status.as_ref())
                    .filter_map(|s| s.host.as_ref())
                    .flat_map(|h| &h.volumes)
                    .map(|v| v.uid.clone())
                    .collect()
            };
            let (old, new) = (attached(&c.old), attached(&c.new));
            if old == new {
                return Vec::new();
            }
            old.union(&new)
                .flat_map(|uid| by_uid.by_index(UID, uid))
                .map(|v| ObjectRef::of(v.as_ref()))
                .collect()
        };
        let clones = volumes.clone();
        let on_volumes = move |c: &ferro_runtime::reflector::Change<v1::Volume>| {
            // A source placed lets its clones be placed.
            let Some(new) = &c.new else {
                return Vec::new();
            };
            if c.old.as_ref().map(|o| recorded_node(o)) == Some(recorded_node(new)) {
                return Vec::new();
            }
            let m = meta(new.as_ref());
            clones
                .by_index(VOLUME_BY_SOURCE, &format!("{}/{}", m.project, m.name))
                .iter()
                .map(|v| ObjectRef::of(v.as_ref()))
                .collect()
        };
        let restores = volumes.clone();
        let on_snapshots = move |c: &ferro_runtime::reflector::Change<v1::VolumeSnapshot>| {
            // A snapshot that appears lets the volumes restored from it be placed.
            let Some(new) = &c.new else {
                return Vec::new();
            };
            let m = meta(new.as_ref());
            restores
                .by_index(VOLUME_BY_SOURCE, &format!("{}/{}", m.project, m.name))
                .iter()
                .map(|v| ObjectRef::of(v.as_ref()))
                .collect()
        };
        let controller = Controller::new("volume", settings, metrics.clone())
            .reconciles(&volumes)
            .watches(&volumes, on_volumes)
            .watches(&nodes, on_nodes)
            .watches(&servers, on_servers)
            .watches(&snapshots, on_snapshots);
        let reconciler = Arc::new(VolumeController {
            api: api.clone(),
            recorder: Recorder::new(api.client().clone(), owners::VOLUME_CONTROLLER),
            volumes,
            nodes,
            servers,
            snapshots,
            assumed,
        });
        (controller, reconciler)
    }

    /// The storage nodes, each with the room left after the volumes placed or assumed
    /// there, not counting `except` (the volume being placed).
    fn storage_nodes(
        &self,
        except: &str,
        assumed: &HashMap<String, (String, u64)>,
    ) -> Vec<StorageNode> {
        let mut used: HashMap<String, u64> = HashMap::new();
        for volume in self.volumes.list() {
            let node = recorded_node(&volume);
            if meta(volume.as_ref()).uid != except && !node.is_empty() {
                let size = volume.spec.as_ref().map_or(0, |s| s.size_gib);
                *used.entry(node.to_owned()).or_default() += size;
            }
        }
        for (uid, (node, size)) in assumed {
            let shown = self
                .volumes
                .by_index(UID, uid)
                .first()
                .is_some_and(|v| recorded_node(v) == node);
            if uid != except && !shown {
                *used.entry(node.clone()).or_default() += size;
            }
        }
        let mut nodes: Vec<StorageNode> = self
            .nodes
            .list()
            .iter()
            .map(|n| {
                let status = n.status.clone().unwrap_or_default();
                let storage = status.storage.clone().unwrap_or_default();
                let name = meta(n.as_ref()).name.clone();
                let used = used.get(&name).copied().unwrap_or(0);
                StorageNode {
                    storage_role: status.roles().any(|r| r == v1::node_status::Role::Storage),
                    ready: node_ready(n),
                    cordoned: n.spec.as_ref().is_some_and(|s| s.unschedulable),
                    zone: status.zone.clone(),
                    backend: storage.backend.clone(),
                    room_gib: i64::try_from(storage.capacity_gib).unwrap_or(i64::MAX)
                        - i64::try_from(used).unwrap_or(i64::MAX),
                    name,
                }
            })
            .collect();
        nodes.sort_by(|a, b| a.name.cmp(&b.name));
        nodes
    }

    /// Decides placement under the lock and assumes a new decision.
    fn decide(&self, volume: &v1::Volume) -> Result<String, (&'static str, String)> {
        let m = meta(volume);
        // A snapshot is held where its volume is; a restore goes there too.
        let snapshot_volume = source_snapshot(volume).map(|name| {
            self.snapshots
                .get_named(&m.project, name)
                .and_then(|s| s.spec.as_ref().map(|s| s.volume.clone()))
                .unwrap_or_default()
        });
        let source_node = source_volume(volume)
            .map(str::to_owned)
            .or(snapshot_volume)
            .map(|name| {
                self.volumes
                    .get_named(&m.project, &name)
                    .map(|s| recorded_node(&s).to_owned())
                    .unwrap_or_default()
            });
        let wants = Wants::of(volume, source_node);
        let mut assumed = self.assumed.lock().unwrap_or_else(|e| e.into_inner());
        let nodes = self.storage_nodes(&m.uid, &assumed);
        let decision = place(&wants, &nodes);
        if let Ok(node) = &decision {
            assumed.insert(m.uid.clone(), (node.clone(), wants.size_gib));
        }
        decision
    }

    fn forget(&self, uid: &str) {
        self.assumed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(uid);
    }

    fn is_assumed(&self, uid: &str) -> bool {
        self.assumed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(uid)
    }

    async fn apply(&self, volume: &v1::Volume) -> Result<Action, ReconcileError> {
        let m = meta(volume);
        if self.is_assumed(&m.uid) {
            // A placement was written and the cache has not shown it yet.
            return Ok(Action::AwaitChange);
        }
        let status = volume.status.clone().unwrap_or_default();
        let recorded = recorded_node(volume).to_owned();
        let (decided, scheduled) = if recorded.is_empty() {
            match self.decide(volume) {
                Ok(node) => {
                    let c = condition(
                        SCHEDULED,
                        true,
                        reason::SCHEDULED,
                        format!("placed on node {node}"),
                    );
                    (Some(node), c)
                }
                Err((why, message)) => (None, condition(SCHEDULED, false, why, message)),
            }
        } else {
            let c = condition(
                SCHEDULED,
                true,
                reason::SCHEDULED,
                format!("placed on node {recorded}"),
            );
            (None, c)
        };
        let node = decided
            .clone()
            .or((!recorded.is_empty()).then_some(recorded));
        let attached = attachments(&m.uid, &self.servers.by_index(SERVER_BY_VOLUME, &m.uid));
        let (phase, ready) = phase_and_ready(volume, node.as_deref(), !attached.is_empty());
        let wanted = vec![scheduled.clone(), ready];
        let holds = decided.is_none()
            && status.observed_generation == m.generation
            && status.phase == phase as i32
            && status.attachments == attached
            && wanted
                .iter()
                .all(|c| condition_holds(&status.conditions, c, m.generation));
        let retry = if node.is_none() {
            Action::Requeue(RETRY)
        } else {
            Action::AwaitChange
        };
        if holds {
            return Ok(retry);
        }
        let mut fields = vec!["observedGeneration", "phase", "attachments"];
        let mut new_status = v1::VolumeStatus {
            observed_generation: m.generation,
            phase: phase as i32,
            attachments: attached,
            ..Default::default()
        };
        if let Some(node) = &decided {
            fields.push("node");
            new_status.node = node.clone();
        }
        let guard = if decided.is_some() {
            m.resource_version
        } else {
            0
        };
        let object = Object::Volume(v1::Volume {
            metadata: volume.metadata.clone(),
            spec: None,
            status: Some(new_status),
        });
        match self
            .api
            .update_status_at(object, owners::VOLUME_CONTROLLER, &fields, wanted, guard)
            .await
        {
            Ok(_) => {}
            Err(Error::Conflict { .. } | Error::NotFound { .. }) => {
                self.forget(&m.uid);
                return Ok(Action::AwaitChange);
            }
            Err(e) => {
                self.forget(&m.uid);
                return Err(e.into());
            }
        }
        let told = status
            .conditions
            .iter()
            .any(|c| c.r#type == SCHEDULED && c.message == scheduled.message);
        if let Some(node) = &decided {
            let message = format!("placed {}/{} on node {node}", m.project, m.name);
            self.recorder
                .normal(volume, reason::SCHEDULED, &message)
                .await;
        } else if node.is_none() && !told {
            self.recorder
                .warning(volume, &scheduled.reason, &scheduled.message)
                .await;
        }
        Ok(retry)
    }

    /// A deleted volume: the agent of its node removes the bytes and then the finalizer;
    /// one never placed, or on a Node that is gone, has nothing to remove.
    async fn cleanup(
        &self,
        volume: &v1::Volume,
        cleanup: Box<finalizer::Cleanup>,
    ) -> Result<Action, ReconcileError> {
        let node = recorded_node(volume);
        let m = meta(volume);
        if node.is_empty() {
            self.forget(&m.uid);
            cleanup.finish().await?;
            return Ok(Action::AwaitChange);
        }
        if self.nodes.get_named("", node).is_none() {
            let message = format!(
                "node {node} is gone; nothing is left to remove there, letting the volume go"
            );
            self.recorder
                .warning(volume, reason::NODE_GONE, &message)
                .await;
            cleanup.finish().await?;
            return Ok(Action::AwaitChange);
        }
        // Keep the phase and attachments true meanwhile.
        self.apply(volume).await
    }
}

impl Reconcile for VolumeController {
    type Error = ReconcileError;

    async fn reconcile(&self, key: ObjectRef) -> Result<Action, ReconcileError> {
        let Some(volume) = self.volumes.get(&key) else {
            return Ok(Action::AwaitChange);
        };
        match finalizer::prepare(self.api.client(), AGENT_FINALIZER, volume.as_ref()).await? {
            Step::Skip => Ok(Action::AwaitChange),
            Step::Apply => self.apply(&volume).await,
            Step::Cleanup(cleanup) => self.cleanup(&volume, cleanup).await,
        }
    }
}

/// The finalizer that keeps a VolumeSnapshot until its storage node has let go of the copy.
pub const SNAPSHOT_FINALIZER: &str = "ferro.io/snapshot-copy";

/// The index of snapshots by `<project>/<volume>`.
const SNAPSHOT_BY_VOLUME: &str = "snapshot-volume";

/// What a VolumeSnapshot is, from what its volume's node reports: phase, `Ready` and the
/// size. Pure.
pub fn snapshot_state(
    snapshot: &v1::VolumeSnapshot,
    volume: Option<&v1::Volume>,
) -> (v1::volume_snapshot_status::Phase, v1::Condition, u64) {
    use v1::volume_snapshot_status::Phase;
    let m = meta(snapshot);
    let name = snapshot
        .spec
        .as_ref()
        .map(|s| s.volume.clone())
        .unwrap_or_default();
    if m.deletion_timestamp.is_some() {
        let c = condition(READY, false, "Deleting", "the snapshot is being deleted");
        return (Phase::Deleting, c, 0);
    }
    let Some(volume) = volume else {
        let message = format!("volume {name} not found in project {}", m.project);
        return (
            Phase::Creating,
            condition(READY, false, "VolumeNotFound", message),
            0,
        );
    };
    let status = volume.status.clone().unwrap_or_default();
    if let Some(held) = status.snapshots.iter().find(|s| s.uid == m.uid) {
        let message = format!("a copy of volume {name} held on node {}", status.node);
        let c = condition(READY, true, "Taken", message);
        return (Phase::Available, c, held.size_gib);
    }
    let holder = status
        .attachments
        .first()
        .map(|a| a.server.clone())
        .or_else(|| status.exports.first().map(|e| e.server.clone()));
    if let Some(server) = holder {
        let message = format!(
            "volume {name} is attached to server {server}: the snapshot is taken once it is \
             detached"
        );
        return (
            Phase::Creating,
            condition(READY, false, "VolumeInUse", message),
            0,
        );
    }
    let message = if status.node.is_empty() {
        format!("waiting for volume {name} to be placed")
    } else {
        format!("waiting for node {} to copy volume {name}", status.node)
    };
    (
        Phase::Creating,
        condition(READY, false, reason::CREATING, message),
        0,
    )
}

/// The VolumeSnapshot controller: says what each snapshot is, from its volume's node's
/// report, and keeps a deleted one until that node has let go of the copy.
pub struct SnapshotController {
    api: Api,
    snapshots: Store<v1::VolumeSnapshot>,
    volumes: Store<v1::Volume>,
    nodes: Store<v1::Node>,
}

fn snapshot_volume_key(snapshot: &v1::VolumeSnapshot) -> String {
    let volume = snapshot
        .spec
        .as_ref()
        .map(|s| s.volume.as_str())
        .unwrap_or_default();
    format!("{}/{volume}", meta(snapshot).project)
}

impl SnapshotController {
    /// Builds the controller over the shared caches.
    pub fn build(
        api: &Api,
        caches: &Caches,
        metrics: &Metrics,
        settings: Settings,
    ) -> (Controller, Arc<SnapshotController>) {
        let snapshots = caches.store::<v1::VolumeSnapshot>();
        let volumes = caches.store::<v1::Volume>();
        let nodes = caches.store::<v1::Node>();
        snapshots.add_index(SNAPSHOT_BY_VOLUME, |s: &v1::VolumeSnapshot| {
            vec![snapshot_volume_key(s)]
        });
        let of_volume = snapshots.clone();
        let on_volumes = move |c: &ferro_runtime::reflector::Change<v1::Volume>| {
            let mut set = BTreeSet::new();
            for v in c.old.iter().chain(c.new.iter()) {
                let m = meta(v.as_ref());
                set.extend(
                    of_volume
                        .by_index(SNAPSHOT_BY_VOLUME, &format!("{}/{}", m.project, m.name))
                        .iter()
                        .map(|s| ObjectRef::of(s.as_ref())),
                );
            }
            set.into_iter().collect()
        };
        let controller = Controller::new("volume-snapshot", settings, metrics.clone())
            .reconciles(&snapshots)
            .watches(&volumes, on_volumes)
            .reads(Arc::new(nodes.clone()));
        let reconciler = Arc::new(SnapshotController {
            api: api.clone(),
            snapshots,
            volumes,
            nodes,
        });
        (controller, reconciler)
    }

    fn volume_of(&self, snapshot: &v1::VolumeSnapshot) -> Option<Arc<v1::Volume>> {
        let name = snapshot.spec.as_ref()?.volume.clone();
        self.volumes.get_named(&meta(snapshot).project, &name)
    }

    async fn apply(&self, snapshot: &v1::VolumeSnapshot) -> Result<Action, ReconcileError> {
        let m = meta(snapshot);
        let volume = self.volume_of(snapshot);
        let (phase, ready, size_gib) = snapshot_state(snapshot, volume.as_deref());
        let status = snapshot.status.clone().unwrap_or_default();
        let holds = status.observed_generation == m.generation
            && status.phase == phase as i32
            && status.size_gib == size_gib
            && condition_holds(&status.conditions, &ready, m.generation);
        if holds {
            return Ok(Action::AwaitChange);
        }
        let object = Object::VolumeSnapshot(v1::VolumeSnapshot {
            metadata: snapshot.metadata.clone(),
            spec: None,
            status: Some(v1::VolumeSnapshotStatus {
                phase: phase as i32,
                size_gib,
                observed_generation: m.generation,
                ..Default::default()
            }),
        });
        match self
            .api
            .update_status_at(
                object,
                owners::VOLUME_CONTROLLER,
                &["phase", "sizeGib", "observedGeneration"],
                vec![ready],
                0,
            )
            .await
        {
            Ok(_) | Err(Error::Conflict { .. } | Error::NotFound { .. }) => Ok(Action::AwaitChange),
            Err(e) => Err(e.into()),
        }
    }
}

impl Reconcile for SnapshotController {
    type Error = ReconcileError;

    async fn reconcile(&self, key: ObjectRef) -> Result<Action, ReconcileError> {
        let Some(snapshot) = self.snapshots.get(&key) else {
            return Ok(Action::AwaitChange);
        };
        match finalizer::prepare(self.api.client(), SNAPSHOT_FINALIZER, snapshot.as_ref()).await? {
            Step::Skip => Ok(Action::AwaitChange),
            Step::Apply => self.apply(&snapshot).await,
            Step::Cleanup(cleanup) => {
                // The copy is the volume node's to remove; wait until it no longer holds
                // it, unless there is no volume or node left to hold it.
                let uid = &meta(snapshot.as_ref()).uid;
                let held = self.volume_of(&snapshot).is_some_and(|v| {
                    let status = v.status.clone().unwrap_or_default();
                    status.snapshots.iter().any(|s| s.uid == *uid)
                        && self.nodes.get_named("", &status.node).is_some()
                });
                if held {
                    self.apply(&snapshot).await?;
                    return Ok(Action::AwaitChange);
                }
                cleanup.finish().await?;
                Ok(Action::AwaitChange)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, room: i64) -> StorageNode {
        StorageNode {
            name: name.to_owned(),
            storage_role: true,
            ready: true,
            cordoned: false,
            zone: "default".to_owned(),
            backend: "file".to_owned(),
            room_gib: room,
        }
    }

    fn wants(size: u64) -> Wants {
        Wants {
            size_gib: size,
            ..Wants::default()
        }
    }

    #[test]
    fn a_volume_goes_where_most_room_is_left() {
        let nodes = [node("a", 10), node("b", 30), node("c", 30)];
        assert_eq!(place(&wants(5), &nodes), Ok("b".to_owned()));
        assert_eq!(
            place(&wants(20), &[node("a", 10), node("c", 30)]),
            Ok("c".to_owned())
        );
    }

    #[test]
    fn nodes_that_cannot_hold_it_are_named_with_why() {
        let mut cordoned = node("b", 100);
        cordoned.cordoned = true;
        let mut other_zone = node("c", 100);
        other_zone.zone = "east".to_owned();
        let mut compute = node("d", 100);
        compute.storage_role = false;
        let mut lvm = node("e", 100);
        lvm.backend = "lvm".to_owned();
        let nodes = [node("a", 4), cordoned, other_zone, compute, lvm];
        let asked = Wants {
            size_gib: 5,
            zone: "default".to_owned(),
            volume_type: "file".to_owned(),
            source_node: None,
        };
        let (reason, message) = place(&asked, &nodes).unwrap_err();
        assert_eq!(reason, reason::NO_STORAGE_NODE);
        assert_eq!(
            message,
            "no storage node fits 5 GiB: a: has 4 GiB of room; b: cordoned; \
             c: in zone \"east\"; e: has backend \"lvm\""
        );
        assert_eq!(
            place(&wants(1), &[]).unwrap_err().1,
            "no node declares the Storage role"
        );
    }

    #[test]
    fn a_clone_goes_where_its_source_is_once_placed() {
        let nodes = [node("a", 10), node("b", 30)];
        let clone = |source: &str| Wants {
            size_gib: 1,
            source_node: Some(source.to_owned()),
            ..Wants::default()
        };
        assert_eq!(place(&clone("a"), &nodes), Ok("a".to_owned()));
        assert_eq!(
            place(&clone(""), &nodes).unwrap_err().0,
            reason::WAITING_FOR_SOURCE
        );
    }

    fn volume(generation: i64, conditions: Vec<v1::Condition>) -> v1::Volume {
        v1::Volume {
            metadata: Some(v1::ObjectMeta {
                name: "data".into(),
                project: "p".into(),
                uid: "vu".into(),
                generation,
                ..Default::default()
            }),
            spec: Some(v1::VolumeSpec {
                size_gib: 1,
                ..Default::default()
            }),
            status: Some(v1::VolumeStatus {
                node: "a".into(),
                conditions,
                ..Default::default()
            }),
        }
    }

    fn provisioned(ok: bool, reason: &str, message: &str, generation: i64) -> v1::Condition {
        v1::Condition {
            observed_generation: generation,
            ..condition(PROVISIONED, ok, reason, message)
        }
    }

    #[test]
    fn the_phase_follows_the_current_provisioned_of_the_volumes_node() {
        use v1::volume_status::Phase;
        let none = volume(1, vec![]);
        assert_eq!(phase_and_ready(&none, None, false).0, Phase::Pending);
        assert_eq!(phase_and_ready(&none, Some("a"), false).0, Phase::Creating);
        let made = volume(
            1,
            vec![provisioned(true, "Provisioned", "node a: 1 GiB file", 1)],
        );
        let (phase, ready) = phase_and_ready(&made, Some("a"), false);
        assert_eq!(phase, Phase::Available);
        assert_eq!(ready.status, v1::condition::Status::True as i32);
        assert_eq!(phase_and_ready(&made, Some("a"), true).0, Phase::InUse);
        // Another node's word, or an older generation's, does not count.
        assert_eq!(phase_and_ready(&made, Some("b"), false).0, Phase::Creating);
        let grown = volume(
            2,
            vec![provisioned(true, "Provisioned", "node a: 1 GiB file", 1)],
        );
        assert_eq!(phase_and_ready(&grown, Some("a"), false).0, Phase::Creating);
        let failed = volume(
            1,
            vec![provisioned(false, "SourceNotFound", "node a: image x", 1)],
        );
        let (phase, ready) = phase_and_ready(&failed, Some("a"), false);
        assert_eq!(phase, Phase::Error);
        assert_eq!(ready.reason, "SourceNotFound");
        let mut going = volume(1, vec![]);
        going.metadata.as_mut().unwrap().deletion_timestamp = Some(Default::default());
        assert_eq!(phase_and_ready(&going, Some("a"), true).0, Phase::Deleting);
    }

    #[test]
    fn a_snapshot_is_available_once_its_volumes_node_holds_it() {
        use v1::volume_snapshot_status::Phase;
        let snapshot = v1::VolumeSnapshot {
            metadata: Some(v1::ObjectMeta {
                name: "before".into(),
                project: "p".into(),
                uid: "su".into(),
                ..Default::default()
            }),
            spec: Some(v1::VolumeSnapshotSpec {
                volume: "data".into(),
                ..Default::default()
            }),
            status: None,
        };
        let (phase, ready, _) = snapshot_state(&snapshot, None);
        assert_eq!(
            (phase, ready.reason.as_str()),
            (Phase::Creating, "VolumeNotFound")
        );
        let mut data = volume(1, vec![]);
        let (phase, ready, _) = snapshot_state(&snapshot, Some(&data));
        assert_eq!(
            (phase, ready.message.as_str()),
            (Phase::Creating, "waiting for node a to copy volume data")
        );
        data.status.as_mut().unwrap().attachments = vec![v1::VolumeAttachment {
            server: "web-1".into(),
            ..Default::default()
        }];
        let (_, ready, _) = snapshot_state(&snapshot, Some(&data));
        assert_eq!(ready.reason, "VolumeInUse");
        data.status.as_mut().unwrap().snapshots = vec![v1::HeldSnapshot {
            uid: "su".into(),
            size_gib: 1,
        }];
        let (phase, ready, size) = snapshot_state(&snapshot, Some(&data));
        assert_eq!((phase, size), (Phase::Available, 1));
        assert_eq!(ready.status, v1::condition::Status::True as i32);
    }

    #[test]
    fn attachments_are_read_from_the_servers_hosts() {
        let server = |name: &str, node: &str, uids: &[&str]| {
            Arc::new(v1::Server {
                metadata: Some(v1::ObjectMeta {
                    name: name.into(),
                    ..Default::default()
                }),
                spec: None,
                status: Some(v1::ServerStatus {
                    node: node.into(),
                    host: Some(v1::ServerHostStatus {
                        volumes: uids
                            .iter()
                            .map(|u| v1::AttachedVolume {
                                volume: "data".into(),
                                uid: (*u).into(),
                                serial: u[..2].into(),
                            })
                            .collect(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
            })
        };
        let servers = [
            server("web-2", "n2", &["vu"]),
            server("web-1", "n1", &["vu", "other"]),
            server("db", "n1", &["other"]),
        ];
        let found = attachments("vu", &servers);
        let shown: Vec<(&str, &str, &str)> = found
            .iter()
            .map(|a| (a.server.as_str(), a.node.as_str(), a.device.as_str()))
            .collect();
        assert_eq!(shown, [("web-1", "n1", "vu"), ("web-2", "n2", "vu")]);
    }
}
