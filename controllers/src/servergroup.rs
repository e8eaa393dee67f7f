//! The server-group controller: a ServerGroup's `status.members`.
//!
//! The members are the names of the Servers in the group's project whose
//! `spec.serverGroup` names it, sorted; a Server being deleted stays a member until it is
//! gone, since its guest may still run. An observation, recomputed whenever a Server joins,
//! leaves or is deleted.

use std::sync::Arc;

use ferro_api::{Error, Kind, Object, owners, v1};

use crate::{api::Api, scheduler::group_key};
use ferro_runtime::{
    Action, Caches, Controller, ObjectRef, Reconcile, ReconcileError, Store, controller::Settings,
    meta, metrics::Metrics,
};

/// The index of Servers by `<project>/<serverGroup>`.
const SERVER_BY_GROUP: &str = "server-group-members";

/// The members of a group, from the Servers that name it. Pure.
pub fn members<'a>(servers: impl IntoIterator<Item = &'a v1::Server>) -> Vec<String> {
    let mut names: Vec<String> = servers.into_iter().map(|s| meta(s).name.clone()).collect();
    names.sort();
    names.dedup();
    names
}

/// The server-group controller: reconciles ServerGroups.
pub struct ServerGroupController {
    api: Api,
    groups: Store<v1::ServerGroup>,
    servers: Store<v1::Server>,
}

impl ServerGroupController {
    /// Builds the controller over the shared caches.
    pub fn build(
        api: &Api,
        caches: &Caches,
        metrics: &Metrics,
        settings: Settings,
    ) -> (Controller, Arc<ServerGroupController>) {
        let groups = caches.store::<v1::ServerGroup>();
        let servers = caches.store::<v1::Server>();
        servers.add_index(SERVER_BY_GROUP, |s: &v1::Server| {
            group_key(s).into_iter().collect()
        });
        let controller = Controller::new("server-group", settings, metrics.clone())
            .reconciles(&groups)
            .watches(&servers, |c| {
                let mut keys: Vec<ObjectRef> = Vec::new();
                for server in c.old.iter().chain(c.new.iter()) {
                    let group = server
                        .spec
                        .as_ref()
                        .map(|s| s.server_group.as_str())
                        .unwrap_or_default();
                    if group.is_empty() {
                        continue;
                    }
                    let key = ObjectRef::new(
                        Kind::ServerGroup,
                        meta(server.as_ref()).project.clone(),
                        group,
                    );
                    if !keys.contains(&key) {
                        keys.push(key);
                    }
                }
                keys
            });
        let reconciler = Arc::new(ServerGroupController {
            api: api.clone(),
            groups,
            servers,
        });
        (controller, reconciler)
    }
}

impl Reconcile for ServerGroupController {
    type Error = ReconcileError;

    async fn reconcile(&self, key: ObjectRef) -> Result<Action, ReconcileError> {
        if key.kind != Kind::ServerGroup {
            return Ok(Action::AwaitChange);
        }
        let Some(group) = self.groups.get(&key) else {
            return Ok(Action::AwaitChange);
        };
        let m = meta(group.as_ref());
        let named = self
            .servers
            .by_index(SERVER_BY_GROUP, &format!("{}/{}", m.project, m.name));
        let wanted = members(named.iter().map(|s| s.as_ref()));
        let current = group
            .status
            .as_ref()
            .map(|s| s.members.as_slice())
            .unwrap_or_default();
        if current == wanted.as_slice() {
            return Ok(Action::AwaitChange);
        }
        let object = Object::ServerGroup(v1::ServerGroup {
            metadata: group.metadata.clone(),
            spec: None,
            status: Some(v1::ServerGroupStatus { members: wanted }),
        });
        match self
            .api
            .update_status(
                object,
                owners::SERVER_GROUP_CONTROLLER,
                &["members"],
                vec![],
            )
            .await
        {
            Ok(_) | Err(Error::NotFound { .. }) => Ok(Action::AwaitChange),
            Err(e) => Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(project: &str, name: &str, group: &str) -> v1::Server {
        v1::Server {
            metadata: Some(v1::ObjectMeta {
                name: name.into(),
                project: project.into(),
                ..Default::default()
            }),
            spec: Some(v1::ServerSpec {
                server_group: group.into(),
                ..Default::default()
            }),
            status: None,
        }
    }

    #[test]
    fn members_are_sorted_names() {
        let servers = [server("p", "web-2", "g"), server("p", "web-1", "g")];
        assert_eq!(members(&servers), ["web-1", "web-2"]);
        assert!(members(&[]).is_empty());
    }

    #[test]
    fn a_server_names_its_group_in_its_own_project() {
        assert_eq!(
            group_key(&server("p", "web-1", "g")).as_deref(),
            Some("p/g")
        );
        assert_eq!(group_key(&server("p", "web-1", "")), None);
    }
}
