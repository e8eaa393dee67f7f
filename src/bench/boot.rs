//! `ferro bench boot`: how long Ferro takes from `apply` of a Server to its guest's ready
//! marker, against the same QEMU command line started by hand; and how long a delete takes
//! to end the guest.
//!
//! One run on this machine: the bench starts its own `ferro up` (real etcd, apiserver,
//! controllers with the scheduler, the node agent) in a temporary directory, registers the
//! tiny test guest's Images (built by `e2e/images/build-tiny.sh`, cached), and boots one
//! warm-up Server so the image cache is filled. Then, `--runs` times: create a Server
//! (what `ferro apply` does for a new object) and time until the guest prints
//! `FERRO-READY` on its serial console; then delete it and time until its QEMU is gone.
//!
//! The baseline takes the exact command line the agent used (from `/proc/<pid>/cmdline`
//! of a Ferro-started QEMU), points its per-VM paths at a scratch directory holding a
//! fresh overlay on the same cached base and a copy of the config drive — prepared before
//! the clock starts, as someone starting QEMU by hand would — and times spawn → marker the
//! same way. Both sides read the marker from the serial log file QEMU writes, polled every
//! 10 ms, so the relay's own follow interval is not part of either figure. Ferro's figure
//! includes the apiserver write, the scheduler's placement, the agent's watch, the image
//! lookups, the overlay and config drive, and QEMU's own start.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use ferro_api::client::{Client, Selection};
use ferro_api::{Error as ApiError, Kind};

use super::harness::{Workspace, wait_every};

/// The marker the tiny guest prints when it is up.
const MARKER: &str = "FERRO-READY";
/// How long one boot may take before the bench gives up.
const BOOT_TIMEOUT: Duration = Duration::from_secs(300);
/// How often serial logs are polled.
const POLL: Duration = Duration::from_millis(10);

/// Arguments of `ferro bench boot`.
#[derive(clap::Args, Debug)]
pub struct BootBenchArgs {
    /// Boots measured on each side (the median is reported).
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// The script that builds the tiny test guest.
    #[arg(long, value_name = "PATH", default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/e2e/images/build-tiny.sh"))]
    pub tiny_script: PathBuf,
}

/// The stack under test: `ferro up` in a scratch directory; stopped (and its data
/// removed) on drop.
struct Stack {
    scratch: Workspace,
    child: Option<Child>,
    client: Client,
}

impl Stack {
    fn data_dir(&self) -> PathBuf {
        self.scratch.path().join("data")
    }

    async fn start() -> anyhow::Result<Stack> {
        let shm = Path::new("/dev/shm");
        let scratch = Workspace::new("boot", shm.is_dir().then_some(shm))?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let config = scratch.path().join("config.yaml");
        let log = std::fs::File::create(scratch.path().join("ferro-up.log"))?;
        let child = Command::new(std::env::current_exe()?)
            .args([
                "up",
                "--api-addr",
                &format!("127.0.0.1:{port}"),
                "--data-dir",
            ])
            .arg(scratch.path().join("data"))
            .env("FERRO_CONFIG", &config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting ferro up")?;
        let mut stack = Stack {
            scratch,
            child: Some(child),
            client: Client::connect_lazy("127.0.0.1:1", "none").map_err(|e| anyhow!("{e}"))?,
        };
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Some(child) = &mut stack.child
                && let Some(status) = child.try_wait()?
            {
                bail!("ferro up exited ({status}): see {}", stack.log().display());
            }
            if let Some(c) = crate::cli::config::load(&config)?.and_then(|c| c.current().cloned())
                && let (Some(server), Some(token)) = (c.server, c.token)
            {
                let client = Client::connect_lazy(&server, &token).map_err(|e| anyhow!("{e}"))?;
                let nodes = client.list(Kind::Node, &Selection::all()).await;
                if matches!(nodes, Ok((nodes, _)) if !nodes.is_empty()) {
                    stack.client = client;
                    return Ok(stack);
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "ferro up did not serve with a node in time: see {}",
                    stack.log().display()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn log(&self) -> PathBuf {
        self.scratch.path().join("ferro-up.log")
    }

    fn vm_dir(&self, uid: &str) -> PathBuf {
        self.data_dir().join("agent/vms").join(uid)
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let Some(pid) = rustix::process::Pid::from_raw(child.id() as i32) {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
            }
            let deadline = Instant::now() + Duration::from_secs(60);
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        // Guests outlive `ferro up`: stop any the bench left (by their pidfiles).
        let vms = self.data_dir().join("agent/vms");
        for entry in std::fs::read_dir(&vms).into_iter().flatten().flatten() {
            let uid = entry.file_name().to_string_lossy().into_owned();
            kill_vm(&entry.path(), &uid);
        }
    }
}

/// Kills the QEMU a VM directory's pidfile names, if it is that VM's.
fn kill_vm(dir: &Path, name_suffix: &str) {
    let Some(pid) = std::fs::read_to_string(dir.join("qemu.pid"))
        .ok()
        .and_then(|p| p.trim().parse::<u32>().ok())
    else {
        return;
    };
    if process_named(pid, name_suffix)
        && let Some(p) = rustix::process::Pid::from_raw(pid as i32)
    {
        let _ = rustix::process::kill_process(p, rustix::process::Signal::KILL);
        let deadline = Instant::now() + Duration::from_secs(10);
        while process_named(pid, name_suffix) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Whether `pid` is a QEMU whose `-name` ends with `suffix`.
fn process_named(pid: u32, suffix: &str) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| {
            let args: Vec<&[u8]> = c.split(|b| *b == 0).collect();
            args.windows(2)
                .any(|w| w[0] == b"-name" && w[1].ends_with(suffix.as_bytes()))
        })
        .unwrap_or(false)
}

/// Waits until `file` holds the marker; false on timeout.
async fn wait_marker(file: &Path, timeout: Duration) -> bool {
    let marked = || async {
        let bytes = std::fs::read(file).ok()?;
        bytes
            .windows(MARKER.len())
            .any(|w| w == MARKER.as_bytes())
            .then_some(())
    };
    wait_every("the ready marker", timeout, POLL, marked)
        .await
        .is_ok()
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

pub(super) fn tiny_guest(
    script: &Path,
) -> anyhow::Result<std::collections::BTreeMap<String, String>> {
    let output = Command::new("bash")
        .arg(script)
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    if !output.status.success() {
        bail!(
            "{} failed:\n{}",
            script.display(),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(String::from_utf8(output.stdout)?
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect())
}

async fn create_yaml(client: &Client, yaml: &str) -> anyhow::Result<()> {
    for object in ferro_api::codec::decode_yaml(yaml)? {
        client.create(object).await.map_err(|e| anyhow!("{e}"))?;
    }
    Ok(())
}

fn server_yaml(name: &str) -> String {
    format!(
        "apiVersion: ferro/v1\nkind: Server\nmetadata: {{name: {name}}}\nspec: {{flavor: m1.tiny, image: tiny}}\n"
    )
}

/// The uid of a Server, once it exists.
async fn uid_of(client: &Client, name: &str) -> anyhow::Result<String> {
    let object = client
        .get(Kind::Server, "default", name)
        .await
        .map_err(|e| anyhow!("{e}"))?;
    Ok(object.metadata().map(|m| m.uid.clone()).unwrap_or_default())
}

/// One Ferro boot: create → marker; returns the seconds and the VM's directory.
async fn ferro_boot(stack: &Stack, name: &str) -> anyhow::Result<(f64, PathBuf)> {
    let started = Instant::now();
    create_yaml(&stack.client, &server_yaml(name)).await?;
    let uid = uid_of(&stack.client, name).await?;
    let dir = stack.vm_dir(&uid);
    if !wait_marker(&dir.join("serial.log"), BOOT_TIMEOUT).await {
        bail!("{name} did not boot: see {}", stack.log().display());
    }
    Ok((started.elapsed().as_secs_f64(), dir))
}

/// Deletes a Server; returns the seconds until its QEMU is gone.
async fn ferro_delete(stack: &Stack, name: &str, dir: &Path) -> anyhow::Result<f64> {
    let uid = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let pid = std::fs::read_to_string(dir.join("qemu.pid"))
        .ok()
        .and_then(|p| p.trim().parse::<u32>().ok())
        .context("no QEMU pid to watch")?;
    let started = Instant::now();
    stack
        .client
        .delete_key(Kind::Server, "default", name)
        .await
        .map_err(|e| anyhow!("{e}"))?;
    let timeout = Duration::from_secs(120);
    wait_every(
        &format!("{name}'s QEMU to end after its delete"),
        timeout,
        POLL,
        || async { (!process_named(pid, &uid)).then_some(()) },
    )
    .await?;
    let seconds = started.elapsed().as_secs_f64();
    // Let the object go too before the next run.
    wait_every(
        &format!("{name} to be removed"),
        timeout,
        Duration::from_millis(50),
        || async {
            let got = stack.client.get(Kind::Server, "default", name).await;
            matches!(got, Err(ApiError::NotFound { .. })).then_some(())
        },
    )
    .await?;
    Ok(seconds)
}

/// The hand-started baseline: `args` is the agent's QEMU command line with its VM
/// directory replaced by `{DIR}`.
struct Baseline {
    qemu: String,
    args: Vec<String>,
    base: PathBuf,
    base_format: String,
    config_drive: PathBuf,
}

impl Baseline {
    fn capture(pid: u32, vm_dir: &Path, scratch: &Path) -> anyhow::Result<Baseline> {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))?;
        let mut args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let qemu = args.remove(0);
        let dir = vm_dir.to_string_lossy().into_owned();
        let uid = vm_dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let args = args
            .into_iter()
            .map(|a| {
                a.replace(&dir, "{DIR}")
                    .replace(&format!("ferro-{uid}"), "bench-baseline")
            })
            .collect();
        let info = Command::new("qemu-img")
            .args(["info", "-U", "--output=json"])
            .arg(vm_dir.join("disk.qcow2"))
            .output()?;
        let info: serde_json::Value = serde_json::from_slice(&info.stdout)?;
        let base = info["full-backing-filename"]
            .as_str()
            .or(info["backing-filename"].as_str())
            .context("the overlay names no base")?
            .into();
        let base_format = info["backing-filename-format"]
            .as_str()
            .unwrap_or("raw")
            .to_owned();
        let config_drive = scratch.join("config-2.iso");
        std::fs::copy(vm_dir.join("config-2.iso"), &config_drive)
            .context("copying the config drive")?;
        Ok(Baseline {
            qemu,
            args,
            base,
            base_format,
            config_drive,
        })
    }

    /// One hand-started boot in a fresh directory: spawn → marker.
    async fn boot(&self, dir: &Path) -> anyhow::Result<f64> {
        std::fs::create_dir_all(dir)?;
        let status = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", &self.base_format, "-b"])
            .arg(&self.base)
            .arg(dir.join("disk.qcow2"))
            .status()?;
        if !status.success() {
            bail!("qemu-img create failed");
        }
        std::fs::copy(&self.config_drive, dir.join("config-2.iso"))?;
        let d = dir.to_string_lossy();
        let args: Vec<String> = self.args.iter().map(|a| a.replace("{DIR}", &d)).collect();
        let started = Instant::now();
        let status = tokio::process::Command::new(&self.qemu)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await?;
        let booted = status.success() && wait_marker(&dir.join("serial.log"), BOOT_TIMEOUT).await;
        let seconds = started.elapsed().as_secs_f64();
        kill_vm(dir, "bench-baseline");
        if !booted {
            bail!("the hand-started QEMU did not boot ({status})");
        }
        Ok(seconds)
    }
}

/// Runs the benchmark and prints its figures.
pub async fn run(args: BootBenchArgs) -> anyhow::Result<()> {
    let runs = args.runs.max(1);
    let guest = tiny_guest(&args.tiny_script)?;
    println!("starting ferro up (real etcd) in a scratch directory…");
    let stack = Stack::start().await?;
    create_yaml(
        &stack.client,
        &format!(
            r#"
apiVersion: ferro/v1
kind: Image
metadata: {{name: tiny-kernel}}
spec: {{source: {{url: "file://{kernel}"}}, diskFormat: Kernel}}
---
apiVersion: ferro/v1
kind: Image
metadata: {{name: tiny-initrd}}
spec: {{source: {{url: "file://{initrd}"}}, diskFormat: Ramdisk}}
---
apiVersion: ferro/v1
kind: Image
metadata: {{name: tiny}}
spec:
  source: {{url: "file://{disk}"}}
  diskFormat: Raw
  kernel: tiny-kernel
  ramdisk: tiny-initrd
  kernelCommandLine: "{cmdline}"
"#,
            kernel = guest["FERRO_TINY_KERNEL"],
            initrd = guest["FERRO_TINY_INITRD"],
            disk = guest["FERRO_TINY_DISK"],
            cmdline = guest["FERRO_TINY_CMDLINE"],
        ),
    )
    .await?;

    // Warm-up: fills the image cache; its command line is the baseline's.
    let (warm, dir) = ferro_boot(&stack, "bench-warmup").await?;
    println!("warm-up boot (fetching images into the cache): {warm:.2} s");
    let pid = std::fs::read_to_string(dir.join("qemu.pid"))?
        .trim()
        .parse::<u32>()?;
    let baseline = Baseline::capture(pid, &dir, stack.scratch.path())?;
    ferro_delete(&stack, "bench-warmup", &dir).await?;

    let mut boots = Vec::with_capacity(runs);
    let mut deletes = Vec::with_capacity(runs);
    for i in 0..runs {
        let name = format!("bench-{i}");
        let (seconds, dir) = ferro_boot(&stack, &name).await?;
        let deleted = ferro_delete(&stack, &name, &dir).await?;
        println!(
            "ferro   run {}: apply → ready {seconds:.2} s, delete → QEMU gone {deleted:.2} s",
            i + 1
        );
        boots.push(seconds);
        deletes.push(deleted);
    }
    let mut plain = Vec::with_capacity(runs);
    for i in 0..runs {
        let dir = stack.scratch.path().join(format!("plain-{i}"));
        let seconds = baseline.boot(&dir).await?;
        println!("qemu    run {}: spawn → ready {seconds:.2} s", i + 1);
        plain.push(seconds);
    }
    let (ferro, qemu, delete) = (median(&mut boots), median(&mut plain), median(&mut deletes));
    let overhead = ferro - qemu;
    println!();
    println!("boot to ready marker, median of {runs} (TCG, tiny guest, PVH direct kernel boot):");
    println!("  ferro (apply → FERRO-READY)          {ferro:6.2} s");
    println!("  plain qemu, same command line        {qemu:6.2} s");
    println!(
        "  overhead Ferro adds                  {overhead:6.2} s ({:.1} %)",
        overhead / qemu * 100.0
    );
    println!("  delete → QEMU gone                   {delete:6.2} s");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_of_odd_and_even_runs() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 3.0, 2.0]), 2.5);
    }
}
