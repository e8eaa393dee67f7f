//! `ferro up` and `ferro down`: the all-in-one cloud on one machine.
//!
//! `ferro up` claims its data directory, stops whatever a previous, killed `ferro up`
//! left running there (processes, and the network topology recorded in `topology.json`),
//! mints tokens on first start, builds its topology (see [`topology`]: with `--nodes N`,
//! N node namespaces on an underlay of its own, and a private Open vSwitch instance per
//! node), then supervises its children (see [`children`]): etcd, the apiserver, the
//! controllers and one node agent per node. Once the apiserver serves it seeds the default
//! objects, writes the CLI's config and says how to use the cloud. SIGTERM or Ctrl-C stops
//! the children in reverse order, removes the topology and exits 0; objects persist in
//! etcd's data for the next start.
//!
//! `ferro down` asks a running `ferro up` to stop, removes whatever a killed one left (its
//! processes, its guests, its topology) and, with `--purge`, its data directory.

use std::ffi::OsString;
use std::net::TcpListener;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};
use ferro_api::client::Client;
use rustix::process::Signal;

pub mod datadir;
pub mod etcd;
pub mod seed;
pub mod supervisor;
pub mod topology;

use datadir::{DataDir, Ownership};
use ferro_agent::switch::ovs_instance::OvsInstance;
use ferro_agent::wiring::DriverKind;
use supervisor::{ChildSpec, Readiness, Supervisor};
use topology::{Built, Layout};

use crate::cli::config;
use crate::process;

/// Where `ferro up` keeps its state unless told otherwise.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/ferro";

/// How long `ferro down` waits for `ferro up` to stop before killing it.
const DOWN_TIMEOUT: Duration = Duration::from_secs(60);

/// Which store the all-in-one apiserver uses.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreKind {
    /// A single etcd member with its data in the data directory.
    Etcd,
    /// In memory: nothing survives a restart.
    Memory,
}

/// Arguments of `ferro up`.
#[derive(clap::Args, Debug)]
pub struct UpArgs {
    /// Where state lives: etcd's data, tokens, pidfiles, logs.
    #[arg(long, default_value = DEFAULT_DATA_DIR, value_name = "DIR")]
    pub data_dir: PathBuf,
    /// Where the apiserver listens.
    #[arg(long, default_value = "127.0.0.1:7443", value_name = "HOST:PORT")]
    pub api_addr: String,
    /// The apiserver's store.
    #[arg(long, value_enum, default_value_t = StoreKind::Etcd)]
    pub store: StoreKind,
    /// Make this cloud's context the CLI's current one even while the current context's
    /// cloud is alive [default: only when no live cloud is current].
    #[arg(long)]
    pub set_context: bool,
    /// How many nodes: 1 runs one agent on this host; more run each node's agent (and
    /// its guests and switch) in a network namespace `<prefix>-node-<i>`.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub nodes: u32,
    /// Which driver wires tenant networks on every node: ovs or linuxbridge. With ovs,
    /// each node gets a private Open vSwitch instance.
    #[arg(long, default_value = "ovs", value_name = "DRIVER")]
    pub network_driver: DriverKind,
    /// What this cloud's namespaces and host link are named after (`<prefix>-node-1`,
    /// `<prefix>-underlay`, `<prefix>-outside`, `<prefix>-ul`); at most 12 characters.
    #[arg(long, default_value = "ferro", value_name = "PREFIX")]
    pub name_prefix: String,
}

impl UpArgs {
    /// What the topology of this cloud is.
    pub fn layout(&self, dir: &DataDir) -> Layout {
        Layout {
            prefix: self.name_prefix.clone(),
            nodes: self.nodes,
            ovs: self.network_driver == DriverKind::Ovs,
            data_dir: dir.root().to_owned(),
        }
    }

    /// The port of `--api-addr`.
    fn api_port(&self) -> anyhow::Result<u16> {
        self.api_addr
            .rsplit_once(':')
            .and_then(|(_, port)| port.parse().ok())
            .filter(|port| *port != 0)
            .ok_or_else(|| anyhow!("--api-addr {}: needs a port other than 0", self.api_addr))
    }

    /// The names of the nodes' agents (and Nodes).
    fn node_names(&self) -> Vec<String> {
        if self.nodes < 2 {
            vec![datadir::hostname()]
        } else {
            (1..=self.nodes).map(|i| format!("node-{i}")).collect()
        }
    }
}

/// Arguments of `ferro down`.
#[derive(clap::Args, Debug)]
pub struct DownArgs {
    /// The data directory of the `ferro up` to stop.
    #[arg(long, default_value = DEFAULT_DATA_DIR, value_name = "DIR")]
    pub data_dir: PathBuf,
    /// Also remove all state: the data directory (objects, tokens, logs).
    #[arg(long)]
    pub purge: bool,
}

/// The children of `ferro up`, in start order. Adding a role is one entry here. Roles
/// read their own token from the token file by identity.
pub fn children(
    dir: &DataDir,
    args: &UpArgs,
    built: &Built,
    etcd: Option<&EtcdPorts>,
    admin_token: &str,
) -> anyhow::Result<Vec<ChildSpec>> {
    let path = |p: PathBuf| OsString::from(p);
    let mut children = Vec::new();
    let store = match etcd {
        Some(ports) => {
            children.push(ChildSpec {
                name: "etcd".into(),
                netns: None,
                args: vec![
                    "etcd".into(),
                    "--data-dir".into(),
                    path(dir.etcd_data()),
                    "--client-port".into(),
                    ports.client.to_string().into(),
                    "--peer-port".into(),
                    ports.peer.to_string().into(),
                    "--pid-file".into(),
                    path(dir.etcd_pidfile()),
                ],
                ready: Readiness::Etcd(ports.client_url()),
            });
            format!("etcd://127.0.0.1:{}", ports.client)
        }
        None => "memory".to_owned(),
    };
    let mut apiserver: Vec<OsString> = vec![
        "apiserver".into(),
        "--listen".into(),
        args.api_addr.clone().into(),
        "--store".into(),
        store.into(),
        "--token-file".into(),
        path(dir.tokens()),
        "--image-store".into(),
        path(dir.image_store()),
    ];
    // The agents in node namespaces reach the host only on the underlay.
    let underlay_api = if built.nodes.is_empty() {
        None
    } else {
        let address = format!(
            "{}:{}",
            topology::host_address(built.underlay),
            args.api_port()?
        );
        apiserver.extend(["--listen".into(), address.clone().into()]);
        Some(address)
    };
    children.push(ChildSpec {
        name: "apiserver".into(),
        netns: None,
        args: apiserver,
        ready: Readiness::Api {
            address: args.api_addr.clone(),
            token: admin_token.to_owned(),
        },
    });
    children.push(ChildSpec {
        name: "controllers".into(),
        netns: None,
        args: vec![
            "controllers".into(),
            "--server".into(),
            args.api_addr.clone().into(),
            "--token-file".into(),
            path(dir.tokens()),
            // One identity for every run of this child: a restarted controllers process
            // takes its predecessor's Lease at once instead of waiting for it to lapse.
            // The supervisor has ended the predecessor first, so two never lead at once.
            "--identity".into(),
            format!("{}-ferro-up", datadir::hostname()).into(),
        ],
        ready: Readiness::Lease {
            address: args.api_addr.clone(),
            token: admin_token.to_owned(),
            lease: "controllers".to_owned(),
        },
    });
    // The first two nodes also play the network role: they serve DHCP and host routers,
    // and a router on one fails over to the other. Every node is a storage node.
    let network_nodes: Vec<String> = args.node_names().into_iter().take(2).collect();
    let agent = |node: &str, server: &str, state_dir: PathBuf, ovs_dir: PathBuf| {
        // Every node holds volumes on its own disk.
        let roles = if network_nodes.iter().any(|n| n == node) {
            "compute,network,storage"
        } else {
            "compute,storage"
        };
        let mut agent: Vec<OsString> = vec![
            "agent".into(),
            "--node".into(),
            node.into(),
            "--roles".into(),
            roles.into(),
            "--server".into(),
            server.into(),
            "--token-file".into(),
            path(dir.tokens()),
            "--state-dir".into(),
            path(state_dir),
            "--network-driver".into(),
            args.network_driver.as_str().into(),
        ];
        if !built.nodes.is_empty() {
            // Each node namespace has a link into `<prefix>-outside`: the provider network.
            agent.extend([
                "--provider-interface".into(),
                topology::NODE_PROVIDER_DEVICE.into(),
            ]);
        }
        if args.network_driver == DriverKind::Ovs {
            let socket = OvsInstance::new(ovs_dir).db_socket();
            agent.extend([
                "--ovsdb".into(),
                format!("unix:{}", socket.display()).into(),
            ]);
        }
        agent
    };
    let ready = |node: &str| Readiness::Lease {
        address: args.api_addr.clone(),
        token: admin_token.to_owned(),
        lease: format!("node-{node}"),
    };
    match &underlay_api {
        None => {
            let node = datadir::hostname();
            let mut args = agent(
                &node,
                &args.api_addr,
                dir.agent(),
                args.layout(dir).host_ovs_dir(),
            );
            // On a free loopback port, named in its log (`serving metrics addr=…`).
            args.extend(["--metrics-addr".into(), "127.0.0.1:0".into()]);
            children.push(ChildSpec {
                name: "agent".into(),
                netns: None,
                args,
                ready: ready(&node),
            });
        }
        Some(server) => {
            for node in &built.nodes {
                let mut args = agent(&node.name, server, node.agent_dir(), node.ovs_dir());
                args.extend([
                    "--address".into(),
                    node.address.to_string().into(),
                    // Inside the namespace, so every node may use the same port; the host
                    // reaches it on the underlay.
                    "--metrics-addr".into(),
                    format!("{}:{}", node.address, topology::AGENT_METRICS_PORT).into(),
                ]);
                children.push(ChildSpec {
                    name: format!("agent-{}", node.name),
                    netns: Some(node.netns.clone()),
                    args,
                    ready: ready(&node.name),
                });
            }
        }
    }
    Ok(children)
}

/// The loopback ports of the all-in-one etcd member, kept in `etcd.urls` so that every
/// start of the same data directory uses the same ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EtcdPorts {
    /// The client port.
    pub client: u16,
    /// The peer port.
    pub peer: u16,
}

impl EtcdPorts {
    /// `http://127.0.0.1:PORT`.
    pub fn client_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.client)
    }

    /// The ports recorded in the data directory, or two free ones, recorded there.
    pub fn load_or_pick(dir: &DataDir) -> anyhow::Result<Self> {
        let path = dir.etcd_urls();
        if let Ok(text) = std::fs::read_to_string(&path) {
            let ports: Vec<u16> = text
                .lines()
                .filter_map(|l| l.trim().rsplit_once(':')?.1.parse().ok())
                .collect();
            if let [client, peer] = ports[..] {
                return Ok(EtcdPorts { client, peer });
            }
            tracing::warn!("{} is not two URLs; picking new ports", path.display());
        }
        // Hold both listeners until both are picked, so the two differ.
        let a = TcpListener::bind("127.0.0.1:0").context("cannot pick a free port")?;
        let b = TcpListener::bind("127.0.0.1:0").context("cannot pick a free port")?;
        let ports = EtcdPorts {
            client: a.local_addr()?.port(),
            peer: b.local_addr()?.port(),
        };
        std::fs::write(
            &path,
            format!("{}\nhttp://127.0.0.1:{}\n", ports.client_url(), ports.peer),
        )
        .with_context(|| format!("cannot write {}", path.display()))?;
        Ok(ports)
    }
}

/// Runs `ferro up`.
pub fn run(args: UpArgs) -> anyhow::Result<()> {
    // One thread: children get PR_SET_PDEATHSIG, which fires when the thread that spawned
    // them exits, so they must all be spawned from a thread that lives as long as we do.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(up(args))
}

async fn up(args: UpArgs) -> anyhow::Result<()> {
    let dir = DataDir::create(&args.data_dir)?;
    let layout = args.layout(&dir);
    layout.validate()?;
    let _ownership = Ownership::claim(&dir)?;
    dir.stop_leftovers();
    remove_topology(&dir, "a previous `ferro up` left")?;

    let mut identities = vec![
        ferro_api::auth::ADMIN.to_owned(),
        ferro_api::auth::CONTROLLERS.to_owned(),
    ];
    identities.extend(
        args.node_names()
            .iter()
            .map(|node| format!("{}{node}", ferro_api::auth::NODE_PREFIX)),
    );
    let tokens = datadir::ensure_tokens(&dir.tokens(), &identities)?;
    let etcd = match args.store {
        StoreKind::Etcd => Some(EtcdPorts::load_or_pick(&dir)?),
        StoreKind::Memory => None,
    };

    // Ask for a stop from here on; the supervisor stops what it started either way.
    let (stop_tx, mut stop) = tokio::sync::watch::channel(false);
    let signal = crate::apiserver::stop_signal()?;
    tokio::spawn(async move {
        let name = signal.await;
        tracing::info!("{name}: stopping");
        let _ = stop_tx.send(true);
    });

    // Removed again however this function returns, after the children stopped; after a
    // SIGKILL, the record in the data directory is how the next start or `ferro down`
    // finds it.
    let topology_guard = TopologyGuard(dir.clone());
    let started = Instant::now();
    let built = tokio::select! {
        built = topology::create(&layout) => built?,
        _ = stop.wait_for(|s| *s) => return Ok(()),
    };
    tracing::info!("network topology ready in {:.1?}", started.elapsed());
    let outcome = supervise(&dir, &args, &built, etcd.as_ref(), &tokens.admin, &mut stop).await;
    drop(topology_guard);
    tracing::info!("ferro up stopped");
    outcome
}

/// Runs the children until a stop is asked for, then stops them.
async fn supervise(
    dir: &DataDir,
    args: &UpArgs,
    built: &Built,
    etcd: Option<&EtcdPorts>,
    admin_token: &str,
    stop: &mut tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let mut supervisor = Supervisor::new(dir.clone())?;
    let specs = children(dir, args, built, etcd, admin_token)?;
    if !supervisor.start(specs, stop).await? {
        supervisor.stop_all();
        return Ok(());
    }

    let client = Client::connect_lazy(&args.api_addr, admin_token).map_err(|e| anyhow!("{e}"))?;
    tokio::select! {
        seeded = seed::apply(&client) => seeded?,
        _ = stop.wait_for(|s| *s) => {
            supervisor.stop_all();
            return Ok(());
        }
    }
    // An open connection would hold the apiserver's graceful shutdown.
    drop(client);
    let context = write_cli_context(dir, args, admin_token).await?;
    print_welcome(dir, args, built, etcd, context.as_ref());

    let switches = tokio::spawn(topology::keep_switches_running(built.switches.clone()));
    supervisor.supervise(stop).await;
    switches.abort();
    supervisor.stop_all();
    Ok(())
}

/// Removes the topology of a data directory when dropped: after the children stopped.
struct TopologyGuard(DataDir);

impl Drop for TopologyGuard {
    fn drop(&mut self) {
        if let Err(e) = remove_topology(&self.0, "this `ferro up` made") {
            tracing::warn!("{e:#}");
        }
    }
}

/// Removes the network topology recorded in the data directory, if any. With node
/// namespaces, what the agents wired in them goes first (DHCP servers, taps, the
/// namespaces of DHCP servers and probes): their guests lose the network with the node
/// namespaces anyway. With one node on the host nothing of the agent's is touched, so
/// guests and their DHCP keep running across a restart of `ferro up`, as they are meant
/// to; `ferro down` removes them.
fn remove_topology(dir: &DataDir, whose: &str) -> anyhow::Result<()> {
    let namespaced = topology::Record::load(dir.root())
        .ok()
        .flatten()
        .is_some_and(|r| {
            r.steps
                .iter()
                .any(|s| matches!(s, topology::Step::Namespace { .. }))
        });
    if namespaced {
        clear_networks(dir);
    }
    let removed = topology::teardown(dir.root())?;
    if removed > 0 {
        tracing::info!("removed {removed} namespaces, links and switch instances {whose}");
    }
    Ok(())
}

/// What `ferro up` did to the CLI's config.
struct ContextWritten {
    /// The config file.
    path: PathBuf,
    /// This cloud's context.
    name: String,
    /// The current context, when it stayed another live cloud's: its name and server.
    kept: Option<(String, String)>,
}

impl ContextWritten {
    /// One line for the user: what was written and which context is current.
    fn summary(&self) -> String {
        match &self.kept {
            None => format!("context {} written and made current", self.name),
            Some((current, server)) => format!(
                "context {} written; current context stays {current} (live at {server}); \
                 use: ferro config use-context {}",
                self.name, self.name
            ),
        }
    }
}

/// Writes (or refreshes) this cloud's context in the CLI's config, with the admin token,
/// and makes it current unless the current context reaches another cloud that is still
/// alive (see [`config::Config::takeover`]); `--set-context` makes it current regardless.
/// Returns `None` when there is no place for a config (no `$HOME`).
async fn write_cli_context(
    dir: &DataDir,
    args: &UpArgs,
    admin_token: &str,
) -> anyhow::Result<Option<ContextWritten>> {
    let Some(path) = config::path() else {
        tracing::warn!("no $FERRO_CONFIG, $XDG_CONFIG_HOME or $HOME: not writing a CLI config");
        return Ok(None);
    };
    // Ask whether the current cloud is alive before taking the lock (it may take seconds),
    // then decide again under the lock on what the file says by then.
    let snapshot = config::load(&path)?.unwrap_or_default();
    let name = snapshot.context_name_for(dir.root());
    let own = |project: String| config::Context {
        name: name.clone(),
        server: Some(args.api_addr.clone()),
        token: Some(admin_token.to_owned()),
        project: Some(project),
        data_dir: Some(dir.root().display().to_string()),
        ..config::Context::default()
    };
    let probe = own(String::new());
    let live = match snapshot.takeover(&probe, args.set_context) {
        config::Takeover::Take => None,
        config::Takeover::IfGone(current) => {
            let server = current.server.clone().unwrap_or_default();
            let alive = answers(&server, current.token.as_deref()).await;
            Some((current.name.clone(), alive))
        }
    };
    let kept = config::update(&path, |cli_config| {
        let project = cli_config
            .get(&name)
            .and_then(|c| c.project.clone())
            .unwrap_or_else(|| ferro_api::server::DEFAULT_PROJECT.to_owned());
        let own = own(project);
        let kept = match cli_config.takeover(&own, args.set_context) {
            config::Takeover::Take => None,
            config::Takeover::IfGone(current) => match &live {
                Some((checked, false)) if *checked == current.name => None,
                // Alive, or another context became current meanwhile: leave it.
                _ => Some((
                    current.name.clone(),
                    current.server.clone().unwrap_or_default(),
                )),
            },
        };
        cli_config.upsert(own);
        if kept.is_none() {
            cli_config.current_context = Some(name.clone());
        }
        kept
    })?;
    let written = ContextWritten { path, name, kept };
    tracing::info!("{}", written.summary());
    Ok(Some(written))
}

/// Whether an apiserver answers at `server` within a few seconds: any answer, even a
/// refused token, means a cloud lives there.
async fn answers(server: &str, token: Option<&str>) -> bool {
    let Ok(client) = Client::connect_lazy(server, token.unwrap_or("none")) else {
        return false;
    };
    let everything = ferro_api::client::Selection::all();
    let call = client.list_page(ferro_api::Kind::Flavor, &everything, 1, "");
    match tokio::time::timeout(Duration::from_secs(3), call).await {
        Ok(Ok(_)) => true,
        Ok(Err(ferro_api::Error::Unavailable { message })) => {
            // The apiserver itself says its store is down: it still answers.
            message.starts_with("store unavailable")
        }
        Ok(Err(_)) => true,
        Err(_) => false,
    }
}

fn print_welcome(
    dir: &DataDir,
    args: &UpArgs,
    built: &Built,
    etcd: Option<&EtcdPorts>,
    context: Option<&ContextWritten>,
) {
    let root = dir.root().display();
    println!("Ferro is up.");
    println!("  API (gRPC):  {}", args.api_addr);
    if !built.nodes.is_empty() {
        let layout = args.layout(dir);
        println!(
            "  nodes:       {} ({} driver), in namespaces {}-node-1…{}; agents reach the API at {}:{} on {}",
            built.nodes.len(),
            args.network_driver,
            args.name_prefix,
            built.nodes.len(),
            topology::host_address(built.underlay),
            args.api_port().unwrap_or_default(),
            layout.host_link(),
        );
        println!(
            "  underlay:    {} (namespace {}), outside: {} (namespace {})",
            built.underlay,
            layout.underlay_netns(),
            topology::OUTSIDE_ADDRESS,
            layout.outside_netns(),
        );
    }
    match etcd {
        Some(ports) => println!(
            "  store:       etcd at {} (data in {root}/etcd)",
            ports.client_url()
        ),
        None => println!("  store:       memory (nothing survives a restart)"),
    }
    println!("  tokens:      {root}/tokens");
    println!("  logs:        {root}/log/");
    match context {
        Some(written) => {
            println!("  CLI config:  {} (admin token)", written.path.display());
            println!("  {}", written.summary());
        }
        None => println!("  CLI config:  none; use --server and --token"),
    }
    println!();
    println!("Try: ferro get flavors; ferro apply -f manifests/; ferro get servers");
    println!("Stop with Ctrl-C or `ferro down --data-dir {root}`.");
}

/// Runs `ferro down`.
pub fn down(args: DownArgs) -> anyhow::Result<()> {
    let Some(dir) = DataDir::existing(&args.data_dir) else {
        println!(
            "nothing to stop: {} does not exist",
            args.data_dir.display()
        );
        return Ok(());
    };
    match datadir::owner(&dir)? {
        Some(pid) if pid > 0 => {
            println!("stopping ferro up (pid {pid})");
            process::signal(pid, Signal::TERM);
            if !wait_released(&dir, DOWN_TIMEOUT)? {
                tracing::warn!(
                    "ferro up (pid {pid}) still running after {DOWN_TIMEOUT:?}; killing it"
                );
                process::signal(pid, Signal::KILL);
                wait_released(&dir, Duration::from_secs(10))?;
            }
        }
        Some(_) => {
            return Err(anyhow!(
                "{} is locked but names no pid; try again",
                dir.pidfile().display()
            ));
        }
        None => println!("no ferro up is running on {}", dir.root().display()),
    }
    // Whatever a killed `ferro up` left behind.
    dir.stop_leftovers();
    stop_guests(&dir);
    clear_networks(&dir);
    remove_topology(&dir, "a killed `ferro up` left")?;
    if args.purge {
        if !dir.looks_like_ours() {
            return Err(anyhow!(
                "{} does not look like a ferro data directory (no ferro-up.pid or tokens); not removing it",
                dir.root().display()
            ));
        }
        std::fs::remove_dir_all(dir.root())
            .with_context(|| format!("cannot remove {}", dir.root().display()))?;
        println!("removed {}", dir.root().display());
    }
    Ok(())
}

/// Stops the guests (VMs) of this data directory's agent. Guests outlive `ferro up` by
/// design; `ferro down` is where they stop (ACPI, then forced after a grace period).
fn stop_guests(dir: &DataDir) {
    for state_dir in dir.agent_dirs() {
        let stopped = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(ferro_agent::stop_guests(&state_dir, GUEST_STOP_GRACE)));
        match stopped {
            Ok(0) => {}
            Ok(n) => println!(
                "stopped {n} guest{} of {}",
                if n == 1 { "" } else { "s" },
                state_dir.display()
            ),
            Err(e) => tracing::warn!(
                "cannot stop the guests under {}: {e:#}",
                state_dir.display()
            ),
        }
    }
}

/// Removes what each agent of this data directory wired: in its node's namespace while
/// that still exists (the host's for the one-node cloud).
fn clear_networks(dir: &DataDir) {
    let record = topology::Record::load(dir.root()).ok().flatten();
    for state_dir in dir.agent_dirs() {
        // `nodes/node-<i>/agent` runs in the recorded namespace `<prefix>-node-<i>`.
        let node = state_dir
            .parent()
            .filter(|p| p.parent().is_some_and(|n| n.ends_with("nodes")))
            .and_then(|p| p.file_name())
            .map(|n| n.to_string_lossy().into_owned());
        let netns = match &node {
            None => None,
            Some(node) => {
                let suffix = format!("-{node}");
                let recorded = record.as_ref().and_then(|r| {
                    r.steps.iter().find_map(|step| match step {
                        topology::Step::Namespace { name } if name.ends_with(&suffix) => {
                            Some(name.clone())
                        }
                        _ => None,
                    })
                });
                match recorded {
                    Some(netns) if std::path::Path::new("/run/netns").join(&netns).exists() => {
                        Some(netns)
                    }
                    // Its namespace is gone, and its devices with it.
                    _ => continue,
                }
            }
        };
        // On a thread of its own: `ferro up` calls this from inside its runtime.
        let cleared = std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .map_err(anyhow::Error::from)
                        .and_then(|rt| {
                            rt.block_on(ferro_agent::network::clear_node(
                                &state_dir,
                                netns.as_deref(),
                            ))
                            .map_err(anyhow::Error::from)
                        })
                })
                .join()
                .unwrap_or_else(|_| Err(anyhow::anyhow!("clearing the network panicked")))
        });
        match cleared {
            Ok(0) => {}
            Ok(n) => tracing::info!(
                "removed {n} DHCP servers, devices and namespaces of {}",
                state_dir.display()
            ),
            Err(e) => tracing::warn!(
                "cannot remove the networking of {}: {e:#}",
                state_dir.display()
            ),
        }
    }
}

/// How long a guest gets to power off on `ferro down` before it is ended.
const GUEST_STOP_GRACE: Duration = Duration::from_secs(30);

fn wait_released(dir: &DataDir, timeout: Duration) -> anyhow::Result<bool> {
    let deadline = Instant::now() + timeout;
    while datadir::owner(dir)?.is_some() {
        if Instant::now() >= deadline {
            return Ok(false);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(true)
}
