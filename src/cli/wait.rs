//! `ferro wait KIND/NAME… --for condition=Ready|condition=X=False|delete [--timeout 60s]`:
//! block until each object meets the condition, following a watch (no polling).
//! `ferro wait server/NAME --for console=REGEX` follows the serial console instead, until
//! a line matches (see [`super::logs::wait_for_console`]).
//!
//! On a terminal a spinner shows what the object currently says about the condition; on
//! timeout one line names what still blocks: the condition's reason and message, or, for
//! `delete`, the finalizers still present. [`wait_for`] is shared with `delete --wait`.

use std::io::IsTerminal;
use std::time::Duration;

use anyhow::anyhow;
use ferro_api::client::{Client, Selection};
use ferro_api::{Error as ApiError, Kind, Object, v1};
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};

use super::duration::{parse_duration, show_duration};
use super::{Connection, ConnectionArgs, interrupted, object_label, parse_reference};

/// How often the spinner turns.
const SPINNER_TICK: Duration = Duration::from_millis(120);

/// Arguments of `ferro wait`.
#[derive(clap::Args, Debug)]
pub struct WaitArgs {
    /// The objects: `server/web-1 network/app-net`.
    #[arg(value_name = "KIND/NAME", required = true)]
    pub targets: Vec<String>,
    /// What to wait for: `condition=Ready` (status True), `condition=Ready=False`,
    /// `delete` (the object is gone), or for a server `console=REGEX` (a line of its serial
    /// console matches).
    #[arg(long = "for", value_name = "CONDITION")]
    pub condition: String,
    /// How long to wait for all of them: `30s`, `5m`, `1h`.
    #[arg(long, default_value = "60s", value_name = "DURATION", value_parser = parse_duration)]
    pub timeout: Duration,
    /// The project [default: the config's project, else `default`].
    #[arg(short = 'p', long, value_name = "PROJECT")]
    pub project: Option<String>,
}

/// What an object must reach.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Goal {
    /// A condition of this type with this status (`True`, `False`, `Unknown`).
    Condition {
        /// The condition's type.
        kind: String,
        /// The status it must have.
        status: String,
    },
    /// The object is gone.
    Deleted,
}

impl Goal {
    /// Parses `condition=Ready`, `condition=Ready=False`, `delete`.
    pub fn parse(text: &str) -> anyhow::Result<Goal> {
        if text == "delete" {
            return Ok(Goal::Deleted);
        }
        let Some(rest) = text.strip_prefix("condition=") else {
            return Err(anyhow!(
                "--for {text}: expected condition=TYPE, condition=TYPE=STATUS or delete"
            ));
        };
        let (kind, status) = rest.split_once('=').unwrap_or((rest, "True"));
        let status = match status.to_ascii_lowercase().as_str() {
            "true" => "True",
            "false" => "False",
            "unknown" => "Unknown",
            _ => {
                return Err(anyhow!(
                    "--for {text}: a condition's status is True, False or Unknown"
                ));
            }
        };
        if kind.is_empty() {
            return Err(anyhow!("--for {text}: name the condition type"));
        }
        Ok(Goal::Condition {
            kind: kind.to_owned(),
            status: status.to_owned(),
        })
    }

    fn describe(&self) -> String {
        match self {
            Goal::Condition { kind, status } if status == "True" => format!("condition {kind}"),
            Goal::Condition { kind, status } => format!("condition {kind}={status}"),
            Goal::Deleted => "deletion".to_owned(),
        }
    }
}

/// The conditions of any object's status.
pub fn conditions(object: &Object) -> Vec<v1::Condition> {
    let message = object.to_dynamic();
    let Some(status) = message
        .get_field_by_name("status")
        .and_then(|s| s.as_message().cloned())
    else {
        return Vec::new();
    };
    let Some(list) = status
        .get_field_by_name("conditions")
        .and_then(|c| c.as_list().map(<[_]>::to_vec))
    else {
        return Vec::new();
    };
    list.iter()
        .filter_map(|v| v.as_message())
        .filter_map(|m| m.transcode_to::<v1::Condition>().ok())
        .collect()
}

/// A condition's status as written (`True`, `False`, `Unknown`).
pub fn status_name(condition: &v1::Condition) -> &'static str {
    match condition.status() {
        v1::condition::Status::True => "True",
        v1::condition::Status::False => "False",
        v1::condition::Status::Unknown => "Unknown",
        v1::condition::Status::Unspecified => "",
    }
}

/// `Reason: message`, or whichever of them is set.
pub fn reason_and_message(condition: &v1::Condition) -> String {
    match (condition.reason.is_empty(), condition.message.is_empty()) {
        (false, false) => format!("{}: {}", condition.reason, condition.message),
        (false, true) => condition.reason.clone(),
        (true, false) => condition.message.clone(),
        (true, true) => format!("{} is {}", condition.r#type, status_name(condition)),
    }
}

/// Whether `object` (None: gone) meets the goal, and if not, what blocks it.
fn check(goal: &Goal, object: Option<&Object>) -> Result<(), String> {
    match (goal, object) {
        (Goal::Deleted, None) => Ok(()),
        (Goal::Deleted, Some(object)) => {
            let meta = object.metadata().cloned().unwrap_or_default();
            if meta.deletion_timestamp.is_none() {
                Err("its deletion has not been requested".to_owned())
            } else if meta.finalizers.is_empty() {
                Err("deletion under way".to_owned())
            } else {
                Err(format!("finalizers {}", meta.finalizers.join(", ")))
            }
        }
        (Goal::Condition { .. }, None) => Err("it was deleted".to_owned()),
        (Goal::Condition { kind, status }, Some(object)) => {
            let conditions = conditions(object);
            match conditions.iter().find(|c| &c.r#type == kind) {
                Some(c) if status_name(c) == status => Ok(()),
                Some(c) => Err(reason_and_message(c)),
                None => match conditions.iter().find(|c| status_name(c) == "False") {
                    Some(c) => Err(format!(
                        "not reported yet; {} is False: {}",
                        c.r#type,
                        reason_and_message(c)
                    )),
                    None => Err(format!("no {kind} condition reported yet")),
                },
            }
        }
    }
}

/// Progress shown while waiting: a spinner line on a terminal, else a line on stderr
/// each time the blocker changes (when `verbose`).
pub struct Progress {
    tty: bool,
    verbose: bool,
    /// The spinner while one wait runs on a terminal; each wait starts its own.
    spinner: Option<ProgressBar>,
    last: String,
}

impl Progress {
    /// Progress on stderr; `verbose` prints changes when stderr is not a terminal.
    pub fn new(verbose: bool) -> Self {
        Progress {
            tty: std::io::stderr().is_terminal(),
            verbose,
            spinner: None,
            last: String::new(),
        }
    }

    fn show(&mut self, text: &str) {
        if text == self.last {
            return;
        }
        if self.tty {
            let spinner = self.spinner.get_or_insert_with(|| {
                // The last character is a finished spinner's, which is cleared instead.
                let style = ProgressStyle::default_spinner().tick_chars("⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏ ");
                let spinner = ProgressBar::new_spinner().with_style(style);
                spinner.enable_steady_tick(SPINNER_TICK);
                spinner
            });
            spinner.set_message(text.to_owned());
        } else if self.verbose {
            eprintln!("{text}");
        }
        self.last = text.to_owned();
    }

    fn clear(&mut self) {
        if let Some(spinner) = self.spinner.take() {
            spinner.finish_and_clear();
        }
        self.last.clear();
    }
}

/// Why a wait ended without the goal.
#[derive(Debug)]
pub enum WaitError {
    /// The deadline passed; what blocked last.
    TimedOut(String),
    /// Ctrl-C.
    Interrupted,
    /// The API failed.
    Api(ApiError),
}

/// Waits until the object meets `goal`, or until `deadline`; watches the object from the
/// revision it was read at and relists when that revision expired.
pub async fn wait_for(
    client: &Client,
    kind: Kind,
    project: &str,
    name: &str,
    goal: &Goal,
    deadline: Option<tokio::time::Instant>,
    progress: &mut Progress,
) -> Result<(), WaitError> {
    let selection = Selection::project(project).fields(format!("metadata.name={name}"));
    let label = format!("{}/{name}", kind.plural());
    let mut blocker = String::new();
    let sleep_until = |deadline: Option<tokio::time::Instant>| async move {
        match deadline {
            Some(d) => tokio::time::sleep_until(d).await,
            None => std::future::pending().await,
        }
    };
    let result = async {
        'relist: loop {
            let (items, revision) = client
                .list(kind, &selection)
                .await
                .map_err(WaitError::Api)?;
            let mut current = items.into_iter().find(|o| o.name() == name);
            let mut revision = revision;
            loop {
                match check(goal, current.as_ref()) {
                    Ok(()) => return Ok(()),
                    Err(why) => blocker = why,
                }
                progress.show(&format!("waiting for {label} {}: {blocker}", goal.describe()));
                let mut stream = client
                    .watch(kind, &selection, revision)
                    .await
                    .map_err(WaitError::Api)?;
                loop {
                    let item = tokio::select! {
                        item = stream.next() => item,
                        _ = sleep_until(deadline) => return Err(WaitError::TimedOut(blocker.clone())),
                        _ = interrupted() => return Err(WaitError::Interrupted),
                    };
                    match item {
                        // The stream ended (apiserver restart): watch again from here.
                        None => break,
                        Some(Err(ApiError::Expired { .. })) => continue 'relist,
                        Some(Err(e)) => return Err(WaitError::Api(e)),
                        Some(Ok(event)) => {
                            revision = revision.max(event.resource_version);
                            let change = event.r#type();
                            let object = event.object.and_then(|o| Object::try_from(o).ok());
                            match change {
                                v1::watch_event::Type::Bookmark
                                | v1::watch_event::Type::Unspecified => continue,
                                v1::watch_event::Type::Deleted => current = None,
                                _ => {
                                    if let Some(o) = object.filter(|o| o.name() == name) {
                                        current = Some(o);
                                    }
                                }
                            }
                            match check(goal, current.as_ref()) {
                                Ok(()) => return Ok(()),
                                Err(why) => blocker = why,
                            }
                            progress.show(&format!("waiting for {label} {}: {blocker}", goal.describe()));
                        }
                    }
                }
            }
        }
    }
    .await;
    progress.clear();
    result
}

/// Runs `ferro wait`.
pub fn run(connection: &ConnectionArgs, args: WaitArgs) -> anyhow::Result<()> {
    let runtime = super::runtime()?;
    let _entered = runtime.enter();
    if let Some(pattern) = args.condition.strip_prefix("console=") {
        return super::logs::wait_for_consoles(connection, &args, pattern, args.timeout, &runtime);
    }
    let goal = Goal::parse(&args.condition)?;
    let timeout = args.timeout;
    let targets = args
        .targets
        .iter()
        .map(|t| parse_reference(t))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let connection = Connection::resolve(connection, args.project.as_deref())?;
    let client = connection.client()?;
    let deadline = tokio::time::Instant::now() + timeout;
    let mut progress = Progress::new(false);
    for (kind, name) in targets {
        let project = connection.project.clone();
        let result = runtime.block_on(wait_for(
            client,
            kind,
            &project,
            &name,
            &goal,
            Some(deadline),
            &mut progress,
        ));
        match result {
            Ok(()) => match goal {
                Goal::Deleted => println!("{} deleted", object_label(kind, &name)),
                _ => println!("{} condition met", object_label(kind, &name)),
            },
            Err(WaitError::TimedOut(blocker)) => {
                return Err(anyhow!(
                    "timed out after {} waiting for {}/{name} {}: {blocker}",
                    show_duration(args.timeout),
                    kind.plural(),
                    goal.describe()
                ));
            }
            Err(WaitError::Interrupted) => return Err(anyhow!("interrupted")),
            Err(WaitError::Api(e)) => return Err(anyhow!("{}", connection.explain(&e))),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn goals_parse() {
        assert_eq!(
            Goal::parse("condition=Ready").unwrap(),
            Goal::Condition {
                kind: "Ready".into(),
                status: "True".into()
            }
        );
        assert_eq!(
            Goal::parse("condition=Ready=false").unwrap(),
            Goal::Condition {
                kind: "Ready".into(),
                status: "False".into()
            }
        );
        assert_eq!(Goal::parse("delete").unwrap(), Goal::Deleted);
        assert!(Goal::parse("Ready").is_err());
        assert!(Goal::parse("condition=Ready=maybe").is_err());
    }
}
