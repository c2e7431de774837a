// SPDX-License-Identifier: Apache-2.0

package main

import (
	"fmt"
	"strings"
	"testing"
	"time"
)

// TestViewTableBounded: the table never holds more than viewsPerCache tiles, its index
// matches its entries, a tile seen often survives a flood of tiles seen once, and a count
// halves in a half-life.
func TestViewTableBounded(t *testing.T) {
	vt := newViewTable()
	heavy := tileCoord{1, 1, 3}
	for range 50 {
		vt.add(heavy, 0)
	}
	for i := range 10 * viewsPerCache {
		vt.add(tileCoord{int32(i), 7, 12}, int64(i))
	}
	if len(vt.e) != viewsPerCache || len(vt.idx) != viewsPerCache {
		t.Fatalf("got %d entries, %d indexed; want %d", len(vt.e), len(vt.idx), viewsPerCache)
	}
	for tc, i := range vt.idx {
		if vt.e[i].t != tc {
			t.Fatalf("index says %v at %d, entry holds %v", tc, i, vt.e[i].t)
		}
	}
	i, ok := vt.idx[heavy]
	if !ok {
		t.Fatal("the tile viewed 50 times was evicted by tiles viewed once")
	}
	e := vt.e[i]
	if w := e.weight(int64(viewHalfLife)); w < 24.99 || w > 25.01 {
		t.Errorf("weight after one half-life: got %v, want 25", w)
	}
	vt.add(heavy, int64(viewHalfLife))
	if w := vt.e[i].weight(int64(viewHalfLife)); w < 25.99 || w > 26.01 {
		t.Errorf("weight after one more view: got %v, want 26", w)
	}
}

// TestViewCandidates: the next-zoom metatiles chosen from views, best first, for nw and sw
// grids and metatiles 4×4 and 3×2; metatiles holding a viewed tile, queued or recently
// prefetched ones are left out, and nothing below max_zoom or the grid's last level.
func TestViewCandidates(t *testing.T) {
	mercator := &gridInfo{Origin: "nw", GridSizes: [][2]int64{{1, 1}, {2, 2}, {4, 4}, {8, 8}, {16, 16}, {32, 32}, {64, 64}, {128, 128}}}
	geodetic := &gridInfo{Origin: "sw", GridSizes: [][2]int64{{1, 1}, {2, 1}, {4, 2}, {8, 4}}}
	five := 5
	type view struct {
		t    tileCoord
		n    int
		ageS int // seconds before now
	}
	for _, tc := range []struct {
		name    string
		meta    [2]int32
		grid    *gridInfo
		maxZoom *int
		views   []view
		queued  []tileCoord // metatiles queued or running
		recent  []tileCoord // metatiles prefetched recently
		want    string      // "x,y,z:weight" best first
	}{
		{"nw 4x4 by count", [2]int32{4, 4}, mercator, nil,
			[]view{{tileCoord{30, 30, 5}, 1, 0}, {tileCoord{17, 10, 5}, 3, 0}}, nil, nil,
			"32,20,6:3.00 60,60,6:1.00"},
		{"nw 4x4 by recency", [2]int32{4, 4}, mercator, nil,
			[]view{{tileCoord{30, 30, 5}, 2, 0}, {tileCoord{17, 10, 5}, 3, 5}}, nil, nil,
			"60,60,6:2.00 32,20,6:1.50"},
		{"nw 4x4 two parents in one metatile", [2]int32{4, 4}, mercator, nil,
			[]view{{tileCoord{16, 8, 5}, 1, 0}, {tileCoord{17, 9, 5}, 1, 0}, {tileCoord{20, 20, 5}, 1, 0}}, nil, nil,
			"32,16,6:2.00 40,40,6:1.00"},
		{"nw a viewed child means rendered", [2]int32{4, 4}, mercator, nil,
			[]view{{tileCoord{17, 10, 5}, 3, 0}, {tileCoord{30, 30, 5}, 1, 0}, {tileCoord{33, 23, 6}, 1, 0}}, nil, nil,
			"60,60,6:1.00 64,44,7:1.00"},
		{"nw queued and prefetched left out", [2]int32{4, 4}, mercator, nil,
			[]view{{tileCoord{17, 10, 5}, 3, 0}, {tileCoord{30, 30, 5}, 1, 0}, {tileCoord{2, 2, 5}, 1, 0}},
			[]tileCoord{{32, 20, 6}}, []tileCoord{{60, 60, 6}}, "4,4,6:1.00"},
		{"nw 3x2 children over two metatiles", [2]int32{3, 2}, mercator, nil,
			[]view{{tileCoord{16, 10, 5}, 1, 0}}, nil, nil, "30,20,6:0.50 33,20,6:0.50"},
		{"nw 4x4 at max_zoom", [2]int32{4, 4}, mercator, &five,
			[]view{{tileCoord{17, 10, 5}, 3, 0}, {tileCoord{1, 1, 4}, 1, 0}}, nil, nil, "0,0,5:1.00"},
		{"nw last grid level", [2]int32{4, 4}, mercator, nil, []view{{tileCoord{3, 3, 7}, 9, 0}}, nil, nil, ""},
		{"nw forgotten after many half-lives", [2]int32{4, 4}, mercator, nil, []view{{tileCoord{17, 10, 5}, 1, 600}}, nil, nil, ""},
		{"sw 3x2", [2]int32{3, 2}, geodetic, nil, []view{{tileCoord{1, 0, 1}, 1, 0}}, nil, nil, "0,0,2:0.50 3,0,2:0.50"},
		{"sw 3x2 z2", [2]int32{3, 2}, geodetic, nil, []view{{tileCoord{3, 1, 2}, 2, 0}}, nil, nil, "6,2,3:2.00"},
		{"sw z0 clipped to the grid's 2x1", [2]int32{3, 2}, geodetic, nil, []view{{tileCoord{0, 0, 0}, 2, 0}}, nil, nil, "0,0,1:2.00"},
		{"sw last grid level", [2]int32{3, 2}, geodetic, nil, []view{{tileCoord{3, 1, 3}, 2, 0}}, nil, nil, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := newScheduler(Config{SeedPriorityBelow: 50, MaxQueued: 100, Renderers: 1,
				Prefetch: &PrefetchConfig{Caches: []string{"c"}, Levels: 1, MaxZoom: tc.maxZoom, Priority: new(int), MaxQueued: 10, Area: "views"}}, nil, rendererConfig{})
			s.pf.learn(map[string]*gridInfo{"c": tc.grid})
			c := s.newCache("c")
			c.metaX, c.metaY = tc.meta[0], tc.meta[1]
			now := int64(time.Hour)
			vt := newViewTable()
			for _, v := range tc.views {
				for range v.n {
					vt.add(v.t, now-int64(v.ageS)*int64(time.Second))
				}
			}
			queued := map[jobKey]*job{}
			for _, q := range tc.queued {
				queued[keyFor(c, q)] = &job{}
			}
			for _, r := range tc.recent {
				s.pf.remember(keyFor(c, r))
			}
			cands := s.pf.viewCandidates(c, vt, now, queued)
			sortCandidates(cands)
			var got []string
			for _, cd := range cands {
				got = append(got, fmt.Sprintf("%d,%d,%d:%.2f", cd.k.x, cd.k.y, cd.k.z, cd.w))
			}
			if g := strings.Join(got, " "); g != tc.want {
				t.Errorf("got %q, want %q", g, tc.want)
			}
		})
	}
}

// TestViewsCommand: the views command is answered ok and counted into its cache's table;
// views of an unknown cache are counted apart; a views command without tiles is an error
// to that client only.
func TestViewsCommand(t *testing.T) {
	d := newTestDaemon(t, daemonOpts{renderers: 1, maxSeed: -1, rendArgs: []string{"-caches", prefetchCaches}})
	cl := d.dial()
	cl.send(`{"command":"views","id":"v","cache_identifier":"c_G","tiles":[[1,2,3],[1,2,3],[4,5,6]]}`)
	if r := cl.read(); idOf(r) != "v" || r.Status != statusOK {
		t.Fatalf("views: got %+v, want ok", r)
	}
	cl.send(`{"command":"views","id":"u","cache_identifier":"nope","tiles":[[1,2,3]]}`)
	if r := cl.read(); r.Status != statusOK {
		t.Fatalf("views of an unknown cache: got %+v, want ok (a hint, counted apart)", r)
	}
	cl.send(`{"command":"views","id":"bad","cache_identifier":"c_G"}`)
	if r := cl.read(); idOf(r) != "bad" || r.Status != statusError || !strings.Contains(r.ErrorMessage, "tiles") {
		t.Fatalf("views without tiles: got %+v, want an error naming tiles", r)
	}
	d.waitFor("views counted", func(s statusDoc) bool { return s.Counters["views"] == 3 && s.Counters["views_unknown"] == 1 })
	cl.send(tileReq("still", "c_G", 0, 0, 1, 100))
	if r := cl.read(); idOf(r) != "still" || r.Status != statusOK {
		t.Fatalf("a tile after views: got %+v", r)
	}
}

// TestPrefetchFromViewsBudget: with area views and budget 0.5, views of eight live-rendered
// metatiles at z5 make eight candidate metatiles at z6, of which only four are prefetched (half
// the eight live renders over the minute), best first; none while live work is queued.
func TestPrefetchFromViewsBudget(t *testing.T) {
	d := newTestDaemon(t, daemonOpts{renderers: 2, maxSeed: -1, gate: true,
		rendArgs:  []string{"-caches", prefetchCaches},
		extraYAML: "prefetch: {caches: [c], area: views, budget: 0.5}\n"})
	cl := d.dial()
	for i := range 8 {
		cl.send(tileReq(fmt.Sprint("live", i), "c_G", 4*i, 0, 5, 100))
	}
	// Views while live work is queued: nothing is prefetched.
	var views []string
	for i := range 8 {
		for range i + 1 { // metatile i is viewed i+1 times: the later ones weigh more
			views = append(views, fmt.Sprintf("[%d,1,5]", 4*i))
		}
	}
	cl.send(`{"command":"views","cache_identifier":"c_G","tiles":[` + strings.Join(views, ",") + `]}`)
	if r := cl.read(); r.Status != statusOK {
		t.Fatalf("views: got %+v", r)
	}
	d.waitFor("views counted", func(s statusDoc) bool { return s.Counters["views"] == 36 })
	if doc := d.status(); doc.Counters["prefetched"] != 0 {
		t.Fatalf("prefetched %d while live work was queued; want 0", doc.Counters["prefetched"])
	}
	d.release(8)
	for range 8 {
		if r := cl.read(); r.Status != statusOK {
			t.Fatalf("live: got %+v", r)
		}
	}
	d.release(100)
	doc := d.waitFor("prefetch within the budget", func(s statusDoc) bool {
		return s.Counters["prefetched"] == 4 && s.Counters["rendered"] == 12 && s.Queue.Length == 0 && s.Renderers.Busy == 0
	})
	// More views: the budget still holds.
	cl.send(`{"command":"views","cache_identifier":"c_G","tiles":[[0,0,5],[40,40,5]]}`)
	cl.read()
	doc = d.waitFor("more views counted", func(s statusDoc) bool { return s.Counters["views"] == 38 })
	if doc.Counters["prefetched"] != 4 {
		t.Errorf("prefetched %d after more views; want 4 (budget 0.5 × 8 live renders)", doc.Counters["prefetched"])
	}
	// Best first: the children of the four most viewed tiles, x 28, 24, 20, 16 at z5 → x 56,
	// 48, 40, 32 at z6 (the views were at y 1 → children y 2..3 → metatile row 0).
	got := jobKeysLogged(d, 8)
	want := map[string]bool{"6/56/0": true, "6/48/0": true, "6/40/0": true, "6/32/0": true}
	for _, k := range got {
		if !want[k] {
			t.Errorf("prefetched %v; want the children of the most viewed metatiles %v", got, want)
			break
		}
	}
}

// BenchmarkTakeViews: the scheduler's cost of one views batch of 256 tiles into a full
// table (new tiles, so every one evicts).
func BenchmarkTakeViews(b *testing.B) {
	s := newScheduler(Config{SeedPriorityBelow: 50, MaxQueued: 10, Renderers: 1}, nil, rendererConfig{})
	s.newCache("c")
	batch := viewBatch{cache: "c", tiles: make([]tileCoord, 256)}
	n := int32(0)
	b.ReportAllocs()
	for b.Loop() {
		for i := range batch.tiles {
			n++
			batch.tiles[i] = tileCoord{n % 100000, n / 100000, 14}
		}
		s.takeViews(batch)
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*256), "ns/tile")
}

// BenchmarkViewCandidates: one choice of prefetch candidates from a full table.
func BenchmarkViewCandidates(b *testing.B) {
	pf := newPrefetcher(&PrefetchConfig{Caches: []string{"c"}, Levels: 1, Priority: new(int), MaxQueued: 10, Area: "views"})
	c := &cacheInfo{id: "c", metaX: 4, metaY: 4}
	vt := newViewTable()
	for i := range viewsPerCache {
		vt.add(tileCoord{int32(8000 + i%64), int32(5000 + i/64), 14}, 0)
	}
	b.ReportAllocs()
	for b.Loop() {
		pf.viewCandidates(c, vt, 0, nil)
	}
}
