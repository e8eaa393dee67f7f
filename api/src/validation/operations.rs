//! Operations kinds: Event and Lease, written by components rather than people.

use super::syntax::shown;
use super::{FieldPath, Violations, meta, required_enum};
use crate::kinds::Kind;
use crate::v1::{EventSpec, LeaseSpec};

pub(super) fn check_event(spec: &EventSpec, out: &mut Violations) {
    let path = FieldPath::spec();
    let involved = spec.involved_object.clone().unwrap_or_default();
    let involved_path = path.field("involvedObject");
    let kind_path = involved_path.field("kind");
    let kind = Kind::from_kind_name(&involved.kind);
    if out.required(&kind_path, &involved.kind) && kind.is_none() {
        out.add(
            &kind_path,
            format!("unknown kind {}", shown(&involved.kind)),
        );
    }
    let name_path = involved_path.field("name");
    if out.required(&name_path, &involved.name)
        && let Some(kind) = kind
    {
        out.check(&name_path, meta::name(kind, &involved.name));
    }
    required_enum(out, &path.field("type"), spec.r#type, "EventSpec.Type");
    let reason = path.field("reason");
    if out.required(&reason, &spec.reason) && !is_upper_camel_case(&spec.reason) {
        out.add(
            &reason,
            format!(
                "{} is not one UpperCamelCase word like FailedScheduling",
                shown(&spec.reason)
            ),
        );
    }
}

fn is_upper_camel_case(word: &str) -> bool {
    word.starts_with(|c: char| c.is_ascii_uppercase())
        && word.chars().all(|c| c.is_ascii_alphanumeric())
}

pub(super) fn check_lease(spec: &LeaseSpec, out: &mut Violations) {
    if !spec.holder_identity.is_empty() && spec.lease_duration_seconds == 0 {
        out.add(
            &FieldPath::spec().field("leaseDurationSeconds"),
            "must be at least 1 while the lease is held",
        );
    }
}

#[cfg(test)]
mod tests {
    use crate::validation::tests::assert_spec_cases;

    #[test]
    fn event_rules() {
        assert_spec_cases(
            "Event",
            &[
                (
                    "{involvedObject: {kind: Server, name: web-1, project: default, uid: u}, type: Warning, reason: FailedScheduling, message: no node has 2 vcpus free, count: 3}",
                    &[],
                ),
                (
                    "{}",
                    &[
                        "spec.involvedObject.kind: required",
                        "spec.involvedObject.name: required",
                        "spec.type: required: one of Normal, Warning",
                        "spec.reason: required",
                    ],
                ),
                (
                    "{involvedObject: {kind: server, name: Web}, type: Normal, reason: failed scheduling}",
                    &[
                        "spec.involvedObject.kind: unknown kind `server`",
                        "spec.reason: `failed scheduling` is not one UpperCamelCase word like FailedScheduling",
                    ],
                ),
                (
                    "{involvedObject: {kind: Server, name: Web}, type: Normal, reason: Started}",
                    &[
                        "spec.involvedObject.name: `Web` is not a DNS-1123 label: lower-case letters, digits and '-', starting and ending with a letter or digit",
                    ],
                ),
            ],
        );
    }

    #[test]
    fn lease_rules() {
        assert_spec_cases(
            "Lease",
            &[
                ("{}", &[]),
                (
                    "{holderIdentity: controllers-1, leaseDurationSeconds: 15, leaseTransitions: 2}",
                    &[],
                ),
                (
                    "{holderIdentity: controllers-1}",
                    &["spec.leaseDurationSeconds: must be at least 1 while the lease is held"],
                ),
            ],
        );
    }
}
