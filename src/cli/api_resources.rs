//! `ferro api-resources`: every kind the apiserver serves, with the names the CLI takes
//! for it, as `kubectl api-resources` prints them — from the one table of kinds in
//! `ferro_api::kinds`, so a new kind shows up here and in `ferro get --help` by itself.

use ferro_api::Kind;
use ferro_api::kinds::Scope;

use super::table;

/// The table: NAME (the plural `ferro get` takes), SHORTNAMES, KIND, PROJECT-SCOPED.
pub fn render() -> String {
    let rows: Vec<Vec<String>> = Kind::ALL
        .iter()
        .map(|kind| {
            vec![
                kind.plural().to_owned(),
                kind.short_names().join(","),
                kind.name().to_owned(),
                (kind.scope() == Scope::Project).to_string(),
            ]
        })
        .collect();
    table::align(&["NAME", "SHORTNAMES", "KIND", "PROJECT-SCOPED"], &rows)
}

/// The kinds as `ferro get --help` lists them: `servers (srv)`, one per line.
pub fn kinds_help() -> String {
    let mut text = String::from("Kinds (singular, plural or short name; `ferro api-resources`):\n");
    for kind in Kind::ALL {
        let mut notes: Vec<&str> = kind.short_names().to_vec();
        if kind.scope() == Scope::Cluster {
            notes.push("cluster-scoped");
        }
        if notes.is_empty() {
            text.push_str(&format!("  {}\n", kind.plural()));
        } else {
            text.push_str(&format!("  {} ({})\n", kind.plural(), notes.join(", ")));
        }
    }
    text
}

/// Runs `ferro api-resources`.
pub fn run() -> anyhow::Result<()> {
    print!("{}", render());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_is_listed_with_its_short_names_and_scope() {
        let table = render();
        assert!(table.starts_with("NAME "), "{table}");
        assert_eq!(table.lines().count(), Kind::ALL.len() + 1);
        let servers = table.lines().find(|l| l.starts_with("servers ")).unwrap();
        let cells: Vec<&str> = servers.split_whitespace().collect();
        assert_eq!(cells, ["servers", "srv", "Server", "true"]);
        let flavors = table.lines().find(|l| l.starts_with("flavors ")).unwrap();
        let cells: Vec<&str> = flavors.split_whitespace().collect();
        assert_eq!(cells, ["flavors", "flv", "Flavor", "false"]);
        let help = kinds_help();
        for kind in Kind::ALL {
            assert!(help.contains(&format!("  {}", kind.plural())), "{help}");
        }
        assert!(help.contains("  servers (srv)\n"), "{help}");
        assert!(help.contains("  flavors (flv, cluster-scoped)\n"), "{help}");
        assert!(help.contains("  ports\n"), "{help}");
        assert!(help.contains("  leases (cluster-scoped)\n"), "{help}");
    }
}
