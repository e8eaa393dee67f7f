//! `ferro bench …`: benchmarks that print the figures the issues ask for, each in one run
//! on this machine, with real etcd and real Ferro processes.

pub mod api;
pub mod boot;

/// A benchmark.
#[derive(clap::Subcommand, Debug)]
pub enum BenchCommand {
    /// API throughput, List and watch delivery against etcd.
    Api(api::ApiBenchArgs),
    /// Port addressing throughput of IPAM against etcd.
    Ipam(IpamArgs),
    /// Scheduling and addressing throughput against etcd, with simulated node agents.
    Schedule(ScheduleArgs),
    /// Seconds from apply of a Server to its guest's ready marker, against plain QEMU.
    Boot(boot::BootBenchArgs),
}

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

/// Arguments of `ferro bench ipam`.
#[derive(clap::Args, Debug)]
pub struct IpamArgs {
    /// Ports created at once on one /16.
    #[arg(long, default_value_t = 5_000)]
    pub ports: usize,
    /// Concurrent clients creating them.
    #[arg(long, default_value_t = 16)]
    pub clients: usize,
}

/// Runs a benchmark.
pub fn run(command: BenchCommand) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        match command {
            BenchCommand::Api(args) => api::run(args).await,
            BenchCommand::Ipam(args) => ipam(args).await,
            BenchCommand::Schedule(args) => schedule(args).await,
            BenchCommand::Boot(args) => boot::run(args).await,
        }
    })
}

async fn ipam(args: IpamArgs) -> anyhow::Result<()> {
    let options = ferro_controllers::bench::BenchOptions {
        ports: args.ports,
        concurrency: args.clients,
        // The controllers run as their own process, so their peak memory is theirs alone.
        controllers_command: Some(vec![std::env::current_exe()?.into(), "controllers".into()]),
        ..Default::default()
    };
    let report = ferro_controllers::bench::bench_ipam(options).await?;
    println!("{report}");
    Ok(())
}

async fn schedule(args: ScheduleArgs) -> anyhow::Result<()> {
    let options = ferro_controllers::bench_schedule::ScheduleOptions {
        nodes: args.nodes,
        servers: args.servers,
        concurrency: args.clients,
        // The controllers run as their own process, so their peak memory is theirs alone.
        controllers_command: Some(vec![std::env::current_exe()?.into(), "controllers".into()]),
        ..Default::default()
    };
    let report = ferro_controllers::bench_schedule::bench_schedule(options).await?;
    println!("{report}");
    Ok(())
}
