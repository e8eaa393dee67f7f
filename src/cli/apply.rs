//! `ferro apply -f FILE|DIR|- …`: make the objects of manifests exist as written.
//!
//! All or nothing before the first write: every document is decoded, defaulted and
//! validated locally, exactly as the apiserver will, and a single bad document means
//! nothing is sent. Then each object is applied in file order and the outcome printed as
//! `server/web-1 created|configured|unchanged`.

use std::path::PathBuf;

use anyhow::anyhow;
use ferro_api::client::ApplyOutcome;
use ferro_api::kinds::Scope;
use ferro_api::validation;

use super::manifest::{self, Document};
use super::{Connection, ConnectionArgs, Reported, object_label};

/// Arguments of `ferro apply`.
#[derive(clap::Args, Debug)]
pub struct ApplyArgs {
    /// A manifest file, a directory of them (recursively), or `-` for standard input.
    #[arg(
        short = 'f',
        long = "filename",
        value_name = "FILE|DIR|-",
        required = true
    )]
    pub files: Vec<PathBuf>,
    /// Show what would happen without writing anything.
    #[arg(long)]
    pub dry_run: bool,
    /// The name this apply is recorded under; labels and annotations it stops sending
    /// are removed only if the same manager set them.
    #[arg(long, default_value = "ferro-cli", value_name = "NAME")]
    pub manager: String,
    /// The project of objects whose manifest names none [default: the config's project].
    #[arg(short = 'p', long, value_name = "PROJECT")]
    pub project: Option<String>,
}

/// Runs `ferro apply`.
pub fn run(connection: &ConnectionArgs, args: ApplyArgs) -> anyhow::Result<()> {
    // The client needs a runtime to exist in, even before its first call.
    let runtime = super::runtime()?;
    let _entered = runtime.enter();
    let connection = Connection::resolve(connection, args.project.as_deref())?;
    // Check every manifest before the first call: one bad document means nothing is sent.
    let (documents, problems) = manifest::load(&args.files, |d| check(d, &connection.project));
    if !problems.is_empty() {
        for problem in &problems {
            eprintln!("error: {problem}");
        }
        return Err(Reported.into());
    }
    if documents.is_empty() {
        return Err(anyhow!("no objects found in the manifests given"));
    }

    let client = connection.client()?;
    let mut failed = false;
    for document in documents {
        let label = object_label(document.object.kind(), document.object.name());
        let result = runtime.block_on(client.apply(document.object, &args.manager, args.dry_run));
        match result {
            Ok((_, outcome)) => {
                let word = match outcome {
                    ApplyOutcome::Created => "created",
                    ApplyOutcome::Configured => "configured",
                    ApplyOutcome::Unchanged | ApplyOutcome::Unspecified => "unchanged",
                };
                let dry = if args.dry_run { " (dry run)" } else { "" };
                println!("{label} {word}{dry}");
            }
            Err(error) => {
                eprintln!("error: {}", connection.explain(&error));
                failed = true;
                if Connection::is_fatal(&error) {
                    break;
                }
            }
        }
    }
    if failed { Err(Reported.into()) } else { Ok(()) }
}

/// Puts a project-scoped object without a project in `project`, then defaults and
/// validates a copy as the apiserver would; returns the problems found.
fn check(document: &mut Document, project: &str) -> Vec<String> {
    let object = &mut document.object;
    if object.kind().scope() == Scope::Project && object.project().is_empty() {
        object.metadata_mut().project = project.to_owned();
    }
    let mut defaulted = object.clone();
    validation::apply_defaults(&mut defaulted);
    match validation::validate_create(&defaulted) {
        Ok(()) => Vec::new(),
        Err(invalid) => document.describe_invalid(&invalid),
    }
}
