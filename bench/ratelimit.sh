#!/bin/bash
# SPDX-License-Identifier: Apache-2.0
# bench/ratelimit.sh — what a fragile upstream sees while the daemon seeds (docs/design.md §17,
# README "Protecting the upstream"): requests per second at the upstream over time for a
# seed task at rate 2, 5 and 20, and for an unlimited seed against an upstream that answers
# 503 above 5 requests per second (the daemon backs off on its own).
#
# Each scenario: a fresh daemon (the bundled MapProxy worker, RENDERERS renderers, all of
# them allowed to seed), a fresh cache, bench/fragileup as the upstream WMS (an opaque PNG
# per GetMap after UPSTREAM_DELAY; with -limit 5, 503 beyond 5 answered in the last second),
# and `mapproxy-renderd seed [--rate R] all` over the whole world, levels 0..LEVELS, 4×4
# metatiles. The task runs until it ends or for DURATION seconds (then it is cancelled).
# The upstream writes every request's arrival time and status; bench/ratelimit_report.py
# turns them into a table (stdout, and BENCHMARKS.md's section "Protecting the upstream"
# with BENCH_OUT) and a plot (docs/ratelimit.svg, SVG drawn by matplotlib).
#
# Environment: LEVELS=6, DURATION=60, RENDERERS=4, UPSTREAM_DELAY=20ms, BENCH_KEEP=1 keeps
# the temp dir, BENCH_OUT=FILE replaces the section in FILE (bench/run.sh keeps it).
# Needs python3-mapproxy, python3-matplotlib and Go. Stops every process it started by PID.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
LEVELS=${LEVELS:-6}
DURATION=${DURATION:-60}
RENDERERS=${RENDERERS:-4}
UPSTREAM_DELAY=${UPSTREAM_DELAY:-20ms}
export PATH="$PATH:/usr/local/go/bin"
SECONDS=0
log() { printf '[%4ds] %s\n' "$SECONDS" "$*" >&2; }

BASE=$(mktemp -d /tmp/mr-ratebench.XXXXXX)
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
forget() { # forget a PID we waited for
	local keep=() p
	for p in "${PIDS[@]}"; do [ "$p" = "$1" ] || keep+=("$p"); done
	PIDS=("${keep[@]}")
}

log "building the daemon and bench/fragileup"
(cd "$ROOT" && go build -o "$BASE/mapproxy-renderd" . && go build -o "$BASE/fragileup" ./bench/fragileup)
BIN=$BASE/mapproxy-renderd

# scenario NAME RATE LIMIT: RATE "" = unlimited; LIMIT 0 = the upstream never refuses.
scenario() {
	local name=$1 rate=$2 limit=$3 dir=$BASE/$1
	mkdir -p "$dir"
	"$BASE/fragileup" -limit "$limit" -delay "$UPSTREAM_DELAY" -out "$dir/hits.csv" >"$dir/up.out" 2>"$dir/up.err" &
	local up=$!
	PIDS+=("$up")
	local url=""
	for _ in $(seq 100); do
		url=$(sed -n 's/^listening on //p' "$dir/up.out")
		[ -n "$url" ] && break
		sleep 0.1
	done
	[ -n "$url" ] || { log "fragileup did not start"; exit 1; }
	cat >"$dir/mapproxy.yaml" <<YAML
globals:
  cache: {base_dir: $dir/cache_data, lock_dir: $dir/cache_data/locks}
  http: {client_timeout: 30}
services:
  tms: {use_grid_names: true}
layers:
  - {name: up, title: fragile upstream, sources: [up_cache]}
caches:
  up_cache:
    grids: [GLOBAL_WEBMERCATOR]
    sources: [up_wms]
    format: image/png
    meta_size: [4, 4]
    meta_buffer: 0
sources:
  up_wms:
    type: wms
    supported_srs: ['EPSG:3857']
    req: {url: '${url}service', layers: x}
YAML
	printf 'seeds:\n  all:\n    caches: [up_cache]\n    levels: {to: %s}\n' "$LEVELS" >"$dir/seed.yaml"
	cat >"$dir/renderd.yaml" <<YAML
socket: $dir/renderd.sock
http: ""
renderers: $RENDERERS
max_seed_renderers: $RENDERERS
render_timeout: 60s
seed_config: $dir/seed.yaml
state_dir: $dir/state
journal: false
YAML
	"$BIN" -f "$dir/mapproxy.yaml" -c "$dir/renderd.yaml" 2>"$dir/daemon.log" &
	local daemon=$!
	PIDS+=("$daemon")
	for _ in $(seq 300); do
		"$BIN" request --socket "$dir/renderd.sock" '{"command":"health"}' >/dev/null 2>&1 && break
		sleep 0.1
	done
	local args=(seed --socket "$dir/renderd.sock")
	[ -n "$rate" ] && args+=(--rate "$rate")
	local id
	id=$("$BIN" "${args[@]}" all | /usr/bin/python3 -c 'import json,sys; print(json.load(sys.stdin)["task"]["task_id"])')
	log "$name: task $id (rate ${rate:-unlimited}, upstream limit $limit/s)"
	local t0=$SECONDS state=""
	while [ $((SECONDS - t0)) -lt "$DURATION" ]; do
		state=$("$BIN" task --socket "$dir/renderd.sock" "$id" | /usr/bin/python3 -c 'import json,sys; print(json.load(sys.stdin)["task"]["state"])')
		case $state in done | failed | cancelled) break ;; esac
		sleep 0.5
	done
	"$BIN" task --socket "$dir/renderd.sock" "$id" >"$dir/task.json" || true
	"$BIN" status --socket "$dir/renderd.sock" >"$dir/status.json" || true
	"$BIN" cancel --socket "$dir/renderd.sock" "$id" >/dev/null 2>&1 || true
	kill -TERM "$daemon"
	wait "$daemon" || true
	forget "$daemon"
	kill -TERM "$up"
	wait "$up" || true
	forget "$up"
	log "$name: $(wc -l <"$dir/hits.csv") upstream requests, task ${state:-running at the end}"
}

scenario rate-2 2 0
scenario rate-5 5 0
scenario rate-20 20 0
scenario 503-above-5 "" 5

/usr/bin/python3 "$ROOT/bench/ratelimit_report.py" "$BASE" "$ROOT/docs/ratelimit.svg" "${BENCH_OUT:-}" \
	"levels 0..$LEVELS, $RENDERERS renderers, upstream answers after $UPSTREAM_DELAY, at most ${DURATION} s per run, $(nproc) CPUs"
log "done in ${SECONDS}s"
