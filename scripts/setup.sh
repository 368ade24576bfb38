#!/usr/bin/env bash
# Installs what Reprise needs on a fresh Debian 12 machine (as root, or with
# sudo): qemu, the image build tools, podman for the host tests, and 9base
# (the reference mk the differential tests compare against).
set -euo pipefail
sudo=
[ "$(id -u)" -eq 0 ] || sudo=sudo
packages=(
  qemu-system-x86 qemu-utils      # the VM and its disks
  mmdebstrap e2fsprogs kmod       # building the base image, data disks, debugfs
  podman runc crun uidmap         # host podman for the mk container test and benches
  9base busybox-static            # reference mk; a static shell for container tests
  git ca-certificates
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f '${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -q
  $sudo apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
