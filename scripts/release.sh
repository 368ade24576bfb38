#!/usr/bin/env bash
# Makes the release archive CI stubs download (shims/ci.sh, the GitHub
# action): reprise, reprise-guest and mk, static, in one .tar.gz, and
# prints its sha256 (what REPRISE_SHA256 pins).
#   scripts/release.sh [OUT.tar.gz]        builds --release first
#   PROFILE_DIR=target/.../debug scripts/release.sh OUT   packs existing binaries
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-target/reprise-$(git describe --always --dirty)-x86_64-linux.tar.gz}
dir=${PROFILE_DIR:-}
if [ -z "$dir" ]; then
  cargo build --release --locked -p reprise-executor -p reprise-guest -p reprise-mk
  dir=target/x86_64-unknown-linux-gnu/release
fi
for b in reprise reprise-guest mk; do
  [ -x "$dir/$b" ] || { echo "release: $dir/$b is missing" >&2; exit 1; }
done
tmp=$(mktemp "$out.XXXXXX")
trap 'rm -f "$tmp"' EXIT
# Same bytes for the same binaries: fixed owner, mode and time.
tar --owner=0 --group=0 --numeric-owner --mode=0755 --mtime=@0 \
  -C "$dir" -cf - reprise reprise-guest mk | gzip -n "-${GZIP_LEVEL:-9}" > "$tmp"
mv "$tmp" "$out"
trap - EXIT
sha256sum "$out" | cut -d' ' -f1
