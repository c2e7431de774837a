#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# mapproxy-renderd demo: bash examples/demo.sh
#
# On Debian bookworm (as root if packages are missing; Go in PATH or at
# /usr/local/go) this installs MapProxy from Debian, builds the daemon, and
# runs, all on 127.0.0.1 with free ports and everything in a temp directory:
#   upstream   a second MapProxy serving the debug source as WMS (mapproxy-util serve-develop)
#   renderd    mapproxy-renderd with 2 renderers, Unix socket + TCP
#   mapproxy   MapProxy (examples/mapproxy_wsgi.py on examples/serve_wsgi.py, a
#              standard-library server with a pool of 16 threads: fine for a demo;
#              in production use mod_wsgi or gunicorn, see README.md)
#              whose renderd.address is the daemon's Unix socket
# then fetches tiles through WMTS, TMS and WMS, talks to the daemon directly,
# seeds with the daemon's own task (mapproxy-renderd seed), refreshes through it
# with plain mapproxy-seed (TCP), and prints the status document.
# Every process it started is stopped on exit; the temp directory is kept.
#
# Environment: MAPPROXY_RENDERD_BIN=/path/to/binary skips the build.
#              DEMO_KEEP=1 keeps everything running until you press Enter.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=/usr/bin/python3
pids=()
declare -A logs=()

step() { printf '\n==> %s\n' "$*"; }
info() { printf '    %s\n' "$*"; }
die() { printf '\ndemo: FAILED: %s\n' "$*" >&2; exit 1; }

cleanup() {
	local rc=$? pid deadline
	trap - EXIT INT TERM
	if ((${#pids[@]})); then
		step "stopping ${#pids[@]} processes"
		# newest first: MapProxy, then the daemon (SIGTERM lets it finish), then upstream.
		# Each was started with setsid, so its pid is its process group: the group
		# also holds its children (renderers, serve-develop's reloader child).
		for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
			pid=${pids[i]}
			kill -TERM -- "-$pid" 2>/dev/null || true
			deadline=$((SECONDS + 15))
			while kill -0 -- "-$pid" 2>/dev/null && ((SECONDS < deadline)); do
				sleep 0.1
			done
			if kill -0 -- "-$pid" 2>/dev/null; then
				info "process group $pid did not stop in 15 s: SIGKILL"
				kill -KILL -- "-$pid" 2>/dev/null || true
			fi
			wait "$pid" 2>/dev/null || true
		done
	fi
	if [[ -n ${TMP:-} ]]; then
		info "files and logs are in $TMP (rm -rf it when done)"
	fi
	exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# start NAME LOG CMD...: run CMD in its own process group, remember its pid.
start() {
	local name=$1 log=$2
	shift 2
	setsid "$@" >"$log" 2>&1 </dev/null &
	pids+=($!)
	logs[$!]=$log
	info "$name: pid $! (log $log)"
}

# wait_for NAME PID SECONDS CMD...: retry CMD until it succeeds, PID dies or time runs out.
wait_for() {
	local name=$1 pid=$2 deadline=$((SECONDS + $3)) why=
	shift 3
	until "$@" >/dev/null 2>&1; do
		if ! kill -0 "$pid" 2>/dev/null; then
			why="$name exited"
		elif ((SECONDS >= deadline)); then
			why="$name not ready after $3 s"
		else
			sleep 0.2
			continue
		fi
		printf '    last lines of %s:\n' "${logs[$pid]}" >&2
		tail -n 20 "${logs[$pid]}" | sed 's/^/    | /' >&2
		die "$why"
	done
	info "$name is ready"
}

is_png() { [[ $(head -c 8 "$1" | od -An -tx1 | tr -d ' \n') == 89504e470d0a1a0a ]]; }
count_png() { find "$1" -name '*.png' 2>/dev/null | wc -l; }

# fetch NAME URL FILE: GET URL into FILE, require 200 and a PNG.
fetch() {
	local code
	code=$(curl -sS -o "$3" -w '%{http_code}' "$2") || die "$1: curl failed: $2"
	[[ $code == 200 ]] || die "$1: HTTP $code for $2: $(head -c 300 "$3")"
	is_png "$3" || die "$1: not a PNG: $2: $(head -c 300 "$3")"
	info "$1: 200, PNG, $(wc -c <"$3") bytes  <- $2"
}

# in_cache FILE DIR: is FILE byte-identical to a tile stored under DIR?
in_cache() { [[ -n $(find "$2" -name '*.png' -size "$(wc -c <"$1")c" -exec cmp -s "$1" {} \; -print -quit) ]]; }

step "checking packages"
need=()
for pkg in python3-mapproxy mapproxy python3-requests python3-requests-unixsocket curl; do
	dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || need+=("$pkg")
done
if ((${#need[@]})); then
	info "installing ${need[*]}"
	((EUID == 0)) || die "missing packages ${need[*]}: run as root or install them"
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
info "MapProxy $($PY -c 'import mapproxy.version as v; print(v.version)')"

TMP=$(mktemp -d /tmp/mapproxy-renderd-demo.XXXXXX)
mkdir -p "$TMP/logs"

if [[ -n ${MAPPROXY_RENDERD_BIN:-} ]]; then
	BIN=$MAPPROXY_RENDERD_BIN
	step "using $BIN"
else
	step "building mapproxy-renderd"
	GO=$(command -v go || echo /usr/local/go/bin/go)
	[[ -x $GO ]] || die "Go not found (PATH or /usr/local/go/bin/go)"
	BIN=$TMP/mapproxy-renderd
	(cd "$repo" && "$GO" build -o "$BIN" .) || die "go build failed"
	info "built $BIN with $("$GO" version)"
fi

step "writing configs into $TMP"
read -r UP_PORT RD_PORT MP_PORT < <($PY -c '
import socket
socks = [socket.socket() for _ in range(3)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))')
SOCK=$TMP/renderd.sock
SOCK_URL="http+unix://$($PY -c 'import sys, urllib.parse; print(urllib.parse.quote(sys.argv[1], safe=""))' "$SOCK")/"
ex=$repo/examples
cp "$ex/upstream.yaml" "$ex/seed.yaml" "$TMP/"
# TCP variant (daemon's default address, mapproxy-seed) and Unix-socket variant (MapProxy).
sed -e "s|127.0.0.1:8112|127.0.0.1:$UP_PORT|" \
	-e "s|^\(    address:\) http://127.0.0.1:8111|\1 http://127.0.0.1:$RD_PORT|" \
	"$ex/mapproxy.yaml" >"$TMP/mapproxy.yaml"
sed -e "s|^\(    address:\) http://.*|\1 $SOCK_URL|" "$TMP/mapproxy.yaml" >"$TMP/mapproxy-unix.yaml"
sed -e "s|^mapproxy_config: .*|mapproxy_config: $TMP/mapproxy.yaml|" \
	-e "s|^socket: .*|socket: $SOCK|" \
	-e "s|^http: .*|http: 127.0.0.1:$RD_PORT|" \
	-e "s|^renderers: .*|renderers: 2|" \
	-e "s|^max_seed_renderers: .*|max_seed_renderers: 1|" \
	-e "s|^state_dir: .*|state_dir: $TMP/state|" \
	"$ex/renderd.yaml" >"$TMP/renderd.yaml"
grep -q "127.0.0.1:$UP_PORT/service" "$TMP/mapproxy.yaml" || die "could not set the upstream port"
grep -q "address: http://127.0.0.1:$RD_PORT" "$TMP/mapproxy.yaml" || die "could not set the renderd address"
grep -q "address: http+unix://" "$TMP/mapproxy-unix.yaml" || die "could not set the Unix renderd address"
grep -q "^socket: $SOCK" "$TMP/renderd.yaml" || die "could not set the socket in renderd.yaml"
# All the demo's state stays in $TMP: the journal never goes to the machine's /var/lib.
grep -q "^state_dir: $TMP/state" "$TMP/renderd.yaml" || die "could not set state_dir in renderd.yaml"
info "ports: upstream $UP_PORT, mapproxy-renderd $RD_PORT, MapProxy $MP_PORT"
info "MapProxy -> renderd: $SOCK_URL"

step "starting the upstream WMS (mapproxy-util serve-develop)"
start upstream "$TMP/logs/upstream.log" mapproxy-util serve-develop -b "127.0.0.1:$UP_PORT" "$TMP/upstream.yaml"
wait_for upstream "${pids[-1]}" 30 curl -sf -o /dev/null "http://127.0.0.1:$UP_PORT/service?SERVICE=WMS&REQUEST=GetCapabilities"

step "starting mapproxy-renderd"
start mapproxy-renderd "$TMP/logs/renderd.log" "$BIN" -f "$TMP/mapproxy.yaml" -s "$TMP/seed.yaml" -c "$TMP/renderd.yaml"
wait_for "mapproxy-renderd (socket)" "${pids[-1]}" 60 "$BIN" status --socket "$SOCK"
wait_for "mapproxy-renderd (TCP)" "${pids[-1]}" 10 curl -sf -o /dev/null "http://127.0.0.1:$RD_PORT/status"

step "starting MapProxy (mapproxy_wsgi.py on serve_wsgi.py, renderd over the Unix socket)"
info "serve_wsgi.py is a demo server; in production serve mapproxy_wsgi.py with mod_wsgi or gunicorn"
MAPPROXY_CONFIG=$TMP/mapproxy-unix.yaml start mapproxy "$TMP/logs/mapproxy.log" \
	"$PY" "$ex/serve_wsgi.py" "$ex/mapproxy_wsgi.py" "$MP_PORT"
wait_for mapproxy "${pids[-1]}" 30 curl -sf -o /dev/null "http://127.0.0.1:$MP_PORT/wmts/1.0.0/WMTSCapabilities.xml"
info "demo page: http://127.0.0.1:$MP_PORT/demo/"

step "fetching tiles through MapProxy"
MP=http://127.0.0.1:$MP_PORT
C=$TMP/cache_data
t=$TMP/tiles
mkdir -p "$t"
fetch "WMTS wmsl 5/17/10" "$MP/wmts/wmsl/GLOBAL_WEBMERCATOR/5/17/10.png" "$t/wmts.png"
cached=$C/wms_cache_EPSG3857/05/000/000/017/000/000/010.png
[[ -f $cached ]] || die "WMTS tile not in the cache: $cached"
cmp -s "$t/wmts.png" "$cached" || die "WMTS response differs from $cached"
n=$(count_png "$C/wms_cache_EPSG3857/05")
((n == 16)) || die "want the whole 4x4 metatile (16 tiles) at z5, have $n"
info "the 4x4 metatile is in the cache: $n tiles at z5, response == $cached"
fetch "WMTS wmsl again (cached)" "$MP/wmts/wmsl/GLOBAL_WEBMERCATOR/5/18/11.png" "$t/wmts2.png"
fetch "TMS dbg 9/536/668" "$MP/tms/1.0.0/dbg/GLOBAL_WEBMERCATOR/9/536/668.png" "$t/tms.png"
in_cache "$t/tms.png" "$C/dbg_cache_EPSG3857" || die "TMS dbg tile not found in the cache"
fetch "TMS geo 4/17/10 (GLOBAL_GEODETIC, 4x2)" "$MP/tms/1.0.0/geo/GLOBAL_GEODETIC/4/17/10.png" "$t/geo.png"
in_cache "$t/geo.png" "$C/geo_cache_EPSG4326" || die "TMS geo tile not found in the cache"
info "geo_cache: $(count_png "$C/geo_cache_EPSG4326") tiles (one 4x2 metatile)"
fetch "WMS GetMap wmsl 512x512" "$MP/service?SERVICE=WMS&REQUEST=GetMap&VERSION=1.1.1&LAYERS=wmsl&STYLES=&SRS=EPSG:3857&BBOX=0,5000000,2500000,7500000&WIDTH=512&HEIGHT=512&FORMAT=image/png" "$t/wms.png"

step "talking to mapproxy-renderd directly (native protocol on $SOCK)"
req='{"id": "demo-1", "command": "tile", "cache_identifier": "wms_cache_GLOBAL_WEBMERCATOR", "tiles": [[1, 2, 2]]}'
info "request: $req"
reply=$("$BIN" request --socket "$SOCK" "$req") || die "request failed: $reply"
info "reply:   $reply"
n=$(count_png "$C/wms_cache_EPSG3857/02")
((n == 16)) || die "want 16 tiles at z2, have $n"
req='{"id": "demo-2", "command": "tile", "cache_identifier": "no_such_cache", "tiles": [[0, 0, 0]]}'
info "request: $req"
if reply=$("$BIN" request --socket "$SOCK" "$req"); then
	die "an unknown cache should fail: $reply"
fi
info "reply:   $reply (non-zero exit, as it should)"

step "seeding by the daemon itself (mapproxy-renderd seed --wait initial; the daemon runs with -s seed.yaml)"
before=$(count_png "$C/wms_cache_EPSG3857")
timeout 300 "$BIN" seed --socket "$SOCK" --wait initial | tee "$TMP/logs/seed-initial.log" |
	sed 's/^/    /' || die "the seed task failed (see $TMP/logs/seed-initial.log)"
grep -q ' done ' "$TMP/logs/seed-initial.log" || die "the seed task did not end done"
after=$(count_png "$C/wms_cache_EPSG3857")
((after > before)) || die "seeding wrote nothing"
info "wms_cache: $before tiles before, $after after"
info "again: MapProxy's walker skips what is cached, so nothing is planned"
"$BIN" seed --socket "$SOCK" --wait initial | tee "$TMP/logs/seed-again.log" | sed 's/^/    /'
grep -q ' done 0/0 ' "$TMP/logs/seed-again.log" || die "the second run planned metatiles"
"$BIN" tasks --socket "$SOCK" | sed 's/^/    /'

step "refreshing through mapproxy-renderd with plain mapproxy-seed (--seed refresh -c 2, over TCP)"
touch "$TMP/refresh.mark"
# mapproxy-seed retries renderd errors for hours: bound it and look for retries.
timeout 300 mapproxy-seed -f "$TMP/mapproxy.yaml" -s "$TMP/seed.yaml" --seed refresh -c 2 \
	>"$TMP/logs/seed-refresh.log" 2>&1 || die "mapproxy-seed failed (see $TMP/logs/seed-refresh.log)"
! grep -q 'Retry in' "$TMP/logs/seed-refresh.log" || die "mapproxy-seed had to retry (see $TMP/logs/seed-refresh.log)"
n=$(find "$C/wms_cache_EPSG3857" -name '*.png' -newer "$TMP/refresh.mark" | wc -l)
((n > 0)) || die "the refresh rewrote no tile"
info "rewritten: $n tiles"

step "status document (mapproxy-renderd status --socket $SOCK)"
"$BIN" status --socket "$SOCK" || die "status failed"

step "tiles in $C"
for d in "$C"/*/; do
	[[ $(basename "$d") == locks || $(basename "$d") == tile_locks ]] && continue
	info "$(basename "$d"): $(count_png "$d") tiles"
done
info "logs: $TMP/logs"

step "all checks passed"
if [[ ${DEMO_KEEP:-} == 1 ]]; then
	info "still running: MapProxy demo page http://127.0.0.1:$MP_PORT/demo/, renderd status http://127.0.0.1:$RD_PORT/status"
	read -r -p "    press Enter to stop " _ || true
fi
