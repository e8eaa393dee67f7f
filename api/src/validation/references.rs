//! Checks that need other objects: what a Router or FloatingIP names must not contradict
//! objects that exist.
//!
//! Only contradictions are refused — a reference to a Network that exists and is not
//! external, a subnet another Router already serves, an address outside the pools it
//! would come from. A reference to something that does not exist (yet) is never refused:
//! the controllers report it as a condition, so a whole stack applies in any order. Names
//! resolve by [`crate::resolve`]'s rule, as the controllers resolve them.

use std::net::IpAddr;

use ipnet::IpNet;

use super::{FieldPath, Violations};
use crate::{
    resolve::{Referable, resolve},
    v1,
};

/// The objects the checks read, as the apiserver found them.
#[derive(Clone, Debug, Default)]
pub struct Others {
    /// Every Network, of every project.
    pub networks: Vec<v1::Network>,
    /// Every Router, of every project.
    pub routers: Vec<v1::Router>,
    /// Every Volume, of every project (only for a Server).
    pub volumes: Vec<v1::Volume>,
    /// Every Server, of every project (only for a Server).
    pub servers: Vec<v1::Server>,
}

fn find<'a, T: Referable>(project: &str, name: &str, all: &'a [T]) -> Option<&'a T> {
    resolve(project, name, all.iter()).ok()
}

fn uid<T: Referable>(object: &T) -> &str {
    object
        .metadata()
        .map(|m| m.uid.as_str())
        .unwrap_or_default()
}

fn is_external(network: &v1::Network) -> bool {
    network.spec.as_ref().and_then(|s| s.external) == Some(true)
}

/// A Router: its gateway is on an external network, and no subnet it joins has a router.
pub(super) fn check_router(
    meta: &v1::ObjectMeta,
    spec: &v1::RouterSpec,
    others: &Others,
    out: &mut Violations,
) {
    let path = FieldPath::spec();
    let project = meta.project.as_str();
    if let Some(gateway) = &spec.external_gateway
        && let Some(network) = find(project, &gateway.network, &others.networks)
        && !is_external(network)
    {
        out.add(
            &path.field("externalGateway").field("network"),
            format!(
                "network {} is not external (spec.external: true)",
                gateway.network
            ),
        );
    }
    for (i, leg) in spec.interfaces.iter().enumerate() {
        let Some(network) = find(project, &leg.network, &others.networks) else {
            continue;
        };
        let holder = others.routers.iter().find(|other| {
            let Some(m) = other.metadata.as_ref() else {
                return false;
            };
            // Itself, or a router on its way out (its legs go with it).
            if (m.project == meta.project && m.name == meta.name) || m.deletion_timestamp.is_some()
            {
                return false;
            }
            other
                .spec
                .as_ref()
                .map(|s| s.interfaces.as_slice())
                .unwrap_or_default()
                .iter()
                .any(|theirs| {
                    theirs.subnet == leg.subnet
                        && find(&m.project, &theirs.network, &others.networks)
                            .is_some_and(|n| uid(n) == uid(network))
                })
        });
        if let Some(holder) = holder.and_then(|h| h.metadata.as_ref()) {
            out.add(
                &path.field("interfaces").index(i).field("subnet"),
                format!(
                    "subnet {} of network {} already has router {}/{}",
                    leg.subnet, leg.network, holder.project, holder.name
                ),
            );
        }
    }
}

/// A Server: a volume it attaches or boots from that is not `multiattach` is attached to
/// no other server (named in another live server's `spec.volumes` or `spec.bootVolume`).
pub(super) fn check_server(
    meta: &v1::ObjectMeta,
    spec: &v1::ServerSpec,
    others: &Others,
    out: &mut Violations,
) {
    let uses = |s: &v1::ServerSpec, name: &str| {
        s.boot_volume == name || s.volumes.iter().any(|v| v.volume == name)
    };
    let path = FieldPath::spec();
    let wanted = spec
        .volumes
        .iter()
        .enumerate()
        .map(|(i, v)| (path.field("volumes").index(i).field("volume"), &v.volume))
        .chain(
            (!spec.boot_volume.is_empty()).then(|| (path.field("bootVolume"), &spec.boot_volume)),
        );
    for (field, name) in wanted {
        let Some(volume) = others.volumes.iter().find(|v| {
            v.metadata
                .as_ref()
                .is_some_and(|m| m.project == meta.project && m.name == *name)
        }) else {
            continue;
        };
        if volume.spec.as_ref().is_some_and(|s| s.multiattach) {
            continue;
        }
        let holder = others.servers.iter().find_map(|other| {
            let m = other.metadata.as_ref()?;
            let elsewhere = m.project == meta.project
                && m.name != meta.name
                && m.deletion_timestamp.is_none()
                && other.spec.as_ref().is_some_and(|s| uses(s, name));
            elsewhere.then_some(m.name.as_str())
        });
        if let Some(holder) = holder {
            out.add(
                &field,
                format!(
                    "volume {name} is attached to server {holder} and is not multiattach: \
                     remove it from that server first"
                ),
            );
        }
    }
}

fn to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u128::from(u32::from(v4)),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

/// Why an address cannot come from this subnet, or `None` when it can.
fn outside(subnet: &v1::Subnet, ip: IpAddr) -> Option<String> {
    let net: IpNet = subnet.cidr.parse().ok()?;
    if subnet.gateway.as_deref().and_then(|g| g.parse().ok()) == Some(ip) {
        return Some(format!("{ip} is the gateway of subnet {}", subnet.name));
    }
    if subnet.allocation_pools.is_empty() {
        let v4_broadcast = matches!(net, IpNet::V4(_)) && ip == net.broadcast();
        return (ip == net.network() || v4_broadcast).then(|| {
            format!(
                "{ip} is the network or broadcast address of subnet {}",
                subnet.name
            )
        });
    }
    let pools: Vec<String> = subnet
        .allocation_pools
        .iter()
        .map(|p| format!("{}–{}", p.start, p.end))
        .collect();
    let inside = subnet.allocation_pools.iter().any(|p| {
        match (p.start.parse::<IpAddr>(), p.end.parse::<IpAddr>()) {
            (Ok(start), Ok(end)) => {
                start.is_ipv4() == ip.is_ipv4()
                    && (to_u128(start)..=to_u128(end)).contains(&to_u128(ip))
            }
            _ => false,
        }
    });
    (!inside).then(|| {
        format!(
            "{ip} is outside the allocation pools of subnet {} ({})",
            subnet.name,
            pools.join(", ")
        )
    })
}

/// A FloatingIP: its network is external, and a requested address lies in its pools.
pub(super) fn check_floating_ip(
    meta: &v1::ObjectMeta,
    spec: &v1::FloatingIpSpec,
    others: &Others,
    out: &mut Violations,
) {
    let path = FieldPath::spec();
    let Some(network) = find(&meta.project, &spec.network, &others.networks) else {
        return;
    };
    if !is_external(network) {
        out.add(
            &path.field("network"),
            format!(
                "network {} is not external (spec.external: true)",
                spec.network
            ),
        );
        return;
    }
    let Ok(ip) = spec.address.parse::<IpAddr>() else {
        // Empty, or malformed (reported by the single-object checks).
        return;
    };
    let subnets = network
        .spec
        .as_ref()
        .map(|s| s.subnets.as_slice())
        .unwrap_or_default();
    let holding = subnets
        .iter()
        .find(|s| s.cidr.parse::<IpNet>().is_ok_and(|net| net.contains(&ip)));
    let why = match holding {
        None => Some(format!("{ip} is in no subnet of network {}", spec.network)),
        Some(subnet) => outside(subnet, ip),
    };
    if let Some(why) = why {
        out.add(&path.field("address"), why);
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{defaulted, messages};
    use super::super::validate_references;
    use super::*;
    use crate::Object;

    fn others(docs: &[&str]) -> Others {
        let mut others = Others::default();
        for doc in docs {
            match defaulted(doc) {
                Object::Network(n) => others.networks.push(n),
                Object::Router(r) => others.routers.push(r),
                Object::Volume(v) => others.volumes.push(v),
                Object::Server(v) => others.servers.push(v),
                other => panic!("{other:?}"),
            }
        }
        others
    }

    const PUBLIC: &str = "kind: Network\nmetadata: {name: public, project: admin, uid: pub}\nspec: {external: true, subnets: [{name: v4, cidr: 203.0.113.0/24, gateway: 203.0.113.1, allocationPools: [{start: 203.0.113.10, end: 203.0.113.20}]}]}";
    const PRIVATE: &str = "kind: Network\nmetadata: {name: private, uid: priv}\nspec: {subnets: [{name: a, cidr: 10.0.1.0/24}, {name: b, cidr: 10.0.2.0/24}]}";
    const EDGE: &str =
        "kind: Router\nmetadata: {name: edge}\nspec: {interfaces: [{network: private, subnet: a}]}";

    fn errors(doc: &str, existing: &Others) -> Vec<String> {
        messages(validate_references(&defaulted(doc), existing))
    }

    #[test]
    fn a_volume_that_is_not_multiattach_goes_to_one_server() {
        let existing = others(&[
            "kind: Volume\nmetadata: {name: data}\nspec: {sizeGib: 1}",
            "kind: Volume\nmetadata: {name: shared}\nspec: {sizeGib: 1, multiattach: true}",
            "kind: Volume\nmetadata: {name: data, project: other}\nspec: {sizeGib: 1}",
            "kind: Server\nmetadata: {name: db}\nspec: {flavor: f, image: i, volumes: [{volume: data}, {volume: shared}]}",
            "kind: Server\nmetadata: {name: web, project: other}\nspec: {flavor: f, image: i, volumes: [{volume: data}]}",
        ]);
        let server = |name: &str, volumes: &str| {
            format!(
                "kind: Server\nmetadata: {{name: {name}}}\nspec: {{flavor: f, image: i, volumes: {volumes}}}"
            )
        };
        // Another server holds it: refused, naming the field and the holder.
        assert_eq!(
            errors(
                &server("web", "[{volume: logs}, {volume: data}]"),
                &existing
            ),
            [
                "spec.volumes[1].volume: volume data is attached to server db and is not \
              multiattach: remove it from that server first"
            ]
        );
        let boots = "kind: Server\nmetadata: {name: web}\nspec: {flavor: f, bootVolume: data}";
        assert_eq!(
            errors(boots, &existing),
            [
                "spec.bootVolume: volume data is attached to server db and is not multiattach: \
              remove it from that server first"
            ]
        );
        // The holder itself, a multiattach volume, a volume not made yet: fine.
        assert!(errors(&server("db", "[{volume: data}]"), &existing).is_empty());
        assert!(errors(&server("web", "[{volume: shared}]"), &existing).is_empty());
        assert!(errors(&server("web", "[{volume: logs}]"), &existing).is_empty());
    }

    #[test]
    fn routers() {
        let existing = others(&[PUBLIC, PRIVATE, EDGE]);
        let cases: &[(&str, &[&str])] = &[
            (
                "{externalGateway: {network: public}, interfaces: [{network: private, subnet: b}]}",
                &[],
            ),
            (
                "{externalGateway: {network: private}}",
                &[
                    "spec.externalGateway.network: network private is not external (spec.external: true)",
                ],
            ),
            (
                "{interfaces: [{network: private, subnet: b}, {network: private, subnet: a}]}",
                &[
                    "spec.interfaces[1].subnet: subnet a of network private already has router default/edge",
                ],
            ),
            // Not created yet: a condition for the controller, not a refusal.
            (
                "{externalGateway: {network: later}, interfaces: [{network: later, subnet: a}]}",
                &[],
            ),
        ];
        for (spec, want) in cases {
            let doc = format!("kind: Router\nmetadata: {{name: other}}\nspec: {spec}");
            assert_eq!(errors(&doc, &existing), *want, "{spec}");
        }
        // A router's own interfaces do not conflict with themselves on update.
        assert_eq!(errors(EDGE, &existing), Vec::<String>::new());
        // A router being deleted no longer holds its subnets.
        let mut going = others(&[PUBLIC, PRIVATE, EDGE]);
        going.routers[0]
            .metadata
            .as_mut()
            .unwrap()
            .deletion_timestamp = Some(prost_types::Timestamp::default());
        let doc = "kind: Router\nmetadata: {name: other}\nspec: {interfaces: [{network: private, subnet: a}]}";
        assert_eq!(errors(doc, &going), Vec::<String>::new());
        // The same subnet name on another network is another subnet.
        let elsewhere = others(&[
            PRIVATE,
            EDGE,
            "kind: Network\nmetadata: {name: private, project: team, uid: team-priv}\nspec: {subnets: [{name: a, cidr: 10.0.1.0/24}]}",
        ]);
        let doc = "kind: Router\nmetadata: {name: edge, project: team}\nspec: {interfaces: [{network: private, subnet: a}]}";
        assert_eq!(errors(doc, &elsewhere), Vec::<String>::new());
    }

    #[test]
    fn floating_ips() {
        let existing = others(&[PUBLIC, PRIVATE]);
        let cases: &[(&str, &[&str])] = &[
            ("{network: public}", &[]),
            ("{network: public, address: 203.0.113.15}", &[]),
            (
                "{network: public, address: 203.0.113.30}",
                &[
                    "spec.address: 203.0.113.30 is outside the allocation pools of subnet v4 (203.0.113.10–203.0.113.20)",
                ],
            ),
            (
                "{network: public, address: 203.0.113.1}",
                &["spec.address: 203.0.113.1 is the gateway of subnet v4"],
            ),
            (
                "{network: public, address: 198.51.100.7}",
                &["spec.address: 198.51.100.7 is in no subnet of network public"],
            ),
            (
                "{network: private}",
                &["spec.network: network private is not external (spec.external: true)"],
            ),
            ("{network: later, address: 198.51.100.7}", &[]),
        ];
        for (spec, want) in cases {
            let doc = format!("kind: FloatingIP\nmetadata: {{name: f}}\nspec: {spec}");
            assert_eq!(errors(&doc, &existing), *want, "{spec}");
        }
    }
}
