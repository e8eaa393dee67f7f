//! What every benchmark needs around what it measures: a scratch directory, real etcd,
//! the `ferro apiserver` and `ferro controllers` processes with their tokens, the raw-etcd
//! floor, peak memory, polling waits and the store's own count of writes.
//!
//! Everything Ferro runs as its own process, started from this very binary, as `ferro up`
//! runs it, so a process's peak memory is its own and the bench's clients do not share a
//! runtime with the server they load.
//!
//! The raw floor runs on an etcd of its own ([`raw_floor`]): etcd 3.4 copies its read
//! buffer, grown to the busiest commit interval so far, on every transaction it applies,
//! so a raw burst on a shared etcd would make every later Ferro write pay for it.

use std::{
    collections::BTreeMap,
    fmt,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Stdio,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use ferro_api::{
    Kind, Object, Resource,
    client::{Client, Selection},
    v1,
};
use ferro_store::{
    Compare, KeyRange, Store, Txn, TxnOp, WatchRequest,
    etcd::EtcdStore,
    etcd_process::{EtcdOptions, EtcdProcess},
};
use futures::StreamExt;

/// The `admin` token of every benchmark's apiserver.
pub const ADMIN_TOKEN: &str = "bench-admin-token";
/// The `system:controllers` token.
pub const CONTROLLERS_TOKEN: &str = "bench-controllers-token";

/// How often [`wait_for`] looks again unless told otherwise.
const POLL: Duration = Duration::from_millis(100);
/// How long a measured phase may take before the benchmark gives up.
const PHASE_TIMEOUT: Duration = Duration::from_secs(600);

/// A benchmark's scratch directory, removed when dropped.
pub struct Workspace {
    dir: tempfile::TempDir,
}

impl Workspace {
    /// A fresh `ferro-bench-<name>-…` directory under `base`, or the system's temporary
    /// directory (on disk, so fsync costs what it costs under `ferro up`).
    pub fn new(name: &str, base: Option<&Path>) -> Result<Workspace> {
        let base = base.map_or_else(std::env::temp_dir, Path::to_path_buf);
        let dir = tempfile::Builder::new()
            .prefix(&format!("ferro-bench-{name}-"))
            .tempdir_in(&base)
            .with_context(|| format!("creating a scratch directory in {}", base.display()))?;
        Ok(Workspace { dir })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

/// A real etcd with its data on disk and fsync on, and a store client of it; stopped
/// when dropped.
pub struct Etcd {
    /// A client of it.
    pub store: Arc<dyn Store>,
    process: EtcdProcess,
}

impl Etcd {
    /// Starts etcd with its data in `dir`.
    pub async fn start(dir: PathBuf) -> Result<Etcd> {
        let process = EtcdProcess::start(EtcdOptions::persistent(&dir))
            .await
            .with_context(|| format!("starting etcd in {}", dir.display()))?;
        let store = Arc::new(EtcdStore::connect(&[process.client_url().to_owned()]).await?);
        Ok(Etcd { store, process })
    }

    /// Its client URL.
    pub fn url(&self) -> &str {
        self.process.client_url()
    }
}

/// The raw-etcd floor: times `writes` create-if-absent transactions of `value_bytes`
/// from `concurrency` clients on an etcd of its own, started in `work/raw-etcd` and
/// stopped afterwards.
pub async fn raw_floor(
    work: &Path,
    concurrency: usize,
    writes: usize,
    value_bytes: usize,
) -> Result<Duration> {
    let etcd = Etcd::start(work.join("raw-etcd")).await?;
    let next = Arc::new(AtomicUsize::new(0));
    let value = vec![b'x'; value_bytes];
    let start = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..concurrency.max(1) {
        let (store, next, value) = (etcd.store.clone(), next.clone(), value.clone());
        workers.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= writes {
                    return anyhow::Ok(());
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
                store.txn(txn).await.context("a raw etcd transaction")?;
            }
        });
    }
    while let Some(result) = workers.join_next().await {
        result.context("a raw writer failed")??;
    }
    Ok(start.elapsed())
}

/// The token file of a benchmark's apiserver: the admin and controllers tokens, and any
/// `(token, identity)` pairs more (node identities, say).
pub fn token_file(work: &Path, more: &[(String, String)]) -> Result<PathBuf> {
    let mut text = format!("{ADMIN_TOKEN} admin\n{CONTROLLERS_TOKEN} system:controllers\n");
    for (token, identity) in more {
        text.push_str(&format!("{token} {identity}\n"));
    }
    let path = work.join("tokens");
    std::fs::write(&path, text).context("writing the token file")?;
    Ok(path)
}

/// A loopback address nobody listens on now.
fn free_address() -> Result<SocketAddr> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("picking a port")?;
    Ok(listener.local_addr()?)
}

/// A `ferro` child process (this binary), killed when dropped; its output goes to
/// `<work>/<name>.log`.
struct Ferro {
    child: tokio::process::Child,
    log: PathBuf,
}

impl Ferro {
    fn start(work: &Path, name: &str, args: &[&std::ffi::OsStr]) -> Result<Ferro> {
        let log = work.join(format!("{name}.log"));
        let file = std::fs::File::create(&log).context("creating a log file")?;
        let child = tokio::process::Command::new(std::env::current_exe()?)
            .args(args)
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting ferro {name}"))?;
        Ok(Ferro { child, log })
    }

    /// Its peak resident memory so far, in KiB.
    fn peak_rss_kib(&self) -> Option<u64> {
        self.child.id().and_then(peak_rss_kib)
    }
}

/// `VmHWM` of a process, in KiB.
pub fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// A client of the apiserver at `address` with the admin token.
pub fn admin(address: &str) -> Result<Client> {
    Ok(Client::connect_lazy(address, ADMIN_TOKEN)?)
}

/// A `ferro apiserver` over a benchmark's etcd.
pub struct Apiserver {
    /// Where it serves.
    pub address: String,
    process: Ferro,
}

impl Apiserver {
    /// Starts it with the tokens of `tokens` and waits until it answers.
    pub async fn start(work: &Path, etcd: &Etcd, tokens: &Path) -> Result<Apiserver> {
        let address = free_address()?.to_string();
        let store = format!("etcd://{}", etcd.url().trim_start_matches("http://"));
        let process = Ferro::start(
            work,
            "apiserver",
            &[
                "apiserver".as_ref(),
                "--listen".as_ref(),
                address.as_ref(),
                "--store".as_ref(),
                store.as_ref(),
                "--token-file".as_ref(),
                tokens.as_os_str(),
                "--image-store".as_ref(),
                work.join("image-store").as_os_str(),
            ],
        )?;
        let apiserver = Apiserver { address, process };
        let client = apiserver.admin()?;
        wait_for(
            &format!(
                "the apiserver to answer (see {})",
                apiserver.process.log.display()
            ),
            Duration::from_secs(30),
            || async {
                client
                    .list_page(Kind::Flavor, &Selection::all(), 1, "")
                    .await
                    .ok()
                    .map(|_| ())
            },
        )
        .await?;
        Ok(apiserver)
    }

    /// A client with the admin token.
    pub fn admin(&self) -> Result<Client> {
        admin(&self.address)
    }

    /// Its peak resident memory so far, in KiB.
    pub fn peak_rss_kib(&self) -> Result<u64> {
        self.process
            .peak_rss_kib()
            .context("no VmHWM for the apiserver")
    }
}

/// What the controllers did and cost over a run.
pub struct ControllersFigures {
    /// Per controller: reconciles, failed reconciles, mean reconcile seconds.
    pub reconciles: BTreeMap<String, (f64, f64, f64)>,
    /// Peak resident memory of their process, in KiB.
    pub peak_rss_kib: u64,
}

/// `ferro controllers` against a benchmark's apiserver, with its metrics served.
pub struct Controllers {
    process: Ferro,
    metrics: SocketAddr,
}

impl Controllers {
    /// Starts them with the controllers token of `tokens`.
    pub fn start(work: &Path, apiserver: &Apiserver, tokens: &Path) -> Result<Controllers> {
        let metrics = free_address()?;
        let metrics_text = metrics.to_string();
        let process = Ferro::start(
            work,
            "controllers",
            &[
                "controllers".as_ref(),
                "--server".as_ref(),
                apiserver.address.as_ref(),
                "--token-file".as_ref(),
                tokens.as_os_str(),
                "--metrics-addr".as_ref(),
                metrics_text.as_ref(),
            ],
        )?;
        Ok(Controllers { process, metrics })
    }

    /// Stops them; returns their reconcile figures and peak memory.
    pub async fn stop(mut self) -> ControllersFigures {
        let reconciles = scrape_reconciles(self.metrics).await;
        let peak_rss_kib = self.process.peak_rss_kib().unwrap_or_default();
        let _ = self.process.child.kill().await;
        ControllersFigures {
            reconciles,
            peak_rss_kib,
        }
    }
}

/// Reconciles per controller from a metrics endpoint: count, failures, mean seconds.
async fn scrape_reconciles(addr: SocketAddr) -> BTreeMap<String, (f64, f64, f64)> {
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

/// Polls `check` every 100 ms until it gives a value; fails after `timeout`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    wait_every(what, timeout, POLL, check).await
}

/// Polls `check` every `poll` until it gives a value; fails after `timeout`.
pub async fn wait_every<T, F, Fut>(
    what: &str,
    timeout: Duration,
    poll: Duration,
    mut check: F,
) -> Result<T>
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
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(poll).await;
    }
}

/// Creates `total` objects, the `i`th being `object(i)`, from `clients` concurrent API
/// clients with the admin token; returns the latency of each create.
pub async fn create_all<F>(
    address: &str,
    clients: usize,
    total: usize,
    object: F,
) -> Result<Vec<Duration>>
where
    F: Fn(usize) -> Object + Send + Sync + 'static,
{
    let object = Arc::new(object);
    let next = Arc::new(AtomicUsize::new(0));
    let mut creators = tokio::task::JoinSet::new();
    for _ in 0..clients.max(1) {
        let client = Client::connect_lazy(address, ADMIN_TOKEN)?;
        let (next, object) = (next.clone(), object.clone());
        creators.spawn(async move {
            let mut latencies = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    return Ok::<_, ferro_api::Error>(latencies);
                }
                let started = Instant::now();
                client.create(object(i)).await?;
                latencies.push(started.elapsed());
            }
        });
    }
    let mut latencies = Vec::with_capacity(total);
    while let Some(result) = creators.join_next().await {
        latencies.extend(result.context("a creator failed")??);
    }
    Ok(latencies)
}

/// Objects of kind `T` seen done, by name, with what `done` said of each.
pub type Done<V> = BTreeMap<String, V>;

/// A watch of kind `T` that ends when enough objects are done.
struct WatchUntil<V> {
    what: String,
    task: tokio::task::JoinHandle<(Instant, Done<V>)>,
}

impl<V: Send + 'static> WatchUntil<V> {
    /// Starts watching `T` from now until `total` distinct objects have been seen for
    /// which `done` says something.
    async fn start<T, F>(client: &Client, what: &str, total: usize, done: F) -> Result<Self>
    where
        T: Resource,
        F: Fn(&T) -> Option<V> + Send + 'static,
    {
        let (_, revision) = client.list(T::KIND, &Selection::all()).await?;
        let mut stream = Box::pin(client.watch(T::KIND, &Selection::all(), revision).await?);
        let task = tokio::spawn(async move {
            let mut seen = Done::new();
            while let Some(Ok(event)) = stream.next().await {
                let Some(object) = event
                    .object
                    .and_then(|o| Object::try_from(o).ok())
                    .and_then(T::from_object)
                else {
                    continue;
                };
                if let Some(value) = done(&object) {
                    let name = object.metadata().map(|m| m.name.clone());
                    seen.insert(name.unwrap_or_default(), value);
                    if seen.len() >= total {
                        break;
                    }
                }
            }
            (Instant::now(), seen)
        });
        Ok(WatchUntil {
            what: what.to_owned(),
            task,
        })
    }

    /// Waits until they are all done: when that was, and what was seen.
    async fn finished(self) -> Result<(Instant, Done<V>)> {
        tokio::time::timeout(PHASE_TIMEOUT, self.task)
            .await
            .with_context(|| format!("{} within {PHASE_TIMEOUT:?}", self.what))?
            .with_context(|| format!("watching for {}", self.what))
    }
}

/// What one measured phase gave.
pub struct Phase<V> {
    /// From the first create until every object was created.
    pub create_time: Duration,
    /// From the first create until every object was seen done.
    pub done_time: Duration,
    /// What `done` said of each object, by name.
    pub done: Done<V>,
    /// Store writes during the phase, by kind, from the store's own history.
    pub writes_by_kind: BTreeMap<String, u64>,
}

/// The measured phase of the controller benchmarks: `total` objects of kind `T`, the
/// `i`th being `object(i)`, created at once by `clients` clients; the clock runs from the
/// first create until a watch has seen each of them `done` (`what` names that in
/// errors). `store` is the apiserver's etcd, whose history counts the phase's writes.
pub async fn create_and_watch<T, V, D, O>(
    store: Arc<dyn Store>,
    address: &str,
    clients: usize,
    total: usize,
    what: &str,
    done: D,
    object: O,
) -> Result<Phase<V>>
where
    T: Resource,
    V: Send + 'static,
    D: Fn(&T) -> Option<V> + Send + 'static,
    O: Fn(usize) -> Object + Send + Sync + 'static,
{
    let start_revision = store.current_revision().await?;
    let watch = WatchUntil::start(&admin(address)?, what, total, done).await?;
    let start = Instant::now();
    create_all(address, clients, total, object).await?;
    let create_time = start.elapsed();
    let (end, done) = watch.finished().await?;
    let end_revision = store.current_revision().await?;
    Ok(Phase {
        create_time,
        done_time: end.duration_since(start),
        done,
        writes_by_kind: count_between(store, start_revision, end_revision).await?,
    })
}

/// The Network the controller benchmarks address their Ports on: `bench`, one /16.
pub const BENCH_NETWORK: &str = "apiVersion: ferro/v1\nkind: Network\nmetadata: {name: bench}\nspec:\n  subnets:\n  - {name: a, cidr: 10.128.0.0/16}\n";

/// Creates, as admin, every object of a YAML manifest the benchmark itself wrote.
pub async fn create_yaml(admin: &Client, yaml: &str) -> Result<()> {
    for object in ferro_api::codec::decode_yaml(yaml).context("the bench's own manifests")? {
        admin.create(object).await?;
    }
    Ok(())
}

/// Whether [`BENCH_NETWORK`] is Ready: then the controllers lead, have synced their
/// caches and work.
pub async fn bench_network_ready(admin: &Client) -> bool {
    admin
        .get_typed::<v1::Network>("default", "bench")
        .await
        .ok()
        .and_then(|n| n.status)
        .is_some_and(|s| is_ready(&s.conditions))
}

/// The metadata of a new object named `name` in the default project.
pub fn named(name: String) -> Option<v1::ObjectMeta> {
    Some(v1::ObjectMeta {
        name,
        ..Default::default()
    })
}

/// Whether conditions hold `Ready=True`.
pub fn is_ready(conditions: &[v1::Condition]) -> bool {
    conditions
        .iter()
        .any(|c| c.r#type == "Ready" && c.status == v1::condition::Status::True as i32)
}

/// Counts the writes between two revisions by kind (`ports`, `ipaddresses`, …),
/// replaying the store's history.
async fn count_between(store: Arc<dyn Store>, from: i64, to: i64) -> Result<BTreeMap<String, u64>> {
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
            .context("replaying the store's history")?
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

/// Writes a benchmark's figures: a title, then one aligned line per figure.
pub struct Figures<'a, 'f> {
    out: &'a mut fmt::Formatter<'f>,
    width: usize,
}

impl<'a, 'f> Figures<'a, 'f> {
    /// Starts with the title; labels are padded to `width`.
    pub fn new(
        out: &'a mut fmt::Formatter<'f>,
        width: usize,
        title: fmt::Arguments<'_>,
    ) -> Result<Self, fmt::Error> {
        write!(out, "{title}")?;
        Ok(Figures { out, width })
    }

    /// One figure.
    pub fn line(&mut self, label: &str, value: fmt::Arguments<'_>) -> fmt::Result {
        write!(self.out, "\n  {label:<width$} {value}", width = self.width)
    }

    /// A figure in seconds.
    pub fn seconds(&mut self, label: &str, value: Duration) -> fmt::Result {
        self.line(label, format_args!("{:>8.2} s", value.as_secs_f64()))
    }

    /// A line without a label: an aim and whether it is met, say.
    pub fn note(&mut self, text: fmt::Arguments<'_>) -> fmt::Result {
        write!(self.out, "\n  {text}")
    }
}

/// Store writes by kind as one line: `ipaddresses 5000, ports 10000`.
pub fn writes_line(writes_by_kind: &BTreeMap<String, u64>) -> String {
    writes_by_kind
        .iter()
        .map(|(kind, n)| format!("{kind} {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Memory in KiB, as the figures print it.
pub fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}
