//! Addresses held on external networks by objects other than Ports: a Router's gateway
//! address and a FloatingIP's address.
//!
//! They are held exactly as a Port's are: an `IPAddress` claim named
//! [`ip_claim_name`](super::ip_claim_name)`(network uid, address)`, whose controller owner
//! is the holder. Ports, routers and floating IPs therefore share one space of claims per
//! network, and no address is ever given twice, whoever asks. The rules of
//! [`crate::ipam`] carry over: a claim is made before it is recorded, a claim held but not
//! recorded is reused on the next pass, and claims beyond the recorded address are released
//! only once it is recorded. No claim on the address status records is ever released: to
//! give an address up, the holder first writes status without it (guarded by its
//! resourceVersion), and a later pass, planning from a status that no longer names it,
//! releases the claim. Controllers release only after their status write succeeded.
//!
//! [`plan_address`] is the pure part both controllers share; [`claim_address`] makes the
//! one claim it asks for.

use std::net::IpAddr;

use ferro_api::{Error, Kind, Object, Resource, resolve::Unresolved, v1};

use super::{
    ClaimRef, Hints, IpWant, NETWORK_UID_LABEL, OWNER_UID_LABEL, SubnetRange, ip_claim_name, reason,
};
use crate::api::Api;
use ferro_runtime::{ReconcileError, condition, controller_reference, meta};

/// Condition reasons about an address on an external network.
pub mod why {
    /// The named Network is not external.
    pub const NOT_EXTERNAL: &str = "NetworkNotExternal";
}

/// How many refused candidates one allocation tolerates.
const MAX_REFUSED_CANDIDATES: usize = 64;

/// What the holder wants of an external network, as its controller resolved it.
pub struct AddressFacts<'a> {
    /// The external Network, resolved by name, or why it did not resolve.
    pub network: Result<&'a v1::Network, Unresolved>,
    /// The name the holder's spec gives the network (for messages).
    pub network_name: &'a str,
    /// The address the spec asks for; empty lets IPAM choose.
    pub requested: &'a str,
    /// The address recorded in the holder's status (a decision), if any.
    pub recorded: Option<IpAddr>,
    /// The address claims the cache says the holder owns.
    pub claims: Vec<&'a v1::IpAddress>,
}

/// The uid of the network the recorded address was claimed on, from the holder's live
/// claim of it. Pure.
///
/// Once an address is held, the holder plans on that network, not on a fresh lookup by
/// name: a Network of the same name that would resolve first (a project's own, created
/// later) must not take the decision over and strip the address.
pub fn held_network_uid<'a>(
    claims: &[&'a v1::IpAddress],
    recorded: Option<IpAddr>,
) -> Option<&'a str> {
    let recorded = recorded?;
    claims
        .iter()
        .filter(|c| live(c))
        .filter_map(|c| c.spec.as_ref())
        .find(|s| s.address.parse::<IpAddr>().ok() == Some(recorded))
        .map(|s| s.network_uid.as_str())
}

/// The network to plan on: the one the held address was claimed on while the spec still
/// names it (`held`, looked up by [`held_network_uid`]), else `resolved` by name.
pub fn planned_network<N: std::ops::Deref<Target = v1::Network>>(
    held: Option<N>,
    name: &str,
    resolved: impl FnOnce() -> Result<N, Unresolved>,
) -> Result<N, Unresolved> {
    match held {
        Some(network) if meta(&*network).name == name => Ok(network),
        _ => resolved(),
    }
}

/// How the address is obtained.
#[derive(Clone, Debug, PartialEq)]
pub enum AddressPlan {
    /// The address cannot be had now; the condition says why. `clear` says whether the
    /// recorded address (and every claim) is to be given up, because the network it came
    /// from is gone or is not external.
    Blocked {
        /// `False`, with the reason.
        condition: v1::Condition,
        /// Give up the recorded address.
        clear: bool,
    },
    /// Claim (or re-confirm) one address of this network.
    Claim {
        /// The Network's uid.
        network_uid: String,
        /// The subnet it comes from.
        range: SubnetRange,
        /// Which address.
        want: IpWant,
    },
}

/// The whole plan: the address, and claims to release.
#[derive(Clone, Debug, PartialEq)]
pub struct Addressing {
    /// How the address is obtained.
    pub address: AddressPlan,
    /// Claims the holder owns that it no longer needs.
    pub release: Vec<ClaimRef>,
}

fn blocked(reason: &str, message: String, clear: bool) -> AddressPlan {
    AddressPlan::Blocked {
        condition: condition("Ready", false, reason, message),
        clear,
    }
}

fn claim_ref(claim: &v1::IpAddress) -> ClaimRef {
    ClaimRef {
        kind: Kind::IPAddress,
        name: meta(claim).name.clone(),
        uid: meta(claim).uid.clone(),
    }
}

fn live(claim: &v1::IpAddress) -> bool {
    meta(claim).deletion_timestamp.is_none()
}

/// Plans one address on an external network. Pure.
///
/// The subnet is the one holding the requested (or recorded) address; otherwise the first
/// IPv4 subnet, else the first subnet. A recorded address stays as long as it lies in a
/// subnet of the network and matches the request: re-claiming it restores a claim deleted
/// by hand, and it never moves because a hint would have chosen otherwise. A claim on the
/// recorded address is never among those released (see the module notes).
pub fn plan_address(facts: &AddressFacts<'_>) -> Addressing {
    let mut plan = plan_unguarded(facts);
    plan.release
        .retain(|c| !names_recorded(&facts.claims, &c.name, facts.recorded));
    plan
}

/// Whether the claim called `name` is on the address status records.
fn names_recorded(claims: &[&v1::IpAddress], name: &str, recorded: Option<IpAddr>) -> bool {
    let Some(recorded) = recorded else {
        return false;
    };
    claims.iter().any(|c| {
        meta(*c).name == name
            && c.spec
                .as_ref()
                .and_then(|s| s.address.parse::<IpAddr>().ok())
                == Some(recorded)
    })
}

/// Whether a refused claim leaves status recording an address no claim holds: the planner
/// asked to claim the recorded address anew (its claim is gone) and it is another's now.
pub fn refused_recorded(want: &IpWant, recorded: Option<IpAddr>) -> bool {
    matches!(want, IpWant::Fixed(ip) if recorded == Some(*ip))
}

fn plan_unguarded(facts: &AddressFacts<'_>) -> Addressing {
    let everything = || {
        facts
            .claims
            .iter()
            .copied()
            .filter(|c| live(c))
            .map(claim_ref)
            .collect()
    };
    let network = match &facts.network {
        Ok(network) => *network,
        // Which of several networks is meant is unknown: keep what is held until it is.
        Err(u @ Unresolved::Ambiguous { .. }) => {
            return Addressing {
                address: blocked(&u.reason(), u.to_string(), false),
                release: Vec::new(),
            };
        }
        Err(u) => {
            return Addressing {
                address: blocked(&u.reason(), u.to_string(), true),
                release: everything(),
            };
        }
    };
    let spec = network.spec.clone().unwrap_or_default();
    if spec.external != Some(true) {
        return Addressing {
            address: blocked(
                why::NOT_EXTERNAL,
                format!("network {} is not external", facts.network_name),
                true,
            ),
            release: everything(),
        };
    }
    if meta(network).deletion_timestamp.is_some() {
        return Addressing {
            address: blocked(
                reason::NETWORK_DELETING,
                format!("network {} is being deleted", facts.network_name),
                false,
            ),
            release: Vec::new(),
        };
    }
    let network_uid = meta(network).uid.clone();
    let mut ranges = Vec::new();
    for subnet in &spec.subnets {
        match SubnetRange::new(subnet) {
            Ok(range) => ranges.push(range),
            Err(e) => {
                return Addressing {
                    address: blocked(reason::INVALID_SUBNET, e, false),
                    release: Vec::new(),
                };
            }
        }
    }
    // Claims on another network are from a gateway or address the spec no longer names.
    let (here, elsewhere): (Vec<&v1::IpAddress>, Vec<&v1::IpAddress>) = facts
        .claims
        .iter()
        .copied()
        .filter(|c| live(c))
        .partition(|c| {
            c.spec
                .as_ref()
                .is_some_and(|s| s.network_uid == network_uid)
        });
    let mut release: Vec<ClaimRef> = elsewhere.into_iter().map(claim_ref).collect();
    let held: Vec<IpAddr> = here
        .iter()
        .filter_map(|c| c.spec.as_ref()?.address.parse().ok())
        .collect();

    let requested = if facts.requested.is_empty() {
        None
    } else {
        match facts.requested.parse::<IpAddr>() {
            Ok(ip) => Some(ip),
            Err(_) => {
                return Addressing {
                    address: blocked(
                        reason::INVALID_FIXED_IP,
                        format!("{:?} is not an address", facts.requested),
                        false,
                    ),
                    release,
                };
            }
        }
    };
    let recorded = facts
        .recorded
        .filter(|ip| requested.is_none_or(|r| r == *ip))
        .filter(|ip| ranges.iter().any(|r| r.contains(*ip)));
    let (range, want) = if let Some(ip) = recorded.or(requested) {
        let Some(range) = ranges.iter().find(|r| r.contains(ip)) else {
            return Addressing {
                address: blocked(
                    reason::INVALID_FIXED_IP,
                    format!("{ip} is in no subnet of network {}", facts.network_name),
                    false,
                ),
                release,
            };
        };
        if range.is_reserved(ip) {
            return Addressing {
                address: blocked(
                    reason::INVALID_FIXED_IP,
                    format!(
                        "{ip} is the network, broadcast or gateway address of subnet {}",
                        range.name
                    ),
                    false,
                ),
                release,
            };
        }
        let want = if held.contains(&ip) {
            IpWant::Held(ip)
        } else {
            IpWant::Fixed(ip)
        };
        (range.clone(), want)
    } else {
        let Some(range) = ranges
            .iter()
            .find(|r| r.net.addr().is_ipv4())
            .or(ranges.first())
        else {
            return Addressing {
                address: blocked(
                    reason::SUBNET_NOT_FOUND,
                    format!("network {} has no subnet", facts.network_name),
                    false,
                ),
                release,
            };
        };
        let mut in_range: Vec<IpAddr> = held
            .iter()
            .copied()
            .filter(|ip| range.contains(*ip))
            .collect();
        in_range.sort();
        let want = match in_range.first() {
            Some(ip) => IpWant::Held(*ip),
            None => IpWant::Any,
        };
        (range.clone(), want)
    };
    // Extras on this network go once the address is recorded (see the module notes).
    if let (Some(kept), IpWant::Held(ip) | IpWant::Fixed(ip)) = (recorded, &want)
        && kept == *ip
    {
        release.extend(
            here.iter()
                .filter(|c| c.spec.as_ref().and_then(|s| s.address.parse().ok()) != Some(kept))
                .map(|c| claim_ref(c)),
        );
    }
    release.sort_by(|a, b| a.name.cmp(&b.name));
    Addressing {
        address: AddressPlan::Claim {
            network_uid,
            range,
            want,
        },
        release,
    }
}

/// The claim object of `ip` held by `holder`.
pub fn address_claim<T: Resource>(
    holder: &T,
    network_uid: &str,
    subnet: &str,
    ip: IpAddr,
) -> Object {
    let labels = [
        (OWNER_UID_LABEL.to_owned(), meta(holder).uid.clone()),
        (NETWORK_UID_LABEL.to_owned(), network_uid.to_owned()),
    ];
    Object::IPAddress(v1::IpAddress {
        metadata: Some(v1::ObjectMeta {
            name: ip_claim_name(network_uid, ip),
            labels: labels.into_iter().collect(),
            owner_references: vec![controller_reference(holder, true)],
            ..Default::default()
        }),
        spec: Some(v1::IpAddressSpec {
            network_uid: network_uid.to_owned(),
            subnet: subnet.to_owned(),
            address: ip.to_string(),
        }),
        status: None,
    })
}

/// Creates a claim; `Ok(true)` when the holder owns it now (created, or found its own).
async fn create_claim(api: &Api, claim: Object, holder_uid: &str) -> Result<bool, Error> {
    let name = claim.name().to_owned();
    match api.create(claim).await {
        Ok(_) => Ok(true),
        Err(Error::AlreadyExists { .. }) => match api.get(Kind::IPAddress, "", &name).await {
            Ok(existing) => Ok(existing
                .metadata()
                .is_some_and(|m| m.owner_references.iter().any(|r| r.uid == holder_uid))),
            // Released between the create and the read: the next pass tries again.
            Err(Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(e),
        },
        Err(e) => Err(e),
    }
}

/// Makes the claim a [`AddressPlan::Claim`] asks for. `Ok(Err(condition))` when the
/// address cannot be had: the requested one is another's, or the subnet is full.
pub async fn claim_address<T: Resource>(
    api: &Api,
    hints: &Hints,
    holder: &T,
    network_uid: &str,
    range: &SubnetRange,
    want: &IpWant,
) -> Result<Result<IpAddr, v1::Condition>, ReconcileError> {
    let uid = meta(holder).uid.clone();
    match *want {
        IpWant::Held(ip) => Ok(Ok(ip)),
        IpWant::Fixed(ip) => {
            let reserved = hints.reserve_ip(network_uid, ip);
            let claim = address_claim(holder, network_uid, &range.name, ip);
            let ours = create_claim(api, claim, &uid).await;
            if reserved {
                hints.settle_ip(network_uid, ip);
            }
            if ours? {
                Ok(Ok(ip))
            } else {
                Ok(Err(condition(
                    "Ready",
                    false,
                    reason::IP_IN_USE,
                    format!("{ip} is held by another object"),
                )))
            }
        }
        IpWant::Any => {
            for _ in 0..MAX_REFUSED_CANDIDATES {
                let Some(candidate) = hints.next_ip(network_uid, range) else {
                    return Ok(Err(condition(
                        "Ready",
                        false,
                        reason::EXHAUSTED,
                        format!("subnet {} ({}) has no free address", range.name, range.net),
                    )));
                };
                let claim = address_claim(holder, network_uid, &range.name, candidate);
                let ours = create_claim(api, claim, &uid).await;
                hints.settle_ip(network_uid, candidate);
                if ours? {
                    return Ok(Ok(candidate));
                }
            }
            Err(ReconcileError::Retry(format!(
                "subnet {}: every candidate was taken; the address cache is behind",
                range.name
            )))
        }
    }
}

/// Deletes claims, each only if it still has its uid.
pub async fn release_claims(api: &Api, claims: &[ClaimRef]) -> Result<(), Error> {
    for claim in claims {
        let request = v1::DeleteRequest {
            key: Some(v1::ObjectKey {
                kind: claim.kind.name().to_owned(),
                project: String::new(),
                name: claim.name.clone(),
            }),
            precondition_uid: claim.uid.clone(),
            ..Default::default()
        };
        match api.delete(request).await {
            Ok(_) | Err(Error::NotFound { .. } | Error::Conflict { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn external(uid: &str, external: bool) -> v1::Network {
        v1::Network {
            metadata: Some(v1::ObjectMeta {
                name: "public".into(),
                project: "admin".into(),
                uid: uid.into(),
                ..Default::default()
            }),
            spec: Some(v1::NetworkSpec {
                external: Some(external),
                subnets: vec![
                    v1::Subnet {
                        name: "v6".into(),
                        cidr: "2001:db8::/64".into(),
                        ..Default::default()
                    },
                    v1::Subnet {
                        name: "v4".into(),
                        cidr: "203.0.113.0/24".into(),
                        gateway: Some("203.0.113.1".into()),
                        allocation_pools: vec![v1::AllocationPool {
                            start: "203.0.113.10".into(),
                            end: "203.0.113.20".into(),
                        }],
                        ..Default::default()
                    },
                ],
                ..Default::default()
            }),
            status: None,
        }
    }

    fn claim(network_uid: &str, ip: &str) -> v1::IpAddress {
        let ip: IpAddr = ip.parse().unwrap();
        v1::IpAddress {
            metadata: Some(v1::ObjectMeta {
                name: ip_claim_name(network_uid, ip),
                uid: format!("c-{ip}"),
                ..Default::default()
            }),
            spec: Some(v1::IpAddressSpec {
                network_uid: network_uid.into(),
                subnet: "v4".into(),
                address: ip.to_string(),
            }),
            status: None,
        }
    }

    fn not_found() -> Unresolved {
        Unresolved::NotFound {
            kind: Kind::Network,
            name: "public".into(),
            project: "p".into(),
        }
    }

    /// `(what the plan says, claims released)` in words, for table-driven cases.
    fn outcome(plan: &Addressing) -> (String, Vec<String>) {
        let address = match &plan.address {
            AddressPlan::Blocked { condition, clear } => {
                format!("blocked {} clear={clear}", condition.reason)
            }
            AddressPlan::Claim { range, want, .. } => format!("{} {want:?}", range.name),
        };
        let released = plan.release.iter().map(|c| c.name.clone()).collect();
        (address, released)
    }

    #[test]
    fn a_held_address_keeps_its_network_whatever_else_is_named_alike() {
        let admins = external("admin-public", true);
        let mut shadow = external("own-public", false);
        shadow.metadata.as_mut().unwrap().project = "p".into();
        let held = claim("admin-public", "203.0.113.12");
        let elsewhere = claim("older", "198.51.100.7");
        let ip = |s: &str| Some(s.parse::<IpAddr>().unwrap());
        let claims = vec![&elsewhere, &held];
        assert_eq!(
            held_network_uid(&claims, ip("203.0.113.12")),
            Some("admin-public")
        );
        assert_eq!(held_network_uid(&claims, None), None, "nothing recorded");
        assert_eq!(
            held_network_uid(&[], ip("203.0.113.12")),
            None,
            "claim gone"
        );

        // The project's own `public` resolves first by name; the held one wins.
        let by_name = || Ok(&shadow);
        let chosen = planned_network(Some(&admins), "public", by_name).unwrap();
        assert_eq!(meta(chosen).uid, "admin-public");
        let facts = AddressFacts {
            network: Ok(chosen),
            network_name: "public",
            requested: "",
            recorded: ip("203.0.113.12"),
            claims: claims.clone(),
        };
        assert_eq!(
            outcome(&plan_address(&facts)).0,
            "v4 Held(203.0.113.12)",
            "the address stays"
        );
        // A spec that names another network now is resolved afresh.
        let chosen = planned_network(Some(&admins), "other", by_name).unwrap();
        assert_eq!(meta(chosen).uid, "own-public");
        // Nothing held: by name.
        let chosen = planned_network(None, "public", by_name).unwrap();
        assert_eq!(meta(chosen).uid, "own-public");
    }

    #[test]
    fn a_refused_claim_on_the_recorded_address_clears_it() {
        let ip: IpAddr = "203.0.113.12".parse().unwrap();
        let other: IpAddr = "203.0.113.13".parse().unwrap();
        assert!(refused_recorded(&IpWant::Fixed(ip), Some(ip)));
        assert!(
            !refused_recorded(&IpWant::Fixed(other), Some(ip)),
            "still held"
        );
        assert!(!refused_recorded(&IpWant::Any, Some(ip)));
        assert!(!refused_recorded(&IpWant::Fixed(ip), None));
    }

    #[test]
    fn plans() {
        let net = external("nu", true);
        let internal = external("nu", false);
        let (c11, c12, old) = (
            claim("nu", "203.0.113.11"),
            claim("nu", "203.0.113.12"),
            claim("gone", "198.51.100.7"),
        );
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        struct Case<'a> {
            what: &'a str,
            network: Result<&'a v1::Network, Unresolved>,
            requested: &'a str,
            recorded: Option<&'a str>,
            claims: Vec<&'a v1::IpAddress>,
            address: &'a str,
            release: Vec<String>,
        }
        let cases = vec![
            Case {
                what: "a new holder takes any address of the IPv4 subnet",
                network: Ok(&net),
                requested: "",
                recorded: None,
                claims: vec![],
                address: "v4 Any",
                release: vec![],
            },
            Case {
                what: "a requested address is asked for as such",
                network: Ok(&net),
                requested: "203.0.113.15",
                recorded: None,
                claims: vec![],
                address: "v4 Fixed(203.0.113.15)",
                release: vec![],
            },
            Case {
                what: "a claim made before a crash is reused, not a new one",
                network: Ok(&net),
                requested: "",
                recorded: None,
                claims: vec![&c12, &c11],
                address: "v4 Held(203.0.113.11)",
                release: vec![],
            },
            Case {
                what: "once recorded, extras are released",
                network: Ok(&net),
                requested: "",
                recorded: Some("203.0.113.12"),
                claims: vec![&c11, &c12],
                address: "v4 Held(203.0.113.12)",
                release: vec![c11.metadata.as_ref().unwrap().name.clone()],
            },
            Case {
                what: "a recorded address whose claim went is claimed again",
                network: Ok(&net),
                requested: "",
                recorded: Some("203.0.113.12"),
                claims: vec![],
                address: "v4 Fixed(203.0.113.12)",
                release: vec![],
            },
            Case {
                what: "a claim on a network no longer named stays while status records it",
                network: Ok(&net),
                requested: "",
                recorded: Some("198.51.100.7"),
                claims: vec![&old],
                address: "v4 Any",
                release: vec![],
            },
            Case {
                what: "and is released once status records the new address",
                network: Ok(&net),
                requested: "",
                recorded: Some("203.0.113.11"),
                claims: vec![&old, &c11],
                address: "v4 Held(203.0.113.11)",
                release: vec![old.metadata.as_ref().unwrap().name.clone()],
            },
            Case {
                what: "a missing network clears status but keeps the recorded claim",
                network: Err(not_found()),
                requested: "",
                recorded: Some("203.0.113.12"),
                claims: vec![&c12, &c11],
                address: "blocked NetworkNotFound clear=true",
                release: vec![c11.metadata.as_ref().unwrap().name.clone()],
            },
            Case {
                what: "and releases it once status no longer names it",
                network: Err(not_found()),
                requested: "",
                recorded: None,
                claims: vec![&c12],
                address: "blocked NetworkNotFound clear=true",
                release: vec![c12.metadata.as_ref().unwrap().name.clone()],
            },
            Case {
                what: "a network turned internal keeps the recorded claim until status drops it",
                network: Ok(&internal),
                requested: "",
                recorded: Some("203.0.113.12"),
                claims: vec![&c12],
                address: "blocked NetworkNotExternal clear=true",
                release: vec![],
            },
            Case {
                what: "a new fixed IP keeps the recorded claim until status records the new one",
                network: Ok(&net),
                requested: "203.0.113.15",
                recorded: Some("203.0.113.12"),
                claims: vec![&c12],
                address: "v4 Fixed(203.0.113.15)",
                release: vec![],
            },
            Case {
                what: "a network that is not external is not used",
                network: Ok(&internal),
                requested: "",
                recorded: None,
                claims: vec![],
                address: "blocked NetworkNotExternal clear=true",
                release: vec![],
            },
            Case {
                what: "the subnet's gateway cannot be asked for",
                network: Ok(&net),
                requested: "203.0.113.1",
                recorded: None,
                claims: vec![],
                address: "blocked InvalidFixedIp clear=false",
                release: vec![],
            },
            Case {
                what: "an address in no subnet cannot be asked for",
                network: Ok(&net),
                requested: "192.0.2.1",
                recorded: None,
                claims: vec![],
                address: "blocked InvalidFixedIp clear=false",
                release: vec![],
            },
        ];
        for case in cases {
            let facts = AddressFacts {
                network: case.network,
                network_name: "public",
                requested: case.requested,
                recorded: case.recorded.map(ip),
                claims: case.claims,
            };
            let plan = plan_address(&facts);
            assert_eq!(
                outcome(&plan),
                (case.address.to_owned(), case.release),
                "{}",
                case.what
            );
        }
    }
}
