//! The server controller: a Server's Ports, its resolved references, its phase and `Ready`.
//!
//! - **Ports.** Each `spec.networks` entry naming a network gets a Port `<server>-<index>`
//!   created by this controller, owned by the Server (controller reference with
//!   `blockOwnerDeletion`), so the garbage collector deletes it — and IPAM's claims with
//!   it — when the Server goes. An entry naming an existing Port adopts it: it is used and
//!   recorded, never owned, so it outlives the Server. A Port of the generated name that
//!   belongs to something else is reported (`PortConflict`), never taken over.
//! - **References** resolve as ARCHITECTURE.md says: in the Server's own project first,
//!   then among shared or external Networks and public Images, and Flavors among
//!   cluster-scoped objects. What a name resolved to is a decision, recorded in
//!   `status.resolved` once; a recorded reference whose object is gone or replaced (another
//!   uid) counts as missing, one whose name has since become ambiguous stands. The rule
//!   is [`ferro_api::resolve`]'s, the same the IPAM controller and the agent follow: a
//!   public name held in several other projects resolves to none of them. Every missing
//!   or ambiguous reference is named in `ReferencesResolved`, whose reason is the first
//!   one's (`FlavorNotFound`, `ImageNotFound`, `NetworkAmbiguous`, `KeyPairNotFound`, …).
//!   Their appearance queues the Server again.
//! - **Phase and `Ready`** are observations derived from the Server's own status (the
//!   scheduler's placement, the agent's `host` and `GuestRunning`, node lifecycle's
//!   `NodeReachable`) and from the Ports, by [`phase`] and [`plan`]; `Ready`'s reason says
//!   why the server is not ready, which is what `ferro describe` shows.
//!
//! [`plan`] is pure; the reconciler gathers the facts from the caches, creates the Ports
//! the plan asks for, and writes status only when it differs.

use std::sync::Arc;

use ferro_api::{
    Error, Kind, Object, owners,
    resolve::{Unresolved, resolve},
    v1,
};

use crate::api::Api;
use ferro_runtime::{
    Action, Caches, Controller, ObjectRef, Reconcile, ReconcileError, Store, condition,
    condition_holds, controller::Settings, controller_reference, meta, metrics::Metrics,
    reflector::Change,
};

use v1::server_status::Phase;

/// The index of Servers by what they reference: `<Kind>/<name>`.
const SERVER_BY_REFERENCE: &str = "server-reference";
/// The index of Networks by name.
const NETWORK_BY_NAME: &str = "server-network-name";
/// The index of Images by name.
const IMAGE_BY_NAME: &str = "server-image-name";

/// The condition that says whether every reference resolved.
pub const REFERENCES_RESOLVED: &str = "ReferencesResolved";
/// The condition that says whether every Port is addressed.
pub const PORTS_READY: &str = "PortsReady";

/// The status fields this controller writes.
const FIELDS: &[&str] = &[
    "phase",
    "addresses",
    "observedGeneration",
    "resolved",
    "ports",
];

/// The name of the Port created for the `index`th network of a server.
pub fn port_name(server: &str, index: usize) -> String {
    format!("{server}-{index}")
}

/// The references of a server's spec, in the order they resolve and are reported.
pub fn references(spec: &v1::ServerSpec) -> Vec<(Kind, String)> {
    let mut refs = Vec::new();
    let mut push = |kind: Kind, name: &str| {
        if !name.is_empty() && !refs.iter().any(|(k, n)| *k == kind && n == name) {
            refs.push((kind, name.to_owned()));
        }
    };
    push(Kind::Flavor, &spec.flavor);
    push(Kind::Image, &spec.image);
    push(Kind::Volume, &spec.boot_volume);
    push(Kind::KeyPair, &spec.key_pair);
    for group in &spec.security_groups {
        push(Kind::SecurityGroup, group);
    }
    push(Kind::ServerGroup, &spec.server_group);
    for volume in &spec.volumes {
        push(Kind::Volume, &volume.volume);
    }
    for network in &spec.networks {
        push(Kind::Network, &network.network);
        push(Kind::Port, &network.port);
    }
    refs
}

/// What one reference resolves to now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Found {
    /// The project it was found in; empty for cluster-scoped kinds.
    pub project: String,
    /// Its uid.
    pub uid: String,
}

/// What the planner knows about one Server.
pub struct ServerFacts<'a> {
    /// The Server.
    pub server: &'a v1::Server,
    /// Each reference of [`references`], and what it resolves to now.
    pub references: Vec<(Kind, String, Result<Found, Unresolved>)>,
    /// Per `spec.networks` entry: the Port it uses (generated or named), if it exists.
    pub ports: Vec<Option<Arc<v1::Port>>>,
}

/// The plan for one Server.
#[derive(Clone, Debug, PartialEq)]
pub struct ServerPlan {
    /// Ports to create.
    pub create: Vec<v1::Port>,
    /// The status fields this controller owns.
    pub status: v1::ServerStatus,
    /// `Ready`, `ReferencesResolved`, `PortsReady`.
    pub conditions: Vec<v1::Condition>,
    /// Whether status must be written.
    pub write: bool,
}

fn find<'a>(conditions: &'a [v1::Condition], kind: &str) -> Option<&'a v1::Condition> {
    conditions.iter().find(|c| c.r#type == kind)
}

fn is(c: Option<&v1::Condition>, status: v1::condition::Status) -> bool {
    c.is_some_and(|c| c.status == status as i32)
}

/// The phase of a Server from its status, given whether its references resolved and its
/// Ports are addressed.
pub fn phase(server: &v1::Server, references_ok: bool, ports_ok: bool) -> Phase {
    use v1::server_host_status::PowerState as Host;
    use v1::server_spec::{PowerState as Wanted, RunStrategy};
    if meta(server).deletion_timestamp.is_some() {
        return Phase::Deleting;
    }
    let spec = server.spec.clone().unwrap_or_default();
    let status = server.status.clone().unwrap_or_default();
    if is(
        find(&status.conditions, "NodeReachable"),
        v1::condition::Status::Unknown,
    ) {
        return Phase::Unknown;
    }
    if status.node.is_empty() || !references_ok || !ports_ok {
        return Phase::Pending;
    }
    let strategy = spec
        .run_strategy
        .and_then(|s| RunStrategy::try_from(s).ok())
        .unwrap_or(RunStrategy::Always);
    if let Some(guest) = find(&status.conditions, "GuestRunning")
        && guest.status == v1::condition::Status::False as i32
    {
        let failed = matches!(
            (guest.reason.as_str(), strategy),
            ("Crashed" | "GuestShutdown", RunStrategy::Manual)
                | ("GuestShutdown", RunStrategy::RerunOnFailure)
        );
        let stopping = spec.power_state == Some(Wanted::Stopped as i32);
        if failed && !stopping {
            return Phase::Failed;
        }
    }
    let host = status
        .host
        .as_ref()
        .and_then(|h| Host::try_from(h.power_state).ok())
        .unwrap_or(Host::Unspecified);
    if spec.power_state == Some(Wanted::Stopped as i32)
        && matches!(host, Host::Shutdown | Host::NoState)
    {
        return Phase::Stopped;
    }
    if host == Host::Running {
        return Phase::Running;
    }
    Phase::Building
}

fn not_found_reason(kind: Kind) -> String {
    format!("{}NotFound", kind.name())
}

fn port_ready(port: &v1::Port) -> bool {
    port.status.as_ref().is_some_and(|s| {
        s.conditions
            .iter()
            .any(|c| c.r#type == "Ready" && c.status == v1::condition::Status::True as i32)
    })
}

/// Plans one Server. Pure.
pub fn plan(facts: &ServerFacts<'_>) -> ServerPlan {
    let server = facts.server;
    let m = meta(server);
    let spec = server.spec.clone().unwrap_or_default();
    let status = server.status.clone().unwrap_or_default();
    let deleting = m.deletion_timestamp.is_some();

    // References: keep what was recorded; record what resolves for the first time.
    let mut resolved = Vec::new();
    // Each missing reference: the condition reason and message it gives.
    let mut missing: Vec<(String, String)> = Vec::new();
    for (kind, name, found) in &facts.references {
        let recorded = status
            .resolved
            .iter()
            .find(|r| r.kind == kind.name() && &r.name == name);
        match (recorded, found) {
            (Some(r), Ok(f)) if r.uid == f.uid => resolved.push(r.clone()),
            // The name became ambiguous after it resolved: the decision stands.
            (Some(r), Err(unresolved)) if unresolved.could_mean(&r.uid) => resolved.push(r.clone()),
            (Some(r), _) => {
                resolved.push(r.clone());
                missing.push((
                    not_found_reason(*kind),
                    format!("{} {name} (uid {}) is gone", kind.name(), r.uid),
                ));
            }
            (None, Ok(f)) => resolved.push(v1::ResolvedReference {
                kind: kind.name().to_owned(),
                name: name.clone(),
                project: f.project.clone(),
                uid: f.uid.clone(),
            }),
            (None, Err(unresolved)) => missing.push((unresolved.reason(), unresolved.to_string())),
        }
    }
    let references_ok = missing.is_empty();
    let references = match missing.first() {
        None => condition(
            REFERENCES_RESOLVED,
            true,
            "Resolved",
            format!("{} references resolved", facts.references.len()),
        ),
        Some((reason, _)) => condition(
            REFERENCES_RESOLVED,
            false,
            reason,
            missing
                .iter()
                .map(|(_, m)| m.as_str())
                .collect::<Vec<_>>()
                .join("; "),
        ),
    };

    // Ports: create the missing generated ones; record and address every existing one.
    let mut create = Vec::new();
    let mut ports = Vec::new();
    let mut addresses = Vec::new();
    let mut waiting: Vec<String> = Vec::new();
    // Addressed Ports the server's node has not plugged in yet.
    let mut unbound: Vec<String> = Vec::new();
    let mut conflict: Option<String> = None;
    for (index, entry) in spec.networks.iter().enumerate() {
        let generated = entry.port.is_empty();
        let name = if generated {
            port_name(&m.name, index)
        } else {
            entry.port.clone()
        };
        let port = facts.ports.get(index).cloned().flatten();
        match port {
            None => {
                if generated && !deleting {
                    create.push(new_port(server, &name, entry));
                }
                waiting.push(format!("port {name} does not exist yet"));
            }
            Some(port) => {
                let owned_elsewhere = generated
                    && !meta(port.as_ref())
                        .owner_references
                        .iter()
                        .any(|r| r.controller && r.uid == m.uid);
                if owned_elsewhere {
                    conflict = Some(format!("port {name} exists and belongs to something else"));
                    continue;
                }
                ports.push(name.clone());
                let pstatus = port.status.clone().unwrap_or_default();
                let network = port
                    .spec
                    .as_ref()
                    .map(|s| s.network.clone())
                    .unwrap_or_default();
                if port_ready(&port) {
                    let plugged_here = pstatus.bound && pstatus.node == status.node;
                    if !status.node.is_empty() && !plugged_here {
                        unbound.push(name.clone());
                    }
                    addresses.push(v1::NetworkAddresses {
                        network,
                        port: name.clone(),
                        mac: pstatus.mac.clone(),
                        ips: pstatus.addresses.iter().map(|a| a.ip.clone()).collect(),
                    });
                } else {
                    waiting.push(format!("port {name} has no addresses yet"));
                }
            }
        }
    }
    let ports_ok = conflict.is_none() && waiting.is_empty();
    let ports_ready = match (&conflict, waiting.first()) {
        (Some(c), _) => condition(PORTS_READY, false, "PortConflict", c.clone()),
        (None, Some(_)) => condition(PORTS_READY, false, "PortsPending", waiting.join("; ")),
        (None, None) => condition(
            PORTS_READY,
            true,
            "PortsReady",
            format!("{} ports addressed", spec.networks.len()),
        ),
    };

    let phase = phase(server, references_ok, ports_ok);
    let ready = ready_condition(server, phase, &references, &ports_ready, &unbound);
    let wanted = v1::ServerStatus {
        phase: phase as i32,
        addresses,
        observed_generation: m.generation,
        resolved,
        ports,
        ..Default::default()
    };
    let conditions = vec![ready, references, ports_ready];
    let same_fields = status.phase == wanted.phase
        && status.addresses == wanted.addresses
        && status.observed_generation == wanted.observed_generation
        && status.resolved == wanted.resolved
        && status.ports == wanted.ports;
    let holds = conditions
        .iter()
        .all(|c| condition_holds(&status.conditions, c, m.generation));
    ServerPlan {
        create,
        status: wanted,
        conditions,
        write: !(same_fields && holds),
    }
}

fn ready_condition(
    server: &v1::Server,
    phase: Phase,
    references: &v1::Condition,
    ports: &v1::Condition,
    unbound: &[String],
) -> v1::Condition {
    let spec = server.spec.clone().unwrap_or_default();
    let status = server.status.clone().unwrap_or_default();
    let not = |reason: &str, message: String| condition("Ready", false, reason, message);
    let stopped_wanted = spec.power_state == Some(v1::server_spec::PowerState::Stopped as i32);
    match phase {
        Phase::Deleting => not("Deleting", "the server is being deleted".into()),
        Phase::Unknown => {
            let message = find(&status.conditions, "NodeReachable")
                .map(|c| c.message.clone())
                .unwrap_or_default();
            not("NodeUnreachable", message)
        }
        _ if references.status != v1::condition::Status::True as i32 => {
            not(&references.reason, references.message.clone())
        }
        _ if status.node.is_empty() => match find(&status.conditions, "Scheduled") {
            Some(s) if !s.reason.is_empty() => not(&s.reason, s.message.clone()),
            _ => not("Unscheduled", "waiting for the scheduler".into()),
        },
        _ if ports.status != v1::condition::Status::True as i32 => {
            not(&ports.reason, ports.message.clone())
        }
        // A guest whose NICs lead nowhere does not serve yet.
        Phase::Running if !unbound.is_empty() => not(
            "PortsNotBound",
            format!(
                "waiting for node {} to plug in port {}",
                status.node,
                unbound.join(", ")
            ),
        ),
        Phase::Running => condition(
            "Ready",
            true,
            "Running",
            format!("running on node {}", status.node),
        ),
        // Stopped as asked is where the server should be, but it does not serve: not
        // Ready, as a completed pod is not, with the reason saying it is on purpose.
        Phase::Stopped if stopped_wanted => not(
            "Stopped",
            format!("stopped as asked on node {}", status.node),
        ),
        Phase::Failed => {
            let guest = find(&status.conditions, "GuestRunning");
            not(
                guest.map(|g| g.reason.as_str()).unwrap_or("Failed"),
                guest.map(|g| g.message.clone()).unwrap_or_default(),
            )
        }
        _ => {
            // Building: the agent's GuestRunning says what it is waiting for, if anything.
            match find(&status.conditions, "GuestRunning") {
                Some(g)
                    if g.status != v1::condition::Status::True as i32 && !g.reason.is_empty() =>
                {
                    not(&g.reason, g.message.clone())
                }
                _ => not(
                    "Building",
                    format!("node {} is starting the guest", status.node),
                ),
            }
        }
    }
}

fn new_port(server: &v1::Server, name: &str, entry: &v1::ServerNetwork) -> v1::Port {
    let m = meta(server);
    let spec = server.spec.clone().unwrap_or_default();
    v1::Port {
        metadata: Some(v1::ObjectMeta {
            name: name.to_owned(),
            project: m.project.clone(),
            owner_references: vec![controller_reference(server, true)],
            ..Default::default()
        }),
        spec: Some(v1::PortSpec {
            network: entry.network.clone(),
            fixed_ips: if entry.fixed_ip.is_empty() {
                Vec::new()
            } else {
                vec![v1::FixedIp {
                    subnet: String::new(),
                    ip_address: entry.fixed_ip.clone(),
                }]
            },
            security_groups: spec.security_groups.clone(),
            device_owner: format!("compute:{}", m.name),
            ..Default::default()
        }),
        status: None,
    }
}

/// The server controller: reconciles Servers.
pub struct ServerController {
    api: Api,
    servers: Store<v1::Server>,
    ports: Store<v1::Port>,
    networks: Store<v1::Network>,
    images: Store<v1::Image>,
    flavors: Store<v1::Flavor>,
    key_pairs: Store<v1::KeyPair>,
    security_groups: Store<v1::SecurityGroup>,
    server_groups: Store<v1::ServerGroup>,
    volumes: Store<v1::Volume>,
}

fn reference_keys(server: &v1::Server) -> Vec<String> {
    references(&server.spec.clone().unwrap_or_default())
        .into_iter()
        .map(|(kind, name)| format!("{}/{name}", kind.name()))
        .collect()
}

fn referrers<O: ferro_api::Resource>(
    servers: &Store<v1::Server>,
) -> impl Fn(&Change<O>) -> Vec<ObjectRef> + Send + Sync + 'static {
    let servers = servers.clone();
    move |c: &Change<O>| {
        let value = format!("{}/{}", O::KIND.name(), c.key.name);
        servers
            .by_index(SERVER_BY_REFERENCE, &value)
            .iter()
            .map(|s| ObjectRef::of(s.as_ref()))
            .collect()
    }
}

/// What a resolution found, as the planner records it.
fn found<T: ferro_api::Resource>(
    resolution: Result<Arc<T>, Unresolved>,
) -> Result<Found, Unresolved> {
    resolution.map(|object| Found {
        project: meta(object.as_ref()).project.clone(),
        uid: meta(object.as_ref()).uid.clone(),
    })
}

impl ServerController {
    /// Builds the controller over the shared caches.
    pub fn build(
        api: &Api,
        caches: &Caches,
        metrics: &Metrics,
        settings: Settings,
    ) -> (Controller, Arc<ServerController>) {
        let servers = caches.store::<v1::Server>();
        let ports = caches.store::<v1::Port>();
        let networks = caches.store::<v1::Network>();
        let images = caches.store::<v1::Image>();
        let flavors = caches.store::<v1::Flavor>();
        let key_pairs = caches.store::<v1::KeyPair>();
        let security_groups = caches.store::<v1::SecurityGroup>();
        let server_groups = caches.store::<v1::ServerGroup>();
        let volumes = caches.store::<v1::Volume>();
        servers.add_index(SERVER_BY_REFERENCE, reference_keys);
        networks.add_index(NETWORK_BY_NAME, |n: &v1::Network| {
            vec![meta(n).name.clone()]
        });
        images.add_index(IMAGE_BY_NAME, |i: &v1::Image| vec![meta(i).name.clone()]);
        let controller = Controller::new("server", settings, metrics.clone())
            .reconciles(&servers)
            .owns(&ports, Kind::Server)
            .watches(&ports, referrers::<v1::Port>(&servers))
            .watches(&networks, referrers::<v1::Network>(&servers))
            .watches(&images, referrers::<v1::Image>(&servers))
            .watches(&flavors, referrers::<v1::Flavor>(&servers))
            .watches(&key_pairs, referrers::<v1::KeyPair>(&servers))
            .watches(&security_groups, referrers::<v1::SecurityGroup>(&servers))
            .watches(&server_groups, referrers::<v1::ServerGroup>(&servers))
            .watches(&volumes, referrers::<v1::Volume>(&servers));
        let reconciler = Arc::new(ServerController {
            api: api.clone(),
            servers,
            ports,
            networks,
            images,
            flavors,
            key_pairs,
            security_groups,
            server_groups,
            volumes,
        });
        (controller, reconciler)
    }

    /// Resolves one reference of a server in `project`, by [`resolve`]'s rule.
    fn resolve(&self, project: &str, kind: Kind, name: &str) -> Result<Found, Unresolved> {
        match kind {
            Kind::Flavor => found(resolve(project, name, self.flavors.get_named("", name))),
            Kind::Image => found(resolve(
                project,
                name,
                self.images.by_index(IMAGE_BY_NAME, name),
            )),
            Kind::Network => found(resolve(
                project,
                name,
                self.networks.by_index(NETWORK_BY_NAME, name),
            )),
            Kind::KeyPair => found(resolve(
                project,
                name,
                self.key_pairs.get_named(project, name),
            )),
            Kind::SecurityGroup => found(resolve(
                project,
                name,
                self.security_groups.get_named(project, name),
            )),
            Kind::ServerGroup => found(resolve(
                project,
                name,
                self.server_groups.get_named(project, name),
            )),
            Kind::Volume => found(resolve(
                project,
                name,
                self.volumes.get_named(project, name),
            )),
            Kind::Port => found(resolve(project, name, self.ports.get_named(project, name))),
            _ => Err(Unresolved::NotFound {
                kind,
                name: name.to_owned(),
                project: project.to_owned(),
            }),
        }
    }
}

impl Reconcile for ServerController {
    type Error = ReconcileError;

    async fn reconcile(&self, key: ObjectRef) -> Result<Action, ReconcileError> {
        let Some(server) = self.servers.get(&key) else {
            return Ok(Action::AwaitChange);
        };
        let m = meta(server.as_ref());
        let spec = server.spec.clone().unwrap_or_default();
        let references = references(&spec)
            .into_iter()
            .map(|(kind, name)| {
                let found = self.resolve(&m.project, kind, &name);
                (kind, name, found)
            })
            .collect();
        let ports = spec
            .networks
            .iter()
            .enumerate()
            .map(|(index, entry)| {
                let name = if entry.port.is_empty() {
                    port_name(&m.name, index)
                } else {
                    entry.port.clone()
                };
                self.ports.get_named(&m.project, &name)
            })
            .collect();
        let facts = ServerFacts {
            server: &server,
            references,
            ports,
        };
        let plan = plan(&facts);
        // Ports created now come back through the cache and queue this Server again; the
        // status written then says more, so one write is saved per Server.
        let creating = !plan.create.is_empty();
        for port in plan.create {
            match self.api.create(Object::Port(port)).await {
                // Already there: the cache shows it soon, and that queues this Server.
                Ok(_) | Err(Error::AlreadyExists { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        if plan.write && !creating {
            let object = Object::Server(v1::Server {
                metadata: server.metadata.clone(),
                spec: None,
                status: Some(plan.status),
            });
            match self
                .api
                .update_status(object, owners::SERVER_CONTROLLER, FIELDS, plan.conditions)
                .await
            {
                Ok(_) | Err(Error::NotFound { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(Action::AwaitChange)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use v1::condition::Status;

    fn server(networks: &[(&str, &str)], status: v1::ServerStatus) -> v1::Server {
        v1::Server {
            metadata: Some(v1::ObjectMeta {
                name: "web".into(),
                project: "p".into(),
                uid: "su".into(),
                generation: 1,
                ..Default::default()
            }),
            spec: Some(v1::ServerSpec {
                flavor: "m1".into(),
                image: "tiny".into(),
                key_pair: "demo".into(),
                networks: networks
                    .iter()
                    .map(|(network, port)| v1::ServerNetwork {
                        network: (*network).into(),
                        port: (*port).into(),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            }),
            status: Some(status),
        }
    }

    fn cond(kind: &str, status: Status, reason: &str) -> v1::Condition {
        v1::Condition {
            r#type: kind.into(),
            status: status as i32,
            reason: reason.into(),
            ..Default::default()
        }
    }

    fn port(name: &str, owner: &str, ready: bool) -> Arc<v1::Port> {
        Arc::new(v1::Port {
            metadata: Some(v1::ObjectMeta {
                name: name.into(),
                project: "p".into(),
                owner_references: if owner.is_empty() {
                    vec![]
                } else {
                    vec![v1::OwnerReference {
                        kind: "Server".into(),
                        uid: owner.into(),
                        controller: true,
                        ..Default::default()
                    }]
                },
                ..Default::default()
            }),
            spec: Some(v1::PortSpec {
                network: "net".into(),
                ..Default::default()
            }),
            status: Some(v1::PortStatus {
                mac: "fa:16:3e:00:00:01".into(),
                addresses: vec![v1::PortAddress {
                    subnet: "a".into(),
                    ip: "10.0.0.5".into(),
                }],
                conditions: if ready {
                    vec![cond("Ready", Status::True, "Allocated")]
                } else {
                    vec![]
                },
                // A ready port here is also plugged in on the test server's node.
                node: if ready { "n1".into() } else { String::new() },
                bound: ready,
                ..Default::default()
            }),
        })
    }

    fn found(uid: &str) -> Result<Found, Unresolved> {
        Ok(Found {
            project: "p".into(),
            uid: uid.into(),
        })
    }

    fn all_found(server: &v1::Server) -> Vec<(Kind, String, Result<Found, Unresolved>)> {
        references(server.spec.as_ref().unwrap())
            .into_iter()
            .map(|(k, n)| {
                let uid = format!("{}-uid", n);
                (k, n, found(&uid))
            })
            .collect()
    }

    fn host(state: v1::server_host_status::PowerState) -> Option<v1::ServerHostStatus> {
        Some(v1::ServerHostStatus {
            power_state: state as i32,
            ..Default::default()
        })
    }

    #[test]
    fn the_phase_follows_placement_host_and_reachability() {
        use v1::server_host_status::PowerState as Host;
        use v1::server_spec::{PowerState, RunStrategy};
        let bound = |conditions: Vec<v1::Condition>, h| v1::ServerStatus {
            node: "n1".into(),
            host: h,
            conditions,
            ..Default::default()
        };
        struct Case {
            name: &'static str,
            status: v1::ServerStatus,
            power: Option<PowerState>,
            strategy: Option<RunStrategy>,
            deleting: bool,
            ok: bool,
            phase: Phase,
        }
        let case = |name, status, phase| Case {
            name,
            status,
            power: None,
            strategy: None,
            deleting: false,
            ok: true,
            phase,
        };
        let crashed = vec![cond("GuestRunning", Status::False, "Crashed")];
        let shut = vec![cond("GuestRunning", Status::False, "GuestShutdown")];
        let cases = vec![
            case("unbound", v1::ServerStatus::default(), Phase::Pending),
            Case {
                ok: false,
                ..case("references missing", bound(vec![], None), Phase::Pending)
            },
            case("bound, no guest yet", bound(vec![], None), Phase::Building),
            case(
                "bound, NoState",
                bound(vec![], host(Host::NoState)),
                Phase::Building,
            ),
            case(
                "running",
                bound(vec![], host(Host::Running)),
                Phase::Running,
            ),
            case(
                "unreachable",
                bound(
                    vec![cond("NodeReachable", Status::Unknown, "HeartbeatLapsed")],
                    host(Host::Running),
                ),
                Phase::Unknown,
            ),
            Case {
                power: Some(PowerState::Stopped),
                ..case(
                    "stopped as asked",
                    bound(vec![], host(Host::Shutdown)),
                    Phase::Stopped,
                )
            },
            Case {
                power: Some(PowerState::Stopped),
                ..case(
                    "stopping",
                    bound(vec![], host(Host::Running)),
                    Phase::Running,
                )
            },
            Case {
                strategy: Some(RunStrategy::Manual),
                ..case(
                    "crashed, manual",
                    bound(crashed.clone(), host(Host::Crashed)),
                    Phase::Failed,
                )
            },
            Case {
                strategy: Some(RunStrategy::Always),
                ..case(
                    "crashed, always restarts",
                    bound(crashed.clone(), host(Host::Crashed)),
                    Phase::Building,
                )
            },
            Case {
                strategy: Some(RunStrategy::RerunOnFailure),
                ..case(
                    "shut down, rerun on failure",
                    bound(shut.clone(), host(Host::Shutdown)),
                    Phase::Failed,
                )
            },
            Case {
                deleting: true,
                ..case(
                    "deleting",
                    bound(vec![], host(Host::Running)),
                    Phase::Deleting,
                )
            },
        ];
        for c in cases {
            let mut s = server(&[], c.status);
            let spec = s.spec.as_mut().unwrap();
            spec.power_state = c.power.map(|p| p as i32);
            spec.run_strategy = c.strategy.map(|r| r as i32);
            if c.deleting {
                s.metadata.as_mut().unwrap().deletion_timestamp = Some(Default::default());
            }
            assert_eq!(phase(&s, c.ok, c.ok), c.phase, "{}", c.name);
        }
    }

    #[test]
    fn a_server_stopped_as_asked_is_not_ready_and_says_so() {
        use v1::server_host_status::PowerState as Host;
        let mut s = server(
            &[],
            v1::ServerStatus {
                node: "n1".into(),
                host: host(Host::Shutdown),
                ..Default::default()
            },
        );
        s.spec.as_mut().unwrap().power_state = Some(v1::server_spec::PowerState::Stopped as i32);
        let holds = cond("X", Status::True, "");
        let ready = ready_condition(&s, Phase::Stopped, &holds, &holds, &[]);
        assert_eq!(
            (ready.status, ready.reason.as_str()),
            (Status::False as i32, "Stopped")
        );
    }

    #[test]
    fn missing_references_are_named_in_order() {
        let s = server(&[("net", "")], v1::ServerStatus::default());
        let mut refs = all_found(&s);
        for (kind, name, found) in refs.iter_mut() {
            if matches!(kind, Kind::Flavor | Kind::Network | Kind::KeyPair) {
                *found = Err(Unresolved::NotFound {
                    kind: *kind,
                    name: name.clone(),
                    project: "p".into(),
                });
            }
        }
        let plan = plan(&ServerFacts {
            server: &s,
            references: refs,
            ports: vec![None],
        });
        let references = &plan.conditions[1];
        assert_eq!(references.r#type, REFERENCES_RESOLVED);
        assert_eq!(references.reason, "FlavorNotFound");
        assert_eq!(
            references.message,
            "Flavor m1 not found; KeyPair demo not found in project p; \
             Network net not found in project p or among shared networks"
        );
        let resolved: Vec<&str> = plan
            .status
            .resolved
            .iter()
            .map(|r| r.kind.as_str())
            .collect();
        assert_eq!(resolved, ["Image"], "what resolved is recorded");
        assert_eq!(plan.status.phase, Phase::Pending as i32);
        assert_eq!(
            plan.conditions[0].reason, "FlavorNotFound",
            "Ready says why"
        );
        assert_eq!(plan.create.len(), 1, "the port is created anyway");
    }

    #[test]
    fn resolved_references_are_decisions() {
        let recorded = v1::ResolvedReference {
            kind: "Image".into(),
            name: "tiny".into(),
            project: "p".into(),
            uid: "old".into(),
        };
        let s = server(
            &[],
            v1::ServerStatus {
                resolved: vec![recorded.clone()],
                ..Default::default()
            },
        );
        let plan = plan(&ServerFacts {
            server: &s,
            references: all_found(&s),
            ports: vec![],
        });
        assert!(plan.status.resolved.contains(&recorded), "never rewritten");
        assert_eq!(plan.conditions[1].reason, "ImageNotFound");
        assert_eq!(plan.conditions[1].message, "Image tiny (uid old) is gone");
    }

    fn ambiguous(kind: Kind, name: &str, uids: &[&str]) -> Result<Found, Unresolved> {
        Err(Unresolved::Ambiguous {
            kind,
            name: name.into(),
            candidates: uids
                .iter()
                .map(|uid| ferro_api::resolve::Candidate {
                    project: format!("{uid}-project"),
                    uid: (*uid).into(),
                })
                .collect(),
        })
    }

    #[test]
    fn an_ambiguous_name_is_reported_with_its_candidates() {
        let s = server(&[("net", "")], v1::ServerStatus::default());
        let mut refs = all_found(&s);
        for (kind, name, found) in refs.iter_mut() {
            if *kind == Kind::Network {
                *found = ambiguous(*kind, name, &["a", "b"]);
            }
        }
        let plan = plan(&ServerFacts {
            server: &s,
            references: refs,
            ports: vec![None],
        });
        let references = &plan.conditions[1];
        assert_eq!(references.reason, "NetworkAmbiguous");
        assert_eq!(
            references.message,
            "Network net is ambiguous: shared networks of that name exist in projects \
             a-project, b-project"
        );
        assert!(
            plan.status.resolved.iter().all(|r| r.kind != "Network"),
            "no candidate is picked"
        );
        assert_eq!(plan.status.phase, Phase::Pending as i32);
    }

    #[test]
    fn a_recorded_reference_survives_its_name_becoming_ambiguous() {
        let recorded = v1::ResolvedReference {
            kind: "Image".into(),
            name: "tiny".into(),
            project: "a-project".into(),
            uid: "a".into(),
        };
        let s = server(
            &[],
            v1::ServerStatus {
                resolved: vec![recorded.clone()],
                ..Default::default()
            },
        );
        let with_image = |image: Result<Found, Unresolved>| {
            let mut refs = all_found(&s);
            for (kind, _, found) in refs.iter_mut() {
                if *kind == Kind::Image {
                    *found = image.clone();
                }
            }
            plan(&ServerFacts {
                server: &s,
                references: refs,
                ports: vec![],
            })
        };
        let still = with_image(ambiguous(Kind::Image, "tiny", &["a", "b"]));
        assert!(still.status.resolved.contains(&recorded));
        assert_eq!(still.conditions[1].reason, "Resolved");
        let gone = with_image(ambiguous(Kind::Image, "tiny", &["b", "c"]));
        assert_eq!(gone.conditions[1].reason, "ImageNotFound");
        assert_eq!(gone.conditions[1].message, "Image tiny (uid a) is gone");
    }

    #[test]
    fn ports_are_created_adopted_and_addressed() {
        let s = server(
            &[("net", ""), ("", "mine"), ("net", "")],
            v1::ServerStatus {
                node: "n1".into(),
                host: host(v1::server_host_status::PowerState::Running),
                ..Default::default()
            },
        );
        let facts = |ports| ServerFacts {
            server: &s,
            references: all_found(&s),
            ports,
        };
        // Nothing exists: the two generated ports are created, the named one awaited.
        let first = plan(&facts(vec![None, Some(port("mine", "", false)), None]));
        let names: Vec<&str> = first
            .create
            .iter()
            .map(|p| p.metadata.as_ref().unwrap().name.as_str())
            .collect();
        assert_eq!(names, ["web-0", "web-2"]);
        let created = &first.create[0];
        let owner = &created.metadata.as_ref().unwrap().owner_references[0];
        assert!(owner.controller && owner.block_owner_deletion && owner.uid == "su");
        assert_eq!(created.spec.as_ref().unwrap().device_owner, "compute:web");
        assert_eq!(first.status.phase, Phase::Pending as i32);
        assert_eq!(first.conditions[2].reason, "PortsPending");
        // All exist and are addressed: Running and Ready.
        let done = plan(&facts(vec![
            Some(port("web-0", "su", true)),
            Some(port("mine", "", true)),
            Some(port("web-2", "su", true)),
        ]));
        assert!(done.create.is_empty());
        assert_eq!(done.status.ports, ["web-0", "mine", "web-2"]);
        assert_eq!(done.status.addresses.len(), 3);
        assert_eq!(done.status.addresses[1].ips, ["10.0.0.5"]);
        assert_eq!(done.status.phase, Phase::Running as i32);
        assert_eq!(done.conditions[0].status, Status::True as i32);
        // Addressed but not yet plugged in by the node: running, not Ready.
        let mut loose = (*port("web-2", "su", true)).clone();
        loose.status.as_mut().unwrap().bound = false;
        let unplugged = plan(&facts(vec![
            Some(port("web-0", "su", true)),
            Some(port("mine", "", true)),
            Some(Arc::new(loose)),
        ]));
        assert_eq!(unplugged.status.phase, Phase::Running as i32);
        assert_eq!(unplugged.conditions[0].reason, "PortsNotBound");
        assert_eq!(
            unplugged.conditions[0].message,
            "waiting for node n1 to plug in port web-2"
        );
        // A generated name taken by someone else's port is reported, not taken over.
        let taken = plan(&facts(vec![
            Some(port("web-0", "other", true)),
            Some(port("mine", "", true)),
            Some(port("web-2", "su", true)),
        ]));
        assert_eq!(taken.conditions[2].reason, "PortConflict");
        assert_eq!(taken.status.phase, Phase::Pending as i32);
    }

    #[test]
    fn a_second_plan_over_its_own_result_writes_nothing() {
        let s = server(&[("net", "")], v1::ServerStatus::default());
        let ports = vec![Some(port("web-0", "su", true))];
        let first = plan(&ServerFacts {
            server: &s,
            references: all_found(&s),
            ports: ports.clone(),
        });
        assert!(first.write);
        let mut after = s.clone();
        let mut status = first.status.clone();
        status.conditions = first
            .conditions
            .iter()
            .map(|c| v1::Condition {
                observed_generation: 1,
                ..c.clone()
            })
            .collect();
        after.status = Some(status);
        let second = plan(&ServerFacts {
            server: &after,
            references: all_found(&after),
            ports,
        });
        assert!(!second.write);
        assert_eq!(second.conditions[0].reason, "Unscheduled");
    }
}
