//! The agent's view of the Servers bound to its node: a cache kept by List + Watch with
//! the field selector `status.node=<node>`, which enqueues the uid of every Server that
//! changes.
//!
//! The loop is kube-runtime's watcher: list, watch from the list's revision, and list
//! again when the watch ends or its revision has expired. A relist enqueues what changed
//! while the watch was down, including Servers that vanished (so that their guests are
//! looked at). Objects only move forward: one older than what the cache holds (a late
//! watch event after the agent stored its own status write) is ignored.
//!
//! Only changes that matter to the agent enqueue a key: spec, metadata and the placement
//! decisions. Status changes by other writers, and the agent's own status writes coming
//! back through the watch, do not.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use ferro_api::client::{Client, Selection};
use ferro_api::v1::watch_event::Type as EventType;
use ferro_api::{Error, Kind, Resource, v1};
use futures::StreamExt;

use crate::queue::WorkQueue;

/// The Servers bound to this node, by uid.
#[derive(Debug, Default)]
pub struct ServerCache {
    servers: RwLock<HashMap<String, v1::Server>>,
    synced: std::sync::atomic::AtomicBool,
}

/// A Server's uid, or "" when it has none.
pub fn uid_of(server: &v1::Server) -> &str {
    server.metadata.as_ref().map_or("", |m| m.uid.as_str())
}

fn revision_of(server: &v1::Server) -> i64 {
    server.metadata.as_ref().map_or(0, |m| m.resource_version)
}

/// The parts of a Server whose change calls for a reconcile.
fn significant(server: &v1::Server) -> v1::Server {
    let mut metadata = server.metadata.clone().unwrap_or_default();
    metadata.resource_version = 0;
    metadata.managed_keys.clear();
    let status = server.status.as_ref().map(|s| v1::ServerStatus {
        node: s.node.clone(),
        flavor: s.flavor.clone(),
        resolved: s.resolved.clone(),
        ..Default::default()
    });
    v1::Server {
        metadata: Some(metadata),
        spec: server.spec.clone(),
        status,
    }
}

impl ServerCache {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, v1::Server>> {
        self.servers.read().expect("server cache poisoned")
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, v1::Server>> {
        self.servers.write().expect("server cache poisoned")
    }

    /// The Server with this uid, if it is bound here.
    pub fn get(&self, uid: &str) -> Option<v1::Server> {
        self.read().get(uid).cloned()
    }

    /// The uids of every cached Server.
    pub fn uids(&self) -> Vec<String> {
        self.read().keys().cloned().collect()
    }

    /// Whether a first List has filled the cache.
    pub fn synced(&self) -> bool {
        self.synced.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Stores a newer version of a Server; says whether the change calls for a reconcile.
    /// An object older than the cached one changes nothing.
    pub fn upsert(&self, server: v1::Server) -> bool {
        let uid = uid_of(&server).to_owned();
        if uid.is_empty() {
            return false;
        }
        let mut servers = self.write();
        match servers.get(&uid) {
            Some(cached) if revision_of(cached) > revision_of(&server) => false,
            Some(cached) => {
                let matters = significant(cached) != significant(&server);
                servers.insert(uid, server);
                matters
            }
            None => {
                servers.insert(uid, server);
                true
            }
        }
    }

    /// Forgets a Server; says whether it was cached.
    pub fn remove(&self, uid: &str) -> bool {
        self.write().remove(uid).is_some()
    }

    /// Replaces the whole cache with a List's result; returns the uids that appeared,
    /// changed or vanished.
    pub fn replace(&self, servers: Vec<v1::Server>) -> Vec<String> {
        let mut cache = self.write();
        let mut fresh: HashMap<String, v1::Server> = servers
            .into_iter()
            .filter(|s| !uid_of(s).is_empty())
            .map(|s| (uid_of(&s).to_owned(), s))
            .collect();
        let mut changed: Vec<String> = cache
            .keys()
            .filter(|uid| !fresh.contains_key(*uid))
            .cloned()
            .collect();
        for (uid, server) in &mut fresh {
            match cache.get(uid) {
                // Keep a newer copy the agent stored itself after a status write.
                Some(cached) if revision_of(cached) > revision_of(server) => {
                    *server = cached.clone();
                }
                Some(cached) if significant(cached) == significant(server) => {}
                _ => changed.push(uid.clone()),
            }
        }
        *cache = fresh;
        self.synced
            .store(true, std::sync::atomic::Ordering::Release);
        changed
    }
}

/// Keeps `cache` in step with the Servers bound to `node` and enqueues the uid of every
/// Server that changed. Runs until cancelled; errors are logged and retried.
pub async fn run(
    client: Client,
    node: String,
    cache: Arc<ServerCache>,
    queue: Arc<WorkQueue<String>>,
) {
    let selection = Selection::all().fields(format!("status.node={node}"));
    let mut retry = Duration::from_millis(500);
    loop {
        match list_and_watch(&client, &selection, &cache, &queue).await {
            Ok(()) => {
                tracing::debug!("server watch ended; listing again");
                retry = Duration::from_millis(500);
            }
            Err(Error::Expired { message }) => {
                tracing::info!(%message, "server watch expired; listing again");
                retry = Duration::from_millis(500);
            }
            Err(e) => {
                tracing::warn!(error = %e, ?retry, "listing or watching servers failed");
                tokio::time::sleep(retry).await;
                retry = (retry * 2).min(Duration::from_secs(10));
            }
        }
    }
}

async fn list_and_watch(
    client: &Client,
    selection: &Selection,
    cache: &ServerCache,
    queue: &WorkQueue<String>,
) -> Result<(), Error> {
    let (objects, revision) = client.list(Kind::Server, selection).await?;
    let servers = objects
        .into_iter()
        .filter_map(v1::Server::from_object)
        .collect();
    for uid in cache.replace(servers) {
        queue.add(uid);
    }
    let mut events = client.watch(Kind::Server, selection, revision).await?;
    while let Some(event) = events.next().await {
        let event = event?;
        let Some(object) = event.object.map(ferro_api::Object::try_from).transpose()? else {
            continue;
        };
        let Some(server) = v1::Server::from_object(object) else {
            continue;
        };
        let uid = uid_of(&server).to_owned();
        let changed = match EventType::try_from(event.r#type) {
            Ok(EventType::Added | EventType::Modified) => cache.upsert(server),
            Ok(EventType::Deleted) => {
                cache.remove(&uid);
                true
            }
            _ => false,
        };
        if changed {
            queue.add(uid);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(uid: &str, rv: i64, power: i32) -> v1::Server {
        v1::Server {
            metadata: Some(v1::ObjectMeta {
                name: format!("s-{uid}"),
                project: "p".into(),
                uid: uid.into(),
                resource_version: rv,
                ..Default::default()
            }),
            spec: Some(v1::ServerSpec {
                power_state: Some(power),
                ..Default::default()
            }),
            status: Some(v1::ServerStatus {
                node: "n1".into(),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn only_changes_that_matter_call_for_a_reconcile() {
        let cache = ServerCache::new();
        assert!(cache.upsert(server("a", 1, 1)));
        // Someone else's status write: nothing to do.
        let mut other = server("a", 2, 1);
        other.status.as_mut().unwrap().phase = 3;
        assert!(!cache.upsert(other));
        assert_eq!(revision_of(&cache.get("a").unwrap()), 2);
        // A spec change matters.
        assert!(cache.upsert(server("a", 3, 2)));
    }

    #[test]
    fn objects_only_move_forward() {
        let cache = ServerCache::new();
        cache.upsert(server("a", 5, 2));
        assert!(!cache.upsert(server("a", 4, 1)));
        assert_eq!(revision_of(&cache.get("a").unwrap()), 5);
    }

    #[test]
    fn a_relist_reports_what_appeared_changed_or_vanished() {
        let cache = ServerCache::new();
        assert!(!cache.synced());
        cache.upsert(server("same", 1, 1));
        cache.upsert(server("changed", 1, 1));
        cache.upsert(server("gone", 1, 1));
        let mut changed = cache.replace(vec![
            server("same", 2, 1),
            server("changed", 2, 2),
            server("new", 2, 1),
        ]);
        changed.sort();
        assert_eq!(changed, ["changed", "gone", "new"]);
        assert!(cache.synced());
        assert!(cache.get("gone").is_none());
        let mut uids = cache.uids();
        uids.sort();
        assert_eq!(uids, ["changed", "new", "same"]);
    }
}
