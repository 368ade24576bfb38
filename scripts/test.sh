#!/usr/bin/env bash
# The test command: sets up the machine, builds the workspace and the base
# image (cached after the first time), then runs every test, VM tests too.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
# The bins and the tests in one build: building the tests turns on
# features of their dev-dependencies (proptest wants more of regex) in shared crates, so a
# plain `cargo build` first would make `cargo test` compile the workspace a
# second time (2.5 min in CI).
cargo build --workspace --locked --bins --tests
./target/x86_64-unknown-linux-gnu/debug/reprise image build
cargo test --workspace --locked -- --test-threads=2
