//! Node lifecycle: judges each Node's heartbeat and says what it means for the Node and
//! for every Server bound to it.
//!
//! An agent renews the Lease `node-<name>` every few seconds; the Lease says how long a
//! renewal lasts (`leaseDurationSeconds`). This controller compares `renewTime +
//! leaseDurationSeconds` with the current time:
//! - current: the Node's `Ready` follows the agent's `HostReady` (`True`, or `False` with
//!   the agent's reason), and bound Servers that were marked unreachable get
//!   `NodeReachable=True` back. Servers that never lost their node carry no
//!   `NodeReachable` at all: absence means reachable, which saves a write per server;
//! - lapsed or missing: `Ready=Unknown`, and every bound Server gets
//!   `NodeReachable=Unknown`, from which the server controller derives phase `Unknown`.
//!
//! The judgement is [`plan`], a pure function of the Node, its Lease, its Servers and the
//! time, which the reconciler reads from a [`Clock`]; tests pass any time they like. While
//! a heartbeat is current the Node is queued again just after it would expire, so a lapse
//! is seen without any event.

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use ferro_api::{Error, Kind, Object, owners, v1};

use crate::api::Api;
use ferro_runtime::{
    Action, Caches, Controller, ObjectRef, Reconcile, ReconcileError, Store, condition,
    condition_holds, controller::Settings, events::Recorder, meta, metrics::Metrics,
};

/// The Node condition node lifecycle owns.
pub const READY: &str = "Ready";
/// The Server condition node lifecycle owns.
pub const NODE_REACHABLE: &str = "NodeReachable";
/// The agent's condition about its host.
pub const HOST_READY: &str = "HostReady";
const SERVER_BY_NODE: &str = "lifecycle-node";
/// Slack after a Lease's expiry before it is judged again, so the judgement sees it lapsed.
const EXPIRY_SLACK: Duration = Duration::from_millis(500);

/// Where the time comes from: the system clock, or a test's.
pub type Clock = Arc<dyn Fn() -> SystemTime + Send + Sync>;

/// The name of a node's heartbeat Lease.
pub fn lease_name(node: &str) -> String {
    format!("node-{node}")
}

/// What a Lease says at a given time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Heartbeat {
    /// Renewed recently enough; lapses at `expires`.
    Current {
        /// When it lapses without another renewal.
        expires: SystemTime,
    },
    /// Not renewed in time; last renewed at `renewed`.
    Lapsed {
        /// The last renewal.
        renewed: SystemTime,
    },
    /// No Lease (or one never renewed).
    Missing,
}

fn to_system(ts: &prost_types::Timestamp) -> SystemTime {
    let secs = Duration::from_secs(ts.seconds.max(0) as u64);
    SystemTime::UNIX_EPOCH + secs + Duration::from_nanos(ts.nanos.max(0) as u64)
}

/// Judges a node's Lease at `now`.
pub fn judge(lease: Option<&v1::Lease>, now: SystemTime) -> Heartbeat {
    let Some(spec) = lease.and_then(|l| l.spec.as_ref()) else {
        return Heartbeat::Missing;
    };
    let Some(renewed) = spec.renew_time.as_ref().map(to_system) else {
        return Heartbeat::Missing;
    };
    let expires = renewed + Duration::from_secs(u64::from(spec.lease_duration_seconds));
    if now < expires {
        Heartbeat::Current { expires }
    } else {
        Heartbeat::Lapsed { renewed }
    }
}

fn unknown(kind: &str, reason: &str, message: String) -> v1::Condition {
    v1::Condition {
        status: v1::condition::Status::Unknown as i32,
        ..condition(kind, false, reason, message)
    }
}

fn timestamp(t: SystemTime) -> String {
    jiff::Timestamp::try_from(t)
        .map(|t| t.to_string())
        .unwrap_or_default()
}

/// The plan for one Node.
#[derive(Clone, Debug, PartialEq)]
pub struct NodePlan {
    /// The Node's `Ready`.
    pub ready: v1::Condition,
    /// Whether the Node's `Ready` must be written.
    pub write_ready: bool,
    /// The `NodeReachable` every bound Server should show.
    pub reachable: v1::Condition,
    /// The bound Servers whose `NodeReachable` must be written.
    pub servers: Vec<ObjectRef>,
    /// When to judge again without a change.
    pub requeue: Option<Duration>,
}

/// Plans one Node at `now`. Pure.
pub fn plan(
    node: &v1::Node,
    lease: Option<&v1::Lease>,
    servers: &[Arc<v1::Server>],
    now: SystemTime,
) -> NodePlan {
    let name = &meta(node).name;
    let status = node.status.clone().unwrap_or_default();
    let heartbeat = judge(lease, now);
    let (ready, reachable, requeue) = match &heartbeat {
        Heartbeat::Current { expires } => {
            let host = status.conditions.iter().find(|c| c.r#type == HOST_READY);
            let ready = match host {
                Some(h) if h.status == v1::condition::Status::True as i32 => condition(
                    READY,
                    true,
                    "HeartbeatCurrent",
                    "the agent reports; host ready",
                ),
                Some(h) => condition(
                    READY,
                    false,
                    if h.reason.is_empty() {
                        "HostNotReady"
                    } else {
                        &h.reason
                    },
                    h.message.clone(),
                ),
                None => condition(
                    READY,
                    false,
                    "HostNotReady",
                    "the agent has not reported HostReady yet",
                ),
            };
            let reachable = condition(
                NODE_REACHABLE,
                true,
                "HeartbeatCurrent",
                format!("node {name} reports"),
            );
            let left = expires.duration_since(now).unwrap_or_default();
            (ready, reachable, Some(left + EXPIRY_SLACK))
        }
        Heartbeat::Lapsed { renewed } => {
            let message = format!(
                "node {name} stopped renewing its heartbeat; last renewal {}",
                timestamp(*renewed)
            );
            (
                unknown(READY, "HeartbeatLapsed", message.clone()),
                unknown(NODE_REACHABLE, "HeartbeatLapsed", message),
                None,
            )
        }
        Heartbeat::Missing => {
            let message = format!("node {name} has no heartbeat Lease {}", lease_name(name));
            (
                unknown(READY, "NoHeartbeat", message.clone()),
                unknown(NODE_REACHABLE, "NoHeartbeat", message),
                None,
            )
        }
    };
    let write_ready = !condition_holds(&status.conditions, &ready, meta(node).generation);
    let current = matches!(heartbeat, Heartbeat::Current { .. });
    let mut keys: Vec<ObjectRef> = servers
        .iter()
        .filter(|s| {
            let conditions = s
                .status
                .as_ref()
                .map(|st| st.conditions.as_slice())
                .unwrap_or_default();
            if current {
                // Absence means reachable: only a server once marked otherwise is written.
                conditions
                    .iter()
                    .any(|c| c.r#type == NODE_REACHABLE && c.status != reachable.status)
            } else {
                !condition_holds(conditions, &reachable, meta(s.as_ref()).generation)
            }
        })
        .map(|s| ObjectRef::of(s.as_ref()))
        .collect();
    keys.sort();
    NodePlan {
        ready,
        write_ready,
        reachable,
        servers: keys,
        requeue,
    }
}

/// The node lifecycle controller: reconciles Nodes.
pub struct NodeLifecycle {
    api: Api,
    recorder: Recorder,
    clock: Clock,
    nodes: Store<v1::Node>,
    leases: Store<v1::Lease>,
    servers: Store<v1::Server>,
}

impl NodeLifecycle {
    /// Builds the controller over the shared caches, reading time from the system clock.
    pub fn build(
        api: &Api,
        caches: &Caches,
        metrics: &Metrics,
        settings: Settings,
    ) -> (Controller, Arc<NodeLifecycle>) {
        Self::build_with_clock(api, caches, metrics, settings, Arc::new(SystemTime::now))
    }

    /// Builds the controller with a clock of the caller's.
    pub fn build_with_clock(
        api: &Api,
        caches: &Caches,
        metrics: &Metrics,
        settings: Settings,
        clock: Clock,
    ) -> (Controller, Arc<NodeLifecycle>) {
        let nodes = caches.store::<v1::Node>();
        let leases = caches.store::<v1::Lease>();
        let servers = caches.store::<v1::Server>();
        servers.add_index(SERVER_BY_NODE, |s: &v1::Server| {
            s.status
                .as_ref()
                .map(|st| st.node.clone())
                .filter(|n| !n.is_empty())
                .into_iter()
                .collect()
        });
        let controller = Controller::new("node-lifecycle", settings, metrics.clone())
            .reconciles(&nodes)
            .watches(&leases, |c| {
                c.key
                    .name
                    .strip_prefix("node-")
                    .map(|node| ObjectRef::new(Kind::Node, "", node))
                    .into_iter()
                    .collect()
            })
            .watches(&servers, |c| {
                // A server newly bound to a node is judged with that node.
                let node = |s: &Option<Arc<v1::Server>>| {
                    s.as_ref()
                        .and_then(|s| s.status.as_ref())
                        .map(|st| st.node.clone())
                        .unwrap_or_default()
                };
                let (old, new) = (node(&c.old), node(&c.new));
                if !new.is_empty() && old != new {
                    vec![ObjectRef::new(Kind::Node, "", new)]
                } else {
                    Vec::new()
                }
            });
        let reconciler = Arc::new(NodeLifecycle {
            api: api.clone(),
            recorder: Recorder::new(api.client().clone(), owners::NODE_LIFECYCLE),
            clock,
            nodes,
            leases,
            servers,
        });
        (controller, reconciler)
    }
}

impl Reconcile for NodeLifecycle {
    type Error = ReconcileError;

    async fn reconcile(&self, key: ObjectRef) -> Result<Action, ReconcileError> {
        let Some(node) = self.nodes.get(&key) else {
            return Ok(Action::AwaitChange);
        };
        let lease = self.leases.get_named("", &lease_name(&key.name));
        let servers = self.servers.by_index(SERVER_BY_NODE, &key.name);
        let now = (self.clock)();
        let plan = plan(&node, lease.as_deref(), &servers, now);
        if plan.write_ready {
            let object = Object::Node(v1::Node {
                metadata: node.metadata.clone(),
                spec: None,
                status: None,
            });
            match self
                .api
                .update_status(
                    object,
                    owners::NODE_LIFECYCLE,
                    &[],
                    vec![plan.ready.clone()],
                )
                .await
            {
                Ok(_) | Err(Error::NotFound { .. }) => {}
                Err(e) => return Err(e.into()),
            }
            let was_ready = node.status.as_ref().is_some_and(|s| {
                s.conditions
                    .iter()
                    .any(|c| c.r#type == READY && c.status == v1::condition::Status::True as i32)
            });
            if plan.ready.status == v1::condition::Status::Unknown as i32 && was_ready {
                self.recorder
                    .warning(node.as_ref(), &plan.ready.reason, &plan.ready.message)
                    .await;
            }
        }
        for server in &plan.servers {
            let Some(current) = self.servers.get(server) else {
                continue;
            };
            let object = Object::Server(v1::Server {
                metadata: current.metadata.clone(),
                spec: None,
                status: None,
            });
            match self
                .api
                .update_status(
                    object,
                    owners::NODE_LIFECYCLE,
                    &[],
                    vec![plan.reachable.clone()],
                )
                .await
            {
                Ok(_) | Err(Error::NotFound { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(match plan.requeue {
            Some(after) => Action::Requeue(after),
            None => Action::AwaitChange,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: u64 = 1_800_000_000;

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(T0 + secs)
    }

    fn lease(renewed: u64) -> v1::Lease {
        v1::Lease {
            spec: Some(v1::LeaseSpec {
                holder_identity: "n1".into(),
                lease_duration_seconds: 40,
                renew_time: Some(prost_types::Timestamp {
                    seconds: (T0 + renewed) as i64,
                    nanos: 0,
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn node(host_ready: Option<bool>, ready: Option<v1::condition::Status>) -> v1::Node {
        let mut conditions = Vec::new();
        if let Some(h) = host_ready {
            conditions.push(condition(HOST_READY, h, "Checked", "qemu missing"));
        }
        if let Some(r) = ready {
            conditions.push(v1::Condition {
                status: r as i32,
                ..condition(
                    READY,
                    true,
                    "HeartbeatCurrent",
                    "the agent reports; host ready",
                )
            });
        }
        v1::Node {
            metadata: Some(v1::ObjectMeta {
                name: "n1".into(),
                ..Default::default()
            }),
            status: Some(v1::NodeStatus {
                conditions,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn server(name: &str, reachable: Option<v1::condition::Status>) -> Arc<v1::Server> {
        Arc::new(v1::Server {
            metadata: Some(v1::ObjectMeta {
                name: name.into(),
                project: "p".into(),
                ..Default::default()
            }),
            status: Some(v1::ServerStatus {
                node: "n1".into(),
                conditions: reachable
                    .map(|r| v1::Condition {
                        r#type: NODE_REACHABLE.into(),
                        status: r as i32,
                        reason: "HeartbeatLapsed".into(),
                        ..Default::default()
                    })
                    .into_iter()
                    .collect(),
                ..Default::default()
            }),
            ..Default::default()
        })
    }

    #[test]
    fn a_lease_is_current_until_renew_time_plus_duration() {
        let cases = [
            (Some(lease(0)), 0, Heartbeat::Current { expires: at(40) }),
            (Some(lease(0)), 39, Heartbeat::Current { expires: at(40) }),
            (Some(lease(0)), 40, Heartbeat::Lapsed { renewed: at(0) }),
            (Some(lease(10)), 100, Heartbeat::Lapsed { renewed: at(10) }),
            (None, 0, Heartbeat::Missing),
            (Some(v1::Lease::default()), 0, Heartbeat::Missing),
        ];
        for (lease, now, expected) in cases {
            assert_eq!(judge(lease.as_ref(), at(now)), expected, "at +{now}s");
        }
    }

    #[test]
    fn the_plan_follows_the_heartbeat() {
        use v1::condition::Status::{False, True, Unknown};
        struct Case {
            name: &'static str,
            node: v1::Node,
            lease: Option<v1::Lease>,
            now: u64,
            ready: v1::condition::Status,
            reason: &'static str,
            write_ready: bool,
            servers: Vec<&'static str>,
            requeue: Option<Duration>,
        }
        let lapse = plan(&node(Some(true), None), Some(&lease(0)), &[], at(41)).reachable;
        let mut lost = (*server("lost", None)).clone();
        lost.status.as_mut().unwrap().conditions = vec![lapse];
        let bound = vec![
            server("fresh", None),
            Arc::new(lost),
            server("back", Some(True)),
        ];
        let cases = [
            Case {
                name: "fresh lease, host ready",
                node: node(Some(true), None),
                lease: Some(lease(0)),
                now: 5,
                ready: True,
                reason: "HeartbeatCurrent",
                write_ready: true,
                servers: vec!["lost"],
                requeue: Some(Duration::from_secs(35) + EXPIRY_SLACK),
            },
            Case {
                name: "already judged ready",
                node: node(Some(true), Some(True)),
                lease: Some(lease(0)),
                now: 5,
                ready: True,
                reason: "HeartbeatCurrent",
                write_ready: false,
                servers: vec!["lost"],
                requeue: Some(Duration::from_secs(35) + EXPIRY_SLACK),
            },
            Case {
                name: "host not ready",
                node: node(Some(false), None),
                lease: Some(lease(0)),
                now: 5,
                ready: False,
                reason: "Checked",
                write_ready: true,
                servers: vec!["lost"],
                requeue: Some(Duration::from_secs(35) + EXPIRY_SLACK),
            },
            Case {
                name: "lapsed",
                node: node(Some(true), Some(True)),
                lease: Some(lease(0)),
                now: 41,
                ready: Unknown,
                reason: "HeartbeatLapsed",
                write_ready: true,
                servers: vec!["back", "fresh"],
                requeue: None,
            },
            Case {
                name: "no lease",
                node: node(None, None),
                lease: None,
                now: 0,
                ready: Unknown,
                reason: "NoHeartbeat",
                write_ready: true,
                servers: vec!["back", "fresh", "lost"],
                requeue: None,
            },
        ];
        for case in cases {
            let plan = plan(&case.node, case.lease.as_ref(), &bound, at(case.now));
            assert_eq!(plan.ready.status, case.ready as i32, "{}", case.name);
            assert_eq!(plan.ready.reason, case.reason, "{}", case.name);
            assert_eq!(plan.write_ready, case.write_ready, "{}", case.name);
            let names: Vec<&str> = plan.servers.iter().map(|k| k.name.as_str()).collect();
            assert_eq!(names, case.servers, "{}", case.name);
            assert_eq!(plan.requeue, case.requeue, "{}", case.name);
        }
    }
}
