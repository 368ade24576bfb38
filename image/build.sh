#!/bin/bash
# Builds the Reprise guest image from Debian's package mirror.
#
# Usage: build.sh RECIPE_DIR OUT_DIR APT_CACHE_DIR
#
# Writes OUT_DIR/disk.qcow2 (ext4 root file system), OUT_DIR/vmlinuz and
# OUT_DIR/initrd.img (a busybox initramfs that loads the virtio and ext4
# modules). Lines starting with '::phase ' name the step under way; the
# caller shows them as progress. Everything the root file system needs is
# done in mmdebstrap hooks, so the same script works as root and, through
# mmdebstrap's unshare mode, as an ordinary user with user namespaces.
set -euo pipefail

recipe=$(realpath "$1")
out=$(realpath "$2")
mkdir -p "$2" "$3"
cache=$(realpath "$3")
mirror=${REPRISE_MIRROR:-http://deb.debian.org/debian}
suite=${REPRISE_SUITE:-bookworm}
size=${REPRISE_IMAGE_SIZE:-8G}

packages=$(grep -v '^#' "$recipe/packages" | grep . | paste -sd, -)
mkdir -p "$cache" "$out"

echo "::phase downloading and unpacking Debian $suite packages"
mmdebstrap --mode=auto --variant=minbase \
  --include="$packages" \
  --dpkgopt='path-exclude=/usr/share/doc/*' \
  --dpkgopt='path-include=/usr/share/doc/*/copyright' \
  --dpkgopt='path-exclude=/usr/share/man/*' \
  --dpkgopt='path-exclude=/usr/share/locale/*' \
  --dpkgopt='path-exclude=/usr/share/info/*' \
  --setup-hook='mkdir -p "$1"/var/cache/apt/archives/' \
  --setup-hook="sync-in $cache /var/cache/apt/archives/" \
  --customize-hook="sync-out /var/cache/apt/archives $cache" \
  --customize-hook='rm -f "$1"/var/cache/apt/archives/*.deb "$1"/var/lib/apt/lists/*_Packages' \
  --customize-hook="echo '::phase configuring the guest'" \
  --customize-hook="install -m 0755 $recipe/init \"\$1\"/sbin/reprise-init" \
  --customize-hook="install -m 0644 $recipe/containers.conf \"\$1\"/etc/containers/containers.conf" \
  --customize-hook="install -D -m 0644 $recipe/ci.mk \"\$1\"/usr/lib/reprise/ci.mk" \
  --customize-hook='mkdir -p "$1"/reprise && ln -sfn /reprise/repo "$1"/repo' \
  --customize-hook='echo reprise-guest > "$1"/etc/hostname' \
  --customize-hook='echo "/dev/vda / ext4 rw,noatime 0 1" > "$1"/etc/fstab' \
  --customize-hook='chroot "$1" passwd -d root >/dev/null' \
  --customize-hook="echo '::phase making the initramfs'" \
  --customize-hook="$recipe/make-initrd.sh \"\$1\" $out" \
  --customize-hook='rm -f "$1"/boot/initrd.img*' \
  --customize-hook="echo '::phase writing the root file system'" \
  --customize-hook="$recipe/make-disk.sh \"\$1\" $out/disk.raw $size" \
  "$suite" /dev/null "$mirror"

echo "::phase converting to qcow2"
qemu-img convert -f raw -O qcow2 "$out/disk.raw" "$out/disk.qcow2"
rm -f "$out/disk.raw"
echo "::phase done"
