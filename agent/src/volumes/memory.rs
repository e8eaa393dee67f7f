//! An in-memory [`VolumeBackend`], for unit tests of the reconcilers that use one.
//!
//! It keeps the contract of the real backends: the same validation, idempotent creates
//! that grow but never shrink or rewrite a volume, [`VolumeError::Shrink`],
//! [`VolumeError::SourceNotFound`] for a missing image or volume, and an image larger
//! than the request refused as [`VolumeError::InvalidRequest`]. Images exist only when a
//! test registers them ([`MemoryBackend::add_image`]). A test can make the next call of
//! an operation fail ([`MemoryBackend::fail_next`]) to drive its failure paths, and can
//! read what each volume was made from ([`MemoryBackend::content_of`]). It never stands
//! in for a real backend in a claim that volumes work.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Mutex;

use super::{
    Capacity, Content, DiskFormat, VolumeBackend, VolumeError, VolumeInfo, VolumeRequest,
    validate_request, validate_size, validate_uid,
};

/// An operation of [`VolumeBackend`], to make fail with [`MemoryBackend::fail_next`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Operation {
    /// [`VolumeBackend::create`].
    Create,
    /// [`VolumeBackend::get`].
    Get,
    /// [`VolumeBackend::list`].
    List,
    /// [`VolumeBackend::resize`].
    Resize,
    /// [`VolumeBackend::delete`].
    Delete,
    /// [`VolumeBackend::capacity`].
    Capacity,
}

#[derive(Debug, Clone)]
struct Volume {
    size_bytes: u64,
    content: Content,
}

#[derive(Debug, Default)]
struct State {
    volumes: BTreeMap<String, Volume>,
    images: HashMap<PathBuf, u64>,
    failures: HashMap<Operation, usize>,
    calls: Vec<String>,
}

/// Volumes in memory, on a pretend disk of a fixed size.
#[derive(Debug)]
pub struct MemoryBackend {
    total_bytes: u64,
    state: Mutex<State>,
}

impl MemoryBackend {
    /// A backend whose [`VolumeBackend::capacity`] is `total_bytes`, less the sizes of its
    /// volumes.
    pub fn new(total_bytes: u64) -> Self {
        MemoryBackend {
            total_bytes,
            state: Mutex::new(State::default()),
        }
    }

    /// Makes an image file of `virtual_size` bytes exist at `path`, for
    /// [`Content::Image`] requests.
    pub fn add_image(&self, path: impl Into<PathBuf>, virtual_size: u64) {
        self.state().images.insert(path.into(), virtual_size);
    }

    /// Makes the next call of `operation` fail with a [`VolumeError::Command`] (reason
    /// `BackendFailed`), changing nothing. Calls add up: two calls fail the next two.
    pub fn fail_next(&self, operation: Operation) {
        *self.state().failures.entry(operation).or_default() += 1;
    }

    /// What volume `uid` was made from, if it exists.
    pub fn content_of(&self, uid: &str) -> Option<Content> {
        self.state().volumes.get(uid).map(|v| v.content.clone())
    }

    /// The calls that changed something, in order: `create <uid>`, `resize <uid> <size>`,
    /// `delete <uid>`.
    pub fn calls(&self) -> Vec<String> {
        self.state().calls.clone()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("memory backend poisoned")
    }

    fn path(uid: &str) -> PathBuf {
        PathBuf::from(format!("/memory/volumes/{uid}.qcow2"))
    }

    fn info(uid: &str, volume: &Volume) -> VolumeInfo {
        VolumeInfo {
            uid: uid.to_owned(),
            size_bytes: volume.size_bytes,
            path: Self::path(uid),
            format: DiskFormat::Qcow2,
        }
    }
}

impl State {
    fn injected(&mut self, operation: Operation) -> Result<(), VolumeError> {
        match self.failures.get_mut(&operation) {
            Some(left) if *left > 0 => {
                *left -= 1;
                Err(VolumeError::Command {
                    program: format!("memory {operation:?}"),
                    status: "injected".into(),
                    stderr: "failure injected by the test".into(),
                })
            }
            _ => Ok(()),
        }
    }

    fn grow(&mut self, uid: &str, size_bytes: u64) -> Result<VolumeInfo, VolumeError> {
        let volume = self
            .volumes
            .get_mut(uid)
            .ok_or_else(|| VolumeError::NotFound(uid.to_owned()))?;
        if size_bytes < volume.size_bytes {
            return Err(VolumeError::Shrink {
                uid: uid.to_owned(),
                from: volume.size_bytes,
                to: size_bytes,
            });
        }
        if size_bytes > volume.size_bytes {
            volume.size_bytes = size_bytes;
            self.calls.push(format!("resize {uid} {size_bytes}"));
        }
        Ok(MemoryBackend::info(uid, &self.volumes[uid]))
    }
}

#[async_trait::async_trait]
impl VolumeBackend for MemoryBackend {
    fn kind(&self) -> &'static str {
        "memory"
    }

    async fn create(&self, request: &VolumeRequest) -> Result<VolumeInfo, VolumeError> {
        validate_request(request)?;
        let mut state = self.state();
        state.injected(Operation::Create)?;
        let uid = request.uid.as_str();
        if let Some(volume) = state.volumes.get(uid) {
            return if request.size_bytes > volume.size_bytes {
                state.grow(uid, request.size_bytes)
            } else {
                Ok(Self::info(uid, volume))
            };
        }
        let source = match &request.content {
            Content::Empty => None,
            Content::Image { path, .. } => {
                let size = state.images.get(path).ok_or_else(|| {
                    VolumeError::SourceNotFound(format!("image {}", path.display()))
                })?;
                Some((*size, format!("image {}", path.display())))
            }
            Content::Volume { uid: source } => {
                let volume = state
                    .volumes
                    .get(source)
                    .ok_or_else(|| VolumeError::SourceNotFound(format!("volume {source}")))?;
                Some((volume.size_bytes, format!("volume {source}")))
            }
        };
        if let Some((size, name)) = source
            && size > request.size_bytes
        {
            return Err(VolumeError::InvalidRequest {
                field: "size_bytes",
                reason: format!(
                    "{} bytes is smaller than the {size} bytes of {name}",
                    request.size_bytes
                ),
            });
        }
        let volume = Volume {
            size_bytes: request.size_bytes,
            content: request.content.clone(),
        };
        let info = Self::info(uid, &volume);
        state.volumes.insert(uid.to_owned(), volume);
        state.calls.push(format!("create {uid}"));
        Ok(info)
    }

    async fn get(&self, uid: &str) -> Result<Option<VolumeInfo>, VolumeError> {
        validate_uid("uid", uid)?;
        let mut state = self.state();
        state.injected(Operation::Get)?;
        Ok(state.volumes.get(uid).map(|v| Self::info(uid, v)))
    }

    async fn list(&self) -> Result<Vec<VolumeInfo>, VolumeError> {
        let mut state = self.state();
        state.injected(Operation::List)?;
        Ok(state
            .volumes
            .iter()
            .map(|(uid, v)| Self::info(uid, v))
            .collect())
    }

    async fn resize(&self, uid: &str, size_bytes: u64) -> Result<VolumeInfo, VolumeError> {
        validate_uid("uid", uid)?;
        validate_size(size_bytes)?;
        let mut state = self.state();
        state.injected(Operation::Resize)?;
        state.grow(uid, size_bytes)
    }

    async fn delete(&self, uid: &str) -> Result<(), VolumeError> {
        validate_uid("uid", uid)?;
        let mut state = self.state();
        state.injected(Operation::Delete)?;
        if state.volumes.remove(uid).is_some() {
            state.calls.push(format!("delete {uid}"));
        }
        Ok(())
    }

    async fn capacity(&self) -> Result<Capacity, VolumeError> {
        let mut state = self.state();
        state.injected(Operation::Capacity)?;
        let used: u64 = state.volumes.values().map(|v| v.size_bytes).sum();
        Ok(Capacity {
            total_bytes: self.total_bytes,
            free_bytes: self.total_bytes.saturating_sub(used),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    fn empty(uid: &str, size_bytes: u64) -> VolumeRequest {
        VolumeRequest {
            uid: uid.into(),
            size_bytes,
            content: Content::Empty,
        }
    }

    #[tokio::test]
    async fn creates_are_idempotent_and_grow_but_never_shrink() {
        let backend = MemoryBackend::new(10 * GIB);
        let made = backend.create(&empty("v1", GIB)).await.expect("create");
        assert_eq!(made.size_bytes, GIB);
        assert_eq!(
            backend.create(&empty("v1", GIB)).await.expect("again"),
            made
        );
        assert_eq!(
            backend
                .create(&empty("v1", GIB / 2))
                .await
                .expect("smaller"),
            made
        );
        let grown = backend.create(&empty("v1", 2 * GIB)).await.expect("larger");
        assert_eq!(grown.size_bytes, 2 * GIB);
        assert!(matches!(
            backend.resize("v1", GIB).await,
            Err(VolumeError::Shrink { from, to, .. }) if from == 2 * GIB && to == GIB
        ));
        assert_eq!(
            backend.calls(),
            ["create v1", &format!("resize v1 {}", 2 * GIB)]
        );
        assert_eq!(
            backend.capacity().await.expect("capacity"),
            Capacity {
                total_bytes: 10 * GIB,
                free_bytes: 8 * GIB
            }
        );
    }

    #[tokio::test]
    async fn sources_must_exist_and_fit() {
        let backend = MemoryBackend::new(10 * GIB);
        let image = Content::Image {
            path: "/cache/sha256/ab".into(),
            format: DiskFormat::Raw,
        };
        let from_image = VolumeRequest {
            content: image.clone(),
            ..empty("v1", GIB)
        };
        assert_eq!(
            backend
                .create(&from_image)
                .await
                .expect_err("no image")
                .reason(),
            "SourceNotFound"
        );
        backend.add_image("/cache/sha256/ab", 2 * GIB);
        let error = backend.create(&from_image).await.expect_err("too small");
        assert_eq!(error.reason(), "InvalidRequest");
        assert!(
            error.to_string().contains(&(2 * GIB).to_string()),
            "{error}"
        );
        backend
            .create(&VolumeRequest {
                size_bytes: 2 * GIB,
                ..from_image
            })
            .await
            .expect("fits");
        assert_eq!(backend.content_of("v1"), Some(image));
        let clone = VolumeRequest {
            content: Content::Volume { uid: "v9".into() },
            ..empty("v2", 2 * GIB)
        };
        assert_eq!(
            backend
                .create(&clone)
                .await
                .expect_err("no source")
                .reason(),
            "SourceNotFound"
        );
        let clone = VolumeRequest {
            content: Content::Volume { uid: "v1".into() },
            ..clone
        };
        backend.create(&clone).await.expect("clone");
        let listed: Vec<_> = backend
            .list()
            .await
            .expect("list")
            .into_iter()
            .map(|v| v.uid)
            .collect();
        assert_eq!(listed, ["v1", "v2"]);
    }

    #[tokio::test]
    async fn injected_failures_change_nothing_and_are_used_up() {
        let backend = MemoryBackend::new(GIB);
        backend.fail_next(Operation::Create);
        let error = backend
            .create(&empty("v1", 512))
            .await
            .expect_err("injected");
        assert_eq!(error.reason(), "BackendFailed");
        assert_eq!(backend.get("v1").await.expect("get"), None);
        backend
            .create(&empty("v1", 512))
            .await
            .expect("then it works");
        backend.fail_next(Operation::Delete);
        assert!(backend.delete("v1").await.is_err());
        assert!(backend.get("v1").await.expect("get").is_some());
        backend.delete("v1").await.expect("delete");
        backend.delete("v1").await.expect("nothing there is Ok");
        assert_eq!(backend.calls(), ["create v1", "delete v1"]);
    }
}
