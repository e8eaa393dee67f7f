//! The node's block volumes: the [`VolumeBackend`] trait the agent's Volume reconciler is
//! written against, its real drivers, and the NBD exports that carry a volume to a guest
//! on another node.
//!
//! - [`file::FileBackend`]: sparse qcow2 files in a directory (`<dir>/<uid>.qcow2`);
//! - [`lvm::LvmBackend`]: logical volumes `ferro-<uid>` in a volume group, thick or in a
//!   thin pool (needs device-mapper; [`lvm::LvmBackend::probe`] says whether the host has
//!   it);
//! - [`memory::MemoryBackend`]: the in-memory double, for reconciler tests;
//! - [`nbd::NbdExports`]: one `qemu-storage-daemon` per attachment, serving a volume over
//!   NBD on the node's underlay address.
//!
//! Like the rest of the agent, backends never trust their memory: [`VolumeBackend::get`]
//! and [`VolumeBackend::list`] read the host, so a restarted agent finds every volume an
//! earlier one made. Every call is idempotent. A volume is made under a temporary name
//! and renamed when complete, so a crash never leaves a half-made volume under a name
//! that looks finished; [`VolumeBackend::collect_leftovers`] and the next create of the
//! same uid remove what an interrupted create left.
//!
//! A volume's bytes never depend on the image cache: a volume made from an image is a
//! full (sparse) copy, so the cache may evict the image at any time.

pub mod file;
pub mod lvm;
pub mod memory;
pub mod nbd;

use std::collections::HashMap;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};

pub use crate::hypervisor::DiskFormat;

/// The longest volume uid a backend accepts.
pub const MAX_UID_LEN: usize = 64;

/// What a volume should be when it is made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeRequest {
    /// The Volume's uid, which names everything the backend makes for it. Letters,
    /// digits, `-` and `_`, at most [`MAX_UID_LEN`] characters.
    pub uid: String,
    /// The virtual size in bytes: a positive multiple of 512. Backends may round it up
    /// (LVM to whole extents); [`VolumeInfo::size_bytes`] says what was made.
    pub size_bytes: u64,
    /// What the volume holds when it is made.
    pub content: Content,
}

/// What a new volume holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Content {
    /// Zeros.
    Empty,
    /// A full, sparse copy of a cached image file (qemu-img convert): the volume never
    /// depends on the image cache, which may evict the image.
    Image {
        /// The image file.
        path: PathBuf,
        /// Its format.
        format: DiskFormat,
    },
    /// A clone of another volume of this backend.
    Volume {
        /// The source volume's uid.
        uid: String,
    },
}

/// A volume as found on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeInfo {
    /// The Volume's uid.
    pub uid: String,
    /// Its virtual size in bytes, as the guest sees it.
    pub size_bytes: u64,
    /// What QEMU or qemu-storage-daemon opens: a file or a block device.
    pub path: PathBuf,
    /// The format of the bytes at `path`.
    pub format: DiskFormat,
}

/// How much room a backend has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacity {
    /// All the bytes of the backing storage (file system, volume group or thin pool).
    pub total_bytes: u64,
    /// The bytes still free. Sparse and thin volumes use less than their size, so the
    /// sum of the volumes' sizes may exceed `total_bytes`.
    pub free_bytes: u64,
}

/// Why a volume call failed.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    /// The request cannot be carried out as it is.
    #[error("{field}: {reason}")]
    InvalidRequest {
        /// The offending field.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The new size is smaller than the volume: volumes only grow.
    #[error("volume {uid} is {from} bytes; shrinking it to {to} is refused")]
    Shrink {
        /// The volume's uid.
        uid: String,
        /// Its size.
        from: u64,
        /// The size asked for.
        to: u64,
    },
    /// There is no such volume on this host.
    #[error("no volume {0} on this host")]
    NotFound(String),
    /// What the volume was to be made from is not there: another volume's uid, or an
    /// image file.
    #[error("source {0} not found")]
    SourceNotFound(String),
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
    /// A file or directory operation failed.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// This host cannot run the backend (e.g. LVM without device-mapper).
    #[error("{0}")]
    Unsupported(String),
    /// Every NBD port of the node's range is taken.
    #[error("no free NBD port in {first}..={last}")]
    PortsExhausted {
        /// The first port of the range.
        first: u16,
        /// The last port of the range.
        last: u16,
    },
    /// A process would not end.
    #[error("{what} (pid {pid}) still runs after SIGKILL")]
    WouldNotDie {
        /// What the process is.
        what: String,
        /// Its pid.
        pid: u32,
    },
}

impl VolumeError {
    /// The CamelCase reason a Volume's condition carries for this error.
    pub fn reason(&self) -> &'static str {
        match self {
            VolumeError::InvalidRequest { .. } => "InvalidRequest",
            VolumeError::Shrink { .. } => "ShrinkRefused",
            VolumeError::NotFound(_) => "NotFound",
            VolumeError::SourceNotFound(_) => "SourceNotFound",
            VolumeError::Command { .. }
            | VolumeError::Io { .. }
            | VolumeError::WouldNotDie { .. } => "BackendFailed",
            VolumeError::Unsupported(_) => "Unsupported",
            VolumeError::PortsExhausted { .. } => "PortsExhausted",
        }
    }
}

/// A volume backend: makes, finds, grows and removes the volumes of one host.
///
/// Every method looks at the host first and is idempotent. Calls for one uid are
/// serialised by the backend.
#[async_trait::async_trait]
pub trait VolumeBackend: Send + Sync {
    /// "file" or "lvm" ("memory" for the double).
    fn kind(&self) -> &'static str;

    /// Makes the volume; idempotent: a volume of that uid already there is returned as it
    /// is (grown if the request is larger; its content is never touched). Crash-safe:
    /// bytes are made under a temporary name and renamed, so a half-made volume is never
    /// mistaken for a volume; leftovers of an interrupted create are removed by the next
    /// create of that uid or by [`VolumeBackend::collect_leftovers`].
    async fn create(&self, request: &VolumeRequest) -> Result<VolumeInfo, VolumeError>;

    /// The volume, or `None` when this host has no volume of that uid.
    async fn get(&self, uid: &str) -> Result<Option<VolumeInfo>, VolumeError>;

    /// Every volume found on the host (read from disk, never memory), sorted by uid.
    /// Unfinished creates are not volumes and are not listed.
    async fn list(&self) -> Result<Vec<VolumeInfo>, VolumeError>;

    /// Grows a volume that is not open by a VM (qemu-img resize, lvextend); a smaller
    /// size is [`VolumeError::Shrink`], the same size changes nothing.
    async fn resize(&self, uid: &str, size_bytes: u64) -> Result<VolumeInfo, VolumeError>;

    /// Removes the volume; nothing there is Ok.
    async fn delete(&self, uid: &str) -> Result<(), VolumeError>;

    /// How much room the backend has.
    async fn capacity(&self) -> Result<Capacity, VolumeError>;

    /// Removes what interrupted creates left behind (temporary files or LVs that no
    /// create is working on) and returns the names of what it removed. Meant for agent
    /// start-up and periodic sweeps; a create cleans its own uid's leftovers anyway.
    async fn collect_leftovers(&self) -> Result<Vec<String>, VolumeError> {
        Ok(Vec::new())
    }
}

/// Checks a volume uid: 1 to [`MAX_UID_LEN`] letters, digits, `-` or `_`, which keeps
/// it safe in file names, LV names and QEMU's `key=value,...` options.
pub fn validate_uid(field: &'static str, uid: &str) -> Result<(), VolumeError> {
    if uid.is_empty()
        || uid.len() > MAX_UID_LEN
        || !uid
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(VolumeError::InvalidRequest {
            field,
            reason: format!("{uid:?} is not 1 to {MAX_UID_LEN} letters, digits, '-' or '_'"),
        });
    }
    Ok(())
}

/// Checks what every backend needs of a request: a valid uid, a size that is a positive
/// multiple of 512, and a valid source uid.
pub fn validate_request(request: &VolumeRequest) -> Result<(), VolumeError> {
    validate_size(request.size_bytes)?;
    validate_uid("uid", &request.uid)?;
    if let Content::Volume { uid } = &request.content {
        validate_uid("content.volume", uid)?;
    }
    Ok(())
}

/// Checks a volume size: a positive multiple of 512 bytes.
pub fn validate_size(size_bytes: u64) -> Result<(), VolumeError> {
    if size_bytes == 0 || !size_bytes.is_multiple_of(512) {
        return Err(VolumeError::InvalidRequest {
            field: "size_bytes",
            reason: format!("{size_bytes} is not a positive multiple of 512"),
        });
    }
    Ok(())
}

/// One lock per uid (volume or export), so calls for one uid never interleave while calls
/// for different uids run side by side.
#[derive(Debug, Default)]
pub(crate) struct UidLocks {
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl UidLocks {
    /// Waits for, and takes, the lock of `uid`.
    pub(crate) async fn lock(&self, uid: &str) -> tokio::sync::OwnedMutexGuard<()> {
        self.entry(uid).lock_owned().await
    }

    /// Takes the lock of `uid` if nobody holds it.
    pub(crate) fn try_lock(&self, uid: &str) -> Option<tokio::sync::OwnedMutexGuard<()>> {
        self.entry(uid).try_lock_owned().ok()
    }

    fn entry(&self, uid: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.locks.lock().expect("lock table poisoned");
        locks.entry(uid.to_owned()).or_default().clone()
    }
}

/// Runs a helper program to completion and returns its stdout; a failure names the
/// program and its first argument, with its stderr.
pub(crate) async fn run<S: AsRef<OsStr>>(
    program: impl AsRef<OsStr>,
    args: &[S],
) -> Result<Vec<u8>, VolumeError> {
    let program = program.as_ref();
    let output = tokio::process::Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(io(format!("running {}", program.to_string_lossy())))?;
    if !output.status.success() {
        let first = args
            .first()
            .map(|a| format!(" {}", a.as_ref().to_string_lossy()))
            .unwrap_or_default();
        return Err(VolumeError::Command {
            program: format!("{}{first}", program.to_string_lossy()),
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    Ok(output.stdout)
}

/// The virtual size of an image, from `qemu-img info --output=json -U`.
pub(crate) async fn virtual_size(
    qemu_img: &Path,
    image: &Path,
    format: DiskFormat,
) -> Result<u64, VolumeError> {
    let args: Vec<&OsStr> = vec![
        "info".as_ref(),
        "-U".as_ref(),
        "--output=json".as_ref(),
        "-f".as_ref(),
        format.as_str().as_ref(),
        image.as_os_str(),
    ];
    let out = run(qemu_img, &args).await?;
    serde_json::from_slice::<serde_json::Value>(&out)
        .ok()
        .and_then(|info| info["virtual-size"].as_u64())
        .ok_or_else(|| VolumeError::Command {
            program: format!("qemu-img info {}", image.display()),
            status: "0".into(),
            stderr: "no virtual-size in its output".into(),
        })
}

/// A path as UTF-8, which QEMU's options and the LVM planner need.
pub(crate) fn path_str<'a>(field: &'static str, path: &'a Path) -> Result<&'a str, VolumeError> {
    path.to_str().ok_or_else(|| VolumeError::InvalidRequest {
        field,
        reason: format!("{} is not UTF-8", path.display()),
    })
}

/// Writes a file through a temporary name (`<name>.partial`) and a rename, so it is never
/// seen half written.
pub(crate) fn write_atomically(path: &Path, contents: &[u8]) -> Result<(), VolumeError> {
    let mut partial = path.as_os_str().to_owned();
    partial.push(".partial");
    let partial = PathBuf::from(partial);
    std::fs::write(&partial, contents).map_err(io(format!("writing {}", partial.display())))?;
    std::fs::rename(&partial, path).map_err(io(format!("writing {}", path.display())))?;
    sync_dir(path.parent().unwrap_or(Path::new("/")))
}

/// Flushes a directory, so that renames and removals in it survive a power loss.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), VolumeError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(format!("syncing {}", dir.display())))
}

/// Removes a file; one that is not there is no error.
pub(crate) fn remove_file_if_exists(path: &Path) -> Result<bool, VolumeError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(io(format!("removing {}", path.display()))(e)),
    }
}

/// Makes an I/O error into a [`VolumeError::Io`] that says what was being done.
pub(crate) fn io(what: String) -> impl FnOnce(std::io::Error) -> VolumeError {
    move |source| VolumeError::Io { what, source }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(uid: &str, size_bytes: u64) -> VolumeRequest {
        VolumeRequest {
            uid: uid.into(),
            size_bytes,
            content: Content::Empty,
        }
    }

    #[test]
    fn uids_are_short_and_safe_in_names_and_options() {
        for good in [
            "a",
            "0b5c3a52-5a9e-4d35-8a1e-2f1c0f3b1a01",
            "x_y-Z9",
            &"a".repeat(64),
        ] {
            assert!(validate_uid("uid", good).is_ok(), "{good}");
        }
        for bad in [
            "",
            &"a".repeat(65),
            "a/b",
            "a,b",
            "..",
            "a.qcow2",
            "a b",
            "é",
        ] {
            let error = validate_uid("uid", bad).expect_err(bad);
            assert_eq!(error.reason(), "InvalidRequest", "{bad}");
        }
    }

    #[test]
    fn sizes_are_positive_multiples_of_512() {
        assert!(validate_request(&request("v", 512)).is_ok());
        assert!(validate_request(&request("v", 1 << 30)).is_ok());
        for bad in [0, 1, 1000, (1 << 30) + 1] {
            let error = validate_request(&request("v", bad)).expect_err("refused");
            assert!(
                matches!(
                    error,
                    VolumeError::InvalidRequest {
                        field: "size_bytes",
                        ..
                    }
                ),
                "{bad}: {error}"
            );
        }
    }

    #[test]
    fn a_clone_source_must_be_a_valid_uid() {
        let mut clone = request("v", 512);
        clone.content = Content::Volume { uid: "../x".into() };
        assert!(matches!(
            validate_request(&clone),
            Err(VolumeError::InvalidRequest {
                field: "content.volume",
                ..
            })
        ));
    }

    #[test]
    fn every_error_has_a_condition_reason() {
        let io_error = || std::io::Error::other("x");
        let cases = [
            (
                VolumeError::InvalidRequest {
                    field: "f",
                    reason: "r".into(),
                },
                "InvalidRequest",
            ),
            (
                VolumeError::Shrink {
                    uid: "v".into(),
                    from: 2,
                    to: 1,
                },
                "ShrinkRefused",
            ),
            (VolumeError::NotFound("v".into()), "NotFound"),
            (VolumeError::SourceNotFound("v".into()), "SourceNotFound"),
            (
                VolumeError::Command {
                    program: "p".into(),
                    status: "1".into(),
                    stderr: "e".into(),
                },
                "BackendFailed",
            ),
            (
                VolumeError::Io {
                    what: "w".into(),
                    source: io_error(),
                },
                "BackendFailed",
            ),
            (VolumeError::Unsupported("u".into()), "Unsupported"),
            (
                VolumeError::PortsExhausted { first: 1, last: 2 },
                "PortsExhausted",
            ),
        ];
        for (error, reason) in cases {
            assert_eq!(error.reason(), reason, "{error}");
        }
    }

    #[test]
    fn a_shrink_names_both_sizes() {
        let error = VolumeError::Shrink {
            uid: "v1".into(),
            from: 2048,
            to: 1024,
        };
        assert_eq!(
            error.to_string(),
            "volume v1 is 2048 bytes; shrinking it to 1024 is refused"
        );
    }
}
