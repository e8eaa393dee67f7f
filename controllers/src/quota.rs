//! The quota controller: a Quota's `status.used`, recounted from the objects themselves.
//!
//! The apiserver charges each create to the project's Quota in the create's own
//! transaction and never refunds (see [`ferro_api::quota`]). This controller gives back
//! what deletions and shrinks freed, and repairs any drift, by counting the project's
//! objects and writing the count. The count must never miss a concurrent charge, so it is
//! taken from objects read *after* the Quota: the Quota is read from the apiserver
//! (a store read) at revision `q`, the objects through consistent Lists (each at a
//! revision no older than `q`), and the usage is written only while the Quota is still
//! at `q`. A create charged after `q` has moved the Quota, so the write fails with a
//! conflict and the count is taken again.
//!
//! Only the Quota named `default` is enforced; any other Quota in a project is counted
//! too but says so in its `Ready` condition.

use std::{collections::HashMap, sync::Arc, time::Duration};

use ferro_api::{
    Error, Kind, Object,
    client::Selection,
    owners,
    quota::{COUNTED_KINDS, ENFORCED_QUOTA, FlavorSize, Usage, flavor_size},
    v1,
};

use crate::api::Api;
use ferro_runtime::{
    Action, Caches, Controller, ObjectRef, Reconcile, ReconcileError, Store, controller::Settings,
    meta, metrics::Metrics, reflector::Change,
};

/// The index of Quotas by project.
const QUOTA_BY_PROJECT: &str = "quota-by-project";

/// How soon a count that lost its race with a charge is taken again.
const RECOUNT_AFTER: Duration = Duration::from_millis(100);

/// The usage of a project's objects: the sum of what each counts, a Server by the Flavor
/// it names (`flavors`, by name) or else its placement's copy. Pure.
pub fn count<'a>(
    objects: impl IntoIterator<Item = &'a Object>,
    flavors: &HashMap<String, FlavorSize>,
) -> Usage {
    objects
        .into_iter()
        .map(|o| Usage::of(o, flavor_size(o, |name| flavors.get(name).copied())))
        .fold(Usage::default(), |sum, u| sum.plus(&u))
}

/// The `Ready` condition a Quota named `name` gets once counted.
pub fn ready_condition(name: &str) -> v1::Condition {
    let (status, reason, message) = if name == ENFORCED_QUOTA {
        (
            v1::condition::Status::True,
            "Counted",
            "usage counted from the project's objects".to_owned(),
        )
    } else {
        (
            v1::condition::Status::False,
            "NotEnforced",
            format!("usage counted, but only the Quota named {ENFORCED_QUOTA} is enforced"),
        )
    };
    v1::Condition {
        r#type: "Ready".into(),
        status: status as i32,
        reason: reason.into(),
        message,
        ..Default::default()
    }
}

/// Whether a Quota already records `usage` and the `Ready` condition it should. Pure.
pub fn up_to_date(quota: &v1::Quota, usage: &Usage) -> bool {
    let name = meta(quota).name.as_str();
    let wanted = ready_condition(name);
    let ready = quota
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.r#type == "Ready"));
    quota.status.as_ref().and_then(|s| s.used.as_ref()) == Some(&usage.to_amounts())
        && ready.is_some_and(|c| {
            c.status == wanted.status
                && c.reason == wanted.reason
                && c.observed_generation == meta(quota).generation
        })
}

/// The quota controller: reconciles Quotas.
pub struct QuotaController {
    api: Api,
}

/// Every Quota of the project a change happened in.
fn quotas_in_project<T>(quotas: &Store<v1::Quota>, change: &Change<T>) -> Vec<ObjectRef> {
    quotas
        .by_index(QUOTA_BY_PROJECT, &change.key.project)
        .iter()
        .map(|q| ObjectRef::of(q.as_ref()))
        .collect()
}

impl QuotaController {
    /// Builds the controller over the shared caches.
    pub fn build(
        api: &Api,
        caches: &Caches,
        metrics: &Metrics,
        settings: Settings,
    ) -> (Controller, Arc<QuotaController>) {
        let quotas = caches.store::<v1::Quota>();
        quotas.add_index(QUOTA_BY_PROJECT, |q: &v1::Quota| {
            vec![meta(q).project.clone()]
        });
        let every_quota = {
            let quotas = quotas.clone();
            move |_: &Change<v1::Flavor>| quotas.keys()
        };
        macro_rules! in_project {
            () => {{
                let quotas = quotas.clone();
                move |c: &Change<_>| quotas_in_project(&quotas, c)
            }};
        }
        let controller = Controller::new("quota", settings, metrics.clone())
            .reconciles(&quotas)
            .watches(&caches.store::<v1::Server>(), in_project!())
            .watches(&caches.store::<v1::Volume>(), in_project!())
            .watches(&caches.store::<v1::Network>(), in_project!())
            .watches(&caches.store::<v1::Port>(), in_project!())
            .watches(&caches.store::<v1::Router>(), in_project!())
            .watches(&caches.store::<v1::FloatingIp>(), in_project!())
            .watches(&caches.store::<v1::SecurityGroup>(), in_project!())
            .watches(&caches.store::<v1::Flavor>(), every_quota);
        let reconciler = Arc::new(QuotaController { api: api.clone() });
        (controller, reconciler)
    }

    /// Counts a project's objects through consistent Lists.
    async fn count_project(&self, project: &str) -> Result<Usage, Error> {
        let (flavors, _) = self.api.list(Kind::Flavor, &Selection::all()).await?;
        let flavors: HashMap<String, FlavorSize> = flavors
            .iter()
            .filter_map(|f| match f {
                Object::Flavor(f) => {
                    Some((meta(f).name.clone(), FlavorSize::from(f.spec.as_ref()?)))
                }
                _ => None,
            })
            .collect();
        let mut objects = Vec::new();
        for kind in COUNTED_KINDS {
            let (mut items, _) = self.api.list(kind, &Selection::project(project)).await?;
            objects.append(&mut items);
        }
        Ok(count(&objects, &flavors))
    }
}

impl Reconcile for QuotaController {
    type Error = ReconcileError;

    async fn reconcile(&self, key: ObjectRef) -> Result<Action, ReconcileError> {
        if key.kind != Kind::Quota {
            return Ok(Action::AwaitChange);
        }
        // The Quota from the store, not a cache: its revision bounds the count below.
        let quota = match self.api.get(Kind::Quota, &key.project, &key.name).await {
            Ok(Object::Quota(quota)) => quota,
            Ok(_) => return Ok(Action::AwaitChange),
            Err(Error::NotFound { .. }) => return Ok(Action::AwaitChange),
            Err(e) => return Err(e.into()),
        };
        let revision = meta(&quota).resource_version;
        let usage = self.count_project(&key.project).await?;
        if up_to_date(&quota, &usage) {
            return Ok(Action::AwaitChange);
        }
        let object = Object::Quota(v1::Quota {
            metadata: quota.metadata.clone(),
            spec: None,
            status: Some(v1::QuotaStatus {
                used: Some(usage.to_amounts()),
                conditions: vec![],
            }),
        });
        let ready = ready_condition(&key.name);
        match self
            .api
            .update_status_at(
                object,
                owners::QUOTA_CONTROLLER,
                &["used"],
                vec![ready],
                revision,
            )
            .await
        {
            Ok(_) | Err(Error::NotFound { .. }) => Ok(Action::AwaitChange),
            // A charge landed after the count: count again.
            Err(Error::Conflict { .. }) => Ok(Action::Requeue(RECOUNT_AFTER)),
            Err(e) => Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferro_api::{codec, quota::Counted};

    fn object(yaml: &str) -> Object {
        codec::decode_yaml(&format!("apiVersion: ferro/v1\n{yaml}\n"))
            .expect("test YAML decodes")
            .remove(0)
    }

    #[test]
    fn count_sums_every_counted_object() {
        let flavors = HashMap::from([(
            "m1.small".to_owned(),
            FlavorSize {
                vcpus: 2,
                ram_mib: 1024,
            },
        )]);
        let objects = [
            object("kind: Server\nmetadata: {name: a}\nspec: {flavor: m1.small, image: i}"),
            object("kind: Server\nmetadata: {name: b}\nspec: {flavor: m1.small, image: i}"),
            object("kind: Server\nmetadata: {name: c}\nspec: {flavor: gone, image: i}"),
            object("kind: Volume\nmetadata: {name: v}\nspec: {sizeGib: 7}"),
            object("kind: Volume\nmetadata: {name: w}\nspec: {sizeGib: 3}"),
            object("kind: SecurityGroup\nmetadata: {name: sg}\nspec: {}"),
        ];
        let usage = count(&objects, &flavors);
        let got: Vec<(&str, i64)> = Counted::ALL
            .iter()
            .map(|r| (r.name(), usage.get(*r)))
            .filter(|(_, a)| *a != 0)
            .collect();
        assert_eq!(
            got,
            [
                ("servers", 3),
                ("vcpus", 4),
                ("ramMib", 2048),
                ("volumes", 2),
                ("volumeGib", 10),
                ("securityGroups", 1),
            ]
        );
    }

    #[test]
    fn only_the_default_quota_is_ready() {
        assert_eq!(ready_condition("default").reason, "Counted");
        let other = ready_condition("extra");
        assert_eq!(other.status, v1::condition::Status::False as i32);
        assert_eq!(other.reason, "NotEnforced");
    }

    #[test]
    fn a_quota_is_up_to_date_once_its_count_and_condition_match() {
        let Object::Quota(mut quota) =
            object("kind: Quota\nmetadata: {name: default, project: p}\nspec: {}")
        else {
            unreachable!()
        };
        quota.metadata.as_mut().unwrap().generation = 2;
        let mut usage = Usage::default();
        usage.set(Counted::Ports, 3);
        assert!(!up_to_date(&quota, &usage), "never counted");
        let mut ready = ready_condition("default");
        ready.observed_generation = 2;
        quota.status = Some(v1::QuotaStatus {
            used: Some(usage.to_amounts()),
            conditions: vec![ready],
        });
        assert!(up_to_date(&quota, &usage));
        let mut more = usage;
        more.set(Counted::Ports, 4);
        assert!(!up_to_date(&quota, &more), "the count changed");
        quota.metadata.as_mut().unwrap().generation = 3;
        assert!(!up_to_date(&quota, &usage), "the spec changed since");
    }
}
