//! The network driver seam of the node agent: how a tenant network and the ports on it are
//! wired on one node, behind the [`NetworkDriver`] trait, whatever switch does the work.
//!
//! The node's network reconciler decides, from the API, which networks must exist on this
//! node (every network with a port here), which remote nodes each network must reach (the
//! nodes that host ports of the same network) and which host devices are ports of which
//! network. A driver turns that into a switch's objects:
//! - the Open vSwitch driver (`wiring::ovs`, over [`crate::switch::Switch`]): `br-int`
//!   with a local VLAN tag per network and `br-tun` with VXLAN tunnels keyed by the
//!   network's segment ID, as Neutron's OVS agent does;
//! - the Linux bridge driver (`wiring::linuxbridge`, over `crate::links::Links`): one
//!   bridge per network, a kernel VXLAN device with the segment ID and a static FDB entry
//!   per remote node (no multicast).
//!
//! A driver keeps no state of its own that a restart would lose: [`NetworkDriver::observe`]
//! reads back everything it made (names and the switch's own records carry the owning
//! uid), so a restarted agent adopts what an earlier one wired and finds orphans. Every
//! `ensure_*`/`plug` call converges on what it is given and is harmless when repeated;
//! every `remove_*`/`unplug` is harmless when there is nothing left. The host device a
//! port is plugged by (a guest's tap, the host end of a veth into a namespace) is made by
//! the caller, through `Links`, before [`NetworkDriver::plug`].

pub mod linuxbridge;
pub mod memory;
pub mod ovs;

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use async_trait::async_trait;

/// Which driver wires a node's networks; the Node advertises it, and `ferro agent
/// --network-driver` chooses it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DriverKind {
    /// Open vSwitch: `br-int`, `br-tun`, OpenFlow.
    Ovs,
    /// Linux bridges and kernel VXLAN devices.
    LinuxBridge,
}

impl DriverKind {
    /// The name on the command line and in `Node.status`: `ovs` or `linuxbridge`.
    pub fn as_str(self) -> &'static str {
        match self {
            DriverKind::Ovs => "ovs",
            DriverKind::LinuxBridge => "linuxbridge",
        }
    }
}

impl std::str::FromStr for DriverKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "ovs" | "openvswitch" => Ok(DriverKind::Ovs),
            "linuxbridge" => Ok(DriverKind::LinuxBridge),
            other => Err(format!(
                "unknown network driver {other:?}: expected ovs or linuxbridge"
            )),
        }
    }
}

impl std::fmt::Display for DriverKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A tenant network as it must exist on this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkWiring {
    /// The Network's uid: names everything made for it.
    pub uid: String,
    /// The VXLAN network identifier (`Network.status.segmentId`), 1 to 2^24 - 1.
    pub segment_id: u32,
    /// The MTU of the network's devices on this node (what guests are given).
    pub mtu: u32,
    /// This node's underlay (tunnel endpoint) address.
    pub local_ip: IpAddr,
    /// The underlay addresses of exactly the other nodes that host ports of this network:
    /// tunnels go to these and to no one else.
    pub peers: BTreeSet<IpAddr>,
}

/// A port to plug: a host device that becomes a port of a network on this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortWiring {
    /// The Port's uid (Neutron's `iface-id`).
    pub uid: String,
    /// The uid of the Network it belongs to, which [`NetworkDriver::ensure_network`] made.
    pub network_uid: String,
    /// The host device, which exists: a guest's tap, or a veth's host end.
    pub device: String,
    /// The MAC the guest (or namespace) behind the device uses, `aa:bb:cc:dd:ee:ff`.
    pub mac: String,
    /// The uid of the Server the port belongs to, if any (Neutron's `vm-uuid`).
    pub server_uid: Option<String>,
}

/// A network as found wired on this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObservedNetwork {
    /// The VXLAN network identifier it is wired with.
    pub segment_id: u32,
    /// The remote nodes it has tunnels (or FDB entries) to.
    pub peers: BTreeSet<IpAddr>,
}

/// A port as found plugged on this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObservedPort {
    /// The uid of the network it is plugged into.
    pub network_uid: String,
    /// The host device.
    pub device: String,
    /// Whether the device exists and the switch has taken it up (an OVS port whose device
    /// is gone reports an error; a bridge port whose device is gone is not listed at all).
    pub attached: bool,
}

/// Everything a driver finds it has wired on this node, keyed by owning uid.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Observed {
    /// Networks, by Network uid.
    pub networks: BTreeMap<String, ObservedNetwork>,
    /// Ports, by Port uid.
    pub ports: BTreeMap<String, ObservedPort>,
}

/// Why a driver call failed.
#[derive(Debug, thiserror::Error)]
pub enum WiringError {
    /// The host lacks what the driver needs (a binary, a socket, a kernel feature); the
    /// message says what, for the Node's condition.
    #[error("{0}")]
    Unavailable(String),
    /// The request cannot be carried out as it is.
    #[error("invalid wiring request: {field}: {reason}")]
    InvalidSpec {
        /// The offending field.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A port names a network that is not wired on this node.
    #[error("network {0} is not wired on this node")]
    NoSuchNetwork(String),
    /// The device to plug does not exist on the host.
    #[error("no device {0}")]
    NoSuchDevice(String),
    /// The switch underneath failed.
    #[error("switch")]
    Switch(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// Wires tenant networks and their ports on one node. See the module notes.
#[async_trait]
pub trait NetworkDriver: Send + Sync {
    /// Which driver this is.
    fn kind(&self) -> DriverKind;

    /// Checks that the host has what the driver needs, makes the node-wide pieces
    /// (`br-int`, `br-tun` and their flows for OVS; nothing for Linux bridges), and
    /// reports what is wired, as [`NetworkDriver::observe`] would: a pass starts from it
    /// without reading the host twice. Called at start-up and on every pass; an error is
    /// reported on the Node, never a crash.
    async fn prepare(&self) -> Result<Observed, WiringError>;

    /// Makes the network exist on this node with tunnels to exactly `network.peers`
    /// (adding missing ones, removing others), on its segment and MTU.
    async fn ensure_network(&self, network: &NetworkWiring) -> Result<(), WiringError>;

    /// Removes everything made for the network (bridge, tunnels, flows, local VLAN).
    /// Ports still plugged into it are unplugged first.
    async fn remove_network(&self, network_uid: &str) -> Result<(), WiringError>;

    /// Plugs the port's device into its network, with the records an operator looks for.
    async fn plug(&self, port: &PortWiring) -> Result<(), WiringError>;

    /// Unplugs a port, by its uid; the device itself is left to the caller.
    async fn unplug(&self, port_uid: &str) -> Result<(), WiringError>;

    /// What is wired now, read from the host.
    async fn observe(&self) -> Result<Observed, WiringError>;

    /// Whether a veth end inside a namespace must have TX checksum offload turned off
    /// (`ethtool -K DEV tx off`) to talk TCP through this switch: true for OVS's
    /// userspace datapath, which does not fill in offloaded checksums.
    fn needs_tx_checksum_off(&self) -> bool {
        false
    }
}

/// The Port uid a device's alias names. The alias is the Port's uid, followed, for the
/// host end of a veth into a namespace, by `@` and that namespace (the network
/// reconciler's record of where the other end went); drivers read and keep the uid part.
pub fn port_uid_of_alias(alias: &str) -> &str {
    alias.split_once('@').map_or(alias, |(uid, _)| uid)
}

/// The name of a host device made for an object: `prefix` and as much of the uid (less
/// its dashes) as fits in a Linux interface name, e.g. `tap3f2a9c41d0e7`.
pub fn device_name(prefix: &str, uid: &str) -> String {
    let room = crate::switch::MAX_INTERFACE_NAME.saturating_sub(prefix.len());
    let tail: String = uid.chars().filter(|c| *c != '-').take(room).collect();
    format!("{prefix}{tail}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names_fit_ifnamsiz_and_keep_the_uid_prefix() {
        let uid = "3f2a9c41-d0e7-4b7e-9a61-0c2d5e6f7a8b";
        assert_eq!(device_name("tap", uid), "tap3f2a9c41d0e7");
        assert_eq!(device_name("brq", uid).len(), 15);
        assert_eq!(device_name("vxlan-", uid), "vxlan-3f2a9c41d");
    }

    #[test]
    fn driver_kinds_parse_from_their_names() {
        for kind in [DriverKind::Ovs, DriverKind::LinuxBridge] {
            assert_eq!(kind.as_str().parse::<DriverKind>(), Ok(kind));
        }
        assert!("bridge".parse::<DriverKind>().is_err());
    }
}
