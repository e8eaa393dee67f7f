//! The CLI's config file: named contexts — where an apiserver is, the token to present
//! and the default project — and which one is current, as kubeconfig holds them. `ferro
//! up` writes a context for its cloud; every verb reads the current one (or `--context`).
//!
//! It lives at `$FERRO_CONFIG`, else `$XDG_CONFIG_HOME/ferro/config.yaml`, else
//! `~/.config/ferro/config.yaml`, and looks like:
//!
//! ```yaml
//! current-context: ferro-dev
//! contexts:
//! - name: ferro-dev
//!   server: 127.0.0.1:7443
//!   token: 3f9a…
//!   project: default
//! ```
//!
//! A context may also carry `ca` (the apiserver's CA, once it serves TLS), `user` (who the
//! token is, once users log in) and `data-dir` (the `ferro up` data directory that wrote
//! it, so a later `ferro up` of the same directory refreshes it rather than adding
//! another). The flat file older releases wrote (`server`, `token`, `project` at the top)
//! is still read, as one context named `default` that is current; the next write stores
//! it in the new form. Writers hold a lock on `config.yaml.lock` beside it (see
//! [`update`]) and replace the file atomically, with mode 0600.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, anyhow};
use serde::Deserialize;

/// The name an old flat config's only context gets.
pub const LEGACY_CONTEXT: &str = "default";

/// One named place to talk to: an apiserver, credentials and a default project.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Context {
    /// The context's name, unique in the file.
    pub name: String,
    /// The apiserver's address, `HOST:PORT`.
    pub server: Option<String>,
    /// The bearer token.
    pub token: Option<String>,
    /// The project `-p` defaults to.
    pub project: Option<String>,
    /// The apiserver's CA certificate (PEM file path), once the apiserver serves TLS.
    pub ca: Option<String>,
    /// Who the token belongs to, once users log in.
    pub user: Option<String>,
    /// The `ferro up` data directory whose cloud this context reaches, when `ferro up`
    /// wrote it.
    pub data_dir: Option<String>,
}

/// The contents of the config file.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// The context verbs use unless `--context` names another.
    pub current_context: Option<String>,
    /// Every context, in the order they were written.
    pub contexts: Vec<Context>,
}

/// The file as written: the current form, or the flat one of older releases.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct ConfigFile {
    current_context: Option<String>,
    #[serde(default)]
    contexts: Vec<Context>,
    server: Option<String>,
    token: Option<String>,
    project: Option<String>,
}

impl From<ConfigFile> for Config {
    fn from(file: ConfigFile) -> Config {
        let mut config = Config {
            current_context: file.current_context,
            contexts: file.contexts,
        };
        let legacy = file.server.is_some() || file.token.is_some() || file.project.is_some();
        if legacy && config.get(LEGACY_CONTEXT).is_none() {
            config.contexts.insert(
                0,
                Context {
                    name: LEGACY_CONTEXT.to_owned(),
                    server: file.server,
                    token: file.token,
                    project: file.project,
                    ..Context::default()
                },
            );
            config
                .current_context
                .get_or_insert_with(|| LEGACY_CONTEXT.to_owned());
        }
        config
    }
}

impl Config {
    /// The context named `name`.
    pub fn get(&self, name: &str) -> Option<&Context> {
        self.contexts.iter().find(|c| c.name == name)
    }

    /// The current context, if one is set and exists.
    pub fn current(&self) -> Option<&Context> {
        self.current_context.as_deref().and_then(|n| self.get(n))
    }

    /// The context to use: `name` when given (an error if there is none of that name),
    /// else the current one (`None` when there is none).
    pub fn select(&self, name: Option<&str>) -> anyhow::Result<Option<&Context>> {
        match name {
            Some(name) => self
                .get(name)
                .map(Some)
                .ok_or_else(|| anyhow!("no context named `{name}` (contexts: {})", self.names())),
            None => Ok(self.current()),
        }
    }

    /// Adds `context`, or replaces the one of the same name.
    pub fn upsert(&mut self, context: Context) {
        match self.contexts.iter_mut().find(|c| c.name == context.name) {
            Some(slot) => *slot = context,
            None => self.contexts.push(context),
        }
    }

    /// Makes `name` the current context; fails when there is no such context.
    pub fn use_context(&mut self, name: &str) -> anyhow::Result<()> {
        if self.get(name).is_none() {
            return Err(anyhow!(
                "no context named `{name}`; contexts: {}",
                self.names()
            ));
        }
        self.current_context = Some(name.to_owned());
        Ok(())
    }

    /// The name `ferro up --data-dir DIR` gives its context: the one a context written
    /// for the same directory already has, else `ferro-<basename>` (just the basename
    /// when it already starts with `ferro`, so `/var/lib/ferro` is `ferro`), else — when
    /// that name belongs to another directory's context — the same with a short hash of
    /// the path, which is stable across runs.
    pub fn context_name_for(&self, data_dir: &Path) -> String {
        let shown = data_dir.display().to_string();
        if let Some(existing) = self
            .contexts
            .iter()
            .find(|c| c.data_dir.as_deref() == Some(shown.as_str()))
        {
            return existing.name.clone();
        }
        let base: String = data_dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                    c
                } else {
                    '-'
                }
            })
            .collect();
        let base = if base.starts_with("ferro") {
            base
        } else if base.is_empty() {
            "ferro".to_owned()
        } else {
            format!("ferro-{base}")
        };
        match self.get(&base) {
            None => base,
            Some(_) => format!("{base}-{:08x}", fnv1a(shown.as_bytes()) as u32),
        }
    }

    /// Whether `ferro up`, having written `own`, makes it current: always when asked
    /// (`forced`), when there is no current context, when the current one is `own` or
    /// reaches `own`'s address (that address is now this cloud's, so the old context
    /// can only reach it); otherwise only if the current context's apiserver does not
    /// answer, which the caller asks of the context returned in [`Takeover::IfGone`].
    pub fn takeover(&self, own: &Context, forced: bool) -> Takeover<'_> {
        match self.current() {
            _ if forced => Takeover::Take,
            None => Takeover::Take,
            Some(current) if current.name == own.name || current.server == own.server => {
                Takeover::Take
            }
            Some(current) => Takeover::IfGone(current),
        }
    }

    fn names(&self) -> String {
        if self.contexts.is_empty() {
            return "none".to_owned();
        }
        self.contexts
            .iter()
            .map(|c| c.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Whether a newly written context becomes the current one; see [`Config::takeover`].
#[derive(Debug, PartialEq, Eq)]
pub enum Takeover<'a> {
    /// Make it current.
    Take,
    /// Make it current only if this context's apiserver does not answer.
    IfGone(&'a Context),
}

/// FNV-1a, 64 bits: a stable hash (std's `DefaultHasher` may change between releases).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Where the config file is, by the rules in the module docs; `None` when neither
/// `$FERRO_CONFIG`, `$XDG_CONFIG_HOME` nor `$HOME` is set.
pub fn path() -> Option<PathBuf> {
    let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
    if let Some(path) = var("FERRO_CONFIG") {
        return Some(PathBuf::from(path));
    }
    if let Some(dir) = var("XDG_CONFIG_HOME") {
        return Some(PathBuf::from(dir).join("ferro/config.yaml"));
    }
    var("HOME").map(|home| PathBuf::from(home).join(".config/ferro/config.yaml"))
}

/// Reads the config file; `Ok(None)` when it does not exist.
pub fn load(path: &Path) -> anyhow::Result<Option<Config>> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    if text.trim().is_empty() {
        return Ok(Some(Config::default()));
    }
    let file: ConfigFile = serde_saphyr::from_str(&text)
        .map_err(|e| anyhow!("{}", e.to_string().lines().next().unwrap_or_default()))
        .with_context(|| format!("cannot parse {}", path.display()))?;
    Ok(Some(file.into()))
}

/// Writes the config file (mode 0600: it holds tokens), creating its directory. The file
/// is written beside the old one and renamed over it, so a reader never sees half a file.
pub fn write(path: &Path, config: &Config) -> anyhow::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let mut text = String::from(
        "# Ferro CLI contexts: `ferro config get-contexts`, `ferro config use-context NAME`.\n",
    );
    if let Some(current) = &config.current_context {
        text.push_str(&format!("current-context: {}\n", yaml_string(current)));
    }
    if config.contexts.is_empty() {
        text.push_str("contexts: []\n");
    } else {
        text.push_str("contexts:\n");
    }
    for context in &config.contexts {
        text.push_str(&format!("- name: {}\n", yaml_string(&context.name)));
        for (key, value) in [
            ("server", &context.server),
            ("token", &context.token),
            ("project", &context.project),
            ("ca", &context.ca),
            ("user", &context.user),
            ("data-dir", &context.data_dir),
        ] {
            if let Some(value) = value {
                text.push_str(&format!("  {key}: {}\n", yaml_string(value)));
            }
        }
    }
    // A unique temporary name: two `ferro up` writing at once must not share it.
    let tmp = path.with_extension(format!("yaml.{}.tmp", std::process::id()));
    let written = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        file.write_all(text.as_bytes())?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written.with_context(|| format!("cannot write {}", path.display()))
}

/// Reads, changes and writes the config file while holding a lock beside it
/// (`<file>.lock`), so that two writers — two `ferro up` starting at once, or `ferro
/// config use-context` meanwhile — never lose each other's change.
pub fn update<T>(path: &Path, change: impl FnOnce(&mut Config) -> T) -> anyhow::Result<T> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let lock_path = path.with_extension("yaml.lock");
    let lock = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&lock_path)
        .with_context(|| format!("cannot open {}", lock_path.display()))?;
    lock.lock()
        .with_context(|| format!("cannot lock {}", lock_path.display()))?;
    let mut config = load(path)?.unwrap_or_default();
    let result = change(&mut config);
    write(path, &config)?;
    Ok(result)
}

/// A double-quoted YAML scalar, so no value is mistaken for a number or a boolean.
fn yaml_string(value: &str) -> String {
    format!("\"{}\"", value.replace('\\', "\\\\").replace('"', "\\\""))
}

/// Arguments of `ferro config`.
#[derive(clap::Subcommand, Debug)]
pub enum ConfigCommand {
    /// List the contexts; `*` marks the current one.
    GetContexts,
    /// Make NAME the current context.
    UseContext {
        /// The context's name.
        name: String,
    },
    /// Print the current context's name.
    CurrentContext,
}

/// Runs `ferro config …`.
pub fn run(command: ConfigCommand) -> anyhow::Result<()> {
    let path = path()
        .ok_or_else(|| anyhow!("no config file: set FERRO_CONFIG, XDG_CONFIG_HOME or HOME"))?;
    let config = load(&path)?.unwrap_or_default();
    match command {
        ConfigCommand::GetContexts => {
            let mut rows = vec![[
                "CURRENT".to_owned(),
                "NAME".to_owned(),
                "SERVER".to_owned(),
                "PROJECT".to_owned(),
            ]];
            for context in &config.contexts {
                let current = config.current_context.as_deref() == Some(context.name.as_str());
                rows.push([
                    if current { "*" } else { "" }.to_owned(),
                    context.name.clone(),
                    context.server.clone().unwrap_or_default(),
                    context.project.clone().unwrap_or_default(),
                ]);
            }
            let widths: Vec<usize> = (0..4)
                .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
                .collect();
            for row in rows {
                let line: Vec<String> = row
                    .iter()
                    .zip(&widths)
                    .map(|(cell, width)| format!("{cell:<width$}"))
                    .collect();
                println!("{}", line.join("   ").trim_end());
            }
            Ok(())
        }
        ConfigCommand::UseContext { name } => {
            update(&path, |config| config.use_context(&name))??;
            println!("switched to context \"{name}\"");
            Ok(())
        }
        ConfigCommand::CurrentContext => match config.current() {
            Some(context) => {
                println!("{}", context.name);
                Ok(())
            }
            None => Err(anyhow!(
                "no current context in {}; `ferro config use-context NAME` sets one",
                path.display()
            )),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn context(name: &str, server: &str) -> Context {
        Context {
            name: name.into(),
            server: Some(server.into()),
            token: Some("0123abcd".into()),
            project: Some("default".into()),
            ..Context::default()
        }
    }

    #[test]
    fn written_config_reads_back_with_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/config.yaml");
        let config = Config {
            current_context: Some("b".into()),
            contexts: vec![
                context("a", "127.0.0.1:7443"),
                Context {
                    ca: Some("/etc/ferro/ca.pem".into()),
                    user: Some("alice".into()),
                    data_dir: Some("/tmp/x \"y\"".into()),
                    ..context("b", "[::1]:7444")
                },
            ],
        };
        write(&path, &config).unwrap();
        assert_eq!(load(&path).unwrap(), Some(config));
        let mode = std::fs::metadata(&path).unwrap().permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
        // Nothing is left beside it.
        assert_eq!(
            std::fs::read_dir(path.parent().unwrap()).unwrap().count(),
            1
        );
    }

    #[test]
    fn concurrent_updates_lose_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.yaml");
        std::thread::scope(|scope| {
            for i in 0..8 {
                let path = &path;
                scope.spawn(move || {
                    update(path, |c| c.upsert(context(&format!("c{i}"), "h:1"))).unwrap()
                });
            }
        });
        assert_eq!(load(&path).unwrap().unwrap().contexts.len(), 8);
    }

    #[test]
    fn an_old_flat_config_is_one_current_context_named_default() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.yaml");
        std::fs::write(
            &path,
            "server: \"127.0.0.1:7443\"\ntoken: \"0123abcd\"\nproject: \"default\"\n",
        )
        .unwrap();
        let config = load(&path).unwrap().unwrap();
        assert_eq!(config.current_context.as_deref(), Some(LEGACY_CONTEXT));
        assert_eq!(
            config.current(),
            Some(&context(LEGACY_CONTEXT, "127.0.0.1:7443"))
        );
        // Written again, it is the new form and reads back the same.
        write(&path, &config).unwrap();
        assert!(
            std::fs::read_to_string(&path)
                .unwrap()
                .contains("contexts:")
        );
        assert_eq!(load(&path).unwrap(), Some(config));
    }

    #[test]
    fn missing_config_is_none_and_unknown_keys_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load(&dir.path().join("nope.yaml")).unwrap(), None);
        let path = dir.path().join("bad.yaml");
        std::fs::write(&path, "servr: x\n").unwrap();
        let error = format!("{:#}", load(&path).unwrap_err());
        assert!(error.contains("bad.yaml"), "{error}");
    }

    #[test]
    fn select_prefers_the_named_context_and_refuses_an_unknown_one() {
        let mut config = Config::default();
        assert_eq!(config.select(None).unwrap(), None);
        config.upsert(context("a", "h:1"));
        config.upsert(context("b", "h:2"));
        config.use_context("a").unwrap();
        assert_eq!(config.select(None).unwrap().unwrap().name, "a");
        assert_eq!(config.select(Some("b")).unwrap().unwrap().name, "b");
        let error = config.select(Some("c")).unwrap_err().to_string();
        assert!(error.contains("no context named `c`"), "{error}");
        assert!(config.use_context("c").is_err());
        assert_eq!(config.current_context.as_deref(), Some("a"));
        // A replaced context keeps its place.
        config.upsert(context("a", "h:3"));
        assert_eq!(config.contexts[0].server.as_deref(), Some("h:3"));
        assert_eq!(config.contexts.len(), 2);
    }

    #[test]
    fn up_takes_the_current_context_only_from_a_cloud_that_may_be_gone() {
        let mut config = Config::default();
        let own = context("ferro-two", "127.0.0.1:2");
        // Nothing current: take it.
        assert_eq!(config.takeover(&own, false), Takeover::Take);
        config.upsert(context("ferro-one", "127.0.0.1:1"));
        config.upsert(own.clone());
        config.use_context("ferro-one").unwrap();
        // Another cloud is current: only if it is gone, or when asked.
        assert_eq!(
            config.takeover(&own, false),
            Takeover::IfGone(config.get("ferro-one").unwrap())
        );
        assert_eq!(config.takeover(&own, true), Takeover::Take);
        // The current context is this cloud's own, or reaches this cloud's address.
        config.use_context("ferro-two").unwrap();
        assert_eq!(config.takeover(&own, false), Takeover::Take);
        config.upsert(context("old", "127.0.0.1:2"));
        config.use_context("old").unwrap();
        assert_eq!(config.takeover(&own, false), Takeover::Take);
        // A current context that names nothing is no current context.
        config.current_context = Some("vanished".into());
        assert_eq!(config.takeover(&own, false), Takeover::Take);
    }

    #[test]
    fn context_names_follow_the_data_directory_and_never_collide() {
        let mut config = Config::default();
        assert_eq!(
            config.context_name_for(Path::new("/var/lib/ferro")),
            "ferro"
        );
        assert_eq!(config.context_name_for(Path::new("/tmp/dev")), "ferro-dev");
        assert_eq!(config.context_name_for(Path::new("/tmp/a b")), "ferro-a-b");
        config.upsert(Context {
            data_dir: Some("/one/data".into()),
            ..context("ferro-data", "h:1")
        });
        // The same directory finds its own context again.
        assert_eq!(
            config.context_name_for(Path::new("/one/data")),
            "ferro-data"
        );
        // Another directory of the same basename gets a stable, distinct name.
        let other = config.context_name_for(Path::new("/two/data"));
        assert!(other.starts_with("ferro-data-"), "{other}");
        assert_eq!(other, config.context_name_for(Path::new("/two/data")));
        assert_ne!(other, config.context_name_for(Path::new("/three/data")));
    }
}
