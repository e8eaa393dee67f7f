//! Image: where a disk, kernel or ramdisk image comes from and how to boot it.

use super::{FieldPath, Violations, default_enum, optional_enum, syntax};
use crate::v1::ImageSpec;
use crate::v1::image_spec::{ContainerFormat, DiskFormat, Visibility};

/// The longest kernel command line x86 Linux accepts (`COMMAND_LINE_SIZE`), in bytes.
const MAX_KERNEL_COMMAND_LINE: usize = 2048;

/// Private, bare; the disk format stays unset for the nodes to detect.
pub(super) fn default_image(spec: &mut ImageSpec) {
    default_enum(&mut spec.visibility, Visibility::Private as i32);
    default_enum(&mut spec.container_format, ContainerFormat::Bare as i32);
    // Zero is the enum's "unset"; keep it unset rather than as a value no one can spell.
    if spec.disk_format == Some(0) {
        spec.disk_format = None;
    }
}

pub(super) fn check_image(spec: &ImageSpec, out: &mut Violations) {
    let path = FieldPath::spec();
    let url = spec
        .source
        .as_ref()
        .map(|s| s.url.as_str())
        .unwrap_or_default();
    let url_path = path.field("source").field("url");
    if out.required(&url_path, url) {
        out.check(&url_path, syntax::image_url(url));
    }
    if !spec.checksum.is_empty() {
        out.check(
            &path.field("checksum"),
            syntax::sha256_checksum(&spec.checksum),
        );
    }
    optional_enum(
        out,
        &path.field("diskFormat"),
        spec.disk_format,
        "ImageSpec.DiskFormat",
    );
    optional_enum(
        out,
        &path.field("containerFormat"),
        spec.container_format,
        "ImageSpec.ContainerFormat",
    );
    optional_enum(
        out,
        &path.field("visibility"),
        spec.visibility,
        "ImageSpec.Visibility",
    );

    let boot_part = matches!(
        spec.disk_format.map(DiskFormat::try_from),
        Some(Ok(DiskFormat::Kernel | DiskFormat::Ramdisk))
    );
    let boot_fields = [
        ("kernel", &spec.kernel),
        ("ramdisk", &spec.ramdisk),
        ("kernelCommandLine", &spec.kernel_command_line),
    ];
    for (field, value) in boot_fields {
        if value.is_empty() {
            continue;
        }
        let field_path = path.field(field);
        if boot_part {
            out.add(
                &field_path,
                "only allowed on disk images, not on a kernel or ramdisk",
            );
        } else if field != "kernel" && spec.kernel.is_empty() {
            out.add(&field_path, "only allowed with `kernel`");
        }
        if field == "kernelCommandLine" {
            if value.len() > MAX_KERNEL_COMMAND_LINE {
                out.add(
                    &field_path,
                    format!(
                        "{} bytes; at most {MAX_KERNEL_COMMAND_LINE} are allowed",
                        value.len()
                    ),
                );
            }
            if value.chars().any(char::is_control) {
                out.add(
                    &field_path,
                    "must not contain control characters or line breaks",
                );
            }
        } else {
            out.reference(&field_path, value);
        }
    }

    let properties = path.field("properties");
    let mut keys: Vec<&String> = spec.properties.keys().collect();
    keys.sort();
    for key in keys {
        if let Err(reason) = syntax::qualified_name(key) {
            out.add(&properties.key(key), format!("invalid key: {reason}"));
        }
    }
}

pub(super) fn check_image_update(new: &ImageSpec, old: &ImageSpec, out: &mut Violations) {
    let path = FieldPath::spec();
    out.immutable(&path.field("source"), &new.source, &old.source);
    out.immutable(&path.field("checksum"), &new.checksum, &old.checksum);
}

#[cfg(test)]
mod tests {
    use crate::kinds::Object;
    use crate::v1::image_spec::{ContainerFormat, Visibility};
    use crate::validation::tests::{assert_spec_cases, assert_update_cases, defaulted, spec_doc};

    const HEX: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn image_defaults() {
        let Object::Image(image) = defaulted(&spec_doc("Image", "{source: {url: \"file:///x\"}}"))
        else {
            unreachable!()
        };
        let spec = image.spec.unwrap();
        assert_eq!(spec.visibility, Some(Visibility::Private as i32));
        assert_eq!(spec.container_format, Some(ContainerFormat::Bare as i32));
        assert_eq!(spec.disk_format, None, "left for the nodes to detect");
    }

    #[test]
    fn image_rules() {
        let checksum = format!(
            "{{source: {{url: \"https://mirror/debian.qcow2\"}}, checksum: \"sha256:{HEX}\", diskFormat: QCOW2, visibility: Public, properties: {{os_distro: debian}}}}"
        );
        assert_spec_cases(
            "Image",
            &[
                (&checksum, &[]),
                (
                    "{source: {url: \"file:///var/lib/ferro/images/tiny.raw\"}, kernel: tiny-kernel, ramdisk: tiny-initrd, kernelCommandLine: console=ttyS0}",
                    &[],
                ),
                ("{source: {url: \"file:///k\"}, diskFormat: Kernel}", &[]),
                ("{}", &["spec.source.url: required"]),
                (
                    "{source: {url: \"ftp://mirror/x\"}}",
                    &[
                        "spec.source.url: `ftp://mirror/x` has scheme `ftp`; use file, http or https (or ferro://upload for uploaded bytes)",
                    ],
                ),
                (
                    "{source: {url: \"file:///x\"}, checksum: \"md5:abc\"}",
                    &[
                        "spec.checksum: `md5:abc` is not `sha256:` followed by 64 lower-case hex digits",
                    ],
                ),
                (
                    "{source: {url: \"file:///x\"}, ramdisk: r, kernelCommandLine: quiet}",
                    &[
                        "spec.ramdisk: only allowed with `kernel`",
                        "spec.kernelCommandLine: only allowed with `kernel`",
                    ],
                ),
                (
                    "{source: {url: \"file:///x\"}, kernel: Vmlinuz}",
                    &[
                        "spec.kernel: `Vmlinuz` is not a DNS-1123 label: lower-case letters, digits and '-', starting and ending with a letter or digit",
                    ],
                ),
                (
                    "{source: {url: \"file:///x\"}, diskFormat: Ramdisk, kernel: k}",
                    &["spec.kernel: only allowed on disk images, not on a kernel or ramdisk"],
                ),
                (
                    "{source: {url: \"file:///x\"}, kernel: k, kernelCommandLine: \"a\\nb\"}",
                    &["spec.kernelCommandLine: must not contain control characters or line breaks"],
                ),
                (
                    "{source: {url: \"file:///x\"}, properties: {\"os distro\": debian}}",
                    &[
                        "spec.properties[\"os distro\"]: invalid key: name `os distro` is not valid: letters, digits, '-', '_' and '.', starting and ending with a letter or digit",
                    ],
                ),
            ],
        );
        let long = format!(
            "{{source: {{url: \"file:///x\"}}, kernel: k, kernelCommandLine: {}}}",
            "a".repeat(2049)
        );
        assert_spec_cases(
            "Image",
            &[(
                &long,
                &["spec.kernelCommandLine: 2049 bytes; at most 2048 are allowed"],
            )],
        );
    }

    #[test]
    fn image_immutable_fields() {
        let base = format!("{{source: {{url: \"file:///a\"}}, checksum: \"sha256:{HEX}\"}}");
        let other_sum = format!(
            "{{source: {{url: \"file:///a\"}}, checksum: \"sha256:{}\"}}",
            HEX.replace('0', "f")
        );
        let public = format!(
            "{{source: {{url: \"file:///a\"}}, checksum: \"sha256:{HEX}\", visibility: Public, minRamMib: 128}}"
        );
        assert_update_cases(
            "Image",
            &[
                (&base, &public, &[]),
                (&base, &other_sum, &["spec.checksum: field is immutable"]),
                (
                    "{source: {url: \"file:///a\"}}",
                    "{source: {url: \"file:///b\"}}",
                    &["spec.source: field is immutable"],
                ),
            ],
        );
    }
}
