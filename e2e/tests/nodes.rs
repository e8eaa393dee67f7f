//! `ferro up --nodes 3` end to end: three nodes, each a network namespace of its own with
//! its own agent (and, with the ovs driver, its own Open vSwitch instance), joined by
//! Ferro's underlay; the host reaches them only through `<prefix>-ul`.
//!
//! The cloud comes up with three Ready Nodes whose addresses are their underlay
//! addresses; each agent and switch daemon runs inside its node's namespace (its
//! `/proc/PID/ns/net` is the namespace's); `ferro down` leaves no namespace, host link,
//! switch daemon or agent behind. Then the same data directory comes up again, `ferro up`
//! is SIGKILLed, and dropping the harness's Cloud (which runs `ferro down`) still leaves
//! nothing behind.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use ferro_e2e::{
    Cloud, Options, ferro_binary, free_port, host_objects, processes_naming, table, wait_for,
};

const NODES: u32 = 3;
/// How long the nodes may take to be Ready once the API serves.
const SOON: Duration = Duration::from_secs(90);

/// The inode of a network namespace as `/proc/PID/ns/net` names it: `net:[INODE]`.
fn netns_id(netns: &str) -> anyhow::Result<String> {
    use std::os::unix::fs::MetadataExt;
    let path = Path::new("/run/netns").join(netns);
    let meta = std::fs::metadata(&path).with_context(|| format!("no {}", path.display()))?;
    Ok(format!("net:[{}]", meta.ino()))
}

/// The network namespace a process runs in.
fn netns_of(pid: u32) -> anyhow::Result<String> {
    let link = std::fs::read_link(format!("/proc/{pid}/ns/net"))
        .with_context(|| format!("no process {pid}"))?;
    Ok(link.display().to_string())
}

fn pidfile(path: &Path) -> anyhow::Result<u32> {
    std::fs::read_to_string(path)
        .with_context(|| format!("cannot read {}", path.display()))?
        .trim()
        .parse()
        .with_context(|| format!("{} holds no pid", path.display()))
}

/// The IPv4 address of `device` in `netns`, from `ip -o -4 addr`.
fn address_in(netns: &str, device: &str) -> anyhow::Result<String> {
    let out = std::process::Command::new("ip")
        .args(["-n", netns, "-o", "-4", "addr", "show", "dev", device])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .and_then(|cidr| cidr.split('/').next())
        .map(str::to_owned)
        .with_context(|| format!("{device} in {netns} has no address: {text}"))
}

/// Processes that are Open vSwitch daemons or agents of this data directory.
fn switches_and_agents(data_dir: &Path) -> Vec<(u32, String)> {
    processes_naming(data_dir)
        .into_iter()
        .filter(|(_, cmdline)| cmdline.contains("ovs") || cmdline.contains(" agent "))
        .collect()
}

#[test]
fn three_nodes_run_in_their_namespaces_and_leave_nothing_behind() -> anyhow::Result<()> {
    let options = Options {
        nodes: NODES,
        ..Options::default()
    };
    let prefix = options.prefix.clone();
    ensure!(
        host_objects(&prefix).is_empty(),
        "host objects of {prefix} exist before the test: {:?}",
        host_objects(&prefix)
    );
    let begin = Instant::now();
    let mut cloud = Cloud::start_with(options)?;
    let data_dir = cloud.data_dir().to_owned();

    // Three Ready Nodes, each at the address of its namespace's underlay device.
    let mut last = String::new();
    let rows = wait_for("3 Ready nodes", SOON, || {
        last = cloud.run(["get", "nodes", "-o", "wide"])?;
        let rows = table(&last);
        let ready = rows.iter().filter(|r| r["READY"] == "True").count();
        Ok((ready == NODES as usize).then_some(rows))
    })
    .with_context(|| format!("last seen:\n{last}"))?;
    println!(
        "ferro up --nodes {NODES}: {NODES} Ready nodes {:.1?} after the start",
        begin.elapsed()
    );
    let addresses: BTreeMap<String, String> = rows
        .iter()
        .map(|r| (r["NAME"].clone(), r["ADDRESS"].clone()))
        .collect();
    for i in 1..=NODES {
        let netns = cloud.node_netns(i);
        // With Open vSwitch the address sits on br-phy, which holds underlay0 as a port.
        let device = if cloud.options().driver == "ovs" {
            "br-phy"
        } else {
            "underlay0"
        };
        let underlay = address_in(&netns, device)?;
        ensure!(
            underlay.starts_with("198.1"),
            "node-{i}'s underlay address {underlay} is not in 198.18.0.0/15"
        );
        ensure!(
            addresses.get(&format!("node-{i}")) == Some(&underlay),
            "node-{i} should be at {underlay}: {addresses:?}"
        );
        // The agent runs inside its node's namespace.
        let agent = pidfile(&data_dir.join(format!("run/agent-node-{i}.pid")))?;
        ensure!(
            netns_of(agent)? == netns_id(&netns)?,
            "the agent of node-{i} (pid {agent}) is not in {netns}"
        );
        // So does its switch, when Open vSwitch is installed.
        if Path::new("/usr/sbin/ovs-vswitchd").exists() {
            let ovs = data_dir.join(format!("nodes/node-{i}/ovs"));
            for daemon in ["ovsdb-server", "ovs-vswitchd"] {
                let pid = pidfile(&ovs.join(format!("{daemon}.pid")))?;
                ensure!(
                    netns_of(pid)? == netns_id(&netns)?,
                    "{daemon} of node-{i} (pid {pid}) is not in {netns}"
                );
            }
        }
    }
    let objects = host_objects(&prefix);
    ensure!(
        objects.contains(&format!("link {prefix}-ul"))
            && objects.contains(&format!("netns {prefix}-underlay"))
            && objects.contains(&format!("netns {prefix}-outside")),
        "missing host objects: {objects:?}"
    );

    // `ferro down` removes it all.
    cloud.run(["down", "--data-dir", &data_dir.display().to_string()])?;
    ensure!(
        cloud.wait_supervisor_exit(Duration::from_secs(60))?,
        "ferro up did not exit 0 after ferro down"
    );
    let left = cloud.wait_no_processes(Duration::from_secs(30));
    ensure!(left.is_empty(), "processes left after ferro down: {left:?}");
    ensure!(
        host_objects(&prefix).is_empty(),
        "host objects left after ferro down: {:?}",
        host_objects(&prefix)
    );

    // Up again on the same directory, then SIGKILL: the supervisor's children die with
    // it, the namespaces and switches stay (recorded in topology.json) …
    cloud.launch()?;
    wait_for("3 nodes again", SOON, || {
        let rows = table(&cloud.run(["get", "nodes"])?);
        Ok((rows.iter().filter(|r| r["READY"] == "True").count() == NODES as usize).then_some(()))
    })?;
    cloud.kill_supervisor()?;
    if !std::path::Path::new(&data_dir.join("topology.json")).exists() {
        bail!("no topology.json after a SIGKILL of ferro up");
    }
    ensure!(
        !host_objects(&prefix).is_empty(),
        "the namespaces went with a SIGKILLed ferro up; nothing left to test"
    );
    // … and dropping the Cloud (`ferro down` from the record) removes them.
    drop(cloud);
    let left = switches_and_agents(&data_dir);
    ensure!(
        left.is_empty(),
        "left after the Cloud was dropped: {left:?}"
    );
    ensure!(
        host_objects(&prefix).is_empty(),
        "host objects left after the Cloud was dropped: {:?}",
        host_objects(&prefix)
    );
    Ok(())
}

#[test]
fn linux_bridge_nodes_run_without_a_switch_and_a_taken_prefix_is_refused() -> anyhow::Result<()> {
    let options = Options {
        nodes: 2,
        driver: "linuxbridge".into(),
        ..Options::default()
    };
    let prefix = options.prefix.clone();
    let cloud = Cloud::start_with(options)?;
    let data_dir = cloud.data_dir().to_owned();
    wait_for("2 Ready nodes", SOON, || {
        let rows = table(&cloud.run(["get", "nodes"])?);
        Ok((rows.iter().filter(|r| r["READY"] == "True").count() == 2).then_some(()))
    })?;
    let processes = processes_naming(&data_dir);
    let agents: Vec<&(u32, String)> = processes
        .iter()
        .filter(|(_, c)| c.contains(" agent "))
        .collect();
    ensure!(agents.len() == 2, "two agents expected: {processes:?}");
    ensure!(
        agents
            .iter()
            .all(|(_, c)| c.contains("--network-driver linuxbridge") && !c.contains("--ovsdb")),
        "agents not started for linuxbridge: {agents:?}"
    );
    ensure!(
        !processes.iter().any(|(_, c)| c.contains("ovs")),
        "a switch instance runs with linuxbridge: {processes:?}"
    );

    // A second cloud with the same prefix is refused, and removes nothing of the first.
    let scratch = tempfile::tempdir()?;
    let second = std::process::Command::new(ferro_binary()?)
        .arg("up")
        .arg("--data-dir")
        .arg(scratch.path().join("data"))
        .args(["--api-addr", &format!("127.0.0.1:{}", free_port()?)])
        .args(["--nodes", "2", "--network-driver", "linuxbridge"])
        .args(["--name-prefix", &prefix])
        .env("FERRO_CONFIG", scratch.path().join("config.yaml"))
        .stdin(std::process::Stdio::null())
        .output()?;
    ensure!(
        !second.status.success(),
        "a second cloud with the prefix {prefix} started"
    );
    let error = String::from_utf8_lossy(&second.stderr);
    ensure!(error.contains("exists already"), "{error}");
    ensure!(
        host_objects(&prefix).contains(&format!("netns {prefix}-node-1")),
        "the second cloud removed the first one's namespaces: {:?}",
        host_objects(&prefix)
    );
    let rows = table(&cloud.run(["get", "nodes"])?);
    ensure!(rows.iter().filter(|r| r["READY"] == "True").count() == 2);
    drop(cloud);
    ensure!(
        host_objects(&prefix).is_empty(),
        "host objects left: {:?}",
        host_objects(&prefix)
    );
    Ok(())
}
