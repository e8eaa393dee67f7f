//! The Linux bridge [`NetworkDriver`]: one kernel bridge per network and a kernel VXLAN
//! device on it, as Neutron's Linux bridge agent wires them, through [`Links`].
//!
//! For a network with uid `U` and segment ID `S`, on the node's namespace:
//! - a bridge `brq` + the first hex digits of `U` ([`bridge_name`]), alias `U`;
//! - a VXLAN device `vxlan-S` ([`vxlan_name`]), VNI `S`, UDP port 4789, over the device
//!   holding the node's tunnel address (`local_ip`), learning on, alias `U`, a port of the
//!   bridge;
//! - one all-zero FDB entry per peer node (`bridge fdb append 00:00:00:00:00:00 dev
//!   vxlan-S dst PEER`): broadcast and unknown unicast go to exactly those nodes, with no
//!   multicast group, and the device learns where each remote MAC lives from what comes
//!   back;
//! - the MTU of the bridge, the VXLAN device and every plugged device is the network's.
//!
//! A plugged device is a port of the bridge whose alias is the Port's uid. Names hold only a
//! prefix of a uid; aliases hold the whole of it, and that is how [`NetworkDriver::observe`]
//! reads networks and ports back after a restart, from the host alone. Different networks
//! are different bridges and VNIs, so two of them using the same CIDR never meet.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;

use super::{
    DriverKind, NetworkDriver, NetworkWiring, Observed, ObservedNetwork, ObservedPort, PortWiring,
    WiringError, device_name, port_uid_of_alias,
};
use crate::links::{
    FdbEntry, Link, LinkKind, Links, LinksError, MacAddress, VXLAN_PORT, VxlanSpec, validate_vni,
};

/// The prefix of a network's bridge name (Neutron's).
pub const BRIDGE_PREFIX: &str = "brq";
/// The prefix of a network's VXLAN device name (Neutron's), followed by the segment ID.
pub const VXLAN_PREFIX: &str = "vxlan-";

/// The bridge of a network: `brq` and as much of its uid as fits.
pub fn bridge_name(network_uid: &str) -> String {
    device_name(BRIDGE_PREFIX, network_uid)
}

/// The VXLAN device of a network: `vxlan-` and its segment ID (at most 14 bytes).
pub fn vxlan_name(segment_id: u32) -> String {
    format!("{VXLAN_PREFIX}{segment_id}")
}

/// What to change in a VXLAN device's flood entries to reach exactly the wanted peers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FloodPlan {
    /// Peers without a flood entry yet.
    pub add: Vec<IpAddr>,
    /// Flood entries to peers no longer wanted.
    pub remove: Vec<FdbEntry>,
}

/// Plans the flood entries of a VXLAN device: one per peer, none to this node itself, and
/// no other flood entry. Entries for real MACs are not flood entries and are left alone.
pub fn plan_flood_entries(
    local_ip: IpAddr,
    peers: &BTreeSet<IpAddr>,
    found: &[FdbEntry],
) -> FloodPlan {
    let wanted: BTreeSet<IpAddr> = peers.iter().copied().filter(|p| *p != local_ip).collect();
    let present: BTreeSet<IpAddr> = found
        .iter()
        .filter(|e| e.mac == MacAddress::ZERO)
        .filter_map(|e| e.dst)
        .collect();
    FloodPlan {
        add: wanted.difference(&present).copied().collect(),
        remove: found
            .iter()
            .filter(|e| e.mac == MacAddress::ZERO && e.dst.is_none_or(|d| !wanted.contains(&d)))
            .copied()
            .collect(),
    }
}

/// The Linux bridge driver. See the module notes.
pub struct LinuxBridge {
    links: Arc<dyn Links>,
    /// Whether [`NetworkDriver::prepare`] found the kernel able, so later resyncs do not
    /// make and delete probe devices again (a restart probes once more).
    prepared: AtomicBool,
}

impl std::fmt::Debug for LinuxBridge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinuxBridge")
            .field("namespace", &self.links.target())
            .finish()
    }
}

fn switch_error(error: LinksError) -> WiringError {
    WiringError::Switch(Box::new(error))
}

/// The network uid a bridge of ours stands for: its alias, if its name is a `brq` name.
fn network_of(link: &Link) -> Option<&str> {
    let uid = link.alias.as_deref()?;
    (link.kind == LinkKind::Bridge && link.name == bridge_name(uid)).then_some(uid)
}

impl LinuxBridge {
    /// A driver wiring the namespace `links` acts in (the node's).
    pub fn new(links: Arc<dyn Links>) -> LinuxBridge {
        LinuxBridge {
            links,
            prepared: AtomicBool::new(false),
        }
    }

    /// The device holding this node's tunnel address.
    async fn underlay(&self, local_ip: IpAddr) -> Result<String, WiringError> {
        self.links
            .list_all_addresses()
            .await
            .map_err(switch_error)?
            .into_iter()
            .find(|(_, address)| address.ip == local_ip)
            .map(|(device, _)| device)
            .ok_or_else(|| WiringError::InvalidSpec {
                field: "local_ip",
                reason: format!("no device on this node holds {local_ip}"),
            })
    }

    /// Sets what differs of a device's MTU, master, alias and state.
    async fn converge(
        &self,
        name: &str,
        mtu: u32,
        master: Option<&str>,
        alias: &str,
    ) -> Result<(), WiringError> {
        let link = self
            .links
            .link(name)
            .await
            .map_err(switch_error)?
            .ok_or_else(|| WiringError::NoSuchDevice(name.to_owned()))?;
        if link.mtu != mtu {
            self.links.set_mtu(name, mtu).await.map_err(switch_error)?;
        }
        if master.is_some() && link.master.as_deref() != master {
            self.links
                .set_master(name, master)
                .await
                .map_err(switch_error)?;
        }
        // The caller may have written more after the uid (`@namespace`): kept.
        if link.alias.as_deref().map(port_uid_of_alias) != Some(alias) {
            self.links
                .set_alias(name, Some(alias))
                .await
                .map_err(switch_error)?;
        }
        if !link.up {
            self.links.set_up(name, true).await.map_err(switch_error)?;
        }
        Ok(())
    }

    /// Makes a bridge and a VXLAN device to see that the kernel can, and deletes them.
    async fn probe(&self) -> Result<(), LinksError> {
        const BRIDGE: &str = "ferroprobebr";
        const VXLAN: &str = "ferroprobevx";
        self.links.ensure_bridge(BRIDGE).await?;
        self.links.delete_link(BRIDGE).await?;
        // A VXLAN device needs an underlay; loopback will do for a probe.
        let made = self
            .links
            .ensure_vxlan(&VxlanSpec {
                name: VXLAN.into(),
                // The last VNI, the one a segment allocator hands out last.
                vni: 16_777_215,
                local: IpAddr::from([127, 0, 0, 1]),
                underlay: "lo".into(),
                port: VXLAN_PORT,
                learning: true,
            })
            .await;
        self.links.delete_link(VXLAN).await?;
        made
    }
}

#[async_trait]
impl NetworkDriver for LinuxBridge {
    fn kind(&self) -> DriverKind {
        DriverKind::LinuxBridge
    }

    async fn prepare(&self) -> Result<Observed, WiringError> {
        if self.prepared.load(Ordering::Relaxed) {
            return self.observe().await;
        }
        // Networks wired already (by an earlier agent) prove that the driver works; and
        // the probe's VXLAN device could not be made beside one of them with its VNI.
        let wired = self.observe().await?;
        if !wired.networks.is_empty() {
            self.prepared.store(true, Ordering::Relaxed);
            return Ok(wired);
        }
        self.probe().await.map_err(|e| {
            let mut reason = format!("Linux bridges and VXLAN devices cannot be made: {e}");
            let mut source = std::error::Error::source(&e);
            while let Some(cause) = source {
                reason.push_str(&format!(": {cause}"));
                source = cause.source();
            }
            WiringError::Unavailable(reason)
        })?;
        self.prepared.store(true, Ordering::Relaxed);
        self.observe().await
    }

    async fn ensure_network(&self, network: &NetworkWiring) -> Result<(), WiringError> {
        validate_vni(network.segment_id).map_err(|e| WiringError::InvalidSpec {
            field: "segment_id",
            reason: e.to_string(),
        })?;
        let bridge = bridge_name(&network.uid);
        let vxlan = vxlan_name(network.segment_id);
        let underlay = self.underlay(network.local_ip).await?;

        self.links
            .ensure_bridge(&bridge)
            .await
            .map_err(switch_error)?;
        self.converge(&bridge, network.mtu, None, &network.uid)
            .await?;

        // A VXLAN device of this network under another name was made for another segment.
        for link in self.links.list_links().await.map_err(switch_error)? {
            let ours = link.master.as_deref() == Some(&bridge)
                || link.alias.as_deref() == Some(&network.uid);
            if ours && matches!(link.kind, LinkKind::Vxlan(_)) && link.name != vxlan {
                self.links
                    .delete_link(&link.name)
                    .await
                    .map_err(switch_error)?;
            }
        }
        self.links
            .ensure_vxlan(&VxlanSpec {
                name: vxlan.clone(),
                vni: network.segment_id,
                local: network.local_ip,
                underlay,
                port: VXLAN_PORT,
                learning: true,
            })
            .await
            .map_err(switch_error)?;
        self.converge(&vxlan, network.mtu, Some(&bridge), &network.uid)
            .await?;

        let found = self.links.list_fdb(&vxlan).await.map_err(switch_error)?;
        let plan = plan_flood_entries(network.local_ip, &network.peers, &found);
        for peer in plan.add {
            self.links
                .append_fdb(&vxlan, &FdbEntry::flood(peer))
                .await
                .map_err(switch_error)?;
        }
        for entry in plan.remove {
            self.links
                .delete_fdb(&vxlan, &entry)
                .await
                .map_err(switch_error)?;
        }
        Ok(())
    }

    async fn remove_network(&self, network_uid: &str) -> Result<(), WiringError> {
        let bridge = bridge_name(network_uid);
        for link in self.links.list_links().await.map_err(switch_error)? {
            let on_bridge = link.master.as_deref() == Some(&bridge);
            let is_vxlan = matches!(link.kind, LinkKind::Vxlan(_));
            if is_vxlan && (on_bridge || link.alias.as_deref() == Some(network_uid)) {
                self.links
                    .delete_link(&link.name)
                    .await
                    .map_err(switch_error)?;
            } else if on_bridge {
                // A port still plugged: unplugged, its device left to its owner.
                self.links
                    .set_master(&link.name, None)
                    .await
                    .map_err(switch_error)?;
                self.links
                    .set_alias(&link.name, None)
                    .await
                    .map_err(switch_error)?;
            }
        }
        self.links.delete_link(&bridge).await.map_err(switch_error)
    }

    async fn plug(&self, port: &PortWiring) -> Result<(), WiringError> {
        let bridge = bridge_name(&port.network_uid);
        let network = self.links.link(&bridge).await.map_err(switch_error)?;
        let Some(network) = network.filter(|l| network_of(l) == Some(port.network_uid.as_str()))
        else {
            return Err(WiringError::NoSuchNetwork(port.network_uid.clone()));
        };
        self.converge(&port.device, network.mtu, Some(&bridge), &port.uid)
            .await
    }

    async fn unplug(&self, port_uid: &str) -> Result<(), WiringError> {
        let links = self.links.list_links().await.map_err(switch_error)?;
        let bridges: BTreeSet<&str> = links
            .iter()
            .filter(|l| network_of(l).is_some())
            .map(|l| l.name.as_str())
            .collect();
        for link in &links {
            let plugged = link.master.as_deref().is_some_and(|m| bridges.contains(m));
            // The device and its alias stay the caller's: only the bridge lets go of it.
            if plugged && link.alias.as_deref().map(port_uid_of_alias) == Some(port_uid) {
                self.links
                    .set_master(&link.name, None)
                    .await
                    .map_err(switch_error)?;
            }
        }
        Ok(())
    }

    async fn observe(&self) -> Result<Observed, WiringError> {
        let links = self.links.list_links().await.map_err(switch_error)?;
        // Bridge name → network uid.
        let networks: BTreeMap<&str, &str> = links
            .iter()
            .filter_map(|l| Some((l.name.as_str(), network_of(l)?)))
            .collect();
        let mut observed = Observed::default();
        for uid in networks.values() {
            // Until its VXLAN device is found, a network is on no segment (0), which no
            // network is meant to be: the reconciler ensures it again.
            observed.networks.insert(
                (*uid).to_owned(),
                ObservedNetwork {
                    segment_id: 0,
                    peers: BTreeSet::new(),
                },
            );
        }
        for link in &links {
            let Some(network_uid) = link.master.as_deref().and_then(|m| networks.get(m)) else {
                continue;
            };
            match &link.kind {
                LinkKind::Vxlan(info) => {
                    let entries = self
                        .links
                        .list_fdb(&link.name)
                        .await
                        .map_err(switch_error)?;
                    let network = observed
                        .networks
                        .get_mut(*network_uid)
                        .expect("every bridge of ours is listed");
                    network.segment_id = info.vni;
                    network.peers = entries
                        .iter()
                        .filter(|e| e.mac == MacAddress::ZERO)
                        .filter_map(|e| e.dst)
                        .collect();
                }
                _ => {
                    if let Some(alias) = &link.alias {
                        observed.ports.insert(
                            port_uid_of_alias(alias).to_owned(),
                            ObservedPort {
                                network_uid: (*network_uid).to_owned(),
                                device: link.name.clone(),
                                attached: link.up,
                            },
                        );
                    }
                }
            }
        }
        Ok(observed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::links::memory::MemoryLinks;
    use crate::links::{Address, VethPeer};
    use crate::wiring::memory::peers;

    const NETWORK: &str = "3f2a9c41-d0e7-4b7e-9a61-0c2d5e6f7a8b";

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    /// A host whose `under0` holds the tunnel address 198.18.0.11, and a driver on it.
    async fn node() -> (MemoryLinks, LinuxBridge) {
        let host = MemoryLinks::new();
        host.ensure_veth(
            "under0",
            &VethPeer {
                name: "under1".into(),
                namespace: None,
            },
        )
        .await
        .unwrap();
        host.add_address(
            "under0",
            Address {
                ip: ip("198.18.0.11"),
                prefix_len: 24,
            },
        )
        .await
        .unwrap();
        let driver = LinuxBridge::new(Arc::new(host.clone()));
        (host, driver)
    }

    fn network(peers_: &[&str]) -> NetworkWiring {
        NetworkWiring {
            uid: NETWORK.into(),
            segment_id: 1042,
            mtu: 1450,
            local_ip: ip("198.18.0.11"),
            peers: peers(peers_),
        }
    }

    fn port(uid: &str, device: &str) -> PortWiring {
        PortWiring {
            uid: uid.into(),
            network_uid: NETWORK.into(),
            device: device.into(),
            mac: "fa:16:3e:00:00:01".into(),
            server_uid: None,
        }
    }

    #[test]
    fn flood_entries_go_to_exactly_the_peers() {
        let local = ip("198.18.0.11");
        let found = [
            FdbEntry::flood(ip("198.18.0.12")),
            FdbEntry::flood(ip("198.18.0.13")),
            FdbEntry {
                mac: "fa:16:3e:00:00:09".parse().unwrap(),
                dst: Some(ip("198.18.0.13")),
            },
        ];
        let plan = plan_flood_entries(local, &peers(&["198.18.0.12", "198.18.0.14"]), &found);
        assert_eq!(plan.add, [ip("198.18.0.14")]);
        assert_eq!(plan.remove, [FdbEntry::flood(ip("198.18.0.13"))]);

        // This node is never its own peer; nothing to do when all is in place.
        let plan = plan_flood_entries(local, &peers(&["198.18.0.11", "198.18.0.12"]), &found[..1]);
        assert_eq!(plan, FloodPlan::default());
        let plan = plan_flood_entries(local, &BTreeSet::new(), &found);
        assert_eq!(plan.remove.len(), 2);
    }

    #[test]
    fn names_are_neutrons() {
        assert_eq!(bridge_name(NETWORK), "brq3f2a9c41d0e7");
        assert_eq!(vxlan_name(16_777_215), "vxlan-16777215");
    }

    #[tokio::test]
    async fn a_network_is_a_bridge_and_a_vxlan_device_with_its_peers() {
        let (host, driver) = node().await;
        driver.prepare().await.unwrap();
        driver
            .ensure_network(&network(&["198.18.0.12", "198.18.0.13"]))
            .await
            .unwrap();
        let bridge = host.link("brq3f2a9c41d0e7").await.unwrap().unwrap();
        assert_eq!(bridge.alias.as_deref(), Some(NETWORK));
        assert_eq!((bridge.mtu, bridge.up), (1450, true));
        let vxlan = host.link("vxlan-1042").await.unwrap().unwrap();
        assert_eq!(vxlan.master.as_deref(), Some("brq3f2a9c41d0e7"));
        assert_eq!((vxlan.mtu, vxlan.up), (1450, true));
        assert!(matches!(
            vxlan.kind,
            LinkKind::Vxlan(ref info) if info.vni == 1042
                && info.underlay.as_deref() == Some("under0")
                && info.learning
                && info.port == 4789
        ));

        // Peers change: exactly the new set.
        driver
            .ensure_network(&network(&["198.18.0.13", "198.18.0.14"]))
            .await
            .unwrap();
        let observed = driver.observe().await.unwrap();
        assert_eq!(
            observed.networks[NETWORK],
            ObservedNetwork {
                segment_id: 1042,
                peers: peers(&["198.18.0.13", "198.18.0.14"]),
            }
        );

        // Converged: a repeat changes nothing.
        host.clear_calls();
        driver
            .ensure_network(&network(&["198.18.0.13", "198.18.0.14"]))
            .await
            .unwrap();
        assert!(
            host.calls().iter().all(|c| c.starts_with("ensure_")),
            "{:?}",
            host.calls()
        );
    }

    #[tokio::test]
    async fn ports_are_found_again_by_their_alias() {
        let (host, driver) = node().await;
        driver.ensure_network(&network(&[])).await.unwrap();
        host.ensure_tap("tap3f2a9c41d0e7").await.unwrap();
        driver
            .plug(&port("port-1-full-uid", "tap3f2a9c41d0e7"))
            .await
            .unwrap();
        let tap = host.link("tap3f2a9c41d0e7").await.unwrap().unwrap();
        assert_eq!(tap.master.as_deref(), Some("brq3f2a9c41d0e7"));
        assert_eq!(tap.alias.as_deref(), Some("port-1-full-uid"));
        assert_eq!((tap.mtu, tap.up), (1450, true));

        // A fresh driver (a restarted agent) sees the same.
        let again = LinuxBridge::new(Arc::new(host.clone()));
        let observed = again.observe().await.unwrap();
        assert_eq!(
            observed.ports["port-1-full-uid"],
            ObservedPort {
                network_uid: NETWORK.into(),
                device: "tap3f2a9c41d0e7".into(),
                attached: true,
            }
        );
        assert_eq!(observed.networks.len(), 1);

        again.unplug("port-1-full-uid").await.unwrap();
        again.unplug("port-1-full-uid").await.unwrap();
        assert!(again.observe().await.unwrap().ports.is_empty());
        let tap = host.link("tap3f2a9c41d0e7").await.unwrap().unwrap();
        assert_eq!(tap.master, None);
    }

    #[tokio::test]
    async fn removing_a_network_leaves_only_the_callers_devices() {
        let (host, driver) = node().await;
        let before: Vec<String> = host
            .list_links()
            .await
            .unwrap()
            .into_iter()
            .map(|l| l.name)
            .collect();
        driver
            .ensure_network(&network(&["198.18.0.12"]))
            .await
            .unwrap();
        host.ensure_tap("tap1").await.unwrap();
        driver.plug(&port("port-1", "tap1")).await.unwrap();
        driver.remove_network(NETWORK).await.unwrap();
        driver.remove_network(NETWORK).await.unwrap();
        let after: Vec<String> = host
            .list_links()
            .await
            .unwrap()
            .into_iter()
            .map(|l| l.name)
            .filter(|n| n != "tap1")
            .collect();
        assert_eq!(after, before);
        let tap = host.link("tap1").await.unwrap().unwrap();
        assert_eq!(tap.master, None, "unplugged");
        assert_eq!(driver.observe().await.unwrap(), Observed::default());
    }

    #[tokio::test]
    async fn a_new_segment_replaces_the_old_vxlan_device() {
        let (host, driver) = node().await;
        driver
            .ensure_network(&network(&["198.18.0.12"]))
            .await
            .unwrap();
        let mut moved = network(&["198.18.0.12"]);
        moved.segment_id = 2042;
        driver.ensure_network(&moved).await.unwrap();
        assert_eq!(host.link("vxlan-1042").await.unwrap(), None);
        let observed = driver.observe().await.unwrap();
        assert_eq!(observed.networks[NETWORK].segment_id, 2042);
        assert_eq!(observed.networks[NETWORK].peers, peers(&["198.18.0.12"]));
    }

    #[tokio::test]
    async fn bad_requests_are_refused() {
        let (host, driver) = node().await;
        let mut elsewhere = network(&[]);
        elsewhere.local_ip = ip("198.18.0.99");
        assert!(matches!(
            driver.ensure_network(&elsewhere).await,
            Err(WiringError::InvalidSpec {
                field: "local_ip",
                ..
            })
        ));
        let mut no_segment = network(&[]);
        no_segment.segment_id = 0;
        assert!(matches!(
            driver.ensure_network(&no_segment).await,
            Err(WiringError::InvalidSpec {
                field: "segment_id",
                ..
            })
        ));
        host.ensure_tap("tap1").await.unwrap();
        assert!(matches!(
            driver.plug(&port("port-1", "tap1")).await,
            Err(WiringError::NoSuchNetwork(_))
        ));
        driver.ensure_network(&network(&[])).await.unwrap();
        assert!(matches!(
            driver.plug(&port("port-1", "tap9")).await,
            Err(WiringError::NoSuchDevice(_))
        ));
        // A node with a network wired already proves the driver works: no probe.
        host.fail_next("no bridge module");
        let restarted = LinuxBridge::new(Arc::new(host.clone()));
        let observed = restarted.prepare().await.unwrap();
        assert_eq!(observed.networks.len(), 1);

        let (bare, _) = node().await;
        bare.fail_next("no bridge module");
        let fresh = LinuxBridge::new(Arc::new(bare.clone()));
        assert!(matches!(
            fresh.prepare().await,
            Err(WiringError::Unavailable(reason)) if reason.contains("no bridge module")
        ));
    }
}
