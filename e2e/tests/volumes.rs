//! Volumes end to end, under `ferro up --nodes 3`: real qcow2 volume files, real QEMU
//! hot-plug, real NBD exports by `qemu-storage-daemon` between node namespaces.
//!
//! A Volume is attached to guest `writer`, which writes a random marker on it from its
//! user data. The volume cannot be deleted while attached, nor attached to a second
//! server while `writer` lists it. Detached from the running `writer` (the guest sees the
//! disk go), it is hot-attached to running guests `reader-1` and then `reader-2`, which
//! read the marker back. The three guests are on three different nodes (anti-affinity),
//! so at least two of the three attachments reach the volume over NBD from another node.
//! The agents of reader-1's node and of the volume's node are SIGKILLed in the middle of
//! its attach; the agents `ferro up` starts again finish it with one export. Grown while
//! attached to the guest on its own node, the guest sees the new size; a shrink is
//! refused. Deleting the servers leaves the volume intact. A snapshot of it is restored
//! into a new volume a guest reads the marker from; the volume cannot be deleted while
//! the snapshot is there. A server booted from a volume made from the test image counts
//! its boot on it, and a second server booted from the same volume after the first is
//! deleted counts the second boot. Deleting the volumes then leaves no volume file,
//! export record or `qemu-storage-daemon` on any node.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use ferro_e2e::net::block;
use ferro_e2e::{Cloud, Options, signal, table, tiny_guest, wait_for};
use rustix::process::Signal;

/// How long nodes, guests and volumes may take, on a loaded 2-core machine.
const WAIT: Duration = Duration::from_secs(240);

/// The guest side: waits for a data disk (one with a serial), then runs `then` with the
/// disk's device in `$dev`, in the background so it does not hold up the boot.
fn on_disk(then: &str) -> String {
    format!(
        r#"#!/bin/sh
(
  end=$(($(date +%s) + 400))
  dev=""
  while [ -z "$dev" ]; do
    for d in /sys/block/vd*; do
      [ -n "$(cat "$d/serial" 2>/dev/null)" ] && dev=/dev/${{d##*/}}
    done
    [ -n "$dev" ] && break
    [ "$(date +%s)" -lt "$end" ] || {{ echo "FERRO-NO-DISK"; exit 1; }}
    sleep 0.3
  done
{then}
) >/dev/console 2>&1 &
"#
    )
}

/// Writes a random marker to the first sector of the disk and says what it wrote.
const WRITE: &str = r#"  mark="ferro-volume-$(cat /proc/sys/kernel/random/uuid)"
  printf '%s\n' "$mark" >/tmp/mark
  dd if=/tmp/mark of="$dev" bs=512 count=1 conv=sync,fsync 2>/dev/null
  sync
  echo "FERRO-WROTE $mark""#;

/// Reads the marker back from the first sector of the disk.
const READ: &str = r#"  echo "FERRO-READ $(dd if="$dev" bs=512 count=1 2>/dev/null | head -n 1)""#;

fn server(name: &str, volumes: &[&str], script: &str) -> String {
    let volumes = if volumes.is_empty() {
        "  volumes: []\n".to_owned()
    } else {
        let listed: Vec<String> = volumes
            .iter()
            .map(|v| format!("  - {{volume: {v}}}\n"))
            .collect();
        format!("  volumes:\n{}", listed.concat())
    };
    format!(
        r#"apiVersion: ferro/v1
kind: Server
metadata: {{name: {name}}}
spec:
  flavor: m1.tiny
  image: tiny
  serverGroup: apart
{volumes}  userData: |
{script}"#,
        script = block(script, 4)
    )
}

/// SIGKILLs the agent of node `name` (`node-2`); `ferro up` starts it again.
fn kill_agent(cloud: &Cloud, name: &str) -> anyhow::Result<()> {
    let number = name
        .strip_prefix("node-")
        .context("a node of ferro up --nodes")?;
    let pidfile = cloud
        .data_dir()
        .join(format!("run/agent-node-{number}.pid"));
    let pid: u32 = std::fs::read_to_string(&pidfile)
        .with_context(|| format!("reading {}", pidfile.display()))?
        .trim()
        .parse()?;
    signal(pid, Signal::KILL);
    Ok(())
}

fn apply(cloud: &Cloud, name: &str, yaml: &str) -> anyhow::Result<String> {
    let file = cloud.data_dir().join(format!("../{name}.yaml"));
    std::fs::write(&file, yaml)?;
    cloud.run(["apply", "-f", file.to_str().context("path")?])
}

/// What `apply` says when it fails.
fn apply_fails(cloud: &Cloud, name: &str, yaml: &str) -> anyhow::Result<String> {
    let file = cloud.data_dir().join(format!("../{name}.yaml"));
    std::fs::write(&file, yaml)?;
    let out = cloud
        .ferro(["apply", "-f", file.to_str().context("path")?])
        .output()?;
    ensure!(!out.status.success(), "apply of {name} succeeded");
    Ok(String::from_utf8_lossy(&out.stderr).into_owned())
}

fn wait_console(cloud: &Cloud, server: &str, text: &str) -> anyhow::Result<()> {
    cloud.run([
        "wait",
        &format!("server/{server}"),
        "--for",
        &format!("console={text}"),
        "--timeout",
        "300s",
    ])?;
    Ok(())
}

/// The volume's row in `ferro get volumes -o wide`.
fn volume_row(cloud: &Cloud) -> anyhow::Result<std::collections::HashMap<String, String>> {
    table(&cloud.run(["get", "volumes", "-o", "wide"])?)
        .into_iter()
        .find(|r| r["NAME"] == "data")
        .context("no volume data")
}

/// Files Ferro made for volumes anywhere under the data directory.
fn volume_files(dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let parent = dir.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if path.is_dir() {
                stack.push(path);
            } else if matches!(parent, "volumes" | "nbd" | "volume-records") {
                found.push(path.display().to_string());
            }
        }
    }
    found.sort();
    found
}

#[test]
fn volumes_attach_anywhere_and_keep_their_data() -> anyhow::Result<()> {
    let guest = tiny_guest()?;
    let cloud = Cloud::start_with(Options {
        nodes: 3,
        driver: "linuxbridge".into(),
        ..Options::default()
    })?;
    wait_for("three nodes Ready", WAIT, || {
        let rows = table(&cloud.run(["get", "nodes"])?);
        Ok((rows.len() == 3 && rows.iter().all(|r| r["READY"] == "True")).then_some(()))
    })?;
    let setup = format!(
        "{}---\napiVersion: ferro/v1\nkind: ServerGroup\nmetadata: {{name: apart}}\nspec: {{policy: AntiAffinity}}\n---\napiVersion: ferro/v1\nkind: Volume\nmetadata: {{name: data}}\nspec: {{sizeGib: 1}}\n---\n{}",
        guest.image_manifests(),
        server("writer", &["data"], &on_disk(WRITE)),
    );
    apply(&cloud, "setup", &setup)?;
    cloud.run([
        "wait",
        "volume/data",
        "--for",
        "condition=Ready",
        "--timeout",
        "120s",
    ])?;
    let volume_node = volume_row(&cloud)?["NODE"].clone();
    ensure!(volume_node.starts_with("node-"), "placed: {volume_node:?}");
    wait_console(&cloud, "writer", "FERRO-WROTE")?;
    let console = cloud.run(["logs", "server/writer"])?;
    let mark = console
        .lines()
        .find_map(|l| l.split("FERRO-WROTE ").nth(1))
        .map(|m| m.trim().to_owned())
        .context("no marker written")?;
    ensure!(mark.starts_with("ferro-volume-"), "marker {mark:?}");
    wait_for("the volume InUse by writer", WAIT, || {
        let row = volume_row(&cloud)?;
        Ok((row["PHASE"] == "InUse" && row["ATTACHED-TO"] == "writer").then_some(()))
    })?;

    // Attached: it cannot be deleted, nor attached to a second server.
    let out = cloud.ferro(["delete", "volume", "data"]).output()?;
    let said = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && said.contains("attached to server writer"),
        "deleting an attached volume: {said}"
    );
    let said = apply_fails(
        &cloud,
        "reader-1-early",
        &server("reader-1", &["data"], &on_disk(READ)),
    )?;
    ensure!(
        said.contains("spec.volumes[0].volume") && said.contains("attached to server writer"),
        "a second attachment: {said}"
    );

    // Detached from the running writer: the guest sees the disk go.
    apply(
        &cloud,
        "writer-detach",
        &server("writer", &[], &on_disk(WRITE)),
    )?;
    wait_console(&cloud, "writer", "FERRO-DISK-GONE")?;
    wait_for("the volume Available", WAIT, || {
        let row = volume_row(&cloud)?;
        Ok((row["PHASE"] == "Available" && row["ATTACHED-TO"].is_empty()).then_some(()))
    })?;

    // Hot-attached to two running guests in turn, on the two other nodes.
    for (reader, previous) in [("reader-1", None), ("reader-2", Some("reader-1"))] {
        apply(&cloud, reader, &server(reader, &[], &on_disk(READ)))?;
        wait_console(&cloud, reader, "FERRO-READY")?;
        if let Some(previous) = previous {
            apply(
                &cloud,
                &format!("{previous}-detach"),
                &server(previous, &[], &on_disk(READ)),
            )?;
            wait_console(&cloud, previous, "FERRO-DISK-GONE")?;
            wait_for("the volume detached", WAIT, || {
                Ok(volume_row(&cloud)?["ATTACHED-TO"].is_empty().then_some(()))
            })?;
        }
        let node = table(&cloud.run(["get", "servers", "-o", "wide"])?)
            .into_iter()
            .find(|r| r["NAME"] == reader)
            .map(|r| r["NODE"].clone())
            .unwrap_or_default();
        let asked = Instant::now();
        apply(
            &cloud,
            &format!("{reader}-attach"),
            &server(reader, &["data"], &on_disk(READ)),
        )?;
        if previous.is_none() {
            // The agents of the guest's node and of the volume's node die in the middle
            // of the attach; those `ferro up` starts again finish it, with one export.
            for agent in [&node, &volume_node] {
                kill_agent(&cloud, agent)?;
            }
        }
        wait_console(&cloud, reader, "FERRO-DISK vd")?;
        let seen_in = asked.elapsed();
        wait_console(&cloud, reader, &format!("FERRO-READ {mark}"))?;
        // One export when the guest is on another node than the volume, none otherwise
        // (the previous reader's export goes once its node no longer reports the disk).
        let remote = usize::from(node != volume_node);
        let daemons = || {
            cloud
                .processes()
                .into_iter()
                .filter(|(_, c)| c.contains("qemu-storage-daemon"))
                .count()
        };
        wait_for(&format!("{remote} NBD export for {reader}"), WAIT, || {
            Ok((daemons() == remote).then_some(()))
        })
        .with_context(|| {
            format!(
                "{} exports for {reader} on {node}, volume on {volume_node}",
                daemons()
            )
        })?;
        let how = if node == volume_node {
            "locally"
        } else {
            "over NBD"
        };
        eprintln!(
            "{reader} on {node} (volume on {volume_node}, {how}): the disk was in the guest \
             {:.1}s after the apply, and read back the marker",
            seen_in.as_secs_f64()
        );
    }
    let nodes: Vec<String> = table(&cloud.run(["get", "servers", "-o", "wide"])?)
        .iter()
        .map(|r| r["NODE"].clone())
        .collect();
    let mut distinct = nodes.clone();
    distinct.sort();
    distinct.dedup();
    ensure!(
        distinct.len() == 3,
        "three guests on three nodes: {nodes:?}"
    );

    // Grown while attached to the guest on the volume's own node: the guest sees the new
    // size at once (QEMU grows the file it has open).
    let servers = table(&cloud.run(["get", "servers", "-o", "wide"])?);
    let local = servers
        .iter()
        .find(|r| r["NODE"] == volume_node)
        .map(|r| r["NAME"].clone())
        .context("a guest on the volume's node")?;
    if local != "reader-2" {
        apply(
            &cloud,
            "reader-2-away",
            &server("reader-2", &[], &on_disk(READ)),
        )?;
        wait_console(&cloud, "reader-2", "FERRO-DISK-GONE")?;
        wait_for("the volume detached", WAIT, || {
            Ok(volume_row(&cloud)?["ATTACHED-TO"].is_empty().then_some(()))
        })?;
        let script = if local == "writer" { WRITE } else { READ };
        apply(
            &cloud,
            "local-attach",
            &server(&local, &["data"], &on_disk(script)),
        )?;
        wait_for("the volume attached to the local guest", WAIT, || {
            Ok((volume_row(&cloud)?["ATTACHED-TO"] == local).then_some(()))
        })?;
    }
    apply(
        &cloud,
        "grow",
        "apiVersion: ferro/v1\nkind: Volume\nmetadata: {name: data}\nspec: {sizeGib: 2}\n",
    )?;
    wait_console(&cloud, &local, "FERRO-DISK vd[a-z]+ [0-9a-f]+ 2147483648")?;
    // Its node reports the new size too (spec and status both say 2).
    wait_for("the volume reported at 2 GiB", WAIT, || {
        let yaml = cloud.run(["get", "volume", "data", "-o", "yaml"])?;
        Ok((yaml.matches("sizeGib: 2").count() == 2).then_some(()))
    })?;
    let said = apply_fails(
        &cloud,
        "shrink",
        "apiVersion: ferro/v1\nkind: Volume\nmetadata: {name: data}\nspec: {sizeGib: 1}\n",
    )?;
    ensure!(
        said.contains("spec.sizeGib: cannot shrink from 2 to 1"),
        "{said}"
    );

    // The servers go; the volume stays, intact, and then goes without a trace.
    cloud.run([
        "delete", "server", "writer", "reader-1", "reader-2", "--wait",
    ])?;

    // A snapshot of the detached volume, and a volume restored from it, which a guest
    // reads the marker from. The volume cannot go while the snapshot is there.
    apply(
        &cloud,
        "snapshot",
        "apiVersion: ferro/v1\nkind: VolumeSnapshot\nmetadata: {name: before}\nspec: {volume: data}\n",
    )?;
    cloud.run([
        "wait",
        "volumesnapshot/before",
        "--for",
        "condition=Ready",
        "--timeout",
        "120s",
    ])?;
    let out = cloud.ferro(["delete", "volume", "data"]).output()?;
    let said = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && said.contains("has snapshots before"),
        "deleting a volume with a snapshot: {said}"
    );
    apply(
        &cloud,
        "restored",
        &format!(
            "apiVersion: ferro/v1\nkind: Volume\nmetadata: {{name: restored}}\nspec: {{sizeGib: 2, source: {{snapshot: before}}}}\n---\n{}",
            server("checker", &["restored"], &on_disk(READ))
        ),
    )?;
    wait_console(&cloud, "checker", &format!("FERRO-READ {mark}"))?;
    cloud.run(["delete", "server", "checker", "--wait"])?;
    cloud.run(["delete", "volumesnapshot", "before", "--wait"])?;
    cloud.run(["delete", "volume", "restored", "--wait"])?;

    // Boot from a volume made from the test image: the guest counts its boots on its
    // disk, so a second server booted from the same volume finds the first one's count.
    apply(
        &cloud,
        "root",
        "apiVersion: ferro/v1\nkind: Volume\nmetadata: {name: root}\nspec: {sizeGib: 1, source: {image: tiny}}\n",
    )?;
    cloud.run([
        "wait",
        "volume/root",
        "--for",
        "condition=Ready",
        "--timeout",
        "120s",
    ])?;
    let from_volume = |name: &str| {
        format!(
            "apiVersion: ferro/v1\nkind: Server\nmetadata: {{name: {name}}}\nspec: {{flavor: m1.tiny, bootVolume: root}}\n"
        )
    };
    apply(&cloud, "vm-a", &from_volume("vm-a"))?;
    wait_console(&cloud, "vm-a", "FERRO-READY .*boot-count=1 ")?;
    let said = apply_fails(&cloud, "vm-b-early", &from_volume("vm-b"))?;
    ensure!(
        said.contains("spec.bootVolume: volume root is attached to server vm-a"),
        "{said}"
    );
    cloud.run(["delete", "server", "vm-a", "--wait"])?;
    apply(&cloud, "vm-b", &from_volume("vm-b"))?;
    wait_console(&cloud, "vm-b", "FERRO-READY .*boot-count=2 ")?;
    cloud.run(["delete", "server", "vm-b", "--wait"])?;
    cloud.run(["delete", "volume", "root", "--wait"])?;
    wait_for("the volume Available again", WAIT, || {
        let row = volume_row(&cloud)?;
        Ok((row["PHASE"] == "Available").then_some(()))
    })?;
    ensure!(
        !volume_files(cloud.data_dir()).is_empty(),
        "the volume file is there"
    );
    cloud.run(["delete", "volume", "data", "--wait"])?;
    wait_for("no volume file, export or daemon left", WAIT, || {
        let files = volume_files(cloud.data_dir());
        let daemons: Vec<String> = cloud
            .processes()
            .into_iter()
            .map(|(_, c)| c)
            .filter(|c| c.contains("qemu-storage-daemon"))
            .collect();
        Ok((files.is_empty() && daemons.is_empty()).then_some(()))
    })
    .with_context(|| format!("left: {:?}", volume_files(cloud.data_dir())))?;
    Ok(())
}
