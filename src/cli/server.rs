//! `ferro server stop|start|reboot NAME`: the power verbs. They are conveniences over the
//! declarative API, as `kubectl rollout restart` is: `stop` and `start` set the Server's
//! `spec.powerState`, `reboot` sets the annotation `ferro.io/reboot-requested-at` to the
//! current time; the node's agent does the rest. Each edit is a read-modify-write with the
//! object's resourceVersion (retried on conflicts), so the rest of the Server is kept.
//!
//! Then the verb watches the Server until `status.host` shows the result — the guest shut
//! down, running, or `lastReboot` equal to the request — printing each change on the way,
//! unless `--no-wait`. `lastReboot` only says QEMU reset the guest; `reboot` then waits for
//! the guest's first console line after the reset (or one matching `--console REGEX`), and
//! says it cannot know when the guest is back when the console cannot be read. A later `ferro apply` of a manifest without `powerState` sets it
//! back to the default, `Running`, as with any field the manifest owns.

use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use ferro_agent::server::plan::REBOOT_ANNOTATION;
use ferro_api::client::Selection;
use ferro_api::v1::condition::Status as ConditionStatus;
use ferro_api::v1::server_host_status::PowerState as HostPower;
use ferro_api::v1::server_spec::PowerState;
use ferro_api::v1::watch_event::Type as EventType;
use ferro_api::{Error as ApiError, Kind, Object, Resource, v1};
use futures::StreamExt;

use super::duration::{parse_duration, show_duration};
use super::logs::{ConsoleWaitError, console_length, follow_console};
use super::{Connection, ConnectionArgs, object_label};

/// Arguments of `ferro server`.
#[derive(clap::Args, Debug)]
pub struct ServerArgs {
    /// What to do.
    #[command(subcommand)]
    pub action: ServerAction,
}

/// The power verbs.
#[derive(clap::Subcommand, Debug, Clone)]
pub enum ServerAction {
    /// Shut the guest down (ACPI, then forced after the node's grace period): sets
    /// `spec.powerState: Stopped`.
    Stop(PowerArgs),
    /// Boot the guest again, on the same disk: sets `spec.powerState: Running`.
    Start(PowerArgs),
    /// Reset the guest once: sets the `ferro.io/reboot-requested-at` annotation to now.
    Reboot(PowerArgs),
}

/// What every power verb takes.
#[derive(clap::Args, Debug, Clone)]
pub struct PowerArgs {
    /// The Server's name (`web-1` or `server/web-1`).
    pub name: String,
    /// The project [default: the config's project, else `default`].
    #[arg(short = 'p', long, value_name = "PROJECT")]
    pub project: Option<String>,
    /// Return once the request is recorded, without waiting for the guest.
    #[arg(long)]
    pub no_wait: bool,
    /// Give up waiting after this long: `90s`, `5m`.
    #[arg(long, value_name = "DURATION", default_value = "120s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// For reboot: the guest is back once a line its serial console prints after the reset
    /// matches this (e.g. `login:`) [default: any line].
    #[arg(long, value_name = "REGEX")]
    pub console: Option<String>,
}

impl ServerAction {
    fn args(&self) -> &PowerArgs {
        match self {
            ServerAction::Stop(a) | ServerAction::Start(a) | ServerAction::Reboot(a) => a,
        }
    }
}

/// What the verb waits for.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Goal {
    Stopped,
    Running,
    Rebooted(String),
}

impl Goal {
    fn describe(&self) -> &'static str {
        match self {
            Goal::Stopped => "stopped",
            Goal::Running => "running",
            Goal::Rebooted(_) => "rebooted",
        }
    }

    /// Whether the Server's observed state meets the goal.
    fn met(&self, server: &v1::Server) -> bool {
        let host = host(server);
        match self {
            Goal::Stopped => {
                host.pid == 0
                    && matches!(
                        HostPower::try_from(host.power_state),
                        Ok(HostPower::Shutdown | HostPower::Crashed | HostPower::NoState)
                    )
                    && desired_power(server) == PowerState::Stopped
            }
            Goal::Running => {
                host.power_state == HostPower::Running as i32
                    && guest_running(server)
                        .is_some_and(|c| c.status == ConditionStatus::True as i32)
            }
            Goal::Rebooted(request) => host.last_reboot == *request,
        }
    }
}

fn host(server: &v1::Server) -> v1::ServerHostStatus {
    server
        .status
        .as_ref()
        .and_then(|s| s.host.clone())
        .unwrap_or_default()
}

fn guest_running(server: &v1::Server) -> Option<v1::Condition> {
    server
        .status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.r#type == "GuestRunning")
        .cloned()
}

fn desired_power(server: &v1::Server) -> PowerState {
    match server
        .spec
        .as_ref()
        .and_then(|s| s.power_state)
        .map(PowerState::try_from)
    {
        Some(Ok(PowerState::Stopped)) => PowerState::Stopped,
        _ => PowerState::Running,
    }
}

/// One line saying where the Server stands, for progress output.
fn progress_line(server: &v1::Server) -> String {
    let status = server.status.clone().unwrap_or_default();
    if status.node.is_empty() {
        return "not placed on a node yet".to_owned();
    }
    let host = host(server);
    let power = HostPower::try_from(host.power_state)
        .map(|p| p.as_str_name().to_owned())
        .unwrap_or_else(|_| "Unknown".into());
    let power = if host.power_state == 0 {
        "no report yet".to_owned()
    } else {
        power
    };
    let mut line = format!("on node {}: {power}", status.node);
    if let Some(c) = guest_running(server) {
        let state = ConditionStatus::try_from(c.status)
            .map(|s| s.as_str_name().to_owned())
            .unwrap_or_default();
        line.push_str(&format!(" (GuestRunning={state}"));
        if !c.reason.is_empty() {
            line.push_str(&format!(", {}", c.reason));
        }
        line.push(')');
        if c.status == ConditionStatus::False as i32
            && !c.message.is_empty()
            && !matches!(c.reason.as_str(), "Stopped" | "GuestShutdown")
        {
            line.push_str(&format!(": {}", c.message));
        }
    }
    line
}

/// Now, as RFC 3339 in UTC with milliseconds: `2026-11-22T21:00:00.123Z`.
pub fn rfc3339_now() -> String {
    rfc3339(jiff::Timestamp::now())
}

fn rfc3339(at: jiff::Timestamp) -> String {
    format!("{at:.3}")
}

/// Runs `ferro server …`.
pub fn run(connection: &ConnectionArgs, args: ServerArgs) -> anyhow::Result<()> {
    let power = args.action.args().clone();
    let timeout = power.timeout;
    let name = power
        .name
        .strip_prefix("server/")
        .or_else(|| power.name.strip_prefix("servers/"))
        .unwrap_or(&power.name)
        .to_owned();
    let runtime = super::runtime()?;
    // The client's connection needs the runtime it is made in.
    let _entered = runtime.enter();
    let conn = Connection::resolve(connection, power.project.as_deref())?;
    let marker = power
        .console
        .as_deref()
        .map(regex_lite::Regex::new)
        .transpose()
        .map_err(|e| anyhow!("--console: not a regular expression: {e}"))?;
    let deadline = tokio::time::Instant::now() + timeout;
    runtime.block_on(async {
        // What the console held before the reset: the guest is back once it prints more.
        let console_before = match (&args.action, power.no_wait) {
            (ServerAction::Reboot(_), false) => Some(console_length(&conn, &name).await),
            _ => None,
        };
        let (goal, server) = request(&conn, &args.action, &name).await?;
        let label = object_label(Kind::Server, &name);
        if power.no_wait {
            return Ok(());
        }
        let waited = tokio::time::timeout(timeout, wait(&conn, &name, &goal, server)).await;
        if let (Ok(Ok(())), Goal::Rebooted(at), Some(before)) = (&waited, &goal, console_before) {
            return guest_back(&conn, &name, at, before, marker.as_ref(), deadline).await;
        }
        match waited {
            Ok(result) => result,
            Err(_) => {
                let last = conn
                    .client()?
                    .get_typed::<v1::Server>(&conn.project, &name)
                    .await
                    .map(|s| progress_line(&s))
                    .unwrap_or_default();
                bail!(
                    "{label}: not {} within {}; last seen {last}",
                    goal.describe(),
                    show_duration(timeout)
                )
            }
        }
    })
}

/// After the reset: waits until the guest prints a line (matching `marker`, if given) on
/// its serial console beyond the `before` bytes it held before the reboot was asked. The
/// agent records when QEMU reset the guest, not when the guest came back; the console is
/// the only witness, and without one the verb says it cannot know.
async fn guest_back(
    conn: &Connection,
    name: &str,
    reset_at: &str,
    before: Result<usize, String>,
    marker: Option<&regex_lite::Regex>,
    deadline: tokio::time::Instant,
) -> anyhow::Result<()> {
    let label = object_label(Kind::Server, name);
    // A reboot of a guest that is down resets nothing: there is no boot to wait for.
    let server = conn
        .client()?
        .get_typed::<v1::Server>(&conn.project, name)
        .await;
    if server.is_ok_and(|s| host(&s).power_state != HostPower::Running as i32) {
        return Ok(());
    }
    let before = match before {
        Ok(before) => before,
        Err(why) => {
            println!(
                "{label}: cannot know when the guest is back; QEMU reset at {reset_at} ({why})"
            );
            return Ok(());
        }
    };
    match follow_console(conn, name, before, marker, deadline).await {
        Ok(line) => {
            println!("{label}: the guest is back: {line}");
            Ok(())
        }
        Err(ConsoleWaitError::TimedOut(blocker)) => bail!(
            "{label}: QEMU reset at {reset_at}, but the guest printed {} since: {blocker}",
            match marker {
                Some(m) => format!("no line matching `{m}`"),
                None => "nothing on its console".to_owned(),
            }
        ),
        Err(ConsoleWaitError::Interrupted) => bail!("interrupted"),
        Err(ConsoleWaitError::Failed(line)) => bail!("{line}"),
    }
}

/// Records the request on the Server; returns what to wait for and the Server as written.
async fn request(
    conn: &Connection,
    action: &ServerAction,
    name: &str,
) -> anyhow::Result<(Goal, v1::Server)> {
    let client = conn.client()?;
    let label = object_label(Kind::Server, name);
    let goal = match action {
        ServerAction::Stop(_) => Goal::Stopped,
        ServerAction::Start(_) => Goal::Running,
        ServerAction::Reboot(_) => Goal::Rebooted(rfc3339_now()),
    };
    for _ in 0..10 {
        let mut server = client
            .get_typed::<v1::Server>(&conn.project, name)
            .await
            .map_err(|e| anyhow!("{label}: {}", conn.explain(&e)))?;
        if server
            .metadata
            .as_ref()
            .is_some_and(|m| m.deletion_timestamp.is_some())
        {
            bail!("{label} is being deleted");
        }
        let changed = match &goal {
            Goal::Stopped | Goal::Running => {
                let wanted = if goal == Goal::Stopped {
                    PowerState::Stopped
                } else {
                    PowerState::Running
                };
                let before = desired_power(&server);
                server.spec.get_or_insert_default().power_state = Some(wanted as i32);
                before != wanted
            }
            Goal::Rebooted(at) => {
                server
                    .metadata_mut()
                    .annotations
                    .insert(REBOOT_ANNOTATION.to_owned(), at.clone());
                true
            }
        };
        if !changed {
            println!("{label}: already {}", spec_word(&goal));
            return Ok((goal, server));
        }
        match client.update(server.into_object()).await {
            Ok(object) => {
                let server = v1::Server::from_object(object)
                    .context("the apiserver answered with another kind")?;
                match &goal {
                    Goal::Rebooted(at) => println!("{label}: reboot requested at {at}"),
                    _ => println!("{label}: powerState set to {}", spec_word(&goal)),
                }
                return Ok((goal, server));
            }
            Err(ApiError::Conflict { .. }) => continue,
            Err(e) => bail!("{label}: {}", conn.explain(&e)),
        }
    }
    bail!("{label} kept changing under the edit; try again")
}

fn spec_word(goal: &Goal) -> &'static str {
    match goal {
        Goal::Stopped => "Stopped",
        Goal::Running | Goal::Rebooted(_) => "Running",
    }
}

/// Watches the Server from `server`'s resourceVersion until the goal is met.
async fn wait(
    conn: &Connection,
    name: &str,
    goal: &Goal,
    server: v1::Server,
) -> anyhow::Result<()> {
    let client = conn.client()?;
    let label = object_label(Kind::Server, name);
    let mut last_line = String::new();
    let mut current = server;
    let mut revision = current
        .metadata
        .as_ref()
        .map(|m| m.resource_version)
        .unwrap_or_default();
    loop {
        let line = progress_line(&current);
        if line != last_line {
            println!("{label}: {line}");
            last_line = line;
        }
        if goal.met(&current) {
            println!("{label}: {}", goal.describe());
            return Ok(());
        }
        let selection =
            Selection::project(conn.project.clone()).fields(format!("metadata.name={name}"));
        let mut events = match client.watch(Kind::Server, &selection, revision).await {
            Ok(events) => events,
            Err(e) if Connection::is_fatal(&e) => bail!("{label}: {}", conn.explain(&e)),
            Err(_) => {
                // Expired revision or a transient failure: read afresh and watch again.
                current = client
                    .get_typed::<v1::Server>(&conn.project, name)
                    .await
                    .map_err(|e| anyhow!("{label}: {}", conn.explain(&e)))?;
                revision = current
                    .metadata
                    .as_ref()
                    .map(|m| m.resource_version)
                    .unwrap_or_default();
                continue;
            }
        };
        while let Some(event) = events.next().await {
            let Ok(event) = event else { break };
            revision = revision.max(event.resource_version);
            let object = event.object.and_then(|o| Object::try_from(o).ok());
            let Some(server) = object.and_then(v1::Server::from_object) else {
                continue;
            };
            if server.metadata.as_ref().is_none_or(|m| m.name != name) {
                continue;
            }
            if event.r#type == EventType::Deleted as i32 {
                bail!("{label} was deleted while waiting");
            }
            current = server;
            let line = progress_line(&current);
            if line != last_line {
                println!("{label}: {line}");
                last_line = line;
            }
            if goal.met(&current) {
                println!("{label}: {}", goal.describe());
                return Ok(());
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339_in_utc() {
        let at = |seconds, millis| jiff::Timestamp::new(seconds, millis * 1_000_000).unwrap();
        assert_eq!(rfc3339(at(0, 0)), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(at(1_795_381_200, 123)), "2026-11-22T21:00:00.123Z");
        assert_eq!(rfc3339(at(951_782_400, 5)), "2000-02-29T00:00:00.005Z");
    }

    fn server(power: Option<PowerState>, host: v1::ServerHostStatus, running: bool) -> v1::Server {
        v1::Server {
            metadata: Some(v1::ObjectMeta {
                name: "web-1".into(),
                ..Default::default()
            }),
            spec: Some(v1::ServerSpec {
                power_state: power.map(|p| p as i32),
                ..Default::default()
            }),
            status: Some(v1::ServerStatus {
                node: "n1".into(),
                host: Some(host),
                conditions: vec![v1::Condition {
                    r#type: "GuestRunning".into(),
                    status: if running {
                        ConditionStatus::True as i32
                    } else {
                        ConditionStatus::False as i32
                    },
                    reason: if running { "Running" } else { "Stopped" }.into(),
                    ..Default::default()
                }],
                ..Default::default()
            }),
        }
    }

    #[test]
    fn goals_read_what_the_agent_reports() {
        let running = v1::ServerHostStatus {
            power_state: HostPower::Running as i32,
            pid: 42,
            last_reboot: "2026-11-22T21:00:00.000Z".into(),
            ..Default::default()
        };
        let down = v1::ServerHostStatus {
            power_state: HostPower::Shutdown as i32,
            ..Default::default()
        };
        let up = server(None, running.clone(), true);
        assert!(Goal::Running.met(&up));
        assert!(!Goal::Stopped.met(&up));
        assert!(Goal::Rebooted("2026-11-22T21:00:00.000Z".into()).met(&up));
        assert!(!Goal::Rebooted("2026-11-22T21:00:01.000Z".into()).met(&up));
        // Shut down on its own while meant to run is not what `stop` waits for.
        assert!(!Goal::Stopped.met(&server(None, down.clone(), false)));
        let stopped = server(Some(PowerState::Stopped), down, false);
        assert!(Goal::Stopped.met(&stopped));
        assert!(!Goal::Running.met(&stopped));
        assert_eq!(
            progress_line(&stopped),
            "on node n1: Shutdown (GuestRunning=False, Stopped)"
        );
    }
}
