#!/usr/bin/env bash
# The test command: sets up the machine, builds the workspace and the base
# image (cached after the first time), then runs every test, VM tests too.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
cargo build --workspace --locked
./target/x86_64-unknown-linux-gnu/debug/reprise image build
cargo test --workspace --locked -- --test-threads=2
