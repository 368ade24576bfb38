#!/bin/bash
# Usage: make-initrd.sh ROOTFS OUT_DIR
# Copies the kernel out of ROOTFS and makes a tiny initramfs from the guest's
# own busybox-static and the kernel modules needed to mount /dev/vda.
set -euo pipefail
root=$1
out=$2
kver=$(ls "$root/lib/modules" | sort -V | tail -n 1)
cp "$root/boot/vmlinuz-$kver" "$out/vmlinuz"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work"/{bin,dev,proc,sys,newroot,lib}
cp "$root/bin/busybox" "$work/bin/busybox"
cp "$(dirname "$0")/initrd-init" "$work/init"
chmod 0755 "$work/init"
# modprobe prints the modules in load order, dependencies first.
chroot "$root" modprobe --show-depends -S "$kver" -a virtio_pci virtio_blk crc32c_generic ext4 |
  awk '$1 == "insmod" { print $2 }' | awk '!seen[$0]++' > "$work/deps"
: > "$work/lib/modules.order"
while read -r ko; do
  name=$(basename "$ko")
  case $name in
    *.ko.xz) xz -dc "$root$ko" > "$work/lib/${name%.xz}"; name=${name%.xz} ;;
    *.ko.zst) zstd -qdc "$root$ko" > "$work/lib/${name%.zst}"; name=${name%.zst} ;;
    *) cp "$root$ko" "$work/lib/$name" ;;
  esac
  echo "$name" >> "$work/lib/modules.order"
done < "$work/deps"
(cd "$work" && find . -mindepth 1 | "$root/bin/busybox" cpio -o -H newc 2>/dev/null | gzip -1) > "$out/initrd.img"
