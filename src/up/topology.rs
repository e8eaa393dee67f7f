//! The network topology of `ferro up --nodes N`: N node namespaces joined by an underlay of
//! Ferro's own, a namespace standing for the world beyond the provider network, and one
//! private Open vSwitch instance per node.
//!
//! ```text
//!  host namespace             <prefix>-underlay                 <prefix>-node-i
//!  <prefix>-ul ───veth─── host0 ┐
//!  198.18.X.1/24                br-underlay ─ node<i> ───veth─── underlay0 198.18.X.(10+i)/24
//!
//!                            <prefix>-outside
//!                            br-outside 203.0.113.1/24 ─ node<i> ───veth─── provider0 (no address)
//! ```
//!
//! The only object in the host's namespace is `<prefix>-ul` with the host's underlay
//! address: it is how the agents in their namespaces reach the apiserver, which listens
//! there too. Everything else lives in namespaces Ferro made, so the node addresses and
//! `203.0.113.1` exist nowhere else. The underlay `/24` is picked from RFC 2544's
//! benchmark space (198.18.0.0/15) at start, the first one no address or route of the host
//! overlaps, under a machine-wide lock so two clouds starting at once never pick the same.
//!
//! [`plan`] is pure: the list of [`Step`]s for a number of nodes and a prefix. [`create`]
//! runs them with `ip` (an operator-level harness, as kind drives docker), appending each
//! step to `<data-dir>/topology.json` *before* running it, so that [`teardown`] can undo
//! what was made — also after `ferro up` was SIGKILLed mid-way — by reading that record
//! back: it stops the recorded Open vSwitch instances (by PID, checked against their
//! command lines), deletes the recorded namespaces (which takes every device inside them
//! along) and the host link, tolerating what is already gone.

use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, anyhow, bail};
use ferro_agent::switch::ovs_instance::OvsInstance;
use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

/// The bridge joining the nodes' underlay ends, in `<prefix>-underlay`.
pub const UNDERLAY_BRIDGE: &str = "br-underlay";
/// The bridge joining the nodes' provider ends, in `<prefix>-outside`.
pub const OUTSIDE_BRIDGE: &str = "br-outside";
/// A node's underlay device, in its namespace: its address is the node's tunnel endpoint.
pub const NODE_UNDERLAY_DEVICE: &str = "underlay0";
/// A node's provider device, in its namespace: no address; the provider network's uplink.
pub const NODE_PROVIDER_DEVICE: &str = "provider0";
/// The underlay end of the host link, in `<prefix>-underlay`.
pub const HOST_PEER_DEVICE: &str = "host0";
/// The upstream address in `<prefix>-outside`: the provider network's gateway.
pub const OUTSIDE_ADDRESS: &str = "203.0.113.1/24";
/// Where underlay `/24`s are picked from: RFC 2544's benchmark space.
pub const UNDERLAY_SPACE: &str = "198.18.0.0/15";
/// The port of each node agent's metrics, on its underlay address.
pub const AGENT_METRICS_PORT: u16 = 9464;
/// The most nodes one cloud may have (addresses `.11` up in one `/24`).
pub const MAX_NODES: u32 = 64;
/// The longest prefix: `<prefix>-ul` must be a valid interface name (15 bytes).
pub const MAX_PREFIX_LEN: usize = 12;

/// The machine-wide lock held while an underlay is picked and its host address added.
const PICK_LOCK: &str = "/run/ferro-underlay.lock";

/// One step of building the topology. Each names everything it makes, so the record of
/// steps is all [`teardown`] needs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "step", rename_all = "kebab-case")]
pub enum Step {
    /// `ip netns add NAME`, with `lo` up inside. Undone by deleting it.
    Namespace {
        /// The namespace.
        name: String,
    },
    /// A bridge inside a namespace, up, with an address if given.
    Bridge {
        /// The namespace.
        netns: String,
        /// The bridge.
        name: String,
        /// Its address (`A.B.C.D/LEN`), if any.
        address: Option<String>,
    },
    /// A veth from the host's namespace into a bridge in a namespace, the host end with
    /// an address. Undone by deleting the host end.
    HostLink {
        /// The host end.
        name: String,
        /// Its address, `A.B.C.D/LEN`.
        address: String,
        /// The namespace of the other end.
        peer_netns: String,
        /// The other end.
        peer: String,
        /// The bridge the other end joins.
        bridge: String,
    },
    /// A veth from a bridge in one namespace to a device in another (a node's).
    Veth {
        /// The bridge's namespace.
        netns: String,
        /// The bridge end.
        name: String,
        /// The bridge it joins.
        bridge: String,
        /// The node's namespace.
        peer_netns: String,
        /// The node's end.
        peer: String,
        /// The node end's address, if any.
        peer_address: Option<String>,
        /// Whether the node end must fill in TCP checksums itself (`ethtool -K tx off`):
        /// when Open vSwitch's userspace datapath, which fills in none, sends through it.
        /// Off, segmentation offload goes too, so it is asked only where needed.
        #[serde(default)]
        tx_checksum_off: bool,
    },
    /// A private Open vSwitch instance in `dir`, inside `netns` (the host's when unset).
    /// Undone by stopping its daemons.
    Switch {
        /// The instance's directory.
        dir: PathBuf,
        /// Its namespace.
        netns: Option<String>,
    },
}

/// What `ferro up` builds for one data directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Names the namespaces and the host link.
    pub prefix: String,
    /// How many nodes; 1 runs the one agent on the host, without namespaces.
    pub nodes: u32,
    /// Whether each node gets a private Open vSwitch instance.
    pub ovs: bool,
    /// The data directory: node directories are under it.
    pub data_dir: PathBuf,
}

/// One node of a multi-node cloud, as its agent is started.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodePlan {
    /// The Node's name: `node-<i>`.
    pub name: String,
    /// The namespace it runs in: `<prefix>-node-<i>`.
    pub netns: String,
    /// Its underlay address, its tunnel endpoint.
    pub address: Ipv4Addr,
    /// Its directory: `<data-dir>/nodes/node-<i>`.
    pub dir: PathBuf,
}

impl NodePlan {
    /// The agent's state directory.
    pub fn agent_dir(&self) -> PathBuf {
        self.dir.join("agent")
    }

    /// The directory of the node's Open vSwitch instance.
    pub fn ovs_dir(&self) -> PathBuf {
        self.dir.join("ovs")
    }
}

impl Layout {
    /// Checks the prefix and the number of nodes.
    pub fn validate(&self) -> anyhow::Result<()> {
        let prefix = &self.prefix;
        let well_formed = prefix
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_lowercase())
            && prefix
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
        if !well_formed || prefix.len() > MAX_PREFIX_LEN {
            bail!(
                "name prefix {prefix:?}: lower-case letters, digits and `-`, starting with a \
                 letter, at most {MAX_PREFIX_LEN} characters"
            );
        }
        if self.nodes == 0 || self.nodes > MAX_NODES {
            bail!("--nodes {}: from 1 to {MAX_NODES}", self.nodes);
        }
        Ok(())
    }

    /// The host's end of the underlay link: `<prefix>-ul`.
    pub fn host_link(&self) -> String {
        format!("{}-ul", self.prefix)
    }

    /// `<prefix>-underlay`.
    pub fn underlay_netns(&self) -> String {
        format!("{}-underlay", self.prefix)
    }

    /// `<prefix>-outside`.
    pub fn outside_netns(&self) -> String {
        format!("{}-outside", self.prefix)
    }

    /// The Open vSwitch directory of the single node (`--nodes 1`), on the host.
    pub fn host_ovs_dir(&self) -> PathBuf {
        self.data_dir.join("ovs")
    }

    /// The nodes of a multi-node cloud (none for `--nodes 1`), on the underlay `net`.
    pub fn node_plans(&self, net: Ipv4Net) -> Vec<NodePlan> {
        if self.nodes < 2 {
            return Vec::new();
        }
        (1..=self.nodes)
            .map(|i| NodePlan {
                name: format!("node-{i}"),
                netns: format!("{}-node-{i}", self.prefix),
                address: host_in(net, 10 + i),
                dir: self.data_dir.join("nodes").join(format!("node-{i}")),
            })
            .collect()
    }
}

/// The host's address on the underlay `net`: its `.1`.
pub fn host_address(net: Ipv4Net) -> Ipv4Addr {
    host_in(net, 1)
}

fn host_in(net: Ipv4Net, n: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(net.network()) + n)
}

/// The steps that build `layout` on the underlay `net`, in order.
pub fn plan(layout: &Layout, net: Ipv4Net) -> Vec<Step> {
    let mut steps = Vec::new();
    if layout.nodes < 2 {
        if layout.ovs {
            steps.push(Step::Switch {
                dir: layout.host_ovs_dir(),
                netns: None,
            });
        }
        return steps;
    }
    let underlay = layout.underlay_netns();
    let outside = layout.outside_netns();
    let cidr = |a: Ipv4Addr| format!("{a}/{}", net.prefix_len());
    steps.push(Step::Namespace {
        name: underlay.clone(),
    });
    steps.push(Step::Bridge {
        netns: underlay.clone(),
        name: UNDERLAY_BRIDGE.into(),
        address: None,
    });
    steps.push(Step::HostLink {
        name: layout.host_link(),
        address: cidr(host_address(net)),
        peer_netns: underlay.clone(),
        peer: HOST_PEER_DEVICE.into(),
        bridge: UNDERLAY_BRIDGE.into(),
    });
    steps.push(Step::Namespace {
        name: outside.clone(),
    });
    steps.push(Step::Bridge {
        netns: outside.clone(),
        name: OUTSIDE_BRIDGE.into(),
        address: Some(OUTSIDE_ADDRESS.into()),
    });
    for (i, node) in layout.node_plans(net).into_iter().enumerate() {
        let bridge_end = format!("node{}", i + 1);
        steps.push(Step::Namespace {
            name: node.netns.clone(),
        });
        steps.push(Step::Veth {
            netns: underlay.clone(),
            name: bridge_end.clone(),
            bridge: UNDERLAY_BRIDGE.into(),
            peer_netns: node.netns.clone(),
            peer: NODE_UNDERLAY_DEVICE.into(),
            peer_address: Some(cidr(node.address)),
            // The underlay joins `br-phy` under Open vSwitch.
            tx_checksum_off: layout.ovs,
        });
        steps.push(Step::Veth {
            netns: outside.clone(),
            name: bridge_end,
            bridge: OUTSIDE_BRIDGE.into(),
            peer_netns: node.netns.clone(),
            peer: NODE_PROVIDER_DEVICE.into(),
            peer_address: None,
            // The provider link joins the kernel bridge `br-ex` under either driver.
            tx_checksum_off: false,
        });
        if layout.ovs {
            steps.push(Step::Switch {
                dir: node.ovs_dir(),
                netns: Some(node.netns.clone()),
            });
        }
    }
    steps
}

/// The first `/24` of [`UNDERLAY_SPACE`] that overlaps none of `in_use`.
pub fn pick_underlay(in_use: &[Ipv4Net]) -> Option<Ipv4Net> {
    let space: Ipv4Net = UNDERLAY_SPACE.parse().expect("a valid network");
    space.subnets(24).ok()?.find(|candidate| {
        !in_use
            .iter()
            .any(|used| used.contains(candidate) || candidate.contains(used))
    })
}

/// The IPv4 networks of the host's addresses and routes (`ip -o -4 addr`, `ip -4 route
/// show table all`), which an underlay must not overlap.
fn host_networks() -> anyhow::Result<Vec<Ipv4Net>> {
    let addresses = ip(&["-o", "-4", "addr", "show"])?;
    let routes = ip(&["-4", "route", "show", "table", "all"])?;
    Ok(parse_networks(&addresses, &routes))
}

/// The networks named in `ip -o -4 addr` output (the word after `inet`) and in `ip -4
/// route` output (each line's first word, a bare address being a /32); `default` and
/// unparsable words are skipped.
pub fn parse_networks(addresses: &str, routes: &str) -> Vec<Ipv4Net> {
    let mut networks = Vec::new();
    for line in addresses.lines() {
        let mut words = line.split_whitespace();
        if words.by_ref().any(|w| w == "inet")
            && let Some(net) = words.next().and_then(|w| w.parse::<Ipv4Net>().ok())
        {
            networks.push(net.trunc());
        }
    }
    for line in routes.lines() {
        // `local 127.0.0.1 dev lo table local …`, `broadcast …`: the type comes first.
        let mut words = line
            .split_whitespace()
            .skip_while(|w| matches!(*w, "local" | "broadcast" | "unicast" | "multicast"));
        let Some(word) = words.next() else { continue };
        let net = word
            .parse::<Ipv4Net>()
            .ok()
            .or_else(|| word.parse::<Ipv4Addr>().ok().map(Ipv4Net::from));
        if let Some(net) = net {
            networks.push(net.trunc());
        }
    }
    networks
}

/// The record of what was built for a data directory: `<data-dir>/topology.json`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// The underlay network, once picked (`198.18.X.0/24`).
    pub underlay: Option<String>,
    /// Every step begun, in order (the last may not have finished).
    pub steps: Vec<Step>,
}

/// Where the record of a data directory lives.
pub fn record_path(data_dir: &Path) -> PathBuf {
    data_dir.join("topology.json")
}

impl Record {
    /// The record of a data directory; `None` when there is none.
    pub fn load(data_dir: &Path) -> anyhow::Result<Option<Record>> {
        let path = record_path(data_dir);
        match std::fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str(&text)
                .map(Some)
                .with_context(|| format!("cannot read {}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
        }
    }

    /// Writes the record, durably, before what it names is made.
    fn save(&self, data_dir: &Path) -> anyhow::Result<()> {
        let path = record_path(data_dir);
        let partial = path.with_extension("json.partial");
        let text = serde_json::to_string_pretty(self)?;
        let mut file = File::create(&partial)
            .with_context(|| format!("cannot write {}", partial.display()))?;
        std::io::Write::write_all(&mut file, text.as_bytes())?;
        file.sync_all()?;
        std::fs::rename(&partial, &path)
            .with_context(|| format!("cannot write {}", path.display()))?;
        Ok(())
    }
}

/// What [`create`] built.
#[derive(Clone, Debug)]
pub struct Built {
    /// The underlay network (unused with one node).
    pub underlay: Ipv4Net,
    /// The nodes of a multi-node cloud.
    pub nodes: Vec<NodePlan>,
    /// The switch instances that started.
    pub switches: Vec<OvsInstance>,
}

/// How often [`keep_switches_running`] looks at the switch instances.
const SWITCH_CHECK: std::time::Duration = std::time::Duration::from_secs(5);

/// Starts again, every few seconds, any of `switches` whose daemons died: they detach
/// from `ferro up`, so its supervisor does not see them exit. Runs until dropped.
pub async fn keep_switches_running(switches: Vec<OvsInstance>) {
    loop {
        tokio::time::sleep(SWITCH_CHECK).await;
        for switch in &switches {
            if switch.is_running() {
                continue;
            }
            tracing::warn!(
                "the Open vSwitch instance in {} is not running; starting it again",
                switch.dir().display()
            );
            if let Err(e) = switch.start().await {
                let e = anyhow::Error::from(e);
                tracing::warn!("cannot start {}: {e:#}", switch.dir().display());
            }
        }
    }
}

/// Builds the topology of `layout`, recording each step before it runs. A switch that
/// cannot start (Open vSwitch not installed) is logged and skipped: its node still
/// starts, and its agent reports the missing switch on its Node. Call [`teardown`] first
/// to remove what an earlier run left.
pub async fn create(layout: &Layout) -> anyhow::Result<Built> {
    layout.validate()?;
    let mut record = Record::default();
    let mut switches = Vec::new();
    if layout.nodes < 2 {
        let placeholder: Ipv4Net = UNDERLAY_SPACE.parse().expect("a valid network");
        for step in plan(layout, placeholder) {
            refuse_existing(&step, layout)?;
            record.steps.push(step.clone());
            record.save(&layout.data_dir)?;
            switches.extend(run_step(&step).await?);
        }
        return Ok(Built {
            underlay: placeholder,
            nodes: Vec::new(),
            switches,
        });
    }
    // Held until the host address exists, so a cloud starting beside this one sees it.
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(PICK_LOCK)
        .with_context(|| format!("cannot open {PICK_LOCK}"))?;
    lock.lock()
        .with_context(|| format!("cannot lock {PICK_LOCK}"))?;
    let net = pick_underlay(&host_networks()?)
        .ok_or_else(|| anyhow!("every /24 of {UNDERLAY_SPACE} is in use on this host"))?;
    record.underlay = Some(net.to_string());
    let mut locked = Some(lock);
    for step in plan(layout, net) {
        refuse_existing(&step, layout)?;
        record.steps.push(step.clone());
        record.save(&layout.data_dir)?;
        switches.extend(run_step(&step).await?);
        if matches!(step, Step::HostLink { .. }) {
            drop(locked.take());
        }
    }
    Ok(Built {
        underlay: net,
        nodes: layout.node_plans(net),
        switches,
    })
}

/// Fails if what `step` would make exists already: it is not this data directory's (its
/// own was torn down before), and recording it would have the teardown remove another
/// cloud's namespace or link.
fn refuse_existing(step: &Step, layout: &Layout) -> anyhow::Result<()> {
    let taken = match step {
        Step::Namespace { name } => netns_exists(name).then(|| format!("namespace {name}")),
        Step::HostLink { name, .. } => link_exists(name).then(|| format!("link {name}")),
        Step::Bridge { .. } | Step::Veth { .. } | Step::Switch { .. } => None,
    };
    match taken {
        Some(what) => bail!(
            "{what} exists already, and not for {}: another cloud runs with the name prefix \
             {:?}? Choose another with --name-prefix",
            layout.data_dir.display(),
            layout.prefix
        ),
        None => Ok(()),
    }
}

/// Runs one step; returns the switch instance it started, if it started one.
async fn run_step(step: &Step) -> anyhow::Result<Option<OvsInstance>> {
    match step {
        Step::Namespace { name } => {
            ip(&["netns", "add", name])?;
            ip(&["-n", name, "link", "set", "lo", "up"])?;
        }
        Step::Bridge {
            netns,
            name,
            address,
        } => {
            ip(&["-n", netns, "link", "add", name, "type", "bridge"])?;
            if let Some(address) = address {
                ip(&["-n", netns, "addr", "add", address, "dev", name])?;
            }
            ip(&["-n", netns, "link", "set", name, "up"])?;
        }
        Step::HostLink {
            name,
            address,
            peer_netns,
            peer,
            bridge,
        } => {
            ip(&[
                "link", "add", name, "type", "veth", "peer", "name", peer, "netns", peer_netns,
            ])?;
            ip(&[
                "-n", peer_netns, "link", "set", peer, "master", bridge, "up",
            ])?;
            ip(&["addr", "add", address, "dev", name])?;
            ip(&["link", "set", name, "up"])?;
            // The host's TCP to the agents may end in Open vSwitch's userspace datapath
            // (on br-phy), which fills in no checksum left to an offload.
            let done = Command::new("ethtool")
                .args(["-K", name, "tx", "off"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if !done {
                tracing::warn!("cannot turn off tx checksum offload on {name}");
            }
        }
        Step::Veth {
            netns,
            name,
            bridge,
            peer_netns,
            peer,
            peer_address,
            tx_checksum_off,
        } => {
            ip(&[
                "-n", netns, "link", "add", name, "type", "veth", "peer", "name", peer, "netns",
                peer_netns,
            ])?;
            ip(&["-n", netns, "link", "set", name, "master", bridge, "up"])?;
            if let Some(address) = peer_address {
                ip(&["-n", peer_netns, "addr", "add", address, "dev", peer])?;
            }
            ip(&["-n", peer_netns, "link", "set", peer, "up"])?;
            // A veth end in a namespace that Open vSwitch's userspace datapath sends
            // through must not leave TCP checksums to an offload nobody performs.
            if *tx_checksum_off {
                checksum_offload_off(peer_netns, peer);
            }
        }
        Step::Switch { dir, netns } => {
            let mut instance = OvsInstance::new(dir);
            if let Some(netns) = netns {
                instance = instance.in_netns(netns);
            }
            match instance.start().await {
                Ok(()) => {
                    if let Some(netns) = netns {
                        underlay_on_br_phy(&instance, netns).await?;
                    }
                    return Ok(Some(instance));
                }
                Err(e) => {
                    let e = anyhow::Error::from(e);
                    tracing::warn!(
                        "cannot start the Open vSwitch instance in {}: {e:#}; the node starts \
                         without it",
                        dir.display()
                    );
                }
            }
        }
    }
    Ok(None)
}

/// The bridge of a node's Open vSwitch instance that holds its underlay NIC and address.
pub const PHYSICAL_BRIDGE: &str = "br-phy";

/// Puts a node's underlay NIC on `br-phy` and its address on `br-phy` itself: Open
/// vSwitch's userspace datapath sends VXLAN packets only from an address on one of its
/// own bridges (as OVS-DPDK's userspace tunnelling needs), so a plain veth holding it
/// would leave every tunnel dead. Harmless when done already.
async fn underlay_on_br_phy(instance: &OvsInstance, netns: &str) -> anyhow::Result<()> {
    use ferro_agent::switch::{PortKind, PortSpec, Switch};
    let switch = ferro_agent::switch::ovs::OvsSwitch::new(instance.switch_config());
    switch.ensure_bridge(PHYSICAL_BRIDGE).await?;
    switch
        .ensure_port(&PortSpec {
            bridge: PHYSICAL_BRIDGE.into(),
            name: NODE_UNDERLAY_DEVICE.into(),
            kind: PortKind::System,
            tag: None,
            external_ids: Default::default(),
        })
        .await?;
    let out = Command::new("ip")
        .args([
            "-n",
            netns,
            "-o",
            "-4",
            "addr",
            "show",
            "dev",
            NODE_UNDERLAY_DEVICE,
        ])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let addresses: Vec<&str> = text
        .split_whitespace()
        .zip(text.split_whitespace().skip(1))
        .filter(|(key, _)| *key == "inet")
        .map(|(_, cidr)| cidr)
        .collect();
    for cidr in addresses {
        ip(&[
            "-n",
            netns,
            "addr",
            "del",
            cidr,
            "dev",
            NODE_UNDERLAY_DEVICE,
        ])?;
        ip(&["-n", netns, "addr", "replace", cidr, "dev", PHYSICAL_BRIDGE])?;
    }
    ip(&["-n", netns, "link", "set", PHYSICAL_BRIDGE, "up"])?;
    // The node's own TCP (to the apiserver) now leaves through this internal port, into
    // the userspace datapath, which fills in no offloaded checksum.
    checksum_offload_off(netns, PHYSICAL_BRIDGE);
    Ok(())
}

fn checksum_offload_off(netns: &str, device: &str) {
    let done = Command::new("ip")
        .args(["netns", "exec", netns, "ethtool", "-K", device, "tx", "off"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !done {
        tracing::warn!("cannot turn off tx checksum offload on {device} in {netns}");
    }
}

/// Undoes what the record of `data_dir` names, last step first, tolerating what is gone,
/// then removes the record. Stops only Open vSwitch daemons whose command line names
/// their recorded directory; deletes only recorded namespaces and links. Returns how
/// many objects it removed.
pub fn teardown(data_dir: &Path) -> anyhow::Result<usize> {
    let Some(record) = Record::load(data_dir)? else {
        return Ok(0);
    };
    let mut removed = 0;
    let mut failures = String::new();
    for step in record.steps.iter().rev() {
        let outcome = match step {
            Step::Switch { dir, .. } => {
                let instance = OvsInstance::new(dir);
                let running = ["ovsdb-server", "ovs-vswitchd"]
                    .iter()
                    .any(|daemon| instance.pid(daemon).is_some());
                instance
                    .stop()
                    .map(|()| running)
                    .map_err(anyhow::Error::from)
            }
            Step::HostLink { name, .. } => remove_if(
                link_exists(name),
                || ip(&["link", "del", name]),
                || link_exists(name),
            ),
            Step::Namespace { name } => remove_if(
                netns_exists(name),
                || ip(&["netns", "del", name]),
                || netns_exists(name),
            ),
            // Inside a namespace: gone with it.
            Step::Bridge { .. } | Step::Veth { .. } => Ok(false),
        };
        match outcome {
            Ok(true) => removed += 1,
            Ok(false) => {}
            Err(e) => {
                let _ = writeln!(failures, "  {step:?}: {e:#}");
            }
        }
    }
    if !failures.is_empty() {
        bail!(
            "could not remove all of {}:\n{failures}",
            record_path(data_dir).display()
        );
    }
    std::fs::remove_file(record_path(data_dir))
        .with_context(|| format!("cannot remove {}", record_path(data_dir).display()))?;
    Ok(removed)
}

/// Runs `remove` when `present`; succeeds when `still_there` says it is gone.
fn remove_if(
    present: bool,
    remove: impl FnOnce() -> anyhow::Result<String>,
    still_there: impl FnOnce() -> bool,
) -> anyhow::Result<bool> {
    if !present {
        return Ok(false);
    }
    let outcome = remove();
    if still_there() {
        outcome?;
        bail!("still there after removal");
    }
    Ok(true)
}

/// Whether a named network namespace exists.
pub fn netns_exists(name: &str) -> bool {
    Path::new("/run/netns").join(name).exists()
}

/// Whether a link exists in the host's namespace.
pub fn link_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

/// Runs `ip` with `args`; its stdout, or an error with its stderr.
fn ip(args: &[&str]) -> anyhow::Result<String> {
    let output = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("cannot run ip")?;
    if !output.status.success() {
        bail!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(nodes: u32, ovs: bool) -> Layout {
        Layout {
            prefix: "ft1".into(),
            nodes,
            ovs,
            data_dir: "/d".into(),
        }
    }

    fn net() -> Ipv4Net {
        "198.18.7.0/24".parse().unwrap()
    }

    #[test]
    fn one_node_is_the_host_with_at_most_a_switch() {
        assert_eq!(
            plan(&layout(1, true), net()),
            vec![Step::Switch {
                dir: "/d/ovs".into(),
                netns: None
            }]
        );
        assert_eq!(plan(&layout(1, false), net()), vec![]);
        assert!(layout(1, true).node_plans(net()).is_empty());
    }

    #[test]
    fn several_nodes_get_namespaces_an_underlay_and_an_outside() {
        let steps = plan(&layout(2, true), net());
        let ns = |n: &str| Step::Namespace { name: n.into() };
        let underlay = |i: u32, a: &str| Step::Veth {
            netns: "ft1-underlay".into(),
            name: format!("node{i}"),
            bridge: "br-underlay".into(),
            peer_netns: format!("ft1-node-{i}"),
            peer: "underlay0".into(),
            peer_address: Some(a.into()),
            tx_checksum_off: true,
        };
        let outside = |i: u32| Step::Veth {
            netns: "ft1-outside".into(),
            name: format!("node{i}"),
            bridge: "br-outside".into(),
            peer_netns: format!("ft1-node-{i}"),
            peer: "provider0".into(),
            peer_address: None,
            tx_checksum_off: false,
        };
        let switch = |i: u32| Step::Switch {
            dir: format!("/d/nodes/node-{i}/ovs").into(),
            netns: Some(format!("ft1-node-{i}")),
        };
        assert_eq!(
            steps,
            vec![
                ns("ft1-underlay"),
                Step::Bridge {
                    netns: "ft1-underlay".into(),
                    name: "br-underlay".into(),
                    address: None
                },
                Step::HostLink {
                    name: "ft1-ul".into(),
                    address: "198.18.7.1/24".into(),
                    peer_netns: "ft1-underlay".into(),
                    peer: "host0".into(),
                    bridge: "br-underlay".into(),
                },
                ns("ft1-outside"),
                Step::Bridge {
                    netns: "ft1-outside".into(),
                    name: "br-outside".into(),
                    address: Some("203.0.113.1/24".into())
                },
                ns("ft1-node-1"),
                underlay(1, "198.18.7.11/24"),
                outside(1),
                switch(1),
                ns("ft1-node-2"),
                underlay(2, "198.18.7.12/24"),
                outside(2),
                switch(2),
            ]
        );
        // Linux bridges need no switch instance.
        let without = plan(&layout(3, false), net());
        assert_eq!(without.len(), 5 + 3 * 3);
        assert!(!without.iter().any(|s| matches!(s, Step::Switch { .. })));
    }

    #[test]
    fn nodes_are_named_and_addressed_in_order() {
        let nodes = layout(3, true).node_plans(net());
        let rows: Vec<(String, String, String, String)> = nodes
            .iter()
            .map(|n| {
                (
                    n.name.clone(),
                    n.netns.clone(),
                    n.address.to_string(),
                    n.agent_dir().display().to_string(),
                )
            })
            .collect();
        assert_eq!(
            rows,
            [
                (
                    "node-1",
                    "ft1-node-1",
                    "198.18.7.11",
                    "/d/nodes/node-1/agent"
                ),
                (
                    "node-2",
                    "ft1-node-2",
                    "198.18.7.12",
                    "/d/nodes/node-2/agent"
                ),
                (
                    "node-3",
                    "ft1-node-3",
                    "198.18.7.13",
                    "/d/nodes/node-3/agent"
                ),
            ]
            .map(|(a, b, c, d)| (a.into(), b.into(), c.into(), d.into()))
        );
        assert_eq!(host_address(net()).to_string(), "198.18.7.1");
    }

    #[test]
    fn prefixes_and_node_counts_are_checked() {
        let cases: &[(&str, u32, bool)] = &[
            ("ferro", 1, true),
            ("ferro", 3, true),
            ("fe1234-x", 64, true),
            ("abcdefghijkl", 2, true),
            ("abcdefghijklm", 2, false),
            ("Ferro", 2, false),
            ("1ferro", 2, false),
            ("fe_x", 2, false),
            ("", 2, false),
            ("ferro", 0, false),
            ("ferro", 65, false),
        ];
        for (prefix, nodes, ok) in cases {
            let layout = Layout {
                prefix: (*prefix).into(),
                ..layout(*nodes, true)
            };
            assert_eq!(layout.validate().is_ok(), *ok, "{prefix} {nodes}");
            if *ok {
                assert!(layout.host_link().len() <= 15);
            }
        }
    }

    #[test]
    fn the_underlay_is_the_first_free_slash_24() {
        let nets =
            |list: &[&str]| -> Vec<Ipv4Net> { list.iter().map(|n| n.parse().unwrap()).collect() };
        let cases: &[(&[&str], Option<&str>)] = &[
            (&[], Some("198.18.0.0/24")),
            (&["192.0.2.0/24", "127.0.0.0/8"], Some("198.18.0.0/24")),
            (&["198.18.0.0/24"], Some("198.18.1.0/24")),
            (&["198.18.0.1/32", "198.18.1.0/24"], Some("198.18.2.0/24")),
            (&["198.18.0.0/16"], Some("198.19.0.0/24")),
            (&["198.16.0.0/12"], None),
            (&["0.0.0.0/0"], None),
        ];
        for (used, want) in cases {
            let want = want.map(|w| w.parse::<Ipv4Net>().unwrap());
            assert_eq!(pick_underlay(&nets(used)), want, "{used:?}");
        }
    }

    #[test]
    fn host_networks_are_read_from_ip_output() {
        let addresses = "\
1: lo    inet 127.0.0.1/8 scope host lo\\       valid_lft forever preferred_lft forever
2: eth0    inet 192.0.2.2/24 brd 192.0.2.255 scope global eth0\\       valid_lft forever
7: ferro-ul    inet 198.18.0.1/24 scope global ferro-ul\\       valid_lft forever
";
        let routes = "\
default via 192.0.2.1 dev eth0
192.0.2.0/24 dev eth0 proto kernel scope link src 192.0.2.2
198.18.3.0/24 dev x0 proto kernel scope link src 198.18.3.1
local 198.18.5.9 dev lo table local proto kernel scope host src 198.18.5.9
broadcast 127.255.255.255 dev lo table local proto kernel scope link src 127.0.0.1
";
        let found: Vec<String> = parse_networks(addresses, routes)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            found,
            [
                "127.0.0.0/8",
                "192.0.2.0/24",
                "198.18.0.0/24",
                "192.0.2.0/24",
                "198.18.3.0/24",
                "198.18.5.9/32",
                "127.255.255.255/32",
            ]
        );
        let picked = pick_underlay(&parse_networks(addresses, routes)).unwrap();
        assert_eq!(picked.to_string(), "198.18.1.0/24");
    }

    #[test]
    fn the_record_round_trips_through_json() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(Record::load(dir.path()).unwrap(), None);
        let record = Record {
            underlay: Some(net().to_string()),
            steps: plan(&layout(2, true), net()),
        };
        record.save(dir.path()).unwrap();
        assert_eq!(Record::load(dir.path()).unwrap(), Some(record));
        // Nothing recorded exists on this host, so tearing down removes only the record.
        assert_eq!(teardown(dir.path()).unwrap(), 0);
        assert_eq!(Record::load(dir.path()).unwrap(), None);
    }
}
