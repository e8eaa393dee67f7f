//! The network reconciler on the in-memory doubles of the host: no root, no switch, no
//! dnsmasq.
//!
//! An in-process apiserver on the in-memory store holds what the controllers would have
//! decided (a Network's segment, Ports' addresses and MACs, a Server's placement and
//! Ports), written as their owners write them. The reconciler of node `n1` runs over a
//! [`MemoryNetworkDriver`], [`MemoryLinks`] and [`MemoryDhcp`], one pass at a time, with
//! its caches filled from a List. The tests look at what it leaves on the host and on the
//! Ports: wiring, drift mended, orphans removed, a restart that changes nothing, and
//! bindings written back.
//!
//! That traffic really flows is shown by the real-driver tests and by `e2e/`.

use std::sync::Arc;

use anyhow::{Context, Result};
use ferro_agent::dhcp::Dhcp;
use ferro_agent::dhcp::memory::MemoryDhcp;
use ferro_agent::links::Links;
use ferro_agent::links::memory::MemoryLinks;
use ferro_agent::network::plan::tap_name;
use ferro_agent::network::{InsideChecks, NetworkHealth, NetworkReconciler};
use ferro_agent::wiring::memory::MemoryNetworkDriver;
use ferro_agent::wiring::{DriverKind, NetworkDriver};
use ferro_api::auth::Tokens;
use ferro_api::client::{Client, Selection};
use ferro_api::server::ApiServer;
use ferro_api::{Kind, Resource, owners, v1};
use ferro_runtime::{Store, condition};
use ferro_store::memory::MemoryStore;
use tokio::sync::oneshot;

const TOKENS: &str = "admin-token admin\nnode-token system:node:n1\n";
const PROJECT: &str = "default";

struct Cloud {
    admin: Client,
    node_client: Client,
    _stop: oneshot::Sender<()>,
}

impl Cloud {
    /// Nodes n1 (compute and network, 198.18.0.11) and n2 (compute, 198.18.0.12), the
    /// Network `net` with segment 100, and the Server `web` on n1 with its Port `web-0`.
    async fn start() -> Result<Cloud> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?.to_string();
        let api = ApiServer::new(Arc::new(MemoryStore::new()), Tokens::parse(TOKENS));
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(async move {
            let _ = api
                .serve(listener, async {
                    let _ = stopped.await;
                })
                .await;
        });
        let cloud = Cloud {
            admin: Client::connect_lazy(&address, "admin-token")?,
            node_client: Client::connect_lazy(&address, "node-token")?,
            _stop: stop,
        };
        cloud.node("n1", "198.18.0.11", true).await?;
        cloud.node("n2", "198.18.0.12", false).await?;
        cloud
            .apply(
                "apiVersion: ferro/v1\nkind: Network\nmetadata: {name: net}\nspec:\n  \
                 subnets:\n  - {name: v4, cidr: 10.0.0.0/24}\n",
            )
            .await?;
        let mut network: v1::Network = cloud.admin.get_typed(PROJECT, "net").await?;
        network.status = Some(v1::NetworkStatus {
            segment_id: 100,
            ..Default::default()
        });
        cloud
            .admin
            .update_status(
                network.into_object(),
                owners::NETWORK_CONTROLLER,
                &["segmentId"],
                vec![],
            )
            .await?;
        cloud.port("web-0", "compute:web", "10.0.0.5").await?;
        cloud
            .apply(
                "apiVersion: ferro/v1\nkind: Server\nmetadata: {name: web}\nspec:\n  \
                 flavor: m1.tiny\n  image: tiny\n  networks:\n  - {port: web-0}\n",
            )
            .await?;
        cloud
            .admin
            .bind(PROJECT, "web", "n1", v1::FlavorSnapshot::default())
            .await?;
        let mut server: v1::Server = cloud.admin.get_typed(PROJECT, "web").await?;
        server.status.get_or_insert_with(Default::default).ports = vec!["web-0".into()];
        cloud
            .admin
            .update_status(
                server.into_object(),
                owners::SERVER_CONTROLLER,
                &["ports"],
                vec![],
            )
            .await?;
        Ok(cloud)
    }

    async fn apply(&self, yaml: &str) -> Result<()> {
        for object in ferro_api::codec::decode_yaml(yaml)? {
            self.admin.create(object).await?;
        }
        Ok(())
    }

    async fn node(&self, name: &str, address: &str, network_role: bool) -> Result<()> {
        self.apply(&format!(
            "apiVersion: ferro/v1\nkind: Node\nmetadata: {{name: {name}}}\n"
        ))
        .await?;
        let mut roles = vec![v1::node_status::Role::Compute as i32];
        if network_role {
            roles.push(v1::node_status::Role::Network as i32);
        }
        let node = v1::Node {
            metadata: Some(v1::ObjectMeta {
                name: name.into(),
                ..Default::default()
            }),
            spec: None,
            status: Some(v1::NodeStatus {
                address: address.into(),
                roles,
                ..Default::default()
            }),
        };
        self.admin
            .update_status(
                node.into_object(),
                owners::AGENT,
                &["address", "roles"],
                vec![],
            )
            .await?;
        let node = v1::Node {
            metadata: Some(v1::ObjectMeta {
                name: name.into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        self.admin
            .update_status(
                node.into_object(),
                owners::NODE_LIFECYCLE,
                &[],
                vec![condition("Ready", true, "Heartbeat", "")],
            )
            .await?;
        Ok(())
    }

    /// A Port on `net` with the address and MAC IPAM would give it.
    async fn port(&self, name: &str, owner: &str, ip: &str) -> Result<()> {
        self.port_with(name, owner, ip, "{}").await
    }

    /// A probe Port placed on `node`.
    async fn probe(&self, name: &str, node: &str, ip: &str) -> Result<()> {
        let annotations = format!("{{ferro.io/probe-node: {node}}}");
        self.port_with(name, "network:probe", ip, &annotations)
            .await
    }

    async fn port_with(&self, name: &str, owner: &str, ip: &str, annotations: &str) -> Result<()> {
        self.apply(&format!(
            "apiVersion: ferro/v1\nkind: Port\nmetadata: {{name: {name}, annotations: {annotations}}}\n\
             spec: {{network: net, deviceOwner: \"{owner}\"}}\n"
        ))
        .await?;
        let network: v1::Network = self.admin.get_typed(PROJECT, "net").await?;
        let mut port: v1::Port = self.admin.get_typed(PROJECT, name).await?;
        let last = ip.rsplit('.').next().unwrap_or("0");
        port.status = Some(v1::PortStatus {
            network_uid: uid(&network),
            mac: format!("fa:16:3e:00:00:{:02x}", last.parse::<u8>().unwrap_or(0)),
            addresses: vec![v1::PortAddress {
                subnet: "v4".into(),
                ip: ip.into(),
            }],
            ..Default::default()
        });
        self.admin
            .update_status(
                port.into_object(),
                owners::IPAM,
                &["networkUid", "mac", "addresses"],
                vec![],
            )
            .await?;
        Ok(())
    }

    async fn get_port(&self, name: &str) -> Result<v1::Port> {
        Ok(self.admin.get_typed(PROJECT, name).await?)
    }
}

fn uid<T: Resource>(object: &T) -> String {
    object.metadata().map(|m| m.uid.clone()).unwrap_or_default()
}

/// Node n1's network reconciler over the doubles, with caches it fills from a List.
struct Agent {
    reconciler: NetworkReconciler,
    driver: Arc<MemoryNetworkDriver>,
    links: Arc<MemoryLinks>,
    dhcp: Arc<MemoryDhcp>,
}

impl Agent {
    fn new(cloud: &Cloud) -> Agent {
        Agent::over(
            cloud,
            Arc::new(MemoryNetworkDriver::new(DriverKind::Ovs)),
            Arc::new(MemoryLinks::new()),
            Arc::new(MemoryDhcp::new()),
        )
    }

    /// An agent over the host an earlier one left: a restart.
    fn over(
        cloud: &Cloud,
        driver: Arc<MemoryNetworkDriver>,
        links: Arc<MemoryLinks>,
        dhcp: Arc<MemoryDhcp>,
    ) -> Agent {
        let reconciler = NetworkReconciler {
            client: cloud.node_client.clone(),
            node: "n1".into(),
            local_ip: Some("198.18.0.11".parse().unwrap()),
            driver: driver.clone(),
            links: links.clone(),
            dhcp: dhcp.clone(),
            servers: Store::new(),
            ports: Store::new(),
            networks: Store::new(),
            nodes: Store::new(),
            routers: Store::new(),
            health: NetworkHealth::default(),
            // Every pass looks inside namespaces, so drift there is mended at once.
            inside_checks: InsideChecks::every(std::time::Duration::ZERO),
            metadata: None,
        };
        Agent {
            reconciler,
            driver,
            links,
            dhcp,
        }
    }

    /// Fills the caches as the reflectors would, then runs one pass.
    async fn pass(&self, cloud: &Cloud) -> Result<()> {
        async fn fill<T: Resource + Send + Sync>(client: &Client, store: &Store<T>) -> Result<()> {
            let (objects, revision) = client.list(T::KIND, &Selection::all()).await?;
            store.replace(
                objects.into_iter().filter_map(T::from_object).collect(),
                revision,
            );
            Ok(())
        }
        fill(&cloud.admin, &self.reconciler.servers).await?;
        fill(&cloud.admin, &self.reconciler.ports).await?;
        fill(&cloud.admin, &self.reconciler.networks).await?;
        fill(&cloud.admin, &self.reconciler.nodes).await?;
        self.reconciler
            .reconcile_node()
            .await
            .context("a network pass")?;
        Ok(())
    }

    async fn tap(&self, port: &v1::Port) -> Result<Option<ferro_agent::links::Link>> {
        Ok(self.links.link(&tap_name(&uid(port))).await?)
    }
}

#[tokio::test]
async fn a_guest_port_is_wired_bound_and_served_by_dhcp() -> Result<()> {
    let cloud = Cloud::start().await?;
    cloud.port("net-dhcp", "network:dhcp", "10.0.0.2").await?;
    cloud.port("db-0", "compute:db", "10.0.0.6").await?;
    let agent = Agent::new(&cloud);
    agent.pass(&cloud).await?;

    let web = cloud.get_port("web-0").await?;
    let status = web.status.clone().unwrap_or_default();
    assert!(status.bound && status.node == "n1", "{status:?}");
    let bound = status
        .conditions
        .iter()
        .find(|c| c.r#type == "Bound")
        .unwrap();
    assert_eq!(bound.reason, "Plugged");
    let tap = agent.tap(&web).await?.context("the guest's tap")?;
    assert_eq!(tap.alias.as_deref(), Some(uid(&web).as_str()));
    assert_eq!(tap.mtu, 1450);
    let network: v1::Network = cloud.admin.get_typed(PROJECT, "net").await?;
    let wired = agent.driver.observe().await?;
    assert_eq!(wired.networks[&uid(&network)].segment_id, 100);
    assert!(wired.ports[&uid(&web)].attached);

    // n1 is the only network node: it serves DHCP from the network's namespace, with a
    // host entry for every addressed Port.
    let server = agent.dhcp.server(&uid(&network)).context("a DHCP server")?;
    assert_eq!(server.namespace, format!("qdhcp-{}", uid(&network)));
    let mut hosts: Vec<String> = server.hosts.iter().map(|h| h.ip.to_string()).collect();
    hosts.sort();
    assert_eq!(hosts, ["10.0.0.2", "10.0.0.5", "10.0.0.6"]);
    let dhcp_port = cloud.get_port("net-dhcp").await?;
    let inside = agent.links.in_namespace(&server.namespace);
    let inner = inside
        .link(&server.interface)
        .await?
        .context("the DHCP veth inside its namespace")?;
    assert_eq!(
        inner.mac.map(|m| m.to_string()),
        dhcp_port.status.as_ref().map(|s| s.mac.clone())
    );
    // The network has no router: its DHCP namespace also holds the metadata address.
    let addresses = inside.list_addresses(&server.interface).await?;
    assert_eq!(
        addresses.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
        ["10.0.0.2/24", "169.254.169.254/32"]
    );
    assert!(dhcp_port.status.unwrap().bound);
    // db-0 is nobody's on this node: it is served, not wired.
    assert!(
        !wired
            .ports
            .contains_key(&uid(&cloud.get_port("db-0").await?))
    );
    Ok(())
}

#[tokio::test]
async fn tunnels_follow_the_nodes_that_bind_ports_of_the_network() -> Result<()> {
    let cloud = Cloud::start().await?;
    let agent = Agent::new(&cloud);
    agent.pass(&cloud).await?;
    let network: v1::Network = cloud.admin.get_typed(PROJECT, "net").await?;
    assert!(
        agent.driver.observe().await?.networks[&uid(&network)]
            .peers
            .is_empty()
    );

    // n2 binds a port of the same network: n1 tunnels to it, and stops when it unbinds.
    cloud.port("db-0", "compute:db", "10.0.0.6").await?;
    let bind = |bound: bool| {
        let cloud = &cloud;
        async move {
            let mut port = cloud.get_port("db-0").await?;
            let status = port.status.get_or_insert_with(Default::default);
            status.node = if bound { "n2".into() } else { String::new() };
            status.bound = bound;
            cloud
                .admin
                .update_status(
                    port.into_object(),
                    owners::AGENT,
                    &["node", "bound"],
                    vec![],
                )
                .await?;
            anyhow::Ok(())
        }
    };
    bind(true).await?;
    agent.pass(&cloud).await?;
    let peers = agent.driver.observe().await?.networks[&uid(&network)]
        .peers
        .clone();
    assert_eq!(
        peers.into_iter().map(|p| p.to_string()).collect::<Vec<_>>(),
        ["198.18.0.12"]
    );
    bind(false).await?;
    agent.pass(&cloud).await?;
    assert!(
        agent.driver.observe().await?.networks[&uid(&network)]
            .peers
            .is_empty()
    );
    Ok(())
}

#[tokio::test]
async fn drift_is_mended_orphans_removed_and_a_restart_changes_nothing() -> Result<()> {
    let cloud = Cloud::start().await?;
    cloud.port("net-dhcp", "network:dhcp", "10.0.0.2").await?;
    cloud.probe("probe-1", "n1", "10.0.0.31").await?;
    cloud.probe("probe-2", "n2", "10.0.0.32").await?;
    let agent = Agent::new(&cloud);
    agent.pass(&cloud).await?;
    let web = cloud.get_port("web-0").await?;
    let tap = tap_name(&uid(&web));
    // The probe placed here lives in its own namespace; the other node's is not ours.
    let probe = cloud.get_port("probe-1").await?;
    let probe_ns = format!("qprobe-{}", uid(&probe));
    assert!(agent.links.list_namespaces().await?.contains(&probe_ns));
    assert!(!agent.links.list_namespaces().await?.contains(&format!(
        "qprobe-{}",
        uid(&cloud.get_port("probe-2").await?)
    )));

    // A tap deleted by hand comes back, plugged in again.
    agent.links.delete_link(&tap).await?;
    agent.driver.detach_device(&uid(&web));
    agent.pass(&cloud).await?;
    assert!(agent.tap(&web).await?.is_some());
    assert!(agent.driver.observe().await?.ports[&uid(&web)].attached);

    // Strays named as Ferro names things, whose owners do not exist, are removed; a
    // device that is not Ferro's is left alone.
    let stray = "0badc0de-0000-4000-8000-000000000000";
    agent.links.ensure_tap(&tap_name(stray)).await?;
    agent.links.set_alias(&tap_name(stray), Some(stray)).await?;
    agent.links.ensure_tap("tapsomeoneelse").await?;
    // A stray DHCP namespace of this node (its veth names it), and one of another node.
    let stray_port = "5eedc0de-0000-4000-8000-000000000001";
    let stray_ns = format!("qdhcp-{stray}");
    agent.links.create_namespace(&stray_ns).await?;
    agent
        .links
        .ensure_veth(
            &tap_name(stray_port),
            &ferro_agent::links::VethPeer {
                name: "ns-5eedc0de000".into(),
                namespace: Some(stray_ns.clone()),
            },
        )
        .await?;
    agent
        .links
        .set_alias(
            &tap_name(stray_port),
            Some(&format!("{stray_port}@{stray_ns}")),
        )
        .await?;
    let elsewhere = "qdhcp-0badc0de-0000-4000-8000-00000000e15e";
    agent.links.create_namespace(elsewhere).await?;
    agent.dhcp.preload(&ferro_agent::dhcp::DhcpServer {
        network_uid: stray.into(),
        ..agent
            .dhcp
            .server(&uid(&cloud
                .admin
                .get_typed::<v1::Network>(PROJECT, "net")
                .await?))
            .unwrap()
    });
    agent.pass(&cloud).await?;
    assert!(agent.links.link(&tap_name(stray)).await?.is_none());
    assert!(agent.links.link("tapsomeoneelse").await?.is_some());
    assert!(agent.links.link(&tap_name(stray_port)).await?.is_none());
    let namespaces = agent.links.list_namespaces().await?;
    assert!(!namespaces.contains(&stray_ns), "{namespaces:?}");
    assert!(
        namespaces.iter().any(|n| n == elsewhere),
        "another node's namespace stays"
    );
    assert!(
        agent
            .dhcp
            .list()
            .await?
            .iter()
            .all(|d| d.network_uid != stray)
    );

    // A new agent over the same host (a restart) finds everything as it should be.
    agent.links.clear_calls();
    let driver_calls = agent.driver.calls().len();
    let dhcp_calls = agent.dhcp.calls().len();
    let again = Agent::over(
        &cloud,
        agent.driver.clone(),
        agent.links.clone(),
        agent.dhcp.clone(),
    );
    again.pass(&cloud).await?;
    assert_eq!(
        agent.driver.calls().len(),
        driver_calls,
        "{:?}",
        agent.driver.calls()
    );
    // Not even a device set up again: all were found up.
    assert!(agent.links.calls().is_empty(), "{:?}", agent.links.calls());
    assert!(agent.links.list_namespaces().await?.contains(&probe_ns));
    // The DHCP seam is asked to ensure, which is a no-op when nothing changed.
    assert!(
        agent.dhcp.calls()[dhcp_calls..]
            .iter()
            .all(|c| c.starts_with("ensure"))
    );
    Ok(())
}

#[tokio::test]
async fn the_inside_of_a_namespace_is_mended_on_the_periodic_look() -> Result<()> {
    let cloud = Cloud::start().await?;
    cloud.probe("probe-1", "n1", "10.0.0.31").await?;
    let mut agent = Agent::new(&cloud);
    agent.reconciler.inside_checks = InsideChecks::every(std::time::Duration::from_secs(1));
    agent.pass(&cloud).await?;
    let probe = cloud.get_port("probe-1").await?;
    let inside = agent.links.in_namespace(&format!("qprobe-{}", uid(&probe)));
    let inner = inside
        .list_links()
        .await?
        .into_iter()
        .find(|l| l.name != "lo")
        .context("the probe's inner device")?
        .name;
    let address = inside
        .list_addresses(&inner)
        .await?
        .into_iter()
        .find(|a| a.ip.to_string() == "10.0.0.31")
        .context("the probe's address")?;

    // Removed by hand: a pass soon after lists the host but does not look inside.
    inside.delete_address(&inner, address).await?;
    agent.links.clear_calls();
    agent.pass(&cloud).await?;
    assert!(agent.links.calls().is_empty(), "{:?}", agent.links.calls());

    // The periodic look mends it.
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    agent.pass(&cloud).await?;
    assert!(inside.list_addresses(&inner).await?.contains(&address));
    Ok(())
}

#[tokio::test]
async fn a_port_that_goes_is_unplugged_and_its_tap_removed() -> Result<()> {
    let cloud = Cloud::start().await?;
    let agent = Agent::new(&cloud);
    agent.pass(&cloud).await?;
    let web = cloud.get_port("web-0").await?;
    cloud.admin.delete_key(Kind::Server, PROJECT, "web").await?;
    cloud.admin.delete_key(Kind::Port, PROJECT, "web-0").await?;
    agent.pass(&cloud).await?;
    assert!(agent.tap(&web).await?.is_none());
    let wired = agent.driver.observe().await?;
    assert!(
        wired.ports.is_empty() && wired.networks.is_empty(),
        "{wired:?}"
    );
    Ok(())
}

#[tokio::test]
async fn a_port_on_a_network_without_a_segment_waits_and_says_why() -> Result<()> {
    let cloud = Cloud::start().await?;
    let mut network: v1::Network = cloud.admin.get_typed(PROJECT, "net").await?;
    network
        .status
        .get_or_insert_with(Default::default)
        .segment_id = 0;
    cloud
        .admin
        .update_status(
            network.into_object(),
            owners::NETWORK_CONTROLLER,
            &["segmentId"],
            vec![],
        )
        .await?;
    let agent = Agent::new(&cloud);
    agent.pass(&cloud).await?;
    let web = cloud.get_port("web-0").await?;
    let status = web.status.unwrap();
    assert!(!status.bound);
    let bound = status
        .conditions
        .into_iter()
        .find(|c| c.r#type == "Bound")
        .unwrap();
    assert_eq!(bound.reason, "SegmentPending");
    assert!(agent.driver.observe().await?.ports.is_empty());
    Ok(())
}
