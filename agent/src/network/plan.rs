//! What the network of one node should be, from the API alone: [`desired`]. Pure.
//!
//! A node wires:
//! - the Ports of the Servers placed on it (`status.ports`), each as a tap named from the
//!   Port's uid, plugged into its Network;
//! - on a node with the network role, the DHCP Port of each Network whose DHCP it serves
//!   ([`dhcp_node`]), as a veth into a `qdhcp-<network-uid>` namespace where dnsmasq
//!   answers;
//! - the probe Ports placed on it: a Port with `deviceOwner: network:probe` and the
//!   annotation [`PROBE_NODE_ANNOTATION`] naming this node is wired as a veth into a
//!   `qprobe-<port-uid>` namespace holding its MAC and addresses — a machine on the
//!   network without a guest, as Neutron's debug probes are; benchmarks and tests use
//!   them as the fake machines of Neutron's fullstack tests;
//! - every Network one of those Ports is on, with tunnels to exactly the other nodes that
//!   have a Port of the same Network bound (`Port.status.node`), as l2population does.
//!
//! A Port this node should wire but cannot yet (no address, no segment, its Network being
//! deleted) is [`Desired::waiting`], with the reason its `Bound` condition gives.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;

use ferro_api::v1;
use ferro_api::v1::node_status::Role;
use ipnet::IpNet;
use sha2::Digest;

use crate::dhcp::{
    DEFAULT_DOMAIN, DEFAULT_LEASE_TIME, DhcpHost, DhcpServer, DhcpSubnet, HostRoute,
    qdhcp_namespace,
};
use crate::wiring::{NetworkWiring, PortWiring, device_name};

/// The metadata address, as a host address.
const METADATA_ADDRESS: std::net::Ipv4Addr = std::net::Ipv4Addr::new(169, 254, 169, 254);

/// The `deviceOwner` of a Network's DHCP Port (made by the network controller).
pub const DHCP_DEVICE_OWNER: &str = "network:dhcp";
/// The `deviceOwner` prefix of a Server's Ports: `compute:<server>`.
pub const COMPUTE_DEVICE_OWNER: &str = "compute:";
/// The prefix of a guest's tap and of a DHCP veth's host end.
pub const TAP_PREFIX: &str = "tap";
/// The prefix of a DHCP veth's end inside its namespace.
pub const NS_DEVICE_PREFIX: &str = "ns-";
/// The prefix of a Network's DHCP namespace (see [`qdhcp_namespace`]).
pub const DHCP_NAMESPACE_PREFIX: &str = "qdhcp-";
/// The `deviceOwner` of a probe Port.
pub const PROBE_DEVICE_OWNER: &str = "network:probe";
/// The annotation that places a probe Port on a node.
pub const PROBE_NODE_ANNOTATION: &str = "ferro.io/probe-node";
/// The prefix of a probe Port's namespace.
pub const PROBE_NAMESPACE_PREFIX: &str = "qprobe-";

/// The namespace of a probe Port: `qprobe-<port-uid>`.
pub fn probe_namespace(port_uid: &str) -> String {
    format!("{PROBE_NAMESPACE_PREFIX}{port_uid}")
}

/// The host device of a Port: `tap` + the start of its uid.
pub fn tap_name(port_uid: &str) -> String {
    device_name(TAP_PREFIX, port_uid)
}

/// What the API says one node's network should be.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Facts {
    /// This node's name.
    pub node: String,
    /// This node's tunnel endpoint.
    pub local_ip: Option<IpAddr>,
    /// The Servers placed on this node.
    pub servers: Vec<Arc<v1::Server>>,
    /// Every Port.
    pub ports: Vec<Arc<v1::Port>>,
    /// Every Network.
    pub networks: Vec<Arc<v1::Network>>,
    /// Every Node.
    pub nodes: Vec<Arc<v1::Node>>,
    /// Every Router.
    pub routers: Vec<Arc<v1::Router>>,
}

/// Where a wanted Port's device lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Place {
    /// A guest's tap.
    Guest,
    /// A veth into a namespace (the Network's DHCP namespace, or a probe's); the end
    /// inside gets the Port's MAC and addresses.
    Namespace {
        /// The namespace.
        namespace: String,
        /// The veth's end inside it.
        inner: String,
        /// The Port's addresses with their subnets' prefix lengths.
        addresses: Vec<IpNet>,
    },
}

/// A Port this node wires.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WantedPort {
    /// Project and name, for the status write.
    pub project: String,
    /// Its name.
    pub name: String,
    /// How it is plugged.
    pub wiring: PortWiring,
    /// Its device's place.
    pub place: Place,
    /// The MTU of its network.
    pub mtu: u32,
}

/// Why a Port this node should wire is not wired yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Waiting {
    /// Project and name, for the status write.
    pub project: String,
    /// Its name.
    pub name: String,
    /// The `Bound` condition's reason.
    pub reason: &'static str,
    /// And its message.
    pub message: String,
}

/// What one node's network should be.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Desired {
    /// Networks to wire, by uid.
    pub networks: BTreeMap<String, NetworkWiring>,
    /// Ports to wire, by uid.
    pub ports: BTreeMap<String, WantedPort>,
    /// DHCP servers to run, by Network uid.
    pub dhcp: BTreeMap<String, DhcpServer>,
    /// Ports this node should wire but cannot yet, by uid.
    pub waiting: BTreeMap<String, Waiting>,
    /// The DHCP namespaces that serve metadata, by Network uid: those of networks no
    /// router has a leg on (a routed network's guests ask their router).
    pub metadata: BTreeMap<String, String>,
}

fn uid_of<T: ferro_api::Resource>(object: &T) -> &str {
    object
        .metadata()
        .map(|m| m.uid.as_str())
        .unwrap_or_default()
}

fn holds(conditions: &[v1::Condition], kind: &str) -> bool {
    conditions
        .iter()
        .any(|c| c.r#type == kind && c.status == v1::condition::Status::True as i32)
}

/// Whether a Node can serve DHCP: the network role, a heartbeat, and a working network
/// driver.
fn serves_networks(node: &v1::Node) -> bool {
    let Some(status) = &node.status else {
        return false;
    };
    status.roles.contains(&(Role::Network as i32))
        && holds(&status.conditions, "Ready")
        && !status
            .conditions
            .iter()
            .any(|c| c.r#type == "NetworkReady" && c.status == v1::condition::Status::False as i32)
}

/// The node that serves a Network's DHCP among `candidates`: the highest-random-weight
/// choice (rendezvous hashing) over the Network's uid, so every node computes the same
/// one without a write, and a node that leaves moves only its own networks.
pub fn dhcp_node<'a>(network_uid: &str, candidates: &[&'a str]) -> Option<&'a str> {
    candidates.iter().copied().max_by_key(|node| {
        let digest = sha2::Sha256::digest(format!("{network_uid}/{node}").as_bytes());
        <[u8; 8]>::try_from(&digest[..8])
            .map(u64::from_be_bytes)
            .unwrap_or(0)
    })
}

/// What a Port wired on this node is for.
#[derive(Debug, Clone, Copy)]
enum Use<'a> {
    /// A NIC of this Server.
    Guest(&'a v1::Server),
    /// The address of its Network's DHCP server.
    Dhcp,
    /// A probe.
    Probe,
}

/// What this node's network should be. See the module notes.
pub fn desired(facts: &Facts) -> Desired {
    let mut out = Desired::default();
    let networks: BTreeMap<&str, &v1::Network> = facts
        .networks
        .iter()
        .map(|n| (uid_of(n.as_ref()), n.as_ref()))
        .collect();
    let addresses: BTreeMap<&str, IpAddr> = facts
        .nodes
        .iter()
        .filter_map(|n| {
            let address = n.status.as_ref()?.address.parse().ok()?;
            Some((n.metadata.as_ref()?.name.as_str(), address))
        })
        .collect();
    let by_name: BTreeMap<(&str, &str), &v1::Port> = facts
        .ports
        .iter()
        .filter_map(|p| {
            let m = p.metadata.as_ref()?;
            Some(((m.project.as_str(), m.name.as_str()), p.as_ref()))
        })
        .collect();

    // The networks some router has a leg on.
    let routed: BTreeSet<String> = facts
        .routers
        .iter()
        .flat_map(|r| crate::router::plan::legs(r, &facts.networks))
        .map(|leg| leg.network_uid)
        .collect();

    // Which Ports are this node's: its Servers', the DHCP Ports it serves, its probes.
    let mut mine: Vec<(&v1::Port, Use)> = Vec::new();
    for server in &facts.servers {
        let Some(m) = &server.metadata else { continue };
        for name in server.status.iter().flat_map(|s| &s.ports) {
            if let Some(port) = by_name.get(&(m.project.as_str(), name.as_str())) {
                mine.push((port, Use::Guest(server.as_ref())));
            }
        }
    }
    let me_serving = facts
        .nodes
        .iter()
        .any(|n| n.metadata.as_ref().is_some_and(|m| m.name == facts.node) && serves_networks(n));
    let candidates: Vec<&str> = facts
        .nodes
        .iter()
        .filter(|n| serves_networks(n))
        .filter_map(|n| n.metadata.as_ref().map(|m| m.name.as_str()))
        .collect();
    if me_serving {
        for port in &facts.ports {
            let spec = port.spec.clone().unwrap_or_default();
            let network_uid = port
                .status
                .as_ref()
                .map(|s| s.network_uid.as_str())
                .unwrap_or_default();
            if spec.device_owner == DHCP_DEVICE_OWNER
                && !network_uid.is_empty()
                && dhcp_node(network_uid, &candidates) == Some(facts.node.as_str())
            {
                mine.push((port.as_ref(), Use::Dhcp));
            }
        }
    }
    for port in &facts.ports {
        let probe = port
            .spec
            .as_ref()
            .is_some_and(|s| s.device_owner == PROBE_DEVICE_OWNER);
        let here = port
            .metadata
            .as_ref()
            .is_some_and(|m| m.annotations.get(PROBE_NODE_ANNOTATION) == Some(&facts.node));
        if probe && here {
            mine.push((port.as_ref(), Use::Probe));
        }
    }

    for (port, usage) in mine {
        let m = port.metadata.clone().unwrap_or_default();
        let status = port.status.clone().unwrap_or_default();
        let wait = |reason: &'static str, message: String| Waiting {
            project: m.project.clone(),
            name: m.name.clone(),
            reason,
            message,
        };
        if m.uid.is_empty() {
            continue;
        }
        let Some(network) = networks.get(status.network_uid.as_str()).copied() else {
            out.waiting.insert(
                m.uid.clone(),
                wait(
                    "NetworkPending",
                    "the port's network is not known yet".into(),
                ),
            );
            continue;
        };
        let net_meta = network.metadata.clone().unwrap_or_default();
        let segment_id = network.status.as_ref().map(|s| s.segment_id).unwrap_or(0);
        let problem = if net_meta.deletion_timestamp.is_some() {
            Some(wait(
                "NetworkDeleting",
                format!("network {} is being deleted", net_meta.name),
            ))
        } else if segment_id == 0 {
            Some(wait(
                "SegmentPending",
                format!("network {} has no segment ID yet", net_meta.name),
            ))
        } else if status.mac.is_empty() || status.addresses.is_empty() {
            Some(wait(
                "AddressPending",
                "the port has no address yet".to_owned(),
            ))
        } else if facts.local_ip.is_none() {
            Some(wait(
                "NoTunnelEndpoint",
                format!("node {} has no underlay address", facts.node),
            ))
        } else {
            None
        };
        if let Some(waiting) = problem {
            out.waiting.insert(m.uid.clone(), waiting);
            continue;
        }
        let spec = network.spec.clone().unwrap_or_default();
        let mtu = spec.mtu.unwrap_or(1450);
        // A network no router has a leg on gets its metadata from its DHCP namespace,
        // which holds the metadata address and is the next hop of a route to it.
        let isolated = !routed.contains(net_meta.uid.as_str());
        let metadata_here = matches!(usage, Use::Dhcp) && isolated;
        let in_namespace = |namespace: String| {
            let mut addresses = prefixed(&status.addresses, &spec.subnets);
            if metadata_here {
                addresses.push(IpNet::from(IpAddr::V4(METADATA_ADDRESS)));
            }
            Place::Namespace {
                namespace,
                inner: device_name(NS_DEVICE_PREFIX, &m.uid),
                addresses,
            }
        };
        let (place, server) = match usage {
            Use::Guest(server) => (Place::Guest, Some(server)),
            Use::Dhcp => (in_namespace(qdhcp_namespace(&net_meta.uid)), None),
            Use::Probe => (in_namespace(probe_namespace(&m.uid)), None),
        };
        out.networks
            .entry(net_meta.uid.clone())
            .or_insert_with(|| NetworkWiring {
                uid: net_meta.uid.clone(),
                segment_id,
                mtu,
                local_ip: facts.local_ip.expect("checked above"),
                peers: BTreeSet::new(),
            });
        if let (
            Use::Dhcp,
            Place::Namespace {
                namespace, inner, ..
            },
        ) = (usage, &place)
        {
            let mut subnets = dhcp_subnets(&spec.subnets);
            if metadata_here {
                out.metadata.insert(net_meta.uid.clone(), namespace.clone());
                for subnet in &mut subnets {
                    let own = status
                        .addresses
                        .iter()
                        .filter_map(|a| a.ip.parse::<IpAddr>().ok())
                        .find(|ip| ip.is_ipv4() && subnet.cidr.contains(ip));
                    if let Some(nexthop) = own {
                        subnet.host_routes.push(HostRoute {
                            destination: IpNet::from(IpAddr::V4(METADATA_ADDRESS)),
                            nexthop,
                        });
                    }
                }
            }
            out.dhcp.insert(
                net_meta.uid.clone(),
                DhcpServer {
                    network_uid: net_meta.uid.clone(),
                    namespace: namespace.clone(),
                    interface: inner.clone(),
                    mtu,
                    domain: DEFAULT_DOMAIN.to_owned(),
                    subnets,
                    hosts: Vec::new(),
                },
            );
        }
        out.ports.insert(
            m.uid.clone(),
            WantedPort {
                project: m.project.clone(),
                name: m.name.clone(),
                wiring: PortWiring {
                    uid: m.uid.clone(),
                    network_uid: net_meta.uid.clone(),
                    device: tap_name(&m.uid),
                    mac: status.mac.clone(),
                    server_uid: server.map(|s| uid_of(s).to_owned()),
                },
                place,
                mtu,
            },
        );
    }

    // The legs of the routers placed here, as veths into their namespaces.
    if let Some(local_ip) = facts.local_ip {
        for router in &facts.routers {
            if router.status.as_ref().is_none_or(|s| s.node != facts.node) {
                continue;
            }
            for leg in crate::router::plan::legs(router, &facts.networks) {
                let Some(network) = networks.get(leg.network_uid.as_str()).copied() else {
                    continue;
                };
                let segment_id = network.status.as_ref().map(|s| s.segment_id).unwrap_or(0);
                let deleting = network
                    .metadata
                    .as_ref()
                    .is_some_and(|m| m.deletion_timestamp.is_some());
                if segment_id == 0 || deleting {
                    continue;
                }
                let mtu = network.spec.as_ref().and_then(|s| s.mtu).unwrap_or(1450);
                out.networks
                    .entry(leg.network_uid.clone())
                    .or_insert_with(|| NetworkWiring {
                        uid: leg.network_uid.clone(),
                        segment_id,
                        mtu,
                        local_ip,
                        peers: BTreeSet::new(),
                    });
                out.ports.insert(
                    leg.uid.clone(),
                    WantedPort {
                        // A leg has no Port object to write a binding to.
                        project: String::new(),
                        name: String::new(),
                        wiring: PortWiring {
                            uid: leg.uid.clone(),
                            network_uid: leg.network_uid.clone(),
                            device: tap_name(&leg.uid),
                            mac: leg.mac.clone(),
                            server_uid: None,
                        },
                        place: Place::Namespace {
                            namespace: crate::router::plan::router_namespace(&leg.router_uid),
                            inner: device_name(crate::router::plan::LEG_DEVICE_PREFIX, &leg.uid),
                            addresses: vec![leg.address],
                        },
                        mtu,
                    },
                );
            }
        }
    }

    // Tunnels to the nodes of routers with a leg on a Network wired here.
    for router in &facts.routers {
        let Some(status) = &router.status else {
            continue;
        };
        let Some(address) = addresses.get(status.node.as_str()) else {
            continue;
        };
        if status.node == facts.node || Some(*address) == facts.local_ip {
            continue;
        }
        for leg in crate::router::plan::legs(router, &facts.networks) {
            if let Some(network) = out.networks.get_mut(&leg.network_uid) {
                network.peers.insert(*address);
            }
        }
    }

    // Tunnels: to every other node with a bound Port on a Network wired here; DHCP hosts:
    // every addressed Port of a Network served here.
    for port in &facts.ports {
        let Some(status) = &port.status else { continue };
        if let Some(network) = out.networks.get_mut(&status.network_uid)
            && status.bound
            && status.node != facts.node
            && let Some(address) = addresses.get(status.node.as_str())
            && Some(*address) != facts.local_ip
        {
            network.peers.insert(*address);
        }
        if let Some(dhcp) = out.dhcp.get_mut(&status.network_uid)
            && !status.mac.is_empty()
        {
            let spec = port.spec.clone().unwrap_or_default();
            let name = port
                .metadata
                .as_ref()
                .map(|m| m.name.as_str())
                .unwrap_or("");
            for address in &status.addresses {
                let Ok(ip) = address.ip.parse::<IpAddr>() else {
                    continue;
                };
                let hostname = match spec.device_owner.strip_prefix(COMPUTE_DEVICE_OWNER) {
                    Some(server) if !server.is_empty() => server.to_owned(),
                    _ if spec.device_owner == DHCP_DEVICE_OWNER => format!("dhcp-{name}"),
                    _ => host_name(ip),
                };
                dhcp.hosts.push(DhcpHost {
                    mac: status.mac.clone(),
                    ip,
                    hostname,
                });
            }
        }
    }
    for dhcp in out.dhcp.values_mut() {
        dhcp.hosts
            .sort_by(|a, b| (&a.mac, a.ip).cmp(&(&b.mac, b.ip)));
    }
    out
}

/// Neutron's name for a host without one: `host-10-0-1-5`.
fn host_name(ip: IpAddr) -> String {
    format!("host-{}", ip.to_string().replace(['.', ':'], "-"))
}

/// A Port's addresses with the prefix lengths of their subnets.
fn prefixed(addresses: &[v1::PortAddress], subnets: &[v1::Subnet]) -> Vec<IpNet> {
    addresses
        .iter()
        .filter_map(|a| {
            let subnet = subnets.iter().find(|s| s.name == a.subnet)?;
            let cidr: IpNet = subnet.cidr.parse().ok()?;
            IpNet::new(a.ip.parse().ok()?, cidr.prefix_len()).ok()
        })
        .collect()
}

/// The subnets a DHCP server serves: those with DHCP on.
fn dhcp_subnets(subnets: &[v1::Subnet]) -> Vec<DhcpSubnet> {
    subnets
        .iter()
        .filter(|s| s.dhcp.unwrap_or(true))
        .filter_map(|s| {
            Some(DhcpSubnet {
                cidr: s.cidr.parse().ok()?,
                gateway: s.gateway.as_deref().and_then(|g| g.parse().ok()),
                dns_servers: s
                    .dns_nameservers
                    .iter()
                    .filter_map(|d| d.parse().ok())
                    .collect(),
                host_routes: s
                    .host_routes
                    .iter()
                    .filter_map(|r| {
                        Some(HostRoute {
                            destination: r.destination.parse().ok()?,
                            nexthop: r.nexthop.parse().ok()?,
                        })
                    })
                    .collect(),
                lease_time: DEFAULT_LEASE_TIME,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(name: &str, uid: &str) -> Option<v1::ObjectMeta> {
        Some(v1::ObjectMeta {
            name: name.into(),
            project: "p".into(),
            uid: uid.into(),
            ..Default::default()
        })
    }

    fn node(name: &str, address: &str, network_role: bool) -> Arc<v1::Node> {
        let mut roles = vec![Role::Compute as i32];
        if network_role {
            roles.push(Role::Network as i32);
        }
        Arc::new(v1::Node {
            metadata: meta(name, &format!("uid-{name}")),
            status: Some(v1::NodeStatus {
                address: address.into(),
                roles,
                conditions: vec![ferro_runtime::condition("Ready", true, "Heartbeat", "")],
                ..Default::default()
            }),
            ..Default::default()
        })
    }

    fn network(name: &str, uid: &str, segment: u32) -> Arc<v1::Network> {
        Arc::new(v1::Network {
            metadata: meta(name, uid),
            spec: Some(v1::NetworkSpec {
                mtu: Some(1450),
                subnets: vec![v1::Subnet {
                    name: "v4".into(),
                    cidr: "10.0.0.0/24".into(),
                    gateway: Some("10.0.0.1".into()),
                    dhcp: Some(true),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            status: Some(v1::NetworkStatus {
                segment_id: segment,
                ..Default::default()
            }),
        })
    }

    fn port(
        name: &str,
        uid: &str,
        net: &str,
        owner: &str,
        ip: &str,
        bound_on: &str,
    ) -> Arc<v1::Port> {
        Arc::new(v1::Port {
            metadata: meta(name, uid),
            spec: Some(v1::PortSpec {
                network: "n".into(),
                device_owner: owner.into(),
                ..Default::default()
            }),
            status: Some(v1::PortStatus {
                network_uid: net.into(),
                mac: format!("fa:16:3e:00:00:{}", &uid[uid.len() - 2..]),
                addresses: vec![v1::PortAddress {
                    subnet: "v4".into(),
                    ip: ip.into(),
                }],
                node: bound_on.into(),
                bound: !bound_on.is_empty(),
                ..Default::default()
            }),
        })
    }

    fn server(name: &str, uid: &str, ports: &[&str]) -> Arc<v1::Server> {
        Arc::new(v1::Server {
            metadata: meta(name, uid),
            status: Some(v1::ServerStatus {
                node: "n1".into(),
                ports: ports.iter().map(|p| (*p).to_owned()).collect(),
                ..Default::default()
            }),
            ..Default::default()
        })
    }

    fn facts() -> Facts {
        Facts {
            node: "n1".into(),
            local_ip: Some("198.18.0.11".parse().unwrap()),
            servers: vec![server("web", "s-web", &["web-0"])],
            ports: vec![
                port("web-0", "port-01", "net-a", "compute:web", "10.0.0.5", ""),
                // Another node's guest on the same network, and one on another network.
                port("db-0", "port-02", "net-a", "compute:db", "10.0.0.6", "n2"),
                port("x-0", "port-03", "net-b", "compute:x", "10.0.0.5", "n3"),
                port(
                    "a-dhcp",
                    "port-04",
                    "net-a",
                    DHCP_DEVICE_OWNER,
                    "10.0.0.2",
                    "",
                ),
            ],
            networks: vec![network("a", "net-a", 101), network("b", "net-b", 102)],
            nodes: vec![
                node("n1", "198.18.0.11", true),
                node("n2", "198.18.0.12", false),
                node("n3", "198.18.0.13", false),
            ],
            routers: Vec::new(),
        }
    }

    fn router(node: &str, network: &str) -> Arc<v1::Router> {
        Arc::new(v1::Router {
            metadata: Some(v1::ObjectMeta {
                name: "edge".into(),
                project: "p".into(),
                uid: "r-uid".into(),
                ..Default::default()
            }),
            spec: Some(v1::RouterSpec {
                interfaces: vec![v1::RouterInterface {
                    network: network.into(),
                    subnet: "v4".into(),
                }],
                ..Default::default()
            }),
            status: Some(v1::RouterStatus {
                node: node.into(),
                conditions: vec![ferro_runtime::condition(
                    "Interfaces",
                    true,
                    "NoConflict",
                    "",
                )],
                ..Default::default()
            }),
        })
    }

    #[test]
    fn a_routers_legs_are_wired_on_its_node_and_tunnelled_to_from_the_others() {
        let mut here = facts();
        here.routers = vec![router("n1", "b")];
        let wanted = desired(&here);
        let leg = wanted
            .ports
            .values()
            .find(|p| p.wiring.network_uid == "net-b" && p.project.is_empty())
            .expect("the router's leg on b");
        match &leg.place {
            Place::Namespace {
                namespace,
                inner,
                addresses,
            } => {
                assert_eq!(namespace, "qrouter-r-uid");
                assert!(inner.starts_with("qr-"), "{inner}");
                assert_eq!(addresses.len(), 1, "the subnet's gateway address");
            }
            Place::Guest => panic!("a leg lives in the router's namespace"),
        }

        // On another node wiring network a, the router's node is a tunnel peer.
        let mut elsewhere = facts();
        elsewhere.routers = vec![router("n3", "a")];
        let wanted = desired(&elsewhere);
        assert!(
            wanted.networks["net-a"]
                .peers
                .contains(&"198.18.0.13".parse().unwrap())
        );
        assert!(wanted.ports.values().all(|p| !p.project.is_empty()));
    }

    #[test]
    fn a_node_wires_its_guests_ports_with_tunnels_to_exactly_the_nodes_sharing_a_network() {
        let desired = desired(&facts());
        let net = &desired.networks["net-a"];
        assert_eq!(net.segment_id, 101);
        assert_eq!(net.peers, BTreeSet::from(["198.18.0.12".parse().unwrap()]));
        assert!(!desired.networks.contains_key("net-b"), "no port of b here");
        let web = &desired.ports["port-01"];
        assert_eq!(web.wiring.device, "tapport01");
        assert_eq!(web.wiring.server_uid.as_deref(), Some("s-web"));
        assert_eq!(web.place, Place::Guest);
        assert!(desired.waiting.is_empty());
    }

    #[test]
    fn the_only_network_node_serves_dhcp_with_a_host_entry_per_addressed_port() {
        let wanted = desired(&facts());
        let dhcp = &wanted.dhcp["net-a"];
        assert_eq!(dhcp.namespace, "qdhcp-net-a");
        assert_eq!(dhcp.interface, "ns-port04");
        let hosts: Vec<(&str, String)> = dhcp
            .hosts
            .iter()
            .map(|h| (h.hostname.as_str(), h.ip.to_string()))
            .collect();
        assert_eq!(
            hosts,
            [
                ("web", "10.0.0.5".to_owned()),
                ("db", "10.0.0.6".to_owned()),
                ("dhcp-a-dhcp", "10.0.0.2".to_owned())
            ]
        );
        let Place::Namespace { addresses, .. } = &wanted.ports["port-04"].place else {
            panic!("the DHCP port lives in its namespace");
        };
        // The network has no router: its DHCP namespace serves metadata, and DHCP gives
        // the route there.
        assert_eq!(
            addresses,
            &[
                "10.0.0.2/24".parse::<IpNet>().unwrap(),
                "169.254.169.254/32".parse().unwrap()
            ]
        );
        assert_eq!(wanted.metadata["net-a"], "qdhcp-net-a");
        assert_eq!(
            dhcp.subnets[0].host_routes,
            [HostRoute {
                destination: "169.254.169.254/32".parse().unwrap(),
                nexthop: "10.0.0.2".parse().unwrap(),
            }]
        );
        // A compute-only node serves none.
        let mut other = facts();
        other.node = "n2".into();
        other.servers.clear();
        assert!(desired(&other).dhcp.is_empty());
    }

    #[test]
    fn a_probe_port_is_wired_into_its_own_namespace_on_the_node_it_names() {
        let mut f = facts();
        let mut probe = (*port(
            "p-1",
            "port-09",
            "net-a",
            PROBE_DEVICE_OWNER,
            "10.0.0.9",
            "",
        ))
        .clone();
        probe
            .metadata
            .as_mut()
            .unwrap()
            .annotations
            .insert(PROBE_NODE_ANNOTATION.into(), "n1".into());
        f.ports.push(Arc::new(probe.clone()));
        let wanted = desired(&f);
        let Place::Namespace {
            namespace, inner, ..
        } = &wanted.ports["port-09"].place
        else {
            panic!("a probe lives in a namespace");
        };
        assert_eq!(
            (namespace.as_str(), inner.as_str()),
            ("qprobe-port-09", "ns-port09")
        );
        assert!(!wanted.dhcp.contains_key("port-09"));
        // On another node it is not this one's.
        probe
            .metadata
            .as_mut()
            .unwrap()
            .annotations
            .insert(PROBE_NODE_ANNOTATION.into(), "n2".into());
        f.ports.pop();
        f.ports.push(Arc::new(probe));
        assert!(!desired(&f).ports.contains_key("port-09"));
    }

    #[test]
    fn ports_that_cannot_be_wired_yet_say_why() {
        type Change = Box<dyn Fn(&mut Facts)>;
        let cases: [(&str, Change, &str); 4] = [
            (
                "no segment",
                Box::new(|f| f.networks[0] = network("a", "net-a", 0)),
                "SegmentPending",
            ),
            (
                "network deleting",
                Box::new(|f| {
                    let mut n = (*network("a", "net-a", 101)).clone();
                    n.metadata.as_mut().unwrap().deletion_timestamp = Some(Default::default());
                    f.networks[0] = Arc::new(n);
                }),
                "NetworkDeleting",
            ),
            (
                "network unknown",
                Box::new(|f| f.networks.clear()),
                "NetworkPending",
            ),
            (
                "no underlay",
                Box::new(|f| f.local_ip = None),
                "NoTunnelEndpoint",
            ),
        ];
        for (what, change, reason) in cases {
            let mut f = facts();
            change(&mut f);
            let desired = desired(&f);
            assert!(!desired.ports.contains_key("port-01"), "{what}");
            assert_eq!(desired.waiting["port-01"].reason, reason, "{what}");
        }
    }

    #[test]
    fn dhcp_placement_is_stable_and_moves_only_the_networks_of_a_node_that_leaves() {
        let nets: Vec<String> = (0..64).map(|i| format!("net-{i}")).collect();
        let three = ["n1", "n2", "n3"];
        let two = ["n1", "n2"];
        for net in &nets {
            let before = dhcp_node(net, &three).unwrap();
            assert_eq!(dhcp_node(net, &three), Some(before), "stable");
            let after = dhcp_node(net, &two).unwrap();
            if before != "n3" {
                assert_eq!(after, before, "{net} moved though its node stayed");
            }
        }
        assert_eq!(dhcp_node("net-0", &[]), None);
    }
}
