#!/bin/sh
# Reprise for any CI (Jenkins, Buildkite, a cron job): replays a result that
# counts for CI, or runs the tests here, per REPRISE_MODE. POSIX sh; run it
# from the repository's checkout. Settings, all from the environment:
#
#   REPRISE_BIN            an executor already on the machine, or else
#   REPRISE_URL            a release archive to download (https://, or
#                          file:// for a local mirror; scripts/release.sh
#                          makes one: reprise, reprise-guest, mk) and
#   REPRISE_SHA256         its sha256 (required with REPRISE_URL)
#   REPRISE_ORCHESTRATOR   HOST:PORT of the team's orchestrator
#   REPRISE_CREDENTIALS    the job's credentials file
#   REPRISE_TARGET         the mk target (default: test)
#   REPRISE_MODE           replay-or-run (default), replay-only, verify
#   REPRISE_SAMPLE         with verify: the fraction re-run (default 0.05)
#   REPRISE_VARS           counted variables, NAME=VALUE separated by spaces
#   REPRISE_REPORT         where to write the JSON summary (default:
#                          reprise-report.json)
#   REPRISE_DRIVER         qemu (default) or podman
#
# Exits with reprise's exit code (README: Exit codes); 2 when a setting is
# wrong, before anything runs.
set -eu

say() { printf 'reprise ci: %s\n' "$*" >&2; }
fail() { say "$*"; exit 2; }

cache=${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/reprise

executor() {
  if [ -n "${REPRISE_BIN:-}" ]; then
    [ -x "$REPRISE_BIN" ] || fail "REPRISE_BIN=$REPRISE_BIN is not an executable file"
    printf '%s\n' "$REPRISE_BIN"
    return
  fi
  [ -n "${REPRISE_URL:-}" ] || fail "set REPRISE_BIN (an executor on this machine) or REPRISE_URL and REPRISE_SHA256"
  [ -n "${REPRISE_SHA256:-}" ] || fail "REPRISE_URL needs REPRISE_SHA256: a downloaded executor is run only if its sha256 matches"
  case $REPRISE_SHA256 in
    *[!0-9a-f]*) fail "REPRISE_SHA256 is not 64 lowercase hex digits" ;;
  esac
  [ ${#REPRISE_SHA256} -eq 64 ] || fail "REPRISE_SHA256 is not 64 lowercase hex digits"
  dir=$cache/bin/$REPRISE_SHA256
  if [ ! -x "$dir/reprise" ]; then
    mkdir -p "$cache/bin"
    tmp=$(mktemp -d "$cache/bin/.download.XXXXXX")
    trap 'rm -rf "$tmp"' EXIT
    say "downloading the executor from $REPRISE_URL"
    curl --fail --silent --show-error --location --proto '=https,file' \
      --output "$tmp/release.tar.gz" "$REPRISE_URL" || { say "the download failed"; exit 3; }
    got=$(sha256sum "$tmp/release.tar.gz" | cut -d' ' -f1)
    if [ "$got" != "$REPRISE_SHA256" ]; then
      say "the download's sha256 is $got, not REPRISE_SHA256=$REPRISE_SHA256; not running it"
      exit 3
    fi
    mkdir "$tmp/bin"
    tar -xzf "$tmp/release.tar.gz" -C "$tmp/bin" --no-same-owner reprise reprise-guest mk ||
      { say "the release archive lacks reprise, reprise-guest or mk"; exit 3; }
    rm -rf "$dir"
    mv "$tmp/bin" "$dir"
    rm -rf "$tmp"
    trap - EXIT
  fi
  printf '%s\n' "$dir/reprise"
}

bin=$(executor)
set -- run --ci --target "${REPRISE_TARGET:-test}" --mode "${REPRISE_MODE:-replay-or-run}" \
  --report "${REPRISE_REPORT:-reprise-report.json}"
case ${REPRISE_MODE:-replay-or-run} in
  verify) set -- "$@" --sample "${REPRISE_SAMPLE:-0.05}" ;;
esac
[ -z "${REPRISE_DRIVER:-}" ] || set -- "$@" --driver "$REPRISE_DRIVER"
for var in ${REPRISE_VARS:-}; do
  case $var in
    *=*) set -- "$@" --env "$var" ;;
    *) fail "REPRISE_VARS: '$var' is not NAME=VALUE" ;;
  esac
done
say "$bin $*"
status=0
CI=true "$bin" "$@" || status=$?
exit "$status"
