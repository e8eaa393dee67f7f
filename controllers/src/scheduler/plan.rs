//! The scheduler's decision, as a pure function: which node a server goes to, or why none
//! can take it.
//!
//! Each node passes the filters in order or is rejected by the first that fails, so the
//! "no valid host" message counts every node exactly once: `4 nodes: 2 insufficient RAM,
//! 1 zone mismatch, 1 not ready`. The nodes that pass are weighed — spread by free RAM by
//! default, or packed — with soft server-group policies added on top; ties go to the node
//! whose name sorts first, so the same inputs always give the same answer.

use std::collections::BTreeMap;

/// What a server asks of its node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Request {
    /// Virtual CPUs.
    pub vcpus: u64,
    /// Memory in MiB.
    pub ram_mib: u64,
    /// Disk in GiB (root plus ephemeral).
    pub disk_gib: u64,
    /// The availability zone; empty means any.
    pub zone: String,
    /// The hypervisor kind required (`QEMU`); empty means any.
    pub hypervisor: String,
    /// Host-aggregate requirements: node label → value (from Flavor extra specs
    /// `aggregate/<label>`).
    pub aggregates: BTreeMap<String, String>,
    /// The server group's policy and where its members are.
    pub group: Option<Group>,
    /// Whether the server has networks, so its node must be able to wire them.
    pub needs_networks: bool,
}

/// A server group as the scheduler sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Group {
    /// The policy.
    pub policy: Policy,
    /// With AntiAffinity: members one node may hold.
    pub max_per_node: u32,
    /// How many of the group's other members each node holds.
    pub members_per_node: BTreeMap<String, u32>,
}

/// A server group policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Policy {
    /// All members on one node.
    Affinity,
    /// Members on different nodes.
    AntiAffinity,
    /// Together when possible.
    SoftAffinity,
    /// Apart when possible.
    SoftAntiAffinity,
}

/// A node as the scheduler sees it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Candidate {
    /// The node's name.
    pub name: String,
    /// Whether its heartbeat is current and its host ready.
    pub ready: bool,
    /// Whether the operator cordoned it.
    pub unschedulable: bool,
    /// Its availability zone.
    pub zone: String,
    /// Its hypervisor kind.
    pub hypervisor: String,
    /// The operator's labels (host aggregates).
    pub labels: BTreeMap<String, String>,
    /// What servers may use.
    pub allocatable: Amounts,
    /// What servers bound to it (or being bound) already take.
    pub used: Amounts,
    /// Whether it wires tenant networks: it runs a network driver that has what it needs.
    pub networking: bool,
}

/// An amount of each resource.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Amounts {
    /// Virtual CPUs.
    pub vcpus: u64,
    /// Memory in MiB.
    pub ram_mib: u64,
    /// Disk in GiB.
    pub disk_gib: u64,
}

/// How much of each resource may be promised beyond what a node has.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Overcommit {
    /// vCPUs per physical CPU.
    pub cpu: f64,
    /// Memory.
    pub ram: f64,
    /// Disk.
    pub disk: f64,
}

impl Default for Overcommit {
    /// Nova's defaults: 16 vCPUs per core, 1.5 × memory, 1 × disk.
    fn default() -> Self {
        Overcommit {
            cpu: 16.0,
            ram: 1.5,
            disk: 1.0,
        }
    }
}

/// Whether to spread servers over nodes or pack them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Weighing {
    /// Prefer the node with the most free memory.
    #[default]
    Spread,
    /// Prefer the node with the least free memory that still fits.
    Pack,
}

/// The scheduler's settings.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Settings {
    /// Overcommit ratios.
    pub overcommit: Overcommit,
    /// Spread or pack.
    pub weighing: Weighing,
}

/// Why a node was rejected, in the order the filters run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Rejection {
    /// Heartbeat lapsed or host not ready.
    NotReady,
    /// Cordoned.
    Unschedulable,
    /// The server has networks and the node cannot wire them.
    NoNetworking,
    /// Another hypervisor kind.
    HypervisorMismatch,
    /// Another availability zone.
    ZoneMismatch,
    /// A host-aggregate label differs.
    AggregateMismatch,
    /// The group's members are elsewhere.
    AffinityConflict,
    /// The node holds as many of the group's members as allowed.
    AntiAffinityConflict,
    /// Not enough vCPUs left.
    InsufficientVcpus,
    /// Not enough memory left.
    InsufficientRam,
    /// Not enough disk left.
    InsufficientDisk,
}

impl Rejection {
    /// How the message names it.
    pub fn text(self) -> &'static str {
        match self {
            Rejection::NotReady => "not ready",
            Rejection::Unschedulable => "unschedulable",
            Rejection::NoNetworking => "no working network driver",
            Rejection::HypervisorMismatch => "hypervisor mismatch",
            Rejection::ZoneMismatch => "zone mismatch",
            Rejection::AggregateMismatch => "aggregate mismatch",
            Rejection::AffinityConflict => "affinity conflict",
            Rejection::AntiAffinityConflict => "anti-affinity conflict",
            Rejection::InsufficientVcpus => "insufficient vCPUs",
            Rejection::InsufficientRam => "insufficient RAM",
            Rejection::InsufficientDisk => "insufficient disk",
        }
    }
}

/// The outcome of scheduling one server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Bind to this node.
    Place(String),
    /// No node fits; the message counts what each filter rejected.
    NoValidHost {
        /// `4 nodes: 2 insufficient RAM, 1 zone mismatch, 1 not ready`.
        message: String,
        /// The counts behind the message.
        rejections: BTreeMap<Rejection, usize>,
    },
}

fn scaled(amount: u64, ratio: f64) -> u64 {
    (amount as f64 * ratio).floor() as u64
}

/// The first filter a node fails, if any.
pub fn filter(request: &Request, node: &Candidate, settings: &Settings) -> Option<Rejection> {
    if !node.ready {
        return Some(Rejection::NotReady);
    }
    if node.unschedulable {
        return Some(Rejection::Unschedulable);
    }
    if request.needs_networks && !node.networking {
        return Some(Rejection::NoNetworking);
    }
    if !request.hypervisor.is_empty() && !request.hypervisor.eq_ignore_ascii_case(&node.hypervisor)
    {
        return Some(Rejection::HypervisorMismatch);
    }
    if !request.zone.is_empty() && request.zone != node.zone {
        return Some(Rejection::ZoneMismatch);
    }
    if request
        .aggregates
        .iter()
        .any(|(k, v)| node.labels.get(k) != Some(v))
    {
        return Some(Rejection::AggregateMismatch);
    }
    if let Some(group) = &request.group {
        let here = group.members_per_node.get(&node.name).copied().unwrap_or(0);
        let placed_elsewhere = group
            .members_per_node
            .iter()
            .any(|(n, c)| *c > 0 && *n != node.name);
        match group.policy {
            Policy::Affinity if here == 0 && placed_elsewhere => {
                return Some(Rejection::AffinityConflict);
            }
            Policy::AntiAffinity if here >= group.max_per_node.max(1) => {
                return Some(Rejection::AntiAffinityConflict);
            }
            _ => {}
        }
    }
    let o = settings.overcommit;
    let free = |total: u64, ratio: f64, used: u64| scaled(total, ratio).saturating_sub(used);
    if request.vcpus > free(node.allocatable.vcpus, o.cpu, node.used.vcpus) {
        return Some(Rejection::InsufficientVcpus);
    }
    if request.ram_mib > free(node.allocatable.ram_mib, o.ram, node.used.ram_mib) {
        return Some(Rejection::InsufficientRam);
    }
    if request.disk_gib > free(node.allocatable.disk_gib, o.disk, node.used.disk_gib) {
        return Some(Rejection::InsufficientDisk);
    }
    None
}

/// How much a node is preferred; higher is better.
fn weight(request: &Request, node: &Candidate, settings: &Settings) -> i128 {
    let free_ram = scaled(node.allocatable.ram_mib, settings.overcommit.ram) as i128
        - node.used.ram_mib as i128;
    let mut weight = match settings.weighing {
        Weighing::Spread => free_ram,
        Weighing::Pack => -free_ram,
    };
    if let Some(group) = &request.group {
        let here = i128::from(group.members_per_node.get(&node.name).copied().unwrap_or(0));
        // A soft policy outweighs any difference in free memory.
        const SOFT: i128 = 1 << 40;
        match group.policy {
            Policy::SoftAffinity => weight += here * SOFT,
            Policy::SoftAntiAffinity => weight -= here * SOFT,
            _ => {}
        }
    }
    weight
}

/// Chooses a node for a server, or says why none fits.
pub fn decide(request: &Request, nodes: &[Candidate], settings: &Settings) -> Decision {
    let mut rejections: BTreeMap<Rejection, usize> = BTreeMap::new();
    let mut best: Option<(&Candidate, i128)> = None;
    for node in nodes {
        match filter(request, node, settings) {
            Some(rejection) => *rejections.entry(rejection).or_default() += 1,
            None => {
                let w = weight(request, node, settings);
                let better = match best {
                    None => true,
                    Some((b, bw)) => w > bw || (w == bw && node.name < b.name),
                };
                if better {
                    best = Some((node, w));
                }
            }
        }
    }
    match best {
        Some((node, _)) => Decision::Place(node.name.clone()),
        None => Decision::NoValidHost {
            message: no_valid_host(nodes.len(), &rejections),
            rejections,
        },
    }
}

/// `4 nodes: 2 insufficient RAM, 1 zone mismatch, 1 not ready` — most common reason first.
pub fn no_valid_host(nodes: usize, rejections: &BTreeMap<Rejection, usize>) -> String {
    if nodes == 0 {
        return "no nodes are registered".to_owned();
    }
    let mut counts: Vec<(Rejection, usize)> = rejections.iter().map(|(r, c)| (*r, *c)).collect();
    counts.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let parts: Vec<String> = counts
        .iter()
        .map(|(r, c)| format!("{c} {}", r.text()))
        .collect();
    let noun = if nodes == 1 { "node" } else { "nodes" };
    format!("{nodes} {noun}: {}", parts.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str) -> Candidate {
        Candidate {
            name: name.into(),
            ready: true,
            zone: "az1".into(),
            hypervisor: "QEMU".into(),
            allocatable: Amounts {
                vcpus: 4,
                ram_mib: 8192,
                disk_gib: 100,
            },
            ..Default::default()
        }
    }

    fn small() -> Request {
        Request {
            vcpus: 1,
            ram_mib: 2048,
            disk_gib: 20,
            ..Default::default()
        }
    }

    fn exact() -> Settings {
        Settings {
            overcommit: Overcommit {
                cpu: 1.0,
                ram: 1.0,
                disk: 1.0,
            },
            weighing: Weighing::Spread,
        }
    }

    #[test]
    fn each_filter_rejects_with_its_reason() {
        let s = exact();
        let cases: Vec<(&str, Request, Candidate, Option<Rejection>)> = vec![
            ("fits", small(), node("a"), None),
            (
                "not ready",
                small(),
                Candidate {
                    ready: false,
                    ..node("a")
                },
                Some(Rejection::NotReady),
            ),
            (
                "cordoned",
                small(),
                Candidate {
                    unschedulable: true,
                    ..node("a")
                },
                Some(Rejection::Unschedulable),
            ),
            (
                "networks on a node that cannot wire them",
                Request {
                    needs_networks: true,
                    ..small()
                },
                node("a"),
                Some(Rejection::NoNetworking),
            ),
            (
                "networks on a node that wires them",
                Request {
                    needs_networks: true,
                    ..small()
                },
                Candidate {
                    networking: true,
                    ..node("a")
                },
                None,
            ),
            (
                "hypervisor",
                Request {
                    hypervisor: "CloudHypervisor".into(),
                    ..small()
                },
                node("a"),
                Some(Rejection::HypervisorMismatch),
            ),
            (
                "zone",
                Request {
                    zone: "az2".into(),
                    ..small()
                },
                node("a"),
                Some(Rejection::ZoneMismatch),
            ),
            (
                "aggregate",
                Request {
                    aggregates: [("ssd".to_owned(), "true".to_owned())].into(),
                    ..small()
                },
                node("a"),
                Some(Rejection::AggregateMismatch),
            ),
            (
                "aggregate matches",
                Request {
                    aggregates: [("ssd".to_owned(), "true".to_owned())].into(),
                    ..small()
                },
                Candidate {
                    labels: [("ssd".to_owned(), "true".to_owned())].into(),
                    ..node("a")
                },
                None,
            ),
            (
                "vcpus",
                Request {
                    vcpus: 5,
                    ..small()
                },
                node("a"),
                Some(Rejection::InsufficientVcpus),
            ),
            (
                "ram",
                Request {
                    ram_mib: 9000,
                    ..small()
                },
                node("a"),
                Some(Rejection::InsufficientRam),
            ),
            (
                "disk",
                Request {
                    disk_gib: 101,
                    ..small()
                },
                node("a"),
                Some(Rejection::InsufficientDisk),
            ),
            (
                "used counts",
                small(),
                Candidate {
                    used: Amounts {
                        vcpus: 0,
                        ram_mib: 7000,
                        disk_gib: 0,
                    },
                    ..node("a")
                },
                Some(Rejection::InsufficientRam),
            ),
        ];
        for (name, request, candidate, expected) in cases {
            assert_eq!(filter(&request, &candidate, &s), expected, "{name}");
        }
    }

    #[test]
    fn overcommit_multiplies_what_a_node_offers() {
        let request = Request {
            vcpus: 8,
            ..small()
        };
        assert_eq!(
            filter(&request, &node("a"), &exact()),
            Some(Rejection::InsufficientVcpus)
        );
        assert_eq!(
            filter(&request, &node("a"), &Settings::default()),
            None,
            "16 vCPUs per core by default"
        );
    }

    #[test]
    fn groups_constrain_placement() {
        let s = exact();
        let group = |policy, members: &[(&str, u32)]| Group {
            policy,
            max_per_node: 1,
            members_per_node: members.iter().map(|(n, c)| (n.to_string(), *c)).collect(),
        };
        let with = |g| Request {
            group: Some(g),
            ..small()
        };
        let nodes = [node("a"), node("b")];
        assert_eq!(
            decide(&with(group(Policy::Affinity, &[("b", 1)])), &nodes, &s),
            Decision::Place("b".into())
        );
        assert_eq!(
            decide(&with(group(Policy::AntiAffinity, &[("a", 1)])), &nodes, &s),
            Decision::Place("b".into())
        );
        let Decision::NoValidHost { message, .. } = decide(
            &with(group(Policy::AntiAffinity, &[("a", 1), ("b", 1)])),
            &nodes,
            &s,
        ) else {
            panic!("both nodes hold a member")
        };
        assert_eq!(message, "2 nodes: 2 anti-affinity conflict");
        // Soft policies prefer but never refuse.
        assert_eq!(
            decide(&with(group(Policy::SoftAffinity, &[("b", 1)])), &nodes, &s),
            Decision::Place("b".into())
        );
        assert_eq!(
            decide(
                &with(group(Policy::SoftAntiAffinity, &[("a", 1), ("b", 2)])),
                &nodes,
                &s
            ),
            Decision::Place("a".into())
        );
    }

    #[test]
    fn spread_and_pack_weigh_free_memory() {
        let busy = Candidate {
            used: Amounts {
                vcpus: 1,
                ram_mib: 4096,
                disk_gib: 0,
            },
            ..node("a")
        };
        let idle = node("b");
        let nodes = [busy, idle];
        assert_eq!(
            decide(&small(), &nodes, &exact()),
            Decision::Place("b".into())
        );
        let pack = Settings {
            weighing: Weighing::Pack,
            ..exact()
        };
        assert_eq!(decide(&small(), &nodes, &pack), Decision::Place("a".into()));
        assert_eq!(
            decide(&small(), &[node("z"), node("c")], &exact()),
            Decision::Place("c".into()),
            "ties by name"
        );
    }

    #[test]
    fn no_valid_host_counts_every_node_once() {
        let nodes = [
            Candidate {
                used: Amounts {
                    ram_mib: 8000,
                    ..Default::default()
                },
                ..node("a")
            },
            Candidate {
                used: Amounts {
                    ram_mib: 8000,
                    ..Default::default()
                },
                ..node("b")
            },
            Candidate {
                zone: "az9".into(),
                ..node("c")
            },
            Candidate {
                ready: false,
                ..node("d")
            },
        ];
        let request = Request {
            zone: "az1".into(),
            ..small()
        };
        let Decision::NoValidHost {
            message,
            rejections,
        } = decide(&request, &nodes, &exact())
        else {
            panic!("nothing fits")
        };
        assert_eq!(
            message,
            "4 nodes: 2 insufficient RAM, 1 not ready, 1 zone mismatch"
        );
        assert_eq!(rejections.values().sum::<usize>(), 4);
        assert_eq!(
            no_valid_host(0, &BTreeMap::new()),
            "no nodes are registered"
        );
    }

    #[test]
    fn every_reason_is_named_in_the_message() {
        let request = Request {
            zone: "az1".into(),
            hypervisor: "QEMU".into(),
            aggregates: [("ssd".to_owned(), "true".to_owned())].into(),
            group: Some(Group {
                policy: Policy::AntiAffinity,
                max_per_node: 1,
                members_per_node: [("anti".to_owned(), 1)].into(),
            }),
            ..small()
        };
        let fitting = |name: &str| Candidate {
            labels: [("ssd".to_owned(), "true".to_owned())].into(),
            ..node(name)
        };
        let full = |name: &str, used: Amounts| Candidate {
            used,
            ..fitting(name)
        };
        let table: Vec<(Candidate, &str)> = vec![
            (
                Candidate {
                    ready: false,
                    ..fitting("a")
                },
                "not ready",
            ),
            (
                Candidate {
                    unschedulable: true,
                    ..fitting("b")
                },
                "unschedulable",
            ),
            (
                Candidate {
                    hypervisor: "CloudHypervisor".into(),
                    ..fitting("c")
                },
                "hypervisor mismatch",
            ),
            (
                Candidate {
                    zone: "az2".into(),
                    ..fitting("d")
                },
                "zone mismatch",
            ),
            (node("e"), "aggregate mismatch"),
            (fitting("anti"), "anti-affinity conflict"),
            (
                full(
                    "f",
                    Amounts {
                        vcpus: 4,
                        ..Default::default()
                    },
                ),
                "insufficient vCPUs",
            ),
            (
                full(
                    "g",
                    Amounts {
                        ram_mib: 8192,
                        ..Default::default()
                    },
                ),
                "insufficient RAM",
            ),
            (
                full(
                    "h",
                    Amounts {
                        disk_gib: 100,
                        ..Default::default()
                    },
                ),
                "insufficient disk",
            ),
        ];
        for (candidate, text) in &table {
            let Decision::NoValidHost { message, .. } =
                decide(&request, std::slice::from_ref(candidate), &exact())
            else {
                panic!("{text}: the node must be rejected")
            };
            assert_eq!(message, format!("1 node: 1 {text}"));
        }
        let all: Vec<Candidate> = table.into_iter().map(|(c, _)| c).collect();
        let Decision::NoValidHost {
            message,
            rejections,
        } = decide(&request, &all, &exact())
        else {
            panic!("nothing fits")
        };
        assert_eq!(rejections.len(), 9, "each filter rejected one node");
        assert_eq!(
            message,
            "9 nodes: 1 not ready, 1 unschedulable, 1 hypervisor mismatch, 1 zone mismatch, \
             1 aggregate mismatch, 1 anti-affinity conflict, 1 insufficient vCPUs, \
             1 insufficient RAM, 1 insufficient disk"
        );
        // Hard affinity: the group's members sit on another node.
        let affinity = Request {
            group: Some(Group {
                policy: Policy::Affinity,
                max_per_node: 1,
                members_per_node: [("elsewhere".to_owned(), 2)].into(),
            }),
            ..small()
        };
        let Decision::NoValidHost { message, .. } = decide(&affinity, &[node("a")], &exact())
        else {
            panic!("affinity conflict")
        };
        assert_eq!(message, "1 node: 1 affinity conflict");
    }
}
