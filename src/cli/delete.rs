//! `ferro delete KIND NAME… | -f FILE|DIR`: delete objects, or start their deletion when
//! finalizers must run first, and say which.
//!
//! `--cascade` picks the propagation policy, `--wait` follows the object until it is gone
//! (showing what blocks it), `--force` removes the finalizers left after the request, and
//! `--dry-run` says what would happen.

use std::path::PathBuf;

use anyhow::anyhow;
use ferro_api::{Error as ApiError, Kind, v1};

use super::duration::{parse_duration, show_duration};
use super::wait::{Goal, Progress, WaitError, wait_for};
use super::{Connection, ConnectionArgs, Reported, manifest, object_label, parse_kind};

/// What happens to the objects a deleted object owns.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Cascade {
    /// Delete the object now; the garbage collector removes its dependents afterwards.
    #[default]
    Background,
    /// Delete the dependents that block owner deletion first, then the object.
    Foreground,
    /// Keep the dependents, without this owner.
    Orphan,
}

/// Arguments of `ferro delete`.
#[derive(clap::Args, Debug)]
pub struct DeleteArgs {
    /// The kind, then the names: `server web-1 web-2`.
    #[arg(value_name = "KIND NAME", conflicts_with = "files")]
    pub target: Vec<String>,
    /// Delete the objects of these manifests (files, directories, `-`).
    #[arg(short = 'f', long = "filename", value_name = "FILE|DIR|-")]
    pub files: Vec<PathBuf>,
    /// The project [default: the config's project, else `default`].
    #[arg(short = 'p', long, value_name = "PROJECT")]
    pub project: Option<String>,
    /// Succeed for objects that do not exist.
    #[arg(long)]
    pub ignore_not_found: bool,
    /// What happens to the objects each one owns.
    #[arg(long, value_enum, default_value_t = Cascade::Background)]
    pub cascade: Cascade,
    /// Wait until each object is gone, showing which finalizers still hold it.
    #[arg(long)]
    pub wait: bool,
    /// With --wait, give up after this long: `30s`, `5m` [default: no limit].
    #[arg(long, value_name = "DURATION", requires = "wait", value_parser = parse_duration)]
    pub timeout: Option<std::time::Duration>,
    /// Remove every finalizer after requesting deletion, so the object goes at once. The
    /// cleanups they stand for do not run: host resources may be left behind.
    #[arg(long)]
    pub force: bool,
    /// Say what would happen without deleting anything.
    #[arg(long, conflicts_with_all = ["wait", "force"])]
    pub dry_run: bool,
}

/// Runs `ferro delete`.
pub fn run(connection: &ConnectionArgs, args: DeleteArgs) -> anyhow::Result<()> {
    // The client needs a runtime to exist in, even before its first call.
    let runtime = super::runtime()?;
    let _entered = runtime.enter();
    let connection = Connection::resolve(connection, args.project.as_deref())?;
    connection.announce_target();
    let targets: Vec<(Kind, String, String)> = if args.files.is_empty() {
        let Some((kind, names)) = args.target.split_first() else {
            return Err(anyhow!(
                "name what to delete: `ferro delete KIND NAME…` or `-f FILE`"
            ));
        };
        let kind = parse_kind(kind)?;
        if names.is_empty() {
            return Err(anyhow!("name the {} to delete", kind.plural()));
        }
        names
            .iter()
            .map(|n| (kind, connection.project.clone(), n.clone()))
            .collect()
    } else {
        let (documents, problems) = manifest::load(&args.files, |_| Vec::new());
        if !problems.is_empty() {
            for problem in &problems {
                eprintln!("error: {problem}");
            }
            return Err(Reported.into());
        }
        documents
            .iter()
            .map(|d| {
                let project = match d.object.project() {
                    "" => connection.project.clone(),
                    p => p.to_owned(),
                };
                (d.object.kind(), project, d.object.name().to_owned())
            })
            .collect()
    };

    let client = connection.client()?;
    let deadline = args.timeout.map(|t| tokio::time::Instant::now() + t);
    let propagation = match args.cascade {
        Cascade::Background => v1::delete_request::Propagation::Background,
        Cascade::Foreground => v1::delete_request::Propagation::Foreground,
        Cascade::Orphan => v1::delete_request::Propagation::Orphan,
    };
    let dry = if args.dry_run { " (dry run)" } else { "" };
    let mut failed = false;
    for (kind, project, name) in targets {
        let request = v1::DeleteRequest {
            key: Some(v1::ObjectKey {
                kind: kind.name().to_owned(),
                project: project.clone(),
                name: name.clone(),
            }),
            propagation: propagation as i32,
            dry_run: args.dry_run,
            ..Default::default()
        };
        let label = object_label(kind, &name);
        match runtime.block_on(client.delete(request)) {
            Ok((_, true)) => println!("{label} deleted{dry}"),
            Ok((object, false)) => {
                let finalizers = object
                    .metadata()
                    .map(|m| m.finalizers.clone())
                    .unwrap_or_default();
                println!(
                    "{label} deletion requested{dry} (waiting for finalizers: {})",
                    finalizers.join(", ")
                );
                if args.force {
                    let patch = v1::PatchMetadataRequest {
                        key: Some(v1::ObjectKey {
                            kind: kind.name().to_owned(),
                            project: project.clone(),
                            name: name.clone(),
                        }),
                        remove_finalizers: finalizers.clone(),
                        ..Default::default()
                    };
                    match runtime.block_on(client.patch_metadata(patch)) {
                        Ok(_) | Err(ApiError::NotFound { .. }) => {
                            eprintln!(
                                "warning: {label}: removed finalizers {} without waiting for \
                                 their cleanup; host resources may be left behind",
                                finalizers.join(", ")
                            );
                            println!("{label} deleted (forced)");
                        }
                        Err(error) => {
                            eprintln!("error: {}", connection.explain(&error));
                            failed = true;
                            continue;
                        }
                    }
                } else if args.wait {
                    let mut progress = Progress::new(true);
                    let waited = runtime.block_on(wait_for(
                        client,
                        kind,
                        &project,
                        &name,
                        &Goal::Deleted,
                        deadline,
                        &mut progress,
                    ));
                    match waited {
                        Ok(()) => println!("{label} deleted"),
                        Err(WaitError::TimedOut(blocker)) => {
                            eprintln!(
                                "error: timed out after {} waiting for {}/{name} deletion: {blocker}",
                                args.timeout.map(show_duration).unwrap_or_default(),
                                kind.plural()
                            );
                            failed = true;
                        }
                        Err(WaitError::Interrupted) => return Err(anyhow!("interrupted")),
                        Err(WaitError::Api(error)) => {
                            eprintln!("error: {}", connection.explain(&error));
                            failed = true;
                        }
                    }
                }
            }
            Err(ApiError::NotFound { .. }) if args.ignore_not_found => {}
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
