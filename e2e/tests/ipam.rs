//! IPAM end to end: `ferro up` with a real etcd runs the controllers; a network from
//! `manifests/` and ports applied through the CLI get their addresses (visible in
//! `ferro get ports -o wide`), each held by a claim; deleting the ports removes the claims.
//! The network's own DHCP Port (`private-dhcp`, made by the network controller) holds one
//! address and MAC besides.

use std::{collections::HashSet, net::Ipv4Addr, path::Path, time::Duration};

use anyhow::Context;
use ferro_e2e::{Cloud, table, wait_for};

/// How long any one step may take.
const WAIT: Duration = Duration::from_secs(90);

/// Three ports on the example stack's private network (manifests/network.yaml).
const PORTS: &str = r#"
apiVersion: ferro/v1
kind: Port
metadata:
  name: e2e-port-1
spec:
  network: private
---
apiVersion: ferro/v1
kind: Port
metadata:
  name: e2e-port-2
spec:
  network: private
---
apiVersion: ferro/v1
kind: Port
metadata:
  name: e2e-port-3
spec:
  network: private
  fixedIps:
  - subnet: private-v4
    ipAddress: 10.0.1.123
"#;

#[test]
fn ports_get_addresses_and_their_claims_go_with_them() -> anyhow::Result<()> {
    let cloud = Cloud::start()?;
    let network = Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/network.yaml");
    let applied = cloud.run(["apply", "-f", network.to_str().context("path")?])?;
    assert!(applied.contains("network/private"), "{applied}");
    let ports = cloud.data_dir().join("../e2e-ports.yaml");
    std::fs::write(&ports, PORTS)?;
    cloud.run(["apply", "-f", ports.to_str().context("path")?])?;

    let rows = wait_for(
        "three addressed ports in `ferro get ports -o wide`",
        WAIT,
        || {
            let rows: Vec<_> = table(&cloud.run(["get", "ports", "-o", "wide"])?)
                .into_iter()
                .filter(|r| r["NAME"].starts_with("e2e-port-"))
                .collect();
            let addressed = rows
                .iter()
                .filter(|r| !r["ADDRESSES"].is_empty() && !r["MAC"].is_empty())
                .count();
            Ok((rows.len() == 3 && addressed == 3).then_some(rows))
        },
    )?;
    let mut addresses = HashSet::new();
    let mut macs = HashSet::new();
    for row in &rows {
        let ip: Ipv4Addr = row["ADDRESSES"]
            .parse()
            .with_context(|| format!("one IPv4 address: {row:?}"))?;
        let host = ip.octets()[3];
        assert!(
            ip.octets()[..3] == [10, 0, 1] && (10..=200).contains(&host),
            "{ip} is outside the allocation pool"
        );
        assert!(addresses.insert(ip), "{ip} handed out twice");
        assert!(
            macs.insert(row["MAC"].clone()),
            "MAC {} handed out twice",
            row["MAC"]
        );
        if row["NAME"] == "e2e-port-3" {
            assert_eq!(ip, Ipv4Addr::new(10, 0, 1, 123), "the fixed IP is honoured");
        }
    }
    // One claim per value, visible like any other object. (A spare claimed from a cache
    // that had not yet seen a Port's recorded decision is released on its next pass.)
    wait_for("one claim per address and MAC", WAIT, || {
        let ips = table(&cloud.run(["get", "ipaddresses"])?).len();
        let macs = table(&cloud.run(["get", "macaddresses"])?).len();
        Ok((ips == 4 && macs == 4).then_some(()))
    })?;
    let dhcp = table(&cloud.run(["get", "port", "private-dhcp", "-o", "wide"])?);
    assert!(
        dhcp.len() == 1 && !dhcp[0]["ADDRESSES"].is_empty(),
        "the network's DHCP port is addressed: {dhcp:?}"
    );

    cloud.run(["delete", "-f", ports.to_str().context("path")?])?;
    wait_for("the claims gone with their ports", WAIT, || {
        let ips = table(&cloud.run(["get", "ipaddresses"])?).len();
        let macs = table(&cloud.run(["get", "macaddresses"])?).len();
        Ok((ips == 1 && macs == 1).then_some(()))
    })?;
    // Deleting the network takes its DHCP port and the last claims with it.
    cloud.run(["delete", "-f", network.to_str().context("path")?])?;
    wait_for("the network, its DHCP port and claims gone", WAIT, || {
        let ports = table(&cloud.run(["get", "ports"])?).len();
        let ips = table(&cloud.run(["get", "ipaddresses"])?).len();
        Ok((ports == 0 && ips == 0).then_some(()))
    })?;
    Ok(())
}

#[test]
fn tables_are_cut_at_their_columns() {
    let text = "NAME         NETWORK   MAC                 ADDRESSES\nweb-1        private   fa:16:3e:00:00:01   10.0.1.10\nweb-2        private   <none>              <none>\n";
    let rows = table(text);
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0]["ADDRESSES"], "10.0.1.10");
    assert_eq!(rows[0]["MAC"], "fa:16:3e:00:00:01");
    assert_eq!(rows[1]["MAC"], "", "<none> is an empty cell");
    assert_eq!(rows[1]["ADDRESSES"], "");
    assert!(table("").is_empty());
}
