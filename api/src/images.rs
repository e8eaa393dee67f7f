//! The Images gRPC service: uploads into the apiserver's [`ImageStore`] and ranged
//! downloads out of it.
//!
//! An Image whose `spec.source.url` is [`UPLOAD_URL`] (`ferro://upload`) gets its bytes
//! from an upload rather than from a URL the nodes fetch. `spec` stays what the user
//! declared (source, format, kernel, …) and can be applied from a manifest before or after
//! the upload; the bytes are named by `status.uploaded`, written once by the apiserver as
//! writer [`owners::IMAGE_STORE`] when an upload completes: checksum, size, the format
//! detected from the header, and the virtual size when the header says it. The image
//! controller turns that into `phase: Active` and `Ready`.
//!
//! An upload:
//! 1. reads the first message's [`v1::UploadTarget`]; when the Image exists, the caller
//!    must be allowed to update it and it must take uploads; when it does not, a dry-run
//!    create checks that the caller may create it — all before any byte is read;
//! 2. streams the bytes into the store's writer (hashing as they come, memory bounded by a
//!    few chunks) and checks the header's format against the declared one as soon as it
//!    has [`format::HEADER_BYTES`];
//! 3. at the end checks the size and checksum (a mismatch names both checksums and stores
//!    nothing), stores the bytes under their sha256, creates the Image when it did not
//!    exist, and records `status.uploaded`.
//!
//! A stream that ends early or fails leaves nothing; sending the same bytes again
//! completes the upload (an Image that already holds exactly those bytes answers at once;
//! one that holds other bytes refuses them: an Image's bytes never change).
//!
//! Nodes read the bytes with `Download` from an offset, so a cut fetch resumes where it
//! stopped; who may read the Image may read its bytes. [`run_image_collector`] removes
//! bytes no Image names any more, which is how deleting an Image frees its bytes.

use std::collections::HashSet;
use std::io::Read;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status, Streaming};

use crate::imagestore::format::{self, Detected};
use crate::imagestore::{CHUNK_BYTES, ImageStore, is_sha256_hex};
use crate::{
    Error, Kind, Object, auth,
    auth::{Identity, Verb},
    owners,
    server::{ApiServer, DEFAULT_PROJECT, object_response},
    v1::{self, image_spec::DiskFormat},
};

/// The `spec.source.url` of an Image whose bytes are uploaded through the API.
pub const UPLOAD_URL: &str = "ferro://upload";

/// How often [`run_image_collector`] looks for bytes no Image names.
pub const COLLECT_EVERY: Duration = Duration::from_secs(60);

type ChunkStream = Pin<Box<dyn Stream<Item = Result<v1::ImageChunk, Status>> + Send>>;

/// The identity the apiserver acts as when it records what its store found: the caller's
/// own permission was checked on the Image already.
fn apiserver_identity() -> Identity {
    Identity {
        name: auth::CONTROLLERS.to_owned(),
    }
}

impl ApiServer {
    /// The Images gRPC service (uploads and downloads), sharing this server's state.
    pub fn images_service(&self) -> v1::images_server::ImagesServer<ApiServer> {
        v1::images_server::ImagesServer::new(self.clone())
            .max_decoding_message_size(self.limits().max_request_bytes)
            .max_encoding_message_size(self.limits().max_response_bytes)
    }

    fn store_or_refuse(&self) -> Result<Arc<ImageStore>, Error> {
        self.image_store()
            .cloned()
            .ok_or_else(|| Error::FailedPrecondition {
                object: "images".into(),
                message: "this apiserver keeps no image store; start it with --image-store".into(),
            })
    }

    async fn do_upload(
        &self,
        who: &Identity,
        mut inbound: Streaming<v1::UploadImageRequest>,
    ) -> Result<Object, Error> {
        let store = self.store_or_refuse()?;
        let first = inbound
            .message()
            .await
            .map_err(cut)?
            .ok_or_else(|| Error::invalid("", "target", "the upload sent nothing"))?;
        let target = first
            .target
            .ok_or_else(|| Error::invalid("", "target", "the first message must name the image"))?;
        let project = if target.project.is_empty() {
            DEFAULT_PROJECT.to_owned()
        } else {
            target.project.clone()
        };
        let display = format!("images/{}", target.name);
        let declared_checksum = target.checksum.trim().to_ascii_lowercase();
        if !declared_checksum.is_empty()
            && !declared_checksum
                .strip_prefix("sha256:")
                .is_some_and(is_sha256_hex)
        {
            return Err(Error::invalid(
                &display,
                "checksum",
                "must be sha256:<64 hex digits>",
            ));
        }
        let mut declared_format = target
            .disk_format
            .map(|f| {
                DiskFormat::try_from(f).map_err(|_| {
                    Error::invalid(&display, "diskFormat", format!("unknown value {f}"))
                })
            })
            .transpose()?
            .filter(|f| *f != DiskFormat::Unspecified);

        // Everything that can refuse the upload is checked before a byte is read.
        let existing = match self.get_object(Kind::Image, &project, &target.name).await {
            Ok(Object::Image(image)) => Some(image),
            Ok(_) => unreachable!("an Image key reads an Image"),
            Err(Error::NotFound { .. }) => None,
            Err(e) => return Err(e),
        };
        let mut expected = declared_checksum.clone();
        let mut already = None;
        match &existing {
            Some(image) => {
                self.authorize(
                    who,
                    &auth::Request::new(Verb::Update, Kind::Image, &target.name),
                )?;
                let spec = image.spec.clone().unwrap_or_default();
                let url = spec.source.map(|s| s.url).unwrap_or_default();
                if url != UPLOAD_URL {
                    return Err(Error::FailedPrecondition {
                        object: display,
                        message: format!(
                            "fetches its bytes from {url}; only an Image with source \
                             {UPLOAD_URL} takes uploads"
                        ),
                    });
                }
                if image
                    .metadata
                    .as_ref()
                    .is_some_and(|m| m.deletion_timestamp.is_some())
                {
                    return Err(Error::FailedPrecondition {
                        object: display,
                        message: "is being deleted".into(),
                    });
                }
                if !spec.checksum.is_empty() {
                    if !expected.is_empty() && expected != spec.checksum {
                        return Err(Error::invalid(
                            &display,
                            "checksum",
                            format!(
                                "declared {expected}, but spec.checksum is {}",
                                spec.checksum
                            ),
                        ));
                    }
                    expected = spec.checksum.clone();
                }
                let spec_format = spec
                    .disk_format
                    .and_then(|f| DiskFormat::try_from(f).ok())
                    .filter(|f| *f != DiskFormat::Unspecified);
                match (declared_format, spec_format) {
                    (Some(d), Some(s)) if d != s => {
                        return Err(Error::invalid(
                            &display,
                            "diskFormat",
                            format!(
                                "declared {}, but spec.diskFormat is {}",
                                d.as_str_name(),
                                s.as_str_name()
                            ),
                        ));
                    }
                    (None, Some(s)) => declared_format = Some(s),
                    _ => {}
                }
                already = image.status.as_ref().and_then(|s| s.uploaded.clone());
            }
            None => {
                self.do_create(
                    who,
                    v1::CreateRequest {
                        object: Some(
                            new_image(&project, &target.name, &declared_checksum, declared_format)
                                .into(),
                        ),
                        dry_run: true,
                    },
                )
                .await?;
            }
        }

        // The bytes.
        let mut upload = store.begin().map_err(Error::internal)?;
        let mut header: Vec<u8> = Vec::new();
        let mut detected: Option<(Detected, &'static str)> = None;
        let check_header = |header: &[u8]| {
            let found = format::detect(header);
            found
                .accept(declared_format)
                .map(|name| (found, name))
                .map_err(|reason| Error::invalid(&display, "diskFormat", reason))
        };
        let mut next = Some(first.data);
        loop {
            let data = match next.take() {
                Some(data) => data,
                None => match inbound.message().await.map_err(cut)? {
                    Some(message) => message.data,
                    None => break,
                },
            };
            if detected.is_none() && header.len() < format::HEADER_BYTES {
                let wanted = format::HEADER_BYTES - header.len();
                header.extend_from_slice(&data[..wanted.min(data.len())]);
                if header.len() >= format::HEADER_BYTES {
                    detected = Some(check_header(&header)?);
                }
            }
            upload.write(data).await.map_err(Error::internal)?;
        }
        let (found, format_name) = match detected {
            Some(found) => found,
            None => check_header(&header)?,
        };
        if upload.size() == 0 {
            return Err(Error::invalid(
                &display,
                "data",
                "the upload carried no bytes",
            ));
        }
        if let Some(size) = target.size_bytes
            && size != upload.size()
        {
            return Err(Error::invalid(
                &display,
                "sizeBytes",
                format!(
                    "the upload ended after {} of the {size} bytes declared",
                    upload.size()
                ),
            ));
        }
        let finished = upload.finish().await.map_err(Error::internal)?;
        let actual = finished.stored().checksum();
        if !expected.is_empty() && expected != actual {
            return Err(Error::invalid(
                &display,
                "checksum",
                format!("mismatch: declared {expected}, but the bytes are {actual}"),
            ));
        }
        if let Some(uploaded) = &already {
            if uploaded.checksum == actual {
                // A retry of an upload that completed: nothing to store or record.
                drop(finished);
                return self.get_object(Kind::Image, &project, &target.name).await;
            }
            return Err(Error::FailedPrecondition {
                object: display,
                message: format!(
                    "holds other uploaded bytes ({}); an Image's bytes never change: upload \
                     under another name, or delete it first",
                    uploaded.checksum
                ),
            });
        }

        let _commit = store.commit_guard().await;
        let stored = finished.store(&store).map_err(Error::internal)?;
        if existing.is_none() {
            match self
                .do_create(
                    who,
                    v1::CreateRequest {
                        object: Some(
                            new_image(&project, &target.name, &declared_checksum, declared_format)
                                .into(),
                        ),
                        dry_run: false,
                    },
                )
                .await
            {
                // Created meanwhile (an apply of its manifest): record the bytes on it.
                Ok(_) | Err(Error::AlreadyExists { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        let uploaded = v1::UploadedImage {
            checksum: stored.checksum(),
            size_bytes: stored.size,
            format: format_name.to_owned(),
            virtual_size_bytes: found.virtual_size(&header, stored.size),
            uploaded_at: Some(now()),
        };
        tracing::info!(image = %format!("{project}/{}", target.name), checksum = %uploaded.checksum, size = uploaded.size_bytes, format = %uploaded.format, "image uploaded");
        self.do_update_status(
            &apiserver_identity(),
            v1::UpdateStatusRequest {
                key: Some(v1::ObjectKey {
                    kind: Kind::Image.name().to_owned(),
                    project: project.clone(),
                    name: target.name.clone(),
                }),
                writer: owners::IMAGE_STORE.to_owned(),
                object: Some(
                    Object::Image(v1::Image {
                        status: Some(v1::ImageStatus {
                            uploaded: Some(uploaded),
                            ..Default::default()
                        }),
                        ..Default::default()
                    })
                    .into(),
                ),
                fields: vec!["uploaded".to_owned()],
                conditions: Vec::new(),
                resource_version: 0,
            },
        )
        .await
    }

    async fn do_download(
        &self,
        who: &Identity,
        request: v1::DownloadImageRequest,
    ) -> Result<ChunkStream, Error> {
        let store = self.store_or_refuse()?;
        self.authorize(
            who,
            &auth::Request::new(Verb::Read, Kind::Image, &request.name),
        )?;
        let project = if request.project.is_empty() {
            DEFAULT_PROJECT
        } else {
            &request.project
        };
        let object = self.get_object(Kind::Image, project, &request.name).await?;
        let Object::Image(image) = &object else {
            unreachable!("an Image key reads an Image")
        };
        let checksum = image
            .status
            .as_ref()
            .and_then(|s| s.uploaded.as_ref())
            .map(|u| u.checksum.clone())
            .ok_or_else(|| Error::FailedPrecondition {
                object: object.display_name(),
                message: "has no uploaded bytes yet".into(),
            })?;
        let hex = checksum
            .strip_prefix("sha256:")
            .unwrap_or_default()
            .to_owned();
        let (mut file, size) = store.open_at(&hex, request.offset).map_err(|e| match e {
            crate::imagestore::ImageStoreError::Missing(_) => Error::FailedPrecondition {
                object: object.display_name(),
                message: format!("its bytes ({checksum}) are missing from the image store"),
            },
            other => Error::internal(other),
        })?;
        if request.offset > size {
            return Err(Error::invalid(
                object.display_name(),
                "offset",
                format!("{} is past the end ({size} bytes)", request.offset),
            ));
        }
        let (chunks, receiver) = mpsc::channel(4);
        let mut offset = request.offset;
        tokio::task::spawn_blocking(move || {
            let mut first = true;
            loop {
                let mut data = vec![0u8; CHUNK_BYTES];
                let n = match read_full(&mut file, &mut data) {
                    Ok(n) => n,
                    Err(e) => {
                        let _ = chunks.blocking_send(Err(Status::internal(format!(
                            "reading the image store: {e}"
                        ))));
                        return;
                    }
                };
                if n == 0 && !first {
                    return;
                }
                data.truncate(n);
                let chunk = v1::ImageChunk {
                    offset,
                    data,
                    size_bytes: if first { size } else { 0 },
                    checksum: if first {
                        checksum.clone()
                    } else {
                        String::new()
                    },
                };
                first = false;
                offset += n as u64;
                if chunks.blocking_send(Ok(chunk)).is_err() || n == 0 {
                    return;
                }
            }
        });
        Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(
            receiver,
        )))
    }

    /// Removes stored bytes that no Image names in `status.uploaded`; returns their
    /// hashes. Does nothing without an image store.
    pub async fn collect_image_garbage(&self) -> Result<Vec<String>, Error> {
        let Some(store) = self.image_store().cloned() else {
            return Ok(Vec::new());
        };
        store
            .collect_garbage(|| async {
                let mut referenced = HashSet::new();
                let mut continue_token = String::new();
                loop {
                    let page = self
                        .do_list(
                            &apiserver_identity(),
                            v1::ListRequest {
                                kind: Kind::Image.name().to_owned(),
                                all_projects: true,
                                continue_token,
                                ..Default::default()
                            },
                        )
                        .await?;
                    for item in page.items {
                        if let Ok(Object::Image(image)) = Object::try_from(item)
                            && let Some(uploaded) = image.status.and_then(|s| s.uploaded)
                            && let Some(hex) = uploaded.checksum.strip_prefix("sha256:")
                        {
                            referenced.insert(hex.to_owned());
                        }
                    }
                    if page.continue_token.is_empty() {
                        return Ok(referenced);
                    }
                    continue_token = page.continue_token;
                }
            })
            .await
    }
}

/// Collects unused image bytes every [`COLLECT_EVERY`], until `shutdown` completes.
pub async fn run_image_collector(server: ApiServer, shutdown: impl Future<Output = ()>) {
    let collect = async {
        loop {
            if let Err(e) = server.collect_image_garbage().await {
                tracing::warn!(error = %e, "cannot collect unused image bytes");
            }
            tokio::time::sleep(COLLECT_EVERY).await;
        }
    };
    tokio::select! {
        () = collect => {}
        () = shutdown => {}
    }
}

/// The Image an upload creates when none exists.
fn new_image(project: &str, name: &str, checksum: &str, disk_format: Option<DiskFormat>) -> Object {
    Object::Image(v1::Image {
        metadata: Some(v1::ObjectMeta {
            name: name.to_owned(),
            project: project.to_owned(),
            ..Default::default()
        }),
        spec: Some(v1::ImageSpec {
            source: Some(v1::ImageSource {
                url: UPLOAD_URL.to_owned(),
            }),
            checksum: checksum.to_owned(),
            disk_format: disk_format.map(|f| f as i32),
            ..Default::default()
        }),
        status: None,
    })
}

/// A client's stream that failed mid-way: the upload stops and leaves nothing.
fn cut(status: Status) -> Error {
    Error::Unavailable {
        message: format!("the upload stream failed: {}", status.message()),
    }
}

fn now() -> prost_types::Timestamp {
    let ts = jiff::Timestamp::now();
    prost_types::Timestamp {
        seconds: ts.as_second(),
        nanos: ts.subsec_nanosecond(),
    }
}

/// Reads until `buf` is full or the file ends.
fn read_full(file: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

#[tonic::async_trait]
impl v1::images_server::Images for ApiServer {
    async fn upload(
        &self,
        request: Request<Streaming<v1::UploadImageRequest>>,
    ) -> Result<Response<v1::ObjectResponse>, Status> {
        let who = self.authenticate(&request)?;
        self.do_upload(&who, request.into_inner())
            .await
            .map(|o| Response::new(object_response(o)))
            .map_err(Status::from)
    }

    type DownloadStream = ChunkStream;

    async fn download(
        &self,
        request: Request<v1::DownloadImageRequest>,
    ) -> Result<Response<ChunkStream>, Status> {
        let who = self.authenticate(&request)?;
        self.do_download(&who, request.into_inner())
            .await
            .map(Response::new)
            .map_err(Status::from)
    }
}
