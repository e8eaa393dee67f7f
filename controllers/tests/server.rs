//! The server controller against an in-process apiserver, with the scheduler, IPAM and the
//! garbage collector running beside it: a stack applied in any order converges, and a
//! deleted Server takes its Ports and their address claims with it.

mod common;

use common::{Cloud, eventually};
use ferro_api::{Kind, Object, Resource, owners, v1};

fn condition<'a>(server: &'a v1::Server, kind: &str) -> Option<&'a v1::Condition> {
    server
        .status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.r#type == kind)
}

/// Registers a node as its agent would, with a Lease the test does not need to renew.
async fn node(cloud: &Cloud, name: &str) {
    cloud
        .create(&format!(
            "apiVersion: ferro/v1\nkind: Node\nmetadata: {{name: {name}}}\nspec: {{}}\n"
        ))
        .await;
    let resources = v1::NodeResources {
        vcpus: 4,
        ram_mib: 8192,
        disk_gib: 100,
    };
    let object = Object::Node(v1::Node {
        metadata: Some(v1::ObjectMeta {
            name: name.into(),
            ..Default::default()
        }),
        spec: None,
        status: Some(v1::NodeStatus {
            capacity: Some(resources),
            allocatable: Some(resources),
            hypervisor: "QEMU".into(),
            network_driver: "ovs".into(),
            zone: "az1".into(),
            ..Default::default()
        }),
    });
    let host_ready = v1::Condition {
        r#type: "HostReady".into(),
        status: v1::condition::Status::True as i32,
        reason: "HostReady".into(),
        ..Default::default()
    };
    cloud
        .admin
        .update_status(
            object,
            owners::AGENT,
            &[
                "capacity",
                "allocatable",
                "hypervisor",
                "zone",
                "networkDriver",
            ],
            vec![host_ready],
        )
        .await
        .unwrap();
    let t = jiff::Timestamp::now();
    let lease = v1::Lease {
        metadata: Some(v1::ObjectMeta {
            name: format!("node-{name}"),
            ..Default::default()
        }),
        spec: Some(v1::LeaseSpec {
            holder_identity: name.into(),
            lease_duration_seconds: 3600,
            renew_time: Some(prost_types::Timestamp {
                seconds: t.as_second(),
                nanos: 0,
            }),
            ..Default::default()
        }),
        status: None,
    };
    cloud.admin.create(Object::Lease(lease)).await.unwrap();
}

async fn get_server(cloud: &Cloud, name: &str) -> Option<v1::Server> {
    cloud
        .admin
        .get_typed::<v1::Server>("default", name)
        .await
        .ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_applied_before_its_references_converges_when_they_appear() {
    let cloud = Cloud::start().await;
    let controllers = cloud.controllers();
    node(&cloud, "n1").await;
    cloud
        .create("apiVersion: ferro/v1\nkind: Server\nmetadata: {name: web-1}\nspec: {flavor: m1, image: tiny, keyPair: demo, networks: [{network: private}]}\n")
        .await;
    let waiting = eventually("the missing references reported", || async {
        let s = get_server(&cloud, "web-1").await?;
        let c = condition(&s, "ReferencesResolved")?;
        let scheduled = condition(&s, "Scheduled")?;
        (c.reason == "FlavorNotFound" && scheduled.reason == "FlavorNotFound").then_some(s)
    })
    .await;
    let references = condition(&waiting, "ReferencesResolved").unwrap();
    assert_eq!(
        references.message,
        "Flavor m1 not found; \
         Image tiny not found in project default or among public images; \
         KeyPair demo not found in project default; \
         Network private not found in project default or among shared networks"
    );
    let status = waiting.status.as_ref().unwrap();
    assert_eq!(status.phase, v1::server_status::Phase::Pending as i32);
    assert!(status.node.is_empty());
    let ready = condition(&waiting, "Ready").unwrap();
    assert_eq!(ready.reason, "FlavorNotFound", "Ready says why");
    // The Port is created at once; it waits for its Network like everything else.
    let ports = cloud.list::<v1::Port>().await;
    assert_eq!(ports.len(), 1);
    assert_eq!(ports[0].metadata.as_ref().unwrap().name, "web-1-0");

    cloud.network("private", "10.0.1.0/24").await;
    cloud
        .create("apiVersion: ferro/v1\nkind: Flavor\nmetadata: {name: m1}\nspec: {vcpus: 1, ramMib: 256, diskGib: 1}\n")
        .await;
    cloud
        .create("apiVersion: ferro/v1\nkind: KeyPair\nmetadata: {name: demo}\nspec: {publicKey: ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJ65XlM9xwTrwBb2VYfUbi9VU/mF0doEHYlbtQsEKTh5 test}\n")
        .await;
    cloud
        .create("apiVersion: ferro/v1\nkind: Image\nmetadata: {name: tiny}\nspec: {source: {url: file:///nonexistent/disk.raw}, diskFormat: Raw}\n")
        .await;
    let placed = eventually("web-1 scheduled, addressed and resolved", || async {
        let s = get_server(&cloud, "web-1").await?;
        let scheduled = condition(&s, "Scheduled")?.status == v1::condition::Status::True as i32;
        let resolved =
            condition(&s, "ReferencesResolved")?.status == v1::condition::Status::True as i32;
        let addressed = s.status.as_ref()?.addresses.len() == 1;
        (scheduled && resolved && addressed).then_some(s)
    })
    .await;
    let status = placed.status.as_ref().unwrap();
    assert_eq!(status.node, "n1");
    assert_eq!(status.flavor.as_ref().unwrap().name, "m1");
    assert_eq!(status.ports, ["web-1-0"]);
    let address = &status.addresses[0];
    assert_eq!(address.network, "private");
    assert!(address.ips[0].starts_with("10.0.1."), "{address:?}");
    let kinds: Vec<&str> = status.resolved.iter().map(|r| r.kind.as_str()).collect();
    assert_eq!(kinds, ["Flavor", "Image", "KeyPair", "Network"]);
    assert!(status.resolved.iter().all(|r| !r.uid.is_empty()));
    // No agent boots it here: bound, addressed and resolved, the guest is being built.
    assert_eq!(status.phase, v1::server_status::Phase::Building as i32);
    assert_eq!(condition(&placed, "Ready").unwrap().reason, "Building");
    controllers.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_server_removes_its_ports_and_their_claims_but_not_adopted_ones() {
    let cloud = Cloud::start().await;
    let controllers = cloud.controllers();
    cloud.network("private", "10.0.2.0/24").await;
    cloud.port("kept", "private").await;
    // No node: the server is never bound, so no agent finalizer holds its deletion.
    cloud
        .create("apiVersion: ferro/v1\nkind: Flavor\nmetadata: {name: m1}\nspec: {vcpus: 1, ramMib: 256, diskGib: 1}\n")
        .await;
    cloud
        .create("apiVersion: ferro/v1\nkind: Server\nmetadata: {name: db}\nspec: {flavor: m1, image: tiny, networks: [{network: private}, {network: private, fixedIp: 10.0.2.50}, {port: kept}]}\n")
        .await;
    let server = eventually("three addressed ports", || async {
        let s = get_server(&cloud, "db").await?;
        (s.status.as_ref()?.addresses.len() == 3).then_some(s)
    })
    .await;
    let status = server.status.as_ref().unwrap();
    assert_eq!(status.ports, ["db-0", "db-1", "kept"]);
    assert_eq!(status.addresses[1].ips, ["10.0.2.50"]);
    let scheduled = condition(&server, "Scheduled").unwrap();
    assert_eq!(scheduled.reason, "NoValidHost");
    assert_eq!(scheduled.message, "no nodes are registered");
    let claims = cloud.list::<v1::IpAddress>().await;
    assert_eq!(claims.len(), 3, "one address claim per port");

    cloud.delete(Kind::Server, "default", "db").await;
    eventually("the server's own ports and claims gone", || async {
        let ports = cloud.list::<v1::Port>().await;
        let claims = cloud.list::<v1::IpAddress>().await;
        let macs = cloud.list::<v1::MacAddress>().await;
        let names: Vec<String> = ports
            .iter()
            .filter_map(|p| p.metadata().map(|m| m.name.clone()))
            .collect();
        (names == ["kept"] && claims.len() == 1 && macs.len() == 1).then_some(())
    })
    .await;
    assert!(get_server(&cloud, "db").await.is_none());
    controllers.abort();
}
