#!/bin/bash
# SPDX-License-Identifier: Apache-2.0
# Live-helper benchmarks (README "Live helpers"): a zoom-in browsing trace with and without
# prefetch, and live latency behind a CPU-burning seed with seed_nice 0 and 10. Builds the
# daemon and bench/live into a temp dir, runs both REPS times (default 2), prints the figures
# and puts them into BENCHMARKS.md between the live-helpers markers (BENCH_OUT elsewhere).
# About 5 minutes; no root needed. Every daemon it starts is stopped by bench/live itself.
set -euo pipefail
cd "$(dirname "$0")/.."
REPS=${REPS:-2}
OUT=${BENCH_OUT:-BENCHMARKS.md}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
go build -o "$tmp/mapproxy-renderd" .
go build -o "$tmp/live" ./bench/live
res="$tmp/results.txt"
{
	echo "Run $(date -u +%Y-%m-%d), $(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')), load average $(cut -d' ' -f1-3 /proc/loadavg) at the start."
	for rep in $(seq "$REPS"); do
		echo
		echo "Repetition $rep:"
		echo
		timeout 600 "$tmp/live" zoom -daemon "$tmp/mapproxy-renderd" | sed 's/^/    /'
		echo
		timeout 600 "$tmp/live" nice -daemon "$tmp/mapproxy-renderd" | sed 's/^/    /'
	done
} | tee "$res"
begin='<!-- live-helpers:begin (bench/live.sh writes this part) -->'
end='<!-- live-helpers:end -->'
section="$tmp/section.md"
{
	echo "$begin"
	echo "## Live helpers (bench/live.sh)"
	echo
	cat bench/live/REPORT-INTRO.md
	echo
	cat "$res"
	echo "$end"
} > "$section"
touch "$OUT"
if grep -qF "$begin" "$OUT"; then
	awk -v b="$begin" -v e="$end" -v f="$section" '
		$0 == b { while ((getline l < f) > 0) print l; skip = 1; next }
		$0 == e { skip = 0; next }
		!skip { print }' "$OUT" > "$tmp/out.md"
	cp "$tmp/out.md" "$OUT"
else
	{ echo; cat "$section"; } >> "$OUT"
fi
echo "wrote the live-helpers section of $OUT"
