#!/usr/bin/env bash
# The main job, end to end, on examples/hello:
#   1. a team orchestrator on loopback (mTLS, certificates made by its init);
#   2. executor A runs the tests for real in a fresh VM, then stays connected
#      serving its result;
#   3. A runs again: the same key, replayed from its local store;
#   4. executor B, on another clone with its own store, replays A's result
#      through the orchestrator without booting anything;
#   5. a CI job (shims/ci.sh, CI mode) passes by replaying it, with a summary
#      saying who produced it and why it counts.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
./scripts/setup.sh
cargo build --workspace --locked
bin=$PWD/target/x86_64-unknown-linux-gnu/debug
"$bin/reprise" image build

work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
ms() { echo $(( ($(date +%s%N) - $1) / 1000000 )); }

cp -r examples/hello "$work/a"
cd "$work/a"
git init -q -b main
git add -A
git -c user.name=demo -c user.email=demo@example.com commit -q -m "hello"
git clone -q "$work/a" "$work/b"
namespace=$(XDG_DATA_HOME=$work/data-a "$bin/reprise" key --json |
  sed -n 's/.*"namespace": "\(.*\)".*/\1/p')

echo "== orchestrator: a team CA, two executors' credentials, serving on loopback"
"$bin/reprise-orchestrator" init --dir "$work/orch"
"$bin/reprise-orchestrator" issue --dir "$work/orch" --name alice --repo "$namespace" --trusted --out "$work/alice.pem"
"$bin/reprise-orchestrator" issue --dir "$work/orch" --name ci --repo "$namespace" --out "$work/ci.pem"
port=$(( 20000 + RANDOM % 20000 ))
"$bin/reprise-orchestrator" serve --dir "$work/orch" --listen "127.0.0.1:$port" 2>"$work/orch.log" &
pids+=($!)
export REPRISE_ORCHESTRATOR=127.0.0.1:$port

echo
echo "== executor A: a real run in a fresh VM, then connected mode"
start=$(date +%s%N)
# A is a developer's machine, not a CI job: with CI=true (the demo run
# inside a CI job) it would return at once instead of serving.
env -u CI XDG_DATA_HOME=$work/data-a REPRISE_CREDENTIALS=$work/alice.pem "$bin/reprise" run \
  > >(tee "$work/a.out") 2> >(tee "$work/a.err" >&2) &
pids+=($!)
until grep -q "serving .* to peers" "$work/a.err" 2>/dev/null; do
  kill -0 "${pids[-1]}" 2>/dev/null || { echo "executor A stopped"; exit 1; }
  sleep 1
done
first=$(ms "$start")

echo
echo "== executor A again: the same key, replayed from its local store"
start=$(date +%s%N)
XDG_DATA_HOME=$work/data-a REPRISE_CREDENTIALS=$work/alice.pem "$bin/reprise" run --no-serve
local_replay=$(ms "$start")

echo
echo "== executor B, another clone and store: replayed through the orchestrator"
cd "$work/b"
start=$(date +%s%N)
XDG_DATA_HOME=$work/data-b REPRISE_CREDENTIALS=$work/ci.pem "$bin/reprise" run --no-serve
peer_replay=$(ms "$start")
cmp "$work/a/reprise-artifacts/report.txt" "$work/b/reprise-artifacts/report.txt"

echo
echo "== a CI job (shims/ci.sh): passes by replaying A's result, and says why it counts"
git clone -q "$work/a" "$work/c"
cd "$work/c"
start=$(date +%s%N)
XDG_DATA_HOME=$work/data-c REPRISE_CREDENTIALS=$work/ci.pem REPRISE_BIN=$bin/reprise \
  REPRISE_REPORT=$work/ci-report.json sh "$root/shims/ci.sh" 2>&1 | tee "$work/ci.err"
ci_replay=$(ms "$start")
grep -q '"how": "replayed"' "$work/ci-report.json" || { echo "the CI job did not replay"; exit 1; }
cd "$work/b"

echo
echo "== the key and its inputs"
XDG_DATA_HOME=$work/data-b "$bin/reprise" key --explain
echo
echo "real run (A, until serving): ${first} ms; local replay (A): ${local_replay} ms; replay through the orchestrator (B): ${peer_replay} ms; CI job by replay (C): ${ci_replay} ms"
kill -INT "${pids[1]}" 2>/dev/null || true
