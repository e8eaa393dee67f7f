//! Allocation claims: IPAddress, MACAddress, SegmentID. Written by IPAM and the network
//! controller, never changed: a claim is the value it is named by.

use super::{FieldPath, Violations, syntax};
use crate::v1::{IpAddressSpec, MacAddressSpec, SegmentIdSpec};

/// The VXLAN network identifiers a SegmentID may hold (24 bits, 0 reserved).
const VNI_RANGE: std::ops::RangeInclusive<u32> = 1..=16_777_215;

pub(super) fn check_ip_address(spec: &IpAddressSpec, out: &mut Violations) {
    let path = FieldPath::spec();
    out.required(&path.field("networkUid"), &spec.network_uid);
    out.reference(&path.field("subnet"), &spec.subnet);
    let address = path.field("address");
    if out.required(&address, &spec.address) {
        out.check(&address, syntax::ip(&spec.address));
    }
}

pub(super) fn check_ip_address_update(
    new: &IpAddressSpec,
    old: &IpAddressSpec,
    out: &mut Violations,
) {
    let path = FieldPath::spec();
    out.immutable(
        &path.field("networkUid"),
        &new.network_uid,
        &old.network_uid,
    );
    out.immutable(&path.field("subnet"), &new.subnet, &old.subnet);
    out.immutable(&path.field("address"), &new.address, &old.address);
}

pub(super) fn check_mac_address(spec: &MacAddressSpec, out: &mut Violations) {
    let address = FieldPath::spec().field("address");
    if out.required(&address, &spec.address) {
        out.check(&address, syntax::unicast_mac(&spec.address));
    }
}

pub(super) fn check_mac_address_update(
    new: &MacAddressSpec,
    old: &MacAddressSpec,
    out: &mut Violations,
) {
    out.immutable(
        &FieldPath::spec().field("address"),
        &new.address,
        &old.address,
    );
}

pub(super) fn check_segment_id(spec: &SegmentIdSpec, out: &mut Violations) {
    if !VNI_RANGE.contains(&spec.id) {
        out.add(
            &FieldPath::spec().field("id"),
            format!(
                "must be between {} and {}",
                VNI_RANGE.start(),
                VNI_RANGE.end()
            ),
        );
    }
}

pub(super) fn check_segment_id_update(
    new: &SegmentIdSpec,
    old: &SegmentIdSpec,
    out: &mut Violations,
) {
    out.immutable(&FieldPath::spec().field("id"), &new.id, &old.id);
}

#[cfg(test)]
mod tests {
    use crate::validation::tests::{assert_spec_cases, assert_update_cases};

    #[test]
    fn ip_address_rules() {
        assert_spec_cases(
            "IPAddress",
            &[
                ("{networkUid: u, subnet: a, address: 10.77.0.50}", &[]),
                ("{networkUid: u, address: \"fd00::50\"}", &[]),
                (
                    "{}",
                    &["spec.networkUid: required", "spec.address: required"],
                ),
                (
                    "{networkUid: u, address: 10.77.0.500}",
                    &["spec.address: `10.77.0.500` is not an IP address"],
                ),
            ],
        );
        assert_update_cases(
            "IPAddress",
            &[
                (
                    "{networkUid: u, address: 10.0.0.1}",
                    "{networkUid: u, address: 10.0.0.1}",
                    &[],
                ),
                (
                    "{networkUid: u, subnet: a, address: 10.0.0.1}",
                    "{networkUid: v, subnet: b, address: 10.0.0.2}",
                    &[
                        "spec.networkUid: field is immutable",
                        "spec.subnet: field is immutable",
                        "spec.address: field is immutable",
                    ],
                ),
            ],
        );
    }

    #[test]
    fn mac_address_rules() {
        assert_spec_cases(
            "MACAddress",
            &[
                ("{address: \"fa:16:3e:00:00:01\"}", &[]),
                ("{}", &["spec.address: required"]),
                (
                    "{address: \"ff:ff:ff:ff:ff:ff\"}",
                    &[
                        "spec.address: ff:ff:ff:ff:ff:ff is a multicast address (the first octet's low bit is set)",
                    ],
                ),
            ],
        );
        assert_update_cases(
            "MACAddress",
            &[(
                "{address: \"fa:16:3e:00:00:01\"}",
                "{address: \"fa:16:3e:00:00:02\"}",
                &["spec.address: field is immutable"],
            )],
        );
    }

    #[test]
    fn segment_id_rules() {
        assert_spec_cases(
            "SegmentID",
            &[
                ("{id: 1}", &[]),
                ("{id: 16777215}", &[]),
                ("{}", &["spec.id: must be between 1 and 16777215"]),
                (
                    "{id: 16777216}",
                    &["spec.id: must be between 1 and 16777215"],
                ),
            ],
        );
        assert_update_cases(
            "SegmentID",
            &[("{id: 5}", "{id: 6}", &["spec.id: field is immutable"])],
        );
    }
}
