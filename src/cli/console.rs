//! `ferro console server/NAME`: an interactive serial console through the apiserver's
//! relay (`Consoles.Attach`), which the node's agent serves. The CLI never reaches nodes.
//!
//! On a terminal, stdin is put in raw mode so every keystroke (Ctrl-C included) goes to
//! the guest; Ctrl-] (0x1d) leaves and restores the terminal, as telnet does. Output is
//! printed as it comes. One client at a time is the writer; the relay refuses a second
//! one with its reason, and `--read-only` attaches as one of any number of readers.
//! Without a terminal (a pipe), stdin is sent as it is and the command leaves once stdin
//! has ended and the console has been quiet for a moment.

use std::io::{IsTerminal, Read, Write};
use std::os::fd::AsFd;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use ferro_api::{Kind, v1};
use tokio::sync::mpsc;

use super::{Connection, ConnectionArgs, object_label};

/// The byte Ctrl-] sends.
pub const ESCAPE: u8 = 0x1d;
/// How long a console fed from a pipe stays after stdin ended and output stopped.
const QUIET_AFTER_EOF: Duration = Duration::from_secs(2);

/// Arguments of `ferro console`.
#[derive(clap::Args, Debug)]
pub struct ConsoleArgs {
    /// The Server: `server/web-1` (or just `web-1`).
    #[arg(value_name = "server/NAME")]
    pub target: String,
    /// The project [default: the config's project, else `default`].
    #[arg(short = 'p', long, value_name = "PROJECT")]
    pub project: Option<String>,
    /// Only read: do not take the console's single writer place.
    #[arg(long)]
    pub read_only: bool,
}

/// The server name a target names: `server/NAME`, `servers/NAME` or `NAME`.
pub fn server_name(target: &str) -> anyhow::Result<String> {
    let name = match target.split_once('/') {
        Some((kind, name)) => {
            let kind = super::parse_kind(kind)?;
            if kind != Kind::Server {
                bail!("only servers have consoles, not {}", kind.plural());
            }
            name
        }
        None => target,
    };
    if name.is_empty() {
        bail!("`{target}` names no server: write server/NAME");
    }
    Ok(name.to_owned())
}

/// Puts a terminal in raw mode until dropped.
struct RawMode {
    saved: rustix::termios::Termios,
}

impl RawMode {
    fn enter() -> anyhow::Result<RawMode> {
        let stdin = std::io::stdin();
        let saved = rustix::termios::tcgetattr(stdin.as_fd()).context("reading the terminal")?;
        let mut raw = saved.clone();
        raw.make_raw();
        rustix::termios::tcsetattr(stdin.as_fd(), rustix::termios::OptionalActions::Now, &raw)
            .context("setting the terminal to raw mode")?;
        Ok(RawMode { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = rustix::termios::tcsetattr(
            std::io::stdin().as_fd(),
            rustix::termios::OptionalActions::Now,
            &self.saved,
        );
    }
}

/// What stdin gave.
enum Keys {
    Data(Vec<u8>),
    Escape,
    End,
}

/// Reads stdin on its own thread (blocking reads cannot be cancelled; the thread ends
/// with the process), stopping at the escape byte when on a terminal.
fn read_stdin(terminal: bool) -> mpsc::Receiver<Keys> {
    let (tx, rx) = mpsc::channel(16);
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        let mut buf = [0u8; 4096];
        loop {
            let n = match stdin.read(&mut buf) {
                Ok(0) | Err(_) => {
                    let _ = tx.blocking_send(Keys::End);
                    return;
                }
                Ok(n) => n,
            };
            let data = &buf[..n];
            if terminal && let Some(at) = data.iter().position(|b| *b == ESCAPE) {
                if at > 0 {
                    let _ = tx.blocking_send(Keys::Data(data[..at].to_vec()));
                }
                let _ = tx.blocking_send(Keys::Escape);
                return;
            }
            if tx.blocking_send(Keys::Data(data.to_vec())).is_err() {
                return;
            }
        }
    });
    rx
}

/// Runs `ferro console`.
pub fn run(connection: &ConnectionArgs, args: ConsoleArgs) -> anyhow::Result<()> {
    let name = server_name(&args.target)?;
    let runtime = super::runtime()?;
    // The client's connection needs the runtime it is made in.
    let _entered = runtime.enter();
    let conn = Connection::resolve(connection, args.project.as_deref())?;
    let label = object_label(Kind::Server, &name);
    runtime.block_on(async {
        let client = conn.client()?;
        let (input, rx) = mpsc::channel(64);
        input
            .send(v1::AttachInput {
                key: Some(v1::ObjectKey {
                    kind: Kind::Server.name().to_owned(),
                    project: conn.project.clone(),
                    name: name.clone(),
                }),
                write: !args.read_only,
                ..Default::default()
            })
            .await
            .map_err(|_| anyhow!("the console session ended before it started"))?;
        let mut output = client
            .consoles()
            .attach(futures::stream::unfold(rx, |mut rx| async move {
                rx.recv().await.map(|input| (input, rx))
            }))
            .await
            .map_err(|status| {
                anyhow!("{label}: {}", conn.explain(&ferro_api::Error::from(status)))
            })?
            .into_inner();

        let terminal = std::io::stdin().is_terminal();
        let mode = if args.read_only { "read-only; " } else { "" };
        if terminal {
            eprint!("Connected to {label} ({mode}Ctrl-] to leave)\r\n");
        } else {
            eprintln!("Connected to {label} ({mode}stdin is not a terminal)");
        }
        let raw = if terminal {
            Some(RawMode::enter()?)
        } else {
            None
        };
        let mut keys = read_stdin(terminal);
        let mut stdin_open = true;
        let mut stdout = std::io::stdout();
        let result: anyhow::Result<()> = loop {
            let quiet = async {
                if stdin_open || terminal {
                    std::future::pending::<()>().await;
                } else {
                    tokio::time::sleep(QUIET_AFTER_EOF).await;
                }
            };
            tokio::select! {
                message = output.message() => match message {
                    Ok(Some(data)) => {
                        if !data.error.is_empty() {
                            break Err(anyhow!("{label}: {}", data.error));
                        }
                        stdout.write_all(&data.data)?;
                        stdout.flush()?;
                    }
                    Ok(None) => break Err(anyhow!("{label}: the console session ended")),
                    Err(status) => break Err(anyhow!(
                        "{label}: {}",
                        conn.explain(&ferro_api::Error::from(status))
                    )),
                },
                key = keys.recv(), if stdin_open => match key {
                    Some(Keys::Data(data)) if !args.read_only => {
                        let sent = input
                            .send(v1::AttachInput { data, ..Default::default() })
                            .await;
                        if sent.is_err() {
                            break Err(anyhow!("{label}: the console session ended"));
                        }
                    }
                    Some(Keys::Data(_)) => {}
                    Some(Keys::Escape) => break Ok(()),
                    Some(Keys::End) | None => {
                        stdin_open = false;
                        if terminal {
                            break Ok(());
                        }
                    }
                },
                _ = quiet => break Ok(()),
            }
        };
        drop(raw);
        if terminal {
            eprintln!();
        }
        result
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_name_servers() {
        assert_eq!(server_name("server/web-1").unwrap(), "web-1");
        assert_eq!(server_name("servers/web-1").unwrap(), "web-1");
        assert_eq!(server_name("web-1").unwrap(), "web-1");
        assert!(server_name("server/").is_err());
        let err = server_name("network/n1").unwrap_err().to_string();
        assert!(err.contains("only servers have consoles"), "{err}");
    }
}
