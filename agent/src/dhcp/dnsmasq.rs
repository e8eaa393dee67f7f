//! The real [`Dhcp`] driver: one dnsmasq per network, inside the network's `qdhcp-`
//! namespace, as Neutron's DHCP agent runs it.
//!
//! Each network has a directory `<state>/dhcp/<network-uid>/` holding dnsmasq's pid file,
//! hosts file (`MAC,IP,hostname` lines), options file, lease file and log. dnsmasq
//! daemonizes, so it outlives the agent. A process is taken to be a network's server only
//! when `/proc/PID/cmdline` proves it: the program is dnsmasq and its `--pid-file` is that
//! network's pid file; a pid file alone is never trusted (pids are reused). [`Dhcp::list`]
//! reads both the directories and the live processes, so a server whose directory was
//! deleted by hand is still found and can be removed.
//!
//! What [`Dhcp::ensure`] does follows from comparing what should be with what is
//! ([`classify`]): the running process's own command line (read back from `/proc`, and its
//! network namespace, compared by inode), and the hosts and options files on disk. Hosts
//! and options are re-read on SIGHUP; everything else needs a restart. So does a lease
//! that holds a host's address for another MAC (a deleted Port's address given to a new
//! one): dnsmasq keeps leases in memory and would not serve the new guest until the old
//! lease expired, so the lease is dropped from the file while dnsmasq is stopped
//! ([`prune_leases`]).
//!
//! dnsmasq drops root (to `nobody`) after start-up and re-reads its files on SIGHUP as that
//! user, so the files are world-readable and every directory above them must be searchable
//! by others; [`Dhcp::ensure`] says so rather than leave a server that silently stops
//! reloading.
//!
//! IPv6 subnets are served by DHCPv6 in `static` mode (addresses only to known hosts, DNS
//! servers as `option6:dns-server`); router advertisements, which tell IPv6 guests to ask
//! and carry their gateway and routes, are the router's job.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use async_trait::async_trait;
use ipnet::IpNet;

use super::{Change, Dhcp, DhcpError, DhcpInstance, DhcpServer, validate};

/// The program started in the namespace.
const DNSMASQ: &str = "dnsmasq";

/// How long a stopping dnsmasq gets between SIGTERM and SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(3);

/// How long a started dnsmasq gets to write its pid file.
const START_WAIT: Duration = Duration::from_secs(3);

const POLL: Duration = Duration::from_millis(20);

/// Where named network namespaces live (what `ip netns` makes).
const NETNS_DIR: &str = "/run/netns";

/// The files of one network's server, in its directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerFiles {
    dir: PathBuf,
}

impl ServerFiles {
    /// The files in `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> ServerFiles {
        ServerFiles { dir: dir.into() }
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// dnsmasq's pid file, whose path in its command line identifies the process.
    pub fn pid(&self) -> PathBuf {
        self.dir.join("pid")
    }

    /// The static hosts, re-read on SIGHUP.
    pub fn hosts(&self) -> PathBuf {
        self.dir.join("hosts")
    }

    /// The per-subnet options, re-read on SIGHUP.
    pub fn options(&self) -> PathBuf {
        self.dir.join("opts")
    }

    /// The leases dnsmasq hands out, kept across restarts.
    pub fn leases(&self) -> PathBuf {
        self.dir.join("leases")
    }

    /// dnsmasq's own log (start-up, leases, reloads), for an operator.
    pub fn log(&self) -> PathBuf {
        self.dir.join("dnsmasq.log")
    }
}

/// The dnsmasq tag of the `index`th subnet, which ties its options to its range.
fn subnet_tag(index: usize) -> String {
    format!("subnet{index}")
}

/// dnsmasq's arguments (after the program name) for `server`, with its files in `files`.
/// Every argument is one `--name=value` word, so the running process's command line can be
/// compared with it word for word.
pub fn command_line(server: &DhcpServer, files: &ServerFiles) -> Vec<String> {
    let path = |p: PathBuf| p.display().to_string();
    let mut args = vec![
        "--no-hosts".to_owned(),
        "--no-resolv".to_owned(),
        // Debian's dnsmasq reads /etc/dnsmasq.conf otherwise.
        "--conf-file=/dev/null".to_owned(),
        format!("--pid-file={}", path(files.pid())),
        format!("--dhcp-hostsfile={}", path(files.hosts())),
        format!("--dhcp-optsfile={}", path(files.options())),
        format!("--dhcp-leasefile={}", path(files.leases())),
        format!("--log-facility={}", path(files.log())),
        format!("--interface={}", server.interface),
        "--bind-interfaces".to_owned(),
        "--except-interface=lo".to_owned(),
        // Addresses are static: probing them first only delays each offer by seconds.
        "--no-ping".to_owned(),
        format!("--domain={}", server.domain),
        // Forced: most clients do not ask for the MTU, and a VXLAN network needs it.
        format!("--dhcp-option-force=option:mtu,{}", server.mtu),
    ];
    for (index, subnet) in server.subnets.iter().enumerate() {
        let tag = subnet_tag(index);
        let lease = subnet.lease_time.as_secs();
        let range = match subnet.cidr {
            IpNet::V4(net) => format!("{},static,{}", net.network(), net.netmask()),
            IpNet::V6(net) => format!("{},static,{}", net.network(), net.prefix_len()),
        };
        args.push(format!("--dhcp-range=set:{tag},{range},{lease}s"));
    }
    args
}

/// The hosts file: one `MAC,IP,hostname` line per fixed address in a served subnet (IPv6
/// in brackets; no hostname when it is not a DNS label), sorted so that the same hosts in
/// another order write the same file and cause no reload. An address on a subnet without
/// DHCP is left out rather than given to dnsmasq to puzzle over.
pub fn hosts_file(server: &DhcpServer) -> String {
    let mut lines: Vec<String> = server
        .hosts
        .iter()
        .filter(|host| server.subnets.iter().any(|s| s.cidr.contains(&host.ip)))
        .map(|host| {
            let mac = host.mac.to_ascii_lowercase();
            let address = match host.ip {
                std::net::IpAddr::V4(ip) => ip.to_string(),
                std::net::IpAddr::V6(ip) => format!("[{ip}]"),
            };
            if super::is_hostname(&host.hostname) {
                format!("{mac},{address},{}\n", host.hostname)
            } else {
                format!("{mac},{address}\n")
            }
        })
        .collect();
    lines.sort();
    lines.dedup();
    lines.concat()
}

/// The options file, per subnet (by its tag): the router (option 3) when the subnet has a
/// gateway, and an empty router otherwise, since dnsmasq would offer itself as the
/// router; DNS servers (option 6) when given, else dnsmasq's default, itself; classless
/// static routes (option 121) when the subnet has host routes, with the default route
/// via the gateway among them, because a client that takes option 121 ignores option 3
/// (RFC 3442). IPv6 subnets get their DNS servers only.
pub fn options_file(server: &DhcpServer) -> String {
    let mut out = String::new();
    for (index, subnet) in server.subnets.iter().enumerate() {
        let tag = subnet_tag(index);
        let join = |addresses: &mut dyn Iterator<Item = String>| {
            addresses.collect::<Vec<String>>().join(",")
        };
        if subnet.cidr.addr().is_ipv6() {
            if !subnet.dns_servers.is_empty() {
                let dns = join(&mut subnet.dns_servers.iter().map(|a| format!("[{a}]")));
                let _ = writeln!(out, "tag:{tag},option6:dns-server,{dns}");
            }
            continue;
        }
        match subnet.gateway {
            Some(gateway) => {
                let _ = writeln!(out, "tag:{tag},option:router,{gateway}");
            }
            None => {
                let _ = writeln!(out, "tag:{tag},option:router");
            }
        }
        if !subnet.dns_servers.is_empty() {
            let dns = join(&mut subnet.dns_servers.iter().map(|a| a.to_string()));
            let _ = writeln!(out, "tag:{tag},option:dns-server,{dns}");
        }
        if !subnet.host_routes.is_empty() {
            let mut routes: Vec<String> = subnet
                .host_routes
                .iter()
                .map(|route| format!("{},{}", route.destination.trunc(), route.nexthop))
                .collect();
            let has_default = subnet
                .host_routes
                .iter()
                .any(|route| route.destination.prefix_len() == 0);
            if let (Some(gateway), false) = (subnet.gateway, has_default) {
                routes.push(format!("0.0.0.0/0,{gateway}"));
            }
            let _ = writeln!(
                out,
                "tag:{tag},option:classless-static-route,{}",
                routes.join(",")
            );
        }
    }
    out
}

/// Everything dnsmasq is given for a server: its arguments and its two re-readable files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    /// The arguments after the program name.
    pub args: Vec<String>,
    /// The hosts file's contents.
    pub hosts: String,
    /// The options file's contents.
    pub options: String,
}

/// Renders `server` with its files in `files`.
pub fn render(server: &DhcpServer, files: &ServerFiles) -> Rendered {
    Rendered {
        args: command_line(server, files),
        hosts: hosts_file(server),
        options: options_file(server),
    }
}

/// A network's dnsmasq as found running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunningServer {
    /// Its pid.
    pub pid: u32,
    /// Its arguments after the program name, from `/proc/PID/cmdline`.
    pub args: Vec<String>,
    /// Whether it runs in the namespace it should.
    pub in_namespace: bool,
}

/// A network's server as found on the host.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Found {
    /// Its running processes: normally none or one; more only after a pid file was lost.
    pub running: Vec<RunningServer>,
    /// The hosts file on disk, if any.
    pub hosts: Option<String>,
    /// The options file on disk, if any.
    pub options: Option<String>,
    /// Whether the lease file holds a lease that keeps a host from its address
    /// ([`prune_leases`]).
    pub stale_leases: bool,
}

/// What must be done to go from `found` to `desired`. A stale lease is a restart: dnsmasq
/// keeps its leases in memory and reads the lease file only when it starts.
pub fn classify(desired: &Rendered, found: &Found) -> Change {
    match found.running.as_slice() {
        [] => Change::Start,
        [one] if one.in_namespace && one.args == desired.args && !found.stale_leases => {
            let same_files = found.hosts.as_deref() == Some(desired.hosts.as_str())
                && found.options.as_deref() == Some(desired.options.as_str());
            if same_files {
                Change::Nothing
            } else {
                Change::Reload
            }
        }
        _ => Change::Restart,
    }
}

/// The lease file without the IPv4 leases that hold a host's address for another MAC, or
/// `None` when there is none. Such a lease is left by a deleted Port whose address went to
/// a new Port: dnsmasq will not hand a configured address to its host while another client
/// holds a lease on it ("not using configured address … because it is leased to …"), so
/// the new guest would get nothing until the old lease expired. Lines are
/// `expiry MAC IP hostname client-id`; DHCPv6 lines (which carry an IAID, not a MAC) and
/// anything else are kept as they are.
pub fn prune_leases(leases: &str, server: &DhcpServer) -> Option<String> {
    let owners: BTreeMap<std::net::IpAddr, String> = server
        .hosts
        .iter()
        .map(|host| (host.ip, host.mac.to_ascii_lowercase()))
        .collect();
    let mut pruned = false;
    let mut kept = String::new();
    for line in leases.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let held_for_another = match fields.as_slice() {
            [_, mac, ip, ..] if super::is_mac(mac) => ip
                .parse::<std::net::Ipv4Addr>()
                .ok()
                .and_then(|ip| owners.get(&std::net::IpAddr::V4(ip)))
                .is_some_and(|owner| *owner != mac.to_ascii_lowercase()),
            _ => false,
        };
        if held_for_another {
            pruned = true;
        } else {
            kept.push_str(line);
            kept.push('\n');
        }
    }
    pruned.then_some(kept)
}

/// The network a process serves, if it is a dnsmasq started by a driver with its
/// directories under `root`: its program is dnsmasq and its pid file is
/// `<root>/<network-uid>/pid`.
pub fn served_network(argv: &[String], root: &Path) -> Option<String> {
    let program = argv.first()?;
    if program.rsplit('/').next() != Some(DNSMASQ) {
        return None;
    }
    let pid_file = argv
        .iter()
        .find_map(|arg| arg.strip_prefix("--pid-file="))?;
    let uid_dir = Path::new(pid_file).strip_prefix(root).ok()?;
    let mut parts = uid_dir.components();
    let uid = parts.next()?.as_os_str().to_str()?.to_owned();
    let rest: Vec<_> = parts.collect();
    (rest.len() == 1 && rest[0].as_os_str() == "pid" && super::is_safe_uid(&uid)).then_some(uid)
}

/// The command line of a live process (not a zombie), word by word.
fn process_argv(pid: u32) -> Option<Vec<String>> {
    process_info(pid).map(|(_, argv)| argv)
}

/// The parent and the command line of a live process (not a zombie).
fn process_info(pid: u32) -> Option<(u32, Vec<String>)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The state and the parent follow the parenthesised command name, which may itself
    // hold spaces.
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace();
    let state = fields.next();
    let ppid: u32 = fields.next()?.parse().ok()?;
    if matches!(state, Some("Z" | "X") | None) {
        return None;
    }
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let mut argv: Vec<String> = cmdline
        .split(|b| *b == 0)
        .map(|arg| String::from_utf8_lossy(arg).into_owned())
        .collect();
    if argv.last().is_some_and(String::is_empty) {
        argv.pop();
    }
    Some((ppid, argv))
}

/// Whether process `pid` runs in network namespace `namespace` (by the namespace's inode).
fn runs_in_namespace(pid: u32, namespace: &str) -> bool {
    let process = std::fs::metadata(format!("/proc/{pid}/ns/net"));
    let named = std::fs::metadata(Path::new(NETNS_DIR).join(namespace));
    match (process, named) {
        (Ok(process), Ok(named)) => process.dev() == named.dev() && process.ino() == named.ino(),
        _ => false,
    }
}

fn io(what: String) -> impl FnOnce(std::io::Error) -> DhcpError {
    move |source| DhcpError::Io { what, source }
}

/// Reads a file, `None` when it does not exist.
fn read_optional(path: &Path) -> Result<Option<String>, DhcpError> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io(format!("read {}", path.display()))(e)),
    }
}

/// Replaces a file's contents in one step, world-readable: write beside it, then rename, so
/// dnsmasq reloading at any moment reads the old file or the new one, never half of one.
fn write_atomically(path: &Path, contents: &str) -> Result<(), DhcpError> {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let staging = path.with_file_name(format!(".{name}.new"));
    std::fs::write(&staging, contents).map_err(io(format!("write {}", staging.display())))?;
    std::fs::set_permissions(&staging, std::fs::Permissions::from_mode(0o644))
        .map_err(io(format!("chmod {}", staging.display())))?;
    std::fs::rename(&staging, path).map_err(io(format!("rename to {}", path.display())))
}

/// Makes a directory (and any missing parents) and opens it to be searched by others.
fn make_searchable_dir(dir: &Path) -> Result<(), DhcpError> {
    std::fs::create_dir_all(dir).map_err(io(format!("create {}", dir.display())))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
        .map_err(io(format!("chmod {}", dir.display())))
}

/// The dnsmasq driver. See the module notes.
#[derive(Debug, Clone)]
pub struct DnsmasqDhcp {
    root: PathBuf,
}

impl DnsmasqDhcp {
    /// A driver keeping its servers' files under `<state_dir>/dhcp/`. The path is made
    /// absolute: dnsmasq changes to `/` when it daemonizes, and its pid file's path in its
    /// command line is what identifies it.
    pub fn new(state_dir: &Path) -> Result<DnsmasqDhcp, DhcpError> {
        let root = std::path::absolute(state_dir.join("dhcp"))
            .map_err(io(format!("resolve {}", state_dir.display())))?;
        Ok(DnsmasqDhcp { root })
    }

    /// The directory all servers' directories live in.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The files of a network's server.
    pub fn files(&self, network_uid: &str) -> ServerFiles {
        ServerFiles::new(self.root.join(network_uid))
    }

    /// Every dnsmasq of ours running on the host, by network uid. A process forked by a
    /// server (dnsmasq forks one per DNS-over-TCP connection) carries its parent's
    /// command line and is not a server of its own.
    fn running_servers(&self) -> Result<BTreeMap<String, Vec<u32>>, DhcpError> {
        let mut processes: BTreeMap<String, Vec<(u32, u32)>> = BTreeMap::new();
        let entries = std::fs::read_dir("/proc").map_err(io("list /proc".to_owned()))?;
        for entry in entries.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            if let Some((ppid, argv)) = process_info(pid)
                && let Some(uid) = served_network(&argv, &self.root)
            {
                processes.entry(uid).or_default().push((pid, ppid));
            }
        }
        Ok(processes
            .into_iter()
            .map(|(uid, found)| {
                let pids: Vec<u32> = found.iter().map(|(pid, _)| *pid).collect();
                let servers = found
                    .iter()
                    .filter(|(_, ppid)| !pids.contains(ppid))
                    .map(|(pid, _)| *pid)
                    .collect();
                (uid, servers)
            })
            .collect())
    }

    /// Whether `pid` is the server of `network_uid` now.
    fn is_server_of(&self, pid: u32, network_uid: &str) -> bool {
        process_argv(pid)
            .and_then(|argv| served_network(&argv, &self.root))
            .is_some_and(|uid| uid == network_uid)
    }

    /// The pids of a network's running servers: the one its pid file names when that is
    /// proven ours; otherwise whatever the process table holds for it.
    fn server_pids(&self, network_uid: &str) -> Result<Vec<u32>, DhcpError> {
        let from_file = read_optional(&self.files(network_uid).pid())?
            .and_then(|text| text.trim().parse::<u32>().ok())
            .filter(|pid| self.is_server_of(*pid, network_uid));
        match from_file {
            Some(pid) => Ok(vec![pid]),
            None => Ok(self
                .running_servers()?
                .remove(network_uid)
                .unwrap_or_default()),
        }
    }

    fn observe(&self, server: &DhcpServer, files: &ServerFiles) -> Result<Found, DhcpError> {
        let running = self
            .server_pids(&server.network_uid)?
            .into_iter()
            .filter_map(|pid| {
                let argv = process_argv(pid)?;
                Some(RunningServer {
                    pid,
                    args: argv[1..].to_vec(),
                    in_namespace: runs_in_namespace(pid, &server.namespace),
                })
            })
            .collect();
        let leases = read_optional(&files.leases())?.unwrap_or_default();
        Ok(Found {
            running,
            hosts: read_optional(&files.hosts())?,
            options: read_optional(&files.options())?,
            stale_leases: prune_leases(&leases, server).is_some(),
        })
    }

    /// Drops the leases that keep hosts from their addresses; only while dnsmasq is
    /// stopped, since it rewrites the file from memory.
    fn prune_lease_file(&self, server: &DhcpServer, files: &ServerFiles) -> Result<(), DhcpError> {
        let leases = read_optional(&files.leases())?.unwrap_or_default();
        if let Some(kept) = prune_leases(&leases, server) {
            tracing::info!(
                network_uid = server.network_uid,
                "dropping leases on addresses that moved to another MAC"
            );
            write_atomically(&files.leases(), &kept)?;
        }
        Ok(())
    }

    /// Makes the network's directory and checks that dnsmasq, once it has dropped root,
    /// can still reach the files in it.
    fn prepare_directory(&self, files: &ServerFiles) -> Result<(), DhcpError> {
        make_searchable_dir(&self.root)?;
        make_searchable_dir(files.dir())?;
        for dir in files.dir().ancestors() {
            let mode = std::fs::metadata(dir)
                .map_err(io(format!("stat {}", dir.display())))?
                .mode();
            if mode & 0o001 == 0 {
                return Err(DhcpError::StateDirNotSearchable(dir.to_owned()));
            }
        }
        Ok(())
    }

    /// Writes the files that differ from what is on disk.
    fn write_files(
        &self,
        files: &ServerFiles,
        desired: &Rendered,
        found: &Found,
    ) -> Result<(), DhcpError> {
        if found.hosts.as_deref() != Some(desired.hosts.as_str()) {
            write_atomically(&files.hosts(), &desired.hosts)?;
        }
        if found.options.as_deref() != Some(desired.options.as_str()) {
            write_atomically(&files.options(), &desired.options)?;
        }
        Ok(())
    }

    /// Stops the given servers of a network: SIGTERM, then SIGKILL to those still running
    /// after a grace period. Signals only processes proven to be that network's server.
    async fn stop(&self, network_uid: &str, pids: &[u32]) -> Result<(), DhcpError> {
        for &pid in pids {
            if self.is_server_of(pid, network_uid) {
                signal(pid, rustix::process::Signal::TERM);
            }
        }
        let mut left = self.wait_gone(network_uid, pids, STOP_GRACE).await;
        if left.is_empty() {
            return Ok(());
        }
        tracing::warn!(
            network_uid,
            ?left,
            "dnsmasq ignored SIGTERM; sending SIGKILL"
        );
        for &pid in &left {
            signal(pid, rustix::process::Signal::KILL);
        }
        left = self.wait_gone(network_uid, &left, STOP_GRACE).await;
        match left.first() {
            None => Ok(()),
            Some(&pid) => Err(DhcpError::WouldNotDie {
                network_uid: network_uid.to_owned(),
                pid,
            }),
        }
    }

    /// Waits until none of `pids` is the network's server; returns those that still are.
    async fn wait_gone(&self, network_uid: &str, pids: &[u32], within: Duration) -> Vec<u32> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let left: Vec<u32> = pids
                .iter()
                .copied()
                .filter(|pid| self.is_server_of(*pid, network_uid))
                .collect();
            if left.is_empty() || tokio::time::Instant::now() >= deadline {
                return left;
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Starts dnsmasq in the server's namespace and waits for its pid file to name it.
    async fn start(
        &self,
        server: &DhcpServer,
        files: &ServerFiles,
        desired: &Rendered,
    ) -> Result<u32, DhcpError> {
        let uid = &server.network_uid;
        match std::fs::remove_file(files.pid()) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(format!("remove {}", files.pid().display()))(e)),
        }
        // dnsmasq forks into the background once it listens and reports start-up errors
        // through its exit status first, so waiting for `ip` to exit waits for exactly
        // that; the daemon hands its stdio to /dev/null, which ends the read of stderr.
        let output = tokio::process::Command::new("ip")
            .args(["netns", "exec", &server.namespace, DNSMASQ])
            .args(&desired.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .await
            .map_err(io(format!(
                "run ip netns exec {} dnsmasq",
                server.namespace
            )))?;
        if !output.status.success() {
            return Err(DhcpError::StartFailed {
                network_uid: uid.clone(),
                status: output.status.to_string(),
                stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
            });
        }
        let deadline = tokio::time::Instant::now() + START_WAIT;
        loop {
            let pid = read_optional(&files.pid())?
                .and_then(|text| text.trim().parse::<u32>().ok())
                .filter(|pid| self.is_server_of(*pid, uid));
            if let Some(pid) = pid {
                return Ok(pid);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(DhcpError::NotRunning(uid.clone()));
            }
            tokio::time::sleep(POLL).await;
        }
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

#[async_trait]
impl Dhcp for DnsmasqDhcp {
    async fn ensure(&self, server: &DhcpServer) -> Result<Change, DhcpError> {
        validate(server)?;
        // Checked before anything is stopped, so a missing namespace never costs a
        // running server.
        if !Path::new(NETNS_DIR).join(&server.namespace).exists() {
            return Err(DhcpError::NoNamespace(server.namespace.clone()));
        }
        let files = self.files(&server.network_uid);
        self.prepare_directory(&files)?;
        let desired = render(server, &files);
        let found = self.observe(server, &files)?;
        let change = classify(&desired, &found);
        let uid = server.network_uid.as_str();
        match change {
            Change::Nothing => {}
            Change::Reload => {
                self.write_files(&files, &desired, &found)?;
                let pid = found.running[0].pid;
                if self.is_server_of(pid, uid) {
                    signal(pid, rustix::process::Signal::HUP);
                }
                tracing::info!(
                    network_uid = uid,
                    pid,
                    "dnsmasq reloads its hosts and options"
                );
            }
            Change::Restart | Change::Start => {
                let pids: Vec<u32> = found.running.iter().map(|r| r.pid).collect();
                self.stop(uid, &pids).await?;
                self.write_files(&files, &desired, &found)?;
                self.prune_lease_file(server, &files)?;
                let pid = self.start(server, &files, &desired).await?;
                tracing::info!(network_uid = uid, pid, ?change, "dnsmasq started");
            }
        }
        Ok(change)
    }

    async fn remove(&self, network_uid: &str) -> Result<(), DhcpError> {
        if !super::is_safe_uid(network_uid) {
            return Err(super::invalid(
                "network_uid",
                format!("{network_uid:?} is not a uid"),
            ));
        }
        let mut pids = self.server_pids(network_uid)?;
        // A pid file may name one server while a stray second one runs; take them all.
        for pid in self
            .running_servers()?
            .remove(network_uid)
            .unwrap_or_default()
        {
            if !pids.contains(&pid) {
                pids.push(pid);
            }
        }
        self.stop(network_uid, &pids).await?;
        let dir = self.files(network_uid).dir().to_owned();
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io(format!("remove {}", dir.display()))(e)),
        }
    }

    async fn list(&self) -> Result<Vec<DhcpInstance>, DhcpError> {
        let mut instances: BTreeMap<String, DhcpInstance> = BTreeMap::new();
        match std::fs::read_dir(&self.root) {
            Ok(entries) => {
                for entry in entries.flatten() {
                    let Some(uid) = entry.file_name().to_str().map(str::to_owned) else {
                        continue;
                    };
                    if super::is_safe_uid(&uid) && entry.path().is_dir() {
                        instances.insert(
                            uid.clone(),
                            DhcpInstance {
                                network_uid: uid,
                                pid: None,
                                has_directory: true,
                            },
                        );
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(format!("list {}", self.root.display()))(e)),
        }
        for (uid, pids) in self.running_servers()? {
            let instance = instances
                .entry(uid.clone())
                .or_insert_with(|| DhcpInstance {
                    network_uid: uid,
                    pid: None,
                    has_directory: false,
                });
            instance.pid = pids.into_iter().min();
        }
        Ok(instances.into_values().collect())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::dhcp::tests::server;
    use crate::dhcp::{DhcpHost, DhcpSubnet, HostRoute};

    fn files() -> ServerFiles {
        ServerFiles::new("/var/lib/ferro/dhcp/net-1")
    }

    fn route(destination: &str, nexthop: &str) -> HostRoute {
        HostRoute {
            destination: destination.parse().unwrap(),
            nexthop: nexthop.parse().unwrap(),
        }
    }

    #[test]
    fn the_command_line_is_the_verified_one() {
        let mut two_subnets = server();
        two_subnets.subnets.push(DhcpSubnet {
            cidr: "2001:db8:1::/64".parse().unwrap(),
            gateway: None,
            dns_servers: vec![],
            host_routes: vec![],
            lease_time: Duration::from_secs(3600),
        });
        two_subnets.mtu = 1400;
        two_subnets.domain = "example.org".into();
        let common = |mtu: u32, domain: &str| {
            vec![
                "--no-hosts".to_owned(),
                "--no-resolv".into(),
                "--conf-file=/dev/null".into(),
                "--pid-file=/var/lib/ferro/dhcp/net-1/pid".into(),
                "--dhcp-hostsfile=/var/lib/ferro/dhcp/net-1/hosts".into(),
                "--dhcp-optsfile=/var/lib/ferro/dhcp/net-1/opts".into(),
                "--dhcp-leasefile=/var/lib/ferro/dhcp/net-1/leases".into(),
                "--log-facility=/var/lib/ferro/dhcp/net-1/dnsmasq.log".into(),
                "--interface=ns-3f2a9c41d0e7".into(),
                "--bind-interfaces".into(),
                "--except-interface=lo".into(),
                "--no-ping".into(),
                format!("--domain={domain}"),
                format!("--dhcp-option-force=option:mtu,{mtu}"),
            ]
        };
        let cases = [
            (server(), {
                let mut args = common(1450, "openstacklocal");
                args.push("--dhcp-range=set:subnet0,10.0.1.0,static,255.255.255.0,86400s".into());
                args
            }),
            (two_subnets, {
                let mut args = common(1400, "example.org");
                args.push("--dhcp-range=set:subnet0,10.0.1.0,static,255.255.255.0,86400s".into());
                args.push("--dhcp-range=set:subnet1,2001:db8:1::,static,64,3600s".into());
                args
            }),
        ];
        for (input, expected) in cases {
            assert_eq!(command_line(&input, &files()), expected);
        }
    }

    #[test]
    fn the_hosts_file_has_one_sorted_line_per_address() {
        let host = |mac: &str, ip: &str, name: &str| DhcpHost {
            mac: mac.into(),
            ip: ip.parse().unwrap(),
            hostname: name.into(),
        };
        let cases = [
            (vec![], ""),
            (
                vec![host("fa:16:3e:00:00:01", "10.0.1.5", "web-1")],
                "fa:16:3e:00:00:01,10.0.1.5,web-1\n",
            ),
            (
                vec![
                    host("FA:16:3E:00:00:02", "10.0.1.6", "db-1"),
                    host("fa:16:3e:00:00:01", "2001:db8:1::5", "web-1"),
                    host("fa:16:3e:00:00:01", "10.0.1.5", "web-1"),
                ],
                "fa:16:3e:00:00:01,10.0.1.5,web-1\n\
                 fa:16:3e:00:00:01,[2001:db8:1::5],web-1\n\
                 fa:16:3e:00:00:02,10.0.1.6,db-1\n",
            ),
            (
                vec![
                    host("fa:16:3e:00:00:03", "10.0.1.7", "db_1"),
                    host("fa:16:3e:00:00:04", "10.0.1.8", "a,b"),
                    host("fa:16:3e:00:00:05", "10.0.1.9", ""),
                ],
                "fa:16:3e:00:00:03,10.0.1.7\n\
                 fa:16:3e:00:00:04,10.0.1.8\n\
                 fa:16:3e:00:00:05,10.0.1.9\n",
            ),
            (
                vec![
                    host("fa:16:3e:00:00:06", "10.0.2.6", "on-a-subnet-without-dhcp"),
                    host("fa:16:3e:00:00:06", "2001:db8:2::6", "elsewhere"),
                ],
                "",
            ),
        ];
        for (hosts, expected) in cases {
            let mut input = server();
            input.subnets.push(DhcpSubnet {
                cidr: "2001:db8:1::/64".parse().unwrap(),
                gateway: None,
                dns_servers: vec![],
                host_routes: vec![],
                lease_time: Duration::from_secs(86_400),
            });
            input.hosts = hosts;
            assert_eq!(hosts_file(&input), expected);
        }
    }

    #[test]
    fn the_options_file_per_subnet() {
        let subnet = |gateway: Option<&str>, dns: &[&str], routes: Vec<HostRoute>| DhcpSubnet {
            cidr: "10.0.1.0/24".parse().unwrap(),
            gateway: gateway.map(|g| g.parse().unwrap()),
            dns_servers: dns.iter().map(|a| a.parse().unwrap()).collect(),
            host_routes: routes,
            lease_time: Duration::from_secs(86_400),
        };
        let metadata = || route("169.254.169.254/32", "10.0.1.2");
        let cases = [
            (
                "gateway only",
                vec![subnet(Some("10.0.1.1"), &[], vec![])],
                "tag:subnet0,option:router,10.0.1.1\n",
            ),
            (
                "no gateway: dnsmasq must not offer itself as the router",
                vec![subnet(None, &[], vec![])],
                "tag:subnet0,option:router\n",
            ),
            (
                "DNS servers",
                vec![subnet(Some("10.0.1.1"), &["8.8.8.8", "1.1.1.1"], vec![])],
                "tag:subnet0,option:router,10.0.1.1\n\
                 tag:subnet0,option:dns-server,8.8.8.8,1.1.1.1\n",
            ),
            (
                "host routes carry the default route via the gateway",
                vec![subnet(Some("10.0.1.1"), &[], vec![metadata()])],
                "tag:subnet0,option:router,10.0.1.1\n\
                 tag:subnet0,option:classless-static-route,169.254.169.254/32,10.0.1.2,0.0.0.0/0,10.0.1.1\n",
            ),
            (
                "host routes without a gateway",
                vec![subnet(None, &[], vec![route("192.168.7.9/16", "10.0.1.3")])],
                "tag:subnet0,option:router\n\
                 tag:subnet0,option:classless-static-route,192.168.0.0/16,10.0.1.3\n",
            ),
            (
                "an explicit default route is not doubled",
                vec![subnet(
                    Some("10.0.1.1"),
                    &[],
                    vec![route("0.0.0.0/0", "10.0.1.254")],
                )],
                "tag:subnet0,option:router,10.0.1.1\n\
                 tag:subnet0,option:classless-static-route,0.0.0.0/0,10.0.1.254\n",
            ),
            (
                "an IPv6 subnet gets its DNS servers only",
                vec![
                    subnet(Some("10.0.1.1"), &[], vec![]),
                    DhcpSubnet {
                        cidr: "2001:db8:1::/64".parse().unwrap(),
                        gateway: Some("2001:db8:1::1".parse().unwrap()),
                        dns_servers: vec!["2001:db8::53".parse().unwrap()],
                        host_routes: vec![],
                        lease_time: Duration::from_secs(86_400),
                    },
                ],
                "tag:subnet0,option:router,10.0.1.1\n\
                 tag:subnet1,option6:dns-server,[2001:db8::53]\n",
            ),
        ];
        for (name, subnets, expected) in cases {
            let mut input = server();
            input.subnets = subnets;
            assert_eq!(options_file(&input), expected, "{name}");
        }
    }

    #[test]
    fn changes_are_classified_from_what_runs_and_what_is_on_disk() {
        let desired = render(&server(), &files());
        let running = |args: &[String], in_namespace: bool| RunningServer {
            pid: 42,
            args: args.to_vec(),
            in_namespace,
        };
        let on_disk =
            |running: Vec<RunningServer>, hosts: Option<&str>, options: Option<&str>| Found {
                running,
                hosts: hosts.map(str::to_owned),
                options: options.map(str::to_owned),
                stale_leases: false,
            };
        let mut other_mtu = server();
        other_mtu.mtu = 1500;
        let other_args = command_line(&other_mtu, &files());
        let (hosts, options) = (desired.hosts.as_str(), desired.options.as_str());
        let args = desired.args.as_slice();
        let cases = [
            (
                "nothing runs",
                on_disk(vec![], Some(hosts), Some(options)),
                Change::Start,
            ),
            (
                "all as wanted",
                on_disk(vec![running(args, true)], Some(hosts), Some(options)),
                Change::Nothing,
            ),
            (
                "a host changed",
                on_disk(vec![running(args, true)], Some(""), Some(options)),
                Change::Reload,
            ),
            (
                "an option changed",
                on_disk(vec![running(args, true)], Some(hosts), Some("x\n")),
                Change::Reload,
            ),
            (
                "the files are gone",
                on_disk(vec![running(args, true)], None, None),
                Change::Reload,
            ),
            (
                "the MTU changed",
                on_disk(vec![running(&other_args, true)], Some(hosts), Some(options)),
                Change::Restart,
            ),
            (
                "it runs in another namespace",
                on_disk(vec![running(args, false)], Some(hosts), Some(options)),
                Change::Restart,
            ),
            (
                "two run",
                on_disk(
                    vec![running(args, true), running(args, true)],
                    Some(hosts),
                    Some(options),
                ),
                Change::Restart,
            ),
            (
                "a lease holds a host's address for another MAC",
                Found {
                    stale_leases: true,
                    ..on_disk(vec![running(args, true)], Some(hosts), Some(options))
                },
                Change::Restart,
            ),
        ];
        for (name, found, expected) in cases {
            assert_eq!(classify(&desired, &found), expected, "{name}");
        }
    }

    #[test]
    fn leases_holding_a_host_address_for_another_mac_are_pruned() {
        // The server's one host is fa:16:3e:00:00:01 at 10.0.1.5.
        let own = "1796705923 fa:16:3e:00:00:01 10.0.1.5 web-1 01:fa:16:3e:00:00:01";
        let moved = "1796705923 fa:16:3e:00:00:09 10.0.1.5 old-1 01:fa:16:3e:00:00:09";
        let unrelated = "1796705923 fa:16:3e:00:00:08 10.0.1.8 gone *";
        let duid = "duid 00:01:00:01:2c:4f:3a:10:fa:16:3e:00:00:01";
        let v6 = "1796705923 1039 2001:db8:1::5 web-1 00:03:00:01:fa:16:3e:00:00:01";
        let cases = [
            ("empty", String::new(), None),
            ("own lease", format!("{own}\n"), None),
            (
                "an address leased to another MAC",
                format!("{moved}\n{unrelated}\n"),
                Some(format!("{unrelated}\n")),
            ),
            (
                "MACs compare without case",
                format!("{}\n", own.replace("fa:16:3e", "FA:16:3E")),
                None,
            ),
            (
                "DHCPv6 lines are kept",
                format!("{moved}\n{duid}\n{v6}\n"),
                Some(format!("{duid}\n{v6}\n")),
            ),
        ];
        for (name, leases, expected) in cases {
            assert_eq!(prune_leases(&leases, &server()), expected, "{name}");
        }
    }

    #[test]
    fn a_process_is_a_server_only_by_its_pid_file_under_the_root() {
        let root = Path::new("/var/lib/ferro/dhcp");
        let argv = |words: &[&str]| words.iter().map(|w| w.to_string()).collect::<Vec<_>>();
        let cases = [
            (
                argv(&["dnsmasq", "--pid-file=/var/lib/ferro/dhcp/net-1/pid"]),
                Some("net-1"),
            ),
            (
                argv(&[
                    "/usr/sbin/dnsmasq",
                    "--no-hosts",
                    "--pid-file=/var/lib/ferro/dhcp/net-2/pid",
                ]),
                Some("net-2"),
            ),
            (
                argv(&["dnsmasq", "--pid-file=/run/libvirt/default.pid"]),
                None,
            ),
            (
                argv(&["dnsmasq", "--pid-file=/var/lib/ferro/dhcp/net-1/x/pid"]),
                None,
            ),
            (argv(&["dnsmasq", "--no-hosts"]), None),
            (
                argv(&["sleep", "--pid-file=/var/lib/ferro/dhcp/net-1/pid"]),
                None,
            ),
            (argv(&[]), None),
        ];
        for (argv, expected) in cases {
            assert_eq!(served_network(&argv, root).as_deref(), expected, "{argv:?}");
        }
    }
}
