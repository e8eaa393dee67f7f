//! The table of kinds: every resource type with its names, scope and store keys, and the
//! [`Object`] enum that carries any of them.
//!
//! Store keys: `/ferro/<plural>/<project>/<name>` for project-scoped kinds and
//! `/ferro/<plural>/<name>` for cluster-scoped ones, so one prefix watch covers a kind.

use prost::Message;
use prost_reflect::{DynamicMessage, MessageDescriptor};

use crate::v1;

/// Whether objects of a kind live in a project or in the whole cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Scope {
    /// Named within a project: `/ferro/<plural>/<project>/<name>`.
    Project,
    /// Named once for the cluster: `/ferro/<plural>/<name>`.
    Cluster,
}

/// The root of every store key.
pub const KEY_ROOT: &str = "/ferro/";

/// Implemented by every generated resource type.
pub trait Resource: Message + Default + Clone + PartialEq + Sized + 'static {
    /// The kind of this type.
    const KIND: Kind;
    /// The object's metadata, if set.
    fn metadata(&self) -> Option<&v1::ObjectMeta>;
    /// The object's metadata, created empty if unset.
    fn metadata_mut(&mut self) -> &mut v1::ObjectMeta;
    /// Wraps the object in an [`Object`].
    fn into_object(self) -> Object;
    /// Unwraps an [`Object`] of this kind.
    fn from_object(object: Object) -> Option<Self>;
}

macro_rules! kinds {
    ($( $kind:ident => $rust:ident { plural: $plural:literal, short: [$($short:literal),*], scope: $scope:ident } ),* $(,)?) => {
        /// A kind of resource.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum Kind {
            $(
                #[doc = concat!("`", stringify!($kind), "`.")]
                $kind,
            )*
        }

        impl Kind {
            /// Every kind, in schema order.
            pub const ALL: &'static [Kind] = &[$(Kind::$kind),*];

            /// The kind's name as written in `kind:`.
            pub fn name(self) -> &'static str {
                match self { $(Kind::$kind => stringify!($kind)),* }
            }

            /// The plural, lower-case name used in store keys and the CLI.
            pub fn plural(self) -> &'static str {
                match self { $(Kind::$kind => $plural),* }
            }

            /// The CLI's short names.
            pub fn short_names(self) -> &'static [&'static str] {
                match self { $(Kind::$kind => &[$($short),*]),* }
            }

            /// Project- or cluster-scoped.
            pub fn scope(self) -> Scope {
                match self { $(Kind::$kind => Scope::$scope),* }
            }
        }

        /// One object of any kind.
        // Objects are built and moved one at a time; boxing each would cost an allocation
        // for nothing.
        #[allow(clippy::large_enum_variant)]
        #[derive(Clone, Debug, PartialEq)]
        pub enum Object {
            $(
                #[doc = concat!("A `", stringify!($kind), "`.")]
                $kind(v1::$rust),
            )*
        }

        impl Object {
            /// The object's kind.
            pub fn kind(&self) -> Kind {
                match self { $(Object::$kind(_) => Kind::$kind),* }
            }

            /// The object's metadata, if set.
            pub fn metadata(&self) -> Option<&v1::ObjectMeta> {
                match self { $(Object::$kind(o) => o.metadata.as_ref()),* }
            }

            /// The object's metadata, created empty if unset.
            pub fn metadata_mut(&mut self) -> &mut v1::ObjectMeta {
                match self { $(Object::$kind(o) => o.metadata.get_or_insert_with(Default::default)),* }
            }

            /// Clears the status.
            pub fn clear_status(&mut self) {
                match self { $(Object::$kind(o) => o.status = None),* }
            }

            /// Whether two objects have equal specs; objects of different kinds never do.
            pub fn spec_eq(&self, other: &Object) -> bool {
                match (self, other) {
                    $((Object::$kind(a), Object::$kind(b)) => a.spec == b.spec,)*
                    _ => false,
                }
            }

            /// Takes the spec of `other`, which is of the same kind (otherwise nothing
            /// changes).
            pub fn set_spec_from(&mut self, other: &Object) {
                match (self, other) {
                    $((Object::$kind(a), Object::$kind(b)) => a.spec = b.spec.clone(),)*
                    _ => {}
                }
            }

            /// The protobuf encoding of the object (without its kind).
            pub fn encode_to_vec(&self) -> Vec<u8> {
                match self { $(Object::$kind(o) => o.encode_to_vec()),* }
            }

            /// The length of the protobuf encoding, without encoding.
            pub fn encoded_len(&self) -> usize {
                match self { $(Object::$kind(o) => o.encoded_len()),* }
            }

            /// Decodes the protobuf encoding of an object of a known kind.
            pub fn decode(kind: Kind, bytes: &[u8]) -> Result<Object, prost::DecodeError> {
                Ok(match kind { $(Kind::$kind => Object::$kind(v1::$rust::decode(bytes)?)),* })
            }

            /// A reflective copy of the object, for generic field access.
            pub fn to_dynamic(&self) -> DynamicMessage {
                let mut message = DynamicMessage::new(self.kind().descriptor());
                message
                    .merge(self.encode_to_vec().as_slice())
                    .expect("a generated message re-decodes with its own descriptor");
                message
            }

            /// Converts a reflective message of the given kind back into an object.
            pub fn from_dynamic(kind: Kind, message: &DynamicMessage) -> Result<Object, String> {
                let bytes = message.encode_to_vec();
                Object::decode(kind, &bytes).map_err(|e| format!("cannot convert to {}: {e}", kind.name()))
            }
        }

        impl From<Object> for v1::AnyObject {
            fn from(object: Object) -> Self {
                let inner = match object { $(Object::$kind(o) => v1::any_object::Object::$rust(o)),* };
                v1::AnyObject { object: Some(inner) }
            }
        }

        impl TryFrom<v1::AnyObject> for Object {
            type Error = crate::Error;
            fn try_from(any: v1::AnyObject) -> Result<Self, crate::Error> {
                match any.object {
                    $(Some(v1::any_object::Object::$rust(o)) => Ok(Object::$kind(o)),)*
                    None => Err(crate::Error::invalid("", "object", "required")),
                }
            }
        }

        $(
            impl Resource for v1::$rust {
                const KIND: Kind = Kind::$kind;
                fn metadata(&self) -> Option<&v1::ObjectMeta> {
                    self.metadata.as_ref()
                }
                fn metadata_mut(&mut self) -> &mut v1::ObjectMeta {
                    self.metadata.get_or_insert_with(Default::default)
                }
                fn into_object(self) -> Object {
                    Object::$kind(self)
                }
                fn from_object(object: Object) -> Option<Self> {
                    match object {
                        Object::$kind(o) => Some(o),
                        #[allow(unreachable_patterns)]
                        _ => None,
                    }
                }
            }
        )*
    };
}

kinds! {
    Server => Server { plural: "servers", short: ["srv"], scope: Project },
    Flavor => Flavor { plural: "flavors", short: ["flv"], scope: Cluster },
    KeyPair => KeyPair { plural: "keypairs", short: ["kp"], scope: Project },
    ServerGroup => ServerGroup { plural: "servergroups", short: ["sgrp"], scope: Project },
    Node => Node { plural: "nodes", short: ["no"], scope: Cluster },
    Network => Network { plural: "networks", short: ["net"], scope: Project },
    Port => Port { plural: "ports", short: [], scope: Project },
    Router => Router { plural: "routers", short: ["rtr"], scope: Project },
    FloatingIP => FloatingIp { plural: "floatingips", short: ["fip"], scope: Project },
    SecurityGroup => SecurityGroup { plural: "securitygroups", short: ["sg"], scope: Project },
    Volume => Volume { plural: "volumes", short: ["vol"], scope: Project },
    VolumeSnapshot => VolumeSnapshot { plural: "volumesnapshots", short: ["snap"], scope: Project },
    Image => Image { plural: "images", short: ["img"], scope: Project },
    Project => Project { plural: "projects", short: ["proj"], scope: Cluster },
    User => User { plural: "users", short: [], scope: Cluster },
    RoleBinding => RoleBinding { plural: "rolebindings", short: ["rb"], scope: Project },
    Quota => Quota { plural: "quotas", short: [], scope: Project },
    Event => Event { plural: "events", short: ["ev"], scope: Project },
    Lease => Lease { plural: "leases", short: [], scope: Cluster },
    IPAddress => IpAddress { plural: "ipaddresses", short: ["ip"], scope: Cluster },
    MACAddress => MacAddress { plural: "macaddresses", short: ["mac"], scope: Cluster },
    SegmentID => SegmentId { plural: "segmentids", short: ["seg"], scope: Cluster },
}

impl Kind {
    /// The kind named exactly as in a manifest's `kind:` field.
    pub fn from_kind_name(name: &str) -> Option<Kind> {
        Kind::ALL.iter().copied().find(|k| k.name() == name)
    }

    /// The kind a user means on the command line: its name, singular, plural or short
    /// name, any case (`Server`, `server`, `servers`, `srv`).
    pub fn lookup(word: &str) -> Option<Kind> {
        let w = word.to_ascii_lowercase();
        Kind::ALL.iter().copied().find(|k| {
            k.name().to_ascii_lowercase() == w
                || k.plural() == w
                || k.short_names().contains(&w.as_str())
        })
    }

    /// Every kind's name, for error messages.
    pub fn names() -> Vec<&'static str> {
        Kind::ALL.iter().map(|k| k.name()).collect()
    }

    /// The message descriptor of the kind.
    pub fn descriptor(self) -> MessageDescriptor {
        crate::descriptor_pool()
            .get_message_by_name(&format!("ferro.v1.{}", self.name()))
            .expect("every kind has a message in the schema")
    }

    /// The store key of one object; `project` is ignored for cluster-scoped kinds.
    pub fn key(self, project: &str, name: &str) -> String {
        match self.scope() {
            Scope::Project => format!("{KEY_ROOT}{}/{project}/{name}", self.plural()),
            Scope::Cluster => format!("{KEY_ROOT}{}/{name}", self.plural()),
        }
    }

    /// The store prefix of every object of the kind, or of one project's objects.
    pub fn prefix(self, project: Option<&str>) -> String {
        match (self.scope(), project) {
            (Scope::Project, Some(p)) => format!("{KEY_ROOT}{}/{p}/", self.plural()),
            _ => format!("{KEY_ROOT}{}/", self.plural()),
        }
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl Object {
    /// The object's name, or "" when unset.
    pub fn name(&self) -> &str {
        self.metadata().map(|m| m.name.as_str()).unwrap_or_default()
    }

    /// The object's project, or "" when unset or cluster-scoped.
    pub fn project(&self) -> &str {
        self.metadata()
            .map(|m| m.project.as_str())
            .unwrap_or_default()
    }

    /// `servers/web-1`: how messages and the CLI name the object.
    pub fn display_name(&self) -> String {
        format!("{}/{}", self.kind().plural(), self.name())
    }

    /// The object's store key.
    pub fn key(&self) -> String {
        self.kind().key(self.project(), self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_has_a_message_with_metadata_spec_and_status() {
        for kind in Kind::ALL {
            let desc = kind.descriptor();
            for part in ["metadata", "spec", "status"] {
                assert!(
                    desc.get_field_by_name(part).is_some(),
                    "{kind} lacks {part}"
                );
            }
        }
    }

    #[test]
    fn names_are_unique_across_kinds() {
        let mut seen = std::collections::HashSet::new();
        for kind in Kind::ALL {
            for word in [kind.name().to_ascii_lowercase(), kind.plural().to_owned()]
                .into_iter()
                .chain(kind.short_names().iter().map(|s| s.to_string()))
            {
                assert!(
                    seen.insert(word.clone()) || word == kind.name().to_ascii_lowercase(),
                    "{word} is ambiguous"
                );
            }
        }
    }

    #[test]
    fn lookup_accepts_every_spelling() {
        for word in ["Server", "server", "servers", "srv", "SRV"] {
            assert_eq!(Kind::lookup(word), Some(Kind::Server), "{word}");
        }
        assert_eq!(Kind::lookup("fip"), Some(Kind::FloatingIP));
        assert_eq!(Kind::lookup("sg"), Some(Kind::SecurityGroup));
        assert_eq!(Kind::lookup("nope"), None);
    }

    #[test]
    fn keys_follow_the_layout() {
        assert_eq!(
            Kind::Server.key("default", "web-1"),
            "/ferro/servers/default/web-1"
        );
        assert_eq!(
            Kind::Flavor.key("ignored", "m1.tiny"),
            "/ferro/flavors/m1.tiny"
        );
        assert_eq!(Kind::Port.prefix(Some("p1")), "/ferro/ports/p1/");
        assert_eq!(Kind::Port.prefix(None), "/ferro/ports/");
    }
}
