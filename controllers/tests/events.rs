//! The event recorder against an in-process apiserver: a storm over the rate limit is
//! written late but whole, as one Event.

mod common;

use std::time::Duration;

use common::{Cloud, eventually};
use ferro_api::v1;
use ferro_runtime::events::{RateLimit, Recorder};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_over_the_rate_limit_is_held_not_lost() {
    let cloud = Cloud::start().await;
    let network = cloud.network("net", "10.40.0.0/24").await;
    let recorder = Recorder::new(cloud.api().client().clone(), "network-controller")
        .with_rate_limit(RateLimit {
            burst: 3,
            refill: Duration::from_secs(2),
        });
    for left in (1..=20).rev() {
        recorder
            .normal(
                &network,
                "DeletionWaitsForPorts",
                &format!("deletion waits for {left} ports"),
            )
            .await;
    }
    let counts = || async {
        cloud
            .list::<v1::Event>()
            .await
            .into_iter()
            .filter_map(|e| e.spec)
            .filter(|s| s.reason == "DeletionWaitsForPorts")
            .map(|s| (s.count, s.message))
            .collect::<Vec<_>>()
    };
    let early = counts().await;
    assert_eq!(early.len(), 1, "{early:?}");
    assert!(
        early[0].0 < 20,
        "only the burst is written at once: {early:?}"
    );
    let (count, message) = eventually("the held occurrences written", || async {
        counts().await.into_iter().find(|(count, _)| *count == 20)
    })
    .await;
    assert_eq!(count, 20);
    assert_eq!(
        message,
        "(combined from similar events): deletion waits for 1 ports"
    );
}
