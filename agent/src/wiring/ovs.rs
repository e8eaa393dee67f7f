//! [`OvsWiring`]: the Open vSwitch [`NetworkDriver`], wiring a node as Neutron's OVS agent
//! does, over any [`Switch`].
//!
//! # Bridges
//! - `br-int`, the integration bridge: every port of a guest (or namespace) is an access
//!   port with its network's *local VLAN* tag; the bridge forwards `NORMAL`, so ports of
//!   one network on this node talk directly and VLAN tags keep networks apart.
//! - `br-tun`, the tunnel bridge: one VXLAN port per remote node (`vxlan-<hex of its
//!   address>`, `options:key=flow`, `options:local_ip`), shared by every network that
//!   reaches that node; the network's VNI (segment ID) is set and matched by flows.
//! - `patch-tun` (on `br-int`) and `patch-int` (on `br-tun`) join them as a trunk.
//!
//! # Flows of `br-tun`
//! Neutron's table numbers, so an operator reading `ovs-ofctl dump-flows br-tun` finds what
//! they know:
//!
//! | table | match                       | actions                                          | cookie  |
//! |-------|-----------------------------|--------------------------------------------------|---------|
//! | 0     | `in_port=patch-int`         | `resubmit(,2)`: from guests, to the tunnels      | node    |
//! | 0     | `in_port=<each tunnel>`     | `resubmit(,4)`: from remote nodes                | node    |
//! | 0     | anything else               | `drop`                                           | node    |
//! | 2     | anything                    | `resubmit(,22)`                                  | node    |
//! | 4     | `tun_id=<VNI>`              | `mod_vlan_vid:<local VLAN>,output:patch-int`     | network |
//! | 4     | anything else               | `drop`                                           | node    |
//! | 22    | `dl_vlan=<local VLAN>`      | `strip_vlan,set_tunnel:<VNI>,output:<each peer>` | network |
//! | 22    | anything else               | `drop`                                           | node    |
//!
//! `br-int` has one flow, `NORMAL`, under the node cookie. Ports are named by their
//! OpenFlow numbers in flows and `set_tunnel` is written `load:…->NXM_NX_TUN_ID[]`, as
//! `ovs-ofctl` prints them back, so a flow set read back is
//! compared with the planned one as text and rewritten only when it differs: re-running a
//! call that finds everything in place touches no flow.
//!
//! This is simpler than Neutron's layout, and equivalent for delivery: Neutron splits
//! table 2 into unicast (table 20, filled by `learn` from table 10 as frames arrive from
//! tunnels) and flooding (table 22); here every frame of a network goes to all of its
//! peers. A unicast frame then costs one copy per peer node instead of one, and the
//! receiving `br-int`s drop frames for MACs they do not have. In exchange there is no
//! learned state that could go stale or differ between nodes, and the flows of a network
//! are a pure function of its record and the ports' numbers. Loops cannot form: frames
//! from tunnels only ever go to `patch-int` (split horizon). Isolation rests on two
//! things: a network's frames leave only with its own VNI and only to its own peers, and
//! frames from a tunnel reach `br-int` only with the local VLAN their VNI maps to.
//!
//! # What survives a restart
//! Nothing is kept in memory. Each network has a record on `br-int`'s `external_ids`,
//! `ferro-network-<uid>` = `{"vlan":…,"vni":…,"local_ip":…,"peers":[…]}`, written by
//! [`NetworkDriver::ensure_network`] before anything else: it is what makes the local VLAN
//! stable (a fresh driver finds the tag there; if the record was lost, the tags of the
//! network's ports give it back) and unique (a tag is taken only if no record and no port
//! holds it). OVSDB keeps the record on disk; flows live only in `ovs-vswitchd`, so every
//! call converges the whole node from the records (tunnel ports, port tags, flows) and an
//! `ovs-vswitchd` restart is mended by the next resync. [`NetworkDriver::observe`] reports
//! what the flows actually do: a network's segment is the VNI its `tun_id` flow carries
//! (0 when that flow is missing) and its peers are the tunnels its flood flow outputs to.
//! Ports carry Neutron's `external_ids` and [`NETWORK_ID`], so they are found without the
//! record.
//!
//! # Underlay
//! With the userspace (`netdev`) datapath, OVS sends tunnel packets itself and needs the
//! local tunnel address on a device of one of its own bridges (typically `br-phy`, holding
//! the underlay NIC); with the kernel datapath any device of the host will do. Making that
//! bridge is the node's set-up, not this driver's (see `tests/ovs_wiring.rs`).
//!
//! The driver does not set MTUs: the devices it plugs are the caller's, made with the
//! network's MTU, and OVS ports take their device's.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use sha2::Digest;

use super::{
    DriverKind, NetworkDriver, NetworkWiring, Observed, ObservedNetwork, ObservedPort, PortWiring,
    WiringError,
};
use crate::switch::{
    ATTACHED_MAC, DatapathType, FERRO_OWNER, Flow, FlowCookie, FlowSpec, IFACE_ID, PortInfo,
    PortKind, PortSpec, Switch, SwitchError, TunnelKey, VM_UUID,
};

/// The integration bridge: guests' ports, one local VLAN per network.
pub const INTEGRATION_BRIDGE: &str = "br-int";
/// The tunnel bridge: VXLAN ports to the other nodes.
pub const TUNNEL_BRIDGE: &str = "br-tun";
/// The patch port on `br-int` that leads to `br-tun`.
pub const PATCH_TO_TUNNELS: &str = "patch-tun";
/// The patch port on `br-tun` that leads to `br-int`.
pub const PATCH_TO_INTEGRATION: &str = "patch-int";
/// `external_ids` key on a guest's port: the uid of the Network it is plugged into.
pub const NETWORK_ID: &str = "ferro-network";
/// `external_ids` key prefix on `br-int`: `ferro-network-<uid>` holds a network's record.
pub const NETWORK_RECORD_PREFIX: &str = "ferro-network-";
/// The [`FERRO_OWNER`] of tunnel ports, which belong to the node (networks share them).
pub const TUNNEL_OWNER: &str = "ferro-node";
/// The owner of the node-wide flows, whose [`FlowCookie`] they carry.
pub const NODE_FLOWS_OWNER: &str = "ferro-node";

/// `br-tun`'s tables, numbered as Neutron's.
pub mod table {
    /// Where every frame starts: sorted by the port it came in on.
    pub const CLASSIFY: u8 = 0;
    /// Frames from `br-int` (Neutron's `PATCH_LV_TO_TUN`).
    pub const FROM_INTEGRATION: u8 = 2;
    /// Frames from a tunnel: VNI to local VLAN (Neutron's `VXLAN_TUN_TO_LV`).
    pub const FROM_TUNNELS: u8 = 4;
    /// Frames to the tunnels: local VLAN to VNI, to the network's peers (Neutron's
    /// `FLOOD_TO_TUN`).
    pub const FLOOD_TO_TUNNELS: u8 = 22;
}

/// The lowest and highest local VLAN tags.
const VLAN_RANGE: std::ops::RangeInclusive<u16> = 1..=4094;

/// A network's record on `br-int`: what [`NetworkDriver::ensure_network`] was last asked
/// for, and the local VLAN it was given.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkRecord {
    /// The local VLAN tag of the network's ports on `br-int`.
    pub vlan: u16,
    /// The VXLAN network identifier (segment ID).
    pub vni: u32,
    /// This node's tunnel address.
    pub local_ip: IpAddr,
    /// The remote nodes the network reaches.
    pub peers: BTreeSet<IpAddr>,
}

/// The Open vSwitch network driver. See the module notes.
pub struct OvsWiring {
    switch: Arc<dyn Switch>,
    /// One change at a time: allocating a VLAN and writing its record must not interleave
    /// with another allocation.
    changing: tokio::sync::Mutex<()>,
    /// How long dumped flows stand for the switch's while this driver writes none (zero:
    /// every read dumps them).
    flows_fresh_for: Duration,
    /// The flows last dumped, and when.
    dumped: std::sync::Mutex<Option<DumpedFlows>>,
}

/// Both bridges' flows as one read found them.
#[derive(Debug, Clone)]
struct DumpedFlows {
    at: Instant,
    integration: Vec<Flow>,
    tunnel: Vec<Flow>,
}

impl std::fmt::Debug for OvsWiring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OvsWiring")
            .field("datapath_type", &self.switch.datapath_type())
            .finish_non_exhaustive()
    }
}

/// The name of the tunnel port to a remote node: `vxlan-` and the hex of its IPv4
/// address (`vxlan-c0a80002`), or of a hash of its IPv6 address, which does not fit.
pub fn tunnel_port_name(remote_ip: IpAddr) -> String {
    match remote_ip {
        IpAddr::V4(v4) => format!("vxlan-{:08x}", u32::from(v4)),
        IpAddr::V6(v6) => {
            let digest = sha2::Sha256::digest(v6.octets());
            let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
            format!("vxlan-{}", &hex[..9])
        }
    }
}

/// The `br-int` `external_ids` key of a network's record.
pub fn network_record_key(network_uid: &str) -> String {
    format!("{NETWORK_RECORD_PREFIX}{network_uid}")
}

/// The local VLAN for `network_uid`: the one its record holds, else the one its ports
/// carry (a lost record), else the lowest tag nobody holds. `None` when all are taken.
pub fn local_vlan_for(
    network_uid: &str,
    records: &BTreeMap<String, NetworkRecord>,
    ports: &[PortInfo],
) -> Option<u16> {
    if let Some(record) = records.get(network_uid) {
        return Some(record.vlan);
    }
    let mut held: BTreeSet<u16> = records.values().map(|r| r.vlan).collect();
    let mut own = BTreeSet::new();
    for port in guest_ports(ports) {
        let Some(tag) = port.tag else { continue };
        if port.external_ids.get(NETWORK_ID).map(String::as_str) == Some(network_uid) {
            own.insert(tag);
        } else {
            held.insert(tag);
        }
    }
    if let [tag] = own.iter().copied().collect::<Vec<_>>()[..]
        && VLAN_RANGE.contains(&tag)
        && !held.contains(&tag)
    {
        return Some(tag);
    }
    held.extend(own);
    VLAN_RANGE.into_iter().find(|tag| !held.contains(tag))
}

/// The ports on `br-int` that Ferro plugged for a network.
fn guest_ports(ports: &[PortInfo]) -> impl Iterator<Item = &PortInfo> {
    ports
        .iter()
        .filter(|p| p.bridge == INTEGRATION_BRIDGE && p.external_ids.contains_key(NETWORK_ID))
}

/// What the node holds, as read from the switch.
#[derive(Debug, Clone, Default)]
struct NodeState {
    /// Network records, by Network uid.
    records: BTreeMap<String, NetworkRecord>,
    /// Every port of every bridge.
    ports: Vec<PortInfo>,
    /// `br-int`'s flows (empty without the bridge).
    integration_flows: Vec<Flow>,
    /// `br-tun`'s flows (empty without the bridge).
    tunnel_flows: Vec<Flow>,
    /// Whether `br-int` exists.
    has_integration_bridge: bool,
    /// Whether `br-tun` exists.
    has_tunnel_bridge: bool,
}

impl NodeState {
    /// Whether both bridges exist, patched to each other.
    fn has_bridges(&self) -> bool {
        self.has_integration_bridge
            && self.has_tunnel_bridge
            && [PATCH_TO_TUNNELS, PATCH_TO_INTEGRATION].iter().all(|name| {
                self.ports
                    .iter()
                    .any(|p| &p.name == name && p.ofport.is_some())
            })
    }

    fn ofport(&self, bridge: &str, name: &str) -> Option<u32> {
        self.ports
            .iter()
            .find(|p| p.bridge == bridge && p.name == name)
            .and_then(|p| p.ofport)
    }
}

/// The tunnel ports the records need, by name: one per peer of any network, from the
/// local address of the first network (by uid) that names the peer.
fn planned_tunnels(records: &BTreeMap<String, NetworkRecord>) -> BTreeMap<String, PortSpec> {
    let mut tunnels = BTreeMap::new();
    for record in records.values() {
        for peer in &record.peers {
            tunnels
                .entry(tunnel_port_name(*peer))
                .or_insert_with(|| PortSpec {
                    bridge: TUNNEL_BRIDGE.to_owned(),
                    name: tunnel_port_name(*peer),
                    kind: PortKind::Vxlan {
                        remote_ip: *peer,
                        key: TunnelKey::Flow,
                        local_ip: Some(record.local_ip),
                    },
                    tag: None,
                    external_ids: BTreeMap::from([(
                        FERRO_OWNER.to_owned(),
                        TUNNEL_OWNER.to_owned(),
                    )]),
                });
        }
    }
    tunnels
}

/// Tunnel ports on `br-tun` that no record needs: Ferro's, or any VXLAN port.
fn stale_tunnels<'a>(
    ports: &'a [PortInfo],
    planned: &BTreeMap<String, PortSpec>,
) -> impl Iterator<Item = &'a PortInfo> {
    ports.iter().filter(move |p| {
        p.bridge == TUNNEL_BRIDGE
            && p.name != PATCH_TO_INTEGRATION
            && !planned.contains_key(&p.name)
            && (p.owner() == Some(TUNNEL_OWNER) || matches!(p.kind, PortKind::Vxlan { .. }))
    })
}

fn flow(table: u8, priority: u16, matches: &str, actions: &str) -> FlowSpec {
    FlowSpec {
        table,
        priority,
        matches: matches.to_owned(),
        actions: actions.to_owned(),
    }
}

/// Every flow set the node needs, by bridge and cookie, written as `ovs-ofctl` prints
/// flows back. Tunnels without an OpenFlow number yet are left out (the next call adds
/// them).
fn planned_flows(
    state: &NodeState,
) -> Result<BTreeMap<(&'static str, FlowCookie), Vec<FlowSpec>>, WiringError> {
    let patch = state
        .ofport(TUNNEL_BRIDGE, PATCH_TO_INTEGRATION)
        .ok_or_else(|| {
            WiringError::Switch(format!("{PATCH_TO_INTEGRATION} has no OpenFlow port").into())
        })?;
    let node = FlowCookie::for_owner(NODE_FLOWS_OWNER);
    let tunnel_ofport = |peer: &IpAddr| state.ofport(TUNNEL_BRIDGE, &tunnel_port_name(*peer));
    let mut sets = BTreeMap::new();
    sets.insert((INTEGRATION_BRIDGE, node), vec![flow(0, 0, "", "NORMAL")]);

    let mut base = vec![flow(
        table::CLASSIFY,
        1,
        &format!("in_port={patch}"),
        &format!("resubmit(,{})", table::FROM_INTEGRATION),
    )];
    let peers: BTreeSet<IpAddr> = state
        .records
        .values()
        .flat_map(|r| r.peers.iter().copied())
        .collect();
    for ofport in peers.iter().filter_map(tunnel_ofport) {
        base.push(flow(
            table::CLASSIFY,
            1,
            &format!("in_port={ofport}"),
            &format!("resubmit(,{})", table::FROM_TUNNELS),
        ));
    }
    base.extend([
        flow(table::CLASSIFY, 0, "", "drop"),
        flow(
            table::FROM_INTEGRATION,
            0,
            "",
            &format!("resubmit(,{})", table::FLOOD_TO_TUNNELS),
        ),
        flow(table::FROM_TUNNELS, 0, "", "drop"),
        flow(table::FLOOD_TO_TUNNELS, 0, "", "drop"),
    ]);
    sets.insert((TUNNEL_BRIDGE, node), base);

    for (uid, record) in &state.records {
        let mut flows = vec![flow(
            table::FROM_TUNNELS,
            1,
            &format!("tun_id={:#x}", record.vni),
            &format!("mod_vlan_vid:{},output:{patch}", record.vlan),
        )];
        let outputs: Vec<String> = record
            .peers
            .iter()
            .filter_map(tunnel_ofport)
            .map(|ofport| format!("output:{ofport}"))
            .collect();
        if !outputs.is_empty() {
            flows.push(flow(
                table::FLOOD_TO_TUNNELS,
                1,
                &format!("dl_vlan={}", record.vlan),
                &format!(
                    "strip_vlan,load:{:#x}->NXM_NX_TUN_ID[],{}",
                    record.vni,
                    outputs.join(",")
                ),
            ));
        }
        sets.insert((TUNNEL_BRIDGE, FlowCookie::for_owner(uid)), flows);
    }
    Ok(sets)
}

/// Whether the flows found under a cookie are the planned ones (in any order).
fn same_flows(found: &[&FlowSpec], planned: &[FlowSpec]) -> bool {
    let key = |f: &FlowSpec| (f.table, f.priority, f.matches.clone(), f.actions.clone());
    let mut found: Vec<_> = found.iter().map(|f| key(f)).collect();
    let mut planned: Vec<_> = planned.iter().map(key).collect();
    found.sort();
    planned.sort();
    found == planned
}

/// The network a set of `br-tun` flows wires, as they are: the VNI of its `tun_id` flow
/// and the remote addresses of the tunnels its flood flow outputs to.
fn observed_network(state: &NodeState, network_uid: &str) -> ObservedNetwork {
    let cookie = FlowCookie::for_owner(network_uid);
    let mut observed = ObservedNetwork {
        segment_id: 0,
        peers: BTreeSet::new(),
    };
    for flow in state.tunnel_flows.iter().filter(|f| f.cookie == cookie) {
        match flow.spec.table {
            table::FROM_TUNNELS => {
                if let Some(vni) = flow
                    .spec
                    .matches
                    .split(',')
                    .find_map(|field| field.strip_prefix("tun_id=0x"))
                    .and_then(|hex| u32::from_str_radix(hex, 16).ok())
                {
                    observed.segment_id = vni;
                }
            }
            table::FLOOD_TO_TUNNELS => {
                for ofport in flow
                    .spec
                    .actions
                    .split(',')
                    .filter_map(|action| action.strip_prefix("output:")?.parse::<u32>().ok())
                {
                    let remote = state.ports.iter().find_map(|p| match p.kind {
                        PortKind::Vxlan { remote_ip, .. }
                            if p.bridge == TUNNEL_BRIDGE && p.ofport == Some(ofport) =>
                        {
                            Some(remote_ip)
                        }
                        _ => None,
                    });
                    observed.peers.extend(remote);
                }
            }
            _ => {}
        }
    }
    observed
}

fn switch_error(error: SwitchError) -> WiringError {
    match error {
        SwitchError::InvalidSpec { field, reason } => WiringError::InvalidSpec { field, reason },
        other => WiringError::Switch(Box::new(other)),
    }
}

impl OvsWiring {
    /// A driver over `switch`, which is the node's one Open vSwitch instance.
    pub fn new(switch: Arc<dyn Switch>) -> OvsWiring {
        OvsWiring {
            switch,
            changing: tokio::sync::Mutex::new(()),
            flows_fresh_for: Duration::ZERO,
            dumped: std::sync::Mutex::new(None),
        }
    }

    /// Reuses the flows a read dumped for `fresh_for`, as long as this driver writes no
    /// flow, tunnel or bridge meanwhile (each such write forgets them).
    ///
    /// Each dump is an `ovs-ofctl` run per bridge, and passes come with every Port change
    /// of the cloud: on a busy node most passes would re-read flows nobody touched. Only
    /// Ferro writes these flows, so the cost is a window of `fresh_for` in which flows
    /// deleted by hand (or lost with a restarted `ovs-vswitchd`) go unnoticed; records
    /// and ports are read fresh every time.
    pub fn reuse_flows_for(mut self, fresh_for: Duration) -> OvsWiring {
        self.flows_fresh_for = fresh_for;
        self
    }

    /// Forgets the dumped flows: the next read dumps them again.
    fn forget_flows(&self) {
        *self.dumped.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Reads records, ports and flows (flows dumped within `flows_fresh_for`, while this
    /// driver wrote none, stand for them).
    async fn read(&self) -> Result<NodeState, WiringError> {
        let mut state = self.read_records_and_ports().await?;
        if state.has_bridges() {
            let dumped = self
                .dumped
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            if let Some(dumped) = dumped
                && dumped.at.elapsed() < self.flows_fresh_for
            {
                state.integration_flows = dumped.integration;
                state.tunnel_flows = dumped.tunnel;
                return Ok(state);
            }
        }
        let at = Instant::now();
        let flows_of = |present: bool, bridge: &'static str| async move {
            if present {
                self.switch.dump_flows(bridge, None).await
            } else {
                Ok(Vec::new())
            }
        };
        // Each dump is an `ovs-ofctl` run: both at once.
        let (integration_flows, tunnel_flows) = tokio::join!(
            flows_of(state.has_integration_bridge, INTEGRATION_BRIDGE),
            flows_of(state.has_tunnel_bridge, TUNNEL_BRIDGE)
        );
        state.integration_flows = integration_flows.map_err(switch_error)?;
        state.tunnel_flows = tunnel_flows.map_err(switch_error)?;
        if !self.flows_fresh_for.is_zero() && state.has_bridges() {
            *self.dumped.lock().unwrap_or_else(|e| e.into_inner()) = Some(DumpedFlows {
                at,
                integration: state.integration_flows.clone(),
                tunnel: state.tunnel_flows.clone(),
            });
        }
        Ok(state)
    }

    /// Reads the network records and the ports, not the flows: all that plugging a port
    /// needs.
    async fn read_records_and_ports(&self) -> Result<NodeState, WiringError> {
        let bridges = self.switch.list_bridges().await.map_err(switch_error)?;
        let integration = bridges.iter().find(|b| b.name == INTEGRATION_BRIDGE);
        let has_tunnel_bridge = bridges.iter().any(|b| b.name == TUNNEL_BRIDGE);
        let mut records = BTreeMap::new();
        if let Some(bridge) = integration {
            for (key, value) in &bridge.external_ids {
                let Some(uid) = key.strip_prefix(NETWORK_RECORD_PREFIX) else {
                    continue;
                };
                match serde_json::from_str::<NetworkRecord>(value) {
                    Ok(record) => {
                        records.insert(uid.to_owned(), record);
                    }
                    Err(e) => tracing::warn!(
                        network = uid,
                        error = %e,
                        "unreadable network record on {INTEGRATION_BRIDGE}; ignored"
                    ),
                }
            }
        }
        let ports = self.switch.list_ports().await.map_err(switch_error)?;
        Ok(NodeState {
            records,
            ports,
            integration_flows: Vec::new(),
            tunnel_flows: Vec::new(),
            has_integration_bridge: integration.is_some(),
            has_tunnel_bridge,
        })
    }

    /// Makes both bridges and the patch between them.
    async fn ensure_bridges(&self) -> Result<(), WiringError> {
        self.forget_flows();
        for bridge in [INTEGRATION_BRIDGE, TUNNEL_BRIDGE] {
            self.switch
                .ensure_bridge(bridge)
                .await
                .map_err(switch_error)?;
        }
        for (bridge, name, peer) in [
            (INTEGRATION_BRIDGE, PATCH_TO_TUNNELS, PATCH_TO_INTEGRATION),
            (TUNNEL_BRIDGE, PATCH_TO_INTEGRATION, PATCH_TO_TUNNELS),
        ] {
            self.switch
                .ensure_port(&PortSpec {
                    bridge: bridge.to_owned(),
                    name: name.to_owned(),
                    kind: PortKind::Patch {
                        peer: peer.to_owned(),
                    },
                    tag: None,
                    external_ids: BTreeMap::from([(
                        FERRO_OWNER.to_owned(),
                        TUNNEL_OWNER.to_owned(),
                    )]),
                })
                .await
                .map_err(switch_error)?;
        }
        Ok(())
    }

    /// Brings tunnel ports, port tags and flows in line with the records in `state`, in
    /// an order that never leaves a flow pointing at a port that is gone: tunnels are
    /// added before the flows that use them and removed after.
    /// Says whether it changed anything.
    async fn converge(&self, state: NodeState) -> Result<bool, WiringError> {
        let changed = self.converge_once(state).await;
        // A write that failed midway changed something too.
        if !matches!(changed, Ok(false)) {
            self.forget_flows();
        }
        changed
    }

    /// [`Self::converge`], without forgetting the dumped flows.
    async fn converge_once(&self, mut state: NodeState) -> Result<bool, WiringError> {
        let tunnels = planned_tunnels(&state.records);
        let mut ports_changed = false;
        for spec in tunnels.values() {
            let found = state.ports.iter().find(|p| p.name == spec.name);
            if !found.is_some_and(|p| p.matches(spec) && p.ofport.is_some()) {
                self.switch.ensure_port(spec).await.map_err(switch_error)?;
                ports_changed = true;
            }
        }
        // A port's tag follows its network's record (mends a tag changed by hand).
        for port in guest_ports(&state.ports) {
            let Some(record) = port
                .external_ids
                .get(NETWORK_ID)
                .and_then(|uid| state.records.get(uid))
            else {
                continue;
            };
            if port.tag != Some(record.vlan) {
                let spec = PortSpec {
                    bridge: port.bridge.clone(),
                    name: port.name.clone(),
                    kind: port.kind.clone(),
                    tag: Some(record.vlan),
                    external_ids: port.external_ids.clone(),
                };
                self.switch.ensure_port(&spec).await.map_err(switch_error)?;
                ports_changed = true;
            }
        }
        let mut changed = ports_changed;
        if ports_changed {
            state.ports = self.switch.list_ports().await.map_err(switch_error)?;
        }

        for ((bridge, cookie), planned) in planned_flows(&state)? {
            let found = if bridge == INTEGRATION_BRIDGE {
                &state.integration_flows
            } else {
                &state.tunnel_flows
            };
            let found: Vec<&FlowSpec> = found
                .iter()
                .filter(|f| f.cookie == cookie)
                .map(|f| &f.spec)
                .collect();
            if !same_flows(&found, &planned) {
                self.switch
                    .replace_flows(bridge, cookie, &planned)
                    .await
                    .map_err(switch_error)?;
                changed = true;
            }
        }
        // br-tun is Ferro's: flows of networks without a record go. (OVS's own NORMAL
        // flow, cookie 0, was replaced by the node's table 0 drop; OVS refuses to delete
        // by cookie 0.)
        let known: BTreeSet<FlowCookie> = state
            .records
            .keys()
            .map(|uid| FlowCookie::for_owner(uid))
            .chain([FlowCookie::for_owner(NODE_FLOWS_OWNER)])
            .collect();
        let strays: BTreeSet<FlowCookie> = state
            .tunnel_flows
            .iter()
            .map(|f| f.cookie)
            .filter(|c| c.0 != 0 && !known.contains(c))
            .collect();
        for cookie in strays {
            self.switch
                .remove_flows(TUNNEL_BRIDGE, cookie)
                .await
                .map_err(switch_error)?;
            changed = true;
        }

        let stale: Vec<String> = stale_tunnels(&state.ports, &tunnels)
            .map(|p| p.name.clone())
            .collect();
        for name in stale {
            self.switch.remove_port(&name).await.map_err(switch_error)?;
            changed = true;
        }
        Ok(changed)
    }

    /// Writes (or removes) a network's record.
    async fn write_record(
        &self,
        network_uid: &str,
        record: Option<&NetworkRecord>,
    ) -> Result<(), WiringError> {
        let value = record.map(|r| serde_json::to_string(r).expect("a record serialises"));
        self.switch
            .update_bridge_external_ids(
                INTEGRATION_BRIDGE,
                &BTreeMap::from([(network_record_key(network_uid), value)]),
            )
            .await
            .map_err(switch_error)?;
        Ok(())
    }
}

fn validate_network(network: &NetworkWiring) -> Result<(), WiringError> {
    if network.uid.is_empty() {
        return Err(WiringError::InvalidSpec {
            field: "uid",
            reason: "must not be empty".into(),
        });
    }
    if network.segment_id == 0 || network.segment_id >= 1 << 24 {
        return Err(WiringError::InvalidSpec {
            field: "segment_id",
            reason: format!("{} is not a VXLAN network identifier", network.segment_id),
        });
    }
    if network.peers.contains(&network.local_ip) {
        return Err(WiringError::InvalidSpec {
            field: "peers",
            reason: format!("{} is this node's own address", network.local_ip),
        });
    }
    Ok(())
}

#[async_trait]
impl NetworkDriver for OvsWiring {
    fn kind(&self) -> DriverKind {
        DriverKind::Ovs
    }

    async fn prepare(&self) -> Result<Observed, WiringError> {
        let _changing = self.changing.lock().await;
        let unavailable = |e| match e {
            WiringError::Switch(source) => WiringError::Unavailable(format!(
                "open vswitch: {}",
                crate::images::error_chain(source.as_ref())
            )),
            other => other,
        };
        // Most passes find the bridges in place: one read, no writes.
        let mut state = self.read().await.map_err(unavailable)?;
        if !state.has_bridges() {
            self.ensure_bridges().await.map_err(unavailable)?;
            state = self.read().await?;
        }
        if self.converge(state.clone()).await? {
            state = self.read().await?;
        }
        Ok(observed(&state))
    }

    async fn ensure_network(&self, network: &NetworkWiring) -> Result<(), WiringError> {
        validate_network(network)?;
        let _changing = self.changing.lock().await;
        self.ensure_bridges().await?;
        let mut state = self.read().await?;
        let vlan = local_vlan_for(&network.uid, &state.records, &state.ports).ok_or_else(|| {
            WiringError::Unavailable(format!(
                "all {} local VLANs of {INTEGRATION_BRIDGE} are in use",
                VLAN_RANGE.len()
            ))
        })?;
        let record = NetworkRecord {
            vlan,
            vni: network.segment_id,
            local_ip: network.local_ip,
            peers: network.peers.clone(),
        };
        // The record first: a crash after it leaves a tag no one else can take.
        if state.records.get(&network.uid) != Some(&record) {
            self.write_record(&network.uid, Some(&record)).await?;
            state.records.insert(network.uid.clone(), record);
        }
        self.converge(state).await.map(|_| ())
    }

    async fn remove_network(&self, network_uid: &str) -> Result<(), WiringError> {
        let _changing = self.changing.lock().await;
        let mut state = self.read().await?;
        self.forget_flows();
        for port in guest_ports(&state.ports)
            .filter(|p| p.external_ids.get(NETWORK_ID).map(String::as_str) == Some(network_uid))
        {
            self.switch
                .remove_port(&port.name)
                .await
                .map_err(switch_error)?;
        }
        if !state.has_bridges() {
            return Ok(());
        }
        self.switch
            .remove_flows(TUNNEL_BRIDGE, FlowCookie::for_owner(network_uid))
            .await
            .map_err(switch_error)?;
        if state.records.remove(network_uid).is_some() {
            self.write_record(network_uid, None).await?;
        }
        // Tunnels and the node's flows follow the networks that are left.
        let state = NodeState {
            ports: self.switch.list_ports().await.map_err(switch_error)?,
            tunnel_flows: self
                .switch
                .dump_flows(TUNNEL_BRIDGE, None)
                .await
                .map_err(switch_error)?,
            ..state
        };
        self.converge(state).await.map(|_| ())
    }

    async fn plug(&self, port: &PortWiring) -> Result<(), WiringError> {
        let _changing = self.changing.lock().await;
        let state = self.read_records_and_ports().await?;
        let record = state
            .records
            .get(&port.network_uid)
            .ok_or_else(|| WiringError::NoSuchNetwork(port.network_uid.clone()))?;
        let mut external_ids = BTreeMap::from([
            (IFACE_ID.to_owned(), port.uid.clone()),
            (ATTACHED_MAC.to_owned(), port.mac.clone()),
            (FERRO_OWNER.to_owned(), port.uid.clone()),
            (NETWORK_ID.to_owned(), port.network_uid.clone()),
        ]);
        if let Some(server) = &port.server_uid {
            external_ids.insert(VM_UUID.to_owned(), server.clone());
        }
        // The same port under another device name: the old one goes.
        for stale in guest_ports(&state.ports)
            .filter(|p| p.external_ids.get(IFACE_ID) == Some(&port.uid) && p.name != port.device)
        {
            self.switch
                .remove_port(&stale.name)
                .await
                .map_err(switch_error)?;
        }
        let plugged = self
            .switch
            .ensure_port(&PortSpec {
                bridge: INTEGRATION_BRIDGE.to_owned(),
                name: port.device.clone(),
                kind: PortKind::System,
                tag: Some(record.vlan),
                external_ids,
            })
            .await
            .map_err(switch_error)?;
        match plugged.error {
            // Left in place: OVS takes the device up if it appears.
            Some(error) if error.contains("No such device") => {
                Err(WiringError::NoSuchDevice(port.device.clone()))
            }
            Some(error) => Err(WiringError::Switch(
                format!("{}: {error}", port.device).into(),
            )),
            None => Ok(()),
        }
    }

    async fn unplug(&self, port_uid: &str) -> Result<(), WiringError> {
        let _changing = self.changing.lock().await;
        let ports = self.switch.list_ports().await.map_err(switch_error)?;
        for port in guest_ports(&ports)
            .filter(|p| p.external_ids.get(IFACE_ID).map(String::as_str) == Some(port_uid))
        {
            self.switch
                .remove_port(&port.name)
                .await
                .map_err(switch_error)?;
        }
        Ok(())
    }

    async fn observe(&self) -> Result<Observed, WiringError> {
        Ok(observed(&self.read().await?))
    }

    fn needs_tx_checksum_off(&self) -> bool {
        self.switch.datapath_type() == DatapathType::Netdev
    }
}

/// What `state` wires, as the reconciler sees it.
fn observed(state: &NodeState) -> Observed {
    let networks = state
        .records
        .keys()
        .map(|uid| (uid.clone(), observed_network(state, uid)))
        .collect();
    let ports = guest_ports(&state.ports)
        .filter_map(|p| {
            let uid = p
                .external_ids
                .get(IFACE_ID)
                .or_else(|| p.external_ids.get(FERRO_OWNER))?;
            Some((
                uid.clone(),
                ObservedPort {
                    network_uid: p.external_ids[NETWORK_ID].clone(),
                    device: p.name.clone(),
                    attached: p.ofport.is_some() && p.error.is_none(),
                },
            ))
        })
        .collect();
    Observed { networks, ports }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::switch::memory::{MemorySwitch, Operation};
    use crate::wiring::memory::peers;

    const LOCAL: &str = "198.18.0.11";

    fn network(uid: &str, segment_id: u32, remote: &[&str]) -> NetworkWiring {
        NetworkWiring {
            uid: uid.into(),
            segment_id,
            mtu: 1450,
            local_ip: LOCAL.parse().unwrap(),
            peers: peers(remote),
        }
    }

    fn port(uid: &str, network_uid: &str, device: &str) -> PortWiring {
        PortWiring {
            uid: uid.into(),
            network_uid: network_uid.into(),
            device: device.into(),
            mac: "fa:16:3e:00:00:01".into(),
            server_uid: Some("server-1".into()),
        }
    }

    async fn driver() -> (MemorySwitch, OvsWiring) {
        let switch = MemorySwitch::default();
        let wiring = OvsWiring::new(Arc::new(switch.clone()));
        wiring.prepare().await.unwrap();
        (switch, wiring)
    }

    fn record(switch: &MemorySwitch, uid: &str) -> Option<NetworkRecord> {
        let bridge = futures::executor::block_on(switch.list_bridges())
            .unwrap()
            .into_iter()
            .find(|b| b.name == INTEGRATION_BRIDGE)?;
        let value = bridge.external_ids.get(&network_record_key(uid))?;
        Some(serde_json::from_str(value).unwrap())
    }

    fn tunnels(switch: &MemorySwitch) -> BTreeSet<String> {
        futures::executor::block_on(switch.list_ports())
            .unwrap()
            .into_iter()
            .filter(|p| p.bridge == TUNNEL_BRIDGE && p.name != PATCH_TO_INTEGRATION)
            .map(|p| p.name)
            .collect()
    }

    fn flows_of(switch: &MemorySwitch, bridge: &str, owner: &str) -> Vec<FlowSpec> {
        let cookie = FlowCookie::for_owner(owner);
        let mut flows: Vec<_> = switch
            .flows(bridge)
            .into_iter()
            .filter(|f| f.cookie == cookie)
            .map(|f| f.spec)
            .collect();
        flows.sort_by_key(|f| (f.table, f.priority));
        flows
    }

    fn ofport(switch: &MemorySwitch, name: &str) -> u32 {
        switch.port(name).unwrap().ofport.unwrap()
    }

    #[test]
    fn local_vlans_are_kept_recovered_or_the_lowest_free() {
        let rec = |vlan| NetworkRecord {
            vlan,
            vni: 1,
            local_ip: LOCAL.parse().unwrap(),
            peers: BTreeSet::new(),
        };
        let tagged = |network: &str, tag: u16| PortInfo {
            bridge: INTEGRATION_BRIDGE.into(),
            name: format!("tap{network}{tag}"),
            kind: PortKind::System,
            tag: Some(tag),
            external_ids: BTreeMap::from([(NETWORK_ID.to_owned(), network.to_owned())]),
            ofport: Some(1),
            error: None,
        };
        let full: BTreeMap<String, NetworkRecord> =
            VLAN_RANGE.map(|v| (format!("n{v}"), rec(v))).collect();
        struct Case {
            name: &'static str,
            records: BTreeMap<String, NetworkRecord>,
            ports: Vec<PortInfo>,
            expected: Option<u16>,
        }
        let cases = [
            Case {
                name: "first network",
                records: BTreeMap::new(),
                ports: vec![],
                expected: Some(1),
            },
            Case {
                name: "its record holds it",
                records: BTreeMap::from([("a".into(), rec(9)), ("net".into(), rec(5))]),
                ports: vec![],
                expected: Some(5),
            },
            Case {
                name: "a gap is filled",
                records: BTreeMap::from([("a".into(), rec(1)), ("b".into(), rec(3))]),
                ports: vec![],
                expected: Some(2),
            },
            Case {
                name: "a lost record: its ports' tag",
                records: BTreeMap::from([("a".into(), rec(1))]),
                ports: vec![tagged("net", 7), tagged("net", 7)],
                expected: Some(7),
            },
            Case {
                name: "its ports' tag is another network's: a fresh one",
                records: BTreeMap::from([("a".into(), rec(7))]),
                ports: vec![tagged("net", 7)],
                expected: Some(1),
            },
            Case {
                name: "ports of a network without record hold their tag",
                records: BTreeMap::new(),
                ports: vec![tagged("gone", 1)],
                expected: Some(2),
            },
            Case {
                name: "its ports disagree: a fresh one",
                records: BTreeMap::new(),
                ports: vec![tagged("net", 1), tagged("net", 2)],
                expected: Some(3),
            },
            Case {
                name: "all taken",
                records: full,
                ports: vec![],
                expected: None,
            },
        ];
        for case in cases {
            assert_eq!(
                local_vlan_for("net", &case.records, &case.ports),
                case.expected,
                "{}",
                case.name
            );
        }
    }

    #[test]
    fn tunnel_port_names_fit_and_differ() {
        assert_eq!(
            tunnel_port_name("192.168.0.2".parse().unwrap()),
            "vxlan-c0a80002"
        );
        let v6 = tunnel_port_name("fd00::2".parse().unwrap());
        assert!(v6.starts_with("vxlan-") && v6.len() <= 15, "{v6}");
        assert_ne!(v6, tunnel_port_name("fd00::3".parse().unwrap()));
    }

    #[tokio::test]
    async fn prepare_makes_the_bridges_patch_and_base_flows() {
        let (switch, wiring) = driver().await;
        let bridges = switch.list_bridges().await.unwrap();
        let names: Vec<_> = bridges.iter().map(|b| b.name.as_str()).collect();
        assert_eq!(names, [INTEGRATION_BRIDGE, TUNNEL_BRIDGE]);
        assert!(
            bridges.iter().all(|b| b.datapath_type == "netdev"),
            "{bridges:?}"
        );
        assert_eq!(
            switch.port(PATCH_TO_TUNNELS).unwrap().kind,
            PortKind::Patch {
                peer: PATCH_TO_INTEGRATION.into()
            }
        );
        let patch = ofport(&switch, PATCH_TO_INTEGRATION);
        assert_eq!(
            flows_of(&switch, TUNNEL_BRIDGE, NODE_FLOWS_OWNER),
            [
                flow(0, 0, "", "drop"),
                flow(0, 1, &format!("in_port={patch}"), "resubmit(,2)"),
                flow(2, 0, "", "resubmit(,22)"),
                flow(4, 0, "", "drop"),
                flow(22, 0, "", "drop"),
            ]
        );
        // Every flow carries a Ferro cookie; OVS's own NORMAL flows were replaced.
        assert_eq!(
            switch.flows(INTEGRATION_BRIDGE),
            [Flow {
                cookie: FlowCookie::for_owner(NODE_FLOWS_OWNER),
                spec: flow(0, 0, "", "NORMAL"),
            }]
        );
        assert!(switch.flows(TUNNEL_BRIDGE).iter().all(|f| f.cookie.0 != 0));
        assert!(wiring.needs_tx_checksum_off());
        let system = OvsWiring::new(Arc::new(MemorySwitch::new(DatapathType::System)));
        assert!(!system.needs_tx_checksum_off());
        // Preparing again changes nothing.
        switch.take_journal();
        wiring.prepare().await.unwrap();
        assert_eq!(switch.changes(), []);
    }

    #[tokio::test]
    async fn a_new_network_gets_a_vlan_tunnels_and_its_flows() {
        let (switch, wiring) = driver().await;
        wiring
            .ensure_network(&network("net-a", 42, &["198.18.0.13", "198.18.0.12"]))
            .await
            .unwrap();
        assert_eq!(
            record(&switch, "net-a"),
            Some(NetworkRecord {
                vlan: 1,
                vni: 42,
                local_ip: LOCAL.parse().unwrap(),
                peers: peers(&["198.18.0.12", "198.18.0.13"]),
            })
        );
        assert_eq!(
            tunnels(&switch),
            BTreeSet::from(["vxlan-c612000c".into(), "vxlan-c612000d".into()])
        );
        assert_eq!(
            switch.port("vxlan-c612000c").unwrap().kind,
            PortKind::Vxlan {
                remote_ip: "198.18.0.12".parse().unwrap(),
                key: TunnelKey::Flow,
                local_ip: Some(LOCAL.parse().unwrap()),
            }
        );
        let (patch, t12, t13) = (
            ofport(&switch, PATCH_TO_INTEGRATION),
            ofport(&switch, "vxlan-c612000c"),
            ofport(&switch, "vxlan-c612000d"),
        );
        assert_eq!(
            flows_of(&switch, TUNNEL_BRIDGE, "net-a"),
            [
                flow(
                    4,
                    1,
                    "tun_id=0x2a",
                    &format!("mod_vlan_vid:1,output:{patch}")
                ),
                flow(
                    22,
                    1,
                    "dl_vlan=1",
                    &format!("strip_vlan,load:0x2a->NXM_NX_TUN_ID[],output:{t12},output:{t13}")
                ),
            ]
        );
        let base = flows_of(&switch, TUNNEL_BRIDGE, NODE_FLOWS_OWNER);
        for tunnel in [t12, t13] {
            assert!(
                base.contains(&flow(0, 1, &format!("in_port={tunnel}"), "resubmit(,4)")),
                "{base:?}"
            );
        }
        let observed = wiring.observe().await.unwrap();
        assert_eq!(
            observed.networks,
            BTreeMap::from([(
                "net-a".to_owned(),
                ObservedNetwork {
                    segment_id: 42,
                    peers: peers(&["198.18.0.12", "198.18.0.13"]),
                }
            )])
        );
        // A bad request is refused before anything is touched.
        switch.take_journal();
        for bad in [
            network("net-b", 0, &[]),
            network("net-b", 1 << 24, &[]),
            network("net-b", 7, &[LOCAL]),
        ] {
            assert!(matches!(
                wiring.ensure_network(&bad).await,
                Err(WiringError::InvalidSpec { .. })
            ));
        }
        assert_eq!(switch.journal(), []);
    }

    #[tokio::test]
    async fn tunnels_follow_the_peers_of_all_networks() {
        struct Step {
            what: &'static str,
            ensure: Option<NetworkWiring>,
            remove: Option<&'static str>,
            tunnels: &'static [&'static str],
            /// Network, its local VLAN and the peers it observes.
            networks: &'static [(&'static str, u16, &'static [&'static str])],
        }
        const P2: &str = "198.18.0.2";
        const P3: &str = "198.18.0.3";
        const P4: &str = "198.18.0.4";
        let steps = [
            Step {
                what: "a new network",
                ensure: Some(network("net-a", 100, &[P2, P3])),
                remove: None,
                tunnels: &["vxlan-c6120002", "vxlan-c6120003"],
                networks: &[("net-a", 1, &[P2, P3])],
            },
            Step {
                what: "a second network shares a peer",
                ensure: Some(network("net-b", 200, &[P3, P4])),
                remove: None,
                tunnels: &["vxlan-c6120002", "vxlan-c6120003", "vxlan-c6120004"],
                networks: &[("net-a", 1, &[P2, P3]), ("net-b", 2, &[P3, P4])],
            },
            Step {
                what: "a peer leaves the first network; the shared one stays",
                ensure: Some(network("net-a", 100, &[P2])),
                remove: None,
                tunnels: &["vxlan-c6120002", "vxlan-c6120003", "vxlan-c6120004"],
                networks: &[("net-a", 1, &[P2]), ("net-b", 2, &[P3, P4])],
            },
            Step {
                what: "the shared peer leaves the second network too",
                ensure: Some(network("net-b", 200, &[P4])),
                remove: None,
                tunnels: &["vxlan-c6120002", "vxlan-c6120004"],
                networks: &[("net-a", 1, &[P2]), ("net-b", 2, &[P4])],
            },
            Step {
                what: "a peer is added",
                ensure: Some(network("net-a", 100, &[P2, P3])),
                remove: None,
                tunnels: &["vxlan-c6120002", "vxlan-c6120003", "vxlan-c6120004"],
                networks: &[("net-a", 1, &[P2, P3]), ("net-b", 2, &[P4])],
            },
            Step {
                what: "the first network goes with its tunnels; its VLAN is free",
                ensure: None,
                remove: Some("net-a"),
                tunnels: &["vxlan-c6120004"],
                networks: &[("net-b", 2, &[P4])],
            },
            Step {
                what: "a third network takes the free VLAN",
                ensure: Some(network("net-c", 300, &[P4])),
                remove: None,
                tunnels: &["vxlan-c6120004"],
                networks: &[("net-b", 2, &[P4]), ("net-c", 1, &[P4])],
            },
            Step {
                what: "a network with no peers keeps its VLAN and needs no tunnel",
                ensure: Some(network("net-b", 200, &[])),
                remove: None,
                tunnels: &["vxlan-c6120004"],
                networks: &[("net-b", 2, &[]), ("net-c", 1, &[P4])],
            },
        ];
        let (switch, wiring) = driver().await;
        for step in steps {
            if let Some(network) = &step.ensure {
                wiring.ensure_network(network).await.unwrap();
            }
            if let Some(uid) = step.remove {
                wiring.remove_network(uid).await.unwrap();
            }
            let expected: BTreeSet<String> = step.tunnels.iter().map(|t| t.to_string()).collect();
            assert_eq!(tunnels(&switch), expected, "{}", step.what);
            let observed = wiring.observe().await.unwrap();
            let networks: Vec<_> = observed
                .networks
                .iter()
                .map(|(uid, n)| {
                    (
                        uid.as_str(),
                        record(&switch, uid).unwrap().vlan,
                        n.peers.clone(),
                    )
                })
                .collect();
            let expected: Vec<_> = step
                .networks
                .iter()
                .map(|(uid, vlan, remote)| (*uid, *vlan, peers(remote)))
                .collect();
            assert_eq!(networks, expected, "{}", step.what);
            // Flows only ever name tunnels that exist.
            let ofports: BTreeSet<u32> = switch
                .list_ports()
                .await
                .unwrap()
                .iter()
                .filter_map(|p| p.ofport)
                .collect();
            for flow in switch.flows(TUNNEL_BRIDGE) {
                for n in flow
                    .spec
                    .actions
                    .split(',')
                    .chain(flow.spec.matches.split(','))
                    .filter_map(|a| a.strip_prefix("output:").or(a.strip_prefix("in_port=")))
                {
                    assert!(
                        ofports.contains(&n.parse().unwrap()),
                        "{}: {flow:?}",
                        step.what
                    );
                }
            }
        }
    }

    #[tokio::test]
    async fn ports_are_plugged_with_their_records_and_unplugged() {
        let (switch, wiring) = driver().await;
        assert!(matches!(
            wiring.plug(&port("port-1", "net-a", "tapport1")).await,
            Err(WiringError::NoSuchNetwork(n)) if n == "net-a"
        ));
        wiring
            .ensure_network(&network("net-a", 42, &[]))
            .await
            .unwrap();
        wiring
            .ensure_network(&network("net-b", 43, &[]))
            .await
            .unwrap();
        wiring
            .plug(&port("port-1", "net-a", "tapport1"))
            .await
            .unwrap();
        wiring
            .plug(&port("port-2", "net-b", "tapport2"))
            .await
            .unwrap();
        let plugged = switch.port("tapport1").unwrap();
        assert_eq!(plugged.bridge, INTEGRATION_BRIDGE);
        assert_eq!(plugged.tag, Some(1));
        assert_eq!(switch.port("tapport2").unwrap().tag, Some(2));
        assert_eq!(
            plugged.external_ids,
            BTreeMap::from([
                (IFACE_ID.to_owned(), "port-1".to_owned()),
                (ATTACHED_MAC.to_owned(), "fa:16:3e:00:00:01".to_owned()),
                (VM_UUID.to_owned(), "server-1".to_owned()),
                (FERRO_OWNER.to_owned(), "port-1".to_owned()),
                (NETWORK_ID.to_owned(), "net-a".to_owned()),
            ])
        );
        let observed = wiring.observe().await.unwrap();
        assert_eq!(
            observed.ports["port-1"],
            ObservedPort {
                network_uid: "net-a".into(),
                device: "tapport1".into(),
                attached: true,
            }
        );
        // The same port on a new device: moved, not doubled.
        wiring
            .plug(&port("port-1", "net-a", "tapport1b"))
            .await
            .unwrap();
        assert!(switch.port("tapport1").is_none());
        assert_eq!(
            wiring.observe().await.unwrap().ports["port-1"].device,
            "tapport1b"
        );

        wiring.unplug("port-1").await.unwrap();
        wiring.unplug("port-1").await.unwrap();
        assert!(switch.port("tapport1b").is_none());
        // Removing a network takes its ports.
        wiring.remove_network("net-b").await.unwrap();
        wiring.remove_network("net-b").await.unwrap();
        assert!(switch.port("tapport2").is_none());
        assert_eq!(
            wiring
                .observe()
                .await
                .unwrap()
                .networks
                .keys()
                .collect::<Vec<_>>(),
            ["net-a"]
        );
    }

    #[tokio::test]
    async fn a_fresh_driver_observes_the_same_and_changes_nothing() {
        let (switch, wiring) = driver().await;
        let nets = [
            network("net-a", 42, &["198.18.0.12"]),
            network("net-b", 43, &["198.18.0.12", "198.18.0.13"]),
        ];
        let ports = [
            port("port-1", "net-a", "tapport1"),
            port("port-2", "net-b", "tapport2"),
        ];
        for n in &nets {
            wiring.ensure_network(n).await.unwrap();
        }
        for p in &ports {
            wiring.plug(p).await.unwrap();
        }
        let before = wiring.observe().await.unwrap();
        let flows_before = (
            switch.flows(INTEGRATION_BRIDGE),
            switch.flows(TUNNEL_BRIDGE),
        );

        let restarted = OvsWiring::new(Arc::new(switch.restart()));
        assert_eq!(restarted.observe().await.unwrap(), before);
        switch.take_journal();
        restarted.prepare().await.unwrap();
        // In reverse order, so the VLANs could only come from the switch.
        for n in nets.iter().rev() {
            restarted.ensure_network(n).await.unwrap();
        }
        for p in &ports {
            restarted.plug(p).await.unwrap();
        }
        assert_eq!(switch.changes(), []);
        assert_eq!(
            (
                switch.flows(INTEGRATION_BRIDGE),
                switch.flows(TUNNEL_BRIDGE)
            ),
            flows_before
        );
        assert_eq!(restarted.observe().await.unwrap(), before);
    }

    #[tokio::test]
    async fn removing_everything_leaves_only_the_node_wide_base() {
        let (switch, wiring) = driver().await;
        let base = (
            switch.flows(INTEGRATION_BRIDGE),
            switch.flows(TUNNEL_BRIDGE),
        );
        wiring
            .ensure_network(&network("net-a", 42, &["198.18.0.12"]))
            .await
            .unwrap();
        wiring
            .ensure_network(&network("net-b", 43, &["198.18.0.13"]))
            .await
            .unwrap();
        wiring
            .plug(&port("port-1", "net-a", "tapport1"))
            .await
            .unwrap();
        wiring
            .plug(&port("port-2", "net-b", "tapport2"))
            .await
            .unwrap();
        wiring.remove_network("net-a").await.unwrap();
        wiring.remove_network("net-b").await.unwrap();

        assert_eq!(wiring.observe().await.unwrap(), Observed::default());
        let names: Vec<_> = switch
            .list_ports()
            .await
            .unwrap()
            .into_iter()
            .map(|p| p.name)
            .collect();
        assert_eq!(names, [PATCH_TO_TUNNELS, PATCH_TO_INTEGRATION]);
        assert_eq!(
            (
                switch.flows(INTEGRATION_BRIDGE),
                switch.flows(TUNNEL_BRIDGE)
            ),
            base
        );
        let bridges = switch.list_bridges().await.unwrap();
        assert!(
            bridges.iter().all(|b| b.external_ids.is_empty()),
            "{bridges:?}"
        );
    }

    #[tokio::test]
    async fn reused_flows_are_dumped_again_after_any_write_of_the_driver() {
        let switch = MemorySwitch::default();
        let wiring =
            OvsWiring::new(Arc::new(switch.clone())).reuse_flows_for(Duration::from_secs(3600));
        wiring.prepare().await.unwrap();
        wiring
            .ensure_network(&network("net-a", 42, &["198.18.0.12"]))
            .await
            .unwrap();
        let dumps = |switch: &MemorySwitch| {
            switch
                .take_journal()
                .iter()
                .filter(|c| c.operation == Operation::DumpFlows)
                .count()
        };
        wiring.prepare().await.unwrap();
        switch.take_journal();

        // Passes that plug ports read records and ports, never the flows again.
        wiring
            .plug(&port("port-1", "net-a", "tapport1"))
            .await
            .unwrap();
        let wired = wiring.observe().await.unwrap();
        assert!(wired.ports["port-1"].attached);
        assert_eq!(wired.networks["net-a"].segment_id, 42);
        wiring.prepare().await.unwrap();
        assert_eq!(dumps(&switch), 0, "flows reused");

        // Inside the window, flows deleted by hand go unnoticed (the price of reuse)...
        switch.delete_flows_behind_our_back(TUNNEL_BRIDGE);
        wiring.prepare().await.unwrap();
        assert!(flows_of(&switch, TUNNEL_BRIDGE, "net-a").is_empty());
        assert_eq!(dumps(&switch), 0);
        // ...until the driver writes: then it reads, and mends them.
        wiring
            .ensure_network(&network("net-a", 42, &["198.18.0.12", "198.18.0.13"]))
            .await
            .unwrap();
        wiring.prepare().await.unwrap();
        assert!(dumps(&switch) > 0);
        assert!(!flows_of(&switch, TUNNEL_BRIDGE, "net-a").is_empty());
        assert_eq!(
            wiring.observe().await.unwrap().networks["net-a"]
                .peers
                .len(),
            2
        );
    }

    #[tokio::test]
    async fn every_read_dumps_the_flows_without_reuse() {
        let (switch, wiring) = driver().await;
        wiring
            .ensure_network(&network("net-a", 42, &["198.18.0.12"]))
            .await
            .unwrap();
        switch.delete_flows_behind_our_back(TUNNEL_BRIDGE);
        wiring.prepare().await.unwrap();
        assert!(!flows_of(&switch, TUNNEL_BRIDGE, "net-a").is_empty());
    }

    #[tokio::test]
    async fn drift_is_mended_orphans_go() {
        let (switch, wiring) = driver().await;
        wiring
            .ensure_network(&network("net-a", 42, &["198.18.0.12"]))
            .await
            .unwrap();
        wiring
            .plug(&port("port-1", "net-a", "tapport1"))
            .await
            .unwrap();
        let wired = wiring.observe().await.unwrap();

        // A tunnel nobody needs (left by an earlier agent), a port retagged by hand, and
        // flows of a network that no longer exists.
        switch.plant_port(PortSpec {
            bridge: TUNNEL_BRIDGE.into(),
            name: "vxlan-cb007109".into(),
            kind: PortKind::Vxlan {
                remote_ip: "203.0.113.9".parse().unwrap(),
                key: TunnelKey::Flow,
                local_ip: Some(LOCAL.parse().unwrap()),
            },
            tag: None,
            external_ids: BTreeMap::from([(FERRO_OWNER.to_owned(), TUNNEL_OWNER.to_owned())]),
        });
        let mut retagged = switch.port("tapport1").unwrap();
        retagged.tag = Some(99);
        switch.plant_port(PortSpec {
            bridge: retagged.bridge,
            name: retagged.name,
            kind: retagged.kind,
            tag: retagged.tag,
            external_ids: retagged.external_ids,
        });
        switch
            .add_flows(
                TUNNEL_BRIDGE,
                FlowCookie::for_owner("net-gone"),
                &[flow(22, 1, "dl_vlan=9", "output:1")],
            )
            .await
            .unwrap();

        wiring.prepare().await.unwrap();
        assert!(switch.port("vxlan-cb007109").is_none());
        assert_eq!(switch.port("tapport1").unwrap().tag, Some(1));
        assert!(flows_of(&switch, TUNNEL_BRIDGE, "net-gone").is_empty());
        assert_eq!(wiring.observe().await.unwrap(), wired);

        // Flows lost (ovs-vswitchd restarted): observed as unwired, and mended.
        switch.delete_flows_behind_our_back(TUNNEL_BRIDGE);
        let lost = wiring.observe().await.unwrap();
        assert_eq!(
            lost.networks["net-a"],
            ObservedNetwork {
                segment_id: 0,
                peers: BTreeSet::new()
            }
        );
        wiring.prepare().await.unwrap();
        assert_eq!(wiring.observe().await.unwrap(), wired);
        // A record lost: the network's VLAN comes back from its port.
        switch
            .update_bridge_external_ids(
                INTEGRATION_BRIDGE,
                &BTreeMap::from([(network_record_key("net-a"), None)]),
            )
            .await
            .unwrap();
        wiring
            .ensure_network(&network("net-b", 43, &[]))
            .await
            .unwrap();
        wiring
            .ensure_network(&network("net-a", 42, &["198.18.0.12"]))
            .await
            .unwrap();
        assert_eq!(record(&switch, "net-a").unwrap().vlan, 1);
        assert_eq!(record(&switch, "net-b").unwrap().vlan, 2);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Ensure { network: usize, peers: Vec<bool> },
        Remove { network: usize },
        Restart,
    }

    fn op() -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        prop_oneof![
            3 => (0..4usize, proptest::collection::vec(any::<bool>(), 3))
                .prop_map(|(network, peers)| Op::Ensure { network, peers }),
            1 => (0..4usize).prop_map(|network| Op::Remove { network }),
            1 => Just(Op::Restart),
        ]
    }

    proptest::proptest! {
        /// Whatever the order of calls and restarts: no two networks ever hold one local
        /// VLAN, a network keeps its VLAN for as long as it is wired, and the tunnels are
        /// exactly the peers of the networks that are left.
        #[test]
        fn local_vlans_stay_unique_and_stable_and_tunnels_follow_peers(
            ops in proptest::collection::vec(op(), 1..24)
        ) {
            let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
            runtime.block_on(async {
                const PEERS: [&str; 3] = ["198.18.0.2", "198.18.0.3", "198.18.0.4"];
                let switch = MemorySwitch::default();
                let mut wiring = OvsWiring::new(Arc::new(switch.clone()));
                wiring.prepare().await.unwrap();
                let mut wanted: BTreeMap<String, BTreeSet<IpAddr>> = BTreeMap::new();
                let mut vlans: BTreeMap<String, u16> = BTreeMap::new();
                for op in ops {
                    match op {
                        Op::Ensure { network: n, peers: chosen } => {
                            let remote: Vec<&str> = PEERS
                                .iter()
                                .zip(&chosen)
                                .filter(|(_, on)| **on)
                                .map(|(p, _)| *p)
                                .collect();
                            let uid = format!("net-{n}");
                            wiring
                                .ensure_network(&network(&uid, 100 + n as u32, &remote))
                                .await
                                .unwrap();
                            wanted.insert(uid, peers(&remote));
                        }
                        Op::Remove { network: n } => {
                            let uid = format!("net-{n}");
                            wiring.remove_network(&uid).await.unwrap();
                            wanted.remove(&uid);
                            vlans.remove(&uid);
                        }
                        Op::Restart => {
                            wiring = OvsWiring::new(Arc::new(switch.restart()));
                        }
                    }
                    let observed = wiring.observe().await.unwrap();
                    let peers_observed: BTreeMap<_, _> = observed
                        .networks
                        .iter()
                        .map(|(uid, n)| (uid.clone(), n.peers.clone()))
                        .collect();
                    assert_eq!(peers_observed, wanted);
                    let mut held = BTreeSet::new();
                    for uid in wanted.keys() {
                        let vlan = record(&switch, uid).unwrap().vlan;
                        assert!(held.insert(vlan), "VLAN {vlan} held twice");
                        assert_eq!(*vlans.entry(uid.clone()).or_insert(vlan), vlan, "{uid} moved");
                    }
                    let needed: BTreeSet<String> = wanted
                        .values()
                        .flatten()
                        .map(|ip| tunnel_port_name(*ip))
                        .collect();
                    assert_eq!(tunnels(&switch), needed);
                }
            });
        }
    }
}
