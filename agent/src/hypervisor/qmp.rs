//! A small QMP (QEMU Machine Protocol) client over a unix socket.
//!
//! QMP is line-delimited JSON: QEMU greets with `{"QMP": …}`, the client enters command
//! mode with `qmp_capabilities`, then each `{"execute": …, "id": …}` gets one
//! `{"return": …}` or `{"error": …}` carrying the same `id`, with asynchronous
//! `{"event": …}` lines interleaved. Events that arrive while a command is pending are
//! kept and handed out by [`Qmp::next_event`].
//!
//! QEMU serves one QMP client at a time on a socket, so the driver connects for one
//! operation and lets go: a second client would wait until the first disconnects.

use std::collections::VecDeque;
use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

/// What can go wrong talking QMP.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// The socket could not be reached, read or written.
    #[error("QMP socket I/O")]
    Io(#[from] std::io::Error),
    /// QEMU closed the connection.
    #[error("QMP connection closed by QEMU")]
    Closed,
    /// QEMU sent something that is not QMP.
    #[error("QMP protocol: {0}")]
    Protocol(String),
    /// QEMU refused a command.
    #[error("QMP command {command} failed: {class}: {desc}")]
    Command {
        /// The command that failed.
        command: String,
        /// QMP's error class, e.g. `GenericError`, `DeviceNotFound`.
        class: String,
        /// QEMU's description.
        desc: String,
    },
    /// No answer in time (QEMU is busy, hung, or serving another client).
    #[error("QMP gave no answer within {0:?}")]
    Timeout(Duration),
}

/// One QMP session in command mode.
#[derive(Debug)]
pub struct Qmp {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    events: VecDeque<Value>,
    next_id: u64,
    greeting: Value,
}

impl Qmp {
    /// Connects, reads the greeting and negotiates capabilities, all within `timeout`.
    pub async fn connect(path: &Path, timeout: Duration) -> Result<Self, QmpError> {
        tokio::time::timeout(timeout, Self::connect_inner(path))
            .await
            .map_err(|_| QmpError::Timeout(timeout))?
    }

    async fn connect_inner(path: &Path) -> Result<Self, QmpError> {
        let stream = UnixStream::connect(path).await?;
        let (read, writer) = stream.into_split();
        let mut qmp = Qmp {
            reader: BufReader::new(read),
            writer,
            events: VecDeque::new(),
            next_id: 1,
            greeting: Value::Null,
        };
        let greeting = qmp.read_message().await?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Protocol(format!(
                "expected a greeting, got {greeting}"
            )));
        }
        qmp.greeting = greeting;
        qmp.execute("qmp_capabilities", None).await?;
        Ok(qmp)
    }

    /// The greeting QEMU sent (its version and capabilities).
    pub fn greeting(&self) -> &Value {
        &self.greeting
    }

    /// Runs `command` with optional `arguments` and returns its `return` value.
    pub async fn execute(
        &mut self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, QmpError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut request = json!({ "execute": command, "id": id });
        if let Some(arguments) = arguments {
            request["arguments"] = arguments;
        }
        let mut line = request.to_string();
        line.push('\n');
        self.writer.write_all(line.as_bytes()).await?;
        loop {
            let message = self.read_message().await?;
            if message.get("event").is_some() {
                self.events.push_back(message);
                continue;
            }
            if message.get("id").and_then(Value::as_u64) != Some(id) {
                return Err(QmpError::Protocol(format!(
                    "answer to an unknown request: {message}"
                )));
            }
            if let Some(value) = message.get("return") {
                return Ok(value.clone());
            }
            if let Some(error) = message.get("error") {
                let field = |name: &str| {
                    error
                        .get(name)
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_owned()
                };
                return Err(QmpError::Command {
                    command: command.to_owned(),
                    class: field("class"),
                    desc: field("desc"),
                });
            }
            return Err(QmpError::Protocol(format!("unexpected message: {message}")));
        }
    }

    /// The next asynchronous event (`{"event": NAME, "data": …, "timestamp": …}`), waiting
    /// for one if none is queued.
    pub async fn next_event(&mut self) -> Result<Value, QmpError> {
        if let Some(event) = self.events.pop_front() {
            return Ok(event);
        }
        loop {
            let message = self.read_message().await?;
            if message.get("event").is_some() {
                return Ok(message);
            }
        }
    }

    async fn read_message(&mut self) -> Result<Value, QmpError> {
        let mut line = String::new();
        loop {
            line.clear();
            if self.reader.read_line(&mut line).await? == 0 {
                return Err(QmpError::Closed);
            }
            if !line.trim().is_empty() {
                break;
            }
        }
        serde_json::from_str(&line)
            .map_err(|e| QmpError::Protocol(format!("{e} in {:?}", line.trim_end())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixListener;

    /// A scripted QMP server: greets, then answers each request from `replies` in turn,
    /// echoing the request's id, after sending the given events.
    async fn serve(listener: UnixListener, replies: Vec<(Vec<Value>, Value)>) -> Vec<Value> {
        let (stream, _) = listener.accept().await.unwrap();
        let (read, mut write) = stream.into_split();
        let mut lines = BufReader::new(read).lines();
        write
            .write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": [\"oob\"]}}\r\n")
            .await
            .unwrap();
        let mut seen = Vec::new();
        for (events, reply) in replies {
            let request: Value =
                serde_json::from_str(&lines.next_line().await.unwrap().unwrap()).unwrap();
            for event in events {
                write
                    .write_all(format!("{event}\r\n").as_bytes())
                    .await
                    .unwrap();
            }
            let mut reply = reply;
            reply["id"] = request["id"].clone();
            write
                .write_all(format!("{reply}\r\n").as_bytes())
                .await
                .unwrap();
            seen.push(request);
        }
        seen
    }

    #[tokio::test]
    async fn negotiates_runs_commands_and_keeps_events() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let powerdown =
            json!({"event": "POWERDOWN", "timestamp": {"seconds": 1, "microseconds": 0}});
        let server = tokio::spawn(serve(
            listener,
            vec![
                (vec![], json!({"return": {}})),
                (
                    vec![powerdown.clone()],
                    json!({"return": {"status": "running", "running": true}}),
                ),
                (
                    vec![],
                    json!({"error": {"class": "DeviceNotFound", "desc": "no disk0"}}),
                ),
            ],
        ));

        let mut qmp = Qmp::connect(&path, Duration::from_secs(5)).await.unwrap();
        let status = qmp.execute("query-status", None).await.unwrap();
        assert_eq!(status["status"], "running");
        let error = qmp
            .execute("device_del", Some(json!({"id": "disk0"})))
            .await
            .unwrap_err();
        assert!(
            matches!(&error, QmpError::Command { class, desc, .. } if class == "DeviceNotFound" && desc == "no disk0"),
            "{error:?}"
        );
        assert_eq!(qmp.next_event().await.unwrap()["event"], "POWERDOWN");

        let seen = server.await.unwrap();
        assert_eq!(seen[0]["execute"], "qmp_capabilities");
        assert_eq!(seen[2]["arguments"], json!({"id": "disk0"}));
        let ids: Vec<_> = seen.iter().map(|r| r["id"].as_u64().unwrap()).collect();
        assert_eq!(ids, vec![1, 2, 3]);
    }

    #[tokio::test]
    async fn a_silent_server_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let _listener = UnixListener::bind(&path).unwrap();
        let error = Qmp::connect(&path, Duration::from_millis(200))
            .await
            .unwrap_err();
        assert!(matches!(error, QmpError::Timeout(_)), "{error:?}");
    }
}
