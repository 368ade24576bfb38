#!/bin/bash
# Usage: make-disk.sh ROOTFS DISK.raw SIZE
# Writes ROOTFS into a sparse ext4 disk file. mmdebstrap's hooks see /proc,
# /sys and /dev mounted inside ROOTFS; a non-recursive bind mount shows the
# tree without them, so their contents never reach the disk.
set -euo pipefail
root=$1
disk=$2
size=$3
view=$(mktemp -d)
mount --bind "$root" "$view"
trap 'umount "$view"; rmdir "$view"' EXIT
rm -f "$disk"
truncate -s "$size" "$disk"
mkfs.ext4 -q -F -L reprise-root -d "$view" "$disk"
