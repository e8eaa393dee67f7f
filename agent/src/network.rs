//! The node's network reconciler: tenant networks, their ports and DHCP on this node.
//!
//! One reconcile looks at the whole node, as OVN's controller does: [`plan::desired`]
//! says from the caches what the node's network should be; the reconciler then observes
//! the host — what the [`NetworkDriver`] has wired, the taps and veths ([`Links`]), the
//! `qdhcp-…` namespaces and the dnsmasq servers ([`Dhcp`]) — and mends every difference:
//! it makes what is missing, replugs what drifted, and removes what nobody owns any more
//! (a tap whose Port is gone, a namespace whose Network is gone). It never trusts its own
//! memory, so a restarted agent adopts everything an earlier one wired without touching
//! it: devices and flows stay, and traffic between guests keeps flowing.
//!
//! Every change of a Port, Network, Node or of this node's Servers queues the one key
//! [`NODE_KEY`], so bursts of changes coalesce into one pass; the resync queues it too.
//!
//! What it writes back: each Port it wires gets `status.node` (this node), `bound` and a
//! `Bound` condition saying what it is waiting for, if anything; a Port it no longer
//! wires is released. The node's `NetworkReady` condition says whether the driver has
//! what it needs ([`NetworkHealth`]).
//!
//! Host devices Ferro makes are recognised by name *and* alias: a tap or veth named
//! `tap<uid prefix>` whose alias is that uid — for a veth into a namespace, the uid, `@`
//! and the namespace (`<port-uid>@qdhcp-<network-uid>`). A device without that pair is
//! not Ferro's and is never removed, so the agent can share a host with other tools. A
//! `qdhcp-…`/`qprobe-…` namespace is this node's only when one of its devices names it:
//! namespaces are global to a machine, and under `ferro up --nodes N` (or beside another
//! cloud's agent) the namespaces of other nodes are listed too and must be left alone.

pub mod plan;

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use ferro_api::client::Client;
use ferro_api::{Object, owners, v1};
use ferro_runtime::{Action, Reconcile, Store, condition};

use crate::dhcp::Dhcp;
use crate::links::{LinkKind, Links, VethPeer};
use crate::wiring::{NetworkDriver, Observed, WiringError};
use plan::{
    DHCP_NAMESPACE_PREFIX, Desired, Facts, PROBE_NAMESPACE_PREFIX, Place, TAP_PREFIX, WantedPort,
    tap_name,
};

/// The one key the network reconciler is queued under: it reconciles the whole node.
pub const NODE_KEY: &str = "node";

/// The name of the network reconciler's controller, in logs and metric labels.
pub const NETWORK_CONTROLLER: &str = "agent-network";

/// The condition on a Port that says whether it is plugged in.
pub const BOUND: &str = "Bound";

/// The Node condition that says whether the network driver works.
pub const NETWORK_READY: &str = "NetworkReady";

/// What the node status task reports about networking: the driver's name and the last
/// `NetworkReady` condition, shared between the reconciler and that task.
#[derive(Debug, Clone, Default)]
pub struct NetworkHealth(Arc<Mutex<Option<(String, v1::Condition)>>>);

impl NetworkHealth {
    /// The driver and its condition, once the reconciler has looked.
    pub fn get(&self) -> Option<(String, v1::Condition)> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn set(&self, driver: &str, condition: v1::Condition) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some((driver.to_owned(), condition));
    }
}

/// Why a network reconcile failed.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    /// The network driver failed.
    #[error("network driver")]
    Wiring(#[from] WiringError),
    /// A link or namespace operation failed.
    #[error("links")]
    Links(#[from] crate::links::LinksError),
    /// The DHCP seam failed.
    #[error("dhcp")]
    Dhcp(#[from] crate::dhcp::DhcpError),
    /// An API call failed.
    #[error("API")]
    Api(#[from] ferro_api::Error),
    /// Some steps failed; the others were carried out.
    #[error("{} of the node's network steps failed; first: {}", .0.len(), .0[0])]
    Steps(Vec<String>),
}

/// Reconciles this node's networks. See the module notes.
pub struct NetworkReconciler {
    /// The API, with the node's token.
    pub client: Client,
    /// This node's name.
    pub node: String,
    /// This node's tunnel endpoint.
    pub local_ip: Option<IpAddr>,
    /// Wires networks and ports.
    pub driver: Arc<dyn NetworkDriver>,
    /// Taps, veths and namespaces, in the agent's own namespace.
    pub links: Arc<dyn Links>,
    /// The DHCP servers.
    pub dhcp: Arc<dyn Dhcp>,
    /// The Servers bound to this node.
    pub servers: Store<v1::Server>,
    /// Every Port.
    pub ports: Store<v1::Port>,
    /// Every Network.
    pub networks: Store<v1::Network>,
    /// Every Node.
    pub nodes: Store<v1::Node>,
    /// Every Router: the legs of those placed here are wired like DHCP ports.
    pub routers: Store<v1::Router>,
    /// Where `NetworkReady` is published for the Node's status.
    pub health: NetworkHealth,
    /// When the insides of the node's namespaces were last checked.
    pub inside_checks: InsideChecks,
    /// The metadata listeners of isolated networks, in their DHCP namespaces (none where
    /// the node serves no metadata, as in tests on in-memory links).
    pub metadata: Option<Arc<crate::metadata::MetadataService>>,
}

/// The prefix of an isolated network's metadata listener's name.
const METADATA_LISTENER_PREFIX: &str = "dhcp-";

/// How often a pass looks inside the `qdhcp-`/`qprobe-` namespaces at devices it already
/// found in place, in [`InsideChecks`].
pub const INSIDE_CHECK_EVERY: std::time::Duration = std::time::Duration::from_secs(30);

/// When a pass last looked inside every namespace of the node.
///
/// Everything in the agent's own namespace — devices, aliases, the driver's ports and
/// flows, the namespaces themselves, dnsmasq — is listed on every pass. What is *inside*
/// a namespace (the inner veth end, its MAC, MTU and addresses) costs a few netlink calls
/// per namespace, each entering it; with hundreds of ports on a node that made every pass
/// grow with the number of ports. So a device found in place, with its alias, is looked
/// into only on a periodic pass, and a device made or repaired now always is. A hand-made
/// change inside a namespace is thus mended within [`INSIDE_CHECK_EVERY`], like Neutron's
/// OVS agent, which re-checks unchanged ports only on its periodic full sync.
#[derive(Debug)]
pub struct InsideChecks {
    every: std::time::Duration,
    last: Mutex<Option<std::time::Instant>>,
}

impl InsideChecks {
    /// Looks inside at most every `every` (zero: on every pass).
    pub fn every(every: std::time::Duration) -> InsideChecks {
        InsideChecks {
            every,
            last: Mutex::new(None),
        }
    }

    /// Whether a pass starting now should look inside every namespace.
    fn due(&self) -> bool {
        let last = *self.last.lock().unwrap_or_else(|e| e.into_inner());
        last.is_none_or(|at| at.elapsed() >= self.every)
    }

    /// Records a pass that looked inside every namespace without failing.
    fn done(&self, started: std::time::Instant) {
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = Some(started);
    }
}

/// What the host has, as far as this reconciler cares.
struct Host {
    wired: Observed,
    /// Ferro's devices in the agent's namespace: name → their alias (the owning Port's
    /// uid, with `@<namespace>` for a veth into one).
    devices: BTreeMap<String, String>,
    /// Every device name in the agent's namespace.
    names: BTreeSet<String>,
    /// Ferro's devices that are up.
    up: BTreeSet<String>,
    /// The `qdhcp-…` and `qprobe-…` namespaces.
    namespaces: BTreeSet<String>,
    /// The DHCP servers found, by Network uid.
    dhcp: BTreeSet<String>,
}

impl NetworkReconciler {
    fn facts(&self) -> Facts {
        Facts {
            node: self.node.clone(),
            local_ip: self.local_ip,
            servers: self.servers.list(),
            ports: self.ports.list(),
            networks: self.networks.list(),
            nodes: self.nodes.list(),
            routers: self.routers.list(),
        }
    }

    /// Looks at the host, beside `wired`, what the driver found.
    async fn observe(&self, wired: Observed) -> Result<Host, NetworkError> {
        let mut devices = BTreeMap::new();
        let mut names = BTreeSet::new();
        let mut up = BTreeSet::new();
        for link in self.links.list_links().await? {
            names.insert(link.name.clone());
            let ours = matches!(link.kind, LinkKind::Tun | LinkKind::Veth)
                && link.alias.as_deref().is_some_and(|alias| {
                    let (uid, _) = split_alias(alias);
                    !uid.is_empty() && tap_name(uid) == link.name
                });
            if ours && let Some(alias) = link.alias {
                if link.up {
                    up.insert(link.name.clone());
                }
                devices.insert(link.name, alias);
            }
        }
        let namespaces = self
            .links
            .list_namespaces()
            .await?
            .into_iter()
            .filter(|n| {
                n.starts_with(DHCP_NAMESPACE_PREFIX)
                    || n.starts_with(PROBE_NAMESPACE_PREFIX)
                    || n.starts_with(crate::router::plan::ROUTER_NAMESPACE_PREFIX)
            })
            .collect();
        let dhcp = self
            .dhcp
            .list()
            .await?
            .into_iter()
            .map(|d| d.network_uid)
            .collect();
        Ok(Host {
            wired,
            devices,
            names,
            up,
            namespaces,
            dhcp,
        })
    }

    /// One pass over the whole node.
    pub async fn reconcile_node(&self) -> Result<Action, NetworkError> {
        let began = std::time::Instant::now();
        let driver = self.driver.kind().as_str();
        let wired = match self.driver.prepare().await {
            Ok(wired) => wired,
            Err(e) => {
                let message = crate::images::error_chain(&e);
                self.health.set(
                    driver,
                    condition(NETWORK_READY, false, "DriverUnavailable", message.clone()),
                );
                tracing::warn!(error = %message, "the network driver is not usable");
                return Ok(Action::Requeue(std::time::Duration::from_secs(5)));
            }
        };
        self.health.set(
            driver,
            condition(
                NETWORK_READY,
                true,
                "DriverReady",
                format!("{driver} wires tenant networks"),
            ),
        );
        let prepared = began.elapsed();
        let desired = plan::desired(&self.facts());
        let host = self.observe(wired).await?;
        let observed = began.elapsed();
        let look_inside = self.inside_checks.due();
        let mut failed = Vec::new();
        let changed = self
            .converge(&desired, &host, look_inside, &mut failed)
            .await;
        let converged = began.elapsed();
        // What is bound is what the driver reports after the changes.
        let wired = if changed {
            self.driver.observe().await?
        } else {
            host.wired
        };
        let rechecked = began.elapsed();
        self.write_bindings(&desired, &wired, &mut failed).await;
        tracing::debug!(
            ports = desired.ports.len(),
            changed,
            looked_inside = look_inside,
            prepare_ms = prepared.as_millis() as u64,
            observe_ms = (observed - prepared).as_millis() as u64,
            converge_ms = (converged - observed).as_millis() as u64,
            recheck_ms = (rechecked - converged).as_millis() as u64,
            bind_ms = (began.elapsed() - rechecked).as_millis() as u64,
            "network pass"
        );
        if failed.is_empty() {
            if look_inside {
                self.inside_checks.done(began);
            }
            Ok(Action::AwaitChange)
        } else {
            Err(NetworkError::Steps(failed))
        }
    }

    /// Mends every difference between `desired` and `host`; says whether it tried to
    /// change anything (if not, `host` is still what the host has).
    async fn converge(
        &self,
        desired: &Desired,
        host: &Host,
        look_inside: bool,
        failed: &mut Vec<String>,
    ) -> bool {
        let mut changed = false;
        let mut note = |what: String, e: &dyn std::error::Error| {
            let chain = crate::images::error_chain(e);
            tracing::warn!(error = %chain, "{what} failed");
            failed.push(format!("{what}: {chain}"));
        };
        // Networks first: ports plug into them.
        for (uid, network) in &desired.networks {
            let same =
                host.wired.networks.get(uid).is_some_and(|w| {
                    w.segment_id == network.segment_id && w.peers == network.peers
                });
            if !same {
                changed = true;
                if let Err(e) = self.driver.ensure_network(network).await {
                    note(format!("wiring network {uid}"), &e);
                }
            }
        }
        for (uid, port) in &desired.ports {
            if !desired.networks.contains_key(&port.wiring.network_uid) {
                continue;
            }
            // A router's namespace is the router reconciler's to make (and to remove): a
            // leg waits for it.
            if let Place::Namespace { namespace, .. } = &port.place
                && is_router_namespace(namespace)
                && !host.namespaces.contains(namespace)
            {
                continue;
            }
            let began = std::time::Instant::now();
            match self.ensure_device(port, host, look_inside).await {
                Ok(made) => changed |= made,
                Err(e) => {
                    changed = true;
                    note(format!("making the device of port {uid}"), &e);
                    continue;
                }
            }
            let plugged = host.wired.ports.get(uid).is_some_and(|w| {
                w.attached
                    && w.network_uid == port.wiring.network_uid
                    && w.device == port.wiring.device
            });
            // A device made just now (deleted by hand, say) is plugged again.
            let fresh = !host.names.contains(&port.wiring.device);
            let made = began.elapsed();
            if !plugged || fresh {
                changed = true;
                if let Err(e) = self.driver.plug(&port.wiring).await {
                    note(format!("plugging port {uid}"), &e);
                }
                tracing::debug!(
                    port = %uid,
                    device_ms = made.as_millis() as u64,
                    plug_ms = (began.elapsed() - made).as_millis() as u64,
                    "port plugged"
                );
            }
        }
        let began = std::time::Instant::now();
        for (uid, server) in &desired.dhcp {
            if let Err(e) = self.dhcp.ensure(server).await {
                note(format!("the DHCP server of network {uid}"), &e);
            }
        }
        if let Some(metadata) = &self.metadata {
            for (uid, namespace) in &desired.metadata {
                let networks = BTreeSet::from([uid.clone()]);
                let listener = format!("{METADATA_LISTENER_PREFIX}{uid}");
                if let Err(e) = metadata.ensure(&listener, namespace, 80, networks).await {
                    note(format!("the metadata service of network {uid}"), &e);
                }
            }
            for listener in metadata.listeners(METADATA_LISTENER_PREFIX).await {
                let uid = listener
                    .strip_prefix(METADATA_LISTENER_PREFIX)
                    .unwrap_or_default();
                if !desired.metadata.contains_key(uid) {
                    metadata.stop(&listener).await;
                }
            }
        }
        if !desired.dhcp.is_empty() {
            tracing::debug!(
                servers = desired.dhcp.len(),
                dhcp_ms = began.elapsed().as_millis() as u64,
                "dhcp ensured"
            );
        }
        // Then everything nobody wants any more.
        for uid in host.wired.ports.keys() {
            if !desired.ports.contains_key(uid) {
                changed = true;
                if let Err(e) = self.driver.unplug(uid).await {
                    note(format!("unplugging port {uid}"), &e);
                }
            }
        }
        let wanted_devices: BTreeSet<&str> = desired
            .ports
            .values()
            .map(|p| p.wiring.device.as_str())
            .collect();
        for device in host.devices.keys() {
            if !wanted_devices.contains(device.as_str()) {
                changed = true;
                if let Err(e) = self.links.delete_link(device).await {
                    note(format!("removing device {device}"), &e);
                }
            }
        }
        for uid in &host.dhcp {
            if !desired.dhcp.contains_key(uid)
                && let Err(e) = self.dhcp.remove(uid).await
            {
                note(format!("removing the DHCP server of network {uid}"), &e);
            }
        }
        // Only the namespaces this node's devices lead into are its own.
        let mine: BTreeSet<&str> = host
            .devices
            .values()
            .filter_map(|alias| split_alias(alias).1)
            .collect();
        let wanted_namespaces: BTreeSet<&str> = desired
            .ports
            .values()
            .filter_map(|p| match &p.place {
                Place::Namespace { namespace, .. } => Some(namespace.as_str()),
                Place::Guest => None,
            })
            .collect();
        for namespace in &host.namespaces {
            if mine.contains(namespace.as_str())
                && !wanted_namespaces.contains(namespace.as_str())
                && !is_router_namespace(namespace)
            {
                tracing::info!(namespace, "removing a namespace nothing wants");
                // A metadata listener there holds it: it goes first.
                if let (Some(metadata), Some(uid)) = (
                    &self.metadata,
                    namespace.strip_prefix(DHCP_NAMESPACE_PREFIX),
                ) {
                    metadata
                        .stop(&format!("{METADATA_LISTENER_PREFIX}{uid}"))
                        .await;
                }
                if let Err(e) = self.links.delete_namespace(namespace).await {
                    note(format!("removing namespace {namespace}"), &e);
                }
            }
        }
        for uid in host.wired.networks.keys() {
            if !desired.networks.contains_key(uid) {
                changed = true;
                if let Err(e) = self.driver.remove_network(uid).await {
                    note(format!("unwiring network {uid}"), &e);
                }
            }
        }
        changed
    }

    /// Makes a Port's host device as it should be: a tap for a guest, or a veth into the
    /// DHCP namespace with the Port's MAC and addresses on its inner end. The inside of a
    /// namespace is looked at when the device is new or `look_inside` says so (see
    /// [`InsideChecks`]). Says whether it changed anything.
    async fn ensure_device(
        &self,
        port: &WantedPort,
        host: &Host,
        look_inside: bool,
    ) -> Result<bool, NetworkError> {
        let device = &port.wiring.device;
        let uid = &port.wiring.uid;
        let alias = match &port.place {
            Place::Guest => uid.clone(),
            Place::Namespace { namespace, .. } => format!("{uid}@{namespace}"),
        };
        let known = host.devices.get(device) == Some(&alias);
        let mut changed = !known;
        match &port.place {
            Place::Guest => {
                if !known {
                    self.links.ensure_tap(device).await?;
                }
            }
            Place::Namespace {
                namespace,
                inner,
                addresses,
            } => {
                if !host.namespaces.contains(namespace) {
                    self.links.create_namespace(namespace).await?;
                    changed = true;
                }
                if known && !changed && !look_inside {
                    return Ok(self.ensure_up(device, host).await? || changed);
                }
                let inside = self.links.namespace(namespace);
                if !known || inside.link(inner).await?.is_none() {
                    changed = true;
                    // A half-made pair (one end lost) is made again whole.
                    if host.names.contains(device) {
                        self.links.delete_link(device).await?;
                    }
                    self.links
                        .ensure_veth(
                            device,
                            &VethPeer {
                                name: inner.clone(),
                                namespace: Some(namespace.clone()),
                            },
                        )
                        .await?;
                }
                self.ensure_inner(port, inside.as_ref(), inner, addresses)
                    .await?;
            }
        }
        if !known {
            self.links.set_alias(device, Some(&alias)).await?;
            self.links.set_mtu(device, port.mtu).await?;
        }
        Ok(self.ensure_up(device, host).await? || changed)
    }

    /// Sets `device` up unless it was found up; says whether it had to.
    async fn ensure_up(&self, device: &str, host: &Host) -> Result<bool, NetworkError> {
        if host.up.contains(device) {
            return Ok(false);
        }
        self.links.set_up(device, true).await?;
        Ok(true)
    }

    /// The end of a DHCP veth inside its namespace: MAC, MTU, addresses, up, and `lo` up.
    async fn ensure_inner(
        &self,
        port: &WantedPort,
        inside: &dyn Links,
        inner: &str,
        addresses: &[ipnet::IpNet],
    ) -> Result<(), NetworkError> {
        let mac: crate::links::MacAddress = port.wiring.mac.parse()?;
        let link = crate::links::converge_device(inside, inner, mac, port.mtu, addresses).await?;
        if self.driver.needs_tx_checksum_off() && inside.tx_checksum(inner).await? {
            inside.disable_tx_checksum(inner).await?;
        }
        if !link.up {
            inside.set_up(inner, true).await?;
        }
        if !inside.link("lo").await?.is_some_and(|lo| lo.up) {
            inside.set_up("lo", true).await?;
        }
        Ok(())
    }

    /// Writes `status.node`, `bound` and `Bound` of every Port this node wires, waits for
    /// or has released; only where they differ from the cache.
    async fn write_bindings(&self, desired: &Desired, wired: &Observed, failed: &mut Vec<String>) {
        let mut writes: Vec<(String, String, String, bool, v1::Condition)> = Vec::new();
        for (uid, port) in &desired.ports {
            let attached = wired
                .ports
                .get(uid)
                .is_some_and(|w| w.attached && w.network_uid == port.wiring.network_uid);
            let bound = if attached {
                condition(
                    BOUND,
                    true,
                    "Plugged",
                    format!(
                        "plugged in on node {} as {} ({})",
                        self.node,
                        port.wiring.device,
                        self.driver.kind()
                    ),
                )
            } else {
                condition(
                    BOUND,
                    false,
                    "Plugging",
                    format!("plugging in on node {}", self.node),
                )
            };
            writes.push((
                port.project.clone(),
                port.name.clone(),
                self.node.clone(),
                attached,
                bound,
            ));
        }
        for waiting in desired.waiting.values() {
            let bound = condition(BOUND, false, waiting.reason, waiting.message.clone());
            writes.push((
                waiting.project.clone(),
                waiting.name.clone(),
                self.node.clone(),
                false,
                bound,
            ));
        }
        for port in self.ports.list() {
            let Some(m) = &port.metadata else { continue };
            let status = port.status.clone().unwrap_or_default();
            if status.node == self.node
                && !desired.ports.contains_key(&m.uid)
                && !desired.waiting.contains_key(&m.uid)
            {
                let released = condition(
                    BOUND,
                    false,
                    "Unbound",
                    format!("no longer plugged in on node {}", self.node),
                );
                writes.push((
                    m.project.clone(),
                    m.name.clone(),
                    String::new(),
                    false,
                    released,
                ));
            }
        }
        for (project, name, node, bound, cond) in writes {
            let Some(current) = self.ports.get_named(&project, &name) else {
                continue;
            };
            let status = current.status.clone().unwrap_or_default();
            let same = status.node == node
                && status.bound == bound
                && status.conditions.iter().any(|c| {
                    c.r#type == cond.r#type
                        && c.status == cond.status
                        && c.reason == cond.reason
                        && c.message == cond.message
                });
            if same {
                continue;
            }
            let object = Object::Port(v1::Port {
                metadata: current.metadata.clone(),
                spec: None,
                status: Some(v1::PortStatus {
                    node,
                    bound,
                    ..Default::default()
                }),
            });
            match self
                .client
                .update_status(object, owners::AGENT, &["node", "bound"], vec![cond])
                .await
            {
                Ok(_) | Err(ferro_api::Error::NotFound { .. }) => {}
                Err(e) => failed.push(format!("writing the binding of port {project}/{name}: {e}")),
            }
        }
    }
}

/// Removes everything the network and router reconcilers made on a node, for `ferro
/// down`: the DHCP servers under `state_dir`, and in the node's network namespace
/// (`netns`, or the caller's) every Ferro device (a tap or veth of a Port or router leg, a
/// router's gateway leg) with the namespace it leads into. Switch ports and
/// bridges go with the node's switch instance or namespace. Returns how many things it
/// removed; what is already gone is not an error.
pub async fn clear_node(
    state_dir: &std::path::Path,
    netns: Option<&str>,
) -> Result<usize, NetworkError> {
    let mut removed = 0;
    let dhcp = crate::dhcp::dnsmasq::DnsmasqDhcp::new(state_dir)?;
    for server in dhcp.list().await? {
        dhcp.remove(&server.network_uid).await?;
        removed += 1;
    }
    let links: Arc<dyn Links> = match netns {
        Some(netns) => Arc::new(crate::links::netlink::NetlinkLinks::in_namespace(netns)),
        None => Arc::new(crate::links::netlink::NetlinkLinks::new()),
    };
    let namespaces = links.list_namespaces().await?;
    for link in links.list_links().await? {
        let Some(alias) = link.alias.as_deref() else {
            continue;
        };
        let (uid, namespace) = split_alias(alias);
        let gateway_leg = crate::wiring::device_name(crate::router::plan::GATEWAY_HOST_PREFIX, uid);
        if uid.is_empty() || (tap_name(uid) != link.name && gateway_leg != link.name) {
            continue;
        }
        if let Some(namespace) = namespace
            && namespaces.iter().any(|n| n == namespace)
        {
            links.delete_namespace(namespace).await?;
            removed += 1;
        }
        links.delete_link(&link.name).await?;
        removed += 1;
    }
    // Router namespaces nothing leads into any more.
    let marks = crate::router::Marks::new(state_dir.join(crate::router::ROUTER_RECORD_DIR));
    removed += marks
        .clear(links.as_ref())
        .await
        .map_err(|e| NetworkError::Steps(vec![crate::images::error_chain(&e)]))?;
    Ok(removed)
}

/// A device alias as the uid of the Port it belongs to and the namespace its peer is in
/// (see [`crate::wiring::port_uid_of_alias`]).
fn split_alias(alias: &str) -> (&str, Option<&str>) {
    let uid = crate::wiring::port_uid_of_alias(alias);
    (uid, alias.split_once('@').map(|(_, namespace)| namespace))
}

/// Whether `namespace` is a router's (`qrouter-…`), which the router reconciler makes and
/// removes; the network reconciler only wires legs into it.
fn is_router_namespace(namespace: &str) -> bool {
    namespace.starts_with(crate::router::plan::ROUTER_NAMESPACE_PREFIX)
}

impl Reconcile<String> for NetworkReconciler {
    type Error = NetworkError;

    async fn reconcile(&self, _key: String) -> Result<Action, NetworkError> {
        self.reconcile_node().await
    }
}

/// Whether a Port changed in a way that matters to some node's wiring: anything but its
/// conditions and revision.
pub fn port_matters(old: &v1::Port, new: &v1::Port) -> bool {
    let strip = |p: &v1::Port| {
        let mut p = p.clone();
        if let Some(m) = p.metadata.as_mut() {
            m.resource_version = 0;
            m.managed_keys.clear();
        }
        if let Some(s) = p.status.as_mut() {
            s.conditions.clear();
        }
        p
    };
    strip(old) != strip(new)
}

/// The device-name prefix the reconciler owns, re-exported for tools that list them.
pub const DEVICE_PREFIX: &str = TAP_PREFIX;
