//! `ferro bench api`: what the API costs on top of etcd.
//!
//! One run starts, through the [`harness`](super::harness), a real etcd (data on disk,
//! fsync on, as `ferro up` runs it) and a real `ferro apiserver` child process, then
//! measures:
//! 1. raw etcd: create-if-absent transactions of 1 KiB values from 16 concurrent clients,
//!    on an etcd of their own;
//! 2. Ferro: Create of 1 KiB objects from 16 concurrent API clients — throughput, its ratio
//!    to raw etcd, p50 / p99 latency;
//! 3. List of 10,000 objects — time, and the apiserver's peak resident memory;
//! 4. 1,000 watchers on one kind while 100 objects of 1 KiB are written per second —
//!    write-to-delivery latency p50 / p99 over every (event, watcher) pair.

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Result, bail};
use ferro_api::{
    Kind, Object,
    client::{Client, Selection},
    v1,
};
use futures::StreamExt;

use super::harness::{self, ADMIN_TOKEN as TOKEN, Apiserver, Etcd, Workspace, mib};

/// The knobs of the API benchmark.
#[derive(Clone, Debug, clap::Args)]
pub struct ApiBenchArgs {
    /// Concurrent clients for the write phases.
    #[arg(long, default_value_t = 16)]
    pub clients: usize,
    /// Objects created (and then listed).
    #[arg(long, default_value_t = 10_000)]
    pub objects: usize,
    /// Raw etcd transactions.
    #[arg(long, default_value_t = 10_000)]
    pub raw_writes: usize,
    /// Watchers in the delivery phase.
    #[arg(long, default_value_t = 1_000)]
    pub watchers: usize,
    /// Writes per second in the delivery phase.
    #[arg(long, default_value_t = 100)]
    pub rate: u32,
    /// Seconds of writing in the delivery phase.
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// Where etcd keeps its data during the run (removed afterwards); on disk by default,
    /// so fsync costs what it costs under `ferro up`.
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
}

const VALUE_BYTES: usize = 1024;

/// Runs the benchmark and prints its figures.
pub async fn run(args: ApiBenchArgs) -> Result<()> {
    let work = Workspace::new("api", args.work_dir.as_deref())?;
    println!(
        "ferro bench api: etcd and apiserver under {}",
        work.path().display()
    );
    // 1. Raw etcd, on an etcd of its own.
    let raw = harness::raw_floor(work.path(), args.clients, args.raw_writes, VALUE_BYTES).await?;
    let etcd = Etcd::start(work.path().join("etcd")).await?;
    println!(
        "raw etcd txn (create-if-absent, {} B values, {} clients): {} writes in {:.2} s = {:.0} writes/s",
        VALUE_BYTES,
        args.clients,
        args.raw_writes,
        raw.as_secs_f64(),
        args.raw_writes as f64 / raw.as_secs_f64()
    );

    let tokens = harness::token_file(work.path(), &[])?;
    let apiserver = Apiserver::start(work.path(), &etcd, &tokens).await?;
    let client = apiserver.admin()?;

    // 2. Create throughput and latency through the API.
    let started = Instant::now();
    let mut latencies =
        harness::create_all(&apiserver.address, args.clients, args.objects, object).await?;
    let elapsed = started.elapsed();
    let ferro_rate = args.objects as f64 / elapsed.as_secs_f64();
    let raw_rate = args.raw_writes as f64 / raw.as_secs_f64();
    println!(
        "ferro Create ({} B objects, {} clients): {} creates in {:.2} s = {:.0} creates/s; {:.2} x raw etcd; latency p50 {} p99 {}",
        VALUE_BYTES,
        args.clients,
        args.objects,
        elapsed.as_secs_f64(),
        ferro_rate,
        ferro_rate / raw_rate,
        millis(percentile(&mut latencies, 0.50)),
        millis(percentile(&mut latencies, 0.99)),
    );

    // 3. List everything.
    let started = Instant::now();
    let (items, _) = client.list(Kind::SegmentID, &Selection::all()).await?;
    let listed = started.elapsed();
    if items.len() != args.objects {
        bail!("listed {} objects, expected {}", items.len(), args.objects);
    }
    println!(
        "ferro List of {} objects: {:.0} ms; apiserver peak memory {}",
        items.len(),
        listed.as_secs_f64() * 1000.0,
        mib(apiserver.peak_rss_kib()?)
    );
    drop(items);

    // 4. Delivery to many watchers.
    let mut delivery = deliveries(
        &apiserver.address,
        &client,
        args.watchers,
        args.rate,
        args.seconds,
    )
    .await?;
    println!(
        "watch delivery ({} watchers, {} writes/s of {} B for {} s): {} deliveries; latency p50 {} p99 {}",
        args.watchers,
        args.rate,
        VALUE_BYTES,
        args.seconds,
        delivery.len(),
        millis(percentile(&mut delivery, 0.50)),
        millis(percentile(&mut delivery, 0.99)),
    );
    println!(
        "apiserver peak memory over the run: {}",
        mib(apiserver.peak_rss_kib()?)
    );
    Ok(())
}

/// An object of about 1 KiB encoded.
fn object(i: usize) -> Object {
    let mut meta = v1::ObjectMeta {
        name: format!("bench-{i:08}"),
        ..Default::default()
    };
    meta.annotations.insert(
        "bench.ferro.io/payload".into(),
        "x".repeat(VALUE_BYTES - 80),
    );
    Object::SegmentID(v1::SegmentId {
        metadata: Some(meta),
        spec: Some(v1::SegmentIdSpec { id: (i + 1) as u32 }),
        status: None,
    })
}

async fn deliveries(
    address: &str,
    client: &Client,
    watchers: usize,
    rate: u32,
    seconds: u64,
) -> Result<Vec<Duration>> {
    let sent: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let latencies: Arc<Mutex<Vec<Duration>>> = Arc::default();
    let revision = client
        .list_page(Kind::Flavor, &Selection::all(), 1, "")
        .await?
        .resource_version;
    // Spread the watchers over a few connections, as many clients would.
    let connections: Vec<Client> = (0..watchers.div_ceil(100).max(1))
        .map(|_| Client::connect_lazy(address, TOKEN))
        .collect::<Result<_, _>>()?;
    let writes = rate as usize * seconds as usize;
    let mut tasks = Vec::new();
    for w in 0..watchers {
        let client = connections[w % connections.len()].clone();
        let stream = client
            .watch(
                Kind::Flavor,
                &Selection::all().labels("bench=delivery"),
                revision,
            )
            .await?;
        let sent = sent.clone();
        let latencies = latencies.clone();
        tasks.push(tokio::spawn(async move {
            let mut stream = Box::pin(stream);
            let mut seen = 0;
            while seen < writes {
                let event = match tokio::time::timeout(Duration::from_secs(60), stream.next()).await
                {
                    Ok(Some(Ok(event))) => event,
                    _ => break,
                };
                if event.r#type == v1::watch_event::Type::Bookmark as i32 {
                    continue;
                }
                let arrived = Instant::now();
                let Some(name) = event
                    .object
                    .and_then(|o| Object::try_from(o).ok())
                    .map(|o| o.name().to_owned())
                else {
                    continue;
                };
                let at = sent.lock().expect("not poisoned").get(&name).copied();
                if let Some(at) = at {
                    latencies.lock().expect("not poisoned").push(arrived - at);
                }
                seen += 1;
            }
        }));
    }
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rate)));
    for i in 0..writes {
        ticker.tick().await;
        let name = format!("bench-delivery-{i:06}");
        let mut meta = v1::ObjectMeta {
            name: name.clone(),
            ..Default::default()
        };
        meta.labels.insert("bench".into(), "delivery".into());
        meta.annotations.insert(
            "bench.ferro.io/payload".into(),
            "x".repeat(VALUE_BYTES - 120),
        );
        let flavor = Object::Flavor(v1::Flavor {
            metadata: Some(meta),
            spec: Some(v1::FlavorSpec {
                vcpus: 1,
                ram_mib: 64,
                ..Default::default()
            }),
            status: None,
        });
        sent.lock()
            .expect("not poisoned")
            .insert(name, Instant::now());
        client.create(flavor).await?;
    }
    for task in tasks {
        let _ = task.await;
    }
    let latencies = std::mem::take(&mut *latencies.lock().expect("not poisoned"));
    if latencies.len() < writes * watchers {
        println!(
            "  note: {} of {} deliveries arrived within 60 s of each other",
            latencies.len(),
            writes * watchers
        );
    }
    Ok(latencies)
}

fn percentile(values: &mut [Duration], q: f64) -> Duration {
    if values.is_empty() {
        return Duration::ZERO;
    }
    values.sort_unstable();
    let index = ((values.len() as f64 - 1.0) * q).round() as usize;
    values[index]
}

fn millis(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}
