//! Reflectors: one cache per kind, filled by List and kept current by Watch.
//!
//! A [`Store`] holds the only copy of each object (behind an `Arc`) that a controller
//! process keeps; every controller of the process shares it through [`Caches`]. The node
//! agent keeps one store of its own, of the Servers bound to its node, through a
//! [`Reflector`] with a field selection. Objects only move forward: a copy older than the
//! cached one is ignored, so a reconciler may store what its own write returned. The
//! reflector loop lists the kind, then watches from the list's revision, resuming from the
//! last revision it saw (events and bookmarks) after a broken stream, and relisting only
//! when the server answers that the revision has expired. A relist is diffed against the
//! cache, so listeners see exactly the objects that appeared, changed or vanished meanwhile.
//!
//! Listeners are plain callbacks run on the reflector task right after each change: they
//! must be quick (map to keys and push into a queue, update an allocation hint). Indices
//! are maintained on every change, so `by_index` is a lookup, not a scan.

use std::{
    any::Any,
    collections::{BTreeSet, HashMap},
    sync::{Arc, Mutex, RwLock},
    time::Duration,
};

use ferro_api::{
    Error, Kind, Object, Resource,
    client::{Client, Selection},
    retry::{self, BackoffBuilder},
    v1::{self, watch_event::Type},
};
use futures::StreamExt;
use tokio::{sync::watch, task::JoinSet};

use super::{ObjectRef, meta, metrics::Metrics};

/// The index every store keeps: the uids of an object's owners.
pub const OWNER_UID: &str = "owner-uid";
/// The index every store keeps: the object's own uid.
pub const UID: &str = "uid";

/// One change of a cached object.
pub struct Change<T> {
    /// The object's key.
    pub key: ObjectRef,
    /// The object before the change; `None` when it just appeared.
    pub old: Option<Arc<T>>,
    /// The object after the change; `None` when it is gone.
    pub new: Option<Arc<T>>,
}

type IndexFn<T> = Arc<dyn Fn(&T) -> Vec<String> + Send + Sync>;
type Listener<T> = Arc<dyn Fn(&Change<T>) + Send + Sync>;

struct State<T> {
    objects: HashMap<ObjectRef, Arc<T>>,
    indexers: Vec<(&'static str, IndexFn<T>)>,
    indices: HashMap<&'static str, HashMap<String, BTreeSet<ObjectRef>>>,
    listeners: Vec<Listener<T>>,
    resource_version: i64,
}

/// The cache of one kind. Cheap to clone; clones share the cache.
pub struct Store<T> {
    state: Arc<RwLock<State<T>>>,
    synced: Arc<watch::Sender<bool>>,
}

impl<T> Clone for Store<T> {
    fn clone(&self) -> Self {
        Store {
            state: self.state.clone(),
            synced: self.synced.clone(),
        }
    }
}

impl<T: Resource + Send + Sync> Default for Store<T> {
    fn default() -> Self {
        Self::new()
    }
}

fn index_values<T>(
    indexers: &[(&'static str, IndexFn<T>)],
    object: &T,
) -> Vec<(&'static str, Vec<String>)> {
    indexers
        .iter()
        .map(|(name, f)| (*name, f(object)))
        .collect()
}

impl<T: Resource + Send + Sync> Store<T> {
    /// An empty, unsynced store with the owner-uid and uid indices.
    pub fn new() -> Self {
        let store = Store {
            state: Arc::new(RwLock::new(State {
                objects: HashMap::new(),
                indexers: Vec::new(),
                indices: HashMap::new(),
                listeners: Vec::new(),
                resource_version: 0,
            })),
            synced: Arc::new(watch::channel(false).0),
        };
        store.add_index(OWNER_UID, |o: &T| {
            meta(o)
                .owner_references
                .iter()
                .map(|r| r.uid.clone())
                .collect()
        });
        store.add_index(UID, |o: &T| vec![meta(o).uid.clone()]);
        store
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State<T>> {
        // A listener that panicked poisons nothing we rely on: the maps stay consistent.
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State<T>> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }

    /// The cached object with this key.
    pub fn get(&self, key: &ObjectRef) -> Option<Arc<T>> {
        self.read().objects.get(key).cloned()
    }

    /// The cached object with this project and name.
    pub fn get_named(&self, project: &str, name: &str) -> Option<Arc<T>> {
        self.get(&ObjectRef::new(T::KIND, project, name))
    }

    /// Every cached object.
    pub fn list(&self) -> Vec<Arc<T>> {
        self.read().objects.values().cloned().collect()
    }

    /// The keys of every cached object.
    pub fn keys(&self) -> Vec<ObjectRef> {
        self.read().objects.keys().cloned().collect()
    }

    /// How many objects are cached.
    pub fn len(&self) -> usize {
        self.read().objects.len()
    }

    /// Whether the cache is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The revision the cache is current to.
    pub fn resource_version(&self) -> i64 {
        self.read().resource_version
    }

    /// Adds (or replaces) an index: `f` gives the values an object is found under.
    pub fn add_index(
        &self,
        name: &'static str,
        f: impl Fn(&T) -> Vec<String> + Send + Sync + 'static,
    ) {
        let mut state = self.write();
        let f: IndexFn<T> = Arc::new(f);
        state.indexers.retain(|(n, _)| *n != name);
        state.indexers.push((name, f.clone()));
        let mut index: HashMap<String, BTreeSet<ObjectRef>> = HashMap::new();
        for (key, object) in &state.objects {
            for value in f(object) {
                index.entry(value).or_default().insert(key.clone());
            }
        }
        state.indices.insert(name, index);
    }

    /// The objects found under `value` in the index `name`.
    pub fn by_index(&self, name: &str, value: &str) -> Vec<Arc<T>> {
        let state = self.read();
        let Some(keys) = state.indices.get(name).and_then(|i| i.get(value)) else {
            return Vec::new();
        };
        keys.iter()
            .filter_map(|k| state.objects.get(k).cloned())
            .collect()
    }

    /// Calls `f` after every change, on the reflector's task. `f` must be quick.
    pub fn listen(&self, f: impl Fn(&Change<T>) + Send + Sync + 'static) {
        self.write().listeners.push(Arc::new(f));
    }

    /// Whether the first List has been loaded.
    pub fn is_synced(&self) -> bool {
        *self.synced.borrow()
    }

    /// Waits until the first List has been loaded.
    pub async fn wait_synced(&self) {
        let mut rx = self.synced.subscribe();
        // The sender lives as long as the store, and `self` holds the store.
        let _ = rx.wait_for(|synced| *synced).await;
    }

    /// Inserts or replaces an object, as a watch event does. Objects only move forward:
    /// one older than the cached copy (a late watch event after a reconciler stored what
    /// its own write returned) changes nothing.
    pub fn apply(&self, object: T) {
        let key = ObjectRef::of(&object);
        let new = Arc::new(object);
        let (change, listeners) = {
            let mut state = self.write();
            let rv = meta(new.as_ref()).resource_version;
            if state
                .objects
                .get(&key)
                .is_some_and(|cached| meta(cached.as_ref()).resource_version > rv)
            {
                return;
            }
            state.resource_version = state.resource_version.max(rv);
            let old = state.objects.insert(key.clone(), new.clone());
            reindex(&mut state, &key, old.as_deref(), Some(new.as_ref()));
            (
                Change {
                    key,
                    old,
                    new: Some(new),
                },
                state.listeners.clone(),
            )
        };
        notify(&listeners, &change);
    }

    /// Removes an object, as a watch event does.
    pub fn remove(&self, key: &ObjectRef, resource_version: i64) {
        let (change, listeners) = {
            let mut state = self.write();
            state.resource_version = state.resource_version.max(resource_version);
            let Some(old) = state.objects.remove(key) else {
                return;
            };
            reindex(&mut state, key, Some(old.as_ref()), None);
            (
                Change {
                    key: key.clone(),
                    old: Some(old),
                    new: None,
                },
                state.listeners.clone(),
            )
        };
        notify(&listeners, &change);
    }

    /// Replaces the whole cache with a List's result, telling listeners what changed:
    /// what appeared, what changed and — so that a watch that was down loses nothing —
    /// what vanished meanwhile.
    pub fn replace(&self, objects: Vec<T>, resource_version: i64) {
        let mut fresh: HashMap<ObjectRef, T> = objects
            .into_iter()
            .map(|o| (ObjectRef::of(&o), o))
            .collect();
        let (changes, listeners) = {
            let mut state = self.write();
            state.resource_version = resource_version;
            let mut changes = Vec::new();
            let gone: Vec<ObjectRef> = state
                .objects
                .keys()
                .filter(|k| !fresh.contains_key(*k))
                .cloned()
                .collect();
            for key in gone {
                let old = state.objects.remove(&key).expect("listed from the map");
                reindex(&mut state, &key, Some(old.as_ref()), None);
                changes.push(Change {
                    key,
                    old: Some(old),
                    new: None,
                });
            }
            for (key, object) in fresh.drain() {
                let old = state.objects.get(&key).cloned();
                // A newer copy stored since the List was served is kept.
                if old.as_deref().is_some_and(|cached| {
                    cached == &object
                        || meta(cached).resource_version > meta(&object).resource_version
                }) {
                    continue;
                }
                let new = Arc::new(object);
                state.objects.insert(key.clone(), new.clone());
                reindex(&mut state, &key, old.as_deref(), Some(new.as_ref()));
                changes.push(Change {
                    key,
                    old,
                    new: Some(new),
                });
            }
            (changes, state.listeners.clone())
        };
        for change in &changes {
            notify(&listeners, change);
        }
        self.synced.send_replace(true);
    }
}

fn reindex<T>(state: &mut State<T>, key: &ObjectRef, old: Option<&T>, new: Option<&T>) {
    let before = old
        .map(|o| index_values(&state.indexers, o))
        .unwrap_or_default();
    let after = new
        .map(|o| index_values(&state.indexers, o))
        .unwrap_or_default();
    for (name, values) in before {
        if let Some(index) = state.indices.get_mut(name) {
            for value in values {
                if let Some(set) = index.get_mut(&value) {
                    set.remove(key);
                    if set.is_empty() {
                        index.remove(&value);
                    }
                }
            }
        }
    }
    for (name, values) in after {
        let index = state.indices.entry(name).or_default();
        for value in values {
            index.entry(value).or_default().insert(key.clone());
        }
    }
}

fn notify<T>(listeners: &[Listener<T>], change: &Change<T>) {
    for listener in listeners {
        listener(change);
    }
}

/// A change seen through metadata only, for kind-agnostic listeners such as the GC.
pub struct MetaChange<'a> {
    /// The object's key.
    pub key: &'a ObjectRef,
    /// The metadata before the change.
    pub old: Option<&'a v1::ObjectMeta>,
    /// The metadata after the change; `None` when the object is gone.
    pub new: Option<&'a v1::ObjectMeta>,
}

/// A store seen through object metadata, whatever its kind.
pub trait AnyStore: Send + Sync {
    /// The kind cached.
    fn kind(&self) -> Kind;
    /// The metadata of the object with this key.
    fn meta_of(&self, key: &ObjectRef) -> Option<v1::ObjectMeta>;
    /// The keys and metadata of the objects that name `owner_uid` among their owners.
    fn dependents_of(&self, owner_uid: &str) -> Vec<(ObjectRef, v1::ObjectMeta)>;
    /// The keys and metadata of every cached object.
    fn all_meta(&self) -> Vec<(ObjectRef, v1::ObjectMeta)>;
    /// Calls `f` after every change.
    fn listen_meta(&self, f: Arc<dyn Fn(MetaChange<'_>) + Send + Sync>);
    /// Whether the first List has been loaded.
    fn synced(&self) -> bool;
    /// Waits until the first List has been loaded.
    fn wait_synced(&self) -> futures::future::BoxFuture<'static, ()>;
    /// How many objects are cached.
    fn size(&self) -> usize;
}

impl<T: Resource + Send + Sync> AnyStore for Store<T> {
    fn kind(&self) -> Kind {
        T::KIND
    }
    fn meta_of(&self, key: &ObjectRef) -> Option<v1::ObjectMeta> {
        self.get(key).map(|o| meta(o.as_ref()).clone())
    }
    fn dependents_of(&self, owner_uid: &str) -> Vec<(ObjectRef, v1::ObjectMeta)> {
        self.by_index(OWNER_UID, owner_uid)
            .iter()
            .map(|o| (ObjectRef::of(o.as_ref()), meta(o.as_ref()).clone()))
            .collect()
    }
    fn all_meta(&self) -> Vec<(ObjectRef, v1::ObjectMeta)> {
        self.list()
            .iter()
            .map(|o| (ObjectRef::of(o.as_ref()), meta(o.as_ref()).clone()))
            .collect()
    }
    fn listen_meta(&self, f: Arc<dyn Fn(MetaChange<'_>) + Send + Sync>) {
        self.listen(move |c: &Change<T>| {
            f(MetaChange {
                key: &c.key,
                old: c.old.as_deref().map(|o| meta(o)),
                new: c.new.as_deref().map(|o| meta(o)),
            })
        });
    }
    fn synced(&self) -> bool {
        self.is_synced()
    }
    fn wait_synced(&self) -> futures::future::BoxFuture<'static, ()> {
        let store = self.clone();
        Box::pin(async move { store.wait_synced().await })
    }
    fn size(&self) -> usize {
        self.len()
    }
}

/// Fills a store from List + Watch until dropped.
pub struct Reflector<T> {
    client: Client,
    store: Store<T>,
    selection: Selection,
    metrics: Option<Metrics>,
}

impl<T: Resource + Send + Sync> Reflector<T> {
    /// A reflector of every object of `T`'s kind into `store`.
    pub fn new(client: Client, store: Store<T>) -> Self {
        Reflector {
            client,
            store,
            selection: Selection::all(),
            metrics: None,
        }
    }

    /// Restricts the reflector to a selection.
    pub fn with_selection(mut self, selection: Selection) -> Self {
        self.selection = selection;
        self
    }

    /// Counts relists and restarts in `metrics`.
    pub fn with_metrics(mut self, metrics: Metrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    fn count(&self, what: &str) {
        if let Some(m) = &self.metrics {
            m.inc_counter(
                "ferro_reflector_restarts_total",
                "List or Watch restarts of a reflector, by kind and cause.",
                &[("kind", T::KIND.name()), ("cause", what)],
            );
        }
    }

    /// Runs forever: List, then Watch from the last revision seen; relist after `Expired`.
    pub async fn run(self) {
        let kind = T::KIND;
        let mut revision = 0i64;
        let mut must_list = true;
        // Pauses between failed attempts, from Ferro's one policy; a success starts over.
        let mut delays = retry::restart_watch().build();
        let pause = |delays: &mut retry::Backoff| {
            tokio::time::sleep(delays.next().unwrap_or(Duration::from_secs(5)))
        };
        loop {
            if must_list {
                match self.client.list(kind, &self.selection).await {
                    Ok((items, rv)) => {
                        let typed = items.into_iter().filter_map(T::from_object).collect();
                        self.store.replace(typed, rv);
                        revision = rv;
                        must_list = false;
                        delays = retry::restart_watch().build();
                        tracing::debug!(kind = %kind, revision, "listed");
                    }
                    Err(e) => {
                        tracing::warn!(kind = %kind, error = %e, "list failed; retrying");
                        self.count("list-error");
                        pause(&mut delays).await;
                        continue;
                    }
                }
            }
            let stream = match self.client.watch(kind, &self.selection, revision).await {
                Ok(stream) => stream,
                Err(Error::Expired { .. }) => {
                    self.count("expired");
                    must_list = true;
                    continue;
                }
                Err(e) => {
                    tracing::warn!(kind = %kind, error = %e, "watch failed; retrying");
                    self.count("watch-error");
                    pause(&mut delays).await;
                    continue;
                }
            };
            let mut stream = std::pin::pin!(stream);
            while let Some(item) = stream.next().await {
                match item {
                    Ok(event) => {
                        delays = retry::restart_watch().build();
                        revision = revision.max(event.resource_version);
                        self.handle(event);
                    }
                    Err(Error::Expired { .. }) => {
                        self.count("expired");
                        must_list = true;
                        break;
                    }
                    Err(e) => {
                        // A broken stream loses nothing: the next watch resumes after the
                        // last revision handled.
                        tracing::debug!(kind = %kind, error = %e, revision, "watch ended; resuming");
                        self.count("watch-ended");
                        break;
                    }
                }
            }
            pause(&mut delays).await;
        }
    }

    fn handle(&self, event: v1::WatchEvent) {
        let kind = Type::try_from(event.r#type).unwrap_or(Type::Unspecified);
        let object = event
            .object
            .and_then(|o| Object::try_from(o).ok())
            .and_then(T::from_object);
        match (kind, object) {
            (Type::Added | Type::Modified, Some(object)) => self.store.apply(object),
            (Type::Deleted, Some(object)) => self
                .store
                .remove(&ObjectRef::of(&object), event.resource_version),
            _ => {}
        }
    }
}

/// A store, typed (for `downcast`) and seen through metadata.
type StoreEntry = (Box<dyn Any + Send + Sync>, Arc<dyn AnyStore>);

type Starter = Box<dyn FnOnce(&Client, &Metrics, &mut JoinSet<()>) + Send>;

/// The stores of one controller process, one per kind, shared by all its controllers.
pub struct Caches {
    client: Client,
    metrics: Metrics,
    stores: Mutex<HashMap<Kind, StoreEntry>>,
    starters: Mutex<Vec<Starter>>,
}

impl Caches {
    /// No stores yet; they are created on first request.
    pub fn new(client: Client, metrics: Metrics) -> Self {
        Caches {
            client,
            metrics,
            stores: Mutex::new(HashMap::new()),
            starters: Mutex::new(Vec::new()),
        }
    }

    /// The store of `T`'s kind, created (and scheduled to start) on first request.
    pub fn store<T: Resource + Send + Sync>(&self) -> Store<T> {
        let mut stores = self.stores.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((any, _)) = stores.get(&T::KIND) {
            return any
                .downcast_ref::<Store<T>>()
                .expect("one store type per kind")
                .clone();
        }
        let store = Store::<T>::new();
        stores.insert(T::KIND, (Box::new(store.clone()), Arc::new(store.clone())));
        let for_reflector = store.clone();
        self.starters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Box::new(move |client, metrics, tasks| {
                let reflector =
                    Reflector::new(client.clone(), for_reflector).with_metrics(metrics.clone());
                tasks.spawn(reflector.run());
            }));
        let gauge_store = store.clone();
        self.metrics.gauge_fn(
            "ferro_cache_objects",
            "Objects held in a controller cache, by kind.",
            &[("kind", T::KIND.name())],
            move || gauge_store.len() as f64,
        );
        store
    }

    /// The store of a kind, seen through metadata; `None` until someone asked for it typed.
    pub fn any_store(&self, kind: Kind) -> Option<Arc<dyn AnyStore>> {
        self.stores
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&kind)
            .map(|(_, any)| any.clone())
    }

    /// Every store created so far.
    pub fn all_stores(&self) -> Vec<Arc<dyn AnyStore>> {
        self.stores
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .map(|(_, any)| any.clone())
            .collect()
    }

    /// Starts the reflectors of the stores created since the last call.
    pub fn start(&self, tasks: &mut JoinSet<()>) {
        let starters: Vec<Starter> =
            std::mem::take(&mut *self.starters.lock().unwrap_or_else(|e| e.into_inner()));
        for start in starters {
            start(&self.client, &self.metrics, tasks);
        }
    }

    /// Waits until every store created so far has loaded its first List.
    pub async fn wait_synced(&self) {
        for store in self.all_stores() {
            store.wait_synced().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn port(name: &str, uid: &str, owner: Option<&str>) -> v1::Port {
        v1::Port {
            metadata: Some(v1::ObjectMeta {
                name: name.into(),
                project: "default".into(),
                uid: uid.into(),
                owner_references: owner
                    .map(|o| {
                        vec![v1::OwnerReference {
                            kind: "Server".into(),
                            name: "s".into(),
                            uid: o.into(),
                            ..Default::default()
                        }]
                    })
                    .unwrap_or_default(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn indices_follow_changes() {
        let store = Store::<v1::Port>::new();
        store.apply(port("a", "u1", Some("o1")));
        store.apply(port("b", "u2", Some("o1")));
        assert_eq!(store.by_index(OWNER_UID, "o1").len(), 2);
        store.apply(port("b", "u2", Some("o2")));
        assert_eq!(store.by_index(OWNER_UID, "o1").len(), 1);
        assert_eq!(store.by_index(OWNER_UID, "o2").len(), 1);
        store.remove(&ObjectRef::new(Kind::Port, "default", "a"), 9);
        assert!(store.by_index(OWNER_UID, "o1").is_empty());
        assert_eq!(store.by_index(UID, "u2").len(), 1);
        assert_eq!(store.resource_version(), 9);
    }

    #[test]
    fn a_relist_reports_only_differences() {
        let store = Store::<v1::Port>::new();
        let changes = Arc::new(Mutex::new(Vec::new()));
        let seen = changes.clone();
        store.listen(move |c: &Change<v1::Port>| {
            seen.lock()
                .unwrap()
                .push((c.key.name.clone(), c.old.is_some(), c.new.is_some()));
        });
        store.replace(vec![port("a", "u1", None), port("b", "u2", None)], 5);
        assert!(store.is_synced());
        changes.lock().unwrap().clear();
        // b unchanged, a gone, c new.
        store.replace(vec![port("b", "u2", None), port("c", "u3", None)], 9);
        let mut got = changes.lock().unwrap().clone();
        got.sort();
        assert_eq!(
            got,
            vec![
                ("a".to_string(), true, false),
                ("c".to_string(), false, true)
            ]
        );
        assert_eq!(store.len(), 2);
    }

    #[test]
    fn an_index_added_late_covers_existing_objects() {
        let store = Store::<v1::Port>::new();
        store.apply(port("a", "u1", None));
        store.add_index("name", |p: &v1::Port| vec![meta(p).name.clone()]);
        assert_eq!(store.by_index("name", "a").len(), 1);
        let calls = Arc::new(AtomicUsize::new(0));
        let c = calls.clone();
        store.listen(move |_: &Change<v1::Port>| {
            c.fetch_add(1, Ordering::SeqCst);
        });
        store.remove(&ObjectRef::new(Kind::Port, "default", "missing"), 3);
        assert_eq!(
            calls.load(Ordering::SeqCst),
            0,
            "removing nothing is no change"
        );
    }

    fn versioned(name: &str, uid: &str, rv: i64) -> v1::Port {
        let mut p = port(name, uid, None);
        p.metadata.as_mut().unwrap().resource_version = rv;
        p
    }

    #[test]
    fn objects_only_move_forward() {
        let store = Store::<v1::Port>::new();
        let calls = Arc::new(AtomicUsize::new(0));
        let c = calls.clone();
        store.listen(move |_: &Change<v1::Port>| {
            c.fetch_add(1, Ordering::SeqCst);
        });
        store.apply(versioned("a", "u1", 5));
        // A late watch event, older than what a reconciler stored after its write.
        store.apply(versioned("a", "u1", 4));
        let key = ObjectRef::new(Kind::Port, "default", "a");
        assert_eq!(meta(store.get(&key).unwrap().as_ref()).resource_version, 5);
        assert_eq!(
            calls.load(Ordering::SeqCst),
            1,
            "the stale copy is no change"
        );
        // A List served before that write keeps the newer copy too.
        store.replace(vec![versioned("a", "u1", 3)], 4);
        assert_eq!(meta(store.get(&key).unwrap().as_ref()).resource_version, 5);
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_relist_reports_objects_that_vanished_to_listeners() {
        let store = Store::<v1::Port>::new();
        store.replace(vec![port("a", "u1", None), port("b", "u2", None)], 5);
        let gone = Arc::new(Mutex::new(Vec::new()));
        let seen = gone.clone();
        store.listen(move |c: &Change<v1::Port>| {
            if let (Some(old), None) = (&c.old, &c.new) {
                seen.lock().unwrap().push(meta(old.as_ref()).uid.clone());
            }
        });
        // The watch was down while a was deleted: the relist is how the listener learns.
        store.replace(vec![port("b", "u2", None)], 9);
        assert_eq!(*gone.lock().unwrap(), ["u1"]);
        assert!(store.by_index(UID, "u1").is_empty());
    }
}
