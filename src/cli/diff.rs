//! `ferro diff -f FILE|DIR|-`: what `ferro apply` would change, as a unified diff of each
//! object's YAML as stored against the apiserver's dry-run result of the apply.
//!
//! `metadata.resourceVersion` is left out: it differs on every write and says nothing about
//! the change. Exit status as kubectl's: 0 when nothing would change (and no output but
//! `no differences` on stderr when it is a terminal), 1 when something would, 2 on an
//! error.

use std::path::PathBuf;
use std::process::ExitCode;

use ferro_api::{Error as ApiError, codec};
use serde_json::Value as Json;
use similar::TextDiff;

use super::{Connection, ConnectionArgs, manifest, object_label};

/// Arguments of `ferro diff`.
#[derive(clap::Args, Debug)]
pub struct DiffArgs {
    /// A manifest file, a directory of them (recursively), or `-` for standard input.
    #[arg(
        short = 'f',
        long = "filename",
        value_name = "FILE|DIR|-",
        required = true
    )]
    pub files: Vec<PathBuf>,
    /// The apply manager to compare as (label and annotation removal depends on it).
    #[arg(long, default_value = "ferro-cli", value_name = "NAME")]
    pub manager: String,
    /// The project of objects whose manifest names none [default: the config's project].
    #[arg(short = 'p', long, value_name = "PROJECT")]
    pub project: Option<String>,
}

/// The exit status of an error (`1` means "differences found").
const ERROR: u8 = 2;

/// Runs `ferro diff` and returns its exit status: 0 no differences, 1 differences, 2 an
/// error (printed).
pub fn main(connection: &ConnectionArgs, args: DiffArgs) -> ExitCode {
    match run(connection, args) {
        Ok(false) => ExitCode::SUCCESS,
        Ok(true) => ExitCode::from(1),
        Err(error) => {
            if error.downcast_ref::<super::Reported>().is_none() {
                eprintln!("error: {error:#}");
            }
            ExitCode::from(ERROR)
        }
    }
}

/// Prints the diffs; returns whether any object would change.
fn run(connection: &ConnectionArgs, args: DiffArgs) -> anyhow::Result<bool> {
    let runtime = super::runtime()?;
    let _entered = runtime.enter();
    let connection = Connection::resolve(connection, args.project.as_deref())?;
    let (documents, problems) =
        manifest::load(&args.files, |d| super::apply::check(d, &connection.project));
    if !problems.is_empty() {
        for problem in &problems {
            eprintln!("error: {problem}");
        }
        return Err(super::Reported.into());
    }
    if documents.is_empty() {
        return Err(anyhow::anyhow!("no objects found in the manifests given"));
    }
    let client = connection.client()?;
    let mut differs = false;
    let mut failed = false;
    for document in documents {
        let object = document.object;
        let (kind, project, name) = (
            object.kind(),
            object.project().to_owned(),
            object.name().to_owned(),
        );
        let current = match runtime.block_on(client.get(kind, &project, &name)) {
            Ok(current) => Some(current),
            Err(ApiError::NotFound { .. }) => None,
            Err(error) => {
                eprintln!("error: {}", connection.explain(&error));
                if Connection::is_fatal(&error) {
                    return Err(super::Reported.into());
                }
                failed = true;
                continue;
            }
        };
        let applied = match runtime.block_on(client.apply(object, &args.manager, true)) {
            Ok((applied, _)) => applied,
            Err(error) => {
                eprintln!("error: {}", connection.explain(&error));
                failed = true;
                continue;
            }
        };
        let live = current.as_ref().map(codec::encode_object);
        let before = live.clone().map(comparable).unwrap_or_default();
        let after = comparable(with_status_of(
            codec::encode_object(&applied),
            live.as_ref(),
        ));
        if before != after {
            differs = true;
            let label = object_label(kind, &name);
            let old = if current.is_some() {
                format!("{label} (live)")
            } else {
                "/dev/null".to_owned()
            };
            print!(
                "{}",
                unified(&before, &after, &old, &format!("{label} (applied)"))
            );
        }
    }
    if failed {
        return Err(super::Reported.into());
    }
    // Silence is the answer for scripts, as kubectl's; a person at a terminal gets a word.
    if !differs && std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        eprintln!("no differences");
    }
    Ok(differs)
}

/// The dry-run result with the live object's status: an apply never writes status, but
/// controllers do, and one that wrote between the read and the dry run would otherwise show
/// as a change the apply makes.
fn with_status_of(mut applied: Json, live: Option<&Json>) -> Json {
    if let (Json::Object(fields), Some(live)) = (&mut applied, live) {
        match live.get("status") {
            Some(status) => fields.insert("status".to_owned(), status.clone()),
            None => fields.remove("status"),
        };
    }
    applied
}

/// The YAML of an object's JSON without the fields that differ on every write.
fn comparable(mut json: Json) -> String {
    if let Some(Json::Object(meta)) = json.get_mut("metadata") {
        meta.remove("resourceVersion");
    }
    codec::json_to_yaml(&json)
}

/// A unified diff with three lines of context, headed by the two names.
pub fn unified(before: &str, after: &str, old: &str, new: &str) -> String {
    TextDiff::from_lines(before, after)
        .unified_diff()
        .context_radius(3)
        .header(old, new)
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_changed_line_shows_with_its_context() {
        let text = unified(
            "a: 1\nb: 2\nc: 3\n",
            "a: 1\nb: 5\nc: 3\n",
            "x (live)",
            "x (applied)",
        );
        assert_eq!(
            text,
            "--- x (live)\n+++ x (applied)\n@@ -1,3 +1,3 @@\n a: 1\n-b: 2\n+b: 5\n c: 3\n"
        );
    }

    #[test]
    fn the_live_status_stands_for_the_applied_one() {
        let applied = serde_json::json!({"spec": {"a": 2}, "status": {"phase": "Running"}});
        let live = serde_json::json!({"spec": {"a": 1}, "status": {"phase": "Pending"}});
        assert_eq!(
            with_status_of(applied.clone(), Some(&live)),
            serde_json::json!({"spec": {"a": 2}, "status": {"phase": "Pending"}})
        );
        let bare = serde_json::json!({"spec": {"a": 1}});
        assert_eq!(
            with_status_of(applied.clone(), Some(&bare)),
            serde_json::json!({"spec": {"a": 2}})
        );
        // A new object has no live status to stand in.
        assert_eq!(with_status_of(applied.clone(), None), applied);
    }
}
