#!/bin/sh
# The "test suite": checks that greet.sh greets, writes a report.
set -e
green=$(printf '\033[32m')
reset=$(printf '\033[0m')
out=$(sh ./greet.sh world)
[ "$out" = "hello, world" ] || { echo "FAIL: got '$out'" >&2; exit 1; }
echo "${green}ok${reset} greet.sh says: $out"
echo "note: this line goes to stderr" >&2
echo "greet: 1 passed, 0 failed" > report.txt
echo "1 passed, 0 failed"
