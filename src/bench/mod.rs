//! `ferro bench …`: benchmarks that print the figures the issues ask for, each in one run
//! on this machine, with real etcd and real Ferro processes.
//!
//! They live with the binary, not in the libraries, and share one [`harness`]: the
//! scratch directory, etcd, the `ferro apiserver` and `ferro controllers` processes and
//! their tokens, the raw-etcd floor, peak memory and waits.

pub mod api;
pub mod boot;
pub mod harness;
pub mod ipam;
pub mod net;
pub mod schedule;
pub mod storage;

/// A benchmark.
#[derive(clap::Subcommand, Debug)]
pub enum BenchCommand {
    /// API throughput, List and watch delivery against etcd.
    Api(api::ApiBenchArgs),
    /// Port addressing throughput of IPAM against etcd.
    Ipam(ipam::IpamArgs),
    /// Scheduling and addressing throughput against etcd, with simulated node agents.
    Schedule(schedule::ScheduleArgs),
    /// Seconds from apply of a Server to its guest's ready marker, against plain QEMU.
    Boot(boot::BootBenchArgs),
    /// Port wiring latency, TCP throughput and agent restarts under `ferro up --nodes 3`,
    /// against the same kernel and switch pieces wired by hand.
    Net(net::NetBenchArgs),
    /// Image upload throughput and the apiserver's peak memory for a 1 GiB image, the read
    /// back a node does, volume attach / detach latency in a real guest (file and NBD),
    /// and sequential reads through an NBD export against the same file read locally.
    Storage(storage::StorageBenchArgs),
}

/// Runs a benchmark.
pub fn run(command: BenchCommand) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        match command {
            BenchCommand::Api(args) => api::run(args).await,
            BenchCommand::Ipam(args) => ipam::run(args).await,
            BenchCommand::Schedule(args) => schedule::run(args).await,
            BenchCommand::Boot(args) => boot::run(args).await,
            BenchCommand::Net(args) => net::run_bench(args).await,
            BenchCommand::Storage(args) => storage::run(args).await,
        }
    })
}
