//! An in-memory [`NetworkDriver`] for reconciler tests without root: it records what is
//! wired, as a real driver would find it on the host, and can be told to fail.
//!
//! Devices are not modelled: a port is plugged by whatever device name it is given, and
//! [`MemoryNetworkDriver::detach_device`] stands for a device deleted by hand (the port
//! stays listed, not attached), as the OVS driver would see it.

use std::collections::BTreeSet;
use std::sync::Mutex;

use async_trait::async_trait;

use super::{
    DriverKind, NetworkDriver, NetworkWiring, Observed, ObservedNetwork, ObservedPort, PortWiring,
    WiringError,
};

/// The double. See the module notes.
#[derive(Debug)]
pub struct MemoryNetworkDriver {
    kind: DriverKind,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    wired: Observed,
    unavailable: Option<String>,
    fail_next: Option<String>,
    calls: Vec<String>,
}

impl MemoryNetworkDriver {
    /// A driver that reports itself as `kind` and has wired nothing.
    pub fn new(kind: DriverKind) -> MemoryNetworkDriver {
        MemoryNetworkDriver {
            kind,
            state: Mutex::new(State::default()),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("memory network driver lock")
    }

    /// What is wired now.
    pub fn wired(&self) -> Observed {
        self.state().wired.clone()
    }

    /// Every mutating call so far, as `verb uid`, in order.
    pub fn calls(&self) -> Vec<String> {
        self.state().calls.clone()
    }

    /// Makes [`NetworkDriver::prepare`] (and every later call) fail as a host without the
    /// driver's tools would, until cleared with `None`.
    pub fn set_unavailable(&self, reason: Option<&str>) {
        self.state().unavailable = reason.map(str::to_owned);
    }

    /// Makes the next mutating call fail with `reason`.
    pub fn fail_next(&self, reason: &str) {
        self.state().fail_next = Some(reason.to_owned());
    }

    /// Stands for a port's device deleted by hand: the port stays, not attached.
    pub fn detach_device(&self, port_uid: &str) {
        if let Some(port) = self.state().wired.ports.get_mut(port_uid) {
            port.attached = false;
        }
    }

    /// Wires a network and port as an earlier agent would have left them.
    pub fn preload(&self, network: &NetworkWiring, ports: &[PortWiring]) {
        let mut state = self.state();
        state.wired.networks.insert(
            network.uid.clone(),
            ObservedNetwork {
                segment_id: network.segment_id,
                peers: network.peers.clone(),
            },
        );
        for port in ports {
            state.wired.ports.insert(
                port.uid.clone(),
                ObservedPort {
                    network_uid: port.network_uid.clone(),
                    device: port.device.clone(),
                    attached: true,
                },
            );
        }
    }

    fn begin(
        &self,
        verb: &str,
        uid: &str,
    ) -> Result<std::sync::MutexGuard<'_, State>, WiringError> {
        let mut state = self.state();
        if let Some(reason) = &state.unavailable {
            return Err(WiringError::Unavailable(reason.clone()));
        }
        state.calls.push(format!("{verb} {uid}"));
        if let Some(reason) = state.fail_next.take() {
            return Err(WiringError::Switch(reason.into()));
        }
        Ok(state)
    }
}

#[async_trait]
impl NetworkDriver for MemoryNetworkDriver {
    fn kind(&self) -> DriverKind {
        self.kind
    }

    async fn prepare(&self) -> Result<Observed, WiringError> {
        self.observe().await
    }

    async fn ensure_network(&self, network: &NetworkWiring) -> Result<(), WiringError> {
        if network.segment_id == 0 || network.segment_id >= 1 << 24 {
            return Err(WiringError::InvalidSpec {
                field: "segment_id",
                reason: format!("{} is not a VXLAN network identifier", network.segment_id),
            });
        }
        let mut state = self.begin("ensure_network", &network.uid)?;
        state.wired.networks.insert(
            network.uid.clone(),
            ObservedNetwork {
                segment_id: network.segment_id,
                peers: network.peers.clone(),
            },
        );
        Ok(())
    }

    async fn remove_network(&self, network_uid: &str) -> Result<(), WiringError> {
        let mut state = self.begin("remove_network", network_uid)?;
        state.wired.networks.remove(network_uid);
        state
            .wired
            .ports
            .retain(|_, port| port.network_uid != network_uid);
        Ok(())
    }

    async fn plug(&self, port: &PortWiring) -> Result<(), WiringError> {
        let mut state = self.begin("plug", &port.uid)?;
        if !state.wired.networks.contains_key(&port.network_uid) {
            return Err(WiringError::NoSuchNetwork(port.network_uid.clone()));
        }
        state.wired.ports.insert(
            port.uid.clone(),
            ObservedPort {
                network_uid: port.network_uid.clone(),
                device: port.device.clone(),
                attached: true,
            },
        );
        Ok(())
    }

    async fn unplug(&self, port_uid: &str) -> Result<(), WiringError> {
        let mut state = self.begin("unplug", port_uid)?;
        state.wired.ports.remove(port_uid);
        Ok(())
    }

    async fn observe(&self) -> Result<Observed, WiringError> {
        let state = self.state();
        if let Some(reason) = &state.unavailable {
            return Err(WiringError::Unavailable(reason.clone()));
        }
        Ok(state.wired.clone())
    }
}

/// The peers of a network, for tests: addresses from their text.
pub fn peers(addresses: &[&str]) -> BTreeSet<std::net::IpAddr> {
    addresses
        .iter()
        .map(|a| a.parse().expect("a test peer address"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn network() -> NetworkWiring {
        NetworkWiring {
            uid: "net-1".into(),
            segment_id: 42,
            mtu: 1450,
            local_ip: "198.18.0.11".parse().unwrap(),
            peers: peers(&["198.18.0.12"]),
        }
    }

    fn port() -> PortWiring {
        PortWiring {
            uid: "port-1".into(),
            network_uid: "net-1".into(),
            device: "tapport1".into(),
            mac: "fa:16:3e:00:00:01".into(),
            server_uid: None,
        }
    }

    #[tokio::test]
    async fn a_port_needs_its_network_and_goes_with_it() {
        let driver = MemoryNetworkDriver::new(DriverKind::Ovs);
        assert!(matches!(
            driver.plug(&port()).await,
            Err(WiringError::NoSuchNetwork(_))
        ));
        driver.ensure_network(&network()).await.unwrap();
        driver.plug(&port()).await.unwrap();
        assert!(driver.observe().await.unwrap().ports["port-1"].attached);
        driver.remove_network("net-1").await.unwrap();
        assert_eq!(driver.observe().await.unwrap(), Observed::default());
    }

    #[tokio::test]
    async fn an_unavailable_driver_fails_every_call() {
        let driver = MemoryNetworkDriver::new(DriverKind::LinuxBridge);
        driver.set_unavailable(Some("no ovs-vswitchd"));
        assert!(matches!(
            driver.prepare().await,
            Err(WiringError::Unavailable(_))
        ));
        assert!(driver.ensure_network(&network()).await.is_err());
    }
}
