//! The real [`Links`] driver: rtnetlink for links, FDB entries, addresses and routes, and
//! the `links::ioctl` module for taps, checksum offload and new namespaces.
//!
//! **How a handle reaches a namespace.** A netlink socket belongs to the network namespace
//! it was opened in, whatever thread uses it later. So every call opens its socket on a
//! short-lived thread of its own: for a named namespace, that thread first enters it
//! (`setns` on `/run/netns/NAME`), opens the socket and ends; the socket then serves the
//! call from the tokio runtime. Tap creation and ethtool calls run wholly on such a thread.
//! No thread of the runtime ever changes namespace, and no socket outlives its call, so a
//! namespace deleted and made again under the same name is never confused with the old one.
//!
//! Namespaces are made as `ip netns add` makes them: `/run/netns` a shared mount point,
//! an empty file `/run/netns/NAME`, and the namespace of a thread that unshared its network
//! namespace bind-mounted onto it; `ip netns` lists them and `ip netns exec` enters them.
//! That holds only for a process in the host's mount namespace: an agent started with `ip
//! netns exec NODE` runs in a mount namespace of its own whose mounts do not propagate back,
//! so the namespaces it made would be invisible to the host and gone with it. An agent in a
//! node namespace is started with `nsenter --net=/run/netns/NODE` instead.

use std::collections::BTreeMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use futures::TryStreamExt;
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{
    InfoData, InfoKind, InfoVeth, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::route::RouteType;
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use rtnetlink::packet_core::{
    NLM_F_ACK, NLM_F_APPEND, NLM_F_CREATE, NLM_F_REQUEST, NetlinkMessage, NetlinkPayload,
};
use rtnetlink::{
    Handle, LinkBridge, LinkMessageBuilder, LinkUnspec, LinkVeth, LinkVxlan, RouteMessageBuilder,
};

use super::{
    Address, FdbEntry, Link, LinkKind, Links, LinksError, MacAddress, VethPeer, VxlanInfo,
    VxlanSpec, ioctl, validate_link_name, validate_namespace_name, validate_vni,
};

/// Where named network namespaces are mounted (as `ip netns` keeps them).
pub const NETNS_RUN_DIR: &str = "/run/netns";

/// `NUD_PERMANENT` and `NUD_NOARP`: the state `bridge fdb append` gives a static entry.
const NUD_PERMANENT: u16 = 0x80;
const NUD_NOARP: u16 = 0x40;

/// `NSFS_MAGIC` (`linux/magic.h`): the filesystem namespace files live on.
const NSFS_MAGIC: u64 = 0x6e73_6673;

/// The netlink driver. See the module notes.
#[derive(Debug, Clone, Default)]
pub struct NetlinkLinks {
    target: Option<String>,
}

impl NetlinkLinks {
    /// A handle acting in the agent's own network namespace.
    pub fn new() -> NetlinkLinks {
        NetlinkLinks { target: None }
    }

    /// A handle of the concrete type acting inside the named namespace (what
    /// [`Links::namespace`] gives, without the trait object).
    pub fn in_namespace(name: &str) -> NetlinkLinks {
        NetlinkLinks {
            target: Some(name.to_owned()),
        }
    }

    /// Runs `work` on a thread of its own inside the target namespace.
    async fn on_thread<T, F>(&self, work: F) -> Result<T, LinksError>
    where
        T: Send + 'static,
        F: FnOnce() -> Result<T, LinksError> + Send + 'static,
    {
        on_namespace_thread(self.target.clone(), work).await
    }

    /// A netlink connection in the target namespace, for one call.
    async fn connect(&self) -> Result<Handle, LinksError> {
        let runtime = tokio::runtime::Handle::current();
        let (connection, handle) = self
            .on_thread(move || {
                // The socket registers with the runtime's reactor, from this thread.
                let _entered = runtime.enter();
                let (connection, handle, _) =
                    rtnetlink::new_connection().map_err(|source| LinksError::Io {
                        op: "open a netlink socket".into(),
                        source,
                    })?;
                Ok((connection, handle))
            })
            .await?;
        // The connection ends when the last clone of the handle is dropped.
        tokio::spawn(connection);
        Ok(handle)
    }
}

/// Runs `work` on a new thread, first moved into the named namespace (if any); the thread
/// ends with `work`, so no other code ever runs in a namespace it entered.
async fn on_namespace_thread<T, F>(namespace: Option<String>, work: F) -> Result<T, LinksError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, LinksError> + Send + 'static,
{
    let (done, result) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("ferro-netns".into())
        .spawn(move || {
            let outcome = match namespace.as_deref().map(enter_namespace) {
                Some(Err(e)) => Err(e),
                _ => work(),
            };
            let _ = done.send(outcome);
        })
        .map_err(|source| LinksError::Io {
            op: "start a namespace thread".into(),
            source,
        })?;
    result.await.map_err(|_| LinksError::Io {
        op: "namespace thread".into(),
        source: io::Error::other("the thread ended without an answer"),
    })?
}

/// Moves the calling thread into the named network namespace.
fn enter_namespace(name: &str) -> Result<(), LinksError> {
    validate_namespace_name(name)?;
    let path = Path::new(NETNS_RUN_DIR).join(name);
    let file = std::fs::File::open(&path).map_err(|source| {
        if source.kind() == io::ErrorKind::NotFound {
            LinksError::NoSuchNamespace(name.to_owned())
        } else {
            LinksError::Io {
                op: format!("open {}", path.display()),
                source,
            }
        }
    })?;
    rustix::thread::move_into_link_name_space(
        std::os::fd::AsFd::as_fd(&file),
        Some(rustix::thread::LinkNameSpaceType::Network),
    )
    .map_err(|e| LinksError::Io {
        op: format!("enter network namespace {name}"),
        source: e.into(),
    })
}

/// Makes `/run/netns` a shared mount point, as `ip netns add` does, so a namespace mounted
/// there is seen from every mount namespace (an `ip netns exec` shell included).
fn share_netns_dir() -> io::Result<()> {
    use rustix::mount::{MountPropagationFlags, mount_bind_recursive, mount_change};
    std::fs::create_dir_all(NETNS_RUN_DIR)?;
    let shared = MountPropagationFlags::SHARED | MountPropagationFlags::REC;
    match mount_change(NETNS_RUN_DIR, shared) {
        Ok(()) => Ok(()),
        // Not a mount point yet: make it one (bound onto itself), then share it.
        Err(rustix::io::Errno::INVAL) => {
            mount_bind_recursive(NETNS_RUN_DIR, NETNS_RUN_DIR)?;
            mount_change(NETNS_RUN_DIR, shared).map_err(io::Error::from)
        }
        Err(e) => Err(e.into()),
    }
}

/// Whether `path` is a network namespace bind mount (entering it works).
fn is_namespace_mount(path: &Path) -> bool {
    let Ok(file) = std::fs::File::open(path) else {
        return false;
    };
    // Namespace files live on `nsfs`; a leftover empty file is on the tmpfs of /run.
    let Ok(ns) = rustix::fs::fstatfs(&file) else {
        return false;
    };
    // `f_type` is signed on some targets and unsigned on others.
    u64::try_from(ns.f_type).ok() == Some(NSFS_MAGIC)
}

/// Makes the named namespace, on the calling thread (which it leaves in the new namespace:
/// call it only on a thread that ends afterwards). `Ok` if it exists.
fn create_namespace_on_this_thread(name: &str) -> Result<(), LinksError> {
    let path = Path::new(NETNS_RUN_DIR).join(name);
    let io_error = |op: String| move |source: io::Error| LinksError::Io { op, source };
    share_netns_dir().map_err(io_error(format!("share {NETNS_RUN_DIR}")))?;
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
    {
        Ok(_) => {}
        // Made before, or a file left by a creation that died before its mount: finish it.
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            if is_namespace_mount(&path) {
                return Ok(());
            }
        }
        Err(source) => return Err(io_error(format!("create {}", path.display()))(source)),
    }
    let made = ioctl::unshare_network_namespace()
        .and_then(|()| {
            rustix::mount::mount_bind("/proc/thread-self/ns/net", &path).map_err(io::Error::from)
        })
        .map_err(io_error(format!("create network namespace {name}")));
    if made.is_err() {
        let _ = std::fs::remove_file(&path);
    }
    made
}

/// Deletes the named namespace's mount and file. `Ok` if absent.
fn delete_namespace_now(name: &str) -> Result<(), LinksError> {
    let path: PathBuf = Path::new(NETNS_RUN_DIR).join(name);
    match rustix::mount::unmount(&path, rustix::mount::UnmountFlags::DETACH) {
        // Not mounted (a leftover file) or not there at all: nothing to undo.
        Ok(()) | Err(rustix::io::Errno::INVAL) | Err(rustix::io::Errno::NOENT) => {}
        Err(e) => {
            return Err(LinksError::Io {
                op: format!("unmount {}", path.display()),
                source: e.into(),
            });
        }
    }
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(LinksError::Io {
            op: format!("remove {}", path.display()),
            source,
        }),
    }
}

/// The errno of a failed netlink request, if the kernel gave one.
fn errno(error: &rtnetlink::Error) -> Option<i32> {
    match error {
        rtnetlink::Error::NetlinkError(message) => message.code.map(|code| -code.get()),
        _ => None,
    }
}

/// Wraps a netlink failure with what was asked.
fn failed(op: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> LinksError {
    let op = op.into();
    move |source| LinksError::Netlink {
        op,
        source: Box::new(source),
    }
}

/// A link message in the terms of [`Link`], with the names of the indexes it refers to
/// resolved through `names` (index to name, in the same namespace).
fn parse_link(message: &LinkMessage, names: &BTreeMap<u32, String>) -> Link {
    let mut link = Link {
        name: String::new(),
        index: message.header.index,
        kind: LinkKind::Other(String::new()),
        mac: None,
        mtu: 0,
        up: message.header.flags.contains(LinkFlags::Up),
        master: None,
        alias: None,
    };
    let mut kind = None;
    let mut vxlan = None;
    for attribute in &message.attributes {
        match attribute {
            LinkAttribute::IfName(name) => link.name = name.clone(),
            LinkAttribute::Mtu(mtu) => link.mtu = *mtu,
            LinkAttribute::Address(bytes) => {
                link.mac = <[u8; 6]>::try_from(bytes.as_slice()).ok().map(MacAddress)
            }
            LinkAttribute::Controller(index) => link.master = names.get(index).cloned(),
            LinkAttribute::IfAlias(alias) if !alias.is_empty() => link.alias = Some(alias.clone()),
            LinkAttribute::LinkInfo(infos) => {
                for info in infos {
                    match info {
                        LinkInfo::Kind(k) => kind = Some(k.clone()),
                        LinkInfo::Data(InfoData::Vxlan(data)) => {
                            vxlan = Some(parse_vxlan(data, names))
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    link.kind = match kind {
        Some(InfoKind::Tun) => LinkKind::Tun,
        Some(InfoKind::Veth) => LinkKind::Veth,
        Some(InfoKind::Bridge) => LinkKind::Bridge,
        Some(InfoKind::Vxlan) => LinkKind::Vxlan(vxlan.unwrap_or(VxlanInfo {
            vni: 0,
            local: None,
            underlay: None,
            port: 0,
            learning: false,
        })),
        Some(other) => LinkKind::Other(other.to_string()),
        None => LinkKind::Other(String::new()),
    };
    link
}

fn parse_vxlan(data: &[InfoVxlan], names: &BTreeMap<u32, String>) -> VxlanInfo {
    let mut info = VxlanInfo {
        vni: 0,
        local: None,
        underlay: None,
        port: 0,
        learning: false,
    };
    for attribute in data {
        match attribute {
            InfoVxlan::Id(vni) => info.vni = *vni,
            InfoVxlan::Local(ip) => info.local = Some(IpAddr::V4(*ip)),
            InfoVxlan::Local6(ip) => info.local = Some(IpAddr::V6(*ip)),
            InfoVxlan::Link(index) => info.underlay = names.get(index).cloned(),
            InfoVxlan::Port(port) => info.port = *port,
            InfoVxlan::Learning(on) => info.learning = *on,
            _ => {}
        }
    }
    info
}

/// Whether a link names others by index: a master, or a VXLAN device's underlay.
fn refers_to_other_links(message: &LinkMessage) -> bool {
    message.attributes.iter().any(|attribute| match attribute {
        LinkAttribute::Controller(_) => true,
        LinkAttribute::LinkInfo(infos) => infos
            .iter()
            .any(|info| matches!(info, LinkInfo::Data(InfoData::Vxlan(_)))),
        _ => false,
    })
}

/// The peer index of a veth (`IFLA_LINK`), if given.
fn veth_peer_index(message: &LinkMessage) -> Option<u32> {
    message.attributes.iter().find_map(|a| match a {
        LinkAttribute::Link(index) => Some(*index),
        _ => None,
    })
}

/// An address from the address attributes of a dump: bridge-family FDB entries carry raw
/// bytes.
fn neighbour_ip(address: &NeighbourAddress) -> Option<IpAddr> {
    match address {
        NeighbourAddress::Inet(ip) => Some(IpAddr::V4(*ip)),
        NeighbourAddress::Inet6(ip) => Some(IpAddr::V6(*ip)),
        NeighbourAddress::Other(bytes) => match bytes.len() {
            4 => <[u8; 4]>::try_from(bytes.as_slice())
                .ok()
                .map(|b| IpAddr::V4(Ipv4Addr::from(b))),
            16 => <[u8; 16]>::try_from(bytes.as_slice())
                .ok()
                .map(|b| IpAddr::V6(Ipv6Addr::from(b))),
            _ => None,
        },
        _ => None,
    }
}

fn neighbour_address(ip: IpAddr) -> NeighbourAddress {
    match ip {
        IpAddr::V4(ip) => NeighbourAddress::Inet(ip),
        IpAddr::V6(ip) => NeighbourAddress::Inet6(ip),
    }
}

/// The bridge-family neighbour message for an FDB entry on device `index`, as `bridge fdb`
/// sends it: static (`permanent`), on the device itself (`self`).
fn fdb_message(index: u32, entry: &FdbEntry) -> NeighbourMessage {
    let mut message = NeighbourMessage::default();
    message.header.family = AddressFamily::Bridge;
    message.header.ifindex = index;
    message.header.state = NeighbourState::Other(NUD_PERMANENT | NUD_NOARP);
    message.header.flags = NeighbourFlags::Own;
    message.header.kind = RouteType::Unspec;
    message
        .attributes
        .push(NeighbourAttribute::LinkLayerAddress(entry.mac.0.to_vec()));
    if let Some(dst) = entry.dst {
        message
            .attributes
            .push(NeighbourAttribute::Destination(neighbour_address(dst)));
    }
    message
}

/// The address of an address message: `IFA_LOCAL` where given (IPv4), `IFA_ADDRESS`
/// otherwise (IPv6).
fn message_address(message: &AddressMessage) -> Option<Address> {
    let local = message.attributes.iter().find_map(|a| match a {
        AddressAttribute::Local(ip) => Some(*ip),
        _ => None,
    });
    let address = message.attributes.iter().find_map(|a| match a {
        AddressAttribute::Address(ip) => Some(*ip),
        _ => None,
    });
    local.or(address).map(|ip| Address {
        ip,
        prefix_len: message.header.prefix_len,
    })
}

/// Sends one request that expects only an acknowledgement.
async fn acknowledged(
    handle: &mut Handle,
    message: RouteNetlinkMessage,
    flags: u16,
) -> Result<(), rtnetlink::Error> {
    let mut request = NetlinkMessage::from(message);
    request.header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
    let mut response = handle.request(request)?;
    while let Some(message) = futures::StreamExt::next(&mut response).await {
        if let NetlinkPayload::Error(error) = message.payload {
            return Err(rtnetlink::Error::NetlinkError(error));
        }
    }
    Ok(())
}

/// One call's netlink connection, with lookups by name.
struct Session {
    handle: Handle,
}

impl Session {
    /// Every link message in the namespace.
    async fn dump(&self) -> Result<Vec<LinkMessage>, LinksError> {
        self.handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(failed("list links"))
    }

    /// One link's message, by name; `None` if absent.
    async fn find(&self, name: &str) -> Result<Option<LinkMessage>, LinksError> {
        validate_link_name(name)?;
        match self
            .handle
            .link()
            .get()
            .match_name(name)
            .execute()
            .try_next()
            .await
        {
            Ok(message) => Ok(message),
            Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(failed(format!("get link {name}"))(e)),
        }
    }

    /// One link, by name, with its master and underlay resolved; `None` if absent.
    async fn link(&self, name: &str) -> Result<Option<Link>, LinksError> {
        let Some(message) = self.find(name).await? else {
            return Ok(None);
        };
        // The master and underlay are named through a full dump only when there are any.
        let names = if refers_to_other_links(&message) {
            index_names(&self.dump().await?)
        } else {
            BTreeMap::new()
        };
        Ok(Some(parse_link(&message, &names)))
    }

    /// A link's index, by name.
    async fn index(&self, name: &str) -> Result<u32, LinksError> {
        self.find(name)
            .await?
            .map(|m| m.header.index)
            .ok_or_else(|| LinksError::NoSuchDevice(name.to_owned()))
    }

    /// Applies a change to the named link.
    async fn set(
        &self,
        name: &str,
        what: &str,
        change: impl FnOnce(LinkMessageBuilder<LinkUnspec>) -> LinkMessageBuilder<LinkUnspec>,
    ) -> Result<(), LinksError> {
        let index = self.index(name).await?;
        let message = change(LinkUnspec::new_with_index(index)).build();
        self.handle
            .link()
            .set(message)
            .execute()
            .await
            .map_err(failed(format!("set {what} of {name}")))
    }

    /// Adds a link; `op` says what, for errors.
    async fn add(&self, message: LinkMessage, op: String) -> Result<(), LinksError> {
        self.handle
            .link()
            .add(message)
            .execute()
            .await
            .map_err(failed(op))
    }

    /// Deletes a link by index; `Ok` if it went meanwhile.
    async fn delete(&self, index: u32, name: &str) -> Result<(), LinksError> {
        match self.handle.link().del(index).execute().await {
            Ok(()) => Ok(()),
            Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(()),
            Err(e) => Err(failed(format!("delete link {name}"))(e)),
        }
    }

    /// The address messages of one device.
    async fn addresses(&self, device: &str) -> Result<Vec<AddressMessage>, LinksError> {
        let index = self.index(device).await?;
        self.handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute()
            .try_filter(move |m| futures::future::ready(m.header.index == index))
            .try_collect()
            .await
            .map_err(failed(format!("list addresses of {device}")))
    }
}

fn index_names(messages: &[LinkMessage]) -> BTreeMap<u32, String> {
    messages
        .iter()
        .filter_map(|m| {
            m.attributes.iter().find_map(|a| match a {
                LinkAttribute::IfName(name) => Some((m.header.index, name.clone())),
                _ => None,
            })
        })
        .collect()
}

impl NetlinkLinks {
    async fn session(&self) -> Result<Session, LinksError> {
        Ok(Session {
            handle: self.connect().await?,
        })
    }

    /// Whether `name` is a veth whose peer is `peer.name` where `peer` says.
    async fn veth_matches(
        &self,
        session: &Session,
        message: &LinkMessage,
        peer: &VethPeer,
    ) -> Result<bool, LinksError> {
        let Some(peer_index) = veth_peer_index(message) else {
            return Ok(false);
        };
        let found = match &peer.namespace {
            Some(ns) => match NetlinkLinks::in_namespace(ns).session().await {
                Ok(other) => other.find(&peer.name).await?,
                Err(LinksError::NoSuchNamespace(_)) => None,
                Err(e) => return Err(e),
            },
            None => session.find(&peer.name).await?,
        };
        Ok(found.is_some_and(|m| m.header.index == peer_index))
    }
}

#[async_trait]
impl Links for NetlinkLinks {
    fn target(&self) -> Option<&str> {
        self.target.as_deref()
    }

    fn namespace(&self, name: &str) -> Arc<dyn Links> {
        Arc::new(NetlinkLinks::in_namespace(name))
    }

    async fn create_namespace(&self, name: &str) -> Result<(), LinksError> {
        validate_namespace_name(name)?;
        let owned = name.to_owned();
        on_namespace_thread(None, move || create_namespace_on_this_thread(&owned)).await?;
        // `ip netns add` leaves loopback down; a namespace is more use with it up.
        NetlinkLinks::in_namespace(name).set_up("lo", true).await
    }

    async fn delete_namespace(&self, name: &str) -> Result<(), LinksError> {
        validate_namespace_name(name)?;
        let owned = name.to_owned();
        on_namespace_thread(None, move || delete_namespace_now(&owned)).await
    }

    async fn list_namespaces(&self) -> Result<Vec<String>, LinksError> {
        let entries = match std::fs::read_dir(NETNS_RUN_DIR) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => {
                return Err(LinksError::Io {
                    op: format!("list {NETNS_RUN_DIR}"),
                    source,
                });
            }
        };
        let mut names: Vec<String> = entries
            .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
            .collect();
        names.sort();
        Ok(names)
    }

    async fn list_links(&self) -> Result<Vec<Link>, LinksError> {
        let messages = self.session().await?.dump().await?;
        let names = index_names(&messages);
        Ok(messages.iter().map(|m| parse_link(m, &names)).collect())
    }

    async fn link(&self, name: &str) -> Result<Option<Link>, LinksError> {
        self.session().await?.link(name).await
    }

    async fn ensure_tap(&self, name: &str) -> Result<(), LinksError> {
        validate_link_name(name)?;
        match self.link(name).await? {
            Some(link) if link.kind == LinkKind::Tun => return Ok(()),
            Some(_) => {
                return Err(LinksError::WrongKind {
                    name: name.to_owned(),
                    wanted: "tap",
                });
            }
            None => {}
        }
        let owned = name.to_owned();
        self.on_thread(move || {
            ioctl::create_persistent_tap(&owned).map_err(|source| LinksError::Io {
                op: format!("create tap {owned}"),
                source,
            })
        })
        .await
    }

    async fn ensure_veth(&self, name: &str, peer: &VethPeer) -> Result<(), LinksError> {
        validate_link_name(name)?;
        validate_link_name(&peer.name)?;
        let session = self.session().await?;
        if let Some(existing) = session.find(name).await? {
            let is_veth = parse_link(&existing, &BTreeMap::new()).kind == LinkKind::Veth;
            if !is_veth {
                return Err(LinksError::WrongKind {
                    name: name.to_owned(),
                    wanted: "veth",
                });
            }
            if self.veth_matches(&session, &existing, peer).await? {
                return Ok(());
            }
            session.delete(existing.header.index, name).await?;
        }
        // The peer is made directly in its namespace (as `ip link add NAME type veth peer
        // name PEER netns NS` does): no temporary name, nothing to move afterwards.
        let namespace_file = match &peer.namespace {
            Some(ns) => {
                validate_namespace_name(ns)?;
                let path = Path::new(NETNS_RUN_DIR).join(ns);
                Some(std::fs::File::open(&path).map_err(|source| {
                    if source.kind() == io::ErrorKind::NotFound {
                        LinksError::NoSuchNamespace(ns.clone())
                    } else {
                        LinksError::Io {
                            op: format!("open {}", path.display()),
                            source,
                        }
                    }
                })?)
            }
            None => None,
        };
        let mut peer_message = LinkUnspec::new_with_name(&peer.name);
        if let Some(file) = &namespace_file {
            peer_message = peer_message.setns_by_fd(file.as_raw_fd());
        }
        let message = LinkVeth::new(name, &peer.name)
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer_message.build())))
            .build();
        let result = session
            .add(message, format!("add veth {name} peer {}", peer.name))
            .await;
        drop(namespace_file);
        result
    }

    async fn ensure_bridge(&self, name: &str) -> Result<(), LinksError> {
        validate_link_name(name)?;
        let session = self.session().await?;
        match session.link(name).await? {
            Some(link) if link.kind == LinkKind::Bridge => Ok(()),
            Some(_) => Err(LinksError::WrongKind {
                name: name.to_owned(),
                wanted: "bridge",
            }),
            None => {
                session
                    .add(LinkBridge::new(name).build(), format!("add bridge {name}"))
                    .await
            }
        }
    }

    async fn ensure_vxlan(&self, spec: &VxlanSpec) -> Result<(), LinksError> {
        validate_link_name(&spec.name)?;
        validate_link_name(&spec.underlay)?;
        validate_vni(spec.vni)?;
        let session = self.session().await?;
        let underlay = session.index(&spec.underlay).await?;
        let wanted = VxlanInfo {
            vni: spec.vni,
            local: Some(spec.local),
            underlay: Some(spec.underlay.clone()),
            port: spec.port,
            learning: spec.learning,
        };
        if let Some(existing) = session.link(&spec.name).await? {
            match existing.kind {
                LinkKind::Vxlan(found) if found == wanted => return Ok(()),
                // VXLAN settings cannot be changed in place.
                LinkKind::Vxlan(_) => session.delete(existing.index, &spec.name).await?,
                _ => {
                    return Err(LinksError::WrongKind {
                        name: spec.name.clone(),
                        wanted: "vxlan",
                    });
                }
            }
        }
        let builder = LinkVxlan::new(&spec.name, spec.vni)
            .dev(underlay)
            .port(spec.port)
            .learning(spec.learning);
        let builder = match spec.local {
            IpAddr::V4(ip) => builder.local(ip),
            IpAddr::V6(ip) => builder.local6(ip),
        };
        session
            .add(
                builder.build(),
                format!("add vxlan {} id {}", spec.name, spec.vni),
            )
            .await
    }

    async fn delete_link(&self, name: &str) -> Result<(), LinksError> {
        let session = self.session().await?;
        match session.find(name).await? {
            Some(message) => session.delete(message.header.index, name).await,
            None => Ok(()),
        }
    }

    async fn set_up(&self, name: &str, up: bool) -> Result<(), LinksError> {
        let session = self.session().await?;
        session
            .set(name, "state", |b| if up { b.up() } else { b.down() })
            .await
    }

    async fn set_mtu(&self, name: &str, mtu: u32) -> Result<(), LinksError> {
        let session = self.session().await?;
        session.set(name, "mtu", |b| b.mtu(mtu)).await
    }

    async fn set_mac(&self, name: &str, mac: MacAddress) -> Result<(), LinksError> {
        let session = self.session().await?;
        session
            .set(name, "address", |b| b.address(mac.0.to_vec()))
            .await
    }

    async fn set_master(&self, name: &str, master: Option<&str>) -> Result<(), LinksError> {
        let session = self.session().await?;
        match master {
            Some(master) => {
                let bridge = session
                    .link(master)
                    .await?
                    .ok_or_else(|| LinksError::NoSuchDevice(master.to_owned()))?;
                if bridge.kind != LinkKind::Bridge {
                    return Err(LinksError::WrongKind {
                        name: master.to_owned(),
                        wanted: "bridge",
                    });
                }
                session
                    .set(name, "master", |b| b.controller(bridge.index))
                    .await
            }
            None => session.set(name, "master", |b| b.nocontroller()).await,
        }
    }

    async fn set_alias(&self, name: &str, alias: Option<&str>) -> Result<(), LinksError> {
        let session = self.session().await?;
        let alias = alias.unwrap_or("").to_owned();
        session.set(name, "alias", |b| b.alias(alias)).await
    }

    async fn disable_tx_checksum(&self, name: &str) -> Result<(), LinksError> {
        validate_link_name(name)?;
        let owned = name.to_owned();
        self.on_thread(move || {
            ioctl::set_tx_checksum(&owned, false).map_err(|source| device_io(&owned, source))
        })
        .await
    }

    async fn tx_checksum(&self, name: &str) -> Result<bool, LinksError> {
        validate_link_name(name)?;
        let owned = name.to_owned();
        self.on_thread(move || {
            ioctl::tx_checksum(&owned).map_err(|source| device_io(&owned, source))
        })
        .await
    }

    async fn list_fdb(&self, device: &str) -> Result<Vec<FdbEntry>, LinksError> {
        let session = self.session().await?;
        let index = session.index(device).await?;
        let messages: Vec<NeighbourMessage> = session
            .handle
            .neighbours()
            .get()
            .set_address_family(AddressFamily::Bridge)
            .execute()
            .try_collect()
            .await
            .map_err(failed(format!("list fdb of {device}")))?;
        let mut entries: Vec<FdbEntry> = messages
            .iter()
            .filter(|m| {
                m.header.ifindex == index
                    && m.header.flags.contains(NeighbourFlags::Own)
                    && u16::from(m.header.state) & NUD_PERMANENT != 0
            })
            .filter_map(|m| {
                let mut mac = None;
                let mut dst = None;
                for attribute in &m.attributes {
                    match attribute {
                        NeighbourAttribute::LinkLayerAddress(bytes) => {
                            mac = <[u8; 6]>::try_from(bytes.as_slice()).ok().map(MacAddress)
                        }
                        NeighbourAttribute::Destination(address) => dst = neighbour_ip(address),
                        _ => {}
                    }
                }
                Some(FdbEntry { mac: mac?, dst })
            })
            .collect();
        entries.sort();
        entries.dedup();
        Ok(entries)
    }

    async fn append_fdb(&self, device: &str, entry: &FdbEntry) -> Result<(), LinksError> {
        let session = self.session().await?;
        let index = session.index(device).await?;
        let mut handle = session.handle.clone();
        // NLM_F_APPEND adds a remote beside the others for the same MAC; an existing
        // (MAC, dst) pair is left as it is.
        acknowledged(
            &mut handle,
            RouteNetlinkMessage::NewNeighbour(fdb_message(index, entry)),
            NLM_F_CREATE | NLM_F_APPEND,
        )
        .await
        .map_err(failed(format!("append fdb {} on {device}", entry.mac)))
    }

    async fn delete_fdb(&self, device: &str, entry: &FdbEntry) -> Result<(), LinksError> {
        let session = self.session().await?;
        let Some(message) = session.find(device).await? else {
            return Ok(());
        };
        let mut handle = session.handle.clone();
        match acknowledged(
            &mut handle,
            RouteNetlinkMessage::DelNeighbour(fdb_message(message.header.index, entry)),
            0,
        )
        .await
        {
            Ok(()) => Ok(()),
            Err(e) if errno(&e) == Some(libc::ENOENT) => Ok(()),
            Err(e) => Err(failed(format!("delete fdb {} on {device}", entry.mac))(e)),
        }
    }

    async fn list_addresses(&self, device: &str) -> Result<Vec<Address>, LinksError> {
        let session = self.session().await?;
        let mut addresses: Vec<Address> = session
            .addresses(device)
            .await?
            .iter()
            .filter_map(message_address)
            .collect();
        addresses.sort();
        Ok(addresses)
    }

    async fn list_all_addresses(&self) -> Result<Vec<(String, Address)>, LinksError> {
        let session = self.session().await?;
        let names = index_names(&session.dump().await?);
        let messages: Vec<AddressMessage> = session
            .handle
            .address()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(failed("list addresses"))?;
        let mut addresses: Vec<(String, Address)> = messages
            .iter()
            .filter_map(|m| Some((names.get(&m.header.index)?.clone(), message_address(m)?)))
            .collect();
        addresses.sort();
        Ok(addresses)
    }

    async fn add_address(&self, device: &str, address: Address) -> Result<(), LinksError> {
        let session = self.session().await?;
        let index = session.index(device).await?;
        match session
            .handle
            .address()
            .add(index, address.ip, address.prefix_len)
            .execute()
            .await
        {
            Ok(()) => Ok(()),
            Err(e) if errno(&e) == Some(libc::EEXIST) => Ok(()),
            Err(e) => Err(failed(format!("add address {address} to {device}"))(e)),
        }
    }

    async fn delete_address(&self, device: &str, address: Address) -> Result<(), LinksError> {
        let session = self.session().await?;
        if session.find(device).await?.is_none() {
            return Ok(());
        }
        let found = session
            .addresses(device)
            .await?
            .into_iter()
            .find(|m| message_address(m) == Some(address));
        let Some(message) = found else {
            return Ok(());
        };
        match session.handle.address().del(message).execute().await {
            Ok(()) => Ok(()),
            Err(e) if errno(&e) == Some(libc::EADDRNOTAVAIL) => Ok(()),
            Err(e) => Err(failed(format!("delete address {address} from {device}"))(e)),
        }
    }

    async fn add_default_route(&self, gateway: IpAddr) -> Result<(), LinksError> {
        let session = self.session().await?;
        let message = match gateway {
            IpAddr::V4(ip) => RouteMessageBuilder::<Ipv4Addr>::new().gateway(ip).build(),
            IpAddr::V6(ip) => RouteMessageBuilder::<Ipv6Addr>::new().gateway(ip).build(),
        };
        session
            .handle
            .route()
            .add(message)
            .replace()
            .execute()
            .await
            .map_err(failed(format!("add default route via {gateway}")))
    }
}

fn device_io(name: &str, source: io::Error) -> LinksError {
    if source.raw_os_error() == Some(libc::ENODEV) {
        LinksError::NoSuchDevice(name.to_owned())
    } else {
        LinksError::Io {
            op: format!("ethtool {name}"),
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fdb_messages_are_static_entries_on_the_device_itself() {
        let entry = FdbEntry::flood("198.18.0.2".parse().unwrap());
        let message = fdb_message(7, &entry);
        assert_eq!(message.header.family, AddressFamily::Bridge);
        assert_eq!(message.header.ifindex, 7);
        assert_eq!(u16::from(message.header.state), 0xc0);
        assert!(message.header.flags.contains(NeighbourFlags::Own));
        assert!(
            message
                .attributes
                .contains(&NeighbourAttribute::LinkLayerAddress(vec![0; 6]))
        );
    }

    #[test]
    fn bridge_family_destinations_are_read_from_raw_bytes() {
        assert_eq!(
            neighbour_ip(&NeighbourAddress::Other(vec![198, 18, 0, 2])),
            Some("198.18.0.2".parse().unwrap())
        );
        assert_eq!(
            neighbour_ip(&NeighbourAddress::Other(
                "fd00::2".parse::<Ipv6Addr>().unwrap().octets().to_vec()
            )),
            Some("fd00::2".parse().unwrap())
        );
        assert_eq!(neighbour_ip(&NeighbourAddress::Other(vec![1, 2])), None);
    }
}
