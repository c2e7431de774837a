// SPDX-License-Identifier: Apache-2.0

// Command live benchmarks mapproxy-renderd's live helpers (README "Live helpers"):
//
//	live zoom  -daemon BIN [-trace FILE] [-render 50ms] [-think 500ms]
//	live nice  -daemon BIN [-burn 50ms] [-seed 300] [-live 30]
//	live renderer …   (the renderer the daemon runs; not for hand use)
//
// zoom replays a browsing trace (bench/live/zoom-trace.txt: a user zooming in from z8 to z14
// and panning) against the daemon five times: without prefetch, with prefetch levels 1 and 2,
// area all and centre. The client behaves as MapProxy does: a tile whose metatile is in the cache (a
// file the renderer writes) is served without asking; otherwise one live request per missing
// metatile, all of a view at once. It reports the share of tiles that were ready when asked,
// over all views and over the views right after a zoom-in (the z+1 tiles), and the renders
// spent (counted by the renderer; a prefetch job whose metatile exists is a skip, not a render).
//
// nice measures live latency behind a running seed when renders burn CPU (-burn of busy
// loop per render): idle (no seed), then with seed_nice 0 and seed_nice 10.
//
// Every run starts its own daemon (Unix socket in a temp dir) and stops it by closing its
// context (SIGTERM to the pid it started). Output: one line per figure, for BENCHMARKS.md.
package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"math"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: live zoom|nice|renderer [flags]")
		os.Exit(2)
	}
	var err error
	switch os.Args[1] {
	case "renderer":
		err = renderer(os.Args[2:])
	case "zoom":
		err = zoom(os.Args[2:])
	case "nice":
		err = nice(os.Args[2:])
	default:
		err = fmt.Errorf("unknown subcommand %q", os.Args[1])
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "live:", err)
		os.Exit(1)
	}
}

const (
	cacheID = "b_G"
	meta    = 4
)

// renderer speaks docs/design.md §5. Its "cache" is a directory of empty files, one per metatile
// (z-x-y of the origin tile). A job with "refresh": false whose file exists is skipped.
func renderer(args []string) error {
	fs := flag.NewFlagSet("renderer", flag.ContinueOnError)
	dir := fs.String("cache-dir", "", "metatile files")
	render := fs.Duration("render", 50*time.Millisecond, "sleep per render")
	burn := fs.Duration("burn", 0, "busy-loop per render instead of sleeping")
	logPath := fs.String("log", "", "one line per job: render|skip z x y")
	if err := fs.Parse(args); err != nil {
		return err
	}
	logf, err := os.OpenFile(*logPath, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o644)
	if err != nil {
		return err
	}
	sizes := make([][2]int, 21)
	for z := range sizes {
		sizes[z] = [2]int{1 << z, 1 << z}
	}
	ready, _ := json.Marshal(map[string]any{"ready": true, "caches": map[string]any{cacheID: map[string]any{
		"meta_size": []int{meta, meta}, "cache": "b", "grid": "G", "origin": "nw", "grid_sizes": sizes}}})
	out := bufio.NewWriter(os.Stdout)
	fmt.Fprintf(out, "%s\n", ready)
	out.Flush()
	in := bufio.NewScanner(os.Stdin)
	in.Buffer(make([]byte, 64<<10), 1<<20)
	for in.Scan() {
		var j struct {
			ID      string     `json:"id"`
			Tiles   [][3]int64 `json:"tiles"`
			Refresh *bool      `json:"refresh"`
		}
		if json.Unmarshal(in.Bytes(), &j) != nil || len(j.Tiles) != 1 {
			fmt.Fprintf(out, `{"id": %q, "status": "error", "error_message": "bad job"}`+"\n", j.ID)
			out.Flush()
			continue
		}
		t := j.Tiles[0]
		name := filepath.Join(*dir, fmt.Sprintf("%d-%d-%d", t[2], t[0]/meta*meta, t[1]/meta*meta))
		forced := j.Refresh == nil || *j.Refresh
		what := "render"
		if _, err := os.Stat(name); err == nil && !forced {
			what = "skip"
		} else {
			if *burn > 0 {
				spin(*burn)
			} else {
				time.Sleep(*render)
			}
			if err := os.WriteFile(name, nil, 0o644); err != nil {
				return err
			}
		}
		fmt.Fprintf(logf, "%s %d %d %d\n", what, t[2], t[0], t[1])
		fmt.Fprintf(out, `{"id": %q, "status": "ok"}`+"\n", j.ID)
		out.Flush()
	}
	return in.Err()
}

// spin burns CPU for d of this thread's CPU time (not wall time: a descheduled renderer
// must still do its whole work, as a real one would).
func spin(d time.Duration) {
	var ru syscall.Rusage
	cpu := func() time.Duration {
		syscall.Getrusage(syscall.RUSAGE_THREAD, &ru)
		return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
	}
	end := cpu() + d
	x := 1.0
	for cpu() < end {
		for i := 0; i < 20000; i++ {
			x = math.Sqrt(x + float64(i))
		}
	}
	_ = x
}

// daemon is one mapproxy-renderd run.
type daemon struct {
	dir, sock, log string
	cmd            *exec.Cmd
	done           chan error
}

func startDaemon(bin, self string, yaml string, rendArgs ...string) (*daemon, error) {
	dir, err := os.MkdirTemp("", "mrdlive")
	if err != nil {
		return nil, err
	}
	d := &daemon{dir: dir, sock: dir + "/s.sock", log: dir + "/renders.log"}
	if err := os.Mkdir(dir+"/cache", 0o755); err != nil {
		return nil, err
	}
	argv, _ := json.Marshal(append([]string{self, "renderer", "-cache-dir", dir + "/cache", "-log", d.log}, rendArgs...))
	cfg := fmt.Sprintf("socket: %s\nhttp: \"\"\nrenderer_command: %s\nlog_level: warn\n%s", d.sock, argv, yaml)
	if err := os.WriteFile(dir+"/renderd.yaml", []byte(cfg), 0o644); err != nil {
		return nil, err
	}
	d.cmd = exec.Command(bin, "-c", dir+"/renderd.yaml")
	d.cmd.Stderr = os.Stderr
	if err := d.cmd.Start(); err != nil {
		return nil, err
	}
	d.done = make(chan error, 1)
	go func() { d.done <- d.cmd.Wait() }()
	deadline := time.Now().Add(30 * time.Second)
	for {
		c, err := net.Dial("unix", d.sock)
		if err == nil {
			c.Close()
			return d, nil
		}
		if time.Now().After(deadline) {
			d.stop()
			return nil, fmt.Errorf("daemon not up: %v", err)
		}
		time.Sleep(20 * time.Millisecond) // start-up polling, bounded by the deadline
	}
}

func (d *daemon) stop() {
	_ = d.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-d.done:
	case <-time.After(30 * time.Second):
		_ = d.cmd.Process.Kill()
		<-d.done
	}
	os.RemoveAll(d.dir)
}

// renders counts the renderer's log lines by kind.
func (d *daemon) renders() (render, skip int) {
	b, _ := os.ReadFile(d.log)
	for _, l := range strings.Split(string(b), "\n") {
		switch {
		case strings.HasPrefix(l, "render "):
			render++
		case strings.HasPrefix(l, "skip "):
			skip++
		}
	}
	return
}

func (d *daemon) cached(z, x, y int) bool {
	_, err := os.Stat(filepath.Join(d.dir, "cache", fmt.Sprintf("%d-%d-%d", z, x/meta*meta, y/meta*meta)))
	return err == nil
}

// conn is one NDJSON connection with pipelined requests matched by id.
type conn struct {
	c       net.Conn
	mu      sync.Mutex
	waiting map[string]chan map[string]any
	next    int
}

func dial(sock string) (*conn, error) {
	c, err := net.Dial("unix", sock)
	if err != nil {
		return nil, err
	}
	cn := &conn{c: c, waiting: map[string]chan map[string]any{}}
	go func() {
		sc := bufio.NewScanner(c)
		sc.Buffer(make([]byte, 64<<10), 4<<20)
		for sc.Scan() {
			var r map[string]any
			if json.Unmarshal(sc.Bytes(), &r) != nil {
				continue
			}
			id, _ := r["id"].(string)
			cn.mu.Lock()
			ch := cn.waiting[id]
			delete(cn.waiting, id)
			cn.mu.Unlock()
			if ch != nil {
				ch <- r
			}
		}
	}()
	return cn, nil
}

func (cn *conn) send(req map[string]any) (<-chan map[string]any, error) {
	cn.mu.Lock()
	cn.next++
	id := strconv.Itoa(cn.next)
	ch := make(chan map[string]any, 1)
	cn.waiting[id] = ch
	cn.mu.Unlock()
	req["id"] = id
	b, _ := json.Marshal(req)
	_, err := cn.c.Write(append(b, '\n'))
	return ch, err
}

func (cn *conn) do(req map[string]any) (map[string]any, error) {
	ch, err := cn.send(req)
	if err != nil {
		return nil, err
	}
	select {
	case r := <-ch:
		return r, nil
	case <-time.After(60 * time.Second):
		return nil, errors.New("no reply within 60 s")
	}
}

func tileReq(x, y, z, prio int) map[string]any {
	return map[string]any{"command": "tile", "cache_identifier": cacheID, "tiles": [][3]int{{x, y, z}}, "priority": prio}
}

// step is one view of the trace.
type step struct {
	zoomIn bool
	dx, dy float64
}

func readTrace(path string) (z0 int, cx, cy float64, steps []step, err error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return
	}
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) == 0 || strings.HasPrefix(f[0], "#") {
			continue
		}
		switch {
		case f[0] == "start" && len(f) == 4:
			z0, _ = strconv.Atoi(f[1])
			cx, _ = strconv.ParseFloat(f[2], 64)
			cy, _ = strconv.ParseFloat(f[3], 64)
		case f[0] == "zoom":
			steps = append(steps, step{zoomIn: true})
		case f[0] == "pan" && len(f) == 3:
			dx, _ := strconv.ParseFloat(f[1], 64)
			dy, _ := strconv.ParseFloat(f[2], 64)
			steps = append(steps, step{dx: dx, dy: dy})
		default:
			return 0, 0, 0, nil, fmt.Errorf("%s: bad line %q", path, line)
		}
	}
	return
}

type zoomResult struct {
	tiles, ready, zTiles, zReady int
	render, skip                 int
	views                        int
	waits                        []time.Duration
}

func zoom(args []string) error {
	fs := flag.NewFlagSet("zoom", flag.ContinueOnError)
	bin := fs.String("daemon", "", "mapproxy-renderd binary")
	trace := fs.String("trace", "bench/live/zoom-trace.txt", "browsing trace")
	render := fs.Duration("render", 50*time.Millisecond, "render time")
	think := fs.Duration("think", 500*time.Millisecond, "time the user looks at a view")
	vw := fs.Int("view-w", 8, "view width in tiles (1920 px / 256, rounded up)")
	vh := fs.Int("view-h", 5, "view height in tiles (1080 px / 256, rounded up)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	self, err := os.Executable()
	if err != nil {
		return err
	}
	z0, cx0, cy0, steps, err := readTrace(*trace)
	if err != nil {
		return err
	}
	fmt.Printf("zoom trace %s: %d views from z%d, view %dx%d tiles, metatiles %dx%d, render %v, think %v, 2 renderers\n",
		*trace, len(steps)+1, z0, *vw, *vh, meta, meta, *render, *think)
	var base zoomResult
	modes := []string{"no prefetch", "prefetch levels 1", "prefetch levels 2", "levels 1, centre", "levels 2, centre"}
	for i, pf := range []string{"", "prefetch: {caches: [b], levels: 1}\n", "prefetch: {caches: [b], levels: 2}\n",
		"prefetch: {caches: [b], levels: 1, area: centre}\n", "prefetch: {caches: [b], levels: 2, area: centre}\n"} {
		d, err := startDaemon(*bin, self, "renderers: 2\n"+pf, "-render", render.String())
		if err != nil {
			return err
		}
		r, err := replay(d, z0, cx0, cy0, steps, *vw, *vh, *think)
		r.render, r.skip = d.renders()
		d.stop()
		if err != nil {
			return err
		}
		name := modes[i]
		if i == 0 {
			base = r
		}
		slices.Sort(r.waits)
		p50 := time.Duration(0)
		if len(r.waits) > 0 {
			p50 = r.waits[len(r.waits)/2]
		}
		fmt.Printf("%-18s z+1 tiles ready %5.1f%% (%d/%d)  all tiles ready %5.1f%% (%d/%d)  renders %d (%.2fx) + %d skipped  view wait p50 %v\n",
			name, pct(r.zReady, r.zTiles), r.zReady, r.zTiles, pct(r.ready, r.tiles), r.ready, r.tiles,
			r.render, float64(r.render)/float64(max(base.render, 1)), r.skip, p50.Round(time.Millisecond))
	}
	return nil
}

func pct(a, b int) float64 { return 100 * float64(a) / float64(max(b, 1)) }

// replay walks the trace: for each view, the tiles whose metatile is cached are ready; the
// missing metatiles are requested live (priority 100), all at once; then the user thinks.
func replay(d *daemon, z int, cx, cy float64, steps []step, vw, vh int, think time.Duration) (zoomResult, error) {
	var r zoomResult
	cn, err := dial(d.sock)
	if err != nil {
		return r, err
	}
	defer cn.c.Close()
	view := func(afterZoom bool) error {
		r.views++
		x0, y0 := int(math.Floor(cx-float64(vw)/2)), int(math.Floor(cy-float64(vh)/2))
		missing := map[[2]int]bool{}
		for y := y0; y < y0+vh; y++ {
			for x := x0; x < x0+vw; x++ {
				r.tiles++
				if afterZoom {
					r.zTiles++
				}
				if d.cached(z, x, y) {
					r.ready++
					if afterZoom {
						r.zReady++
					}
					continue
				}
				missing[[2]int{x / meta * meta, y / meta * meta}] = true
			}
		}
		start := time.Now()
		var chans []<-chan map[string]any
		for k := range missing {
			ch, err := cn.send(tileReq(k[0], k[1], z, 100))
			if err != nil {
				return err
			}
			chans = append(chans, ch)
		}
		for _, ch := range chans {
			select {
			case rep := <-ch:
				if rep["status"] != "ok" {
					return fmt.Errorf("live request: %v", rep)
				}
			case <-time.After(60 * time.Second):
				return errors.New("live request: no reply within 60 s")
			}
		}
		if len(chans) > 0 {
			r.waits = append(r.waits, time.Since(start))
		}
		time.Sleep(think) // the user looks at the map
		return nil
	}
	if err := view(false); err != nil {
		return r, err
	}
	for _, s := range steps {
		if s.zoomIn {
			z++
			cx, cy = cx*2, cy*2
		} else {
			cx, cy = cx+s.dx, cy+s.dy
		}
		if err := view(s.zoomIn); err != nil {
			return r, err
		}
	}
	return r, nil
}

func nice(args []string) error {
	fs := flag.NewFlagSet("nice", flag.ContinueOnError)
	bin := fs.String("daemon", "", "mapproxy-renderd binary")
	burn := fs.Duration("burn", 50*time.Millisecond, "CPU time per render")
	seeds := fs.Int("seed", 300, "seed jobs queued first")
	lives := fs.Int("live", 30, "live requests, one after another")
	every := fs.Duration("every", 100*time.Millisecond, "pause between live requests")
	renderers := fs.Int("renderers", 4, "renderers")
	maxSeed := fs.Int("max-seed", 3, "max_seed_renderers")
	if err := fs.Parse(args); err != nil {
		return err
	}
	self, err := os.Executable()
	if err != nil {
		return err
	}
	cpus := 0
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		cpus = strings.Count(string(b), "processor\t:")
	}
	fmt.Printf("nice: renders burn %v of CPU, %d renderers (at most %d seeding), %d CPUs; %d seed jobs queued, then %d live requests one at a time every %v\n",
		*burn, *renderers, *maxSeed, cpus, *seeds, *lives, *every)
	var idleP50 time.Duration
	for _, c := range []struct {
		name string
		seed bool
		nice int
	}{{"idle (no seed)", false, 10}, {"seed, seed_nice 0", true, 0}, {"seed, seed_nice 10", true, 10}} {
		yaml := fmt.Sprintf("renderers: %d\nmax_seed_renderers: %d\nseed_nice: %d\nseed_ioprio_idle: false\n", *renderers, *maxSeed, c.nice)
		d, err := startDaemon(*bin, self, yaml, "-burn", burn.String())
		if err != nil {
			return err
		}
		lat, seedDone, err := liveBehindSeed(d, c.seed, *seeds, *lives, *every)
		d.stop()
		if err != nil {
			return err
		}
		slices.Sort(lat)
		p50, p90 := lat[len(lat)/2], lat[len(lat)*9/10]
		if !c.seed {
			idleP50 = p50
		}
		fmt.Printf("%-20s live p50 %6.1f ms (%.2fx idle)  p90 %6.1f ms  max %6.1f ms  seed renders meanwhile %d\n",
			c.name, ms(p50), float64(p50)/float64(idleP50), ms(p90), ms(lat[len(lat)-1]), seedDone)
	}
	return nil
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

func liveBehindSeed(d *daemon, seed bool, seeds, lives int, every time.Duration) ([]time.Duration, int, error) {
	cn, err := dial(d.sock)
	if err != nil {
		return nil, 0, err
	}
	defer cn.c.Close()
	if seed {
		for i := 0; i < seeds; i++ {
			req := tileReq(4*i, 0, 18, 10)
			req["background"] = true
			if _, err := cn.send(req); err != nil {
				return nil, 0, err
			}
		}
		time.Sleep(300 * time.Millisecond) // let the seed occupy its renderers before measuring
	}
	before, _ := d.renders()
	var lat []time.Duration
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	for i := 0; i < lives && ctx.Err() == nil; i++ {
		start := time.Now()
		rep, err := cn.do(tileReq(4*i, 4, 17, 100))
		if err != nil {
			return nil, 0, err
		}
		if rep["status"] != "ok" {
			return nil, 0, fmt.Errorf("live: %v", rep)
		}
		lat = append(lat, time.Since(start))
		time.Sleep(every)
	}
	after, _ := d.renders()
	return lat, after - before - len(lat), nil
}
