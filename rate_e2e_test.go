// SPDX-License-Identifier: Apache-2.0

package main

import (
	"bytes"
	"image"
	"image/color"
	"image/png"
	"io/fs"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// fragileUpstream is a WMS on loopback that answers GetMap with an opaque PNG of the asked
// size, and 503 to any request beyond limit in the last second (limit 0: never). It keeps
// every request's time and status.
type fragileUpstream struct {
	limit int
	mu    sync.Mutex
	ok    []time.Time // answered 200, the last second's
	log   []upstreamHit
	pngs  map[[2]int][]byte
}

type upstreamHit struct {
	at     time.Time
	status int
}

func (u *fragileUpstream) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	now := time.Now()
	u.mu.Lock()
	i := 0
	for i < len(u.ok) && now.Sub(u.ok[i]) >= time.Second {
		i++
	}
	u.ok = u.ok[i:]
	status := http.StatusOK
	if u.limit > 0 && len(u.ok) >= u.limit {
		status = http.StatusServiceUnavailable
	} else {
		u.ok = append(u.ok, now)
	}
	u.log = append(u.log, upstreamHit{now, status})
	var wid, hei int
	for k, v := range r.URL.Query() { // MapProxy writes WMS parameters in lower case
		switch strings.ToUpper(k) {
		case "WIDTH":
			wid, _ = strconv.Atoi(v[0])
		case "HEIGHT":
			hei, _ = strconv.Atoi(v[0])
		}
	}
	body := u.png(min(max(wid, 1), 4096), min(max(hei, 1), 4096))
	u.mu.Unlock()
	if status != http.StatusOK {
		http.Error(w, "overloaded", status)
		return
	}
	w.Header().Set("Content-Type", "image/png")
	w.Write(body)
}

// png returns an opaque PNG of w×h (cached by size). u.mu is held.
func (u *fragileUpstream) png(w, h int) []byte {
	if b, ok := u.pngs[[2]int{w, h}]; ok {
		return b
	}
	img := image.NewNRGBA(image.Rect(0, 0, w, h))
	for i := 0; i < len(img.Pix); i += 4 {
		img.Pix[i], img.Pix[i+1], img.Pix[i+2], img.Pix[i+3] = 40, 120, 200, 255
	}
	img.Set(0, 0, color.NRGBA{255, 0, 0, 255})
	var buf bytes.Buffer
	png.Encode(&buf, img)
	if u.pngs == nil {
		u.pngs = make(map[[2]int][]byte)
	}
	u.pngs[[2]int{w, h}] = buf.Bytes()
	return buf.Bytes()
}

func (u *fragileUpstream) hits() []upstreamHit {
	u.mu.Lock()
	defer u.mu.Unlock()
	return append([]upstreamHit(nil), u.log...)
}

// serveFragile starts u on a loopback port until the test ends; it returns the base URL.
func serveFragile(t *testing.T, u *fragileUpstream) string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: u, ReadHeaderTimeout: 10 * time.Second}
	done := make(chan struct{})
	go func() { srv.Serve(l); close(done) }()
	t.Cleanup(func() { srv.Close(); <-done })
	return "http://" + l.Addr().String() + "/"
}

// TestSeedThroughMapProxyBacksOffFragileUpstream: a seed task with the bundled worker and
// real MapProxy, no rate set, against an upstream that answers 503 above 5 requests per
// second. The worker reports upstream_status 503; the cache's limiter halves from the rate
// it observed until the upstream stops refusing; the task ends done with every tile and no
// counted failure (seed_retries 0, seed_max_failure_ratio 0), and only a few 503s follow the
// first backoff.
func TestSeedThroughMapProxyBacksOffFragileUpstream(t *testing.T) {
	requireMapProxy(t)
	t.Parallel() // subprocesses for seconds: overlap with the other MapProxy tests
	up := &fragileUpstream{limit: 5}
	base := serveFragile(t, up)
	dir := shortTempDir(t)
	mapproxy := `globals:
  cache: {base_dir: ` + dir + `/cache_data, lock_dir: ` + dir + `/cache_data/locks}
  http: {client_timeout: 10}
services:
  tms: {use_grid_names: true}
layers:
  - {name: rl, title: fragile upstream, sources: [rl_cache]}
caches:
  rl_cache:
    grids: [GLOBAL_WEBMERCATOR]
    sources: [rl_wms]
    format: image/png
    meta_size: [4, 4]
    meta_buffer: 0
sources:
  rl_wms:
    type: wms
    supported_srs: ['EPSG:3857']
    req: {url: '` + base + `service', layers: x}
`
	seed := "seeds:\n  all:\n    caches: [rl_cache]\n    levels: {to: 5}\n"
	socket := dir + "/renderd.sock"
	renderd := "socket: " + socket + "\nrenderers: 2\nmax_seed_renderers: 2\nrender_timeout: 60s\nseed_config: " + dir + "/seed.yaml\n" +
		"state_dir: " + dir + "/state\nseed_retries: 0\nseed_max_failure_ratio: 0\nseed_retry_backoff: 50ms\n"
	for name, body := range map[string]string{"mapproxy.yaml": mapproxy, "seed.yaml": seed, "renderd.yaml": renderd} {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	d := runConfiguredDaemon(t, socket, &syncBuffer{}, "-f", dir+"/mapproxy.yaml", "-c", dir+"/renderd.yaml")
	tr := &taskRig{testDaemon: d}
	doc := taskOf(t, tr.call(`{"command":"seed","id":"s","task":"all"}`))
	doc = tr.waitTaskLong(doc.TaskID, "ended", func(d taskDoc) bool { return d.finished() })
	st := d.status()
	rl := rateOf(st, "rl_cache_GLOBAL_WEBMERCATOR")

	const metatiles, tiles = 1 + 1 + 1 + 4 + 16 + 64, 1 + 4 + 16 + 64 + 256 + 1024
	if doc.State != taskStateDone || doc.Done != metatiles || doc.Failed != 0 {
		t.Fatalf("task: got %+v; want done, %d metatiles, none failed", doc, metatiles)
	}
	n := 0
	filepath.WalkDir(dir+"/cache_data", func(p string, e fs.DirEntry, err error) error {
		if err == nil && strings.HasSuffix(p, ".png") {
			n++
		}
		return nil
	})
	if n != tiles {
		t.Errorf("tiles in the cache: got %d, want %d", n, tiles)
	}
	hits := up.hits()
	first, total, after := -1, 0, 0
	for i, h := range hits {
		if h.status != http.StatusServiceUnavailable {
			continue
		}
		total++
		if first < 0 {
			first = i
		} else if h.at.Sub(hits[first].at) > time.Second {
			after++ // beyond the flight that was under way at the first 503
		}
	}
	span := hits[len(hits)-1].at.Sub(hits[0].at)
	t.Logf("%d upstream requests over %v, %d answered 503 (%d more than 1 s after the first); %d retried; limiter %+v",
		len(hits), span.Round(time.Millisecond), total, after, doc.Retried, rl)
	if total == 0 || rl.BackoffEvents == 0 {
		t.Fatalf("the upstream never refused or the limiter never backed off: %d 503s, %+v", total, rl)
	}
	if after > 10 {
		t.Errorf("%d 503s more than 1 s after the first backoff; want a few (at most 10)", after)
	}
}
