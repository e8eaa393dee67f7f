//! `ferro bench schedule`: how fast Servers get a node and an addressed Port, against what
//! raw etcd needs for the same writes.
//!
//! One run starts a real etcd with its data on disk (fsync on), an apiserver in this
//! process, and the controllers (as a `ferro controllers` child when the binary passes its
//! own command line, so their peak memory is theirs alone). The bench plays the agents of
//! `nodes` Nodes — each registers its Node with its own node token and renews its
//! heartbeat Lease every 10 s, as `ferro agent` does; nothing else is faked — and waits
//! until node lifecycle has judged them all Ready. Then `servers` Servers with one network
//! each are created at once by `concurrency` clients; the clock runs from the first create
//! until a watch has seen every Server bound with an addressed Port. A replay of the
//! store's history counts every write of the phase by kind. Finally raw etcd performs the
//! same number of create-if-absent transactions at the same concurrency: the floor.
//!
//! The aim: all bound and addressed within twice the raw-etcd floor, and under 10 s.

use std::{
    collections::{BTreeMap, HashSet},
    ffi::OsString,
    fmt,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use ferro_api::{
    Kind, Object, Resource,
    auth::Tokens,
    client::{Client, Selection},
    owners,
    server::ApiServer,
    v1,
};
use ferro_store::{
    Store,
    etcd::EtcdStore,
    etcd_process::{EtcdOptions, EtcdProcess},
};
use futures::{FutureExt, StreamExt};

use crate::{
    ControllersConfig, Options,
    bench::{count_between, io, peak_rss_kib, raw_etcd, wait_for},
};

/// What to measure.
#[derive(Clone, Debug)]
pub struct ScheduleOptions {
    /// Nodes whose agents the bench plays.
    pub nodes: usize,
    /// Servers created at once, one network each.
    pub servers: usize,
    /// Concurrent API clients creating Servers, concurrent raw etcd writers, and keys each
    /// controller reconciles at once.
    pub concurrency: usize,
    /// Where etcd keeps its data during the run (removed afterwards).
    pub work_dir: Option<PathBuf>,
    /// The command line of `ferro controllers`; the bench appends `--server ADDR
    /// --token-file FILE --metrics-addr ADDR`. `None` runs them in this process.
    pub controllers_command: Option<Vec<OsString>>,
    /// Give up after this long.
    pub timeout: Duration,
}

impl Default for ScheduleOptions {
    fn default() -> Self {
        ScheduleOptions {
            nodes: 100,
            servers: 1_000,
            concurrency: 16,
            work_dir: None,
            controllers_command: None,
            timeout: Duration::from_secs(600),
        }
    }
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
    /// Peak resident memory of the controllers, in KiB.
    pub peak_memory_kib: u64,
    /// Whose memory that is.
    pub memory_scope: &'static str,
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
        writeln!(
            f,
            "ferro bench schedule: {} servers (one network each) on {} nodes, concurrency {}",
            self.servers, self.nodes, self.concurrency
        )?;
        writeln!(
            f,
            "  all created after              {:>8.2} s",
            self.create_time.as_secs_f64()
        )?;
        writeln!(
            f,
            "  all bound and addressed after  {:>8.2} s",
            self.done_time.as_secs_f64()
        )?;
        writeln!(
            f,
            "  binds/s                        {:>8.0}",
            self.binds_per_second()
        )?;
        let kinds: Vec<String> = self
            .writes_by_kind
            .iter()
            .map(|(k, n)| format!("{k} {n}"))
            .collect();
        writeln!(
            f,
            "  store writes per server        {:>8.2}   ({})",
            self.writes_per_server(),
            kinds.join(", ")
        )?;
        writeln!(
            f,
            "  raw etcd, {} writes            {:>8.2} s   (create-if-absent txns, {} clients)",
            self.writes(),
            self.raw_time.as_secs_f64(),
            self.concurrency
        )?;
        writeln!(
            f,
            "  servers per node               {} to {}",
            self.spread.0, self.spread.1
        )?;
        writeln!(
            f,
            "  aim: <= 2 x raw ({:.2} s) and < 10 s: {}",
            (self.raw_time * 2).as_secs_f64(),
            if self.meets_aims() { "met" } else { "NOT met" }
        )?;
        write!(
            f,
            "  controllers peak RSS           {:>8.1} MiB ({})",
            self.peak_memory_kib as f64 / 1024.0,
            self.memory_scope
        )
    }
}

/// Why the bench could not finish (the IPAM bench's errors).
pub use crate::bench::BenchError as ScheduleBenchError;

type BenchResult<T> = Result<T, ScheduleBenchError>;

const ADMIN_TOKEN: &str = "bench-admin-token";
const CONTROLLERS_TOKEN: &str = "bench-controllers-token";
const RAW_VALUE_BYTES: usize = 600;
const HEARTBEAT: Duration = Duration::from_secs(10);
const LEASE_SECONDS: u32 = 40;

fn node_name(i: usize) -> String {
    format!("bench-node-{i:03}")
}

fn node_token(i: usize) -> String {
    format!("bench-node-token-{i:03}")
}

/// Runs `ferro bench schedule`.
pub async fn bench_schedule(options: ScheduleOptions) -> BenchResult<ScheduleReport> {
    let base = options.work_dir.clone().unwrap_or_else(std::env::temp_dir);
    let work = base.join(format!(
        "ferro-bench-schedule-{}-{}",
        std::process::id(),
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::create_dir_all(&work).map_err(io(format!("creating {}", work.display())))?;
    let result = run(&options, &work).await;
    let _ = std::fs::remove_dir_all(&work);
    result
}

async fn run(options: &ScheduleOptions, work: &Path) -> BenchResult<ScheduleReport> {
    let etcd = EtcdProcess::start(EtcdOptions::persistent(work.join("etcd"))).await?;
    let store: Arc<dyn Store> =
        Arc::new(EtcdStore::connect(&[etcd.client_url().to_owned()]).await?);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(io("binding the apiserver"))?;
    let address = listener
        .local_addr()
        .map_err(io("apiserver address"))?
        .to_string();
    let mut tokens = format!("{ADMIN_TOKEN} admin\n{CONTROLLERS_TOKEN} system:controllers\n");
    for i in 0..options.nodes {
        tokens.push_str(&format!("{} system:node:{}\n", node_token(i), node_name(i)));
    }
    let server = ApiServer::new(store.clone(), Tokens::parse(&tokens));
    let (stop_server, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(async move {
        let incoming = futures::stream::unfold(listener, |listener| async move {
            let accepted = listener.accept().await.map(|(socket, _)| {
                let _ = socket.set_nodelay(true);
                socket
            });
            Some((accepted, listener))
        });
        let _ = tonic::transport::Server::builder()
            .add_service(server.into_service())
            .serve_with_incoming_shutdown(incoming, async {
                let _ = stopped.await;
            })
            .await;
    });

    let mut agents = play_agents(&address, options.nodes).await?;
    let controllers = Controllers::start(options, &address, work)?;
    let outcome = measure(options, &address, store.clone()).await;
    let (peak_memory_kib, memory_scope) = controllers.stop().await;
    agents.abort_all();
    let mut report = match outcome {
        Ok(report) => report,
        Err(e) => {
            let _ = stop_server.send(());
            return Err(e);
        }
    };
    let _ = stop_server.send(());
    let _ = tokio::time::timeout(Duration::from_secs(5), serving).await;
    drop(store);
    drop(etcd);
    // The floor, on an etcd of its own: etcd 3.4 copies its read buffer, grown to the
    // busiest commit interval so far, on every transaction it applies, so a shared etcd
    // would carry one phase's burst into the other.
    let raw_etcd_process =
        EtcdProcess::start(EtcdOptions::persistent(work.join("raw-etcd"))).await?;
    let raw_store: Arc<dyn Store> =
        Arc::new(EtcdStore::connect(&[raw_etcd_process.client_url().to_owned()]).await?);
    report.raw_time = raw_etcd(
        raw_store,
        options.concurrency,
        report.writes() as usize,
        RAW_VALUE_BYTES,
    )
    .await?;
    drop(raw_etcd_process);
    report.peak_memory_kib = peak_memory_kib;
    report.memory_scope = memory_scope;
    Ok(report)
}

fn timestamp() -> prost_types::Timestamp {
    ferro_runtime::now()
}

/// Registers each node with its own token and renews its Lease every 10 s, as the agent
/// does.
async fn play_agents(address: &str, nodes: usize) -> BenchResult<tokio::task::JoinSet<()>> {
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
            zone: "az1".into(),
            roles: vec![v1::node_status::Role::Compute as i32],
            address: format!("127.0.1.{}", i % 250 + 1),
            ..Default::default()
        };
        let host_ready = ferro_runtime::condition("HostReady", true, "HostReady", "bench host");
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

fn ready(conditions: &[v1::Condition]) -> bool {
    conditions
        .iter()
        .any(|c| c.r#type == "Ready" && c.status == v1::condition::Status::True as i32)
}

async fn measure(
    options: &ScheduleOptions,
    address: &str,
    store: Arc<dyn Store>,
) -> BenchResult<ScheduleReport> {
    let admin = Client::connect_lazy(address, ADMIN_TOKEN)?;
    let setup = ferro_api::codec::decode_yaml(
        "apiVersion: ferro/v1\nkind: Network\nmetadata: {name: bench}\nspec:\n  subnets:\n  - {name: a, cidr: 10.128.0.0/16}\n\
         ---\napiVersion: ferro/v1\nkind: Flavor\nmetadata: {name: bench}\nspec: {vcpus: 1, ramMib: 512, diskGib: 1}\n\
         ---\napiVersion: ferro/v1\nkind: Image\nmetadata: {name: bench}\nspec: {source: {url: file:///nonexistent/bench.raw}, diskFormat: Raw}\n",
    )
    .map_err(|e| ScheduleBenchError::Timeout(format!("the bench's own manifests: {e}")))?;
    for object in setup {
        admin.create(object).await?;
    }
    // A Ready Network and Ready Nodes: the controllers lead, have synced and judged.
    wait_for(
        "the network and every node Ready",
        Duration::from_secs(120),
        || async {
            let network = admin
                .get_typed::<v1::Network>("default", "bench")
                .await
                .ok()?;
            let (nodes, _) = admin.list(Kind::Node, &Selection::all()).await.ok()?;
            let ready_nodes = nodes
                .into_iter()
                .filter_map(v1::Node::from_object)
                .filter(|n| n.status.as_ref().is_some_and(|s| ready(&s.conditions)))
                .count();
            (ready(&network.status?.conditions) && ready_nodes == options.nodes).then_some(())
        },
    )
    .await?;

    let (_, revision) = admin.list(Kind::Server, &Selection::all()).await?;
    let start_revision = store.current_revision().await?;
    let mut stream = Box::pin(
        admin
            .watch(Kind::Server, &Selection::all(), revision)
            .await?,
    );
    let total = options.servers;
    let watcher = tokio::spawn(async move {
        let mut finished: HashSet<String> = HashSet::new();
        let mut placement: BTreeMap<String, String> = BTreeMap::new();
        while let Some(Ok(event)) = stream.next().await {
            let Some(server) = event
                .object
                .and_then(|o| Object::try_from(o).ok())
                .and_then(v1::Server::from_object)
            else {
                continue;
            };
            if done(&server) {
                let name = server
                    .metadata()
                    .map(|m| m.name.clone())
                    .unwrap_or_default();
                placement.insert(name.clone(), server.status.clone().unwrap_or_default().node);
                finished.insert(name);
                if finished.len() >= total {
                    return (Instant::now(), placement);
                }
            }
        }
        (Instant::now(), placement)
    });

    let start = Instant::now();
    let next = Arc::new(AtomicUsize::new(0));
    let mut creators = tokio::task::JoinSet::new();
    for _ in 0..options.concurrency.max(1) {
        let client = Client::connect_lazy(address, ADMIN_TOKEN)?;
        let next = next.clone();
        creators.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    return Ok::<(), ferro_api::Error>(());
                }
                let server = Object::Server(v1::Server {
                    metadata: Some(v1::ObjectMeta {
                        name: format!("server-{i:05}"),
                        ..Default::default()
                    }),
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
                });
                client.create(server).await?;
            }
        });
    }
    while let Some(result) = creators.join_next().await {
        result.map_err(|e| ScheduleBenchError::Timeout(format!("a creator failed: {e}")))??;
    }
    let create_time = start.elapsed();
    let (end, placement) = tokio::time::timeout(options.timeout, watcher)
        .await
        .map_err(|_| {
            ScheduleBenchError::Timeout(format!(
                "not every server was bound and addressed within {:?}",
                options.timeout
            ))
        })?
        .map_err(|e| ScheduleBenchError::Timeout(format!("the server watcher failed: {e}")))?;
    let done_time = end.duration_since(start);
    let end_revision = store.current_revision().await?;
    let writes_by_kind = count_between(store, start_revision, end_revision).await?;
    let mut per_node: BTreeMap<&str, usize> = BTreeMap::new();
    for node in placement.values() {
        *per_node.entry(node.as_str()).or_default() += 1;
    }
    let names: Vec<String> = (0..options.nodes).map(node_name).collect();
    let counts: Vec<usize> = names
        .iter()
        .map(|n| per_node.get(n.as_str()).copied().unwrap_or(0))
        .collect();
    let spread = (
        counts.iter().copied().min().unwrap_or(0),
        counts.iter().copied().max().unwrap_or(0),
    );
    Ok(ScheduleReport {
        nodes: options.nodes,
        servers: total,
        concurrency: options.concurrency,
        create_time,
        done_time,
        writes_by_kind,
        raw_time: Duration::ZERO,
        spread,
        peak_memory_kib: 0,
        memory_scope: "",
    })
}

enum Controllers {
    Child(tokio::process::Child),
    InProcess(tokio::task::JoinHandle<()>),
}

impl Controllers {
    fn start(options: &ScheduleOptions, address: &str, work: &Path) -> BenchResult<Self> {
        if let Some(command) = options
            .controllers_command
            .as_ref()
            .filter(|c| !c.is_empty())
        {
            let token_file = work.join("controllers.token");
            std::fs::write(
                &token_file,
                format!("{CONTROLLERS_TOKEN} system:controllers\n"),
            )
            .map_err(io("writing the token file"))?;
            let log = std::fs::File::create(work.join("controllers.log"))
                .map_err(io("creating the controllers' log"))?;
            let err = log
                .try_clone()
                .map_err(io("opening the controllers' log"))?;
            let child = tokio::process::Command::new(&command[0])
                .args(&command[1..])
                .arg("--server")
                .arg(address)
                .arg("--token-file")
                .arg(&token_file)
                .stdout(log)
                .stderr(err)
                .kill_on_drop(true)
                .spawn()
                .map_err(io(format!("starting {command:?}")))?;
            return Ok(Controllers::Child(child));
        }
        let mut config = ControllersConfig::new(address, CONTROLLERS_TOKEN);
        config.identity = "bench".into();
        config.options = Options {
            concurrency: options.concurrency,
            ..Options::default()
        };
        config.shutdown = Some(std::future::pending::<()>().boxed());
        Ok(Controllers::InProcess(tokio::spawn(async move {
            if let Err(e) = crate::run(config).await {
                tracing::error!(error = %e, "the controllers stopped");
            }
        })))
    }

    async fn stop(self) -> (u64, &'static str) {
        match self {
            Controllers::Child(mut child) => {
                let peak = child.id().and_then(peak_rss_kib).unwrap_or_default();
                let _ = child.kill().await;
                (peak, "the controllers' own process")
            }
            Controllers::InProcess(task) => {
                task.abort();
                (
                    peak_rss_kib(std::process::id()).unwrap_or_default(),
                    "this whole process: apiserver, controllers and bench clients",
                )
            }
        }
    }
}
