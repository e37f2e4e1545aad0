#!/bin/bash
# Builds a real Debian 12 server as a raw disk image (run as root by tests/src/realsys/mod.rs,
# which passes the recipe in the environment). Everything is made under $WORK; the image is
# $WORK/disk.img. Mounts (only the chroot's /proc, /sys, /dev, apt cache) are undone on every exit.
set -euo pipefail
: "${VARIANT:?}" "${HOST:?}" "${WORK:?}" "${SIZE_MIB:?}" "${ROOT_UUID:?}" "${ESP_VOLID:?}"
: "${DISK_GUID:?}" "${MAC:?}" "${NIC:?}" "${MACHINE_ID:?}" "${DEBS:?}" "${MIRROR:?}" "${SUITE:?}"
: "${SCRIPTS:?}"
# A variant with its own disk layout brings it as $SCRIPTS/layout-<name>.sh, defining lay_fstab,
# lay_grub_cfg and lay_disk (this script's helpers and variables in scope).
layout=partitions
export LC_ALL=C.UTF-8 DEBIAN_FRONTEND=noninteractive DEBCONF_NONINTERACTIVE_SEEN=true
R="$WORK/root"
mounts=() loops=()
cleanup() {
  local i
  for ((i=${#mounts[@]}-1; i>=0; i--)); do umount -l "${mounts[$i]}" 2>/dev/null || true; done
  for i in "${loops[@]}"; do losetup -d "$i" 2>/dev/null || true; done
}
trap cleanup EXIT
bind() { mkdir -p "$R$2"; mount --bind "$1" "$R$2"; mounts+=("$R$2"); }
# attach OFFSET SIZE: a loop device over that byte range of $img, in $lo
attach() { lo=$(losetup --find --show --offset "$1" --sizelimit "$2" "$img"); loops+=("$lo"); }
in_root() { chroot "$R" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LC_ALL=C.UTF-8 \
  DEBIAN_FRONTEND=noninteractive DEBCONF_NONINTERACTIVE_SEEN=true "$@"; }
step() { echo "realsys-build: +${SECONDS}s $*"; }

case "$VARIANT" in
  itools) initrd=initramfs-tools; boot=uefi; net=ifupdown ;;
  dracut) initrd=dracut; boot=uefi; net=networkd ;;
  bios)   initrd=initramfs-tools; boot=bios; net=netplan ;;
  rhel)   initrd=dracut; boot=uefi; net=networkd; layout=lvm ;;
  *) echo "unknown variant $VARIANT" >&2; exit 2 ;;
esac
# shellcheck disable=SC1090
[ "$layout" = partitions ] || . "$SCRIPTS/layout-$layout.sh"

mkdir -p "$DEBS/debootstrap" "$DEBS/apt"
step "debootstrap $SUITE (minbase) from $MIRROR"
# one build at a time uses the shared package caches (debootstrap's and apt's locks are per tree)
flock "$DEBS/.lock" debootstrap --variant=minbase --cache-dir="$DEBS/debootstrap" \
  --include=systemd-sysv,udev,kmod,iproute2,procps,busybox,dbus,zstd,dosfstools,ca-certificates \
  "$SUITE" "$R" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 || { tail -40 "$WORK/debootstrap.log"; exit 1; }

step "configuring"
cat >"$R/etc/dpkg/dpkg.cfg.d/01-realsys-nodoc" <<'X'
path-exclude=/usr/share/doc/*
path-include=/usr/share/doc/*/copyright
path-exclude=/usr/share/man/*
path-exclude=/usr/share/info/*
path-exclude=/usr/share/locale/*
path-include=/usr/share/locale/locale.alias
path-exclude=/usr/share/lintian/*
X
printf 'APT::Install-Recommends "false";\nAPT::Install-Suggests "false";\n' >"$R/etc/apt/apt.conf.d/01-realsys"
printf 'deb %s %s main\n' "$MIRROR" "$SUITE" >"$R/etc/apt/sources.list"
printf '#!/bin/sh\nexit 101\n' >"$R/usr/sbin/policy-rc.d"; chmod 755 "$R/usr/sbin/policy-rc.d"
echo "$HOST" >"$R/etc/hostname"
printf '127.0.0.1\tlocalhost\n127.0.1.1\t%s\n::1\tlocalhost ip6-localhost ip6-loopback\n' "$HOST" >"$R/etc/hosts"
echo "$MACHINE_ID" >"$R/etc/machine-id"
printf 'nameserver 10.0.2.3\n' >"$R/etc/resolv.conf"

bind /proc /proc; bind /sys /sys; bind /dev /dev; bind /dev/pts /dev/pts
bind "$DEBS/apt" /var/cache/apt/archives

pkgs=(linux-image-amd64)
[ "$layout" = lvm ] && pkgs+=(lvm2 xfsprogs)
case "$initrd" in
  initramfs-tools) pkgs+=(initramfs-tools) ;;
  dracut)
    mkdir -p "$R/etc/dracut.conf.d"
    # generic while in the chroot (it sees the build host); the prepare boot turns hostonly on
    printf 'hostonly="no"\n' >"$R/etc/dracut.conf.d/50-realsys.conf"
    pkgs+=(dracut) ;;
esac
case "$boot" in
  uefi) pkgs+=(grub-efi-amd64 grub-efi-amd64-signed shim-signed) ;;
  bios)
    in_root debconf-set-selections <<'X'
grub-pc grub-pc/install_devices multiselect
grub-pc grub-pc/install_devices_empty boolean true
X
    pkgs+=(grub-pc) ;;
esac
case "$net" in
  ifupdown) pkgs+=(ifupdown) ;;
  netplan) pkgs+=(netplan.io) ;;
esac
step "apt-get install ${pkgs[*]}"
in_root apt-get update -qq >"$WORK/apt.log" 2>&1 || { tail -40 "$WORK/apt.log"; exit 1; }
flock "$DEBS/.lock" chroot "$R" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LC_ALL=C.UTF-8 \
  DEBIAN_FRONTEND=noninteractive DEBCONF_NONINTERACTIVE_SEEN=true \
  apt-get install -y -q "${pkgs[@]}" >>"$WORK/apt.log" 2>&1 || { tail -60 "$WORK/apt.log"; exit 1; }
kver=$(basename "$(ls -1 "$R"/lib/modules | sort -V | tail -1)")
step "kernel $kver"

step "system configuration"
echo 'root:bmr' | in_root chpasswd
mkdir -p "$R/etc/systemd/system/serial-getty@ttyS0.service.d"
cat >"$R/etc/systemd/system/serial-getty@ttyS0.service.d/autologin.conf" <<'X'
[Service]
ExecStart=
ExecStart=-/sbin/agetty --autologin root --keep-baud 115200,57600,38400,9600 %I $TERM
X
if [ "$layout" != partitions ]; then
  lay_fstab
  mkdir -p "$R/boot/efi"
  grub_terminal=console
elif [ "$boot" = uefi ]; then
  if [ "$VARIANT" = dracut ]; then
    printf '/dev/vda2\t/\text4\terrors=remount-ro\t0\t1\n/dev/vda1\t/boot/efi\tvfat\tumask=0077\t0\t1\n' >"$R/etc/fstab"
  else
    printf '# <file system> <mount point> <type> <options> <dump> <pass>\nUUID=%s\t/\text4\terrors=remount-ro\t0\t1\nUUID=%s\t/boot/efi\tvfat\tumask=0077\t0\t1\n' \
      "$ROOT_UUID" "$ESP_VOLID" >"$R/etc/fstab"
  fi
  mkdir -p "$R/boot/efi"
  grub_terminal=console
else
  printf '# <file system> <mount point> <type> <options> <dump> <pass>\nUUID=%s\t/\text4\terrors=remount-ro\t0\t1\n' "$ROOT_UUID" >"$R/etc/fstab"
  grub_terminal="serial console"
fi
sed -i -e 's/^GRUB_TIMEOUT=.*/GRUB_TIMEOUT=0/' \
  -e 's/^GRUB_CMDLINE_LINUX_DEFAULT=.*/GRUB_CMDLINE_LINUX_DEFAULT=""/' \
  -e 's/^GRUB_CMDLINE_LINUX=.*/GRUB_CMDLINE_LINUX="console=ttyS0,115200n8"/' "$R/etc/default/grub"
printf 'GRUB_TERMINAL="%s"\nGRUB_SERIAL_COMMAND="serial --unit=0 --speed=115200"\n' "$grub_terminal" >>"$R/etc/default/grub"

case "$net" in
  ifupdown)
    cat >"$R/etc/network/interfaces" <<X
# This file describes the network interfaces available on your system
# and how to activate them. For more information, see interfaces(5).

source /etc/network/interfaces.d/*

# The loopback network interface
auto lo
iface lo inet loopback

# The primary network interface
auto $NIC
iface $NIC inet static
	address 10.0.2.15/24
	gateway 10.0.2.2
	dns-nameservers 10.0.2.3
X
    ;;
  networkd)
    cat >"$R/etc/systemd/network/10-lan.network" <<X
[Match]
MACAddress=$MAC

[Network]
Address=10.0.2.15/24
Gateway=10.0.2.2
DNS=10.0.2.3
X
    in_root systemctl enable systemd-networkd.service systemd-networkd-wait-online.service ;;
  netplan)
    cat >"$R/etc/netplan/01-realsys.yaml" <<X
# written like an installer would: the NIC by its MAC, keeping its name
network:
  version: 2
  renderer: networkd
  ethernets:
    $NIC:
      match:
        macaddress: "$MAC"
      set-name: $NIC
      addresses: [10.0.2.15/24]
      routes:
        - to: default
          via: 10.0.2.2
      nameservers:
        addresses: [10.0.2.3]
X
    chmod 600 "$R/etc/netplan/01-realsys.yaml"
    in_root systemctl enable systemd-networkd.service systemd-networkd-wait-online.service ;;
esac

mkdir -p "$R/srv/www" "$R/var/lib/realsys"
printf '<!doctype html>\n<html><body><h1>realsys host=%s</h1><p>Debian 12 (%s, %s)</p></body></html>\n' \
  "$HOST" "$VARIANT" "$initrd" >"$R/srv/www/index.html"
echo "$VARIANT" >"$R/var/lib/realsys/variant"
install -m 755 "$SCRIPTS/realsys-prepare" "$R/usr/local/sbin/realsys-prepare"
install -m 755 "$SCRIPTS/realsys-marker" "$R/usr/local/sbin/realsys-marker"
cat >"$R/etc/systemd/system/realsys-web.service" <<'X'
[Unit]
Description=realsys web page (busybox httpd on port 80)
After=network.target

[Service]
ExecStart=/bin/busybox httpd -f -p 80 -h /srv/www
Restart=on-failure

[Install]
WantedBy=multi-user.target
X
cat >"$R/etc/systemd/system/realsys-marker.service" <<'X'
[Unit]
Description=realsys marker on the serial console once the system is up
Wants=network-online.target
After=network-online.target
ConditionPathExists=/var/lib/realsys/prepared

[Service]
# simple, not oneshot: the script waits for the boot to finish, which includes this unit
Type=simple
ExecStart=/usr/local/sbin/realsys-marker

[Install]
WantedBy=multi-user.target
X
cat >"$R/etc/systemd/system/realsys-prepare.service" <<'X'
[Unit]
Description=realsys: make the initramfs (and boot loader) on the source hardware, then power off
ConditionPathExists=!/var/lib/realsys/prepared
After=local-fs.target systemd-udev-trigger.service
Before=getty.target serial-getty@ttyS0.service

[Service]
Type=oneshot
ExecStart=/usr/local/sbin/realsys-prepare
StandardOutput=journal+console
StandardError=journal+console
TimeoutStartSec=infinity

[Install]
WantedBy=multi-user.target
X
in_root systemctl enable realsys-web.service realsys-marker.service realsys-prepare.service

step "boot loader configuration"
if [ "$layout" != partitions ]; then
  lay_grub_cfg
elif [ "$boot" = uefi ]; then
  cat >"$R/boot/grub/grub.cfg" <<X
# first boot only: the prepare boot replaces this with update-grub's
set default=0
set timeout=0
menuentry 'Debian GNU/Linux (first boot)' {
	search --no-floppy --fs-uuid --set=root $ROOT_UUID
	linux /boot/vmlinuz-$kver root=UUID=$ROOT_UUID ro console=ttyS0,115200n8
	initrd /boot/initrd.img-$kver
}
X
fi
cp "$R/boot/vmlinuz-$kver" "$WORK/vmlinuz"
cp "$R/boot/initrd.img-$kver" "$WORK/initrd.img"
echo "$kver" >"$WORK/kver"

step "cleaning"
rm -f "$R/usr/sbin/policy-rc.d"
in_root apt-get clean
cleanup; mounts=()
rm -rf "$R"/usr/share/doc/*/[!c]* "$R"/usr/share/man/* "$R"/usr/share/info/* "$R"/var/lib/apt/lists/* \
  "$R"/var/log/*.log "$R"/var/log/apt/* "$R"/var/cache/debconf/*-old "$R"/tmp/* "$R"/var/tmp/*
find "$R/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} +
du -sm "$R" | awk '{print "realsys-build: root tree " $1 " MiB"}'

# The FAT32 ESP at 1 MiB of $img: shim, GRUB, and GRUB's stub config that finds filesystem $1
# (GPT partition 2 as a hint) and its config directory $2 there.
make_esp() {
  local esp="$WORK/esp.img"
  rm -f "$esp"
  mkfs.vfat -F 32 -S 512 -s 1 -n ESP -i "${ESP_VOLID/-/}" -C "$esp" $((100 * 1024)) >/dev/null
  mmd -i "$esp" ::/EFI ::/EFI/debian ::/EFI/BOOT
  mcopy -i "$esp" "$R/usr/lib/shim/shimx64.efi.signed" ::/EFI/debian/shimx64.efi
  mcopy -i "$esp" "$R/usr/lib/shim/mmx64.efi.signed" ::/EFI/debian/mmx64.efi
  mcopy -i "$esp" "$R/usr/lib/shim/BOOTX64.CSV" ::/EFI/debian/BOOTX64.CSV
  mcopy -i "$esp" "$R/usr/lib/grub/x86_64-efi-signed/grubx64.efi.signed" ::/EFI/debian/grubx64.efi
  printf "search.fs_uuid %s root hd0,gpt2\nset prefix=(\$root)'%s'\nconfigfile \$prefix/grub.cfg\n" \
    "$1" "$2" >"$WORK/grub-stub.cfg"
  mcopy -i "$esp" "$WORK/grub-stub.cfg" ::/EFI/debian/grub.cfg
  mcopy -i "$esp" "$R/usr/lib/shim/shimx64.efi.signed" ::/EFI/BOOT/BOOTX64.EFI
  mcopy -i "$esp" "$R/usr/lib/shim/mmx64.efi.signed" ::/EFI/BOOT/mmx64.efi
  mcopy -i "$esp" "$R/usr/lib/grub/x86_64-efi-signed/grubx64.efi.signed" ::/EFI/BOOT/grubx64.efi
  dd if="$esp" of="$img" bs=1M seek=1 conv=notrunc,sparse status=none
  rm -f "$esp"
}

step "disk image"
img="$WORK/disk.img"
sectors=$((SIZE_MIB * 2048))
rm -f "$img"
truncate -s "${SIZE_MIB}M" "$img"
nparts=2
if [ "$layout" != partitions ]; then
  lay_disk
else
  if [ "$boot" = uefi ]; then root_start=206848; else root_start=4096; fi
  root_sectors=$((sectors - 2048 - root_start))
  # the filesystems first: mke2fs wipes every signature it finds on the file, a GPT's included
  mkfs.ext4 -q -F -L root -U "$ROOT_UUID" -E "offset=$((root_start * 512)),hash_seed=$ROOT_UUID" \
    -d "$R" "$img" $((root_sectors / 2))k
  if [ "$boot" = uefi ]; then
    make_esp "$ROOT_UUID" /boot/grub
    sgdisk -U "$DISK_GUID" \
      -n 1:2048:206847 -t 1:EF00 -c 1:"EFI System Partition" -u 1:"${DISK_GUID:0:19}9000-000000000001" \
      -n 2:$root_start:$((sectors - 2049)) -t 2:8304 -c 2:root -u 2:"${DISK_GUID:0:19}9000-000000000002" "$img" >/dev/null
  else
    sgdisk -U "$DISK_GUID" \
      -n 1:2048:4095 -t 1:EF02 -c 1:"BIOS boot" -u 1:"${DISK_GUID:0:19}9000-000000000001" \
      -n 2:$root_start:$((sectors - 2049)) -t 2:8304 -c 2:root -u 2:"${DISK_GUID:0:19}9000-000000000002" "$img" >/dev/null
  fi
fi
sgdisk -v "$img" | grep -q "No problems found" || { sgdisk -v "$img"; exit 1; }
[ "$(sgdisk -p "$img" | grep -cE "^ +[0-9]+ ")" = "$nparts" ] || { echo "the partition table was not written"; exit 1; }
step "image done: $(du -m "$img" | cut -f1) MiB allocated of $SIZE_MIB MiB"
