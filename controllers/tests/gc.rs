//! The garbage collector against an in-process apiserver: claims of deleted Ports, and
//! background, foreground and orphan propagation through a chain SecurityGroup → Ports →
//! claims.

mod common;

use common::{Cloud, decided, eventually, name, owner_uid, uid};
use ferro_api::{Kind, v1, v1::delete_request::Propagation};

async fn owned_ports(cloud: &Cloud, group: &v1::SecurityGroup, count: usize) -> Vec<v1::Port> {
    let group_uid = uid(group);
    for i in 0..count {
        cloud
            .create(&format!(
                "apiVersion: ferro/v1\nkind: Port\nmetadata:\n  name: p{i}\n  ownerReferences: [{{kind: SecurityGroup, name: {}, uid: {group_uid}, controller: true, blockOwnerDeletion: true}}]\nspec: {{network: net}}\n",
                name(group)
            ))
            .await;
    }
    eventually("the ports addressed", || async {
        let ports = cloud.list::<v1::Port>().await;
        (ports.len() == count && ports.iter().all(decided)).then_some(ports)
    })
    .await
}

async fn group(cloud: &Cloud, name: &str) -> v1::SecurityGroup {
    let object = cloud
        .create(&format!(
            "apiVersion: ferro/v1\nkind: SecurityGroup\nmetadata: {{name: {name}}}\nspec: {{}}\n"
        ))
        .await;
    ferro_api::Resource::from_object(object).unwrap()
}

async fn delete_with(cloud: &Cloud, kind: Kind, name: &str, propagation: Propagation) {
    let request = v1::DeleteRequest {
        key: Some(v1::ObjectKey {
            kind: kind.name().into(),
            project: "default".into(),
            name: name.into(),
        }),
        propagation: propagation as i32,
        ..Default::default()
    };
    cloud.admin.delete(request).await.expect("delete");
}

async fn claim_count(cloud: &Cloud) -> usize {
    cloud.list::<v1::IpAddress>().await.len() + cloud.list::<v1::MacAddress>().await.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_claims_of_a_deleted_port_are_collected() {
    let cloud = Cloud::start().await;
    let controllers = cloud.controllers();
    cloud.network("net", "10.4.0.0/24").await;
    let keep = cloud.port("keep", "net").await;
    let gone = cloud.port("gone", "net").await;
    eventually("both addressed", || async {
        (cloud
            .list::<v1::Port>()
            .await
            .iter()
            .filter(|p| decided(p))
            .count()
            == 2)
            .then_some(())
    })
    .await;
    assert_eq!(claim_count(&cloud).await, 4);
    cloud.delete(Kind::Port, "default", "gone").await;
    eventually("the deleted port's claims gone", || async {
        let ips = cloud.list::<v1::IpAddress>().await;
        let macs = cloud.list::<v1::MacAddress>().await;
        let left = ips.iter().filter(|c| owner_uid(*c) == uid(&gone)).count()
            + macs.iter().filter(|c| owner_uid(*c) == uid(&gone)).count();
        (left == 0).then_some(())
    })
    .await;
    assert_eq!(claim_count(&cloud).await, 2, "the other port's claims stay");
    assert!(
        cloud
            .list::<v1::IpAddress>()
            .await
            .iter()
            .all(|c| owner_uid(c) == uid(&keep))
    );
    controllers.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn background_deletion_collects_the_whole_chain() {
    let cloud = Cloud::start().await;
    let controllers = cloud.controllers();
    cloud.network("net", "10.5.0.0/24").await;
    let sg = group(&cloud, "sg").await;
    owned_ports(&cloud, &sg, 3).await;
    assert_eq!(claim_count(&cloud).await, 6);
    delete_with(&cloud, Kind::SecurityGroup, "sg", Propagation::Background).await;
    assert!(
        cloud.list::<v1::SecurityGroup>().await.is_empty(),
        "the owner goes at once"
    );
    eventually("ports and their claims collected", || async {
        (cloud.list::<v1::Port>().await.is_empty() && claim_count(&cloud).await == 0).then_some(())
    })
    .await;
    controllers.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreground_deletion_removes_dependents_first() {
    let cloud = Cloud::start().await;
    let controllers = cloud.controllers();
    cloud.network("net", "10.6.0.0/24").await;
    let sg = group(&cloud, "sg").await;
    owned_ports(&cloud, &sg, 3).await;
    delete_with(&cloud, Kind::SecurityGroup, "sg", Propagation::Foreground).await;
    let saw_waiting_owner = std::sync::atomic::AtomicBool::new(false);
    let (saw, cloud) = (&saw_waiting_owner, &cloud);
    eventually("the owner gone, after its dependents", move || async move {
        // The owner is read before the dependents: once it is gone, they must be too.
        let owner = cloud
            .admin
            .get_typed::<v1::SecurityGroup>("default", "sg")
            .await
            .ok();
        let ports = cloud.list::<v1::Port>().await.len();
        let claims = claim_count(cloud).await;
        match owner {
            Some(owner) => {
                let meta = owner.metadata.unwrap();
                assert!(meta.deletion_timestamp.is_some());
                if ports > 0 {
                    saw.store(true, std::sync::atomic::Ordering::SeqCst);
                    assert!(
                        meta.finalizers
                            .iter()
                            .any(|f| f == ferro_api::server::FOREGROUND_FINALIZER)
                    );
                }
                None
            }
            None => {
                assert_eq!(
                    (ports, claims),
                    (0, 0),
                    "the owner went before its dependents"
                );
                Some(())
            }
        }
    })
    .await;
    // Usually observed; the collector may be faster than one poll, which is fine too.
    println!("observed the owner waiting for its dependents: {saw_waiting_owner:?}");
    controllers.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orphan_deletion_keeps_dependents_without_the_owner() {
    let cloud = Cloud::start().await;
    let controllers = cloud.controllers();
    cloud.network("net", "10.7.0.0/24").await;
    let sg = group(&cloud, "sg").await;
    owned_ports(&cloud, &sg, 3).await;
    delete_with(&cloud, Kind::SecurityGroup, "sg", Propagation::Orphan).await;
    eventually("the owner gone", || async {
        cloud
            .list::<v1::SecurityGroup>()
            .await
            .is_empty()
            .then_some(())
    })
    .await;
    let ports = cloud.list::<v1::Port>().await;
    assert_eq!(ports.len(), 3, "the dependents stay");
    for port in &ports {
        assert!(
            port.metadata.as_ref().unwrap().owner_references.is_empty(),
            "{} no longer names the owner",
            name(port)
        );
        assert!(decided(port));
    }
    assert_eq!(claim_count(&cloud).await, 6, "their claims stay with them");
    controllers.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dependent_with_another_live_owner_only_loses_the_reference() {
    let cloud = Cloud::start().await;
    let controllers = cloud.controllers();
    cloud.network("net", "10.8.0.0/24").await;
    let (a, b) = (group(&cloud, "a").await, group(&cloud, "b").await);
    cloud
        .create(&format!(
            "apiVersion: ferro/v1\nkind: Port\nmetadata:\n  name: shared\n  ownerReferences:\n  - {{kind: SecurityGroup, name: a, uid: {}}}\n  - {{kind: SecurityGroup, name: b, uid: {}}}\nspec: {{network: net}}\n",
            uid(&a),
            uid(&b)
        ))
        .await;
    delete_with(&cloud, Kind::SecurityGroup, "a", Propagation::Background).await;
    let port = eventually("the dangling reference dropped", || async {
        let port = cloud
            .admin
            .get_typed::<v1::Port>("default", "shared")
            .await
            .ok()?;
        (port.metadata.as_ref()?.owner_references.len() == 1).then_some(port)
    })
    .await;
    assert_eq!(port.metadata.unwrap().owner_references[0].uid, uid(&b));
    delete_with(&cloud, Kind::SecurityGroup, "b", Propagation::Background).await;
    eventually("collected once its last owner went", || async {
        cloud
            .admin
            .get_typed::<v1::Port>("default", "shared")
            .await
            .is_err()
            .then_some(())
    })
    .await;
    controllers.abort();
}
