//! `ferro cordon|uncordon|drain NODE`: stop or resume placing servers on a node.
//!
//! Cordoning sets the Node's `spec.unschedulable`, which the scheduler's filter honours;
//! nothing already placed moves. `drain` cordons, then lists the servers still bound to the
//! node — moving them comes with live migration.

use anyhow::anyhow;
use ferro_api::{
    Error as ApiError, Kind, Object, Resource,
    client::{Client, Selection},
    v1,
};

use super::{Connection, ConnectionArgs};

/// Arguments of `ferro cordon`, `ferro uncordon` and `ferro drain`.
#[derive(clap::Args, Debug)]
pub struct NodeArgs {
    /// The node's name.
    #[arg(value_name = "NODE")]
    pub node: String,
}

/// How many times a concurrent change of the Node is retried.
const ATTEMPTS: usize = 5;

/// Sets `spec.unschedulable`; returns whether it changed.
async fn set_unschedulable(client: &Client, node: &str, value: bool) -> Result<bool, ApiError> {
    let mut last = None;
    for _ in 0..ATTEMPTS {
        let mut current = client.get_typed::<v1::Node>("", node).await?;
        let spec = current.spec.get_or_insert_with(Default::default);
        if spec.unschedulable == value {
            return Ok(false);
        }
        spec.unschedulable = value;
        match client.update(Object::Node(current)).await {
            Ok(_) => return Ok(true),
            // Someone else changed the Node meanwhile: read it again.
            Err(e @ ApiError::Conflict { .. }) => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| ApiError::internal("cordon gave up")))
}

fn change(connection: &ConnectionArgs, args: &NodeArgs, value: bool) -> anyhow::Result<()> {
    let runtime = super::runtime()?;
    let _entered = runtime.enter();
    let connection = Connection::resolve(connection, None)?;
    let client = connection.client()?;
    let changed = runtime
        .block_on(set_unschedulable(client, &args.node, value))
        .map_err(|e| anyhow!("{}", connection.explain(&e)))?;
    let verb = if value { "cordoned" } else { "uncordoned" };
    if changed {
        println!("node/{} {verb}", args.node);
    } else {
        println!("node/{} already {verb}", args.node);
    }
    Ok(())
}

/// Runs `ferro cordon`.
pub fn cordon(connection: &ConnectionArgs, args: NodeArgs) -> anyhow::Result<()> {
    change(connection, &args, true)
}

/// Runs `ferro uncordon`.
pub fn uncordon(connection: &ConnectionArgs, args: NodeArgs) -> anyhow::Result<()> {
    change(connection, &args, false)
}

/// Runs `ferro drain`: cordons, then lists what still runs on the node.
pub fn drain(connection: &ConnectionArgs, args: NodeArgs) -> anyhow::Result<()> {
    change(connection, &args, true)?;
    let runtime = super::runtime()?;
    let _entered = runtime.enter();
    let connection = Connection::resolve(connection, None)?;
    let client = connection.client()?;
    let selection = Selection::all().fields(format!("status.node={}", args.node));
    let (objects, _) = runtime
        .block_on(client.list(Kind::Server, &selection))
        .map_err(|e| anyhow!("{}", connection.explain(&e)))?;
    let mut servers: Vec<(String, String, String)> = objects
        .into_iter()
        .filter_map(v1::Server::from_object)
        .map(|s| {
            let m = s.metadata().cloned().unwrap_or_default();
            let phase = s
                .status
                .as_ref()
                .and_then(|st| v1::server_status::Phase::try_from(st.phase).ok())
                .filter(|p| *p != v1::server_status::Phase::Unspecified)
                .map(|p| p.as_str_name().to_owned())
                .unwrap_or_else(|| "-".into());
            (m.project, m.name, phase)
        })
        .collect();
    servers.sort();
    if servers.is_empty() {
        println!("node/{} is drained: no servers run there", args.node);
        return Ok(());
    }
    println!(
        "{} server(s) still run on node/{} (moving them needs live migration, which is not \
         available yet):",
        servers.len(),
        args.node
    );
    let width = servers
        .iter()
        .map(|(p, n, _)| p.len() + n.len() + 1)
        .max()
        .unwrap_or(0);
    for (project, name, phase) in servers {
        println!("  {:width$}  {phase}", format!("{project}/{name}"));
    }
    Ok(())
}
