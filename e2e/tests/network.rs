//! Tenant networks end to end, under `ferro up --nodes 3`, once per network driver: real
//! guests on different nodes, real switches (Open vSwitch's userspace datapath, or Linux
//! bridges with kernel VXLAN), real dnsmasq.
//!
//! Two guests of project `default` on network `lan` are kept on different nodes by an
//! anti-affinity group. Each gets its Port's address over DHCP (the guest prints
//! `FERRO-ADDR`); the first pings the second and talks TCP to its port-7 responder, from a
//! script in its user data. Probe Ports (`deviceOwner: network:probe`, a namespace the
//! node wires as a machine on the network) on the third node reach both guests; a probe
//! of project `other` on a network with the same CIDR reaches neither. While the first
//! guest pings the second ten times a second, the agents of both their nodes are
//! SIGKILLed (`ferro up` starts them again): at most 1 % of the pings may be lost. A
//! second network added to the running second guest is hot-plugged as a second NIC that
//! gets its address over DHCP and answers a probe; taken away again, the NIC goes.
//! Deleting everything leaves every node's links, switch and the machine's namespaces
//! exactly as they were before.

use std::process::Command;
use std::time::Duration;

use anyhow::{Context, ensure};
use ferro_e2e::net::{
    block, bound_probe, namespaces_of_ferro, node_state, ovsdb_socket, pings, probe, wait_as_before,
};
use ferro_e2e::{Cloud, Options, signal, table, tiny_guest, wait_for};
use rustix::process::Signal;

/// How long the nodes, guests and wiring may take, on a loaded 2-core machine.
const WAIT: Duration = Duration::from_secs(240);

/// A guest that checks, in the background so that it does not hold up its boot, that it
/// reaches `peer` by ping and by TCP (the peer's port-7 responder answers `ferro-tiny
/// <hostname>`), then reads its hostname from the metadata service, and says so on its
/// console.
fn checker(peer: &str) -> String {
    format!(
        r#"#!/bin/sh
(
  end=$(($(date +%s) + 200))
  until ping -c 1 -W 1 {peer} >/dev/null 2>&1; do
    [ "$(date +%s)" -lt "$end" ] || {{ echo "FERRO-PING-FAILED {peer}"; exit 1; }}
    sleep 0.5
  done
  echo "FERRO-PING-OK {peer}"
  until out=$(echo hello | nc -w 2 {peer} 7 | head -n 1) && [ -n "$out" ]; do
    [ "$(date +%s)" -lt "$end" ] || {{ echo "FERRO-TCP-FAILED {peer}"; exit 1; }}
    sleep 0.5
  done
  echo "FERRO-TCP-OK $out"
  # Ten pings a second for 30 s, while the test kills agents.
  echo "FERRO-PINGING {peer}"
  summary=$(ping -q -c 300 -i 0.1 -W 1 {peer} | grep 'packets transmitted')
  echo "FERRO-PINGS $summary"
  # The network has no router: its DHCP namespace serves the metadata.
  md() {{ printf 'GET %s HTTP/1.0\r\n\r\n' "$1" | nc -w 5 169.254.169.254 80; }}
  until host=$(md /latest/meta-data/hostname | tail -n 1) && [ -n "$host" ]; do
    [ "$(date +%s)" -lt "$((end + 120))" ] || {{ echo "FERRO-METADATA-FAILED"; exit 1; }}
    sleep 1
  done
  echo "FERRO-METADATA hostname=$host"
) >/dev/console 2>&1 &
"#
    )
}

/// The second guest, on `lan` and, when `hot_plugged`, on `lan2` too.
fn beta(hot_plugged: bool) -> String {
    let second = if hot_plugged {
        "  - {network: lan2, fixedIp: 10.1.0.12}\n"
    } else {
        ""
    };
    format!(
        r#"apiVersion: ferro/v1
kind: Server
metadata: {{name: beta}}
spec:
  flavor: m1.tiny
  image: tiny
  serverGroup: apart
  networks:
  - {{network: lan, fixedIp: 10.0.0.12}}
{second}"#
    )
}

/// `(transmitted, received)` from a guest's `FERRO-PINGS` line.
fn ping_summary(console: &str) -> Option<(u64, u64)> {
    let line = console.lines().find(|l| l.contains("FERRO-PINGS"))?;
    let mut numbers = line
        .split_whitespace()
        .filter_map(|word| word.parse::<u64>().ok());
    Some((numbers.next()?, numbers.next()?))
}

/// Node `name`'s number: `node-2` → 2.
fn node_number(name: &str) -> anyhow::Result<u32> {
    name.strip_prefix("node-")
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("{name} is not a node of ferro up --nodes"))
}

fn manifests(images: &str) -> String {
    format!(
        r#"{images}---
apiVersion: ferro/v1
kind: Network
metadata: {{name: lan}}
spec:
  subnets:
  - {{name: v4, cidr: 10.0.0.0/24}}
---
apiVersion: ferro/v1
kind: ServerGroup
metadata: {{name: apart}}
spec: {{policy: AntiAffinity}}
---
apiVersion: ferro/v1
kind: Server
metadata: {{name: alpha}}
spec:
  flavor: m1.tiny
  image: tiny
  serverGroup: apart
  networks:
  - {{network: lan, fixedIp: 10.0.0.11}}
  userData: |
{script}---
{beta}"#,
        script = block(&checker("10.0.0.12"), 4),
        beta = beta(false),
    )
}

/// What Ferro has wired on one node: taps, probe and DHCP namespaces of its own, and
/// switch ports on `br-int` (for OVS).
fn wired_on(cloud: &Cloud, node: u32) -> anyhow::Result<Vec<String>> {
    let netns = cloud.node_netns(node);
    let links = Command::new("ip")
        .args(["-n", &netns, "-o", "link", "show"])
        .output()?;
    let mut found: Vec<String> = String::from_utf8_lossy(&links.stdout)
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|name| name.split('@').next().unwrap_or(name).to_owned())
        .filter(|name| name.starts_with("tap") || name.starts_with("brq"))
        .collect();
    if let Some(socket) = ovsdb_socket(cloud.data_dir(), node) {
        let ports = Command::new("ovs-vsctl")
            .arg(format!("--db=unix:{}", socket.display()))
            .args(["--timeout=10", "list-ports", "br-int"])
            .output()?;
        found.extend(
            String::from_utf8_lossy(&ports.stdout)
                .lines()
                .filter(|p| !p.starts_with("patch-"))
                .map(|p| format!("br-int:{p}")),
        );
    }
    Ok(found)
}

fn tenant_networks_work_across_nodes(driver: &str) -> anyhow::Result<()> {
    let guest = tiny_guest()?;
    let cloud = Cloud::start_with(Options {
        nodes: 3,
        driver: driver.into(),
        ..Options::default()
    })?;
    wait_for("three nodes Ready", WAIT, || {
        let rows = table(&cloud.run(["get", "nodes"])?);
        Ok((rows.len() == 3 && rows.iter().all(|r| r["READY"] == "True")).then_some(()))
    })?;
    let before: Vec<String> = namespaces_of_ferro()?;
    let nodes_before = (1..=3)
        .map(|node| node_state(&cloud, node))
        .collect::<anyhow::Result<Vec<_>>>()?;

    let file = cloud.data_dir().join("../network.yaml");
    std::fs::write(&file, manifests(&guest.image_manifests()))?;
    cloud.run(["apply", "-f", file.to_str().context("path")?])?;
    for server in ["alpha", "beta"] {
        cloud.run([
            "wait",
            &format!("server/{server}"),
            "--for",
            "condition=Ready",
            "--timeout",
            "300s",
        ])?;
    }
    // DHCP gave each guest its Port's address.
    for (server, ip) in [("alpha", "10.0.0.11"), ("beta", "10.0.0.12")] {
        cloud.run([
            "wait",
            &format!("server/{server}"),
            "--for",
            &format!("console=FERRO-ADDR eth0 {ip}/24"),
            "--timeout",
            "120s",
        ])?;
    }
    let nodes: Vec<String> = table(&cloud.run(["get", "servers", "-o", "wide"])?)
        .iter()
        .map(|r| r["NODE"].clone())
        .collect();
    ensure!(
        nodes.len() == 2 && nodes[0] != nodes[1],
        "guests apart: {nodes:?}"
    );
    // Ping and TCP across nodes, from inside the guest.
    cloud.run([
        "wait",
        "server/alpha",
        "--for",
        "console=FERRO-TCP-OK ferro-tiny beta",
        "--timeout",
        "240s",
    ])?;

    // SIGKILL of both guests' agents during a continuous ping between the guests: the
    // devices and flows stay, and the agents ferro up starts again adopt them.
    cloud.run([
        "wait",
        "server/alpha",
        "--for",
        "console=FERRO-PINGING",
        "--timeout",
        "60s",
    ])?;
    std::thread::sleep(Duration::from_secs(2));
    for node in &nodes {
        let pidfile = cloud
            .data_dir()
            .join(format!("run/agent-node-{}.pid", node_number(node)?));
        let pid: u32 = std::fs::read_to_string(&pidfile)
            .with_context(|| format!("reading {}", pidfile.display()))?
            .trim()
            .parse()?;
        signal(pid, Signal::KILL);
    }
    cloud.run([
        "wait",
        "server/alpha",
        "--for",
        "console=FERRO-PINGS",
        "--timeout",
        "120s",
    ])?;
    let console = cloud.run(["logs", "server/alpha"])?;
    let (sent, received) = ping_summary(&console).context("no ping summary")?;
    ensure!(
        sent >= 300 && (sent - received) * 100 <= sent,
        "{} of {sent} pings lost across the agents' SIGKILL (at most 1 %)",
        sent - received
    );
    eprintln!("pings across the agents' SIGKILL: {received} of {sent} answered");
    // The metadata service of a network without a router, from its DHCP namespace (which
    // DHCP routes 169.254.169.254 to), served by the agents started again.
    cloud.run([
        "wait",
        "server/alpha",
        "--for",
        "console=FERRO-METADATA hostname=alpha",
        "--timeout",
        "180s",
    ])?;

    // Probes: the third node reaches both guests; another project's network with the
    // same CIDR reaches neither.
    let third = (1..=3)
        .map(|i| format!("node-{i}"))
        .find(|n| !nodes.contains(n))
        .context("a node without a guest")?;
    let probes = cloud.data_dir().join("../probes.yaml");
    std::fs::write(
        &probes,
        format!(
            "apiVersion: ferro/v1\nkind: Project\nmetadata: {{name: other}}\n---\n{}---\n{}---\napiVersion: ferro/v1\nkind: Network\nmetadata: {{name: lan, project: other}}\nspec:\n  subnets:\n  - {{name: v4, cidr: 10.0.0.0/24}}\n---\n{}",
            probe("default", "watcher", "lan", &third, "10.0.0.21"),
            probe("other", "intruder", "lan", &nodes[0], "10.0.0.22"),
            probe("other", "intruder-2", "lan", &third, "10.0.0.23"),
        ),
    )?;
    cloud.run(["apply", "-f", probes.to_str().context("path")?])?;
    let watcher = bound_probe(&cloud, "default", "watcher")?;
    for ip in ["10.0.0.11", "10.0.0.12"] {
        wait_for(
            &format!("{ip} answering the probe on {third}"),
            WAIT,
            || Ok(pings(&watcher, ip).then_some(())),
        )?;
    }
    for name in ["intruder", "intruder-2"] {
        let intruder = bound_probe(&cloud, "other", name)?;
        for ip in ["10.0.0.11", "10.0.0.12", "10.0.0.21"] {
            ensure!(
                !pings(&intruder, ip),
                "{name} of project other reached {ip} of project default"
            );
        }
    }

    // A second network added to the running guest: a hot-plugged NIC with its address.
    let second = cloud.data_dir().join("../second.yaml");
    std::fs::write(
        &second,
        format!(
            "apiVersion: ferro/v1\nkind: Network\nmetadata: {{name: lan2}}\nspec:\n  subnets:\n  - {{name: v4, cidr: 10.1.0.0/24}}\n---\n{}---\n{}",
            probe("default", "watcher-2", "lan2", &third, "10.1.0.21"),
            beta(true),
        ),
    )?;
    cloud.run(["apply", "-f", second.to_str().context("path")?])?;
    cloud.run([
        "wait",
        "server/beta",
        "--for",
        "console=FERRO-ADDR eth1 10.1.0.12/24",
        "--timeout",
        "120s",
    ])?;
    let watcher_2 = bound_probe(&cloud, "default", "watcher-2")?;
    wait_for("the hot-plugged NIC answering", WAIT, || {
        Ok(pings(&watcher_2, "10.1.0.12").then_some(()))
    })?;
    // Taken away again, the NIC goes.
    let unplug = cloud.data_dir().join("../unplug.yaml");
    std::fs::write(&unplug, beta(false))?;
    cloud.run(["apply", "-f", unplug.to_str().context("path")?])?;
    cloud.run([
        "wait",
        "server/beta",
        "--for",
        "console=FERRO-NIC-GONE eth1",
        "--timeout",
        "120s",
    ])?;

    // Deleting everything leaves nothing behind on any node.
    cloud.run(["delete", "-f", probes.to_str().context("path")?])?;
    cloud.run(["delete", "-f", file.to_str().context("path")?])?;
    cloud.run(["delete", "port", "watcher-2"])?;
    cloud.run(["delete", "network", "lan2"])?;
    wait_for("nothing wired on any node", WAIT, || {
        let mut left = Vec::new();
        for node in 1..=3 {
            left.extend(wired_on(&cloud, node)?);
        }
        let after = namespaces_of_ferro()?;
        left.extend(after.into_iter().filter(|n| !before.contains(n)));
        Ok(left.is_empty().then_some(()).or_else(|| {
            eprintln!("still wired: {left:?}");
            None
        }))
    })?;
    // Every node's links and switch are exactly as before the test.
    wait_as_before(&cloud, &nodes_before)?;
    Ok(())
}

#[test]
fn tenant_networks_across_nodes_with_open_vswitch() -> anyhow::Result<()> {
    tenant_networks_work_across_nodes("ovs")
}

#[test]
fn tenant_networks_across_nodes_with_linux_bridges() -> anyhow::Result<()> {
    tenant_networks_work_across_nodes("linuxbridge")
}
