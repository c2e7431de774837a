#!/bin/bash
# SPDX-License-Identifier: Apache-2.0
# Trace benchmark (docs/design.md §18): simulated users browsing through real MapProxy with the
# MapProxy-side module (views on) and a slow upstream, for no prefetch, today's modes and
# views-driven prefetch at budgets 0.25 / 0.5 / 1.0; then bench/live's seed_nice run (live
# latency behind a seed whose renders burn CPU). Builds into a temp dir, prints the figures,
# writes the plot docs/trace-prefetch.svg and puts the section into BENCHMARKS.md between the
# trace markers (BENCH_OUT elsewhere). About 10 minutes on a quiet 2-CPU machine; no root.
# Needs Debian's python3-mapproxy and python3-matplotlib.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${BENCH_OUT:-BENCHMARKS.md}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
go build -o "$tmp/mapproxy-renderd" .
go build -o "$tmp/trace" ./bench/trace
go build -o "$tmp/live" ./bench/live
res="$tmp/results.txt"
{
	echo "Run $(date -u '+%Y-%m-%d %H:%M') UTC, $(nproc) CPUs, load average $(cut -d' ' -f1-3 /proc/loadavg) at the start."
	echo
	timeout 1800 "$tmp/trace" -daemon "$tmp/mapproxy-renderd" -json "$tmp/trace.json" | sed 's/^/    /'
	echo
	timeout 600 "$tmp/live" nice -daemon "$tmp/mapproxy-renderd" | sed 's/^/    /'
	echo
	echo "Load average $(cut -d' ' -f1-3 /proc/loadavg) at the end."
} | tee "$res"
/usr/bin/python3 bench/trace/plot.py "$tmp/trace.json" docs/trace-prefetch.svg
begin='<!-- trace:begin (bench/trace.sh writes this part) -->'
end='<!-- trace:end -->'
section="$tmp/section.md"
{
	echo "$begin"
	echo "## Prefetch from views: the browsing trace (bench/trace.sh)"
	echo
	cat bench/trace/REPORT-INTRO.md
	echo
	cat "$res"
	echo
	echo '![z+1 tiles ready against renders](docs/trace-prefetch.svg)'
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
echo "wrote the trace section of $OUT and docs/trace-prefetch.svg"
