//! A property test of IPAM's allocation steps against a model of the apiserver.
//!
//! The model keeps Ports and claims with the apiserver's rules that matter here: claims are
//! create-if-absent, status writes guarded by a resourceVersion fail when it is stale, a
//! status write lands on whatever object has the name now, every write (deletes included)
//! advances the revision. Every model call first yields once, so each reconcile is a
//! sequence of steps the test interleaves as it pleases.
//!
//! Several controller processes run the real [`run_port`] with their own hints and their
//! own view of the world, refreshed only when the test says so (an arbitrarily stale
//! cache). Between any two steps the test may also create or delete Ports, collect
//! garbage, crash a process (its reconciles vanish mid-way and its hints start empty) or
//! refresh its view. After every step: no two live Ports have recorded the same address or
//! MAC, and every recorded value is held by a claim owned by its Port. At the end, after
//! the survivors settle: every claim belongs to a live Port, a decided Port holds exactly
//! its recorded values, and a Port left without addresses holds none and is blocked for a
//! true reason.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll, Waker},
};

use proptest::prelude::*;

use super::*;

/// Yields once, so that the test decides when the call takes effect.
struct YieldOnce(bool);

impl Future for YieldOnce {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<()> {
        if self.0 {
            Poll::Ready(())
        } else {
            self.0 = true;
            Poll::Pending
        }
    }
}

const NETWORK_UID: &str = "net";
const PORTS: usize = 6;
/// The requested values that make Ports contend: p3 and p4 both want 10.0.0.3, p4 and p5
/// both want one MAC.
const FIXED_IP: &str = "10.0.0.3";
const WANTED_MAC: &str = "02:00:00:00:00:01";

fn network() -> v1::Network {
    v1::Network {
        metadata: Some(v1::ObjectMeta {
            name: "net".into(),
            project: "default".into(),
            uid: NETWORK_UID.into(),
            ..Default::default()
        }),
        spec: Some(v1::NetworkSpec {
            // Five usable addresses (.2–.6) for six Ports: exhaustion is part of the game.
            subnets: vec![v1::Subnet {
                name: "a".into(),
                cidr: "10.0.0.0/29".into(),
                gateway: Some("10.0.0.1".into()),
                ..Default::default()
            }],
            ..Default::default()
        }),
        status: None,
    }
}

fn port_spec(index: usize) -> v1::PortSpec {
    let mut spec = v1::PortSpec {
        network: "net".into(),
        ..Default::default()
    };
    if index == 3 || index == 4 {
        spec.fixed_ips = vec![v1::FixedIp {
            subnet: "a".into(),
            ip_address: FIXED_IP.into(),
        }];
    }
    if index == 4 || index == 5 {
        spec.mac_address = WANTED_MAC.into();
    }
    spec
}

#[derive(Clone, Default)]
struct World {
    revision: i64,
    uids: u64,
    ports: BTreeMap<String, v1::Port>,
    ip_claims: BTreeMap<String, v1::IpAddress>,
    mac_claims: BTreeMap<String, v1::MacAddress>,
}

impl World {
    fn bump(&mut self) -> i64 {
        self.revision += 1;
        self.revision
    }

    fn uid(&mut self, prefix: &str) -> String {
        self.uids += 1;
        format!("{prefix}{}", self.uids)
    }

    fn create_port(&mut self, index: usize) {
        let name = format!("p{index}");
        if self.ports.contains_key(&name) {
            return;
        }
        let (uid, rv) = (self.uid("port-"), self.bump());
        let port = v1::Port {
            metadata: Some(v1::ObjectMeta {
                name: name.clone(),
                project: "default".into(),
                uid,
                generation: 1,
                resource_version: rv,
                ..Default::default()
            }),
            spec: Some(port_spec(index)),
            status: None,
        };
        self.ports.insert(name, port);
    }

    fn live_uids(&self) -> HashSet<String> {
        self.ports
            .values()
            .map(|p| port_uid(p).to_owned())
            .collect()
    }

    fn delete_port(&mut self, index: usize) {
        if self.ports.remove(&format!("p{index}")).is_some() {
            self.bump();
        }
    }

    /// The garbage collector: claims whose owner is gone.
    fn collect_garbage(&mut self) {
        let live = self.live_uids();
        let before = self.ip_claims.len() + self.mac_claims.len();
        self.ip_claims
            .retain(|_, c| owner_of(c.metadata.as_ref()).is_some_and(|o| live.contains(&o)));
        self.mac_claims
            .retain(|_, c| owner_of(c.metadata.as_ref()).is_some_and(|o| live.contains(&o)));
        if self.ip_claims.len() + self.mac_claims.len() != before {
            self.bump();
        }
    }
}

fn owner_of(meta: Option<&v1::ObjectMeta>) -> Option<String> {
    meta?
        .owner_references
        .iter()
        .find(|r| r.controller)
        .map(|r| r.uid.clone())
}

#[derive(Clone)]
struct ModelApi(Arc<Mutex<World>>);

impl ModelApi {
    fn world(&self) -> std::sync::MutexGuard<'_, World> {
        self.0.lock().unwrap()
    }
}

impl IpamBackend for ModelApi {
    async fn create_claim(&self, claim: Object) -> Result<(), Error> {
        YieldOnce(false).await;
        let mut w = self.world();
        let uid = w.uid("claim-");
        let exists = |name: &str| Error::AlreadyExists {
            object: name.to_owned(),
        };
        match claim {
            Object::IPAddress(mut c) => {
                let name = meta(&c).name.clone();
                if w.ip_claims.contains_key(&name) {
                    return Err(exists(&name));
                }
                c.metadata.get_or_insert_with(Default::default).uid = uid;
                w.bump();
                w.ip_claims.insert(name, c);
            }
            Object::MACAddress(mut c) => {
                let name = meta(&c).name.clone();
                if w.mac_claims.contains_key(&name) {
                    return Err(exists(&name));
                }
                c.metadata.get_or_insert_with(Default::default).uid = uid;
                w.bump();
                w.mac_claims.insert(name, c);
            }
            other => panic!("IPAM created a {}", other.kind()),
        }
        Ok(())
    }

    async fn claim_holder(&self, kind: Kind, name: &str) -> Result<Option<String>, Error> {
        YieldOnce(false).await;
        let w = self.world();
        Ok(match kind {
            Kind::IPAddress => w
                .ip_claims
                .get(name)
                .map(|c| owner_of(c.metadata.as_ref()).unwrap_or_default()),
            Kind::MACAddress => w
                .mac_claims
                .get(name)
                .map(|c| owner_of(c.metadata.as_ref()).unwrap_or_default()),
            _ => None,
        })
    }

    async fn release_claim(&self, claim: &ClaimRef) -> Result<(), Error> {
        YieldOnce(false).await;
        let mut w = self.world();
        match claim.kind {
            Kind::IPAddress => {
                if w.ip_claims
                    .get(&claim.name)
                    .is_some_and(|c| meta(c).uid == claim.uid)
                {
                    w.ip_claims.remove(&claim.name);
                    w.bump();
                }
            }
            _ => {
                if w.mac_claims
                    .get(&claim.name)
                    .is_some_and(|c| meta(c).uid == claim.uid)
                {
                    w.mac_claims.remove(&claim.name);
                    w.bump();
                }
            }
        }
        Ok(())
    }

    async fn write_status(
        &self,
        port: &v1::Port,
        fields: &[&str],
        status: v1::PortStatus,
        conditions: Vec<v1::Condition>,
        resource_version: i64,
    ) -> Result<(), Error> {
        YieldOnce(false).await;
        let mut w = self.world();
        let name = meta(port).name.clone();
        let rv = w.revision + 1;
        let Some(stored) = w.ports.get_mut(&name) else {
            return Err(Error::NotFound { object: name });
        };
        let current = meta(stored).resource_version;
        if resource_version != 0 && resource_version != current {
            return Err(Error::Conflict {
                object: name,
                message: "stale".into(),
            });
        }
        let generation = meta(stored).generation;
        let s = stored.status.get_or_insert_with(Default::default);
        for field in fields {
            match *field {
                "addresses" => s.addresses = status.addresses.clone(),
                "mac" => s.mac = status.mac.clone(),
                "networkUid" => s.network_uid = status.network_uid.clone(),
                "observedGeneration" => s.observed_generation = status.observed_generation,
                other => panic!("IPAM wrote status.{other}"),
            }
        }
        for mut c in conditions {
            c.observed_generation = generation;
            s.conditions.retain(|x| x.r#type != c.r#type);
            s.conditions.push(c);
        }
        stored
            .metadata
            .get_or_insert_with(Default::default)
            .resource_version = rv;
        w.revision = rv;
        Ok(())
    }

    async fn get_port(&self, _: &str, name: &str) -> Result<Option<v1::Port>, Error> {
        YieldOnce(false).await;
        Ok(self.world().ports.get(name).cloned())
    }
}

type Task = Pin<Box<dyn Future<Output = Result<Executed, ReconcileError>> + Send>>;

/// One controller process: its hints, its (possibly stale) view, its reconciles in flight.
struct Process {
    hints: Arc<Hints>,
    view: World,
    tasks: Vec<(String, Task)>,
}

impl Process {
    fn start(world: &World) -> Self {
        let mut process = Process {
            hints: Arc::new(Hints::new()),
            view: World::default(),
            tasks: Vec::new(),
        };
        process.refresh(world);
        process
    }

    /// The cache catches up: listeners tell the hints what appeared and went.
    fn refresh(&mut self, world: &World) {
        let addresses = |w: &World| -> HashSet<IpAddr> {
            w.ip_claims
                .values()
                .filter_map(|c| c.spec.as_ref()?.address.parse().ok())
                .collect()
        };
        let macs = |w: &World| -> HashSet<allocator::Mac> {
            w.mac_claims
                .values()
                .filter_map(|c| parse_mac(&c.spec.as_ref()?.address))
                .collect()
        };
        let (before, after) = (addresses(&self.view), addresses(world));
        for ip in before.difference(&after) {
            self.hints.observe_ip(NETWORK_UID, *ip, false);
        }
        for ip in after.difference(&before) {
            self.hints.observe_ip(NETWORK_UID, *ip, true);
        }
        let (before, after) = (macs(&self.view), macs(world));
        for mac in before.difference(&after) {
            self.hints.observe_mac(*mac, false);
        }
        for mac in after.difference(&before) {
            self.hints.observe_mac(*mac, true);
        }
        self.view = world.clone();
    }

    /// Starts a reconcile of a Port as this process's view has it.
    fn reconcile(&mut self, api: &ModelApi, name: &str) {
        if self.tasks.iter().any(|(n, _)| n == name) {
            return; // one reconcile per key per process
        }
        let Some(port) = self.view.ports.get(name).cloned() else {
            return;
        };
        let uid = port_uid(&port).to_owned();
        let ips: Vec<v1::IpAddress> = self
            .view
            .ip_claims
            .values()
            .filter(|c| owner_of(c.metadata.as_ref()).as_deref() == Some(&uid))
            .cloned()
            .collect();
        let macs: Vec<v1::MacAddress> = self
            .view
            .mac_claims
            .values()
            .filter(|c| owner_of(c.metadata.as_ref()).as_deref() == Some(&uid))
            .cloned()
            .collect();
        let (api, hints) = (api.clone(), self.hints.clone());
        let task: Task = Box::pin(async move {
            let network = network();
            let facts = PortFacts {
                port: &port,
                network: Ok(&network),
                ip_claims: ips.iter().collect(),
                mac_claims: macs.iter().collect(),
                exhausted_condition: false,
            };
            run_port(&api, &hints, &facts).await
        });
        self.tasks.push((name.to_owned(), task));
    }

    /// Polls one reconcile once (one step).
    fn step(&mut self, slot: usize) {
        if self.tasks.is_empty() {
            return;
        }
        let slot = slot % self.tasks.len();
        let mut cx = Context::from_waker(Waker::noop());
        if self.tasks[slot].1.as_mut().poll(&mut cx).is_ready() {
            drop(self.tasks.remove(slot));
        }
    }

    /// Runs every reconcile in flight to its end.
    fn finish(&mut self) {
        while !self.tasks.is_empty() {
            self.step(0);
        }
    }
}

#[derive(Clone, Debug)]
enum Op {
    Create(usize),
    Delete(usize),
    CollectGarbage,
    Reconcile { process: usize, port: usize },
    Step { process: usize, slot: usize },
    Crash(usize),
    Refresh(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..PORTS).prop_map(Op::Create),
        1 => (0..PORTS).prop_map(Op::Delete),
        1 => Just(Op::CollectGarbage),
        4 => (0..3usize, 0..PORTS).prop_map(|(process, port)| Op::Reconcile { process, port }),
        12 => (0..3usize, 0..4usize).prop_map(|(process, slot)| Op::Step { process, slot }),
        1 => (0..3usize).prop_map(Op::Crash),
        3 => (0..3usize).prop_map(Op::Refresh),
    ]
}

/// No two live Ports recorded one value; every recorded value is claimed by its Port.
fn check_recorded(w: &World) -> Result<(), TestCaseError> {
    let mut ips: HashMap<String, String> = HashMap::new();
    let mut macs: HashMap<String, String> = HashMap::new();
    for port in w.ports.values().filter(|p| is_decided(p)) {
        let name = meta(port).name.clone();
        let status = port.status.clone().unwrap_or_default();
        for address in &status.addresses {
            if let Some(other) = ips.insert(address.ip.clone(), name.clone()) {
                return Err(TestCaseError::fail(format!(
                    "{} recorded by {other} and {name}",
                    address.ip
                )));
            }
            let claim = w.ip_claims.get(&ip_claim_name(
                &status.network_uid,
                address.ip.parse().unwrap(),
            ));
            let holder = claim.and_then(|c| owner_of(c.metadata.as_ref()));
            prop_assert_eq!(
                holder.as_deref(),
                Some(port_uid(port)),
                "claim of {}",
                address.ip
            );
        }
        if let Some(other) = macs.insert(status.mac.clone(), name.clone()) {
            return Err(TestCaseError::fail(format!(
                "MAC {} recorded by {other} and {name}",
                status.mac
            )));
        }
        let claim = w.mac_claims.get(&mac_claim_name(&status.mac));
        let holder = claim.and_then(|c| owner_of(c.metadata.as_ref()));
        prop_assert_eq!(
            holder.as_deref(),
            Some(port_uid(port)),
            "claim of {}",
            status.mac
        );
    }
    Ok(())
}

/// After settling: nothing leaked, and every Port without addresses is blocked truly.
fn check_settled(w: &World) -> Result<(), TestCaseError> {
    check_recorded(w)?;
    let live = w.live_uids();
    for claim in w.ip_claims.values() {
        prop_assert!(
            live.contains(&owner_of(claim.metadata.as_ref()).unwrap_or_default()),
            "leaked {}",
            meta(claim).name
        );
    }
    for claim in w.mac_claims.values() {
        prop_assert!(
            live.contains(&owner_of(claim.metadata.as_ref()).unwrap_or_default()),
            "leaked {}",
            meta(claim).name
        );
    }
    for port in w.ports.values() {
        let uid = port_uid(port);
        let owned_ips: Vec<&str> = w
            .ip_claims
            .values()
            .filter(|c| owner_of(c.metadata.as_ref()).as_deref() == Some(uid))
            .map(|c| c.spec.as_ref().unwrap().address.as_str())
            .collect();
        let owned_macs = w
            .mac_claims
            .values()
            .filter(|c| owner_of(c.metadata.as_ref()).as_deref() == Some(uid))
            .count();
        if is_decided(port) {
            let status = port.status.as_ref().unwrap();
            let recorded: Vec<&str> = status.addresses.iter().map(|a| a.ip.as_str()).collect();
            prop_assert_eq!(
                owned_ips,
                recorded,
                "{} holds exactly its addresses",
                meta(port).name
            );
            prop_assert_eq!(owned_macs, 1, "{} holds exactly its MAC", meta(port).name);
            continue;
        }
        prop_assert!(
            owned_ips.is_empty(),
            "{} holds an address it did not record",
            meta(port).name
        );
        // Two processes racing on a Port that then blocks may each have claimed a MAC.
        // Releasing either before a decision is recorded is what must never happen; they
        // are freed when the Port is decided or deleted. So any number is fine here.
        let ready = port
            .status
            .as_ref()
            .and_then(|s| s.conditions.iter().find(|c| c.r#type == "Ready"));
        let reason = ready.map(|c| c.reason.as_str()).unwrap_or("none");
        match reason {
            reason::EXHAUSTED => {
                prop_assert_eq!(w.ip_claims.len(), 5, "exhausted with free addresses")
            }
            reason::IP_IN_USE => prop_assert!(
                w.ip_claims
                    .contains_key(&ip_claim_name(NETWORK_UID, FIXED_IP.parse().unwrap()))
            ),
            reason::MAC_IN_USE => {
                prop_assert!(w.mac_claims.contains_key(&mac_claim_name(WANTED_MAC)))
            }
            other => {
                return Err(TestCaseError::fail(format!(
                    "{} left without addresses: {other}",
                    meta(port).name
                )));
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn no_duplicate_and_no_leak_across_any_interleaving(ops in prop::collection::vec(op(), 1..120)) {
        let world = Arc::new(Mutex::new(World::default()));
        let api = ModelApi(world.clone());
        let snapshot = || world.lock().unwrap().clone();
        let mut processes: Vec<Process> = (0..3).map(|_| Process::start(&snapshot())).collect();
        for op in ops {
            match op {
                Op::Create(i) => world.lock().unwrap().create_port(i),
                Op::Delete(i) => world.lock().unwrap().delete_port(i),
                Op::CollectGarbage => world.lock().unwrap().collect_garbage(),
                Op::Reconcile { process, port } => processes[process].reconcile(&api, &format!("p{port}")),
                Op::Step { process, slot } => processes[process].step(slot),
                Op::Crash(p) => processes[p] = Process::start(&snapshot()),
                Op::Refresh(p) => processes[p].refresh(&snapshot()),
            }
            check_recorded(&world.lock().unwrap())?;
        }
        // Settle: the survivors finish what they started, garbage is collected, then one
        // process reconciles every Port until nothing changes, as the leader's wakeups and
        // resyncs would. "Nothing changes" is judged by the revision, so every write of the
        // model advances it, deletes included: a pass whose only effect is releasing a
        // decided Port's extra claims frees addresses that a Port reported exhausted earlier
        // in that pass may now take (the controller requeues it when a claim of its Network
        // goes away), and the next pass must run.
        for process in &mut processes {
            process.finish();
        }
        check_recorded(&world.lock().unwrap())?;
        world.lock().unwrap().collect_garbage();
        let survivor = &mut processes[0];
        for _ in 0..8 {
            let before = snapshot();
            survivor.refresh(&before);
            for name in before.ports.keys() {
                survivor.reconcile(&api, name);
                survivor.finish();
                survivor.refresh(&snapshot());
            }
            let after = snapshot();
            if after.revision == before.revision {
                break;
            }
        }
        check_settled(&world.lock().unwrap())?;
    }
}
