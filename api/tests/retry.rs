//! The client across an apiserver restart: idempotent calls ride it out with one notice,
//! the others fail at once, and an address that never answered is not waited for.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferro_api::{
    Error, Kind, Object,
    auth::Tokens,
    client::{Client, RetryPolicy, Selection},
    codec,
    server::ApiServer,
};
use ferro_store::{Store, memory::MemoryStore};
use tokio::sync::oneshot;

/// An apiserver on `address` (`127.0.0.1:0` for any port); stops when the sender drops.
async fn serve(store: Arc<dyn Store>, address: &str) -> (String, oneshot::Sender<()>) {
    let listener = tokio::net::TcpListener::bind(address).await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let (tx, rx) = oneshot::channel::<()>();
    let server = ApiServer::new(store, Tokens::parse("t admin\n"));
    tokio::spawn(server.serve(listener, async {
        let _ = rx.await;
    }));
    (address, tx)
}

fn network(name: &str) -> Object {
    codec::decode_yaml(&format!(
        "apiVersion: ferro/v1\nkind: Network\nmetadata: {{name: {name}, project: default}}\nspec:\n  subnets:\n  - {{name: a, cidr: 10.0.1.0/24}}\n"
    ))
    .unwrap()
    .remove(0)
}

/// A client that retries, counting the notices it gives.
fn retrying(address: &str) -> (Client, Arc<Mutex<Vec<String>>>) {
    let notices = Arc::new(Mutex::new(Vec::new()));
    let seen = notices.clone();
    let client = Client::connect_lazy(address, "t")
        .unwrap()
        .with_retry(RetryPolicy {
            total: Duration::from_secs(20),
            min_delay: Duration::from_millis(50),
            max_delay: Duration::from_millis(500),
        })
        .on_retry(move |e| seen.lock().unwrap().push(e.to_string()));
    (client, notices)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_calls_wait_out_a_restart_and_others_fail_at_once() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let (address, stop) = serve(store.clone(), "127.0.0.1:0").await;
    let (client, notices) = retrying(&address);
    client.apply(network("a"), "test", false).await.unwrap();

    // Down: a Create is not repeated, it fails as unreachable straight away.
    drop(stop);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let begin = std::time::Instant::now();
    let error = client.create(network("b")).await.unwrap_err();
    assert!(matches!(error, Error::Unavailable { .. }), "{error:?}");
    assert!(begin.elapsed() < Duration::from_secs(3), "no retries");
    assert!(notices.lock().unwrap().is_empty());

    // Back after a second, on the same port: Apply, Get, List and a Watch wait for it.
    let restart = {
        let (store, address) = (store.clone(), address.clone());
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            serve(store, &address).await
        })
    };
    client.apply(network("c"), "test", false).await.unwrap();
    assert_eq!(
        notices.lock().unwrap().len(),
        1,
        "one notice for the call that retried, not one per attempt: {:?}",
        notices.lock().unwrap()
    );
    let _stop = restart.await.unwrap();
    client.get(Kind::Network, "default", "c").await.unwrap();
    let (items, _) = client
        .list(Kind::Network, &Selection::project("default"))
        .await
        .unwrap();
    assert_eq!(items.len(), 2);
    let _watch = client
        .watch(Kind::Network, &Selection::all(), 0)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_that_never_answered_fails_at_once() {
    let address = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().to_string()
    };
    let (client, notices) = retrying(&address);
    let begin = std::time::Instant::now();
    let error = client.get(Kind::Network, "default", "a").await.unwrap_err();
    assert!(matches!(error, Error::Unavailable { .. }), "{error:?}");
    assert!(begin.elapsed() < Duration::from_secs(3));
    assert!(notices.lock().unwrap().is_empty());
}

#[test]
fn which_calls_are_repeated() {
    use ferro_api::client::Call;
    for call in [Call::Apply, Call::Get, Call::List, Call::Watch] {
        assert!(call.is_idempotent(), "{call:?}");
    }
    assert!(Call::Delete { precondition: true }.is_idempotent());
    for call in [
        Call::Create,
        Call::Update,
        Call::UpdateStatus,
        Call::PatchMetadata,
        Call::Bind,
        Call::Delete {
            precondition: false,
        },
    ] {
        assert!(!call.is_idempotent(), "{call:?}");
    }
}
