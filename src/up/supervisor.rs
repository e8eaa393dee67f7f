//! The supervisor of `ferro up`: starts its children in order, waiting until each one
//! serves, restarts any that crashes with exponential backoff, and stops them in reverse
//! order (SIGTERM, a grace period, SIGKILL).
//!
//! Every child is this same binary in another role (`ferro etcd`, `ferro apiserver`, …),
//! in its own process group (so Ctrl-C reaches only the supervisor, which stops children
//! in order), with its output appended to `log/<name>.log` and `PR_SET_PDEATHSIG` set, so
//! it dies with the supervisor even if that is SIGKILLed.

use std::ffi::OsString;
use std::fs::OpenOptions;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};
use ferro_api::retry::{self, BackoffBuilder};
use ferro_api::{Error as ApiError, Kind, client::Client};
use ferro_store::Store;
use ferro_store::etcd::EtcdStore;
use rustix::process::Signal;
use tokio::sync::watch;

use super::datadir::DataDir;
use crate::process;

/// How long a child gets to exit after SIGTERM.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// How long a child may take to serve after it starts.
const READY_TIMEOUT: Duration = Duration::from_secs(90);
/// The longest wait before restarting a crashed child, should its schedule run out.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A child that ran this long before crashing starts its restart schedule
/// ([`retry::restart_child`]) over.
const STABLE_AFTER: Duration = Duration::from_secs(60);
/// How often children are checked on.
const POLL: Duration = Duration::from_millis(250);
/// How many lines of a child's log an error quotes.
const LOG_TAIL_LINES: usize = 15;

/// How to tell that a child serves.
#[derive(Clone, Debug)]
pub enum Readiness {
    /// An etcd member answers a linearizable read at this client URL.
    Etcd(String),
    /// The apiserver at this address answers an authenticated call.
    Api {
        /// `HOST:PORT`.
        address: String,
        /// A token it accepts.
        token: String,
    },
    /// A role that only calls out (the controllers, the agent) serves once it holds its
    /// Lease — leader election's `controllers`, the agent's heartbeat `node-<name>` — and
    /// has renewed it since it started: a Lease a predecessor renewed does not count.
    Lease {
        /// The apiserver's `HOST:PORT`.
        address: String,
        /// A token that may read Leases.
        token: String,
        /// The Lease's name.
        lease: String,
    },
}

/// One row of the children table: a role of this binary and its arguments.
#[derive(Clone, Debug)]
pub struct ChildSpec {
    /// The child's name: its pidfile and log are named after it.
    pub name: String,
    /// The arguments after the binary: `["apiserver", "--listen", …]`.
    pub args: Vec<OsString>,
    /// The network namespace the child runs in (through `nsenter --net`, which execs, so
    /// the pid is the child's own); the supervisor's when unset. Not `ip netns exec`:
    /// that also gives the child a mount namespace of its own, in which the namespaces an
    /// agent makes (`qdhcp-…`, `qprobe-…`) would be mounted where no one else sees them.
    pub netns: Option<String>,
    /// How to tell it serves, before the next child starts.
    pub ready: Readiness,
}

struct Running {
    spec: ChildSpec,
    child: Option<Child>,
    started: Instant,
    backoff: retry::Backoff,
    restart_at: Option<Instant>,
}

/// The running children of one `ferro up`.
pub struct Supervisor {
    dir: DataDir,
    binary: PathBuf,
    children: Vec<Running>,
}

impl Supervisor {
    /// A supervisor running children of this binary, with their files in `dir`.
    pub fn new(dir: DataDir) -> anyhow::Result<Self> {
        let binary = std::env::current_exe().context("cannot find the ferro binary")?;
        Ok(Supervisor {
            dir,
            binary,
            children: Vec::new(),
        })
    }

    /// Starts the children in order, each once the previous one serves. Fails, quoting
    /// the end of its log, if a child exits or does not serve in time; returns `Ok(false)`
    /// if a stop was requested meanwhile.
    pub async fn start(
        &mut self,
        specs: Vec<ChildSpec>,
        stop: &mut watch::Receiver<bool>,
    ) -> anyhow::Result<bool> {
        for spec in specs {
            let child = self.spawn(&spec)?;
            tracing::info!(pid = child.id(), "started {}", spec.name);
            let ready = spec.ready.clone();
            self.children.push(Running {
                spec,
                child: Some(child),
                started: Instant::now(),
                backoff: retry::restart_child().build(),
                restart_at: None,
            });
            let index = self.children.len() - 1;
            tokio::select! {
                result = self.wait_ready(index, &ready) => result?,
                _ = stop.wait_for(|s| *s) => return Ok(false),
            }
            tracing::info!("{} is serving", self.children[index].spec.name);
        }
        Ok(true)
    }

    /// Watches the children until a stop is requested, restarting crashed ones.
    pub async fn supervise(&mut self, stop: &mut watch::Receiver<bool>) {
        loop {
            tokio::select! {
                _ = stop.wait_for(|s| *s) => return,
                _ = tokio::time::sleep(POLL) => self.check_children(),
            }
        }
    }

    fn check_children(&mut self) {
        let now = Instant::now();
        for index in 0..self.children.len() {
            let running = &mut self.children[index];
            if let Some(child) = &mut running.child {
                match child.try_wait() {
                    Ok(None) => continue,
                    Ok(Some(status)) => {
                        let ran = running.started.elapsed();
                        if ran >= STABLE_AFTER {
                            running.backoff = retry::restart_child().build();
                        }
                        let delay = running.backoff.next().unwrap_or(MAX_BACKOFF);
                        running.child = None;
                        running.restart_at = Some(now + delay);
                        let log = self.dir.child_log(&running.spec.name);
                        tracing::warn!(
                            "{} exited ({}) after {ran:.0?}; restarting in {delay:.1?} (log: {})",
                            running.spec.name,
                            describe_status(status),
                            log.display()
                        );
                        let _ = std::fs::remove_file(self.dir.child_pidfile(&running.spec.name));
                    }
                    Err(e) => tracing::warn!("cannot check on {}: {e}", running.spec.name),
                }
            } else if running.restart_at.is_some_and(|at| at <= now) {
                let spec = running.spec.clone();
                match self.spawn(&spec) {
                    Ok(child) => {
                        tracing::info!(pid = child.id(), "restarted {}", spec.name);
                        let running = &mut self.children[index];
                        running.child = Some(child);
                        running.started = Instant::now();
                        running.restart_at = None;
                    }
                    Err(e) => {
                        let running = &mut self.children[index];
                        let delay = running.backoff.next().unwrap_or(MAX_BACKOFF);
                        running.restart_at = Some(now + delay);
                        tracing::warn!(
                            "cannot restart {}: {e:#}; retrying in {delay:.1?}",
                            spec.name
                        );
                    }
                }
            }
        }
    }

    fn spawn(&self, spec: &ChildSpec) -> anyhow::Result<Child> {
        let log_path = self.dir.child_log(&spec.name);
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("cannot open {}", log_path.display()))?;
        let mut command = match &spec.netns {
            Some(netns) => {
                let mut command = Command::new("nsenter");
                command
                    .arg(format!("--net=/run/netns/{netns}"))
                    .arg("--")
                    .arg(&self.binary);
                command
            }
            None => Command::new(&self.binary),
        };
        command
            .args(&spec.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0);
        process::die_with_parent(&mut command);
        let child = command
            .spawn()
            .with_context(|| format!("cannot start {} ({})", spec.name, self.binary.display()))?;
        process::write_pidfile(&self.dir.child_pidfile(&spec.name), child.id())
            .with_context(|| format!("cannot write the pidfile of {}", spec.name))?;
        Ok(child)
    }

    async fn wait_ready(&mut self, index: usize, ready: &Readiness) -> anyhow::Result<()> {
        let begin = Instant::now();
        let started = std::time::SystemTime::now();
        let name = self.children[index].spec.name.clone();
        let name = name.as_str();
        loop {
            if let Some(child) = &mut self.children[index].child
                && let Some(status) = child.try_wait()?
            {
                self.children[index].child = None;
                return Err(anyhow!(
                    "{name} exited ({}) before serving; end of {}:\n{}",
                    describe_status(status),
                    self.dir.child_log(name).display(),
                    self.log_tail(name)
                ));
            }
            let last_error =
                match tokio::time::timeout(Duration::from_secs(5), probe(ready, started)).await {
                    Ok(Ok(())) => return Ok(()),
                    Ok(Err(e)) => e,
                    Err(_) => "no answer within 5s".to_owned(),
                };
            if begin.elapsed() > READY_TIMEOUT {
                return Err(anyhow!(
                    "{name} did not serve within {READY_TIMEOUT:?} ({last_error}); end of {}:\n{}",
                    self.dir.child_log(name).display(),
                    self.log_tail(name)
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn log_tail(&self, name: &str) -> String {
        let text = std::fs::read_to_string(self.dir.child_log(name)).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
    }

    /// Stops every child, last started first: SIGTERM, up to the grace period, SIGKILL.
    pub fn stop_all(&mut self) {
        while let Some(mut running) = self.children.pop() {
            let name = &running.spec.name;
            if let Some(mut child) = running.child.take() {
                stop_child(name, &mut child);
            }
            let _ = std::fs::remove_file(self.dir.child_pidfile(name));
        }
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        self.stop_all();
    }
}

fn stop_child(name: &str, child: &mut Child) {
    let pid = child.id();
    if matches!(child.try_wait(), Ok(Some(_))) {
        return;
    }
    process::signal(pid, Signal::TERM);
    let deadline = Instant::now() + STOP_GRACE;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => {
                tracing::info!("stopped {name} ({})", describe_status(status));
                return;
            }
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            _ => break,
        }
    }
    tracing::warn!("{name} still running {STOP_GRACE:?} after SIGTERM; killing it");
    let _ = child.kill();
    let _ = child.wait();
}

/// `exit status 1`, `signal 9 (SIGKILL)`.
fn describe_status(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(9)) => "killed by SIGKILL".into(),
        (None, Some(15)) => "killed by SIGTERM".into(),
        (None, Some(signal)) => format!("killed by signal {signal}"),
        _ => status.to_string(),
    }
}

async fn probe(ready: &Readiness, started: std::time::SystemTime) -> Result<(), String> {
    match ready {
        Readiness::Etcd(url) => {
            let store = EtcdStore::connect(std::slice::from_ref(url))
                .await
                .map_err(|e| e.to_string())?;
            store
                .current_revision()
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        }
        Readiness::Api { address, token } => {
            let client = Client::connect_lazy(address, token).map_err(|e| e.to_string())?;
            match client
                .get(Kind::Project, "", ferro_api::server::DEFAULT_PROJECT)
                .await
            {
                Ok(_) | Err(ApiError::NotFound { .. }) => Ok(()),
                Err(e) => Err(e.to_string()),
            }
        }
        Readiness::Lease {
            address,
            token,
            lease,
        } => {
            let client = Client::connect_lazy(address, token).map_err(|e| e.to_string())?;
            let object = match client.get(Kind::Lease, "", lease).await {
                Ok(object) => object,
                Err(ApiError::NotFound { .. }) => return Err(format!("no Lease {lease} yet")),
                Err(e) => return Err(e.to_string()),
            };
            let ferro_api::Object::Lease(lease_object) = object else {
                return Err(format!("Lease {lease} is another kind"));
            };
            let spec = lease_object.spec.unwrap_or_default();
            let renewed = spec
                .renew_time
                .and_then(|t| std::time::SystemTime::try_from(t).ok());
            match renewed {
                Some(at) if !spec.holder_identity.is_empty() && at >= started => Ok(()),
                _ => Err(format!(
                    "Lease {lease} not renewed since the start (holder `{}`)",
                    spec.holder_identity
                )),
            }
        }
    }
}
