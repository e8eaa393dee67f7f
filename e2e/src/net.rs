//! Helpers for the network tests: what a node has, probes, and reaching addresses from
//! namespaces the test made or Ferro made.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::Context;

use crate::{Cloud, wait_for};

/// How long a probe may take to be bound, on a loaded 2-core machine.
const WAIT: Duration = Duration::from_secs(240);

/// What a node has: its links and, with Open vSwitch, `ovs-vsctl show`, each sorted by
/// line (port order is not part of the state).
pub fn node_state(cloud: &Cloud, node: u32) -> anyhow::Result<Vec<String>> {
    let netns = cloud.node_netns(node);
    let links = Command::new("ip")
        .args(["-n", &netns, "-o", "link", "show"])
        .output()?;
    let mut state: Vec<String> = String::from_utf8_lossy(&links.stdout)
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|name| format!("link {}", name.split('@').next().unwrap_or(name)))
        .collect();
    if let Some(socket) = ovsdb_socket(cloud.data_dir(), node) {
        let show = Command::new("ovs-vsctl")
            .arg(format!("--db=unix:{}", socket.display()))
            .args(["--timeout=10", "show"])
            .output()?;
        state.extend(
            String::from_utf8_lossy(&show.stdout)
                .lines()
                .map(|l| format!("ovs {}", l.trim())),
        );
    }
    state.sort();
    Ok(state)
}

/// Indents a script as a YAML block scalar under `userData: |`.
pub fn block(text: &str, indent: usize) -> String {
    text.lines()
        .map(|l| format!("{}{l}\n", " ".repeat(indent)))
        .collect()
}

/// A probe Port on `node`: the node wires it as a namespace with the Port's address.
pub fn probe(project: &str, name: &str, network: &str, node: &str, ip: &str) -> String {
    format!(
        r#"apiVersion: ferro/v1
kind: Port
metadata:
  name: {name}
  project: {project}
  annotations: {{ferro.io/probe-node: {node}}}
spec:
  network: {network}
  deviceOwner: "network:probe"
  fixedIps: [{{ipAddress: {ip}}}]
"#
    )
}

/// The uid of a Port, from `ferro get -o yaml`.
pub fn uid_of(cloud: &Cloud, project: &str, what: &str) -> anyhow::Result<String> {
    let yaml = cloud.run(["get", "port", what, "-p", project, "-o", "yaml"])?;
    yaml.lines()
        .find_map(|l| l.trim().strip_prefix("uid: "))
        .map(|u| u.trim_matches('"').to_owned())
        .with_context(|| format!("{what} has no uid:\n{yaml}"))
}

/// Whether `ip` answers one ping from inside `netns`.
pub fn pings(netns: &str, ip: &str) -> bool {
    Command::new("ip")
        .args([
            "netns", "exec", netns, "busybox", "ping", "-c", "1", "-W", "1", ip,
        ])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// The probe's namespace once its node has bound it.
pub fn bound_probe(cloud: &Cloud, project: &str, name: &str) -> anyhow::Result<String> {
    wait_for(&format!("probe {project}/{name} bound"), WAIT, || {
        let yaml = cloud.run(["get", "port", name, "-p", project, "-o", "yaml"])?;
        Ok(yaml.contains("bound: true").then_some(()))
    })?;
    Ok(format!("qprobe-{}", uid_of(cloud, project, name)?))
}

/// The OVSDB socket of node `i`'s private Open vSwitch instance, if it has one.
pub fn ovsdb_socket(data_dir: &Path, node: u32) -> Option<PathBuf> {
    let nodes = data_dir.join("nodes").join(format!("node-{node}"));
    find_named(&nodes, "db.sock")
}

/// The first file called `name` under `dir`, searching depth first.
pub fn find_named(dir: &Path, name: &str) -> Option<PathBuf> {
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        if path.file_name().is_some_and(|n| n == name) {
            return Some(path);
        }
        if path.is_dir()
            && let Some(found) = find_named(&path, name)
        {
            return Some(found);
        }
    }
    None
}

/// Every named network namespace of the machine (`ip netns list`).
pub fn namespaces_of_ferro() -> anyhow::Result<Vec<String>> {
    let out = Command::new("ip").args(["netns", "list"]).output()?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect())
}

/// A TCP listener on `addr` inside the namespace `netns` (which the test or Ferro made):
/// [`Listener::peer`] gives the source address of the first connection, as seen there.
pub struct Listener {
    seen: std::sync::mpsc::Receiver<anyhow::Result<std::net::SocketAddr>>,
}

impl Listener {
    /// Starts listening; fails if the namespace or address is not there.
    pub fn start(netns: &str, addr: std::net::SocketAddr) -> anyhow::Result<Listener> {
        let (bound_tx, bound_rx) = std::sync::mpsc::channel();
        let (seen_tx, seen) = std::sync::mpsc::channel();
        let path = format!("/run/netns/{netns}");
        std::thread::spawn(move || {
            let listener = (|| -> anyhow::Result<std::net::TcpListener> {
                let file = std::fs::File::open(&path).with_context(|| format!("open {path}"))?;
                // Only this thread changes namespace, and it ends with the listener.
                rustix::thread::move_into_link_name_space(
                    std::os::fd::AsFd::as_fd(&file),
                    Some(rustix::thread::LinkNameSpaceType::Network),
                )
                .with_context(|| format!("enter {path}"))?;
                std::net::TcpListener::bind(addr).with_context(|| format!("listen on {addr}"))
            })();
            match listener {
                Ok(listener) => {
                    let _ = bound_tx.send(Ok(()));
                    let accepted = listener.accept().map(|(_, peer)| peer);
                    let _ = seen_tx.send(accepted.map_err(anyhow::Error::from));
                }
                Err(e) => {
                    let _ = bound_tx.send(Err(e));
                }
            }
        });
        bound_rx.recv().context("the listener thread ended")??;
        Ok(Listener { seen })
    }

    /// The source address of the first connection, waiting at most `timeout`.
    pub fn peer(&self, timeout: Duration) -> anyhow::Result<std::net::SocketAddr> {
        self.seen
            .recv_timeout(timeout)
            .context("no connection came")?
    }
}

/// What a TCP connection to `addr` from inside `netns` reads (its first line), if it
/// connects within a couple of seconds.
pub fn tcp_line(netns: &str, ip: &str, port: u16) -> Option<String> {
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            netns,
            "busybox",
            "nc",
            "-w",
            "2",
            ip,
            &port.to_string(),
        ])
        .stdin(std::process::Stdio::null())
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .next()
        .map(str::to_owned)
        .filter(|l| !l.is_empty())
}

/// Waits until every node of `cloud` has exactly the links and switch it had in
/// `before` (one [`node_state`] per node, from node 1), saying what differs meanwhile.
pub fn wait_as_before(cloud: &Cloud, before: &[Vec<String>]) -> anyhow::Result<()> {
    wait_for("every node as before", WAIT, || {
        for (i, was) in before.iter().enumerate() {
            let now = node_state(cloud, i as u32 + 1)?;
            if &now != was {
                let gone: Vec<&String> = was.iter().filter(|l| !now.contains(l)).collect();
                let new: Vec<&String> = now.iter().filter(|l| !was.contains(l)).collect();
                eprintln!("node-{}: gone {gone:?}, new {new:?}", i + 1);
                return Ok(None);
            }
        }
        Ok(Some(()))
    })
}

/// Runs `f` on a thread inside the namespace `netns` (which the test or Ferro made).
fn in_netns<T: Send + 'static>(
    netns: &str,
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> std::thread::JoinHandle<anyhow::Result<T>> {
    let path = format!("/run/netns/{netns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).with_context(|| format!("open {path}"))?;
        // Only this thread changes namespace, and it ends with `f`.
        rustix::thread::move_into_link_name_space(
            std::os::fd::AsFd::as_fd(&file),
            Some(rustix::thread::LinkNameSpaceType::Network),
        )
        .with_context(|| format!("enter {path}"))?;
        f()
    })
}

/// Whether a TCP connection to `addr` from inside `netns` is accepted within `timeout`.
pub fn connects(netns: &str, addr: std::net::SocketAddr, timeout: Duration) -> bool {
    in_netns(netns, move || {
        Ok(std::net::TcpStream::connect_timeout(&addr, timeout).is_ok())
    })
    .join()
    .is_ok_and(|r| r.is_ok_and(|ok| ok))
}

/// A TCP echo server inside a namespace, stopped on drop (so that nothing of the test's
/// holds the namespace once Ferro removes it).
pub struct EchoServer {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<anyhow::Result<()>>>,
}

impl EchoServer {
    /// Serves on `addr` inside `netns`; each connection is echoed until it closes or is
    /// idle for 5 s.
    pub fn start(netns: &str, addr: std::net::SocketAddr) -> anyhow::Result<EchoServer> {
        use std::sync::atomic::Ordering;
        let (bound_tx, bound_rx) = std::sync::mpsc::channel();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = in_netns(netns, move || {
            let listener = match std::net::TcpListener::bind(addr)
                .and_then(|l| l.set_nonblocking(true).map(|()| l))
            {
                Ok(listener) => {
                    let _ = bound_tx.send(Ok(()));
                    listener
                }
                Err(e) => {
                    let _ = bound_tx.send(Err(anyhow::Error::from(e)));
                    return Ok(());
                }
            };
            while !stopped.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        std::thread::spawn(move || {
                            stream.set_nonblocking(false)?;
                            stream.set_read_timeout(Some(Duration::from_secs(5)))?;
                            let mut reader = stream;
                            let mut writer = reader.try_clone()?;
                            std::io::copy(&mut reader, &mut writer)
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
            Ok(())
        });
        bound_rx.recv().context("the echo thread ended")??;
        Ok(EchoServer {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Talks to an echo server at `addr` from inside `netns` for `duration`, one byte every
/// 100 ms over one connection; an error says when it stopped answering.
pub fn echo_for(
    netns: &str,
    addr: std::net::SocketAddr,
    duration: Duration,
) -> std::thread::JoinHandle<anyhow::Result<()>> {
    use std::io::{Read, Write};
    in_netns(netns, move || {
        let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))
            .with_context(|| format!("connect to {addr}"))?;
        stream.set_read_timeout(Some(Duration::from_secs(2)))?;
        let started = std::time::Instant::now();
        while started.elapsed() < duration {
            let mut byte = [0u8];
            stream
                .write_all(b"x")
                .and_then(|()| stream.read_exact(&mut byte))
                .with_context(|| format!("no echo after {:?}", started.elapsed()))?;
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    })
}
