//! Quotas: what each object counts against its project's Quota, and the admission that
//! charges it atomically.
//!
//! A project's Quota named [`ENFORCED_QUOTA`] (`default`) limits what the project may hold
//! (`spec.hard`) and keeps what it holds (`status.used`). Every create of a counted kind,
//! and every update that makes an object count more (a Server resized to a larger Flavor,
//! a Volume grown), is charged in the same store transaction as the write itself: the
//! transaction puts the Quota with its usage raised and compares the Quota's mod revision
//! with the one the charge was computed from, as Kubernetes' quota admission does. Two
//! creates racing for the last unit of a limit therefore cannot both commit: the second
//! one's compare fails, it re-reads the Quota from the store and is refused. A project
//! without that Quota is unlimited; its creates still compare that the Quota is absent, so
//! a Quota created meanwhile is never missed.
//!
//! `status.used` counts every counted thing, limited or not, so that a limit added later
//! starts from a true figure. A Quota whose usage has never been counted (just created)
//! is counted from the store, at a revision no older than the Quota's, by the first
//! charge. Admission never refunds: deletions lower the usage when the quota controller
//! recounts it from the objects themselves, so a crash can never leave it drifting.
//!
//! Objects being deleted still count until they are gone. A limit below the usage is
//! allowed (a Quota may be created or lowered under it); it only refuses further growth.
//!
//! [`Usage`], [`Usage::of`] and [`admit`] are pure and shared with the quota controller;
//! [`Admission`] does the store reads and the guarded write for the apiserver.

use std::sync::Arc;

use ferro_store::{Compare, KeyValue, RangeRequest, Store, Txn, TxnOp, TxnOpResponse, TxnResponse};

use crate::{
    Error, Kind, Object,
    cache::WatchCache,
    server::{decode_kv, store_error},
    v1,
};

/// The name of the one Quota per project that admission enforces.
pub const ENFORCED_QUOTA: &str = "default";

/// How many times a charge is computed again after losing its compare-and-swap race.
const MAX_ATTEMPTS: usize = 64;

/// One counted thing, named as in `QuotaAmounts`' YAML form.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Counted {
    /// Servers.
    Servers,
    /// Virtual CPUs of all Servers.
    Vcpus,
    /// Memory of all Servers, in MiB.
    RamMib,
    /// Volumes.
    Volumes,
    /// Size of all Volumes, in GiB.
    VolumeGib,
    /// Networks.
    Networks,
    /// Ports.
    Ports,
    /// Routers.
    Routers,
    /// Floating IPs.
    FloatingIps,
    /// Security groups.
    SecurityGroups,
}

impl Counted {
    /// Every counted thing, in the schema's order.
    pub const ALL: [Counted; 10] = [
        Counted::Servers,
        Counted::Vcpus,
        Counted::RamMib,
        Counted::Volumes,
        Counted::VolumeGib,
        Counted::Networks,
        Counted::Ports,
        Counted::Routers,
        Counted::FloatingIps,
        Counted::SecurityGroups,
    ];

    /// The name users see: the `QuotaAmounts` field's JSON name (`ramMib`).
    pub fn name(self) -> &'static str {
        match self {
            Counted::Servers => "servers",
            Counted::Vcpus => "vcpus",
            Counted::RamMib => "ramMib",
            Counted::Volumes => "volumes",
            Counted::VolumeGib => "volumeGib",
            Counted::Networks => "networks",
            Counted::Ports => "ports",
            Counted::Routers => "routers",
            Counted::FloatingIps => "floatingIps",
            Counted::SecurityGroups => "securityGroups",
        }
    }

    /// This thing's amount in `amounts`; `None` when unset.
    pub fn get(self, amounts: &v1::QuotaAmounts) -> Option<i64> {
        match self {
            Counted::Servers => amounts.servers,
            Counted::Vcpus => amounts.vcpus,
            Counted::RamMib => amounts.ram_mib,
            Counted::Volumes => amounts.volumes,
            Counted::VolumeGib => amounts.volume_gib,
            Counted::Networks => amounts.networks,
            Counted::Ports => amounts.ports,
            Counted::Routers => amounts.routers,
            Counted::FloatingIps => amounts.floating_ips,
            Counted::SecurityGroups => amounts.security_groups,
        }
    }

    fn slot(self, amounts: &mut v1::QuotaAmounts) -> &mut Option<i64> {
        match self {
            Counted::Servers => &mut amounts.servers,
            Counted::Vcpus => &mut amounts.vcpus,
            Counted::RamMib => &mut amounts.ram_mib,
            Counted::Volumes => &mut amounts.volumes,
            Counted::VolumeGib => &mut amounts.volume_gib,
            Counted::Networks => &mut amounts.networks,
            Counted::Ports => &mut amounts.ports,
            Counted::Routers => &mut amounts.routers,
            Counted::FloatingIps => &mut amounts.floating_ips,
            Counted::SecurityGroups => &mut amounts.security_groups,
        }
    }

    fn index(self) -> usize {
        Counted::ALL
            .iter()
            .position(|r| *r == self)
            .expect("every resource is in ALL")
    }
}

/// The kinds whose objects count against a Quota.
pub const COUNTED_KINDS: [Kind; 7] = [
    Kind::Server,
    Kind::Volume,
    Kind::Network,
    Kind::Port,
    Kind::Router,
    Kind::FloatingIP,
    Kind::SecurityGroup,
];

/// Whether objects of `kind` count against a Quota.
pub fn counts(kind: Kind) -> bool {
    COUNTED_KINDS.contains(&kind)
}

/// What a Server's Flavor makes it count.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlavorSize {
    /// Virtual CPUs.
    pub vcpus: i64,
    /// Memory in MiB.
    pub ram_mib: i64,
}

impl From<&v1::FlavorSpec> for FlavorSize {
    fn from(spec: &v1::FlavorSpec) -> Self {
        FlavorSize {
            vcpus: i64::from(spec.vcpus),
            ram_mib: i64::try_from(spec.ram_mib).unwrap_or(i64::MAX),
        }
    }
}

/// The name of the Flavor a Server asks for; `None` for other kinds.
pub fn flavor_name(object: &Object) -> Option<&str> {
    match object {
        Object::Server(s) => s.spec.as_ref().map(|s| s.flavor.as_str()),
        _ => None,
    }
}

/// The size of a Server's Flavor: the Flavor it names as `lookup` finds it, else the copy
/// its placement recorded if that copy is of the same Flavor; `None` when neither exists.
pub fn flavor_size(
    object: &Object,
    lookup: impl FnOnce(&str) -> Option<FlavorSize>,
) -> Option<FlavorSize> {
    let Object::Server(server) = object else {
        return None;
    };
    let name = server.spec.as_ref().map(|s| s.flavor.as_str())?;
    lookup(name).or_else(|| {
        let copy = server.status.as_ref()?.flavor.as_ref()?;
        (copy.name == name).then(|| FlavorSize {
            vcpus: i64::from(copy.vcpus),
            ram_mib: i64::try_from(copy.ram_mib).unwrap_or(i64::MAX),
        })
    })
}

/// An amount of each counted thing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage([i64; Counted::ALL.len()]);

impl Usage {
    /// What one object counts. A Server counts its Flavor's size, `flavor`; `None` (its
    /// Flavor cannot be found) counts no vCPUs or memory. Kinds that are not counted
    /// count nothing.
    pub fn of(object: &Object, flavor: Option<FlavorSize>) -> Usage {
        let mut usage = Usage::default();
        match object {
            Object::Server(_) => {
                let flavor = flavor.unwrap_or_default();
                usage.set(Counted::Servers, 1);
                usage.set(Counted::Vcpus, flavor.vcpus);
                usage.set(Counted::RamMib, flavor.ram_mib);
            }
            Object::Volume(v) => {
                let size = v.spec.as_ref().map(|s| s.size_gib).unwrap_or_default();
                usage.set(Counted::Volumes, 1);
                usage.set(Counted::VolumeGib, i64::try_from(size).unwrap_or(i64::MAX));
            }
            Object::Network(_) => usage.set(Counted::Networks, 1),
            Object::Port(_) => usage.set(Counted::Ports, 1),
            Object::Router(_) => usage.set(Counted::Routers, 1),
            Object::FloatingIP(_) => usage.set(Counted::FloatingIps, 1),
            Object::SecurityGroup(_) => usage.set(Counted::SecurityGroups, 1),
            _ => {}
        }
        usage
    }

    /// Usage as a Quota's status records it; an unset amount is zero.
    pub fn from_amounts(amounts: &v1::QuotaAmounts) -> Usage {
        let mut usage = Usage::default();
        for r in Counted::ALL {
            usage.set(r, r.get(amounts).unwrap_or_default());
        }
        usage
    }

    /// The amounts for a Quota's status, every one set.
    pub fn to_amounts(self) -> v1::QuotaAmounts {
        let mut amounts = v1::QuotaAmounts::default();
        for r in Counted::ALL {
            *r.slot(&mut amounts) = Some(self.get(r));
        }
        amounts
    }

    /// The amount of one thing.
    pub fn get(&self, resource: Counted) -> i64 {
        self.0[resource.index()]
    }

    /// Sets the amount of one thing.
    pub fn set(&mut self, resource: Counted, amount: i64) {
        self.0[resource.index()] = amount;
    }

    /// Whether every amount is zero.
    pub fn is_zero(&self) -> bool {
        self.0.iter().all(|a| *a == 0)
    }

    /// The sum, amount by amount (saturating).
    pub fn plus(&self, other: &Usage) -> Usage {
        let mut sum = *self;
        for (a, b) in sum.0.iter_mut().zip(other.0) {
            *a = a.saturating_add(b);
        }
        sum
    }

    /// What going from `before` to `after` adds, thing by thing; shrinking adds nothing
    /// (the controller's recount gives it back).
    pub fn growth(before: &Usage, after: &Usage) -> Usage {
        let mut growth = Usage::default();
        for ((g, b), a) in growth.0.iter_mut().zip(before.0).zip(after.0) {
            *g = a.saturating_sub(b).max(0);
        }
        growth
    }
}

impl<'a> std::iter::Sum<&'a Usage> for Usage {
    fn sum<I: Iterator<Item = &'a Usage>>(iter: I) -> Usage {
        iter.fold(Usage::default(), |sum, u| sum.plus(u))
    }
}

/// A charge that would take a project over one of its limits.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "quota exceeded in project {project}: {resource} limit {limit}, used {used}, requested {requested}"
)]
pub struct Exceeded {
    /// The project.
    pub project: String,
    /// The limited thing, as `QuotaAmounts` names it (`ramMib`).
    pub resource: &'static str,
    /// The limit.
    pub limit: i64,
    /// The usage before the charge.
    pub used: i64,
    /// What the charge asked for.
    pub requested: i64,
}

impl From<Exceeded> for Error {
    fn from(exceeded: Exceeded) -> Self {
        Error::ResourceExhausted {
            message: exceeded.to_string(),
        }
    }
}

/// Charges `requested` to `used` under the limits `hard`: the new usage, or the first
/// limit it would break. Only what the charge asks for is checked, so a usage already
/// above a limit blocks growth of that thing alone.
pub fn admit(
    project: &str,
    hard: &v1::QuotaAmounts,
    used: &Usage,
    requested: &Usage,
) -> Result<Usage, Exceeded> {
    for r in Counted::ALL {
        let (want, have) = (requested.get(r), used.get(r));
        if want <= 0 {
            continue;
        }
        if let Some(limit) = r.get(hard)
            && have.saturating_add(want) > limit
        {
            return Err(Exceeded {
                project: project.to_owned(),
                resource: r.name(),
                limit,
                used: have,
                requested: want,
            });
        }
    }
    Ok(used.plus(requested))
}

/// The usage a Quota records; `None` while it has never been counted.
pub fn recorded_usage(quota: &v1::Quota) -> Option<Usage> {
    quota
        .status
        .as_ref()
        .and_then(|s| s.used.as_ref())
        .map(Usage::from_amounts)
}

// ---------------------------------------------------------------------------------------
// Admission.

/// The apiserver's quota admission: charges writes in their own transaction.
#[derive(Clone)]
pub(crate) struct Admission {
    store: Arc<dyn Store>,
    cache: Option<Arc<WatchCache>>,
}

/// The Quota as one attempt saw it.
#[derive(Clone)]
struct Seen {
    /// The Quota's key and value; `None` when it did not exist.
    kv: Option<KeyValue>,
    /// Whether it was read from the watch cache, which may be behind.
    cached: bool,
}

impl Admission {
    /// Admission over the apiserver's store and watch cache.
    pub(crate) fn new(store: Arc<dyn Store>, cache: Option<Arc<WatchCache>>) -> Self {
        Admission { store, cache }
    }

    /// Runs `txn`, the write of `next` (over `current`, `None` for a create), with the
    /// charge of what it adds to the project's usage.
    ///
    /// Returns the response if it committed, `None` if the caller's own guard failed
    /// (the caller decides again), and `ResourceExhausted` if the charge breaks a limit.
    /// A lost race on the Quota alone is retried here from the Quota the failed
    /// transaction read back.
    pub(crate) async fn commit(
        &self,
        current: Option<&Object>,
        next: &Object,
        txn: Txn,
    ) -> Result<Option<TxnResponse>, Error> {
        if !counts(next.kind()) {
            return self.run(txn).await;
        }
        let project = next.project().to_owned();
        let quota_key = Kind::Quota.key(&project, ENFORCED_QUOTA);
        let mut seen = self.read_quota(&quota_key, false).await?;
        for _ in 0..MAX_ATTEMPTS {
            let mut attempt = txn.clone();
            let revision = seen.kv.as_ref().map(|kv| kv.mod_revision);
            match &seen.kv {
                None => attempt.compare.push(Compare::absent(&quota_key)),
                Some(kv) => {
                    let Object::Quota(mut quota) = decode_kv(Kind::Quota, kv)? else {
                        unreachable!("the key is a Quota's")
                    };
                    let requested = self.requested(current, next, &quota).await?;
                    if requested.is_zero() {
                        return self.run(txn).await;
                    }
                    let used = match recorded_usage(&quota) {
                        Some(used) => used,
                        None => self.count_project(&project).await?,
                    };
                    let hard = quota.spec.as_ref().and_then(|s| s.hard).unwrap_or_default();
                    let used = match admit(&project, &hard, &used, &requested) {
                        Ok(used) => used,
                        // The cache's copy may be behind a recount that lowered the usage.
                        Err(_) if seen.cached => {
                            seen = self.read_quota(&quota_key, true).await?;
                            continue;
                        }
                        Err(exceeded) => return Err(exceeded.into()),
                    };
                    quota.status.get_or_insert_default().used = Some(used.to_amounts());
                    quota.metadata.get_or_insert_default().resource_version = 0;
                    attempt
                        .compare
                        .push(Compare::mod_revision(&quota_key, kv.mod_revision));
                    attempt.success.push(TxnOp::Put {
                        key: quota_key.clone(),
                        value: Object::Quota(quota).encode_to_vec(),
                        lease: None,
                    });
                }
            }
            attempt
                .failure
                .push(TxnOp::Range(RangeRequest::key(quota_key.clone())));
            let response = self.store.txn(attempt).await.map_err(store_error)?;
            if response.succeeded {
                return Ok(Some(response));
            }
            let now = match response.responses.last() {
                Some(TxnOpResponse::Range(range)) => range.kvs.first().cloned(),
                _ => {
                    return Err(Error::internal(
                        "a failed charge did not read its Quota back",
                    ));
                }
            };
            if now.as_ref().map(|kv| kv.mod_revision) == revision {
                // The Quota is as charged: the caller's own guard failed.
                return Ok(None);
            }
            seen = Seen {
                kv: now,
                cached: false,
            };
        }
        Err(Error::Unavailable {
            message: format!(
                "quotas/{ENFORCED_QUOTA} in project {project}: too many concurrent writers; retry"
            ),
        })
    }

    /// Checks a write that will not happen (a dry run) against the Quota as it is.
    pub(crate) async fn check(&self, current: Option<&Object>, next: &Object) -> Result<(), Error> {
        if !counts(next.kind()) {
            return Ok(());
        }
        let project = next.project();
        let seen = self
            .read_quota(&Kind::Quota.key(project, ENFORCED_QUOTA), true)
            .await?;
        let Some(kv) = seen.kv else { return Ok(()) };
        let Object::Quota(quota) = decode_kv(Kind::Quota, &kv)? else {
            unreachable!("the key is a Quota's")
        };
        let requested = self.requested(current, next, &quota).await?;
        if requested.is_zero() {
            return Ok(());
        }
        let used = match recorded_usage(&quota) {
            Some(used) => used,
            None => self.count_project(project).await?,
        };
        let hard = quota.spec.and_then(|s| s.hard).unwrap_or_default();
        admit(project, &hard, &used, &requested)?;
        Ok(())
    }

    async fn run(&self, txn: Txn) -> Result<Option<TxnResponse>, Error> {
        let response = self.store.txn(txn).await.map_err(store_error)?;
        Ok(response.succeeded.then_some(response))
    }

    /// The Quota at `key`: from the watch cache unless `fresh` (a copy it lacks is taken
    /// to be absent; the transaction's compare finds out if it is not), else the store.
    async fn read_quota(&self, key: &str, fresh: bool) -> Result<Seen, Error> {
        if !fresh && let Some(cache) = &self.cache {
            let kv = cache.get(Kind::Quota, key).map(|quota| KeyValue {
                key: key.to_owned(),
                value: quota.encode_to_vec(),
                create_revision: 0,
                mod_revision: quota.metadata().map(|m| m.resource_version).unwrap_or(0),
                version: 0,
                lease: None,
            });
            return Ok(Seen { kv, cached: true });
        }
        let kv = self.store.get(key).await.map_err(store_error)?;
        Ok(Seen { kv, cached: false })
    }

    /// What writing `next` over `current` adds to the usage.
    async fn requested(
        &self,
        current: Option<&Object>,
        next: &Object,
        quota: &v1::Quota,
    ) -> Result<Usage, Error> {
        let next_flavor = self.flavor_of(next).await?;
        let after = Usage::of(next, next_flavor);
        let before = match current {
            Some(current) => Usage::of(current, self.flavor_of(current).await?),
            None => Usage::default(),
        };
        let growth = Usage::growth(&before, &after);
        // A Server whose Flavor cannot be found would count no vCPUs or memory now and
        // its full size once the Flavor appears: refuse it while those are limited.
        if next.kind() == Kind::Server && next_flavor.is_none() {
            let hard = quota.spec.as_ref().and_then(|s| s.hard).unwrap_or_default();
            if let Some(limited) = [Counted::Vcpus, Counted::RamMib]
                .into_iter()
                .find(|r| r.get(&hard).is_some())
            {
                return Err(Error::FailedPrecondition {
                    object: next.display_name(),
                    message: format!(
                        "flavor {} not found; the project's quota limits {}, so the server cannot be counted",
                        flavor_name(next).unwrap_or_default(),
                        limited.name()
                    ),
                });
            }
        }
        Ok(growth)
    }

    /// The size of a Server's Flavor (`None` for other kinds or a missing Flavor).
    async fn flavor_of(&self, object: &Object) -> Result<Option<FlavorSize>, Error> {
        let Some(name) = flavor_name(object) else {
            return Ok(None);
        };
        let key = Kind::Flavor.key("", name);
        let cached = self.cache.as_ref().and_then(|c| c.get(Kind::Flavor, &key));
        let flavor = match cached {
            Some(flavor) => Some(Arc::unwrap_or_clone(flavor)),
            None => match self.store.get(&key).await.map_err(store_error)? {
                Some(kv) => Some(decode_kv(Kind::Flavor, &kv)?),
                None => None,
            },
        };
        let found = match flavor {
            Some(Object::Flavor(f)) => f.spec.as_ref().map(FlavorSize::from),
            _ => None,
        };
        Ok(flavor_size(object, |_| found))
    }

    /// Counts a project's usage from the store at its latest revision, which is no older
    /// than any Quota already read.
    async fn count_project(&self, project: &str) -> Result<Usage, Error> {
        let flavors = self
            .store
            .range(RangeRequest::prefix(Kind::Flavor.prefix(None)))
            .await
            .map_err(store_error)?;
        let revision = flavors.revision;
        let sizes: std::collections::HashMap<String, FlavorSize> = flavors
            .kvs
            .iter()
            .filter_map(|kv| match decode_kv(Kind::Flavor, kv) {
                Ok(Object::Flavor(f)) => Some((
                    f.metadata.as_ref()?.name.clone(),
                    FlavorSize::from(f.spec.as_ref()?),
                )),
                _ => None,
            })
            .collect();
        let mut usage = Usage::default();
        for kind in COUNTED_KINDS {
            let range = RangeRequest {
                revision: Some(revision),
                ..RangeRequest::prefix(kind.prefix(Some(project)))
            };
            let page = self.store.range(range).await.map_err(store_error)?;
            for kv in &page.kvs {
                let object = decode_kv(kind, kv)?;
                let size = flavor_size(&object, |name| sizes.get(name).copied());
                usage = usage.plus(&Usage::of(&object, size));
            }
        }
        Ok(usage)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec;

    fn object(yaml: &str) -> Object {
        codec::decode_yaml(yaml)
            .expect("test YAML decodes")
            .remove(0)
    }

    fn usage(pairs: &[(Counted, i64)]) -> Usage {
        let mut usage = Usage::default();
        for (r, a) in pairs {
            usage.set(*r, *a);
        }
        usage
    }

    const SMALL: FlavorSize = FlavorSize {
        vcpus: 2,
        ram_mib: 2048,
    };

    #[test]
    fn each_kind_counts_what_the_issue_lists() {
        use Counted::*;
        let cases: &[(&str, Option<FlavorSize>, Usage)] = &[
            (
                "{kind: Server, metadata: {name: a}, spec: {flavor: m1.small, image: i}}",
                Some(SMALL),
                usage(&[(Servers, 1), (Vcpus, 2), (RamMib, 2048)]),
            ),
            (
                "{kind: Server, metadata: {name: a}, spec: {flavor: gone, image: i}}",
                None,
                usage(&[(Servers, 1)]),
            ),
            (
                "{kind: Volume, metadata: {name: a}, spec: {sizeGib: 20}}",
                None,
                usage(&[(Volumes, 1), (VolumeGib, 20)]),
            ),
            (
                "{kind: Network, metadata: {name: a}, spec: {}}",
                None,
                usage(&[(Networks, 1)]),
            ),
            (
                "{kind: Port, metadata: {name: a}, spec: {network: n}}",
                None,
                usage(&[(Ports, 1)]),
            ),
            (
                "{kind: Router, metadata: {name: a}, spec: {}}",
                None,
                usage(&[(Routers, 1)]),
            ),
            (
                "{kind: FloatingIP, metadata: {name: a}, spec: {network: ext}}",
                None,
                usage(&[(FloatingIps, 1)]),
            ),
            (
                "{kind: SecurityGroup, metadata: {name: a}, spec: {}}",
                None,
                usage(&[(SecurityGroups, 1)]),
            ),
            (
                "{kind: KeyPair, metadata: {name: a}, spec: {publicKey: k}}",
                None,
                Usage::default(),
            ),
        ];
        for (yaml, flavor, want) in cases {
            let yaml = format!("{{apiVersion: ferro/v1, {}", &yaml[1..]);
            assert_eq!(Usage::of(&object(&yaml), *flavor), *want, "{yaml}");
        }
    }

    #[test]
    fn a_placed_server_falls_back_to_its_flavor_copy() {
        let server = object(
            "apiVersion: ferro/v1\nkind: Server\nmetadata: {name: a}\nspec: {flavor: m1.small, image: i}\n",
        );
        let Object::Server(mut placed) = server.clone() else {
            unreachable!()
        };
        placed.status.get_or_insert_default().flavor = Some(v1::FlavorSnapshot {
            name: "m1.small".into(),
            vcpus: 4,
            ram_mib: 512,
            ..Default::default()
        });
        let placed = Object::Server(placed);
        assert_eq!(flavor_size(&server, |_| None), None);
        assert_eq!(
            flavor_size(&placed, |_| None),
            Some(FlavorSize {
                vcpus: 4,
                ram_mib: 512
            })
        );
        assert_eq!(flavor_size(&placed, |_| Some(SMALL)), Some(SMALL));
    }

    #[test]
    fn admission_arithmetic() {
        use Counted::*;
        let hard = v1::QuotaAmounts {
            servers: Some(10),
            vcpus: Some(20),
            volume_gib: Some(100),
            ..Default::default()
        };
        struct Case {
            used: Usage,
            requested: Usage,
            want: Result<Usage, (&'static str, i64, i64, i64)>,
        }
        let cases = [
            // Up to the limit exactly.
            Case {
                used: usage(&[(Servers, 9), (Vcpus, 18)]),
                requested: usage(&[(Servers, 1), (Vcpus, 2)]),
                want: Ok(usage(&[(Servers, 10), (Vcpus, 20)])),
            },
            // One past it, named with limit, use and request.
            Case {
                used: usage(&[(Servers, 10)]),
                requested: usage(&[(Servers, 1)]),
                want: Err(("servers", 10, 10, 1)),
            },
            Case {
                used: usage(&[(Servers, 2), (Vcpus, 19)]),
                requested: usage(&[(Servers, 1), (Vcpus, 2)]),
                want: Err(("vcpus", 20, 19, 2)),
            },
            // Unlimited things are counted but never refused.
            Case {
                used: usage(&[(Ports, 1_000)]),
                requested: usage(&[(Ports, 1)]),
                want: Ok(usage(&[(Ports, 1_001)])),
            },
            // A usage above a lowered limit blocks that thing only.
            Case {
                used: usage(&[(Servers, 12), (VolumeGib, 10)]),
                requested: usage(&[(Volumes, 1), (VolumeGib, 90)]),
                want: Ok(usage(&[(Servers, 12), (Volumes, 1), (VolumeGib, 100)])),
            },
            Case {
                used: usage(&[(VolumeGib, 10)]),
                requested: usage(&[(Volumes, 1), (VolumeGib, 91)]),
                want: Err(("volumeGib", 100, 10, 91)),
            },
            // Nothing asked, nothing refused.
            Case {
                used: usage(&[(Servers, 50)]),
                requested: Usage::default(),
                want: Ok(usage(&[(Servers, 50)])),
            },
        ];
        for (i, case) in cases.iter().enumerate() {
            let got = admit("p", &hard, &case.used, &case.requested);
            let want = case
                .want
                .map_err(|(resource, limit, used, requested)| Exceeded {
                    project: "p".into(),
                    resource,
                    limit,
                    used,
                    requested,
                });
            assert_eq!(got, want, "case {i}");
        }
        let refused = admit(
            "p",
            &hard,
            &usage(&[(Servers, 10)]),
            &usage(&[(Servers, 1)]),
        );
        assert_eq!(
            Error::from(refused.unwrap_err()).to_string(),
            "quota exceeded in project p: servers limit 10, used 10, requested 1"
        );
    }

    #[test]
    fn growth_charges_only_what_grows() {
        use Counted::*;
        let small = usage(&[(Servers, 1), (Vcpus, 2), (RamMib, 4096)]);
        let large = usage(&[(Servers, 1), (Vcpus, 8), (RamMib, 2048)]);
        assert_eq!(
            Usage::growth(&small, &large),
            usage(&[(Vcpus, 6)]),
            "a resize charges the larger vCPUs, not the smaller memory"
        );
        assert_eq!(Usage::growth(&large, &large), Usage::default());
        assert_eq!(Usage::growth(&Usage::default(), &small), small);
    }

    #[test]
    fn usage_round_trips_through_amounts() {
        use Counted::*;
        let u = usage(&[(Servers, 3), (SecurityGroups, 7)]);
        let amounts = u.to_amounts();
        assert_eq!(amounts.ports, Some(0), "usage sets every amount");
        assert_eq!(Usage::from_amounts(&amounts), u);
        assert_eq!(
            Usage::from_amounts(&v1::QuotaAmounts::default()),
            Usage::default()
        );
    }
}
