//! The image controller against an in-process apiserver: a node's cache report becomes the
//! Image's status.

mod common;

use common::{Cloud, eventually, uid};
use ferro_api::{Object, Resource, owners, v1};

async fn report(cloud: &Cloud, node: &str, entries: Vec<v1::CachedImage>) {
    let object = Object::Node(v1::Node {
        metadata: Some(v1::ObjectMeta {
            name: node.into(),
            ..Default::default()
        }),
        spec: None,
        status: Some(v1::NodeStatus {
            images: entries,
            ..Default::default()
        }),
    });
    cloud
        .admin
        .update_status(object, owners::AGENT, &["images"], vec![])
        .await
        .expect("node status");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_cache_reports_make_the_image_status() {
    let cloud = Cloud::start().await;
    let controllers = cloud.controllers();
    for n in ["n1", "n2"] {
        cloud
            .create(&format!(
                "apiVersion: ferro/v1\nkind: Node\nmetadata: {{name: {n}}}\nspec: {{}}\n"
            ))
            .await;
    }
    let image = cloud
        .create("apiVersion: ferro/v1\nkind: Image\nmetadata: {name: tiny}\nspec: {source: {url: file:///x/disk.raw}, diskFormat: Raw}\n")
        .await;
    let image_uid = uid(&v1::Image::from_object(image).unwrap());
    let phase_of = |reason: &'static str| {
        let cloud = &cloud;
        async move {
            let image = cloud
                .admin
                .get_typed::<v1::Image>("default", "tiny")
                .await
                .ok()?;
            let status = image.status?;
            status
                .conditions
                .iter()
                .any(|c| c.r#type == "Ready" && c.reason == reason)
                .then_some(status)
        }
    };
    eventually("Pending", || phase_of("Pending")).await;
    let entry = |phase: v1::cached_image::Phase, message: &str| v1::CachedImage {
        image_uid: image_uid.clone(),
        image: "default/tiny".into(),
        phase: phase as i32,
        checksum: "sha256:abc".into(),
        format: "raw".into(),
        size_bytes: 4096,
        virtual_size_bytes: 8192,
        message: message.into(),
    };
    report(
        &cloud,
        "n1",
        vec![entry(
            v1::cached_image::Phase::Failed,
            "ImageChecksumMismatch: expected sha256:abd",
        )],
    )
    .await;
    let failed = eventually("Error", || phase_of("ImageChecksumMismatch")).await;
    assert_eq!(failed.phase, v1::image_status::Phase::Error as i32);
    report(
        &cloud,
        "n2",
        vec![entry(v1::cached_image::Phase::Ready, "")],
    )
    .await;
    let active = eventually("Active", || phase_of("Cached")).await;
    assert_eq!(active.phase, v1::image_status::Phase::Active as i32);
    assert_eq!(active.checksum, "sha256:abc");
    assert_eq!(active.size_bytes, 4096);
    assert_eq!(active.virtual_size_bytes, 8192);
    assert_eq!(active.format, "raw");
    controllers.abort();
}
