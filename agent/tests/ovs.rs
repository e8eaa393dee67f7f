//! The Open vSwitch driver against real Open vSwitch (userspace datapath where there is no
//! kernel module), and the OVSDB client against a real `ovsdb-server`. Needs root and
//! `openvswitch-switch` (`scripts/install-host-deps.sh`).
//!
//! Every test runs its own private OVS instance inside a network namespace it creates, so
//! tests neither see each other's bridges nor leave devices in the host's namespace; the
//! [`Lab`] guard stops the daemons by PID and deletes the namespaces and the directory when
//! the test ends, passed or failed. Traffic only flows between namespaces the test made.

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde_json::json;

use ferro_agent::switch::ovs::OvsSwitch;
use ferro_agent::switch::ovs_instance::OvsInstance;
use ferro_agent::switch::ovsdb::{Op, OvsdbClient, OvsdbError};
use ferro_agent::switch::{
    ATTACHED_MAC, DatapathType, FERRO_OWNER, FlowCookie, FlowSpec, IFACE_ID, PortKind, PortSpec,
    Switch, SwitchError, TunnelKey, VM_UUID,
};

static NEXT_LAB: AtomicU32 = AtomicU32::new(0);

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

/// A private OVS instance in a namespace of its own, and namespaces standing for machines
/// plugged into it. Dropping it removes everything.
struct Lab {
    dir: tempfile::TempDir,
    node: String,
    namespaces: Vec<String>,
    instance: OvsInstance,
    switch: OvsSwitch,
}

impl Lab {
    async fn new() -> Result<Lab> {
        let id = format!(
            "{}-{}",
            std::process::id(),
            NEXT_LAB.fetch_add(1, Ordering::Relaxed)
        );
        // Short: the bridges' management sockets live in it.
        let dir = tempfile::Builder::new()
            .prefix("fovs")
            .tempdir_in("/tmp")
            .context("temp dir")?;
        let node = format!("ferro-test-ovs-{id}");
        let instance = OvsInstance::new(dir.path()).in_netns(&node);
        let switch = OvsSwitch::new(instance.switch_config());
        // The guard exists before anything is made, so a failure below still cleans up.
        let mut lab = Lab {
            dir,
            node: node.clone(),
            namespaces: Vec::new(),
            instance,
            switch,
        };
        lab.add_netns(&node)?;
        run("ip", &["-n", &node, "link", "set", "lo", "up"])?;
        lab.instance.start().await.context("start OVS")?;
        Ok(lab)
    }

    fn add_netns(&mut self, name: &str) -> Result<()> {
        run("ip", &["netns", "add", name])?;
        self.namespaces.push(name.to_owned());
        Ok(())
    }

    /// A namespace standing for a machine, with one end of a veth pair inside as `eth0`
    /// (address `cidr`) and the other end (`port`) in the node's namespace, ready to be
    /// plugged into the switch.
    fn machine(&mut self, label: &str, port: &str, cidr: &str) -> Result<String> {
        let netns = format!("{}-{label}", self.node);
        self.add_netns(&netns)?;
        run(
            "ip",
            &[
                "link", "add", port, "netns", &self.node, "type", "veth", "peer", "name", "eth0",
                "netns", &netns,
            ],
        )?;
        // The userspace datapath does not fill in checksums a veth leaves to offload.
        in_netns(&self.node, &["ethtool", "-K", port, "tx", "off"])?;
        in_netns(&netns, &["ethtool", "-K", "eth0", "tx", "off"])?;
        run("ip", &["-n", &self.node, "link", "set", port, "up"])?;
        run("ip", &["-n", &netns, "addr", "add", cidr, "dev", "eth0"])?;
        run("ip", &["-n", &netns, "link", "set", "eth0", "up"])?;
        run("ip", &["-n", &netns, "link", "set", "lo", "up"])?;
        Ok(netns)
    }

    /// `ovs-vsctl` on this instance: what an operator would run.
    fn vsctl(&self, args: &[&str]) -> Result<String> {
        let db = format!("--db=unix:{}", self.instance.db_socket().display());
        let mut all = vec![db.as_str()];
        all.extend_from_slice(args);
        Ok(run("ovs-vsctl", &all)?.trim().to_owned())
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Err(e) = self.instance.stop() {
            eprintln!("stopping OVS in {}: {e}", self.dir.path().display());
        }
        for netns in self.namespaces.iter().rev() {
            let _ = run("ip", &["netns", "del", netns]);
        }
    }
}

fn tap_spec(name: &str, kind: PortKind, tag: Option<u16>) -> PortSpec {
    PortSpec {
        bridge: "br-int".into(),
        name: name.into(),
        kind,
        tag,
        external_ids: BTreeMap::from([
            (IFACE_ID.to_owned(), format!("port-{name}")),
            (ATTACHED_MAC.to_owned(), "52:54:00:12:34:56".to_owned()),
            (VM_UUID.to_owned(), "server-1".to_owned()),
            (FERRO_OWNER.to_owned(), format!("port-{name}")),
        ]),
    }
}

/// Pings `to` from inside `from`, `count` times, one second each at most; whether any
/// answer came. Busybox's ping where there is no other (it comes with the test guest's
/// tools).
fn ping(from: &str, to: &str, count: u32) -> bool {
    let count = count.to_string();
    let mut args = vec!["ping", "-c", &count, "-W", "1", to];
    if which("ping").is_none() {
        args.insert(0, "busybox");
    }
    in_netns(from, &args).is_ok()
}

fn which(program: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(program))
            .find(|candidate| candidate.is_file())
    })
}

/// Whether `from` gets an answer from `to` within a few tries (the first packets may go
/// while the switch still learns addresses).
fn pings(from: &str, to: &str) -> bool {
    (0..4).any(|_| ping(from, to, 1))
}

#[tokio::test]
async fn bridges_get_the_datapath_this_host_runs() -> Result<()> {
    let lab = Lab::new().await?;
    let expected = if std::path::Path::new("/sys/module/openvswitch").exists() {
        DatapathType::System
    } else {
        DatapathType::Netdev
    };
    assert_eq!(lab.switch.datapath_type(), expected);

    let br_int = lab.switch.ensure_bridge("br-int").await?;
    assert_eq!(br_int.datapath_type, expected.as_str());
    assert_eq!(lab.switch.ensure_bridge("br-int").await?, br_int);
    lab.switch.ensure_bridge("br-tun").await?;
    let names: Vec<_> = lab
        .switch
        .list_bridges()
        .await?
        .into_iter()
        .map(|b| b.name)
        .collect();
    assert_eq!(names, ["br-int", "br-tun"]);
    // What an operator sees, and the bridge's device in the node's namespace.
    assert_eq!(lab.vsctl(&["list-br"])?, "br-int\nbr-tun");
    assert_eq!(
        lab.vsctl(&["get", "Bridge", "br-int", "datapath_type"])?,
        expected.as_str()
    );
    in_netns(&lab.node, &["ip", "link", "show", "br-int"])?;
    // Bridges' own ports are not listed as ports.
    assert!(lab.switch.list_ports().await?.is_empty());

    lab.switch.remove_bridge("br-tun").await?;
    lab.switch.remove_bridge("br-tun").await?;
    assert_eq!(lab.vsctl(&["list-br"])?, "br-int");
    Ok(())
}

#[tokio::test]
async fn ports_carry_their_tags_kinds_and_external_ids() -> Result<()> {
    let mut lab = Lab::new().await?;
    let missing = lab
        .switch
        .ensure_port(&tap_spec("int0", PortKind::Internal, Some(10)))
        .await;
    assert!(
        matches!(missing, Err(SwitchError::NoSuchBridge(ref b)) if b == "br-int"),
        "{missing:?}"
    );
    lab.switch.ensure_bridge("br-int").await?;
    lab.machine("a", "veth-a", "10.0.0.1/24")?;

    let internal = tap_spec("int0", PortKind::Internal, Some(10));
    let veth = tap_spec("veth-a", PortKind::System, Some(20));
    let made_internal = lab.switch.ensure_port(&internal).await?;
    let made_veth = lab.switch.ensure_port(&veth).await?;
    assert!(made_internal.matches(&internal), "{made_internal:?}");
    assert!(made_veth.matches(&veth), "{made_veth:?}");
    assert!(
        made_veth.ofport.is_some() && made_veth.error.is_none(),
        "{made_veth:?}"
    );

    let listed = lab.switch.list_ports().await?;
    assert_eq!(listed, vec![made_internal.clone(), made_veth.clone()]);
    // As an operator finds them.
    assert_eq!(lab.vsctl(&["list-ports", "br-int"])?, "int0\nveth-a");
    assert_eq!(lab.vsctl(&["get", "Port", "veth-a", "tag"])?, "20");
    assert_eq!(
        lab.vsctl(&["get", "Interface", "int0", "external_ids:iface-id"])?,
        "port-int0"
    );
    assert_eq!(
        lab.vsctl(&["get", "Interface", "int0", "type"])?,
        "internal"
    );
    // The switch made the internal port's device in its namespace.
    in_netns(&lab.node, &["ip", "link", "show", "int0"])?;

    // Ensuring again changes nothing; a new tag converges in place.
    assert_eq!(lab.switch.ensure_port(&veth).await?, made_veth);
    let retagged = PortSpec {
        tag: Some(30),
        ..veth.clone()
    };
    let after = lab.switch.ensure_port(&retagged).await?;
    assert_eq!(after.tag, Some(30));
    assert_eq!(after.ofport, made_veth.ofport);
    assert_eq!(lab.switch.list_ports().await?.len(), 2);
    assert_eq!(lab.vsctl(&["get", "Port", "veth-a", "tag"])?, "30");

    // A device that does not exist: the port is there, with the switch's complaint.
    let ghost = lab
        .switch
        .ensure_port(&tap_spec("tapghost", PortKind::System, Some(10)))
        .await?;
    assert!(ghost.error.is_some(), "{ghost:?}");

    lab.switch.remove_port("veth-a").await?;
    lab.switch.remove_port("veth-a").await?;
    lab.switch.remove_port("tapghost").await?;
    let names: Vec<_> = lab
        .switch
        .list_ports()
        .await?
        .into_iter()
        .map(|p| p.name)
        .collect();
    assert_eq!(names, ["int0"]);
    assert_eq!(lab.vsctl(&["list-ports", "br-int"])?, "int0");

    // Asked for on another bridge, the port moves rather than being duplicated.
    lab.switch.ensure_bridge("br-tun").await?;
    let moved = PortSpec {
        bridge: "br-tun".into(),
        ..internal
    };
    lab.switch.ensure_port(&moved).await?;
    let ports = lab.switch.list_ports().await?;
    assert_eq!(ports.len(), 1, "{ports:?}");
    assert!(ports[0].matches(&moved), "{ports:?}");
    assert_eq!(lab.vsctl(&["port-to-br", "int0"])?, "br-tun");
    Ok(())
}

#[tokio::test]
async fn a_vxlan_port_has_its_options() -> Result<()> {
    let lab = Lab::new().await?;
    lab.switch.ensure_bridge("br-tun").await?;
    let kind = PortKind::Vxlan {
        remote_ip: "192.0.2.2".parse()?,
        key: TunnelKey::Vni(1042),
        local_ip: Some("192.0.2.1".parse()?),
    };
    let spec = PortSpec {
        bridge: "br-tun".into(),
        tag: None,
        ..tap_spec("vxlan-c0000202", kind.clone(), None)
    };
    let port = lab.switch.ensure_port(&spec).await?;
    assert_eq!(port.kind, kind);
    assert_eq!(
        lab.vsctl(&["get", "Interface", "vxlan-c0000202", "options"])?,
        r#"{key="1042", local_ip="192.0.2.1", remote_ip="192.0.2.2"}"#
    );
    assert_eq!(
        lab.vsctl(&["get", "Interface", "vxlan-c0000202", "type"])?,
        "vxlan"
    );

    // Tunnels keyed by flow, as br-tun's are; the change lands in place.
    let by_flow = PortSpec {
        kind: PortKind::Vxlan {
            remote_ip: "192.0.2.2".parse()?,
            key: TunnelKey::Flow,
            local_ip: None,
        },
        ..spec
    };
    let changed = lab.switch.ensure_port(&by_flow).await?;
    assert!(changed.matches(&by_flow), "{changed:?}");
    assert_eq!(lab.switch.list_ports().await?, vec![changed]);
    Ok(())
}

#[tokio::test]
async fn flows_are_added_dumped_replaced_and_removed_by_cookie() -> Result<()> {
    let lab = Lab::new().await?;
    lab.switch.ensure_bridge("br-int").await?;
    let (a, b) = (
        FlowCookie::for_owner("net-a"),
        FlowCookie::for_owner("net-b"),
    );
    let flow = |priority, matches: &str, actions: &str| FlowSpec {
        table: 0,
        priority,
        matches: matches.into(),
        actions: actions.into(),
    };
    lab.switch
        .add_flows(
            "br-int",
            a,
            &[
                flow(100, "dl_vlan=10", "drop"),
                FlowSpec {
                    table: 1,
                    ..flow(50, "ip,nw_dst=10.0.0.0/24", "NORMAL")
                },
            ],
        )
        .await?;
    lab.switch
        .add_flows("br-int", b, &[flow(100, "dl_vlan=20", "drop")])
        .await?;

    let of_a = lab.switch.dump_flows("br-int", Some(a)).await?;
    assert_eq!(of_a.len(), 2, "{of_a:?}");
    assert!(of_a.iter().all(|f| f.cookie == a));
    let routed = of_a.iter().find(|f| f.spec.table == 1).context("table 1")?;
    assert_eq!(routed.spec.priority, 50);
    assert_eq!(routed.spec.matches, "ip,nw_dst=10.0.0.0/24");
    assert_eq!(routed.spec.actions, "NORMAL");

    lab.switch
        .replace_flows("br-int", a, &[flow(200, "dl_vlan=11", "drop")])
        .await?;
    let of_a = lab.switch.dump_flows("br-int", Some(a)).await?;
    assert_eq!(of_a.len(), 1);
    assert_eq!(of_a[0].spec.matches, "dl_vlan=11");
    assert_eq!(lab.switch.dump_flows("br-int", Some(b)).await?.len(), 1);

    lab.switch.remove_flows("br-int", a).await?;
    lab.switch.remove_flows("br-int", a).await?;
    assert!(lab.switch.dump_flows("br-int", Some(a)).await?.is_empty());
    // b's flow and OVS's own NORMAL flow are untouched.
    let all = lab.switch.dump_flows("br-int", None).await?;
    assert_eq!(all.len(), 2, "{all:?}");
    assert!(
        all.iter()
            .any(|f| f.cookie == FlowCookie(0) && f.spec.actions == "NORMAL")
    );
    // A flow OVS cannot parse is an error, and a missing bridge says so.
    let bad = lab
        .switch
        .add_flows("br-int", a, &[flow(1, "no_such_field=1", "drop")])
        .await;
    assert!(matches!(bad, Err(SwitchError::Command { .. })), "{bad:?}");
    let missing = lab.switch.dump_flows("br-nope", None).await;
    assert!(
        matches!(missing, Err(SwitchError::NoSuchBridge(_))),
        "{missing:?}"
    );
    lab.switch.remove_flows("br-nope", a).await?;
    Ok(())
}

#[tokio::test]
async fn machines_on_the_same_tag_talk_and_on_different_tags_do_not() -> Result<()> {
    let mut lab = Lab::new().await?;
    lab.switch.ensure_bridge("br-int").await?;
    let a = lab.machine("a", "veth-a", "10.0.0.1/24")?;
    let b = lab.machine("b", "veth-b", "10.0.0.2/24")?;
    let c = lab.machine("c", "veth-c", "10.0.0.3/24")?;
    lab.switch
        .ensure_port(&tap_spec("veth-a", PortKind::System, Some(10)))
        .await?;
    lab.switch
        .ensure_port(&tap_spec("veth-b", PortKind::System, Some(10)))
        .await?;
    lab.switch
        .ensure_port(&tap_spec("veth-c", PortKind::System, Some(20)))
        .await?;

    let started = Instant::now();
    ensure!(pings(&a, "10.0.0.2"), "a cannot reach b on the same tag");
    ensure!(pings(&b, "10.0.0.1"), "b cannot reach a on the same tag");
    eprintln!("same tag: answered after {:?}", started.elapsed());
    if ping(&a, "10.0.0.3", 2) {
        bail!("a reaches c across VLAN tags");
    }

    // Retagging c into a's network joins them.
    lab.switch
        .ensure_port(&tap_spec("veth-c", PortKind::System, Some(10)))
        .await?;
    ensure!(
        pings(&c, "10.0.0.1"),
        "c cannot reach a once on the same tag"
    );
    // Unplugging b cuts it off.
    lab.switch.remove_port("veth-b").await?;
    if ping(&a, "10.0.0.2", 2) {
        bail!("a still reaches b after its port was removed");
    }
    Ok(())
}

#[tokio::test]
async fn the_ovsdb_client_speaks_to_a_real_server() -> Result<()> {
    let lab = Lab::new().await?;
    let client = OvsdbClient::connect(&lab.instance.db_socket()).await?;
    let dbs = client.list_dbs().await?;
    assert!(dbs.contains(&"Open_vSwitch".to_owned()), "{dbs:?}");
    assert_eq!(client.echo(json!(["ping", 1])).await?, json!(["ping", 1]));

    let select = Op::Select {
        table: "Open_vSwitch".into(),
        conditions: vec![],
        columns: Some(vec!["datapath_types".into()]),
    };
    let results = client.transact("Open_vSwitch", &[select]).await?;
    assert_eq!(results[0].rows.len(), 1);

    let bogus = Op::Select {
        table: "No_Such_Table".into(),
        conditions: vec![],
        columns: None,
    };
    let failed = client.transact("Open_vSwitch", &[bogus]).await;
    assert!(
        matches!(failed, Err(OvsdbError::OperationFailed { index: 0, .. })),
        "{failed:?}"
    );
    let unknown = client.request("no_such_method", json!([])).await;
    assert!(
        matches!(unknown, Err(OvsdbError::Rpc { .. })),
        "{unknown:?}"
    );
    // Many requests at once on one connection each get their own answer.
    let echoes = futures::future::join_all((0..20).map(|i| client.echo(json!([i])))).await;
    for (i, echo) in echoes.into_iter().enumerate() {
        assert_eq!(echo?, json!([i]));
    }

    // When the server goes, the client says so instead of hanging, and the driver
    // reconnects once it is back.
    lab.instance.stop()?;
    let gone = client.list_dbs().await;
    assert!(
        matches!(gone, Err(OvsdbError::Closed(_)) | Err(OvsdbError::Write(_))),
        "{gone:?}"
    );
    assert!(!client.is_open());
    assert!(lab.switch.list_bridges().await.is_err());
    lab.instance.start().await?;
    lab.switch.ensure_bridge("br-int").await?;
    Ok(())
}

#[tokio::test]
async fn an_instance_starts_once_and_stops_by_pid() -> Result<()> {
    let lab = Lab::new().await?;
    assert!(lab.instance.is_running());
    let pids = (
        lab.instance.pid("ovsdb-server"),
        lab.instance.pid("ovs-vswitchd"),
    );
    lab.instance.start().await?;
    assert_eq!(
        (
            lab.instance.pid("ovsdb-server"),
            lab.instance.pid("ovs-vswitchd")
        ),
        pids
    );
    // The bridge survives a restart of the instance: the database is on disk.
    lab.switch.ensure_bridge("br-int").await?;
    lab.instance.stop()?;
    assert!(!lab.instance.is_running());
    for pid in [pids.0, pids.1].into_iter().flatten() {
        let deadline = Instant::now() + Duration::from_secs(2);
        while std::path::Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    lab.instance.stop()?;
    lab.instance.start().await?;
    let names: Vec<_> = lab
        .switch
        .list_bridges()
        .await?
        .into_iter()
        .map(|b| b.name)
        .collect();
    assert_eq!(names, ["br-int"]);
    Ok(())
}

#[tokio::test]
async fn patch_ports_join_bridges_and_bridges_keep_records() -> Result<()> {
    let lab = Lab::new().await?;
    for (bridge, name, peer) in [
        ("br-int", "patch-tun", "patch-int"),
        ("br-tun", "patch-int", "patch-tun"),
    ] {
        lab.switch.ensure_bridge(bridge).await?;
        let spec = PortSpec {
            bridge: bridge.into(),
            name: name.into(),
            kind: PortKind::Patch { peer: peer.into() },
            tag: None,
            external_ids: BTreeMap::new(),
        };
        let port = lab.switch.ensure_port(&spec).await?;
        assert!(port.matches(&spec), "{port:?}");
        assert_eq!(lab.vsctl(&["get", "Interface", name, "type"])?, "patch");
        assert_eq!(
            lab.vsctl(&["get", "Interface", name, "options:peer"])?,
            peer
        );
    }

    // Once both ends exist, the userspace datapath takes them up.
    let ports = lab.switch.list_ports().await?;
    assert_eq!(ports.len(), 2);
    for port in ports {
        assert!(port.ofport.is_some() && port.error.is_none(), "{port:?}");
    }

    let changes = |pairs: &[(&str, Option<&str>)]| -> BTreeMap<String, Option<String>> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.map(str::to_owned)))
            .collect()
    };
    lab.switch
        .update_bridge_external_ids(
            "br-int",
            &changes(&[("ferro-a", Some("1")), ("ferro-b", Some("2"))]),
        )
        .await?;
    let bridge = lab
        .switch
        .update_bridge_external_ids(
            "br-int",
            &changes(&[("ferro-a", None), ("ferro-b", Some("3"))]),
        )
        .await?;
    assert_eq!(
        bridge.external_ids,
        BTreeMap::from([("ferro-b".to_owned(), "3".to_owned())])
    );
    assert_eq!(
        lab.vsctl(&["get", "Bridge", "br-int", "external_ids"])?,
        r#"{ferro-b="3"}"#
    );
    let missing = lab
        .switch
        .update_bridge_external_ids("br-nope", &changes(&[("a", None)]))
        .await;
    assert!(
        matches!(missing, Err(SwitchError::NoSuchBridge(_))),
        "{missing:?}"
    );
    Ok(())
}
