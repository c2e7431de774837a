// SPDX-License-Identifier: Apache-2.0

// Command trace benchmarks next-zoom prefetch with simulated users browsing through real
// MapProxy (docs/design.md §18):
//
//	trace -daemon BIN [-users 3] [-sessions 12] [-steps 10] [-think 400ms] [-delay 150ms] [-json FILE]
//
// Pieces, all on loopback and in a temp dir: a slow upstream WMS (MapProxy's debug source
// behind a WSGI wrapper that sleeps -delay per request and counts requests: one upstream
// request is one metatile render), the daemon with the bundled worker (2 renderers), and the
// MapProxy the users talk to, with python/mapproxy_renderd.py enabled (enable() with a long
// wait_ms, so that latency is the render's, and enable_views()). Each mode gets a fresh
// daemon, a fresh front MapProxy and an empty tile cache.
//
// The users replay one trace, the same for every mode: sessions that start near a point of
// interest drawn from a skewed (Zipf) popularity, then per step zoom in towards the point
// (55 %), pan by a tile or two (25 %) or zoom out (20 %), with a think time between views.
// A view is 5×4 tiles of WMTS, asked over 6 connections as a browser does. When a view is
// asked, the client looks at MapProxy's tile cache: "ready" means the tile's file was there
// (so a tile of a metatile that an earlier request of the same view rendered is not ready).
//
// Reported per mode: the share of ready tiles among the views right after a zoom-in (z+1)
// and among all views, the renders (upstream requests) per distinct tile viewed and against
// no prefetch, and the latency of tile requests (all, and those not ready).
package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"math"
	"math/rand"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"
)

var (
	seedNice  int
	thinkText string
)

type mode struct {
	Name     string
	Prefetch string // renderd.yaml prefetch: value; "" = none
}

var modes = []mode{
	{"no prefetch", ""},
	{"all, levels 1", "{caches: [tc], levels: 1}"},
	{"centre, levels 1", "{caches: [tc], levels: 1, area: centre}"},
	{"views, budget 0.25", "{caches: [tc], area: views, budget: 0.25}"},
	{"views, budget 0.5", "{caches: [tc], area: views, budget: 0.5}"},
	{"views, budget 1.0", "{caches: [tc], area: views, budget: 1.0}"},
}

// step is one view of a session: its zoom and centre in tiles, and how it was reached.
type step struct {
	Z      int
	CX, CY float64
	Kind   string // start, in, pan, out
	Think  time.Duration
}

type result struct {
	Mode                     string
	ZoomInReady, ZoomInTiles int
	Ready, Tiles             int
	Distinct                 int
	Renders                  int
	LatP50, LatP90           float64 // ms, all tile requests
	MissP50                  float64 // ms, tiles not ready
	Seconds                  float64
	RendersVsNone            float64
}

func main() {
	bin := flag.String("daemon", "", "mapproxy-renderd binary")
	users := flag.Int("users", 3, "concurrent users")
	sessions := flag.Int("sessions", 9, "sessions in the trace")
	steps := flag.Int("steps", 10, "views per session")
	think := flag.Duration("think", 2*time.Second, "mean time a user looks at a view (uniform, ±50 %)")
	delay := flag.Duration("delay", 150*time.Millisecond, "upstream delay per request")
	seed := flag.Int64("seed", 1, "trace seed")
	only := flag.String("modes", "", "mode names to run, separated by semicolons (default all)")
	flag.IntVar(&seedNice, "seed-nice", 0, "the daemons' seed_nice (prefetch jobs are in the seed class)")
	jsonOut := flag.String("json", "", "write the results as JSON here")
	flag.Parse()
	if *bin == "" {
		fmt.Fprintln(os.Stderr, "trace: -daemon is required")
		os.Exit(2)
	}
	trace := makeTrace(rand.New(rand.NewSource(*seed)), *sessions, *steps, *think)
	thinkText = fmt.Sprintf("%s–%s", *think/2, *think*3/2)
	if err := run(*bin, trace, *users, *delay, *only, *jsonOut); err != nil {
		fmt.Fprintln(os.Stderr, "trace:", err)
		os.Exit(1)
	}
}

// makeTrace draws the sessions. Points of interest lie in a 0.3×0.3 part of the world (a
// region with its cities), popularity Zipf(1.1) over 30 points.
func makeTrace(r *rand.Rand, sessions, steps int, think time.Duration) [][]step {
	type poi struct{ x, y float64 } // fractions of the world
	pois := make([]poi, 30)
	for i := range pois {
		pois[i] = poi{0.45 + 0.3*r.Float64(), 0.25 + 0.3*r.Float64()}
	}
	zipf := rand.NewZipf(r, 1.1, 1, uint64(len(pois)-1))
	out := make([][]step, sessions)
	for s := range out {
		p := pois[zipf.Uint64()]
		z := 9 + r.Intn(2)
		scale := math.Ldexp(1, z)
		cx, cy := p.x*scale+r.NormFloat64()*2, p.y*scale+r.NormFloat64()*2
		th := func() time.Duration { return think/2 + time.Duration(r.Int63n(int64(think))) }
		seq := []step{{z, cx, cy, "start", th()}}
		for range steps - 1 {
			u := r.Float64()
			switch {
			case u < 0.55 && z < 16: // zoom in, a third of the way towards the point
				z++
				cx, cy = cx*2, cy*2
				px, py := p.x*math.Ldexp(1, z), p.y*math.Ldexp(1, z)
				cx += (px-cx)/3 + r.NormFloat64()*0.7
				cy += (py-cy)/3 + r.NormFloat64()*0.7
				seq = append(seq, step{z, cx, cy, "in", th()})
			case u < 0.8 || z <= 9:
				a := r.Float64() * 2 * math.Pi
				d := 1 + r.Float64()
				cx, cy = cx+d*math.Cos(a), cy+d*math.Sin(a)
				seq = append(seq, step{z, cx, cy, "pan", th()})
			default:
				z--
				cx, cy = cx/2, cy/2
				seq = append(seq, step{z, cx, cy, "out", th()})
			}
		}
		out[s] = seq
	}
	return out
}

// viewTiles is the 5×4 tiles around a centre, clipped to the level.
func viewTiles(st step) [][3]int {
	n := 1 << st.Z
	x0, y0 := int(math.Floor(st.CX-2.5)), int(math.Floor(st.CY-2))
	var out [][3]int
	for y := y0; y < y0+4; y++ {
		for x := x0; x < x0+5; x++ {
			if x >= 0 && y >= 0 && x < n && y < n {
				out = append(out, [3]int{x, y, st.Z})
			}
		}
	}
	return out
}

// procs starts helper processes in their own process groups and stops exactly those.
type procs struct {
	mu   sync.Mutex
	list []*exec.Cmd
}

func (p *procs) start(cmd *exec.Cmd) error {
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		return err
	}
	p.mu.Lock()
	p.list = append(p.list, cmd)
	p.mu.Unlock()
	return nil
}

// stop sends SIGTERM to cmd's group, waits up to 30 s, then SIGKILL.
func stop(cmd *exec.Cmd) {
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	syscall.Kill(-cmd.Process.Pid, syscall.SIGTERM)
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		<-done
	}
}

func (p *procs) stopAll() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, c := range p.list {
		stop(c)
	}
	p.list = nil
}

// serveWSGI runs examples/serve_wsgi.py on app and returns its base URL.
func serveWSGI(p *procs, repo, dir, app string, logf io.Writer) (*exec.Cmd, string, error) {
	cmd := exec.Command("/usr/bin/python3", filepath.Join(repo, "examples/serve_wsgi.py"), app, "0")
	cmd.Dir = dir
	cmd.Stderr = logf
	out, err := cmd.StdoutPipe()
	if err != nil {
		return nil, "", err
	}
	if err := p.start(cmd); err != nil {
		return nil, "", err
	}
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
			return nil, "", fmt.Errorf("serve_wsgi %s: got %q", app, s)
		}
		return cmd, base, nil
	case <-time.After(60 * time.Second):
		return nil, "", fmt.Errorf("serve_wsgi %s did not start", app)
	}
}

func run(bin string, trace [][]step, users int, delay time.Duration, only, jsonOut string) error {
	repo, err := os.Getwd()
	if err != nil {
		return err
	}
	tmp, err := os.MkdirTemp("", "mrdtrace")
	if err != nil {
		return err
	}
	defer os.RemoveAll(tmp)
	p := &procs{}
	defer p.stopAll()
	// SIGINT/SIGTERM: stop the helpers this run started, then exit.
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, os.Interrupt, syscall.SIGTERM)
	go func() {
		<-sig
		p.stopAll()
		os.RemoveAll(tmp)
		os.Exit(1)
	}()
	logf, err := os.Create(filepath.Join(tmp, "wsgi.log"))
	if err != nil {
		return err
	}
	defer logf.Close()

	// The slow upstream, shared by the modes: it counts its requests in a file, a byte each.
	counter := filepath.Join(tmp, "upstream-requests")
	slow := fmt.Sprintf(`import time, threading
from mapproxy.wsgiapp import make_wsgi_app
_app = make_wsgi_app(%q)
_lock = threading.Lock()
def application(environ, start_response):
    with _lock:
        with open(%q, 'ab') as f:
            f.write(b'.')
    time.sleep(%f)
    return _app(environ, start_response)
`, filepath.Join(repo, "examples/upstream.yaml"), counter, delay.Seconds())
	if err := os.WriteFile(filepath.Join(tmp, "slow_wsgi.py"), []byte(slow), 0o644); err != nil {
		return err
	}
	_, upstream, err := serveWSGI(p, repo, tmp, filepath.Join(tmp, "slow_wsgi.py"), logf)
	if err != nil {
		return err
	}
	if out, err := exec.Command(bin, "install-module", tmp).CombinedOutput(); err != nil {
		return fmt.Errorf("install-module: %v: %s", err, out)
	}
	fmt.Printf("trace: %d sessions × %d views (5×4 tiles), %d users at once, think %s, metatiles 4×4, upstream delay %s, 2 renderers; %d CPUs, load %s\n",
		len(trace), len(trace[0]), users, thinkText, delay, nproc(), loadavg())
	var results []result
	for _, m := range modes {
		if only != "" && !slices.Contains(strings.Split(only, ";"), m.Name) {
			continue
		}
		res, err := runMode(p, bin, repo, tmp, upstream, counter, m, trace, users, logf)
		if err != nil {
			return fmt.Errorf("%s: %w", m.Name, err)
		}
		if len(results) > 0 && results[0].Mode == "no prefetch" && results[0].Renders > 0 {
			res.RendersVsNone = float64(res.Renders) / float64(results[0].Renders)
		} else if m.Prefetch == "" {
			res.RendersVsNone = 1
		}
		results = append(results, res)
		fmt.Printf("%-19s z+1 ready %5.1f%% (%d/%d)  all ready %5.1f%% (%d/%d)  renders %d (%.2f per tile viewed, %.2fx none)  latency p50 %.0f ms p90 %.0f ms, not ready p50 %.0f ms  (%.0f s)\n",
			res.Mode, pct(res.ZoomInReady, res.ZoomInTiles), res.ZoomInReady, res.ZoomInTiles, pct(res.Ready, res.Tiles), res.Ready, res.Tiles,
			res.Renders, float64(res.Renders)/float64(max(res.Distinct, 1)), res.RendersVsNone, res.LatP50, res.LatP90, res.MissP50, res.Seconds)
	}
	if jsonOut != "" {
		b, _ := json.MarshalIndent(results, "", "  ")
		return os.WriteFile(jsonOut, b, 0o644)
	}
	return nil
}

func pct(a, b int) float64 { return 100 * float64(a) / float64(max(b, 1)) }

func nproc() int { return runtime.NumCPU() }

func loadavg() string {
	b, _ := os.ReadFile("/proc/loadavg")
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return "?"
	}
	return strings.Join(f[:3], " ")
}

func countFile(path string) int {
	fi, err := os.Stat(path)
	if err != nil {
		return 0
	}
	return int(fi.Size())
}

func runMode(p *procs, bin, repo, tmp, upstream, counter string, m mode, trace [][]step, users int, logf io.Writer) (result, error) {
	res := result{Mode: m.Name}
	dir, err := os.MkdirTemp(tmp, "mode")
	if err != nil {
		return res, err
	}
	sock := filepath.Join(dir, "r.sock")
	conf := fmt.Sprintf(`globals:
  cache: {base_dir: %[1]s/cache_data, lock_dir: %[1]s/cache_data/locks, tile_lock_dir: %[1]s/cache_data/tile_locks}
  renderd: {address: "http+unix://%[2]s/"}
services: {wmts: {}}
layers:
  - {name: tc, title: trace, sources: [tc]}
caches:
  tc:
    grids: [GLOBAL_WEBMERCATOR]
    sources: [up]
    format: image/png
    meta_size: [4, 4]
    meta_buffer: 0
sources:
  up: {type: wms, supported_srs: ['EPSG:3857'], req: {url: "%[3]sservice", layers: dbg, transparent: true}}
`, dir, url.PathEscape(sock), upstream)
	if err := os.WriteFile(filepath.Join(dir, "mapproxy.yaml"), []byte(conf), 0o644); err != nil {
		return res, err
	}
	// seed_nice 0: on a machine shared with other work, niced prefetch renders would measure
	// the other work, not prefetch (bench/live's nice run measures seed_nice itself).
	rcfg := fmt.Sprintf("socket: %s\nhttp: \"\"\nrenderers: 2\nseed_nice: %d\nrender_timeout: 60s\njournal: false\nstate_dir: %s/state\nlog_level: warn\n", sock, seedNice, dir)
	if m.Prefetch != "" {
		rcfg += "prefetch: " + m.Prefetch + "\n"
	}
	if err := os.WriteFile(filepath.Join(dir, "renderd.yaml"), []byte(rcfg), 0o644); err != nil {
		return res, err
	}
	d := exec.Command(bin, "-f", filepath.Join(dir, "mapproxy.yaml"), "-c", filepath.Join(dir, "renderd.yaml"))
	d.Stderr = logf
	if err := p.start(d); err != nil {
		return res, err
	}
	defer stop(d)
	if err := waitSocket(sock); err != nil {
		return res, err
	}
	wsgi := fmt.Sprintf(`import sys
sys.path.insert(0, %q)
import mapproxy_renderd; mapproxy_renderd.enable(wait_ms=60000); mapproxy_renderd.enable_views()
from mapproxy.wsgiapp import make_wsgi_app
application = make_wsgi_app(%q)
`, tmp, filepath.Join(dir, "mapproxy.yaml"))
	if err := os.WriteFile(filepath.Join(dir, "front_wsgi.py"), []byte(wsgi), 0o644); err != nil {
		return res, err
	}
	front, base, err := serveWSGI(p, repo, dir, filepath.Join(dir, "front_wsgi.py"), logf)
	if err != nil {
		return res, err
	}
	defer stop(front)
	// Warm the front MapProxy (imports, first request) outside the measurement.
	if err := get(base + "wmts/1.0.0/WMTSCapabilities.xml"); err != nil {
		return res, err
	}
	before := countFile(counter)
	start := time.Now()

	var mu sync.Mutex
	var lat, miss []float64
	seen := map[[3]int]bool{}
	var firstErr error
	sessions := make(chan []step)
	var wg sync.WaitGroup
	client := &http.Client{Timeout: 120 * time.Second, Transport: &http.Transport{MaxIdleConnsPerHost: 6}}
	for range users {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for s := range sessions {
				for _, st := range s {
					tiles := viewTiles(st)
					// Ready: the tile was in the cache when the view was asked (a browser
					// asks for all of a view's tiles at once).
					ready := make([]bool, len(tiles))
					for i, t := range tiles {
						_, err := os.Stat(tilePath(dir, t))
						ready[i] = err == nil
					}
					var vw sync.WaitGroup
					sem := make(chan struct{}, 6)
					for i, t := range tiles {
						vw.Add(1)
						sem <- struct{}{}
						go func(t [3]int, ready bool) {
							defer vw.Done()
							defer func() { <-sem }()
							t0 := time.Now()
							err := getWith(client, fmt.Sprintf("%swmts/tc/GLOBAL_WEBMERCATOR/%d/%d/%d.png", base, t[2], t[0], t[1]))
							ms := float64(time.Since(t0).Microseconds()) / 1000
							mu.Lock()
							defer mu.Unlock()
							if err != nil && firstErr == nil {
								firstErr = err
							}
							lat = append(lat, ms)
							if !ready {
								miss = append(miss, ms)
							}
							seen[t] = true
							res.Tiles++
							if ready {
								res.Ready++
							}
							if st.Kind == "in" {
								res.ZoomInTiles++
								if ready {
									res.ZoomInReady++
								}
							}
						}(t, ready[i])
					}
					vw.Wait()
					time.Sleep(st.Think) // the user looks at the view
				}
			}
		}()
	}
	for _, s := range trace {
		sessions <- s
	}
	close(sessions)
	wg.Wait()
	res.Seconds = time.Since(start).Seconds()
	stop(d) // queued prefetch jobs are dropped; running renders finish and count
	res.Renders = countFile(counter) - before
	res.Distinct = len(seen)
	slices.Sort(lat)
	slices.Sort(miss)
	res.LatP50, res.LatP90, res.MissP50 = quantile(lat, 0.5), quantile(lat, 0.9), quantile(miss, 0.5)
	return res, firstErr
}

// tilePath is where MapProxy's file cache keeps WMTS tile t of cache tc (tile_cache layout;
// GLOBAL_WEBMERCATOR counts rows from the top, as WMTS does).
func tilePath(dir string, t [3]int) string {
	split := func(v int) string { return fmt.Sprintf("%03d/%03d/%03d", v/1000000, v/1000%1000, v%1000) }
	return fmt.Sprintf("%s/cache_data/tc_EPSG3857/%02d/%s/%s.png", dir, t[2], split(t[0]), split(t[1]))
}

func quantile(s []float64, q float64) float64 {
	if len(s) == 0 {
		return 0
	}
	return s[min(int(q*float64(len(s))), len(s)-1)]
}

func get(u string) error { return getWith(http.DefaultClient, u) }

func getWith(c *http.Client, u string) error {
	resp, err := c.Get(u)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != 200 {
		return fmt.Errorf("GET %s: %d %.200q", u, resp.StatusCode, b)
	}
	return nil
}

func waitSocket(sock string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	c := &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", sock)
	}}}
	for {
		req, _ := http.NewRequestWithContext(ctx, "GET", "http://renderd/healthz", nil)
		resp, err := c.Do(req)
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == 200 {
				return nil
			}
		}
		if ctx.Err() != nil {
			return errors.New("daemon not ready within 60s")
		}
		time.Sleep(50 * time.Millisecond) // start-up polling, bounded by the context
	}
}
