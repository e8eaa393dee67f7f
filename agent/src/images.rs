//! The node's image cache: the bytes of the Images its guests boot from, kept by checksum.
//!
//! ```text
//! <cache>/sha256/<hex>        raw and qcow2 bytes, named by their sha256, read-only
//! <cache>/sha256/<hex>.qcow2  a vmdk, vdi or vhdx whose bytes have that sha256, converted
//! <cache>/images/<uid>.json   what this node found for one Image (phase, checksum, format,
//!                             sizes, message): the source of Node.status.images
//! <cache>/tmp/                fetches in progress: `<image-uid>.<random>.partial` (file
//!                             copies), `<image-uid>.<url-hash>.download` (HTTP, kept
//!                             across restarts so they resume)
//! ```
//!
//! A fetch stages the source in `tmp/`, hashes it, checks the sha256 against the Image's
//! `spec.checksum` when there is one, and only then gives the file its final name: a crash
//! never leaves a partial file under a name that looks complete. `file://` sources are
//! copied; `http://` sources are downloaded with [`http`], and an interrupted download
//! resumes with a `Range` request (guarded by `If-Range` with the first response's ETag
//! or Last-Modified), both within one fetch and after an agent restart, since the staged
//! file's name depends only on the Image's uid and URL. Images uploaded through the API
//! (`ferro://upload`) are read from the apiserver's image store with the Images service's
//! `Download` over the agent's own connection ([`ImageCache::use_apiserver`]), staged and
//! resumed from the staged file's length exactly like HTTP downloads, and checked against
//! the checksum the apiserver recorded in `status.uploaded`. Two Images with the same
//! bytes share one file.
//!
//! The staged file is inspected with `qemu-img info` (format, virtual size) — with the
//! declared `diskFormat` when there is one, probing otherwise. raw and qcow2 are used as
//! they are; vmdk, vdi and vhdx are converted to qcow2 (`qemu-img convert`); anything else
//! is refused as `UnknownImageFormat`. An image must never reach files on the host through
//! its header: a qcow2 backing file or external data file, or a vmdk extent other than
//! the file itself, is refused.
//!
//! What was found for each Image is recorded on disk next to the bytes, so the node's
//! report is rebuilt from the disk after a restart, never from memory; only fetches in
//! progress (phase `Downloading`, with progress in the message) live in memory. Images
//! are fetched when a guest needs them to start. Failures carry a reason word at the
//! start of the record's message (`DownloadFailed: …`, `ImageChecksumMismatch: …`,
//! `UnknownImageFormat: …`; see [`ImageError::reason`]).
//!
//! [`memory::MemoryImageCache`] is the in-memory double of [`FileImageCache`], for tests
//! without files or `qemu-img`.

pub mod http;
pub mod memory;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferro_api::client::Client;
use ferro_api::images::UPLOAD_URL;
use ferro_api::retry::{self, BackoffBuilder};
use ferro_api::v1;
use ferro_api::v1::cached_image::Phase;
use ferro_api::v1::image_spec::DiskFormat;
// The agent's modules take it from here.
pub(crate) use ferro_runtime::error_chain;
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
    /// `spec.checksum` (`sha256:<hex>`), or empty; for uploaded bytes, the checksum the
    /// apiserver recorded (`status.uploaded.checksum`), empty until they are uploaded.
    pub checksum: String,
    /// `spec.diskFormat`, when set.
    pub disk_format: Option<DiskFormat>,
}

impl ImageRef {
    /// The fields of an Image the cache needs.
    pub fn of(image: &v1::Image) -> Self {
        let meta = image.metadata.clone().unwrap_or_default();
        let spec = image.spec.clone().unwrap_or_default();
        let url = spec.source.map(|s| s.url).unwrap_or_default();
        let checksum = if url == UPLOAD_URL {
            // The apiserver checked the bytes against spec.checksum as it stored them.
            image
                .status
                .as_ref()
                .and_then(|s| s.uploaded.as_ref())
                .map(|u| u.checksum.clone())
                .unwrap_or_default()
        } else {
            spec.checksum
        };
        ImageRef {
            uid: meta.uid,
            project: meta.project,
            name: meta.name,
            url,
            checksum,
            disk_format: spec.disk_format.and_then(|f| DiskFormat::try_from(f).ok()),
        }
    }

    /// `project/name`, for messages.
    pub fn display(&self) -> String {
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
    /// The format it is used with: `raw` or `qcow2` (what `qemu-img info` found, or the
    /// result of converting it).
    pub format: String,
    /// The format of the fetched bytes, as declared or found: `raw`, `qcow2`, `vmdk`, ….
    pub source_format: String,
    /// The size of the fetched bytes (those the checksum covers).
    pub size_bytes: u64,
    /// The disk size a guest sees, in bytes.
    pub virtual_size_bytes: u64,
    /// How long fetching it took, when this call fetched it; `None` when the cache
    /// already had it.
    pub fetched_in: Option<std::time::Duration>,
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
    /// Reading or downloading the source failed.
    #[error("downloading {url}")]
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
    /// `qemu-img` cannot read the bytes, or found a format Ferro does not boot or
    /// convert, or not the declared one.
    #[error("{0}")]
    UnknownFormat(String),
    /// `qemu-img info` found something unsafe in the image.
    #[error("{0}")]
    Invalid(String),
    /// Converting the image to qcow2 failed.
    #[error("converting the {format} image to qcow2: {stderr}")]
    Convert {
        /// The format converted from.
        format: String,
        /// What `qemu-img convert` said.
        stderr: String,
    },
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
            ImageError::Fetch { .. } => "DownloadFailed",
            ImageError::ChecksumMismatch { .. } => "ImageChecksumMismatch",
            ImageError::UnknownFormat(_) => "UnknownImageFormat",
            ImageError::Invalid(_) => "ImageInvalid",
            ImageError::Convert { .. } => "ImageConversionFailed",
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

    /// Gives the cache the agent's apiserver connection, from which it reads uploaded
    /// images (`ferro://upload`). Caches that fetch nothing ignore it.
    fn use_apiserver(&self, _client: Client) {}
}

/// Where an image's bytes come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A file on this node (`file:///absolute/path`).
    File(PathBuf),
    /// An `http://` URL.
    Http(http::HttpUrl),
    /// Bytes uploaded through the API (`ferro://upload`), read from the apiserver.
    Upload,
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
        if url == UPLOAD_URL {
            return Ok(Source::Upload);
        }
        if url.starts_with("http://") {
            return http::HttpUrl::parse(url)
                .map(Source::Http)
                .ok_or_else(|| unsupported("not a valid http:// URL"));
        }
        if url.starts_with("https://") {
            return Err(unsupported(
                "https:// sources are not supported yet; use http:// or file://",
            ));
        }
        Err(unsupported(
            "only file://, http:// and ferro://upload sources are supported",
        ))
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
    /// The sha256 of the fetched bytes.
    #[serde(default)]
    checksum: String,
    /// The format of the fetched bytes.
    #[serde(default)]
    format: String,
    /// The size of the fetched bytes.
    #[serde(default)]
    size_bytes: u64,
    #[serde(default)]
    virtual_size_bytes: u64,
    /// The cached file under `sha256/`, when it is not the fetched bytes themselves
    /// (a conversion); empty means `<hex>`.
    #[serde(default)]
    file: String,
    /// The format the cached file is used with; empty means `format`.
    #[serde(default)]
    file_format: String,
    /// The cached file's size; 0 means `size_bytes`.
    #[serde(default)]
    file_bytes: u64,
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

    fn file_name(&self) -> Option<String> {
        let hex = self.checksum.strip_prefix("sha256:")?;
        Some(if self.file.is_empty() {
            hex.to_owned()
        } else {
            self.file.clone()
        })
    }

    fn file_format(&self) -> &str {
        if self.file_format.is_empty() {
            &self.format
        } else {
            &self.file_format
        }
    }

    fn file_bytes(&self) -> u64 {
        if self.file_bytes == 0 {
            self.size_bytes
        } else {
            self.file_bytes
        }
    }
}

/// How often a download's progress is reported.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);
/// How many redirects a download follows.
const MAX_REDIRECTS: u32 = 5;
/// Staged HTTP downloads untouched for this long are removed when the cache opens.
const STALE_DOWNLOAD: Duration = Duration::from_secs(7 * 24 * 3600);

/// The real image cache, in a directory of the node.
pub struct FileImageCache {
    dir: PathBuf,
    qemu_img: PathBuf,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    downloading: Mutex<HashMap<String, v1::CachedImage>>,
    changed: tokio::sync::watch::Sender<u64>,
    /// The agent's connection, for uploaded images.
    apiserver: std::sync::OnceLock<Client>,
}

impl std::fmt::Debug for FileImageCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileImageCache")
            .field("dir", &self.dir)
            .field("qemu_img", &self.qemu_img)
            .field("apiserver", &self.apiserver.get().is_some())
            .finish_non_exhaustive()
    }
}

impl FileImageCache {
    /// Opens (creating) the cache in `dir` and removes what a crash left unfinished,
    /// except HTTP downloads, which the next fetch of their Image resumes.
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
                let name = entry.file_name().to_string_lossy().into_owned();
                let resumable = name.ends_with(".download") || name.ends_with(".validator");
                let stale = entry
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|age| age > STALE_DOWNLOAD);
                if resumable && !stale {
                    continue;
                }
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
            apiserver: std::sync::OnceLock::new(),
        })
    }

    /// Where the bytes with this sha256 (hex) live.
    pub fn path_of(&self, sha256_hex: &str) -> PathBuf {
        self.dir.join("sha256").join(sha256_hex)
    }

    /// Where an HTTP download of `url` for the Image with this uid is staged: the same
    /// name every time, so that a fetch after a restart resumes it.
    pub fn download_path(&self, uid: &str, url: &str) -> PathBuf {
        let digest = hex(&Sha256::digest(url.as_bytes()));
        self.dir
            .join("tmp")
            .join(format!("{uid}.{}.download", &digest[..16]))
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
        let path = self.dir.join("sha256").join(record.file_name()?);
        let len = std::fs::metadata(&path).ok()?.len();
        (len == record.file_bytes()).then_some(path)
    }

    fn lock_for(&self, uid: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.locks
            .lock()
            .expect("image locks poisoned")
            .entry(uid.to_owned())
            .or_default()
            .clone()
    }

    fn set_downloading(&self, image: &ImageRef, message: Option<String>) {
        {
            let mut map = self.downloading.lock().expect("downloads poisoned");
            match message {
                Some(message) => {
                    map.insert(
                        image.uid.clone(),
                        v1::CachedImage {
                            image_uid: image.uid.clone(),
                            image: image.display(),
                            phase: Phase::Downloading as i32,
                            message,
                            ..Default::default()
                        },
                    );
                }
                None => {
                    map.remove(&image.uid);
                }
            }
        }
        self.changed.send_modify(|n| *n += 1);
    }

    async fn fetch(&self, image: &ImageRef) -> Result<CachedFile, ImageError> {
        let source = Source::parse(&image.url)?;
        let staged = match &source {
            Source::File(_) => {
                let tmp = self.dir.join("tmp");
                let uid = image.uid.clone();
                let url = image.url.clone();
                let source = source.clone();
                let partial =
                    tokio::task::spawn_blocking(move || copy_to_tmp(&source, &tmp, &uid, &url))
                        .await
                        .map_err(|e| ImageError::Invalid(format!("fetch task failed: {e}")))??;
                Staged::Temp(partial)
            }
            Source::Http(url) => {
                let path = self.download_path(&image.uid, &image.url);
                self.download(image, url.clone(), &path).await?;
                Staged::Download(path)
            }
            Source::Upload => {
                let path = self.download_path(&image.uid, &image.url);
                self.download_uploaded(image, &path).await?;
                Staged::Download(path)
            }
        };
        let result = self.verify_and_store(image, staged.path()).await;
        match (&result, &staged) {
            // A complete download with the wrong bytes is of no use to a retry; a failed
            // conversion or inspection would fail the same way again.
            (Err(ImageError::Cache { .. }), _) => {}
            (_, Staged::Download(path)) => {
                let _ = std::fs::remove_file(path);
                let _ = std::fs::remove_file(validator_path(path));
            }
            (_, Staged::Temp(_)) => {}
        }
        drop(staged);
        result
    }

    /// Hashes, checks, inspects and (converting if needed) moves the staged file into
    /// `sha256/`.
    async fn verify_and_store(
        &self,
        image: &ImageRef,
        staged: &Path,
    ) -> Result<CachedFile, ImageError> {
        let (hex, size) = {
            let path = staged.to_owned();
            tokio::task::spawn_blocking(move || hash_file(&path))
                .await
                .map_err(|e| ImageError::Invalid(format!("hash task failed: {e}")))?
                .map_err(cache_error("hashing a fetched image"))?
        };
        let checksum = format!("sha256:{hex}");
        if !image.checksum.is_empty() && image.checksum != checksum {
            return Err(ImageError::ChecksumMismatch {
                expected: image.checksum.clone(),
                actual: checksum,
            });
        }
        let info = self.inspect(staged, image.disk_format, size).await?;
        let (path, format) = match info.format.as_str() {
            "raw" | "qcow2" => {
                let path = self.path_of(&hex);
                if !path.exists() {
                    store_readonly(staged, &path)?;
                }
                (path, info.format.clone())
            }
            "vmdk" | "vdi" | "vhdx" => {
                let path = self.dir.join("sha256").join(format!("{hex}.qcow2"));
                if !path.exists() {
                    self.convert(staged, &info.format, &path).await?;
                }
                (path, "qcow2".to_owned())
            }
            other => {
                return Err(ImageError::UnknownFormat(format!(
                    "qemu-img found format {other}; Ferro boots raw and qcow2 images and \
                     converts vmdk, vdi and vhdx"
                )));
            }
        };
        Ok(CachedFile {
            path,
            checksum,
            format,
            source_format: info.format,
            size_bytes: size,
            virtual_size_bytes: info.virtual_size,
            fetched_in: None,
        })
    }

    /// Converts `from` (in `format`) to a qcow2 at `to`, through a temporary name.
    async fn convert(&self, from: &Path, format: &str, to: &Path) -> Result<(), ImageError> {
        let partial = tempfile::Builder::new()
            .prefix(".convert-")
            .suffix(".partial")
            .tempfile_in(self.dir.join("tmp"))
            .map_err(cache_error("creating a temporary file"))?
            .into_temp_path();
        let output = tokio::process::Command::new(&self.qemu_img)
            .args(["convert", "-q", "-f", format, "-O", "qcow2"])
            .arg(from)
            .arg(&*partial)
            .stdin(std::process::Stdio::null())
            .output()
            .await
            .map_err(cache_error(&format!("running {}", self.qemu_img.display())))?;
        if !output.status.success() {
            return Err(ImageError::Convert {
                format: format.to_owned(),
                stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
            });
        }
        store_readonly(&partial, to)?;
        // The file moved away; nothing is left for the guard to remove.
        let _ = partial.keep();
        Ok(())
    }

    /// Downloads `url` into `path`, resuming what is there already.
    async fn download(
        &self,
        image: &ImageRef,
        url: http::HttpUrl,
        path: &Path,
    ) -> Result<(), ImageError> {
        let fail = |reason: String| ImageError::Fetch {
            url: image.url.clone(),
            source: std::io::Error::other(reason),
        };
        let validator = validator_path(path);
        let mut url = url;
        let mut redirects = 0;
        // Reconnecting after a cut, an error or a bad answer; when these run out, the
        // fetch fails and the Image's next fetch resumes.
        let mut retries = retry::resume_download().build();
        loop {
            let have = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
            let known = std::fs::read_to_string(&validator).ok();
            let range = (have > 0).then_some(have);
            let response = match http::get(&url, range, known.as_deref()).await {
                Ok(response) => response,
                Err(e) => {
                    let Some(delay) = retries.next() else {
                        return Err(ImageError::Fetch {
                            url: image.url.clone(),
                            source: e,
                        });
                    };
                    tracing::info!(image = %image.display(), error = %e, ?delay, "download failed; retrying");
                    tokio::time::sleep(delay).await;
                    continue;
                }
            };
            let (offset, total) = match response.status() {
                200 => {
                    let total = response.content_length();
                    let tag = response
                        .header("etag")
                        .filter(|t| !t.starts_with("W/"))
                        .or_else(|| response.header("last-modified"));
                    match tag {
                        Some(tag) => std::fs::write(&validator, tag),
                        None => remove_if_exists(&validator),
                    }
                    .map_err(cache_error("recording a download's validator"))?;
                    (0, total)
                }
                206 => {
                    let range = response
                        .header("content-range")
                        .and_then(http::content_range);
                    match range {
                        Some((Some(first), total)) if first == have => (have, total),
                        _ => {
                            // Not the part asked for: start over.
                            remove_if_exists(path).map_err(cache_error("restarting a download"))?;
                            let Some(delay) = retries.next() else {
                                return Err(fail("the server sends wrong ranges".into()));
                            };
                            tokio::time::sleep(delay).await;
                            continue;
                        }
                    }
                }
                416 if have > 0 => {
                    let total = response
                        .header("content-range")
                        .and_then(http::content_range)
                        .and_then(|(_, total)| total);
                    if total == Some(have) {
                        return Ok(());
                    }
                    remove_if_exists(path).map_err(cache_error("restarting a download"))?;
                    let Some(delay) = retries.next() else {
                        return Err(fail("the server refuses every range".into()));
                    };
                    tokio::time::sleep(delay).await;
                    continue;
                }
                301 | 302 | 303 | 307 | 308 => {
                    redirects += 1;
                    let next = response.header("location").and_then(|l| url.join(l));
                    let next = match next {
                        Some(next) if redirects <= MAX_REDIRECTS => next,
                        _ => {
                            return Err(fail(format!(
                                "too many redirects, or a bad one, at {}",
                                response.status()
                            )));
                        }
                    };
                    url = match Source::parse(&next) {
                        Ok(Source::Http(next)) => next,
                        Ok(_) | Err(_) => {
                            return Err(fail(format!(
                                "redirected to {next}, which this node cannot fetch"
                            )));
                        }
                    };
                    continue;
                }
                status => {
                    let said = format!("HTTP {status} {}", response.reason());
                    if status >= 500
                        && let Some(delay) = retries.next()
                    {
                        tracing::info!(image = %image.display(), %said, ?delay, "download failed; retrying");
                        tokio::time::sleep(delay).await;
                        continue;
                    }
                    return Err(fail(said));
                }
            };
            match self.receive(image, response, path, offset, total).await {
                Ok(()) => return Ok(()),
                Err(Received::Cache(e)) => return Err(e),
                Err(Received::Cut(e)) => {
                    let Some(delay) = retries.next() else {
                        return Err(ImageError::Fetch {
                            url: image.url.clone(),
                            source: e,
                        });
                    };
                    tracing::info!(image = %image.display(), error = %e, ?delay, "download cut; resuming");
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    /// Reads an uploaded image from the apiserver into `path`, resuming what is there
    /// already.
    async fn download_uploaded(&self, image: &ImageRef, path: &Path) -> Result<(), ImageError> {
        let fail = |reason: String| ImageError::Fetch {
            url: image.url.clone(),
            source: std::io::Error::other(reason),
        };
        if image.checksum.is_empty() {
            return Err(fail(format!(
                "{} has no uploaded bytes yet (ferro image upload)",
                image.display()
            )));
        }
        let client = self
            .apiserver
            .get()
            .ok_or_else(|| ImageError::UnsupportedSource {
                url: image.url.clone(),
                reason: "this cache has no apiserver connection".into(),
            })?;
        let mut retries = retry::resume_download().build();
        loop {
            let have = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
            let error = match client
                .download_image(&image.project, &image.name, have)
                .await
            {
                Ok(stream) => match self.receive_uploaded(image, stream, path, have).await {
                    Ok(()) => return Ok(()),
                    Err(Received::Cache(e)) => return Err(e),
                    Err(Received::Cut(e)) => e,
                },
                // More staged than there is (bytes of another upload under this uid):
                // start over.
                Err(ferro_api::Error::InvalidArgument { .. }) if have > 0 => {
                    remove_if_exists(path).map_err(cache_error("restarting a download"))?;
                    continue;
                }
                Err(e) => std::io::Error::other(e.to_string()),
            };
            let Some(delay) = retries.next() else {
                return Err(ImageError::Fetch {
                    url: image.url.clone(),
                    source: error,
                });
            };
            tracing::info!(image = %image.display(), %error, ?delay, "download from the apiserver cut; resuming");
            tokio::time::sleep(delay).await;
        }
    }

    /// Writes the chunks of an uploaded image to `path` from `offset` on, reporting
    /// progress.
    async fn receive_uploaded(
        &self,
        image: &ImageRef,
        mut stream: tonic::Streaming<v1::ImageChunk>,
        path: &Path,
        offset: u64,
    ) -> Result<(), Received> {
        use tokio::io::{AsyncSeekExt, AsyncWriteExt};
        let mut file = tokio::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(offset == 0)
            .open(path)
            .await
            .map_err(|e| Received::Cache(cache_error("opening a download")(e)))?;
        file.seek(std::io::SeekFrom::Start(offset))
            .await
            .map_err(|e| Received::Cache(cache_error("resuming a download")(e)))?;
        let mut have = offset;
        let mut total = None;
        let mut reported = Instant::now();
        let result = loop {
            let chunk = match stream.message().await {
                Ok(None) => break Ok(()),
                Ok(Some(chunk)) => chunk,
                Err(status) => {
                    break Err(Received::Cut(std::io::Error::other(
                        status.message().to_owned(),
                    )));
                }
            };
            if chunk.size_bytes > 0 {
                total = Some(chunk.size_bytes);
            }
            if chunk.offset != have {
                break Err(Received::Cut(std::io::Error::other(format!(
                    "the apiserver sent bytes from {} where {have} was expected",
                    chunk.offset
                ))));
            }
            if let Err(e) = file.write_all(&chunk.data).await {
                break Err(Received::Cache(cache_error("writing a download")(e)));
            }
            have += chunk.data.len() as u64;
            if reported.elapsed() >= PROGRESS_EVERY {
                reported = Instant::now();
                self.set_downloading(image, Some(progress(&image.url, have, total)));
            }
        };
        let flushed = async {
            file.flush().await?;
            file.sync_all().await
        }
        .await;
        result?;
        flushed.map_err(|e| Received::Cache(cache_error("syncing a download")(e)))?;
        match total {
            Some(total) if total != have => Err(Received::Cut(std::io::Error::other(format!(
                "the stream ended after {have} of {total} bytes"
            )))),
            _ => Ok(()),
        }
    }

    /// Writes a response's body to `path` from `offset` on, reporting progress.
    async fn receive(
        &self,
        image: &ImageRef,
        mut response: http::Response,
        path: &Path,
        offset: u64,
        total: Option<u64>,
    ) -> Result<(), Received> {
        use tokio::io::AsyncWriteExt;
        let mut file = tokio::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(offset == 0)
            .open(path)
            .await
            .map_err(|e| Received::Cache(cache_error("opening a download")(e)))?;
        if offset > 0 {
            file.set_len(offset)
                .await
                .map_err(|e| Received::Cache(cache_error("resuming a download")(e)))?;
            use tokio::io::AsyncSeekExt;
            file.seek(std::io::SeekFrom::Start(offset))
                .await
                .map_err(|e| Received::Cache(cache_error("resuming a download")(e)))?;
        }
        let total = total.map(|t| t + offset);
        let mut have = offset;
        let mut reported = Instant::now();
        let result = loop {
            let data = match response.chunk().await {
                Ok(None) => break Ok(()),
                Ok(Some(data)) => data,
                Err(e) => break Err(Received::Cut(e)),
            };
            if let Err(e) = file.write_all(&data).await {
                break Err(Received::Cache(cache_error("writing a download")(e)));
            }
            have += data.len() as u64;
            if reported.elapsed() >= PROGRESS_EVERY {
                reported = Instant::now();
                self.set_downloading(image, Some(progress(&image.url, have, total)));
            }
        };
        let flushed = async {
            file.flush().await?;
            file.sync_all().await
        }
        .await;
        result?;
        flushed.map_err(|e| Received::Cache(cache_error("syncing a download")(e)))
    }

    /// The format and virtual size, from `qemu-img info`.
    async fn inspect(
        &self,
        path: &Path,
        declared: Option<DiskFormat>,
        size: u64,
    ) -> Result<Inspected, ImageError> {
        let declared = match declared {
            Some(DiskFormat::Raw) => Some("raw"),
            Some(DiskFormat::Qcow2) => Some("qcow2"),
            Some(DiskFormat::Vmdk) => Some("vmdk"),
            Some(DiskFormat::Vdi) => Some("vdi"),
            Some(DiskFormat::Vhdx) => Some("vhdx"),
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
            .map_err(cache_error(&format!("running {}", self.qemu_img.display())))?;
        if !output.status.success() {
            let said = String::from_utf8_lossy(&output.stderr).trim().to_owned();
            return Err(ImageError::UnknownFormat(match declared {
                Some(format) => format!("not a valid {format} image: {said}"),
                None => format!("qemu-img cannot read the image: {said}"),
            }));
        }
        let info: serde_json::Value = serde_json::from_slice(&output.stdout).map_err(|e| {
            ImageError::UnknownFormat(format!("qemu-img info printed no JSON: {e}"))
        })?;
        check_self_contained(&info, path)?;
        Ok(Inspected {
            format: info["format"].as_str().unwrap_or("raw").to_owned(),
            virtual_size: info["virtual-size"].as_u64().unwrap_or(size),
        })
    }
}

/// What `qemu-img info` said of an image.
struct Inspected {
    format: String,
    virtual_size: u64,
}

/// Refuses images whose header names other files: a backing file, a qcow2 external data
/// file, a vmdk extent that is not the image itself.
fn check_self_contained(info: &serde_json::Value, path: &Path) -> Result<(), ImageError> {
    if let Some(backing) = info.get("backing-filename").and_then(|b| b.as_str()) {
        return Err(ImageError::Invalid(format!(
            "the image names a backing file ({backing}); images must be self-contained"
        )));
    }
    let data = &info["format-specific"]["data"];
    if let Some(file) = data.get("data-file").and_then(|f| f.as_str()) {
        return Err(ImageError::Invalid(format!(
            "the image names an external data file ({file}); images must be self-contained"
        )));
    }
    if let Some(extents) = data.get("extents").and_then(|e| e.as_array()) {
        let own = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned());
        for extent in extents {
            let file = extent["filename"].as_str().unwrap_or_default();
            let same =
                std::fs::canonicalize(file).is_ok_and(|f| f == own) || Path::new(file) == path;
            if !same {
                return Err(ImageError::Invalid(format!(
                    "the image names an extent in another file ({file}); images must be \
                     self-contained"
                )));
            }
        }
    }
    Ok(())
}

/// How a download's body ended, when it did not end well.
enum Received {
    /// The connection was cut (or stalled): worth resuming.
    Cut(std::io::Error),
    /// The cache could not be written: not worth retrying now.
    Cache(ImageError),
}

fn progress(url: &str, have: u64, total: Option<u64>) -> String {
    const MIB: f64 = (1 << 20) as f64;
    match total {
        Some(total) if total > 0 => format!(
            "downloading {url}: {:.1} of {:.1} MiB ({}%)",
            have as f64 / MIB,
            total as f64 / MIB,
            have * 100 / total
        ),
        _ => format!("downloading {url}: {:.1} MiB", have as f64 / MIB),
    }
}

/// A staged fetch: a temporary copy, removed when dropped, or an HTTP download, which
/// stays for a later resume unless the fetch removes it.
enum Staged {
    Temp(tempfile::TempPath),
    Download(PathBuf),
}

impl Staged {
    fn path(&self) -> &Path {
        match self {
            Staged::Temp(path) => path,
            Staged::Download(path) => path,
        }
    }
}

fn validator_path(download: &Path) -> PathBuf {
    let mut name = download.as_os_str().to_owned();
    name.push(".validator");
    PathBuf::from(name)
}

fn remove_if_exists(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Makes `from` read-only and moves it to `to` (same filesystem).
fn store_readonly(from: &Path, to: &Path) -> Result<(), ImageError> {
    let mut perms = std::fs::metadata(from)
        .map_err(cache_error("reading a fetched file"))?
        .permissions();
    perms.set_readonly(true);
    std::fs::set_permissions(from, perms).map_err(cache_error("protecting a fetched file"))?;
    std::fs::rename(from, to).map_err(cache_error(&format!(
        "moving a fetched file to {}",
        to.display()
    )))
}

/// The sha256 (hex) and size of a file.
fn hash_file(path: &Path) -> std::io::Result<(String, u64)> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    Ok((hex(&hasher.finalize()), size))
}

/// Copies a file source into a new temporary file in `tmp` (not yet under its final
/// name, and removed when dropped).
fn copy_to_tmp(
    source: &Source,
    tmp: &Path,
    uid: &str,
    url: &str,
) -> Result<tempfile::TempPath, ImageError> {
    let Source::File(path) = source else {
        return Err(ImageError::UnsupportedSource {
            url: url.to_owned(),
            reason: "not a file".into(),
        });
    };
    let mut reader = std::fs::File::open(path).map_err(|e| ImageError::Fetch {
        url: url.to_owned(),
        source: e,
    })?;
    let mut partial = tempfile::Builder::new()
        .prefix(&format!("{uid}."))
        .suffix(".partial")
        .tempfile_in(tmp)
        .map_err(cache_error("creating a temporary file"))?;
    let mut buf = vec![0u8; 1 << 20];
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
        partial
            .write_all(&buf[..n])
            .map_err(cache_error("writing a fetched image"))?;
    }
    partial
        .as_file()
        .sync_all()
        .map_err(cache_error("syncing a fetched image"))?;
    Ok(partial.into_temp_path())
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
                checksum: record.checksum.clone(),
                format: record.file_format().to_owned(),
                source_format: record.format.clone(),
                size_bytes: record.size_bytes,
                virtual_size_bytes: record.virtual_size_bytes,
                fetched_in: None,
            });
        }
        tracing::info!(image = %image.display(), url = %image.url, "fetching image");
        self.set_downloading(image, Some(format!("fetching {}", image.url)));
        let began = std::time::Instant::now();
        let fetched = self.fetch(image).await.map(|file| CachedFile {
            fetched_in: Some(began.elapsed()),
            ..file
        });
        let record = match &fetched {
            Ok(file) => {
                let converted = file.format != file.source_format;
                Record {
                    image_uid: image.uid.clone(),
                    image: image.display(),
                    ready: true,
                    checksum: file.checksum.clone(),
                    format: file.source_format.clone(),
                    size_bytes: file.size_bytes,
                    virtual_size_bytes: file.virtual_size_bytes,
                    file: if converted {
                        file.path
                            .file_name()
                            .map(|n| n.to_string_lossy().into_owned())
                            .unwrap_or_default()
                    } else {
                        String::new()
                    },
                    file_format: file.format.clone(),
                    file_bytes: std::fs::metadata(&file.path).map(|m| m.len()).unwrap_or(0),
                    message: if converted {
                        format!("converted from {} to {}", file.source_format, file.format)
                    } else {
                        String::new()
                    },
                }
            }
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
                    file: String::new(),
                    file_format: String::new(),
                    file_bytes: 0,
                    message: format!("{}: {}", e.reason(), error_chain(e)),
                }
            }
        };
        let written = self.write_record(&record);
        self.set_downloading(image, None);
        let file = fetched?;
        written?;
        tracing::info!(image = %image.display(), checksum = %file.checksum, format = %file.source_format, "image cached");
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

    fn use_apiserver(&self, client: Client) {
        let _ = self.apiserver.set(client);
    }

    fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }
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
    fn sources_are_file_and_http_urls() {
        assert_eq!(
            Source::parse("file:///var/lib/a%20b.raw").unwrap(),
            Source::File("/var/lib/a b.raw".into())
        );
        assert_eq!(
            Source::parse("file://localhost/x").unwrap(),
            Source::File("/x".into())
        );
        assert!(matches!(
            Source::parse("http://mirror:8080/x.qcow2").unwrap(),
            Source::Http(url) if url.port() == 8080 && url.path() == "/x.qcow2"
        ));
        for url in [
            "file://relative/x",
            "https://mirror/x.qcow2",
            "http://",
            "ftp://x/y",
        ] {
            let err = Source::parse(url).unwrap_err();
            assert_eq!(err.reason(), "ImageSourceUnsupported", "{url}: {err}");
        }
        let err = Source::parse("https://mirror/x.qcow2").unwrap_err();
        assert!(
            err.to_string()
                .contains("https:// sources are not supported yet"),
            "{err}"
        );
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
        assert!(file.fetched_in.is_some());
        let again = f.cache.ensure(&img).await.unwrap();
        assert_eq!(
            again,
            CachedFile {
                fetched_in: None,
                ..file
            }
        );
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
        assert_eq!(err.reason(), "DownloadFailed");
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
        let partial = copy_to_tmp(
            &source,
            &f.dir.path().join("cache/tmp"),
            "u9",
            "file:///src",
        )
        .unwrap();
        let (hex_digest, size) = hash_file(&partial).unwrap();
        let name = partial.file_name().unwrap().to_str().unwrap().to_owned();
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
        assert_eq!(err.reason(), "UnknownImageFormat");
        assert!(err.to_string().contains("not a valid qcow2 image"), "{err}");
    }

    // -----------------------------------------------------------------------------------
    // HTTP sources, against a small server on loopback.

    /// An HTTP server on 127.0.0.1 serving one body at every path but `/missing`,
    /// honouring `Range: bytes=N-`, and able to cut its first full response short.
    struct TestHttp {
        base: String,
        /// The `Range` start of each request, in order (`None`: no Range).
        ranges: Arc<Mutex<Vec<Option<u64>>>>,
        task: tokio::task::JoinHandle<()>,
    }

    impl Drop for TestHttp {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    async fn serve(body: Vec<u8>, cut_once_after: Option<usize>) -> TestHttp {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let ranges = Arc::new(Mutex::new(Vec::new()));
        let body = Arc::new(body);
        let cut = Arc::new(std::sync::atomic::AtomicBool::new(cut_once_after.is_some()));
        let task = {
            let ranges = ranges.clone();
            tokio::spawn(async move {
                loop {
                    let Ok((mut conn, _)) = listener.accept().await else {
                        return;
                    };
                    let (body, ranges, cut) = (body.clone(), ranges.clone(), cut.clone());
                    tokio::spawn(async move {
                        let mut head = Vec::new();
                        let mut byte = [0u8; 1];
                        while !head.ends_with(b"\r\n\r\n") {
                            if conn.read(&mut byte).await.unwrap_or(0) == 0 {
                                return;
                            }
                            head.push(byte[0]);
                        }
                        let head = String::from_utf8_lossy(&head).into_owned();
                        let path = head.split(' ').nth(1).unwrap_or("/").to_owned();
                        let range = head
                            .lines()
                            .find_map(|l| l.strip_prefix("Range: bytes="))
                            .and_then(|r| r.trim_end_matches('-').parse::<u64>().ok());
                        ranges.lock().unwrap().push(range);
                        if path == "/missing" {
                            let _ = conn
                                .write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
                                .await;
                            return;
                        }
                        let len = body.len() as u64;
                        let (head, from) = match range {
                            Some(from) if from >= len => {
                                let head = format!(
                                    "HTTP/1.1 416 Range Not Satisfiable\r\nContent-Range: bytes */{len}\r\nContent-Length: 0\r\n\r\n"
                                );
                                let _ = conn.write_all(head.as_bytes()).await;
                                return;
                            }
                            Some(from) => (
                                format!(
                                    "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {from}-{}/{len}\r\nContent-Length: {}\r\nETag: \"v1\"\r\n\r\n",
                                    len - 1,
                                    len - from
                                ),
                                from as usize,
                            ),
                            None => (
                                format!(
                                    "HTTP/1.1 200 OK\r\nContent-Length: {len}\r\nETag: \"v1\"\r\n\r\n"
                                ),
                                0,
                            ),
                        };
                        let _ = conn.write_all(head.as_bytes()).await;
                        let mut end = body.len();
                        if let Some(after) = cut_once_after
                            && cut.swap(false, std::sync::atomic::Ordering::SeqCst)
                        {
                            end = (from + after).min(end);
                        }
                        let _ = conn.write_all(&body[from..end]).await;
                        let _ = conn.shutdown().await;
                    });
                }
            })
        };
        TestHttp { base, ranges, task }
    }

    fn qemu_img(args: &[&str]) {
        let output = std::process::Command::new("qemu-img")
            .args(args)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "qemu-img {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// A raw disk with recognisable, non-zero content.
    fn raw_disk(f: &Fixture, name: &str, mib: usize) -> PathBuf {
        let path = f.dir.path().join(name);
        let bytes: Vec<u8> = (0..mib << 20)
            .map(|i| (i % 251) as u8 ^ (i >> 12) as u8)
            .collect();
        std::fs::write(&path, bytes).unwrap();
        path
    }

    /// `qemu-img compare`: whether two images show a guest the same disk.
    fn same_disk(a: &Path, a_format: &str, b: &Path, b_format: &str) -> bool {
        std::process::Command::new("qemu-img")
            .args(["compare", "-q", "-f", a_format, "-F", b_format])
            .arg(a)
            .arg(b)
            .status()
            .unwrap()
            .success()
    }

    #[tokio::test]
    async fn an_http_download_cut_midway_resumes_then_a_vmdk_is_converted() {
        let f = fixture();
        let raw = raw_disk(&f, "disk.raw", 4);
        let vmdk = f.dir.path().join("disk.vmdk");
        qemu_img(&[
            "convert",
            "-q",
            "-f",
            "raw",
            "-O",
            "vmdk",
            raw.to_str().unwrap(),
            vmdk.to_str().unwrap(),
        ]);
        let bytes = std::fs::read(&vmdk).unwrap();
        let cut = bytes.len() / 3;
        let server = serve(bytes.clone(), Some(cut)).await;
        let url = format!("{}/images/disk.vmdk", server.base);
        let img = image("u1", url.clone(), sha256_of(&bytes), None);

        let file = f.cache.ensure(&img).await.unwrap();
        // The first response was cut; the second asked for the rest only.
        assert_eq!(*server.ranges.lock().unwrap(), [None, Some(cut as u64)]);
        assert_eq!(file.checksum, sha256_of(&bytes));
        assert_eq!(file.size_bytes, bytes.len() as u64);
        assert_eq!(
            (file.source_format.as_str(), file.format.as_str()),
            ("vmdk", "qcow2")
        );
        assert_eq!(file.virtual_size_bytes, 4 << 20);
        assert!(
            file.path.to_str().unwrap().ends_with(".qcow2"),
            "{}",
            file.path.display()
        );
        assert!(
            same_disk(&raw, "raw", &file.path, "qcow2"),
            "the converted disk differs"
        );
        assert!(f.tmp_entries().is_empty(), "{:?}", f.tmp_entries());

        let report = f.cache.report();
        assert_eq!(report[0].phase, Phase::Ready as i32);
        assert_eq!(report[0].format, "vmdk");
        assert_eq!(report[0].checksum, sha256_of(&bytes));
        assert_eq!(report[0].message, "converted from vmdk to qcow2");
        // Answered from the record from now on, with the converted file.
        drop(server);
        let again = f.cache.ensure(&img).await.unwrap();
        assert_eq!(
            again,
            CachedFile {
                fetched_in: None,
                ..file
            }
        );
    }

    #[tokio::test]
    async fn a_download_left_by_a_restart_is_resumed_not_restarted() {
        let f = fixture();
        let bytes: Vec<u8> = (0..(2usize << 20)).map(|i| (i % 253) as u8).collect();
        let server = serve(bytes.clone(), None).await;
        let url = format!("{}/disk.raw", server.base);
        let half = bytes.len() / 2;
        let staged = f.cache.download_path("u1", &url);
        std::fs::write(&staged, &bytes[..half]).unwrap();
        std::fs::write(validator_path(&staged), "\"v1\"").unwrap();
        // Reopening the cache (an agent restart) keeps the staged download.
        let cache = FileImageCache::open(f.dir.path().join("cache"), "qemu-img").unwrap();
        assert!(staged.exists());

        let file = cache
            .ensure(&image("u1", url, sha256_of(&bytes), Some(DiskFormat::Raw)))
            .await
            .unwrap();
        assert_eq!(*server.ranges.lock().unwrap(), [Some(half as u64)]);
        assert_eq!(std::fs::read(&file.path).unwrap(), bytes);
        assert_eq!(file.format, "raw");
        assert!(!staged.exists() && !validator_path(&staged).exists());
    }

    #[tokio::test]
    async fn vdi_and_vhdx_are_converted_and_unknown_formats_refused() {
        let f = fixture();
        let raw = raw_disk(&f, "disk.raw", 2);
        for (i, format) in ["vdi", "vhdx"].into_iter().enumerate() {
            let path = f.dir.path().join(format!("disk.{format}"));
            qemu_img(&[
                "convert",
                "-q",
                "-f",
                "raw",
                "-O",
                format,
                raw.to_str().unwrap(),
                path.to_str().unwrap(),
            ]);
            let url = format!("file://{}", path.display());
            let file = f
                .cache
                .ensure(&image(&format!("u{i}"), url, String::new(), None))
                .await
                .unwrap();
            assert_eq!(
                (file.source_format.as_str(), file.format.as_str()),
                (format, "qcow2")
            );
            assert!(
                same_disk(&raw, "raw", &file.path, "qcow2"),
                "{format} differs"
            );
        }
        // A format qemu-img knows but Ferro does not convert.
        let qed = f.dir.path().join("disk.qed");
        qemu_img(&["create", "-q", "-f", "qed", qed.to_str().unwrap(), "1M"]);
        let err = f
            .cache
            .ensure(&image(
                "u7",
                format!("file://{}", qed.display()),
                String::new(),
                None,
            ))
            .await
            .unwrap_err();
        assert_eq!(err.reason(), "UnknownImageFormat", "{err}");
        assert!(err.to_string().contains("format qed"), "{err}");
        // Bytes that are not the declared format.
        let url = format!("file://{}", raw.display());
        let err = f
            .cache
            .ensure(&image("u8", url, String::new(), Some(DiskFormat::Vmdk)))
            .await
            .unwrap_err();
        assert_eq!(err.reason(), "UnknownImageFormat", "{err}");
        let failed = f
            .cache
            .report()
            .into_iter()
            .find(|r| r.image_uid == "u8")
            .unwrap();
        assert!(
            failed.message.starts_with("UnknownImageFormat: "),
            "{}",
            failed.message
        );
        assert!(f.tmp_entries().is_empty(), "{:?}", f.tmp_entries());
    }

    #[tokio::test]
    async fn a_vmdk_naming_another_file_is_refused() {
        let f = fixture();
        let secret = raw_disk(&f, "host-secret.raw", 1);
        let descriptor = format!(
            "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n\
             createType=\"monolithicFlat\"\nRW 2048 FLAT \"{}\" 0\n",
            secret.display()
        );
        let url = f.source("evil.vmdk", descriptor.as_bytes());
        let err = f
            .cache
            .ensure(&image("u1", url, String::new(), None))
            .await
            .unwrap_err();
        assert_eq!(err.reason(), "ImageInvalid", "{err}");
        assert!(err.to_string().contains("another file"), "{err}");
    }

    #[tokio::test]
    async fn a_wrong_checksum_or_a_missing_file_over_http_fails_with_its_reason() {
        let f = fixture();
        let bytes = vec![1u8; 100_000];
        let server = serve(bytes.clone(), None).await;
        let url = format!("{}/disk.raw", server.base);
        let wrong = sha256_of(b"other bytes");
        let err = f
            .cache
            .ensure(&image("u1", url.clone(), wrong, None))
            .await
            .unwrap_err();
        assert_eq!(err.reason(), "ImageChecksumMismatch");
        assert!(err.to_string().contains(&sha256_of(&bytes)), "{err}");
        // Nothing is kept: a retry downloads afresh.
        assert!(!f.cache.download_path("u1", &url).exists());
        assert!(f.tmp_entries().is_empty(), "{:?}", f.tmp_entries());

        let err = f
            .cache
            .ensure(&image(
                "u2",
                format!("{}/missing", server.base),
                String::new(),
                None,
            ))
            .await
            .unwrap_err();
        assert_eq!(err.reason(), "DownloadFailed");
        assert!(
            error_chain(&err).contains("HTTP 404 Not Found"),
            "{}",
            error_chain(&err)
        );
        let report = f.cache.report();
        assert!(
            report[1].message.starts_with("DownloadFailed: "),
            "{report:?}"
        );
        assert!(
            report[0].message.starts_with("ImageChecksumMismatch: "),
            "{report:?}"
        );
    }
}

#[cfg(test)]
mod upload_tests {
    //! Uploaded images fetched from a real apiserver (in process, on loopback, with the
    //! in-memory store and an image store in a temporary directory).

    use std::sync::Arc;

    use ferro_api::{auth::Tokens, imagestore::ImageStore, server::ApiServer};

    use super::*;

    async fn apiserver(dir: &Path) -> (Client, Client, tokio::sync::oneshot::Sender<()>) {
        let store = Arc::new(ImageStore::open(dir.join("image-store")).unwrap());
        let server = ApiServer::new(
            Arc::new(ferro_store::memory::MemoryStore::new()),
            Tokens::parse("admin-token admin\nnode-token system:node:n1\n"),
        )
        .with_image_store(store);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(server.serve(listener, async {
            let _ = stopped.await;
        }));
        (
            Client::connect_lazy(&address, "admin-token").unwrap(),
            Client::connect_lazy(&address, "node-token").unwrap(),
            stop,
        )
    }

    async fn upload(admin: &Client, name: &str, bytes: &[u8]) -> ImageRef {
        let parts: Vec<Vec<u8>> = bytes.chunks(1 << 20).map(<[u8]>::to_vec).collect();
        let object = admin
            .upload_image(
                v1::UploadTarget {
                    project: "p".into(),
                    name: name.into(),
                    disk_format: Some(DiskFormat::Raw as i32),
                    ..Default::default()
                },
                futures::stream::iter(parts),
            )
            .await
            .unwrap();
        let ferro_api::Object::Image(image) = object else {
            panic!("an upload returns its Image")
        };
        ImageRef::of(&image)
    }

    #[tokio::test]
    async fn uploaded_images_are_read_from_the_apiserver_and_resume_from_a_staged_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let (admin, node, _stop) = apiserver(dir.path()).await;
        let cache = FileImageCache::open(dir.path().join("cache"), "qemu-img").unwrap();
        let bytes: Vec<u8> = (0..(3usize << 20) + 99).map(|i| (i % 251) as u8).collect();
        let disk = upload(&admin, "disk", &bytes).await;
        assert_eq!(disk.url, UPLOAD_URL);
        assert_eq!(
            disk.checksum,
            format!("sha256:{}", hex(&Sha256::digest(&bytes)))
        );

        // Without the agent's connection the cache cannot fetch it, and says so.
        let refused = cache.ensure(&disk).await.unwrap_err();
        assert_eq!(refused.reason(), "ImageSourceUnsupported", "{refused}");

        cache.use_apiserver(node);
        let file = cache.ensure(&disk).await.unwrap();
        assert_eq!(file.format, "raw");
        assert_eq!(file.size_bytes, bytes.len() as u64);
        assert!(std::fs::read(&file.path).unwrap() == bytes);

        // A fetch cut midway (a staged prefix, as an agent restart leaves it) goes on from
        // where it stopped: a staged prefix of the wrong bytes is kept, not fetched again,
        // so the checksum catches it.
        let other: Vec<u8> = bytes.iter().map(|b| b.wrapping_add(1)).collect();
        let mut resumed = upload(&admin, "resumed", &other).await;
        let mut corrupt = upload(&admin, "corrupt", &[&other[..], b"x"].concat()).await;
        resumed.uid = "u-resumed".into();
        corrupt.uid = "u-corrupt".into();
        let half = other.len() / 2;
        std::fs::write(
            cache.download_path(&resumed.uid, UPLOAD_URL),
            &other[..half],
        )
        .unwrap();
        std::fs::write(
            cache.download_path(&corrupt.uid, UPLOAD_URL),
            &bytes[..half],
        )
        .unwrap();
        let file = cache.ensure(&resumed).await.unwrap();
        assert!(std::fs::read(&file.path).unwrap() == other);
        let mismatch = cache.ensure(&corrupt).await.unwrap_err();
        assert_eq!(mismatch.reason(), "ImageChecksumMismatch", "{mismatch}");

        // An Image with no uploaded bytes yet fails at once, naming the command.
        let pending = ImageRef {
            checksum: String::new(),
            uid: "u-pending".into(),
            ..disk
        };
        let error = cache.ensure(&pending).await.unwrap_err();
        assert!(
            error_chain(&error).contains("ferro image upload"),
            "{}",
            error_chain(&error)
        );
    }
}
