//! `ferro agent`: the node agent's main loop, [`run`], and its settings, [`AgentConfig`].
//!
//! One agent runs per node, with the node's own token (identity `system:node:<name>`).
//! [`run`] wires these tasks together and runs them until its shutdown future completes:
//!
//! - **heartbeat** ([`crate::node::heartbeat`]): renews the Lease `node-<name>`;
//! - **node status**: registers the Node, then keeps the agent's part of `Node.status`
//!   true (capacity, allocatable, accelerator, cached images, `HostReady`, …), writing
//!   only what changed;
//! - **reflector** ([`crate::reflector`]): List + Watch of the Servers with
//!   `status.node=<name>`, enqueueing the uid of each one that changes;
//! - **resync**: every resync period, enqueues every cached Server and every VM the
//!   driver finds on the host, so that guests that died, orphans, and anything a missed
//!   event hid are looked at within one period;
//! - **workers**: take uids from the [`crate::queue::WorkQueue`] — one reconcile per uid
//!   at a time, several uids at once — and run [`crate::server::ServerReconciler`];
//! - **consoles** ([`crate::console`]): the tunnel through which the apiserver asks for
//!   serial consoles.
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
//! ```
//!
//! Unix socket paths are limited to 107 bytes, so `<state>/vms/<uid>/console.sock` must
//! fit: the state directory may be at most 53 bytes long.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use ferro_api::client::Client;
use ferro_api::v1::node_status::Role;
use tokio::task::JoinSet;

use crate::hypervisor::qemu::{AccelPolicy, QemuConfig, QemuDriver};
use crate::hypervisor::{Accel, Hypervisor};
use crate::images::{FileImageCache, ImageCache, error_chain};
use crate::node::{self, HostTools, NodeReport};
use crate::queue::{Backoff, Done, WorkQueue};
use crate::reflector::{self, ServerCache};
use crate::server::ServerReconciler;

/// Where the agent keeps its state unless told otherwise.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/ferro/agent";

/// The longest state directory whose VM sockets still fit the 107-byte limit of unix
/// socket paths: `<state>/vms/<36-character uid>/console.sock`.
pub const MAX_STATE_DIR_LEN: usize = 107 - "/vms/".len() - 36 - "/console.sock".len();

/// A future that completes when the agent should stop.
pub type Shutdown = Pin<Box<dyn Future<Output = ()> + Send>>;

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
    /// Where the image cache lives; `<state_dir>/images` when unset.
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
    /// Which accelerator guests get.
    pub accel: AccelPolicy,
    /// Completes when the agent should stop; never, by default.
    pub shutdown: Shutdown,
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
/// `ferro down` does; returns how many were running. Their disks stay, and the next
/// agent starts those whose Server wants them running.
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

/// Runs the node agent until `config.shutdown` completes. Fails only on bad settings or
/// an unusable state directory; everything else (apiserver down, a guest that will not
/// start) is logged and retried.
pub async fn run(config: AgentConfig) -> anyhow::Result<()> {
    let AgentConfig {
        node,
        server,
        token,
        state_dir,
        image_cache_dir,
        zone,
        roles,
        address,
        heartbeat_interval,
        lease_duration,
        resync_period,
        stop_grace,
        workers,
        accel,
        shutdown,
    } = config;
    if node.is_empty() {
        bail!("the node needs a name");
    }
    let state_dir = std::path::absolute(&state_dir)
        .with_context(|| format!("cannot resolve {}", state_dir.display()))?;
    let len = state_dir.as_os_str().len();
    if len > MAX_STATE_DIR_LEN {
        bail!(
            "the state directory {} is {len} bytes long; at most {MAX_STATE_DIR_LEN} fit the \
             unix socket paths of VMs",
            state_dir.display()
        );
    }
    let vms = vm_dir(&state_dir);
    std::fs::create_dir_all(&vms).with_context(|| format!("cannot create {}", vms.display()))?;
    let image_dir = image_cache_dir.unwrap_or_else(|| state_dir.join("images"));
    let address = address.unwrap_or_else(node::default_address);

    let client = Client::connect_lazy(&server, &token).map_err(|e| anyhow::anyhow!("{e}"))?;
    let qemu = QemuConfig {
        accel,
        ..QemuConfig::new(&vms)
    };
    let tools = HostTools {
        qemu: qemu.qemu.clone(),
        qemu_img: qemu.qemu_img.clone(),
        genisoimage: qemu.genisoimage.clone(),
    };
    let driver = Arc::new(QemuDriver::new(qemu));
    let images: Arc<dyn ImageCache> = Arc::new(
        FileImageCache::open(&image_dir, &tools.qemu_img)
            .with_context(|| format!("cannot open the image cache in {}", image_dir.display()))?,
    );
    let cache = Arc::new(ServerCache::new());
    let queue = Arc::new(WorkQueue::new(Backoff::default()));
    let reconciler = Arc::new(ServerReconciler {
        client: client.clone(),
        driver: driver.clone(),
        images: images.clone(),
        cache: cache.clone(),
        node: node.clone(),
        zone: zone.clone(),
        stop_grace,
    });
    tracing::info!(node, server, state_dir = %state_dir.display(), "node agent starting");

    let mut tasks = JoinSet::new();
    tasks.spawn(node::heartbeat(
        client.clone(),
        node.clone(),
        heartbeat_interval,
        lease_duration,
    ));
    tasks.spawn(keep_node_status(
        client.clone(),
        NodeBase {
            name: node.clone(),
            zone,
            roles,
            address,
            tools,
            state_dir: state_dir.clone(),
        },
        driver.clone(),
        images.clone(),
        resync_period,
    ));
    tasks.spawn(reflector::run(
        client.clone(),
        node.clone(),
        cache.clone(),
        queue.clone(),
    ));
    tasks.spawn(resync(
        cache.clone(),
        queue.clone(),
        driver.clone(),
        resync_period,
    ));
    tasks.spawn(crate::console::run(
        client.clone(),
        node.clone(),
        driver.clone(),
    ));
    let mut pool = JoinSet::new();
    for _ in 0..workers.max(1) {
        pool.spawn(work(queue.clone(), reconciler.clone()));
    }

    let mut shutdown = shutdown;
    let ended = tokio::select! {
        _ = &mut shutdown => None,
        ended = tasks.join_next() => Some(ended),
    };
    queue.close();
    if queue.running() > 0 {
        tracing::info!(
            running = queue.running(),
            "letting running reconciles finish"
        );
    }
    let drained = tokio::time::timeout(Duration::from_secs(10), async {
        while pool.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!("reconciles still running at shutdown were dropped");
    }
    pool.abort_all();
    tasks.abort_all();
    match ended {
        Some(ended) => bail!("an agent task ended unexpectedly: {ended:?}"),
        None => {
            tracing::info!(node, "node agent stopped; guests keep running");
            Ok(())
        }
    }
}

/// Takes uids off the queue and reconciles them, one at a time per uid.
async fn work(queue: Arc<WorkQueue<String>>, reconciler: Arc<ServerReconciler>) {
    while let Some(uid) = queue.next().await {
        // A reconcile runs in its own task so a panic fails that key, not the worker; it
        // is aborted with the worker.
        let run = {
            let reconciler = reconciler.clone();
            let uid = uid.clone();
            tokio::spawn(async move { reconciler.reconcile(&uid).await })
        };
        let _abort = AbortOnDrop(run.abort_handle());
        let done = match run.await {
            Ok(Ok(())) => Done::Ok(None),
            Ok(Err(e)) => {
                tracing::warn!(uid, failures = queue.failures(&uid) + 1, error = %error_chain(&e), "reconcile failed; backing off");
                Done::Failed
            }
            Err(e) => {
                tracing::error!(uid, error = %e, "reconcile panicked");
                Done::Failed
            }
        };
        queue.done(&uid, done);
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Every period: every cached Server and every VM on the host, unless already queued or
/// backing off. Starts once the reflector has listed.
async fn resync(
    cache: Arc<ServerCache>,
    queue: Arc<WorkQueue<String>>,
    driver: Arc<QemuDriver>,
    period: Duration,
) {
    while !cache.synced() {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    loop {
        for uid in cache.uids() {
            queue.resync(uid);
        }
        match driver.list().await {
            Ok(vms) => {
                for vm in vms {
                    queue.resync(vm.uid);
                }
            }
            Err(e) => {
                tracing::warn!(error = %error_chain(&e), "listing the VMs on this host failed")
            }
        }
        tokio::time::sleep(period).await;
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
}

/// Registers the Node, then keeps its status true: every period, and whenever the image
/// cache changes.
async fn keep_node_status(
    client: Client,
    base: NodeBase,
    driver: Arc<QemuDriver>,
    images: Arc<dyn ImageCache>,
    period: Duration,
) {
    let mut retry = Duration::from_millis(500);
    while let Err(e) = node::register(&client, &base.name).await {
        tracing::warn!(error = %e, ?retry, "registering the node failed");
        tokio::time::sleep(retry).await;
        retry = (retry * 2).min(Duration::from_secs(10));
    }
    let accelerator = match driver.accel().await {
        Accel::Kvm => "KVM",
        Accel::Tcg => "TCG",
    };
    let mut changes = images.changes();
    loop {
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
        let err = run(config).await.unwrap_err().to_string();
        assert!(err.contains("unix socket paths"), "{err}");
    }
}
