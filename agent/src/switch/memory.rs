//! An in-memory [`Switch`] that behaves like Open vSwitch, for reconciler tests that run
//! without root or OVS.
//!
//! [`MemorySwitch`] keeps what an OVS database and its bridges' flow tables keep: bridges
//! with their datapath type, ports with their bridge, kind, tag and `external_ids`, and
//! flows by cookie. It answers as [`super::ovs::OvsSwitch`] does: ensuring twice makes one
//! port, a port on a missing bridge is [`SwitchError::NoSuchBridge`], ensuring a port that
//! sits on another bridge moves it, removing a bridge takes its ports and flows with it, and
//! nothing left to remove is not an error. Specs are validated as the real driver validates
//! them.
//!
//! Clones share one switch, and [`MemorySwitch::restart`] is a new driver over the same
//! switch, as a restarted agent finds OVS as it was. Tests change the switch behind the
//! driver's back ([`MemorySwitch::plant_port`], [`MemorySwitch::delete_port_behind_our_back`]),
//! make the next calls of an operation fail ([`MemorySwitch::fail_next`]) and read what
//! the driver was asked to do from its journal ([`MemorySwitch::journal`]). This double
//! never stands in for the real driver in a claim that a feature works; `tests/ovs.rs`
//! does that.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use super::{
    BridgeInfo, DatapathType, Flow, FlowCookie, FlowSpec, PortInfo, PortSpec, Switch, SwitchError,
    ovsdb::OvsdbError, validate_bridge_name, validate_flows, validate_interface_name,
    validate_port_spec,
};

/// A driver operation, for failure injection and the journal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Operation {
    /// [`Switch::ensure_bridge`].
    EnsureBridge,
    /// [`Switch::remove_bridge`].
    RemoveBridge,
    /// [`Switch::list_bridges`].
    ListBridges,
    /// [`Switch::update_bridge_external_ids`].
    UpdateBridgeExternalIds,
    /// [`Switch::ensure_port`].
    EnsurePort,
    /// [`Switch::remove_port`].
    RemovePort,
    /// [`Switch::list_ports`].
    ListPorts,
    /// [`Switch::add_flows`].
    AddFlows,
    /// [`Switch::replace_flows`].
    ReplaceFlows,
    /// [`Switch::remove_flows`].
    RemoveFlows,
    /// [`Switch::dump_flows`].
    DumpFlows,
}

impl Operation {
    /// Whether the operation changes the switch (as opposed to observing it).
    pub fn is_mutating(self) -> bool {
        !matches!(
            self,
            Operation::ListBridges | Operation::ListPorts | Operation::DumpFlows
        )
    }
}

/// One call made through the driver, in the order they were made. Calls that failed are
/// recorded too.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    /// What was asked.
    pub operation: Operation,
    /// What it was asked of: a bridge or port name, `bridge/cookie` for flows, empty for
    /// the lists.
    pub target: String,
    /// What came of it.
    pub outcome: Outcome,
}

/// What came of one [`Call`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// It changed the switch.
    Changed,
    /// The switch was already as asked (an ensure that found everything in place, a
    /// remove of what was not there, or an observation).
    Unchanged,
    /// It failed, with this error text.
    Failed(String),
}

impl Call {
    /// Whether the call changed the switch.
    pub fn changed_the_switch(&self) -> bool {
        self.outcome == Outcome::Changed
    }
}

#[derive(Debug, Clone)]
struct Bridge {
    datapath_type: String,
    external_ids: BTreeMap<String, String>,
    /// In the order they were added, as flow tables keep them.
    flows: Vec<Flow>,
}

/// What the switch holds, shared by every driver over it.
#[derive(Debug, Default)]
struct State {
    bridges: BTreeMap<String, Bridge>,
    /// By name: names are unique across bridges, as in OVSDB.
    ports: BTreeMap<String, PortInfo>,
    next_ofport: u32,
    faults: BTreeMap<Operation, u32>,
    journal: Vec<Call>,
}

/// The in-memory switch. Cheap to clone; clones share the switch.
#[derive(Debug, Clone)]
pub struct MemorySwitch {
    state: Arc<Mutex<State>>,
    datapath_type: DatapathType,
}

impl Default for MemorySwitch {
    fn default() -> Self {
        MemorySwitch::new(DatapathType::Netdev)
    }
}

impl MemorySwitch {
    /// An empty switch whose new bridges get `datapath_type`.
    pub fn new(datapath_type: DatapathType) -> MemorySwitch {
        MemorySwitch {
            state: Arc::new(Mutex::new(State {
                next_ofport: 1,
                ..State::default()
            })),
            datapath_type,
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("memory switch poisoned")
    }

    /// A new driver over the same switch, as after an agent restart: bridges, ports and
    /// flows stay; pending faults and the journal belong to the switch and stay too.
    pub fn restart(&self) -> MemorySwitch {
        self.clone()
    }

    // -----------------------------------------------------------------------------------
    // Failure injection and the journal.

    /// Makes the next `times` calls of `operation` fail, changing nothing, as a lost OVSDB
    /// connection would.
    pub fn fail_next(&self, operation: Operation, times: u32) {
        *self.state().faults.entry(operation).or_default() += times;
    }

    /// The calls made through this switch, oldest first.
    pub fn journal(&self) -> Vec<Call> {
        self.state().journal.clone()
    }

    /// The calls made since the last take, and forgets them.
    pub fn take_journal(&self) -> Vec<Call> {
        std::mem::take(&mut self.state().journal)
    }

    /// The calls in the journal that changed the switch.
    pub fn changes(&self) -> Vec<Call> {
        self.journal()
            .into_iter()
            .filter(Call::changed_the_switch)
            .collect()
    }

    /// Runs one call: takes an injected fault if one waits, else `body`, and journals it.
    /// `body` says whether it changed anything.
    fn call<T>(
        &self,
        operation: Operation,
        target: &str,
        body: impl FnOnce(&mut State) -> Result<(T, bool), SwitchError>,
    ) -> Result<T, SwitchError> {
        let mut state = self.state();
        let injected = match state.faults.get_mut(&operation) {
            Some(left) if *left > 0 => {
                *left -= 1;
                true
            }
            _ => false,
        };
        let result = if injected {
            Err(SwitchError::Ovsdb(OvsdbError::Closed(
                "injected failure".to_owned(),
            )))
        } else {
            body(&mut state)
        };
        let outcome = match &result {
            Ok((_, true)) => Outcome::Changed,
            Ok((_, false)) => Outcome::Unchanged,
            Err(e) => Outcome::Failed(crate::images::error_chain(e)),
        };
        state.journal.push(Call {
            operation,
            target: target.to_owned(),
            outcome,
        });
        result.map(|(value, _)| value)
    }

    // -----------------------------------------------------------------------------------
    // What the switch holds.

    /// The names of the bridges.
    pub fn bridges(&self) -> Vec<String> {
        self.state().bridges.keys().cloned().collect()
    }

    /// The port named `name`, wherever it is.
    pub fn port(&self, name: &str) -> Option<PortInfo> {
        self.state().ports.get(name).cloned()
    }

    /// Every flow of a bridge; empty if there is no such bridge.
    pub fn flows(&self, bridge: &str) -> Vec<Flow> {
        self.state()
            .bridges
            .get(bridge)
            .map(|b| b.flows.clone())
            .unwrap_or_default()
    }

    // -----------------------------------------------------------------------------------
    // Drift: the switch changing behind the driver's back.

    /// A port appears that no call of this driver made: one left by an earlier agent
    /// whose owner is gone, or one an operator added with `ovs-vsctl`. Its bridge is made
    /// if missing.
    pub fn plant_port(&self, spec: PortSpec) {
        let mut state = self.state();
        let datapath = self.datapath_type.as_str().to_owned();
        state
            .bridges
            .entry(spec.bridge.clone())
            .or_insert_with(|| new_bridge(datapath));
        let ofport = state.take_ofport();
        state
            .ports
            .insert(spec.name.clone(), port_info(&spec, ofport));
    }

    /// Someone deletes a port with `ovs-vsctl del-port`.
    ///
    /// # Panics
    /// If there is no such port.
    pub fn delete_port_behind_our_back(&self, name: &str) {
        self.state()
            .ports
            .remove(name)
            .unwrap_or_else(|| panic!("no port {name} on the memory switch"));
    }

    /// Someone deletes a bridge's flows with `ovs-ofctl del-flows`.
    ///
    /// # Panics
    /// If there is no such bridge.
    pub fn delete_flows_behind_our_back(&self, bridge: &str) {
        self.state()
            .bridges
            .get_mut(bridge)
            .unwrap_or_else(|| panic!("no bridge {bridge} on the memory switch"))
            .flows
            .clear();
    }
}

impl State {
    fn take_ofport(&mut self) -> u32 {
        let ofport = self.next_ofport;
        self.next_ofport += 1;
        ofport
    }

    fn bridge_mut(&mut self, name: &str) -> Result<&mut Bridge, SwitchError> {
        self.bridges
            .get_mut(name)
            .ok_or_else(|| SwitchError::NoSuchBridge(name.to_owned()))
    }
}

/// A bridge as OVS makes one: with OVS's own lowest-priority flow, which forwards as a
/// learning switch.
fn new_bridge(datapath_type: String) -> Bridge {
    Bridge {
        datapath_type,
        external_ids: BTreeMap::new(),
        flows: vec![Flow {
            cookie: FlowCookie(0),
            spec: FlowSpec {
                table: 0,
                priority: 0,
                matches: String::new(),
                actions: "NORMAL".to_owned(),
            },
        }],
    }
}

fn port_info(spec: &PortSpec, ofport: u32) -> PortInfo {
    PortInfo {
        bridge: spec.bridge.clone(),
        name: spec.name.clone(),
        kind: spec.kind.clone(),
        tag: spec.tag,
        external_ids: spec.external_ids.clone(),
        ofport: Some(ofport),
        error: None,
    }
}

fn bridge_info(name: &str, bridge: &Bridge) -> BridgeInfo {
    BridgeInfo {
        name: name.to_owned(),
        datapath_type: bridge.datapath_type.clone(),
        external_ids: bridge.external_ids.clone(),
    }
}

fn cookie_target(bridge: &str, cookie: FlowCookie) -> String {
    format!("{bridge}/{cookie}")
}

#[async_trait::async_trait]
impl Switch for MemorySwitch {
    fn datapath_type(&self) -> DatapathType {
        self.datapath_type
    }

    async fn ensure_bridge(&self, name: &str) -> Result<BridgeInfo, SwitchError> {
        let datapath = self.datapath_type.as_str().to_owned();
        self.call(Operation::EnsureBridge, name, |state| {
            validate_bridge_name(name)?;
            let bridge = state
                .bridges
                .entry(name.to_owned())
                .or_insert_with(|| new_bridge(String::new()));
            let changed = bridge.datapath_type != datapath;
            bridge.datapath_type = datapath;
            Ok((bridge_info(name, bridge), changed))
        })
    }

    async fn remove_bridge(&self, name: &str) -> Result<(), SwitchError> {
        self.call(Operation::RemoveBridge, name, |state| {
            validate_bridge_name(name)?;
            if state.bridges.remove(name).is_none() {
                return Ok(((), false));
            }
            state.ports.retain(|_, port| port.bridge != name);
            Ok(((), true))
        })
    }

    async fn list_bridges(&self) -> Result<Vec<BridgeInfo>, SwitchError> {
        self.call(Operation::ListBridges, "", |state| {
            let bridges = state
                .bridges
                .iter()
                .map(|(name, bridge)| bridge_info(name, bridge))
                .collect();
            Ok((bridges, false))
        })
    }

    async fn update_bridge_external_ids(
        &self,
        bridge: &str,
        changes: &BTreeMap<String, Option<String>>,
    ) -> Result<BridgeInfo, SwitchError> {
        self.call(Operation::UpdateBridgeExternalIds, bridge, |state| {
            validate_bridge_name(bridge)?;
            if changes.keys().any(String::is_empty) {
                return Err(super::invalid("external_ids", "keys must not be empty"));
            }
            let name = bridge;
            let bridge = state.bridge_mut(name)?;
            let before = bridge.external_ids.clone();
            for (key, value) in changes {
                match value {
                    Some(value) => bridge.external_ids.insert(key.clone(), value.clone()),
                    None => bridge.external_ids.remove(key),
                };
            }
            let changed = bridge.external_ids != before;
            Ok((bridge_info(name, bridge), changed))
        })
    }

    async fn ensure_port(&self, spec: &PortSpec) -> Result<PortInfo, SwitchError> {
        self.call(Operation::EnsurePort, &spec.name, |state| {
            validate_port_spec(spec)?;
            if !state.bridges.contains_key(&spec.bridge) {
                return Err(SwitchError::NoSuchBridge(spec.bridge.clone()));
            }
            if let Some(port) = state.ports.get(&spec.name)
                && port.matches(spec)
            {
                return Ok((port.clone(), false));
            }
            // Kept across changes, as OVS keeps a port's number while it stays on its
            // bridge.
            let ofport = match state.ports.get(&spec.name) {
                Some(port) if port.bridge == spec.bridge => port.ofport,
                _ => None,
            };
            let ofport = ofport.unwrap_or_else(|| state.take_ofport());
            let port = port_info(spec, ofport);
            state.ports.insert(spec.name.clone(), port.clone());
            Ok((port, true))
        })
    }

    async fn remove_port(&self, name: &str) -> Result<(), SwitchError> {
        self.call(Operation::RemovePort, name, |state| {
            validate_interface_name("name", name)?;
            if state.bridges.contains_key(name) {
                return Err(super::invalid("name", "is a bridge's own port"));
            }
            Ok(((), state.ports.remove(name).is_some()))
        })
    }

    async fn list_ports(&self) -> Result<Vec<PortInfo>, SwitchError> {
        self.call(Operation::ListPorts, "", |state| {
            let mut ports: Vec<_> = state.ports.values().cloned().collect();
            ports.sort_by(|a, b| (&a.bridge, &a.name).cmp(&(&b.bridge, &b.name)));
            Ok((ports, false))
        })
    }

    async fn add_flows(
        &self,
        bridge: &str,
        cookie: FlowCookie,
        flows: &[FlowSpec],
    ) -> Result<(), SwitchError> {
        self.call(
            Operation::AddFlows,
            &cookie_target(bridge, cookie),
            |state| {
                validate_flows(flows)?;
                let bridge = state.bridge_mut(bridge)?;
                let mut changed = false;
                for flow in flows {
                    // A flow with the same table, priority and match replaces the old one, as
                    // an OpenFlow add does.
                    let same = |f: &Flow| {
                        f.spec.table == flow.table
                            && f.spec.priority == flow.priority
                            && f.spec.matches == flow.matches
                    };
                    let new = Flow {
                        cookie,
                        spec: flow.clone(),
                    };
                    match bridge.flows.iter_mut().find(|f| same(f)) {
                        Some(old) if *old == new => {}
                        Some(old) => {
                            *old = new;
                            changed = true;
                        }
                        None => {
                            bridge.flows.push(new);
                            changed = true;
                        }
                    }
                }
                Ok(((), changed))
            },
        )
    }

    async fn replace_flows(
        &self,
        bridge: &str,
        cookie: FlowCookie,
        flows: &[FlowSpec],
    ) -> Result<(), SwitchError> {
        self.call(
            Operation::ReplaceFlows,
            &cookie_target(bridge, cookie),
            |state| {
                validate_flows(flows)?;
                let bridge = state.bridge_mut(bridge)?;
                let before = bridge.flows.clone();
                bridge.flows.retain(|f| f.cookie != cookie);
                for flow in flows {
                    let same = |f: &Flow| {
                        f.spec.table == flow.table
                            && f.spec.priority == flow.priority
                            && f.spec.matches == flow.matches
                    };
                    bridge.flows.retain(|f| !same(f));
                    bridge.flows.push(Flow {
                        cookie,
                        spec: flow.clone(),
                    });
                }
                let mut old: Vec<_> = before.iter().collect();
                let mut new: Vec<_> = bridge.flows.iter().collect();
                let key = |f: &&Flow| {
                    (
                        f.cookie,
                        f.spec.table,
                        f.spec.priority,
                        f.spec.matches.clone(),
                    )
                };
                old.sort_by_key(key);
                new.sort_by_key(key);
                Ok(((), old != new))
            },
        )
    }

    async fn remove_flows(&self, bridge: &str, cookie: FlowCookie) -> Result<(), SwitchError> {
        self.call(
            Operation::RemoveFlows,
            &cookie_target(bridge, cookie),
            |state| {
                validate_bridge_name(bridge)?;
                let Some(bridge) = state.bridges.get_mut(bridge) else {
                    return Ok(((), false));
                };
                let before = bridge.flows.len();
                bridge.flows.retain(|f| f.cookie != cookie);
                Ok(((), bridge.flows.len() != before))
            },
        )
    }

    async fn dump_flows(
        &self,
        bridge: &str,
        cookie: Option<FlowCookie>,
    ) -> Result<Vec<Flow>, SwitchError> {
        let target = cookie.map_or_else(|| bridge.to_owned(), |c| cookie_target(bridge, c));
        self.call(Operation::DumpFlows, &target, |state| {
            let bridge = state.bridge_mut(bridge)?;
            let flows = bridge
                .flows
                .iter()
                .filter(|f| cookie.is_none_or(|c| f.cookie == c))
                .cloned()
                .collect();
            Ok((flows, false))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::{ATTACHED_MAC, FERRO_OWNER, IFACE_ID, PortKind, TunnelKey};
    use super::*;

    fn tap(name: &str, tag: u16) -> PortSpec {
        PortSpec {
            bridge: "br-int".into(),
            name: name.into(),
            kind: PortKind::System,
            tag: Some(tag),
            external_ids: BTreeMap::from([
                (IFACE_ID.to_owned(), format!("port-{name}")),
                (ATTACHED_MAC.to_owned(), "52:54:00:00:00:01".to_owned()),
                (FERRO_OWNER.to_owned(), format!("port-{name}")),
            ]),
        }
    }

    fn flow(priority: u16, matches: &str) -> FlowSpec {
        FlowSpec {
            table: 0,
            priority,
            matches: matches.into(),
            actions: "drop".into(),
        }
    }

    #[tokio::test]
    async fn ensuring_twice_makes_one_port_and_changes_once() {
        let switch = MemorySwitch::default();
        switch.ensure_bridge("br-int").await.unwrap();
        let first = switch.ensure_port(&tap("tap1", 5)).await.unwrap();
        let second = switch.ensure_port(&tap("tap1", 5)).await.unwrap();
        assert_eq!(first, second);
        assert_eq!(switch.list_ports().await.unwrap(), vec![first]);
        let outcomes: Vec<_> = switch
            .journal()
            .into_iter()
            .filter(|c| c.operation == Operation::EnsurePort)
            .map(|c| c.outcome)
            .collect();
        assert_eq!(outcomes, [Outcome::Changed, Outcome::Unchanged]);
    }

    #[tokio::test]
    async fn a_changed_spec_converges_and_keeps_the_port_number() {
        let switch = MemorySwitch::default();
        switch.ensure_bridge("br-int").await.unwrap();
        let before = switch.ensure_port(&tap("tap1", 5)).await.unwrap();
        let after = switch.ensure_port(&tap("tap1", 7)).await.unwrap();
        assert_eq!(after.tag, Some(7));
        assert_eq!(after.ofport, before.ofport);
        // Onto another bridge: moved, not duplicated.
        switch.ensure_bridge("br-tun").await.unwrap();
        let moved = PortSpec {
            bridge: "br-tun".into(),
            ..tap("tap1", 7)
        };
        switch.ensure_port(&moved).await.unwrap();
        let ports = switch.list_ports().await.unwrap();
        assert_eq!(ports.len(), 1);
        assert_eq!(ports[0].bridge, "br-tun");
    }

    #[tokio::test]
    async fn a_port_needs_its_bridge_and_a_sound_spec() {
        let switch = MemorySwitch::default();
        assert!(matches!(
            switch.ensure_port(&tap("tap1", 5)).await,
            Err(SwitchError::NoSuchBridge(b)) if b == "br-int"
        ));
        switch.ensure_bridge("br-int").await.unwrap();
        assert!(matches!(
            switch.ensure_port(&tap("tap1", 4096)).await,
            Err(SwitchError::InvalidSpec { field: "tag", .. })
        ));
        assert!(switch.list_ports().await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn removing_is_harmless_when_nothing_is_left() {
        let switch = MemorySwitch::default();
        switch.ensure_bridge("br-int").await.unwrap();
        switch.ensure_port(&tap("tap1", 5)).await.unwrap();
        switch.remove_port("tap1").await.unwrap();
        switch.remove_port("tap1").await.unwrap();
        assert!(switch.list_ports().await.unwrap().is_empty());
        assert!(switch.remove_port("br-int").await.is_err());
        // A bridge takes its ports and flows with it.
        switch.ensure_port(&tap("tap2", 5)).await.unwrap();
        switch.remove_bridge("br-int").await.unwrap();
        switch.remove_bridge("br-int").await.unwrap();
        assert!(switch.list_ports().await.unwrap().is_empty());
        assert!(switch.list_bridges().await.unwrap().is_empty());
        switch.remove_flows("br-int", FlowCookie(1)).await.unwrap();
        let removals: Vec<_> = switch
            .changes()
            .into_iter()
            .filter(|c| !matches!(c.operation, Operation::EnsureBridge | Operation::EnsurePort))
            .map(|c| (c.operation, c.target))
            .collect();
        assert_eq!(
            removals,
            [
                (Operation::RemovePort, "tap1".to_owned()),
                (Operation::RemoveBridge, "br-int".to_owned()),
            ]
        );
    }

    #[tokio::test]
    async fn bridge_external_ids_are_set_and_removed_by_key() {
        let switch = MemorySwitch::default();
        let changes = |pairs: &[(&str, Option<&str>)]| -> BTreeMap<String, Option<String>> {
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.map(str::to_owned)))
                .collect()
        };
        assert!(matches!(
            switch
                .update_bridge_external_ids("br-int", &changes(&[("a", Some("1"))]))
                .await,
            Err(SwitchError::NoSuchBridge(_))
        ));
        switch.ensure_bridge("br-int").await.unwrap();
        switch
            .update_bridge_external_ids("br-int", &changes(&[("a", Some("1")), ("b", Some("2"))]))
            .await
            .unwrap();
        let bridge = switch
            .update_bridge_external_ids("br-int", &changes(&[("a", None), ("b", Some("3"))]))
            .await
            .unwrap();
        assert_eq!(
            bridge.external_ids,
            BTreeMap::from([("b".to_owned(), "3".to_owned())])
        );
        switch.take_journal();
        switch
            .update_bridge_external_ids("br-int", &changes(&[("a", None), ("b", Some("3"))]))
            .await
            .unwrap();
        assert!(switch.changes().is_empty());
    }

    #[tokio::test]
    async fn bridges_get_the_drivers_datapath() {
        let switch = MemorySwitch::new(DatapathType::System);
        let bridge = switch.ensure_bridge("br-int").await.unwrap();
        assert_eq!(bridge.datapath_type, "system");
        assert_eq!(switch.ensure_bridge("br-int").await.unwrap(), bridge);
        assert_eq!(switch.changes().len(), 1);
    }

    #[tokio::test]
    async fn flows_are_replaced_and_removed_by_cookie() {
        let switch = MemorySwitch::default();
        switch.ensure_bridge("br-int").await.unwrap();
        let (a, b) = (
            FlowCookie::for_owner("net-a"),
            FlowCookie::for_owner("net-b"),
        );
        switch
            .add_flows("br-int", a, &[flow(10, "dl_vlan=1"), flow(11, "dl_vlan=2")])
            .await
            .unwrap();
        switch
            .add_flows("br-int", b, &[flow(10, "dl_vlan=3")])
            .await
            .unwrap();
        switch
            .replace_flows("br-int", a, &[flow(12, "dl_vlan=4")])
            .await
            .unwrap();
        let of_a = switch.dump_flows("br-int", Some(a)).await.unwrap();
        assert_eq!(
            of_a.iter().map(|f| f.spec.priority).collect::<Vec<_>>(),
            [12]
        );
        assert_eq!(switch.dump_flows("br-int", Some(b)).await.unwrap().len(), 1);
        switch.remove_flows("br-int", a).await.unwrap();
        assert!(
            switch
                .dump_flows("br-int", Some(a))
                .await
                .unwrap()
                .is_empty()
        );
        // OVS's own NORMAL flow and b's flow remain.
        assert_eq!(switch.dump_flows("br-int", None).await.unwrap().len(), 2);
        // Replacing with the same set changes nothing.
        switch.take_journal();
        switch
            .replace_flows("br-int", b, &[flow(10, "dl_vlan=3")])
            .await
            .unwrap();
        assert!(switch.changes().is_empty());
        assert!(matches!(
            switch.dump_flows("br-nope", None).await,
            Err(SwitchError::NoSuchBridge(_))
        ));
    }

    #[tokio::test]
    async fn injected_failures_hit_the_next_calls_and_change_nothing() {
        let switch = MemorySwitch::default();
        switch.ensure_bridge("br-int").await.unwrap();
        switch.fail_next(Operation::EnsurePort, 2);
        for _ in 0..2 {
            let error = switch.ensure_port(&tap("tap1", 5)).await.unwrap_err();
            assert!(matches!(error, SwitchError::Ovsdb(OvsdbError::Closed(_))));
        }
        assert!(switch.port("tap1").is_none());
        switch.ensure_port(&tap("tap1", 5)).await.unwrap();
        let failed = switch
            .journal()
            .iter()
            .filter(|c| matches!(c.outcome, Outcome::Failed(_)))
            .count();
        assert_eq!(failed, 2);
    }

    #[tokio::test]
    async fn a_restarted_driver_finds_the_switch_as_it_was_and_drift_shows() {
        let switch = MemorySwitch::default();
        switch.ensure_bridge("br-int").await.unwrap();
        switch.ensure_port(&tap("tap1", 5)).await.unwrap();
        let vxlan = PortSpec {
            bridge: "br-tun".into(),
            name: "vxlan-c0000202".into(),
            kind: PortKind::Vxlan {
                remote_ip: "192.0.2.2".parse().unwrap(),
                key: TunnelKey::Flow,
                local_ip: None,
            },
            tag: None,
            external_ids: BTreeMap::from([(FERRO_OWNER.to_owned(), "gone".to_owned())]),
        };
        switch.plant_port(vxlan.clone());
        let restarted = switch.restart();
        let ports = restarted.list_ports().await.unwrap();
        assert_eq!(ports.len(), 2);
        let orphan = ports.iter().find(|p| p.owner() == Some("gone")).unwrap();
        assert!(orphan.matches(&vxlan));
        restarted.delete_port_behind_our_back("tap1");
        assert!(restarted.port("tap1").is_none());
        assert!(switch.port("tap1").is_none());
    }
}
