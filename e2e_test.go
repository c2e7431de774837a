// SPDX-License-Identifier: Apache-2.0

package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"io/fs"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"gopkg.in/yaml.v3"
)

// requireMapProxy fails under CI=true and skips elsewhere when Debian's MapProxy is missing.
func requireMapProxy(t *testing.T) {
	t.Helper()
	err := exec.Command("/usr/bin/python3", "-c", "import mapproxy, requests, requests_unixsocket").Run()
	if err == nil {
		_, err = exec.LookPath("mapproxy-seed")
	}
	if err != nil {
		msg := "MapProxy is missing (apt-get install python3-mapproxy mapproxy python3-requests python3-requests-unixsocket): " + err.Error()
		if os.Getenv("CI") == "true" {
			t.Fatal(msg)
		}
		t.Skip(msg)
	}
}

// mapproxyRig is a real MapProxy setup on loopback: an upstream MapProxy serving its debug
// source as WMS, the daemon (run() in this process, with the bundled worker), and two
// MapProxy front ends built from examples/mapproxy_wsgi.py, one posting to the daemon's TCP
// port and one to its Unix socket.
type mapproxyRig struct {
	t         *testing.T
	dir       string
	socket    string
	daemonTCP string
	mpTCP     string // base URL of the MapProxy that reaches the daemon over TCP
	mpUnix    string // base URL of the MapProxy that reaches it over the Unix socket
	log       *syncBuffer
}

func newMapProxyRig(t *testing.T) *mapproxyRig {
	requireMapProxy(t)
	repo, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	dir := shortTempDir(t)
	r := &mapproxyRig{t: t, dir: dir, socket: dir + "/renderd.sock", daemonTCP: freeTCPAddr(t), log: &syncBuffer{}}

	upstream := r.serveWSGI(filepath.Join(repo, "examples/upstream.yaml"), nil)
	closedPort := freeTCPAddr(t) // nothing listens here: the broken source

	conf := r.readYAML(filepath.Join(repo, "examples/mapproxy.yaml"))
	conf["globals"].(map[string]any)["renderd"] = map[string]any{"address": "http://" + r.daemonTCP}
	sources := conf["sources"].(map[string]any)
	sources["upstream_wms"].(map[string]any)["req"].(map[string]any)["url"] = upstream + "service"
	sources["broken_wms"] = map[string]any{"type": "wms", "supported_srs": []string{"EPSG:3857"},
		"req": map[string]any{"url": "http://" + closedPort + "/service", "layers": "x"}}
	conf["caches"].(map[string]any)["broken_cache"] = map[string]any{"grids": []string{"GLOBAL_WEBMERCATOR"},
		"sources": []string{"broken_wms"}, "format": "image/png"}
	sources["seedonly_wms"] = map[string]any{"type": "wms", "supported_srs": []string{"EPSG:3857"}, "seed_only": true,
		"req": map[string]any{"url": upstream + "service", "layers": "dbg", "transparent": true}}
	conf["caches"].(map[string]any)["seedonly_cache"] = map[string]any{"grids": []string{"GLOBAL_WEBMERCATOR"},
		"sources": []string{"seedonly_wms"}, "format": "image/png", "meta_size": []int{4, 4}}
	conf["layers"] = append(conf["layers"].([]any),
		map[string]any{"name": "broken", "title": "broken upstream", "sources": []string{"broken_cache"}},
		map[string]any{"name": "seedonly", "title": "seed_only upstream", "sources": []string{"seedonly_cache"}})
	r.writeYAML("mapproxy.yaml", conf)
	conf["globals"].(map[string]any)["renderd"] = map[string]any{"address": "http+unix://" + url.PathEscape(r.socket) + "/"}
	r.writeYAML("mapproxy-unix.yaml", conf)
	if err := os.WriteFile(dir+"/renderd.yaml", []byte("socket: "+r.socket+"\nrenderers: 4\nmax_seed_renderers: 2\nrender_timeout: 30s\nstate_dir: "+dir+"/state\n"), 0o644); err != nil {
		t.Fatal(err)
	}

	runConfiguredDaemon(t, r.socket, r.log, "-f", dir+"/mapproxy.yaml", "-c", dir+"/renderd.yaml")

	r.mpTCP = r.serveWSGI(filepath.Join(repo, "examples/mapproxy_wsgi.py"), []string{"MAPPROXY_CONFIG=" + dir + "/mapproxy.yaml"})
	r.mpUnix = r.serveWSGI(filepath.Join(repo, "examples/mapproxy_wsgi.py"), []string{"MAPPROXY_CONFIG=" + dir + "/mapproxy-unix.yaml"})
	return r
}

func (r *mapproxyRig) readYAML(path string) map[string]any {
	b, err := os.ReadFile(path)
	if err != nil {
		r.t.Fatal(err)
	}
	var m map[string]any
	if err := yaml.Unmarshal(b, &m); err != nil {
		r.t.Fatal(err)
	}
	return m
}

func (r *mapproxyRig) writeYAML(name string, v any) {
	b, err := yaml.Marshal(v)
	if err != nil {
		r.t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(r.dir, name), b, 0o644); err != nil {
		r.t.Fatal(err)
	}
}

// serveWSGI starts examples/serve_wsgi.py on a free loopback port and returns its base URL once
// it is listening. A .yaml is served as a plain MapProxy app (the upstream).
func (r *mapproxyRig) serveWSGI(app string, env []string) string {
	t := r.t
	repo, _ := os.Getwd()
	if strings.HasSuffix(app, ".yaml") {
		wsgi := filepath.Join(r.dir, "upstream_wsgi.py")
		src := fmt.Sprintf("from mapproxy.wsgiapp import make_wsgi_app\napplication = make_wsgi_app(%q)\n", app)
		if err := os.WriteFile(wsgi, []byte(src), 0o644); err != nil {
			t.Fatal(err)
		}
		app = wsgi
	}
	cmd := exec.Command("/usr/bin/python3", filepath.Join(repo, "examples/serve_wsgi.py"), app, "0")
	cmd.Dir = r.dir
	cmd.Env = append(os.Environ(), env...)
	stderr := &syncBuffer{}
	cmd.Stderr = stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	startTestGroup(t, cmd, 10*time.Second, func() { t.Logf("%s log (tail):\n%s", filepath.Base(app), tail(stderr.String(), 3000)) })
	line := make(chan string, 1)
	go func() {
		s, _ := bufio.NewReader(out).ReadString('\n')
		line <- s
		io.Copy(io.Discard, out)
	}()
	select {
	case s := <-line:
		base, ok := strings.CutPrefix(strings.TrimSpace(s), "listening on ")
		if !ok {
			t.Fatalf("serve_wsgi %s: got %q\n%s", app, s, stderr.String())
		}
		return base
	case <-time.After(60 * time.Second):
		t.Fatalf("serve_wsgi %s did not start\n%s", app, stderr.String())
	}
	return ""
}

func tail(s string, n int) string {
	if len(s) > n {
		return "…" + s[len(s)-n:]
	}
	return s
}

// get fetches a URL and returns status, content type, body and the time it took.
func (r *mapproxyRig) get(u string) (int, string, []byte, time.Duration) {
	r.t.Helper()
	c := &http.Client{Timeout: 120 * time.Second}
	start := time.Now()
	resp, err := c.Get(u)
	if err != nil {
		r.t.Fatalf("GET %s: %v", u, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, resp.Header.Get("Content-Type"), b, time.Since(start)
}

func (r *mapproxyRig) status() statusDoc {
	d := &testDaemon{t: r.t, socket: r.socket}
	return d.status()
}

func (r *mapproxyRig) rendered(cache string) uint64 {
	return r.status().Caches[cache]["rendered"]
}

// pngFiles lists the PNG files below dir (relative to the cache directory).
func (r *mapproxyRig) pngFiles(sub string) []string {
	var files []string
	root := filepath.Join(r.dir, "cache_data", sub)
	filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err == nil && !d.IsDir() && strings.HasSuffix(p, ".png") {
			rel, _ := filepath.Rel(root, p)
			files = append(files, rel)
		}
		return nil
	})
	return files
}

func isPNG(b []byte) bool { return bytes.HasPrefix(b, []byte("\x89PNG\r\n\x1a\n")) }

func TestMapProxyEndToEnd(t *testing.T) {
	r := newMapProxyRig(t)
	const wms = "wms_cache_GLOBAL_WEBMERCATOR"
	lowLevels := func() map[string]bool { // tiles at levels 0-7 of wms_cache
		m := map[string]bool{}
		for _, f := range r.pngFiles("wms_cache_EPSG3857") {
			if f[:2] <= "07" {
				m[f] = true
			}
		}
		return m
	}
	var seeded []string // tiles at levels 0-7 that the seed created

	t.Run("wmts over TCP renders the whole 4x4 metatile once", func(t *testing.T) {
		r.t = t
		code, ctype, body, took := r.get(r.mpTCP + "wmts/wmsl/GLOBAL_WEBMERCATOR/5/17/10.png")
		if code != 200 || ctype != "image/png" || !isPNG(body) {
			t.Fatalf("got %d %s %.80q", code, ctype, body)
		}
		if n := r.rendered(wms); n != 1 {
			t.Errorf("renders: got %d, want 1", n)
		}
		if files := r.pngFiles("wms_cache_EPSG3857/05"); len(files) != 16 {
			t.Errorf("tiles on disk at level 5: got %d %v, want 16", len(files), files)
		}
		t.Logf("first WMTS tile through MapProxy → daemon (TCP) → worker: %v", took.Round(time.Millisecond))
	})

	t.Run("wmts over the Unix socket renders the whole metatile once", func(t *testing.T) {
		r.t = t
		before := r.rendered(wms)
		code, ctype, body, took := r.get(r.mpUnix + "wmts/wmsl/GLOBAL_WEBMERCATOR/6/40/21.png")
		if code != 200 || ctype != "image/png" || !isPNG(body) {
			t.Fatalf("got %d %s %.200q", code, ctype, body)
		}
		if n := r.rendered(wms) - before; n != 1 {
			t.Errorf("renders: got %d, want 1", n)
		}
		if files := r.pngFiles("wms_cache_EPSG3857/06"); len(files) != 16 {
			t.Errorf("tiles on disk at level 6: got %d, want 16", len(files))
		}
		t.Logf("first WMTS tile through MapProxy → daemon (Unix socket) → worker: %v", took.Round(time.Millisecond))
	})

	// MapProxy's WMTS serves only north-west-origin grids; TMS serves GLOBAL_GEODETIC (origin
	// south-west, y counting up), and MapProxy sends the metatile's top-left tile (x0, y0+1).
	t.Run("sw-origin grid with a 4x2 metatile", func(t *testing.T) {
		r.t = t
		code, ctype, body, _ := r.get(r.mpTCP + "tms/1.0.0/geo/GLOBAL_GEODETIC/4/21/5.png")
		if code != 200 || ctype != "image/png" || !isPNG(body) {
			t.Fatalf("got %d %s %.200q", code, ctype, body)
		}
		if n := r.rendered("geo_cache_GLOBAL_GEODETIC"); n != 1 {
			t.Errorf("renders: got %d, want 1", n)
		}
		files := r.pngFiles("geo_cache_EPSG4326")
		if len(files) != 8 {
			t.Errorf("tiles on disk: got %d %v, want 8 (one 4x2 metatile)", len(files), files)
		}
		// Another tile of that metatile is now served from the cache without a render.
		code, _, _, _ = r.get(r.mpUnix + "tms/1.0.0/geo/GLOBAL_GEODETIC/4/23/4.png")
		if n := r.rendered("geo_cache_GLOBAL_GEODETIC"); code != 200 || n != 1 {
			t.Errorf("neighbour in the same metatile: got %d with %d renders, want 200 and still 1", code, n)
		}
	})

	t.Run("concurrent requests for tiles of one metatile render once", func(t *testing.T) {
		r.t = t
		before := r.rendered(wms)
		var wg sync.WaitGroup
		codes := make(chan int, 16)
		for i, base := range []string{r.mpTCP, r.mpUnix, r.mpTCP, r.mpUnix, r.mpTCP, r.mpUnix, r.mpTCP, r.mpUnix} {
			wg.Add(1)
			go func() {
				defer wg.Done()
				c := &http.Client{Timeout: 120 * time.Second}
				resp, err := c.Get(fmt.Sprintf("%swmts/wmsl/GLOBAL_WEBMERCATOR/7/%d/%d.png", base, 32+i%4, 20+i/4))
				if err != nil {
					codes <- 0
					return
				}
				io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				codes <- resp.StatusCode
			}()
		}
		wg.Wait()
		close(codes)
		for c := range codes {
			if c != 200 {
				t.Errorf("a concurrent request got %d", c)
			}
		}
		if n := r.rendered(wms) - before; n != 1 {
			t.Errorf("renders for 8 concurrent requests in one metatile: got %d, want 1", n)
		}
	})

	t.Run("broken source gives MapProxy the renderer's error promptly", func(t *testing.T) {
		r.t = t
		code, _, body, took := r.get(r.mpTCP + "wmts/broken/GLOBAL_WEBMERCATOR/3/1/1.png")
		if code != 500 || !strings.Contains(string(body), "Error from renderd") {
			t.Fatalf("got %d %.300q, want 500 with MapProxy's 'Error from renderd'", code, body)
		}
		if !strings.Contains(string(body), "Error from renderd: No response from URL") {
			t.Errorf("the error does not carry the renderer's cause: %.400q", body)
		}
		t.Logf("broken source: MapProxy answered %d after %v: %.200s", code, took.Round(time.Millisecond), body)
	})

	t.Run("seeding through the daemon keeps renderers free for live requests", func(t *testing.T) {
		r.t = t
		seed := map[string]any{
			"coverages": map[string]any{"area": map[string]any{"bbox": []float64{8.0, 47.5, 12.0, 50.0}, "srs": "EPSG:4326"}},
			"seeds": map[string]any{"big": map[string]any{"caches": []string{"wms_cache"}, "grids": []string{"GLOBAL_WEBMERCATOR"},
				"coverages": []string{"area"}, "levels": map[string]int{"from": 0, "to": 12}}},
		}
		r.writeYAML("seed-big.yaml", seed)
		before := r.status()
		lowBefore := lowLevels()
		cmd := exec.Command("mapproxy-seed", "-f", r.dir+"/mapproxy.yaml", "-s", r.dir+"/seed-big.yaml", "--seed", "big", "-c", "4")
		cmd.Dir = r.dir
		var seedOut syncBuffer
		cmd.Stdout, cmd.Stderr = &seedOut, &seedOut
		start := time.Now()
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		seedDone := make(chan error, 1)
		go func() { seedDone <- cmd.Wait() }()

		var maxSeedBusy, sawSeedQueued int
		var live []time.Duration
		tick := time.NewTicker(100 * time.Millisecond)
		defer tick.Stop()
		liveX := 0
		var seedErr error
	loop:
		for {
			select {
			case seedErr = <-seedDone:
				break loop
			case <-tick.C:
				s := r.status()
				maxSeedBusy = max(maxSeedBusy, s.Renderers.BusySeed)
				sawSeedQueued = max(sawSeedQueued, s.Queue.SeedQueued)
				// A live request for an uncached tile far from the seeded area.
				x, y := (4*liveX)%512, 300+4*(4*liveX/512)
				code, _, body, took := r.get(fmt.Sprintf("%swmts/wmsl/GLOBAL_WEBMERCATOR/9/%d/%d.png", r.mpTCP, x, y))
				liveX++
				if code != 200 || !isPNG(body) {
					t.Errorf("live request during seeding: got %d", code)
				}
				live = append(live, took)
			case <-time.After(5 * time.Minute):
				t.Fatal("seeding did not finish within 5 minutes")
			}
		}
		seedTime := time.Since(start)
		if seedErr != nil {
			t.Fatalf("mapproxy-seed: %v\n%s", seedErr, tail(seedOut.String(), 2000))
		}
		for f := range lowLevels() {
			if !lowBefore[f] {
				seeded = append(seeded, f)
			}
		}
		after := r.status()
		seededJobs := after.Caches[wms]["rendered"] - before.Caches[wms]["rendered"] - uint64(len(live))
		if maxSeedBusy > 2 {
			t.Errorf("renderers busy with seed jobs: saw %d, want at most max_seed_renderers 2", maxSeedBusy)
		}
		if seededJobs < 50 {
			t.Errorf("metatiles seeded through the daemon: got %d, want the whole seed (≥ 50)", seededJobs)
		}
		slices.Sort(live)
		if len(live) > 0 {
			t.Logf("mapproxy-seed -c 4, levels 0-12: %d metatiles in %v (%.1f/s) on 2 of 4 renderers; seed jobs queued at most %d",
				seededJobs, seedTime.Round(time.Millisecond), float64(seededJobs)/seedTime.Seconds(), sawSeedQueued)
			t.Logf("live WMTS requests meanwhile (each an uncached metatile): n=%d min %v p50 %v max %v; render p50 %.1f ms",
				len(live), live[0].Round(time.Millisecond), live[len(live)/2].Round(time.Millisecond), live[len(live)-1].Round(time.Millisecond), after.RenderMS["p50"])
		}
	})

	t.Run("refresh seed rewrites existing tiles", func(t *testing.T) {
		r.t = t
		repo, _ := os.Getwd()
		mtimes := map[string]time.Time{}
		for _, f := range seeded {
			fi, err := os.Stat(filepath.Join(r.dir, "cache_data/wms_cache_EPSG3857", f))
			if err != nil {
				t.Fatal(err)
			}
			mtimes[f] = fi.ModTime()
		}
		if len(mtimes) < 20 {
			t.Fatalf("only %d seeded tiles at levels 0-7 before the refresh", len(mtimes))
		}
		out, err := exec.Command("mapproxy-seed", "-f", r.dir+"/mapproxy.yaml", "-s", filepath.Join(repo, "examples/seed.yaml"), "--seed", "refresh", "-c", "2").CombinedOutput()
		if err != nil {
			t.Fatalf("mapproxy-seed --seed refresh: %v\n%s", err, tail(string(out), 2000))
		}
		stale := 0
		for f, m := range mtimes {
			fi, err := os.Stat(filepath.Join(r.dir, "cache_data/wms_cache_EPSG3857", f))
			if err != nil || !fi.ModTime().After(m) {
				stale++
			}
		}
		// The refresh seed covers what the first seed made at these levels: every tile is rewritten.
		if stale > 0 {
			t.Errorf("tiles not rewritten by the refresh seed: %d of %d", stale, len(mtimes))
		}
		t.Logf("refresh seed rewrote %d of %d existing tiles at levels 0-7", len(mtimes)-stale, len(mtimes))
	})

	// A seed_only source renders for mapproxy-seed only: a live request gets MapProxy's blank
	// tile and nothing is stored, while seeding through the daemon fills the cache.
	t.Run("seed_only sources render for seeding, not for live requests", func(t *testing.T) {
		r.t = t
		code, ctype, body, _ := r.get(r.mpTCP + "wmts/seedonly/GLOBAL_WEBMERCATOR/2/1/1.png")
		if code != 200 || ctype != "image/png" || !isPNG(body) {
			t.Fatalf("live request: got %d %s", code, ctype)
		}
		if files := r.pngFiles("seedonly_cache_EPSG3857"); len(files) != 0 {
			t.Fatalf("a live request stored %d tiles of a seed_only source, want none", len(files))
		}
		r.writeYAML("seed-only.yaml", map[string]any{"seeds": map[string]any{"so": map[string]any{
			"caches": []string{"seedonly_cache"}, "grids": []string{"GLOBAL_WEBMERCATOR"}, "levels": map[string]int{"from": 0, "to": 2}}}})
		out, err := exec.Command("mapproxy-seed", "-f", r.dir+"/mapproxy.yaml", "-s", r.dir+"/seed-only.yaml", "--seed", "so", "-c", "2").CombinedOutput()
		if err != nil {
			t.Fatalf("mapproxy-seed: %v\n%s", err, tail(string(out), 2000))
		}
		if files := r.pngFiles("seedonly_cache_EPSG3857"); len(files) != 1+4+16 {
			t.Fatalf("seeded tiles of the seed_only cache: got %d, want 21 (levels 0-2)", len(files))
		}
	})

	b, _ := json.MarshalIndent(r.status().Counters, "", " ")
	t.Logf("daemon counters after the end-to-end run: %s", b)
}
