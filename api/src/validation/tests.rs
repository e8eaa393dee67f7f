//! Tests of what every kind shares (the error type, size, metadata, determinism, no panics
//! on any input) and the helpers the per-area tests use. The per-area rules are tested in
//! their own modules, table-driven, each case asserting its exact messages.

use prost_reflect::{DynamicMessage, Kind as FieldKind, MapKey, MessageDescriptor, Value};

use super::*;
use crate::codec;
use crate::kinds::Kind;

/// Decodes one YAML document (without its `apiVersion`, which is added).
pub(super) fn object(doc: &str) -> Object {
    let mut objects = codec::decode_yaml(&format!("apiVersion: ferro/v1\n{doc}"))
        .unwrap_or_else(|e| panic!("{doc}: {e}"));
    assert_eq!(objects.len(), 1, "{doc}");
    objects.remove(0)
}

/// Decodes and defaults one YAML document.
pub(super) fn defaulted(doc: &str) -> Object {
    let mut object = object(doc);
    apply_defaults(&mut object);
    object
}

/// The violations of a result as users read them, `path: reason`.
pub(super) fn messages(result: Result<(), Invalid>) -> Vec<String> {
    match result {
        Ok(()) => Vec::new(),
        Err(invalid) => invalid
            .violations
            .iter()
            .map(Violation::to_string)
            .collect(),
    }
}

/// The violations of a defaulted document, created.
pub(super) fn create_errors(doc: &str) -> Vec<String> {
    messages(validate_create(&defaulted(doc)))
}

/// The violations of updating one defaulted document to another.
pub(super) fn update_errors(old: &str, new: &str) -> Vec<String> {
    messages(validate_update(&defaulted(new), &defaulted(old)))
}

/// A document of the given kind named `x1` with the given spec (YAML flow style).
pub(super) fn spec_doc(kind: &str, spec: &str) -> String {
    format!("kind: {kind}\nmetadata: {{name: x1}}\nspec: {spec}")
}

/// Checks each `(spec, expected messages)` case of a kind, and reports every mismatch.
pub(super) fn assert_spec_cases(kind: &str, cases: &[(&str, &[&str])]) {
    let failures: Vec<String> = cases
        .iter()
        .filter_map(|(spec, want)| {
            let got = create_errors(&spec_doc(kind, spec));
            (got != *want)
                .then(|| format!("{kind} spec {spec}\n  want: {want:#?}\n  got:  {got:#?}"))
        })
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

/// Checks each `(old spec, new spec, expected messages)` update case of a kind.
pub(super) fn assert_update_cases(kind: &str, cases: &[(&str, &str, &[&str])]) {
    let failures: Vec<String> = cases
        .iter()
        .filter_map(|(old, new, want)| {
            let got = update_errors(&spec_doc(kind, old), &spec_doc(kind, new));
            (got != *want)
                .then(|| format!("{kind} {old} → {new}\n  want: {want:#?}\n  got:  {got:#?}"))
        })
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

#[test]
fn invalid_names_the_object_and_joins_violations() {
    let err = validate_create(&defaulted(
        "kind: Server\nmetadata: {name: web-1}\nspec: {}",
    ))
    .unwrap_err();
    assert_eq!(err.object, "servers/web-1");
    assert_eq!(
        err.to_string(),
        "servers/web-1: spec.flavor: required; spec.image: required (or set `bootVolume` instead)"
    );
    let whole = Violation {
        path: String::new(),
        reason: "too big".into(),
    };
    assert_eq!(whole.to_string(), "too big");
}

#[test]
fn a_valid_object_passes() {
    let doc = "kind: Server\nmetadata: {name: web-1}\nspec: {flavor: m1.tiny, image: debian}";
    assert_eq!(validate_create(&defaulted(doc)), Ok(()));
    let server = defaulted(doc);
    assert_eq!(validate_update(&server, &server), Ok(()));
}

#[test]
fn an_omitted_spec_is_checked_like_an_empty_one() {
    assert_eq!(
        create_errors("kind: KeyPair\nmetadata: {name: k}"),
        ["spec.publicKey: required"]
    );
    assert_eq!(
        create_errors("kind: Flavor\nmetadata: {name: f}"),
        [
            "spec.vcpus: must be at least 1",
            "spec.ramMib: must be at least 64"
        ]
    );
}

#[test]
fn objects_over_the_size_limit_are_refused() {
    let user_data = "x".repeat(MAX_OBJECT_BYTES);
    let doc = format!(
        "kind: Server\nmetadata: {{name: big}}\nspec: {{flavor: m1.tiny, image: i, userData: {user_data}}}"
    );
    let object = defaulted(&doc);
    let size = object.encode_to_vec().len();
    assert!(size > MAX_OBJECT_BYTES);
    assert_eq!(
        messages(validate_create(&object)),
        [
            format!("the object is {size} bytes encoded; at most 262144 are allowed"),
            "spec.userData: 262144 bytes; at most 65536 are allowed".to_owned(),
        ]
    );
}

#[test]
fn metadata_names_follow_the_kind_rule() {
    let cases: &[(&str, &str, &[&str])] = &[
        ("Server", "web-1", &[]),
        ("Server", "", &["metadata.name: required"]),
        (
            "Server",
            "m1.tiny",
            &[
                "metadata.name: `m1.tiny` is not a DNS-1123 label: lower-case letters, digits and '-', starting and ending with a letter or digit",
            ],
        ),
        (
            "Network",
            "Private",
            &[
                "metadata.name: `Private` is not a DNS-1123 label: lower-case letters, digits and '-', starting and ending with a letter or digit",
            ],
        ),
        ("Flavor", "m1.tiny", &[]),
        (
            "Flavor",
            "m1_tiny",
            &[
                "metadata.name: `m1_tiny` is not a DNS-1123 subdomain: lower-case letters, digits, '-' and '.', each dot-separated part starting and ending with a letter or digit",
            ],
        ),
        ("Node", "compute-1.example.org", &[]),
        ("User", "alice.smith", &[]),
        ("Lease", "node-compute-1.example.org", &[]),
        ("Event", "web-1.17f0a3c2", &[]),
        ("Project", "team-a", &[]),
        (
            "Project",
            "team.a",
            &[
                "metadata.name: `team.a` is not a DNS-1123 label: lower-case letters, digits and '-', starting and ending with a letter or digit",
            ],
        ),
    ];
    let failures: Vec<String> = cases
        .iter()
        .filter_map(|(kind, name, want)| {
            let mut object = object(&format!("kind: {kind}\nmetadata: {{name: \"{name}\"}}"));
            apply_defaults(&mut object);
            let got: Vec<String> = messages(validate_create(&object))
                .into_iter()
                .filter(|m| m.starts_with("metadata"))
                .collect();
            (got != *want).then(|| format!("{kind} {name:?}: want {want:?}, got {got:?}"))
        })
        .collect();
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    // Claim names hold a uid and a value, well over 63 characters.
    let claim = format!(
        "{}-fd00-1--5",
        "0".repeat(8) + "-1111-2222-3333-444444444444"
    );
    assert!(claim.len() > 40);
    let long = "a".repeat(200);
    for kind in ["IPAddress", "MACAddress", "SegmentID"] {
        for name in [&claim, &long] {
            let object = object(&format!("kind: {kind}\nmetadata: {{name: {name}}}"));
            let got = messages(validate_create(&object));
            assert!(
                got.iter().all(|m| !m.starts_with("metadata.name")),
                "{kind} {name}: {got:?}"
            );
        }
    }
    let too_long = format!(
        "kind: Server\nmetadata: {{name: {}}}\nspec: {{flavor: f, image: i}}",
        "a".repeat(64)
    );
    assert_eq!(
        create_errors(&too_long),
        [format!(
            "metadata.name: `{}` is 64 characters long; at most 63 are allowed",
            "a".repeat(64)
        )]
    );
}

#[test]
fn project_defaults_for_project_scoped_kinds_and_is_refused_on_cluster_scoped_ones() {
    let server = defaulted("kind: Server\nmetadata: {name: web}\nspec: {flavor: f, image: i}");
    assert_eq!(server.project(), "default");
    let kept = defaulted(
        "kind: Server\nmetadata: {name: web, project: team-a}\nspec: {flavor: f, image: i}",
    );
    assert_eq!(kept.project(), "team-a");
    let flavor = defaulted("kind: Flavor\nmetadata: {name: m1.tiny}\nspec: {vcpus: 1, ramMib: 64}");
    assert_eq!(flavor.project(), "");

    assert_eq!(
        create_errors(
            "kind: Flavor\nmetadata: {name: m1.tiny, project: default}\nspec: {vcpus: 1, ramMib: 64}"
        ),
        ["metadata.project: Flavor is cluster-scoped"]
    );
    assert_eq!(
        create_errors(
            "kind: Server\nmetadata: {name: web, project: Team_A}\nspec: {flavor: f, image: i}"
        ),
        [
            "metadata.project: `Team_A` is not a DNS-1123 label: lower-case letters, digits and '-', starting and ending with a letter or digit"
        ]
    );
    // Without defaulting (a caller that forgot it), the project is required.
    let raw = object("kind: Server\nmetadata: {name: web}\nspec: {flavor: f, image: i}");
    assert_eq!(
        messages(validate_create(&raw)),
        ["metadata.project: required"]
    );
}

/// A Project (no spec rules) with the given extra metadata, for metadata-only checks.
fn metadata_errors(metadata: &str) -> Vec<String> {
    create_errors(&format!("kind: Project\nmetadata: {{name: p, {metadata}}}"))
}

#[test]
fn labels_and_annotations_use_kubernetes_key_rules() {
    let cases: &[(&str, &[&str])] = &[
        ("labels: {app: web, ferro.io/role: db, tier: \"\"}", &[]),
        (
            "labels: {\"a b\": x}",
            &[
                "metadata.labels[\"a b\"]: invalid key: name `a b` is not valid: letters, digits, '-', '_' and '.', starting and ending with a letter or digit",
            ],
        ),
        (
            "labels: {Ferro.IO/x: y}",
            &[
                "metadata.labels[\"Ferro.IO/x\"]: invalid key: prefix `Ferro.IO` is not a DNS-1123 subdomain",
            ],
        ),
        (
            "labels: {app: \"web server\"}",
            &[
                "metadata.labels[\"app\"]: invalid value: `web server` is not valid: letters, digits, '-', '_' and '.', starting and ending with a letter or digit",
            ],
        ),
        (
            // Reported in key order, whatever the map's order.
            "labels: {z/: \"-\", a/b/c: ok}",
            &[
                "metadata.labels[\"a/b/c\"]: invalid key: `a/b/c` has more than one '/'",
                "metadata.labels[\"z/\"]: invalid key: `z/` has an empty name",
                "metadata.labels[\"z/\"]: invalid value: `-` is not valid: letters, digits, '-', '_' and '.', starting and ending with a letter or digit",
            ],
        ),
        (
            "annotations: {ferro.io/reboot-requested-at: \"2026-01-01T00:00:00Z\", note: \"anything at all, even spaces\"}",
            &[],
        ),
        (
            "annotations: {\"/x\": y}",
            &["metadata.annotations[\"/x\"]: invalid key: `/x` has an empty prefix before '/'"],
        ),
    ];
    let failures: Vec<String> = cases
        .iter()
        .filter_map(|(meta, want)| {
            let got = metadata_errors(meta);
            (got != *want).then(|| format!("{meta}\n  want: {want:#?}\n  got:  {got:#?}"))
        })
        .collect();
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    let big = "x".repeat(MAX_ANNOTATIONS_BYTES);
    assert_eq!(
        metadata_errors(&format!("annotations: {{a: {big}}}")),
        ["metadata.annotations: 65537 bytes in total; at most 65536 are allowed"]
    );
}

#[test]
fn finalizers_are_qualified_names_without_repeats() {
    assert_eq!(
        metadata_errors("finalizers: [ferro.io/ports, ferro.io/disk]"),
        Vec::<String>::new()
    );
    assert_eq!(
        metadata_errors("finalizers: [ferro.io/ports, \"ferro.io/my port\", ferro.io/ports]"),
        [
            "metadata.finalizers[1]: name `my port` is not valid: letters, digits, '-', '_' and '.', starting and ending with a letter or digit",
            "metadata.finalizers[2]: `ferro.io/ports` duplicates metadata.finalizers[0]",
        ]
    );
}

#[test]
fn owner_references_name_a_known_kind_name_and_uid() {
    let server = |refs: &str| {
        create_errors(&format!(
            "kind: Port\nmetadata: {{name: p, ownerReferences: {refs}}}\nspec: {{network: n}}"
        ))
    };
    assert_eq!(
        server("[{kind: Server, name: web, uid: u1, controller: true}]"),
        Vec::<String>::new()
    );
    let defaulted_port = defaulted(
        "kind: Port\nmetadata: {name: p, project: team-a, ownerReferences: [{kind: Server, name: web, uid: u1}]}\nspec: {network: n}",
    );
    assert_eq!(
        defaulted_port.metadata().unwrap().owner_references[0].project,
        "team-a",
        "a project-scoped owner defaults to the object's project"
    );
    assert_eq!(
        server("[{}]"),
        [
            "metadata.ownerReferences[0].kind: required",
            "metadata.ownerReferences[0].name: required",
            "metadata.ownerReferences[0].uid: required",
        ]
    );
    assert_eq!(
        server("[{kind: Servers, name: web, uid: u1}]"),
        [
            "metadata.ownerReferences[0].kind: unknown kind `Servers`; known kinds: Server, Flavor, KeyPair, ServerGroup, Node, Network, Port, Router, FloatingIP, SecurityGroup, Volume, VolumeSnapshot, Image, Project, User, RoleBinding, Quota, Event, Lease, IPAddress, MACAddress, SegmentID"
        ]
    );
    assert_eq!(
        server("[{kind: Server, name: Web, uid: u1}]"),
        [
            "metadata.ownerReferences[0].name: `Web` is not a DNS-1123 label: lower-case letters, digits and '-', starting and ending with a letter or digit"
        ]
    );
    assert_eq!(
        server("[{kind: Server, name: web, uid: u1, project: other}]"),
        [
            "metadata.ownerReferences[0].project: must be the object's own project `default`: owners in other projects are not supported"
        ]
    );
    assert_eq!(
        server("[{kind: Node, name: n1, uid: u1, project: default}]"),
        ["metadata.ownerReferences[0].project: Node is cluster-scoped"]
    );
    assert_eq!(
        server(
            "[{kind: Server, name: a, uid: u1, controller: true}, {kind: Server, name: b, uid: u1, controller: true}]"
        ),
        [
            "metadata.ownerReferences[1].controller: only one owner may be the controller; metadata.ownerReferences[0] is",
            "metadata.ownerReferences[1].uid: `u1` duplicates metadata.ownerReferences[0].uid",
        ]
    );
    // A cluster-scoped claim owned by a Port must say which project the Port is in.
    let claim = |refs: &str| {
        create_errors(&format!(
            "kind: MACAddress\nmetadata: {{name: fa-16-3e-00-00-01, ownerReferences: {refs}}}\nspec: {{address: \"fa:16:3e:00:00:01\"}}"
        ))
    };
    assert_eq!(
        claim("[{kind: Port, name: p, uid: u, project: team-a}]"),
        Vec::<String>::new()
    );
    assert_eq!(
        claim("[{kind: Port, name: p, uid: u}]"),
        ["metadata.ownerReferences[0].project: required"]
    );
}

#[test]
fn name_and_project_are_immutable() {
    let old = "kind: Server\nmetadata: {name: web}\nspec: {flavor: f, image: i}";
    assert_eq!(
        update_errors(
            old,
            "kind: Server\nmetadata: {name: web-2, project: other}\nspec: {flavor: f, image: i}"
        ),
        [
            "metadata.name: field is immutable",
            "metadata.project: field is immutable"
        ]
    );
    let flavor = "kind: Flavor\nmetadata: {name: m1.tiny}\nspec: {vcpus: 1, ramMib: 64}";
    assert_eq!(
        messages(validate_update(&defaulted(flavor), &defaulted(old))),
        ["kind: field is immutable"]
    );
}

#[test]
fn no_finalizer_can_be_added_once_deletion_started() {
    let mut old = defaulted(
        "kind: Port\nmetadata: {name: p, finalizers: [ferro.io/ipam]}\nspec: {network: n}",
    );
    let new = defaulted(
        "kind: Port\nmetadata: {name: p, finalizers: [ferro.io/ipam, ferro.io/x]}\nspec: {network: n}",
    );
    assert_eq!(
        validate_update(&new, &old),
        Ok(()),
        "allowed before deletion"
    );
    old.metadata_mut().deletion_timestamp = Some(prost_types::Timestamp {
        seconds: 1,
        nanos: 0,
    });
    assert_eq!(
        messages(validate_update(&new, &old)),
        ["metadata.finalizers[1]: cannot add `ferro.io/x` while the object is being deleted"]
    );
    let fewer = defaulted("kind: Port\nmetadata: {name: p}\nspec: {network: n}");
    assert_eq!(
        validate_update(&fewer, &old),
        Ok(()),
        "removing is how deletion ends"
    );
}

#[test]
fn zero_enums_default_like_unset_ones() {
    let mut server = defaulted("kind: Server\nmetadata: {name: web}\nspec: {flavor: f, image: i}");
    let Object::Server(s) = &mut server else {
        unreachable!()
    };
    let spec = s.spec.as_mut().unwrap();
    spec.power_state = Some(0);
    spec.run_strategy = Some(0);
    apply_defaults(&mut server);
    let Object::Server(s) = &server else {
        unreachable!()
    };
    let spec = s.spec.as_ref().unwrap();
    assert_eq!(
        spec.power_state,
        Some(crate::v1::server_spec::PowerState::Running as i32)
    );
    assert_eq!(
        spec.run_strategy,
        Some(crate::v1::server_spec::RunStrategy::Always as i32)
    );
}

#[test]
fn enum_numbers_outside_the_schema_are_refused() {
    // Only reachable through the protobuf API: YAML names values, and the codec checks them.
    let mut server = defaulted("kind: Server\nmetadata: {name: web}\nspec: {flavor: f, image: i}");
    let Object::Server(s) = &mut server else {
        unreachable!()
    };
    let spec = s.spec.as_mut().unwrap();
    spec.power_state = Some(7);
    spec.run_strategy = Some(-1);
    assert_eq!(
        messages(validate_create(&server)),
        [
            "spec.powerState: 7 is not one of Running, Stopped",
            "spec.runStrategy: -1 is not one of Always, RerunOnFailure, Manual",
        ]
    );
    let mut group = defaulted("kind: ServerGroup\nmetadata: {name: g}\nspec: {}");
    let Object::ServerGroup(g) = &mut group else {
        unreachable!()
    };
    g.spec.as_mut().unwrap().policy = 9;
    assert_eq!(
        messages(validate_create(&group)),
        ["spec.policy: 9 is not one of Affinity, AntiAffinity, SoftAffinity, SoftAntiAffinity"]
    );
}

#[test]
fn every_enum_a_rule_names_exists_in_the_schema() {
    for name in [
        "ServerSpec.PowerState",
        "ServerSpec.RunStrategy",
        "ServerGroupSpec.Policy",
        "SecurityGroupRule.Direction",
        "SecurityGroupRule.Ethertype",
        "SecurityGroupRule.Protocol",
        "ImageSpec.DiskFormat",
        "ImageSpec.ContainerFormat",
        "ImageSpec.Visibility",
        "RoleBindingSpec.Role",
        "EventSpec.Type",
    ] {
        assert!(!enum_values(name).is_empty(), "{name}");
    }
}

// ---------------------------------------------------------------------------------------
// Arbitrary objects: no panics, defaulting idempotent, validation deterministic.

/// A tiny deterministic generator (xorshift64*), so failures reproduce.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn pick<T: Clone>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())].clone()
    }
}

fn nasty_strings() -> Vec<String> {
    let mut strings: Vec<String> = [
        "",
        "a",
        "web-1",
        "m1.tiny",
        "default",
        "Ingress",
        "-",
        ".",
        "a/b",
        "a/b/c",
        "/",
        "é",
        "\u{0}",
        "\n",
        " ",
        "ferro.io/x",
        "10.0.0.1",
        "10.0.0.0/24",
        "10.0.0.1/24",
        "10.0.0.255",
        "0.0.0.0/0",
        "255.255.255.255/32",
        "10.0.0.0/31",
        "fd00::",
        "fd00::1",
        "fd00::/64",
        "::/0",
        "::1/128",
        "fd00::/127",
        "fa:16:3e:00:00:01",
        "FF:FF:FF:FF:FF:FF",
        "01:00:5e:00:00:01",
        "ssh-ed25519",
        "ssh-ed25519 AAAA",
        "ssh-rsa AAAAB3NzaC1yc2E=",
        "ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTY=",
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJ65XlM9xwTrwBb2VYfUbi9VU/mF0doEHYlbtQsEKTh5 c",
        "file:///x",
        "file://",
        "http://",
        "https://h/",
        "sha256:",
        "compute:",
        "network:dhcp",
        "\u{202e}rtl",
        "𝕏",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    strings.push("a".repeat(64));
    strings.push("a.".repeat(200));
    strings.push("é".repeat(100));
    strings
}

fn arbitrary_message(
    desc: &MessageDescriptor,
    rng: &mut Rng,
    strings: &[String],
    depth: usize,
) -> DynamicMessage {
    let mut message = DynamicMessage::new(desc.clone());
    for field in desc.fields() {
        if rng.below(3) == 0 {
            continue;
        }
        let value = if field.is_map() {
            let FieldKind::Message(entry) = field.kind() else {
                unreachable!()
            };
            let value_kind = entry.map_entry_value_field().kind();
            let map = (0..rng.below(3))
                .map(|_| {
                    let key = MapKey::String(rng.pick(strings));
                    (key, arbitrary_value(&value_kind, rng, strings, depth))
                })
                .collect();
            Value::Map(map)
        } else if field.is_list() {
            Value::List(
                (0..rng.below(4))
                    .map(|_| arbitrary_value(&field.kind(), rng, strings, depth))
                    .collect(),
            )
        } else {
            arbitrary_value(&field.kind(), rng, strings, depth)
        };
        message.set_field(&field, value);
    }
    message
}

fn arbitrary_value(kind: &FieldKind, rng: &mut Rng, strings: &[String], depth: usize) -> Value {
    let u64s = [
        0,
        1,
        5,
        63,
        64,
        255,
        256,
        576,
        9001,
        65535,
        65536,
        16_777_215,
        16_777_216,
        u64::MAX,
    ];
    let i64s = [0, 1, -1, i64::MIN, i64::MAX];
    match kind {
        FieldKind::Bool => Value::Bool(rng.below(2) == 1),
        FieldKind::String => Value::String(rng.pick(strings)),
        FieldKind::Uint32 | FieldKind::Fixed32 => Value::U32(rng.pick(&u64s) as u32),
        FieldKind::Uint64 | FieldKind::Fixed64 => Value::U64(rng.pick(&u64s)),
        FieldKind::Int32 | FieldKind::Sint32 | FieldKind::Sfixed32 => {
            Value::I32(rng.pick(&i64s) as i32)
        }
        FieldKind::Int64 | FieldKind::Sint64 | FieldKind::Sfixed64 => Value::I64(rng.pick(&i64s)),
        FieldKind::Float => Value::F32(0.5),
        FieldKind::Double => Value::F64(0.5),
        FieldKind::Bytes => Value::Bytes(Default::default()),
        FieldKind::Enum(e) => {
            let max = e.values().map(|v| v.number()).max().unwrap_or(0);
            Value::EnumNumber(rng.pick(&[0, 1, 2, max, max + 1, -1]))
        }
        FieldKind::Message(d) if depth > 5 => Value::Message(DynamicMessage::new(d.clone())),
        FieldKind::Message(d) => Value::Message(arbitrary_message(d, rng, strings, depth + 1)),
    }
}

#[test]
fn arbitrary_objects_never_panic_and_default_idempotently() {
    let strings = nasty_strings();
    let mut rng = Rng(0x5eed_f00d_dead_beef);
    for kind in Kind::ALL {
        let mut previous: Option<Object> = None;
        for round in 0..150 {
            let message = arbitrary_message(&kind.descriptor(), &mut rng, &strings, 0);
            let mut object = Object::from_dynamic(*kind, &message).expect("converts");
            apply_defaults(&mut object);
            let once = object.clone();
            apply_defaults(&mut object);
            assert_eq!(
                object, once,
                "{kind} round {round}: defaulting twice differs"
            );
            let first = validate_create(&object);
            assert_eq!(first, validate_create(&object), "{kind} round {round}");
            if let Err(invalid) = &first {
                assert!(!invalid.violations.is_empty());
                assert!(invalid.violations.iter().all(|v| !v.reason.is_empty()));
            }
            if let Some(old) = &previous {
                let _ = validate_update(&object, old);
            }
            previous = Some(object);
        }
    }
}

#[test]
fn a_key_pair_gets_its_fingerprint_at_admission_and_nothing_else_does() {
    let mut key_pair = codec::decode_yaml(
        "apiVersion: ferro/v1\nkind: KeyPair\nmetadata: {name: k, project: default}\nspec: {publicKey: ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIMYuernJDQTgP8BeohxMCEJLFLSvWUaWkkmdvqkS+rOH demo@ferro}\n",
    )
    .unwrap()
    .remove(0);
    observe_at_admission(&mut key_pair);
    let Object::KeyPair(k) = &key_pair else {
        panic!()
    };
    assert_eq!(
        k.status.as_ref().unwrap().fingerprint,
        "SHA256:5O6Qi5+V5c2mGnEsddvAotjZ57lAvIiGweU+modV2R0"
    );
    let mut flavor = codec::decode_yaml(
        "apiVersion: ferro/v1\nkind: Flavor\nmetadata: {name: f}\nspec: {vcpus: 1, ramMib: 512, diskGib: 1}\n",
    )
    .unwrap()
    .remove(0);
    let before = flavor.clone();
    observe_at_admission(&mut flavor);
    assert_eq!(flavor, before);
}
