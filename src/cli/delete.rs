//! `ferro delete KIND NAME… | -f FILE|DIR`: delete objects, or start their deletion when
//! finalizers must run first, and say which.

use std::path::PathBuf;

use anyhow::anyhow;
use ferro_api::{Error as ApiError, Kind, v1};

use super::{Connection, ConnectionArgs, Reported, manifest, object_label, parse_kind};

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
}

/// Runs `ferro delete`.
pub fn run(connection: &ConnectionArgs, args: DeleteArgs) -> anyhow::Result<()> {
    // The client needs a runtime to exist in, even before its first call.
    let runtime = super::runtime()?;
    let _entered = runtime.enter();
    let connection = Connection::resolve(connection, args.project.as_deref())?;
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
    let mut failed = false;
    for (kind, project, name) in targets {
        let request = v1::DeleteRequest {
            key: Some(v1::ObjectKey {
                kind: kind.name().to_owned(),
                project,
                name: name.clone(),
            }),
            ..Default::default()
        };
        let label = object_label(kind, &name);
        match runtime.block_on(client.delete(request)) {
            Ok((_, true)) => println!("{label} deleted"),
            Ok((object, false)) => {
                let finalizers = object
                    .metadata()
                    .map(|m| m.finalizers.join(", "))
                    .unwrap_or_default();
                println!("{label} deletion requested (waiting for finalizers: {finalizers})");
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
