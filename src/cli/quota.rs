//! `ferro quota show [-p PROJECT]`: a project's limits and what it uses, side by side.
//!
//! The figures are the project's Quota named `default`, the one the apiserver enforces:
//! its `spec.hard` and its `status.used`, which every create raises at once and the quota
//! controller recounts from the objects (so a deletion shows after the recount). A thing
//! without a limit shows `-` as its limit; a usage not counted yet shows `-`.

use anyhow::anyhow;
use ferro_api::{
    Error as ApiError, Kind, Object,
    quota::{Counted, ENFORCED_QUOTA},
    v1,
};

use super::{Connection, ConnectionArgs, table::align};

/// Arguments of `ferro quota`.
#[derive(clap::Args, Debug)]
pub struct QuotaArgs {
    /// What to do.
    #[command(subcommand)]
    pub action: QuotaAction,
}

/// The quota verbs.
#[derive(clap::Subcommand, Debug, Clone)]
pub enum QuotaAction {
    /// Print each limit of the project's Quota beside its use.
    Show(ShowArgs),
}

/// Arguments of `ferro quota show`.
#[derive(clap::Args, Debug, Clone)]
pub struct ShowArgs {
    /// The project [default: the config's project, else `default`].
    #[arg(short = 'p', long, value_name = "PROJECT")]
    pub project: Option<String>,
}

/// Runs `ferro quota`.
pub fn run(connection: &ConnectionArgs, args: QuotaArgs) -> anyhow::Result<()> {
    let QuotaAction::Show(show) = args.action;
    let runtime = super::runtime()?;
    let _entered = runtime.enter();
    let connection = Connection::resolve(connection, show.project.as_deref())?;
    let client = connection.client()?;
    let project = connection.project.clone();
    match runtime.block_on(client.get(Kind::Quota, &project, ENFORCED_QUOTA)) {
        Ok(Object::Quota(quota)) => {
            print!("{}", render(&quota));
            Ok(())
        }
        Ok(_) => Err(anyhow!("the apiserver answered another kind")),
        Err(ApiError::NotFound { .. }) => {
            println!(
                "project {project} has no quota (quotas/{ENFORCED_QUOTA}): nothing is limited"
            );
            Ok(())
        }
        Err(e) => Err(anyhow!("{}", connection.explain(&e))),
    }
}

/// The table of one Quota: a row per counted thing, its use and its limit. Pure.
pub fn render(quota: &v1::Quota) -> String {
    let hard = quota.spec.as_ref().and_then(|s| s.hard).unwrap_or_default();
    let used = quota.status.as_ref().and_then(|s| s.used.as_ref());
    let shown = |amount: Option<i64>| amount.map_or_else(|| "-".to_owned(), |a| a.to_string());
    let rows: Vec<Vec<String>> = Counted::ALL
        .iter()
        .map(|r| {
            vec![
                r.name().to_owned(),
                // Counted usage leaves no amount unset; an unset one means "not counted".
                shown(used.map(|u| r.get(u).unwrap_or(0))),
                shown(r.get(&hard)),
            ]
        })
        .collect();
    let project = quota
        .metadata
        .as_ref()
        .map(|m| m.project.as_str())
        .unwrap_or_default();
    let mut out = format!("quotas/{ENFORCED_QUOTA} in project {project}");
    if used.is_none() {
        out.push_str(" (usage not counted yet)");
    }
    out.push('\n');
    out.push_str(&align(&["RESOURCE", "USED", "LIMIT"], &rows));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_and_use_side_by_side() {
        let quota = v1::Quota {
            metadata: Some(v1::ObjectMeta {
                name: "default".into(),
                project: "team-a".into(),
                ..Default::default()
            }),
            spec: Some(v1::QuotaSpec {
                hard: Some(v1::QuotaAmounts {
                    servers: Some(10),
                    ram_mib: Some(16384),
                    ..Default::default()
                }),
            }),
            status: Some(v1::QuotaStatus {
                used: Some(v1::QuotaAmounts {
                    servers: Some(3),
                    vcpus: Some(6),
                    ram_mib: Some(6144),
                    ..Default::default()
                }),
                conditions: vec![],
            }),
        };
        assert_eq!(
            render(&quota),
            "quotas/default in project team-a\n\
             RESOURCE         USED   LIMIT\n\
             servers          3      10\n\
             vcpus            6      -\n\
             ramMib           6144   16384\n\
             volumes          0      -\n\
             volumeGib        0      -\n\
             networks         0      -\n\
             ports            0      -\n\
             routers          0      -\n\
             floatingIps      0      -\n\
             securityGroups   0      -\n"
        );
    }

    #[test]
    fn an_uncounted_quota_says_so() {
        let quota = v1::Quota {
            metadata: Some(v1::ObjectMeta {
                name: "default".into(),
                project: "p".into(),
                ..Default::default()
            }),
            spec: None,
            status: None,
        };
        let text = render(&quota);
        assert!(text.starts_with("quotas/default in project p (usage not counted yet)\n"));
        assert!(text.contains("\nservers          -      -\n"), "{text}");
    }
}
