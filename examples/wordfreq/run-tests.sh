#!/bin/sh
# Runs every tests/NAME.args case: wordfreq with those arguments on
# tests/NAME.in must print tests/NAME.out and exit with tests/NAME.status
# (0 if absent). Writes test-report.txt; exits 1 if any case failed.
cd "$(dirname "$0")"
tool=${WORDFREQ_HOME:-.}/wordfreq
[ -x "$tool" ] || tool=./wordfreq.sh
pass=0
fail=0
: > test-report.txt
for args in tests/*.args; do
	name=$(basename "$args" .args)
	want_status=0
	[ -f "tests/$name.status" ] && want_status=$(cat "tests/$name.status")
	got=$("$tool" $(cat "$args") < "tests/$name.in" 2>/dev/null)
	status=$?
	if [ "$got" = "$(cat "tests/$name.out")" ] && [ "$status" = "$want_status" ]; then
		pass=$((pass + 1))
		printf '\033[32mPASS\033[0m %s\n' "$name"
		echo "PASS $name" >> test-report.txt
	else
		fail=$((fail + 1))
		printf '\033[31mFAIL\033[0m %s (status %s, want %s)\n' "$name" "$status" "$want_status" >&2
		echo "FAIL $name" >> test-report.txt
	fi
done
echo "$pass passed, $fail failed" | tee -a test-report.txt
[ "$fail" -eq 0 ]
