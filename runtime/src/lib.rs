//! Ferro's controller runtime, in the shape of kube-runtime: what `ferro controllers` and
//! `ferro agent` both run their reconcilers on.
//!
//! - [`reflector`]: one cache per kind, filled by List and kept current by Watch; the only
//!   copy of each object a controller process holds. Listeners and indices hang off it.
//! - [`queue`]: a work queue of keys that deduplicates, runs one reconcile per key at a
//!   time, delays requeues and backs off per key after errors.
//! - [`controller`]: wires triggers (the kind itself, owned kinds, referenced kinds, a
//!   periodic resync) into a queue and runs a reconciler over it, until a graceful
//!   shutdown.
//! - [`predicates`]: which updates of an object call for a reconcile.
//! - [`service`]: the reconciler as a `tower::Service`, and the tracing and metrics layers.
//! - [`leader`]: leader election over a `Lease` renewed by compare-and-swap.
//! - [`finalizer`]: the helper that turns an object into `Apply` or `Cleanup`.
//! - [`events`]: the Event recorder and the reaper that expires old Events.
//! - [`metrics`]: Prometheus text metrics and the tiny HTTP endpoint serving them.
//!
//! Reconcilers take a key, never a "what changed" hint, and running one twice is harmless:
//! everything they decide is derived from the caches and the API each time.
//!
//! Keys are generic ([`Key`]): the controllers reconcile [`ObjectRef`]s; the node agent
//! reconciles Server uids, because its reconciler also handles VMs on the host whose
//! Server is gone and that only a uid names.

pub mod controller;
pub mod events;
pub mod finalizer;
pub mod leader;
pub mod metrics;
pub mod predicates;
pub mod queue;
pub mod reflector;
pub mod service;

use std::{fmt, hash::Hash, time::Duration};

use ferro_api::{Kind, Object, Resource, v1};

pub use controller::Controller;
pub use reflector::{Caches, Store};
pub use service::Reconcile;

/// What a work queue holds and a reconciler takes: an [`ObjectRef`] for the controllers,
/// a uid for the agent, or any host-side key (such as "a tap with no owner").
pub trait Key: Clone + Eq + Hash + Ord + fmt::Debug + fmt::Display + Send + Sync + 'static {}

impl<K> Key for K where
    K: Clone + Eq + Hash + Ord + fmt::Debug + fmt::Display + Send + Sync + 'static
{
}

/// The key of an object: what the controllers' queues hold and reconcilers take.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectRef {
    /// The kind.
    pub kind: Kind,
    /// The project; empty for cluster-scoped kinds.
    pub project: String,
    /// The name.
    pub name: String,
}

impl ObjectRef {
    /// A key from its parts.
    pub fn new(kind: Kind, project: impl Into<String>, name: impl Into<String>) -> Self {
        ObjectRef {
            kind,
            project: project.into(),
            name: name.into(),
        }
    }

    /// The key of a typed object.
    pub fn of<T: Resource>(object: &T) -> Self {
        let meta = object.metadata().cloned().unwrap_or_default();
        ObjectRef {
            kind: T::KIND,
            project: meta.project,
            name: meta.name,
        }
    }

    /// The key of any object.
    pub fn of_object(object: &Object) -> Self {
        ObjectRef {
            kind: object.kind(),
            project: object.project().to_owned(),
            name: object.name().to_owned(),
        }
    }

    /// The key of the object an owner reference points at.
    pub fn of_owner(owner: &v1::OwnerReference) -> Option<Self> {
        let kind = Kind::from_kind_name(&owner.kind)?;
        Some(ObjectRef {
            kind,
            project: owner.project.clone(),
            name: owner.name.clone(),
        })
    }
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.project.is_empty() {
            write!(f, "{}/{}", self.kind.plural(), self.name)
        } else {
            write!(f, "{}/{}/{}", self.kind.plural(), self.project, self.name)
        }
    }
}

/// What a reconciler wants next for its key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Reconcile again after this long, even if nothing changes.
    Requeue(Duration),
    /// Nothing more to do until something changes.
    AwaitChange,
}

/// Why a reconcile failed; the key is retried with backoff.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// An API call failed.
    #[error(transparent)]
    Api(#[from] ferro_api::Error),
    /// Something the reconciler cannot proceed past, retried later.
    #[error("{0}")]
    Retry(String),
}

/// An error and its sources on one line: the whole chain is what an operator needs, and
/// each Display says only its own part.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// The metadata of a typed object, or the empty one.
pub fn meta<T: Resource>(object: &T) -> &v1::ObjectMeta {
    static EMPTY: std::sync::OnceLock<v1::ObjectMeta> = std::sync::OnceLock::new();
    object
        .metadata()
        .unwrap_or_else(|| EMPTY.get_or_init(v1::ObjectMeta::default))
}

/// Whether the object's deletion has started.
pub fn is_deleting<T: Resource>(object: &T) -> bool {
    meta(object).deletion_timestamp.is_some()
}

/// The current wall-clock time as a protobuf timestamp.
pub fn now() -> prost_types::Timestamp {
    let ts = jiff::Timestamp::now();
    prost_types::Timestamp {
        seconds: ts.as_second(),
        nanos: ts.subsec_nanosecond(),
    }
}

/// A condition with a status, reason and message; the apiserver stamps transition times and
/// the observed generation.
pub fn condition(
    kind: &str,
    status: bool,
    reason: &str,
    message: impl Into<String>,
) -> v1::Condition {
    let status = if status {
        v1::condition::Status::True
    } else {
        v1::condition::Status::False
    };
    v1::Condition {
        r#type: kind.to_owned(),
        status: status as i32,
        reason: reason.to_owned(),
        message: message.into(),
        ..Default::default()
    }
}

/// Whether `existing` already says what `wanted` says (type, status, reason, message), so a
/// status write would change nothing but timestamps.
pub fn condition_holds(
    existing: &[v1::Condition],
    wanted: &v1::Condition,
    generation: i64,
) -> bool {
    existing.iter().any(|c| {
        c.r#type == wanted.r#type
            && c.status == wanted.status
            && c.reason == wanted.reason
            && c.message == wanted.message
            && c.observed_generation == generation
    })
}

/// An owner reference naming `owner` as the controller of the object that carries it.
pub fn controller_reference<T: Resource>(
    owner: &T,
    block_owner_deletion: bool,
) -> v1::OwnerReference {
    let meta = meta(owner);
    v1::OwnerReference {
        kind: T::KIND.name().to_owned(),
        name: meta.name.clone(),
        project: meta.project.clone(),
        uid: meta.uid.clone(),
        controller: true,
        block_owner_deletion,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_display_like_the_cli() {
        assert_eq!(
            ObjectRef::new(Kind::Port, "default", "p1").to_string(),
            "ports/default/p1"
        );
        assert_eq!(
            ObjectRef::new(Kind::IPAddress, "", "x").to_string(),
            "ipaddresses/x"
        );
    }

    #[test]
    fn condition_holds_compares_what_people_read() {
        let ready = condition("Ready", true, "Allocated", "ok");
        let mut stored = ready.clone();
        stored.observed_generation = 2;
        assert!(condition_holds(&[stored.clone()], &ready, 2));
        assert!(
            !condition_holds(&[stored.clone()], &ready, 3),
            "a newer generation must be recorded"
        );
        let other = condition("Ready", false, "Allocated", "ok");
        assert!(!condition_holds(&[stored], &other, 2));
    }
}
