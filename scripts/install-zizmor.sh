#!/usr/bin/env bash
# Installs zizmor (the GitHub Actions security linter, PyPI), pinned by
# version and by the sha256 of its Linux wheels, into a virtual environment
# under the user's cache (${XDG_CACHE_HOME:-~/.cache}/reprise/py-tools/
# zizmor-VERSION), and prints the path of its binary. python3 and its venv
# module come from apt-get when missing (as root, or with sudo). Installing
# again is a no-op.
#
#   scripts/install-zizmor.sh
#
# tests/tests/shims.rs runs it over shims/github/.
set -euo pipefail

version=1.32.0
# The wheels of zizmor 1.32.0 for Linux, from https://pypi.org/simple/zizmor/
# (pip refuses any other file; the sdist, which would need a Rust toolchain,
# is never tried: --only-binary).
hashes=(
  84a6acb975accc13408786a2bd274b572537ca19c933ebbc13e78f3988562071 # manylinux_2_28_x86_64
  dd818f99d833b86cd432d5412d620d936b5df074b33404fff8b67acff55d3259 # musllinux_1_2_x86_64
  0cdd38fca6eb34ceb567548548d706332e3535ea66894b9168c048e03207b68c # manylinux_2_24_aarch64
  d34dcfa702875202b4163d90ebb9cc5222f3d1a7d4b72bf796d87b5a15b24194 # musllinux_1_2_aarch64
  bddcdb0e37d1aa53c9f831c55627a5829d0d552cb0afb4b80fbe16a3a3140366 # manylinux_2_28_armv7l
  3f404b26791ed06a5ea9eaa0bfd5b973fc5228bac7db8b3c5ec7f0c7ad2ed16d # musllinux_1_2_armv7l
)

say() { echo "install-zizmor: $*" >&2; }

cache="${XDG_CACHE_HOME:-$HOME/.cache}/reprise/py-tools"
dest="$cache/zizmor-$version"
if [ -f "$dest/.installed" ]; then
  echo "$dest/bin/zizmor"
  exit 0
fi

apt_install() {
  local sudo=
  if [ "$(id -u)" -ne 0 ]; then
    if ! sudo -n true 2>/dev/null; then
      say "$* missing and sudo needs a password; run: sudo apt-get install $*"
      exit 1
    fi
    sudo="sudo -n"
  fi
  say "installing $* with apt-get"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -q >&2
  $sudo apt-get install -y -q --no-install-recommends "$@" >&2
}

# A python3 that can make a virtual environment with pip in it. Debian's
# python3 has the venv module only with python3-venv, which serves Debian's
# own /usr/bin/python3 (not one from pyenv or elsewhere).
python=python3
if ! command -v python3 >/dev/null || ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
  if ! /usr/bin/python3 -c 'import venv, ensurepip' 2>/dev/null; then
    apt_install python3 python3-venv
  fi
  python=/usr/bin/python3
fi

mkdir -p "$cache"
# One installer at a time (test binaries may start together). A venv is not
# relocatable (its scripts name its own path), so it is made in place,
# marked installed only when complete.
exec 9>"$cache/.lock"
flock 9
if [ ! -f "$dest/.installed" ]; then
  say "installing zizmor $version into $dest"
  rm -rf "$dest"
  "$python" -m venv "$dest" >&2
  requirements="$dest/requirements.txt"
  {
    printf 'zizmor==%s' "$version"
    for h in "${hashes[@]}"; do printf ' \\\n    --hash=sha256:%s' "$h"; done
    printf '\n'
  } >"$requirements"
  if ! "$dest/bin/python" -m pip install --quiet --disable-pip-version-check --no-input \
    --require-hashes --only-binary :all: --no-deps -r "$requirements" >&2; then
    rm -rf "$dest"
    say "pip could not install zizmor $version (is PyPI reachable? is this a Linux x86_64, aarch64 or armv7l machine?)"
    exit 1
  fi
  touch "$dest/.installed"
fi
flock -u 9
echo "$dest/bin/zizmor"
