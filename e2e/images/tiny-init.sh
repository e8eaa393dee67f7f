#!/bin/sh
# Init of Ferro's tiny test guest (busybox init runs it as sysinit; see build-tiny.sh).
#
# What a test can rely on, all on the serial console (ttyS0):
#   ferro-tiny: hostname NAME                 from the config drive's meta_data.json
#   ferro-tiny: authorized-key NAME KEY       one line per public key of the config drive
#   FERRO-BOOT-COUNT N                        boots counted in /boot-count on the disk
#   FERRO-READY hostname=NAME boot-count=N nics=IF@MAC,... addrs=IF=ADDR/LEN,...
#   FERRO-ADDR IF ADDR/LEN                    each time DHCP binds an address
#   FERRO-NIC IF MAC                          a NIC is there: at boot (before the ready
#                                             marker), or hot-plugged later (seen within 0.5 s)
#   FERRO-NIC-GONE IF                         a NIC went away (hot-unplugged)
#   FERRO-DISK DEV SERIAL BYTES               a data disk (one with a serial) is there: at
#                                             boot, hot-plugged later, or grown (seen
#                                             within 0.5 s)
#   FERRO-DISK-GONE DEV                       a data disk went away (detached)
#   FERRO-POWEROFF                            on the way down (ACPI power button or poweroff)
# and on the network: ping; TCP port 7 answers "ferro-tiny HOSTNAME" then echoes; HTTP on
# port 80 serves the hostname. DHCP runs on every NIC in the background, on hot-plugged
# ones too, and never delays the ready marker. A user_data starting with "#!" runs (as cloud-init would) before the
# marker, with the disk mounted at /mnt/disk.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin

say() { echo "ferro-tiny: $*"; }

if [ "${1:-}" = shutdown ]; then
  echo "FERRO-POWEROFF"
  sync
  umount /mnt/disk 2>/dev/null
  exit 0
fi

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp

while read -r module; do
  insmod "/lib/modules/$module" 2>/dev/null || say "insmod $module failed"
done </etc/modules.order

# Flattens a JSON document into PATH=VALUE lines (strings, numbers, booleans; objects
# joined with "."; arrays by index), enough to read OpenStack metadata without jq.
json_flatten() {
  awk '
    BEGIN { RS = "\001" }
    {
      s = $0; n = length(s); depth = 0; i = 1
      while (i <= n) {
        c = substr(s, i, 1)
        if (c == "{" || c == "[") {
          depth++; kind[depth] = c; idx[depth] = 0; key[depth] = ""; expect[depth] = (c == "{") ? "key" : "value"
          i++
        } else if (c == "}" || c == "]") {
          depth--; i++
        } else if (c == ",") {
          if (kind[depth] == "[") idx[depth]++; else expect[depth] = "key"
          i++
        } else if (c == ":") {
          expect[depth] = "value"; i++
        } else if (c == "\"") {
          str = ""; i++
          while (i <= n) {
            c = substr(s, i, 1)
            if (c == "\\") { e = substr(s, i + 1, 1); if (e == "n") str = str "\n"; else if (e == "t") str = str "\t"; else str = str e; i += 2; continue }
            if (c == "\"") { i++; break }
            str = str c; i++
          }
          if (kind[depth] == "{" && expect[depth] == "key") key[depth] = str
          else emit(str)
        } else if (c ~ /[-0-9tfn]/) {
          tok = ""
          while (i <= n && substr(s, i, 1) ~ /[-+0-9.eEtruefalsn]/) { tok = tok substr(s, i, 1); i++ }
          emit(tok)
        } else i++
      }
    }
    function emit(v,   p, d) {
      p = ""
      for (d = 1; d <= depth; d++) p = p (d > 1 ? "." : "") (kind[d] == "[" ? idx[d] : key[d])
      print p "=" v
    }
  ' "$1"
}

# The config drive: an ISO 9660 filesystem labelled config-2.
meta=""
cfgdev=$(findfs LABEL=config-2 2>/dev/null || true)
if [ -n "$cfgdev" ] && mount -t iso9660 -o ro "$cfgdev" /mnt/config; then
  meta=/mnt/config/openstack/latest/meta_data.json
  say "config drive $cfgdev"
else
  say "no config drive"
fi

host=ferro-tiny
if [ -n "$meta" ] && [ -f "$meta" ]; then
  json_flatten "$meta" >/run/meta
  h=$(sed -n 's/^hostname=//p' /run/meta | head -n 1)
  [ -n "$h" ] || h=$(sed -n 's/^name=//p' /run/meta | head -n 1)
  [ -n "$h" ] && host=$h
  mkdir -p /root/.ssh
  sed -n 's/^public_keys\.\([^=]*\)=\(.*\)$/\1 \2/p' /run/meta | while read -r name value; do
    say "authorized-key $name $value"
    echo "$value" >>/root/.ssh/authorized_keys
  done
fi
hostname "$host"
say "hostname $host"

# The disk: the first virtio disk (or partition, on a BIOS-booted disk) that is not the
# config drive and mounts as ext4.
boots=0
for dev in /dev/vd[a-z] /dev/vd[a-z][0-9]; do
  [ -b "$dev" ] && [ "$dev" != "$cfgdev" ] || continue
  if mount -t ext4 "$dev" /mnt/disk 2>/dev/null; then
    boots=$(cat /mnt/disk/boot-count 2>/dev/null || echo 0)
    boots=$((boots + 1))
    echo "$boots" >/mnt/disk/boot-count
    echo "boot $boots hostname $host" >>/mnt/disk/boot-log
    sync
    say "disk $dev $(cat /mnt/disk/ferro-tiny-disk 2>/dev/null || echo '(no marker)')"
    break
  fi
done
echo "FERRO-BOOT-COUNT $boots"

# Networking: loopback, then DHCP on every NIC, in the background, retrying for ever.
ip link set lo up
cat >/run/udhcpc.script <<'EOF'
#!/bin/sh
case "$1" in
  bound|renew)
    prefix=${mask:-$(ipcalc -p "$ip" "$subnet" | sed 's/PREFIX=//')}
    ip addr flush dev "$interface"
    ip addr add "$ip/$prefix" dev "$interface"
    # Classless static routes (option 121), when given, include the default route.
    if [ -n "$staticroutes" ]; then
      set -- $staticroutes
      while [ $# -ge 2 ]; do ip route add "$1" via "$2" dev "$interface" 2>/dev/null; shift 2; done
    else
      for r in $router; do ip route add default via "$r" dev "$interface" 2>/dev/null; break; done
    fi
    : >/etc/resolv.conf
    for d in $dns; do echo "nameserver $d" >>/etc/resolv.conf; done
    echo "FERRO-ADDR $interface $ip/$prefix" >/dev/console
    ;;
  deconfig)
    ip addr flush dev "$interface"
    ;;
esac
EOF
chmod 0755 /run/udhcpc.script
# The NICs there are, as IF@MAC words: a NIC unplugged and another plugged under the
# same name in between two looks still counts as one gone and one new.
nic_list() {
  for path in /sys/class/net/*; do
    ifname=${path##*/}
    [ "$ifname" = lo ] || echo "$ifname@$(cat "$path/address" 2>/dev/null)"
  done
}
# A NIC appeared: link up, DHCP in the background, and say so.
nic_up() {
  ip link set "$1" up
  udhcpc -f -i "$1" -s /run/udhcpc.script -t 3 -T 1 -A 2 -O staticroutes -x hostname:"$host" >/dev/null 2>&1 &
  echo $! >"/run/udhcpc.$1.pid"
  echo "FERRO-NIC $1 $2"
}
# A NIC went away: its DHCP client goes too.
nic_gone() {
  [ -f "/run/udhcpc.$1.pid" ] && kill "$(cat "/run/udhcpc.$1.pid")" 2>/dev/null
  rm -f "/run/udhcpc.$1.pid"
  echo "FERRO-NIC-GONE $1"
}
# Hot-plug: no udev here, so look at /sys/class/net twice a second.
watch_nics() {
  known=" $* "
  while :; do
    sleep 0.5 2>/dev/null || sleep 1
    now=" $(nic_list | tr '\n' ' ') "
    for nic in $known; do
      case "$now" in *" $nic "*) ;; *) nic_gone "${nic%@*}" ;; esac
    done
    for nic in $now; do
      case "$known" in *" $nic "*) ;; *) nic_up "${nic%@*}" "${nic#*@}" ;; esac
    done
    known=$now
  done
}
# Data disks are those with a serial (the boot disk and the config drive have none), as
# DEV@SERIAL@BYTES words, so a grown disk counts as gone and new.
disk_list() {
  for path in /sys/block/vd*; do
    [ -e "$path" ] || continue
    serial=$(cat "$path/serial" 2>/dev/null)
    [ -n "$serial" ] || continue
    echo "${path##*/}@$serial@$(($(cat "$path/size") * 512))"
  done
}
watch_disks() {
  known=""
  while :; do
    now=" $(disk_list | tr '\n' ' ') "
    for disk in $known; do
      case "$now" in *" $disk "*) ;; *) echo "FERRO-DISK-GONE ${disk%%@*}" ;; esac
    done
    for disk in $now; do
      case " $known " in *" $disk "*) ;; *)
        rest=${disk#*@}
        echo "FERRO-DISK ${disk%%@*} ${rest%@*} ${rest#*@}" ;;
      esac
    done
    known=$now
    sleep 0.5 2>/dev/null || sleep 1
  done
}
watch_disks &

boot_nics=$(nic_list)
nics=""
for nic in $boot_nics; do
  nic_up "${nic%@*}" "${nic#*@}"
  nics="$nics${nics:+,}$nic"
done
# shellcheck disable=SC2086 # one word per NIC
watch_nics $boot_nics &

# The responders later network tests talk to.
mkdir -p /www
echo "$host" >/www/index.html
httpd -p 80 -h /www
cat >/run/tcp-responder <<'EOF'
#!/bin/sh
echo "ferro-tiny $(hostname)"
exec cat
EOF
chmod 0755 /run/tcp-responder
nc -ll -p 7 -e /run/tcp-responder >/dev/null 2>&1 &

# ACPI power button -> /etc/acpi/PWRF/00000080 -> poweroff.
acpid -c /etc/acpi -a /etc/acpid.conf -l /var/log/acpid.log

# User data, as cloud-init would run a script.
user_data=/mnt/config/openstack/latest/user_data
if [ -f "$user_data" ] && [ "$(head -c 2 "$user_data")" = "#!" ]; then
  cp "$user_data" /run/user-data
  chmod 0755 /run/user-data
  say "running user_data"
  timeout 60 /run/user-data 2>&1 | sed 's/^/user_data: /'
  sync
fi

addrs=$(ip -o -4 addr show | awk '$2 != "lo" { printf "%s%s=%s", sep, $2, $4; sep = "," }')
echo "FERRO-READY hostname=$host boot-count=$boots nics=${nics:--} addrs=${addrs:--}"
