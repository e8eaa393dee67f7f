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
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::json;

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
    /// The guest's network layout.
    pub network_data: NetworkData,
}

/// OpenStack's `network_data.json`: the NICs, the networks on them and services such as DNS.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct NetworkData {
    /// The guest's NICs.
    pub links: Vec<NetworkLink>,
    /// How each NIC is configured.
    pub networks: Vec<NetworkConfig>,
    /// Services such as DNS servers.
    pub services: Vec<NetworkService>,
}

/// A guest NIC in `network_data.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkLink {
    /// The link's id, referred to by [`NetworkConfig::link`] (e.g. the port's uid).
    pub id: String,
    /// Always `phy` for a virtio NIC.
    #[serde(rename = "type")]
    pub kind: String,
    /// The NIC's MAC address, `aa:bb:cc:dd:ee:ff`.
    pub ethernet_mac_address: String,
    /// The MTU, when the network has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
}

/// How one link is addressed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkConfig {
    /// This entry's id.
    pub id: String,
    /// `ipv4`, `ipv4_dhcp`, `ipv6`, `ipv6_dhcp` or `ipv6_slaac`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The [`NetworkLink::id`] this applies to.
    pub link: String,
    /// The uid of the Ferro network.
    pub network_id: String,
    /// The fixed address, for static types.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ip_address: Option<String>,
    /// The netmask, for static types (`255.255.255.0`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub netmask: Option<String>,
    /// Routes, for static types.
    #[serde(default)]
    pub routes: Vec<NetworkRoute>,
}

/// A route in `network_data.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkRoute {
    /// Destination network (`0.0.0.0` for the default route).
    pub network: String,
    /// Destination netmask.
    pub netmask: String,
    /// Next hop.
    pub gateway: String,
}

/// A service in `network_data.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkService {
    /// `dns`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The service's address.
    pub address: String,
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
        let network =
            serde_json::to_value(&self.network_data).expect("network data serialises to JSON");
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
            network_data: NetworkData {
                links: vec![NetworkLink {
                    id: "port-1".into(),
                    kind: "phy".into(),
                    ethernet_mac_address: "52:54:00:12:34:56".into(),
                    mtu: Some(1450),
                }],
                networks: vec![NetworkConfig {
                    id: "network0".into(),
                    kind: "ipv4_dhcp".into(),
                    link: "port-1".into(),
                    network_id: "net-uid".into(),
                    ip_address: None,
                    netmask: None,
                    routes: vec![],
                }],
                services: vec![NetworkService {
                    kind: "dns".into(),
                    address: "10.0.0.2".into(),
                }],
            },
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
    fn network_data_uses_openstack_field_names() {
        let net: serde_json::Value =
            serde_json::from_slice(&file(&drive(), "network_data.json").unwrap()).unwrap();
        assert_eq!(net["links"][0]["type"], "phy");
        assert_eq!(net["links"][0]["ethernet_mac_address"], "52:54:00:12:34:56");
        assert_eq!(net["networks"][0]["type"], "ipv4_dhcp");
        assert!(net["networks"][0].get("ip_address").is_none());
        assert_eq!(
            net["services"][0],
            json!({"type": "dns", "address": "10.0.0.2"})
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
