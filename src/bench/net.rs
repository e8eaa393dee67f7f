//! `ferro bench net`: how fast Ferro wires ports, how fast traffic crosses its wiring, and
//! what an agent restart costs — under `ferro up --nodes 3`, once per network driver.
//!
//! For each driver the bench starts its own three-node cloud in a scratch directory and
//! makes a Network. The machines are probe Ports (`deviceOwner: network:probe`, placed on
//! a node by the `ferro.io/probe-node` annotation), which the node wires as a namespace of
//! their own, as Neutron's fullstack tests plug namespaces into ports:
//!
//! - **(a) port wiring latency**: from the Port's create until it answers a ping from a
//!   reference probe on another node, for `--ports` Ports spread over the three nodes,
//!   created four at a time; p50 and p99.
//! - **(b) TCP throughput** between reference probes on node 1 and node 2 through
//!   Ferro's wiring, against the same pieces wired by hand by the bench between two
//!   namespaces of its own on the same nodes: a kernel bridge and VXLAN device for Linux
//!   bridges, a userspace `br-raw` with a VXLAN port for Open vSwitch. One TCP stream for
//!   `--seconds`, written and read by the bench itself in those namespaces; `--rounds`
//!   rounds (5), alternating, so that a burst of load on the machine falls on both; the
//!   medians, their ratio, and the lowest and highest ratio of a round.
//!
//! The pings of (a) are ICMP echo requests the bench sends itself every 20 ms from the
//! reference probe's namespace, whose ARP asks again every 20 ms (Linux waits a second
//! by default, which would round every figure up to the next second).
//! - **(c) agent restart**: with the (a) Ports wired, node 1's agent is SIGKILLed (its
//!   supervisor starts it again); the figure is the time until the new agent has finished
//!   a network pass, and the packets a 10/s ping between the node-1 and node-2 reference
//!   probes lost across it.
//! - **(d) floating IP association**: a Router joins the network to an external one
//!   (`203.0.113.0/24`, whose upstream is the cloud's `outside` namespace), and
//!   `--floating-ips` of the (a) Ports get a FloatingIP each, created four at a time; each
//!   is timed from its create until it answers an echo request the bench sends every 20 ms
//!   from the outside namespace; p50 and p99.
//! - **(e) TCP through SNAT**: one stream from a probe on the router's node (without port
//!   security: this measures the router) out through the router's SNAT to a listener in
//!   the outside namespace, against a SNAT
//!   path the bench builds by hand on that node from the same pieces (a client namespace
//!   on the driver's kind of switch, a namespace forwarding with one nftables SNAT rule, a
//!   kernel bridge with an uplink into the outside bridge); `--rounds` rounds,
//!   alternating; the medians and their ratio.
//! - **(f) router failover**: the router's node dies — its agent SIGSTOPped, its
//!   provider link down, its `qrouter-` namespace deleted — and the figure is the time until the first floating
//!   IP answers from outside again, through the other network node (the agent is resumed
//!   afterwards). It is bounded below by the heartbeat lease (40 s) and the router
//!   controller's failover grace (30 s).
//! - **(g) security group rule change → enforced**: `--sg-ports` probe Ports on node 1
//!   in one SecurityGroup, which lets
//!   everything out and nothing in; then `--sg-changes` times a rule for one more TCP port
//!   is added to the group, each timed from the apply until a connection from the node-2
//!   reference probe to that port of the first of those Ports is accepted (attempts every
//!   50 ms); p50 and p99. Every change rewrites the ingress rules of every Port in the
//!   group (nftables chains; OpenFlow flows under each Port's cookie).
//!
//! Since ports are filtered, the bench adds a rule letting ping in from anywhere to the
//! project's `default` group before (d).

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use ferro_api::client::{Client, Selection};
use ferro_api::{Kind, Resource, v1};

use super::harness::{Workspace, wait_every, wait_for};

/// The network every machine of the bench is on.
const CIDR: &str = "10.8.0.0/16";
/// How long one phase may take before the bench gives up.
const TIMEOUT: Duration = Duration::from_secs(300);
/// The TCP port of the throughput test.
const TCP_PORT: u16 = 5201;
/// The VNI of the bench's own hand-made tunnels.
const RAW_VNI: u32 = 4000;

/// Arguments of `ferro bench net`.
#[derive(clap::Args, Debug)]
pub struct NetBenchArgs {
    /// Ports wired in (a), spread over the three nodes.
    #[arg(long, default_value_t = 200)]
    pub ports: usize,
    /// The drivers to measure, in order.
    #[arg(long, value_delimiter = ',', default_value = "linuxbridge,ovs")]
    pub drivers: Vec<String>,
    /// How long each TCP stream of (b) runs.
    #[arg(long, default_value_t = 3)]
    pub seconds: u64,
    /// How many alternating rounds of (b) to run.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    pub rounds: u32,
    /// Floating IPs timed in (d), on as many of the (a) ports (at most 200).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(0..=200))]
    pub floating_ips: u64,
    /// Whether to time (f), a router failover (about 75 s per driver).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub failover: bool,
    /// Ports on node 1 in the security group of (g) (0 skips it).
    #[arg(long, default_value_t = 500)]
    pub sg_ports: usize,
    /// Rule changes timed in (g).
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..=1000))]
    pub sg_changes: u64,
}

/// A three-node `ferro up` in a scratch directory; stopped (with `ferro down`) on drop.
struct Cloud {
    scratch: Workspace,
    prefix: String,
    child: Option<Child>,
    client: Client,
}

impl Cloud {
    async fn start(driver: &str, prefix: &str) -> anyhow::Result<Cloud> {
        let shm = Path::new("/dev/shm");
        // Short: the node agents' VM sockets live under it.
        let scratch = Workspace::new("n", shm.is_dir().then_some(shm))?;
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(scratch.path(), std::fs::Permissions::from_mode(0o711))?;
        }
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let config = scratch.path().join("config.yaml");
        let log = std::fs::File::create(scratch.path().join("ferro-up.log"))?;
        let child = Command::new(std::env::current_exe()?)
            .args(["up", "--nodes", "3", "--network-driver", driver])
            .args(["--name-prefix", prefix])
            .args(["--api-addr", &format!("127.0.0.1:{port}"), "--data-dir"])
            .arg(scratch.path().join("data"))
            .env("FERRO_CONFIG", &config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting ferro up")?;
        let mut cloud = Cloud {
            scratch,
            prefix: prefix.to_owned(),
            child: Some(child),
            client: Client::connect_lazy("127.0.0.1:1", "none").map_err(|e| anyhow!("{e}"))?,
        };
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some(child) = &mut cloud.child
                && let Some(status) = child.try_wait()?
            {
                let log = std::fs::read_to_string(cloud.log()).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(6).collect();
                bail!(
                    "ferro up exited ({status}); its last lines:\n{}",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
            if let Some(c) = crate::cli::config::load(&config)?.and_then(|c| c.current().cloned())
                && let (Some(server), Some(token)) = (c.server, c.token)
            {
                let client = Client::connect_lazy(&server, &token).map_err(|e| anyhow!("{e}"))?;
                if let Ok((nodes, _)) = client.list(Kind::Node, &Selection::all()).await {
                    let ready = nodes
                        .into_iter()
                        .filter_map(v1::Node::from_object)
                        .filter(networking)
                        .count();
                    if ready == 3 {
                        cloud.client = client;
                        return Ok(cloud);
                    }
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "three nodes did not wire networks in time: see {}",
                    cloud.log().display()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn log(&self) -> PathBuf {
        self.scratch.path().join("ferro-up.log")
    }

    fn data_dir(&self) -> PathBuf {
        self.scratch.path().join("data")
    }

    fn node_netns(&self, node: usize) -> String {
        format!("{}-node-{node}", self.prefix)
    }

    async fn apply(&self, yaml: &str) -> anyhow::Result<()> {
        for object in ferro_api::codec::decode_yaml(yaml)? {
            self.client
                .create(object)
                .await
                .map_err(|e| anyhow!("{e}"))?;
        }
        Ok(())
    }

    /// Creates a probe Port on `node` with `ip`.
    async fn probe(&self, name: &str, node: usize, ip: Ipv4Addr) -> anyhow::Result<()> {
        self.apply(&format!(
            "apiVersion: ferro/v1\nkind: Port\nmetadata: {{name: {name}, annotations: \
             {{ferro.io/probe-node: node-{node}}}}}\nspec: {{network: bench, deviceOwner: \
             \"network:probe\", fixedIps: [{{ipAddress: {ip}}}]}}\n"
        ))
        .await
    }

    /// The namespace of a probe Port, once its node has bound it.
    async fn bound_probe(&self, name: &str) -> anyhow::Result<String> {
        let client = self.client.clone();
        wait_every(
            &format!("probe {name} bound"),
            TIMEOUT,
            Duration::from_millis(20),
            || {
                let client = client.clone();
                async move {
                    let port = client.get_typed::<v1::Port>("default", name).await.ok()?;
                    let bound = port.status.as_ref().is_some_and(|s| s.bound);
                    bound.then(|| {
                        format!(
                            "qprobe-{}",
                            port.metadata
                                .as_ref()
                                .map(|m| m.uid.clone())
                                .unwrap_or_default()
                        )
                    })
                }
            },
        )
        .await
    }

    fn agent_pid(&self, node: usize) -> anyhow::Result<u32> {
        let path = self.data_dir().join(format!("run/agent-node-{node}.pid"));
        Ok(std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?
            .trim()
            .parse()?)
    }

    /// The OVSDB socket of node `node`'s Open vSwitch instance.
    fn ovsdb(&self, node: usize) -> PathBuf {
        self.data_dir()
            .join(format!("nodes/node-{node}/ovs/db.sock"))
    }

    /// Node `node`'s underlay address, from its Node.
    async fn node_address(&self, node: usize) -> anyhow::Result<Ipv4Addr> {
        let n = self
            .client
            .get_typed::<v1::Node>("", &format!("node-{node}"))
            .await
            .map_err(|e| anyhow!("{e}"))?;
        Ok(n.status.unwrap_or_default().address.parse()?)
    }
}

impl Drop for Cloud {
    fn drop(&mut self) {
        if let Ok(exe) = std::env::current_exe() {
            let _ = Command::new(exe)
                .args(["down", "--data-dir"])
                .arg(self.data_dir())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn networking(node: &v1::Node) -> bool {
    node.status.as_ref().is_some_and(|s| {
        !s.network_driver.is_empty()
            && s.conditions.iter().any(|c| {
                c.r#type == "NetworkReady" && c.status == v1::condition::Status::True as i32
            })
    })
}

/// Whether `ip` answers one ping from inside `netns`, within `wait`.
fn pings(netns: &str, ip: Ipv4Addr, wait: &str) -> bool {
    Command::new("ip")
        .args([
            "netns", "exec", netns, "busybox", "ping", "-c", "1", "-W", wait,
        ])
        .arg(ip.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn run(program: &str, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(program).args(args).output()?;
    if !out.status.success() {
        bail!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// The address of the `i`th wired port (10.8.1.0 onwards).
fn port_ip(i: usize) -> Ipv4Addr {
    let n = 256 + 10 + i as u32;
    Ipv4Addr::new(10, 8, (n / 256) as u8, (n % 256) as u8)
}

fn reference_ip(node: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 8, 255, node as u8)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// One TCP stream from `from` to `to` (namespaces) for `seconds`: the receiver's Gbit/s.
fn tcp_throughput(from: &str, to: &str, to_ip: Ipv4Addr, seconds: u64) -> anyhow::Result<f64> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let to_owned = to.to_owned();
    let receiver = std::thread::spawn(move || -> anyhow::Result<(u64, Duration)> {
        enter(&to_owned)?;
        let listener = TcpListener::bind((Ipv4Addr::UNSPECIFIED, TCP_PORT))?;
        ready_tx.send(()).ok();
        let (mut stream, _) = listener.accept()?;
        let mut buffer = vec![0u8; 1 << 18];
        let mut total = 0u64;
        let began = Instant::now();
        loop {
            let n = stream.read(&mut buffer)?;
            if n == 0 {
                break;
            }
            total += n as u64;
        }
        Ok((total, began.elapsed()))
    });
    ready_rx
        .recv_timeout(Duration::from_secs(10))
        .context("the receiver did not listen")?;
    let from_owned = from.to_owned();
    let sender = std::thread::spawn(move || -> anyhow::Result<()> {
        enter(&from_owned)?;
        let mut stream = TcpStream::connect_timeout(
            &SocketAddr::from((to_ip, TCP_PORT)),
            Duration::from_secs(5),
        )?;
        let buffer = vec![0x5au8; 1 << 18];
        let end = Instant::now() + Duration::from_secs(seconds);
        while Instant::now() < end {
            stream.write_all(&buffer)?;
        }
        Ok(())
    });
    sender
        .join()
        .map_err(|_| anyhow!("the sender panicked"))?
        .context("sending")?;
    let (bytes, took) = receiver
        .join()
        .map_err(|_| anyhow!("the receiver panicked"))?
        .context("receiving")?;
    Ok(bytes as f64 * 8.0 / took.as_secs_f64() / 1e9)
}

/// Sends an ICMP echo request to `ip` from inside `netns` every 20 ms until one is
/// answered; returns when. A raw socket, so that a wiring delay is measured to 20 ms
/// rather than to ping's one-second timeout.
fn first_echo_reply(netns: &str, ip: Ipv4Addr, timeout: Duration) -> anyhow::Result<Instant> {
    use rustix::net::{
        AddressFamily, RecvFlags, SendFlags, SocketAddrV4, SocketType, ipproto, recv, sendto,
        socket,
    };
    enter(netns)?;
    let fd = socket(AddressFamily::INET, SocketType::RAW, Some(ipproto::ICMP))
        .context("an ICMP socket")?;
    rustix::net::sockopt::set_socket_timeout(
        &fd,
        rustix::net::sockopt::Timeout::Recv,
        Some(Duration::from_millis(20)),
    )?;
    let id = (std::process::id() & 0xffff) as u16;
    let target = SocketAddrV4::new(ip, 0);
    let deadline = Instant::now() + timeout;
    let mut seq: u16 = 0;
    let mut buffer = [0u8; 1500];
    while Instant::now() < deadline {
        seq = seq.wrapping_add(1);
        let mut packet = [
            8u8,
            0,
            0,
            0,
            (id >> 8) as u8,
            id as u8,
            (seq >> 8) as u8,
            seq as u8,
        ];
        let sum = icmp_checksum(&packet);
        packet[2..4].copy_from_slice(&sum.to_be_bytes());
        sendto(&fd, &packet, SendFlags::empty(), &target)?;
        let until = Instant::now() + Duration::from_millis(20);
        while Instant::now() < until {
            let Ok((_, n)) = recv(&fd, &mut buffer[..], RecvFlags::empty()) else {
                break;
            };
            let header = usize::from(buffer[0] & 0x0f) * 4;
            let from = Ipv4Addr::new(buffer[12], buffer[13], buffer[14], buffer[15]);
            let reply = buffer.get(header..n.min(buffer.len())).unwrap_or_default();
            if from == ip && reply.len() >= 8 && reply[0] == 0 && reply[4..6] == id.to_be_bytes() {
                return Ok(Instant::now());
            }
        }
    }
    bail!("{ip} never answered from {netns}")
}

/// The internet checksum of an ICMP header.
fn icmp_checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Moves this thread into the named network namespace (it should end afterwards).
fn enter(netns: &str) -> anyhow::Result<()> {
    let file = std::fs::File::open(Path::new("/run/netns").join(netns))
        .with_context(|| format!("no namespace {netns}"))?;
    rustix::thread::move_into_link_name_space(
        std::os::fd::AsFd::as_fd(&file),
        Some(rustix::thread::LinkNameSpaceType::Network),
    )
    .with_context(|| format!("cannot enter {netns}"))?;
    Ok(())
}

/// Two namespaces on nodes 1 and 2 joined by the bench's own tunnel, built from the same
/// pieces the driver uses; removed on drop.
struct RawPair {
    namespaces: [String; 2],
    undo: Vec<Vec<String>>,
}

impl RawPair {
    async fn build(cloud: &Cloud, driver: &str) -> anyhow::Result<RawPair> {
        let mut pair = RawPair {
            namespaces: [
                format!("{}-raw-1", cloud.prefix),
                format!("{}-raw-2", cloud.prefix),
            ],
            undo: Vec::new(),
        };
        let addresses = [cloud.node_address(1).await?, cloud.node_address(2).await?];
        for side in 0..2 {
            let node = cloud.node_netns(side + 1);
            let ns = pair.namespaces[side].clone();
            let local = addresses[side].to_string();
            let remote = addresses[1 - side].to_string();
            run("ip", &["netns", "add", &ns])?;
            pair.undo
                .push(vec!["ip".into(), "netns".into(), "del".into(), ns.clone()]);
            run("ip", &["-n", &ns, "link", "set", "lo", "up"])?;
            run(
                "ip",
                &[
                    "-n", &node, "link", "add", "rawhost", "type", "veth", "peer", "name", "eth0",
                    "netns", &ns,
                ],
            )?;
            run(
                "ip",
                &[
                    "-n",
                    &ns,
                    "addr",
                    "add",
                    &format!("10.9.0.{}/24", side + 1),
                    "dev",
                    "eth0",
                ],
            )?;
            run(
                "ip",
                &["-n", &ns, "link", "set", "eth0", "mtu", "1450", "up"],
            )?;
            run(
                "ip",
                &["-n", &node, "link", "set", "rawhost", "mtu", "1450", "up"],
            )?;
            if driver == "ovs" {
                let db = format!("--db=unix:{}", cloud.ovsdb(side + 1).display());
                run(
                    "ip",
                    &["netns", "exec", &ns, "ethtool", "-K", "eth0", "tx", "off"],
                )?;
                run(
                    "ovs-vsctl",
                    &[
                        &db,
                        "--",
                        "add-br",
                        "br-raw",
                        "--",
                        "set",
                        "bridge",
                        "br-raw",
                        "datapath_type=netdev",
                        "--",
                        "add-port",
                        "br-raw",
                        "rawhost",
                        "--",
                        "add-port",
                        "br-raw",
                        "vxraw",
                        "--",
                        "set",
                        "interface",
                        "vxraw",
                        "type=vxlan",
                        &format!("options:remote_ip={remote}"),
                        &format!("options:local_ip={local}"),
                        &format!("options:key={RAW_VNI}"),
                    ],
                )?;
                pair.undo.push(vec![
                    "ovs-vsctl".into(),
                    db,
                    "--if-exists".into(),
                    "del-br".into(),
                    "br-raw".into(),
                ]);
            } else {
                let underlay = crate::up::topology::NODE_UNDERLAY_DEVICE;
                run(
                    "ip",
                    &[
                        "-n",
                        &node,
                        "link",
                        "add",
                        "vxraw",
                        "type",
                        "vxlan",
                        "id",
                        &RAW_VNI.to_string(),
                        "local",
                        &local,
                        "dstport",
                        "4789",
                        "dev",
                        underlay,
                    ],
                )?;
                run(
                    "ip",
                    &["-n", &node, "link", "add", "brraw", "type", "bridge"],
                )?;
                run(
                    "ip",
                    &["-n", &node, "link", "set", "vxraw", "master", "brraw", "up"],
                )?;
                run(
                    "ip",
                    &["-n", &node, "link", "set", "rawhost", "master", "brraw"],
                )?;
                run("ip", &["-n", &node, "link", "set", "brraw", "up"])?;
                run(
                    "ip",
                    &[
                        "netns",
                        "exec",
                        &node,
                        "bridge",
                        "fdb",
                        "append",
                        "00:00:00:00:00:00",
                        "dev",
                        "vxraw",
                        "dst",
                        &remote,
                    ],
                )?;
                pair.undo.push(vec![
                    "ip".into(),
                    "-n".into(),
                    node.clone(),
                    "link".into(),
                    "del".into(),
                    "brraw".into(),
                ]);
                pair.undo.push(vec![
                    "ip".into(),
                    "-n".into(),
                    node.clone(),
                    "link".into(),
                    "del".into(),
                    "vxraw".into(),
                ]);
            }
            pair.undo.push(vec![
                "ip".into(),
                "-n".into(),
                node,
                "link".into(),
                "del".into(),
                "rawhost".into(),
            ]);
        }
        let first = pair.namespaces[0].clone();
        wait_for(
            "the hand-made tunnel to pass a ping",
            Duration::from_secs(30),
            || {
                let ok = pings(&first, Ipv4Addr::new(10, 9, 0, 2), "1");
                async move { ok.then_some(()) }
            },
        )
        .await?;
        Ok(pair)
    }
}

impl Drop for RawPair {
    fn drop(&mut self) {
        for step in self.undo.iter().rev() {
            let _ = Command::new(&step[0])
                .args(&step[1..])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// What one driver's run measured.
struct Figures {
    driver: String,
    wiring: Vec<Duration>,
    /// Per round of (b).
    ferro_gbps: Vec<f64>,
    raw_gbps: Vec<f64>,
    readopt: Duration,
    sent: u64,
    received: u64,
    /// (d): create → first reply from outside, per floating IP.
    floating: Vec<Duration>,
    /// (f): the router's node dead → its floating IP answering again, and where to.
    failover: Option<(Duration, String, String)>,
    /// (e): per round, through the router's SNAT and through the hand-made one.
    snat_gbps: Vec<f64>,
    raw_snat_gbps: Vec<f64>,
    /// (g): rule change → enforced, and on how many ports; `None` when not measured.
    rule_changes: Option<(usize, Vec<Duration>)>,
}

/// The middle value (the mean of the two middle ones for an even count).
fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => 0.0,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

/// Runs `ferro bench net`.
pub async fn run_bench(args: NetBenchArgs) -> anyhow::Result<()> {
    let mut all = Vec::new();
    for (i, driver) in args.drivers.iter().enumerate() {
        let prefix = format!("fb{}{i}", std::process::id() % 1000);
        eprintln!("{driver}: starting a three-node cloud ({prefix}-node-1…3)");
        all.push(
            one_driver(&args, driver, &prefix)
                .await
                .with_context(|| format!("driver {driver}"))?,
        );
    }
    println!();
    println!("ferro bench net: 3 nodes under ferro up --nodes 3, probe ports as machines");
    for f in &all {
        let mut sorted = f.wiring.clone();
        sorted.sort();
        println!("{}:", f.driver);
        println!(
            "  (a) port wiring, create → answers a ping from another node, {} ports: p50 {:.0} ms, p99 {:.0} ms (aim p50 < 500, p99 < 1500)",
            sorted.len(),
            percentile(&sorted, 0.5).as_secs_f64() * 1e3,
            percentile(&sorted, 0.99).as_secs_f64() * 1e3,
        );
        let (ferro, raw) = (median(&f.ferro_gbps), median(&f.raw_gbps));
        let ratios: Vec<f64> = f
            .ferro_gbps
            .iter()
            .zip(&f.raw_gbps)
            .map(|(ferro, raw)| ferro / raw.max(1e-9))
            .collect();
        println!(
            "  (b) TCP node-1 → node-2, median of {} rounds: Ferro {ferro:.2} Gbit/s, hand-made {} {raw:.2} Gbit/s, ratio {:.2} (rounds {:.2}–{:.2})",
            ratios.len(),
            if f.driver == "ovs" {
                "OVS netdev VXLAN"
            } else {
                "kernel bridge + VXLAN"
            },
            ferro / raw.max(1e-9),
            ratios.iter().copied().fold(f64::INFINITY, f64::min),
            ratios.iter().copied().fold(0.0, f64::max),
        );
        println!(
            "  (c) agent SIGKILL on node-1: network pass done {:.2} s after the kill; ping 10/s node-1 → node-2: {} sent, {} received, {} lost",
            f.readopt.as_secs_f64(),
            f.sent,
            f.received,
            f.sent.saturating_sub(f.received),
        );
        let mut floating = f.floating.clone();
        floating.sort();
        println!(
            "  (d) floating IP, create → first reply to a ping from outside, {} floating IPs: p50 {:.0} ms, p99 {:.0} ms (aim p50 < 1000)",
            floating.len(),
            percentile(&floating, 0.5).as_secs_f64() * 1e3,
            percentile(&floating, 0.99).as_secs_f64() * 1e3,
        );
        let (ferro, raw) = (median(&f.snat_gbps), median(&f.raw_snat_gbps));
        println!(
            "  (e) TCP out through the router's SNAT, median of {} rounds: Ferro {ferro:.2} Gbit/s (probe on the router's node), the same pieces by hand {raw:.2} Gbit/s, ratio {:.2} (aim ≥ 0.8)",
            f.snat_gbps.len(),
            ferro / raw.max(1e-9),
        );
        if let Some((took, from, to)) = &f.failover {
            println!(
                "  (f) router failover, {from} dead (agent stopped, uplink down, namespace gone) → a floating IP answers again through {to}: {:.1} s (lease {} s + failover grace {} s + rebuild)",
                took.as_secs_f64(),
                40,
                30,
            );
        }
        if let Some((ports, times)) = &f.rule_changes {
            let mut sorted = times.clone();
            sorted.sort();
            println!(
                "  (g) security group rule change → enforced, {ports} ports on node-1 in the group, {} changes: p50 {:.0} ms, p99 {:.0} ms (aim p50 < 1000)",
                sorted.len(),
                percentile(&sorted, 0.5).as_secs_f64() * 1e3,
                percentile(&sorted, 0.99).as_secs_f64() * 1e3,
            );
        }
    }
    Ok(())
}

async fn one_driver(args: &NetBenchArgs, driver: &str, prefix: &str) -> anyhow::Result<Figures> {
    let cloud = Cloud::start(driver, prefix).await?;
    cloud
        .apply(&format!(
            "apiVersion: ferro/v1\nkind: Network\nmetadata: {{name: bench}}\nspec:\n  subnets:\n  - {{name: v4, cidr: {CIDR}, dhcp: false}}\n"
        ))
        .await?;
    let mut references = Vec::new();
    for node in 1..=3 {
        cloud
            .probe(&format!("ref-{node}"), node, reference_ip(node))
            .await?;
    }
    for node in 1..=3 {
        references.push(cloud.bound_probe(&format!("ref-{node}")).await?);
    }
    // The reference probes ask ARP again every 20 ms, not every second: an address asked
    // for a moment before its port was wired would otherwise count a whole second late.
    for ns in &references {
        run(
            "ip",
            &[
                "netns",
                "exec",
                ns,
                "sh",
                "-c",
                "for d in /proc/sys/net/ipv4/neigh/*; do echo 20 > $d/retrans_time_ms; \
                 echo 1000 > $d/mcast_solicit; done",
            ],
        )?;
    }
    for (i, ns) in references.iter().enumerate() {
        let peer = reference_ip((i + 1) % 3 + 1);
        let ns = ns.clone();
        wait_for(&format!("{ns} reaching {peer}"), TIMEOUT, || {
            let ok = pings(&ns, peer, "1");
            async move { ok.then_some(()) }
        })
        .await?;
    }

    // (a) Ports created four at a time, each timed until a probe on another node pings it.
    eprintln!("{driver}: (a) wiring {} ports", args.ports);
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let next = next.clone();
        let client = cloud.client.clone();
        let references = references.clone();
        let total = args.ports;
        workers.spawn(async move {
            let mut times = Vec::new();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= total {
                    return anyhow::Ok(times);
                }
                let node = i % 3 + 1;
                let pinger = references[node % 3].clone();
                let ip = port_ip(i);
                let yaml = format!(
                    "apiVersion: ferro/v1\nkind: Port\nmetadata: {{name: p-{i}, annotations: \
                     {{ferro.io/probe-node: node-{node}}}}}\nspec: {{network: bench, deviceOwner: \
                     \"network:probe\", fixedIps: [{{ipAddress: {ip}}}]}}\n"
                );
                let object = ferro_api::codec::decode_yaml(&yaml)?
                    .pop()
                    .context("one port")?;
                let began = Instant::now();
                client.create(object).await.map_err(|e| anyhow!("{e}"))?;
                let answered = tokio::task::spawn_blocking(move || {
                    // A thread of its own: it enters the pinger's namespace for good.
                    std::thread::spawn(move || first_echo_reply(&pinger, ip, TIMEOUT))
                        .join()
                        .map_err(|_| anyhow!("the prober panicked"))?
                })
                .await??;
                times.push(answered.saturating_duration_since(began));
            }
        });
    }
    let mut wiring = Vec::new();
    while let Some(done) = workers.join_next().await {
        wiring.extend(done??);
    }

    // (b) One TCP stream through Ferro's wiring, and one through the hand-made pieces.
    eprintln!("{driver}: (b) TCP throughput");
    // Rounds alternating, so that a burst of load on the machine falls on both.
    let raw = RawPair::build(&cloud, driver).await?;
    let seconds = args.seconds;
    let (mut ferro_gbps, mut raw_gbps) = (Vec::new(), Vec::new());
    for _ in 0..args.rounds {
        let (from, to) = (references[0].clone(), references[1].clone());
        let ferro = tokio::task::spawn_blocking(move || {
            tcp_throughput(&from, &to, reference_ip(2), seconds)
        });
        ferro_gbps.push(ferro.await??);
        let (from, to) = (raw.namespaces[0].clone(), raw.namespaces[1].clone());
        let hand = tokio::task::spawn_blocking(move || {
            tcp_throughput(&from, &to, Ipv4Addr::new(10, 9, 0, 2), seconds)
        });
        raw_gbps.push(hand.await??);
    }
    drop(raw);

    // (c) SIGKILL node-1's agent under a 10/s ping between reference probes.
    eprintln!("{driver}: (c) agent restart");
    let ping = Command::new("ip")
        .args([
            "netns",
            "exec",
            &references[0],
            "busybox",
            "ping",
            "-i",
            "0.1",
            "-W",
            "1",
        ])
        .arg(reference_ip(2).to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let old = cloud.agent_pid(1)?;
    let metrics = format!("{}:9464", cloud.node_address(1).await?);
    let killed = Instant::now();
    if let Some(pid) = rustix::process::Pid::from_raw(old as i32) {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
    }
    let readopt = wait_every(
        "node-1's new agent to finish a network pass",
        TIMEOUT,
        Duration::from_millis(20),
        || {
            let metrics = metrics.clone();
            let new = cloud.agent_pid(1).ok().filter(|p| *p != old);
            async move {
                new?;
                let passes = network_passes(&metrics).await?;
                (passes >= 1.0).then(|| killed.elapsed())
            }
        },
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    if let Some(pid) = rustix::process::Pid::from_raw(ping.id() as i32) {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::INT);
    }
    let out = ping.wait_with_output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let (sent, received) = ping_counts(&text).with_context(|| format!("ping said: {text}"))?;

    // Ports are filtered: ping from outside must be let in for (d) and (f).
    let default = ferro_api::codec::decode_yaml(DEFAULT_GROUP_WITH_PING)?
        .pop()
        .context("one security group")?;
    cloud
        .client
        .apply(default, "ferro-bench", false)
        .await
        .map_err(|e| anyhow!("{e}"))?;
    let floating =
        floating_ips(&cloud, driver, (args.floating_ips as usize).min(args.ports)).await?;
    let (snat_gbps, raw_snat_gbps) = snat_throughput(&cloud, driver, args).await?;
    let failover = if args.failover {
        Some(failover(&cloud, driver).await?)
    } else {
        None
    };
    let rule_changes = if args.sg_ports > 0 {
        let times = rule_changes(&cloud, driver, &references, args).await?;
        Some((args.sg_ports, times))
    } else {
        None
    };
    Ok(Figures {
        driver: driver.to_owned(),
        wiring,
        ferro_gbps,
        raw_gbps,
        readopt,
        sent,
        received,
        floating,
        failover,
        snat_gbps,
        raw_snat_gbps,
        rule_changes,
    })
}

/// The project's default group as Ferro makes it, and ping from anywhere.
const DEFAULT_GROUP_WITH_PING: &str = "apiVersion: ferro/v1
kind: SecurityGroup
metadata: {name: default}
spec:
  description: Ingress from members of this group only; all egress; and ping.
  rules:
  - {direction: Ingress, ethertype: IPv4, remoteGroup: default}
  - {direction: Ingress, ethertype: IPv6, remoteGroup: default}
  - {direction: Egress, ethertype: IPv4}
  - {direction: Egress, ethertype: IPv6}
  - {direction: Ingress, protocol: ICMP}
";

/// The first TCP port of (g)'s rules.
const SG_FIRST_PORT: u16 = 20000;

/// The (g) group, letting everything out and TCP in to the first `open` ports from
/// [`SG_FIRST_PORT`].
fn bench_group(open: u64) -> String {
    let mut yaml = "apiVersion: ferro/v1\nkind: SecurityGroup\nmetadata: {name: bench-sg}\nspec:\n  rules:\n  - {direction: Egress}\n".to_owned();
    for k in 0..open {
        yaml.push_str(&format!(
            "  - {{direction: Ingress, protocol: TCP, portRangeMin: {}}}\n",
            u64::from(SG_FIRST_PORT) + k
        ));
    }
    yaml
}

/// The address of the `i`th port of (g) (10.8.100.0 onwards).
fn sg_port_ip(i: usize) -> Ipv4Addr {
    let n = 100 * 256 + i as u32;
    Ipv4Addr::new(10, 8, (n / 256) as u8, (n % 256) as u8)
}

/// (g) `--sg-ports` probes on node 1 in group `bench-sg`, then `--sg-changes` rule
/// changes, each timed until the port it opens on the first probe accepts a connection
/// from the node-2 reference probe.
async fn rule_changes(
    cloud: &Cloud,
    driver: &str,
    references: &[String],
    args: &NetBenchArgs,
) -> anyhow::Result<Vec<Duration>> {
    let count = args.sg_ports;
    eprintln!(
        "{driver}: (g) {count} ports in a security group, {} rule changes",
        args.sg_changes
    );
    let group = ferro_api::codec::decode_yaml(&bench_group(0))?
        .pop()
        .context("one group")?;
    cloud
        .client
        .apply(group, "ferro-bench", false)
        .await
        .map_err(|e| anyhow!("{e}"))?;
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let next = next.clone();
        let client = cloud.client.clone();
        workers.spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= count {
                    return anyhow::Ok(());
                }
                let yaml = format!(
                    "apiVersion: ferro/v1\nkind: Port\nmetadata: {{name: s-{i}, annotations: \
                     {{ferro.io/probe-node: node-1}}}}\nspec: {{network: bench, deviceOwner: \
                     \"network:probe\", securityGroups: [bench-sg], fixedIps: [{{ipAddress: {}}}]}}\n",
                    sg_port_ip(i)
                );
                let object = ferro_api::codec::decode_yaml(&yaml)?
                    .pop()
                    .context("one port")?;
                client.create(object).await.map_err(|e| anyhow!("{e}"))?;
            }
        });
    }
    while let Some(done) = workers.join_next().await {
        done??;
    }
    for i in 0..count {
        cloud.bound_probe(&format!("s-{i}")).await?;
    }
    let target = cloud.bound_probe("s-0").await?;
    let changes = args.sg_changes;
    let listening = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let (bound_tx, bound_rx) = std::sync::mpsc::channel();
    let still = listening.clone();
    let listener = std::thread::spawn(move || -> anyhow::Result<()> {
        // A thread of its own: it enters the target's namespace for good.
        enter(&target)?;
        let listeners = (0..changes)
            .map(|k| {
                let port = SG_FIRST_PORT + k as u16;
                let l = TcpListener::bind((Ipv4Addr::UNSPECIFIED, port))?;
                l.set_nonblocking(true)?;
                Ok(l)
            })
            .collect::<std::io::Result<Vec<_>>>();
        let listeners = match listeners {
            Ok(l) => {
                let _ = bound_tx.send(Ok(()));
                l
            }
            Err(e) => {
                let _ = bound_tx.send(Err(e));
                return Ok(());
            }
        };
        while still.load(std::sync::atomic::Ordering::Relaxed) {
            for l in &listeners {
                while l.accept().is_ok() {}
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    });
    bound_rx.recv().context("the listener thread ended")??;
    let mut times = Vec::new();
    let from = references[1].clone();
    for k in 0..changes {
        let group = ferro_api::codec::decode_yaml(&bench_group(k + 1))?
            .pop()
            .context("one group")?;
        let address = SocketAddr::from((sg_port_ip(0), SG_FIRST_PORT + k as u16));
        let began = Instant::now();
        cloud
            .client
            .apply(group, "ferro-bench", false)
            .await
            .map_err(|e| anyhow!("{e}"))?;
        let from = from.clone();
        let accepted = tokio::task::spawn_blocking(move || {
            std::thread::spawn(move || -> anyhow::Result<Instant> {
                enter(&from)?;
                let deadline = Instant::now() + TIMEOUT;
                while Instant::now() < deadline {
                    if TcpStream::connect_timeout(&address, Duration::from_millis(50)).is_ok() {
                        return Ok(Instant::now());
                    }
                }
                bail!("{address} never accepted a connection from {from}")
            })
            .join()
            .map_err(|_| anyhow!("the connector panicked"))?
        })
        .await??;
        times.push(accepted.saturating_duration_since(began));
    }
    listening.store(false, std::sync::atomic::Ordering::Relaxed);
    let _ = listener.join();
    Ok(times)
}

/// (e) One TCP stream from a probe on the router's node out through the router's SNAT to
/// a listener in the outside namespace, and one through the same pieces built by hand
/// ([`RawSnat`]); `--rounds` rounds, alternating.
async fn snat_throughput(
    cloud: &Cloud,
    driver: &str,
    args: &NetBenchArgs,
) -> anyhow::Result<(Vec<f64>, Vec<f64>)> {
    eprintln!("{driver}: (e) TCP through SNAT");
    let router = cloud
        .client
        .get_typed::<v1::Router>("default", "edge")
        .await
        .map_err(|e| anyhow!("{e}"))?;
    let node: usize = router
        .status
        .unwrap_or_default()
        .node
        .strip_prefix("node-")
        .and_then(|n| n.parse().ok())
        .context("the router's node")?;
    // A probe of its own, without port security: (e) measures the router's SNAT, and
    // the hand-made path has no security groups to pass either.
    cloud
        .apply(&format!(
            "apiVersion: ferro/v1\nkind: Port\nmetadata: {{name: snat-client, annotations: \
             {{ferro.io/probe-node: node-{node}}}}}\nspec: {{network: bench, deviceOwner: \
             \"network:probe\", portSecurity: false, fixedIps: [{{ipAddress: 10.8.254.1}}]}}\n"
        ))
        .await?;
    let client = cloud.bound_probe("snat-client").await?;
    run(
        "ip",
        &[
            "-n", &client, "route", "replace", "default", "via", "10.8.0.1",
        ],
    )?;
    let raw = RawSnat::build(cloud, node, driver)?;
    let outside = format!("{}-outside", cloud.prefix);
    let upstream = Ipv4Addr::new(203, 0, 113, 1);
    let (mut ferro, mut hand) = (Vec::new(), Vec::new());
    for _ in 0..args.rounds {
        let seconds = args.seconds;
        let (from, to) = (client.clone(), outside.clone());
        ferro.push(
            tokio::task::spawn_blocking(move || tcp_throughput(&from, &to, upstream, seconds))
                .await?
                .context("through the router's SNAT")?,
        );
        let (from, to) = (raw.client.clone(), outside.clone());
        hand.push(
            tokio::task::spawn_blocking(move || tcp_throughput(&from, &to, upstream, seconds))
                .await?
                .context("through the hand-made SNAT")?,
        );
    }
    Ok((ferro, hand))
}

/// A hand-made SNAT path on the router's node, built from the same pieces as the
/// router's: `<prefix>-sc` (192.168.77.2, MTU 1450) → veth → the driver's kind of switch
/// (a kernel bridge, or a userspace Open vSwitch bridge) → veth → `<prefix>-sr`
/// (forwarding, `snat to 203.0.113.9` in one nftables rule) → veth → a kernel bridge →
/// veth into the outside bridge. Removed on drop.
struct RawSnat {
    client: String,
    router: String,
    node: String,
    ovsdb: Option<PathBuf>,
}

impl RawSnat {
    fn build(cloud: &Cloud, node: usize, driver: &str) -> anyhow::Result<RawSnat> {
        let raw = RawSnat {
            client: format!("{}-sc", cloud.prefix),
            router: format!("{}-sr", cloud.prefix),
            node: cloud.node_netns(node),
            ovsdb: (driver == "ovs").then(|| cloud.ovsdb(node)),
        };
        let outside = format!("{}-outside", cloud.prefix);
        let uplink = format!("{}-sx", cloud.prefix);
        let (c, r, n) = (raw.client.as_str(), raw.router.as_str(), raw.node.as_str());
        for ns in [c, r] {
            run("ip", &["netns", "add", ns])?;
            run("ip", &["-n", ns, "link", "set", "lo", "up"])?;
        }
        // The tenant side: client and router leg on the driver's kind of switch.
        let veth = |ns: &str, inner: &str, outer: &str| {
            run(
                "ip",
                &[
                    "-n", n, "link", "add", outer, "type", "veth", "peer", "name", inner, "netns",
                    ns,
                ],
            )
        };
        veth(c, "eth0", "rawc")?;
        veth(r, "in0", "rawr")?;
        match &raw.ovsdb {
            Some(db) => {
                let db = format!("--db=unix:{}", db.display());
                run(
                    "ovs-vsctl",
                    &[
                        &db,
                        "--",
                        "add-br",
                        "br-rawlan",
                        "--",
                        "set",
                        "bridge",
                        "br-rawlan",
                        "datapath_type=netdev",
                        "--",
                        "add-port",
                        "br-rawlan",
                        "rawc",
                        "--",
                        "add-port",
                        "br-rawlan",
                        "rawr",
                    ],
                )?;
                run(
                    "ip",
                    &["netns", "exec", c, "ethtool", "-K", "eth0", "tx", "off"],
                )?;
                run(
                    "ip",
                    &["netns", "exec", r, "ethtool", "-K", "in0", "tx", "off"],
                )?;
            }
            None => {
                run("ip", &["-n", n, "link", "add", "rawlan", "type", "bridge"])?;
                run("ip", &["-n", n, "link", "set", "rawlan", "up"])?;
                for port in ["rawc", "rawr"] {
                    run("ip", &["-n", n, "link", "set", port, "master", "rawlan"])?;
                }
            }
        }
        for (ns, dev) in [(n, "rawc"), (n, "rawr"), (c, "eth0"), (r, "in0")] {
            run("ip", &["-n", ns, "link", "set", dev, "mtu", "1450", "up"])?;
        }
        run(
            "ip",
            &["-n", c, "addr", "add", "192.168.77.2/24", "dev", "eth0"],
        )?;
        run(
            "ip",
            &["-n", c, "route", "add", "default", "via", "192.168.77.1"],
        )?;
        run(
            "ip",
            &["-n", r, "addr", "add", "192.168.77.1/24", "dev", "in0"],
        )?;
        // The external side: a kernel bridge, as br-ex, with an uplink into the outside.
        veth(r, "out0", "rawg")?;
        run("ip", &["-n", n, "link", "add", "rawex", "type", "bridge"])?;
        run(
            "ip",
            &[
                "-n", n, "link", "add", "rawup", "type", "veth", "peer", "name", &uplink, "netns",
                &outside,
            ],
        )?;
        for port in ["rawg", "rawup"] {
            run(
                "ip",
                &["-n", n, "link", "set", port, "master", "rawex", "up"],
            )?;
        }
        run("ip", &["-n", n, "link", "set", "rawex", "up"])?;
        run(
            "ip",
            &[
                "-n",
                &outside,
                "link",
                "set",
                &uplink,
                "master",
                "br-outside",
                "up",
            ],
        )?;
        run(
            "ip",
            &["-n", r, "addr", "add", "203.0.113.9/24", "dev", "out0"],
        )?;
        run("ip", &["-n", r, "link", "set", "out0", "up"])?;
        run(
            "ip",
            &["-n", r, "route", "add", "default", "via", "203.0.113.1"],
        )?;
        run(
            "ip",
            &["netns", "exec", r, "sysctl", "-qw", "net.ipv4.ip_forward=1"],
        )?;
        run(
            "ip",
            &[
                "netns",
                "exec",
                r,
                "nft",
                "add table ip raw; add chain ip raw post { type nat hook postrouting priority srcnat; }; add rule ip raw post ip saddr 192.168.77.0/24 oifname out0 snat to 203.0.113.9",
            ],
        )?;
        Ok(raw)
    }
}

impl Drop for RawSnat {
    fn drop(&mut self) {
        // The namespaces take their veths with them; `rawup` takes its outside end.
        for ns in [&self.router, &self.client] {
            let _ = run("ip", &["netns", "del", ns]);
        }
        for link in ["rawex", "rawup", "rawlan"] {
            let _ = run("ip", &["-n", &self.node, "link", "del", link]);
        }
        if let Some(db) = &self.ovsdb {
            let db = format!("--db=unix:{}", db.display());
            let _ = run("ovs-vsctl", &[&db, "--if-exists", "del-br", "br-rawlan"]);
        }
    }
}

/// `ip netns delete NAME`, tried again for a few seconds: while a process elsewhere
/// runs `ip netns exec` its private mount namespace holds every namespace file, and the
/// delete fails with EBUSY.
fn delete_namespace(name: &str) -> anyhow::Result<()> {
    let mut tries = 0;
    loop {
        match run("ip", &["netns", "delete", name]) {
            Ok(()) => return Ok(()),
            Err(e) if tries >= 25 => return Err(e),
            Err(_) => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
}

/// The address of the `i`th floating IP of (d).
fn floating_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(203, 0, 113, 20 + i as u8)
}

/// (d) A router joins the bench network to an external one, and `count` of the (a) Ports
/// get a floating IP each, created four at a time; each is timed from its create until it
/// answers a ping from the cloud's outside namespace.
async fn floating_ips(cloud: &Cloud, driver: &str, count: usize) -> anyhow::Result<Vec<Duration>> {
    eprintln!("{driver}: (d) {count} floating IPs");
    cloud
        .apply(
            "apiVersion: ferro/v1\nkind: Network\nmetadata: {name: public}\nspec:\n  external: true\n  mtu: 1500\n  subnets:\n  - {name: v4, cidr: 203.0.113.0/24, gateway: 203.0.113.1, dhcp: false, allocationPools: [{start: 203.0.113.10, end: 203.0.113.250}]}\n---\napiVersion: ferro/v1\nkind: Router\nmetadata: {name: edge}\nspec:\n  externalGateway: {network: public, fixedIp: 203.0.113.10}\n  interfaces:\n  - {network: bench, subnet: v4}\n",
        )
        .await?;
    let client = cloud.client.clone();
    wait_for("the router Ready", TIMEOUT, || {
        let client = client.clone();
        async move {
            let router = client
                .get_typed::<v1::Router>("default", "edge")
                .await
                .ok()?;
            router
                .status
                .as_ref()?
                .conditions
                .iter()
                .any(|c| c.r#type == "Ready" && c.status == v1::condition::Status::True as i32)
                .then_some(())
        }
    })
    .await?;
    // A probe holds only its address: the way back to the outside is the bench's to add.
    for i in 0..count {
        let ns = cloud.bound_probe(&format!("p-{i}")).await?;
        run(
            "ip",
            &["-n", &ns, "route", "replace", "default", "via", "10.8.0.1"],
        )?;
    }
    let outside = format!("{}-outside", cloud.prefix);
    run(
        "ip",
        &[
            "netns",
            "exec",
            &outside,
            "sh",
            "-c",
            "for d in /proc/sys/net/ipv4/neigh/*; do echo 20 > $d/retrans_time_ms; \
             echo 1000 > $d/mcast_solicit; done",
        ],
    )?;
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let next = next.clone();
        let client = cloud.client.clone();
        let outside = outside.clone();
        workers.spawn(async move {
            let mut times = Vec::new();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= count {
                    return anyhow::Ok(times);
                }
                let address = floating_ip(i);
                let yaml = format!(
                    "apiVersion: ferro/v1\nkind: FloatingIP\nmetadata: {{name: f-{i}}}\nspec: \
                     {{network: public, port: p-{i}, address: {address}}}\n"
                );
                let object = ferro_api::codec::decode_yaml(&yaml)?
                    .pop()
                    .context("one floating IP")?;
                let began = Instant::now();
                client.create(object).await.map_err(|e| anyhow!("{e}"))?;
                let outside = outside.clone();
                let answered = tokio::task::spawn_blocking(move || {
                    std::thread::spawn(move || first_echo_reply(&outside, address, TIMEOUT))
                        .join()
                        .map_err(|_| anyhow!("the prober panicked"))?
                })
                .await??;
                times.push(answered.saturating_duration_since(began));
            }
        });
    }
    let mut times = Vec::new();
    while let Some(done) = workers.join_next().await {
        times.extend(done??);
    }
    Ok(times)
}

/// (f) The router's node dies — its agent stopped (SIGSTOP), its provider link down, its
/// router namespace deleted — and the time until the first floating IP answers a ping from outside again, through
/// the node the router fails over to. The agent is resumed afterwards.
async fn failover(cloud: &Cloud, driver: &str) -> anyhow::Result<(Duration, String, String)> {
    eprintln!("{driver}: (f) router failover");
    let router = cloud
        .client
        .get_typed::<v1::Router>("default", "edge")
        .await
        .map_err(|e| anyhow!("{e}"))?;
    let from = router.status.clone().unwrap_or_default().node;
    let uid = router.metadata.clone().unwrap_or_default().uid;
    let number: usize = from
        .strip_prefix("node-")
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("the router is on {from:?}"))?;
    let pid = cloud.agent_pid(number)?;
    let pid = rustix::process::Pid::from_raw(pid as i32).context("a pid")?;
    let outside = format!("{}-outside", cloud.prefix);
    let node = cloud.node_netns(number);
    let died = Instant::now();
    rustix::process::kill_process(pid, rustix::process::Signal::STOP)?;
    // Dead to the outside too: its uplink down and its router gone (a namespace a stopped
    // process still holds would otherwise go on answering).
    let deleted = run("ip", &["-n", &node, "link", "set", "provider0", "down"])
        .and_then(|()| delete_namespace(&format!("qrouter-{uid}")));
    let answered = match deleted {
        Ok(()) => tokio::task::spawn_blocking(move || {
            std::thread::spawn(move || {
                first_echo_reply(&outside, floating_ip(0), Duration::from_secs(300))
            })
            .join()
            .map_err(|_| anyhow!("the prober panicked"))?
        })
        .await
        .map_err(anyhow::Error::from)
        .and_then(|r| r),
        Err(e) => Err(e),
    };
    rustix::process::kill_process(pid, rustix::process::Signal::CONT)?;
    run("ip", &["-n", &node, "link", "set", "provider0", "up"])?;
    let took = answered?.saturating_duration_since(died);
    let to = cloud
        .client
        .get_typed::<v1::Router>("default", "edge")
        .await
        .map_err(|e| anyhow!("{e}"))?
        .status
        .unwrap_or_default()
        .node;
    Ok((took, from, to))
}

/// `ferro_controller_reconciles_total{controller="agent-network"}` of an agent, if it
/// answers.
async fn network_passes(address: &str) -> Option<f64> {
    let mut stream = tokio::net::TcpStream::connect(address).await.ok()?;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: agent\r\n\r\n")
        .await
        .ok()?;
    let mut body = String::new();
    stream.read_to_string(&mut body).await.ok()?;
    body.lines()
        .find(|l| l.starts_with("ferro_controller_reconciles_total{controller=\"agent-network\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// `N packets transmitted, M packets received` from busybox ping's summary.
fn ping_counts(text: &str) -> Option<(u64, u64)> {
    let line = text.lines().find(|l| l.contains("packets transmitted"))?;
    let mut numbers = line
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<u64>());
    Some((numbers.next()?.ok()?, numbers.next()?.ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ping_summaries_and_percentiles_read_right() {
        assert_eq!(
            ping_counts(
                "--- x ping statistics ---\n57 packets transmitted, 56 packets received, 1% packet loss\n"
            ),
            Some((57, 56))
        );
        let ms = |v: u64| Duration::from_millis(v);
        let sorted: Vec<Duration> = (1..=100).map(ms).collect();
        assert_eq!(percentile(&sorted, 0.5), ms(51));
        assert_eq!(percentile(&sorted, 0.99), ms(99));
        assert_eq!(port_ip(0), Ipv4Addr::new(10, 8, 1, 10));
        assert_eq!(port_ip(245), Ipv4Addr::new(10, 8, 1, 255));
        assert_eq!(port_ip(246), Ipv4Addr::new(10, 8, 2, 0));
        // An echo request with id 1, sequence 1.
        assert_eq!(icmp_checksum(&[8, 0, 0, 0, 0, 1, 0, 1]), 0xf7fd);
    }
}
