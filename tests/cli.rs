//! The CLI as a user meets it: `ferro up --store memory` in the background, and `apply`,
//! `get`, `delete` against it — the happy paths, and every way input can be wrong, each
//! with one readable message, a non-zero exit and nothing written.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use assert_cmd::assert::Assert;
use rustix::process::{Pid, Signal};

/// How long `ferro up` may take to serve; generous for loaded machines.
const READY_TIMEOUT: Duration = Duration::from_secs(120);

const STACK: &str = r#"apiVersion: ferro/v1
kind: Network
metadata:
  name: app-net
spec:
  subnets:
  - name: main
    cidr: 10.0.1.0/24
---
apiVersion: ferro/v1
kind: SecurityGroup
metadata:
  name: web
spec:
  rules:
  - direction: Ingress
    protocol: TCP
    portRangeMin: 80
    portRangeMax: 80
    remoteCidr: 0.0.0.0/0
---
apiVersion: ferro/v1
kind: Server
metadata:
  name: web-1
  labels:
    app: web
spec:
  flavor: m1.small
  image: debian-12
  networks:
  - network: app-net
  securityGroups: [web]
"#;

fn ferro_bin() -> &'static str {
    env!("CARGO_BIN_EXE_ferro")
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// A `ferro up --store memory` of this test's own, stopped on drop. Its CLI config is its
/// own file (through `FERRO_CONFIG`), or one shared with other clouds of the same test,
/// whose context for this cloud its CLI then names.
struct Cloud {
    dir: tempfile::TempDir,
    api_addr: String,
    up: Option<Child>,
    /// The CLI config `ferro up` writes this cloud's context into.
    config: PathBuf,
    /// The data directory's name, under `dir`.
    data_name: String,
    /// The context the CLI names, when the config is shared.
    context: Option<String>,
    /// How many times `ferro up` was started here (its log is appended to).
    launches: usize,
}

impl Cloud {
    fn start() -> Cloud {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let config = dir.path().join("config.yaml");
        Cloud::start_with(dir, config, "data", None, &[])
    }

    /// A cloud whose `ferro up --data-dir …/NAME` writes its context, `ferro-NAME`, into
    /// `config`, which other clouds share.
    fn start_sharing(config: &Path, data_name: &str, extra_args: &[&str]) -> Cloud {
        let dir = tempfile::tempdir().expect("a temporary directory");
        Cloud::start_with(
            dir,
            config.to_owned(),
            data_name,
            Some(format!("ferro-{data_name}")),
            extra_args,
        )
    }

    fn start_with(
        dir: tempfile::TempDir,
        config: PathBuf,
        data_name: &str,
        context: Option<String>,
        extra_args: &[&str],
    ) -> Cloud {
        let mut cloud = Cloud {
            dir,
            api_addr: String::new(),
            up: None,
            config,
            data_name: data_name.to_owned(),
            context,
            launches: 0,
        };
        cloud.launch(extra_args);
        cloud
    }

    /// Starts `ferro up` on this cloud's data directory (again), on a new port.
    fn launch(&mut self, extra_args: &[&str]) {
        assert!(self.up.is_none(), "ferro up is already running");
        self.api_addr = format!("127.0.0.1:{}", free_port());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("up.log"))
            .unwrap();
        let up = Command::new(ferro_bin())
            .args([
                "up",
                "--store",
                "memory",
                "--api-addr",
                &self.api_addr,
                "--data-dir",
            ])
            .arg(self.data_dir())
            .args(extra_args)
            .env("FERRO_CONFIG", &self.config)
            .env_remove("FERRO_SERVER")
            .env_remove("FERRO_TOKEN")
            .env_remove("FERRO_CONTEXT")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("ferro up starts");
        self.up = Some(up);
        self.launches += 1;
        self.wait_ready();
    }

    fn wait_ready(&mut self) {
        let begin = Instant::now();
        loop {
            if let Some(status) = self.up.as_mut().unwrap().try_wait().unwrap() {
                self.up = None;
                panic!("ferro up exited ({status}):\n{}", self.log());
            }
            // The config is written once the seeds are in, and says so in the log.
            if self.log().matches("Ferro is up.").count() >= self.launches
                && self
                    .ferro()
                    .args(["get", "flavor", "m1.tiny"])
                    .output()
                    .unwrap()
                    .status
                    .success()
            {
                return;
            }
            assert!(
                begin.elapsed() < READY_TIMEOUT,
                "ferro up not ready:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops `ferro up` (SIGTERM) and waits until it exits.
    fn stop(&mut self) {
        let Some(mut up) = self.up.take() else { return };
        if let Some(pid) = i32::try_from(up.id()).ok().and_then(Pid::from_raw) {
            let _ = rustix::process::kill_process(pid, Signal::TERM);
        }
        let begin = Instant::now();
        while matches!(up.try_wait(), Ok(None)) && begin.elapsed() < Duration::from_secs(30) {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = up.kill();
        let _ = up.wait();
        // What outlives `ferro up` by design (the agent's DHCP servers, taps and their
        // namespaces, guests) goes with `ferro down`, as it does for a user.
        let _ = std::process::Command::new(ferro_bin())
            .args(["down", "--data-dir"])
            .arg(self.data_dir())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    }

    fn config(&self) -> PathBuf {
        self.config.clone()
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join(&self.data_name)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("up.log")).unwrap_or_default()
    }

    /// The CLI, configured by the config `ferro up` wrote (this cloud's context of it).
    fn ferro(&self) -> assert_cmd::Command {
        let mut command = cli(&self.config);
        if let Some(context) = &self.context {
            command.env("FERRO_CONTEXT", context);
        }
        command
    }

    /// Waits until `get KIND NAME` says the object is not found.
    fn wait_until_gone(&self, kind: &str, name: &str) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            let out = self.run(&["get", kind, name]).get_output().clone();
            if !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("not found") {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{kind}/{name} is still there"
            );
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    }

    fn run(&self, args: &[&str]) -> Assert {
        self.ferro().args(args).assert()
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).unwrap();
        }
        std::fs::write(&path, text).unwrap();
        path
    }
}

impl Drop for Cloud {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The CLI with this config file and nothing from the environment that would override it.
fn cli(config: &Path) -> assert_cmd::Command {
    let mut command = assert_cmd::Command::new(ferro_bin());
    command
        .env("FERRO_CONFIG", config)
        .env_remove("FERRO_SERVER")
        .env_remove("FERRO_TOKEN")
        .env_remove("FERRO_CONTEXT")
        .timeout(Duration::from_secs(60));
    command
}

fn stdout(assert: &Assert) -> String {
    String::from_utf8_lossy(&assert.get_output().stdout).into_owned()
}

fn stderr(assert: &Assert) -> String {
    String::from_utf8_lossy(&assert.get_output().stderr).into_owned()
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn apply_get_delete() {
    let cloud = Cloud::start();
    let stack = cloud.write("stack.yaml", STACK);

    let out = cloud.run(&["apply", "-f", path(&stack)]).success();
    assert_eq!(
        stdout(&out),
        "network/app-net created\nsecuritygroup/web created\nserver/web-1 created\n"
    );
    // Applying again writes nothing.
    let out = cloud.run(&["apply", "-f", path(&stack)]).success();
    assert_eq!(
        stdout(&out),
        "network/app-net unchanged\nsecuritygroup/web unchanged\nserver/web-1 unchanged\n"
    );
    // A change is `configured`.
    let changed = cloud.write("changed.yaml", &STACK.replace("m1.small", "m1.medium"));
    let out = cloud.run(&["apply", "-f", path(&changed)]).success();
    assert!(
        stdout(&out).contains("server/web-1 configured"),
        "{}",
        stdout(&out)
    );

    // Every spelling of a kind works; the table has the kind's columns.
    for kind in ["server", "servers", "srv", "Server"] {
        let out = cloud.run(&["get", kind]).success();
        let text = stdout(&out);
        let mut lines = text.lines();
        let header: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
        assert_eq!(
            header,
            ["NAME", "STATUS", "NODE", "FLAVOR", "IMAGE", "AGE"],
            "{text}"
        );
        let row: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
        assert_eq!(&row[..1], ["web-1"], "{text}");
        assert!(
            row.contains(&"m1.medium") && row.contains(&"debian-12"),
            "{text}"
        );
    }
    let out = cloud.run(&["get", "net"]).success();
    let text = stdout(&out);
    let mut lines = text.lines();
    let header: Vec<&str> = lines
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(
        header,
        ["NAME", "SUBNETS", "SEGMENT", "READY", "AGE"],
        "{text}"
    );
    let row: Vec<&str> = lines
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(&row[..2], ["app-net", "10.0.1.0/24"], "{text}");
    let out = cloud.run(&["get", "sg", "web"]).success();
    assert!(stdout(&out).contains("web "), "{}", stdout(&out));
    let out = cloud.run(&["get", "srv", "-o", "wide"]).success();
    assert!(
        stdout(&out).lines().next().unwrap().contains("ADDRESSES"),
        "{}",
        stdout(&out)
    );
    let out = cloud.run(&["get", "srv", "-A"]).success();
    assert!(
        stdout(&out).starts_with("PROJECT   NAME"),
        "{}",
        stdout(&out)
    );
    assert!(stdout(&out).contains("default   web-1"), "{}", stdout(&out));

    // The seeds: the default project and the m1 flavors.
    let out = cloud.run(&["get", "flavors"]).success();
    let text = stdout(&out);
    let rows: Vec<Vec<&str>> = text
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    for row in [
        ["m1.tiny", "1", "512Mi", "1Gi"],
        ["m1.small", "1", "2Gi", "20Gi"],
        ["m1.medium", "2", "4Gi", "40Gi"],
        ["m1.large", "4", "8Gi", "80Gi"],
    ] {
        assert!(rows.iter().any(|r| r[..4] == row), "{row:?} not in\n{text}");
    }
    cloud.run(&["get", "project", "default"]).success();

    // Selectors.
    let out = cloud.run(&["get", "srv", "-l", "app=web"]).success();
    assert!(stdout(&out).contains("web-1"));
    let out = cloud.run(&["get", "srv", "-l", "app=db"]).success();
    assert_eq!(stdout(&out), "");
    assert!(
        stderr(&out).contains("No servers found in project default"),
        "{}",
        stderr(&out)
    );
    let out = cloud
        .run(&["get", "srv", "--field-selector", "metadata.name=web-1"])
        .success();
    assert!(stdout(&out).contains("web-1"));

    // JSON and YAML carry the object.
    let out = cloud.run(&["get", "srv", "web-1", "-o", "json"]).success();
    assert!(
        stdout(&out).contains("\"name\": \"web-1\""),
        "{}",
        stdout(&out)
    );
    let out = cloud.run(&["get", "srv", "web-1", "-o", "yaml"]).success();
    assert!(
        stdout(&out).contains("flavor: m1.medium"),
        "{}",
        stdout(&out)
    );

    // Delete by name, then by manifest; a missing object is an error naming it.
    let out = cloud.run(&["delete", "server", "web-1"]).success();
    // Gone at once, or once the node's agent it was placed on has cleaned up.
    assert!(
        [
            "server/web-1 deleted\n",
            "server/web-1 deletion requested (waiting for finalizers: ferro.io/agent)\n"
        ]
        .contains(&stdout(&out).as_str()),
        "{}",
        stdout(&out)
    );
    cloud.wait_until_gone("server", "web-1");
    let out = cloud.run(&["get", "srv", "web-1"]).failure();
    assert_eq!(stderr(&out), "error: servers/web-1 not found\n");
    let out = cloud.run(&["delete", "srv", "web-1"]).failure();
    assert_eq!(stderr(&out), "error: servers/web-1 not found\n");
    cloud
        .run(&["delete", "srv", "web-1", "--ignore-not-found"])
        .success();
    let out = cloud
        .run(&["delete", "-f", path(&stack), "--ignore-not-found"])
        .success();
    // The network controller's finalizer may hold the Network for a moment.
    let text = stdout(&out);
    assert!(
        text == "network/app-net deleted\nsecuritygroup/web deleted\n"
            || text
                == "network/app-net deletion requested (waiting for finalizers: ferro.io/network-in-use)\n\
                    securitygroup/web deleted\n",
        "{text}"
    );
    cloud.wait_until_gone("network", "app-net");
    let out = cloud.run(&["get", "networks"]).success();
    assert_eq!(stdout(&out), "");
}

#[test]
fn get_output_applies_back_unchanged() {
    let cloud = Cloud::start();
    let stack = cloud.write("stack.yaml", STACK);
    cloud.run(&["apply", "-f", path(&stack)]).success();

    for (kind, name, label) in [
        ("srv", "web-1", "server/web-1"),
        ("net", "app-net", "network/app-net"),
        ("sg", "web", "securitygroup/web"),
    ] {
        let yaml = stdout(&cloud.run(&["get", kind, name, "-o", "yaml"]).success());
        let out = cloud
            .ferro()
            .args(["apply", "-f", "-"])
            .write_stdin(yaml)
            .assert()
            .success();
        assert_eq!(stdout(&out), format!("{label} unchanged\n"));
    }
    // A list in YAML (documents separated by `---`) and in JSON (`kind: List`). The
    // flavors were seeded by another manager (`ferro-up`); the first apply as `ferro-cli`
    // may record that manager, after which nothing changes.
    let yaml = stdout(&cloud.run(&["get", "flavors", "-o", "yaml"]).success());
    assert_eq!(yaml.matches("\n---\n").count(), 3, "{yaml}");
    cloud
        .ferro()
        .args(["apply", "-f", "-"])
        .write_stdin(yaml.clone())
        .assert()
        .success();
    let out = cloud
        .ferro()
        .args(["apply", "-f", "-"])
        .write_stdin(yaml)
        .assert()
        .success();
    assert_eq!(
        stdout(&out).matches(" unchanged\n").count(),
        4,
        "{}",
        stdout(&out)
    );
    let json = stdout(&cloud.run(&["get", "flavors", "-o", "json"]).success());
    let out = cloud
        .ferro()
        .args(["apply", "-f", "-"])
        .write_stdin(json)
        .assert()
        .success();
    assert_eq!(
        stdout(&out).matches(" unchanged\n").count(),
        4,
        "{}",
        stdout(&out)
    );
    let json = stdout(&cloud.run(&["get", "srv", "-o", "json"]).success());
    let out = cloud
        .ferro()
        .args(["apply", "-f", "-"])
        .write_stdin(json)
        .assert()
        .success();
    assert_eq!(stdout(&out), "server/web-1 unchanged\n");
}

#[test]
fn dry_run_and_directories() {
    let cloud = Cloud::start();
    cloud.write("dir/b/server.yml", STACK.split("---\n").nth(2).unwrap());
    cloud.write("dir/a-network.yaml", STACK.split("---\n").next().unwrap());
    cloud.write("dir/notes.txt", "not a manifest");
    let dir = cloud.dir.path().join("dir");

    let out = cloud
        .run(&["apply", "-f", path(&dir), "--dry-run"])
        .success();
    assert_eq!(
        stdout(&out),
        "network/app-net created (dry run)\nserver/web-1 created (dry run)\n"
    );
    let out = cloud.run(&["get", "srv"]).success();
    assert_eq!(stdout(&out), "", "a dry run wrote");

    // Directories are read recursively, in sorted order.
    let out = cloud.run(&["apply", "-f", path(&dir)]).success();
    assert_eq!(
        stdout(&out),
        "network/app-net created\nserver/web-1 created\n"
    );
}

/// Applies `text` and expects a failure whose stderr contains each of `expected`, and
/// that nothing was written.
fn refused(cloud: &Cloud, name: &str, text: &str, expected: &[&str]) -> String {
    let file = cloud.write(name, text);
    let out = cloud.run(&["apply", "-f", path(&file)]).failure();
    let err = stderr(&out);
    for e in expected {
        assert!(err.contains(e), "`{e}` not in:\n{err}");
    }
    assert_eq!(stdout(&out), "", "something was applied");
    for line in err.lines() {
        assert!(
            line.starts_with("error: "),
            "not one error per line:\n{err}"
        );
    }
    err
}

#[test]
fn bad_manifests_are_refused_with_their_place_and_nothing_is_written() {
    let cloud = Cloud::start();
    let server = |spec: &str| {
        format!("apiVersion: ferro/v1\nkind: Server\nmetadata:\n  name: web-2\nspec:\n{spec}")
    };

    // Unknown field, with a suggestion.
    let err = refused(
        &cloud,
        "unknown.yaml",
        &server("  flavour: m1.small\n"),
        &["unknown.yaml:6:12: servers/web-2: spec.flavour: unknown field; did you mean `flavor`?"],
    );
    assert_eq!(err.lines().count(), 1, "{err}");
    // Mistyped field.
    refused(
        &cloud,
        "mistyped.yaml",
        "apiVersion: ferro/v1\nkind: Flavor\nmetadata:\n  name: f1\nspec:\n  vcpus: two\n",
        &["mistyped.yaml:6:10: flavors/f1: spec.vcpus: expected an integer, found a string"],
    );
    // Bad enum value, with the right spelling.
    refused(
        &cloud,
        "enum.yaml",
        "apiVersion: ferro/v1\nkind: SecurityGroup\nmetadata:\n  name: sg\nspec:\n  rules:\n  - direction: Ingress\n    protocol: tcp\n",
        &[
            "enum.yaml:8:15: securitygroups/sg: spec.rules[0].protocol: `tcp` is not one of",
            "(spelled `TCP`)",
        ],
    );
    // YAML syntax error, with line and column.
    refused(
        &cloud,
        "syntax.yaml",
        "apiVersion: ferro/v1\nkind: Server\nmetadata:\n  name: [x\n",
        &["syntax.yaml:4:"],
    );
    // A value validation refuses, pointing at the field.
    refused(
        &cloud,
        "cidr.yaml",
        "apiVersion: ferro/v1\nkind: Network\nmetadata:\n  name: n\nspec:\n  subnets:\n  - name: a\n    cidr: 10.0.0.0/33\n",
        &["cidr.yaml:8:11: networks/n: spec.subnets[0].cidr:"],
    );
    // Unknown kind.
    refused(
        &cloud,
        "kind.yaml",
        "apiVersion: ferro/v1\nkind: Sever\nmetadata:\n  name: x\n",
        &["kind.yaml:2:7: kind: unknown kind `Sever`"],
    );

    // One bad document among good ones: every problem is reported, nothing is written.
    let mixed = format!("{STACK}---\n{}", server("  flavour: m1.small\n"));
    refused(
        &cloud,
        "mixed.yaml",
        &mixed,
        &["mixed.yaml:40:12: servers/web-2: spec.flavour"],
    );
    for (kind, name) in [("net", "app-net"), ("sg", "web"), ("srv", "web-1")] {
        let out = cloud.run(&["get", kind, name]).failure();
        assert!(stderr(&out).contains("not found"), "{}", stderr(&out));
    }
    // The same across files: a bad file keeps the good one from being applied.
    let good = cloud.write("two/a.yaml", STACK);
    cloud.write("two/b.yaml", &server("  image: [\n"));
    let out = cloud
        .run(&["apply", "-f", path(good.parent().unwrap())])
        .failure();
    assert!(stderr(&out).contains("two/b.yaml:"), "{}", stderr(&out));
    cloud.run(&["get", "srv", "web-1"]).failure();

    // Unknown kinds on the command line, and missing files.
    let out = cloud.run(&["get", "sever"]).failure();
    assert_eq!(stderr(&out).lines().count(), 1);
    assert!(
        stderr(&out).starts_with("error: unknown kind `sever`; known kinds: servers,"),
        "{}",
        stderr(&out)
    );
    let out = cloud.run(&["apply", "-f", "/nonexistent.yaml"]).failure();
    assert!(
        stderr(&out).starts_with("error: /nonexistent.yaml: "),
        "{}",
        stderr(&out)
    );
}

#[test]
fn credentials_and_reachability_errors_are_one_clear_line() {
    let cloud = Cloud::start();

    // Wrong token.
    let out = cloud
        .run(&["get", "flavors", "--token", "not-a-token"])
        .failure();
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("refused the token") && err.contains("invalid token"),
        "{err}"
    );
    // FERRO_TOKEN too.
    let out = cloud
        .ferro()
        .env("FERRO_TOKEN", "nope")
        .args(["get", "flavors"])
        .assert()
        .failure();
    assert!(stderr(&out).contains("invalid token"), "{}", stderr(&out));

    // No token anywhere.
    let out = assert_cmd::Command::new(ferro_bin())
        .env("FERRO_CONFIG", cloud.dir.path().join("missing.yaml"))
        .env_remove("FERRO_TOKEN")
        .env_remove("FERRO_SERVER")
        .args(["--server", &cloud.api_addr, "get", "flavors"])
        .assert()
        .failure();
    let err = stderr(&out);
    assert!(
        err.starts_with("error: no token: pass --token or set FERRO_TOKEN"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");

    // Nothing listening.
    let port = free_port();
    let out = cloud
        .run(&["get", "flavors", "--server", &format!("127.0.0.1:{port}")])
        .failure();
    assert_eq!(
        stderr(&out),
        format!(
            "error: cannot reach the apiserver at 127.0.0.1:{port}: connection refused (is `ferro up` running?)\n"
        )
    );
    let stack = cloud.write("stack.yaml", STACK);
    let out = cloud
        .ferro()
        .env("FERRO_SERVER", format!("127.0.0.1:{port}"))
        .args(["apply", "-f", path(&stack)])
        .assert()
        .failure();
    assert_eq!(
        stderr(&out),
        format!(
            "error: cannot reach the apiserver at 127.0.0.1:{port}: connection refused (is `ferro up` running?)\n\
             0 of 3 objects applied; re-run to continue\n"
        ),
        "stops at the first unreachable call, at once, and says how far it got"
    );
}

/// `ferro apiserver` alone on a fixed port over a real etcd, so that it can be killed and
/// started again under a running command.
struct LoneApiserver {
    listen: String,
    store: String,
    tokens: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl LoneApiserver {
    fn start(dir: &Path, store: &str) -> LoneApiserver {
        let tokens = dir.join("tokens");
        std::fs::write(&tokens, "admin-token admin\nnode-token system:node:n1\n").unwrap();
        let mut apiserver = LoneApiserver {
            listen: format!("127.0.0.1:{}", free_port()),
            store: store.to_owned(),
            tokens,
            log: dir.join("apiserver.log"),
            child: None,
        };
        apiserver.spawn();
        apiserver
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(ferro_bin())
            .args([
                "apiserver",
                "--listen",
                &self.listen,
                "--store",
                &self.store,
            ])
            .arg("--token-file")
            .arg(&self.tokens)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("ferro apiserver starts");
        self.child = Some(child);
        let begin = Instant::now();
        while std::net::TcpStream::connect(&self.listen).is_err() {
            assert!(
                begin.elapsed() < READY_TIMEOUT,
                "the apiserver does not listen:\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn ferro(&self) -> Command {
        let mut command = Command::new(ferro_bin());
        command
            .env("FERRO_SERVER", &self.listen)
            .env("FERRO_TOKEN", "admin-token")
            .env("FERRO_CONFIG", "/nonexistent/ferro-config.yaml");
        command
    }
}

impl Drop for LoneApiserver {
    fn drop(&mut self) {
        self.kill();
    }
}

#[test]
fn an_apply_rides_out_an_apiserver_restart() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let etcd = runtime
        .block_on(ferro_store::etcd_process::EtcdProcess::start(
            ferro_store::etcd_process::EtcdOptions::throwaway(),
        ))
        .expect("etcd starts");
    let store = format!("etcd://127.0.0.1:{}", etcd.client_port());
    let mut apiserver = LoneApiserver::start(dir.path(), &store);

    const OBJECTS: usize = 200;
    let manifest: String = (0..OBJECTS)
        .map(|i| {
            format!(
                "apiVersion: ferro/v1\nkind: Flavor\nmetadata:\n  name: f-{i:03}\nspec:\n  vcpus: 1\n  ramMib: 512\n  diskGib: 1\n---\n"
            )
        })
        .collect();
    let file = dir.path().join("flavors.yaml");
    std::fs::write(&file, manifest).unwrap();

    let mut apply = apiserver
        .ferro()
        .args(["apply", "-f", path(&file)])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr_pipe = apply.stderr.take().unwrap();
    let errors = std::thread::spawn(move || {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::io::BufReader::new(stderr_pipe), &mut text)
            .unwrap();
        text
    });
    let mut lines = std::io::BufReader::new(apply.stdout.take().unwrap()).lines();
    let mut applied = Vec::new();
    // A few objects in, the apiserver dies; it is back a second later on the same port.
    for line in lines.by_ref().take(10) {
        applied.push(line.unwrap());
    }
    apiserver.kill();
    std::thread::sleep(Duration::from_secs(1));
    apiserver.spawn();
    applied.extend(lines.map(Result::unwrap));
    let status = apply.wait().unwrap();
    let errors = errors.join().unwrap();

    assert!(status.success(), "apply failed:\n{errors}");
    assert_eq!(
        errors, "apiserver unavailable, retrying…\n",
        "one retry line"
    );
    assert_eq!(applied.len(), OBJECTS, "{applied:?}");
    let listed = apiserver.ferro().args(["get", "flavors"]).output().unwrap();
    let table = String::from_utf8_lossy(&listed.stdout);
    assert_eq!(
        table.lines().filter(|l| l.starts_with("f-")).count(),
        OBJECTS,
        "{table}"
    );
}

#[test]
fn up_owns_its_data_directory_and_down_stops_it() {
    let mut cloud = Cloud::start();
    let data = cloud.data_dir();

    // A second `ferro up` on the same directory is refused, naming the owner.
    let pid = cloud.up.as_ref().unwrap().id();
    let out = assert_cmd::Command::new(ferro_bin())
        .env("FERRO_CONFIG", cloud.dir.path().join("other.yaml"))
        .args(["up", "--store", "memory", "--api-addr"])
        .arg(format!("127.0.0.1:{}", free_port()))
        .arg("--data-dir")
        .arg(&data)
        .timeout(Duration::from_secs(60))
        .assert()
        .failure();
    let err = stderr(&out);
    assert!(
        err.contains(&format!("another `ferro up` (pid {pid}) owns")),
        "{err}"
    );

    // Tokens were minted for every identity, readable only by their owner.
    let tokens = std::fs::read_to_string(data.join("tokens")).unwrap();
    for identity in [" admin\n", " system:controllers\n", " system:node:"] {
        assert!(tokens.contains(identity), "{identity} missing:\n{tokens}");
    }
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(data.join("tokens"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);

    // `ferro down` stops it; it exits 0 and its apiserver is gone.
    let out = cloud.run(&["down", "--data-dir", path(&data)]).success();
    assert!(
        stdout(&out).contains(&format!("stopping ferro up (pid {pid})")),
        "{}",
        stdout(&out)
    );
    let mut up = cloud.up.take().unwrap();
    let status = up.wait().unwrap();
    assert!(
        status.success(),
        "ferro up exited with {status}:\n{}",
        cloud.log()
    );
    let out = cloud.run(&["get", "flavors"]).failure();
    assert!(
        stderr(&out).contains("cannot reach the apiserver"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn the_example_manifests_apply_get_and_delete() {
    let manifests = Path::new(env!("CARGO_MANIFEST_DIR")).join("manifests");
    let has_any = std::fs::read_dir(&manifests)
        .into_iter()
        .flatten()
        .flatten()
        .any(|e| {
            matches!(
                e.path().extension().and_then(|x| x.to_str()),
                Some("yaml" | "yml" | "json")
            )
        });
    if !has_any {
        eprintln!("no manifests in {}; nothing to check", manifests.display());
        return;
    }
    let cloud = Cloud::start();
    let out = cloud.run(&["apply", "-f", path(&manifests)]).success();
    let created = stdout(&out);
    let labels: Vec<&str> = created
        .lines()
        .map(|l| l.split(' ').next().unwrap())
        .collect();
    assert!(!labels.is_empty());
    for line in created.lines() {
        assert!(line.ends_with(" created"), "{created}");
    }
    // Re-applying the example changes nothing.
    let out = cloud.run(&["apply", "-f", path(&manifests)]).success();
    let again: Vec<String> = labels.iter().map(|l| format!("{l} unchanged")).collect();
    assert_eq!(stdout(&out), format!("{}\n", again.join("\n")));
    // Every object is listed under its kind, by singular name.
    for label in &labels {
        let (kind, name) = label.split_once('/').unwrap();
        let out = cloud.run(&["get", kind]).success();
        assert!(
            stdout(&out)
                .lines()
                .skip(1)
                .any(|l| l.starts_with(&format!("{name} "))),
            "{label} not listed:\n{}",
            stdout(&out)
        );
    }
    // And all go away again.
    let out = cloud.run(&["delete", "-f", path(&manifests)]).success();
    for label in &labels {
        // Deleted at once, or once the controllers' finalizers are done (a Network waits
        // until no Port uses it).
        assert!(
            stdout(&out).contains(&format!("{label} deleted"))
                || stdout(&out).contains(&format!("{label} deletion requested")),
            "{}",
            stdout(&out)
        );
    }
    for label in &labels {
        let (kind, name) = label.split_once('/').unwrap();
        cloud.wait_until_gone(kind, name);
    }
}

// ---------------------------------------------------------------------------------------
// describe, diff, wait, explain, logs, events, prune, delete's flags, get -w, completion.

/// An API client with the admin token `ferro up` wrote, for what the CLI cannot do (a
/// controller's part: adding and removing finalizers).
fn api_client(cloud: &Cloud) -> (tokio::runtime::Runtime, ferro_api::client::Client) {
    let config = std::fs::read_to_string(cloud.config()).unwrap();
    let value = |key: &str| {
        config
            .lines()
            .find_map(|l| l.trim_start().strip_prefix(&format!("{key}: ")))
            .map(|v| v.trim_matches('"').to_owned())
            .unwrap()
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let client = {
        let _entered = runtime.enter();
        ferro_api::client::Client::connect_lazy(&value("server"), &value("token")).unwrap()
    };
    (runtime, client)
}

fn finalizers(cloud: &Cloud, kind: &str, name: &str, add: &[&str], remove: &[&str]) {
    let (runtime, client) = api_client(cloud);
    let kind = ferro_api::Kind::lookup(kind).unwrap();
    let project = match kind.scope() {
        ferro_api::kinds::Scope::Project => "default",
        ferro_api::kinds::Scope::Cluster => "",
    };
    let request = ferro_api::v1::PatchMetadataRequest {
        key: Some(ferro_api::v1::ObjectKey {
            kind: kind.name().to_owned(),
            project: project.to_owned(),
            name: name.to_owned(),
        }),
        add_finalizers: add.iter().map(|f| f.to_string()).collect(),
        remove_finalizers: remove.iter().map(|f| f.to_string()).collect(),
        ..Default::default()
    };
    runtime.block_on(client.patch_metadata(request)).unwrap();
}

/// The object's `metadata.uid`.
fn uid_of(cloud: &Cloud, kind: &str, name: &str) -> String {
    let json = stdout(&cloud.run(&["get", kind, name, "-o", "json"]).success());
    let value: serde_json::Value = serde_json::from_str(&json).unwrap();
    value["metadata"]["uid"].as_str().unwrap().to_owned()
}

/// Waits until `describe KIND NAME` contains `text`.
fn wait_for_describe(cloud: &Cloud, kind: &str, name: &str, text: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        // It may not exist yet (made by a controller).
        let out = stdout(&cloud.run(&["describe", kind, name]));
        if out.contains(text) {
            return out;
        }
        assert!(Instant::now() < deadline, "`{text}` never shown:\n{out}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

const NETWORK: &str = "apiVersion: ferro/v1
kind: Network
metadata:
  name: app-net
spec:
  subnets:
  - name: main
    cidr: 10.0.1.0/24
";

#[test]
fn describe_shows_conditions_owners_events_and_what_blocks_deletion() {
    let cloud = Cloud::start();
    let net = cloud.write("net.yaml", NETWORK);
    cloud.run(&["apply", "-f", path(&net)]).success();

    // The network controller reports Ready and claims a segment the Network owns.
    let text = wait_for_describe(&cloud, "network", "app-net", "SegmentAllocated");
    assert!(text.starts_with("Name:        app-net\n"), "{text}");
    assert!(text.contains("\nProject:     default\n"), "{text}");
    let row = text
        .lines()
        .find(|l| l.trim_start().starts_with("Ready "))
        .unwrap();
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(&cells[..3], ["Ready", "True", "SegmentAllocated"], "{text}");
    assert!(text.contains("\nSpec:\n  "), "{text}");
    assert!(text.contains("cidr: 10.0.1.0/24"), "{text}");
    let uid = uid_of(&cloud, "network", "app-net");

    let segments = stdout(&cloud.run(&["get", "segmentids"]).success());
    let segment = segments
        .lines()
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned();
    let owned = stdout(&cloud.run(&["describe", "segmentid", &segment]).success());
    assert!(
        owned.contains(&format!(
            "Owners:\n  network/app-net (uid {uid}, controller"
        )),
        "{owned}"
    );

    // Events about it, newest last, with their count; `get events --for` filters them.
    let events = cloud.write(
        "events.yaml",
        &format!(
            "apiVersion: ferro/v1
kind: Event
metadata:
  name: app-net-late
spec:
  involvedObject: {{kind: Network, name: app-net, uid: {uid}}}
  type: Warning
  reason: LateThing
  message: the later one
  count: 3
  lastTimestamp: \"2026-01-02T00:00:00Z\"
  reportingComponent: network-controller
---
apiVersion: ferro/v1
kind: Event
metadata:
  name: app-net-early
spec:
  involvedObject: {{kind: Network, name: app-net, uid: {uid}}}
  type: Normal
  reason: EarlyThing
  message: the first one
  lastTimestamp: \"2026-01-01T00:00:00Z\"
---
apiVersion: ferro/v1
kind: Event
metadata:
  name: elsewhere
spec:
  involvedObject: {{kind: Network, name: other, uid: not-this-one}}
  type: Normal
  reason: Unrelated
  message: about another object
  lastTimestamp: \"2026-01-01T12:00:00Z\"
"
        ),
    );
    cloud.run(&["apply", "-f", path(&events)]).success();
    let text = stdout(&cloud.run(&["describe", "network/app-net"]).success());
    let events = text.split("Events:\n").nth(1).unwrap();
    let lines: Vec<Vec<&str>> = events
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        lines[0],
        ["LAST", "SEEN", "TYPE", "REASON", "COUNT", "FROM", "MESSAGE"]
    );
    // Controllers may record events of their own; ours come in time order.
    let ours: Vec<&Vec<&str>> = lines
        .iter()
        .filter(|l| l.contains(&"EarlyThing") || l.contains(&"LateThing"))
        .collect();
    assert_eq!(ours.len(), 2, "{text}");
    assert_eq!(ours[0][1..4], ["Normal", "EarlyThing", "1"], "{text}");
    assert_eq!(
        ours[1][1..5],
        ["Warning", "LateThing", "3", "network-controller"],
        "{text}"
    );
    assert!(!events.contains("Unrelated"), "{text}");

    let all = stdout(&cloud.run(&["get", "events"]).success());
    let reasons: Vec<&str> = all
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().nth(2).unwrap())
        .filter(|r| ["EarlyThing", "Unrelated", "LateThing"].contains(r))
        .collect();
    assert_eq!(reasons, ["EarlyThing", "Unrelated", "LateThing"], "{all}");
    assert!(all.starts_with("LAST SEEN   TYPE      REASON"), "{all}");
    let only = stdout(
        &cloud
            .run(&["get", "events", "--for", "network/app-net"])
            .success(),
    );
    assert!(
        !only.contains("Unrelated") && only.contains("LateThing"),
        "{only}"
    );
    let late = only.lines().find(|l| l.contains("LateThing")).unwrap();
    assert!(
        late.contains("LateThing (x3) ") && late.ends_with("   network/app-net   the later one"),
        "{only}"
    );

    // Being deleted: it says since when and what it waits for.
    finalizers(&cloud, "network", "app-net", &["example.com/hold"], &[]);
    let out = cloud.run(&["delete", "network", "app-net"]).success();
    assert!(
        stdout(&out).contains("deletion requested"),
        "{}",
        stdout(&out)
    );
    let text = stdout(&cloud.run(&["describe", "network", "app-net"]).success());
    let line = text
        .lines()
        .find(|l| l.starts_with("Deleting since "))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(
        line.contains("waiting for: finalizers ") && line.contains("example.com/hold"),
        "{text}"
    );
    assert!(
        line.contains(&format!(
            "dependents: segmentid/{segment} (blocks owner deletion)"
        )),
        "{text}"
    );
    finalizers(&cloud, "network", "app-net", &[], &["example.com/hold"]);
    cloud.wait_until_gone("network", "app-net");
}

#[test]
fn describe_a_server_says_where_it_is_and_why_it_is_not_ready() {
    let cloud = Cloud::start();
    let stack = cloud.write("stack.yaml", STACK);
    cloud.run(&["apply", "-f", path(&stack)]).success();
    let text = stdout(&cloud.run(&["describe", "server", "web-1"]).success());
    for section in [
        "\nSpec:\n",
        "\nPlacement:\n",
        "\nReferences:\n",
        "\nNot ready:   ",
        "\nConditions:\n",
        "\nOwners:\n",
        "\nEvents:\n",
    ] {
        assert!(text.contains(section), "{section:?} missing:\n{text}");
    }
    assert!(text.contains("  flavor: m1.small\n"), "{text}");

    // Once the controllers have looked at it: where it is, what its references resolved
    // to, and why it is not ready (there is no image `debian-12`).
    let text = wait_for_describe(&cloud, "server", "web-1", "\nPlacement:\n  Node:      ");
    assert!(
        text.contains("\n  Flavor:    m1.small (1 vCPU, 2048 MiB RAM, 20 GiB disk"),
        "{text}"
    );
    let text = wait_for_describe(&cloud, "server", "web-1", "\nNot ready:   ImageNotFound: ");
    assert!(text.contains("\n  flavor/m1.small -> uid "), "{text}");
    let ready = text
        .lines()
        .find(|l| l.trim_start().starts_with("Ready "))
        .unwrap_or_else(|| panic!("{text}"));
    let cells: Vec<&str> = ready.split_whitespace().collect();
    assert_eq!(&cells[..3], ["Ready", "False", "ImageNotFound"], "{text}");
    // wait's timeout names the same reason.
    let out = cloud
        .run(&[
            "wait",
            "server/web-1",
            "--for",
            "condition=Ready",
            "--timeout",
            "2s",
        ])
        .failure();
    assert!(
        stderr(&out).starts_with(
            "error: timed out after 2s waiting for servers/web-1 condition Ready: ImageNotFound: "
        ),
        "{}",
        stderr(&out)
    );
    // Its Port names it as owner.
    let uid = uid_of(&cloud, "server", "web-1");
    let port = wait_for_describe(&cloud, "port", "web-1-0", "\nOwners:\n  server/web-1 ");
    assert!(
        port.contains(&format!("\nOwners:\n  server/web-1 (uid {uid}, controller")),
        "{port}"
    );

    let out = cloud.run(&["describe", "server", "nope"]).failure();
    assert_eq!(stderr(&out), "error: servers/nope not found\n");
}

#[test]
fn diff_exit_status_and_text() {
    let cloud = Cloud::start();
    let stack = cloud.write("stack.yaml", STACK);

    // Nothing exists yet: everything is new.
    let out = cloud.run(&["diff", "-f", path(&stack)]).code(1);
    let text = stdout(&out);
    assert!(
        text.contains("--- /dev/null\n+++ server/web-1 (applied)\n"),
        "{text}"
    );
    assert!(text.contains("+  flavor: m1.small\n"), "{text}");

    cloud.run(&["apply", "-f", path(&stack)]).success();
    // Nothing differs: no output at all, exit 0, as kubectl; a terminal gets a word.
    let out = cloud.run(&["diff", "-f", path(&stack)]).code(0);
    assert_eq!(stdout(&out), "");
    assert_eq!(stderr(&out), "");
    let command_line = format!("{} diff -f {}", ferro_bin(), path(&stack));
    if let Some(text) = on_a_terminal(&cloud.config(), &command_line) {
        assert_eq!(text, "no differences\n");
    }

    let changed = cloud.write("changed.yaml", &STACK.replace("m1.small", "m1.medium"));
    let out = cloud.run(&["diff", "-f", path(&changed)]).code(1);
    let text = stdout(&out);
    assert!(
        text.starts_with("--- server/web-1 (live)\n+++ server/web-1 (applied)\n@@ "),
        "{text}"
    );
    assert!(
        text.contains("\n-  flavor: m1.small\n+  flavor: m1.medium\n"),
        "{text}"
    );
    // The generation change stays visible; the resourceVersion is noise and is left out.
    assert!(
        text.contains("\n-  generation: 1\n+  generation: 2\n"),
        "{text}"
    );
    assert!(!text.contains("resourceVersion"), "{text}");
    assert!(!text.contains("network/app-net"), "{text}");
    // Nothing was written.
    let out = cloud.run(&["get", "srv", "web-1", "-o", "yaml"]).success();
    assert!(
        stdout(&out).contains("flavor: m1.small"),
        "{}",
        stdout(&out)
    );

    // Errors are 2, not 1.
    let out = cloud.run(&["diff", "-f", "/nonexistent.yaml"]).code(2);
    assert!(
        stderr(&out).starts_with("error: /nonexistent.yaml: "),
        "{}",
        stderr(&out)
    );
}

#[test]
fn wait_for_conditions_and_deletion() {
    let cloud = Cloud::start();
    let net = cloud.write("net.yaml", NETWORK);
    cloud.run(&["apply", "-f", path(&net)]).success();

    let out = cloud
        .run(&[
            "wait",
            "network/app-net",
            "--for",
            "condition=Ready",
            "--timeout",
            "60s",
        ])
        .success();
    assert_eq!(stdout(&out), "network/app-net condition met\n");

    // A condition that never comes: one line naming the object, the condition and why.
    let out = cloud
        .run(&[
            "wait",
            "network/app-net",
            "--for",
            "condition=NeverHappens",
            "--timeout",
            "2s",
        ])
        .failure();
    assert_eq!(
        stderr(&out),
        "error: timed out after 2s waiting for networks/app-net condition NeverHappens: \
         no NeverHappens condition reported yet\n"
    );
    // A condition present with another status: its reason and message.
    let out = cloud
        .run(&[
            "wait",
            "net/app-net",
            "--for",
            "condition=Ready=False",
            "--timeout",
            "1s",
        ])
        .failure();
    let err = stderr(&out);
    assert!(
        err.starts_with("error: timed out after 1s waiting for networks/app-net condition Ready=False: SegmentAllocated: "),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");

    // Deletion held by a finalizer: the timeout names it.
    finalizers(&cloud, "network", "app-net", &["example.com/hold"], &[]);
    cloud.run(&["delete", "network", "app-net"]).success();
    let out = cloud
        .run(&[
            "wait",
            "network/app-net",
            "--for",
            "delete",
            "--timeout",
            "1s",
        ])
        .failure();
    let err = stderr(&out);
    assert!(
        err.starts_with(
            "error: timed out after 1s waiting for networks/app-net deletion: finalizers "
        ) && err.contains("example.com/hold"),
        "{err}"
    );
    finalizers(&cloud, "network", "app-net", &[], &["example.com/hold"]);
    let out = cloud
        .run(&[
            "wait",
            "network/app-net",
            "--for",
            "delete",
            "--timeout",
            "60s",
        ])
        .success();
    assert_eq!(stdout(&out), "network/app-net deleted\n");

    let out = cloud
        .run(&["wait", "network/app-net", "--for", "ready"])
        .failure();
    assert!(
        stderr(&out).starts_with("error: --for ready: expected condition="),
        "{}",
        stderr(&out)
    );
}

#[test]
fn delete_waits_cascades_forces_and_dry_runs() {
    let cloud = Cloud::start();
    let stack = cloud.write("stack.yaml", STACK);
    cloud.run(&["apply", "-f", path(&stack)]).success();

    // A dry run deletes nothing.
    let out = cloud.run(&["delete", "sg", "web", "--dry-run"]).success();
    assert_eq!(stdout(&out), "securitygroup/web deleted (dry run)\n");
    cloud.run(&["get", "sg", "web"]).success();

    // --wait follows an object held by a finalizer until another process removes it.
    finalizers(&cloud, "sg", "web", &["example.com/hold"], &[]);
    let waiting = Command::new(ferro_bin())
        .args(["delete", "sg", "web", "--wait"])
        .env("FERRO_CONFIG", cloud.config())
        .env_remove("FERRO_SERVER")
        .env_remove("FERRO_TOKEN")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_describe(&cloud, "sg", "web", "Deleting since ");
    finalizers(&cloud, "sg", "web", &[], &["example.com/hold"]);
    let output = waiting.wait_with_output().unwrap();
    let out = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        out,
        "securitygroup/web deletion requested (waiting for finalizers: example.com/hold)\n\
         securitygroup/web deleted\n"
    );
    assert!(
        String::from_utf8_lossy(&output.stderr)
            .contains("waiting for securitygroups/web deletion: finalizers example.com/hold"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    cloud.run(&["get", "sg", "web"]).failure();

    // --cascade maps to the propagation policy: foreground adds its finalizer.
    finalizers(&cloud, "server", "web-1", &["example.com/hold"], &[]);
    let out = cloud
        .run(&["delete", "server", "web-1", "--cascade", "foreground"])
        .success();
    // (The node's agent may hold it too, once the scheduler placed it.)
    let text = stdout(&out);
    assert!(
        text.starts_with("server/web-1 deletion requested (waiting for finalizers: ")
            && text.contains("example.com/hold")
            && text.ends_with(", ferro.io/foreground-deletion)\n"),
        "{text}"
    );
    // --force removes what is left, with a warning.
    let out = cloud
        .run(&["delete", "server", "web-1", "--force"])
        .success();
    assert!(
        stdout(&out).ends_with("server/web-1 deleted (forced)\n"),
        "{}",
        stdout(&out)
    );
    assert!(
        stderr(&out).starts_with("warning: server/web-1: removed finalizers ")
            && stderr(&out).contains("example.com/hold")
            && stderr(&out).contains("host resources may be left behind"),
        "{}",
        stderr(&out)
    );
    cloud.wait_until_gone("server", "web-1");
}

#[test]
fn prune_removes_only_what_this_manager_applied_and_the_files_dropped() {
    let cloud = Cloud::start();
    let server = |name: &str, label: bool| {
        let labels = if label {
            "\n  labels:\n    stack: demo"
        } else {
            ""
        };
        format!(
            "apiVersion: ferro/v1\nkind: Server\nmetadata:\n  name: {name}{labels}\nspec:\n  flavor: m1.tiny\n  image: tiny\n"
        )
    };
    let both = cloud.write(
        "both.yaml",
        &format!("{}---\n{}", server("a", true), server("b", true)),
    );
    let only_a = cloud.write("a.yaml", &server("a", true));
    cloud.run(&["apply", "-f", path(&both)]).success();
    // Another manager's labelled server, and one of ours without the label.
    let theirs = cloud.write("theirs.yaml", &server("theirs", true));
    cloud
        .run(&["apply", "-f", path(&theirs), "--manager", "gitops"])
        .success();
    let plain = cloud.write("plain.yaml", &server("plain", false));
    cloud.run(&["apply", "-f", path(&plain)]).success();

    let out = cloud
        .run(&[
            "apply",
            "-f",
            path(&only_a),
            "--prune",
            "-l",
            "stack=demo",
            "--dry-run",
        ])
        .success();
    assert_eq!(
        stdout(&out),
        "server/a unchanged (dry run)\nserver/b pruned (dry run)\n"
    );
    cloud.run(&["get", "server", "b"]).success();

    let out = cloud
        .run(&["apply", "-f", path(&only_a), "--prune", "-l", "stack=demo"])
        .success();
    assert_eq!(stdout(&out), "server/a unchanged\nserver/b pruned\n");
    cloud.wait_until_gone("server", "b");
    let names: Vec<String> = stdout(&cloud.run(&["get", "servers"]).success())
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().next().unwrap().to_owned())
        .collect();
    assert_eq!(names, ["a", "plain", "theirs"]);

    let out = cloud
        .run(&["apply", "-f", path(&only_a), "--prune"])
        .failure();
    assert!(stderr(&out).contains("--selector"), "{}", stderr(&out));
}

#[test]
fn get_watch_prints_each_change() {
    let cloud = Cloud::start();
    let net = cloud.write("net.yaml", NETWORK);
    cloud.run(&["apply", "-f", path(&net)]).success();
    let mut watch = Command::new(ferro_bin())
        .args(["get", "networks", "-w"])
        .env("FERRO_CONFIG", cloud.config())
        .env_remove("FERRO_SERVER")
        .env_remove("FERRO_TOKEN")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout_pipe = watch.stdout.take().unwrap();
    let (lines_tx, lines_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout_pipe).lines() {
            if lines_tx.send(line.unwrap()).is_err() {
                break;
            }
        }
    });
    // Controllers write status too: skip lines until the one that shows `what`.
    let until = |what: &dyn Fn(&str) -> bool| loop {
        let line = lines_rx
            .recv_timeout(Duration::from_secs(60))
            .expect("a line from get -w");
        if what(&line) {
            return line;
        }
    };
    assert!(until(&|l| l.starts_with("NAME ")).contains("SUBNETS"));
    until(&|l| l.starts_with("app-net ") && l.contains("10.0.1.0/24"));
    let changed = cloud.write(
        "changed.yaml",
        &NETWORK.replace(
            "10.0.1.0/24",
            "10.0.1.0/24\n  - name: more\n    cidr: 10.0.2.0/24",
        ),
    );
    cloud.run(&["apply", "-f", path(&changed)]).success();
    until(&|l| l.starts_with("app-net ") && l.contains("10.0.1.0/24,10.0.2.0/24"));
    cloud.run(&["delete", "network", "app-net"]).success();
    until(&|l| l.starts_with("app-net ") && l.ends_with("(deleted)"));
    if let Some(pid) = i32::try_from(watch.id()).ok().and_then(Pid::from_raw) {
        let _ = rustix::process::kill_process(pid, Signal::INT);
    }
    let status = watch.wait().unwrap();
    assert!(status.success(), "Ctrl-C ends get -w cleanly: {status}");
}

#[test]
fn logs_of_an_unplaced_server_is_one_clear_error() {
    let cloud = Cloud::start();
    // A flavor no node can hold keeps the server unplaced.
    let huge = "apiVersion: ferro/v1\nkind: Flavor\nmetadata:\n  name: huge\nspec:\n  vcpus: 4096\n  ramMib: 1073741824\n  diskGib: 1\n---\n";
    let stack = cloud.write(
        "stack.yaml",
        &format!("{huge}{}", STACK.replace("m1.small", "huge")),
    );
    cloud.run(&["apply", "-f", path(&stack)]).success();
    for target in ["server/web-1", "web-1"] {
        let out = cloud.run(&["logs", target]).failure();
        assert_eq!(
            stderr(&out),
            "error: servers/web-1: is not placed on a node yet; it has no console\n"
        );
    }
    let out = cloud.run(&["logs", "server/nope", "-f"]).failure();
    assert_eq!(stderr(&out), "error: servers/nope not found\n");
    let out = cloud.run(&["logs", "network/app-net"]).failure();
    assert_eq!(
        stderr(&out),
        "error: only servers have logs; `network/app-net` is a Network\n"
    );
}

#[test]
fn explain_and_completion_need_no_cloud() {
    let ferro = || {
        let mut command = assert_cmd::Command::new(ferro_bin());
        command.timeout(Duration::from_secs(60));
        command
    };
    let out = ferro()
        .args(["explain", "server.spec.networks"])
        .assert()
        .success();
    let text = stdout(&out);
    assert!(text.starts_with("KIND:        Server\nFIELD:       spec.networks\nTYPE:        list of object (ServerNetwork)\n"), "{text}");
    assert!(
        text.contains("The networks the server is attached to"),
        "{text}"
    );
    assert!(text.contains("\nFIELDS:\n    network   string"), "{text}");

    let out = ferro()
        .args(["explain", "server.spec.powerState"])
        .assert()
        .success();
    let text = stdout(&out);
    assert!(
        text.contains("TYPE:        enum (Running | Stopped)\n"),
        "{text}"
    );
    assert!(text.contains("\nVALUES:\n    Running   "), "{text}");
    assert!(text.contains("\n    Stopped   "), "{text}");

    let out = ferro()
        .args(["explain", "securitygroup.spec.rules.protocol"])
        .assert()
        .success();
    assert!(
        stdout(&out).contains("TYPE:        enum ("),
        "{}",
        stdout(&out)
    );
    let out = ferro()
        .args(["explain", "network.spec.mtu"])
        .assert()
        .success();
    assert!(
        stdout(&out).contains("TYPE:        integer\n"),
        "{}",
        stdout(&out)
    );
    let out = ferro()
        .args(["explain", "server.metadata.labels"])
        .assert()
        .success();
    assert!(
        stdout(&out).contains("TYPE:        map of string to string\n"),
        "{}",
        stdout(&out)
    );

    let out = ferro()
        .args(["explain", "server.spec.flavour"])
        .assert()
        .failure();
    assert!(
        stderr(&out).starts_with("error: spec has no field `flavour`; its fields: flavor, image, "),
        "{}",
        stderr(&out)
    );

    for (shell, marker) in [
        ("bash", "_ferro()"),
        ("zsh", "#compdef ferro"),
        ("fish", "complete -c ferro"),
    ] {
        let out = ferro().args(["completion", shell]).assert().success();
        let text = stdout(&out);
        assert!(text.contains(marker), "{shell}: {text}");
        assert!(
            text.contains("describe") && text.contains("explain"),
            "{shell}"
        );
    }
}

/// What a command printed on a terminal (through `script`, which gives it a pty), or
/// `None` when `script` is not installed.
fn on_a_terminal(config: &Path, command_line: &str) -> Option<String> {
    if !Path::new("/usr/bin/script").exists() {
        eprintln!("skipping the terminal part: /usr/bin/script is not installed");
        return None;
    }
    let out = Command::new("/usr/bin/script")
        .args(["-qec", command_line, "/dev/null"])
        .env("FERRO_CONFIG", config)
        .env_remove("FERRO_SERVER")
        .env_remove("FERRO_TOKEN")
        .env_remove("FERRO_CONTEXT")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    Some(String::from_utf8_lossy(&out.stdout).replace("\r\n", "\n"))
}

/// The server and token of the only context of a config `ferro up` wrote.
fn context_of(config: &Path) -> (String, String) {
    let text = std::fs::read_to_string(config).unwrap();
    let value = |key: &str| {
        text.lines()
            .find_map(|l| l.trim_start().strip_prefix(&format!("{key}: ")))
            .map(|v| v.trim_matches('"').to_owned())
            .unwrap()
    };
    (value("server"), value("token"))
}

#[test]
fn a_second_up_never_retargets_a_user_talking_to_a_live_cloud() {
    let shared = tempfile::tempdir().unwrap();
    let config = shared.path().join("config.yaml");
    let current = || {
        stdout(
            &cli(&config)
                .args(["config", "current-context"])
                .assert()
                .success(),
        )
        .trim()
        .to_owned()
    };

    // The first cloud's context is written and made current, readable only by its owner.
    let mut one = Cloud::start_sharing(&config, "one", &[]);
    assert_eq!(current(), "ferro-one");
    assert!(
        one.log()
            .contains("context ferro-one written and made current"),
        "{}",
        one.log()
    );
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&config).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);

    // A second cloud writes its own context but leaves the user on the live first one.
    let mut two = Cloud::start_sharing(&config, "two", &[]);
    assert_eq!(current(), "ferro-one");
    let said = format!(
        "context ferro-two written; current context stays ferro-one (live at {}); use: ferro config use-context ferro-two",
        one.api_addr
    );
    assert!(two.log().contains(&said), "{}", two.log());
    let table = stdout(
        &cli(&config)
            .args(["config", "get-contexts"])
            .assert()
            .success(),
    );
    let lines: Vec<Vec<&str>> = table
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        lines,
        [
            vec!["CURRENT", "NAME", "SERVER", "PROJECT"],
            vec!["*", "ferro-one", one.api_addr.as_str(), "default"],
            vec!["ferro-two", two.api_addr.as_str(), "default"],
        ],
        "{table}"
    );

    // The user's writes still go to the first cloud.
    let network = one.write("net.yaml", NETWORK);
    let out = cli(&config)
        .args(["apply", "-f", path(&network)])
        .assert()
        .success();
    // Not a terminal: nothing but the outcome.
    assert_eq!(stderr(&out), "");
    one.run(&["get", "network", "app-net"]).success();
    two.run(&["get", "network", "app-net"]).failure();

    // Asked to, a third cloud takes the current context.
    let mut three = Cloud::start_sharing(&config, "three", &["--set-context"]);
    assert_eq!(current(), "ferro-three");
    assert!(
        three
            .log()
            .contains("context ferro-three written and made current"),
        "{}",
        three.log()
    );
    three.stop();

    // use-context switches; an unknown name is one clear error that changes nothing.
    let out = cli(&config)
        .args(["config", "use-context", "ferro-one"])
        .assert()
        .success();
    assert_eq!(stdout(&out), "switched to context \"ferro-one\"\n");
    let out = cli(&config)
        .args(["config", "use-context", "nope"])
        .assert()
        .failure();
    assert!(
        stderr(&out).starts_with("error: no context named `nope`"),
        "{}",
        stderr(&out)
    );
    assert_eq!(current(), "ferro-one");

    // Once the first cloud is gone, the next start of the second one takes over, and its
    // context is refreshed (a new port), not added again.
    one.stop();
    two.stop();
    two.launch(&[]);
    assert_eq!(current(), "ferro-two");
    let table = stdout(
        &cli(&config)
            .args(["config", "get-contexts"])
            .assert()
            .success(),
    );
    assert_eq!(table.lines().count(), 4, "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.starts_with('*') && l.contains("ferro-two") && l.contains(&two.api_addr)),
        "{table}"
    );
    cli(&config)
        .args(["get", "flavor", "m1.tiny"])
        .assert()
        .success();

    // On a terminal, apply first says where it writes.
    let command_line = format!("{} apply -f {}", ferro_bin(), path(&network));
    if let Some(text) = on_a_terminal(&config, &command_line) {
        assert!(
            text.starts_with(&format!("context: ferro-two ({})\n", two.api_addr)),
            "{text}"
        );
        assert!(text.contains("network/app-net created"), "{text}");
    }
}

#[test]
fn an_old_flat_config_still_works() {
    let cloud = Cloud::start();
    let (server, token) = context_of(&cloud.config());
    let old = cloud.write(
        "old.yaml",
        &format!("server: \"{server}\"\ntoken: \"{token}\"\nproject: \"default\"\n"),
    );
    let before = std::fs::read_to_string(&old).unwrap();
    cli(&old)
        .args(["get", "flavor", "m1.tiny"])
        .assert()
        .success();
    let out = cli(&old)
        .args(["config", "current-context"])
        .assert()
        .success();
    assert_eq!(stdout(&out), "default\n");
    let out = cli(&old)
        .args(["config", "get-contexts"])
        .assert()
        .success();
    assert!(
        stdout(&out).contains(&format!("*         default   {server}   default")),
        "{}",
        stdout(&out)
    );
    // Reading never rewrites it.
    assert_eq!(std::fs::read_to_string(&old).unwrap(), before);
}

/// Polls `get KIND NAME` until its table's row satisfies `check`.
fn wait_for_row(cloud: &Cloud, args: &[&str], check: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = stdout(&cloud.run(args));
        if out.lines().nth(1).is_some_and(&check) {
            return out;
        }
        assert!(Instant::now() < deadline, "never as expected:\n{out}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn tables_show_what_holds_a_server_and_a_keypairs_fingerprint() {
    let cloud = Cloud::start();

    // A Server whose Flavor does not exist shows why, not just Pending.
    let stack = cloud.write("stack.yaml", &STACK.replace("m1.small", "m1.nope"));
    cloud.run(&["apply", "-f", path(&stack)]).success();
    let table = wait_for_row(&cloud, &["get", "servers"], |row| {
        row.split_whitespace().nth(1) == Some("FlavorNotFound")
    });
    assert!(
        table.starts_with("NAME    STATUS           NODE     FLAVOR    IMAGE       AGE\n"),
        "{table}"
    );

    // A KeyPair's fingerprint is computed at admission, as ssh-keygen prints it.
    let (public_key, fingerprint) = match ssh_keygen_pair(cloud.dir.path()) {
        Some(pair) => pair,
        None => {
            eprintln!("ssh-keygen not installed: checking a known key instead");
            (
                "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIMYuernJDQTgP8BeohxMCEJLFLSvWUaWkkmdvqkS+rOH demo@ferro".to_owned(),
                "SHA256:5O6Qi5+V5c2mGnEsddvAotjZ57lAvIiGweU+modV2R0".to_owned(),
            )
        }
    };
    let keypair = cloud.write(
        "keypair.yaml",
        &format!(
            "apiVersion: ferro/v1\nkind: KeyPair\nmetadata:\n  name: mine\nspec:\n  publicKey: {public_key}\n"
        ),
    );
    cloud.run(&["apply", "-f", path(&keypair)]).success();
    let out = cloud.run(&["get", "keypairs"]).success();
    let table = stdout(&out);
    let row: Vec<&str> = table.lines().nth(1).unwrap().split_whitespace().collect();
    assert_eq!(row[..2], ["mine", fingerprint.as_str()], "{table}");
    // It is status: applying the manifest again changes nothing.
    let out = cloud.run(&["apply", "-f", path(&keypair)]).success();
    assert_eq!(stdout(&out), "keypair/mine unchanged\n");
    // And no writer may patch it.
    let (runtime, client) = api_client(&cloud);
    let forged = ferro_api::Object::KeyPair(ferro_api::v1::KeyPair {
        metadata: Some(ferro_api::v1::ObjectMeta {
            name: "mine".into(),
            project: "default".into(),
            ..Default::default()
        }),
        spec: None,
        status: Some(ferro_api::v1::KeyPairStatus {
            fingerprint: "SHA256:forged".into(),
        }),
    });
    let refused = runtime
        .block_on(client.update_status(forged, "keypair-controller", &["fingerprint"], vec![]))
        .unwrap_err();
    assert!(
        refused
            .to_string()
            .contains("computed by the apiserver at admission"),
        "{refused}"
    );
}

/// A fresh ed25519 public key and its fingerprint as `ssh-keygen -l` prints it, or `None`
/// when ssh-keygen is not installed.
fn ssh_keygen_pair(dir: &Path) -> Option<(String, String)> {
    let key = dir.join("id_test");
    let made = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "test@ferro", "-f"])
        .arg(&key)
        .output()
        .ok()?;
    assert!(made.status.success(), "{made:?}");
    let listed = Command::new("ssh-keygen")
        .arg("-lf")
        .arg(key.with_extension("pub"))
        .output()
        .unwrap();
    // `256 SHA256:… test@ferro (ED25519)`
    let line = String::from_utf8(listed.stdout).unwrap();
    let fingerprint = line.split_whitespace().nth(1).unwrap().to_owned();
    let public_key = std::fs::read_to_string(key.with_extension("pub"))
        .unwrap()
        .trim()
        .to_owned();
    Some((public_key, fingerprint))
}

#[test]
fn api_resources_and_get_help_list_every_kind() {
    let out = cli(Path::new("/nonexistent/config.yaml"))
        .arg("api-resources")
        .assert()
        .success();
    let table = stdout(&out);
    let rows: Vec<Vec<&str>> = table
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(rows[0], ["NAME", "SHORTNAMES", "KIND", "PROJECT-SCOPED"]);
    assert_eq!(rows.len(), ferro_api::Kind::ALL.len() + 1, "{table}");
    assert!(
        rows.contains(&vec!["servers", "srv", "Server", "true"]),
        "{table}"
    );
    assert!(rows.contains(&vec!["ports", "Port", "true"]), "{table}");
    assert!(
        rows.contains(&vec!["ipaddresses", "ip", "IPAddress", "false"]),
        "{table}"
    );
    let out = cli(Path::new("/nonexistent/config.yaml"))
        .args(["get", "--help"])
        .assert()
        .success();
    let help = stdout(&out);
    for kind in ferro_api::Kind::ALL {
        assert!(help.contains(&format!("\n  {}", kind.plural())), "{help}");
    }
    assert!(
        help.contains("\n  macaddresses (mac, cluster-scoped)\n"),
        "{help}"
    );
}

/// Peak RSS (KiB) and wall time of a command, by `/usr/bin/time -v`.
fn measured(args: &[&str]) -> Option<(u64, Duration)> {
    if !Path::new("/usr/bin/time").exists() {
        return None;
    }
    let begin = Instant::now();
    let out = Command::new("/usr/bin/time")
        .arg("-v")
        .arg(ferro_bin())
        .args(args)
        .env("FERRO_CONFIG", "/nonexistent/config.yaml")
        .output()
        .unwrap();
    let elapsed = begin.elapsed();
    let text = String::from_utf8_lossy(&out.stderr);
    let rss = text
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("Maximum resident set size (kbytes): ")
        })?
        .parse()
        .ok()?;
    Some((rss, elapsed))
}

#[test]
fn a_yaml_bomb_is_refused_within_its_budget() {
    let dir = tempfile::tempdir().unwrap();
    let mut bomb = String::from(
        "a: &a [\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\"]\n",
    );
    for (name, previous) in "bcdefghi".chars().zip("abcdefgh".chars()) {
        let aliases = vec![format!("*{previous}"); 9].join(",");
        bomb.push_str(&format!("{name}: &{name} [{aliases}]\n"));
    }
    let file = dir.path().join("bomb.yaml");
    std::fs::write(&file, &bomb).unwrap();
    let args = [
        "apply",
        "-f",
        path(&file),
        "--server",
        "127.0.0.1:1",
        "--token",
        "x",
    ];
    let out = cli(Path::new("/nonexistent/config.yaml"))
        .args(args)
        .assert()
        .failure();
    assert_eq!(
        stderr(&out),
        format!(
            "error: {}: too many YAML nodes (more than {}); is this a YAML bomb?\n",
            path(&file),
            256 + bomb.len()
        )
    );

    // Within 100 ms and 10 MB more than refusing a file that does not exist (the same
    // process start, the same binary): the best of five, as the machine is shared.
    let missing = dir.path().join("missing.yaml");
    let baseline_args = [
        "apply",
        "-f",
        path(&missing),
        "--server",
        "127.0.0.1:1",
        "--token",
        "x",
    ];
    let best = |args: &[&str]| {
        (0..5)
            .filter_map(|_| measured(args))
            .min_by_key(|(_, elapsed)| *elapsed)
    };
    let (Some((bomb_rss, bomb_time)), Some((base_rss, base_time))) =
        (best(&args), best(&baseline_args))
    else {
        eprintln!("skipping the budget: /usr/bin/time is not installed");
        return;
    };
    assert!(
        bomb_time.saturating_sub(base_time) < Duration::from_millis(100),
        "{bomb_time:?} against {base_time:?}"
    );
    assert!(
        bomb_rss.saturating_sub(base_rss) < 10 * 1024,
        "{bomb_rss} KiB against {base_rss} KiB"
    );
}

/// A node agent's console side, played in-process for node `n1`: the serial log of the
/// server with uid `quiet` is empty, every other one holds `booting` and a ready line,
/// and a followed log stays open after them.
fn fake_console_agent(runtime: &tokio::runtime::Runtime, server: &str, quiet: String) {
    use ferro_api::v1::{self, console_open::Mode};
    use futures::StreamExt;
    let _entered = runtime.enter();
    let client = ferro_api::client::Client::connect_lazy(server, "node-token").unwrap();
    let mut tunnel = runtime
        .block_on(
            client
                .consoles()
                .tunnel(v1::TunnelHello { node: "n1".into() }),
        )
        .expect("the tunnel opens")
        .into_inner();
    runtime.spawn(async move {
        while let Some(Ok(open)) = tunnel.next().await {
            let output: &[u8] = if open.server_uid == quiet {
                b""
            } else {
                b"booting\r\nFERRO-READY hostname=chatty boot-count=1\r\n"
            };
            let mut messages = vec![v1::ConsoleData {
                session: open.session.clone(),
                ..Default::default()
            }];
            if !output.is_empty() {
                messages.push(v1::ConsoleData {
                    data: output.to_vec(),
                    ..Default::default()
                });
            }
            let (tx, stream) = futures::channel::mpsc::unbounded();
            for message in messages {
                tx.unbounded_send(message).unwrap();
            }
            // A log ends after what it holds; a followed one stays open.
            let keep = (open.mode != Mode::Log as i32).then_some(tx);
            let mut consoles = client.consoles();
            tokio::spawn(async move {
                let _keep = keep;
                if let Ok(keys) = consoles.serve(stream).await {
                    let mut keys = keys.into_inner();
                    while keys.next().await.is_some() {}
                }
            });
        }
    });
}

#[test]
fn an_empty_console_is_said_and_wait_follows_the_console() {
    let dir = tempfile::tempdir().unwrap();
    let apiserver = LoneApiserver::start(dir.path(), "memory");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let admin = {
        let _entered = runtime.enter();
        ferro_api::client::Client::connect_lazy(&apiserver.listen, "admin-token").unwrap()
    };
    let node =
        ferro_api::codec::decode_yaml("apiVersion: ferro/v1\nkind: Node\nmetadata: {name: n1}\n")
            .unwrap()
            .remove(0);
    runtime.block_on(admin.create(node)).unwrap();
    let mut uids = Vec::new();
    for name in ["quiet", "chatty", "unplaced"] {
        let text = format!(
            "apiVersion: ferro/v1\nkind: Server\nmetadata: {{name: {name}}}\nspec: {{flavor: m1.tiny, image: tiny}}\n"
        );
        let object = ferro_api::codec::decode_yaml(&text).unwrap().remove(0);
        let created = runtime.block_on(admin.create(object)).unwrap();
        uids.push(created.metadata().unwrap().uid.clone());
        if name != "unplaced" {
            let flavor = ferro_api::v1::FlavorSnapshot {
                name: "m1.tiny".into(),
                vcpus: 1,
                ram_mib: 128,
                ..Default::default()
            };
            runtime
                .block_on(admin.bind("default", name, "n1", flavor))
                .unwrap();
        }
    }
    fake_console_agent(&runtime, &apiserver.listen, uids[0].clone());
    let run = |args: &[&str]| {
        assert_cmd::Command::from_std(apiserver.ferro())
            .args(args)
            .timeout(Duration::from_secs(60))
            .assert()
    };

    // Nothing printed yet is said, and is not an error.
    let out = run(&["logs", "server/quiet"]).success();
    assert_eq!(stdout(&out), "");
    assert_eq!(stderr(&out), "no console output yet\n");
    let out = run(&["logs", "chatty"]).success();
    assert!(stdout(&out).contains("FERRO-READY"), "{}", stdout(&out));
    assert_eq!(stderr(&out), "");

    // A line that is there, one that never comes, and a server with no console yet.
    let out = run(&[
        "wait",
        "server/chatty",
        "--for",
        "console=^FERRO-READY ",
        "--timeout",
        "30s",
    ])
    .success();
    assert_eq!(
        stdout(&out),
        "server/chatty console: FERRO-READY hostname=chatty boot-count=1\n"
    );
    let out = run(&[
        "wait",
        "server/chatty",
        "--for",
        "console=NEVER",
        "--timeout",
        "2s",
    ])
    .failure();
    assert_eq!(
        stderr(&out),
        "error: timed out after 2s waiting for servers/chatty console line matching `NEVER`: \
         last line: FERRO-READY hostname=chatty boot-count=1\n"
    );
    let out = run(&[
        "wait",
        "server/unplaced",
        "--for",
        "console=x",
        "--timeout",
        "2s",
    ])
    .failure();
    assert_eq!(
        stderr(&out),
        "error: timed out after 2s waiting for servers/unplaced console line matching `x`: \
         is not placed on a node yet; it has no console\n"
    );
    let out = run(&["wait", "server/nope", "--for", "console=x"]).failure();
    assert_eq!(stderr(&out), "error: servers/nope not found\n");
    let out = run(&["wait", "network/n", "--for", "console=x"]).failure();
    assert_eq!(
        stderr(&out),
        "error: --for console=…: only servers have a console; `network/n` is a Network\n"
    );
}

/// The Python snippet of README.md, run as written with grpcio from PyPI in a venv cached
/// under `target/`: it lists the services through v1alpha reflection (health included),
/// lists servers and watches with initial events, with no `.proto` file. Skipped, saying
/// so, only when PyPI cannot be reached.
#[test]
fn readme_python_client_lists_services_and_watches_with_initial_events() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let snippet = readme
        .split("```python\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("README.md has a python snippet");

    let venv = root.join("target/ferro-python-client");
    let python = venv.join("bin/python");
    let ready = venv.join("installed");
    if !ready.exists() {
        let status = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .expect("python3 runs");
        assert!(status.success(), "python3 -m venv failed");
        let pip = Command::new(&python)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "--timeout",
                "30",
                "grpcio",
                "grpcio-reflection",
                "protobuf",
            ])
            .output()
            .expect("pip runs");
        if !pip.status.success() {
            let reachable = std::net::ToSocketAddrs::to_socket_addrs(&("pypi.org", 443))
                .ok()
                .and_then(|mut addresses| addresses.next())
                .is_some_and(|a| {
                    std::net::TcpStream::connect_timeout(&a, Duration::from_secs(5)).is_ok()
                });
            if !reachable {
                println!(
                    "SKIPPED: PyPI is unreachable, so grpcio cannot be installed: {}",
                    String::from_utf8_lossy(&pip.stderr)
                        .lines()
                        .last()
                        .unwrap_or("")
                );
                return;
            }
            panic!(
                "pip install failed:\n{}",
                String::from_utf8_lossy(&pip.stderr)
            );
        }
        std::fs::write(&ready, "grpcio grpcio-reflection protobuf\n").unwrap();
    }

    let cloud = Cloud::start();
    let stack = cloud.write("stack.yaml", STACK);
    cloud.run(&["apply", "-f", path(&stack)]).success();
    let config = std::fs::read_to_string(cloud.config()).unwrap();
    let token = config
        .lines()
        .find_map(|l| l.trim_start_matches([' ', '-']).strip_prefix("token: "))
        .map(|v| v.trim_matches('"').to_owned())
        .expect("the config holds a token");
    let script = cloud.write("client.py", snippet);
    let out = Command::new(&python)
        .arg(&script)
        .env("FERRO_SERVER", &cloud.api_addr)
        .env("FERRO_TOKEN", token)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the snippet failed:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = text.lines().collect();
    let services: Vec<&str> = lines[0]
        .strip_prefix("services: ")
        .expect("services first")
        .split(' ')
        .collect();
    for service in [
        "ferro.v1.Resources",
        "ferro.v1.Consoles",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    ] {
        assert!(services.contains(&service), "{service} missing: {text}");
    }
    assert_eq!(lines[1], "server web-1", "{text}");
    assert_eq!(lines[2], "Added web-1", "{text}");
    assert!(lines[3].starts_with("bookmark "), "{text}");
    assert_eq!(lines.len(), 4, "{text}");
}

/// A Network deleted while its Ports go one by one: one `DeletionWaitsForPorts` row whose
/// reason carries the count, `ferro get events -w --for` following the bumps and nothing
/// else.
#[test]
fn get_events_shows_one_row_per_repeated_event_with_its_count() {
    let cloud = Cloud::start();
    const PORTS: usize = 6;
    let mut manifest = String::from(
        "apiVersion: ferro/v1\nkind: Network\nmetadata: {name: busy}\nspec:\n  subnets:\n  - {name: a, cidr: 10.9.0.0/24}\n",
    );
    for i in 0..PORTS {
        manifest.push_str(&format!(
            "---\napiVersion: ferro/v1\nkind: Port\nmetadata: {{name: p{i}}}\nspec: {{network: busy}}\n"
        ));
    }
    let file = cloud.write("busy.yaml", &manifest);
    cloud.run(&["apply", "-f", path(&file)]).success();
    cloud.run(&["delete", "network", "busy"]).success();
    wait_for_describe(&cloud, "network", "busy", "DeletionWaitsForPorts");

    let mut watch = Command::new(ferro_bin())
        .args(["get", "events", "-w", "--for", "network/busy"])
        .env("FERRO_CONFIG", cloud.config())
        .env_remove("FERRO_SERVER")
        .env_remove("FERRO_TOKEN")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout_pipe = watch.stdout.take().unwrap();
    let (lines_tx, lines_rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout_pipe).lines() {
            if lines_tx.send(line.unwrap()).is_err() {
                break;
            }
        }
    });
    let mut lines = Vec::new();
    let mut until = |what: &dyn Fn(&str) -> bool| loop {
        let line = lines_rx
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("no such line from get -w: {lines:#?}"));
        lines.push(line.clone());
        if what(&line) {
            return line;
        }
    };
    until(&|l| l.contains("DeletionWaitsForPorts"));
    // Each Port gone changes what the Network waits for, and so the message.
    for i in 0..PORTS {
        cloud.run(&["delete", "port", &format!("p{i}")]).success();
        std::thread::sleep(Duration::from_millis(100));
    }
    let bumped = until(&|l| l.contains("DeletionWaitsForPorts (x"));
    assert!(bumped.contains(" over "), "{bumped}");
    assert!(
        bumped.contains("(combined from similar events): deletion waits for ports"),
        "{bumped}"
    );
    if let Some(pid) = i32::try_from(watch.id()).ok().and_then(Pid::from_raw) {
        let _ = rustix::process::kill_process(pid, Signal::INT);
    }
    assert!(watch.wait().unwrap().success());
    for line in lines.iter().filter(|l| !l.starts_with("LAST SEEN")) {
        assert!(
            line.contains("network/busy"),
            "--for filters the watch: {lines:#?}"
        );
    }

    cloud.wait_until_gone("network", "busy");
    let all = stdout(&cloud.run(&["get", "events"]).success());
    let rows: Vec<&str> = all
        .lines()
        .filter(|l| l.contains("DeletionWaitsForPorts"))
        .collect();
    assert_eq!(rows.len(), 1, "one row for the repeats: {all}");
    let cells: Vec<&str> = rows[0].split_whitespace().collect();
    // LAST SEEN, TYPE, then `DeletionWaitsForPorts (xN over Ds)`.
    assert_eq!(cells[1..3], ["Normal", "DeletionWaitsForPorts"], "{all}");
    let count: u32 = cells[3]
        .strip_prefix("(x")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("a count: {all}"));
    assert!(count > 1, "{all}");
    assert_eq!(cells[4], "over", "{all}");
    assert!(cells[5].ends_with("s)"), "{all}");
    assert_eq!(cells[6], "network/busy", "{all}");
}

#[test]
fn quota_show_prints_limits_beside_use_and_apply_is_refused_past_them() {
    let dir = tempfile::tempdir().unwrap();
    let apiserver = LoneApiserver::start(dir.path(), "memory");
    let run = |args: &[&str]| {
        assert_cmd::Command::from_std(apiserver.ferro())
            .args(args)
            .timeout(Duration::from_secs(60))
            .assert()
    };
    let out = run(&["quota", "show", "-p", "team-a"]).success();
    assert_eq!(
        stdout(&out),
        "project team-a has no quota (quotas/default): nothing is limited\n"
    );

    let manifest = dir.path().join("quota.yaml");
    std::fs::write(
        &manifest,
        "apiVersion: ferro/v1\nkind: Quota\nmetadata: {name: default, project: team-a}\nspec:\n  hard: {networks: 1, securityGroups: 5}\n---\n\
         apiVersion: ferro/v1\nkind: Network\nmetadata: {name: one, project: team-a}\nspec:\n  subnets: [{name: a, cidr: 10.0.1.0/24}]\n---\n\
         apiVersion: ferro/v1\nkind: Network\nmetadata: {name: two, project: team-a}\nspec:\n  subnets: [{name: a, cidr: 10.0.2.0/24}]\n",
    )
    .unwrap();
    let out = run(&["apply", "-f", path(&manifest)]).failure();
    assert_eq!(stdout(&out), "quota/default created\nnetwork/one created\n");
    assert!(
        stderr(&out)
            .contains("quota exceeded in project team-a: networks limit 1, used 1, requested 1"),
        "{}",
        stderr(&out)
    );

    let out = run(&["quota", "show", "-p", "team-a"]).success();
    let text = stdout(&out);
    assert!(
        text.starts_with("quotas/default in project team-a\nRESOURCE         USED   LIMIT\n"),
        "{text}"
    );
    assert!(text.contains("\nnetworks         1      1\n"), "{text}");
    assert!(text.contains("\nsecurityGroups   0      5\n"), "{text}");
    assert!(text.contains("\nservers          0      -\n"), "{text}");
}

#[test]
fn routers_and_floating_ips_are_placed_and_addressed_and_contradictions_refused() {
    let cloud = Cloud::start();
    let manifests = Path::new(env!("CARGO_MANIFEST_DIR")).join("manifests");
    // The floating IP first: what it names comes later, and it waits for them.
    for file in ["floating-ip.yaml", "router.yaml", "network.yaml"] {
        cloud
            .run(&["apply", "-f", path(&manifests.join(file))])
            .success();
    }
    // This host's node has the network role: the router runs there, with a gateway
    // address from the external network's pool.
    let routers = wait_for_row(&cloud, &["get", "router", "edge", "-o", "wide"], |row| {
        row.split_whitespace()
            .any(|cell| cell.starts_with("203.0.113."))
    });
    let header: Vec<&str> = routers.lines().next().unwrap().split_whitespace().collect();
    let row: Vec<&str> = routers.lines().nth(1).unwrap().split_whitespace().collect();
    let node = row[header.iter().position(|h| *h == "NODE").unwrap()];
    assert_ne!(node, "<none>", "{routers}");
    // The floating IP holds an address of its own, and says what it waits for: there is
    // no server web-1.
    let fips = wait_for_row(&cloud, &["get", "fip", "web-1", "-o", "wide"], |row| {
        row.split_whitespace()
            .any(|cell| cell.starts_with("203.0.113."))
    });
    let gateway = row
        .iter()
        .find(|cell| cell.starts_with("203.0.113."))
        .unwrap();
    assert!(!fips.contains(&format!(" {gateway} ")), "{routers}\n{fips}");
    assert!(fips.contains("ServerNotFound"), "{fips}");

    // A second router on the same subnet, and a floating IP on a tenant network: refused
    // with the field named, nothing written.
    let refused = |name: &str, text: &str, expected: &[&str]| {
        let file = cloud.write(name, text);
        let out = cloud.run(&["apply", "-f", path(&file)]).failure();
        let err = stderr(&out);
        for e in expected {
            assert!(err.contains(e), "`{e}` not in:\n{err}");
        }
        assert!(err.contains("0 of 1 objects applied"), "{err}");
    };
    refused(
        "second-router.yaml",
        "apiVersion: ferro/v1\nkind: Router\nmetadata: {name: edge-2}\n\
         spec: {interfaces: [{network: private, subnet: private-v4}]}\n",
        &[
            "spec.interfaces[0].subnet",
            "already has router default/edge",
        ],
    );
    refused(
        "tenant-fip.yaml",
        "apiVersion: ferro/v1\nkind: FloatingIP\nmetadata: {name: inside}\n\
         spec: {network: private}\n",
        &["spec.network", "not external"],
    );
    cloud.run(&["get", "router", "edge-2"]).failure();
    cloud.run(&["get", "fip", "inside"]).failure();

    // Deleting them gives their addresses back.
    for file in ["floating-ip.yaml", "router.yaml"] {
        cloud
            .run(&["delete", "-f", path(&manifests.join(file))])
            .success();
    }
    cloud.wait_until_gone("router", "edge");
    cloud.wait_until_gone("floatingip", "web-1");
}
