//! Ferro end-to-end harness: starts real etcd and real `ferro` processes, and tears them
//! down again.
//!
//! [`Cloud::start`] runs `ferro up` (etcd store) on free loopback ports with its data
//! directory in a fresh temporary directory (on tmpfs when there is one: etcd fsyncs),
//! waits until the CLI can use it, and hands out CLI commands with the right environment
//! ([`Cloud::ferro`]). [`Cloud::start_with`] takes [`Options`]: several nodes (each in
//! its own network namespace, named with a prefix unique to the test) and the network
//! driver. Dropping the [`Cloud`] stops the one supervisor it started (SIGTERM, then
//! SIGKILL), runs `ferro down` for whatever a killed supervisor left (namespaces, links,
//! switch instances) and checks that no process naming its data directory and no
//! namespace or host link of its prefix survives — an etcd, apiserver or namespace left
//! behind is a bug, and fails the test.
//!
//! The `ferro` binary is the one `cargo test --workspace` builds; the harness asks cargo
//! to bring it up to date first (set `FERRO_BIN` to use another).

pub mod net;

use std::collections::HashMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use rustix::process::Pid;
pub use rustix::process::Signal;

/// How long `ferro up` may take to serve: generous, for loaded 2-core machines.
pub const READY_TIMEOUT: Duration = Duration::from_secs(120);

/// How long the supervisor gets to stop after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(60);

/// The `ferro` binary, built (once per test process) if needed.
pub fn ferro_binary() -> anyhow::Result<PathBuf> {
    static BINARY: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BINARY
        .get_or_init(|| locate_binary().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(|e| anyhow!(e))
}

fn locate_binary() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("FERRO_BIN") {
        return Ok(PathBuf::from(path));
    }
    // `target/debug/deps/foundation-…` → `target/debug/ferro`.
    let exe = std::env::current_exe()?;
    let target = exe
        .parent()
        .and_then(Path::parent)
        .ok_or_else(|| anyhow!("cannot find the target directory from {}", exe.display()))?;
    // The same command (and so the same features) `cargo test --workspace` uses, so this
    // is a no-op there and builds the binary when this crate's tests run alone.
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let cargo = option_env!("CARGO").unwrap_or("cargo");
    let status = Command::new(cargo)
        .args(["test", "--workspace", "--no-run", "--quiet"])
        .current_dir(&workspace)
        .status()
        .with_context(|| format!("cannot run {cargo}"))?;
    if !status.success() {
        bail!("building ferro failed ({status})");
    }
    let binary = target.join("ferro");
    if !binary.exists() {
        bail!("{} missing after the build", binary.display());
    }
    Ok(binary)
}

/// A free loopback port (free when asked; bind it soon).
pub fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// How a [`Cloud`] is started.
#[derive(Clone, Debug)]
pub struct Options {
    /// `ferro up --nodes`: 1 runs one agent on the host; more run each in a namespace.
    pub nodes: u32,
    /// `ferro up --network-driver`: `ovs` or `linuxbridge`.
    pub driver: String,
    /// `ferro up --name-prefix`; [`unique_prefix`] by default, so that parallel tests
    /// never share a namespace.
    pub prefix: String,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            nodes: 1,
            driver: "ovs".into(),
            prefix: unique_prefix(),
        }
    }
}

/// A name prefix no other test process or test in this one uses: `fe<pid%10000><n>`
/// (short: host interface names are `<prefix>-ul`, at most 15 bytes).
pub fn unique_prefix() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("fe{}x{n}", std::process::id() % 10000)
}

/// A running all-in-one cloud, stopped on drop.
pub struct Cloud {
    /// The temporary directory holding the data directory, config and logs.
    scratch: tempfile::TempDir,
    data_dir: PathBuf,
    api_addr: String,
    supervisor: Option<Child>,
    binary: PathBuf,
    options: Options,
}

impl Cloud {
    /// Starts `ferro up` with a real etcd and one node, and waits until it serves.
    pub fn start() -> anyhow::Result<Cloud> {
        Cloud::start_with(Options::default())
    }

    /// Starts `ferro up` with a real etcd as `options` say, and waits until it serves
    /// (the API; nodes may still be registering).
    pub fn start_with(options: Options) -> anyhow::Result<Cloud> {
        let binary = ferro_binary()?;
        let base = Path::new("/dev/shm");
        let scratch = if base.is_dir() {
            tempfile::Builder::new()
                .prefix("ferro-e2e-")
                .tempdir_in(base)?
        } else {
            tempfile::Builder::new().prefix("ferro-e2e-").tempdir()?
        };
        // Passable by others, as a data directory is: dnsmasq re-reads its files as
        // `nobody` from inside it.
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(scratch.path(), std::fs::Permissions::from_mode(0o711))?;
        }
        let data_dir = scratch.path().join("data");
        let api_addr = format!("127.0.0.1:{}", free_port()?);
        let mut cloud = Cloud {
            scratch,
            data_dir,
            api_addr,
            supervisor: None,
            binary,
            options,
        };
        cloud.launch()?;
        Ok(cloud)
    }

    /// Starts `ferro up` on this cloud's data directory and waits until it serves.
    pub fn launch(&mut self) -> anyhow::Result<()> {
        if self.supervisor.is_some() {
            bail!("ferro up is already running");
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.up_log())?;
        let mut command = Command::new(&self.binary);
        command
            .arg("up")
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--api-addr")
            .arg(&self.api_addr)
            .arg("--nodes")
            .arg(self.options.nodes.to_string())
            .arg("--network-driver")
            .arg(&self.options.driver)
            .arg("--name-prefix")
            .arg(&self.options.prefix)
            .env("FERRO_CONFIG", self.config_path())
            .env_remove("FERRO_SERVER")
            .env_remove("FERRO_TOKEN")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = command.spawn().context("cannot start ferro up")?;
        self.supervisor = Some(child);
        self.wait_ready()
    }

    /// Polls until `ferro get project default` succeeds through the written config.
    pub fn wait_ready(&mut self) -> anyhow::Result<()> {
        let begin = Instant::now();
        loop {
            if let Some(child) = &mut self.supervisor
                && let Some(status) = child.try_wait()?
            {
                self.supervisor = None;
                bail!(
                    "ferro up exited ({status}) before serving; its output:\n{}",
                    self.up_output()
                );
            }
            if self.config_path().exists() {
                let out = self.ferro(["get", "project", "default"]).output()?;
                if out.status.success() {
                    return Ok(());
                }
            }
            if begin.elapsed() > READY_TIMEOUT {
                bail!(
                    "ferro up not serving after {READY_TIMEOUT:?}; its output:\n{}",
                    self.up_output()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// A `ferro` CLI command for this cloud (config from `ferro up`, no stray env).
    pub fn ferro<I, S>(&self, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let mut command = Command::new(&self.binary);
        command
            .args(args)
            .env("FERRO_CONFIG", self.config_path())
            .env_remove("FERRO_SERVER")
            .env_remove("FERRO_TOKEN")
            .stdin(Stdio::null());
        command
    }

    /// Runs a CLI command; fails with its output unless it succeeds. Returns stdout.
    pub fn run<I, S>(&self, args: I) -> anyhow::Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let mut command = self.ferro(args);
        let out = command.output()?;
        check(&command, &out)?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// etcd's client URL, as `ferro up` recorded it.
    pub fn etcd_endpoint(&self) -> anyhow::Result<String> {
        let path = self.data_dir.join("etcd.urls");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        text.lines()
            .next()
            .map(str::to_owned)
            .ok_or_else(|| anyhow!("{} is empty", path.display()))
    }

    /// Runs `etcdctl` (API v3) against this cloud's etcd; returns stdout.
    pub fn etcdctl<I, S>(&self, args: I) -> anyhow::Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let mut command = Command::new("etcdctl");
        command
            .env("ETCDCTL_API", "3")
            .arg("--endpoints")
            .arg(self.etcd_endpoint()?)
            .args(args);
        let out = command.output().context("cannot run etcdctl")?;
        check(&command, &out)?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The supervisor's pid, while it runs.
    pub fn supervisor_pid(&self) -> Option<u32> {
        self.supervisor.as_ref().map(Child::id)
    }

    /// SIGKILLs the supervisor only (not its children) and reaps it.
    pub fn kill_supervisor(&mut self) -> anyhow::Result<()> {
        let mut child = self
            .supervisor
            .take()
            .ok_or_else(|| anyhow!("ferro up is not running"))?;
        child.kill()?;
        child.wait()?;
        Ok(())
    }

    /// Waits for the supervisor to exit by itself (after `ferro down`); returns whether
    /// it exited with status 0.
    pub fn wait_supervisor_exit(&mut self, timeout: Duration) -> anyhow::Result<bool> {
        let child = self
            .supervisor
            .as_mut()
            .ok_or_else(|| anyhow!("ferro up is not running"))?;
        let begin = Instant::now();
        loop {
            if let Some(status) = child.try_wait()? {
                self.supervisor = None;
                return Ok(status.success());
            }
            if begin.elapsed() > timeout {
                bail!("ferro up still running after {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Processes (pid, command line) whose command line names the data directory,
    /// except this test process.
    pub fn processes(&self) -> Vec<(u32, String)> {
        processes_naming(&self.data_dir)
    }

    /// Waits until no process names the data directory; returns those left.
    pub fn wait_no_processes(&self, timeout: Duration) -> Vec<(u32, String)> {
        let begin = Instant::now();
        loop {
            let left = self.processes();
            if left.is_empty() || begin.elapsed() > timeout {
                return left;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The options it was started with.
    pub fn options(&self) -> &Options {
        &self.options
    }

    /// The network namespace of node `i` (from 1) of a multi-node cloud.
    pub fn node_netns(&self, i: u32) -> String {
        format!("{}-node-{i}", self.options.prefix)
    }

    /// The namespace standing for the world beyond the provider network of a multi-node
    /// cloud; it holds the external network's upstream address, `203.0.113.1`.
    pub fn outside_netns(&self) -> String {
        format!("{}-outside", self.options.prefix)
    }

    /// Host objects of this cloud's prefix: its namespaces and host links.
    pub fn host_objects(&self) -> Vec<String> {
        host_objects(&self.options.prefix)
    }

    /// The apiserver's address.
    pub fn api_addr(&self) -> &str {
        &self.api_addr
    }

    /// The CLI config `ferro up` writes.
    pub fn config_path(&self) -> PathBuf {
        self.scratch.path().join("config.yaml")
    }

    fn up_log(&self) -> PathBuf {
        self.scratch.path().join("ferro-up.log")
    }

    /// How many periodic resyncs this cloud's agent has run, from its metrics (served on
    /// the loopback port its log names: `ferro up` starts it with `--metrics-addr
    /// 127.0.0.1:0`). Tests that must show that nothing happens wait for resyncs instead
    /// of sleeping, so they fail if no resync ran at all.
    pub fn agent_resyncs(&self) -> anyhow::Result<u64> {
        let log = std::fs::read_to_string(self.data_dir.join("log/agent.log"))?;
        let line = log
            .lines()
            .rev()
            .find(|l| l.contains("serving metrics"))
            .ok_or_else(|| anyhow!("the agent's log names no metrics address"))?;
        let start = line
            .find("127.0.0.1:")
            .ok_or_else(|| anyhow!("no loopback address in {line:?}"))?;
        let port: String = line[start + "127.0.0.1:".len()..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        let mut socket = std::net::TcpStream::connect(("127.0.0.1", port.parse::<u16>()?))?;
        std::io::Write::write_all(&mut socket, b"GET /metrics HTTP/1.0\r\n\r\n")?;
        let mut text = String::new();
        std::io::Read::read_to_string(&mut socket, &mut text)?;
        let sample = "ferro_controller_resyncs_total{controller=\"agent-server\"} ";
        Ok(text
            .lines()
            .find_map(|l| l.strip_prefix(sample))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .map_or(0, |v| v as u64))
    }

    /// Waits until the agent has run `count` more periodic resyncs than now.
    pub fn wait_agent_resyncs(&self, count: u64, timeout: Duration) -> anyhow::Result<()> {
        let start = self.agent_resyncs()?;
        wait_for(&format!("{count} agent resyncs"), timeout, || {
            Ok((self.agent_resyncs()? >= start + count).then_some(()))
        })
    }

    /// What `ferro up` printed, and the end of its children's logs, for failure messages.
    pub fn up_output(&self) -> String {
        let mut out = std::fs::read_to_string(self.up_log()).unwrap_or_default();
        for child in ["etcd", "apiserver"] {
            let path = self.data_dir.join("log").join(format!("{child}.log"));
            if let Ok(text) = std::fs::read_to_string(&path) {
                let lines: Vec<&str> = text.lines().collect();
                out.push_str(&format!("\n--- end of {}:\n", path.display()));
                out.push_str(&lines[lines.len().saturating_sub(20)..].join("\n"));
            }
        }
        out
    }
}

impl Drop for Cloud {
    fn drop(&mut self) {
        if let Some(mut child) = self.supervisor.take() {
            signal(child.id(), Signal::TERM);
            let begin = Instant::now();
            while matches!(child.try_wait(), Ok(None)) && begin.elapsed() < STOP_TIMEOUT {
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        // Children die with the supervisor; give them a moment, then insist. Guests are
        // different: they outlive `ferro up` by design (`ferro down` is what stops them),
        // so this cloud's own guests are ended here, by PID, without counting as a leak.
        for (pid, cmdline) in self.processes() {
            if cmdline.starts_with("qemu-system") {
                signal(pid, Signal::KILL);
            }
        }
        // What a killed supervisor left: namespaces, links, switch instances.
        if self.data_dir.exists() {
            let _ = self
                .ferro(["down", "--data-dir"])
                .arg(&self.data_dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        let left = self.wait_no_processes(Duration::from_secs(30));
        for (pid, _) in &left {
            signal(*pid, Signal::KILL);
        }
        let objects = self.host_objects();
        if (!left.is_empty() || !objects.is_empty()) && !std::thread::panicking() {
            panic!(
                "processes or host objects of {} outlived ferro up: {left:?} {objects:?}",
                self.data_dir.display()
            );
        }
    }
}

/// The network namespaces (`netns NAME`) and host links (`link NAME`) whose names start
/// with `<prefix>-`.
pub fn host_objects(prefix: &str) -> Vec<String> {
    let start = format!("{prefix}-");
    let names = |dir: &str| -> Vec<String> {
        std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| n.starts_with(&start))
            .collect()
    };
    let mut found: Vec<String> = names("/run/netns")
        .into_iter()
        .map(|n| format!("netns {n}"))
        .collect();
    found.extend(
        names("/sys/class/net")
            .into_iter()
            .map(|n| format!("link {n}")),
    );
    found.sort();
    found
}

/// Processes whose command line names `dir` (or a path inside it), except this one.
pub fn processes_naming(dir: &Path) -> Vec<(u32, String)> {
    let dir = dir.to_string_lossy().into_owned();
    let inside = format!("{dir}/");
    let me = std::process::id();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == me || is_zombie(pid) {
            continue;
        }
        let Ok(bytes) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<String> = bytes
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if args.iter().any(|a| *a == dir || a.starts_with(&inside)) {
            found.push((pid, args.join(" ")));
        }
    }
    found
}

fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

/// Sends a signal to a process by pid (which the caller started).
pub fn signal(pid: u32, signal: Signal) {
    if let Some(pid) = i32::try_from(pid).ok().and_then(Pid::from_raw) {
        let _ = rustix::process::kill_process(pid, signal);
    }
}

/// Fails with the command and its output unless it succeeded.
pub fn check(command: &Command, out: &Output) -> anyhow::Result<()> {
    if out.status.success() {
        return Ok(());
    }
    bail!(
        "{command:?} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Polls `check` every 250 ms until it yields a value; an error names `what` after
/// `timeout`.
pub fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> anyhow::Result<Option<T>>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check()? {
            return Ok(value);
        }
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// The rows of a `ferro get` table, each as column → cell. Cells are cut at the header's
/// column starts, which is how the table aligns them; `<none>`, the table's word for an
/// unset field, reads as an empty cell.
pub fn table(text: &str) -> Vec<HashMap<String, String>> {
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let Some(header) = lines.next() else {
        return Vec::new();
    };
    let mut starts: Vec<(usize, String)> = Vec::new();
    let mut previous = ' ';
    for (i, c) in header.char_indices() {
        if c != ' ' && previous == ' ' {
            let name: String = header[i..].chars().take_while(|c| *c != ' ').collect();
            starts.push((i, name));
        }
        previous = c;
    }
    lines
        .map(|line| {
            starts
                .iter()
                .enumerate()
                .map(|(n, (start, name))| {
                    let end = starts
                        .get(n + 1)
                        .map(|(s, _)| *s)
                        .unwrap_or(line.len())
                        .min(line.len());
                    let cell = line.get((*start).min(line.len())..end).unwrap_or("").trim();
                    let cell = if cell == "<none>" { "" } else { cell };
                    (name.clone(), cell.to_owned())
                })
                .collect()
        })
        .collect()
}

/// The test guest's artefacts, as `e2e/images/build-tiny.sh` reports them.
#[derive(Clone, Debug)]
pub struct TinyGuest {
    /// The uncompressed kernel (PVH direct boot).
    pub kernel: String,
    /// The initramfs.
    pub initrd: String,
    /// The small raw data disk.
    pub disk: String,
    /// The kernel command line.
    pub cmdline: String,
}

impl TinyGuest {
    /// The Images a Server boots the test guest from: `tiny` (its disk, booted directly
    /// with the kernel `tiny-kernel` and the ramdisk `tiny-initrd`), as YAML documents
    /// for `ferro apply`, ending with a newline so that `---` and more documents follow.
    pub fn image_manifests(&self) -> String {
        format!(
            r#"apiVersion: ferro/v1
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
            kernel = self.kernel,
            initrd = self.initrd,
            disk = self.disk,
            cmdline = self.cmdline,
        )
    }
}

/// Builds the test guest (or finds it in its cache, `$FERRO_IMAGE_CACHE` or
/// `target/ferro-images`) and returns where its artefacts are.
pub fn tiny_guest() -> anyhow::Result<TinyGuest> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let script = root.join("e2e/images/build-tiny.sh");
    let out = Command::new("bash")
        .arg(&script)
        .env(
            "FERRO_IMAGE_CACHE",
            std::env::var_os("FERRO_IMAGE_CACHE")
                .unwrap_or_else(|| root.join("target/ferro-images").into()),
        )
        .output()
        .with_context(|| format!("cannot run {}", script.display()))?;
    if !out.status.success() {
        bail!(
            "{} failed:\n{}",
            script.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let value = |key: &str| -> anyhow::Result<String> {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .map(str::to_owned)
            .with_context(|| format!("{key} missing from: {text}"))
    };
    Ok(TinyGuest {
        kernel: value("FERRO_TINY_KERNEL")?,
        initrd: value("FERRO_TINY_INITRD")?,
        disk: value("FERRO_TINY_DISK")?,
        cmdline: value("FERRO_TINY_CMDLINE")?,
    })
}
