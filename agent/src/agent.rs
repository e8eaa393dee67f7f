//! `ferro agent`: the node agent's main loop, [`run`], and its settings, [`AgentConfig`].
//!
//! One agent runs per node, with the node's own token (identity `system:node:<name>`).
//! [`run`] wires these tasks together and runs them until its shutdown future completes:
//!
//! - **heartbeat** ([`crate::node::heartbeat`]): renews the Lease `node-<name>`;
//! - **node status**: registers the Node, then keeps the agent's part of `Node.status`
//!   true (capacity, allocatable, accelerator, cached images, `HostReady`, …), writing
//!   only what changed;
//! - **servers**: the Server reconciler ([`crate::server::ServerReconciler`]) run by a
//!   [`ferro_runtime::Controller`] keyed by Server uid: a reflector keeps a store of the
//!   Servers with `status.node=<name>` (List + Watch), and each one that appears,
//!   vanishes, or changes in a way that matters ([`crate::server::significant`]) is
//!   queued — one reconcile per uid at a time, several uids at once, backing off from 1 s
//!   after failures. Every resync period, every cached Server and every VM the
//!   hypervisor driver lists is queued again (unless it is backing off), so that guests
//!   that died, orphans, and anything a missed event hid are looked at within one
//!   period; the passes are counted in `ferro_controller_resyncs_total`;
//! - **volumes**, on a node with the Storage role: the Volume reconciler
//!   ([`crate::storage::StorageReconciler`]) keyed by Volume uid, which makes, grows,
//!   exports and removes the volumes placed on the node;
//! - **consoles** ([`crate::console`]): the tunnel through which the apiserver asks for
//!   serial consoles;
//! - **metrics**, when [`AgentConfig::metrics_addr`] is set: the runtime's metrics over
//!   HTTP.
//!
//! The host systems are behind traits, chosen at start-up: [`run`] takes [`Drivers`]
//! (the hypervisor and the image cache as trait objects), and [`Drivers::real`] makes
//! the real ones, QEMU and the file image cache.
//!
//! Another reconciler of host objects is a file beside [`crate::server`] with its pure
//! `plan` and its thin `apply`, a `Reconcile` impl for its key, and one registration line
//! in [`run`] that builds its `Controller` from the stores it reads.
//!
//! Guests are not the agent's children: QEMU daemonizes into its own session, so
//! stopping the agent (cleanly or with SIGKILL) leaves every guest running, and the next
//! agent adopts them — it observes the host instead of remembering it. On shutdown, the
//! running reconciles get a few seconds to finish their step before they are dropped.
//!
//! On disk (`state_dir`, default `/var/lib/ferro/agent`):
//!
//! ```text
//! <state>/vms/<server-uid>/   one directory per VM (see the QEMU driver)
//! <state>/images/             the image cache (see crate::images), unless placed elsewhere
//! <state>/volumes/            a storage node's volumes (see crate::volumes::file)
//! <state>/volume-records/     who owns each volume (see crate::storage)
//! <state>/nbd/                the NBD exports of volumes to other nodes (crate::volumes::nbd)
//! ```
//!
//! Unix socket paths are limited to 107 bytes, so `<state>/vms/<uid>/console.sock` must
//! fit: the state directory may be at most 53 bytes long.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use ferro_api::client::{Client, Selection};
use ferro_api::retry::{self, BackoffBuilder};
use ferro_api::v1;
use ferro_api::v1::node_status::Role;
use ferro_runtime::controller::Settings;
use ferro_runtime::events::Recorder;
use ferro_runtime::metrics::Metrics;
use ferro_runtime::queue::Backoff;
use ferro_runtime::{Controller, Store, predicates, reflector::Reflector};
use tokio::task::JoinSet;

use crate::dhcp::Dhcp;
use crate::dhcp::dnsmasq::DnsmasqDhcp;
use crate::firewall::ovs::OvsEnforcer;
use crate::firewall::{Enforcer, FIREWALL_KEY, FirewallReconciler, NftEnforcer, NftTables};
use crate::hypervisor::qemu::{AccelPolicy, QemuConfig, QemuDriver};
use crate::hypervisor::{Accel, Hypervisor};
use crate::images::{FileImageCache, ImageCache, error_chain};
use crate::links::Links;
use crate::links::netlink::NetlinkLinks;
use crate::network::{InsideChecks, NODE_KEY, NetworkHealth, NetworkReconciler};
use crate::node::{self, HostTools, NodeReport};
use crate::router::{ROUTER_RECORD_DIR, ROUTERS_KEY, RouterReconciler};
use crate::server::{self, ServerReconciler};
use crate::storage::{STORAGE_CONTROLLER, StorageReconciler};
use crate::switch::ovs::{OvsConfig, OvsSwitch};
use crate::volumes::VolumeBackend;
use crate::volumes::file::FileBackend;
use crate::volumes::nbd::NbdExports;
use crate::wiring::linuxbridge::LinuxBridge;
use crate::wiring::ovs::OvsWiring;
use crate::wiring::{DriverKind, NetworkDriver};

/// Where the agent keeps its state unless told otherwise.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/ferro/agent";

/// The longest state directory whose VM sockets still fit the 107-byte limit of unix
/// socket paths: `<state>/vms/<36-character uid>/console.sock`.
pub const MAX_STATE_DIR_LEN: usize = 107 - "/vms/".len() - 36 - "/console.sock".len();

/// A future that completes when the agent should stop.
pub type Shutdown = Pin<Box<dyn Future<Output = ()> + Send>>;

/// The name of the Server reconciler's controller, in logs and metric labels.
pub const SERVER_CONTROLLER: &str = "agent-server";

/// How long one Server reconcile may take before it is abandoned and retried: long,
/// because starting a guest may first download its image.
const RECONCILE_TIMEOUT: Duration = Duration::from_secs(3600);

/// How long the Open vSwitch driver reuses the flows it dumped while it writes none: the
/// window in which flows deleted by hand go unnoticed (see [`OvsWiring::reuse_flows_for`]).
const OVS_FLOWS_FRESH_FOR: Duration = Duration::from_secs(10);

/// Where a storage node keeps its NBD export records, under the state directory.
const NBD_DIR: &str = "nbd";

/// How long running reconciles get to finish their step when the agent stops.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// The host systems the agent drives, as trait objects chosen at start-up.
pub struct Drivers {
    /// Runs, observes and removes VMs.
    pub hypervisor: Arc<dyn Hypervisor>,
    /// The node's image cache.
    pub images: Arc<dyn ImageCache>,
    /// What wires tenant networks; `None` on a node that wires none (its Servers' Ports
    /// then wait, and say so).
    pub network: Option<NetworkDrivers>,
    /// What holds and exports volumes; `None` on a node without the Storage role.
    pub volumes: Option<VolumeDrivers>,
}

/// The host systems the Volume reconciler drives.
pub struct VolumeDrivers {
    /// Where volumes' bytes are.
    pub backend: Arc<dyn VolumeBackend>,
    /// The NBD exports of volumes to servers on other nodes.
    pub exports: Arc<NbdExports>,
}

impl VolumeDrivers {
    /// The real ones: qcow2 files under `<state_dir>/volumes`, exported by
    /// `qemu-storage-daemon` on the node's address.
    pub fn real(config: &AgentConfig, state_dir: &Path, qemu_img: &Path) -> VolumeDrivers {
        let address = config.address.clone().unwrap_or_else(node::default_address);
        VolumeDrivers {
            backend: Arc::new(FileBackend::new(
                state_dir.join("volumes"),
                qemu_img.to_owned(),
            )),
            exports: Arc::new(NbdExports::new(
                state_dir.join(NBD_DIR),
                PathBuf::from("qemu-storage-daemon"),
                address,
                crate::volumes::nbd::DEFAULT_PORTS,
            )),
        }
    }
}

/// The host systems the network reconciler drives.
pub struct NetworkDrivers {
    /// Wires networks and ports: Open vSwitch or Linux bridges.
    pub driver: Arc<dyn NetworkDriver>,
    /// Taps, veths and namespaces.
    pub links: Arc<dyn Links>,
    /// The DHCP servers.
    pub dhcp: Arc<dyn Dhcp>,
    /// What enforces security groups on the driver's switch.
    pub firewall: Arc<dyn Enforcer>,
}

impl Drivers {
    /// The real drivers, placed as `config` says: QEMU with its VMs under
    /// `<state_dir>/vms`, and the file image cache in [`AgentConfig::image_dir`].
    pub fn real(config: &AgentConfig) -> anyhow::Result<Drivers> {
        let state_dir = checked_state_dir(&config.state_dir)?;
        let mut qemu = qemu_config(&vm_dir(&state_dir), config.accel.clone());
        // Open vSwitch's userspace datapath completes no checksum a guest left to it.
        qemu.tap_offloads = !(config.network_driver == DriverKind::Ovs
            && crate::switch::DatapathType::probe() == crate::switch::DatapathType::Netdev);
        let image_dir = config
            .image_cache_dir
            .clone()
            .unwrap_or_else(|| state_dir.join("images"));
        let images = FileImageCache::open(&image_dir, &qemu.qemu_img)
            .with_context(|| format!("cannot open the image cache in {}", image_dir.display()))?;
        let volumes = config
            .roles
            .contains(&Role::Storage)
            .then(|| VolumeDrivers::real(config, &state_dir, &qemu.qemu_img));
        Ok(Drivers {
            hypervisor: Arc::new(QemuDriver::new(qemu)),
            images: Arc::new(images),
            network: Some(NetworkDrivers::real(config, &state_dir)?),
            volumes,
        })
    }
}

impl NetworkDrivers {
    /// The real network drivers: the one `config.network_driver` names (Open vSwitch at
    /// `config.ovsdb`, or the system's instance; or Linux bridges), netlink, and dnsmasq
    /// with its files under `<state_dir>/dhcp`.
    pub fn real(config: &AgentConfig, state_dir: &Path) -> anyhow::Result<NetworkDrivers> {
        let links: Arc<dyn Links> = Arc::new(NetlinkLinks::new());
        let (driver, firewall): (Arc<dyn NetworkDriver>, Arc<dyn Enforcer>) = match config
            .network_driver
        {
            DriverKind::Ovs => {
                let ovs = match &config.ovsdb {
                    Some(remote) => {
                        let socket = Path::new(remote.strip_prefix("unix:").unwrap_or(remote));
                        let run_dir = socket.parent().unwrap_or(Path::new("/"));
                        OvsConfig {
                            db_socket: socket.to_owned(),
                            ..OvsConfig::new(run_dir)
                        }
                    }
                    None => OvsConfig::system(),
                };
                let switch = Arc::new(OvsSwitch::new(ovs));
                (
                    Arc::new(OvsWiring::new(switch.clone()).reuse_flows_for(OVS_FLOWS_FRESH_FOR)),
                    Arc::new(OvsEnforcer::new(switch)),
                )
            }
            DriverKind::LinuxBridge => (
                Arc::new(LinuxBridge::new(links.clone())),
                Arc::new(NftEnforcer::new(Arc::new(NftTables))),
            ),
        };
        let dhcp = DnsmasqDhcp::new(state_dir)
            .with_context(|| format!("cannot keep DHCP servers in {}", state_dir.display()))?;
        Ok(NetworkDrivers {
            driver,
            links,
            dhcp: Arc::new(dhcp),
            firewall,
        })
    }
}

impl std::fmt::Debug for Drivers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Drivers").finish_non_exhaustive()
    }
}

/// The agent's settings.
pub struct AgentConfig {
    /// The node's name (`system:node:<name>` is the token's identity).
    pub node: String,
    /// The apiserver's address, `127.0.0.1:7443` or `http://host:port`.
    pub server: String,
    /// The node's bearer token.
    pub token: String,
    /// Where VMs and (by default) the image cache live. At most [`MAX_STATE_DIR_LEN`]
    /// bytes.
    pub state_dir: PathBuf,
    /// Where the image cache lives; `<state_dir>/images` when unset. Read by
    /// [`Drivers::real`].
    pub image_cache_dir: Option<PathBuf>,
    /// The node's availability zone, reported in `Node.status.zone` and given to guests.
    pub zone: String,
    /// The roles the node plays.
    pub roles: Vec<Role>,
    /// The address other nodes reach this one at; found from the routing table when
    /// unset ([`node::default_address`]).
    pub address: Option<String>,
    /// How often the heartbeat Lease is renewed.
    pub heartbeat_interval: Duration,
    /// How long the Lease lasts after a renewal.
    pub lease_duration: Duration,
    /// How often every Server and every VM is reconciled even without a change.
    pub resync_period: Duration,
    /// How long a guest gets to power off after the ACPI button before it is ended.
    pub stop_grace: Duration,
    /// How many Servers are reconciled at once.
    pub workers: usize,
    /// Which accelerator guests get. Read by [`Drivers::real`].
    pub accel: AccelPolicy,
    /// Completes when the agent should stop; never, by default.
    pub shutdown: Shutdown,
    /// Where the agent's metrics are recorded: reconciles, resync passes
    /// (`ferro_controller_resyncs_total{controller="agent-server"}`), reflector restarts.
    /// Keep a clone to read them.
    pub metrics: Metrics,
    /// Where the metrics are served over HTTP (`GET /metrics`); not served when unset.
    pub metrics_addr: Option<SocketAddr>,
    /// Which driver wires the node's tenant networks (`--network-driver`); Open vSwitch
    /// by default.
    pub network_driver: DriverKind,
    /// The OVSDB socket of the node's Open vSwitch instance (`unix:PATH`), for the OVS
    /// driver; the system's instance when unset. `ferro up` starts a private instance per
    /// node and names its socket here.
    pub ovsdb: Option<String>,
    /// The interface the node's provider bridge (`br-ex`) holds: routers' gateways and
    /// floating IPs reach external networks through it (`--provider-interface`). Without
    /// one, routers placed here are built without their gateway and say why.
    pub provider_interface: Option<String>,
}

impl AgentConfig {
    /// Settings with the defaults: state in [`DEFAULT_STATE_DIR`], zone `default`, the
    /// compute role, a 10 s heartbeat with a 40 s lease, a 10 s resync, a 60 s stop
    /// grace, 4 workers, KVM when it works.
    pub fn new(
        node: impl Into<String>,
        server: impl Into<String>,
        token: impl Into<String>,
    ) -> Self {
        AgentConfig {
            node: node.into(),
            server: server.into(),
            token: token.into(),
            state_dir: DEFAULT_STATE_DIR.into(),
            image_cache_dir: None,
            zone: "default".to_owned(),
            roles: vec![Role::Compute],
            address: None,
            heartbeat_interval: Duration::from_secs(10),
            lease_duration: Duration::from_secs(40),
            resync_period: Duration::from_secs(10),
            stop_grace: Duration::from_secs(60),
            workers: 4,
            accel: AccelPolicy::default(),
            shutdown: Box::pin(std::future::pending()),
            metrics: Metrics::new(),
            metrics_addr: None,
            network_driver: DriverKind::Ovs,
            ovsdb: None,
            provider_interface: None,
        }
    }

    /// Stops the agent when `shutdown` completes.
    pub fn with_shutdown(mut self, shutdown: impl Future<Output = ()> + Send + 'static) -> Self {
        self.shutdown = Box::pin(shutdown);
        self
    }

    /// Where the VMs' directories are.
    pub fn vm_dir(&self) -> PathBuf {
        vm_dir(&self.state_dir)
    }

    /// Where the image cache is.
    pub fn image_dir(&self) -> PathBuf {
        self.image_cache_dir
            .clone()
            .unwrap_or_else(|| self.state_dir.join("images"))
    }
}

impl std::fmt::Debug for AgentConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentConfig")
            .field("node", &self.node)
            .field("server", &self.server)
            .field("token", &"<redacted>")
            .field("state_dir", &self.state_dir)
            .field("image_cache_dir", &self.image_cache_dir)
            .field("zone", &self.zone)
            .field("roles", &self.roles)
            .field("address", &self.address)
            .field("heartbeat_interval", &self.heartbeat_interval)
            .field("lease_duration", &self.lease_duration)
            .field("resync_period", &self.resync_period)
            .field("stop_grace", &self.stop_grace)
            .field("workers", &self.workers)
            .field("accel", &self.accel)
            .field("metrics_addr", &self.metrics_addr)
            .field("network_driver", &self.network_driver)
            .field("ovsdb", &self.ovsdb)
            .finish_non_exhaustive()
    }
}

fn vm_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("vms")
}

/// The node token from a token file: either the file holds just the token, or it is a
/// `ferro up` token file (`TOKEN IDENTITY` per line) and the line of
/// `system:node:<node>` is used.
pub fn read_token(path: &Path, node: &str) -> anyhow::Result<String> {
    let identity = format!("{}{node}", ferro_api::auth::NODE_PREFIX);
    ferro_api::auth::read_token_file(path, &identity).map_err(anyhow::Error::msg)
}

/// Stops (ACPI, then force after `grace`) every guest under a state directory, as
/// `ferro down` does, then the NBD exports that served them; returns how many guests were
/// running. Their disks and volumes stay, and the next agent starts those whose Server
/// wants them running, and exports again what they attach.
pub async fn stop_guests(state_dir: &Path, grace: Duration) -> anyhow::Result<usize> {
    let driver = QemuDriver::new(QemuConfig {
        accel: AccelPolicy::Tcg,
        ..QemuConfig::new(vm_dir(state_dir))
    });
    let mut stopped = 0;
    for vm in driver.list().await? {
        if vm.is_alive() {
            driver
                .stop(&vm.uid, grace)
                .await
                .with_context(|| format!("stopping VM {}", vm.uid))?;
            stopped += 1;
        }
    }
    Ok(stopped)
}

/// The state directory as an absolute path, refused when its VM sockets would not fit.
fn checked_state_dir(state_dir: &Path) -> anyhow::Result<PathBuf> {
    let state_dir = std::path::absolute(state_dir)
        .with_context(|| format!("cannot resolve {}", state_dir.display()))?;
    let len = state_dir.as_os_str().len();
    if len > MAX_STATE_DIR_LEN {
        bail!(
            "the state directory {} is {len} bytes long; at most {MAX_STATE_DIR_LEN} fit the \
             unix socket paths of VMs",
            state_dir.display()
        );
    }
    Ok(state_dir)
}

/// The QEMU driver's settings for VMs under `vms`.
fn qemu_config(vms: &Path, accel: AccelPolicy) -> QemuConfig {
    QemuConfig {
        accel,
        ..QemuConfig::new(vms)
    }
}

/// Runs the node agent over `drivers` until `config.shutdown` completes. Fails only on
/// bad settings or an unusable state directory; everything else (apiserver down, a guest
/// that will not start) is logged and retried.
pub async fn run(config: AgentConfig, drivers: Drivers) -> anyhow::Result<()> {
    let AgentConfig {
        node,
        server,
        token,
        state_dir,
        image_cache_dir: _,
        zone,
        roles,
        address,
        heartbeat_interval,
        lease_duration,
        resync_period,
        stop_grace,
        workers,
        accel: _,
        shutdown,
        metrics,
        metrics_addr,
        // Read by the network reconciler's wiring.
        network_driver: _,
        ovsdb: _,
        provider_interface,
    } = config;
    if node.is_empty() {
        bail!("the node needs a name");
    }
    let state_dir = checked_state_dir(&state_dir)?;
    let vms = vm_dir(&state_dir);
    std::fs::create_dir_all(&vms).with_context(|| format!("cannot create {}", vms.display()))?;
    let address = address.unwrap_or_else(node::default_address);

    let client = Client::connect_lazy(&server, &token).map_err(|e| anyhow::anyhow!("{e}"))?;
    // The programs the HostReady check looks for: those of the real QEMU driver.
    let qemu = QemuConfig::new(&vms);
    let tools = HostTools {
        qemu: qemu.qemu.clone(),
        qemu_img: qemu.qemu_img.clone(),
        genisoimage: qemu.genisoimage.clone(),
    };
    let Drivers {
        hypervisor,
        images,
        network,
        volumes: volume_drivers,
    } = drivers;
    // Uploaded images are read from the apiserver over this same connection.
    images.use_apiserver(client.clone());
    let servers = Store::<v1::Server>::new();
    let ports = Store::<v1::Port>::new();
    // Every Volume: servers here attach them, and a storage node holds some.
    let volumes = Store::<v1::Volume>::new();
    let reconciler = Arc::new(ServerReconciler {
        client: client.clone(),
        driver: hypervisor.clone(),
        images: images.clone(),
        cache: servers.clone(),
        ports: ports.clone(),
        node: node.clone(),
        zone: zone.clone(),
        stop_grace,
        recorder: Recorder::new(client.clone(), crate::server::event_component(&node)),
        seen: Default::default(),
        volumes: volumes.clone(),
        volume_backend: volume_drivers.as_ref().map(|v| v.backend.clone()),
    });
    let settings = Settings {
        concurrency: workers.max(1),
        timeout: RECONCILE_TIMEOUT,
        backoff: Backoff {
            base: Duration::from_secs(1),
            max: Duration::from_secs(60),
        },
        resync: Some(resync_period),
        // VMs whose Server is gone are only found by listing the host.
        resync_at_start: true,
        shutdown_grace: SHUTDOWN_GRACE,
    };
    let vms_on_host = hypervisor.clone();
    // One registration per reconciler: the store it reconciles, keyed and filtered, and
    // the host objects only a resync finds.
    let server_controller = Controller::new(SERVER_CONTROLLER, settings, metrics.clone())
        .reconciles_with(
            &servers,
            server::key_of,
            predicates::changed(server::significant),
        )
        .resync_with_async(move || vm_uids(vms_on_host.clone()))
        // A Server's Ports being plugged in (or out) is what its guest waits for.
        .watches(&ports, server::servers_of_port(servers.clone()))
        // So are its Volumes becoming ready, or exported to this node.
        .watches(&volumes, server::servers_of_volume(servers.clone()));
    tracing::info!(node, server, state_dir = %state_dir.display(), "node agent starting");

    let mut tasks = JoinSet::new();
    tasks.spawn(
        Reflector::new(client.clone(), volumes.clone())
            .with_metrics(metrics.clone())
            .run(),
    );
    let storage_report = volume_drivers.as_ref().map(|v| v.backend.clone());
    let storage_controller = volume_drivers.map(|drivers| {
        // Servers on every node: those elsewhere reach this node's volumes over NBD.
        let all_servers = Store::<v1::Server>::new();
        tasks.spawn(
            Reflector::new(client.clone(), all_servers.clone())
                .with_metrics(metrics.clone())
                .run(),
        );
        let snapshots = Store::<v1::VolumeSnapshot>::new();
        tasks.spawn(
            Reflector::new(client.clone(), snapshots.clone())
                .with_metrics(metrics.clone())
                .run(),
        );
        let reconciler = Arc::new(StorageReconciler {
            client: client.clone(),
            node: node.clone(),
            backend: drivers.backend,
            exports: drivers.exports,
            images: images.clone(),
            volumes: volumes.clone(),
            servers: all_servers.clone(),
            snapshots: snapshots.clone(),
            records: state_dir.join(crate::storage::RECORD_DIR),
            recorder: Recorder::new(client.clone(), crate::server::event_component(&node)),
        });
        let here = node.clone();
        let copies = volumes.clone();
        let on_volumes = move |c: &ferro_runtime::reflector::Change<v1::Volume>| {
            let mut uids: Vec<String> = c
                .old
                .iter()
                .chain(c.new.iter())
                .filter(|v| v.status.as_ref().is_some_and(|s| s.node == here))
                .filter_map(|v| v.metadata.as_ref().map(|m| m.uid.clone()))
                .collect();
            // A source made, or a snapshot taken: the volumes copied from them may wait.
            let held = |v: &Option<Arc<v1::Volume>>| {
                v.as_ref()
                    .and_then(|v| v.status.as_ref())
                    .map(|s| (s.snapshots.clone(), s.size_gib))
            };
            if held(&c.old) != held(&c.new) {
                uids.extend(crate::storage::copies_waiting(&here, &copies));
            }
            uids
        };
        let here = node.clone();
        let placed = volumes.clone();
        let on_servers = move |c: &ferro_runtime::reflector::Change<v1::Server>| {
            let servers: Vec<&v1::Server> = c
                .old
                .iter()
                .chain(c.new.iter())
                .map(|s| s.as_ref())
                .collect();
            crate::storage::volumes_of_change(&here, &placed, &servers)
        };
        let here = node.clone();
        let of_snapshot = volumes.clone();
        let on_snapshots = move |c: &ferro_runtime::reflector::Change<v1::VolumeSnapshot>| {
            c.old
                .iter()
                .chain(c.new.iter())
                .filter_map(|s| {
                    let project = &s.metadata.as_ref()?.project;
                    let volume = of_snapshot.get_named(project, &s.spec.as_ref()?.volume)?;
                    let status = volume.status.as_ref()?;
                    (status.node == here)
                        .then(|| volume.metadata.as_ref().map(|m| m.uid.clone()))?
                })
                .collect::<Vec<_>>()
        };
        let resync = reconciler.clone();
        let controller = Controller::<String>::new(STORAGE_CONTROLLER, settings, metrics.clone())
            .watches(&volumes, on_volumes)
            .watches(&all_servers, on_servers)
            .watches(&snapshots, on_snapshots)
            .resync_with_async(move || {
                let resync = resync.clone();
                async move { resync.resync_keys().await }
            });
        (controller, reconciler)
    });
    if let Some(addr) = metrics_addr {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot serve metrics on {addr}"))?;
        // Port 0 picks a free port: the log line is how to find it.
        let bound = listener.local_addr().unwrap_or(addr);
        tracing::info!(addr = %bound, "serving metrics");
        tasks.spawn(ferro_runtime::metrics::serve(listener, metrics.clone()));
    }
    tasks.spawn(node::heartbeat(
        client.clone(),
        node.clone(),
        heartbeat_interval,
        lease_duration,
    ));
    let health = NetworkHealth::default();
    let network_controller = network.map(|network| {
        let networks = Store::<v1::Network>::new();
        let nodes = Store::<v1::Node>::new();
        let routers = Store::<v1::Router>::new();
        let floating_ips = Store::<v1::FloatingIp>::new();
        tasks.spawn(
            Reflector::new(client.clone(), networks.clone())
                .with_metrics(metrics.clone())
                .run(),
        );
        tasks.spawn(
            Reflector::new(client.clone(), routers.clone())
                .with_metrics(metrics.clone())
                .run(),
        );
        tasks.spawn(
            Reflector::new(client.clone(), floating_ips.clone())
                .with_metrics(metrics.clone())
                .run(),
        );
        // One metadata service: routers' listeners and isolated networks'.
        let metadata = Arc::new(crate::metadata::MetadataService::new(
            client.clone(),
            ports.clone(),
        ));
        let router_reconciler = Arc::new(RouterReconciler {
            client: client.clone(),
            node: node.clone(),
            provider: provider_interface.clone(),
            links: network.links.clone(),
            routers: routers.clone(),
            networks: networks.clone(),
            floating_ips: floating_ips.clone(),
            marks: crate::router::Marks::new(state_dir.join(ROUTER_RECORD_DIR)),
            metadata: metadata.clone(),
        });
        let routers_key = || vec![ROUTERS_KEY.to_owned()];
        let router_controller = Controller::<String>::new(
            crate::router::ROUTER_CONTROLLER,
            Settings {
                concurrency: 1,
                timeout: Duration::from_secs(120),
                ..settings
            },
            metrics.clone(),
        )
        .watches(&routers, move |_| routers_key())
        .watches(&floating_ips, move |_| routers_key())
        .watches(&networks, move |_| routers_key())
        .resync_with(routers_key);
        tasks.spawn(
            Reflector::new(client.clone(), nodes.clone())
                .with_metrics(metrics.clone())
                .run(),
        );
        // Security groups: nftables on Linux bridge nodes, OpenFlow with conntrack on
        // Open vSwitch nodes.
        let firewall = Some(network.firewall.clone()).map(|enforcer| {
            let groups = Store::<v1::SecurityGroup>::new();
            tasks.spawn(
                Reflector::new(client.clone(), groups.clone())
                    .with_metrics(metrics.clone())
                    .run(),
            );
            let reconciler = Arc::new(FirewallReconciler::new(
                node.clone(),
                enforcer,
                servers.clone(),
                ports.clone(),
                groups.clone(),
                networks.clone(),
            ));
            let key = || vec![FIREWALL_KEY.to_owned()];
            let controller = Controller::<String>::new(
                crate::firewall::FIREWALL_CONTROLLER,
                Settings {
                    concurrency: 1,
                    timeout: Duration::from_secs(120),
                    ..settings
                },
                metrics.clone(),
            )
            .watches(&servers, move |_| key())
            .watches(&ports, move |_| key())
            .watches(&groups, move |_| key())
            .watches(&networks, move |_| key())
            .resync_with(key);
            (controller, reconciler)
        });
        let reconciler = Arc::new(NetworkReconciler {
            client: client.clone(),
            node: node.clone(),
            local_ip: address.parse().ok(),
            driver: network.driver,
            links: network.links,
            dhcp: network.dhcp,
            servers: servers.clone(),
            ports: ports.clone(),
            networks: networks.clone(),
            nodes: nodes.clone(),
            routers: routers.clone(),
            health: health.clone(),
            inside_checks: InsideChecks::every(crate::network::INSIDE_CHECK_EVERY),
            metadata: Some(metadata),
        });
        let key = || vec![NODE_KEY.to_owned()];
        let controller = Controller::<String>::new(
            crate::network::NETWORK_CONTROLLER,
            Settings {
                // One key for the whole node: one pass at a time.
                concurrency: 1,
                timeout: Duration::from_secs(300),
                ..settings
            },
            metrics.clone(),
        )
        .watches(&servers, move |_| key())
        .watches(&ports, move |c| {
            let matters = match (c.old.as_deref(), c.new.as_deref()) {
                (Some(old), Some(new)) => crate::network::port_matters(old, new),
                _ => true,
            };
            if matters { key() } else { Vec::new() }
        })
        .watches(&networks, move |_| key())
        .watches(&nodes, move |_| key())
        .watches(&routers, move |_| key())
        .resync_with(key);
        (
            controller,
            reconciler,
            router_controller,
            router_reconciler,
            firewall,
        )
    });
    tasks.spawn(
        Reflector::new(client.clone(), ports.clone())
            .with_metrics(metrics.clone())
            .run(),
    );
    tasks.spawn(keep_node_status(
        client.clone(),
        NodeBase {
            name: node.clone(),
            zone,
            roles,
            address,
            tools,
            state_dir: state_dir.clone(),
            health,
        },
        hypervisor.clone(),
        images.clone(),
        storage_report,
        resync_period,
    ));
    tasks.spawn(
        Reflector::new(client.clone(), servers.clone())
            .with_selection(Selection::all().fields(format!("status.node={node}")))
            .with_metrics(metrics.clone())
            .run(),
    );
    tasks.spawn(crate::console::run(
        client.clone(),
        node.clone(),
        hypervisor.clone(),
    ));
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let stopped_too = stopped.clone();
    let mut controllers = tokio::spawn(async move {
        let network = async move {
            if let Some((controller, reconciler, router_controller, router_reconciler, firewall)) =
                network_controller
            {
                let mut stopped = stopped_too;
                let mut stopped_routers = stopped.clone();
                let mut stopped_firewall = stopped.clone();
                let networks = controller.run_until(reconciler, async move {
                    let _ = stopped.wait_for(|s| *s).await;
                });
                let routers = router_controller.run_until(router_reconciler, async move {
                    let _ = stopped_routers.wait_for(|s| *s).await;
                });
                let firewall = async move {
                    if let Some((controller, reconciler)) = firewall {
                        controller
                            .run_until(reconciler, async move {
                                let _ = stopped_firewall.wait_for(|s| *s).await;
                            })
                            .await;
                    }
                };
                tokio::join!(networks, routers, firewall);
            }
        };
        let mut stopped_storage = stopped.clone();
        let storage = async move {
            if let Some((controller, reconciler)) = storage_controller {
                controller
                    .run_until(reconciler, async move {
                        let _ = stopped_storage.wait_for(|s| *s).await;
                    })
                    .await;
            }
        };
        let mut stopped = stopped;
        let servers = server_controller.run_until(reconciler, async move {
            let _ = stopped.wait_for(|s| *s).await;
        });
        tokio::join!(servers, network, storage);
    });

    let mut shutdown = shutdown;
    let ended = tokio::select! {
        _ = &mut shutdown => None,
        ended = tasks.join_next() => Some(format!("{ended:?}")),
        ended = &mut controllers => Some(format!("the controllers: {ended:?}")),
    };
    // Stops taking keys, lets running reconciles finish their step, then drops them.
    let _ = stop.send(true);
    let _ = controllers.await;
    tasks.abort_all();
    match ended {
        Some(ended) => bail!("an agent task ended unexpectedly: {ended}"),
        None => {
            tracing::info!(node, "node agent stopped; guests keep running");
            Ok(())
        }
    }
}

/// The uids of every VM the hypervisor finds on this host, for the resync: a VM whose
/// Server is gone is found no other way.
async fn vm_uids(hypervisor: Arc<dyn Hypervisor>) -> Vec<String> {
    match hypervisor.list().await {
        Ok(vms) => vms.into_iter().map(|vm| vm.uid).collect(),
        Err(e) => {
            tracing::warn!(error = %error_chain(&e), "listing the VMs on this host failed");
            Vec::new()
        }
    }
}

/// What the node status task reports besides measurements.
struct NodeBase {
    name: String,
    zone: String,
    roles: Vec<Role>,
    address: String,
    tools: HostTools,
    state_dir: PathBuf,
    health: NetworkHealth,
}

/// Registers the Node, then keeps its status true: every period, and whenever the image
/// cache changes.
async fn keep_node_status(
    client: Client,
    base: NodeBase,
    driver: Arc<dyn Hypervisor>,
    images: Arc<dyn ImageCache>,
    storage: Option<Arc<dyn VolumeBackend>>,
    period: Duration,
) {
    let mut delays = retry::reconnect_to_apiserver().build();
    while let Err(e) = node::register(&client, &base.name).await {
        let delay = delays.next().unwrap_or(Duration::from_secs(10));
        tracing::warn!(error = %e, ?delay, "registering the node failed");
        tokio::time::sleep(delay).await;
    }
    let accelerator = match driver.accel().await {
        Accel::Kvm => "KVM",
        Accel::Tcg => "TCG",
    };
    let mut changes = images.changes();
    loop {
        let storage_report = match &storage {
            Some(backend) => StorageReconciler::report(backend.as_ref()).await,
            None => None,
        };
        match node::measure_capacity(&base.state_dir) {
            Ok(capacity) => {
                let report = NodeReport {
                    name: base.name.clone(),
                    zone: base.zone.clone(),
                    roles: base.roles.clone(),
                    address: base.address.clone(),
                    accelerator: accelerator.to_owned(),
                    capacity,
                    images: images.report(),
                    host_ready: node::check_host(&base.tools, &base.state_dir),
                    network_driver: base.health.get().map(|h| h.0).unwrap_or_default(),
                    network_ready: base.health.get().map(|h| h.1),
                    storage: storage_report,
                };
                match node::sync_status(&client, &report).await {
                    Ok(true) => tracing::debug!("node status written"),
                    Ok(false) => {}
                    Err(e) => tracing::warn!(error = %e, "writing the node status failed"),
                }
            }
            Err(e) => tracing::warn!(error = %e, "measuring the host failed"),
        }
        tokio::select! {
            _ = tokio::time::sleep(period) => {}
            _ = changes.changed() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_comes_from_a_bare_file_or_the_node_line() {
        let dir = tempfile::tempdir().unwrap();
        let bare = dir.path().join("token");
        std::fs::write(&bare, "abc123\n").unwrap();
        assert_eq!(read_token(&bare, "n1").unwrap(), "abc123");
        let table = dir.path().join("tokens");
        std::fs::write(
            &table,
            "# minted by ferro up\nt-admin admin\nt-ctl system:controllers\nt-n1 system:node:n1\n",
        )
        .unwrap();
        assert_eq!(read_token(&table, "n1").unwrap(), "t-n1");
        let err = read_token(&table, "n2").unwrap_err().to_string();
        assert!(err.contains("system:node:n2"), "{err}");
    }

    #[test]
    fn a_state_dir_must_leave_room_for_socket_paths() {
        assert_eq!(MAX_STATE_DIR_LEN, 53);
        let uid = "0b5c3a52-5a9e-4d35-8a1e-2f1c0f3b1a01";
        let state = format!("/{}", "s".repeat(MAX_STATE_DIR_LEN - 1));
        let socket = format!("{state}/vms/{uid}/console.sock");
        assert_eq!(socket.len(), 107);
    }

    #[tokio::test]
    async fn stopping_the_guests_of_an_empty_node_stops_nothing() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            stop_guests(dir.path(), Duration::from_secs(1))
                .await
                .unwrap(),
            0
        );
        std::fs::create_dir_all(dir.path().join("vms/not-a-vm-because-no-files")).unwrap();
        assert_eq!(
            stop_guests(dir.path(), Duration::from_secs(1))
                .await
                .unwrap(),
            0
        );
    }

    #[tokio::test]
    async fn a_too_long_state_dir_is_refused_up_front() {
        let mut config = AgentConfig::new("n1", "127.0.0.1:1", "t");
        config.state_dir = PathBuf::from("/tmp").join("x".repeat(60));
        let err = Drivers::real(&config).unwrap_err().to_string();
        assert!(err.contains("unix socket paths"), "{err}");
        assert!(!config.state_dir.exists(), "nothing was created");
    }
}
