//! `ferro logs server/NAME [-f] [--tail BYTES]`: a Server's serial console log, relayed by
//! the apiserver from the agent of the server's node, written to stdout as it comes.

use std::io::Write;

use anyhow::anyhow;
use ferro_api::{Kind, v1};
use futures::StreamExt;

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
        loop {
            let item = tokio::select! {
                item = stream.next() => item,
                _ = interrupted() => return Ok(()),
            };
            match item {
                None => return Ok(()),
                Some(Err(status)) => {
                    return Err(anyhow!("{}", explain(&connection, &name, status.into())));
                }
                Some(Ok(data)) => {
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
        ferro_api::Error::Unavailable { message }
            if ![
                "transport error",
                "tcp connect error",
                "error trying to connect",
                "dns error",
            ]
            .iter()
            .any(|m| message.contains(m)) =>
        {
            format!("servers/{name}: {message}")
        }
        _ => connection.explain(&error),
    }
}
