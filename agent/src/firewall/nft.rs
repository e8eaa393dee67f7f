//! Security groups on Linux bridges, as nftables rules: what the tables must hold
//! ([`Wanted`], from [`wanted`]), what they hold ([`State`], read back by [`read`]), and
//! the smallest list of [`Op`]s from one to the other ([`changes`]), which [`script`]
//! writes as one `nft -f` transaction.
//!
//! Bridged traffic is filtered in the bridge family, where nftables sees the guest's own
//! device; but this kernel family has no connection tracking of its own. The bridge's
//! netfilter glue (`br_netfilter`, `net.bridge.bridge-nf-call-iptables=1`) hands bridged
//! IPv4 and IPv6 to the inet hooks, where conntrack runs, before the bridge family's
//! later forward chains. So there are two node-wide tables, both named `ferro-sg`:
//! - `inet ferro-sg` puts each network's bridge in a conntrack zone of its own (chain
//!   `zone`: tenants' overlapping addresses never share an entry) and copies "this packet
//!   belongs to a known connection" into a bit of the packet mark (chain `state`);
//! - `bridge ferro-sg` dispatches each packet, by its input and output device, through
//!   two verdict maps to the chains of the ports it leaves and enters: `o_<port-uid>`
//!   (anti-spoofing, then the port's egress rules) and `i_<port-uid>` (its ingress
//!   rules). Both end in a drop; established traffic passes on the mark bit.
//!
//! Each port has chains of its own, replaced only when that port's rules change, and a
//! remote group is a named set (`g4_<project>_<group>`, `g6_…`) whose elements are its
//! members' addresses: a Port joining a group adds an element, and no chain is rebuilt.
//! Every rule carries a comment that ends in a hash of its text, so reading the chains
//! back says whether each is exactly as wanted, and a rule flushed by hand is put back.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::IpAddr;

use serde_json::Value as Json;
use sha2::Digest;

use super::plan::{Allow, Desired, Direction, Family, GroupRef, PortFirewall, Remote, Traffic};

/// The name of both node-wide tables.
pub const TABLE: &str = "ferro-sg";
/// The bit of the packet mark that says "part of a known connection".
pub const ESTABLISHED_MARK: u32 = 0x4000_0000;
/// The bridge family's base chain, after `br_netfilter` (priority 0) in the forward hook.
pub const FORWARD_CHAIN: &str = "forward";
/// The verdict map from an input device to its port's egress chain.
pub const EGRESS_MAP: &str = "egress";
/// The verdict map from an output device to its port's ingress chain.
pub const INGRESS_MAP: &str = "ingress";
/// The inet chain that puts each bridge in its conntrack zone.
pub const ZONE_CHAIN: &str = "zone";
/// The inet chain that copies conntrack state into the mark.
pub const STATE_CHAIN: &str = "state";

/// The two families of Ferro's security group tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Table {
    /// `bridge ferro-sg`: the ports' chains.
    Bridge,
    /// `inet ferro-sg`: zones and connection state.
    Inet,
}

impl Table {
    fn family(self) -> &'static str {
        match self {
            Table::Bridge => "bridge",
            Table::Inet => "inet",
        }
    }
}

/// A base chain's hook and priority.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hook {
    /// `prerouting` or `forward`.
    pub hook: &'static str,
    /// The priority.
    pub priority: i32,
}

/// A chain as it must be: its hook, if a base chain, and its rules as `(comment, text)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainSpec {
    /// The hook of a base chain.
    pub hook: Option<Hook>,
    /// The rules, in order: the comment (a label and the hash of the text) and the text.
    pub rules: Vec<(String, String)>,
}

/// What the tables must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Wanted {
    /// Every chain, by table and name.
    pub chains: BTreeMap<(Table, String), ChainSpec>,
    /// The remote groups' sets (bridge table), by name: family and addresses.
    pub sets: BTreeMap<String, (Family, BTreeSet<IpAddr>)>,
    /// Input device → the egress chain of its port.
    pub egress: BTreeMap<String, String>,
    /// Output device → the ingress chain of its port.
    pub ingress: BTreeMap<String, String>,
}

/// What the tables hold, as far as Ferro compares it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct State {
    /// Whether both tables exist with the bridge table's two maps.
    pub tables: bool,
    /// Every chain's rule comments, in order.
    pub chains: BTreeMap<(Table, String), Vec<String>>,
    /// Every set's addresses.
    pub sets: BTreeMap<String, BTreeSet<IpAddr>>,
    /// The egress map.
    pub egress: BTreeMap<String, String>,
    /// The ingress map.
    pub ingress: BTreeMap<String, String>,
}

/// One change to the tables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Make both tables and the bridge table's maps, if missing.
    EnsureTables,
    /// Remove both tables, whatever they hold.
    RemoveTables,
    /// Make a set (of one family), if missing.
    EnsureSet(String, Family),
    /// Add addresses to a set.
    AddElements(String, BTreeSet<IpAddr>),
    /// Remove addresses from a set.
    RemoveElements(String, BTreeSet<IpAddr>),
    /// Remove a set.
    RemoveSet(String),
    /// Make a chain if missing and replace its rules.
    ReplaceChain(Table, String, ChainSpec),
    /// Empty and remove a chain.
    RemoveChain(Table, String),
    /// Point a device at a chain in the egress (`true`) or ingress map.
    MapDevice(bool, String, String),
    /// Remove a device from the egress (`true`) or ingress map.
    UnmapDevice(bool, String),
}

/// The egress chain of a port.
pub fn egress_chain(port_uid: &str) -> String {
    format!("o_{port_uid}")
}

/// The ingress chain of a port.
pub fn ingress_chain(port_uid: &str) -> String {
    format!("i_{port_uid}")
}

/// The set of a group's members of one family.
pub fn group_set(group: &GroupRef, family: Family) -> String {
    let v = match family {
        Family::V4 => 4,
        Family::V6 => 6,
    };
    // Project and group names are DNS labels: `_` cannot be part of either.
    format!("g{v}_{}_{}", group.project, group.name)
}

fn rule(label: &str, text: String) -> (String, String) {
    let digest = sha2::Sha256::digest(text.as_bytes());
    let hash: String = digest[..4].iter().map(|b| format!("{b:02x}")).collect();
    (format!("{label} {hash}"), text)
}

fn list<T: std::fmt::Display>(items: impl IntoIterator<Item = T>) -> String {
    let items: Vec<String> = items.into_iter().map(|i| i.to_string()).collect();
    format!("{{ {} }}", items.join(", "))
}

/// What the tables must hold for these ports, their networks' bridges named by
/// `bridge_of(network_uid)`.
pub fn wanted(desired: &Desired, bridge_of: impl Fn(&str) -> String) -> Wanted {
    let mut out = Wanted::default();
    if desired.ports.is_empty() {
        return out;
    }
    let established = format!("meta mark & {ESTABLISHED_MARK:#x} == {ESTABLISHED_MARK:#x}");
    out.chains.insert(
        (Table::Bridge, FORWARD_CHAIN.to_owned()),
        ChainSpec {
            hook: Some(Hook {
                hook: "forward",
                priority: 100,
            }),
            rules: vec![
                rule("dispatch-egress", format!("iifname vmap @{EGRESS_MAP}")),
                rule("dispatch-ingress", format!("oifname vmap @{INGRESS_MAP}")),
            ],
        },
    );
    let zones: BTreeMap<String, u16> = desired
        .ports
        .values()
        .map(|p| (bridge_of(&p.network_uid), p.zone))
        .collect();
    let zone_map = list(
        zones
            .iter()
            .map(|(bridge, zone)| format!("\"{bridge}\" : {zone}")),
    );
    out.chains.insert(
        (Table::Inet, ZONE_CHAIN.to_owned()),
        ChainSpec {
            hook: Some(Hook {
                hook: "prerouting",
                priority: -300,
            }),
            rules: vec![rule("zones", format!("ct zone set iifname map {zone_map}"))],
        },
    );
    out.chains.insert(
        (Table::Inet, STATE_CHAIN.to_owned()),
        ChainSpec {
            hook: Some(Hook {
                hook: "forward",
                priority: 0,
            }),
            rules: vec![
                rule(
                    "clear",
                    format!("meta mark set meta mark & {:#x}", !ESTABLISHED_MARK),
                ),
                rule(
                    "established",
                    format!(
                        "ct state established,related meta mark set meta mark | {ESTABLISHED_MARK:#x}"
                    ),
                ),
            ],
        },
    );
    for ((group, family), addresses) in &desired.members {
        out.sets
            .insert(group_set(group, *family), (*family, addresses.clone()));
    }
    for port in desired.ports.values() {
        let (egress, ingress) = (egress_chain(&port.uid), ingress_chain(&port.uid));
        out.egress.insert(port.device.clone(), egress.clone());
        out.ingress.insert(port.device.clone(), ingress.clone());
        out.chains.insert(
            (Table::Bridge, egress),
            ChainSpec {
                hook: None,
                rules: egress_rules(port, &established),
            },
        );
        out.chains.insert(
            (Table::Bridge, ingress),
            ChainSpec {
                hook: None,
                rules: ingress_rules(port, &established),
            },
        );
    }
    out
}

/// Out of the guest: its own MAC and addresses only, no DHCP or router advertisements
/// of its own, then its egress rules. A passed packet *returns*, so that the ingress
/// chain of the port it goes to (if any) still sees it.
fn egress_rules(port: &PortFirewall, established: &str) -> Vec<(String, String)> {
    let v4: Vec<&IpAddr> = port.addresses.iter().filter(|a| a.is_ipv4()).collect();
    let v6: Vec<&IpAddr> = port.addresses.iter().filter(|a| a.is_ipv6()).collect();
    let mac = &port.mac;
    let mut rules = vec![rule("mac", format!("ether saddr != {mac} drop"))];
    rules.push(rule(
        "arp-mac",
        format!("ether type arp arp saddr ether != {mac} drop"),
    ));
    if v4.is_empty() {
        rules.push(rule("arp-ip", "ether type arp drop".to_owned()));
    } else {
        rules.push(rule(
            "arp-ip",
            format!("ether type arp arp saddr ip != {} drop", list(&v4)),
        ));
    }
    rules.push(rule("arp", "ether type arp return".to_owned()));
    rules.push(rule(
        "dhcp-client",
        "ether type ip ip saddr 0.0.0.0 udp sport 68 udp dport 67 return".to_owned(),
    ));
    rules.push(rule(
        "no-dhcp-server",
        "ether type ip udp sport 67 drop".to_owned(),
    ));
    if v4.is_empty() {
        rules.push(rule("ip-spoof", "ether type ip drop".to_owned()));
    } else {
        rules.push(rule(
            "ip-spoof",
            format!("ether type ip ip saddr != {} drop", list(&v4)),
        ));
    }
    rules.push(rule(
        "no-dhcp6-server",
        "ether type ip6 udp sport 547 drop".to_owned(),
    ));
    rules.push(rule(
        "no-router-advert",
        "ether type ip6 icmpv6 type nd-router-advert drop".to_owned(),
    ));
    let own6 = ["fe80::/10".to_owned(), "::".to_owned()]
        .into_iter()
        .chain(v6.iter().map(|a| a.to_string()));
    rules.push(rule(
        "ip6-spoof",
        format!("ether type ip6 ip6 saddr != {} drop", list(own6)),
    ));
    rules.push(rule(
        "neighbour-discovery",
        "ether type ip6 icmpv6 type { nd-router-solicit, nd-neighbor-solicit, nd-neighbor-advert, mld-listener-report, mld2-listener-report } return".to_owned(),
    ));
    rules.push(rule("established", format!("{established} return")));
    for allow in port
        .allows
        .iter()
        .filter(|a| a.direction == Direction::Egress)
    {
        rules.push(rule("allow", allow_text(allow, "return")));
    }
    rules.push(rule("deny", "drop".to_owned()));
    rules
}

/// Into the guest: ARP, neighbour discovery and DHCP answers, established connections,
/// then its ingress rules.
fn ingress_rules(port: &PortFirewall, established: &str) -> Vec<(String, String)> {
    let mut rules = vec![
        rule("arp", "ether type arp accept".to_owned()),
        rule(
            "neighbour-discovery",
            "ether type ip6 icmpv6 type { nd-router-advert, nd-neighbor-solicit, nd-neighbor-advert, mld-listener-query } accept".to_owned(),
        ),
        rule(
            "dhcp",
            "ether type ip udp sport 67 udp dport 68 accept".to_owned(),
        ),
        rule(
            "dhcp6",
            "ether type ip6 udp sport 547 udp dport 546 accept".to_owned(),
        ),
        rule("established", format!("{established} accept")),
    ];
    for allow in port
        .allows
        .iter()
        .filter(|a| a.direction == Direction::Ingress)
    {
        rules.push(rule("allow", allow_text(allow, "accept")));
    }
    rules.push(rule("deny", "drop".to_owned()));
    rules
}

/// The text of an allow rule ending in `verdict`.
fn allow_text(allow: &Allow, verdict: &str) -> String {
    let (ether, ip, icmp, icmp_proto) = match allow.family {
        Family::V4 => ("ip", "ip", "icmp", "icmp"),
        Family::V6 => ("ip6", "ip6", "icmpv6", "ipv6-icmp"),
    };
    let mut text = format!("ether type {ether}");
    let side = match allow.direction {
        Direction::Ingress => "saddr",
        Direction::Egress => "daddr",
    };
    match &allow.remote {
        Remote::Any => {}
        Remote::Net(net) => {
            let _ = write!(text, " {ip} {side} {net}");
        }
        Remote::Group(group) => {
            let _ = write!(text, " {ip} {side} @{}", group_set(group, allow.family));
        }
    }
    let ports = |proto: &str, range: &Option<(u16, u16)>| match range {
        None => format!(" meta l4proto {proto}"),
        Some((min, max)) if min == max => format!(" {proto} dport {min}"),
        Some((min, max)) => format!(" {proto} dport {min}-{max}"),
    };
    match &allow.traffic {
        Traffic::Any => {}
        Traffic::Tcp(range) => text.push_str(&ports("tcp", range)),
        Traffic::Udp(range) => text.push_str(&ports("udp", range)),
        Traffic::Icmp { kind, code } => {
            let _ = write!(text, " meta l4proto {icmp_proto}");
            if let Some(kind) = kind {
                let _ = write!(text, " {icmp} type {kind}");
            }
            if let Some(code) = code {
                let _ = write!(text, " {icmp} code {code}");
            }
        }
    }
    let _ = write!(text, " {verdict}");
    text
}

/// The changes that take the tables from `have` to `want`, in an order nftables accepts
/// in one transaction: sets before the rules that name them, map entries after the
/// chains they jump to, and removals after nothing refers to what they remove.
pub fn changes(want: &Wanted, have: &State) -> Vec<Op> {
    let mut ops = Vec::new();
    if want.chains.is_empty() {
        if have.tables || !have.chains.is_empty() || !have.sets.is_empty() {
            ops.push(Op::RemoveTables);
        }
        return ops;
    }
    if !have.tables {
        ops.push(Op::EnsureTables);
    }
    for (name, (family, addresses)) in &want.sets {
        let had = have.sets.get(name);
        if had.is_none() {
            ops.push(Op::EnsureSet(name.clone(), *family));
        }
        let empty = BTreeSet::new();
        let had = had.unwrap_or(&empty);
        let missing: BTreeSet<IpAddr> = addresses.difference(had).copied().collect();
        let extra: BTreeSet<IpAddr> = had.difference(addresses).copied().collect();
        if !missing.is_empty() {
            ops.push(Op::AddElements(name.clone(), missing));
        }
        if !extra.is_empty() {
            ops.push(Op::RemoveElements(name.clone(), extra));
        }
    }
    for (key, spec) in &want.chains {
        let comments: Vec<&String> = spec.rules.iter().map(|(c, _)| c).collect();
        let same = have
            .chains
            .get(key)
            .is_some_and(|had| had.iter().collect::<Vec<_>>() == comments);
        if !same {
            ops.push(Op::ReplaceChain(key.0, key.1.clone(), spec.clone()));
        }
    }
    for (egress, want_map, have_map) in [
        (true, &want.egress, &have.egress),
        (false, &want.ingress, &have.ingress),
    ] {
        for (device, chain) in want_map {
            if have_map.get(device) != Some(chain) {
                if have_map.contains_key(device) {
                    ops.push(Op::UnmapDevice(egress, device.clone()));
                }
                ops.push(Op::MapDevice(egress, device.clone(), chain.clone()));
            }
        }
        for device in have_map.keys() {
            if !want_map.contains_key(device) {
                ops.push(Op::UnmapDevice(egress, device.clone()));
            }
        }
    }
    for key in have.chains.keys() {
        if !want.chains.contains_key(key) {
            ops.push(Op::RemoveChain(key.0, key.1.clone()));
        }
    }
    for name in have.sets.keys() {
        if !want.sets.contains_key(name) {
            ops.push(Op::RemoveSet(name.clone()));
        }
    }
    ops
}

/// What the tables hold after `ops` were carried out on `state`.
pub fn after(mut state: State, ops: &[Op]) -> State {
    for op in ops {
        match op {
            Op::EnsureTables => state.tables = true,
            Op::RemoveTables => state = State::default(),
            Op::EnsureSet(name, _) => {
                state.sets.entry(name.clone()).or_default();
            }
            Op::AddElements(name, addresses) => {
                state
                    .sets
                    .entry(name.clone())
                    .or_default()
                    .extend(addresses.iter().copied());
            }
            Op::RemoveElements(name, addresses) => {
                if let Some(set) = state.sets.get_mut(name) {
                    set.retain(|a| !addresses.contains(a));
                }
            }
            Op::RemoveSet(name) => {
                state.sets.remove(name);
            }
            Op::ReplaceChain(table, name, spec) => {
                state.chains.insert(
                    (*table, name.clone()),
                    spec.rules.iter().map(|(c, _)| c.clone()).collect(),
                );
            }
            Op::RemoveChain(table, name) => {
                state.chains.remove(&(*table, name.clone()));
            }
            Op::MapDevice(egress, device, chain) => {
                let map = if *egress {
                    &mut state.egress
                } else {
                    &mut state.ingress
                };
                map.insert(device.clone(), chain.clone());
            }
            Op::UnmapDevice(egress, device) => {
                let map = if *egress {
                    &mut state.egress
                } else {
                    &mut state.ingress
                };
                map.remove(device);
            }
        }
    }
    state
}

/// The `nft -f` script that carries out `ops`, one transaction.
pub fn script(ops: &[Op]) -> String {
    let mut s = String::new();
    let bridge = format!("bridge {TABLE}");
    let inet = format!("inet {TABLE}");
    for op in ops {
        let _ = match op {
            Op::EnsureTables => writeln!(
                s,
                "add table {bridge}\nadd table {inet}\n\
                 add map {bridge} {EGRESS_MAP} {{ type ifname : verdict; }}\n\
                 add map {bridge} {INGRESS_MAP} {{ type ifname : verdict; }}"
            ),
            Op::RemoveTables => writeln!(
                s,
                "add table {bridge}\ndelete table {bridge}\nadd table {inet}\ndelete table {inet}"
            ),
            Op::EnsureSet(name, family) => {
                let kind = match family {
                    Family::V4 => "ipv4_addr",
                    Family::V6 => "ipv6_addr",
                };
                writeln!(s, "add set {bridge} {name} {{ type {kind}; }}")
            }
            Op::AddElements(name, addresses) => {
                writeln!(s, "add element {bridge} {name} {}", list(addresses))
            }
            Op::RemoveElements(name, addresses) => {
                writeln!(s, "delete element {bridge} {name} {}", list(addresses))
            }
            Op::RemoveSet(name) => writeln!(s, "delete set {bridge} {name}"),
            Op::ReplaceChain(table, name, spec) => {
                let table = format!("{} {TABLE}", table.family());
                match spec.hook {
                    Some(Hook { hook, priority }) => writeln!(
                        s,
                        "add chain {table} {name} {{ type filter hook {hook} priority {priority}; policy accept; }}"
                    ),
                    None => writeln!(s, "add chain {table} {name}"),
                }
                .and_then(|()| writeln!(s, "flush chain {table} {name}"))
                .and_then(|()| {
                    spec.rules.iter().try_for_each(|(comment, text)| {
                        writeln!(s, "add rule {table} {name} {text} comment \"{comment}\"")
                    })
                })
            }
            Op::RemoveChain(table, name) => {
                let table = format!("{} {TABLE}", table.family());
                writeln!(s, "flush chain {table} {name}\ndelete chain {table} {name}")
            }
            Op::MapDevice(egress, device, chain) => {
                let map = if *egress { EGRESS_MAP } else { INGRESS_MAP };
                writeln!(
                    s,
                    "add element {bridge} {map} {{ \"{device}\" : jump {chain} }}"
                )
            }
            Op::UnmapDevice(egress, device) => {
                let map = if *egress { EGRESS_MAP } else { INGRESS_MAP };
                writeln!(s, "delete element {bridge} {map} {{ \"{device}\" }}")
            }
        };
    }
    s
}

/// What the tables hold, from `nft -j list table bridge ferro-sg` and `… inet ferro-sg`
/// (`None` where the table does not exist).
pub fn read(bridge: Option<&Json>, inet: Option<&Json>) -> State {
    let mut state = State::default();
    let mut maps = BTreeSet::new();
    for (table, listing) in [(Table::Bridge, bridge), (Table::Inet, inet)] {
        let Some(listing) = listing else { continue };
        let objects = listing["nftables"].as_array().cloned().unwrap_or_default();
        for object in &objects {
            if let Some(chain) = object.get("chain") {
                if let Some(name) = chain["name"].as_str() {
                    state.chains.entry((table, name.to_owned())).or_default();
                }
            } else if let Some(rule) = object.get("rule") {
                let (Some(chain), comment) = (rule["chain"].as_str(), rule["comment"].as_str())
                else {
                    continue;
                };
                state
                    .chains
                    .entry((table, chain.to_owned()))
                    .or_default()
                    .push(comment.unwrap_or_default().to_owned());
            } else if let Some(set) = object.get("set") {
                let Some(name) = set["name"].as_str() else {
                    continue;
                };
                let addresses = set["elem"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|e| e.as_str()?.parse().ok())
                    .collect();
                state.sets.insert(name.to_owned(), addresses);
            } else if let Some(map) = object.get("map") {
                let Some(name) = map["name"].as_str() else {
                    continue;
                };
                maps.insert(name.to_owned());
                let target = match name {
                    EGRESS_MAP => &mut state.egress,
                    INGRESS_MAP => &mut state.ingress,
                    _ => continue,
                };
                for element in map["elem"].as_array().into_iter().flatten() {
                    let (Some(device), Some(chain)) =
                        (element[0].as_str(), element[1]["jump"]["target"].as_str())
                    else {
                        continue;
                    };
                    target.insert(device.to_owned(), chain.to_owned());
                }
            }
        }
    }
    state.tables = bridge.is_some()
        && inet.is_some()
        && maps.contains(EGRESS_MAP)
        && maps.contains(INGRESS_MAP);
    state
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::firewall::plan::{GroupRef, PortFirewall};

    fn port(uid: &str, allows: BTreeSet<Allow>) -> PortFirewall {
        PortFirewall {
            uid: uid.into(),
            label: format!("p/{uid}"),
            device: format!("tap{uid}"),
            mac: "fa:16:3e:00:00:01".into(),
            addresses: BTreeSet::from(["10.0.0.5".parse().unwrap()]),
            network_uid: "net".into(),
            zone: 2,
            allows,
        }
    }

    fn group() -> GroupRef {
        GroupRef {
            project: "p".into(),
            name: "default".into(),
        }
    }

    fn desired() -> Desired {
        let allows = BTreeSet::from([
            Allow {
                direction: Direction::Ingress,
                family: Family::V4,
                traffic: Traffic::Tcp(Some((80, 81))),
                remote: Remote::Group(group()),
            },
            Allow {
                direction: Direction::Egress,
                family: Family::V4,
                traffic: Traffic::Any,
                remote: Remote::Any,
            },
        ]);
        Desired {
            ports: BTreeMap::from([("u1".to_owned(), port("u1", allows))]),
            members: BTreeMap::from([(
                (group(), Family::V4),
                BTreeSet::from(["10.0.0.5".parse().unwrap()]),
            )]),
        }
    }

    #[test]
    fn a_first_pass_makes_everything_in_order() {
        let want = wanted(&desired(), |n| format!("brq{n}"));
        let ops = changes(&want, &State::default());
        assert_eq!(ops[0], Op::EnsureTables);
        let text = script(&ops);
        if let Ok(path) = std::env::var("FERRO_DUMP_NFT") {
            std::fs::write(path, &text).unwrap();
        }
        let at = |needle: &str| {
            text.find(needle)
                .unwrap_or_else(|| panic!("{needle} in {text}"))
        };
        assert!(at("add set bridge ferro-sg g4_p_default") < at("@g4_p_default tcp"));
        assert!(at("add chain bridge ferro-sg o_u1") < at("\"tapu1\" : jump o_u1"));
        assert!(text.contains("ip saddr @g4_p_default tcp dport 80-81 accept comment \"allow "));
        assert!(
            text.contains("ct zone set iifname map { \"brqnet\" : 2 }"),
            "{text}"
        );
        // Carried out, nothing is left to do.
        let state = after(State::default(), &ops);
        assert_eq!(changes(&want, &state), []);
    }

    #[test]
    fn a_member_joining_changes_a_set_and_no_chain() {
        let mut desired = desired();
        let want = wanted(&desired, |n| format!("brq{n}"));
        let state = after(State::default(), &changes(&want, &State::default()));
        desired.members.values_mut().for_each(|m| {
            m.insert("10.0.0.9".parse().unwrap());
        });
        let ops = changes(&wanted(&desired, |n| format!("brq{n}")), &state);
        assert_eq!(
            ops,
            [Op::AddElements(
                "g4_p_default".into(),
                BTreeSet::from(["10.0.0.9".parse().unwrap()])
            )]
        );
    }

    #[test]
    fn a_rule_flushed_by_hand_and_a_gone_port_are_mended() {
        let want = wanted(&desired(), |n| format!("brq{n}"));
        let mut state = after(State::default(), &changes(&want, &State::default()));
        state
            .chains
            .get_mut(&(Table::Bridge, "i_u1".into()))
            .unwrap()
            .clear();
        let ops = changes(&want, &state);
        assert!(matches!(&ops[..], [Op::ReplaceChain(Table::Bridge, name, _)] if name == "i_u1"));

        let ops = changes(&Wanted::default(), &state);
        assert_eq!(ops, [Op::RemoveTables]);
        assert!(script(&ops).contains("delete table bridge ferro-sg"));
    }

    #[test]
    fn a_listing_reads_back_as_state() {
        let want = wanted(&desired(), |n| format!("brq{n}"));
        let state = after(State::default(), &changes(&want, &State::default()));
        let comments = &state.chains[&(Table::Bridge, "forward".into())];
        let bridge = serde_json::json!({"nftables": [
            {"metainfo": {"version": "1.0.6"}},
            {"table": {"family": "bridge", "name": TABLE, "handle": 1}},
            {"map": {"family": "bridge", "name": "egress", "table": TABLE, "type": "ifname",
                     "map": "verdict", "elem": [["tapu1", {"jump": {"target": "o_u1"}}]]}},
            {"map": {"family": "bridge", "name": "ingress", "table": TABLE, "type": "ifname",
                     "map": "verdict"}},
            {"set": {"family": "bridge", "name": "g4_p_default", "table": TABLE,
                     "type": "ipv4_addr", "elem": ["10.0.0.5"]}},
            {"chain": {"family": "bridge", "table": TABLE, "name": "forward"}},
            {"rule": {"family": "bridge", "table": TABLE, "chain": "forward",
                      "comment": comments[0], "expr": []}},
        ]});
        let inet = serde_json::json!({"nftables": [{"table": {"family": "inet", "name": TABLE}}]});
        let read = read(Some(&bridge), Some(&inet));
        assert!(read.tables);
        assert_eq!(
            read.egress,
            BTreeMap::from([("tapu1".into(), "o_u1".into())])
        );
        assert_eq!(read.sets, state.sets);
        assert_eq!(
            read.chains[&(Table::Bridge, "forward".into())],
            comments[..1]
        );
        assert!(!self::read(Some(&bridge), None).tables);
    }
}
