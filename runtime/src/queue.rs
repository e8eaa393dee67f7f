//! The work queue: keys waiting to be reconciled, generic over the key type ([`Key`]).
//!
//! Its rules, as client-go's workqueue has them:
//! - a key waiting in the queue is held once, however many times it is added;
//! - a key being reconciled is never handed out again until `done`; adding it meanwhile
//!   marks it dirty and it runs again right after;
//! - `add_after` delays a key (keeping the earliest deadline when delayed twice);
//! - a failed reconcile backs the key off exponentially; a success resets that;
//! - [`WorkQueue::add`] is for changes and cuts a backoff short, while
//!   [`WorkQueue::resync`] is for the periodic resync and leaves a key that waits, runs or
//!   backs off alone;
//! - [`WorkQueue::close`] stops handing out keys, for a graceful shutdown.

use std::{
    cmp::Reverse,
    collections::{BinaryHeap, HashMap, HashSet, VecDeque},
    sync::Mutex,
    time::Duration,
};

use tokio::{sync::Notify, time::Instant};

use super::{Key, ObjectRef};

/// Exponential per-key backoff: `base`, `2·base`, `4·base`, … up to `max`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    /// The delay after the first failure.
    pub base: Duration,
    /// The longest delay.
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        // Conflicts clear within milliseconds; a broken dependency should not be hammered.
        Backoff {
            base: Duration::from_millis(10),
            max: Duration::from_secs(60),
        }
    }
}

impl Backoff {
    /// The delay after the `failures`-th failure in a row (1-based).
    pub fn delay(&self, failures: u32) -> Duration {
        let shift = failures.saturating_sub(1).min(30);
        self.base.saturating_mul(1u32 << shift).min(self.max)
    }
}

struct State<K> {
    ready: VecDeque<K>,
    queued: HashSet<K>,
    running: HashSet<K>,
    dirty: HashSet<K>,
    delayed: BinaryHeap<Reverse<(Instant, u64, K)>>,
    delayed_until: HashMap<K, Instant>,
    failures: HashMap<K, u32>,
    sequence: u64,
    closed: bool,
}

impl<K> Default for State<K> {
    fn default() -> Self {
        State {
            ready: VecDeque::new(),
            queued: HashSet::new(),
            running: HashSet::new(),
            dirty: HashSet::new(),
            delayed: BinaryHeap::new(),
            delayed_until: HashMap::new(),
            failures: HashMap::new(),
            sequence: 0,
            closed: false,
        }
    }
}

impl<K: Key> State<K> {
    /// Makes a key ready unless it is already waiting; a running key turns dirty instead.
    fn push(&mut self, key: K) -> bool {
        if self.running.contains(&key) {
            self.dirty.insert(key);
            return false;
        }
        if self.queued.insert(key.clone()) {
            self.delayed_until.remove(&key);
            self.ready.push_back(key);
            return true;
        }
        false
    }

    /// Moves due delayed keys to the ready list; returns the next deadline.
    fn promote(&mut self, now: Instant) -> Option<Instant> {
        while let Some(Reverse((at, _, _))) = self.delayed.peek() {
            if *at > now {
                return Some(*at);
            }
            let Reverse((at, _, key)) = self.delayed.pop().expect("peeked");
            // A stale heap entry: the key was made ready or re-delayed since.
            if self.delayed_until.get(&key) != Some(&at) {
                continue;
            }
            self.delayed_until.remove(&key);
            self.push(key);
        }
        None
    }
}

/// A deduplicating, delaying work queue of keys: object references for the controllers,
/// Server uids for the agent.
pub struct WorkQueue<K = ObjectRef> {
    state: Mutex<State<K>>,
    notify: Notify,
    backoff: Backoff,
}

/// How a reconcile ended, for [`WorkQueue::done`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Succeeded; run again after this delay, if any.
    Success(Option<Duration>),
    /// Failed; back off.
    Failure,
}

impl<K: Key> WorkQueue<K> {
    /// An empty queue.
    pub fn new(backoff: Backoff) -> Self {
        WorkQueue {
            state: Mutex::new(State::default()),
            notify: Notify::new(),
            backoff,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State<K>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a key to run as soon as possible: something about it changed. A key backing
    /// off runs now; a running key runs once more after its current run.
    pub fn add(&self, key: K) {
        if self.lock().push(key) {
            self.notify.notify_waiters();
        }
    }

    /// Queues a key for the periodic resync: unlike [`WorkQueue::add`], a key already
    /// waiting, running, or backing off after a failure is left as it is, so a resync
    /// never retries a failing key faster than its backoff allows.
    pub fn resync(&self, key: K) {
        let mut state = self.lock();
        if state.running.contains(&key)
            || state.queued.contains(&key)
            || (state.failures.contains_key(&key) && state.delayed_until.contains_key(&key))
        {
            return;
        }
        if state.push(key) {
            drop(state);
            self.notify.notify_waiters();
        }
    }

    /// Queues a key to run after `delay`; an earlier deadline already set wins.
    pub fn add_after(&self, key: K, delay: Duration) {
        if delay.is_zero() {
            return self.add(key);
        }
        let at = Instant::now() + delay;
        let mut state = self.lock();
        if state.queued.contains(&key) || state.delayed_until.get(&key).is_some_and(|t| *t <= at) {
            return;
        }
        state.sequence += 1;
        let sequence = state.sequence;
        state.delayed_until.insert(key.clone(), at);
        state.delayed.push(Reverse((at, sequence, key)));
        drop(state);
        // The waiter may be sleeping until a later deadline.
        self.notify.notify_waiters();
    }

    /// Waits for the next key to reconcile and marks it running; `None` once the queue is
    /// closed.
    pub async fn next(&self) -> Option<K> {
        loop {
            // Registered before the state is looked at, so a key added between the unlock
            // below and the wait is not missed, whatever the number of consumers.
            let notified = self.notify.notified();
            let mut notified = std::pin::pin!(notified);
            notified.as_mut().enable();
            let deadline = {
                let mut state = self.lock();
                if state.closed {
                    return None;
                }
                let deadline = state.promote(Instant::now());
                if let Some(key) = state.ready.pop_front() {
                    state.queued.remove(&key);
                    state.running.insert(key.clone());
                    return Some(key);
                }
                deadline
            };
            match deadline {
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

    /// Marks a key no longer running, requeueing it as its outcome asks.
    pub fn done(&self, key: K, outcome: Outcome) {
        let delay = {
            let mut state = self.lock();
            state.running.remove(&key);
            let delay = match outcome {
                Outcome::Success(after) => {
                    state.failures.remove(&key);
                    after
                }
                Outcome::Failure => {
                    let failures = state.failures.entry(key.clone()).or_default();
                    *failures = failures.saturating_add(1);
                    Some(self.backoff.delay(*failures))
                }
            };
            if state.dirty.remove(&key) && state.push(key.clone()) {
                self.notify.notify_waiters();
            }
            delay
        };
        if let Some(delay) = delay {
            self.add_after(key, delay);
        }
    }

    /// Stops handing out keys: every [`WorkQueue::next`], waiting or to come, returns
    /// `None`. Running keys may still be marked [`WorkQueue::done`].
    pub fn close(&self) {
        self.lock().closed = true;
        self.notify.notify_waiters();
    }

    /// Keys ready to run now (plus those that changed while running).
    pub fn depth(&self) -> usize {
        let state = self.lock();
        state.ready.len() + state.dirty.len()
    }

    /// Keys waiting for a delay or a backoff to pass.
    pub fn delayed(&self) -> usize {
        self.lock().delayed_until.len()
    }

    /// Keys being reconciled now.
    pub fn running(&self) -> usize {
        self.lock().running.len()
    }

    /// How many times in a row the key has failed.
    pub fn failures(&self, key: &K) -> u32 {
        self.lock().failures.get(key).copied().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferro_api::Kind;

    fn key(name: &str) -> ObjectRef {
        ObjectRef::new(Kind::Port, "default", name)
    }

    async fn next_now(queue: &WorkQueue) -> Option<ObjectRef> {
        tokio::time::timeout(Duration::from_millis(1), queue.next())
            .await
            .ok()
            .flatten()
    }

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        let b = Backoff {
            base: Duration::from_millis(10),
            max: Duration::from_millis(100),
        };
        let delays: Vec<u128> = (1..=6).map(|n| b.delay(n).as_millis()).collect();
        assert_eq!(delays, vec![10, 20, 40, 80, 100, 100]);
        assert_eq!(b.delay(u32::MAX), Duration::from_millis(100));
    }

    #[tokio::test(start_paused = true)]
    async fn keys_are_deduplicated() {
        let q = WorkQueue::new(Backoff::default());
        q.add(key("a"));
        q.add(key("a"));
        q.add(key("b"));
        assert_eq!(q.depth(), 2);
        assert_eq!(next_now(&q).await, Some(key("a")));
        assert_eq!(next_now(&q).await, Some(key("b")));
        assert_eq!(next_now(&q).await, None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_running_key_is_not_handed_out_twice_but_reruns_when_done() {
        let q = WorkQueue::new(Backoff::default());
        q.add(key("a"));
        let k = next_now(&q).await.unwrap();
        q.add(key("a"));
        q.add(key("a"));
        assert_eq!(next_now(&q).await, None, "a is running");
        q.done(k, Outcome::Success(None));
        assert_eq!(
            next_now(&q).await,
            Some(key("a")),
            "it changed while running: once more"
        );
        q.done(key("a"), Outcome::Success(None));
        assert_eq!(next_now(&q).await, None);
    }

    #[tokio::test(start_paused = true)]
    async fn failures_back_off_exponentially_and_success_resets() {
        let backoff = Backoff {
            base: Duration::from_millis(10),
            max: Duration::from_secs(1),
        };
        let q = WorkQueue::new(backoff);
        q.add(key("a"));
        q.next().await;
        let mut waits = Vec::new();
        for _ in 0..5 {
            q.done(key("a"), Outcome::Failure);
            let start = Instant::now();
            q.next().await;
            waits.push(start.elapsed().as_millis());
        }
        assert_eq!(waits, vec![10, 20, 40, 80, 160]);
        assert_eq!(q.failures(&key("a")), 5);
        q.done(key("a"), Outcome::Success(None));
        assert_eq!(q.failures(&key("a")), 0);
        q.add(key("a"));
        let k = q.next().await.unwrap();
        q.done(k, Outcome::Failure);
        let start = Instant::now();
        q.next().await;
        assert_eq!(
            start.elapsed(),
            Duration::from_millis(10),
            "reset to the base delay"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn delayed_requeue_waits_and_the_earliest_deadline_wins() {
        let q = WorkQueue::new(Backoff::default());
        let start = Instant::now();
        q.add_after(key("a"), Duration::from_secs(5));
        q.add_after(key("a"), Duration::from_secs(9));
        q.add_after(key("b"), Duration::from_secs(2));
        assert_eq!(q.delayed(), 2);
        assert_eq!(q.next().await.unwrap(), key("b"));
        assert_eq!(start.elapsed(), Duration::from_secs(2));
        assert_eq!(q.next().await.unwrap(), key("a"));
        assert_eq!(start.elapsed(), Duration::from_secs(5));
        q.done(key("a"), Outcome::Success(None));
        assert_eq!(
            next_now(&q).await,
            None,
            "the later deadline was merged away"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_immediate_add_overtakes_a_delay() {
        let q = WorkQueue::new(Backoff::default());
        q.add_after(key("a"), Duration::from_secs(60));
        q.add(key("a"));
        assert_eq!(next_now(&q).await, Some(key("a")));
        q.done(key("a"), Outcome::Success(Some(Duration::from_secs(1))));
        let start = Instant::now();
        assert_eq!(q.next().await.unwrap(), key("a"));
        assert_eq!(
            start.elapsed(),
            Duration::from_secs(1),
            "requeue-after is honoured"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiting_consumer_wakes_on_add() {
        let q = std::sync::Arc::new(WorkQueue::new(Backoff::default()));
        let waiter = tokio::spawn({
            let q = q.clone();
            async move { q.next().await }
        });
        tokio::task::yield_now().await;
        q.add(key("z"));
        assert_eq!(waiter.await.unwrap(), Some(key("z")));
    }

    #[tokio::test(start_paused = true)]
    async fn a_resync_during_a_run_adds_nothing() {
        let q = WorkQueue::new(Backoff::default());
        q.add(key("a"));
        assert_eq!(next_now(&q).await, Some(key("a")));
        q.resync(key("a"));
        q.done(key("a"), Outcome::Success(None));
        assert_eq!(
            next_now(&q).await,
            None,
            "unlike a change, a resync is not owed a rerun"
        );
        q.resync(key("a"));
        q.resync(key("a"));
        assert_eq!(next_now(&q).await, Some(key("a")), "an idle key resyncs");
        assert_eq!(next_now(&q).await, None, "once");
    }

    #[tokio::test(start_paused = true)]
    async fn a_resync_respects_a_backoff_that_a_change_cuts_short() {
        let q = WorkQueue::new(Backoff {
            base: Duration::from_secs(1),
            max: Duration::from_secs(8),
        });
        q.add(key("a"));
        q.next().await;
        q.done(key("a"), Outcome::Failure);
        let start = Instant::now();
        q.resync(key("a"));
        assert_eq!(
            next_now(&q).await,
            None,
            "a resync must not skip the backoff"
        );
        assert_eq!(q.next().await, Some(key("a")));
        assert_eq!(start.elapsed(), Duration::from_secs(1));
        q.done(key("a"), Outcome::Failure);
        q.add(key("a"));
        assert_eq!(next_now(&q).await, Some(key("a")), "a change runs at once");
    }

    #[tokio::test(start_paused = true)]
    async fn keys_of_any_type_queue_alike() {
        let q = WorkQueue::<String>::new(Backoff::default());
        q.add("uid-1".to_owned());
        q.add_after("uid-2".to_owned(), Duration::from_secs(1));
        q.add("uid-1".to_owned());
        assert_eq!(q.next().await.as_deref(), Some("uid-1"));
        assert_eq!(q.next().await.as_deref(), Some("uid-2"));
    }

    #[tokio::test(start_paused = true)]
    async fn closing_releases_every_waiting_consumer() {
        let q = std::sync::Arc::new(WorkQueue::<ObjectRef>::new(Backoff::default()));
        let waiters: Vec<_> = (0..3)
            .map(|_| {
                let q = q.clone();
                tokio::spawn(async move { q.next().await })
            })
            .collect();
        tokio::task::yield_now().await;
        q.add(key("a"));
        q.close();
        let mut got = Vec::new();
        for waiter in waiters {
            got.push(waiter.await.unwrap());
        }
        assert!(
            got.iter().all(Option::is_none),
            "closed before they looked: {got:?}"
        );
        assert_eq!(next_now(&q).await, None, "closed for good");
    }
}
