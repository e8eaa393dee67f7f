//! What the security groups of one node's ports should enforce, from the API alone:
//! [`desired`]. Pure.
//!
//! The ports enforced here are the ones this node plugs a guest or a probe for (the Ports
//! of the Servers placed on it, its probe Ports), with `portSecurity` on. A Port's groups
//! are its `spec.securityGroups`, or its project's `default` group when it names none, as
//! Neutron gives every port the default group. Each group's rules become [`Allow`]s with
//! their remote side resolved: a `remoteGroup` becomes the addresses of the Ports that are
//! members of that group now, on any node, so membership follows Ports as they come and
//! go. A rule whose remote group has no member allows nothing and is left out; a group
//! that does not exist (yet) contributes no rule, so the port is closed rather than open.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;

use ferro_api::v1;
use ferro_api::v1::security_group_rule::{Direction as ApiDirection, Ethertype, Protocol};
use ipnet::IpNet;

use crate::network::plan::{COMPUTE_DEVICE_OWNER, PROBE_DEVICE_OWNER, PROBE_NODE_ANNOTATION};

/// The group a Port that names none is in.
pub const DEFAULT_GROUP: &str = "default";

/// What the API says about the ports of one node.
#[derive(Debug, Clone, Default)]
pub struct Facts {
    /// This node's name.
    pub node: String,
    /// The Servers placed on this node.
    pub servers: Vec<Arc<v1::Server>>,
    /// Every Port.
    pub ports: Vec<Arc<v1::Port>>,
    /// Every SecurityGroup.
    pub groups: Vec<Arc<v1::SecurityGroup>>,
    /// Every Network.
    pub networks: Vec<Arc<v1::Network>>,
}

/// Which way traffic goes, seen from the port's guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Direction {
    /// Into the guest.
    Ingress,
    /// Out of the guest.
    Egress,
}

/// An IP version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    /// IPv4.
    V4,
    /// IPv6.
    V6,
}

impl Family {
    /// The family of an address.
    pub fn of(ip: &IpAddr) -> Family {
        if ip.is_ipv4() { Family::V4 } else { Family::V6 }
    }
}

/// The protocol part of a rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Traffic {
    /// Every protocol.
    Any,
    /// TCP to a destination port range (inclusive); `None` means every port.
    Tcp(Option<(u16, u16)>),
    /// UDP to a destination port range (inclusive); `None` means every port.
    Udp(Option<(u16, u16)>),
    /// ICMP (ICMPv6 under IPv6), of a type and code when given.
    Icmp {
        /// The type, `None` for any.
        kind: Option<u8>,
        /// The code, `None` for any.
        code: Option<u8>,
    },
}

/// Who is on the other side of a rule.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Remote {
    /// Anyone.
    Any,
    /// Addresses within a network.
    Net(IpNet),
    /// The members of a group of the port's project: [`Desired::members`] has their
    /// addresses, which change without the rule changing.
    Group(GroupRef),
}

/// A SecurityGroup, by project and name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GroupRef {
    /// Its project.
    pub project: String,
    /// Its name.
    pub name: String,
}

/// One allow rule as enforced on one port.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Allow {
    /// Into or out of the guest.
    pub direction: Direction,
    /// IPv4 or IPv6.
    pub family: Family,
    /// Protocol and ports.
    pub traffic: Traffic,
    /// The peer.
    pub remote: Remote,
}

/// What one port enforces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortFirewall {
    /// The Port's uid.
    pub uid: String,
    /// `project/name`, for logs.
    pub label: String,
    /// The host device the port's traffic passes (the guest's tap, a probe veth's host
    /// end).
    pub device: String,
    /// The only source MAC the guest may use.
    pub mac: String,
    /// The only source addresses the guest may use.
    pub addresses: BTreeSet<IpAddr>,
    /// The uid of the port's network.
    pub network_uid: String,
    /// The conntrack zone of the port's network.
    pub zone: u16,
    /// The rules of the port's groups, deduplicated, in a stable order.
    pub allows: BTreeSet<Allow>,
}

/// What this node's ports should enforce, by Port uid.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Desired {
    /// The enforced ports.
    pub ports: BTreeMap<String, PortFirewall>,
    /// The members' addresses of every group a rule here names as its remote side, of
    /// one family each.
    pub members: BTreeMap<(GroupRef, Family), BTreeSet<IpAddr>>,
}

/// The conntrack zone of a network: its segment ID folded into 16 bits (never 0, the
/// zone of everything else). Two networks share a zone only if their segments are
/// 65,535 apart.
pub fn zone(segment_id: u32) -> u16 {
    (segment_id % 0xffff) as u16 + 1
}

/// Whether a Port's traffic is filtered at all: `portSecurity` defaults to on.
pub fn port_security(port: &v1::Port) -> bool {
    port.spec
        .as_ref()
        .and_then(|s| s.port_security)
        .unwrap_or(true)
}

/// The groups a Port is in: those it names, or its project's `default` group; none for
/// the ports of network services (DHCP, router legs), which have no guest to filter.
pub fn groups_of(port: &v1::Port) -> Vec<String> {
    let Some(spec) = &port.spec else {
        return Vec::new();
    };
    let guest = spec.device_owner.is_empty()
        || spec.device_owner.starts_with(COMPUTE_DEVICE_OWNER)
        || spec.device_owner == PROBE_DEVICE_OWNER;
    if !guest || !port_security(port) {
        return Vec::new();
    }
    if spec.security_groups.is_empty() {
        vec![DEFAULT_GROUP.to_owned()]
    } else {
        spec.security_groups.clone()
    }
}

fn addresses_of(port: &v1::Port) -> BTreeSet<IpAddr> {
    port.status
        .iter()
        .flat_map(|s| &s.addresses)
        .filter_map(|a| a.ip.parse().ok())
        .collect()
}

/// What this node's ports should enforce. See the module notes.
pub fn desired(facts: &Facts) -> Desired {
    let mut out = Desired::default();
    let by_name: BTreeMap<(&str, &str), &v1::Port> = facts
        .ports
        .iter()
        .filter_map(|p| {
            let m = p.metadata.as_ref()?;
            Some(((m.project.as_str(), m.name.as_str()), p.as_ref()))
        })
        .collect();
    let groups: BTreeMap<(&str, &str), &v1::SecurityGroup> = facts
        .groups
        .iter()
        .filter_map(|g| {
            let m = g.metadata.as_ref()?;
            Some(((m.project.as_str(), m.name.as_str()), g.as_ref()))
        })
        .collect();
    let segments: BTreeMap<&str, u32> = facts
        .networks
        .iter()
        .filter_map(|n| {
            Some((
                n.metadata.as_ref()?.uid.as_str(),
                n.status.as_ref()?.segment_id,
            ))
        })
        .collect();
    // Members of each group: (project, group) → addresses of its ports, on any node.
    let mut members: BTreeMap<(String, String), BTreeSet<IpAddr>> = BTreeMap::new();
    for port in &facts.ports {
        let Some(m) = &port.metadata else { continue };
        let addresses = addresses_of(port);
        for group in groups_of(port) {
            members
                .entry((m.project.clone(), group))
                .or_default()
                .extend(addresses.iter().copied());
        }
    }

    let mut mine: Vec<&v1::Port> = Vec::new();
    for server in &facts.servers {
        let Some(m) = &server.metadata else { continue };
        for name in server.status.iter().flat_map(|s| &s.ports) {
            if let Some(port) = by_name.get(&(m.project.as_str(), name.as_str())) {
                mine.push(port);
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
            mine.push(port.as_ref());
        }
    }

    for port in mine {
        let Some(m) = &port.metadata else { continue };
        let status = port.status.clone().unwrap_or_default();
        if m.uid.is_empty() || !port_security(port) || status.mac.is_empty() {
            continue;
        }
        let segment = segments
            .get(status.network_uid.as_str())
            .copied()
            .unwrap_or(0);
        let mut allows = BTreeSet::new();
        for name in groups_of(port) {
            let Some(group) = groups.get(&(m.project.as_str(), name.as_str())) else {
                continue;
            };
            for rule in group.spec.iter().flat_map(|s| &s.rules) {
                let remote = if !rule.remote_group.is_empty() {
                    Remote::Group(GroupRef {
                        project: m.project.clone(),
                        name: rule.remote_group.clone(),
                    })
                } else {
                    match rule.remote_cidr.parse::<IpNet>() {
                        Ok(net) => Remote::Net(net.trunc()),
                        Err(_) => Remote::Any,
                    }
                };
                let allow = allow_of(rule, remote);
                if let Remote::Group(group) = &allow.remote {
                    let key = (group.project.clone(), group.name.clone());
                    let addresses = members.get(&key).into_iter().flatten();
                    out.members
                        .entry((group.clone(), allow.family))
                        .or_default()
                        .extend(addresses.filter(|ip| Family::of(ip) == allow.family));
                }
                allows.insert(allow);
            }
        }
        out.ports.insert(
            m.uid.clone(),
            PortFirewall {
                uid: m.uid.clone(),
                label: format!("{}/{}", m.project, m.name),
                device: crate::network::plan::tap_name(&m.uid),
                mac: status.mac.clone(),
                addresses: addresses_of(port),
                network_uid: status.network_uid.clone(),
                zone: zone(segment),
                allows,
            },
        );
    }
    out
}

/// The allow one rule gives.
fn allow_of(rule: &v1::SecurityGroupRule, remote: Remote) -> Allow {
    let direction = match rule.direction() {
        ApiDirection::Egress => Direction::Egress,
        _ => Direction::Ingress,
    };
    let family = match rule.ethertype.and_then(|e| Ethertype::try_from(e).ok()) {
        Some(Ethertype::IPv6) => Family::V6,
        Some(Ethertype::IPv4) => Family::V4,
        _ => match &remote {
            Remote::Net(net) => Family::of(&net.addr()),
            _ => Family::V4,
        },
    };
    let range = |min: Option<u32>, max: Option<u32>| {
        min.map(|min| {
            let min = min.min(65535) as u16;
            let max = max.map_or(min, |m| m.min(65535) as u16);
            (min, max.max(min))
        })
    };
    let traffic = match rule.protocol.and_then(|p| Protocol::try_from(p).ok()) {
        Some(Protocol::Tcp) => Traffic::Tcp(range(rule.port_range_min, rule.port_range_max)),
        Some(Protocol::Udp) => Traffic::Udp(range(rule.port_range_min, rule.port_range_max)),
        Some(Protocol::Icmp) => Traffic::Icmp {
            kind: rule.port_range_min.map(|t| t.min(255) as u8),
            code: rule.port_range_max.map(|c| c.min(255) as u8),
        },
        _ => Traffic::Any,
    };
    Allow {
        direction,
        family,
        traffic,
        remote,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn port(project: &str, name: &str, uid: &str, ip: &str, groups: &[&str]) -> Arc<v1::Port> {
        Arc::new(v1::Port {
            metadata: Some(v1::ObjectMeta {
                name: name.into(),
                project: project.into(),
                uid: uid.into(),
                ..Default::default()
            }),
            spec: Some(v1::PortSpec {
                network: "net".into(),
                security_groups: groups.iter().map(|g| g.to_string()).collect(),
                device_owner: format!("compute:{name}"),
                ..Default::default()
            }),
            status: Some(v1::PortStatus {
                addresses: vec![v1::PortAddress {
                    subnet: "s".into(),
                    ip: ip.into(),
                }],
                mac: "fa:16:3e:00:00:01".into(),
                network_uid: "net-uid".into(),
                ..Default::default()
            }),
        })
    }

    fn server(project: &str, name: &str, ports: &[&str]) -> Arc<v1::Server> {
        Arc::new(v1::Server {
            metadata: Some(v1::ObjectMeta {
                name: name.into(),
                project: project.into(),
                uid: format!("{name}-uid"),
                ..Default::default()
            }),
            status: Some(v1::ServerStatus {
                ports: ports.iter().map(|p| p.to_string()).collect(),
                ..Default::default()
            }),
            ..Default::default()
        })
    }

    fn group(
        project: &str,
        name: &str,
        rules: Vec<v1::SecurityGroupRule>,
    ) -> Arc<v1::SecurityGroup> {
        Arc::new(v1::SecurityGroup {
            metadata: Some(v1::ObjectMeta {
                name: name.into(),
                project: project.into(),
                ..Default::default()
            }),
            spec: Some(v1::SecurityGroupSpec {
                rules,
                ..Default::default()
            }),
            status: None,
        })
    }

    fn rule(
        direction: ApiDirection,
        protocol: Protocol,
        min: Option<u32>,
    ) -> v1::SecurityGroupRule {
        v1::SecurityGroupRule {
            direction: direction as i32,
            protocol: Some(protocol as i32),
            port_range_min: min,
            ..Default::default()
        }
    }

    fn facts() -> Facts {
        let mut from_default = rule(ApiDirection::Ingress, Protocol::Any, None);
        from_default.remote_group = DEFAULT_GROUP.into();
        Facts {
            node: "n1".into(),
            servers: vec![server("p", "web", &["web-0"])],
            ports: vec![
                port("p", "web-0", "u1", "10.0.0.5", &[]),
                port("p", "db-0", "u2", "10.0.0.6", &[]),
                port("q", "other-0", "u3", "10.0.0.7", &[]),
            ],
            groups: vec![group(
                "p",
                DEFAULT_GROUP,
                vec![
                    from_default,
                    rule(ApiDirection::Egress, Protocol::Any, None),
                ],
            )],
            networks: Vec::new(),
        }
    }

    #[test]
    fn a_port_without_groups_gets_its_projects_default_with_members_resolved() {
        let desired = desired(&facts());
        assert_eq!(desired.ports.keys().collect::<Vec<_>>(), ["u1"]);
        let port = &desired.ports["u1"];
        assert_eq!(port.device, "tapu1");
        let default = GroupRef {
            project: "p".into(),
            name: DEFAULT_GROUP.into(),
        };
        assert!(port.allows.contains(&Allow {
            direction: Direction::Ingress,
            family: Family::V4,
            traffic: Traffic::Any,
            remote: Remote::Group(default.clone()),
        }));
        assert!(port.allows.contains(&Allow {
            direction: Direction::Egress,
            family: Family::V4,
            traffic: Traffic::Any,
            remote: Remote::Any,
        }));
        assert_eq!(port.allows.len(), 2);
        // The other project's port is no member of this project's default group.
        let members: BTreeSet<IpAddr> = ["10.0.0.5", "10.0.0.6"]
            .iter()
            .map(|n| n.parse().unwrap())
            .collect();
        assert_eq!(
            desired.members,
            BTreeMap::from([((default, Family::V4), members)])
        );
    }

    #[test]
    fn rules_resolve_ports_and_families() {
        let mut facts = facts();
        let mut from_net = rule(ApiDirection::Ingress, Protocol::Tcp, Some(80));
        from_net.remote_cidr = "fd00::1/64".into();
        facts.groups = vec![group(
            "p",
            DEFAULT_GROUP,
            vec![
                rule(ApiDirection::Ingress, Protocol::Tcp, Some(80)),
                from_net,
            ],
        )];
        let port = &desired(&facts).ports["u1"];
        assert_eq!(
            port.allows.iter().collect::<Vec<_>>(),
            [
                &Allow {
                    direction: Direction::Ingress,
                    family: Family::V4,
                    traffic: Traffic::Tcp(Some((80, 80))),
                    remote: Remote::Any,
                },
                &Allow {
                    direction: Direction::Ingress,
                    family: Family::V6,
                    traffic: Traffic::Tcp(Some((80, 80))),
                    remote: Remote::Net("fd00::/64".parse().unwrap()),
                }
            ]
        );
    }

    #[test]
    fn a_port_without_port_security_or_a_missing_group_is_handled() {
        let mut facts = facts();
        let mut open = (*facts.ports[0]).clone();
        open.spec.as_mut().unwrap().port_security = Some(false);
        facts.ports[0] = Arc::new(open);
        assert!(desired(&facts).ports.is_empty());

        let mut facts = self::facts();
        facts.groups.clear();
        assert!(
            desired(&facts).ports["u1"].allows.is_empty(),
            "closed, not open"
        );
    }

    #[test]
    fn zones_are_never_zero() {
        assert_eq!(zone(0), 1);
        assert_eq!(zone(1), 2);
        assert_ne!(zone(0xffff - 1), 0);
        assert_ne!(zone(0xffff * 3 - 1), 0);
    }
}
