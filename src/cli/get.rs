//! `ferro get KIND [NAME…]`: show objects as a table, or as YAML / JSON that `ferro apply`
//! takes back unchanged.

use anyhow::anyhow;
use ferro_api::client::Selection;
use ferro_api::kinds::Scope;
use ferro_api::{Kind, Object, codec};

use super::{Connection, ConnectionArgs, Reported, parse_kind, table};

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
    let connection = Connection::resolve(connection, args.project.as_deref())?;
    let client = connection.client()?;

    let mut objects = Vec::new();
    let mut failed = false;
    if args.names.is_empty() {
        let selection = Selection {
            project: connection.project.clone(),
            all_projects: args.all_projects,
            labels: args.selector.clone().unwrap_or_default(),
            fields: args.field_selector.clone().unwrap_or_default(),
        };
        let (items, _) = runtime
            .block_on(client.list(kind, &selection))
            .map_err(|e| anyhow!("{}", connection.explain(&e)))?;
        objects = items;
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

    if objects.is_empty() && args.names.is_empty() {
        let place = match (kind.scope(), args.all_projects) {
            (Scope::Cluster, _) => String::new(),
            (Scope::Project, true) => " in any project".to_owned(),
            (Scope::Project, false) => format!(" in project {}", connection.project),
        };
        eprintln!("No {} found{place}.", kind.plural());
    } else if !objects.is_empty() {
        print!("{}", render(kind, &objects, &args));
    }
    if failed { Err(Reported.into()) } else { Ok(()) }
}

fn render(kind: Kind, objects: &[Object], args: &GetArgs) -> String {
    match args.output {
        Output::Table | Output::Wide => {
            let show_project = args.all_projects && kind.scope() == Scope::Project;
            table::render(objects, args.output == Output::Wide, show_project)
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
