//! IPAM against an in-process apiserver: concurrency, exhaustion, crashes, two leaders.

mod common;

use std::{
    collections::{HashMap, HashSet},
    net::Ipv4Addr,
    sync::atomic::Ordering,
};

use common::{Cloud, decided, eventually, name, owner_uid, ready, uid};
use ferro_api::{Kind, v1};

/// Addresses and MACs of addressed Ports, checked unique; panics on a duplicate.
fn unique_addresses(ports: &[v1::Port]) -> (HashSet<String>, HashSet<String>) {
    let (mut ips, mut macs) = (HashSet::new(), HashSet::new());
    for port in ports.iter().filter(|p| decided(p)) {
        let status = port.status.as_ref().unwrap();
        for address in &status.addresses {
            assert!(
                ips.insert(address.ip.clone()),
                "{} handed out twice",
                address.ip
            );
        }
        assert!(
            macs.insert(status.mac.clone()),
            "MAC {} handed out twice",
            status.mac
        );
    }
    (ips, macs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_ports_from_twenty_clients_get_unique_addresses() {
    let cloud = Cloud::start().await;
    let controllers = cloud.controllers();
    cloud.network("net", "10.0.0.0/24").await;
    let mut clients = Vec::new();
    for c in 0..20 {
        let client =
            ferro_api::client::Client::connect_lazy(&cloud.address, "admin-token").unwrap();
        clients.push(tokio::spawn(async move {
            for i in 0..10 {
                let yaml = format!("apiVersion: ferro/v1\nkind: Port\nmetadata: {{name: p-{c}-{i}}}\nspec: {{network: net}}\n");
                let object = ferro_api::codec::decode_yaml(&yaml).unwrap().remove(0);
                client.create(object).await.expect("create port");
            }
        }));
    }
    for client in clients {
        client.await.unwrap();
    }
    let ports = eventually("200 addressed ports", || async {
        let ports = cloud.list::<v1::Port>().await;
        (ports.iter().filter(|p| decided(p)).count() == 200).then_some(ports)
    })
    .await;
    let (ips, macs) = unique_addresses(&ports);
    assert_eq!((ips.len(), macs.len()), (200, 200));
    for ip in &ips {
        let ip: Ipv4Addr = ip.parse().unwrap();
        let last = ip.octets()[3];
        assert!(
            ip.octets()[..3] == [10, 0, 0] && (2..=254).contains(&last),
            "{ip} is not a host address past the gateway"
        );
    }
    for port in &ports {
        let status = port.status.as_ref().unwrap();
        let mac = ferro_controllers::ipam::parse_mac(&status.mac).unwrap();
        assert_eq!(
            mac[0] & 0x03,
            0x02,
            "{} is locally administered unicast",
            status.mac
        );
        assert_eq!(ready(port).map(|c| c.reason.as_str()), Some("Allocated"));
    }
    // Exactly one claim per value, each owned by the Port that recorded it. An attempt
    // made from a cache that had not yet seen the Port's recorded decision may have
    // claimed a spare; the Port's next pass releases it.
    let claims = eventually("one address claim per port", || async {
        let claims = cloud.list::<v1::IpAddress>().await;
        let macs = cloud.list::<v1::MacAddress>().await;
        (claims.len() == 200 && macs.len() == 200).then_some(claims)
    })
    .await;
    let by_uid: HashMap<String, &v1::Port> = ports.iter().map(|p| (uid(p), p)).collect();
    for claim in &claims {
        let port = by_uid
            .get(&owner_uid(claim))
            .expect("every claim is owned by a port");
        let address = &claim.spec.as_ref().unwrap().address;
        assert!(
            port.status
                .as_ref()
                .unwrap()
                .addresses
                .iter()
                .any(|a| &a.ip == address)
        );
    }
    controllers.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_subnet_says_so_and_recovers_when_a_port_goes() {
    let cloud = Cloud::start().await;
    let controllers = cloud.controllers();
    // .0 network, .1 gateway, .7 broadcast: five addresses for six Ports.
    cloud.network("small", "10.9.0.0/29").await;
    for i in 0..6 {
        cloud.port(&format!("p{i}"), "small").await;
    }
    let (addressed, starved) = eventually("five addressed, one exhausted", || async {
        let ports = cloud.list::<v1::Port>().await;
        let addressed: Vec<v1::Port> = ports.iter().filter(|p| decided(p)).cloned().collect();
        let starved: Vec<v1::Port> = ports
            .iter()
            .filter(|p| ready(p).is_some_and(|c| c.reason == "IpAddressExhausted"))
            .cloned()
            .collect();
        (addressed.len() == 5 && starved.len() == 1).then_some((addressed, starved))
    })
    .await;
    let (ips, _) = unique_addresses(&addressed);
    let expected: HashSet<String> = (2..=6).map(|i| format!("10.9.0.{i}")).collect();
    assert_eq!(
        ips, expected,
        "everything but network, gateway and broadcast"
    );
    let starved = &starved[0];
    let condition = ready(starved).unwrap();
    assert_eq!(condition.status, v1::condition::Status::False as i32);
    assert!(
        condition.message.contains("10.9.0.0/29"),
        "{}",
        condition.message
    );
    let exhausted = |port: &v1::Port| {
        port.status
            .as_ref()
            .and_then(|s| {
                s.conditions
                    .iter()
                    .find(|c| c.r#type == "IpAddressExhausted")
            })
            .map(|c| c.status)
    };
    assert_eq!(
        exhausted(starved),
        Some(v1::condition::Status::True as i32),
        "its own condition type says so too"
    );

    // Free one address: the starved Port gets exactly that one.
    let victim = &addressed[0];
    let freed = victim.status.as_ref().unwrap().addresses[0].ip.clone();
    cloud.delete(Kind::Port, "default", &name(victim)).await;
    let starved_name = name(starved);
    let recovered = eventually("the starved port addressed", || async {
        let port = cloud
            .admin
            .get_typed::<v1::Port>("default", &starved_name)
            .await
            .ok()?;
        decided(&port).then_some(port)
    })
    .await;
    assert_eq!(recovered.status.as_ref().unwrap().addresses[0].ip, freed);
    assert_eq!(
        ready(&recovered).map(|c| c.reason.as_str()),
        Some("Allocated")
    );
    assert_eq!(
        exhausted(&recovered),
        Some(v1::condition::Status::False as i32)
    );
    // The deleted Port's claims are gone; nothing else leaked.
    eventually("claims match the addressed ports", || async {
        let ips = cloud.list::<v1::IpAddress>().await;
        let macs = cloud.list::<v1::MacAddress>().await;
        (ips.len() == 5 && macs.len() == 5).then_some(())
    })
    .await;
    let events = cloud.list::<v1::Event>().await;
    assert!(
        events.iter().any(|e| e
            .spec
            .as_ref()
            .is_some_and(|s| s.reason == "IpAddressExhausted")),
        "a warning event tells people"
    );
    controllers.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_claim_and_status_write_leaks_and_duplicates_nothing() {
    let cloud = Cloud::start().await;
    let first = cloud.controllers();
    cloud.network("net", "10.1.0.0/24").await;
    // Once the Network is Ready the controllers' caches hold it, so no Port stops at a
    // (held) NetworkNotFound report before claiming.
    eventually("the network ready", || async {
        let network = cloud
            .admin
            .get_typed::<v1::Network>("default", "net")
            .await
            .ok()?;
        network
            .status?
            .conditions
            .iter()
            .any(|c| c.r#type == "Ready" && c.status == v1::condition::Status::True as i32)
            .then_some(())
    })
    .await;
    cloud.hold_ipam_status.store(true, Ordering::SeqCst);
    // Fewer Ports than concurrent reconciles: every one gets to its held status write.
    for i in 0..12 {
        cloud.port(&format!("p{i}"), "net").await;
    }
    // Every Port has its claims, and none has recorded them: kill the controller now.
    let claimed = eventually("claims of all twelve ports", || async {
        let ips = cloud.list::<v1::IpAddress>().await;
        let macs = cloud.list::<v1::MacAddress>().await;
        (ips.len() == 12 && macs.len() == 12).then_some((ips, macs))
    })
    .await;
    first.abort();
    let _ = first.await;
    let ports = cloud.list::<v1::Port>().await;
    assert!(
        ports.iter().all(|p| !decided(p)),
        "no status write got through"
    );
    let before: HashMap<String, (String, String)> = {
        let (ips, macs) = &claimed;
        let mut by_port: HashMap<String, (String, String)> = HashMap::new();
        for claim in ips {
            by_port.entry(owner_uid(claim)).or_default().0 =
                claim.spec.as_ref().unwrap().address.clone();
        }
        for claim in macs {
            by_port.entry(owner_uid(claim)).or_default().1 =
                claim.spec.as_ref().unwrap().address.clone();
        }
        by_port
    };
    assert_eq!(before.len(), 12, "one address and one MAC per port");

    // A new controller reuses the claims: same values, nothing new, nothing leaked.
    cloud.hold_ipam_status.store(false, Ordering::SeqCst);
    let second = cloud.controllers();
    let ports = eventually("all twelve recorded", || async {
        let ports = cloud.list::<v1::Port>().await;
        (ports.iter().filter(|p| decided(p)).count() == 12).then_some(ports)
    })
    .await;
    unique_addresses(&ports);
    for port in &ports {
        let status = port.status.as_ref().unwrap();
        let (ip, mac) = &before[&uid(port)];
        assert_eq!(
            (&status.addresses[0].ip, &status.mac),
            (ip, mac),
            "{} recorded what it claimed before the crash",
            name(port)
        );
    }
    assert_eq!(cloud.list::<v1::IpAddress>().await.len(), 12);
    assert_eq!(cloud.list::<v1::MacAddress>().await.len(), 12);
    second.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_controllers_that_both_lead_never_share_an_address() {
    let cloud = Cloud::start().await;
    let (a, b) = (cloud.controllers(), cloud.controllers());
    cloud.network("net", "10.2.0.0/24").await;
    let mut creators = Vec::new();
    for c in 0..10 {
        let client =
            ferro_api::client::Client::connect_lazy(&cloud.address, "admin-token").unwrap();
        creators.push(tokio::spawn(async move {
            for i in 0..12 {
                let yaml = format!("apiVersion: ferro/v1\nkind: Port\nmetadata: {{name: p-{c}-{i}}}\nspec: {{network: net}}\n");
                client.create(ferro_api::codec::decode_yaml(&yaml).unwrap().remove(0)).await.unwrap();
            }
        }));
    }
    for c in creators {
        c.await.unwrap();
    }
    let ports = eventually("120 addressed ports", || async {
        let ports = cloud.list::<v1::Port>().await;
        (ports.iter().filter(|p| decided(p)).count() == 120).then_some(ports)
    })
    .await;
    let (ips, macs) = unique_addresses(&ports);
    assert_eq!((ips.len(), macs.len()), (120, 120));
    // Claims the losing writer made are released once the decision is recorded.
    eventually("exactly one claim per recorded value", || async {
        let ips = cloud.list::<v1::IpAddress>().await;
        let macs = cloud.list::<v1::MacAddress>().await;
        (ips.len() == 120 && macs.len() == 120).then_some(())
    })
    .await;
    a.abort();
    b.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_waits_for_its_network_and_fixed_addresses_are_honoured() {
    let cloud = Cloud::start().await;
    let controllers = cloud.controllers();
    cloud
        .create("apiVersion: ferro/v1\nkind: Port\nmetadata: {name: fixed}\nspec:\n  network: later\n  fixedIps: [{ipAddress: 10.3.0.50}]\n  macAddress: 02:aa:bb:cc:dd:ee\n")
        .await;
    cloud
        .create("apiVersion: ferro/v1\nkind: Port\nmetadata: {name: rival}\nspec:\n  network: later\n  fixedIps: [{subnet: a, ipAddress: 10.3.0.50}]\n")
        .await;
    eventually("NetworkNotFound reported", || async {
        let port = cloud
            .admin
            .get_typed::<v1::Port>("default", "fixed")
            .await
            .ok()?;
        ready(&port)
            .filter(|c| c.reason == "NetworkNotFound")
            .map(|_| ())
    })
    .await;
    // The Network appears: the waiting Ports are reconciled without any change of their own.
    cloud.network("later", "10.3.0.0/24").await;
    let (winner, loser) = eventually("one holds 10.3.0.50, the other is told", || async {
        let ports = cloud.list::<v1::Port>().await;
        let winner = ports.iter().find(|p| decided(p))?.clone();
        let loser = ports
            .iter()
            .find(|p| ready(p).is_some_and(|c| c.reason == "IpAddressInUse"))?
            .clone();
        Some((winner, loser))
    })
    .await;
    assert_eq!(winner.status.as_ref().unwrap().addresses[0].ip, "10.3.0.50");
    if name(&winner) == "fixed" {
        assert_eq!(winner.status.as_ref().unwrap().mac, "02:aa:bb:cc:dd:ee");
    }
    // The holder goes: the rival gets the address.
    cloud.delete(Kind::Port, "default", &name(&winner)).await;
    let loser_name = name(&loser);
    let promoted = eventually("the rival addressed", || async {
        let port = cloud
            .admin
            .get_typed::<v1::Port>("default", &loser_name)
            .await
            .ok()?;
        decided(&port).then_some(port)
    })
    .await;
    assert_eq!(
        promoted.status.as_ref().unwrap().addresses[0].ip,
        "10.3.0.50"
    );
    controllers.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_name_held_twice_is_ambiguous_until_the_own_project_has_one() {
    let cloud = Cloud::start().await;
    // Everything is there before the controllers list it: a Port seen while only one of
    // the two Networks is would resolve to that one, and decisions are final.
    for (project, cidr) in [("blue", "10.5.0.0/24"), ("green", "10.6.0.0/24")] {
        cloud
            .create(&format!(
                "apiVersion: ferro/v1\nkind: Network\nmetadata: {{name: public, project: {project}}}\nspec:\n  shared: true\n  subnets:\n  - {{name: a, cidr: {cidr}}}\n"
            ))
            .await;
    }
    cloud.port("p1", "public").await;
    let controllers = cloud.controllers();
    let ambiguous = eventually("NetworkAmbiguous reported", || async {
        let port = cloud
            .admin
            .get_typed::<v1::Port>("default", "p1")
            .await
            .ok()?;
        ready(&port)
            .filter(|c| c.reason == "NetworkAmbiguous")
            .cloned()
    })
    .await;
    assert_eq!(
        ambiguous.message,
        "Network public is ambiguous: shared networks of that name exist in projects blue, green"
    );
    // The Port's own project wins over both.
    let own = cloud.network("public", "10.7.0.0/24").await;
    let port = eventually("addressed on its own project's network", || async {
        let port = cloud
            .admin
            .get_typed::<v1::Port>("default", "p1")
            .await
            .ok()?;
        decided(&port).then_some(port)
    })
    .await;
    assert_eq!(port.status.unwrap().network_uid, uid(&own));
    controllers.abort();
}
