// SPDX-License-Identifier: Apache-2.0

package main

import (
	"math"
	"slices"
	"sync/atomic"
	"time"
)

// Views (docs/design.md §18): the tiles MapProxy served, hits and renders, as the MapProxy-side
// module reports them with the native views command:
//
//	{"command":"views","cache_identifier":"osm_cache_EPSG3857","tiles":[[x,y,z],…]} → {"status":"ok"}
//
// The reply says only that the batch was taken: a connection hands it to the scheduler
// without waiting (viewsIn has room for viewsBacklog batches; beyond that a batch is dropped
// and counted), so views never slow a client down and never hold the scheduler up.
//
// The scheduler keeps, per cache, a recent-views table of at most viewsPerCache tiles, each
// with a count that decays with a half-life of viewHalfLife (a decayed count table: a tile
// seen often and lately weighs most). When the table is full, a new tile replaces the
// lightest of viewEvictSample entries drawn at random (sampled eviction, as Redis's
// approximate LFU does), so an insert costs O(1) and the table never grows. Memory: about
// 100 bytes per entry with its map slot, so at most ~400 KiB per cache that gets views.
//
// prefetch.area: views uses the tables (prefetchFromViews below); the status page's heat map
// reads them and the ring of recent live renders.

const (
	viewsPerCache = 4096 // tiles in a cache's recent-views table
	// viewHalfLife: a view's weight halves in this time. Short, so that the view a user
	// looks at now outweighs the one they left (on bench/trace, 5 s made 38 % of z+1 tiles
	// ready at budget 0.5 where 15 s made 30 %), unless many users looked there.
	viewHalfLife    = 5 * time.Second
	viewEvictSample = 8                // entries compared to pick the one to replace
	viewsBacklog    = 256              // batches a connection may hand over before they are dropped
	recentRenders   = 4096             // live renders remembered for the heat map
	heatWindow      = 15 * time.Minute // what the heat map shows
	// viewMinWeight: a parent tile whose decayed count fell below this (3.3 half-lives, 16 s,
	// after one view) no longer makes its children candidates.
	viewMinWeight = 0.1
	// viewsPickEvery: prefetchFromViews looks for candidates at most this often; a look
	// walks every table (about 1.5 ms for a full one on a loaded 2-CPU machine).
	viewsPickEvery = 50 * time.Millisecond
)

// viewBatch is one views command on its way to the scheduler.
type viewBatch struct {
	cache string
	tiles []tileCoord
}

// viewEntry is one tile of a recent-views table.
type viewEntry struct {
	t     tileCoord
	count float64 // decayed count at at
	at    int64   // last view, ns since the daemon started
	first int64   // first view while in the table (heat map: views in its window)
}

// weight is the entry's decayed count at now.
func (e *viewEntry) weight(now int64) float64 {
	return e.count * math.Exp2(-float64(now-e.at)/float64(viewHalfLife))
}

// viewTable is one cache's recent views; the scheduler goroutine owns it.
type viewTable struct {
	idx map[tileCoord]int32
	e   []viewEntry
	rnd uint64 // xorshift state for sampled eviction
}

func newViewTable() *viewTable {
	return &viewTable{idx: make(map[tileCoord]int32), rnd: 0x9e3779b97f4a7c15}
}

// add counts one view of t at now.
func (vt *viewTable) add(t tileCoord, now int64) {
	if i, ok := vt.idx[t]; ok {
		e := &vt.e[i]
		e.count = e.weight(now) + 1
		e.at = now
		return
	}
	if len(vt.e) < viewsPerCache {
		vt.idx[t] = int32(len(vt.e))
		vt.e = append(vt.e, viewEntry{t: t, count: 1, at: now, first: now})
		return
	}
	victim := -1
	lightest := math.Inf(1)
	for range viewEvictSample {
		vt.rnd ^= vt.rnd << 13
		vt.rnd ^= vt.rnd >> 7
		vt.rnd ^= vt.rnd << 17
		i := int(vt.rnd % uint64(len(vt.e)))
		if w := vt.e[i].weight(now); w < lightest {
			victim, lightest = i, w
		}
	}
	delete(vt.idx, vt.e[victim].t)
	vt.idx[t] = int32(victim)
	vt.e[victim] = viewEntry{t: t, count: 1, at: now, first: now}
}

// liveRender is a live render remembered for the heat map.
type liveRender struct {
	key jobKey
	at  int64
}

// viewState is the scheduler's views state; the scheduler goroutine owns it, but for
// dropped, which connections count.
type viewState struct {
	tables  map[int32]*viewTable // by cache idx
	renders []liveRender         // ring of recent live renders
	next    int                  // renders' next slot once full
	taken   uint64               // views counted
	unknown uint64               // views of caches the daemon does not know
	dropped atomic.Uint64        // batches dropped because the scheduler was behind
	// dirty: views arrived or a prefetch ended since prefetchFromViews last found nothing.
	dirty bool
	// nextPick: prefetchFromViews does not look again before this (ns since the start).
	nextPick int64
	// budget: live renders and prefetch jobs over the last minute, by second.
	live, spent [60]secCount
}

// secCount counts events in one second (sec: unix second it counts; older ones are stale).
type secCount struct {
	sec int64
	n   int
}

func newViewState() *viewState { return &viewState{tables: map[int32]*viewTable{}} }

// bump counts one event at second sec in a minute's ring.
func bump(r *[60]secCount, sec int64) {
	b := &r[sec%60]
	if b.sec != sec {
		*b = secCount{sec: sec}
	}
	b.n++
}

// lastMinute sums a ring's counts of the 60 seconds up to sec.
func lastMinute(r *[60]secCount, sec int64) int {
	n := 0
	for _, b := range r {
		if sec-b.sec < 60 && b.sec <= sec {
			n += b.n
		}
	}
	return n
}

// viewsSend hands a batch to the scheduler without waiting. false: the scheduler is behind
// (viewsBacklog batches waiting) or stopped; the batch is dropped and counted.
func (s *scheduler) viewsSend(b viewBatch) bool {
	select {
	case s.viewsIn <- b:
		return true
	default:
		s.views.dropped.Add(1)
		return false
	}
}

// viewsReply answers a views command: the batch is handed over (or dropped when the daemon
// is behind; views are a hint), so the reply is always ok.
func (s *server) viewsReply(req Request) Reply {
	s.sched.viewsSend(viewBatch{cache: req.CacheIdentifier, tiles: req.Tiles})
	return Reply{ID: req.ID, Status: statusOK}
}

// takeViews counts a batch into its cache's table.
func (s *scheduler) takeViews(b viewBatch) {
	vs := s.views
	c, ok := s.caches[b.cache]
	if !ok || !(c.known || !s.cachesListed) {
		vs.unknown += uint64(len(b.tiles))
		return
	}
	vt := vs.tables[c.idx]
	if vt == nil {
		vt = newViewTable()
		vs.tables[c.idx] = vt
	}
	now := s.now()
	for _, t := range b.tiles {
		vt.add(t, now)
	}
	vs.taken += uint64(len(b.tiles))
	vs.dirty = true
}

// noteRender runs for every finished job: live renders count for the budget and the heat
// map; a finished prefetch job may free room for another.
func (s *scheduler) noteRender(j *job, ok bool) {
	vs := s.views
	if j.flags&prefetchJob != 0 {
		vs.dirty = true
		return
	}
	if !ok || j.key.isDelete() || s.qs.rule.isSeed(int(j.priority)) {
		return
	}
	now := s.now()
	bump(&vs.live, s.unixSec())
	r := liveRender{key: j.key, at: now}
	if len(vs.renders) < recentRenders {
		vs.renders = append(vs.renders, r)
	} else {
		vs.renders[vs.next] = r
		vs.next = (vs.next + 1) % recentRenders
	}
}

// unixSec is the second the budget counts in.
func (s *scheduler) unixSec() int64 { return s.epoch.Unix() + s.now()/int64(time.Second) }

// budgetAllows reports whether one more prefetch job fits prefetch.budget: prefetch jobs
// queued over the last minute at most budget × live renders over it. No budget: always.
func (s *scheduler) budgetAllows() bool {
	b := s.pf.cfg.Budget
	if b <= 0 {
		return true
	}
	sec := s.unixSec()
	return float64(lastMinute(&s.views.spent, sec)+1) <= b*float64(lastMinute(&s.views.live, sec))
}

// spend counts one prefetch job against the budget.
func (s *scheduler) spend() { bump(&s.views.spent, s.unixSec()) }

// prefetchFromViews (prefetch.area: views) queues next-zoom metatiles that users are likely
// to look at next, but only while renderers would otherwise idle (nothing queued, a renderer
// free that the prefetch priority may use) and within the budget: as many as there are such
// renderers, best first. A candidate is a metatile at z+1 holding children of viewed tiles at
// z, weighted by their decayed view counts (a parent's weight split evenly over its children),
// that holds no viewed tile itself (then it exists), is not queued or running, and was not
// prefetched recently. It reports whether it queued any.
func (s *scheduler) prefetchFromViews() (queued bool) {
	pf, vs := s.pf, s.views
	if pf.cfg == nil || pf.cfg.Area != "views" || !vs.dirty || len(s.qs.queue) > 0 {
		return false
	}
	free := len(s.idle)
	prio := *pf.cfg.Priority
	if free == 0 || !s.qs.rule.mayStart(prio, s.busy, free) || !s.budgetAllows() {
		return false
	}
	now := s.now()
	if now < vs.nextPick {
		return false
	}
	vs.nextPick = now + int64(viewsPickEvery)
	var best []viewCandidate
	for idx, vt := range vs.tables {
		c := s.cacheList[idx]
		if !pf.on(c) {
			continue
		}
		best = append(best, pf.viewCandidates(c, vt, now, s.qs.jobs)...)
	}
	if len(best) == 0 {
		vs.dirty = false // nothing to do until views arrive or a prefetch ends
		return false
	}
	sortCandidates(best)
	for _, cand := range best {
		if free == 0 || !s.qs.rule.mayStart(prio, s.busy, free) || !s.budgetAllows() {
			break
		}
		before := s.stats.prefetched
		s.queuePrefetch(cand.k)
		if s.stats.prefetched != before {
			s.spend()
			free--
			queued = true
		}
	}
	return queued
}

// viewCandidate is a metatile key and how likely it is to be looked at next.
type viewCandidate struct {
	k jobKey
	w float64
}

// sortCandidates puts the heaviest first (ties in key order, so that choices repeat).
func sortCandidates(c []viewCandidate) {
	slices.SortFunc(c, func(a, b viewCandidate) int {
		switch {
		case a.w > b.w:
			return -1
		case a.w < b.w:
			return 1
		}
		return cmpKey(a.k, b.k)
	})
}

func cmpKey(a, b jobKey) int {
	for _, d := range [...]int32{a.cache - b.cache, a.z - b.z, a.y - b.y, a.x - b.x} {
		if d != 0 {
			return int(d)
		}
	}
	return 0
}

// viewCandidates returns the candidate metatiles of cache c from its views table vt (see
// prefetchFromViews), unsorted. queued holds the keys that are queued or running.
func (pf *prefetcher) viewCandidates(c *cacheInfo, vt *viewTable, now int64, queued map[jobKey]*job) []viewCandidate {
	g := pf.grids[c.id]
	maxZ := int64(maxZoom)
	if pf.cfg.MaxZoom != nil {
		maxZ = int64(*pf.cfg.MaxZoom)
	}
	if g != nil && len(g.GridSizes) > 0 {
		maxZ = min(maxZ, int64(len(g.GridSizes))-1)
	}
	seen := make(map[jobKey]struct{}, len(vt.e))
	for i := range vt.e {
		seen[keyFor(c, vt.e[i].t)] = struct{}{}
	}
	score := map[jobKey]float64{}
	for i := range vt.e {
		e := &vt.e[i]
		w := e.weight(now)
		z := int64(e.t.Z)
		if w < viewMinWeight || z+1 > maxZ {
			continue
		}
		cz := z + 1
		r := g.ratio(z, cz)
		x0, y0 := int64(math.Floor(float64(e.t.X)*r+1e-9)), int64(math.Floor(float64(e.t.Y)*r+1e-9))
		x1, y1 := int64(math.Ceil(float64(e.t.X+1)*r-1e-9)), int64(math.Ceil(float64(e.t.Y+1)*r-1e-9))
		if gw, gh, ok := g.size(cz); ok {
			x1, y1 = min(x1, gw), min(y1, gh)
		}
		if x1 <= x0 || y1 <= y0 || x1 > maxCoordinate+1 || y1 > maxCoordinate+1 {
			continue
		}
		share := w / float64((x1-x0)*(y1-y0))
		for y := y0; y < y1; y++ {
			for x := x0; x < x1; x++ {
				score[keyFor(c, tileCoord{int32(x), int32(y), int32(cz)})] += share
			}
		}
	}
	out := make([]viewCandidate, 0, len(score))
	for k, w := range score {
		if _, ok := seen[k]; ok {
			continue
		}
		if _, ok := pf.recent[k]; ok {
			continue
		}
		if _, ok := queued[k]; ok {
			continue
		}
		out = append(out, viewCandidate{k, w})
	}
	return out
}
