//! The watch cache: one store watch per kind, fanned out to every watcher, and the
//! current objects of the kind in memory, indexed by project and by node.
//!
//! How it stays right:
//! - **Start and restart.** A kind's cache lists the store at a revision `R`, then watches
//!   from `R + 1`. If that watch fails (etcd restarted, the watch fell behind, history was
//!   compacted) the cache lists again and starts over; every registered watcher is ended
//!   with a distinct error so it resumes from its last revision, which the new window or
//!   the store serves.
//! - **No gap, no duplicate.** Events are applied and handed to watchers under one lock.
//!   A new watcher registers under the same lock after its replay from the window, so
//!   every event after its start revision reaches it exactly once.
//! - **Old revisions.** The window keeps the most recent events. A watch from before the
//!   window is served by a direct store watch instead, which replays history or answers
//!   "expired" when it was compacted — never a silent gap.
//! - **Consistent reads.** A List without a continue token is served from memory only
//!   after the cache proves it has seen every event up to the store's current revision: it
//!   asks the store for a progress notice and waits briefly for it. Without the proof it
//!   falls back to reading the store.
//! - **Slow watchers** have a bounded buffer. One that fills it is cut off with an error
//!   saying where to resume; the others are not held back and memory stays bounded.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, VecDeque},
    sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError},
    time::Duration,
};

use ferro_store::{KeyRange, ProgressRequester, RangeRequest, Revision, Store, WatchRequest};
use futures::StreamExt;
use tokio::sync::{mpsc, watch};
use tonic::Status;

use crate::{
    Error, Kind, Object,
    encoded::EncodedEvent,
    retry::BackoffBuilder,
    selector::{FieldSelector, LabelSelector, SelectableField, node_of},
    v1,
};

/// Tuning of the cache.
#[derive(Clone, Copy, Debug)]
pub struct CacheOptions {
    /// How many recent events each kind keeps for watches that resume.
    pub window_events: usize,
    /// How many events a watcher may have waiting before it is cut off.
    pub watcher_buffer: usize,
    /// How often watchers get a bookmark (and quiet kinds ask the store for progress).
    pub bookmark_interval: Duration,
    /// How long a consistent List waits for the cache to catch up before reading the
    /// store instead.
    pub freshness_wait: Duration,
}

impl Default for CacheOptions {
    fn default() -> Self {
        CacheOptions {
            window_events: 10_000,
            watcher_buffer: 1_000,
            bookmark_interval: Duration::from_secs(5),
            freshness_wait: Duration::from_secs(1),
        }
    }
}

/// The caches of every kind.
pub struct WatchCache {
    store: Arc<dyn Store>,
    options: CacheOptions,
    kinds: Mutex<HashMap<Kind, Arc<KindCache>>>,
}

/// One kind's cache.
struct KindCache {
    kind: Kind,
    options: CacheOptions,
    state: Mutex<State>,
    /// The revision every event up to which has been applied.
    revision: watch::Sender<Revision>,
    progress: Mutex<Option<ProgressRequester>>,
}

#[derive(Default)]
struct State {
    /// Whether the cache holds a listed state and a live watch.
    ready: bool,
    revision: Revision,
    objects: BTreeMap<String, Entry>,
    by_project: HashMap<String, BTreeSet<String>>,
    by_node: HashMap<String, BTreeSet<String>>,
    /// Events with revision greater than `window_start`, oldest first.
    window: VecDeque<Arc<CachedEvent>>,
    window_start: Revision,
    watchers: Vec<Watcher>,
    next_watcher: u64,
}

#[derive(Clone)]
struct Entry {
    object: Arc<Object>,
    bytes: usize,
}

struct CachedEvent {
    revision: Revision,
    before: Option<Arc<Object>>,
    after: Option<Arc<Object>>,
    /// The event as watchers see it — Added, Modified or Deleted — encoded once, on first
    /// use, and shared by every watcher that sees it so.
    encoded: [OnceLock<EncodedEvent>; 3],
}

impl CachedEvent {
    fn new(revision: Revision, before: Option<Arc<Object>>, after: Option<Arc<Object>>) -> Self {
        CachedEvent {
            revision,
            before,
            after,
            encoded: Default::default(),
        }
    }

    /// The event a watcher with this predicate sees: an object that starts matching is
    /// Added, one that stops matching is Deleted.
    fn seen_as(&self, matches: &impl Fn(&Object) -> bool) -> Option<EncodedEvent> {
        use v1::watch_event::Type;
        let was = self.before.as_deref().is_some_and(matches);
        let kind = match &self.after {
            Some(after) => match (was, matches(after)) {
                (true, true) => Type::Modified,
                (false, true) => Type::Added,
                (true, false) => Type::Deleted,
                (false, false) => return None,
            },
            None if was => Type::Deleted,
            None => return None,
        };
        let slot = match kind {
            Type::Added => &self.encoded[0],
            Type::Modified => &self.encoded[1],
            _ => &self.encoded[2],
        };
        Some(
            slot.get_or_init(|| EncodedEvent::new(&self.event(kind)))
                .clone(),
        )
    }

    fn event(&self, kind: v1::watch_event::Type) -> v1::WatchEvent {
        let object = match &self.after {
            Some(after) => Some((**after).clone()),
            None => self.before.as_deref().map(|before| {
                // A deletion shows the last state, at the deleting revision.
                let mut before = before.clone();
                before.metadata_mut().resource_version = self.revision;
                before
            }),
        };
        v1::WatchEvent {
            r#type: kind as i32,
            object: object.map(Into::into),
            resource_version: self.revision,
        }
    }
}

struct Watcher {
    id: u64,
    start: Revision,
    labels: LabelSelector,
    fields: FieldSelector,
    project: Option<String>,
    tx: mpsc::Sender<Result<EncodedEvent, Status>>,
    /// Why the stream ends, when the cache ended it.
    ended: Arc<Mutex<Option<Error>>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Which objects a List or Watch wants.
#[derive(Clone, Debug)]
pub struct Query {
    /// One project, or every project when `None` (and for cluster-scoped kinds).
    pub project: Option<String>,
    /// Label selector.
    pub labels: LabelSelector,
    /// Field selector.
    pub fields: FieldSelector,
}

impl Query {
    fn matches(&self, object: &Object) -> bool {
        self.project
            .as_deref()
            .is_none_or(|p| object.project() == p)
            && self.labels.matches(
                &object
                    .metadata()
                    .map(|m| m.labels.clone())
                    .unwrap_or_default(),
            )
            && self.fields.matches(object)
    }
}

/// A page served from the cache.
pub struct CachedPage {
    /// The objects.
    pub items: Vec<Arc<Object>>,
    /// The key to continue from, at `revision`, when the page is full.
    pub next_key: Option<String>,
    /// The revision of the snapshot the page was taken from.
    pub revision: Revision,
}

impl WatchCache {
    /// A cache over a store; each kind's cache starts on first use.
    pub fn new(store: Arc<dyn Store>, options: CacheOptions) -> Arc<Self> {
        Arc::new(WatchCache {
            store,
            options,
            kinds: Mutex::new(HashMap::new()),
        })
    }

    fn kind(self: &Arc<Self>, kind: Kind) -> Arc<KindCache> {
        let mut kinds = lock(&self.kinds);
        if let Some(cache) = kinds.get(&kind) {
            return cache.clone();
        }
        let cache = Arc::new(KindCache {
            kind,
            options: self.options,
            state: Mutex::new(State::default()),
            revision: watch::channel(0).0,
            progress: Mutex::new(None),
        });
        kinds.insert(kind, cache.clone());
        tokio::spawn(run(self.store.clone(), cache.clone()));
        cache
    }

    /// Serves a consistent List page from memory, or `None` when the cache cannot prove
    /// it is current in time (the caller then reads the store).
    pub async fn list(
        self: &Arc<Self>,
        kind: Kind,
        query: &Query,
        limit: usize,
        max_bytes: usize,
    ) -> Option<CachedPage> {
        let cache = self.kind(kind);
        let target = self.store.current_revision().await.ok()?;
        if !cache.wait_for(target).await {
            return None;
        }
        let state = lock(&cache.state);
        if !state.ready || state.revision < target {
            return None;
        }
        let keys: Box<dyn Iterator<Item = &String>> =
            match (query.fields.required(SelectableField::Node), &query.project) {
                (Some(node), _) => Box::new(state.by_node.get(node).into_iter().flatten()),
                (None, Some(project)) => {
                    Box::new(state.by_project.get(project).into_iter().flatten())
                }
                (None, None) => Box::new(state.objects.keys()),
            };
        let mut items = Vec::new();
        let mut bytes = 0;
        let mut next_key = None;
        for key in keys {
            let Some(entry) = state.objects.get(key) else {
                continue;
            };
            if !query.matches(&entry.object) {
                continue;
            }
            if items.len() >= limit || bytes >= max_bytes {
                next_key = Some(key.clone());
                break;
            }
            bytes += entry.bytes;
            items.push(entry.object.clone());
        }
        // Node-indexed keys are not in store order across projects; a node-selected list
        // is small, so it is returned whole rather than paged through the store.
        if query.fields.required(SelectableField::Node).is_some() {
            next_key = None;
        }
        Some(CachedPage {
            items,
            next_key,
            revision: state.revision,
        })
    }

    /// Starts a watch from `after` (0: from now). `None` when the cache is not ready or
    /// `after` is older than the window: the caller watches the store directly.
    pub fn watch(
        self: &Arc<Self>,
        kind: Kind,
        query: Query,
        after: Revision,
    ) -> Option<CacheWatch> {
        let cache = self.kind(kind);
        let mut state = lock(&cache.state);
        if !state.ready {
            return None;
        }
        let start = if after > 0 { after } else { state.revision };
        if start < state.window_start {
            return None;
        }
        let replay: Vec<EncodedEvent> = state
            .window
            .iter()
            .filter(|e| e.revision > start)
            .filter_map(|e| e.seen_as(&|o: &Object| query.matches(o)))
            .collect();
        let (tx, rx) = mpsc::channel(replay.len() + cache.options.watcher_buffer);
        for event in replay {
            let _ = tx.try_send(Ok(event));
        }
        let id = state.next_watcher;
        state.next_watcher += 1;
        let ended = Arc::new(Mutex::new(None));
        state.watchers.push(Watcher {
            id,
            start,
            labels: query.labels,
            fields: query.fields,
            project: query.project,
            tx,
            ended: ended.clone(),
        });
        Some(CacheWatch { rx, ended })
    }

    /// The cached copy of the object at `key`, which may be behind the store; `None` when
    /// the cache is not ready or does not hold it.
    pub fn get(self: &Arc<Self>, kind: Kind, key: &str) -> Option<Arc<Object>> {
        let cache = self.kind(kind);
        let state = lock(&cache.state);
        if !state.ready {
            return None;
        }
        state.objects.get(key).map(|e| e.object.clone())
    }

    /// Starts every kind's cache now rather than on first use.
    pub fn warm(self: &Arc<Self>) {
        for kind in Kind::ALL {
            self.kind(*kind);
        }
    }

    /// How many watchers a kind's cache feeds (for metrics and tests).
    pub fn watcher_count(self: &Arc<Self>, kind: Kind) -> usize {
        lock(&self.kind(kind).state).watchers.len()
    }
}

impl KindCache {
    /// Waits until the cache has applied every event up to `target`, asking the store for
    /// a progress notice; false after the freshness wait.
    async fn wait_for(&self, target: Revision) -> bool {
        let mut revision = self.revision.subscribe();
        if *revision.borrow() >= target {
            return true;
        }
        if let Some(progress) = lock(&self.progress).as_ref() {
            progress.request();
        }
        tokio::time::timeout(
            self.options.freshness_wait,
            revision.wait_for(|r| *r >= target),
        )
        .await
        .is_ok_and(|r| r.is_ok())
    }

    fn apply(
        &self,
        state: &mut State,
        revision: Revision,
        before: Option<Arc<Object>>,
        after: Option<Arc<Object>>,
        key: &str,
    ) {
        if let Some(old) = state.objects.remove(key) {
            unindex(state, key, &old.object);
        }
        if let Some(object) = &after {
            let entry = Entry {
                object: object.clone(),
                bytes: object.encoded_len(),
            };
            index(state, key, object);
            state.objects.insert(key.to_owned(), entry);
        }
        let event = Arc::new(CachedEvent::new(revision, before, after));
        state.watchers.retain(|w| deliver(w, &event));
        state.window.push_back(event);
        while state.window.len() > self.options.window_events {
            if let Some(old) = state.window.pop_front() {
                state.window_start = old.revision;
            }
        }
    }

    fn advance(&self, state: &mut State, revision: Revision) {
        if revision > state.revision {
            state.revision = revision;
            self.revision.send_replace(revision);
        }
    }

    /// Ends every watcher with `error`, as after a restart of the cache's watch.
    fn end_watchers(&self, state: &mut State, error: &Error) {
        for watcher in state.watchers.drain(..) {
            *lock(&watcher.ended) = Some(error.clone());
            let _ = watcher.tx.try_send(Err(Status::from(error.clone())));
        }
    }

    fn bookmark(&self) {
        let mut state = lock(&self.state);
        let bookmark = EncodedEvent::new(&v1::WatchEvent {
            r#type: v1::watch_event::Type::Bookmark as i32,
            object: None,
            resource_version: state.revision,
        });
        state.watchers.retain(|w| {
            // A full buffer skips the bookmark; the watcher has events to read anyway.
            !matches!(
                w.tx.try_send(Ok(bookmark.clone())),
                Err(mpsc::error::TrySendError::Closed(_))
            )
        });
    }
}

fn index(state: &mut State, key: &str, object: &Object) {
    state
        .by_project
        .entry(object.project().to_owned())
        .or_default()
        .insert(key.to_owned());
    if let Some(node) = node_of(object).filter(|n| !n.is_empty()) {
        state
            .by_node
            .entry(node)
            .or_default()
            .insert(key.to_owned());
    }
}

fn unindex(state: &mut State, key: &str, object: &Object) {
    if let Some(keys) = state.by_project.get_mut(object.project()) {
        keys.remove(key);
        if keys.is_empty() {
            state.by_project.remove(object.project());
        }
    }
    if let Some(node) = node_of(object)
        && let Some(keys) = state.by_node.get_mut(&node)
    {
        keys.remove(key);
        if keys.is_empty() {
            state.by_node.remove(&node);
        }
    }
}

/// Hands an event to a watcher; false when the watcher is gone or cut off.
fn deliver(watcher: &Watcher, event: &CachedEvent) -> bool {
    if event.revision <= watcher.start {
        return true;
    }
    // Node-selected watchers only care about objects on their node: a cheap check first.
    if let Some(node) = watcher.fields.required(SelectableField::Node) {
        let on = |o: &Option<Arc<Object>>| {
            o.as_ref()
                .and_then(|o| node_of(o))
                .is_some_and(|n| n == node)
        };
        if !on(&event.before) && !on(&event.after) {
            return true;
        }
    }
    let matches = |o: &Object| {
        watcher.project.as_deref().is_none_or(|p| o.project() == p)
            && o.metadata()
                .is_none_or(|m| watcher.labels.matches(&m.labels))
            && watcher.fields.matches(o)
    };
    let Some(out) = event.seen_as(&matches) else {
        return true;
    };
    match watcher.tx.try_send(Ok(out)) {
        Ok(()) => true,
        Err(mpsc::error::TrySendError::Closed(_)) => false,
        Err(mpsc::error::TrySendError::Full(_)) => {
            *lock(&watcher.ended) = Some(Error::Unavailable {
                message: format!(
                    "watch fell behind (more than its buffer of events waiting); watch again from the last resourceVersion received (id {})",
                    watcher.id
                ),
            });
            false
        }
    }
}

/// Keeps one kind's cache filled: list, watch, apply, and start over on failure.
async fn run(store: Arc<dyn Store>, cache: Arc<KindCache>) {
    let prefix = cache.kind.prefix(None);
    let mut backoff = crate::retry::restart_watch().build();
    let mut ticker = tokio::time::interval(cache.options.bookmark_interval);
    loop {
        match fill(&store, &cache, &prefix).await {
            Ok(mut events) => {
                backoff = crate::retry::restart_watch().build();
                let failure = loop {
                    tokio::select! {
                        batch = events.next() => match batch {
                            Some(Ok(batch)) => {
                                if let Err(e) = apply_batch(&cache, batch) {
                                    break e;
                                }
                            }
                            Some(Err(e)) => break crate::server::store_error(e),
                            None => break Error::Unavailable { message: "the store ended the watch".into() },
                        },
                        _ = ticker.tick() => {
                            cache.bookmark();
                            // A quiet kind's revision advances only through progress notices.
                            if let Some(progress) = lock(&cache.progress).as_ref() {
                                progress.request();
                            }
                        }
                    }
                };
                tracing::warn!(kind = %cache.kind, error = %failure, "watch cache restarts");
                let mut state = lock(&cache.state);
                state.ready = false;
                cache.end_watchers(
                    &mut state,
                    &Error::Unavailable { message: format!("the apiserver's watch of {} restarted; watch again from the last resourceVersion received", cache.kind.plural()) },
                );
            }
            Err(e) => {
                tracing::warn!(kind = %cache.kind, error = %e, "watch cache cannot list");
            }
        }
        let delay = backoff.next().unwrap_or(Duration::from_secs(5));
        tokio::time::sleep(delay).await;
    }
}

/// Lists the kind into the cache and starts the store watch after the list's revision.
async fn fill(
    store: &Arc<dyn Store>,
    cache: &KindCache,
    prefix: &str,
) -> Result<ferro_store::WatchStream, Error> {
    let mut objects = BTreeMap::new();
    let mut revision = None;
    let mut start = prefix.to_owned();
    loop {
        let page = store
            .range(RangeRequest {
                range: KeyRange::Between {
                    start: start.clone(),
                    end: crate::server::prefix_end(prefix),
                },
                revision,
                limit: 1000,
                keys_only: false,
            })
            .await
            .map_err(crate::server::store_error)?;
        revision = Some(page.revision);
        for kv in &page.kvs {
            let object = crate::server::decode_kv(cache.kind, kv)?;
            objects.insert(
                kv.key.clone(),
                Entry {
                    object: Arc::new(object),
                    bytes: kv.value.len(),
                },
            );
        }
        match page.kvs.last() {
            Some(last) if page.more => start = format!("{}\0", last.key),
            _ => break,
        }
    }
    let revision = revision.unwrap_or_default();
    let (events, progress) = store
        .watch_with_progress(WatchRequest {
            range: KeyRange::Prefix(prefix.to_owned()),
            start_revision: Some(revision + 1),
            // The cache holds every object, so it knows each event's previous value itself
            // and spares etcd a read per event.
            prev_values: false,
        })
        .await
        .map_err(crate::server::store_error)?;
    *lock(&cache.progress) = Some(progress);
    let mut state = lock(&cache.state);
    let watchers = std::mem::take(&mut state.watchers);
    let next_watcher = state.next_watcher;
    *state = State {
        ready: true,
        window_start: revision,
        watchers,
        next_watcher,
        ..State::default()
    };
    for (key, entry) in objects {
        index(&mut state, &key, &entry.object);
        state.objects.insert(key, entry);
    }
    cache.advance(&mut state, revision);
    Ok(events)
}

fn apply_batch(cache: &KindCache, batch: ferro_store::WatchBatch) -> Result<(), Error> {
    let mut state = lock(&cache.state);
    if batch.events.is_empty() {
        // A progress notice: everything up to its revision has been delivered.
        cache.advance(&mut state, batch.revision);
        return Ok(());
    }
    for event in &batch.events {
        let revision = event.kv.mod_revision;
        let before = state.objects.get(&event.kv.key).map(|e| e.object.clone());
        let after = match event.kind {
            ferro_store::EventKind::Put => {
                Some(Arc::new(crate::server::decode_kv(cache.kind, &event.kv)?))
            }
            ferro_store::EventKind::Delete => None,
        };
        cache.apply(&mut state, revision, before, after, &event.kv.key);
        cache.advance(&mut state, revision);
    }
    Ok(())
}

/// A watch served by the cache.
pub struct CacheWatch {
    rx: mpsc::Receiver<Result<EncodedEvent, Status>>,
    ended: Arc<Mutex<Option<Error>>>,
}

impl CacheWatch {
    /// The watch as a stream. It ends after the first error; when the cache cut the
    /// watcher off, the last item says why and where to resume.
    pub fn into_stream(
        self,
    ) -> impl futures::Stream<Item = Result<EncodedEvent, Status>> + Send + 'static {
        futures::stream::unfold(Some(self), |watch| async move {
            let mut watch = watch?;
            match watch.rx.recv().await {
                Some(Ok(event)) => Some((Ok(event), Some(watch))),
                Some(Err(status)) => Some((Err(status), None)),
                None => lock(&watch.ended)
                    .take()
                    .map(|e| (Err(Status::from(e)), None)),
            }
        })
    }
}
