//! The router controller against an in-process apiserver over the in-memory store: Nodes
//! play their agents (roles, `HostReady`, heartbeat Leases written by the test); Routers
//! are spread over the network nodes, hold gateway addresses from the same claims as
//! Ports, wait for what is missing, release everything when deleted, and move off a node
//! whose heartbeat lapses.

mod common;

use std::{collections::BTreeMap, net::IpAddr, time::Duration};

use common::{Cloud, eventually, owner_uid, uid};
use ferro_api::{Kind, Object, client::Selection, owners, v1};
use ferro_controllers::ipam::ip_claim_name;

fn timestamp(ago: Duration) -> prost_types::Timestamp {
    let t = jiff::Timestamp::now() - jiff::SignedDuration::try_from(ago).unwrap();
    prost_types::Timestamp {
        seconds: t.as_second(),
        nanos: t.subsec_nanosecond(),
    }
}

/// How long a test heartbeat lasts: far longer than any `eventually` waits, so a node
/// lapses only when a test says so, however slow the machine.
const LEASE: Duration = Duration::from_secs(3600);
/// A renewal this long ago has lapsed.
const LAPSED: Duration = Duration::from_secs(2 * 3600);

/// Writes a node's heartbeat Lease as renewed `ago`, for [`LEASE`].
async fn heartbeat(cloud: &Cloud, name: &str, ago: Duration) {
    let lease_name = format!("node-{name}");
    let spec = v1::LeaseSpec {
        holder_identity: name.into(),
        lease_duration_seconds: LEASE.as_secs() as u32,
        renew_time: Some(timestamp(ago)),
        ..Default::default()
    };
    match cloud.admin.get_typed::<v1::Lease>("", &lease_name).await {
        Ok(mut lease) => {
            lease.spec = Some(spec);
            cloud
                .admin
                .update(Object::Lease(lease))
                .await
                .expect("renew");
        }
        Err(_) => {
            let lease = v1::Lease {
                metadata: Some(v1::ObjectMeta {
                    name: lease_name,
                    ..Default::default()
                }),
                spec: Some(spec),
                status: None,
            };
            cloud
                .admin
                .create(Object::Lease(lease))
                .await
                .expect("lease");
        }
    }
}

/// Registers a node as its agent would, with these roles and a current heartbeat.
async fn node(cloud: &Cloud, name: &str, roles: &[v1::node_status::Role]) {
    cloud
        .create(&format!(
            "apiVersion: ferro/v1\nkind: Node\nmetadata: {{name: {name}}}\nspec: {{}}\n"
        ))
        .await;
    let object = Object::Node(v1::Node {
        metadata: Some(v1::ObjectMeta {
            name: name.into(),
            ..Default::default()
        }),
        spec: None,
        status: Some(v1::NodeStatus {
            roles: roles.iter().map(|r| *r as i32).collect(),
            network_driver: "ovs".into(),
            ..Default::default()
        }),
    });
    let host_ready = v1::Condition {
        r#type: "HostReady".into(),
        status: v1::condition::Status::True as i32,
        reason: "HostReady".into(),
        message: "ok".into(),
        ..Default::default()
    };
    cloud
        .admin
        .update_status(
            object,
            owners::AGENT,
            &["roles", "networkDriver"],
            vec![host_ready],
        )
        .await
        .expect("node status");
    heartbeat(cloud, name, Duration::ZERO).await;
}

/// Waits until node lifecycle has declared the node `Ready`.
async fn ready_node(cloud: &Cloud, name: &str) {
    eventually(&format!("node {name} Ready"), || async {
        let node = cloud.admin.get_typed::<v1::Node>("", name).await.ok()?;
        node.status
            .as_ref()?
            .conditions
            .iter()
            .any(|c| c.r#type == "Ready" && c.status == v1::condition::Status::True as i32)
            .then_some(())
    })
    .await;
}

const NETWORK: v1::node_status::Role = v1::node_status::Role::Network;
const COMPUTE: v1::node_status::Role = v1::node_status::Role::Compute;

async fn external_network(cloud: &Cloud, name: &str, external: bool) -> v1::Network {
    let object = cloud
        .create(&format!(
            "apiVersion: ferro/v1\nkind: Network\nmetadata: {{name: {name}}}\nspec:\n  external: {external}\n  subnets:\n  - name: v4\n    cidr: 203.0.113.0/24\n    dhcp: false\n    allocationPools: [{{start: 203.0.113.10, end: 203.0.113.20}}]\n"
        ))
        .await;
    v1::Network::from_object(object).unwrap()
}

async fn router(cloud: &Cloud, name: &str, gateway: &str) {
    cloud
        .create(&format!(
            "apiVersion: ferro/v1\nkind: Router\nmetadata: {{name: {name}}}\nspec: {{externalGateway: {gateway}}}\n"
        ))
        .await;
}

async fn get(cloud: &Cloud, name: &str) -> Option<v1::Router> {
    cloud
        .admin
        .get_typed::<v1::Router>("default", name)
        .await
        .ok()
}

fn condition<'a>(router: &'a v1::Router, kind: &str) -> Option<&'a v1::Condition> {
    router
        .status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.r#type == kind)
}

/// The condition's `(status is True, reason)`.
fn says(router: &v1::Router, kind: &str) -> Option<(bool, String)> {
    condition(router, kind).map(|c| {
        (
            c.status == v1::condition::Status::True as i32,
            c.reason.clone(),
        )
    })
}

fn node_of(router: &v1::Router) -> &str {
    router
        .status
        .as_ref()
        .map(|s| s.node.as_str())
        .unwrap_or_default()
}

fn external_ips(router: &v1::Router) -> Vec<String> {
    router
        .status
        .as_ref()
        .map(|s| s.external_ips.clone())
        .unwrap_or_default()
}

use ferro_api::Resource;

/// Writes the router's `Plumbed=True` as its node's agent would, with this message.
async fn plumbed(cloud: &Cloud, name: &str, message: &str) {
    let object = Object::Router(v1::Router {
        metadata: Some(v1::ObjectMeta {
            name: name.into(),
            project: "default".into(),
            ..Default::default()
        }),
        spec: None,
        status: Some(v1::RouterStatus::default()),
    });
    let condition = v1::Condition {
        r#type: "Plumbed".into(),
        status: v1::condition::Status::True as i32,
        reason: "Built".into(),
        message: message.into(),
        ..Default::default()
    };
    cloud
        .admin
        .update_status(object, owners::AGENT, &[], vec![condition])
        .await
        .expect("Plumbed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routers_spread_over_network_nodes_with_distinct_gateway_addresses() {
    let cloud = Cloud::start().await;
    let controllers = cloud.controllers();
    node(&cloud, "net-1", &[NETWORK]).await;
    node(&cloud, "net-2", &[NETWORK, COMPUTE]).await;
    node(&cloud, "compute-1", &[COMPUTE]).await;
    // Placement spreads over the nodes it sees Ready: all of them, before any router.
    for name in ["net-1", "net-2", "compute-1"] {
        ready_node(&cloud, name).await;
    }
    let public = external_network(&cloud, "public", true).await;
    router(&cloud, "fixed", "{network: public, fixedIp: 203.0.113.15}").await;
    for i in 0..3 {
        router(&cloud, &format!("r{i}"), "{network: public}").await;
    }
    let routers = eventually("four placed, addressed routers", || async {
        let routers = cloud.list::<v1::Router>().await;
        let done = routers.iter().all(|r| {
            !node_of(r).is_empty()
                && external_ips(r).len() == 1
                && says(r, "ExternalGateway") == Some((true, "Allocated".into()))
        });
        (routers.len() == 4 && done).then_some(routers)
    })
    .await;
    let mut per_node: BTreeMap<String, usize> = BTreeMap::new();
    for r in &routers {
        *per_node.entry(node_of(r).to_owned()).or_default() += 1;
        assert_eq!(says(r, "Scheduled"), Some((true, "Scheduled".into())));
        // Nothing builds routers here: not Ready until an agent says so.
        assert_eq!(says(r, "Ready"), Some((false, "WaitingForAgent".into())));
    }
    assert_eq!(
        per_node,
        BTreeMap::from([("net-1".to_owned(), 2), ("net-2".to_owned(), 2)]),
        "spread over the network nodes only"
    );
    let fixed = routers
        .iter()
        .find(|r| common::name(*r) == "fixed")
        .unwrap();
    assert_eq!(external_ips(fixed), ["203.0.113.15"]);
    let mut addresses: Vec<String> = routers.iter().flat_map(external_ips).collect();
    addresses.sort();
    addresses.dedup();
    assert_eq!(
        addresses.len(),
        4,
        "distinct gateway addresses: {addresses:?}"
    );
    let claims = cloud.list::<v1::IpAddress>().await;
    for r in &routers {
        let ip: IpAddr = external_ips(r)[0].parse().unwrap();
        let claim = claims
            .iter()
            .find(|c| common::name(*c) == ip_claim_name(&uid(&public), ip))
            .expect("a claim per gateway address");
        assert_eq!(owner_uid(claim), uid(r));
    }

    // The same claims as Ports': a Port cannot take a router's address.
    cloud
        .create("apiVersion: ferro/v1\nkind: Port\nmetadata: {name: thief}\nspec: {network: public, fixedIps: [{ipAddress: 203.0.113.15}]}\n")
        .await;
    eventually("the port refused the router's address", || async {
        let port = cloud
            .admin
            .get_typed::<v1::Port>("default", "thief")
            .await
            .ok()?;
        common::ready(&port)
            .filter(|c| c.reason == "IpAddressInUse")
            .map(|_| ())
    })
    .await;
    controllers.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_waits_for_a_network_node_and_an_external_network() {
    let cloud = Cloud::start().await;
    let controllers = cloud.controllers();
    router(&cloud, "edge", "{network: public}").await;
    router(&cloud, "wrong", "{network: private}").await;
    let edge = eventually("edge says why it waits", || async {
        let r = get(&cloud, "edge").await?;
        (says(&r, "Scheduled") == Some((false, "NoNetworkNode".into()))
            && says(&r, "ExternalGateway") == Some((false, "NetworkNotFound".into())))
        .then_some(r)
    })
    .await;
    assert!(node_of(&edge).is_empty());
    eventually("an Event says why the router is not placed", || async {
        let events = cloud.list::<v1::Event>().await;
        events
            .iter()
            .any(|e| {
                e.spec.as_ref().is_some_and(|spec| {
                    spec.reason == "NoNetworkNode"
                        && spec
                            .involved_object
                            .as_ref()
                            .is_some_and(|o| o.name == "edge")
                })
            })
            .then_some(())
    })
    .await;

    // A compute node is no use; a network node is.
    node(&cloud, "compute-1", &[COMPUTE]).await;
    node(&cloud, "net-1", &[NETWORK]).await;
    eventually("edge placed on the network node", || async {
        let r = get(&cloud, "edge").await?;
        (node_of(&r) == "net-1").then_some(())
    })
    .await;

    // A network that is not external is a condition; an external one resolves it.
    external_network(&cloud, "private", false).await;
    eventually("wrong says the network is not external", || async {
        let r = get(&cloud, "wrong").await?;
        (says(&r, "ExternalGateway") == Some((false, "NetworkNotExternal".into()))).then_some(())
    })
    .await;
    external_network(&cloud, "public", true).await;
    let edge = eventually("edge's gateway addressed", || async {
        let r = get(&cloud, "edge").await?;
        (says(&r, "ExternalGateway") == Some((true, "Allocated".into()))).then_some(r)
    })
    .await;
    assert_eq!(external_ips(&edge).len(), 1);
    let wrong = get(&cloud, "wrong").await.unwrap();
    assert!(external_ips(&wrong).is_empty());
    controllers.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_router_releases_its_address() {
    let cloud = Cloud::start().await;
    let controllers = cloud.controllers();
    node(&cloud, "net-1", &[NETWORK]).await;
    external_network(&cloud, "public", true).await;
    router(&cloud, "edge", "{network: public, fixedIp: 203.0.113.12}").await;
    let edge = eventually("edge addressed", || async {
        let r = get(&cloud, "edge").await?;
        (external_ips(&r) == ["203.0.113.12"]).then_some(r)
    })
    .await;
    assert!(
        edge.metadata
            .as_ref()
            .unwrap()
            .finalizers
            .iter()
            .any(|f| f == ferro_controllers::router::ROUTER_FINALIZER)
    );
    cloud.delete(Kind::Router, "default", "edge").await;
    eventually("the router and its claim gone", || async {
        let gone = get(&cloud, "edge").await.is_none();
        let (claims, _) = cloud
            .admin
            .list(Kind::IPAddress, &Selection::all())
            .await
            .ok()?;
        (gone && claims.is_empty()).then_some(())
    })
    .await;
    // The address is free again: another router gets it.
    router(&cloud, "next", "{network: public, fixedIp: 203.0.113.12}").await;
    eventually("next takes the released address", || async {
        let r = get(&cloud, "next").await?;
        (external_ips(&r) == ["203.0.113.12"]).then_some(())
    })
    .await;
    controllers.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_on_a_lost_node_moves_to_another_network_node() {
    let cloud = Cloud::start().await;
    let controllers = cloud.controllers();
    node(&cloud, "net-1", &[NETWORK]).await;
    external_network(&cloud, "public", true).await;
    router(&cloud, "edge", "{network: public}").await;
    let placed = eventually("edge placed on net-1", || async {
        let r = get(&cloud, "edge").await?;
        (node_of(&r) == "net-1" && external_ips(&r).len() == 1).then_some(r)
    })
    .await;
    node(&cloud, "net-2", &[NETWORK]).await;
    ready_node(&cloud, "net-2").await;
    // A second network node appearing does not move a placed router: once a new router
    // lands on net-2, the controller has seen net-2 Ready, and edge is still on net-1.
    router(&cloud, "probe", "{network: public}").await;
    eventually("probe placed on net-2", || async {
        (node_of(&get(&cloud, "probe").await?) == "net-2").then_some(())
    })
    .await;
    assert_eq!(node_of(&get(&cloud, "edge").await.unwrap()), "net-1");

    // net-1's heartbeat lapses: node lifecycle declares it lost.
    heartbeat(&cloud, "net-1", LAPSED).await;
    let moved = eventually("edge moved to net-2", || async {
        let r = get(&cloud, "edge").await?;
        (node_of(&r) == "net-2").then_some(r)
    })
    .await;
    let scheduled = condition(&moved, "Scheduled").unwrap();
    assert_eq!(scheduled.reason, "FailedOver");
    assert!(
        scheduled
            .message
            .starts_with("moved to node net-2 from lost node net-1"),
        "{}",
        scheduled.message
    );
    assert_eq!(
        external_ips(&moved),
        external_ips(&placed),
        "the gateway address moves with the router"
    );
    eventually("an Event tells of the move", || async {
        cloud
            .list::<v1::Event>()
            .await
            .iter()
            .any(|e| e.spec.as_ref().is_some_and(|s| s.reason == "FailedOver"))
            .then_some(())
    })
    .await;
    // net-1 comes back: the router stays where it was moved. Once net-1 is Ready again,
    // net-2's agent reports the router built; when the router turns Ready on that, it was
    // planned with net-1 back, and stayed.
    heartbeat(&cloud, "net-1", Duration::ZERO).await;
    ready_node(&cloud, "net-1").await;
    plumbed(&cloud, "edge", "node net-2: qrouter built").await;
    let after = eventually("edge Ready on net-2", || async {
        let r = get(&cloud, "edge").await?;
        (says(&r, "Ready") == Some((true, "Plumbed".into()))).then_some(r)
    })
    .await;
    assert_eq!(node_of(&after), "net-2");
    assert_eq!(condition(&after, "Scheduled").unwrap().reason, "FailedOver");
    controllers.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_on_a_lost_node_with_nowhere_to_go_says_so() {
    let cloud = Cloud::start().await;
    let controllers = cloud.controllers();
    node(&cloud, "net-1", &[NETWORK]).await;
    router(&cloud, "edge", "{network: public}").await;
    eventually("edge placed", || async {
        (node_of(&get(&cloud, "edge").await?) == "net-1").then_some(())
    })
    .await;
    heartbeat(&cloud, "net-1", LAPSED).await;
    let stranded = eventually("edge stranded", || async {
        let r = get(&cloud, "edge").await?;
        (says(&r, "Scheduled") == Some((false, "NodeLost".into()))).then_some(r)
    })
    .await;
    assert_eq!(
        node_of(&stranded),
        "net-1",
        "the decision stays until a node fits"
    );
    assert_eq!(says(&stranded, "Ready"), Some((false, "NodeLost".into())));
    node(&cloud, "net-2", &[NETWORK]).await;
    eventually("edge moved once a node fits", || async {
        (node_of(&get(&cloud, "edge").await?) == "net-2").then_some(())
    })
    .await;
    controllers.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_gateway_clears_status_then_frees_the_address() {
    let cloud = Cloud::start().await;
    let controllers = cloud.controllers();
    node(&cloud, "net-1", &[NETWORK]).await;
    external_network(&cloud, "public", true).await;
    router(&cloud, "edge", "{network: public, fixedIp: 203.0.113.12}").await;
    let mut edge = eventually("edge addressed", || async {
        let r = get(&cloud, "edge").await?;
        (external_ips(&r) == ["203.0.113.12"]).then_some(r)
    })
    .await;
    edge.spec.as_mut().unwrap().external_gateway = None;
    edge.status = None;
    cloud
        .admin
        .update(Object::Router(edge))
        .await
        .expect("drop the gateway");
    eventually(
        "status no longer names the address and its claim is gone",
        || async {
            let r = get(&cloud, "edge").await?;
            let claims = cloud.list::<v1::IpAddress>().await;
            (external_ips(&r).is_empty() && claims.is_empty()).then_some(())
        },
    )
    .await;
    router(&cloud, "next", "{network: public, fixedIp: 203.0.113.12}").await;
    eventually("next takes the freed address", || async {
        let r = get(&cloud, "next").await?;
        (external_ips(&r) == ["203.0.113.12"]).then_some(())
    })
    .await;
    controllers.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_projects_own_network_named_like_the_external_one_does_not_take_the_address() {
    let cloud = Cloud::start().await;
    let controllers = cloud.controllers();
    node(&cloud, "net-1", &[NETWORK]).await;
    let public = cloud
        .create("apiVersion: ferro/v1\nkind: Network\nmetadata: {name: public, project: admin}\nspec:\n  external: true\n  subnets:\n  - name: v4\n    cidr: 203.0.113.0/24\n    dhcp: false\n    allocationPools: [{start: 203.0.113.10, end: 203.0.113.20}]\n")
        .await;
    let public_uid = public.metadata().unwrap().uid.clone();
    router(&cloud, "edge", "{network: public}").await;
    let placed = eventually("edge addressed on admin's public", || async {
        let r = get(&cloud, "edge").await?;
        (external_ips(&r).len() == 1).then_some(r)
    })
    .await;
    // The project makes a network of its own with the same name: it resolves first by
    // name, but the held address stays on the network it was claimed on.
    cloud.network("public", "10.9.0.0/24").await;
    // net-1's agent then reports the router built: the router is planned again (after
    // the controllers saw the new network, created first) and turns Ready, its address
    // kept.
    plumbed(&cloud, "edge", "node net-1: qrouter built").await;
    let after = eventually("edge Ready", || async {
        let r = get(&cloud, "edge").await?;
        (says(&r, "Ready") == Some((true, "Plumbed".into()))).then_some(r)
    })
    .await;
    assert_eq!(external_ips(&after), external_ips(&placed));
    assert_eq!(
        says(&after, "ExternalGateway"),
        Some((true, "Allocated".into()))
    );
    let claims = cloud.list::<v1::IpAddress>().await;
    assert_eq!(claims.len(), 1);
    assert_eq!(claims[0].spec.as_ref().unwrap().network_uid, public_uid);
    controllers.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_routers_on_one_subnet_the_later_says_so() {
    let cloud = Cloud::start().await;
    let controllers = cloud.controllers();
    node(&cloud, "net-1", &[NETWORK]).await;
    // Both pass admission: the network does not exist yet, as when two applies race.
    let legs = "{interfaces: [{network: later, subnet: a}]}";
    cloud
        .create(&format!(
            "apiVersion: ferro/v1\nkind: Router\nmetadata: {{name: first}}\nspec: {legs}\n"
        ))
        .await;
    cloud
        .create(&format!(
            "apiVersion: ferro/v1\nkind: Router\nmetadata: {{name: second}}\nspec: {legs}\n"
        ))
        .await;
    cloud.network("later", "10.0.7.0/24").await;
    let second = eventually("second says its subnet is taken", || async {
        let r = get(&cloud, "second").await?;
        (says(&r, "Interfaces") == Some((false, "InterfaceConflict".into()))).then_some(r)
    })
    .await;
    assert_eq!(
        condition(&second, "Interfaces").unwrap().message,
        "subnet a of network later already has router default/first"
    );
    assert_eq!(
        says(&second, "Ready"),
        Some((false, "InterfaceConflict".into()))
    );
    let first = eventually("first keeps it", || async {
        let r = get(&cloud, "first").await?;
        (says(&r, "Interfaces") == Some((true, "NoConflict".into()))).then_some(r)
    })
    .await;
    assert_eq!(
        says(&first, "Ready"),
        Some((false, "WaitingForAgent".into()))
    );
    // The first goes: the second has the subnet.
    cloud.delete(Kind::Router, "default", "first").await;
    eventually("second has the subnet once first is gone", || async {
        let r = get(&cloud, "second").await?;
        (says(&r, "Interfaces") == Some((true, "NoConflict".into()))).then_some(())
    })
    .await;
    controllers.abort();
}
