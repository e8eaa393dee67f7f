//! `ferro describe KIND NAME`: one object for people — identity, spec, status, a table
//! of conditions, owners, the recent Events about it and, while it is being deleted, what
//! still holds it (finalizers, and dependents that block owner deletion). For a Server
//! also its placement, the references it resolved and why it is not ready.

use std::fmt::Write as _;

use anyhow::anyhow;
use ferro_api::client::{Client, Selection};
use ferro_api::kinds::Scope;
use ferro_api::{Error as ApiError, Kind, Object, codec, v1};
use serde_json::Value as Json;

use super::wait::{conditions, reason_and_message, status_name};
use super::{Connection, ConnectionArgs, ago, now_seconds, parse_kind, table};

/// The kinds that other objects can own, searched for dependents of an object being
/// deleted.
const OWNABLE: &[Kind] = &[
    Kind::Port,
    Kind::IPAddress,
    Kind::MACAddress,
    Kind::SegmentID,
    Kind::Server,
    Kind::Volume,
    Kind::VolumeSnapshot,
    Kind::FloatingIP,
    Kind::Router,
    Kind::Network,
];

/// Arguments of `ferro describe`.
#[derive(clap::Args, Debug)]
pub struct DescribeArgs {
    /// The kind: singular, plural or short name (`server`, `servers`, `srv`), or
    /// `KIND/NAME`.
    pub kind: String,
    /// The object's name.
    pub name: Option<String>,
    /// The project [default: the config's project, else `default`].
    #[arg(short = 'p', long, value_name = "PROJECT")]
    pub project: Option<String>,
}

/// Runs `ferro describe`.
pub fn run(connection: &ConnectionArgs, args: DescribeArgs) -> anyhow::Result<()> {
    let runtime = super::runtime()?;
    let _entered = runtime.enter();
    let (kind, name) = match (&args.name, args.kind.split_once('/')) {
        (Some(name), _) => (parse_kind(&args.kind)?, name.clone()),
        (None, Some(_)) => super::parse_reference(&args.kind)?,
        (None, None) => return Err(anyhow!("name the {} to describe", args.kind)),
    };
    let connection = Connection::resolve(connection, args.project.as_deref())?;
    let client = connection.client()?;
    let text = runtime
        .block_on(describe(client, kind, &connection.project, &name))
        .map_err(|e| anyhow!("{}", connection.explain(&e)))?;
    print!("{text}");
    Ok(())
}

/// The text `ferro describe` prints for one object.
async fn describe(
    client: &Client,
    kind: Kind,
    project: &str,
    name: &str,
) -> Result<String, ApiError> {
    let object = client.get(kind, project, name).await?;
    let meta = object.metadata().cloned().unwrap_or_default();
    let mut out = String::new();
    let field = |out: &mut String, label: &str, value: &str| {
        let value = if value.is_empty() { "<none>" } else { value };
        let _ = writeln!(out, "{:<13}{value}", format!("{label}:"));
    };
    field(&mut out, "Name", &meta.name);
    field(&mut out, "Kind", kind.name());
    if kind.scope() == Scope::Project {
        field(&mut out, "Project", &meta.project);
    }
    field(&mut out, "Labels", &pairs(&meta.labels));
    field(&mut out, "Annotations", &pairs(&meta.annotations));
    field(
        &mut out,
        "Created",
        &meta
            .creation_timestamp
            .as_ref()
            .map(|t| format!("{} ({} ago)", timestamp(t), ago(Some(t))))
            .unwrap_or_default(),
    );
    field(&mut out, "UID", &meta.uid);
    field(&mut out, "Generation", &meta.generation.to_string());
    field(&mut out, "Finalizers", &meta.finalizers.join(", "));

    if let Some(deleted) = &meta.deletion_timestamp {
        let mut blockers = Vec::new();
        if !meta.finalizers.is_empty() {
            blockers.push(format!("finalizers {}", meta.finalizers.join(", ")));
        }
        let dependents = dependents(client, &meta.uid).await?;
        if !dependents.is_empty() {
            blockers.push(format!("dependents: {}", dependents.join(", ")));
        }
        let waiting = if blockers.is_empty() {
            "nothing (it should go any moment)".to_owned()
        } else {
            blockers.join("; ")
        };
        let _ = writeln!(
            out,
            "Deleting since {} ({} ago), waiting for: {waiting}",
            timestamp(deleted),
            ago(Some(deleted))
        );
    }

    let json = codec::encode_object(&object);
    let _ = writeln!(out, "Spec:");
    out.push_str(&yaml_block(json.get("spec")));
    let mut status = json.get("status").cloned().unwrap_or(Json::Null);
    if let Json::Object(map) = &mut status {
        map.remove("conditions");
    }
    let _ = writeln!(out, "Status:");
    out.push_str(&yaml_block(Some(&status)));

    if let Object::Server(server) = &object {
        server_sections(&mut out, server);
    }
    if let Object::Router(router) = &object {
        router_sections(&mut out, router);
    }
    if let Some(waiting) = waiting_for_controllers(&object) {
        let leader = controllers_leader(client).await;
        let _ = writeln!(out, "Waiting for: {waiting}; {leader}");
    }

    let now = now_seconds();
    let conditions = conditions(&object);
    let _ = writeln!(out, "Conditions:");
    if conditions.is_empty() {
        let _ = writeln!(out, "  <none>");
    } else {
        let rows: Vec<Vec<String>> = conditions
            .iter()
            .map(|c| {
                vec![
                    c.r#type.clone(),
                    status_name(c).to_owned(),
                    c.reason.clone(),
                    c.last_transition_time
                        .map(|t| table::duration(now - t.seconds))
                        .unwrap_or_default(),
                    c.message.clone(),
                ]
            })
            .collect();
        out.push_str(&indented(&table::align(
            &["TYPE", "STATUS", "REASON", "AGE", "MESSAGE"],
            &rows,
        )));
    }

    let _ = writeln!(out, "Owners:");
    if meta.owner_references.is_empty() {
        let _ = writeln!(out, "  <none>");
    }
    for owner in &meta.owner_references {
        let mut notes = vec![format!("uid {}", owner.uid)];
        if owner.controller {
            notes.push("controller".to_owned());
        }
        if owner.block_owner_deletion {
            notes.push("blocks owner deletion".to_owned());
        }
        let _ = writeln!(
            out,
            "  {}/{} ({})",
            owner.kind.to_ascii_lowercase(),
            owner.name,
            notes.join(", ")
        );
    }

    let _ = writeln!(out, "Events:");
    let events = events(client, &object).await?;
    if events.is_empty() {
        let _ = writeln!(out, "  <none>");
    } else {
        let rows: Vec<Vec<String>> = events
            .iter()
            .map(|e| {
                let last = e.last_timestamp.or(e.first_timestamp);
                vec![
                    last.map(|t| table::duration(now - t.seconds))
                        .unwrap_or_default(),
                    match e.r#type() {
                        v1::event_spec::Type::Warning => "Warning".to_owned(),
                        v1::event_spec::Type::Normal => "Normal".to_owned(),
                        v1::event_spec::Type::Unspecified => String::new(),
                    },
                    e.reason.clone(),
                    e.count.max(1).to_string(),
                    e.reporting_component.clone(),
                    e.message.clone(),
                ]
            })
            .collect();
        out.push_str(&indented(&table::align(
            &["LAST SEEN", "TYPE", "REASON", "COUNT", "FROM", "MESSAGE"],
            &rows,
        )));
    }
    Ok(out)
}

/// Placement, resolved references and readiness of a Server.
fn server_sections(out: &mut String, server: &v1::Server) {
    let status = server.status.clone().unwrap_or_default();
    let _ = writeln!(out, "Placement:");
    if status.node.is_empty() {
        let _ = writeln!(out, "  not placed yet");
    } else {
        let _ = writeln!(out, "  Node:      {}", status.node);
        if let Some(flavor) = &status.flavor {
            let _ = writeln!(
                out,
                "  Flavor:    {} ({} vCPU, {} MiB RAM, {} GiB disk, as at placement)",
                flavor.name, flavor.vcpus, flavor.ram_mib, flavor.disk_gib
            );
        }
    }
    let _ = writeln!(out, "References:");
    if status.resolved.is_empty() {
        let _ = writeln!(out, "  none resolved yet");
    }
    for reference in &status.resolved {
        let place = if reference.project.is_empty() {
            String::new()
        } else {
            format!(" in {}", reference.project)
        };
        let _ = writeln!(
            out,
            "  {}/{}{place} -> uid {}",
            reference.kind.to_ascii_lowercase(),
            reference.name,
            reference.uid
        );
    }
    let conditions = &status.conditions;
    let ready = conditions.iter().find(|c| c.r#type == "Ready");
    let why = match ready {
        Some(c) if status_name(c) == "True" => None,
        Some(c) => Some(reason_and_message(c)),
        None => match conditions.iter().find(|c| status_name(c) == "False") {
            Some(c) => Some(format!("{}: {}", c.r#type, reason_and_message(c))),
            None => Some("no Ready condition reported yet".to_owned()),
        },
    };
    if let Some(why) = why {
        let _ = writeln!(out, "Not ready:   {why}");
    }
}

/// Where a Router runs, or why nowhere, and why it is not ready.
fn router_sections(out: &mut String, router: &v1::Router) {
    let status = router.status.clone().unwrap_or_default();
    let find = |kind: &str| status.conditions.iter().find(|c| c.r#type == kind);
    let _ = writeln!(out, "Placement:");
    match (status.node.is_empty(), find("Scheduled")) {
        (true, Some(c)) => {
            let _ = writeln!(out, "  not placed: {}", reason_and_message(c));
        }
        (true, None) => {
            let _ = writeln!(out, "  not placed yet");
        }
        (false, Some(c)) if status_name(c) != "True" => {
            let _ = writeln!(
                out,
                "  Node:      {} ({})",
                status.node,
                reason_and_message(c)
            );
        }
        (false, Some(c)) if c.reason == "FailedOver" => {
            let _ = writeln!(out, "  Node:      {} ({})", status.node, c.message);
        }
        (false, _) => {
            let _ = writeln!(out, "  Node:      {}", status.node);
        }
    }
    if let Some(c) = find("ExternalGateway").filter(|c| status_name(c) != "True") {
        let _ = writeln!(out, "  Gateway:   {}", reason_and_message(c));
    }
    match find("Ready") {
        Some(c) if status_name(c) == "True" => {}
        Some(c) => {
            let _ = writeln!(out, "Not ready:   {}", reason_and_message(c));
        }
        None => {
            let _ = writeln!(out, "Not ready:   no Ready condition reported yet");
        }
    }
}

/// What a controller has yet to decide for the object, when it has decided nothing yet:
/// `None` once the decision is in status (or the kind has none).
fn waiting_for_controllers(object: &Object) -> Option<&'static str> {
    let deleting = object
        .metadata()
        .is_some_and(|m| m.deletion_timestamp.is_some());
    if deleting {
        return None;
    }
    match object {
        Object::Port(port) => {
            let status = port.status.clone().unwrap_or_default();
            (status.mac.is_empty() || status.addresses.is_empty())
                .then_some("IPAM to allocate the port's MAC and addresses")
        }
        Object::Network(network) => network
            .status
            .as_ref()
            .is_none_or(|s| s.segment_id == 0)
            .then_some("the network controller to allocate a segment ID"),
        Object::Server(server) => server
            .status
            .as_ref()
            .is_none_or(|s| s.node.is_empty())
            .then_some("the scheduler to place the server"),
        Object::Router(router) => router
            .status
            .as_ref()
            .is_none_or(|s| s.node.is_empty() && s.conditions.is_empty())
            .then_some("the router controller to place the router"),
        Object::FloatingIP(fip) => fip
            .status
            .as_ref()
            .is_none_or(|s| s.address.is_empty() && s.conditions.is_empty())
            .then_some("the floating IP controller to allocate an address"),
        _ => None,
    }
}

/// Who leads the controllers, from their Lease, in words: whether a decision can be
/// expected soon, or why not (no controllers ever ran, or the leader's lease lapsed and a
/// successor has yet to take over).
async fn controllers_leader(client: &Client) -> String {
    const LEASE: &str = "controllers";
    let lease = match client.get_typed::<v1::Lease>("", LEASE).await {
        Ok(lease) => lease,
        Err(ApiError::NotFound { .. }) => {
            return "no controllers have ever run against this apiserver \
                    (is `ferro controllers` running?)"
                .to_owned();
        }
        Err(e) => return format!("the controllers' Lease cannot be read: {e}"),
    };
    let spec = lease.spec.unwrap_or_default();
    controllers_leader_text(&spec, now_seconds())
}

fn controllers_leader_text(spec: &v1::LeaseSpec, now: i64) -> String {
    if spec.holder_identity.is_empty() {
        return "no controllers process leads right now (the last one stepped down; \
                is `ferro controllers` running?)"
            .to_owned();
    }
    let renewed = spec.renew_time.map_or(0, |t| t.seconds);
    let lapsed = now - renewed - i64::from(spec.lease_duration_seconds);
    if lapsed > 0 {
        format!(
            "the controllers' leader {} stopped renewing its lease {} ago; a controllers \
             process takes over as soon as one runs",
            spec.holder_identity,
            table::duration(lapsed)
        )
    } else {
        format!(
            "controllers led by {} (lease renewed {} ago)",
            spec.holder_identity,
            table::duration((now - renewed).max(0))
        )
    }
}

/// The objects that name `uid` as an owner, as `port/p1 (blocks owner deletion)`.
async fn dependents(client: &Client, uid: &str) -> Result<Vec<String>, ApiError> {
    let mut found = Vec::new();
    for &kind in OWNABLE {
        let (objects, _) = client.list(kind, &Selection::all()).await?;
        for object in objects {
            let Some(reference) = object
                .metadata()
                .and_then(|m| m.owner_references.iter().find(|r| r.uid == uid))
            else {
                continue;
            };
            let blocks = if reference.block_owner_deletion {
                " (blocks owner deletion)"
            } else {
                ""
            };
            found.push(format!(
                "{}/{}{blocks}",
                kind.name().to_ascii_lowercase(),
                object.name()
            ));
        }
    }
    Ok(found)
}

/// The Events about `object`, oldest first.
async fn events(client: &Client, object: &Object) -> Result<Vec<v1::EventSpec>, ApiError> {
    let uid = object
        .metadata()
        .map(|m| m.uid.as_str())
        .unwrap_or_default();
    let project = match object.kind().scope() {
        Scope::Project => object.project().to_owned(),
        Scope::Cluster => ferro_api::server::DEFAULT_PROJECT.to_owned(),
    };
    let (items, _) = client
        .list(Kind::Event, &Selection::project(project))
        .await?;
    let mut events: Vec<v1::EventSpec> = items
        .into_iter()
        .filter_map(|o| match o {
            Object::Event(e) => e.spec,
            _ => None,
        })
        .filter(|s| s.involved_object.as_ref().is_some_and(|r| r.uid == uid))
        .collect();
    events.sort_by_key(|e| {
        e.last_timestamp
            .or(e.first_timestamp)
            .map_or(0, |t| t.seconds)
    });
    Ok(events)
}

fn pairs(map: &std::collections::HashMap<String, String>) -> String {
    let mut pairs: Vec<String> = map.iter().map(|(k, v)| format!("{k}={v}")).collect();
    pairs.sort();
    pairs.join(", ")
}

fn timestamp(t: &prost_types::Timestamp) -> String {
    jiff::Timestamp::new(t.seconds, 0)
        .map(|t| t.to_string())
        .unwrap_or_default()
}

/// A JSON value as YAML, indented under its section; `<none>` when empty.
fn yaml_block(value: Option<&Json>) -> String {
    match value {
        None | Some(Json::Null) => "  <none>\n".to_owned(),
        Some(Json::Object(map)) if map.is_empty() => "  <none>\n".to_owned(),
        Some(value) => indented(&codec::json_to_yaml(value)),
    }
}

fn indented(text: &str) -> String {
    text.lines().map(|l| format!("  {l}\n")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(holder: &str, renewed: i64, seconds: u32) -> v1::LeaseSpec {
        v1::LeaseSpec {
            holder_identity: holder.to_owned(),
            renew_time: Some(prost_types::Timestamp {
                seconds: renewed,
                nanos: 0,
            }),
            lease_duration_seconds: seconds,
            ..Default::default()
        }
    }

    #[test]
    fn the_controllers_lease_says_whether_a_decision_is_coming() {
        let live = controllers_leader_text(&lease("vm-up", 995, 12), 1000);
        assert_eq!(live, "controllers led by vm-up (lease renewed 5s ago)");
        let lapsed = controllers_leader_text(&lease("vm-1a2b", 900, 12), 1000);
        assert!(
            lapsed.contains("vm-1a2b stopped renewing its lease 88s ago"),
            "{lapsed}"
        );
        let released = controllers_leader_text(&lease("", 900, 12), 1000);
        assert!(
            released.contains("no controllers process leads"),
            "{released}"
        );
    }

    #[test]
    fn only_undecided_objects_wait_for_the_controllers() {
        let port = |mac: &str| {
            Object::Port(v1::Port {
                status: Some(v1::PortStatus {
                    mac: mac.to_owned(),
                    addresses: vec![v1::PortAddress {
                        subnet: "s".into(),
                        ip: "10.0.0.5".into(),
                    }],
                    ..Default::default()
                }),
                ..Default::default()
            })
        };
        assert!(waiting_for_controllers(&port("")).is_some());
        assert!(waiting_for_controllers(&port("fa:16:3e:00:00:01")).is_none());
        assert!(waiting_for_controllers(&Object::Network(v1::Network::default())).is_some());
        assert!(waiting_for_controllers(&Object::Flavor(v1::Flavor::default())).is_none());
        assert!(waiting_for_controllers(&Object::Router(v1::Router::default())).is_some());
    }

    #[test]
    fn a_router_without_a_node_says_why() {
        let scheduled = v1::Condition {
            r#type: "Scheduled".into(),
            status: v1::condition::Status::False as i32,
            reason: "NoNetworkNode".into(),
            message: "no Ready node with the network role: 2 nodes, 0 with the network role (0 not ready, 0 cordoned)".into(),
            ..Default::default()
        };
        let ready = v1::Condition {
            r#type: "Ready".into(),
            ..scheduled.clone()
        };
        let router = v1::Router {
            status: Some(v1::RouterStatus {
                conditions: vec![scheduled, ready],
                ..Default::default()
            }),
            ..Default::default()
        };
        let mut out = String::new();
        router_sections(&mut out, &router);
        assert_eq!(
            out,
            "Placement:\n  not placed: NoNetworkNode: no Ready node with the network role: 2 nodes, 0 with the network role (0 not ready, 0 cordoned)\n\
             Not ready:   NoNetworkNode: no Ready node with the network role: 2 nodes, 0 with the network role (0 not ready, 0 cordoned)\n"
        );
        // Once the controller has spoken, describe does not also say it waits for it.
        assert!(waiting_for_controllers(&Object::Router(router)).is_none());
    }
}
