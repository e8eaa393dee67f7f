//! The metadata service: what a guest reads from `http://169.254.169.254/`.
//!
//! As Neutron's metadata proxy does, it lives where the guest's traffic to that address
//! goes: the router of its network. The router's nftables table redirects TCP to
//! `169.254.169.254:80` arriving on a tenant leg to [`METADATA_PORT`] in the router's
//! namespace, where the node agent listens (a socket bound inside the namespace, served by
//! the agent itself: no process per router). A request is answered for the instance
//! whose Port, on one of the router's tenant networks, has the request's source address;
//! anything else gets 404. Security groups keep a guest from sending from another Port's
//! address, so a guest reads only its own data.
//!
//! What is served is the OpenStack layout of the config drive ([`ConfigDrive::files`]:
//! `/openstack/latest/meta_data.json`, `user_data`, `network_data.json`,
//! `vendor_data.json`, any version name standing for `latest`, as cloud-init asks for
//! dated ones) and the EC2-style tree (`/latest/meta-data/hostname`, `instance-id`,
//! `local-ipv4`, `public-keys/0/openssh-key`, `/latest/user-data`).
//!
//! A network no router has a leg on is served from its DHCP namespace instead, as Neutron
//! does for isolated networks: that namespace holds the metadata address, the agent
//! listens there on port 80, and DHCP gives guests a route to the address through the
//! DHCP port (option 121).
//!
//! A listener holds its namespace alive: it is stopped (and waited for) before the
//! namespace is removed, and started again when the namespace is a new one.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferro_api::client::Client;
use ferro_api::v1;
use ferro_runtime::Store;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::{JoinHandle, JoinSet};

use crate::configdrive::ConfigDrive;
use crate::network::plan::COMPUTE_DEVICE_OWNER;

/// The address guests ask.
pub const METADATA_ADDRESS: &str = "169.254.169.254";

/// The port the agent listens on inside each router namespace.
pub const METADATA_PORT: u16 = 9697;

/// How long a client may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// The largest request read.
const MAX_REQUEST: usize = 8192;

struct Running {
    /// The namespace's instance (inode) the listener was bound in.
    instance: Option<u64>,
    /// The router's tenant networks, by uid: whose Ports it answers for.
    networks: Arc<Mutex<BTreeSet<String>>>,
    task: JoinHandle<()>,
}

/// The metadata listeners of this node's routers. See the module notes.
pub struct MetadataService {
    client: Client,
    ports: Store<v1::Port>,
    running: tokio::sync::Mutex<BTreeMap<String, Running>>,
}

impl MetadataService {
    /// A service that answers from `ports` and the API.
    pub fn new(client: Client, ports: Store<v1::Port>) -> MetadataService {
        MetadataService {
            client,
            ports,
            running: tokio::sync::Mutex::new(BTreeMap::new()),
        }
    }

    /// Makes sure the listener `uid` (`router-<uid>`, `dhcp-<network-uid>`) listens on
    /// `port` in `namespace` (a new one if the namespace is not the one it was bound in),
    /// answering for `networks`.
    pub async fn ensure(
        self: &Arc<Self>,
        uid: &str,
        namespace: &str,
        port: u16,
        networks: BTreeSet<String>,
    ) -> std::io::Result<()> {
        let instance = crate::router::namespace_instance(namespace);
        let mut running = self.running.lock().await;
        if let Some(r) = running.get(uid)
            && r.instance == instance
            && !r.task.is_finished()
        {
            *r.networks.lock().unwrap_or_else(|e| e.into_inner()) = networks;
            return Ok(());
        }
        if let Some(old) = running.remove(uid) {
            old.task.abort();
            let _ = old.task.await;
        }
        let listener = bind_in(namespace, port).await?;
        let networks = Arc::new(Mutex::new(networks));
        let service = self.clone();
        let serving = networks.clone();
        let router = uid.to_owned();
        let task = tokio::spawn(async move {
            let mut connections = JoinSet::new();
            loop {
                let Ok((stream, peer)) = listener.accept().await else {
                    continue;
                };
                while connections.try_join_next().is_some() {}
                let service = service.clone();
                let networks = serving.lock().unwrap_or_else(|e| e.into_inner()).clone();
                let router = router.clone();
                connections.spawn(async move {
                    if let Err(e) = service.serve(stream, peer, &networks).await {
                        tracing::debug!(router, %peer, error = %e, "metadata request failed");
                    }
                });
            }
        });
        tracing::info!(
            listener = uid,
            namespace,
            port,
            "metadata service listening"
        );
        running.insert(
            uid.to_owned(),
            Running {
                instance,
                networks,
                task,
            },
        );
        Ok(())
    }

    /// Stops the listener `uid` and its connections, and waits until their sockets are
    /// closed (so the namespace can go).
    pub async fn stop(&self, uid: &str) {
        let old = self.running.lock().await.remove(uid);
        if let Some(old) = old {
            old.task.abort();
            let _ = old.task.await;
        }
    }

    /// The listeners whose names start with `prefix`.
    pub async fn listeners(&self, prefix: &str) -> BTreeSet<String> {
        self.running
            .lock()
            .await
            .keys()
            .filter(|k| k.starts_with(prefix))
            .cloned()
            .collect()
    }

    async fn serve(
        &self,
        mut stream: tokio::net::TcpStream,
        peer: SocketAddr,
        networks: &BTreeSet<String>,
    ) -> std::io::Result<()> {
        let mut request = Vec::new();
        let mut buffer = [0u8; 1024];
        let read = tokio::time::timeout(REQUEST_TIMEOUT, async {
            while !request.windows(4).any(|w| w == b"\r\n\r\n")
                && !request.windows(2).any(|w| w == b"\n\n")
            {
                let n = stream.read(&mut buffer).await?;
                if n == 0 || request.len() > MAX_REQUEST {
                    break;
                }
                request.extend_from_slice(&buffer[..n]);
            }
            std::io::Result::Ok(())
        })
        .await;
        if !matches!(read, Ok(Ok(()))) {
            return Ok(());
        }
        let text = String::from_utf8_lossy(&request);
        let mut words = text.lines().next().unwrap_or_default().split_whitespace();
        let (method, path) = (
            words.next().unwrap_or_default(),
            words.next().unwrap_or("/"),
        );
        let answer = if method != "GET" {
            Answer::status(405, "only GET is served")
        } else {
            match self.instance(peer.ip(), networks).await {
                Some(instance) => answer(&instance, path),
                None => Answer::status(404, "no instance has this address"),
            }
        };
        let head = format!(
            "HTTP/1.0 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            answer.status,
            reason(answer.status),
            answer.content_type,
            answer.body.len()
        );
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(&answer.body).await?;
        stream.shutdown().await
    }

    /// The instance whose Port on one of `networks` has `address`.
    async fn instance(&self, address: IpAddr, networks: &BTreeSet<String>) -> Option<Instance> {
        let port = self.ports.list().into_iter().find(|p| {
            let status = p.status.clone().unwrap_or_default();
            networks.contains(&status.network_uid)
                && status
                    .addresses
                    .iter()
                    .any(|a| a.ip.parse::<IpAddr>().ok() == Some(address))
        })?;
        let project = port.metadata.as_ref()?.project.clone();
        let owner = port.spec.as_ref()?.device_owner.clone();
        let server_name = owner.strip_prefix(COMPUTE_DEVICE_OWNER)?;
        let server = self
            .client
            .get_typed::<v1::Server>(&project, server_name)
            .await
            .ok()?;
        let meta = server.metadata.clone().unwrap_or_default();
        let spec = server.spec.clone().unwrap_or_default();
        let mut public_keys = BTreeMap::new();
        if !spec.key_pair.is_empty()
            && let Ok(pair) = self
                .client
                .get_typed::<v1::KeyPair>(&project, &spec.key_pair)
                .await
        {
            let key = pair.spec.map(|s| s.public_key).unwrap_or_default();
            public_keys.insert(spec.key_pair.clone(), key);
        }
        let hostname = spec
            .hostname
            .clone()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| meta.name.clone());
        Some(Instance {
            address,
            drive: ConfigDrive {
                uuid: meta.uid.clone(),
                name: meta.name.clone(),
                hostname,
                availability_zone: spec.availability_zone.clone(),
                public_keys,
                user_data: (!spec.user_data.is_empty())
                    .then(|| spec.user_data.clone().into_bytes()),
                network: None,
            },
        })
    }
}

/// Binds a TCP listener on `port` inside the network namespace `namespace`: a thread
/// enters it, binds, and ends; the socket stays in that namespace.
async fn bind_in(namespace: &str, port: u16) -> std::io::Result<tokio::net::TcpListener> {
    let path = std::path::Path::new(crate::links::netlink::NETNS_RUN_DIR).join(namespace);
    let listener = tokio::task::spawn_blocking(move || {
        std::thread::spawn(move || -> std::io::Result<std::net::TcpListener> {
            let file = std::fs::File::open(&path)?;
            rustix::thread::move_into_link_name_space(
                std::os::fd::AsFd::as_fd(&file),
                Some(rustix::thread::LinkNameSpaceType::Network),
            )?;
            let listener = std::net::TcpListener::bind(("0.0.0.0", port))?;
            listener.set_nonblocking(true)?;
            Ok(listener)
        })
        .join()
        .map_err(|_| std::io::Error::other("the binding thread panicked"))?
    })
    .await
    .map_err(std::io::Error::other)??;
    tokio::net::TcpListener::from_std(listener)
}

/// What is known of the instance asking.
#[derive(Debug, Clone)]
pub struct Instance {
    /// The address it asked from.
    pub address: IpAddr,
    /// Its metadata, as its config drive has it.
    pub drive: ConfigDrive,
}

/// A response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// The HTTP status.
    pub status: u16,
    /// Its content type.
    pub content_type: &'static str,
    /// The body.
    pub body: Vec<u8>,
}

impl Answer {
    fn text(body: impl Into<String>) -> Answer {
        Answer {
            status: 200,
            content_type: "text/plain",
            body: body.into().into_bytes(),
        }
    }

    fn status(status: u16, why: &str) -> Answer {
        Answer {
            status,
            content_type: "text/plain",
            body: format!("{why}\n").into_bytes(),
        }
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Error",
    }
}

/// The answer to `GET path` for `instance`. Pure.
pub fn answer(instance: &Instance, path: &str) -> Answer {
    let path = path.split('?').next().unwrap_or_default();
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    let drive = &instance.drive;
    let not_found = || Answer::status(404, "not found");
    match parts.as_slice() {
        [] => Answer::text("latest\nopenstack\n"),
        ["openstack"] => Answer::text("latest\n"),
        ["openstack", _version] => {
            let mut list = String::from("meta_data.json\nnetwork_data.json\n");
            if drive.user_data.is_some() {
                list.push_str("user_data\n");
            }
            list.push_str("vendor_data.json\n");
            Answer::text(list)
        }
        ["openstack", _version, file] => {
            let wanted = std::path::PathBuf::from(format!("openstack/latest/{file}"));
            match drive.files().into_iter().find(|(p, _)| *p == wanted) {
                Some((_, body)) => Answer {
                    status: 200,
                    content_type: if file.ends_with(".json") {
                        "application/json"
                    } else {
                        "application/octet-stream"
                    },
                    body,
                },
                None => not_found(),
            }
        }
        [_version] => Answer::text("meta-data/\nuser-data\n"),
        [_version, "user-data"] => match &drive.user_data {
            Some(data) => Answer {
                status: 200,
                content_type: "application/octet-stream",
                body: data.clone(),
            },
            None => not_found(),
        },
        [_version, "meta-data"] => {
            let mut list = String::from("hostname\ninstance-id\nlocal-hostname\nlocal-ipv4\n");
            if !drive.public_keys.is_empty() {
                list.push_str("public-keys/\n");
            }
            Answer::text(list)
        }
        [_version, "meta-data", "hostname" | "local-hostname"] => {
            Answer::text(drive.hostname.clone())
        }
        [_version, "meta-data", "instance-id"] => Answer::text(drive.uuid.clone()),
        [_version, "meta-data", "local-ipv4"] => Answer::text(instance.address.to_string()),
        [_version, "meta-data", "placement", "availability-zone"] => {
            Answer::text(drive.availability_zone.clone())
        }
        [_version, "meta-data", "public-keys"] => Answer::text(
            drive
                .public_keys
                .keys()
                .enumerate()
                .map(|(i, name)| format!("{i}={name}\n"))
                .collect::<String>(),
        ),
        [_version, "meta-data", "public-keys", index] => {
            match index
                .parse::<usize>()
                .ok()
                .and_then(|i| drive.public_keys.values().nth(i))
            {
                Some(_) => Answer::text("openssh-key\n"),
                None => not_found(),
            }
        }
        [_version, "meta-data", "public-keys", index, "openssh-key"] => {
            match index
                .parse::<usize>()
                .ok()
                .and_then(|i| drive.public_keys.values().nth(i))
            {
                Some(key) => Answer::text(format!("{key}\n")),
                None => not_found(),
            }
        }
        _ => not_found(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instance() -> Instance {
        Instance {
            address: "10.0.0.5".parse().unwrap(),
            drive: ConfigDrive {
                uuid: "u-1".into(),
                name: "web".into(),
                hostname: "web-host".into(),
                availability_zone: "az1".into(),
                public_keys: BTreeMap::from([("alice".into(), "ssh-ed25519 AAAA alice".into())]),
                user_data: Some(b"#!/bin/sh\n".to_vec()),
                network: None,
            },
        }
    }

    fn body(answer: Answer) -> String {
        assert_eq!(answer.status, 200);
        String::from_utf8(answer.body).unwrap()
    }

    #[test]
    fn the_ec2_tree_answers_hostname_id_address_and_keys() {
        let i = instance();
        assert_eq!(body(answer(&i, "/latest/meta-data/hostname")), "web-host");
        assert_eq!(body(answer(&i, "/2009-04-04/meta-data/instance-id")), "u-1");
        assert_eq!(body(answer(&i, "/latest/meta-data/local-ipv4")), "10.0.0.5");
        assert_eq!(
            body(answer(&i, "/latest/meta-data/public-keys")),
            "0=alice\n"
        );
        assert_eq!(
            body(answer(&i, "/latest/meta-data/public-keys/0/openssh-key")),
            "ssh-ed25519 AAAA alice\n"
        );
        assert_eq!(body(answer(&i, "/latest/user-data")), "#!/bin/sh\n");
        assert_eq!(
            answer(&i, "/latest/meta-data/public-keys/1/openssh-key").status,
            404
        );
        assert_eq!(answer(&i, "/nope/at/all/here").status, 404);
    }

    #[test]
    fn the_openstack_tree_is_the_config_drives_for_any_version() {
        let i = instance();
        let meta = body(answer(&i, "/openstack/2018-08-27/meta_data.json"));
        let json: serde_json::Value = serde_json::from_str(&meta).unwrap();
        assert_eq!(json["uuid"], "u-1");
        assert_eq!(json["hostname"], "web-host");
        assert_eq!(json["public_keys"]["alice"], "ssh-ed25519 AAAA alice");
        assert_eq!(
            body(answer(&i, "/openstack/latest/user_data")),
            "#!/bin/sh\n"
        );
        assert!(body(answer(&i, "/openstack/latest")).contains("network_data.json\n"));
        assert_eq!(answer(&i, "/openstack/latest/secrets.json").status, 404);
    }
}
