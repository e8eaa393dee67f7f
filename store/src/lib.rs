//! Ferro's store: an etcd-shaped multi-version key-value interface.
//!
//! The apiserver is the only user of this crate. It knows nothing of resources: keys are
//! UTF-8 paths (`/ferro/servers/default/web-1`) and values opaque bytes. Every write bumps
//! one cluster-wide revision; every key remembers the revision that created it, the one that
//! last modified it and how many times it was written since creation (its version), exactly
//! as etcd does, so that the two backends — [`etcd::EtcdStore`] and [`memory::MemoryStore`] —
//! are interchangeable and pass the same conformance suite (`tests/conformance.rs`).
//!
//! Semantics shared by both backends:
//! - A range at a revision sees the store as it was then; a revision at or below the
//!   compaction point fails with [`StoreError::Compacted`].
//! - A transaction evaluates all its comparisons atomically, then runs its success or its
//!   failure operations; a transaction that writes bumps the revision by exactly one.
//! - A watch from revision `r` delivers, in revision order, every event with revision `>= r`
//!   exactly once, each with the key's previous value; a start revision already compacted
//!   ends the stream with [`StoreError::Compacted`].
//! - Keys attached to a lease are deleted (one delete event each) when the lease expires or
//!   is revoked.

#![allow(clippy::module_name_repetitions)]

use std::time::Duration;

use async_trait::async_trait;
use futures::stream::BoxStream;

pub mod etcd;
pub mod memory;

/// A store revision: etcd's cluster-wide, strictly increasing write counter.
pub type Revision = i64;

/// The identifier of a lease; `0` is never a valid lease.
pub type LeaseId = i64;

/// One key with its value and its multi-version bookkeeping.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyValue {
    /// The key, a UTF-8 path.
    pub key: String,
    /// The value, opaque to the store.
    pub value: Vec<u8>,
    /// The revision of the write that created this key (since its last deletion).
    pub create_revision: Revision,
    /// The revision of the write that last modified this key.
    pub mod_revision: Revision,
    /// How many times the key was written since it was created; `1` after creation.
    pub version: i64,
    /// The lease the key is attached to, if any.
    pub lease: Option<LeaseId>,
}

/// Which keys a range, delete or watch covers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeyRange {
    /// Exactly one key.
    Key(String),
    /// Every key that starts with the prefix.
    Prefix(String),
    /// Keys `k` with `start <= k < end` in byte order.
    Between {
        /// First key included.
        start: String,
        /// First key excluded.
        end: String,
    },
}

impl KeyRange {
    /// Whether `key` lies in this range.
    pub fn contains(&self, key: &str) -> bool {
        match self {
            KeyRange::Key(k) => k == key,
            KeyRange::Prefix(p) => key.starts_with(p.as_str()),
            KeyRange::Between { start, end } => {
                key.as_bytes() >= start.as_bytes() && key.as_bytes() < end.as_bytes()
            }
        }
    }
}

/// A read of a range of keys.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RangeRequest {
    /// The keys to read.
    pub range: KeyRange,
    /// Read the store as it was at this revision; `None` reads the latest.
    pub revision: Option<Revision>,
    /// At most this many keys; `0` means no limit.
    pub limit: usize,
    /// Return keys and bookkeeping with empty values.
    pub keys_only: bool,
}

impl RangeRequest {
    /// A read of one key at the latest revision.
    pub fn key(key: impl Into<String>) -> Self {
        Self { range: KeyRange::Key(key.into()), revision: None, limit: 0, keys_only: false }
    }

    /// A read of every key under a prefix at the latest revision.
    pub fn prefix(prefix: impl Into<String>) -> Self {
        Self { range: KeyRange::Prefix(prefix.into()), revision: None, limit: 0, keys_only: false }
    }
}

/// The answer to a [`RangeRequest`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RangeResponse {
    /// The keys found, in byte order of their keys, at most `limit` of them.
    pub kvs: Vec<KeyValue>,
    /// Whether more keys lie in the range beyond those returned. To continue, range again
    /// at [`RangeResponse::revision`] from the key after the last one returned
    /// (`last_key + "\0"`).
    pub more: bool,
    /// How many keys the whole range holds at that revision.
    pub count: usize,
    /// The revision the read was served at: the requested one, or the latest.
    pub revision: Revision,
}

/// What a transaction comparison looks at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CompareTarget {
    /// The key's version; `0` when the key does not exist.
    Version(i64),
    /// The key's mod revision; `0` when the key does not exist.
    ModRevision(Revision),
    /// The key's create revision; `0` when the key does not exist.
    CreateRevision(Revision),
    /// The key's value; a missing key compares unequal to every value.
    Value(Vec<u8>),
}

/// How a transaction comparison compares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CompareOp {
    /// Equal.
    Equal,
    /// Not equal.
    NotEqual,
    /// The key's field is greater than the given one.
    Greater,
    /// The key's field is less than the given one.
    Less,
}

/// One comparison of a transaction's guard.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Compare {
    /// The key compared.
    pub key: String,
    /// The comparison.
    pub op: CompareOp,
    /// The field and the value compared against.
    pub target: CompareTarget,
}

impl Compare {
    /// True when the key does not exist (create-if-absent).
    pub fn absent(key: impl Into<String>) -> Self {
        Self { key: key.into(), op: CompareOp::Equal, target: CompareTarget::Version(0) }
    }

    /// True when the key was last modified at `revision` (compare-and-swap).
    pub fn mod_revision(key: impl Into<String>, revision: Revision) -> Self {
        Self { key: key.into(), op: CompareOp::Equal, target: CompareTarget::ModRevision(revision) }
    }
}

/// One operation of a transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TxnOp {
    /// Write a key, optionally attached to a lease.
    Put {
        /// The key.
        key: String,
        /// The value.
        value: Vec<u8>,
        /// The lease the key is attached to.
        lease: Option<LeaseId>,
    },
    /// Delete every key in a range.
    Delete(KeyRange),
    /// Read a range inside the transaction.
    Range(RangeRequest),
}

/// The result of one [`TxnOp`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TxnOpResponse {
    /// A put; carries the key's previous value.
    Put {
        /// The key before the put, if it existed.
        prev: Option<KeyValue>,
    },
    /// A delete; carries the deleted keys.
    Delete {
        /// The keys deleted, with their last values.
        deleted: Vec<KeyValue>,
    },
    /// A range read.
    Range(RangeResponse),
}

/// A transaction: if every comparison holds, run `success`, else run `failure`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Txn {
    /// The guard; all must hold.
    pub compare: Vec<Compare>,
    /// Operations run when the guard holds.
    pub success: Vec<TxnOp>,
    /// Operations run when it does not.
    pub failure: Vec<TxnOp>,
}

/// The outcome of a [`Txn`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TxnResponse {
    /// Whether the guard held and `success` ran.
    pub succeeded: bool,
    /// The store revision after the transaction.
    pub revision: Revision,
    /// One response per operation that ran, in order.
    pub responses: Vec<TxnOpResponse>,
}

/// What happened to a key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// The key was created or modified.
    Put,
    /// The key was deleted.
    Delete,
}

/// One change seen by a watch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatchEvent {
    /// Put or delete.
    pub kind: EventKind,
    /// The key after the change; for a delete, the key with an empty value and the
    /// deleting revision as its `mod_revision`.
    pub kv: KeyValue,
    /// The key before the change, when it existed.
    pub prev: Option<KeyValue>,
}

/// A request to watch a range of keys.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatchRequest {
    /// The keys watched.
    pub range: KeyRange,
    /// Deliver events from this revision on; `None` starts after the current revision.
    pub start_revision: Option<Revision>,
}

/// A batch of events that share one revision, or a progress notice with no events.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatchBatch {
    /// The revision the store had reached when this batch was sent; all events in it are
    /// at or below this revision.
    pub revision: Revision,
    /// The events, in revision order.
    pub events: Vec<WatchEvent>,
}

/// The stream a watch yields. It ends with an error when the watch cannot continue
/// (compaction, lost connection); the caller resumes from its last seen revision + 1.
pub type WatchStream = BoxStream<'static, Result<WatchBatch, StoreError>>;

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The requested revision is at or below the compaction point.
    #[error("revision {requested} has been compacted (compacted through {compacted})")]
    Compacted {
        /// The revision asked for.
        requested: Revision,
        /// The store's compaction point.
        compacted: Revision,
    },
    /// The requested revision is newer than the store's current one.
    #[error("revision {requested} is in the future (current {current})")]
    FutureRevision {
        /// The revision asked for.
        requested: Revision,
        /// The store's current revision.
        current: Revision,
    },
    /// The lease does not exist or has expired.
    #[error("lease {0} not found")]
    LeaseNotFound(LeaseId),
    /// The backend cannot be reached or failed.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The backend answered something that breaks the store's contract.
    #[error("store internal error: {0}")]
    Internal(String),
}

/// The store's interface. Both backends implement it with identical semantics.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Reads a range of keys.
    async fn range(&self, request: RangeRequest) -> Result<RangeResponse, StoreError>;

    /// Runs a transaction atomically.
    async fn txn(&self, txn: Txn) -> Result<TxnResponse, StoreError>;

    /// Watches a range of keys from a revision.
    async fn watch(&self, request: WatchRequest) -> Result<WatchStream, StoreError>;

    /// Grants a lease that expires `ttl` after its last keep-alive.
    async fn lease_grant(&self, ttl: Duration) -> Result<LeaseId, StoreError>;

    /// Renews a lease; returns its TTL.
    async fn lease_keep_alive(&self, lease: LeaseId) -> Result<Duration, StoreError>;

    /// Revokes a lease now, deleting its keys.
    async fn lease_revoke(&self, lease: LeaseId) -> Result<(), StoreError>;

    /// Forgets history at and below `revision`; later reads of it fail with
    /// [`StoreError::Compacted`].
    async fn compact(&self, revision: Revision) -> Result<(), StoreError>;

    /// The store's current revision.
    async fn current_revision(&self) -> Result<Revision, StoreError>;

    /// Reads one key at the latest revision.
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        Ok(self.range(RangeRequest::key(key)).await?.kvs.into_iter().next())
    }
}
