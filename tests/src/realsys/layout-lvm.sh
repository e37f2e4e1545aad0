# RHEL's default layout, as Anaconda makes it: GPT, the ESP, /boot on XFS, a PV holding VG rhel
# with LVs root (XFS) and swap; fstab by /dev/mapper names and UUIDs; rd.lvm.lv= on the kernel
# command line. Sourced by build.sh (variant rhel). The build host may have no device-mapper:
# the LVs' filesystems are made on loop devices over their extents, lvm2 never activates them.
: "${BOOT_UUID:?}" "${SWAP_UUID:?}" "${PV_UUID:?}"
boot_start=206848
boot_sectors=$((320 * 2048)) # mkfs.xfs's minimum is 300 MiB
pv_start=$((boot_start + boot_sectors))

lay_fstab() {
  cat >"$R/etc/fstab" <<X
#
# /etc/fstab
# Created by anaconda
#
/dev/mapper/rhel-root   /                       xfs     defaults        0 0
UUID=$BOOT_UUID /boot                   xfs     defaults        0 0
UUID=$ESP_VOLID          /boot/efi               vfat    umask=0077,shortname=winnt 0 2
/dev/mapper/rhel-swap   none                    swap    defaults        0 0
X
}

lay_grub_cfg() {
  sed -i 's|^GRUB_CMDLINE_LINUX=.*|GRUB_CMDLINE_LINUX="console=ttyS0,115200n8 resume=/dev/mapper/rhel-swap rd.lvm.lv=rhel/root rd.lvm.lv=rhel/swap"|' \
    "$R/etc/default/grub"
  cat >"$R/boot/grub/grub.cfg" <<X
# first boot only: the prepare boot replaces this with update-grub's
set default=0
set timeout=0
menuentry 'Debian GNU/Linux (first boot)' {
	search --no-floppy --fs-uuid --set=root $BOOT_UUID
	linux /vmlinuz-$kver root=/dev/mapper/rhel-root ro rd.lvm.lv=rhel/root console=ttyS0,115200n8
	initrd /initrd.img-$kver
}
X
}

# lvm2 on the PV's loop device only: no devices file, udev, backups or activation
lvmc() {
  lvm "$@" --devices "$pvlo" --config 'devices { use_devicesfile = 0 obtain_device_list_from_udev = 0 }
    activation { udev_sync = 0 udev_rules = 0 } backup { backup = 0 archive = 0 }
    global { activation = 0 }'
}

# copy_into DEV: mounts DEV and copies the tree from stdin's tar into it
copy_into() {
  local m="$WORK/mnt"
  mkdir -p "$m"
  mount "$1" "$m"
  mounts+=("$m")
  tar -xpf - -C "$m" --numeric-owner --xattrs --acls
  umount "$m"
  unset 'mounts[${#mounts[@]}-1]'
}

# the byte offset and length of LV $1's one linear segment in the image
lv_range() {
  local pe_start ranges first last extent=$((4 << 20))
  pe_start=$(lvmc pvs --noheadings --units b --nosuffix -o pe_start "$pvlo" | tr -d ' ')
  ranges=$(lvmc lvs --noheadings -o seg_pe_ranges "rhel/$1" | tr -d ' ')
  case "$ranges" in *" "*|"") echo "rhel/$1: unexpected segments '$ranges'" >&2; exit 1 ;; esac
  first=${ranges##*:}; last=${first#*-}; first=${first%-*}
  echo $((pv_start * 512 + pe_start + first * extent)) $(((last - first + 1) * extent))
}

lay_disk() {
  local pv_sectors=$((sectors - 2048 - pv_start))
  nparts=3
  attach $((boot_start * 512)) $((boot_sectors * 512))
  mkfs.xfs -q -f -L boot -m uuid="$BOOT_UUID" "$lo"
  (cd "$R/boot" && tar -cf - --xattrs --acls .) | copy_into "$lo"

  attach $((pv_start * 512)) $((pv_sectors * 512))
  pvlo=$lo
  lvmc pvcreate -q -ff -y --uuid "$PV_UUID" --norestorefile "$pvlo"
  lvmc vgcreate -q -s 4m rhel "$pvlo"
  lvmc lvcreate -q -an -Zn -Wn -y -L 128m -n swap rhel
  lvmc lvcreate -q -an -Zn -Wn -y -l 100%FREE -n root rhel
  # shellcheck disable=SC2046
  attach $(lv_range swap)
  mkswap -q -L swap -U "$SWAP_UUID" "$lo"
  # shellcheck disable=SC2046
  attach $(lv_range root)
  mkfs.xfs -q -f -L root -m uuid="$ROOT_UUID" "$lo"
  (cd "$R" && tar -cf - --xattrs --acls --exclude='./boot/*' --exclude='./boot/.*' .) | copy_into "$lo"
  mkdir -p "$WORK/mnt" && mount "$lo" "$WORK/mnt" && mkdir -p "$WORK/mnt/boot/efi" && umount "$WORK/mnt"
  lvmc vgs -o vg_name,pv_count,lv_count,vg_size,vg_free rhel
  lvmc lvs -o lv_name,lv_size,seg_pe_ranges rhel
  cleanup; mounts=() loops=()

  make_esp "$BOOT_UUID" /grub
  sgdisk -U "$DISK_GUID" \
    -n 1:2048:206847 -t 1:EF00 -c 1:"EFI System Partition" -u 1:"${DISK_GUID:0:19}9000-000000000001" \
    -n 2:$boot_start:$((pv_start - 1)) -t 2:8300 -u 2:"${DISK_GUID:0:19}9000-000000000002" \
    -n 3:$pv_start:$((sectors - 2049)) -t 3:8E00 -u 3:"${DISK_GUID:0:19}9000-000000000003" "$img" >/dev/null
}
