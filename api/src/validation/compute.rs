//! Compute kinds: Server, Flavor, KeyPair, ServerGroup, Node.

use super::syntax::{self, shown};
use super::{
    FieldPath, MAX_USER_DATA_BYTES, Violations, default_enum, optional_enum, required_enum, ssh,
};
use crate::v1::server_group_spec::Policy;
use crate::v1::server_spec::{PowerState, RunStrategy};
use crate::v1::{FlavorSpec, KeyPairSpec, NodeSpec, ServerGroupSpec, ServerSpec};

/// The least memory a Flavor may give, in MiB.
const FLAVOR_MIN_RAM_MIB: u64 = 64;

/// Running, restarted always, hostname = the server's name (when that is valid; an
/// invalid name is reported once, on `metadata.name`).
pub(super) fn default_server(spec: &mut ServerSpec, name: &str) {
    default_enum(&mut spec.power_state, PowerState::Running as i32);
    default_enum(&mut spec.run_strategy, RunStrategy::Always as i32);
    if spec.hostname.is_none() && syntax::dns_label(name).is_ok() {
        spec.hostname = Some(name.to_owned());
    }
}

pub(super) fn check_server(spec: &ServerSpec, out: &mut Violations) {
    let path = FieldPath::spec();

    let flavor = path.field("flavor");
    if out.required(&flavor, &spec.flavor) {
        out.check(&flavor, syntax::dns_subdomain(&spec.flavor));
    }

    let (image, boot_volume) = (path.field("image"), path.field("bootVolume"));
    match (spec.image.is_empty(), spec.boot_volume.is_empty()) {
        (true, true) => out.add(&image, "required (or set `bootVolume` instead)"),
        (false, false) => out.add(&boot_volume, "cannot be set together with `image`"),
        _ => {}
    }
    out.reference(&image, &spec.image);
    out.reference(&boot_volume, &spec.boot_volume);

    let networks = path.field("networks");
    for (i, nic) in spec.networks.iter().enumerate() {
        let item = networks.index(i);
        match (nic.network.is_empty(), nic.port.is_empty()) {
            (true, true) => out.add(&item.field("network"), "required (or set `port` instead)"),
            (false, false) => out.add(&item.field("port"), "cannot be set together with `network`"),
            _ => {}
        }
        out.reference(&item.field("network"), &nic.network);
        if !nic.fixed_ip.is_empty() {
            let fixed_ip = item.field("fixedIp");
            if nic.network.is_empty() {
                out.add(&fixed_ip, "only allowed with `network`");
            }
            out.check(&fixed_ip, syntax::ip(&nic.fixed_ip));
        }
        out.reference(&item.field("port"), &nic.port);
    }
    out.unique(
        spec.networks
            .iter()
            .enumerate()
            .filter(|(_, n)| !n.port.is_empty())
            .map(|(i, n)| (networks.index(i).field("port"), &n.port, shown(&n.port))),
    );
    out.unique(
        spec.networks
            .iter()
            .enumerate()
            .filter(|(_, n)| !n.network.is_empty() && !n.fixed_ip.is_empty())
            .map(|(i, n)| {
                let key = (&n.network, &n.fixed_ip);
                (networks.index(i).field("fixedIp"), key, shown(&n.fixed_ip))
            }),
    );

    let groups = path.field("securityGroups");
    for (i, group) in spec.security_groups.iter().enumerate() {
        out.required_reference(&groups.index(i), group);
    }
    out.unique(
        spec.security_groups
            .iter()
            .enumerate()
            .map(|(i, g)| (groups.index(i), g, shown(g))),
    );

    out.reference(&path.field("keyPair"), &spec.key_pair);

    if spec.user_data.len() > MAX_USER_DATA_BYTES {
        out.add(
            &path.field("userData"),
            format!(
                "{} bytes; at most {MAX_USER_DATA_BYTES} are allowed",
                spec.user_data.len()
            ),
        );
    }

    out.check(
        &path.field("availabilityZone"),
        syntax::label_value(&spec.availability_zone),
    );
    out.reference(&path.field("serverGroup"), &spec.server_group);

    let volumes = path.field("volumes");
    for (i, volume) in spec.volumes.iter().enumerate() {
        let item = volumes.index(i);
        out.required_reference(&item.field("volume"), &volume.volume);
        if !volume.device.is_empty() {
            out.check(&item.field("device"), device_name(&volume.device));
        }
    }
    out.unique(
        spec.volumes
            .iter()
            .enumerate()
            .filter(|(_, v)| !v.volume.is_empty())
            .map(|(i, v)| {
                (
                    volumes.index(i).field("volume"),
                    &v.volume,
                    shown(&v.volume),
                )
            }),
    );
    out.unique(
        spec.volumes
            .iter()
            .enumerate()
            .filter(|(_, v)| !v.device.is_empty())
            .map(|(i, v)| {
                (
                    volumes.index(i).field("device"),
                    &v.device,
                    shown(&v.device),
                )
            }),
    );

    optional_enum(
        out,
        &path.field("powerState"),
        spec.power_state,
        "ServerSpec.PowerState",
    );
    optional_enum(
        out,
        &path.field("runStrategy"),
        spec.run_strategy,
        "ServerSpec.RunStrategy",
    );
    if let Some(hostname) = &spec.hostname {
        let hostname_path = path.field("hostname");
        if hostname.is_empty() {
            out.add(
                &hostname_path,
                "must not be empty (omit it to use the server's name)",
            );
        } else {
            out.check(&hostname_path, syntax::dns_label(hostname));
        }
    }
}

/// A device name hint as the guest sees it: `vdb`, `sdc`.
fn device_name(device: &str) -> Result<(), String> {
    let b = device.as_bytes();
    let valid = (2..=8).contains(&b.len())
        && b[0].is_ascii_lowercase()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    if valid {
        Ok(())
    } else {
        Err(format!(
            "{} is not a device name like vdb (no /dev/ prefix)",
            shown(device)
        ))
    }
}

pub(super) fn check_server_update(new: &ServerSpec, old: &ServerSpec, out: &mut Violations) {
    let path = FieldPath::spec();
    out.immutable(&path.field("image"), &new.image, &old.image);
    out.immutable(
        &path.field("bootVolume"),
        &new.boot_volume,
        &old.boot_volume,
    );
    out.immutable(&path.field("userData"), &new.user_data, &old.user_data);
    out.immutable(
        &path.field("serverGroup"),
        &new.server_group,
        &old.server_group,
    );
}

pub(super) fn check_flavor(spec: &FlavorSpec, out: &mut Violations) {
    let path = FieldPath::spec();
    if spec.vcpus < 1 {
        out.add(&path.field("vcpus"), "must be at least 1");
    }
    if spec.ram_mib < FLAVOR_MIN_RAM_MIB {
        out.add(
            &path.field("ramMib"),
            format!("must be at least {FLAVOR_MIN_RAM_MIB}"),
        );
    }
    super::meta::check_label_map(&spec.extra_specs, &path.field("extraSpecs"), out);
}

pub(super) fn check_key_pair(spec: &KeyPairSpec, out: &mut Violations) {
    let path = FieldPath::spec().field("publicKey");
    if out.required(&path, &spec.public_key) {
        out.check(&path, ssh::parse_public_key(&spec.public_key));
    }
}

pub(super) fn check_key_pair_update(new: &KeyPairSpec, old: &KeyPairSpec, out: &mut Violations) {
    out.immutable(
        &FieldPath::spec().field("publicKey"),
        &new.public_key,
        &old.public_key,
    );
}

/// An AntiAffinity group holds one member per node unless told otherwise.
pub(super) fn default_server_group(spec: &mut ServerGroupSpec) {
    if spec.policy == Policy::AntiAffinity as i32 && spec.max_per_node.is_none() {
        spec.max_per_node = Some(1);
    }
}

pub(super) fn check_server_group(spec: &ServerGroupSpec, out: &mut Violations) {
    let path = FieldPath::spec();
    required_enum(
        out,
        &path.field("policy"),
        spec.policy,
        "ServerGroupSpec.Policy",
    );
    if let Some(max) = spec.max_per_node {
        let max_path = path.field("maxPerNode");
        if spec.policy != Policy::AntiAffinity as i32 {
            out.add(&max_path, "only allowed with policy AntiAffinity");
        } else if max < 1 {
            out.add(&max_path, "must be at least 1");
        }
    }
}

pub(super) fn check_server_group_update(
    new: &ServerGroupSpec,
    old: &ServerGroupSpec,
    out: &mut Violations,
) {
    out.immutable(&FieldPath::spec().field("policy"), &new.policy, &old.policy);
}

pub(super) fn check_node(spec: &NodeSpec, out: &mut Violations) {
    super::meta::check_label_map(&spec.labels, &FieldPath::spec().field("labels"), out);
}

#[cfg(test)]
mod tests {
    use crate::kinds::Object;
    use crate::v1::server_spec::{PowerState, RunStrategy};
    use crate::validation::tests::{
        assert_spec_cases, assert_update_cases, create_errors, defaulted, spec_doc,
    };

    const LABEL_RULE: &str = "is not a DNS-1123 label: lower-case letters, digits and '-', starting and ending with a letter or digit";

    #[test]
    fn server_defaults() {
        let Object::Server(server) = defaulted(&spec_doc("Server", "{flavor: f, image: i}")) else {
            unreachable!()
        };
        let spec = server.spec.unwrap();
        assert_eq!(spec.power_state, Some(PowerState::Running as i32));
        assert_eq!(spec.run_strategy, Some(RunStrategy::Always as i32));
        assert_eq!(spec.hostname.as_deref(), Some("x1"));

        let explicit =
            "{flavor: f, image: i, powerState: Stopped, runStrategy: Manual, hostname: h}";
        let Object::Server(server) = defaulted(&spec_doc("Server", explicit)) else {
            unreachable!()
        };
        let spec = server.spec.unwrap();
        assert_eq!(spec.power_state, Some(PowerState::Stopped as i32));
        assert_eq!(spec.run_strategy, Some(RunStrategy::Manual as i32));
        assert_eq!(spec.hostname.as_deref(), Some("h"));
    }

    #[test]
    fn server_rules() {
        let bad_image = format!("spec.image: `Debian_12` {LABEL_RULE}");
        let bad_group = format!("spec.securityGroups[2]: `Web` {LABEL_RULE}");
        let bad_key = format!("spec.keyPair: `my key` {LABEL_RULE}");
        let bad_server_group = format!("spec.serverGroup: `G` {LABEL_RULE}");
        let bad_network = format!("spec.networks[0].network: `Private` {LABEL_RULE}");
        let bad_hostname = format!("spec.hostname: `web.example` {LABEL_RULE}");
        assert_spec_cases(
            "Server",
            &[
                ("{flavor: m1.tiny, image: debian}", &[]),
                ("{flavor: m1.tiny, bootVolume: root}", &[]),
                ("{image: debian}", &["spec.flavor: required"]),
                (
                    "{flavor: M1.tiny, image: debian}",
                    &[
                        "spec.flavor: `M1.tiny` is not a DNS-1123 subdomain: lower-case letters, digits, '-' and '.', each dot-separated part starting and ending with a letter or digit",
                    ],
                ),
                (
                    "{flavor: m1.tiny}",
                    &["spec.image: required (or set `bootVolume` instead)"],
                ),
                (
                    "{flavor: m1.tiny, image: debian, bootVolume: root}",
                    &["spec.bootVolume: cannot be set together with `image`"],
                ),
                ("{flavor: m1.tiny, image: Debian_12}", &[&bad_image]),
                (
                    "{flavor: f, image: i, networks: [{network: private, fixedIp: 10.0.1.10}, {port: p1}, {network: private}, {network: fd, fixedIp: \"fd00::5\"}]}",
                    &[],
                ),
                (
                    "{flavor: f, image: i, networks: [{}]}",
                    &["spec.networks[0].network: required (or set `port` instead)"],
                ),
                (
                    "{flavor: f, image: i, networks: [{network: n, port: p}]}",
                    &["spec.networks[0].port: cannot be set together with `network`"],
                ),
                (
                    "{flavor: f, image: i, networks: [{port: p, fixedIp: 10.0.0.5}]}",
                    &["spec.networks[0].fixedIp: only allowed with `network`"],
                ),
                (
                    "{flavor: f, image: i, networks: [{network: n, fixedIp: 10.0.0.500}]}",
                    &["spec.networks[0].fixedIp: `10.0.0.500` is not an IP address"],
                ),
                (
                    "{flavor: f, image: i, networks: [{network: Private}]}",
                    &[&bad_network],
                ),
                (
                    "{flavor: f, image: i, networks: [{port: p}, {network: n}, {port: p}]}",
                    &["spec.networks[2].port: `p` duplicates spec.networks[0].port"],
                ),
                (
                    "{flavor: f, image: i, networks: [{network: n, fixedIp: 10.0.0.5}, {network: n, fixedIp: 10.0.0.5}]}",
                    &["spec.networks[1].fixedIp: `10.0.0.5` duplicates spec.networks[0].fixedIp"],
                ),
                (
                    "{flavor: f, image: i, securityGroups: [web, web, Web, \"\"]}",
                    &[
                        &bad_group,
                        "spec.securityGroups[3]: required",
                        "spec.securityGroups[1]: `web` duplicates spec.securityGroups[0]",
                    ],
                ),
                ("{flavor: f, image: i, keyPair: my key}", &[&bad_key]),
                (
                    "{flavor: f, image: i, availabilityZone: zone a}",
                    &[
                        "spec.availabilityZone: `zone a` is not valid: letters, digits, '-', '_' and '.', starting and ending with a letter or digit",
                    ],
                ),
                (
                    "{flavor: f, image: i, serverGroup: G}",
                    &[&bad_server_group],
                ),
                (
                    "{flavor: f, image: i, volumes: [{volume: data, device: vdb}, {volume: logs}]}",
                    &[],
                ),
                (
                    "{flavor: f, image: i, volumes: [{device: vdb}]}",
                    &["spec.volumes[0].volume: required"],
                ),
                (
                    "{flavor: f, image: i, volumes: [{volume: a, device: /dev/vdb}]}",
                    &[
                        "spec.volumes[0].device: `/dev/vdb` is not a device name like vdb (no /dev/ prefix)",
                    ],
                ),
                (
                    "{flavor: f, image: i, volumes: [{volume: a, device: vdb}, {volume: a, device: vdb}]}",
                    &[
                        "spec.volumes[1].volume: `a` duplicates spec.volumes[0].volume",
                        "spec.volumes[1].device: `vdb` duplicates spec.volumes[0].device",
                    ],
                ),
                (
                    "{flavor: f, image: i, hostname: \"\"}",
                    &["spec.hostname: must not be empty (omit it to use the server's name)"],
                ),
                (
                    "{flavor: f, image: i, hostname: web.example}",
                    &[&bad_hostname],
                ),
                (
                    // Every violation is reported, in schema order.
                    "{image: A, bootVolume: b, networks: [{}], keyPair: K}",
                    &[
                        "spec.flavor: required",
                        "spec.bootVolume: cannot be set together with `image`",
                        &format!("spec.image: `A` {LABEL_RULE}"),
                        "spec.networks[0].network: required (or set `port` instead)",
                        &format!("spec.keyPair: `K` {LABEL_RULE}"),
                    ],
                ),
            ],
        );
    }

    #[test]
    fn server_user_data_is_capped_at_64_kib() {
        let at_limit = "x".repeat(64 * 1024);
        let doc = spec_doc(
            "Server",
            &format!("{{flavor: f, image: i, userData: {at_limit}}}"),
        );
        assert_eq!(create_errors(&doc), Vec::<String>::new());
        let over = format!("{at_limit}y");
        let doc = spec_doc(
            "Server",
            &format!("{{flavor: f, image: i, userData: {over}}}"),
        );
        assert_eq!(
            create_errors(&doc),
            ["spec.userData: 65537 bytes; at most 65536 are allowed"]
        );
    }

    #[test]
    fn server_immutable_fields() {
        assert_update_cases(
            "Server",
            &[
                (
                    "{flavor: f, image: i, powerState: Running}",
                    "{flavor: g, image: i, powerState: Stopped, networks: [{network: n}]}",
                    &[],
                ),
                (
                    "{flavor: f, image: i}",
                    "{flavor: f, image: j}",
                    &["spec.image: field is immutable"],
                ),
                (
                    "{flavor: f, bootVolume: a}",
                    "{flavor: f, bootVolume: b}",
                    &["spec.bootVolume: field is immutable"],
                ),
                (
                    "{flavor: f, image: i}",
                    "{flavor: f, bootVolume: b}",
                    &[
                        "spec.image: field is immutable",
                        "spec.bootVolume: field is immutable",
                    ],
                ),
                (
                    "{flavor: f, image: i, userData: a}",
                    "{flavor: f, image: i, userData: b}",
                    &["spec.userData: field is immutable"],
                ),
                (
                    "{flavor: f, image: i}",
                    "{flavor: f, image: i, serverGroup: g}",
                    &["spec.serverGroup: field is immutable"],
                ),
                (
                    // Immutability does not hide other violations.
                    "{flavor: f, image: i}",
                    "{image: j}",
                    &["spec.flavor: required", "spec.image: field is immutable"],
                ),
            ],
        );
    }

    #[test]
    fn flavor_rules() {
        assert_spec_cases(
            "Flavor",
            &[
                ("{vcpus: 1, ramMib: 64}", &[]),
                (
                    "{vcpus: 2, ramMib: 2048, diskGib: 10, extraSpecs: {aggregate/ssd: \"true\", hw.cpu_policy: dedicated}}",
                    &[],
                ),
                (
                    "{vcpus: 0, ramMib: 64}",
                    &["spec.vcpus: must be at least 1"],
                ),
                (
                    "{vcpus: 1, ramMib: 63}",
                    &["spec.ramMib: must be at least 64"],
                ),
                (
                    "{vcpus: 1, ramMib: 64, extraSpecs: {\"bad key\": \"x\", ok: \"a b\"}}",
                    &[
                        "spec.extraSpecs[\"bad key\"]: invalid key: name `bad key` is not valid: letters, digits, '-', '_' and '.', starting and ending with a letter or digit",
                        "spec.extraSpecs[\"ok\"]: invalid value: `a b` is not valid: letters, digits, '-', '_' and '.', starting and ending with a letter or digit",
                    ],
                ),
            ],
        );
    }

    const ED25519: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJ65XlM9xwTrwBb2VYfUbi9VU/mF0doEHYlbtQsEKTh5 ferro-example";

    #[test]
    fn key_pair_rules() {
        let valid = format!("{{publicKey: \"{ED25519}\"}}");
        let other = ED25519.replace("ferro-example", "renamed");
        assert_spec_cases(
            "KeyPair",
            &[
                (&valid, &[]),
                ("{}", &["spec.publicKey: required"]),
                (
                    "{publicKey: \"ssh-dss AAAAB3NzaC1kc3M= x\"}",
                    &[
                        "spec.publicKey: `ssh-dss` is not a supported key type: ssh-ed25519, ssh-rsa, ecdsa-sha2-nistp256, ecdsa-sha2-nistp384, ecdsa-sha2-nistp521",
                    ],
                ),
                (
                    "{publicKey: \"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5\"}",
                    &["spec.publicKey: the key data is not a valid ssh-ed25519 key"],
                ),
                (
                    "{publicKey: \"AAAAC3NzaC1lZDI1NTE5AAAAIJ65XlM9xwTrwBb2VYfUbi9VU/mF0doEHYlbtQsEKTh5\"}",
                    &[
                        "spec.publicKey: expected `<type> <base64 key> [comment]`, as in a .pub file",
                    ],
                ),
            ],
        );
        assert_update_cases(
            "KeyPair",
            &[
                (&valid, &valid, &[]),
                (
                    &valid,
                    &format!("{{publicKey: \"{other}\"}}"),
                    &["spec.publicKey: field is immutable"],
                ),
            ],
        );
    }

    #[test]
    fn server_group_rules_and_defaults() {
        let Object::ServerGroup(group) =
            defaulted(&spec_doc("ServerGroup", "{policy: AntiAffinity}"))
        else {
            unreachable!()
        };
        assert_eq!(group.spec.unwrap().max_per_node, Some(1));
        let Object::ServerGroup(group) = defaulted(&spec_doc("ServerGroup", "{policy: Affinity}"))
        else {
            unreachable!()
        };
        assert_eq!(
            group.spec.unwrap().max_per_node,
            None,
            "only AntiAffinity has one"
        );

        assert_spec_cases(
            "ServerGroup",
            &[
                ("{policy: AntiAffinity, maxPerNode: 2}", &[]),
                ("{policy: SoftAntiAffinity}", &[]),
                (
                    "{}",
                    &[
                        "spec.policy: required: one of Affinity, AntiAffinity, SoftAffinity, SoftAntiAffinity",
                    ],
                ),
                (
                    "{policy: Affinity, maxPerNode: 2}",
                    &["spec.maxPerNode: only allowed with policy AntiAffinity"],
                ),
                (
                    "{policy: AntiAffinity, maxPerNode: 0}",
                    &["spec.maxPerNode: must be at least 1"],
                ),
            ],
        );
        assert_update_cases(
            "ServerGroup",
            &[
                (
                    "{policy: AntiAffinity}",
                    "{policy: AntiAffinity, maxPerNode: 3}",
                    &[],
                ),
                (
                    "{policy: Affinity}",
                    "{policy: AntiAffinity}",
                    &["spec.policy: field is immutable"],
                ),
            ],
        );
    }

    #[test]
    fn node_rules() {
        assert_spec_cases(
            "Node",
            &[
                (
                    "{unschedulable: true, labels: {zone: az-1, aggregate/ssd: \"true\"}}",
                    &[],
                ),
                (
                    "{labels: {\"-zone\": az1}}",
                    &[
                        "spec.labels[\"-zone\"]: invalid key: name `-zone` is not valid: letters, digits, '-', '_' and '.', starting and ending with a letter or digit",
                    ],
                ),
            ],
        );
    }
}
