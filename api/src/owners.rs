//! Who may write which part of each kind's status: the one table of field ownership.
//!
//! A status write is a patch made by a named writer. It may set only the top-level status
//! fields and the condition types that writer owns here; the apiserver refuses the rest.
//! Decisions that must be written together and once (a Server's `node` and `flavor`) are
//! owned by nobody here: only `Bind` writes them.
//!
//! Some status is an observation of spec the apiserver makes itself at admission, and no
//! writer may patch it: a KeyPair's `fingerprint` (its public key is immutable, so the
//! fingerprint never needs recomputing).
//!
//! A Quota's `used` has two writers: the quota controller, which recounts it here, and the
//! apiserver itself, which raises it in the transaction of each create it charges
//! ([`crate::quota`]).
//!
//! Node conditions are split so each has one writer: the agent reports `HostReady` (its
//! own checks of the host), node lifecycle owns `Ready` (heartbeat current and host ready)
//! and turns it `Unknown` when the heartbeat lapses.

use crate::{Error, Kind};

/// The scheduler: `Scheduled` conditions (placement itself goes through `Bind`, which records
/// `Scheduled=True` in the same write).
pub const SCHEDULER: &str = "scheduler";
/// The server controller: a Server's phase, addresses, ports and resolved references.
pub const SERVER_CONTROLLER: &str = "server-controller";
/// A node's agent: what it observes on its host. Node identities may use only this writer.
pub const AGENT: &str = "agent";
/// Node lifecycle: heartbeats and reachability.
pub const NODE_LIFECYCLE: &str = "node-lifecycle";
/// The network controller: segment IDs and network readiness.
pub const NETWORK_CONTROLLER: &str = "network-controller";
/// IPAM: port addresses and MACs.
pub const IPAM: &str = "ipam";
/// The router controller.
pub const ROUTER_CONTROLLER: &str = "router-controller";
/// The floating IP controller.
pub const FLOATING_IP_CONTROLLER: &str = "floating-ip-controller";
/// The security group controller.
pub const SECURITY_GROUP_CONTROLLER: &str = "security-group-controller";
/// The volume controller.
pub const VOLUME_CONTROLLER: &str = "volume-controller";
/// The image controller: Image status from what the nodes' caches found.
pub const IMAGE_CONTROLLER: &str = "image-controller";
/// The apiserver's image store: what it found of an Image's uploaded bytes.
pub const IMAGE_STORE: &str = "image-store";
/// The server group controller: members.
pub const SERVER_GROUP_CONTROLLER: &str = "server-group-controller";
/// The project controller: phase while emptying a project.
pub const PROJECT_CONTROLLER: &str = "project-controller";
/// The quota controller: usage.
pub const QUOTA_CONTROLLER: &str = "quota-controller";

/// What one writer owns of one kind's status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ownership {
    /// The writer's name.
    pub writer: &'static str,
    /// Top-level status fields, by JSON name.
    pub fields: &'static [&'static str],
    /// Condition types.
    pub conditions: &'static [&'static str],
}

macro_rules! own {
    ($writer:expr, [$($field:literal),*], [$($condition:literal),*] $(,)?) => {
        Ownership { writer: $writer, fields: &[$($field),*], conditions: &[$($condition),*] }
    };
}

/// The status ownership table of a kind. Kinds without status writers have none.
pub fn table(kind: Kind) -> &'static [Ownership] {
    match kind {
        Kind::Server => &[
            own!(SCHEDULER, [], ["Scheduled"]),
            own!(
                SERVER_CONTROLLER,
                [
                    "phase",
                    "addresses",
                    "observedGeneration",
                    "resolved",
                    "ports"
                ],
                ["Ready", "ReferencesResolved", "PortsReady"],
            ),
            own!(AGENT, ["host"], ["GuestRunning"]),
            own!(NODE_LIFECYCLE, [], ["NodeReachable"]),
        ],
        Kind::Node => &[
            own!(
                AGENT,
                [
                    "capacity",
                    "allocatable",
                    "hypervisor",
                    "zone",
                    "roles",
                    "images",
                    "address",
                    "agentVersion",
                    "accelerator",
                    "networkDriver",
                    "storage"
                ],
                ["HostReady", "NetworkReady"],
            ),
            own!(NODE_LIFECYCLE, [], ["Ready"]),
        ],
        Kind::Network => &[own!(
            NETWORK_CONTROLLER,
            ["segmentId", "observedGeneration"],
            ["Ready", "InUse"]
        )],
        Kind::Port => &[
            own!(
                IPAM,
                ["addresses", "mac", "networkUid", "observedGeneration"],
                ["Ready", "IpAddressExhausted"]
            ),
            own!(AGENT, ["node", "bound"], ["Bound"]),
        ],
        Kind::Router => &[
            own!(
                ROUTER_CONTROLLER,
                ["node", "externalIps", "observedGeneration"],
                ["Ready", "Scheduled", "ExternalGateway", "Interfaces"]
            ),
            // `Plumbed`'s message begins `node <name>`; the router controller counts
            // only one naming the router's current node, at the current generation.
            own!(AGENT, [], ["Plumbed"]),
        ],
        Kind::FloatingIP => &[
            own!(
                FLOATING_IP_CONTROLLER,
                ["address", "fixedIp", "router", "observedGeneration"],
                ["Ready", "Associated"]
            ),
            // `Plumbed`'s message begins `node <name>: <fixedIp> via router <router>`;
            // only one naming the current mapping, at the current generation, counts.
            own!(AGENT, [], ["Plumbed"]),
        ],
        Kind::SecurityGroup => &[own!(
            SECURITY_GROUP_CONTROLLER,
            ["observedGeneration"],
            ["Ready"]
        )],
        Kind::Volume => &[
            own!(
                VOLUME_CONTROLLER,
                ["phase", "node", "attachments", "observedGeneration"],
                ["Ready", "Scheduled"]
            ),
            // `Provisioned`'s message begins `node <name>`; the volume controller counts
            // only one naming the volume's node, at the current generation.
            own!(AGENT, ["sizeGib", "exports", "snapshots"], ["Provisioned"]),
        ],
        Kind::VolumeSnapshot => &[own!(
            VOLUME_CONTROLLER,
            ["phase", "sizeGib", "observedGeneration"],
            ["Ready"]
        )],
        Kind::Image => &[
            own!(
                IMAGE_CONTROLLER,
                [
                    "phase",
                    "checksum",
                    "sizeBytes",
                    "virtualSizeBytes",
                    "format",
                    "observedGeneration"
                ],
                ["Ready", "InUse"],
            ),
            own!(IMAGE_STORE, ["uploaded"], []),
        ],
        Kind::ServerGroup => &[own!(SERVER_GROUP_CONTROLLER, ["members"], [])],
        Kind::Project => &[own!(PROJECT_CONTROLLER, ["phase"], ["Ready"])],
        Kind::Quota => &[own!(QUOTA_CONTROLLER, ["used"], ["Ready"])],
        // `fingerprint` is computed at admission (see the module notes).
        Kind::KeyPair
        | Kind::Flavor
        | Kind::User
        | Kind::RoleBinding
        | Kind::Event
        | Kind::Lease
        | Kind::IPAddress
        | Kind::MACAddress
        | Kind::SegmentID => &[],
    }
}

/// Checks that `writer` owns every field and condition type of a status patch of `kind`.
pub fn check(
    kind: Kind,
    object: &str,
    writer: &str,
    fields: &[String],
    conditions: &[&str],
) -> Result<(), Error> {
    let table = table(kind);
    let Some(owned) = table.iter().find(|o| o.writer == writer) else {
        let writers: Vec<&str> = table.iter().map(|o| o.writer).collect();
        let reason = if kind == Kind::KeyPair {
            "KeyPair status is computed by the apiserver at admission".to_owned()
        } else if writers.is_empty() {
            format!("{kind} status has no writers")
        } else {
            format!(
                "unknown writer `{writer}` for {kind} status; writers are {}",
                writers.join(", ")
            )
        };
        return Err(Error::invalid(object, "writer", reason));
    };
    for field in fields {
        if field == "conditions" {
            return Err(Error::invalid(
                object,
                "fields",
                "conditions merge by type: send them in `conditions`",
            ));
        }
        if !owned.fields.contains(&field.as_str()) {
            let owner = table
                .iter()
                .find(|o| o.fields.contains(&field.as_str()))
                .map(|o| o.writer);
            let reason = match owner {
                Some(owner) => format!("owned by {owner}, not {writer}"),
                None if kind == Kind::Server && (field == "node" || field == "flavor") => {
                    "written only by Bind".to_owned()
                }
                None => format!("not a status field {writer} may write"),
            };
            return Err(Error::invalid(object, format!("status.{field}"), reason));
        }
    }
    for condition in conditions {
        if !owned.conditions.contains(condition) {
            let owner = table
                .iter()
                .find(|o| o.conditions.contains(condition))
                .map(|o| o.writer);
            let reason = match owner {
                Some(owner) => format!("owned by {owner}, not {writer}"),
                None => format!("not a condition type {writer} may write"),
            };
            return Err(Error::invalid(
                object,
                format!("status.conditions[{condition}]"),
                reason,
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_owned_field_exists_in_the_schema() {
        for kind in Kind::ALL {
            let status = kind
                .descriptor()
                .get_field_by_name("status")
                .expect("status");
            let prost_reflect::Kind::Message(status) = status.kind() else {
                panic!()
            };
            for ownership in table(*kind) {
                for field in ownership.fields {
                    assert!(
                        status.get_field_by_json_name(field).is_some(),
                        "{kind}.status.{field}"
                    );
                }
                if !ownership.conditions.is_empty() {
                    assert!(
                        status.get_field_by_name("conditions").is_some(),
                        "{kind} has no conditions"
                    );
                }
            }
        }
    }

    #[test]
    fn each_field_and_condition_has_one_writer() {
        for kind in Kind::ALL {
            let mut seen = std::collections::HashSet::new();
            for ownership in table(*kind) {
                for item in ownership.fields.iter().chain(ownership.conditions) {
                    assert!(seen.insert(*item), "{kind}: {item} has two writers");
                }
            }
        }
    }

    #[test]
    fn refusals_name_the_owner() {
        let err = check(Kind::Server, "servers/a", AGENT, &["phase".into()], &[]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "servers/a: status.phase: owned by server-controller, not agent"
        );
        let err = check(Kind::Server, "servers/a", SCHEDULER, &["node".into()], &[]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "servers/a: status.node: written only by Bind"
        );
        let err = check(Kind::Server, "servers/a", AGENT, &[], &["Ready"]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "servers/a: status.conditions[Ready]: owned by server-controller, not agent"
        );
        assert!(
            check(
                Kind::Server,
                "servers/a",
                AGENT,
                &["host".into()],
                &["GuestRunning"]
            )
            .is_ok()
        );
        let err = check(Kind::Flavor, "flavors/a", AGENT, &[], &[]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "flavors/a: writer: Flavor status has no writers"
        );
    }
}
