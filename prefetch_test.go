// SPDX-License-Identifier: Apache-2.0

package main

import (
	"encoding/json"
	"fmt"
	"slices"
	"strings"
	"testing"
)

// TestPrefetchChildren: the metatiles at the next levels that cover a metatile, for nw and
// sw grids, metatile sizes 4×4 and 3×2, clipped to the grid and to max_zoom.
func TestPrefetchChildren(t *testing.T) {
	// A GLOBAL_GEODETIC-like sw grid: 1×1 at z0, then 2^z × 2^(z-1).
	geodetic := &gridInfo{Origin: "sw", GridSizes: [][2]int64{{1, 1}, {2, 1}, {4, 2}, {8, 4}, {16, 8}}}
	mercator := &gridInfo{Origin: "nw", GridSizes: [][2]int64{{1, 1}, {2, 2}, {4, 4}, {8, 8}, {16, 16}, {32, 32}, {64, 64}, {128, 128}}}
	five, two := 5, 2
	for _, tc := range []struct {
		name    string
		meta    [2]int32
		grid    *gridInfo
		levels  int
		maxZoom *int
		tile    tileCoord // any tile of the parent metatile
		want    string    // "x,y,z" keys
	}{
		{"nw 4x4", [2]int32{4, 4}, mercator, 1, nil, tileCoord{17, 10, 5}, "32,16,6 36,16,6 32,20,6 36,20,6"},
		{"nw 4x4 without grid details", [2]int32{4, 4}, nil, 1, nil, tileCoord{17, 10, 5}, "32,16,6 36,16,6 32,20,6 36,20,6"},
		{"nw 3x2", [2]int32{3, 2}, mercator, 1, nil, tileCoord{17, 10, 5}, "30,20,6 33,20,6 30,22,6 33,22,6"},
		{"nw 3x2 no clip", [2]int32{3, 2}, nil, 1, nil, tileCoord{17, 10, 5}, "30,20,6 33,20,6 30,22,6 33,22,6"},
		{"nw 4x4 two levels", [2]int32{4, 4}, mercator, 2, nil, tileCoord{1, 2, 2},
			"0,0,3 4,0,3 0,4,3 4,4,3 0,0,4 4,0,4 8,0,4 12,0,4 0,4,4 4,4,4 8,4,4 12,4,4 0,8,4 4,8,4 8,8,4 12,8,4 0,12,4 4,12,4 8,12,4 12,12,4"},
		{"nw 4x4 at max_zoom", [2]int32{4, 4}, mercator, 2, &five, tileCoord{17, 10, 5}, ""},
		{"nw 4x4 below max_zoom", [2]int32{4, 4}, mercator, 3, &five, tileCoord{1, 1, 4}, "0,0,5 4,0,5 0,4,5 4,4,5"},
		{"nw last grid level", [2]int32{4, 4}, mercator, 1, nil, tileCoord{0, 0, 7}, ""},
		{"sw 3x2 clipped", [2]int32{3, 2}, geodetic, 1, nil, tileCoord{3, 1, 2}, "6,0,3 6,2,3"},
		{"sw 3x2 top row of z1", [2]int32{3, 2}, geodetic, 1, nil, tileCoord{1, 0, 1}, "0,0,2 3,0,2"},
		{"sw 4x4 from z0", [2]int32{4, 4}, geodetic, 2, &two, tileCoord{0, 0, 0}, "0,0,1 0,0,2"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			pf := newPrefetcher(&PrefetchConfig{Caches: []string{"c_G"}, Levels: tc.levels, MaxZoom: tc.maxZoom})
			if tc.grid != nil {
				pf.learn(map[string]*gridInfo{"c_G": tc.grid})
			}
			c := &cacheInfo{id: "c_G", metaX: tc.meta[0], metaY: tc.meta[1]}
			var got []string
			for _, k := range pf.children(c, keyFor(c, tc.tile)) {
				got = append(got, fmt.Sprintf("%d,%d,%d", k.x, k.y, k.z))
			}
			if g := strings.Join(got, " "); g != tc.want {
				t.Errorf("children of %v: got %q, want %q", tc.tile, g, tc.want)
			}
		})
	}
}

// TestPrefetchRatio: resolutions from the ready line that do not halve per level.
func TestPrefetchRatio(t *testing.T) {
	pf := newPrefetcher(&PrefetchConfig{Caches: []string{"c"}, Levels: 1})
	pf.learn(map[string]*gridInfo{"c": {Resolutions: []float64{300, 100}}}) // 3 tiles per tile
	c := &cacheInfo{id: "c", metaX: 2, metaY: 2}
	got := pf.children(c, jobKey{x: 2, y: 0, z: 0})
	want := []jobKey{{x: 6, y: 0, z: 1}, {x: 8, y: 0, z: 1}, {x: 10, y: 0, z: 1}, {x: 6, y: 2, z: 1}, {x: 8, y: 2, z: 1}, {x: 10, y: 2, z: 1}, {x: 6, y: 4, z: 1}, {x: 8, y: 4, z: 1}, {x: 10, y: 4, z: 1}}
	if !slices.Equal(got, want) {
		t.Errorf("got %v, want %v", got, want)
	}
}

// TestPrefetchClippedAtGridEdge: a 3x2 metatile at the right edge of an nw grid whose width
// is no multiple of 3 spans fewer tiles; its children stop at the grid's edge.
func TestPrefetchClippedAtGridEdge(t *testing.T) {
	pf := newPrefetcher(&PrefetchConfig{Caches: []string{"c"}, Levels: 1})
	pf.learn(map[string]*gridInfo{"c": {Origin: "nw", GridSizes: [][2]int64{{1, 1}, {2, 2}, {4, 4}, {8, 8}}}})
	c := &cacheInfo{id: "c", metaX: 3, metaY: 2}
	// z2: 4 wide, the metatile at x 3 holds only x 3; at z3 that is x 6..7, y 0..3.
	got := pf.children(c, keyFor(c, tileCoord{3, 1, 2}))
	want := []jobKey{{x: 6, y: 0, z: 3}, {x: 6, y: 2, z: 3}}
	if !slices.Equal(got, want) {
		t.Errorf("got %v, want %v", got, want)
	}
}

// prefetchCaches is the fake renderers' ready line: cache c, grid G, 4×4 metatiles, nw.
const prefetchCaches = `{"c_G": {"meta_size": [4, 4], "cache": "c", "grid": "G", "origin": "nw"}}`

// jobKeysLogged returns the fake renderers' job log from line from on as "z/x/y" strings.
func jobKeysLogged(d *testDaemon, from int) []string {
	var out []string
	for _, l := range d.jobLog()[from:] {
		f := strings.Fields(l)
		out = append(out, f[2]+"/"+f[3]+"/"+f[4])
	}
	return out
}

// TestPrefetchQueueDropHits: a live render queues its four z+1 metatiles; beyond
// prefetch.max_queued the oldest is dropped; a live request joining a queued prefetch job
// and one for a metatile prefetched before are hits; prefetch renders do not prefetch.
func TestPrefetchQueueDropHits(t *testing.T) {
	d := newTestDaemon(t, daemonOpts{renderers: 1, maxSeed: -1, gate: true,
		rendArgs:  []string{"-caches", prefetchCaches},
		extraYAML: "prefetch: {caches: [c], max_queued: 3, max_zoom: 6}\n"})
	cl := d.dial()
	cl.send(tileReq("live", "c_G", 17, 10, 5, 100))
	d.release(1)
	if r := cl.read(); r.Status != statusOK {
		t.Fatalf("live: got %+v", r)
	}
	// The four children were queued at once; the fourth pushed the first out; the second
	// started on the idle renderer.
	doc := d.waitFor("prefetch queued", func(s statusDoc) bool { return s.Counters["prefetched"] == 4 })
	if doc.Counters["prefetch_dropped"] != 1 || doc.Queue.Length != 2 || doc.Queue.ByPriority["5"] != 2 || doc.Renderers.Busy != 1 {
		t.Fatalf("after the live render: counters %v, queue %+v, busy %d; want 1 dropped, 2 queued at priority 5, 1 running",
			doc.Counters, doc.Queue, doc.Renderers.Busy)
	}
	// A live request for a tile of the third child (32,20 at z6) joins its queued job.
	cl.send(tileReq("joins", "c_G", 33, 21, 6, 100))
	d.waitFor("hit", func(s statusDoc) bool { return s.Counters["prefetch_hits"] == 1 && s.Queue.ByPriority["100"] == 1 })
	d.release(3)
	if r := cl.read(); idOf(r) != "joins" || r.Status != statusOK || !r.Merged {
		t.Fatalf("joins: got %+v, want ok merged", r)
	}
	d.waitFor("all rendered", func(s statusDoc) bool { return s.Counters["rendered"] == 4 && s.Queue.Length == 0 })
	// The live job, the child that was running, the promoted one, the last one; the first
	// child (32,16) was dropped.
	want := []string{"5/16/8", "6/36/16", "6/32/20", "6/36/20"}
	if got := jobKeysLogged(d, 0); !slices.Equal(got, want) {
		t.Fatalf("renders: got %v, want %v", got, want)
	}
	// A live request for a metatile that was prefetched and rendered before: a hit, once.
	d.release(2)
	cl.send(tileReq("after", "c_G", 38, 17, 6, 100))
	cl.send(tileReq("again", "c_G", 38, 17, 6, 100))
	for i := 0; i < 2; i++ {
		if r := cl.read(); r.Status != statusOK {
			t.Fatalf("after: got %+v", r)
		}
	}
	doc = d.status()
	if doc.Counters["prefetch_hits"] != 2 || doc.Counters["prefetched"] != 4 {
		t.Errorf("counters: got %v, want prefetch_hits 2, prefetched 4 (z6 is max_zoom: nothing more)", doc.Counters)
	}
}

// TestPrefetchNeverDisplaces: with the queue full, requests of every class push queued
// prefetch jobs out instead of being refused, and prefetch takes only the room left.
func TestPrefetchNeverDisplaces(t *testing.T) {
	d := newTestDaemon(t, daemonOpts{renderers: 1, maxSeed: -1, gate: true,
		rendArgs:  []string{"-caches", prefetchCaches},
		extraYAML: "max_queued: 4\nprefetch: {caches: [c_G]}\n"})
	cl := d.dial()
	cl.send(tileReq("first", "c_G", 17, 10, 5, 100))
	d.release(1)
	cl.read()
	d.waitFor("children queued", func(s statusDoc) bool {
		return s.Counters["prefetched"] == 4 && s.Queue.Length == 3 && s.Renderers.Busy == 1
	})
	cl.send(tileReq("live1", "c_G", 0, 0, 5, 100)) // fits: 4 queued
	cl.send(tileReq("live2", "c_G", 4, 0, 5, 100)) // a prefetch job makes room
	cl.send(tileReq("seed", "c_G", 8, 0, 5, 10))   // and another
	cl.send(`{"command":"tile","id":"bg","cache_identifier":"c_G","tiles":[[12,0,5]],"background":true}`)
	if r := cl.read(); idOf(r) != "bg" || r.Status != statusQueued {
		t.Fatalf("background: got %+v, want queued", r)
	}
	doc := d.status()
	if doc.Counters["busy_rejected"] != 0 || doc.Counters["prefetch_dropped"] != 3 || doc.Queue.Length != 4 || doc.Queue.ByPriority["5"] != 0 {
		t.Fatalf("counters %v, queue %+v: want 3 prefetch jobs dropped, none refused, 4 queued, none at priority 5", doc.Counters, doc.Queue)
	}
	cl.send(tileReq("full", "c_G", 16, 0, 5, 100))
	if r := cl.read(); idOf(r) != "full" || r.Status != statusBusy {
		t.Fatalf("with only non-prefetch work queued: got %+v, want busy", r)
	}
	// The running prefetch job ends; live1 runs and ends: of its four children one fits.
	d.release(2)
	if r := cl.read(); idOf(r) != "live1" {
		t.Fatalf("got %+v, want live1", r)
	}
	doc = d.waitFor("live1's children", func(s statusDoc) bool { return s.Counters["prefetched"] == 5 })
	// live2 started after the child was queued: the child, the seed and the background job remain.
	if doc.Counters["prefetch_dropped"] != 6 || doc.Queue.Length != 3 || doc.Queue.ByPriority["5"] != 1 {
		t.Errorf("counters %v, queue %+v: want 6 dropped (3 more refused for room), 3 queued, one at priority 5", doc.Counters, doc.Queue)
	}
	d.release(10)
}

// TestPrefetchJobLineNotForced: a prefetch job asks the renderer to render only missing or
// stale tiles; once a request joins it, it is forced as every request's job.
func TestPrefetchJobLineNotForced(t *testing.T) {
	s := newScheduler(Config{SeedPriorityBelow: 50, MaxQueued: 10, Renderers: 1,
		Prefetch: &PrefetchConfig{Caches: []string{"c"}, Levels: 1, Priority: new(int), MaxQueued: 10}}, nil, rendererConfig{})
	c := s.newCache("c")
	s.queuePrefetch(jobKey{cache: c.idx, x: 4, y: 4, z: 3})
	j := s.qs.jobs[jobKey{cache: c.idx, x: 4, y: 4, z: 3}]
	if j == nil || j.flags&forceJob != 0 {
		t.Fatalf("prefetch job %v: want one without forceJob", j)
	}
	line := string(appendJobLine(nil, "3", renderJob{cache: "c", tile: tileCoord{4, 4, 3}, refresh: j.flags&forceJob != 0}))
	if !strings.Contains(line, `"refresh":false`) || !json.Valid([]byte(line)) {
		t.Errorf("got %s, want valid JSON with \"refresh\":false", line)
	}
	keys := []jobKey{j.key}
	if _, err := s.qs.add(keys, 100, false, nil, 0); err != nil {
		t.Fatal(err)
	}
	s.noteRequest(keys, true)
	if j.flags&forceJob == 0 || j.flags&prefetchJob != 0 || s.stats.prefetchHits != 1 {
		t.Errorf("after a live request joined: flags %b, hits %d; want forced, no longer a prefetch job, 1 hit", j.flags, s.stats.prefetchHits)
	}
}

// TestPrefetchCentreChildren: the box of the burst's size around its centre, one level down.
func TestPrefetchCentreChildren(t *testing.T) {
	pf := newPrefetcher(&PrefetchConfig{Caches: []string{"c"}, Levels: 1, Area: "centre"})
	c := &cacheInfo{id: "c", metaX: 4, metaY: 4}
	// Live renders covered tiles x 16..27, y 8..15 at z5 (3×2 metatiles): centre (22, 12);
	// at z6 the box 12×8 tiles around (44, 24): x 38..49, y 20..27.
	b := &burst{c: c, z: 5, minX: 16, minY: 8, maxX: 28, maxY: 16}
	var got []string
	for _, k := range pf.centreChildren(b) {
		got = append(got, fmt.Sprintf("%d,%d,%d", k.x, k.y, k.z))
	}
	want := "36,20,6 40,20,6 44,20,6 48,20,6 36,24,6 40,24,6 44,24,6 48,24,6"
	if g := strings.Join(got, " "); g != want {
		t.Errorf("got %q, want %q", g, want)
	}
}

// TestPrefetchCentreBurst: in centre mode a view's live renders are prefetched once they
// pause, as the box around their centre, and a live render at another zoom ends the burst.
func TestPrefetchCentreBurst(t *testing.T) {
	d := newTestDaemon(t, daemonOpts{renderers: 2, maxSeed: -1,
		rendArgs:  []string{"-caches", prefetchCaches},
		extraYAML: "prefetch: {caches: [c], area: centre, max_zoom: 6}\n"})
	cl := d.dial()
	// Two renderers take both at once: their renders finish well within the burst's quiet
	// period. Two metatiles side by side at z5: x 16..23, y 8..11; centre (20, 10) → at z6 the box
	// 8×4 tiles around (40, 20): x 36..43, y 18..21 → metatiles x 36, 40 × y 16, 20.
	cl.send(tileReq("a", "c_G", 17, 10, 5, 100))
	cl.send(tileReq("b", "c_G", 21, 10, 5, 100))
	cl.read()
	cl.read()
	d.waitFor("the burst prefetched", func(s statusDoc) bool { return s.Counters["prefetched"] == 4 && s.Counters["rendered"] == 6 })
	got := jobKeysLogged(d, 2)
	slices.Sort(got)
	if want := []string{"6/36/16", "6/36/20", "6/40/16", "6/40/20"}; !slices.Equal(got, want) {
		t.Errorf("prefetched: got %v, want %v", got, want)
	}
}

// TestPrefetchSWGridThroughTheDaemon: the grid details come from the renderer's ready line;
// a 3×2 metatile at the edge of an sw grid (GLOBAL_GEODETIC's sizes) has two children, and
// nothing is prefetched below the grid's last level.
func TestPrefetchSWGridThroughTheDaemon(t *testing.T) {
	caches := `{"g_S": {"meta_size": [3, 2], "cache": "g", "grid": "S", "origin": "sw", "grid_sizes": [[1, 1], [2, 1], [4, 2], [8, 4], [16, 8]]}}`
	d := newTestDaemon(t, daemonOpts{renderers: 1, maxSeed: -1,
		rendArgs: []string{"-caches", caches}, extraYAML: "prefetch: {caches: [g_S], levels: 2}\n"})
	cl := d.dial()
	cl.send(tileReq("edge", "g_S", 3, 1, 2, 100))
	cl.read()
	// z3: x 6..7, y 0..3 → metatiles (6,0), (6,2). z4 (levels 2): x 12..15, y 0..7 →
	// x 12 and 15 (the 16-wide grid ends inside the second) × y 0, 2, 4, 6.
	d.waitFor("children rendered", func(s statusDoc) bool { return s.Counters["rendered"] == 1+2+8 && s.Queue.Length == 0 })
	got := jobKeysLogged(d, 1)
	slices.Sort(got)
	want := []string{"3/6/0", "3/6/2", "4/12/0", "4/12/2", "4/12/4", "4/12/6", "4/15/0", "4/15/2", "4/15/4", "4/15/6"}
	if !slices.Equal(got, want) {
		t.Errorf("prefetched: got %v, want %v", got, want)
	}
	cl.send(tileReq("last", "g_S", 0, 0, 4, 100))
	cl.read()
	doc := d.waitFor("rendered", func(s statusDoc) bool { return s.Queue.Length == 0 && s.Renderers.Busy == 0 })
	if n := doc.Counters["prefetched"]; n != uint64(len(got)) {
		t.Errorf("a live render at the grid's last level prefetched %d more", n-uint64(len(got)))
	}
}
