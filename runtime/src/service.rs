//! The reconciler as a `tower::Service<K>`, and the layers the runtime puts around it.
//!
//! A controller implements [`Reconcile`]; [`ReconcileService`] makes it a service whose
//! response is the [`Action`]. The runtime stacks, outermost first: [`TraceLayer`] (a span
//! per reconcile naming the controller and key), [`MetricsLayer`] (duration histogram and
//! error counter per controller), tower's concurrency limit (how many keys run at once) and
//! tower's timeout (a reconcile that hangs on a dead connection is abandoned and retried).

use std::{
    future::Future,
    sync::Arc,
    task::{Context, Poll},
    time::Instant,
};

use futures::future::BoxFuture;
use tower::{BoxError, Layer, Service};
use tracing::Instrument;

use super::{Action, Key, ObjectRef, metrics::Metrics};

/// A controller's reconcile function: bring what this key names towards its desired
/// state. Running it twice must be harmless.
pub trait Reconcile<K: Key = ObjectRef>: Send + Sync + 'static {
    /// Why a reconcile failed; the key is retried with backoff.
    type Error: std::error::Error + Send + Sync + 'static;

    /// Reconciles one key.
    fn reconcile(&self, key: K) -> impl Future<Output = Result<Action, Self::Error>> + Send;
}

/// A [`Reconcile`] as a tower service.
pub struct ReconcileService<R>(Arc<R>);

impl<R> ReconcileService<R> {
    /// Wraps a reconciler.
    pub fn new(reconciler: Arc<R>) -> Self {
        ReconcileService(reconciler)
    }
}

impl<R> Clone for ReconcileService<R> {
    fn clone(&self) -> Self {
        ReconcileService(self.0.clone())
    }
}

impl<K: Key, R: Reconcile<K>> Service<K> for ReconcileService<R> {
    type Response = Action;
    type Error = R::Error;
    type Future = BoxFuture<'static, Result<Action, R::Error>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, key: K) -> Self::Future {
        let reconciler = self.0.clone();
        Box::pin(async move { reconciler.reconcile(key).await })
    }
}

/// Runs each reconcile inside a span naming the controller and the key.
#[derive(Clone, Copy, Debug)]
pub struct TraceLayer {
    controller: &'static str,
}

impl TraceLayer {
    /// A layer for one controller.
    pub fn new(controller: &'static str) -> Self {
        TraceLayer { controller }
    }
}

impl<S> Layer<S> for TraceLayer {
    type Service = Trace<S>;
    fn layer(&self, inner: S) -> Trace<S> {
        Trace {
            inner,
            controller: self.controller,
        }
    }
}

/// The service [`TraceLayer`] makes.
#[derive(Clone, Debug)]
pub struct Trace<S> {
    inner: S,
    controller: &'static str,
}

impl<K: Key, S> Service<K> for Trace<S>
where
    S: Service<K>,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<S::Response, BoxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, key: K) -> Self::Future {
        let span = tracing::debug_span!("reconcile", controller = self.controller, key = %key);
        let future = self.inner.call(key);
        Box::pin(async move { future.await.map_err(Into::into) }.instrument(span))
    }
}

/// Records each reconcile's duration and whether it failed.
#[derive(Clone)]
pub struct MetricsLayer {
    controller: &'static str,
    metrics: Metrics,
}

impl MetricsLayer {
    /// A layer recording into `metrics` under the controller's name.
    pub fn new(controller: &'static str, metrics: Metrics) -> Self {
        MetricsLayer {
            controller,
            metrics,
        }
    }
}

impl<S> Layer<S> for MetricsLayer {
    type Service = Measure<S>;
    fn layer(&self, inner: S) -> Measure<S> {
        Measure {
            inner,
            controller: self.controller,
            metrics: self.metrics.clone(),
        }
    }
}

/// The service [`MetricsLayer`] makes.
#[derive(Clone)]
pub struct Measure<S> {
    inner: S,
    controller: &'static str,
    metrics: Metrics,
}

impl<K, S> Service<K> for Measure<S>
where
    S: Service<K>,
    S::Future: Send + 'static,
    S::Response: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, key: K) -> Self::Future {
        let future = self.inner.call(key);
        let (controller, metrics) = (self.controller, self.metrics.clone());
        Box::pin(async move {
            let start = Instant::now();
            let result = future.await;
            let labels = [("controller", controller)];
            metrics.observe(
                "ferro_controller_reconcile_duration_seconds",
                "How long reconciles take, per controller.",
                &labels,
                start.elapsed(),
            );
            metrics.inc_counter(
                "ferro_controller_reconciles_total",
                "Reconciles run, per controller.",
                &labels,
            );
            if result.is_err() {
                metrics.inc_counter(
                    "ferro_controller_reconcile_errors_total",
                    "Reconciles that failed (and were retried with backoff), per controller.",
                    &labels,
                );
            }
            result
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ReconcileError;
    use ferro_api::Kind;
    use std::time::Duration;
    use tower::{ServiceBuilder, ServiceExt};

    struct Sleepy;

    impl Reconcile for Sleepy {
        type Error = ReconcileError;

        async fn reconcile(&self, key: ObjectRef) -> Result<Action, ReconcileError> {
            match key.name.as_str() {
                "slow" => {
                    tokio::time::sleep(Duration::from_secs(60)).await;
                    Ok(Action::AwaitChange)
                }
                "bad" => Err(ReconcileError::Retry("bad".into())),
                _ => Ok(Action::AwaitChange),
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn layers_time_out_and_count() {
        let metrics = Metrics::new();
        let mut service = ServiceBuilder::new()
            .layer(TraceLayer::new("test"))
            .layer(MetricsLayer::new("test", metrics.clone()))
            .concurrency_limit(2)
            .timeout(Duration::from_secs(1))
            .service(ReconcileService::new(Arc::new(Sleepy)));
        let key = |n: &str| ObjectRef::new(Kind::Port, "default", n);
        let ok = service
            .ready()
            .await
            .unwrap()
            .call(key("fine"))
            .await
            .unwrap();
        assert_eq!(ok, Action::AwaitChange);
        let err = service
            .ready()
            .await
            .unwrap()
            .call(key("slow"))
            .await
            .unwrap_err();
        assert!(err.is::<tower::timeout::error::Elapsed>(), "{err}");
        let err = service
            .ready()
            .await
            .unwrap()
            .call(key("bad"))
            .await
            .unwrap_err();
        assert_eq!(err.to_string(), "bad");
        let labels = [("controller", "test")];
        assert_eq!(
            metrics.value("ferro_controller_reconciles_total", &labels),
            Some(3.0)
        );
        assert_eq!(
            metrics.value("ferro_controller_reconcile_errors_total", &labels),
            Some(2.0)
        );
    }
}
