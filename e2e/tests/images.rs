//! Uploaded images end to end: `ferro up` with a real etcd, the tiny test guest's kernel,
//! initramfs and disk sent with `ferro image upload` into the apiserver's image store, and
//! a Server booting from them — the node's agent fetching them from the apiserver into its
//! cache. The Images are `Active` from the upload on, their status shows what the
//! apiserver found, and a file that is not what it claims is refused with what it is.
//! Deleted while in use, the images stay, naming their users, until those are gone.

use std::time::Duration;

use anyhow::{Context, ensure};
use ferro_e2e::{Cloud, Signal, signal, tiny_guest, wait_for};

/// How long anything that needs a guest to boot may take.
const BOOT: Duration = Duration::from_secs(180);
/// How long the control plane may take to notice and write something.
const SOON: Duration = Duration::from_secs(90);

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

#[test]
fn a_server_boots_from_uploaded_images() -> anyhow::Result<()> {
    let guest = tiny_guest()?;
    let guarded = Guarded(Cloud::start()?);
    let cloud = &guarded.0;

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
    // A disk declared qcow2 that is not one is refused, naming what it is.
    let refused = cloud
        .ferro([
            "image",
            "upload",
            "wrong",
            guest.disk.as_str(),
            "--disk-format",
            "qcow2",
        ])
        .output()?;
    let said = String::from_utf8_lossy(&refused.stderr);
    ensure!(!refused.status.success(), "{said}");
    ensure!(
        said.contains("declared qcow2, but the bytes are raw"),
        "{said}"
    );

    // What an upload cannot say, from a manifest, and a Server booting the image.
    let scratch = tempfile::tempdir()?;
    let file = scratch.path().join("server.yaml");
    std::fs::write(
        &file,
        format!(
            r#"apiVersion: ferro/v1
kind: Image
metadata: {{name: tiny}}
spec:
  source: {{url: "ferro://upload"}}
  diskFormat: Raw
  kernel: tiny-kernel
  ramdisk: tiny-initrd
  kernelCommandLine: "{cmdline}"
---
apiVersion: ferro/v1
kind: Server
metadata: {{name: uploaded}}
spec: {{flavor: m1.tiny, image: tiny}}
"#,
            cmdline = guest.cmdline
        ),
    )?;
    let applied = cloud.run(["apply", "-f", file.to_str().context("path")?])?;
    ensure!(applied.contains("image/tiny configured"), "{applied}");

    let image = wait_for("image tiny Active", SOON, || {
        let yaml = cloud.run(["get", "image", "tiny", "-o", "yaml"])?;
        Ok(yaml.contains("phase: Active").then_some(yaml))
    })?;
    let size = std::fs::metadata(&guest.disk)?.len();
    ensure!(image.contains(&format!("sizeBytes: {size}")), "{image}");
    ensure!(image.contains("format: raw"), "{image}");
    ensure!(image.contains("checksum: sha256:"), "{image}");

    let logs = wait_for("the guest's ready marker", BOOT, || {
        let logs = cloud.run(["logs", "server/uploaded"]).unwrap_or_default();
        Ok(logs.contains("FERRO-READY").then_some(logs))
    })?;
    ensure!(logs.contains("FERRO-READY"), "{logs}");
    // The node cached the bytes it fetched from the apiserver.
    let cached = cloud.data_dir().join("agent/images/sha256");
    let files = std::fs::read_dir(&cached)
        .with_context(|| format!("reading {}", cached.display()))?
        .count();
    ensure!(files >= 3, "{files} files in {}", cached.display());

    // An image in use stays until its users are gone, and says who they are: the kernel
    // is used by the disk image, which the server booted from.
    cloud.run(["delete", "image", "tiny-kernel", "tiny"])?;
    wait_for("the images saying who uses them", SOON, || {
        let kernel = cloud.run(["get", "image", "tiny-kernel", "-o", "yaml"])?;
        let disk = cloud.run(["get", "image", "tiny", "-o", "yaml"])?;
        Ok((kernel.contains("in use by image default/tiny")
            && disk.contains("in use by server default/uploaded"))
        .then_some(()))
    })?;
    cloud.run([
        "delete",
        "server",
        "uploaded",
        "--wait",
        "--timeout",
        "120s",
    ])?;
    wait_for("both images gone once unused", SOON, || {
        let listed = cloud.run(["get", "images"])?;
        Ok((!listed.contains("tiny-kernel ") && !listed.contains("tiny ")).then_some(()))
    })?;
    Ok(())
}
