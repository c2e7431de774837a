// SPDX-License-Identifier: Apache-2.0

package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

// The planner (the bundled worker's plan mode) against plain mapproxy-seed, without the daemon:
// the test plays the daemon's part, feeding each planned metatile to a real bundled worker as a
// seed job with "refresh": false, and compares the tile files with what mapproxy-seed writes
// into a separate cache from the same seed.yaml.

// requireShapely fails under CI=true and skips elsewhere when Shapely (polygon coverages) is missing.
func requireShapely(t *testing.T) {
	t.Helper()
	if err := exec.Command("/usr/bin/python3", "-c", "import shapely").Run(); err != nil {
		msg := "Shapely is missing (apt-get install python3-shapely): " + err.Error()
		if os.Getenv("CI") == "true" {
			t.Fatal(msg)
		}
		t.Skip(msg)
	}
}

// plannerRig holds an upstream WMS, two MapProxy configurations that differ only in the cache
// directory (a.yaml: planner and worker or the daemon, with a renderd address as in
// production; b.yaml: plain mapproxy-seed, no renderd), one seed.yaml and the bundled worker
// script.
type plannerRig struct {
	t      *testing.T // the running (sub)test
	top    *testing.T // the test that owns the rig's processes
	dir    string
	script string
	worker *plannerWorker
}

const plannerSeedYAML = `
coverages:
  box: {bbox: [8.0, 47.5, 12.0, 50.0], srs: 'EPSG:4326'}
  poly: {datasource: DIR/poly.wkt, srs: 'EPSG:4326'}
  area: {datasource: DIR/area.geojson, srs: 'EPSG:4326'}
  both:
    union:
      - {bbox: [8.0, 47.5, 12.0, 50.0], srs: 'EPSG:4326'}
      - {datasource: DIR/poly.wkt, srs: 'EPSG:4326'}
seeds:
  geo_union: {caches: [geo_cache], coverages: [both], levels: {to: 7}}
  merc_area: {caches: [merc_cache], grids: [GLOBAL_WEBMERCATOR], coverages: [area], levels: [3, 5, 8]}
  multi: {caches: [merc_cache, geo_cache], grids: [GLOBAL_GEODETIC], coverages: [box], levels: {from: 2, to: 6}}
  merc_refresh:
    caches: [merc_cache]
    grids: [GLOBAL_WEBMERCATOR]
    coverages: [area]
    levels: [3, 5, 8]
    refresh_before: {days: 1}
  inl_box: {caches: [inl_cache], coverages: [box], levels: {to: 6}}
  inl_poly: {caches: [inl_cache], coverages: [poly], levels: {from: 7, to: 7}}
cleanups:
  geo_poly: {caches: [geo_cache], coverages: [poly], levels: {from: 3, to: 7}, remove_before: {seconds: 0}}
  merc_old: {caches: [merc_cache], grids: [GLOBAL_WEBMERCATOR], levels: {from: 8}, remove_before: {days: 1}}
`

func newPlannerRig(t *testing.T) *plannerRig {
	requireMapProxy(t)
	requireShapely(t)
	repo, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	dir := shortTempDir(t)
	mr := &mapproxyRig{t: t, dir: dir}
	upstream := mr.serveWSGI(filepath.Join(repo, "examples/upstream.yaml"), nil)

	files := map[string]string{
		"poly.wkt": "POLYGON((5 44, 9 44, 7 47.9, 5 44))\n",
		"area.geojson": `{"type": "FeatureCollection", "features": [{"type": "Feature", "properties": {},
  "geometry": {"type": "Polygon", "coordinates": [[[10, 45], [14, 45], [14, 46], [11, 48], [10, 45]]]}}]}` + "\n",
		"seed.yaml":          strings.ReplaceAll(plannerSeedYAML, "DIR", dir),
		"bad-seed.yaml":      "seeds:\n  x: {caches: 3}\n",
		"mapproxy_worker.py": string(bundledWorker),
	}
	for name, content := range files {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	cache := func(grids []string, meta []int, buffer int) map[string]any {
		return map[string]any{"grids": grids, "sources": []string{"upstream_wms"}, "format": "image/png",
			"meta_size": meta, "meta_buffer": buffer}
	}
	both := []string{"GLOBAL_WEBMERCATOR", "GLOBAL_GEODETIC"}
	conf := func(cacheDir string, renderd bool) map[string]any {
		globals := map[string]any{"cache": map[string]any{"base_dir": "./" + cacheDir, "lock_dir": "./" + cacheDir + "/locks"}}
		if renderd {
			// Never contacted: the planner and the worker are renderd themselves.
			globals["renderd"] = map[string]any{"address": "http://" + freeTCPAddr(t)}
		}
		return map[string]any{
			"globals":  globals,
			"services": map[string]any{"tms": map[string]any{"use_grid_names": true}},
			"layers":   []any{map[string]any{"name": "m", "title": "m", "sources": []string{"merc_cache"}}},
			"caches": map[string]any{
				"merc_cache": cache(both, []int{3, 2}, 20), // non-4x4, on a nw and a sw grid
				"geo_cache":  cache([]string{"GLOBAL_GEODETIC"}, []int{2, 2}, 10),
				"inl_cache":  cache([]string{"GLOBAL_WEBMERCATOR"}, []int{4, 4}, 0),
				"cur_cache":  cache(both, []int{4, 4}, 0), // planned, never rendered
			},
			"sources": map[string]any{"upstream_wms": map[string]any{"type": "wms",
				"supported_srs": []string{"EPSG:3857", "EPSG:4326"},
				"req":           map[string]any{"url": upstream + "service", "layers": "dbg", "transparent": true}}},
		}
	}
	mr.writeYAML("a.yaml", conf("cache_a", true))
	mr.writeYAML("b.yaml", conf("cache_b", false))
	return &plannerRig{t: t, top: t, dir: dir, script: filepath.Join(dir, "mapproxy_worker.py")}
}

// renderer returns the rig's bundled worker in renderer mode (on a.yaml), started on first use.
func (r *plannerRig) renderer() *plannerWorker {
	if r.worker == nil {
		r.worker = startPlannerWorker(r.top, r.script, filepath.Join(r.dir, "a.yaml"))
	}
	r.worker.t = r.t
	return r.worker
}

// planLine is any line of the planner protocol.
type planLine struct {
	Tasks []struct {
		CacheIdentifier string `json:"cache_identifier"`
		Levels          []int  `json:"levels"`
	} `json:"tasks"`
	CacheIdentifier string          `json:"cache_identifier"`
	Tile            []int           `json:"tile"`
	Progress        *float64        `json:"progress"`
	RefreshBefore   *float64        `json:"refresh_before"`
	Cursor          json.RawMessage `json:"cursor"`
	Resolved        json.RawMessage `json:"resolved"`
	Removed         *uint64         `json:"removed"`
	Seeds           []string        `json:"seeds"`
	Cleanups        []string        `json:"cleanups"`
	Done            bool            `json:"done"`
	Error           string          `json:"error"`
}

type planRun struct {
	lines  []planLine
	tiles  []planLine // the metatile lines, in order
	stderr string
	code   int
}

// plan runs the bundled worker in plan mode with spec on stdin and parses every stdout line.
func (r *plannerRig) plan(spec map[string]any, env ...string) planRun {
	t := r.t
	t.Helper()
	b, err := json.Marshal(spec)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "/usr/bin/python3", r.script, "plan")
	cmd.Dir = r.dir
	cmd.Env = append(append(os.Environ(), "MAPPROXY_CONFIG="+filepath.Join(r.dir, "a.yaml")), env...)
	cmd.Stdin = bytes.NewReader(append(b, '\n'))
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	cmd.WaitDelay = 5 * time.Second
	err = cmd.Run()
	run := planRun{stderr: stderr.String()}
	if ee, ok := err.(*exec.ExitError); ok {
		run.code = ee.ExitCode()
	} else if err != nil {
		t.Fatalf("planner %s: %v\n%s", b, err, tail(run.stderr, 2000))
	}
	for _, s := range strings.SplitAfter(stdout.String(), "\n") {
		if s == "" {
			continue
		}
		if !strings.HasSuffix(s, "\n") {
			t.Fatalf("planner %s: unterminated last line %q", b, s)
		}
		var l planLine
		if err := json.Unmarshal([]byte(s), &l); err != nil {
			t.Fatalf("planner %s: stdout line %q is not protocol JSON: %v", b, s, err)
		}
		run.lines = append(run.lines, l)
		if l.Tile != nil {
			run.tiles = append(run.tiles, l)
		}
	}
	return run
}

// planOK runs plan and fails unless it ended with a done line and exit status 0.
func (r *plannerRig) planOK(spec map[string]any, env ...string) planRun {
	r.t.Helper()
	run := r.plan(spec, env...)
	if run.code != 0 || len(run.lines) == 0 || !run.lines[len(run.lines)-1].Done {
		r.t.Fatalf("planner %v: exit %d, lines %+v\n%s", spec, run.code, run.lines, tail(run.stderr, 3000))
	}
	return run
}

// plannerWorker is one bundled worker process in renderer mode, fed job by job.
type plannerWorker struct {
	t   *testing.T
	in  io.WriteCloser
	out *bufio.Reader
	n   int
}

func startPlannerWorker(t *testing.T, script, conf string) *plannerWorker {
	ctx, cancel := context.WithCancel(context.Background())
	cmd := exec.CommandContext(ctx, "/usr/bin/python3", script, conf)
	stderr := &syncBuffer{}
	cmd.Stderr = stderr
	cmd.WaitDelay = 10 * time.Second
	in, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	t.Cleanup(func() {
		in.Close() // end of stdin: the worker exits 0
		select {
		case <-exited:
		case <-time.After(30 * time.Second):
			cancel()
			<-exited
		}
		cancel()
		if t.Failed() {
			t.Logf("worker log (tail):\n%s", tail(stderr.String(), 3000))
		}
	})
	w := &plannerWorker{t: t, in: in, out: bufio.NewReader(out)}
	var ready struct{ Ready bool }
	if line, err := w.out.ReadBytes('\n'); err != nil || json.Unmarshal(line, &ready) != nil || !ready.Ready {
		t.Fatalf("worker start: %q %v\n%s", line, err, stderr.String())
	}
	return w
}

type workerReply struct {
	Status       string  `json:"status"`
	Skipped      bool    `json:"skipped"`
	ErrorMessage string  `json:"error_message"`
	Missing      [][]int `json:"missing"`
}

func (w *plannerWorker) job(job map[string]any) workerReply {
	w.t.Helper()
	w.n++
	job["id"] = fmt.Sprint("j", w.n)
	job["command"] = "tile"
	b, _ := json.Marshal(job)
	if _, err := w.in.Write(append(b, '\n')); err != nil {
		w.t.Fatalf("worker: %v", err)
	}
	line, err := w.out.ReadBytes('\n')
	if err != nil {
		w.t.Fatalf("worker reply to %s: %v", b, err)
	}
	var rep workerReply
	if err := json.Unmarshal(line, &rep); err != nil || rep.Status != "ok" {
		w.t.Fatalf("worker reply to %s: %s", b, line)
	}
	return rep
}

// render feeds every planned metatile to the worker the way the daemon sends a task's jobs and
// returns how many the worker skipped.
func (r *plannerRig) render(run planRun) (skipped int) {
	r.t.Helper()
	for _, l := range run.tiles {
		job := map[string]any{"cache_identifier": l.CacheIdentifier, "tiles": [][]int{l.Tile}, "refresh": false, "seed": true}
		if l.RefreshBefore != nil {
			job["refresh_before"] = *l.RefreshBefore
		}
		if r.renderer().job(job).Skipped {
			skipped++
		}
	}
	return skipped
}

// mapproxySeed runs plain mapproxy-seed on b.yaml ("--seed" or "--cleanup" NAME).
func (r *plannerRig) mapproxySeed(flag, name string) {
	r.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "mapproxy-seed", "-f", filepath.Join(r.dir, "b.yaml"), "-s", filepath.Join(r.dir, "seed.yaml"), flag, name, "-c", "2")
	cmd.Dir = r.dir
	cmd.WaitDelay = 5 * time.Second
	if out, err := cmd.CombinedOutput(); err != nil {
		r.t.Fatalf("mapproxy-seed %s %s: %v\n%s", flag, name, err, tail(string(out), 2000))
	}
}

// tiles returns the PNG files of one side ("a" or "b") by path relative to its cache
// directory, with their modification times.
func (r *plannerRig) tiles(side string) map[string]time.Time {
	root := filepath.Join(r.dir, "cache_"+side)
	m := map[string]time.Time{}
	filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err == nil && !d.IsDir() && strings.HasSuffix(p, ".png") {
			fi, err := d.Info()
			if err != nil {
				r.t.Fatal(err)
			}
			rel, _ := filepath.Rel(root, p)
			m[rel] = fi.ModTime()
		}
		return nil
	})
	return m
}

// sameTiles fails unless both sides hold the same tile files; it returns their number.
func (r *plannerRig) sameTiles(what string) int {
	r.t.Helper()
	a, b := r.tiles("a"), r.tiles("b")
	onlyA, onlyB := diffKeys(a, b), diffKeys(b, a)
	if len(onlyA) > 0 || len(onlyB) > 0 {
		r.t.Fatalf("%s: planner+worker and mapproxy-seed differ: %d tiles only via the planner %v, %d only via mapproxy-seed %v",
			what, len(onlyA), firstN(onlyA, 10), len(onlyB), firstN(onlyB, 10))
	}
	return len(a)
}

func diffKeys[V any](a, b map[string]V) []string {
	var d []string
	for k := range a {
		if _, ok := b[k]; !ok {
			d = append(d, k)
		}
	}
	slices.Sort(d)
	return d
}

func firstN(s []string, n int) []string { return s[:min(n, len(s))] }

// tcTile parses MapProxy's default "tc" file layout, zz/xxx/xxx/xxx/yyy/yyy/yyy.png (internal
// grid coordinates), below "<cache>_<srs>/".
func tcTile(rel string) (dir string, x, y, z int, ok bool) {
	parts := strings.Split(strings.TrimSuffix(rel, ".png"), string(filepath.Separator))
	if len(parts) != 8 {
		return "", 0, 0, 0, false
	}
	var n [7]int
	for i, p := range parts[1:] {
		if _, err := fmt.Sscanf(p, "%d", &n[i]); err != nil {
			return "", 0, 0, 0, false
		}
	}
	return parts[0], n[1]*1e6 + n[2]*1e3 + n[3], n[4]*1e6 + n[5]*1e3 + n[6], n[0], true
}

func tcPath(dir string, x, y, z int) string {
	return filepath.Join(dir, fmt.Sprintf("%02d", z), fmt.Sprintf("%03d", x/1e6), fmt.Sprintf("%03d", x/1e3%1e3), fmt.Sprintf("%03d", x%1e3),
		fmt.Sprintf("%03d", y/1e6), fmt.Sprintf("%03d", y/1e3%1e3), fmt.Sprintf("%03d", y%1e3)+".png")
}

// age sets the modification time of the given tiles on both sides.
func (r *plannerRig) age(rels []string, when time.Time) {
	for _, side := range []string{"a", "b"} {
		for _, rel := range rels {
			if err := os.Chtimes(filepath.Join(r.dir, "cache_"+side, rel), when, when); err != nil {
				r.t.Fatal(err)
			}
		}
	}
}

// seedSide runs one seed.yaml entry (kind "seed" or "cleanup") on side a of a plannerRig; for
// a cleanup it returns how many tiles it says it removed.
type seedSide func(t *testing.T, kind, name string) (removed uint64)

// compareWithMapProxySeed runs seed.yaml entries on side a with sideA and on side b with plain
// mapproxy-seed, and fails unless both caches hold the same tiles after each: three seeds (a
// sw-origin grid, non-4x4 metatiles, WKT and GeoJSON polygons, a union, level lists, a seed
// of two caches), a rerun, a refresh_before seed after some tiles were made old, and two
// cleanups (MapProxy's tile walker and its level directories).
func (r *plannerRig) compareWithMapProxySeed(t *testing.T, sideA seedSide) {
	// Each seed adds to the caches of both sides, which must stay equal.
	for _, name := range []string{"geo_union", "merc_area", "multi"} {
		t.Run("seed "+name, func(t *testing.T) {
			r.t = t
			before := len(r.tiles("a"))
			sideA(t, "seed", name)
			r.mapproxySeed("--seed", name)
			n := r.sameTiles(name)
			if n-before < 10 {
				t.Errorf("seed %s added only %d tiles", name, n-before)
			}
			t.Logf("seed %s: %d tiles added, equal to mapproxy-seed's", name, n-before)
		})
	}

	t.Run("a seed that is done changes nothing", func(t *testing.T) {
		r.t = t
		before := r.tiles("a")
		sideA(t, "seed", "geo_union")
		if after := r.tiles("a"); !mapsEqual(before, after) {
			t.Errorf("rerunning a finished seed changed tile files")
		}
	})

	t.Run("refresh_before rewrites exactly the stale metatiles", func(t *testing.T) {
		r.t = t
		// On the web mercator grid of merc_cache (3x2 metatiles), age the main (lower left) tile
		// of every other metatile and another tile of the rest, on both sides alike.
		metatiles := map[string][]string{} // metatile's main tile → its tiles
		for _, rel := range sortedKeys(r.tiles("a")) {
			if dir, x, y, z, ok := tcTile(rel); ok && dir == "merc_cache_EPSG3857" {
				main := tcPath(dir, x/3*3, y/2*2, z)
				metatiles[main] = append(metatiles[main], rel)
			}
		}
		var aged []string
		isAged := map[string]bool{}
		for i, main := range sortedKeys(metatiles) {
			tile := main
			if i%2 == 1 {
				if tile = metatiles[main][len(metatiles[main])-1]; tile == main {
					continue // a metatile with a single tile in the grid
				}
			}
			aged = append(aged, tile)
			isAged[tile] = true
		}
		r.age(aged, time.Now().Add(-48*time.Hour).Truncate(time.Second))
		before := map[string]map[string]time.Time{"a": r.tiles("a"), "b": r.tiles("b")}

		sideA(t, "seed", "merc_refresh")
		r.mapproxySeed("--seed", "merc_refresh")
		r.sameTiles("merc_refresh")

		moved := func(side string) []string {
			var m []string
			for rel, mt := range r.tiles(side) {
				if !mt.Equal(before[side][rel]) {
					m = append(m, rel)
				}
			}
			slices.Sort(m)
			return m
		}
		movedA, movedB := moved("a"), moved("b")
		if !slices.Equal(movedA, movedB) {
			t.Fatalf("rewritten tiles differ: side a %d %v, mapproxy-seed %d %v", len(movedA), firstN(movedA, 10), len(movedB), firstN(movedB, 10))
		}
		// MapProxy's walker tests a metatile's main (lower left) tile: a metatile is rewritten
		// whole when that tile is stale, and not at all otherwise.
		var want []string
		for rel := range before["a"] {
			dir, x, y, z, ok := tcTile(rel)
			if ok && isAged[tcPath(dir, x/3*3, y/2*2, z)] {
				want = append(want, rel)
			}
		}
		slices.Sort(want)
		if len(movedA) == 0 || !slices.Equal(movedA, want) {
			t.Errorf("rewritten tiles: got %d %v, want the %d tiles of metatiles whose main tile was stale %v",
				len(movedA), firstN(movedA, 10), len(want), firstN(want, 10))
		}
		t.Logf("refresh_before: %d of %d tiles aged, %d tiles rewritten on each side", len(aged), len(before["a"]), len(movedA))
	})

	t.Run("cleanups remove what mapproxy-seed removes", func(t *testing.T) {
		r.t = t
		// merc_old (whole grid, so MapProxy cleans level directories) removes the level 8 tiles
		// older than a day: age some more (the refresh left some old).
		var aged []string
		for i, rel := range sortedKeys(r.tiles("a")) {
			if dir, _, _, z, ok := tcTile(rel); ok && dir == "merc_cache_EPSG3857" && z == 8 && i%2 == 0 {
				aged = append(aged, rel)
			}
		}
		if len(aged) == 0 {
			t.Fatal("no tiles at level 8 to age")
		}
		r.age(aged, time.Now().Add(-48*time.Hour))
		oldL8 := 0
		for rel, mt := range r.tiles("a") {
			if dir, _, _, z, ok := tcTile(rel); ok && dir == "merc_cache_EPSG3857" && z == 8 && time.Since(mt) > 25*time.Hour {
				oldL8++
			}
		}
		for _, name := range []string{"geo_poly", "merc_old"} { // tile walker; level directories
			before := len(r.tiles("a"))
			removed := sideA(t, "cleanup", name)
			r.mapproxySeed("--cleanup", name)
			n := r.sameTiles("cleanup " + name)
			if int(removed) != before-n || before == n {
				t.Errorf("cleanup %s: says it removed %d, files went from %d to %d", name, removed, before, n)
			}
			if name == "merc_old" && before-n != oldL8 {
				t.Errorf("cleanup merc_old removed %d tiles, want the %d old ones at level 8", before-n, oldL8)
			}
			t.Logf("cleanup %s: removed %d tiles, as mapproxy-seed did", name, before-n)
		}
	})
}

func TestPlannerMatchesMapProxySeed(t *testing.T) {
	t.Parallel() // minutes of subprocesses: overlap with the other MapProxy tests
	r := newPlannerRig(t)
	seedConfig := filepath.Join(r.dir, "seed.yaml")
	seed := func(name string) map[string]any {
		return map[string]any{"kind": "seed", "seed_config": seedConfig, "name": name}
	}

	t.Run("errors", func(t *testing.T) {
		r.t = t
		for _, tc := range []struct {
			spec map[string]any
			want string
		}{
			{seed("nope"), `unknown seed "nope"`},
			{map[string]any{"kind": "cleanup", "seed_config": seedConfig, "name": "geo_union"}, `unknown cleanup "geo_union"`},
			{map[string]any{"kind": "seed", "seed_config": filepath.Join(r.dir, "bad-seed.yaml"), "name": "x"}, "invalid configuration"},
			{map[string]any{"kind": "seed", "seed_config": filepath.Join(r.dir, "missing.yaml"), "name": "x"}, "missing.yaml"},
			{map[string]any{"kind": "seed", "inline": map[string]any{"cache": "no_cache"}}, "cache no_cache not found"},
			{map[string]any{"kind": "seed", "inline": map[string]any{"cache": "inl_cache", "coverage": "nope"}, "seed_config": seedConfig}, `unknown coverage "nope"`},
			{map[string]any{"kind": "bogus"}, `"kind" must be`},
			{map[string]any{"kind": "seed", "seed_config": seedConfig}, `give "name" or "inline"`},
		} {
			run := r.plan(tc.spec)
			if run.code != 1 || len(run.lines) != 1 || !strings.Contains(run.lines[0].Error, tc.want) {
				t.Errorf("%v: got exit %d, lines %+v; want exit 1 and one error line containing %q\n%s",
					tc.spec, run.code, run.lines, tc.want, tail(run.stderr, 1000))
			}
		}
	})

	t.Run("list", func(t *testing.T) {
		r.t = t
		run := r.planOK(map[string]any{"kind": "list", "seed_config": seedConfig})
		l := run.lines[0]
		if want := []string{"geo_union", "inl_box", "inl_poly", "merc_area", "merc_refresh", "multi"}; !slices.Equal(l.Seeds, want) {
			t.Errorf("seeds: got %v, want %v", l.Seeds, want)
		}
		if want := []string{"geo_poly", "merc_old"}; !slices.Equal(l.Cleanups, want) {
			t.Errorf("cleanups: got %v, want %v", l.Cleanups, want)
		}
	})

	// The daemon's part, played here: plan, then one "refresh": false seed job per metatile.
	planSide := func(t *testing.T, kind, name string) uint64 {
		start := time.Now()
		run := r.planOK(map[string]any{"kind": kind, "seed_config": seedConfig, "name": name})
		last := 0.0
		for _, l := range run.lines {
			if l.Progress != nil {
				if *l.Progress < last || *l.Progress > 1 {
					t.Errorf("%s %s: progress went from %v to %v", kind, name, last, *l.Progress)
				}
				last = *l.Progress
			}
		}
		if last != 1 {
			t.Errorf("%s %s: last progress %v, want 1", kind, name, last)
		}
		if name == "multi" {
			if got, want := run.tasks(), []string{"merc_cache_GLOBAL_GEODETIC", "geo_cache_GLOBAL_GEODETIC"}; !slices.Equal(got, want) {
				t.Errorf("tasks line: got %v, want %v", got, want)
			}
		}
		for _, l := range run.tiles {
			ago := start.Sub(time.Unix(int64(derefOr(l.RefreshBefore, 0)), 0))
			if name == "merc_refresh" && (ago > 24*time.Hour+time.Minute || ago < 24*time.Hour-time.Minute) {
				t.Fatalf("metatile line without refresh_before one day ago: %+v", l)
			}
			if name != "merc_refresh" && l.RefreshBefore != nil {
				t.Fatalf("metatile line with a refresh_before the seed does not have: %+v", l)
			}
		}
		if skipped := r.render(run); skipped != 0 {
			t.Errorf("%s %s: the worker skipped %d of the %d planned metatiles", kind, name, skipped, len(run.tiles))
		}
		t.Logf("%s %s: %d metatiles planned", kind, name, len(run.tiles))
		return derefOr(run.lines[len(run.lines)-1].Removed, 0)
	}
	r.compareWithMapProxySeed(t, planSide)

	t.Run("inline seeds equal their seed.yaml entries", func(t *testing.T) {
		r.t = t
		for _, tc := range []struct {
			named  string
			inline map[string]any
		}{
			{"inl_box", map[string]any{"cache": "inl_cache", "levels": map[string]int{"from": 0, "to": 6}, "bbox": []float64{8, 47.5, 12, 50}, "srs": "EPSG:4326"}},
			{"inl_poly", map[string]any{"cache": "inl_cache", "grids": []string{"GLOBAL_WEBMERCATOR"}, "levels": []int{7}, "coverage": "poly"}},
		} {
			before := len(r.tiles("a"))
			run := r.planOK(map[string]any{"kind": "seed", "seed_config": seedConfig, "name": "inline:inl_cache", "inline": tc.inline})
			r.render(run)
			r.mapproxySeed("--seed", tc.named)
			if n := r.sameTiles("inline " + tc.named); n-before < 5 {
				t.Errorf("inline %v added only %d tiles", tc.inline, n-before)
			}
		}
	})

	t.Run("a seed that is done plans nothing and the worker skips fresh metatiles", func(t *testing.T) {
		r.t = t
		if run := r.planOK(seed("inl_box")); len(run.tiles) != 0 {
			t.Errorf("rerun planned %d metatiles, want 0: %+v", len(run.tiles), run.tiles[0])
		}
		before := r.tiles("a")
		rep := r.renderer().job(map[string]any{"cache_identifier": "inl_cache_GLOBAL_WEBMERCATOR", "tiles": [][]int{{2, 2, 2}}, "refresh": false, "seed": true})
		if !rep.Skipped {
			t.Errorf("refresh false on a cached metatile: got %+v, want skipped", rep)
		}
		if after := r.tiles("a"); !mapsEqual(before, after) {
			t.Errorf("a skipped job changed tile files")
		}
		rep = r.renderer().job(map[string]any{"cache_identifier": "inl_cache_GLOBAL_WEBMERCATOR", "tiles": [][]int{{2, 2, 2}}, "seed": true})
		if rep.Skipped {
			t.Errorf("a forced job (refresh absent) was skipped")
		}
	})

	t.Run("a cursor resumes the walk", func(t *testing.T) {
		r.t = t
		spec := map[string]any{"kind": "seed", "inline": map[string]any{"cache": "cur_cache", "grids": []string{"GLOBAL_WEBMERCATOR", "GLOBAL_GEODETIC"},
			"levels": map[string]int{"from": 0, "to": 8}, "bbox": []float64{8, 47.5, 12, 50}}}
		full := r.planOK(spec)
		type key struct {
			ident   string
			x, y, z int
		}
		keyOf := func(l planLine) key { return key{l.CacheIdentifier, l.Tile[0], l.Tile[1], l.Tile[2]} }
		all := map[key]bool{}
		var cursors []json.RawMessage
		var positions []int // metatile lines before each cursor
		for _, l := range full.lines {
			switch {
			case l.Tile != nil:
				all[keyOf(l)] = true
			case l.Cursor != nil:
				cursors = append(cursors, l.Cursor)
				positions = append(positions, len(all))
			}
		}
		// A cursor whenever the walk moved to another branch (the 4 metatiles under one
		// parent share one position): dense enough that a checkpoint trails the renders by
		// a few metatiles, not by a planner's stride.
		if len(cursors) < len(full.tiles)/6 || len(full.tasks()) != 2 {
			t.Fatalf("%d cursor lines for %d metatiles in %d tasks, want at least %d in 2", len(cursors), len(full.tiles), len(full.tasks()), len(full.tiles)/6)
		}
		for _, c := range cursors {
			if strings.Contains(string(c), `"levels": []`) {
				t.Errorf("cursor %s: resuming from [] skips the whole walk, top-level metatiles included", c)
			}
		}
		midTask := 0
		for i := 1; i < len(cursors); i += max(1, len(cursors)/3) {
			if !strings.Contains(string(cursors[i]), `"levels": null`) {
				midTask++
			}
			spec["cursor"] = cursors[i]
			resumed := r.planOK(spec)
			got := map[key]bool{}
			for _, l := range resumed.tiles {
				got[keyOf(l)] = true
				if !all[keyOf(l)] {
					t.Errorf("resumed from %s: planned %v, which the full walk did not", cursors[i], l)
				}
			}
			// Everything after the cursor is planned again (and at most the current branch before it).
			for _, l := range full.tiles[positions[i]:] {
				if !got[keyOf(l)] {
					t.Errorf("resumed from %s: %v is missing", cursors[i], keyOf(l))
					break
				}
			}
			if positions[i] > 0 && len(resumed.tiles) >= len(full.tiles) {
				t.Errorf("resumed from %s after %d metatiles: planned %d, the full walk %d", cursors[i], positions[i], len(resumed.tiles), len(full.tiles))
			}
		}
		if midTask == 0 {
			t.Errorf("no cursor inside a task was tried: %s", cursors)
		}
		bad := r.plan(map[string]any{"kind": "seed", "seed_config": seedConfig, "name": "geo_union", "cursor": cursors[len(cursors)/2]})

		if bad.code != 1 || len(bad.lines) != 1 || !strings.Contains(bad.lines[0].Error, "cursor") {
			t.Errorf("a cursor of another seed: got exit %d %+v, want a cursor error", bad.code, bad.lines)
		}
	})

	t.Run("a resolved spec walks the same after seed.yaml changed and time passed", func(t *testing.T) {
		r.t = t
		// cur_cache is never rendered: every metatile is planned.
		own := filepath.Join(r.dir, "seed-resolved.yaml")
		data := "coverages:\n  box: {bbox: [8.0, 47.5, 12.0, 50.0], srs: 'EPSG:4326'}\nseeds:\n" +
			"  cur_refresh: {caches: [cur_cache], grids: [GLOBAL_WEBMERCATOR], coverages: [box], levels: [3, 5, 8], refresh_before: {days: 1}}\n"
		if err := os.WriteFile(own, []byte(data), 0o644); err != nil {
			t.Fatal(err)
		}
		first := r.planOK(map[string]any{"kind": "seed", "seed_config": own, "name": "cur_refresh"})
		if len(first.lines) == 0 || first.lines[0].Resolved == nil || len(first.tiles) == 0 {
			t.Fatalf("first line %+v, want the resolved line, then metatiles", first.lines[0])
		}
		var resolved struct {
			RefreshBefore float64 `json:"refresh_before"`
		}
		if err := json.Unmarshal(first.lines[0].Resolved, &resolved); err != nil || resolved.RefreshBefore == 0 {
			t.Fatalf("resolved %s: want an absolute refresh_before (%v)", first.lines[0].Resolved, err)
		}
		if got := *first.tiles[0].RefreshBefore; got != resolved.RefreshBefore {
			t.Errorf("metatile refresh_before %v, resolved %v", got, resolved.RefreshBefore)
		}
		// refresh_before {days: 1} resolves to whole seconds: once the clock is in a later
		// second, resolving again gives another time. Bounded: at most one second.
		for deadline := time.Now().Add(5 * time.Second); time.Now().Unix()-86400 <= int64(resolved.RefreshBefore); {
			if time.Now().After(deadline) {
				t.Fatal("the clock did not move on")
			}
			time.Sleep(10 * time.Millisecond) // waiting for the wall clock, bounded by the deadline
		}
		if err := os.WriteFile(own, []byte(strings.Replace(data, "levels: [3, 5, 8]", "levels: [3]", 1)), 0o644); err != nil {
			t.Fatal(err)
		}
		again := r.planOK(map[string]any{"kind": "seed", "resolved": first.lines[0].Resolved})
		if again.lines[0].Resolved != nil {
			t.Errorf("a resolved spec was resolved again: %s", again.lines[0].Resolved)
		}
		if len(again.tiles) != len(first.tiles) {
			t.Fatalf("resolved spec after the change: %d metatiles, first run %d", len(again.tiles), len(first.tiles))
		}
		for i := range again.tiles {
			a, b := again.tiles[i], first.tiles[i]
			if !slices.Equal(a.Tile, b.Tile) || a.CacheIdentifier != b.CacheIdentifier || *a.RefreshBefore != *b.RefreshBefore {
				t.Fatalf("metatile %d: %s %v refresh_before %v, first run %s %v %v", i, a.CacheIdentifier, a.Tile, *a.RefreshBefore,
					b.CacheIdentifier, b.Tile, *b.RefreshBefore)
			}
		}
		byName := r.planOK(map[string]any{"kind": "seed", "seed_config": own, "name": "cur_refresh"})
		if len(byName.tiles) >= len(first.tiles) || *byName.tiles[0].RefreshBefore <= resolved.RefreshBefore {
			t.Errorf("the changed entry by name: %d metatiles, refresh_before %v; want fewer than %d and later than %v (else this test proves nothing)",
				len(byName.tiles), *byName.tiles[0].RefreshBefore, len(first.tiles), resolved.RefreshBefore)
		}
		bad := r.plan(map[string]any{"kind": "seed", "resolved": map[string]any{"name": "x", "conf": map[string]any{}}})
		if bad.code != 1 || len(bad.lines) != 1 || !strings.Contains(bad.lines[0].Error, "resolved") {
			t.Errorf("a resolved spec without its entry: exit %d %+v, want an error naming resolved", bad.code, bad.lines)
		}
	})
}

func (run planRun) tasks() []string {
	var ids []string
	for _, l := range run.lines {
		for _, task := range l.Tasks {
			ids = append(ids, task.CacheIdentifier)
		}
	}
	return ids
}

func sortedKeys[V any](m map[string]V) []string {
	k := make([]string, 0, len(m))
	for s := range m {
		k = append(k, s)
	}
	slices.Sort(k)
	return k
}

func mapsEqual(a, b map[string]time.Time) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if w, ok := b[k]; !ok || !w.Equal(v) {
			return false
		}
	}
	return true
}

func derefOr[T any](p *T, def T) T {
	if p == nil {
		return def
	}
	return *p
}
