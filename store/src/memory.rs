//! The in-memory backend: etcd's MVCC semantics inside one process, for unit and integration
//! tests and for single-process development clusters.
//!
//! One mutex guards the whole state: a `BTreeMap` from each key to its history (one entry per
//! write, deletions included as tombstones), the leases and the live watchers. Every operation
//! takes the lock once and never awaits while holding it, so transactions are serializable by
//! construction, and a watch registers in the same critical section that snapshots the history
//! it replays: the hand-over from history to live events has no gap and no duplicate.
//!
//! Compaction at `c` keeps, for every key, its newest write at or before `c` unless that write
//! is a deletion, and everything after `c` — what etcd keeps. Revision `c` therefore stays
//! readable, and a watch from `c` sees the puts of revision `c` (without their previous
//! values) but not its deletions, exactly as with etcd.
//!
//! **Slow watchers.** Each watcher has a bounded buffer of batches
//! ([`DEFAULT_WATCH_BUFFER`], or [`MemoryStore::with_watch_buffer`]). Writers never wait for
//! readers: a watcher whose buffer is full when a revision commits is dropped, and its stream
//! yields the batches it had buffered, then `StoreError::Unavailable("watch fell behind")`,
//! then ends. The caller resumes from the last revision it handled + 1, as after losing an
//! etcd connection. Memory therefore stays bounded whatever a consumer does.
//!
//! **Leases** run on tokio's clock, so tests can drive expiry with a paused clock. A task
//! spawned on the first lease grant revokes leases when they fall due; lease calls and
//! transactions also revoke due leases first, so their answers never depend on when that task
//! last ran. Revoking a lease deletes its keys in one revision, in key order, as etcd does.

use std::cmp::Ordering as CmpOrdering;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::ops::Bound;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;

use crate::{
    Compare, CompareOp, CompareTarget, EventKind, KeyRange, KeyValue, LeaseId, MAX_TXN_OPS,
    MIN_LEASE_TTL, ProgressRequester, RangeRequest, RangeResponse, Revision, Store, StoreError,
    Txn, TxnOp, TxnOpResponse, TxnResponse, WatchBatch, WatchEvent, WatchRequest, WatchStream,
    ttl_seconds,
};

/// How many batches (revisions) a watcher may have waiting before it is dropped as too slow.
pub const DEFAULT_WATCH_BUFFER: usize = 1024;

/// etcd's largest lease TTL, in seconds.
const MAX_LEASE_TTL_SECS: i64 = 9_000_000_000;

/// The in-memory store. Clones share one store; it lives until the last clone is dropped.
#[derive(Clone)]
pub struct MemoryStore {
    inner: Arc<Inner>,
}

struct Inner {
    state: Mutex<State>,
    /// Wakes the lease expiry task: a new lease may fall due before the one it sleeps for,
    /// and a dropped store must let the task end.
    lease_timer: Arc<Notify>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The expiry task holds only a weak reference; waking it lets it see that and end.
        self.lease_timer.notify_one();
    }
}

struct State {
    /// The current revision; a fresh etcd starts at 1, and so do we.
    revision: Revision,
    /// The last compaction point; `0` before any compaction.
    compacted: Revision,
    /// Each key's writes, oldest first; the revisions in one history are strictly increasing.
    keys: BTreeMap<String, Vec<Entry>>,
    leases: HashMap<LeaseId, Lease>,
    next_lease: LeaseId,
    lease_timer_started: bool,
    watchers: Vec<Watcher>,
    watch_buffer: usize,
}

/// One write of a key.
#[derive(Clone)]
struct Entry {
    revision: Revision,
    /// The position of this write in its transaction, which orders the events of a revision.
    sub: usize,
    /// The key's value after the write; `None` for a deletion.
    live: Option<Live>,
}

#[derive(Clone)]
struct Live {
    value: Vec<u8>,
    create_revision: Revision,
    version: i64,
    lease: Option<LeaseId>,
}

struct Lease {
    ttl: Duration,
    deadline: Instant,
    /// The keys attached; a `BTreeSet` so that revocation deletes them in key order.
    keys: BTreeSet<String>,
}

struct Watcher {
    range: KeyRange,
    /// The first revision this watcher wants; later than the current one for a watch that
    /// waits for a future revision.
    start: Revision,
    tx: mpsc::Sender<WatchBatch>,
    /// Set when the watcher is dropped for a full buffer, so its stream can say why it ends.
    fell_behind: Arc<AtomicBool>,
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.lock();
        f.debug_struct("MemoryStore")
            .field("revision", &state.revision)
            .field("compacted", &state.compacted)
            .field("keys", &state.keys.len())
            .field("leases", &state.leases.len())
            .field("watchers", &state.watchers.len())
            .finish()
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStore {
    /// An empty store at revision 1, with the default watch buffer.
    pub fn new() -> Self {
        Self::with_watch_buffer(DEFAULT_WATCH_BUFFER)
    }

    /// An empty store whose watchers may each have up to `batches` batches waiting before
    /// they are dropped as too slow (at least 1).
    pub fn with_watch_buffer(batches: usize) -> Self {
        let state = State {
            revision: 1,
            compacted: 0,
            keys: BTreeMap::new(),
            leases: HashMap::new(),
            next_lease: 1,
            lease_timer_started: false,
            watchers: Vec::new(),
            watch_buffer: batches.max(1),
        };
        Self {
            inner: Arc::new(Inner {
                state: Mutex::new(state),
                lease_timer: Arc::new(Notify::new()),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing panics while holding the lock in normal operation; if something did, the
        // state is still structurally valid, and refusing all further calls would help no one.
        self.inner
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts the lease expiry task once, on the runtime of the first lease grant.
    fn start_lease_timer(&self, state: &mut State) {
        if !state.lease_timer_started {
            state.lease_timer_started = true;
            tokio::spawn(expire_leases(
                Arc::downgrade(&self.inner),
                self.inner.lease_timer.clone(),
            ));
        }
    }
}

/// Revokes leases as they fall due, until the store is dropped.
async fn expire_leases(store: Weak<Inner>, wake: Arc<Notify>) {
    loop {
        let next = {
            let Some(inner) = store.upgrade() else { return };
            let mut state = inner.state.lock().unwrap_or_else(PoisonError::into_inner);
            state.expire_due(Instant::now())
        };
        match next {
            Some(deadline) => {
                tokio::select! {
                    () = tokio::time::sleep_until(deadline) => {}
                    () = wake.notified() => {}
                }
            }
            None => wake.notified().await,
        }
    }
}

fn to_kv(key: &str, revision: Revision, live: &Live, keys_only: bool) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: if keys_only {
            Vec::new()
        } else {
            live.value.clone()
        },
        create_revision: live.create_revision,
        mod_revision: revision,
        version: live.version,
        lease: live.lease,
    }
}

/// The newest entry of `history` at or before `revision`.
fn entry_at(history: &[Entry], revision: Revision) -> Option<&Entry> {
    let after = history.partition_point(|e| e.revision <= revision);
    after.checked_sub(1).map(|i| &history[i])
}

/// The event a history entry stands for, with the key's previous value.
fn event_of(key: &str, history: &[Entry], index: usize) -> WatchEvent {
    let entry = &history[index];
    let prev = index.checked_sub(1).and_then(|i| {
        history[i]
            .live
            .as_ref()
            .map(|live| to_kv(key, history[i].revision, live, false))
    });
    match &entry.live {
        Some(live) => WatchEvent {
            kind: EventKind::Put,
            kv: to_kv(key, entry.revision, live, false),
            prev,
        },
        None => WatchEvent {
            kind: EventKind::Delete,
            kv: tombstone(key, entry.revision),
            prev,
        },
    }
}

/// What etcd reports as the key of a delete event: the key and the deleting revision only.
fn tombstone(key: &str, revision: Revision) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Vec::new(),
        create_revision: 0,
        mod_revision: revision,
        version: 0,
        lease: None,
    }
}

/// The request checks etcd makes before a transaction reaches its state machine.
fn check_txn(txn: &Txn) -> Result<(), StoreError> {
    if txn
        .compare
        .len()
        .max(txn.success.len())
        .max(txn.failure.len())
        > MAX_TXN_OPS
    {
        return Err(StoreError::InvalidArgument(
            "too many operations in txn request".into(),
        ));
    }
    if txn.compare.iter().any(|c| c.key.is_empty()) {
        return Err(StoreError::InvalidArgument("key is not provided".into()));
    }
    for branch in [&txn.success, &txn.failure] {
        let mut puts = HashSet::new();
        for op in branch {
            match op {
                TxnOp::Put { key, .. } => {
                    if key.is_empty() {
                        return Err(StoreError::InvalidArgument("key is not provided".into()));
                    }
                    if !puts.insert(key.as_str()) {
                        return Err(duplicate_key());
                    }
                }
                TxnOp::Delete(range) => range.validate()?,
                TxnOp::Range(request) => request.range.validate()?,
            }
        }
        // A put and a delete of the same key in one revision would make two events with one
        // revision for one key; etcd refuses it, whatever their order.
        for op in branch {
            if let TxnOp::Delete(range) = op
                && puts.iter().any(|key| range.contains(key))
            {
                return Err(duplicate_key());
            }
        }
    }
    Ok(())
}

fn duplicate_key() -> StoreError {
    StoreError::InvalidArgument("duplicate key given in txn request".into())
}

impl State {
    fn keys_in<'a>(
        &'a self,
        range: &'a KeyRange,
    ) -> Box<dyn Iterator<Item = (&'a String, &'a Vec<Entry>)> + 'a> {
        match range {
            KeyRange::Key(key) => Box::new(self.keys.get_key_value(key.as_str()).into_iter()),
            KeyRange::Prefix(prefix) => Box::new(
                self.keys
                    .range::<str, _>((Bound::Included(prefix.as_str()), Bound::Unbounded))
                    .take_while(move |(key, _)| key.starts_with(prefix.as_str())),
            ),
            KeyRange::Between { start, end } if start < end => {
                Box::new(self.keys.range::<str, _>((
                    Bound::Included(start.as_str()),
                    Bound::Excluded(end.as_str()),
                )))
            }
            // Rejected by `validate` before we get here; BTreeMap::range would panic on it.
            KeyRange::Between { .. } => Box::new(std::iter::empty()),
        }
    }

    /// The revision a read asks for, checked against the store's history.
    fn read_revision(&self, requested: Option<Revision>) -> Result<Revision, StoreError> {
        match requested {
            Some(r) if r > self.revision => Err(StoreError::FutureRevision {
                requested: r,
                current: self.revision,
            }),
            Some(r) if r > 0 && r < self.compacted => Err(StoreError::Compacted {
                requested: r,
                compacted: self.compacted,
            }),
            Some(r) if r > 0 => Ok(r),
            _ => Ok(self.revision),
        }
    }

    fn range_at(&self, request: &RangeRequest, revision: Revision) -> RangeResponse {
        let mut kvs = Vec::new();
        let mut count = 0;
        for (key, history) in self.keys_in(&request.range) {
            let Some(entry) = entry_at(history, revision) else {
                continue;
            };
            let Some(live) = &entry.live else { continue };
            count += 1;
            if request.limit == 0 || kvs.len() < request.limit {
                kvs.push(to_kv(key, entry.revision, live, request.keys_only));
            }
        }
        RangeResponse {
            more: kvs.len() < count,
            count,
            kvs,
            revision,
        }
    }

    /// The key's current value and the revision that wrote it.
    fn latest(&self, key: &str) -> Option<(Revision, &Live)> {
        let entry = self.keys.get(key)?.last()?;
        entry.live.as_ref().map(|live| (entry.revision, live))
    }

    fn holds(&self, compare: &Compare) -> bool {
        let current = self.latest(&compare.key);
        let ordering = match (&compare.target, current) {
            // etcd has no way to represent a missing value, so it fails every value comparison
            // on a missing key.
            (CompareTarget::Value(_), None) => return false,
            (CompareTarget::Value(v), Some((_, live))) => live.value.as_slice().cmp(v.as_slice()),
            (CompareTarget::Version(v), current) => current.map_or(0, |(_, l)| l.version).cmp(v),
            (CompareTarget::ModRevision(r), current) => current.map_or(0, |(rev, _)| rev).cmp(r),
            (CompareTarget::CreateRevision(r), current) => {
                current.map_or(0, |(_, l)| l.create_revision).cmp(r)
            }
        };
        match compare.op {
            CompareOp::Equal => ordering == CmpOrdering::Equal,
            CompareOp::NotEqual => ordering != CmpOrdering::Equal,
            CompareOp::Greater => ordering == CmpOrdering::Greater,
            CompareOp::Less => ordering == CmpOrdering::Less,
        }
    }

    fn txn(&mut self, txn: Txn) -> Result<TxnResponse, StoreError> {
        check_txn(&txn)?;
        let succeeded = txn.compare.iter().all(|c| self.holds(c));
        let ops = if succeeded { txn.success } else { txn.failure };
        // Everything that can fail is checked before the first write, so a transaction
        // either applies whole or not at all.
        for op in &ops {
            match op {
                TxnOp::Range(request) => {
                    self.read_revision(request.revision)?;
                }
                TxnOp::Put {
                    lease: Some(lease), ..
                } if *lease != 0 && !self.leases.contains_key(lease) => {
                    return Err(StoreError::LeaseNotFound(*lease));
                }
                _ => {}
            }
        }
        let write = self.revision + 1;
        let mut events = Vec::new();
        let mut responses = Vec::with_capacity(ops.len());
        for op in ops {
            let response = match op {
                TxnOp::Range(request) => {
                    // Like etcd, reads see this transaction's earlier writes.
                    let revision = match request.revision {
                        Some(r) if r > 0 => r,
                        _ if events.is_empty() => self.revision,
                        _ => write,
                    };
                    TxnOpResponse::Range(self.range_at(&request, revision))
                }
                TxnOp::Put { key, value, lease } => {
                    let event =
                        self.put(key, value, lease.filter(|&l| l != 0), write, events.len());
                    let prev = event.prev.clone();
                    events.push(event);
                    TxnOpResponse::Put { prev }
                }
                TxnOp::Delete(range) => {
                    let deleted = self.delete(&range, write, &mut events);
                    TxnOpResponse::Delete { deleted }
                }
            };
            responses.push(response);
        }
        self.commit(write, events);
        Ok(TxnResponse {
            succeeded,
            revision: self.revision,
            responses,
        })
    }

    fn put(
        &mut self,
        key: String,
        value: Vec<u8>,
        lease: Option<LeaseId>,
        revision: Revision,
        sub: usize,
    ) -> WatchEvent {
        let prev = self
            .latest(&key)
            .map(|(rev, live)| to_kv(&key, rev, live, false));
        let (create_revision, version) = prev
            .as_ref()
            .map_or((revision, 1), |p| (p.create_revision, p.version + 1));
        if let Some(old) = prev.as_ref().and_then(|p| p.lease)
            && Some(old) != lease
            && let Some(old) = self.leases.get_mut(&old)
        {
            old.keys.remove(&key);
        }
        if let Some(new) = lease.and_then(|l| self.leases.get_mut(&l)) {
            new.keys.insert(key.clone());
        }
        let live = Live {
            value,
            create_revision,
            version,
            lease,
        };
        let kv = to_kv(&key, revision, &live, false);
        self.keys.entry(key).or_default().push(Entry {
            revision,
            sub,
            live: Some(live),
        });
        WatchEvent {
            kind: EventKind::Put,
            kv,
            prev,
        }
    }

    /// Deletes the live keys of `range` at `revision`, appending one event each; returns
    /// their last values.
    fn delete(
        &mut self,
        range: &KeyRange,
        revision: Revision,
        events: &mut Vec<WatchEvent>,
    ) -> Vec<KeyValue> {
        let doomed: Vec<KeyValue> = self
            .keys_in(range)
            .filter_map(|(key, history)| {
                let last = history.last()?;
                last.live
                    .as_ref()
                    .map(|live| to_kv(key, last.revision, live, false))
            })
            .collect();
        for prev in &doomed {
            if let Some(lease) = prev.lease.and_then(|l| self.leases.get_mut(&l)) {
                lease.keys.remove(&prev.key);
            }
            if let Some(history) = self.keys.get_mut(&prev.key) {
                history.push(Entry {
                    revision,
                    sub: events.len(),
                    live: None,
                });
            }
            events.push(WatchEvent {
                kind: EventKind::Delete,
                kv: tombstone(&prev.key, revision),
                prev: Some(prev.clone()),
            });
        }
        doomed
    }

    /// Makes the writes of `revision` current and hands their events to the watchers; a
    /// transaction that wrote nothing leaves the revision as it was.
    fn commit(&mut self, revision: Revision, events: Vec<WatchEvent>) {
        if events.is_empty() {
            return;
        }
        self.revision = revision;
        self.watchers.retain(|watcher| {
            if watcher.tx.is_closed() {
                return false;
            }
            if revision < watcher.start {
                return true;
            }
            let mine: Vec<WatchEvent> = events
                .iter()
                .filter(|e| watcher.range.contains(&e.kv.key))
                .cloned()
                .collect();
            if mine.is_empty() {
                return true;
            }
            match watcher.tx.try_send(WatchBatch {
                revision,
                events: mine,
            }) {
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    watcher.fell_behind.store(true, Ordering::Release);
                    false
                }
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            }
        });
    }

    /// Every event of `range` from `start` on, one batch per revision.
    fn history(&self, range: &KeyRange, start: Revision) -> Vec<WatchBatch> {
        let mut found = Vec::new();
        for (key, history) in self.keys_in(range) {
            let first = history.partition_point(|e| e.revision < start);
            for index in first..history.len() {
                let entry = &history[index];
                found.push((entry.revision, entry.sub, event_of(key, history, index)));
            }
        }
        found.sort_by_key(|(revision, sub, _)| (*revision, *sub));
        let mut batches: Vec<WatchBatch> = Vec::new();
        for (revision, _, event) in found {
            match batches.last_mut() {
                Some(batch) if batch.revision == revision => batch.events.push(event),
                _ => batches.push(WatchBatch {
                    revision,
                    events: vec![event],
                }),
            }
        }
        batches
    }

    fn watch(&mut self, request: WatchRequest) -> Result<WatchStream, StoreError> {
        request.range.validate()?;
        let start = match request.start_revision {
            Some(r) if r > 0 => r,
            _ => self.revision + 1,
        };
        if start < self.compacted {
            let error = StoreError::Compacted {
                requested: start,
                compacted: self.compacted,
            };
            return Ok(futures::stream::once(async move { Err(error) }).boxed());
        }
        let history = self.history(&request.range, start);
        let (tx, rx) = mpsc::channel(self.watch_buffer);
        let fell_behind = Arc::new(AtomicBool::new(false));
        self.watchers.push(Watcher {
            range: request.range,
            start,
            tx,
            fell_behind: fell_behind.clone(),
        });
        let feed = Feed {
            history: history.into_iter(),
            rx,
            fell_behind,
            ended: false,
            prev_values: request.prev_values,
        };
        Ok(futures::stream::unfold(feed, Feed::next).boxed())
    }

    fn compact(&mut self, revision: Revision) -> Result<(), StoreError> {
        if revision > self.revision {
            return Err(StoreError::FutureRevision {
                requested: revision,
                current: self.revision,
            });
        }
        if revision <= self.compacted {
            return Err(StoreError::Compacted {
                requested: revision,
                compacted: self.compacted,
            });
        }
        self.keys.retain(|_, history| {
            let after = history.partition_point(|e| e.revision <= revision);
            // Keep the value the key had at `revision`, so that it stays readable there.
            let keep_from = match after.checked_sub(1) {
                Some(last) if history[last].live.is_some() => last,
                _ => after,
            };
            history.drain(..keep_from);
            !history.is_empty()
        });
        self.compacted = revision;
        Ok(())
    }

    fn revoke(&mut self, id: LeaseId) -> Result<(), StoreError> {
        let lease = self
            .leases
            .remove(&id)
            .ok_or(StoreError::LeaseNotFound(id))?;
        let write = self.revision + 1;
        let mut events = Vec::new();
        for key in lease.keys {
            self.delete(&KeyRange::Key(key), write, &mut events);
        }
        self.commit(write, events);
        Ok(())
    }

    /// Revokes the leases due at `now`, in id order; returns the next deadline.
    fn expire_due(&mut self, now: Instant) -> Option<Instant> {
        let mut due: Vec<LeaseId> = self
            .leases
            .iter()
            .filter(|(_, l)| l.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        due.sort_unstable();
        for id in due {
            // The lease was listed just above, under the same lock; it cannot be missing.
            let _ = self.revoke(id);
        }
        self.leases.values().map(|l| l.deadline).min()
    }

    fn grant(&mut self, ttl: Duration) -> Result<LeaseId, StoreError> {
        let secs = ttl_seconds(ttl);
        if secs > MAX_LEASE_TTL_SECS {
            return Err(StoreError::InvalidArgument("too large lease TTL".into()));
        }
        let ttl = Duration::from_secs(secs.unsigned_abs()).max(MIN_LEASE_TTL);
        let deadline = Instant::now()
            .checked_add(ttl)
            .ok_or_else(|| StoreError::InvalidArgument("too large lease TTL".into()))?;
        let id = self.next_lease;
        self.next_lease += 1;
        self.leases.insert(
            id,
            Lease {
                ttl,
                deadline,
                keys: BTreeSet::new(),
            },
        );
        Ok(id)
    }

    fn keep_alive(&mut self, id: LeaseId) -> Result<Duration, StoreError> {
        let now = Instant::now();
        self.expire_due(now);
        let lease = self
            .leases
            .get_mut(&id)
            .ok_or(StoreError::LeaseNotFound(id))?;
        lease.deadline = now + lease.ttl;
        Ok(lease.ttl)
    }
}

/// The state behind a memory watch stream: the history snapshot, then the live channel.
struct Feed {
    history: std::vec::IntoIter<WatchBatch>,
    rx: mpsc::Receiver<WatchBatch>,
    fell_behind: Arc<AtomicBool>,
    ended: bool,
    prev_values: bool,
}

impl Feed {
    /// The batch as this watch asked for it: previous values only when requested.
    fn shape(&self, mut batch: WatchBatch) -> WatchBatch {
        if !self.prev_values {
            for event in &mut batch.events {
                event.prev = None;
            }
        }
        batch
    }

    async fn next(mut self) -> Option<(Result<WatchBatch, StoreError>, Self)> {
        if self.ended {
            return None;
        }
        if let Some(batch) = self.history.next() {
            let batch = self.shape(batch);
            return Some((Ok(batch), self));
        }
        match self.rx.recv().await {
            Some(batch) => {
                let batch = self.shape(batch);
                Some((Ok(batch), self))
            }
            None => {
                self.ended = true;
                let reason = if self.fell_behind.load(Ordering::Acquire) {
                    "watch fell behind"
                } else {
                    "store closed"
                };
                Some((Err(StoreError::Unavailable(reason.into())), self))
            }
        }
    }
}

#[async_trait]
impl Store for MemoryStore {
    async fn range(&self, request: RangeRequest) -> Result<RangeResponse, StoreError> {
        request.range.validate()?;
        let state = self.lock();
        let revision = state.read_revision(request.revision)?;
        Ok(state.range_at(&request, revision))
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResponse, StoreError> {
        let mut state = self.lock();
        state.expire_due(Instant::now());
        state.txn(txn)
    }

    async fn watch(&self, request: WatchRequest) -> Result<WatchStream, StoreError> {
        self.lock().watch(request)
    }

    async fn watch_with_progress(
        &self,
        request: WatchRequest,
    ) -> Result<(WatchStream, ProgressRequester), StoreError> {
        let mut state = self.lock();
        let stream = state.watch(request)?;
        // The watcher just registered is the last one; its sender feeds the stream. (A
        // watch that failed at once, on a compacted revision, registered none.)
        let tx = state.watchers.last().map(|w| w.tx.clone());
        let inner = Arc::downgrade(&self.inner);
        let requester = ProgressRequester::new(move || {
            let (Some(tx), Some(inner)) = (tx.as_ref(), inner.upgrade()) else {
                return;
            };
            // Sent under the lock, as events are, so the notice follows every event up to
            // the revision it names.
            let state = inner.state.lock().unwrap_or_else(PoisonError::into_inner);
            let _ = tx.try_send(WatchBatch {
                revision: state.revision,
                events: Vec::new(),
            });
        });
        Ok((stream, requester))
    }

    async fn lease_grant(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        let mut state = self.lock();
        let id = state.grant(ttl)?;
        self.start_lease_timer(&mut state);
        // The new lease may fall due before the one the expiry task sleeps for.
        self.inner.lease_timer.notify_one();
        Ok(id)
    }

    async fn lease_keep_alive(&self, lease: LeaseId) -> Result<Duration, StoreError> {
        self.lock().keep_alive(lease)
    }

    async fn lease_revoke(&self, lease: LeaseId) -> Result<(), StoreError> {
        let mut state = self.lock();
        state.expire_due(Instant::now());
        state.revoke(lease)
    }

    async fn compact(&self, revision: Revision) -> Result<(), StoreError> {
        self.lock().compact(revision)
    }

    async fn current_revision(&self) -> Result<Revision, StoreError> {
        Ok(self.lock().revision)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    fn put(key: &str, value: &str) -> TxnOp {
        TxnOp::Put {
            key: key.into(),
            value: value.into(),
            lease: None,
        }
    }

    fn put_leased(key: &str, lease: LeaseId) -> TxnOp {
        TxnOp::Put {
            key: key.into(),
            value: b"x".to_vec(),
            lease: Some(lease),
        }
    }

    async fn write(store: &MemoryStore, ops: Vec<TxnOp>) -> TxnResponse {
        store
            .txn(Txn {
                success: ops,
                ..Txn::default()
            })
            .await
            .expect("txn")
    }

    async fn next_batch(stream: &mut WatchStream) -> WatchBatch {
        stream
            .next()
            .await
            .expect("stream ended")
            .expect("watch error")
    }

    fn watch_all(start: Option<Revision>) -> WatchRequest {
        WatchRequest {
            range: KeyRange::Prefix(String::new()),
            start_revision: start,
            prev_values: true,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn expired_lease_deletes_its_keys_in_one_revision_in_key_order() {
        let store = MemoryStore::new();
        let lease = store.lease_grant(Duration::from_secs(2)).await.unwrap();
        write(
            &store,
            vec![
                put_leased("/b", lease),
                put_leased("/a", lease),
                put("/c", "keep"),
            ],
        )
        .await;
        let mut watch = store.watch(watch_all(None)).await.unwrap();

        tokio::time::sleep(Duration::from_secs(3)).await;

        let batch = next_batch(&mut watch).await;
        assert_eq!(batch.revision, 3);
        let deleted: Vec<_> = batch
            .events
            .iter()
            .map(|e| (e.kind, e.kv.key.as_str()))
            .collect();
        assert_eq!(
            deleted,
            [(EventKind::Delete, "/a"), (EventKind::Delete, "/b")]
        );
        assert!(
            batch
                .events
                .iter()
                .all(|e| e.prev.as_ref().is_some_and(|p| p.lease == Some(lease)))
        );
        assert_eq!(store.get("/a").await.unwrap(), None);
        assert!(store.get("/c").await.unwrap().is_some());
        assert!(matches!(
            store.lease_keep_alive(lease).await,
            Err(StoreError::LeaseNotFound(id)) if id == lease
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn keep_alive_postpones_expiry_by_a_full_ttl() {
        let store = MemoryStore::new();
        let lease = store.lease_grant(Duration::from_secs(2)).await.unwrap();
        write(&store, vec![put_leased("/k", lease)]).await;

        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(
            store.lease_keep_alive(lease).await.unwrap(),
            Duration::from_secs(2)
        );
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert!(
            store.get("/k").await.unwrap().is_some(),
            "expired despite keep-alive"
        );
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(store.get("/k").await.unwrap(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn due_lease_is_gone_even_before_the_expiry_task_runs() {
        let store = MemoryStore::new();
        // Granting through the state directly starts no expiry task.
        let lease = store.lock().grant(Duration::from_secs(2)).unwrap();
        write(&store, vec![put_leased("/k", lease)]).await;
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(
            store.get("/k").await.unwrap().is_some(),
            "nothing expired it yet"
        );
        assert!(matches!(
            store.lease_keep_alive(lease).await,
            Err(StoreError::LeaseNotFound(_))
        ));
        assert_eq!(store.get("/k").await.unwrap(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn ttl_is_whole_seconds_rounded_up_with_etcd_minimum() {
        let store = MemoryStore::new();
        let short = store.lease_grant(Duration::from_millis(300)).await.unwrap();
        assert_eq!(store.lease_keep_alive(short).await.unwrap(), MIN_LEASE_TTL);
        let odd = store
            .lease_grant(Duration::from_millis(2100))
            .await
            .unwrap();
        assert_eq!(
            store.lease_keep_alive(odd).await.unwrap(),
            Duration::from_secs(3)
        );
        assert!(matches!(
            store.lease_grant(Duration::from_secs(10_000_000_000)).await,
            Err(StoreError::InvalidArgument(_))
        ));
    }

    #[tokio::test]
    async fn put_with_unknown_lease_writes_nothing() {
        let store = MemoryStore::new();
        let result = store
            .txn(Txn {
                success: vec![put("/a", "1"), put_leased("/b", 42)],
                ..Txn::default()
            })
            .await;
        assert!(matches!(result, Err(StoreError::LeaseNotFound(42))));
        assert_eq!(store.current_revision().await.unwrap(), 1);
        assert_eq!(store.get("/a").await.unwrap(), None);
    }

    #[tokio::test]
    async fn put_without_lease_detaches_key_from_its_lease() {
        let store = MemoryStore::new();
        let lease = store.lease_grant(Duration::from_secs(60)).await.unwrap();
        write(&store, vec![put_leased("/k", lease)]).await;
        write(&store, vec![put("/k", "free")]).await;
        store.lease_revoke(lease).await.unwrap();
        let kv = store
            .get("/k")
            .await
            .unwrap()
            .expect("key survived its old lease");
        assert_eq!(kv.lease, None);
        // Revoking a lease with no keys writes nothing.
        assert_eq!(store.current_revision().await.unwrap(), 3);
    }

    #[tokio::test]
    async fn slow_watcher_is_cut_off_after_its_buffer() {
        let store = MemoryStore::with_watch_buffer(2);
        let mut watch = store.watch(watch_all(None)).await.unwrap();
        for i in 0..5 {
            write(&store, vec![put("/k", &i.to_string())]).await;
        }
        assert_eq!(next_batch(&mut watch).await.revision, 2);
        assert_eq!(next_batch(&mut watch).await.revision, 3);
        match watch.next().await {
            Some(Err(StoreError::Unavailable(reason))) => assert_eq!(reason, "watch fell behind"),
            other => panic!("expected fell behind, got {other:?}"),
        }
        assert!(watch.next().await.is_none());
        assert!(
            store.lock().watchers.is_empty(),
            "dropped watcher still registered"
        );
    }

    #[tokio::test]
    async fn dropped_watch_streams_are_forgotten() {
        let store = MemoryStore::new();
        drop(store.watch(watch_all(None)).await.unwrap());
        write(&store, vec![put("/k", "v")]).await;
        assert!(store.lock().watchers.is_empty());
    }

    #[tokio::test]
    async fn reads_in_a_txn_see_its_earlier_writes() {
        let store = MemoryStore::new();
        write(&store, vec![put("/k", "old")]).await;
        let response = write(
            &store,
            vec![
                TxnOp::Range(RangeRequest::key("/k")),
                put("/k", "new"),
                TxnOp::Range(RangeRequest::key("/k")),
            ],
        )
        .await;
        let [TxnOpResponse::Range(before), _, TxnOpResponse::Range(after)] =
            response.responses.as_slice()
        else {
            panic!("unexpected responses {:?}", response.responses)
        };
        assert_eq!(
            (before.revision, before.kvs[0].value.as_slice()),
            (2, b"old".as_slice())
        );
        assert_eq!(
            (after.revision, after.kvs[0].value.as_slice()),
            (3, b"new".as_slice())
        );
        assert_eq!(response.revision, 3);
    }

    #[tokio::test]
    async fn malformed_txns_are_rejected_like_etcd_does() {
        let store = MemoryStore::new();
        let cases = [
            vec![put("/a", "1"), put("/a", "2")],
            vec![TxnOp::Delete(KeyRange::Prefix("/".into())), put("/a", "1")],
            vec![put("", "1")],
            vec![TxnOp::Delete(KeyRange::Between {
                start: "/b".into(),
                end: "/a".into(),
            })],
            (0..=MAX_TXN_OPS)
                .map(|i| put(&format!("/k{i}"), "v"))
                .collect(),
        ];
        for ops in cases {
            let result = store
                .txn(Txn {
                    success: ops,
                    ..Txn::default()
                })
                .await;
            assert!(
                matches!(result, Err(StoreError::InvalidArgument(_))),
                "{result:?}"
            );
        }
        // Overlapping deletes are fine: the second finds nothing left to delete.
        write(&store, vec![put("/a", "1")]).await;
        let response = write(
            &store,
            vec![
                TxnOp::Delete(KeyRange::Prefix("/".into())),
                TxnOp::Delete(KeyRange::Key("/a".into())),
            ],
        )
        .await;
        assert_eq!(
            response.responses,
            [
                TxnOpResponse::Delete {
                    deleted: vec![response_kv("/a", "1", 2)]
                },
                TxnOpResponse::Delete { deleted: vec![] }
            ]
        );
    }

    fn response_kv(key: &str, value: &str, revision: Revision) -> KeyValue {
        KeyValue {
            key: key.into(),
            value: value.into(),
            create_revision: revision,
            mod_revision: revision,
            version: 1,
            lease: None,
        }
    }

    #[tokio::test]
    async fn compaction_keeps_values_at_the_compaction_point_and_drops_tombstones() {
        let store = MemoryStore::new();
        write(&store, vec![put("/a", "1")]).await; // 2
        write(&store, vec![put("/a", "2"), put("/b", "1")]).await; // 3
        write(&store, vec![TxnOp::Delete(KeyRange::Key("/b".into()))]).await; // 4
        write(&store, vec![put("/a", "3")]).await; // 5
        store.compact(4).await.unwrap();

        {
            let state = store.lock();
            assert_eq!(state.keys["/a"].len(), 2, "value at 4 and the write at 5");
            assert!(!state.keys.contains_key("/b"), "tombstone at 4 kept");
        }
        let at_four = store.range(RangeRequest {
            revision: Some(4),
            ..RangeRequest::prefix("/")
        });
        let at_four = at_four.await.unwrap();
        assert_eq!(
            at_four
                .kvs
                .iter()
                .map(|kv| kv.key.as_str())
                .collect::<Vec<_>>(),
            ["/a"]
        );
        assert_eq!(at_four.kvs[0].mod_revision, 3);
        assert!(matches!(
            store
                .range(RangeRequest {
                    revision: Some(3),
                    ..RangeRequest::prefix("/")
                })
                .await,
            Err(StoreError::Compacted {
                requested: 3,
                compacted: 4
            })
        ));
        // The put at 5 still carries the value it replaced.
        let mut watch = store.watch(watch_all(Some(5))).await.unwrap();
        let batch = next_batch(&mut watch).await;
        assert_eq!(
            batch.events[0].prev.as_ref().map(|p| p.mod_revision),
            Some(3)
        );
        assert!(matches!(
            store.compact(4).await,
            Err(StoreError::Compacted { .. })
        ));
        assert!(matches!(
            store.compact(6).await,
            Err(StoreError::FutureRevision { .. })
        ));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn watch_started_during_writes_misses_and_repeats_nothing() {
        let store = MemoryStore::new();
        let writer = {
            let store = store.clone();
            tokio::spawn(async move {
                for i in 0..300 {
                    write(&store, vec![put(&format!("/k{}", i % 7), "v")]).await;
                    tokio::task::yield_now().await;
                }
            })
        };
        while store.current_revision().await.unwrap() < 50 {
            tokio::task::yield_now().await;
        }
        let mut watch = store.watch(watch_all(Some(2))).await.unwrap();
        let mut expected = 2;
        while expected <= 301 {
            let batch = next_batch(&mut watch).await;
            for event in batch.events {
                assert_eq!(event.kv.mod_revision, expected);
                expected += 1;
            }
        }
        writer.await.unwrap();
    }

    #[tokio::test]
    async fn watch_for_a_future_revision_waits_for_it() {
        let store = MemoryStore::new();
        let mut watch = store.watch(watch_all(Some(3))).await.unwrap();
        write(&store, vec![put("/a", "1")]).await; // 2
        write(&store, vec![put("/a", "2")]).await; // 3
        assert_eq!(next_batch(&mut watch).await.revision, 3);
    }

    #[tokio::test]
    async fn dropping_the_store_ends_its_watches_with_an_error() {
        let store = MemoryStore::new();
        let mut watch = store.watch(watch_all(None)).await.unwrap();
        drop(store);
        assert!(matches!(
            watch.next().await,
            Some(Err(StoreError::Unavailable(_)))
        ));
        assert!(watch.next().await.is_none());
    }
}
