//! The Linux bridge network driver against the real kernel, across two "nodes". Needs root.
//!
//! Each node is a network namespace with its own [`LinuxBridge`] driver, and the two are
//! joined by a veth pair standing for the underlay (198.18.0.1 and .2, inside those
//! namespaces only). A "machine" is a namespace with an `eth0` whose other end, in its
//! node's namespace, is plugged as a Port, as a guest's tap would be. Two networks use the
//! same CIDR, 10.0.0.0/24, with the same addresses on both: traffic must cross nodes within
//! a network and never between networks.
//!
//! Namespaces are named with the test process's id and a counter; the [`Lab`] guard
//! deletes them and kills the processes it started, by PID, when the test ends, passed or
//! failed. Traffic only flows between namespaces the test made.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::net::IpAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, ensure};

use ferro_agent::links::netlink::NetlinkLinks;
use ferro_agent::links::{Address, Links, MacAddress, VethPeer};
use ferro_agent::wiring::linuxbridge::LinuxBridge;
use ferro_agent::wiring::{
    NetworkDriver, NetworkWiring, Observed, ObservedNetwork, ObservedPort, PortWiring, device_name,
};

static NEXT: AtomicU32 = AtomicU32::new(0);

const NETWORK_A: &str = "a11a0000-0000-4000-8000-00000000000a";
const NETWORK_B: &str = "b22b0000-0000-4000-8000-00000000000b";
const UNDERLAY: [&str; 2] = ["198.18.0.1", "198.18.0.2"];

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

fn in_netns(netns: &str, args: &[&str]) -> Result<String> {
    let mut all = vec!["netns", "exec", netns];
    all.extend_from_slice(args);
    run("ip", &all)
}

fn ip(text: &str) -> IpAddr {
    text.parse().expect("a test address")
}

/// A machine on a network: its namespace, its port and its address.
struct Machine {
    netns: String,
    port: PortWiring,
    address: &'static str,
}

/// Two nodes joined by an underlay, their drivers, and the machines plugged into them.
/// Dropping it kills the processes it started and deletes every namespace it made.
struct Lab {
    host: NetlinkLinks,
    nodes: [String; 2],
    drivers: [LinuxBridge; 2],
    namespaces: Vec<String>,
    children: Vec<Child>,
}

impl Lab {
    async fn new() -> Result<Lab> {
        let id = format!(
            "{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let host = NetlinkLinks::new();
        let nodes = [
            format!("ferro-test-lb-{id}-n1"),
            format!("ferro-test-lb-{id}-n2"),
        ];
        // The guard exists before anything is made, so a failure below still cleans up.
        let mut lab = Lab {
            drivers: [
                LinuxBridge::new(host.namespace(&nodes[0])),
                LinuxBridge::new(host.namespace(&nodes[1])),
            ],
            host,
            nodes: nodes.clone(),
            namespaces: Vec::new(),
            children: Vec::new(),
        };
        for node in &nodes {
            lab.namespaces.push(node.clone());
            lab.host.create_namespace(node).await?;
        }
        // The underlay: `ul0` in each node, one veth pair between them.
        let first = lab.host.namespace(&nodes[0]);
        first
            .ensure_veth(
                "ul0",
                &VethPeer {
                    name: "ul0".into(),
                    namespace: Some(nodes[1].clone()),
                },
            )
            .await?;
        for (node, address) in nodes.iter().zip(UNDERLAY) {
            let links = lab.host.namespace(node);
            links
                .add_address(
                    "ul0",
                    Address {
                        ip: ip(address),
                        prefix_len: 24,
                    },
                )
                .await?;
            links.set_up("ul0", true).await?;
        }
        Ok(lab)
    }

    fn network(&self, node: usize, uid: &str, segment_id: u32) -> NetworkWiring {
        NetworkWiring {
            uid: uid.into(),
            segment_id,
            mtu: 1450,
            local_ip: ip(UNDERLAY[node]),
            peers: BTreeSet::from([ip(UNDERLAY[1 - node])]),
        }
    }

    /// A machine on `node`: a namespace with `eth0` (`mac`, `address`/24) whose other end
    /// is plugged into `network` as Port `port_uid`.
    async fn machine(
        &mut self,
        node: usize,
        network: &str,
        port_uid: &str,
        mac: &str,
        address: &'static str,
    ) -> Result<Machine> {
        let netns = format!("{}-{}", self.nodes[node], &port_uid[..4]);
        self.namespaces.push(netns.clone());
        self.host.create_namespace(&netns).await?;
        let device = device_name("tap", port_uid);
        let node_links = self.host.namespace(&self.nodes[node]);
        node_links
            .ensure_veth(
                &device,
                &VethPeer {
                    name: "eth0".into(),
                    namespace: Some(netns.clone()),
                },
            )
            .await?;
        let inside = self.host.namespace(&netns);
        inside.set_mac("eth0", mac.parse::<MacAddress>()?).await?;
        inside.set_mtu("eth0", 1450).await?;
        inside
            .add_address(
                "eth0",
                Address {
                    ip: ip(address),
                    prefix_len: 24,
                },
            )
            .await?;
        inside.set_up("eth0", true).await?;
        let port = PortWiring {
            uid: port_uid.into(),
            network_uid: network.into(),
            device,
            mac: mac.into(),
            server_uid: None,
        };
        self.drivers[node].plug(&port).await?;
        Ok(Machine {
            netns,
            port,
            address,
        })
    }

    /// Serves one TCP connection on port 5000 inside `netns`: sends `reply`, and returns
    /// (through the child's stdout) what the client sent.
    fn serve_once(&mut self, netns: &str, reply: &str) -> Result<usize> {
        let mut child = Command::new("ip")
            .args(["netns", "exec", netns])
            .args([
                "busybox", "timeout", "15", "busybox", "nc", "-l", "-p", "5000",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("start nc")?;
        let mut stdin = child.stdin.take().context("nc stdin")?;
        stdin.write_all(format!("{reply}\n").as_bytes())?;
        drop(stdin);
        self.children.push(child);
        Ok(self.children.len() - 1)
    }

    /// What the server started by [`Lab::serve_once`] received, once it ended.
    fn served(&mut self, server: usize) -> Result<String> {
        let child = self.children.remove(server);
        let output = child.wait_with_output()?;
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        for netns in self.namespaces.iter().rev() {
            let _ = run("ip", &["netns", "del", netns]);
        }
    }
}

/// Whether `from` gets an answer from `to` within a few tries (the first packets may go
/// while the bridges still learn addresses).
fn pings(from: &str, to: &str) -> bool {
    (0..4).any(|_| in_netns(from, &["busybox", "ping", "-c", "1", "-W", "1", to]).is_ok())
}

/// Connects from `netns` to `to`:5000, sends `message`, returns what came back; tries a
/// few times while the server is not yet listening.
fn tcp_exchange(netns: &str, to: &str, message: &str) -> Result<String> {
    let script = format!("echo {message} | busybox timeout 10 busybox nc {to} 5000");
    let mut last = None;
    for _ in 0..10 {
        match in_netns(netns, &["sh", "-c", &script]) {
            Ok(answer) if !answer.is_empty() => return Ok(answer),
            Ok(answer) => last = Some(anyhow::anyhow!("empty answer {answer:?}")),
            Err(e) => last = Some(e),
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("no attempt")))
}

/// The links of a namespace, by name and MAC, as `ip -br link` shows them (not their
/// operational state, which a veth's carrier changes in its own time).
fn ip_links(netns: &str) -> Result<BTreeSet<String>> {
    Ok(run("ip", &["-n", netns, "-br", "link"])?
        .lines()
        .map(|l| {
            let fields: Vec<&str> = l.split_whitespace().collect();
            format!("{} {}", fields[0], fields.get(2).unwrap_or(&""))
        })
        .collect())
}

#[tokio::test]
async fn two_networks_with_one_cidr_across_two_nodes() -> Result<()> {
    let mut lab = Lab::new().await?;
    let before = [ip_links(&lab.nodes[0])?, ip_links(&lab.nodes[1])?];
    for driver in &lab.drivers {
        driver.prepare().await?;
    }
    for node in 0..2 {
        lab.drivers[node]
            .ensure_network(&lab.network(node, NETWORK_A, 1001))
            .await?;
        lab.drivers[node]
            .ensure_network(&lab.network(node, NETWORK_B, 1002))
            .await?;
        // Converged: a repeat is harmless.
        lab.drivers[node]
            .ensure_network(&lab.network(node, NETWORK_A, 1001))
            .await?;
    }
    let details = run(
        "ip",
        &["-n", &lab.nodes[0], "-d", "link", "show", "vxlan-1001"],
    )?;
    for wanted in [
        "vxlan id 1001",
        "local 198.18.0.1",
        "dev ul0",
        "dstport 4789",
        "alias a11a0000",
    ] {
        assert!(details.contains(wanted), "{wanted} in {details}");
    }
    let fdb = run(
        "bridge",
        &["-n", &lab.nodes[0], "fdb", "show", "dev", "vxlan-1001"],
    )?;
    assert!(
        fdb.contains("00:00:00:00:00:00 dst 198.18.0.2 self permanent"),
        "{fdb}"
    );

    // Network A: 10.0.0.1 on node 1, 10.0.0.2 on node 2. Network B: the same addresses,
    // the other way round.
    let a1 = lab
        .machine(
            0,
            NETWORK_A,
            "a1000000-port",
            "fa:16:3e:0a:00:01",
            "10.0.0.1",
        )
        .await?;
    let a2 = lab
        .machine(
            1,
            NETWORK_A,
            "a2000000-port",
            "fa:16:3e:0a:00:02",
            "10.0.0.2",
        )
        .await?;
    let b1 = lab
        .machine(
            0,
            NETWORK_B,
            "b1000000-port",
            "fa:16:3e:0b:00:01",
            "10.0.0.2",
        )
        .await?;
    let b2 = lab
        .machine(
            1,
            NETWORK_B,
            "b2000000-port",
            "fa:16:3e:0b:00:02",
            "10.0.0.1",
        )
        .await?;
    let plugged = run(
        "ip",
        &["-n", &lab.nodes[0], "link", "show", &a1.port.device],
    )?;
    assert!(plugged.contains("master brqa11a00000000"), "{plugged}");
    assert!(
        plugged.contains("mtu 1450") && plugged.contains("alias a1000000-port"),
        "{plugged}"
    );

    // Within a network, across nodes: ping, and the neighbour is the right machine.
    assert!(pings(&a1.netns, a2.address), "a1 reaches a2");
    assert!(pings(&b2.netns, b1.address), "b2 reaches b1");
    let neighbour = run("ip", &["-n", &a1.netns, "neigh", "show", a2.address])?;
    assert!(
        neighbour.contains("fa:16:3e:0a:00:02"),
        "a1 sees a2's MAC: {neighbour}"
    );
    let neighbour = run("ip", &["-n", &b2.netns, "neigh", "show", b1.address])?;
    assert!(
        neighbour.contains("fa:16:3e:0b:00:01"),
        "b2 sees b1's MAC: {neighbour}"
    );

    // TCP both ways, while a machine of the other network listens on the same address.
    let server_a = lab.serve_once(&a2.netns, "from-a2")?;
    let decoy = lab.serve_once(&b1.netns, "from-b1")?;
    let answer = tcp_exchange(&a1.netns, a2.address, "hello-from-a1")?;
    assert_eq!(answer.trim(), "from-a2");
    assert!(
        lab.children[decoy].try_wait()?.is_none(),
        "the other network's listener heard nothing"
    );
    let heard = lab.served(server_a)?;
    assert_eq!(heard.trim(), "hello-from-a1");

    // Between networks: a B address no A machine has is unreachable from A.
    let lone = lab
        .machine(
            1,
            NETWORK_B,
            "b3000000-port",
            "fa:16:3e:0b:00:03",
            "10.0.0.3",
        )
        .await?;
    assert!(pings(&b1.netns, lone.address), "b1 reaches b3");
    assert!(!pings(&a1.netns, lone.address), "a1 never reaches b3");
    assert!(!pings(&a2.netns, lone.address), "a2 never reaches b3");

    // A restarted agent (a fresh driver) is ready beside what is wired (its probe must
    // not clash with a wired VNI) and observes exactly that.
    for node in 0..2 {
        let fresh = LinuxBridge::new(lab.host.namespace(&lab.nodes[node]));
        let observed = fresh.prepare().await?;
        let peers = BTreeSet::from([ip(UNDERLAY[1 - node])]);
        let mut ports = BTreeMap::new();
        for machine in [&a1, &a2, &b1, &b2, &lone] {
            let on_this_node = machine.netns.starts_with(&lab.nodes[node]);
            if on_this_node {
                ports.insert(
                    machine.port.uid.clone(),
                    ObservedPort {
                        network_uid: machine.port.network_uid.clone(),
                        device: machine.port.device.clone(),
                        attached: true,
                    },
                );
            }
        }
        let expected = Observed {
            networks: BTreeMap::from([
                (
                    NETWORK_A.to_owned(),
                    ObservedNetwork {
                        segment_id: 1001,
                        peers: peers.clone(),
                    },
                ),
                (
                    NETWORK_B.to_owned(),
                    ObservedNetwork {
                        segment_id: 1002,
                        peers,
                    },
                ),
            ]),
            ports,
        };
        assert_eq!(observed, expected, "node {}", node + 1);
        assert_eq!(lab.drivers[node].observe().await?, expected);
    }

    // Removing everything leaves the nodes as they were.
    for machine in [&a1, &a2, &b1, &b2, &lone] {
        let node = usize::from(machine.netns.starts_with(&lab.nodes[1]));
        lab.drivers[node].unplug(&machine.port.uid).await?;
        lab.drivers[node].unplug(&machine.port.uid).await?;
        let node_links = lab.host.namespace(&lab.nodes[node]);
        node_links.delete_link(&machine.port.device).await?;
    }
    for (node, before) in before.iter().enumerate() {
        for network in [NETWORK_A, NETWORK_B] {
            lab.drivers[node].remove_network(network).await?;
            lab.drivers[node].remove_network(network).await?;
        }
        assert_eq!(lab.drivers[node].observe().await?, Observed::default());
        assert_eq!(&ip_links(&lab.nodes[node])?, before, "node {}", node + 1);
    }
    Ok(())
}

#[tokio::test]
async fn a_removed_network_takes_its_ports_off_the_bridge() -> Result<()> {
    let mut lab = Lab::new().await?;
    let before = ip_links(&lab.nodes[0])?;
    lab.drivers[0]
        .ensure_network(&lab.network(0, NETWORK_A, 1003))
        .await?;
    let a1 = lab
        .machine(
            0,
            NETWORK_A,
            "a1000000-port",
            "fa:16:3e:0a:00:01",
            "10.0.0.1",
        )
        .await?;
    lab.drivers[0].remove_network(NETWORK_A).await?;
    let port = run(
        "ip",
        &["-n", &lab.nodes[0], "link", "show", &a1.port.device],
    )?;
    assert!(
        !port.contains("master") && !port.contains("alias"),
        "{port}"
    );
    assert_eq!(lab.drivers[0].observe().await?, Observed::default());
    lab.host
        .namespace(&lab.nodes[0])
        .delete_link(&a1.port.device)
        .await?;
    assert_eq!(ip_links(&lab.nodes[0])?, before);
    Ok(())
}
