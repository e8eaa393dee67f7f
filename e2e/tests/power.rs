//! Power and consoles end to end: `ferro up` with real etcd, the scheduler placing a
//! Server of the tiny test guest, real QEMU (TCG), and the user's verbs —
//! `ferro server stop|start|reboot` and `ferro console` driven through a pseudo-terminal
//! (util-linux `script` gives the CLI a real tty, so raw mode and Ctrl-] are exercised).
//!
//! What is checked is what a user would: after a stop no QEMU runs for the guest; after a
//! start the guest's boot count (kept on its own disk) went up and a file written before
//! the stop is still there; a reboot boots it exactly once more. Nothing asserts on time.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use ferro_e2e::{Cloud, TinyGuest, tiny_guest};

/// How long anything that needs a guest to boot may take.
const BOOT: Duration = Duration::from_secs(240);

/// The one VM directory of the cloud's agent, once there is one.
fn vm_dir(cloud: &Cloud) -> Option<PathBuf> {
    std::fs::read_dir(cloud.data_dir().join("agent/vms"))
        .ok()?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.join("vm.json").exists())
}

/// The guest's serial log, as the agent records it on the host.
fn serial_log(cloud: &Cloud) -> String {
    vm_dir(cloud)
        .and_then(|d| std::fs::read(d.join("serial.log")).ok())
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

fn wait_serial(cloud: &Cloud, needle: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + BOOT;
    while !serial_log(cloud).contains(needle) {
        if Instant::now() > deadline {
            bail!(
                "the console never showed {needle:?}:\n{}\n--- ferro up:\n{}",
                serial_log(cloud),
                cloud.up_output()
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    Ok(())
}

/// Pids of the guest's QEMU: processes named `ferro-<uid>`.
fn qemu_pids(cloud: &Cloud) -> Vec<u32> {
    let Some(uid) = vm_dir(cloud).and_then(|d| d.file_name()?.to_str().map(str::to_owned)) else {
        return Vec::new();
    };
    let name = format!("ferro-{uid}");
    ferro_e2e::processes_naming(&cloud.data_dir().join("agent"))
        .into_iter()
        .filter(|(_, cmdline)| cmdline.contains(&name))
        .map(|(pid, _)| pid)
        .collect()
}

/// `ferro console` in a pseudo-terminal: keystrokes in through `script`, output out.
struct Console {
    child: Child,
    output: mpsc::Receiver<Vec<u8>>,
    seen: String,
}

impl Console {
    fn open(cloud: &Cloud, target: &str) -> anyhow::Result<Console> {
        let ferro = ferro_e2e::ferro_binary()?;
        let inner = format!(
            "FERRO_CONFIG={} {} console {target}",
            cloud.config_path().display(),
            ferro.display()
        );
        let mut child = Command::new("script")
            .args(["-qfec", &inner, "/dev/null"])
            .env_remove("FERRO_SERVER")
            .env_remove("FERRO_TOKEN")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("running script (util-linux)")?;
        let mut stdout = child.stdout.take().context("stdout")?;
        let (tx, output) = mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                    return;
                }
            }
        });
        Ok(Console {
            child,
            output,
            seen: String::new(),
        })
    }

    fn type_keys(&mut self, keys: &[u8]) -> anyhow::Result<()> {
        let stdin = self.child.stdin.as_mut().context("stdin")?;
        stdin.write_all(keys)?;
        stdin.flush()?;
        Ok(())
    }

    /// Reads until the output holds `needle`.
    fn expect(&mut self, needle: &str, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        while !self.seen.contains(needle) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.output.recv_timeout(left) {
                Ok(bytes) => self.seen.push_str(&String::from_utf8_lossy(&bytes)),
                Err(_) => bail!("the console never showed {needle:?}:\n{}", self.seen),
            }
        }
        Ok(())
    }

    /// Ctrl-], then the exit status.
    fn leave(mut self) -> anyhow::Result<std::process::ExitStatus> {
        self.type_keys(&[0x1d])?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!("ferro console did not leave on Ctrl-]:\n{}", self.seen);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

#[test]
fn power_verbs_and_the_console_drive_a_real_guest() -> anyhow::Result<()> {
    let guest = tiny_guest()?;
    let cloud = Cloud::start()?;
    let result = scenario(&cloud, &guest);
    if result.is_err() {
        // Guests outlive `ferro up`: end this one (by pid) before the cloud stops.
        for pid in qemu_pids(&cloud) {
            ferro_e2e::signal(pid, ferro_e2e::Signal::KILL);
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    result
}

fn scenario(cloud: &Cloud, guest: &TinyGuest) -> anyhow::Result<()> {
    let manifest = cloud.data_dir().join("../power.yaml");
    std::fs::write(
        &manifest,
        format!(
            r#"
{images}---
apiVersion: ferro/v1
kind: Server
metadata: {{name: power}}
spec: {{flavor: m1.tiny, image: tiny}}
"#,
            images = guest.image_manifests(),
        ),
    )?;
    cloud.run(["apply", "-f", manifest.to_str().unwrap()])?;
    wait_serial(cloud, "FERRO-READY hostname=power boot-count=1")?;

    // The console, through the relay, in a real terminal: a command and its answer.
    let mut console = Console::open(cloud, "server/power")?;
    console.expect("Ctrl-] to leave", Duration::from_secs(60))?;
    console
        .type_keys(b"\necho kept-$((6 * 7)) >/mnt/disk/kept; sync; echo $((6 * 7))-written\n")?;
    console.expect("42-written", Duration::from_secs(60))?;
    // One writer at a time: a second one is refused, a reader is welcome.
    let second = cloud.ferro(["console", "server/power"]).output()?;
    ensure!(!second.status.success(), "a second writer was let in");
    let said = String::from_utf8_lossy(&second.stderr);
    ensure!(
        said.contains("another client is attached as the writer"),
        "{said}"
    );
    let reader = cloud
        .ferro(["console", "server/power", "--read-only"])
        .output()?;
    ensure!(
        reader.status.success(),
        "a reader was refused: {}",
        String::from_utf8_lossy(&reader.stderr)
    );
    let status = console.leave()?;
    ensure!(status.success(), "ferro console left with {status}");

    // Stop: no QEMU, and the verb waited for it.
    let pids = qemu_pids(cloud);
    ensure!(pids.len() == 1, "{pids:?}");
    let out = cloud.run(["server", "stop", "power"])?;
    ensure!(out.contains("server/power: stopped"), "{out}");
    ensure!(qemu_pids(cloud).is_empty(), "QEMU still runs after stop");
    ensure!(
        serial_log(cloud).contains("FERRO-POWEROFF"),
        "no ACPI shutdown"
    );

    // Start: the same disk, one boot more, the file still there.
    let out = cloud.run(["server", "start", "power"])?;
    ensure!(out.contains("server/power: running"), "{out}");
    wait_serial(cloud, "FERRO-READY hostname=power boot-count=2")?;
    let mut console = Console::open(cloud, "server/power")?;
    console.expect("Ctrl-] to leave", Duration::from_secs(60))?;
    console.type_keys(b"\ncat /mnt/disk/kept\n")?;
    console.expect("kept-42", Duration::from_secs(60))?;
    ensure!(console.leave()?.success());

    // Reboot: exactly one more boot.
    let out = cloud.run(["server", "reboot", "power"])?;
    ensure!(out.contains("server/power: rebooted"), "{out}");
    wait_serial(cloud, "FERRO-READY hostname=power boot-count=3")?;
    // Two resyncs later (each reconciles the Server again), still one boot more.
    cloud.wait_agent_resyncs(2, Duration::from_secs(60))?;
    ensure!(
        !serial_log(cloud).contains("boot-count=4"),
        "the reboot happened more than once"
    );
    ensure!(qemu_pids(cloud).len() == 1);

    // Deleting the Server ends the guest (before ferro up stops: guests outlive it).
    cloud.run(["delete", "server", "power"])?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !qemu_pids(cloud).is_empty() || vm_dir(cloud).is_some() {
        ensure!(Instant::now() < deadline, "the guest survived its delete");
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}
