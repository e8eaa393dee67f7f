//! A Server's life in Events, end to end: `ferro up` with real etcd, the scheduler, and
//! the node agent running the tiny test guest under real QEMU (TCG). The user creates a
//! Server, stops, starts and reboots it, deletes it, and `ferro get events` tells that
//! life in order: the scheduler's `Scheduled`, then the agent's `ImagePulled` (or
//! `ImageCached`), `Created`, `Started`, `Stopped`, `Started`, `Rebooted` and `Deleted`.
//!
//! Similar occurrences fold into one Event whose count goes up (a second `Started` bumps
//! the first), so the order is read from each Event's first and last occurrence times,
//! which `-o json` shows to the nanosecond; other events in between are allowed.

use anyhow::{Context, ensure};
use ferro_e2e::{Cloud, TinyGuest, tiny_guest};

/// The Server's name.
const NAME: &str = "events";

/// The reasons that must appear in this order; `|` separates alternatives.
const LIFE: &[&str] = &[
    "Scheduled",
    "ImagePulled|ImageCached",
    "Created",
    "Started",
    "Stopped",
    "Started",
    "Rebooted",
    "Deleted",
];

#[test]
fn a_servers_life_is_told_in_events_in_order() -> anyhow::Result<()> {
    let guest = tiny_guest()?;
    let cloud = Cloud::start()?;
    let result = scenario(&cloud, &guest);
    if result.is_err() {
        // Guests outlive `ferro up`: end this one before the cloud stops (what is still
        // left, the cloud's teardown kills).
        let _ = cloud.run(["delete", "server", NAME, "--wait", "--timeout", "60s"]);
    }
    result
}

fn scenario(cloud: &Cloud, guest: &TinyGuest) -> anyhow::Result<()> {
    let manifest = cloud.data_dir().join("../events.yaml");
    std::fs::write(
        &manifest,
        format!(
            r#"
{images}---
apiVersion: ferro/v1
kind: Server
metadata: {{name: {NAME}}}
spec: {{flavor: m1.tiny, image: tiny}}
"#,
            images = guest.image_manifests(),
        ),
    )?;
    let target = format!("server/{NAME}");
    let booted = |count: u32| {
        cloud.run([
            "wait",
            &target,
            "--for",
            &format!("console=FERRO-READY hostname={NAME} boot-count={count}"),
            "--timeout",
            "240s",
        ])
    };
    cloud.run(["apply", "-f", manifest.to_str().context("manifest path")?])?;
    booted(1)?;
    cloud.run(["server", "stop", NAME])?;
    cloud.run(["server", "start", NAME])?;
    booted(2)?;
    cloud.run(["server", "reboot", NAME])?;
    booted(3)?;

    // While the Server exists, `--for` finds its Events, and the table names them.
    let table = cloud.run(["get", "events", "--for", &target])?;
    for reason in ["Scheduled", "Created", "Started", "Stopped", "Rebooted"] {
        ensure!(table.contains(reason), "no {reason} in:\n{table}");
    }
    let before = occurrences(&cloud.run(["get", "events", "--for", &target, "-o", "json"])?)?;
    assert_life(&before, &LIFE[..LIFE.len() - 1])?;

    // After the delete the Server is gone, so its Events are read from the project's.
    cloud.run(["delete", "server", NAME, "--wait", "--timeout", "120s"])?;
    let after = occurrences(&cloud.run(["get", "events", "-o", "json"])?)?;
    assert_life(&after, LIFE)
}

/// The occurrences the Events about the Server show, oldest first: each Event's first
/// one, and its last one when it recurred.
fn occurrences(json: &str) -> anyhow::Result<Vec<(jiff::Timestamp, String)>> {
    let value: serde_json::Value = serde_json::from_str(json)?;
    let items = match value.get("items") {
        Some(items) => items.as_array().cloned().unwrap_or_default(),
        None => vec![value],
    };
    let mut seen = Vec::new();
    for event in items {
        let spec = &event["spec"];
        let involved = &spec["involvedObject"];
        if involved["kind"] != "Server" || involved["name"] != NAME {
            continue;
        }
        let reason = spec["reason"].as_str().unwrap_or_default().to_owned();
        let time = |field: &str| -> anyhow::Result<Option<jiff::Timestamp>> {
            spec[field]
                .as_str()
                .map(|t| t.parse::<jiff::Timestamp>())
                .transpose()
                .with_context(|| format!("{field} of {event}"))
        };
        let first = time("firstTimestamp")?;
        let last = time("lastTimestamp")?;
        if let Some(first) = first.or(last) {
            seen.push((first, reason.clone()));
        }
        if spec["count"].as_u64().unwrap_or(1) > 1
            && let Some(last) = last
        {
            seen.push((last, reason));
        }
    }
    seen.sort();
    Ok(seen)
}

/// Asserts that `expected` is a subsequence of the occurrences' reasons.
fn assert_life(seen: &[(jiff::Timestamp, String)], expected: &[&str]) -> anyhow::Result<()> {
    let reasons: Vec<&str> = seen.iter().map(|(_, r)| r.as_str()).collect();
    let mut rest = reasons.iter();
    for want in expected {
        let found = rest.any(|got| want.split('|').any(|w| w == *got));
        ensure!(
            found,
            "no {want} in order in {reasons:?} (expected {expected:?})"
        );
    }
    Ok(())
}
