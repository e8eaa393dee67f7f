//! The dnsmasq DHCP driver against real dnsmasq, with a real DHCP client. Needs root,
//! `dnsmasq` (Debian `dnsmasq-base`) and `busybox` with its `udhcpc` applet.
//!
//! Each test builds its own pair of namespaces joined by a veth: a `qdhcp-` namespace the
//! driver runs dnsmasq in, and a client namespace standing for a guest. The client is
//! busybox `udhcpc` with a private script that only prints what it is given: never the
//! default script, and never dhclient, which would rewrite the host's /etc/resolv.conf.
//! The [`Lab`] guard kills the test's dnsmasq processes by pid and deletes its namespaces
//! and directory when the test ends, passed or failed.

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};

use ferro_agent::dhcp::dnsmasq::DnsmasqDhcp;
use ferro_agent::dhcp::{
    Change, DEFAULT_DOMAIN, DEFAULT_LEASE_TIME, Dhcp, DhcpHost, DhcpInstance, DhcpServer,
    DhcpSubnet, HostRoute, qdhcp_namespace,
};

static NEXT_LAB: AtomicU32 = AtomicU32::new(0);

/// The guest's MAC, which the hosts file knows.
const GUEST_MAC: &str = "fa:16:3e:00:00:05";
/// A MAC no Port has.
const STRANGER_MAC: &str = "fa:16:3e:00:00:99";

/// Runs a command, failing with its stderr if it fails; returns its stdout.
fn run(program: &str, args: &[&str]) -> Result<String> {
    let output = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("run {program}"))?;
    ensure!(
        output.status.success(),
        "{program} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// The pids of live dnsmasq processes whose command line mentions `needle`.
fn dnsmasq_pids_mentioning(needle: &str) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let zombie = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next())
                .is_none_or(|state| matches!(state, "Z" | "X"));
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline);
            !zombie && cmdline.starts_with("dnsmasq\0") && cmdline.contains(needle)
        })
        .collect()
}

fn is_alive(pid: u32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .is_some_and(|state| !matches!(state, "Z" | "X"))
}

fn kill(pid: u32) {
    if let Some(target) = rustix::process::Pid::from_raw(pid as i32) {
        let _ = rustix::process::kill_process(target, rustix::process::Signal::KILL);
    }
}

/// A `qdhcp-` namespace and a client namespace joined by a veth, a state directory, and
/// the driver. Dropping it removes everything.
struct Lab {
    state: tempfile::TempDir,
    network_uid: String,
    qdhcp: String,
    client: String,
    script: PathBuf,
    namespaces: Vec<String>,
}

impl Lab {
    fn new() -> Result<Lab> {
        for (program, args) in [("dnsmasq", "--version"), ("busybox", "--list")] {
            let output = Command::new(program).arg(args).output();
            ensure!(
                output.is_ok_and(|o| o.status.success()),
                "{program} is missing (scripts/install-host-deps.sh)"
            );
        }
        ensure!(
            run("busybox", &["--list"])?.lines().any(|l| l == "udhcpc"),
            "busybox has no udhcpc applet"
        );
        let id = format!(
            "ftd{}-{}",
            std::process::id() % 10_000,
            NEXT_LAB.fetch_add(1, Ordering::Relaxed)
        );
        let state = tempfile::Builder::new()
            .prefix("ferro-dhcp-")
            .tempdir_in("/tmp")
            .context("temp dir")?;
        // dnsmasq re-reads its files as an unprivileged user.
        std::fs::set_permissions(state.path(), std::fs::Permissions::from_mode(0o755))?;
        let script = state.path().join("udhcpc-script");
        // Prints what the lease brought and touches nothing.
        std::fs::write(
            &script,
            concat!(
                "#!/bin/sh\n",
                "[ \"$1\" = bound ] || exit 0\n",
                "echo \"ip=$ip\"\n",
                "echo \"mask=$mask\"\n",
                "echo \"router=$router\"\n",
                "echo \"dns=$dns\"\n",
                "echo \"mtu=$mtu\"\n",
                "echo \"domain=$domain\"\n",
                "echo \"hostname=$hostname\"\n",
                "echo \"staticroutes=$staticroutes\"\n",
            ),
        )?;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))?;
        // The guard exists before anything is made, so a failure below still cleans up.
        let mut lab = Lab {
            state,
            qdhcp: qdhcp_namespace(&id),
            client: format!("{id}-client"),
            network_uid: id,
            script,
            namespaces: Vec::new(),
        };
        for netns in [lab.qdhcp.clone(), lab.client.clone()] {
            run("ip", &["netns", "add", &netns])?;
            lab.namespaces.push(netns.clone());
            run("ip", &["-n", &netns, "link", "set", "lo", "up"])?;
        }
        run(
            "ip",
            &[
                "link",
                "add",
                "dhcp0",
                "netns",
                &lab.qdhcp,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                &lab.client,
            ],
        )?;
        run(
            "ip",
            &[
                "-n",
                &lab.qdhcp,
                "addr",
                "add",
                "10.77.1.2/24",
                "dev",
                "dhcp0",
            ],
        )?;
        run("ip", &["-n", &lab.qdhcp, "link", "set", "dhcp0", "up"])?;
        lab.set_client_mac(GUEST_MAC)?;
        run("ip", &["-n", &lab.client, "link", "set", "eth0", "up"])?;
        Ok(lab)
    }

    fn driver(&self) -> Result<DnsmasqDhcp> {
        Ok(DnsmasqDhcp::new(self.state.path())?)
    }

    fn server_dir(&self) -> PathBuf {
        self.state.path().join("dhcp").join(&self.network_uid)
    }

    fn set_client_mac(&self, mac: &str) -> Result<()> {
        run(
            "ip",
            &["-n", &self.client, "link", "set", "eth0", "address", mac],
        )?;
        Ok(())
    }

    /// The network's server: one subnet with a gateway, DNS servers and a host route, and
    /// the guest's fixed address.
    fn server(&self) -> DhcpServer {
        DhcpServer {
            network_uid: self.network_uid.clone(),
            namespace: self.qdhcp.clone(),
            interface: "dhcp0".into(),
            mtu: 1450,
            domain: DEFAULT_DOMAIN.into(),
            subnets: vec![DhcpSubnet {
                cidr: "10.77.1.0/24".parse().unwrap(),
                gateway: Some("10.77.1.1".parse().unwrap()),
                dns_servers: vec!["10.77.1.53".parse().unwrap()],
                host_routes: vec![HostRoute {
                    destination: "169.254.169.254/32".parse().unwrap(),
                    nexthop: "10.77.1.3".parse().unwrap(),
                }],
                lease_time: DEFAULT_LEASE_TIME,
            }],
            hosts: vec![DhcpHost {
                mac: GUEST_MAC.into(),
                ip: "10.77.1.5".parse().unwrap(),
                hostname: "web-1".into(),
            }],
        }
    }

    /// Asks for a lease from the client namespace; the options received, or `None` when
    /// no server answered.
    async fn lease(&self) -> Result<Option<BTreeMap<String, String>>> {
        let script = self.script.display().to_string();
        let output = tokio::process::Command::new("ip")
            .args(["netns", "exec", &self.client, "busybox", "udhcpc"])
            .args(["-i", "eth0", "-n", "-q", "-t", "3", "-T", "1"])
            .args(["-O", "staticroutes", "-s", &script])
            .output()
            .await
            .context("run udhcpc")?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr);
            ensure!(stderr.contains("no lease"), "udhcpc failed: {stderr}");
            return Ok(None);
        }
        let options: BTreeMap<String, String> = stdout
            .lines()
            .filter_map(|line| line.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        ensure!(
            options.contains_key("ip"),
            "udhcpc printed no lease: {stdout}"
        );
        Ok(Some(options))
    }

    /// The lease, which must come; with the dnsmasq log when it does not.
    async fn expect_lease(&self) -> Result<BTreeMap<String, String>> {
        match self.lease().await? {
            Some(options) => Ok(options),
            None => bail!(
                "no lease; dnsmasq said:\n{}",
                std::fs::read_to_string(self.server_dir().join("dnsmasq.log")).unwrap_or_default()
            ),
        }
    }

    /// This lab's instance, as a driver lists it.
    async fn instance(&self, driver: &DnsmasqDhcp) -> Result<Option<DhcpInstance>> {
        Ok(driver
            .list()
            .await?
            .into_iter()
            .find(|i| i.network_uid == self.network_uid))
    }

    async fn pid(&self, driver: &DnsmasqDhcp) -> Result<u32> {
        self.instance(driver)
            .await?
            .and_then(|i| i.pid)
            .context("no dnsmasq runs")
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for pid in dnsmasq_pids_mentioning(&self.state.path().display().to_string()) {
            kill(pid);
        }
        for netns in self.namespaces.iter().rev() {
            let _ = run("ip", &["netns", "del", netns]);
        }
    }
}

#[tokio::test]
async fn a_known_guest_gets_its_address_and_options_and_a_stranger_gets_none() -> Result<()> {
    let lab = Lab::new()?;
    let driver = lab.driver()?;
    assert_eq!(driver.ensure(&lab.server()).await?, Change::Start);

    let lease = lab.expect_lease().await?;
    assert_eq!(lease["ip"], "10.77.1.5");
    assert_eq!(lease["mask"], "24");
    assert_eq!(lease["router"], "10.77.1.1");
    assert_eq!(lease["dns"], "10.77.1.53");
    assert_eq!(lease["mtu"], "1450");
    assert_eq!(lease["domain"], DEFAULT_DOMAIN);
    assert_eq!(lease["hostname"], "web-1");
    // Classless routes: the host route and, as RFC 3442 asks, the default route.
    assert_eq!(
        lease["staticroutes"],
        "169.254.169.254/32 10.77.1.3 0.0.0.0/0 10.77.1.1"
    );

    lab.set_client_mac(STRANGER_MAC)?;
    assert_eq!(lab.lease().await?, None, "an unknown MAC got a lease");
    Ok(())
}

#[tokio::test]
async fn a_new_host_is_served_after_a_reload_by_the_same_process() -> Result<()> {
    let lab = Lab::new()?;
    let driver = lab.driver()?;
    let mut server = lab.server();
    server.hosts.clear();
    assert_eq!(driver.ensure(&server).await?, Change::Start);
    let pid = lab.pid(&driver).await?;
    assert_eq!(
        lab.lease().await?,
        None,
        "a lease before the host was known"
    );

    server.hosts = lab.server().hosts;
    assert_eq!(driver.ensure(&server).await?, Change::Reload);
    assert_eq!(lab.pid(&driver).await?, pid, "a reload restarted dnsmasq");
    assert_eq!(lab.expect_lease().await?["ip"], "10.77.1.5");

    // Nothing changed: no file is rewritten and the process is left alone.
    let hosts = lab.server_dir().join("hosts");
    let before = std::fs::metadata(&hosts)?;
    assert_eq!(driver.ensure(&server).await?, Change::Nothing);
    let after = std::fs::metadata(&hosts)?;
    assert_eq!(
        (before.ino(), before.mtime_nsec()),
        (after.ino(), after.mtime_nsec())
    );
    assert_eq!(lab.pid(&driver).await?, pid);
    Ok(())
}

#[tokio::test]
async fn a_changed_mtu_restarts_the_server() -> Result<()> {
    let lab = Lab::new()?;
    let driver = lab.driver()?;
    let mut server = lab.server();
    driver.ensure(&server).await?;
    let first = lab.pid(&driver).await?;

    server.mtu = 1400;
    assert_eq!(driver.ensure(&server).await?, Change::Restart);
    let second = lab.pid(&driver).await?;
    assert_ne!(first, second);
    assert!(!is_alive(first), "the old dnsmasq still runs");
    assert_eq!(lab.expect_lease().await?["mtu"], "1400");
    Ok(())
}

#[tokio::test]
async fn a_fresh_driver_adopts_a_running_server_and_restarts_a_dead_one() -> Result<()> {
    let lab = Lab::new()?;
    let pid = {
        let earlier = lab.driver()?;
        earlier.ensure(&lab.server()).await?;
        lab.pid(&earlier).await?
    };

    // A restarted agent: a new driver over the same state directory.
    let driver = lab.driver()?;
    let found = lab.instance(&driver).await?.context("not listed")?;
    assert_eq!(
        found,
        DhcpInstance {
            network_uid: lab.network_uid.clone(),
            pid: Some(pid),
            has_directory: true,
        }
    );
    assert_eq!(driver.ensure(&lab.server()).await?, Change::Nothing);
    assert_eq!(lab.pid(&driver).await?, pid);

    // Killed by hand: listed as not running, and started again by the next ensure.
    kill(pid);
    for _ in 0..100 {
        if !is_alive(pid) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let found = lab.instance(&driver).await?.context("not listed")?;
    assert!(!found.is_running() && found.has_directory, "{found:?}");
    assert_eq!(driver.ensure(&lab.server()).await?, Change::Start);
    assert_ne!(lab.pid(&driver).await?, pid);
    assert_eq!(lab.expect_lease().await?["ip"], "10.77.1.5");
    Ok(())
}

#[tokio::test]
async fn remove_leaves_no_process_and_no_directory() -> Result<()> {
    let lab = Lab::new()?;
    let driver = lab.driver()?;
    driver.ensure(&lab.server()).await?;
    let pid = lab.pid(&driver).await?;

    driver.remove(&lab.network_uid).await?;
    assert!(!is_alive(pid), "dnsmasq {pid} survived remove");
    assert!(!lab.server_dir().exists());
    assert_eq!(lab.instance(&driver).await?, None);
    assert!(dnsmasq_pids_mentioning(&lab.network_uid).is_empty());
    // Nothing left: removing again is harmless.
    driver.remove(&lab.network_uid).await?;
    Ok(())
}

#[tokio::test]
async fn an_orphan_without_its_directory_is_listed_and_removed() -> Result<()> {
    let lab = Lab::new()?;
    let driver = lab.driver()?;
    driver.ensure(&lab.server()).await?;
    let pid = lab.pid(&driver).await?;
    std::fs::remove_dir_all(lab.server_dir())?;

    let found = lab
        .instance(&driver)
        .await?
        .context("the orphan is not listed")?;
    assert_eq!(found.pid, Some(pid));
    assert!(!found.has_directory);
    driver.remove(&lab.network_uid).await?;
    assert!(!is_alive(pid), "the orphan survived remove");
    Ok(())
}

#[tokio::test]
async fn a_stale_pid_file_is_never_signalled() -> Result<()> {
    let lab = Lab::new()?;
    let driver = lab.driver()?;
    // A process that is not dnsmasq, named by a pid file left behind.
    let mut bystander = tokio::process::Command::new("sleep")
        .arg("30")
        .kill_on_drop(true)
        .spawn()?;
    let bystander_pid = bystander.id().context("sleep has a pid")?;
    std::fs::create_dir_all(lab.server_dir())?;
    std::fs::write(lab.server_dir().join("pid"), format!("{bystander_pid}\n"))?;

    assert_eq!(lab.instance(&driver).await?.and_then(|i| i.pid), None);
    assert_eq!(driver.ensure(&lab.server()).await?, Change::Start);
    driver.remove(&lab.network_uid).await?;
    assert!(
        is_alive(bystander_pid),
        "a process named by a stale pid file was killed"
    );
    bystander.kill().await?;
    Ok(())
}

/// The driver refuses to start a server whose files it could not reload later.
#[tokio::test]
async fn a_state_directory_dnsmasq_cannot_search_is_refused() -> Result<()> {
    let lab = Lab::new()?;
    let hidden = lab.state.path().join("private");
    std::fs::create_dir(&hidden)?;
    std::fs::set_permissions(&hidden, std::fs::Permissions::from_mode(0o700))?;
    let driver = DnsmasqDhcp::new(&hidden)?;
    let error = driver.ensure(&lab.server()).await.unwrap_err();
    assert!(
        matches!(&error, ferro_agent::dhcp::DhcpError::StateDirNotSearchable(p) if p == Path::new(&hidden)),
        "{error}"
    );
    assert!(dnsmasq_pids_mentioning(&hidden.display().to_string()).is_empty());
    Ok(())
}

#[tokio::test]
async fn a_subnet_without_a_gateway_gets_no_router_and_the_server_for_dns() -> Result<()> {
    let lab = Lab::new()?;
    let driver = lab.driver()?;
    let mut server = lab.server();
    let subnet = &mut server.subnets[0];
    subnet.gateway = None;
    subnet.dns_servers.clear();
    subnet.host_routes.clear();
    driver.ensure(&server).await?;

    let lease = lab.expect_lease().await?;
    assert_eq!(lease["ip"], "10.77.1.5");
    // dnsmasq would otherwise offer itself as the router.
    assert_eq!(lease["router"], "");
    // It answers for the network's hostnames.
    assert_eq!(lease["dns"], "10.77.1.2");
    Ok(())
}

#[tokio::test]
async fn a_server_that_cannot_start_says_why() -> Result<()> {
    let lab = Lab::new()?;
    let driver = lab.driver()?;
    let mut server = lab.server();
    server.interface = "nosuch0".into();
    match driver.ensure(&server).await {
        Err(ferro_agent::dhcp::DhcpError::StartFailed { stderr, .. }) => {
            assert!(stderr.contains("nosuch0"), "{stderr}")
        }
        other => bail!("expected StartFailed, got {other:?}"),
    }
    let mut server = lab.server();
    server.namespace = format!("{}-gone", lab.qdhcp);
    assert!(matches!(
        driver.ensure(&server).await,
        Err(ferro_agent::dhcp::DhcpError::NoNamespace(_))
    ));
    Ok(())
}

/// No DHCPv6 client here may run (busybox has no udhcpc6; dhclient rewrites /etc), so this
/// shows only that dnsmasq takes an IPv6 range and bracketed hosts, and that the IPv4
/// guest of a dual-stack network is still served.
#[tokio::test]
async fn a_dual_stack_server_starts_and_serves_ipv4() -> Result<()> {
    let lab = Lab::new()?;
    run(
        "ip",
        &[
            "-n",
            &lab.qdhcp,
            "addr",
            "add",
            "2001:db8:77::2/64",
            "dev",
            "dhcp0",
            "nodad",
        ],
    )?;
    let driver = lab.driver()?;
    let mut server = lab.server();
    server.subnets.push(DhcpSubnet {
        cidr: "2001:db8:77::/64".parse().unwrap(),
        gateway: Some("2001:db8:77::1".parse().unwrap()),
        dns_servers: vec!["2001:db8::53".parse().unwrap()],
        host_routes: vec![],
        lease_time: DEFAULT_LEASE_TIME,
    });
    server.hosts.push(DhcpHost {
        mac: GUEST_MAC.into(),
        ip: "2001:db8:77::5".parse().unwrap(),
        hostname: "web-1".into(),
    });
    assert_eq!(driver.ensure(&server).await?, Change::Start);
    assert_eq!(lab.expect_lease().await?["ip"], "10.77.1.5");
    let log = std::fs::read_to_string(lab.server_dir().join("dnsmasq.log"))?;
    assert!(
        log.contains("DHCPv6, static leases only on 2001:db8:77::"),
        "{log}"
    );
    assert!(!log.contains("bad "), "dnsmasq rejected a line:\n{log}");
    Ok(())
}

/// A deleted Port's address handed to a new Port: the old lease must not keep the new
/// guest waiting until it expires.
#[tokio::test]
async fn an_address_moved_to_a_new_mac_is_served_at_once() -> Result<()> {
    let lab = Lab::new()?;
    let driver = lab.driver()?;
    driver.ensure(&lab.server()).await?;
    assert_eq!(lab.expect_lease().await?["ip"], "10.77.1.5");

    let mut server = lab.server();
    server.hosts[0].mac = STRANGER_MAC.into();
    server.hosts[0].hostname = "web-2".into();
    assert_eq!(driver.ensure(&server).await?, Change::Restart);
    lab.set_client_mac(STRANGER_MAC)?;
    let lease = lab.expect_lease().await?;
    assert_eq!(
        (lease["ip"].as_str(), lease["hostname"].as_str()),
        ("10.77.1.5", "web-2")
    );
    assert_eq!(driver.ensure(&server).await?, Change::Nothing);
    Ok(())
}
