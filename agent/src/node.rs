//! The node itself: registration, the heartbeat Lease, and `Node.status`.
//!
//! - **Registration.** The agent creates its Node (an existing one is fine: the node
//!   identity may create its own Node and nothing else) and writes, as writer `agent`, the
//!   status fields the owner table gives it: capacity, allocatable, hypervisor, zone,
//!   roles, address, agentVersion, accelerator, images, and the `HostReady` condition.
//!   Node lifecycle (a controller) owns `Ready` and derives it from the heartbeat.
//! - **Status.** Recomputed from the host on every resync (and when the image cache
//!   changes) and written only when it differs from what the Node says, so an idle node
//!   does not write. A Node deleted by an operator is created again.
//! - **Heartbeat.** The Lease `node-<name>` gets a fresh `renewTime` every interval,
//!   through an Update carrying the resourceVersion last seen; on a conflict the Lease is
//!   read again and the renewal retried.
//!
//! Capacity is measured, not configured: vCPUs are the CPUs this process may run on
//! (`nproc`), memory is `MemTotal` from `/proc/meminfo`, disk is the size of the file
//! system holding the state directory. Allocatable is capacity less what the host keeps
//! for itself ([`allocatable`]).

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use ferro_api::client::Client;
use ferro_api::v1::condition::Status as ConditionStatus;
use ferro_api::v1::node_status::Role;
use ferro_api::{Error, Resource, owners, v1};

/// The name of a node's heartbeat Lease.
pub fn lease_name(node: &str) -> String {
    format!("node-{node}")
}

/// The condition type the agent reports its host checks in.
pub const HOST_READY: &str = "HostReady";

/// What the agent measured of the host.
pub fn measure_capacity(state_dir: &Path) -> std::io::Result<v1::NodeResources> {
    let vcpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as u32;
    let meminfo = std::fs::read_to_string("/proc/meminfo")?;
    let ram_mib = parse_meminfo(&meminfo).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "no MemTotal in /proc/meminfo",
        )
    })?;
    let fs = rustix::fs::statvfs(state_dir)?;
    let disk_gib = fs.f_blocks.saturating_mul(fs.f_frsize) >> 30;
    Ok(v1::NodeResources {
        vcpus,
        ram_mib,
        disk_gib,
    })
}

/// `MemTotal` of a `/proc/meminfo`, in MiB.
pub fn parse_meminfo(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let mut words = line.split_whitespace().skip(1);
    let value: u64 = words.next()?.parse().ok()?;
    match words.next() {
        Some("kB") | None => Some(value / 1024),
        Some(_) => None,
    }
}

/// Capacity less what the host keeps for itself:
/// - vCPUs: nothing held back. Guests and host share the cores; how far vCPUs may be
///   overcommitted is the scheduler's policy, not the node's.
/// - memory: 512 MiB for the host (OpenStack's `reserved_host_memory_mb`), at most half.
/// - disk: a tenth (at least 1 GiB), for the image cache, logs and config drives.
pub fn allocatable(capacity: &v1::NodeResources) -> v1::NodeResources {
    let ram_reserve = 512.min(capacity.ram_mib / 2);
    let disk_reserve = (capacity.disk_gib / 10).max(1).min(capacity.disk_gib);
    v1::NodeResources {
        vcpus: capacity.vcpus,
        ram_mib: capacity.ram_mib - ram_reserve,
        disk_gib: capacity.disk_gib - disk_reserve,
    }
}

/// Parses a comma-separated role list (`compute,network,storage`, any case).
pub fn parse_roles(text: &str) -> Result<Vec<Role>, String> {
    let mut roles = Vec::new();
    for word in text.split(',').map(str::trim).filter(|w| !w.is_empty()) {
        let role = match word.to_ascii_lowercase().as_str() {
            "compute" => Role::Compute,
            "network" => Role::Network,
            "storage" => Role::Storage,
            _ => {
                return Err(format!(
                    "unknown role `{word}`: compute, network or storage"
                ));
            }
        };
        if !roles.contains(&role) {
            roles.push(role);
        }
    }
    Ok(roles)
}

/// The address other nodes reach this one at: the source address of the route towards
/// the outside world. Found by connecting a UDP socket, which sends no packet; loopback
/// when there is no such route.
pub fn default_address() -> String {
    let probe = || -> std::io::Result<std::net::IpAddr> {
        let socket = std::net::UdpSocket::bind("0.0.0.0:0")?;
        // TEST-NET-1: never answered, and connect() on UDP sends nothing anyway.
        socket.connect("192.0.2.1:9")?;
        Ok(socket.local_addr()?.ip())
    };
    probe().map_or_else(|_| "127.0.0.1".to_owned(), |ip| ip.to_string())
}

/// The programs a QEMU node needs, for the `HostReady` check.
#[derive(Debug, Clone)]
pub struct HostTools {
    /// The emulator.
    pub qemu: PathBuf,
    /// `qemu-img`.
    pub qemu_img: PathBuf,
    /// `genisoimage`.
    pub genisoimage: PathBuf,
}

/// Checks what guests need on this host; the `HostReady` condition.
pub fn check_host(tools: &HostTools, state_dir: &Path) -> v1::Condition {
    let missing: Vec<String> = [&tools.qemu, &tools.qemu_img, &tools.genisoimage]
        .into_iter()
        .filter(|p| find_program(p).is_none())
        .map(|p| p.display().to_string())
        .collect();
    if !missing.is_empty() {
        let reason = if find_program(&tools.qemu).is_none() {
            "HypervisorMissing"
        } else {
            "ToolMissing"
        };
        return condition(
            HOST_READY,
            ConditionStatus::False,
            reason,
            format!(
                "not found: {} (install qemu-system-x86, qemu-utils, genisoimage)",
                missing.join(", ")
            ),
        );
    }
    if let Err(e) = tempfile::tempfile_in(state_dir) {
        return condition(
            HOST_READY,
            ConditionStatus::False,
            "StateDirUnwritable",
            format!("cannot write in {}: {e}", state_dir.display()),
        );
    }
    condition(
        HOST_READY,
        ConditionStatus::True,
        "HostReady",
        "the hypervisor and its tools are installed".to_owned(),
    )
}

/// A program's path, looked up in `PATH` unless it names a directory.
pub fn find_program(program: &Path) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let executable = |p: &Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if program.components().count() > 1 {
        return executable(program).then(|| program.to_owned());
    }
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .map(|dir| dir.join(program))
        .find(|p| executable(p))
}

/// A condition with no transition time (the apiserver keeps or sets it).
pub fn condition(
    kind: &str,
    status: ConditionStatus,
    reason: &str,
    message: String,
) -> v1::Condition {
    v1::Condition {
        r#type: kind.to_owned(),
        status: status as i32,
        reason: reason.to_owned(),
        message,
        last_transition_time: None,
        observed_generation: 0,
    }
}

/// Whether two conditions say the same (times aside).
pub fn same_condition(a: &v1::Condition, b: &v1::Condition) -> bool {
    a.r#type == b.r#type && a.status == b.status && a.reason == b.reason && a.message == b.message
}

/// Everything the agent reports in its Node's status.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeReport {
    /// The node's name.
    pub name: String,
    /// The availability zone.
    pub zone: String,
    /// The roles.
    pub roles: Vec<Role>,
    /// The address other nodes reach it at.
    pub address: String,
    /// `KVM` or `TCG`.
    pub accelerator: String,
    /// What the host has.
    pub capacity: v1::NodeResources,
    /// The cached images.
    pub images: Vec<v1::CachedImage>,
    /// The `HostReady` condition.
    pub host_ready: v1::Condition,
    /// The network driver, `ovs` or `linuxbridge`; empty when the node wires no networks.
    pub network_driver: String,
    /// The `NetworkReady` condition: whether the driver has what it needs; `None` until
    /// the network reconciler has looked.
    pub network_ready: Option<v1::Condition>,
    /// The volume backend and its room, on a node that holds volumes.
    pub storage: Option<v1::NodeStorage>,
}

/// The status fields the agent owns, in the order of the owner table.
pub const NODE_FIELDS: &[&str] = &[
    "capacity",
    "allocatable",
    "hypervisor",
    "zone",
    "roles",
    "images",
    "address",
    "agentVersion",
    "accelerator",
    "networkDriver",
    "storage",
];

impl NodeReport {
    /// The status the report makes, with only the agent's fields set.
    pub fn status(&self) -> v1::NodeStatus {
        v1::NodeStatus {
            capacity: Some(self.capacity),
            allocatable: Some(allocatable(&self.capacity)),
            hypervisor: "QEMU".to_owned(),
            zone: self.zone.clone(),
            roles: self.roles.iter().map(|r| *r as i32).collect(),
            images: self.images.clone(),
            conditions: Vec::new(),
            address: self.address.clone(),
            agent_version: env!("CARGO_PKG_VERSION").to_owned(),
            accelerator: self.accelerator.clone(),
            network_driver: self.network_driver.clone(),
            storage: self.storage.clone(),
        }
    }

    /// The conditions the agent owns, as they should be.
    pub fn conditions(&self) -> Vec<v1::Condition> {
        std::iter::once(self.host_ready.clone())
            .chain(self.network_ready.clone())
            .collect()
    }

    /// Whether `current` (a Node's status) differs from this report in any field or
    /// condition the agent owns.
    pub fn differs_from(&self, current: Option<&v1::NodeStatus>) -> bool {
        let Some(current) = current else {
            return true;
        };
        let mine = v1::NodeStatus {
            conditions: Vec::new(),
            ..current.clone()
        };
        if mine != self.status() {
            return true;
        }
        !self
            .conditions()
            .iter()
            .all(|mine| current.conditions.iter().any(|c| same_condition(c, mine)))
    }
}

/// Removes this node's finalizer (`ferro.io/agent`) from the object `meta` names, read
/// afresh: nothing to do when it is gone, has another uid, or lacks the finalizer; a
/// conflicting write is retried a few times.
pub async fn remove_agent_finalizer<T: Resource>(
    client: &Client,
    meta: &v1::ObjectMeta,
) -> Result<(), Error> {
    let mut last = None;
    for _ in 0..5 {
        let current = match client.get_typed::<T>(&meta.project, &meta.name).await {
            Ok(current) => current.metadata().cloned().unwrap_or_default(),
            Err(Error::NotFound { .. }) => return Ok(()),
            Err(e) => return Err(e),
        };
        if current.uid != meta.uid
            || !current
                .finalizers
                .iter()
                .any(|f| f == ferro_api::auth::AGENT_FINALIZER)
        {
            return Ok(());
        }
        let request = v1::PatchMetadataRequest {
            key: Some(v1::ObjectKey {
                kind: T::KIND.name().to_owned(),
                project: meta.project.clone(),
                name: meta.name.clone(),
            }),
            remove_finalizers: vec![ferro_api::auth::AGENT_FINALIZER.to_owned()],
            resource_version: current.resource_version,
            ..Default::default()
        };
        match client.patch_metadata(request).await {
            Ok(_) | Err(Error::NotFound { .. }) => return Ok(()),
            Err(e @ Error::Conflict { .. }) => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| Error::internal("finalizer removal gave up")))
}

/// Creates the Node unless it exists.
pub async fn register(client: &Client, name: &str) -> Result<(), Error> {
    let node = v1::Node {
        metadata: Some(v1::ObjectMeta {
            name: name.to_owned(),
            ..Default::default()
        }),
        spec: Some(v1::NodeSpec::default()),
        status: None,
    };
    match client.create_typed(node).await {
        Ok(_) => {
            tracing::info!(node = name, "registered the node");
            Ok(())
        }
        Err(Error::AlreadyExists { .. }) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Writes the report into the Node's status if it differs; creates the Node if it is
/// gone. Says whether it wrote.
pub async fn sync_status(client: &Client, report: &NodeReport) -> Result<bool, Error> {
    let node = match client.get_typed::<v1::Node>("", &report.name).await {
        Ok(node) => node,
        Err(Error::NotFound { .. }) => {
            register(client, &report.name).await?;
            client.get_typed::<v1::Node>("", &report.name).await?
        }
        Err(e) => return Err(e),
    };
    if !report.differs_from(node.status.as_ref()) {
        return Ok(false);
    }
    let patch = v1::Node {
        metadata: Some(v1::ObjectMeta {
            name: report.name.clone(),
            ..Default::default()
        }),
        spec: None,
        status: Some(report.status()),
    };
    client
        .update_status(
            patch.into_object(),
            owners::AGENT,
            NODE_FIELDS,
            report.conditions(),
        )
        .await?;
    Ok(true)
}

/// A Lease renewed by `holder` at `now`; a change of holder counts as a transition.
pub fn renewed_lease(
    mut lease: v1::Lease,
    holder: &str,
    duration: Duration,
    now: SystemTime,
) -> v1::Lease {
    let now = prost_types::Timestamp::from(now);
    let spec = lease.spec.get_or_insert_with(Default::default);
    if spec.holder_identity != holder {
        if !spec.holder_identity.is_empty() {
            spec.lease_transitions += 1;
        }
        spec.holder_identity = holder.to_owned();
        spec.acquire_time = Some(now);
    }
    spec.lease_duration_seconds = duration.as_secs().clamp(1, u64::from(u32::MAX)) as u32;
    spec.renew_time = Some(now);
    lease
}

/// Renews the node's Lease once: creates it if missing, and on a conflict reads it
/// again and retries. Returns the Lease as stored, to renew from next time.
pub async fn renew_lease(
    client: &Client,
    node: &str,
    duration: Duration,
    known: Option<v1::Lease>,
) -> Result<v1::Lease, Error> {
    let name = lease_name(node);
    let mut known = known;
    let mut last_error = None;
    for _ in 0..5 {
        let current = match known.take() {
            Some(lease) => lease,
            None => match client.get_typed::<v1::Lease>("", &name).await {
                Ok(lease) => lease,
                Err(Error::NotFound { .. }) => {
                    let fresh = v1::Lease {
                        metadata: Some(v1::ObjectMeta {
                            name: name.clone(),
                            ..Default::default()
                        }),
                        ..Default::default()
                    };
                    let fresh = renewed_lease(fresh, node, duration, SystemTime::now());
                    match client.create_typed(fresh).await {
                        Ok(lease) => return Ok(lease),
                        Err(e @ Error::AlreadyExists { .. }) => {
                            last_error = Some(e);
                            continue;
                        }
                        Err(e) => return Err(e),
                    }
                }
                Err(e) => return Err(e),
            },
        };
        let next = renewed_lease(current, node, duration, SystemTime::now());
        match client.update(next.into_object()).await {
            Ok(object) => {
                return v1::Lease::from_object(object)
                    .ok_or_else(|| Error::internal("the server answered another kind"));
            }
            Err(e @ (Error::Conflict { .. } | Error::NotFound { .. })) => last_error = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last_error.unwrap_or_else(|| Error::internal("lease renewal gave up")))
}

/// Renews the node's Lease every `interval` until cancelled.
pub async fn heartbeat(client: Client, node: String, interval: Duration, duration: Duration) {
    let mut lease = None;
    loop {
        match renew_lease(&client, &node, duration, lease.take()).await {
            Ok(renewed) => lease = Some(renewed),
            Err(e) => tracing::warn!(error = %e, "heartbeat: renewing the lease failed"),
        }
        tokio::time::sleep(interval).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_gives_mebibytes() {
        let text = "MemTotal:       24683936 kB\nMemFree:        22413412 kB\n";
        assert_eq!(parse_meminfo(text), Some(24105));
        assert_eq!(parse_meminfo("MemFree: 1 kB\n"), None);
        assert_eq!(parse_meminfo("MemTotal: 1 MB\n"), None);
    }

    #[test]
    fn the_host_is_measured() {
        let capacity = measure_capacity(Path::new("/tmp")).unwrap();
        assert!(capacity.vcpus >= 1 && capacity.ram_mib > 0, "{capacity:?}");
    }

    #[test]
    fn allocatable_keeps_a_reserve_for_the_host() {
        let big = v1::NodeResources {
            vcpus: 2,
            ram_mib: 24105,
            disk_gib: 252,
        };
        assert_eq!(
            allocatable(&big),
            v1::NodeResources {
                vcpus: 2,
                ram_mib: 23593,
                disk_gib: 227,
            }
        );
        let small = v1::NodeResources {
            vcpus: 1,
            ram_mib: 600,
            disk_gib: 0,
        };
        assert_eq!(
            allocatable(&small),
            v1::NodeResources {
                vcpus: 1,
                ram_mib: 300,
                disk_gib: 0,
            }
        );
    }

    #[test]
    fn roles_parse_from_a_list() {
        assert_eq!(
            parse_roles("compute, Network,storage,compute").unwrap(),
            [Role::Compute, Role::Network, Role::Storage]
        );
        assert!(parse_roles("").unwrap().is_empty());
        assert!(parse_roles("gpu").unwrap_err().contains("gpu"));
    }

    fn report() -> NodeReport {
        NodeReport {
            name: "n1".into(),
            zone: "zone-a".into(),
            roles: vec![Role::Compute],
            address: "10.0.0.5".into(),
            accelerator: "TCG".into(),
            capacity: v1::NodeResources {
                vcpus: 2,
                ram_mib: 4096,
                disk_gib: 100,
            },
            images: vec![],
            host_ready: condition(HOST_READY, ConditionStatus::True, "HostReady", "ok".into()),
            storage: None,
            network_driver: "ovs".into(),
            network_ready: Some(condition(
                "NetworkReady",
                ConditionStatus::True,
                "DriverReady",
                "ovs".into(),
            )),
        }
    }

    #[test]
    fn a_node_status_is_written_only_when_it_differs() {
        let report = report();
        assert!(report.differs_from(None));
        let mut stored = report.status();
        // What the apiserver and other writers add does not count.
        let mut written = report.host_ready.clone();
        written.last_transition_time = Some(prost_types::Timestamp::default());
        stored.conditions = vec![
            written,
            report.network_ready.clone().unwrap(),
            condition("Ready", ConditionStatus::True, "Heartbeat", "".into()),
        ];
        assert!(!report.differs_from(Some(&stored)));

        let mut image = report.clone();
        image.images.push(v1::CachedImage {
            image_uid: "u".into(),
            ..Default::default()
        });
        assert!(image.differs_from(Some(&stored)));
        let mut unready = report.clone();
        unready.host_ready.status = ConditionStatus::False as i32;
        assert!(unready.differs_from(Some(&stored)));
        let mut network = report.clone();
        network.network_ready.as_mut().unwrap().status = ConditionStatus::False as i32;
        assert!(network.differs_from(Some(&stored)));
        let mut zone = report;
        zone.zone = "zone-b".into();
        assert!(zone.differs_from(Some(&stored)));
    }

    #[test]
    fn the_host_check_names_what_is_missing() {
        let dir = tempfile::tempdir().unwrap();
        let tools = HostTools {
            qemu: "/nonexistent/qemu-system-x86_64".into(),
            qemu_img: "qemu-img".into(),
            genisoimage: "genisoimage".into(),
        };
        let c = check_host(&tools, dir.path());
        assert_eq!(c.status, ConditionStatus::False as i32);
        assert_eq!(c.reason, "HypervisorMissing");
        assert!(
            c.message.contains("/nonexistent/qemu-system-x86_64"),
            "{}",
            c.message
        );
        assert!(find_program(Path::new("sh")).is_some());
    }

    #[test]
    fn a_lease_renewal_moves_renew_time_and_counts_new_holders() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        let t1 = t0 + Duration::from_secs(10);
        let fresh = renewed_lease(v1::Lease::default(), "n1", Duration::from_secs(40), t0);
        let spec = fresh.spec.clone().unwrap();
        assert_eq!(spec.holder_identity, "n1");
        assert_eq!(spec.lease_duration_seconds, 40);
        assert_eq!(spec.acquire_time, Some(t0.into()));
        assert_eq!(spec.lease_transitions, 0);
        let again = renewed_lease(fresh, "n1", Duration::from_secs(40), t1);
        let spec = again.spec.clone().unwrap();
        assert_eq!(spec.acquire_time, Some(t0.into()));
        assert_eq!(spec.renew_time, Some(t1.into()));
        let taken = renewed_lease(again, "n2", Duration::from_secs(40), t1);
        assert_eq!(taken.spec.unwrap().lease_transitions, 1);
    }
}
