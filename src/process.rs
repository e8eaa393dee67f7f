//! Processes: children that die with their parent, pidfiles, and finding and stopping a
//! process by pid without ever signalling one we cannot tell is ours.
//!
//! A pid alone is not an identity (pids are reused), so a process found through a pidfile
//! is only signalled when its command line names the data directory it belongs to.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal};

/// Makes the command's process receive SIGTERM when the thread that spawned it exits
/// (`prctl(PR_SET_PDEATHSIG)`), so a child never outlives a supervisor killed with SIGKILL.
///
/// Spawn such children from a thread that lives as long as the supervisor (the main
/// thread): the signal fires when the *thread* that forked the child ends.
pub fn die_with_parent(command: &mut Command) {
    use std::os::unix::process::CommandExt;
    let parent = rustix::process::getpid();
    // SAFETY: the closure runs in the child between fork and exec, where only
    // async-signal-safe operations are allowed. It makes two raw system calls (prctl and
    // getppid) through rustix, which neither allocate nor take locks, and builds an
    // io::Error from a raw errno, which does not allocate either.
    #[allow(unsafe_code)]
    unsafe {
        command.pre_exec(move || {
            rustix::process::set_parent_process_death_signal(Some(Signal::TERM))?;
            // The parent may have died before prctl took effect; then no signal comes.
            if rustix::process::getppid() != Some(parent) {
                return Err(rustix::io::Errno::SRCH.into());
            }
            Ok(())
        });
    }
}

/// Whether a process with this pid exists and is not a zombie.
pub fn is_alive(pid: u32) -> bool {
    let Some(pid) = to_pid(pid) else { return false };
    if rustix::process::test_kill_process(pid).is_err() {
        return false;
    }
    // A zombie has exited; it only waits to be reaped by its parent.
    match std::fs::read_to_string(format!("/proc/{}/stat", pid.as_raw_nonzero())) {
        Ok(stat) => stat
            .rsplit_once(')')
            .map(|(_, rest)| !rest.trim_start().starts_with('Z'))
            .unwrap_or(true),
        Err(_) => false,
    }
}

/// The command line of a process, one entry per argument.
pub fn cmdline(pid: u32) -> Option<Vec<String>> {
    let bytes = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(
        bytes
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect(),
    )
}

/// Whether one of the process's arguments is `dir` or a path inside it (also as the value
/// of an `--opt=PATH` argument).
pub fn mentions(pid: u32, dir: &Path) -> bool {
    let dir = dir.to_string_lossy();
    let inside = format!("{}/", dir.trim_end_matches('/'));
    cmdline(pid).is_some_and(|args| {
        args.iter().any(|arg| {
            let value = arg.split_once('=').map_or(arg.as_str(), |(_, v)| v);
            [arg.as_str(), value]
                .iter()
                .any(|a| *a == dir || a.starts_with(&inside))
        })
    })
}

/// Sends a signal; false when the process does not exist.
pub fn signal(pid: u32, signal: Signal) -> bool {
    to_pid(pid).is_some_and(|pid| rustix::process::kill_process(pid, signal).is_ok())
}

/// Stops a process that is not our child: SIGTERM, up to `grace` for it to exit, then
/// SIGKILL. Returns once it is gone (or after a last wait if SIGKILL did not take).
pub fn terminate(pid: u32, grace: Duration) {
    if !signal(pid, Signal::TERM) {
        return;
    }
    if wait_gone(pid, grace) {
        return;
    }
    tracing::warn!(
        pid,
        "still running {grace:?} after SIGTERM; sending SIGKILL"
    );
    signal(pid, Signal::KILL);
    wait_gone(pid, Duration::from_secs(10));
}

/// Polls until the process is gone; false on timeout.
pub fn wait_gone(pid: u32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while is_alive(pid) {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    true
}

/// Reads a pidfile; `None` when missing or not a pid.
pub fn read_pidfile(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Writes a pidfile.
pub fn write_pidfile(path: &Path, pid: u32) -> std::io::Result<()> {
    std::fs::write(path, format!("{pid}\n"))
}

fn to_pid(pid: u32) -> Option<Pid> {
    i32::try_from(pid).ok().and_then(Pid::from_raw)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_child_is_found_by_the_directory_it_names_and_terminated() {
        let dir = tempfile::tempdir().unwrap();
        let mut child = Command::new("sh")
            .args(["-c", "sleep 300; true", "sh"])
            .arg(dir.path().join("x"))
            .spawn()
            .unwrap();
        let pid = child.id();
        assert!(is_alive(pid));
        // The shell may not have replaced the forked image yet on a loaded machine.
        let begin = Instant::now();
        while !mentions(pid, dir.path()) {
            assert!(
                begin.elapsed() < Duration::from_secs(30),
                "{:?} does not name {}",
                cmdline(pid),
                dir.path().display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(!mentions(pid, &dir.path().join("other")));
        // Reap it from another thread, as its parent would, so it does not stay a zombie.
        let reaper = std::thread::spawn(move || child.wait());
        terminate(pid, Duration::from_secs(10));
        reaper.join().unwrap().unwrap();
        assert!(!is_alive(pid));
    }
}
