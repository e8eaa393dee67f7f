//! The garbage collector: deletes objects whose owners are gone, and carries out foreground
//! and orphan deletion.
//!
//! It caches every kind (metadata is what it reads) and reconciles any object key:
//! - **as a dependent**, an object with owner references is deleted once none of its
//!   owners remains (background propagation: the owner went first). An owner absent from
//!   the cache is confirmed absent with a live read before anything is deleted, since the
//!   caches of two kinds are not in step. A dependent that still has a live owner only
//!   loses its references to the gone ones;
//! - **as an owner being deleted in the foreground** (`ferro.io/foreground-deletion`), its
//!   dependents are deleted (in the foreground themselves when they have dependents of
//!   their own), and the finalizer is removed once no dependent that blocks owner deletion
//!   remains;
//! - **as an owner being orphaned** (`ferro.io/orphan`), its reference is removed from
//!   every dependent, then the finalizer.
//!
//! Deletes carry the dependent's uid as a precondition, so a new object that took a
//! deleted one's name is never collected in its place.

use std::{collections::HashMap, sync::Arc};

use ferro_api::{
    Error, Kind,
    server::{FOREGROUND_FINALIZER, ORPHAN_FINALIZER},
    v1::{self, delete_request::Propagation},
};

use crate::api::Api;
use ferro_runtime::{
    Action, Caches, Controller, ObjectRef, Reconcile, ReconcileError,
    controller::Settings,
    metrics::Metrics,
    reflector::{AnyStore, MetaChange},
};

/// What became of one owner named by a dependent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OwnerState {
    /// It exists and is not being deleted with propagation.
    Live,
    /// It no longer exists (or its name now belongs to an object with another uid).
    Gone,
    /// It is being deleted in the foreground: dependents go first.
    DeletingForeground,
    /// It is being deleted with orphaning: dependents stay.
    Orphaning,
}

/// What to do with a dependent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DependentPlan {
    /// Leave it.
    Keep,
    /// Delete it (in the foreground when it has dependents of its own).
    Delete {
        /// Foreground propagation.
        foreground: bool,
    },
    /// Remove the references to these owners (by uid); a live owner remains.
    RemoveOwners(Vec<String>),
}

/// Plans a dependent from the states of its owners. Pure.
pub fn plan_dependent(
    owners: &[(v1::OwnerReference, OwnerState)],
    has_dependents: bool,
) -> DependentPlan {
    if owners.is_empty() {
        return DependentPlan::Keep;
    }
    let live = owners.iter().any(|(_, s)| *s == OwnerState::Live);
    if live {
        // Dangling references to gone owners are dropped; a foreground-deleting owner's
        // reference too, which lets that owner finish while this object lives on.
        let drop: Vec<String> = owners
            .iter()
            .filter(|(_, s)| matches!(s, OwnerState::Gone | OwnerState::DeletingForeground))
            .map(|(r, _)| r.uid.clone())
            .collect();
        return if drop.is_empty() {
            DependentPlan::Keep
        } else {
            DependentPlan::RemoveOwners(drop)
        };
    }
    if owners.iter().any(|(_, s)| *s == OwnerState::Orphaning) {
        // The orphaning owner removes its own reference; the object then stays or goes by
        // its remaining owners.
        return DependentPlan::Keep;
    }
    DependentPlan::Delete {
        foreground: has_dependents,
    }
}

/// What to do for an owner being deleted with propagation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OwnerPlan {
    /// Nothing (not being deleted with propagation).
    Nothing,
    /// Foreground: delete these dependents (key, uid, foreground); remove the finalizer
    /// when `finish` (no blocking dependent remains).
    Foreground {
        /// Dependents to delete.
        delete: Vec<(ObjectRef, String, bool)>,
        /// Whether the finalizer can go now.
        finish: bool,
    },
    /// Orphan: remove the owner's reference from these dependents, then the finalizer.
    Orphan {
        /// Dependents to patch.
        dependents: Vec<ObjectRef>,
    },
}

/// One dependent as the owner planner sees it.
pub struct Dependent {
    /// Its key.
    pub key: ObjectRef,
    /// Its metadata.
    pub meta: v1::ObjectMeta,
    /// Whether it has dependents of its own.
    pub has_dependents: bool,
}

/// Plans an owner being deleted with propagation. Pure.
pub fn plan_owner(owner: &v1::ObjectMeta, dependents: &[Dependent]) -> OwnerPlan {
    if owner.deletion_timestamp.is_none() {
        return OwnerPlan::Nothing;
    }
    if owner.finalizers.iter().any(|f| f == ORPHAN_FINALIZER) {
        return OwnerPlan::Orphan {
            dependents: dependents.iter().map(|d| d.key.clone()).collect(),
        };
    }
    if !owner.finalizers.iter().any(|f| f == FOREGROUND_FINALIZER) {
        return OwnerPlan::Nothing;
    }
    let blocking = dependents.iter().any(|d| {
        d.meta
            .owner_references
            .iter()
            .any(|r| r.uid == owner.uid && r.block_owner_deletion)
    });
    let delete = dependents
        .iter()
        .filter(|d| d.meta.deletion_timestamp.is_none())
        .map(|d| (d.key.clone(), d.meta.uid.clone(), d.has_dependents))
        .collect();
    OwnerPlan::Foreground {
        delete,
        finish: !blocking,
    }
}

/// The garbage collector.
pub struct GarbageCollector {
    api: Api,
    stores: HashMap<Kind, Arc<dyn AnyStore>>,
}

/// Kinds the collector does not watch: Events are expired by age, not by owner.
const UNWATCHED: &[Kind] = &[Kind::Event];

fn queue_keys(meta: Option<&v1::ObjectMeta>) -> bool {
    meta.is_some_and(|m| {
        !m.owner_references.is_empty()
            || (m.deletion_timestamp.is_some()
                && m.finalizers
                    .iter()
                    .any(|f| f == FOREGROUND_FINALIZER || f == ORPHAN_FINALIZER))
    })
}

impl GarbageCollector {
    /// Builds the collector, creating a cache of every kind.
    pub fn build(
        api: &Api,
        caches: &Caches,
        metrics: &Metrics,
        settings: Settings,
    ) -> (Controller, Arc<GarbageCollector>) {
        for kind in Kind::ALL.iter().filter(|k| !UNWATCHED.contains(k)) {
            register(caches, *kind);
        }
        let stores: HashMap<Kind, Arc<dyn AnyStore>> = Kind::ALL
            .iter()
            .filter_map(|k| Some((*k, caches.any_store(*k)?)))
            .collect();
        let mut controller = Controller::new("garbage-collector", settings, metrics.clone());
        let all: Vec<Arc<dyn AnyStore>> = stores.values().cloned().collect();
        for store in stores.values() {
            let queue = controller.queue();
            let others = all.clone();
            store.listen_meta(Arc::new(move |c: MetaChange<'_>| {
                if queue_keys(c.new) {
                    queue.add(c.key.clone());
                }
                if let (Some(old), None) = (c.old, c.new) {
                    // Gone: its dependents may have lost their last owner, and its owners
                    // may be waiting for it in the foreground.
                    for other in &others {
                        for (key, _) in other.dependents_of(&old.uid) {
                            queue.add(key);
                        }
                    }
                    for reference in &old.owner_references {
                        if let Some(key) = ObjectRef::of_owner(reference) {
                            queue.add(key);
                        }
                    }
                }
            }));
            controller = controller.reads(store.clone());
        }
        let resync = all.clone();
        controller = controller.resync_with(move || {
            resync
                .iter()
                .flat_map(|s| s.all_meta())
                .filter(|(_, m)| queue_keys(Some(m)))
                .map(|(k, _)| k)
                .collect()
        });
        (
            controller,
            Arc::new(GarbageCollector {
                api: api.clone(),
                stores,
            }),
        )
    }

    fn cached(&self, key: &ObjectRef) -> Option<v1::ObjectMeta> {
        self.stores.get(&key.kind)?.meta_of(key)
    }

    fn dependents(&self, uid: &str) -> Vec<Dependent> {
        let mut out = Vec::new();
        for store in self.stores.values() {
            for (key, meta) in store.dependents_of(uid) {
                let has_dependents = self
                    .stores
                    .values()
                    .any(|s| !s.dependents_of(&meta.uid).is_empty());
                out.push(Dependent {
                    key,
                    meta,
                    has_dependents,
                });
            }
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        out
    }

    /// The state of one owner: from the cache when it is there, else from a live read.
    async fn owner_state(&self, reference: &v1::OwnerReference) -> Result<OwnerState, Error> {
        let Some(key) = ObjectRef::of_owner(reference) else {
            return Ok(OwnerState::Gone);
        };
        let scope_key = match key.kind.scope() {
            ferro_api::kinds::Scope::Cluster => ObjectRef {
                project: String::new(),
                ..key.clone()
            },
            ferro_api::kinds::Scope::Project => key.clone(),
        };
        let meta = match self.cached(&scope_key).filter(|m| m.uid == reference.uid) {
            Some(meta) => meta,
            None => match self
                .api
                .get(scope_key.kind, &scope_key.project, &scope_key.name)
                .await
            {
                Ok(object) => object.metadata().cloned().unwrap_or_default(),
                Err(Error::NotFound { .. }) => return Ok(OwnerState::Gone),
                Err(e) => return Err(e),
            },
        };
        if meta.uid != reference.uid {
            return Ok(OwnerState::Gone);
        }
        Ok(if meta.deletion_timestamp.is_none() {
            OwnerState::Live
        } else if meta.finalizers.iter().any(|f| f == ORPHAN_FINALIZER) {
            OwnerState::Orphaning
        } else if meta.finalizers.iter().any(|f| f == FOREGROUND_FINALIZER) {
            OwnerState::DeletingForeground
        } else {
            OwnerState::Live
        })
    }

    /// Deletes a dependent exactly as read: its uid and resourceVersion are preconditions,
    /// so an object replaced or re-owned since is left alone (and looked at again).
    async fn delete(
        &self,
        key: &ObjectRef,
        live: &v1::ObjectMeta,
        foreground: bool,
    ) -> Result<(), ReconcileError> {
        let request = v1::DeleteRequest {
            key: Some(v1::ObjectKey {
                kind: key.kind.name().into(),
                project: key.project.clone(),
                name: key.name.clone(),
            }),
            propagation: if foreground {
                Propagation::Foreground
            } else {
                Propagation::Background
            } as i32,
            precondition_uid: live.uid.clone(),
            precondition_resource_version: live.resource_version,
            ..Default::default()
        };
        match self.api.delete(request).await {
            Ok(_) | Err(Error::NotFound { .. }) => {
                tracing::debug!(object = %key, "collected");
                Ok(())
            }
            Err(Error::Conflict { .. }) => Err(ReconcileError::Retry(format!(
                "{key} changed while being collected"
            ))),
            Err(e) => Err(e.into()),
        }
    }

    /// The object as stored now; `None` when it is gone or is another object (uid).
    async fn live_meta(&self, key: &ObjectRef, uid: &str) -> Result<Option<v1::ObjectMeta>, Error> {
        match self.api.get(key.kind, &key.project, &key.name).await {
            Ok(object) => Ok(object.metadata().cloned().filter(|m| m.uid == uid)),
            Err(Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn owner_states(
        &self,
        meta: &v1::ObjectMeta,
    ) -> Result<Vec<(v1::OwnerReference, OwnerState)>, Error> {
        let mut states = Vec::new();
        for reference in &meta.owner_references {
            states.push((reference.clone(), self.owner_state(reference).await?));
        }
        Ok(states)
    }

    /// Deletes a dependent, or drops its references to gone owners, as its owners' states
    /// say. The cache decides whether to look; the object as stored decides what to do,
    /// since its cached owner references may be stale (an orphaning patch in flight).
    async fn settle_dependent(
        &self,
        key: &ObjectRef,
        cached: &v1::ObjectMeta,
    ) -> Result<(), ReconcileError> {
        let has_dependents = |uid: &str| {
            self.stores
                .values()
                .any(|s| !s.dependents_of(uid).is_empty())
        };
        if plan_dependent(
            &self.owner_states(cached).await?,
            has_dependents(&cached.uid),
        ) == DependentPlan::Keep
        {
            return Ok(());
        }
        let Some(live) = self.live_meta(key, &cached.uid).await? else {
            return Ok(());
        };
        if live.deletion_timestamp.is_some() {
            return Ok(());
        }
        match plan_dependent(&self.owner_states(&live).await?, has_dependents(&live.uid)) {
            DependentPlan::Keep => Ok(()),
            DependentPlan::Delete { foreground } => self.delete(key, &live, foreground).await,
            DependentPlan::RemoveOwners(uids) => {
                let request = v1::PatchMetadataRequest {
                    remove_owner_uids: uids,
                    ..Default::default()
                };
                Ok(self.patch(key, request).await?)
            }
        }
    }

    async fn patch(&self, key: &ObjectRef, request: v1::PatchMetadataRequest) -> Result<(), Error> {
        let request = v1::PatchMetadataRequest {
            key: Some(v1::ObjectKey {
                kind: key.kind.name().into(),
                project: key.project.clone(),
                name: key.name.clone(),
            }),
            ..request
        };
        match self.api.patch_metadata(request).await {
            Ok(_) | Err(Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

fn register(caches: &Caches, kind: Kind) {
    macro_rules! store {
        ($($kind:ident => $ty:ident),* $(,)?) => {
            match kind {
                $(Kind::$kind => { caches.store::<v1::$ty>(); })*
            }
        };
    }
    store! {
        Server => Server, Flavor => Flavor, KeyPair => KeyPair, ServerGroup => ServerGroup, Node => Node,
        Network => Network, Port => Port, Router => Router, FloatingIP => FloatingIp,
        SecurityGroup => SecurityGroup, Volume => Volume, VolumeSnapshot => VolumeSnapshot, Image => Image,
        Project => Project, User => User, RoleBinding => RoleBinding, Quota => Quota, Event => Event,
        Lease => Lease, IPAddress => IpAddress, MACAddress => MacAddress, SegmentID => SegmentId,
    }
}

impl Reconcile for GarbageCollector {
    type Error = ReconcileError;

    async fn reconcile(&self, key: ObjectRef) -> Result<Action, ReconcileError> {
        let Some(meta) = self.cached(&key) else {
            return Ok(Action::AwaitChange);
        };

        // As an owner being deleted with propagation.
        match plan_owner(&meta, &self.dependents(&meta.uid)) {
            OwnerPlan::Nothing => {}
            OwnerPlan::Orphan { dependents } => {
                for dependent in &dependents {
                    self.patch(
                        dependent,
                        v1::PatchMetadataRequest {
                            remove_owner_uids: vec![meta.uid.clone()],
                            ..Default::default()
                        },
                    )
                    .await?;
                }
                self.patch(
                    &key,
                    v1::PatchMetadataRequest {
                        remove_finalizers: vec![ORPHAN_FINALIZER.into()],
                        ..Default::default()
                    },
                )
                .await?;
                return Ok(Action::AwaitChange);
            }
            OwnerPlan::Foreground { delete, finish } => {
                for (dependent, _, _) in &delete {
                    // A dependent with another live owner only loses this reference.
                    if let Some(cached) = self.cached(dependent) {
                        self.settle_dependent(dependent, &cached).await?;
                    }
                }
                if finish {
                    self.patch(
                        &key,
                        v1::PatchMetadataRequest {
                            remove_finalizers: vec![FOREGROUND_FINALIZER.into()],
                            ..Default::default()
                        },
                    )
                    .await?;
                }
                // Dependents going away queue this owner again.
                return Ok(Action::AwaitChange);
            }
        }

        // As a dependent.
        if meta.owner_references.is_empty() || meta.deletion_timestamp.is_some() {
            return Ok(Action::AwaitChange);
        }
        self.settle_dependent(&key, &meta).await?;
        Ok(Action::AwaitChange)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner(uid: &str, block: bool) -> v1::OwnerReference {
        v1::OwnerReference {
            kind: "Port".into(),
            name: uid.into(),
            project: "default".into(),
            uid: uid.into(),
            controller: true,
            block_owner_deletion: block,
        }
    }

    #[test]
    fn dependent_plans() {
        use OwnerState::*;
        type Case = (
            &'static str,
            Vec<(&'static str, OwnerState)>,
            bool,
            DependentPlan,
        );
        let cases: Vec<Case> = vec![
            (
                "no owners: not the collector's business",
                vec![],
                false,
                DependentPlan::Keep,
            ),
            (
                "its owner lives",
                vec![("a", Live)],
                false,
                DependentPlan::Keep,
            ),
            (
                "its owner is gone",
                vec![("a", Gone)],
                false,
                DependentPlan::Delete { foreground: false },
            ),
            (
                "gone, and it owns others",
                vec![("a", Gone)],
                true,
                DependentPlan::Delete { foreground: true },
            ),
            (
                "one of two owners lives",
                vec![("a", Gone), ("b", Live)],
                false,
                DependentPlan::RemoveOwners(vec!["a".into()]),
            ),
            (
                "its owner goes in the foreground",
                vec![("a", DeletingForeground)],
                false,
                DependentPlan::Delete { foreground: false },
            ),
            (
                "another owner keeps it through a foreground delete",
                vec![("a", DeletingForeground), ("b", Live)],
                false,
                DependentPlan::RemoveOwners(vec!["a".into()]),
            ),
            (
                "its owner orphans it",
                vec![("a", Orphaning)],
                false,
                DependentPlan::Keep,
            ),
            (
                "orphaned by one, the other gone",
                vec![("a", Orphaning), ("b", Gone)],
                false,
                DependentPlan::Keep,
            ),
        ];
        for (what, owners, has_dependents, expect) in cases {
            let owners: Vec<(v1::OwnerReference, OwnerState)> = owners
                .into_iter()
                .map(|(u, s)| (owner(u, false), s))
                .collect();
            assert_eq!(plan_dependent(&owners, has_dependents), expect, "{what}");
        }
    }

    fn meta(
        uid: &str,
        finalizers: &[&str],
        deleting: bool,
        owners: Vec<v1::OwnerReference>,
    ) -> v1::ObjectMeta {
        v1::ObjectMeta {
            name: uid.into(),
            project: "default".into(),
            uid: uid.into(),
            finalizers: finalizers.iter().map(|f| (*f).to_owned()).collect(),
            deletion_timestamp: deleting.then_some(prost_types::Timestamp {
                seconds: 1,
                nanos: 0,
            }),
            owner_references: owners,
            ..Default::default()
        }
    }

    fn dependent(uid: &str, block: bool, deleting: bool) -> Dependent {
        Dependent {
            key: ObjectRef::new(Kind::IPAddress, "", uid),
            meta: meta(uid, &[], deleting, vec![owner("o", block)]),
            has_dependents: false,
        }
    }

    #[test]
    fn owner_plans() {
        let live = meta("o", &[], false, vec![]);
        assert_eq!(
            plan_owner(&live, &[dependent("d", true, false)]),
            OwnerPlan::Nothing
        );

        let other_finalizer = meta("o", &["ferro.io/agent"], true, vec![]);
        assert_eq!(
            plan_owner(&other_finalizer, &[dependent("d", true, false)]),
            OwnerPlan::Nothing,
            "background"
        );

        let foreground = meta("o", &[FOREGROUND_FINALIZER], true, vec![]);
        let plan = plan_owner(
            &foreground,
            &[dependent("d1", true, false), dependent("d2", false, true)],
        );
        assert_eq!(
            plan,
            OwnerPlan::Foreground {
                delete: vec![(
                    ObjectRef::new(Kind::IPAddress, "", "d1"),
                    "d1".into(),
                    false
                )],
                finish: false
            },
            "delete what is not yet deleting; wait for the blocking one"
        );
        let plan = plan_owner(&foreground, &[dependent("d2", false, false)]);
        assert!(
            matches!(plan, OwnerPlan::Foreground { finish: true, .. }),
            "non-blocking dependents do not hold it"
        );
        assert_eq!(
            plan_owner(&foreground, &[]),
            OwnerPlan::Foreground {
                delete: vec![],
                finish: true
            }
        );

        let orphan = meta("o", &[ORPHAN_FINALIZER], true, vec![]);
        assert_eq!(
            plan_owner(&orphan, &[dependent("d1", true, false)]),
            OwnerPlan::Orphan {
                dependents: vec![ObjectRef::new(Kind::IPAddress, "", "d1")]
            }
        );
    }
}
