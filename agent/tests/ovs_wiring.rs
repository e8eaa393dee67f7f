//! The Open vSwitch network driver against real Open vSwitch: two nodes, two tenant
//! networks with the same CIDR, machines on both nodes. Needs root and
//! `openvswitch-switch` (`scripts/install-host-deps.sh`).
//!
//! A "node" is a network namespace with its own private OVS instance (userspace datapath
//! here) and an [`OvsWiring`] over it; the two nodes are joined by a veth underlay whose
//! ends sit on each node's `br-phy` (the userspace datapath sends tunnel packets only from
//! an address on one of its own bridges). A "machine" is a namespace with a veth whose
//! host end, in a node's namespace, is plugged as a port, as a guest's tap would be.
//! Addresses exist only inside these namespaces; traffic only flows between them.
//!
//! The [`World`] guard owns every namespace, OVS instance, directory and process a test
//! makes, and removes them when the test ends, passed or failed; names carry the test's
//! pid and a counter, so parallel tests never collide.

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

use ferro_agent::switch::ovs::OvsSwitch;
use ferro_agent::switch::ovs_instance::OvsInstance;
use ferro_agent::switch::{FlowCookie, PortKind, PortSpec, Switch};
use ferro_agent::wiring::ovs::{NODE_FLOWS_OWNER, OvsWiring};
use ferro_agent::wiring::{
    NetworkDriver, NetworkWiring, Observed, ObservedNetwork, ObservedPort, PortWiring, device_name,
};

static NEXT_WORLD: AtomicU32 = AtomicU32::new(0);

/// The underlay addresses of the two nodes (documentation range; inside the nodes'
/// namespaces only).
const UNDERLAY: [&str; 2] = ["192.0.2.1", "192.0.2.2"];

/// Runs a command, failing with its stderr if it fails; returns its stdout.
fn run(program: &str, args: &[&str]) -> Result<String> {
    let output = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("run {program}"))?;
    ensure!(
        output.status.success(),
        "{program} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Runs a command inside a namespace.
fn in_netns(netns: &str, args: &[&str]) -> Result<String> {
    let mut all = vec!["netns", "exec", netns];
    all.extend_from_slice(args);
    run("ip", &all)
}

/// One node: a namespace, its OVS instance and a driver over it.
struct Node {
    netns: String,
    instance: OvsInstance,
    underlay_ip: std::net::IpAddr,
    wiring: OvsWiring,
}

impl Node {
    /// A driver as a restarted agent makes it: new switch connection, no memory.
    fn fresh_driver(&self) -> OvsWiring {
        OvsWiring::new(Arc::new(OvsSwitch::new(self.instance.switch_config())))
    }

    /// `ovs-vsctl` on this node's instance: what an operator would run.
    fn vsctl(&self, args: &[&str]) -> Result<String> {
        let db = format!("--db=unix:{}", self.instance.db_socket().display());
        let mut all = vec![db.as_str()];
        all.extend_from_slice(args);
        Ok(run("ovs-vsctl", &all)?.trim().to_owned())
    }

    /// `ovs-ofctl dump-flows` of a bridge, with statistics, one line per flow.
    fn dump_flows(&self, bridge: &str) -> Result<Vec<String>> {
        let target = format!("unix:{}/{bridge}.mgmt", self.instance.dir().display());
        let output = Command::new("ovs-ofctl")
            .args(["dump-flows", &target])
            .env("OVS_RUNDIR", self.instance.dir())
            .output()
            .context("run ovs-ofctl")?;
        ensure!(
            output.status.success(),
            "ovs-ofctl dump-flows {bridge}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        Ok(String::from_utf8_lossy(&output.stdout)
            .lines()
            .filter(|l| l.contains("actions="))
            .map(|l| l.trim().to_owned())
            .collect())
    }
}

/// A machine: a namespace with `eth0`, plugged into a node as a port of a network.
#[derive(Clone)]
struct Machine {
    netns: String,
    address: &'static str,
    mac: String,
    port: PortWiring,
}

/// Everything a test makes; dropping it removes all of it.
struct World {
    id: String,
    dirs: Vec<tempfile::TempDir>,
    namespaces: Vec<String>,
    instances: Vec<OvsInstance>,
    processes: Vec<Child>,
    nodes: Vec<Node>,
}

impl Drop for World {
    fn drop(&mut self) {
        for child in &mut self.processes {
            let _ = child.kill();
            let _ = child.wait();
        }
        for instance in &self.instances {
            if let Err(e) = instance.stop() {
                eprintln!("stopping OVS in {}: {e}", instance.dir().display());
            }
        }
        for netns in self.namespaces.iter().rev() {
            let _ = run("ip", &["netns", "del", netns]);
        }
    }
}

impl World {
    /// Two nodes joined by an underlay, each with a prepared driver.
    async fn new() -> Result<World> {
        let id = format!(
            "fw{}{}",
            std::process::id() % 10000,
            NEXT_WORLD.fetch_add(1, Ordering::Relaxed)
        );
        let mut world = World {
            id,
            dirs: Vec::new(),
            namespaces: Vec::new(),
            instances: Vec::new(),
            processes: Vec::new(),
            nodes: Vec::new(),
        };
        let node_ns: Vec<String> = (1..=2).map(|i| format!("{}-node{i}", world.id)).collect();
        for netns in &node_ns {
            world.add_netns(netns)?;
        }
        run(
            "ip",
            &[
                "link",
                "add",
                "ul",
                "netns",
                &node_ns[0],
                "type",
                "veth",
                "peer",
                "name",
                "ul",
                "netns",
                &node_ns[1],
            ],
        )?;
        for (netns, address) in node_ns.iter().zip(UNDERLAY) {
            // Short: the bridges' management sockets live in it.
            let dir = tempfile::Builder::new()
                .prefix("fwovs")
                .tempdir_in("/tmp")
                .context("temp dir")?;
            let instance = OvsInstance::new(dir.path()).in_netns(netns);
            world.dirs.push(dir);
            world.instances.push(instance.clone());
            instance.start().await.context("start OVS")?;

            // The node's own set-up: the underlay NIC on br-phy, the address on br-phy.
            let switch = OvsSwitch::new(instance.switch_config());
            switch.ensure_bridge("br-phy").await?;
            switch
                .ensure_port(&PortSpec {
                    bridge: "br-phy".into(),
                    name: "ul".into(),
                    kind: PortKind::System,
                    tag: None,
                    external_ids: BTreeMap::new(),
                })
                .await?;
            run("ip", &["-n", netns, "link", "set", "ul", "up"])?;
            let cidr = format!("{address}/24");
            run("ip", &["-n", netns, "addr", "add", &cidr, "dev", "br-phy"])?;
            run("ip", &["-n", netns, "link", "set", "br-phy", "up"])?;

            let node = Node {
                netns: netns.clone(),
                underlay_ip: address.parse()?,
                wiring: OvsWiring::new(Arc::new(OvsSwitch::new(instance.switch_config()))),
                instance,
            };
            node.wiring.prepare().await.context("prepare")?;
            world.nodes.push(node);
        }
        Ok(world)
    }

    fn add_netns(&mut self, name: &str) -> Result<()> {
        run("ip", &["netns", "add", name])?;
        self.namespaces.push(name.to_owned());
        run("ip", &["-n", name, "link", "set", "lo", "up"])?;
        Ok(())
    }

    /// A network as node `node` must wire it: its peer is the other node.
    fn network(&self, node: usize, uid: &str, segment_id: u32) -> NetworkWiring {
        NetworkWiring {
            uid: uid.into(),
            segment_id,
            mtu: 1450,
            local_ip: self.nodes[node].underlay_ip,
            peers: BTreeSet::from([self.nodes[1 - node].underlay_ip]),
        }
    }

    /// A machine on node `node` with `address`/24, its veth's host end ready to plug as
    /// Port `label` of `network_uid`.
    fn machine(
        &mut self,
        node: usize,
        label: &str,
        network_uid: &str,
        address: &'static str,
        mac: &str,
    ) -> Result<Machine> {
        let netns = format!("{}-{label}", self.id);
        self.add_netns(&netns)?;
        let port_uid = format!("port-{label}");
        let device = device_name("tap", &port_uid);
        let node_ns = self.nodes[node].netns.clone();
        run(
            "ip",
            &[
                "link", "add", &device, "netns", &node_ns, "type", "veth", "peer", "name", "eth0",
                "netns", &netns,
            ],
        )?;
        // The userspace datapath does not fill in checksums a veth leaves to offload.
        in_netns(&netns, &["ethtool", "-K", "eth0", "tx", "off"])?;
        run("ip", &["-n", &node_ns, "link", "set", &device, "up"])?;
        run("ip", &["-n", &netns, "link", "set", "eth0", "address", mac])?;
        let cidr = format!("{address}/24");
        run("ip", &["-n", &netns, "addr", "add", &cidr, "dev", "eth0"])?;
        run("ip", &["-n", &netns, "link", "set", "eth0", "up"])?;
        Ok(Machine {
            netns,
            address,
            mac: mac.to_owned(),
            port: PortWiring {
                uid: port_uid,
                network_uid: network_uid.into(),
                device,
                mac: mac.to_owned(),
                server_uid: Some(format!("server-{label}")),
            },
        })
    }

    /// A TCP server in `machine` on `port` that sends `greeting` to whoever connects.
    fn tcp_greeter(&mut self, machine: &Machine, port: u16, greeting: &str) -> Result<()> {
        let port = port.to_string();
        let mut child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &machine.netns,
                "busybox",
                "nc",
                "-l",
                "-p",
                &port,
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("start nc")?;
        use std::io::Write;
        let mut stdin = child.stdin.take().context("nc stdin")?;
        writeln!(stdin, "{greeting}")?;
        drop(stdin);
        self.processes.push(child);
        // Listening before anyone connects.
        std::thread::sleep(Duration::from_millis(300));
        Ok(())
    }
}

/// Pings `to` from inside `from`, `count` times; whether any answer came.
fn ping(from: &str, to: &str, count: u32) -> bool {
    let count = count.to_string();
    in_netns(from, &["busybox", "ping", "-c", &count, "-W", "1", to]).is_ok()
}

/// Whether `from` gets an answer from `to` within a few seconds (the first packets may
/// go while the nodes still resolve each other's underlay address).
fn pings(from: &str, to: &str) -> bool {
    (0..8).any(|_| ping(from, to, 1))
}

/// The MAC `machine` has learned for `address`, if any.
fn neighbour_mac(machine: &Machine, address: &str) -> Result<Option<String>> {
    let output = in_netns(&machine.netns, &["ip", "neigh", "show", address])?;
    Ok(output
        .split_whitespace()
        .skip_while(|w| *w != "lladdr")
        .nth(1)
        .map(str::to_owned))
}

/// Sends a line over TCP from `from` to `to` and returns what the server sent back.
fn tcp_exchange(from: &Machine, to: &str, port: u16) -> Result<String> {
    let port = port.to_string();
    let mut child = Command::new("ip")
        .args([
            "netns",
            "exec",
            &from.netns,
            "busybox",
            "nc",
            "-w",
            "3",
            to,
            &port,
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("start nc")?;
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().context("nc stdin")?;
        writeln!(stdin, "hello from {}", from.address)?;
    }
    let output = child.wait_with_output()?;
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

/// What the networks and ports of a node must be observed as.
fn expected(
    world: &World,
    node: usize,
    networks: &[(&str, u32)],
    machines: &[&Machine],
) -> Observed {
    Observed {
        networks: networks
            .iter()
            .map(|(uid, segment_id)| {
                (
                    uid.to_string(),
                    ObservedNetwork {
                        segment_id: *segment_id,
                        peers: BTreeSet::from([world.nodes[1 - node].underlay_ip]),
                    },
                )
            })
            .collect(),
        ports: machines
            .iter()
            .map(|m| {
                (
                    m.port.uid.clone(),
                    ObservedPort {
                        network_uid: m.port.network_uid.clone(),
                        device: m.port.device.clone(),
                        attached: true,
                    },
                )
            })
            .collect(),
    }
}

const RED: (&str, u32) = ("net-red", 1001);
const BLUE: (&str, u32) = ("net-blue", 1002);

/// Two networks with the same CIDR on two nodes: red-1 (10.0.0.1) and blue-1 (10.0.0.2) on
/// node 1, red-2 (10.0.0.2) and blue-2 (10.0.0.1), blue-3 (10.0.0.3) on node 2. Each
/// address but 10.0.0.3 exists once per network; 10.0.0.3 only in blue.
struct Scene {
    world: World,
    red: [Machine; 2],
    blue: [Machine; 3],
}

async fn scene() -> Result<Scene> {
    let mut world = World::new().await?;
    let red = [
        world.machine(0, "red1", RED.0, "10.0.0.1", "02:00:00:00:01:01")?,
        world.machine(1, "red2", RED.0, "10.0.0.2", "02:00:00:00:01:02")?,
    ];
    let blue = [
        world.machine(0, "blue1", BLUE.0, "10.0.0.2", "02:00:00:00:02:01")?,
        world.machine(1, "blue2", BLUE.0, "10.0.0.1", "02:00:00:00:02:02")?,
        world.machine(1, "blue3", BLUE.0, "10.0.0.3", "02:00:00:00:02:03")?,
    ];
    for node in 0..2 {
        for (uid, segment) in [RED, BLUE] {
            let network = world.network(node, uid, segment);
            world.nodes[node].wiring.ensure_network(&network).await?;
        }
    }
    let plugs = [
        (0, &red[0]),
        (1, &red[1]),
        (0, &blue[0]),
        (1, &blue[1]),
        (1, &blue[2]),
    ];
    for (node, machine) in plugs {
        world.nodes[node].wiring.plug(&machine.port).await?;
    }
    Ok(Scene { world, red, blue })
}

#[tokio::test]
async fn machines_of_a_network_talk_across_nodes_and_never_reach_another_network() -> Result<()> {
    let mut scene = scene().await?;
    let (red, blue) = (scene.red.clone(), scene.blue.clone());

    let started = Instant::now();
    ensure!(pings(&red[0].netns, "10.0.0.2"), "red-1 cannot reach red-2");
    eprintln!("red across nodes: answered after {:?}", started.elapsed());
    ensure!(
        pings(&blue[1].netns, "10.0.0.2"),
        "blue-2 cannot reach blue-1"
    );
    ensure!(
        pings(&blue[0].netns, "10.0.0.3"),
        "blue-1 cannot reach blue-3"
    );
    // The answers came from the machine of the same network, not its twin address in
    // the other network.
    assert_eq!(
        neighbour_mac(&red[0], "10.0.0.2")?.as_deref(),
        Some(red[1].mac.as_str())
    );
    assert_eq!(
        neighbour_mac(&blue[1], "10.0.0.2")?.as_deref(),
        Some(blue[0].mac.as_str())
    );
    // 10.0.0.3 exists only in blue: red never reaches it, on either node.
    if ping(&red[0].netns, "10.0.0.3", 3) || ping(&red[1].netns, "10.0.0.3", 2) {
        bail!("red reaches blue's 10.0.0.3");
    }

    // TCP both ways within a network, across nodes.
    scene.world.tcp_greeter(&red[1], 5001, "red-2 here")?;
    assert_eq!(tcp_exchange(&red[0], "10.0.0.2", 5001)?, "red-2 here");
    scene.world.tcp_greeter(&blue[0], 5002, "blue-1 here")?;
    assert_eq!(tcp_exchange(&blue[1], "10.0.0.2", 5002)?, "blue-1 here");
    // red-2's greeter listens on 10.0.0.2 in red only: blue-2 (node 2) never gets it.
    scene.world.tcp_greeter(&red[1], 5003, "red-2 again")?;
    assert_eq!(tcp_exchange(&blue[2], "10.0.0.2", 5003)?, "");

    // Both nodes observe exactly what they wired, with tunnels to exactly the other node.
    for node in 0..2 {
        let machines: Vec<&Machine> = if node == 0 {
            vec![&red[0], &blue[0]]
        } else {
            vec![&red[1], &blue[1], &blue[2]]
        };
        let observed = scene.world.nodes[node].wiring.observe().await?;
        assert_eq!(
            observed,
            expected(&scene.world, node, &[RED, BLUE], &machines)
        );
        let other = scene.world.nodes[1 - node].underlay_ip;
        let tunnel = ferro_agent::wiring::ovs::tunnel_port_name(other);
        let n = &scene.world.nodes[node];
        assert_eq!(
            n.vsctl(&["list-ports", "br-tun"])?,
            format!("patch-int\n{tunnel}")
        );
        assert_eq!(
            n.vsctl(&["get", "Interface", &tunnel, "options:key"])?,
            "flow"
        );
        let m = machines[0];
        let external_id = |key: &str| -> Result<String> {
            let column = format!("external_ids:{key}");
            let value = n.vsctl(&["get", "Interface", &m.port.device, &column])?;
            Ok(value.trim_matches('"').to_owned())
        };
        assert_eq!(external_id("iface-id")?, m.port.uid);
        assert_eq!(external_id("attached-mac")?, m.mac);
        assert_eq!(external_id("ferro-network")?, m.port.network_uid);
        assert_eq!(
            n.vsctl(&["get", "Port", &m.port.device, "tag"])?,
            if m.port.network_uid == RED.0 {
                "1"
            } else {
                "2"
            },
            "{}: red is wired first, so it has the first local VLAN",
            m.port.uid
        );
    }
    Ok(())
}

/// A flow line of `ovs-ofctl dump-flows` without its counters, and its age in seconds.
fn flow_and_age(line: &str) -> (String, f64) {
    let mut age = 0.0;
    let mut kept = Vec::new();
    for field in line.split(", ") {
        match field.split_once('=') {
            Some(("duration", d)) => age = d.trim_end_matches('s').parse().unwrap_or(0.0),
            Some(("n_packets" | "n_bytes" | "idle_age" | "hard_age", _)) => {}
            _ => kept.push(field),
        }
    }
    (kept.join(", "), age)
}

#[tokio::test]
async fn a_restarted_driver_observes_the_same_drops_nothing_and_cleans_up() -> Result<()> {
    let scene = scene().await?;
    let (red, blue) = (scene.red.clone(), scene.blue.clone());
    let world = &scene.world;
    ensure!(pings(&red[0].netns, "10.0.0.2"), "red-1 cannot reach red-2");

    let before: Vec<Observed> = vec![
        world.nodes[0].wiring.observe().await?,
        world.nodes[1].wiring.observe().await?,
    ];
    let flows_before: Vec<Vec<String>> = [0, 1]
        .iter()
        .flat_map(|n| ["br-int", "br-tun"].map(|b| world.nodes[*n].dump_flows(b)))
        .collect::<Result<_>>()?;

    // A ping runs through the restart: every packet must be answered. It stops by
    // itself after 30 s should the test fail before interrupting it.
    let pinger = Command::new("ip")
        .args([
            "netns",
            "exec",
            &red[0].netns,
            "busybox",
            "ping",
            "-i",
            "0.1",
            "-w",
            "30",
            "10.0.0.2",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("start ping")?;
    std::thread::sleep(Duration::from_millis(500));
    let restarted = Instant::now();
    for (node, machines) in [
        (0, vec![&red[0], &blue[0]]),
        (1, vec![&red[1], &blue[1], &blue[2]]),
    ] {
        let fresh = world.nodes[node].fresh_driver();
        assert_eq!(fresh.observe().await?, before[node], "node {node}");
        fresh.prepare().await?;
        for (uid, segment) in [BLUE, RED] {
            fresh
                .ensure_network(&world.network(node, uid, segment))
                .await?;
        }
        for machine in machines {
            fresh.plug(&machine.port).await?;
        }
        assert_eq!(fresh.observe().await?, before[node], "node {node}");
    }
    eprintln!("both nodes re-wired in {:?}", restarted.elapsed());
    std::thread::sleep(Duration::from_millis(500));
    // busybox's ping prints its summary on SIGINT (`ip netns exec` became it).
    run("kill", &["-INT", &pinger.id().to_string()])?;
    let pinged = pinger.wait_with_output()?;
    let summary = String::from_utf8_lossy(&pinged.stdout);
    let counts: Vec<u32> = summary
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .context("no ping summary")?
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse().ok())
        .take(2)
        .collect();
    ensure!(
        counts.len() == 2 && counts[0] >= 10 && counts[0] == counts[1],
        "packets lost through the restart: {summary}"
    );
    // No flow was replaced: the same flows, each older than before.
    let flows_after: Vec<Vec<String>> = [0, 1]
        .iter()
        .flat_map(|n| ["br-int", "br-tun"].map(|b| world.nodes[*n].dump_flows(b)))
        .collect::<Result<_>>()?;
    for (before, after) in flows_before.iter().zip(&flows_after) {
        let before: BTreeMap<String, f64> = before.iter().map(|l| flow_and_age(l)).collect();
        let after: BTreeMap<String, f64> = after.iter().map(|l| flow_and_age(l)).collect();
        assert_eq!(
            before.keys().collect::<Vec<_>>(),
            after.keys().collect::<Vec<_>>()
        );
        for (flow, age) in &after {
            assert!(*age >= before[flow], "replaced: {flow}");
        }
    }

    // Removing everything leaves the node-wide base: the bridges, their patch, and flows
    // under the node's cookie only.
    for node in 0..2 {
        let n = &world.nodes[node];
        let machines: Vec<&Machine> = if node == 0 {
            vec![&red[0], &blue[0]]
        } else {
            vec![&red[1], &blue[1], &blue[2]]
        };
        n.wiring.unplug(&machines[0].port.uid).await?;
        for (uid, _) in [RED, BLUE] {
            n.wiring.remove_network(uid).await?;
        }
        assert_eq!(n.wiring.observe().await?, Observed::default());
        assert_eq!(n.vsctl(&["list-br"])?, "br-int\nbr-phy\nbr-tun");
        assert_eq!(n.vsctl(&["list-ports", "br-int"])?, "patch-tun");
        assert_eq!(n.vsctl(&["list-ports", "br-tun"])?, "patch-int");
        assert_eq!(n.vsctl(&["get", "Bridge", "br-int", "external_ids"])?, "{}");
        let node_cookie = format!("cookie={}", FlowCookie::for_owner(NODE_FLOWS_OWNER));
        for bridge in ["br-int", "br-tun"] {
            let flows = n.dump_flows(bridge)?;
            ensure!(!flows.is_empty(), "{bridge} lost its base flows");
            for flow in flows {
                ensure!(flow.starts_with(&node_cookie), "left on {bridge}: {flow}");
            }
        }
        let show = n.vsctl(&["show"])?;
        ensure!(
            !show.contains("vxlan") && !show.contains("Port tap"),
            "{show}"
        );
    }
    // And the networks are gone: red-1 no longer reaches red-2.
    if ping(&red[0].netns, "10.0.0.2", 2) {
        bail!("red-1 still reaches red-2 after its network was removed");
    }
    Ok(())
}
