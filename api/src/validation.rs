//! Defaulting and validation of objects, for create and for update.
//!
//! The apiserver runs these on every write: [`apply_defaults`] on the input, then
//! [`validate_create`], or [`validate_update`] against the stored object. All three are
//! pure: no store, no clock, no other object. Whether a referenced Network or Flavor exists
//! is not their business — a missing reference is a condition the controllers report, so a
//! whole stack can be applied in any order.
//!
//! - Defaulting is deterministic and idempotent, and happens once, at admission: "unchanged"
//!   compares defaulted inputs, so re-applying a manifest or `ferro get -o yaml` output
//!   writes nothing.
//! - Validation collects every violation of an object, not just the first, in a fixed
//!   order (metadata, then spec in schema order, map keys sorted), each naming the field as
//!   users write it (`spec.subnets[1].cidr`, `metadata.labels["app"]`).
//! - Status is not checked here: status writes are checked against the table of writers.
//!
//! [`validate_references`] is the exception that proves the rule: it checks a Router or
//! FloatingIP against other objects the apiserver read (a gateway on a Network that exists
//! and is not external, a subnet that already has a router, an address outside the pools
//! it would come from). It too is pure, and it refuses only contradictions of objects that
//! exist: a missing reference is still a condition.
//!
//! One submodule per schema file holds its kinds' defaults, rules and immutable fields
//! (`compute`, `network`, `storage`, `image`, `identity`, `operations`, `allocation`);
//! `meta` checks the metadata every kind shares; `syntax` holds the grammars of values
//! (names, label keys, addresses, CIDRs, MACs, URLs) and `ssh` OpenSSH public keys.

use std::borrow::Cow;
use std::fmt;

use crate::kinds::Object;

mod allocation;
mod compute;
mod identity;
mod image;
mod meta;
mod network;
mod operations;
mod references;
mod ssh;
mod storage;
mod syntax;

#[cfg(test)]
mod tests;

pub use network::{DEFAULT_UNDERLAY_MTU, VXLAN_OVERHEAD, set_underlay_mtu};
pub use references::Others;
pub use ssh::ssh_fingerprint;

/// The largest object accepted, in bytes of its protobuf encoding.
pub const MAX_OBJECT_BYTES: usize = 256 * 1024;

/// The largest `spec.userData` of a Server, in bytes.
pub const MAX_USER_DATA_BYTES: usize = 64 * 1024;

/// The largest total size of an object's annotations (keys and values), in bytes.
pub const MAX_ANNOTATIONS_BYTES: usize = 64 * 1024;

/// The project a project-scoped object lands in when its manifest names none.
pub const DEFAULT_PROJECT: &str = "default";

/// One reason an object is refused: the field path (camelCase, as users write it, e.g.
/// `spec.subnets[1].cidr`, `metadata.labels["app"]`) and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    /// The field, from the object's root; empty for the object as a whole.
    pub path: String,
    /// Why the field is refused.
    pub reason: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.reason)
        } else {
            write!(f, "{}: {}", self.path, self.reason)
        }
    }
}

/// Why an object is refused: its display name (`servers/web-1`) and every violation.
///
/// Displays as `servers/web-1: spec.flavor: required`, several violations joined with
/// `; `.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{object}: {}", join(violations))]
pub struct Invalid {
    /// The object's display name, `servers/web-1`.
    pub object: String,
    /// Every violation, in a deterministic order.
    pub violations: Vec<Violation>,
}

fn join(violations: &[Violation]) -> String {
    let texts: Vec<String> = violations.iter().map(Violation::to_string).collect();
    texts.join("; ")
}

/// Fills in defaults, deterministically and idempotently (applying twice == once).
///
/// Defaults only ever fill what the user left unset; an explicit value, even `false` or
/// `""`, is kept. Values that cannot be defaulted sensibly because a field they derive from
/// is invalid (a Subnet's gateway when its CIDR does not parse) are left unset for
/// validation to report.
pub fn apply_defaults(object: &mut Object) {
    meta::apply_defaults(object);
    let name = object.name().to_owned();
    match object {
        Object::Server(o) => compute::default_server(o.spec.get_or_insert_default(), &name),
        Object::ServerGroup(o) => compute::default_server_group(o.spec.get_or_insert_default()),
        Object::Network(o) => network::default_network(o.spec.get_or_insert_default()),
        Object::Port(o) => network::default_port(o.spec.get_or_insert_default()),
        Object::Router(o) => network::default_router(o.spec.get_or_insert_default()),
        Object::SecurityGroup(o) => network::default_security_group(o.spec.get_or_insert_default()),
        Object::Volume(o) => storage::default_volume(o.spec.get_or_insert_default()),
        Object::Image(o) => image::default_image(o.spec.get_or_insert_default()),
        Object::User(o) => identity::default_user(o.spec.get_or_insert_default()),
        Object::Flavor(_)
        | Object::KeyPair(_)
        | Object::Node(_)
        | Object::FloatingIP(_)
        | Object::VolumeSnapshot(_)
        | Object::Project(_)
        | Object::RoleBinding(_)
        | Object::Quota(_)
        | Object::Event(_)
        | Object::Lease(_)
        | Object::IPAddress(_)
        | Object::MACAddress(_)
        | Object::SegmentID(_) => {}
    }
}

/// Fills the status fields that are the apiserver's own observations of spec, made once at
/// admission of a new object because the spec they derive from is immutable: a KeyPair's
/// `fingerprint` (OpenSSH's `SHA256:…` form of its public key). Run after validation.
pub fn observe_at_admission(object: &mut Object) {
    if let Object::KeyPair(o) = object {
        let spec = o.spec.clone().unwrap_or_default();
        if let Some(fingerprint) = ssh::ssh_fingerprint(&spec.public_key) {
            o.status.get_or_insert_default().fingerprint = fingerprint;
        }
    }
}

/// Validates a (defaulted) object for creation: metadata's user-writable parts (name,
/// project, labels, annotations, finalizers, ownerReferences) and spec. Status is not
/// validated here (status writes are checked by an owner table elsewhere).
pub fn validate_create(object: &Object) -> Result<(), Invalid> {
    let mut out = Violations::default();
    check_object(object, &mut out);
    out.into_result(object)
}

/// Validates an update against the stored object: everything [`validate_create`] checks,
/// plus immutable fields, each named: `spec.image: field is immutable`.
pub fn validate_update(new: &Object, old: &Object) -> Result<(), Invalid> {
    let mut out = Violations::default();
    check_object(new, &mut out);
    if new.kind() != old.kind() {
        out.add(&FieldPath::root().field("kind"), IMMUTABLE);
    } else {
        meta::check_update(new.metadata(), old.metadata(), &mut out);
        check_spec_update(new, old, &mut out);
    }
    out.into_result(new)
}

/// Whether [`validate_references`] checks `object`: the apiserver reads [`Others`] only
/// for Routers, FloatingIPs and Servers that attach or boot from volumes.
pub fn checks_references(object: &Object) -> bool {
    match object {
        Object::Router(_) | Object::FloatingIP(_) => true,
        Object::Server(o) => o
            .spec
            .as_ref()
            .is_some_and(|s| !s.volumes.is_empty() || !s.boot_volume.is_empty()),
        _ => false,
    }
}

/// Validates a (defaulted, otherwise valid) object against the other objects it names:
/// see the module notes. Objects of other kinds always pass.
pub fn validate_references(object: &Object, others: &Others) -> Result<(), Invalid> {
    let mut out = Violations::default();
    let meta = object.metadata().cloned().unwrap_or_default();
    match object {
        Object::Router(o) => references::check_router(&meta, &spec(&o.spec), others, &mut out),
        Object::FloatingIP(o) => {
            references::check_floating_ip(&meta, &spec(&o.spec), others, &mut out)
        }
        Object::Server(o) => references::check_server(&meta, &spec(&o.spec), others, &mut out),
        _ => {}
    }
    out.into_result(object)
}

fn check_object(object: &Object, out: &mut Violations) {
    let size = object.encode_to_vec().len();
    if size > MAX_OBJECT_BYTES {
        out.add(
            &FieldPath::root(),
            format!("the object is {size} bytes encoded; at most {MAX_OBJECT_BYTES} are allowed"),
        );
    }
    meta::check(object.kind(), object.metadata(), out);
    match object {
        Object::Server(o) => compute::check_server(&spec(&o.spec), out),
        Object::Flavor(o) => compute::check_flavor(&spec(&o.spec), out),
        Object::KeyPair(o) => compute::check_key_pair(&spec(&o.spec), out),
        Object::ServerGroup(o) => compute::check_server_group(&spec(&o.spec), out),
        Object::Node(o) => compute::check_node(&spec(&o.spec), out),
        Object::Network(o) => network::check_network(&spec(&o.spec), out),
        Object::Port(o) => network::check_port(&spec(&o.spec), out),
        Object::Router(o) => network::check_router(&spec(&o.spec), out),
        Object::FloatingIP(o) => network::check_floating_ip(&spec(&o.spec), out),
        Object::SecurityGroup(o) => network::check_security_group(&spec(&o.spec), out),
        Object::Volume(o) => storage::check_volume(&spec(&o.spec), out),
        Object::VolumeSnapshot(o) => storage::check_volume_snapshot(&spec(&o.spec), out),
        Object::Image(o) => image::check_image(&spec(&o.spec), out),
        Object::Project(_) => {}
        Object::User(_) => {}
        Object::RoleBinding(o) => identity::check_role_binding(&spec(&o.spec), out),
        Object::Quota(o) => identity::check_quota(&spec(&o.spec), out),
        Object::Event(o) => operations::check_event(&spec(&o.spec), out),
        Object::Lease(o) => operations::check_lease(&spec(&o.spec), out),
        Object::IPAddress(o) => allocation::check_ip_address(&spec(&o.spec), out),
        Object::MACAddress(o) => allocation::check_mac_address(&spec(&o.spec), out),
        Object::SegmentID(o) => allocation::check_segment_id(&spec(&o.spec), out),
    }
}

fn check_spec_update(new: &Object, old: &Object, out: &mut Violations) {
    match (new, old) {
        (Object::Server(n), Object::Server(o)) => {
            compute::check_server_update(&spec(&n.spec), &spec(&o.spec), out)
        }
        (Object::KeyPair(n), Object::KeyPair(o)) => {
            compute::check_key_pair_update(&spec(&n.spec), &spec(&o.spec), out)
        }
        (Object::ServerGroup(n), Object::ServerGroup(o)) => {
            compute::check_server_group_update(&spec(&n.spec), &spec(&o.spec), out)
        }
        (Object::Network(n), Object::Network(o)) => {
            network::check_network_update(&spec(&n.spec), &spec(&o.spec), out)
        }
        (Object::Port(n), Object::Port(o)) => {
            network::check_port_update(&spec(&n.spec), &spec(&o.spec), out)
        }
        (Object::FloatingIP(n), Object::FloatingIP(o)) => {
            network::check_floating_ip_update(&spec(&n.spec), &spec(&o.spec), out)
        }
        (Object::Volume(n), Object::Volume(o)) => {
            storage::check_volume_update(&spec(&n.spec), &spec(&o.spec), out)
        }
        (Object::VolumeSnapshot(n), Object::VolumeSnapshot(o)) => {
            storage::check_volume_snapshot_update(&spec(&n.spec), &spec(&o.spec), out)
        }
        (Object::Image(n), Object::Image(o)) => {
            image::check_image_update(&spec(&n.spec), &spec(&o.spec), out)
        }
        (Object::IPAddress(n), Object::IPAddress(o)) => {
            allocation::check_ip_address_update(&spec(&n.spec), &spec(&o.spec), out)
        }
        (Object::MACAddress(n), Object::MACAddress(o)) => {
            allocation::check_mac_address_update(&spec(&n.spec), &spec(&o.spec), out)
        }
        (Object::SegmentID(n), Object::SegmentID(o)) => {
            allocation::check_segment_id_update(&spec(&n.spec), &spec(&o.spec), out)
        }
        // Kinds without immutable spec fields, and mismatched kinds (reported by the
        // caller).
        _ => {}
    }
}

/// An object's spec, or an empty one when the object has none: an omitted spec is checked
/// like an empty one, so its required fields are reported.
fn spec<T: Clone + Default>(spec: &Option<T>) -> Cow<'_, T> {
    match spec {
        Some(s) => Cow::Borrowed(s),
        None => Cow::Owned(T::default()),
    }
}

/// The reason for every change to an immutable field.
const IMMUTABLE: &str = "field is immutable";

/// The path of a field from the object's root, as users write it: `spec.subnets[1].cidr`,
/// `metadata.labels["app"]`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct FieldPath(String);

impl FieldPath {
    /// The object itself.
    fn root() -> FieldPath {
        FieldPath::default()
    }

    /// `spec`, where most rules start.
    fn spec() -> FieldPath {
        FieldPath::root().field("spec")
    }

    /// A field of this message.
    fn field(&self, name: &str) -> FieldPath {
        if self.0.is_empty() {
            FieldPath(name.to_owned())
        } else {
            FieldPath(format!("{}.{name}", self.0))
        }
    }

    /// An item of this list.
    fn index(&self, i: usize) -> FieldPath {
        FieldPath(format!("{}[{i}]", self.0))
    }

    /// An entry of this map, quoted as the codec quotes it.
    fn key(&self, key: &str) -> FieldPath {
        FieldPath(format!("{}[{key:?}]", self.0))
    }
}

impl fmt::Display for FieldPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The violations found so far, in the order found.
#[derive(Debug, Default)]
struct Violations(Vec<Violation>);

impl Violations {
    /// Records that the field at `path` is refused.
    fn add(&mut self, path: &FieldPath, reason: impl Into<String>) {
        self.0.push(Violation {
            path: path.0.clone(),
            reason: reason.into(),
        });
    }

    /// Records the reason of a failed check; passes a successful one's value on.
    fn check<T>(&mut self, path: &FieldPath, result: Result<T, String>) -> Option<T> {
        match result {
            Ok(value) => Some(value),
            Err(reason) => {
                self.add(path, reason);
                None
            }
        }
    }

    /// `required` when `value` is empty.
    fn required(&mut self, path: &FieldPath, value: &str) -> bool {
        if value.is_empty() {
            self.add(path, "required");
        }
        !value.is_empty()
    }

    /// Records `field is immutable` unless the old and new values are equal.
    fn immutable<T: PartialEq + ?Sized>(&mut self, path: &FieldPath, new: &T, old: &T) {
        if new != old {
            self.add(path, IMMUTABLE);
        }
    }

    /// A name referring to another object of a kind with DNS-1123 label names, if set.
    fn reference(&mut self, path: &FieldPath, name: &str) {
        if !name.is_empty() {
            self.check(path, syntax::dns_label(name));
        }
    }

    /// Like [`Violations::reference`], and required.
    fn required_reference(&mut self, path: &FieldPath, name: &str) {
        if self.required(path, name) {
            self.check(path, syntax::dns_label(name));
        }
    }

    /// Reports every item whose key repeats an earlier item's key.
    fn unique<K: PartialEq>(&mut self, items: impl IntoIterator<Item = (FieldPath, K, String)>) {
        let mut seen: Vec<(FieldPath, K)> = Vec::new();
        for (path, key, shown) in items {
            if let Some((first, _)) = seen.iter().find(|(_, k)| *k == key) {
                let reason = if shown.is_empty() {
                    format!("duplicates {first}")
                } else {
                    format!("{shown} duplicates {first}")
                };
                self.add(&path, reason);
            } else {
                seen.push((path, key));
            }
        }
    }

    fn into_result(self, object: &Object) -> Result<(), Invalid> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(Invalid {
                object: object.display_name(),
                violations: self.0,
            })
        }
    }
}

/// Checks an enum field without presence: 0 means unset.
fn required_enum(out: &mut Violations, path: &FieldPath, value: i32, enum_name: &str) {
    if value == 0 {
        out.add(
            path,
            format!("required: one of {}", enum_values(enum_name).join(", ")),
        );
    } else {
        optional_enum(out, path, Some(value), enum_name);
    }
}

/// Checks an `optional` enum field: unset is fine, a set value must be one of the
/// schema's (the zero value included, which no user can spell).
fn optional_enum(out: &mut Violations, path: &FieldPath, value: Option<i32>, enum_name: &str) {
    let Some(value) = value else { return };
    if value == 0 || !enum_has(enum_name, value) {
        out.add(
            path,
            format!(
                "{value} is not one of {}",
                enum_values(enum_name).join(", ")
            ),
        );
    }
}

fn enum_has(enum_name: &str, value: i32) -> bool {
    crate::descriptor_pool()
        .get_enum_by_name(&format!("ferro.v1.{enum_name}"))
        .is_some_and(|e| e.get_value(value).is_some())
}

fn enum_values(enum_name: &str) -> Vec<String> {
    crate::descriptor_pool()
        .get_enum_by_name(&format!("ferro.v1.{enum_name}"))
        .map(|e| crate::codec::enum_names(&e))
        .unwrap_or_default()
}

/// Replaces an unset (or zero, which means unset) enum with its default.
fn default_enum(field: &mut Option<i32>, default: i32) {
    if matches!(field, None | Some(0)) {
        *field = Some(default);
    }
}
