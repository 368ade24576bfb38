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
cargo test --workspace --locked -- --test-threads=2
echo "test: done; $(du -sh target | cut -f1) in target, $(df -Ph . | awk 'NR==2 {print $4}') free"
