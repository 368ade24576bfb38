#!/usr/bin/env bash
# Installs what Reprise needs on a fresh Debian 12 machine (as root, or with
# sudo): qemu and passt, the image build tools, podman for the host tests, and 9base
# (the reference mk the differential tests compare against).
set -euo pipefail
sudo=
[ "$(id -u)" -eq 0 ] || sudo=sudo
packages=(
  qemu-system-x86 qemu-utils      # the VM and its disks
  passt                           # the guest's user-mode network
  mmdebstrap e2fsprogs kmod       # building the base image, data disks, debugfs
  podman runc crun uidmap         # host podman for the mk container test and benches
  9base busybox-static            # reference mk; a static shell for container tests
  git ca-certificates curl        # curl: scripts/pypi-project.sh fetches from PyPI
  nodejs                          # the OIDC issuer of orchestrator/tests/oidc.rs and the
                                  # authorization server of tests/device_flow.rs; npm comes
                                  # with scripts/install-node-tools.sh (a NodeSource
                                  # nodejs holds npm and conflicts with Debian's package)
  chromium                        # headless, loads the orchestrator's dashboard in tests/tests/dashboard.rs
  rsync                           # gitlab-ci-local's shell executor (tests/tests/shims.rs)
  python3-venv                    # zizmor's venv (scripts/install-zizmor.sh)
  iptables                        # filters the direct path's ports in tests/tests/peer.rs
)
missing_packages() {
  for p in "${packages[@]}"; do
    dpkg-query -W -f '${Status}' "$p" 2>/dev/null | grep -q "ok installed" || echo "$p"
  done
}
# Twice: installing one package may remove another (a machine with a
# backported qemu-utils loses it to bookworm's qemu-system-x86), and the
# second pass puts back what the first one took away.
for pass in 1 2; do
  mapfile -t missing < <(missing_packages)
  [ ${#missing[@]} -eq 0 ] && break
  export DEBIAN_FRONTEND=noninteractive
  [ "$pass" = 1 ] && $sudo apt-get update -q
  $sudo apt-get install -y -q --no-install-recommends "${missing[@]}"
done
mapfile -t missing < <(missing_packages)
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: these packages could not be installed: ${missing[*]}" >&2
  exit 1
fi
