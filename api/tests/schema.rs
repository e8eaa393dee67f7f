//! Tests of the schema as a whole, as users and old clients meet it:
//!
//! - every example manifest in `manifests/` decodes, defaults, validates and round-trips
//!   through YAML unchanged, and the manifests form one coherent stack;
//! - the descriptors still contain everything the previous release had
//!   (`tests/snapshots/descriptors.txt`): no field, value or RPC removed, renumbered,
//!   renamed or retyped;
//! - enum values are spelled for users (`Running`, `AntiAffinity`, `TCP`).
//!
//! To record intended schema additions in the snapshot:
//! `FERRO_UPDATE_SNAPSHOTS=1 cargo test -p ferro-api --test schema`.

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use ferro_api::codec::{decode_yaml, to_yaml};
use ferro_api::kinds::{Kind, Object, Scope};
use ferro_api::validation::{apply_defaults, validate_create, validate_update};
use prost_reflect::{FieldDescriptor, Kind as FieldKind, MessageDescriptor};

// ---------------------------------------------------------------------------------------
// The example manifests.

/// The flavors the system seeds, which the manifests may name without defining.
const SEEDED_FLAVORS: &[&str] = &["m1.tiny", "m1.small"];

fn manifests_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests")
}

/// Every manifest file, sorted, with its objects as written.
fn manifests() -> Result<Vec<(String, Vec<Object>)>> {
    let dir = manifests_dir();
    let mut paths: Vec<PathBuf> = fs::read_dir(&dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .map(|entry| entry.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    paths.retain(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"));
    paths.sort();
    if paths.is_empty() {
        bail!("no manifests in {}", dir.display());
    }
    paths
        .into_iter()
        .map(|path| {
            let name = path
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            let text = fs::read_to_string(&path).with_context(|| name.clone())?;
            let objects = decode_yaml(&text).with_context(|| format!("decoding {name}"))?;
            if objects.is_empty() {
                bail!("{name} holds no objects");
            }
            Ok((name, objects))
        })
        .collect()
}

fn defaulted(object: &Object) -> Object {
    let mut object = object.clone();
    apply_defaults(&mut object);
    object
}

#[test]
fn every_manifest_decodes_defaults_validates_and_round_trips() -> Result<()> {
    let mut failures = Vec::new();
    for (file, objects) in manifests()? {
        let again = decode_yaml(&to_yaml(&objects))?;
        if again != objects {
            failures.push(format!("{file}: YAML → object → YAML → object changed it"));
        }
        for object in &objects {
            let at = format!("{file}: {}", object.display_name());
            let once = defaulted(object);
            if let Err(invalid) = validate_create(&once) {
                failures.push(format!("{file}: {invalid}"));
            }
            if defaulted(&once) != once {
                failures.push(format!("{at}: defaulting twice differs from once"));
            }
            // `ferro get -o yaml` output applied again is unchanged: no drift.
            let reread = decode_yaml(&to_yaml(std::slice::from_ref(&once)))?;
            if reread.len() != 1 || defaulted(&reread[0]) != once {
                failures.push(format!("{at}: the defaulted object does not survive YAML"));
            }
            // Re-applying the same manifest is a valid update.
            if let Err(invalid) = validate_update(&once, &once) {
                failures.push(format!("{file}: re-applying: {invalid}"));
            }
            if object.kind().scope() == Scope::Project && once.project() != "default" {
                failures.push(format!("{at}: lands in project {:?}", once.project()));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    Ok(())
}

/// The names each spec refers to, by kind, with the field that names them.
fn references(object: &Object) -> Vec<(Kind, String, &'static str)> {
    let mut refs = Vec::new();
    let mut add = |kind: Kind, name: &str, field: &'static str| {
        if !name.is_empty() {
            refs.push((kind, name.to_owned(), field));
        }
    };
    match object {
        Object::Server(o) => {
            let spec = o.spec.clone().unwrap_or_default();
            add(Kind::Flavor, &spec.flavor, "spec.flavor");
            add(Kind::Image, &spec.image, "spec.image");
            add(Kind::Volume, &spec.boot_volume, "spec.bootVolume");
            for nic in &spec.networks {
                add(Kind::Network, &nic.network, "spec.networks[].network");
                add(Kind::Port, &nic.port, "spec.networks[].port");
            }
            for group in &spec.security_groups {
                add(Kind::SecurityGroup, group, "spec.securityGroups[]");
            }
            add(Kind::KeyPair, &spec.key_pair, "spec.keyPair");
            add(Kind::ServerGroup, &spec.server_group, "spec.serverGroup");
            for volume in &spec.volumes {
                add(Kind::Volume, &volume.volume, "spec.volumes[].volume");
            }
        }
        Object::Image(o) => {
            let spec = o.spec.clone().unwrap_or_default();
            add(Kind::Image, &spec.kernel, "spec.kernel");
            add(Kind::Image, &spec.ramdisk, "spec.ramdisk");
        }
        Object::Router(o) => {
            let spec = o.spec.clone().unwrap_or_default();
            if let Some(gateway) = &spec.external_gateway {
                add(
                    Kind::Network,
                    &gateway.network,
                    "spec.externalGateway.network",
                );
            }
            for interface in &spec.interfaces {
                add(
                    Kind::Network,
                    &interface.network,
                    "spec.interfaces[].network",
                );
            }
        }
        Object::FloatingIP(o) => {
            let spec = o.spec.clone().unwrap_or_default();
            add(Kind::Network, &spec.network, "spec.network");
            add(Kind::Port, &spec.port, "spec.port");
            add(Kind::Server, &spec.server, "spec.server");
        }
        Object::Port(o) => {
            let spec = o.spec.clone().unwrap_or_default();
            add(Kind::Network, &spec.network, "spec.network");
            for group in &spec.security_groups {
                add(Kind::SecurityGroup, group, "spec.securityGroups[]");
            }
        }
        Object::Volume(o) => {
            let source = o
                .spec
                .clone()
                .unwrap_or_default()
                .source
                .unwrap_or_default();
            add(Kind::Image, &source.image, "spec.source.image");
            add(
                Kind::VolumeSnapshot,
                &source.snapshot,
                "spec.source.snapshot",
            );
            add(Kind::Volume, &source.volume, "spec.source.volume");
        }
        Object::VolumeSnapshot(o) => {
            add(
                Kind::Volume,
                &o.spec.clone().unwrap_or_default().volume,
                "spec.volume",
            );
        }
        Object::SecurityGroup(o) => {
            for rule in &o.spec.clone().unwrap_or_default().rules {
                add(
                    Kind::SecurityGroup,
                    &rule.remote_group,
                    "spec.rules[].remoteGroup",
                );
            }
        }
        _ => {}
    }
    refs
}

#[test]
fn the_example_stack_is_coherent() -> Result<()> {
    let mut objects: BTreeMap<(Kind, String), Object> = BTreeMap::new();
    let mut failures = Vec::new();
    for (file, decoded) in manifests()? {
        for object in decoded {
            let key = (object.kind(), object.name().to_owned());
            if objects.insert(key, defaulted(&object)).is_some() {
                failures.push(format!(
                    "{file}: {} is defined twice",
                    object.display_name()
                ));
            }
        }
    }
    for kind in [
        Kind::Network,
        Kind::SecurityGroup,
        Kind::KeyPair,
        Kind::Image,
        Kind::Volume,
        Kind::Server,
        Kind::Router,
        Kind::FloatingIP,
    ] {
        if !objects.keys().any(|(k, _)| *k == kind) {
            failures.push(format!("the stack has no {kind}"));
        }
    }
    let network = |name: &str| match objects.get(&(Kind::Network, name.to_owned())) {
        Some(Object::Network(n)) => n.spec.clone(),
        _ => None,
    };
    for object in objects.values() {
        for (kind, name, field) in references(object) {
            let known = objects.contains_key(&(kind, name.clone()))
                || (kind == Kind::Flavor && SEEDED_FLAVORS.contains(&name.as_str()));
            if !known {
                failures.push(format!(
                    "{}: {field} names {kind} {name:?}, which no manifest defines",
                    object.display_name()
                ));
            }
        }
        match object {
            Object::Router(router) => {
                let spec = router.spec.clone().unwrap_or_default();
                let gateway = spec.external_gateway.unwrap_or_default();
                if network(&gateway.network).and_then(|n| n.external) != Some(true) {
                    failures.push(format!(
                        "{}: its gateway network is not external",
                        object.display_name()
                    ));
                }
                for interface in spec.interfaces {
                    let subnets = network(&interface.network)
                        .map(|n| n.subnets)
                        .unwrap_or_default();
                    if !subnets.iter().any(|s| s.name == interface.subnet) {
                        failures.push(format!(
                            "{}: network {:?} has no subnet {:?}",
                            object.display_name(),
                            interface.network,
                            interface.subnet
                        ));
                    }
                }
            }
            Object::FloatingIP(fip) => {
                let spec = fip.spec.clone().unwrap_or_default();
                if network(&spec.network).and_then(|n| n.external) != Some(true) {
                    failures.push(format!(
                        "{}: its network is not external",
                        object.display_name()
                    ));
                }
            }
            _ => {}
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The descriptors, compared with the previous release.

const SNAPSHOT: &str = "tests/snapshots/descriptors.txt";
const UPDATE_VAR: &str = "FERRO_UPDATE_SNAPSHOTS";

const SNAPSHOT_HEADER: &str = "\
# The ferro/v1 schema as last released: every field with its number and type, every enum
# value with its number, every RPC. api/tests/schema.rs fails when a line here is missing
# from the schema (something removed, renumbered, renamed or retyped) and when the schema
# has lines not recorded here. Record additions with
#   FERRO_UPDATE_SNAPSHOTS=1 cargo test -p ferro-api --test schema
# and commit this file with the schema change.
";

/// The name a field's type is written with: scalars as in `.proto`, our own types
/// without their package.
fn type_name(kind: &FieldKind) -> String {
    let full = match kind {
        FieldKind::Message(m) => m.full_name().to_owned(),
        FieldKind::Enum(e) => e.full_name().to_owned(),
        FieldKind::Double => "double".into(),
        FieldKind::Float => "float".into(),
        FieldKind::Int32 => "int32".into(),
        FieldKind::Int64 => "int64".into(),
        FieldKind::Uint32 => "uint32".into(),
        FieldKind::Uint64 => "uint64".into(),
        FieldKind::Sint32 => "sint32".into(),
        FieldKind::Sint64 => "sint64".into(),
        FieldKind::Fixed32 => "fixed32".into(),
        FieldKind::Fixed64 => "fixed64".into(),
        FieldKind::Sfixed32 => "sfixed32".into(),
        FieldKind::Sfixed64 => "sfixed64".into(),
        FieldKind::Bool => "bool".into(),
        FieldKind::String => "string".into(),
        FieldKind::Bytes => "bytes".into(),
    };
    full.strip_prefix("ferro.v1.")
        .map(str::to_owned)
        .unwrap_or(full)
}

fn field_type(field: &FieldDescriptor) -> String {
    if field.is_map()
        && let FieldKind::Message(entry) = field.kind()
    {
        return format!(
            "map<{}, {}>",
            type_name(&entry.map_entry_key_field().kind()),
            type_name(&entry.map_entry_value_field().kind())
        );
    }
    let name = type_name(&field.kind());
    if field.is_list() {
        format!("repeated {name}")
    } else if field.field_descriptor_proto().proto3_optional() {
        format!("optional {name}")
    } else {
        name
    }
}

fn render_message(message: &MessageDescriptor, lines: &mut Vec<String>) {
    for field in message.fields() {
        lines.push(format!(
            "{} = {} ({})",
            field.full_name(),
            field.number(),
            field_type(&field)
        ));
    }
    for child in message.child_enums() {
        for value in child.values() {
            lines.push(format!(
                "{}.{} = {}",
                child.full_name(),
                value.name(),
                value.number()
            ));
        }
    }
    for child in message.child_messages().filter(|m| !m.is_map_entry()) {
        render_message(&child, lines);
    }
}

/// One line per field, enum value and RPC of the schema (google.protobuf.* excluded), file
/// by file in name order, each in declaration order.
fn render_schema() -> Vec<String> {
    let pool = ferro_api::descriptor_pool();
    let mut files: Vec<_> = pool
        .files()
        .filter(|f| !f.package_name().starts_with("google.protobuf"))
        .collect();
    files.sort_by(|a, b| a.name().cmp(b.name()));
    let mut lines = Vec::new();
    for file in files {
        for message in file.messages() {
            render_message(&message, &mut lines);
        }
        for top in file.enums() {
            for value in top.values() {
                lines.push(format!(
                    "{}.{} = {}",
                    top.full_name(),
                    value.name(),
                    value.number()
                ));
            }
        }
        for service in file.services() {
            for method in service.methods() {
                let stream = |yes: bool| if yes { "stream " } else { "" };
                lines.push(format!(
                    "rpc {}.{}({}{}) returns ({}{})",
                    service.full_name(),
                    method.name(),
                    stream(method.is_client_streaming()),
                    type_name(&FieldKind::Message(method.input())),
                    stream(method.is_server_streaming()),
                    type_name(&FieldKind::Message(method.output())),
                ));
            }
        }
    }
    lines
}

#[test]
fn the_renderer_writes_fields_values_and_rpcs_as_documented() {
    let lines = render_schema();
    for expected in [
        "ferro.v1.Server.spec = 2 (ServerSpec)",
        "ferro.v1.ServerSpec.PowerState.Running = 1",
        "ferro.v1.ServerSpec.power_state = 11 (optional ServerSpec.PowerState)",
        "ferro.v1.ServerSpec.networks = 4 (repeated ServerNetwork)",
        "ferro.v1.ObjectMeta.labels = 6 (map<string, string>)",
        "ferro.v1.ObjectMeta.creation_timestamp = 10 (google.protobuf.Timestamp)",
    ] {
        assert!(lines.iter().any(|l| l == expected), "missing {expected}");
    }
    assert!(
        lines.iter().all(|l| !l.contains("LabelsEntry")),
        "map entries are not messages"
    );
    let unique: HashSet<&String> = lines.iter().collect();
    assert_eq!(unique.len(), lines.len(), "every line is unique");
}

fn write_snapshot(path: &Path, lines: &[String]) -> Result<()> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir)?;
    }
    let mut text = SNAPSHOT_HEADER.to_owned();
    for line in lines {
        text.push_str(line);
        text.push('\n');
    }
    fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

#[test]
fn descriptors_keep_everything_the_previous_release_had() -> Result<()> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(SNAPSHOT);
    let update = std::env::var(UPDATE_VAR).is_ok_and(|v| v == "1");
    let rendered = render_schema();
    let Ok(text) = fs::read_to_string(&path) else {
        if update {
            return write_snapshot(&path, &rendered);
        }
        bail!(
            "api/{SNAPSHOT} is missing; create it with {UPDATE_VAR}=1 cargo test -p ferro-api --test schema"
        );
    };
    let released: Vec<&str> = text
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .collect();
    let now: HashSet<&str> = rendered.iter().map(String::as_str).collect();
    let before: HashSet<&str> = released.iter().copied().collect();

    let removed: Vec<&str> = released
        .iter()
        .copied()
        .filter(|l| !now.contains(l))
        .collect();
    if !removed.is_empty() {
        bail!(
            "the schema lost {} line(s) of the previous release (api/{SNAPSHOT}):\n{}\n\n\
             Field and value numbers, names and types never change, and a removed field's \
             number is never reused: old clients and stored objects still use them, and \
             renamed fields or values break manifests. Keep the old definition (deprecate \
             it in its comment), or remove it with `reserved <number>; reserved \"<name>\";`. \
             Only for a change to something never released, edit the snapshot by hand; \
             {UPDATE_VAR}=1 never removes lines.",
            removed.len(),
            removed
                .iter()
                .map(|l| format!("- {l}"))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    let added: Vec<&str> = rendered
        .iter()
        .map(String::as_str)
        .filter(|l| !before.contains(l))
        .collect();
    if update {
        if released != rendered {
            write_snapshot(&path, &rendered)?;
        }
        return Ok(());
    }
    if !added.is_empty() {
        bail!(
            "the schema has {} line(s) not in the released snapshot (api/{SNAPSHOT}):\n{}\n\n\
             If they are intended, record them with\n  {UPDATE_VAR}=1 cargo test -p ferro-api --test schema\n\
             and commit the snapshot with the schema change.",
            added.len(),
            added
                .iter()
                .map(|l| format!("+ {l}"))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Enum spellings.

/// `PowerState` → `POWER_STATE`.
fn screaming_snake(name: &str) -> String {
    let mut out = String::new();
    let mut previous_lower = false;
    for c in name.chars() {
        if c.is_ascii_uppercase() && previous_lower {
            out.push('_');
        }
        previous_lower = c.is_ascii_lowercase() || c.is_ascii_digit();
        out.push(c.to_ascii_uppercase());
    }
    out
}

#[test]
fn enum_values_are_spelled_for_users() {
    let pool = ferro_api::descriptor_pool();
    let mut failures = Vec::new();
    let enums = pool
        .all_enums()
        .filter(|e| !e.full_name().starts_with("google.protobuf."));
    for descriptor in enums {
        let unspecified = format!("{}_UNSPECIFIED", screaming_snake(descriptor.name()));
        let mut seen: Vec<String> = Vec::new();
        for value in descriptor.values() {
            let name = value.name();
            let at = format!("{}.{name}", descriptor.full_name());
            if value.number() == 0 {
                if name != unspecified {
                    failures.push(format!("{at}: the zero value must be {unspecified}"));
                }
                continue;
            }
            let user_facing = name.starts_with(|c: char| c.is_ascii_uppercase())
                && name.chars().all(|c| c.is_ascii_alphanumeric());
            if !user_facing {
                failures.push(format!(
                    "{at}: users write enum values as they are named; spell it UpperCamelCase \
                     (no underscores), like Running or AntiAffinity"
                ));
            }
            let folded = name.to_ascii_lowercase();
            if seen.contains(&folded) {
                failures.push(format!("{at}: differs from another value only in case"));
            }
            seen.push(folded);
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn screaming_snake_follows_protobuf_style() {
    assert_eq!(screaming_snake("PowerState"), "POWER_STATE");
    assert_eq!(screaming_snake("Ethertype"), "ETHERTYPE");
    assert_eq!(screaming_snake("Type"), "TYPE");
}
