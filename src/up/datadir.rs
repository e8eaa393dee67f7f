//! The data directory of `ferro up` and what lives in it:
//!
//! | path | what |
//! |---|---|
//! | `ferro-up.pid` | the supervisor's pid, locked (`flock`) while it runs |
//! | `tokens` | `TOKEN IDENTITY` lines (mode 0600), minted on first start |
//! | `etcd/`, `etcd.log` | etcd's data and log |
//! | `etcd.urls` | etcd's client URL, then its peer URL: kept so restarts reuse the ports |
//! | `etcd.pid` | the pid of the etcd member itself |
//! | `run/<child>.pid` | the pid of each child the supervisor started |
//! | `log/<child>.log` | each child's output |
//! | `agent/` | the agent's state (guests, images), with one node |
//! | `ovs/` | the node's private Open vSwitch instance, with one node and the ovs driver |
//! | `nodes/node-<i>/agent/`, `nodes/node-<i>/ovs/` | the same per node, with `--nodes N` |
//! | `topology.json` | the namespaces, links and switches made, each recorded before it is |
//!
//! The lock, not the pid, says whether a `ferro up` owns the directory: the kernel drops
//! it when its holder dies, even by SIGKILL. Pidfiles are how leftovers of a killed
//! supervisor are found; a process is only stopped if its command line names this
//! directory (pids get reused).

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, anyhow};

use crate::process;

/// How long a leftover process gets after SIGTERM before SIGKILL.
const LEFTOVER_GRACE: Duration = Duration::from_secs(10);

/// The paths of a data directory.
#[derive(Clone, Debug)]
pub struct DataDir {
    root: PathBuf,
}

impl DataDir {
    /// The data directory at `path`, created (mode 0711) if missing; the path is made
    /// absolute so that command lines naming it can be recognised.
    pub fn create(path: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(path)
            .with_context(|| format!("cannot create the data directory {}", path.display()))?;
        let root = path
            .canonicalize()
            .with_context(|| format!("cannot resolve {}", path.display()))?;
        // Tokens and the store live here, each private (0600 files, etcd's own 0700
        // directory); the directory itself may be passed through but not listed (0711),
        // because dnsmasq re-reads its hosts file as `nobody` from the agent's state.
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o711))
            .with_context(|| format!("cannot set the mode of {}", root.display()))?;
        for dir in [root.join("run"), root.join("log")] {
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        Ok(DataDir { root })
    }

    /// An existing data directory, or `None` when there is none at `path`.
    pub fn existing(path: &Path) -> Option<Self> {
        let root = path.canonicalize().ok()?;
        root.is_dir().then_some(DataDir { root })
    }

    /// The directory itself.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The supervisor's locked pidfile.
    pub fn pidfile(&self) -> PathBuf {
        self.root.join("ferro-up.pid")
    }

    /// The token file.
    pub fn tokens(&self) -> PathBuf {
        self.root.join("tokens")
    }

    /// The apiserver's image store: uploaded images' bytes.
    pub fn image_store(&self) -> PathBuf {
        self.root.join("image-store")
    }

    /// The node agent's state: guests and the image cache.
    pub fn agent(&self) -> PathBuf {
        self.root.join("agent")
    }

    /// The state directories of every agent this directory has held: the single node's
    /// and each node's of `--nodes N`, those that exist.
    pub fn agent_dirs(&self) -> Vec<PathBuf> {
        let mut dirs: Vec<PathBuf> = std::fs::read_dir(self.root.join("nodes"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path().join("agent"))
            .collect();
        dirs.sort();
        dirs.insert(0, self.agent());
        dirs.retain(|d| d.is_dir());
        dirs
    }

    /// etcd's data directory.
    pub fn etcd_data(&self) -> PathBuf {
        self.root.join("etcd")
    }

    /// The etcd member's pidfile.
    pub fn etcd_pidfile(&self) -> PathBuf {
        self.root.join("etcd.pid")
    }

    /// etcd's client and peer URLs.
    pub fn etcd_urls(&self) -> PathBuf {
        self.root.join("etcd.urls")
    }

    /// The pidfile of a child of the supervisor.
    pub fn child_pidfile(&self, name: &str) -> PathBuf {
        self.root.join("run").join(format!("{name}.pid"))
    }

    /// The log of a child of the supervisor.
    pub fn child_log(&self, name: &str) -> PathBuf {
        self.root.join("log").join(format!("{name}.log"))
    }

    /// Whether this looks like a directory `ferro up` made (so `--purge` may remove it).
    pub fn looks_like_ours(&self) -> bool {
        self.pidfile().exists() || self.tokens().exists()
    }

    /// Stops what a previous, killed `ferro up` on this directory left running: its
    /// children and its etcd member. Only processes whose command line names this
    /// directory are touched.
    pub fn stop_leftovers(&self) {
        let mut pidfiles: Vec<(String, PathBuf)> = std::fs::read_dir(self.root.join("run"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "pid"))
            .map(|p| {
                let name = p
                    .file_stem()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned();
                (name, p)
            })
            .collect();
        pidfiles.sort();
        pidfiles.push(("etcd member".into(), self.etcd_pidfile()));
        for (name, pidfile) in pidfiles {
            if let Some(pid) = process::read_pidfile(&pidfile)
                && process::is_alive(pid)
                && process::mentions(pid, &self.root)
            {
                tracing::warn!(
                    pid,
                    "stopping the {name} a previous `ferro up` left running"
                );
                process::terminate(pid, LEFTOVER_GRACE);
            }
            let _ = std::fs::remove_file(&pidfile);
        }
        // An etcd whose pidfile was never written (killed between spawn and write).
        for pid in self.etcd_processes() {
            tracing::warn!(pid, "stopping an etcd a previous `ferro up` left running");
            process::terminate(pid, LEFTOVER_GRACE);
        }
    }

    /// Running etcd processes whose command line names this directory.
    pub fn etcd_processes(&self) -> Vec<u32> {
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| {
                process::cmdline(*pid).is_some_and(|args| {
                    args.first()
                        .is_some_and(|a| Path::new(a).file_name().is_some_and(|n| n == "etcd"))
                }) && process::is_alive(*pid)
                    && process::mentions(*pid, &self.root)
            })
            .collect()
    }
}

/// The claim of one `ferro up` on a data directory: the lock on its pidfile, held until
/// this is dropped or the process dies.
#[derive(Debug)]
pub struct Ownership {
    file: File,
}

impl Ownership {
    /// Claims the directory; fails, naming the owner, if a live `ferro up` holds it.
    pub fn claim(dir: &DataDir) -> anyhow::Result<Self> {
        let path = dir.pidfile();
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o644)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut text = String::new();
                let _ = file.read_to_string(&mut text);
                let owner = text.trim();
                let owner = if owner.is_empty() { "?" } else { owner };
                return Err(anyhow!(
                    "another `ferro up` (pid {owner}) owns {}; stop it with `ferro down \
                     --data-dir {}`",
                    dir.root().display(),
                    dir.root().display()
                ));
            }
            Err(TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("cannot lock {}", path.display()));
            }
        }
        file.set_len(0)?;
        file.rewind()?;
        writeln!(file, "{}", std::process::id())?;
        file.sync_all()?;
        Ok(Ownership { file })
    }
}

impl Drop for Ownership {
    fn drop(&mut self) {
        // Leave the file (removing it could race with the next owner opening it); empty
        // it so no pid is mistaken for a live owner.
        let _ = self.file.set_len(0);
    }
}

/// Whether a live `ferro up` holds the directory, and its pid if written.
pub fn owner(dir: &DataDir) -> anyhow::Result<Option<u32>> {
    let path = dir.pidfile();
    let file = match File::open(&path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("cannot open {}", path.display())),
    };
    match file.try_lock_shared() {
        Ok(()) => Ok(None),
        Err(TryLockError::WouldBlock) => Ok(Some(process::read_pidfile(&path).unwrap_or(0))),
        Err(TryLockError::Error(e)) => {
            Err(e).with_context(|| format!("cannot lock {}", path.display()))
        }
    }
}

/// The tokens of the identities `ferro up` runs with.
#[derive(Clone, Debug)]
pub struct MintedTokens {
    /// The administrator's token, for the CLI.
    pub admin: String,
}

/// Makes sure the token file has a token for each identity, minting the missing ones
/// (32 random bytes, hex) and keeping the others; returns the admin token.
pub fn ensure_tokens(path: &Path, identities: &[String]) -> anyhow::Result<MintedTokens> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let mut pairs: Vec<(String, String)> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split_once(char::is_whitespace))
        .map(|(t, i)| (t.to_owned(), i.trim().to_owned()))
        .collect();
    let mut changed = false;
    for identity in identities {
        if !pairs.iter().any(|(_, i)| i == identity) {
            pairs.push((mint_token()?, identity.clone()));
            changed = true;
        }
    }
    if changed || text.is_empty() {
        let mut out =
            String::from("# TOKEN IDENTITY, minted by `ferro up`; keep this file secret.\n");
        for (token, identity) in &pairs {
            out.push_str(&format!("{token} {identity}\n"));
        }
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(path)
            .with_context(|| format!("cannot write {}", path.display()))?;
        file.write_all(out.as_bytes())?;
        file.sync_all()?;
    }
    // Tighten a file someone loosened.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    let admin = pairs
        .iter()
        .find(|(_, i)| i == ferro_api::auth::ADMIN)
        .map(|(t, _)| t.clone())
        .ok_or_else(|| anyhow!("{} has no admin token", path.display()))?;
    Ok(MintedTokens { admin })
}

fn mint_token() -> anyhow::Result<String> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| anyhow!("cannot get random bytes: {e}"))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// This machine's host name, for its node identity.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_minted_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens");
        let ids = vec!["admin".to_owned(), "system:node:a".to_owned()];
        let first = ensure_tokens(&path, &ids).unwrap();
        assert_eq!(first.admin.len(), 64);
        assert!(first.admin.chars().all(|c| c.is_ascii_hexdigit()));
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        // A new identity is added; existing tokens stay.
        let more = vec!["admin".to_owned(), "system:node:b".to_owned()];
        assert_eq!(ensure_tokens(&path, &more).unwrap().admin, first.admin);
        let tokens = ferro_api::auth::Tokens::load(&path).unwrap();
        for id in ["admin", "system:node:a", "system:node:b"] {
            let token = std::fs::read_to_string(&path)
                .unwrap()
                .lines()
                .find(|l| l.ends_with(&format!(" {id}")))
                .map(|l| l.split(' ').next().unwrap().to_owned())
                .unwrap();
            let who = tokens
                .authenticate(Some(&format!("Bearer {token}")))
                .unwrap();
            assert_eq!(who.name, id);
        }
    }

    #[test]
    fn a_directory_has_one_owner_at_a_time() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = DataDir::create(&tmp.path().join("d")).unwrap();
        assert_eq!(owner(&dir).unwrap(), None);
        let first = Ownership::claim(&dir).unwrap();
        // flock is per open file: a second claim, even from this process, is refused.
        let error = Ownership::claim(&dir).unwrap_err().to_string();
        assert!(error.contains(&std::process::id().to_string()), "{error}");
        assert_eq!(owner(&dir).unwrap(), Some(std::process::id()));
        drop(first);
        assert_eq!(owner(&dir).unwrap(), None);
        Ownership::claim(&dir).unwrap();
    }
}
