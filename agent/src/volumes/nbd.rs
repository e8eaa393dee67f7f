//! NBD exports of volumes: how a volume on this node reaches a guest on another. There is
//! no kernel NBD on the hosts; the remote QEMU speaks NBD itself, to one
//! `qemu-storage-daemon` per attachment that serves the volume on the node's underlay
//! address.
//!
//! ```text
//! <dir>/<id>.json   the export asked for: volume uid, file and format, host, port;
//!                   written (atomically) before the daemon starts, removed last
//! <dir>/<id>.pid    the daemon's pid, written by the daemon, removed by it on exit
//! ```
//!
//! The export id is the caller's (`<volume-uid>--<server-uid>`); the NBD export name is
//! the volume's uid, so a client opens `nbd://<host>:<port>/<volume-uid>`.
//!
//! The daemon is started with `--daemonize`: the process we run exits once the daemon
//! listens and has written its pidfile (its exit status says whether that worked), and
//! the daemon lives on in its own session, reparented to init, like QEMU guests. It
//! outlives the agent, and a restarted agent adopts it: a daemon is recognised by its
//! command line, which names the export's pidfile (`--pidfile <dir>/<id>.pid`), so a
//! recycled pid is never taken for it.
//!
//! State is read from the host, never remembered: the records say which exports are
//! wanted and on which port, `/proc` says whether their daemons run. A record whose
//! daemon is dead stays (so its port stays reserved for it) and is reported with pid 0;
//! [`NbdExports::ensure`] starts it again, on the same port when it can, and
//! [`NbdExports::remove`] removes it. Ports are the lowest of the range that no other
//! record holds; a port someone else listens on makes the daemon fail to bind, and the
//! next port is tried.
//!
//! qemu-storage-daemon 7.2 notes: it has no `-name`, hence the pidfile as identity; a
//! regular file needs the `file` driver and a block device (an LVM volume) the
//! `host_device` one (`file` refuses it); a daemon that exits leaves a zombie until init
//! reaps it, which counts as gone. QEMU's image locking refuses to export a volume that
//! another process (a local guest, another export) has open for writing.

use std::collections::BTreeSet;
use std::ops::RangeInclusive;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{
    DiskFormat, VolumeError, VolumeInfo, io, remove_file_if_exists, sync_dir, validate_uid,
    write_atomically,
};

/// The ports exports get unless configured otherwise: from NBD's own port up, 200 of
/// them.
pub const DEFAULT_PORTS: RangeInclusive<u16> = 10809..=11008;
/// The longest export id: two uids and the `--` between them.
pub const MAX_ID_LEN: usize = 2 * super::MAX_UID_LEN + 2;
/// How long `qemu-storage-daemon --daemonize` may take to start serving.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a daemon gets to exit after SIGTERM, before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// How long a SIGKILLed daemon may take to disappear.
const KILL_WAIT: Duration = Duration::from_secs(5);
/// How often liveness is polled while waiting for an exit.
const POLL: Duration = Duration::from_millis(20);

/// One export: a volume served over NBD.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Export {
    /// The export's id, chosen by the caller.
    pub id: String,
    /// The volume served.
    pub volume_uid: String,
    /// The address the daemon listens on (the node's underlay address).
    pub host: String,
    /// The TCP port it listens on.
    pub port: u16,
    /// The NBD export name: the volume's uid.
    pub name: String,
    /// The daemon's pid; 0 when the export is recorded but its daemon does not run.
    pub pid: u32,
}

impl Export {
    /// Whether the daemon runs.
    pub fn is_running(&self) -> bool {
        self.pid != 0
    }

    /// The URL a QEMU NBD client opens (`nbd://host:port/name`, with an IPv6 host in
    /// brackets).
    pub fn url(&self) -> String {
        if self.host.contains(':') {
            format!("nbd://[{}]:{}/{}", self.host, self.port, self.name)
        } else {
            format!("nbd://{}:{}/{}", self.host, self.port, self.name)
        }
    }
}

/// What `<id>.json` holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Record {
    volume_uid: String,
    host: String,
    port: u16,
    path: PathBuf,
    format: DiskFormat,
}

impl Record {
    fn export(&self, id: &str, pid: u32) -> Export {
        Export {
            id: id.to_owned(),
            volume_uid: self.volume_uid.clone(),
            host: self.host.clone(),
            port: self.port,
            name: self.volume_uid.clone(),
            pid,
        }
    }
}

/// The NBD exports of one node, one `qemu-storage-daemon` each. Calls are serialised
/// within one value; one agent owns a directory.
#[derive(Debug)]
pub struct NbdExports {
    dir: PathBuf,
    qemu_storage_daemon: PathBuf,
    bind: String,
    ports: RangeInclusive<u16>,
    lock: tokio::sync::Mutex<()>,
}

impl NbdExports {
    /// Exports recorded in `dir` (made absolute here, created on first use), served by
    /// `qemu_storage_daemon` (a path, or a name looked up in `PATH`) on `bind` (the node's
    /// underlay address, an IPv4 or IPv6 literal) at ports from `ports` (see
    /// [`DEFAULT_PORTS`]).
    pub fn new(
        dir: PathBuf,
        qemu_storage_daemon: PathBuf,
        bind: String,
        ports: RangeInclusive<u16>,
    ) -> Self {
        let dir = std::path::absolute(&dir).unwrap_or(dir);
        NbdExports {
            dir,
            qemu_storage_daemon,
            bind,
            ports,
            lock: tokio::sync::Mutex::new(()),
        }
    }

    /// The directory of the records and pidfiles.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The record of export `id`.
    pub fn record_path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    /// The pidfile of export `id`'s daemon.
    pub fn pidfile(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.pid"))
    }

    /// Makes `volume` served as export `id`. A live daemon of that id serving that
    /// volume's file on this node's address is adopted as it is; one serving anything
    /// else is stopped and replaced. A record left by a dead daemon keeps its port when it
    /// is still free.
    pub async fn ensure(&self, id: &str, volume: &VolumeInfo) -> Result<Export, VolumeError> {
        validate_export_id(id)?;
        validate_uid("volume.uid", &volume.uid)?;
        if self.bind.is_empty() || self.bind.contains(',') {
            return Err(VolumeError::InvalidRequest {
                field: "bind",
                reason: format!("{:?} is not an address", self.bind),
            });
        }
        // The daemon runs in `/`; a relative path would name another file there.
        let path = std::path::absolute(&volume.path)
            .map_err(io(format!("resolving {}", volume.path.display())))?;
        let _guard = self.lock.lock().await;
        let wanted = Record {
            volume_uid: volume.uid.clone(),
            host: self.bind.clone(),
            port: 0,
            path,
            format: volume.format,
        };
        let recorded = self.read_record(id)?;
        if let Some(pid) = self.live_pid(id) {
            match &recorded {
                Some(record)
                    if *record
                        == Record {
                            port: record.port,
                            ..wanted.clone()
                        } =>
                {
                    return Ok(record.export(id, pid));
                }
                _ => {
                    tracing::info!(id, pid, "the export serves something else; replacing it");
                    self.stop(id, pid).await?;
                }
            }
        }
        let block_device = match std::fs::metadata(&wanted.path) {
            Ok(meta) => meta.file_type().is_block_device(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(VolumeError::NotFound(volume.uid.clone()));
            }
            Err(e) => return Err(io(format!("looking at {}", wanted.path.display()))(e)),
        };
        std::fs::create_dir_all(&self.dir)
            .map_err(io(format!("creating {}", self.dir.display())))?;
        let taken = self.ports_of_others(id)?;
        let preferred = recorded.map(|r| r.port);
        let started = std::time::Instant::now();
        for port in candidate_ports(&self.ports, &taken, preferred) {
            let record = Record {
                port,
                ..wanted.clone()
            };
            // Before the daemon: a crash from here on leaves a record to find it by.
            write_record(&self.record_path(id), &record)?;
            match self.start(id, &record, block_device).await? {
                Started::Running(pid) => {
                    tracing::info!(
                        id,
                        volume_uid = %volume.uid,
                        port,
                        pid,
                        elapsed_ms = started.elapsed().as_millis() as u64,
                        "NBD export started"
                    );
                    return Ok(record.export(id, pid));
                }
                Started::PortInUse => {
                    tracing::debug!(id, port, "NBD port in use by someone else; next");
                }
            }
        }
        Err(VolumeError::PortsExhausted {
            first: *self.ports.start(),
            last: *self.ports.end(),
        })
    }

    /// Every recorded export, sorted by id, with the pid of its daemon (0 when the daemon
    /// does not run).
    pub async fn list(&self) -> Result<Vec<Export>, VolumeError> {
        let mut exports = Vec::new();
        for id in self.recorded_ids()? {
            if let Some(record) = self.read_record(&id)? {
                let pid = self.live_pid(&id).unwrap_or(0);
                exports.push(record.export(&id, pid));
            }
        }
        Ok(exports)
    }

    /// Export `id`, if it is recorded.
    pub async fn get(&self, id: &str) -> Result<Option<Export>, VolumeError> {
        validate_export_id(id)?;
        Ok(self
            .read_record(id)?
            .map(|record| record.export(id, self.live_pid(id).unwrap_or(0))))
    }

    /// Ends export `id`: SIGTERM to its daemon (proven to be it), SIGKILL if it lingers,
    /// then removes its pidfile and its record. Nothing there is Ok.
    pub async fn remove(&self, id: &str) -> Result<(), VolumeError> {
        validate_export_id(id)?;
        let _guard = self.lock.lock().await;
        if let Some(pid) = self.live_pid(id) {
            self.stop(id, pid).await?;
        }
        let mut removed = remove_file_if_exists(&self.pidfile(id))?;
        removed |= remove_file_if_exists(&self.record_path(id))?;
        let mut partial = self.record_path(id).into_os_string();
        partial.push(".partial");
        removed |= remove_file_if_exists(Path::new(&partial))?;
        if removed {
            sync_dir(&self.dir)?;
            tracing::info!(id, "NBD export removed");
        }
        Ok(())
    }

    fn read_record(&self, id: &str) -> Result<Option<Record>, VolumeError> {
        let path = self.record_path(id);
        match std::fs::read(&path) {
            Ok(bytes) => match serde_json::from_slice(&bytes) {
                Ok(record) => Ok(Some(record)),
                Err(e) => {
                    tracing::warn!(id, error = %e, "unreadable NBD export record; ignored");
                    Ok(None)
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(format!("reading {}", path.display()))(e)),
        }
    }

    fn recorded_ids(&self) -> Result<Vec<String>, VolumeError> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io(format!("reading {}", self.dir.display()))(e)),
        };
        let mut ids: Vec<String> = entries
            .flatten()
            .filter_map(|e| {
                let name = e.file_name();
                let id = name.to_str()?.strip_suffix(".json")?;
                validate_export_id(id).ok().map(|()| id.to_owned())
            })
            .collect();
        ids.sort();
        Ok(ids)
    }

    /// The ports the records of every other export hold.
    fn ports_of_others(&self, id: &str) -> Result<BTreeSet<u16>, VolumeError> {
        let mut ports = BTreeSet::new();
        for other in self.recorded_ids()? {
            if other != id
                && let Some(record) = self.read_record(&other)?
            {
                ports.insert(record.port);
            }
        }
        Ok(ports)
    }

    /// The pid of export `id`'s daemon, if it runs: the one its pidfile names, or (should
    /// the pidfile be gone) any process whose command line names that pidfile.
    fn live_pid(&self, id: &str) -> Option<u32> {
        let pidfile = self.pidfile(id);
        let recorded = std::fs::read_to_string(&pidfile)
            .ok()
            .and_then(|text| text.trim().parse::<u32>().ok());
        if let Some(pid) = recorded
            && is_export_process(pid, &pidfile)
        {
            return Some(pid);
        }
        let entries = std::fs::read_dir("/proc").ok()?;
        entries
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .find(|pid| is_export_process(*pid, &pidfile))
    }

    /// Runs the daemon for `record` and waits until it serves or fails.
    async fn start(
        &self,
        id: &str,
        record: &Record,
        block_device: bool,
    ) -> Result<Started, VolumeError> {
        let pidfile = self.pidfile(id);
        remove_file_if_exists(&pidfile)?;
        let args = command_line(record, block_device, &pidfile)?;
        let program = self.qemu_storage_daemon.display().to_string();
        let child = tokio::process::Command::new(&self.qemu_storage_daemon)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .output();
        // With --daemonize the process we run exits once the daemon serves (pidfile
        // written), and the daemon points its stdio at /dev/null, which ends our read.
        let output = match tokio::time::timeout(START_TIMEOUT, child).await {
            Ok(output) => output.map_err(io(format!(
                "running {program} (is qemu-system-common installed?)"
            )))?,
            Err(_) => {
                if let Some(pid) = self.live_pid(id) {
                    self.stop(id, pid).await?;
                }
                return Err(VolumeError::Command {
                    program: format!("{program} (export {id})"),
                    status: "timeout".into(),
                    stderr: format!("no answer within {START_TIMEOUT:?}"),
                });
            }
        };
        let stderr = String::from_utf8_lossy(&output.stderr).trim().to_owned();
        if !output.status.success() {
            if stderr.contains("Address already in use") {
                return Ok(Started::PortInUse);
            }
            return Err(VolumeError::Command {
                program: format!("{program} (export {id})"),
                status: output.status.to_string(),
                stderr,
            });
        }
        self.live_pid(id)
            .map(Started::Running)
            .ok_or_else(|| VolumeError::Command {
                program: format!("{program} (export {id})"),
                status: output.status.to_string(),
                stderr: format!("no daemon runs after a successful start; it said: {stderr}"),
            })
    }

    /// Ends export `id`'s daemon `pid`: SIGTERM, then SIGKILL after a grace period.
    async fn stop(&self, id: &str, pid: u32) -> Result<(), VolumeError> {
        let pidfile = self.pidfile(id);
        signal(pid, rustix::process::Signal::TERM);
        if wait_for_exit(pid, &pidfile, STOP_GRACE).await {
            return Ok(());
        }
        tracing::warn!(
            id,
            pid,
            "qemu-storage-daemon ignored SIGTERM; sending SIGKILL"
        );
        if is_export_process(pid, &pidfile) {
            signal(pid, rustix::process::Signal::KILL);
        }
        if wait_for_exit(pid, &pidfile, KILL_WAIT).await {
            Ok(())
        } else {
            Err(VolumeError::WouldNotDie {
                what: format!("qemu-storage-daemon of export {id}"),
                pid,
            })
        }
    }
}

/// How a start attempt ended.
enum Started {
    /// The daemon serves; its pid.
    Running(u32),
    /// The port is taken by someone else.
    PortInUse,
}

/// Checks an export id: 1 to [`MAX_ID_LEN`] letters, digits, `-` or `_`.
pub fn validate_export_id(id: &str) -> Result<(), VolumeError> {
    if id.is_empty()
        || id.len() > MAX_ID_LEN
        || !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(VolumeError::InvalidRequest {
            field: "export.id",
            reason: format!("{id:?} is not 1 to {MAX_ID_LEN} letters, digits, '-' or '_'"),
        });
    }
    Ok(())
}

/// The ports to try, in order: the preferred one (the export's earlier port) if it is in
/// the range and no other export holds it, then every other port of the range no other
/// export holds, lowest first.
fn candidate_ports(
    range: &RangeInclusive<u16>,
    taken: &BTreeSet<u16>,
    preferred: Option<u16>,
) -> Vec<u16> {
    let free = |port: &u16| !taken.contains(port);
    let first = preferred.filter(|p| range.contains(p) && free(p));
    first
        .into_iter()
        .chain(range.clone().filter(|p| free(p) && Some(*p) != first))
        .collect()
}

/// The daemon's arguments for `record`.
fn command_line(
    record: &Record,
    block_device: bool,
    pidfile: &Path,
) -> Result<Vec<String>, VolumeError> {
    let path = record
        .path
        .to_str()
        .ok_or_else(|| VolumeError::InvalidRequest {
            field: "volume.path",
            reason: format!("{} is not UTF-8", record.path.display()),
        })?;
    let pidfile = pidfile
        .to_str()
        .ok_or_else(|| VolumeError::InvalidRequest {
            field: "dir",
            reason: format!("{} is not UTF-8", pidfile.display()),
        })?;
    let driver = if block_device { "host_device" } else { "file" };
    Ok(vec![
        "--blockdev".into(),
        format!(
            "driver={driver},node-name=file,filename={},discard=unmap",
            path.replace(',', ",,")
        ),
        "--blockdev".into(),
        format!(
            "driver={},node-name=vol,file=file,discard=unmap",
            record.format.as_str()
        ),
        "--nbd-server".into(),
        format!(
            "addr.type=inet,addr.host={},addr.port={}",
            record.host, record.port
        ),
        "--export".into(),
        format!(
            "type=nbd,id=export,node-name=vol,name={},writable=on",
            record.volume_uid
        ),
        "--pidfile".into(),
        pidfile.into(),
        "--daemonize".into(),
    ])
}

fn write_record(path: &Path, record: &Record) -> Result<(), VolumeError> {
    let bytes = serde_json::to_vec_pretty(record).expect("records serialise");
    write_atomically(path, &bytes)
}

/// Whether `pid` is alive (not a zombie) and is the daemon of the export whose pidfile is
/// `pidfile`: its command line carries `--pidfile <pidfile>`. This guards against a
/// recycled pid.
pub fn is_export_process(pid: u32, pidfile: &Path) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state follows the parenthesised command name, which may itself hold spaces.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next());
    if matches!(state, Some("Z" | "X") | None) {
        return false;
    }
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let wanted = pidfile.as_os_str().as_encoded_bytes();
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    args.windows(2)
        .any(|pair| pair[0] == b"--pidfile" && pair[1] == wanted)
}

/// Waits until `pid` is no longer the daemon of `pidfile`; false if it still is after
/// `timeout`.
async fn wait_for_exit(pid: u32, pidfile: &Path, timeout: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if !is_export_process(pid, pidfile) {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Sends `signal` to `pid`; a process that is already gone is no error.
fn signal(pid: u32, signal: rustix::process::Signal) {
    if let Some(target) = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    {
        let _ = rustix::process::kill_process(target, signal);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> Record {
        Record {
            volume_uid: "v1".into(),
            host: "10.0.0.5".into(),
            port: 10809,
            path: "/var/lib/ferro/volumes/v1.qcow2".into(),
            format: DiskFormat::Qcow2,
        }
    }

    #[test]
    fn the_daemon_serves_the_volume_by_its_uid_and_is_named_by_its_pidfile() {
        let args =
            command_line(&record(), false, Path::new("/run/nbd/v1--s1.pid")).expect("command line");
        assert_eq!(
            args,
            [
                "--blockdev",
                "driver=file,node-name=file,filename=/var/lib/ferro/volumes/v1.qcow2,discard=unmap",
                "--blockdev",
                "driver=qcow2,node-name=vol,file=file,discard=unmap",
                "--nbd-server",
                "addr.type=inet,addr.host=10.0.0.5,addr.port=10809",
                "--export",
                "type=nbd,id=export,node-name=vol,name=v1,writable=on",
                "--pidfile",
                "/run/nbd/v1--s1.pid",
                "--daemonize",
            ]
        );
    }

    #[test]
    fn block_devices_take_the_host_device_driver_and_commas_are_escaped() {
        let lvm = Record {
            path: "/dev/vg0/ferro-v1".into(),
            format: DiskFormat::Raw,
            ..record()
        };
        let args = command_line(&lvm, true, Path::new("/p.pid")).expect("command line");
        assert_eq!(
            args[1],
            "driver=host_device,node-name=file,filename=/dev/vg0/ferro-v1,discard=unmap"
        );
        assert_eq!(args[3], "driver=raw,node-name=vol,file=file,discard=unmap");
        let odd = Record {
            path: "/srv/a,b/v1.qcow2".into(),
            ..record()
        };
        let args = command_line(&odd, false, Path::new("/p.pid")).expect("command line");
        assert!(
            args[1].contains("filename=/srv/a,,b/v1.qcow2,"),
            "{}",
            args[1]
        );
    }

    #[test]
    fn ports_are_the_lowest_free_with_the_earlier_port_first() {
        let taken = BTreeSet::from([10, 12]);
        assert_eq!(candidate_ports(&(10..=14), &taken, None), [11, 13, 14]);
        assert_eq!(candidate_ports(&(10..=14), &taken, Some(14)), [14, 11, 13]);
        // An earlier port another export now holds, or outside the range, is not kept.
        assert_eq!(candidate_ports(&(10..=14), &taken, Some(12)), [11, 13, 14]);
        assert_eq!(candidate_ports(&(10..=14), &taken, Some(99)), [11, 13, 14]);
        assert_eq!(
            candidate_ports(&(10..=11), &BTreeSet::from([10, 11]), None),
            [] as [u16; 0]
        );
    }

    #[test]
    fn export_ids_hold_two_uids() {
        let id = format!("{}--{}", "a".repeat(64), "b".repeat(64));
        assert!(validate_export_id(&id).is_ok());
        assert!(validate_export_id(&format!("{id}c")).is_err());
        for bad in ["", "a/b", "a.b", "a,b", "a b"] {
            assert!(validate_export_id(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn urls_bracket_ipv6_hosts() {
        let export = record().export("v1--s1", 42);
        assert_eq!(export.url(), "nbd://10.0.0.5:10809/v1");
        assert!(export.is_running());
        let v6 = Export {
            host: "fd00::5".into(),
            pid: 0,
            ..export
        };
        assert_eq!(v6.url(), "nbd://[fd00::5]:10809/v1");
        assert!(!v6.is_running());
    }

    #[test]
    fn records_read_back_as_written() {
        let dir = tempfile::tempdir().expect("temp dir");
        let exports = NbdExports::new(
            dir.path().into(),
            "qemu-storage-daemon".into(),
            "127.0.0.1".into(),
            DEFAULT_PORTS,
        );
        write_record(&exports.record_path("v1--s1"), &record()).expect("write");
        assert_eq!(exports.read_record("v1--s1").expect("read"), Some(record()));
        std::fs::write(exports.record_path("junk"), b"{").expect("write");
        assert_eq!(exports.read_record("junk").expect("read"), None);
        assert_eq!(
            exports.recorded_ids().expect("ids"),
            ["junk".to_owned(), "v1--s1".to_owned()]
        );
        assert_eq!(
            exports.ports_of_others("v2--s1").expect("ports"),
            BTreeSet::from([10809])
        );
        assert!(exports.ports_of_others("v1--s1").expect("ports").is_empty());
    }

    #[tokio::test]
    async fn a_dead_export_is_listed_with_pid_0_and_removal_leaves_nothing() {
        let dir = tempfile::tempdir().expect("temp dir");
        let exports = NbdExports::new(
            dir.path().into(),
            "/nonexistent/qemu-storage-daemon".into(),
            "127.0.0.1".into(),
            DEFAULT_PORTS,
        );
        write_record(&exports.record_path("v1--s1"), &record()).expect("write");
        // A pidfile naming a process that is not the daemon (this test) is not believed.
        std::fs::write(exports.pidfile("v1--s1"), std::process::id().to_string()).expect("write");
        let listed = exports.list().await.expect("list");
        assert_eq!(listed, [record().export("v1--s1", 0)]);
        exports.remove("v1--s1").await.expect("remove");
        exports.remove("v1--s1").await.expect("absent is Ok");
        assert_eq!(std::fs::read_dir(dir.path()).expect("dir").count(), 0);
    }

    #[tokio::test]
    async fn a_missing_volume_is_not_exported() {
        let dir = tempfile::tempdir().expect("temp dir");
        let exports = NbdExports::new(
            dir.path().into(),
            "/nonexistent/qemu-storage-daemon".into(),
            "127.0.0.1".into(),
            DEFAULT_PORTS,
        );
        let volume = VolumeInfo {
            uid: "v1".into(),
            size_bytes: 512,
            path: dir.path().join("v1.qcow2"),
            format: DiskFormat::Qcow2,
        };
        assert!(matches!(
            exports.ensure("v1--s1", &volume).await,
            Err(VolumeError::NotFound(uid)) if uid == "v1"
        ));
        assert!(!exports.record_path("v1--s1").exists());
    }
}
