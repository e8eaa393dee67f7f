//! Network kinds: Network (with its subnets), Port, Router, FloatingIP, SecurityGroup.
//!
//! Address rules are checked within one object only: a subnet's gateway, pools and routes
//! against its own CIDR, subnets against each other. Whether a Port's address lies in its
//! Network's subnets is for IPAM to say, since the Network may not exist yet.

use std::net::IpAddr;

use ipnet::IpNet;

use super::syntax::{self, family, shown, to_u128};
use super::{FieldPath, Violations, default_enum, optional_enum, required_enum};
use crate::v1::security_group_rule::{Ethertype, Protocol};
use crate::v1::{
    FloatingIpSpec, HostRoute, NetworkSpec, PortSpec, RouterSpec, SecurityGroupRule,
    SecurityGroupSpec, Subnet,
};

/// The MTU a Network gets unless told otherwise: 1500 less VXLAN's 50 bytes.
const DEFAULT_MTU: u32 = 1450;
/// The smallest MTU a Network may have: IPv4's minimum.
const MIN_MTU: u32 = 576;
/// What VXLAN adds to each guest frame on the underlay: outer Ethernet, IPv4, UDP and
/// VXLAN headers.
pub const VXLAN_OVERHEAD: u32 = 50;
/// The underlay MTU unless the apiserver is told otherwise (`--underlay-mtu`).
pub const DEFAULT_UNDERLAY_MTU: u32 = 1500;

static UNDERLAY_MTU: std::sync::atomic::AtomicU32 =
    std::sync::atomic::AtomicU32::new(DEFAULT_UNDERLAY_MTU);

/// Sets the MTU of the nodes' underlay, which bounds every Network's MTU: a tenant
/// network's frames travel in VXLAN, so it may be at most the underlay's less
/// [`VXLAN_OVERHEAD`]; an external network's travel as they are.
pub fn set_underlay_mtu(mtu: u32) {
    UNDERLAY_MTU.store(mtu, std::sync::atomic::Ordering::Relaxed);
}

fn max_mtu(external: bool) -> u32 {
    let underlay = UNDERLAY_MTU.load(std::sync::atomic::Ordering::Relaxed);
    if external {
        underlay
    } else {
        underlay.saturating_sub(VXLAN_OVERHEAD)
    }
}
/// The prefix lengths a subnet may have: room for a gateway and a host at least, and not
/// absurdly large.
const IPV4_PREFIX: std::ops::RangeInclusive<u8> = 8..=30;
const IPV6_PREFIX: std::ops::RangeInclusive<u8> = 32..=126;

pub(super) fn default_network(spec: &mut NetworkSpec) {
    spec.external.get_or_insert(false);
    spec.shared.get_or_insert(false);
    spec.mtu.get_or_insert(DEFAULT_MTU);
    for subnet in &mut spec.subnets {
        subnet.dhcp.get_or_insert(true);
        if subnet.gateway.is_none() {
            subnet.gateway = default_gateway(&subnet.cidr).map(|ip| ip.to_string());
        }
    }
}

/// The first host address of a CIDR, when the CIDR parses and has room for hosts.
fn default_gateway(cidr: &str) -> Option<IpAddr> {
    let net: IpNet = cidr.parse().ok()?;
    let net = net.trunc();
    let gateway = syntax::nth_address(&net, 1)?;
    (gateway != net.broadcast() || matches!(net, IpNet::V6(_))).then_some(gateway)
}

pub(super) fn check_network(spec: &NetworkSpec, out: &mut Violations) {
    let path = FieldPath::spec();
    let external = spec.external.unwrap_or(false);
    let max = max_mtu(external);
    if let Some(mtu) = spec.mtu
        && !(MIN_MTU..=max).contains(&mtu)
    {
        let why = if external {
            format!("the underlay's MTU is {max}")
        } else {
            format!(
                "VXLAN needs {VXLAN_OVERHEAD} of the underlay's {} bytes",
                max + VXLAN_OVERHEAD
            )
        };
        out.add(
            &path.field("mtu"),
            format!("must be between {MIN_MTU} and {max} ({why})"),
        );
    }

    let subnets = path.field("subnets");
    let mut nets: Vec<(usize, IpNet)> = Vec::new();
    for (i, subnet) in spec.subnets.iter().enumerate() {
        let item = subnets.index(i);
        out.required_reference(&item.field("name"), &subnet.name);
        if let Some(net) = check_subnet(subnet, &item, out) {
            if let Some((j, other)) = nets.iter().find(|(_, n)| overlaps(n, &net)) {
                out.add(
                    &item.field("cidr"),
                    format!(
                        "{net} overlaps {} ({other})",
                        subnets.index(*j).field("cidr")
                    ),
                );
            }
            nets.push((i, net));
        }
    }
    out.unique(
        spec.subnets
            .iter()
            .enumerate()
            .filter(|(_, s)| !s.name.is_empty())
            .map(|(i, s)| (subnets.index(i).field("name"), &s.name, shown(&s.name))),
    );
}

fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// Why an address cannot be a host of the subnet, if it cannot.
fn host_in(ip: IpAddr, net: &IpNet) -> Result<u128, String> {
    if !net.contains(&ip) {
        return Err(format!("{ip} is outside {net}"));
    }
    if ip == net.network() {
        return Err(format!("{ip} is the network address of {net}"));
    }
    if matches!(net, IpNet::V4(_)) && ip == net.broadcast() {
        return Err(format!("{ip} is the broadcast address of {net}"));
    }
    Ok(to_u128(ip))
}

/// Checks one subnet; returns its CIDR when that is valid, for the overlap check.
fn check_subnet(subnet: &Subnet, path: &FieldPath, out: &mut Violations) -> Option<IpNet> {
    let cidr_path = path.field("cidr");
    let net = if out.required(&cidr_path, &subnet.cidr) {
        out.check(&cidr_path, syntax::cidr(&subnet.cidr))
    } else {
        None
    };
    let net = net.filter(|net| {
        let (range, name) = match net {
            IpNet::V4(_) => (IPV4_PREFIX, "IPv4"),
            IpNet::V6(_) => (IPV6_PREFIX, "IPv6"),
        };
        let ok = range.contains(&net.prefix_len());
        if !ok {
            out.add(
                &cidr_path,
                format!(
                    "{net}: an {name} subnet's prefix length must be between /{} and /{}",
                    range.start(),
                    range.end()
                ),
            );
        }
        ok
    });

    // The gateway, checked against the CIDR when both are valid.
    let gateway_path = path.field("gateway");
    let mut gateway = None;
    if let Some(text) = subnet.gateway.as_deref().filter(|g| !g.is_empty())
        && let Some(ip) = out.check(&gateway_path, syntax::ip(text))
        && let Some(net) = &net
        && out.check(&gateway_path, host_in(ip, net)).is_some()
    {
        gateway = Some(ip);
    }

    let dns = path.field("dnsNameservers");
    for (i, server) in subnet.dns_nameservers.iter().enumerate() {
        out.check(&dns.index(i), syntax::ip(server));
    }
    out.unique(
        subnet
            .dns_nameservers
            .iter()
            .enumerate()
            .map(|(i, s)| (dns.index(i), s, shown(s))),
    );

    let pools_path = path.field("allocationPools");
    let mut pools: Vec<(usize, u128, u128)> = Vec::new();
    for (i, pool) in subnet.allocation_pools.iter().enumerate() {
        let item = pools_path.index(i);
        let bound = |field: &str, text: &str, out: &mut Violations| {
            let path = item.field(field);
            if !out.required(&path, text) {
                return None;
            }
            let ip = out.check(&path, syntax::ip(text))?;
            let net = net.as_ref()?;
            out.check(&path, host_in(ip, net)).map(|n| (ip, n))
        };
        let start = bound("start", &pool.start, out);
        let end = bound("end", &pool.end, out);
        let (Some((start_ip, start)), Some((end_ip, end))) = (start, end) else {
            continue;
        };
        if start > end {
            out.add(&item, format!("start {start_ip} is after end {end_ip}"));
            continue;
        }
        if let Some(gw) = gateway.filter(|gw| (start..=end).contains(&to_u128(*gw))) {
            out.add(&item, format!("contains the gateway {gw}"));
        }
        if let Some((j, ..)) = pools.iter().find(|(_, s, e)| start <= *e && *s <= end) {
            out.add(&item, format!("overlaps {}", pools_path.index(*j)));
        }
        pools.push((i, start, end));
    }

    let routes = path.field("hostRoutes");
    for (i, route) in subnet.host_routes.iter().enumerate() {
        check_route(route, &routes.index(i), net.as_ref(), out);
    }
    net
}

/// Checks a static route; `subnet` is the subnet whose hosts the next hop must be among.
fn check_route(route: &HostRoute, path: &FieldPath, subnet: Option<&IpNet>, out: &mut Violations) {
    let destination_path = path.field("destination");
    let destination = if out.required(&destination_path, &route.destination) {
        out.check(&destination_path, syntax::cidr(&route.destination))
    } else {
        None
    };
    let nexthop_path = path.field("nexthop");
    let nexthop = if out.required(&nexthop_path, &route.nexthop) {
        out.check(&nexthop_path, syntax::ip(&route.nexthop))
    } else {
        None
    };
    if let Some(subnet) = subnet {
        if let Some(destination) = destination
            && family(destination.addr()) != family(subnet.addr())
        {
            out.add(
                &destination_path,
                format!(
                    "{destination} is {} but the subnet is {}",
                    family(destination.addr()),
                    family(subnet.addr())
                ),
            );
        }
        if let Some(nexthop) = nexthop {
            out.check(&nexthop_path, host_in(nexthop, subnet));
        }
    } else if let (Some(destination), Some(nexthop)) = (destination, nexthop)
        && family(destination.addr()) != family(nexthop)
    {
        out.add(
            &nexthop_path,
            format!(
                "{nexthop} is {} but the destination is {}",
                family(nexthop),
                family(destination.addr())
            ),
        );
    }
}

pub(super) fn check_network_update(new: &NetworkSpec, old: &NetworkSpec, out: &mut Violations) {
    let subnets = FieldPath::spec().field("subnets");
    for (i, subnet) in new.subnets.iter().enumerate() {
        if let Some(previous) = old.subnets.iter().find(|s| s.name == subnet.name) {
            out.immutable(
                &subnets.index(i).field("cidr"),
                &subnet.cidr,
                &previous.cidr,
            );
        }
    }
}

pub(super) fn default_port(spec: &mut PortSpec) {
    spec.port_security.get_or_insert(true);
}

pub(super) fn check_port(spec: &PortSpec, out: &mut Violations) {
    let path = FieldPath::spec();
    out.required_reference(&path.field("network"), &spec.network);

    let fixed_ips = path.field("fixedIps");
    for (i, fixed) in spec.fixed_ips.iter().enumerate() {
        let item = fixed_ips.index(i);
        if fixed.subnet.is_empty() && fixed.ip_address.is_empty() {
            out.add(&item, "set `subnet`, `ipAddress` or both");
        }
        out.reference(&item.field("subnet"), &fixed.subnet);
        if !fixed.ip_address.is_empty() {
            out.check(&item.field("ipAddress"), syntax::ip(&fixed.ip_address));
        }
    }
    out.unique(
        spec.fixed_ips
            .iter()
            .enumerate()
            .filter(|(_, f)| !f.ip_address.is_empty())
            .map(|(i, f)| {
                let path = fixed_ips.index(i).field("ipAddress");
                (path, &f.ip_address, shown(&f.ip_address))
            }),
    );

    if !spec.mac_address.is_empty() {
        out.check(
            &path.field("macAddress"),
            syntax::unicast_mac(&spec.mac_address),
        );
    }

    let groups = path.field("securityGroups");
    for (i, group) in spec.security_groups.iter().enumerate() {
        out.required_reference(&groups.index(i), group);
    }
    out.unique(
        spec.security_groups
            .iter()
            .enumerate()
            .map(|(i, g)| (groups.index(i), g, shown(g))),
    );

    if !spec.device_owner.is_empty() {
        out.check(&path.field("deviceOwner"), device_owner(&spec.device_owner));
    }
}

/// `compute:<server>` or `network:<role>` (`router_interface`, `dhcp`, …).
fn device_owner(owner: &str) -> Result<(), String> {
    let valid = match owner.split_once(':') {
        Some(("compute", server)) => syntax::dns_label(server).is_ok(),
        Some(("network", role)) => {
            !role.is_empty() && role.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
        }
        _ => false,
    };
    if valid {
        Ok(())
    } else {
        Err(format!(
            "{} is not `compute:<server>` or `network:<role>` (router_interface, dhcp, …)",
            shown(owner)
        ))
    }
}

pub(super) fn check_port_update(new: &PortSpec, old: &PortSpec, out: &mut Violations) {
    let path = FieldPath::spec();
    out.immutable(&path.field("network"), &new.network, &old.network);
    out.immutable(
        &path.field("macAddress"),
        &new.mac_address,
        &old.mac_address,
    );
}

pub(super) fn default_router(spec: &mut RouterSpec) {
    spec.snat.get_or_insert(true);
}

pub(super) fn check_router(spec: &RouterSpec, out: &mut Violations) {
    let path = FieldPath::spec();
    if let Some(gateway) = &spec.external_gateway {
        let gateway_path = path.field("externalGateway");
        out.required_reference(&gateway_path.field("network"), &gateway.network);
        if !gateway.fixed_ip.is_empty() {
            out.check(
                &gateway_path.field("fixedIp"),
                syntax::ip(&gateway.fixed_ip),
            );
        }
    }

    let interfaces = path.field("interfaces");
    for (i, interface) in spec.interfaces.iter().enumerate() {
        let item = interfaces.index(i);
        out.required_reference(&item.field("network"), &interface.network);
        out.required_reference(&item.field("subnet"), &interface.subnet);
    }
    out.unique(
        spec.interfaces
            .iter()
            .enumerate()
            .map(|(i, r)| (interfaces.index(i), (&r.network, &r.subnet), String::new())),
    );

    let routes = path.field("routes");
    for (i, route) in spec.routes.iter().enumerate() {
        check_route(route, &routes.index(i), None, out);
    }
    out.unique(
        spec.routes
            .iter()
            .enumerate()
            .filter(|(_, r)| !r.destination.is_empty())
            .map(|(i, r)| {
                let path = routes.index(i).field("destination");
                (path, &r.destination, shown(&r.destination))
            }),
    );
}

pub(super) fn check_floating_ip(spec: &FloatingIpSpec, out: &mut Violations) {
    let path = FieldPath::spec();
    out.required_reference(&path.field("network"), &spec.network);
    out.reference(&path.field("port"), &spec.port);
    if !spec.server.is_empty() && !spec.port.is_empty() {
        out.add(&path.field("server"), "cannot be set together with `port`");
    }
    out.reference(&path.field("server"), &spec.server);
    if !spec.fixed_ip.is_empty() {
        let fixed_ip = path.field("fixedIp");
        if spec.port.is_empty() && spec.server.is_empty() {
            out.add(&fixed_ip, "only allowed with `port` or `server`");
        }
        out.check(&fixed_ip, syntax::ip(&spec.fixed_ip));
    }
    if !spec.address.is_empty() {
        out.check(&path.field("address"), syntax::ip(&spec.address));
    }
}

pub(super) fn check_floating_ip_update(
    new: &FloatingIpSpec,
    old: &FloatingIpSpec,
    out: &mut Violations,
) {
    let path = FieldPath::spec();
    out.immutable(&path.field("network"), &new.network, &old.network);
    out.immutable(&path.field("address"), &new.address, &old.address);
}

/// Rules default to IPv4 (IPv6 when `remoteCidr` is an IPv6 CIDR) and any protocol; a
/// TCP or UDP range given by its first port alone is that one port.
pub(super) fn default_security_group(spec: &mut SecurityGroupSpec) {
    for rule in &mut spec.rules {
        let ethertype = match rule.remote_cidr.parse::<IpNet>() {
            Ok(IpNet::V6(_)) => Ethertype::IPv6,
            _ => Ethertype::IPv4,
        };
        default_enum(&mut rule.ethertype, ethertype as i32);
        default_enum(&mut rule.protocol, Protocol::Any as i32);
        let tcp_or_udp = matches!(
            Protocol::try_from(rule.protocol.unwrap_or_default()),
            Ok(Protocol::Tcp | Protocol::Udp)
        );
        if tcp_or_udp && rule.port_range_max.is_none() {
            rule.port_range_max = rule.port_range_min;
        }
    }
}

pub(super) fn check_security_group(spec: &SecurityGroupSpec, out: &mut Violations) {
    let rules = FieldPath::spec().field("rules");
    for (i, rule) in spec.rules.iter().enumerate() {
        check_rule(rule, &rules.index(i), out);
    }
    // Two rules that differ only in their description allow the same traffic.
    out.unique(spec.rules.iter().enumerate().map(|(i, r)| {
        let key = SecurityGroupRule {
            description: String::new(),
            ..r.clone()
        };
        (rules.index(i), key, String::new())
    }));
}

fn check_rule(rule: &SecurityGroupRule, path: &FieldPath, out: &mut Violations) {
    required_enum(
        out,
        &path.field("direction"),
        rule.direction,
        "SecurityGroupRule.Direction",
    );
    optional_enum(
        out,
        &path.field("ethertype"),
        rule.ethertype,
        "SecurityGroupRule.Ethertype",
    );
    optional_enum(
        out,
        &path.field("protocol"),
        rule.protocol,
        "SecurityGroupRule.Protocol",
    );

    let (min_path, max_path) = (path.field("portRangeMin"), path.field("portRangeMax"));
    match Protocol::try_from(rule.protocol.unwrap_or(Protocol::Any as i32)) {
        Ok(Protocol::Tcp | Protocol::Udp) => {
            for (field, value) in [
                (&min_path, rule.port_range_min),
                (&max_path, rule.port_range_max),
            ] {
                if value.is_some_and(|p| !(1..=65535).contains(&p)) {
                    out.add(field, "must be a port between 1 and 65535");
                }
            }
            match (rule.port_range_min, rule.port_range_max) {
                (None, Some(_)) => out.add(&max_path, "requires `portRangeMin`"),
                (Some(min), Some(max)) if max < min => out.add(
                    &max_path,
                    format!("must not be less than portRangeMin ({min})"),
                ),
                _ => {}
            }
        }
        Ok(Protocol::Icmp) => {
            if rule.port_range_min.is_some_and(|t| t > 255) {
                out.add(&min_path, "must be an ICMP type between 0 and 255");
            }
            if rule.port_range_max.is_some_and(|c| c > 255) {
                out.add(&max_path, "must be an ICMP code between 0 and 255");
            }
            if rule.port_range_min.is_none() && rule.port_range_max.is_some() {
                out.add(&max_path, "requires `portRangeMin` (the ICMP type)");
            }
        }
        Ok(Protocol::Any) => {
            for (field, value) in [
                (&min_path, rule.port_range_min),
                (&max_path, rule.port_range_max),
            ] {
                if value.is_some() {
                    out.add(field, "only allowed with protocol TCP, UDP or ICMP");
                }
            }
        }
        // An unknown protocol is reported above.
        Ok(Protocol::Unspecified) | Err(_) => {}
    }

    if !rule.remote_cidr.is_empty() {
        let cidr_path = path.field("remoteCidr");
        if let Some(net) = out.check(&cidr_path, syntax::cidr(&rule.remote_cidr)) {
            let ethertype = match Ethertype::try_from(rule.ethertype.unwrap_or_default()) {
                Ok(Ethertype::IPv4) => Some("IPv4"),
                Ok(Ethertype::IPv6) => Some("IPv6"),
                _ => None,
            };
            if let Some(ethertype) = ethertype
                && family(net.addr()) != ethertype
            {
                out.add(
                    &cidr_path,
                    format!(
                        "{net} is {} but ethertype is {ethertype}",
                        family(net.addr())
                    ),
                );
            }
        }
    }
    let group_path = path.field("remoteGroup");
    if !rule.remote_group.is_empty() && !rule.remote_cidr.is_empty() {
        out.add(&group_path, "cannot be set together with `remoteCidr`");
    }
    if rule.remote_group.contains('/') {
        // `project/name` would reach into another project's membership.
        out.add(
            &group_path,
            "must name a SecurityGroup of this project; a group in another project cannot be a remote group",
        );
    } else {
        out.reference(&group_path, &rule.remote_group);
    }
}

#[cfg(test)]
mod tests {
    use crate::kinds::Object;
    use crate::v1::security_group_rule::{Ethertype, Protocol};
    use crate::validation::tests::{assert_spec_cases, assert_update_cases, defaulted, spec_doc};

    const SUBNET: &str = "name: a, cidr: 10.0.1.0/24";

    /// A Network spec with one subnet `a` of 10.0.1.0/24 and the given extra subnet fields.
    fn one_subnet(extra: &str) -> String {
        format!("{{subnets: [{{{SUBNET}, {extra}}}]}}")
    }

    #[test]
    fn network_defaults() {
        let doc = spec_doc(
            "Network",
            "{subnets: [{name: a, cidr: 10.0.1.0/24}, {name: b, cidr: \"fd00:1::/64\"}, {name: c, cidr: 10.0.3.0/24, gateway: \"\", dhcp: false}, {name: d, cidr: bad}]}",
        );
        let Object::Network(network) = defaulted(&doc) else {
            unreachable!()
        };
        let spec = network.spec.unwrap();
        assert_eq!(spec.mtu, Some(1450));
        assert_eq!(spec.external, Some(false));
        assert_eq!(spec.shared, Some(false));
        let gateways: Vec<Option<&str>> =
            spec.subnets.iter().map(|s| s.gateway.as_deref()).collect();
        assert_eq!(
            gateways,
            [Some("10.0.1.1"), Some("fd00:1::1"), Some(""), None],
            "first host; explicit none kept; none derivable from a bad CIDR"
        );
        let dhcp: Vec<Option<bool>> = spec.subnets.iter().map(|s| s.dhcp).collect();
        assert_eq!(dhcp, [Some(true), Some(true), Some(false), Some(true)]);
    }

    #[test]
    fn network_rules() {
        let sub = |extra: &str| one_subnet(extra);
        let full = sub(
            "gateway: 10.0.1.254, dnsNameservers: [1.1.1.1, \"2606:4700::1111\"], allocationPools: [{start: 10.0.1.10, end: 10.0.1.100}, {start: 10.0.1.101, end: 10.0.1.200}], hostRoutes: [{destination: 192.168.0.0/16, nexthop: 10.0.1.5}]",
        );
        let cases: Vec<(String, Vec<&str>)> = vec![
            (one_subnet("dhcp: true"), vec![]),
            (full, vec![]),
            ("{mtu: 1500, external: true, shared: true, subnets: [{name: v6, cidr: \"fd00:1::/64\"}, {name: v4, cidr: 10.0.0.0/8}]}".into(), vec![]),
            ("{}".into(), vec![]),
            ("{mtu: 575}".into(), vec!["spec.mtu: must be between 576 and 1450 (VXLAN needs 50 of the underlay's 1500 bytes)"]),
            ("{mtu: 1451}".into(), vec!["spec.mtu: must be between 576 and 1450 (VXLAN needs 50 of the underlay's 1500 bytes)"]),
            ("{mtu: 1501, external: true}".into(), vec!["spec.mtu: must be between 576 and 1500 (the underlay's MTU is 1500)"]),
            ("{subnets: [{cidr: 10.0.1.0/24}]}".into(), vec!["spec.subnets[0].name: required"]),
            (
                "{subnets: [{name: A, cidr: 10.0.1.0/24}]}".into(),
                vec!["spec.subnets[0].name: `A` is not a DNS-1123 label: lower-case letters, digits and '-', starting and ending with a letter or digit"],
            ),
            ("{subnets: [{name: a}]}".into(), vec!["spec.subnets[0].cidr: required"]),
            (
                "{subnets: [{name: a, cidr: 10.0.1.1/24}]}".into(),
                vec!["spec.subnets[0].cidr: 10.0.1.1/24 has host bits set; did you mean 10.0.1.0/24?"],
            ),
            (
                "{subnets: [{name: a, cidr: 10.0.1.0}]}".into(),
                vec!["spec.subnets[0].cidr: `10.0.1.0` lacks a prefix length (`/24`, `/32`, `/64`, …)"],
            ),
            (
                "{subnets: [{name: a, cidr: 10.0.1.0/31}]}".into(),
                vec!["spec.subnets[0].cidr: 10.0.1.0/31: an IPv4 subnet's prefix length must be between /8 and /30"],
            ),
            (
                "{subnets: [{name: a, cidr: 10.0.0.0/7}]}".into(),
                vec!["spec.subnets[0].cidr: 10.0.0.0/7: an IPv4 subnet's prefix length must be between /8 and /30"],
            ),
            (
                "{subnets: [{name: a, cidr: \"fd00::/127\"}]}".into(),
                vec!["spec.subnets[0].cidr: fd00::/127: an IPv6 subnet's prefix length must be between /32 and /126"],
            ),
            (
                "{subnets: [{name: a, cidr: 10.0.0.0/16}, {name: b, cidr: 10.0.1.0/24}]}".into(),
                vec!["spec.subnets[1].cidr: 10.0.1.0/24 overlaps spec.subnets[0].cidr (10.0.0.0/16)"],
            ),
            (
                "{subnets: [{name: a, cidr: 10.0.1.0/24}, {name: a, cidr: 10.0.2.0/24}]}".into(),
                vec!["spec.subnets[1].name: `a` duplicates spec.subnets[0].name"],
            ),
            (sub("gateway: \"\""), vec![]),
            (sub("gateway: 10.0.2.1"), vec!["spec.subnets[0].gateway: 10.0.2.1 is outside 10.0.1.0/24"]),
            (sub("gateway: \"fd00::1\""), vec!["spec.subnets[0].gateway: fd00::1 is outside 10.0.1.0/24"]),
            (sub("gateway: 10.0.1.0"), vec!["spec.subnets[0].gateway: 10.0.1.0 is the network address of 10.0.1.0/24"]),
            (sub("gateway: 10.0.1.255"), vec!["spec.subnets[0].gateway: 10.0.1.255 is the broadcast address of 10.0.1.0/24"]),
            (sub("gateway: gw"), vec!["spec.subnets[0].gateway: `gw` is not an IP address"]),
            (
                sub("dnsNameservers: [8.8.8.8, dns.example, 8.8.8.8]"),
                vec![
                    "spec.subnets[0].dnsNameservers[1]: `dns.example` is not an IP address",
                    "spec.subnets[0].dnsNameservers[2]: `8.8.8.8` duplicates spec.subnets[0].dnsNameservers[0]",
                ],
            ),
            (
                sub("allocationPools: [{start: 10.0.1.100, end: 10.0.1.10}]"),
                vec!["spec.subnets[0].allocationPools[0]: start 10.0.1.100 is after end 10.0.1.10"],
            ),
            (
                sub("allocationPools: [{start: 10.0.1.10, end: 10.0.2.10}]"),
                vec!["spec.subnets[0].allocationPools[0].end: 10.0.2.10 is outside 10.0.1.0/24"],
            ),
            (
                sub("allocationPools: [{start: 10.0.1.0, end: 10.0.1.255}]"),
                vec![
                    "spec.subnets[0].allocationPools[0].start: 10.0.1.0 is the network address of 10.0.1.0/24",
                    "spec.subnets[0].allocationPools[0].end: 10.0.1.255 is the broadcast address of 10.0.1.0/24",
                ],
            ),
            (
                sub("allocationPools: [{start: 10.0.1.1, end: 10.0.1.50}]"),
                vec!["spec.subnets[0].allocationPools[0]: contains the gateway 10.0.1.1"],
            ),
            (sub("gateway: \"\", allocationPools: [{start: 10.0.1.1, end: 10.0.1.50}]"), vec![]),
            (
                sub("allocationPools: [{start: 10.0.1.10, end: 10.0.1.50}, {start: 10.0.1.60, end: 10.0.1.70}, {start: 10.0.1.50, end: 10.0.1.55}]"),
                vec!["spec.subnets[0].allocationPools[2]: overlaps spec.subnets[0].allocationPools[0]"],
            ),
            (
                sub("allocationPools: [{end: 10.0.1.5}]"),
                vec!["spec.subnets[0].allocationPools[0].start: required"],
            ),
            (
                sub("hostRoutes: [{destination: 192.168.0.1/16, nexthop: 10.0.2.1}]"),
                vec![
                    "spec.subnets[0].hostRoutes[0].destination: 192.168.0.1/16 has host bits set; did you mean 192.168.0.0/16?",
                    "spec.subnets[0].hostRoutes[0].nexthop: 10.0.2.1 is outside 10.0.1.0/24",
                ],
            ),
            (
                sub("hostRoutes: [{destination: \"fd00::/8\", nexthop: 10.0.1.5}]"),
                vec!["spec.subnets[0].hostRoutes[0].destination: fd00::/8 is IPv6 but the subnet is IPv4"],
            ),
            (
                sub("hostRoutes: [{}]"),
                vec![
                    "spec.subnets[0].hostRoutes[0].destination: required",
                    "spec.subnets[0].hostRoutes[0].nexthop: required",
                ],
            ),
            (
                // Every violation, subnet by subnet, each in field order.
                "{mtu: 1, subnets: [{name: a, cidr: 10.0.1.0/24, gateway: 10.9.9.9, dnsNameservers: [x]}, {cidr: 10.0.1.128/25}]}".into(),
                vec![
                    "spec.mtu: must be between 576 and 1450 (VXLAN needs 50 of the underlay's 1500 bytes)",
                    "spec.subnets[0].gateway: 10.9.9.9 is outside 10.0.1.0/24",
                    "spec.subnets[0].dnsNameservers[0]: `x` is not an IP address",
                    "spec.subnets[1].name: required",
                    "spec.subnets[1].cidr: 10.0.1.128/25 overlaps spec.subnets[0].cidr (10.0.1.0/24)",
                ],
            ),
        ];
        let cases: Vec<(&str, &[&str])> = cases
            .iter()
            .map(|(spec, want)| (spec.as_str(), want.as_slice()))
            .collect();
        assert_spec_cases("Network", &cases);
    }

    #[test]
    fn network_subnet_cidrs_are_immutable() {
        let two = "{subnets: [{name: a, cidr: 10.0.1.0/24}, {name: b, cidr: 10.0.2.0/24}]}";
        assert_update_cases(
            "Network",
            &[
                (
                    two,
                    "{mtu: 1400, subnets: [{name: b, cidr: 10.0.2.0/24}, {name: a, cidr: 10.0.1.0/24}, {name: c, cidr: 10.0.3.0/24}]}",
                    &[],
                ),
                (two, "{subnets: [{name: b, cidr: 10.0.2.0/24}]}", &[]),
                (
                    two,
                    "{subnets: [{name: a, cidr: 10.0.1.0/24, gateway: 10.0.1.254}, {name: b, cidr: 10.0.2.0/24}]}",
                    &[],
                ),
                (
                    two,
                    "{subnets: [{name: a, cidr: 10.0.1.0/24}, {name: b, cidr: 10.0.4.0/24}]}",
                    &["spec.subnets[1].cidr: field is immutable"],
                ),
            ],
        );
    }

    #[test]
    fn port_rules() {
        let Object::Port(port) = defaulted(&spec_doc("Port", "{network: n}")) else {
            unreachable!()
        };
        assert_eq!(port.spec.unwrap().port_security, Some(true));
        let Object::Port(port) = defaulted(&spec_doc("Port", "{network: n, portSecurity: false}"))
        else {
            unreachable!()
        };
        assert_eq!(port.spec.unwrap().port_security, Some(false));

        assert_spec_cases(
            "Port",
            &[
                ("{network: n}", &[]),
                (
                    "{network: n, fixedIps: [{subnet: a}, {ipAddress: 10.0.0.5}, {subnet: b, ipAddress: \"fd00::5\"}], macAddress: \"fa:16:3e:00:00:01\", securityGroups: [web], deviceOwner: \"compute:web-1\"}",
                    &[],
                ),
                (
                    "{network: n, deviceOwner: \"network:router_interface\"}",
                    &[],
                ),
                ("{}", &["spec.network: required"]),
                (
                    "{network: n, fixedIps: [{}]}",
                    &["spec.fixedIps[0]: set `subnet`, `ipAddress` or both"],
                ),
                (
                    "{network: n, fixedIps: [{ipAddress: 10.0.0.300}]}",
                    &["spec.fixedIps[0].ipAddress: `10.0.0.300` is not an IP address"],
                ),
                (
                    "{network: n, fixedIps: [{ipAddress: 10.0.0.5}, {subnet: b, ipAddress: 10.0.0.5}]}",
                    &[
                        "spec.fixedIps[1].ipAddress: `10.0.0.5` duplicates spec.fixedIps[0].ipAddress",
                    ],
                ),
                (
                    "{network: n, macAddress: \"01:00:5e:00:00:01\"}",
                    &[
                        "spec.macAddress: 01:00:5e:00:00:01 is a multicast address (the first octet's low bit is set)",
                    ],
                ),
                (
                    "{network: n, macAddress: \"00:00:00:00:00:00\"}",
                    &["spec.macAddress: 00:00:00:00:00:00 is the all-zero address"],
                ),
                (
                    "{network: n, macAddress: \"FA:16:3E:00:00:01\"}",
                    &[
                        "spec.macAddress: `FA:16:3E:00:00:01` must be written in lower case: fa:16:3e:00:00:01",
                    ],
                ),
                (
                    "{network: n, macAddress: fa16.3e00.0001}",
                    &[
                        "spec.macAddress: `fa16.3e00.0001` is not a MAC address like fa:16:3e:00:00:01",
                    ],
                ),
                (
                    "{network: n, securityGroups: [web, web]}",
                    &["spec.securityGroups[1]: `web` duplicates spec.securityGroups[0]"],
                ),
                (
                    "{network: n, deviceOwner: router}",
                    &[
                        "spec.deviceOwner: `router` is not `compute:<server>` or `network:<role>` (router_interface, dhcp, …)",
                    ],
                ),
            ],
        );
        assert_update_cases(
            "Port",
            &[
                (
                    "{network: n, macAddress: \"fa:16:3e:00:00:01\"}",
                    "{network: n, macAddress: \"fa:16:3e:00:00:01\", securityGroups: [web], portSecurity: false}",
                    &[],
                ),
                (
                    "{network: n}",
                    "{network: m}",
                    &["spec.network: field is immutable"],
                ),
                (
                    "{network: n}",
                    "{network: n, macAddress: \"fa:16:3e:00:00:01\"}",
                    &["spec.macAddress: field is immutable"],
                ),
            ],
        );
    }

    #[test]
    fn router_rules() {
        let Object::Router(router) = defaulted(&spec_doc("Router", "{}")) else {
            unreachable!()
        };
        assert_eq!(router.spec.unwrap().snat, Some(true));

        assert_spec_cases(
            "Router",
            &[
                ("{}", &[]),
                (
                    "{externalGateway: {network: public, fixedIp: 203.0.113.5}, interfaces: [{network: private, subnet: a}, {network: private, subnet: b}], routes: [{destination: 10.1.0.0/16, nexthop: 10.0.1.5}], snat: false}",
                    &[],
                ),
                (
                    "{externalGateway: {}}",
                    &["spec.externalGateway.network: required"],
                ),
                (
                    "{externalGateway: {network: public, fixedIp: x}}",
                    &["spec.externalGateway.fixedIp: `x` is not an IP address"],
                ),
                (
                    "{interfaces: [{network: n}]}",
                    &["spec.interfaces[0].subnet: required"],
                ),
                (
                    "{interfaces: [{subnet: a}]}",
                    &["spec.interfaces[0].network: required"],
                ),
                (
                    "{interfaces: [{network: n, subnet: a}, {network: n, subnet: b}, {network: n, subnet: a}]}",
                    &["spec.interfaces[2]: duplicates spec.interfaces[0]"],
                ),
                (
                    "{routes: [{destination: 10.1.0.0/16, nexthop: \"fd00::1\"}]}",
                    &["spec.routes[0].nexthop: fd00::1 is IPv6 but the destination is IPv4"],
                ),
                (
                    "{routes: [{destination: 10.1.0.0, nexthop: 10.0.1.5}]}",
                    &[
                        "spec.routes[0].destination: `10.1.0.0` lacks a prefix length (`/24`, `/32`, `/64`, …)",
                    ],
                ),
                (
                    "{routes: [{destination: 10.1.0.0/16, nexthop: 10.0.1.5}, {destination: 10.1.0.0/16, nexthop: 10.0.1.6}]}",
                    &[
                        "spec.routes[1].destination: `10.1.0.0/16` duplicates spec.routes[0].destination",
                    ],
                ),
            ],
        );
    }

    #[test]
    fn floating_ip_rules() {
        assert_spec_cases(
            "FloatingIP",
            &[
                ("{network: public}", &[]),
                (
                    "{network: public, port: p, fixedIp: 10.0.1.5, address: 203.0.113.10}",
                    &[],
                ),
                ("{network: public, server: web}", &[]),
                ("{}", &["spec.network: required"]),
                (
                    "{network: public, port: p, server: s}",
                    &["spec.server: cannot be set together with `port`"],
                ),
                (
                    "{network: public, fixedIp: 10.0.1.5}",
                    &["spec.fixedIp: only allowed with `port` or `server`"],
                ),
                (
                    "{network: public, port: p, fixedIp: ten}",
                    &["spec.fixedIp: `ten` is not an IP address"],
                ),
                (
                    "{network: public, address: 203.0.113.300}",
                    &["spec.address: `203.0.113.300` is not an IP address"],
                ),
            ],
        );
        assert_update_cases(
            "FloatingIP",
            &[
                (
                    "{network: public, port: a}",
                    "{network: public, server: web}",
                    &[],
                ),
                (
                    "{network: public}",
                    "{network: other}",
                    &["spec.network: field is immutable"],
                ),
                (
                    "{network: public}",
                    "{network: public, address: 203.0.113.10}",
                    &["spec.address: field is immutable"],
                ),
            ],
        );
    }

    #[test]
    fn security_group_defaults() {
        let doc = spec_doc(
            "SecurityGroup",
            "{rules: [{direction: Ingress}, {direction: Ingress, remoteCidr: \"fd00::/8\"}, {direction: Ingress, protocol: TCP, portRangeMin: 22}, {direction: Ingress, protocol: ICMP, portRangeMin: 8}]}",
        );
        let Object::SecurityGroup(group) = defaulted(&doc) else {
            unreachable!()
        };
        let rules = group.spec.unwrap().rules;
        let ethertypes: Vec<Option<i32>> = rules.iter().map(|r| r.ethertype).collect();
        let v4 = Some(Ethertype::IPv4 as i32);
        assert_eq!(ethertypes, [v4, Some(Ethertype::IPv6 as i32), v4, v4]);
        assert_eq!(rules[0].protocol, Some(Protocol::Any as i32));
        assert_eq!(rules[2].port_range_max, Some(22), "one TCP port");
        assert_eq!(rules[3].port_range_max, None, "any ICMP code");
    }

    #[test]
    fn security_group_rules() {
        assert_spec_cases(
            "SecurityGroup",
            &[
                ("{}", &[]),
                ("{rules: [{direction: Ingress}]}", &[]),
                (
                    "{rules: [{direction: Ingress, protocol: TCP, portRangeMin: 22, remoteCidr: 0.0.0.0/0}, {direction: Egress, ethertype: IPv6, protocol: UDP, portRangeMin: 1, portRangeMax: 65535, remoteCidr: \"::/0\"}, {direction: Ingress, protocol: ICMP, portRangeMin: 8, portRangeMax: 0, remoteGroup: web}]}",
                    &[],
                ),
                (
                    "{rules: [{}]}",
                    &["spec.rules[0].direction: required: one of Ingress, Egress"],
                ),
                (
                    "{rules: [{direction: Ingress, portRangeMin: 22, portRangeMax: 22}]}",
                    &[
                        "spec.rules[0].portRangeMin: only allowed with protocol TCP, UDP or ICMP",
                        "spec.rules[0].portRangeMax: only allowed with protocol TCP, UDP or ICMP",
                    ],
                ),
                (
                    "{rules: [{direction: Ingress, protocol: TCP, portRangeMin: 0, portRangeMax: 70000}]}",
                    &[
                        "spec.rules[0].portRangeMin: must be a port between 1 and 65535",
                        "spec.rules[0].portRangeMax: must be a port between 1 and 65535",
                    ],
                ),
                (
                    "{rules: [{direction: Ingress, protocol: TCP, portRangeMin: 100, portRangeMax: 80}]}",
                    &["spec.rules[0].portRangeMax: must not be less than portRangeMin (100)"],
                ),
                (
                    "{rules: [{direction: Ingress, protocol: UDP, portRangeMax: 53}]}",
                    &["spec.rules[0].portRangeMax: requires `portRangeMin`"],
                ),
                (
                    "{rules: [{direction: Ingress, protocol: ICMP, portRangeMin: 256, portRangeMax: 256}]}",
                    &[
                        "spec.rules[0].portRangeMin: must be an ICMP type between 0 and 255",
                        "spec.rules[0].portRangeMax: must be an ICMP code between 0 and 255",
                    ],
                ),
                (
                    "{rules: [{direction: Ingress, protocol: ICMP, portRangeMax: 0}]}",
                    &["spec.rules[0].portRangeMax: requires `portRangeMin` (the ICMP type)"],
                ),
                (
                    "{rules: [{direction: Ingress, remoteCidr: 10.0.0.0/8, remoteGroup: web}]}",
                    &["spec.rules[0].remoteGroup: cannot be set together with `remoteCidr`"],
                ),
                (
                    "{rules: [{direction: Ingress, ethertype: IPv4, remoteCidr: \"fd00::/8\"}]}",
                    &["spec.rules[0].remoteCidr: fd00::/8 is IPv6 but ethertype is IPv4"],
                ),
                (
                    "{rules: [{direction: Ingress, ethertype: IPv6, remoteCidr: 10.0.0.0/8}]}",
                    &["spec.rules[0].remoteCidr: 10.0.0.0/8 is IPv4 but ethertype is IPv6"],
                ),
                (
                    "{rules: [{direction: Ingress, remoteCidr: \"fd00::/8\"}]}",
                    &[],
                ),
                (
                    "{rules: [{direction: Ingress, remoteCidr: 10.0.0.1/8}]}",
                    &[
                        "spec.rules[0].remoteCidr: 10.0.0.1/8 has host bits set; did you mean 10.0.0.0/8?",
                    ],
                ),
                (
                    "{rules: [{direction: Ingress, remoteGroup: Web}]}",
                    &[
                        "spec.rules[0].remoteGroup: `Web` is not a DNS-1123 label: lower-case letters, digits and '-', starting and ending with a letter or digit",
                    ],
                ),
                (
                    "{rules: [{direction: Ingress, remoteGroup: other/web}]}",
                    &[
                        "spec.rules[0].remoteGroup: must name a SecurityGroup of this project; a group in another project cannot be a remote group",
                    ],
                ),
                (
                    "{rules: [{direction: Ingress, protocol: TCP, portRangeMin: 22, description: ssh}, {direction: Egress}, {direction: Ingress, protocol: TCP, portRangeMin: 22, portRangeMax: 22}]}",
                    &["spec.rules[2]: duplicates spec.rules[0]"],
                ),
            ],
        );
    }
}
