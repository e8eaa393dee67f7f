//! `ferro bench ipam`: how fast IPAM addresses Ports, against what etcd can write.
//!
//! One run starts, through the [`harness`](super::harness), a real etcd with its data on
//! disk (fsync on, as under `ferro up`), a `ferro apiserver` and `ferro controllers`, each
//! its own process so that the controllers' peak memory is theirs alone. Then:
//! 1. raw etcd: create-if-absent transactions of Port-sized values from `clients`
//!    clients, on an etcd of their own — the ceiling;
//! 2. IPAM: a Network with one big subnet, then `ports` Ports created at once by
//!    `clients` API clients; the clock runs from the first create until a watch has
//!    seen every Port addressed. A replay of the store's history counts every write of
//!    the phase by kind, so "writes per Port" is measured, not assumed.
//!
//! The aim: addressed Ports per second at least half of raw writes per second divided by
//! writes per Port, and no more than four writes per Port.

use std::{collections::BTreeMap, fmt, sync::Arc, time::Duration};

use anyhow::Result;
use ferro_api::{Object, v1};
use ferro_store::Store;

use super::harness::{
    self, Apiserver, Controllers, Etcd, Figures, Workspace, mib, wait_for, writes_line,
};

/// Arguments of `ferro bench ipam`.
#[derive(clap::Args, Debug)]
pub struct IpamArgs {
    /// Ports created at once on one /16.
    #[arg(long, default_value_t = 5_000)]
    pub ports: usize,
    /// Concurrent clients creating them (and raw etcd writers).
    #[arg(long, default_value_t = 16)]
    pub clients: usize,
}

/// Raw etcd transactions to time.
const RAW_WRITES: usize = 10_000;
/// A value the size of a stored Port with its status, for the raw etcd phase.
const RAW_VALUE_BYTES: usize = 400;

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
    /// Peak resident memory of the controllers' process, in KiB.
    pub peak_memory_kib: u64,
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
        let title = format_args!(
            "ferro bench ipam: {} ports on one subnet, concurrency {}",
            self.ports, self.concurrency
        );
        let mut out = Figures::new(f, 22, title)?;
        out.seconds("all created after", self.create_time)?;
        out.seconds("all addressed after", self.addressed_time)?;
        out.line(
            "ports addressed/s",
            format_args!("{:>8.0}", self.ports_per_second()),
        )?;
        out.line(
            "store writes per port",
            format_args!(
                "{:>8.2}   ({:.2} by controllers; {})",
                self.writes_per_port(),
                self.controller_writes_per_port(),
                writes_line(&self.writes_by_kind)
            ),
        )?;
        out.line(
            "raw etcd writes/s",
            format_args!(
                "{:>8.0}   (create-if-absent txns, {} clients)",
                self.raw_writes_per_second, self.concurrency
            ),
        )?;
        out.note(format_args!(
            "aim: ports/s >= {:.0} (raw / writes per port / 2), writes per port <= 4: {}",
            self.target_ports_per_second(),
            if self.meets_aims() { "met" } else { "NOT met" }
        ))?;
        for (controller, (runs, errors, mean)) in &self.reconciles {
            out.line(
                controller,
                format_args!(
                    "{runs:>8.0} reconciles, {errors:.0} failed, mean {:.1} ms",
                    mean * 1000.0
                ),
            )?;
        }
        out.line(
            "controllers peak RSS",
            format_args!("{:>12} (their own process)", mib(self.peak_memory_kib)),
        )
    }
}

/// Runs `ferro bench ipam` and prints its figures.
pub async fn run(args: IpamArgs) -> Result<()> {
    let work = Workspace::new("ipam", None)?;
    let raw = harness::raw_floor(work.path(), args.clients, RAW_WRITES, RAW_VALUE_BYTES).await?;
    let etcd = Etcd::start(work.path().join("etcd")).await?;
    let tokens = harness::token_file(work.path(), &[])?;
    let apiserver = Apiserver::start(work.path(), &etcd, &tokens).await?;
    let controllers = Controllers::start(work.path(), &apiserver, &tokens)?;
    let outcome = measure(&args, &apiserver.address, etcd.store.clone()).await;
    let figures = controllers.stop().await;
    let mut report = outcome?;
    report.raw_writes_per_second = RAW_WRITES as f64 / raw.as_secs_f64();
    report.peak_memory_kib = figures.peak_rss_kib;
    report.reconciles = figures.reconciles;
    println!("{report}");
    Ok(())
}

fn decided(port: &v1::Port) -> bool {
    port.status
        .as_ref()
        .is_some_and(|s| !s.mac.is_empty() && !s.network_uid.is_empty())
}

async fn measure(args: &IpamArgs, address: &str, store: Arc<dyn Store>) -> Result<BenchReport> {
    let admin = harness::admin(address)?;
    harness::create_yaml(&admin, harness::BENCH_NETWORK).await?;
    wait_for(
        "the controllers to make the network ready",
        Duration::from_secs(60),
        || async { harness::bench_network_ready(&admin).await.then_some(()) },
    )
    .await?;

    let phase = harness::create_and_watch(
        store,
        address,
        args.clients,
        args.ports,
        "every port addressed",
        |port: &v1::Port| decided(port).then_some(()),
        |i| {
            Object::Port(v1::Port {
                metadata: harness::named(format!("port-{i:05}")),
                spec: Some(v1::PortSpec {
                    network: "bench".into(),
                    ..Default::default()
                }),
                status: None,
            })
        },
    )
    .await?;
    Ok(BenchReport {
        ports: args.ports,
        concurrency: args.clients,
        create_time: phase.create_time,
        addressed_time: phase.done_time,
        writes_by_kind: phase.writes_by_kind,
        raw_writes_per_second: 0.0,
        peak_memory_kib: 0,
        reconciles: BTreeMap::new(),
    })
}
