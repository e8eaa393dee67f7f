//! `ferro bench ipam`: how fast IPAM addresses Ports, against what etcd can write.
//!
//! One run starts a real etcd with its data on disk (fsync on, as under `ferro up`), an
//! apiserver in this process, and the controllers — in this process, or as a `ferro
//! controllers` child when the binary passes its own command line, so that their peak
//! memory is theirs alone. Then:
//! 1. raw etcd: create-if-absent transactions of Port-sized values from `concurrency`
//!    clients, straight through [`EtcdStore`] — the ceiling;
//! 2. IPAM: a Network with one big subnet, then `ports` Ports created at once by
//!    `concurrency` API clients; the clock runs from the first create until a watch has
//!    seen every Port addressed. A store watch counts every write of the phase by kind,
//!    so "writes per Port" is measured, not assumed.
//!
//! The aim: addressed Ports per second at least half of raw writes per second divided by
//! writes per Port, and no more than four writes per Port.

use std::{
    collections::{BTreeMap, HashSet},
    ffi::OsString,
    fmt,
    path::PathBuf,
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
    server::ApiServer,
    v1,
};
use ferro_store::{
    Compare, KeyRange, Store, Txn, TxnOp, WatchRequest,
    etcd::EtcdStore,
    etcd_process::{EtcdOptions, EtcdProcess},
};
use futures::{FutureExt, StreamExt};

use crate::{ControllersConfig, Options};

/// What to measure.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    /// Ports to create.
    pub ports: usize,
    /// The subnet they share.
    pub cidr: String,
    /// Concurrent API clients creating Ports, concurrent raw etcd writers, and keys the
    /// IPAM controller reconciles at once.
    pub concurrency: usize,
    /// Raw etcd transactions to time.
    pub raw_writes: usize,
    /// Where etcd keeps its data during the run (removed afterwards); the system's
    /// temporary directory by default.
    pub work_dir: Option<PathBuf>,
    /// The command line of `ferro controllers` (e.g. `[<ferro>, "controllers"]`); the
    /// bench appends `--server ADDR --token-file FILE --metrics-addr ADDR`. `None` runs them in this process.
    pub controllers_command: Option<Vec<OsString>>,
    /// Give up when the Ports are not all addressed after this long.
    pub timeout: Duration,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            ports: 5_000,
            cidr: "10.128.0.0/16".into(),
            concurrency: 16,
            raw_writes: 10_000,
            work_dir: None,
            controllers_command: None,
            timeout: Duration::from_secs(600),
        }
    }
}

/// The figures of one run.
#[derive(Clone, Debug)]
pub struct BenchReport {
    /// Ports created and addressed.
    pub ports: usize,
    /// The concurrency used throughout.
    pub concurrency: usize,
    /// From the first create until every Port was created.
    pub create_time: Duration,
    /// From the first create until every Port was seen addressed.
    pub addressed_time: Duration,
    /// Store writes during the phase, by kind (`ports`, `ipaddresses`, …).
    pub writes_by_kind: BTreeMap<String, u64>,
    /// Raw etcd create-if-absent transactions per second.
    pub raw_writes_per_second: f64,
    /// Peak resident memory of the controllers, in KiB.
    pub peak_memory_kib: u64,
    /// Whose memory that is: the controllers' own process, or this whole process.
    pub memory_scope: &'static str,
    /// Per controller: reconciles, failed reconciles, mean reconcile seconds.
    pub reconciles: BTreeMap<String, (f64, f64, f64)>,
}

impl BenchReport {
    /// Ports addressed per second, from the first create.
    pub fn ports_per_second(&self) -> f64 {
        self.ports as f64 / self.addressed_time.as_secs_f64()
    }

    /// Store writes per Port: every write of the phase (creates, claims, status, and the
    /// Lease renewals meanwhile) over the Ports.
    pub fn writes_per_port(&self) -> f64 {
        self.writes_by_kind.values().sum::<u64>() as f64 / self.ports as f64
    }

    /// Store writes per Port made by the controllers (everything but the Port's creation).
    pub fn controller_writes_per_port(&self) -> f64 {
        let creates = self
            .writes_by_kind
            .get("ports")
            .copied()
            .unwrap_or_default()
            .min(self.ports as u64);
        (self.writes_by_kind.values().sum::<u64>() - creates) as f64 / self.ports as f64
    }

    /// The aim: half of what raw etcd would allow at this many writes per Port.
    pub fn target_ports_per_second(&self) -> f64 {
        self.raw_writes_per_second / self.writes_per_port() / 2.0
    }

    /// Whether both aims are met.
    pub fn meets_aims(&self) -> bool {
        self.ports_per_second() >= self.target_ports_per_second() && self.writes_per_port() <= 4.05
    }
}

impl fmt::Display for BenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "ferro bench ipam: {} ports on one subnet, concurrency {}",
            self.ports, self.concurrency
        )?;
        writeln!(
            f,
            "  all created after      {:>8.2} s",
            self.create_time.as_secs_f64()
        )?;
        writeln!(
            f,
            "  all addressed after    {:>8.2} s",
            self.addressed_time.as_secs_f64()
        )?;
        writeln!(
            f,
            "  ports addressed/s      {:>8.0}",
            self.ports_per_second()
        )?;
        let kinds: Vec<String> = self
            .writes_by_kind
            .iter()
            .map(|(k, n)| format!("{k} {n}"))
            .collect();
        writeln!(
            f,
            "  store writes per port  {:>8.2}   ({} by controllers; {})",
            self.writes_per_port(),
            format_args!("{:.2}", self.controller_writes_per_port()),
            kinds.join(", ")
        )?;
        writeln!(
            f,
            "  raw etcd writes/s      {:>8.0}   (create-if-absent txns, {} clients)",
            self.raw_writes_per_second, self.concurrency
        )?;
        writeln!(
            f,
            "  aim: ports/s >= {:.0} (raw / writes per port / 2), writes per port <= 4: {}",
            self.target_ports_per_second(),
            if self.meets_aims() { "met" } else { "NOT met" }
        )?;
        for (controller, (runs, errors, mean)) in &self.reconciles {
            writeln!(
                f,
                "  {controller:<22} {runs:>8.0} reconciles, {errors:.0} failed, mean {:.1} ms",
                mean * 1000.0
            )?;
        }
        write!(
            f,
            "  controllers peak RSS   {:>8.1} MiB ({})",
            self.peak_memory_kib as f64 / 1024.0,
            self.memory_scope
        )
    }
}

/// Why the bench could not run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// etcd did not start.
    #[error("cannot start etcd")]
    Etcd(#[from] ferro_store::etcd_process::EtcdProcessError),
    /// The store failed.
    #[error("etcd store")]
    Store(#[from] ferro_store::StoreError),
    /// An API call failed.
    #[error("API call")]
    Api(#[from] ferro_api::Error),
    /// Files, sockets or the controllers' process.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// Something took longer than the bench allows.
    #[error("{0}")]
    Timeout(String),
}

pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> BenchError {
    let what = what.into();
    move |source| BenchError::Io { what, source }
}

const ADMIN_TOKEN: &str = "bench-admin-token";
const CONTROLLERS_TOKEN: &str = "bench-controllers-token";

/// A value the size of a stored Port with its status, for the raw etcd phase.
const RAW_VALUE_BYTES: usize = 400;

/// Runs the benchmark and returns its figures (print them with `{}`).
pub async fn bench_ipam(options: BenchOptions) -> Result<BenchReport, BenchError> {
    let base = options.work_dir.clone().unwrap_or_else(std::env::temp_dir);
    let work = base.join(format!(
        "ferro-bench-ipam-{}-{}",
        std::process::id(),
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::create_dir_all(&work).map_err(io(format!("creating {}", work.display())))?;
    let result = run(&options, &work).await;
    let _ = std::fs::remove_dir_all(&work);
    result
}

async fn run(options: &BenchOptions, work: &std::path::Path) -> Result<BenchReport, BenchError> {
    // 1. The ceiling: raw etcd writes at the same concurrency, on an etcd of its own. A
    //    shared one would carry the raw phase's write burst into Ferro's: etcd 3.4 copies
    //    its read buffer, grown to the busiest commit interval so far, on every
    //    transaction it applies.
    let raw_writes_per_second = {
        let etcd = EtcdProcess::start(EtcdOptions::persistent(work.join("raw-etcd"))).await?;
        let store: Arc<dyn Store> =
            Arc::new(EtcdStore::connect(&[etcd.client_url().to_owned()]).await?);
        let took = raw_etcd(
            store,
            options.concurrency,
            options.raw_writes,
            RAW_VALUE_BYTES,
        )
        .await?;
        options.raw_writes as f64 / took.as_secs_f64()
    };

    let etcd = EtcdProcess::start(EtcdOptions::persistent(work.join("etcd"))).await?;
    let store: Arc<dyn Store> =
        Arc::new(EtcdStore::connect(&[etcd.client_url().to_owned()]).await?);

    // 2. The apiserver, in this process.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(io("binding the apiserver"))?;
    let address = listener
        .local_addr()
        .map_err(io("apiserver address"))?
        .to_string();
    let tokens = format!("{ADMIN_TOKEN} admin\n{CONTROLLERS_TOKEN} system:controllers\n");
    let server = ApiServer::new(store.clone(), Tokens::parse(&tokens));
    let (stop_server, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(async move {
        // Small request/response pairs must not wait for Nagle's algorithm: accepted
        // sockets get TCP_NODELAY (tonic sets it only on listeners it binds itself).
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

    // 3. The controllers.
    let controllers = Controllers::start(options, &address, work)?;
    let outcome = measure(options, &address, store.clone()).await;
    let (reconciles, peak_memory_kib, memory_scope) = controllers.stop().await;
    finish(serving, stop_server).await;
    drop(etcd);
    let mut report = outcome?;
    report.raw_writes_per_second = raw_writes_per_second;
    report.peak_memory_kib = peak_memory_kib;
    report.memory_scope = memory_scope;
    report.reconciles = reconciles;
    Ok(report)
}

/// The controllers under test: a child `ferro controllers`, or tasks of this process.
enum Controllers {
    Child(tokio::process::Child, std::net::SocketAddr),
    InProcess(tokio::task::JoinHandle<()>, std::net::SocketAddr),
}

/// A loopback address nobody listens on now.
fn free_address() -> Result<std::net::SocketAddr, BenchError> {
    let listener =
        std::net::TcpListener::bind("127.0.0.1:0").map_err(io("picking a metrics port"))?;
    listener.local_addr().map_err(io("picking a metrics port"))
}

/// Reconciles per controller from a metrics endpoint: count, failures, mean seconds.
async fn scrape_reconciles(addr: std::net::SocketAddr) -> BTreeMap<String, (f64, f64, f64)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut text = String::new();
    if let Ok(mut socket) = tokio::net::TcpStream::connect(addr).await {
        let _ = socket.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").await;
        let _ = socket.read_to_string(&mut text).await;
    }
    let mut out: BTreeMap<String, (f64, f64, f64)> = BTreeMap::new();
    let mut sums: BTreeMap<String, f64> = BTreeMap::new();
    for line in text.lines() {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        let Some(controller) = series
            .split("controller=\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
        else {
            continue;
        };
        let entry = out.entry(controller.to_owned()).or_default();
        if series.starts_with("ferro_controller_reconciles_total") {
            entry.0 = value;
        } else if series.starts_with("ferro_controller_reconcile_errors_total") {
            entry.1 = value;
        } else if series.starts_with("ferro_controller_reconcile_duration_seconds_sum") {
            sums.insert(controller.to_owned(), value);
        }
    }
    for (controller, entry) in out.iter_mut() {
        entry.2 = sums.get(controller).copied().unwrap_or_default() / entry.0.max(1.0);
    }
    out.retain(|_, e| e.0 > 0.0);
    out
}

impl Controllers {
    fn start(
        options: &BenchOptions,
        address: &str,
        work: &std::path::Path,
    ) -> Result<Self, BenchError> {
        let metrics = free_address()?;
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
                .arg("--metrics-addr")
                .arg(metrics.to_string())
                .stdout(log)
                .stderr(err)
                .kill_on_drop(true)
                .spawn()
                .map_err(io(format!("starting {command:?}")))?;
            return Ok(Controllers::Child(child, metrics));
        }
        let mut config = ControllersConfig::new(address, CONTROLLERS_TOKEN);
        config.identity = "bench".into();
        config.metrics_addr = Some(metrics);
        config.options = Options {
            concurrency: options.concurrency,
            ..Options::default()
        };
        config.shutdown = Some(std::future::pending::<()>().boxed());
        let task = tokio::spawn(async move {
            if let Err(e) = crate::run(config).await {
                tracing::error!(error = %e, "the controllers stopped");
            }
        });
        Ok(Controllers::InProcess(task, metrics))
    }

    /// Stops them; returns their reconcile figures, peak memory and whose memory it is.
    async fn stop(self) -> (BTreeMap<String, (f64, f64, f64)>, u64, &'static str) {
        match self {
            Controllers::Child(mut child, metrics) => {
                let reconciles = scrape_reconciles(metrics).await;
                let peak = child.id().and_then(peak_rss_kib).unwrap_or_default();
                let _ = child.kill().await;
                (reconciles, peak, "the controllers' own process")
            }
            Controllers::InProcess(task, metrics) => {
                let reconciles = scrape_reconciles(metrics).await;
                task.abort();
                let peak = peak_rss_kib(std::process::id()).unwrap_or_default();
                (
                    reconciles,
                    peak,
                    "this whole process: apiserver, controllers and bench clients",
                )
            }
        }
    }
}

async fn finish(serving: tokio::task::JoinHandle<()>, stop: tokio::sync::oneshot::Sender<()>) {
    let _ = stop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(5), serving).await;
}

/// `VmHWM` of a process, in KiB.
pub(crate) fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Times `writes` create-if-absent transactions of `value_bytes` from `concurrency`
/// clients, then removes what they wrote.
pub(crate) async fn raw_etcd(
    store: Arc<dyn Store>,
    concurrency: usize,
    writes: usize,
    value_bytes: usize,
) -> Result<Duration, BenchError> {
    let next = Arc::new(AtomicUsize::new(0));
    let value = vec![b'x'; value_bytes];
    let start = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..concurrency.max(1) {
        let (store, next, value) = (store.clone(), next.clone(), value.clone());
        workers.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= writes {
                    return Ok::<(), ferro_store::StoreError>(());
                }
                let key = format!("/bench/raw/{i:08}");
                let txn = Txn {
                    compare: vec![Compare::absent(key.clone())],
                    success: vec![TxnOp::Put {
                        key,
                        value: value.clone(),
                        lease: None,
                    }],
                    failure: vec![],
                };
                store.txn(txn).await?;
            }
        });
    }
    while let Some(result) = workers.join_next().await {
        result.map_err(|e| BenchError::Timeout(format!("a raw writer failed: {e}")))??;
    }
    let elapsed = start.elapsed();
    store
        .txn(Txn {
            compare: vec![],
            success: vec![TxnOp::Delete(KeyRange::Prefix("/bench/".into()))],
            failure: vec![],
        })
        .await?;
    Ok(elapsed)
}

pub(crate) async fn wait_for<T, F, Fut>(
    what: &str,
    timeout: Duration,
    mut check: F,
) -> Result<T, BenchError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return Ok(value);
        }
        if Instant::now() > deadline {
            return Err(BenchError::Timeout(format!("timed out waiting for {what}")));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn decided(port: &v1::Port) -> bool {
    port.status
        .as_ref()
        .is_some_and(|s| !s.mac.is_empty() && !s.network_uid.is_empty())
}

async fn measure(
    options: &BenchOptions,
    address: &str,
    store: Arc<dyn Store>,
) -> Result<BenchReport, BenchError> {
    let admin = Client::connect_lazy(address, ADMIN_TOKEN)?;
    let network = Object::Network(v1::Network {
        metadata: Some(v1::ObjectMeta {
            name: "bench".into(),
            ..Default::default()
        }),
        spec: Some(v1::NetworkSpec {
            subnets: vec![v1::Subnet {
                name: "a".into(),
                cidr: options.cidr.clone(),
                ..Default::default()
            }],
            ..Default::default()
        }),
        status: None,
    });
    admin.create(network).await?;
    // A Ready Network means the controllers lead, have synced their caches and work.
    wait_for(
        "the controllers to make the network ready",
        Duration::from_secs(60),
        || async {
            let network = admin
                .get_typed::<v1::Network>("default", "bench")
                .await
                .ok()?;
            let ready = network
                .status?
                .conditions
                .iter()
                .any(|c| c.r#type == "Ready" && c.status == v1::condition::Status::True as i32);
            ready.then_some(())
        },
    )
    .await?;

    let (_, revision) = admin.list(Kind::Port, &Selection::all()).await?;
    let start_revision = store.current_revision().await?;

    // Watch Ports to see each one addressed.
    let mut stream = Box::pin(admin.watch(Kind::Port, &Selection::all(), revision).await?);
    let total = options.ports;
    let watcher = tokio::spawn(async move {
        let mut addressed: HashSet<String> = HashSet::new();
        while let Some(Ok(event)) = stream.next().await {
            let Some(port) = event
                .object
                .and_then(|o| Object::try_from(o).ok())
                .and_then(v1::Port::from_object)
            else {
                continue;
            };
            if decided(&port) {
                addressed.insert(port.metadata.unwrap_or_default().name);
                if addressed.len() >= total {
                    return Instant::now();
                }
            }
        }
        Instant::now()
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
                let port = Object::Port(v1::Port {
                    metadata: Some(v1::ObjectMeta {
                        name: format!("port-{i:05}"),
                        ..Default::default()
                    }),
                    spec: Some(v1::PortSpec {
                        network: "bench".into(),
                        ..Default::default()
                    }),
                    status: None,
                });
                client.create(port).await?;
            }
        });
    }
    while let Some(result) = creators.join_next().await {
        result.map_err(|e| BenchError::Timeout(format!("a creator failed: {e}")))??;
    }
    let create_time = start.elapsed();
    let done = tokio::time::timeout(options.timeout, watcher)
        .await
        .map_err(|_| {
            BenchError::Timeout(format!(
                "not every port was addressed within {:?}",
                options.timeout
            ))
        })?
        .map_err(|e| BenchError::Timeout(format!("the port watcher failed: {e}")))?;
    let addressed_time = done.duration_since(start);

    // Every write of the phase, by kind, from the store's own history.
    let end_revision = store.current_revision().await?;
    let writes_by_kind = count_between(store, start_revision, end_revision).await?;
    Ok(BenchReport {
        ports: total,
        concurrency: options.concurrency,
        create_time,
        addressed_time,
        writes_by_kind,
        raw_writes_per_second: 0.0,
        peak_memory_kib: 0,
        memory_scope: "",
        reconciles: BTreeMap::new(),
    })
}

/// Counts the writes between two revisions by replaying the store's history.
pub(crate) async fn count_between(
    store: Arc<dyn Store>,
    from: i64,
    to: i64,
) -> Result<BTreeMap<String, u64>, BenchError> {
    let mut counts: BTreeMap<String, u64> = BTreeMap::new();
    let mut history = store
        .watch(WatchRequest {
            range: KeyRange::Prefix("/ferro/".into()),
            start_revision: Some(from + 1),
            prev_values: false,
        })
        .await?;
    let mut last = from;
    while last < to {
        let Some(batch) = tokio::time::timeout(Duration::from_secs(10), history.next())
            .await
            .map_err(|_| BenchError::Timeout("replaying the store's history".into()))?
        else {
            break;
        };
        for event in batch?.events {
            if event.kv.mod_revision > to {
                return Ok(counts);
            }
            if event.kv.mod_revision > last {
                last = event.kv.mod_revision;
                let kind = event
                    .kv
                    .key
                    .trim_start_matches("/ferro/")
                    .split('/')
                    .next()
                    .unwrap_or_default()
                    .to_owned();
                *counts.entry(kind).or_default() += 1;
            }
        }
    }
    Ok(counts)
}
