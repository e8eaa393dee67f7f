//! Ferro's one backoff policy, and the named retry schedules built from it.
//!
//! Every loop that retries something that failed (reconnecting to the apiserver, a cache
//! listing its store again, a supervisor restarting a crashed child, a download resuming
//! after a cut) takes its delays from one of these builders instead of doubling a
//! `Duration` by hand. They all double from a first delay up to a ceiling and add jitter
//! (up to the delay again), so that many agents or controllers that lost the apiserver
//! at the same moment do not all come back at the same moment.
//!
//! A builder is a [`backon::ExponentialBuilder`]: use it with backon's `Retryable` for
//! a one-shot operation, or [`BackoffBuilder::build`] it into a [`Backoff`] (an iterator
//! of delays) for a loop that runs forever and starts the schedule over after a success.
//! Unless a builder says otherwise, its delays never run out.
//!
//! The work queues' per-key requeue delays are a scheduler, not a retry loop, and are not
//! built from here.

use std::time::Duration;

pub use backon::{BackoffBuilder, ExponentialBuilder};

/// The delays of one schedule, in order: what [`BackoffBuilder::build`] returns.
pub type Backoff = <ExponentialBuilder as BackoffBuilder>::Backoff;

/// Doubling from `first` to `ceiling`, with jitter, without end.
const fn doubling(first: Duration, ceiling: Duration) -> ExponentialBuilder {
    ExponentialBuilder::new()
        .with_jitter()
        .with_factor(2.0)
        .with_min_delay(first)
        .with_max_delay(ceiling)
        .without_max_times()
}

/// Reaching the apiserver again after a call or stream failed: registering a node,
/// reopening a watch of it, reopening the console tunnel. 0.5 s doubling to 10 s.
pub const fn reconnect_to_apiserver() -> ExponentialBuilder {
    doubling(Duration::from_millis(500), Duration::from_secs(10))
}

/// A cache of a kind (the apiserver's watch cache over the store, a controller's
/// reflector) listing and watching again after its watch failed. Quick at first, since
/// readers wait for the cache meanwhile: 0.1 s doubling to 5 s.
pub const fn restart_watch() -> ExponentialBuilder {
    doubling(Duration::from_millis(100), Duration::from_secs(5))
}

/// Restarting a crashed child process of `ferro up`: 1 s doubling to 30 s, so that a
/// child that crashes at once does not spin.
pub const fn restart_child() -> ExponentialBuilder {
    doubling(Duration::from_secs(1), Duration::from_secs(30))
}

/// Reconnecting a cut image download (which resumes where it stopped). Four retries,
/// 0.2 s doubling, then the fetch fails and the image's next fetch starts over.
pub const fn resume_download() -> ExponentialBuilder {
    doubling(Duration::from_millis(200), Duration::from_secs(5)).with_max_times(4)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The delays' bounds: each delay lies in `[base, 2 * base)` of a doubling base.
    fn assert_doubles_with_jitter(policy: ExponentialBuilder, first: Duration, ceiling: Duration) {
        let mut base = first;
        for (i, delay) in policy.build().take(20).enumerate() {
            assert!(
                delay >= base && delay <= base * 2,
                "delay {i} is {delay:?}, not within jitter of {base:?}"
            );
            base = (base * 2).min(ceiling);
        }
    }

    #[test]
    fn schedules_double_to_their_ceiling_with_jitter_and_never_end() {
        assert_doubles_with_jitter(
            reconnect_to_apiserver(),
            Duration::from_millis(500),
            Duration::from_secs(10),
        );
        assert_doubles_with_jitter(
            restart_watch(),
            Duration::from_millis(100),
            Duration::from_secs(5),
        );
        assert_doubles_with_jitter(
            restart_child(),
            Duration::from_secs(1),
            Duration::from_secs(30),
        );
        assert_eq!(restart_child().build().take(1000).count(), 1000);
    }

    #[test]
    fn a_download_gives_up_after_four_retries() {
        let delays: Vec<_> = resume_download().build().collect();
        assert_eq!(delays.len(), 4);
        assert!(delays[3] >= Duration::from_millis(1600), "{delays:?}");
    }

    #[test]
    fn jitter_spreads_clients_that_failed_together() {
        let firsts: std::collections::BTreeSet<_> = (0..16)
            .map(|_| reconnect_to_apiserver().build().nth(3).unwrap())
            .collect();
        assert!(firsts.len() > 1, "16 clients all waited {firsts:?}");
    }
}
