//! The file backend: each volume is a sparse qcow2 file in one directory.
//!
//! ```text
//! <dir>/<uid>.qcow2           a volume
//! <dir>/<uid>.qcow2.partial   a create in progress (or interrupted): never a volume
//! ```
//!
//! Everything is done with `qemu-img`: `create -f qcow2` for an empty volume, `convert -O
//! qcow2` for a copy of an image or of another volume (then `resize` up to the size asked
//! for), `resize` to grow, `info -U` to read a volume's virtual size back. A create builds
//! the file under its `.partial` name, renames it into place and syncs the directory, so
//! a crash leaves either no volume or a complete one. QEMU's image locking keeps a volume
//! that a guest has open from being resized or cloned (that fails with QEMU's "Failed to
//! get ... lock" as [`VolumeError::Command`]).
//!
//! Volumes are thin: a qcow2 file takes only the clusters written, so the sizes of the
//! volumes may add up to more than the file system holds ([`Capacity`] reports the file
//! system).

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use super::{
    Capacity, Content, DiskFormat, UidLocks, VolumeBackend, VolumeError, VolumeInfo, VolumeRequest,
    io, remove_file_if_exists, run, sync_dir, validate_request, validate_size, validate_uid,
    virtual_size,
};

/// The file name suffix of a volume.
const VOLUME_SUFFIX: &str = ".qcow2";
/// The file name suffix of a volume being made.
const PARTIAL_SUFFIX: &str = ".qcow2.partial";
/// How old a `.partial` file must be before [`VolumeBackend::collect_leftovers`] takes it
/// for the remains of a crash rather than the work of another backend on the same
/// directory.
pub const LEFTOVER_AGE: Duration = Duration::from_secs(60);

/// Volumes as qcow2 files in a directory. Cheap to create; any number of backends may
/// look at the same directory.
#[derive(Debug)]
pub struct FileBackend {
    dir: PathBuf,
    qemu_img: PathBuf,
    locks: UidLocks,
}

impl FileBackend {
    /// A backend keeping its volumes in `dir` (made absolute here, created on first use)
    /// and running `qemu_img` (a path, or a name looked up in `PATH`).
    pub fn new(dir: PathBuf, qemu_img: PathBuf) -> Self {
        let dir = std::path::absolute(&dir).unwrap_or(dir);
        FileBackend {
            dir,
            qemu_img,
            locks: UidLocks::default(),
        }
    }

    /// The directory of the volumes.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The file of volume `uid` (whether or not it exists).
    pub fn volume_path(&self, uid: &str) -> PathBuf {
        self.dir.join(format!("{uid}{VOLUME_SUFFIX}"))
    }

    /// The file a create of volume `uid` works on before renaming it into place.
    pub fn partial_path(&self, uid: &str) -> PathBuf {
        self.dir.join(format!("{uid}{PARTIAL_SUFFIX}"))
    }

    fn make_dir(&self) -> Result<(), VolumeError> {
        std::fs::create_dir_all(&self.dir).map_err(io(format!("creating {}", self.dir.display())))
    }

    /// The volume in `uid`'s file, if the file is there.
    async fn observe(&self, uid: &str) -> Result<Option<VolumeInfo>, VolumeError> {
        let path = self.volume_path(uid);
        if !path.exists() {
            return Ok(None);
        }
        match virtual_size(&self.qemu_img, &path, DiskFormat::Qcow2).await {
            Ok(size_bytes) => Ok(Some(VolumeInfo {
                uid: uid.to_owned(),
                size_bytes,
                path,
                format: DiskFormat::Qcow2,
            })),
            // Deleted while we looked.
            Err(_) if !path.exists() => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn grow(&self, volume: VolumeInfo, size_bytes: u64) -> Result<VolumeInfo, VolumeError> {
        if size_bytes < volume.size_bytes {
            return Err(VolumeError::Shrink {
                uid: volume.uid,
                from: volume.size_bytes,
                to: size_bytes,
            });
        }
        if size_bytes == volume.size_bytes {
            return Ok(volume);
        }
        run(&self.qemu_img, &resize_args(&volume.path, size_bytes)).await?;
        tracing::info!(
            uid = %volume.uid,
            from = volume.size_bytes,
            to = size_bytes,
            "volume grown"
        );
        self.observe(&volume.uid)
            .await?
            .ok_or_else(|| VolumeError::NotFound(volume.uid.clone()))
    }

    /// Writes the new volume's bytes to `partial`.
    async fn make(&self, request: &VolumeRequest, partial: &Path) -> Result<(), VolumeError> {
        let (source, format, source_name) = match &request.content {
            Content::Empty => {
                return run(&self.qemu_img, &create_args(partial, request.size_bytes))
                    .await
                    .map(drop);
            }
            Content::Image { path, format } => {
                let path = std::path::absolute(path)
                    .map_err(io(format!("resolving {}", path.display())))?;
                let name = format!("image {}", path.display());
                (path, *format, name)
            }
            Content::Volume { uid } => (
                self.volume_path(uid),
                DiskFormat::Qcow2,
                format!("volume {uid}"),
            ),
        };
        if !source.exists() {
            return Err(VolumeError::SourceNotFound(source_name));
        }
        let source_size = virtual_size(&self.qemu_img, &source, format).await?;
        if source_size > request.size_bytes {
            return Err(VolumeError::InvalidRequest {
                field: "size_bytes",
                reason: format!(
                    "{} bytes is smaller than the {source_size} bytes of {source_name}",
                    request.size_bytes
                ),
            });
        }
        run(&self.qemu_img, &convert_args(&source, format, partial)).await?;
        if source_size < request.size_bytes {
            run(&self.qemu_img, &resize_args(partial, request.size_bytes)).await?;
        }
        Ok(())
    }
}

/// `qemu-img create` of an empty qcow2 volume.
fn create_args(path: &Path, size_bytes: u64) -> Vec<OsString> {
    vec![
        "create".into(),
        "-q".into(),
        "-f".into(),
        "qcow2".into(),
        path.into(),
        size_bytes.to_string().into(),
    ]
}

/// `qemu-img convert` of a source into a new, standalone (no backing file) sparse qcow2.
fn convert_args(source: &Path, format: DiskFormat, target: &Path) -> Vec<OsString> {
    vec![
        "convert".into(),
        "-q".into(),
        "-f".into(),
        format.as_str().into(),
        "-O".into(),
        "qcow2".into(),
        source.into(),
        target.into(),
    ]
}

/// `qemu-img resize` of a qcow2 volume.
fn resize_args(path: &Path, size_bytes: u64) -> Vec<OsString> {
    vec![
        "resize".into(),
        "-q".into(),
        "-f".into(),
        "qcow2".into(),
        path.into(),
        size_bytes.to_string().into(),
    ]
}

/// The uid a volume file's name stands for, if it is one.
fn volume_uid(file_name: &str) -> Option<&str> {
    let uid = file_name.strip_suffix(VOLUME_SUFFIX)?;
    validate_uid("uid", uid).ok().map(|()| uid)
}

/// The uid a partial file's name stands for, if it is one.
fn partial_uid(file_name: &str) -> Option<&str> {
    let uid = file_name.strip_suffix(PARTIAL_SUFFIX)?;
    validate_uid("uid", uid).ok().map(|()| uid)
}

#[async_trait::async_trait]
impl VolumeBackend for FileBackend {
    fn kind(&self) -> &'static str {
        "file"
    }

    async fn create(&self, request: &VolumeRequest) -> Result<VolumeInfo, VolumeError> {
        validate_request(request)?;
        let uid = request.uid.as_str();
        let _guard = self.locks.lock(uid).await;
        if let Some(volume) = self.observe(uid).await? {
            return if request.size_bytes > volume.size_bytes {
                self.grow(volume, request.size_bytes).await
            } else {
                Ok(volume)
            };
        }
        self.make_dir()?;
        let partial = self.partial_path(uid);
        if remove_file_if_exists(&partial)? {
            tracing::info!(uid, "removed the remains of an interrupted create");
        }
        let started = std::time::Instant::now();
        let made = self.make(request, &partial).await;
        if let Err(e) = made {
            let _ = remove_file_if_exists(&partial);
            return Err(e);
        }
        let path = self.volume_path(uid);
        std::fs::rename(&partial, &path)
            .map_err(io(format!("moving the new volume to {}", path.display())))?;
        sync_dir(&self.dir)?;
        tracing::info!(
            uid,
            size_bytes = request.size_bytes,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "volume created"
        );
        self.observe(uid)
            .await?
            .ok_or_else(|| VolumeError::NotFound(uid.to_owned()))
    }

    async fn get(&self, uid: &str) -> Result<Option<VolumeInfo>, VolumeError> {
        validate_uid("uid", uid)?;
        self.observe(uid).await
    }

    async fn list(&self) -> Result<Vec<VolumeInfo>, VolumeError> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io(format!("reading {}", self.dir.display()))(e)),
        };
        let mut uids: Vec<String> = entries
            .flatten()
            .filter_map(|e| volume_uid(e.file_name().to_str()?).map(str::to_owned))
            .collect();
        uids.sort();
        let mut volumes = Vec::with_capacity(uids.len());
        for uid in uids {
            if let Some(volume) = self.observe(&uid).await? {
                volumes.push(volume);
            }
        }
        Ok(volumes)
    }

    async fn resize(&self, uid: &str, size_bytes: u64) -> Result<VolumeInfo, VolumeError> {
        validate_uid("uid", uid)?;
        validate_size(size_bytes)?;
        let _guard = self.locks.lock(uid).await;
        let volume = self
            .observe(uid)
            .await?
            .ok_or_else(|| VolumeError::NotFound(uid.to_owned()))?;
        self.grow(volume, size_bytes).await
    }

    async fn delete(&self, uid: &str) -> Result<(), VolumeError> {
        validate_uid("uid", uid)?;
        let _guard = self.locks.lock(uid).await;
        let removed = remove_file_if_exists(&self.volume_path(uid))?;
        remove_file_if_exists(&self.partial_path(uid))?;
        if removed {
            sync_dir(&self.dir)?;
            tracing::info!(uid, "volume deleted");
        }
        Ok(())
    }

    async fn capacity(&self) -> Result<Capacity, VolumeError> {
        self.make_dir()?;
        let fs = rustix::fs::statvfs(&self.dir).map_err(|e| VolumeError::Io {
            what: format!("statvfs {}", self.dir.display()),
            source: e.into(),
        })?;
        Ok(Capacity {
            total_bytes: fs.f_blocks.saturating_mul(fs.f_frsize),
            free_bytes: fs.f_bavail.saturating_mul(fs.f_frsize),
        })
    }

    async fn collect_leftovers(&self) -> Result<Vec<String>, VolumeError> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io(format!("reading {}", self.dir.display()))(e)),
        };
        let mut removed = Vec::new();
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(uid) = name.to_str().and_then(partial_uid) else {
                continue;
            };
            // A create in this process holds the uid's lock; one in another process
            // keeps writing, so the file's age tells it from a crash's remains.
            let Some(_guard) = self.locks.try_lock(uid) else {
                continue;
            };
            let age = entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|modified| SystemTime::now().duration_since(modified).ok());
            if age.is_some_and(|age| age >= LEFTOVER_AGE) && remove_file_if_exists(&entry.path())? {
                tracing::info!(uid, "removed the remains of an interrupted create");
                removed.push(entry.path().display().to_string());
            }
        }
        if !removed.is_empty() {
            sync_dir(&self.dir)?;
        }
        removed.sort();
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(args: &[OsString]) -> Vec<&str> {
        args.iter().map(|a| a.to_str().expect("UTF-8")).collect()
    }

    #[test]
    fn volumes_are_named_by_uid_and_partials_are_not_volumes() {
        let backend = FileBackend::new("/srv/v".into(), "qemu-img".into());
        assert_eq!(backend.volume_path("v1"), Path::new("/srv/v/v1.qcow2"));
        assert_eq!(
            backend.partial_path("v1"),
            Path::new("/srv/v/v1.qcow2.partial")
        );
        assert_eq!(volume_uid("v1.qcow2"), Some("v1"));
        assert_eq!(volume_uid("v1.qcow2.partial"), None);
        assert_eq!(volume_uid("v.1.qcow2"), None);
        assert_eq!(volume_uid("notes.txt"), None);
        assert_eq!(partial_uid("v1.qcow2.partial"), Some("v1"));
        assert_eq!(partial_uid("v1.qcow2"), None);
    }

    #[test]
    fn a_relative_directory_is_made_absolute() {
        let backend = FileBackend::new("vols".into(), "qemu-img".into());
        assert!(backend.dir().is_absolute());
    }

    #[test]
    fn qemu_img_makes_standalone_qcow2_volumes() {
        let target = Path::new("/v/a.qcow2.partial");
        assert_eq!(
            strings(&create_args(target, 1 << 30)),
            [
                "create",
                "-q",
                "-f",
                "qcow2",
                "/v/a.qcow2.partial",
                "1073741824"
            ]
        );
        assert_eq!(
            strings(&convert_args(
                Path::new("/cache/sha256/ab"),
                DiskFormat::Raw,
                target
            )),
            [
                "convert",
                "-q",
                "-f",
                "raw",
                "-O",
                "qcow2",
                "/cache/sha256/ab",
                "/v/a.qcow2.partial"
            ]
        );
        assert_eq!(
            strings(&resize_args(Path::new("/v/a.qcow2"), 2 << 30)),
            ["resize", "-q", "-f", "qcow2", "/v/a.qcow2", "2147483648"]
        );
    }

    #[tokio::test]
    async fn requests_are_checked_before_anything_runs() {
        // A qemu-img that does not exist: any call to it would be an Io error.
        let dir = tempfile::tempdir().expect("temp dir");
        let backend = FileBackend::new(dir.path().into(), "/nonexistent/qemu-img".into());
        let bad = VolumeRequest {
            uid: "../etc".into(),
            size_bytes: 512,
            content: Content::Empty,
        };
        assert_eq!(
            backend.create(&bad).await.expect_err("refused").reason(),
            "InvalidRequest"
        );
        assert_eq!(
            backend
                .resize("v", 1000)
                .await
                .expect_err("refused")
                .reason(),
            "InvalidRequest"
        );
        assert_eq!(backend.get("v1").await.expect("get"), None);
        assert_eq!(backend.list().await.expect("list"), []);
        backend.delete("v1").await.expect("nothing to delete is Ok");
        let missing = VolumeRequest {
            uid: "v2".into(),
            size_bytes: 512,
            content: Content::Volume { uid: "v1".into() },
        };
        assert!(matches!(
            backend.create(&missing).await,
            Err(VolumeError::SourceNotFound(source)) if source == "volume v1"
        ));
        assert!(!backend.partial_path("v2").exists());
        let capacity = backend.capacity().await.expect("statvfs");
        assert!(capacity.total_bytes >= capacity.free_bytes && capacity.total_bytes > 0);
    }

    #[tokio::test]
    async fn only_old_partials_nobody_works_on_are_collected() {
        let dir = tempfile::tempdir().expect("temp dir");
        let backend = FileBackend::new(dir.path().into(), "qemu-img".into());
        let old = backend.partial_path("old");
        let fresh = backend.partial_path("fresh");
        let busy = backend.partial_path("busy");
        for path in [&old, &fresh, &busy] {
            std::fs::write(path, b"half").expect("write");
        }
        std::fs::write(backend.volume_path("done"), b"a volume").expect("write");
        let long_ago = SystemTime::now() - 2 * LEFTOVER_AGE;
        for path in [&old, &busy] {
            std::fs::File::options()
                .write(true)
                .open(path)
                .and_then(|f| f.set_modified(long_ago))
                .expect("set mtime");
        }
        let _busy = backend.locks.lock("busy").await;
        let removed = backend.collect_leftovers().await.expect("collect");
        assert_eq!(removed, [old.display().to_string()]);
        assert!(!old.exists());
        assert!(fresh.exists() && busy.exists() && backend.volume_path("done").exists());
    }
}
