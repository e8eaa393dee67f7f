//! The DHCP seam of the node agent: a DHCP (and DNS) server per tenant network, behind the
//! [`Dhcp`] trait.
//!
//! The network reconciler decides which networks get a server on this node (those with a
//! DHCP-enabled subnet), makes the `qdhcp-<network-uid>` namespace and the interface inside
//! it (a veth end plugged into the network, with the DHCP port's address on it), and then
//! hands a [`DhcpServer`] to [`Dhcp::ensure`]: the subnets to serve and the static hosts
//! (MAC → IP → hostname, from the network's Ports). Guests get only the addresses of their
//! Ports: an unknown MAC gets no lease.
//!
//! The real driver, [`dnsmasq::DnsmasqDhcp`], runs one dnsmasq per network inside its
//! namespace, with its files in a directory named by the network uid. dnsmasq daemonizes,
//! so it outlives the agent; [`Dhcp::list`] finds what runs on the host (directories and
//! live processes, never a pid file taken on trust), so a restarted agent adopts running
//! servers and the reconciler removes those whose network is gone. [`Dhcp::ensure`]
//! converges and is harmless when repeated: nothing is rewritten or signalled when nothing
//! changed, new hosts or options are a reload (SIGHUP, same process), and anything on the
//! command line (interface, subnets, MTU, namespace) is a restart. [`memory::MemoryDhcp`]
//! is the double for reconciler tests.

pub mod dnsmasq;
pub mod memory;

use std::net::IpAddr;
use std::time::Duration;

use async_trait::async_trait;
use ipnet::IpNet;

/// The DNS domain guests are given when the network names none, as Neutron does.
pub const DEFAULT_DOMAIN: &str = "openstacklocal";

/// How long a lease lasts when the subnet says nothing: one day.
pub const DEFAULT_LEASE_TIME: Duration = Duration::from_secs(86_400);

/// The shortest lease dnsmasq accepts.
pub const MIN_LEASE_TIME: Duration = Duration::from_secs(120);

/// The namespace a network's DHCP server runs in: `qdhcp-<network-uid>`.
pub fn qdhcp_namespace(network_uid: &str) -> String {
    format!("qdhcp-{network_uid}")
}

/// The DHCP server a network must have on this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DhcpServer {
    /// The Network's uid: names the server's directory and identifies its process.
    pub network_uid: String,
    /// The namespace the server runs in, which the caller made
    /// ([`qdhcp_namespace`]).
    pub namespace: String,
    /// The interface inside the namespace the server listens on; it exists and carries the
    /// DHCP port's address in every subnet served.
    pub interface: String,
    /// The MTU guests are told to use (DHCP option 26).
    pub mtu: u32,
    /// The DNS domain guests are given (option 15) and that hostnames resolve in.
    pub domain: String,
    /// The network's DHCP-enabled subnets; a subnet with `dhcp: false` is left out.
    pub subnets: Vec<DhcpSubnet>,
    /// The fixed addresses: one entry per Port address.
    pub hosts: Vec<DhcpHost>,
}

/// A subnet served by a DHCP server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DhcpSubnet {
    /// The subnet, e.g. `10.0.1.0/24` or `2001:db8::/64`.
    pub cidr: IpNet,
    /// The default gateway (option 3), if the subnet has one. IPv6 guests learn their
    /// gateway from router advertisements, so it is not sent over DHCPv6.
    pub gateway: Option<IpAddr>,
    /// DNS servers (option 6); when empty, guests are told to ask the DHCP server itself,
    /// which answers for the network's hostnames.
    pub dns_servers: Vec<IpAddr>,
    /// Extra routes (option 121, classless static routes). IPv4 only: IPv6 routes come
    /// from router advertisements, and routes on IPv6 subnets are not sent.
    pub host_routes: Vec<HostRoute>,
    /// How long a lease lasts, at least [`MIN_LEASE_TIME`].
    pub lease_time: Duration,
}

/// A route a guest is given over DHCP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostRoute {
    /// The destination, e.g. `169.254.169.254/32`.
    pub destination: IpNet,
    /// The next hop, on the subnet.
    pub nexthop: IpAddr,
}

/// A fixed address: the guest with this MAC gets this address and name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DhcpHost {
    /// The Port's MAC, `aa:bb:cc:dd:ee:ff`.
    pub mac: String,
    /// One of the Port's fixed addresses; one outside the subnets served is left out.
    pub ip: IpAddr,
    /// The guest's hostname, which also resolves to `ip` in the domain. A name that is not
    /// a DNS label (empty, or with dots, underscores, commas…) is left out and the guest
    /// still gets its address: one odd Server name must not cost a network its DHCP.
    pub hostname: String,
}

/// What [`Dhcp::ensure`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// The server ran as wanted; nothing was touched.
    Nothing,
    /// Only hosts or options changed: the files were rewritten and the running server
    /// told to re-read them (SIGHUP); it kept its process.
    Reload,
    /// The command line changed (interface, subnets, MTU, domain, namespace): the server
    /// was stopped and started again.
    Restart,
    /// No server ran (first time, or it died): one was started.
    Start,
}

/// A DHCP server found on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DhcpInstance {
    /// The uid of the network it was made for.
    pub network_uid: String,
    /// The pid of its running server, if one runs.
    pub pid: Option<u32>,
    /// Whether its directory exists (a server whose directory was deleted by hand still
    /// runs, and is listed so that it can be removed).
    pub has_directory: bool,
}

impl DhcpInstance {
    /// Whether its server runs.
    pub fn is_running(&self) -> bool {
        self.pid.is_some()
    }
}

/// Why a DHCP call failed.
#[derive(Debug, thiserror::Error)]
pub enum DhcpError {
    /// The request cannot be carried out as it is.
    #[error("invalid DHCP server: {field}: {reason}")]
    InvalidSpec {
        /// The offending field.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The namespace to run in does not exist (the caller makes it first).
    #[error("no network namespace {0}")]
    NoNamespace(String),
    /// dnsmasq re-reads its files after dropping root, so every directory above them must
    /// be searchable by others.
    #[error("{0} is not searchable by others, so dnsmasq could not re-read its files")]
    StateDirNotSearchable(std::path::PathBuf),
    /// A file or directory operation failed.
    #[error("{what}")]
    Io {
        /// What was being done, with the path.
        what: String,
        /// The failure.
        #[source]
        source: std::io::Error,
    },
    /// dnsmasq refused to start.
    #[error("dnsmasq for network {network_uid} failed to start ({status}): {stderr}")]
    StartFailed {
        /// The network.
        network_uid: String,
        /// How it exited.
        status: String,
        /// What it said.
        stderr: String,
    },
    /// dnsmasq exited with success but no process of ours runs.
    #[error("dnsmasq for network {0} started but does not run")]
    NotRunning(String),
    /// A dnsmasq survived SIGKILL.
    #[error("dnsmasq {pid} for network {network_uid} would not die")]
    WouldNotDie {
        /// The network.
        network_uid: String,
        /// Its pid.
        pid: u32,
    },
    /// Failure injected by the in-memory double.
    #[error("{0}")]
    Injected(String),
}

/// Runs and keeps a DHCP server per network on this node. See the module notes.
///
/// Calls for different networks may run at once; calls for one network must not overlap
/// (the reconciler's queue runs one key at a time).
#[async_trait]
pub trait Dhcp: Send + Sync {
    /// Makes the network's server run as `server` says: starts it, tells it to re-read
    /// changed hosts or options, or restarts it when its command line changes; does nothing
    /// when nothing changed. A server that died is started again.
    async fn ensure(&self, server: &DhcpServer) -> Result<Change, DhcpError>;

    /// Stops the network's server and deletes its files; harmless when there is none.
    async fn remove(&self, network_uid: &str) -> Result<(), DhcpError>;

    /// The servers found on the host, by network uid order, running or not.
    async fn list(&self) -> Result<Vec<DhcpInstance>, DhcpError>;
}

fn invalid(field: &'static str, reason: impl Into<String>) -> DhcpError {
    DhcpError::InvalidSpec {
        field,
        reason: reason.into(),
    }
}

/// Whether `uid` can name a directory and appear in a command line as it is.
fn is_safe_uid(uid: &str) -> bool {
    !uid.is_empty()
        && uid.len() <= 64
        && uid
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// Whether `name` can be a guest's hostname: one DNS label.
pub(crate) fn is_hostname(name: &str) -> bool {
    is_dns_name(name) && !name.contains('.')
}

/// Whether `name` is a DNS name made of labels (letters, digits, hyphens).
fn is_dns_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
}

fn is_mac(mac: &str) -> bool {
    let parts: Vec<&str> = mac.split(':').collect();
    parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.chars().all(|c| c.is_ascii_hexdigit()))
}

/// Checks what dnsmasq would choke on or what could escape its directory; everything here
/// ends up in a command line or a file dnsmasq parses.
pub fn validate(server: &DhcpServer) -> Result<(), DhcpError> {
    if !is_safe_uid(&server.network_uid) {
        return Err(invalid(
            "network_uid",
            format!("{:?} is not a uid", server.network_uid),
        ));
    }
    if server.namespace.is_empty()
        || server.namespace.contains(['/', '\0'])
        || server.namespace.starts_with('.')
    {
        return Err(invalid(
            "namespace",
            format!("{:?} is not a namespace name", server.namespace),
        ));
    }
    let interface_ok = !server.interface.is_empty()
        && server.interface.len() <= crate::switch::MAX_INTERFACE_NAME
        && server
            .interface
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !interface_ok {
        return Err(invalid(
            "interface",
            format!("{:?} is not an interface name", server.interface),
        ));
    }
    if !(68..=65_535).contains(&server.mtu) {
        return Err(invalid("mtu", format!("{} is not an MTU", server.mtu)));
    }
    if !is_dns_name(&server.domain) {
        return Err(invalid(
            "domain",
            format!("{:?} is not a DNS name", server.domain),
        ));
    }
    if server.subnets.is_empty() {
        return Err(invalid("subnets", "no DHCP-enabled subnet to serve"));
    }
    for subnet in &server.subnets {
        if subnet.lease_time < MIN_LEASE_TIME {
            return Err(invalid(
                "subnets.lease_time",
                format!(
                    "{}s is shorter than {}s",
                    subnet.lease_time.as_secs(),
                    MIN_LEASE_TIME.as_secs()
                ),
            ));
        }
        if let Some(gateway) = subnet.gateway
            && !subnet.cidr.contains(&gateway)
        {
            return Err(invalid(
                "subnets.gateway",
                format!("{gateway} is not in {}", subnet.cidr),
            ));
        }
        if subnet.cidr.addr().is_ipv4() {
            for route in &subnet.host_routes {
                if !route.destination.addr().is_ipv4() || !route.nexthop.is_ipv4() {
                    return Err(invalid(
                        "subnets.host_routes",
                        format!(
                            "{} via {} is not an IPv4 route",
                            route.destination, route.nexthop
                        ),
                    ));
                }
            }
        }
    }
    for host in &server.hosts {
        if !is_mac(&host.mac) {
            return Err(invalid("hosts.mac", format!("{:?} is not a MAC", host.mac)));
        }
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A server with one IPv4 subnet and one host, for tests here and in the drivers.
    pub(crate) fn server() -> DhcpServer {
        DhcpServer {
            network_uid: "3f2a9c41-d0e7-4b7e-9a61-0c2d5e6f7a8b".into(),
            namespace: qdhcp_namespace("3f2a9c41-d0e7-4b7e-9a61-0c2d5e6f7a8b"),
            interface: "ns-3f2a9c41d0e7".into(),
            mtu: 1450,
            domain: DEFAULT_DOMAIN.into(),
            subnets: vec![DhcpSubnet {
                cidr: "10.0.1.0/24".parse().unwrap(),
                gateway: Some("10.0.1.1".parse().unwrap()),
                dns_servers: vec![],
                host_routes: vec![],
                lease_time: DEFAULT_LEASE_TIME,
            }],
            hosts: vec![DhcpHost {
                mac: "fa:16:3e:00:00:01".into(),
                ip: "10.0.1.5".parse().unwrap(),
                hostname: "web-1".into(),
            }],
        }
    }

    /// Spoils one field of a good server.
    type Spoil = fn(&mut DhcpServer);

    #[test]
    fn validation_names_the_field_at_fault() {
        let cases: Vec<(&str, Spoil)> = vec![
            ("network_uid", |s| s.network_uid = "../etc".into()),
            ("namespace", |s| s.namespace = "a/b".into()),
            ("interface", |s| {
                s.interface = "a-very-long-interface".into()
            }),
            ("mtu", |s| s.mtu = 0),
            ("domain", |s| s.domain = "bad domain".into()),
            ("subnets", |s| s.subnets.clear()),
            ("subnets.lease_time", |s| {
                s.subnets[0].lease_time = Duration::from_secs(60)
            }),
            ("subnets.gateway", |s| {
                s.subnets[0].gateway = Some("10.9.9.1".parse().unwrap())
            }),
            ("subnets.host_routes", |s| {
                s.subnets[0].host_routes.push(HostRoute {
                    destination: "2001:db8::/64".parse().unwrap(),
                    nexthop: "10.0.1.3".parse().unwrap(),
                })
            }),
            ("hosts.mac", |s| s.hosts[0].mac = "fa:16:3e".into()),
        ];
        assert!(validate(&server()).is_ok());
        for (field, spoil) in cases {
            let mut bad = server();
            spoil(&mut bad);
            match validate(&bad) {
                Err(DhcpError::InvalidSpec { field: got, .. }) => assert_eq!(got, field),
                other => panic!("{field}: expected InvalidSpec, got {other:?}"),
            }
        }
    }

    #[test]
    fn the_namespace_is_named_from_the_network_uid() {
        assert_eq!(qdhcp_namespace("abc"), "qdhcp-abc");
    }
}
