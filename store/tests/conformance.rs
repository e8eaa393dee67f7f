//! The store conformance suite: one set of tests, run against the in-memory backend and
//! against a real etcd, so the two stay interchangeable.
//!
//! Each test is a function over `Arc<dyn Store>`; `conformance!` instantiates it once per
//! backend. The etcd variant starts its own etcd on tmpfs through `EtcdProcess`, which kills
//! it and removes its data when dropped, whether the test passed or panicked.
//!
//! Both backends start at revision 1 (a fresh etcd's), so tests assert exact revisions: the
//! memory backend must bump revisions exactly where etcd does. Waits are bounded by generous
//! deadlines and no test asserts on elapsed time, so a loaded machine slows the suite down
//! but does not fail it.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use ferro_store::{
    Compare, CompareOp, CompareTarget, EventKind, KeyRange, KeyValue, LeaseId, MAX_TXN_OPS,
    MIN_LEASE_TTL, RangeRequest, RangeResponse, Revision, Store, StoreError, Txn, TxnOp,
    TxnOpResponse, TxnResponse, WatchEvent, WatchRequest, WatchStream,
};
use futures::StreamExt;

type Backend = Arc<dyn Store>;

/// How long to wait for a watch event or a lease expiry before calling it lost.
const PATIENCE: Duration = Duration::from_secs(30);

macro_rules! conformance {
    ($($test:ident),* $(,)?) => {
        mod memory_backend {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() -> anyhow::Result<()> {
                    super::$test(std::sync::Arc::new(ferro_store::memory::MemoryStore::new())).await
                }
            )*
        }
        mod etcd_backend {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() -> anyhow::Result<()> {
                    super::with_etcd(super::$test).await
                }
            )*
        }
    };
}

conformance!(
    put_and_delete_keep_etcd_bookkeeping,
    writes_that_change_nothing_do_not_bump_the_revision,
    prefix_range_pages_through_a_historic_revision,
    txn_compares_each_field,
    txn_reads_see_earlier_writes_of_the_same_txn,
    racing_compare_and_swap_has_one_winner_per_round,
    delete_range_deletes_in_one_revision_with_previous_values,
    watch_replays_history_then_delivers_live_events,
    watch_without_previous_values_carries_none,
    watch_resumes_after_reconnect_without_gap_or_duplicate,
    watch_from_a_future_revision_waits_for_it,
    compaction_fails_reads_and_watches_below_it,
    reading_the_future_fails,
    expired_lease_deletes_its_keys,
    keep_alive_extends_a_lease,
    revoke_deletes_keys_at_once,
    malformed_requests_are_rejected,
    progress_notice_follows_every_event_up_to_its_revision,
);

/// Runs `test` against a fresh etcd on tmpfs, stopped and removed afterwards.
async fn with_etcd<F, Fut>(test: F) -> Result<()>
where
    F: FnOnce(Backend) -> Fut,
    Fut: Future<Output = Result<()>>,
{
    use ferro_store::etcd::EtcdStore;
    use ferro_store::etcd_process::{EtcdOptions, EtcdProcess};
    let etcd = EtcdProcess::start(EtcdOptions::throwaway()).await?;
    let store = EtcdStore::connect(&[etcd.client_url().to_owned()]).await?;
    let result = test(Arc::new(store)).await;
    if result.is_err() {
        eprintln!("etcd log, last lines:\n{}", etcd.log_tail(30));
    }
    result
}

// ---- helpers ----

fn put_op(key: &str, value: &str) -> TxnOp {
    TxnOp::Put {
        key: key.into(),
        value: value.into(),
        lease: None,
    }
}

/// An unconditional transaction.
fn only(ops: Vec<TxnOp>) -> Txn {
    Txn {
        success: ops,
        ..Txn::default()
    }
}

async fn write(store: &Backend, ops: Vec<TxnOp>) -> Result<TxnResponse> {
    Ok(store.txn(only(ops)).await?)
}

async fn put(store: &Backend, key: &str, value: &str) -> Result<Revision> {
    Ok(write(store, vec![put_op(key, value)]).await?.revision)
}

async fn put_leased(store: &Backend, key: &str, lease: LeaseId) -> Result<Revision> {
    let op = TxnOp::Put {
        key: key.into(),
        value: b"leased".to_vec(),
        lease: Some(lease),
    };
    Ok(write(store, vec![op]).await?.revision)
}

fn kv(key: &str, value: &str, create: Revision, modified: Revision, version: i64) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: value.into(),
        create_revision: create,
        mod_revision: modified,
        version,
        lease: None,
    }
}

fn prefix(p: &str) -> KeyRange {
    KeyRange::Prefix(p.into())
}

async fn watch(store: &Backend, range: KeyRange, start: Option<Revision>) -> Result<WatchStream> {
    Ok(store
        .watch(WatchRequest {
            range,
            start_revision: start,
            prev_values: true,
        })
        .await?)
}

/// The next `n` events, across as many batches as they come in; fails if a batch brings
/// more than `n`.
async fn next_events(stream: &mut WatchStream, n: usize) -> Result<Vec<WatchEvent>> {
    let mut events = Vec::new();
    while events.len() < n {
        let batch = tokio::time::timeout(PATIENCE, stream.next())
            .await
            .with_context(|| format!("no event after {PATIENCE:?}; have {events:?}"))?
            .context("watch stream ended")??;
        for event in &batch.events {
            ensure!(
                event.kv.mod_revision <= batch.revision,
                "event at {} in a batch at {}",
                event.kv.mod_revision,
                batch.revision
            );
        }
        events.extend(batch.events);
    }
    ensure!(events.len() == n, "expected {n} events, got {events:#?}");
    Ok(events)
}

/// Writes a marker key inside the watched range and checks that it is the very next event:
/// nothing was delivered twice or late.
async fn expect_nothing_more(
    store: &Backend,
    stream: &mut WatchStream,
    marker: &str,
) -> Result<()> {
    let revision = put(store, marker, "marker").await?;
    let events = next_events(stream, 1).await?;
    ensure!(
        events[0].kv.key == marker && events[0].kv.mod_revision == revision,
        "expected only the marker at {revision}, got {events:#?}"
    );
    Ok(())
}

fn summary(events: &[WatchEvent]) -> Vec<(EventKind, String, Revision)> {
    events
        .iter()
        .map(|e| (e.kind, e.kv.key.clone(), e.kv.mod_revision))
        .collect()
}

fn keys(response: &RangeResponse) -> Vec<&str> {
    response.kvs.iter().map(|kv| kv.key.as_str()).collect()
}

// ---- the suite ----

async fn put_and_delete_keep_etcd_bookkeeping(store: Backend) -> Result<()> {
    assert_eq!(
        store.current_revision().await?,
        1,
        "a fresh store is at revision 1"
    );

    let created = write(&store, vec![put_op("/a", "1")]).await?;
    assert_eq!(created.revision, 2);
    assert!(created.succeeded);
    assert_eq!(created.responses, [TxnOpResponse::Put { prev: None }]);
    assert_eq!(store.get("/a").await?, Some(kv("/a", "1", 2, 2, 1)));

    let updated = write(&store, vec![put_op("/a", "2")]).await?;
    assert_eq!(updated.revision, 3);
    assert_eq!(
        updated.responses,
        [TxnOpResponse::Put {
            prev: Some(kv("/a", "1", 2, 2, 1))
        }]
    );
    assert_eq!(store.get("/a").await?, Some(kv("/a", "2", 2, 3, 2)));

    assert_eq!(put(&store, "/b", "x").await?, 4);
    assert_eq!(
        store.get("/a").await?,
        Some(kv("/a", "2", 2, 3, 2)),
        "other keys untouched"
    );

    let deleted = write(&store, vec![TxnOp::Delete(KeyRange::Key("/a".into()))]).await?;
    assert_eq!(deleted.revision, 5);
    assert_eq!(
        deleted.responses,
        [TxnOpResponse::Delete {
            deleted: vec![kv("/a", "2", 2, 3, 2)]
        }]
    );
    assert_eq!(store.get("/a").await?, None);

    // Re-creating a key starts its bookkeeping afresh.
    assert_eq!(put(&store, "/a", "3").await?, 6);
    assert_eq!(store.get("/a").await?, Some(kv("/a", "3", 6, 6, 1)));

    // Two writes in one transaction share one revision.
    let both = write(&store, vec![put_op("/a", "4"), put_op("/c", "1")]).await?;
    assert_eq!(both.revision, 7);
    assert_eq!(store.get("/a").await?, Some(kv("/a", "4", 6, 7, 2)));
    assert_eq!(store.get("/c").await?, Some(kv("/c", "1", 7, 7, 1)));
    assert_eq!(store.current_revision().await?, 7);
    Ok(())
}

async fn writes_that_change_nothing_do_not_bump_the_revision(store: Backend) -> Result<()> {
    put(&store, "/a", "1").await?;
    let failed = store
        .txn(Txn {
            compare: vec![Compare::absent("/a")],
            success: vec![put_op("/a", "2")],
            failure: vec![],
        })
        .await?;
    assert!(!failed.succeeded);
    assert_eq!(failed.revision, 2);
    assert!(failed.responses.is_empty());

    let nothing_deleted = write(&store, vec![TxnOp::Delete(prefix("/nothing/"))]).await?;
    assert_eq!(nothing_deleted.revision, 2);
    assert_eq!(
        nothing_deleted.responses,
        [TxnOpResponse::Delete { deleted: vec![] }]
    );

    let read_only = write(&store, vec![TxnOp::Range(RangeRequest::key("/a"))]).await?;
    assert_eq!(read_only.revision, 2);
    assert_eq!(store.current_revision().await?, 2);
    // The next write takes the very next revision.
    assert_eq!(put(&store, "/a", "3").await?, 3);
    Ok(())
}

async fn prefix_range_pages_through_a_historic_revision(store: Backend) -> Result<()> {
    put(&store, "/o", "before the prefix").await?;
    put(&store, "/p0", "just after the prefix").await?;
    for i in 0..10 {
        put(&store, &format!("/p/k{i:02}"), &format!("v{i}")).await?;
    }
    let then = store.current_revision().await?;
    assert_eq!(then, 13);
    // Change the range afterwards; the historic pages must not see any of it.
    write(&store, vec![TxnOp::Delete(KeyRange::Key("/p/k03".into()))]).await?;
    put(&store, "/p/k05", "changed").await?;
    put(&store, "/p/k10", "new").await?;

    let mut pages = Vec::new();
    let mut request = RangeRequest {
        revision: Some(then),
        limit: 4,
        ..RangeRequest::prefix("/p/")
    };
    loop {
        let page = store.range(request.clone()).await?;
        // The count covers the whole (remaining) range at that revision, not just the page.
        let remaining = 10
            - pages
                .iter()
                .map(|p: &RangeResponse| p.kvs.len())
                .sum::<usize>();
        assert_eq!(page.count, remaining, "count at {then}");
        assert_eq!(page.revision, then);
        let Some(last) = page.kvs.last() else {
            bail!("empty page {page:?}")
        };
        // Continue right after the last key, up to the end of the prefix.
        request.range = KeyRange::Between {
            start: format!("{}\0", last.key),
            end: "/p0".into(),
        };
        request.revision = Some(page.revision);
        let more = page.more;
        pages.push(page);
        if !more {
            break;
        }
    }
    let sizes: Vec<usize> = pages.iter().map(|p| p.kvs.len()).collect();
    assert_eq!(sizes, [4, 4, 2]);
    let all: Vec<KeyValue> = pages.into_iter().flat_map(|p| p.kvs).collect();
    let expected: Vec<KeyValue> = (0..10)
        .map(|i| kv(&format!("/p/k{i:02}"), &format!("v{i}"), 4 + i, 4 + i, 1))
        .collect();
    assert_eq!(all, expected);

    let keys_only = store
        .range(RangeRequest {
            revision: Some(then),
            keys_only: true,
            limit: 2,
            ..RangeRequest::prefix("/p/")
        })
        .await?;
    assert_eq!(
        keys_only.kvs,
        [kv("/p/k00", "", 4, 4, 1), kv("/p/k01", "", 5, 5, 1)]
    );
    assert!(keys_only.more);

    let latest = store.range(RangeRequest::prefix("/p/")).await?;
    assert_eq!(latest.revision, store.current_revision().await?);
    assert_eq!(latest.count, 10);
    assert!(!latest.more);
    assert!(!keys(&latest).contains(&"/p/k03"));
    assert_eq!(latest.kvs[4], kv("/p/k05", "changed", 9, 15, 2));

    let between = store
        .range(RangeRequest {
            range: KeyRange::Between {
                start: "/p/k02".into(),
                end: "/p/k05".into(),
            },
            ..RangeRequest::prefix("")
        })
        .await?;
    assert_eq!(keys(&between), ["/p/k02", "/p/k04"]);

    let everything = store.range(RangeRequest::prefix("")).await?;
    assert_eq!(everything.count, 12);
    assert_eq!(everything.kvs.first().map(|kv| kv.key.as_str()), Some("/o"));
    assert_eq!(everything.kvs.last().map(|kv| kv.key.as_str()), Some("/p0"));
    Ok(())
}

async fn txn_compares_each_field(store: Backend) -> Result<()> {
    let guarded = |compare: Vec<Compare>, value: &str| Txn {
        compare,
        success: vec![put_op("/k", value)],
        failure: vec![TxnOp::Range(RangeRequest::key("/k"))],
    };

    // Create-if-absent: only the first succeeds; the loser reads what is there.
    let first = store
        .txn(guarded(vec![Compare::absent("/k")], "first"))
        .await?;
    assert!(first.succeeded);
    let second = store
        .txn(guarded(vec![Compare::absent("/k")], "second"))
        .await?;
    assert!(!second.succeeded);
    let [TxnOpResponse::Range(current)] = second.responses.as_slice() else {
        bail!(
            "expected the failure branch's read, got {:?}",
            second.responses
        )
    };
    assert_eq!(current.kvs, [kv("/k", "first", 2, 2, 1)]);

    // Compare-and-swap on the mod revision: a stale revision loses.
    assert!(
        !store
            .txn(guarded(vec![Compare::mod_revision("/k", 1)], "stale"))
            .await?
            .succeeded
    );
    assert!(
        store
            .txn(guarded(vec![Compare::mod_revision("/k", 2)], "swapped"))
            .await?
            .succeeded
    );
    assert_eq!(store.get("/k").await?, Some(kv("/k", "swapped", 2, 3, 2)));

    let cmp = |op, target| Compare {
        key: "/k".into(),
        op,
        target,
    };
    let cases = [
        (cmp(CompareOp::Equal, CompareTarget::Version(2)), true),
        (cmp(CompareOp::Equal, CompareTarget::Version(1)), false),
        (cmp(CompareOp::Greater, CompareTarget::Version(1)), true),
        (cmp(CompareOp::Less, CompareTarget::Version(2)), false),
        (
            cmp(CompareOp::NotEqual, CompareTarget::ModRevision(3)),
            false,
        ),
        (cmp(CompareOp::Less, CompareTarget::ModRevision(4)), true),
        (
            cmp(CompareOp::Equal, CompareTarget::CreateRevision(2)),
            true,
        ),
        (
            cmp(CompareOp::Greater, CompareTarget::CreateRevision(2)),
            false,
        ),
        (
            cmp(CompareOp::Equal, CompareTarget::Value(b"swapped".to_vec())),
            true,
        ),
        (
            cmp(CompareOp::NotEqual, CompareTarget::Value(b"other".to_vec())),
            true,
        ),
        (
            cmp(CompareOp::Greater, CompareTarget::Value(b"sw".to_vec())),
            true,
        ),
        (
            cmp(CompareOp::Less, CompareTarget::Value(b"swapped".to_vec())),
            false,
        ),
        // A missing key has version, mod and create revision 0, and no value comparison of
        // it holds, not even "not equal".
        (Compare::absent("/missing"), true),
        (
            Compare {
                key: "/missing".into(),
                op: CompareOp::Equal,
                target: CompareTarget::ModRevision(0),
            },
            true,
        ),
        (
            Compare {
                key: "/missing".into(),
                op: CompareOp::NotEqual,
                target: CompareTarget::Value(b"anything".to_vec()),
            },
            false,
        ),
    ];
    for (compare, holds) in cases {
        let response = store
            .txn(Txn {
                compare: vec![compare.clone()],
                success: vec![],
                failure: vec![],
            })
            .await?;
        assert_eq!(response.succeeded, holds, "{compare:?}");
    }

    // All comparisons must hold.
    let mixed = vec![Compare::mod_revision("/k", 3), Compare::absent("/k")];
    assert!(!store.txn(guarded(mixed, "never")).await?.succeeded);
    assert_eq!(store.current_revision().await?, 3);
    Ok(())
}

async fn txn_reads_see_earlier_writes_of_the_same_txn(store: Backend) -> Result<()> {
    put(&store, "/k", "old").await?;
    let response = write(
        &store,
        vec![
            TxnOp::Range(RangeRequest::key("/k")),
            put_op("/k", "new"),
            TxnOp::Range(RangeRequest::key("/k")),
            TxnOp::Range(RangeRequest {
                revision: Some(2),
                ..RangeRequest::key("/k")
            }),
        ],
    )
    .await?;
    assert_eq!(response.revision, 3);
    let [
        TxnOpResponse::Range(before),
        _,
        TxnOpResponse::Range(after),
        TxnOpResponse::Range(then),
    ] = response.responses.as_slice()
    else {
        bail!("unexpected responses {:?}", response.responses)
    };
    assert_eq!(
        (before.revision, &before.kvs),
        (2, &vec![kv("/k", "old", 2, 2, 1)])
    );
    assert_eq!(
        (after.revision, &after.kvs),
        (3, &vec![kv("/k", "new", 2, 3, 2)])
    );
    assert_eq!(
        (then.revision, &then.kvs),
        (2, &vec![kv("/k", "old", 2, 2, 1)])
    );
    Ok(())
}

async fn racing_compare_and_swap_has_one_winner_per_round(store: Backend) -> Result<()> {
    const WRITERS: usize = 16;
    const ROUNDS: i64 = 8;
    put(&store, "/race", "start").await?;
    for round in 0..ROUNDS {
        let seen = store.get("/race").await?.context("key vanished")?;
        let start = Arc::new(tokio::sync::Barrier::new(WRITERS));
        let writers: Vec<_> = (0..WRITERS)
            .map(|writer| {
                let (store, start) = (store.clone(), start.clone());
                tokio::spawn(async move {
                    start.wait().await;
                    store
                        .txn(Txn {
                            compare: vec![Compare::mod_revision("/race", seen.mod_revision)],
                            success: vec![put_op("/race", &format!("{round}/{writer}"))],
                            failure: vec![TxnOp::Range(RangeRequest::key("/race"))],
                        })
                        .await
                })
            })
            .collect();
        let mut outcomes = Vec::new();
        for writer in writers {
            outcomes.push(writer.await??);
        }
        let winners: Vec<&TxnResponse> = outcomes.iter().filter(|o| o.succeeded).collect();
        assert_eq!(winners.len(), 1, "round {round}: {} winners", winners.len());
        let now = store.get("/race").await?.context("key vanished")?;
        assert_eq!(now.version, round + 2);
        assert_eq!(now.mod_revision, winners[0].revision);
        // Every loser lost to the winner and saw its write.
        for loser in outcomes.iter().filter(|o| !o.succeeded) {
            let [TxnOpResponse::Range(read)] = loser.responses.as_slice() else {
                bail!("loser without its read: {loser:?}")
            };
            assert_eq!(read.kvs, std::slice::from_ref(&now));
        }
    }
    Ok(())
}

async fn delete_range_deletes_in_one_revision_with_previous_values(store: Backend) -> Result<()> {
    for key in ["/d/a", "/d/b", "/d/c", "/e"] {
        put(&store, key, key).await?;
    }
    let mut events = watch(&store, prefix("/"), None).await?;

    let response = write(&store, vec![TxnOp::Delete(prefix("/d/"))]).await?;
    assert_eq!(response.revision, 6);
    let TxnOpResponse::Delete { deleted } = &response.responses[0] else {
        bail!("unexpected {:?}", response.responses)
    };
    let expected = vec![
        kv("/d/a", "/d/a", 2, 2, 1),
        kv("/d/b", "/d/b", 3, 3, 1),
        kv("/d/c", "/d/c", 4, 4, 1),
    ];
    assert_eq!(deleted, &expected);

    let seen = next_events(&mut events, 3).await?;
    for (event, prev) in seen.iter().zip(&expected) {
        assert_eq!(event.kind, EventKind::Delete);
        // A delete event carries the key and the deleting revision, nothing else.
        assert_eq!(event.kv, kv(&prev.key, "", 0, 6, 0));
        assert_eq!(event.prev.as_ref(), Some(prev));
    }

    let between = KeyRange::Between {
        start: "/d".into(),
        end: "/f".into(),
    };
    let response = write(&store, vec![TxnOp::Delete(between)]).await?;
    assert_eq!(response.revision, 7);
    assert_eq!(
        response.responses,
        [TxnOpResponse::Delete {
            deleted: vec![kv("/e", "/e", 5, 5, 1)]
        }]
    );
    assert_eq!(
        summary(&next_events(&mut events, 1).await?),
        [(EventKind::Delete, "/e".into(), 7)]
    );
    expect_nothing_more(&store, &mut events, "/marker").await
}

async fn watch_replays_history_then_delivers_live_events(store: Backend) -> Result<()> {
    put(&store, "/w/a", "1").await?; // 2
    put(&store, "/w/b", "1").await?; // 3
    put(&store, "/x", "outside").await?; // 4
    put(&store, "/w/a", "2").await?; // 5
    write(&store, vec![TxnOp::Delete(KeyRange::Key("/w/b".into()))]).await?; // 6
    write(&store, vec![put_op("/w/c", "1"), put_op("/w/0", "1")]).await?; // 7, in that order

    let mut stream = watch(&store, prefix("/w/"), Some(3)).await?;
    let history = next_events(&mut stream, 5).await?;
    assert_eq!(
        summary(&history),
        [
            (EventKind::Put, "/w/b".into(), 3),
            (EventKind::Put, "/w/a".into(), 5),
            (EventKind::Delete, "/w/b".into(), 6),
            (EventKind::Put, "/w/c".into(), 7),
            (EventKind::Put, "/w/0".into(), 7),
        ]
    );
    assert_eq!(history[0].prev, None);
    assert_eq!(history[1].prev, Some(kv("/w/a", "1", 2, 2, 1)));
    assert_eq!(history[1].kv, kv("/w/a", "2", 2, 5, 2));
    assert_eq!(history[2].prev, Some(kv("/w/b", "1", 3, 3, 1)));

    put(&store, "/x", "outside again").await?; // 8
    put(&store, "/w/a", "3").await?; // 9
    let live = next_events(&mut stream, 1).await?;
    assert_eq!(live[0].kv, kv("/w/a", "3", 2, 9, 3));
    assert_eq!(live[0].prev, Some(kv("/w/a", "2", 2, 5, 2)));
    expect_nothing_more(&store, &mut stream, "/w/marker").await
}

async fn watch_without_previous_values_carries_none(store: Backend) -> Result<()> {
    put(&store, "/n/a", "1").await?; // 2
    put(&store, "/n/a", "2").await?; // 3
    let mut stream = store
        .watch(WatchRequest {
            range: prefix("/n/"),
            start_revision: Some(3),
            prev_values: false,
        })
        .await?;
    write(&store, vec![TxnOp::Delete(KeyRange::Key("/n/a".into()))]).await?; // 4
    let events = next_events(&mut stream, 2).await?;
    assert_eq!(events[0].kv, kv("/n/a", "2", 2, 3, 2), "replayed history");
    assert_eq!(events[1].kind, EventKind::Delete, "live event");
    assert!(events.iter().all(|e| e.prev.is_none()), "{events:?}");
    Ok(())
}

async fn watch_resumes_after_reconnect_without_gap_or_duplicate(store: Backend) -> Result<()> {
    let mut stream = watch(&store, prefix("/r/"), None).await?;
    for i in 0..3 {
        put(&store, &format!("/r/{i}"), "first").await?;
    }
    let seen = next_events(&mut stream, 3).await?;
    let last = seen[2].kv.mod_revision;
    drop(stream);

    // Missed while disconnected, with writes outside the range in between.
    let mut missed = Vec::new();
    for i in 0..4 {
        missed.push(put(&store, &format!("/r/{i}"), "second").await?);
        put(&store, "/elsewhere", "noise").await?;
    }

    let mut resumed = watch(&store, prefix("/r/"), Some(last + 1)).await?;
    let replayed = next_events(&mut resumed, 4).await?;
    let revisions: Vec<Revision> = replayed.iter().map(|e| e.kv.mod_revision).collect();
    assert_eq!(revisions, missed);
    let prev: Vec<Option<&[u8]>> = replayed
        .iter()
        .map(|e| e.prev.as_ref().map(|p| p.value.as_slice()))
        .collect();
    assert_eq!(
        prev,
        [Some(&b"first"[..]), Some(b"first"), Some(b"first"), None]
    );
    expect_nothing_more(&store, &mut resumed, "/r/marker").await
}

async fn watch_from_a_future_revision_waits_for_it(store: Backend) -> Result<()> {
    let now = store.current_revision().await?;
    let mut stream = watch(&store, prefix("/f/"), Some(now + 2)).await?;
    put(&store, "/f/a", "skipped").await?;
    put(&store, "/f/a", "wanted").await?;
    let events = next_events(&mut stream, 1).await?;
    assert_eq!(events[0].kv, kv("/f/a", "wanted", now + 1, now + 2, 2));
    expect_nothing_more(&store, &mut stream, "/f/marker").await
}

async fn compaction_fails_reads_and_watches_below_it(store: Backend) -> Result<()> {
    for i in 0..5 {
        put(&store, "/c", &i.to_string()).await?; // 2..=6
    }
    store.compact(4).await?;

    let at = |revision| RangeRequest {
        revision: Some(revision),
        ..RangeRequest::key("/c")
    };
    match store.range(at(3)).await {
        Err(StoreError::Compacted {
            requested: 3,
            compacted: 4,
        }) => {}
        other => bail!("range below the compaction: {other:?}"),
    }
    // The compaction point itself stays readable.
    assert_eq!(store.range(at(4)).await?.kvs, [kv("/c", "2", 2, 4, 3)]);

    let in_txn = store.txn(only(vec![TxnOp::Range(at(2))])).await;
    assert!(
        matches!(
            in_txn,
            Err(StoreError::Compacted {
                requested: 2,
                compacted: 4
            })
        ),
        "{in_txn:?}"
    );

    let mut old = watch(&store, prefix("/c"), Some(3)).await?;
    match tokio::time::timeout(PATIENCE, old.next()).await? {
        Some(Err(StoreError::Compacted {
            requested: 3,
            compacted: 4,
        })) => {}
        other => bail!("watch below the compaction: {other:?}"),
    }
    assert!(
        tokio::time::timeout(PATIENCE, old.next()).await?.is_none(),
        "stream goes on"
    );

    let mut recent = watch(&store, prefix("/c"), Some(5)).await?;
    let events = next_events(&mut recent, 2).await?;
    assert_eq!(
        summary(&events),
        [
            (EventKind::Put, "/c".into(), 5),
            (EventKind::Put, "/c".into(), 6)
        ]
    );
    assert_eq!(
        events[0].prev,
        Some(kv("/c", "2", 2, 4, 3)),
        "previous value kept at 4"
    );

    assert!(matches!(
        store.compact(4).await,
        Err(StoreError::Compacted {
            requested: 4,
            compacted: 4
        })
    ));
    assert!(matches!(
        store.compact(3).await,
        Err(StoreError::Compacted {
            requested: 3,
            compacted: 4
        })
    ));
    assert!(matches!(
        store.compact(7).await,
        Err(StoreError::FutureRevision {
            requested: 7,
            current: 6
        })
    ));
    store.compact(6).await?;
    assert_eq!(store.get("/c").await?, Some(kv("/c", "4", 2, 6, 5)));
    Ok(())
}

async fn reading_the_future_fails(store: Backend) -> Result<()> {
    put(&store, "/k", "v").await?;
    let future = RangeRequest {
        revision: Some(3),
        ..RangeRequest::key("/k")
    };
    match store.range(future.clone()).await {
        Err(StoreError::FutureRevision {
            requested: 3,
            current: 2,
        }) => {}
        other => bail!("range in the future: {other:?}"),
    }
    let in_txn = store.txn(only(vec![TxnOp::Range(future)])).await;
    assert!(
        matches!(
            in_txn,
            Err(StoreError::FutureRevision {
                requested: 3,
                current: 2
            })
        ),
        "{in_txn:?}"
    );
    assert_eq!(store.current_revision().await?, 2);
    Ok(())
}

async fn expired_lease_deletes_its_keys(store: Backend) -> Result<()> {
    let lease = store.lease_grant(MIN_LEASE_TTL).await?;
    assert_ne!(lease, 0);
    put_leased(&store, "/l/b", lease).await?; // 2
    put_leased(&store, "/l/a", lease).await?; // 3
    put(&store, "/l/c", "kept").await?; // 4
    assert_eq!(
        store.get("/l/a").await?.and_then(|kv| kv.lease),
        Some(lease)
    );
    let mut stream = watch(&store, prefix("/l/"), None).await?;

    let events = next_events(&mut stream, 2).await?;
    assert_eq!(
        summary(&events),
        [
            (EventKind::Delete, "/l/a".into(), 5),
            (EventKind::Delete, "/l/b".into(), 5)
        ],
        "one revision, in key order"
    );
    assert_eq!(events[0].prev.as_ref().and_then(|p| p.lease), Some(lease));
    assert_eq!(store.get("/l/a").await?, None);
    assert!(store.get("/l/c").await?.is_some());
    assert!(
        matches!(store.lease_keep_alive(lease).await, Err(StoreError::LeaseNotFound(id)) if id == lease)
    );
    assert!(
        matches!(store.lease_revoke(lease).await, Err(StoreError::LeaseNotFound(id)) if id == lease)
    );
    let op = TxnOp::Put {
        key: "/l/d".into(),
        value: vec![],
        lease: Some(lease),
    };
    let attach = store.txn(only(vec![op])).await;
    assert!(
        matches!(attach, Err(StoreError::LeaseNotFound(id)) if id == lease),
        "{attach:?}"
    );
    expect_nothing_more(&store, &mut stream, "/l/marker").await
}

async fn keep_alive_extends_a_lease(store: Backend) -> Result<()> {
    // TTLs are whole seconds, rounded up, and at least etcd's minimum.
    let short = store.lease_grant(Duration::from_millis(100)).await?;
    assert_eq!(store.lease_keep_alive(short).await?, MIN_LEASE_TTL);

    let ttl = Duration::from_secs(3);
    let lease = store.lease_grant(Duration::from_millis(2500)).await?;
    put_leased(&store, "/k", lease).await?;
    // Renew well within the TTL for half as long again as the TTL: the key must outlive
    // its first deadline.
    let until = tokio::time::Instant::now() + ttl + ttl / 2;
    while tokio::time::Instant::now() < until {
        assert_eq!(store.lease_keep_alive(lease).await?, ttl);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(
        store.get("/k").await?.is_some(),
        "key expired despite keep-alives"
    );
    store.lease_revoke(lease).await?;
    Ok(())
}

async fn revoke_deletes_keys_at_once(store: Backend) -> Result<()> {
    let lease = store.lease_grant(Duration::from_secs(600)).await?;
    let other = store.lease_grant(Duration::from_secs(600)).await?;
    assert_ne!(lease, other);
    put_leased(&store, "/v/a", lease).await?; // 2
    put_leased(&store, "/v/b", other).await?; // 3
    // Re-attaching a key moves it to the new lease.
    put_leased(&store, "/v/b", lease).await?; // 4
    put_leased(&store, "/v/c", other).await?; // 5
    let mut stream = watch(&store, prefix("/v/"), None).await?;

    store.lease_revoke(lease).await?;
    assert_eq!(store.get("/v/a").await?, None);
    assert_eq!(store.get("/v/b").await?, None);
    assert!(
        store.get("/v/c").await?.is_some(),
        "key of another lease deleted"
    );
    assert_eq!(store.current_revision().await?, 6);
    let events = next_events(&mut stream, 2).await?;
    assert_eq!(
        summary(&events),
        [
            (EventKind::Delete, "/v/a".into(), 6),
            (EventKind::Delete, "/v/b".into(), 6)
        ]
    );
    assert!(matches!(
        store.lease_revoke(lease).await,
        Err(StoreError::LeaseNotFound(_))
    ));
    assert!(matches!(
        store.lease_keep_alive(lease).await,
        Err(StoreError::LeaseNotFound(_))
    ));

    // A key written without a lease leaves its old one: revoking that lease spares it.
    put(&store, "/v/c", "free").await?; // 7
    store.lease_revoke(other).await?;
    assert_eq!(
        store.get("/v/c").await?.map(|kv| (kv.value, kv.lease)),
        Some((b"free".to_vec(), None))
    );
    assert_eq!(
        store.current_revision().await?,
        7,
        "revoking a lease without keys writes nothing"
    );
    let rewritten = next_events(&mut stream, 1).await?;
    assert_eq!(summary(&rewritten), [(EventKind::Put, "/v/c".into(), 7)]);
    expect_nothing_more(&store, &mut stream, "/v/marker").await
}

async fn malformed_requests_are_rejected(store: Backend) -> Result<()> {
    let bad_txns = [
        vec![put_op("", "v")],
        vec![put_op("/a", "1"), put_op("/a", "2")],
        vec![TxnOp::Delete(prefix("/")), put_op("/a", "1")],
        vec![TxnOp::Delete(KeyRange::Between {
            start: "/b".into(),
            end: "/a".into(),
        })],
        (0..=MAX_TXN_OPS)
            .map(|i| put_op(&format!("/k{i}"), "v"))
            .collect(),
    ];
    for ops in bad_txns {
        let summary = format!("{:?}", ops.first());
        let result = store
            .txn(Txn {
                success: ops,
                ..Txn::default()
            })
            .await;
        assert!(
            matches!(result, Err(StoreError::InvalidArgument(_))),
            "{summary}: {result:?}"
        );
    }
    // The limit itself is fine.
    let most = (0..MAX_TXN_OPS)
        .map(|i| put_op(&format!("/k{i}"), "v"))
        .collect();
    assert_eq!(write(&store, most).await?.revision, 2);

    let inverted = KeyRange::Between {
        start: "/b".into(),
        end: "/b".into(),
    };
    let range = store.range(RangeRequest {
        range: inverted.clone(),
        ..RangeRequest::prefix("")
    });
    assert!(matches!(range.await, Err(StoreError::InvalidArgument(_))));
    assert!(matches!(
        store
            .watch(WatchRequest {
                range: inverted,
                start_revision: None,
                prev_values: true,
            })
            .await,
        Err(StoreError::InvalidArgument(_))
    ));
    assert!(matches!(
        store.range(RangeRequest::key("")).await,
        Err(StoreError::InvalidArgument(_))
    ));
    assert_eq!(store.current_revision().await?, 2);
    Ok(())
}

async fn progress_notice_follows_every_event_up_to_its_revision(store: Backend) -> Result<()> {
    let (mut stream, progress) = store
        .watch_with_progress(WatchRequest {
            range: prefix("/p/"),
            start_revision: None,
            prev_values: false,
        })
        .await?;
    put(&store, "/p/a", "1").await?;
    put(&store, "/other", "x").await?;
    let last = put(&store, "/other", "y").await?;
    progress.request();
    // Events of the range come first; the notice carries a revision at least the store's
    // revision when it was asked for, though no event of the range is at that revision.
    let mut seen = Vec::new();
    loop {
        let batch = tokio::time::timeout(PATIENCE, stream.next())
            .await
            .context("no progress notice")?
            .context("watch stream ended")??;
        if batch.events.is_empty() {
            ensure!(
                batch.revision >= last,
                "notice at {} before {last}",
                batch.revision
            );
            break;
        }
        seen.extend(batch.events);
    }
    ensure!(
        summary(&seen) == [(EventKind::Put, "/p/a".to_owned(), 2)],
        "{seen:#?}"
    );
    Ok(())
}
