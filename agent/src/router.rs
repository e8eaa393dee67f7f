//! The node's router reconciler: the `qrouter-…` namespaces of the Routers placed on this
//! node, their gateway legs on the provider bridge, forwarding, routes and address
//! translation.
//!
//! What a router is on a node is [`plan::desired`]'s answer; the tenant legs (`qr-…`) are
//! wired by the network reconciler beside DHCP ports ([`crate::network`]), so tunnels and
//! switch records come from one place. This reconciler, one pass for the whole node like
//! the network one, makes the rest and mends drift:
//! - the provider bridge `br-ex` holding the node's provider interface (`--provider-interface`;
//!   under `ferro up --nodes N`, `provider0`, a link into `ferro-outside`), while some
//!   router here has a gateway — it goes with the last one, so a node without routers is
//!   as it was before the first;
//! - per router with an external address: a veth `rg-…` (on `br-ex`) / `qg-…` (inside the
//!   namespace, with the router's MAC, its external address and its floating IPs as `/32`s),
//!   and the default route to the external subnet's gateway;
//! - `net.ipv4.ip_forward=1` inside the namespace, `spec.routes`, and the `ip ferro-router`
//!   nftables table ([`nft`]) — SNAT of the tenant subnets unless `snat: false`, and a
//!   DNAT+SNAT pair per floating IP.
//!
//! Everything is read back on every pass and only what differs is changed: a rule flushed
//! by hand, an address deleted, a route removed come back on the next pass (the resync, at
//! the latest). A namespace or gateway leg of a router no longer placed here (deleted, or
//! moved away by a failover while this node was lost) is removed. A `qrouter-…` namespace
//! is this node's when it is in the node's record ([`Marks`]) or one of its devices leads
//! into it: namespaces are global to the machine under `ferro up --nodes N`. The router
//! reconciler alone makes and removes router namespaces; the network reconciler wires legs
//! into them once they exist.
//!
//! What it writes back: `Plumbed` on each Router built here (`node <name>: …`, the contract
//! of the router controller) and on each FloatingIP it maps (`node <name>: <fixedIp> via
//! router <router>: …`).

pub mod nft;
pub mod plan;

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use ferro_api::client::Client;
use ferro_api::{Object, owners, v1};
use ferro_runtime::{Action, Reconcile, Store, condition};
use ipnet::IpNet;
use tokio::io::AsyncWriteExt;

use crate::links::{Links, LinksError, VethPeer};
use plan::{
    EXTERNAL_MTU, GATEWAY_HOST_PREFIX, LEG_DEVICE_PREFIX, PROVIDER_BRIDGE, ROUTER_NAMESPACE_PREFIX,
    WantedRouter,
};

/// The one key the router reconciler is queued under.
pub const ROUTERS_KEY: &str = "routers";

/// The router reconciler's name, in logs and metric labels.
pub const ROUTER_CONTROLLER: &str = "agent-router";

/// Where, in the agent's state directory, the record of its router namespaces is kept
/// ([`Marks`]).
pub const ROUTER_RECORD_DIR: &str = "routers";

/// The condition the agent writes on Routers and FloatingIPs.
pub const PLUMBED: &str = "Plumbed";

/// How soon a router waiting for its legs (made by the network reconciler) is looked at
/// again.
const LEG_WAIT: Duration = Duration::from_secs(1);

/// Why a router pass failed.
#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    /// A link or namespace operation failed.
    #[error("links")]
    Links(#[from] LinksError),
    /// A command (`ip`, `nft`, `sysctl`) failed.
    #[error("{command}: {message}")]
    Command {
        /// What was run.
        command: String,
        /// What it said.
        message: String,
    },
    /// The record of the router namespaces this node made could not be kept.
    #[error("the record of router namespaces")]
    Record(#[from] std::io::Error),
    /// The metadata service could not listen in the router's namespace.
    #[error("the metadata service: {0}")]
    Metadata(String),
    /// Some routers failed; the others were built.
    #[error("{} of the node's router steps failed; first: {}", .0.len(), .0[0])]
    Steps(Vec<String>),
}

/// The record of the `qrouter-` namespaces this node made: an empty file per router uid in
/// a directory of the agent's state.
///
/// It is how a namespace is known to be this node's even when nothing of the node leads
/// into it any more (its legs and gateway removed first, or lost with a node that was
/// declared dead): namespaces are global to a machine, and under `ferro up --nodes N`
/// other nodes' are listed too. A namespace is recorded before it is made, bound to the
/// inode of the instance this node made (so a namespace another node of the machine made
/// under the same name, after a failover, is told apart and left alone), and forgotten
/// only once it is gone: a crash in between leaves a record, never an orphan.
#[derive(Debug, Clone)]
pub struct Marks {
    dir: std::path::PathBuf,
}

impl Marks {
    /// The record in `dir` (made when first needed).
    pub fn new(dir: impl Into<std::path::PathBuf>) -> Marks {
        Marks { dir: dir.into() }
    }

    /// Records router `uid`'s namespace.
    fn mark(&self, uid: &str) -> std::io::Result<()> {
        let path = self.dir.join(uid);
        if !path.exists() {
            std::fs::create_dir_all(&self.dir)?;
            std::fs::write(path, b"")?;
        }
        Ok(())
    }

    /// Records which namespace instance router `uid`'s is: its inode, which a namespace
    /// made again under the same name (by another node of the same machine) does not
    /// share.
    fn bind(&self, uid: &str, instance: u64) -> std::io::Result<()> {
        if self.instance(uid) != Some(instance) {
            std::fs::create_dir_all(&self.dir)?;
            std::fs::write(self.dir.join(uid), instance.to_string())?;
        }
        Ok(())
    }

    /// The namespace instance recorded for router `uid`, if one was.
    fn instance(&self, uid: &str) -> Option<u64> {
        std::fs::read_to_string(self.dir.join(uid))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Forgets router `uid`'s namespace.
    fn unmark(&self, uid: &str) -> std::io::Result<()> {
        match std::fs::remove_file(self.dir.join(uid)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// The routers whose namespaces are recorded.
    pub fn list(&self) -> std::io::Result<Vec<String>> {
        match std::fs::read_dir(&self.dir) {
            Ok(entries) => Ok(entries
                .flatten()
                .filter_map(|e| e.file_name().to_str().map(str::to_owned))
                .collect()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(e),
        }
    }

    /// Removes every recorded namespace (through `links`), then its record, for `ferro
    /// down`; returns how many it removed.
    pub async fn clear(&self, links: &dyn Links) -> Result<usize, RouterError> {
        let mut removed = 0;
        for uid in self.list()? {
            let ns = plan::router_namespace(&uid);
            let current = namespace_instance(&ns);
            if current.is_some() && self.instance(&uid).is_none_or(|r| Some(r) == current) {
                links.delete_namespace(&ns).await?;
                removed += 1;
            }
            self.unmark(&uid)?;
        }
        Ok(removed)
    }
}

/// Reconciles this node's routers. See the module notes.
pub struct RouterReconciler {
    /// The API, with the node's token.
    pub client: Client,
    /// This node's name.
    pub node: String,
    /// The interface the provider bridge holds, if this node has one.
    pub provider: Option<String>,
    /// Links and namespaces, in the agent's own namespace.
    pub links: Arc<dyn Links>,
    /// Every Router.
    pub routers: Store<v1::Router>,
    /// Every Network.
    pub networks: Store<v1::Network>,
    /// Every FloatingIP.
    pub floating_ips: Store<v1::FloatingIp>,
    /// The record of the router namespaces this node made.
    pub marks: Marks,
    /// The metadata listeners in the router namespaces.
    pub metadata: Arc<crate::metadata::MetadataService>,
}

/// The prefix of a router's metadata listener's name.
const METADATA_LISTENER_PREFIX: &str = "router-";

/// The name of a router's metadata listener.
fn metadata_listener(uid: &str) -> String {
    format!("{METADATA_LISTENER_PREFIX}{uid}")
}

/// How far a router got in one pass.
enum Built {
    /// Everything it wants is in place.
    Done(String),
    /// Part of it waits for something the API will announce (an address, a provider
    /// interface); the message says what.
    Waiting(String),
    /// It waits for its legs, which the network reconciler makes without a word to the
    /// API: look again soon.
    WaitingForLegs(String),
}

impl RouterReconciler {
    fn facts(&self) -> plan::Facts {
        plan::Facts {
            node: self.node.clone(),
            provider: self.provider.is_some(),
            routers: self.routers.list(),
            networks: self.networks.list(),
            floating_ips: self.floating_ips.list(),
        }
    }

    /// One pass over every router of the node.
    pub async fn reconcile_routers(&self) -> Result<Action, RouterError> {
        let wanted = plan::desired(&self.facts());
        let links = self.links.list_links().await?;
        let namespaces: BTreeSet<String> = self
            .links
            .list_namespaces()
            .await?
            .into_iter()
            .filter(|n| n.starts_with(ROUTER_NAMESPACE_PREFIX))
            .collect();
        let mut failed = Vec::new();
        let mut again = false;
        let gateways = wanted.values().any(|r| r.gateway.is_some());
        if let Some(provider) = &self.provider
            && gateways
            && let Err(e) = self.ensure_provider(provider).await
        {
            failed.push(format!(
                "the provider bridge {PROVIDER_BRIDGE}: {}",
                crate::images::error_chain(&e)
            ));
        }
        // Without the provider bridge no router here can be built.
        let unbuildable = failed.first().cloned();
        for router in wanted.values() {
            let outcome = match &unbuildable {
                None => self.build(router, &links, &namespaces).await,
                Some(why) => Ok(Built::Waiting(why.clone())),
            };
            let (ok, reason, detail) = match outcome {
                Ok(Built::Done(detail)) => (true, "Built", detail),
                Ok(Built::Waiting(why)) => (false, "Building", why),
                Ok(Built::WaitingForLegs(why)) => {
                    again = true;
                    (false, "Building", why)
                }
                Err(e) => {
                    let chain = crate::images::error_chain(&e);
                    tracing::warn!(router = %router.name, error = %chain, "building a router failed");
                    failed.push(format!(
                        "router {}/{}: {chain}",
                        router.project, router.name
                    ));
                    (false, "BuildFailed", chain)
                }
            };
            self.write_plumbed(router, ok, reason, &detail, &mut failed)
                .await;
        }
        self.remove_stale(&wanted, &links, &namespaces, &mut failed)
            .await;
        // The provider bridge goes with the last gateway leg, so a node without routers
        // is as it was before the first.
        if let Some(provider) = &self.provider
            && !gateways
            && links.iter().any(|l| l.name == PROVIDER_BRIDGE)
            && let Err(e) = self.release_provider(provider).await
        {
            failed.push(format!(
                "removing the provider bridge {PROVIDER_BRIDGE}: {}",
                crate::images::error_chain(&e)
            ));
        }
        if !failed.is_empty() {
            return Err(RouterError::Steps(failed));
        }
        Ok(if again {
            Action::Requeue(LEG_WAIT)
        } else {
            Action::AwaitChange
        })
    }

    /// `br-ex`, up, holding the provider interface, which is up.
    async fn ensure_provider(&self, provider: &str) -> Result<(), RouterError> {
        let bridge = self.links.link(PROVIDER_BRIDGE).await?;
        if bridge.is_none() {
            self.links.ensure_bridge(PROVIDER_BRIDGE).await?;
        }
        if !bridge.is_some_and(|b| b.up) {
            self.links.set_up(PROVIDER_BRIDGE, true).await?;
        }
        let Some(uplink) = self.links.link(provider).await? else {
            return Err(LinksError::NoSuchDevice(provider.to_owned()).into());
        };
        if uplink.master.as_deref() != Some(PROVIDER_BRIDGE) {
            self.links
                .set_master(provider, Some(PROVIDER_BRIDGE))
                .await?;
        }
        if !uplink.up {
            self.links.set_up(provider, true).await?;
        }
        Ok(())
    }

    /// Takes the provider interface out of `br-ex` and removes the bridge.
    async fn release_provider(&self, provider: &str) -> Result<(), RouterError> {
        if self
            .links
            .link(provider)
            .await?
            .is_some_and(|l| l.master.as_deref() == Some(PROVIDER_BRIDGE))
        {
            self.links.set_master(provider, None).await?;
        }
        self.links.delete_link(PROVIDER_BRIDGE).await?;
        Ok(())
    }

    /// Builds or mends one router; says whether all of it is in place.
    async fn build(
        &self,
        router: &WantedRouter,
        links: &[crate::links::Link],
        namespaces: &BTreeSet<String>,
    ) -> Result<Built, RouterError> {
        let ns = &router.namespace;
        if router.gateway.is_none() && router.legs.is_empty() {
            return Ok(Built::Waiting(router.waiting.clone().unwrap_or_else(
                || "the router has no gateway and no interfaces".into(),
            )));
        }
        // Recorded before it is made: see [`Marks`].
        self.marks.mark(&router.uid)?;
        if !namespaces.contains(ns) {
            self.links.create_namespace(ns).await?;
            // Bound only to an instance this node made: a pass that acts on a stale cache
            // (an agent resumed after its router failed over) may find the new node's
            // namespace under the same name, and must not take it for its own.
            if let Some(instance) = namespace_instance(ns) {
                self.marks.bind(&router.uid, instance)?;
            }
        }
        let inside = self.links.namespace(ns);
        if !inside.link("lo").await?.is_some_and(|lo| lo.up) {
            inside.set_up("lo", true).await?;
        }
        if let Some(gateway) = &router.gateway {
            let alias = format!("{}@{ns}", router.uid);
            let host = links.iter().find(|l| l.name == gateway.host);
            let whole = host.is_some_and(|h| h.alias.as_deref() == Some(alias.as_str()))
                && inside.link(&gateway.inner).await?.is_some();
            if !whole {
                if host.is_some() {
                    self.links.delete_link(&gateway.host).await?;
                }
                self.links
                    .ensure_veth(
                        &gateway.host,
                        &VethPeer {
                            name: gateway.inner.clone(),
                            namespace: Some(ns.clone()),
                        },
                    )
                    .await?;
                self.links.set_alias(&gateway.host, Some(&alias)).await?;
                self.links.set_mtu(&gateway.host, EXTERNAL_MTU).await?;
            }
            let host = self.links.link(&gateway.host).await?;
            if host.as_ref().and_then(|h| h.master.as_deref()) != Some(PROVIDER_BRIDGE) {
                self.links
                    .set_master(&gateway.host, Some(PROVIDER_BRIDGE))
                    .await?;
            }
            if !host.is_some_and(|h| h.up) {
                self.links.set_up(&gateway.host, true).await?;
            }
            let mut addresses = vec![gateway.address];
            addresses.extend(
                router
                    .mappings
                    .iter()
                    .filter_map(|m| IpNet::new(m.address, full_length(m.address)).ok()),
            );
            ensure_inner(
                inside.as_ref(),
                &gateway.inner,
                &gateway.mac,
                EXTERNAL_MTU,
                &addresses,
            )
            .await?;
        }
        // Legs come from the network reconciler; until they are there, routes through them
        // cannot be added.
        let mut missing = Vec::new();
        for leg in &router.legs {
            let device = crate::wiring::device_name(LEG_DEVICE_PREFIX, &leg.uid);
            if inside.link(&device).await?.is_none_or(|l| !l.up) {
                missing.push(device);
            }
        }
        ensure_forwarding(ns).await?;
        let table = (router.gateway.is_some() || !router.legs.is_empty()).then(|| nft::Table {
            gateway_device: router
                .gateway
                .as_ref()
                .map(|g| g.inner.clone())
                .unwrap_or_default(),
            snat_to: router
                .gateway
                .as_ref()
                .filter(|_| router.snat)
                .map(|g| g.address.addr()),
            subnets: router.tenant_subnets(),
            mappings: router
                .mappings
                .iter()
                .map(|m| (m.address, m.fixed_ip))
                .collect(),
            metadata: !router.legs.is_empty(),
        });
        ensure_table(ns, table.as_ref()).await?;
        if !router.legs.is_empty() {
            let networks = router.legs.iter().map(|l| l.network_uid.clone()).collect();
            self.metadata
                .ensure(
                    &metadata_listener(&router.uid),
                    ns,
                    crate::metadata::METADATA_PORT,
                    networks,
                )
                .await
                .map_err(|e| RouterError::Metadata(e.to_string()))?;
        }
        if !missing.is_empty() {
            return Ok(Built::WaitingForLegs(format!(
                "waiting for legs {} in {ns}",
                missing.join(", ")
            )));
        }
        let mut routes = router.routes.clone();
        if let Some(nexthop) = router.gateway.as_ref().and_then(|g| g.nexthop) {
            routes.insert((default_route(nexthop), nexthop));
        }
        ensure_routes(ns, &routes).await?;
        if let Some(why) = &router.waiting {
            return Ok(Built::Waiting(why.clone()));
        }
        let mut detail = format!("{ns} built with {} legs", router.legs.len());
        if let Some(g) = &router.gateway {
            detail.push_str(&format!(", gateway {}", g.address.addr()));
            if router.snat {
                detail.push_str(" (SNAT)");
            }
        }
        if !router.mappings.is_empty() {
            detail.push_str(&format!(", {} floating IPs", router.mappings.len()));
        }
        Ok(Built::Done(detail))
    }

    /// Removes the gateway legs and namespaces of routers no longer built here.
    async fn remove_stale(
        &self,
        wanted: &BTreeMap<String, WantedRouter>,
        links: &[crate::links::Link],
        namespaces: &BTreeSet<String>,
        failed: &mut Vec<String>,
    ) {
        let mut mine = BTreeSet::new();
        for link in links {
            let Some((uid, ns)) = link.alias.as_deref().and_then(|a| a.split_once('@')) else {
                continue;
            };
            if !ns.starts_with(ROUTER_NAMESPACE_PREFIX) {
                continue;
            }
            mine.insert(ns.to_owned());
            let gateway_leg = link.name == crate::wiring::device_name(GATEWAY_HOST_PREFIX, uid);
            let wanted_leg = wanted.get(uid).is_some_and(|r| r.gateway.is_some());
            if gateway_leg && !wanted_leg {
                tracing::info!(device = %link.name, "removing a gateway leg nothing wants");
                if let Err(e) = self.links.delete_link(&link.name).await {
                    failed.push(format!("removing {}: {e}", link.name));
                }
            }
        }
        match self.marks.list() {
            Ok(marked) => mine.extend(marked.iter().map(|uid| plan::router_namespace(uid))),
            Err(e) => failed.push(format!("reading the record of router namespaces: {e}")),
        }
        for listener in self.metadata.listeners(METADATA_LISTENER_PREFIX).await {
            let uid = listener
                .strip_prefix(METADATA_LISTENER_PREFIX)
                .unwrap_or_default();
            if !wanted.contains_key(uid) {
                self.metadata.stop(&listener).await;
            }
        }
        let wanted_namespaces: BTreeSet<&str> =
            wanted.values().map(|r| r.namespace.as_str()).collect();
        for ns in &mine {
            if wanted_namespaces.contains(ns.as_str()) {
                continue;
            }
            let uid = ns.strip_prefix(ROUTER_NAMESPACE_PREFIX).unwrap_or(ns);
            // Made again by another node of this machine since: not this node's copy.
            let other = self
                .marks
                .instance(uid)
                .is_some_and(|recorded| namespace_instance(ns) != Some(recorded));
            // Its metadata listener holds the namespace: it goes first.
            self.metadata.stop(&metadata_listener(uid)).await;
            if namespaces.contains(ns) && !other {
                tracing::info!(namespace = %ns, "removing a router namespace nothing wants");
                if let Err(e) = self.links.delete_namespace(ns).await {
                    failed.push(format!("removing {ns}: {e}"));
                    continue;
                }
            }
            if let Err(e) = self.marks.unmark(uid) {
                failed.push(format!("forgetting {ns}: {e}"));
            }
        }
    }

    /// Writes `Plumbed` on the Router and on the FloatingIPs it maps, where it differs.
    async fn write_plumbed(
        &self,
        router: &WantedRouter,
        ok: bool,
        reason: &str,
        detail: &str,
        failed: &mut Vec<String>,
    ) {
        let subject = format!("node {}", self.node);
        let mut writes = Vec::new();
        if let Some(current) = self.routers.get_named(&router.project, &router.name) {
            let cond = condition(PLUMBED, ok, reason, format!("{subject}: {detail}"));
            if !holds(
                current.metadata.as_ref(),
                current.status.as_ref().map(|s| &s.conditions),
                &cond,
            ) {
                writes.push((
                    Object::Router(v1::Router {
                        metadata: current.metadata.clone(),
                        spec: None,
                        status: Some(v1::RouterStatus::default()),
                    }),
                    cond,
                ));
            }
        }
        for mapping in &router.mappings {
            let Some(current) = self.floating_ips.get_named(&mapping.project, &mapping.name) else {
                continue;
            };
            let what = if ok {
                format!("{} translated to {}", mapping.address, mapping.fixed_ip)
            } else {
                detail.to_owned()
            };
            let message = format!(
                "{subject}: {} via router {}: {what}",
                mapping.fixed_ip, router.name
            );
            let cond = condition(PLUMBED, ok, reason, message);
            if !holds(
                current.metadata.as_ref(),
                current.status.as_ref().map(|s| &s.conditions),
                &cond,
            ) {
                writes.push((
                    Object::FloatingIP(v1::FloatingIp {
                        metadata: current.metadata.clone(),
                        spec: None,
                        status: Some(v1::FloatingIpStatus::default()),
                    }),
                    cond,
                ));
            }
        }
        for (object, cond) in writes {
            match self
                .client
                .update_status(object, owners::AGENT, &[], vec![cond])
                .await
            {
                Ok(_) | Err(ferro_api::Error::NotFound { .. }) => {}
                Err(e) => failed.push(format!(
                    "writing Plumbed of {}/{}: {e}",
                    router.project, router.name
                )),
            }
        }
    }
}

/// The inode of a named namespace (which namespace instance the name is bound to now).
pub(crate) fn namespace_instance(ns: &str) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    let path = std::path::Path::new(crate::links::netlink::NETNS_RUN_DIR).join(ns);
    std::fs::metadata(path).ok().map(|m| m.ino())
}

/// Whether an object's `conditions` say `cond` already, at its current generation.
fn holds(
    metadata: Option<&v1::ObjectMeta>,
    conditions: Option<&Vec<v1::Condition>>,
    cond: &v1::Condition,
) -> bool {
    let generation = metadata.map_or(0, |m| m.generation);
    ferro_runtime::condition_holds(conditions.map_or(&[], |c| c.as_slice()), cond, generation)
}

fn full_length(ip: IpAddr) -> u8 {
    if ip.is_ipv4() { 32 } else { 128 }
}

fn default_route(nexthop: IpAddr) -> IpNet {
    match nexthop {
        IpAddr::V4(_) => "0.0.0.0/0".parse().expect("a valid prefix"),
        IpAddr::V6(_) => "::/0".parse().expect("a valid prefix"),
    }
}

/// A veth end inside a router's namespace: MAC, MTU, exactly `addresses`, up.
async fn ensure_inner(
    inside: &dyn Links,
    device: &str,
    mac: &str,
    mtu: u32,
    addresses: &[IpNet],
) -> Result<(), RouterError> {
    let mac: crate::links::MacAddress = mac.parse()?;
    let link = crate::links::converge_device(inside, device, mac, mtu, addresses).await?;
    if !link.up {
        inside.set_up(device, true).await?;
    }
    Ok(())
}

/// Runs `program args` inside `ns`, feeding it `input`; its output.
///
/// `nsenter --net` enters only the network namespace. `ip netns exec` (and `ip -n`) would
/// also make a mount namespace of the child's own, in which every `/run/netns` file is a
/// mount point while it runs: a namespace deleted meanwhile, by this agent or anyone, can
/// then fail with EBUSY and stay behind.
async fn in_namespace(
    ns: &str,
    program: &str,
    args: &[&str],
    input: Option<&[u8]>,
) -> Result<String, RouterError> {
    let command = format!("{program} {}", args.join(" "));
    let mut child = tokio::process::Command::new("nsenter")
        .arg(format!(
            "--net={}",
            std::path::Path::new(crate::links::netlink::NETNS_RUN_DIR)
                .join(ns)
                .display()
        ))
        .args(["--", program])
        .args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| RouterError::Command {
            command: command.clone(),
            message: e.to_string(),
        })?;
    if let (Some(input), Some(mut stdin)) = (input, child.stdin.take()) {
        stdin
            .write_all(input)
            .await
            .map_err(|e| RouterError::Command {
                command: command.clone(),
                message: e.to_string(),
            })?;
    }
    let out = child
        .wait_with_output()
        .await
        .map_err(|e| RouterError::Command {
            command: command.clone(),
            message: e.to_string(),
        })?;
    if !out.status.success() {
        return Err(RouterError::Command {
            command: format!("in {ns}: {command}"),
            message: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `net.ipv4.ip_forward=1` inside the namespace.
async fn ensure_forwarding(ns: &str) -> Result<(), RouterError> {
    let now = in_namespace(ns, "sysctl", &["-n", "net.ipv4.ip_forward"], None).await?;
    if now.trim() != "1" {
        in_namespace(ns, "sysctl", &["-qw", "net.ipv4.ip_forward=1"], None).await?;
    }
    Ok(())
}

/// The router's table as `table` says, or none.
async fn ensure_table(ns: &str, table: Option<&nft::Table>) -> Result<(), RouterError> {
    let listed = in_namespace(ns, "nft", &["-j", "list", "table", "ip", nft::TABLE], None).await;
    let found = match &listed {
        Ok(json) => Some(nft::read(&serde_json::from_str(json).map_err(|e| {
            RouterError::Command {
                command: "nft -j list table".into(),
                message: format!("unreadable output: {e}"),
            }
        })?)),
        Err(_) => None,
    };
    let transaction = match (table, &found) {
        (Some(t), Some((rules, true))) if *rules == t.fingerprint() => return Ok(()),
        (Some(t), _) => t.replace(),
        (None, None) => return Ok(()),
        (None, Some(_)) => nft::remove(),
    };
    let json = serde_json::to_vec(&transaction).map_err(|e| RouterError::Command {
        command: "nft".into(),
        message: e.to_string(),
    })?;
    tracing::info!(namespace = ns, "replacing the router's nftables table");
    in_namespace(ns, "nft", &["-j", "-f", "-"], Some(&json)).await?;
    Ok(())
}

/// The routes with a next hop inside the namespace: exactly `wanted` (destination, via).
async fn ensure_routes(ns: &str, wanted: &BTreeSet<(IpNet, IpAddr)>) -> Result<(), RouterError> {
    #[derive(serde::Deserialize)]
    struct Route {
        dst: String,
        gateway: Option<String>,
    }
    let json = in_namespace(ns, "ip", &["-j", "-4", "route", "show"], None).await?;
    let routes: Vec<Route> = serde_json::from_str(&json).map_err(|e| RouterError::Command {
        command: "ip -j route show".into(),
        message: format!("unreadable output: {e}"),
    })?;
    let found: BTreeSet<(IpNet, IpAddr)> = routes
        .into_iter()
        .filter_map(|r| {
            let dst = if r.dst == "default" {
                "0.0.0.0/0".to_owned()
            } else if r.dst.contains('/') {
                r.dst
            } else {
                format!("{}/32", r.dst)
            };
            Some((dst.parse().ok()?, r.gateway?.parse().ok()?))
        })
        .collect();
    for (dst, via) in wanted.difference(&found) {
        let (dst, via) = (dst.to_string(), via.to_string());
        in_namespace(ns, "ip", &["route", "replace", &dst, "via", &via], None).await?;
    }
    for (dst, via) in found.difference(wanted) {
        let (dst, via) = (dst.to_string(), via.to_string());
        in_namespace(ns, "ip", &["route", "del", &dst, "via", &via], None).await?;
    }
    Ok(())
}

impl Reconcile<String> for RouterReconciler {
    type Error = RouterError;

    async fn reconcile(&self, _key: String) -> Result<Action, RouterError> {
        self.reconcile_routers().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_record_keeps_a_namespace_until_it_is_gone_and_tells_instances_apart() {
        let dir = tempfile::tempdir().unwrap();
        let marks = Marks::new(dir.path().join("routers"));
        assert!(
            marks.list().unwrap().is_empty(),
            "no record before the first router"
        );
        marks.mark("r1").unwrap();
        assert_eq!(marks.instance("r1"), None, "recorded before it is made");
        marks.bind("r1", 4026532001).unwrap();
        marks.mark("r1").unwrap();
        assert_eq!(
            marks.instance("r1"),
            Some(4026532001),
            "marking again keeps the instance"
        );
        marks.bind("r1", 4026532002).unwrap();
        assert_eq!(marks.instance("r1"), Some(4026532002));
        assert_eq!(marks.list().unwrap(), ["r1"]);
        marks.unmark("r1").unwrap();
        marks.unmark("r1").unwrap();
        assert!(marks.list().unwrap().is_empty());
    }
}
