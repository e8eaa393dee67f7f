//! Address arithmetic and allocation hints.
//!
//! [`SubnetRange`] says which addresses of a subnet may be handed out: those in its
//! allocation pools (by default the whole CIDR), never the network address, the IPv4
//! broadcast address or the gateway.
//!
//! [`Hints`] remembers which addresses, MACs and segment IDs are taken, as the claim caches
//! say, plus those a reconcile of this process is claiming right now, and proposes free
//! candidates. It is only a hint: the claim object's create-if-absent decides. A stale hint
//! costs a refused create and a next candidate, never a duplicate. Candidates come from a
//! cursor that moves past every address handed out, so a freed address is reused only
//! after the rest of the pool, and concurrent reconciles do not propose the same one.

use std::{
    collections::{HashMap, HashSet},
    hash::Hash,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::Mutex,
};

use ferro_api::v1;
use ipnet::IpNet;

/// The most candidates one search looks at: bounds the work in huge IPv6 pools, where
/// running out this way is practically impossible.
const SCAN_LIMIT: u128 = 1 << 20;

/// The VXLAN network identifiers a segment may have.
pub const VNI_MIN: u32 = 1;
/// The largest VNI (24 bits).
pub const VNI_MAX: u32 = 16_777_215;

fn to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u128::from(u32::from(v4)),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

fn from_u128(value: u128, v6: bool) -> IpAddr {
    if v6 {
        IpAddr::V6(Ipv6Addr::from(value))
    } else {
        IpAddr::V4(Ipv4Addr::from(u32::try_from(value).unwrap_or(u32::MAX)))
    }
}

/// The addresses of one subnet that IPAM may hand out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubnetRange {
    /// The subnet's name.
    pub name: String,
    /// The CIDR, truncated to its network.
    pub net: IpNet,
    /// Inclusive ranges, sorted and disjoint.
    pools: Vec<(u128, u128)>,
    /// Never handed out: network, broadcast (IPv4), gateway.
    reserved: Vec<u128>,
    total: u128,
}

impl SubnetRange {
    /// The range of a Network's subnet; an error names what does not parse.
    pub fn new(subnet: &v1::Subnet) -> Result<Self, String> {
        let net: IpNet = subnet
            .cidr
            .parse()
            .map_err(|_| format!("subnet {}: {:?} is not a CIDR", subnet.name, subnet.cidr))?;
        let net = net.trunc();
        let v6 = matches!(net, IpNet::V6(_));
        let first = to_u128(net.network());
        let last = to_u128(net.broadcast());
        let mut reserved = vec![first];
        if !v6 {
            reserved.push(last);
        }
        if let Some(gateway) = subnet.gateway.as_deref().filter(|g| !g.is_empty()) {
            let ip: IpAddr = gateway.parse().map_err(|_| {
                format!(
                    "subnet {}: gateway {gateway:?} is not an address",
                    subnet.name
                )
            })?;
            if !net.contains(&ip) {
                return Err(format!(
                    "subnet {}: gateway {ip} is outside {net}",
                    subnet.name
                ));
            }
            reserved.push(to_u128(ip));
        }
        let mut pools = Vec::new();
        if subnet.allocation_pools.is_empty() {
            pools.push((first, last));
        } else {
            for pool in &subnet.allocation_pools {
                let parse = |text: &str| -> Result<u128, String> {
                    let ip: IpAddr = text.parse().map_err(|_| {
                        format!(
                            "subnet {}: pool bound {text:?} is not an address",
                            subnet.name
                        )
                    })?;
                    if !net.contains(&ip) {
                        return Err(format!(
                            "subnet {}: pool bound {ip} is outside {net}",
                            subnet.name
                        ));
                    }
                    Ok(to_u128(ip))
                };
                let (start, end) = (parse(&pool.start)?, parse(&pool.end)?);
                if start > end {
                    return Err(format!(
                        "subnet {}: pool {}–{} ends before it starts",
                        subnet.name, pool.start, pool.end
                    ));
                }
                pools.push((start, end));
            }
        }
        pools.sort_unstable();
        let mut merged: Vec<(u128, u128)> = Vec::new();
        for (start, end) in pools {
            match merged.last_mut() {
                Some(last) if start <= last.1.saturating_add(1) => last.1 = last.1.max(end),
                _ => merged.push((start, end)),
            }
        }
        reserved.sort_unstable();
        reserved.dedup();
        let total = merged
            .iter()
            .map(|(s, e)| e - s + 1)
            .fold(0u128, u128::saturating_add);
        Ok(SubnetRange {
            name: subnet.name.clone(),
            net,
            pools: merged,
            reserved,
            total,
        })
    }

    /// Whether the address lies in the subnet's CIDR.
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.net.contains(&ip)
    }

    /// Whether the address is the network, broadcast or gateway address.
    pub fn is_reserved(&self, ip: IpAddr) -> bool {
        self.reserved.binary_search(&to_u128(ip)).is_ok()
    }

    /// How many addresses the pools hold (reserved ones included).
    pub fn size(&self) -> u128 {
        self.total
    }

    /// The `offset`-th address of the pools, counting across them in order.
    pub fn nth(&self, mut offset: u128) -> Option<IpAddr> {
        let v6 = matches!(self.net, IpNet::V6(_));
        for (start, end) in &self.pools {
            let len = end - start + 1;
            if offset < len {
                return Some(from_u128(start + offset, v6));
            }
            offset -= len;
        }
        None
    }

    /// The cursor key of this range: a changed CIDR or name starts a fresh cursor.
    fn cursor_key(&self) -> String {
        format!("{}/{}", self.name, self.net)
    }
}

/// Taken and in-flight values of one space (a network's addresses, all MACs, all VNIs).
#[derive(Debug)]
struct Space<K> {
    taken: HashSet<K>,
    pending: HashSet<K>,
    cursors: HashMap<String, u128>,
}

impl<K> Default for Space<K> {
    fn default() -> Self {
        Space {
            taken: HashSet::new(),
            pending: HashSet::new(),
            cursors: HashMap::new(),
        }
    }
}

impl<K: Eq + Hash + Copy> Space<K> {
    fn is_free(&self, value: &K) -> bool {
        !self.taken.contains(value) && !self.pending.contains(value)
    }
}

/// A MAC address as six octets.
pub type Mac = [u8; 6];

/// Formats a MAC as `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: &Mac) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Parses `aa:bb:cc:dd:ee:ff` (any case).
pub fn parse_mac(text: &str) -> Option<Mac> {
    let parts: Vec<&str> = text.split(':').collect();
    if parts.len() != 6 {
        return None;
    }
    let mut mac = [0u8; 6];
    for (i, part) in parts.iter().enumerate() {
        if part.len() != 2 {
            return None;
        }
        mac[i] = u8::from_str_radix(part, 16).ok()?;
    }
    Some(mac)
}

/// The `attempt`-th MAC candidate for a port: 46 pseudo-random bits from the port's uid,
/// with the locally-administered bit set and the multicast bit clear.
pub fn mac_candidate(seed: &str, attempt: u32) -> Mac {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in seed.bytes().chain(attempt.to_le_bytes()) {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    // FNV's low bits mix poorly on short inputs; fold the high half in.
    hash ^= hash >> 29;
    let bytes = hash.to_be_bytes();
    let mut mac = [bytes[2], bytes[3], bytes[4], bytes[5], bytes[6], bytes[7]];
    mac[0] = (mac[0] & 0xfc) | 0x02;
    mac
}

/// How many MAC candidates a search tries: with 46 random bits, more misses mean the hint
/// is badly wrong, and a retry after the cache catches up is the cure.
const MAC_ATTEMPTS: u32 = 64;

/// Allocation hints of one controller process. Cheap to share behind an `Arc`.
#[derive(Debug, Default)]
pub struct Hints {
    ips: Mutex<HashMap<String, Space<IpAddr>>>,
    macs: Mutex<Space<Mac>>,
    vnis: Mutex<Space<u32>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Hints {
    /// Empty hints.
    pub fn new() -> Self {
        Self::default()
    }

    /// The claim cache says an address of a network appeared (`present`) or went.
    pub fn observe_ip(&self, network_uid: &str, ip: IpAddr, present: bool) {
        let mut ips = lock(&self.ips);
        let space = ips.entry(network_uid.to_owned()).or_default();
        if present {
            space.taken.insert(ip);
        } else {
            space.taken.remove(&ip);
        }
    }

    /// Proposes a free address of the range and marks it in flight; `None` when the pools
    /// hold no free address.
    pub fn next_ip(&self, network_uid: &str, range: &SubnetRange) -> Option<IpAddr> {
        let mut ips = lock(&self.ips);
        let space = ips.entry(network_uid.to_owned()).or_default();
        let total = range.size();
        if total == 0 {
            return None;
        }
        let cursor = space.cursors.get(&range.cursor_key()).copied().unwrap_or(0) % total;
        for step in 0..total.min(SCAN_LIMIT) {
            let offset = (cursor + step) % total;
            let Some(ip) = range.nth(offset) else {
                continue;
            };
            if range.is_reserved(ip) || !space.is_free(&ip) {
                continue;
            }
            space
                .cursors
                .insert(range.cursor_key(), (offset + 1) % total);
            space.pending.insert(ip);
            return Some(ip);
        }
        None
    }

    /// Marks a specific address in flight (a requested fixed IP); `false` if the hint
    /// believes it taken.
    pub fn reserve_ip(&self, network_uid: &str, ip: IpAddr) -> bool {
        let mut ips = lock(&self.ips);
        let space = ips.entry(network_uid.to_owned()).or_default();
        if !space.is_free(&ip) {
            return false;
        }
        space.pending.insert(ip);
        true
    }

    /// The claim attempt for an address ended; the cache will say whether it is taken.
    pub fn settle_ip(&self, network_uid: &str, ip: IpAddr) {
        if let Some(space) = lock(&self.ips).get_mut(network_uid) {
            space.pending.remove(&ip);
        }
    }

    /// Whether the hint believes the address taken (not counting in-flight claims).
    pub fn ip_taken(&self, network_uid: &str, ip: IpAddr) -> bool {
        lock(&self.ips)
            .get(network_uid)
            .is_some_and(|s| s.taken.contains(&ip))
    }

    /// The claim cache says a MAC appeared or went.
    pub fn observe_mac(&self, mac: Mac, present: bool) {
        let mut macs = lock(&self.macs);
        if present {
            macs.taken.insert(mac);
        } else {
            macs.taken.remove(&mac);
        }
    }

    /// Proposes a free MAC for the port with this uid and marks it in flight.
    pub fn next_mac(&self, seed: &str) -> Option<Mac> {
        let mut macs = lock(&self.macs);
        for attempt in 0..MAC_ATTEMPTS {
            let mac = mac_candidate(seed, attempt);
            if macs.is_free(&mac) {
                macs.pending.insert(mac);
                return Some(mac);
            }
        }
        None
    }

    /// The claim attempt for a MAC ended.
    pub fn settle_mac(&self, mac: Mac) {
        lock(&self.macs).pending.remove(&mac);
    }

    /// The claim cache says a segment ID appeared or went.
    pub fn observe_vni(&self, vni: u32, present: bool) {
        let mut vnis = lock(&self.vnis);
        if present {
            vnis.taken.insert(vni);
        } else {
            vnis.taken.remove(&vni);
        }
    }

    /// Proposes a free VNI and marks it in flight.
    pub fn next_vni(&self) -> Option<u32> {
        let mut vnis = lock(&self.vnis);
        let total = u128::from(VNI_MAX - VNI_MIN + 1);
        let cursor = vnis.cursors.get("").copied().unwrap_or(0);
        for step in 0..total {
            let offset = (cursor + step) % total;
            let vni = VNI_MIN + u32::try_from(offset).expect("offsets stay below 2^24");
            if vnis.is_free(&vni) {
                vnis.cursors.insert(String::new(), (offset + 1) % total);
                vnis.pending.insert(vni);
                return Some(vni);
            }
        }
        None
    }

    /// The claim attempt for a VNI ended.
    pub fn settle_vni(&self, vni: u32) {
        lock(&self.vnis).pending.remove(&vni);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subnet(cidr: &str, gateway: Option<&str>, pools: &[(&str, &str)]) -> v1::Subnet {
        v1::Subnet {
            name: "a".into(),
            cidr: cidr.into(),
            gateway: gateway.map(str::to_owned),
            allocation_pools: pools
                .iter()
                .map(|(s, e)| v1::AllocationPool {
                    start: (*s).into(),
                    end: (*e).into(),
                })
                .collect(),
            ..Default::default()
        }
    }

    fn all_free(range: &SubnetRange) -> Vec<String> {
        let hints = Hints::new();
        std::iter::from_fn(|| hints.next_ip("n", range))
            .map(|ip| ip.to_string())
            .collect()
    }

    #[test]
    fn ranges_hand_out_everything_but_reserved_addresses() {
        struct Case {
            what: &'static str,
            subnet: v1::Subnet,
            expect: Vec<&'static str>,
        }
        let cases = [
            Case {
                what: "a /29 less network, broadcast and gateway",
                subnet: subnet("10.0.0.0/29", Some("10.0.0.1"), &[]),
                expect: vec!["10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.5", "10.0.0.6"],
            },
            Case {
                what: "a gateway in the middle is skipped",
                subnet: subnet("10.0.0.0/29", Some("10.0.0.4"), &[]),
                expect: vec!["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.5", "10.0.0.6"],
            },
            Case {
                what: "no gateway",
                subnet: subnet("10.0.0.8/30", Some(""), &[]),
                expect: vec!["10.0.0.9", "10.0.0.10"],
            },
            Case {
                what: "pools, overlapping and out of order, merged",
                subnet: subnet(
                    "10.1.0.0/24",
                    Some("10.1.0.1"),
                    &[
                        ("10.1.0.50", "10.1.0.51"),
                        ("10.1.0.1", "10.1.0.3"),
                        ("10.1.0.2", "10.1.0.4"),
                    ],
                ),
                expect: vec!["10.1.0.2", "10.1.0.3", "10.1.0.4", "10.1.0.50", "10.1.0.51"],
            },
            Case {
                what: "IPv6 skips the subnet-router anycast address, keeps the last",
                subnet: subnet("fd00::/126", Some("fd00::1"), &[]),
                expect: vec!["fd00::2", "fd00::3"],
            },
            Case {
                what: "a CIDR with host bits is truncated",
                subnet: subnet("10.0.0.5/30", Some("10.0.0.5"), &[]),
                expect: vec!["10.0.0.6"],
            },
        ];
        for case in cases {
            let range = SubnetRange::new(&case.subnet).unwrap();
            assert_eq!(all_free(&range), case.expect, "{}", case.what);
        }
    }

    #[test]
    fn bad_subnets_are_named() {
        let cases = [
            (subnet("nope", None, &[]), "not a CIDR"),
            (subnet("10.0.0.0/24", Some("10.9.0.1"), &[]), "outside"),
            (
                subnet("10.0.0.0/24", None, &[("10.0.0.9", "10.0.0.2")]),
                "ends before it starts",
            ),
            (
                subnet("10.0.0.0/24", None, &[("10.0.1.9", "10.0.1.20")]),
                "outside",
            ),
        ];
        for (s, expect) in cases {
            let err = SubnetRange::new(&s).unwrap_err();
            assert!(err.contains(expect), "{err}");
        }
    }

    #[test]
    fn the_cursor_moves_on_and_freed_addresses_come_back_last() {
        let range = SubnetRange::new(&subnet("10.0.0.0/29", Some("10.0.0.1"), &[])).unwrap();
        let hints = Hints::new();
        let a = hints.next_ip("n", &range).unwrap();
        let b = hints.next_ip("n", &range).unwrap();
        assert_ne!(a, b, "an in-flight address is not proposed twice");
        hints.settle_ip("n", a);
        hints.observe_ip("n", a, true);
        hints.settle_ip("n", b);
        hints.observe_ip("n", b, true);
        hints.observe_ip("n", a, false);
        let next: Vec<IpAddr> = std::iter::from_fn(|| hints.next_ip("n", &range)).collect();
        assert_eq!(
            next.last(),
            Some(&a),
            "the freed address is reused after the rest"
        );
        assert!(!next.contains(&b));
    }

    #[test]
    fn hints_of_networks_are_separate() {
        let range = SubnetRange::new(&subnet("10.0.0.0/30", Some(""), &[])).unwrap();
        let hints = Hints::new();
        hints.observe_ip("n1", "10.0.0.1".parse().unwrap(), true);
        assert_eq!(
            hints.next_ip("n1", &range),
            Some("10.0.0.2".parse().unwrap())
        );
        assert_eq!(
            hints.next_ip("n2", &range),
            Some("10.0.0.1".parse().unwrap())
        );
    }

    #[test]
    fn macs_are_locally_administered_unicast_and_distinct() {
        let hints = Hints::new();
        let mut seen = HashSet::new();
        for i in 0..2000 {
            let mac = hints.next_mac(&format!("uid-{i}")).unwrap();
            assert_eq!(mac[0] & 0x03, 0x02, "{}", format_mac(&mac));
            assert!(seen.insert(mac));
        }
        let m = mac_candidate("x", 0);
        assert_eq!(parse_mac(&format_mac(&m)), Some(m));
        assert_eq!(
            parse_mac("FA:16:3E:00:00:01"),
            Some([0xfa, 0x16, 0x3e, 0, 0, 1])
        );
        assert_eq!(parse_mac("fa:16:3e:00:00"), None);
    }

    #[test]
    fn a_taken_mac_is_not_proposed() {
        let hints = Hints::new();
        let first = mac_candidate("p", 0);
        hints.observe_mac(first, true);
        assert_eq!(hints.next_mac("p"), Some(mac_candidate("p", 1)));
    }

    #[test]
    fn vnis_start_at_one_and_skip_taken_ones() {
        let hints = Hints::new();
        hints.observe_vni(2, true);
        assert_eq!(hints.next_vni(), Some(1));
        assert_eq!(hints.next_vni(), Some(3));
        hints.settle_vni(1);
        hints.settle_vni(3);
    }
}
