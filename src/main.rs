//! `ferro`: the one binary of Ferro. It plays every role — the all-in-one supervisor
//! (`ferro up`), the apiserver, the controllers, the node agent — and is the user's CLI.
//!
//! Each role is a subcommand; the CLI verbs (`apply`, `get`, `delete`) live under
//! [`cli`], the server roles beside it. Every failure ends up as one `error: …` line on
//! stderr and a non-zero exit status.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod agent;
mod apiserver;
mod bench;
mod cli;
mod controllers;
mod process;
mod up;

/// Ferro: a declarative infrastructure-as-a-service cloud.
#[derive(Parser, Debug)]
#[command(name = "ferro", version, about, propagate_version = true)]
struct Cli {
    #[command(flatten)]
    connection: cli::ConnectionArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the all-in-one cloud: etcd, the apiserver, the controllers and this host's agent.
    Up(up::UpArgs),
    /// Stop a running `ferro up`; with --purge also remove its data directory.
    Down(up::DownArgs),
    /// Serve the Ferro API over gRPC.
    Apiserver(apiserver::ApiserverArgs),
    /// Run the node agent: register this host and run the servers placed on it.
    Agent(agent::AgentArgs),
    /// Run the controllers (leader-elected; several may run).
    Controllers(controllers::ControllersArgs),
    /// Measure Ferro on this machine and print the figures.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Run one etcd member until SIGTERM (how `ferro up` supervises etcd).
    #[command(hide = true)]
    Etcd(up::etcd::EtcdArgs),
    /// Create or update objects from YAML / JSON manifests.
    Apply(cli::apply::ApplyArgs),
    /// Show objects of one kind.
    #[command(after_help = cli::api_resources::kinds_help())]
    Get(cli::get::GetArgs),
    /// Delete objects by name or by manifest.
    Delete(cli::delete::DeleteArgs),
    /// Stop placing new servers on a node.
    Cordon(cli::node::NodeArgs),
    /// Place servers on a cordoned node again.
    Uncordon(cli::node::NodeArgs),
    /// Cordon a node and list the servers still running there.
    Drain(cli::node::NodeArgs),
    /// Show one object in detail: conditions, owners, events, what blocks its deletion.
    Describe(cli::describe::DescribeArgs),
    /// Show what `apply` would change (exit 0: nothing, 1: something, 2: error).
    Diff(cli::diff::DiffArgs),
    /// Wait for objects to meet a condition or to be deleted.
    Wait(cli::wait::WaitArgs),
    /// Describe a kind or a field of the schema: `ferro explain server.spec.networks`.
    Explain(cli::explain::ExplainArgs),
    /// Print a server's serial console log.
    Logs(cli::logs::LogsArgs),
    /// Print a shell completion script: `ferro completion bash`.
    Completion(cli::completion::CompletionArgs),
    /// Attach to a server's serial console (Ctrl-] leaves).
    Console(cli::console::ConsoleArgs),
    /// Power verbs: `ferro server stop|start|reboot NAME`.
    Server(cli::server::ServerArgs),
    /// A project's limits and use: `ferro quota show [-p PROJECT]`.
    Quota(cli::quota::QuotaArgs),
    /// Image bytes: `ferro image upload NAME FILE`.
    Image(cli::image::ImageArgs),
    /// List every kind with its short names and scope.
    ApiResources,
    /// The CLI's contexts: `ferro config get-contexts|use-context NAME|current-context`.
    #[command(subcommand)]
    Config(cli::config::ConfigCommand),
}

impl Command {
    /// The log level when RUST_LOG does not say: server roles report what they do, CLI
    /// verbs stay quiet unless something is wrong.
    fn default_log_level(&self) -> &'static str {
        match self {
            Command::Up(_)
            | Command::Apiserver(_)
            | Command::Etcd(_)
            | Command::Controllers(_)
            | Command::Agent(_) => "info",
            Command::Bench(_) => "warn",
            Command::Down(_) => "info",
            Command::Apply(_) | Command::Get(_) | Command::Delete(_) => "warn",
            Command::Cordon(_) | Command::Uncordon(_) | Command::Drain(_) => "warn",
            Command::Describe(_)
            | Command::Diff(_)
            | Command::Wait(_)
            | Command::Explain(_)
            | Command::Logs(_)
            | Command::Completion(_) => "warn",
            Command::Console(_) | Command::Server(_) | Command::Config(_) => "warn",
            Command::Quota(_) => "warn",
            Command::Image(_) => "warn",
            Command::ApiResources => "warn",
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.command.default_log_level());
    let result = match cli.command {
        Command::Up(args) => up::run(args),
        Command::Down(args) => up::down(args),
        Command::Apiserver(args) => apiserver::run(args),
        Command::Controllers(args) => controllers::run(args),
        Command::Agent(args) => agent::run(args),
        Command::Bench(command) => bench::run(command),
        Command::Etcd(args) => up::etcd::run(args),
        Command::Apply(args) => cli::apply::run(&cli.connection, args),
        Command::Get(args) => cli::get::run(&cli.connection, args),
        Command::Delete(args) => cli::delete::run(&cli.connection, args),
        Command::Cordon(args) => cli::node::cordon(&cli.connection, args),
        Command::Uncordon(args) => cli::node::uncordon(&cli.connection, args),
        Command::Drain(args) => cli::node::drain(&cli.connection, args),
        Command::Describe(args) => cli::describe::run(&cli.connection, args),
        // diff has its own exit statuses: 1 means "differences", errors are 2.
        Command::Diff(args) => return cli::diff::main(&cli.connection, args),
        Command::Wait(args) => cli::wait::run(&cli.connection, args),
        Command::Explain(args) => cli::explain::run(args),
        Command::Logs(args) => cli::logs::run(&cli.connection, args),
        Command::Completion(args) => {
            cli::completion::run(<Cli as clap::CommandFactory>::command(), args)
        }
        Command::Console(args) => cli::console::run(&cli.connection, args),
        Command::Server(args) => cli::server::run(&cli.connection, args),
        Command::Quota(args) => cli::quota::run(&cli.connection, args),
        Command::Image(args) => cli::image::run(&cli.connection, args),
        Command::Config(command) => cli::config::run(command),
        Command::ApiResources => cli::api_resources::run(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // Verbs that report several failures print them as they go and return
            // `Reported`, so nothing is printed twice.
            if error.downcast_ref::<cli::Reported>().is_none() {
                eprintln!("error: {error:#}");
            }
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}
