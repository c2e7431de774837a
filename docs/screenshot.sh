#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Makes docs/status-page.png: a daemon with fake renderers (50 ms each) and the test
# binary's fake planner runs a seed task while live requests come in bursts, for about two
# minutes so that the sparklines have something to show; then headless Chromium takes the
# page. Needs go, socat and chromium. Everything runs in a temp dir and is stopped by PID.
#   DURATION=120   seconds of load before the screenshot
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-120}
dir=$(mktemp -d /tmp/mrd-shot.XXXXXX)
pids=()
cleanup() {
	for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
	for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
	rm -rf "$dir"
}
trap cleanup EXIT
go test -c -o "$dir/mrd.test" .
bin=$dir/mrd.test
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat > "$dir/seed.yaml" <<YAML
seeds:
  osm_z14: {caches: [osm_cache]}
YAML
cat > "$dir/renderd.yaml" <<YAML
socket: $dir/s.sock
http: 127.0.0.1:$port
renderers: 4
max_seed_renderers: 2
renderer_command: [$bin, fake-renderer, -delay, 50ms, -fail, 13]
planner_command: [$bin, fake-planner, -n, "20000", -cache, osm_cache_GLOBAL_WEBMERCATOR, -z, "14"]
seed_config: $dir/seed.yaml
seed_window: 400
log_level: warn
YAML
"$bin" daemon -c "$dir/renderd.yaml" 2>"$dir/daemon.log" &
pids+=($!)
for _ in $(seq 100); do [ -S "$dir/s.sock" ] && break; sleep 0.1; done
"$bin" daemon seed --socket "$dir/s.sock" osm_z14
# Live requests in bursts of varying size (background, so nobody holds a connection), one
# burst every 5 s; x = 13 fails on purpose now and then.
end=$((SECONDS + DURATION))
i=0
while [ $SECONDS -lt $end ]; do
	n=$(( (i % 7) * 40 + 10 ))
	for k in $(seq "$n"); do
		x=$(( (i * 1000 + k) % 5000 ))
		[ $((k % 97)) -eq 0 ] && x=13
		echo "{\"command\":\"tile\",\"cache_identifier\":\"osm_cache_GLOBAL_WEBMERCATOR\",\"tiles\":[[$x,$i,15]],\"priority\":100,\"background\":true}"
	done | socat -t 5 - "UNIX-CONNECT:$dir/s.sock" >/dev/null
	i=$((i + 1))
	sleep 5
done
chromium --headless --no-sandbox --disable-gpu --disable-background-networking --disable-component-update \
	--disable-sync --no-first-run --user-data-dir="$dir/profile" --hide-scrollbars --window-size=1200,1100 \
	--screenshot="$dir/page.png" "http://127.0.0.1:$port/" 2>/dev/null
cp "$dir/page.png" docs/status-page.png
echo "wrote docs/status-page.png ($(stat -c %s docs/status-page.png) bytes)"
