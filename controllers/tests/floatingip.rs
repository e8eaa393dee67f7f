//! The floating IP controller against an in-process apiserver over the in-memory store:
//! addresses from the external network's claims, association through the router that
//! connects the port's subnet to that network, in any order of creation; moving,
//! clearing and deleting.

mod common;

use std::net::IpAddr;

use common::{Cloud, eventually, owner_uid, uid};
use ferro_api::{Kind, Object, Resource, v1};
use ferro_controllers::ipam::ip_claim_name;

async fn external_network(cloud: &Cloud) -> v1::Network {
    let object = cloud
        .create("apiVersion: ferro/v1\nkind: Network\nmetadata: {name: public}\nspec:\n  external: true\n  subnets:\n  - name: v4\n    cidr: 203.0.113.0/24\n    dhcp: false\n    allocationPools: [{start: 203.0.113.10, end: 203.0.113.20}]\n")
        .await;
    v1::Network::from_object(object).unwrap()
}

async fn fip(cloud: &Cloud, name: &str, spec: &str) {
    cloud
        .create(&format!(
            "apiVersion: ferro/v1\nkind: FloatingIP\nmetadata: {{name: {name}}}\nspec: {spec}\n"
        ))
        .await;
}

async fn get(cloud: &Cloud, name: &str) -> Option<v1::FloatingIp> {
    cloud
        .admin
        .get_typed::<v1::FloatingIp>("default", name)
        .await
        .ok()
}

fn status(fip: &v1::FloatingIp) -> v1::FloatingIpStatus {
    fip.status.clone().unwrap_or_default()
}

/// The condition's `(status is True, reason)`.
fn says(fip: &v1::FloatingIp, kind: &str) -> Option<(bool, String)> {
    fip.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.r#type == kind)
        .map(|c| {
            (
                c.status == v1::condition::Status::True as i32,
                c.reason.clone(),
            )
        })
}

async fn port_ip(cloud: &Cloud, name: &str) -> String {
    eventually("the port addressed", || async {
        let port = cloud
            .admin
            .get_typed::<v1::Port>("default", name)
            .await
            .ok()?;
        port.status?.addresses.first().map(|a| a.ip.clone())
    })
    .await
}

async fn respec(cloud: &Cloud, name: &str, change: impl Fn(&mut v1::FloatingIpSpec)) {
    let mut fip = get(cloud, name).await.expect("the floating IP");
    change(fip.spec.as_mut().unwrap());
    fip.status = None;
    cloud
        .admin
        .update(Object::FloatingIP(fip))
        .await
        .expect("update");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_floating_ip_maps_to_a_port_through_the_router_that_connects_them() {
    let cloud = Cloud::start().await;
    let controllers = cloud.controllers();
    // In the "wrong" order: the floating IP first, then its port, then the router.
    fip(&cloud, "web-fip", "{network: public, port: web}").await;
    let waiting = eventually("the port is missing", || async {
        let f = get(&cloud, "web-fip").await?;
        (says(&f, "Associated") == Some((false, "PortNotFound".into()))).then_some(f)
    })
    .await;
    assert_eq!(
        says(&waiting, "Ready"),
        Some((false, "NetworkNotFound".into())),
        "no external network yet: a condition, not a refusal"
    );
    let public = external_network(&cloud).await;
    cloud.network("private", "10.0.1.0/24").await;
    cloud.port("web", "private").await;
    let web_ip = port_ip(&cloud, "web").await;
    eventually("no router connects them yet", || async {
        let f = get(&cloud, "web-fip").await?;
        let ok = says(&f, "Associated") == Some((false, "NoRouter".into()))
            && !status(&f).address.is_empty();
        ok.then_some(())
    })
    .await;
    cloud
        .create("apiVersion: ferro/v1\nkind: Router\nmetadata: {name: edge}\nspec: {externalGateway: {network: public}, interfaces: [{network: private, subnet: a}]}\n")
        .await;
    let mapped = eventually("associated through edge", || async {
        let f = get(&cloud, "web-fip").await?;
        (says(&f, "Associated") == Some((true, "Associated".into()))).then_some(f)
    })
    .await;
    let s = status(&mapped);
    assert_eq!(s.fixed_ip, web_ip);
    assert_eq!(s.router, "edge");
    let address: IpAddr = s.address.parse().unwrap();
    assert!(
        (10..=20).contains(&match address {
            IpAddr::V4(v4) => v4.octets()[3],
            IpAddr::V6(_) => 0,
        }),
        "{address} from the pool"
    );
    // Ready waits for the agent on the router's node.
    assert_eq!(
        says(&mapped, "Ready"),
        Some((false, "WaitingForAgent".into()))
    );
    let claim = cloud
        .list::<v1::IpAddress>()
        .await
        .into_iter()
        .find(|c| common::name(c) == ip_claim_name(&uid(&public), address))
        .expect("the address is claimed");
    assert_eq!(owner_uid(&claim), uid(&mapped));

    // Moving it to another port changes the mapping and keeps the address.
    cloud.port("api", "private").await;
    let api_ip = port_ip(&cloud, "api").await;
    respec(&cloud, "web-fip", |s| s.port = "api".into()).await;
    let moved = eventually("mapped to api", || async {
        let f = get(&cloud, "web-fip").await?;
        (status(&f).fixed_ip == api_ip).then_some(f)
    })
    .await;
    assert_eq!(status(&moved).address, address.to_string());

    // Clearing the target disassociates it.
    respec(&cloud, "web-fip", |s| s.port.clear()).await;
    let cleared = eventually("disassociated", || async {
        let f = get(&cloud, "web-fip").await?;
        (says(&f, "Associated") == Some((false, "NoTarget".into()))).then_some(f)
    })
    .await;
    assert_eq!(status(&cleared).fixed_ip, "");
    assert_eq!(status(&cleared).router, "");
    assert_eq!(status(&cleared).address, address.to_string());

    // Deleting it releases the address.
    cloud.delete(Kind::FloatingIP, "default", "web-fip").await;
    eventually("the floating IP and its claim gone", || async {
        let gone = get(&cloud, "web-fip").await.is_none();
        let claimed = cloud
            .list::<v1::IpAddress>()
            .await
            .iter()
            .any(|c| common::name(c) == ip_claim_name(&uid(&public), address));
        (gone && !claimed).then_some(())
    })
    .await;
    controllers.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_requested_address_is_given_once() {
    let cloud = Cloud::start().await;
    let controllers = cloud.controllers();
    external_network(&cloud).await;
    fip(&cloud, "first", "{network: public, address: 203.0.113.18}").await;
    eventually("first holds .18", || async {
        let f = get(&cloud, "first").await?;
        (status(&f).address == "203.0.113.18").then_some(())
    })
    .await;
    fip(&cloud, "second", "{network: public, address: 203.0.113.18}").await;
    let second = eventually("second told the address is taken", || async {
        let f = get(&cloud, "second").await?;
        (says(&f, "Ready") == Some((false, "IpAddressInUse".into()))).then_some(f)
    })
    .await;
    assert_eq!(status(&second).address, "");
    // A router asking for it is refused the same way: one space of claims.
    cloud
        .create("apiVersion: ferro/v1\nkind: Router\nmetadata: {name: edge}\nspec: {externalGateway: {network: public, fixedIp: 203.0.113.18}}\n")
        .await;
    eventually("the router told the address is taken", || async {
        let r = cloud
            .admin
            .get_typed::<v1::Router>("default", "edge")
            .await
            .ok()?;
        r.status?
            .conditions
            .iter()
            .any(|c| c.r#type == "ExternalGateway" && c.reason == "IpAddressInUse")
            .then_some(())
    })
    .await;
    // Once the first lets go, the second gets it.
    cloud.delete(Kind::FloatingIP, "default", "first").await;
    cloud.delete(Kind::Router, "default", "edge").await;
    eventually("second holds .18", || async {
        let f = get(&cloud, "second").await?;
        (status(&f).address == "203.0.113.18").then_some(())
    })
    .await;
    controllers.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_floating_ip_on_a_server_takes_its_first_routed_port() {
    let cloud = Cloud::start().await;
    let controllers = cloud.controllers();
    external_network(&cloud).await;
    cloud.network("isolated", "10.9.0.0/24").await;
    cloud.network("private", "10.0.1.0/24").await;
    cloud
        .create("apiVersion: ferro/v1\nkind: Router\nmetadata: {name: edge}\nspec: {externalGateway: {network: public}, interfaces: [{network: private, subnet: a}]}\n")
        .await;
    // Its first NIC is on a network no router reaches; the second is routed.
    cloud
        .create("apiVersion: ferro/v1\nkind: Server\nmetadata: {name: web}\nspec: {flavor: m1.tiny, image: tiny, networks: [{network: isolated}, {network: private}]}\n")
        .await;
    fip(&cloud, "web-fip", "{network: public, server: web}").await;
    let ports = eventually("the server's ports recorded", || async {
        let server = cloud
            .admin
            .get_typed::<v1::Server>("default", "web")
            .await
            .ok()?;
        let ports = server.status?.ports;
        (ports.len() == 2).then_some(ports)
    })
    .await;
    let routed_ip = port_ip(&cloud, &ports[1]).await;
    let mapped = eventually("mapped to the routed port", || async {
        let f = get(&cloud, "web-fip").await?;
        (says(&f, "Associated") == Some((true, "Associated".into()))).then_some(f)
    })
    .await;
    assert_eq!(status(&mapped).fixed_ip, routed_ip);
    assert_eq!(status(&mapped).router, "edge");
    let message = mapped
        .status
        .as_ref()
        .unwrap()
        .conditions
        .iter()
        .find(|c| c.r#type == "Associated")
        .unwrap()
        .message
        .clone();
    assert!(message.contains(&ports[1]), "{message}");

    // The router goes: nothing connects the server to the external network any more.
    cloud.delete(Kind::Router, "default", "edge").await;
    let lost = eventually("no router", || async {
        let f = get(&cloud, "web-fip").await?;
        (says(&f, "Associated") == Some((false, "NoRouter".into()))).then_some(f)
    })
    .await;
    assert_eq!(status(&lost).router, "");
    controllers.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_floating_ip_on_the_same_fixed_ip_is_refused() {
    let cloud = Cloud::start().await;
    let controllers = cloud.controllers();
    external_network(&cloud).await;
    cloud.network("private", "10.0.1.0/24").await;
    cloud.port("web", "private").await;
    cloud
        .create("apiVersion: ferro/v1\nkind: Router\nmetadata: {name: edge}\nspec: {externalGateway: {network: public}, interfaces: [{network: private, subnet: a}]}\n")
        .await;
    fip(&cloud, "first", "{network: public, port: web}").await;
    eventually("first associated", || async {
        let f = get(&cloud, "first").await?;
        (says(&f, "Associated") == Some((true, "Associated".into()))).then_some(())
    })
    .await;
    fip(&cloud, "second", "{network: public, port: web}").await;
    let refused = eventually("second refused", || async {
        let f = get(&cloud, "second").await?;
        (says(&f, "Associated") == Some((false, "FixedIpInUse".into()))).then_some(f)
    })
    .await;
    let message = &refused
        .status
        .as_ref()
        .unwrap()
        .conditions
        .iter()
        .find(|c| c.r#type == "Associated")
        .unwrap()
        .message;
    assert!(message.ends_with("floating IP first"), "{message}");
    assert!(status(&refused).fixed_ip.is_empty());
    let first = get(&cloud, "first").await.unwrap();
    assert_eq!(
        says(&first, "Associated"),
        Some((true, "Associated".into()))
    );

    // The first goes: the second takes the address.
    cloud.delete(Kind::FloatingIP, "default", "first").await;
    eventually("second associated once first is gone", || async {
        let f = get(&cloud, "second").await?;
        (says(&f, "Associated") == Some((true, "Associated".into()))).then_some(())
    })
    .await;
    controllers.abort();
}
