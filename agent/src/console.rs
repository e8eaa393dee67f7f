//! Serial consoles, served to the apiserver, which relays them to users (`ferro logs`,
//! `ferro console`). Users never reach nodes, and the CLI never reads node files.
//!
//! The agent keeps one `Consoles.Tunnel` call open with its node token; each
//! `ConsoleOpen` that comes down it starts a session: a `Consoles.Serve` call whose first
//! message is `ConsoleData{session}`, followed by
//! - `Log`: the serial log from its start (or `tailBytes` before its end) to its end, then
//!   the call ends;
//! - `Follow`: the same, then new output as the log grows (polled), until the apiserver
//!   ends the call;
//! - `Attach`: what the guest prints on its console socket as it comes, while the
//!   keystrokes the apiserver sends back on the Serve call are typed into it. QEMU serves
//!   one client per console socket; the apiserver fans one session out to its readers.
//!
//! A session that cannot go on sends `ConsoleData{error}` and ends. The serial log is the
//! driver's (`serial.log` in the VM's directory, kept across restarts).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ferro_api::client::Client;
use ferro_api::retry::{self, BackoffBuilder};
use ferro_api::v1::{self, console_open::Mode};
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::hypervisor::{Hypervisor, validate_uid};

/// How often a followed log is checked for growth.
const FOLLOW_POLL: Duration = Duration::from_millis(200);
/// How long an apiserver without the Consoles service is left alone.
const ASK_FOR_CONSOLES_AGAIN: Duration = Duration::from_secs(30);
/// The most bytes in one message.
const CHUNK: usize = 64 << 10;

/// Keeps the node's tunnel open and serves every console session asked for, until
/// cancelled. An apiserver without the Consoles service is asked again now and then.
pub async fn run(client: Client, node: String, driver: Arc<dyn Hypervisor>) {
    let mut backoff = retry::reconnect_to_apiserver().build();
    let mut said_unimplemented = false;
    // Sessions end with the agent: dropping this set aborts them.
    let mut sessions = tokio::task::JoinSet::new();
    loop {
        let hello = v1::TunnelHello { node: node.clone() };
        match client.consoles().tunnel(hello).await {
            Ok(response) => {
                backoff = retry::reconnect_to_apiserver().build();
                tracing::debug!("console tunnel open");
                let mut opens = response.into_inner();
                loop {
                    match opens.message().await {
                        Ok(Some(open)) => {
                            while sessions.try_join_next().is_some() {}
                            sessions.spawn(serve(client.clone(), driver.clone(), open));
                        }
                        Ok(None) => break,
                        Err(status) => {
                            tracing::info!(%status, "console tunnel closed");
                            break;
                        }
                    }
                }
            }
            Err(status) if status.code() == tonic::Code::Unimplemented => {
                if !said_unimplemented {
                    tracing::info!(
                        "the apiserver has no Consoles service; consoles are not served"
                    );
                    said_unimplemented = true;
                }
                tokio::time::sleep(ASK_FOR_CONSOLES_AGAIN).await;
                continue;
            }
            Err(status) => {
                tracing::warn!(%status, "opening the console tunnel failed");
            }
        }
        let delay = backoff.next().unwrap_or(ASK_FOR_CONSOLES_AGAIN);
        tracing::debug!(?delay, "reopening the console tunnel");
        tokio::time::sleep(delay).await;
    }
}

/// Serves one session.
pub async fn serve(client: Client, driver: Arc<dyn Hypervisor>, open: v1::ConsoleOpen) {
    let (tx, rx) = mpsc::channel::<v1::ConsoleData>(32);
    let first = v1::ConsoleData {
        session: open.session.clone(),
        ..Default::default()
    };
    if tx.send(first).await.is_err() {
        return;
    }
    // The call runs beside the producer: the apiserver may wait for data before it
    // answers. Input (for Attach) and the end of the call come back through `input`.
    let (input_tx, mut input) = mpsc::channel::<Vec<u8>>(32);
    let mut consoles = client.consoles();
    let session = open.session.clone();
    let call = tokio::spawn(async move {
        match consoles.serve(ReceiverStream::new(rx)).await {
            Ok(response) => {
                let mut stream = response.into_inner();
                while let Ok(Some(keys)) = stream.message().await {
                    if input_tx.send(keys.data).await.is_err() {
                        break;
                    }
                }
            }
            Err(status) => tracing::warn!(session, %status, "console session refused"),
        }
    });
    let outcome = produce(&driver, &open, &tx, &mut input).await;
    if let Err(message) = outcome {
        tracing::debug!(session = open.session, %message, "console session failed");
        let _ = tx
            .send(v1::ConsoleData {
                error: message,
                ..Default::default()
            })
            .await;
    }
    drop(tx);
    // Let the call finish (the apiserver sees the end of the data), but not for ever.
    let abort = call.abort_handle();
    if tokio::time::timeout(Duration::from_secs(30), call)
        .await
        .is_err()
    {
        abort.abort();
    }
}

async fn produce(
    driver: &Arc<dyn Hypervisor>,
    open: &v1::ConsoleOpen,
    tx: &mpsc::Sender<v1::ConsoleData>,
    input: &mut mpsc::Receiver<Vec<u8>>,
) -> Result<(), String> {
    let uid = open.server_uid.as_str();
    validate_uid(uid).map_err(|e| e.to_string())?;
    let vm = driver
        .status(uid)
        .await
        .map_err(|e| crate::images::error_chain(&e))?
        .ok_or_else(|| format!("no guest {uid} on this node"))?;
    match Mode::try_from(open.mode) {
        Ok(Mode::Log) => send_log(&vm.serial_log, open.tail_bytes, tx, None).await,
        Ok(Mode::Follow) => send_log(&vm.serial_log, open.tail_bytes, tx, Some(input)).await,
        Ok(Mode::Attach) => {
            if !vm.is_alive() {
                return Err(format!("the guest {uid} is not running"));
            }
            attach(&vm.console_socket, tx, input).await
        }
        _ => Err(format!("unknown console mode {}", open.mode)),
    }
}

async fn send(tx: &mpsc::Sender<v1::ConsoleData>, data: Vec<u8>) -> Result<(), ()> {
    tx.send(v1::ConsoleData {
        data,
        ..Default::default()
    })
    .await
    .map_err(drop)
}

/// Sends the log from `tail` bytes before its end (all of it for 0); with `follow`, keeps
/// sending what is appended until the session ends.
async fn send_log(
    log: &Path,
    tail: u64,
    tx: &mpsc::Sender<v1::ConsoleData>,
    follow: Option<&mut mpsc::Receiver<Vec<u8>>>,
) -> Result<(), String> {
    let len = match tokio::fs::metadata(log).await {
        Ok(m) => m.len(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(e) => return Err(format!("reading the serial log: {e}")),
    };
    let mut offset = if tail > 0 {
        len.saturating_sub(tail)
    } else {
        0
    };
    let Some(input) = follow else {
        read_from(log, &mut offset, Some(len), tx).await?;
        return Ok(());
    };
    loop {
        if read_from(log, &mut offset, None, tx).await? {
            return Ok(());
        }
        tokio::select! {
            _ = tokio::time::sleep(FOLLOW_POLL) => {}
            _ = tx.closed() => return Ok(()),
            keys = input.recv() => if keys.is_none() { return Ok(()) },
        }
    }
}

/// Sends the log's bytes from `offset` up to `until` (or its current end); returns true
/// when the receiving side is gone.
async fn read_from(
    log: &Path,
    offset: &mut u64,
    until: Option<u64>,
    tx: &mpsc::Sender<v1::ConsoleData>,
) -> Result<bool, String> {
    let mut file = match tokio::fs::File::open(log).await {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(format!("reading the serial log: {e}")),
    };
    let len = file
        .metadata()
        .await
        .map_err(|e| format!("reading the serial log: {e}"))?
        .len();
    if len < *offset {
        // Replaced by a new log: start over.
        *offset = 0;
    }
    let end = until.map_or(len, |u| u.min(len));
    file.seek(std::io::SeekFrom::Start(*offset))
        .await
        .map_err(|e| format!("reading the serial log: {e}"))?;
    let mut buf = vec![0u8; CHUNK];
    while *offset < end {
        let want = usize::try_from(end - *offset).unwrap_or(CHUNK).min(CHUNK);
        let n = file
            .read(&mut buf[..want])
            .await
            .map_err(|e| format!("reading the serial log: {e}"))?;
        if n == 0 {
            break;
        }
        *offset += n as u64;
        if send(tx, buf[..n].to_vec()).await.is_err() {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Relays the console socket both ways until either side ends.
async fn attach(
    socket: &PathBuf,
    tx: &mpsc::Sender<v1::ConsoleData>,
    input: &mut mpsc::Receiver<Vec<u8>>,
) -> Result<(), String> {
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .map_err(|e| format!("connecting to the console: {e}"))?;
    let (mut reader, mut writer) = stream.into_split();
    let mut buf = vec![0u8; CHUNK];
    loop {
        tokio::select! {
            read = reader.read(&mut buf) => match read {
                Ok(0) => return Ok(()),
                Ok(n) => if send(tx, buf[..n].to_vec()).await.is_err() { return Ok(()) },
                Err(e) => return Err(format!("reading the console: {e}")),
            },
            keys = input.recv() => match keys {
                Some(keys) => writer.write_all(&keys).await.map_err(|e| format!("writing to the console: {e}"))?,
                None => return Ok(()),
            },
            _ = tx.closed() => return Ok(()),
        }
    }
}
