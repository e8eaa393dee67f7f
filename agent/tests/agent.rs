//! The node agent against an in-process apiserver (in-memory store) and real QEMU (TCG)
//! booting Ferro's tiny test guest.
//!
//! Each test starts its own apiserver with an admin and a node token, and runs the agent
//! in-process for node `n1` with a private, short state directory. The scheduler does not
//! exist here: tests place Servers with the admin's `Bind`, as the scheduler will. Serial
//! consoles are read as `ferro logs` and `ferro console` read them: through the
//! apiserver's relay, which the agent serves over its tunnel.
//!
//! Every test kills the QEMU processes left in its state directory when it ends, passed or
//! failed, by the pids their pidfiles name. Timeouts are generous and nothing asserts on
//! elapsed time: these tests share two cores with everything else.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use common::{kill, qemu_processes, tiny_guest};
use ferro_agent::agent::SERVER_CONTROLLER;
use ferro_agent::hypervisor::qemu::{AccelPolicy, QemuConfig, QemuDriver};
use ferro_agent::hypervisor::{BootDisk, DirectKernel, DiskFormat, Hypervisor, VmSpec};
use ferro_agent::{AgentConfig, Drivers};
use ferro_api::auth::Tokens;
use ferro_api::client::Client;
use ferro_api::server::ApiServer;
use ferro_api::v1::server_host_status::PowerState as HostPower;
use ferro_api::v1::{self, condition::Status as ConditionStatus};
use ferro_api::{Error, Kind, Resource};
use ferro_runtime::controller::RESYNCS_TOTAL;
use ferro_runtime::metrics::Metrics;
use ferro_store::memory::MemoryStore;
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;

const TOKENS: &str = "admin-token admin\nnode-token system:node:n1\n";
const NODE: &str = "n1";
const KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJ65XlM9xwTrwBb2VYfUbi9VU/mF0doEHYlbtQsEKTh5 alice@ferro";
/// How long anything that needs a guest to boot may take.
const BOOT: Duration = Duration::from_secs(180);
/// How long the control plane may take to notice and write something.
const SOON: Duration = Duration::from_secs(60);
/// The agent's resync period in these tests.
const RESYNC: Duration = Duration::from_secs(3);

fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "ferro_agent=info".into()),
        )
        .with_test_writer()
        .try_init();
}

// ---------------------------------------------------------------------------------------
// Consoles, as `ferro logs` and `ferro console` read them: through the apiserver's relay.

type ConsoleStream = tonic::codec::Streaming<v1::ConsoleData>;

/// One console session, from a user's side.
struct Session {
    data: ConsoleStream,
    keys: Option<mpsc::Sender<v1::AttachInput>>,
}

impl Session {
    /// Reads until the text holds `needle` or the session ends; returns all text read.
    async fn read_until(&mut self, needle: &str, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        let mut text = String::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.data.message()).await {
                Ok(Ok(Some(data))) => {
                    text.push_str(&String::from_utf8_lossy(&data.data));
                    if !needle.is_empty() && text.contains(needle) {
                        return Ok(text);
                    }
                }
                Ok(Ok(None)) if needle.is_empty() => return Ok(text),
                Ok(Ok(None)) => bail!("the session ended without {needle:?}:\n{text}"),
                Ok(Err(status)) => bail!("the session failed: {status}\n{text}"),
                Err(_) => bail!("no {needle:?} within {timeout:?}:\n{text}"),
            }
        }
    }

    /// Reads everything until the session ends.
    async fn read_to_end(&mut self) -> Result<String> {
        self.read_until("", SOON).await
    }

    /// Types into an attached console.
    async fn type_keys(&self, keys: &str) -> Result<()> {
        let sender = self.keys.as_ref().context("not an attached session")?;
        sender
            .send(v1::AttachInput {
                data: keys.as_bytes().to_vec(),
                ..Default::default()
            })
            .await
            .context("the session is gone")
    }
}

fn server_key(name: &str) -> Option<v1::ObjectKey> {
    Some(v1::ObjectKey {
        kind: "Server".into(),
        project: "default".into(),
        name: name.into(),
    })
}

// ---------------------------------------------------------------------------------------
// An apiserver, and agents for node n1.

/// A private cloud: an apiserver (with its console relay) on a loopback port, and a state
/// directory for the node. Dropping it kills every QEMU in that directory.
struct Cloud {
    address: SocketAddr,
    admin: Client,
    state: tempfile::TempDir,
    stop_server: Option<oneshot::Sender<()>>,
    images: tempfile::TempDir,
}

/// A running agent; aborted when dropped.
struct Agent {
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    stop: Option<oneshot::Sender<()>>,
    metrics: Metrics,
}

impl Agent {
    /// One of the agent's counters for its Server controller.
    fn counter(&self, name: &str) -> f64 {
        self.metrics
            .value(name, &[("controller", SERVER_CONTROLLER)])
            .unwrap_or_default()
    }

    /// Waits until `passes` more resyncs have run and at least as many reconciles have
    /// finished since the call: what "nothing happened over several resyncs" must wait
    /// for, instead of a sleep that proves nothing on a loaded machine.
    async fn wait_resyncs(&self, passes: u32) -> Result<()> {
        let passes = f64::from(passes);
        let resyncs = self.counter(RESYNCS_TOTAL) + passes;
        let reconciles = self.counter("ferro_controller_reconciles_total") + passes;
        let deadline = Instant::now() + SOON;
        while self.counter(RESYNCS_TOTAL) < resyncs
            || self.counter("ferro_controller_reconciles_total") < reconciles
        {
            if Instant::now() > deadline {
                bail!("the agent did not resync {passes} times within {SOON:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    }

    /// Asks the agent to stop and waits until it has.
    async fn stop(mut self) -> Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(SOON, &mut self.task)
            .await
            .context("the agent did not stop")??
    }

    /// Ends the agent at once, as SIGKILL would: nothing of it runs on.
    async fn kill(mut self) {
        self.task.abort();
        let _ = (&mut self.task).await;
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Cloud {
    async fn start() -> Result<Cloud> {
        init_logging();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?;
        let api = ApiServer::new(Arc::new(MemoryStore::new()), Tokens::parse(TOKENS));
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        tokio::spawn(async move {
            let served = api
                .serve(listener, async {
                    let _ = stop_rx.await;
                })
                .await;
            if let Err(e) = served {
                eprintln!("the test apiserver failed: {e}");
            }
        });
        let admin = Client::connect_lazy(&address.to_string(), "admin-token")?;
        // Short, so that VM socket paths stay under the 107-byte limit.
        let state = tempfile::Builder::new().prefix("fa").tempdir_in("/tmp")?;
        let images = tempfile::tempdir()?;
        Ok(Cloud {
            address,
            admin,
            state,
            stop_server: Some(stop_tx),
            images,
        })
    }

    fn vm_dir(&self) -> PathBuf {
        self.state.path().join("vms")
    }

    fn agent(&self) -> Agent {
        let mut config = AgentConfig::new(NODE, self.address.to_string(), "node-token");
        config.state_dir = self.state.path().to_owned();
        config.zone = "zone-a".into();
        config.address = Some("127.0.0.1".into());
        config.heartbeat_interval = Duration::from_secs(1);
        config.lease_duration = Duration::from_secs(5);
        config.resync_period = RESYNC;
        config.stop_grace = Duration::from_secs(60);
        config.accel = AccelPolicy::Tcg;
        let (stop, stopped) = oneshot::channel::<()>();
        let config = config.with_shutdown(async {
            let _ = stopped.await;
        });
        let metrics = config.metrics.clone();
        let drivers = Drivers::real(&config).expect("the real drivers");
        Agent {
            task: tokio::spawn(ferro_agent::run(config, drivers)),
            stop: Some(stop),
            metrics,
        }
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

    /// The three Images of the tiny guest (kernel, initrd, disk), public in project
    /// `default`, with the disk's checksum pinned.
    async fn apply_tiny_images(&self) -> Result<()> {
        let guest = tiny_guest();
        self.apply(&format!(
            r#"
apiVersion: ferro/v1
kind: Image
metadata: {{name: tiny-kernel}}
spec: {{source: {{url: "file://{kernel}"}}, diskFormat: Kernel, visibility: Public}}
---
apiVersion: ferro/v1
kind: Image
metadata: {{name: tiny-initrd}}
spec: {{source: {{url: "file://{initrd}"}}, diskFormat: Ramdisk, visibility: Public}}
---
apiVersion: ferro/v1
kind: Image
metadata: {{name: tiny}}
spec:
  source: {{url: "file://{disk}"}}
  checksum: "{checksum}"
  diskFormat: Raw
  kernel: tiny-kernel
  ramdisk: tiny-initrd
  kernelCommandLine: "{cmdline}"
  visibility: Public
"#,
            kernel = guest.kernel.display(),
            initrd = guest.initrd.display(),
            disk = guest.disk.display(),
            checksum = sha256_of(&guest.disk)?,
            cmdline = guest.cmdline,
        ))
        .await
    }

    /// Places a Server on n1 with a small flavor, as the scheduler would.
    async fn bind(&self, name: &str) -> Result<()> {
        let flavor = v1::FlavorSnapshot {
            name: "m1.tiny".into(),
            vcpus: 1,
            ram_mib: 128,
            disk_gib: 1,
            ..Default::default()
        };
        // The agent registers its Node shortly after it starts; a scheduler would only
        // bind to a registered Node, so wait for it rather than race it.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while self.admin.get(Kind::Node, "", NODE).await.is_err() {
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "node {NODE} never registered"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.admin
            .bind("default", name, NODE, flavor)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(())
    }

    async fn server(&self, name: &str) -> Result<v1::Server> {
        self.admin
            .get_typed::<v1::Server>("default", name)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))
    }

    /// Waits until the Server satisfies `check`; returns it.
    async fn wait_server(
        &self,
        name: &str,
        what: &str,
        timeout: Duration,
        check: impl Fn(&v1::Server) -> bool,
    ) -> Result<v1::Server> {
        let deadline = Instant::now() + timeout;
        loop {
            let server = self.server(name).await?;
            if check(&server) {
                return Ok(server);
            }
            if Instant::now() > deadline {
                bail!(
                    "servers/{name}: not {what} within {timeout:?}; status: {:#?}",
                    server.status
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Changes a Server's spec, retrying on conflicts with status writers.
    async fn edit_server(&self, name: &str, edit: impl Fn(&mut v1::Server)) -> Result<()> {
        for _ in 0..20 {
            let mut server = self.server(name).await?;
            edit(&mut server);
            match self.admin.update(server.into_object()).await {
                Ok(_) => return Ok(()),
                Err(Error::Conflict { .. }) => continue,
                Err(e) => bail!("{e}"),
            }
        }
        bail!("servers/{name} kept changing under the edit")
    }

    async fn delete_server(&self, name: &str) -> Result<()> {
        self.admin
            .delete_key(Kind::Server, "default", name)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(())
    }

    async fn wait_gone(&self, name: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.admin.get(Kind::Server, "default", name).await {
                Err(Error::NotFound { .. }) => return Ok(()),
                Ok(object) => {
                    ensure!(
                        Instant::now() < deadline,
                        "servers/{name} is still there: {object:#?}"
                    );
                }
                Err(e) => bail!("{e}"),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn node(&self) -> Result<v1::Node> {
        self.admin
            .get_typed::<v1::Node>("", NODE)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))
    }

    async fn wait_node(&self, what: &str, check: impl Fn(&v1::Node) -> bool) -> Result<v1::Node> {
        let deadline = Instant::now() + SOON;
        loop {
            if let Ok(node) = self.node().await
                && check(&node)
            {
                return Ok(node);
            }
            if Instant::now() > deadline {
                bail!(
                    "node {NODE}: not {what} within {SOON:?}: {:#?}",
                    self.node().await
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// `ferro logs server/NAME [-f] [--tail N]`: a console session through the relay.
    async fn logs(&self, name: &str, follow: bool, tail_bytes: u64) -> Result<Session> {
        let request = v1::LogsRequest {
            key: server_key(name),
            follow,
            tail_bytes,
        };
        let data = self.admin.consoles().logs(request).await?.into_inner();
        Ok(Session { data, keys: None })
    }

    /// `ferro console server/NAME`: attached as the writer.
    async fn attach(&self, name: &str) -> Result<Session> {
        let (keys, rx) = mpsc::channel(16);
        keys.send(v1::AttachInput {
            key: server_key(name),
            write: true,
            ..Default::default()
        })
        .await?;
        let data = self
            .admin
            .consoles()
            .attach(ReceiverStream::new(rx))
            .await?
            .into_inner();
        Ok(Session {
            data,
            keys: Some(keys),
        })
    }

    /// The whole serial log of a server, through the relay.
    async fn serial_log(&self, name: &str) -> Result<String> {
        self.logs(name, false, 0).await?.read_to_end().await
    }

    /// Waits until the serial log (read through the relay) holds `needle`.
    async fn wait_console(&self, name: &str, needle: &str) -> Result<String> {
        let deadline = Instant::now() + BOOT;
        loop {
            let log = self.serial_log(name).await;
            match &log {
                Ok(log) if log.contains(needle) => return Ok(log.clone()),
                _ if Instant::now() > deadline => {
                    bail!("the console of {name} never showed {needle:?}: {log:?}")
                }
                _ => tokio::time::sleep(Duration::from_millis(500)).await,
            }
        }
    }
}

impl Drop for Cloud {
    fn drop(&mut self) {
        common::kill_vms_under(&self.vm_dir());
        if let Some(stop) = self.stop_server.take() {
            let _ = stop.send(());
        }
    }
}

fn sha256_of(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path)?;
    Ok(format!(
        "sha256:{}",
        ferro_agent::images::hex(&Sha256::digest(&bytes))
    ))
}

fn host(server: &v1::Server) -> v1::ServerHostStatus {
    server
        .status
        .as_ref()
        .and_then(|s| s.host.clone())
        .unwrap_or_default()
}

fn guest_running(server: &v1::Server) -> Option<v1::Condition> {
    server
        .status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.r#type == "GuestRunning")
        .cloned()
}

fn uid(server: &v1::Server) -> String {
    server.metadata.as_ref().unwrap().uid.clone()
}

fn is_running(server: &v1::Server) -> bool {
    host(server).power_state == HostPower::Running as i32
        && guest_running(server).is_some_and(|c| c.status == ConditionStatus::True as i32)
}

fn has_reason(server: &v1::Server, reason: &str) -> bool {
    guest_running(server)
        .is_some_and(|c| c.status == ConditionStatus::False as i32 && c.reason == reason)
}

/// A Server of the tiny guest, with a key and a user data script.
fn server_yaml(name: &str, extra: &str) -> String {
    format!(
        r#"
apiVersion: ferro/v1
kind: Server
metadata: {{name: {name}}}
spec:
  flavor: m1.tiny
  image: tiny
  keyPair: alice
  hostname: {name}-host
  userData: |
    #!/bin/sh
    echo "user data ran on $(hostname)"
{extra}
"#
    )
}

fn keypair() -> String {
    format!(
        "apiVersion: ferro/v1\nkind: KeyPair\nmetadata: {{name: alice}}\nspec:\n  publicKey: {KEY}\n"
    )
}

// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_drives_a_server_through_its_life() -> Result<()> {
    let started = Instant::now();
    let cloud = Cloud::start().await?;
    let agent = cloud.agent();

    // Registration: the Node, measured; the heartbeat Lease, renewed.
    let node = cloud
        .wait_node("registered with its capacity", |n| {
            n.status.as_ref().is_some_and(|s| {
                s.capacity
                    .is_some_and(|c| c.vcpus > 0 && c.ram_mib > 0 && c.disk_gib > 0)
                    && s.conditions.iter().any(|c| {
                        c.r#type == "HostReady" && c.status == ConditionStatus::True as i32
                    })
            })
        })
        .await?;
    let status = node.status.unwrap();
    ensure!(
        status.hypervisor == "QEMU" && status.accelerator == "TCG",
        "{status:?}"
    );
    ensure!(
        status.zone == "zone-a" && status.address == "127.0.0.1",
        "{status:?}"
    );
    ensure!(
        status.roles == [v1::node_status::Role::Compute as i32],
        "{status:?}"
    );
    let (capacity, allocatable) = (status.capacity.unwrap(), status.allocatable.unwrap());
    ensure!(
        allocatable.ram_mib < capacity.ram_mib && allocatable.vcpus == capacity.vcpus,
        "{capacity:?} {allocatable:?}"
    );
    let renewed = |lease: &v1::Lease| {
        lease
            .spec
            .as_ref()
            .and_then(|s| s.renew_time)
            .map(|t| (t.seconds, t.nanos))
    };
    let first = cloud.admin.get_typed::<v1::Lease>("", "node-n1").await?;
    ensure!(
        first.spec.as_ref().unwrap().holder_identity == NODE
            && first.spec.as_ref().unwrap().lease_duration_seconds == 5,
        "{first:?}"
    );
    let deadline = Instant::now() + SOON;
    loop {
        let lease = cloud.admin.get_typed::<v1::Lease>("", "node-n1").await?;
        if renewed(&lease) > renewed(&first) {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "the lease was not renewed: {lease:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // A server with an image, a key and user data, placed on n1.
    cloud.apply_tiny_images().await?;
    cloud.apply(&keypair()).await?;
    cloud.apply(&server_yaml("web-1", "")).await?;
    cloud.bind("web-1").await?;
    let server = cloud
        .wait_server("web-1", "running", BOOT, is_running)
        .await?;
    let uid = uid(&server);
    let first_pid = host(&server).pid;
    ensure!(
        first_pid > 0 && host(&server).hypervisor == "QEMU",
        "{:?}",
        host(&server)
    );
    ensure!(host(&server).started_at.is_some(), "{:?}", host(&server));
    ensure!(qemu_processes(&uid) == [first_pid as u32]);

    // The serial console, read through the relay, shows the guest booted with what the
    // Server says.
    let log = cloud.wait_console("web-1", "FERRO-READY").await?;
    ensure!(log.contains("ferro-tiny: hostname web-1-host"), "{log}");
    ensure!(
        log.contains(&format!("ferro-tiny: authorized-key alice {KEY}")),
        "{log}"
    );
    ensure!(log.contains("user data ran on web-1-host"), "{log}");
    ensure!(
        log.contains("FERRO-READY hostname=web-1-host boot-count=1"),
        "{log}"
    );
    // A tail is the end of the log. The guest may still be printing (its shell prompt,
    // DHCP in the background), so the tail is compared with a full read taken after it.
    let end = cloud.logs("web-1", false, 40).await?.read_to_end().await?;
    let after = cloud.logs("web-1", false, 0).await?.read_to_end().await?;
    ensure!(
        !end.is_empty() && end.len() <= 40 && after.starts_with(&log) && after.contains(&end),
        "{end:?}"
    );

    // The node reports the three images, verified, by checksum.
    let guest = tiny_guest();
    let node = cloud
        .wait_node("reporting its images", |n| {
            n.status.as_ref().is_some_and(|s| {
                s.images.len() == 3
                    && s.images
                        .iter()
                        .all(|i| i.phase == v1::cached_image::Phase::Ready as i32)
            })
        })
        .await?;
    let images = node.status.unwrap().images;
    for path in [&guest.kernel, &guest.initrd, &guest.disk] {
        let checksum = sha256_of(path)?;
        ensure!(
            images.iter().any(|i| i.checksum == checksum),
            "no cached image with {checksum}: {images:#?}"
        );
    }
    let disk = images
        .iter()
        .find(|i| i.image == "default/tiny")
        .context("the disk image")?;
    ensure!(
        disk.format == "raw" && disk.virtual_size_bytes > 0,
        "{disk:?}"
    );

    // An attached console: keystrokes in, output out.
    let mut attached = cloud.attach("web-1").await?;
    attached.type_keys("\necho attached-$((6 * 7))\n").await?;
    attached.read_until("attached-42", SOON).await?;
    drop(attached);

    // Killed behind the agent's back: restarted within a resync, counted, explained.
    let mut follow = cloud.logs("web-1", true, 1).await?;
    kill(first_pid as u32);
    let server = cloud
        .wait_server("web-1", "restarted", BOOT, |s| {
            is_running(s) && host(s).restart_count == 1 && host(s).pid != first_pid
        })
        .await?;
    ensure!(
        host(&server).last_exit_reason.starts_with("Crashed: "),
        "{:?}",
        host(&server)
    );
    // The followed console shows the second boot, on the same disk.
    follow.read_until("boot-count=2", BOOT).await?;
    drop(follow);
    let pid = host(&server).pid;

    // A new agent (the old one killed outright) adopts the guest: same pid, one QEMU,
    // the same status.
    agent.kill().await;
    let agent = cloud.agent();
    cloud
        .edit_server("web-1", |s| {
            s.metadata.as_mut().unwrap().annotations.insert(
                "ferro.io/reboot-requested-at".into(),
                "2026-11-22T10:00:00Z".into(),
            );
        })
        .await?;
    let server = cloud
        .wait_server("web-1", "rebooted by the new agent", SOON, |s| {
            host(s).last_reboot == "2026-11-22T10:00:00Z"
        })
        .await?;
    ensure!(host(&server).pid == pid, "{:?}", host(&server));
    ensure!(host(&server).restart_count == 1, "{:?}", host(&server));
    ensure!(qemu_processes(&uid) == [pid as u32]);
    cloud.wait_console("web-1", "boot-count=3").await?;

    // Idle resyncs write nothing.
    let before = cloud.server("web-1").await?;
    agent.wait_resyncs(3).await?;
    let after = cloud.server("web-1").await?;
    ensure!(
        before.metadata.as_ref().unwrap().resource_version
            == after.metadata.as_ref().unwrap().resource_version,
        "an idle resync wrote the server: {before:#?} then {after:#?}"
    );

    // powerState Stopped: the guest shuts down (ACPI) and its files stay.
    cloud
        .edit_server("web-1", |s| {
            s.spec.as_mut().unwrap().power_state =
                Some(v1::server_spec::PowerState::Stopped as i32);
        })
        .await?;
    let server = cloud
        .wait_server("web-1", "stopped", BOOT, |s| {
            host(s).power_state == HostPower::Shutdown as i32 && has_reason(s, "Stopped")
        })
        .await?;
    ensure!(host(&server).pid == 0, "{:?}", host(&server));
    ensure!(qemu_processes(&uid).is_empty(), "QEMU still runs");
    ensure!(cloud.vm_dir().join(&uid).join("disk.qcow2").exists());
    ensure!(cloud.serial_log("web-1").await?.contains("FERRO-POWEROFF"));

    // Running again: it boots from the same disk, and that is no restart.
    cloud
        .edit_server("web-1", |s| {
            s.spec.as_mut().unwrap().power_state =
                Some(v1::server_spec::PowerState::Running as i32);
        })
        .await?;
    let server = cloud
        .wait_server("web-1", "running again", BOOT, is_running)
        .await?;
    ensure!(host(&server).restart_count == 1, "{:?}", host(&server));
    cloud.wait_console("web-1", "boot-count=4").await?;

    // Deleted: the guest and its files go at once, then the finalizer, then the object.
    cloud.delete_server("web-1").await?;
    cloud.wait_gone("web-1", SOON).await?;
    ensure!(qemu_processes(&uid).is_empty(), "QEMU survived the delete");
    ensure!(
        !cloud.vm_dir().join(&uid).exists(),
        "the VM's files survived the delete"
    );

    agent.stop().await?;
    println!(
        "server life cycle done in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_references_and_bad_images_are_reported_and_retried() -> Result<()> {
    let cloud = Cloud::start().await?;
    let _agent = cloud.agent();
    cloud
        .wait_node("registered", |n| n.status.is_some())
        .await?;

    cloud.apply(&server_yaml("lost", "")).await?;
    cloud.bind("lost").await?;
    let server = cloud
        .wait_server("lost", "missing its image", SOON, |s| {
            has_reason(s, "ImageNotFound")
        })
        .await?;
    ensure!(
        host(&server).power_state == HostPower::NoState as i32,
        "{:?}",
        host(&server)
    );

    // An image whose bytes do not match its checksum, and still no key pair.
    let bytes = vec![0u8; 1 << 20];
    let file = cloud.images.path().join("disk.raw");
    std::fs::write(&file, &bytes)?;
    cloud
        .apply(&format!(
            "apiVersion: ferro/v1\nkind: Image\nmetadata: {{name: tiny}}\nspec:\n  source: {{url: \"file://{}\"}}\n  checksum: \"sha256:{}\"\n",
            file.display(),
            "0".repeat(64)
        ))
        .await?;
    cloud
        .wait_server("lost", "missing its key", SOON, |s| {
            has_reason(s, "KeyPairNotFound")
        })
        .await?;
    cloud.apply(&keypair()).await?;
    let server = cloud
        .wait_server("lost", "refusing the image", SOON, |s| {
            has_reason(s, "ImageChecksumMismatch")
        })
        .await?;
    let message = guest_running(&server).unwrap().message;
    ensure!(message.contains(&sha256_of(&file)?), "{message}");
    let node = cloud
        .wait_node("reporting the failed image", |n| {
            n.status.as_ref().is_some_and(|s| {
                s.images
                    .iter()
                    .any(|i| i.phase == v1::cached_image::Phase::Failed as i32)
            })
        })
        .await?;
    let failed = &node.status.unwrap().images[0];
    ensure!(
        failed.image == "default/tiny" && failed.message.contains("ImageChecksumMismatch"),
        "{failed:?}"
    );
    ensure!(
        !cloud.vm_dir().join(uid(&server)).exists(),
        "a VM directory was made for a guest that cannot start"
    );

    // Deleting a server that never ran releases it too.
    cloud.delete_server("lost").await?;
    cloud.wait_gone("lost", SOON).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_strategies_decide_restarts_and_orphans_are_removed() -> Result<()> {
    let cloud = Cloud::start().await?;
    let guest = tiny_guest();

    // An orphan: a VM on the host whose Server does not exist.
    let orphan = uuid::Uuid::new_v4().to_string();
    let driver = QemuDriver::new(QemuConfig {
        accel: AccelPolicy::Tcg,
        ..QemuConfig::new(cloud.vm_dir())
    });
    driver
        .start(&VmSpec {
            uid: orphan.clone(),
            name: "ghost".into(),
            vcpus: 1,
            memory_mib: 128,
            boot_disk: Some(BootDisk {
                base: guest.disk.clone(),
                base_format: DiskFormat::Raw,
                size_bytes: None,
            }),
            kernel: Some(DirectKernel {
                kernel: guest.kernel.clone(),
                initrd: Some(guest.initrd.clone()),
                cmdline: guest.cmdline.clone(),
            }),
            config_drive: None,
            nics: vec![],
            disks: vec![],
            labels: [
                ("ferro.io/project".to_owned(), "default".to_owned()),
                ("ferro.io/server".to_owned(), "ghost".to_owned()),
            ]
            .into(),
        })
        .await?;
    ensure!(qemu_processes(&orphan).len() == 1);

    let agent = cloud.agent();
    cloud.apply_tiny_images().await?;
    cloud.apply(&keypair()).await?;
    // Manual: a guest that dies stays dead, and says so.
    cloud
        .apply(&server_yaml("manual", "  runStrategy: Manual"))
        .await?;
    cloud.bind("manual").await?;
    // RerunOnFailure: a guest that powers itself off is not a failure.
    let poweroff = r#"
apiVersion: ferro/v1
kind: Server
metadata: {name: once}
spec:
  flavor: m1.tiny
  image: tiny
  runStrategy: RerunOnFailure
  userData: |
    #!/bin/sh
    sync
    poweroff -f
"#;
    cloud.apply(poweroff).await?;
    cloud.bind("once").await?;

    let deadline = Instant::now() + SOON;
    while cloud.vm_dir().join(&orphan).exists() || !qemu_processes(&orphan).is_empty() {
        ensure!(Instant::now() < deadline, "the orphan survived");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let manual = cloud
        .wait_server("manual", "running", BOOT, is_running)
        .await?;
    let manual_uid = uid(&manual);
    kill(host(&manual).pid as u32);
    let manual = cloud
        .wait_server("manual", "reported crashed", SOON, |s| {
            host(s).power_state == HostPower::Crashed as i32 && has_reason(s, "Crashed")
        })
        .await?;
    ensure!(
        host(&manual).last_exit_reason.starts_with("Crashed: "),
        "{:?}",
        host(&manual)
    );

    let once = cloud
        .wait_server("once", "shut down", BOOT, |s| {
            host(s).power_state == HostPower::Shutdown as i32 && has_reason(s, "GuestShutdown")
        })
        .await?;
    ensure!(
        host(&once).last_exit_reason == "GuestShutdown: the guest powered itself off",
        "{:?}",
        host(&once)
    );

    // Several resyncs later, neither came back.
    agent.wait_resyncs(3).await?;
    for name in ["manual", "once"] {
        let server = cloud.server(name).await?;
        ensure!(
            host(&server).restart_count == 0 && host(&server).pid == 0,
            "{name} was restarted: {:?}",
            host(&server)
        );
        ensure!(
            qemu_processes(&uid(&server)).is_empty(),
            "{name} runs again"
        );
    }
    ensure!(qemu_processes(&manual_uid).is_empty());

    for name in ["manual", "once"] {
        cloud.delete_server(name).await?;
        cloud.wait_gone(name, SOON).await?;
    }
    ensure!(
        std::fs::read_dir(cloud.vm_dir())?.next().is_none(),
        "VM directories are left"
    );
    Ok(())
}

/// An image mirror: serves one file over HTTP/1.1 on 127.0.0.1, whole, at any path.
struct Mirror {
    base: String,
    task: tokio::task::JoinHandle<()>,
}

impl Mirror {
    async fn serve(file: PathBuf) -> Result<Mirror> {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let base = format!("http://{}", listener.local_addr()?);
        let task = tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                let file = file.clone();
                tokio::spawn(async move {
                    let mut conn = BufReader::new(conn);
                    let mut line = String::new();
                    loop {
                        line.clear();
                        match conn.read_line(&mut line).await {
                            Ok(0) | Err(_) => return,
                            Ok(_) if line == "\r\n" => break,
                            Ok(_) => {}
                        }
                    }
                    let Ok(mut body) = tokio::fs::File::open(&file).await else {
                        return;
                    };
                    let len = body.metadata().await.map(|m| m.len()).unwrap_or(0);
                    let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {len}\r\n\r\n");
                    let conn = conn.get_mut();
                    if conn.write_all(head.as_bytes()).await.is_ok() {
                        let _ = tokio::io::copy(&mut body, conn).await;
                    }
                    let _ = conn.shutdown().await;
                });
            }
        });
        Ok(Mirror { base, task })
    }
}

impl Drop for Mirror {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bootable_disk_over_http_is_converted_boots_through_bios_and_keeps_its_files()
-> Result<()> {
    let started = Instant::now();
    let cloud = Cloud::start().await?;
    let guest = tiny_guest();

    // A cloud-style image: a bootable disk (no kernel Image), shipped as a vmdk on an
    // HTTP mirror. A second Image names the same URL with the wrong checksum.
    let vmdk = cloud.images.path().join("bios.vmdk");
    let converted = std::process::Command::new("qemu-img")
        .args(["convert", "-q", "-f", "raw", "-O", "vmdk"])
        .arg(&guest.bios_disk)
        .arg(&vmdk)
        .status()?;
    ensure!(converted.success(), "qemu-img convert failed");
    let mirror = Mirror::serve(vmdk.clone()).await?;
    let checksum = sha256_of(&vmdk)?;
    let wrong = format!("sha256:{}", "1".repeat(64));
    cloud
        .apply(&format!(
            r#"
apiVersion: ferro/v1
kind: Image
metadata: {{name: cloudy}}
spec: {{source: {{url: "{base}/images/bios.vmdk"}}, checksum: "{checksum}"}}
---
apiVersion: ferro/v1
kind: Image
metadata: {{name: tampered}}
spec: {{source: {{url: "{base}/images/bios.vmdk"}}, checksum: "{wrong}"}}
---
apiVersion: ferro/v1
kind: Server
metadata: {{name: bios}}
spec: {{flavor: m1.tiny, image: cloudy, hostname: bios-host}}
---
apiVersion: ferro/v1
kind: Server
metadata: {{name: bad}}
spec: {{flavor: m1.tiny, image: tampered}}
"#,
            base = mirror.base,
        ))
        .await?;
    let agent = cloud.agent();
    cloud.bind("bios").await?;
    cloud.bind("bad").await?;

    // The wrong checksum: the Server says why it does not run, the node says what it got.
    let bad = cloud
        .wait_server("bad", "refusing its image", SOON, |s| {
            has_reason(s, "ImageChecksumMismatch")
        })
        .await?;
    let message = guest_running(&bad).unwrap().message;
    ensure!(message.contains(&checksum), "{message}");

    // The good one: downloaded, verified, converted, booted by SeaBIOS from the disk.
    let server = cloud
        .wait_server("bios", "running", BOOT, is_running)
        .await?;
    let uid = uid(&server);
    cloud
        .wait_console("bios", "FERRO-READY hostname=bios-host boot-count=1")
        .await?;
    let node = cloud
        .wait_node("reporting one image ready, one failed", |n| {
            // The failed one is fetched again on every retry: wait for a moment between.
            n.status.as_ref().is_some_and(|s| {
                let phase = |name: &str| s.images.iter().find(|i| i.image == name).map(|i| i.phase);
                phase("default/cloudy") == Some(v1::cached_image::Phase::Ready as i32)
                    && phase("default/tampered") == Some(v1::cached_image::Phase::Failed as i32)
            })
        })
        .await?;
    let images = node.status.unwrap().images;
    let cloudy = images.iter().find(|i| i.image == "default/cloudy").unwrap();
    ensure!(
        cloudy.phase == v1::cached_image::Phase::Ready as i32
            && cloudy.format == "vmdk"
            && cloudy.checksum == checksum
            && cloudy.message == "converted from vmdk to qcow2",
        "{cloudy:?}"
    );
    let tampered = images
        .iter()
        .find(|i| i.image == "default/tampered")
        .unwrap();
    ensure!(
        tampered.phase == v1::cached_image::Phase::Failed as i32
            && tampered.message.starts_with("ImageChecksumMismatch: "),
        "{tampered:?}"
    );
    drop(mirror);

    // A file written before a stop is there after the start, on the same disk.
    let mut console = cloud.attach("bios").await?;
    console
        .type_keys("\necho kept-$((6 * 7)) >/mnt/disk/kept; sync; echo $((6 * 7))-written\n")
        .await?;
    console.read_until("42-written", SOON).await?;
    drop(console);
    cloud
        .edit_server("bios", |s| {
            s.spec.as_mut().unwrap().power_state =
                Some(v1::server_spec::PowerState::Stopped as i32);
        })
        .await?;
    cloud
        .wait_server("bios", "stopped", BOOT, |s| {
            host(s).power_state == HostPower::Shutdown as i32 && has_reason(s, "Stopped")
        })
        .await?;
    ensure!(qemu_processes(&uid).is_empty(), "QEMU still runs");
    cloud
        .edit_server("bios", |s| {
            s.spec.as_mut().unwrap().power_state =
                Some(v1::server_spec::PowerState::Running as i32);
        })
        .await?;
    cloud
        .wait_server("bios", "running again", BOOT, is_running)
        .await?;
    cloud.wait_console("bios", "boot-count=2").await?;
    let mut console = cloud.attach("bios").await?;
    console.type_keys("\ncat /mnt/disk/kept\n").await?;
    console.read_until("kept-42", SOON).await?;
    drop(console);

    // A reboot request: exactly one more boot.
    cloud
        .edit_server("bios", |s| {
            s.metadata.as_mut().unwrap().annotations.insert(
                "ferro.io/reboot-requested-at".into(),
                "2026-11-22T21:00:00Z".into(),
            );
        })
        .await?;
    cloud
        .wait_server("bios", "rebooted", SOON, |s| {
            host(s).last_reboot == "2026-11-22T21:00:00Z"
        })
        .await?;
    cloud.wait_console("bios", "boot-count=3").await?;
    agent.wait_resyncs(2).await?;
    let log = cloud.serial_log("bios").await?;
    ensure!(
        !log.contains("boot-count=4"),
        "the reboot happened more than once"
    );

    for name in ["bios", "bad"] {
        cloud.delete_server(name).await?;
        cloud.wait_gone(name, SOON).await?;
    }
    ensure!(qemu_processes(&uid).is_empty(), "QEMU survived the delete");
    println!(
        "BIOS boot over HTTP done in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
