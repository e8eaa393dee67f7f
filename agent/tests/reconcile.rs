//! The Server reconciler on the in-memory doubles of the host: no root, no QEMU, no files.
//!
//! Each test starts an in-process apiserver on the in-memory store, with an admin and a
//! node token. Objects are made through the API as users make them, and Servers are
//! placed with the admin's `Bind`, as the scheduler places them (so they carry
//! `status.node` and the Flavor copy). The agent's side is the [`ServerReconciler`] of node
//! `n1` over a [`MemoryHypervisor`] and a [`MemoryImageCache`], called directly, one
//! reconcile at a time, so every step can be looked at: what a user sees on the Server
//! (`status.host`, the `GuestRunning` condition, the finalizer) and what the host holds.
//!
//! These tests check the reconciler's logic only. That a guest really boots, stops and
//! goes away is shown by the real-QEMU tests in `agent.rs` and by `e2e/`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use ferro_agent::hypervisor::memory::{MemoryHypervisor, Operation, Outcome};
use ferro_agent::hypervisor::{Hypervisor, HypervisorError, VmState};
use ferro_agent::images::ImageCache;
use ferro_agent::images::memory::{FetchFault, MemoryImageCache};
use ferro_agent::server::{
    LABEL_NODE, LABEL_PROJECT, LABEL_SERVER, ReconcileError, ServerReconciler, event_component,
};
use ferro_api::auth::{AGENT_FINALIZER, Tokens};
use ferro_api::client::{Client, Selection};
use ferro_api::server::ApiServer;
use ferro_api::v1::server_host_status::PowerState as HostPower;
use ferro_api::v1::server_spec::PowerState;
use ferro_api::v1::{self, condition::Status as ConditionStatus};
use ferro_api::{Error, Kind, Resource};
use ferro_runtime::Store;
use ferro_runtime::events::Recorder;
use ferro_store::memory::MemoryStore;
use tokio::sync::oneshot;

const TOKENS: &str = "admin-token admin\nnode-token system:node:n1\n";
const NODE: &str = "n1";
const OTHER_NODE: &str = "n2";
const PROJECT: &str = "default";
const DISK_URL: &str = "file:///srv/images/tiny.raw";
const DISK_BYTES: &[u8] = b"a bootable disk, as far as the doubles know";
const KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJ65XlM9xwTrwBb2VYfUbi9VU/mF0doEHYlbtQsEKTh5 alice@ferro";

// ---------------------------------------------------------------------------------------
// The control plane: an apiserver and what users and the scheduler do through it.

/// An in-process apiserver with nodes `n1` and `n2`, the KeyPair `alice` and (unless a
/// test leaves it out) the public Image `tiny`.
struct Cloud {
    admin: Client,
    node_client: Client,
    stop: Option<oneshot::Sender<()>>,
}

impl Drop for Cloud {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

impl Cloud {
    /// A cloud with everything a Server of the tiny image needs.
    async fn start() -> Result<Cloud> {
        let cloud = Cloud::empty().await?;
        cloud.create_image().await?;
        Ok(cloud)
    }

    /// A cloud without the Image.
    async fn empty() -> Result<Cloud> {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "ferro_agent=info".into()),
            )
            .with_test_writer()
            .try_init();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?.to_string();
        let api = ApiServer::new(Arc::new(MemoryStore::new()), Tokens::parse(TOKENS));
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(async move {
            let served = api
                .serve(listener, async {
                    let _ = stopped.await;
                })
                .await;
            if let Err(e) = served {
                eprintln!("the test apiserver failed: {e}");
            }
        });
        let cloud = Cloud {
            admin: Client::connect_lazy(&address, "admin-token")?,
            node_client: Client::connect_lazy(&address, "node-token")?,
            stop: Some(stop),
        };
        cloud
            .apply(&format!(
                "apiVersion: ferro/v1\nkind: Node\nmetadata: {{name: {NODE}}}\n---\n\
                 apiVersion: ferro/v1\nkind: Node\nmetadata: {{name: {OTHER_NODE}}}\n---\n\
                 apiVersion: ferro/v1\nkind: KeyPair\nmetadata: {{name: alice}}\n\
                 spec:\n  publicKey: {KEY}\n"
            ))
            .await?;
        Ok(cloud)
    }

    async fn apply(&self, yaml: &str) -> Result<()> {
        for object in ferro_api::codec::decode_yaml(yaml)? {
            self.admin
                .create(object)
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
        }
        Ok(())
    }

    /// The public Image `tiny`: a raw disk at [`DISK_URL`], with its checksum pinned.
    async fn create_image(&self) -> Result<()> {
        self.apply(&format!(
            "apiVersion: ferro/v1\nkind: Image\nmetadata: {{name: tiny}}\n\
             spec: {{source: {{url: \"{DISK_URL}\"}}, checksum: \"{}\", diskFormat: Raw, \
             visibility: Public}}\n",
            disk_checksum()
        ))
        .await
    }

    /// Creates a Server of the tiny image as a user does (`extra`: more spec lines) and
    /// places it on `node` as the scheduler does; returns its uid.
    async fn create_server_on(&self, name: &str, extra: &str, node: &str) -> Result<String> {
        self.apply(&format!(
            "apiVersion: ferro/v1\nkind: Server\nmetadata: {{name: {name}}}\nspec:\n  \
             flavor: m1.tiny\n  image: tiny\n  keyPair: alice\n  hostname: {name}-host\n  \
             userData: \"#!/bin/sh\\necho hi\\n\"\n{extra}"
        ))
        .await?;
        let flavor = v1::FlavorSnapshot {
            name: "m1.tiny".into(),
            vcpus: 1,
            ram_mib: 128,
            disk_gib: 1,
            ..Default::default()
        };
        self.admin
            .bind(PROJECT, name, node, flavor)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(uid(&self.server(name).await?))
    }

    async fn create_server(&self, name: &str, extra: &str) -> Result<String> {
        self.create_server_on(name, extra, NODE).await
    }

    async fn server(&self, name: &str) -> Result<v1::Server> {
        self.admin
            .get_typed::<v1::Server>(PROJECT, name)
            .await
            .map_err(|e| anyhow::anyhow!("servers/{name}: {e}"))
    }

    async fn server_is_gone(&self, name: &str) -> Result<bool> {
        match self.admin.get(Kind::Server, PROJECT, name).await {
            Ok(_) => Ok(false),
            Err(Error::NotFound { .. }) => Ok(true),
            Err(e) => bail!("{e}"),
        }
    }

    /// Changes a Server's spec as a user does.
    async fn edit_server(&self, name: &str, edit: impl Fn(&mut v1::ServerSpec)) -> Result<()> {
        let mut server = self.server(name).await?;
        edit(server.spec.get_or_insert_with(Default::default));
        self.admin
            .update(server.into_object())
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(())
    }

    async fn delete_server(&self, name: &str) -> Result<()> {
        self.admin
            .delete_key(Kind::Server, PROJECT, name)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(())
    }
}

fn disk_checksum() -> String {
    use sha2::Digest;
    format!(
        "sha256:{}",
        ferro_agent::images::hex(&sha2::Sha256::digest(DISK_BYTES))
    )
}

// ---------------------------------------------------------------------------------------
// The agent's side.

/// The Server reconciler of node `n1` over the doubles, and what feeds it the Servers
/// bound to the node.
///
/// This is the only place that knows how a [`ServerReconciler`] is built and how it
/// learns of Servers (a runtime [`Store`] filled from a List, as the agent's reflector
/// fills it from List + Watch).
struct Agent {
    reconciler: ServerReconciler,
    servers: Store<v1::Server>,
    client: Client,
}

fn agent(cloud: &Cloud, driver: &Arc<MemoryHypervisor>, images: &Arc<MemoryImageCache>) -> Agent {
    let servers = Store::<v1::Server>::new();
    let reconciler = ServerReconciler {
        client: cloud.node_client.clone(),
        driver: driver.clone(),
        images: images.clone(),
        cache: servers.clone(),
        ports: Store::new(),
        node: NODE.to_owned(),
        zone: "zone-a".to_owned(),
        stop_grace: Duration::from_secs(30),
        recorder: Recorder::new(cloud.node_client.clone(), event_component(NODE)),
        seen: Default::default(),
        volumes: Store::new(),
        volume_backend: None,
    };
    Agent {
        reconciler,
        servers,
        client: cloud.node_client.clone(),
    }
}

impl Agent {
    /// One reconcile of the Server (or stray VM) with this uid, after bringing the view
    /// of the node's Servers up to date as the agent's watch would.
    async fn reconcile(&self, uid: &str) -> Result<(), ReconcileError> {
        let selection = Selection::all().fields(format!("status.node={NODE}"));
        let (objects, revision) = self.client.list(Kind::Server, &selection).await?;
        self.servers.replace(
            objects
                .into_iter()
                .filter_map(v1::Server::from_object)
                .collect(),
            revision,
        );
        self.reconciler.reconcile(uid).await
    }

    /// A resync: every Server bound here and every VM on the host, as the agent's
    /// periodic resync enqueues them.
    async fn resync(&self, driver: &MemoryHypervisor) -> Vec<(String, Result<(), String>)> {
        let mut uids: Vec<String> = driver
            .list()
            .await
            .expect("list")
            .into_iter()
            .map(|vm| vm.uid)
            .collect();
        let selection = Selection::all().fields(format!("status.node={NODE}"));
        let (objects, _) = self.client.list(Kind::Server, &selection).await.unwrap();
        uids.extend(
            objects
                .into_iter()
                .filter_map(v1::Server::from_object)
                .map(|s| uid(&s)),
        );
        uids.sort();
        uids.dedup();
        let mut results = Vec::new();
        for uid in uids {
            let result = self
                .reconcile(&uid)
                .await
                .map_err(|e| e.reason().to_owned());
            results.push((uid, result));
        }
        results
    }
}

/// A host and an image cache, empty but for the tiny disk at [`DISK_URL`].
fn doubles() -> (Arc<MemoryHypervisor>, Arc<MemoryImageCache>) {
    let images = MemoryImageCache::new();
    images.add_source(DISK_URL, DISK_BYTES, "raw");
    (Arc::new(MemoryHypervisor::new()), Arc::new(images))
}

// ---------------------------------------------------------------------------------------
// What a user checks.

fn uid(server: &v1::Server) -> String {
    server
        .metadata
        .as_ref()
        .map(|m| m.uid.clone())
        .unwrap_or_default()
}

fn host(server: &v1::Server) -> v1::ServerHostStatus {
    server
        .status
        .as_ref()
        .and_then(|s| s.host.clone())
        .unwrap_or_default()
}

fn power(server: &v1::Server) -> HostPower {
    HostPower::try_from(host(server).power_state).unwrap_or(HostPower::NoState)
}

fn guest_running(server: &v1::Server) -> v1::Condition {
    server
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.r#type == "GuestRunning"))
        .cloned()
        .unwrap_or_default()
}

/// `GuestRunning`'s status and reason, e.g. `(True, "Running")`.
fn running_condition(server: &v1::Server) -> (ConditionStatus, String) {
    let condition = guest_running(server);
    (
        ConditionStatus::try_from(condition.status).unwrap_or(ConditionStatus::Unknown),
        condition.reason,
    )
}

fn holds_finalizer(server: &v1::Server) -> bool {
    server
        .metadata
        .as_ref()
        .is_some_and(|m| m.finalizers.iter().any(|f| f == AGENT_FINALIZER))
}

fn revision(server: &v1::Server) -> i64 {
    server.metadata.as_ref().map_or(0, |m| m.resource_version)
}

/// Asserts that the Server runs: the VM in the double, and what the Server says.
async fn assert_running(cloud: &Cloud, driver: &MemoryHypervisor, name: &str) -> Result<()> {
    let server = cloud.server(name).await?;
    let vm = driver
        .status(&uid(&server))
        .await?
        .context("no VM on the host")?;
    ensure!(vm.state == VmState::Running, "{vm:?}");
    ensure!(power(&server) == HostPower::Running, "{:?}", host(&server));
    ensure!(
        host(&server).pid == i64::from(vm.pid.unwrap_or(0)) && host(&server).pid > 0,
        "{:?} {vm:?}",
        host(&server)
    );
    ensure!(
        running_condition(&server) == (ConditionStatus::True, "Running".to_owned()),
        "{:?}",
        guest_running(&server)
    );
    Ok(())
}

/// The reason of a failed reconcile.
fn reason(result: Result<(), ReconcileError>) -> Result<&'static str> {
    match result {
        Ok(()) => bail!("the reconcile succeeded"),
        Err(e) => Ok(e.reason()),
    }
}

/// Asserts that the Server has settled: one more reconcile succeeds, writes nothing and
/// asks the host for nothing that changes it.
async fn assert_settled(
    cloud: &Cloud,
    agent: &Agent,
    driver: &MemoryHypervisor,
    name: &str,
) -> Result<()> {
    let before = cloud.server(name).await?;
    let calls_before = driver.journal().len();
    agent.reconcile(&uid(&before)).await?;
    let after = cloud.server(name).await?;
    ensure!(
        revision(&after) == revision(&before),
        "servers/{name}: a settled reconcile wrote {:?} over {:?}",
        after.status,
        before.status
    );
    let calls = &driver.journal()[calls_before..];
    ensure!(
        calls.iter().all(|c| !c.changed_the_host()),
        "servers/{name}: a settled reconcile changed the host: {calls:?}"
    );
    Ok(())
}

/// The occurrences of the Events about one object, by series: reason → (type, count).
/// Similar occurrences fold into one Event whose count goes up, so what happened in a
/// step is what grew since the step before.
struct EventLog {
    uid: String,
    seen: BTreeMap<String, u32>,
}

impl EventLog {
    fn of(uid: &str) -> EventLog {
        EventLog {
            uid: uid.to_owned(),
            seen: BTreeMap::new(),
        }
    }

    /// The reasons recorded since the last call (each as often as it recurred), sorted;
    /// Warnings are marked `!`.
    async fn new_reasons(&mut self, cloud: &Cloud) -> Result<Vec<String>> {
        let (objects, _) = cloud.admin.list(Kind::Event, &Selection::all()).await?;
        let mut now = BTreeMap::new();
        for event in objects.into_iter().filter_map(v1::Event::from_object) {
            let spec = event.spec.unwrap_or_default();
            if spec.involved_object.as_ref().map(|o| o.uid.as_str()) != Some(self.uid.as_str()) {
                continue;
            }
            ensure!(
                spec.reporting_component == "scheduler"
                    || spec.reporting_component == event_component(NODE),
                "{}",
                spec.reporting_component
            );
            let warning = spec.r#type == v1::event_spec::Type::Warning as i32;
            let reason = format!("{}{}", spec.reason, if warning { "!" } else { "" });
            *now.entry(reason).or_insert(0) += spec.count.max(1);
        }
        let mut grown = Vec::new();
        for (reason, count) in &now {
            let before = self.seen.get(reason).copied().unwrap_or(0);
            grown.extend(std::iter::repeat_n(
                reason.clone(),
                count.saturating_sub(before) as usize,
            ));
        }
        self.seen = now;
        grown.sort();
        Ok(grown)
    }

    /// Asserts that exactly `expected` (any order within the step) was recorded.
    async fn expect(&mut self, cloud: &Cloud, step: &str, expected: &[&str]) -> Result<()> {
        let mut expected: Vec<String> = expected.iter().map(|r| (*r).to_owned()).collect();
        expected.sort();
        let got = self.new_reasons(cloud).await?;
        ensure!(
            got == expected,
            "{step}: recorded {got:?}, expected {expected:?}"
        );
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn a_servers_life_is_told_in_events_once_each() -> Result<()> {
    let cloud = Cloud::start().await?;
    let (driver, images) = doubles();
    let agent = agent(&cloud, &driver, &images);
    let uid = cloud.create_server("web-1", "").await?;
    let mut log = EventLog::of(&uid);

    agent.reconcile(&uid).await?;
    log.expect(&cloud, "create", &["ImagePulled", "Created", "Started"])
        .await?;
    agent.reconcile(&uid).await?;
    log.expect(&cloud, "a settled reconcile", &[]).await?;

    cloud
        .edit_server("web-1", |s| {
            s.power_state = Some(PowerState::Stopped as i32)
        })
        .await?;
    agent.reconcile(&uid).await?;
    agent.reconcile(&uid).await?;
    log.expect(&cloud, "stop", &["Stopped"]).await?;

    cloud
        .edit_server("web-1", |s| {
            s.power_state = Some(PowerState::Running as i32)
        })
        .await?;
    agent.reconcile(&uid).await?;
    agent.reconcile(&uid).await?;
    log.expect(&cloud, "start", &["ImageCached", "Started"])
        .await?;

    let mut server = cloud.server("web-1").await?;
    server
        .metadata
        .get_or_insert_with(Default::default)
        .annotations
        .insert(
            "ferro.io/reboot-requested-at".into(),
            "2026-12-07T01:00:00Z".into(),
        );
    cloud.admin.update(server.into_object()).await?;
    agent.reconcile(&uid).await?;
    agent.reconcile(&uid).await?;
    log.expect(&cloud, "reboot", &["Rebooted"]).await?;

    driver.crash(&uid, "qemu: terminating on signal 9");
    agent.reconcile(&uid).await?;
    agent.reconcile(&uid).await?;
    log.expect(&cloud, "crash", &["Crashed!", "ImageCached", "Started"])
        .await?;

    cloud.delete_server("web-1").await?;
    agent.reconcile(&uid).await?;
    ensure!(cloud.server_is_gone("web-1").await?);
    log.expect(&cloud, "delete", &["Deleted"]).await?;
    Ok(())
}

#[tokio::test]
async fn a_guest_left_down_by_its_run_strategy_is_told_once() -> Result<()> {
    let cloud = Cloud::start().await?;
    let (driver, images) = doubles();
    let agent = agent(&cloud, &driver, &images);
    let uid = cloud
        .create_server("manual", "  runStrategy: Manual\n")
        .await?;
    agent.reconcile(&uid).await?;
    let mut log = EventLog::of(&uid);
    log.new_reasons(&cloud).await?;

    driver.crash(&uid, "qemu: terminating on signal 9");
    agent.reconcile(&uid).await?;
    agent.reconcile(&uid).await?;
    agent.reconcile(&uid).await?;
    log.expect(&cloud, "crash", &["Crashed!"]).await
}

#[tokio::test]
async fn a_restarted_agent_records_adopted_once_and_nothing_else() -> Result<()> {
    let cloud = Cloud::start().await?;
    let (driver, images) = doubles();
    let uid = cloud.create_server("web-1", "").await?;
    agent(&cloud, &driver, &images).reconcile(&uid).await?;
    let mut log = EventLog::of(&uid);
    log.new_reasons(&cloud).await?;

    let driver = Arc::new(driver.restart());
    let images = Arc::new(MemoryImageCache::new());
    let agent = agent(&cloud, &driver, &images);
    for _ in 0..3 {
        for result in agent.resync(&driver).await {
            ensure!(result.1.is_ok(), "{result:?}");
        }
    }
    log.expect(&cloud, "adoption", &["Adopted"]).await
}

#[tokio::test]
async fn a_node_bumps_its_own_events_and_no_others() -> Result<()> {
    let cloud = Cloud::start().await?;
    let event = |name: &str, component: &str| v1::Event {
        metadata: Some(v1::ObjectMeta {
            name: name.into(),
            project: PROJECT.into(),
            ..Default::default()
        }),
        spec: Some(v1::EventSpec {
            involved_object: Some(v1::OwnerReference {
                kind: "Server".into(),
                name: "web-1".into(),
                project: PROJECT.into(),
                ..Default::default()
            }),
            r#type: v1::event_spec::Type::Normal as i32,
            reason: "Scheduled".into(),
            message: "placed".into(),
            count: 1,
            reporting_component: component.into(),
            ..Default::default()
        }),
        status: None,
    };
    let bump = |mut event: v1::Event, component: &str| {
        let spec = event.spec.get_or_insert_with(Default::default);
        spec.count += 1;
        spec.reporting_component = component.into();
        event
    };
    cloud
        .admin
        .create(event("theirs", "scheduler").into_object())
        .await?;
    cloud
        .node_client
        .create(event("mine", &event_component(NODE)).into_object())
        .await?;
    let theirs = cloud
        .node_client
        .get_typed::<v1::Event>(PROJECT, "theirs")
        .await?;
    let mine = cloud
        .node_client
        .get_typed::<v1::Event>(PROJECT, "mine")
        .await?;

    for attempt in [
        bump(theirs.clone(), "scheduler"),
        bump(theirs, &event_component(NODE)),
        bump(mine.clone(), &event_component(OTHER_NODE)),
    ] {
        let result = cloud.node_client.update(attempt.into_object()).await;
        ensure!(
            matches!(result, Err(Error::PermissionDenied { .. })),
            "{result:?}"
        );
    }
    cloud
        .node_client
        .update(bump(mine, &event_component(NODE)).into_object())
        .await?;
    Ok(())
}

#[tokio::test]
async fn a_bound_server_boots_with_what_it_asks_for() -> Result<()> {
    let cloud = Cloud::start().await?;
    let (driver, images) = doubles();
    let agent = agent(&cloud, &driver, &images);
    let uid = cloud.create_server("web-1", "").await?;

    agent.reconcile(&uid).await?;

    assert_running(&cloud, &driver, "web-1").await?;
    let server = cloud.server("web-1").await?;
    ensure!(host(&server).hypervisor == "QEMU" && host(&server).started_at.is_some());
    ensure!(host(&server).restart_count == 0, "{:?}", host(&server));
    ensure!(holds_finalizer(&server));
    // The VM is the Server's: sized from the Flavor copy, labelled with its owner, booted
    // from the cached image, and its config drive carries what the Server says.
    let spec = driver.spec(&uid).context("no spec")?;
    ensure!((spec.vcpus, spec.memory_mib) == (1, 128), "{spec:?}");
    ensure!(spec.labels[LABEL_PROJECT] == PROJECT && spec.labels[LABEL_SERVER] == "web-1");
    ensure!(spec.labels[LABEL_NODE] == NODE);
    let disk = spec.boot_disk.context("no boot disk")?;
    ensure!(disk.size_bytes == Some(1 << 30), "{disk:?}");
    ensure!(
        disk.base
            .ends_with(disk_checksum().strip_prefix("sha256:").unwrap()),
        "{disk:?}"
    );
    let meta = driver
        .file(&uid, "config-2/openstack/latest/meta_data.json")
        .context("no config drive")?;
    let meta: serde_json::Value = serde_json::from_slice(&meta)?;
    ensure!(
        meta["hostname"] == "web-1-host" && meta["uuid"] == uid.as_str(),
        "{meta}"
    );
    ensure!(meta["public_keys"]["alice"] == KEY, "{meta}");
    ensure!(meta["availability_zone"] == "zone-a", "{meta}");
    ensure!(
        driver.file(&uid, "config-2/openstack/latest/user_data")
            == Some(b"#!/bin/sh\necho hi\n".to_vec())
    );
    ensure!(driver.uids() == [uid.clone()] && driver.launches(&uid) == 1);
    ensure!(images.fetches().len() == 1, "{:?}", images.fetches());
    assert_settled(&cloud, &agent, &driver, "web-1").await
}

#[tokio::test]
async fn reconciling_again_writes_nothing_and_changes_nothing() -> Result<()> {
    let cloud = Cloud::start().await?;
    let (driver, images) = doubles();
    let agent = agent(&cloud, &driver, &images);
    let uid = cloud.create_server("web-1", "").await?;
    agent.reconcile(&uid).await?;
    let before = cloud.server("web-1").await?;
    driver.take_journal();

    agent.reconcile(&uid).await?;
    agent.reconcile(&uid).await?;

    let after = cloud.server("web-1").await?;
    ensure!(
        revision(&after) == revision(&before),
        "a converged reconcile wrote the Server: {:?} -> {:?}",
        before.status,
        after.status
    );
    let journal = driver.take_journal();
    // Only observations: the guest's state and the NICs and disks it has.
    ensure!(
        journal.iter().all(|c| matches!(
            c.operation,
            Operation::Status | Operation::Nics | Operation::Disks
        )),
        "{journal:?}"
    );
    ensure!(images.fetches().len() == 1, "{:?}", images.fetches());
    assert_running(&cloud, &driver, "web-1").await
}

#[tokio::test]
async fn a_restarted_agent_adopts_the_running_guest() -> Result<()> {
    let cloud = Cloud::start().await?;
    let (driver, images) = doubles();
    let uid = cloud.create_server("web-1", "").await?;
    agent(&cloud, &driver, &images).reconcile(&uid).await?;
    let before = cloud.server("web-1").await?;

    // A new agent: a new driver over the same host, new memory of everything.
    let driver = Arc::new(driver.restart());
    let images = Arc::new(MemoryImageCache::new());
    let agent = agent(&cloud, &driver, &images);
    for result in agent.resync(&driver).await {
        ensure!(result.1.is_ok(), "{result:?}");
    }

    let journal = driver.journal();
    ensure!(
        !journal.iter().any(|c| c.operation == Operation::Start),
        "the guest was started again: {journal:?}"
    );
    ensure!(driver.changes().is_empty(), "{journal:?}");
    ensure!(driver.launches(&uid) == 1 && driver.uids() == [uid.clone()]);
    ensure!(images.fetches().is_empty(), "nothing needed the image");
    let after = cloud.server("web-1").await?;
    ensure!(revision(&after) == revision(&before), "{:?}", after.status);
    assert_running(&cloud, &driver, "web-1").await
}

#[tokio::test]
async fn a_guest_that_dies_is_restarted_or_reported_as_its_run_strategy_says() -> Result<()> {
    let cloud = Cloud::start().await?;
    let (driver, images) = doubles();
    let agent = agent(&cloud, &driver, &images);
    let always = cloud.create_server("always", "").await?;
    let manual = cloud
        .create_server("manual", "  runStrategy: Manual\n")
        .await?;
    agent.reconcile(&always).await?;
    agent.reconcile(&manual).await?;
    let first_pid = host(&cloud.server("always").await?).pid;

    driver.crash(&always, "qemu: terminating on signal 9");
    driver.crash(&manual, "qemu: terminating on signal 9");
    agent.reconcile(&always).await?;
    agent.reconcile(&manual).await?;

    // Always: restarted, counted, and the reason recorded.
    assert_running(&cloud, &driver, "always").await?;
    let server = cloud.server("always").await?;
    ensure!(driver.launches(&always) == 2);
    ensure!(host(&server).pid != first_pid, "{:?}", host(&server));
    ensure!(host(&server).restart_count == 1, "{:?}", host(&server));
    ensure!(
        host(&server).last_exit_reason.starts_with("Crashed")
            && host(&server).last_exit_reason.contains("signal 9"),
        "{:?}",
        host(&server)
    );
    // Manual: left down, and said so.
    let server = cloud.server("manual").await?;
    ensure!(driver.state(&manual) == Some(VmState::Crashed));
    ensure!(driver.launches(&manual) == 1);
    ensure!(power(&server) == HostPower::Crashed, "{:?}", host(&server));
    ensure!(
        running_condition(&server) == (ConditionStatus::False, "Crashed".to_owned()),
        "{:?}",
        guest_running(&server)
    );

    // A guest that powers itself off is restarted too under Always.
    driver.power_off_by_guest(&always);
    agent.reconcile(&always).await?;
    assert_running(&cloud, &driver, "always").await?;
    let host = host(&cloud.server("always").await?);
    ensure!(host.restart_count == 2, "{host:?}");
    ensure!(
        host.last_exit_reason.starts_with("GuestShutdown"),
        "{host:?}"
    );
    Ok(())
}

#[tokio::test]
async fn a_stopped_servers_guest_started_behind_our_back_is_stopped() -> Result<()> {
    let cloud = Cloud::start().await?;
    let (driver, images) = doubles();
    let agent = agent(&cloud, &driver, &images);
    let uid = cloud.create_server("web-1", "").await?;
    agent.reconcile(&uid).await?;

    cloud
        .edit_server("web-1", |spec| {
            spec.power_state = Some(PowerState::Stopped as i32);
        })
        .await?;
    agent.reconcile(&uid).await?;
    let stopped = |server: &v1::Server| {
        power(server) == HostPower::Shutdown
            && running_condition(server) == (ConditionStatus::False, "Stopped".to_owned())
    };
    let server = cloud.server("web-1").await?;
    ensure!(stopped(&server), "{:?}", server.status);
    ensure!(driver.state(&uid) == Some(VmState::Stopped));
    ensure!(
        driver
            .files(&uid)
            .contains_key(std::path::Path::new("disk.qcow2")),
        "a stop keeps the disk"
    );

    driver.take_journal();
    driver.run_behind_our_back(&uid);
    agent.reconcile(&uid).await?;
    ensure!(driver.state(&uid) == Some(VmState::Stopped));
    let stops: Vec<_> = driver
        .journal()
        .into_iter()
        .filter(|c| c.operation == Operation::Stop)
        .collect();
    ensure!(
        stops.len() == 1 && stops[0].outcome == Outcome::Done,
        "{stops:?}"
    );
    ensure!(
        !driver
            .journal()
            .iter()
            .any(|c| c.operation == Operation::Start),
        "{:?}",
        driver.journal()
    );
    let server = cloud.server("web-1").await?;
    ensure!(stopped(&server), "{:?}", server.status);
    assert_settled(&cloud, &agent, &driver, "web-1").await
}

#[tokio::test]
async fn orphans_are_destroyed_only_when_their_server_is_gone() -> Result<()> {
    let cloud = Cloud::start().await?;
    let (driver, images) = doubles();
    let agent = agent(&cloud, &driver, &images);
    let ours = cloud.create_server("ours", "").await?;
    let elsewhere = cloud.create_server_on("elsewhere", "", OTHER_NODE).await?;
    cloud.create_server_on("reused", "", OTHER_NODE).await?;
    agent.reconcile(&ours).await?;

    let owner = |name: &str| {
        BTreeMap::from([
            (LABEL_PROJECT.to_owned(), PROJECT.to_owned()),
            (LABEL_SERVER.to_owned(), name.to_owned()),
        ])
    };
    // Left by an earlier agent: its Server was deleted while the agent was down.
    driver.plant("vm-of-a-deleted-server", owner("ghost"), true);
    // A VM whose Server's name now belongs to another Server (another uid).
    driver.plant("vm-of-a-replaced-server", owner("reused"), false);
    // Made by someone else: no labels to go by.
    driver.plant("vm-an-operator-made", BTreeMap::new(), true);
    // A Server bound to another node, whose VM is (also) here.
    driver.plant(&elsewhere, owner("elsewhere"), true);

    let results = agent.resync(&driver).await;
    ensure!(results.iter().all(|r| r.1.is_ok()), "{results:?}");

    let mut left = driver.uids();
    left.sort();
    let mut expected = vec![
        ours.clone(),
        "vm-an-operator-made".to_owned(),
        elsewhere.clone(),
    ];
    expected.sort();
    ensure!(left == expected, "{left:?}");
    ensure!(driver.state("vm-an-operator-made") == Some(VmState::Running));
    ensure!(driver.state(&elsewhere) == Some(VmState::Running));
    ensure!(driver.files("vm-of-a-deleted-server").is_empty());
    // The Server bound elsewhere is not this agent's to write.
    let server = cloud.server("elsewhere").await?;
    ensure!(
        server
            .status
            .as_ref()
            .and_then(|s| s.host.as_ref())
            .is_none()
    );
    assert_running(&cloud, &driver, "ours").await?;

    // A second pass finds nothing more to do.
    driver.take_journal();
    agent.resync(&driver).await;
    ensure!(driver.changes().is_empty(), "{:?}", driver.journal());
    Ok(())
}

#[tokio::test]
async fn a_create_that_fails_at_each_step_converges_once_the_cause_is_gone() -> Result<()> {
    let cloud = Cloud::empty().await?;
    let (driver, images) = doubles();
    let agent = agent(&cloud, &driver, &images);
    let uid = cloud.create_server("web-1", "").await?;
    let down = |server: &v1::Server, reason: &str| {
        running_condition(server) == (ConditionStatus::False, reason.to_owned())
            && matches!(power(server), HostPower::NoState | HostPower::Shutdown)
    };

    // The Image does not exist (yet).
    ensure!(reason(agent.reconcile(&uid).await)? == "ImageNotFound");
    let server = cloud.server("web-1").await?;
    ensure!(down(&server, "ImageNotFound"), "{:?}", server.status);
    ensure!(
        guest_running(&server)
            .message
            .contains("Image tiny not found"),
        "{:?}",
        guest_running(&server)
    );
    ensure!(driver.uids().is_empty() && images.fetches().is_empty());
    cloud.create_image().await?;

    // Fetching it fails: the download, then the bytes that came.
    let cases = [
        (
            FetchFault::DownloadFailed("connection reset by peer".into()),
            "DownloadFailed",
        ),
        (FetchFault::NotFound, "DownloadFailed"),
        (
            FetchFault::ChecksumMismatch("sha256:0000".into()),
            "ImageChecksumMismatch",
        ),
    ];
    for (fault, expected) in cases {
        images.fail_next(DISK_URL, fault, 1);
        ensure!(reason(agent.reconcile(&uid).await)? == expected);
        let server = cloud.server("web-1").await?;
        ensure!(down(&server, expected), "{:?}", server.status);
        ensure!(driver.uids().is_empty(), "{:?}", driver.uids());
    }

    // The KeyPair is gone.
    cloud
        .admin
        .delete_key(Kind::KeyPair, PROJECT, "alice")
        .await?;
    ensure!(reason(agent.reconcile(&uid).await)? == "KeyPairNotFound");
    cloud
        .apply(&format!(
            "apiVersion: ferro/v1\nkind: KeyPair\nmetadata: {{name: alice}}\nspec:\n  \
             publicKey: {KEY}\n"
        ))
        .await?;

    // QEMU refuses to start, twice: what the start wrote stays, nothing runs.
    driver.fail_next_start(2);
    for _ in 0..2 {
        ensure!(reason(agent.reconcile(&uid).await)? == "StartFailed");
        let server = cloud.server("web-1").await?;
        ensure!(down(&server, "StartFailed"), "{:?}", server.status);
        ensure!(
            guest_running(&server).message.contains("could not load"),
            "{:?}",
            guest_running(&server)
        );
        ensure!(driver.alive().is_empty());
    }

    // Nothing fails any more: one guest, nothing leaked.
    agent.reconcile(&uid).await?;
    assert_running(&cloud, &driver, "web-1").await?;
    ensure!(driver.uids() == [uid.clone()], "{:?}", driver.uids());
    ensure!(driver.launches(&uid) == 1);
    ensure!(host(&cloud.server("web-1").await?).restart_count == 0);
    let starts = driver
        .journal()
        .into_iter()
        .filter(|c| c.operation == Operation::Start)
        .count();
    ensure!(starts == 3, "{:?}", driver.journal());
    // The images the node reports: the disk, ready.
    let report = images.report();
    ensure!(
        report.len() == 1 && report[0].phase == v1::cached_image::Phase::Ready as i32,
        "{report:?}"
    );
    assert_settled(&cloud, &agent, &driver, "web-1").await
}

#[tokio::test]
async fn a_delete_that_fails_at_each_step_keeps_the_finalizer_until_it_is_done() -> Result<()> {
    let cloud = Cloud::start().await?;
    let (driver, images) = doubles();
    let agent = agent(&cloud, &driver, &images);
    let uid = cloud.create_server("web-1", "").await?;
    agent.reconcile(&uid).await?;
    cloud.delete_server("web-1").await?;
    let server = cloud.server("web-1").await?;
    ensure!(
        holds_finalizer(&server),
        "the agent's finalizer holds the Server"
    );

    // The hypervisor would not die.
    driver.fail_next_destroy(1);
    ensure!(reason(agent.reconcile(&uid).await)? == "DestroyFailed");
    ensure!(holds_finalizer(&cloud.server("web-1").await?));
    ensure!(driver.state(&uid) == Some(VmState::Running));

    // Destroy said it worked, yet the VM is still there.
    driver.keep_on_destroy(1);
    let result = agent.reconcile(&uid).await;
    ensure!(
        matches!(result, Err(ReconcileError::StillPresent(_))),
        "{result:?}"
    );
    ensure!(holds_finalizer(&cloud.server("web-1").await?));
    ensure!(!driver.files(&uid).is_empty());

    // Observing the host fails: nothing is assumed gone.
    driver.fail_next(Operation::Status, 1, |uid| {
        HypervisorError::NotRunning(uid.to_owned())
    });
    ensure!(reason(agent.reconcile(&uid).await)? == "HypervisorError");
    ensure!(holds_finalizer(&cloud.server("web-1").await?));

    // Nothing fails any more: the VM, its files and the finalizer go, then the Server.
    agent.reconcile(&uid).await?;
    ensure!(driver.state(&uid).is_none() && driver.files(&uid).is_empty());
    ensure!(
        cloud.server_is_gone("web-1").await?,
        "the Server is still there"
    );

    driver.take_journal();
    agent.reconcile(&uid).await?;
    ensure!(driver.changes().is_empty(), "{:?}", driver.journal());
    Ok(())
}

#[tokio::test]
async fn a_stopped_server_that_is_deleted_goes_without_being_started() -> Result<()> {
    let cloud = Cloud::start().await?;
    let (driver, images) = doubles();
    let agent = agent(&cloud, &driver, &images);
    let uid = cloud
        .create_server("cold", "  powerState: Stopped\n")
        .await?;
    agent.reconcile(&uid).await?;
    let server = cloud.server("cold").await?;
    ensure!(
        running_condition(&server) == (ConditionStatus::False, "Stopped".to_owned()),
        "{:?}",
        server.status
    );
    ensure!(driver.uids().is_empty() && images.fetches().is_empty());

    cloud.delete_server("cold").await?;
    agent.reconcile(&uid).await?;
    ensure!(cloud.server_is_gone("cold").await?);
    ensure!(driver.journal().iter().all(|c| !c.changed_the_host()));
    Ok(())
}

#[tokio::test]
async fn a_stop_that_fails_is_retried_and_the_guest_is_reported_as_it_is() -> Result<()> {
    let cloud = Cloud::start().await?;
    let (driver, images) = doubles();
    let agent = agent(&cloud, &driver, &images);
    let uid = cloud.create_server("web-1", "").await?;
    agent.reconcile(&uid).await?;
    cloud
        .edit_server("web-1", |spec| {
            spec.power_state = Some(PowerState::Stopped as i32);
        })
        .await?;

    driver.fail_next(Operation::Stop, 1, |uid| HypervisorError::WouldNotDie {
        uid: uid.to_owned(),
        pid: 1,
        waited: Duration::from_secs(10),
    });
    ensure!(reason(agent.reconcile(&uid).await)? == "StopFailed");
    // The guest still runs, and the Server says so rather than what was asked.
    assert_running(&cloud, &driver, "web-1").await?;

    // A guest that ignores the power button is ended by force.
    driver.set_honours_acpi(&uid, false);
    agent.reconcile(&uid).await?;
    ensure!(driver.state(&uid) == Some(VmState::Stopped));
    let server = cloud.server("web-1").await?;
    ensure!(power(&server) == HostPower::Shutdown, "{:?}", host(&server));
    ensure!(
        running_condition(&server) == (ConditionStatus::False, "Stopped".to_owned()),
        "{:?}",
        guest_running(&server)
    );
    assert_settled(&cloud, &agent, &driver, "web-1").await?;

    // Started again: the same VM, its disk kept.
    let disk = driver.file(&uid, "disk.qcow2");
    cloud
        .edit_server("web-1", |spec| {
            spec.power_state = Some(PowerState::Running as i32);
        })
        .await?;
    agent.reconcile(&uid).await?;
    assert_running(&cloud, &driver, "web-1").await?;
    ensure!(driver.launches(&uid) == 2 && driver.file(&uid, "disk.qcow2") == disk);
    ensure!(
        host(&cloud.server("web-1").await?).restart_count == 0,
        "asked for, not a restart"
    );
    assert_settled(&cloud, &agent, &driver, "web-1").await
}

#[tokio::test]
async fn a_reboot_request_resets_the_guest_once_even_after_a_failed_reset() -> Result<()> {
    let cloud = Cloud::start().await?;
    let (driver, images) = doubles();
    let agent = agent(&cloud, &driver, &images);
    let uid = cloud.create_server("web-1", "").await?;
    agent.reconcile(&uid).await?;

    let mut server = cloud.server("web-1").await?;
    server
        .metadata
        .get_or_insert_with(Default::default)
        .annotations
        .insert(
            "ferro.io/reboot-requested-at".into(),
            "2026-12-07T01:00:00Z".into(),
        );
    cloud.admin.update(server.into_object()).await?;

    driver.fail_next(Operation::Reset, 1, |uid| {
        HypervisorError::NotRunning(uid.to_owned())
    });
    ensure!(reason(agent.reconcile(&uid).await)? == "ResetFailed");
    ensure!(driver.resets(&uid) == 0);
    ensure!(host(&cloud.server("web-1").await?).last_reboot.is_empty());

    agent.reconcile(&uid).await?;
    ensure!(driver.resets(&uid) == 1 && driver.launches(&uid) == 1);
    let server = cloud.server("web-1").await?;
    ensure!(
        host(&server).last_reboot == "2026-12-07T01:00:00Z",
        "{:?}",
        host(&server)
    );
    assert_running(&cloud, &driver, "web-1").await?;
    // Performed once: later reconciles do not reset again.
    assert_settled(&cloud, &agent, &driver, "web-1").await?;
    ensure!(driver.resets(&uid) == 1);
    Ok(())
}

#[tokio::test]
async fn an_unresponsive_or_paused_guest_is_reported_and_not_started_again() -> Result<()> {
    let cloud = Cloud::start().await?;
    let (driver, images) = doubles();
    let agent = agent(&cloud, &driver, &images);
    let uid = cloud.create_server("web-1", "").await?;
    agent.reconcile(&uid).await?;

    driver.hang(&uid);
    agent.reconcile(&uid).await?;
    let server = cloud.server("web-1").await?;
    ensure!(
        power(&server) == HostPower::Running,
        "last seen: {:?}",
        host(&server)
    );
    ensure!(
        running_condition(&server)
            == (
                ConditionStatus::Unknown,
                "HypervisorUnresponsive".to_owned()
            ),
        "{:?}",
        guest_running(&server)
    );
    ensure!(driver.launches(&uid) == 1);
    assert_settled(&cloud, &agent, &driver, "web-1").await?;

    driver.run_behind_our_back(&uid);
    driver.pause(&uid, "guest-panicked");
    agent.reconcile(&uid).await?;
    let server = cloud.server("web-1").await?;
    ensure!(power(&server) == HostPower::Paused, "{:?}", host(&server));
    ensure!(
        running_condition(&server) == (ConditionStatus::False, "Paused".to_owned()),
        "{:?}",
        guest_running(&server)
    );
    ensure!(
        guest_running(&server).message.contains("guest-panicked"),
        "{:?}",
        guest_running(&server)
    );
    ensure!(driver.launches(&uid) == 1);
    assert_settled(&cloud, &agent, &driver, "web-1").await
}
