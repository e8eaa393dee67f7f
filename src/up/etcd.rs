//! `ferro etcd` (hidden): runs one etcd member through ferro-store's
//! [`EtcdProcess`] until SIGTERM or SIGINT, then kills it.
//!
//! This is how `ferro up` runs etcd as one of its children: this process gets
//! `PR_SET_PDEATHSIG` like every other child, and takes etcd down with it, so etcd does
//! not outlive a supervisor that was SIGKILLed. It writes etcd's own pid to `--pid-file`
//! so that a later `ferro up` can find an etcd left behind even if this process was
//! SIGKILLed too. It exits non-zero when etcd exits on its own, so the supervisor
//! restarts both.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, anyhow};
use ferro_store::etcd_process::{
    DEFAULT_ETCD_BINARY, DEFAULT_READY_TIMEOUT, DataDir, EtcdOptions, EtcdProcess,
};

use crate::process;

/// Arguments of `ferro etcd`.
#[derive(clap::Args, Debug)]
pub struct EtcdArgs {
    /// etcd's data directory (kept across restarts).
    #[arg(long, value_name = "DIR")]
    pub data_dir: PathBuf,
    /// The loopback port for clients.
    #[arg(long, value_name = "PORT")]
    pub client_port: u16,
    /// The loopback port for peers.
    #[arg(long, value_name = "PORT")]
    pub peer_port: u16,
    /// Where to write etcd's pid.
    #[arg(long, value_name = "FILE")]
    pub pid_file: PathBuf,
    /// The etcd executable.
    #[arg(long, default_value = DEFAULT_ETCD_BINARY, value_name = "FILE")]
    pub binary: PathBuf,
}

/// Runs `ferro etcd`.
pub fn run(args: EtcdArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(serve(args))
}

async fn serve(args: EtcdArgs) -> anyhow::Result<()> {
    // Handle signals before etcd exists, so a stop at any point takes etcd down.
    let mut stop = Box::pin(crate::apiserver::stop_signal()?);
    let options = EtcdOptions {
        binary: args.binary.clone(),
        name: "ferro".into(),
        data_dir: DataDir::At(args.data_dir.clone()),
        client_port: Some(args.client_port),
        peer_port: Some(args.peer_port),
        log_file: None,
    };
    let mut etcd = EtcdProcess::spawn(options).context("cannot start etcd")?;
    process::write_pidfile(&args.pid_file, etcd.pid())
        .with_context(|| format!("cannot write {}", args.pid_file.display()))?;
    tracing::info!(pid = etcd.pid(), log = %etcd.log_file().display(), "started etcd");
    let ready = tokio::select! {
        ready = etcd.wait_ready(DEFAULT_READY_TIMEOUT) => Some(ready),
        name = &mut stop => {
            tracing::info!("{name} while etcd was starting: stopping it");
            None
        }
    };
    if !matches!(ready, Some(Ok(()))) {
        drop(etcd);
        let _ = std::fs::remove_file(&args.pid_file);
        return match ready {
            Some(Err(e)) => Err(e.into()),
            _ => Ok(()),
        };
    }
    tracing::info!(url = etcd.client_url(), "etcd serving");

    let outcome = loop {
        tokio::select! {
            name = &mut stop => {
                tracing::info!("{name}: stopping etcd");
                break Ok(());
            }
            _ = tokio::time::sleep(Duration::from_millis(500)) => {
                if let Some(status) = etcd.try_exit_status()? {
                    break Err(anyhow!(
                        "etcd exited ({status}); end of {}:\n{}",
                        etcd.log_file().display(),
                        etcd.log_tail(20)
                    ));
                }
            }
        }
    };
    // Dropping the process kills and reaps it.
    drop(etcd);
    let _ = std::fs::remove_file(&args.pid_file);
    outcome
}
