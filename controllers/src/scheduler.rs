//! The scheduler: places each unplaced Server on a Node with `Bind`.
//!
//! [`plan`] holds the decision as a pure function (filters, weighers, the "no valid host"
//! message); this module feeds it from the caches and executes it.
//!
//! **One decision at a time.** Reconciles run concurrently, but choosing a node and
//! *assuming* the placement happen under one lock: the next decision already counts the
//! previous one, even before its `Bind` has landed and long before the cache shows it. An
//! assumption is forgotten when its `Bind` fails, and once the cache shows the server bound
//! (from then on the cache counts it) or gone. So fifty servers applied at once never
//! oversubscribe a node, and a hard-affinity group follows its first member.
//!
//! **Readiness comes from node lifecycle.** A node is a candidate only while its `Ready`
//! condition, written by node lifecycle from the heartbeat Lease and the agent's
//! `HostReady`, is `True`. A freshly registered node without that condition counts as
//! "not ready": node lifecycle judges it on its first Lease change, so the wait is one
//! reconcile, and the scheduler never second-guesses the one writer of readiness.
//!
//! **What it waits for.** The Flavor (which sizes the request) and the ServerGroup (which
//! constrains it) must exist; until they do, `Scheduled` is `False` with `FlavorNotFound` or
//! `ServerGroupNotFound`, and their appearance queues the server again. Other references
//! (networks, image, key pair) are the server controller's business and do not hold
//! placement back. When nothing fits, `Scheduled` is `False` with `NoValidHost` and the
//! counts of each filter's rejections; any change of a Node, Flavor or ServerGroup, or a
//! bound server going away, queues every unplaced server again.
//!
//! Nodes that declare roles without `Compute` (pure network or storage nodes) are not
//! candidates at all.

pub mod plan;

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
    time::Duration,
};

use ferro_api::{Error, Object, Resource, owners, v1};

use crate::api::Api;
use ferro_runtime::{
    Action, Caches, Controller, ObjectRef, Reconcile, ReconcileError, Store, condition,
    condition_holds, controller::Settings, events::Recorder, is_deleting, meta, metrics::Metrics,
    reflector::UID,
};

use plan::{Amounts, Candidate, Decision, Group, Policy, Request};

/// The index of Servers by `status.node`; unplaced servers are under `""`.
pub const SERVER_BY_NODE: &str = "scheduler-node";
/// The index of Servers by `<project>/<serverGroup>`.
const SERVER_BY_GROUP: &str = "scheduler-group";
/// The condition the scheduler owns.
pub const SCHEDULED: &str = "Scheduled";
/// The extra spec naming the hypervisor kind a Flavor needs.
pub const HYPERVISOR_EXTRA_SPEC: &str = "hypervisor";
/// The prefix of extra specs matched against Node labels (host aggregates).
pub const AGGREGATE_PREFIX: &str = "aggregate/";
/// How often a server nothing fits is tried again even without a change.
const NO_VALID_HOST_RETRY: Duration = Duration::from_secs(60);

/// A placement decided but not yet visible in the cache.
#[derive(Clone, Debug)]
struct Assumption {
    node: String,
    amounts: Amounts,
    /// `<project>/<group>` when the server belongs to a group.
    group: Option<String>,
}

/// The scheduler: reconciles Servers that have no node yet.
pub struct Scheduler {
    api: Api,
    recorder: Recorder,
    settings: plan::Settings,
    servers: Store<v1::Server>,
    nodes: Store<v1::Node>,
    flavors: Store<v1::Flavor>,
    groups: Store<v1::ServerGroup>,
    /// Placements decided and not yet in the cache, by server uid. Its lock is also the
    /// lock that serialises decisions.
    assumed: Arc<Mutex<HashMap<String, Assumption>>>,
}

/// Why a server cannot be weighed yet.
struct Waiting {
    reason: &'static str,
    message: String,
}

fn unplaced_keys(servers: &Store<v1::Server>) -> Vec<ObjectRef> {
    servers
        .by_index(SERVER_BY_NODE, "")
        .iter()
        .map(|s| ObjectRef::of(s.as_ref()))
        .collect()
}

fn bound_node(server: &v1::Server) -> &str {
    server
        .status
        .as_ref()
        .map(|s| s.node.as_str())
        .unwrap_or_default()
}

/// The group a Server names, as `<project>/<group>`.
pub(crate) fn group_key(server: &v1::Server) -> Option<String> {
    let group = server.spec.as_ref().map(|s| s.server_group.as_str())?;
    (!group.is_empty()).then(|| format!("{}/{group}", meta(server).project))
}

/// The Node's `Ready` condition (node lifecycle's) is `True`.
pub fn node_ready(node: &v1::Node) -> bool {
    node.status.as_ref().is_some_and(|s| {
        s.conditions
            .iter()
            .any(|c| c.r#type == "Ready" && c.status == v1::condition::Status::True as i32)
    })
}

/// Whether a node runs servers: it declares no roles, or `Compute` among them.
fn runs_servers(node: &v1::Node) -> bool {
    let roles = node
        .status
        .as_ref()
        .map(|s| s.roles.as_slice())
        .unwrap_or_default();
    roles.is_empty() || roles.contains(&(v1::node_status::Role::Compute as i32))
}

/// What a Flavor asks of a node.
pub fn request_of(flavor: &v1::FlavorSpec, server: &v1::ServerSpec) -> Request {
    Request {
        vcpus: u64::from(flavor.vcpus),
        ram_mib: flavor.ram_mib,
        disk_gib: flavor.disk_gib + flavor.ephemeral_gib,
        zone: server.availability_zone.clone(),
        hypervisor: flavor
            .extra_specs
            .get(HYPERVISOR_EXTRA_SPEC)
            .cloned()
            .unwrap_or_default(),
        aggregates: flavor
            .extra_specs
            .iter()
            .filter_map(|(k, v)| {
                k.strip_prefix(AGGREGATE_PREFIX)
                    .map(|label| (label.to_owned(), v.clone()))
            })
            .collect(),
        group: None,
        needs_networks: !server.networks.is_empty(),
    }
}

/// Whether a node wires tenant networks: its agent runs a network driver whose
/// `NetworkReady` condition is not False.
pub fn node_networking(node: &v1::Node) -> bool {
    node.status.as_ref().is_some_and(|s| {
        !s.network_driver.is_empty()
            && !s.conditions.iter().any(|c| {
                c.r#type == "NetworkReady" && c.status == v1::condition::Status::False as i32
            })
    })
}

/// The scheduler's view of a server group policy.
pub fn policy_of(spec: &v1::ServerGroupSpec) -> (Policy, u32) {
    use v1::server_group_spec::Policy as P;
    let policy = match P::try_from(spec.policy).unwrap_or(P::SoftAntiAffinity) {
        P::Affinity => Policy::Affinity,
        P::AntiAffinity => Policy::AntiAffinity,
        P::SoftAffinity => Policy::SoftAffinity,
        P::SoftAntiAffinity | P::Unspecified => Policy::SoftAntiAffinity,
    };
    (policy, spec.max_per_node.unwrap_or(1).max(1))
}

/// The Flavor copy `Bind` records.
pub fn snapshot(flavor: &v1::Flavor) -> v1::FlavorSnapshot {
    let spec = flavor.spec.clone().unwrap_or_default();
    v1::FlavorSnapshot {
        name: meta(flavor).name.clone(),
        uid: meta(flavor).uid.clone(),
        vcpus: spec.vcpus,
        ram_mib: spec.ram_mib,
        disk_gib: spec.disk_gib,
        extra_specs: spec.extra_specs,
    }
}

impl Scheduler {
    /// Builds the scheduler over the shared caches.
    pub fn build(
        api: &Api,
        caches: &Caches,
        metrics: &Metrics,
        settings: Settings,
        scheduling: plan::Settings,
    ) -> (Controller, Arc<Scheduler>) {
        let servers = caches.store::<v1::Server>();
        let nodes = caches.store::<v1::Node>();
        let flavors = caches.store::<v1::Flavor>();
        let groups = caches.store::<v1::ServerGroup>();
        servers.add_index(SERVER_BY_NODE, |s: &v1::Server| {
            vec![bound_node(s).to_owned()]
        });
        servers.add_index(SERVER_BY_GROUP, |s: &v1::Server| {
            group_key(s).into_iter().collect()
        });
        let assumed: Arc<Mutex<HashMap<String, Assumption>>> = Arc::default();
        let forget = assumed.clone();
        servers.listen(move |c| {
            // The cache caught up (or the server is gone): it counts the placement now.
            let caught_up = c.new.as_ref().is_none_or(|s| !bound_node(s).is_empty());
            if caught_up && let Some(old) = c.old.as_ref().or(c.new.as_ref()) {
                forget
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&meta(old.as_ref()).uid);
            }
        });
        let unplaced = servers.clone();
        let on_nodes = move |_: &_| unplaced_keys(&unplaced);
        let unplaced = servers.clone();
        let on_flavors = move |_: &_| unplaced_keys(&unplaced);
        let unplaced = servers.clone();
        let on_groups = move |_: &_| unplaced_keys(&unplaced);
        let unplaced = servers.clone();
        let on_servers = move |c: &ferro_runtime::reflector::Change<v1::Server>| {
            // A bound server going away frees room for the ones waiting.
            let freed = c.old.as_ref().is_some_and(|s| !bound_node(s).is_empty())
                && c.new.as_ref().is_none_or(|s| bound_node(s).is_empty());
            if freed {
                unplaced_keys(&unplaced)
            } else {
                Vec::new()
            }
        };
        let controller = Controller::new("scheduler", settings, metrics.clone())
            .reconciles(&servers)
            .watches(&servers, on_servers)
            .watches(&nodes, on_nodes)
            .watches(&flavors, on_flavors)
            .watches(&groups, on_groups);
        let scheduler = Arc::new(Scheduler {
            api: api.clone(),
            recorder: Recorder::new(api.client().clone(), owners::SCHEDULER),
            settings: scheduling,
            servers,
            nodes,
            flavors,
            groups,
            assumed,
        });
        (controller, scheduler)
    }

    fn request(&self, server: &v1::Server) -> Result<(Request, v1::FlavorSnapshot), Waiting> {
        let spec = server.spec.clone().unwrap_or_default();
        let Some(flavor) = self.flavors.get_named("", &spec.flavor) else {
            return Err(Waiting {
                reason: "FlavorNotFound",
                message: format!("flavor {} not found", spec.flavor),
            });
        };
        let mut request = request_of(&flavor.spec.clone().unwrap_or_default(), &spec);
        if !spec.server_group.is_empty() {
            let project = &meta(server).project;
            let Some(group) = self.groups.get_named(project, &spec.server_group) else {
                return Err(Waiting {
                    reason: "ServerGroupNotFound",
                    message: format!("server group {} not found", spec.server_group),
                });
            };
            let (policy, max_per_node) = policy_of(&group.spec.unwrap_or_default());
            request.group = Some(Group {
                policy,
                max_per_node,
                members_per_node: BTreeMap::new(),
            });
        }
        Ok((request, snapshot(&flavor)))
    }

    /// What a bound server takes from its node, from its Flavor copy (plus the Flavor's
    /// ephemeral disk, which the copy does not carry).
    fn taken(&self, server: &v1::Server) -> Amounts {
        let Some(snapshot) = server.status.as_ref().and_then(|s| s.flavor.as_ref()) else {
            return Amounts::default();
        };
        let ephemeral = self
            .flavors
            .by_index(UID, &snapshot.uid)
            .first()
            .and_then(|f| f.spec.as_ref().map(|s| s.ephemeral_gib))
            .unwrap_or(0);
        Amounts {
            vcpus: u64::from(snapshot.vcpus),
            ram_mib: snapshot.ram_mib,
            disk_gib: snapshot.disk_gib + ephemeral,
        }
    }

    /// Decides for one server and, when it places it, assumes the placement — all under
    /// the lock, so decisions are serialised.
    fn decide_and_assume(&self, server: &v1::Server, mut request: Request) -> Decision {
        let uid = meta(server).uid.clone();
        let group = group_key(server);
        let mut assumed = self.assumed.lock().unwrap_or_else(|e| e.into_inner());
        // Assumptions the cache does not show yet, by node.
        let mut pending: HashMap<&str, Amounts> = HashMap::new();
        let mut pending_members: BTreeMap<String, u32> = BTreeMap::new();
        for (other, a) in assumed.iter() {
            let visible = self
                .servers
                .by_index(UID, other)
                .first()
                .is_some_and(|s| !bound_node(s).is_empty());
            if visible {
                continue;
            }
            let p = pending.entry(a.node.as_str()).or_default();
            p.vcpus += a.amounts.vcpus;
            p.ram_mib += a.amounts.ram_mib;
            p.disk_gib += a.amounts.disk_gib;
            if group.is_some() && a.group == group && *other != uid {
                *pending_members.entry(a.node.clone()).or_default() += 1;
            }
        }
        if let (Some(key), Some(g)) = (&group, request.group.as_mut()) {
            let mut members = pending_members;
            for member in self.servers.by_index(SERVER_BY_GROUP, key) {
                let node = bound_node(&member);
                if !node.is_empty() && meta(member.as_ref()).uid != uid {
                    *members.entry(node.to_owned()).or_default() += 1;
                }
            }
            g.members_per_node = members;
        }
        let mut candidates: Vec<Candidate> = Vec::new();
        for node in self.nodes.list() {
            if !runs_servers(&node) {
                continue;
            }
            let name = meta(node.as_ref()).name.clone();
            let spec = node.spec.clone().unwrap_or_default();
            let status = node.status.clone().unwrap_or_default();
            let mut used = pending.get(name.as_str()).copied().unwrap_or_default();
            for bound in self.servers.by_index(SERVER_BY_NODE, &name) {
                let t = self.taken(&bound);
                used.vcpus += t.vcpus;
                used.ram_mib += t.ram_mib;
                used.disk_gib += t.disk_gib;
            }
            let allocatable = status.allocatable.unwrap_or_default();
            candidates.push(Candidate {
                ready: node_ready(&node),
                networking: node_networking(&node),
                unschedulable: spec.unschedulable,
                zone: status.zone,
                hypervisor: status.hypervisor,
                labels: spec.labels.into_iter().collect(),
                allocatable: Amounts {
                    vcpus: u64::from(allocatable.vcpus),
                    ram_mib: allocatable.ram_mib,
                    disk_gib: allocatable.disk_gib,
                },
                used,
                name,
            });
        }
        candidates.sort_by(|a, b| a.name.cmp(&b.name));
        let decision = plan::decide(&request, &candidates, &self.settings);
        if let Decision::Place(node) = &decision {
            assumed.insert(
                uid,
                Assumption {
                    node: node.clone(),
                    amounts: Amounts {
                        vcpus: request.vcpus,
                        ram_mib: request.ram_mib,
                        disk_gib: request.disk_gib,
                    },
                    group,
                },
            );
        }
        decision
    }

    fn forget(&self, uid: &str) {
        self.assumed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(uid);
    }

    fn is_assumed(&self, uid: &str) -> bool {
        self.assumed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(uid)
    }

    async fn set_scheduled(
        &self,
        server: &v1::Server,
        wanted: v1::Condition,
    ) -> Result<(), ReconcileError> {
        let status = server.status.clone().unwrap_or_default();
        if condition_holds(&status.conditions, &wanted, meta(server).generation) {
            return Ok(());
        }
        let object = Object::Server(v1::Server {
            metadata: server.metadata.clone(),
            spec: None,
            status: None,
        });
        match self
            .api
            .update_status(object, owners::SCHEDULER, &[], vec![wanted])
            .await
        {
            Ok(_) | Err(Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

impl Reconcile for Scheduler {
    type Error = ReconcileError;

    async fn reconcile(&self, key: ObjectRef) -> Result<Action, ReconcileError> {
        let Some(server) = self.servers.get(&key) else {
            return Ok(Action::AwaitChange);
        };
        if is_deleting(server.as_ref()) {
            return Ok(Action::AwaitChange);
        }
        let uid = meta(server.as_ref()).uid.clone();
        if !bound_node(&server).is_empty() {
            // Bound by an earlier term or a Bind whose answer was lost: say so once.
            let node = bound_node(&server).to_owned();
            let placed = condition(
                SCHEDULED,
                true,
                "Scheduled",
                format!("placed on node {node}"),
            );
            if !server.status.as_ref().is_some_and(|s| {
                s.conditions.iter().any(|c| {
                    c.r#type == SCHEDULED && c.status == v1::condition::Status::True as i32
                })
            }) {
                self.set_scheduled(&server, placed).await?;
            }
            return Ok(Action::AwaitChange);
        }
        if self.is_assumed(&uid) {
            // A Bind is in flight, or landed and the cache has not shown it yet; that change
            // queues the server again.
            return Ok(Action::AwaitChange);
        }
        let (request, flavor) = match self.request(&server) {
            Ok(r) => r,
            Err(waiting) => {
                let wanted = condition(SCHEDULED, false, waiting.reason, waiting.message);
                self.set_scheduled(&server, wanted).await?;
                return Ok(Action::AwaitChange);
            }
        };
        match self.decide_and_assume(&server, request) {
            Decision::Place(node) => {
                let m = meta(server.as_ref());
                match self.api.bind(&m.project, &m.name, &node, flavor).await {
                    Ok(bound) => {
                        let bound = v1::Server::from_object(bound).unwrap_or_default();
                        // Told in the background: the next bind need not wait for the
                        // diary, which is best effort anyway.
                        let recorder = self.recorder.clone();
                        let told = bound.clone();
                        let message =
                            format!("Successfully assigned {}/{} to {node}", m.project, m.name);
                        tokio::spawn(async move {
                            recorder.normal(&told, "Scheduled", &message).await;
                        });
                        let placed = condition(
                            SCHEDULED,
                            true,
                            "Scheduled",
                            format!("placed on node {node}"),
                        );
                        self.set_scheduled(&bound, placed).await?;
                        Ok(Action::AwaitChange)
                    }
                    Err(Error::NotFound { .. }) => {
                        self.forget(&uid);
                        Ok(Action::AwaitChange)
                    }
                    Err(e) => {
                        self.forget(&uid);
                        Err(e.into())
                    }
                }
            }
            Decision::NoValidHost { message, .. } => {
                let wanted = condition(SCHEDULED, false, "NoValidHost", message.clone());
                let status = server.status.clone().unwrap_or_default();
                if !condition_holds(
                    &status.conditions,
                    &wanted,
                    meta(server.as_ref()).generation,
                ) {
                    self.recorder
                        .warning(server.as_ref(), "NoValidHost", &message)
                        .await;
                }
                self.set_scheduled(&server, wanted).await?;
                Ok(Action::Requeue(NO_VALID_HOST_RETRY))
            }
        }
    }
}

impl Scheduler {
    /// How many placements are decided but not yet visible in the cache.
    pub fn assumed(&self) -> usize {
        self.assumed.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}
