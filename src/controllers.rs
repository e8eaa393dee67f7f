//! `ferro controllers`: runs every controller against an apiserver, leader-elected
//! through the `controllers` Lease so that several instances can run for availability.

use std::{net::SocketAddr, path::PathBuf};

use ferro_controllers::ControllersConfig;

/// The identity the controllers act as.
pub const IDENTITY: &str = ferro_api::auth::CONTROLLERS;

/// Arguments of `ferro controllers`.
#[derive(clap::Args, Debug)]
pub struct ControllersArgs {
    /// The apiserver.
    #[arg(long, default_value = "127.0.0.1:7443", value_name = "HOST:PORT")]
    pub server: String,
    /// A token file (`TOKEN IDENTITY` per line) holding a `system:controllers` token.
    #[arg(long, value_name = "FILE")]
    pub token_file: PathBuf,
    /// Serve Prometheus metrics and /healthz here.
    #[arg(long, value_name = "HOST:PORT")]
    pub metrics_addr: Option<SocketAddr>,
    /// Keys each controller reconciles at once (a reconcile mostly waits on the apiserver).
    #[arg(long, value_name = "N", env = "FERRO_CONTROLLERS_CONCURRENCY",
          default_value_t = ferro_controllers::Options::default().concurrency as u16,
          value_parser = clap::value_parser!(u16).range(1..))]
    pub concurrency: u16,
    /// This instance's name in the `controllers` Lease [default: `<hostname>-<random>`].
    /// A process that finds the Lease held under its own identity takes it at once, so
    /// give a restarted instance the identity of the one it replaces, and never give two
    /// live instances the same one.
    #[arg(long, value_name = "ID", env = "FERRO_CONTROLLERS_IDENTITY")]
    pub identity: Option<String>,
}

/// Runs `ferro controllers` until SIGTERM or SIGINT.
pub fn run(args: ControllersArgs) -> anyhow::Result<()> {
    let token =
        ferro_api::auth::read_token_file(&args.token_file, IDENTITY).map_err(anyhow::Error::msg)?;
    let mut config = ControllersConfig::new(args.server, token);
    config.metrics_addr = args.metrics_addr;
    config.options.concurrency = usize::from(args.concurrency);
    if let Some(identity) = args.identity {
        config.identity = identity;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(ferro_controllers::run(config))?;
    Ok(())
}
