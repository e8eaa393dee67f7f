//! Storage kinds: Volume and VolumeSnapshot.

use super::{FieldPath, Violations, syntax};
use crate::v1::{VolumeSnapshotSpec, VolumeSpec};

/// A volume made from an image is bootable unless told otherwise; any other is not.
pub(super) fn default_volume(spec: &mut VolumeSpec) {
    let from_image = spec.source.as_ref().is_some_and(|s| !s.image.is_empty());
    spec.bootable.get_or_insert(from_image);
}

pub(super) fn check_volume(spec: &VolumeSpec, out: &mut Violations) {
    let path = FieldPath::spec();
    if spec.size_gib < 1 {
        out.add(&path.field("sizeGib"), "must be at least 1");
    }
    if let Some(source) = &spec.source {
        let source_path = path.field("source");
        let fields = [
            ("image", &source.image),
            ("snapshot", &source.snapshot),
            ("volume", &source.volume),
        ];
        let mut first: Option<&str> = None;
        for (field, name) in fields {
            if name.is_empty() {
                continue;
            }
            match first {
                Some(first) => out.add(
                    &source_path.field(field),
                    format!("cannot be set together with `{first}`"),
                ),
                None => first = Some(field),
            }
            out.reference(&source_path.field(field), name);
        }
        if first.is_none() {
            out.add(
                &source_path,
                "set one of `image`, `snapshot` or `volume` (or omit `source` for an empty volume)",
            );
        }
    }
    if spec.multiattach {
        out.add(
            &path.field("multiattach"),
            "is not supported yet: two guests (or two NBD exports) cannot both open a volume \
             for writing",
        );
    }
    out.reference(&path.field("volumeType"), &spec.volume_type);
    out.check(
        &path.field("availabilityZone"),
        syntax::label_value(&spec.availability_zone),
    );
}

pub(super) fn check_volume_update(new: &VolumeSpec, old: &VolumeSpec, out: &mut Violations) {
    let path = FieldPath::spec();
    if new.size_gib < old.size_gib {
        out.add(
            &path.field("sizeGib"),
            format!("cannot shrink from {} to {}", old.size_gib, new.size_gib),
        );
    }
    out.immutable(&path.field("source"), &new.source, &old.source);
}

pub(super) fn check_volume_snapshot(spec: &VolumeSnapshotSpec, out: &mut Violations) {
    out.required_reference(&FieldPath::spec().field("volume"), &spec.volume);
}

pub(super) fn check_volume_snapshot_update(
    new: &VolumeSnapshotSpec,
    old: &VolumeSnapshotSpec,
    out: &mut Violations,
) {
    out.immutable(&FieldPath::spec().field("volume"), &new.volume, &old.volume);
}

#[cfg(test)]
mod tests {
    use crate::kinds::Object;
    use crate::validation::tests::{assert_spec_cases, assert_update_cases, defaulted, spec_doc};

    #[test]
    fn volume_defaults() {
        let bootable = |spec: &str| {
            let Object::Volume(volume) = defaulted(&spec_doc("Volume", spec)) else {
                unreachable!()
            };
            volume.spec.unwrap().bootable
        };
        assert_eq!(
            bootable("{sizeGib: 1, source: {image: debian}}"),
            Some(true)
        );
        assert_eq!(bootable("{sizeGib: 1, source: {snapshot: s}}"), Some(false));
        assert_eq!(bootable("{sizeGib: 1}"), Some(false));
        assert_eq!(
            bootable("{sizeGib: 1, source: {image: debian}, bootable: false}"),
            Some(false)
        );
    }

    #[test]
    fn volume_rules() {
        assert_spec_cases(
            "Volume",
            &[
                ("{sizeGib: 1}", &[]),
                (
                    "{sizeGib: 20, source: {image: debian}, volumeType: ssd, availabilityZone: az-1}",
                    &[],
                ),
                ("{}", &["spec.sizeGib: must be at least 1"]),
                (
                    "{sizeGib: 1, multiattach: true}",
                    &[
                        "spec.multiattach: is not supported yet: two guests (or two NBD exports) cannot both open a volume for writing",
                    ],
                ),
                (
                    "{sizeGib: 1, source: {}}",
                    &[
                        "spec.source: set one of `image`, `snapshot` or `volume` (or omit `source` for an empty volume)",
                    ],
                ),
                (
                    "{sizeGib: 1, source: {image: a, snapshot: b, volume: c}}",
                    &[
                        "spec.source.snapshot: cannot be set together with `image`",
                        "spec.source.volume: cannot be set together with `image`",
                    ],
                ),
                (
                    "{sizeGib: 1, source: {volume: Data}}",
                    &[
                        "spec.source.volume: `Data` is not a DNS-1123 label: lower-case letters, digits and '-', starting and ending with a letter or digit",
                    ],
                ),
                (
                    "{sizeGib: 1, volumeType: SSD}",
                    &[
                        "spec.volumeType: `SSD` is not a DNS-1123 label: lower-case letters, digits and '-', starting and ending with a letter or digit",
                    ],
                ),
            ],
        );
        assert_update_cases(
            "Volume",
            &[
                (
                    "{sizeGib: 10, source: {image: i}}",
                    "{sizeGib: 20, source: {image: i}, bootable: false}",
                    &[],
                ),
                (
                    "{sizeGib: 10}",
                    "{sizeGib: 5}",
                    &["spec.sizeGib: cannot shrink from 10 to 5"],
                ),
                (
                    "{sizeGib: 10, source: {image: i}}",
                    "{sizeGib: 10, source: {image: j}}",
                    &["spec.source: field is immutable"],
                ),
                (
                    "{sizeGib: 10}",
                    "{sizeGib: 10, source: {image: j}}",
                    &["spec.source: field is immutable"],
                ),
            ],
        );
    }

    #[test]
    fn volume_snapshot_rules() {
        assert_spec_cases(
            "VolumeSnapshot",
            &[
                ("{volume: data, description: before upgrade}", &[]),
                ("{}", &["spec.volume: required"]),
            ],
        );
        assert_update_cases(
            "VolumeSnapshot",
            &[
                ("{volume: data}", "{volume: data, description: d}", &[]),
                (
                    "{volume: data}",
                    "{volume: logs}",
                    &["spec.volume: field is immutable"],
                ),
            ],
        );
    }
}
