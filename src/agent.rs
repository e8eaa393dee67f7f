//! `ferro agent`: the node agent — registers this host as a Node, renews its heartbeat,
//! and runs the servers placed on it.

use std::net::SocketAddr;
use std::path::PathBuf;

use ferro_agent::wiring::DriverKind;
use ferro_agent::{AgentConfig, Drivers};

/// Arguments of `ferro agent`.
#[derive(clap::Args, Debug)]
pub struct AgentArgs {
    /// The node's name; defaults to the host name.
    #[arg(long)]
    pub node: Option<String>,
    /// The apiserver.
    #[arg(long, default_value = "127.0.0.1:7443", value_name = "HOST:PORT")]
    pub server: String,
    /// A file holding this node's token, or a token table (`TOKEN IDENTITY` per line)
    /// with a `system:node:<node>` line.
    #[arg(long, value_name = "FILE")]
    pub token_file: PathBuf,
    /// Where guests and the image cache live (short: it holds unix sockets).
    #[arg(long, default_value = ferro_agent::DEFAULT_STATE_DIR, value_name = "DIR")]
    pub state_dir: PathBuf,
    /// The node's availability zone.
    #[arg(long, default_value = "default")]
    pub zone: String,
    /// The roles the node plays: compute, network, storage (comma-separated).
    #[arg(long, default_value = "compute")]
    pub roles: String,
    /// The address other nodes reach this one at (`Node.status.address`, the tunnel
    /// endpoint of its networks); found from the routing table when unset.
    #[arg(long, visible_alias = "node-address")]
    pub address: Option<String>,
    /// Where to serve the agent's metrics (`GET /metrics`); not served when unset.
    #[arg(long, value_name = "HOST:PORT")]
    pub metrics_addr: Option<SocketAddr>,
    /// Which driver wires tenant networks on this node: ovs or linuxbridge.
    #[arg(long, default_value = "ovs", value_name = "DRIVER")]
    pub network_driver: DriverKind,
    /// The OVSDB socket of this node's Open vSwitch instance, `unix:PATH`; the system's
    /// instance when unset.
    #[arg(long, value_name = "unix:PATH")]
    pub ovsdb: Option<String>,
    /// The interface this node's provider bridge (`br-ex`) holds, which leads to the
    /// external networks: routers' gateways and floating IPs use it. Routers placed on a
    /// node without one are built without their gateway.
    #[arg(long, value_name = "DEVICE")]
    pub provider_interface: Option<String>,
}

/// Runs `ferro agent` until SIGTERM or SIGINT; guests keep running after it exits.
pub fn run(args: AgentArgs) -> anyhow::Result<()> {
    let node = args.node.unwrap_or_else(crate::up::datadir::hostname);
    let token = ferro_agent::read_token(&args.token_file, &node)?;
    let mut config = AgentConfig::new(node, args.server, token);
    config.state_dir = args.state_dir;
    config.zone = args.zone;
    config.address = args.address;
    config.metrics_addr = args.metrics_addr;
    config.network_driver = args.network_driver;
    config.ovsdb = args.ovsdb;
    config.provider_interface = args.provider_interface;
    config.roles = ferro_agent::node::parse_roles(&args.roles).map_err(anyhow::Error::msg)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        // The real host systems: QEMU and the file image cache.
        let drivers = Drivers::real(&config)?;
        let signal = crate::apiserver::stop_signal()?;
        let config = config.with_shutdown(async move {
            let name = signal.await;
            tracing::info!("{name}: stopping; guests keep running");
        });
        ferro_agent::run(config, drivers).await
    })
}
