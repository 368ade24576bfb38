#!/bin/sh
# wordfreq [-n N] [FILE...]: the N most frequent words (default 10),
# case-folded, with their counts, most frequent first, ties alphabetical.
set -e
n=10
if [ "$1" = "-n" ]; then
	n=$2
	shift 2
fi
case $n in
	''|*[!0-9]*) echo "wordfreq: -n needs a number" >&2; exit 2 ;;
esac
cat "$@" |
	tr 'A-Z' 'a-z' |
	tr -cs 'a-z0-9' '\n' |
	grep -v '^$' |
	sort |
	uniq -c |
	sort -k1,1nr -k2,2 |
	head -n "$n" |
	awk '{ printf "%s %d\n", $2, $1 }'
