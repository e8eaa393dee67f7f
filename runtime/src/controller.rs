//! A controller: triggers feeding a work queue, and a reconciler service draining it.
//!
//! Triggers are store listeners that map a change to keys: changes of the controller's own
//! kind ([`Controller::reconciles`]), of kinds it owns (mapped to the owner through the
//! controller owner reference, [`Controller::owns`]), and of kinds it references (mapped by
//! a function, [`Controller::watches`]: a Port waiting for a missing Network is queued when
//! the Network appears). A periodic resync queues every key again, so observations are
//! recomputed even when no event arrives.
//!
//! Reconciles start only once every store the controller reads has loaded its first List:
//! a decision made from a half-filled cache would be a wrong one.

use std::{sync::Arc, time::Duration};

use ferro_api::Resource;
use tokio::task::JoinSet;
use tower::{Service, ServiceBuilder, ServiceExt};

use super::{
    Action, ObjectRef,
    metrics::Metrics,
    queue::{Backoff, Outcome, WorkQueue},
    reflector::{AnyStore, Change, Store},
    service::{MetricsLayer, Reconcile, ReconcileService, TraceLayer},
};

type KeysFn = Box<dyn Fn() -> Vec<ObjectRef> + Send + Sync>;

/// How a controller runs: concurrency, timeout, backoff, resync.
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
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            concurrency: 16,
            timeout: Duration::from_secs(60),
            backoff: Backoff::default(),
            resync: Some(Duration::from_secs(600)),
        }
    }
}

/// A controller being assembled, then run.
pub struct Controller {
    name: &'static str,
    queue: Arc<WorkQueue>,
    settings: Settings,
    metrics: Metrics,
    resync_keys: Vec<KeysFn>,
    needs: Vec<Arc<dyn AnyStore>>,
}

impl Controller {
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
    pub fn queue(&self) -> Arc<WorkQueue> {
        self.queue.clone()
    }

    /// Reconciles the objects of a store: each change queues the object's key, and resync
    /// queues every key.
    pub fn reconciles<T: Resource + Send + Sync>(mut self, store: &Store<T>) -> Self {
        let queue = self.queue.clone();
        store.listen(move |c: &Change<T>| queue.add(c.key.clone()));
        let keys = store.clone();
        self.resync_keys.push(Box::new(move || keys.keys()));
        self.needs.push(Arc::new(store.clone()));
        self
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

    /// Queues the keys `map` derives from each change of a store of another kind.
    pub fn watches<O: Resource + Send + Sync>(
        mut self,
        store: &Store<O>,
        map: impl Fn(&Change<O>) -> Vec<ObjectRef> + Send + Sync + 'static,
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
    pub fn resync_with(
        mut self,
        keys: impl Fn() -> Vec<ObjectRef> + Send + Sync + 'static,
    ) -> Self {
        self.resync_keys.push(Box::new(keys));
        self
    }

    /// Runs the controller until the future is dropped.
    pub async fn run<R: Reconcile>(self, reconciler: Arc<R>) {
        for store in &self.needs {
            store.wait_synced().await;
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
        let mut tasks = JoinSet::new();
        if let Some(period) = settings.resync {
            let queue = queue.clone();
            tasks.spawn(async move {
                let mut ticker = tokio::time::interval(period);
                ticker.tick().await;
                loop {
                    ticker.tick().await;
                    for keys in &resync_keys {
                        for key in keys() {
                            queue.add(key);
                        }
                    }
                }
            });
        }
        let mut service = ServiceBuilder::new()
            .layer(TraceLayer::new(name))
            .layer(MetricsLayer::new(name, metrics))
            .concurrency_limit(settings.concurrency.max(1))
            .timeout(settings.timeout)
            .service(ReconcileService::new(reconciler));
        loop {
            // `ready` takes a concurrency permit; the call below consumes it, and the
            // permit is released when that reconcile's future completes.
            let ready = match service.ready().await {
                Ok(ready) => ready,
                Err(e) => {
                    tracing::error!(controller = name, error = %e, "reconciler unavailable");
                    return;
                }
            };
            let key = queue.next().await;
            let future = ready.call(key.clone());
            let queue = queue.clone();
            tasks.spawn(async move {
                let outcome = match future.await {
                    Ok(Action::Requeue(after)) => Outcome::Success(Some(after)),
                    Ok(Action::AwaitChange) => Outcome::Success(None),
                    Err(e) => {
                        tracing::warn!(controller = name, key = %key, error = %e, "reconcile failed; retrying with backoff");
                        Outcome::Failure
                    }
                };
                queue.done(key, outcome);
            });
            // Reap finished tasks so the set does not grow with every reconcile.
            while let Some(result) = tasks.try_join_next() {
                if let Err(e) = result
                    && e.is_panic()
                {
                    tracing::error!(controller = name, "a reconcile panicked: {e}");
                }
            }
        }
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
}
