//! The image controller: an Image's status from what the nodes' caches found, and an
//! Image in use kept until it is not.
//!
//! **In use.** Every Image carries the finalizer [`IMAGE_FINALIZER`]. A deleted Image stays
//! (`deletionTimestamp` set) while anything still needs it: a Server booted from it (its
//! `status.resolved` names the image's uid, or it names the image and is not resolved
//! yet), an Image that uses it as its kernel or ramdisk (even one being deleted, while it
//! stays), or a Volume not made from it yet.
//! The condition `InUse=True` and a Warning event name them; the image goes when the last
//! one has. This is Kubernetes' protection of volumes in use rather than a refusal, so that
//! `ferro delete -f` of a directory, which deletes `image.yaml` before `server.yaml`,
//! works: the servers go, then the image.
//!
//! Each node's agent reports the images it holds in its own `Node.status.images` (one
//! `CachedImage` per image uid: `Downloading`, `Ready` or `Failed`, with checksum, format,
//! sizes and a message), so that no two nodes write the same object. This controller
//! gathers every node's entry for an Image and derives the Image's status — observations,
//! recomputed on every change:
//! - `Active` when any node has it `Ready` (checksum, format and sizes from the first such
//!   node by name), `Ready=True`;
//! - else `Active` when its bytes were uploaded through the API (`status.uploaded`, which
//!   the apiserver writes), with `Ready=True` reason `Uploaded`;
//! - else `Downloading` while any node is fetching it;
//! - else `Error` when every node that tried failed, with `Ready=False` and the reason the
//!   agent put at the head of its message (`ImageChecksumMismatch: …`,
//!   `UnknownImageFormat: …`), or `DownloadFailed`;
//! - else `Pending`: no node has tried yet.

use std::sync::Arc;

use ferro_api::{Error, Kind, Object, owners, v1};

use crate::api::Api;
use ferro_runtime::{
    Action, Caches, Controller, ObjectRef, Reconcile, ReconcileError, Store, condition,
    condition_holds,
    controller::Settings,
    finalizer::{self, Step},
    meta,
    metrics::Metrics,
    reflector::UID,
};

use v1::{cached_image::Phase as Cached, image_status::Phase};

/// The status fields this controller writes.
const FIELDS: &[&str] = &[
    "phase",
    "checksum",
    "sizeBytes",
    "virtualSizeBytes",
    "format",
    "observedGeneration",
];

/// The reason of a failed cache entry: the word before `: ` in its message when it looks
/// like one (`ImageChecksumMismatch: …`), else `DownloadFailed`.
pub fn failure_reason(message: &str) -> &str {
    match message.split_once(": ") {
        Some((head, _))
            if !head.is_empty()
                && head.chars().next().is_some_and(|c| c.is_ascii_uppercase())
                && head.chars().all(|c| c.is_ascii_alphanumeric()) =>
        {
            head
        }
        _ => "DownloadFailed",
    }
}

/// The plan for one Image.
#[derive(Clone, Debug, PartialEq)]
pub struct ImagePlan {
    /// The status fields this controller owns.
    pub status: v1::ImageStatus,
    /// `Ready`.
    pub ready: v1::Condition,
    /// Whether status must be written.
    pub write: bool,
}

/// Plans one Image from every node's entry for it, as `(node, entry)`. Pure.
pub fn plan(image: &v1::Image, entries: &[(String, v1::CachedImage)]) -> ImagePlan {
    let mut entries: Vec<&(String, v1::CachedImage)> = entries.iter().collect();
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    let in_phase = |p: Cached| {
        entries
            .iter()
            .filter(move |(_, e)| e.phase == p as i32)
            .collect::<Vec<_>>()
    };
    let (ready_nodes, downloading, failed) = (
        in_phase(Cached::Ready),
        in_phase(Cached::Downloading),
        in_phase(Cached::Failed),
    );
    let mut status = v1::ImageStatus {
        observed_generation: meta(image).generation,
        ..Default::default()
    };
    let ready = if let Some((_, first)) = ready_nodes.first() {
        status.phase = Phase::Active as i32;
        status.checksum = first.checksum.clone();
        status.format = first.format.clone();
        status.size_bytes = first.size_bytes;
        status.virtual_size_bytes = first.virtual_size_bytes;
        condition(
            "Ready",
            true,
            "Cached",
            format!(
                "cached on {} of {} nodes that fetched it",
                ready_nodes.len(),
                entries.len()
            ),
        )
    } else if let Some(uploaded) = image.status.as_ref().and_then(|s| s.uploaded.as_ref()) {
        // Uploaded bytes are verified by the apiserver as they are stored: the image is
        // usable before any node has fetched it.
        status.phase = Phase::Active as i32;
        status.checksum = uploaded.checksum.clone();
        status.format = uploaded.format.clone();
        status.size_bytes = uploaded.size_bytes;
        status.virtual_size_bytes = uploaded.virtual_size_bytes;
        condition(
            "Ready",
            true,
            "Uploaded",
            "uploaded to the image store; no node has cached it yet",
        )
    } else if let Some((node, entry)) = downloading.first() {
        status.phase = Phase::Downloading as i32;
        let detail = if entry.message.is_empty() {
            String::new()
        } else {
            format!(": {}", entry.message)
        };
        condition(
            "Ready",
            false,
            "Downloading",
            format!("node {node} is fetching it{detail}"),
        )
    } else if let Some((node, entry)) = failed.first() {
        status.phase = Phase::Error as i32;
        condition(
            "Ready",
            false,
            failure_reason(&entry.message),
            format!(
                "every node that fetched it failed ({}); node {node}: {}",
                failed.len(),
                entry.message
            ),
        )
    } else {
        status.phase = Phase::Pending as i32;
        condition("Ready", false, "Pending", "no node has fetched it yet")
    };
    let current = image.status.clone().unwrap_or_default();
    let same = current.phase == status.phase
        && current.checksum == status.checksum
        && current.format == status.format
        && current.size_bytes == status.size_bytes
        && current.virtual_size_bytes == status.virtual_size_bytes
        && current.observed_generation == status.observed_generation;
    let write = !(same && condition_holds(&current.conditions, &ready, meta(image).generation));
    ImagePlan {
        status,
        ready,
        write,
    }
}

/// The finalizer that keeps a deleted Image while something uses it.
pub const IMAGE_FINALIZER: &str = "ferro.io/image-in-use";

/// The index of Servers, Images and Volumes by the image names they use, `<project>/<name>`.
const BY_IMAGE_NAME: &str = "image-name";
/// The index of Servers by the image uids they resolved.
const BY_IMAGE_UID: &str = "image-uid";

fn resolved_images(server: &v1::Server) -> Vec<String> {
    server
        .status
        .iter()
        .flat_map(|s| &s.resolved)
        .filter(|r| r.kind == Kind::Image.name() && !r.uid.is_empty())
        .map(|r| r.uid.clone())
        .collect()
}

fn is_public(image: &v1::Image) -> bool {
    image.spec.as_ref().and_then(|s| s.visibility)
        == Some(v1::image_spec::Visibility::Public as i32)
}

/// What still uses `image`, as `kind project/name` for people. Pure.
pub fn users(
    image: &v1::Image,
    servers: &[Arc<v1::Server>],
    images: &[Arc<v1::Image>],
    volumes: &[Arc<v1::Volume>],
) -> Vec<String> {
    let m = meta(image);
    let sees = |project: &str| project == m.project || is_public(image);
    let mut found = Vec::new();
    for server in servers {
        let sm = meta(server.as_ref());
        let resolved = resolved_images(server);
        let by_name = resolved.is_empty()
            && sees(&sm.project)
            && server.spec.as_ref().is_some_and(|s| s.image == m.name);
        if resolved.contains(&m.uid) || by_name {
            found.push(format!("server {}/{}", sm.project, sm.name));
        }
    }
    for other in images {
        let om = meta(other.as_ref());
        // One being deleted counts while it stays: its own users may still start from it.
        let uses = om.uid != m.uid
            && sees(&om.project)
            && other
                .spec
                .as_ref()
                .is_some_and(|s| s.kernel == m.name || s.ramdisk == m.name);
        if uses {
            found.push(format!("image {}/{}", om.project, om.name));
        }
    }
    for volume in volumes {
        let vm = meta(volume.as_ref());
        let making = vm.deletion_timestamp.is_none()
            && sees(&vm.project)
            && volume.status.as_ref().is_none_or(|s| s.size_gib == 0)
            && volume
                .spec
                .as_ref()
                .and_then(|s| s.source.as_ref())
                .is_some_and(|s| s.image == m.name);
        if making {
            found.push(format!("volume {}/{}", vm.project, vm.name));
        }
    }
    found.sort();
    found
}

/// The image controller: reconciles Images.
pub struct ImageController {
    api: Api,
    images: Store<v1::Image>,
    nodes: Store<v1::Node>,
    servers: Store<v1::Server>,
    volumes: Store<v1::Volume>,
    recorder: ferro_runtime::events::Recorder,
}

impl ImageController {
    /// Builds the controller over the shared caches.
    pub fn build(
        api: &Api,
        caches: &Caches,
        metrics: &Metrics,
        settings: Settings,
    ) -> (Controller, Arc<ImageController>) {
        let images = caches.store::<v1::Image>();
        let nodes = caches.store::<v1::Node>();
        let servers = caches.store::<v1::Server>();
        let volumes = caches.store::<v1::Volume>();
        servers.add_index(BY_IMAGE_UID, resolved_images);
        images.add_index(BY_IMAGE_NAME, |i: &v1::Image| {
            vec![format!("{}/{}", meta(i).project, meta(i).name)]
        });
        // A user changed or gone: the images it names may be free to go.
        let named = images.clone();
        let users_of = move |project: &str, name: &str, uids: &[String]| -> Vec<ObjectRef> {
            let mut keys: Vec<ObjectRef> = named
                .by_index(BY_IMAGE_NAME, &format!("{project}/{name}"))
                .iter()
                .chain(
                    uids.iter()
                        .flat_map(|u| named.by_index(UID, u))
                        .collect::<Vec<_>>()
                        .iter(),
                )
                .filter(|i| meta(i.as_ref()).deletion_timestamp.is_some())
                .map(|i| ObjectRef::of(i.as_ref()))
                .collect();
            keys.dedup();
            keys
        };
        let of_servers = users_of.clone();
        let on_servers = move |c: &ferro_runtime::reflector::Change<v1::Server>| {
            let mut keys = Vec::new();
            for s in c.old.iter().chain(c.new.iter()) {
                let image = s.spec.as_ref().map(|s| s.image.clone()).unwrap_or_default();
                keys.extend(of_servers(
                    &meta(s.as_ref()).project,
                    &image,
                    &resolved_images(s),
                ));
            }
            keys
        };
        let of_volumes = users_of.clone();
        let on_volumes = move |c: &ferro_runtime::reflector::Change<v1::Volume>| {
            let mut keys = Vec::new();
            for v in c.old.iter().chain(c.new.iter()) {
                let image = v
                    .spec
                    .as_ref()
                    .and_then(|s| s.source.as_ref())
                    .map(|s| s.image.clone())
                    .unwrap_or_default();
                keys.extend(of_volumes(&meta(v.as_ref()).project, &image, &[]));
            }
            keys
        };
        let of_images = users_of;
        let on_images = move |c: &ferro_runtime::reflector::Change<v1::Image>| {
            let mut keys = Vec::new();
            for i in c.old.iter().chain(c.new.iter()) {
                let spec = i.spec.clone().unwrap_or_default();
                for name in [spec.kernel, spec.ramdisk] {
                    keys.extend(of_images(&meta(i.as_ref()).project, &name, &[]));
                }
            }
            keys
        };
        let by_uid = images.clone();
        let controller = Controller::new("image", settings, metrics.clone())
            .reconciles(&images)
            .watches(&nodes, move |c| {
                let mut keys: Vec<ObjectRef> = Vec::new();
                for node in c.old.iter().chain(c.new.iter()) {
                    for entry in node.status.iter().flat_map(|s| s.images.iter()) {
                        for image in by_uid.by_index(UID, &entry.image_uid) {
                            let key = ObjectRef::of(image.as_ref());
                            if !keys.contains(&key) {
                                keys.push(key);
                            }
                        }
                    }
                }
                keys
            });
        let controller = controller
            .watches(&servers, on_servers)
            .watches(&volumes, on_volumes)
            .watches(&images, on_images);
        let reconciler = Arc::new(ImageController {
            recorder: ferro_runtime::events::Recorder::new(
                api.client().clone(),
                owners::IMAGE_CONTROLLER,
            ),
            api: api.clone(),
            images,
            nodes,
            servers,
            volumes,
        });
        (controller, reconciler)
    }
}

impl Reconcile for ImageController {
    type Error = ReconcileError;

    async fn reconcile(&self, key: ObjectRef) -> Result<Action, ReconcileError> {
        let Some(image) = self.images.get(&key) else {
            return Ok(Action::AwaitChange);
        };
        if key.kind != Kind::Image {
            return Ok(Action::AwaitChange);
        }
        match finalizer::prepare(self.api.client(), IMAGE_FINALIZER, image.as_ref()).await? {
            Step::Skip => return Ok(Action::AwaitChange),
            Step::Apply => {}
            Step::Cleanup(cleanup) => {
                let users = users(
                    &image,
                    &self.servers.list(),
                    &self.images.list(),
                    &self.volumes.list(),
                );
                if users.is_empty() {
                    cleanup.finish().await?;
                    return Ok(Action::AwaitChange);
                }
                let message = format!(
                    "in use by {}: the image is deleted once they are gone",
                    users.join(", ")
                );
                let in_use = condition("InUse", true, "InUse", message.clone());
                let told = image.status.as_ref().is_some_and(|s| {
                    s.conditions
                        .iter()
                        .any(|c| c.r#type == "InUse" && c.message == message)
                });
                if !told {
                    self.recorder
                        .warning(image.as_ref(), "DeletionWaits", &message)
                        .await;
                    let object = Object::Image(v1::Image {
                        metadata: image.metadata.clone(),
                        spec: None,
                        status: Some(v1::ImageStatus::default()),
                    });
                    match self
                        .api
                        .update_status(object, owners::IMAGE_CONTROLLER, &[], vec![in_use])
                        .await
                    {
                        Ok(_) | Err(Error::NotFound { .. }) => {}
                        Err(e) => return Err(e.into()),
                    }
                }
                return Ok(Action::AwaitChange);
            }
        }
        let uid = &meta(image.as_ref()).uid;
        let entries: Vec<(String, v1::CachedImage)> = self
            .nodes
            .list()
            .iter()
            .flat_map(|node| {
                let name = meta(node.as_ref()).name.clone();
                node.status
                    .iter()
                    .flat_map(|s| s.images.iter())
                    .filter(|e| &e.image_uid == uid)
                    .map(|e| (name.clone(), e.clone()))
                    .collect::<Vec<_>>()
            })
            .collect();
        let plan = plan(&image, &entries);
        if plan.write {
            let object = Object::Image(v1::Image {
                metadata: image.metadata.clone(),
                spec: None,
                status: Some(plan.status),
            });
            match self
                .api
                .update_status(object, owners::IMAGE_CONTROLLER, FIELDS, vec![plan.ready])
                .await
            {
                Ok(_) | Err(Error::NotFound { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(Action::AwaitChange)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_image_is_used_by_servers_kernels_of_other_images_and_volumes_being_made() {
        let obj = |name: &str, project: &str, uid: &str| {
            Some(v1::ObjectMeta {
                name: name.into(),
                project: project.into(),
                uid: uid.into(),
                ..Default::default()
            })
        };
        let kernel = v1::Image {
            metadata: obj("tiny-kernel", "p", "k"),
            ..Default::default()
        };
        let server = |name: &str, image: &str, resolved: Option<&str>| {
            Arc::new(v1::Server {
                metadata: obj(name, "p", name),
                spec: Some(v1::ServerSpec {
                    image: image.into(),
                    ..Default::default()
                }),
                status: Some(v1::ServerStatus {
                    resolved: resolved
                        .into_iter()
                        .map(|uid| v1::ResolvedReference {
                            kind: "Image".into(),
                            name: image.into(),
                            project: "p".into(),
                            uid: uid.into(),
                        })
                        .collect(),
                    ..Default::default()
                }),
            })
        };
        let servers = [
            // Booted from it, resolved.
            server("web-1", "tiny-kernel", Some("k")),
            // Names it, not resolved yet.
            server("web-2", "tiny-kernel", None),
            // Names another image of that name, resolved elsewhere.
            server("web-3", "tiny-kernel", Some("other")),
        ];
        let disk = Arc::new(v1::Image {
            metadata: obj("tiny", "p", "d"),
            spec: Some(v1::ImageSpec {
                kernel: "tiny-kernel".into(),
                ..Default::default()
            }),
            status: None,
        });
        let volume = |name: &str, size_gib: u64| {
            Arc::new(v1::Volume {
                metadata: obj(name, "p", name),
                spec: Some(v1::VolumeSpec {
                    size_gib: 1,
                    source: Some(v1::VolumeSource {
                        image: "tiny-kernel".into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                status: Some(v1::VolumeStatus {
                    size_gib,
                    ..Default::default()
                }),
            })
        };
        let volumes = [volume("making", 0), volume("made", 1)];
        assert_eq!(
            users(&kernel, &servers, &[disk], &volumes),
            [
                "image p/tiny",
                "server p/web-1",
                "server p/web-2",
                "volume p/making"
            ]
        );
        assert!(users(&kernel, &[], &[], &[]).is_empty());
    }

    fn image() -> v1::Image {
        v1::Image {
            metadata: Some(v1::ObjectMeta {
                name: "tiny".into(),
                project: "p".into(),
                uid: "iu".into(),
                generation: 1,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn entry(node: &str, phase: Cached, message: &str) -> (String, v1::CachedImage) {
        (
            node.into(),
            v1::CachedImage {
                image_uid: "iu".into(),
                phase: phase as i32,
                checksum: format!("sha256:{node}"),
                format: "raw".into(),
                size_bytes: 1 << 20,
                virtual_size_bytes: 1 << 21,
                message: message.into(),
                ..Default::default()
            },
        )
    }

    type Case = (
        &'static str,
        Vec<(String, v1::CachedImage)>,
        Phase,
        &'static str,
    );

    #[test]
    fn the_image_phase_summarises_every_node() {
        let mismatch = "ImageChecksumMismatch: expected sha256:aa, got sha256:bb";
        let cases: Vec<Case> = vec![
            ("no node tried", vec![], Phase::Pending, "Pending"),
            (
                "one downloading",
                vec![entry("n1", Cached::Downloading, "fetching file:///x")],
                Phase::Downloading,
                "Downloading",
            ),
            (
                "one ready among failures",
                vec![
                    entry("n1", Cached::Failed, mismatch),
                    entry("n2", Cached::Ready, ""),
                    entry("n3", Cached::Downloading, ""),
                ],
                Phase::Active,
                "Cached",
            ),
            (
                "downloading beats failed",
                vec![
                    entry("n1", Cached::Failed, mismatch),
                    entry("n2", Cached::Downloading, ""),
                ],
                Phase::Downloading,
                "Downloading",
            ),
            (
                "all failed: the agent's reason",
                vec![
                    entry("n1", Cached::Failed, mismatch),
                    entry("n2", Cached::Failed, "UnknownImageFormat: not an image"),
                ],
                Phase::Error,
                "ImageChecksumMismatch",
            ),
            (
                "all failed without a reason",
                vec![entry("n2", Cached::Failed, "connection refused")],
                Phase::Error,
                "DownloadFailed",
            ),
        ];
        for (name, entries, phase, reason) in cases {
            let plan = plan(&image(), &entries);
            assert_eq!(plan.status.phase, phase as i32, "{name}");
            assert_eq!(plan.ready.reason, reason, "{name}");
            assert!(plan.write, "{name}");
        }
        let active = plan(
            &image(),
            &[
                entry("n2", Cached::Ready, ""),
                entry("n1", Cached::Ready, ""),
            ],
        );
        assert_eq!(
            active.status.checksum, "sha256:n1",
            "the first node by name"
        );
        assert_eq!(active.status.size_bytes, 1 << 20);
        assert_eq!(active.status.virtual_size_bytes, 1 << 21);
        assert_eq!(active.status.format, "raw");
        assert_eq!(
            active.ready.message,
            "cached on 2 of 2 nodes that fetched it"
        );
    }

    #[test]
    fn uploaded_bytes_make_the_image_active_until_a_node_has_it() {
        let mut uploaded = image();
        uploaded.status = Some(v1::ImageStatus {
            uploaded: Some(v1::UploadedImage {
                checksum: "sha256:up".into(),
                size_bytes: 42,
                format: "qcow2".into(),
                virtual_size_bytes: 1 << 30,
                uploaded_at: None,
            }),
            ..Default::default()
        });
        let alone = plan(&uploaded, &[]);
        assert_eq!(alone.status.phase, Phase::Active as i32);
        assert_eq!(alone.ready.reason, "Uploaded");
        assert_eq!(
            (alone.status.checksum.as_str(), alone.status.size_bytes),
            ("sha256:up", 42)
        );
        assert_eq!(alone.status.format, "qcow2");
        assert_eq!(alone.status.virtual_size_bytes, 1 << 30);
        let failing = plan(
            &uploaded,
            &[entry("n1", Cached::Failed, "DownloadFailed: cut")],
        );
        assert_eq!(failing.ready.reason, "Uploaded");
        let cached = plan(&uploaded, &[entry("n1", Cached::Ready, "")]);
        assert_eq!(cached.ready.reason, "Cached");
    }

    #[test]
    fn an_image_already_described_is_not_written() {
        let entries = [entry("n1", Cached::Ready, "")];
        let first = plan(&image(), &entries);
        let mut described = image();
        let mut status = first.status.clone();
        status.conditions = vec![v1::Condition {
            observed_generation: 1,
            ..first.ready.clone()
        }];
        described.status = Some(status);
        assert!(!plan(&described, &entries).write);
    }

    #[test]
    fn failure_reasons_come_from_the_message_head() {
        assert_eq!(
            failure_reason("UnknownImageFormat: xyz"),
            "UnknownImageFormat"
        );
        assert_eq!(failure_reason("fetching: refused"), "DownloadFailed");
        assert_eq!(failure_reason("Not A Reason: x"), "DownloadFailed");
        assert_eq!(failure_reason(""), "DownloadFailed");
    }
}
