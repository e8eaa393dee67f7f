//! IPAM: gives each Port a MAC and one address per requested subnet.
//!
//! # How an address is held
//!
//! An address is held by a claim object named by its value — `IPAddress`
//! `<network-uid>-10-0-0-5`, `MACAddress` `fa-16-3e-00-00-01` — whose controller owner
//! reference is the Port. Creating the claim *is* the allocation: the apiserver's
//! create-if-absent refuses a second holder whoever asks, so no two Ports can ever hold one
//! value, even under two controllers that both believe they lead. The in-memory [`Hints`]
//! only propose candidates; a wrong hint costs one refused create.
//!
//! # The steps, and a crash between any two
//!
//! 1. Plan (pure, [`plan`]): from the Port, its Network and the claims the cache says the
//!    Port owns, decide what it still needs. Claims it already owns are reused, which is
//!    what makes a restart between claiming and recording harmless: the next reconcile
//!    finds them (in the cache, or — when the cache lags — because the create answers
//!    `AlreadyExists` and the existing claim turns out to be the Port's own).
//! 2. Claim each missing value (one create each).
//! 3. Record the decision: one status write of `addresses`, `mac`, `networkUid`,
//!    `observedGeneration` and `Ready`, guarded by the resourceVersion the plan was made
//!    from. Decisions are written once: if another writer recorded first, the guard fails,
//!    the fresh Port shows the decision, and this attempt's claims become extras.
//! 4. Once a Port's decision is recorded, claims it owns beyond it are released. That is
//!    safe only because of step 3's guard: no writer can record them any more.
//!
//! A claim whose Port is gone — deleted between steps, or deleted after — is removed by the
//! garbage collector through its owner reference, so the Port needs no finalizer and a
//! Port costs three writes: MAC claim, address claim, status.
//!
//! Decisions are final: changing `fixedIps` after the Port was addressed does not move it.

pub mod allocator;
pub mod external;
#[cfg(test)]
mod model;

use std::{
    collections::{HashMap, HashSet},
    future::Future,
    net::IpAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use ferro_api::{
    Error, Kind, Object, owners,
    resolve::{Referable, Unresolved, resolve},
    v1,
};

use crate::api::Api;
pub use allocator::{Hints, SubnetRange, format_mac, parse_mac};
use ferro_runtime::{
    Action, Caches, Controller, ObjectRef, Reconcile, ReconcileError, Store, condition,
    condition_holds, controller::Settings, controller_reference, events::Recorder, is_deleting,
    meta, metrics::Metrics, reflector::OWNER_UID,
};

/// The label on every claim naming its holder's uid, for `ferro get ipaddresses -l …`.
pub const OWNER_UID_LABEL: &str = "ferro.io/owner-uid";
/// The label on address claims naming the Network's uid.
pub const NETWORK_UID_LABEL: &str = "ferro.io/network-uid";

/// The status fields IPAM's decision writes.
const DECISION_FIELDS: &[&str] = &["addresses", "mac", "networkUid", "observedGeneration"];

/// How many refused candidates one allocation tolerates before concluding that the cache is
/// far behind and retrying later.
const MAX_REFUSED_CANDIDATES: usize = 64;

/// How often a blocked Port (exhausted subnet, address in use) is looked at again even if
/// no claim of its network goes away.
const BLOCKED_RECHECK: Duration = Duration::from_secs(60);

/// Condition reasons IPAM writes on `Ready`.
pub mod reason {
    /// Addresses and MAC are allocated and recorded.
    pub const ALLOCATED: &str = "Allocated";
    /// The Port's Network does not exist (yet).
    pub const NETWORK_NOT_FOUND: &str = "NetworkNotFound";
    /// The Port's Network names several shared Networks and none in its project.
    pub const NETWORK_AMBIGUOUS: &str = "NetworkAmbiguous";
    /// The Port's Network is being deleted.
    pub const NETWORK_DELETING: &str = "NetworkDeleting";
    /// A subnet of the Network cannot be used.
    pub const INVALID_SUBNET: &str = "InvalidSubnet";
    /// A fixed IP names no subnet of the Network.
    pub const SUBNET_NOT_FOUND: &str = "SubnetNotFound";
    /// A fixed IP lies outside its subnet or is a reserved address.
    pub const INVALID_FIXED_IP: &str = "InvalidFixedIp";
    /// A requested fixed IP is held by another Port.
    pub const IP_IN_USE: &str = "IpAddressInUse";
    /// The requested MAC is held by another Port.
    pub const MAC_IN_USE: &str = "MacAddressInUse";
    /// A subnet has no free address left.
    pub const EXHAUSTED: &str = "IpAddressExhausted";
}

/// The condition type naming an exhausted subnet, written when the status owner table
/// grants it to IPAM (`Ready` always carries the reason as well).
pub const EXHAUSTED_CONDITION: &str = "IpAddressExhausted";

/// The name of the claim of `ip` on the Network with this uid: the address with `.` and
/// `:` as `-` (IPv6 fully expanded, so the name never ends in `-`).
pub fn ip_claim_name(network_uid: &str, ip: IpAddr) -> String {
    let text = match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => v6
            .segments()
            .iter()
            .map(|s| format!("{s:04x}"))
            .collect::<Vec<_>>()
            .join(":"),
    };
    format!("{network_uid}-{}", text.replace(['.', ':'], "-"))
}

/// The name of the claim of a MAC: `fa-16-3e-00-00-01`.
pub fn mac_claim_name(mac: &str) -> String {
    mac.to_ascii_lowercase().replace(':', "-")
}

fn port_uid(port: &v1::Port) -> &str {
    &meta(port).uid
}

fn mac_claim(port: &v1::Port, mac: &str) -> Object {
    Object::MACAddress(v1::MacAddress {
        metadata: Some(v1::ObjectMeta {
            name: mac_claim_name(mac),
            labels: [(OWNER_UID_LABEL.to_owned(), port_uid(port).to_owned())]
                .into_iter()
                .collect(),
            owner_references: vec![controller_reference(port, true)],
            ..Default::default()
        }),
        spec: Some(v1::MacAddressSpec {
            address: mac.to_ascii_lowercase(),
        }),
        status: None,
    })
}

// ---------------------------------------------------------------------------------------
// Planning.

/// What the planner knows about one Port.
pub struct PortFacts<'a> {
    /// The Port, as cached.
    pub port: &'a v1::Port,
    /// Its Network, resolved by name (own project first, then the one shared one), or
    /// why it did not resolve.
    pub network: Result<&'a v1::Network, Unresolved>,
    /// The address claims the cache says the Port owns.
    pub ip_claims: Vec<&'a v1::IpAddress>,
    /// The MAC claims the cache says the Port owns.
    pub mac_claims: Vec<&'a v1::MacAddress>,
    /// Whether IPAM may write the `IpAddressExhausted` condition type.
    pub exhausted_condition: bool,
}

/// How the Port's MAC is obtained.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MacWant {
    /// It already owns a claim on this MAC.
    Held(String),
    /// The spec asks for this MAC.
    Requested(String),
    /// Any free locally administered MAC.
    Any,
}

/// How one address is obtained.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IpWant {
    /// It already owns a claim on this address.
    Held(IpAddr),
    /// The spec asks for this address.
    Fixed(IpAddr),
    /// Any free address of the subnet.
    Any,
}

/// One address the Port needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IpNeed {
    /// The subnet's range.
    pub range: SubnetRange,
    /// How to get it.
    pub want: IpWant,
}

/// What an undecided Port needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Allocation {
    /// The Network's uid.
    pub network_uid: String,
    /// The MAC.
    pub mac: MacWant,
    /// The addresses, in the order of the spec (or of the Network's subnets).
    pub ips: Vec<IpNeed>,
}

/// A claim to delete, by kind, name and uid.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClaimRef {
    /// IPAddress or MACAddress.
    pub kind: Kind,
    /// Its name.
    pub name: String,
    /// Its uid (a precondition of the delete).
    pub uid: String,
}

/// What a decided Port still needs.
#[derive(Clone, Debug, PartialEq)]
pub struct Tidy {
    /// Claims the Port owns beyond its recorded decision.
    pub release: Vec<ClaimRef>,
    /// Claims of the recorded decision missing from the cache: check, restore if absent.
    pub verify: Vec<Object>,
    /// Conditions to refresh (with `observedGeneration`), when they do not hold.
    pub refresh: Option<Vec<v1::Condition>>,
}

/// The plan for one Port.
#[derive(Clone, Debug, PartialEq)]
pub enum PortPlan {
    /// Nothing to do.
    Nothing,
    /// Say why the Port cannot be addressed (conditions not already holding).
    Report(Vec<v1::Condition>),
    /// Claim what is missing and record the decision.
    Allocate(Allocation),
    /// The decision is recorded; tidy around it.
    Tidy(Tidy),
}

/// Whether the Port's addresses have been decided and recorded.
pub fn is_decided(port: &v1::Port) -> bool {
    port.status
        .as_ref()
        .is_some_and(|s| !s.mac.is_empty() && !s.network_uid.is_empty())
}

fn generation(port: &v1::Port) -> i64 {
    meta(port).generation
}

fn existing_conditions(port: &v1::Port) -> &[v1::Condition] {
    port.status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default()
}

fn has_condition(port: &v1::Port, kind: &str) -> bool {
    existing_conditions(port).iter().any(|c| c.r#type == kind)
}

/// The conditions of a Port that cannot be addressed, for `reason`.
fn blocked_conditions(facts: &PortFacts<'_>, reason: &str, message: String) -> Vec<v1::Condition> {
    let mut conditions = vec![condition("Ready", false, reason, message.clone())];
    if facts.exhausted_condition {
        let exhausted = reason == reason::EXHAUSTED;
        if exhausted || has_condition(facts.port, EXHAUSTED_CONDITION) {
            let why = if exhausted {
                reason::EXHAUSTED
            } else {
                "Other"
            };
            conditions.push(condition(
                EXHAUSTED_CONDITION,
                exhausted,
                why,
                if exhausted { message } else { String::new() },
            ));
        }
    }
    conditions
}

/// The conditions of an addressed Port.
fn ready_conditions(facts: &PortFacts<'_>) -> Vec<v1::Condition> {
    let mut conditions = vec![condition(
        "Ready",
        true,
        reason::ALLOCATED,
        "addresses and MAC allocated",
    )];
    if facts.exhausted_condition && has_condition(facts.port, EXHAUSTED_CONDITION) {
        conditions.push(condition(EXHAUSTED_CONDITION, false, reason::ALLOCATED, ""));
    }
    conditions
}

fn conditions_hold(port: &v1::Port, conditions: &[v1::Condition]) -> bool {
    let generation = generation(port);
    let observed = port
        .status
        .as_ref()
        .map(|s| s.observed_generation)
        .unwrap_or_default();
    observed == generation
        && conditions
            .iter()
            .all(|c| condition_holds(existing_conditions(port), c, generation))
}

fn report(facts: &PortFacts<'_>, reason: &str, message: String) -> PortPlan {
    let conditions = blocked_conditions(facts, reason, message);
    if conditions_hold(facts.port, &conditions) {
        PortPlan::Nothing
    } else {
        PortPlan::Report(conditions)
    }
}

/// Plans one Port. Pure: the same facts give the same plan.
pub fn plan(facts: &PortFacts<'_>) -> PortPlan {
    let port = facts.port;
    if is_deleting(port) {
        // Its addresses stay until it is gone; the garbage collector frees them then.
        return PortPlan::Nothing;
    }
    if is_decided(port) {
        return plan_decided(facts);
    }
    let spec = port.spec.clone().unwrap_or_default();
    let network = match &facts.network {
        Ok(network) => *network,
        Err(unresolved) => return report(facts, &unresolved.reason(), unresolved.to_string()),
    };
    let network_meta = meta(network);
    if network_meta.deletion_timestamp.is_some() {
        return report(
            facts,
            reason::NETWORK_DELETING,
            format!("network {} is being deleted", spec.network),
        );
    }
    let subnets = network.spec.clone().unwrap_or_default().subnets;
    let mut ranges = Vec::new();
    for subnet in &subnets {
        match SubnetRange::new(subnet) {
            Ok(range) => ranges.push(range),
            Err(e) => return report(facts, reason::INVALID_SUBNET, e),
        }
    }

    // What the spec asks for, one need per address.
    let mut needs: Vec<IpNeed> = Vec::new();
    if spec.fixed_ips.is_empty() {
        needs.extend(ranges.iter().map(|r| IpNeed {
            range: r.clone(),
            want: IpWant::Any,
        }));
    }
    for fixed in &spec.fixed_ips {
        let ip = if fixed.ip_address.is_empty() {
            None
        } else {
            match fixed.ip_address.parse::<IpAddr>() {
                Ok(ip) => Some(ip),
                Err(_) => {
                    return report(
                        facts,
                        reason::INVALID_FIXED_IP,
                        format!("{:?} is not an address", fixed.ip_address),
                    );
                }
            }
        };
        let range = if fixed.subnet.is_empty() {
            let ip = ip.expect("validation requires a subnet or an address");
            match ranges.iter().find(|r| r.contains(ip)) {
                Some(r) => r,
                None => {
                    return report(
                        facts,
                        reason::INVALID_FIXED_IP,
                        format!("{ip} is in no subnet of network {}", spec.network),
                    );
                }
            }
        } else {
            match ranges.iter().find(|r| r.name == fixed.subnet) {
                Some(r) => r,
                None => {
                    return report(
                        facts,
                        reason::SUBNET_NOT_FOUND,
                        format!("network {} has no subnet {}", spec.network, fixed.subnet),
                    );
                }
            }
        };
        let want = match ip {
            None => IpWant::Any,
            Some(ip) if !range.contains(ip) => {
                return report(
                    facts,
                    reason::INVALID_FIXED_IP,
                    format!("{ip} is outside subnet {} ({})", range.name, range.net),
                );
            }
            Some(ip) if range.is_reserved(ip) => {
                return report(
                    facts,
                    reason::INVALID_FIXED_IP,
                    format!(
                        "{ip} is the network, broadcast or gateway address of subnet {}",
                        range.name
                    ),
                );
            }
            Some(ip) => IpWant::Fixed(ip),
        };
        needs.push(IpNeed {
            range: range.clone(),
            want,
        });
    }

    // Reuse what the Port already holds on this Network: a fixed address only itself, any
    // other need any held address of its subnet not used by another need.
    let held: Vec<(String, IpAddr)> = facts
        .ip_claims
        .iter()
        .filter_map(|c| c.spec.as_ref())
        .filter(|s| s.network_uid == network_meta.uid)
        .filter_map(|s| Some((s.subnet.clone(), s.address.parse::<IpAddr>().ok()?)))
        .collect();
    let mut used: HashSet<IpAddr> = HashSet::new();
    for need in &mut needs {
        if let IpWant::Fixed(ip) = need.want
            && held.iter().any(|(_, h)| *h == ip)
        {
            used.insert(ip);
            need.want = IpWant::Held(ip);
        }
    }
    let mut sorted_held = held.clone();
    sorted_held.sort();
    for need in &mut needs {
        if need.want != IpWant::Any {
            continue;
        }
        if let Some((_, ip)) = sorted_held
            .iter()
            .find(|(subnet, ip)| *subnet == need.range.name && !used.contains(ip))
        {
            used.insert(*ip);
            need.want = IpWant::Held(*ip);
        }
    }

    let mut held_macs: Vec<String> = facts
        .mac_claims
        .iter()
        .filter_map(|c| c.spec.as_ref())
        .map(|s| s.address.to_ascii_lowercase())
        .collect();
    held_macs.sort();
    let requested = spec.mac_address.to_ascii_lowercase();
    let mac = if !requested.is_empty() {
        if held_macs.contains(&requested) {
            MacWant::Held(requested)
        } else {
            MacWant::Requested(requested)
        }
    } else if let Some(first) = held_macs.into_iter().next() {
        MacWant::Held(first)
    } else {
        MacWant::Any
    };
    PortPlan::Allocate(Allocation {
        network_uid: network_meta.uid.clone(),
        mac,
        ips: needs,
    })
}

fn plan_decided(facts: &PortFacts<'_>) -> PortPlan {
    let port = facts.port;
    let status = port.status.clone().unwrap_or_default();
    let keep_ips: HashMap<String, &v1::PortAddress> = status
        .addresses
        .iter()
        .filter_map(|a| Some((ip_claim_name(&status.network_uid, a.ip.parse().ok()?), a)))
        .collect();
    let keep_mac = mac_claim_name(&status.mac);
    let mut release = Vec::new();
    let mut seen = HashSet::new();
    for claim in &facts.ip_claims {
        let m = meta(*claim);
        seen.insert(m.name.clone());
        if !keep_ips.contains_key(&m.name) && m.deletion_timestamp.is_none() {
            release.push(ClaimRef {
                kind: Kind::IPAddress,
                name: m.name.clone(),
                uid: m.uid.clone(),
            });
        }
    }
    let mut mac_seen = false;
    for claim in &facts.mac_claims {
        let m = meta(*claim);
        if m.name == keep_mac {
            mac_seen = true;
        } else if m.deletion_timestamp.is_none() {
            release.push(ClaimRef {
                kind: Kind::MACAddress,
                name: m.name.clone(),
                uid: m.uid.clone(),
            });
        }
    }
    let mut verify: Vec<Object> = Vec::new();
    let mut missing: Vec<(&String, &&v1::PortAddress)> = keep_ips
        .iter()
        .filter(|(name, _)| !seen.contains(*name))
        .collect();
    missing.sort_by(|a, b| a.0.cmp(b.0));
    for (_, address) in missing {
        if let Ok(ip) = address.ip.parse() {
            verify.push(external::address_claim(
                port,
                &status.network_uid,
                &address.subnet,
                ip,
            ));
        }
    }
    if !mac_seen {
        verify.push(mac_claim(port, &status.mac));
    }
    let conditions = ready_conditions(facts);
    let refresh = (!conditions_hold(port, &conditions)).then_some(conditions);
    if release.is_empty() && verify.is_empty() && refresh.is_none() {
        PortPlan::Nothing
    } else {
        PortPlan::Tidy(Tidy {
            release,
            verify,
            refresh,
        })
    }
}

// ---------------------------------------------------------------------------------------
// Execution.

/// The API calls IPAM makes, so that the allocation steps can run against a model of the
/// apiserver in tests.
pub trait IpamBackend: Send + Sync {
    /// Creates a claim; `AlreadyExists` when the value is held.
    fn create_claim(&self, claim: Object) -> impl Future<Output = Result<(), Error>> + Send;
    /// The uid of the controller owner of a claim; `None` when the claim does not exist.
    fn claim_holder(
        &self,
        kind: Kind,
        name: &str,
    ) -> impl Future<Output = Result<Option<String>, Error>> + Send;
    /// Deletes a claim if it still has this uid.
    fn release_claim(&self, claim: &ClaimRef) -> impl Future<Output = Result<(), Error>> + Send;
    /// Writes Port status fields and conditions as IPAM, guarded by `resource_version`
    /// when non-zero.
    fn write_status(
        &self,
        port: &v1::Port,
        fields: &[&str],
        status: v1::PortStatus,
        conditions: Vec<v1::Condition>,
        resource_version: i64,
    ) -> impl Future<Output = Result<(), Error>> + Send;
    /// Reads a Port; `None` when it does not exist.
    fn get_port(
        &self,
        project: &str,
        name: &str,
    ) -> impl Future<Output = Result<Option<v1::Port>, Error>> + Send;
}

/// What running a plan did.
#[derive(Clone, Debug, PartialEq)]
pub enum Executed {
    /// Nothing needed doing.
    Unchanged,
    /// Addresses and MAC claimed and recorded.
    Recorded,
    /// Another writer recorded the Port's decision first; this attempt's claims are
    /// released on the next pass.
    Superseded,
    /// The Port disappeared.
    Gone,
    /// Claims released or restored, or conditions refreshed.
    Tidied,
    /// The Port cannot be addressed now; `Ready` says why.
    Blocked {
        /// The `Ready` condition.
        condition: v1::Condition,
        /// Whether it was written now (it did not hold already).
        written: bool,
        /// The Network whose freed addresses may unblock the Port.
        waits_on: Option<String>,
    },
}

enum Claimed {
    Ours,
    Theirs,
}

async fn claim<B: IpamBackend>(
    backend: &B,
    object: Object,
    owner_uid: &str,
) -> Result<Claimed, Error> {
    let (kind, name) = (object.kind(), object.name().to_owned());
    match backend.create_claim(object).await {
        Ok(()) => Ok(Claimed::Ours),
        Err(Error::AlreadyExists { .. }) => match backend.claim_holder(kind, &name).await? {
            // Ours already: claimed by an earlier attempt that never recorded it.
            Some(uid) if uid == owner_uid => Ok(Claimed::Ours),
            _ => Ok(Claimed::Theirs),
        },
        Err(e) => Err(e),
    }
}

/// Values this reconcile is claiming; handed back to the hints however the reconcile ends,
/// including by being dropped mid-way.
struct InFlight<'a> {
    hints: &'a Hints,
    network_uid: String,
    ips: Vec<IpAddr>,
    macs: Vec<allocator::Mac>,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        for ip in &self.ips {
            self.hints.settle_ip(&self.network_uid, *ip);
        }
        for mac in &self.macs {
            self.hints.settle_mac(*mac);
        }
    }
}

/// Plans one Port and carries the plan out.
pub async fn run_port<B: IpamBackend>(
    backend: &B,
    hints: &Hints,
    facts: &PortFacts<'_>,
) -> Result<Executed, ReconcileError> {
    match plan(facts) {
        PortPlan::Nothing => Ok(Executed::Unchanged),
        PortPlan::Report(conditions) => {
            let ready = conditions[0].clone();
            write_conditions(backend, facts.port, conditions).await?;
            Ok(Executed::Blocked {
                condition: ready,
                written: true,
                waits_on: None,
            })
        }
        PortPlan::Tidy(tidy) => self::tidy(backend, facts.port, tidy).await,
        PortPlan::Allocate(allocation) => match allocate(backend, hints, facts, &allocation).await?
        {
            Executed::Blocked {
                condition,
                waits_on,
                ..
            } => {
                let conditions =
                    blocked_conditions(facts, &condition.reason, condition.message.clone());
                let written = !conditions_hold(facts.port, &conditions);
                if written {
                    write_conditions(backend, facts.port, conditions).await?;
                }
                Ok(Executed::Blocked {
                    condition,
                    written,
                    waits_on,
                })
            }
            other => Ok(other),
        },
    }
}

async fn write_conditions<B: IpamBackend>(
    backend: &B,
    port: &v1::Port,
    conditions: Vec<v1::Condition>,
) -> Result<(), Error> {
    let status = v1::PortStatus {
        observed_generation: generation(port),
        ..Default::default()
    };
    match backend
        .write_status(port, &["observedGeneration"], status, conditions, 0)
        .await
    {
        Ok(()) | Err(Error::NotFound { .. }) => Ok(()),
        Err(e) => Err(e),
    }
}

fn blocked(reason: &str, message: String, waits_on: Option<&str>) -> Executed {
    Executed::Blocked {
        condition: condition("Ready", false, reason, message),
        written: false,
        waits_on: waits_on.map(str::to_owned),
    }
}

/// Claims the Port's MAC; `Err(blocked)` when the requested one is held by another Port.
async fn claim_mac<B: IpamBackend>(
    backend: &B,
    hints: &Hints,
    port: &v1::Port,
    uid: &str,
    want: &MacWant,
) -> Result<Result<String, Executed>, ReconcileError> {
    let mut inflight = InFlight {
        hints,
        network_uid: String::new(),
        ips: Vec::new(),
        macs: Vec::new(),
    };
    match want {
        MacWant::Held(mac) => Ok(Ok(mac.clone())),
        MacWant::Requested(mac) => match claim(backend, mac_claim(port, mac), uid).await? {
            Claimed::Ours => Ok(Ok(mac.clone())),
            Claimed::Theirs => Ok(Err(blocked(
                reason::MAC_IN_USE,
                format!("MAC {mac} is held by another port"),
                None,
            ))),
        },
        MacWant::Any => {
            for _ in 0..MAX_REFUSED_CANDIDATES {
                let Some(candidate) = hints.next_mac(uid) else {
                    break;
                };
                inflight.macs.push(candidate);
                let text = format_mac(&candidate);
                if let Claimed::Ours = claim(backend, mac_claim(port, &text), uid).await? {
                    return Ok(Ok(text));
                }
            }
            Err(ReconcileError::Retry(
                "no free MAC found among the candidates; the MAC cache is behind".into(),
            ))
        }
    }
}

/// Claims the Port's addresses, one per need; `Err(blocked)` when a subnet is full or a
/// requested address is held by another Port.
async fn claim_addresses<B: IpamBackend>(
    backend: &B,
    hints: &Hints,
    port: &v1::Port,
    uid: &str,
    network_uid: &str,
    needs: &[IpNeed],
) -> Result<Result<Vec<v1::PortAddress>, Executed>, ReconcileError> {
    let mut inflight = InFlight {
        hints,
        network_uid: network_uid.to_owned(),
        ips: Vec::new(),
        macs: Vec::new(),
    };
    let mut addresses = Vec::new();
    for need in needs {
        let subnet = need.range.name.as_str();
        let ip = match need.want {
            IpWant::Held(ip) => ip,
            IpWant::Fixed(ip) => {
                // Whatever the hint believes, the create decides.
                if hints.reserve_ip(network_uid, ip) {
                    inflight.ips.push(ip);
                }
                match claim(
                    backend,
                    external::address_claim(port, network_uid, subnet, ip),
                    uid,
                )
                .await?
                {
                    Claimed::Ours => ip,
                    Claimed::Theirs => {
                        return Ok(Err(blocked(
                            reason::IP_IN_USE,
                            format!("{ip} is held by another port"),
                            Some(network_uid),
                        )));
                    }
                }
            }
            IpWant::Any => {
                let mut found = None;
                for _ in 0..MAX_REFUSED_CANDIDATES {
                    let Some(candidate) = hints.next_ip(network_uid, &need.range) else {
                        let message =
                            format!("subnet {subnet} ({}) has no free address", need.range.net);
                        return Ok(Err(blocked(reason::EXHAUSTED, message, Some(network_uid))));
                    };
                    inflight.ips.push(candidate);
                    if let Claimed::Ours = claim(
                        backend,
                        external::address_claim(port, network_uid, subnet, candidate),
                        uid,
                    )
                    .await?
                    {
                        found = Some(candidate);
                        break;
                    }
                }
                found.ok_or_else(|| {
                    ReconcileError::Retry(format!(
                        "subnet {subnet}: every candidate was taken; the address cache is behind"
                    ))
                })?
            }
        };
        addresses.push(v1::PortAddress {
            subnet: subnet.to_owned(),
            ip: ip.to_string(),
        });
    }
    Ok(Ok(addresses))
}

async fn allocate<B: IpamBackend>(
    backend: &B,
    hints: &Hints,
    facts: &PortFacts<'_>,
    allocation: &Allocation,
) -> Result<Executed, ReconcileError> {
    let port = facts.port;
    let uid = port_uid(port).to_owned();
    let network_uid = allocation.network_uid.as_str();
    // The MAC and the addresses are independent claims: made concurrently, a Port costs
    // two round trips (claims, then status) instead of three. A requested MAC may turn out
    // held by another Port, and a Port blocked on it must not sit on an address it cannot
    // record, so that MAC is claimed first. Whatever one side claims before the other
    // fails stays owned by the Port and is reused next time.
    let mac_claim = claim_mac(backend, hints, port, &uid, &allocation.mac);
    let address_claims = claim_addresses(backend, hints, port, &uid, network_uid, &allocation.ips);
    let (mac, addresses) = if matches!(allocation.mac, MacWant::Requested(_)) {
        match mac_claim.await? {
            Ok(mac) => (Ok(Ok(mac)), address_claims.await),
            Err(blocked) => return Ok(blocked),
        }
    } else {
        futures::join!(mac_claim, address_claims)
    };
    let mac = match mac? {
        Ok(mac) => mac,
        Err(blocked) => return Ok(blocked),
    };
    let addresses = match addresses? {
        Ok(addresses) => addresses,
        Err(blocked) => return Ok(blocked),
    };

    let status = v1::PortStatus {
        addresses,
        mac,
        network_uid: network_uid.to_owned(),
        observed_generation: generation(port),
        ..Default::default()
    };
    let conditions = ready_conditions(facts);
    let mut current = port.clone();
    for _ in 0..8 {
        let rv = meta(&current).resource_version;
        match backend
            .write_status(
                &current,
                DECISION_FIELDS,
                status.clone(),
                conditions.clone(),
                rv,
            )
            .await
        {
            Ok(()) => return Ok(Executed::Recorded),
            Err(Error::NotFound { .. }) => return Ok(Executed::Gone),
            Err(Error::Conflict { .. }) => {
                // Someone wrote the Port since it was read. Record on the fresh one, unless
                // it is another Port now or its decision is already recorded.
                let m = meta(port);
                match backend.get_port(&m.project, &m.name).await? {
                    None => return Ok(Executed::Gone),
                    Some(fresh) if port_uid(&fresh) != uid => return Ok(Executed::Gone),
                    Some(fresh) if is_decided(&fresh) => return Ok(Executed::Superseded),
                    Some(fresh) => current = fresh,
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
    Err(ReconcileError::Retry(
        "the port kept changing while its decision was recorded".into(),
    ))
}

async fn tidy<B: IpamBackend>(
    backend: &B,
    port: &v1::Port,
    tidy: Tidy,
) -> Result<Executed, ReconcileError> {
    let uid = port_uid(port).to_owned();
    for object in tidy.verify {
        let (kind, name) = (object.kind(), object.name().to_owned());
        match backend.claim_holder(kind, &name).await? {
            Some(holder) if holder == uid => {}
            Some(holder) => {
                // Only a person deleting a claim by hand can get here; the decision stands,
                // but it must be visible.
                tracing::error!(port = %meta(port).name, claim = %name, holder = %holder, "a recorded claim is held by another object");
            }
            None => match claim(backend, object, &uid).await? {
                Claimed::Ours => {
                    tracing::warn!(port = %meta(port).name, claim = %name, "restored a missing claim")
                }
                Claimed::Theirs => {
                    tracing::error!(port = %meta(port).name, claim = %name, "a recorded claim was taken by another object")
                }
            },
        }
    }
    for claim in &tidy.release {
        backend.release_claim(claim).await?;
    }
    if let Some(conditions) = tidy.refresh {
        write_conditions(backend, port, conditions).await?;
    }
    Ok(Executed::Tidied)
}

// ---------------------------------------------------------------------------------------
// The controller.

/// The [`IpamBackend`] of a real apiserver.
#[derive(Clone)]
pub struct ApiBackend {
    api: Api,
}

impl ApiBackend {
    /// A backend over a connection.
    pub fn new(api: Api) -> Self {
        ApiBackend { api }
    }
}

fn controller_uid(meta: Option<&v1::ObjectMeta>) -> Option<String> {
    let refs = &meta?.owner_references;
    refs.iter()
        .find(|r| r.controller)
        .or(refs.first())
        .map(|r| r.uid.clone())
}

impl IpamBackend for ApiBackend {
    async fn create_claim(&self, claim: Object) -> Result<(), Error> {
        self.api.create(claim).await.map(|_| ())
    }

    async fn claim_holder(&self, kind: Kind, name: &str) -> Result<Option<String>, Error> {
        match self.api.get(kind, "", name).await {
            Ok(object) => Ok(controller_uid(object.metadata()).or_else(|| Some(String::new()))),
            Err(Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn release_claim(&self, claim: &ClaimRef) -> Result<(), Error> {
        let request = v1::DeleteRequest {
            key: Some(v1::ObjectKey {
                kind: claim.kind.name().to_owned(),
                project: String::new(),
                name: claim.name.clone(),
            }),
            precondition_uid: claim.uid.clone(),
            ..Default::default()
        };
        match self.api.delete(request).await {
            Ok(_) | Err(Error::NotFound { .. } | Error::Conflict { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn write_status(
        &self,
        port: &v1::Port,
        fields: &[&str],
        status: v1::PortStatus,
        conditions: Vec<v1::Condition>,
        resource_version: i64,
    ) -> Result<(), Error> {
        let object = Object::Port(v1::Port {
            metadata: port.metadata.clone(),
            spec: None,
            status: Some(status),
        });
        self.api
            .update_status_at(object, owners::IPAM, fields, conditions, resource_version)
            .await
            .map(|_| ())
    }

    async fn get_port(&self, project: &str, name: &str) -> Result<Option<v1::Port>, Error> {
        match self.api.get_typed::<v1::Port>(project, name).await {
            Ok(port) => Ok(Some(port)),
            Err(Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

const PORT_BY_NETWORK: &str = "network";
const PORT_BY_NETWORK_NAME: &str = "network-name";
const NETWORK_BY_NAME: &str = "name";

/// The IPAM controller: reconciles Ports.
pub struct IpamController {
    backend: ApiBackend,
    recorder: Recorder,
    hints: Arc<Hints>,
    ports: Store<v1::Port>,
    networks: Store<v1::Network>,
    ip_claims: Store<v1::IpAddress>,
    mac_claims: Store<v1::MacAddress>,
    /// Ports blocked on a full subnet or a taken address, by Network uid: queued again when
    /// an address claim of that Network goes away.
    waiting: Arc<Mutex<HashMap<String, HashSet<ObjectRef>>>>,
    exhausted_condition: bool,
}

/// Keeps the address hints in step with the claim cache.
pub fn follow_ip_claims(hints: &Arc<Hints>, ip_claims: &Store<v1::IpAddress>) {
    let h = hints.clone();
    ip_claims.listen(move |c| {
        for (object, present) in [(c.old.as_deref(), false), (c.new.as_deref(), true)] {
            let Some(spec) = object.and_then(|o| o.spec.as_ref()) else {
                continue;
            };
            if let Ok(ip) = spec.address.parse() {
                // The old value goes before the new one arrives; claims never change
                // value, so this only ever adds or removes.
                h.observe_ip(&spec.network_uid, ip, present);
            }
        }
    });
}

/// Whether the status owner table lets IPAM write the `IpAddressExhausted` condition.
fn ipam_owns_exhausted_condition() -> bool {
    owners::table(Kind::Port)
        .iter()
        .any(|o| o.writer == owners::IPAM && o.conditions.contains(&EXHAUSTED_CONDITION))
}

/// The Network a Port's `spec.network` names, by [`resolve`]'s rule: in the Port's own
/// project, else the one shared or external Network of that name.
pub fn resolve_network(
    networks: &Store<v1::Network>,
    port: &v1::Port,
) -> Result<Arc<v1::Network>, Unresolved> {
    let name = port
        .spec
        .as_ref()
        .map(|s| s.network.as_str())
        .unwrap_or_default();
    resolve(
        &meta(port).project,
        name,
        networks.by_index(NETWORK_BY_NAME, name),
    )
}

impl IpamController {
    /// Builds the controller over the shared caches; run the returned [`Controller`] with
    /// the returned reconciler.
    pub fn build(
        api: &Api,
        caches: &Caches,
        metrics: &Metrics,
        settings: Settings,
    ) -> (Controller, Arc<IpamController>) {
        let ports = caches.store::<v1::Port>();
        let networks = caches.store::<v1::Network>();
        let ip_claims = caches.store::<v1::IpAddress>();
        let mac_claims = caches.store::<v1::MacAddress>();
        ports.add_index(PORT_BY_NETWORK, |p: &v1::Port| {
            vec![format!(
                "{}/{}",
                meta(p).project,
                p.spec
                    .as_ref()
                    .map(|s| s.network.as_str())
                    .unwrap_or_default()
            )]
        });
        ports.add_index(PORT_BY_NETWORK_NAME, |p: &v1::Port| {
            vec![
                p.spec
                    .as_ref()
                    .map(|s| s.network.clone())
                    .unwrap_or_default(),
            ]
        });
        networks.add_index(NETWORK_BY_NAME, |n: &v1::Network| {
            vec![meta(n).name.clone()]
        });

        let hints = Arc::new(Hints::new());
        follow_ip_claims(&hints, &ip_claims);
        let h = hints.clone();
        mac_claims.listen(move |c| {
            for (object, present) in [(c.old.as_deref(), false), (c.new.as_deref(), true)] {
                if let Some(mac) = object
                    .and_then(|o| o.spec.as_ref())
                    .and_then(|s| parse_mac(&s.address))
                {
                    h.observe_mac(mac, present);
                }
            }
        });

        let waiting: Arc<Mutex<HashMap<String, HashSet<ObjectRef>>>> = Arc::default();
        let by_network = ports.clone();
        let freed = waiting.clone();
        let controller = Controller::new("ipam", settings, metrics.clone())
            .reconciles(&ports)
            .owns(&ip_claims, Kind::Port)
            .owns(&mac_claims, Kind::Port)
            .watches(&networks, move |c| {
                let Some(network) = c.new.as_deref().or(c.old.as_deref()) else {
                    return Vec::new();
                };
                let m = meta(network);
                let mut ports =
                    by_network.by_index(PORT_BY_NETWORK, &format!("{}/{}", m.project, m.name));
                if network.is_public() {
                    ports.extend(by_network.by_index(PORT_BY_NETWORK_NAME, &m.name));
                }
                ports
                    .iter()
                    .filter(|p| !is_decided(p))
                    .map(|p| ObjectRef::of(p.as_ref()))
                    .collect()
            })
            .watches(&ip_claims, move |c| {
                // A freed address may unblock Ports waiting on its Network.
                if c.new.is_some() {
                    return Vec::new();
                }
                let Some(network_uid) = c
                    .old
                    .as_ref()
                    .and_then(|o| o.spec.as_ref())
                    .map(|s| s.network_uid.clone())
                else {
                    return Vec::new();
                };
                let mut waiting = freed.lock().unwrap_or_else(|e| e.into_inner());
                waiting
                    .remove(&network_uid)
                    .map(|keys| keys.into_iter().collect())
                    .unwrap_or_default()
            });
        let reconciler = Arc::new(IpamController {
            backend: ApiBackend::new(api.clone()),
            recorder: Recorder::new(api.client().clone(), owners::IPAM),
            hints,
            ports,
            networks,
            ip_claims,
            mac_claims,
            waiting,
            exhausted_condition: ipam_owns_exhausted_condition(),
        });
        (controller, reconciler)
    }
}

impl IpamController {
    /// Registers (`wait`) or withdraws a Port among those queued again when an address
    /// claim of the Network goes away.
    fn wait_on(&self, network_uid: &str, key: &ObjectRef, wait: bool) {
        let mut waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
        if wait {
            waiting
                .entry(network_uid.to_owned())
                .or_default()
                .insert(key.clone());
        } else if let Some(keys) = waiting.get_mut(network_uid) {
            keys.remove(key);
            if keys.is_empty() {
                waiting.remove(network_uid);
            }
        }
    }
}

impl Reconcile for IpamController {
    type Error = ReconcileError;

    async fn reconcile(&self, key: ObjectRef) -> Result<Action, ReconcileError> {
        let Some(port) = self.ports.get(&key) else {
            // Gone: the garbage collector frees its claims.
            return Ok(Action::AwaitChange);
        };
        let network = resolve_network(&self.networks, &port);
        // An undecided Port waits on its Network before its hints are read, not after the
        // verdict: a claim freed while this reconcile runs then queues the Port again (it
        // runs once more right after), where registering afterwards would miss that wakeup
        // and leave the Port reported exhausted beside a free address until the recheck.
        let network_uid = match &network {
            Ok(network) if !is_decided(&port) => Some(meta(network.as_ref()).uid.clone()),
            _ => None,
        };
        if let Some(network_uid) = &network_uid {
            self.wait_on(network_uid, &key, true);
        }
        let uid = port_uid(&port);
        let ip_claims = self.ip_claims.by_index(OWNER_UID, uid);
        let mac_claims = self.mac_claims.by_index(OWNER_UID, uid);
        let facts = PortFacts {
            port: &port,
            network: network.as_deref().map_err(Clone::clone),
            ip_claims: ip_claims.iter().map(|c| c.as_ref()).collect(),
            mac_claims: mac_claims.iter().map(|c| c.as_ref()).collect(),
            exhausted_condition: self.exhausted_condition,
        };
        let executed = run_port(&self.backend, &self.hints, &facts).await?;
        let waits_on = match &executed {
            Executed::Blocked { waits_on, .. } => waits_on.as_deref(),
            _ => None,
        };
        if let Some(network_uid) = waits_on {
            self.wait_on(network_uid, &key, true);
        }
        if let Some(network_uid) = network_uid.as_deref()
            && waits_on != Some(network_uid)
        {
            self.wait_on(network_uid, &key, false);
        }
        match executed {
            Executed::Blocked {
                condition, written, ..
            } => {
                if written {
                    self.recorder
                        .warning(port.as_ref(), &condition.reason, &condition.message)
                        .await;
                }
                Ok(Action::Requeue(BLOCKED_RECHECK))
            }
            Executed::Recorded
            | Executed::Superseded
            | Executed::Gone
            | Executed::Tidied
            | Executed::Unchanged => Ok(Action::AwaitChange),
        }
    }
}

#[cfg(test)]
mod tests;
