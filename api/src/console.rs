//! The console relay: users read and attach to serial consoles through the apiserver,
//! which relays streams that the server's node agent serves.
//!
//! Only agents dial. Each keeps a `Tunnel` open; to open a console the relay sends a
//! `ConsoleOpen` with a fresh session id down the node's tunnel, and the agent answers with
//! a `Serve` call whose first message names that session. The relay then copies the
//! agent's output to the user's stream and, for an attached console, the user's keystrokes
//! back to the agent. Whichever side goes away ends the session for the other: a user who
//! stops reading ends the agent's `Serve` call, an agent that disconnects ends the user's
//! stream with an error.

use std::{
    collections::{HashMap, HashSet},
    pin::Pin,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::Duration,
};

use futures::{Stream, StreamExt};
use tokio::sync::mpsc;
use tonic::{Request, Response, Status, Streaming};

use crate::{
    Error, Kind, Object, auth,
    auth::{Identity, Verb},
    server::ApiServer,
    v1::{self, console_open::Mode},
};

/// How long an agent has to claim a session before the user is told it did not answer.
const CLAIM_TIMEOUT: Duration = Duration::from_secs(10);

/// Sessions and tunnels; shared by every clone of the apiserver.
#[derive(Default)]
pub struct ConsoleRelay {
    tunnels: Mutex<HashMap<String, mpsc::Sender<Result<v1::ConsoleOpen, Status>>>>,
    sessions: Mutex<HashMap<String, Session>>,
    writers: Mutex<HashSet<String>>,
}

struct Session {
    node: String,
    output: mpsc::Sender<Result<v1::ConsoleData, Status>>,
    /// Keystrokes for the agent; taken by the agent's Serve call.
    input: Option<mpsc::Receiver<v1::ConsoleInput>>,
    claimed: bool,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

type DataStream = Pin<Box<dyn Stream<Item = Result<v1::ConsoleData, Status>> + Send>>;
type OpenStream = Pin<Box<dyn Stream<Item = Result<v1::ConsoleOpen, Status>> + Send>>;
type InputStream = Pin<Box<dyn Stream<Item = Result<v1::ConsoleInput, Status>> + Send>>;

impl ConsoleRelay {
    /// Opens a session on the node's agent; returns the user's output stream.
    fn open(
        self: &Arc<Self>,
        node: &str,
        open: v1::ConsoleOpen,
        input: Option<mpsc::Receiver<v1::ConsoleInput>>,
    ) -> Result<mpsc::Receiver<Result<v1::ConsoleData, Status>>, Error> {
        let tunnel = lock(&self.tunnels)
            .get(node)
            .cloned()
            .ok_or_else(|| Error::Unavailable {
                message: format!(
                    "the agent of node {node} is not connected; is `ferro agent` running there?"
                ),
            })?;
        let (output, rx) = mpsc::channel(64);
        let session = open.session.clone();
        lock(&self.sessions).insert(
            session.clone(),
            Session {
                node: node.to_owned(),
                output,
                input,
                claimed: false,
            },
        );
        if tunnel.try_send(Ok(open)).is_err() {
            lock(&self.sessions).remove(&session);
            lock(&self.tunnels).remove(node);
            return Err(Error::Unavailable {
                message: format!("the agent of node {node} is not connected"),
            });
        }
        let relay = self.clone();
        let node = node.to_owned();
        tokio::spawn(async move {
            tokio::time::sleep(CLAIM_TIMEOUT).await;
            let unclaimed = {
                let mut sessions = lock(&relay.sessions);
                match sessions.get(&session) {
                    Some(s) if !s.claimed => sessions.remove(&session),
                    _ => None,
                }
            };
            if let Some(s) = unclaimed {
                let error = Error::Unavailable {
                    message: format!(
                        "the agent of node {node} did not open the console within {CLAIM_TIMEOUT:?}"
                    ),
                };
                let _ = s.output.send(Err(Status::from(error))).await;
            }
        });
        Ok(rx)
    }
}

impl ApiServer {
    /// Finds the node a Server runs on, after checking the caller may use its console.
    async fn console_target(
        &self,
        who: &Identity,
        key: Option<v1::ObjectKey>,
        verb: Verb,
    ) -> Result<(String, String), Error> {
        let key = key.ok_or_else(|| Error::invalid("", "key", "required"))?;
        let kind = Kind::lookup(&key.kind).unwrap_or(Kind::Server);
        if kind != Kind::Server {
            return Err(Error::invalid("", "key.kind", "only servers have consoles"));
        }
        self.authorize(who, &auth::Request::new(verb, Kind::Server, &key.name))?;
        let object = self
            .get_object(Kind::Server, &key.project, &key.name)
            .await?;
        let Object::Server(server) = &object else {
            unreachable!("a Server key reads a Server")
        };
        let node = server
            .status
            .as_ref()
            .map(|s| s.node.clone())
            .unwrap_or_default();
        if node.is_empty() {
            return Err(Error::FailedPrecondition {
                object: object.display_name(),
                message: "is not placed on a node yet; it has no console".into(),
            });
        }
        let uid = server
            .metadata
            .as_ref()
            .map(|m| m.uid.clone())
            .unwrap_or_default();
        Ok((node, uid))
    }

    fn caller_node(who: &Identity, action: &str) -> Result<String, Error> {
        who.node()
            .map(str::to_owned)
            .ok_or_else(|| Error::PermissionDenied {
                message: format!("{} may not {action}: only node agents may", who.name),
            })
    }
}

#[tonic::async_trait]
impl v1::consoles_server::Consoles for ApiServer {
    type LogsStream = DataStream;

    async fn logs(
        &self,
        request: Request<v1::LogsRequest>,
    ) -> Result<Response<DataStream>, Status> {
        let who = self.authenticate(&request)?;
        let request = request.into_inner();
        let (node, uid) = self.console_target(&who, request.key, Verb::Read).await?;
        let open = v1::ConsoleOpen {
            session: uuid::Uuid::new_v4().to_string(),
            server_uid: uid,
            mode: if request.follow {
                Mode::Follow
            } else {
                Mode::Log
            } as i32,
            tail_bytes: request.tail_bytes,
        };
        let rx = self.relay().open(&node, open, None)?;
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    type AttachStream = DataStream;

    async fn attach(
        &self,
        request: Request<Streaming<v1::AttachInput>>,
    ) -> Result<Response<DataStream>, Status> {
        let who = self.authenticate(&request)?;
        let mut inbound = request.into_inner();
        let first = inbound.message().await?.ok_or_else(|| {
            Status::from(Error::invalid(
                "",
                "key",
                "the first message must name the server",
            ))
        })?;
        let verb = if first.write {
            Verb::Update
        } else {
            Verb::Read
        };
        let (node, uid) = self.console_target(&who, first.key, verb).await?;
        let relay = self.relay();
        if first.write && !lock(&relay.writers).insert(uid.clone()) {
            return Err(Status::from(Error::FailedPrecondition {
                object: "console".into(),
                message:
                    "another client is attached as the writer; attach read-only or try again later"
                        .into(),
            }));
        }
        let (input_tx, input_rx) = mpsc::channel(64);
        let open = v1::ConsoleOpen {
            session: uuid::Uuid::new_v4().to_string(),
            server_uid: uid.clone(),
            mode: Mode::Attach as i32,
            tail_bytes: 0,
        };
        let rx = match relay.open(&node, open, Some(input_rx)) {
            Ok(rx) => rx,
            Err(e) => {
                if first.write {
                    lock(&relay.writers).remove(&uid);
                }
                return Err(e.into());
            }
        };
        let writer = first.write;
        let relay_for_input = relay.clone();
        tokio::spawn(async move {
            if !first.data.is_empty() && writer {
                let _ = input_tx.send(v1::ConsoleInput { data: first.data }).await;
            }
            while let Ok(Some(message)) = inbound.message().await {
                if writer
                    && !message.data.is_empty()
                    && input_tx
                        .send(v1::ConsoleInput { data: message.data })
                        .await
                        .is_err()
                {
                    break;
                }
            }
            if writer {
                lock(&relay_for_input.writers).remove(&uid);
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    type TunnelStream = OpenStream;

    async fn tunnel(
        &self,
        request: Request<v1::TunnelHello>,
    ) -> Result<Response<OpenStream>, Status> {
        let who = self.authenticate(&request)?;
        let node = Self::caller_node(&who, "open a console tunnel")?;
        if request.get_ref().node != node {
            return Err(Status::from(Error::PermissionDenied {
                message: format!(
                    "{} may not open the tunnel of node {}",
                    who.name,
                    request.get_ref().node
                ),
            }));
        }
        let (tx, rx) = mpsc::channel(64);
        lock(&self.relay().tunnels).insert(node, tx);
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    type ServeStream = InputStream;

    async fn serve(
        &self,
        request: Request<Streaming<v1::ConsoleData>>,
    ) -> Result<Response<InputStream>, Status> {
        let who = self.authenticate(&request)?;
        let node = Self::caller_node(&who, "serve a console")?;
        let mut inbound = request.into_inner();
        let first = inbound.message().await?.ok_or_else(|| {
            Status::from(Error::invalid(
                "",
                "session",
                "the first message must name the session",
            ))
        })?;
        let relay = self.relay();
        let (output, input) = {
            let mut sessions = lock(&relay.sessions);
            let session = sessions
                .get_mut(&first.session)
                .filter(|s| s.node == node && !s.claimed)
                .ok_or_else(|| {
                    Status::from(Error::NotFound {
                        object: format!("console session {}", first.session),
                    })
                })?;
            session.claimed = true;
            (session.output.clone(), session.input.take())
        };
        // The response stream carries keystrokes for an attached console; for a log it
        // stays empty and ends with the session, which completes the agent's call.
        let (keys_tx, keys_rx) = mpsc::channel::<Result<v1::ConsoleInput, Status>>(64);
        let session = first.session.clone();
        tokio::spawn(async move {
            let mut input = input;
            if !first.data.is_empty() || !first.error.is_empty() {
                let _ = output
                    .send(Ok(v1::ConsoleData {
                        session: String::new(),
                        ..first
                    }))
                    .await;
            }
            loop {
                tokio::select! {
                    message = inbound.message() => match message {
                        Ok(Some(data)) => {
                            let failed = !data.error.is_empty();
                            let item = if failed {
                                Err(Status::from(Error::Unavailable { message: data.error.clone() }))
                            } else {
                                Ok(v1::ConsoleData { session: String::new(), ..data })
                            };
                            if output.send(item).await.is_err() || failed {
                                break;
                            }
                        }
                        Ok(None) => break,
                        Err(status) => {
                            let _ = output.send(Err(Status::unavailable(format!("the agent's console stream failed: {}", status.message())))).await;
                            break;
                        }
                    },
                    key = async { match input.as_mut() { Some(rx) => rx.recv().await, None => std::future::pending().await } } => match key {
                        Some(key) => { if keys_tx.send(Ok(key)).await.is_err() { break; } }
                        None => input = None,
                    },
                    _ = output.closed() => break,
                }
            }
            lock(&relay.sessions).remove(&session);
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(keys_rx),
        )))
    }
}

/// Stream helper for tests and clients: concatenates console data until the stream ends.
pub async fn collect(
    mut stream: impl Stream<Item = Result<v1::ConsoleData, Status>> + Unpin,
) -> Result<Vec<u8>, Error> {
    let mut out = Vec::new();
    while let Some(item) = stream.next().await {
        out.extend(item.map_err(Error::from)?.data);
    }
    Ok(out)
}
