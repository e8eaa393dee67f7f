//! `ferro apply -f FILE|DIR|- …`: make the objects of manifests exist as written.
//!
//! All or nothing before the first write: every document is decoded, defaulted and
//! validated locally, exactly as the apiserver will, and a single bad document means
//! nothing is sent. Then each object is applied in file order and the outcome printed as
//! `server/web-1 created|configured|unchanged`. The client waits out an apiserver restart
//! (saying `apiserver unavailable, retrying…` once); a failure ends with its `error:` line
//! and how far the apply got: `41 of 201 objects applied; re-run to continue`.
//!
//! `--prune -l KEY=VALUE` then deletes the objects of the kinds in the manifests that carry
//! the label, are not in the manifests, and whose label this same manager set (as
//! `metadata.managedKeys` records): what an earlier apply of these manifests created and
//! the manifests no longer hold. Objects another manager applied are never pruned.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use anyhow::anyhow;
use ferro_api::client::{ApplyOutcome, Client, Selection};
use ferro_api::kinds::Scope;
use ferro_api::{Error as ApiError, Kind, Object, v1, validation};

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
    /// After applying, delete the objects of the manifests' kinds that match -l, are not in
    /// the manifests, and were applied by this manager.
    #[arg(long, requires = "selector")]
    pub prune: bool,
    /// The label selector of --prune: `app=web`.
    #[arg(short = 'l', long, value_name = "SELECTOR")]
    pub selector: Option<String>,
}

/// Runs `ferro apply`.
pub fn run(connection: &ConnectionArgs, args: ApplyArgs) -> anyhow::Result<()> {
    // The client needs a runtime to exist in, even before its first call.
    let runtime = super::runtime()?;
    let _entered = runtime.enter();
    let connection = Connection::resolve(connection, args.project.as_deref())?;
    connection.announce_target();
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
    // What --prune keeps: every object of the manifests, and the places to look in.
    let mut applied: BTreeSet<(Kind, String, String)> = BTreeSet::new();
    let mut places: BTreeMap<Kind, BTreeSet<String>> = BTreeMap::new();
    for document in &documents {
        let object = &document.object;
        let project = match object.kind().scope() {
            Scope::Project => object.project().to_owned(),
            Scope::Cluster => String::new(),
        };
        applied.insert((object.kind(), project.clone(), object.name().to_owned()));
        places.entry(object.kind()).or_default().insert(project);
    }
    let total = documents.len();
    let mut done = 0usize;
    let mut stopped = false;
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
                done += 1;
            }
            Err(error) => {
                eprintln!("error: {}", connection.explain(&error));
                failed = true;
                if Connection::is_fatal(&error) {
                    stopped = true;
                    break;
                }
            }
        }
    }
    if failed {
        // Apply is idempotent: say how far it got, so a re-run is the obvious next step.
        let rest = if stopped { "; re-run to continue" } else { "" };
        eprintln!("{done} of {total} objects applied{rest}");
        return Err(Reported.into());
    }
    if args.prune {
        let selector = args.selector.clone().unwrap_or_default();
        let pruned = runtime.block_on(prune(
            client,
            &places,
            &applied,
            &selector,
            &args.manager,
            args.dry_run,
        ));
        if let Err(error) = pruned {
            return Err(anyhow!("{}", connection.explain(&error)));
        }
    }
    Ok(())
}

/// Deletes (or with `dry_run`, names) the objects --prune removes; prints each.
async fn prune(
    client: &Client,
    places: &BTreeMap<Kind, BTreeSet<String>>,
    applied: &BTreeSet<(Kind, String, String)>,
    selector: &str,
    manager: &str,
    dry_run: bool,
) -> Result<(), ApiError> {
    let keys = selector_keys(selector);
    for (&kind, projects) in places {
        for project in projects {
            let selection = Selection::project(project.clone()).labels(selector);
            let (objects, _) = client.list(kind, &selection).await?;
            for object in objects {
                let key = (kind, project.clone(), object.name().to_owned());
                if applied.contains(&key) || !applied_by(&object, manager, &keys) {
                    continue;
                }
                if object
                    .metadata()
                    .is_some_and(|m| m.deletion_timestamp.is_some())
                {
                    continue;
                }
                let request = v1::DeleteRequest {
                    key: Some(v1::ObjectKey {
                        kind: kind.name().to_owned(),
                        project: project.clone(),
                        name: object.name().to_owned(),
                    }),
                    precondition_uid: object.metadata().map(|m| m.uid.clone()).unwrap_or_default(),
                    dry_run,
                    ..Default::default()
                };
                match client.delete(request).await {
                    Ok(_) | Err(ApiError::NotFound { .. }) => {}
                    Err(error) => return Err(error),
                }
                let dry = if dry_run { " (dry run)" } else { "" };
                println!("{} pruned{dry}", object_label(kind, object.name()));
            }
        }
    }
    Ok(())
}

/// The label keys an equality selector requires (`app=web,tier==db` → app, tier).
fn selector_keys(selector: &str) -> Vec<String> {
    selector
        .split(',')
        .filter(|term| !term.contains("!="))
        .filter_map(|term| term.split_once('='))
        .map(|(key, _)| key.trim().to_owned())
        .filter(|key| !key.is_empty())
        .collect()
}

/// Whether `manager` applied the object: it recorded setting every selected label key.
fn applied_by(object: &Object, manager: &str, keys: &[String]) -> bool {
    object
        .metadata()
        .into_iter()
        .flat_map(|m| &m.managed_keys)
        .any(|m| m.manager == manager && keys.iter().all(|k| m.labels.contains(k)))
}

/// Puts a project-scoped object without a project in `project`, then defaults and
/// validates a copy as the apiserver would; returns the problems found.
pub(super) fn check(document: &mut Document, project: &str) -> Vec<String> {
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
