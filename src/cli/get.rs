//! `ferro get KIND [NAME…]`: show objects as a table, or as YAML / JSON that `ferro apply`
//! takes back unchanged. `-w` then follows changes from the list's revision; `get events`
//! shows a table of what happened, oldest first, optionally `--for` one object.

use std::collections::HashMap;

use anyhow::anyhow;
use ferro_api::client::{Client, Selection};
use ferro_api::kinds::Scope;
use ferro_api::{Error as ApiError, Kind, Object, codec, v1};
use futures::StreamExt;

use super::{
    Connection, ConnectionArgs, Reported, interrupted, parse_kind, parse_reference, table,
};

/// How `get` prints objects.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Output {
    /// Aligned columns: the name, a few columns per kind, the age.
    #[default]
    Table,
    /// The table with more columns.
    Wide,
    /// YAML documents separated by `---`, as `ferro apply` takes them.
    Yaml,
    /// JSON: the object, or a `kind: List` of them.
    Json,
}

/// Arguments of `ferro get`.
#[derive(clap::Args, Debug)]
pub struct GetArgs {
    /// The kind: singular, plural or short name (`server`, `servers`, `srv`).
    pub kind: String,
    /// Only these objects.
    pub names: Vec<String>,
    /// The project [default: the config's project, else `default`].
    #[arg(
        short = 'p',
        long,
        value_name = "PROJECT",
        conflicts_with = "all_projects"
    )]
    pub project: Option<String>,
    /// Objects of every project.
    #[arg(short = 'A', long)]
    pub all_projects: bool,
    /// A label selector: `app=web,tier!=db,env in (a,b),!legacy`.
    #[arg(short = 'l', long, value_name = "SELECTOR")]
    pub selector: Option<String>,
    /// A field selector: `metadata.name=x,status.node=n1`.
    #[arg(long, value_name = "SELECTOR")]
    pub field_selector: Option<String>,
    /// The output format.
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    /// After printing, follow changes: one line (or document) per change, until Ctrl-C.
    #[arg(short = 'w', long)]
    pub watch: bool,
    /// With `get events`: only the events about this object (`server/web-1`).
    #[arg(long = "for", value_name = "KIND/NAME")]
    pub for_object: Option<String>,
}

/// Runs `ferro get`.
pub fn run(connection: &ConnectionArgs, args: GetArgs) -> anyhow::Result<()> {
    // The client needs a runtime to exist in, even before its first call.
    let runtime = super::runtime()?;
    let _entered = runtime.enter();
    let kind = parse_kind(&args.kind)?;
    if args.all_projects && !args.names.is_empty() {
        return Err(anyhow!(
            "an object is read by name within one project: drop -A or name a project with -p"
        ));
    }
    if args.for_object.is_some() && kind != Kind::Event {
        return Err(anyhow!("--for only applies to `ferro get events`"));
    }
    let connection = Connection::resolve(connection, args.project.as_deref())?;
    let client = connection.client()?;

    let mut objects = Vec::new();
    let mut failed = false;
    let mut revision = 0;
    if args.names.is_empty() {
        let selection = Selection {
            project: connection.project.clone(),
            all_projects: args.all_projects,
            labels: args.selector.clone().unwrap_or_default(),
            fields: args.field_selector.clone().unwrap_or_default(),
        };
        let (items, listed_at) = runtime
            .block_on(client.list(kind, &selection))
            .map_err(|e| anyhow!("{}", connection.explain(&e)))?;
        objects = items;
        revision = listed_at;
    } else {
        for name in &args.names {
            match runtime.block_on(client.get(kind, &connection.project, name)) {
                Ok(object) => objects.push(object),
                Err(error) => {
                    eprintln!("error: {}", connection.explain(&error));
                    failed = true;
                    if Connection::is_fatal(&error) {
                        break;
                    }
                }
            }
        }
    }

    if revision == 0 {
        revision = objects
            .iter()
            .map(|o| o.metadata().map_or(0, |m| m.resource_version))
            .max()
            .unwrap_or(0);
    }
    let mut involving = None;
    if let Some(target) = &args.for_object {
        let (target_kind, target_name) = parse_reference(target)?;
        let target = runtime
            .block_on(client.get(target_kind, &connection.project, &target_name))
            .map_err(|e| anyhow!("{}", connection.explain(&e)))?;
        let uid = target.metadata().map(|m| m.uid.clone()).unwrap_or_default();
        objects.retain(|o| involved(o).is_some_and(|r| r.uid == uid));
        involving = Some(uid);
    }
    if kind == Kind::Event {
        sort_events(&mut objects);
    }
    if objects.is_empty() && args.names.is_empty() && !args.watch {
        let place = match (kind.scope(), args.all_projects) {
            (Scope::Cluster, _) => String::new(),
            (Scope::Project, true) => " in any project".to_owned(),
            (Scope::Project, false) => format!(" in project {}", connection.project),
        };
        eprintln!("No {} found{place}.", kind.plural());
    } else if !objects.is_empty() {
        print!("{}", render(kind, &objects, &args));
    }
    if failed {
        return Err(Reported.into());
    }
    if args.watch {
        let selection = Selection {
            project: connection.project.clone(),
            all_projects: args.all_projects,
            labels: args.selector.clone().unwrap_or_default(),
            fields: args.field_selector.clone().unwrap_or_default(),
        };
        let mut seen: HashMap<String, i64> = objects
            .iter()
            .map(|o| (o.key(), o.metadata().map_or(0, |m| m.resource_version)))
            .collect();
        let mut printed_header = !objects.is_empty();
        let result = runtime.block_on(async {
            tokio::select! {
                result = follow(client, kind, &selection, revision, &args, involving.as_deref(), &mut seen, &mut printed_header) => result,
                _ = interrupted() => Ok(()),
            }
        });
        result.map_err(|e| anyhow!("{}", connection.explain(&e)))?;
    }
    Ok(())
}

/// Prints each change after `revision` until the stream fails; relists when the
/// revision expired, printing only what changed meanwhile. With `involving`, only Events
/// about the object of that uid are shown (`get events --for … -w`).
#[allow(clippy::too_many_arguments)]
async fn follow(
    client: &Client,
    kind: Kind,
    selection: &Selection,
    mut revision: i64,
    args: &GetArgs,
    involving: Option<&str>,
    seen: &mut HashMap<String, i64>,
    printed_header: &mut bool,
) -> Result<(), ApiError> {
    let wanted = |o: &Object| {
        (args.names.is_empty() || args.names.iter().any(|n| n == o.name()))
            && involving.is_none_or(|uid| involved(o).is_some_and(|r| r.uid == uid))
    };
    loop {
        let mut stream = client.watch(kind, selection, revision).await?;
        while let Some(item) = stream.next().await {
            match item {
                Ok(event) => {
                    revision = revision.max(event.resource_version);
                    let deleted = match event.r#type() {
                        v1::watch_event::Type::Bookmark | v1::watch_event::Type::Unspecified => {
                            continue;
                        }
                        v1::watch_event::Type::Deleted => true,
                        _ => false,
                    };
                    let Some(object) = event.object.and_then(|o| Object::try_from(o).ok()) else {
                        continue;
                    };
                    if !wanted(&object) {
                        continue;
                    }
                    if deleted {
                        seen.remove(&object.key());
                    } else {
                        let rv = object.metadata().map_or(0, |m| m.resource_version);
                        seen.insert(object.key(), rv);
                    }
                    print_change(kind, &object, deleted, args, printed_header);
                }
                Err(ApiError::Expired { .. }) => {
                    let (items, listed_at) = client.list(kind, selection).await?;
                    let mut present = HashMap::new();
                    for object in items.into_iter().filter(|o| wanted(o)) {
                        let rv = object.metadata().map_or(0, |m| m.resource_version);
                        present.insert(object.key(), rv);
                        if seen.get(&object.key()) != Some(&rv) {
                            print_change(kind, &object, false, args, printed_header);
                        }
                    }
                    for key in seen.keys() {
                        if !present.contains_key(key) {
                            println!(
                                "{} deleted",
                                key.trim_start_matches(ferro_api::kinds::KEY_ROOT)
                            );
                        }
                    }
                    *seen = present;
                    revision = listed_at;
                    break;
                }
                Err(error) => return Err(error),
            }
        }
    }
}

/// One change as `get -w` prints it: a table row (the header before the first), or a
/// document.
fn print_change(kind: Kind, object: &Object, deleted: bool, args: &GetArgs, header: &mut bool) {
    match args.output {
        Output::Table | Output::Wide => {
            let text = render(kind, std::slice::from_ref(object), args);
            let mut lines = text.lines();
            let head = lines.next().unwrap_or_default();
            if !*header {
                println!("{head}");
                *header = true;
            }
            for line in lines {
                if deleted {
                    println!("{line}   (deleted)");
                } else {
                    println!("{line}");
                }
            }
        }
        Output::Yaml => print!("---\n{}", codec::to_yaml(std::slice::from_ref(object))),
        Output::Json => println!("{}", codec::to_json(object)),
    }
}

fn involved(object: &Object) -> Option<&v1::OwnerReference> {
    match object {
        Object::Event(e) => e.spec.as_ref()?.involved_object.as_ref(),
        _ => None,
    }
}

fn last_seen(object: &Object) -> i64 {
    match object {
        Object::Event(e) => e
            .spec
            .as_ref()
            .and_then(|s| s.last_timestamp.or(s.first_timestamp))
            .map_or(0, |t| t.seconds),
        _ => 0,
    }
}

/// Events oldest first, by when they last happened.
fn sort_events(events: &mut [Object]) {
    events.sort_by_key(last_seen);
}

/// The reason, and for a repeated event how often over how long, in kubectl's words:
/// `DeletionWaitsForPorts (x89 over 3s)`. The count sits by the reason, not after the
/// message, so it stays in sight however long the message is.
fn reason_with_count(spec: &v1::EventSpec) -> String {
    if spec.count <= 1 {
        return spec.reason.clone();
    }
    match (spec.first_timestamp, spec.last_timestamp) {
        (Some(first), Some(last)) => format!(
            "{} (x{} over {})",
            spec.reason,
            spec.count,
            table::duration(last.seconds - first.seconds)
        ),
        _ => format!("{} (x{})", spec.reason, spec.count),
    }
}

/// The events table: LAST SEEN, TYPE, REASON (with the count), OBJECT, MESSAGE.
fn render_events(events: &[Object], show_project: bool) -> String {
    let now = super::now_seconds();
    let mut header = vec![];
    if show_project {
        header.push("PROJECT");
    }
    header.extend(["LAST SEEN", "TYPE", "REASON", "OBJECT", "MESSAGE"]);
    let rows: Vec<Vec<String>> = events
        .iter()
        .filter_map(|o| match o {
            Object::Event(e) => Some((o, e.spec.clone().unwrap_or_default())),
            _ => None,
        })
        .map(|(o, spec)| {
            let object = spec
                .involved_object
                .as_ref()
                .map(|r| format!("{}/{}", r.kind.to_ascii_lowercase(), r.name))
                .unwrap_or_default();
            let kind = match spec.r#type() {
                v1::event_spec::Type::Warning => "Warning",
                v1::event_spec::Type::Normal => "Normal",
                v1::event_spec::Type::Unspecified => "",
            };
            let seen = match last_seen(o) {
                0 => String::new(),
                t => table::duration(now - t),
            };
            let mut row = Vec::new();
            if show_project {
                row.push(o.project().to_owned());
            }
            row.extend([
                seen,
                kind.to_owned(),
                reason_with_count(&spec),
                object,
                spec.message.clone(),
            ]);
            row
        })
        .collect();
    table::align(&header, &rows)
}

fn render(kind: Kind, objects: &[Object], args: &GetArgs) -> String {
    match args.output {
        Output::Table | Output::Wide => {
            let show_project = args.all_projects && kind.scope() == Scope::Project;
            if kind == Kind::Event {
                render_events(objects, show_project)
            } else {
                table::render(objects, args.output == Output::Wide, show_project)
            }
        }
        Output::Yaml => codec::to_yaml(objects),
        Output::Json if objects.len() == 1 && !args.names.is_empty() => {
            format!("{}\n", codec::to_json(&objects[0]))
        }
        Output::Json => {
            let items: Vec<_> = objects.iter().map(codec::encode_object).collect();
            let list = serde_json::json!({
                "apiVersion": codec::API_VERSION,
                "kind": "List",
                "items": items,
            });
            format!(
                "{}\n",
                serde_json::to_string_pretty(&list).unwrap_or_default()
            )
        }
    }
}
