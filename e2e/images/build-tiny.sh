#!/usr/bin/env bash
# Builds Ferro's tiny test guest from Debian packages, at test time, and caches it.
#
#   e2e/images/build-tiny.sh            build (or reuse) and print the artefacts
#
# Output, on stdout, one KEY=VALUE per line (everything else goes to stderr):
#   FERRO_TINY_KERNEL   uncompressed vmlinux (ELF), booted directly by QEMU through PVH
#   FERRO_TINY_INITRD   initramfs: busybox-static, the guest's init, virtio/ext4/isofs modules
#   FERRO_TINY_DISK     64 MiB raw ext4 disk (label ferro-tiny) holding the marker file
#                       /ferro-tiny-disk; the guest mounts it and counts its boots there
#   FERRO_TINY_BIOS_DISK  a bootable raw disk, as cloud images are: an MBR (syslinux's
#                       mbr.bin) and two partitions, an active FAT one with syslinux, the
#                       compressed kernel (bzImage), the same initramfs and FERRO_TINY_CMDLINE,
#                       and an ext4 one like FERRO_TINY_DISK; SeaBIOS boots it to the same
#                       ready marker, counting boots on its second partition
#   FERRO_TINY_CMDLINE  the kernel command line the guest is meant to boot with
#   FERRO_TINY_KVER     the kernel version
#
# Nothing is installed on the host: the kernel package is fetched with `apt-get download`
# and unpacked with `dpkg-deb -x`. Busybox comes from the host's busybox-static (see
# scripts/install-host-deps.sh). The cache lives in $FERRO_IMAGE_CACHE (default
# <repo>/target/ferro-images), keyed by the kernel version and a hash of this script and
# the guest's init, so editing either rebuilds. Concurrent callers are serialised by flock.
#
# Environment:
#   FERRO_IMAGE_CACHE          cache directory
#   FERRO_TINY_KERNEL_PACKAGE  kernel package to use (default: what linux-image-amd64 depends on)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
cache=${FERRO_IMAGE_CACHE:-$repo/target/ferro-images}
init_script=$here/tiny-init.sh

log() { echo "build-tiny: $*" >&2; }
die() { log "error: $*"; exit 1; }

for tool in apt-get apt-cache dpkg-deb depmod cpio gzip xz mkfs.ext4 flock sha256sum \
  sfdisk mkfs.vfat mcopy syslinux; do
  command -v "$tool" >/dev/null || die "$tool not found (run scripts/install-host-deps.sh)"
done
busybox=$(command -v busybox || true)
[ -n "$busybox" ] || die "busybox not found (install busybox-static)"
# A dynamically linked busybox would need its libraries in the initramfs.
if ldd "$busybox" >/dev/null 2>&1; then die "$busybox is not static (install busybox-static)"; fi

# The kernel package: the versioned one linux-image-amd64 depends on, resolved from the
# local package lists (no network). Refresh the lists once if they know nothing of it.
resolve_kernel_package() {
  apt-cache depends linux-image-amd64 2>/dev/null |
    awk '/Depends: linux-image-[0-9]/ { print $2; exit }'
}
kpkg=${FERRO_TINY_KERNEL_PACKAGE:-}
if [ -z "$kpkg" ]; then
  kpkg=$(resolve_kernel_package)
  if [ -z "$kpkg" ] && [ "$(id -u)" -eq 0 ]; then
    log "package lists do not know linux-image-amd64; running apt-get update"
    apt-get update -qq >&2
    kpkg=$(resolve_kernel_package)
  fi
  [ -n "$kpkg" ] || die "cannot resolve the kernel package behind linux-image-amd64 (apt-get update?)"
fi
kver=${kpkg#linux-image-}

key=$(cat "$0" "$init_script" | sha256sum | cut -c1-12)
out=$cache/tiny-$kver-$key

print_result() {
  echo "FERRO_TINY_KERNEL=$out/vmlinux"
  echo "FERRO_TINY_INITRD=$out/initramfs.cpio.gz"
  echo "FERRO_TINY_DISK=$out/disk.raw"
  echo "FERRO_TINY_BIOS_DISK=$out/bios-disk.raw"
  echo "FERRO_TINY_CMDLINE=$(cat "$out/cmdline")"
  echo "FERRO_TINY_KVER=$kver"
}

mkdir -p "$cache"
exec 9>"$cache/.lock"
flock 9
if [ -f "$out/complete" ]; then
  print_result
  exit 0
fi

log "building the tiny guest for $kpkg into $out"
work=$(mktemp -d "$cache/.build-XXXXXX")
trap 'rm -rf "$work"' EXIT

# 1. The kernel package, unpacked, never installed.
(cd "$work" && apt-get download -q -o APT::Sandbox::User=root "$kpkg" >&2)
dpkg-deb -x "$work"/"$kpkg"_*.deb "$work/pkg"
vmlinuz=$work/pkg/boot/vmlinuz-$kver
[ -f "$vmlinuz" ] || die "$kpkg has no /boot/vmlinuz-$kver"

# 2. The uncompressed kernel, the way the kernel's scripts/extract-vmlinux does it: find
#    the compressed payload by its magic bytes and decompress from there; trailing bytes
#    after the stream are expected, so judge the result, not xz's exit status.
is_elf() { [ "$(head -c 4 "$1" | od -An -tx1 | tr -d ' \n')" = "7f454c46" ]; }
extract_vmlinux() {
  local img=$1 dst=$2 offset
  for offset in $(LC_ALL=C grep -obUaP '\xfd7zXZ\x00' "$img" | cut -d: -f1); do
    tail -c +$((offset + 1)) "$img" | xz -dc >"$dst" 2>/dev/null || true
    if [ -s "$dst" ] && is_elf "$dst"; then return 0; fi
  done
  for offset in $(LC_ALL=C grep -obUaP '\x1f\x8b\x08' "$img" | cut -d: -f1); do
    tail -c +$((offset + 1)) "$img" | gzip -dc >"$dst" 2>/dev/null || true
    if [ -s "$dst" ] && is_elf "$dst"; then return 0; fi
  done
  return 1
}
mkdir -p "$work/out"
extract_vmlinux "$vmlinuz" "$work/out/vmlinux" || die "no ELF kernel found inside $vmlinuz"

# 3. The modules the guest needs and everything modules.dep says they need, in load order.
#    The package ships no modules.dep (depmod runs at install time), so make one.
moddir=$work/pkg/lib/modules/$kver
depmod -b "$work/pkg" "$kver"
wanted=(
  virtio_pci virtio_blk virtio_net # the devices QEMU gives the guest
  crc32c_generic ext4              # the disk (ext4 checksums need the crc32c algorithm)
  isofs                            # the config drive
  button evdev                     # ACPI power button, so a graceful stop works
  virtio_rng                       # entropy, if the host offers it
)
# Hot-plugged NICs need nothing more: Debian builds PCIe native (pciehp) and ACPI
# (acpiphp) hot-plug into the kernel, and a virtio-net device that appears on a root port
# binds to the virtio_net driver loaded at boot.
declare -A seen=()
order=()
add_module() { # $1 = module name; appends its dependencies, then itself
  local name=${1//-/_} path dep
  [ -n "${seen[$name]:-}" ] && return 0
  seen[$name]=1
  if grep -qE "/${name//_/[-_]}\.ko(\.[a-z]+)?\$" "$moddir/modules.builtin"; then return 0; fi
  path=$(awk -v n="$name" '{ f=$1; sub(":$","",f); b=f; sub(".*/","",b); sub("\\.ko.*","",b);
           gsub("-","_",b); if (b==n) { print $0; exit } }' "$moddir/modules.dep")
  [ -n "$path" ] || die "module $name is neither built in nor in modules.dep"
  for dep in ${path#*:}; do
    dep=${dep##*/}
    add_module "${dep%%.ko*}"
  done
  order+=("${path%%:*}")
}
for m in "${wanted[@]}"; do add_module "$m"; done

# 4. The initramfs: busybox for every command, busybox init reading our inittab, and the
#    guest's init script (tiny-init.sh) as its sysinit action.
root=$work/root
mkdir -p "$root"/{bin,sbin,etc/acpi/PWRF,lib/modules,proc,sys,dev,run,tmp,mnt/config,mnt/disk,root,www,usr/bin,usr/sbin,var/log}
cp "$busybox" "$root/bin/busybox"
for applet in $("$busybox" --list); do
  [ "$applet" = busybox ] || ln -sf busybox "$root/bin/$applet"
done
ln -sf bin/busybox "$root/init"
: >"$root/etc/modules.order"
for rel in "${order[@]}"; do
  cp "$moddir/$rel" "$root/lib/modules/"
  echo "${rel##*/}" >>"$root/etc/modules.order"
done
install -m 0755 "$init_script" "$root/etc/tiny-init.sh"
cat >"$root/etc/inittab" <<'EOF'
::sysinit:/etc/tiny-init.sh
::respawn:/bin/cttyhack /bin/sh -l
::ctrlaltdel:/bin/reboot
::shutdown:/bin/sh /etc/tiny-init.sh shutdown
EOF
cat >"$root/etc/acpid.conf" <<'EOF'
PWRF PWRF/00000080
EOF
cat >"$root/etc/acpi/PWRF/00000080" <<'EOF'
#!/bin/sh
echo "ferro-tiny: ACPI power button pressed, powering off" >/dev/console
exec poweroff
EOF
chmod 0755 "$root/etc/acpi/PWRF/00000080"
echo "root:x:0:0:root:/root:/bin/sh" >"$root/etc/passwd"
echo "root:x:0:" >"$root/etc/group"
(cd "$root" && find . | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) | gzip -1 >"$work/out/initramfs.cpio.gz"

# 5. The disk: ext4 made from a directory (no loop device, no mount, no root needed).
mkdir -p "$work/disk"
echo "ferro tiny disk, kernel $kver" >"$work/disk/ferro-tiny-disk"
mkfs.ext4 -q -F -L ferro-tiny -d "$work/disk" "$work/out/disk.raw" 64M >&2

echo "console=ttyS0 quiet panic=-1 mitigations=off cryptomgr.notests audit=0 nokaslr" >"$work/out/cmdline"

# 6. The BIOS-bootable disk, assembled from filesystem images made as files (mkfs.vfat,
#    mcopy and syslinux's mtools installer; mkfs.ext4 -d): no loop device, no mount.
mbr=/usr/lib/syslinux/mbr/mbr.bin
[ -f "$mbr" ] || die "$mbr not found (install syslinux-common)"
boot_mib=48 data_mib=64
mkfs.vfat -C -n FERRO-BOOT "$work/boot.img" $((boot_mib * 1024)) >&2
cat >"$work/syslinux.cfg" <<CFG
DEFAULT ferro
PROMPT 0
TIMEOUT 0
LABEL ferro
  LINUX /vmlinuz
  INITRD /initrd.gz
  APPEND $(cat "$work/out/cmdline")
CFG
mcopy -i "$work/boot.img" "$vmlinuz" ::/vmlinuz
mcopy -i "$work/boot.img" "$work/out/initramfs.cpio.gz" ::/initrd.gz
mcopy -i "$work/boot.img" "$work/syslinux.cfg" ::/syslinux.cfg
syslinux --install "$work/boot.img"
bios=$work/out/bios-disk.raw
truncate -s $((1 + boot_mib + data_mib))M "$bios"
sfdisk -q "$bios" >&2 <<PARTS
label: dos
start=1MiB, size=${boot_mib}MiB, type=c, bootable
start=$((1 + boot_mib))MiB, size=${data_mib}MiB, type=83
PARTS
dd if="$mbr" of="$bios" bs=440 count=1 conv=notrunc status=none
dd if="$work/boot.img" of="$bios" bs=1M seek=1 conv=notrunc,sparse status=none
dd if="$work/out/disk.raw" of="$bios" bs=1M seek=$((1 + boot_mib)) conv=notrunc,sparse status=none
touch "$work/out/complete"
rm -rf "$out"
mv "$work/out" "$out"
# Older builds (another kernel, an older script) are dead weight; keep only this one.
find "$cache" -mindepth 1 -maxdepth 1 -name 'tiny-*' ! -name "tiny-$kver-$key" -exec rm -rf {} +
log "built in $SECONDS s"
print_result
