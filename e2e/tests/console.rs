//! From Ready to the console, end to end, as README's walk-through goes: `ferro up` with a
//! real etcd, the test guest built by `e2e/images/build-tiny.sh` uploaded with `ferro image
//! upload`, `manifests/` applied as they are, a real QEMU guest.
//!
//! `ferro wait --for console=FERRO-READY` returns once the guest prints its ready line;
//! it and `ferro logs` print what README shows; `ferro server reboot` returns once the
//! guest prints again after the reset, and the guest boots once more.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, ensure};
use ferro_e2e::{Cloud, Signal, signal, tiny_guest};

/// The cloud, brought down with its guests even when the test fails.
struct Guarded(Cloud);

impl Drop for Guarded {
    fn drop(&mut self) {
        let cloud = &mut self.0;
        if cloud.supervisor_pid().is_some() {
            let _ = cloud.ferro(["down", "--purge"]).output();
            let _ = cloud.wait_supervisor_exit(Duration::from_secs(60));
        }
        // Only QEMUs of this cloud: their command lines name its data directory.
        for (pid, cmdline) in cloud.processes() {
            if cmdline.contains("qemu") {
                signal(pid, Signal::KILL);
            }
        }
    }
}

/// Lines as README and the guest can agree on them: MACs are the Ports' own (random),
/// and whether DHCP has answered by the time the guest is ready (`addrs=`, the
/// `FERRO-ADDR` lines) is a race, so those are left out of the comparison.
fn comparable<'a>(lines: impl Iterator<Item = &'a str>) -> Vec<String> {
    lines
        // Addresses and the data volume come when they come: before the ready marker or
        // after it.
        .filter(|l| !l.contains("FERRO-ADDR") && !l.contains("FERRO-DISK"))
        .map(|l| {
            l.split(' ')
                .filter(|word| !word.starts_with("addrs="))
                .map(mask_macs)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect()
}

/// A word with every MAC address in it written `xx:xx:xx:xx:xx:xx`.
fn mask_macs(word: &str) -> String {
    let bytes = word.as_bytes();
    let mut out = String::new();
    let mut i = 0;
    while i < bytes.len() {
        let mac = bytes.get(i..i + 17).is_some_and(|w| {
            w.iter().enumerate().all(|(j, b)| {
                if j % 3 == 2 {
                    *b == b':'
                } else {
                    b.is_ascii_hexdigit()
                }
            })
        });
        if mac {
            out.push_str("xx:xx:xx:xx:xx:xx");
            i += 17;
        } else {
            out.push(char::from(bytes[i]));
            i += 1;
        }
    }
    out
}

/// The lines README's walk-through shows after `$ COMMAND`, up to the next blank line.
fn readme_sample(root: &Path, command: &str) -> anyhow::Result<Vec<String>> {
    let readme = std::fs::read_to_string(root.join("README.md"))?;
    let after = readme
        .split(&format!("$ {command}\n"))
        .nth(1)
        .with_context(|| format!("README shows no `{command}`"))?;
    Ok(after
        .lines()
        .take_while(|l| !l.trim().is_empty())
        .map(str::to_owned)
        .collect())
}

#[test]
fn wait_for_the_console_and_reboot_follow_a_real_guest() -> anyhow::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let guest = tiny_guest()?;
    let cloud = Guarded(Cloud::start()?);
    let cloud = &cloud.0;

    // The guest uploaded and manifests/ applied, as README does.
    for (name, file, format) in [
        ("tiny-kernel", &guest.kernel, "kernel"),
        ("tiny-initrd", &guest.initrd, "ramdisk"),
        ("tiny", &guest.disk, "raw"),
    ] {
        let out = cloud.run([
            "image",
            "upload",
            name,
            file.as_str(),
            "--disk-format",
            format,
        ])?;
        ensure!(
            out.starts_with(&format!("image/{name} uploaded: ")),
            "{out}"
        );
    }
    let manifests = root.join("manifests");
    cloud.run(["apply", "-f", manifests.to_str().context("path")?])?;

    // README's commands, and what they print there. Checked at the end, so that one
    // run also tells how the reboot went.
    let mut readme_differs = Vec::new();
    let out = cloud.run([
        "wait",
        "server/web-1",
        "--for",
        "console=FERRO-READY",
        "--timeout",
        "300s",
    ])?;
    ensure!(
        out.starts_with("server/web-1 console: FERRO-READY hostname=web-1 boot-count=1 "),
        "{out}"
    );
    let sample = readme_sample(&root, "ferro wait server/web-1 --for console=FERRO-READY")?;
    if comparable(out.lines()) != comparable(sample.iter().map(String::as_str)) {
        readme_differs.push(format!("README: {sample:#?}\nprinted: {out}"));
    }
    let log = cloud.run(["logs", "server/web-1"])?;
    let lines: Vec<&str> = log
        .lines()
        .map(|l| l.trim_end_matches('\r'))
        .filter(|l| l.contains("FERRO"))
        .collect();
    let sample = readme_sample(&root, "ferro logs server/web-1 | grep FERRO")?;
    if comparable(lines.iter().copied()) != comparable(sample.iter().map(String::as_str)) {
        readme_differs.push(format!(
            "README: {sample:#?}\nthe guest's: {lines:#?}\nwhole log:\n{log}"
        ));
    }

    // A reboot returns once the guest prints again after the reset; it boots once more.
    let out = cloud.run(["server", "reboot", "web-1", "--timeout", "300s"])?;
    ensure!(out.contains("server/web-1: rebooted"), "{out}");
    ensure!(out.contains("server/web-1: the guest is back: "), "{out}");
    cloud.run([
        "wait",
        "server/web-1",
        "--for",
        "console=^FERRO-READY hostname=web-1 boot-count=2 ",
        "--timeout",
        "300s",
    ])?;

    cloud.run(["delete", "server", "web-1", "--wait", "--timeout", "120s"])?;
    ensure!(
        readme_differs.is_empty(),
        "README's sample output is not what the guest prints:\n{}",
        readme_differs.join("\n")
    );
    Ok(())
}
