//! A private Open vSwitch instance: its own `ovsdb-server` and `ovs-vswitchd`, with every
//! file (database, sockets, pidfiles, logs) in one directory and nothing written to `/etc`
//! or `/var/run`.
//!
//! `ferro up --nodes N` runs one per node namespace, so the nodes of a cloud on one machine
//! have switches as separate as those of separate hosts; tests run one each. The daemons
//! detach and outlive whoever started them (guests' traffic must not depend on the agent);
//! they are found again from their pidfiles, and [`OvsInstance::stop`] ends them by PID,
//! after checking that the PID is still the daemon of this directory.
//!
//! With a namespace, the daemons run inside it (`ip netns exec`): the userspace datapath
//! then sees that namespace's devices and makes its internal ports there. The sockets are
//! files, so the driver reaches them from any namespace.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use super::ovs::OvsConfig;

/// Where Debian's `openvswitch-common` keeps the database schema.
pub const DEFAULT_SCHEMA: &str = "/usr/share/openvswitch/vswitch.ovsschema";

/// How long [`OvsInstance::stop`] waits for a daemon to exit before it kills it.
const STOP_GRACE: Duration = Duration::from_secs(3);

/// Why an instance did not start or stop.
#[derive(Debug, thiserror::Error)]
pub enum OvsInstanceError {
    /// A program could not be run, or a file not written or read.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A program failed.
    #[error("{program} failed ({status}): {stderr}")]
    Command {
        /// The program, with its most telling arguments.
        program: String,
        /// Its exit status.
        status: String,
        /// What it printed on stderr (or the end of its log).
        stderr: String,
    },
    /// A daemon would not die.
    #[error("{daemon} (pid {pid}) still runs after SIGKILL")]
    WouldNotDie {
        /// The daemon's name.
        daemon: &'static str,
        /// Its pid.
        pid: u32,
    },
    /// The directory's path cannot hold the instance's sockets.
    #[error("{}: too long for unix sockets in it", .0.display())]
    DirTooLong(PathBuf),
}

/// The two daemons of an instance, in the order they start.
const DAEMONS: [&str; 2] = ["ovsdb-server", "ovs-vswitchd"];

/// One private Open vSwitch instance in a directory, perhaps in a network namespace.
#[derive(Debug, Clone)]
pub struct OvsInstance {
    dir: PathBuf,
    netns: Option<String>,
    schema: PathBuf,
}

impl OvsInstance {
    /// An instance that keeps everything in `dir` and runs in the host's namespace.
    pub fn new(dir: impl Into<PathBuf>) -> OvsInstance {
        OvsInstance {
            dir: dir.into(),
            netns: None,
            schema: DEFAULT_SCHEMA.into(),
        }
    }

    /// Runs the daemons inside the network namespace `netns` (which must exist).
    pub fn in_netns(mut self, netns: impl Into<String>) -> OvsInstance {
        self.netns = Some(netns.into());
        self
    }

    /// Uses another database schema file.
    pub fn with_schema(mut self, schema: impl Into<PathBuf>) -> OvsInstance {
        self.schema = schema.into();
        self
    }

    /// The instance's directory (its `OVS_RUNDIR`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The network namespace the daemons run in, if not the host's.
    pub fn netns(&self) -> Option<&str> {
        self.netns.as_deref()
    }

    /// The OVSDB socket.
    pub fn db_socket(&self) -> PathBuf {
        super::ovsdb_socket(&self.dir)
    }

    /// How [`super::ovs::OvsSwitch`] reaches this instance.
    pub fn switch_config(&self) -> OvsConfig {
        OvsConfig::new(&self.dir)
    }

    fn pidfile(&self, daemon: &str) -> PathBuf {
        self.dir.join(format!("{daemon}.pid"))
    }

    /// The pid of a daemon of this instance, if it runs.
    pub fn pid(&self, daemon: &str) -> Option<u32> {
        let pid: u32 = std::fs::read_to_string(self.pidfile(daemon))
            .ok()?
            .trim()
            .parse()
            .ok()?;
        self.is_ours(pid, daemon).then_some(pid)
    }

    /// Whether both daemons run.
    pub fn is_running(&self) -> bool {
        DAEMONS.iter().all(|daemon| self.pid(daemon).is_some())
    }

    /// Whether `pid` is `daemon` started for this directory (and not a reused pid).
    fn is_ours(&self, pid: u32, daemon: &str) -> bool {
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            return false;
        };
        let mut args = cmdline.split(|b| *b == 0).map(String::from_utf8_lossy);
        let program_matches = args
            .next()
            .is_some_and(|program| program.rsplit('/').next() == Some(daemon));
        let pidfile = format!("--pidfile={}", self.pidfile(daemon).display());
        program_matches && args.any(|arg| arg == pidfile)
    }

    /// Starts whatever of the instance does not run: creates the database on first start,
    /// then `ovsdb-server`, then `ovs-vswitchd`. Daemons that run already are kept, so
    /// starting twice is harmless.
    pub async fn start(&self) -> Result<(), OvsInstanceError> {
        // `<dir>/<bridge>.mgmt` must fit a unix socket path (108 bytes).
        if self.dir.as_os_str().len() > 80 {
            return Err(OvsInstanceError::DirTooLong(self.dir.clone()));
        }
        std::fs::create_dir_all(&self.dir).map_err(|source| OvsInstanceError::Io {
            what: format!("create {}", self.dir.display()),
            source,
        })?;
        let db = self.dir.join("conf.db");
        if !db.exists() {
            self.run(
                "ovsdb-tool",
                &["create".into(), path_arg(&db), path_arg(&self.schema)],
            )
            .await?;
        }
        if self.pid("ovsdb-server").is_none() {
            let d = self.dir.display();
            self.run(
                "ovsdb-server",
                &[
                    path_arg(&db),
                    format!("--remote=punix:{}", self.db_socket().display()),
                    "--remote=db:Open_vSwitch,Open_vSwitch,manager_options".into(),
                    format!("--pidfile={}", self.pidfile("ovsdb-server").display()),
                    format!("--unixctl={d}/ovsdb-server.ctl"),
                    format!("--log-file={d}/ovsdb-server.log"),
                    "--detach".into(),
                    "--no-chdir".into(),
                ],
            )
            .await?;
            // Makes the root row; harmless when it exists.
            self.run(
                "ovs-vsctl",
                &[
                    format!("--db=unix:{}", self.db_socket().display()),
                    "--no-wait".into(),
                    "init".into(),
                ],
            )
            .await?;
        }
        if self.pid("ovs-vswitchd").is_none() {
            let d = self.dir.display();
            self.run(
                "ovs-vswitchd",
                &[
                    format!("unix:{}", self.db_socket().display()),
                    format!("--pidfile={}", self.pidfile("ovs-vswitchd").display()),
                    format!("--unixctl={d}/ovs-vswitchd.ctl"),
                    format!("--log-file={d}/ovs-vswitchd.log"),
                    "--detach".into(),
                    "--no-chdir".into(),
                ],
            )
            .await?;
        }
        Ok(())
    }

    /// Runs an OVS program with the instance's directories, in its namespace.
    async fn run(&self, program: &str, args: &[String]) -> Result<(), OvsInstanceError> {
        let mut command = match &self.netns {
            Some(netns) => {
                let mut command = tokio::process::Command::new("ip");
                command.args(["netns", "exec", netns, program]);
                command
            }
            None => tokio::process::Command::new(program),
        };
        for var in ["OVS_RUNDIR", "OVS_LOGDIR", "OVS_DBDIR", "OVS_SYSCONFDIR"] {
            command.env(var, &self.dir);
        }
        // A detaching daemon hands its stdio to /dev/null once it is ready, so reading
        // stderr to its end waits for exactly that.
        let output = command
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .await
            .map_err(|source| OvsInstanceError::Io {
                what: format!("run {program}"),
                source,
            })?;
        if !output.status.success() {
            return Err(OvsInstanceError::Command {
                program: program.to_owned(),
                status: output.status.to_string(),
                stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
            });
        }
        Ok(())
    }

    /// Stops both daemons: asks `ovs-vswitchd` to exit and remove its datapath (a
    /// SIGTERM would leave the devices of its internal ports behind), then ends what still
    /// runs by PID, SIGTERM and then SIGKILL after a grace period. Blocks for at most a few
    /// seconds. Keeps the directory (the database survives, as a host's does); nothing
    /// running is not an error.
    pub fn stop(&self) -> Result<(), OvsInstanceError> {
        // The switch first, so it never runs without its database.
        for daemon in DAEMONS.iter().rev() {
            let Some(pid) = self.pid(daemon) else {
                continue;
            };
            if *daemon == "ovs-vswitchd" {
                let control = self.dir.join("ovs-vswitchd.ctl");
                let asked = std::process::Command::new("ovs-appctl")
                    .arg(format!("--target={}", control.display()))
                    .args(["--timeout=2", "exit", "--cleanup"])
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|status| status.success());
                if asked && self.wait_gone(pid, daemon, STOP_GRACE) {
                    continue;
                }
            }
            let target = rustix::process::Pid::from_raw(pid as i32).expect("pids are positive");
            let _ = rustix::process::kill_process(target, rustix::process::Signal::TERM);
            if self.wait_gone(pid, daemon, STOP_GRACE) {
                continue;
            }
            let _ = rustix::process::kill_process(target, rustix::process::Signal::KILL);
            if !self.wait_gone(pid, daemon, Duration::from_secs(2)) {
                return Err(OvsInstanceError::WouldNotDie { daemon, pid });
            }
        }
        Ok(())
    }

    fn wait_gone(&self, pid: u32, daemon: &str, within: Duration) -> bool {
        let started = Instant::now();
        while self.is_ours(pid, daemon) && !is_zombie(pid) {
            if started.elapsed() >= within {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        true
    }

    /// Stops the instance and removes its directory.
    pub fn destroy(&self) -> Result<(), OvsInstanceError> {
        self.stop()?;
        match std::fs::remove_dir_all(&self.dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(OvsInstanceError::Io {
                what: format!("remove {}", self.dir.display()),
                source,
            }),
        }
    }
}

/// Whether a process has ended but not been reaped (its parent is the process that
/// started it and has not waited yet): as gone as it can be for us.
fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
    })
}

fn path_arg(path: &Path) -> String {
    path.display().to_string()
}
