//! The agent's work queue: keys waiting to be reconciled, each at most once, each handled
//! by at most one worker at a time, with per-key backoff after failures.
//!
//! The shape of client-go's and kube-runtime's queues, cut down to what the agent needs:
//! - [`WorkQueue::add`] is for changes (a watch event): the key runs as soon as a worker
//!   is free, even if it is backing off, and once more after the current run if it is
//!   running now, so no change is ever missed.
//! - [`WorkQueue::resync`] is for the periodic resync: it adds the key unless it is already
//!   waiting, running, or backing off after a failure, so a failing key is not retried
//!   faster than its backoff allows.
//! - [`WorkQueue::done`] ends a run: success forgets the key's failures (and may ask to
//!   come back after a while); failure delays its next run exponentially.
//!
//! Keys carry no "what changed": a reconcile looks at the world afresh every time.

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::Hash;
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

/// How long a key waits after consecutive failures: `initial`, doubling, at most `max`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    /// The delay after the first failure.
    pub initial: Duration,
    /// The longest delay.
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(60),
        }
    }
}

impl Backoff {
    /// The delay after `failures` consecutive failures (at least one).
    pub fn delay(&self, failures: u32) -> Duration {
        let doublings = failures.saturating_sub(1).min(20);
        self.initial.saturating_mul(1 << doublings).min(self.max)
    }
}

/// How a run of a key ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Done {
    /// It converged; run it again after this long, or only when something changes.
    Ok(Option<Duration>),
    /// It failed; run it again after its backoff.
    Failed,
}

#[derive(Debug)]
struct State<K> {
    /// Keys waiting for a worker, in order, each once.
    ready: VecDeque<K>,
    /// The keys in `ready`.
    waiting: HashSet<K>,
    /// Keys a worker is running now.
    active: HashSet<K>,
    /// Active keys that changed during their run: they run once more.
    again: HashSet<K>,
    /// Keys that must not run before a time: requeues and backoffs.
    delayed: HashMap<K, Instant>,
    /// Consecutive failures per key.
    failures: HashMap<K, u32>,
    closed: bool,
}

/// A deduplicating, per-key exclusive work queue. Share it behind an `Arc`.
#[derive(Debug)]
pub struct WorkQueue<K> {
    state: Mutex<State<K>>,
    wake: Notify,
    backoff: Backoff,
}

impl<K: Clone + Eq + Hash> WorkQueue<K> {
    /// An empty queue.
    pub fn new(backoff: Backoff) -> Self {
        WorkQueue {
            state: Mutex::new(State {
                ready: VecDeque::new(),
                waiting: HashSet::new(),
                active: HashSet::new(),
                again: HashSet::new(),
                delayed: HashMap::new(),
                failures: HashMap::new(),
                closed: false,
            }),
            wake: Notify::new(),
            backoff,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State<K>> {
        self.state.lock().expect("work queue poisoned")
    }

    /// Something about `key` changed: run it as soon as possible.
    pub fn add(&self, key: K) {
        let mut state = self.lock();
        if state.active.contains(&key) {
            state.again.insert(key);
            return;
        }
        state.delayed.remove(&key);
        push(&mut state, key);
        drop(state);
        self.wake.notify_waiters();
    }

    /// The periodic resync: run `key` unless it waits, runs, or backs off already.
    pub fn resync(&self, key: K) {
        let mut state = self.lock();
        if state.active.contains(&key)
            || state.waiting.contains(&key)
            || (state.failures.contains_key(&key) && state.delayed.contains_key(&key))
        {
            return;
        }
        state.delayed.remove(&key);
        push(&mut state, key);
        drop(state);
        self.wake.notify_waiters();
    }

    /// Runs `key` after `delay`, unless it runs sooner for another reason.
    pub fn add_after(&self, key: K, delay: Duration) {
        let at = Instant::now() + delay;
        let mut state = self.lock();
        if state.waiting.contains(&key) {
            return;
        }
        let entry = state.delayed.entry(key).or_insert(at);
        *entry = (*entry).min(at);
        drop(state);
        self.wake.notify_waiters();
    }

    /// The next key to run, marked as running until [`WorkQueue::done`]; `None` once the
    /// queue is closed.
    pub async fn next(&self) -> Option<K> {
        loop {
            let notified = self.wake.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let wake_at = {
                let mut state = self.lock();
                if state.closed {
                    return None;
                }
                promote_due(&mut state);
                while let Some(key) = state.ready.pop_front() {
                    state.waiting.remove(&key);
                    if state.active.contains(&key) {
                        // Added while running (via a delay): run again after this run.
                        state.again.insert(key);
                        continue;
                    }
                    state.active.insert(key.clone());
                    return Some(key);
                }
                state.delayed.values().min().copied()
            };
            match wake_at {
                Some(at) => {
                    tokio::select! {
                        _ = &mut notified => {}
                        _ = tokio::time::sleep_until(at) => {}
                    }
                }
                None => notified.await,
            }
        }
    }

    /// Ends the run of `key`.
    pub fn done(&self, key: &K, outcome: Done) {
        let mut state = self.lock();
        state.active.remove(key);
        match outcome {
            Done::Ok(requeue) => {
                state.failures.remove(key);
                if let Some(delay) = requeue {
                    let at = Instant::now() + delay;
                    let entry = state.delayed.entry(key.clone()).or_insert(at);
                    *entry = (*entry).min(at);
                }
            }
            Done::Failed => {
                let failures = state.failures.entry(key.clone()).or_insert(0);
                *failures = failures.saturating_add(1);
                let delay = self.backoff.delay(*failures);
                state.delayed.insert(key.clone(), Instant::now() + delay);
            }
        }
        if state.again.remove(key) {
            state.delayed.remove(key);
            push(&mut state, key.clone());
        }
        drop(state);
        self.wake.notify_waiters();
    }

    /// Forgets a key that no longer exists: its failures and any delayed run.
    pub fn forget(&self, key: &K) {
        let mut state = self.lock();
        state.failures.remove(key);
        state.delayed.remove(key);
    }

    /// How many consecutive failures `key` has had.
    pub fn failures(&self, key: &K) -> u32 {
        self.lock().failures.get(key).copied().unwrap_or(0)
    }

    /// Stops handing out keys: every [`WorkQueue::next`] returns `None` from now on.
    pub fn close(&self) {
        self.lock().closed = true;
        self.wake.notify_waiters();
    }

    /// How many keys are running now.
    pub fn running(&self) -> usize {
        self.lock().active.len()
    }
}

fn push<K: Clone + Eq + Hash>(state: &mut State<K>, key: K) {
    if state.waiting.insert(key.clone()) {
        state.ready.push_back(key);
    }
}

fn promote_due<K: Clone + Eq + Hash>(state: &mut State<K>) {
    let now = Instant::now();
    let due: Vec<K> = state
        .delayed
        .iter()
        .filter(|(_, at)| **at <= now)
        .map(|(key, _)| key.clone())
        .collect();
    for key in due {
        state.delayed.remove(&key);
        if state.active.contains(&key) {
            state.again.insert(key);
        } else {
            push(state, key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queue() -> WorkQueue<&'static str> {
        WorkQueue::new(Backoff {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(8),
        })
    }

    async fn next_now(q: &WorkQueue<&'static str>) -> Option<&'static str> {
        tokio::time::timeout(Duration::from_millis(1), q.next())
            .await
            .ok()
            .flatten()
    }

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        let b = Backoff {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(8),
        };
        let delays: Vec<u64> = (1..=6).map(|n| b.delay(n).as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 8, 8, 8]);
        assert_eq!(b.delay(u32::MAX), Duration::from_secs(8));
    }

    #[tokio::test(start_paused = true)]
    async fn a_key_waits_once_however_often_it_is_added() {
        let q = queue();
        q.add("a");
        q.add("b");
        q.add("a");
        q.resync("a");
        assert_eq!(next_now(&q).await, Some("a"));
        assert_eq!(next_now(&q).await, Some("b"));
        assert_eq!(next_now(&q).await, None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_running_key_is_not_handed_out_twice_but_runs_again_after_a_change() {
        let q = queue();
        q.add("a");
        assert_eq!(next_now(&q).await, Some("a"));
        q.add("a");
        // Still running: nobody else gets it.
        assert_eq!(next_now(&q).await, None);
        q.done(&"a", Done::Ok(None));
        assert_eq!(next_now(&q).await, Some("a"));
        q.done(&"a", Done::Ok(None));
        assert_eq!(next_now(&q).await, None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_resync_during_a_run_adds_nothing() {
        let q = queue();
        q.add("a");
        assert_eq!(next_now(&q).await, Some("a"));
        q.resync("a");
        q.done(&"a", Done::Ok(None));
        assert_eq!(next_now(&q).await, None);
    }

    #[tokio::test(start_paused = true)]
    async fn failures_back_off_and_resyncs_respect_the_backoff() {
        let q = queue();
        q.add("a");
        assert_eq!(q.next().await, Some("a"));
        q.done(&"a", Done::Failed);
        let before = Instant::now();
        q.resync("a");
        assert_eq!(
            next_now(&q).await,
            None,
            "a resync must not skip the backoff"
        );
        assert_eq!(q.next().await, Some("a"));
        assert_eq!(Instant::now() - before, Duration::from_secs(1));
        q.done(&"a", Done::Failed);
        let before = Instant::now();
        assert_eq!(q.next().await, Some("a"));
        assert_eq!(Instant::now() - before, Duration::from_secs(2));
        assert_eq!(q.failures(&"a"), 2);
        q.done(&"a", Done::Ok(None));
        assert_eq!(q.failures(&"a"), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_change_cuts_a_backoff_short() {
        let q = queue();
        q.add("a");
        assert_eq!(q.next().await, Some("a"));
        q.done(&"a", Done::Failed);
        q.add("a");
        assert_eq!(next_now(&q).await, Some("a"));
    }

    #[tokio::test(start_paused = true)]
    async fn requeue_after_brings_a_key_back() {
        let q = queue();
        q.add("a");
        assert_eq!(q.next().await, Some("a"));
        q.done(&"a", Done::Ok(Some(Duration::from_secs(5))));
        let before = Instant::now();
        assert_eq!(q.next().await, Some("a"));
        assert_eq!(Instant::now() - before, Duration::from_secs(5));
    }

    #[tokio::test(start_paused = true)]
    async fn closing_releases_every_waiting_worker() {
        let q = std::sync::Arc::new(queue());
        let waiter = tokio::spawn({
            let q = q.clone();
            async move { q.next().await }
        });
        tokio::task::yield_now().await;
        q.close();
        assert_eq!(waiter.await.unwrap(), None);
    }
}
