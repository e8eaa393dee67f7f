//! Security groups on Open vSwitch: OpenFlow rules on `br-int` with the switch's own
//! connection tracking, as Neutron's `openvswitch` firewall driver does. The userspace
//! datapath never hands packets to the kernel's netfilter, so the rules are flows.
//!
//! A port of the node is *filtered* (its Port is in [`Desired::ports`]) or *open* (DHCP
//! ports, router legs, ports without port security); `patch-tun` brings frames from other
//! nodes, tagged with the network's local VLAN. Every frame ends with register 6 holding
//! the local VLAN of the network it is on, which is also its conntrack zone:
//!
//! - table 0: a filtered port's frames pass anti-spoofing (its MAC; ARP and IP only from
//!   its addresses; DHCP requests; no DHCP server, no router advertisements) into
//!   conntrack, then table [`EGRESS`]; open ports' and tunnel frames go to [`DESTINATION`];
//! - [`EGRESS`]: established and related pass; a new connection passes if one of the
//!   port's egress rules allows it (committed); anything else is dropped;
//! - [`DESTINATION`]: IP frames to a filtered port of this node (by network and MAC) go
//!   into conntrack, then [`INGRESS`]; everything else is switched `NORMAL`ly;
//! - [`INGRESS`]: established, related, DHCP answers and neighbour discovery pass; a new
//!   connection passes if one of the destination's ingress rules allows it; the rest is
//!   dropped;
//! - [`DELIVER`]: out of the destination port, without the tunnel's VLAN tag.
//!
//! Each filtered port's flows carry a cookie of their own (from `firewall-<port-uid>`), so
//! a port's flows are replaced without touching any other's; the shared flows and the open
//! ports' carry [`SHARED_OWNER`]'s. A remote group's members are one flow each per rule.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;

use super::plan::{Allow, Desired, Direction, Family, PortFirewall, Remote, Traffic};
use super::{Enforcer, FirewallError};
use crate::switch::{FlowCookie, FlowSpec, IFACE_ID, Switch};
use crate::wiring::ovs::{INTEGRATION_BRIDGE, PATCH_TO_TUNNELS};

/// After conntrack, for a filtered port's own frames.
pub const EGRESS: u8 = 71;
/// Where frames find out whether they go to a filtered port of this node.
pub const DESTINATION: u8 = 72;
/// After conntrack, for frames to a filtered port.
pub const INGRESS: u8 = 73;
/// Out of a filtered port.
pub const DELIVER: u8 = 74;

/// The owner of the flows every port shares.
pub const SHARED_OWNER: &str = "firewall";

/// The cookie of a filtered port's flows.
pub fn port_cookie(port_uid: &str) -> FlowCookie {
    FlowCookie::for_owner(&format!("firewall-{port_uid}"))
}

/// A port of `br-int` as the flows need it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plugged {
    /// Its OpenFlow number.
    pub ofport: u32,
    /// Its local VLAN (none for `patch-tun`).
    pub tag: Option<u16>,
}

/// What `br-int` has: ports by the Port uid they carry, and `patch-tun`'s number.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Bridge {
    /// Ports by Port uid (`iface-id`).
    pub ports: BTreeMap<String, Plugged>,
    /// `patch-tun`'s OpenFlow number.
    pub patch: Option<u32>,
}

fn flow(table: u8, priority: u16, matches: String, actions: &str) -> FlowSpec {
    FlowSpec {
        table,
        priority,
        matches,
        actions: actions.to_owned(),
    }
}

/// Every firewall flow set the bridge should have, by cookie.
pub fn wanted(desired: &Desired, bridge: &Bridge) -> BTreeMap<FlowCookie, Vec<FlowSpec>> {
    let mut sets = BTreeMap::new();
    if desired.ports.is_empty() {
        return sets;
    }
    let filtered: BTreeSet<&str> = desired.ports.keys().map(String::as_str).collect();
    let state = |s: &str| format!("ct_state={s}");
    let mut shared = vec![
        flow(EGRESS, 100, state("+est-rel-inv+trk"), "resubmit(,72)"),
        flow(EGRESS, 100, state("-est+rel-inv+trk"), "resubmit(,72)"),
        flow(EGRESS, 90, state("+inv+trk"), "drop"),
        flow(EGRESS, 0, String::new(), "drop"),
        flow(DESTINATION, 0, String::new(), "NORMAL"),
        flow(INGRESS, 100, state("+est-rel-inv+trk"), "resubmit(,74)"),
        flow(INGRESS, 100, state("-est+rel-inv+trk"), "resubmit(,74)"),
        flow(INGRESS, 90, state("+inv+trk"), "drop"),
        flow(INGRESS, 0, String::new(), "drop"),
        flow(DELIVER, 0, String::new(), "drop"),
    ];
    if let Some(patch) = bridge.patch {
        shared.push(flow(
            0,
            70,
            format!("in_port={patch},vlan_tci=0x1000/0x1000"),
            "move:NXM_OF_VLAN_TCI[0..11]->NXM_NX_REG6[0..11],resubmit(,72)",
        ));
    }
    for (uid, plugged) in &bridge.ports {
        if filtered.contains(uid.as_str()) {
            continue;
        }
        if let Some(tag) = plugged.tag {
            shared.push(flow(
                0,
                70,
                format!("in_port={}", plugged.ofport),
                &format!("load:{tag}->NXM_NX_REG6[],resubmit(,72)"),
            ));
        }
    }
    sets.insert(FlowCookie::for_owner(SHARED_OWNER), shared);
    for (uid, port) in &desired.ports {
        let Some(Plugged {
            ofport,
            tag: Some(tag),
        }) = bridge.ports.get(uid)
        else {
            continue;
        };
        sets.insert(
            port_cookie(uid),
            port_flows(port, *ofport, *tag, &desired.members),
        );
    }
    sets
}

/// The flows of one filtered port.
fn port_flows(
    port: &PortFirewall,
    ofport: u32,
    tag: u16,
    members: &BTreeMap<(super::plan::GroupRef, Family), BTreeSet<IpAddr>>,
) -> Vec<FlowSpec> {
    let mac = &port.mac;
    let from = format!("in_port={ofport}");
    let own = format!("{from},dl_src={mac}");
    let mut flows = Vec::new();
    let track = format!("load:{tag}->NXM_NX_REG6[],ct(table={EGRESS},zone={tag})");
    for ip in &port.addresses {
        match ip {
            IpAddr::V4(v4) => {
                flows.push(flow(
                    0,
                    100,
                    format!("{own},arp,arp_spa={v4},arp_sha={mac}"),
                    "NORMAL",
                ));
                flows.push(flow(0, 90, format!("{own},ip,nw_src={v4}"), &track));
            }
            IpAddr::V6(v6) => {
                flows.push(flow(0, 90, format!("{own},ipv6,ipv6_src={v6}"), &track));
            }
        }
    }
    flows.push(flow(
        0,
        90,
        format!("{own},ipv6,ipv6_src=fe80::/10"),
        &track,
    ));
    flows.push(flow(
        0,
        100,
        format!("{own},udp,nw_src=0.0.0.0,tp_src=68,tp_dst=67"),
        "NORMAL",
    ));
    for kind in [133, 135, 136, 143] {
        flows.push(flow(
            0,
            100,
            format!("{own},icmp6,icmp_type={kind}"),
            "NORMAL",
        ));
    }
    flows.push(flow(0, 95, format!("{from},udp,tp_src=67"), "drop"));
    flows.push(flow(0, 95, format!("{from},udp6,tp_src=547"), "drop"));
    flows.push(flow(0, 95, format!("{from},icmp6,icmp_type=134"), "drop"));
    flows.push(flow(0, 80, from.clone(), "drop"));

    let to = format!("reg6={tag},dl_dst={mac}");
    for family in ["ip", "ipv6"] {
        flows.push(flow(
            DESTINATION,
            50,
            format!("{to},{family}"),
            &format!("ct(table={INGRESS},zone={tag})"),
        ));
    }
    flows.push(flow(
        INGRESS,
        60,
        format!("{to},udp,tp_src=67,tp_dst=68"),
        "resubmit(,74)",
    ));
    flows.push(flow(
        INGRESS,
        60,
        format!("{to},udp6,tp_src=547,tp_dst=546"),
        "resubmit(,74)",
    ));
    for kind in [130, 134, 135, 136] {
        flows.push(flow(
            INGRESS,
            60,
            format!("{to},icmp6,icmp_type={kind}"),
            "resubmit(,74)",
        ));
    }
    // Frames from the tunnels still carry the network's local VLAN.
    flows.push(flow(
        DELIVER,
        50,
        format!("{to},vlan_tci=0x1000/0x1000"),
        &format!("pop_vlan,output:{ofport}"),
    ));
    flows.push(flow(
        DELIVER,
        50,
        format!("{to},vlan_tci=0"),
        &format!("output:{ofport}"),
    ));

    let commit = |next: u8| format!("ct(commit,zone={tag}),resubmit(,{next})");
    let new = "ct_state=+new-est-rel-inv+trk";
    for allow in &port.allows {
        let (table, side, next, base) = match allow.direction {
            Direction::Egress => (EGRESS, "dst", DESTINATION, format!("{new},{from}")),
            Direction::Ingress => (INGRESS, "src", DELIVER, format!("{new},{to}")),
        };
        for matches in allow_matches(allow, side, members) {
            flows.push(flow(table, 50, format!("{base},{matches}"), &commit(next)));
        }
    }
    flows
}

/// The match parts of one allow rule: one per remote address or network, and per port
/// mask where a port range is not one mask.
fn allow_matches(
    allow: &Allow,
    side: &str,
    members: &BTreeMap<(super::plan::GroupRef, Family), BTreeSet<IpAddr>>,
) -> Vec<String> {
    let v6 = allow.family == Family::V6;
    let (protocol, ports): (&str, Vec<String>) = match &allow.traffic {
        Traffic::Any => (if v6 { "ipv6" } else { "ip" }, vec![String::new()]),
        Traffic::Tcp(range) => (if v6 { "tcp6" } else { "tcp" }, port_matches(*range)),
        Traffic::Udp(range) => (if v6 { "udp6" } else { "udp" }, port_matches(*range)),
        Traffic::Icmp { kind, code } => {
            let mut m = String::new();
            if let Some(kind) = kind {
                m.push_str(&format!(",icmp_type={kind}"));
            }
            if let Some(code) = code {
                m.push_str(&format!(",icmp_code={code}"));
            }
            (if v6 { "icmp6" } else { "icmp" }, vec![m])
        }
    };
    let field = match (v6, side) {
        (false, "src") => "nw_src",
        (false, _) => "nw_dst",
        (true, "src") => "ipv6_src",
        (true, _) => "ipv6_dst",
    };
    let remotes: Vec<String> = match &allow.remote {
        Remote::Any => vec![String::new()],
        Remote::Net(net) => vec![format!(",{field}={net}")],
        Remote::Group(group) => members
            .get(&(group.clone(), allow.family))
            .into_iter()
            .flatten()
            .map(|ip| format!(",{field}={ip}"))
            .collect(),
    };
    let mut out = Vec::new();
    for remote in &remotes {
        for port in &ports {
            out.push(format!("{protocol}{remote}{port}"));
        }
    }
    out
}

/// `tp_dst` matches covering a port range: one value, or value/mask pairs.
fn port_matches(range: Option<(u16, u16)>) -> Vec<String> {
    let Some((min, max)) = range else {
        return vec![String::new()];
    };
    if min == max {
        return vec![format!(",tp_dst={min}")];
    }
    let mut out = Vec::new();
    let (mut start, end) = (u32::from(min), u32::from(max));
    while start <= end {
        // The largest aligned block starting at `start` that stays within the range.
        let mut size = 1u32;
        while start % (size * 2) == 0 && start + size * 2 - 1 <= end && size < 0x10000 {
            size *= 2;
        }
        let mask = 0xffff & !(size - 1);
        out.push(format!(",tp_dst={start:#x}/{mask:#x}"));
        start += size;
    }
    out
}

/// [`Enforcer`] with OpenFlow on `br-int` ([`wanted`]).
pub struct OvsEnforcer {
    switch: Arc<dyn Switch>,
    /// The flows the last call left, by cookie.
    known: Mutex<Option<BTreeMap<FlowCookie, Vec<FlowSpec>>>>,
}

impl OvsEnforcer {
    /// An enforcer over `switch` that has read nothing yet.
    pub fn new(switch: Arc<dyn Switch>) -> OvsEnforcer {
        OvsEnforcer {
            switch,
            known: Mutex::new(None),
        }
    }

    async fn bridge(&self) -> Result<Bridge, FirewallError> {
        let ports = self.switch.list_ports().await.map_err(switch_error)?;
        let mut bridge = Bridge::default();
        for port in ports.iter().filter(|p| p.bridge == INTEGRATION_BRIDGE) {
            let Some(ofport) = port.ofport else { continue };
            if port.name == PATCH_TO_TUNNELS {
                bridge.patch = Some(ofport);
            } else if let Some(uid) = port.external_ids.get(IFACE_ID) {
                bridge.ports.insert(
                    uid.clone(),
                    Plugged {
                        ofport,
                        tag: port.tag,
                    },
                );
            }
        }
        Ok(bridge)
    }

    /// The firewall's flows on `br-int`, by cookie: every flow but the driver's own
    /// (table 0, priority 0). A flow's text as dumped differs from how it was written, so
    /// only its table and priority are kept.
    async fn read(&self) -> Result<BTreeMap<FlowCookie, Vec<FlowSpec>>, FirewallError> {
        let flows = match self.switch.dump_flows(INTEGRATION_BRIDGE, None).await {
            Ok(flows) => flows,
            Err(_) => return Ok(BTreeMap::new()),
        };
        let mut sets: BTreeMap<FlowCookie, Vec<FlowSpec>> = BTreeMap::new();
        for f in flows {
            if f.spec.table == 0 && f.spec.priority == 0 {
                continue;
            }
            sets.entry(f.cookie).or_default().push(f.spec);
        }
        Ok(sets)
    }
}

fn switch_error(e: crate::switch::SwitchError) -> FirewallError {
    FirewallError::Nft {
        command: "ovs".into(),
        message: e.to_string(),
    }
}

/// Table and priority of each flow, sorted: what a dump can be compared by.
fn shape(flows: &[FlowSpec]) -> Vec<(u8, u16)> {
    let mut shape: Vec<(u8, u16)> = flows.iter().map(|f| (f.table, f.priority)).collect();
    shape.sort();
    shape
}

/// How soon an Open vSwitch node looks at `br-int`'s ports again: a port plugged without
/// a change of its Port (a router's leg, a port plugged again) needs its table-0 flow, or
/// frames from it would bypass connection tracking.
pub const RECHECK_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

#[async_trait]
impl Enforcer for OvsEnforcer {
    fn recheck_every(&self) -> std::time::Duration {
        RECHECK_EVERY
    }

    async fn enforce(&self, desired: &Desired, full: bool) -> Result<usize, FirewallError> {
        let bridge = self.bridge().await?;
        let want = wanted(desired, &bridge);
        let known = self.known.lock().unwrap_or_else(|e| e.into_inner()).take();
        let (have, exact) = match known {
            Some(known) if !full => (known, true),
            _ => (self.read().await?, false),
        };
        let mut sets: Vec<(FlowCookie, Vec<FlowSpec>)> = Vec::new();
        for (cookie, flows) in &want {
            let same = have.get(cookie).is_some_and(|had| {
                if exact {
                    had == flows
                } else {
                    shape(had) == shape(flows)
                }
            });
            if !same {
                sets.push((*cookie, flows.clone()));
            }
        }
        for cookie in have.keys() {
            if !want.contains_key(cookie) {
                sets.push((*cookie, Vec::new()));
            }
        }
        // One bundle: every port's change at once, none half-applied.
        self.switch
            .replace_flow_sets(INTEGRATION_BRIDGE, &sets)
            .await
            .map_err(switch_error)?;
        let changes = sets.len();
        *self.known.lock().unwrap_or_else(|e| e.into_inner()) = Some(want);
        Ok(changes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::firewall::plan::GroupRef;

    #[test]
    fn port_ranges_become_masks_that_cover_exactly_the_range() {
        assert_eq!(port_matches(Some((80, 80))), [",tp_dst=80"]);
        assert_eq!(port_matches(Some((1000, 1003))), [",tp_dst=0x3e8/0xfffc"]);
        let covered: u32 = port_matches(Some((1, 65535)))
            .iter()
            .map(|m| {
                let mask = u32::from_str_radix(m.rsplit("0x").next().unwrap(), 16).unwrap();
                0x10000 - mask
            })
            .sum();
        assert_eq!(covered, 65535);
    }

    #[test]
    fn a_filtered_port_gets_its_own_cookie_and_open_ports_the_shared_one() {
        let port = PortFirewall {
            uid: "u1".into(),
            label: "p/web-0".into(),
            device: "tapu1".into(),
            mac: "fa:16:3e:00:00:01".into(),
            addresses: BTreeSet::from(["10.0.0.5".parse().unwrap()]),
            network_uid: "net".into(),
            zone: 2,
            allows: BTreeSet::from([Allow {
                direction: Direction::Ingress,
                family: Family::V4,
                traffic: Traffic::Tcp(Some((80, 80))),
                remote: Remote::Group(GroupRef {
                    project: "p".into(),
                    name: "default".into(),
                }),
            }]),
        };
        let group = (
            GroupRef {
                project: "p".into(),
                name: "default".into(),
            },
            Family::V4,
        );
        let desired = Desired {
            ports: BTreeMap::from([("u1".into(), port)]),
            members: BTreeMap::from([(
                group,
                BTreeSet::from(["10.0.0.5".parse().unwrap(), "10.0.0.6".parse().unwrap()]),
            )]),
        };
        let bridge = Bridge {
            ports: BTreeMap::from([
                (
                    "u1".into(),
                    Plugged {
                        ofport: 5,
                        tag: Some(3),
                    },
                ),
                (
                    "dhcp".into(),
                    Plugged {
                        ofport: 6,
                        tag: Some(3),
                    },
                ),
            ]),
            patch: Some(1),
        };
        let sets = wanted(&desired, &bridge);
        if let Ok(path) = std::env::var("FERRO_DUMP_FLOWS") {
            let text: String = sets
                .values()
                .flatten()
                .map(|f| {
                    format!(
                        "table={},priority={},{} actions={}\n",
                        f.table, f.priority, f.matches, f.actions
                    )
                })
                .collect();
            std::fs::write(path, text).unwrap();
        }
        let mine = &sets[&port_cookie("u1")];
        let text: Vec<String> = mine
            .iter()
            .map(|f| format!("{} {}", f.matches, f.actions))
            .collect();
        assert!(text.contains(&"in_port=5,dl_src=fa:16:3e:00:00:01,ip,nw_src=10.0.0.5 load:3->NXM_NX_REG6[],ct(table=71,zone=3)".to_owned()), "{text:#?}");
        assert!(text.contains(&"ct_state=+new-est-rel-inv+trk,reg6=3,dl_dst=fa:16:3e:00:00:01,tcp,nw_src=10.0.0.6,tp_dst=80 ct(commit,zone=3),resubmit(,74)".to_owned()), "{text:#?}");
        let shared = &sets[&FlowCookie::for_owner(SHARED_OWNER)];
        assert!(shared.iter().any(|f| f.matches == "in_port=6"));
        assert!(!shared.iter().any(|f| f.matches == "in_port=5"));
        // No filtered port, no flows.
        assert!(wanted(&Desired::default(), &bridge).is_empty());
    }
}
