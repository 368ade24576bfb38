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
#   REPRISE_CREDENTIALS    the job's credentials file; when unset and the
#                          job has an OIDC token (GitHub Actions with
#                          `id-token: write`: ACTIONS_ID_TOKEN_REQUEST_URL;
#                          GitLab CI: REPRISE_ID_TOKEN from `id_tokens:`),
#                          `reprise login REPRISE_ORCHESTRATOR --ci` first
#                          exchanges it for a short-lived certificate
#   REPRISE_CA_FINGERPRINT the orchestrator CA's sha256 (hex), which that
#                          login trusts (or REPRISE_CA: the CA's PEM file)
#   REPRISE_AUDIENCE       the token's audience (default, by reprise login:
#                          reprise://REPRISE_ORCHESTRATOR)
#   REPRISE_TARGET         the mk target (default: test)
#   REPRISE_MODE           replay-or-run (default), replay-only, verify
#   REPRISE_SAMPLE         with verify: the fraction re-run (default 0.05)
#   REPRISE_VARS           counted variables, NAME=VALUE separated by spaces
#                          or newlines (a value holds neither)
#   REPRISE_REPORT         where to write the JSON summary (default:
#                          reprise-report.json)
#   REPRISE_DRIVER         qemu (default) or podman
#
# Exits with reprise's exit code (README: Exit codes); 2 when a setting is
# wrong, before anything runs.
#
#   sh ci.sh             log in if need be, then reprise run --ci
#   sh ci.sh executor    only print the executor's path (downloaded and
#                        checked if need be), for a caller that asks it
#                        something first (shims/github: the recipe hash)
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

case ${1:-} in
  '') ;;
  executor) executor; exit 0 ;;
  *) fail "unknown argument '$1' (none, or executor)" ;;
esac

bin=$(executor)
set -- run --ci --target "${REPRISE_TARGET:-test}" --mode "${REPRISE_MODE:-replay-or-run}" \
  --report "${REPRISE_REPORT:-reprise-report.json}"
case ${REPRISE_MODE:-replay-or-run} in
  verify) set -- "$@" --sample "${REPRISE_SAMPLE:-0.05}" ;;
esac
[ -z "${REPRISE_DRIVER:-}" ] || set -- "$@" --driver "$REPRISE_DRIVER"
# Split on blanks and newlines only: no pathname expansion of a value.
set -f
for var in ${REPRISE_VARS:-}; do
  case $var in
    *=*) set -- "$@" --env "$var" ;;
    *) fail "REPRISE_VARS: '$var' is not NAME=VALUE" ;;
  esac
done
set +f

# The job's OIDC token for a short-lived certificate, unless credentials
# were given. reprise login reads the token itself (never from its command
# line) and writes the certificate under $XDG_CONFIG_HOME/reprise/, where
# the run below finds it.
login() {
  set -- login "$REPRISE_ORCHESTRATOR" --ci
  if [ -n "${REPRISE_CA_FINGERPRINT:-}" ]; then
    set -- "$@" --ca-fingerprint "$REPRISE_CA_FINGERPRINT"
  elif [ -n "${REPRISE_CA:-}" ]; then
    set -- "$@" --ca "$REPRISE_CA"
  else
    fail "logging in to REPRISE_ORCHESTRATOR=$REPRISE_ORCHESTRATOR needs REPRISE_CA_FINGERPRINT (the sha256 of the orchestrator's CA) or REPRISE_CA"
  fi
  [ -z "${REPRISE_AUDIENCE:-}" ] || set -- "$@" --audience "$REPRISE_AUDIENCE"
  say "$bin $*"
  status=0
  "$bin" "$@" </dev/null || status=$?
  [ "$status" -eq 0 ] || { say "reprise login failed (exit $status)"; exit "$status"; }
}
if [ -z "${REPRISE_CREDENTIALS:-}" ] && [ -n "${REPRISE_ORCHESTRATOR:-}" ]; then
  if [ -n "${ACTIONS_ID_TOKEN_REQUEST_URL:-}" ] || [ -n "${REPRISE_ID_TOKEN:-}" ]; then
    login
  else
    say "no REPRISE_CREDENTIALS and no OIDC token to log in with (GitHub: permissions id-token: write; GitLab: id_tokens REPRISE_ID_TOKEN); using the credentials of the user's config, if any"
  fi
fi

say "$bin $*"
status=0
CI=true "$bin" "$@" || status=$?
exit "$status"
