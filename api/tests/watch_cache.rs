//! Watch cache tests: fan-out to many watchers over gRPC, selectors, and slow watchers.

use std::{sync::Arc, time::Duration};

use ferro_api::{
    Error, Kind, Object,
    auth::Tokens,
    cache::{CacheOptions, Query, WatchCache},
    client::{Client, Selection},
    codec,
    selector::{FieldSelector, LabelSelector},
    server::ApiServer,
    v1::{self, watch_event::Type},
};
use ferro_store::{Store, memory::MemoryStore};
use futures::StreamExt;

const PATIENCE: Duration = Duration::from_secs(30);

async fn start() -> (Client, Arc<dyn Store>, tokio::sync::oneshot::Sender<()>) {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let server = ApiServer::new(store.clone(), Tokens::parse("t admin\n"));
    tokio::spawn(server.serve(listener, async {
        let _ = rx.await;
    }));
    (Client::connect_lazy(&address, "t").unwrap(), store, tx)
}

fn segment(name: &str, id: u32, labels: &str) -> Object {
    let text = format!(
        "apiVersion: ferro/v1\nkind: SegmentID\nmetadata: {{name: {name}, labels: {{{labels}}}}}\nspec: {{id: {id}}}\n"
    );
    codec::decode_yaml(&text).unwrap().remove(0)
}

async fn next_event(
    stream: &mut (impl futures::Stream<Item = Result<v1::WatchEvent, Error>> + Unpin),
) -> v1::WatchEvent {
    loop {
        let event = tokio::time::timeout(PATIENCE, stream.next())
            .await
            .expect("an event in time")
            .expect("stream open")
            .unwrap();
        if event.r#type != Type::Bookmark as i32 {
            return event;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_watchers_receive_every_event_once_in_order() {
    let (client, _store, _stop) = start().await;
    // Let the cache come up, then watch from the revision a List reports.
    let (_, revision) = client
        .list(Kind::SegmentID, &Selection::all())
        .await
        .unwrap();
    let mut watchers = Vec::new();
    for _ in 0..100 {
        watchers.push(Box::pin(
            client
                .watch(Kind::SegmentID, &Selection::all(), revision)
                .await
                .unwrap(),
        ));
    }
    const EVENTS: u32 = 50;
    for i in 0..EVENTS {
        client
            .create(segment(&format!("vni-{i}"), i + 1, ""))
            .await
            .unwrap();
    }
    let readers = watchers.into_iter().map(|mut stream| {
        tokio::spawn(async move {
            let mut seen = Vec::new();
            while seen.len() < EVENTS as usize {
                let event = next_event(&mut stream).await;
                assert_eq!(event.r#type, Type::Added as i32);
                seen.push((
                    event.resource_version,
                    Object::try_from(event.object.unwrap())
                        .unwrap()
                        .name()
                        .to_owned(),
                ));
            }
            seen
        })
    });
    for seen in futures::future::join_all(readers).await {
        let seen = seen.unwrap();
        let names: Vec<String> = seen.iter().map(|(_, n)| n.clone()).collect();
        let expected: Vec<String> = (0..EVENTS).map(|i| format!("vni-{i}")).collect();
        assert_eq!(names, expected, "every event once, in order");
        assert!(
            seen.windows(2).all(|w| w[0].0 < w[1].0),
            "revisions increase"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_selected_watcher_sees_deleted_when_its_object_stops_matching() {
    let (client, _store, _stop) = start().await;
    let (_, revision) = client
        .list(Kind::SegmentID, &Selection::all())
        .await
        .unwrap();
    let mut by_label = Box::pin(
        client
            .watch(
                Kind::SegmentID,
                &Selection::all().labels("pool=a"),
                revision,
            )
            .await
            .unwrap(),
    );
    let mut by_name = Box::pin(
        client
            .watch(
                Kind::SegmentID,
                &Selection::all().fields("metadata.name=vni-x"),
                revision,
            )
            .await
            .unwrap(),
    );
    client.create(segment("vni-x", 7, "pool: a")).await.unwrap();
    let mut moved = client.get(Kind::SegmentID, "", "vni-x").await.unwrap();
    moved
        .metadata_mut()
        .labels
        .insert("pool".into(), "b".into());
    client.update(moved).await.unwrap();
    client
        .delete_key(Kind::SegmentID, "", "vni-x")
        .await
        .unwrap();

    assert_eq!(next_event(&mut by_label).await.r#type, Type::Added as i32);
    let gone = next_event(&mut by_label).await;
    assert_eq!(
        gone.r#type,
        Type::Deleted as i32,
        "it stopped matching pool=a"
    );
    let gone = Object::try_from(gone.object.unwrap()).unwrap();
    assert_eq!(
        gone.metadata().unwrap().labels["pool"],
        "b",
        "the object as it is now"
    );

    let types: Vec<i32> = [
        next_event(&mut by_name).await,
        next_event(&mut by_name).await,
        next_event(&mut by_name).await,
    ]
    .iter()
    .map(|e| e.r#type)
    .collect();
    assert_eq!(
        types,
        [
            Type::Added as i32,
            Type::Modified as i32,
            Type::Deleted as i32
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_watcher_is_dropped_while_the_others_continue() {
    let (client, store, _stop) = start().await;
    let options = CacheOptions {
        watcher_buffer: 16,
        ..CacheOptions::default()
    };
    let cache = WatchCache::new(store.clone(), options);
    cache.warm();
    let everything = || Query {
        project: None,
        labels: LabelSelector::default(),
        fields: FieldSelector::default(),
    };
    // Wait until the cache is up.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let (stalled, active) = loop {
        if let (Some(a), Some(b)) = (
            cache.watch(Kind::SegmentID, everything(), 0),
            cache.watch(Kind::SegmentID, everything(), 0),
        ) {
            break (a, b);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the cache never became ready"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let mut active = Box::pin(active.into_stream());
    const EVENTS: u32 = 60;
    let reader = tokio::spawn(async move {
        let mut count = 0;
        while count < EVENTS {
            let event = tokio::time::timeout(PATIENCE, active.next())
                .await
                .unwrap()
                .unwrap()
                .unwrap()
                .decode()
                .unwrap();
            if event.r#type != Type::Bookmark as i32 {
                count += 1;
            }
        }
        count
    });
    for i in 0..EVENTS {
        client
            .create(segment(&format!("vni-s{i}"), i + 100, ""))
            .await
            .unwrap();
        // Give the active reader a chance to keep up; the stalled one never reads.
        tokio::task::yield_now().await;
    }
    assert_eq!(
        reader.await.unwrap(),
        EVENTS,
        "the active watcher got everything"
    );
    assert_eq!(
        cache.watcher_count(Kind::SegmentID),
        1,
        "the stalled watcher was dropped"
    );
    // The stalled watcher finds what was buffered, then the reason it was cut off.
    let items: Vec<_> = stalled.into_stream().collect().await;
    let (last, buffered) = items.split_last().unwrap();
    assert!(buffered.iter().all(Result::is_ok));
    assert!(buffered.len() <= 16, "bounded: {}", buffered.len());
    let reason = last.as_ref().unwrap_err();
    assert!(reason.message().contains("fell behind"), "{reason:?}");
}

/// `sendInitialEvents` (Kubernetes' watch-list): the objects that match now as Added
/// events, one Bookmark at the revision they were read at, then the changes after it —
/// over more than one List page, with the cache and without it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_with_initial_events_replays_what_exists_then_follows() {
    for cached in [true, false] {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let (_stop, rx) = tokio::sync::oneshot::channel::<()>();
        let mut server = ApiServer::new(store.clone(), Tokens::parse("t admin\n"));
        if !cached {
            server = server.without_cache();
        }
        tokio::spawn(server.serve(listener, async {
            let _ = rx.await;
        }));
        let client = Client::connect_lazy(&address, "t").unwrap();
        // More than one default page (500), some outside the selector.
        const EXISTING: u32 = 520;
        for i in 0..EXISTING {
            let labels = if i % 2 == 0 { "pool: a" } else { "pool: b" };
            client
                .create(segment(&format!("vni-{i:04}"), i + 1, labels))
                .await
                .unwrap();
        }
        let selection = Selection::all().labels("pool=a");
        let mut stream = Box::pin(
            client
                .watch_list(Kind::SegmentID, &selection)
                .await
                .unwrap(),
        );
        let mut names = Vec::new();
        let bookmark = loop {
            let event = tokio::time::timeout(PATIENCE, stream.next())
                .await
                .expect("an event in time")
                .expect("stream open")
                .unwrap();
            match event.r#type() {
                Type::Added => names.push(
                    Object::try_from(event.object.unwrap())
                        .unwrap()
                        .name()
                        .to_owned(),
                ),
                Type::Bookmark => break event.resource_version,
                other => panic!("{other:?} before the initial events ended"),
            }
        };
        let expected: Vec<String> = (0..EXISTING)
            .filter(|i| i % 2 == 0)
            .map(|i| format!("vni-{i:04}"))
            .collect();
        assert_eq!(
            names, expected,
            "cached={cached}: each match once, in order"
        );
        assert_eq!(
            bookmark,
            store.current_revision().await.unwrap(),
            "cached={cached}: the bookmark is the revision the objects were read at"
        );
        // Then changes, and only those after the bookmark.
        client
            .create(segment("vni-new", 9999, "pool: a"))
            .await
            .unwrap();
        let event = next_event(&mut stream).await;
        assert_eq!(event.r#type, Type::Added as i32);
        assert!(event.resource_version > bookmark);
        assert_eq!(
            Object::try_from(event.object.unwrap()).unwrap().name(),
            "vni-new"
        );
    }
}
