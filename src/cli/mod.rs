//! The user's CLI, one module per verb or group of verbs (`apply`, `get`, `describe`,
//! `delete`, `diff`, `wait`, `explain`, `logs`, `completion`, `node`, `quota`, …), over the API
//! client.
//!
//! Every verb finds the apiserver and its token the same way ([`Connection::resolve`]):
//! flags, then `FERRO_SERVER` / `FERRO_TOKEN`, then the context of the [`config`] file
//! that `--context` (or `FERRO_CONTEXT`) names, else its current context.
//! API errors become one readable line each ([`Connection::explain`]).

use std::time::Duration;

use anyhow::anyhow;
use ferro_api::client::{Client, RetryPolicy};
use ferro_api::{Error as ApiError, Kind};

pub mod api_resources;
pub mod apply;
pub mod completion;
pub mod config;
pub mod console;
pub mod delete;
pub mod describe;
pub mod diff;
pub mod duration;
pub mod explain;
pub mod get;
pub mod image;
pub mod logs;
pub mod manifest;
pub mod node;
pub mod quota;
pub mod server;
mod table;
pub mod wait;

/// The apiserver address used when neither flag, environment nor config names one.
pub const DEFAULT_SERVER: &str = "127.0.0.1:7443";

/// The project used when neither `-p` nor the config names one.
pub const DEFAULT_PROJECT: &str = ferro_api::server::DEFAULT_PROJECT;

/// Where the apiserver is and who we are; shared by every verb.
#[derive(clap::Args, Debug, Clone)]
pub struct ConnectionArgs {
    /// The apiserver's address [default: from the config file, else 127.0.0.1:7443].
    #[arg(long, global = true, env = "FERRO_SERVER", value_name = "HOST:PORT")]
    pub server: Option<String>,
    /// The bearer token to present [default: from the config file].
    #[arg(
        long,
        global = true,
        env = "FERRO_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    pub token: Option<String>,
    /// The config file's context to use [default: its current context].
    #[arg(long, global = true, env = "FERRO_CONTEXT", value_name = "NAME")]
    pub context: Option<String>,
}

/// An error whose details were already printed; `main` only sets the exit status.
#[derive(Debug)]
pub struct Reported;

impl std::fmt::Display for Reported {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("failed")
    }
}

impl std::error::Error for Reported {}

/// A resolved connection: the client, and what it needs to explain failures.
pub struct Connection {
    /// The API client, or why there is none (no token anywhere).
    client: Result<Client, String>,
    /// The apiserver's address as the user gave it.
    pub server: String,
    /// The project of `-p`, else the config's, else `default`.
    pub project: String,
    /// Where the token came from, for error messages.
    token_source: String,
    /// The config's context in use, if any.
    pub context: Option<String>,
    /// Whether `--server` / `FERRO_SERVER` overrode the context's server.
    server_from_flags: bool,
}

impl Connection {
    /// Resolves address, token and project from flags, environment and the config file,
    /// and makes a client (which connects on first use). A missing token is reported by
    /// [`Connection::client`], so verbs can check their input first.
    pub fn resolve(args: &ConnectionArgs, project: Option<&str>) -> anyhow::Result<Self> {
        let config_path = config::path();
        let config = match &config_path {
            Some(path) => config::load(path)?.unwrap_or_default(),
            None => config::Config::default(),
        };
        let shown_path = config_path
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "~/.config/ferro/config.yaml".into());
        let context = config
            .select(args.context.as_deref())
            .map_err(|e| anyhow!("{shown_path}: {e}"))?
            .cloned()
            .unwrap_or_default();
        let context_name = Some(context.name.clone()).filter(|n| !n.is_empty());
        let server = args
            .server
            .clone()
            .or(context.server)
            .unwrap_or_else(|| DEFAULT_SERVER.to_owned());
        let (token, token_source) = match (&args.token, context.token) {
            (Some(token), _) => (Some(token.clone()), "--token / FERRO_TOKEN".to_owned()),
            (None, Some(token)) => (
                Some(token),
                format!("context {} of {shown_path}", context.name),
            ),
            (None, None) => (None, String::new()),
        };
        let project = project
            .map(str::to_owned)
            .or(context.project)
            .unwrap_or_else(|| DEFAULT_PROJECT.to_owned());
        let client = match token {
            Some(token) => Client::connect_lazy(&server, &token)
                .map(|client| {
                    client
                        .with_retry(RetryPolicy::default())
                        .on_retry(|_| retry_notice())
                })
                .map_err(|e| e.to_string()),
            None => Err(format!(
                "no token: pass --token or set FERRO_TOKEN, or run `ferro up`, which writes one \
                 to {shown_path}"
            )),
        };
        Ok(Connection {
            client,
            server,
            project,
            token_source,
            context: context_name,
            server_from_flags: args.server.is_some(),
        })
    }

    /// Where this connection writes, as one line: `context: NAME (SERVER)`.
    pub fn describe_target(&self) -> String {
        match (&self.context, self.server_from_flags) {
            (Some(name), false) => format!("context: {name} ({})", self.server),
            (Some(name), true) => format!(
                "context: {name}, server {} from --server / FERRO_SERVER",
                self.server
            ),
            (None, _) => format!("context: none (server {})", self.server),
        }
    }

    /// Prints [`Connection::describe_target`] on stderr when stderr is a terminal, so a
    /// user sees which cloud a write goes to and scripts' output stays unchanged.
    pub fn announce_target(&self) {
        if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            eprintln!("{}", self.describe_target());
        }
    }

    /// The client; fails when no token was found.
    pub fn client(&self) -> anyhow::Result<&Client> {
        self.client.as_ref().map_err(|e| anyhow!("{e}"))
    }

    /// Turns an API error into one line a user can act on.
    pub fn explain(&self, error: &ApiError) -> String {
        match error {
            ApiError::Unavailable { message } if !message.starts_with("store unavailable") => {
                format!(
                    "cannot reach the apiserver at {}: {} (is `ferro up` running?)",
                    self.server,
                    unreachable_reason(&self.server, message)
                )
            }
            ApiError::Unauthenticated { message } => format!(
                "the apiserver at {} refused the token from {}: {message}",
                self.server, self.token_source
            ),
            other => other.to_string(),
        }
    }

    /// Whether an error means no further call can succeed (so a verb stops early).
    pub fn is_fatal(error: &ApiError) -> bool {
        matches!(
            error,
            ApiError::Unavailable { .. } | ApiError::Unauthenticated { .. }
        )
    }
}

/// Says once per command, on stderr, that a call waits for the apiserver to come back;
/// the call's own error, if it never does, follows as the usual `error:` line.
fn retry_notice() {
    static TOLD: std::sync::Once = std::sync::Once::new();
    TOLD.call_once(|| eprintln!("apiserver unavailable, retrying…"));
}

/// Why the apiserver cannot be reached, in a few words: the transport's message is long
/// and generic, so ask the socket directly.
fn unreachable_reason(server: &str, transport_message: &str) -> String {
    use std::net::{TcpStream, ToSocketAddrs};
    let address = server.rsplit("://").next().unwrap_or(server);
    let addrs = match address.to_socket_addrs() {
        Ok(addrs) => addrs.collect::<Vec<_>>(),
        Err(e) => return format!("cannot resolve `{address}`: {e}"),
    };
    let Some(first) = addrs.first() else {
        return format!("`{address}` resolves to no address");
    };
    match TcpStream::connect_timeout(first, Duration::from_secs(3)) {
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => "connection refused".into(),
        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => "connection timed out".into(),
        Err(e) => e.to_string(),
        // The port answers but not with gRPC, or it came up meanwhile.
        Ok(_) => transport_message.to_owned(),
    }
}

/// The kind a user names on the command line (`server`, `servers`, `srv`, `Server`).
pub fn parse_kind(word: &str) -> anyhow::Result<Kind> {
    Kind::lookup(word).ok_or_else(|| {
        let names: Vec<String> = Kind::ALL.iter().map(|k| k.plural().to_owned()).collect();
        anyhow!("unknown kind `{word}`; known kinds: {}", names.join(", "))
    })
}

/// `server/web-1`: how the CLI names an object in its output, as kubectl does.
pub fn object_label(kind: Kind, name: &str) -> String {
    format!("{}/{name}", kind.name().to_ascii_lowercase())
}

/// A current-thread runtime for a CLI verb.
pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

/// `server/web-1` (or `servers/web-1`, `Server/web-1`) as a kind and a name.
pub fn parse_reference(word: &str) -> anyhow::Result<(Kind, String)> {
    let Some((kind, name)) = word.split_once('/') else {
        return Err(anyhow!(
            "`{word}` names no object: write KIND/NAME, e.g. server/web-1"
        ));
    };
    if name.is_empty() {
        return Err(anyhow!(
            "`{word}` names no object: write KIND/NAME, e.g. server/web-1"
        ));
    }
    Ok((parse_kind(kind)?, name.to_owned()))
}

/// Seconds since the Unix epoch, now.
pub fn now_seconds() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default()
}

/// How long ago a timestamp was, as `5s`, `3m`, `2h`, `4d`; empty when unset.
pub fn ago(timestamp: Option<&prost_types::Timestamp>) -> String {
    timestamp
        .map(|t| table::duration(now_seconds() - t.seconds))
        .unwrap_or_default()
}

/// Waits for Ctrl-C; never returns when signals cannot be watched.
pub async fn interrupted() {
    if tokio::signal::ctrl_c().await.is_err() {
        std::future::pending::<()>().await;
    }
}
