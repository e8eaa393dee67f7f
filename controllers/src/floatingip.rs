//! The floating IP controller: an address on an external network for each FloatingIP, the
//! private address it maps to, and the Router that does the translation.
//!
//! **The address** is an `IPAddress` claim on `spec.network` owned by the FloatingIP, the
//! same claims Ports and router gateways hold ([`crate::ipam::external`]), honouring
//! `spec.address`; `status.address` records it once. A missing network, or one that is not
//! external, is a condition, not an error: the address comes when the network does.
//!
//! **The association** is an observation, recomputed on every pass from the Ports, Servers
//! and Routers of the FloatingIP's project ([`associate`], pure): the target is `spec.port`,
//! or the first Port of `spec.server` (in the order of `status.ports`) on a network some
//! Router connects to the FloatingIP's external network; the private address is
//! `spec.fixedIp` or the port's first IPv4 address; the Router is the one whose gateway is
//! on the external network and which has a leg on the port's subnet — of several, the one
//! that keeps the subnet (the earliest, by creation time, project and name; a later one is
//! in `InterfaceConflict`). Routers of other projects on a shared network are not seen.
//! `status.fixedIp` and `status.router` follow, and `Associated` says which port, or why
//! none (`PortNotFound`, `NoRouter`, …). One private address takes one FloatingIP: when two
//! map the same port's address, the earlier (by creation time, then name) keeps it and the
//! later is `Associated=False` (`FixedIpInUse`) naming it ([`first_mapping`]). Moving the
//! FloatingIP to another target, or
//! clearing it, rewrites them; the agent on the router's node turns them into rules.
//!
//! **`Ready`** is `True` once the address is held, the FloatingIP is associated, and the
//! agent reports `Plumbed=True` for that very mapping; until then it carries the first
//! reason that holds it back.
//!
//! **The `Plumbed` contract** is the router's ([`crate::router`]): the agent on the router's
//! node writes the message with [`plumbed_subject`] as its subject, `node <name>: <fixedIp>
//! via router <router>`, then `: ` and details. A `Plumbed` counts only when it is of the
//! current generation and names the node, private address and router the FloatingIP maps
//! through now, so one left from before a move, a failover or a new target is stale.
//!
//! **Deletion.** The finalizer [`FLOATING_IP_FINALIZER`] releases the address's claim before
//! the FloatingIP goes.

use std::{collections::BTreeSet, net::IpAddr, sync::Arc, time::Duration};

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
    router::{RouterRank, router_rank},
};
use ferro_runtime::{
    Action, Caches, Controller, ObjectRef, Reconcile, ReconcileError, Store, condition,
    condition_holds,
    controller::Settings,
    finalizer::{self, Step},
    meta,
    metrics::Metrics,
    reflector::{OWNER_UID, UID},
};

/// The finalizer that releases a FloatingIP's address before it goes.
pub const FLOATING_IP_FINALIZER: &str = "ferro.io/floating-ip-claims";
/// The condition naming the port the address maps to, or why none.
pub const ASSOCIATED: &str = "Associated";
/// The agent's condition: the translation is in place on the router's node.
pub const PLUMBED: &str = "Plumbed";

/// Condition reasons the floating IP controller writes.
pub mod reason {
    /// Mapped to a port through a router.
    pub const ASSOCIATED: &str = "Associated";
    /// Neither `port` nor `server` is set.
    pub const NO_TARGET: &str = "NoTarget";
    /// The named Port does not exist.
    pub const PORT_NOT_FOUND: &str = "PortNotFound";
    /// The named Server does not exist.
    pub const SERVER_NOT_FOUND: &str = "ServerNotFound";
    /// The Server has no ports (yet).
    pub const SERVER_HAS_NO_PORTS: &str = "ServerHasNoPorts";
    /// The Port has no addresses yet.
    pub const PORT_NOT_ADDRESSED: &str = "PortNotAddressed";
    /// `spec.fixedIp` is not an address of the port.
    pub const FIXED_IP_NOT_FOUND: &str = "FixedIpNotFound";
    /// The port has no IPv4 address to default to.
    pub const NO_IPV4_ADDRESS: &str = "NoIPv4Address";
    /// No Router connects the port's subnet to the external network.
    pub const NO_ROUTER: &str = "NoRouter";
    /// An earlier FloatingIP maps the same private address.
    pub const FIXED_IP_IN_USE: &str = "FixedIpInUse";
    /// The agent has not reported the translation in place.
    pub const WAITING_FOR_AGENT: &str = "WaitingForAgent";
    /// The agent reports the translation in place.
    pub const PLUMBED: &str = "Plumbed";
}

/// How often a FloatingIP whose address is blocked is looked at again without a change.
const RETRY: Duration = Duration::from_secs(60);

const BY_PROJECT: &str = "fip-project";
const BY_NETWORK_NAME: &str = "fip-network";
const NETWORK_BY_NAME: &str = "fip-network-name";

// ---------------------------------------------------------------------------------------
// Association.

/// What association needs of one Router, its names resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouterLinks {
    /// The Router's name.
    pub name: String,
    /// The uid of the Network its gateway is on, if it resolves.
    pub gateway: Option<String>,
    /// Its legs: `(network uid, subnet name)`.
    pub interfaces: Vec<(String, String)>,
    /// Where it ranks among routers sharing a subnet: the earliest keeps the subnet, and a
    /// later one is in `InterfaceConflict` (see [`crate::router`]).
    pub rank: RouterRank,
}

/// What the FloatingIP targets, as found in the caches.
pub enum TargetFacts<'a> {
    /// Neither `port` nor `server`.
    None,
    /// The named Port or Server does not exist, or the Server has no ports yet.
    Missing {
        /// `PortNotFound`, `ServerNotFound` or `ServerHasNoPorts`.
        reason: &'static str,
        /// For people.
        message: String,
    },
    /// The candidate Ports, in order: the named Port, or the Server's.
    Ports(Vec<&'a v1::Port>),
}

/// What association knows.
pub struct AssociationFacts<'a> {
    /// The external Network's name (`spec.network`).
    pub network_name: &'a str,
    /// Its uid, when it resolves.
    pub network_uid: Option<&'a str>,
    /// `spec.fixedIp`; empty for the port's first IPv4 address.
    pub fixed_ip: &'a str,
    /// The target.
    pub target: TargetFacts<'a>,
    /// The Routers of the project.
    pub routers: &'a [RouterLinks],
}

/// Where the address maps to, or why nowhere.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Association {
    /// Mapped.
    Associated {
        /// The Port's name.
        port: String,
        /// The private address.
        fixed_ip: IpAddr,
        /// The Router's name.
        router: String,
    },
    /// Not mapped.
    NotAssociated {
        /// The condition reason.
        reason: String,
        /// For people.
        message: String,
    },
}

fn not(reason: &str, message: String) -> Association {
    Association::NotAssociated {
        reason: reason.to_owned(),
        message,
    }
}

/// Associates through one port: its private address, and the router that connects its
/// subnet to the external network.
fn through(port: &v1::Port, facts: &AssociationFacts<'_>) -> Association {
    let name = meta(port).name.clone();
    let status = port.status.clone().unwrap_or_default();
    if status.addresses.is_empty() || status.network_uid.is_empty() {
        return not(
            reason::PORT_NOT_ADDRESSED,
            format!("port {name} has no addresses yet"),
        );
    }
    let parsed: Vec<(IpAddr, &str)> = status
        .addresses
        .iter()
        .filter_map(|a| Some((a.ip.parse().ok()?, a.subnet.as_str())))
        .collect();
    let chosen = if facts.fixed_ip.is_empty() {
        match parsed.iter().find(|(ip, _)| ip.is_ipv4()) {
            Some(found) => *found,
            None => {
                return not(
                    reason::NO_IPV4_ADDRESS,
                    format!("port {name} has no IPv4 address"),
                );
            }
        }
    } else {
        match parsed
            .iter()
            .find(|(ip, _)| facts.fixed_ip.parse::<IpAddr>().ok() == Some(*ip))
        {
            Some(found) => *found,
            None => {
                return not(
                    reason::FIXED_IP_NOT_FOUND,
                    format!("{} is not an address of port {name}", facts.fixed_ip),
                );
            }
        }
    };
    let (ip, subnet) = chosen;
    let network = port
        .spec
        .as_ref()
        .map(|s| s.network.as_str())
        .unwrap_or_default();
    let no_router = || {
        not(
            reason::NO_ROUTER,
            format!(
                "no router connects network {network} (subnet {subnet}) to external network {}",
                facts.network_name
            ),
        )
    };
    let Some(external) = facts.network_uid else {
        return no_router();
    };
    let mut routers: Vec<&RouterLinks> = facts
        .routers
        .iter()
        .filter(|r| {
            r.gateway.as_deref() == Some(external)
                && r.interfaces
                    .iter()
                    .any(|(n, s)| *n == status.network_uid && s == subnet)
        })
        .collect();
    // Of routers sharing the subnet, the one that keeps it: never one in conflict.
    routers.sort_by(|a, b| a.rank.cmp(&b.rank));
    match routers.first() {
        Some(router) => Association::Associated {
            port: name,
            fixed_ip: ip,
            router: router.name.clone(),
        },
        None => no_router(),
    }
}

/// Decides where a FloatingIP maps to. Pure.
pub fn associate(facts: &AssociationFacts<'_>) -> Association {
    match &facts.target {
        TargetFacts::None => not(reason::NO_TARGET, "no port or server named".into()),
        TargetFacts::Missing { reason, message } => not(reason, message.clone()),
        TargetFacts::Ports(ports) => {
            // The first port that maps wins; otherwise the first port's reason says why.
            let mut first = None;
            for port in ports {
                match through(port, facts) {
                    found @ Association::Associated { .. } => return found,
                    other => {
                        first.get_or_insert(other);
                    }
                }
            }
            first.unwrap_or_else(|| {
                not(
                    reason::SERVER_HAS_NO_PORTS,
                    "the server has no ports yet".into(),
                )
            })
        }
    }
}

/// Where a FloatingIP ranks among those mapping the same address: earlier creation time
/// first, then name.
pub type Rank = ((i64, i32), String);

/// The rank of a FloatingIP.
pub fn rank(fip: &v1::FloatingIp) -> Rank {
    let m = meta(fip);
    let created = m
        .creation_timestamp
        .as_ref()
        .map(|t| (t.seconds, t.nanos))
        .unwrap_or_default();
    (created, m.name.clone())
}

/// The association once other FloatingIPs of the project are counted: if an earlier one
/// (`others`: rank and association) maps the same port's private address, this one is
/// `FixedIpInUse`, naming the earliest. Pure.
pub fn first_mapping(mine: Association, me: &Rank, others: &[(Rank, Association)]) -> Association {
    let Association::Associated { port, fixed_ip, .. } = &mine else {
        return mine;
    };
    let earlier = others
        .iter()
        .filter(|(r, a)| {
            r < me
                && matches!(a, Association::Associated { port: p, fixed_ip: ip, .. }
                    if p == port && ip == fixed_ip)
        })
        .min_by(|a, b| a.0.cmp(&b.0));
    match earlier {
        Some(((_, other), _)) => not(
            reason::FIXED_IP_IN_USE,
            format!("{fixed_ip} of port {port} is already mapped by floating IP {other}"),
        ),
        None => mine,
    }
}

/// What became of the address.
#[derive(Clone, Debug, PartialEq)]
pub enum Address {
    /// Held.
    Held(IpAddr),
    /// Not held; the condition (type `Ready`) says why.
    Blocked(v1::Condition),
}

/// The `Associated=True` message: `mapped to <fixedIp> of port <port> through router
/// <router>`; [`associated_port`] reads the port back.
pub fn associated_message(fixed_ip: IpAddr, port: &str, router: &str) -> String {
    format!("mapped to {fixed_ip} of port {port} through router {router}")
}

/// The port the controller resolved, from an `Associated=True` condition among
/// `conditions` (status has no field for it), for `ferro get -o wide`.
pub fn associated_port(conditions: &[v1::Condition]) -> Option<&str> {
    let c = conditions.iter().find(|c| {
        c.r#type == ASSOCIATED
            && c.status == v1::condition::Status::True as i32
            && c.reason == reason::ASSOCIATED
    })?;
    let rest = c.message.strip_prefix("mapped to ")?;
    let (_, rest) = rest.split_once(" of port ")?;
    let (port, _) = rest.rsplit_once(" through router ")?;
    Some(port)
}

/// The subject of the agent's `Plumbed` message for a mapping to `fixed_ip` through
/// `router`, built on `node`.
pub fn plumbed_subject(node: &str, fixed_ip: IpAddr, router: &str) -> String {
    format!("node {node}: {fixed_ip} via router {router}")
}

/// The `Associated` and `Ready` conditions of a FloatingIP. Pure.
///
/// `router_node` is the node of the Router it maps through, if placed; the agent's
/// `Plumbed` counts only if it names that node and the mapping, at `generation`.
pub fn conditions(
    address: &Address,
    association: &Association,
    existing: &[v1::Condition],
    router_node: Option<&str>,
    generation: i64,
) -> Vec<v1::Condition> {
    let associated = match association {
        Association::Associated {
            port,
            fixed_ip,
            router,
        } => condition(
            ASSOCIATED,
            true,
            reason::ASSOCIATED,
            associated_message(*fixed_ip, port, router),
        ),
        Association::NotAssociated { reason, message } => {
            condition(ASSOCIATED, false, reason, message.clone())
        }
    };
    let plumbed = match (association, router_node) {
        (
            Association::Associated {
                fixed_ip, router, ..
            },
            Some(node),
        ) => crate::router::plumbed_current(
            existing,
            &plumbed_subject(node, *fixed_ip, router),
            generation,
        ),
        _ => None,
    };
    let ready = match (address, association) {
        (Address::Blocked(c), _) => c.clone(),
        (_, Association::NotAssociated { reason, message }) => {
            condition("Ready", false, reason, message.clone())
        }
        _ => match plumbed {
            Some(p) if p.status == v1::condition::Status::True as i32 => {
                condition("Ready", true, reason::PLUMBED, p.message.clone())
            }
            Some(p) if !p.reason.is_empty() => {
                condition("Ready", false, &p.reason, p.message.clone())
            }
            _ => condition(
                "Ready",
                false,
                reason::WAITING_FOR_AGENT,
                "the router's node has not reported the translation in place",
            ),
        },
    };
    vec![associated, ready]
}

// ---------------------------------------------------------------------------------------
// The controller.

/// The floating IP controller: reconciles FloatingIPs.
pub struct FloatingIpController {
    api: Api,
    hints: Arc<Hints>,
    fips: Store<v1::FloatingIp>,
    networks: Store<v1::Network>,
    ports: Store<v1::Port>,
    servers: Store<v1::Server>,
    routers: Store<v1::Router>,
    ip_claims: Store<v1::IpAddress>,
}

fn fip_spec(fip: &v1::FloatingIp) -> v1::FloatingIpSpec {
    fip.spec.clone().unwrap_or_default()
}

impl FloatingIpController {
    /// Builds the controller over the shared caches.
    pub fn build(
        api: &Api,
        caches: &Caches,
        metrics: &Metrics,
        settings: Settings,
    ) -> (Controller, Arc<FloatingIpController>) {
        let fips = caches.store::<v1::FloatingIp>();
        let networks = caches.store::<v1::Network>();
        let ports = caches.store::<v1::Port>();
        let servers = caches.store::<v1::Server>();
        let routers = caches.store::<v1::Router>();
        let ip_claims = caches.store::<v1::IpAddress>();
        fips.add_index(BY_PROJECT, |f: &v1::FloatingIp| {
            vec![meta(f).project.clone()]
        });
        fips.add_index(BY_NETWORK_NAME, |f: &v1::FloatingIp| {
            vec![fip_spec(f).network]
        });
        networks.add_index(NETWORK_BY_NAME, |n: &v1::Network| {
            vec![meta(n).name.clone()]
        });
        let hints = Arc::new(Hints::new());
        ipam::follow_ip_claims(&hints, &ip_claims);

        // Ports, Servers and Routers of a project may change any association in it.
        fn in_project(fips: &Store<v1::FloatingIp>, project: &str) -> Vec<ObjectRef> {
            fips.by_index(BY_PROJECT, project)
                .iter()
                .map(|f| ObjectRef::of(f.as_ref()))
                .collect()
        }
        let (f1, f2, f3, f4) = (fips.clone(), fips.clone(), fips.clone(), fips.clone());
        let (f5, f6) = (fips.clone(), fips.clone());
        let controller = Controller::new("floating-ip", settings, metrics.clone())
            .reconciles(&fips)
            .owns(&ip_claims, Kind::FloatingIP)
            .watches(&ip_claims, move |c| {
                // A freed address may be the one a FloatingIP without one waits for.
                if c.new.is_some() {
                    return Vec::new();
                }
                f5.list()
                    .iter()
                    .filter(|f| f.status.as_ref().is_none_or(|s| s.address.is_empty()))
                    .map(|f| ObjectRef::of(f.as_ref()))
                    .collect()
            })
            .watches(&fips, move |c| {
                // Which of two FloatingIPs keeps a private address depends on the other.
                let mut keys = BTreeSet::new();
                for f in c.old.iter().chain(c.new.iter()) {
                    keys.extend(in_project(&f6, &meta(f.as_ref()).project));
                }
                keys.into_iter().collect()
            })
            .watches(&ports, move |c| {
                let mut keys = BTreeSet::new();
                for p in c.old.iter().chain(c.new.iter()) {
                    keys.extend(in_project(&f1, &meta(p.as_ref()).project));
                }
                keys.into_iter().collect()
            })
            .watches(&servers, move |c| {
                let mut keys = BTreeSet::new();
                for s in c.old.iter().chain(c.new.iter()) {
                    keys.extend(in_project(&f2, &meta(s.as_ref()).project));
                }
                keys.into_iter().collect()
            })
            .watches(&routers, move |c| {
                let mut keys = BTreeSet::new();
                for r in c.old.iter().chain(c.new.iter()) {
                    keys.extend(in_project(&f3, &meta(r.as_ref()).project));
                }
                keys.into_iter().collect()
            })
            .watches(&networks, move |c| {
                // A network's uid is what routers and ports are matched by: any network
                // change may matter to every FloatingIP naming it or routed through it.
                let mut keys = BTreeSet::new();
                for n in c.old.iter().chain(c.new.iter()) {
                    let m = meta(n.as_ref());
                    keys.extend(
                        f4.by_index(BY_NETWORK_NAME, &m.name)
                            .iter()
                            .map(|f| ObjectRef::of(f.as_ref())),
                    );
                    keys.extend(in_project(&f4, &m.project));
                }
                keys.into_iter().collect()
            });
        let reconciler = Arc::new(FloatingIpController {
            api: api.clone(),
            hints,
            fips,
            networks,
            ports,
            servers,
            routers,
            ip_claims,
        });
        (controller, reconciler)
    }

    fn resolve_network(&self, project: &str, name: &str) -> Result<Arc<v1::Network>, Unresolved> {
        resolve(project, name, self.networks.by_index(NETWORK_BY_NAME, name))
    }

    /// The external network an address holder (this FloatingIP, or a Router's gateway)
    /// plans on: the one its recorded address was claimed on while the spec still names
    /// it, else the one `name` resolves to (see [`external::held_network_uid`]).
    fn holder_network(
        &self,
        owner_uid: &str,
        recorded: Option<IpAddr>,
        project: &str,
        name: &str,
    ) -> Result<Arc<v1::Network>, Unresolved> {
        let claims = self.ip_claims.by_index(OWNER_UID, owner_uid);
        let refs: Vec<&v1::IpAddress> = claims.iter().map(|c| c.as_ref()).collect();
        let held = external::held_network_uid(&refs, recorded)
            .and_then(|uid| self.networks.by_index(UID, uid).into_iter().next());
        external::planned_network(held, name, || self.resolve_network(project, name))
    }

    /// The Routers of a project with their references resolved to uids.
    fn router_links(&self, project: &str) -> Vec<RouterLinks> {
        self.routers
            .list()
            .iter()
            .filter(|r| {
                meta(r.as_ref()).project == project && meta(r.as_ref()).deletion_timestamp.is_none()
            })
            .map(|r| {
                let spec = r.spec.clone().unwrap_or_default();
                let uid_of = |name: &str| {
                    self.resolve_network(project, name)
                        .ok()
                        .map(|n| meta(n.as_ref()).uid.clone())
                };
                let recorded = r
                    .status
                    .as_ref()
                    .and_then(|s| s.external_ips.first())
                    .and_then(|ip| ip.parse().ok());
                RouterLinks {
                    rank: router_rank(r),
                    name: meta(r.as_ref()).name.clone(),
                    gateway: spec.external_gateway.as_ref().and_then(|g| {
                        self.holder_network(&meta(r.as_ref()).uid, recorded, project, &g.network)
                            .ok()
                            .map(|n| meta(n.as_ref()).uid.clone())
                    }),
                    interfaces: spec
                        .interfaces
                        .iter()
                        .filter_map(|i| Some((uid_of(&i.network)?, i.subnet.clone())))
                        .collect(),
                }
            })
            .collect()
    }

    /// The address, whether `status.address` is to change, and the claims to release once
    /// status is written (none of them on the address status records).
    async fn address(
        &self,
        fip: &v1::FloatingIp,
    ) -> Result<(Address, bool, Vec<ipam::ClaimRef>), ReconcileError> {
        let m = meta(fip);
        let spec = fip_spec(fip);
        let claims = self.ip_claims.by_index(OWNER_UID, &m.uid);
        let recorded: Option<IpAddr> = fip.status.as_ref().and_then(|s| s.address.parse().ok());
        let network = self.holder_network(&m.uid, recorded, &m.project, &spec.network);
        let facts = AddressFacts {
            network: network.as_deref().map_err(Clone::clone),
            network_name: &spec.network,
            requested: &spec.address,
            recorded,
            claims: claims.iter().map(|c| c.as_ref()).collect(),
        };
        let plan = external::plan_address(&facts);
        let release = plan.release;
        match plan.address {
            AddressPlan::Blocked { condition, clear } => Ok((
                Address::Blocked(condition),
                clear && recorded.is_some(),
                release,
            )),
            AddressPlan::Claim {
                network_uid,
                range,
                want,
            } => match external::claim_address(
                &self.api,
                &self.hints,
                fip,
                &network_uid,
                &range,
                &want,
            )
            .await?
            {
                Ok(ip) => Ok((Address::Held(ip), recorded != Some(ip), release)),
                // The recorded address's claim is gone and another holds it now: status
                // must not keep it.
                Err(blocked) => Ok((
                    Address::Blocked(blocked),
                    external::refused_recorded(&want, recorded),
                    release,
                )),
            },
        }
    }

    fn association(&self, fip: &v1::FloatingIp) -> Association {
        let m = meta(fip);
        let spec = fip_spec(fip);
        let recorded = fip.status.as_ref().and_then(|s| s.address.parse().ok());
        let network = self
            .holder_network(&m.uid, recorded, &m.project, &spec.network)
            .ok();
        let network_uid = network.as_ref().map(|n| meta(n.as_ref()).uid.clone());
        let ports_of_server: Vec<Arc<v1::Port>>;
        let named_port: Arc<v1::Port>;
        let target = if !spec.port.is_empty() {
            match self.ports.get_named(&m.project, &spec.port) {
                Some(port) => {
                    named_port = port;
                    TargetFacts::Ports(vec![named_port.as_ref()])
                }
                None => TargetFacts::Missing {
                    reason: reason::PORT_NOT_FOUND,
                    message: format!("port {} not found in project {}", spec.port, m.project),
                },
            }
        } else if !spec.server.is_empty() {
            match self.servers.get_named(&m.project, &spec.server) {
                None => TargetFacts::Missing {
                    reason: reason::SERVER_NOT_FOUND,
                    message: format!("server {} not found in project {}", spec.server, m.project),
                },
                Some(server) => {
                    ports_of_server = server
                        .status
                        .as_ref()
                        .map(|s| s.ports.as_slice())
                        .unwrap_or_default()
                        .iter()
                        .filter_map(|name| self.ports.get_named(&m.project, name))
                        .collect();
                    if ports_of_server.is_empty() {
                        TargetFacts::Missing {
                            reason: reason::SERVER_HAS_NO_PORTS,
                            message: format!("server {} has no ports yet", spec.server),
                        }
                    } else {
                        TargetFacts::Ports(ports_of_server.iter().map(|p| p.as_ref()).collect())
                    }
                }
            }
        } else {
            TargetFacts::None
        };
        let routers = self.router_links(&m.project);
        associate(&AssociationFacts {
            network_name: &spec.network,
            network_uid: network_uid.as_deref(),
            fixed_ip: &spec.fixed_ip,
            target,
            routers: &routers,
        })
    }

    async fn apply(&self, fip: &v1::FloatingIp) -> Result<Action, ReconcileError> {
        let m = meta(fip);
        let (address, address_changed, release) = self.address(fip).await?;
        let others: Vec<(Rank, Association)> = self
            .fips
            .by_index(BY_PROJECT, &m.project)
            .iter()
            .filter(|o| {
                let om = meta(o.as_ref());
                om.uid != m.uid && om.deletion_timestamp.is_none()
            })
            .map(|o| (rank(o), self.association(o)))
            .collect();
        let association = first_mapping(self.association(fip), &rank(fip), &others);
        let status = fip.status.clone().unwrap_or_default();
        let router_node = match &association {
            Association::Associated { router, .. } => self
                .routers
                .get_named(&m.project, router)
                .and_then(|r| r.status.as_ref().map(|s| s.node.clone()))
                .filter(|n| !n.is_empty()),
            Association::NotAssociated { .. } => None,
        };
        let wanted = conditions(
            &address,
            &association,
            &status.conditions,
            router_node.as_deref(),
            m.generation,
        );
        let (fixed_ip, router) = match &association {
            Association::Associated {
                fixed_ip, router, ..
            } => (fixed_ip.to_string(), router.clone()),
            Association::NotAssociated { .. } => (String::new(), String::new()),
        };
        let observed_changed = status.fixed_ip != fixed_ip || status.router != router;
        let holds = status.observed_generation == m.generation
            && wanted
                .iter()
                .all(|c| condition_holds(&status.conditions, c, m.generation));
        let retry = if matches!(address, Address::Blocked(_)) {
            Action::Requeue(RETRY)
        } else {
            Action::AwaitChange
        };
        if !address_changed && !observed_changed && holds {
            external::release_claims(&self.api, &release).await?;
            return Ok(retry);
        }
        let mut fields = vec!["observedGeneration", "fixedIp", "router"];
        let mut new_status = v1::FloatingIpStatus {
            fixed_ip,
            router,
            observed_generation: m.generation,
            ..Default::default()
        };
        if address_changed {
            fields.push("address");
            if let Address::Held(ip) = &address {
                new_status.address = ip.to_string();
            }
        }
        // The address is a decision: guarded by the revision it was made from.
        let guard = if address_changed {
            m.resource_version
        } else {
            0
        };
        let object = Object::FloatingIP(v1::FloatingIp {
            metadata: fip.metadata.clone(),
            spec: None,
            status: Some(new_status),
        });
        match self
            .api
            .update_status_at(
                object,
                owners::FLOATING_IP_CONTROLLER,
                &fields,
                wanted,
                guard,
            )
            .await
        {
            // Only now that status is written: none of these is an address it records.
            Ok(_) => {
                external::release_claims(&self.api, &release).await?;
                Ok(retry)
            }
            // Someone wrote it since it was read; that change queues it again.
            Err(Error::Conflict { .. } | Error::NotFound { .. }) => Ok(retry),
            Err(e) => Err(e.into()),
        }
    }
}

impl Reconcile for FloatingIpController {
    type Error = ReconcileError;

    async fn reconcile(&self, key: ObjectRef) -> Result<Action, ReconcileError> {
        let Some(fip) = self.fips.get(&key) else {
            return Ok(Action::AwaitChange);
        };
        match finalizer::prepare(self.api.client(), FLOATING_IP_FINALIZER, fip.as_ref()).await? {
            Step::Skip => Ok(Action::AwaitChange),
            Step::Apply => self.apply(&fip).await,
            Step::Cleanup(cleanup) => {
                let claims: Vec<ipam::ClaimRef> = self
                    .ip_claims
                    .by_index(OWNER_UID, &meta(fip.as_ref()).uid)
                    .iter()
                    .map(|c| ipam::ClaimRef {
                        kind: Kind::IPAddress,
                        name: meta(c.as_ref()).name.clone(),
                        uid: meta(c.as_ref()).uid.clone(),
                    })
                    .collect();
                // A claim the cache has not shown yet goes with its owner, by the garbage
                // collector.
                external::release_claims(&self.api, &claims).await?;
                cleanup.finish().await?;
                Ok(Action::AwaitChange)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn port(name: &str, network_uid: &str, addresses: &[(&str, &str)]) -> v1::Port {
        v1::Port {
            metadata: Some(v1::ObjectMeta {
                name: name.into(),
                project: "p".into(),
                ..Default::default()
            }),
            spec: Some(v1::PortSpec {
                network: format!("net-{network_uid}"),
                ..Default::default()
            }),
            status: Some(v1::PortStatus {
                network_uid: network_uid.into(),
                addresses: addresses
                    .iter()
                    .map(|(subnet, ip)| v1::PortAddress {
                        subnet: (*subnet).into(),
                        ip: (*ip).into(),
                    })
                    .collect(),
                ..Default::default()
            }),
        }
    }

    fn router(name: &str, gateway: &str, legs: &[(&str, &str)]) -> RouterLinks {
        RouterLinks {
            rank: ((0, 0), "default".into(), name.into()),
            name: name.into(),
            gateway: (!gateway.is_empty()).then(|| gateway.to_owned()),
            interfaces: legs
                .iter()
                .map(|(n, s)| ((*n).to_owned(), (*s).to_owned()))
                .collect(),
        }
    }

    fn outcome(a: &Association) -> String {
        match a {
            Association::Associated {
                port,
                fixed_ip,
                router,
            } => format!("{port} {fixed_ip} via {router}"),
            Association::NotAssociated { reason, .. } => reason.clone(),
        }
    }

    #[test]
    fn associates() {
        let dual = port("web", "u1", &[("v6", "fd00::5"), ("v4", "10.0.1.5")]);
        let other = port("db", "u2", &[("a", "10.0.2.5")]);
        let fresh = port("new", "u1", &[]);
        let routers = vec![
            router("zeta", "ext", &[("u1", "v4")]),
            router("edge", "ext", &[("u1", "v4"), ("u1", "v6")]),
            router("internal", "", &[("u2", "a")]),
            router("elsewhere", "other-ext", &[("u2", "a")]),
        ];
        let cases: Vec<(&str, TargetFacts, &str, &str)> = vec![
            ("no target", TargetFacts::None, "", "NoTarget"),
            (
                "the port's first IPv4 address, through the router created first (then by name)",
                TargetFacts::Ports(vec![&dual]),
                "",
                "web 10.0.1.5 via edge",
            ),
            (
                "a fixed IP picks the address (and the router on its subnet)",
                TargetFacts::Ports(vec![&dual]),
                "fd00::5",
                "web fd00::5 via edge",
            ),
            (
                "a fixed IP the port does not have",
                TargetFacts::Ports(vec![&dual]),
                "10.0.1.99",
                "FixedIpNotFound",
            ),
            (
                "no router joins that network to this external network",
                TargetFacts::Ports(vec![&other]),
                "",
                "NoRouter",
            ),
            (
                "a server's first routed port wins",
                TargetFacts::Ports(vec![&other, &dual]),
                "",
                "web 10.0.1.5 via edge",
            ),
            (
                "a port not addressed yet",
                TargetFacts::Ports(vec![&fresh]),
                "",
                "PortNotAddressed",
            ),
            (
                "a missing port",
                TargetFacts::Missing {
                    reason: reason::PORT_NOT_FOUND,
                    message: "port x not found".into(),
                },
                "",
                "PortNotFound",
            ),
        ];
        for (what, target, fixed_ip, want) in cases {
            let facts = AssociationFacts {
                network_name: "public",
                network_uid: Some("ext"),
                fixed_ip,
                target,
                routers: &routers,
            };
            assert_eq!(outcome(&associate(&facts)), want, "{what}");
        }
        let unresolved = AssociationFacts {
            network_name: "public",
            network_uid: None,
            fixed_ip: "",
            target: TargetFacts::Ports(vec![&dual]),
            routers: &routers,
        };
        match associate(&unresolved) {
            Association::NotAssociated { reason, message } => {
                assert_eq!(reason, "NoRouter");
                assert_eq!(
                    message,
                    "no router connects network net-u1 (subnet v4) to external network public"
                );
            }
            other => panic!("{other:?}"),
        }

        // Of two routers on the subnet, the earlier keeps it (the later is in
        // InterfaceConflict), whatever their names.
        let mut earlier = router("zeta", "ext", &[("u1", "v4")]);
        earlier.rank.0 = (100, 0);
        let mut later = router("edge", "ext", &[("u1", "v4")]);
        later.rank.0 = (200, 0);
        let facts = AssociationFacts {
            network_name: "public",
            network_uid: Some("ext"),
            fixed_ip: "",
            target: TargetFacts::Ports(vec![&dual]),
            routers: &[later, earlier],
        };
        assert_eq!(outcome(&associate(&facts)), "web 10.0.1.5 via zeta");
    }

    #[test]
    fn the_associated_port_reads_back() {
        let mapped = Association::Associated {
            port: "web-0".into(),
            fixed_ip: "10.0.1.5".parse().unwrap(),
            router: "edge".into(),
        };
        let held = Address::Held("203.0.113.7".parse().unwrap());
        let written = conditions(&held, &mapped, &[], None, 1);
        assert_eq!(associated_port(&written), Some("web-0"));
        let nowhere = not(reason::NO_ROUTER, "no router".into());
        assert_eq!(
            associated_port(&conditions(&held, &nowhere, &[], None, 1)),
            None
        );
    }

    #[test]
    fn one_private_address_takes_one_floating_ip() {
        let mapped = |port: &str, ip: &str| Association::Associated {
            port: port.into(),
            fixed_ip: ip.parse().unwrap(),
            router: "edge".into(),
        };
        let at = |secs: i64, name: &str| ((secs, 0), name.to_owned());
        let others = vec![
            (at(5, "b"), mapped("web", "10.0.1.5")),
            (at(5, "a"), mapped("web", "10.0.1.5")),
            (at(1, "z"), mapped("db", "10.0.1.6")),
        ];
        let cases = vec![
            (
                "a later one is refused, naming the earliest",
                at(9, "c"),
                "web",
                "10.0.1.5",
                "FixedIpInUse a",
            ),
            (
                "the same time: by name",
                at(5, "c"),
                "web",
                "10.0.1.5",
                "FixedIpInUse a",
            ),
            (
                "the earliest keeps it",
                at(5, "a"),
                "web",
                "10.0.1.5",
                "web",
            ),
            (
                "an earlier one keeps it",
                at(2, "x"),
                "web",
                "10.0.1.5",
                "web",
            ),
            (
                "another address is free",
                at(9, "c"),
                "web",
                "10.0.1.7",
                "web",
            ),
        ];
        for (what, me, port, ip, want) in cases {
            let got = match first_mapping(mapped(port, ip), &me, &others) {
                Association::Associated { port, .. } => port,
                Association::NotAssociated { reason, message } => {
                    format!("{reason} {}", message.rsplit(' ').next().unwrap())
                }
            };
            assert_eq!(got, want, "{what}");
        }
        let nowhere = not(reason::NO_ROUTER, "x".into());
        assert_eq!(
            first_mapping(nowhere.clone(), &at(9, "c"), &others),
            nowhere
        );
    }

    #[test]
    fn ready_needs_address_association_and_agent() {
        let held = Address::Held("203.0.113.7".parse().unwrap());
        let mapped = Association::Associated {
            port: "web".into(),
            fixed_ip: "10.0.1.5".parse().unwrap(),
            router: "edge".into(),
        };
        let nowhere = Association::NotAssociated {
            reason: "NoRouter".into(),
            message: "no router".into(),
        };
        let blocked = Address::Blocked(condition("Ready", false, "NetworkNotFound", "x"));
        let plumbed = v1::Condition {
            observed_generation: 1,
            ..condition(
                PLUMBED,
                true,
                "Built",
                "node n1: 10.0.1.5 via router edge: dnat in place",
            )
        };
        let on = Some("n1");
        let say = |c: &[v1::Condition]| -> Vec<(bool, String)> {
            c.iter()
                .map(|c| {
                    (
                        c.status == v1::condition::Status::True as i32,
                        c.reason.clone(),
                    )
                })
                .collect()
        };
        let t = |b: bool, r: &str| (b, r.to_owned());
        assert_eq!(
            say(&conditions(&held, &mapped, &[], on, 1)),
            [t(true, "Associated"), t(false, "WaitingForAgent")]
        );
        assert_eq!(
            say(&conditions(
                &held,
                &mapped,
                std::slice::from_ref(&plumbed),
                on,
                1
            )),
            [t(true, "Associated"), t(true, "Plumbed")]
        );
        assert_eq!(
            say(&conditions(
                &held,
                &nowhere,
                std::slice::from_ref(&plumbed),
                on,
                1
            )),
            [t(false, "NoRouter"), t(false, "NoRouter")]
        );
        assert_eq!(
            say(&conditions(
                &blocked,
                &mapped,
                std::slice::from_ref(&plumbed),
                on,
                1
            )),
            [t(true, "Associated"), t(false, "NetworkNotFound")]
        );
        // A Plumbed left from before a move, a failover or a new target is stale.
        let waiting = [t(true, "Associated"), t(false, "WaitingForAgent")];
        let moved_router = Association::Associated {
            port: "web".into(),
            fixed_ip: "10.0.1.5".parse().unwrap(),
            router: "other".into(),
        };
        let moved_port = Association::Associated {
            port: "db".into(),
            fixed_ip: "10.0.1.6".parse().unwrap(),
            router: "edge".into(),
        };
        let stale: Vec<(&str, &Association, Option<&str>, i64)> = vec![
            ("the router failed over to n2", &mapped, Some("n2"), 1),
            ("the router is not placed", &mapped, None, 1),
            ("another router maps it now", &moved_router, on, 1),
            ("another fixed IP is the target now", &moved_port, on, 1),
            ("the spec changed since", &mapped, on, 2),
        ];
        for (what, association, node, generation) in stale {
            assert_eq!(
                say(&conditions(
                    &held,
                    association,
                    std::slice::from_ref(&plumbed),
                    node,
                    generation
                )),
                waiting,
                "{what}"
            );
        }
    }
}
