#!/bin/bash
# SPDX-License-Identifier: Apache-2.0
# bench/run.sh — the one command that runs every mapproxy-renderd benchmark
# scenario against mapproxy-renderd ("ours"), Tirex 0.7.0 and mod_tile's
# renderd 0.6.1, plus our floor (a bare socket→pipe→child chain), and writes
# BENCHMARKS.md at the repository root. See bench/README.md.
#
# It installs the peers from Debian if they are missing, builds everything
# into a temp dir, runs each daemon there on Unix sockets (Tirex's backends on
# 127.0.0.1), as its own user where the daemon refuses root, and stops every
# process it started by PID. Nothing is written into the repository except
# BENCHMARKS.md.
#
# Environment:
#   REPS=3            repetitions of every scenario (the report shows the median
#                     and min–max)
#   BENCH_OUT=FILE    where to write the report (default: <repo>/BENCHMARKS.md)
#   BENCH_KEEP=1      keep the temp dir (logs, raw results) afterwards
#   TIREX_ENQUEUE=N   jobs for Tirex's enqueue/memory run (default 250000; ours
#                     always gets 1,000,000)
#   QUIET_BUDGET=S    seconds in all that may be spent waiting, before runs, for
#                     the machine to be quiet (< 25 % CPU; default 240)
set -euo pipefail

REPS=${REPS:-3}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${BENCH_OUT:-$ROOT/BENCHMARKS.md}
TIREX_ENQUEUE=${TIREX_ENQUEUE:-250000}
QUIET_BUDGET=${QUIET_BUDGET:-240}
QUIET_SPENT=0
OURS_ENQUEUE=1000000
SECONDS=0
LOADAVG_START=$(cut -d' ' -f1-3 /proc/loadavg)

log() { printf '[%4ds] %s\n' "$SECONDS" "$*" >&2; }

# ---------------------------------------------------------------------------
# Peers from Debian.
PKGS=(tirex renderd mapnik-utils postgresql-15 postgresql-15-postgis-3)
need=()
for p in "${PKGS[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || need+=("$p")
done
if ((${#need[@]})); then
	log "installing ${need[*]}"
	apt-get update -q
	DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${need[@]}"
fi
for u in _tirex _renderd postgres; do
	id "$u" >/dev/null || { echo "user $u missing (the Debian packages create it)" >&2; exit 1; }
done

# ---------------------------------------------------------------------------
# Temp dir, process bookkeeping, cleanup.
BASE=$(mktemp -d /tmp/mr-bench.XXXXXX)
chmod 755 "$BASE" # the peers run as their own users and must reach their dirs
BIN=$BASE/bin
RESULTS=$BASE/results.jsonl
: >"$RESULTS"
PIDS=()

alive() { # a zombie counts as gone
	local st
	st=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 1
	[ "$st" != Z ]
}

stop_pid() { # stop_pid PID [SIGNAL]: signal, wait up to 15 s, then SIGKILL
	local pid=$1 sig=${2:-TERM} i
	alive "$pid" || return 0
	kill "-$sig" "$pid" 2>/dev/null || return 0
	for ((i = 0; i < 150; i++)); do
		alive "$pid" || { wait "$pid" 2>/dev/null || true; return 0; }
		sleep 0.1
	done
	log "pid $pid ignored SIG$sig for 15 s; killing it"
	kill -KILL "$pid" 2>/dev/null || true
	wait "$pid" 2>/dev/null || true
}

forget_pid() {
	local keep=() p
	for p in "${PIDS[@]}"; do [ "$p" = "$1" ] || keep+=("$p"); done
	PIDS=("${keep[@]}")
}

cleanup() {
	local p
	for p in "${PIDS[@]}"; do stop_pid "$p"; done
	if [ "${BENCH_KEEP:-}" = 1 ]; then
		log "kept $BASE"
	else
		rm -rf "$BASE"
	fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

as_user() { local u=$1; shift; setpriv --reuid="$u" --regid="$u" --init-groups -- "$@"; }

# ---------------------------------------------------------------------------
# Build.
log "building into $BASE"
mkdir -p "$BIN"
(cd "$ROOT" && for p in loadgen renderer tirexbackend floor; do go build -o "$BIN/$p" "./bench/$p"; done)
OURS=1
if ! (cd "$ROOT" && go build -o "$BIN/mapproxy-renderd" . 2>"$BASE/ours-build.log"); then
	log "mapproxy-renderd does not build; running the peers and the floor only (see below)"
	cat "$BASE/ours-build.log" >&2
	OURS=0
fi

LG=$BIN/loadgen
START=0
next_start() { START=$((START + 1000000)); echo "$START"; }

# quiet: wait (within QUIET_BUDGET) until other work leaves the cores alone;
# sets BUSY to the machine's CPU share seen last.
quiet() {
	local t0=$SECONDS limit=15s
	((QUIET_SPENT < QUIET_BUDGET)) || limit=0s
	BUSY=$("$LG" quiet -max 0.25 -timeout "$limit") || BUSY=-1
	QUIET_SPENT=$((QUIET_SPENT + SECONDS - t0))
}

# lg SCENARIO SYSTEM REP VARIANT ARGS…: one loadgen run, result appended.
declare -A PROTO ADDR NAME PID RLOG RMATCH
lg() {
	local scen=$1 sys=$2 rep=$3 variant=$4
	shift 4
	quiet
	local args=(-proto "${PROTO[$sys]}" -addr "${ADDR[$sys]}" -system "$sys" -rep "$rep" -variant "$variant"
		-z 18 -start "$(next_start)" -pid "${PID[$sys]}" -busy-before "$BUSY")
	[ -n "${NAME[$sys]:-}" ] && args+=(-name "${NAME[$sys]}")
	[ -n "${RLOG[$sys]:-}" ] && args+=(-render-log "${RLOG[$sys]}" -render-match "${RMATCH[$sys]:-}")
	local line
	if line=$(timeout 180 "$LG" "$scen" "${args[@]}" "$@"); then
		echo "$line" >>"$RESULTS"
		log "$scen $sys rep $rep $variant: $(echo "$line" | sed -e 's/.*"metrics"://' | cut -c1-220)"
	else
		log "$scen $sys rep $rep $variant: FAILED"
	fi
	"$LG" idle -pid "${PID[$sys]}" -timeout 30s || log "$sys did not go idle"
}

# ---------------------------------------------------------------------------
# Daemons.

# Our daemon. start_ours TAG RENDERERS MAX_SEED RENDER_TIMEOUT RENDERER_ARGS…
start_ours() {
	local tag=$1 n=$2 seed=$3 rto=$4
	shift 4
	local d=$BASE/ours-$tag args="" a
	mkdir -p "$d"
	for a in "$BIN/renderer" "$@"; do args+="${args:+, }\"$a\""; done
	cat >"$d/renderd.yaml" <<-EOF
		socket: $d/ours.sock
		http: ""
		renderers: $n
		max_seed_renderers: $seed
		seed_priority_below: 50
		renderer_command: [$args]
		render_timeout: $rto
		max_queued: 2000000
		log_level: warn
		stop_timeout: 2s
		state_dir: $d/state
	EOF
	"$BIN/mapproxy-renderd" -c "$d/renderd.yaml" >"$d/daemon.log" 2>&1 &
	PID[ours]=$!
	PIDS+=("${PID[ours]}")
	PROTO[ours]=ndjson ADDR[ours]=$d/ours.sock NAME[ours]=bench_GLOBAL_WEBMERCATOR
	"$LG" wait -addr "$d/ours.sock" -timeout 30s || { cat "$d/daemon.log" >&2; return 1; }
}

# The floor. start_floor SYSTEM FLAGS…
start_floor() {
	local sys=$1
	shift
	local d=$BASE/$sys
	mkdir -p "$d"
	"$BIN/floor" -socket "$d/floor.sock" -children 4 "$@" -- "$BIN/renderer" >"$d/floor.log" 2>&1 &
	PID[$sys]=$!
	PIDS+=("${PID[$sys]}")
	PROTO[$sys]=ndjson ADDR[$sys]=$d/floor.sock
	"$LG" wait -addr "$d/floor.sock" -timeout 30s
}

# Tirex. start_tirex TAG PROCS LIVE_MAXPROC SEED_MAXPROC MAP [nobackends]
start_tirex() {
	local tag=$1 procs=$2 live=$3 seed=$4 map=$5 nobackends=${6:-}
	local d=$BASE/tirex-$tag
	mkdir -p "$d/etc/renderer/bench" "$d/run" "$d/log" "$d/stats" "$d/tiles" "$d/bin"
	cp "$BIN/tirexbackend" "$d/bin/"
	cat >"$d/etc/tirex.conf" <<-EOF
		stats_dir=$d/stats
		socket_dir=$d/run
		modtile_socket_name=$d/run/modtile.sock
		master_pidfile=$d/run/tirex-master.pid
		master_logfile=$d/log/jobs.log
		master_rendering_timeout=10
		backend_manager_pidfile=$d/run/tirex-backend-manager.pid
		backend_manager_alive_timeout=8
		bucket name=live minprio=1 maxproc=$live maxload=1000
		bucket name=seed minprio=10 maxproc=$seed maxload=1000
	EOF
	printf 'name=bench\npath=%s\nport=9390\nprocs=%d\n' "$d/bin/tirexbackend" "$procs" >"$d/etc/renderer/bench.conf"
	printf 'name=m0\ntiledir=%s\nminz=0\nmaxz=20\nsleep_ms=0\n' "$d/tiles/m0" >"$d/etc/renderer/bench/m0.conf"
	printf 'name=m50\ntiledir=%s\nminz=0\nmaxz=20\nsleep_ms=50\n' "$d/tiles/m50" >"$d/etc/renderer/bench/m50.conf"
	chown -R _tirex:_tirex "$d"
	if [ -z "$nobackends" ]; then
		(cd "$d" && exec setpriv --reuid=_tirex --regid=_tirex --init-groups -- \
			tirex-backend-manager -f -c "$d/etc") >"$d/log/backend-manager.log" 2>&1 &
		PID[tirex-bm]=$!
		PIDS+=("${PID[tirex-bm]}")
	fi
	(cd "$d" && exec setpriv --reuid=_tirex --regid=_tirex --init-groups -- \
		tirex-master -f -c "$d/etc") >"$d/log/master.log" 2>&1 &
	PID[tirex]=$!
	PIDS+=("${PID[tirex]}")
	PROTO[tirex]=tirex ADDR[tirex]=$d/run/master.sock NAME[tirex]=$map
	RLOG[tirex]=$d/log/jobs.log RMATCH[tirex]=""
	"$LG" wait -proto tirex -addr "$d/run/master.sock" -timeout 30s
}

stop_tirex() {
	stop_pid "${PID[tirex]}"
	forget_pid "${PID[tirex]}"
	if [ -n "${PID[tirex-bm]:-}" ]; then
		stop_pid "${PID[tirex-bm]}"
		forget_pid "${PID[tirex-bm]}"
		PID[tirex-bm]=""
	fi
}

# PostgreSQL for renderd's 50 ms style: a private cluster, Unix socket only;
# the slow-statement log is renderd's render counter.
start_pg() {
	local d=$BASE/pg pgbin=/usr/lib/postgresql/15/bin
	mkdir -p "$d/data" "$d/run"
	chown -R postgres:postgres "$d"
	as_user postgres "$pgbin/initdb" -D "$d/data" --auth=trust -U postgres --no-sync >"$d/initdb.log" 2>&1
	(cd "$d" && exec setpriv --reuid=postgres --regid=postgres --init-groups -- "$pgbin/postgres" -D "$d/data" \
		-c listen_addresses= -k "$d/run" -p 5499 -c log_min_duration_statement=40 -c logging_collector=off \
		-c fsync=off -c synchronous_commit=off -c max_connections=50) >"$d/pg.log" 2>&1 &
	PID[pg]=$!
	PIDS+=("${PID[pg]}")
	local i
	for ((i = 0; i < 100; i++)); do
		"$pgbin/pg_isready" -q -h "$d/run" -p 5499 && break
		sleep 0.2
	done
	psql -q -h "$d/run" -p 5499 -U postgres -c 'CREATE DATABASE slow' >/dev/null
	psql -q -h "$d/run" -p 5499 -U postgres -d slow -c 'CREATE EXTENSION postgis' >/dev/null
}

# renderd. start_renderd TAG THREADS MAP
start_renderd() {
	local tag=$1 threads=$2 map=$3
	local d=$BASE/renderd-$tag
	local srs="+proj=merc +a=6378137 +b=6378137 +lat_ts=0.0 +lon_0=0.0 +x_0=0.0 +y_0=0.0 +k=1.0 +units=m +nadgrids=@null +wktext +no_defs +over"
	local world="-20037508.34,-20037508.34,20037508.34,20037508.34"
	mkdir -p "$d/run" "$d/tiles"
	cat >"$d/empty.xml" <<-EOF
		<?xml version="1.0" encoding="utf-8"?>
		<Map srs="$srs" background-color="#b5d0d0"/>
	EOF
	# The layer's query sleeps 50 ms; its geometry covers the world so the
	# planner cannot fold "way && bbox" to false and skip the sleep.
	cat >"$d/slow50.xml" <<-EOF
		<?xml version="1.0" encoding="utf-8"?>
		<Map srs="$srs" background-color="#b5d0d0">
		  <Style name="fill"><Rule><PolygonSymbolizer fill="#f2efe9"/></Rule></Style>
		  <Layer name="slow" srs="$srs">
		    <StyleName>fill</StyleName>
		    <Datasource>
		      <Parameter name="type">postgis</Parameter>
		      <Parameter name="host">$BASE/pg/run</Parameter>
		      <Parameter name="port">5499</Parameter>
		      <Parameter name="dbname">slow</Parameter>
		      <Parameter name="user">postgres</Parameter>
		      <Parameter name="table">(SELECT ST_SetSRID(ST_MakeEnvelope($world),3857) AS way FROM pg_sleep(0.05)) AS t</Parameter>
		      <Parameter name="geometry_field">way</Parameter>
		      <Parameter name="srid">3857</Parameter>
		      <Parameter name="extent">$world</Parameter>
		      <Parameter name="estimate_extent">false</Parameter>
		    </Datasource>
		  </Layer>
		</Map>
	EOF
	local xml=$d/empty.xml
	[ "$map" = mslow ] && xml=$d/slow50.xml
	cat >"$d/renderd.conf" <<-EOF
		[renderd]
		socketname=$d/run/renderd.sock
		num_threads=$threads
		tile_dir=$d/tiles
		stats_file=$d/run/renderd.stats

		[mapnik]
		plugins_dir=/usr/lib/mapnik/3.1/input
		font_dir=/usr/share/fonts/truetype
		font_dir_recurse=true

		[$map]
		URI=/$map/
		XML=$xml
		TILEDIR=null://
		TILESIZE=8
		MAXZOOM=20
	EOF
	chown -R _renderd:_renderd "$d"
	(cd "$d" && exec setpriv --reuid=_renderd --regid=_renderd --init-groups -- \
		renderd -f -c "$d/renderd.conf") >"$d/renderd.log" 2>&1 &
	PID[renderd]=$!
	PIDS+=("${PID[renderd]}")
	PROTO[renderd]=renderd ADDR[renderd]=$d/run/renderd.sock NAME[renderd]=$map
	if [ "$map" = mslow ]; then RLOG[renderd]=$BASE/pg/pg.log RMATCH[renderd]=BOX3D; else RLOG[renderd]="" RMATCH[renderd]=""; fi
	"$LG" wait -proto renderd -addr "$d/run/renderd.sock" -name "$map" -z 18 -timeout 30s
}

stop_sys() {
	stop_pid "${PID[$1]}"
	forget_pid "${PID[$1]}"
}

SYSTEMS_A=(floor-json floor-raw)
SYSTEMS_B=()
((OURS)) && SYSTEMS_A+=(ours) && SYSTEMS_B+=(ours)
SYSTEMS_A+=(tirex renderd)
SYSTEMS_B+=(tirex renderd)

# ---------------------------------------------------------------------------
# Phase A: no-op renders, 4 renderers. Scenarios 1, 2 and 6.
log "phase A: no-op renders, 4 renderers"
start_floor floor-json -json
start_floor floor-raw
if ((OURS)) && ! start_ours a 4 4 60s; then
	log "mapproxy-renderd does not start; running the peers and the floor only"
	OURS=0
	SYSTEMS_A=(floor-json floor-raw tirex renderd)
	SYSTEMS_B=(tirex renderd)
fi
start_tirex a 4 4 4 m0
start_renderd a 4 m0

for ((rep = 1; rep <= REPS; rep++)); do
	for sys in "${SYSTEMS_A[@]}"; do
		lg closed "$sys" "$rep" w1 -window 1 -duration 1s -warmup 200 -n 1000000
		lg closed "$sys" "$rep" w32 -window 32 -duration 2s -warmup 500 -n 1000000
		lg closed "$sys" "$rep" w64 -window 64 -duration 2s -warmup 500 -n 1000000
	done
done
for ((rep = 1; rep <= REPS; rep++)); do
	for sys in "${SYSTEMS_A[@]}"; do
		case $sys in floor-*) continue ;; esac
		lg overflow "$sys" "$rep" n5000 -n 5000
	done
done
for sys in floor-json floor-raw renderd; do stop_sys "$sys"; done
((OURS)) && stop_sys ours
stop_tirex

# ---------------------------------------------------------------------------
# Phase B: 50 ms renders, 10 renderers, at most 6 seeding. Scenarios 3, 4, 5.
log "phase B: 50 ms renders, 10 renderers, at most 6 for seeding"
start_pg
if ((OURS)); then
	start_ours b 10 6 60s -sleep 50ms -log "$BASE/ours-b/renders.log"
	RLOG[ours]=$BASE/ours-b/renders.log RMATCH[ours]=""
fi
start_tirex b 10 10 6 m50
start_renderd b 10 mslow

for ((rep = 1; rep <= REPS; rep++)); do
	for sys in "${SYSTEMS_B[@]}"; do
		lg live "$sys" "$rep" s600-l40 -seed 600 -live 40 -every 50ms
		lg promote "$sys" "$rep" s300-l20 -seed 300 -live 20 -every 50ms
		lg storm "$sys" "$rep" n1000 -n 1000
	done
done
stop_sys renderd
stop_pid "${PID[pg]}" INT
forget_pid "${PID[pg]}"
((OURS)) && stop_sys ours
stop_tirex
RLOG[ours]=""

# ---------------------------------------------------------------------------
# Phase C: fire-and-forget enqueue rate and memory per queued job. Scenario 7.
# Renderers never finish: ours has 1 renderer sleeping for hours, Tirex has
# no backends and both buckets stopped.
log "phase C: enqueue and memory per queued job"
for ((rep = 1; rep <= REPS; rep++)); do
	if ((OURS)); then
		start_ours c 1 1 3h -sleep 2h
		lg enqueue ours "$rep" "n$OURS_ENQUEUE" -n "$OURS_ENQUEUE" -timeout 120s
		stop_sys ours
	fi
	start_tirex c 1 1 1 m0 nobackends
	"$LG" tirexcmd -addr "${ADDR[tirex]}" type=stop_rendering_bucket bucket=live
	"$LG" tirexcmd -addr "${ADDR[tirex]}" type=stop_rendering_bucket bucket=seed
	lg enqueue tirex "$rep" "n$TIREX_ENQUEUE" -n "$TIREX_ENQUEUE" -timeout 150s
	stop_tirex
	rm -rf "$BASE/tirex-c"
done

# ---------------------------------------------------------------------------
log "writing $OUT"
# bench/seed.sh's section and the task benchmarks' section are not ours to regenerate: keep them.
SEED_SECTION=$BASE/seed-section.md
sed -n -e '/^<!-- bench\/seed.sh: begin -->$/,/^<!-- bench\/seed.sh: end -->$/p' \
	-e '/^<!-- tasks: begin -->$/,/^<!-- tasks: end -->$/p' \
	-e '/^<!-- bench\/ratelimit.sh: begin -->$/,/^<!-- bench\/ratelimit.sh: end -->$/p' "$OUT" 2>/dev/null >"$SEED_SECTION" || true
"$LG" report -in "$RESULTS" -out "$OUT" -elapsed "${SECONDS}s" -loadavg "$LOADAVG_START" \
	-ours-ran="$OURS" -reps "$REPS" -tirex-enqueue "$TIREX_ENQUEUE" -quiet-spent "${QUIET_SPENT}s"
# The observability figures come from Go benchmarks (bench/observability.sh), kept beside.
if [ -f "$ROOT/bench/observability.md" ]; then
	{ echo; cat "$ROOT/bench/observability.md"; } >> "$OUT"
fi
if [ -s "$SEED_SECTION" ]; then
	{ echo; cat "$SEED_SECTION"; } >>"$OUT"
fi
cp "$RESULTS" "$BASE/results-final.jsonl"
log "done in ${SECONDS}s"
