//! `ferro apiserver`: serves the Ferro API (the `Resources` service, gRPC reflection and
//! health) over a store, until SIGTERM or SIGINT.
//!
//! `--store etcd://HOST:PORT[,HOST:PORT…]` uses an etcd cluster, `--store memory` an
//! in-memory store that forgets everything on exit (for tests and demos). `--image-store
//! DIR` keeps uploaded images' bytes (`ferro image upload`) in DIR — `ferro up` passes
//! `<data-dir>/image-store` — and removes, every minute, those no Image names any more;
//! without it uploads are refused.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow};
use ferro_api::auth::Tokens;
use ferro_api::imagestore::ImageStore;
use ferro_api::server::ApiServer;
use ferro_store::Store;
use ferro_store::etcd::EtcdStore;
use ferro_store::memory::MemoryStore;

/// How long open calls (watches, mostly) get to finish after a stop signal.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Arguments of `ferro apiserver`.
#[derive(clap::Args, Debug)]
pub struct ApiserverArgs {
    /// The address to serve on; repeat it to serve on several (`ferro up --nodes N` adds
    /// the host's underlay address, where the agents in node namespaces reach it).
    #[arg(long, default_value = "127.0.0.1:7443", value_name = "HOST:PORT")]
    pub listen: Vec<String>,
    /// The store: `etcd://HOST:PORT[,HOST:PORT…]` or `memory`.
    #[arg(long, value_name = "STORE")]
    pub store: StoreUrl,
    /// The token file: one `TOKEN IDENTITY` per line.
    #[arg(long, value_name = "FILE")]
    pub token_file: PathBuf,
    /// The MTU of the network between nodes: a Network's MTU may be at most this less
    /// VXLAN's 50 bytes (an external network's, this much).
    #[arg(long, default_value_t = ferro_api::validation::DEFAULT_UNDERLAY_MTU, value_name = "BYTES")]
    pub underlay_mtu: u32,
    /// Where uploaded images' bytes are kept (`sha256/<hex>`, with uploads in progress in
    /// `tmp/`); without it, uploads are refused.
    #[arg(long, value_name = "DIR")]
    pub image_store: Option<PathBuf>,
}

/// Where the apiserver keeps objects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreUrl {
    /// An etcd cluster, by client URLs (`http://127.0.0.1:2379`).
    Etcd(Vec<String>),
    /// In memory, lost on exit.
    Memory,
}

impl std::str::FromStr for StoreUrl {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        if text == "memory" {
            return Ok(StoreUrl::Memory);
        }
        let Some(hosts) = text.strip_prefix("etcd://") else {
            return Err(format!(
                "`{text}` is not a store: use `etcd://HOST:PORT[,HOST:PORT…]` or `memory`"
            ));
        };
        let endpoints: Vec<String> = hosts
            .split(',')
            .filter(|h| !h.is_empty())
            .map(|h| format!("http://{h}"))
            .collect();
        if endpoints.is_empty() {
            return Err("etcd:// needs at least one HOST:PORT".into());
        }
        Ok(StoreUrl::Etcd(endpoints))
    }
}

/// Runs `ferro apiserver`.
pub fn run(args: ApiserverArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(serve(args))
}

async fn serve(args: ApiserverArgs) -> anyhow::Result<()> {
    if args.underlay_mtu < 1280 {
        anyhow::bail!(
            "--underlay-mtu {} is below IPv6's minimum of 1280",
            args.underlay_mtu
        );
    }
    ferro_api::validation::set_underlay_mtu(args.underlay_mtu);
    let tokens = Tokens::load(&args.token_file)
        .with_context(|| format!("cannot read the token file {}", args.token_file.display()))?;
    let store: Arc<dyn Store> = match &args.store {
        StoreUrl::Memory => Arc::new(MemoryStore::new()),
        StoreUrl::Etcd(endpoints) => Arc::new(
            EtcdStore::connect(endpoints)
                .await
                .with_context(|| format!("cannot use etcd at {}", endpoints.join(",")))?,
        ),
    };
    let mut listeners = Vec::new();
    for listen in &args.listen {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("cannot listen on {listen}"))?;
        let address = listener.local_addr()?;
        tracing::info!(%address, store = ?args.store, "apiserver serving");
        listeners.push(listener);
    }

    let mut api = ApiServer::new(store, tokens);
    if let Some(dir) = &args.image_store {
        let images = ImageStore::open(dir)
            .with_context(|| format!("cannot open the image store in {}", dir.display()))?;
        api = api.with_image_store(Arc::new(images));
        tokio::spawn(ferro_api::images::run_image_collector(
            api.clone(),
            std::future::pending(),
        ));
    }
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let mut server = tokio::spawn(api.serve_on(listeners, async {
        let _ = stop_rx.await;
    }));
    let signal = stop_signal()?;
    tokio::select! {
        result = &mut server => {
            return match result {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(anyhow!("the apiserver stopped: {e}")),
                Err(e) => Err(anyhow!("the apiserver stopped: {e}")),
            };
        }
        name = signal => tracing::info!("{name}: stopping"),
    }
    let _ = stop_tx.send(());
    // Watches stay open until their clients go; do not wait for them forever.
    match tokio::time::timeout(DRAIN_TIMEOUT, server).await {
        Ok(Ok(Err(e))) => tracing::warn!("while stopping: {e}"),
        Ok(_) => {}
        Err(_) => tracing::info!("calls still open after {DRAIN_TIMEOUT:?}; closing them"),
    }
    tracing::info!("apiserver stopped");
    Ok(())
}

/// Completes on the first SIGTERM or SIGINT, with the signal's name. The handlers are
/// installed when this is called, not when the future is first polled.
pub fn stop_signal() -> anyhow::Result<impl Future<Output = &'static str>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_urls_parse() {
        assert_eq!("memory".parse(), Ok(StoreUrl::Memory));
        assert_eq!(
            "etcd://127.0.0.1:2379,10.0.0.2:2379".parse(),
            Ok(StoreUrl::Etcd(vec![
                "http://127.0.0.1:2379".into(),
                "http://10.0.0.2:2379".into()
            ]))
        );
        assert!("etcd://".parse::<StoreUrl>().is_err());
        assert!("redis://x".parse::<StoreUrl>().is_err());
    }
}
