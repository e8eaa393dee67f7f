//! Leader election with two `ferro controllers` instances in one process: only the leader
//! reconciles; when it dies (its task aborted: it stops renewing, as after SIGKILL) the
//! standby takes over within the lease duration.

mod common;

use std::{net::SocketAddr, time::Duration};

use common::{Cloud, decided, eventually};
use ferro_api::v1;
use ferro_controllers::{ControllersConfig, run};
use futures::FutureExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const LEASE: Duration = Duration::from_secs(3);

fn free_addr() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap()
}

fn instance(cloud: &Cloud, identity: &str, metrics: SocketAddr) -> tokio::task::JoinHandle<()> {
    let mut config = ControllersConfig::new(cloud.address.clone(), "controllers-token");
    config.identity = identity.into();
    config.metrics_addr = Some(metrics);
    config.lease_duration = LEASE;
    config.shutdown = Some(std::future::pending::<()>().boxed());
    tokio::spawn(async move { run(config).await.expect("controllers run") })
}

async fn scrape(addr: SocketAddr) -> String {
    let mut socket = tokio::net::TcpStream::connect(addr)
        .await
        .expect("metrics endpoint");
    socket
        .write_all(b"GET /metrics HTTP/1.0\r\n\r\n")
        .await
        .unwrap();
    let mut body = String::new();
    socket.read_to_string(&mut body).await.unwrap();
    body
}

fn metric(text: &str, line_start: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

async fn holder(cloud: &Cloud) -> Option<String> {
    let lease = cloud
        .admin
        .get_typed::<v1::Lease>("", "controllers")
        .await
        .ok()?;
    lease.spec.map(|s| s.holder_identity)
}

async fn addressed_ports(cloud: &Cloud, prefix: &str, count: usize) {
    for i in 0..count {
        cloud.port(&format!("{prefix}{i}"), "net").await;
    }
    eventually("ports addressed", || async {
        let ports = cloud.list::<v1::Port>().await;
        ports
            .iter()
            .filter(|p| common::name(*p).starts_with(prefix))
            .all(decided)
            .then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_leader_reconciles_and_the_standby_takes_over() {
    let cloud = Cloud::start().await;
    let (metrics_a, metrics_b) = (free_addr(), free_addr());
    let a = instance(&cloud, "a", metrics_a);
    eventually("a leads", || async {
        (holder(&cloud).await.as_deref() == Some("a")).then_some(())
    })
    .await;
    let b = instance(&cloud, "b", metrics_b);
    cloud.network("net", "10.30.0.0/24").await;
    addressed_ports(&cloud, "first-", 5).await;

    let text_a = scrape(metrics_a).await;
    let text_b = eventually("b serving metrics", || async {
        let text = scrape(metrics_b).await;
        metric(&text, "ferro_controllers_leader").map(|_| text)
    })
    .await;
    assert_eq!(metric(&text_a, "ferro_controllers_leader"), Some(1.0));
    assert_eq!(metric(&text_b, "ferro_controllers_leader"), Some(0.0));
    assert!(
        metric(
            &text_a,
            "ferro_controller_reconciles_total{controller=\"ipam\"}"
        )
        .unwrap_or(0.0)
            > 0.0
    );
    assert!(
        !text_b.contains("ferro_controller_reconciles_total"),
        "the standby reconciles nothing:\n{text_b}"
    );
    assert!(
        text_a.contains("ferro_controller_queue_depth{controller=\"ipam\"}"),
        "{text_a}"
    );
    assert!(
        text_a.contains(
            "ferro_controller_reconcile_duration_seconds_bucket{controller=\"ipam\",le=\"+Inf\"}"
        ),
        "{text_a}"
    );
    assert_eq!(
        holder(&cloud).await.as_deref(),
        Some("a"),
        "still a after a few renewals"
    );

    // a dies without a word: it stops renewing.
    a.abort();
    let died = tokio::time::Instant::now();
    eventually("b leads", || async {
        (holder(&cloud).await.as_deref() == Some("b")).then_some(())
    })
    .await;
    let took = died.elapsed();
    println!("b took over {took:?} after a died (lease {LEASE:?})");
    // The lease's promise: about one lease duration, plus the standby's polling period.
    assert!(took < Duration::from_secs(15), "took {took:?}");
    addressed_ports(&cloud, "second-", 5).await;
    let text_b = scrape(metrics_b).await;
    assert_eq!(metric(&text_b, "ferro_controllers_leader"), Some(1.0));
    let lease = cloud
        .admin
        .get_typed::<v1::Lease>("", "controllers")
        .await
        .unwrap();
    assert_eq!(lease.spec.unwrap().lease_transitions, 1);
    b.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_shutdown_hands_over_at_once() {
    let cloud = Cloud::start().await;
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let mut config = ControllersConfig::new(cloud.address.clone(), "controllers-token");
    config.identity = "a".into();
    config.lease_duration = Duration::from_secs(30);
    config.shutdown = Some(
        async move {
            let _ = rx.await;
        }
        .boxed(),
    );
    let a = tokio::spawn(async move { run(config).await.expect("controllers run") });
    eventually("a leads", || async {
        (holder(&cloud).await.as_deref() == Some("a")).then_some(())
    })
    .await;
    let _ = tx.send(());
    a.await.unwrap();
    assert_eq!(
        holder(&cloud).await.as_deref(),
        Some(""),
        "released, not left to expire"
    );
    let mut config = ControllersConfig::new(cloud.address.clone(), "controllers-token");
    config.identity = "b".into();
    config.lease_duration = Duration::from_secs(30);
    config.shutdown = Some(std::future::pending::<()>().boxed());
    let b = tokio::spawn(async move { run(config).await.expect("controllers run") });
    // Far sooner than the 30 s lease: the released lease is free.
    let started = tokio::time::Instant::now();
    eventually("b leads", || async {
        (holder(&cloud).await.as_deref() == Some("b")).then_some(())
    })
    .await;
    assert!(started.elapsed() < Duration::from_secs(20));
    b.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_under_the_same_identity_takes_its_own_lease_at_once() {
    let cloud = Cloud::start().await;
    let start = |identity: &str| {
        let mut config = ControllersConfig::new(cloud.address.clone(), "controllers-token");
        config.identity = identity.into();
        config.lease_duration = Duration::from_secs(30);
        config.shutdown = Some(std::future::pending::<()>().boxed());
        tokio::spawn(async move { run(config).await.expect("controllers run") })
    };
    let a = start("host-ferro-up");
    eventually("a leads", || async {
        (holder(&cloud).await.as_deref() == Some("host-ferro-up")).then_some(())
    })
    .await;
    let standby = start("other-host");
    // a dies without releasing (as after SIGKILL); its successor has the same identity.
    a.abort();
    let restarted = tokio::time::Instant::now();
    let again = start("host-ferro-up");
    cloud.network("net", "10.31.0.0/24").await;
    addressed_ports(&cloud, "after-restart-", 3).await;
    let took = restarted.elapsed();
    println!("ports addressed {took:?} after the restart (lease 30s)");
    assert!(
        took < Duration::from_secs(10),
        "the restarted instance waited for its own lease: {took:?}"
    );
    assert_eq!(
        holder(&cloud).await.as_deref(),
        Some("host-ferro-up"),
        "the standby on another host still waits for the full lease"
    );
    standby.abort();
    again.abort();
}
