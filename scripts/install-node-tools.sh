#!/usr/bin/env bash
# Installs the Node tools that tests run, each pinned by the package.json and
# package-lock.json of its folder, under the user's cache
# (${XDG_CACHE_HOME:-~/.cache}/reprise/node-tools/NAME-HASH), and prints the
# node_modules folder of each, one a line. Node and npm come from apt-get when
# missing (as root, or with sudo). Installing again is a no-op; a changed
# lock file installs beside the old one.
#
#   scripts/install-node-tools.sh [FOLDER...]
#
# With no FOLDER, every tool the tests use:
#   orchestrator/tests/fixtures/oidc-issuer     oauth2-mock-server (tests/oidc.rs)
#   orchestrator/tests/fixtures/oidc-provider   oidc-provider (tests/device_flow.rs)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
folders=("$@")
[ ${#folders[@]} -gt 0 ] || folders=(
  "$root/orchestrator/tests/fixtures/oidc-issuer"
  "$root/orchestrator/tests/fixtures/oidc-provider"
)

# The oldest Node every pinned tool runs on (oauth2-mock-server 7.2.1:
# ^18.12 || ^20 || ^22; oidc-provider 8.8.1 and its dependencies: >= 18),
# so Debian 12's own nodejs (18.20) will do.
min_major=18
min_minor=12

say() { echo "install-node-tools: $*" >&2; }

if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
  # Only what is missing: a Node from elsewhere (NodeSource's nodejs
  # provides npm and conflicts with Debian's npm package) stays as it is.
  want=()
  command -v node >/dev/null || want+=(nodejs)
  command -v npm >/dev/null || want+=(npm)
  sudo=
  if [ "$(id -u)" -ne 0 ]; then
    if ! sudo -n true 2>/dev/null; then
      say "${want[*]} missing and sudo needs a password; run scripts/setup.sh, or: sudo apt-get install ${want[*]}"
      exit 1
    fi
    sudo="sudo -n"
  fi
  say "installing ${want[*]} with apt-get"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -q >&2
  $sudo apt-get install -y -q --no-install-recommends "${want[@]}" >&2
fi

version="$(node --version)"
IFS=. read -r major minor _ <<<"${version#v}"
if [ "$major" -lt "$min_major" ] || { [ "$major" -eq "$min_major" ] && [ "$minor" -lt "$min_minor" ]; }; then
  say "node $version is too old: the pinned tools need $min_major.$min_minor or later"
  exit 1
fi

cache="${XDG_CACHE_HOME:-$HOME/.cache}/reprise/node-tools"
mkdir -p "$cache"
for folder in "${folders[@]}"; do
  folder="$(cd "$folder" && pwd)"
  for f in package.json package-lock.json; do
    [ -f "$folder/$f" ] || { say "$folder has no $f"; exit 1; }
  done
  hash="$(cat "$folder/package.json" "$folder/package-lock.json" | sha256sum | cut -c1-16)"
  dest="$cache/$(basename "$folder")-$hash"
  if [ ! -f "$dest/.installed" ]; then
    # One installer at a time (test binaries may start together).
    exec 9>"$cache/.lock"
    flock 9
    if [ ! -f "$dest/.installed" ]; then
      say "installing $(basename "$folder") into $dest"
      staging="$(mktemp -d "$cache/.staging.XXXXXX")"
      cp "$folder/package.json" "$folder/package-lock.json" "$staging/"
      # npm ci: exactly the lock file's versions, checked against its
      # integrity hashes; no install scripts run.
      if ! (cd "$staging" && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error >&2); then
        rm -rf "$staging"
        say "npm ci failed for $folder (is the npm registry reachable?)"
        exit 1
      fi
      touch "$staging/.installed"
      rm -rf "$dest"
      mv "$staging" "$dest"
    fi
    flock -u 9
  fi
  echo "$dest/node_modules"
done
