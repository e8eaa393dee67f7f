//! The scheduler and node lifecycle against an in-process apiserver: Nodes play their
//! agents (registered status, heartbeat Leases renewed by the test), Servers are placed
//! without oversubscribing any node, groups are honoured, and a lapsed heartbeat turns
//! bound Servers unreachable and back.

mod common;

use std::collections::BTreeMap;

use common::{Cloud, eventually};
use ferro_api::{Object, Resource, owners, v1};

fn now() -> prost_types::Timestamp {
    let t = jiff::Timestamp::now();
    prost_types::Timestamp {
        seconds: t.as_second(),
        nanos: t.subsec_nanosecond(),
    }
}

/// Registers a node as its agent would: the Node, its status and a fresh Lease.
async fn node(cloud: &Cloud, name: &str, zone: &str, ram_mib: u64, lease_seconds: u32) {
    cloud
        .create(&format!(
            "apiVersion: ferro/v1\nkind: Node\nmetadata: {{name: {name}}}\nspec: {{}}\n"
        ))
        .await;
    let status = v1::NodeStatus {
        capacity: Some(v1::NodeResources {
            vcpus: 4,
            ram_mib,
            disk_gib: 100,
        }),
        allocatable: Some(v1::NodeResources {
            vcpus: 4,
            ram_mib,
            disk_gib: 100,
        }),
        hypervisor: "QEMU".into(),
        network_driver: "ovs".into(),
        zone: zone.into(),
        ..Default::default()
    };
    let object = Object::Node(v1::Node {
        metadata: Some(v1::ObjectMeta {
            name: name.into(),
            ..Default::default()
        }),
        spec: None,
        status: Some(status),
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
        .expect("node status");
    renew(cloud, name, lease_seconds).await;
}

/// Renews (or creates) a node's heartbeat Lease.
async fn renew(cloud: &Cloud, name: &str, lease_seconds: u32) {
    let lease_name = format!("node-{name}");
    let spec = v1::LeaseSpec {
        holder_identity: name.into(),
        lease_duration_seconds: lease_seconds,
        renew_time: Some(now()),
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

async fn flavor(cloud: &Cloud, name: &str, ram_mib: u64) {
    cloud
        .create(&format!(
            "apiVersion: ferro/v1\nkind: Flavor\nmetadata: {{name: {name}}}\nspec: {{vcpus: 1, ramMib: {ram_mib}, diskGib: 1}}\n"
        ))
        .await;
}

async fn server(cloud: &Cloud, name: &str, flavor: &str, extra: &str) {
    cloud
        .create(&format!(
            "apiVersion: ferro/v1\nkind: Server\nmetadata: {{name: {name}}}\nspec: {{flavor: {flavor}, image: tiny{extra}}}\n"
        ))
        .await;
}

fn condition<'a>(server: &'a v1::Server, kind: &str) -> Option<&'a v1::Condition> {
    server
        .status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.r#type == kind)
}

fn node_of(server: &v1::Server) -> &str {
    server
        .status
        .as_ref()
        .map(|s| s.node.as_str())
        .unwrap_or_default()
}

fn name(server: &v1::Server) -> &str {
    server
        .metadata()
        .map(|m| m.name.as_str())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_servers_never_oversubscribe_a_node() {
    let cloud = Cloud::start().await;
    let controllers = cloud.controllers();
    // 8 GiB × 1.5 overcommit = 12288 MiB per node: 17 servers of 720 MiB each, 51 in all.
    for n in ["n1", "n2", "n3"] {
        node(&cloud, n, "az1", 8192, 40).await;
    }
    flavor(&cloud, "m1", 720).await;
    let mut creates = Vec::new();
    for i in 0..60 {
        let cloud = &cloud;
        creates.push(async move { server(cloud, &format!("s{i:02}"), "m1", "").await });
    }
    futures::future::join_all(creates).await;
    let servers = eventually("51 bound and 9 refused", || async {
        let servers = cloud.list::<v1::Server>().await;
        let bound = servers.iter().filter(|s| !node_of(s).is_empty()).count();
        let refused = servers
            .iter()
            .filter(|s| condition(s, "Scheduled").is_some_and(|c| c.reason == "NoValidHost"))
            .count();
        (bound == 51 && refused == 9).then_some(servers)
    })
    .await;
    let mut per_node: BTreeMap<&str, usize> = BTreeMap::new();
    for s in servers.iter().filter(|s| !node_of(s).is_empty()) {
        *per_node.entry(node_of(s)).or_default() += 1;
        let scheduled = condition(s, "Scheduled").expect("Scheduled");
        assert_eq!(scheduled.status, v1::condition::Status::True as i32);
        let flavor = s
            .status
            .as_ref()
            .unwrap()
            .flavor
            .as_ref()
            .expect("flavor copy");
        assert_eq!(flavor.ram_mib, 720);
    }
    assert_eq!(
        per_node,
        BTreeMap::from([("n1", 17), ("n2", 17), ("n3", 17)])
    );
    // Each placement is told as one Scheduled event naming the node; each refused server
    // has one NoValidHost Event, however often it was refused.
    let events = eventually("a Scheduled event per bound server", || async {
        let events = cloud.list::<v1::Event>().await;
        let scheduled = events
            .iter()
            .filter(|e| e.spec.as_ref().is_some_and(|s| s.reason == "Scheduled"))
            .count();
        (scheduled == 51).then_some(events)
    })
    .await;
    for s in servers.iter().filter(|s| !node_of(s).is_empty()) {
        let expected = format!(
            "Successfully assigned default/{} to {}",
            name(s),
            node_of(s)
        );
        assert!(
            events.iter().any(|e| e
                .spec
                .as_ref()
                .is_some_and(|e| e.reason == "Scheduled" && e.message == expected)),
            "{expected}"
        );
    }
    let mut refusals: BTreeMap<String, usize> = BTreeMap::new();
    for spec in events.iter().filter_map(|e| e.spec.as_ref()) {
        if spec.reason == "NoValidHost" {
            let uid = spec.involved_object.as_ref().unwrap().uid.clone();
            *refusals.entry(uid).or_default() += 1;
        }
    }
    assert!(refusals.values().all(|n| *n == 1), "{refusals:?}");
    let refused = servers
        .iter()
        .find(|s| node_of(s).is_empty())
        .and_then(|s| condition(s, "Scheduled"))
        .unwrap();
    assert_eq!(refused.message, "3 nodes: 3 insufficient RAM");
    // A new node is a Node change: the refused servers are tried again and placed there.
    node(&cloud, "n4", "az1", 8192, 40).await;
    eventually("the waiting servers placed on n4", || async {
        let servers = cloud.list::<v1::Server>().await;
        let on_n4 = servers.iter().filter(|s| node_of(s) == "n4").count();
        (on_n4 == 9).then_some(())
    })
    .await;
    controllers.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filters_and_groups_decide_where_servers_go() {
    let cloud = Cloud::start().await;
    let controllers = cloud.controllers();
    node(&cloud, "a1", "az1", 8192, 40).await;
    node(&cloud, "a2", "az1", 8192, 40).await;
    node(&cloud, "b1", "az2", 8192, 40).await;
    flavor(&cloud, "small", 512).await;
    cloud
        .create("apiVersion: ferro/v1\nkind: Flavor\nmetadata: {name: ssd}\nspec: {vcpus: 1, ramMib: 512, diskGib: 1, extraSpecs: {aggregate/ssd: \"true\"}}\n")
        .await;
    cloud
        .create("apiVersion: ferro/v1\nkind: ServerGroup\nmetadata: {name: together}\nspec: {policy: Affinity}\n")
        .await;
    cloud
        .create("apiVersion: ferro/v1\nkind: ServerGroup\nmetadata: {name: apart}\nspec: {policy: AntiAffinity}\n")
        .await;
    server(&cloud, "zoned", "small", ", availabilityZone: az2").await;
    server(&cloud, "nowhere", "small", ", availabilityZone: az9").await;
    server(&cloud, "fast", "ssd", "").await;
    for i in 0..4 {
        server(&cloud, &format!("t{i}"), "small", ", serverGroup: together").await;
    }
    for i in 0..4 {
        server(&cloud, &format!("x{i}"), "small", ", serverGroup: apart").await;
    }
    let servers = eventually("every server decided", || async {
        let servers = cloud.list::<v1::Server>().await;
        servers
            .iter()
            .all(|s| condition(s, "Scheduled").is_some())
            .then_some(servers)
    })
    .await;
    let by_name: BTreeMap<&str, &v1::Server> = servers.iter().map(|s| (name(s), s)).collect();
    assert_eq!(node_of(by_name["zoned"]), "b1");
    let nowhere = condition(by_name["nowhere"], "Scheduled").unwrap();
    assert_eq!(nowhere.reason, "NoValidHost");
    assert_eq!(nowhere.message, "3 nodes: 3 zone mismatch");
    let fast = condition(by_name["fast"], "Scheduled").unwrap();
    assert_eq!(fast.message, "3 nodes: 3 aggregate mismatch");
    let together: Vec<&str> = (0..4)
        .map(|i| node_of(by_name[format!("t{i}").as_str()]))
        .collect();
    assert!(
        together.iter().all(|n| !n.is_empty() && *n == together[0]),
        "{together:?}"
    );
    let apart: Vec<&str> = (0..4)
        .map(|i| node_of(by_name[format!("x{i}").as_str()]))
        .filter(|n| !n.is_empty())
        .collect();
    let mut distinct = apart.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(
        apart.len(),
        3,
        "three nodes hold one member each: {apart:?}"
    );
    assert_eq!(distinct.len(), 3);
    let refused = (0..4)
        .filter_map(|i| condition(by_name[format!("x{i}").as_str()], "Scheduled"))
        .find(|c| c.reason == "NoValidHost")
        .expect("the fourth member is refused");
    assert_eq!(refused.message, "3 nodes: 3 anti-affinity conflict");
    // Each group lists its members, placed or not.
    let members = |group: &'static str| {
        let cloud = &cloud;
        async move {
            cloud
                .admin
                .get_typed::<v1::ServerGroup>("default", group)
                .await
                .ok()
                .and_then(|g| g.status)
                .map(|s| s.members)
                .unwrap_or_default()
        }
    };
    eventually("the groups list their members", || async {
        (members("together").await == ["t0", "t1", "t2", "t3"]
            && members("apart").await == ["x0", "x1", "x2", "x3"])
        .then_some(())
    })
    .await;
    // Labelling a node as an ssd host places the waiting server there.
    let mut a2 = cloud.admin.get_typed::<v1::Node>("", "a2").await.unwrap();
    a2.spec
        .get_or_insert_with(Default::default)
        .labels
        .insert("ssd".into(), "true".into());
    cloud.admin.update(Object::Node(a2)).await.unwrap();
    eventually("fast placed on a2", || async {
        let fast = cloud
            .admin
            .get_typed::<v1::Server>("default", "fast")
            .await
            .ok()?;
        (node_of(&fast) == "a2").then_some(())
    })
    .await;
    // A cordoned node takes nothing new.
    let mut b1 = cloud.admin.get_typed::<v1::Node>("", "b1").await.unwrap();
    b1.spec.get_or_insert_with(Default::default).unschedulable = true;
    cloud.admin.update(Object::Node(b1)).await.unwrap();
    server(&cloud, "late", "small", ", availabilityZone: az2").await;
    eventually("late refused", || async {
        let late = cloud
            .admin
            .get_typed::<v1::Server>("default", "late")
            .await
            .ok()?;
        let c = condition(&late, "Scheduled")?;
        (c.message == "3 nodes: 2 zone mismatch, 1 unschedulable").then_some(())
    })
    .await;
    controllers.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lapsed_heartbeat_turns_servers_unknown_and_back() {
    let cloud = Cloud::start().await;
    let controllers = cloud.controllers();
    // A 2 s lease that the test stops renewing.
    node(&cloud, "n1", "az1", 8192, 2).await;
    flavor(&cloud, "small", 512).await;
    server(&cloud, "s1", "small", "").await;
    eventually("s1 bound", || async {
        let s = cloud
            .admin
            .get_typed::<v1::Server>("default", "s1")
            .await
            .ok()?;
        (node_of(&s) == "n1").then_some(())
    })
    .await;
    let unknown = v1::condition::Status::Unknown as i32;
    eventually("s1 unreachable and n1 Ready=Unknown", || async {
        let s = cloud
            .admin
            .get_typed::<v1::Server>("default", "s1")
            .await
            .ok()?;
        let n = cloud.admin.get_typed::<v1::Node>("", "n1").await.ok()?;
        let reachable = condition(&s, "NodeReachable")?.status == unknown;
        let ready =
            n.status?.conditions.iter().any(|c| {
                c.r#type == "Ready" && c.status == unknown && c.reason == "HeartbeatLapsed"
            });
        (reachable && ready).then_some(())
    })
    .await;
    renew(&cloud, "n1", 40).await;
    eventually("s1 reachable again", || async {
        let s = cloud
            .admin
            .get_typed::<v1::Server>("default", "s1")
            .await
            .ok()?;
        let c = condition(&s, "NodeReachable")?;
        (c.status == v1::condition::Status::True as i32).then_some(())
    })
    .await;
    let n = cloud.admin.get_typed::<v1::Node>("", "n1").await.unwrap();
    assert!(
        n.status
            .unwrap()
            .conditions
            .iter()
            .any(|c| c.r#type == "Ready" && c.status == v1::condition::Status::True as i32)
    );
    controllers.abort();
}
