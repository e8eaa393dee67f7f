//! An in-memory [`Dhcp`] for reconciler tests without root: it keeps the servers a real
//! driver would find on the host, decides starts, reloads and restarts with the real
//! driver's [`classify`](super::dnsmasq::classify), and can be told to fail.
//!
//! [`MemoryDhcp::kill`] stands for a dnsmasq killed by hand (the directory stays, the
//! process is gone), [`MemoryDhcp::preload`] for servers an earlier agent left running.

use std::collections::BTreeMap;
use std::sync::Mutex;

use async_trait::async_trait;

use super::dnsmasq::{Found, RunningServer, ServerFiles, classify, render};
use super::{Change, Dhcp, DhcpError, DhcpInstance, DhcpServer, validate};

/// The double. See the module notes.
#[derive(Debug, Default)]
pub struct MemoryDhcp {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    servers: BTreeMap<String, Entry>,
    next_pid: u32,
    fail_next: Option<String>,
    calls: Vec<String>,
}

#[derive(Debug, Clone)]
struct Entry {
    server: DhcpServer,
    pid: Option<u32>,
}

/// Where the double pretends its files are: only the command lines it compares see it.
fn files(network_uid: &str) -> ServerFiles {
    ServerFiles::new(format!("/memory/dhcp/{network_uid}"))
}

impl MemoryDhcp {
    /// A double with no servers.
    pub fn new() -> MemoryDhcp {
        MemoryDhcp::default()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("memory DHCP lock")
    }

    fn begin(&self, verb: &str, uid: &str) -> Result<std::sync::MutexGuard<'_, State>, DhcpError> {
        let mut state = self.state();
        state.calls.push(format!("{verb} {uid}"));
        match state.fail_next.take() {
            Some(reason) => Err(DhcpError::Injected(reason)),
            None => Ok(state),
        }
    }

    /// Every call to `ensure` and `remove` so far, as `verb network-uid`, in order.
    pub fn calls(&self) -> Vec<String> {
        self.state().calls.clone()
    }

    /// Makes the next `ensure` or `remove` fail with `reason`.
    pub fn fail_next(&self, reason: &str) {
        self.state().fail_next = Some(reason.to_owned());
    }

    /// What a network's server was last given, if it has one.
    pub fn server(&self, network_uid: &str) -> Option<DhcpServer> {
        self.state()
            .servers
            .get(network_uid)
            .map(|entry| entry.server.clone())
    }

    /// The pid of a network's running server.
    pub fn pid(&self, network_uid: &str) -> Option<u32> {
        self.state().servers.get(network_uid).and_then(|e| e.pid)
    }

    /// Stands for a dnsmasq killed by hand: its files stay, its process is gone.
    pub fn kill(&self, network_uid: &str) {
        if let Some(entry) = self.state().servers.get_mut(network_uid) {
            entry.pid = None;
        }
    }

    /// A server running as an earlier agent left it.
    pub fn preload(&self, server: &DhcpServer) {
        let mut state = self.state();
        state.next_pid += 1;
        let pid = Some(state.next_pid);
        state.servers.insert(
            server.network_uid.clone(),
            Entry {
                server: server.clone(),
                pid,
            },
        );
    }
}

#[async_trait]
impl Dhcp for MemoryDhcp {
    async fn ensure(&self, server: &DhcpServer) -> Result<Change, DhcpError> {
        validate(server)?;
        let mut state = self.begin("ensure", &server.network_uid)?;
        let files = files(&server.network_uid);
        let desired = render(server, &files);
        let found = match state.servers.get(&server.network_uid) {
            None => Found::default(),
            Some(entry) => {
                let was = render(&entry.server, &files);
                Found {
                    running: entry
                        .pid
                        .map(|pid| RunningServer {
                            pid,
                            args: was.args,
                            in_namespace: entry.server.namespace == server.namespace,
                        })
                        .into_iter()
                        .collect(),
                    hosts: Some(was.hosts),
                    options: Some(was.options),
                    // No leases are modelled.
                    stale_leases: false,
                }
            }
        };
        let change = classify(&desired, &found);
        let pid = match change {
            Change::Nothing | Change::Reload => found.running[0].pid,
            Change::Restart | Change::Start => {
                state.next_pid += 1;
                state.next_pid
            }
        };
        state.servers.insert(
            server.network_uid.clone(),
            Entry {
                server: server.clone(),
                pid: Some(pid),
            },
        );
        Ok(change)
    }

    async fn remove(&self, network_uid: &str) -> Result<(), DhcpError> {
        let mut state = self.begin("remove", network_uid)?;
        state.servers.remove(network_uid);
        Ok(())
    }

    async fn list(&self) -> Result<Vec<DhcpInstance>, DhcpError> {
        Ok(self
            .state()
            .servers
            .iter()
            .map(|(uid, entry)| DhcpInstance {
                network_uid: uid.clone(),
                pid: entry.pid,
                has_directory: true,
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dhcp::DhcpHost;
    use crate::dhcp::tests::server;

    #[tokio::test]
    async fn the_double_starts_reloads_and_restarts_as_the_driver_would() {
        let dhcp = MemoryDhcp::new();
        let mut wanted = server();
        let uid = wanted.network_uid.clone();
        assert_eq!(dhcp.ensure(&wanted).await.unwrap(), Change::Start);
        let first = dhcp.pid(&uid).unwrap();
        assert_eq!(dhcp.ensure(&wanted).await.unwrap(), Change::Nothing);

        wanted.hosts.push(DhcpHost {
            mac: "fa:16:3e:00:00:02".into(),
            ip: "10.0.1.6".parse().unwrap(),
            hostname: "web-2".into(),
        });
        assert_eq!(dhcp.ensure(&wanted).await.unwrap(), Change::Reload);
        assert_eq!(dhcp.pid(&uid), Some(first));

        wanted.mtu = 1400;
        assert_eq!(dhcp.ensure(&wanted).await.unwrap(), Change::Restart);
        assert_ne!(dhcp.pid(&uid), Some(first));

        dhcp.kill(&uid);
        assert!(!dhcp.list().await.unwrap()[0].is_running());
        assert_eq!(dhcp.ensure(&wanted).await.unwrap(), Change::Start);

        dhcp.remove(&uid).await.unwrap();
        assert!(dhcp.list().await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn injected_failures_fail_one_call() {
        let dhcp = MemoryDhcp::new();
        dhcp.fail_next("dnsmasq missing");
        assert!(matches!(
            dhcp.ensure(&server()).await,
            Err(DhcpError::Injected(_))
        ));
        assert_eq!(dhcp.ensure(&server()).await.unwrap(), Change::Start);
    }
}
