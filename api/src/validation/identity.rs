//! Identity kinds: Project, User, RoleBinding, Quota.

use super::{FieldPath, Violations, meta, required_enum};
use crate::kinds::Kind;
use crate::v1::{QuotaSpec, RoleBindingSpec, UserSpec};

/// Users may call the API unless disabled.
pub(super) fn default_user(spec: &mut UserSpec) {
    spec.enabled.get_or_insert(true);
}

pub(super) fn check_role_binding(spec: &RoleBindingSpec, out: &mut Violations) {
    let path = FieldPath::spec();
    let user = path.field("user");
    if out.required(&user, &spec.user) {
        out.check(&user, meta::name(Kind::User, &spec.user));
    }
    required_enum(out, &path.field("role"), spec.role, "RoleBindingSpec.Role");
}

pub(super) fn check_quota(spec: &QuotaSpec, out: &mut Violations) {
    let Some(hard) = &spec.hard else { return };
    let path = FieldPath::spec().field("hard");
    let limits = [
        ("servers", hard.servers),
        ("vcpus", hard.vcpus),
        ("ramMib", hard.ram_mib),
        ("volumes", hard.volumes),
        ("volumeGib", hard.volume_gib),
        ("networks", hard.networks),
        ("ports", hard.ports),
        ("routers", hard.routers),
        ("floatingIps", hard.floating_ips),
        ("securityGroups", hard.security_groups),
    ];
    for (field, limit) in limits {
        if limit.is_some_and(|l| l < 0) {
            out.add(&path.field(field), "must not be negative");
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::kinds::Object;
    use crate::validation::tests::{assert_spec_cases, defaulted, spec_doc};

    #[test]
    fn user_defaults_to_enabled() {
        let Object::User(user) = defaulted(&spec_doc("User", "{displayName: Alice}")) else {
            unreachable!()
        };
        assert_eq!(user.spec.unwrap().enabled, Some(true));
        let Object::User(user) = defaulted(&spec_doc("User", "{enabled: false}")) else {
            unreachable!()
        };
        assert_eq!(user.spec.unwrap().enabled, Some(false));
    }

    #[test]
    fn project_and_user_take_any_spec() {
        assert_spec_cases("Project", &[("{description: Team A}", &[]), ("{}", &[])]);
        assert_spec_cases("User", &[("{displayName: \"Alice Smith\"}", &[])]);
    }

    #[test]
    fn role_binding_rules() {
        assert_spec_cases(
            "RoleBinding",
            &[
                ("{user: alice, role: Member}", &[]),
                ("{user: alice.smith, role: Admin}", &[]),
                (
                    "{}",
                    &[
                        "spec.user: required",
                        "spec.role: required: one of Reader, Member, Admin",
                    ],
                ),
                (
                    "{user: Alice, role: Reader}",
                    &[
                        "spec.user: `Alice` is not a DNS-1123 subdomain: lower-case letters, digits, '-' and '.', each dot-separated part starting and ending with a letter or digit",
                    ],
                ),
            ],
        );
    }

    #[test]
    fn quota_rules() {
        assert_spec_cases(
            "Quota",
            &[
                ("{}", &[]),
                ("{hard: {servers: 10, vcpus: 0, ramMib: 8192}}", &[]),
                (
                    "{hard: {servers: -1, floatingIps: -5, securityGroups: -1}}",
                    &[
                        "spec.hard.servers: must not be negative",
                        "spec.hard.floatingIps: must not be negative",
                        "spec.hard.securityGroups: must not be negative",
                    ],
                ),
            ],
        );
    }
}
