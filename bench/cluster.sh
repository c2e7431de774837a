#!/bin/bash
# SPDX-License-Identifier: Apache-2.0
# bench/cluster.sh — several mapproxy-renderd daemons behind HAProxy (docs/design.md §15,
# examples/cluster): renders/s with 50 ms renders for 1, 2 and 3 daemons × 4 renderers,
# a seed task spread over 3 daemons by cluster: against one that renders its own, and the
# latency HAProxy adds per request. Writes the section "Several daemons behind
# HAProxy" at the end of BENCHMARKS.md (replacing an earlier one; bench/run.sh keeps it).
#
# Everything runs on this machine on loopback: the daemons (bench/renderer as their
# renderer), HAProxy with examples/cluster/haproxy.cfg (addresses changed, logging off),
# and bench/clusterload, which POSTs MapProxy 1.15's exact requests on a new connection
# each, as MapProxy does. Needs haproxy, socat, curl and Go; stops every process it started
# by PID. Nothing but BENCHMARKS.md is written into the repository.
#
# Environment:
#   REPS=3            repetitions (the report shows the median and min–max)
#   DURATION=10s      length of each throughput run
#   SEED_N=1200       metatiles of the seed task
#   BENCH_OUT=FILE    the report to update (default: <repo>/BENCHMARKS.md)
#   BENCH_KEEP=1      keep the temp dir (configs, logs, raw results)
set -euo pipefail

REPS=${REPS:-3}
DURATION=${DURATION:-10s}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${BENCH_OUT:-$ROOT/BENCHMARKS.md}
export PATH="$PATH:/usr/local/go/bin"
SECONDS=0
log() { printf '[%4ds] %s\n' "$SECONDS" "$*" >&2; }

for tool in haproxy socat curl go; do
	command -v "$tool" >/dev/null || { echo "bench/cluster.sh: $tool is missing (apt-get install haproxy socat curl)" >&2; exit 1; }
done

BASE=$(mktemp -d /tmp/mr-cluster-bench.XXXXXX)
BIN=$BASE/bin
RESULTS=$BASE/results.jsonl
: >"$RESULTS"
PIDS=()

stop_pid() { # stop_pid PID: SIGTERM, wait up to 15 s, then SIGKILL
	local pid=$1 i
	kill -TERM "$pid" 2>/dev/null || return 0
	for ((i = 0; i < 150; i++)); do
		kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
		sleep 0.1
	done
	kill -KILL "$pid" 2>/dev/null || true
	wait "$pid" 2>/dev/null || true
}

stop_all() {
	local pid
	for pid in "${PIDS[@]}"; do
		stop_pid "$pid"
	done
	PIDS=()
}

cleanup() {
	stop_all
	if [ "${BENCH_KEEP:-}" = 1 ]; then
		log "kept $BASE"
	else
		rm -rf "$BASE"
	fi
}
trap cleanup EXIT

free_port() {
	/usr/bin/python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# wait_until DESCRIPTION COMMAND…: poll every 0.1 s for at most 30 s.
wait_until() {
	local what=$1 i
	shift
	for ((i = 0; i < 300; i++)); do
		"$@" >/dev/null 2>&1 && return 0
		sleep 0.1
	done
	echo "bench/cluster.sh: timed out waiting for $what" >&2
	exit 1
}

log "building into $BIN"
mkdir -p "$BIN"
(cd "$ROOT" && go build -o "$BIN/mapproxy-renderd" . && go build -o "$BIN/renderer" ./bench/renderer &&
	go build -o "$BIN/clusterload" ./bench/clusterload)

# start_cluster N SLEEP [YAML]: N daemons (4 renderers each, renders taking SLEEP) and
# HAProxy in front of them; YAML is added to the first daemon's renderd.yaml (@FRONT@ stands
# for HAProxy's address). Sets DAEMONS (their addresses) and FRONT (HAProxy's).
start_cluster() {
	local n=$1 sleep=$2 extra=${3:-} i port cfg hcfg
	DAEMONS=()
	FRONT=127.0.0.1:$(free_port)
	for ((i = 1; i <= n; i++)); do
		port=$(free_port)
		cfg=$BASE/renderd-$i.yaml
		cat >"$cfg" <<EOF
socket: ""
http: 127.0.0.1:$port
renderers: 4
renderer_command: ["$BIN/renderer", "-sleep", "$sleep", "-meta", "0"]
log_level: warn
stop_timeout: 5s
EOF
		if ((i == 1)) && [ -n "$extra" ]; then
			printf '%s\n' "${extra//@FRONT@/$FRONT}" >>"$cfg"
		fi
		"$BIN/mapproxy-renderd" -c "$cfg" >>"$BASE/daemon-$i.log" 2>&1 &
		PIDS+=($!)
		DAEMONS+=("127.0.0.1:$port")
		wait_until "daemon $i" curl -sf "http://127.0.0.1:$port/healthz"
	done
	hcfg=$BASE/haproxy.cfg
	# The example with this machine's addresses, no logging, and only N servers.
	sed -e '/^    log \/dev\/log local0$/d' \
		-e "s#stats socket /run/haproxy/admin.sock#stats socket $BASE/haproxy.sock#" \
		-e "s#bind 127.0.0.1:8111#bind $FRONT#" \
		"$ROOT/examples/cluster/haproxy.cfg" >"$hcfg.in"
	awk -v list="${DAEMONS[*]}" 'BEGIN { n = split(list, addr, " ") }
		/^    server r[0-9] / { i = substr($2, 2) + 0; if (i > n) next; $3 = addr[i]; print "    " $0; next }
		{ print }' "$hcfg.in" >"$hcfg"
	haproxy -c -q -f "$hcfg"
	haproxy -db -f "$hcfg" >>"$BASE/haproxy.log" 2>&1 &
	PIDS+=($!)
	wait_until "HAProxy: $n servers up" bash -c "[ \"\$(echo 'show stat' | socat stdio UNIX-CONNECT:$BASE/haproxy.sock | grep -c '^renderers,r[0-9],.*,UP,')\" = $n ]"
}

SEED_N=${SEED_N:-1200}
printf 'seeds:\n  all: {caches: [bench]}\n' >"$BASE/seed.yaml"

START=0
measure() { # measure LABEL MODE URL ARGS…: one clusterload run, its line added to RESULTS
	local label=$1 mode=$2 url=$3
	shift 3
	"$BIN/clusterload" "$mode" -url "$url" -label "$label" -start "$START" "$@" | tee -a "$RESULTS" >&2
	START=$((START + 200000))
}

for ((rep = 1; rep <= REPS; rep++)); do
	for n in 1 2 3; do
		log "rep $rep: $n daemon(s) × 4 renderers, 50 ms renders, 64 in flight through HAProxy"
		start_cluster "$n" 50ms
		measure "throughput $n" closed "http://$FRONT/" -window 64 -duration "$DURATION" -warmup 100
		stop_all
	done
	for mode in local cluster; do
		if [ $mode = local ]; then n=1; else n=3; fi
		log "rep $rep: a seed task of $SEED_N metatiles started on daemon 1: $mode ($n daemon(s) × 4 renderers, 50 ms renders)"
		extra="seed_config: $BASE/seed.yaml
planner_command: [\"$BIN/clusterload\", \"plan\", \"-n\", \"$SEED_N\"]"
		if [ $mode = cluster ]; then
			extra="$extra
cluster: http://@FRONT@/"
		fi
		start_cluster "$n" 50ms "$extra"
		t0=$(date +%s.%N)
		"$BIN/mapproxy-renderd" seed --http "${DAEMONS[0]}" --wait all >"$BASE/seed-$mode-$rep.log" 2>&1 || log "the seed task failed (see seed-$mode-$rep.log)"
		t1=$(date +%s.%N)
		# The last line is the task's final state: "t1 all seed done 1200/1200 metatiles …".
		tail -1 "$BASE/seed-$mode-$rep.log" | awk -v m="$mode" -v a="$t0" -v b="$t1" '{
			split($5, c, "/"); ok = ($4 == "done") ? c[1] : 0
			printf "{\"label\":\"seed %s\",\"state\":\"%s\",\"completed\":%d,\"failed\":%d,\"per_s\":%.3f,\"seconds\":%.3f}\n", m, $4, ok, c[2] - ok, ok / (b - a), b - a }' |
			tee -a "$RESULTS" >&2
		stop_all
	done
	log "rep $rep: latency, one daemon, renders take no time, one request at a time"
	start_cluster 1 0s
	measure "direct" latency "http://${DAEMONS[0]}/" -n 2000 -warmup 200
	measure "haproxy" latency "http://$FRONT/" -n 2000 -warmup 200
	measure "direct" latency "http://${DAEMONS[0]}/" -n 2000 -warmup 200
	measure "haproxy" latency "http://$FRONT/" -n 2000 -warmup 200
	stop_all
done

log "writing the report section into $OUT"
HAPROXY_VERSION=$(haproxy -v | awk 'NR == 1 {print $3}')
/usr/bin/python3 - "$RESULTS" "$OUT" "$REPS" "$DURATION" "$HAPROXY_VERSION" "$(nproc)" "$SECONDS" "$SEED_N" <<'EOF'
import json, statistics, sys, datetime
results, out, reps, duration, hv, cpus, elapsed, seed_n = sys.argv[1:]
rows = [json.loads(l) for l in open(results) if l.strip()]
def vals(label, key):
    return [r[key] for r in rows if r["label"] == label]
def cell(v, fmt="{:,.0f}"):
    if not v:
        return "n/a"
    return (fmt + " (" + fmt + "–" + fmt + ")").format(statistics.median(v), min(v), max(v))
begin, end = "<!-- bench/cluster.sh: begin -->", "<!-- bench/cluster.sh: end -->"
s = []
s.append(begin)
s.append("## Several daemons behind HAProxy")
s.append("")
s.append("Generated by `bench/cluster.sh` on %s UTC (%s repetitions, %ss in all), HAProxy %s, %s CPUs. "
         "Cells are the median with the min–max range in brackets." % (
    datetime.datetime.utcnow().strftime("%Y-%m-%d %H:%M"), reps, elapsed, hv, cpus))
s.append("")
s.append("Every daemon has 4 renderers (`bench/renderer -sleep 50ms`) and listens on loopback; HAProxy runs "
         "`examples/cluster/haproxy.cfg` (addresses changed, logging off) and hashes the request id. "
         "`bench/clusterload` keeps 64 requests in flight for %s, each MapProxy's exact POST on a new connection and "
         "each for its own metatile. The ideal is 80 renders/s per daemon (4 renderers / 50 ms). All processes share "
         "this machine's %s cores; the machine's CPU use during each run is shown, and a figure measured with the CPU above "
         "80 %% busy is CPU-bound: it says what this machine did, not what more hosts would do." % (duration, cpus))
s.append("")
s.append("| daemons × renderers | renders/s | vs 1 daemon | ideal | p50 ms | p99 ms | failed | machine CPU busy |")
s.append("|---|---|---|---|---|---|---|---|")
base = vals("throughput 1", "per_s")
for n in (1, 2, 3):
    v = vals("throughput %d" % n, "per_s")
    ratio = "%.2f×" % (statistics.median(v) / statistics.median(base)) if v and base else "n/a"
    busy = vals("throughput %d" % n, "cpu_busy")
    flag = ""
    if busy and max(busy) > 0.8:
        flag = " **CPU-bound**"
    s.append("| %d × 4 | %s | %s | %d | %s | %s | %d | %s%s |" % (
        n, cell(v), ratio, 80 * n, cell(vals("throughput %d" % n, "p50_ms"), "{:.1f}"),
        cell(vals("throughput %d" % n, "p99_ms"), "{:.1f}"), sum(vals("throughput %d" % n, "failed")),
        cell([100 * b for b in busy], "{:.0f} %"), flag))
v3 = vals("throughput 3", "per_s")
if v3 and base:
    r = statistics.median(v3) / statistics.median(base)
    s.append("")
    s.append("Goal: ≥ 2.7× at 3 daemons (near-linear): %.2f× — **%s**." % (r, "met" if r >= 2.7 else "not met"))
s.append("")
s.append("**A seed task across hosts** (`cluster:`). A seed task of %s metatiles (planned by `clusterload plan`, "
         "as fast as the daemon reads them) started on daemon 1 with `mapproxy-renderd seed --wait`, timed from start to "
         "end: *local*, one daemon renders its own task; *cluster*, daemon 1 has `cluster:` set to HAProxy's address and "
         "sends every metatile through HAProxy to its owner among 3 daemons. Same 50 ms renders, 4 renderers each, "
         "all seed-class (priority 10)." % seed_n)
s.append("")
s.append("| task | metatiles/s | vs local | ideal | not done |")
s.append("|---|---|---|---|---|")
loc = vals("seed local", "per_s")
for mode, name, ideal in (("local", "local: 1 daemon renders its task", 80), ("cluster", "cluster: through HAProxy to 3 daemons", 240)):
    v = vals("seed " + mode, "per_s")
    ratio = "%.2f×" % (statistics.median(v) / statistics.median(loc)) if v and loc else "n/a"
    s.append("| %s | %s | %s | %d | %d |" % (name, cell(v), ratio, ideal, sum(vals("seed " + mode, "failed"))))
s.append("")
s.append("**Latency HAProxy adds.** One daemon, renders that take no time, one request at a time (2,000 timed after 200 "
         "warm-up, twice per repetition in alternating order), each on a new connection as MapProxy makes them: "
         "straight to the daemon, and through HAProxy to it.")
s.append("")
s.append("| path | p50 ms | p90 ms | p99 ms |")
s.append("|---|---|---|---|")
for label, name in (("direct", "clusterload → daemon"), ("haproxy", "clusterload → HAProxy → daemon")):
    s.append("| %s | %s | %s | %s |" % (name, cell(vals(label, "p50_ms"), "{:.3f}"), cell(vals(label, "p90_ms"), "{:.3f}"),
                                          cell(vals(label, "p99_ms"), "{:.3f}")))
d, h = vals("direct", "p50_ms"), vals("haproxy", "p50_ms")
if d and h:
    added = [b - a for a, b in zip(d, h)]
    med = statistics.median(added)
    s.append("")
    s.append("HAProxy adds %.3f ms at p50 (median of the paired runs, range %.3f–%.3f). Goal ≤ 0.3 ms: **%s**." % (
        med, min(added), max(added), "met" if med <= 0.3 else "not met"))
s.append("")
s.append(end)
try:
    text = open(out).read()
except FileNotFoundError:
    text = ""
# Replace our section where it is (between its markers), or append it.
before, after = text, ""
if begin in text and end in text[text.index(begin):]:
    i = text.index(begin)
    before, after = text[:i], text[i + text[i:].index(end) + len(end):]
if before and not before.endswith("\n\n"):
    before = before.rstrip("\n") + "\n\n"
open(out, "w").write(before + "\n".join(s) + "\n" + after.lstrip("\n"))
EOF
log "done"
