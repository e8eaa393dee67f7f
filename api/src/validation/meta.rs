//! The metadata every kind shares: the parts users write (name, project, labels,
//! annotations, finalizers, owner references) and which of them may change.
//!
//! Server-owned fields (uid, resourceVersion, generation, timestamps, managedKeys) are the
//! apiserver's to set and are not checked here.

use std::borrow::Cow;

use super::syntax::{self, shown};
use super::{DEFAULT_PROJECT, FieldPath, MAX_ANNOTATIONS_BYTES, Violations};
use crate::kinds::{Kind, Object, Scope};
use crate::v1::ObjectMeta;

/// How names of a kind are spelled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum NameRule {
    /// A DNS-1123 label, at most 63 characters: most kinds, since their names end up in
    /// host names and host object names.
    Label,
    /// A DNS-1123 subdomain, at most 253 characters: flavors (`m1.tiny`), nodes and users
    /// (host and person names), and objects named by what they hold (claims, events,
    /// leases).
    Subdomain,
}

fn name_rule(kind: Kind) -> NameRule {
    match kind {
        Kind::Flavor
        | Kind::Node
        | Kind::User
        | Kind::Event
        | Kind::Lease
        | Kind::IPAddress
        | Kind::MACAddress
        | Kind::SegmentID => NameRule::Subdomain,
        _ => NameRule::Label,
    }
}

/// Checks an object name of the given kind.
pub(super) fn name(kind: Kind, name: &str) -> Result<(), String> {
    match name_rule(kind) {
        NameRule::Label => syntax::dns_label(name),
        NameRule::Subdomain => syntax::dns_subdomain(name),
    }
}

/// Puts project-scoped objects without a project in [`DEFAULT_PROJECT`], and gives owner
/// references to project-scoped owners the object's own project.
pub(super) fn apply_defaults(object: &mut Object) {
    let kind = object.kind();
    if kind.scope() == Scope::Project {
        let meta = object.metadata_mut();
        if meta.project.is_empty() {
            meta.project = DEFAULT_PROJECT.to_owned();
        }
        let project = meta.project.clone();
        for owner in &mut meta.owner_references {
            let owner_scope = Kind::from_kind_name(&owner.kind).map(Kind::scope);
            if owner.project.is_empty() && owner_scope == Some(Scope::Project) {
                owner.project = project.clone();
            }
        }
    }
}

/// Checks the user-writable metadata of an object of the given kind.
pub(super) fn check(kind: Kind, meta: Option<&ObjectMeta>, out: &mut Violations) {
    let meta = match meta {
        Some(m) => Cow::Borrowed(m),
        None => Cow::Owned(ObjectMeta::default()),
    };
    let path = FieldPath::root().field("metadata");

    let name_path = path.field("name");
    if out.required(&name_path, &meta.name) {
        out.check(&name_path, name(kind, &meta.name));
    }

    let project_path = path.field("project");
    match kind.scope() {
        Scope::Project => {
            if out.required(&project_path, &meta.project) {
                out.check(&project_path, syntax::dns_label(&meta.project));
            }
        }
        Scope::Cluster => {
            if !meta.project.is_empty() {
                out.add(&project_path, format!("{kind} is cluster-scoped"));
            }
        }
    }

    check_labels(&meta, &path, out);
    check_annotations(&meta, &path, out);
    check_finalizers(&meta, &path, out);
    check_owner_references(kind, &meta, &path, out);
}

/// Checks a map of label keys and values (`metadata.labels`, a Node's `spec.labels`,
/// a Flavor's `spec.extraSpecs`), in key order.
pub(super) fn check_label_map<'a>(
    labels: impl IntoIterator<Item = (&'a String, &'a String)>,
    path: &FieldPath,
    out: &mut Violations,
) {
    let mut entries: Vec<_> = labels.into_iter().collect();
    entries.sort();
    for (key, value) in entries {
        let entry = path.key(key);
        if let Err(reason) = syntax::qualified_name(key) {
            out.add(&entry, format!("invalid key: {reason}"));
        }
        if let Err(reason) = syntax::label_value(value) {
            out.add(&entry, format!("invalid value: {reason}"));
        }
    }
}

fn check_labels(meta: &ObjectMeta, path: &FieldPath, out: &mut Violations) {
    check_label_map(&meta.labels, &path.field("labels"), out);
}

fn check_annotations(meta: &ObjectMeta, path: &FieldPath, out: &mut Violations) {
    let path = path.field("annotations");
    let mut keys: Vec<&String> = meta.annotations.keys().collect();
    keys.sort();
    for key in keys {
        if let Err(reason) = syntax::qualified_name(key) {
            out.add(&path.key(key), format!("invalid key: {reason}"));
        }
    }
    let size: usize = meta
        .annotations
        .iter()
        .map(|(k, v)| k.len() + v.len())
        .sum();
    if size > MAX_ANNOTATIONS_BYTES {
        out.add(
            &path,
            format!("{size} bytes in total; at most {MAX_ANNOTATIONS_BYTES} are allowed"),
        );
    }
}

fn check_finalizers(meta: &ObjectMeta, path: &FieldPath, out: &mut Violations) {
    let path = path.field("finalizers");
    for (i, finalizer) in meta.finalizers.iter().enumerate() {
        out.check(&path.index(i), syntax::qualified_name(finalizer));
    }
    out.unique(
        meta.finalizers
            .iter()
            .enumerate()
            .map(|(i, f)| (path.index(i), f, shown(f))),
    );
}

fn check_owner_references(kind: Kind, meta: &ObjectMeta, path: &FieldPath, out: &mut Violations) {
    let path = path.field("ownerReferences");
    let mut controller: Option<FieldPath> = None;
    for (i, owner) in meta.owner_references.iter().enumerate() {
        let item = path.index(i);
        let owner_kind = Kind::from_kind_name(&owner.kind);
        let kind_path = item.field("kind");
        if out.required(&kind_path, &owner.kind) && owner_kind.is_none() {
            out.add(
                &kind_path,
                format!(
                    "unknown kind {}; known kinds: {}",
                    shown(&owner.kind),
                    Kind::names().join(", ")
                ),
            );
        }
        let name_path = item.field("name");
        if out.required(&name_path, &owner.name)
            && let Some(owner_kind) = owner_kind
        {
            out.check(&name_path, name(owner_kind, &owner.name));
        }
        let project_path = item.field("project");
        match owner_kind.map(Kind::scope) {
            Some(Scope::Cluster) if !owner.project.is_empty() => {
                let owner_kind = owner_kind.map(Kind::name).unwrap_or_default();
                out.add(&project_path, format!("{owner_kind} is cluster-scoped"));
            }
            Some(Scope::Project) if owner.project.is_empty() => out.add(&project_path, "required"),
            Some(Scope::Project)
                if kind.scope() == Scope::Project && owner.project != meta.project =>
            {
                out.add(
                    &project_path,
                    format!(
                        "must be the object's own project {}: owners in other projects are not supported",
                        shown(&meta.project)
                    ),
                );
            }
            Some(Scope::Project) => {
                out.check(&project_path, syntax::dns_label(&owner.project));
            }
            _ => {}
        }
        out.required(&item.field("uid"), &owner.uid);
        if owner.controller {
            match &controller {
                Some(first) => out.add(
                    &item.field("controller"),
                    format!("only one owner may be the controller; {first} is"),
                ),
                None => controller = Some(item.clone()),
            }
        }
    }
    out.unique(
        meta.owner_references
            .iter()
            .enumerate()
            .filter(|(_, o)| !o.uid.is_empty())
            .map(|(i, o)| (path.index(i).field("uid"), &o.uid, shown(&o.uid))),
    );
}

/// Checks what may not change in an update: name and project, and no finalizer may be
/// added once deletion has started.
pub(super) fn check_update(
    new: Option<&ObjectMeta>,
    old: Option<&ObjectMeta>,
    out: &mut Violations,
) {
    let empty = ObjectMeta::default();
    let new = new.unwrap_or(&empty);
    let old = old.unwrap_or(&empty);
    let path = FieldPath::root().field("metadata");
    out.immutable(&path.field("name"), &new.name, &old.name);
    out.immutable(&path.field("project"), &new.project, &old.project);
    if old.deletion_timestamp.is_some() {
        for (i, finalizer) in new.finalizers.iter().enumerate() {
            if !old.finalizers.contains(finalizer) {
                out.add(
                    &path.field("finalizers").index(i),
                    format!(
                        "cannot add {} while the object is being deleted",
                        shown(finalizer)
                    ),
                );
            }
        }
    }
}
