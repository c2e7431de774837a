// SPDX-License-Identifier: Apache-2.0

package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strconv"
	"sync"
	"time"
)

// maxInternedCaches bounds the cache table when the renderers do not list their caches,
// so that a client inventing identifiers cannot grow it without end.
const maxInternedCaches = 10000

// schedMsg is what clients send to the scheduler goroutine. One buffered channel carries
// them all, so one sender's messages arrive in the order it sent them (a cancel never
// overtakes its submit). Messages whose order matters are typed (op); a query is a function
// run on the scheduler goroutine (ask).
type schedMsg struct {
	op     schedOp
	p      *pendingRequest  // opSubmit, opCancel, opDue
	reload *reloadMsg       // opReload
	fn     func(*scheduler) // opQuery
}

type schedOp uint8

const (
	opSubmit schedOp = iota + 1
	opCancel         // p's client is gone
	opDue            // p's wait_ms ran out (live.go)
	opReload         // a new configuration (SIGHUP)
	opQuery          // run fn on the scheduler goroutine
)

type reloadMsg struct {
	cfg  Config
	done chan error // room for one: applyConfig's result
}

// ask runs f on the scheduler goroutine and returns its result; ok is false when the
// scheduler has stopped (f then may not have run). f must not block: it runs between two
// messages of the scheduler's loop and may read and change its state.
func ask[T any](s *scheduler, f func(*scheduler) T) (v T, ok bool) {
	ch := make(chan T, 1)
	select {
	case s.in <- schedMsg{op: opQuery, fn: func(s *scheduler) { ch <- f(s) }}:
	case <-s.done:
		return v, false
	}
	select {
	case v = <-ch:
		return v, true
	case <-s.done:
		// Messages sent before the scheduler stopped are still answered (drainMessages).
		select {
		case v = <-ch:
			return v, true
		default:
			return v, false
		}
	}
}

// gridAnswer is what an expiry run needs to know about a cache, or why it cannot have it.
type gridAnswer struct {
	grid expireGrid
	err  error
}

// scheduler owns the queue, the job table, the renderers' states and the counters.
// Only its run goroutine touches them; everyone else talks to it through in and events.
type scheduler struct {
	log       *slog.Logger
	epoch     time.Time
	cfg       Config
	rcfg      rendererConfig
	qs        *queueState
	caches    map[string]*cacheInfo
	cacheList []*cacheInfo // by cacheInfo.idx
	// cachesListed is set once any renderer listed its caches; then unknown identifiers are refused.
	cachesListed bool

	in     chan schedMsg
	events chan rendererEvent
	done   chan struct{} // closed when run returns

	slots    map[*renderer]*rendererSlot
	idle     []*renderer
	busy     int
	nextNum  int
	hardStop chan struct{} // closed when running renders must be killed (stop deadline)
	stopOnce sync.Once
	wg       sync.WaitGroup // renderer goroutines

	startup        chan error // one value: nil when every initial renderer is ready, or the first start failure
	startupPending int
	stopping       bool
	lastStartErr   string // why the last renderer start failed

	// journal, when on, holds background jobs until they are done (docs/design.md §12). Set before
	// run starts; nil = off.
	journal *journal

	stats     counters
	m         metricsState
	renderRec durationRing
	pf        *prefetcher // prefetch.go
	rl        *limiter    // ratelimit.go
	connStats func() connCounters
	onTick    func(summary string) // STATUS= for systemd; may be nil
	onWatch   func()               // WATCHDOG=1; may be nil
	watchdog  time.Duration

	// Views (views.go): batches from connections, never waited for; the tables.
	viewsIn chan viewBatch
	views   *viewState
}

func newScheduler(cfg Config, log *slog.Logger, rcfg rendererConfig) *scheduler {
	return &scheduler{
		log:       log,
		epoch:     time.Now(),
		cfg:       cfg,
		rcfg:      rcfg,
		qs:        newQueueState(capacityRule{maxSeed: cfg.maxSeed, seedBelow: cfg.SeedPriorityBelow}, cfg.MaxQueued),
		caches:    make(map[string]*cacheInfo),
		in:        make(chan schedMsg, 1024),
		events:    make(chan rendererEvent, 64),
		done:      make(chan struct{}),
		slots:     make(map[*renderer]*rendererSlot),
		hardStop:  make(chan struct{}),
		startup:   make(chan error, 1),
		connStats: func() connCounters { return connCounters{} },
		m:         metricsState{restarts: make(map[string]uint64)},
		pf:        newPrefetcher(cfg.Prefetch),
		rl:        newLimiter(cfg.BackgroundRate),
		viewsIn:   make(chan viewBatch, viewsBacklog),
		views:     newViewState(),
	}
}

func (s *scheduler) now() int64 { return int64(time.Since(s.epoch)) }

// run is the scheduler goroutine. It starts the renderers, serves messages until ctx is
// done, then stops: queued waiters get shutting_down, running jobs finish (until hardStop),
// renderers exit. It returns when every renderer goroutine has exited.
func (s *scheduler) run(ctx context.Context) {
	defer close(s.done)
	defer s.wg.Wait()
	for i := 0; i < s.cfg.Renderers; i++ {
		s.startRenderer(true)
	}
	s.startupPending = s.cfg.Renderers
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	var watch <-chan time.Time
	if s.watchdog > 0 && s.onWatch != nil {
		t := time.NewTicker(s.watchdog)
		defer t.Stop()
		watch = t.C
		s.onWatch()
	}
	lastSummary := ""
	stop := ctx.Done()
	for {
		select {
		case <-stop:
			stop = nil
			s.beginStop()
		case m := <-s.in:
			s.handleMsg(m)
		case ev := <-s.events:
			s.handleEvent(ev)
		case <-watch:
			s.onWatch()
		case <-s.pf.quietC():
			s.flushBursts()
		case <-s.rateTimerC():
			s.rateWoke()
		case b := <-s.viewsIn:
			s.takeViews(b)
		case now := <-tick.C:
			s.sample(now)
			s.rateTick()
			if s.onTick != nil {
				if sum := s.summary(); sum != lastSummary {
					lastSummary = sum
					s.onTick(sum)
				}
			}
		}
		if s.stopping && len(s.slots) == 0 {
			s.drainMessages()
			return
		}
		s.dispatch()
	}
}

// drainMessages answers what clients sent after the last renderer exited.
func (s *scheduler) drainMessages() {
	for {
		select {
		case m := <-s.in:
			s.handleMsg(m)
		default:
			return
		}
	}
}

// killRunning makes renderers kill running renders now (the stop deadline passed).
func (s *scheduler) killRunning() { s.stopOnce.Do(func() { close(s.hardStop) }) }

// submit hands a request to the scheduler. If the scheduler has stopped, the request is
// answered shutting_down at once. It never blocks past the scheduler's exit.
func (s *scheduler) submit(p *pendingRequest) {
	select {
	case s.in <- schedMsg{op: opSubmit, p: p}:
	case <-s.done:
		p.sink.deliver(p, Reply{ID: p.req.ID, Status: statusShuttingDown, ErrorMessage: "daemon is shutting down"})
	}
}

// cancel says that p's client is gone. Queued jobs nobody else waits for are dropped.
func (s *scheduler) cancel(p *pendingRequest) {
	select {
	case s.in <- schedMsg{op: opCancel, p: p}:
	case <-s.done:
	}
}

// status returns the status document, or false when the scheduler has stopped.
func (s *scheduler) status() (statusDoc, bool) { return ask(s, (*scheduler).statusDoc) }

// reload applies a new configuration; see applyConfig.
func (s *scheduler) reload(cfg Config) error {
	m := &reloadMsg{cfg: cfg, done: make(chan error, 1)}
	select {
	case s.in <- schedMsg{op: opReload, reload: m}:
	case <-s.done:
		return errors.New("scheduler stopped")
	}
	select {
	case err := <-m.done:
		return err
	case <-s.done:
		select {
		case err := <-m.done: // handled by drainMessages
			return err
		default:
			return errors.New("scheduler stopped")
		}
	}
}

func (s *scheduler) handleMsg(m schedMsg) {
	switch m.op {
	case opSubmit:
		s.handleSubmit(m.p)
	case opCancel:
		s.handleCancel(m.p)
	case opDue:
		s.handleDue(m.p)
	case opReload:
		m.reload.done <- s.applyConfig(m.reload.cfg)
	case opQuery:
		m.fn(s)
	}
}

func (s *scheduler) answer(p *pendingRequest, r Reply) {
	if p.answered {
		return
	}
	p.answered = true
	s.countRequest(p, r.Status)
	if p.waitTimer != nil {
		p.waitTimer.Stop()
	}
	r.ID = p.req.ID
	p.sink.deliver(p, r)
}

func (s *scheduler) handleSubmit(p *pendingRequest) {
	p.received = s.now()
	if s.stopping {
		s.answer(p, Reply{Status: statusShuttingDown, ErrorMessage: "daemon is shutting down"})
		return
	}
	if s.allFailing() {
		s.stats.failed++
		s.answer(p, errorReply(nil, s.noRendererMsg()))
		return
	}
	c, err := s.cacheFor(p.req.CacheIdentifier)
	if err != nil {
		s.stats.invalid++
		s.answer(p, errorReply(nil, err.Error()))
		return
	}
	keys := make([]jobKey, len(p.req.Tiles))
	for i, t := range p.req.Tiles {
		keys[i] = keyFor(c, t)
		if p.req.Delete {
			keys[i].cache |= deleteKeyBit
		}
	}
	var waiter *pendingRequest
	if !p.req.Background {
		waiter = p
	}
	merged, err := s.qs.add(keys, p.req.Priority, p.req.Background, waiter, p.received)
	if err != nil && !errors.Is(err, errQueueFull) {
		s.stats.invalid++
		s.answer(p, errorReply(nil, err.Error()))
		return
	}
	if err != nil && s.makeRoomForRequest(len(keys)) { // prefetch jobs go first
		merged, err = s.qs.add(keys, p.req.Priority, p.req.Background, waiter, p.received)
	}
	if err != nil && p.req.replayed { // accepted before the restart: never refused (replay.go)
		merged, err = s.qs.addReplayed(keys, p.req.Priority, p.received)
	}
	if err != nil {
		s.stats.busyRejected++
		s.answer(p, Reply{Status: statusBusy, ErrorMessage: fmt.Sprintf("queue full (%d jobs queued)", s.qs.queued())})
		return
	}
	s.noteRequest(keys, !p.req.Background && !s.qs.rule.isSeed(p.req.Priority))
	s.stats.requested++
	c.requested++
	s.stats.merged += uint64(merged)
	p.merged = merged > 0
	if p.req.Background {
		s.stats.background++
		if s.journal != nil && !p.req.replayed {
			s.journalBackground(p, c, keys)
			return
		}
		s.answer(p, Reply{Status: statusQueued, Merged: p.merged})
	} else if p.req.HasWait {
		s.armWait(p)
	}
}

// journalBackground answers a background request queued once its jobs are in the journal.
// The jobs are queued already (they may even render first: their done records then follow
// theirs); the scheduler does not wait for the disk: the journal's writer goroutine delivers
// the reply after its batch is synced. If the journal cannot write, the client gets an
// error saying so, although the jobs stay queued (they are merely not crash-safe).
func (s *scheduler) journalBackground(p *pendingRequest, c *cacheInfo, keys []jobKey) {
	p.answered = true
	s.countRequest(p, statusQueued) // counted here, on the scheduler goroutine: the job is queued
	tiles := make([]tileCoord, len(keys))
	for i, k := range keys {
		tiles[i] = tileCoord{X: k.x, Y: k.y, Z: k.z}
	}
	reply := Reply{ID: p.req.ID, Status: statusQueued, Merged: p.merged}
	s.journal.addJobsThen(c.id, tiles, p.req.Priority, func(err error) {
		if err != nil {
			reply = errorReply(p.req.ID, "the job is queued but not journaled, so it would not survive a crash: "+err.Error())
		}
		p.sink.deliver(p, reply)
	})
}

// expireGrid returns the metatile size and XYZ origin of a cache, or an error naming the
// cache when it does not take expiry lists (docs/design.md §11).
func (s *scheduler) expireGrid(cache string) (expireGrid, error) {
	a, ok := ask(s, func(s *scheduler) gridAnswer { return s.expireGridOf(cache) })
	if !ok {
		return expireGrid{}, errors.New("daemon is shutting down")
	}
	return a.grid, a.err
}

func (s *scheduler) expireGridOf(id string) gridAnswer {
	c, ok := s.caches[id]
	if !ok || !c.known {
		if !s.cachesListed {
			return gridAnswer{err: fmt.Errorf("cache %q does not take expiry lists: the renderers do not list their caches, so its grid is unknown", truncate(id, 64))}
		}
		return gridAnswer{err: fmt.Errorf("unknown cache %q (the renderers know %d caches)", truncate(id, 64), s.knownCaches())}
	}
	if c.xyz == originNone {
		return gridAnswer{err: fmt.Errorf("cache %q does not take expiry lists: its grid is not the XYZ web-mercator pyramid (EPSG:3857, 256 px, resolution halving; the renderer's ready line has no \"xyz\" for it)", truncate(id, 64))}
	}
	return gridAnswer{grid: expireGrid{origin: c.xyz, metaX: c.metaX, metaY: c.metaY}}
}

// cacheFor returns the interned cache of an identifier, refusing unknown ones once the
// renderers have listed theirs.
func (s *scheduler) cacheFor(id string) (*cacheInfo, error) {
	c, ok := s.caches[id]
	if ok && (c.known || !s.cachesListed) {
		return c, nil
	}
	if s.cachesListed {
		return nil, fmt.Errorf("unknown cache %q (the renderers know %d caches)", truncate(id, 64), s.knownCaches())
	}
	if len(s.caches) >= maxInternedCaches {
		return nil, fmt.Errorf("too many distinct cache identifiers (%d)", maxInternedCaches)
	}
	return s.newCache(id), nil
}

// newCache interns a cache identifier.
func (s *scheduler) newCache(id string) *cacheInfo {
	c := &cacheInfo{id: id, idx: int32(len(s.cacheList))}
	s.caches[id] = c
	s.cacheList = append(s.cacheList, c)
	return c
}

func (s *scheduler) knownCaches() int {
	n := 0
	for _, c := range s.caches {
		if c.known {
			n++
		}
	}
	return n
}

func (s *scheduler) handleCancel(p *pendingRequest) {
	if p.answered || s.keptRunning(p) {
		return
	}
	p.answered = true // the client is gone: nothing more is sent to it
	if p.waitTimer != nil {
		p.waitTimer.Stop()
	}
	s.stats.cancelled++
	s.countRequest(p, "cancelled")
	for _, j := range p.jobs {
		if j.state == jobDone {
			continue
		}
		if s.qs.removeWaiter(j, p) {
			s.stats.dropped++
		}
	}
	if p.keepRunning {
		p.sink.deliver(p, Reply{Status: statusWithdrawn})
	}
}

// dispatch starts every job the capacity rule and the rate limiter allow on idle renderers.
func (s *scheduler) dispatch() {
	defer s.armRateTimer()
	for len(s.idle) > 0 {
		j := s.nextJob()
		if j == nil {
			break
		}
		s.prefetchStarted(j)
		seedClass := s.qs.rule.isSeed(int(j.priority))
		r := s.takeIdle(seedClass)
		slot := s.slots[r]
		slot.state = slotBusy
		slot.job = j
		slot.seed = seedClass
		s.busy++
		slot.started = s.now()
		s.m.queueWait[classOf(slot.seed)].observe(float64(slot.started-j.enqueued) / 1e9)
		rj := renderJob{
			job:     j,
			seq:     j.seq,
			cache:   s.cacheList[j.key.cacheIdx()].id,
			delete:  j.key.isDelete(),
			tile:    tileCoord{j.key.x, j.key.y, j.key.z},
			timeout: time.Duration(s.cfg.RenderTimeout),
			recycle: s.cfg.RecycleAfter,
			seed:    j.flags&seedJob != 0,
			refresh: j.flags&forceJob != 0,
			prio:    s.jobPriority(seedClass),
			// Only an expiry run's own job may skip a never-cached metatile: a live request
			// or seed that merged into it wants the render.
			onlyCached: j.flags&anyCacheJob == 0,
		}
		if !rj.refresh {
			rj.refreshBefore = j.refreshBefore()
		}
		r.jobs <- rj
	}
	if s.prefetchFromViews() { // views.go: only when nothing above was left to start
		s.dispatch()
	}
}

// beginStop answers every queued waiter shutting_down, drops the queue and retires
// every renderer; running jobs finish (until hardStop).
func (s *scheduler) beginStop() {
	s.stopping = true
	for _, j := range s.qs.drain() {
		for _, w := range j.waiting() {
			s.answer(w, Reply{Status: statusShuttingDown, ErrorMessage: "daemon is shutting down; the job was not started"})
		}
		s.stats.shutdownDropped++
	}
	for r := range s.slots {
		s.retire(r)
	}
}

// applyConfig takes a reloaded configuration: the capacity rule, limits and timeouts at once;
// renderers are replaced (after their current job) only when their command or environment
// changed, and added or retired to match the new count.
func (s *scheduler) applyConfig(cfg Config) error {
	if s.stopping {
		return errors.New("shutting down")
	}
	old := s.rcfg
	s.cfg = cfg
	s.qs.rule = capacityRule{maxSeed: cfg.maxSeed, seedBelow: cfg.SeedPriorityBelow}
	s.qs.max = cfg.MaxQueued
	s.pf.reconfigure(cfg.Prefetch)
	s.rl.reconfigure(cfg.BackgroundRate, s.cacheList)
	newR := rendererConfigFrom(cfg, old.workerScript)
	s.rcfg = newR
	if !slices.Equal(old.argv, newR.argv) || !slices.Equal(old.env, newR.env) {
		s.log.Info("renderer command changed: replacing renderers after their current job")
		for r, slot := range s.slots {
			if !slot.retiring {
				s.retire(r)
			}
		}
	}
	active := 0
	for _, slot := range s.slots {
		if !slot.retiring {
			active++
		}
	}
	for ; active < cfg.Renderers; active++ {
		s.startRenderer(false)
	}
	// Retire the extras: idle ones first, then starting, then busy ones (after their job).
	for _, want := range []slotState{slotIdle, slotStarting, slotBusy} {
		for r, slot := range s.slots {
			if active <= cfg.Renderers {
				break
			}
			if !slot.retiring && slot.state == want {
				s.retire(r)
				active--
			}
		}
	}
	return nil
}

func (s *scheduler) summary() string {
	rc := s.countRenderers()
	sum := "renderers " + strconv.Itoa(s.busy) + "/" + strconv.Itoa(rc.total) + " busy (" + strconv.Itoa(rc.ready()) +
		" ready), " + strconv.Itoa(s.qs.queued()) + " queued, " + strconv.FormatUint(s.stats.rendered, 10) + " rendered, " +
		strconv.FormatUint(s.stats.failed, 10) + " failed"
	if rc.failing > 0 {
		sum += "; " + strconv.Itoa(rc.failing) + " renderers fail to start: " + truncate(s.lastStartErr, 200)
	}
	return sum
}
