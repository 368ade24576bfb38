#!/usr/bin/env bash
# The main job, end to end: builds Reprise and the base image, makes a git
# repository of examples/hello, runs its tests for real in a VM, then runs
# again and replays the stored result without booting anything.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
cargo build --workspace --locked
reprise=$PWD/target/x86_64-unknown-linux-gnu/debug/reprise
"$reprise" image build

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export XDG_DATA_HOME=$work/data   # a store of its own, so the first run is real
cp -r examples/hello "$work/hello"
cd "$work/hello"
git init -q -b main
git add -A
git -c user.name=demo -c user.email=demo@example.com commit -q -m "hello"

echo "== first run: a real run in a fresh VM"
start=$(date +%s%N)
"$reprise" run
first=$(( ($(date +%s%N) - start) / 1000000 ))

echo
echo "== second run: the same key, replayed from the local store"
start=$(date +%s%N)
"$reprise" run
second=$(( ($(date +%s%N) - start) / 1000000 ))

echo
echo "== the key and its inputs"
"$reprise" key --explain
echo
echo "real run: ${first} ms, replay: ${second} ms"
ls -l reprise-artifacts
