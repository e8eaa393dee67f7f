//! The node's security group reconciler: what the ports of this node may send and receive.
//!
//! [`plan::desired`] says from the caches which ports of this node are filtered and by
//! which rules (their groups', with remote groups as member sets); the [`Enforcer`] turns
//! that into the switch's terms, compares them with what the switch has and carries out
//! the difference. Every
//! change of a Port, SecurityGroup, Network or of this node's Servers queues the one key
//! [`FIREWALL_KEY`], so bursts coalesce into one pass.
//!
//! On Linux bridges a port's chains exist before its guest's tap is plugged (they match the
//! device by name), so a guest is filtered from its first packet; OpenFlow matches the
//! port's OpenFlow number, which exists once the port is plugged, so there a port passes
//! unfiltered for the moment between its plug and the next pass (which the Port's
//! binding queues). Nothing is kept in memory that a restart
//! needs: the first pass reads the tables back ([`Tables::read`]) and changes only what
//! differs, so a restarted agent touches no rule and no connection. Later passes trust what
//! the last one left, and read the tables again every [`FULL_CHECK_EVERY`] (and after any
//! failure), so a rule flushed by hand is back within that time, as the network
//! reconciler's inside checks are.
//!
//! What enforces the rules depends on the driver ([`Enforcer`]): nftables tables on Linux
//! bridge nodes ([`nft`]), OpenFlow flows with the switch's connection tracking on Open
//! vSwitch nodes, whose userspace datapath never hands packets to netfilter ([`ovs`]).
//! Either way each port's rules are replaced alone, and a remote group's membership is
//! kept apart from the rules that name it where the switch allows (an nftables set; one
//! flow per member with OpenFlow).

pub mod nft;
pub mod ovs;
pub mod plan;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use ferro_api::v1;
use ferro_runtime::{Action, Reconcile, Store};

use nft::{Op, State};

/// The one key the firewall reconciler is queued under.
pub const FIREWALL_KEY: &str = "firewall";

/// The name of the firewall reconciler's controller, in logs and metric labels.
pub const FIREWALL_CONTROLLER: &str = "agent-firewall";

/// How often a pass reads the tables back instead of trusting the last pass.
pub const FULL_CHECK_EVERY: Duration = Duration::from_secs(30);

/// Why a firewall pass failed.
#[derive(Debug, thiserror::Error)]
pub enum FirewallError {
    /// The host cannot filter bridged traffic (no `br_netfilter`, no `nft`).
    #[error("{0}")]
    Unavailable(String),
    /// `nft` refused or failed.
    #[error("nft {command}: {message}")]
    Nft {
        /// What was run.
        command: String,
        /// What it said.
        message: String,
    },
}

/// The node's nftables, as far as security groups go. See the module notes.
#[async_trait]
pub trait Tables: Send + Sync {
    /// Makes sure bridged traffic reaches netfilter (`bridge-nf-call-iptables` and
    /// `…-ip6tables` on); an error says what the host lacks.
    async fn prepare(&self) -> Result<(), FirewallError>;

    /// What Ferro's tables hold now.
    async fn read(&self) -> Result<State, FirewallError>;

    /// Carries out `ops` in one transaction: all of them, or none.
    async fn apply(&self, ops: &[Op]) -> Result<(), FirewallError>;
}

/// [`Tables`] on the host's nftables, through the `nft` command, in the agent's own
/// network namespace.
#[derive(Debug, Default)]
pub struct NftTables;

async fn nft(args: &[&str], input: Option<&str>) -> Result<std::process::Output, FirewallError> {
    use tokio::io::AsyncWriteExt;
    let command = format!("nft {}", args.join(" "));
    let failed = |e: std::io::Error| FirewallError::Nft {
        command: command.clone(),
        message: e.to_string(),
    };
    let mut child = tokio::process::Command::new("nft")
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(failed)?;
    let mut stdin = child.stdin.take().expect("piped");
    if let Some(input) = input {
        stdin.write_all(input.as_bytes()).await.map_err(failed)?;
    }
    drop(stdin);
    child.wait_with_output().await.map_err(failed)
}

#[async_trait]
impl Tables for NftTables {
    async fn prepare(&self) -> Result<(), FirewallError> {
        for family in ["iptables", "ip6tables"] {
            let path = format!("/proc/sys/net/bridge/bridge-nf-call-{family}");
            match std::fs::read_to_string(&path) {
                Ok(on) if on.trim() == "1" => {}
                Ok(_) => std::fs::write(&path, "1").map_err(|e| {
                    FirewallError::Unavailable(format!("cannot turn on {path}: {e}"))
                })?,
                Err(_) => {
                    return Err(FirewallError::Unavailable(format!(
                        "no {path}: security groups need br_netfilter (modprobe br_netfilter)"
                    )));
                }
            }
        }
        Ok(())
    }

    async fn read(&self) -> Result<State, FirewallError> {
        let mut listings = Vec::new();
        for family in ["bridge", "inet"] {
            let args = ["-j", "list", "table", family, nft::TABLE];
            let out = nft(&args, None).await?;
            if out.status.success() {
                let json = serde_json::from_slice(&out.stdout).map_err(|e| FirewallError::Nft {
                    command: args.join(" "),
                    message: e.to_string(),
                })?;
                listings.push(Some(json));
            } else if String::from_utf8_lossy(&out.stderr).contains("No such file or directory") {
                listings.push(None);
            } else {
                return Err(FirewallError::Nft {
                    command: format!("nft {}", args.join(" ")),
                    message: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
                });
            }
        }
        Ok(nft::read(listings[0].as_ref(), listings[1].as_ref()))
    }

    async fn apply(&self, ops: &[Op]) -> Result<(), FirewallError> {
        let script = nft::script(ops);
        let out = nft(&["-f", "-"], Some(&script)).await?;
        if out.status.success() {
            return Ok(());
        }
        Err(FirewallError::Nft {
            command: "-f -".into(),
            message: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

/// [`Tables`] in memory, for unit tests.
#[derive(Debug, Default)]
pub struct MemoryTables {
    /// What the tables hold.
    pub state: Mutex<State>,
    /// How many transactions were carried out.
    pub transactions: Mutex<usize>,
}

#[async_trait]
impl Tables for MemoryTables {
    async fn prepare(&self) -> Result<(), FirewallError> {
        Ok(())
    }

    async fn read(&self) -> Result<State, FirewallError> {
        Ok(self.state.lock().unwrap_or_else(|e| e.into_inner()).clone())
    }

    async fn apply(&self, ops: &[Op]) -> Result<(), FirewallError> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        *state = nft::after(state.clone(), ops);
        *self.transactions.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        Ok(())
    }
}

/// Makes a node's switch enforce what [`plan::desired`] says: nftables for Linux bridges
/// ([`NftEnforcer`]), OpenFlow with connection tracking for Open vSwitch
/// ([`ovs::OvsEnforcer`]). Each remembers what its last call left and reads the host
/// again when `full` is set (or after a failure).
#[async_trait]
pub trait Enforcer: Send + Sync {
    /// Makes the switch enforce `desired`; returns how many changes that took.
    async fn enforce(&self, desired: &plan::Desired, full: bool) -> Result<usize, FirewallError>;

    /// How soon to look again when nothing in the API changes: what the rules need from
    /// the switch may change without the API saying so (an OpenFlow port number).
    fn recheck_every(&self) -> Duration {
        FULL_CHECK_EVERY
    }
}

/// [`Enforcer`] with nftables tables ([`nft`]), for Linux bridges.
pub struct NftEnforcer {
    tables: Arc<dyn Tables>,
    known: Mutex<Option<State>>,
}

impl NftEnforcer {
    /// An enforcer over `tables` that has read nothing yet.
    pub fn new(tables: Arc<dyn Tables>) -> NftEnforcer {
        NftEnforcer {
            tables,
            known: Mutex::new(None),
        }
    }
}

#[async_trait]
impl Enforcer for NftEnforcer {
    async fn enforce(&self, desired: &plan::Desired, full: bool) -> Result<usize, FirewallError> {
        let want = nft::wanted(desired, crate::wiring::linuxbridge::bridge_name);
        let known = self.known.lock().unwrap_or_else(|e| e.into_inner()).take();
        let have = match known {
            Some(state) if !full => state,
            _ => {
                if !want.chains.is_empty() {
                    self.tables.prepare().await?;
                }
                self.tables.read().await?
            }
        };
        let ops = nft::changes(&want, &have);
        if !ops.is_empty() {
            self.tables.apply(&ops).await?;
        }
        *self.known.lock().unwrap_or_else(|e| e.into_inner()) = Some(nft::after(have, &ops));
        Ok(ops.len())
    }
}

/// Reconciles the security groups of this node's ports. See the module notes.
pub struct FirewallReconciler {
    /// This node's name.
    pub node: String,
    /// What enforces the rules.
    pub enforcer: Arc<dyn Enforcer>,
    /// The Servers bound to this node.
    pub servers: Store<v1::Server>,
    /// Every Port.
    pub ports: Store<v1::Port>,
    /// Every SecurityGroup.
    pub groups: Store<v1::SecurityGroup>,
    /// Every Network.
    pub networks: Store<v1::Network>,
    /// When the host was last read whole; `None` before the first pass and after a
    /// failure.
    pub read_at: Mutex<Option<Instant>>,
}

impl FirewallReconciler {
    /// A reconciler that has read nothing yet.
    pub fn new(
        node: String,
        enforcer: Arc<dyn Enforcer>,
        servers: Store<v1::Server>,
        ports: Store<v1::Port>,
        groups: Store<v1::SecurityGroup>,
        networks: Store<v1::Network>,
    ) -> FirewallReconciler {
        FirewallReconciler {
            node,
            enforcer,
            servers,
            ports,
            groups,
            networks,
            read_at: Mutex::new(None),
        }
    }

    fn facts(&self) -> plan::Facts {
        plan::Facts {
            node: self.node.clone(),
            servers: self.servers.list(),
            ports: self.ports.list(),
            groups: self.groups.list(),
            networks: self.networks.list(),
        }
    }

    /// One pass: the switch made to enforce what this node's ports should.
    pub async fn reconcile_firewall(&self) -> Result<Action, FirewallError> {
        let started = Instant::now();
        let desired = plan::desired(&self.facts());
        let last = self
            .read_at
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let full = last.is_none_or(|at| at.elapsed() >= FULL_CHECK_EVERY);
        let changes = self.enforcer.enforce(&desired, full).await?;
        if changes > 0 {
            tracing::info!(
                ports = desired.ports.len(),
                changes,
                took_ms = started.elapsed().as_millis() as u64,
                "security group rules applied"
            );
        }
        *self.read_at.lock().unwrap_or_else(|e| e.into_inner()) = Some(if full {
            started
        } else {
            last.unwrap_or(started)
        });
        Ok(Action::Requeue(self.enforcer.recheck_every()))
    }
}

impl Reconcile<String> for FirewallReconciler {
    type Error = FirewallError;

    async fn reconcile(&self, _key: String) -> Result<Action, FirewallError> {
        self.reconcile_firewall().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferro_api::v1::security_group_rule::{Direction, Protocol};

    fn reconciler(tables: Arc<MemoryTables>) -> FirewallReconciler {
        let servers = Store::new();
        let ports = Store::new();
        let groups = Store::new();
        servers.apply(v1::Server {
            metadata: Some(v1::ObjectMeta {
                name: "web".into(),
                project: "p".into(),
                uid: "s1".into(),
                ..Default::default()
            }),
            status: Some(v1::ServerStatus {
                ports: vec!["web-0".into()],
                node: "n1".into(),
                ..Default::default()
            }),
            ..Default::default()
        });
        ports.apply(v1::Port {
            metadata: Some(v1::ObjectMeta {
                name: "web-0".into(),
                project: "p".into(),
                uid: "u1".into(),
                ..Default::default()
            }),
            spec: Some(v1::PortSpec {
                network: "net".into(),
                device_owner: "compute:web".into(),
                ..Default::default()
            }),
            status: Some(v1::PortStatus {
                addresses: vec![v1::PortAddress {
                    subnet: "s".into(),
                    ip: "10.0.0.5".into(),
                }],
                mac: "fa:16:3e:00:00:01".into(),
                network_uid: "net-uid".into(),
                ..Default::default()
            }),
        });
        groups.apply(group(vec![]));
        FirewallReconciler::new(
            "n1".into(),
            Arc::new(NftEnforcer::new(tables)),
            servers,
            ports,
            groups,
            Store::new(),
        )
    }

    fn group(rules: Vec<v1::SecurityGroupRule>) -> v1::SecurityGroup {
        v1::SecurityGroup {
            metadata: Some(v1::ObjectMeta {
                name: "default".into(),
                project: "p".into(),
                ..Default::default()
            }),
            spec: Some(v1::SecurityGroupSpec {
                rules,
                ..Default::default()
            }),
            status: None,
        }
    }

    #[tokio::test]
    async fn a_pass_writes_once_and_a_restart_rewrites_nothing() {
        let tables = Arc::new(MemoryTables::default());
        let first = reconciler(tables.clone());
        first.reconcile_firewall().await.unwrap();
        first.reconcile_firewall().await.unwrap();
        assert_eq!(*tables.transactions.lock().unwrap(), 1);
        let state = tables.state.lock().unwrap().clone();
        assert_eq!(state.egress["tapu1"], "o_u1");

        // A restarted agent reads the tables back and finds nothing to do.
        let restarted = reconciler(tables.clone());
        restarted.reconcile_firewall().await.unwrap();
        assert_eq!(*tables.transactions.lock().unwrap(), 1);

        // A rule added to the group replaces the port's ingress chain only.
        restarted.groups.apply(group(vec![v1::SecurityGroupRule {
            direction: Direction::Ingress as i32,
            protocol: Some(Protocol::Tcp as i32),
            port_range_min: Some(80),
            ..Default::default()
        }]));
        restarted.reconcile_firewall().await.unwrap();
        let after = tables.state.lock().unwrap().clone();
        let changed: Vec<_> = after
            .chains
            .iter()
            .filter(|(k, v)| state.chains.get(*k) != Some(*v))
            .map(|(k, _)| k.1.as_str())
            .collect();
        assert_eq!(changed, ["i_u1"]);
    }

    #[tokio::test]
    async fn a_gone_server_leaves_no_table() {
        let tables = Arc::new(MemoryTables::default());
        let reconciler = reconciler(tables.clone());
        reconciler.reconcile_firewall().await.unwrap();
        let web = ferro_runtime::ObjectRef {
            kind: ferro_api::Kind::Server,
            project: "p".into(),
            name: "web".into(),
        };
        reconciler.servers.remove(&web, 1);
        *reconciler.read_at.lock().unwrap() = None;
        reconciler.reconcile_firewall().await.unwrap();
        assert_eq!(*tables.state.lock().unwrap(), State::default());
    }
}
