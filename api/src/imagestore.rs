//! The apiserver's image store: the bytes of Images uploaded through the API
//! (`source.url: ferro://upload`), kept by their sha256.
//!
//! ```text
//! <root>/sha256/<hex>   the bytes with that sha256, read-only; shared by every Image
//!                       whose upload had those bytes
//! <root>/tmp/           uploads in progress, `<random>.upload`
//! ```
//!
//! The root is `<data-dir>/image-store` unless `ferro apiserver --image-store` says
//! otherwise. An upload ([`ImageStore::begin`]) streams into a new file in `tmp/`; two
//! blocking threads, one hashing and one writing (and syncing every 64 MiB, so the disk
//! works while bytes still arrive), take each chunk as it arrives, each behind a channel of
//! a few chunks, so that memory stays flat whatever the image size and a slow disk slows
//! the sender down (gRPC flow control) instead of filling memory. [`Upload::finish`] fsyncs the
//! file and gives it its final name only then (rename, then an fsync of the directory): a
//! file under `sha256/` is always complete and its name is its hash. An upload that is
//! dropped before `finish` — the stream ended early, failed, or was refused — removes its
//! temporary file, and what a crash left in `tmp/` is removed when the store opens.
//!
//! Bytes are removed by [`ImageStore::collect_garbage`] once no Image names them in
//! `status.uploaded` (the apiserver runs it periodically). Storing the bytes and recording
//! them on the Image happen under the read side of one lock, and a collection holds its
//! write side from listing the Images to removing files, so a collection never removes the
//! bytes of an upload that is being recorded.
//!
//! [`format`] tells what the bytes are from their first bytes.

pub mod format;

use std::collections::HashSet;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use sha2::{Digest, Sha256};
use tokio::sync::{RwLock, RwLockReadGuard, mpsc};

/// The largest chunk an upload or download message carries: well under the apiserver's
/// 4 MiB request limit.
pub const CHUNK_BYTES: usize = 1 << 20;

/// How many chunks may wait for the writer thread: the memory an upload holds, besides
/// what gRPC buffers.
const QUEUED_CHUNKS: usize = 4;

/// Why the image store failed.
#[derive(Debug, thiserror::Error)]
pub enum ImageStoreError {
    /// A file or directory of the store could not be used.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// No bytes with that checksum are stored.
    #[error("no bytes with sha256 {0} in the image store")]
    Missing(String),
}

fn io_error(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ImageStoreError {
    let what = what.into();
    move |source| ImageStoreError::Io { what, source }
}

/// The store, in a directory of the control node.
#[derive(Debug)]
pub struct ImageStore {
    root: PathBuf,
    /// Read: storing bytes and recording them on their Image. Write: a collection.
    commits: RwLock<()>,
}

impl ImageStore {
    /// Opens (creating) the store at `root` and removes uploads a crash left unfinished.
    /// One apiserver uses a store at a time.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, ImageStoreError> {
        let root = std::path::absolute(root.into())
            .map_err(io_error("resolving the image store directory"))?;
        for sub in ["sha256", "tmp"] {
            let dir = root.join(sub);
            std::fs::create_dir_all(&dir)
                .map_err(io_error(format!("creating {}", dir.display())))?;
        }
        let tmp = root.join("tmp");
        let entries =
            std::fs::read_dir(&tmp).map_err(io_error(format!("reading {}", tmp.display())))?;
        for entry in entries.flatten() {
            tracing::info!(file = %entry.path().display(), "removing an unfinished upload");
            let _ = std::fs::remove_file(entry.path());
        }
        Ok(ImageStore {
            root,
            commits: RwLock::new(()),
        })
    }

    /// The store's directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the bytes with this sha256 (hex) live.
    pub fn path_of(&self, sha256_hex: &str) -> PathBuf {
        self.root.join("sha256").join(sha256_hex)
    }

    /// The size of the stored bytes with this sha256 (hex), when they are stored.
    pub fn size_of(&self, sha256_hex: &str) -> Option<u64> {
        if !is_sha256_hex(sha256_hex) {
            return None;
        }
        std::fs::metadata(self.path_of(sha256_hex))
            .ok()
            .map(|m| m.len())
    }

    /// Starts an upload into a new temporary file.
    pub fn begin(&self) -> Result<Upload, ImageStoreError> {
        let path = self
            .root
            .join("tmp")
            .join(format!("{}.upload", uuid::Uuid::new_v4().simple()));
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(io_error(format!("creating {}", path.display())))?;
        let (chunks, receiver) = mpsc::channel(QUEUED_CHUNKS);
        let (to_hasher, hashed) = mpsc::channel(QUEUED_CHUNKS);
        let writer_path = path.clone();
        let writer =
            tokio::task::spawn_blocking(move || write_upload(file, &writer_path, receiver));
        let hasher = tokio::task::spawn_blocking(move || hash_upload(hashed));
        Ok(Upload {
            chunks: Some(chunks),
            to_hasher: Some(to_hasher),
            hasher: Some(hasher),
            writer: Some(writer),
            temp: Some(path),
            size: 0,
        })
    }

    /// Holds off collections while an upload's bytes are stored and recorded on their
    /// Image; take it before [`Upload::finish`] and keep it until the Image is written.
    pub async fn commit_guard(&self) -> RwLockReadGuard<'_, ()> {
        self.commits.read().await
    }

    /// Opens the stored bytes with this sha256 (hex) at `offset`, with their size.
    pub fn open_at(
        &self,
        sha256_hex: &str,
        offset: u64,
    ) -> Result<(std::fs::File, u64), ImageStoreError> {
        if !is_sha256_hex(sha256_hex) {
            return Err(ImageStoreError::Missing(sha256_hex.to_owned()));
        }
        let path = self.path_of(sha256_hex);
        let mut file = match std::fs::File::open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(ImageStoreError::Missing(sha256_hex.to_owned()));
            }
            Err(e) => return Err(io_error(format!("opening {}", path.display()))(e)),
        };
        let size = file
            .metadata()
            .map_err(io_error(format!("reading {}", path.display())))?
            .len();
        file.seek(std::io::SeekFrom::Start(offset.min(size)))
            .map_err(io_error(format!("seeking in {}", path.display())))?;
        Ok((file, size))
    }

    /// Removes the stored bytes whose sha256 (hex) `referenced` does not return, holding
    /// off uploads' commits from before `referenced` runs until the files are gone.
    /// Returns the removed hashes.
    pub async fn collect_garbage<F, Fut, E>(&self, referenced: F) -> Result<Vec<String>, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<HashSet<String>, E>>,
    {
        let _exclusive = self.commits.write().await;
        let keep = referenced().await?;
        let mut removed = Vec::new();
        let Ok(entries) = std::fs::read_dir(self.root.join("sha256")) else {
            return Ok(removed);
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if keep.contains(&name) {
                continue;
            }
            match std::fs::remove_file(entry.path()) {
                Ok(()) => {
                    tracing::info!(sha256 = %name, "removed image bytes no Image names");
                    removed.push(name);
                }
                Err(e) => {
                    tracing::warn!(file = %entry.path().display(), error = %e, "cannot remove unused image bytes");
                }
            }
        }
        removed.sort();
        Ok(removed)
    }
}

/// Whether `text` is 64 lower-case hex digits.
pub fn is_sha256_hex(text: &str) -> bool {
    text.len() == 64
        && text
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// What the writer and hasher threads are sent.
enum Chunk {
    Data(Arc<Vec<u8>>),
    /// The sender has sent everything; sync and report.
    End,
}

/// How many bytes the writer lets the kernel hold dirty before it waits for them to reach
/// the disk: syncing as it goes overlaps the disk's work with the transfer, instead of one
/// long fsync at the end.
const SYNC_EVERY: u64 = 64 << 20;

/// Hashes chunks until the end; `None` when the upload did not end.
fn hash_upload(mut chunks: mpsc::Receiver<Chunk>) -> Option<String> {
    let mut hasher = Sha256::new();
    loop {
        match chunks.blocking_recv()? {
            Chunk::Data(data) => hasher.update(&data[..]),
            Chunk::End => return Some(hex(&hasher.finalize())),
        }
    }
}

/// Writes chunks until the end and syncs them; removes the file when the sender goes away
/// without ending (a cut or refused upload) or writing fails. Returns the size.
fn write_upload(
    file: std::fs::File,
    path: &Path,
    mut chunks: mpsc::Receiver<Chunk>,
) -> Result<u64, ImageStoreError> {
    let result = (|| {
        let mut out = file;
        let mut size = 0u64;
        let mut unsynced = 0u64;
        loop {
            match chunks.blocking_recv() {
                Some(Chunk::Data(data)) => {
                    out.write_all(&data)
                        .map_err(io_error("writing an upload"))?;
                    size += data.len() as u64;
                    unsynced += data.len() as u64;
                    if unsynced >= SYNC_EVERY {
                        out.sync_data().map_err(io_error("syncing an upload"))?;
                        unsynced = 0;
                    }
                }
                Some(Chunk::End) => break,
                None => {
                    return Err(ImageStoreError::Io {
                        what: "the upload ended early".into(),
                        source: std::io::Error::from(std::io::ErrorKind::UnexpectedEof),
                    });
                }
            }
        }
        out.sync_all().map_err(io_error("syncing an upload"))?;
        Ok(size)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(path);
    }
    result
}

/// Lower-case hex of some bytes.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// Bytes stored under their hash.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stored {
    /// Their sha256, hex.
    pub sha256_hex: String,
    /// Their size.
    pub size: u64,
}

impl Stored {
    /// `sha256:<hex>`.
    pub fn checksum(&self) -> String {
        format!("sha256:{}", self.sha256_hex)
    }
}

/// An upload in progress. Dropping it before [`Upload::finish`] (or a failed finish)
/// leaves nothing behind.
#[derive(Debug)]
pub struct Upload {
    chunks: Option<mpsc::Sender<Chunk>>,
    to_hasher: Option<mpsc::Sender<Chunk>>,
    hasher: Option<tokio::task::JoinHandle<Option<String>>>,
    writer: Option<tokio::task::JoinHandle<Result<u64, ImageStoreError>>>,
    temp: Option<PathBuf>,
    size: u64,
}

impl Upload {
    /// Queues the next bytes; waits while the writer is behind.
    pub async fn write(&mut self, data: Vec<u8>) -> Result<(), ImageStoreError> {
        if data.is_empty() {
            return Ok(());
        }
        self.size += data.len() as u64;
        let data = Arc::new(data);
        let sent = match (&self.chunks, &self.to_hasher) {
            (Some(chunks), Some(to_hasher)) => {
                let (written, hashed) = tokio::join!(
                    chunks.send(Chunk::Data(data.clone())),
                    to_hasher.send(Chunk::Data(data))
                );
                written.is_ok() && hashed.is_ok()
            }
            _ => false,
        };
        if sent {
            return Ok(());
        }
        // The writer stopped: its error says why.
        Err(self
            .writer_result()
            .await
            .err()
            .unwrap_or_else(|| ImageStoreError::Io {
                what: "writing an upload".into(),
                source: std::io::Error::other("the writer stopped"),
            }))
    }

    /// How many bytes were queued so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    async fn writer_result(&mut self) -> Result<u64, ImageStoreError> {
        self.chunks = None;
        self.to_hasher = None;
        let Some(writer) = self.writer.take() else {
            return Err(ImageStoreError::Io {
                what: "the upload is over".into(),
                source: std::io::Error::other("finished already"),
            });
        };
        writer.await.map_err(|e| ImageStoreError::Io {
            what: "the upload's writer failed".into(),
            source: std::io::Error::other(e.to_string()),
        })?
    }

    /// Waits for every byte to be written and synced, and computes the hash, without
    /// storing the bytes yet: the caller checks them first. Dropping the returned
    /// [`Finished`] instead of storing it removes the file.
    pub async fn finish(mut self) -> Result<Finished, ImageStoreError> {
        if let (Some(chunks), Some(to_hasher)) = (&self.chunks, &self.to_hasher) {
            // A send fails only when a thread stopped; the writer's result says why.
            let _ = tokio::join!(chunks.send(Chunk::End), to_hasher.send(Chunk::End));
        }
        let hasher = self.hasher.take();
        let size = self.writer_result().await?;
        let sha256_hex = match hasher {
            Some(hasher) => hasher.await.ok().flatten(),
            None => None,
        }
        .ok_or_else(|| ImageStoreError::Io {
            what: "hashing an upload".into(),
            source: std::io::Error::other("the hasher stopped"),
        })?;
        Ok(Finished {
            temp: self.temp.take(),
            stored: Stored { sha256_hex, size },
        })
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        // Closing the channel makes the writer remove the file; when it is done already
        // (the upload failed), remove it here.
        self.chunks = None;
        self.to_hasher = None;
        if let (Some(temp), Some(writer)) = (&self.temp, &self.writer)
            && writer.is_finished()
        {
            let _ = std::fs::remove_file(temp);
        }
    }
}

/// An upload whose bytes are all written and hashed, not yet stored.
#[derive(Debug)]
pub struct Finished {
    temp: Option<PathBuf>,
    stored: Stored,
}

impl Finished {
    /// The hash and size of the bytes.
    pub fn stored(&self) -> &Stored {
        &self.stored
    }

    /// Reads up to `len` bytes from `offset` of the uploaded bytes (for format checks
    /// that need more than the header).
    pub fn read_at(&self, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
        let path = self.temp.as_ref().ok_or(std::io::ErrorKind::NotFound)?;
        let mut file = std::fs::File::open(path)?;
        file.seek(std::io::SeekFrom::Start(offset))?;
        let mut out = Vec::with_capacity(len);
        file.take(len as u64).read_to_end(&mut out)?;
        Ok(out)
    }

    /// Gives the bytes their final name in `store` (read-only), or drops them when the
    /// store has them already. Hold [`ImageStore::commit_guard`] across this and the
    /// write that records the bytes.
    pub fn store(mut self, store: &ImageStore) -> Result<Stored, ImageStoreError> {
        let temp = self.temp.take().expect("a finished upload has its file");
        let target = store.path_of(&self.stored.sha256_hex);
        let stored = self.stored.clone();
        let result = (|| {
            if target.exists() {
                std::fs::remove_file(&temp).map_err(io_error("removing a duplicate upload"))?;
                return Ok(());
            }
            let mut perms = std::fs::metadata(&temp)
                .map_err(io_error("reading an upload"))?
                .permissions();
            perms.set_readonly(true);
            std::fs::set_permissions(&temp, perms).map_err(io_error("protecting an upload"))?;
            std::fs::rename(&temp, &target).map_err(io_error(format!(
                "moving an upload to {}",
                target.display()
            )))?;
            if let Some(dir) = target.parent() {
                std::fs::File::open(dir)
                    .and_then(|d| d.sync_all())
                    .map_err(io_error(format!("syncing {}", dir.display())))?;
            }
            Ok(())
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&temp);
        }
        result.map(|()| stored)
    }
}

impl Drop for Finished {
    fn drop(&mut self) {
        if let Some(temp) = self.temp.take() {
            let _ = std::fs::remove_file(temp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files_in(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[tokio::test]
    async fn stores_bytes_under_their_hash_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = ImageStore::open(dir.path()).unwrap();
        let mut stored = Vec::new();
        for _ in 0..2 {
            let mut upload = store.begin().unwrap();
            upload.write(b"hello ".to_vec()).await.unwrap();
            upload.write(b"world".to_vec()).await.unwrap();
            let finished = upload.finish().await.unwrap();
            stored.push(finished.store(&store).unwrap());
        }
        let hex = "b94d27b9934d3e08a52e52d7da7dabfac484efe37a5380ee9088f7ace2efcde9";
        assert_eq!(stored[0], stored[1]);
        assert_eq!(stored[0].sha256_hex, hex);
        assert_eq!(stored[0].size, 11);
        assert_eq!(files_in(&dir.path().join("sha256")), vec![hex.to_owned()]);
        assert!(files_in(&dir.path().join("tmp")).is_empty());
        let (mut file, size) = store.open_at(hex, 6).unwrap();
        let mut rest = String::new();
        file.read_to_string(&mut rest).unwrap();
        assert_eq!((size, rest.as_str()), (11, "world"));
    }

    #[tokio::test]
    async fn an_upload_dropped_or_not_stored_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = ImageStore::open(dir.path()).unwrap();
        let mut upload = store.begin().unwrap();
        upload.write(vec![7; 3 * CHUNK_BYTES]).await.unwrap();
        drop(upload);
        let mut upload = store.begin().unwrap();
        upload.write(vec![7; 10]).await.unwrap();
        let finished = upload.finish().await.unwrap();
        drop(finished);
        // The writer thread removes its file once it sees the channel closed.
        for _ in 0..100 {
            if files_in(&dir.path().join("tmp")).is_empty() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert!(files_in(&dir.path().join("tmp")).is_empty());
        assert!(files_in(&dir.path().join("sha256")).is_empty());
    }

    #[tokio::test]
    async fn opening_removes_unfinished_uploads_and_collection_keeps_referenced_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let store = ImageStore::open(dir.path()).unwrap();
        let mut kept = Vec::new();
        for data in [&b"a"[..], b"b"] {
            let mut upload = store.begin().unwrap();
            upload.write(data.to_vec()).await.unwrap();
            kept.push(upload.finish().await.unwrap().store(&store).unwrap());
        }
        std::fs::write(dir.path().join("tmp/left.upload"), b"x").unwrap();
        let store = ImageStore::open(dir.path()).unwrap();
        assert!(files_in(&dir.path().join("tmp")).is_empty());
        let keep: HashSet<String> = [kept[0].sha256_hex.clone()].into();
        let removed = store
            .collect_garbage(|| async { Ok::<_, ()>(keep) })
            .await
            .unwrap();
        assert_eq!(removed, vec![kept[1].sha256_hex.clone()]);
        assert_eq!(
            files_in(&dir.path().join("sha256")),
            vec![kept[0].sha256_hex.clone()]
        );
    }
}
