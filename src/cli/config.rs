//! The CLI's config file: where the apiserver is, the token to present and the default
//! project. `ferro up` writes it; `apply`, `get` and `delete` read it.
//!
//! It lives at `$FERRO_CONFIG`, else `$XDG_CONFIG_HOME/ferro/config.yaml`, else
//! `~/.config/ferro/config.yaml`, and looks like:
//!
//! ```yaml
//! server: 127.0.0.1:7443
//! token: 3f9a…
//! project: default
//! ```

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::Deserialize;

/// The contents of the config file; every field is optional.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The apiserver's address, `HOST:PORT`.
    pub server: Option<String>,
    /// The bearer token.
    pub token: Option<String>,
    /// The project `-p` defaults to.
    pub project: Option<String>,
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
    let config = serde_saphyr::from_str(&text)
        .map_err(|e| anyhow::anyhow!("{}", e.to_string().lines().next().unwrap_or_default()))
        .with_context(|| format!("cannot parse {}", path.display()))?;
    Ok(Some(config))
}

/// Writes the config file (mode 0600: it holds a token), creating its directory.
pub fn write(path: &Path, config: &Config) -> anyhow::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let mut text = String::from("# Written by `ferro up`: where the CLI finds the apiserver.\n");
    for (key, value) in [
        ("server", &config.server),
        ("token", &config.token),
        ("project", &config.project),
    ] {
        if let Some(value) = value {
            text.push_str(&format!("{key}: {}\n", yaml_string(value)));
        }
    }
    // Write beside it and rename, so a reader never sees half a file.
    let tmp = path.with_extension("yaml.tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    file.write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))
}

/// A double-quoted YAML scalar, so no value is mistaken for a number or a boolean.
fn yaml_string(value: &str) -> String {
    format!("\"{}\"", value.replace('\\', "\\\\").replace('"', "\\\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_config_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/config.yaml");
        let config = Config {
            server: Some("127.0.0.1:7443".into()),
            token: Some("0123abcd".into()),
            project: Some("default".into()),
        };
        write(&path, &config).unwrap();
        assert_eq!(load(&path).unwrap(), Some(config));
        let mode = std::fs::metadata(&path).unwrap().permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
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
}
