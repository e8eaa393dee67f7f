//! Config drives: how a guest learns its identity, keys, user data and network layout.
//!
//! A config drive is an ISO 9660 image labelled `config-2` in the OpenStack metadata
//! layout, which cloud-init (and Ferro's tiny test guest) read at boot:
//!
//! ```text
//! openstack/latest/meta_data.json     uuid, name, hostname, availability_zone, public_keys
//! openstack/latest/user_data          verbatim, when there is any
//! openstack/latest/network_data.json  links, networks, services
//! openstack/latest/vendor_data.json   {}
//! ```
//!
//! [`ConfigDrive::files`] renders the tree (pure, unit-tested); [`ConfigDrive::write_iso`]
//! writes it and packs it with `genisoimage`.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// What goes on a server's config drive.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ConfigDrive {
    /// The server's uid (`uuid` in the metadata; cloud-init's instance id).
    pub uuid: String,
    /// The server's name.
    pub name: String,
    /// The hostname the guest gives itself.
    pub hostname: String,
    /// The availability zone of the node.
    pub availability_zone: String,
    /// SSH public keys by key pair name, in OpenSSH format.
    pub public_keys: BTreeMap<String, String>,
    /// User data, passed through untouched (a cloud-config, a script, …).
    pub user_data: Option<Vec<u8>>,
    /// The guest's network layout, rendered as OpenStack's `network_data.json`; without
    /// one the file lists no links, networks or services.
    pub network: Option<NetworkData>,
}

/// What a guest needs to configure its NICs without DHCP: the agent's network
/// reconciler fills it from the Server's Ports, their addresses and Networks, and
/// [`NetworkData::to_json`] lays it out as OpenStack's `network_data.json`, which
/// cloud-init reads.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct NetworkData {
    /// The guest's NICs, in the order the guest finds them.
    pub nics: Vec<GuestNic>,
    /// DNS servers for the whole guest (`services` at the top level).
    pub dns_servers: Vec<IpAddr>,
}

/// One NIC of the guest: a Port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestNic {
    /// The Port's uid (`vif_id`).
    pub port_uid: String,
    /// The tap on the host, `tap<port-uid-prefix>`: the link's id, as Nova names links.
    pub tap: String,
    /// The NIC's MAC address, `aa:bb:cc:dd:ee:ff`.
    pub mac: String,
    /// The network's MTU, when it has one.
    pub mtu: Option<u32>,
    /// The Port's fixed addresses, each on one Network.
    pub addresses: Vec<GuestAddress>,
}

/// A fixed address of a Port, with what the guest needs to use it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestAddress {
    /// The uid of the Network the address is on (`network_id`).
    pub network_uid: String,
    /// The address.
    pub address: IpAddr,
    /// The subnet's prefix length.
    pub prefix_len: u8,
    /// The subnet's gateway: the default route through this address.
    pub gateway: Option<IpAddr>,
    /// The subnet's host routes.
    pub routes: Vec<GuestRoute>,
    /// The subnet's DNS servers.
    pub dns_servers: Vec<IpAddr>,
}

/// A route to a destination network through a next hop.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestRoute {
    /// The destination network.
    pub destination: IpAddr,
    /// The destination's prefix length.
    pub prefix_len: u8,
    /// The next hop.
    pub gateway: IpAddr,
}

impl NetworkData {
    /// The `network_data.json` document (OpenStack's layout, as Nova writes it):
    ///
    /// - `links`: one per NIC, `{id: <tap>, vif_id: <port uid>, type: "phy",
    ///   ethernet_mac_address, mtu}`;
    /// - `networks`: one per address, `{id: "network<n>", type: "ipv4" | "ipv6", link,
    ///   ip_address, netmask, routes: [{network, netmask, gateway}], network_id,
    ///   services}`, the gateway as the default route (`0.0.0.0/0.0.0.0` or `::/::`);
    /// - `services`: `{type: "dns", address}` per DNS server.
    pub fn to_json(&self) -> Value {
        let dns = |servers: &[IpAddr]| -> Vec<Value> {
            servers
                .iter()
                .map(|a| json!({ "type": "dns", "address": a.to_string() }))
                .collect()
        };
        let links: Vec<Value> = self
            .nics
            .iter()
            .map(|nic| {
                json!({
                    "id": nic.tap,
                    "vif_id": nic.port_uid,
                    "type": "phy",
                    "ethernet_mac_address": nic.mac,
                    "mtu": nic.mtu,
                })
            })
            .collect();
        let mut networks = Vec::new();
        for nic in &self.nics {
            for address in &nic.addresses {
                let default_route = address.gateway.map(|gateway| {
                    let any = match gateway {
                        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
                    };
                    route_json(any, 0, gateway)
                });
                let routes: Vec<Value> = default_route
                    .into_iter()
                    .chain(
                        address
                            .routes
                            .iter()
                            .map(|r| route_json(r.destination, r.prefix_len, r.gateway)),
                    )
                    .collect();
                networks.push(json!({
                    "id": format!("network{}", networks.len()),
                    "type": if address.address.is_ipv4() { "ipv4" } else { "ipv6" },
                    "link": nic.tap,
                    "ip_address": address.address.to_string(),
                    "netmask": netmask(address.address, address.prefix_len).to_string(),
                    "routes": routes,
                    "network_id": address.network_uid,
                    "services": dns(&address.dns_servers),
                }));
            }
        }
        json!({
            "links": links,
            "networks": networks,
            "services": dns(&self.dns_servers),
        })
    }
}

fn route_json(destination: IpAddr, prefix_len: u8, gateway: IpAddr) -> Value {
    json!({
        "network": destination.to_string(),
        "netmask": netmask(destination, prefix_len).to_string(),
        "gateway": gateway.to_string(),
    })
}

/// The netmask of a prefix length, in the family of `address` (`255.255.255.0`,
/// `ffff:ffff:ffff:ffff::`); a length past the family's width is all ones.
fn netmask(address: IpAddr, prefix_len: u8) -> IpAddr {
    match address {
        IpAddr::V4(_) => {
            let mask = u32::MAX
                .checked_shl(32 - u32::from(prefix_len.min(32)))
                .unwrap_or(0);
            IpAddr::V4(Ipv4Addr::from(mask))
        }
        IpAddr::V6(_) => {
            let mask = u128::MAX
                .checked_shl(128 - u32::from(prefix_len.min(128)))
                .unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(mask))
        }
    }
}

/// Why a config drive could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ConfigDriveError {
    /// Writing the tree or the image failed.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// `genisoimage` failed.
    #[error("genisoimage failed ({status}): {stderr}")]
    Genisoimage {
        /// Its exit status.
        status: String,
        /// What it printed.
        stderr: String,
    },
}

/// The ISO 9660 volume label cloud-init looks for.
pub const LABEL: &str = "config-2";

impl ConfigDrive {
    /// The files of the drive, as (path inside the image, contents), in a stable order.
    pub fn files(&self) -> Vec<(PathBuf, Vec<u8>)> {
        let keys: Vec<_> = self
            .public_keys
            .iter()
            .map(|(name, data)| json!({ "name": name, "type": "ssh", "data": data }))
            .collect();
        let meta = json!({
            "uuid": self.uuid,
            "name": self.name,
            "hostname": self.hostname,
            "availability_zone": self.availability_zone,
            "launch_index": 0,
            "public_keys": self.public_keys,
            "keys": keys,
            "meta": {},
        });
        let dir = Path::new("openstack/latest");
        let to_json = |v: &serde_json::Value| {
            let mut bytes = serde_json::to_vec_pretty(v).expect("JSON values serialise");
            bytes.push(b'\n');
            bytes
        };
        let network = self.network.as_ref().map_or_else(
            || json!({ "links": [], "networks": [], "services": [] }),
            NetworkData::to_json,
        );
        let mut files = vec![
            (dir.join("meta_data.json"), to_json(&meta)),
            (dir.join("network_data.json"), to_json(&network)),
            (dir.join("vendor_data.json"), b"{}\n".to_vec()),
        ];
        if let Some(user_data) = &self.user_data {
            files.push((dir.join("user_data"), user_data.clone()));
        }
        files
    }

    /// Writes the drive to `iso` (replacing it atomically), packing it with `genisoimage`.
    pub async fn write_iso(&self, iso: &Path, genisoimage: &Path) -> Result<(), ConfigDriveError> {
        let io = |what: String| move |source| ConfigDriveError::Io { what, source };
        let parent = iso.parent().unwrap_or(Path::new("."));
        let staging = tempfile::Builder::new()
            .prefix(".config-drive-")
            .tempdir_in(parent)
            .map_err(io(format!(
                "creating a staging directory in {}",
                parent.display()
            )))?;
        let tree = staging.path().join("tree");
        for (path, contents) in self.files() {
            let path = tree.join(path);
            let dir = path
                .parent()
                .expect("config drive files live in directories");
            tokio::fs::create_dir_all(dir)
                .await
                .map_err(io(format!("creating {}", dir.display())))?;
            tokio::fs::write(&path, contents)
                .await
                .map_err(io(format!("writing {}", path.display())))?;
        }
        let image = staging.path().join("config-2.iso");
        let output = tokio::process::Command::new(genisoimage)
            .arg("-quiet")
            .args(["-input-charset", "utf-8", "-V", LABEL, "-J", "-r", "-o"])
            .arg(&image)
            .arg(&tree)
            .stdin(std::process::Stdio::null())
            .output()
            .await
            .map_err(io(format!("running {}", genisoimage.display())))?;
        if !output.status.success() {
            return Err(ConfigDriveError::Genisoimage {
                status: output.status.to_string(),
                stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
            });
        }
        tokio::fs::rename(&image, iso)
            .await
            .map_err(io(format!("moving the image to {}", iso.display())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drive() -> ConfigDrive {
        ConfigDrive {
            uuid: "0b5c3a52-5a9e-4d35-8a1e-2f1c0f3b1a01".into(),
            name: "web-1".into(),
            hostname: "web-1".into(),
            availability_zone: "zone-a".into(),
            public_keys: BTreeMap::from([(
                "alice".into(),
                "ssh-ed25519 AAAAC3Nz alice@laptop".into(),
            )]),
            user_data: Some(b"#cloud-config\n".to_vec()),
            network: Some(NetworkData {
                nics: vec![
                    GuestNic {
                        port_uid: "4f2c9a10-7d3e-4b8a-9c61-0e5d2a7b3f11".into(),
                        tap: "tap4f2c9a10-7d".into(),
                        mac: "52:54:00:12:34:56".into(),
                        mtu: Some(1450),
                        addresses: vec![
                            GuestAddress {
                                network_uid: "net-a".into(),
                                address: "10.0.0.5".parse().unwrap(),
                                prefix_len: 24,
                                gateway: Some("10.0.0.1".parse().unwrap()),
                                routes: vec![GuestRoute {
                                    destination: "192.168.8.0".parse().unwrap(),
                                    prefix_len: 22,
                                    gateway: "10.0.0.254".parse().unwrap(),
                                }],
                                dns_servers: vec!["10.0.0.2".parse().unwrap()],
                            },
                            GuestAddress {
                                network_uid: "net-a".into(),
                                address: "fd00:1::5".parse().unwrap(),
                                prefix_len: 64,
                                gateway: Some("fd00:1::1".parse().unwrap()),
                                routes: vec![],
                                dns_servers: vec![],
                            },
                        ],
                    },
                    GuestNic {
                        port_uid: "9b7e3c55-1a2b-4c3d-8e9f-a0b1c2d3e4f5".into(),
                        tap: "tap9b7e3c55-1a".into(),
                        mac: "52:54:00:ab:cd:ef".into(),
                        mtu: None,
                        addresses: vec![GuestAddress {
                            network_uid: "net-b".into(),
                            address: "172.16.3.9".parse().unwrap(),
                            prefix_len: 20,
                            gateway: None,
                            routes: vec![],
                            dns_servers: vec![],
                        }],
                    },
                ],
                dns_servers: vec!["10.0.0.2".parse().unwrap()],
            }),
        }
    }

    fn file(drive: &ConfigDrive, name: &str) -> Option<Vec<u8>> {
        drive
            .files()
            .into_iter()
            .find(|(path, _)| path == Path::new("openstack/latest").join(name).as_path())
            .map(|(_, contents)| contents)
    }

    #[test]
    fn metadata_carries_identity_and_keys() {
        let meta: serde_json::Value =
            serde_json::from_slice(&file(&drive(), "meta_data.json").unwrap()).unwrap();
        assert_eq!(meta["uuid"], "0b5c3a52-5a9e-4d35-8a1e-2f1c0f3b1a01");
        assert_eq!(meta["hostname"], "web-1");
        assert_eq!(meta["availability_zone"], "zone-a");
        assert_eq!(
            meta["public_keys"]["alice"],
            "ssh-ed25519 AAAAC3Nz alice@laptop"
        );
        assert_eq!(meta["keys"][0]["data"], "ssh-ed25519 AAAAC3Nz alice@laptop");
    }

    #[test]
    fn network_data_follows_the_openstack_layout() {
        let net: serde_json::Value =
            serde_json::from_slice(&file(&drive(), "network_data.json").unwrap()).unwrap();
        assert_eq!(
            net,
            json!({
                "links": [
                    {
                        "id": "tap4f2c9a10-7d",
                        "vif_id": "4f2c9a10-7d3e-4b8a-9c61-0e5d2a7b3f11",
                        "type": "phy",
                        "ethernet_mac_address": "52:54:00:12:34:56",
                        "mtu": 1450,
                    },
                    {
                        "id": "tap9b7e3c55-1a",
                        "vif_id": "9b7e3c55-1a2b-4c3d-8e9f-a0b1c2d3e4f5",
                        "type": "phy",
                        "ethernet_mac_address": "52:54:00:ab:cd:ef",
                        "mtu": null,
                    },
                ],
                "networks": [
                    {
                        "id": "network0",
                        "type": "ipv4",
                        "link": "tap4f2c9a10-7d",
                        "ip_address": "10.0.0.5",
                        "netmask": "255.255.255.0",
                        "routes": [
                            {"network": "0.0.0.0", "netmask": "0.0.0.0", "gateway": "10.0.0.1"},
                            {"network": "192.168.8.0", "netmask": "255.255.252.0", "gateway": "10.0.0.254"},
                        ],
                        "network_id": "net-a",
                        "services": [{"type": "dns", "address": "10.0.0.2"}],
                    },
                    {
                        "id": "network1",
                        "type": "ipv6",
                        "link": "tap4f2c9a10-7d",
                        "ip_address": "fd00:1::5",
                        "netmask": "ffff:ffff:ffff:ffff::",
                        "routes": [{"network": "::", "netmask": "::", "gateway": "fd00:1::1"}],
                        "network_id": "net-a",
                        "services": [],
                    },
                    {
                        "id": "network2",
                        "type": "ipv4",
                        "link": "tap9b7e3c55-1a",
                        "ip_address": "172.16.3.9",
                        "netmask": "255.255.240.0",
                        "routes": [],
                        "network_id": "net-b",
                        "services": [],
                    },
                ],
                "services": [{"type": "dns", "address": "10.0.0.2"}],
            })
        );
    }

    #[test]
    fn without_network_data_the_layout_is_empty() {
        let drive = ConfigDrive {
            network: None,
            ..drive()
        };
        let net: serde_json::Value =
            serde_json::from_slice(&file(&drive, "network_data.json").unwrap()).unwrap();
        assert_eq!(net, json!({"links": [], "networks": [], "services": []}));
    }

    #[test]
    fn netmasks_come_from_prefix_lengths() {
        let v4: IpAddr = "10.0.0.0".parse().unwrap();
        let v6: IpAddr = "fd00::".parse().unwrap();
        assert_eq!(netmask(v4, 0).to_string(), "0.0.0.0");
        assert_eq!(netmask(v4, 32).to_string(), "255.255.255.255");
        assert_eq!(netmask(v4, 40).to_string(), "255.255.255.255");
        assert_eq!(netmask(v6, 0).to_string(), "::");
        assert_eq!(netmask(v6, 48).to_string(), "ffff:ffff:ffff::");
        assert_eq!(
            netmask(v6, 128).to_string(),
            "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
        );
    }

    #[test]
    fn user_data_is_verbatim_and_optional() {
        assert_eq!(file(&drive(), "user_data").unwrap(), b"#cloud-config\n");
        let without = ConfigDrive {
            user_data: None,
            ..drive()
        };
        assert!(file(&without, "user_data").is_none());
    }
}
