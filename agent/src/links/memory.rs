//! An in-memory [`Links`] for unit tests without root: a host of namespaces and devices
//! that behaves as the kernel does where callers depend on it (deleting a veth deletes its
//! peer, deleting a bridge frees its ports, deleting a namespace deletes what is in it,
//! names are unique per namespace), records every mutating call and can be told to fail.
//!
//! Every handle from [`MemoryLinks::namespace`] shares one host with the handle it came
//! from, as the real driver's handles share the kernel.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;

use super::{
    Address, FdbEntry, Link, LinkKind, Links, LinksError, MacAddress, VethPeer, VxlanInfo,
    VxlanSpec, validate_link_name, validate_namespace_name, validate_vni,
};

/// The double. See the module notes.
#[derive(Debug, Clone)]
pub struct MemoryLinks {
    host: Arc<Mutex<Host>>,
    target: Option<String>,
}

/// Where a device lives: `None` is the agent's own namespace.
type Place = Option<String>;

#[derive(Debug, Default)]
struct Host {
    namespaces: BTreeSet<String>,
    spaces: BTreeMap<Place, Space>,
    next_index: u32,
    next_mac: u32,
    fail_next: Option<String>,
    calls: Vec<String>,
}

#[derive(Debug, Default)]
struct Space {
    devices: BTreeMap<String, Device>,
    default_routes: BTreeSet<IpAddr>,
}

#[derive(Debug, Clone)]
struct Device {
    link: Link,
    fdb: BTreeSet<FdbEntry>,
    addresses: BTreeSet<Address>,
    tx_checksum: bool,
    /// A veth's other end: where it lives and its name there.
    peer: Option<(Place, String)>,
}

impl Default for MemoryLinks {
    fn default() -> Self {
        MemoryLinks::new()
    }
}

impl MemoryLinks {
    /// An empty host: the agent's own namespace holds only `lo`, no named namespaces.
    pub fn new() -> MemoryLinks {
        let links = MemoryLinks {
            host: Arc::new(Mutex::new(Host::default())),
            target: None,
        };
        links.host().add_loopback(None);
        links
    }

    fn host(&self) -> MutexGuard<'_, Host> {
        self.host.lock().expect("memory links lock")
    }

    /// Every mutating call so far, across all handles, as `verb args` (with ` @NS` when
    /// acting in a named namespace), in order.
    pub fn calls(&self) -> Vec<String> {
        self.host().calls.clone()
    }

    /// Forgets the calls recorded so far.
    pub fn clear_calls(&self) {
        self.host().calls.clear();
    }

    /// Makes the next mutating call (through any handle) fail with `reason`.
    pub fn fail_next(&self, reason: &str) {
        self.host().fail_next = Some(reason.to_owned());
    }

    /// A handle of the concrete type acting inside the named namespace (what
    /// [`Links::namespace`] gives, without the trait object).
    pub fn in_namespace(&self, name: &str) -> MemoryLinks {
        MemoryLinks {
            host: self.host.clone(),
            target: Some(name.to_owned()),
        }
    }

    /// Records a mutating call and applies a pending failure; then checks the target
    /// namespace exists.
    fn begin(&self, call: String) -> Result<MutexGuard<'_, Host>, LinksError> {
        let mut host = self.host();
        let call = match &self.target {
            Some(ns) => format!("{call} @{ns}"),
            None => call,
        };
        host.calls.push(call.clone());
        if let Some(reason) = host.fail_next.take() {
            return Err(LinksError::Io {
                op: call,
                source: std::io::Error::other(reason),
            });
        }
        host.check_place(&self.target)?;
        Ok(host)
    }

    /// The host, for a read: checks the target namespace exists.
    fn read(&self) -> Result<MutexGuard<'_, Host>, LinksError> {
        let host = self.host();
        host.check_place(&self.target)?;
        Ok(host)
    }
}

impl Host {
    fn check_place(&self, place: &Place) -> Result<(), LinksError> {
        match place {
            Some(ns) if !self.namespaces.contains(ns) => {
                Err(LinksError::NoSuchNamespace(ns.clone()))
            }
            _ => Ok(()),
        }
    }

    fn space(&mut self, place: &Place) -> &mut Space {
        self.spaces.entry(place.clone()).or_default()
    }

    fn device(&mut self, place: &Place, name: &str) -> Result<&mut Device, LinksError> {
        self.space(place)
            .devices
            .get_mut(name)
            .ok_or_else(|| LinksError::NoSuchDevice(name.to_owned()))
    }

    fn add_loopback(&mut self, place: Place) {
        self.insert(
            &place,
            "lo",
            LinkKind::Other(String::new()),
            Some(MacAddress::ZERO),
        );
        let lo = self.device(&place, "lo").expect("just made");
        lo.link.mtu = 65536;
        lo.link.up = true;
    }

    /// Adds a device, down, with a fresh index and (unless given) a fresh locally
    /// administered MAC.
    fn insert(&mut self, place: &Place, name: &str, kind: LinkKind, mac: Option<MacAddress>) {
        self.next_index += 1;
        self.next_mac += 1;
        let index = self.next_index;
        let [_, b, c, d] = self.next_mac.to_be_bytes();
        let mac = mac.or(Some(MacAddress([0x02, 0, 0, b, c, d])));
        let mtu = match kind {
            LinkKind::Vxlan(_) => 1450,
            _ => 1500,
        };
        self.space(place).devices.insert(
            name.to_owned(),
            Device {
                link: Link {
                    name: name.to_owned(),
                    index,
                    kind,
                    mac,
                    mtu,
                    up: false,
                    master: None,
                    alias: None,
                },
                fdb: BTreeSet::new(),
                addresses: BTreeSet::new(),
                tx_checksum: true,
                peer: None,
            },
        );
    }

    /// Removes a device as the kernel does: a veth's peer goes too, a bridge's ports are
    /// freed.
    fn remove(&mut self, place: &Place, name: &str) {
        let Some(device) = self.space(place).devices.remove(name) else {
            return;
        };
        if let Some((peer_place, peer)) = device.peer {
            self.space(&peer_place).devices.remove(&peer);
        }
        if device.link.kind == LinkKind::Bridge {
            for port in self.space(place).devices.values_mut() {
                if port.link.master.as_deref() == Some(name) {
                    port.link.master = None;
                }
            }
        }
    }
}

#[async_trait]
impl Links for MemoryLinks {
    fn target(&self) -> Option<&str> {
        self.target.as_deref()
    }

    fn namespace(&self, name: &str) -> Arc<dyn Links> {
        Arc::new(self.in_namespace(name))
    }

    async fn create_namespace(&self, name: &str) -> Result<(), LinksError> {
        validate_namespace_name(name)?;
        let mut host = self.begin(format!("create_namespace {name}"))?;
        if host.namespaces.insert(name.to_owned()) {
            host.spaces.remove(&Some(name.to_owned()));
            host.add_loopback(Some(name.to_owned()));
        }
        Ok(())
    }

    async fn delete_namespace(&self, name: &str) -> Result<(), LinksError> {
        let mut host = self.begin(format!("delete_namespace {name}"))?;
        if host.namespaces.remove(name) {
            let place = Some(name.to_owned());
            let names: Vec<String> = host.space(&place).devices.keys().cloned().collect();
            for device in names {
                host.remove(&place, &device);
            }
            host.spaces.remove(&place);
        }
        Ok(())
    }

    async fn list_namespaces(&self) -> Result<Vec<String>, LinksError> {
        Ok(self.host().namespaces.iter().cloned().collect())
    }

    async fn list_links(&self) -> Result<Vec<Link>, LinksError> {
        let mut host = self.read()?;
        let mut links: Vec<Link> = host
            .space(&self.target)
            .devices
            .values()
            .map(|d| d.link.clone())
            .collect();
        links.sort_by_key(|l| l.index);
        Ok(links)
    }

    async fn link(&self, name: &str) -> Result<Option<Link>, LinksError> {
        let mut host = self.read()?;
        Ok(host
            .space(&self.target)
            .devices
            .get(name)
            .map(|d| d.link.clone()))
    }

    async fn ensure_tap(&self, name: &str) -> Result<(), LinksError> {
        validate_link_name(name)?;
        let mut host = self.begin(format!("ensure_tap {name}"))?;
        match host.space(&self.target).devices.get(name) {
            Some(d) if d.link.kind == LinkKind::Tun => Ok(()),
            Some(_) => Err(LinksError::WrongKind {
                name: name.to_owned(),
                wanted: "tap",
            }),
            None => {
                host.insert(&self.target, name, LinkKind::Tun, None);
                Ok(())
            }
        }
    }

    async fn ensure_veth(&self, name: &str, peer: &VethPeer) -> Result<(), LinksError> {
        validate_link_name(name)?;
        validate_link_name(&peer.name)?;
        let peer_place: Place = peer.namespace.clone().or_else(|| self.target.clone());
        let mut host = self.begin(format!("ensure_veth {name} {}", peer.name))?;
        host.check_place(&peer_place)?;
        let wanted_peer = (peer_place.clone(), peer.name.clone());
        match host.space(&self.target).devices.get(name) {
            Some(d) if d.link.kind != LinkKind::Veth => {
                return Err(LinksError::WrongKind {
                    name: name.to_owned(),
                    wanted: "veth",
                });
            }
            Some(d) if d.peer.as_ref() == Some(&wanted_peer) => return Ok(()),
            Some(_) => host.remove(&self.target, name),
            None => {}
        }
        if host.space(&peer_place).devices.contains_key(&peer.name) {
            return Err(LinksError::Io {
                op: format!("create veth {name}"),
                source: std::io::Error::from(std::io::ErrorKind::AlreadyExists),
            });
        }
        host.insert(&self.target, name, LinkKind::Veth, None);
        host.insert(&peer_place, &peer.name, LinkKind::Veth, None);
        host.device(&self.target, name)?.peer = Some(wanted_peer);
        host.device(&peer_place, &peer.name)?.peer = Some((self.target.clone(), name.to_owned()));
        Ok(())
    }

    async fn ensure_bridge(&self, name: &str) -> Result<(), LinksError> {
        validate_link_name(name)?;
        let mut host = self.begin(format!("ensure_bridge {name}"))?;
        match host.space(&self.target).devices.get(name) {
            Some(d) if d.link.kind == LinkKind::Bridge => Ok(()),
            Some(_) => Err(LinksError::WrongKind {
                name: name.to_owned(),
                wanted: "bridge",
            }),
            None => {
                host.insert(&self.target, name, LinkKind::Bridge, None);
                Ok(())
            }
        }
    }

    async fn ensure_vxlan(&self, spec: &VxlanSpec) -> Result<(), LinksError> {
        validate_link_name(&spec.name)?;
        validate_vni(spec.vni)?;
        let mut host = self.begin(format!("ensure_vxlan {} {}", spec.name, spec.vni))?;
        if !host
            .space(&self.target)
            .devices
            .contains_key(&spec.underlay)
        {
            return Err(LinksError::NoSuchDevice(spec.underlay.clone()));
        }
        let wanted = LinkKind::Vxlan(VxlanInfo {
            vni: spec.vni,
            local: Some(spec.local),
            underlay: Some(spec.underlay.clone()),
            port: spec.port,
            learning: spec.learning,
        });
        match host.space(&self.target).devices.get(&spec.name) {
            Some(d) if d.link.kind == wanted => return Ok(()),
            Some(d) if matches!(d.link.kind, LinkKind::Vxlan(_)) => {
                host.remove(&self.target, &spec.name)
            }
            Some(_) => {
                return Err(LinksError::WrongKind {
                    name: spec.name.clone(),
                    wanted: "vxlan",
                });
            }
            None => {}
        }
        host.insert(&self.target, &spec.name, wanted, None);
        Ok(())
    }

    async fn delete_link(&self, name: &str) -> Result<(), LinksError> {
        let mut host = self.begin(format!("delete_link {name}"))?;
        host.remove(&self.target, name);
        Ok(())
    }

    async fn set_up(&self, name: &str, up: bool) -> Result<(), LinksError> {
        let mut host = self.begin(format!("set_up {name} {up}"))?;
        host.device(&self.target, name)?.link.up = up;
        Ok(())
    }

    async fn set_mtu(&self, name: &str, mtu: u32) -> Result<(), LinksError> {
        let mut host = self.begin(format!("set_mtu {name} {mtu}"))?;
        host.device(&self.target, name)?.link.mtu = mtu;
        Ok(())
    }

    async fn set_mac(&self, name: &str, mac: MacAddress) -> Result<(), LinksError> {
        let mut host = self.begin(format!("set_mac {name} {mac}"))?;
        host.device(&self.target, name)?.link.mac = Some(mac);
        Ok(())
    }

    async fn set_master(&self, name: &str, master: Option<&str>) -> Result<(), LinksError> {
        let mut host = self.begin(format!("set_master {name} {}", master.unwrap_or("-")))?;
        host.device(&self.target, name)?;
        if let Some(master) = master {
            let bridge = host.device(&self.target, master)?;
            if bridge.link.kind != LinkKind::Bridge {
                return Err(LinksError::WrongKind {
                    name: master.to_owned(),
                    wanted: "bridge",
                });
            }
        }
        host.device(&self.target, name)?.link.master = master.map(str::to_owned);
        Ok(())
    }

    async fn set_alias(&self, name: &str, alias: Option<&str>) -> Result<(), LinksError> {
        let mut host = self.begin(format!("set_alias {name} {}", alias.unwrap_or("-")))?;
        host.device(&self.target, name)?.link.alias =
            alias.filter(|a| !a.is_empty()).map(str::to_owned);
        Ok(())
    }

    async fn disable_tx_checksum(&self, name: &str) -> Result<(), LinksError> {
        let mut host = self.begin(format!("disable_tx_checksum {name}"))?;
        host.device(&self.target, name)?.tx_checksum = false;
        Ok(())
    }

    async fn tx_checksum(&self, name: &str) -> Result<bool, LinksError> {
        let mut host = self.read()?;
        Ok(host.device(&self.target, name)?.tx_checksum)
    }

    async fn list_fdb(&self, device: &str) -> Result<Vec<FdbEntry>, LinksError> {
        let mut host = self.read()?;
        Ok(host
            .device(&self.target, device)?
            .fdb
            .iter()
            .copied()
            .collect())
    }

    async fn append_fdb(&self, device: &str, entry: &FdbEntry) -> Result<(), LinksError> {
        let dst = entry.dst.map(|d| d.to_string()).unwrap_or_default();
        let mut host = self.begin(format!("append_fdb {device} {} {dst}", entry.mac))?;
        host.device(&self.target, device)?.fdb.insert(*entry);
        Ok(())
    }

    async fn delete_fdb(&self, device: &str, entry: &FdbEntry) -> Result<(), LinksError> {
        let dst = entry.dst.map(|d| d.to_string()).unwrap_or_default();
        let mut host = self.begin(format!("delete_fdb {device} {} {dst}", entry.mac))?;
        if let Ok(d) = host.device(&self.target, device) {
            d.fdb.remove(entry);
        }
        Ok(())
    }

    async fn list_addresses(&self, device: &str) -> Result<Vec<Address>, LinksError> {
        let mut host = self.read()?;
        Ok(host
            .device(&self.target, device)?
            .addresses
            .iter()
            .copied()
            .collect())
    }

    async fn list_all_addresses(&self) -> Result<Vec<(String, Address)>, LinksError> {
        let mut host = self.read()?;
        Ok(host
            .space(&self.target)
            .devices
            .iter()
            .flat_map(|(name, d)| d.addresses.iter().map(move |a| (name.clone(), *a)))
            .collect())
    }

    async fn add_address(&self, device: &str, address: Address) -> Result<(), LinksError> {
        let mut host = self.begin(format!("add_address {device} {address}"))?;
        host.device(&self.target, device)?.addresses.insert(address);
        Ok(())
    }

    async fn delete_address(&self, device: &str, address: Address) -> Result<(), LinksError> {
        let mut host = self.begin(format!("delete_address {device} {address}"))?;
        if let Ok(d) = host.device(&self.target, device) {
            d.addresses.remove(&address);
        }
        Ok(())
    }

    async fn add_default_route(&self, gateway: IpAddr) -> Result<(), LinksError> {
        let mut host = self.begin(format!("add_default_route {gateway}"))?;
        host.space(&self.target).default_routes.insert(gateway);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(links: &[Link]) -> Vec<&str> {
        links.iter().map(|l| l.name.as_str()).collect()
    }

    #[tokio::test]
    async fn a_veth_peer_lands_in_its_namespace_and_goes_with_it() {
        let host = MemoryLinks::new();
        host.create_namespace("qdhcp-1").await.unwrap();
        let peer = VethPeer {
            name: "ns-1".into(),
            namespace: Some("qdhcp-1".into()),
        };
        host.ensure_veth("tap1", &peer).await.unwrap();
        host.ensure_veth("tap1", &peer).await.unwrap();
        let inside = host.namespace("qdhcp-1");
        assert_eq!(names(&inside.list_links().await.unwrap()), ["lo", "ns-1"]);
        assert_eq!(names(&host.list_links().await.unwrap()), ["lo", "tap1"]);

        host.delete_namespace("qdhcp-1").await.unwrap();
        assert_eq!(names(&host.list_links().await.unwrap()), ["lo"]);
        assert!(matches!(
            inside.list_links().await,
            Err(LinksError::NoSuchNamespace(_))
        ));
        host.delete_namespace("qdhcp-1").await.unwrap();
    }

    #[tokio::test]
    async fn deleting_a_bridge_frees_its_ports_and_absent_things_delete_fine() {
        let host = MemoryLinks::new();
        host.ensure_bridge("br1").await.unwrap();
        host.ensure_tap("tap1").await.unwrap();
        host.set_master("tap1", Some("br1")).await.unwrap();
        host.set_alias("tap1", Some("port-1")).await.unwrap();
        let tap = host.link("tap1").await.unwrap().unwrap();
        assert_eq!(tap.master.as_deref(), Some("br1"));
        assert_eq!(tap.alias.as_deref(), Some("port-1"));
        assert!(matches!(
            host.set_master("br1", Some("tap1")).await,
            Err(LinksError::WrongKind { .. })
        ));
        host.delete_link("br1").await.unwrap();
        host.delete_link("br1").await.unwrap();
        assert_eq!(host.link("tap1").await.unwrap().unwrap().master, None);
        assert!(matches!(
            host.ensure_bridge("tap1").await,
            Err(LinksError::WrongKind { .. })
        ));
    }

    #[tokio::test]
    async fn a_vxlan_device_is_remade_when_its_settings_change() {
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
        let mut spec = VxlanSpec {
            name: "vxlan-42".into(),
            vni: 42,
            local: "198.18.0.1".parse().unwrap(),
            underlay: "under0".into(),
            port: super::super::VXLAN_PORT,
            learning: true,
        };
        host.ensure_vxlan(&spec).await.unwrap();
        let first = host.link("vxlan-42").await.unwrap().unwrap().index;
        let flood = FdbEntry::flood("198.18.0.2".parse().unwrap());
        host.append_fdb("vxlan-42", &flood).await.unwrap();
        host.append_fdb("vxlan-42", &flood).await.unwrap();
        assert_eq!(host.list_fdb("vxlan-42").await.unwrap(), [flood]);
        host.ensure_vxlan(&spec).await.unwrap();
        assert_eq!(host.link("vxlan-42").await.unwrap().unwrap().index, first);
        spec.vni = 43;
        host.ensure_vxlan(&spec).await.unwrap();
        let remade = host.link("vxlan-42").await.unwrap().unwrap();
        assert_ne!(remade.index, first);
        assert!(matches!(
            remade.kind,
            LinkKind::Vxlan(VxlanInfo { vni: 43, .. })
        ));
        assert!(host.list_fdb("vxlan-42").await.unwrap().is_empty());
        assert!(
            host.ensure_vxlan(&VxlanSpec { vni: 0, ..spec })
                .await
                .is_err()
        );
    }

    #[tokio::test]
    async fn addresses_and_failures_are_recorded() {
        let host = MemoryLinks::new();
        let address = Address {
            ip: "10.0.0.2".parse().unwrap(),
            prefix_len: 24,
        };
        host.add_address("lo", address).await.unwrap();
        host.add_address("lo", address).await.unwrap();
        assert_eq!(host.list_addresses("lo").await.unwrap(), [address]);
        host.delete_address("lo", address).await.unwrap();
        host.delete_address("lo", address).await.unwrap();
        assert!(host.list_addresses("lo").await.unwrap().is_empty());
        host.fail_next("boom");
        assert!(host.ensure_bridge("br1").await.is_err());
        host.ensure_bridge("br1").await.unwrap();
        assert_eq!(
            host.calls().last().map(String::as_str),
            Some("ensure_bridge br1")
        );
        assert!(matches!(
            host.set_up("nope", true).await,
            Err(LinksError::NoSuchDevice(_))
        ));
    }
}
