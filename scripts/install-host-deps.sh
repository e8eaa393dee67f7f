#!/usr/bin/env bash
# Installs the Debian packages Ferro needs on a host, only those missing. Idempotent.
set -euo pipefail

packages=(
  etcd-server etcd-client    # the store
  protobuf-compiler libprotobuf-dev # etcd-client's build needs protoc and the well-known protos (descriptor.proto), which are only a Recommends of protoc
  qemu-system-x86 qemu-utils # the hypervisor; qemu-system-x86's qemu-system-common has qemu-storage-daemon (NBD exports of volumes), qemu-utils has qemu-img and qemu-io
  genisoimage                # config drives
  busybox-static cpio xz-utils # the test guest's initramfs
  kmod e2fsprogs             # the test guest: depmod for its modules, mkfs.ext4 -d for its disk
  syslinux syslinux-common mtools dosfstools fdisk # the test guest's BIOS-bootable disk
  cloud-init                 # tests read our config drives with cloud-init's own reader
  openvswitch-switch dnsmasq-base nftables iproute2 ethtool
  python3-venv               # tests run README's grpcio snippet from a venv
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0

echo "installing host packages: ${missing[*]}"
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
