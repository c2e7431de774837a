#!/bin/bash
# SPDX-License-Identifier: Apache-2.0
# What a map user gets from unmodified MapProxy 1.15 when the daemon answers early
# (renderd.yaml http_wait): a slow upstream (3 s), http_wait 500ms, one WMTS tile
# fetched twice. Prints the headers MapProxy sends and what the first image holds.
# Usage: MRD=path/to/mapproxy-renderd bash examples/http-wait-demo.sh   (run from the repo)
# Needs python3-mapproxy, python3-requests-unixsocket, curl. Leaves its files in /tmp/hw.*.
set -u
REPO=$(cd "$(dirname "$0")/.." && pwd)
MRD=${MRD:-mapproxy-renderd}
D=$(mktemp -d /tmp/hw.XXXXXXXX); cd $D
waitline() { for i in $(seq 100); do [ -s "$1" ] && break; sleep 0.2; done; head -1 "$1" | sed 's/listening on //'; }
echo 3 > delay
cat > slow_wsgi.py <<EOF
import time
from mapproxy.wsgiapp import make_wsgi_app
_app = make_wsgi_app('$REPO/examples/upstream.yaml')
def application(environ, start_response):
    time.sleep(float(open('$D/delay').read()))
    return _app(environ, start_response)
EOF
/usr/bin/python3 $REPO/examples/serve_wsgi.py slow_wsgi.py 0 > up.out 2>up.err & UPPID=$!
UP=$(waitline up.out)
SOCK=$(python3 -c "import urllib.parse;print(urllib.parse.quote('$D/r.sock',safe=''))")
cat > mapproxy.yaml <<EOF
globals:
  cache: {base_dir: $D/cache_data, lock_dir: $D/cache_data/locks, tile_lock_dir: $D/cache_data/tile_locks}
  renderd: {address: "http+unix://$SOCK/"}
services: {wmts: {}}
layers:
  - {name: slow, title: slow upstream, sources: [slow_cache]}
caches:
  slow_cache:
    grids: [GLOBAL_WEBMERCATOR]
    sources: [slow_wms]
    format: image/png
    meta_size: [2, 2]
sources:
  slow_wms: {type: wms, supported_srs: ['EPSG:3857'], req: {url: "${UP}service", layers: dbg, transparent: true}}
EOF
printf 'socket: %s/r.sock\nhttp: ""\nrenderers: 1\nhttp_wait: 500ms\n' $D > renderd.yaml
"$MRD" -f mapproxy.yaml -c renderd.yaml 2> d.err & DPID=$!
for i in $(seq 100); do [ -S r.sock ] && break; sleep 0.1; done
MAPPROXY_CONFIG=$D/mapproxy.yaml /usr/bin/python3 $REPO/examples/serve_wsgi.py $REPO/examples/mapproxy_wsgi.py 0 > mp.out 2>mp.err & MPPID=$!
MP=$(waitline mp.out)
echo "== first request (render takes 3 s, http_wait 500ms)"
curl -s -D - -o t1.png -w 'time %{time_total}s size %{size_download}\n' ${MP}wmts/slow/GLOBAL_WEBMERCATOR/3/1/1.png
/usr/bin/python3 -c "from PIL import Image; im=Image.open('t1.png'); print(im.mode, im.size, 'extrema', im.getextrema())"
echo "files in cache right after: $(find cache_data -name '*.png' 2>/dev/null | wc -l)"
sleep 4
echo "files in cache 4 s later: $(find cache_data -name '*.png' | wc -l)"
echo "== second request"
curl -s -D - -o t2.png -w 'time %{time_total}s size %{size_download}\n' ${MP}wmts/slow/GLOBAL_WEBMERCATOR/3/1/1.png
kill $MPPID $DPID $UPPID; wait 2>/dev/null
echo $D
