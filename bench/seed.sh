#!/bin/bash
# SPDX-License-Identifier: Apache-2.0
# bench/seed.sh — one seed.yaml entry seeded two ways with the bundled renderer, side by side:
#   1. mapproxy-seed -c 4 through the daemon (MapProxy's renderd client, HTTP, priority 10);
#   2. the daemon's own task (mapproxy-renderd seed --wait NAME: bundled planner, common queue).
# Both runs use a fresh daemon with 4 renderers (max_seed_renderers 4), an empty cache, and the
# same local upstream WMS (MapProxy's debug source). A third run measures the planner and the
# queue alone: the daemon's task over levels 0..NOOP_LEVELS with bench/renderer (renders
# nothing) as its 4 renderers.
# Printed per run: metatiles rendered, wall time, metatiles/s, and CPU per metatile of
# everything but the upstream (mapproxy-seed and its workers, or the CLI; the daemon; its
# renderers and planner), read from /proc; the upstream's CPU separately (the same work both
# ways).
#
# Environment: LEVELS=12 (seed levels 0..LEVELS over an area of 4°×2.5°), NOOP_LEVELS=15,
# REPS=1, BENCH_KEEP=1 keeps the temp dir, BENCH_OUT=FILE also puts the table into FILE (e.g.
# BENCHMARKS.md) as its "Seeding" section, replacing an earlier one (bench/run.sh keeps that
# section when it rewrites the file). Needs python3-mapproxy, mapproxy, python3-requests, Go.
# Prints a Markdown table on stdout; logs go to stderr. Stops every process it started by PID.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
LEVELS=${LEVELS:-12}
NOOP_LEVELS=${NOOP_LEVELS:-15}
REPS=${REPS:-1}
SECONDS=0
log() { printf '[%4ds] %s\n' "$SECONDS" "$*" >&2; }

BASE=$(mktemp -d /tmp/mr-seedbench.XXXXXX)
PIDS=()
cleanup() {
	local pid
	for pid in "${PIDS[@]}"; do
		kill -TERM "$pid" 2>/dev/null || true
	done
	for pid in "${PIDS[@]}"; do
		wait "$pid" 2>/dev/null || true
	done
	if [ "${BENCH_KEEP:-}" = 1 ]; then log "kept $BASE"; else rm -rf "$BASE"; fi
}
trap cleanup EXIT

log "building the daemon and bench/renderer"
(cd "$ROOT" && go build -o "$BASE/mapproxy-renderd" . && go build -o "$BASE/bench-renderer" ./bench/renderer)
BIN=$BASE/mapproxy-renderd

# CPU seconds (user+system, reaped children included) of a process and all its descendants.
cpu_tree() {
	/usr/bin/python3 - "$1" <<'PY'
import os, sys
tick = os.sysconf('SC_CLK_TCK')
procs = {}
for p in os.listdir('/proc'):
    if not p.isdigit():
        continue
    try:
        with open('/proc/%s/stat' % p) as f:
            fields = f.read().rsplit(')', 1)[1].split()
    except OSError:
        continue
    procs[int(p)] = (int(fields[1]), sum(int(x) for x in fields[11:15]))
total, todo = 0, [int(sys.argv[1])]
while todo:
    pid = todo.pop()
    if pid in procs:
        total += procs[pid][1]
        todo.extend(c for c, (pp, _) in procs.items() if pp == pid)
print('%.2f' % (total / tick))
PY
}

free_port() { /usr/bin/python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# The upstream WMS.
printf 'from mapproxy.wsgiapp import make_wsgi_app\napplication = make_wsgi_app(%s)\n' "'$ROOT/examples/upstream.yaml'" >"$BASE/upstream_wsgi.py"
/usr/bin/python3 "$ROOT/examples/serve_wsgi.py" "$BASE/upstream_wsgi.py" 0 >"$BASE/upstream.out" 2>"$BASE/upstream.log" &
UPSTREAM_PID=$!
PIDS+=("$UPSTREAM_PID")
for _ in $(seq 300); do
	grep -qs listening "$BASE/upstream.out" && break
	sleep 0.1
done
UPSTREAM=$(sed -n 's/^listening on //p' "$BASE/upstream.out")
[ -n "$UPSTREAM" ] || { log "upstream did not start"; cat "$BASE/upstream.log" >&2; exit 1; }

PORT=$(free_port)
cat >"$BASE/mapproxy.yaml" <<YAML
globals:
  cache: {base_dir: $BASE/cache, lock_dir: $BASE/cache/locks}
  http: {client_timeout: 600}
  renderd: {address: "http://127.0.0.1:$PORT"}
services: {tms: {use_grid_names: true}}
layers: [{name: wmsl, title: wmsl, sources: [wms_cache]}]
caches:
  wms_cache: {grids: [GLOBAL_WEBMERCATOR], sources: [upstream_wms], format: image/png, meta_size: [4, 4], meta_buffer: 20}
sources:
  upstream_wms:
    type: wms
    supported_srs: ['EPSG:3857']
    req: {url: "${UPSTREAM}service", layers: dbg, transparent: true}
YAML
cat >"$BASE/seed.yaml" <<YAML
coverages:
  area: {bbox: [8.0, 47.5, 12.0, 50.0], srs: 'EPSG:4326'}
seeds:
  bench: {caches: [wms_cache], grids: [GLOBAL_WEBMERCATOR], coverages: [area], levels: {to: $LEVELS}}
  big: {caches: [wms_cache], grids: [GLOBAL_WEBMERCATOR], coverages: [area], levels: {to: $NOOP_LEVELS}}
YAML
cat >"$BASE/renderd.yaml" <<YAML
socket: $BASE/renderd.sock
http: 127.0.0.1:$PORT
renderers: 4
max_seed_renderers: 4
render_timeout: 120s
seed_config: $BASE/seed.yaml
YAML
cat >"$BASE/renderd-noop.yaml" <<YAML
socket: $BASE/noop.sock
http: ""
renderers: 4
max_seed_renderers: 4
seed_config: $BASE/seed.yaml
renderer_command: [$BASE/bench-renderer, -cache, wms_cache_GLOBAL_WEBMERCATOR, -meta, "4"]
YAML

DAEMON_PID=
SOCK=
start_daemon() { # start_daemon RENDERD_YAML SOCKET
	rm -rf "$BASE/cache"
	SOCK=$2
	"$BIN" -f "$BASE/mapproxy.yaml" -c "$1" 2>>"$BASE/daemon.log" &
	DAEMON_PID=$!
	PIDS+=("$DAEMON_PID")
	for _ in $(seq 600); do
		if "$BIN" status --socket "$SOCK" 2>/dev/null | /usr/bin/python3 -c \
			'import json, sys; d = json.load(sys.stdin); sys.exit(0 if d["renderers"]["ready"] == 4 else 1)' 2>/dev/null; then
			return
		fi
		sleep 0.1
	done
	log "daemon did not get 4 ready renderers"
	tail -20 "$BASE/daemon.log" >&2
	exit 1
}
stop_daemon() {
	kill -TERM "$DAEMON_PID"
	wait "$DAEMON_PID" || true
}
rendered() {
	"$BIN" status --socket "$SOCK" | /usr/bin/python3 -c \
		'import json, sys; d = json.load(sys.stdin); print(d["caches"]["wms_cache_GLOBAL_WEBMERCATOR"]["rendered"])'
}

# run_one MODE: one seed on a fresh daemon and an empty cache; sets N, WALL, CPU, UP (seconds).
run_one() {
	local mode=$1 t0 t1 d0 d1 u0 u1 client
	if [ "$mode" = noop ]; then
		start_daemon "$BASE/renderd-noop.yaml" "$BASE/noop.sock"
	else
		start_daemon "$BASE/renderd.yaml" "$BASE/renderd.sock"
	fi
	d0=$(cpu_tree "$DAEMON_PID")
	u0=$(cpu_tree "$UPSTREAM_PID")
	t0=$(date +%s.%N)
	trap 'log "$mode failed; its output and the daemon log:"; tail -20 "$BASE/seed.out" "$BASE/daemon.log" >&2' ERR
	case $mode in
	mapproxy-seed)
		/usr/bin/time -f '%U %S' -o "$BASE/time.out" \
			mapproxy-seed -f "$BASE/mapproxy.yaml" -s "$BASE/seed.yaml" --seed bench -c 4 >"$BASE/seed.out" 2>&1
		;;
	task)
		/usr/bin/time -f '%U %S' -o "$BASE/time.out" \
			"$BIN" seed -s "$BASE/seed.yaml" --socket "$SOCK" --wait bench >"$BASE/seed.out" 2>&1
		;;
	noop)
		/usr/bin/time -f '%U %S' -o "$BASE/time.out" \
			"$BIN" seed -s "$BASE/seed.yaml" --socket "$SOCK" --wait big >"$BASE/seed.out" 2>&1
		;;
	esac
	trap - ERR
	t1=$(date +%s.%N)
	d1=$(cpu_tree "$DAEMON_PID")
	u1=$(cpu_tree "$UPSTREAM_PID")
	client=$(awk '{print $1 + $2}' "$BASE/time.out")
	N=$(rendered)
	stop_daemon
	WALL=$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')
	CPU=$(awk -v a="$d0" -v b="$d1" -v c="$client" 'BEGIN { print b - a + c }')
	UP=$(awk -v a="$u0" -v b="$u1" 'BEGIN { print b - a }')
}

TABLE=$BASE/table.md
log "seed levels 0..$LEVELS, $REPS repetition(s), load average $(cut -d' ' -f1-3 /proc/loadavg)"
{
	echo "| run | metatiles | wall s | metatiles/s | CPU ms / metatile (client + daemon + renderers + planner) | upstream CPU ms / metatile |"
	echo "|---|---:|---:|---:|---:|---:|"
} >"$TABLE"
row() { # row LABEL, from N WALL CPU UP
	awk -v l="$1" -v n="$N" -v w="$WALL" -v c="$CPU" -v u="$UP" \
		'BEGIN { printf "| %s | %d | %.2f | %.1f | %.3f | %.1f |\n", l, n, w, n / w, 1000 * c / n, 1000 * u / n }' >>"$TABLE"
}
for rep in $(seq "$REPS"); do
	log "rep $rep: mapproxy-seed -c 4"
	run_one mapproxy-seed
	row "mapproxy-seed -c 4 through the daemon, levels 0–$LEVELS"
	log "rep $rep: the daemon's task"
	run_one task
	row "the daemon's task (\`seed --wait\`), levels 0–$LEVELS"
done
log "the daemon's task with no-op renderers, levels 0..$NOOP_LEVELS"
run_one noop
row "the daemon's task, no-op renderers (planner + queue), levels 0–$NOOP_LEVELS"
LOADAVG_END=$(cut -d' ' -f1-3 /proc/loadavg)
log "done; load average $LOADAVG_END"
cat "$TABLE"

if [ -n "${BENCH_OUT:-}" ]; then
	SECTION=$BASE/section.md
	{
		echo "<!-- bench/seed.sh: begin -->"
		echo "## Seeding: mapproxy-seed through the daemon vs the daemon's own task"
		echo
		echo "Generated by \`bench/seed.sh\` on $(date -u '+%Y-%m-%d %H:%M UTC') ($(nproc) CPUs, load average $LOADAVG_END at the end, $REPS repetition(s))."
		echo "One seed.yaml entry: 4×4 metatiles from a local WMS serving MapProxy's debug source, a 4°×2.5° area, on a fresh daemon with 4 renderers (all may seed) and an empty cache each time."
		echo "CPU is utime+stime from /proc of the client (mapproxy-seed and its workers, or the CLI), the daemon, its renderers and its planner; the upstream WMS separately (the same work both ways)."
		echo "The last row replaces the renderers by \`bench/renderer\` (renders nothing): the planner (MapProxy's tile walker) and the queue alone."
		echo
		cat "$TABLE"
		echo "<!-- bench/seed.sh: end -->"
	} >"$SECTION"
	/usr/bin/python3 - "$BENCH_OUT" "$SECTION" <<'PY'
import re, sys
out, section = sys.argv[1], open(sys.argv[2]).read()
try:
    text = open(out).read()
except FileNotFoundError:
    text = ''
pattern = re.compile(r'<!-- bench/seed.sh: begin -->.*?<!-- bench/seed.sh: end -->\n', re.S)
if pattern.search(text):
    text = pattern.sub(lambda m: section, text)
else:
    text = text.rstrip('\n') + '\n\n' + section
open(out, 'w').write(text)
PY
	log "wrote the Seeding section of $BENCH_OUT"
fi
