//! The Volume reconciler of a storage node: makes each Volume placed on this node exist in
//! the node's volume backend with its size, exports it over NBD to the servers on other
//! nodes that attach it, removes it when the Volume goes, and reports what it observes.
//!
//! A reconcile takes a Volume uid. It reads the backend (never its memory) and:
//!
//! - **makes** a volume that is missing: empty, a full copy of an Image (cached on this
//!   node first, as a server's image is), or a clone of another Volume on this node. A
//!   record `<records>/<uid>.json` naming the Volume's project and name is written first,
//!   so that bytes whose Volume is gone can be recognised as orphans;
//! - **grows** it when `spec.sizeGib` grew and no guest has it attached (a volume in use
//!   keeps its size until detached; `status.sizeGib` shows what it has);
//! - **exports** it, one `qemu-storage-daemon` per server on another node whose
//!   `spec.volumes` names it ([`crate::volumes::nbd`]), and lists the exports in
//!   `status.exports`, which is where that server's node finds it. An export stays while
//!   the server's node still reports the volume attached, so a guest never loses a disk
//!   it has not released;
//! - **snapshots** it: each VolumeSnapshot of the volume is a full copy made in the same
//!   backend (named by the snapshot's uid, with a record naming the snapshot), taken while
//!   no guest has the volume attached or exported (a copy of a disk in use would not be
//!   consistent; the snapshot waits, and says so), listed in `status.snapshots`, and
//!   removed when the VolumeSnapshot goes. A volume restored from a snapshot is a copy of
//!   that copy, on this node;
//! - **writes** `status.sizeGib`, `status.exports`, `status.snapshots` and `Provisioned` (its message begins
//!   `node <name>`, see the volume controller) as writer `agent`, when they differ;
//! - on **deletion**, waits until no guest has the volume attached, then removes its
//!   exports, its bytes and its record, and then the finalizer `ferro.io/agent`;
//! - for an **orphan** (bytes or exports whose uid is no Volume placed here), removes them
//!   only after a direct read of the Volume its record names finds none, or one with
//!   another uid. Bytes without a record are left alone and logged.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ferro_api::client::{Client, Selection};
use ferro_api::resolve::resolve;
use ferro_api::{Error, Kind, Resource, owners, v1};
use ferro_runtime::events::Recorder;
use ferro_runtime::reflector::UID;
use ferro_runtime::{Action, Reconcile, Store, condition};
use serde::{Deserialize, Serialize};

use crate::hypervisor::DiskFormat;
use crate::images::{ImageCache, ImageRef, error_chain};
use crate::volumes::nbd::NbdExports;
use crate::volumes::{Content, VolumeBackend, VolumeError, VolumeInfo, VolumeRequest};

/// The name of the Volume reconciler's controller, in logs and metric labels.
pub const STORAGE_CONTROLLER: &str = "agent-storage";
/// The agent's condition on a Volume.
pub const PROVISIONED: &str = "Provisioned";
/// Where the records naming each volume's owner live, under the state directory.
pub const RECORD_DIR: &str = "volume-records";

const GIB: u64 = 1 << 30;
/// How soon a deletion waiting for a detach, or a source not there yet, is looked at again.
const WAIT: Duration = Duration::from_secs(3);

/// Why a Volume reconcile did not converge.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The API failed.
    #[error(transparent)]
    Api(#[from] Error),
    /// The backend failed.
    #[error(transparent)]
    Backend(#[from] VolumeError),
    /// The source Image could not be cached.
    #[error("image {name}: {message}")]
    Image {
        /// The Image.
        name: String,
        /// What went wrong.
        message: String,
    },
    /// A record could not be written.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
}

/// Who owns a volume's bytes, written beside them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Record {
    project: String,
    name: String,
    /// `VolumeSnapshot` for a snapshot's copy; empty for a Volume.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    kind: String,
    /// For a snapshot: the uid of the volume it copies.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    volume: String,
}

/// The record kind of a snapshot's copy.
const SNAPSHOT_RECORD: &str = "VolumeSnapshot";

/// One export a volume should have: for a server on another node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WantedExport {
    /// The export's id: `<volume uid>--<server uid>`.
    pub id: String,
    /// The Server's name.
    pub server: String,
    /// The Server's uid.
    pub server_uid: String,
}

/// The exports `volume` (placed on `node`) should have: one per server in its project on
/// another node that lists it in `spec.volumes` or boots from it, or whose guest still has
/// it attached.
/// Pure.
pub fn wanted_exports(
    volume: &v1::Volume,
    node: &str,
    servers: &[Arc<v1::Server>],
) -> Vec<WantedExport> {
    let Some(m) = volume.metadata.as_ref() else {
        return Vec::new();
    };
    let mut wanted: Vec<WantedExport> = servers
        .iter()
        .filter_map(|server| {
            let sm = server.metadata.as_ref()?;
            let status = server.status.as_ref()?;
            if sm.project != m.project || status.node.is_empty() || status.node == node {
                return None;
            }
            let listed = sm.deletion_timestamp.is_none()
                && server.spec.as_ref().is_some_and(|s| {
                    s.boot_volume == m.name || s.volumes.iter().any(|v| v.volume == m.name)
                });
            let attached = status
                .host
                .as_ref()
                .is_some_and(|h| h.volumes.iter().any(|v| v.uid == m.uid));
            (listed || attached).then(|| WantedExport {
                id: export_id(&m.uid, &sm.uid),
                server: sm.name.clone(),
                server_uid: sm.uid.clone(),
            })
        })
        .collect();
    wanted.sort_by(|a, b| a.id.cmp(&b.id));
    wanted
}

/// The id of the export of volume `volume_uid` for server `server_uid`.
pub fn export_id(volume_uid: &str, server_uid: &str) -> String {
    format!("{volume_uid}--{server_uid}")
}

/// `host:port`, with an IPv6 host in brackets.
pub fn host_port(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// The host and port of a `host:port` (an IPv6 host in brackets).
pub fn split_host_port(address: &str) -> Option<(String, u16)> {
    let (host, port) = address.rsplit_once(':')?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    Some((host.to_owned(), port.parse().ok()?))
}

/// The message of `Provisioned` for what is on `node`.
pub fn provisioned_message(node: &str, detail: &str) -> String {
    format!("node {node}: {detail}")
}

/// The Volume reconciler of one storage node.
pub struct StorageReconciler {
    /// The apiserver, as this node.
    pub client: Client,
    /// This node's name.
    pub node: String,
    /// Where volumes' bytes are.
    pub backend: Arc<dyn VolumeBackend>,
    /// The NBD exports of volumes to other nodes.
    pub exports: Arc<NbdExports>,
    /// The node's image cache, for volumes made from an Image.
    pub images: Arc<dyn ImageCache>,
    /// Every Volume.
    pub volumes: Store<v1::Volume>,
    /// Every Server (those on other nodes attach this node's volumes).
    pub servers: Store<v1::Server>,
    /// Every VolumeSnapshot: this node holds the copies of its volumes' snapshots.
    pub snapshots: Store<v1::VolumeSnapshot>,
    /// Where owner records are kept.
    pub records: PathBuf,
    /// Events about Volumes.
    pub recorder: Recorder,
}

fn node_of(volume: &v1::Volume) -> &str {
    volume
        .status
        .as_ref()
        .map(|s| s.node.as_str())
        .unwrap_or_default()
}

fn shown(volume: &v1::Volume) -> String {
    let m = volume.metadata.clone().unwrap_or_default();
    format!("{}/{}", m.project, m.name)
}

impl StorageReconciler {
    /// Brings one volume (by uid) to what the API wants of it on this node.
    pub async fn reconcile(&self, uid: &str) -> Result<Action, StorageError> {
        let volume = self.volumes.by_index(UID, uid).into_iter().next();
        match volume {
            Some(volume) if node_of(&volume) == self.node => {
                if volume
                    .metadata
                    .as_ref()
                    .is_some_and(|m| m.deletion_timestamp.is_some())
                {
                    self.release(&volume).await
                } else {
                    self.provide(&volume).await
                }
            }
            _ => self.orphan(uid).await,
        }
    }

    fn record_path(&self, uid: &str) -> PathBuf {
        self.records.join(format!("{uid}.json"))
    }

    fn write_record(&self, uid: &str, volume: &v1::Volume) -> Result<(), StorageError> {
        let m = volume.metadata.clone().unwrap_or_default();
        let record = Record {
            project: m.project,
            name: m.name,
            kind: String::new(),
            volume: String::new(),
        };
        self.put_record(uid, &record)
    }

    fn put_record(&self, uid: &str, record: &Record) -> Result<(), StorageError> {
        let path = self.record_path(uid);
        let io = |what: String| move |source| StorageError::Io { what, source };
        std::fs::create_dir_all(&self.records)
            .map_err(io(format!("creating {}", self.records.display())))?;
        let partial = path.with_extension("json.partial");
        let bytes = serde_json::to_vec(record).expect("records serialise");
        std::fs::write(&partial, bytes).map_err(io(format!("writing {}", partial.display())))?;
        std::fs::rename(&partial, &path).map_err(io(format!("writing {}", path.display())))?;
        Ok(())
    }

    fn read_record(&self, uid: &str) -> Option<Record> {
        let bytes = std::fs::read(self.record_path(uid)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    fn remove_record(&self, uid: &str) {
        let _ = std::fs::remove_file(self.record_path(uid));
    }

    /// The snapshot copies recorded for volume `volume_uid`: (snapshot uid, record).
    fn snapshot_records(&self, volume_uid: &str) -> Vec<(String, Record)> {
        let Ok(entries) = std::fs::read_dir(&self.records) else {
            return Vec::new();
        };
        let mut found: Vec<(String, Record)> = entries
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                let uid = name.strip_suffix(".json")?.to_owned();
                let record = self.read_record(&uid)?;
                (record.kind == SNAPSHOT_RECORD && record.volume == volume_uid)
                    .then_some((uid, record))
            })
            .collect();
        found.sort_by(|a, b| a.0.cmp(&b.0));
        found
    }

    /// Takes the snapshots of `volume` that are wanted and not held, while no guest has it
    /// (a copy of a disk in use would not be consistent), and removes the copies whose
    /// VolumeSnapshot is gone. Returns what is held afterwards.
    async fn sync_snapshots(
        &self,
        volume: &v1::Volume,
        info: &VolumeInfo,
        exported: bool,
    ) -> Result<Vec<v1::HeldSnapshot>, StorageError> {
        let m = volume.metadata.clone().unwrap_or_default();
        let wanted: Vec<Arc<v1::VolumeSnapshot>> = self
            .snapshots
            .list()
            .into_iter()
            .filter(|s| {
                let sm = s.metadata.clone().unwrap_or_default();
                sm.project == m.project
                    && sm.deletion_timestamp.is_none()
                    && s.spec.as_ref().is_some_and(|s| s.volume == m.name)
            })
            .collect();
        let wanted_uids: BTreeSet<String> = wanted
            .iter()
            .filter_map(|s| s.metadata.as_ref().map(|m| m.uid.clone()))
            .collect();
        for (uid, record) in self.snapshot_records(&m.uid) {
            if !wanted_uids.contains(&uid) {
                self.backend.delete(&uid).await?;
                self.remove_record(&uid);
                let message = format!(
                    "removed the copy of snapshot {} from node {}",
                    record.name, self.node
                );
                self.recorder
                    .normal(volume, "SnapshotDeleted", &message)
                    .await;
            }
        }
        let in_use = exported
            || volume
                .status
                .as_ref()
                .is_some_and(|s| !s.attachments.is_empty());
        let mut held = Vec::new();
        for snapshot in &wanted {
            let sm = snapshot.metadata.clone().unwrap_or_default();
            let copy = match self.backend.get(&sm.uid).await? {
                Some(copy) => copy,
                None if in_use => continue,
                None => {
                    let record = Record {
                        project: sm.project.clone(),
                        name: sm.name.clone(),
                        kind: SNAPSHOT_RECORD.to_owned(),
                        volume: m.uid.clone(),
                    };
                    self.put_record(&sm.uid, &record)?;
                    let request = VolumeRequest {
                        uid: sm.uid.clone(),
                        size_bytes: info.size_bytes,
                        content: Content::Volume { uid: m.uid.clone() },
                    };
                    let started = std::time::Instant::now();
                    let copy = self.backend.create(&request).await?;
                    let message = format!(
                        "took snapshot {} on node {} in {:.1}s",
                        sm.name,
                        self.node,
                        started.elapsed().as_secs_f64()
                    );
                    self.recorder
                        .normal(volume, "SnapshotTaken", &message)
                        .await;
                    copy
                }
            };
            held.push(v1::HeldSnapshot {
                uid: sm.uid.clone(),
                size_gib: copy.size_bytes.div_ceil(GIB),
            });
        }
        Ok(held)
    }

    /// Makes, grows and exports a live volume, and reports it.
    async fn provide(&self, volume: &v1::Volume) -> Result<Action, StorageError> {
        let m = volume.metadata.clone().unwrap_or_default();
        let spec = volume.spec.clone().unwrap_or_default();
        let wanted_bytes = spec.size_gib.saturating_mul(GIB);
        let attached = volume
            .status
            .as_ref()
            .is_some_and(|s| !s.attachments.is_empty());
        let existing = self.backend.get(&m.uid).await?;
        let info = match existing {
            Some(info) => info,
            None => match self.content(volume).await {
                Ok(content) => {
                    self.write_record(&m.uid, volume)?;
                    let request = VolumeRequest {
                        uid: m.uid.clone(),
                        size_bytes: wanted_bytes,
                        content,
                    };
                    let started = std::time::Instant::now();
                    match self.backend.create(&request).await {
                        Ok(info) => {
                            let message = format!(
                                "made the {} GiB volume on node {} ({} backend) in {:.1}s",
                                spec.size_gib,
                                self.node,
                                self.backend.kind(),
                                started.elapsed().as_secs_f64()
                            );
                            tracing::info!(volume = %shown(volume), uid = %m.uid, "{message}");
                            self.recorder.normal(volume, "Created", &message).await;
                            info
                        }
                        Err(e) => {
                            let failed = condition(
                                PROVISIONED,
                                false,
                                e.reason(),
                                provisioned_message(&self.node, &error_chain(&e)),
                            );
                            self.recorder
                                .warning(volume, e.reason(), &error_chain(&e))
                                .await;
                            self.write_status(volume, None, failed).await?;
                            return Err(e.into());
                        }
                    }
                }
                Err((reason, message)) => {
                    let failed = condition(
                        PROVISIONED,
                        false,
                        reason,
                        provisioned_message(&self.node, &message),
                    );
                    self.write_status(volume, None, failed).await?;
                    return Ok(Action::Requeue(WAIT * 10));
                }
            },
        };
        // Exports first: a daemon left for a guest that has gone holds the file's lock, and
        // growing or copying the volume waits for it to stop.
        let exports = self.sync_exports(volume, &info).await?;
        let mut grow_failed = None;
        let info = if info.size_bytes < wanted_bytes && !attached && exports.is_empty() {
            match self.backend.resize(&m.uid, wanted_bytes).await {
                Ok(grown) => {
                    let message = format!(
                        "grew the volume to {} GiB on node {}",
                        spec.size_gib, self.node
                    );
                    self.recorder.normal(volume, "Resized", &message).await;
                    grown
                }
                Err(e) => {
                    self.recorder
                        .warning(volume, "ResizeFailed", &error_chain(&e))
                        .await;
                    grow_failed = Some(error_chain(&e));
                    info
                }
            }
        } else {
            info
        };
        let snapshots = self
            .sync_snapshots(volume, &info, !exports.is_empty())
            .await?;
        let size_gib = info.size_bytes.div_ceil(GIB);
        let mut detail = format!("{size_gib} GiB {} volume", self.backend.kind());
        if info.size_bytes < wanted_bytes {
            let remote = !exports.is_empty()
                || volume
                    .status
                    .iter()
                    .flat_map(|s| &s.attachments)
                    .any(|a| a.node != self.node);
            detail.push_str(&if let Some(e) = &grow_failed {
                format!("; growing to {} GiB failed: {e}", spec.size_gib)
            } else if remote {
                format!(
                    "; growing to {} GiB waits until no other node has it (QEMU cannot grow \
                     a disk attached over NBD)",
                    spec.size_gib
                )
            } else {
                format!(
                    "; the guest's QEMU on this node grows it to {} GiB",
                    spec.size_gib
                )
            });
        }
        let ready = condition(
            PROVISIONED,
            true,
            "Provisioned",
            provisioned_message(&self.node, &detail),
        );
        let status = v1::VolumeStatus {
            size_gib,
            exports,
            snapshots,
            ..Default::default()
        };
        self.write_status(volume, Some(status), ready).await?;
        Ok(Action::AwaitChange)
    }

    /// What a new volume is made from, or why it cannot be made yet (reason, message).
    async fn content(&self, volume: &v1::Volume) -> Result<Content, (&'static str, String)> {
        let m = volume.metadata.clone().unwrap_or_default();
        let source = volume
            .spec
            .as_ref()
            .and_then(|s| s.source.clone())
            .unwrap_or_default();
        if !source.image.is_empty() {
            let image = self
                .resolve_image(&m.project, &source.image)
                .await
                .map_err(|message| ("SourceNotFound", message))?;
            let file = self
                .images
                .ensure(&ImageRef::of(&image))
                .await
                .map_err(|e| {
                    (
                        "ImageFailed",
                        format!("image {}: {}", source.image, error_chain(&e)),
                    )
                })?;
            let format = match file.format.as_str() {
                "qcow2" => DiskFormat::Qcow2,
                _ => DiskFormat::Raw,
            };
            return Ok(Content::Image {
                path: file.path,
                format,
            });
        }
        if !source.volume.is_empty() {
            let Some(other) = self.volumes.get_named(&m.project, &source.volume) else {
                return Err((
                    "SourceNotFound",
                    format!(
                        "volume {} not found in project {}",
                        source.volume, m.project
                    ),
                ));
            };
            let other_uid = other
                .metadata
                .as_ref()
                .map(|m| m.uid.clone())
                .unwrap_or_default();
            if node_of(&other) != self.node {
                return Err((
                    "Creating",
                    format!(
                        "waiting for source volume {} to be on node {}",
                        source.volume, self.node
                    ),
                ));
            }
            return Ok(Content::Volume { uid: other_uid });
        }
        if !source.snapshot.is_empty() {
            let Some(snapshot) = self.snapshots.get_named(&m.project, &source.snapshot) else {
                return Err((
                    "SourceNotFound",
                    format!(
                        "snapshot {} not found in project {}",
                        source.snapshot, m.project
                    ),
                ));
            };
            let uid = snapshot
                .metadata
                .as_ref()
                .map(|m| m.uid.clone())
                .unwrap_or_default();
            return match self.backend.get(&uid).await {
                Ok(Some(_)) => Ok(Content::Volume { uid }),
                _ => Err((
                    "Creating",
                    format!(
                        "waiting for snapshot {} to be taken on node {}",
                        source.snapshot, self.node
                    ),
                )),
            };
        }
        Ok(Content::Empty)
    }

    async fn resolve_image(&self, project: &str, name: &str) -> Result<v1::Image, String> {
        let selection = Selection::all().fields(format!("metadata.name={name}"));
        let (objects, _) = self
            .client
            .list(Kind::Image, &selection)
            .await
            .map_err(|e| e.to_string())?;
        let images: Vec<v1::Image> = objects
            .into_iter()
            .filter_map(v1::Image::from_object)
            .collect();
        resolve(project, name, images.iter())
            .cloned()
            .map_err(|e| e.to_string())
    }

    /// Starts the exports the volume should have and stops the others; returns those that
    /// run, as `status.exports` lists them.
    async fn sync_exports(
        &self,
        volume: &v1::Volume,
        info: &VolumeInfo,
    ) -> Result<Vec<v1::VolumeExport>, StorageError> {
        let uid = volume
            .metadata
            .as_ref()
            .map(|m| m.uid.clone())
            .unwrap_or_default();
        let wanted = wanted_exports(volume, &self.node, &self.servers.list());
        let running: BTreeMap<String, crate::volumes::nbd::Export> = self
            .exports
            .list()
            .await?
            .into_iter()
            .filter(|e| e.volume_uid == uid)
            .map(|e| (e.id.clone(), e))
            .collect();
        let ids: BTreeSet<&str> = wanted.iter().map(|w| w.id.as_str()).collect();
        for id in running.keys() {
            if !ids.contains(id.as_str()) {
                self.exports.remove(id).await?;
                let message = format!("stopped NBD export {id} on node {}", self.node);
                self.recorder
                    .normal(volume, "ExportStopped", &message)
                    .await;
            }
        }
        let mut listed = Vec::new();
        for w in &wanted {
            let export = self.exports.ensure(&w.id, info).await?;
            if !running.contains_key(&w.id) {
                let message = format!(
                    "exporting the volume to server {} at {}:{}",
                    w.server, export.host, export.port
                );
                self.recorder.normal(volume, "Exported", &message).await;
            }
            listed.push(v1::VolumeExport {
                server: w.server.clone(),
                server_uid: w.server_uid.clone(),
                address: host_port(&export.host, export.port),
                name: export.name.clone(),
            });
        }
        Ok(listed)
    }

    /// Writes `sizeGib`, `exports` (when `status` is given) and `Provisioned`, if they differ.
    async fn write_status(
        &self,
        volume: &v1::Volume,
        status: Option<v1::VolumeStatus>,
        provisioned: v1::Condition,
    ) -> Result<(), StorageError> {
        let current = volume.status.clone().unwrap_or_default();
        let generation = volume.metadata.as_ref().map_or(0, |m| m.generation);
        let same_condition = current.conditions.iter().any(|c| {
            crate::node::same_condition(c, &provisioned) && c.observed_generation == generation
        });
        let same_fields = status.as_ref().is_none_or(|s| {
            s.size_gib == current.size_gib
                && s.exports == current.exports
                && s.snapshots == current.snapshots
        });
        if same_condition && same_fields {
            return Ok(());
        }
        let fields: &[&str] = if status.is_some() {
            &["sizeGib", "exports", "snapshots"]
        } else {
            &[]
        };
        let patch = v1::Volume {
            metadata: volume.metadata.clone(),
            spec: None,
            status: Some(status.unwrap_or_default()),
        };
        match self
            .client
            .update_status(
                patch.into_object(),
                owners::AGENT,
                fields,
                vec![provisioned],
            )
            .await
        {
            Ok(_) | Err(Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// A deleted volume: once no guest has it, its exports, bytes and record go, then the
    /// finalizer.
    async fn release(&self, volume: &v1::Volume) -> Result<Action, StorageError> {
        let m = volume.metadata.clone().unwrap_or_default();
        let attached: Vec<String> = volume
            .status
            .iter()
            .flat_map(|s| &s.attachments)
            .map(|a| a.server.clone())
            .collect();
        if !attached.is_empty() {
            tracing::info!(volume = %shown(volume), servers = ?attached, "deletion waits for the volume to be detached");
            return Ok(Action::Requeue(WAIT));
        }
        for (uid, _) in self.snapshot_records(&m.uid) {
            self.backend.delete(&uid).await?;
            self.remove_record(&uid);
        }
        self.remove_bytes(&m.uid).await?;
        let message = format!("removed the volume and its exports from node {}", self.node);
        self.recorder.normal(volume, "Deleted", &message).await;
        crate::node::remove_agent_finalizer::<v1::Volume>(&self.client, &m).await?;
        Ok(Action::AwaitChange)
    }

    async fn remove_bytes(&self, uid: &str) -> Result<(), StorageError> {
        for export in self.exports.list().await? {
            if export.volume_uid == uid {
                self.exports.remove(&export.id).await?;
            }
        }
        self.backend.delete(uid).await?;
        self.remove_record(uid);
        Ok(())
    }

    /// Bytes or exports of a uid that is no Volume placed here.
    async fn orphan(&self, uid: &str) -> Result<Action, StorageError> {
        let has_bytes = self.backend.get(uid).await?.is_some();
        let has_exports = self
            .exports
            .list()
            .await?
            .iter()
            .any(|e| e.volume_uid == uid);
        if !has_bytes && !has_exports {
            self.remove_record(uid);
            return Ok(Action::AwaitChange);
        }
        let Some(record) = self.read_record(uid) else {
            tracing::warn!(uid, "volume bytes without an owner record are left alone");
            return Ok(Action::AwaitChange);
        };
        if record.kind == SNAPSHOT_RECORD {
            return self.orphan_snapshot(uid, &record).await;
        }
        match self
            .client
            .get_typed::<v1::Volume>(&record.project, &record.name)
            .await
        {
            Ok(volume) if volume.metadata.as_ref().is_some_and(|m| m.uid == uid) => {
                if node_of(&volume) != self.node {
                    tracing::warn!(uid, volume = %shown(&volume), node = node_of(&volume),
                        "the volume is placed on another node; its bytes here are left alone");
                }
                // Placed here and the cache has not shown it yet: its change queues it.
                Ok(Action::AwaitChange)
            }
            Ok(_) | Err(Error::NotFound { .. }) => {
                self.remove_bytes(uid).await?;
                tracing::info!(uid, project = %record.project, name = %record.name,
                    "removed the bytes of a volume that is gone");
                Ok(Action::AwaitChange)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// A snapshot copy: kept while its VolumeSnapshot is there (its volume's reconcile
    /// removes it when the snapshot is deleted); removed when a direct read finds none.
    async fn orphan_snapshot(&self, uid: &str, record: &Record) -> Result<Action, StorageError> {
        match self
            .client
            .get_typed::<v1::VolumeSnapshot>(&record.project, &record.name)
            .await
        {
            Ok(s) if s.metadata.as_ref().is_some_and(|m| m.uid == uid) => Ok(Action::AwaitChange),
            Ok(_) | Err(Error::NotFound { .. }) => {
                self.backend.delete(uid).await?;
                self.remove_record(uid);
                tracing::info!(uid, project = %record.project, name = %record.name,
                    "removed the copy of a snapshot that is gone");
                Ok(Action::AwaitChange)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Every uid a resync looks at: the Volumes placed here, and what the host has.
    pub async fn resync_keys(&self) -> Vec<String> {
        let mut uids: BTreeSet<String> = self
            .volumes
            .list()
            .iter()
            .filter(|v| node_of(v) == self.node)
            .filter_map(|v| v.metadata.as_ref().map(|m| m.uid.clone()))
            .collect();
        match self.backend.collect_leftovers().await {
            Ok(removed) if !removed.is_empty() => {
                tracing::info!(?removed, "removed what interrupted creates left");
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %error_chain(&e), "collecting leftovers failed"),
        }
        match self.backend.list().await {
            Ok(found) => uids.extend(found.into_iter().map(|v| v.uid)),
            Err(e) => {
                tracing::warn!(error = %error_chain(&e), "listing the volumes on this node failed")
            }
        }
        match self.exports.list().await {
            Ok(found) => uids.extend(found.into_iter().map(|e| e.volume_uid)),
            Err(e) => tracing::warn!(error = %error_chain(&e), "listing the NBD exports failed"),
        }
        uids.into_iter().collect()
    }

    /// What this node's backend offers, for `Node.status.storage`.
    pub async fn report(backend: &dyn VolumeBackend) -> Option<v1::NodeStorage> {
        let capacity = backend.capacity().await.ok()?;
        Some(v1::NodeStorage {
            backend: backend.kind().to_owned(),
            capacity_gib: capacity.total_bytes / GIB,
            free_gib: capacity.free_bytes / GIB,
        })
    }
}

/// The uids of the Volumes placed on `node` that are copies (of a volume or a snapshot)
/// not made yet: a change of their source lets them go on.
pub fn copies_waiting(node: &str, volumes: &Store<v1::Volume>) -> Vec<String> {
    volumes
        .list()
        .iter()
        .filter(|v| node_of(v) == node)
        .filter(|v| {
            v.spec
                .as_ref()
                .and_then(|s| s.source.as_ref())
                .is_some_and(|s| !s.volume.is_empty() || !s.snapshot.is_empty())
        })
        .filter(|v| v.status.as_ref().is_none_or(|s| s.size_gib == 0))
        .filter_map(|v| v.metadata.as_ref().map(|m| m.uid.clone()))
        .collect()
}

/// The uids of the Volumes placed here that a change of a Volume or Server concerns.
pub fn volumes_of_change(
    node: &str,
    volumes: &Store<v1::Volume>,
    servers: &[&v1::Server],
) -> Vec<String> {
    let mut uids = BTreeSet::new();
    for server in servers {
        let Some(m) = server.metadata.as_ref() else {
            continue;
        };
        let names = server
            .spec
            .iter()
            .flat_map(|s| {
                s.volumes
                    .iter()
                    .map(|v| v.volume.clone())
                    .chain([s.boot_volume.clone()])
            })
            .filter(|name| !name.is_empty());
        for name in names {
            if let Some(volume) = volumes.get_named(&m.project, &name)
                && node_of(&volume) == node
                && let Some(vm) = volume.metadata.as_ref()
            {
                uids.insert(vm.uid.clone());
            }
        }
        let attached = server
            .status
            .iter()
            .filter_map(|s| s.host.as_ref())
            .flat_map(|h| &h.volumes);
        for a in attached {
            if volumes
                .by_index(UID, &a.uid)
                .first()
                .is_some_and(|v| node_of(v) == node)
            {
                uids.insert(a.uid.clone());
            }
        }
    }
    uids.into_iter().collect()
}

impl Reconcile<String> for StorageReconciler {
    type Error = StorageError;

    async fn reconcile(&self, uid: String) -> Result<Action, StorageError> {
        StorageReconciler::reconcile(self, &uid).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(name: &str, node: &str, volumes: &[&str], attached: &[&str]) -> Arc<v1::Server> {
        Arc::new(v1::Server {
            metadata: Some(v1::ObjectMeta {
                name: name.into(),
                project: "p".into(),
                uid: format!("{name}-uid"),
                ..Default::default()
            }),
            spec: Some(v1::ServerSpec {
                volumes: volumes
                    .iter()
                    .map(|v| v1::ServerVolume {
                        volume: (*v).into(),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            }),
            status: Some(v1::ServerStatus {
                node: node.into(),
                host: Some(v1::ServerHostStatus {
                    volumes: attached
                        .iter()
                        .map(|u| v1::AttachedVolume {
                            uid: (*u).into(),
                            ..Default::default()
                        })
                        .collect(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
        })
    }

    #[test]
    fn export_addresses_bracket_ipv6() {
        assert_eq!(host_port("198.18.0.11", 10809), "198.18.0.11:10809");
        assert_eq!(host_port("fd00::11", 10809), "[fd00::11]:10809");
        assert_eq!(
            split_host_port("[fd00::11]:10809"),
            Some(("fd00::11".to_owned(), 10809))
        );
        assert_eq!(
            split_host_port("198.18.0.11:10809"),
            Some(("198.18.0.11".to_owned(), 10809))
        );
        assert_eq!(split_host_port("nonsense"), None);
    }

    #[test]
    fn a_volume_is_exported_to_each_server_on_another_node_that_has_or_wants_it() {
        let volume = v1::Volume {
            metadata: Some(v1::ObjectMeta {
                name: "data".into(),
                project: "p".into(),
                uid: "vu".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let servers = [
            // On the volume's own node: opens the file, no export.
            server("local", "n1", &["data"], &[]),
            // Wants it.
            server("remote", "n2", &["data"], &[]),
            // No longer lists it, but its guest still has it: the export stays.
            server("leaving", "n3", &[], &["vu"]),
            // Neither.
            server("other", "n2", &["logs"], &[]),
            // Not placed yet.
            server("unplaced", "", &["data"], &[]),
        ];
        let wanted = wanted_exports(&volume, "n1", &servers);
        let shown: Vec<(&str, &str)> = wanted
            .iter()
            .map(|w| (w.id.as_str(), w.server.as_str()))
            .collect();
        assert_eq!(
            shown,
            [("vu--leaving-uid", "leaving"), ("vu--remote-uid", "remote")]
        );
    }
}
