//! Security groups end to end, under `ferro up --nodes 2`, once per network driver
//! (nftables on Linux bridges, OpenFlow with conntrack on Open vSwitch), with probes
//! (namespaces on the tenant network, filtered as guests are) instead of guests.
//!
//! `pa` (node 1) and `pb` (node 2) are in their project's `default` group; `pc` (node 2)
//! only in `web`, which lets ping in from the default group's members and everything out.
//! The test checks, in order: members of a group reach each other across nodes and others
//! do not; a TCP rule added to `web` opens its port and no other; a connection survives
//! a change of an unrelated rule; a probe sending from an address that is not its Port's
//! is dropped; `pc` joining `default` lets it in; a port's chain flushed by hand comes
//! back; deleting everything leaves no table, link or namespace behind.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use ferro_e2e::net::{
    EchoServer, bound_probe, connects, echo_for, namespaces_of_ferro, node_state, ovsdb_socket,
    pings, uid_of, wait_as_before,
};
use ferro_e2e::{Cloud, Options, table, wait_for};

/// How long the nodes and the wiring may take, on a loaded 2-core machine.
const WAIT: Duration = Duration::from_secs(240);

fn probe(name: &str, node: &str, ip: &str, groups: &[&str]) -> String {
    let groups = if groups.is_empty() {
        String::new()
    } else {
        format!("  securityGroups: [{}]\n", groups.join(", "))
    };
    format!(
        "apiVersion: ferro/v1\nkind: Port\nmetadata:\n  name: {name}\n  annotations: {{ferro.io/probe-node: {node}}}\nspec:\n  network: lan\n  deviceOwner: \"network:probe\"\n  fixedIps: [{{ipAddress: {ip}}}]\n{groups}"
    )
}

fn web(extra: &[&str]) -> String {
    let mut rules = vec![
        "{direction: Egress}".to_owned(),
        "{direction: Ingress, protocol: ICMP, remoteGroup: default}".to_owned(),
    ];
    rules.extend(extra.iter().map(|r| r.to_string()));
    format!(
        "apiVersion: ferro/v1\nkind: SecurityGroup\nmetadata: {{name: web}}\nspec:\n  rules:\n{}",
        rules
            .iter()
            .map(|r| format!("  - {r}\n"))
            .collect::<String>()
    )
}

fn stack(pc_groups: &[&str], web_rules: &[&str]) -> String {
    format!(
        "apiVersion: ferro/v1\nkind: Network\nmetadata: {{name: lan}}\nspec:\n  subnets:\n  - {{name: v4, cidr: 10.0.0.0/24}}\n---\n{}---\n{}---\n{}---\n{}",
        web(web_rules),
        probe("pa", "node-1", "10.0.0.5", &[]),
        probe("pb", "node-2", "10.0.0.6", &[]),
        probe("pc", "node-2", "10.0.0.7", pc_groups),
    )
}

/// How many rules enforce port `uid` on a node: its ingress chain's (Linux bridges) or its
/// flows (Open vSwitch).
fn port_rules(cloud: &Cloud, node: u32, uid: &str) -> usize {
    match ovsdb_socket(cloud.data_dir(), node) {
        Some(socket) => {
            let mgmt = socket.with_file_name("br-int.mgmt");
            let cookie = format!("cookie={:#x},", port_cookie(uid));
            Command::new("ovs-ofctl")
                .args(["dump-flows", &format!("unix:{}", mgmt.display())])
                .output()
                .map(|o| {
                    String::from_utf8_lossy(&o.stdout)
                        .lines()
                        .filter(|l| l.contains(&cookie))
                        .count()
                })
                .unwrap_or(0)
        }
        None => chain_rules(&cloud.node_netns(node), &format!("i_{uid}")),
    }
}

/// Removes a share of port `uid`'s rules by hand: its ingress chain's (Linux bridges) or
/// its flows in the ingress table (Open vSwitch).
fn flush_by_hand(cloud: &Cloud, node: u32, uid: &str) -> anyhow::Result<()> {
    let status = match ovsdb_socket(cloud.data_dir(), node) {
        Some(socket) => {
            let mgmt = socket.with_file_name("br-int.mgmt");
            Command::new("ovs-ofctl")
                .args([
                    "del-flows",
                    &format!("unix:{}", mgmt.display()),
                    &format!("cookie={:#x}/-1,table=73", port_cookie(uid)),
                ])
                .status()?
        }
        None => Command::new("ip")
            .args([
                "netns",
                "exec",
                &cloud.node_netns(node),
                "nft",
                "flush",
                "chain",
                "bridge",
                "ferro-sg",
                &format!("i_{uid}"),
            ])
            .status()?,
    };
    ensure!(status.success(), "flushing {uid}'s rules failed");
    Ok(())
}

/// The cookie of a filtered port's flows, as the agent derives it.
fn port_cookie(uid: &str) -> u64 {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(format!("firewall-{uid}").as_bytes());
    u64::from_be_bytes(digest[..8].try_into().expect("8 bytes")).max(1)
}

/// The rules of a chain of `bridge ferro-sg` on a node's namespace.
fn chain_rules(netns: &str, chain: &str) -> usize {
    Command::new("ip")
        .args([
            "netns", "exec", netns, "nft", "list", "chain", "bridge", "ferro-sg", chain,
        ])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter(|l| l.contains("comment"))
                .count()
        })
        .unwrap_or(0)
}

/// The `ferro-sg` tables of a node.
fn tables(netns: &str) -> anyhow::Result<Vec<String>> {
    let out = Command::new("ip")
        .args(["netns", "exec", netns, "nft", "list", "tables"])
        .output()?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("ferro-sg"))
        .map(str::to_owned)
        .collect())
}

fn ip(netns: &str, args: &[&str]) -> anyhow::Result<()> {
    let status = Command::new("ip")
        .arg("-n")
        .arg(netns)
        .args(args)
        .status()?;
    ensure!(status.success(), "ip -n {netns} {args:?} failed");
    Ok(())
}

/// Whether `to` answers a ping sent from `from` with the source address `source`.
fn pings_from(netns: &str, source: &str, to: &str) -> bool {
    Command::new("ip")
        .args([
            "netns", "exec", netns, "busybox", "ping", "-c", "1", "-W", "1", "-I", source, to,
        ])
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn security_groups_filter_ports_with_linux_bridges() -> anyhow::Result<()> {
    security_groups_filter_ports("linuxbridge")
}

#[test]
fn security_groups_filter_ports_with_open_vswitch() -> anyhow::Result<()> {
    security_groups_filter_ports("ovs")
}

fn security_groups_filter_ports(driver: &str) -> anyhow::Result<()> {
    let cloud = Cloud::start_with(Options {
        nodes: 2,
        driver: driver.into(),
        ..Options::default()
    })?;
    wait_for("two nodes Ready", WAIT, || {
        let rows = table(&cloud.run(["get", "nodes"])?);
        Ok((rows.len() == 2 && rows.iter().all(|r| r["READY"] == "True")).then_some(()))
    })?;
    let before = namespaces_of_ferro()?;
    let nodes_before = (1..=2)
        .map(|node| node_state(&cloud, node))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let file = cloud.data_dir().join("../sg.yaml");
    let apply = |text: String| -> anyhow::Result<()> {
        std::fs::write(&file, text)?;
        cloud.run(["apply", "-f", file.to_str().context("path")?])?;
        Ok(())
    };
    apply(stack(&["web"], &[]))?;
    let pa = bound_probe(&cloud, "default", "pa")?;
    let pb = bound_probe(&cloud, "default", "pb")?;
    let pc = bound_probe(&cloud, "default", "pc")?;

    // Members of `default` reach each other across nodes; pc, in `web` only, is let in by
    // web's ping rule but not let into pa.
    wait_for("pa and pb pinging each other", WAIT, || {
        Ok((pings(&pa, "10.0.0.6") && pings(&pb, "10.0.0.5")).then_some(()))
    })?;
    wait_for("pa pinging pc", WAIT, || {
        Ok(pings(&pa, "10.0.0.7").then_some(()))
    })?;
    ensure!(!pings(&pc, "10.0.0.5"), "pc, not in default, reached pa");

    // A TCP rule opens its port, and only it.
    let echo = EchoServer::start(&pc, "10.0.0.7:8080".parse()?)?;
    let seven = EchoServer::start(&pc, "10.0.0.7:7".parse()?)?;
    let to = |port: u16| -> std::net::SocketAddr { ([10, 0, 0, 7], port).into() };
    ensure!(
        !connects(&pa, to(8080), Duration::from_secs(1)),
        "pc:8080 open before any rule"
    );
    let opened = Instant::now();
    apply(web(&[
        "{direction: Ingress, protocol: TCP, portRangeMin: 8080}",
    ]))?;
    wait_for("pc:8080 open", WAIT, || {
        Ok(connects(&pa, to(8080), Duration::from_millis(500)).then_some(()))
    })?;
    eprintln!(
        "pc:8080 answered {} ms after the rule was applied",
        opened.elapsed().as_millis()
    );
    ensure!(
        opened.elapsed() < Duration::from_secs(10),
        "the rule took {:?}",
        opened.elapsed()
    );
    ensure!(
        !connects(&pa, to(7), Duration::from_secs(1)),
        "pc:7 open with no rule for it"
    );

    // A connection lives through a change of another rule.
    let talking = echo_for(&pa, to(8080), Duration::from_secs(4));
    std::thread::sleep(Duration::from_secs(1));
    apply(web(&[
        "{direction: Ingress, protocol: TCP, portRangeMin: 8080}",
        "{direction: Ingress, protocol: UDP, portRangeMin: 53}",
    ]))?;
    talking
        .join()
        .map_err(|_| anyhow::anyhow!("the echo client panicked"))?
        .context("the connection through pc:8080 broke when web changed")?;
    drop(echo);
    drop(seven);

    // Anti-spoofing: pa sending from an address not its Port's is dropped.
    let inner = String::from_utf8(
        Command::new("ip")
            .args(["-n", &pa, "-o", "link", "show"])
            .output()?
            .stdout,
    )?
    .lines()
    .filter_map(|l| l.split(": ").nth(1))
    .map(|n| n.split('@').next().unwrap_or(n).to_owned())
    .find(|n| n.starts_with("ns-"))
    .context("pa has no ns- device")?;
    ip(&pa, &["addr", "add", "10.0.0.99/24", "dev", &inner])?;
    let spoofed = pings_from(&pa, "10.0.0.99", "10.0.0.6");
    let honest = pings_from(&pa, "10.0.0.5", "10.0.0.6");
    ip(&pa, &["addr", "del", "10.0.0.99/24", "dev", &inner])?;
    ensure!(honest, "pa's own address does not reach pb");
    ensure!(!spoofed, "pa reached pb from 10.0.0.99, not its address");

    // pc joins `default`: its address joins the group's set, and pa lets it in.
    apply(stack(&["web", "default"], &[]))?;
    wait_for("pc pinging pa as a member of default", WAIT, || {
        Ok(pings(&pc, "10.0.0.5").then_some(()))
    })?;

    // Rules removed by hand are put back.
    let pa_uid = uid_of(&cloud, "default", "pa")?;
    let rules = port_rules(&cloud, 1, &pa_uid);
    ensure!(rules > 3, "pa has {rules} rules");
    flush_by_hand(&cloud, 1, &pa_uid)?;
    wait_for("the flushed rules back", WAIT, || {
        Ok((port_rules(&cloud, 1, &pa_uid) == rules).then_some(()))
    })?;

    // Deleting everything leaves nothing behind.
    cloud.run(["delete", "-f", file.to_str().context("path")?])?;
    wait_for("no security group rule left", WAIT, || {
        let left = (1..=2).any(|node| {
            port_rules(&cloud, node, &pa_uid) > 0
                || tables(&cloud.node_netns(node)).is_ok_and(|t| !t.is_empty())
        });
        Ok((!left).then_some(()))
    })?;
    wait_for("no namespace left", WAIT, || {
        let left: Vec<String> = namespaces_of_ferro()?
            .into_iter()
            .filter(|n| !before.contains(n) && n.starts_with("qprobe-"))
            .filter(|n| *n == pa || *n == pb || *n == pc)
            .collect();
        Ok(left.is_empty().then_some(()))
    })?;
    wait_as_before(&cloud, &nodes_before)?;
    Ok(())
}
