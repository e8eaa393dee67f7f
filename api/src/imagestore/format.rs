//! What an image's bytes are, from their first [`HEADER_BYTES`].
//!
//! The apiserver checks an upload's format before it stores it, from magic numbers alone
//! (it runs no `qemu-img`; the nodes inspect every image again with it before use):
//! qcow2, vmdk (sparse extent or descriptor), vdi, vhdx and ISO 9660 disk images; a Linux
//! kernel (the x86 boot protocol's `HdrS`) or an ELF executable; a cpio archive (an
//! initramfs); and compressed data or archives that are not disk images (gzip, xz, zstd,
//! bzip2, zip, tar). Anything else is `raw` — which only means that no other format was
//! recognised: any bytes at all are a valid raw disk.

use crate::v1::image_spec::DiskFormat;

/// How many leading bytes [`detect`] looks at: enough for ISO 9660's volume descriptor at
/// 32 KiB.
pub const HEADER_BYTES: usize = 64 << 10;

/// What the header shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Detected {
    /// QEMU copy-on-write v2 or v3.
    Qcow2,
    /// A VMware disk.
    Vmdk,
    /// A VirtualBox disk.
    Vdi,
    /// A Hyper-V disk.
    Vhdx,
    /// An ISO 9660 image.
    Iso,
    /// A Linux kernel image (bzImage).
    Kernel,
    /// An ELF executable (an uncompressed `vmlinux`, or a program).
    Elf,
    /// A cpio archive (an uncompressed initramfs).
    Cpio,
    /// Compressed data or an archive, named (`gzip`, `zstd`, …): not a disk image, but an
    /// initramfs may be compressed.
    Packed(&'static str),
    /// Nothing recognised.
    Raw,
}

impl Detected {
    /// The name shown in `status.uploaded.format` and in messages.
    pub fn name(self) -> &'static str {
        match self {
            Detected::Qcow2 => "qcow2",
            Detected::Vmdk => "vmdk",
            Detected::Vdi => "vdi",
            Detected::Vhdx => "vhdx",
            Detected::Iso => "iso",
            Detected::Kernel => "kernel",
            Detected::Elf => "elf",
            Detected::Cpio => "cpio",
            Detected::Packed(what) => what,
            Detected::Raw => "raw",
        }
    }

    /// A description for messages: `a qcow2 disk image`, `gzip-compressed data`.
    pub fn describe(self) -> String {
        match self {
            Detected::Qcow2 | Detected::Vmdk | Detected::Vdi | Detected::Vhdx => {
                format!("a {} disk image", self.name())
            }
            Detected::Iso => "an ISO 9660 image".into(),
            Detected::Kernel => "a Linux kernel".into(),
            Detected::Elf => "an ELF executable".into(),
            Detected::Cpio => "a cpio archive".into(),
            Detected::Packed(what @ ("zip" | "tar")) => format!("a {what} archive"),
            Detected::Packed(what) => format!("{what}-compressed data"),
            Detected::Raw => "raw bytes (no known header)".into(),
        }
    }

    /// The disk format the bytes are stored as when the uploader declares `declared`
    /// (`None`: detect), or why they are refused.
    pub fn accept(self, declared: Option<DiskFormat>) -> Result<&'static str, String> {
        use DiskFormat as F;
        let container = matches!(
            self,
            Detected::Qcow2 | Detected::Vmdk | Detected::Vdi | Detected::Vhdx
        );
        let refuse = |wanted: &str| {
            Err(format!(
                "declared {wanted}, but the bytes are {}",
                self.describe()
            ))
        };
        match declared {
            None | Some(F::Unspecified) => match self {
                Detected::Elf | Detected::Cpio | Detected::Packed(_) => Err(format!(
                    "the bytes are {}, not a disk image of a known format; declare \
                     --disk-format kernel or ramdisk for boot files",
                    self.describe()
                )),
                Detected::Kernel => Ok("kernel"),
                other => Ok(other.name()),
            },
            Some(F::Raw) => match self {
                Detected::Raw | Detected::Iso => Ok("raw"),
                _ => refuse("raw"),
            },
            Some(F::Qcow2) if self == Detected::Qcow2 => Ok("qcow2"),
            Some(F::Vmdk) if self == Detected::Vmdk => Ok("vmdk"),
            Some(F::Vdi) if self == Detected::Vdi => Ok("vdi"),
            Some(F::Vhdx) if self == Detected::Vhdx => Ok("vhdx"),
            Some(F::Iso) if self == Detected::Iso => Ok("iso"),
            Some(F::Kernel) => match self {
                Detected::Kernel | Detected::Elf | Detected::Raw => Ok("kernel"),
                _ => refuse("kernel"),
            },
            Some(F::Ramdisk) if !container && self != Detected::Iso && self != Detected::Kernel => {
                Ok("ramdisk")
            }
            Some(other) => refuse(&declared_name(other)),
        }
    }

    /// The disk size a guest sees, when the header says it; `size` is the bytes' size.
    pub fn virtual_size(self, header: &[u8], size: u64) -> u64 {
        match self {
            Detected::Raw | Detected::Iso => size,
            // The qcow2 header's `size` field: big-endian, at byte 24.
            Detected::Qcow2 => header
                .get(24..32)
                .map(|b| u64::from_be_bytes(b.try_into().expect("eight bytes")))
                .unwrap_or(0),
            _ => 0,
        }
    }
}

fn declared_name(format: DiskFormat) -> String {
    format.as_str_name().to_ascii_lowercase()
}

/// What `header` (the first [`HEADER_BYTES`] or all the bytes, if fewer) shows.
pub fn detect(header: &[u8]) -> Detected {
    let at = |offset: usize, magic: &[u8]| header.get(offset..offset + magic.len()) == Some(magic);
    if at(0, b"QFI\xfb") {
        Detected::Qcow2
    } else if at(0, b"KDMV") || at(0, b"# Disk DescriptorFile") {
        Detected::Vmdk
    } else if at(0x40, &0xbeda_107f_u32.to_le_bytes()) {
        Detected::Vdi
    } else if at(0, b"vhdxfile") {
        Detected::Vhdx
    } else if at(0x8001, b"CD001") {
        Detected::Iso
    } else if at(0x202, b"HdrS") {
        Detected::Kernel
    } else if at(0, b"\x7fELF") {
        Detected::Elf
    } else if at(0, b"070701") || at(0, b"070702") || at(0, b"070707") {
        Detected::Cpio
    } else if at(0, b"\x1f\x8b") {
        Detected::Packed("gzip")
    } else if at(0, b"\xfd7zXZ\x00") {
        Detected::Packed("xz")
    } else if at(0, b"\x28\xb5\x2f\xfd") {
        Detected::Packed("zstd")
    } else if at(0, b"BZh") {
        Detected::Packed("bzip2")
    } else if at(0, b"\x02\x21\x4c\x18") || at(0, b"\x04\x22\x4d\x18") {
        Detected::Packed("lz4")
    } else if at(0, b"PK\x03\x04") {
        Detected::Packed("zip")
    } else if at(257, b"ustar") {
        Detected::Packed("tar")
    } else {
        Detected::Raw
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(offset: usize, magic: &[u8]) -> Vec<u8> {
        let mut header = vec![0u8; HEADER_BYTES];
        header[offset..offset + magic.len()].copy_from_slice(magic);
        header
    }

    #[test]
    fn detects_formats_by_magic() {
        let cases: Vec<(Vec<u8>, Detected)> = vec![
            (with(0, b"QFI\xfb\0\0\0\x03"), Detected::Qcow2),
            (with(0, b"KDMV"), Detected::Vmdk),
            (
                b"# Disk DescriptorFile\nversion=1\n".to_vec(),
                Detected::Vmdk,
            ),
            (with(0x40, &[0x7f, 0x10, 0xda, 0xbe]), Detected::Vdi),
            (with(0, b"vhdxfile"), Detected::Vhdx),
            (with(0x8001, b"CD001"), Detected::Iso),
            (with(0x202, b"HdrS"), Detected::Kernel),
            (b"\x7fELF\x02\x01".to_vec(), Detected::Elf),
            (b"070701000000".to_vec(), Detected::Cpio),
            (b"\x1f\x8b\x08\0".to_vec(), Detected::Packed("gzip")),
            (b"\x28\xb5\x2f\xfd".to_vec(), Detected::Packed("zstd")),
            (with(257, b"ustar"), Detected::Packed("tar")),
            (vec![0u8; 512], Detected::Raw),
            (Vec::new(), Detected::Raw),
        ];
        for (header, expected) in cases {
            assert_eq!(detect(&header), expected, "{expected:?}");
        }
    }

    #[test]
    fn a_declared_format_must_agree_with_the_magic() {
        use DiskFormat as F;
        let cases = [
            (Detected::Qcow2, None, Ok("qcow2")),
            (Detected::Raw, None, Ok("raw")),
            (Detected::Kernel, None, Ok("kernel")),
            (Detected::Qcow2, Some(F::Qcow2), Ok("qcow2")),
            (Detected::Iso, Some(F::Raw), Ok("raw")),
            (Detected::Kernel, Some(F::Kernel), Ok("kernel")),
            (Detected::Packed("gzip"), Some(F::Ramdisk), Ok("ramdisk")),
            (Detected::Cpio, Some(F::Ramdisk), Ok("ramdisk")),
            (
                Detected::Qcow2,
                Some(F::Raw),
                Err("declared raw, but the bytes are a qcow2 disk image".to_owned()),
            ),
            (
                Detected::Raw,
                Some(F::Qcow2),
                Err("declared qcow2, but the bytes are raw bytes (no known header)".to_owned()),
            ),
            (
                Detected::Vmdk,
                Some(F::Ramdisk),
                Err("declared ramdisk, but the bytes are a vmdk disk image".to_owned()),
            ),
            (
                Detected::Packed("gzip"),
                None,
                Err(
                    "the bytes are gzip-compressed data, not a disk image of a known format; \
                     declare --disk-format kernel or ramdisk for boot files"
                        .to_owned(),
                ),
            ),
        ];
        for (detected, declared, expected) in cases {
            assert_eq!(
                detected.accept(declared),
                expected.clone().map(|s: &str| s),
                "{detected:?} declared {declared:?}"
            );
        }
    }

    #[test]
    fn qcow2_virtual_size_comes_from_its_header() {
        let mut header = with(0, b"QFI\xfb\0\0\0\x03");
        header[24..32].copy_from_slice(&(10u64 << 30).to_be_bytes());
        assert_eq!(Detected::Qcow2.virtual_size(&header, 200_000), 10 << 30);
        assert_eq!(Detected::Raw.virtual_size(&header, 200_000), 200_000);
    }
}
