//! The node's image cache: the bytes of the Images its guests boot from, kept by checksum.
//!
//! ```text
//! <cache>/sha256/<hex>        the bytes, named by their sha256, read-only
//! <cache>/images/<uid>.json   what this node found for one Image (phase, checksum, format,
//!                             sizes, message): the source of Node.status.images
//! <cache>/tmp/                fetches in progress, `<image-uid>.<random>.partial`
//! ```
//!
//! A fetch copies the source into `tmp/` while hashing it, checks the sha256 against the
//! Image's `spec.checksum` when there is one, and only then renames the file to its final
//! name: a crash never leaves a partial file under a name that looks complete, and
//! leftovers in `tmp/` are removed when the cache is opened. Two Images with the same bytes
//! share one file. The file is then inspected with `qemu-img info` (format, virtual size),
//! which also refuses a qcow2 with a backing file — an image must never reach files on
//! the host through its header.
//!
//! What was found for each Image is recorded on disk next to the bytes, so the node's
//! report is rebuilt from the disk after a restart, never from memory; only fetches in
//! progress (phase `Downloading`) live in memory. Images are fetched when a guest needs
//! them to start. Sources: `file://` only for now; `http(s)://` is the next
//! [`Source`] to add (it needs only a reader for the bytes).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use ferro_api::v1;
use ferro_api::v1::cached_image::Phase;
use ferro_api::v1::image_spec::DiskFormat;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// One Image, as the cache needs to know it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    /// The Image's uid: the key of what the node records.
    pub uid: String,
    /// The Image's project.
    pub project: String,
    /// The Image's name.
    pub name: String,
    /// `spec.source.url`.
    pub url: String,
    /// `spec.checksum` (`sha256:<hex>`), or empty.
    pub checksum: String,
    /// `spec.diskFormat`, when set.
    pub disk_format: Option<DiskFormat>,
}

impl ImageRef {
    /// The fields of an Image the cache needs.
    pub fn of(image: &v1::Image) -> Self {
        let meta = image.metadata.clone().unwrap_or_default();
        let spec = image.spec.clone().unwrap_or_default();
        ImageRef {
            uid: meta.uid,
            project: meta.project,
            name: meta.name,
            url: spec.source.map(|s| s.url).unwrap_or_default(),
            checksum: spec.checksum,
            disk_format: spec.disk_format.and_then(|f| DiskFormat::try_from(f).ok()),
        }
    }

    fn display(&self) -> String {
        format!("{}/{}", self.project, self.name)
    }
}

/// A verified image in the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedFile {
    /// The file.
    pub path: PathBuf,
    /// Its sha256, `sha256:<hex>`.
    pub checksum: String,
    /// The format it is used with: the declared one when the Image declares raw or
    /// qcow2, what `qemu-img info` found otherwise.
    pub format: String,
    /// The file's size in bytes.
    pub size_bytes: u64,
    /// The disk size a guest sees, in bytes.
    pub virtual_size_bytes: u64,
}

/// Why an image could not be cached.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The source URL's scheme is not one this node fetches.
    #[error("cannot fetch {url}: {reason}")]
    UnsupportedSource {
        /// The URL.
        url: String,
        /// Why not.
        reason: String,
    },
    /// Reading the source failed.
    #[error("reading {url}")]
    Fetch {
        /// The URL.
        url: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The bytes are not the ones `spec.checksum` names.
    #[error("checksum mismatch: spec.checksum is {expected}, the bytes are {actual}")]
    ChecksumMismatch {
        /// `spec.checksum`.
        expected: String,
        /// What the bytes hash to.
        actual: String,
    },
    /// `qemu-img info` refused the image, or found something unsafe in it.
    #[error("{0}")]
    Invalid(String),
    /// The cache's own files could not be written.
    #[error("{what}")]
    Cache {
        /// What was being done.
        what: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

impl ImageError {
    /// The condition reason for this error.
    pub fn reason(&self) -> &'static str {
        match self {
            ImageError::UnsupportedSource { .. } => "ImageSourceUnsupported",
            ImageError::Fetch { .. } => "ImageFetchFailed",
            ImageError::ChecksumMismatch { .. } => "ImageChecksumMismatch",
            ImageError::Invalid(_) => "ImageInvalid",
            ImageError::Cache { .. } => "ImageCacheFailed",
        }
    }
}

/// The image cache of a node.
#[async_trait::async_trait]
pub trait ImageCache: Send + Sync {
    /// The image's verified file, fetched first if this node does not have it.
    async fn ensure(&self, image: &ImageRef) -> Result<CachedFile, ImageError>;

    /// What the node has, for `Node.status.images`, sorted by image uid.
    fn report(&self) -> Vec<v1::CachedImage>;

    /// A counter that moves whenever [`ImageCache::report`] may have changed.
    fn changes(&self) -> tokio::sync::watch::Receiver<u64>;
}

/// Where an image's bytes come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A file on this node (`file:///absolute/path`).
    File(PathBuf),
}

impl Source {
    /// The source a URL names, or why this node cannot fetch it.
    pub fn parse(url: &str) -> Result<Source, ImageError> {
        let unsupported = |reason: &str| ImageError::UnsupportedSource {
            url: url.to_owned(),
            reason: reason.to_owned(),
        };
        if let Some(rest) = url.strip_prefix("file://") {
            // `file:///path` or `file://localhost/path`.
            let path = rest.strip_prefix("localhost").unwrap_or(rest);
            if !path.starts_with('/') {
                return Err(unsupported(
                    "a file URL must name an absolute path on the node",
                ));
            }
            let path = percent_decode(path).ok_or_else(|| unsupported("bad %-escape"))?;
            return Ok(Source::File(PathBuf::from(path)));
        }
        if url.starts_with("http://") || url.starts_with("https://") {
            return Err(unsupported(
                "http(s) sources are not fetched yet; use file://",
            ));
        }
        Err(unsupported("only file:// sources are supported"))
    }

    /// Opens the bytes for reading.
    fn open(&self) -> std::io::Result<Box<dyn Read + Send>> {
        match self {
            Source::File(path) => Ok(Box::new(std::fs::File::open(path)?)),
        }
    }
}

fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// What the node found for one Image, as recorded in `images/<uid>.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Record {
    image_uid: String,
    image: String,
    ready: bool,
    #[serde(default)]
    checksum: String,
    #[serde(default)]
    format: String,
    #[serde(default)]
    size_bytes: u64,
    #[serde(default)]
    virtual_size_bytes: u64,
    #[serde(default)]
    message: String,
}

impl Record {
    fn report(&self, file_present: bool) -> v1::CachedImage {
        let (phase, message) = match (self.ready, file_present) {
            (true, true) => (Phase::Ready, self.message.clone()),
            (true, false) => (
                Phase::Failed,
                "the cached file is gone; it is fetched again when a guest needs it".to_owned(),
            ),
            (false, _) => (Phase::Failed, self.message.clone()),
        };
        v1::CachedImage {
            image_uid: self.image_uid.clone(),
            image: self.image.clone(),
            phase: phase as i32,
            checksum: self.checksum.clone(),
            format: self.format.clone(),
            size_bytes: self.size_bytes,
            virtual_size_bytes: self.virtual_size_bytes,
            message,
        }
    }
}

/// The real image cache, in a directory of the node.
#[derive(Debug)]
pub struct FileImageCache {
    dir: PathBuf,
    qemu_img: PathBuf,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    downloading: Mutex<HashMap<String, v1::CachedImage>>,
    changed: tokio::sync::watch::Sender<u64>,
}

impl FileImageCache {
    /// Opens (creating) the cache in `dir` and removes fetches a crash left unfinished.
    /// One agent uses a cache directory at a time.
    pub fn open(dir: impl Into<PathBuf>, qemu_img: impl Into<PathBuf>) -> Result<Self, ImageError> {
        let dir = std::path::absolute(dir.into())
            .map_err(cache_error("resolving the image cache directory"))?;
        for sub in ["sha256", "images", "tmp"] {
            let path = dir.join(sub);
            std::fs::create_dir_all(&path)
                .map_err(cache_error(&format!("creating {}", path.display())))?;
        }
        let tmp = dir.join("tmp");
        if let Ok(entries) = std::fs::read_dir(&tmp) {
            for entry in entries.flatten() {
                tracing::info!(file = %entry.path().display(), "removing an unfinished image fetch");
                let _ = std::fs::remove_file(entry.path());
            }
        }
        Ok(FileImageCache {
            dir,
            qemu_img: qemu_img.into(),
            locks: Mutex::new(HashMap::new()),
            downloading: Mutex::new(HashMap::new()),
            changed: tokio::sync::watch::channel(0).0,
        })
    }

    /// Where the bytes with this sha256 (hex) live.
    pub fn path_of(&self, sha256_hex: &str) -> PathBuf {
        self.dir.join("sha256").join(sha256_hex)
    }

    fn record_path(&self, uid: &str) -> PathBuf {
        self.dir.join("images").join(format!("{uid}.json"))
    }

    fn read_record(&self, uid: &str) -> Option<Record> {
        let bytes = std::fs::read(self.record_path(uid)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    fn write_record(&self, record: &Record) -> Result<(), ImageError> {
        let path = self.record_path(&record.image_uid);
        let json = serde_json::to_vec_pretty(record).expect("records serialise");
        let mut file = tempfile::Builder::new()
            .prefix(".record-")
            .tempfile_in(self.dir.join("tmp"))
            .map_err(cache_error("creating a record"))?;
        file.write_all(&json)
            .map_err(cache_error("writing a record"))?;
        file.persist(&path)
            .map_err(|e| e.error)
            .map_err(cache_error(&format!("writing {}", path.display())))?;
        Ok(())
    }

    fn file_of(&self, record: &Record) -> Option<PathBuf> {
        let hex = record.checksum.strip_prefix("sha256:")?;
        let path = self.path_of(hex);
        let len = std::fs::metadata(&path).ok()?.len();
        (len == record.size_bytes).then_some(path)
    }

    fn lock_for(&self, uid: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.locks
            .lock()
            .expect("image locks poisoned")
            .entry(uid.to_owned())
            .or_default()
            .clone()
    }

    fn set_downloading(&self, image: &ImageRef, downloading: bool) {
        {
            let mut map = self.downloading.lock().expect("downloads poisoned");
            if downloading {
                map.insert(
                    image.uid.clone(),
                    v1::CachedImage {
                        image_uid: image.uid.clone(),
                        image: image.display(),
                        phase: Phase::Downloading as i32,
                        message: format!("fetching {}", image.url),
                        ..Default::default()
                    },
                );
            } else {
                map.remove(&image.uid);
            }
        }
        self.changed.send_modify(|n| *n += 1);
    }

    async fn fetch(&self, image: &ImageRef) -> Result<CachedFile, ImageError> {
        let source = Source::parse(&image.url)?;
        let tmp = self.dir.join("tmp");
        let uid = image.uid.clone();
        let url = image.url.clone();
        let (partial, hex, size) =
            tokio::task::spawn_blocking(move || copy_hashing(&source, &tmp, &uid, &url))
                .await
                .map_err(|e| ImageError::Invalid(format!("fetch task failed: {e}")))??;
        let checksum = format!("sha256:{hex}");
        if !image.checksum.is_empty() && image.checksum != checksum {
            return Err(ImageError::ChecksumMismatch {
                expected: image.checksum.clone(),
                actual: checksum,
            });
        }
        let path = self.path_of(&hex);
        if path.exists() {
            // The same bytes are cached already (another Image, or an earlier fetch).
            drop(partial);
        } else {
            let mut perms = partial
                .as_file()
                .metadata()
                .map_err(cache_error("reading a fetched file"))?
                .permissions();
            perms.set_readonly(true);
            partial
                .as_file()
                .set_permissions(perms)
                .map_err(cache_error("protecting a fetched file"))?;
            partial
                .persist(&path)
                .map_err(|e| e.error)
                .map_err(cache_error(&format!(
                    "moving a fetched file to {}",
                    path.display()
                )))?;
        }
        let (format, virtual_size) = self.inspect(&path, image.disk_format, size).await?;
        Ok(CachedFile {
            path,
            checksum,
            format,
            size_bytes: size,
            virtual_size_bytes: virtual_size,
        })
    }

    /// The format to use and the virtual size, from `qemu-img info`.
    async fn inspect(
        &self,
        path: &Path,
        declared: Option<DiskFormat>,
        size: u64,
    ) -> Result<(String, u64), ImageError> {
        let declared = match declared {
            Some(DiskFormat::Raw) => Some("raw"),
            Some(DiskFormat::Qcow2) => Some("qcow2"),
            _ => None,
        };
        let mut command = tokio::process::Command::new(&self.qemu_img);
        command.args(["info", "--output=json"]);
        if let Some(format) = declared {
            command.args(["-f", format]);
        }
        let output = command
            .arg(path)
            .stdin(std::process::Stdio::null())
            .output()
            .await
            .map_err(|e| {
                ImageError::Invalid(format!("running {}: {e}", self.qemu_img.display()))
            })?;
        if !output.status.success() {
            let said = String::from_utf8_lossy(&output.stderr).trim().to_owned();
            return Err(ImageError::Invalid(match declared {
                Some(format) => format!("not a valid {format} image: {said}"),
                None => format!("qemu-img info failed: {said}"),
            }));
        }
        let info: serde_json::Value = serde_json::from_slice(&output.stdout)
            .map_err(|e| ImageError::Invalid(format!("qemu-img info printed no JSON: {e}")))?;
        if let Some(backing) = info.get("backing-filename").and_then(|b| b.as_str()) {
            return Err(ImageError::Invalid(format!(
                "the image names a backing file ({backing}); images must be self-contained"
            )));
        }
        let format = info["format"].as_str().unwrap_or("raw").to_owned();
        let virtual_size = info["virtual-size"].as_u64().unwrap_or(size);
        Ok((format, virtual_size))
    }
}

/// Copies the source into a new temporary file in `tmp`, hashing it; returns the file (not
/// yet under its final name), the sha256 in hex and the size.
fn copy_hashing(
    source: &Source,
    tmp: &Path,
    uid: &str,
    url: &str,
) -> Result<(tempfile::NamedTempFile, String, u64), ImageError> {
    let mut reader = source.open().map_err(|e| ImageError::Fetch {
        url: url.to_owned(),
        source: e,
    })?;
    let mut partial = tempfile::Builder::new()
        .prefix(&format!("{uid}."))
        .suffix(".partial")
        .tempfile_in(tmp)
        .map_err(cache_error("creating a temporary file"))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                return Err(ImageError::Fetch {
                    url: url.to_owned(),
                    source: e,
                });
            }
        };
        hasher.update(&buf[..n]);
        partial
            .write_all(&buf[..n])
            .map_err(cache_error("writing a fetched image"))?;
        size += n as u64;
    }
    partial
        .as_file()
        .sync_all()
        .map_err(cache_error("syncing a fetched image"))?;
    Ok((partial, hex(&hasher.finalize()), size))
}

/// Lower-case hex of some bytes.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn cache_error(what: &str) -> impl FnOnce(std::io::Error) -> ImageError {
    let what = what.to_owned();
    move |source| ImageError::Cache { what, source }
}

#[async_trait::async_trait]
impl ImageCache for FileImageCache {
    async fn ensure(&self, image: &ImageRef) -> Result<CachedFile, ImageError> {
        let lock = self.lock_for(&image.uid);
        let _guard = lock.lock().await;
        if let Some(record) = self.read_record(&image.uid)
            && record.ready
            && let Some(path) = self.file_of(&record)
        {
            return Ok(CachedFile {
                path,
                checksum: record.checksum,
                format: record.format,
                size_bytes: record.size_bytes,
                virtual_size_bytes: record.virtual_size_bytes,
            });
        }
        tracing::info!(image = %image.display(), url = %image.url, "fetching image");
        self.set_downloading(image, true);
        let fetched = self.fetch(image).await;
        let record = match &fetched {
            Ok(file) => Record {
                image_uid: image.uid.clone(),
                image: image.display(),
                ready: true,
                checksum: file.checksum.clone(),
                format: file.format.clone(),
                size_bytes: file.size_bytes,
                virtual_size_bytes: file.virtual_size_bytes,
                message: String::new(),
            },
            Err(e) => {
                tracing::warn!(image = %image.display(), error = %error_chain(e), "image fetch failed");
                Record {
                    image_uid: image.uid.clone(),
                    image: image.display(),
                    ready: false,
                    checksum: String::new(),
                    format: String::new(),
                    size_bytes: 0,
                    virtual_size_bytes: 0,
                    message: format!("{}: {}", e.reason(), error_chain(e)),
                }
            }
        };
        let written = self.write_record(&record);
        self.set_downloading(image, false);
        let file = fetched?;
        written?;
        tracing::info!(image = %image.display(), checksum = %file.checksum, format = %file.format, "image cached");
        Ok(file)
    }

    fn report(&self) -> Vec<v1::CachedImage> {
        let mut report: HashMap<String, v1::CachedImage> = HashMap::new();
        if let Ok(entries) = std::fs::read_dir(self.dir.join("images")) {
            for entry in entries.flatten() {
                let Some(uid) = entry
                    .file_name()
                    .to_str()
                    .and_then(|n| n.strip_suffix(".json"))
                    .map(str::to_owned)
                else {
                    continue;
                };
                if let Some(record) = self.read_record(&uid) {
                    let present = self.file_of(&record).is_some();
                    report.insert(uid, record.report(present));
                }
            }
        }
        for (uid, entry) in self.downloading.lock().expect("downloads poisoned").iter() {
            report.insert(uid.clone(), entry.clone());
        }
        let mut report: Vec<_> = report.into_values().collect();
        report.sort_by(|a, b| a.image_uid.cmp(&b.image_uid));
        report
    }

    fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }
}

/// An error and its sources on one line.
pub(crate) fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha256_of(bytes: &[u8]) -> String {
        format!("sha256:{}", hex(&Sha256::digest(bytes)))
    }

    struct Fixture {
        dir: tempfile::TempDir,
        cache: FileImageCache,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let cache = FileImageCache::open(dir.path().join("cache"), "qemu-img").unwrap();
        Fixture { dir, cache }
    }

    impl Fixture {
        fn source(&self, name: &str, bytes: &[u8]) -> String {
            let path = self.dir.path().join(name);
            std::fs::write(&path, bytes).unwrap();
            format!("file://{}", path.display())
        }

        fn tmp_entries(&self) -> Vec<PathBuf> {
            std::fs::read_dir(self.dir.path().join("cache/tmp"))
                .unwrap()
                .flatten()
                .map(|e| e.path())
                .collect()
        }
    }

    fn image(uid: &str, url: String, checksum: String, format: Option<DiskFormat>) -> ImageRef {
        ImageRef {
            uid: uid.into(),
            project: "p".into(),
            name: format!("img-{uid}"),
            url,
            checksum,
            disk_format: format,
        }
    }

    #[test]
    fn sources_are_file_urls_for_now() {
        assert_eq!(
            Source::parse("file:///var/lib/a%20b.raw").unwrap(),
            Source::File("/var/lib/a b.raw".into())
        );
        assert_eq!(
            Source::parse("file://localhost/x").unwrap(),
            Source::File("/x".into())
        );
        for url in ["file://relative/x", "https://mirror/x.qcow2", "ftp://x/y"] {
            let err = Source::parse(url).unwrap_err();
            assert_eq!(err.reason(), "ImageSourceUnsupported", "{url}: {err}");
        }
    }

    #[tokio::test]
    async fn a_fetch_copies_verifies_and_records_the_image() {
        let f = fixture();
        let bytes = vec![7u8; 3 << 20];
        let checksum = sha256_of(&bytes);
        let url = f.source("disk.raw", &bytes);
        let img = image("u1", url, checksum.clone(), Some(DiskFormat::Raw));
        let file = f.cache.ensure(&img).await.unwrap();
        assert_eq!(file.checksum, checksum);
        assert_eq!(file.format, "raw");
        assert_eq!(file.size_bytes, 3 << 20);
        assert_eq!(file.virtual_size_bytes, 3 << 20);
        assert_eq!(
            file.path,
            f.cache.path_of(checksum.strip_prefix("sha256:").unwrap())
        );
        assert_eq!(std::fs::read(&file.path).unwrap(), bytes);
        assert!(
            std::fs::metadata(&file.path)
                .unwrap()
                .permissions()
                .readonly()
        );
        assert!(f.tmp_entries().is_empty(), "{:?}", f.tmp_entries());

        let report = f.cache.report();
        assert_eq!(report.len(), 1);
        assert_eq!(report[0].image_uid, "u1");
        assert_eq!(report[0].image, "p/img-u1");
        assert_eq!(report[0].phase, Phase::Ready as i32);
        assert_eq!(report[0].checksum, checksum);
        assert_eq!(report[0].format, "raw");

        // A second Image with the same bytes and no checksum shares the file; a second
        // ensure of the first one is answered from the record.
        let twin = image("u2", f.source("twin.raw", &bytes), String::new(), None);
        assert_eq!(f.cache.ensure(&twin).await.unwrap().path, file.path);
        std::fs::remove_file(f.dir.path().join("disk.raw")).unwrap();
        assert_eq!(f.cache.ensure(&img).await.unwrap(), file);
        assert_eq!(f.cache.report().len(), 2);
    }

    #[tokio::test]
    async fn a_checksum_mismatch_fails_and_leaves_nothing_under_a_final_name() {
        let f = fixture();
        let url = f.source("disk.raw", b"not the expected bytes");
        let wrong = sha256_of(b"something else");
        let err = f
            .cache
            .ensure(&image("u1", url, wrong.clone(), None))
            .await
            .unwrap_err();
        assert_eq!(err.reason(), "ImageChecksumMismatch");
        assert!(err.to_string().contains(&wrong), "{err}");
        assert!(
            std::fs::read_dir(f.dir.path().join("cache/sha256"))
                .unwrap()
                .next()
                .is_none()
        );
        assert!(f.tmp_entries().is_empty());
        let report = f.cache.report();
        assert_eq!(report[0].phase, Phase::Failed as i32);
        assert!(
            report[0].message.starts_with("ImageChecksumMismatch: "),
            "{}",
            report[0].message
        );
    }

    #[tokio::test]
    async fn a_missing_source_is_a_failed_fetch() {
        let f = fixture();
        let url = format!("file://{}/nope.raw", f.dir.path().display());
        let err = f
            .cache
            .ensure(&image("u1", url, String::new(), None))
            .await
            .unwrap_err();
        assert_eq!(err.reason(), "ImageFetchFailed");
    }

    #[tokio::test]
    async fn unfinished_fetches_are_swept_and_temp_names_never_look_final() {
        let f = fixture();
        let leftover = f.dir.path().join("cache/tmp/u1.abc123.partial");
        std::fs::write(&leftover, b"half an image").unwrap();
        let cache = FileImageCache::open(f.dir.path().join("cache"), "qemu-img").unwrap();
        assert!(!leftover.exists());
        assert!(cache.report().is_empty());

        // While a copy runs its file lives only under tmp/ with a .partial name.
        let bytes = b"0123456789".repeat(1000);
        std::fs::write(f.dir.path().join("src"), &bytes).unwrap();
        let source = Source::File(f.dir.path().join("src"));
        let (partial, hex_digest, size) = copy_hashing(
            &source,
            &f.dir.path().join("cache/tmp"),
            "u9",
            "file:///src",
        )
        .unwrap();
        let name = partial
            .path()
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .to_owned();
        assert!(
            name.starts_with("u9.") && name.ends_with(".partial"),
            "{name}"
        );
        assert_eq!(size, bytes.len() as u64);
        assert_eq!(format!("sha256:{hex_digest}"), sha256_of(&bytes));
        drop(partial);
        assert!(f.tmp_entries().is_empty(), "a dropped fetch leaves no file");
    }

    #[tokio::test]
    async fn a_qcow2_with_a_backing_file_is_refused() {
        let f = fixture();
        let base = f.dir.path().join("base.raw");
        std::fs::write(&base, vec![0u8; 1 << 20]).unwrap();
        let overlay = f.dir.path().join("evil.qcow2");
        let status = std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
            .arg(&base)
            .arg(&overlay)
            .status()
            .unwrap();
        assert!(status.success());
        let url = format!("file://{}", overlay.display());
        let err = f
            .cache
            .ensure(&image("u1", url, String::new(), None))
            .await
            .unwrap_err();
        assert_eq!(err.reason(), "ImageInvalid");
        assert!(err.to_string().contains("backing file"), "{err}");
    }

    #[tokio::test]
    async fn a_declared_qcow2_that_is_not_one_is_refused() {
        let f = fixture();
        let url = f.source("disk.raw", &[0u8; 4096]);
        let err = f
            .cache
            .ensure(&image("u1", url, String::new(), Some(DiskFormat::Qcow2)))
            .await
            .unwrap_err();
        assert_eq!(err.reason(), "ImageInvalid");
        assert!(err.to_string().contains("not a valid qcow2 image"), "{err}");
    }
}
