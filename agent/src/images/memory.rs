//! An in-memory [`ImageCache`] with the real cache's behaviour, for reconciler tests that
//! run without `qemu-img` or files.
//!
//! The test fills a table of sources by URL ([`MemoryImageCache::add_source`] with bytes,
//! [`MemoryImageCache::add_sized_source`] with a size and checksum only). [`ImageCache::ensure`]
//! then behaves as [`super::FileImageCache`] does: an Image already cached is answered
//! from its record without fetching; otherwise the source is "fetched" — a URL the table
//! lacks fails as a missing file does (`DownloadFailed`), a `spec.checksum` the bytes do
//! not match fails with `ImageChecksumMismatch`, a declared `diskFormat` that is not the
//! source's fails with `UnknownImageFormat`, vmdk, vdi and vhdx are "converted" to qcow2 —
//! and what was found, success or failure, is recorded for [`ImageCache::report`] with
//! the same phases and messages, and [`ImageCache::changes`] moves.
//!
//! [`MemoryImageCache::fail_next`] makes the next fetches of a URL fail (not found,
//! checksum mismatch, download failed) whatever the table says, and
//! [`MemoryImageCache::fetches`] lists the fetches made, so tests can tell a cached answer
//! from a new download. Paths are under [`CACHE_DIR`], which does not exist: the
//! hypervisor double never opens them.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};

use ferro_api::v1;
use ferro_api::v1::cached_image::Phase;
use ferro_api::v1::image_spec::DiskFormat;
use sha2::{Digest, Sha256};

use super::{CachedFile, ImageCache, ImageError, ImageRef, error_chain, hex};

/// Where the double's (never created) cached files are said to live.
pub const CACHE_DIR: &str = "/nonexistent/ferro-memory-images";

/// An image source in the test's table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceImage {
    /// The sha256 of its bytes, `sha256:<hex>`.
    pub checksum: String,
    /// The size of its bytes.
    pub size_bytes: u64,
    /// Its format as `qemu-img` would find it: `raw`, `qcow2`, `vmdk`, `iso`, ….
    pub format: String,
    /// The disk size a guest sees.
    pub virtual_size_bytes: u64,
}

/// A fetch failure to inject.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FetchFault {
    /// The source is not there (a missing file, an HTTP 404): `DownloadFailed`.
    NotFound,
    /// The bytes fetched hash to this checksum, not the Image's: `ImageChecksumMismatch`
    /// (only when the Image has a `spec.checksum`; otherwise the fetch succeeds).
    ChecksumMismatch(String),
    /// The download fails with this message: `DownloadFailed`.
    DownloadFailed(String),
}

/// What was found for one Image, as the real cache records it.
#[derive(Debug, Clone)]
struct Record {
    image: String,
    result: Result<CachedFile, String>,
    /// The cached file is still there (see [`MemoryImageCache::remove_file`]).
    present: bool,
}

#[derive(Debug, Default)]
struct State {
    sources: BTreeMap<String, SourceImage>,
    /// Pending faults by URL, with how many fetches they still hit.
    faults: BTreeMap<String, Vec<(FetchFault, u32)>>,
    records: BTreeMap<String, Record>,
    /// The uids of the Images fetched, in order.
    fetches: Vec<String>,
}

/// An in-memory image cache; see the module notes.
#[derive(Debug)]
pub struct MemoryImageCache {
    state: Mutex<State>,
    changed: tokio::sync::watch::Sender<u64>,
}

impl Default for MemoryImageCache {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryImageCache {
    /// An empty cache with no sources.
    pub fn new() -> Self {
        MemoryImageCache {
            state: Mutex::new(State::default()),
            changed: tokio::sync::watch::channel(0).0,
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("memory image cache poisoned")
    }

    /// Serves `bytes` at `url`, in `format` (`raw`, `qcow2`, `vmdk`, …), their length
    /// being the virtual size. Returns their checksum, for `spec.checksum`.
    pub fn add_source(&self, url: &str, bytes: &[u8], format: &str) -> String {
        let checksum = format!("sha256:{}", hex(&Sha256::digest(bytes)));
        self.add_sized_source(
            url,
            SourceImage {
                checksum: checksum.clone(),
                size_bytes: bytes.len() as u64,
                format: format.to_owned(),
                virtual_size_bytes: bytes.len() as u64,
            },
        );
        checksum
    }

    /// Serves an image known only by its size and checksum at `url`.
    pub fn add_sized_source(&self, url: &str, source: SourceImage) {
        self.state().sources.insert(url.to_owned(), source);
    }

    /// Stops serving `url`: later fetches fail as a missing file does.
    pub fn remove_source(&self, url: &str) {
        self.state().sources.remove(url);
    }

    /// Makes the next `times` fetches of `url` fail with `fault`. An Image already
    /// cached is not fetched, so a fault does not touch it.
    pub fn fail_next(&self, url: &str, fault: FetchFault, times: u32) {
        if times > 0 {
            self.state()
                .faults
                .entry(url.to_owned())
                .or_default()
                .push((fault, times));
        }
    }

    /// Drops every pending fault.
    pub fn clear_faults(&self) {
        self.state().faults.clear();
    }

    /// The uids of the Images fetched (not answered from a record), oldest first.
    pub fn fetches(&self) -> Vec<String> {
        self.state().fetches.clone()
    }

    /// The cached file of an Image disappears from the node (removed by hand, a disk
    /// replaced): the report says so and the next `ensure` fetches it again.
    pub fn remove_file(&self, image_uid: &str) {
        if let Some(record) = self.state().records.get_mut(image_uid) {
            record.present = false;
        }
        self.changed.send_modify(|n| *n += 1);
    }

    fn take_fault(&self, url: &str) -> Option<FetchFault> {
        let mut state = self.state();
        let faults = state.faults.get_mut(url)?;
        let (fault, remaining) = faults.first_mut()?;
        let fault = fault.clone();
        *remaining -= 1;
        if *remaining == 0 {
            faults.remove(0);
        }
        if faults.is_empty() {
            state.faults.remove(url);
        }
        Some(fault)
    }

    fn fetch(&self, image: &ImageRef) -> Result<CachedFile, ImageError> {
        let fetch_error = |source: std::io::Error| ImageError::Fetch {
            url: image.url.clone(),
            source,
        };
        let mut source = match self.state().sources.get(&image.url) {
            Some(source) => source.clone(),
            None => {
                return Err(fetch_error(std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "No such file or directory (os error 2)",
                )));
            }
        };
        match self.take_fault(&image.url) {
            None => {}
            Some(FetchFault::NotFound) => {
                return Err(fetch_error(std::io::Error::other("HTTP 404 Not Found")));
            }
            Some(FetchFault::DownloadFailed(message)) => {
                return Err(fetch_error(std::io::Error::other(message)));
            }
            Some(FetchFault::ChecksumMismatch(actual)) => source.checksum = actual,
        }
        if !image.checksum.is_empty() && image.checksum != source.checksum {
            return Err(ImageError::ChecksumMismatch {
                expected: image.checksum.clone(),
                actual: source.checksum,
            });
        }
        let declared = match image.disk_format {
            Some(DiskFormat::Raw) => Some("raw"),
            Some(DiskFormat::Qcow2) => Some("qcow2"),
            Some(DiskFormat::Vmdk) => Some("vmdk"),
            Some(DiskFormat::Vdi) => Some("vdi"),
            Some(DiskFormat::Vhdx) => Some("vhdx"),
            _ => None,
        };
        if let Some(declared) = declared
            && declared != source.format
        {
            return Err(ImageError::UnknownFormat(format!(
                "not a valid {declared} image: the image is {}",
                source.format
            )));
        }
        let hex = source
            .checksum
            .strip_prefix("sha256:")
            .unwrap_or(&source.checksum)
            .to_owned();
        let dir = PathBuf::from(CACHE_DIR).join("sha256");
        let (path, format) = match source.format.as_str() {
            "raw" | "qcow2" => (dir.join(&hex), source.format.clone()),
            "vmdk" | "vdi" | "vhdx" => (dir.join(format!("{hex}.qcow2")), "qcow2".to_owned()),
            other => {
                return Err(ImageError::UnknownFormat(format!(
                    "qemu-img found format {other}; Ferro boots raw and qcow2 images and \
                     converts vmdk, vdi and vhdx"
                )));
            }
        };
        Ok(CachedFile {
            path,
            checksum: source.checksum.clone(),
            format,
            source_format: source.format.clone(),
            size_bytes: source.size_bytes,
            virtual_size_bytes: source.virtual_size_bytes,
            fetched_in: Some(std::time::Duration::ZERO),
        })
    }
}

#[async_trait::async_trait]
impl ImageCache for MemoryImageCache {
    async fn ensure(&self, image: &ImageRef) -> Result<CachedFile, ImageError> {
        if let Some(Record {
            result: Ok(file),
            present: true,
            ..
        }) = self.state().records.get(&image.uid)
        {
            return Ok(CachedFile {
                fetched_in: None,
                ..file.clone()
            });
        }
        self.state().fetches.push(image.uid.clone());
        self.changed.send_modify(|n| *n += 1);
        let fetched = self.fetch(image);
        let record = Record {
            image: format!("{}/{}", image.project, image.name),
            result: fetched
                .as_ref()
                .map(Clone::clone)
                .map_err(|e| format!("{}: {}", e.reason(), error_chain(e))),
            present: true,
        };
        self.state().records.insert(image.uid.clone(), record);
        self.changed.send_modify(|n| *n += 1);
        fetched
    }

    fn report(&self) -> Vec<v1::CachedImage> {
        self.state()
            .records
            .iter()
            .map(|(uid, record)| {
                let mut entry = v1::CachedImage {
                    image_uid: uid.clone(),
                    image: record.image.clone(),
                    ..Default::default()
                };
                match &record.result {
                    Ok(file) => {
                        entry.checksum = file.checksum.clone();
                        entry.format = file.source_format.clone();
                        entry.size_bytes = file.size_bytes;
                        entry.virtual_size_bytes = file.virtual_size_bytes;
                        if !record.present {
                            entry.phase = Phase::Failed as i32;
                            entry.message = "the cached file is gone; it is fetched again when \
                                             a guest needs it"
                                .to_owned();
                        } else {
                            entry.phase = Phase::Ready as i32;
                            if file.format != file.source_format {
                                entry.message = format!(
                                    "converted from {} to {}",
                                    file.source_format, file.format
                                );
                            }
                        }
                    }
                    Err(message) => {
                        entry.phase = Phase::Failed as i32;
                        entry.message = message.clone();
                    }
                }
                entry
            })
            .collect()
    }

    fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const URL: &str = "file:///images/tiny.raw";

    fn image(uid: &str, url: &str, checksum: &str, format: Option<DiskFormat>) -> ImageRef {
        ImageRef {
            uid: uid.into(),
            project: "p".into(),
            name: format!("img-{uid}"),
            url: url.into(),
            checksum: checksum.into(),
            disk_format: format,
        }
    }

    #[tokio::test]
    async fn a_source_is_fetched_once_then_answered_from_its_record() {
        let cache = MemoryImageCache::new();
        let changes = cache.changes();
        let checksum = cache.add_source(URL, b"disk bytes", "raw");
        let img = image("u1", URL, &checksum, Some(DiskFormat::Raw));
        let file = cache.ensure(&img).await.unwrap();
        assert_eq!(file.checksum, checksum);
        assert_eq!((file.format.as_str(), file.size_bytes), ("raw", 10));
        assert!(
            file.path
                .ends_with(checksum.strip_prefix("sha256:").unwrap())
        );
        assert!(changes.has_changed().unwrap());
        // Fetched the first time; answered from the record, as such, the second.
        assert!(file.fetched_in.is_some());
        let again = cache.ensure(&img).await.unwrap();
        assert_eq!(again.fetched_in, None);
        assert_eq!(
            again,
            CachedFile {
                fetched_in: None,
                ..file
            }
        );
        assert_eq!(cache.fetches(), ["u1"]);

        let report = cache.report();
        assert_eq!(report.len(), 1);
        assert_eq!(report[0].phase, Phase::Ready as i32);
        assert_eq!(report[0].image, "p/img-u1");
        assert_eq!(report[0].checksum, checksum);

        // A file removed from the node is reported, and fetched again when needed.
        cache.remove_file("u1");
        assert_eq!(cache.report()[0].phase, Phase::Failed as i32);
        cache.ensure(&img).await.unwrap();
        assert_eq!(cache.fetches(), ["u1", "u1"]);
        assert_eq!(cache.report()[0].phase, Phase::Ready as i32);
    }

    #[tokio::test]
    async fn failures_carry_the_real_caches_reasons_and_are_retried() {
        let cache = MemoryImageCache::new();
        let missing = image("u1", "file:///images/none.raw", "", None);
        let err = cache.ensure(&missing).await.unwrap_err();
        assert_eq!(err.reason(), "DownloadFailed");
        assert!(error_chain(&err).contains("No such file"), "{err}");

        let checksum = cache.add_source(URL, b"disk bytes", "raw");
        let wrong = image("u2", URL, "sha256:00", None);
        assert_eq!(
            cache.ensure(&wrong).await.unwrap_err().reason(),
            "ImageChecksumMismatch"
        );
        let declared_qcow2 = image("u3", URL, &checksum, Some(DiskFormat::Qcow2));
        assert_eq!(
            cache.ensure(&declared_qcow2).await.unwrap_err().reason(),
            "UnknownImageFormat"
        );

        let img = image("u4", URL, &checksum, None);
        cache.fail_next(
            URL,
            FetchFault::DownloadFailed("connection reset".into()),
            2,
        );
        cache.fail_next(URL, FetchFault::ChecksumMismatch("sha256:ff".into()), 1);
        cache.fail_next(URL, FetchFault::NotFound, 1);
        for reason in [
            "DownloadFailed",
            "DownloadFailed",
            "ImageChecksumMismatch",
            "DownloadFailed",
        ] {
            assert_eq!(cache.ensure(&img).await.unwrap_err().reason(), reason);
        }
        let report = cache.report();
        assert!(
            report[3].message.starts_with("DownloadFailed: downloading"),
            "{report:?}"
        );
        assert!(report[0].message.starts_with("DownloadFailed: "));
        assert!(report[1].message.starts_with("ImageChecksumMismatch: "));
        assert!(report[2].message.starts_with("UnknownImageFormat: "));
        // The faults are used up: the next fetch succeeds and replaces the failure.
        cache.ensure(&img).await.unwrap();
        assert_eq!(cache.report()[3].phase, Phase::Ready as i32);

        cache.fail_next(URL, FetchFault::NotFound, 5);
        cache.clear_faults();
        cache.ensure(&image("u5", URL, "", None)).await.unwrap();
    }

    #[tokio::test]
    async fn vmdk_is_converted_and_other_formats_are_refused() {
        let cache = MemoryImageCache::new();
        cache.add_sized_source(
            "http://images/big.vmdk",
            SourceImage {
                checksum: "sha256:abcd".into(),
                size_bytes: 1 << 20,
                format: "vmdk".into(),
                virtual_size_bytes: 1 << 30,
            },
        );
        let file = cache
            .ensure(&image("u1", "http://images/big.vmdk", "", None))
            .await
            .unwrap();
        assert_eq!(
            (file.format.as_str(), file.source_format.as_str()),
            ("qcow2", "vmdk")
        );
        assert!(file.path.ends_with("abcd.qcow2"));
        assert_eq!(file.virtual_size_bytes, 1 << 30);
        assert_eq!(cache.report()[0].message, "converted from vmdk to qcow2");

        cache.add_source("file:///images/x.qed", b"qed", "qed");
        let err = cache
            .ensure(&image("u2", "file:///images/x.qed", "", None))
            .await
            .unwrap_err();
        assert_eq!(err.reason(), "UnknownImageFormat");
        cache.remove_source("file:///images/x.qed");
        let err = cache
            .ensure(&image("u2", "file:///images/x.qed", "", None))
            .await
            .unwrap_err();
        assert_eq!(err.reason(), "DownloadFailed");
    }
}
