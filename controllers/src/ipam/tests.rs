//! Table-driven tests of the IPAM planner.

use super::*;

const NET_UID: &str = "net-uid";

fn network(subnets: &[(&str, &str, &str)], deleting: bool) -> v1::Network {
    v1::Network {
        metadata: Some(v1::ObjectMeta {
            name: "net".into(),
            project: "default".into(),
            uid: NET_UID.into(),
            deletion_timestamp: deleting.then_some(prost_types::Timestamp {
                seconds: 1,
                nanos: 0,
            }),
            ..Default::default()
        }),
        spec: Some(v1::NetworkSpec {
            subnets: subnets
                .iter()
                .map(|(name, cidr, gateway)| v1::Subnet {
                    name: (*name).into(),
                    cidr: (*cidr).into(),
                    gateway: Some((*gateway).into()),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }),
        status: None,
    }
}

fn two_subnets() -> v1::Network {
    network(
        &[
            ("a", "10.0.0.0/24", "10.0.0.1"),
            ("b", "fd00::/64", "fd00::1"),
        ],
        false,
    )
}

fn port() -> v1::Port {
    v1::Port {
        metadata: Some(v1::ObjectMeta {
            name: "p".into(),
            project: "default".into(),
            uid: "port-uid".into(),
            generation: 1,
            resource_version: 7,
            ..Default::default()
        }),
        spec: Some(v1::PortSpec {
            network: "net".into(),
            ..Default::default()
        }),
        status: None,
    }
}

fn with_fixed(mut p: v1::Port, fixed: &[(&str, &str)]) -> v1::Port {
    p.spec.as_mut().unwrap().fixed_ips = fixed
        .iter()
        .map(|(s, ip)| v1::FixedIp {
            subnet: (*s).into(),
            ip_address: (*ip).into(),
        })
        .collect();
    p
}

fn with_mac(mut p: v1::Port, mac: &str) -> v1::Port {
    p.spec.as_mut().unwrap().mac_address = mac.into();
    p
}

fn deleting(mut p: v1::Port) -> v1::Port {
    p.metadata.as_mut().unwrap().deletion_timestamp = Some(prost_types::Timestamp {
        seconds: 1,
        nanos: 0,
    });
    p
}

fn with_conditions(mut p: v1::Port, conditions: Vec<v1::Condition>) -> v1::Port {
    let status = p.status.get_or_insert_with(Default::default);
    status.observed_generation = 1;
    status.conditions = conditions
        .into_iter()
        .map(|mut c| {
            c.observed_generation = 1;
            c
        })
        .collect();
    p
}

fn decided(p: v1::Port, ips: &[(&str, &str)], mac: &str, ready: bool) -> v1::Port {
    let mut p = if ready {
        with_conditions(
            p,
            vec![condition(
                "Ready",
                true,
                reason::ALLOCATED,
                "addresses and MAC allocated",
            )],
        )
    } else {
        p
    };
    let status = p.status.get_or_insert_with(Default::default);
    status.addresses = ips
        .iter()
        .map(|(s, ip)| v1::PortAddress {
            subnet: (*s).into(),
            ip: (*ip).into(),
        })
        .collect();
    status.mac = mac.into();
    status.network_uid = NET_UID.into();
    p
}

fn ip_claim_of(network_uid: &str, subnet: &str, ip: &str) -> v1::IpAddress {
    let ip: IpAddr = ip.parse().unwrap();
    v1::IpAddress {
        metadata: Some(v1::ObjectMeta {
            name: ip_claim_name(network_uid, ip),
            uid: format!("claim-{ip}"),
            ..Default::default()
        }),
        spec: Some(v1::IpAddressSpec {
            network_uid: network_uid.into(),
            subnet: subnet.into(),
            address: ip.to_string(),
        }),
        status: None,
    }
}

fn mac_claim_of(mac: &str) -> v1::MacAddress {
    v1::MacAddress {
        metadata: Some(v1::ObjectMeta {
            name: mac_claim_name(mac),
            uid: format!("claim-{mac}"),
            ..Default::default()
        }),
        spec: Some(v1::MacAddressSpec {
            address: mac.into(),
        }),
        status: None,
    }
}

/// The plan, summarised as people would describe it.
fn describe(plan: &PortPlan) -> String {
    match plan {
        PortPlan::Nothing => "nothing".into(),
        PortPlan::Report(conditions) => format!("report {}", conditions[0].reason),
        PortPlan::Allocate(a) => {
            let mac = match &a.mac {
                MacWant::Held(m) => format!("held {m}"),
                MacWant::Requested(m) => format!("requested {m}"),
                MacWant::Any => "any".into(),
            };
            let ips: Vec<String> = a
                .ips
                .iter()
                .map(|n| match n.want {
                    IpWant::Held(ip) => format!("{}:held {ip}", n.range.name),
                    IpWant::Fixed(ip) => format!("{}:fixed {ip}", n.range.name),
                    IpWant::Any => format!("{}:any", n.range.name),
                })
                .collect();
            format!(
                "allocate on {} mac {mac}; {}",
                a.network_uid,
                ips.join(", ")
            )
        }
        PortPlan::Tidy(t) => {
            let release: Vec<&str> = t.release.iter().map(|c| c.name.as_str()).collect();
            let verify: Vec<&str> = t.verify.iter().map(|o| o.name()).collect();
            format!(
                "tidy release [{}] verify [{}] refresh {}",
                release.join(" "),
                verify.join(" "),
                t.refresh.is_some()
            )
        }
    }
}

struct Case {
    what: &'static str,
    port: v1::Port,
    network: Option<v1::Network>,
    ips: Vec<v1::IpAddress>,
    macs: Vec<v1::MacAddress>,
    expect: &'static str,
}

fn case(
    what: &'static str,
    port: v1::Port,
    network: Option<v1::Network>,
    expect: &'static str,
) -> Case {
    Case {
        what,
        port,
        network,
        ips: vec![],
        macs: vec![],
        expect,
    }
}

#[test]
fn plans() {
    let not_found = condition(
        "Ready",
        false,
        reason::NETWORK_NOT_FOUND,
        "Network net not found in project default or among shared networks",
    );
    let cases = vec![
        case(
            "a deleting port keeps what it has",
            deleting(port()),
            Some(two_subnets()),
            "nothing",
        ),
        case("no network: say so", port(), None, "report NetworkNotFound"),
        case(
            "no network, already said",
            with_conditions(port(), vec![not_found]),
            None,
            "nothing",
        ),
        case(
            "the network is going",
            port(),
            Some(network(&[("a", "10.0.0.0/24", "10.0.0.1")], true)),
            "report NetworkDeleting",
        ),
        case(
            "no fixed IPs: one address per subnet and a MAC",
            port(),
            Some(two_subnets()),
            "allocate on net-uid mac any; a:any, b:any",
        ),
        case(
            "a network without subnets: only a MAC",
            port(),
            Some(network(&[], false)),
            "allocate on net-uid mac any; ",
        ),
        case(
            "a fixed IP in a named subnet",
            with_fixed(port(), &[("a", "10.0.0.9")]),
            Some(two_subnets()),
            "allocate on net-uid mac any; a:fixed 10.0.0.9",
        ),
        case(
            "a fixed IP finds its subnet",
            with_fixed(port(), &[("", "fd00::9")]),
            Some(two_subnets()),
            "allocate on net-uid mac any; b:fixed fd00::9",
        ),
        case(
            "a subnet without an address: any address of it",
            with_fixed(port(), &[("b", "")]),
            Some(two_subnets()),
            "allocate on net-uid mac any; b:any",
        ),
        case(
            "an unknown subnet",
            with_fixed(port(), &[("zz", "")]),
            Some(two_subnets()),
            "report SubnetNotFound",
        ),
        case(
            "an address outside its subnet",
            with_fixed(port(), &[("a", "10.9.0.9")]),
            Some(two_subnets()),
            "report InvalidFixedIp",
        ),
        case(
            "an address in no subnet",
            with_fixed(port(), &[("", "192.168.0.1")]),
            Some(two_subnets()),
            "report InvalidFixedIp",
        ),
        case(
            "the gateway is never handed out",
            with_fixed(port(), &[("a", "10.0.0.1")]),
            Some(two_subnets()),
            "report InvalidFixedIp",
        ),
        case(
            "the broadcast address is never handed out",
            with_fixed(port(), &[("a", "10.0.0.255")]),
            Some(two_subnets()),
            "report InvalidFixedIp",
        ),
        case(
            "a requested MAC",
            with_mac(port(), "FA:16:3E:00:00:01"),
            Some(two_subnets()),
            "allocate on net-uid mac requested fa:16:3e:00:00:01; a:any, b:any",
        ),
        Case {
            what: "claims made before a crash are reused, not claimed again",
            port: port(),
            network: Some(two_subnets()),
            ips: vec![ip_claim_of(NET_UID, "a", "10.0.0.7")],
            macs: vec![mac_claim_of("fa:16:3e:00:00:02")],
            expect: "allocate on net-uid mac held fa:16:3e:00:00:02; a:held 10.0.0.7, b:any",
        },
        Case {
            what: "a held claim of an earlier network of the same name is not reused",
            port: port(),
            network: Some(two_subnets()),
            ips: vec![ip_claim_of("old-uid", "a", "10.0.0.7")],
            macs: vec![],
            expect: "allocate on net-uid mac any; a:any, b:any",
        },
        Case {
            what: "a held fixed address is reused; another held address of the subnet is not taken for it",
            port: with_fixed(port(), &[("a", "10.0.0.9"), ("a", "")]),
            network: Some(two_subnets()),
            ips: vec![
                ip_claim_of(NET_UID, "a", "10.0.0.9"),
                ip_claim_of(NET_UID, "a", "10.0.0.3"),
            ],
            macs: vec![],
            expect: "allocate on net-uid mac any; a:held 10.0.0.9, a:held 10.0.0.3",
        },
        Case {
            what: "a held MAC other than the requested one is not used",
            port: with_mac(port(), "fa:16:3e:00:00:01"),
            network: Some(two_subnets()),
            ips: vec![],
            macs: vec![mac_claim_of("fa:16:3e:00:00:02")],
            expect: "allocate on net-uid mac requested fa:16:3e:00:00:01; a:any, b:any",
        },
        Case {
            what: "decided, claims cached, ready: nothing",
            port: decided(port(), &[("a", "10.0.0.7")], "fa:16:3e:00:00:02", true),
            network: Some(two_subnets()),
            ips: vec![ip_claim_of(NET_UID, "a", "10.0.0.7")],
            macs: vec![mac_claim_of("fa:16:3e:00:00:02")],
            expect: "nothing",
        },
        Case {
            what: "decided: claims beyond the decision are released",
            port: decided(port(), &[("a", "10.0.0.7")], "fa:16:3e:00:00:02", true),
            network: Some(two_subnets()),
            ips: vec![
                ip_claim_of(NET_UID, "a", "10.0.0.7"),
                ip_claim_of(NET_UID, "a", "10.0.0.8"),
            ],
            macs: vec![
                mac_claim_of("fa:16:3e:00:00:02"),
                mac_claim_of("fa:16:3e:00:00:03"),
            ],
            expect: "tidy release [net-uid-10-0-0-8 fa-16-3e-00-00-03] verify [] refresh false",
        },
        Case {
            what: "decided: a recorded claim missing from the cache is verified",
            port: decided(port(), &[("a", "10.0.0.7")], "fa:16:3e:00:00:02", true),
            network: None,
            ips: vec![],
            macs: vec![mac_claim_of("fa:16:3e:00:00:02")],
            expect: "tidy release [] verify [net-uid-10-0-0-7] refresh false",
        },
        Case {
            what: "decided but Ready not recorded: refreshed",
            port: decided(port(), &[("b", "fd00::2")], "fa:16:3e:00:00:02", false),
            network: Some(two_subnets()),
            ips: vec![ip_claim_of(NET_UID, "b", "fd00::2")],
            macs: vec![mac_claim_of("fa:16:3e:00:00:02")],
            expect: "tidy release [] verify [] refresh true",
        },
    ];
    for c in cases {
        let facts = PortFacts {
            port: &c.port,
            network: resolved(c.network.as_ref()),
            ip_claims: c.ips.iter().collect(),
            mac_claims: c.macs.iter().collect(),
            exhausted_condition: false,
        };
        assert_eq!(describe(&plan(&facts)), c.expect, "{}", c.what);
    }
}

/// The Network a case's Port resolves to: the one given, or none of that name.
fn resolved(network: Option<&v1::Network>) -> Result<&v1::Network, Unresolved> {
    network.ok_or_else(|| Unresolved::NotFound {
        kind: Kind::Network,
        name: "net".into(),
        project: "default".into(),
    })
}

#[test]
fn an_ambiguous_network_is_reported_naming_its_candidates() {
    let p = port();
    let candidates = ["a", "b"].map(|project| {
        let mut n = two_subnets();
        let m = n.metadata.get_or_insert_default();
        m.project = project.into();
        m.uid = format!("{project}-uid");
        n.spec.get_or_insert_default().shared = Some(true);
        n
    });
    let facts = PortFacts {
        port: &p,
        network: resolve(&meta(&p).project, "net", candidates.iter()),
        ip_claims: vec![],
        mac_claims: vec![],
        exhausted_condition: false,
    };
    let PortPlan::Report(conditions) = plan(&facts) else {
        panic!("an ambiguous network is reported");
    };
    assert_eq!(conditions[0].reason, reason::NETWORK_AMBIGUOUS);
    assert_eq!(
        conditions[0].message,
        "Network net is ambiguous: shared networks of that name exist in projects a, b"
    );
}

#[test]
fn exhaustion_is_reported_on_ready_and_on_its_own_condition_when_allowed() {
    let p = port();
    let facts = PortFacts {
        port: &p,
        network: resolved(None),
        ip_claims: vec![],
        mac_claims: vec![],
        exhausted_condition: true,
    };
    let conditions = blocked_conditions(&facts, reason::EXHAUSTED, "full".into());
    let summary: Vec<(&str, i32, &str)> = conditions
        .iter()
        .map(|c| (c.r#type.as_str(), c.status, c.reason.as_str()))
        .collect();
    assert_eq!(
        summary,
        vec![
            (
                "Ready",
                v1::condition::Status::False as i32,
                reason::EXHAUSTED
            ),
            (
                EXHAUSTED_CONDITION,
                v1::condition::Status::True as i32,
                reason::EXHAUSTED
            ),
        ]
    );
    let facts = PortFacts {
        exhausted_condition: false,
        ..facts
    };
    assert_eq!(
        blocked_conditions(&facts, reason::EXHAUSTED, "full".into()).len(),
        1,
        "Ready only"
    );
    // Recovered: the exhausted condition, once present, is turned False.
    let p = with_conditions(
        port(),
        vec![condition(
            EXHAUSTED_CONDITION,
            true,
            reason::EXHAUSTED,
            "full",
        )],
    );
    let facts = PortFacts {
        port: &p,
        network: resolved(None),
        ip_claims: vec![],
        mac_claims: vec![],
        exhausted_condition: true,
    };
    let ready = ready_conditions(&facts);
    assert_eq!(ready.len(), 2);
    assert_eq!(ready[1].status, v1::condition::Status::False as i32);
}

#[test]
fn claim_names_are_valid_object_names() {
    assert_eq!(
        ip_claim_name("u", "10.77.0.50".parse().unwrap()),
        "u-10-77-0-50"
    );
    assert_eq!(
        ip_claim_name("u", "fd00::".parse().unwrap()),
        "u-fd00-0000-0000-0000-0000-0000-0000-0000"
    );
    assert_eq!(
        ip_claim_name("u", "::1".parse().unwrap()),
        "u-0000-0000-0000-0000-0000-0000-0000-0001"
    );
    assert_eq!(mac_claim_name("FA:16:3E:00:00:01"), "fa-16-3e-00-00-01");
}
