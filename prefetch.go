// SPDX-License-Identifier: Apache-2.0

package main

import (
	"encoding/json"
	"math"
	"slices"
	"time"
)

// Next-zoom prefetch (renderd.yaml prefetch:, docs/design.md §13).
//
// After a live render of a metatile at zoom z (a job in the live class that rendered ok), the
// metatiles covering its area at z+1 … z+levels (at most max_zoom, and the grid's last level
// when the renderer told it) are queued as prefetch jobs: priority prefetch.priority (5,
// below seeding, so the seed capacity rule and seed_nice apply), nobody waiting, rendered
// with "refresh": false (the renderer renders a metatile only if a tile of it is missing or
// stale). A prefetch job that any request joins becomes an ordinary job of that request (it
// is then a hit when the request is live). Prefetch jobs never displace other work: a
// prefetch job is not queued while the queue is full, and the oldest queued prefetch job is
// dropped when more than prefetch.max_queued of them are queued or when a request would
// otherwise be refused busy.
//
// Geometry: MapProxy's internal coordinates count tiles from the grid's origin corner (nw:
// from the top, sw: from the bottom), and every level of a grid shares that corner, so a
// tile range maps to the next level the same way for both origins: scaled by the ratio of
// the resolutions (2 unless the renderer's ready line gives them) and clipped to the grid's
// size at that level (when the ready line gives the sizes). The origin is in the ready
// line for the record and for clients; the computation does not need it.

// recentPrefetched bounds the set of prefetched metatiles remembered after their render,
// for counting a later request as a hit.
const recentPrefetched = 16384

// gridInfo is what a renderer's ready line may say about a cache's grid besides its
// metatile size: {"cache": "osm_cache", "grid": "GLOBAL_WEBMERCATOR", "origin": "nw",
// "grid_sizes": [[1, 1], [2, 2], …], "resolutions": [156543.03, …]}, per level.
type gridInfo struct {
	Cache       string     `json:"cache"`
	Grid        string     `json:"grid"`
	Origin      string     `json:"origin"`
	GridSizes   [][2]int64 `json:"grid_sizes"`
	Resolutions []float64  `json:"resolutions"`
}

// parseGridInfo reads the grid fields of a ready line's caches. A cache whose fields do not
// parse gets none (prefetch then assumes resolutions halving per level and no clipping).
func parseGridInfo(line []byte) map[string]*gridInfo {
	var ready struct {
		Caches map[string]json.RawMessage `json:"caches"`
	}
	if json.Unmarshal(line, &ready) != nil || len(ready.Caches) == 0 {
		return nil
	}
	out := make(map[string]*gridInfo, len(ready.Caches))
	for id, raw := range ready.Caches {
		g := &gridInfo{}
		if json.Unmarshal(raw, g) != nil {
			continue
		}
		out[id] = g
	}
	return out
}

// prefetcher is the scheduler's prefetch state; the scheduler goroutine owns it.
type prefetcher struct {
	cfg     *PrefetchConfig // nil: prefetch off
	grids   map[string]*gridInfo
	enabled map[int32]bool // cache idx → listed in prefetch.caches (memo, reset on reload)
	// fifo holds prefetch jobs in the order they were queued; entries that are no longer
	// droppable (started, joined, dropped) are skipped when they reach the head.
	fifo   []*job
	queued int // jobs in the queue with the prefetchJob flag
	recent map[jobKey]struct{}
	ring   []jobKey // recent's keys, oldest first
	// Centre mode: the open bursts by cache idx, and the timer that ends the quiet period.
	bursts map[int32]*burst
	quiet  *time.Timer
}

func newPrefetcher(cfg *PrefetchConfig) *prefetcher {
	return &prefetcher{cfg: cfg, grids: map[string]*gridInfo{}, enabled: map[int32]bool{}, recent: map[jobKey]struct{}{}}
}

// reconfigure takes a reloaded prefetch configuration. Queued prefetch jobs stay.
func (pf *prefetcher) reconfigure(cfg *PrefetchConfig) {
	pf.cfg = cfg
	clear(pf.enabled)
}

// learn takes a renderer's grid information.
func (pf *prefetcher) learn(grids map[string]*gridInfo) {
	for id, g := range grids {
		pf.grids[id] = g
	}
	clear(pf.enabled)
}

func (pf *prefetcher) on(c *cacheInfo) bool {
	if pf.cfg == nil {
		return false
	}
	on, ok := pf.enabled[c.idx]
	if !ok {
		g := pf.grids[c.id]
		on = slices.ContainsFunc(pf.cfg.Caches, func(name string) bool {
			return name == c.id || (g != nil && g.Cache != "" && name == g.Cache)
		})
		pf.enabled[c.idx] = on
	}
	return on
}

// droppable reports whether j is a queued prefetch job that nobody else asked for. (A request
// that joins a prefetch job clears prefetchJob; the other tests only make sure.)
func droppable(j *job) bool {
	return j.state == jobQueued && j.flags&prefetchJob != 0 && j.flags&keepJob == 0 && len(j.waiting()) == 0
}

// noteRequest runs after a request's keys were added: prefetch jobs it joined become its
// own jobs (a hit when the request is live), and a live request for a metatile prefetched
// recently is a hit too.
func (s *scheduler) noteRequest(keys []jobKey, live bool) {
	pf := s.pf
	for _, k := range keys {
		j := s.qs.jobs[k]
		if j != nil && j.flags&prefetchJob != 0 {
			if j.state == jobQueued {
				pf.queued--
			}
			j.flags &^= prefetchJob
			if live {
				s.stats.prefetchHits++
			}
			continue
		}
		if _, ok := pf.recent[k]; ok && live {
			delete(pf.recent, k) // one hit per prefetch
			s.stats.prefetchHits++
		}
	}
}

// prefetchStarted is called when a job leaves the queue for a renderer.
func (s *scheduler) prefetchStarted(j *job) {
	if j.flags&prefetchJob != 0 {
		s.pf.queued--
	}
}

// afterRender runs when a job finished: a prefetch job that rendered is remembered for
// hits; a live job that rendered queues its next-zoom metatiles.
func (s *scheduler) afterRender(j *job, ok bool) {
	pf := s.pf
	s.noteRender(j, ok) // views.go
	if !ok {
		return
	}
	if j.flags&prefetchJob != 0 {
		pf.remember(j.key)
		return
	}
	if j.key.isDelete() { // an expiry run's delete: nothing was rendered
		return
	}
	c := s.cacheList[j.key.cacheIdx()]
	if s.qs.rule.isSeed(int(j.priority)) || !pf.on(c) {
		return
	}
	if pf.cfg.Area == "views" { // prefetchFromViews chooses
		return
	}
	if pf.cfg.Area == "centre" {
		s.addToBurst(c, j.key)
		return
	}
	for _, k := range pf.children(c, j.key) {
		s.queuePrefetch(k)
	}
}

func (pf *prefetcher) remember(k jobKey) {
	if _, ok := pf.recent[k]; ok {
		return
	}
	if len(pf.ring) >= recentPrefetched {
		delete(pf.recent, pf.ring[0])
		pf.ring = pf.ring[1:]
	}
	pf.recent[k] = struct{}{}
	pf.ring = append(pf.ring, k)
}

// queuePrefetch queues one prefetch job unless its metatile is already queued or running,
// was prefetched recently, or there is no room.
func (s *scheduler) queuePrefetch(k jobKey) {
	pf, qs := s.pf, s.qs
	if _, ok := qs.jobs[k]; ok {
		return
	}
	if _, ok := pf.recent[k]; ok {
		return
	}
	if pf.queued >= pf.cfg.MaxQueued && !s.dropOldestPrefetch() {
		s.stats.prefetchDropped++
		return
	}
	j := qs.addUnasked(k, *pf.cfg.Priority, prefetchJob, s.now())
	if j == nil { // the queue is full (k is not in it: checked above)
		s.stats.prefetchDropped++
		return
	}
	pf.queued++
	pf.fifo = append(pf.fifo, j)
	s.stats.prefetched++
	// Entries that stopped being prefetch jobs pile up behind live ones; compact now and
	// then so that the list stays proportional to what is queued.
	if len(pf.fifo) > 2*pf.queued+1024 {
		pf.fifo = slices.DeleteFunc(pf.fifo, func(j *job) bool { return !droppable(j) })
	}
}

// dropOldestPrefetch drops the oldest queued prefetch job; false if there is none.
func (s *scheduler) dropOldestPrefetch() bool {
	pf := s.pf
	for len(pf.fifo) > 0 {
		j := pf.fifo[0]
		pf.fifo[0] = nil
		pf.fifo = pf.fifo[1:]
		if !droppable(j) || !s.qs.dropUnasked(j) {
			continue
		}
		pf.queued--
		s.stats.prefetchDropped++
		return true
	}
	return false
}

// makeRoomForRequest drops up to n queued prefetch jobs so that a request refused busy
// may be queued; it reports whether any was dropped.
func (s *scheduler) makeRoomForRequest(n int) bool {
	dropped := false
	for i := 0; i < n && s.dropOldestPrefetch(); i++ {
		dropped = true
	}
	return dropped
}

// children returns the metatile keys at z+1 … z+levels that cover the metatile k of cache c.
func (pf *prefetcher) children(c *cacheInfo, k jobKey) []jobKey {
	g := pf.grids[c.id]
	// The parent metatile's tile range [x0, x1) × [y0, y1), clipped to its grid level.
	z := int64(k.z)
	x0, y0 := int64(k.x), int64(k.y)
	x1, y1 := x0+int64(max(c.metaX, 1)), y0+int64(max(c.metaY, 1))
	if w, h, ok := g.size(z); ok {
		x1, y1 = min(x1, w), min(y1, h)
	}
	return pf.coverKeys(c, g, z, func(r float64) (int64, int64, int64, int64) {
		return int64(math.Floor(float64(x0)*r + 1e-9)), int64(math.Floor(float64(y0)*r + 1e-9)),
			int64(math.Ceil(float64(x1)*r - 1e-9)), int64(math.Ceil(float64(y1)*r - 1e-9))
	})
}

// coverKeys returns the metatile keys of cache c at z+1 … z+levels (up to max_zoom and the
// grid's last level) that cover, at each level, the tile range [x0, x1) × [y0, y1) that
// rect gives for the level's scale r against z, clipped to the grid.
func (pf *prefetcher) coverKeys(c *cacheInfo, g *gridInfo, z int64, rect func(r float64) (x0, y0, x1, y1 int64)) []jobKey {
	mx, my := int64(max(c.metaX, 1)), int64(max(c.metaY, 1))
	maxZ := int64(maxZoom)
	if pf.cfg.MaxZoom != nil {
		maxZ = int64(*pf.cfg.MaxZoom)
	}
	if g != nil && len(g.GridSizes) > 0 {
		maxZ = min(maxZ, int64(len(g.GridSizes))-1)
	}
	var out []jobKey
	for l := int64(1); l <= int64(pf.cfg.Levels) && z+l <= maxZ; l++ {
		cz := z + l
		x0, y0, x1, y1 := rect(g.ratio(z, cz))
		if w, h, ok := g.size(cz); ok {
			x1, y1 = min(x1, w), min(y1, h)
		}
		if x1 > maxCoordinate+1 || y1 > maxCoordinate+1 {
			break
		}
		for y := y0 / my * my; y < y1; y += my {
			for x := x0 / mx * mx; x < x1; x += mx {
				out = append(out, keyFor(c, tileCoord{int32(x), int32(y), int32(cz)}))
			}
		}
	}
	return out
}

// size is the grid's size in tiles at level z, when the renderer said.
func (g *gridInfo) size(z int64) (w, h int64, ok bool) {
	if g == nil || z < 0 || z >= int64(len(g.GridSizes)) {
		return 0, 0, false
	}
	return g.GridSizes[z][0], g.GridSizes[z][1], true
}

// ratio is how many tiles of level cz one tile of level z spans, per axis.
func (g *gridInfo) ratio(z, cz int64) float64 {
	if g != nil && cz < int64(len(g.Resolutions)) && g.Resolutions[cz] > 0 {
		return g.Resolutions[z] / g.Resolutions[cz]
	}
	return math.Ldexp(1, int(cz-z))
}

// resync recounts the queued prefetch jobs after the queue was emptied behind our back
// (every renderer failing to start fails the whole queue).
func (pf *prefetcher) resync() {
	pf.fifo = slices.DeleteFunc(pf.fifo, func(j *job) bool { return !droppable(j) })
	pf.queued = len(pf.fifo)
}

// Centre mode (prefetch.area: centre). A map view makes a burst of live renders of one cache
// at one zoom; when the user zooms in, it is most often towards the middle of the view. So
// the live-rendered metatiles of a cache are collected into a burst (their bounding box in
// tiles), and once no live render of that cache has finished for burstQuiet, the metatiles
// covering a box of the same size in tiles around the burst's centre at z+1 … z+levels are
// queued: the next view if the user zooms in on the middle, a quarter of the burst's area
// per level instead of all of it. A live render at another zoom ends a burst at once.

// burstQuiet is how long live renders of a cache must pause before its burst is prefetched.
const burstQuiet = 150 * time.Millisecond

// burst is the area of recent live renders of one cache at one zoom, in tiles.
type burst struct {
	c                      *cacheInfo
	z                      int32
	minX, minY, maxX, maxY int32 // tiles [minX, maxX) × [minY, maxY)
	last                   time.Time
}

// quietC is the channel that fires when the oldest burst may be flushed; nil without one.
func (pf *prefetcher) quietC() <-chan time.Time {
	if pf.quiet == nil {
		return nil
	}
	return pf.quiet.C
}

func (s *scheduler) addToBurst(c *cacheInfo, k jobKey) {
	pf := s.pf
	if pf.bursts == nil {
		pf.bursts = map[int32]*burst{}
	}
	b := pf.bursts[c.idx]
	if b != nil && b.z != k.z {
		s.flushBurst(b)
		b = nil
	}
	mx, my := max(c.metaX, 1), max(c.metaY, 1)
	if b == nil {
		b = &burst{c: c, z: k.z, minX: k.x, minY: k.y, maxX: k.x + mx, maxY: k.y + my}
		pf.bursts[c.idx] = b
	}
	b.minX, b.minY = min(b.minX, k.x), min(b.minY, k.y)
	b.maxX, b.maxY = max(b.maxX, k.x+mx), max(b.maxY, k.y+my)
	b.last = time.Now()
	pf.armQuiet()
}

// armQuiet sets the timer to the earliest moment a burst becomes quiet.
func (pf *prefetcher) armQuiet() {
	var first time.Time
	for _, b := range pf.bursts {
		if first.IsZero() || b.last.Before(first) {
			first = b.last
		}
	}
	if first.IsZero() {
		if pf.quiet != nil {
			pf.quiet.Stop()
			pf.quiet = nil
		}
		return
	}
	d := max(time.Until(first.Add(burstQuiet)), 0)
	if pf.quiet == nil {
		pf.quiet = time.NewTimer(d)
		return
	}
	pf.quiet.Stop()
	select { // drop a stale fire so that the next receive is this one
	case <-pf.quiet.C:
	default:
	}
	pf.quiet.Reset(d)
}

// flushBursts prefetches every burst that has been quiet for burstQuiet.
func (s *scheduler) flushBursts() {
	pf := s.pf
	now := time.Now()
	for _, b := range pf.bursts {
		if now.Sub(b.last) >= burstQuiet {
			s.flushBurst(b)
		}
	}
	pf.quiet = nil // it fired
	pf.armQuiet()
}

func (s *scheduler) flushBurst(b *burst) {
	delete(s.pf.bursts, b.c.idx)
	if s.pf.cfg == nil {
		return
	}
	for _, k := range s.pf.centreChildren(b) {
		s.queuePrefetch(k)
	}
}

// centreChildren returns the metatile keys covering, at each prefetched level, a box of the
// burst's size in tiles around the burst's centre.
func (pf *prefetcher) centreChildren(b *burst) []jobKey {
	c := b.c
	g := pf.grids[c.id]
	z := int64(b.z)
	x0, y0, x1, y1 := float64(b.minX), float64(b.minY), float64(b.maxX), float64(b.maxY)
	if w, h, ok := g.size(z); ok {
		x1, y1 = min(x1, float64(w)), min(y1, float64(h))
	}
	cx, cy := (x0+x1)/2, (y0+y1)/2
	hw, hh := (x1-x0)/2, (y1-y0)/2
	return pf.coverKeys(c, g, z, func(r float64) (int64, int64, int64, int64) {
		return max(int64(math.Floor(cx*r-hw+1e-9)), 0), max(int64(math.Floor(cy*r-hh+1e-9)), 0),
			int64(math.Ceil(cx*r + hw - 1e-9)), int64(math.Ceil(cy*r + hh - 1e-9))
	})
}
