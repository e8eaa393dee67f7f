//! Routers and floating IPs end to end, under `ferro up --nodes 3`, once per network
//! driver, with real guests.
//!
//! A router joins two tenant networks and the external network `public` (whose upstream,
//! `203.0.113.1`, is in the cloud's `outside` namespace). Guest `alpha` on `lan` and guest
//! `beta` on `lan2` are kept on different nodes; alpha pings beta and talks TCP to it
//! through the router, from a script in its user data. A floating IP mapped to alpha
//! answers ping and HTTP (the guest serves its hostname) from the outside namespace, and
//! alpha's own connection to a listener there arrives from the floating IP. Alpha's
//! security groups hold HTTP back until a rule for port 80 is added, keep port 7 closed,
//! and drop what alpha sends from an address not its own. Alpha reads its hostname, key
//! and uuid from the metadata service; a probe with no server gets 404. A rule flushed
//! by hand inside the router's namespace comes back. With Open vSwitch, the router's node
//! then dies (its agent stopped, its uplink down, its namespace deleted): the router fails
//! over to the other network node and a floating IP answers again. Deleting the stack
//! leaves every node's links and switch, and the machine's namespaces, exactly as they
//! were.

use std::time::Duration;

use anyhow::{Context, ensure};
use ferro_e2e::net::{
    Listener, block, bound_probe, namespaces_of_ferro, node_state, pings, probe, tcp_line,
    wait_as_before,
};
use ferro_e2e::{Cloud, Options, Signal, signal, table, tiny_guest, wait_for};

/// How long the nodes, guests and wiring may take, on a loaded 2-core machine.
const WAIT: Duration = Duration::from_secs(240);

/// Alpha's user data: through the router to beta (ping, then TCP to its port-7
/// responder), then out to the listener in the outside namespace, each retried until it
/// works, saying so on the console; then a ping from an address that is not its Port's,
/// which security groups drop; then its hostname, key and uuid from the metadata service.
const ALPHA_SCRIPT: &str = r#"#!/bin/sh
(
  end=$(($(date +%s) + 240))
  until ping -c 1 -W 1 10.1.0.12 >/dev/null 2>&1; do
    [ "$(date +%s)" -lt "$end" ] || { echo "FERRO-ROUTED-FAILED"; exit 1; }
    sleep 0.5
  done
  until out=$(echo hello | nc -w 2 10.1.0.12 7 | head -n 1) && [ -n "$out" ]; do
    [ "$(date +%s)" -lt "$end" ] || { echo "FERRO-ROUTED-FAILED tcp"; exit 1; }
    sleep 0.5
  done
  echo "FERRO-ROUTED-OK $out"
  until echo hello | nc -w 2 203.0.113.1 8080 >/dev/null 2>&1; do
    [ "$(date +%s)" -lt "$end" ] || { echo "FERRO-OUT-FAILED"; exit 1; }
    sleep 1
  done
  echo "FERRO-OUT-OK"
  ip addr add 10.0.0.99/24 dev eth0
  if ping -c 3 -W 1 -I 10.0.0.99 10.1.0.12 >/dev/null 2>&1; then
    echo "FERRO-SPOOF-PASSED"
  else
    echo "FERRO-SPOOF-DROPPED"
  fi
  ip addr del 10.0.0.99/24 dev eth0
  md() { printf 'GET %s HTTP/1.0\r\n\r\n' "$1" | nc -w 5 169.254.169.254 80; }
  until host=$(md /latest/meta-data/hostname | tail -n 1) && [ -n "$host" ]; do
    [ "$(date +%s)" -lt "$end" ] || { echo "FERRO-METADATA-FAILED"; exit 1; }
    sleep 1
  done
  echo "FERRO-METADATA hostname=$host"
  echo "FERRO-METADATA key=$(md /latest/meta-data/public-keys/0/openssh-key | tail -n 1)"
  echo "FERRO-METADATA $(md /openstack/latest/meta_data.json | grep -o '"uuid": *"[^"]*"')"
) >/dev/console 2>&1 &
"#;

fn manifests(images: &str) -> String {
    format!(
        r#"{images}---
apiVersion: ferro/v1
kind: Network
metadata: {{name: public}}
spec:
  external: true
  mtu: 1500
  subnets:
  - name: v4
    cidr: 203.0.113.0/24
    gateway: 203.0.113.1
    dhcp: false
    allocationPools: [{{start: 203.0.113.100, end: 203.0.113.200}}]
---
apiVersion: ferro/v1
kind: Network
metadata: {{name: lan}}
spec:
  subnets:
  - {{name: v4, cidr: 10.0.0.0/24}}
---
apiVersion: ferro/v1
kind: Network
metadata: {{name: lan2}}
spec:
  subnets:
  - {{name: v4, cidr: 10.1.0.0/24}}
---
apiVersion: ferro/v1
kind: Router
metadata: {{name: edge}}
spec:
  externalGateway: {{network: public}}
  interfaces:
  - {{network: lan, subnet: v4}}
  - {{network: lan2, subnet: v4}}
---
apiVersion: ferro/v1
kind: ServerGroup
metadata: {{name: apart}}
spec: {{policy: AntiAffinity}}
---
{web}---
apiVersion: ferro/v1
kind: KeyPair
metadata: {{name: alice}}
spec:
  publicKey: {key}
---
apiVersion: ferro/v1
kind: Server
metadata: {{name: alpha}}
spec:
  flavor: m1.tiny
  image: tiny
  serverGroup: apart
  keyPair: alice
  securityGroups: [default, web]
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
  - {{network: lan2, fixedIp: 10.1.0.12}}
---
apiVersion: ferro/v1
kind: FloatingIP
metadata: {{name: web}}
spec:
  network: public
  server: alpha
"#,
        script = block(ALPHA_SCRIPT, 4),
        web = web_group(false),
        key = ALICE,
    )
}

/// Alpha's public key.
const ALICE: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJ65XlM9xwTrwBb2VYfUbi9VU/mF0doEHYlbtQsEKTh5 alice@ferro";

/// Alpha's second group: ping from anywhere, and HTTP once `http` is set.
fn web_group(http: bool) -> String {
    let http = if http {
        "  - {direction: Ingress, protocol: TCP, portRangeMin: 80}\n"
    } else {
        ""
    };
    format!(
        "apiVersion: ferro/v1\nkind: SecurityGroup\nmetadata: {{name: web}}\nspec:\n  rules:\n  - {{direction: Ingress, protocol: ICMP}}\n{http}"
    )
}

/// The body of `GET /` from `ip:80`, fetched from inside `netns` (busybox's `nc`: its
/// `wget` is not dependable in a static build), if the server answers 200.
fn http_get(netns: &str, ip: &str) -> Option<String> {
    let (head, body) = http(netns, ip, "/")?;
    head.starts_with("HTTP/1.1 200")
        .then(|| body.trim().to_owned())
}

/// The status line of `GET path` from `ip:80`, fetched from inside `netns`, if any came.
fn http_status(netns: &str, ip: &str, path: &str) -> Option<String> {
    let (head, _) = http(netns, ip, path)?;
    head.lines().next().map(str::to_owned)
}

/// The head and body of `GET path` from `ip:80`, fetched from inside `netns` with
/// busybox's `nc`.
fn http(netns: &str, ip: &str, path: &str) -> Option<(String, String)> {
    let mut child = std::process::Command::new("ip")
        .args(["netns", "exec", netns, "busybox", "nc", "-w", "3", ip, "80"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .ok()?;
    std::io::Write::write_all(
        child.stdin.as_mut()?,
        format!("GET {path} HTTP/1.0\r\nHost: floating\r\n\r\n").as_bytes(),
    )
    .ok()?;
    let out = child.wait_with_output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (head, body) = text.split_once("\r\n\r\n")?;
    Some((head.to_owned(), body.to_owned()))
}

/// The postrouting rules of the router's table in `netns`, as `nft` lists them.
fn snat_rules(netns: &str) -> usize {
    std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            netns,
            "nft",
            "list",
            "chain",
            "ip",
            "ferro-router",
            "postrouting",
        ])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter(|l| l.contains("snat to"))
                .count()
        })
        .unwrap_or(0)
}

/// A node made dead: its agent SIGSTOPped, its provider link down. Resumed when dropped,
/// so a failing test leaves no stopped agent that `ferro down` could not end.
struct Stopped {
    pid: u32,
    node_ns: String,
}

impl Drop for Stopped {
    fn drop(&mut self) {
        signal(self.pid, Signal::CONT);
        let _ = std::process::Command::new("ip")
            .args(["-n", &self.node_ns, "link", "set", "provider0", "up"])
            .status();
    }
}

/// The router's node dies (its agent stopped, its uplink down, its namespace gone): the
/// router moves to the other network node, which builds it, and a floating IP of a probe
/// on the third node answers again. The old node's agent, resumed, removes its stale
/// copy. Returns the manifest of what it applied.
fn fails_over(cloud: &Cloud, router_ns: &str) -> anyhow::Result<std::path::PathBuf> {
    let outside = cloud.outside_netns();
    let router_node = |cloud: &Cloud| -> anyhow::Result<String> {
        let rows = table(&cloud.run(["get", "router", "edge", "-o", "wide"])?);
        Ok(rows.first().map(|r| r["NODE"].clone()).unwrap_or_default())
    };
    let old = router_node(cloud)?;
    let third = "node-3";
    ensure!(old != third, "the router is on {old}, not a network node");
    let file = cloud.data_dir().join("../far.yaml");
    std::fs::write(
        &file,
        format!(
            "{}  securityGroups: [default, web]\n---\napiVersion: ferro/v1\nkind: FloatingIP\nmetadata: {{name: far}}\nspec: {{network: public, port: far}}\n",
            probe("default", "far", "lan", third, "10.0.0.31"),
        ),
    )?;
    cloud.run(["apply", "-f", file.to_str().context("path")?])?;
    let far = bound_probe(cloud, "default", "far")?;
    // A probe holds only its address; the way back to the outside is the test's to add.
    let routed = std::process::Command::new("ip")
        .args(["-n", &far, "route", "replace", "default", "via", "10.0.0.1"])
        .status()?;
    ensure!(routed.success(), "cannot route {far} through the router");
    cloud.run([
        "wait",
        "floatingip/far",
        "--for",
        "condition=Ready",
        "--timeout",
        "120s",
    ])?;
    let fip = table(&cloud.run(["get", "floatingip", "far", "-o", "wide"])?)
        .first()
        .map(|r| r["ADDRESS"].clone())
        .context("no floating IP row")?;
    wait_for(&format!("{fip} answering ping from outside"), WAIT, || {
        Ok(pings(&outside, &fip).then_some(()))
    })?;

    let number = old.strip_prefix("node-").context("a ferro up node")?;
    let pidfile = cloud
        .data_dir()
        .join(format!("run/agent-node-{number}.pid"));
    let pid: u32 = std::fs::read_to_string(&pidfile)
        .with_context(|| format!("reading {}", pidfile.display()))?
        .trim()
        .parse()?;
    let died = std::time::Instant::now();
    signal(pid, Signal::STOP);
    let node_ns = cloud.node_netns(number.parse()?);
    let stopped = Stopped { pid, node_ns };
    // Dead to the outside too: its uplink down and its router gone (a namespace a stopped
    // process still holds would otherwise go on answering).
    let down = std::process::Command::new("ip")
        .args(["-n", &stopped.node_ns, "link", "set", "provider0", "down"])
        .status()?;
    ensure!(down.success(), "cannot take provider0 of {old} down");
    // While a process elsewhere runs `ip netns exec`, its private mount namespace holds
    // every namespace file and the delete fails with EBUSY: try again for a while.
    wait_for(
        &format!("{router_ns} deleted"),
        Duration::from_secs(10),
        || {
            let done = std::process::Command::new("ip")
                .args(["netns", "delete", router_ns])
                .status()?;
            Ok(done.success().then_some(()))
        },
    )?;
    let new = wait_for("the router failing over", Duration::from_secs(300), || {
        let now = router_node(cloud)?;
        Ok((!now.is_empty() && now != old).then_some(now))
    })?;
    ensure!(
        new != third,
        "the router moved to {new}, not a network node"
    );
    wait_for(&format!("{fip} answering again"), WAIT, || {
        Ok(pings(&outside, &fip).then_some(()))
    })?;
    eprintln!(
        "router failover {old} → {new}: floating IP answering again {:.1} s after the node died",
        died.elapsed().as_secs_f64()
    );
    drop(stopped);
    Ok(file)
}

fn routers_and_floating_ips_work(driver: &str, failover: bool) -> anyhow::Result<()> {
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
    let before = namespaces_of_ferro()?;
    let nodes_before = (1..=3)
        .map(|node| node_state(&cloud, node))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let outside = cloud.outside_netns();

    let file = cloud.data_dir().join("../router.yaml");
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
    let nodes: Vec<String> = table(&cloud.run(["get", "servers", "-o", "wide"])?)
        .iter()
        .map(|r| r["NODE"].clone())
        .collect();
    ensure!(
        nodes.len() == 2 && nodes[0] != nodes[1],
        "guests apart: {nodes:?}"
    );
    // Between tenant networks, through the router.
    cloud.run([
        "wait",
        "server/alpha",
        "--for",
        "console=FERRO-ROUTED-OK ferro-tiny beta",
        "--timeout",
        "240s",
    ])?;
    cloud.run([
        "wait",
        "router/edge",
        "--for",
        "condition=Ready",
        "--timeout",
        "60s",
    ])?;

    // The floating IP, from the outside.
    cloud.run([
        "wait",
        "floatingip/web",
        "--for",
        "condition=Ready",
        "--timeout",
        "120s",
    ])?;
    let rows = table(&cloud.run(["get", "floatingip", "web", "-o", "wide"])?);
    let fip = rows
        .first()
        .map(|r| r["ADDRESS"].clone())
        .context("no floating IP row")?;
    wait_for(&format!("{fip} answering ping from outside"), WAIT, || {
        Ok(pings(&outside, &fip).then_some(()))
    })?;
    // Security groups: alpha's port 80 is closed until a rule of its group opens it, and
    // port 7 stays closed.
    ensure!(
        http_get(&outside, &fip).is_none(),
        "http://{fip}/ answered before a rule let it in"
    );
    let group = cloud.data_dir().join("../web.yaml");
    std::fs::write(&group, web_group(true))?;
    let opened = std::time::Instant::now();
    cloud.run(["apply", "-f", group.to_str().context("path")?])?;
    let hostname = wait_for(&format!("http://{fip}/ from outside"), WAIT, || {
        Ok(http_get(&outside, &fip))
    })?;
    eprintln!(
        "http://{fip}/ answered {} ms after the rule was applied",
        opened.elapsed().as_millis()
    );
    ensure!(hostname == "alpha", "http://{fip}/ served {hostname:?}");
    ensure!(
        opened.elapsed() < Duration::from_secs(10),
        "the rule took {:?} to let HTTP in",
        opened.elapsed()
    );
    ensure!(
        tcp_line(&outside, &fip, 7).is_none(),
        "port 7 of {fip} answered with no rule for it"
    );

    // The guest's own connection leaves as its floating IP.
    let listener = Listener::start(&outside, "203.0.113.1:8080".parse()?)?;
    let peer = listener.peer(WAIT)?;
    ensure!(
        peer.ip().to_string() == fip,
        "alpha's connection came from {peer}, not {fip}"
    );
    cloud.run([
        "wait",
        "server/alpha",
        "--for",
        "console=FERRO-OUT-OK",
        "--timeout",
        "60s",
    ])?;
    // The metadata service tells alpha its own hostname, key and uuid, and an address
    // that is no server's Port's nothing.
    let alpha_uid = cloud
        .run(["get", "server", "alpha", "-o", "yaml"])?
        .lines()
        .find_map(|l| l.trim().strip_prefix("uid: "))
        .map(|u| u.trim_matches('"').to_owned())
        .context("alpha has no uid")?;
    for line in [
        "FERRO-METADATA hostname=alpha".to_owned(),
        format!("FERRO-METADATA key={ALICE}"),
        format!("FERRO-METADATA \"uuid\": \"{alpha_uid}\""),
    ] {
        cloud.run([
            "wait",
            "server/alpha",
            "--for",
            &format!("console={line}"),
            "--timeout",
            "120s",
        ])?;
    }
    let snoop_file = cloud.data_dir().join("../snoop.yaml");
    std::fs::write(
        &snoop_file,
        probe("default", "snoop", "lan", "node-1", "10.0.0.40"),
    )?;
    cloud.run(["apply", "-f", snoop_file.to_str().context("path")?])?;
    let snoop = bound_probe(&cloud, "default", "snoop")?;
    let routed = std::process::Command::new("ip")
        .args([
            "-n", &snoop, "route", "replace", "default", "via", "10.0.0.1",
        ])
        .status()?;
    ensure!(routed.success(), "cannot route {snoop} through the router");
    let status = wait_for("an answer to the probe from 169.254.169.254", WAIT, || {
        Ok(http_status(
            &snoop,
            "169.254.169.254",
            "/latest/meta-data/hostname",
        ))
    })?;
    ensure!(
        status.starts_with("HTTP/1.0 404"),
        "the metadata service answered a probe with {status:?}"
    );
    cloud.run(["delete", "-f", snoop_file.to_str().context("path")?])?;

    // A packet from an address that is not alpha's Port's goes nowhere.
    cloud.run([
        "wait",
        "server/alpha",
        "--for",
        "console=FERRO-SPOOF-DROPPED",
        "--timeout",
        "60s",
    ])?;

    // A rule flushed by hand comes back.
    // This cloud's router: the other driver's test may run beside this one.
    let yaml = cloud.run(["get", "router", "edge", "-o", "yaml"])?;
    let uid = yaml
        .lines()
        .find_map(|l| l.trim().strip_prefix("uid: "))
        .map(|u| u.trim_matches('"').to_owned())
        .with_context(|| format!("router edge has no uid:\n{yaml}"))?;
    let router_ns = format!("qrouter-{uid}");
    ensure!(
        namespaces_of_ferro()?.contains(&router_ns),
        "no namespace {router_ns}"
    );
    let rules = snat_rules(&router_ns);
    ensure!(rules == 3, "{rules} SNAT rules in {router_ns}, not 3");
    let flushed = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &router_ns,
            "nft",
            "flush",
            "chain",
            "ip",
            "ferro-router",
            "postrouting",
        ])
        .status()?;
    ensure!(flushed.success(), "nft flush failed");
    wait_for("the flushed rules back", WAIT, || {
        Ok((snat_rules(&router_ns) == 3).then_some(()))
    })?;

    let probes = if failover {
        Some(fails_over(&cloud, &router_ns)?)
    } else {
        None
    };

    // Deleting the stack leaves nothing behind on any node.
    if let Some(probes) = probes {
        cloud.run(["delete", "-f", probes.to_str().context("path")?])?;
    }
    cloud.run(["delete", "-f", file.to_str().context("path")?])?;
    wait_for("no namespace left", WAIT, || {
        let after = namespaces_of_ferro()?;
        let left: Vec<String> = after.into_iter().filter(|n| !before.contains(n)).collect();
        Ok(left.is_empty().then_some(()).or_else(|| {
            eprintln!("still there: {left:?}");
            None
        }))
    })?;
    wait_as_before(&cloud, &nodes_before)?;
    Ok(())
}

#[test]
fn routers_and_floating_ips_with_open_vswitch() -> anyhow::Result<()> {
    routers_and_floating_ips_work("ovs", true)
}

#[test]
fn routers_and_floating_ips_with_linux_bridges() -> anyhow::Result<()> {
    routers_and_floating_ips_work("linuxbridge", false)
}
