//! Uploads and downloads through a real apiserver over gRPC on loopback, on the in-memory
//! store, with its image store in a temporary directory: what a user and a node see.

use std::path::Path;
use std::sync::Arc;

use ferro_api::{
    Error, Kind, Object,
    auth::Tokens,
    client::Client,
    imagestore::ImageStore,
    server::ApiServer,
    v1::{self, image_spec::DiskFormat},
};
use ferro_store::memory::MemoryStore;
use futures::StreamExt;
use sha2::{Digest, Sha256};
use tokio::sync::oneshot;

const TOKENS: &str = "admin-token admin\nnode1-token system:node:n1\n";

struct Harness {
    admin: Client,
    node: Client,
    server: ApiServer,
    store_dir: tempfile::TempDir,
    _shutdown: oneshot::Sender<()>,
}

impl Harness {
    async fn start() -> Harness {
        let store_dir = tempfile::tempdir().unwrap();
        let images = Arc::new(ImageStore::open(store_dir.path()).unwrap());
        let server = ApiServer::new(Arc::new(MemoryStore::new()), Tokens::parse(TOKENS))
            .with_image_store(images);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let (tx, rx) = oneshot::channel::<()>();
        let serving = server.clone();
        tokio::spawn(async move {
            serving
                .serve(listener, async {
                    let _ = rx.await;
                })
                .await
                .expect("apiserver serves");
        });
        Harness {
            admin: Client::connect_lazy(&address, "admin-token").unwrap(),
            node: Client::connect_lazy(&address, "node1-token").unwrap(),
            server,
            store_dir,
            _shutdown: tx,
        }
    }

    fn files(&self, sub: &str) -> Vec<String> {
        files_in(&self.store_dir.path().join(sub))
    }
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn target(name: &str) -> v1::UploadTarget {
    v1::UploadTarget {
        project: "p".into(),
        name: name.into(),
        ..Default::default()
    }
}

/// A qcow2 header (virtual size 1 GiB) followed by some bytes, `len` bytes in all.
fn qcow2_bytes(len: usize) -> Vec<u8> {
    let mut bytes: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
    bytes[..8].copy_from_slice(b"QFI\xfb\0\0\0\x03");
    bytes[24..32].copy_from_slice(&(1u64 << 30).to_be_bytes());
    bytes
}

fn sha256(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

fn chunks(bytes: &[u8], size: usize) -> impl futures::Stream<Item = Vec<u8>> + Send + 'static {
    let parts: Vec<Vec<u8>> = bytes.chunks(size).map(<[u8]>::to_vec).collect();
    futures::stream::iter(parts)
}

fn uploaded(object: &Object) -> v1::UploadedImage {
    let Object::Image(image) = object else {
        panic!("not an image: {object:?}")
    };
    image
        .status
        .as_ref()
        .and_then(|s| s.uploaded.clone())
        .expect("status.uploaded")
}

async fn download(client: &Client, name: &str, offset: u64) -> (Vec<u8>, u64, String) {
    let mut stream = client.download_image("p", name, offset).await.unwrap();
    let (mut bytes, mut size, mut checksum) = (Vec::new(), 0, String::new());
    let mut at = offset;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        assert_eq!(chunk.offset, at, "chunks come in order");
        if chunk.size_bytes > 0 {
            size = chunk.size_bytes;
            checksum = chunk.checksum.clone();
        }
        at += chunk.data.len() as u64;
        bytes.extend_from_slice(&chunk.data);
    }
    (bytes, size, checksum)
}

#[tokio::test]
async fn an_upload_creates_the_image_and_nodes_read_it_back_from_any_offset() {
    let h = Harness::start().await;
    let bytes = qcow2_bytes(3 * (1 << 20) + 12_345);
    let object = h
        .admin
        .upload_image(
            v1::UploadTarget {
                checksum: sha256(&bytes),
                size_bytes: Some(bytes.len() as u64),
                ..target("disk")
            },
            chunks(&bytes, 1 << 20),
        )
        .await
        .unwrap();
    let found = uploaded(&object);
    assert_eq!(found.checksum, sha256(&bytes));
    assert_eq!(found.size_bytes, bytes.len() as u64);
    assert_eq!(found.format, "qcow2");
    assert_eq!(found.virtual_size_bytes, 1 << 30);
    let Object::Image(image) = &object else {
        unreachable!()
    };
    let spec = image.spec.clone().unwrap();
    assert_eq!(spec.source.unwrap().url, "ferro://upload");
    assert_eq!(
        spec.checksum,
        sha256(&bytes),
        "the declared checksum is kept"
    );
    let hex = sha256(&bytes)["sha256:".len()..].to_owned();
    assert_eq!(h.files("sha256"), vec![hex]);
    assert!(h.files("tmp").is_empty());

    // A node reads it whole, and from an offset (a resumed fetch).
    let (all, size, checksum) = download(&h.node, "disk", 0).await;
    assert_eq!((all.len(), size), (bytes.len(), bytes.len() as u64));
    assert!(all == bytes, "the downloaded bytes are the uploaded ones");
    assert_eq!(checksum, sha256(&bytes));
    let offset = (1 << 20) + 7;
    let (rest, _, _) = download(&h.node, "disk", offset).await;
    assert!(rest[..] == bytes[offset as usize..]);
    let (nothing, size, _) = download(&h.node, "disk", bytes.len() as u64).await;
    assert_eq!((nothing.len(), size), (0, bytes.len() as u64));
}

#[tokio::test]
async fn a_checksum_mismatch_names_both_checksums_and_stores_nothing() {
    let h = Harness::start().await;
    let bytes = qcow2_bytes(100_000);
    let declared = format!("sha256:{}", "ab".repeat(32));
    let error = h
        .admin
        .upload_image(
            v1::UploadTarget {
                checksum: declared.clone(),
                ..target("bad")
            },
            chunks(&bytes, 4096),
        )
        .await
        .unwrap_err();
    let message = error.to_string();
    assert!(matches!(error, Error::InvalidArgument { .. }), "{error:?}");
    assert!(message.contains(&declared), "{message}");
    assert!(message.contains(&sha256(&bytes)), "{message}");
    assert!(h.files("sha256").is_empty());
    assert!(h.files("tmp").is_empty());
    let missing = h.admin.get(Kind::Image, "p", "bad").await.unwrap_err();
    assert!(matches!(missing, Error::NotFound { .. }), "{missing:?}");
}

#[tokio::test]
async fn an_interrupted_upload_leaves_nothing_and_a_retry_completes_it() {
    let h = Harness::start().await;
    let bytes = qcow2_bytes(5 * (1 << 20));
    // The client's stream fails after two chunks, as when the uploader is interrupted.
    let parts: Vec<Vec<u8>> = bytes.chunks(1 << 20).map(<[u8]>::to_vec).collect();
    let first = futures::stream::iter([v1::UploadImageRequest {
        target: Some(v1::UploadTarget {
            size_bytes: Some(bytes.len() as u64),
            ..target("disk")
        }),
        data: Vec::new(),
    }]);
    let cut = futures::stream::iter(parts[..2].to_vec())
        .map(|data| v1::UploadImageRequest { target: None, data })
        .chain(futures::stream::pending());
    let mut images = h.admin.images();
    let call = tokio::spawn(async move { images.upload(first.chain(cut)).await });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    call.abort();
    let _ = call.await;
    // The server sees the stream reset and drops the upload.
    for _ in 0..100 {
        if h.files("tmp").is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(h.files("tmp").is_empty(), "no partial upload is kept");
    assert!(h.files("sha256").is_empty());
    let missing = h.admin.get(Kind::Image, "p", "disk").await.unwrap_err();
    assert!(matches!(missing, Error::NotFound { .. }), "{missing:?}");

    // A stream that ends early (fewer bytes than declared) stores nothing either.
    let short = h
        .admin
        .upload_image(
            v1::UploadTarget {
                size_bytes: Some(bytes.len() as u64),
                ..target("disk")
            },
            chunks(&bytes[..1 << 20], 1 << 20),
        )
        .await
        .unwrap_err();
    assert!(short.to_string().contains("ended after"), "{short}");
    assert!(h.files("sha256").is_empty());

    // The same command again completes it; once more changes nothing.
    for _ in 0..2 {
        let object = h
            .admin
            .upload_image(
                v1::UploadTarget {
                    size_bytes: Some(bytes.len() as u64),
                    ..target("disk")
                },
                chunks(&bytes, 1 << 20),
            )
            .await
            .unwrap();
        assert_eq!(uploaded(&object).checksum, sha256(&bytes));
    }
    assert_eq!(h.files("sha256").len(), 1);
    // Other bytes for the same Image are refused: an Image's bytes never change.
    let other = qcow2_bytes(4096);
    let refused = h
        .admin
        .upload_image(target("disk"), chunks(&other, 4096))
        .await
        .unwrap_err();
    assert!(
        matches!(refused, Error::FailedPrecondition { .. }),
        "{refused:?}"
    );
    assert_eq!(h.files("sha256").len(), 1);
}

#[tokio::test]
async fn formats_are_checked_against_the_header() {
    let h = Harness::start().await;
    let qcow2 = qcow2_bytes(70_000);
    let refused = h
        .admin
        .upload_image(
            v1::UploadTarget {
                disk_format: Some(DiskFormat::Raw as i32),
                ..target("raw")
            },
            chunks(&qcow2, 8192),
        )
        .await
        .unwrap_err();
    assert!(
        refused
            .to_string()
            .contains("declared raw, but the bytes are a qcow2 disk image"),
        "{refused}"
    );
    let gzip = [&b"\x1f\x8b\x08\0"[..], &[0u8; 1000]].concat();
    let refused = h
        .admin
        .upload_image(target("archive"), chunks(&gzip, 8192))
        .await
        .unwrap_err();
    assert!(
        refused.to_string().contains("gzip-compressed data"),
        "{refused}"
    );
    // An initramfs may be compressed: declared as a ramdisk, it is taken.
    let object = h
        .admin
        .upload_image(
            v1::UploadTarget {
                disk_format: Some(DiskFormat::Ramdisk as i32),
                ..target("initrd")
            },
            chunks(&gzip, 8192),
        )
        .await
        .unwrap();
    assert_eq!(uploaded(&object).format, "ramdisk");
    assert!(h.files("tmp").is_empty());
}

#[tokio::test]
async fn an_image_applied_first_takes_the_upload_and_deleting_it_frees_the_bytes() {
    let h = Harness::start().await;
    let manifest = "apiVersion: ferro/v1\nkind: Image\nmetadata: {name: tiny, project: p}\n\
                    spec: {source: {url: \"ferro://upload\"}, diskFormat: Raw, minRamMib: 128}\n";
    let object = ferro_api::codec::decode_yaml(manifest).unwrap().remove(0);
    h.admin.apply(object, "test", false).await.unwrap();
    let raw = vec![0u8; 200_000];
    let stored = h
        .admin
        .upload_image(target("tiny"), chunks(&raw, 65536))
        .await
        .unwrap();
    assert_eq!(uploaded(&stored).format, "raw");
    assert_eq!(uploaded(&stored).virtual_size_bytes, 200_000);
    let Object::Image(image) = &stored else {
        unreachable!()
    };
    assert_eq!(
        image.spec.as_ref().unwrap().min_ram_mib,
        128,
        "spec is the user's"
    );

    // An Image that fetches from a URL takes no upload.
    let manifest = "apiVersion: ferro/v1\nkind: Image\nmetadata: {name: web, project: p}\n\
                    spec: {source: {url: \"http://mirror/x.qcow2\"}}\n";
    let object = ferro_api::codec::decode_yaml(manifest).unwrap().remove(0);
    h.admin.apply(object, "test", false).await.unwrap();
    let refused = h
        .admin
        .upload_image(target("web"), chunks(&raw, 65536))
        .await
        .unwrap_err();
    assert!(
        refused.to_string().contains("only an Image with source"),
        "{refused}"
    );

    // A second Image with the same bytes shares the file; the bytes go with the last one.
    h.admin
        .upload_image(target("copy"), chunks(&raw, 65536))
        .await
        .unwrap();
    assert_eq!(h.files("sha256").len(), 1);
    h.admin.delete_key(Kind::Image, "p", "tiny").await.unwrap();
    assert!(h.server.collect_image_garbage().await.unwrap().is_empty());
    assert_eq!(h.files("sha256").len(), 1);
    h.admin.delete_key(Kind::Image, "p", "copy").await.unwrap();
    assert_eq!(h.server.collect_image_garbage().await.unwrap().len(), 1);
    assert!(h.files("sha256").is_empty());
}
