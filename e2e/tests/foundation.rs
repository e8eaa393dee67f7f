//! The foundation end to end: `ferro up` with a real etcd, manifests applied through the
//! CLI, objects visible in etcd, and a supervisor killed with SIGKILL that comes back with
//! every object and without strays of its first life.

use std::path::Path;
use std::time::Duration;

use ferro_e2e::Cloud;

/// A small stack of our own, so the test means something whatever `manifests/` holds.
const STACK: &str = r#"
apiVersion: ferro/v1
kind: Network
metadata:
  name: e2e-net
spec:
  subnets:
  - name: main
    cidr: 10.77.0.0/24
---
apiVersion: ferro/v1
kind: Server
metadata:
  name: e2e-web
  labels:
    app: web
spec:
  flavor: m1.tiny
  image: cirros
  networks:
  - network: e2e-net
"#;

fn manifests_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests")
}

fn has_manifests(dir: &Path) -> bool {
    fn walk(dir: &Path) -> bool {
        std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| {
                let p = e.path();
                if p.is_dir() {
                    walk(&p)
                } else {
                    matches!(
                        p.extension().and_then(|x| x.to_str()),
                        Some("yaml" | "yml" | "json")
                    )
                }
            })
    }
    walk(dir)
}

/// `kind/name` lines of `ferro apply` output → store keys' last parts (`…/name`).
fn applied_names(output: &str) -> Vec<String> {
    output
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter_map(|label| label.split_once('/').map(|(_, name)| name.to_owned()))
        .collect()
}

#[test]
fn objects_survive_a_supervisor_killed_with_sigkill() -> anyhow::Result<()> {
    let mut cloud = Cloud::start()?;
    let stack = cloud.data_dir().join("../stack.yaml");
    std::fs::write(&stack, STACK)?;

    let mut applied = cloud.run(["apply", "-f", stack.to_str().unwrap()])?;
    assert!(applied.contains("network/e2e-net created"), "{applied}");
    assert!(applied.contains("server/e2e-web created"), "{applied}");
    let manifests = manifests_dir();
    if has_manifests(&manifests) {
        let out = cloud.run(["apply", "-f", manifests.to_str().unwrap()])?;
        assert!(
            !out.trim().is_empty(),
            "applying manifests/ printed nothing"
        );
        applied.push_str(&out);
    }

    // Every object, and the seeds, are keys in etcd, protobuf-valued, under /ferro/.
    let keys = cloud.etcdctl(["get", "--prefix", "/ferro/", "--keys-only"])?;
    let keys: Vec<&str> = keys.lines().filter(|l| !l.is_empty()).collect();
    for expected in [
        "/ferro/projects/default",
        "/ferro/flavors/m1.tiny",
        "/ferro/flavors/m1.large",
        "/ferro/networks/default/e2e-net",
        "/ferro/servers/default/e2e-web",
    ] {
        assert!(keys.contains(&expected), "{expected} not in etcd: {keys:?}");
    }
    for name in applied_names(&applied) {
        assert!(
            keys.iter().any(|k| k.ends_with(&format!("/{name}"))),
            "{name} not in etcd: {keys:?}"
        );
    }

    // The first life's children.
    let first_life = cloud.processes();
    assert!(
        first_life
            .iter()
            .any(|(_, cmd)| cmd.contains(" apiserver ")),
        "no apiserver: {first_life:?}"
    );
    assert!(
        first_life
            .iter()
            .any(|(_, cmd)| cmd.starts_with("/usr/bin/etcd ") || cmd.starts_with("etcd ")),
        "no etcd: {first_life:?}"
    );
    let supervisor = cloud.supervisor_pid().expect("running");

    cloud.kill_supervisor()?;
    cloud.launch()?;

    // Nothing of the first life survives: every process naming the data directory now
    // is new.
    let second_life = cloud.processes();
    for (pid, cmd) in &first_life {
        if *pid == supervisor {
            continue;
        }
        assert!(
            !second_life.iter().any(|(p, c)| p == pid && c == cmd),
            "{pid} ({cmd}) survived the supervisor's SIGKILL and restart; now: {second_life:?}"
        );
    }
    let etcds = second_life
        .iter()
        .filter(|(_, c)| c.starts_with("/usr/bin/etcd ") || c.starts_with("etcd "))
        .count();
    let apiservers = second_life
        .iter()
        .filter(|(_, c)| c.contains(" apiserver "))
        .count();
    assert_eq!((etcds, apiservers), (1, 1), "{second_life:?}");

    // Objects are intact, and applying the same manifests again changes nothing.
    let servers = cloud.run(["get", "servers"])?;
    assert!(servers.contains("e2e-web"), "{servers}");
    let again = cloud.run(["apply", "-f", stack.to_str().unwrap()])?;
    assert_eq!(
        again, "network/e2e-net unchanged\nserver/e2e-web unchanged\n",
        "after the restart"
    );
    let keys_after = cloud.etcdctl(["get", "--prefix", "/ferro/", "--keys-only"])?;
    for key in keys {
        assert!(
            keys_after.lines().any(|k| k == key),
            "{key} lost in the restart"
        );
    }
    Ok(())
}

#[test]
fn a_crashed_apiserver_is_restarted() -> anyhow::Result<()> {
    let cloud = Cloud::start()?;
    let apiserver = cloud
        .processes()
        .into_iter()
        .find(|(_, cmd)| cmd.contains(" apiserver "))
        .map(|(pid, _)| pid)
        .expect("an apiserver runs");
    ferro_e2e::signal(apiserver, ferro_e2e::Signal::KILL);

    // The supervisor notices and starts another; the CLI works again.
    let begin = std::time::Instant::now();
    loop {
        let restarted = cloud
            .processes()
            .into_iter()
            .any(|(pid, cmd)| pid != apiserver && cmd.contains(" apiserver "));
        if restarted && cloud.ferro(["get", "flavors"]).output()?.status.success() {
            break;
        }
        assert!(
            begin.elapsed() < ferro_e2e::READY_TIMEOUT,
            "apiserver not back; output:\n{}",
            cloud.up_output()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        cloud.up_output().contains("apiserver exited"),
        "{}",
        cloud.up_output()
    );
    Ok(())
}

#[test]
fn down_purge_stops_everything_and_removes_the_data() -> anyhow::Result<()> {
    let mut cloud = Cloud::start()?;
    let data_dir = cloud.data_dir().to_path_buf();
    cloud.run(["down", "--data-dir", data_dir.to_str().unwrap(), "--purge"])?;
    assert!(
        cloud.wait_supervisor_exit(Duration::from_secs(60))?,
        "ferro up did not exit 0"
    );
    let left = cloud.wait_no_processes(Duration::from_secs(30));
    assert!(left.is_empty(), "left running: {left:?}");
    assert!(!data_dir.exists(), "{} not removed", data_dir.display());
    Ok(())
}
