//! The kernel networking seam of the node agent: network namespaces, links (taps, veth
//! pairs, bridges, VXLAN devices), bridge FDB entries, addresses and routes, behind the
//! [`Links`] trait.
//!
//! Its callers are the Linux bridge network driver (`wiring::linuxbridge`: a bridge and a
//! VXLAN device per network, flood entries per remote node), the Server reconciler (a
//! persistent tap per Port, which QEMU then opens by name) and the DHCP and router code (a
//! `qdhcp-…`/`qrouter-…` namespace with a veth leg plugged into the network's switch).
//!
//! **Namespace targeting.** A [`Links`] value acts in one network namespace: the one the
//! agent runs in, or a named one (`/run/netns/NAME`, what `ip netns` lists). Every link,
//! address, FDB and route call acts there; [`Links::namespace`] gives another handle on the
//! same host that acts inside a named namespace instead. Namespaces themselves are
//! host-wide: [`Links::create_namespace`], [`Links::delete_namespace`] and
//! [`Links::list_namespaces`] mean the same through every handle.
//!
//! **Idempotence.** As everywhere in the agent, `ensure_*` converges on what it is given
//! and is harmless when repeated; `delete_*` of something absent is `Ok`; `set_*` of a
//! value already set is `Ok`. Callers observe ([`Links::list_links`]) before they act, and
//! do not remember what they made.
//!
//! The real driver, [`netlink::NetlinkLinks`], speaks rtnetlink, with the few calls
//! netlink cannot make (creating a tap, turning TX checksum offload off, creating a
//! namespace) made by system calls in one small module. [`memory::MemoryLinks`] is the
//! in-memory double for unit tests without root.

mod ioctl;
pub mod memory;
pub mod netlink;

use std::net::IpAddr;
use std::sync::Arc;

use async_trait::async_trait;

/// The UDP port of VXLAN (IANA), as Neutron and the kernel's `dstport 4789` use it.
pub const VXLAN_PORT: u16 = 4789;

/// An Ethernet (MAC) address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct MacAddress(pub [u8; 6]);

impl MacAddress {
    /// `00:00:00:00:00:00`: the FDB entry a VXLAN device floods broadcast, unknown
    /// unicast and multicast frames through (one per remote endpoint).
    pub const ZERO: MacAddress = MacAddress([0; 6]);
}

impl std::fmt::Display for MacAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl std::str::FromStr for MacAddress {
    type Err = LinksError;

    /// Parses `aa:bb:cc:dd:ee:ff` (either case).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = || LinksError::Invalid {
            field: "mac",
            reason: format!("{s:?} is not a MAC address like aa:bb:cc:dd:ee:ff"),
        };
        let mut bytes = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut bytes {
            let part = parts.next().ok_or_else(invalid)?;
            if part.len() != 2 {
                return Err(invalid());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| invalid())?;
        }
        if parts.next().is_some() {
            return Err(invalid());
        }
        Ok(MacAddress(bytes))
    }
}

/// What kind of device a link is, as far as Ferro cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkKind {
    /// A tap or tun device (a guest's NIC on the host side).
    Tun,
    /// One end of a veth pair.
    Veth,
    /// A Linux bridge.
    Bridge,
    /// A VXLAN device, with its settings.
    Vxlan(VxlanInfo),
    /// Anything else (loopback, a physical NIC, a dummy…), with the kernel's kind name if
    /// it gave one (`dummy`, `macvtap`), empty otherwise.
    Other(String),
}

/// The settings of a VXLAN device that Ferro sets and reads back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VxlanInfo {
    /// The VXLAN network identifier (a Network's segment ID).
    pub vni: u32,
    /// The local tunnel endpoint address, if set.
    pub local: Option<IpAddr>,
    /// The underlay device, by name, if set (and in the same namespace).
    pub underlay: Option<String>,
    /// The destination UDP port.
    pub port: u16,
    /// Whether the device learns remote MACs from received packets.
    pub learning: bool,
}

/// A network device as found in a namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    /// Its name (at most 15 bytes).
    pub name: String,
    /// Its interface index in its namespace.
    pub index: u32,
    /// What it is.
    pub kind: LinkKind,
    /// Its MAC address (none for devices without one, such as a tun).
    pub mac: Option<MacAddress>,
    /// Its MTU.
    pub mtu: u32,
    /// Whether it is administratively up (`ip link set up`).
    pub up: bool,
    /// The bridge it is a port of, by name.
    pub master: Option<String>,
    /// Its alias (`IFLA_IFALIAS`, `ip link set DEV alias TEXT`): where Ferro records the
    /// full uid of what owns a device whose name holds only a prefix of it.
    pub alias: Option<String>,
}

/// A VXLAN device to make.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VxlanSpec {
    /// The device name, e.g. `vxlan-1042`.
    pub name: String,
    /// The VXLAN network identifier, 1 to 2^24 - 1.
    pub vni: u32,
    /// The local tunnel endpoint address.
    pub local: IpAddr,
    /// The underlay device the tunnel runs over (the one holding `local`).
    pub underlay: String,
    /// The destination UDP port; [`VXLAN_PORT`] unless there is a reason.
    pub port: u16,
    /// Whether the device learns remote MACs from received packets.
    pub learning: bool,
}

/// The peer end of a veth pair to make.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VethPeer {
    /// Its name where it ends up.
    pub name: String,
    /// The named namespace it is placed in; `None` leaves it beside the first end.
    pub namespace: Option<String>,
}

/// A bridge forwarding database entry on a device (what `bridge fdb show dev DEV` lists),
/// as far as Ferro cares: a MAC and, on a VXLAN device, the remote endpoint frames for it
/// are sent to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FdbEntry {
    /// The destination MAC; [`MacAddress::ZERO`] for a flood entry.
    pub mac: MacAddress,
    /// The remote tunnel endpoint (VXLAN devices only).
    pub dst: Option<IpAddr>,
}

impl FdbEntry {
    /// The flood entry towards one remote VXLAN endpoint (`bridge fdb append
    /// 00:00:00:00:00:00 dev DEV dst IP`).
    pub fn flood(dst: IpAddr) -> FdbEntry {
        FdbEntry {
            mac: MacAddress::ZERO,
            dst: Some(dst),
        }
    }
}

/// An address on a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Address {
    /// The address.
    pub ip: IpAddr,
    /// The prefix length of its subnet (`/24`).
    pub prefix_len: u8,
}

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.ip, self.prefix_len)
    }
}

/// Why a [`Links`] call failed.
#[derive(Debug, thiserror::Error)]
pub enum LinksError {
    /// The named device does not exist in the namespace acted in.
    #[error("no device {0}")]
    NoSuchDevice(String),
    /// The named network namespace does not exist.
    #[error("no network namespace {0}")]
    NoSuchNamespace(String),
    /// A device of that name exists but is something else, so it is not replaced.
    #[error("device {name} exists and is not a {wanted}")]
    WrongKind {
        /// The device.
        name: String,
        /// What it was meant to be.
        wanted: &'static str,
    },
    /// The request is malformed (a name too long, a VNI out of range…).
    #[error("invalid {field}: {reason}")]
    Invalid {
        /// What is wrong.
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// A netlink request failed.
    #[error("netlink: {op}")]
    Netlink {
        /// What was asked, e.g. `add bridge brq3f2a9c41d0e7`.
        op: String,
        /// The kernel's (or the library's) answer.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A system call or file operation failed.
    #[error("{op}")]
    Io {
        /// What was attempted, e.g. `create tap tap3f2a9c41d0e7`.
        op: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

/// Network namespaces, links, FDB entries, addresses and routes of one host, acting in one
/// namespace. See the module notes.
#[async_trait]
pub trait Links: Send + Sync {
    /// The named namespace this handle acts in; `None` for the agent's own.
    fn target(&self) -> Option<&str>;

    /// A handle on the same host that acts inside the named namespace (which need not
    /// exist yet; calls fail with [`LinksError::NoSuchNamespace`] while it does not).
    fn namespace(&self, name: &str) -> Arc<dyn Links>;

    /// Makes a named network namespace as `ip netns add NAME` does (a bind mount at
    /// `/run/netns/NAME`), with its loopback up; `Ok` if it exists.
    async fn create_namespace(&self, name: &str) -> Result<(), LinksError>;

    /// Deletes a named network namespace as `ip netns delete NAME` does; devices in it go
    /// once nothing else holds it. `Ok` if it does not exist.
    async fn delete_namespace(&self, name: &str) -> Result<(), LinksError>;

    /// The named network namespaces, sorted.
    async fn list_namespaces(&self) -> Result<Vec<String>, LinksError>;

    /// Every device in the namespace.
    async fn list_links(&self) -> Result<Vec<Link>, LinksError>;

    /// One device, by name; `None` if absent.
    async fn link(&self, name: &str) -> Result<Option<Link>, LinksError>;

    /// Makes a persistent tap (`ip tuntap add NAME mode tap`, no packet information
    /// header) that QEMU opens by name with `-netdev tap,ifname=NAME,script=no`. `Ok` if a
    /// tap of that name exists.
    async fn ensure_tap(&self, name: &str) -> Result<(), LinksError>;

    /// Makes a veth pair: `name` here, its peer as `peer` says (moved into a named
    /// namespace and given its name there). `Ok` if `name` is a veth whose peer is found
    /// where `peer` says; a veth `name` whose peer is elsewhere is made again.
    async fn ensure_veth(&self, name: &str, peer: &VethPeer) -> Result<(), LinksError>;

    /// Makes a Linux bridge. `Ok` if a bridge of that name exists.
    async fn ensure_bridge(&self, name: &str) -> Result<(), LinksError>;

    /// Makes a VXLAN device as `spec` says; one of that name with other settings is
    /// deleted and made again (VXLAN settings cannot be changed in place).
    async fn ensure_vxlan(&self, spec: &VxlanSpec) -> Result<(), LinksError>;

    /// Deletes a device (and a veth's peer with it). `Ok` if absent.
    async fn delete_link(&self, name: &str) -> Result<(), LinksError>;

    /// Sets a device administratively up or down.
    async fn set_up(&self, name: &str, up: bool) -> Result<(), LinksError>;

    /// Sets a device's MTU.
    async fn set_mtu(&self, name: &str, mtu: u32) -> Result<(), LinksError>;

    /// Sets a device's MAC address.
    async fn set_mac(&self, name: &str, mac: MacAddress) -> Result<(), LinksError>;

    /// Makes a device a port of the bridge `master`, or of no bridge with `None`.
    async fn set_master(&self, name: &str, master: Option<&str>) -> Result<(), LinksError>;

    /// Sets a device's alias (`IFLA_IFALIAS`), or clears it with `None`.
    async fn set_alias(&self, name: &str, alias: Option<&str>) -> Result<(), LinksError>;

    /// Turns TX checksum offload off on a device (`ethtool -K DEV tx off`): a veth end in
    /// a namespace whose other end is a port of OVS's userspace datapath must fill in its
    /// own TCP/UDP checksums, or TCP fails while ping works.
    async fn disable_tx_checksum(&self, name: &str) -> Result<(), LinksError>;

    /// Whether TX checksum offload is on for a device (`ethtool -k DEV`).
    async fn tx_checksum(&self, name: &str) -> Result<bool, LinksError>;

    /// The FDB entries of a device that Ferro manages: permanent (static) entries, not
    /// the ones the kernel learned or made for the device's own address.
    async fn list_fdb(&self, device: &str) -> Result<Vec<FdbEntry>, LinksError>;

    /// Adds an FDB entry beside any others for the same MAC (`bridge fdb append … dev DEV
    /// dst IP`, permanent), so one all-zero MAC can flood to several remotes. `Ok` if
    /// present.
    async fn append_fdb(&self, device: &str, entry: &FdbEntry) -> Result<(), LinksError>;

    /// Deletes one FDB entry (`bridge fdb del … dev DEV dst IP`). `Ok` if absent.
    async fn delete_fdb(&self, device: &str, entry: &FdbEntry) -> Result<(), LinksError>;

    /// The addresses on a device (IPv4 and IPv6, including link-local ones the kernel
    /// made).
    async fn list_addresses(&self, device: &str) -> Result<Vec<Address>, LinksError>;

    /// Every address in the namespace, with the device it is on (to find, say, the device
    /// holding a node's tunnel endpoint address).
    async fn list_all_addresses(&self) -> Result<Vec<(String, Address)>, LinksError>;

    /// Adds an address to a device. `Ok` if present.
    async fn add_address(&self, device: &str, address: Address) -> Result<(), LinksError>;

    /// Deletes an address from a device. `Ok` if absent.
    async fn delete_address(&self, device: &str, address: Address) -> Result<(), LinksError>;

    /// Makes the default route (IPv4 or IPv6, by the gateway's family) go via `gateway`,
    /// replacing one via another gateway; `Ok` if it does already.
    async fn add_default_route(&self, gateway: IpAddr) -> Result<(), LinksError>;
}

/// Makes a device (a veth end inside a namespace, say) have `mac`, `mtu` and exactly
/// `addresses` (IPv6 link-local ones, which the kernel makes, are left alone); returns the
/// device as it was found, so the caller can see whether it is up.
pub async fn converge_device(
    links: &dyn Links,
    name: &str,
    mac: MacAddress,
    mtu: u32,
    addresses: &[ipnet::IpNet],
) -> Result<Link, LinksError> {
    let link = links
        .link(name)
        .await?
        .ok_or_else(|| LinksError::NoSuchDevice(name.to_owned()))?;
    if link.mac != Some(mac) {
        links.set_mac(name, mac).await?;
    }
    if link.mtu != mtu {
        links.set_mtu(name, mtu).await?;
    }
    let wanted: std::collections::BTreeSet<Address> = addresses
        .iter()
        .map(|a| Address {
            ip: a.addr(),
            prefix_len: a.prefix_len(),
        })
        .collect();
    let found: std::collections::BTreeSet<Address> = links
        .list_addresses(name)
        .await?
        .into_iter()
        .filter(|a| match a.ip {
            IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) != 0xfe80,
            IpAddr::V4(_) => true,
        })
        .collect();
    for address in wanted.difference(&found) {
        links.add_address(name, *address).await?;
    }
    for address in found.difference(&wanted) {
        links.delete_address(name, *address).await?;
    }
    Ok(link)
}

/// Checks a device name as the kernel would: 1 to 15 bytes, no `/`, whitespace or `:`.
pub fn validate_link_name(name: &str) -> Result<(), LinksError> {
    let ok = !name.is_empty()
        && name.len() <= crate::switch::MAX_INTERFACE_NAME
        && name != "."
        && name != ".."
        && !name
            .bytes()
            .any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace() || b == 0);
    if ok {
        Ok(())
    } else {
        Err(LinksError::Invalid {
            field: "name",
            reason: format!("{name:?} is not a device name of 1 to 15 bytes"),
        })
    }
}

/// Checks a namespace name as `ip netns` would: a file name under `/run/netns`.
pub fn validate_namespace_name(name: &str) -> Result<(), LinksError> {
    let ok = !name.is_empty()
        && name.len() <= 255
        && name != "."
        && name != ".."
        && !name.bytes().any(|b| b == b'/' || b == 0);
    if ok {
        Ok(())
    } else {
        Err(LinksError::Invalid {
            field: "namespace",
            reason: format!("{name:?} is not a namespace name"),
        })
    }
}

/// Checks a VXLAN network identifier: 24 bits, and not 0.
pub fn validate_vni(vni: u32) -> Result<(), LinksError> {
    if vni == 0 || vni >= 1 << 24 {
        return Err(LinksError::Invalid {
            field: "vni",
            reason: format!("{vni} is not a VXLAN network identifier (1 to 16777215)"),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_addresses_round_trip_through_text() {
        let mac: MacAddress = "FA:16:3e:00:0a:ff".parse().unwrap();
        assert_eq!(mac, MacAddress([0xfa, 0x16, 0x3e, 0, 0x0a, 0xff]));
        assert_eq!(mac.to_string(), "fa:16:3e:00:0a:ff");
        assert_eq!(MacAddress::ZERO.to_string(), "00:00:00:00:00:00");
        for bad in [
            "",
            "fa:16:3e:00:0a",
            "fa:16:3e:00:0a:ff:00",
            "fa:16:3e:0:0a:ff",
            "zz:16:3e:00:0a:ff",
        ] {
            assert!(bad.parse::<MacAddress>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn names_are_checked_as_the_kernel_would() {
        validate_link_name("brq3f2a9c41d0e7").unwrap();
        assert!(validate_link_name("brq3f2a9c41d0e7x").is_err());
        assert!(validate_link_name("").is_err());
        assert!(validate_link_name("a b").is_err());
        assert!(validate_link_name("a/b").is_err());
        validate_namespace_name("qdhcp-3f2a9c41-d0e7-4b7e-9a61-0c2d5e6f7a8b").unwrap();
        assert!(validate_namespace_name("../etc").is_err());
        assert!(validate_namespace_name("..").is_err());
    }

    #[test]
    fn vnis_are_24_bits_and_not_zero() {
        validate_vni(1).unwrap();
        validate_vni((1 << 24) - 1).unwrap();
        assert!(validate_vni(0).is_err());
        assert!(validate_vni(1 << 24).is_err());
    }
}
