//! The netlink [`Links`] driver against the real kernel: namespaces, taps, veths, bridges,
//! VXLAN devices, FDB entries, addresses, aliases and checksum offload. Needs root.
//!
//! Every test works inside network namespaces it makes (named with the test process's id
//! and a counter, so parallel runs never collide) and checks what it did with `ip`,
//! `bridge` and `ethtool`, as an operator would. The [`Scratch`] guard deletes those
//! namespaces, and the few devices made in the test's own namespace, when the test ends,
//! passed or failed.

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context, Result, ensure};

use ferro_agent::links::netlink::NetlinkLinks;
use ferro_agent::links::{
    Address, FdbEntry, LinkKind, Links, LinksError, MacAddress, VXLAN_PORT, VethPeer, VxlanInfo,
    VxlanSpec,
};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A name no other test (or test run) uses: `prefix`, the process id, a counter.
fn unique(prefix: &str) -> String {
    format!(
        "{prefix}{}{}",
        std::process::id() % 10000,
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

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

/// What the test made; dropping it deletes all of it with `ip`, whatever the code under
/// test did.
#[derive(Default)]
struct Scratch {
    namespaces: Vec<String>,
    host_links: Vec<String>,
}

impl Scratch {
    /// Makes a namespace through the driver, and records it for deletion.
    async fn namespace(&mut self, links: &NetlinkLinks) -> Result<String> {
        let name = unique("ferro-test-links-");
        self.namespaces.push(name.clone());
        links.create_namespace(&name).await?;
        Ok(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        for link in &self.host_links {
            let _ = run("ip", &["link", "del", link]);
        }
        for netns in self.namespaces.iter().rev() {
            let _ = run("ip", &["netns", "del", netns]);
        }
    }
}

fn ip_in(netns: &str, args: &[&str]) -> Result<String> {
    let mut all = vec!["-n", netns];
    all.extend_from_slice(args);
    run("ip", &all)
}

fn names(links: &[ferro_agent::links::Link]) -> Vec<&str> {
    links.iter().map(|l| l.name.as_str()).collect()
}

#[tokio::test]
async fn namespaces_are_made_as_ip_netns_makes_them() -> Result<()> {
    let host = NetlinkLinks::new();
    let mut scratch = Scratch::default();
    let ns = scratch.namespace(&host).await?;
    host.create_namespace(&ns).await?;

    assert!(
        run("ip", &["netns", "list"])?
            .lines()
            .any(|l| l.split_whitespace().next() == Some(&ns))
    );
    assert!(host.list_namespaces().await?.contains(&ns));
    // A fresh namespace holds only loopback, and it is up.
    assert!(ip_in(&ns, &["link", "show", "lo"])?.contains(",UP,"));
    let inside = host.namespace(&ns);
    let links = inside.list_links().await?;
    assert_eq!(names(&links), ["lo"]);
    assert!(links[0].up);
    assert_eq!(inside.target(), Some(ns.as_str()));

    host.delete_namespace(&ns).await?;
    host.delete_namespace(&ns).await?;
    assert!(!run("ip", &["netns", "list"])?.contains(&ns));
    assert!(!host.list_namespaces().await?.contains(&ns));
    assert!(matches!(
        inside.list_links().await,
        Err(LinksError::NoSuchNamespace(_))
    ));
    Ok(())
}

#[tokio::test]
async fn a_namespace_whose_creation_died_half_way_is_finished() -> Result<()> {
    let host = NetlinkLinks::new();
    let mut scratch = Scratch::default();
    let ns = unique("ferro-test-links-");
    scratch.namespaces.push(ns.clone());
    // What a crash between creating the file and mounting the namespace leaves.
    let path = std::path::Path::new("/run/netns").join(&ns);
    std::fs::create_dir_all("/run/netns")?;
    std::fs::write(&path, b"")?;
    assert!(host.namespace(&ns).list_links().await.is_err());

    host.create_namespace(&ns).await?;
    assert_eq!(names(&host.namespace(&ns).list_links().await?), ["lo"]);
    assert!(ip_in(&ns, &["link", "show", "lo"])?.contains(",UP,"));
    host.delete_namespace(&ns).await?;
    assert!(!path.exists());
    Ok(())
}

#[tokio::test]
async fn taps_persist_with_the_settings_they_are_given() -> Result<()> {
    let host = NetlinkLinks::new();
    let mut scratch = Scratch::default();
    let ns = scratch.namespace(&host).await?;
    let node = NetlinkLinks::in_namespace(&ns);

    node.ensure_tap("tap0").await?;
    node.ensure_tap("tap0").await?;
    let details = ip_in(&ns, &["-d", "link", "show", "tap0"])?;
    assert!(details.contains("tun type tap"), "{details}");
    assert!(
        details.contains("persist on") || !details.contains("persist off"),
        "{details}"
    );

    let mac: MacAddress = "fa:16:3e:12:34:56".parse()?;
    node.set_mtu("tap0", 1450).await?;
    node.set_mac("tap0", mac).await?;
    node.set_alias("tap0", Some("port-3f2a9c41-d0e7")).await?;
    node.set_up("tap0", true).await?;
    let tap = node.link("tap0").await?.context("tap0 listed")?;
    assert_eq!(tap.kind, LinkKind::Tun);
    assert_eq!(tap.mtu, 1450);
    assert_eq!(tap.mac, Some(mac));
    assert_eq!(tap.alias.as_deref(), Some("port-3f2a9c41-d0e7"));
    assert!(tap.up);
    let shown = ip_in(&ns, &["link", "show", "tap0"])?;
    assert!(shown.contains("mtu 1450"), "{shown}");
    assert!(shown.contains("fa:16:3e:12:34:56"), "{shown}");
    assert!(shown.contains("alias port-3f2a9c41-d0e7"), "{shown}");

    node.set_alias("tap0", None).await?;
    node.set_up("tap0", false).await?;
    let tap = node.link("tap0").await?.context("tap0 listed")?;
    assert_eq!(tap.alias, None);
    assert!(!tap.up);

    node.delete_link("tap0").await?;
    node.delete_link("tap0").await?;
    assert_eq!(node.link("tap0").await?, None);
    assert!(ip_in(&ns, &["link", "show", "tap0"]).is_err());
    Ok(())
}

#[tokio::test]
async fn a_tap_in_the_agents_own_namespace() -> Result<()> {
    let host = NetlinkLinks::new();
    let mut scratch = Scratch::default();
    let tap = unique("fltap");
    scratch.host_links.push(tap.clone());
    host.ensure_tap(&tap).await?;
    assert!(run("ip", &["-d", "link", "show", &tap])?.contains("tun type tap"));
    assert!(
        host.list_links()
            .await?
            .iter()
            .any(|l| l.name == tap && l.kind == LinkKind::Tun)
    );
    host.delete_link(&tap).await?;
    assert!(run("ip", &["link", "show", &tap]).is_err());
    Ok(())
}

#[tokio::test]
async fn veth_peers_land_in_their_namespace_with_tx_checksum_off() -> Result<()> {
    let host = NetlinkLinks::new();
    let mut scratch = Scratch::default();
    let node_ns = scratch.namespace(&host).await?;
    let machine_ns = scratch.namespace(&host).await?;
    let node = NetlinkLinks::in_namespace(&node_ns);
    let machine = host.namespace(&machine_ns);
    let peer = VethPeer {
        name: "eth0".into(),
        namespace: Some(machine_ns.clone()),
    };

    node.ensure_veth("vport0", &peer).await?;
    let first = node.link("vport0").await?.context("vport0")?.index;
    node.ensure_veth("vport0", &peer).await?;
    assert_eq!(node.link("vport0").await?.context("vport0")?.index, first);
    assert_eq!(
        node.link("vport0").await?.context("vport0")?.kind,
        LinkKind::Veth
    );
    let eth0 = machine.link("eth0").await?.context("eth0 in the machine")?;
    assert_eq!(eth0.kind, LinkKind::Veth);
    assert!(ip_in(&machine_ns, &["link", "show", "eth0"])?.contains("@if"));
    assert!(ip_in(&node_ns, &["link", "show", "eth0"]).is_err());

    // A peer deleted by hand: the pair is made again.
    ip_in(&machine_ns, &["link", "del", "eth0"])?;
    node.ensure_veth("vport0", &peer).await?;
    assert!(machine.link("eth0").await?.is_some());

    assert!(machine.tx_checksum("eth0").await?);
    machine.disable_tx_checksum("eth0").await?;
    machine.disable_tx_checksum("eth0").await?;
    assert!(!machine.tx_checksum("eth0").await?);
    let features = run(
        "ip",
        &["netns", "exec", &machine_ns, "ethtool", "-k", "eth0"],
    )?;
    assert!(features.contains("tx-checksumming: off"), "{features}");
    assert!(node.tx_checksum("vport0").await?);

    // A pair in one namespace.
    node.ensure_veth(
        "a0",
        &VethPeer {
            name: "b0".into(),
            namespace: None,
        },
    )
    .await?;
    assert!(node.link("b0").await?.is_some());

    node.delete_link("vport0").await?;
    assert_eq!(machine.link("eth0").await?, None);
    node.delete_link("b0").await?;
    assert_eq!(node.link("a0").await?, None);
    Ok(())
}

#[tokio::test]
async fn bridges_take_ports_and_let_them_go() -> Result<()> {
    let host = NetlinkLinks::new();
    let mut scratch = Scratch::default();
    let ns = scratch.namespace(&host).await?;
    let node = NetlinkLinks::in_namespace(&ns);

    node.ensure_bridge("brq1").await?;
    node.ensure_bridge("brq1").await?;
    node.ensure_tap("tap1").await?;
    node.set_master("tap1", Some("brq1")).await?;
    node.set_master("tap1", Some("brq1")).await?;
    assert_eq!(
        node.link("brq1").await?.context("brq1")?.kind,
        LinkKind::Bridge
    );
    assert_eq!(
        node.link("tap1").await?.context("tap1")?.master.as_deref(),
        Some("brq1")
    );
    assert!(ip_in(&ns, &["link", "show", "tap1"])?.contains("master brq1"));
    let listed = node.list_links().await?;
    let tap = listed
        .iter()
        .find(|l| l.name == "tap1")
        .context("tap1 listed")?;
    assert_eq!(tap.master.as_deref(), Some("brq1"));

    node.set_master("tap1", None).await?;
    assert_eq!(node.link("tap1").await?.context("tap1")?.master, None);
    assert!(!ip_in(&ns, &["link", "show", "tap1"])?.contains("master"));

    assert!(matches!(
        node.ensure_bridge("tap1").await,
        Err(LinksError::WrongKind { .. })
    ));
    assert!(matches!(
        node.set_master("tap1", Some("nope")).await,
        Err(LinksError::NoSuchDevice(_))
    ));
    assert!(matches!(
        node.set_up("nope", true).await,
        Err(LinksError::NoSuchDevice(_))
    ));
    node.delete_link("brq1").await?;
    assert!(ip_in(&ns, &["link", "show", "brq1"]).is_err());
    Ok(())
}

#[tokio::test]
async fn vxlan_devices_flood_to_exactly_their_fdb_entries() -> Result<()> {
    let host = NetlinkLinks::new();
    let mut scratch = Scratch::default();
    let ns = scratch.namespace(&host).await?;
    let node = NetlinkLinks::in_namespace(&ns);
    node.ensure_veth(
        "under0",
        &VethPeer {
            name: "under1".into(),
            namespace: None,
        },
    )
    .await?;
    let local = Address {
        ip: "198.18.7.1".parse()?,
        prefix_len: 24,
    };
    node.add_address("under0", local).await?;
    node.set_up("under0", true).await?;

    let mut spec = VxlanSpec {
        name: "vxlan-1042".into(),
        vni: 1042,
        local: local.ip,
        underlay: "under0".into(),
        port: VXLAN_PORT,
        learning: true,
    };
    node.ensure_vxlan(&spec).await?;
    let first = node.link("vxlan-1042").await?.context("vxlan")?;
    node.ensure_vxlan(&spec).await?;
    assert_eq!(
        node.link("vxlan-1042").await?.context("vxlan")?.index,
        first.index
    );
    assert_eq!(
        first.kind,
        LinkKind::Vxlan(VxlanInfo {
            vni: 1042,
            local: Some(local.ip),
            underlay: Some("under0".into()),
            port: 4789,
            learning: true,
        })
    );
    let details = ip_in(&ns, &["-d", "link", "show", "vxlan-1042"])?;
    for wanted in [
        "vxlan id 1042",
        "local 198.18.7.1",
        "dev under0",
        "dstport 4789",
    ] {
        assert!(details.contains(wanted), "{wanted} in {details}");
    }
    assert!(!details.contains("nolearning"), "{details}");

    let a = FdbEntry::flood("198.18.7.2".parse()?);
    let b = FdbEntry::flood("198.18.7.3".parse()?);
    node.append_fdb("vxlan-1042", &a).await?;
    node.append_fdb("vxlan-1042", &b).await?;
    node.append_fdb("vxlan-1042", &a).await?;
    assert_eq!(node.list_fdb("vxlan-1042").await?, [a, b]);
    let fdb = run("bridge", &["-n", &ns, "fdb", "show", "dev", "vxlan-1042"])?;
    for wanted in [
        "00:00:00:00:00:00 dst 198.18.7.2 self permanent",
        "00:00:00:00:00:00 dst 198.18.7.3 self permanent",
    ] {
        assert!(fdb.contains(wanted), "{wanted} in {fdb}");
    }
    node.delete_fdb("vxlan-1042", &a).await?;
    node.delete_fdb("vxlan-1042", &a).await?;
    assert_eq!(node.list_fdb("vxlan-1042").await?, [b]);
    assert!(
        !run("bridge", &["-n", &ns, "fdb", "show", "dev", "vxlan-1042"])?.contains("198.18.7.2")
    );

    // On a bridge, the device's own entries are not Ferro's to list.
    node.ensure_bridge("brq2").await?;
    node.set_master("vxlan-1042", Some("brq2")).await?;
    node.set_up("vxlan-1042", true).await?;
    assert_eq!(node.list_fdb("vxlan-1042").await?, [b]);

    // Other settings: the device is made again.
    spec.learning = false;
    node.ensure_vxlan(&spec).await?;
    let remade = node.link("vxlan-1042").await?.context("vxlan")?;
    assert_ne!(remade.index, first.index);
    assert!(ip_in(&ns, &["-d", "link", "show", "vxlan-1042"])?.contains("nolearning"));
    assert!(node.list_fdb("vxlan-1042").await?.is_empty());
    assert!(
        node.ensure_vxlan(&VxlanSpec {
            vni: 0,
            ..spec.clone()
        })
        .await
        .is_err()
    );
    assert!(matches!(
        node.ensure_vxlan(&VxlanSpec {
            underlay: "nope".into(),
            ..spec
        })
        .await,
        Err(LinksError::NoSuchDevice(_))
    ));
    node.delete_link("vxlan-1042").await?;
    assert_eq!(node.link("vxlan-1042").await?, None);
    Ok(())
}

#[tokio::test]
async fn addresses_and_the_default_route() -> Result<()> {
    let host = NetlinkLinks::new();
    let mut scratch = Scratch::default();
    let ns = scratch.namespace(&host).await?;
    let node = NetlinkLinks::in_namespace(&ns);
    node.ensure_veth(
        "ns-1",
        &VethPeer {
            name: "ns-1p".into(),
            namespace: None,
        },
    )
    .await?;
    node.set_up("ns-1", true).await?;
    node.set_up("ns-1p", true).await?;

    let v4 = Address {
        ip: "10.0.0.2".parse()?,
        prefix_len: 24,
    };
    let v6 = Address {
        ip: "fd00:feed::2".parse()?,
        prefix_len: 64,
    };
    for address in [v4, v6, v4, v6] {
        node.add_address("ns-1", address).await?;
    }
    let found = node.list_addresses("ns-1").await?;
    assert!(found.contains(&v4) && found.contains(&v6), "{found:?}");
    let everywhere = node.list_all_addresses().await?;
    assert!(
        everywhere.contains(&("ns-1".to_owned(), v4)),
        "{everywhere:?}"
    );
    assert!(
        everywhere
            .iter()
            .any(|(device, a)| device == "lo" && a.ip.is_loopback())
    );
    let shown = ip_in(&ns, &["addr", "show", "dev", "ns-1"])?;
    assert!(shown.contains("inet 10.0.0.2/24"), "{shown}");
    assert!(shown.contains("inet6 fd00:feed::2/64"), "{shown}");

    node.add_default_route("10.0.0.1".parse()?).await?;
    node.add_default_route("10.0.0.1".parse()?).await?;
    assert!(ip_in(&ns, &["route", "show", "default"])?.contains("default via 10.0.0.1 dev ns-1"));
    node.add_default_route("10.0.0.254".parse()?).await?;
    let routes = ip_in(&ns, &["route", "show", "default"])?;
    assert!(
        routes.contains("via 10.0.0.254") && !routes.contains("via 10.0.0.1 "),
        "{routes}"
    );

    for address in [v4, v6, v4, v6] {
        node.delete_address("ns-1", address).await?;
    }
    let found = node.list_addresses("ns-1").await?;
    assert!(!found.contains(&v4) && !found.contains(&v6), "{found:?}");
    assert!(!ip_in(&ns, &["addr", "show", "dev", "ns-1"])?.contains("10.0.0.2"));
    node.delete_address("gone", v4).await?;
    Ok(())
}
