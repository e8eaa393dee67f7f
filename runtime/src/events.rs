//! Events: what happened to an object, for people (`ferro describe`).
//!
//! The [`Recorder`] aggregates as Kubernetes does: one Event per involved object, reason and
//! message, whose `count` and `lastTimestamp` grow when it happens again. The Event's name
//! is derived from those, so a restarted controller keeps counting on the same object.
//! Recording is best effort: a failure is logged, never returned, since no reconcile should
//! fail because its diary could not be written. [`expire`] deletes Events that have not
//! recurred for the TTL.

use std::time::Duration;

use ferro_api::{
    Error, Kind, Object, Resource,
    client::{Client, Selection},
    server::DEFAULT_PROJECT,
    v1,
};

use super::{meta, now};

/// Writes Events on behalf of one component.
#[derive(Clone)]
pub struct Recorder {
    client: Client,
    component: String,
}

/// A 64-bit FNV-1a hash: stable across builds, unlike the standard library's hasher.
fn fnv1a(parts: &[&str]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for byte in part.bytes().chain([0u8]) {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
    }
    hash
}

/// The Event's name: the involved object's name (shortened) and a hash of what happened.
pub fn event_name(involved: &v1::OwnerReference, reason: &str, message: &str) -> String {
    let hash = fnv1a(&[
        &involved.kind,
        &involved.project,
        &involved.name,
        &involved.uid,
        reason,
        message,
    ]);
    let prefix: String = involved
        .name
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
        .take(40)
        .collect();
    let prefix = prefix.trim_matches('-').to_ascii_lowercase();
    if prefix.is_empty() {
        format!("event-{hash:016x}")
    } else {
        format!("{prefix}-{hash:016x}")
    }
}

impl Recorder {
    /// A recorder for `component` (`ipam`, `network-controller`, …).
    pub fn new(client: Client, component: impl Into<String>) -> Self {
        Recorder {
            client,
            component: component.into(),
        }
    }

    /// Records a Normal event about a typed object.
    pub async fn normal<T: Resource>(&self, object: &T, reason: &str, message: &str) {
        self.record(
            reference(object),
            v1::event_spec::Type::Normal,
            reason,
            message,
        )
        .await;
    }

    /// Records a Warning event about a typed object.
    pub async fn warning<T: Resource>(&self, object: &T, reason: &str, message: &str) {
        self.record(
            reference(object),
            v1::event_spec::Type::Warning,
            reason,
            message,
        )
        .await;
    }

    /// Records an event, or bumps the count of the same one.
    pub async fn record(
        &self,
        involved: v1::OwnerReference,
        kind: v1::event_spec::Type,
        reason: &str,
        message: &str,
    ) {
        if let Err(e) = self.try_record(&involved, kind, reason, message).await {
            tracing::warn!(object = %involved.name, reason, error = %e, "could not record an event");
        }
    }

    async fn try_record(
        &self,
        involved: &v1::OwnerReference,
        kind: v1::event_spec::Type,
        reason: &str,
        message: &str,
    ) -> Result<(), Error> {
        let project = if involved.project.is_empty() {
            DEFAULT_PROJECT.to_owned()
        } else {
            involved.project.clone()
        };
        let name = event_name(involved, reason, message);
        for _ in 0..4 {
            match self.client.get_typed::<v1::Event>(&project, &name).await {
                Err(Error::NotFound { .. }) => {
                    let stamp = now();
                    let event = v1::Event {
                        metadata: Some(v1::ObjectMeta {
                            name: name.clone(),
                            project: project.clone(),
                            ..Default::default()
                        }),
                        spec: Some(v1::EventSpec {
                            involved_object: Some(involved.clone()),
                            r#type: kind as i32,
                            reason: reason.to_owned(),
                            message: message.to_owned(),
                            count: 1,
                            first_timestamp: Some(stamp),
                            last_timestamp: Some(stamp),
                            reporting_component: self.component.clone(),
                        }),
                        status: None,
                    };
                    match self.client.create(Object::Event(event)).await {
                        Err(Error::AlreadyExists { .. }) => continue,
                        other => return other.map(|_| ()),
                    }
                }
                Ok(mut event) => {
                    let spec = event.spec.get_or_insert_with(Default::default);
                    spec.count += 1;
                    spec.last_timestamp = Some(now());
                    // The read resourceVersion travels with the object: a concurrent bump
                    // makes this fail with Conflict, and the loop reads again.
                    match self.client.update(Object::Event(event)).await {
                        Err(Error::Conflict { .. } | Error::NotFound { .. }) => continue,
                        other => return other.map(|_| ()),
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// The reference an Event carries to a typed object.
pub fn reference<T: Resource>(object: &T) -> v1::OwnerReference {
    let meta = meta(object);
    v1::OwnerReference {
        kind: T::KIND.name().to_owned(),
        name: meta.name.clone(),
        project: meta.project.clone(),
        uid: meta.uid.clone(),
        controller: false,
        block_owner_deletion: false,
    }
}

/// Whether an Event last happened more than `ttl` before `now_seconds`.
pub fn is_expired(event: &v1::Event, ttl: Duration, now_seconds: i64) -> bool {
    let spec = event.spec.clone().unwrap_or_default();
    let last = spec
        .last_timestamp
        .or(spec.first_timestamp)
        .or_else(|| meta(event).creation_timestamp);
    let Some(last) = last else { return false };
    now_seconds.saturating_sub(last.seconds) > i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX)
}

/// Deletes Events that have not recurred for `ttl`, checking every `period`, until dropped.
pub async fn expire(client: Client, ttl: Duration, period: Duration) {
    let mut ticker = tokio::time::interval(period);
    loop {
        ticker.tick().await;
        let Ok((events, _)) = client.list(Kind::Event, &Selection::all()).await else {
            continue;
        };
        let now_seconds = now().seconds;
        for event in events.into_iter().filter_map(v1::Event::from_object) {
            if !is_expired(&event, ttl, now_seconds) {
                continue;
            }
            let meta = meta(&event);
            let request = v1::DeleteRequest {
                key: Some(v1::ObjectKey {
                    kind: Kind::Event.name().into(),
                    project: meta.project.clone(),
                    name: meta.name.clone(),
                }),
                // Only the Event as read: one bumped meanwhile is current again.
                precondition_resource_version: meta.resource_version,
                ..Default::default()
            };
            match client.delete(request).await {
                Ok(_) | Err(Error::NotFound { .. } | Error::Conflict { .. }) => {}
                Err(e) => {
                    tracing::warn!(event = %meta.name, error = %e, "could not expire an event")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn involved(name: &str) -> v1::OwnerReference {
        v1::OwnerReference {
            kind: "Port".into(),
            name: name.into(),
            project: "default".into(),
            uid: "u1".into(),
            ..Default::default()
        }
    }

    #[test]
    fn names_are_stable_valid_and_distinct() {
        let a = event_name(&involved("web-1"), "IpAddressExhausted", "subnet a is full");
        assert_eq!(
            a,
            event_name(&involved("web-1"), "IpAddressExhausted", "subnet a is full")
        );
        assert!(a.starts_with("web-1-") && a.len() <= 63, "{a}");
        assert_ne!(
            a,
            event_name(&involved("web-1"), "IpAddressExhausted", "subnet b is full")
        );
        let long = event_name(&involved(&"x".repeat(63)), "R", "m");
        assert!(long.len() <= 63, "{long}");
        let claim = event_name(&involved("-weird.name-"), "R", "m");
        assert!(
            claim.chars().next().unwrap().is_ascii_alphanumeric(),
            "{claim}"
        );
    }

    #[test]
    fn events_expire_after_their_last_occurrence() {
        let event = v1::Event {
            spec: Some(v1::EventSpec {
                first_timestamp: Some(prost_types::Timestamp {
                    seconds: 0,
                    nanos: 0,
                }),
                last_timestamp: Some(prost_types::Timestamp {
                    seconds: 1000,
                    nanos: 0,
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert!(!is_expired(&event, Duration::from_secs(3600), 4000));
        assert!(is_expired(&event, Duration::from_secs(3600), 4601));
    }
}
