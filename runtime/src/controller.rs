//! A controller: triggers feeding a work queue, and a reconciler service draining it.
//!
//! Triggers are store listeners that map a change to keys: changes of the controller's own
//! kind ([`Controller::reconciles`]), of kinds it owns (mapped to the owner through the
//! controller owner reference, [`Controller::owns`]), and of kinds it references (mapped by
//! a function, [`Controller::watches`]: a Port waiting for a missing Network is queued when
//! the Network appears). A controller whose key is not an [`ObjectRef`] maps objects to
//! keys with [`Controller::reconciles_with`], and drops updates that do not matter with a
//! [predicate](crate::predicates). A periodic resync queues every key again — plus keys
//! from extra sources, such as the VMs a node's hypervisor lists — so observations are
//! recomputed even when no event arrives; it leaves keys that are backing off alone, and
//! counts its passes in [`RESYNCS_TOTAL`].
//!
//! [`Controller::run_until`] shuts down gracefully: no key is taken any more, running
//! reconciles get a grace period to finish, and those still running are then dropped.
//!
//! Reconciles start only once every store the controller reads has loaded its first List:
//! a decision made from a half-filled cache would be a wrong one.

use std::{future::Future, panic::AssertUnwindSafe, sync::Arc, time::Duration};

use ferro_api::Resource;
use futures::{FutureExt, future::BoxFuture};
use tokio::task::JoinSet;
use tower::{Service, ServiceBuilder, ServiceExt};

use super::{
    Action, Key, ObjectRef, error_chain,
    metrics::Metrics,
    predicates::{self, Predicate},
    queue::{Backoff, Outcome, WorkQueue},
    reflector::{AnyStore, Change, Store},
    service::{MetricsLayer, Reconcile, ReconcileService, TraceLayer},
};

/// A source of keys for the periodic resync; asynchronous, so that it may look at the host
/// (the agent lists the VMs its hypervisor finds, so that orphans are looked at).
type KeySource<K> = Box<dyn Fn() -> BoxFuture<'static, Vec<K>> + Send + Sync>;

/// How a controller runs: concurrency, timeout, backoff, resync, shutdown.
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    /// How many keys reconcile at once.
    pub concurrency: usize,
    /// How long one reconcile may take before it is abandoned and retried.
    pub timeout: Duration,
    /// Backoff after failed reconciles.
    pub backoff: Backoff,
    /// How often every key is queued again; `None` disables resync.
    pub resync: Option<Duration>,
    /// Whether the first resync runs as soon as the caches are synced, rather than one
    /// period later: keys only a resync source knows (a VM whose Server is gone) are then
    /// looked at right away.
    pub resync_at_start: bool,
    /// How long running reconciles get to finish at shutdown before they are dropped.
    pub shutdown_grace: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            concurrency: 16,
            timeout: Duration::from_secs(60),
            backoff: Backoff::default(),
            resync: Some(Duration::from_secs(600)),
            resync_at_start: false,
            shutdown_grace: Duration::from_secs(10),
        }
    }
}

/// The counter of completed resync passes, labelled by controller: tests wait for it to
/// advance instead of sleeping for "long enough".
pub const RESYNCS_TOTAL: &str = "ferro_controller_resyncs_total";

/// A controller being assembled, then run. `K` is the key its queue holds and its
/// reconciler takes.
pub struct Controller<K = ObjectRef> {
    name: &'static str,
    queue: Arc<WorkQueue<K>>,
    settings: Settings,
    metrics: Metrics,
    resync_keys: Vec<KeySource<K>>,
    needs: Vec<Arc<dyn AnyStore>>,
}

impl Controller<ObjectRef> {
    /// Reconciles the objects of a store: each change queues the object's key, and resync
    /// queues every key.
    pub fn reconciles<T: Resource + Send + Sync>(self, store: &Store<T>) -> Self {
        self.reconciles_with(store, |o: &T| Some(ObjectRef::of(o)), predicates::any())
    }

    /// Queues the owner (of kind `owner`) named by the controller reference of each changed
    /// object of the store.
    pub fn owns<O: Resource + Send + Sync>(
        mut self,
        store: &Store<O>,
        owner: ferro_api::Kind,
    ) -> Self {
        let queue = self.queue.clone();
        store.listen(move |c: &Change<O>| {
            for object in c.old.iter().chain(c.new.iter()) {
                let meta = super::meta(object.as_ref());
                for reference in meta
                    .owner_references
                    .iter()
                    .filter(|r| r.controller && r.kind == owner.name())
                {
                    if let Some(key) = ObjectRef::of_owner(reference) {
                        queue.add(key);
                    }
                }
            }
        });
        self.needs.push(Arc::new(store.clone()));
        self
    }
}

impl<K: Key> Controller<K> {
    /// A controller named `name` (used in logs and metrics).
    pub fn new(name: &'static str, settings: Settings, metrics: Metrics) -> Self {
        let queue = Arc::new(WorkQueue::new(settings.backoff));
        let depth = queue.clone();
        metrics.gauge_fn(
            "ferro_controller_queue_depth",
            "Keys waiting to be reconciled, per controller.",
            &[("controller", name)],
            move || depth.depth() as f64,
        );
        let delayed = queue.clone();
        metrics.gauge_fn(
            "ferro_controller_queue_delayed",
            "Keys waiting for a requeue delay or a backoff, per controller.",
            &[("controller", name)],
            move || delayed.delayed() as f64,
        );
        Controller {
            name,
            queue,
            settings,
            metrics,
            resync_keys: Vec::new(),
            needs: Vec::new(),
        }
    }

    /// The controller's queue, for triggers the builder does not cover.
    pub fn queue(&self) -> Arc<WorkQueue<K>> {
        self.queue.clone()
    }

    /// Reconciles the objects of a store under the keys `key_of` gives them: an object
    /// that appears or vanishes queues its key, an update queues it when `predicate` says
    /// it matters, and resync queues the key of every cached object. An update that
    /// changes an object's key (a name reused by a new object) queues both keys.
    pub fn reconciles_with<T: Resource + Send + Sync>(
        mut self,
        store: &Store<T>,
        key_of: impl Fn(&T) -> Option<K> + Send + Sync + 'static,
        predicate: Predicate<T>,
    ) -> Self {
        let key_of = Arc::new(key_of);
        let queue = self.queue.clone();
        let keys = key_of.clone();
        store.listen(move |c: &Change<T>| {
            let old = c.old.as_deref().and_then(|o| keys(o));
            let new = c.new.as_deref().and_then(|o| keys(o));
            if let (Some(before), Some(after)) = (c.old.as_deref(), c.new.as_deref())
                && old == new
                && !predicate(before, after)
            {
                return;
            }
            if old != new
                && let Some(old) = old
            {
                queue.add(old);
            }
            if let Some(new) = new {
                queue.add(new);
            }
        });
        let cached = store.clone();
        self.resync_keys.push(Box::new(move || {
            let keys = cached.list().iter().filter_map(|o| key_of(o)).collect();
            futures::future::ready(keys).boxed()
        }));
        self.needs.push(Arc::new(store.clone()));
        self
    }

    /// Queues the keys `map` derives from each change of a store of another kind.
    pub fn watches<O: Resource + Send + Sync>(
        mut self,
        store: &Store<O>,
        map: impl Fn(&Change<O>) -> Vec<K> + Send + Sync + 'static,
    ) -> Self {
        let queue = self.queue.clone();
        store.listen(move |c: &Change<O>| {
            for key in map(c) {
                queue.add(key);
            }
        });
        self.needs.push(Arc::new(store.clone()));
        self
    }

    /// Waits for this store to be synced before reconciling, without a trigger.
    pub fn reads(mut self, store: Arc<dyn AnyStore>) -> Self {
        self.needs.push(store);
        self
    }

    /// Adds keys to queue again at every resync.
    pub fn resync_with(mut self, keys: impl Fn() -> Vec<K> + Send + Sync + 'static) -> Self {
        self.resync_keys
            .push(Box::new(move || futures::future::ready(keys()).boxed()));
        self
    }

    /// Adds keys found asynchronously (on the host, say) to queue again at every resync.
    pub fn resync_with_async<F>(mut self, keys: impl Fn() -> F + Send + Sync + 'static) -> Self
    where
        F: Future<Output = Vec<K>> + Send + 'static,
    {
        self.resync_keys.push(Box::new(move || keys().boxed()));
        self
    }

    /// Runs the controller until the future is dropped.
    pub async fn run<R: Reconcile<K>>(self, reconciler: Arc<R>) {
        self.run_until(reconciler, std::future::pending()).await
    }

    /// Runs the controller until `shutdown` completes, then shuts down gracefully: no key
    /// is taken any more, running reconciles get [`Settings::shutdown_grace`] to finish,
    /// and those still running then are dropped (and retried by the next process).
    pub async fn run_until<R: Reconcile<K>>(
        self,
        reconciler: Arc<R>,
        shutdown: impl Future<Output = ()> + Send,
    ) {
        let mut shutdown = std::pin::pin!(shutdown);
        let synced = async {
            for store in &self.needs {
                store.wait_synced().await;
            }
        };
        tokio::select! {
            _ = synced => {}
            _ = &mut shutdown => {
                self.queue.close();
                return;
            }
        }
        tracing::info!(controller = self.name, "caches synced; reconciling");
        let Controller {
            name,
            queue,
            settings,
            metrics,
            resync_keys,
            ..
        } = self;
        let mut background = JoinSet::new();
        if let Some(period) = settings.resync {
            background.spawn(resync(
                name,
                period,
                settings.resync_at_start,
                resync_keys,
                queue.clone(),
                metrics.clone(),
            ));
        }
        let mut service = ServiceBuilder::new()
            .layer(TraceLayer::new(name))
            .layer(MetricsLayer::new(name, metrics))
            .concurrency_limit(settings.concurrency.max(1))
            .timeout(settings.timeout)
            .service(ReconcileService::new(reconciler));
        let mut reconciles = JoinSet::new();
        loop {
            // `ready` takes a concurrency permit; the call below consumes it, and the
            // permit is released when that reconcile's future completes.
            let ready = tokio::select! {
                biased;
                _ = &mut shutdown => break,
                ready = service.ready() => match ready {
                    Ok(ready) => ready,
                    Err(e) => {
                        tracing::error!(controller = name, error = %e, "reconciler unavailable");
                        break;
                    }
                },
            };
            let key = tokio::select! {
                biased;
                _ = &mut shutdown => break,
                key = queue.next() => match key {
                    Some(key) => key,
                    None => break,
                },
            };
            let future = ready.call(key.clone());
            let queue = queue.clone();
            reconciles.spawn(async move {
                // A panic fails this key (retried with backoff) instead of leaving it
                // marked running for ever.
                let outcome = match AssertUnwindSafe(future).catch_unwind().await {
                    Ok(Ok(Action::Requeue(after))) => Outcome::Success(Some(after)),
                    Ok(Ok(Action::AwaitChange)) => Outcome::Success(None),
                    Ok(Err(e)) => {
                        let failures = queue.failures(&key) + 1;
                        tracing::warn!(controller = name, key = %key, failures, error = %error_chain(e.as_ref()), "reconcile failed; retrying with backoff");
                        Outcome::Failure
                    }
                    Err(_) => {
                        tracing::error!(controller = name, key = %key, "a reconcile panicked; retrying with backoff");
                        Outcome::Failure
                    }
                };
                queue.done(key, outcome);
            });
            // Reap finished tasks so the set does not grow with every reconcile.
            while reconciles.try_join_next().is_some() {}
        }
        queue.close();
        background.abort_all();
        if !reconciles.is_empty() {
            tracing::info!(
                controller = name,
                running = reconciles.len(),
                "letting running reconciles finish"
            );
        }
        let drained = tokio::time::timeout(settings.shutdown_grace, async {
            while reconciles.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                controller = name,
                dropped = reconciles.len(),
                "reconciles still running at shutdown were dropped"
            );
        }
        reconciles.abort_all();
    }
}

/// Every `period` (the first time at once if `at_start`), queues the keys of every source
/// for a resync, then counts the pass in [`RESYNCS_TOTAL`].
async fn resync<K: Key>(
    name: &'static str,
    period: Duration,
    at_start: bool,
    sources: Vec<KeySource<K>>,
    queue: Arc<WorkQueue<K>>,
    metrics: Metrics,
) {
    let mut ticker = tokio::time::interval(period);
    if !at_start {
        // The first tick is immediate; the caches' first List has just queued every key.
        ticker.tick().await;
    }
    loop {
        ticker.tick().await;
        for source in &sources {
            for key in source().await {
                queue.resync(key);
            }
        }
        metrics.inc_counter(
            RESYNCS_TOTAL,
            "Periodic resync passes completed, per controller.",
            &[("controller", name)],
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ReconcileError;
    use ferro_api::v1;
    use std::sync::Mutex;

    /// Records which keys ran and how many ran at once.
    #[derive(Default)]
    struct Recorder {
        seen: Mutex<Vec<String>>,
        running: Mutex<(usize, usize)>,
    }

    impl Reconcile for Recorder {
        type Error = ReconcileError;

        async fn reconcile(&self, key: ObjectRef) -> Result<Action, ReconcileError> {
            {
                let mut r = self.running.lock().unwrap();
                r.0 += 1;
                r.1 = r.1.max(r.0);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            self.running.lock().unwrap().0 -= 1;
            self.seen.lock().unwrap().push(key.name.clone());
            Ok(Action::AwaitChange)
        }
    }

    fn network(name: &str) -> v1::Network {
        v1::Network {
            metadata: Some(v1::ObjectMeta {
                name: name.into(),
                project: "default".into(),
                uid: format!("uid-{name}"),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn port(name: &str, network: &str) -> v1::Port {
        v1::Port {
            metadata: Some(v1::ObjectMeta {
                name: name.into(),
                project: "default".into(),
                ..Default::default()
            }),
            spec: Some(v1::PortSpec {
                network: network.into(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn triggers_feed_the_queue_and_concurrency_is_limited() {
        let ports = Store::<v1::Port>::new();
        let networks = Store::<v1::Network>::new();
        let settings = Settings {
            concurrency: 3,
            ..Default::default()
        };
        let port_index = ports.clone();
        port_index.add_index("network", |p: &v1::Port| {
            vec![p.spec.clone().unwrap_or_default().network]
        });
        let controller = Controller::new("test", settings, Metrics::new())
            .reconciles(&ports)
            .watches(&networks, move |c| {
                port_index
                    .by_index("network", &c.key.name)
                    .iter()
                    .map(|p| ObjectRef::of(p.as_ref()))
                    .collect()
            });
        let recorder = Arc::new(Recorder::default());
        let run = tokio::spawn(controller.run(recorder.clone()));
        ports.replace(
            (0..10)
                .map(|i| port(&format!("p{i}"), if i == 0 { "later" } else { "n" }))
                .collect(),
            1,
        );
        networks.replace(vec![], 1);
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(recorder.seen.lock().unwrap().len(), 10);
        assert_eq!(
            recorder.running.lock().unwrap().1,
            3,
            "at most three at once, and three were used"
        );
        // The network p0 waits for appears: p0, and only p0, runs again.
        networks.apply(network("later"));
        tokio::time::sleep(Duration::from_secs(1)).await;
        let seen = recorder.seen.lock().unwrap().clone();
        assert_eq!(seen.len(), 11);
        assert_eq!(seen[10], "p0");
        run.abort();
    }

    /// Records the uids it is given; "slow" takes a minute, "boom" panics.
    #[derive(Default)]
    struct ByUid {
        seen: Mutex<Vec<String>>,
        finished: Mutex<Vec<String>>,
    }

    impl Reconcile<String> for ByUid {
        type Error = ReconcileError;

        async fn reconcile(&self, uid: String) -> Result<Action, ReconcileError> {
            self.seen.lock().unwrap().push(uid.clone());
            match uid.as_str() {
                "slow" => tokio::time::sleep(Duration::from_secs(60)).await,
                "boom" => panic!("a reconcile that panics"),
                "medium" => tokio::time::sleep(Duration::from_secs(2)).await,
                _ => {}
            }
            self.finished.lock().unwrap().push(uid);
            Ok(Action::AwaitChange)
        }
    }

    /// A port with a uid and a revision; `note` is an annotation the predicates below
    /// ignore, as a reconciler ignores its own status writes.
    fn port_at(name: &str, uid: &str, rv: i64, note: &str) -> v1::Port {
        let mut p = port(name, "n");
        let meta = p.metadata.as_mut().unwrap();
        meta.uid = uid.into();
        meta.resource_version = rv;
        if !note.is_empty() {
            meta.annotations.insert("note".into(), note.into());
        }
        p
    }

    fn uid_of(p: &v1::Port) -> Option<String> {
        Some(crate::meta(p).uid.clone()).filter(|u| !u.is_empty())
    }

    fn resyncs(metrics: &Metrics) -> f64 {
        metrics
            .value(RESYNCS_TOTAL, &[("controller", "uids")])
            .unwrap_or_default()
    }

    #[tokio::test(start_paused = true)]
    async fn keys_come_from_a_function_and_only_significant_updates_queue() {
        let ports = Store::<v1::Port>::new();
        let settings = Settings {
            resync: None,
            ..Default::default()
        };
        let controller = Controller::new("uids", settings, Metrics::new()).reconciles_with(
            &ports,
            uid_of,
            predicates::changed(|p: &v1::Port| p.spec.clone()),
        );
        let recorder = Arc::new(ByUid::default());
        let run = tokio::spawn(controller.run(recorder.clone()));
        ports.replace(vec![port_at("a", "u1", 1, "")], 1);
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(*recorder.seen.lock().unwrap(), ["u1"]);
        // An update the predicate ignores queues nothing.
        ports.apply(port_at("a", "u1", 2, "written"));
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(recorder.seen.lock().unwrap().len(), 1);
        // The name reused by a new object while the watch was down: both uids run, the
        // old one so that its leftovers are cleaned up.
        ports.replace(vec![port_at("a", "u2", 5, "")], 5);
        tokio::time::sleep(Duration::from_secs(1)).await;
        let mut seen = recorder.seen.lock().unwrap().clone();
        seen.sort();
        assert_eq!(seen, ["u1", "u1", "u2"]);
        // Deleted while the watch was down: the relist queues it.
        ports.replace(vec![], 6);
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(recorder.seen.lock().unwrap().last().unwrap(), "u2");
        assert_eq!(recorder.seen.lock().unwrap().len(), 4);
        run.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn resync_queues_cached_and_found_keys_and_counts_its_passes() {
        let ports = Store::<v1::Port>::new();
        let metrics = Metrics::new();
        let settings = Settings {
            resync: Some(Duration::from_secs(10)),
            resync_at_start: true,
            ..Default::default()
        };
        let controller = Controller::new("uids", settings, metrics.clone())
            .reconciles_with(&ports, uid_of, predicates::any())
            .resync_with_async(|| async { vec!["orphan".to_owned()] });
        let recorder = Arc::new(ByUid::default());
        ports.replace(vec![port_at("a", "u1", 1, "")], 1);
        let run = tokio::spawn(controller.run(recorder.clone()));
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(resyncs(&metrics), 1.0, "the first pass runs at start");
        let mut seen = recorder.seen.lock().unwrap().clone();
        seen.sort();
        assert_eq!(seen, ["orphan", "u1"], "u1 was queued twice but ran once");
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(resyncs(&metrics), 2.0);
        assert_eq!(recorder.seen.lock().unwrap().len(), 4);
        run.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn a_panic_fails_the_key_and_it_is_retried() {
        let metrics = Metrics::new();
        let settings = Settings {
            resync: None,
            ..Default::default()
        };
        let controller = Controller::<String>::new("uids", settings, metrics.clone());
        let queue = controller.queue();
        let recorder = Arc::new(ByUid::default());
        let run = tokio::spawn(controller.run(recorder.clone()));
        queue.add("boom".to_owned());
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(
            queue.failures(&"boom".to_owned()) >= 2,
            "retried with backoff"
        );
        assert_eq!(queue.running(), 0);
        queue.add("fine".to_owned());
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert!(
            recorder
                .finished
                .lock()
                .unwrap()
                .contains(&"fine".to_owned())
        );
        run.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_lets_running_reconciles_finish_within_the_grace() {
        let settings = Settings {
            resync: None,
            shutdown_grace: Duration::from_secs(5),
            ..Default::default()
        };
        let controller = Controller::<String>::new("uids", settings, Metrics::new());
        let queue = controller.queue();
        let recorder = Arc::new(ByUid::default());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let run = tokio::spawn(controller.run_until(recorder.clone(), async {
            let _ = stopped.await;
        }));
        queue.add("medium".to_owned());
        queue.add("slow".to_owned());
        tokio::time::sleep(Duration::from_millis(1)).await;
        let start = tokio::time::Instant::now();
        stop.send(()).unwrap();
        queue.add("late".to_owned());
        run.await.unwrap();
        assert_eq!(
            start.elapsed(),
            Duration::from_secs(5),
            "it waited out the grace for the slow one"
        );
        assert_eq!(*recorder.finished.lock().unwrap(), ["medium"]);
        assert!(
            !recorder.seen.lock().unwrap().contains(&"late".to_owned()),
            "no key is taken after shutdown"
        );
        assert!(queue.next().await.is_none(), "the queue is closed");
    }
}
