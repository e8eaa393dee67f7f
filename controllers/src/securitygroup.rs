//! The security group controller: every Project has a SecurityGroup named `default`.
//!
//! As in Neutron, the `default` group lets in traffic only from ports of the same group
//! and lets everything out, over IPv4 and IPv6 ([`default_group`]). It is created here, by
//! a controller through the API like any user object, never by the apiserver writing spec:
//! it is the project's own object from then on, and its rules may be edited. Deleted while
//! the Project lives, it is made again (with the default rules); it carries a controller
//! reference to its Project, so the garbage collector removes it with the Project. A
//! `default` group that someone else made first is left alone.

use std::sync::Arc;

use ferro_api::{Error, Kind, Object, v1};

use crate::api::Api;
use ferro_runtime::{
    Action, Caches, Controller, ObjectRef, Reconcile, ReconcileError, Store, controller::Settings,
    controller_reference, is_deleting, meta, metrics::Metrics,
};

/// How often a project whose quota had no room for its default group is looked at again.
const QUOTA_RETRY: std::time::Duration = std::time::Duration::from_secs(300);

/// The name of every project's default group.
pub const DEFAULT_GROUP: &str = "default";

/// The default group of a project: ingress from members of the group, all egress, for
/// IPv4 and IPv6; owned by the Project.
pub fn default_group(project: &v1::Project) -> v1::SecurityGroup {
    use v1::security_group_rule::{Direction, Ethertype, Protocol};
    let rule =
        |direction: Direction, ethertype: Ethertype, remote_group: &str| v1::SecurityGroupRule {
            direction: direction as i32,
            ethertype: Some(ethertype as i32),
            protocol: Some(Protocol::Any as i32),
            remote_group: remote_group.to_owned(),
            ..Default::default()
        };
    let rules = vec![
        rule(Direction::Ingress, Ethertype::IPv4, DEFAULT_GROUP),
        rule(Direction::Ingress, Ethertype::IPv6, DEFAULT_GROUP),
        rule(Direction::Egress, Ethertype::IPv4, ""),
        rule(Direction::Egress, Ethertype::IPv6, ""),
    ];
    v1::SecurityGroup {
        metadata: Some(v1::ObjectMeta {
            name: DEFAULT_GROUP.to_owned(),
            project: meta(project).name.clone(),
            owner_references: vec![controller_reference(project, false)],
            ..Default::default()
        }),
        spec: Some(v1::SecurityGroupSpec {
            rules,
            description: "Ingress from members of this group only; all egress.".to_owned(),
        }),
        status: None,
    }
}

/// The security group controller: reconciles Projects.
pub struct SecurityGroupController {
    api: Api,
    projects: Store<v1::Project>,
    groups: Store<v1::SecurityGroup>,
}

impl SecurityGroupController {
    /// Builds the controller over the shared caches.
    pub fn build(
        api: &Api,
        caches: &Caches,
        metrics: &Metrics,
        settings: Settings,
    ) -> (Controller, Arc<SecurityGroupController>) {
        let projects = caches.store::<v1::Project>();
        let groups = caches.store::<v1::SecurityGroup>();
        let controller = Controller::new("security-group", settings, metrics.clone())
            .reconciles(&projects)
            .watches(&groups, |c| {
                // A default group gone: its project needs another.
                match (&c.old, &c.new) {
                    (Some(old), None) if meta(old.as_ref()).name == DEFAULT_GROUP => {
                        vec![ObjectRef::new(
                            Kind::Project,
                            "",
                            meta(old.as_ref()).project.clone(),
                        )]
                    }
                    _ => Vec::new(),
                }
            });
        let reconciler = Arc::new(SecurityGroupController {
            api: api.clone(),
            projects,
            groups,
        });
        (controller, reconciler)
    }
}

impl Reconcile for SecurityGroupController {
    type Error = ReconcileError;

    async fn reconcile(&self, key: ObjectRef) -> Result<Action, ReconcileError> {
        let Some(project) = self.projects.get(&key) else {
            return Ok(Action::AwaitChange);
        };
        if is_deleting(project.as_ref()) {
            // Emptied with the project; a new group now would only delay that.
            return Ok(Action::AwaitChange);
        }
        let name = &meta(project.as_ref()).name;
        if self.groups.get_named(name, DEFAULT_GROUP).is_some() {
            return Ok(Action::AwaitChange);
        }
        match self
            .api
            .create(Object::SecurityGroup(default_group(&project)))
            .await
        {
            // Made already (the cache lags), or by someone else first: theirs stands.
            Ok(_) | Err(Error::AlreadyExists { .. }) => Ok(Action::AwaitChange),
            // The project went meanwhile.
            Err(Error::NotFound { .. }) => Ok(Action::AwaitChange),
            // The project's quota has no room for it: counted like any group, as in
            // Neutron. Looked at again later rather than retried hot.
            Err(e @ Error::ResourceExhausted { .. }) => {
                tracing::warn!(project = %name, error = %e, "no room for the default security group");
                Ok(Action::Requeue(QUOTA_RETRY))
            }
            Err(e) => Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_group_admits_its_members_and_lets_everything_out() {
        let project = v1::Project {
            metadata: Some(v1::ObjectMeta {
                name: "team".into(),
                uid: "pu".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let group = default_group(&project);
        let m = group.metadata.as_ref().unwrap();
        assert_eq!((m.name.as_str(), m.project.as_str()), ("default", "team"));
        let owner = &m.owner_references[0];
        assert!(owner.controller && owner.kind == "Project" && owner.uid == "pu");
        assert!(owner.project.is_empty(), "a Project is cluster-scoped");
        // As the apiserver would default them: applying this object writes nothing new.
        let mut object = Object::SecurityGroup(group.clone());
        ferro_api::validation::apply_defaults(&mut object);
        ferro_api::validation::validate_create(&object).expect("a valid group");
        assert_eq!(object, Object::SecurityGroup(group.clone()));
        let rules: Vec<String> = group
            .spec
            .unwrap()
            .rules
            .iter()
            .map(|r| {
                format!(
                    "{:?} {:?} group={:?}",
                    r.direction(),
                    r.ethertype(),
                    r.remote_group
                )
            })
            .collect();
        assert_eq!(
            rules,
            [
                "Ingress IPv4 group=\"default\"",
                "Ingress IPv6 group=\"default\"",
                "Egress IPv4 group=\"\"",
                "Egress IPv6 group=\"\"",
            ]
        );
    }
}
