//! The router controller: places each Router on a network node, holds its gateway address
//! on the external network, and says how far the router is from working.
//!
//! **Placement is a decision.** A Router goes to a node whose `Ready` (node lifecycle's) is
//! `True`, that declares the `Network` role and is not cordoned: the one hosting the fewest
//! routers, then the first by name. `status.node` is written once, guarded by the
//! resourceVersion the decision was made from; as in the scheduler, deciding and assuming
//! happen under one lock, so routers applied together spread out before the cache shows
//! any of them placed. When nothing fits, `Scheduled=False` (`NoNetworkNode`) says why and
//! every change of a Node queues the unplaced routers again.
//!
//! **Failover is the only re-decision.** When node lifecycle declares the router's node lost
//! (its `Ready` turns `Unknown`: the heartbeat lapsed) and it stays so for the failover
//! grace period (30 s by default, counted from the condition's `lastTransitionTime`; the
//! router is queued again for that moment), or the Node is gone, the router is moved to
//! another node that fits: `status.node` is rewritten, `Scheduled` says `FailedOver`
//! naming both nodes, and a warning Event tells the story. When most network nodes lapsed
//! together (at least two, and more than half), it is more likely the control plane that
//! stalled than the nodes that died: the router stays, and `Scheduled=False`
//! (`FailoverHeldOff`) says so. A node that is merely not ready (its host reports a
//! problem) keeps its routers.
//!
//! **The gateway address** is an `IPAddress` claim on the external network owned by the
//! Router, the same claims Ports hold ([`crate::ipam::external`]), honouring
//! `spec.externalGateway.fixedIp`, recorded in `status.externalIps`. A missing external
//! network, or one that is not `external`, is the `ExternalGateway` condition, not an
//! error: the router is placed anyway and gets its address when the network appears. Once
//! the address is held, the router plans on the network its claim is on, not on a fresh
//! lookup by name, so a project's own Network named like the external one cannot strip it.
//!
//! **`Ready`** is `True` once the router is placed on a node that is not lost, its gateway
//! (if any) has its address, and the node's agent reports `Plumbed=True` for that node.
//!
//! **The `Plumbed` contract.** `Plumbed` is the agent's (see the owner table in
//! `ferro_api::owners`); after a failover the lost node's last `Plumbed=True` stays in
//! status, because that node can no longer write. So the agent writes its message as
//! [`plumbed_message`] makes it, `node <name>: <detail>` (e.g. `node net-2: qrouter-1a2b
//! built`), and leaves `observedGeneration` to the apiserver, which stamps the generation
//! it wrote at. The controller believes a `Plumbed` (True or False) only when it names the
//! router's current node and is of the current generation ([`plumbed_current`]); any other
//! is stale and readiness waits for the agent.
//!
//! **One router per subnet.** Admission refuses a leg on a subnet another router joins, but
//! two applies can pass it together. So the controller checks too ([`interface_conflict`],
//! pure): of routers sharing a subnet the earliest (creation time, then project and name)
//! keeps it, and a later one is `Interfaces=False` and `Ready=False`, reason
//! `InterfaceConflict`, naming the other. Routers being deleted do not count.
//!
//! **Deletion.** The finalizer [`ROUTER_FINALIZER`] releases the router's claims before the
//! Router goes.

use std::{
    collections::{BTreeSet, HashMap},
    net::IpAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use ferro_api::{
    Error, Kind, Object, owners,
    resolve::{Unresolved, resolve},
    v1,
};

use crate::{
    api::Api,
    ipam::{
        self, Hints,
        external::{self, AddressFacts, AddressPlan},
    },
    scheduler::node_ready,
};
use ferro_runtime::{
    Action, Caches, Controller, ObjectRef, Reconcile, ReconcileError, Store, condition,
    condition_holds,
    controller::Settings,
    events::Recorder,
    finalizer::{self, Step},
    meta,
    metrics::Metrics,
    reflector::{OWNER_UID, UID},
};

/// The finalizer that releases a Router's claims before it goes.
pub const ROUTER_FINALIZER: &str = "ferro.io/router-claims";
/// The condition saying where the router runs, or why nowhere.
pub const SCHEDULED: &str = "Scheduled";
/// The condition saying whether the gateway has its address.
pub const EXTERNAL_GATEWAY: &str = "ExternalGateway";
/// The agent's condition: the router's namespace is built on its node.
pub const PLUMBED: &str = "Plumbed";
/// The condition saying whether another router already joins one of this one's subnets.
pub const INTERFACES: &str = "Interfaces";

/// Condition reasons the router controller writes.
pub mod reason {
    /// Placed on a node.
    pub const SCHEDULED: &str = "Scheduled";
    /// Moved off a lost node.
    pub const FAILED_OVER: &str = "FailedOver";
    /// No node fits.
    pub const NO_NETWORK_NODE: &str = "NoNetworkNode";
    /// The node is lost and no other node fits.
    pub const NODE_LOST: &str = "NodeLost";
    /// The node is not ready (but not lost).
    pub const NODE_NOT_READY: &str = "NodeNotReady";
    /// The node is lost, but so are most network nodes: no failover.
    pub const FAILOVER_HELD_OFF: &str = "FailoverHeldOff";
    /// The gateway has its address.
    pub const ALLOCATED: &str = "Allocated";
    /// The router has no external gateway.
    pub const NO_GATEWAY: &str = "NoGateway";
    /// The node's agent has not reported building the router.
    pub const WAITING_FOR_AGENT: &str = "WaitingForAgent";
    /// The node's agent reports the router built.
    pub const PLUMBED: &str = "Plumbed";
    /// No other router joins the router's subnets.
    pub const NO_CONFLICT: &str = "NoConflict";
    /// An earlier router joins one of the router's subnets.
    pub const INTERFACE_CONFLICT: &str = "InterfaceConflict";
}

/// How often an unplaced or blocked router is looked at again without a change.
const RETRY: Duration = Duration::from_secs(60);

/// How long a node's `Ready` stays `Unknown` before its routers fail over, by default.
pub const FAILOVER_GRACE: Duration = Duration::from_secs(30);

const ROUTER_BY_NODE: &str = "router-node";
const ROUTER_BY_NETWORK: &str = "router-network";
const NETWORK_BY_NAME: &str = "router-network-name";

// ---------------------------------------------------------------------------------------
// Placement.

/// What placement knows of one Node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetworkNode {
    /// The Node's name.
    pub name: String,
    /// It declares the `Network` role.
    pub network_role: bool,
    /// Node lifecycle says `Ready=True`.
    pub ready: bool,
    /// Node lifecycle declared it lost (`Ready=Unknown`), with its message.
    pub lost: Option<String>,
    /// How long `Ready` has been `Unknown` (from its `lastTransitionTime`); zero if it is
    /// not lost.
    pub lapsed_for: Duration,
    /// `spec.unschedulable`.
    pub cordoned: bool,
    /// How many routers it hosts (placed or assumed).
    pub routers: usize,
}

/// Where a Router runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Placement {
    /// On the recorded node, which is not lost.
    Stay(String),
    /// A first decision.
    Place(String),
    /// Off a lost node, to another.
    Move {
        /// The lost node.
        from: String,
        /// The new node.
        to: String,
        /// Why the old one is lost.
        why: String,
    },
    /// Unplaced, and no node fits.
    Nowhere(String),
    /// On a lost node, but most network nodes lapsed together: no failover.
    HeldOff {
        /// The lost node.
        node: String,
        /// Why it is lost, and why the router stays.
        why: String,
    },
    /// On a lost node, and no other node fits.
    Stranded {
        /// The lost node.
        node: String,
        /// Why it is lost, and that nothing else fits.
        why: String,
    },
}

impl Placement {
    /// The node the router is (to be) on.
    pub fn node(&self) -> Option<&str> {
        match self {
            Placement::Stay(n) | Placement::Place(n) | Placement::Move { to: n, .. } => Some(n),
            Placement::Stranded { node, .. } | Placement::HeldOff { node, .. } => Some(node),
            Placement::Nowhere(_) => None,
        }
    }
}

/// Whether node lifecycle declared the Node lost: its `Ready` is `Unknown`.
pub fn node_lost(node: &v1::Node) -> Option<String> {
    node.status.as_ref().and_then(|s| {
        s.conditions
            .iter()
            .find(|c| c.r#type == "Ready" && c.status == v1::condition::Status::Unknown as i32)
            .map(|c| {
                if c.message.is_empty() {
                    c.reason.clone()
                } else {
                    c.message.clone()
                }
            })
    })
}

/// How long the Node's `Ready` has been `Unknown` at `now`. A condition without a
/// `lastTransitionTime` (the apiserver stamps it; only a hand-made object lacks it) counts
/// as lapsed long ago.
fn lapsed_for(node: &v1::Node, now: jiff::Timestamp) -> Duration {
    let Some(ready) = node.status.as_ref().and_then(|s| {
        s.conditions
            .iter()
            .find(|c| c.r#type == "Ready" && c.status == v1::condition::Status::Unknown as i32)
    }) else {
        return Duration::ZERO;
    };
    let Some(since) = ready
        .last_transition_time
        .as_ref()
        .and_then(|t| jiff::Timestamp::new(t.seconds, t.nanos).ok())
    else {
        return Duration::MAX;
    };
    Duration::try_from(now.duration_since(since)).unwrap_or(Duration::ZERO)
}

/// What placement knows of a Node at `now`, hosting `routers` routers.
pub fn network_node(node: &v1::Node, routers: usize, now: jiff::Timestamp) -> NetworkNode {
    let roles = node
        .status
        .as_ref()
        .map(|s| s.roles.as_slice())
        .unwrap_or_default();
    NetworkNode {
        name: meta(node).name.clone(),
        network_role: roles.contains(&(v1::node_status::Role::Network as i32)),
        ready: node_ready(node),
        lost: node_lost(node),
        lapsed_for: lapsed_for(node, now),
        cordoned: node.spec.as_ref().is_some_and(|s| s.unschedulable),
        routers,
    }
}

fn choose<'a>(nodes: &'a [NetworkNode], except: &str) -> Option<&'a NetworkNode> {
    nodes
        .iter()
        .filter(|n| n.network_role && n.ready && !n.cordoned && n.name != except)
        .min_by(|a, b| a.routers.cmp(&b.routers).then_with(|| a.name.cmp(&b.name)))
}

/// Why no node fits, in one sentence with counts.
fn nothing_fits(nodes: &[NetworkNode], except: &str) -> String {
    let others: Vec<&NetworkNode> = nodes.iter().filter(|n| n.name != except).collect();
    let role = others.iter().filter(|n| n.network_role).count();
    let not_ready = others.iter().filter(|n| n.network_role && !n.ready).count();
    let cordoned = others
        .iter()
        .filter(|n| n.network_role && n.ready && n.cordoned)
        .count();
    format!(
        "no Ready node with the network role: {} nodes, {role} with the network role ({not_ready} not ready, {cordoned} cordoned)",
        others.len()
    )
}

/// How long until the router on `current` fails over, if its node is lost and the grace
/// period has not run out. Pure.
pub fn failover_due(current: &str, nodes: &[NetworkNode], grace: Duration) -> Option<Duration> {
    let node = nodes.iter().find(|n| n.name == current)?;
    node.lost.as_ref()?;
    grace.checked_sub(node.lapsed_for).filter(|d| !d.is_zero())
}

/// Decides where a Router with `current` as its recorded node runs, failing over only once
/// the node has been lost for `grace`. Pure.
pub fn place(current: &str, nodes: &[NetworkNode], grace: Duration) -> Placement {
    if current.is_empty() {
        return match choose(nodes, "") {
            Some(n) => Placement::Place(n.name.clone()),
            None => Placement::Nowhere(nothing_fits(nodes, "")),
        };
    }
    let why = match nodes.iter().find(|n| n.name == current) {
        None => format!("node {current} is gone"),
        Some(n) => match &n.lost {
            Some(why) if n.lapsed_for >= grace => why.clone(),
            // Not lost, or not for long enough: a blip is no reason to move.
            _ => return Placement::Stay(current.to_owned()),
        },
    };
    let role = nodes.iter().filter(|n| n.network_role).count();
    let lapsed = nodes
        .iter()
        .filter(|n| n.network_role && n.lost.is_some())
        .count();
    if lapsed >= 2 && lapsed * 2 > role {
        return Placement::HeldOff {
            node: current.to_owned(),
            why: format!(
                "{why}; not failing over: {lapsed} of {role} network nodes lapsed together, which looks like a control-plane stall"
            ),
        };
    }
    match choose(nodes, current) {
        Some(n) => Placement::Move {
            from: current.to_owned(),
            to: n.name.clone(),
            why,
        },
        None => Placement::Stranded {
            node: current.to_owned(),
            why: format!("{why}; {}", nothing_fits(nodes, current)),
        },
    }
}

// ---------------------------------------------------------------------------------------
// Conditions.

/// The message an agent writes in `Plumbed` for what it built on `node`: its subject is
/// `node <name>`, then `: ` and details for people.
pub fn plumbed_message(subject: &str, detail: &str) -> String {
    format!("{subject}: {detail}")
}

/// The subject a `Plumbed` message begins with for a router on `node`.
pub fn router_subject(node: &str) -> String {
    format!("node {node}")
}

/// The agent's `Plumbed`, if it speaks of what is wanted now: written at `generation` and
/// its message's subject is `subject` (exactly, or followed by `: `). Pure.
pub fn plumbed_current<'a>(
    existing: &'a [v1::Condition],
    subject: &str,
    generation: i64,
) -> Option<&'a v1::Condition> {
    agent_condition_current(existing, PLUMBED, subject, generation)
}

/// A node agent's condition `kind` (`Plumbed`, `Provisioned`, …), if it speaks of what is
/// wanted now: written at `generation`, and its message's subject is `subject` (exactly,
/// or followed by `: `), e.g. `node net-2`. A node that lost an object can no longer
/// write, so its last word stays in status; only the current node's counts. Pure.
pub fn agent_condition_current<'a>(
    existing: &'a [v1::Condition],
    kind: &str,
    subject: &str,
    generation: i64,
) -> Option<&'a v1::Condition> {
    existing.iter().find(|c| {
        c.r#type == kind
            && c.observed_generation == generation
            && c.message
                .strip_prefix(subject)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with(": "))
    })
}

/// What became of the gateway address.
#[derive(Clone, Debug, PartialEq)]
pub enum Gateway {
    /// The router has no external gateway.
    None,
    /// The gateway holds this address on the named network.
    Address(IpAddr, String),
    /// No address now; the condition (type `Ready`) says why.
    Blocked(v1::Condition),
}

fn retyped(c: &v1::Condition, kind: &str) -> v1::Condition {
    v1::Condition {
        r#type: kind.to_owned(),
        ..c.clone()
    }
}

fn find<'a>(conditions: &'a [v1::Condition], kind: &str) -> Option<&'a v1::Condition> {
    conditions.iter().find(|c| c.r#type == kind)
}

/// The `Scheduled`, `ExternalGateway` and `Ready` conditions of a Router. Pure.
///
/// `existing` are the Router's conditions now: a `FailedOver` that still names the node
/// is kept rather than flattened into `Scheduled`, so the move stays visible; the agent's
/// `Plumbed`, if it is current for the node and `generation` ([`plumbed_current`]),
/// decides readiness. `node_ready` says whether the router's node is `Ready`.
pub fn conditions(
    placement: &Placement,
    gateway: &Gateway,
    existing: &[v1::Condition],
    node_ready: bool,
    generation: i64,
) -> Vec<v1::Condition> {
    let scheduled = match placement {
        Placement::Stay(node) | Placement::Place(node) => {
            let moved_here = find(existing, SCHEDULED).filter(|c| {
                c.status == v1::condition::Status::True as i32
                    && c.reason == reason::FAILED_OVER
                    && c.message.starts_with(&format!("moved to node {node} "))
            });
            match moved_here {
                Some(c) => condition(SCHEDULED, true, &c.reason, c.message.clone()),
                None => condition(
                    SCHEDULED,
                    true,
                    reason::SCHEDULED,
                    format!("placed on node {node}"),
                ),
            }
        }
        Placement::Move { from, to, why } => condition(
            SCHEDULED,
            true,
            reason::FAILED_OVER,
            format!("moved to node {to} from lost node {from}: {why}"),
        ),
        Placement::Nowhere(why) => condition(SCHEDULED, false, reason::NO_NETWORK_NODE, why),
        Placement::Stranded { node, why } => condition(
            SCHEDULED,
            false,
            reason::NODE_LOST,
            format!("node {node} is lost: {why}"),
        ),
        Placement::HeldOff { node, why } => condition(
            SCHEDULED,
            false,
            reason::FAILOVER_HELD_OFF,
            format!("node {node} is lost: {why}"),
        ),
    };
    let external = match gateway {
        Gateway::None => condition(
            EXTERNAL_GATEWAY,
            true,
            reason::NO_GATEWAY,
            "no external gateway",
        ),
        Gateway::Address(ip, network) => condition(
            EXTERNAL_GATEWAY,
            true,
            reason::ALLOCATED,
            format!("{ip} on network {network}"),
        ),
        Gateway::Blocked(c) => retyped(c, EXTERNAL_GATEWAY),
    };
    let plumbed = placement
        .node()
        .and_then(|node| plumbed_current(existing, &router_subject(node), generation));
    let ready = if scheduled.status != v1::condition::Status::True as i32 {
        retyped(&scheduled, "Ready")
    } else if let Gateway::Blocked(c) = gateway {
        retyped(c, "Ready")
    } else if !node_ready {
        let node = placement.node().unwrap_or_default();
        condition(
            "Ready",
            false,
            reason::NODE_NOT_READY,
            format!("node {node} is not ready"),
        )
    } else {
        match plumbed {
            Some(p) if p.status == v1::condition::Status::True as i32 => {
                condition("Ready", true, reason::PLUMBED, p.message.clone())
            }
            Some(p) => condition(
                "Ready",
                false,
                if p.reason.is_empty() {
                    reason::WAITING_FOR_AGENT
                } else {
                    &p.reason
                },
                p.message.clone(),
            ),
            None => condition(
                "Ready",
                false,
                reason::WAITING_FOR_AGENT,
                format!(
                    "node {} has not reported the router built",
                    placement.node().unwrap_or_default()
                ),
            ),
        }
    };
    vec![scheduled, external, ready]
}

// ---------------------------------------------------------------------------------------
// Legs.

/// One leg of a Router, its network resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Leg {
    /// The Network's uid.
    pub network_uid: String,
    /// The Network's name, for messages.
    pub network: String,
    /// The subnet's name.
    pub subnet: String,
}

/// Where a Router ranks among those sharing a subnet: creation time, project, name.
pub type RouterRank = ((i64, i32), String, String);

/// The rank of a Router.
pub fn router_rank(router: &v1::Router) -> RouterRank {
    let m = meta(router);
    let created = m
        .creation_timestamp
        .as_ref()
        .map(|t| (t.seconds, t.nanos))
        .unwrap_or_default();
    (created, m.project.clone(), m.name.clone())
}

/// Why this router may not have its legs: an earlier router (of `others`, with their
/// ranks and legs) joins one of the same subnets. Pure.
pub fn interface_conflict(
    me: &RouterRank,
    mine: &[Leg],
    others: &[(RouterRank, Vec<Leg>)],
) -> Option<String> {
    mine.iter().find_map(|leg| {
        let (rank, _) = others
            .iter()
            .filter(|(rank, legs)| {
                rank < me
                    && legs
                        .iter()
                        .any(|l| l.network_uid == leg.network_uid && l.subnet == leg.subnet)
            })
            .min_by(|a, b| a.0.cmp(&b.0))?;
        Some(format!(
            "subnet {} of network {} already has router {}/{}",
            leg.subnet, leg.network, rank.1, rank.2
        ))
    })
}

/// `wanted` with the `Interfaces` condition, and `Ready` made `False` by a conflict. Pure.
pub fn with_interfaces(
    mut wanted: Vec<v1::Condition>,
    conflict: Option<String>,
) -> Vec<v1::Condition> {
    match conflict {
        None => wanted.push(condition(
            INTERFACES,
            true,
            reason::NO_CONFLICT,
            "no other router joins its subnets",
        )),
        Some(why) => {
            for c in wanted.iter_mut().filter(|c| c.r#type == "Ready") {
                *c = condition("Ready", false, reason::INTERFACE_CONFLICT, why.clone());
            }
            wanted.push(condition(
                INTERFACES,
                false,
                reason::INTERFACE_CONFLICT,
                why,
            ));
        }
    }
    wanted
}

// ---------------------------------------------------------------------------------------
// The controller.

/// A placement decided and not yet visible in the cache.
#[derive(Clone, Debug)]
struct Assumption {
    node: String,
}

/// The router controller: reconciles Routers.
pub struct RouterController {
    api: Api,
    recorder: Recorder,
    hints: Arc<Hints>,
    routers: Store<v1::Router>,
    nodes: Store<v1::Node>,
    networks: Store<v1::Network>,
    ip_claims: Store<v1::IpAddress>,
    /// Placements decided and not yet in the cache, by router uid. Its lock also
    /// serialises decisions.
    assumed: Arc<Mutex<HashMap<String, Assumption>>>,
    /// How long a node stays lost before its routers fail over.
    failover_grace: Duration,
}

fn recorded_node(router: &v1::Router) -> &str {
    router
        .status
        .as_ref()
        .map(|s| s.node.as_str())
        .unwrap_or_default()
}

fn gateway_network(router: &v1::Router) -> Option<&str> {
    router
        .spec
        .as_ref()?
        .external_gateway
        .as_ref()
        .map(|g| g.network.as_str())
}

fn keys(routers: Vec<Arc<v1::Router>>) -> Vec<ObjectRef> {
    routers.iter().map(|r| ObjectRef::of(r.as_ref())).collect()
}

impl RouterController {
    /// Builds the controller over the shared caches; routers fail over once their node has
    /// been lost for `failover_grace` ([`FAILOVER_GRACE`] in production).
    pub fn build(
        api: &Api,
        caches: &Caches,
        metrics: &Metrics,
        settings: Settings,
        failover_grace: Duration,
    ) -> (Controller, Arc<RouterController>) {
        let routers = caches.store::<v1::Router>();
        let nodes = caches.store::<v1::Node>();
        let networks = caches.store::<v1::Network>();
        let ip_claims = caches.store::<v1::IpAddress>();
        routers.add_index(ROUTER_BY_NODE, |r: &v1::Router| {
            vec![recorded_node(r).to_owned()]
        });
        // Every network a router names: its gateway's and its legs'.
        routers.add_index(ROUTER_BY_NETWORK, |r: &v1::Router| {
            let legs = r.spec.iter().flat_map(|s| &s.interfaces);
            let mut names: Vec<String> = gateway_network(r)
                .map(str::to_owned)
                .into_iter()
                .chain(legs.map(|i| i.network.clone()))
                .collect();
            names.sort();
            names.dedup();
            names
        });
        networks.add_index(NETWORK_BY_NAME, |n: &v1::Network| {
            vec![meta(n).name.clone()]
        });
        let hints = Arc::new(Hints::new());
        ipam::follow_ip_claims(&hints, &ip_claims);
        let assumed: Arc<Mutex<HashMap<String, Assumption>>> = Arc::default();
        let forget = assumed.clone();
        routers.listen(move |c| {
            // The cache shows the decision (or the router is gone): it counts from there.
            let Some(old) = c.old.as_ref().or(c.new.as_ref()) else {
                return;
            };
            let mut assumed = forget.lock().unwrap_or_else(|e| e.into_inner());
            let uid = &meta(old.as_ref()).uid;
            let shown = match (&c.new, assumed.get(uid)) {
                (None, _) => true,
                (Some(new), Some(a)) => recorded_node(new) == a.node,
                (Some(_), None) => false,
            };
            if shown {
                assumed.remove(uid);
            }
        });
        let by_node = routers.clone();
        let on_nodes = move |c: &ferro_runtime::reflector::Change<v1::Node>| {
            // Unplaced routers may fit now; the node's own routers may have lost it.
            let mut routers = by_node.by_index(ROUTER_BY_NODE, "");
            for node in c.old.iter().chain(c.new.iter()) {
                routers.extend(by_node.by_index(ROUTER_BY_NODE, &meta(node.as_ref()).name));
            }
            // A lost node's routers move to the others: those on them spread anew.
            if c.new.as_ref().is_some_and(|n| node_lost(n).is_some()) || c.new.is_none() {
                routers.extend(by_node.list());
            }
            // A node that can take routers now may be where a stranded or held-off router
            // goes.
            if c.new.as_ref().is_some_and(|n| node_ready(n)) {
                routers.extend(by_node.list().into_iter().filter(|r| {
                    r.status.as_ref().is_some_and(|s| {
                        find(&s.conditions, SCHEDULED)
                            .is_some_and(|c| c.status != v1::condition::Status::True as i32)
                    })
                }));
            }
            let set: BTreeSet<ObjectRef> = keys(routers).into_iter().collect();
            set.into_iter().collect()
        };
        let by_gateway = routers.clone();
        let on_networks = move |c: &ferro_runtime::reflector::Change<v1::Network>| {
            let mut set = BTreeSet::new();
            for network in c.old.iter().chain(c.new.iter()) {
                set.extend(keys(
                    by_gateway.by_index(ROUTER_BY_NETWORK, &meta(network.as_ref()).name),
                ));
            }
            set.into_iter().collect()
        };
        let waiting = routers.clone();
        let on_claims = move |c: &ferro_runtime::reflector::Change<v1::IpAddress>| {
            // A freed address may be the one a gateway without one waits for.
            if c.new.is_some() {
                return Vec::new();
            }
            let routers = waiting.list();
            let blocked = routers.iter().filter(|r| {
                gateway_network(r).is_some()
                    && r.status.as_ref().is_none_or(|s| s.external_ips.is_empty())
            });
            blocked.map(|r| ObjectRef::of(r.as_ref())).collect()
        };
        let with_legs = routers.clone();
        let on_routers = move |c: &ferro_runtime::reflector::Change<v1::Router>| {
            // Which of two routers keeps a subnet depends on the other: when a router's legs
            // change, or it comes or goes, routers with legs look again.
            let legs = |r: &Option<Arc<v1::Router>>| {
                r.as_ref().map(|r| {
                    (
                        r.spec.as_ref().map(|s| s.interfaces.clone()),
                        meta(r.as_ref()).deletion_timestamp.is_some(),
                    )
                })
            };
            if legs(&c.old) == legs(&c.new) {
                return Vec::new();
            }
            let routers = with_legs.list();
            let joined = routers
                .iter()
                .filter(|r| r.spec.as_ref().is_some_and(|s| !s.interfaces.is_empty()));
            joined.map(|r| ObjectRef::of(r.as_ref())).collect()
        };
        let controller = Controller::new("router", settings, metrics.clone())
            .reconciles(&routers)
            .watches(&routers, on_routers)
            .owns(&ip_claims, Kind::Router)
            .watches(&ip_claims, on_claims)
            .watches(&nodes, on_nodes)
            .watches(&networks, on_networks);
        let reconciler = Arc::new(RouterController {
            api: api.clone(),
            recorder: Recorder::new(api.client().clone(), owners::ROUTER_CONTROLLER),
            hints,
            routers,
            nodes,
            networks,
            ip_claims,
            assumed,
            failover_grace,
        });
        (controller, reconciler)
    }

    /// Decides placement under the lock and assumes a new decision, so the next decision
    /// counts it. Also says when to look again if the node is lost within its grace.
    fn decide(&self, router: &v1::Router) -> (Placement, Option<Duration>) {
        let uid = meta(router).uid.clone();
        let mut assumed = self.assumed.lock().unwrap_or_else(|e| e.into_inner());
        let mut counts: HashMap<String, usize> = HashMap::new();
        for other in self.routers.list() {
            let node = recorded_node(&other);
            if meta(other.as_ref()).uid != uid && !node.is_empty() {
                *counts.entry(node.to_owned()).or_default() += 1;
            }
        }
        for (other, a) in assumed.iter() {
            let shown = self
                .routers
                .by_index(ferro_runtime::reflector::UID, other)
                .first()
                .is_some_and(|r| recorded_node(r) == a.node);
            if *other != uid && !shown {
                *counts.entry(a.node.clone()).or_default() += 1;
            }
        }
        let mut nodes: Vec<NetworkNode> = self
            .nodes
            .list()
            .iter()
            .map(|n| {
                let routers = counts.get(&meta(n.as_ref()).name).copied().unwrap_or(0);
                network_node(n, routers, jiff::Timestamp::now())
            })
            .collect();
        nodes.sort_by(|a, b| a.name.cmp(&b.name));
        let placement = place(recorded_node(router), &nodes, self.failover_grace);
        let due = failover_due(recorded_node(router), &nodes, self.failover_grace);
        if let Placement::Place(node) | Placement::Move { to: node, .. } = &placement {
            assumed.insert(uid, Assumption { node: node.clone() });
        }
        (placement, due)
    }

    fn forget(&self, uid: &str) {
        self.assumed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(uid);
    }

    /// The gateway's address, whether `status.externalIps` is to change, and the claims to
    /// release once status is written (none of them on the address status records).
    async fn gateway(
        &self,
        router: &v1::Router,
    ) -> Result<(Gateway, bool, Vec<ipam::ClaimRef>), ReconcileError> {
        let uid = &meta(router).uid;
        let claims = self.ip_claims.by_index(OWNER_UID, uid);
        let recorded: Option<IpAddr> = router
            .status
            .as_ref()
            .and_then(|s| s.external_ips.first())
            .and_then(|ip| ip.parse().ok());
        let Some(gateway) = router
            .spec
            .as_ref()
            .and_then(|s| s.external_gateway.clone())
        else {
            // Status drops the address first; its claim goes on a later pass.
            let release: Vec<ipam::ClaimRef> = claims
                .iter()
                .filter(|c| meta(c.as_ref()).deletion_timestamp.is_none())
                .filter(|c| {
                    recorded.is_none()
                        || c.spec.as_ref().and_then(|s| s.address.parse().ok()) != recorded
                })
                .map(|c| ipam::ClaimRef {
                    kind: Kind::IPAddress,
                    name: meta(c.as_ref()).name.clone(),
                    uid: meta(c.as_ref()).uid.clone(),
                })
                .collect();
            return Ok((Gateway::None, recorded.is_some(), release));
        };
        let project = &meta(router).project;
        let claim_refs: Vec<&v1::IpAddress> = claims.iter().map(|c| c.as_ref()).collect();
        let held = external::held_network_uid(&claim_refs, recorded)
            .and_then(|uid| self.networks.by_index(UID, uid).into_iter().next());
        let network: Result<Arc<v1::Network>, Unresolved> =
            external::planned_network(held, &gateway.network, || {
                resolve(
                    project,
                    &gateway.network,
                    self.networks.by_index(NETWORK_BY_NAME, &gateway.network),
                )
            });
        let facts = AddressFacts {
            network: network.as_deref().map_err(Clone::clone),
            network_name: &gateway.network,
            requested: &gateway.fixed_ip,
            recorded,
            claims: claims.iter().map(|c| c.as_ref()).collect(),
        };
        let plan = external::plan_address(&facts);
        let release = plan.release;
        match plan.address {
            AddressPlan::Blocked { condition, clear } => Ok((
                Gateway::Blocked(condition),
                clear && recorded.is_some(),
                release,
            )),
            AddressPlan::Claim {
                network_uid,
                range,
                want,
            } => {
                match external::claim_address(
                    &self.api,
                    &self.hints,
                    router,
                    &network_uid,
                    &range,
                    &want,
                )
                .await?
                {
                    Ok(ip) => Ok((
                        Gateway::Address(ip, gateway.network.clone()),
                        recorded != Some(ip),
                        release,
                    )),
                    // The recorded address's claim is gone and another holds it now:
                    // status must not keep it.
                    Err(blocked) => Ok((
                        Gateway::Blocked(blocked),
                        external::refused_recorded(&want, recorded),
                        release,
                    )),
                }
            }
        }
    }

    /// The Router's legs whose networks resolve.
    fn legs(&self, router: &v1::Router) -> Vec<Leg> {
        let project = &meta(router).project;
        router
            .spec
            .as_ref()
            .map(|s| s.interfaces.as_slice())
            .unwrap_or_default()
            .iter()
            .filter_map(|i| {
                let network = resolve(
                    project,
                    &i.network,
                    self.networks.by_index(NETWORK_BY_NAME, &i.network),
                )
                .ok()?;
                Some(Leg {
                    network_uid: meta(network.as_ref()).uid.clone(),
                    network: i.network.clone(),
                    subnet: i.subnet.clone(),
                })
            })
            .collect()
    }

    /// Whether an earlier Router joins one of this one's subnets (see the module notes).
    fn interface_conflict(&self, router: &v1::Router) -> Option<String> {
        let mine = self.legs(router);
        if mine.is_empty() {
            return None;
        }
        let uid = &meta(router).uid;
        let others: Vec<(RouterRank, Vec<Leg>)> = self
            .routers
            .list()
            .iter()
            .filter(|o| {
                let om = meta(o.as_ref());
                om.uid != *uid && om.deletion_timestamp.is_none()
            })
            .map(|o| (router_rank(o), self.legs(o)))
            .collect();
        interface_conflict(&router_rank(router), &mine, &others)
    }

    fn is_assumed(&self, uid: &str) -> bool {
        self.assumed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(uid)
    }

    async fn apply(&self, router: &v1::Router) -> Result<Action, ReconcileError> {
        let m = meta(router);
        if self.is_assumed(&m.uid) {
            // A placement was written and the cache has not shown it yet; that change
            // queues the router again.
            return Ok(Action::AwaitChange);
        }
        let (placement, due) = self.decide(router);
        // When the lost node's grace runs out, look again.
        let settle = |action: Action| match (action, due) {
            (Action::AwaitChange, Some(due)) => Action::Requeue(due),
            (Action::Requeue(after), Some(due)) => Action::Requeue(after.min(due)),
            (action, _) => action,
        };
        let (gateway, ips_changed, release) = match self.gateway(router).await {
            Ok(g) => g,
            Err(e) => {
                self.forget(&m.uid);
                return Err(e);
            }
        };
        let status = router.status.clone().unwrap_or_default();
        let node_ready = placement
            .node()
            .and_then(|n| self.nodes.get_named("", n))
            .is_some_and(|n| node_ready(&n));
        let wanted = with_interfaces(
            conditions(
                &placement,
                &gateway,
                &status.conditions,
                node_ready,
                m.generation,
            ),
            self.interface_conflict(router),
        );
        let node_changed = matches!(placement, Placement::Place(_) | Placement::Move { .. });
        let holds = status.observed_generation == m.generation
            && wanted
                .iter()
                .all(|c| condition_holds(&status.conditions, c, m.generation));
        if !node_changed && !ips_changed && holds {
            external::release_claims(&self.api, &release).await?;
            return Ok(settle(match (&placement, &gateway) {
                (
                    Placement::Nowhere(_) | Placement::Stranded { .. } | Placement::HeldOff { .. },
                    _,
                )
                | (_, Gateway::Blocked(_)) => Action::Requeue(RETRY),
                _ => Action::AwaitChange,
            }));
        }
        let mut fields = vec!["observedGeneration"];
        let mut new_status = v1::RouterStatus {
            observed_generation: m.generation,
            ..Default::default()
        };
        if node_changed {
            fields.push("node");
            new_status.node = placement.node().unwrap_or_default().to_owned();
        }
        if ips_changed {
            fields.push("externalIps");
            if let Gateway::Address(ip, _) = &gateway {
                new_status.external_ips = vec![ip.to_string()];
            }
        }
        // Decisions are guarded by the revision they were made from.
        let guard = if node_changed || ips_changed {
            m.resource_version
        } else {
            0
        };
        let object = Object::Router(v1::Router {
            metadata: router.metadata.clone(),
            spec: None,
            status: Some(new_status),
        });
        match self
            .api
            .update_status_at(
                object,
                owners::ROUTER_CONTROLLER,
                &fields,
                wanted.clone(),
                guard,
            )
            .await
        {
            Ok(_) => {}
            // Someone wrote the Router since it was read; that change queues it again.
            Err(Error::Conflict { .. } | Error::NotFound { .. }) => {
                self.forget(&m.uid);
                return Ok(Action::AwaitChange);
            }
            Err(e) => {
                self.forget(&m.uid);
                return Err(e.into());
            }
        }
        // Only now that status is written: none of these is an address it records.
        external::release_claims(&self.api, &release).await?;
        let previous = find(&status.conditions, SCHEDULED);
        let scheduled = &wanted[0];
        let told = previous
            .is_some_and(|p| p.reason == scheduled.reason && p.message == scheduled.message);
        match &placement {
            Placement::Move { .. } => {
                self.recorder
                    .warning(router, reason::FAILED_OVER, &scheduled.message)
                    .await;
            }
            Placement::Place(node) => {
                let message = format!("placed {}/{} on node {node}", m.project, m.name);
                self.recorder
                    .normal(router, reason::SCHEDULED, &message)
                    .await;
            }
            Placement::Nowhere(_) | Placement::Stranded { .. } | Placement::HeldOff { .. }
                if !told =>
            {
                self.recorder
                    .warning(router, &scheduled.reason, &scheduled.message)
                    .await;
            }
            _ => {}
        }
        Ok(settle(match (&placement, &gateway) {
            (Placement::Nowhere(_) | Placement::Stranded { .. } | Placement::HeldOff { .. }, _)
            | (_, Gateway::Blocked(_)) => Action::Requeue(RETRY),
            _ => Action::AwaitChange,
        }))
    }
}

impl Reconcile for RouterController {
    type Error = ReconcileError;

    async fn reconcile(&self, key: ObjectRef) -> Result<Action, ReconcileError> {
        let Some(router) = self.routers.get(&key) else {
            return Ok(Action::AwaitChange);
        };
        match finalizer::prepare(self.api.client(), ROUTER_FINALIZER, router.as_ref()).await? {
            Step::Skip => Ok(Action::AwaitChange),
            Step::Apply => self.apply(&router).await,
            Step::Cleanup(cleanup) => {
                let uid = &meta(router.as_ref()).uid;
                let claims: Vec<ipam::ClaimRef> = self
                    .ip_claims
                    .by_index(OWNER_UID, uid)
                    .iter()
                    .map(|c| ipam::ClaimRef {
                        kind: Kind::IPAddress,
                        name: meta(c.as_ref()).name.clone(),
                        uid: meta(c.as_ref()).uid.clone(),
                    })
                    .collect();
                external::release_claims(&self.api, &claims).await?;
                // A claim the cache has not shown yet goes with its owner, by the garbage
                // collector.
                self.forget(uid);
                cleanup.finish().await?;
                Ok(Action::AwaitChange)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GRACE: Duration = Duration::from_secs(30);

    fn node(name: &str, role: bool, ready: bool, lost: bool, routers: usize) -> NetworkNode {
        NetworkNode {
            name: name.into(),
            network_role: role,
            ready,
            lost: lost.then(|| "heartbeat lapsed".to_owned()),
            lapsed_for: if lost { GRACE } else { Duration::ZERO },
            cordoned: false,
            routers,
        }
    }

    #[test]
    fn placement() {
        let cases = vec![
            (
                "the network node with the fewest routers",
                "",
                vec![node("a", true, true, false, 2), node("b", true, true, false, 1)],
                Placement::Place("b".into()),
            ),
            (
                "a tie goes to the first by name",
                "",
                vec![node("b", true, true, false, 1), node("a", true, true, false, 1)],
                Placement::Place("a".into()),
            ),
            (
                "compute-only and unready nodes are not candidates",
                "",
                vec![node("a", false, true, false, 0), node("b", true, false, false, 0)],
                Placement::Nowhere(
                    "no Ready node with the network role: 2 nodes, 1 with the network role (1 not ready, 0 cordoned)".into(),
                ),
            ),
            (
                "a recorded node stays while merely not ready",
                "a",
                vec![node("a", true, false, false, 3), node("b", true, true, false, 0)],
                Placement::Stay("a".into()),
            ),
            (
                "a lost node's router moves",
                "a",
                vec![node("a", true, false, true, 3), node("b", true, true, false, 0)],
                Placement::Move {
                    from: "a".into(),
                    to: "b".into(),
                    why: "heartbeat lapsed".into(),
                },
            ),
            (
                "a vanished node's router moves",
                "gone",
                vec![node("b", true, true, false, 0)],
                Placement::Move {
                    from: "gone".into(),
                    to: "b".into(),
                    why: "node gone is gone".into(),
                },
            ),
            (
                "a lost node with nowhere to go strands the router",
                "a",
                vec![node("a", true, false, true, 1)],
                Placement::Stranded {
                    node: "a".into(),
                    why: "heartbeat lapsed; no Ready node with the network role: 0 nodes, 0 with the network role (0 not ready, 0 cordoned)".into(),
                },
            ),
        ];
        for (what, current, nodes, want) in cases {
            assert_eq!(place(current, &nodes, GRACE), want, "{what}");
        }
        // Failover waits out the grace period, and holds off when most nodes lapsed.
        let mut blip = node("a", true, false, true, 1);
        blip.lapsed_for = Duration::from_secs(10);
        let others = || {
            vec![
                node("b", true, true, false, 0),
                node("c", true, true, false, 0),
            ]
        };
        let nodes: Vec<NetworkNode> = std::iter::once(blip.clone()).chain(others()).collect();
        assert_eq!(
            place("a", &nodes, GRACE),
            Placement::Stay("a".into()),
            "a lapse shorter than the grace period moves nothing"
        );
        assert_eq!(
            failover_due("a", &nodes, GRACE),
            Some(Duration::from_secs(20)),
            "and the router is looked at again when it runs out"
        );
        assert_eq!(failover_due("b", &nodes, GRACE), None, "b is not lost");
        assert_eq!(
            failover_due("a", &[node("a", true, false, true, 1)], GRACE),
            None,
            "the grace has run out"
        );
        let stalled = vec![
            node("a", true, false, true, 1),
            node("b", true, false, true, 1),
            node("c", true, true, false, 0),
        ];
        assert_eq!(
            place("a", &stalled, GRACE),
            Placement::HeldOff {
                node: "a".into(),
                why: "heartbeat lapsed; not failing over: 2 of 3 network nodes lapsed together, which looks like a control-plane stall".into(),
            },
            "two of three network nodes lapsing together is a stall, not two deaths"
        );
        let one_of_three = vec![
            node("a", true, false, true, 1),
            node("b", true, true, false, 1),
            node("c", true, true, false, 0),
        ];
        assert_eq!(
            place("a", &one_of_three, GRACE),
            Placement::Move {
                from: "a".into(),
                to: "c".into(),
                why: "heartbeat lapsed".into(),
            },
            "one of three is a lost node"
        );
        let held = conditions(&place("a", &stalled, GRACE), &Gateway::None, &[], false, 1);
        assert_eq!(
            (held[0].status, held[0].reason.as_str()),
            (v1::condition::Status::False as i32, "FailoverHeldOff")
        );
        assert_eq!(held[2].reason, "FailoverHeldOff", "Ready says why too");

        let mut cordoned = node("a", true, true, false, 0);
        cordoned.cordoned = true;
        assert_eq!(
            place("", &[cordoned, node("b", true, true, false, 5)], GRACE),
            Placement::Place("b".into()),
            "a cordoned node takes no new routers"
        );
    }

    #[test]
    fn a_subnet_takes_one_router() {
        let leg = |uid: &str, subnet: &str| Leg {
            network_uid: uid.into(),
            network: format!("net-{uid}"),
            subnet: subnet.into(),
        };
        let at = |secs: i64, project: &str, name: &str| ((secs, 0), project.into(), name.into());
        let others = vec![
            (at(5, "p", "b"), vec![leg("u1", "a")]),
            (at(5, "p", "a"), vec![leg("u2", "x"), leg("u1", "a")]),
            (at(1, "q", "z"), vec![leg("u9", "a")]),
        ];
        let mine = vec![leg("u1", "b"), leg("u1", "a")];
        assert_eq!(
            interface_conflict(&at(9, "p", "c"), &mine, &others).as_deref(),
            Some("subnet a of network net-u1 already has router p/a"),
            "a later router is refused, naming the earliest"
        );
        assert_eq!(
            interface_conflict(&at(4, "p", "m"), &mine, &others),
            None,
            "an earlier router keeps it"
        );
        assert_eq!(
            interface_conflict(&at(9, "p", "c"), &[leg("u1", "b")], &others),
            None,
            "another subnet of the same network is free"
        );
        assert_eq!(
            interface_conflict(&at(9, "p", "c"), &[leg("u3", "a")], &others),
            None,
            "the same subnet name on another network is another subnet"
        );
        let ready = condition("Ready", true, reason::PLUMBED, "built");
        let said = with_interfaces(vec![ready.clone()], Some("taken".into()));
        let reasons: Vec<(&str, &str)> = said
            .iter()
            .map(|c| (c.r#type.as_str(), c.reason.as_str()))
            .collect();
        assert_eq!(
            reasons,
            [
                ("Ready", "InterfaceConflict"),
                ("Interfaces", "InterfaceConflict")
            ]
        );
        let fine = with_interfaces(vec![ready], None);
        assert_eq!(fine[0].reason, reason::PLUMBED);
        assert_eq!(fine[1].reason, reason::NO_CONFLICT);
    }

    fn status_of(c: &v1::Condition) -> (bool, &str) {
        (
            c.status == v1::condition::Status::True as i32,
            c.reason.as_str(),
        )
    }

    #[test]
    fn readiness_waits_for_placement_gateway_and_agent() {
        let ip: IpAddr = "203.0.113.11".parse().unwrap();
        let addressed = Gateway::Address(ip, "public".into());
        let plumbed_on = |node: &str, generation: i64| v1::Condition {
            observed_generation: generation,
            ..condition(
                PLUMBED,
                true,
                "Built",
                plumbed_message(&router_subject(node), "qrouter built"),
            )
        };
        let plumbed = plumbed_on("a", 1);
        let missing = Gateway::Blocked(condition(
            "Ready",
            false,
            "NetworkNotFound",
            "network public not found",
        ));
        /// What, placement, gateway, existing conditions, node ready, and the
        /// `(True?, reason)` of `Scheduled`, `ExternalGateway` and `Ready`.
        type Case = (
            &'static str,
            Placement,
            Gateway,
            Vec<v1::Condition>,
            bool,
            [(bool, &'static str); 3],
        );
        let cases: Vec<Case> = vec![
            (
                "nowhere to run",
                Placement::Nowhere("none".into()),
                Gateway::None,
                vec![],
                false,
                [
                    (false, "NoNetworkNode"),
                    (true, "NoGateway"),
                    (false, "NoNetworkNode"),
                ],
            ),
            (
                "placed, gateway addressed, agent not yet",
                Placement::Place("a".into()),
                addressed.clone(),
                vec![],
                true,
                [
                    (true, "Scheduled"),
                    (true, "Allocated"),
                    (false, "WaitingForAgent"),
                ],
            ),
            (
                "a missing external network is a condition, not a refusal",
                Placement::Stay("a".into()),
                missing,
                vec![plumbed.clone()],
                true,
                [
                    (true, "Scheduled"),
                    (false, "NetworkNotFound"),
                    (false, "NetworkNotFound"),
                ],
            ),
            (
                "ready when the agent says plumbed",
                Placement::Stay("a".into()),
                addressed.clone(),
                vec![plumbed.clone()],
                true,
                [(true, "Scheduled"), (true, "Allocated"), (true, "Plumbed")],
            ),
            (
                "a node not ready is not ready",
                Placement::Stay("a".into()),
                addressed.clone(),
                vec![plumbed.clone()],
                false,
                [
                    (true, "Scheduled"),
                    (true, "Allocated"),
                    (false, "NodeNotReady"),
                ],
            ),
            (
                "a move says so",
                Placement::Move {
                    from: "a".into(),
                    to: "b".into(),
                    why: "lapsed".into(),
                },
                addressed.clone(),
                vec![],
                true,
                [
                    (true, "FailedOver"),
                    (true, "Allocated"),
                    (false, "WaitingForAgent"),
                ],
            ),
            (
                "and keeps saying so on the new node",
                Placement::Stay("b".into()),
                addressed.clone(),
                vec![condition(
                    SCHEDULED,
                    true,
                    "FailedOver",
                    "moved to node b from lost node a: lapsed",
                )],
                true,
                [
                    (true, "FailedOver"),
                    (true, "Allocated"),
                    (false, "WaitingForAgent"),
                ],
            ),
            (
                "a Plumbed left by the lost node does not make the moved router ready",
                Placement::Move {
                    from: "a".into(),
                    to: "b".into(),
                    why: "lapsed".into(),
                },
                addressed.clone(),
                vec![plumbed.clone()],
                true,
                [
                    (true, "FailedOver"),
                    (true, "Allocated"),
                    (false, "WaitingForAgent"),
                ],
            ),
            (
                "nor once it stays on the new node",
                Placement::Stay("b".into()),
                addressed.clone(),
                vec![plumbed.clone()],
                true,
                [
                    (true, "Scheduled"),
                    (true, "Allocated"),
                    (false, "WaitingForAgent"),
                ],
            ),
            (
                "the new node's Plumbed does",
                Placement::Stay("b".into()),
                addressed.clone(),
                vec![plumbed_on("b", 1)],
                true,
                [(true, "Scheduled"), (true, "Allocated"), (true, "Plumbed")],
            ),
            (
                "a Plumbed of an older generation is stale",
                Placement::Stay("a".into()),
                addressed.clone(),
                vec![plumbed_on("a", 0)],
                true,
                [
                    (true, "Scheduled"),
                    (true, "Allocated"),
                    (false, "WaitingForAgent"),
                ],
            ),
            (
                "a node whose name begins like another's is not it",
                Placement::Stay("a".into()),
                addressed.clone(),
                vec![v1::Condition {
                    message: "node ab: qrouter built".into(),
                    ..plumbed_on("a", 1)
                }],
                true,
                [
                    (true, "Scheduled"),
                    (true, "Allocated"),
                    (false, "WaitingForAgent"),
                ],
            ),
            (
                "stranded",
                Placement::Stranded {
                    node: "a".into(),
                    why: "lapsed".into(),
                },
                addressed,
                vec![plumbed],
                false,
                [
                    (false, "NodeLost"),
                    (true, "Allocated"),
                    (false, "NodeLost"),
                ],
            ),
        ];
        for (what, placement, gateway, existing, ready, want) in cases {
            let got = conditions(&placement, &gateway, &existing, ready, 1);
            let types: Vec<&str> = got.iter().map(|c| c.r#type.as_str()).collect();
            assert_eq!(types, [SCHEDULED, EXTERNAL_GATEWAY, "Ready"], "{what}");
            let got: Vec<(bool, &str)> = got.iter().map(status_of).collect();
            assert_eq!(got, want, "{what}");
        }
    }
}
