//! The console relay over real gRPC, with a small agent that serves canned output.

use std::{sync::Arc, time::Duration};

use ferro_api::{
    Error, Kind,
    auth::Tokens,
    client::Client,
    codec,
    server::ApiServer,
    v1::{self, console_open::Mode},
};
use ferro_store::memory::MemoryStore;
use futures::StreamExt;
use tokio::sync::mpsc;

const TOKENS: &str = "admin-token admin\nnode-token system:node:n1\nother-token system:node:n2\n";
const PATIENCE: Duration = Duration::from_secs(20);

struct Harness {
    admin: Client,
    address: String,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn start() -> Harness {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let server = ApiServer::new(Arc::new(MemoryStore::new()), Tokens::parse(TOKENS));
    tokio::spawn(server.serve(listener, async {
        let _ = rx.await;
    }));
    let admin = Client::connect_lazy(&address, "admin-token").unwrap();
    for text in [
        "apiVersion: ferro/v1\nkind: Node\nmetadata: {name: n1}\n",
        "apiVersion: ferro/v1\nkind: Server\nmetadata: {name: web}\nspec: {flavor: m1.tiny, image: tiny}\n",
        "apiVersion: ferro/v1\nkind: Server\nmetadata: {name: unplaced}\nspec: {flavor: m1.tiny, image: tiny}\n",
    ] {
        admin
            .create(codec::decode_yaml(text).unwrap().remove(0))
            .await
            .unwrap();
    }
    let flavor = v1::FlavorSnapshot {
        name: "m1.tiny".into(),
        vcpus: 1,
        ram_mib: 128,
        ..Default::default()
    };
    admin.bind("default", "web", "n1", flavor).await.unwrap();
    Harness {
        admin,
        address,
        _stop: tx,
    }
}

/// What the fake agent saw.
#[derive(Debug)]
enum Seen {
    Opened(v1::ConsoleOpen),
    /// A Serve call's response stream ended: the session is over on the apiserver's side.
    Closed(String),
    Keys(Vec<u8>),
}

/// A fake node agent for n1: serves "line N\n" output; follows until the apiserver ends
/// the session.
async fn agent(address: &str) -> mpsc::UnboundedReceiver<Seen> {
    let client = Client::connect_lazy(address, "node-token").unwrap();
    let (seen, rx) = mpsc::unbounded_channel();
    let mut tunnel = client
        .consoles()
        .tunnel(v1::TunnelHello { node: "n1".into() })
        .await
        .unwrap()
        .into_inner();
    tokio::spawn(async move {
        while let Some(Ok(open)) = tunnel.next().await {
            let client = client.clone();
            let seen = seen.clone();
            tokio::spawn(async move {
                let _ = seen.send(Seen::Opened(open.clone()));
                let (tx, rx) = mpsc::channel::<v1::ConsoleData>(16);
                tx.send(v1::ConsoleData {
                    session: open.session.clone(),
                    ..Default::default()
                })
                .await
                .unwrap();
                let mut keys = client
                    .consoles()
                    .serve(tokio_stream::wrappers::ReceiverStream::new(rx))
                    .await
                    .unwrap()
                    .into_inner();
                let follow = open.mode != Mode::Log as i32;
                let writer = tokio::spawn(async move {
                    for n in 0.. {
                        let data = format!("line {n}\n").into_bytes();
                        if tx
                            .send(v1::ConsoleData {
                                data,
                                ..Default::default()
                            })
                            .await
                            .is_err()
                            || (!follow && n == 2)
                        {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(if follow { 20 } else { 0 }))
                            .await;
                    }
                });
                while let Some(Ok(key)) = keys.next().await {
                    let _ = seen.send(Seen::Keys(key.data));
                }
                writer.abort();
                let _ = seen.send(Seen::Closed(open.session));
            });
        }
    });
    rx
}

async fn next_seen(rx: &mut mpsc::UnboundedReceiver<Seen>) -> Seen {
    tokio::time::timeout(PATIENCE, rx.recv())
        .await
        .expect("the agent saw something")
        .expect("agent running")
}

fn logs(key: &str, follow: bool) -> v1::LogsRequest {
    v1::LogsRequest {
        key: Some(v1::ObjectKey {
            kind: "Server".into(),
            project: String::new(),
            name: key.into(),
        }),
        follow,
        tail_bytes: 0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_are_relayed_from_the_agent() {
    let h = start().await;
    let mut seen = agent(&h.address).await;
    let stream = h
        .admin
        .consoles()
        .logs(logs("web", false))
        .await
        .unwrap()
        .into_inner();
    let output = tokio::time::timeout(PATIENCE, ferro_api::console::collect(stream))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        String::from_utf8(output).unwrap(),
        "line 0\nline 1\nline 2\n"
    );
    let Seen::Opened(open) = next_seen(&mut seen).await else {
        panic!("open first")
    };
    let server = h.admin.get(Kind::Server, "", "web").await.unwrap();
    assert_eq!(
        open.server_uid,
        server.metadata().unwrap().uid,
        "the agent is told the guest's uid"
    );
    assert_eq!(open.mode, Mode::Log as i32);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_that_leaves_ends_the_agents_stream() {
    let h = start().await;
    let mut seen = agent(&h.address).await;
    let mut stream = h
        .admin
        .consoles()
        .logs(logs("web", true))
        .await
        .unwrap()
        .into_inner();
    for expected in ["line 0\n", "line 1\n", "line 2\n"] {
        let chunk = tokio::time::timeout(PATIENCE, stream.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(chunk.data, expected.as_bytes());
    }
    let Seen::Opened(open) = next_seen(&mut seen).await else {
        panic!("open first")
    };
    assert_eq!(open.mode, Mode::Follow as i32);
    drop(stream);
    let Seen::Closed(session) = next_seen(&mut seen).await else {
        panic!("closed next")
    };
    assert_eq!(session, open.session);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attached_writer_sends_keys_and_a_second_writer_is_refused() {
    let h = start().await;
    let mut seen = agent(&h.address).await;
    let (keys, rx) = mpsc::channel::<v1::AttachInput>(4);
    let key = v1::ObjectKey {
        kind: "Server".into(),
        project: String::new(),
        name: "web".into(),
    };
    keys.send(v1::AttachInput {
        key: Some(key.clone()),
        data: b"uname\n".to_vec(),
        write: true,
    })
    .await
    .unwrap();
    let mut output = h
        .admin
        .consoles()
        .attach(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let chunk = tokio::time::timeout(PATIENCE, output.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(chunk.data, b"line 0\n");
    let Seen::Opened(open) = next_seen(&mut seen).await else {
        panic!("open first")
    };
    assert_eq!(open.mode, Mode::Attach as i32);
    let Seen::Keys(data) = next_seen(&mut seen).await else {
        panic!("keys next")
    };
    assert_eq!(data, b"uname\n");

    let (_second_keys, rx2) = mpsc::channel::<v1::AttachInput>(4);
    _second_keys
        .send(v1::AttachInput {
            key: Some(key.clone()),
            data: Vec::new(),
            write: true,
        })
        .await
        .unwrap();
    let err = h
        .admin
        .consoles()
        .attach(tokio_stream::wrappers::ReceiverStream::new(rx2))
        .await
        .unwrap_err();
    assert!(
        Error::from(err)
            .to_string()
            .contains("another client is attached as the writer")
    );

    // A reader may attach alongside the writer.
    let (reader_keys, rx3) = mpsc::channel::<v1::AttachInput>(4);
    reader_keys
        .send(v1::AttachInput {
            key: Some(key),
            data: Vec::new(),
            write: false,
        })
        .await
        .unwrap();
    let mut reader = h
        .admin
        .consoles()
        .attach(tokio_stream::wrappers::ReceiverStream::new(rx3))
        .await
        .unwrap()
        .into_inner();
    let chunk = tokio::time::timeout(PATIENCE, reader.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(chunk.data, b"line 0\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consoles_say_why_they_cannot_open() {
    let h = start().await;
    let err = Error::from(
        h.admin
            .consoles()
            .logs(logs("web", false))
            .await
            .unwrap_err(),
    );
    assert_eq!(
        err.to_string(),
        "the agent of node n1 is not connected; is `ferro agent` running there?"
    );
    let err = Error::from(
        h.admin
            .consoles()
            .logs(logs("unplaced", false))
            .await
            .unwrap_err(),
    );
    assert_eq!(
        err.to_string(),
        "servers/unplaced: is not placed on a node yet; it has no console"
    );
    let err = Error::from(
        h.admin
            .consoles()
            .logs(logs("nope", false))
            .await
            .unwrap_err(),
    );
    assert_eq!(
        err,
        Error::NotFound {
            object: "servers/nope".into()
        }
    );

    let other = Client::connect_lazy(&h.address, "other-token").unwrap();
    let err = Error::from(
        other
            .consoles()
            .tunnel(v1::TunnelHello { node: "n1".into() })
            .await
            .unwrap_err(),
    );
    assert_eq!(
        err.to_string(),
        "system:node:n2 may not open the tunnel of node n1"
    );
    let err = Error::from(
        h.admin
            .consoles()
            .tunnel(v1::TunnelHello { node: "n1".into() })
            .await
            .unwrap_err(),
    );
    assert!(matches!(err, Error::PermissionDenied { .. }), "{err:?}");
}
