//! Leader election over a `Lease` object, renewed by resourceVersion compare-and-swap.
//!
//! The rules, as in client-go's leaderelection:
//! - a candidate takes the lease when it is free (no holder) or expired, by an Update
//!   carrying the resourceVersion it read: of two candidates, one wins and the other gets
//!   `Conflict`;
//! - "expired" is judged on the candidate's own monotonic clock: the lease record (its
//!   resourceVersion) must have stayed unchanged for the lease's duration since the
//!   candidate first saw it. Wall clocks of different hosts never get compared;
//! - the leader renews every retry period and steps down when it has not renewed within
//!   the renew deadline, which is shorter than the lease duration, so it stops before
//!   anyone else may start;
//! - on a clean shutdown the leader releases the lease so a standby takes over at once.
//!
//! Leadership is an optimisation, not what keeps the data correct: allocation claims make
//! two leaders harmless, only wasteful.

use std::{future::Future, time::Duration};

use ferro_api::{Error, Kind, client::Client, v1};
use tokio::time::Instant;

use super::now;

/// How a candidate contends for a lease.
#[derive(Clone, Debug)]
pub struct LeaderConfig {
    /// The Lease's name.
    pub lease_name: String,
    /// This candidate's identity, written as the holder.
    pub identity: String,
    /// How long a lease lasts without renewal.
    pub lease_duration: Duration,
    /// The leader steps down when it could not renew for this long.
    pub renew_deadline: Duration,
    /// How often the leader renews and candidates retry.
    pub retry_period: Duration,
}

impl LeaderConfig {
    /// The defaults for `identity`: a standby takes over at most about 12 s (plus one retry
    /// period) after the leader stops renewing.
    pub fn new(identity: impl Into<String>) -> Self {
        LeaderConfig {
            lease_name: "controllers".into(),
            identity: identity.into(),
            lease_duration: Duration::from_secs(12),
            renew_deadline: Duration::from_secs(8),
            retry_period: Duration::from_secs(1),
        }
    }

    /// A configuration scaled to a lease duration (renew deadline ⅔, retry period ⅙).
    pub fn with_lease_duration(mut self, duration: Duration) -> Self {
        self.lease_duration = duration;
        self.renew_deadline = duration * 2 / 3;
        self.retry_period = duration / 6;
        self
    }
}

/// The Lease calls leader election needs; [`Client`] implements it, tests fake it.
pub trait LeaseApi: Send + Sync {
    /// Reads the lease; `Ok(None)` when it does not exist.
    fn get(&self, name: &str) -> impl Future<Output = Result<Option<v1::Lease>, Error>> + Send;
    /// Creates the lease; `AlreadyExists` when someone else did first.
    fn create(&self, lease: v1::Lease) -> impl Future<Output = Result<v1::Lease, Error>> + Send;
    /// Replaces the lease if its resourceVersion still matches; `Conflict` otherwise.
    fn update(&self, lease: v1::Lease) -> impl Future<Output = Result<v1::Lease, Error>> + Send;
}

impl LeaseApi for Client {
    async fn get(&self, name: &str) -> Result<Option<v1::Lease>, Error> {
        match self.get_typed::<v1::Lease>("", name).await {
            Ok(lease) => Ok(Some(lease)),
            Err(Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }
    async fn create(&self, lease: v1::Lease) -> Result<v1::Lease, Error> {
        self.create_typed(lease).await
    }
    async fn update(&self, lease: v1::Lease) -> Result<v1::Lease, Error> {
        let object = Client::update(self, ferro_api::Object::Lease(lease)).await?;
        match object {
            ferro_api::Object::Lease(lease) => Ok(lease),
            _ => Err(Error::internal(format!(
                "the server answered a {} for a Lease",
                Kind::Lease
            ))),
        }
    }
}

/// Contends for, holds and releases one lease.
pub struct LeaderElector<A> {
    api: A,
    config: LeaderConfig,
    /// The resourceVersion last seen and when (on our clock) it was first seen.
    observed: Option<(i64, Instant)>,
}

fn seconds(d: Duration) -> u32 {
    u32::try_from(d.as_millis().div_ceil(1000))
        .unwrap_or(u32::MAX)
        .max(1)
}

impl<A: LeaseApi> LeaderElector<A> {
    /// A candidate for the lease the configuration names.
    pub fn new(api: A, config: LeaderConfig) -> Self {
        LeaderElector {
            api,
            config,
            observed: None,
        }
    }

    /// The configuration.
    pub fn config(&self) -> &LeaderConfig {
        &self.config
    }

    fn observe(&mut self, resource_version: i64) {
        if self.observed.map(|(rv, _)| rv) != Some(resource_version) {
            self.observed = Some((resource_version, Instant::now()));
        }
    }

    /// One attempt to take or renew the lease; `Ok(true)` when this candidate holds it now.
    pub async fn try_acquire_or_renew(&mut self) -> Result<bool, Error> {
        let me = self.config.identity.clone();
        let Some(current) = self.api.get(&self.config.lease_name).await? else {
            let lease = v1::Lease {
                metadata: Some(v1::ObjectMeta {
                    name: self.config.lease_name.clone(),
                    ..Default::default()
                }),
                spec: Some(v1::LeaseSpec {
                    holder_identity: me,
                    lease_duration_seconds: seconds(self.config.lease_duration),
                    acquire_time: Some(now()),
                    renew_time: Some(now()),
                    lease_transitions: 0,
                }),
                status: None,
            };
            return match self.api.create(lease).await {
                Ok(created) => {
                    self.observe(
                        created
                            .metadata
                            .as_ref()
                            .map(|m| m.resource_version)
                            .unwrap_or_default(),
                    );
                    Ok(true)
                }
                Err(Error::AlreadyExists { .. }) => Ok(false),
                Err(e) => Err(e),
            };
        };
        let rv = current
            .metadata
            .as_ref()
            .map(|m| m.resource_version)
            .unwrap_or_default();
        self.observe(rv);
        let spec = current.spec.clone().unwrap_or_default();
        let held_by_other = !spec.holder_identity.is_empty() && spec.holder_identity != me;
        if held_by_other {
            let duration = Duration::from_secs(u64::from(spec.lease_duration_seconds.max(1)));
            let seen_at = self.observed.map(|(_, at)| at).unwrap_or_else(Instant::now);
            if seen_at.elapsed() < duration {
                return Ok(false);
            }
            tracing::info!(lease = %self.config.lease_name, previous = %spec.holder_identity, "lease expired; taking over");
        }
        let mut next = current.clone();
        let next_spec = next.spec.get_or_insert_with(Default::default);
        if next_spec.holder_identity != me {
            next_spec.acquire_time = Some(now());
            next_spec.lease_transitions += 1;
        }
        next_spec.holder_identity = me;
        next_spec.lease_duration_seconds = seconds(self.config.lease_duration);
        next_spec.renew_time = Some(now());
        match self.api.update(next).await {
            Ok(updated) => {
                self.observe(
                    updated
                        .metadata
                        .as_ref()
                        .map(|m| m.resource_version)
                        .unwrap_or_default(),
                );
                Ok(true)
            }
            Err(Error::Conflict { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Waits until this candidate holds the lease.
    pub async fn acquire(&mut self) {
        loop {
            match tokio::time::timeout(
                self.config.retry_period.max(Duration::from_millis(100)) * 2,
                self.try_acquire_or_renew(),
            )
            .await
            {
                Ok(Ok(true)) => {
                    tracing::info!(lease = %self.config.lease_name, identity = %self.config.identity, "became leader");
                    return;
                }
                Ok(Ok(false)) => {}
                Ok(Err(e)) => {
                    tracing::warn!(lease = %self.config.lease_name, error = %e, "cannot reach the lease")
                }
                Err(_) => tracing::warn!(lease = %self.config.lease_name, "lease call timed out"),
            }
            tokio::time::sleep(self.config.retry_period).await;
        }
    }

    /// Renews the lease until leadership is lost: someone else holds it, or it could not be
    /// renewed within the renew deadline. Returns then.
    pub async fn hold(&mut self) {
        let mut renewed = Instant::now();
        loop {
            tokio::time::sleep(self.config.retry_period).await;
            let left = self.config.renew_deadline.saturating_sub(renewed.elapsed());
            if left.is_zero() {
                tracing::warn!(lease = %self.config.lease_name, "could not renew within the deadline; stepping down");
                return;
            }
            match tokio::time::timeout(left, self.try_acquire_or_renew()).await {
                Ok(Ok(true)) => renewed = Instant::now(),
                Ok(Ok(false)) => {
                    tracing::warn!(lease = %self.config.lease_name, "the lease was taken; stepping down");
                    return;
                }
                Ok(Err(e)) => {
                    tracing::warn!(lease = %self.config.lease_name, error = %e, "renewal failed")
                }
                Err(_) => {}
            }
        }
    }

    /// Gives the lease up (clean shutdown), so a standby need not wait for it to expire.
    ///
    /// A renewal dropped mid-flight by the shutdown may still land after the read here;
    /// its conflict is retried on a fresh read.
    pub async fn release(&mut self) {
        for _ in 0..5 {
            let Ok(Some(current)) = self.api.get(&self.config.lease_name).await else {
                return;
            };
            if current.spec.as_ref().map(|s| s.holder_identity.as_str())
                != Some(self.config.identity.as_str())
            {
                return;
            }
            let mut next = current;
            let spec = next.spec.get_or_insert_with(Default::default);
            spec.holder_identity.clear();
            spec.renew_time = Some(now());
            match self.api.update(next).await {
                Ok(_) => {
                    tracing::info!(lease = %self.config.lease_name, "released the lease");
                    return;
                }
                Err(Error::Conflict { .. }) => continue,
                Err(e) => {
                    tracing::warn!(lease = %self.config.lease_name, error = %e, "could not release the lease");
                    return;
                }
            }
        }
        tracing::warn!(lease = %self.config.lease_name, "could not release the lease: it kept changing");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// A lease store with resourceVersion compare-and-swap, and a switch to fail calls.
    #[derive(Clone, Default)]
    struct FakeLeases {
        inner: Arc<Mutex<(Option<v1::Lease>, i64, bool)>>,
    }

    impl FakeLeases {
        fn holder(&self) -> String {
            self.inner
                .lock()
                .unwrap()
                .0
                .as_ref()
                .and_then(|l| l.spec.clone())
                .map(|s| s.holder_identity)
                .unwrap_or_default()
        }
        fn transitions(&self) -> u32 {
            self.inner
                .lock()
                .unwrap()
                .0
                .as_ref()
                .and_then(|l| l.spec.clone())
                .map(|s| s.lease_transitions)
                .unwrap_or_default()
        }
        fn set_unreachable(&self, down: bool) {
            self.inner.lock().unwrap().2 = down;
        }
    }

    impl LeaseApi for FakeLeases {
        async fn get(&self, _: &str) -> Result<Option<v1::Lease>, Error> {
            let s = self.inner.lock().unwrap();
            if s.2 {
                return Err(Error::Unavailable {
                    message: "down".into(),
                });
            }
            Ok(s.0.clone())
        }
        async fn create(&self, mut lease: v1::Lease) -> Result<v1::Lease, Error> {
            let mut s = self.inner.lock().unwrap();
            if s.0.is_some() {
                return Err(Error::AlreadyExists {
                    object: "leases/controllers".into(),
                });
            }
            s.1 += 1;
            lease
                .metadata
                .get_or_insert_with(Default::default)
                .resource_version = s.1;
            s.0 = Some(lease.clone());
            Ok(lease)
        }
        async fn update(&self, mut lease: v1::Lease) -> Result<v1::Lease, Error> {
            let mut s = self.inner.lock().unwrap();
            if s.2 {
                return Err(Error::Unavailable {
                    message: "down".into(),
                });
            }
            let stored =
                s.0.as_ref()
                    .and_then(|l| l.metadata.as_ref())
                    .map(|m| m.resource_version);
            if stored != lease.metadata.as_ref().map(|m| m.resource_version) {
                return Err(Error::Conflict {
                    object: "leases/controllers".into(),
                    message: "stale".into(),
                });
            }
            s.1 += 1;
            lease
                .metadata
                .get_or_insert_with(Default::default)
                .resource_version = s.1;
            s.0 = Some(lease.clone());
            Ok(lease)
        }
    }

    fn config(identity: &str) -> LeaderConfig {
        LeaderConfig::new(identity).with_lease_duration(Duration::from_secs(6))
    }

    #[tokio::test(start_paused = true)]
    async fn one_leader_and_takeover_within_the_lease_duration() {
        let leases = FakeLeases::default();
        let mut a = LeaderElector::new(leases.clone(), config("a"));
        let mut b = LeaderElector::new(leases.clone(), config("b"));
        a.acquire().await;
        assert_eq!(leases.holder(), "a");
        // While a renews, b never gets it.
        let holding = tokio::spawn(async move {
            a.hold().await;
            "lost"
        });
        assert!(
            tokio::time::timeout(Duration::from_secs(30), b.acquire())
                .await
                .is_err(),
            "b must not lead while a renews"
        );
        assert_eq!(leases.holder(), "a");
        // a dies: it stops renewing. b takes over within the lease duration plus a retry.
        holding.abort();
        let died = Instant::now();
        b.acquire().await;
        let took = died.elapsed();
        assert_eq!(leases.holder(), "b");
        assert!(
            took <= Duration::from_secs(6) + Duration::from_secs(2),
            "took {took:?}"
        );
        assert!(
            took >= Duration::from_secs(6) - Duration::from_secs(1),
            "took over too early: {took:?}"
        );
        assert_eq!(leases.transitions(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_leader_that_cannot_renew_steps_down_before_the_lease_expires() {
        let leases = FakeLeases::default();
        let mut a = LeaderElector::new(leases.clone(), config("a"));
        a.acquire().await;
        leases.set_unreachable(true);
        let start = Instant::now();
        a.hold().await;
        let stepped_down = start.elapsed();
        assert!(
            stepped_down <= Duration::from_secs(4) + Duration::from_secs(1),
            "{stepped_down:?}"
        );
        assert!(
            stepped_down < Duration::from_secs(6),
            "must stop before anyone may take over"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_released_lease_is_taken_at_once() {
        let leases = FakeLeases::default();
        let mut a = LeaderElector::new(leases.clone(), config("a"));
        let mut b = LeaderElector::new(leases.clone(), config("b"));
        a.acquire().await;
        assert!(!b.try_acquire_or_renew().await.unwrap());
        a.release().await;
        assert_eq!(leases.holder(), "");
        assert!(b.try_acquire_or_renew().await.unwrap());
        assert_eq!(leases.holder(), "b");
    }

    #[tokio::test(start_paused = true)]
    async fn two_candidates_racing_for_a_free_lease_get_one_leader() {
        let leases = FakeLeases::default();
        let mut a = LeaderElector::new(leases.clone(), config("a"));
        let mut b = LeaderElector::new(leases.clone(), config("b"));
        let (ra, rb) = tokio::join!(a.try_acquire_or_renew(), b.try_acquire_or_renew());
        assert!(ra.unwrap() ^ rb.unwrap(), "exactly one wins");
    }
}
