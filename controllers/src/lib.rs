//! Ferro controllers: one module per controller, run on the shared runtime crate
//! [`ferro_runtime`] (caches from List + Watch, the work queue, the reconciler as a tower
//! service, leader election, finalizers, events, metrics).
//!
//! - [`ipam`]: gives Ports their MAC and addresses through claims.
//! - [`network`]: gives Networks their segment ID; keeps a Network while Ports use it.
//! - [`gc`]: deletes what lost its owners; foreground and orphan propagation.
//! - [`scheduler`]: places Servers on Nodes with `Bind`.
//! - [`nodelifecycle`]: Node readiness from heartbeats; unreachable Servers turn Unknown.
//! - [`server`]: a Server's Ports, resolved references, phase and readiness.
//! - [`image`]: Image status from what the nodes' caches found.
//! - [`quota`]: a Quota's usage, recounted from the project's objects.
//! - [`router`]: places Routers on network nodes, with their gateway addresses; failover.
//! - [`floatingip`]: a FloatingIP's address, and the port and router it maps through.
//! - [`securitygroup`]: a `default` SecurityGroup in every Project.
//!
//! [`run`] is `ferro controllers`: it connects to the apiserver, serves metrics, contends
//! for the `controllers` Lease and, while it leads, runs every controller over one set of
//! caches. Losing the lease stops them all; the process then contends again.

pub mod api;
pub mod floatingip;
pub mod gc;
pub mod image;
pub mod ipam;
pub mod network;
pub mod nodelifecycle;
pub mod quota;
pub mod router;
pub mod scheduler;
pub mod securitygroup;
pub mod server;
pub mod servergroup;
pub mod volume;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use futures::{FutureExt, future::BoxFuture};
use tokio::task::JoinSet;

use crate::api::Api;
use ferro_runtime::{
    Caches,
    controller::Settings,
    leader::{LeaderConfig, LeaderElector},
    metrics::Metrics,
};

/// How the controllers run, whether elected or not.
#[derive(Clone, Debug)]
pub struct Options {
    /// Keys each controller reconciles at once.
    pub concurrency: usize,
    /// How often every object is reconciled again without an event.
    pub resync: Duration,
    /// How long one reconcile may take.
    pub reconcile_timeout: Duration,
    /// How long an Event lives after it last happened.
    pub event_ttl: Duration,
    /// The scheduler's overcommit ratios and weighing.
    pub scheduling: scheduler::plan::Settings,
    /// How long a network node stays lost before its routers fail over.
    pub router_failover_grace: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            concurrency: 16,
            resync: Duration::from_secs(600),
            reconcile_timeout: Duration::from_secs(60),
            event_ttl: Duration::from_secs(3600),
            scheduling: scheduler::plan::Settings::default(),
            router_failover_grace: router::FAILOVER_GRACE,
        }
    }
}

impl Options {
    fn settings(&self) -> Settings {
        Settings {
            concurrency: self.concurrency,
            timeout: self.reconcile_timeout,
            resync: Some(self.resync),
            ..Settings::default()
        }
    }
}

/// What `ferro controllers` needs.
pub struct ControllersConfig {
    /// The apiserver: `127.0.0.1:7443` or `http://…`.
    pub server: String,
    /// The bearer token (of `system:controllers`).
    pub token: String,
    /// This instance's identity in the leader Lease; unique per process.
    pub identity: String,
    /// Where to serve `/metrics` and `/healthz`; `None` serves nothing.
    pub metrics_addr: Option<SocketAddr>,
    /// How long the leader Lease lasts without renewal; a standby takes over about this
    /// long after the leader dies.
    pub lease_duration: Duration,
    /// The name of the leader Lease.
    pub lease_name: String,
    /// Controller tuning.
    pub options: Options,
    /// Completes when the process should stop; `None` waits for Ctrl-C or SIGTERM.
    pub shutdown: Option<BoxFuture<'static, ()>>,
}

impl ControllersConfig {
    /// The defaults for a server and token: a fresh identity, no metrics endpoint, a 12 s
    /// lease.
    pub fn new(server: impl Into<String>, token: impl Into<String>) -> Self {
        ControllersConfig {
            server: server.into(),
            token: token.into(),
            identity: default_identity(),
            metrics_addr: None,
            lease_duration: LeaderConfig::new("").lease_duration,
            lease_name: "controllers".into(),
            options: Options::default(),
            shutdown: None,
        }
    }

    /// Reads the token from a file: either the token alone, or a token table of
    /// `TOKEN IDENTITY` lines (as `ferro up` writes), from which the `system:controllers`
    /// line is taken.
    pub fn token_from_file(path: &std::path::Path) -> std::io::Result<String> {
        let text = std::fs::read_to_string(path)?;
        Ok(token_from_text(&text))
    }
}

fn token_from_text(text: &str) -> String {
    let lines: Vec<Vec<&str>> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.split_whitespace().collect())
        .collect();
    let controllers = lines
        .iter()
        .find(|words| words.get(1) == Some(&ferro_api::auth::CONTROLLERS));
    controllers
        .or(lines.first())
        .and_then(|words| words.first())
        .map(|t| (*t).to_owned())
        .unwrap_or_default()
}

/// `<hostname>-<8 random hex digits>`: readable in the Lease, unique per process.
pub fn default_identity() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default();
    let host = if host.is_empty() {
        "controllers".to_owned()
    } else {
        host
    };
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("{host}-{}", &id[..8])
}

/// Why `ferro controllers` could not run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The apiserver address or token is unusable.
    #[error("cannot set up the apiserver connection")]
    Connect(#[source] ferro_api::Error),
    /// The metrics address cannot be bound.
    #[error("cannot listen for metrics on {addr}")]
    Metrics {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

async fn default_shutdown() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// `ferro controllers`: contend for leadership and, while leading, run every controller.
/// Returns when the shutdown signal completes (after releasing the Lease if held).
pub async fn run(config: ControllersConfig) -> Result<(), RunError> {
    let api = Api::connect_lazy(&config.server, &config.token).map_err(RunError::Connect)?;
    let metrics = Metrics::new();
    let mut background = JoinSet::new();
    if let Some(addr) = config.metrics_addr {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| RunError::Metrics { addr, source })?;
        tracing::info!(addr = %listener.local_addr().unwrap_or(addr), "serving metrics");
        background.spawn(ferro_runtime::metrics::serve(listener, metrics.clone()));
    }
    let shutdown = config
        .shutdown
        .unwrap_or_else(|| default_shutdown().boxed())
        .shared();
    let leader = LeaderConfig {
        lease_name: config.lease_name.clone(),
        ..LeaderConfig::new(config.identity.clone())
    }
    .with_lease_duration(config.lease_duration);
    let mut elector = LeaderElector::new(api.client().clone(), leader);
    let leading = |value: f64| {
        metrics.set_gauge(
            "ferro_controllers_leader",
            "Whether this instance leads the controllers (1) or stands by (0).",
            &[],
            value,
        )
    };
    leading(0.0);
    loop {
        tokio::select! {
            _ = shutdown.clone() => {
                // An acquisition dropped here may have landed already: give it back.
                elector.release().await;
                return Ok(());
            }
            _ = elector.acquire() => {}
        }
        leading(1.0);
        enum End {
            Shutdown,
            Lost,
        }
        let end = tokio::select! {
            _ = shutdown.clone() => End::Shutdown,
            _ = elector.hold() => End::Lost,
            _ = run_controllers(api.clone(), metrics.clone(), config.options.clone()) => End::Lost,
        };
        // Dropping `run_controllers` above aborted every cache and reconcile of the term.
        leading(0.0);
        match end {
            End::Shutdown => {
                elector.release().await;
                return Ok(());
            }
            End::Lost => {
                tracing::warn!(identity = %config.identity, "leadership lost; standing by")
            }
        }
    }
}

/// Runs every controller over one set of caches until the future is dropped, which stops
/// them all. Without leader election: [`run`] calls it while leading; tests call it
/// directly (several at once, to play controllers that all believe they lead).
pub async fn run_controllers(api: Api, metrics: Metrics, options: Options) {
    let caches = Arc::new(Caches::new(api.client().clone(), metrics.clone()));
    let settings = options.settings();
    let (ipam, ipam_reconciler) = ipam::IpamController::build(&api, &caches, &metrics, settings);
    let (network, network_reconciler) =
        network::NetworkController::build(&api, &caches, &metrics, settings);
    let (gc, gc_reconciler) = gc::GarbageCollector::build(&api, &caches, &metrics, settings);
    let (scheduler, scheduler_reconciler) =
        scheduler::Scheduler::build(&api, &caches, &metrics, settings, options.scheduling);
    let (lifecycle, lifecycle_reconciler) =
        nodelifecycle::NodeLifecycle::build(&api, &caches, &metrics, settings);
    let (server, server_reconciler) =
        server::ServerController::build(&api, &caches, &metrics, settings);
    let (image, image_reconciler) =
        image::ImageController::build(&api, &caches, &metrics, settings);
    let (groups, groups_reconciler) =
        servergroup::ServerGroupController::build(&api, &caches, &metrics, settings);
    let (quotas, quota_reconciler) =
        quota::QuotaController::build(&api, &caches, &metrics, settings);
    let (routers, router_reconciler) = router::RouterController::build(
        &api,
        &caches,
        &metrics,
        settings,
        options.router_failover_grace,
    );
    let (fips, fip_reconciler) =
        floatingip::FloatingIpController::build(&api, &caches, &metrics, settings);
    let (security_groups, security_group_reconciler) =
        securitygroup::SecurityGroupController::build(&api, &caches, &metrics, settings);
    let (volumes, volume_reconciler) =
        volume::VolumeController::build(&api, &caches, &metrics, settings);
    let (snapshots, snapshot_reconciler) =
        volume::SnapshotController::build(&api, &caches, &metrics, settings);
    let mut tasks = JoinSet::new();
    caches.start(&mut tasks);
    tasks.spawn(ipam.run(ipam_reconciler));
    tasks.spawn(network.run(network_reconciler));
    tasks.spawn(gc.run(gc_reconciler));
    tasks.spawn(scheduler.run(scheduler_reconciler));
    tasks.spawn(lifecycle.run(lifecycle_reconciler));
    tasks.spawn(server.run(server_reconciler));
    tasks.spawn(image.run(image_reconciler));
    tasks.spawn(groups.run(groups_reconciler));
    tasks.spawn(quotas.run(quota_reconciler));
    tasks.spawn(routers.run(router_reconciler));
    tasks.spawn(fips.run(fip_reconciler));
    tasks.spawn(security_groups.run(security_group_reconciler));
    tasks.spawn(volumes.run(volume_reconciler));
    tasks.spawn(snapshots.run(snapshot_reconciler));
    tasks.spawn(ferro_runtime::events::expire(
        api.client().clone(),
        options.event_ttl,
        Duration::from_secs(60),
    ));
    // Every task runs forever; one ending means a bug, and the term ends with it.
    if let Some(Err(e)) = tasks.join_next().await {
        tracing::error!(error = %e, "a controller task failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_files_may_be_bare_or_a_table() {
        assert_eq!(token_from_text("abc\n"), "abc");
        assert_eq!(
            token_from_text("# tokens\nadm admin\nctl system:controllers\nn1 system:node:n1\n"),
            "ctl"
        );
        assert_eq!(token_from_text("only admin\n"), "only");
        assert_eq!(token_from_text(""), "");
    }
}
