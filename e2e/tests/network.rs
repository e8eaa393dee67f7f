//! Tenant networks end to end, under `ferro up --nodes 3`, once per network driver: real
//! guests on different nodes, real switches (Open vSwitch's userspace datapath, or Linux
//! bridges with kernel VXLAN), real dnsmasq.
//!
//! Two guests of project `default` on network `lan` are kept on different nodes by an
//! anti-affinity group. Each gets its Port's address over DHCP (the guest prints
//! `FERRO-ADDR`); the first pings the second and talks TCP to its port-7 responder, from a
//! script in its user data. Probe Ports (`deviceOwner: network:probe`, a namespace the
//! node wires as a machine on the network) on the third node reach both guests; a probe
//! of project `other` on a network with the same CIDR reaches neither. Deleting
//! everything leaves no tap, no `qdhcp-`/`qprobe-` namespace and no switch port on any
//! node.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, ensure};
use ferro_e2e::{Cloud, Options, table, tiny_guest, wait_for};

/// How long the nodes, guests and wiring may take, on a loaded 2-core machine.
const WAIT: Duration = Duration::from_secs(240);

/// A guest that checks, in the background so that it does not hold up its boot, that it
/// reaches `peer` by ping and by TCP (the peer's port-7 responder answers `ferro-tiny
/// <hostname>`), and says so on its console.
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
) >/dev/console 2>&1 &
"#
    )
}

/// Indents a script as a YAML block scalar under `userData: |`.
fn block(text: &str, indent: usize) -> String {
    text.lines()
        .map(|l| format!("{}{l}\n", " ".repeat(indent)))
        .collect()
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
apiVersion: ferro/v1
kind: Server
metadata: {{name: beta}}
spec:
  flavor: m1.tiny
  image: tiny
  serverGroup: apart
  networks:
  - {{network: lan, fixedIp: 10.0.0.12}}
"#,
        script = block(&checker("10.0.0.12"), 4),
    )
}

/// A probe Port on `node`: the node wires it as a namespace with the Port's address.
fn probe(project: &str, name: &str, network: &str, node: &str, ip: &str) -> String {
    format!(
        r#"apiVersion: ferro/v1
kind: Port
metadata:
  name: {name}
  project: {project}
  annotations: {{ferro.io/probe-node: {node}}}
spec:
  network: {network}
  deviceOwner: "network:probe"
  fixedIps: [{{ipAddress: {ip}}}]
"#
    )
}

/// The uid of a Port, from `ferro get -o yaml`.
fn uid_of(cloud: &Cloud, project: &str, what: &str) -> anyhow::Result<String> {
    let yaml = cloud.run(["get", "port", what, "-p", project, "-o", "yaml"])?;
    yaml.lines()
        .find_map(|l| l.trim().strip_prefix("uid: "))
        .map(|u| u.trim_matches('"').to_owned())
        .with_context(|| format!("{what} has no uid:\n{yaml}"))
}

/// Whether `ip` answers one ping from inside `netns`.
fn pings(netns: &str, ip: &str) -> bool {
    Command::new("ip")
        .args([
            "netns", "exec", netns, "busybox", "ping", "-c", "1", "-W", "1", ip,
        ])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// The probe's namespace once its node has bound it.
fn bound_probe(cloud: &Cloud, project: &str, name: &str) -> anyhow::Result<String> {
    wait_for(&format!("probe {project}/{name} bound"), WAIT, || {
        let yaml = cloud.run(["get", "port", name, "-p", project, "-o", "yaml"])?;
        Ok(yaml.contains("bound: true").then_some(()))
    })?;
    Ok(format!("qprobe-{}", uid_of(cloud, project, name)?))
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

/// The OVSDB socket of node `i`'s private Open vSwitch instance, if it has one.
fn ovsdb_socket(data_dir: &Path, node: u32) -> Option<PathBuf> {
    let nodes = data_dir.join("nodes").join(format!("node-{node}"));
    find_named(&nodes, "db.sock")
}

fn find_named(dir: &Path, name: &str) -> Option<PathBuf> {
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        if path.file_name().is_some_and(|n| n == name) {
            return Some(path);
        }
        if path.is_dir()
            && let Some(found) = find_named(&path, name)
        {
            return Some(found);
        }
    }
    None
}

fn namespaces_of_ferro() -> anyhow::Result<Vec<String>> {
    let out = Command::new("ip").args(["netns", "list"]).output()?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect())
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

    // Deleting everything leaves nothing behind on any node.
    cloud.run(["delete", "-f", probes.to_str().context("path")?])?;
    cloud.run(["delete", "-f", file.to_str().context("path")?])?;
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
