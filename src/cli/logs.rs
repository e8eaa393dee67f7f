//! `ferro logs server/NAME [-f] [--tail BYTES]`: a Server's serial console log, relayed by
//! the apiserver from the agent of the server's node, written to stdout as it comes. An
//! empty log is not an error, but it is said (`no console output yet`, on stderr), so that
//! nothing printed is never mistaken for a hang or a failure.
//!
//! [`wait_for_console`] follows the same relay for `ferro wait server/NAME --for
//! console=REGEX`.

use std::io::Write;
use std::time::Duration;

use anyhow::anyhow;
use ferro_api::{Kind, v1};
use futures::StreamExt;

use super::wait::WaitArgs;
use super::{Connection, ConnectionArgs, interrupted, parse_reference};

/// Arguments of `ferro logs`.
#[derive(clap::Args, Debug)]
pub struct LogsArgs {
    /// The server: `server/web-1`, or just `web-1`.
    #[arg(value_name = "server/NAME")]
    pub target: String,
    /// Keep streaming new output until Ctrl-C.
    #[arg(short = 'f', long)]
    pub follow: bool,
    /// Start this many bytes before the end of the log [default: the whole log].
    #[arg(long, value_name = "BYTES")]
    pub tail: Option<u64>,
    /// The project [default: the config's project, else `default`].
    #[arg(short = 'p', long, value_name = "PROJECT")]
    pub project: Option<String>,
}

/// Runs `ferro logs`.
pub fn run(connection: &ConnectionArgs, args: LogsArgs) -> anyhow::Result<()> {
    let runtime = super::runtime()?;
    let _entered = runtime.enter();
    let (kind, name) = if args.target.contains('/') {
        parse_reference(&args.target)?
    } else {
        (Kind::Server, args.target.clone())
    };
    if kind != Kind::Server {
        return Err(anyhow!(
            "only servers have logs; `{}` is a {}",
            args.target,
            kind.name()
        ));
    }
    let connection = Connection::resolve(connection, args.project.as_deref())?;
    let client = connection.client()?;
    let request = v1::LogsRequest {
        key: Some(v1::ObjectKey {
            kind: Kind::Server.name().to_owned(),
            project: connection.project.clone(),
            name: name.clone(),
        }),
        follow: args.follow,
        tail_bytes: args.tail.unwrap_or(0),
    };
    let mut consoles = client.consoles();
    runtime.block_on(async {
        let stream = tokio::select! {
            response = consoles.logs(request) => response.map_err(|s| anyhow!("{}", explain(&connection, &name, s.into())))?,
            _ = interrupted() => return Ok(()),
        };
        let mut stream = stream.into_inner();
        let mut out = std::io::stdout();
        let mut written = 0usize;
        loop {
            let item = tokio::select! {
                item = stream.next() => item,
                _ = interrupted() => return Ok(()),
            };
            match item {
                None => {
                    if written == 0 {
                        eprintln!("no console output yet");
                    }
                    return Ok(());
                }
                Some(Err(status)) => {
                    return Err(anyhow!("{}", explain(&connection, &name, status.into())));
                }
                Some(Ok(data)) => {
                    written += data.data.len();
                    out.write_all(&data.data)?;
                    out.flush()?;
                    if !data.error.is_empty() {
                        return Err(anyhow!("servers/{name}: {}", data.error));
                    }
                }
            }
        }
    })
}

/// One line for a failed logs call. The relay reports a node-side failure (no guest yet,
/// the node's agent not connected) as "unavailable", like an unreachable apiserver; only
/// the transport's own failures are about reaching the apiserver.
fn explain(connection: &Connection, name: &str, error: ferro_api::Error) -> String {
    match &error {
        ferro_api::Error::Unavailable { message } if !is_transport(message) => {
            format!("servers/{name}: {message}")
        }
        _ => connection.explain(&error),
    }
}

/// Whether an `Unavailable` message is the transport's (the apiserver cannot be reached)
/// rather than the relay's (the node's side of the console is not there).
fn is_transport(message: &str) -> bool {
    [
        "transport error",
        "tcp connect error",
        "error trying to connect",
        "dns error",
        "the connection to the apiserver broke",
    ]
    .iter()
    .any(|m| message.contains(m))
}

/// `ferro wait server/NAME… --for console=REGEX`: follows each server's serial console
/// until a line matches, and prints it.
pub fn wait_for_consoles(
    connection: &ConnectionArgs,
    args: &WaitArgs,
    pattern: &str,
    timeout: Duration,
    runtime: &tokio::runtime::Runtime,
) -> anyhow::Result<()> {
    let regex = regex_lite::Regex::new(pattern)
        .map_err(|e| anyhow!("--for console={pattern}: not a regular expression: {e}"))?;
    let mut names = Vec::new();
    for target in &args.targets {
        let (kind, name) = parse_reference(target)?;
        if kind != Kind::Server {
            return Err(anyhow!(
                "--for console=…: only servers have a console; `{target}` is a {}",
                kind.name()
            ));
        }
        names.push(name);
    }
    let connection = Connection::resolve(connection, args.project.as_deref())?;
    let deadline = tokio::time::Instant::now() + timeout;
    for name in names {
        let found = runtime.block_on(wait_for_console(&connection, &name, &regex, deadline));
        match found {
            Ok(line) => println!("server/{name} console: {line}"),
            Err(ConsoleWaitError::TimedOut(blocker)) => {
                return Err(anyhow!(
                    "timed out after {} waiting for servers/{name} console line matching `{pattern}`: {blocker}",
                    super::duration::show_duration(args.timeout)
                ));
            }
            Err(ConsoleWaitError::Interrupted) => return Err(anyhow!("interrupted")),
            Err(ConsoleWaitError::Failed(line)) => return Err(anyhow!("{line}")),
        }
    }
    Ok(())
}

/// Why `ferro wait --for console=REGEX` ended without a matching line.
#[derive(Debug)]
pub enum ConsoleWaitError {
    /// The deadline passed; the last reason the console could not be read, or its last
    /// line.
    TimedOut(String),
    /// Ctrl-C.
    Interrupted,
    /// A failure waiting cannot cure (no such server, a refused token), as one line.
    Failed(String),
}

/// Follows the serial console of `servers/NAME` from the start of its log until a line
/// matches `pattern`; returns that line. A console that cannot be read yet (the server not
/// placed, its guest not started, the node's agent not connected) is tried again every
/// second until `deadline`; a log that ends (the guest restarted) is read again.
pub async fn wait_for_console(
    connection: &Connection,
    name: &str,
    pattern: &regex_lite::Regex,
    deadline: tokio::time::Instant,
) -> Result<String, ConsoleWaitError> {
    follow_console(connection, name, 0, Some(pattern), deadline).await
}

/// How many bytes the serial console log of `servers/NAME` holds now; an error line when
/// it cannot be read.
pub async fn console_length(connection: &Connection, name: &str) -> Result<usize, String> {
    let client = connection.client().map_err(|e| e.to_string())?;
    let request = v1::LogsRequest {
        key: Some(v1::ObjectKey {
            kind: Kind::Server.name().to_owned(),
            project: connection.project.clone(),
            name: name.to_owned(),
        }),
        follow: false,
        tail_bytes: 0,
    };
    let mut stream = client
        .consoles()
        .logs(request)
        .await
        .map_err(|s| explain(connection, name, s.into()))?
        .into_inner();
    let mut length = 0;
    while let Some(item) = stream.next().await {
        let data = item.map_err(|s| explain(connection, name, s.into()))?;
        if !data.error.is_empty() {
            return Err(format!("servers/{name}: {}", data.error));
        }
        length += data.data.len();
    }
    Ok(length)
}

/// Follows the serial console of `servers/NAME`, skipping the first `skip` bytes of its
/// log, until a line matches `pattern` (any line with text when `None`); returns it.
pub async fn follow_console(
    connection: &Connection,
    name: &str,
    skip: usize,
    pattern: Option<&regex_lite::Regex>,
    deadline: tokio::time::Instant,
) -> Result<String, ConsoleWaitError> {
    let client = connection
        .client()
        .map_err(|e| ConsoleWaitError::Failed(e.to_string()))?;
    let request = v1::LogsRequest {
        key: Some(v1::ObjectKey {
            kind: Kind::Server.name().to_owned(),
            project: connection.project.clone(),
            name: name.to_owned(),
        }),
        follow: true,
        tail_bytes: 0,
    };
    // Written by the search, read when the deadline passes.
    let blocker = std::cell::RefCell::new("no console output yet".to_owned());
    let search = async {
        loop {
            let opened = client.consoles().logs(request.clone()).await;
            let mut stream = match opened {
                Ok(stream) => stream.into_inner(),
                Err(status) => {
                    let error = ferro_api::Error::from(status);
                    match &error {
                        ferro_api::Error::FailedPrecondition { message, .. } => {
                            *blocker.borrow_mut() = message.clone()
                        }
                        ferro_api::Error::Unavailable { message } if !is_transport(message) => {
                            *blocker.borrow_mut() = message.clone()
                        }
                        _ => return Err(explain(connection, name, error)),
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            let mut partial: Vec<u8> = Vec::new();
            let mut to_skip = skip;
            while let Some(item) = stream.next().await {
                let data = match item {
                    Ok(data) => data,
                    Err(status) => {
                        *blocker.borrow_mut() = explain(connection, name, status.into());
                        break;
                    }
                };
                let skipped = to_skip.min(data.data.len());
                to_skip -= skipped;
                partial.extend_from_slice(&data.data[skipped..]);
                while let Some(end) = partial.iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = partial.drain(..=end).collect();
                    let line = String::from_utf8_lossy(&line);
                    let line = line.trim_end_matches(['\n', '\r']);
                    let matched = match pattern {
                        Some(pattern) => pattern.is_match(line),
                        None => !line.trim().is_empty(),
                    };
                    if matched {
                        return Ok(line.to_owned());
                    }
                    if !line.trim().is_empty() {
                        *blocker.borrow_mut() = format!("last line: {line}");
                    }
                }
                if !data.error.is_empty() {
                    *blocker.borrow_mut() = data.error.clone();
                    break;
                }
            }
            // The log ended (the guest stopped, the agent went away): read it again.
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    };
    tokio::select! {
        found = search => found.map_err(ConsoleWaitError::Failed),
        _ = tokio::time::sleep_until(deadline) => Err(ConsoleWaitError::TimedOut(blocker.borrow().clone())),
        _ = interrupted() => Err(ConsoleWaitError::Interrupted),
    }
}
