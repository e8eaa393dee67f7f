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
//! - A range at a revision sees the store as it was then. As in etcd, compacting at `c`
//!   keeps revision `c` itself readable: a revision *below* the compaction point fails with
//!   [`StoreError::Compacted`], one above the current revision with
//!   [`StoreError::FutureRevision`].
//! - A transaction evaluates all its comparisons atomically, then runs its success or its
//!   failure operations; a transaction that writes bumps the revision by exactly one, one
//!   that writes nothing (failed guard, delete of nothing, reads) does not bump it. Reads
//!   inside a transaction see the writes made before them in the same transaction.
//! - A watch from revision `r` delivers, in revision order, every event with revision `>= r`
//!   exactly once, each with the key's previous value when the watch asks for it; a start
//!   revision below the compaction point ends the stream with [`StoreError::Compacted`].
//! - Keys attached to a lease are deleted (one delete event each, all in one revision) when
//!   the lease expires or is revoked. TTLs are whole seconds, rounded up, and at least
//!   [`MIN_LEASE_TTL`], as etcd does.
//! - Requests etcd rejects are rejected by both with [`StoreError::InvalidArgument`]: an empty
//!   key, a [`KeyRange::Between`] whose end is not after its start, more than
//!   [`MAX_TXN_OPS`] comparisons or operations in a branch, or two writes to one key in one
//!   branch (two puts, or a put inside a deleted range).
//!
//! [`etcd_process::EtcdProcess`] runs a real etcd member as a child process, for `ferro up`
//! and for tests.

#![allow(clippy::module_name_repetitions)]

use std::time::Duration;

use async_trait::async_trait;
use futures::stream::BoxStream;

pub mod etcd;
pub mod etcd_process;
pub mod memory;

/// A store revision: etcd's cluster-wide, strictly increasing write counter.
pub type Revision = i64;

/// The identifier of a lease; `0` is never a valid lease.
pub type LeaseId = i64;

/// The most comparisons, or operations in one branch, a transaction may hold (etcd's default
/// `--max-txn-ops`).
pub const MAX_TXN_OPS: usize = 128;

/// The shortest lease TTL: etcd raises shorter ones to 1.5 election timeouts, rounded up to
/// whole seconds, which is 2 s with its default timing.
pub const MIN_LEASE_TTL: Duration = Duration::from_secs(2);

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
    /// Every key that starts with the prefix; the empty prefix covers every key.
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

    /// Rejects the ranges etcd rejects or reads differently from their meaning here: an
    /// empty key, and a `Between` whose end is not after its start (etcd reads an empty end
    /// as "just the start key").
    pub(crate) fn validate(&self) -> Result<(), StoreError> {
        match self {
            KeyRange::Key(k) if k.is_empty() => {
                Err(StoreError::InvalidArgument("key is not provided".into()))
            }
            KeyRange::Between { start, end } if end.as_bytes() <= start.as_bytes() => {
                Err(StoreError::InvalidArgument(format!(
                    "range end {end:?} is not after its start {start:?}"
                )))
            }
            _ => Ok(()),
        }
    }
}

/// A read of a range of keys.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RangeRequest {
    /// The keys to read.
    pub range: KeyRange,
    /// Read the store as it was at this revision; `None` (or a revision `<= 0`, as in etcd)
    /// reads the latest.
    pub revision: Option<Revision>,
    /// At most this many keys; `0` means no limit.
    pub limit: usize,
    /// Return keys and bookkeeping with empty values.
    pub keys_only: bool,
}

impl RangeRequest {
    /// A read of one key at the latest revision.
    pub fn key(key: impl Into<String>) -> Self {
        Self {
            range: KeyRange::Key(key.into()),
            revision: None,
            limit: 0,
            keys_only: false,
        }
    }

    /// A read of every key under a prefix at the latest revision.
    pub fn prefix(prefix: impl Into<String>) -> Self {
        Self {
            range: KeyRange::Prefix(prefix.into()),
            revision: None,
            limit: 0,
            keys_only: false,
        }
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
    /// The key's value, compared byte-wise; as in etcd, no comparison of the value of a
    /// missing key holds, not even `NotEqual`.
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
        Self {
            key: key.into(),
            op: CompareOp::Equal,
            target: CompareTarget::Version(0),
        }
    }

    /// True when the key was last modified at `revision` (compare-and-swap).
    pub fn mod_revision(key: impl Into<String>, revision: Revision) -> Self {
        Self {
            key: key.into(),
            op: CompareOp::Equal,
            target: CompareTarget::ModRevision(revision),
        }
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
    /// The store revision after the transaction: the one it wrote at, or the current one if
    /// it wrote nothing.
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
    /// The key before the change, when it existed and the watch asked for previous values.
    pub prev: Option<KeyValue>,
}

/// A request to watch a range of keys.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatchRequest {
    /// The keys watched.
    pub range: KeyRange,
    /// Deliver events from this revision on; `None` (or a revision `<= 0`, as in etcd)
    /// starts after the current revision. A revision beyond the current one is allowed: the
    /// watch waits for it.
    pub start_revision: Option<Revision>,
    /// Whether each event carries the key's previous value ([`WatchEvent::prev`]). It costs
    /// etcd a read per event; a watcher that keeps its own copy of the keys leaves it off.
    pub prev_values: bool,
}

/// A batch of events in revision order, or a progress notice with no events.
///
/// The etcd backend yields one batch per etcd watch response: a history replay comes as
/// batches of several whole revisions each, and a batch's `revision` may then be well past
/// its events, with more history still to come. The memory backend yields one batch per
/// revision. Callers therefore track the
/// `mod_revision` of the last event they handled and resume from it + 1. Only an empty batch
/// promises that every event up to its `revision` has been delivered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatchBatch {
    /// A revision the store had reached when this batch was sent; every event in it is at or
    /// below this revision.
    pub revision: Revision,
    /// The events, in revision order; within one revision, in the order the transaction
    /// wrote them.
    pub events: Vec<WatchEvent>,
}

/// The stream a watch yields. It never ends quietly: when the watch cannot continue
/// (compaction, lost connection, a consumer too slow for its buffer, a closed store) it
/// yields one error and ends; the caller resumes from its last seen revision + 1.
pub type WatchStream = BoxStream<'static, Result<WatchBatch, StoreError>>;

/// Asks the store behind one watch for a progress notice: an empty [`WatchBatch`] whose
/// `revision` is the store's current revision, delivered after every event of the watch up
/// to that revision. A cache built from the watch uses it to prove it is current before
/// answering a consistent read. A request may go unanswered (a full buffer, an ended
/// watch); callers wait with a timeout.
#[derive(Clone)]
pub struct ProgressRequester(std::sync::Arc<dyn Fn() + Send + Sync>);

impl ProgressRequester {
    /// A requester that runs `request` for each request.
    pub fn new(request: impl Fn() + Send + Sync + 'static) -> Self {
        ProgressRequester(std::sync::Arc::new(request))
    }

    /// Asks for a progress notice; returns at once.
    pub fn request(&self) {
        (self.0)()
    }
}

impl std::fmt::Debug for ProgressRequester {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ProgressRequester")
    }
}

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The requested revision is below the compaction point.
    #[error("revision {requested} has been compacted (store compacted at {compacted})")]
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
    /// The request is malformed in a way etcd rejects (see the crate docs).
    #[error("invalid store request: {0}")]
    InvalidArgument(String),
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

    /// Watches like [`Store::watch`] and returns a handle that asks for progress notices.
    async fn watch_with_progress(
        &self,
        request: WatchRequest,
    ) -> Result<(WatchStream, ProgressRequester), StoreError>;

    /// Grants a lease that expires `ttl` after its last keep-alive; `ttl` is rounded up to
    /// whole seconds and raised to [`MIN_LEASE_TTL`].
    async fn lease_grant(&self, ttl: Duration) -> Result<LeaseId, StoreError>;

    /// Renews a lease; returns its granted TTL.
    async fn lease_keep_alive(&self, lease: LeaseId) -> Result<Duration, StoreError>;

    /// Revokes a lease now, deleting its keys.
    async fn lease_revoke(&self, lease: LeaseId) -> Result<(), StoreError>;

    /// Forgets the history before `revision`: later reads and watches at a lower revision
    /// fail with [`StoreError::Compacted`], while `revision` itself stays readable. Compacting
    /// at or below an earlier compaction fails with [`StoreError::Compacted`], beyond the
    /// current revision with [`StoreError::FutureRevision`].
    async fn compact(&self, revision: Revision) -> Result<(), StoreError>;

    /// The store's current revision.
    async fn current_revision(&self) -> Result<Revision, StoreError>;

    /// Reads one key at the latest revision.
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        Ok(self
            .range(RangeRequest::key(key))
            .await?
            .kvs
            .into_iter()
            .next())
    }
}

/// A TTL in whole seconds, rounded up as etcd's lease API counts them.
pub(crate) fn ttl_seconds(ttl: Duration) -> i64 {
    let secs = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
    i64::try_from(secs).unwrap_or(i64::MAX)
}
