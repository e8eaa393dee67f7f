//! The network controller: a segment ID per Network, readiness, and deletion while in use.
//!
//! A Network's VXLAN segment is held by a `SegmentID` claim named `vni-<id>`, owned by the
//! Network, exactly as IPAM holds addresses (see [`crate::ipam`]): the create decides, the
//! status write recording `segmentId` is guarded by the resourceVersion the plan was made
//! from, and claims beyond the recorded one are released only once it is recorded.
//!
//! `Ready` says whether the subnets are usable (they parse, gateways and pools lie inside
//! their CIDRs) and the segment is recorded. A Network carries the finalizer
//! [`NETWORK_FINALIZER`]: while Ports use it, deletion waits and `InUse` names them; once
//! none do, the finalizer goes and the garbage collector frees the segment claim.

use std::{collections::BTreeSet, sync::Arc};

use ferro_api::{Error, Kind, Object, owners, v1};

use crate::{
    api::Api,
    ipam::{SubnetRange, resolve_network},
};
use ferro_runtime::{
    Action, Caches, Controller, ObjectRef, Reconcile, ReconcileError, Store, condition,
    condition_holds,
    controller::Settings,
    controller_reference,
    events::Recorder,
    finalizer::{self, Step},
    meta,
    metrics::Metrics,
    reflector::OWNER_UID,
};

/// The finalizer that keeps a Network until no Port uses it.
pub const NETWORK_FINALIZER: &str = "ferro.io/network-in-use";

/// The `deviceOwner` of the Port a Network's DHCP server answers from.
pub const DHCP_DEVICE_OWNER: &str = "network:dhcp";

/// The name of a Network's DHCP Port, in the Network's project.
pub fn dhcp_port_name(network: &str) -> String {
    format!("{network}-dhcp")
}

/// The Port a Network's DHCP server needs: an address on every subnet that has DHCP, owned
/// by the Network; `None` when no subnet has DHCP. A node with the network role wires it
/// into a `qdhcp-<network-uid>` namespace and runs dnsmasq on it, as Neutron's DHCP agent
/// does with its `network:dhcp` port.
pub fn wanted_dhcp_port(network: &v1::Network) -> Option<v1::Port> {
    let m = meta(network);
    let spec = network.spec.clone().unwrap_or_default();
    let fixed_ips: Vec<v1::FixedIp> = spec
        .subnets
        .iter()
        .filter(|s| s.dhcp.unwrap_or(true))
        .map(|s| v1::FixedIp {
            subnet: s.name.clone(),
            ip_address: String::new(),
        })
        .collect();
    if fixed_ips.is_empty() {
        return None;
    }
    Some(v1::Port {
        metadata: Some(v1::ObjectMeta {
            name: dhcp_port_name(&m.name),
            project: m.project.clone(),
            owner_references: vec![controller_reference(network, false)],
            ..Default::default()
        }),
        spec: Some(v1::PortSpec {
            network: m.name.clone(),
            fixed_ips,
            device_owner: DHCP_DEVICE_OWNER.to_owned(),
            port_security: Some(false),
            ..Default::default()
        }),
        status: None,
    })
}

/// Whether a Port is the DHCP Port this Network made (named and owned as such).
fn is_own_dhcp_port(network: &v1::Network, port: &v1::Port) -> bool {
    let m = meta(network);
    meta(port).name == dhcp_port_name(&m.name)
        && meta(port)
            .owner_references
            .iter()
            .any(|r| r.controller && r.uid == m.uid)
}

/// The name of the claim of a VNI.
pub fn segment_claim_name(vni: u32) -> String {
    format!("vni-{vni}")
}

/// How many refused VNI candidates one allocation tolerates.
const MAX_REFUSED_CANDIDATES: usize = 64;

/// What the planner knows about one Network.
pub struct NetworkFacts<'a> {
    /// The Network.
    pub network: &'a v1::Network,
    /// The segment claims the cache says it owns.
    pub segment_claims: Vec<&'a v1::SegmentId>,
}

/// How the segment is obtained.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SegmentWant {
    /// Recorded in status already.
    Recorded(u32),
    /// A claim is held but not recorded: record it.
    Held(u32),
    /// Claim a free one.
    Any,
}

/// The plan for a live Network.
#[derive(Clone, Debug, PartialEq)]
pub struct NetworkPlan {
    /// The segment.
    pub segment: SegmentWant,
    /// `Ready`, computed from the subnets (and, once recorded, the segment).
    pub ready: v1::Condition,
    /// Claims owned beyond the recorded segment.
    pub release: Vec<(String, String)>,
    /// Whether status must be written (decision missing, or conditions not holding).
    pub write: bool,
}

/// Checks subnets as IPAM will use them: each parses, and no two CIDRs overlap.
pub fn check_subnets(subnets: &[v1::Subnet]) -> Result<(), String> {
    let mut ranges: Vec<SubnetRange> = Vec::new();
    for subnet in subnets {
        let range = SubnetRange::new(subnet)?;
        if let Some(other) = ranges
            .iter()
            .find(|r| r.net.contains(&range.net.network()) || range.net.contains(&r.net.network()))
        {
            return Err(format!(
                "subnet {} ({}) overlaps subnet {} ({})",
                range.name, range.net, other.name, other.net
            ));
        }
        ranges.push(range);
    }
    Ok(())
}

/// Plans a live Network. Pure.
pub fn plan(facts: &NetworkFacts<'_>) -> NetworkPlan {
    let network = facts.network;
    let generation = meta(network).generation;
    let status = network.status.clone().unwrap_or_default();
    let mut held: Vec<u32> = facts
        .segment_claims
        .iter()
        .filter_map(|c| c.spec.as_ref())
        .map(|s| s.id)
        .collect();
    held.sort_unstable();
    let segment = if status.segment_id != 0 {
        SegmentWant::Recorded(status.segment_id)
    } else if let Some(first) = held.first() {
        SegmentWant::Held(*first)
    } else {
        SegmentWant::Any
    };
    let release = match segment {
        SegmentWant::Recorded(id) => facts
            .segment_claims
            .iter()
            .filter(|c| {
                c.spec.as_ref().map(|s| s.id) != Some(id) && meta(**c).deletion_timestamp.is_none()
            })
            .map(|c| (meta(*c).name.clone(), meta(*c).uid.clone()))
            .collect(),
        _ => Vec::new(),
    };
    let subnets = network.spec.clone().unwrap_or_default().subnets;
    let ready = match check_subnets(&subnets) {
        Err(e) => condition("Ready", false, "InvalidSubnet", e),
        Ok(()) => match segment {
            SegmentWant::Recorded(id) => {
                condition("Ready", true, "SegmentAllocated", format!("segment {id}"))
            }
            _ => condition("Ready", false, "SegmentPending", "no segment recorded yet"),
        },
    };
    let conditions = status.conditions.as_slice();
    let holds =
        status.observed_generation == generation && condition_holds(conditions, &ready, generation);
    let write = !matches!(segment, SegmentWant::Recorded(_)) || !holds;
    NetworkPlan {
        segment,
        ready,
        release,
        write,
    }
}

/// The `InUse` condition of a Network being deleted while these Ports use it.
pub fn in_use_condition(ports: &[String]) -> v1::Condition {
    const SHOWN: usize = 10;
    let mut names: Vec<&str> = ports.iter().take(SHOWN).map(String::as_str).collect();
    names.sort_unstable();
    let more = if ports.len() > SHOWN {
        format!(" and {} more", ports.len() - SHOWN)
    } else {
        String::new()
    };
    condition(
        "InUse",
        true,
        "PortsAttached",
        format!("deletion waits for ports {}{more}", names.join(", ")),
    )
}

/// The network controller: reconciles Networks.
pub struct NetworkController {
    api: Api,
    recorder: Recorder,
    hints: Arc<crate::ipam::Hints>,
    networks: Store<v1::Network>,
    ports: Store<v1::Port>,
    segments: Store<v1::SegmentId>,
}

const PORT_BY_NETWORK_UID: &str = "network-uid";
const PORT_BY_NETWORK_REF: &str = "network-ref";

impl NetworkController {
    /// Builds the controller over the shared caches.
    pub fn build(
        api: &Api,
        caches: &Caches,
        metrics: &Metrics,
        settings: Settings,
    ) -> (Controller, Arc<NetworkController>) {
        let networks = caches.store::<v1::Network>();
        let ports = caches.store::<v1::Port>();
        let segments = caches.store::<v1::SegmentId>();
        ports.add_index(PORT_BY_NETWORK_UID, |p: &v1::Port| {
            p.status
                .as_ref()
                .map(|s| s.network_uid.clone())
                .filter(|u| !u.is_empty())
                .into_iter()
                .collect()
        });
        ports.add_index(PORT_BY_NETWORK_REF, |p: &v1::Port| {
            vec![format!(
                "{}/{}",
                meta(p).project,
                p.spec
                    .as_ref()
                    .map(|s| s.network.as_str())
                    .unwrap_or_default()
            )]
        });
        let hints = Arc::new(crate::ipam::Hints::new());
        let h = hints.clone();
        segments.listen(move |c| {
            if let Some(spec) = c.old.as_ref().and_then(|o| o.spec.as_ref()) {
                h.observe_vni(spec.id, false);
            }
            if let Some(spec) = c.new.as_ref().and_then(|o| o.spec.as_ref()) {
                h.observe_vni(spec.id, true);
            }
        });
        let by_name = networks.clone();
        let controller = Controller::new("network", settings, metrics.clone())
            .reconciles(&networks)
            .owns(&segments, Kind::Network)
            // Its DHCP Port, deleted by hand, is made again.
            .owns(&ports, Kind::Network)
            .watches(&ports, move |c| {
                // A Port going away may let a Network finish deleting.
                let mut keys = BTreeSet::new();
                for port in c.old.iter().chain(c.new.iter()) {
                    if let Some(network) = resolve_network(&by_name, port)
                        .ok()
                        .filter(|n| meta(n.as_ref()).deletion_timestamp.is_some())
                    {
                        keys.insert(ObjectRef::of(network.as_ref()));
                    }
                }
                keys.into_iter().collect()
            });
        let reconciler = Arc::new(NetworkController {
            api: api.clone(),
            recorder: Recorder::new(api.client().clone(), owners::NETWORK_CONTROLLER),
            hints,
            networks,
            ports,
            segments,
        });
        (controller, reconciler)
    }

    /// The Ports attached to a Network: recorded on it, or naming it in its own project;
    /// the Network's own DHCP Port is not counted.
    fn ports_using(&self, network: &v1::Network) -> Vec<String> {
        let m = meta(network);
        let mut names: BTreeSet<String> = BTreeSet::new();
        for port in self.ports.by_index(PORT_BY_NETWORK_UID, &m.uid) {
            if is_own_dhcp_port(network, &port) {
                continue;
            }
            names.insert(format!(
                "{}/{}",
                meta(port.as_ref()).project,
                meta(port.as_ref()).name
            ));
        }
        for port in self
            .ports
            .by_index(PORT_BY_NETWORK_REF, &format!("{}/{}", m.project, m.name))
        {
            let recorded = port
                .status
                .as_ref()
                .map(|s| s.network_uid.as_str())
                .unwrap_or_default();
            if (recorded.is_empty() || recorded == m.uid) && !is_own_dhcp_port(network, &port) {
                names.insert(format!(
                    "{}/{}",
                    meta(port.as_ref()).project,
                    meta(port.as_ref()).name
                ));
            }
        }
        names.into_iter().collect()
    }

    async fn claim_segment(&self, network: &v1::Network) -> Result<Option<u32>, ReconcileError> {
        let uid = &meta(network).uid;
        for _ in 0..MAX_REFUSED_CANDIDATES {
            let Some(vni) = self.hints.next_vni() else {
                return Ok(None);
            };
            let claim = Object::SegmentID(v1::SegmentId {
                metadata: Some(v1::ObjectMeta {
                    name: segment_claim_name(vni),
                    labels: [(crate::ipam::OWNER_UID_LABEL.to_owned(), uid.clone())]
                        .into_iter()
                        .collect(),
                    owner_references: vec![controller_reference(network, true)],
                    ..Default::default()
                }),
                spec: Some(v1::SegmentIdSpec { id: vni }),
                status: None,
            });
            let result = self.api.create(claim).await;
            self.hints.settle_vni(vni);
            match result {
                Ok(_) => return Ok(Some(vni)),
                Err(Error::AlreadyExists { .. }) => {
                    let holder = self
                        .api
                        .get(Kind::SegmentID, "", &segment_claim_name(vni))
                        .await
                        .ok();
                    let ours = holder
                        .and_then(|o| o.metadata().cloned())
                        .is_some_and(|m| m.owner_references.iter().any(|r| &r.uid == uid));
                    if ours {
                        return Ok(Some(vni));
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(ReconcileError::Retry(
            "every segment candidate was taken; the segment cache is behind".into(),
        ))
    }

    /// Creates the Network's DHCP Port when a subnet has DHCP, and deletes it when none
    /// has (or the Network is going).
    async fn keep_dhcp_port(
        &self,
        network: &v1::Network,
        wanted: Option<v1::Port>,
    ) -> Result<(), ReconcileError> {
        let m = meta(network);
        let name = dhcp_port_name(&m.name);
        let existing = self.ports.get_named(&m.project, &name);
        match (wanted, existing) {
            (Some(port), None) => match self.api.create(Object::Port(port)).await {
                Ok(_) | Err(Error::AlreadyExists { .. }) => {}
                Err(e) => return Err(e.into()),
            },
            (None, Some(port)) if is_own_dhcp_port(network, &port) => {
                let request = v1::DeleteRequest {
                    key: Some(v1::ObjectKey {
                        kind: Kind::Port.name().into(),
                        project: m.project.clone(),
                        name,
                    }),
                    precondition_uid: meta(port.as_ref()).uid.clone(),
                    ..Default::default()
                };
                match self.api.delete(request).await {
                    Ok(_) | Err(Error::NotFound { .. } | Error::Conflict { .. }) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            // Present as wanted, or a Port of that name that is someone else's: left alone.
            _ => {}
        }
        Ok(())
    }

    async fn apply(&self, network: &v1::Network) -> Result<Action, ReconcileError> {
        let uid = &meta(network).uid;
        self.keep_dhcp_port(network, wanted_dhcp_port(network))
            .await?;
        let claims = self.segments.by_index(OWNER_UID, uid);
        let facts = NetworkFacts {
            network,
            segment_claims: claims.iter().map(|c| c.as_ref()).collect(),
        };
        let plan = plan(&facts);
        for (name, claim_uid) in &plan.release {
            let request = v1::DeleteRequest {
                key: Some(v1::ObjectKey {
                    kind: Kind::SegmentID.name().into(),
                    project: String::new(),
                    name: name.clone(),
                }),
                precondition_uid: claim_uid.clone(),
                ..Default::default()
            };
            match self.api.delete(request).await {
                Ok(_) | Err(Error::NotFound { .. } | Error::Conflict { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        if !plan.write {
            return Ok(Action::AwaitChange);
        }
        let (segment, guard) = match plan.segment {
            SegmentWant::Recorded(id) => (id, 0),
            SegmentWant::Held(id) => (id, meta(network).resource_version),
            SegmentWant::Any => match self.claim_segment(network).await? {
                Some(id) => (id, meta(network).resource_version),
                None => {
                    let full = condition("Ready", false, "SegmentsExhausted", "no free segment ID");
                    self.write_status(network, 0, full.clone(), 0).await?;
                    self.recorder
                        .warning(network, &full.reason, &full.message)
                        .await;
                    return Ok(Action::Requeue(std::time::Duration::from_secs(60)));
                }
            },
        };
        let ready = if plan.ready.reason == "SegmentPending" {
            condition(
                "Ready",
                true,
                "SegmentAllocated",
                format!("segment {segment}"),
            )
        } else {
            plan.ready
        };
        match self.write_status(network, segment, ready, guard).await {
            // Another writer recorded a segment first: the next pass releases ours.
            Ok(()) | Err(Error::Conflict { .. } | Error::NotFound { .. }) => {
                Ok(Action::AwaitChange)
            }
            Err(e) => Err(e.into()),
        }
    }

    async fn write_status(
        &self,
        network: &v1::Network,
        segment: u32,
        ready: v1::Condition,
        guard: i64,
    ) -> Result<(), Error> {
        let mut fields = vec!["observedGeneration"];
        if segment != 0 {
            fields.push("segmentId");
        }
        let status = v1::NetworkStatus {
            segment_id: segment,
            observed_generation: meta(network).generation,
            ..Default::default()
        };
        let object = Object::Network(v1::Network {
            metadata: network.metadata.clone(),
            spec: None,
            status: Some(status),
        });
        self.api
            .update_status_at(
                object,
                owners::NETWORK_CONTROLLER,
                &fields,
                vec![ready],
                guard,
            )
            .await
            .map(|_| ())
    }
}

impl Reconcile for NetworkController {
    type Error = ReconcileError;

    async fn reconcile(&self, key: ObjectRef) -> Result<Action, ReconcileError> {
        let Some(network) = self.networks.get(&key) else {
            return Ok(Action::AwaitChange);
        };
        match finalizer::prepare(self.api.client(), NETWORK_FINALIZER, network.as_ref()).await? {
            Step::Skip => Ok(Action::AwaitChange),
            Step::Apply => self.apply(&network).await,
            Step::Cleanup(cleanup) => {
                let ports = self.ports_using(&network);
                if ports.is_empty() {
                    // The DHCP Port goes first; its deletion queues this Network again.
                    self.keep_dhcp_port(&network, None).await?;
                    let m = meta(network.as_ref());
                    if self
                        .ports
                        .get_named(&m.project, &dhcp_port_name(&m.name))
                        .is_some_and(|p| is_own_dhcp_port(&network, &p))
                    {
                        return Ok(Action::AwaitChange);
                    }
                    cleanup.finish().await?;
                    return Ok(Action::AwaitChange);
                }
                let in_use = in_use_condition(&ports);
                let status = network.status.clone().unwrap_or_default();
                if !condition_holds(
                    &status.conditions,
                    &in_use,
                    meta(network.as_ref()).generation,
                ) {
                    let object = Object::Network(v1::Network {
                        metadata: network.metadata.clone(),
                        spec: None,
                        status: None,
                    });
                    match self
                        .api
                        .update_status_at(
                            object,
                            owners::NETWORK_CONTROLLER,
                            &[],
                            vec![in_use.clone()],
                            0,
                        )
                        .await
                    {
                        Ok(_) | Err(Error::NotFound { .. }) => {}
                        Err(e) => return Err(e.into()),
                    }
                    self.recorder
                        .normal(network.as_ref(), "DeletionWaitsForPorts", &in_use.message)
                        .await;
                }
                // The Ports trigger: their deletion queues this Network again.
                Ok(Action::AwaitChange)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn network(subnets: &[(&str, &str)], status: Option<v1::NetworkStatus>) -> v1::Network {
        v1::Network {
            metadata: Some(v1::ObjectMeta {
                name: "net".into(),
                project: "default".into(),
                uid: "nu".into(),
                generation: 1,
                ..Default::default()
            }),
            spec: Some(v1::NetworkSpec {
                subnets: subnets
                    .iter()
                    .map(|(name, cidr)| v1::Subnet {
                        name: (*name).into(),
                        cidr: (*cidr).into(),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            }),
            status,
        }
    }

    fn claim(id: u32) -> v1::SegmentId {
        v1::SegmentId {
            metadata: Some(v1::ObjectMeta {
                name: segment_claim_name(id),
                uid: format!("c{id}"),
                ..Default::default()
            }),
            spec: Some(v1::SegmentIdSpec { id }),
            status: None,
        }
    }

    fn recorded(id: u32) -> v1::NetworkStatus {
        let mut ready = condition("Ready", true, "SegmentAllocated", format!("segment {id}"));
        ready.observed_generation = 1;
        v1::NetworkStatus {
            segment_id: id,
            conditions: vec![ready],
            observed_generation: 1,
        }
    }

    #[test]
    fn plans() {
        struct Case {
            what: &'static str,
            network: v1::Network,
            claims: Vec<v1::SegmentId>,
            segment: SegmentWant,
            ready: (bool, &'static str),
            release: Vec<&'static str>,
            write: bool,
        }
        let cases = vec![
            Case {
                what: "a new network claims a segment",
                network: network(&[("a", "10.0.0.0/24")], None),
                claims: vec![],
                segment: SegmentWant::Any,
                ready: (false, "SegmentPending"),
                release: vec![],
                write: true,
            },
            Case {
                what: "a claim made before a crash is recorded, not a new one",
                network: network(&[("a", "10.0.0.0/24")], None),
                claims: vec![claim(9), claim(4)],
                segment: SegmentWant::Held(4),
                ready: (false, "SegmentPending"),
                release: vec![],
                write: true,
            },
            Case {
                what: "recorded and ready: nothing to write",
                network: network(&[("a", "10.0.0.0/24")], Some(recorded(4))),
                claims: vec![claim(4)],
                segment: SegmentWant::Recorded(4),
                ready: (true, "SegmentAllocated"),
                release: vec![],
                write: false,
            },
            Case {
                what: "claims beyond the recorded segment are released",
                network: network(&[("a", "10.0.0.0/24")], Some(recorded(4))),
                claims: vec![claim(4), claim(7)],
                segment: SegmentWant::Recorded(4),
                ready: (true, "SegmentAllocated"),
                release: vec!["vni-7"],
                write: false,
            },
            Case {
                what: "overlapping subnets are not ready",
                network: network(
                    &[("a", "10.0.0.0/16"), ("b", "10.0.3.0/24")],
                    Some(recorded(4)),
                ),
                claims: vec![claim(4)],
                segment: SegmentWant::Recorded(4),
                ready: (false, "InvalidSubnet"),
                release: vec![],
                write: true,
            },
            Case {
                what: "a subnet-less network is ready once its segment is",
                network: network(&[], Some(recorded(2))),
                claims: vec![claim(2)],
                segment: SegmentWant::Recorded(2),
                ready: (true, "SegmentAllocated"),
                release: vec![],
                write: false,
            },
        ];
        for case in cases {
            let facts = NetworkFacts {
                network: &case.network,
                segment_claims: case.claims.iter().collect(),
            };
            let plan = plan(&facts);
            assert_eq!(plan.segment, case.segment, "{}", case.what);
            assert_eq!(
                (
                    plan.ready.status == v1::condition::Status::True as i32,
                    plan.ready.reason.as_str()
                ),
                case.ready,
                "{}",
                case.what
            );
            let released: Vec<&str> = plan.release.iter().map(|(n, _)| n.as_str()).collect();
            assert_eq!(released, case.release, "{}", case.what);
            assert_eq!(plan.write, case.write, "{}", case.what);
        }
    }

    #[test]
    fn the_dhcp_port_asks_for_an_address_on_each_dhcp_subnet_only() {
        let mut net = network(&[("a", "10.0.1.0/24"), ("b", "10.0.2.0/24")], None);
        net.metadata.as_mut().unwrap().uid = "nu".into();
        net.spec.as_mut().unwrap().subnets[1].dhcp = Some(false);
        let port = wanted_dhcp_port(&net).expect("subnet a has DHCP");
        let m = port.metadata.as_ref().unwrap();
        assert_eq!(m.name, format!("{}-dhcp", meta(&net).name));
        assert!(m.owner_references[0].controller && m.owner_references[0].uid == "nu");
        let spec = port.spec.as_ref().unwrap();
        assert_eq!(spec.device_owner, DHCP_DEVICE_OWNER);
        let subnets: Vec<&str> = spec.fixed_ips.iter().map(|f| f.subnet.as_str()).collect();
        assert_eq!(subnets, ["a"]);
        assert!(is_own_dhcp_port(&net, &port));
        net.spec.as_mut().unwrap().subnets[0].dhcp = Some(false);
        assert!(wanted_dhcp_port(&net).is_none(), "no subnet has DHCP");
    }

    #[test]
    fn in_use_names_the_ports() {
        let c = in_use_condition(&["default/b".into(), "default/a".into()]);
        assert_eq!(c.message, "deletion waits for ports default/a, default/b");
        let many: Vec<String> = (0..12).map(|i| format!("p/{i:02}")).collect();
        assert!(in_use_condition(&many).message.ends_with(" and 2 more"));
    }
}
