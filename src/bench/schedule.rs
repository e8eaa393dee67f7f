//! `ferro bench schedule`: how fast Servers get a node and an addressed Port, against what
//! raw etcd needs for the same writes.
//!
//! One run starts, through the [`harness`](super::harness), a real etcd with its data on
//! disk (fsync on), a `ferro apiserver` and `ferro controllers`, each its own process so
//! the controllers' peak memory is theirs alone. The bench plays the agents of `nodes`
//! Nodes — each registers its Node with its own node token and renews its heartbeat Lease
//! every 10 s, as `ferro agent` does; nothing else is faked — and waits until node
//! lifecycle has judged them all Ready. Then `servers` Servers with one network each are
//! created at once by `clients` clients; the clock runs from the first create until a
//! watch has seen every Server bound with an addressed Port. A replay of the store's
//! history counts every write of the phase by kind. Finally raw etcd performs the same
//! number of create-if-absent transactions at the same concurrency: the floor.
//!
//! The aim: all bound and addressed within twice the raw-etcd floor, and under 10 s.

use std::{
    collections::BTreeMap,
    fmt,
    sync::Arc,
    time::{Duration, SystemTime},
};

use anyhow::Result;
use ferro_api::{
    Kind, Object, Resource,
    client::{Client, Selection},
    owners, v1,
};
use ferro_store::Store;

use super::harness::{
    self, Apiserver, Controllers, Etcd, Figures, Workspace, is_ready, mib, wait_for, writes_line,
};

/// Arguments of `ferro bench schedule`.
#[derive(clap::Args, Debug)]
pub struct ScheduleArgs {
    /// Nodes whose agents the bench plays.
    #[arg(long, default_value_t = 100)]
    pub nodes: usize,
    /// Servers created at once, one network each.
    #[arg(long, default_value_t = 1_000)]
    pub servers: usize,
    /// Concurrent clients creating them (and raw etcd writers).
    #[arg(long, default_value_t = 16)]
    pub clients: usize,
}

/// The figures of one run.
#[derive(Clone, Debug)]
pub struct ScheduleReport {
    /// Nodes.
    pub nodes: usize,
    /// Servers bound and addressed.
    pub servers: usize,
    /// The concurrency used throughout.
    pub concurrency: usize,
    /// From the first create until every Server was created.
    pub create_time: Duration,
    /// From the first create until every Server was seen bound with an addressed Port.
    pub done_time: Duration,
    /// Store writes during the phase, by kind.
    pub writes_by_kind: BTreeMap<String, u64>,
    /// How long raw etcd took for as many writes at the same concurrency.
    pub raw_time: Duration,
    /// Servers per node at the end: (fewest, most).
    pub spread: (usize, usize),
    /// Peak resident memory of the controllers' process, in KiB.
    pub peak_memory_kib: u64,
}

impl ScheduleReport {
    /// Every store write of the phase.
    pub fn writes(&self) -> u64 {
        self.writes_by_kind.values().sum()
    }

    /// Store writes per Server.
    pub fn writes_per_server(&self) -> f64 {
        self.writes() as f64 / self.servers as f64
    }

    /// Binds per second, from the first create.
    pub fn binds_per_second(&self) -> f64 {
        self.servers as f64 / self.done_time.as_secs_f64()
    }

    /// Whether the aims are met: within twice the raw floor, and under 10 s.
    pub fn meets_aims(&self) -> bool {
        self.done_time <= self.raw_time * 2 && self.done_time < Duration::from_secs(10)
    }
}

impl fmt::Display for ScheduleReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let title = format_args!(
            "ferro bench schedule: {} servers (one network each) on {} nodes, concurrency {}",
            self.servers, self.nodes, self.concurrency
        );
        let mut out = Figures::new(f, 30, title)?;
        let seconds = |d: Duration| d.as_secs_f64();
        out.seconds("all created after", self.create_time)?;
        out.seconds("all bound and addressed after", self.done_time)?;
        out.line("binds/s", format_args!("{:>8.0}", self.binds_per_second()))?;
        out.line(
            "store writes per server",
            format_args!(
                "{:>8.2}   ({})",
                self.writes_per_server(),
                writes_line(&self.writes_by_kind)
            ),
        )?;
        out.line(
            &format!("raw etcd, {} writes", self.writes()),
            format_args!(
                "{:>8.2} s   (create-if-absent txns, {} clients)",
                seconds(self.raw_time),
                self.concurrency
            ),
        )?;
        out.line(
            "servers per node",
            format_args!("{} to {}", self.spread.0, self.spread.1),
        )?;
        out.note(format_args!(
            "aim: <= 2 x raw ({:.2} s) and < 10 s: {}",
            seconds(self.raw_time * 2),
            if self.meets_aims() { "met" } else { "NOT met" }
        ))?;
        out.line(
            "controllers peak RSS",
            format_args!("{:>12} (their own process)", mib(self.peak_memory_kib)),
        )
    }
}

const RAW_VALUE_BYTES: usize = 600;
const HEARTBEAT: Duration = Duration::from_secs(10);
const LEASE_SECONDS: u32 = 40;

fn node_name(i: usize) -> String {
    format!("bench-node-{i:03}")
}

fn node_token(i: usize) -> String {
    format!("bench-node-token-{i:03}")
}

/// Runs `ferro bench schedule` and prints its figures.
pub async fn run(args: ScheduleArgs) -> Result<()> {
    let work = Workspace::new("schedule", None)?;
    let mut report = {
        let etcd = Etcd::start(work.path().join("etcd")).await?;
        let nodes: Vec<(String, String)> = (0..args.nodes)
            .map(|i| (node_token(i), format!("system:node:{}", node_name(i))))
            .collect();
        let tokens = harness::token_file(work.path(), &nodes)?;
        let apiserver = Apiserver::start(work.path(), &etcd, &tokens).await?;
        let mut agents = play_agents(&apiserver.address, args.nodes).await?;
        let controllers = Controllers::start(work.path(), &apiserver, &tokens)?;
        let outcome = measure(&args, &apiserver.address, etcd.store.clone()).await;
        let figures = controllers.stop().await;
        agents.abort_all();
        let mut report = outcome?;
        report.peak_memory_kib = figures.peak_rss_kib;
        report
    };
    // The floor, after Ferro's etcd has stopped: as many writes, on an etcd of its own.
    report.raw_time = harness::raw_floor(
        work.path(),
        args.clients,
        report.writes() as usize,
        RAW_VALUE_BYTES,
    )
    .await?;
    println!("{report}");
    Ok(())
}

fn timestamp() -> prost_types::Timestamp {
    let since_epoch = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    prost_types::Timestamp {
        seconds: since_epoch.as_secs() as i64,
        nanos: since_epoch.subsec_nanos() as i32,
    }
}

/// Registers each node with its own token and renews its Lease every 10 s, as the agent
/// does.
async fn play_agents(address: &str, nodes: usize) -> Result<tokio::task::JoinSet<()>> {
    let mut agents = tokio::task::JoinSet::new();
    for i in 0..nodes {
        let client = Client::connect_lazy(address, &node_token(i))?;
        let name = node_name(i);
        client
            .create(Object::Node(v1::Node {
                metadata: Some(v1::ObjectMeta {
                    name: name.clone(),
                    ..Default::default()
                }),
                spec: Some(v1::NodeSpec::default()),
                status: None,
            }))
            .await?;
        let resources = v1::NodeResources {
            vcpus: 64,
            ram_mib: 256 * 1024,
            disk_gib: 2000,
        };
        let status = v1::NodeStatus {
            capacity: Some(resources),
            allocatable: Some(resources),
            hypervisor: "QEMU".into(),
            network_driver: "ovs".into(),
            zone: "az1".into(),
            roles: vec![v1::node_status::Role::Compute as i32],
            address: format!("127.0.1.{}", i % 250 + 1),
            ..Default::default()
        };
        let host_ready = v1::Condition {
            r#type: "HostReady".into(),
            status: v1::condition::Status::True as i32,
            reason: "HostReady".into(),
            message: "bench host".into(),
            last_transition_time: Some(timestamp()),
            ..Default::default()
        };
        client
            .update_status(
                Object::Node(v1::Node {
                    metadata: Some(v1::ObjectMeta {
                        name: name.clone(),
                        ..Default::default()
                    }),
                    spec: None,
                    status: Some(status),
                }),
                owners::AGENT,
                &[
                    "capacity",
                    "allocatable",
                    "hypervisor",
                    "zone",
                    "roles",
                    "address",
                    "networkDriver",
                ],
                vec![host_ready],
            )
            .await?;
        let lease_name = format!("node-{name}");
        let lease = v1::Lease {
            metadata: Some(v1::ObjectMeta {
                name: lease_name.clone(),
                ..Default::default()
            }),
            spec: Some(v1::LeaseSpec {
                holder_identity: name.clone(),
                lease_duration_seconds: LEASE_SECONDS,
                acquire_time: Some(timestamp()),
                renew_time: Some(timestamp()),
                lease_transitions: 0,
            }),
            status: None,
        };
        client.create(Object::Lease(lease)).await?;
        agents.spawn(async move {
            let mut ticker = tokio::time::interval(HEARTBEAT);
            ticker.tick().await;
            loop {
                ticker.tick().await;
                let Ok(mut lease) = client.get_typed::<v1::Lease>("", &lease_name).await else {
                    continue;
                };
                if let Some(spec) = lease.spec.as_mut() {
                    spec.renew_time = Some(timestamp());
                }
                let _ = client.update(Object::Lease(lease)).await;
            }
        });
    }
    Ok(agents)
}

fn done(server: &v1::Server) -> bool {
    server.status.as_ref().is_some_and(|s| {
        !s.node.is_empty() && s.addresses.len() == 1 && !s.addresses[0].ips.is_empty()
    })
}

async fn measure(
    args: &ScheduleArgs,
    address: &str,
    store: Arc<dyn Store>,
) -> Result<ScheduleReport> {
    let admin = harness::admin(address)?;
    harness::create_yaml(&admin, harness::BENCH_NETWORK).await?;
    harness::create_yaml(
        &admin,
        "apiVersion: ferro/v1\nkind: Flavor\nmetadata: {name: bench}\nspec: {vcpus: 1, ramMib: 512, diskGib: 1}\n\
         ---\napiVersion: ferro/v1\nkind: Image\nmetadata: {name: bench}\nspec: {source: {url: file:///nonexistent/bench.raw}, diskFormat: Raw}\n",
    )
    .await?;
    // A Ready Network and Ready Nodes: the controllers lead, have synced and judged.
    wait_for(
        "the network and every node Ready",
        Duration::from_secs(120),
        || async {
            let (nodes, _) = admin.list(Kind::Node, &Selection::all()).await.ok()?;
            let ready_nodes = nodes
                .into_iter()
                .filter_map(v1::Node::from_object)
                .filter(|n| n.status.as_ref().is_some_and(|s| is_ready(&s.conditions)))
                .count();
            (ready_nodes == args.nodes && harness::bench_network_ready(&admin).await).then_some(())
        },
    )
    .await?;

    let phase = harness::create_and_watch(
        store,
        address,
        args.clients,
        args.servers,
        "every server bound and addressed",
        |server: &v1::Server| done(server).then(|| server.status.clone().unwrap_or_default().node),
        |i| {
            Object::Server(v1::Server {
                metadata: harness::named(format!("server-{i:05}")),
                spec: Some(v1::ServerSpec {
                    flavor: "bench".into(),
                    image: "bench".into(),
                    networks: vec![v1::ServerNetwork {
                        network: "bench".into(),
                        ..Default::default()
                    }],
                    ..Default::default()
                }),
                status: None,
            })
        },
    )
    .await?;
    let mut per_node: BTreeMap<&str, usize> = BTreeMap::new();
    for node in phase.done.values() {
        *per_node.entry(node.as_str()).or_default() += 1;
    }
    let names: Vec<String> = (0..args.nodes).map(node_name).collect();
    let counts: Vec<usize> = names
        .iter()
        .map(|n| per_node.get(n.as_str()).copied().unwrap_or(0))
        .collect();
    let spread = (
        counts.iter().copied().min().unwrap_or(0),
        counts.iter().copied().max().unwrap_or(0),
    );
    Ok(ScheduleReport {
        nodes: args.nodes,
        servers: args.servers,
        concurrency: args.clients,
        create_time: phase.create_time,
        done_time: phase.done_time,
        writes_by_kind: phase.writes_by_kind,
        raw_time: Duration::ZERO,
        spread,
        peak_memory_kib: 0,
    })
}
