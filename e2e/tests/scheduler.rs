//! Placement end to end: `ferro up` with a real etcd runs the apiserver, the controllers
//! and this host's agent. The agent registers the Node and node lifecycle turns it Ready;
//! the example stack from `manifests/` is applied at once; the scheduler binds `web-1` to
//! the node and the server controller shows its address in `ferro get servers -o wide`.
//! `cordon` / `drain` / `uncordon` work on that node.
//!
//! The example image points at files that may not exist on this host, so the guest may
//! never run: this test checks placement and addresses, not the boot.

use std::{path::Path, time::Duration};

use anyhow::Context;
use ferro_e2e::{Cloud, table, wait_for};

/// How long any one step may take.
const WAIT: Duration = Duration::from_secs(120);

/// A server group and a Server that names it.
const GROUP: &str = r#"
apiVersion: ferro/v1
kind: ServerGroup
metadata:
  name: e2e-spread
spec:
  policy: SoftAntiAffinity
---
apiVersion: ferro/v1
kind: Server
metadata:
  name: e2e-member
spec:
  flavor: m1.tiny
  image: tiny
  serverGroup: e2e-spread
  networks:
  - network: private
"#;

#[test]
fn the_local_node_registers_and_web_1_is_placed_and_addressed() -> anyhow::Result<()> {
    let cloud = Cloud::start()?;
    let node = wait_for("the local node Ready in `ferro get nodes`", WAIT, || {
        let rows = table(&cloud.run(["get", "nodes"])?);
        Ok(rows
            .iter()
            .find(|r| r["READY"] == "True")
            .map(|r| r["NAME"].clone()))
    })?;

    let manifests = Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests");
    let applied = cloud.run(["apply", "-f", manifests.to_str().context("path")?])?;
    assert!(applied.contains("server/web-1"), "{applied}");

    let row = wait_for(
        "web-1 bound and addressed in `ferro get servers -o wide`",
        WAIT,
        || {
            let rows = table(&cloud.run(["get", "servers", "-o", "wide"])?);
            Ok(rows.into_iter().find(|r| {
                r["NAME"] == "web-1" && !r["NODE"].is_empty() && !r["ADDRESSES"].is_empty()
            }))
        },
    )?;
    assert_eq!(row["NODE"], node);
    assert!(
        row["ADDRESSES"].starts_with("10.0.1."),
        "an address on the private network: {row:?}"
    );
    let yaml = cloud.run(["get", "server", "web-1", "-o", "yaml"])?;
    assert!(yaml.contains("type: Scheduled"), "{yaml}");
    assert!(
        yaml.contains(&format!("placed on node {node}")),
        "the Scheduled condition names the node: {yaml}"
    );
    assert!(
        yaml.contains("kind: Flavor"),
        "resolved references are recorded: {yaml}"
    );

    // A server group lists the Servers that name it.
    let group = cloud.data_dir().join("../e2e-group.yaml");
    std::fs::write(&group, GROUP)?;
    cloud.run(["apply", "-f", group.to_str().context("path")?])?;
    wait_for(
        "the group's member in `ferro get servergroups`",
        WAIT,
        || {
            let rows = table(&cloud.run(["get", "servergroups"])?);
            Ok(rows
                .iter()
                .find(|r| r["NAME"] == "e2e-spread" && r["MEMBERS"] == "1")
                .map(|_| ()))
        },
    )?;
    let yaml = cloud.run(["get", "servergroup", "e2e-spread", "-o", "yaml"])?;
    assert!(yaml.contains("- e2e-member"), "{yaml}");

    let cordoned = cloud.run(["cordon", &node])?;
    assert!(cordoned.contains("cordoned"), "{cordoned}");
    let drained = cloud.run(["drain", &node])?;
    assert!(
        drained.contains("default/web-1"),
        "drain lists what runs there: {drained}"
    );
    let uncordoned = cloud.run(["uncordon", &node])?;
    assert!(uncordoned.contains("uncordoned"), "{uncordoned}");
    Ok(())
}
