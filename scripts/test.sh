#!/usr/bin/env bash
# The test command: sets up the machine, builds the workspace and the base
# image (cached after the first time), then runs every test, VM tests too.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
# A fresh build holds about 2 GiB of target folder, and the tests several GiB
# of cached images, snapshots and saved guests: say so before starting rather
# than fail in the linker, as a CI machine with a full disk once did.
free_kib=$(df -Pk . | awk 'NR==2 {print $4}')
echo "test: $((free_kib / 1048576)) GiB free here"
if [ "$free_kib" -lt $((8 * 1048576)) ]; then
  echo "test: warning: under 8 GiB free; the build and the VM tests may run out of disk" >&2
fi
# A one-shot build gains nothing from incremental state, which is most of a
# debug target folder's size.
[ "${CI:-}" = true ] && export CARGO_INCREMENTAL=0
# The bins and the tests in one build: building the tests turns on
# features of their dev-dependencies (proptest wants more of regex) in shared crates, so a
# plain `cargo build` first would make `cargo test` compile the workspace a
# second time (2.5 min in CI).
cargo build --workspace --locked --bins --tests
./target/x86_64-unknown-linux-gnu/debug/reprise image build
# Every crate's tests but the system tests first. The system tests then
# run in two lanes at once: run.rs boots its VMs one at a time (its
# `vm_lock`) and the guests have one vCPU under TCG, so alone it leaves the
# second core idle for eleven minutes; the other system tests (the PyPI
# project, vm.rs, kill.rs, peer.rs, ...) take about as long together. cargo
# does not hold the build lock while tests run, so two `cargo test` of a
# built workspace run side by side. (Selected with -p, cargo resolves the
# features of this one package and compiles a few crates again, about 15 s;
# with --workspace, `--test login` would also pick the orchestrator's.) The
# system tests' lib is their harness and holds no tests of its own.
cargo test --workspace --locked --exclude reprise-system-tests -- --test-threads=2
rest=()
for f in tests/tests/*.rs; do
  name=$(basename "$f" .rs)
  [ "$name" = run ] || rest+=(--test "$name")
done
lane() {
  local tag=$1
  shift
  "$@" 2>&1 | sed -u "s/^/[$tag] /"
}
lane run cargo test -p reprise-system-tests --locked --test run -- --test-threads=2 &
run_lane=$!
lane rest cargo test -p reprise-system-tests --locked "${rest[@]}" -- --test-threads=2 &
rest_lane=$!
failed=0
wait "$run_lane" || failed=1
wait "$rest_lane" || failed=1
if [ "$failed" -ne 0 ]; then
  echo "test: a system test lane failed (its lines are tagged [run] or [rest] above)" >&2
  exit 1
fi
echo "test: done; $(du -sh target | cut -f1) in target, $(df -Ph . | awk 'NR==2 {print $4}') free"
