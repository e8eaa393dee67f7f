//! What the agent's integration tests share: the tiny test guest, and finding and killing
//! QEMU processes by pid.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use ferro_agent::hypervisor::qemu::is_vm_process;

/// The tiny guest's artefacts, as printed by its build script.
pub struct TinyGuest {
    /// The uncompressed kernel.
    pub kernel: PathBuf,
    /// The initramfs.
    pub initrd: PathBuf,
    /// The raw ext4 disk.
    pub disk: PathBuf,
    /// The BIOS-bootable raw disk (MBR, syslinux, kernel, initramfs, ext4 partition).
    pub bios_disk: PathBuf,
    /// The kernel command line.
    pub cmdline: String,
}

/// Builds the tiny guest (or finds it in the cache) once per test binary.
pub fn tiny_guest() -> &'static TinyGuest {
    static GUEST: OnceLock<TinyGuest> = OnceLock::new();
    GUEST.get_or_init(|| {
        let qemu = Command::new("qemu-system-x86_64").arg("--version").output();
        assert!(
            qemu.is_ok_and(|o| o.status.success()),
            "qemu-system-x86_64 is missing: install qemu-system-x86 (scripts/install-host-deps.sh)"
        );
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../e2e/images/build-tiny.sh");
        let cache = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/ferro-images");
        let started = Instant::now();
        let output = Command::new("bash")
            .arg(&script)
            .env(
                "FERRO_IMAGE_CACHE",
                std::env::var_os("FERRO_IMAGE_CACHE").unwrap_or(cache.into()),
            )
            .output()
            .unwrap_or_else(|e| panic!("running {}: {e}", script.display()));
        assert!(
            output.status.success(),
            "{} failed ({}):\n{}",
            script.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        let stdout = String::from_utf8(output.stdout).expect("the build script prints UTF-8");
        let vars: BTreeMap<&str, &str> = stdout.lines().filter_map(|l| l.split_once('=')).collect();
        let var = |name: &str| {
            vars.get(name)
                .unwrap_or_else(|| panic!("build-tiny.sh printed no {name}:\n{stdout}"))
                .to_string()
        };
        println!(
            "tiny guest ready in {:.1} s: {}",
            started.elapsed().as_secs_f64(),
            var("FERRO_TINY_KERNEL")
        );
        TinyGuest {
            kernel: std::path::absolute(var("FERRO_TINY_KERNEL")).expect("absolute"),
            initrd: std::path::absolute(var("FERRO_TINY_INITRD")).expect("absolute"),
            disk: std::path::absolute(var("FERRO_TINY_DISK")).expect("absolute"),
            bios_disk: std::path::absolute(var("FERRO_TINY_BIOS_DISK")).expect("absolute"),
            cmdline: var("FERRO_TINY_CMDLINE"),
        }
    })
}

/// Sends SIGKILL to a process.
pub fn kill(pid: u32) {
    let pid = rustix::process::Pid::from_raw(pid as i32).expect("pids are positive");
    let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
}

/// The pids of every process that is VM `uid`'s QEMU.
pub fn qemu_processes(uid: &str) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .expect("/proc")
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| is_vm_process(*pid, uid))
        .collect()
}

/// Kills, by pid, the QEMU of every VM directory under `vm_dir` (as named by its
/// pidfile and checked against its command line), and waits for them to go.
pub fn kill_vms_under(vm_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(vm_dir) else {
        return;
    };
    for entry in entries.flatten() {
        let uid = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = std::fs::read_to_string(entry.path().join("qemu.pid"))
            .ok()
            .and_then(|p| p.trim().parse::<u32>().ok())
        else {
            continue;
        };
        if !is_vm_process(pid, &uid) {
            continue;
        }
        eprintln!("cleaning up: killing QEMU {pid} of VM {uid}");
        kill(pid);
        let deadline = Instant::now() + Duration::from_secs(10);
        while is_vm_process(pid, &uid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}
