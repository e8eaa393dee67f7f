//! The virtual switch seam of the node agent: bridges, ports on them and OpenFlow flows,
//! behind the [`Switch`] trait.
//!
//! The node's network reconciler is the caller. It wants `br-int` (and `br-tun`) to exist,
//! every Port of a guest on this node to be a port of `br-int` with its network's local
//! VLAN tag, a VXLAN port to each node that hosts ports of the same networks, and a
//! network's flows installed as one set. It observes before it acts: [`Switch::list_ports`]
//! and [`Switch::list_bridges`] are how the agent sees the host, so a restarted agent finds
//! the ports an earlier one made, and a port whose [`FERRO_OWNER`] no longer exists is an
//! orphan to remove. Every `ensure_*` call converges on the spec it is given and is
//! harmless when repeated; every `remove_*` call is harmless when there is nothing left.
//!
//! Ports carry `external_ids` as Neutron's OVS agent writes them ([`IFACE_ID`] = the
//! Port's uid, [`ATTACHED_MAC`], [`VM_UUID`]) so an operator finds them with the usual
//! `ovs-vsctl` commands. Flows are grouped by a cookie per owner ([`FlowCookie`]), which is
//! how a Network's flows are replaced or removed without touching anyone else's.
//!
//! One switch instance serves one node: the real driver, [`ovs::OvsSwitch`], talks to one
//! Open vSwitch instance through its OVSDB socket ([`ovsdb`]) and `ovs-ofctl`; under
//! `ferro up --nodes N` each node namespace has its own private instance, started by
//! [`ovs_instance::OvsInstance`]. [`memory::MemorySwitch`] is the in-memory double for
//! reconciler tests without root.

pub mod memory;
pub mod ovs;
pub mod ovs_instance;
pub mod ovsdb;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use sha2::Digest;

/// `external_ids` key: the uid of the Ferro Port the switch port belongs to (Neutron's
/// name for it).
pub const IFACE_ID: &str = "iface-id";
/// `external_ids` key: the guest-visible MAC address of the Port.
pub const ATTACHED_MAC: &str = "attached-mac";
/// `external_ids` key: the uid of the Server the Port is attached to.
pub const VM_UUID: &str = "vm-uuid";
/// `external_ids` key on everything Ferro makes: the uid of the object that owns it (a
/// Port, or a Network for tunnel ports), so orphans can be found and removed.
pub const FERRO_OWNER: &str = "ferro-owner";

/// The longest interface name Linux allows (IFNAMSIZ less the terminating zero).
pub const MAX_INTERFACE_NAME: usize = 15;

/// The datapath a bridge forwards packets with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DatapathType {
    /// The kernel module's datapath (`system`): fast, needs `openvswitch.ko`.
    System,
    /// The userspace datapath (`netdev`): works anywhere, slower.
    Netdev,
}

impl DatapathType {
    /// OVSDB's name for it.
    pub fn as_str(self) -> &'static str {
        match self {
            DatapathType::System => "system",
            DatapathType::Netdev => "netdev",
        }
    }

    /// Reads OVSDB's name; an empty `datapath_type` means `system`.
    pub fn parse(name: &str) -> Option<DatapathType> {
        match name {
            "" | "system" => Some(DatapathType::System),
            "netdev" => Some(DatapathType::Netdev),
            _ => None,
        }
    }

    /// The datapath this host can run: `system` where the openvswitch kernel module is
    /// loaded, `netdev` otherwise.
    pub fn probe() -> DatapathType {
        if std::path::Path::new("/sys/module/openvswitch").exists() {
            DatapathType::System
        } else {
            DatapathType::Netdev
        }
    }
}

/// A bridge as found on the switch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BridgeInfo {
    /// Its name, e.g. `br-int`.
    pub name: String,
    /// Its datapath type as written in OVSDB (`netdev`, `system`, or empty for `system`).
    pub datapath_type: String,
    /// Its `external_ids`.
    pub external_ids: BTreeMap<String, String>,
}

/// The key of a VXLAN tunnel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TunnelKey {
    /// A fixed VNI (the Network's segment ID), 0 to 2^24 - 1.
    Vni(u32),
    /// Set per packet by flows (`set_field:…->tun_id`), as Neutron's `br-tun` does.
    Flow,
}

impl TunnelKey {
    fn as_option(self) -> String {
        match self {
            TunnelKey::Vni(vni) => vni.to_string(),
            TunnelKey::Flow => "flow".to_owned(),
        }
    }
}

/// What kind of port a port is, with the options that kind takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PortKind {
    /// A network device that exists on the host (a tap, a veth end), plugged in by name.
    System,
    /// A device the switch makes itself (`type=internal`).
    Internal,
    /// A VXLAN tunnel to another node.
    Vxlan {
        /// The far end's underlay address (`options:remote_ip`).
        remote_ip: IpAddr,
        /// The tunnel key (`options:key`).
        key: TunnelKey,
        /// The local underlay address to send from (`options:local_ip`).
        local_ip: Option<IpAddr>,
    },
    /// One end of a patch between two bridges of the same switch (`type=patch`), as
    /// `patch-tun` on `br-int` and `patch-int` on `br-tun`.
    Patch {
        /// The port at the other end (`options:peer`).
        peer: String,
    },
    /// Any other OVS interface type, as found on the switch (never made by Ferro).
    Other {
        /// The interface's `type`.
        interface_type: String,
        /// Its `options`.
        options: BTreeMap<String, String>,
    },
}

impl PortKind {
    /// The interface `type` OVSDB stores: empty for a system device.
    pub fn interface_type(&self) -> &str {
        match self {
            PortKind::System => "",
            PortKind::Internal => "internal",
            PortKind::Vxlan { .. } => "vxlan",
            PortKind::Patch { .. } => "patch",
            PortKind::Other { interface_type, .. } => interface_type,
        }
    }

    /// The interface `options` OVSDB stores.
    pub fn options(&self) -> BTreeMap<String, String> {
        match self {
            PortKind::System | PortKind::Internal => BTreeMap::new(),
            PortKind::Vxlan {
                remote_ip,
                key,
                local_ip,
            } => {
                let mut options = BTreeMap::from([
                    ("remote_ip".to_owned(), remote_ip.to_string()),
                    ("key".to_owned(), key.as_option()),
                ]);
                if let Some(local) = local_ip {
                    options.insert("local_ip".to_owned(), local.to_string());
                }
                options
            }
            PortKind::Patch { peer } => BTreeMap::from([("peer".to_owned(), peer.clone())]),
            PortKind::Other { options, .. } => options.clone(),
        }
    }

    /// Reads a kind back from an interface's `type` and `options`. A VXLAN port whose
    /// options Ferro would not have written is [`PortKind::Other`].
    pub fn from_interface(interface_type: &str, options: BTreeMap<String, String>) -> PortKind {
        let other = |options| PortKind::Other {
            interface_type: interface_type.to_owned(),
            options,
        };
        match interface_type {
            "" | "system" if options.is_empty() => PortKind::System,
            "internal" if options.is_empty() => PortKind::Internal,
            "vxlan" => {
                let parsed = (|| {
                    let remote_ip = options.get("remote_ip")?.parse().ok()?;
                    let key = match options.get("key").map(String::as_str) {
                        Some("flow") => TunnelKey::Flow,
                        Some(vni) => TunnelKey::Vni(vni.parse().ok()?),
                        None => TunnelKey::Vni(0),
                    };
                    let local_ip = match options.get("local_ip") {
                        Some(ip) => Some(ip.parse().ok()?),
                        None => None,
                    };
                    let kind = PortKind::Vxlan {
                        remote_ip,
                        key,
                        local_ip,
                    };
                    (kind.options() == options).then_some(kind)
                })();
                parsed.unwrap_or_else(|| other(options))
            }
            "patch" if options.len() == 1 && options.contains_key("peer") => PortKind::Patch {
                peer: options["peer"].clone(),
            },
            _ => other(options),
        }
    }
}

/// A port as it should be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortSpec {
    /// The bridge it belongs on, which must exist.
    pub bridge: String,
    /// The port's (and its interface's) name: for a system port, the device's name.
    pub name: String,
    /// What it is.
    pub kind: PortKind,
    /// The VLAN tag (access port) of its local network, or `None` for a trunk.
    pub tag: Option<u16>,
    /// The interface's `external_ids`, replacing whatever was there.
    pub external_ids: BTreeMap<String, String>,
}

/// A port as found on the switch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortInfo {
    /// The bridge it is on.
    pub bridge: String,
    /// Its name.
    pub name: String,
    /// What it is.
    pub kind: PortKind,
    /// Its VLAN tag.
    pub tag: Option<u16>,
    /// Its interface's `external_ids`.
    pub external_ids: BTreeMap<String, String>,
    /// Its OpenFlow port number, once the switch has attached it.
    pub ofport: Option<u32>,
    /// Why the switch could not attach it (e.g. no such device), if it could not.
    pub error: Option<String>,
}

impl PortInfo {
    /// Whether the port is what `spec` asks for (where it is, what it is, its tag and its
    /// `external_ids`).
    pub fn matches(&self, spec: &PortSpec) -> bool {
        self.bridge == spec.bridge
            && self.name == spec.name
            && self.kind == spec.kind
            && self.tag == spec.tag
            && self.external_ids == spec.external_ids
    }

    /// The owner recorded in [`FERRO_OWNER`], if Ferro made the port.
    pub fn owner(&self) -> Option<&str> {
        self.external_ids.get(FERRO_OWNER).map(String::as_str)
    }
}

/// The cookie that marks every flow of one owner (a Network, a Port), so they can be
/// dumped, replaced and removed as a set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowCookie(pub u64);

impl FlowCookie {
    /// The cookie of an owner's flows: derived from its uid, so the same on every node
    /// and after every restart. Never zero, the cookie of flows nobody owns.
    pub fn for_owner(uid: &str) -> FlowCookie {
        let digest = sha2::Sha256::digest(uid.as_bytes());
        let bytes: [u8; 8] = digest[..8].try_into().expect("a sha256 has 8 bytes");
        FlowCookie(u64::from_be_bytes(bytes).max(1))
    }
}

impl std::fmt::Display for FlowCookie {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

/// One OpenFlow flow, in `ovs-ofctl`'s notation. The cookie is given with the set the flow
/// belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlowSpec {
    /// The OpenFlow table.
    pub table: u8,
    /// The priority; higher wins.
    pub priority: u16,
    /// The match, e.g. `in_port=1,dl_vlan=5` (empty matches everything).
    pub matches: String,
    /// The actions, e.g. `strip_vlan,output:2` or `NORMAL`.
    pub actions: String,
}

/// A flow as dumped from a bridge. The switch may write a match differently from how it
/// was given (`in_port=tap1` becomes `in_port=1`, fields are reordered), so compare flows
/// by cookie, not by text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flow {
    /// Its owner's cookie (zero if it has none).
    pub cookie: FlowCookie,
    /// The flow itself.
    pub spec: FlowSpec,
}

/// Why a switch call failed.
#[derive(Debug, thiserror::Error)]
pub enum SwitchError {
    /// The request cannot be carried out as it is.
    #[error("invalid switch request: {field}: {reason}")]
    InvalidSpec {
        /// The offending field.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The bridge a port or flow belongs on does not exist.
    #[error("no bridge {0}")]
    NoSuchBridge(String),
    /// Talking to the switch's database failed.
    #[error("switch database")]
    Ovsdb(#[from] ovsdb::OvsdbError),
    /// The database holds something the driver cannot read.
    #[error("unexpected switch state: {0}")]
    Unexpected(String),
    /// `ovs-vswitchd` did not take up a change in time (is it running?).
    #[error("ovs-vswitchd did not apply the change within {0:?}")]
    NotApplied(Duration),
    /// A helper program failed.
    #[error("{program} failed ({status}): {stderr}")]
    Command {
        /// The program, with its most telling arguments.
        program: String,
        /// Its exit status.
        status: String,
        /// What it printed on stderr.
        stderr: String,
    },
    /// Running a helper program or touching a file failed.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

/// A virtual switch on this node: bridges, their ports and their flows.
///
/// Every method looks at the switch first; `ensure_*` converges and `remove_*` forgets,
/// and both are harmless to repeat.
#[async_trait::async_trait]
pub trait Switch: Send + Sync {
    /// The datapath type new bridges get.
    fn datapath_type(&self) -> DatapathType;

    /// Makes the bridge exist with the driver's datapath type (and fixes the type of one
    /// that exists with another).
    async fn ensure_bridge(&self, name: &str) -> Result<BridgeInfo, SwitchError>;

    /// Removes the bridge with all its ports and flows. No such bridge is not an error.
    async fn remove_bridge(&self, name: &str) -> Result<(), SwitchError>;

    /// Every bridge on the switch.
    async fn list_bridges(&self) -> Result<Vec<BridgeInfo>, SwitchError>;

    /// Changes some of a bridge's `external_ids` in one step: a key with a value is set,
    /// a key with `None` is removed; keys not named are kept. This is where a driver keeps
    /// node-wide records that must outlive it (Ferro's local VLAN of each network).
    /// Fails with [`SwitchError::NoSuchBridge`] if the bridge is missing.
    async fn update_bridge_external_ids(
        &self,
        bridge: &str,
        changes: &BTreeMap<String, Option<String>>,
    ) -> Result<BridgeInfo, SwitchError>;

    /// Makes the port exist as `spec` says: adds it, moves it from another bridge, or
    /// corrects its kind, tag and `external_ids`. Fails with
    /// [`SwitchError::NoSuchBridge`] if the bridge is missing.
    async fn ensure_port(&self, spec: &PortSpec) -> Result<PortInfo, SwitchError>;

    /// Removes the port, from whichever bridge it is on. No such port is not an error.
    async fn remove_port(&self, name: &str) -> Result<(), SwitchError>;

    /// Every port of every bridge, without the bridges' own internal ports (the port named
    /// like its bridge).
    async fn list_ports(&self) -> Result<Vec<PortInfo>, SwitchError>;

    /// Adds flows under `cookie`, keeping the flows the bridge has.
    async fn add_flows(
        &self,
        bridge: &str,
        cookie: FlowCookie,
        flows: &[FlowSpec],
    ) -> Result<(), SwitchError>;

    /// Replaces every flow under `cookie` with `flows`, in one step where the switch can
    /// (packets never see the set half-replaced).
    async fn replace_flows(
        &self,
        bridge: &str,
        cookie: FlowCookie,
        flows: &[FlowSpec],
    ) -> Result<(), SwitchError>;

    /// Removes every flow under `cookie`. None left is not an error.
    async fn remove_flows(&self, bridge: &str, cookie: FlowCookie) -> Result<(), SwitchError>;

    /// Replaces the flows of several cookies at once (an empty set removes a cookie's
    /// flows), in one step where the switch can.
    async fn replace_flow_sets(
        &self,
        bridge: &str,
        sets: &[(FlowCookie, Vec<FlowSpec>)],
    ) -> Result<(), SwitchError> {
        for (cookie, flows) in sets {
            if flows.is_empty() {
                self.remove_flows(bridge, *cookie).await?;
            } else {
                self.replace_flows(bridge, *cookie, flows).await?;
            }
        }
        Ok(())
    }

    /// The bridge's flows: those under `cookie`, or all of them.
    async fn dump_flows(
        &self,
        bridge: &str,
        cookie: Option<FlowCookie>,
    ) -> Result<Vec<Flow>, SwitchError>;
}

/// Checks a bridge name: an interface name, since the bridge has a device of that name.
pub fn validate_bridge_name(name: &str) -> Result<(), SwitchError> {
    validate_interface_name("bridge", name)
}

/// Checks the parts of a port spec every driver needs to be true.
pub fn validate_port_spec(spec: &PortSpec) -> Result<(), SwitchError> {
    validate_bridge_name(&spec.bridge)?;
    validate_interface_name("name", &spec.name)?;
    if spec.name == spec.bridge {
        return Err(invalid("name", "is the bridge's own port"));
    }
    if let Some(tag) = spec.tag
        && tag > 4095
    {
        return Err(invalid("tag", "a VLAN tag is 0 to 4095"));
    }
    match &spec.kind {
        PortKind::Vxlan {
            key: TunnelKey::Vni(vni),
            ..
        } if *vni >= 1 << 24 => return Err(invalid("kind.key", "a VNI is below 2^24")),
        PortKind::Patch { peer } => validate_interface_name("kind.peer", peer)?,
        PortKind::Other { .. } => {
            return Err(invalid(
                "kind",
                "Ferro only makes system, internal, vxlan and patch ports",
            ));
        }
        _ => {}
    }
    if spec.external_ids.keys().any(String::is_empty) {
        return Err(invalid("external_ids", "keys must not be empty"));
    }
    Ok(())
}

/// Checks a flow set: tables and texts that cannot break the `ovs-ofctl` line they go on.
pub fn validate_flows(flows: &[FlowSpec]) -> Result<(), SwitchError> {
    for flow in flows {
        for (field, text) in [("matches", &flow.matches), ("actions", &flow.actions)] {
            if text.contains(['\n', '\r']) {
                return Err(invalid(field, "must be one line"));
            }
            // Actions may name a table inside parentheses (`ct(table=71)`), never at the
            // top level.
            let top = outside_parentheses(text);
            if top.contains("cookie=") || top.contains("table=") || top.contains("priority=") {
                return Err(invalid(
                    field,
                    "cookie, table and priority have their own fields",
                ));
            }
        }
        if flow.actions.trim().is_empty() {
            return Err(invalid("actions", "must not be empty (use drop)"));
        }
        if flow.table == 255 {
            return Err(invalid("table", "255 is not a flow table"));
        }
    }
    Ok(())
}

/// `text` without what is inside parentheses.
fn outside_parentheses(text: &str) -> String {
    let mut depth = 0usize;
    text.chars()
        .filter(|c| {
            match c {
                '(' => depth += 1,
                ')' => depth = depth.saturating_sub(1),
                _ => return depth == 0,
            }
            false
        })
        .collect()
}

fn validate_interface_name(field: &'static str, name: &str) -> Result<(), SwitchError> {
    if name.is_empty()
        || name.len() > MAX_INTERFACE_NAME
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err(invalid(
            field,
            &format!("{name:?}: 1 to 15 letters, digits, '-', '_' or '.'"),
        ));
    }
    Ok(())
}

fn invalid(field: &'static str, reason: &str) -> SwitchError {
    SwitchError::InvalidSpec {
        field,
        reason: reason.to_owned(),
    }
}

/// Where a private Open vSwitch instance keeps its sockets: kept here so the driver and
/// the instance agree.
pub fn ovsdb_socket(run_dir: &std::path::Path) -> PathBuf {
    run_dir.join("db.sock")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn port() -> PortSpec {
        PortSpec {
            bridge: "br-int".into(),
            name: "tap0b5c3a52-5a".into(),
            kind: PortKind::System,
            tag: Some(5),
            external_ids: BTreeMap::from([(IFACE_ID.to_owned(), "p-1".to_owned())]),
        }
    }

    fn rejected_field(spec: PortSpec) -> &'static str {
        match validate_port_spec(&spec) {
            Err(SwitchError::InvalidSpec { field, .. }) => field,
            other => panic!("expected an invalid spec, got {other:?}"),
        }
    }

    #[test]
    fn accepts_a_sound_port_and_rejects_what_ovs_or_linux_would_not() {
        validate_port_spec(&port()).unwrap();
        let long = PortSpec {
            name: "tap0b5c3a52-5a9e".into(),
            ..port()
        };
        assert_eq!(rejected_field(long), "name");
        let bridge_port = PortSpec {
            name: "br-int".into(),
            ..port()
        };
        assert_eq!(rejected_field(bridge_port), "name");
        let tag = PortSpec {
            tag: Some(4096),
            ..port()
        };
        assert_eq!(rejected_field(tag), "tag");
        let vni = PortSpec {
            kind: PortKind::Vxlan {
                remote_ip: "192.0.2.2".parse().unwrap(),
                key: TunnelKey::Vni(1 << 24),
                local_ip: None,
            },
            ..port()
        };
        assert_eq!(rejected_field(vni), "kind.key");
        let patch = PortSpec {
            kind: PortKind::Patch {
                peer: "patch int".into(),
            },
            ..port()
        };
        assert_eq!(rejected_field(patch), "kind.peer");
        let bridge = PortSpec {
            bridge: "br int".into(),
            ..port()
        };
        assert_eq!(rejected_field(bridge), "bridge");
    }

    #[test]
    fn vxlan_options_round_trip_and_foreign_ones_are_other() {
        let kind = PortKind::Vxlan {
            remote_ip: "192.0.2.2".parse().unwrap(),
            key: TunnelKey::Vni(1042),
            local_ip: Some("192.0.2.1".parse().unwrap()),
        };
        assert_eq!(
            kind.options(),
            BTreeMap::from([
                ("key".to_owned(), "1042".to_owned()),
                ("local_ip".to_owned(), "192.0.2.1".to_owned()),
                ("remote_ip".to_owned(), "192.0.2.2".to_owned()),
            ])
        );
        assert_eq!(PortKind::from_interface("vxlan", kind.options()), kind);
        let flow = PortKind::Vxlan {
            remote_ip: "192.0.2.2".parse().unwrap(),
            key: TunnelKey::Flow,
            local_ip: None,
        };
        assert_eq!(PortKind::from_interface("vxlan", flow.options()), flow);
        let mut foreign = kind.options();
        foreign.insert("dst_port".into(), "4790".into());
        assert!(matches!(
            PortKind::from_interface("vxlan", foreign),
            PortKind::Other { .. }
        ));
        assert_eq!(
            PortKind::from_interface("", BTreeMap::new()),
            PortKind::System
        );
        assert_eq!(
            PortKind::from_interface("internal", BTreeMap::new()),
            PortKind::Internal
        );
        let patch = PortKind::Patch {
            peer: "patch-int".into(),
        };
        assert_eq!(patch.interface_type(), "patch");
        assert_eq!(PortKind::from_interface("patch", patch.options()), patch);
        assert!(matches!(
            PortKind::from_interface("patch", BTreeMap::new()),
            PortKind::Other { .. }
        ));
    }

    #[test]
    fn cookies_are_stable_per_owner_and_never_zero() {
        let a = FlowCookie::for_owner("net-a");
        assert_eq!(a, FlowCookie::for_owner("net-a"));
        assert_ne!(a, FlowCookie::for_owner("net-b"));
        assert_ne!(a.0, 0);
        assert_eq!(FlowCookie(0xab).to_string(), "0xab");
    }

    #[test]
    fn flows_that_would_break_their_line_are_rejected() {
        let flow = FlowSpec {
            table: 0,
            priority: 10,
            matches: "dl_vlan=5".into(),
            actions: "drop".into(),
        };
        validate_flows(std::slice::from_ref(&flow)).unwrap();
        for bad in [
            FlowSpec {
                actions: "drop\nadd priority=1 actions=NORMAL".into(),
                ..flow.clone()
            },
            FlowSpec {
                matches: "cookie=0x1".into(),
                ..flow.clone()
            },
            FlowSpec {
                actions: " ".into(),
                ..flow.clone()
            },
        ] {
            assert!(validate_flows(&[bad]).is_err());
        }
    }
}
