//! Events: what happened to an object, for people (`ferro describe`, `ferro get events`).
//!
//! The [`Recorder`] aggregates as Kubernetes' event aggregator does, with one deterministic
//! rule: occurrences about one object with the same type and reason are one Event (a
//! *series*), named by [`series_name`] from those alone, so a restarted controller keeps
//! counting on the same Event. Each occurrence bumps its `count` and `lastTimestamp`; one
//! that says something else within [`SIMILAR_WINDOW`] of the last replaces the message,
//! marked [`COMBINED_PREFIX`], so a storm such as a Network's deletion counting down its
//! Ports is one row, `DeletionWaitsForPorts (x89 over 3s)`, not 89. A different message
//! after a longer quiet starts the series over; the same message always counts on.
//! [`aggregate`] is that decision, pure.
//!
//! Writes are rate-limited per involved object with a token bucket ([`RateLimit`]), as
//! Kubernetes' spam filter does, so a storm cannot load etcd. Unlike that filter nothing
//! is dropped: an occurrence over the limit is held in memory, folded with the others of
//! its series, and written as one bump as soon as the bucket has a token again.
//!
//! Recording is best effort: a failure is logged, never returned, since no reconcile should
//! fail because its diary could not be written. [`expire`] deletes Events that have not
//! recurred for the TTL.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use ferro_api::{
    Error, Kind, Object, Resource,
    client::{Client, Selection},
    server::DEFAULT_PROJECT,
    v1,
};
use prost_types::Timestamp;
use tokio::time::Instant;

use super::{meta, now};

/// How long after an Event last happened an occurrence with another message still joins it
/// (Kubernetes' aggregator uses the same ten minutes).
pub const SIMILAR_WINDOW: Duration = Duration::from_secs(600);

/// What starts the message of an Event that folded occurrences saying different things.
pub const COMBINED_PREFIX: &str = "(combined from similar events): ";

/// Writes Events on behalf of one component.
#[derive(Clone)]
pub struct Recorder {
    client: Client,
    component: String,
    limiter: Arc<Mutex<Limiter>>,
}

/// How fast one [`Recorder`] may write Events about one object: a token bucket.
///
/// The default, 25 at once then one every 5 s, leaves an ordinary life alone (all the
/// events of a server's life about it are well under 25) and holds a storm to one write per
/// 5 s per object after its burst. Kubernetes' spam filter has the same burst but refills
/// once per 5 minutes, because it drops what is over the limit; here what is over is held
/// and written on the next token, and 5 s keeps `ferro get events -w` close to the truth.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimit {
    /// Writes allowed at once, and the most tokens the bucket holds.
    pub burst: u32,
    /// How long the bucket takes to gain one token; zero means no limit.
    pub refill: Duration,
}

impl Default for RateLimit {
    fn default() -> Self {
        RateLimit {
            burst: 25,
            refill: Duration::from_secs(5),
        }
    }
}

/// Occurrences of one series not yet written: the latest message, how many, and when.
#[derive(Clone, Debug, PartialEq)]
pub struct Occurrence {
    /// Normal or Warning.
    pub kind: v1::event_spec::Type,
    /// The reason, one UpperCamelCase word.
    pub reason: String,
    /// What the latest occurrence said.
    pub message: String,
    /// How many occurrences, at least 1.
    pub count: u32,
    /// When the earliest happened.
    pub first: Timestamp,
    /// When the latest happened.
    pub last: Timestamp,
    /// Whether the occurrences folded here said different things.
    pub combined: bool,
}

impl Occurrence {
    /// One occurrence at `at`.
    pub fn new(kind: v1::event_spec::Type, reason: &str, message: &str, at: Timestamp) -> Self {
        Occurrence {
            kind,
            reason: reason.to_owned(),
            message: message.to_owned(),
            count: 1,
            first: at,
            last: at,
            combined: false,
        }
    }

    /// Folds a later occurrence of the same series into this one.
    fn fold(&mut self, later: Occurrence) {
        self.combined |= later.combined || later.message != self.message;
        self.count = self.count.saturating_add(later.count);
        self.last = latest(self.last, later.last);
        self.message = later.message;
    }
}

/// The later of two timestamps.
fn latest(a: Timestamp, b: Timestamp) -> Timestamp {
    if (b.seconds, b.nanos) > (a.seconds, a.nanos) {
        b
    } else {
        a
    }
}

/// What the series' Event becomes once `occurrence` is written over `existing` (none when
/// the Event does not exist yet). The involved object and the reporting component are the
/// caller's to set.
///
/// The same message always joins the Event; another message joins it, marked
/// [`COMBINED_PREFIX`], when it comes within `window` of the Event's last occurrence, and
/// otherwise starts the series over. The message shown is the latest one.
pub fn aggregate(
    existing: Option<&v1::EventSpec>,
    occurrence: &Occurrence,
    window: Duration,
) -> v1::EventSpec {
    let fresh = || v1::EventSpec {
        r#type: occurrence.kind as i32,
        reason: occurrence.reason.clone(),
        message: if occurrence.combined {
            format!("{COMBINED_PREFIX}{}", occurrence.message)
        } else {
            occurrence.message.clone()
        },
        count: occurrence.count.max(1),
        first_timestamp: Some(occurrence.first),
        last_timestamp: Some(occurrence.last),
        ..Default::default()
    };
    let Some(existing) = existing else {
        return fresh();
    };
    let was_combined = existing.message.starts_with(COMBINED_PREFIX);
    let said = existing
        .message
        .strip_prefix(COMBINED_PREFIX)
        .unwrap_or(&existing.message);
    let same = said == occurrence.message;
    let Some(last) = existing.last_timestamp.or(existing.first_timestamp) else {
        return fresh();
    };
    let quiet = occurrence.first.seconds.saturating_sub(last.seconds);
    if !same && quiet > i64::try_from(window.as_secs()).unwrap_or(i64::MAX) {
        return fresh();
    }
    let newer = (occurrence.last.seconds, occurrence.last.nanos) >= (last.seconds, last.nanos);
    let message = if newer { &occurrence.message } else { said };
    let combined = was_combined || occurrence.combined || !same;
    v1::EventSpec {
        r#type: occurrence.kind as i32,
        reason: occurrence.reason.clone(),
        message: if combined {
            format!("{COMBINED_PREFIX}{message}")
        } else {
            message.to_owned()
        },
        count: existing
            .count
            .max(1)
            .saturating_add(occurrence.count.max(1)),
        first_timestamp: Some(existing.first_timestamp.unwrap_or(last)),
        last_timestamp: Some(latest(last, occurrence.last)),
        ..Default::default()
    }
}

/// A token bucket on tokio's clock, so tests can pause it.
#[derive(Clone, Debug)]
struct TokenBucket {
    tokens: u32,
    /// When the last token was added (or the bucket was last full).
    refilled: Instant,
}

impl TokenBucket {
    fn full(limit: RateLimit, now: Instant) -> Self {
        TokenBucket {
            tokens: limit.burst,
            refilled: now,
        }
    }

    fn refill(&mut self, limit: RateLimit, now: Instant) {
        if limit.refill.is_zero() || self.tokens >= limit.burst {
            self.tokens = limit.burst;
            self.refilled = now;
            return;
        }
        let elapsed = now.saturating_duration_since(self.refilled);
        let gained = elapsed.as_nanos() / limit.refill.as_nanos();
        let gained = u32::try_from(gained).unwrap_or(u32::MAX);
        if gained == 0 {
            return;
        }
        self.tokens = self.tokens.saturating_add(gained).min(limit.burst);
        self.refilled = if self.tokens == limit.burst {
            now
        } else {
            self.refilled + limit.refill * gained
        };
    }

    /// Takes a token, or says how long until there is one.
    fn take(&mut self, limit: RateLimit, now: Instant) -> Result<(), Duration> {
        if limit.refill.is_zero() {
            return Ok(());
        }
        self.refill(limit, now);
        if self.tokens > 0 {
            self.tokens -= 1;
            Ok(())
        } else {
            Err((self.refilled + limit.refill).saturating_duration_since(now))
        }
    }

    fn is_full(&mut self, limit: RateLimit, now: Instant) -> bool {
        self.refill(limit, now);
        self.tokens >= limit.burst
    }
}

/// Occurrences held back for one involved object, and its bucket.
struct Throttled {
    bucket: TokenBucket,
    /// Per series, in the order they were first held.
    held: Vec<(v1::OwnerReference, Occurrence)>,
    /// Whether a task is writing `held` as tokens come.
    flushing: bool,
}

/// What [`Limiter::admit`] says of an occurrence.
#[derive(Debug, PartialEq)]
enum Admission {
    /// Write it now.
    Write(Occurrence),
    /// Held for later; start the task that writes held occurrences when `start_flush`.
    Held { start_flush: bool },
}

/// What the flushing task does next for one object.
#[derive(Debug, PartialEq)]
enum Flush {
    /// Write this series' held occurrences.
    Write(v1::OwnerReference, Occurrence),
    /// Nothing may be written before this long.
    Wait(Duration),
    /// Nothing is held any more; the task ends.
    Done,
}

/// The per-object rate limit of one [`Recorder`], and what it holds back.
struct Limiter {
    limit: RateLimit,
    objects: HashMap<String, Throttled>,
}

/// Past this many tracked objects, full buckets with nothing held are forgotten (a full
/// bucket is what a new one would be).
const TRACKED_OBJECTS: usize = 1024;

fn object_key(involved: &v1::OwnerReference) -> String {
    format!(
        "{}/{}/{}/{}",
        involved.kind, involved.project, involved.name, involved.uid
    )
}

impl Limiter {
    fn new(limit: RateLimit) -> Self {
        Limiter {
            limit,
            objects: HashMap::new(),
        }
    }

    /// Decides whether an occurrence is written now or held. While anything is held for
    /// the object, later occurrences are held too, so they are written in order.
    fn admit(
        &mut self,
        involved: &v1::OwnerReference,
        occurrence: Occurrence,
        now: Instant,
    ) -> Admission {
        let limit = self.limit;
        if self.objects.len() > TRACKED_OBJECTS {
            self.objects
                .retain(|_, o| o.flushing || !o.bucket.is_full(limit, now));
        }
        let object = self
            .objects
            .entry(object_key(involved))
            .or_insert_with(|| Throttled {
                bucket: TokenBucket::full(limit, now),
                held: Vec::new(),
                flushing: false,
            });
        if !object.flushing && object.bucket.take(limit, now).is_ok() {
            return Admission::Write(occurrence);
        }
        let series = object
            .held
            .iter_mut()
            .find(|(_, o)| o.kind == occurrence.kind && o.reason == occurrence.reason);
        match series {
            Some((_, held)) => held.fold(occurrence),
            None => object.held.push((involved.clone(), occurrence)),
        }
        let start_flush = !object.flushing;
        object.flushing = true;
        Admission::Held { start_flush }
    }

    /// The flushing task's next step for the object `key`.
    fn next_flush(&mut self, key: &str, now: Instant) -> Flush {
        let limit = self.limit;
        let Some(object) = self.objects.get_mut(key) else {
            return Flush::Done;
        };
        if object.held.is_empty() {
            object.flushing = false;
            return Flush::Done;
        }
        match object.bucket.take(limit, now) {
            Ok(()) => {
                let (involved, occurrence) = object.held.remove(0);
                Flush::Write(involved, occurrence)
            }
            Err(wait) => Flush::Wait(wait),
        }
    }
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

/// `<object name, shortened>-<hash>`: a valid Event name that says what it is about.
fn name_with_hash(involved: &v1::OwnerReference, hash: u64) -> String {
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

/// The name of the Event for one exact reason and message about an object.
///
/// The [`Recorder`] names its Events with [`series_name`], which leaves the message out so
/// that similar occurrences aggregate; this one stays for whoever looks an Event up by
/// message.
pub fn event_name(involved: &v1::OwnerReference, reason: &str, message: &str) -> String {
    let hash = fnv1a(&[
        &involved.kind,
        &involved.project,
        &involved.name,
        &involved.uid,
        reason,
        message,
    ]);
    name_with_hash(involved, hash)
}

/// The name of the Event a series is recorded in: the involved object's name (shortened)
/// and a hash of the object, the type and the reason, never the message.
pub fn series_name(
    involved: &v1::OwnerReference,
    kind: v1::event_spec::Type,
    reason: &str,
) -> String {
    let hash = fnv1a(&[
        &involved.kind,
        &involved.project,
        &involved.name,
        &involved.uid,
        kind.as_str_name(),
        reason,
    ]);
    name_with_hash(involved, hash)
}

impl Recorder {
    /// A recorder for `component` (`ipam`, `network-controller`, …), with the default
    /// [`RateLimit`].
    pub fn new(client: Client, component: impl Into<String>) -> Self {
        Recorder {
            client,
            component: component.into(),
            limiter: Arc::new(Mutex::new(Limiter::new(RateLimit::default()))),
        }
    }

    /// This recorder with another rate limit per object (and nothing held).
    pub fn with_rate_limit(mut self, limit: RateLimit) -> Self {
        self.limiter = Arc::new(Mutex::new(Limiter::new(limit)));
        self
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

    /// Records an event: creates its series' Event or bumps it, now or, over the rate
    /// limit, when the object's bucket has a token again.
    pub async fn record(
        &self,
        involved: v1::OwnerReference,
        kind: v1::event_spec::Type,
        reason: &str,
        message: &str,
    ) {
        let occurrence = Occurrence::new(kind, reason, message, now());
        let admission = self
            .limiter
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .admit(&involved, occurrence, Instant::now());
        match admission {
            Admission::Write(occurrence) => self.write(&involved, &occurrence).await,
            Admission::Held { start_flush: true } => {
                tokio::spawn(self.clone().flush(object_key(&involved)));
            }
            Admission::Held { start_flush: false } => {}
        }
    }

    /// Writes what is held for one object as its bucket allows, until nothing is held.
    async fn flush(self, key: String) {
        loop {
            let step = self
                .limiter
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .next_flush(&key, Instant::now());
            match step {
                Flush::Write(involved, occurrence) => self.write(&involved, &occurrence).await,
                Flush::Wait(wait) => tokio::time::sleep(wait).await,
                Flush::Done => return,
            }
        }
    }

    async fn write(&self, involved: &v1::OwnerReference, occurrence: &Occurrence) {
        if let Err(e) = self.try_record(involved, occurrence).await {
            tracing::warn!(
                object = %involved.name,
                reason = %occurrence.reason,
                count = occurrence.count,
                error = %e,
                "could not record an event"
            );
        }
    }

    async fn try_record(
        &self,
        involved: &v1::OwnerReference,
        occurrence: &Occurrence,
    ) -> Result<(), Error> {
        let project = if involved.project.is_empty() {
            DEFAULT_PROJECT.to_owned()
        } else {
            involved.project.clone()
        };
        let name = series_name(involved, occurrence.kind, &occurrence.reason);
        let spec = |existing: Option<&v1::EventSpec>| v1::EventSpec {
            involved_object: Some(involved.clone()),
            reporting_component: self.component.clone(),
            ..aggregate(existing, occurrence, SIMILAR_WINDOW)
        };
        let mut outcome = Ok(());
        for _ in 0..4 {
            outcome = match self.client.get_typed::<v1::Event>(&project, &name).await {
                Err(Error::NotFound { .. }) => {
                    let event = v1::Event {
                        metadata: Some(v1::ObjectMeta {
                            name: name.clone(),
                            project: project.clone(),
                            ..Default::default()
                        }),
                        spec: Some(spec(None)),
                        status: None,
                    };
                    match self.client.create(Object::Event(event)).await {
                        Err(e @ Error::AlreadyExists { .. }) => Err(e),
                        other => return other.map(|_| ()),
                    }
                }
                Ok(mut event) => {
                    event.spec = Some(spec(event.spec.as_ref()));
                    // The read resourceVersion travels with the object: a concurrent bump
                    // makes this fail with Conflict, and the loop reads again.
                    match self.client.update(Object::Event(event)).await {
                        Err(e @ (Error::Conflict { .. } | Error::NotFound { .. })) => Err(e),
                        other => return other.map(|_| ()),
                    }
                }
                Err(e) => return Err(e),
            };
        }
        outcome
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

    fn at(seconds: i64) -> Timestamp {
        Timestamp { seconds, nanos: 0 }
    }

    #[test]
    fn series_names_leave_the_message_out() {
        use v1::event_spec::Type::{Normal, Warning};
        let a = series_name(&involved("net"), Normal, "DeletionWaitsForPorts");
        assert_eq!(
            a,
            series_name(&involved("net"), Normal, "DeletionWaitsForPorts")
        );
        assert!(a.starts_with("net-") && a.len() <= 63, "{a}");
        assert_ne!(
            a,
            series_name(&involved("net"), Warning, "DeletionWaitsForPorts")
        );
        assert_ne!(a, series_name(&involved("net"), Normal, "Other"));
        let mut recreated = involved("net");
        recreated.uid = "u2".into();
        assert_ne!(a, series_name(&recreated, Normal, "DeletionWaitsForPorts"));
        assert_ne!(
            a,
            event_name(&involved("net"), "DeletionWaitsForPorts", ""),
            "the two namings never collide by accident"
        );
    }

    /// The Event as stored: message, count, first and last seen.
    type Stored = (&'static str, u32, i64, i64);

    #[test]
    fn occurrences_aggregate_by_a_fixed_rule() {
        let combined = |m: &str| format!("{COMBINED_PREFIX}{m}");
        // (case, the Event before, the occurrence: message, count, first, last, combined,
        //  the Event after: message, count, first, last)
        #[allow(clippy::type_complexity)]
        let cases: &[(
            &str,
            Option<Stored>,
            (&str, u32, i64, i64, bool),
            (String, u32, i64, i64),
        )] = &[
            (
                "the first occurrence creates the Event",
                None,
                ("waits for 3 ports", 1, 100, 100, false),
                ("waits for 3 ports".into(), 1, 100, 100),
            ),
            (
                "a held batch that said different things starts combined",
                None,
                ("waits for 1 port", 5, 100, 104, true),
                (combined("waits for 1 port"), 5, 100, 104),
            ),
            (
                "the same message counts on",
                Some(("subnet a is full", 2, 10, 20)),
                ("subnet a is full", 1, 30, 30, false),
                ("subnet a is full".into(), 3, 10, 30),
            ),
            (
                "the same message counts on after any quiet",
                Some(("subnet a is full", 2, 10, 20)),
                ("subnet a is full", 1, 5000, 5000, false),
                ("subnet a is full".into(), 3, 10, 5000),
            ),
            (
                "another message within the window joins, marked combined, showing the latest",
                Some(("waits for 3 ports", 1, 100, 100)),
                ("waits for 2 ports", 1, 101, 101, false),
                (combined("waits for 2 ports"), 2, 100, 101),
            ),
            (
                "another message right at the window's end still joins",
                Some(("waits for 3 ports", 4, 100, 100)),
                ("waits for 2 ports", 1, 700, 700, false),
                (combined("waits for 2 ports"), 5, 100, 700),
            ),
            (
                "another message after a longer quiet starts the series over",
                Some(("waits for 3 ports", 4, 100, 100)),
                ("waits for 2 ports", 1, 701, 701, false),
                ("waits for 2 ports".into(), 1, 701, 701),
            ),
            (
                "a combined Event stays combined when the message repeats",
                Some((
                    "(combined from similar events): waits for 2 ports",
                    2,
                    100,
                    101,
                )),
                ("waits for 2 ports", 1, 102, 102, false),
                (combined("waits for 2 ports"), 3, 100, 102),
            ),
            (
                "a held batch adds all it counted",
                Some(("waits for 9 ports", 25, 100, 102)),
                ("waits for 1 port", 64, 102, 105, true),
                (combined("waits for 1 port"), 89, 100, 105),
            ),
            (
                "an occurrence older than the Event's last keeps the newer message",
                Some(("waits for 1 port", 2, 100, 110)),
                ("waits for 2 ports", 1, 105, 105, false),
                (combined("waits for 1 port"), 3, 100, 110),
            ),
            (
                "a hand-written Event without a count counts as one",
                Some(("hello", 0, 100, 100)),
                ("hello", 1, 100, 100, false),
                ("hello".into(), 2, 100, 100),
            ),
        ];
        for (case, before, (message, count, first, last, is_combined), after) in cases {
            let existing = before.map(|(m, c, f, l)| v1::EventSpec {
                r#type: v1::event_spec::Type::Normal as i32,
                reason: "R".into(),
                message: m.into(),
                count: c,
                first_timestamp: Some(at(f)),
                last_timestamp: Some(at(l)),
                ..Default::default()
            });
            let occurrence = Occurrence {
                kind: v1::event_spec::Type::Normal,
                reason: "R".into(),
                message: (*message).into(),
                count: *count,
                first: at(*first),
                last: at(*last),
                combined: *is_combined,
            };
            let spec = aggregate(existing.as_ref(), &occurrence, SIMILAR_WINDOW);
            let got = (
                spec.message.clone(),
                spec.count,
                spec.first_timestamp.unwrap().seconds,
                spec.last_timestamp.unwrap().seconds,
            );
            assert_eq!(&got, after, "{case}");
            assert_eq!(spec.reason, "R", "{case}");
        }
    }

    #[test]
    fn a_countdown_of_ports_is_one_event() {
        let mut event: Option<v1::EventSpec> = None;
        for (i, left) in (112..=200).rev().enumerate() {
            let message = format!("deletion waits for ports p0, p1 and {left} more");
            let second = 1000 + i64::try_from(i).unwrap() / 30;
            let occurrence = Occurrence::new(
                v1::event_spec::Type::Normal,
                "DeletionWaitsForPorts",
                &message,
                at(second),
            );
            event = Some(aggregate(event.as_ref(), &occurrence, SIMILAR_WINDOW));
        }
        let event = event.unwrap();
        assert_eq!(event.count, 89);
        assert_eq!(
            event.message,
            format!("{COMBINED_PREFIX}deletion waits for ports p0, p1 and 112 more")
        );
        assert_eq!(event.first_timestamp.unwrap().seconds, 1000);
        assert_eq!(event.last_timestamp.unwrap().seconds, 1002);
    }

    fn limit(burst: u32, refill_seconds: u64) -> RateLimit {
        RateLimit {
            burst,
            refill: Duration::from_secs(refill_seconds),
        }
    }

    fn occurrence(reason: &str, message: &str) -> Occurrence {
        Occurrence::new(v1::event_spec::Type::Normal, reason, message, now())
    }

    #[tokio::test(start_paused = true)]
    async fn a_storm_is_held_then_written_as_one_bump() {
        let mut limiter = Limiter::new(limit(3, 5));
        let net = involved("net");
        let key = object_key(&net);
        let admitted: Vec<Admission> = (0..10)
            .map(|i| {
                limiter.admit(
                    &net,
                    occurrence(
                        "DeletionWaitsForPorts",
                        &format!("waits for {} ports", 10 - i),
                    ),
                    Instant::now(),
                )
            })
            .collect();
        let written = admitted
            .iter()
            .filter(|a| matches!(a, Admission::Write(_)))
            .count();
        assert_eq!(written, 3, "the burst is written at once: {admitted:?}");
        assert_eq!(admitted[3], Admission::Held { start_flush: true });
        assert!(
            admitted[4..]
                .iter()
                .all(|a| *a == Admission::Held { start_flush: false }),
            "one flushing task per object: {admitted:?}"
        );
        assert_eq!(
            limiter.next_flush(&key, Instant::now()),
            Flush::Wait(Duration::from_secs(5))
        );
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(
            limiter.next_flush(&key, Instant::now()),
            Flush::Wait(Duration::from_secs(3))
        );
        tokio::time::advance(Duration::from_secs(3)).await;
        let Flush::Write(to, held) = limiter.next_flush(&key, Instant::now()) else {
            panic!("a token came: the held occurrences are written");
        };
        assert_eq!(to, net);
        assert_eq!(held.count, 7, "nothing held is lost");
        assert_eq!(held.message, "waits for 1 ports");
        assert!(held.combined);
        assert_eq!(limiter.next_flush(&key, Instant::now()), Flush::Done);
        // The flush spent the token: the next occurrence waits for another.
        assert_eq!(
            limiter.admit(
                &net,
                occurrence("DeletionWaitsForPorts", "x"),
                Instant::now()
            ),
            Admission::Held { start_flush: true }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn buckets_are_per_object_and_refill_up_to_the_burst() {
        let mut limiter = Limiter::new(limit(2, 5));
        let (a, b) = (involved("a"), involved("b"));
        for _ in 0..2 {
            assert!(matches!(
                limiter.admit(&a, occurrence("R", "m"), Instant::now()),
                Admission::Write(_)
            ));
        }
        assert!(matches!(
            limiter.admit(&a, occurrence("R", "m"), Instant::now()),
            Admission::Held { .. }
        ));
        assert!(
            matches!(
                limiter.admit(&b, occurrence("R", "m"), Instant::now()),
                Admission::Write(_)
            ),
            "another object has its own bucket"
        );
        // A long quiet refills to the burst, no more.
        tokio::time::advance(Duration::from_secs(3600)).await;
        let key = object_key(&a);
        assert!(matches!(
            limiter.next_flush(&key, Instant::now()),
            Flush::Write(..)
        ));
        assert_eq!(limiter.next_flush(&key, Instant::now()), Flush::Done);
        assert!(matches!(
            limiter.admit(&a, occurrence("R", "m"), Instant::now()),
            Admission::Write(_)
        ));
        assert!(matches!(
            limiter.admit(&a, occurrence("R", "m"), Instant::now()),
            Admission::Held { start_flush: true }
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn held_series_are_written_in_order_one_token_each() {
        let mut limiter = Limiter::new(limit(1, 5));
        let port = involved("p");
        let key = object_key(&port);
        assert!(matches!(
            limiter.admit(&port, occurrence("First", "m"), Instant::now()),
            Admission::Write(_)
        ));
        for reason in ["Second", "Third", "Second"] {
            limiter.admit(&port, occurrence(reason, "m"), Instant::now());
        }
        let mut written = Vec::new();
        loop {
            match limiter.next_flush(&key, Instant::now()) {
                Flush::Write(_, held) => written.push((held.reason, held.count)),
                Flush::Wait(wait) => tokio::time::advance(wait).await,
                Flush::Done => break,
            }
        }
        assert_eq!(written, [("Second".to_owned(), 2), ("Third".to_owned(), 1)]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_zero_refill_is_no_limit() {
        let mut limiter = Limiter::new(limit(0, 0));
        for _ in 0..100 {
            assert!(matches!(
                limiter.admit(&involved("a"), occurrence("R", "m"), Instant::now()),
                Admission::Write(_)
            ));
        }
    }
}
