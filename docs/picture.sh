#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Makes docs/status-picture.png: the status page's pictures of the work (picture.go). A daemon
# with fake renderers (50 ms each; metatiles whose x is 52 fail) runs a seed task of 40×40
# metatiles at z14 (the test binary's fake planner) while users look around three places at
# z12: views commands as the MapProxy-side module sends them, and live requests for the
# metatiles they miss. After DURATION seconds headless Chromium takes the page. Needs go,
# socat and chromium. Everything runs in a temp dir and is stopped by PID.
#   DURATION=25   seconds of load before the screenshot
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-25}
dir=$(mktemp -d /tmp/mrd-picture.XXXXXX)
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
cache=osm_cache_GLOBAL_WEBMERCATOR
cat > "$dir/seed.yaml" <<YAML
seeds:
  region_z14: {caches: [osm_cache]}
YAML
cat > "$dir/renderd.yaml" <<YAML
socket: $dir/s.sock
http: 127.0.0.1:$port
renderers: 3
max_seed_renderers: 2
renderer_command: [$bin, fake-renderer, -delay, 50ms, -fail, "52", -caches, '{"$cache": {"meta_size": [4, 4]}}']
planner_command: [$bin, fake-planner, -n, "1600", -width, "40", -cache, $cache, -z, "14"]
seed_config: $dir/seed.yaml
seed_retries: 0
journal: false
log_level: warn
YAML
"$bin" daemon -c "$dir/renderd.yaml" 2>"$dir/daemon.log" &
pids+=($!)
for _ in $(seq 100); do [ -S "$dir/s.sock" ] && break; sleep 0.1; done
"$bin" daemon seed --socket "$dir/s.sock" region_z14
# Users: every second a batch of views around three places (the first the most popular), and
# live requests for a few of the tiles.
python3 - "$DURATION" "$cache" > "$dir/users.ndjson" <<'PY'
import json, random, sys
random.seed(3)
secs, cache = int(sys.argv[1]), sys.argv[2]
places = [(1210, 1530, 0.5), (1262, 1551, 0.3), (1190, 1575, 0.2)]
for s in range(secs):
    tiles = []
    for _ in range(200):
        u, acc = random.random(), 0
        for x, y, p in places:
            acc += p
            if u <= acc:
                break
        tiles.append([int(random.gauss(x, 4)), int(random.gauss(y, 3)), 12])
    print(json.dumps({"command": "views", "cache_identifier": cache, "tiles": tiles}))
    for t in tiles[:6]:
        print(json.dumps({"command": "tile", "cache_identifier": cache, "tiles": [t], "priority": 100, "background": True}))
PY
end=$((SECONDS + DURATION))
n=0
while [ $SECONDS -lt $end ]; do
	sed -n "$((n * 7 + 1)),$((n * 7 + 7))p" "$dir/users.ndjson" | socat -t 5 - "UNIX-CONNECT:$dir/s.sock" >/dev/null
	n=$((n + 1))
	sleep 1
done
chromium --headless --no-sandbox --disable-gpu --disable-background-networking --disable-component-update \
	--disable-sync --no-first-run --user-data-dir="$dir/profile" --hide-scrollbars --window-size=1200,1500 \
	--screenshot="$dir/page.png" "http://127.0.0.1:$port/?cache=$cache" 2>/dev/null
chromium --headless --no-sandbox --disable-gpu --disable-background-networking --disable-component-update \
	--disable-sync --no-first-run --user-data-dir="$dir/profile2" --dump-dom "http://127.0.0.1:$port/?cache=$cache" 2>/dev/null > "$dir/dom.html"
grep -q 'class="taskmap"' "$dir/dom.html" && grep -q 'id="heatmap"' "$dir/dom.html" || { echo "the page lacks the task map or the heat map" >&2; exit 1; }
cp "$dir/page.png" docs/status-picture.png
echo "wrote docs/status-picture.png ($(stat -c %s docs/status-picture.png) bytes)"
