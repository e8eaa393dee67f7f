//! The network controller against an in-process apiserver: segments, readiness, deletion
//! while Ports use the Network.

mod common;

use std::collections::HashSet;

use common::{Cloud, decided, eventually, owner_uid, uid};
use ferro_api::{Kind, v1};

fn condition<'a>(network: &'a v1::Network, kind: &str) -> Option<&'a v1::Condition> {
    network
        .status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.r#type == kind)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn networks_get_distinct_segments_and_turn_ready() {
    let cloud = Cloud::start().await;
    let controllers = cloud.controllers();
    for i in 0..5 {
        cloud
            .network(&format!("n{i}"), &format!("10.{i}.0.0/24"))
            .await;
    }
    let networks = eventually("five ready networks", || async {
        let networks = cloud.list::<v1::Network>().await;
        let ready = networks
            .iter()
            .filter(|n| {
                condition(n, "Ready")
                    .is_some_and(|c| c.status == v1::condition::Status::True as i32)
            })
            .count();
        (ready == 5).then_some(networks)
    })
    .await;
    let segments: HashSet<u32> = networks
        .iter()
        .map(|n| n.status.as_ref().unwrap().segment_id)
        .collect();
    assert_eq!(segments.len(), 5, "distinct segments: {segments:?}");
    assert!(!segments.contains(&0));
    let claims = cloud.list::<v1::SegmentId>().await;
    assert_eq!(claims.len(), 5);
    for network in &networks {
        let id = network.status.as_ref().unwrap().segment_id;
        let claim = claims
            .iter()
            .find(|c| c.spec.as_ref().unwrap().id == id)
            .expect("a claim per segment");
        assert_eq!(claim.metadata.as_ref().unwrap().name, format!("vni-{id}"));
        assert_eq!(owner_uid(claim), uid(network));
        assert!(
            network
                .metadata
                .as_ref()
                .unwrap()
                .finalizers
                .iter()
                .any(|f| f == ferro_controllers::network::NETWORK_FINALIZER)
        );
    }
    controllers.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_network_in_use_waits_for_its_ports() {
    let cloud = Cloud::start().await;
    let controllers = cloud.controllers();
    let network = cloud.network("net", "10.20.0.0/24").await;
    cloud.port("web", "net").await;
    cloud.port("db", "net").await;
    eventually("ports addressed", || async {
        cloud
            .list::<v1::Port>()
            .await
            .iter()
            .all(decided)
            .then_some(())
    })
    .await;
    cloud.delete(Kind::Network, "default", "net").await;
    let waiting = eventually("InUse naming the ports", || async {
        let network = cloud
            .admin
            .get_typed::<v1::Network>("default", "net")
            .await
            .ok()?;
        condition(&network, "InUse").filter(|c| c.status == v1::condition::Status::True as i32)?;
        Some(network)
    })
    .await;
    let message = &condition(&waiting, "InUse").unwrap().message;
    assert!(
        message.contains("default/db") && message.contains("default/web"),
        "{message}"
    );
    assert!(
        waiting
            .metadata
            .as_ref()
            .unwrap()
            .deletion_timestamp
            .is_some()
    );
    cloud.delete(Kind::Port, "default", "web").await;
    cloud.delete(Kind::Port, "default", "db").await;
    eventually("the network and every claim gone", || async {
        let gone = cloud
            .admin
            .get_typed::<v1::Network>("default", "net")
            .await
            .is_err();
        let segments = cloud
            .list::<v1::SegmentId>()
            .await
            .iter()
            .filter(|c| owner_uid(*c) == uid(&network))
            .count();
        let ips = cloud.list::<v1::IpAddress>().await.len();
        (gone && segments == 0 && ips == 0).then_some(())
    })
    .await;
    controllers.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_network_with_many_ports_is_one_event_with_a_count() {
    let cloud = Cloud::start().await;
    let controllers = cloud.controllers();
    let network = cloud.network("busy", "10.30.0.0/24").await;
    const PORTS: usize = 60;
    for i in 0..PORTS {
        cloud.port(&format!("p{i:03}"), "busy").await;
    }
    eventually("ports addressed", || async {
        let ports = cloud.list::<v1::Port>().await;
        (ports.len() == PORTS && ports.iter().all(decided)).then_some(())
    })
    .await;
    cloud.delete(Kind::Network, "default", "busy").await;
    eventually("the network waits for its ports", || async {
        let network = cloud
            .admin
            .get_typed::<v1::Network>("default", "busy")
            .await
            .ok()?;
        condition(&network, "InUse")
            .filter(|c| c.status == v1::condition::Status::True as i32)
            .map(|_| ())
    })
    .await;
    // Each deleted Port changes what the Network waits for, and so the message.
    for i in 0..PORTS {
        cloud
            .delete(Kind::Port, "default", &format!("p{i:03}"))
            .await;
    }
    let waits = |events: &[v1::Event]| -> Vec<v1::EventSpec> {
        events
            .iter()
            .filter_map(|e| e.spec.clone())
            .filter(|s| {
                s.reason == "DeletionWaitsForPorts"
                    && s.involved_object
                        .as_ref()
                        .is_some_and(|o| o.uid == uid(&network))
            })
            .collect()
    };
    let event = eventually("one DeletionWaitsForPorts event counting on", || async {
        let events = waits(&cloud.list::<v1::Event>().await);
        assert!(events.len() <= 1, "similar events aggregate: {events:#?}");
        events.into_iter().find(|e| e.count > 1)
    })
    .await;
    eventually("the network gone", || async {
        cloud
            .admin
            .get_typed::<v1::Network>("default", "busy")
            .await
            .is_err()
            .then_some(())
    })
    .await;
    let events = waits(&cloud.list::<v1::Event>().await);
    assert_eq!(events.len(), 1, "{events:#?}");
    assert!(
        event
            .message
            .starts_with("(combined from similar events): deletion waits for ports"),
        "{}",
        event.message
    );
    let (first, last) = (
        event.first_timestamp.unwrap().seconds,
        event.last_timestamp.unwrap().seconds,
    );
    assert!(first <= last, "first {first} last {last}");
    controllers.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dhcp_network_gets_its_dhcp_port_which_goes_with_it() {
    let cloud = Cloud::start().await;
    let controllers = cloud.controllers();
    let network = cloud.dhcp_network("lan", "10.40.0.0/24").await;
    let port = eventually("the DHCP port addressed", || async {
        let port = cloud
            .admin
            .get_typed::<v1::Port>("default", "lan-dhcp")
            .await
            .ok()?;
        decided(&port).then_some(port)
    })
    .await;
    let spec = port.spec.as_ref().unwrap();
    assert_eq!(
        spec.device_owner,
        ferro_controllers::network::DHCP_DEVICE_OWNER
    );
    assert_eq!(spec.network, "lan");
    // Deleted by hand, it comes back.
    cloud.delete(Kind::Port, "default", "lan-dhcp").await;
    eventually("a new DHCP port", || async {
        let again = cloud
            .admin
            .get_typed::<v1::Port>("default", "lan-dhcp")
            .await
            .ok()?;
        (uid(&again) != uid(&port)).then_some(())
    })
    .await;
    // It does not hold the network: deleting the network takes it along.
    cloud.delete(Kind::Network, "default", "lan").await;
    eventually(
        "the network, its DHCP port and every claim gone",
        || async {
            let gone = cloud
                .admin
                .get_typed::<v1::Network>("default", "lan")
                .await
                .is_err();
            let ports = cloud.list::<v1::Port>().await.len();
            let ips = cloud.list::<v1::IpAddress>().await.len();
            let segments = cloud
                .list::<v1::SegmentId>()
                .await
                .iter()
                .filter(|c| owner_uid(*c) == uid(&network))
                .count();
            (gone && ports == 0 && ips == 0 && segments == 0).then_some(())
        },
    )
    .await;
    controllers.abort();
}
