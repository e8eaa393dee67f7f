//! A real etcd member run as a child process: the store of `ferro up`, and the etcd the
//! conformance suite and the e2e harness test against.
//!
//! [`EtcdProcess::start`] picks free loopback ports (unless told which), starts etcd with its
//! output in a log file, and waits until it serves a linearizable read. Dropping the
//! [`EtcdProcess`] kills the one process it started (SIGKILL: etcd fsyncs its write-ahead log
//! before it acknowledges a write, so nothing acknowledged is lost) and reaps it, then removes
//! a throwaway data directory.
//!
//! A throwaway member keeps its data on tmpfs (`/dev/shm`) because etcd 3.4 has no
//! `--unsafe-no-fsync`, and fsyncs on a loaded disk would dominate test time.
//!
//! The child is not tied to the parent's life: if this process is SIGKILLed, Drop does not
//! run and etcd keeps running. Supervisors that must survive that should record
//! [`EtcdProcess::pid`].
//!
//! The readiness probe uses tokio timers and real network I/O, so call
//! [`EtcdProcess::wait_ready`] on a runtime whose clock is not paused.

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::Store;
use crate::etcd::EtcdStore;

/// Where Debian's `etcd-server` package installs etcd.
pub const DEFAULT_ETCD_BINARY: &str = "/usr/bin/etcd";

/// How long [`EtcdProcess::start`] waits for etcd to serve. It is healthy in about 0.25 s on
/// an idle machine; the margin is for loaded CI machines.
pub const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(30);

/// How many lines of etcd's log an error quotes.
const LOG_TAIL_LINES: usize = 20;
/// How often, and for how long each time, readiness is probed.
const PROBE_INTERVAL: Duration = Duration::from_millis(50);
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// How many times [`EtcdProcess::start`] retries when ports it picked were taken meanwhile.
const PORT_ATTEMPTS: usize = 3;

/// Where an etcd member keeps its data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DataDir {
    /// This directory, kept when the process stops; etcd creates it if it is missing.
    At(PathBuf),
    /// A fresh directory on tmpfs (`/dev/shm`, else the temporary directory), removed when
    /// the [`EtcdProcess`] is dropped.
    Throwaway,
}

/// How to start an etcd member.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EtcdOptions {
    /// The etcd executable.
    pub binary: PathBuf,
    /// The member name (`--name`).
    pub name: String,
    /// Where the member keeps its data.
    pub data_dir: DataDir,
    /// The loopback port for clients; `None` picks a free one. A member with a kept data
    /// directory should keep its ports across restarts.
    pub client_port: Option<u16>,
    /// The loopback port for peers; `None` picks a free one.
    pub peer_port: Option<u16>,
    /// Where etcd's output goes (appended). `None`: `etcd.log` inside a throwaway directory,
    /// or the data directory's path plus `.log` beside a kept one.
    pub log_file: Option<PathBuf>,
}

impl EtcdOptions {
    /// A member on free ports with its data on tmpfs, removed when it stops: for tests.
    pub fn throwaway() -> Self {
        Self {
            binary: PathBuf::from(DEFAULT_ETCD_BINARY),
            name: "ferro".into(),
            data_dir: DataDir::Throwaway,
            client_port: None,
            peer_port: None,
            log_file: None,
        }
    }

    /// A member keeping its data in `dir` across restarts, on free ports unless set.
    pub fn persistent(dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: DataDir::At(dir.into()),
            ..Self::throwaway()
        }
    }
}

/// Errors of starting or supervising an etcd process.
#[derive(Debug, thiserror::Error)]
pub enum EtcdProcessError {
    /// The throwaway directory or the log file could not be created.
    #[error("cannot prepare {path}")]
    Prepare {
        /// The directory or file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// No free loopback port could be found.
    #[error("cannot pick a free loopback port")]
    Port(#[source] io::Error),
    /// The etcd binary could not be run.
    #[error("cannot run {binary}")]
    Spawn {
        /// The binary.
        binary: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// etcd exited before it served.
    #[error("etcd exited ({status}) before serving; end of {log}:\n{tail}")]
    Exited {
        /// How it exited.
        status: ExitStatus,
        /// Its log file.
        log: PathBuf,
        /// The last lines of its log.
        tail: String,
    },
    /// etcd did not serve within the deadline.
    #[error(
        "etcd at {url} not serving after {waited:?} (last probe: {last_error}); end of {log}:\n{tail}"
    )]
    NotReady {
        /// Its client URL.
        url: String,
        /// How long we waited.
        waited: Duration,
        /// Why the last probe failed.
        last_error: String,
        /// Its log file.
        log: PathBuf,
        /// The last lines of its log.
        tail: String,
    },
    /// The process's state could not be read.
    #[error("cannot check on etcd process {pid}")]
    Wait {
        /// The process.
        pid: u32,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// A running etcd member, killed and reaped on drop.
#[derive(Debug)]
pub struct EtcdProcess {
    child: Child,
    /// Set once the child is reaped, so it is never waited for or signalled again (its PID
    /// may by then belong to another process).
    exited: Option<ExitStatus>,
    name: String,
    client_port: u16,
    peer_port: u16,
    client_url: String,
    peer_url: String,
    data_dir: PathBuf,
    log_file: PathBuf,
    /// The throwaway directory; dropped after the process is killed (fields drop after
    /// `Drop::drop`).
    _scratch: Option<TempDir>,
}

impl EtcdProcess {
    /// Starts etcd and waits until it serves, for up to [`DEFAULT_READY_TIMEOUT`]. When it
    /// picked the ports itself and another process took one before etcd bound it, it retries
    /// on fresh ports.
    pub async fn start(options: EtcdOptions) -> Result<Self, EtcdProcessError> {
        let picks_ports = options.client_port.is_none() || options.peer_port.is_none();
        let mut attempt = 1;
        loop {
            let mut process = Self::spawn(options.clone())?;
            match process.wait_ready(DEFAULT_READY_TIMEOUT).await {
                Ok(()) => return Ok(process),
                Err(EtcdProcessError::Exited { tail, .. })
                    if picks_ports
                        && attempt < PORT_ATTEMPTS
                        && tail.contains("address already in use") =>
                {
                    tracing::warn!(attempt, "etcd lost a race for its port; retrying on others");
                    attempt += 1;
                }
                Err(error) => return Err(error),
            }
        }
    }

    /// Starts etcd without waiting for it; see [`EtcdProcess::wait_ready`].
    pub fn spawn(options: EtcdOptions) -> Result<Self, EtcdProcessError> {
        let (scratch, data_dir, default_log) = match options.data_dir {
            DataDir::At(dir) => {
                let mut log = OsString::from(dir.as_os_str());
                log.push(".log");
                (None, dir, PathBuf::from(log))
            }
            DataDir::Throwaway => {
                let base = Path::new("/dev/shm");
                let base = if base.is_dir() {
                    base.to_path_buf()
                } else {
                    std::env::temp_dir()
                };
                let scratch = tempfile::Builder::new()
                    .prefix("ferro-etcd-")
                    .tempdir_in(&base)
                    .map_err(|source| EtcdProcessError::Prepare { path: base, source })?;
                let data_dir = scratch.path().join("data");
                let log = scratch.path().join("etcd.log");
                (Some(scratch), data_dir, log)
            }
        };
        let log_file = options.log_file.unwrap_or(default_log);
        let (client_port, peer_port) = pick_ports(options.client_port, options.peer_port)?;
        let client_url = format!("http://127.0.0.1:{client_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");

        let prepare = |source| EtcdProcessError::Prepare {
            path: log_file.clone(),
            source,
        };
        if let Some(parent) = log_file.parent() {
            std::fs::create_dir_all(parent).map_err(prepare)?;
        }
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_file)
            .map_err(prepare)?;
        let log_for_stdout = log.try_clone().map_err(prepare)?;

        let mut command = Command::new(&options.binary);
        command
            .arg("--name")
            .arg(&options.name)
            .arg("--data-dir")
            .arg(&data_dir)
            .arg("--listen-client-urls")
            .arg(&client_url)
            .arg("--advertise-client-urls")
            .arg(&client_url)
            .arg("--listen-peer-urls")
            .arg(&peer_url)
            .arg("--initial-advertise-peer-urls")
            .arg(&peer_url)
            .arg("--initial-cluster")
            .arg(format!("{}={peer_url}", options.name))
            .arg("--initial-cluster-state")
            .arg("new")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log_for_stdout))
            .stderr(Stdio::from(log));
        // etcd reads every ETCD_* variable as a flag; the member we start is the one the
        // arguments above describe, whatever the caller's environment says.
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("ETCD_") {
                command.env_remove(name);
            }
        }
        let child = command.spawn().map_err(|source| EtcdProcessError::Spawn {
            binary: options.binary.clone(),
            source,
        })?;
        tracing::debug!(pid = child.id(), %client_url, data_dir = %data_dir.display(), "started etcd");
        Ok(Self {
            child,
            exited: None,
            name: options.name,
            client_port,
            peer_port,
            client_url,
            peer_url,
            data_dir,
            log_file,
            _scratch: scratch,
        })
    }

    /// Waits until etcd serves a linearizable read (so it has a leader and applied its log),
    /// for up to `timeout`. Fails at once if etcd exits, quoting the end of its log.
    pub async fn wait_ready(&mut self, timeout: Duration) -> Result<(), EtcdProcessError> {
        let begin = Instant::now();
        loop {
            if let Some(status) = self.try_exit_status()? {
                return Err(EtcdProcessError::Exited {
                    status,
                    log: self.log_file.clone(),
                    tail: self.log_tail(LOG_TAIL_LINES),
                });
            }
            let last_error = match tokio::time::timeout(PROBE_TIMEOUT, self.probe()).await {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(error)) => error.to_string(),
                Err(_) => format!("no answer within {PROBE_TIMEOUT:?}"),
            };
            if begin.elapsed() >= timeout {
                return Err(EtcdProcessError::NotReady {
                    url: self.client_url.clone(),
                    waited: begin.elapsed(),
                    last_error,
                    log: self.log_file.clone(),
                    tail: self.log_tail(LOG_TAIL_LINES),
                });
            }
            tokio::time::sleep(PROBE_INTERVAL).await;
        }
    }

    async fn probe(&self) -> Result<(), crate::StoreError> {
        let store = EtcdStore::connect(std::slice::from_ref(&self.client_url)).await?;
        store.current_revision().await.map(|_| ())
    }

    /// The URL clients connect to, `http://127.0.0.1:PORT`.
    pub fn client_url(&self) -> &str {
        &self.client_url
    }

    /// The URL peers connect to, `http://127.0.0.1:PORT`.
    pub fn peer_url(&self) -> &str {
        &self.peer_url
    }

    /// The client port.
    pub fn client_port(&self) -> u16 {
        self.client_port
    }

    /// The peer port.
    pub fn peer_port(&self) -> u16 {
        self.peer_port
    }

    /// The member name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The process ID of the etcd child.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The member's data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The file etcd's output goes to.
    pub fn log_file(&self) -> &Path {
        &self.log_file
    }

    /// The last `lines` lines of etcd's log, for error messages; empty if it cannot be read.
    pub fn log_tail(&self, lines: usize) -> String {
        read_tail(&self.log_file, lines).unwrap_or_default()
    }

    /// How etcd exited, if it has; for a supervisor to notice a crash.
    pub fn try_exit_status(&mut self) -> Result<Option<ExitStatus>, EtcdProcessError> {
        if self.exited.is_none() {
            let pid = self.child.id();
            self.exited = self
                .child
                .try_wait()
                .map_err(|source| EtcdProcessError::Wait { pid, source })?;
        }
        Ok(self.exited)
    }

    /// Kills etcd (SIGKILL, to this PID only) and reaps it; does nothing if it already
    /// exited and was reaped. Returns how it exited.
    pub fn kill(&mut self) -> Result<ExitStatus, EtcdProcessError> {
        if let Some(status) = self.try_exit_status()? {
            return Ok(status);
        }
        let pid = self.child.id();
        let wait_error = |source| EtcdProcessError::Wait { pid, source };
        self.child.kill().map_err(wait_error)?;
        let status = self.child.wait().map_err(wait_error)?;
        self.exited = Some(status);
        tracing::debug!(pid, "stopped etcd");
        Ok(status)
    }
}

impl Drop for EtcdProcess {
    fn drop(&mut self) {
        if let Err(error) = self.kill() {
            tracing::warn!(pid = self.child.id(), %error, "could not stop etcd");
        }
    }
}

/// The given ports, with free loopback ports for the missing ones. Both listeners are held
/// until both are chosen, so the two picks differ.
fn pick_ports(client: Option<u16>, peer: Option<u16>) -> Result<(u16, u16), EtcdProcessError> {
    let mut held = Vec::new();
    let mut pick = |given: Option<u16>| -> Result<u16, EtcdProcessError> {
        if let Some(port) = given {
            return Ok(port);
        }
        let listener = TcpListener::bind(("127.0.0.1", 0)).map_err(EtcdProcessError::Port)?;
        let port = listener
            .local_addr()
            .map_err(EtcdProcessError::Port)?
            .port();
        held.push(listener);
        Ok(port)
    };
    Ok((pick(client)?, pick(peer)?))
}

/// The last `lines` lines of a file, reading at most its last 64 KiB.
fn read_tail(path: &Path, lines: usize) -> io::Result<String> {
    const WINDOW: u64 = 64 * 1024;
    let mut file = File::open(path)?;
    let len = file.metadata()?.len();
    file.seek(SeekFrom::Start(len.saturating_sub(WINDOW)))?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)?;
    let text = String::from_utf8_lossy(&bytes);
    let all: Vec<&str> = text.lines().collect();
    Ok(all[all.len().saturating_sub(lines)..].join("\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picked_ports_differ_and_given_ones_are_kept() {
        let (client, peer) = pick_ports(None, None).unwrap();
        assert_ne!(client, peer);
        assert_eq!(pick_ports(Some(12379), None).unwrap().0, 12379);
        assert_eq!(pick_ports(Some(1), Some(2)).unwrap(), (1, 2));
    }

    #[test]
    fn tail_keeps_the_last_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        std::fs::write(&path, "one\ntwo\nthree\n").unwrap();
        assert_eq!(read_tail(&path, 2).unwrap(), "two\nthree");
        assert_eq!(read_tail(&path, 10).unwrap(), "one\ntwo\nthree");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn kept_data_survives_a_restart_and_drop_reaps_the_process() {
        use crate::{Store, Txn, TxnOp};
        let base = Path::new("/dev/shm");
        let dir = if base.is_dir() {
            tempfile::tempdir_in(base)
        } else {
            tempfile::tempdir()
        };
        let dir = dir.unwrap();
        let mut options = EtcdOptions::persistent(dir.path().join("etcd"));

        let first = EtcdProcess::start(options.clone()).await.unwrap();
        let pid = first.pid();
        assert!(Path::new(&format!("/proc/{pid}")).exists());
        let store = EtcdStore::connect(&[first.client_url().to_owned()])
            .await
            .unwrap();
        let put = TxnOp::Put {
            key: "/kept".into(),
            value: b"yes".to_vec(),
            lease: None,
        };
        store
            .txn(Txn {
                success: vec![put],
                ..Txn::default()
            })
            .await
            .unwrap();
        options.client_port = Some(first.client_port());
        options.peer_port = Some(first.peer_port());
        assert!(
            first.log_file().starts_with(dir.path()),
            "log beside the data"
        );
        drop(first);
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "etcd {pid} still there"
        );

        let second = EtcdProcess::start(options).await.unwrap();
        let store = EtcdStore::connect(&[second.client_url().to_owned()])
            .await
            .unwrap();
        let kept = store
            .get("/kept")
            .await
            .unwrap()
            .expect("data lost across restart");
        assert_eq!(kept.value, b"yes");
    }

    #[tokio::test]
    async fn missing_binary_is_reported_by_name() {
        let options = EtcdOptions {
            binary: PathBuf::from("/nonexistent/etcd"),
            ..EtcdOptions::throwaway()
        };
        let error = EtcdProcess::spawn(options).unwrap_err();
        assert!(error.to_string().contains("/nonexistent/etcd"), "{error}");
    }

    #[tokio::test]
    async fn etcd_that_cannot_start_is_reported_with_its_log() {
        // A data directory that is a file: etcd refuses it and says so in its log.
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("not-a-dir");
        std::fs::write(&file, "").unwrap();
        let error = EtcdProcess::start(EtcdOptions::persistent(&file))
            .await
            .unwrap_err();
        let EtcdProcessError::Exited { tail, .. } = &error else {
            panic!("expected an exit, got {error}");
        };
        assert!(!tail.is_empty(), "no log quoted: {error}");
    }
}
