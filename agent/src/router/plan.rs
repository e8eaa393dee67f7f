//! What the routers of one node should be, from the API alone: [`desired`]. Pure.
//!
//! A Router placed on this node (`status.node`) becomes a `qrouter-<router-uid>`
//! namespace holding:
//! - a leg per `spec.interfaces` subnet ([`legs`]): a veth whose inner end (`qr-…`) holds
//!   the subnet's gateway address. Legs are wired into their tenant networks by the node's
//!   network reconciler, exactly like a DHCP port, so tunnels, flows and the Open vSwitch
//!   or bridge records come from one place; this module only says what they are. A leg has
//!   no Port object: its identity (a uid for device names, a MAC) is derived from the
//!   router's uid and the subnet, so every node computes the same one without a write;
//! - a gateway leg on the external network ([`Gateway`]): a veth from the node's provider
//!   bridge (`br-ex`, which holds the node's provider interface) whose inner end (`qg-…`)
//!   holds the router's external address, its floating IPs as `/32`s, and the default
//!   route to the external subnet's gateway;
//! - `spec.routes`, IP forwarding, and one nftables table ([`super::nft`]) with SNAT of the
//!   tenant subnets to the gateway address (unless `snat: false`) and a DNAT+SNAT pair per
//!   floating IP the router maps.
//!
//! A router's legs are built only once the router controller has said no earlier router
//! holds one of its subnets (`Interfaces=True`): two routers holding one gateway address
//! would answer for it together.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;

use ferro_api::resolve::resolve;
use ferro_api::v1;
use ipnet::IpNet;
use sha2::Digest;

use crate::wiring::device_name;

/// The prefix of a router's namespace: `qrouter-<router-uid>`.
pub const ROUTER_NAMESPACE_PREFIX: &str = "qrouter-";
/// The prefix of a tenant leg's end inside the router's namespace.
pub const LEG_DEVICE_PREFIX: &str = "qr-";
/// The prefix of the gateway leg's end inside the router's namespace.
pub const GATEWAY_DEVICE_PREFIX: &str = "qg-";
/// The prefix of the gateway leg's end on the provider bridge.
pub const GATEWAY_HOST_PREFIX: &str = "rg-";
/// The node's provider bridge: it holds the provider interface and the gateway legs.
pub const PROVIDER_BRIDGE: &str = "br-ex";
/// The MTU of external networks (no tunnel overhead).
pub const EXTERNAL_MTU: u32 = 1500;
/// The `deviceOwner` Neutron gives a router's tenant leg; a leg's DHCP host entry and
/// logs use it.
pub const ROUTER_INTERFACE_OWNER: &str = "network:router_interface";

/// The namespace of a router: `qrouter-<router-uid>`.
pub fn router_namespace(router_uid: &str) -> String {
    format!("{ROUTER_NAMESPACE_PREFIX}{router_uid}")
}

/// A tenant leg of a router: what the network reconciler wires as a veth into the router's
/// namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leg {
    /// A uid derived from the router's uid, the network's and the subnet: it names the
    /// devices as a Port's uid would.
    pub uid: String,
    /// The router's uid.
    pub router_uid: String,
    /// The tenant Network's uid.
    pub network_uid: String,
    /// The subnet's name.
    pub subnet: String,
    /// The leg's MAC, derived like its uid (`fa:16:3f:…`, beside IPAM's `fa:16:3e:…`).
    pub mac: String,
    /// The subnet's gateway address with the subnet's prefix length.
    pub address: IpNet,
}

/// The legs of a Router on its tenant subnets, resolved against `networks`: one per
/// interface whose network resolves (in the router's project, or shared) and whose subnet
/// has a gateway address. None while the router controller has not found its subnets free
/// of other routers (`Interfaces=True`), or while it is being deleted.
pub fn legs(router: &v1::Router, networks: &[Arc<v1::Network>]) -> Vec<Leg> {
    let Some(m) = &router.metadata else {
        return Vec::new();
    };
    let status = router.status.clone().unwrap_or_default();
    let free = status
        .conditions
        .iter()
        .any(|c| c.r#type == "Interfaces" && c.status == v1::condition::Status::True as i32);
    if m.uid.is_empty() || m.deletion_timestamp.is_some() || !free {
        return Vec::new();
    }
    let spec = router.spec.clone().unwrap_or_default();
    let mut out = Vec::new();
    for interface in &spec.interfaces {
        let Ok(network) = resolve(
            &m.project,
            &interface.network,
            networks.iter().map(|n| n.as_ref()),
        ) else {
            continue;
        };
        let Some(nm) = &network.metadata else {
            continue;
        };
        let subnets = network.spec.as_ref().map(|s| s.subnets.as_slice());
        let Some(subnet) = subnets
            .unwrap_or_default()
            .iter()
            .find(|s| s.name == interface.subnet)
        else {
            continue;
        };
        let (Ok(cidr), Some(Ok(gateway))) = (
            subnet.cidr.parse::<IpNet>(),
            subnet.gateway.as_deref().map(str::parse::<IpAddr>),
        ) else {
            continue;
        };
        let Ok(address) = IpNet::new(gateway, cidr.prefix_len()) else {
            continue;
        };
        let digest = sha2::Sha256::digest(
            format!("router-leg/{}/{}/{}", m.uid, nm.uid, subnet.name).as_bytes(),
        );
        out.push(Leg {
            uid: uid_from(&digest),
            router_uid: m.uid.clone(),
            network_uid: nm.uid.clone(),
            subnet: subnet.name.clone(),
            mac: format!(
                "fa:16:3f:{:02x}:{:02x}:{:02x}",
                digest[16], digest[17], digest[18]
            ),
            address,
        });
    }
    out
}

/// A uid shaped like an object's (`8-4-4-4-12` hex digits) from a digest.
fn uid_from(digest: &[u8]) -> String {
    let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// A router's gateway leg, on the node's provider bridge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gateway {
    /// The veth's end on the provider bridge (`rg-…`).
    pub host: String,
    /// Its end inside the router's namespace (`qg-…`).
    pub inner: String,
    /// The inner end's MAC, derived from the router's uid, so a router rebuilt on another
    /// node after a failover answers with the same one.
    pub mac: String,
    /// The router's external address with the external subnet's prefix length.
    pub address: IpNet,
    /// The external subnet's gateway: the router's default route.
    pub nexthop: Option<IpAddr>,
}

/// A floating IP a router maps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapping {
    /// The FloatingIP's project.
    pub project: String,
    /// Its name.
    pub name: String,
    /// The floating address.
    pub address: IpAddr,
    /// The private address it maps to.
    pub fixed_ip: IpAddr,
}

/// A Router as this node must build it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WantedRouter {
    /// Its uid.
    pub uid: String,
    /// Its project.
    pub project: String,
    /// Its name.
    pub name: String,
    /// `qrouter-<uid>`.
    pub namespace: String,
    /// Its tenant legs (wired by the network reconciler).
    pub legs: Vec<Leg>,
    /// Its gateway leg, when it has an external address and this node a provider bridge.
    pub gateway: Option<Gateway>,
    /// Static routes: destination and next hop.
    pub routes: BTreeSet<(IpNet, IpAddr)>,
    /// Whether tenant subnets leave as the gateway address.
    pub snat: bool,
    /// The floating IPs it maps.
    pub mappings: Vec<Mapping>,
    /// Why part of it cannot be built yet, for its `Plumbed` condition.
    pub waiting: Option<String>,
}

impl WantedRouter {
    /// The subnets of its legs: what SNAT applies to.
    pub fn tenant_subnets(&self) -> Vec<IpNet> {
        self.legs.iter().map(|l| l.address.trunc()).collect()
    }
}

/// What the API says one node's routers should be.
#[derive(Debug, Clone, Default)]
pub struct Facts {
    /// This node's name.
    pub node: String,
    /// Whether this node has a provider bridge (a provider interface was configured).
    pub provider: bool,
    /// Every Router.
    pub routers: Vec<Arc<v1::Router>>,
    /// Every Network.
    pub networks: Vec<Arc<v1::Network>>,
    /// Every FloatingIP.
    pub floating_ips: Vec<Arc<v1::FloatingIp>>,
}

/// The routers this node builds, by uid. See the module notes.
pub fn desired(facts: &Facts) -> BTreeMap<String, WantedRouter> {
    let mut out = BTreeMap::new();
    for router in &facts.routers {
        let Some(m) = &router.metadata else { continue };
        let status = router.status.clone().unwrap_or_default();
        if m.uid.is_empty() || status.node != facts.node || m.deletion_timestamp.is_some() {
            continue;
        }
        let spec = router.spec.clone().unwrap_or_default();
        let mut waiting = None;
        let legs = legs(router, &facts.networks);
        if legs.len() < spec.interfaces.len() {
            waiting = Some(format!(
                "{} of {} interfaces have their network, subnet and gateway address, and no \
                 conflict",
                legs.len(),
                spec.interfaces.len()
            ));
        }
        let gateway = match &spec.external_gateway {
            None => None,
            Some(_) if !facts.provider => {
                waiting = Some(format!(
                    "node {} has no provider interface for the external gateway",
                    facts.node
                ));
                None
            }
            Some(wanted) => match gateway_of(router, &wanted.network, &facts.networks) {
                Some(gateway) => Some(gateway),
                None => {
                    waiting = Some("the external gateway has no address yet".to_owned());
                    None
                }
            },
        };
        let routes = spec
            .routes
            .iter()
            .filter_map(|r| Some((r.destination.parse().ok()?, r.nexthop.parse().ok()?)))
            .collect();
        let mappings = if gateway.is_some() {
            facts
                .floating_ips
                .iter()
                .filter_map(|fip| {
                    let fm = fip.metadata.as_ref()?;
                    let s = fip.status.as_ref()?;
                    if fm.project != m.project
                        || s.router != m.name
                        || fm.deletion_timestamp.is_some()
                    {
                        return None;
                    }
                    Some(Mapping {
                        project: fm.project.clone(),
                        name: fm.name.clone(),
                        address: s.address.parse().ok()?,
                        fixed_ip: s.fixed_ip.parse().ok()?,
                    })
                })
                .collect()
        } else {
            Vec::new()
        };
        out.insert(
            m.uid.clone(),
            WantedRouter {
                uid: m.uid.clone(),
                project: m.project.clone(),
                name: m.name.clone(),
                namespace: router_namespace(&m.uid),
                legs,
                gateway,
                routes,
                snat: spec.snat.unwrap_or(true),
                mappings,
                waiting,
            },
        );
    }
    out
}

/// The gateway leg of a router with an external address on `network` (resolved from the
/// router's project; it must be external).
fn gateway_of(
    router: &v1::Router,
    network: &str,
    networks: &[Arc<v1::Network>],
) -> Option<Gateway> {
    let m = router.metadata.as_ref()?;
    let ip: IpAddr = router.status.as_ref()?.external_ips.first()?.parse().ok()?;
    let network = resolve(&m.project, network, networks.iter().map(|n| n.as_ref())).ok()?;
    if network.spec.as_ref()?.external != Some(true) {
        return None;
    }
    let subnet = network
        .spec
        .as_ref()?
        .subnets
        .iter()
        .find(|s| s.cidr.parse::<IpNet>().is_ok_and(|c| c.contains(&ip)))?;
    let cidr: IpNet = subnet.cidr.parse().ok()?;
    let digest = sha2::Sha256::digest(format!("router-gateway/{}", m.uid).as_bytes());
    Some(Gateway {
        host: device_name(GATEWAY_HOST_PREFIX, &m.uid),
        inner: device_name(GATEWAY_DEVICE_PREFIX, &m.uid),
        mac: format!(
            "fa:16:3f:{:02x}:{:02x}:{:02x}",
            digest[0], digest[1], digest[2]
        ),
        address: IpNet::new(ip, cidr.prefix_len()).ok()?,
        nexthop: subnet.gateway.as_deref().and_then(|g| g.parse().ok()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn network(
        name: &str,
        uid: &str,
        cidr: &str,
        gateway: &str,
        external: bool,
    ) -> Arc<v1::Network> {
        Arc::new(v1::Network {
            metadata: Some(v1::ObjectMeta {
                name: name.into(),
                project: "default".into(),
                uid: uid.into(),
                ..Default::default()
            }),
            spec: Some(v1::NetworkSpec {
                external: Some(external),
                subnets: vec![v1::Subnet {
                    name: "v4".into(),
                    cidr: cidr.into(),
                    gateway: Some(gateway.into()),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            status: None,
        })
    }

    fn router(node: &str, free: bool) -> Arc<v1::Router> {
        Arc::new(v1::Router {
            metadata: Some(v1::ObjectMeta {
                name: "edge".into(),
                project: "default".into(),
                uid: "11111111-2222-3333-4444-555555555555".into(),
                ..Default::default()
            }),
            spec: Some(v1::RouterSpec {
                external_gateway: Some(v1::RouterGateway {
                    network: "public".into(),
                    fixed_ip: String::new(),
                }),
                interfaces: vec![
                    v1::RouterInterface {
                        network: "lan".into(),
                        subnet: "v4".into(),
                    },
                    v1::RouterInterface {
                        network: "lan2".into(),
                        subnet: "v4".into(),
                    },
                ],
                routes: vec![v1::HostRoute {
                    destination: "192.168.9.0/24".into(),
                    nexthop: "10.0.0.9".into(),
                }],
                snat: None,
            }),
            status: Some(v1::RouterStatus {
                node: node.into(),
                external_ips: vec!["203.0.113.10".into()],
                conditions: vec![ferro_runtime::condition(
                    "Interfaces",
                    free,
                    "NoConflict",
                    "",
                )],
                observed_generation: 1,
            }),
        })
    }

    fn facts(provider: bool, free: bool) -> Facts {
        Facts {
            node: "node-1".into(),
            provider,
            routers: vec![router("node-1", free), router("node-2", free)],
            networks: vec![
                network("lan", "net-a", "10.0.0.0/24", "10.0.0.1", false),
                network("lan2", "net-b", "10.1.0.0/24", "10.1.0.1", false),
                network("public", "net-x", "203.0.113.0/24", "203.0.113.1", true),
            ],
            floating_ips: vec![Arc::new(v1::FloatingIp {
                metadata: Some(v1::ObjectMeta {
                    name: "web".into(),
                    project: "default".into(),
                    uid: "fip".into(),
                    ..Default::default()
                }),
                spec: None,
                status: Some(v1::FloatingIpStatus {
                    address: "203.0.113.20".into(),
                    fixed_ip: "10.0.0.5".into(),
                    router: "edge".into(),
                    ..Default::default()
                }),
            })],
        }
    }

    #[test]
    fn a_router_here_gets_its_legs_gateway_routes_and_floating_ips() {
        let wanted = desired(&facts(true, true));
        assert_eq!(wanted.len(), 1, "only the router placed on this node");
        let r = wanted.values().next().unwrap();
        assert_eq!(r.namespace, "qrouter-11111111-2222-3333-4444-555555555555");
        assert_eq!(r.waiting, None);
        let addresses: Vec<String> = r.legs.iter().map(|l| l.address.to_string()).collect();
        assert_eq!(addresses, ["10.0.0.1/24", "10.1.0.1/24"]);
        assert_ne!(r.legs[0].uid, r.legs[1].uid);
        assert!(r.legs.iter().all(|l| l.mac.starts_with("fa:16:3f:")));
        let gateway = r.gateway.as_ref().unwrap();
        assert_eq!(gateway.address.to_string(), "203.0.113.10/24");
        assert_eq!(gateway.nexthop, Some("203.0.113.1".parse().unwrap()));
        assert_eq!(gateway.inner, "qg-111111112222");
        assert_eq!(gateway.host, "rg-111111112222");
        assert_eq!(r.routes.len(), 1);
        assert!(r.snat);
        assert_eq!(r.mappings.len(), 1);
        assert_eq!(
            r.mappings[0].fixed_ip,
            "10.0.0.5".parse::<IpAddr>().unwrap()
        );
        // Every node derives the same legs.
        assert_eq!(
            legs(&facts(true, true).routers[0], &facts(true, true).networks),
            r.legs
        );
    }

    #[test]
    fn a_router_waits_for_a_provider_interface_and_for_its_subnets_to_be_free() {
        let wanted = desired(&facts(false, true));
        let r = wanted.values().next().unwrap();
        assert_eq!(r.gateway, None);
        assert!(r.mappings.is_empty());
        assert!(r.waiting.as_deref().unwrap().contains("provider interface"));
        let wanted = desired(&facts(true, false));
        let r = wanted.values().next().unwrap();
        assert!(r.legs.is_empty());
        assert!(r.waiting.as_deref().unwrap().contains("0 of 2 interfaces"));
    }
}
