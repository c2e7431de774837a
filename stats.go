// SPDX-License-Identifier: Apache-2.0

package main

import (
	"runtime/debug"
	"slices"
	"sort"
	"strconv"
	"time"
)

// version is set at build time with -ldflags "-X main.version=…" (packaging/build-deb.sh
// sets `git describe --tags --always --dirty`). A plain `go build` in a git checkout gets
// "dev+<commit>" (and "-dirty") from the build information instead.
// (-X works only on a variable initialised to a constant: the fallback is in init.)
var version = "dev"

func init() {
	if version == "dev" {
		version = devVersion(debug.ReadBuildInfo())
	}
}

// devVersion is "dev", with the VCS revision the go command recorded when there is one.
func devVersion(info *debug.BuildInfo, ok bool) string {
	if !ok {
		return "dev"
	}
	rev, dirty := "", false
	for _, s := range info.Settings {
		switch s.Key {
		case "vcs.revision":
			rev = s.Value
		case "vcs.modified":
			dirty = s.Value == "true"
		}
	}
	if rev == "" {
		return "dev"
	}
	v := "dev+" + rev[:min(len(rev), 12)]
	if dirty {
		v += "-dirty"
	}
	return v
}

// counters are the scheduler's running totals (owned by the scheduler goroutine).
type counters struct {
	requested        uint64 // tile requests accepted (background included)
	background       uint64
	merged           uint64 // tiles of requests that joined an existing job
	rendered         uint64
	failed           uint64
	timedOut         uint64
	renderErrors     uint64 // failed renders other than timeouts
	renderSkipped    uint64 // ok renders (counted in rendered) that found every tile fresh
	noRendererFailed uint64 // queued jobs failed because no renderer could start
	dropped          uint64 // queued jobs dropped because every waiter left
	cancelled        uint64 // requests whose client left before the answer
	busyRejected     uint64
	invalid          uint64 // tile requests refused by the scheduler (unknown cache, …)
	shutdownDropped  uint64 // queued jobs answered shutting_down
	rendererFailures uint64 // renderer processes that failed to start
	pending          uint64 // requests answered pending at wait_ms (live.go)
	prefetched       uint64 // prefetch jobs queued (prefetch.go)
	prefetchHits     uint64 // live requests for a prefetch job, queued or recently rendered
	prefetchDropped  uint64 // prefetch jobs dropped for room
}

// conns are the listeners' counters, with the requests the scheduler refused (unknown
// cache, …) counted among the invalid ones: one count of invalid requests for
// counters.invalid, conns.invalid_requests and invalid_requests_total.
func (s *scheduler) conns() connCounters {
	c := s.connStats()
	c.Invalid += s.stats.invalid
	return c
}

// invalidTotal is every request refused as invalid, by the listeners or the scheduler.
func (s *scheduler) invalidTotal() uint64 { return s.conns().Invalid }

// connCounters come from the listeners (atomics there, copied here).
type connCounters struct {
	Open     int64  `json:"open"`
	Accepted uint64 `json:"accepted"`
	Refused  uint64 `json:"refused"`
	Invalid  uint64 `json:"invalid_requests"`
}

// durationRing keeps the last render durations for percentiles.
type durationRing struct {
	buf  [4096]int64
	n    int
	next int
}

func (d *durationRing) add(ns int64) {
	d.buf[d.next] = ns
	d.next = (d.next + 1) % len(d.buf)
	if d.n < len(d.buf) {
		d.n++
	}
}

// percentiles returns p50, p90, p99 and max in milliseconds over the kept durations.
func (d *durationRing) percentiles() map[string]float64 {
	if d.n == 0 {
		return map[string]float64{}
	}
	v := slices.Clone(d.buf[:d.n])
	slices.Sort(v)
	at := func(p float64) float64 { return durationMS(v[int(p*float64(len(v)-1))]) }
	return map[string]float64{"p50": at(0.50), "p90": at(0.90), "p99": at(0.99), "max": durationMS(v[len(v)-1]), "samples": float64(d.n)}
}

// statusDoc is the document served by `status` and GET /status (docs/design.md §9).
type statusDoc struct {
	Version   string                       `json:"version"`
	UptimeS   float64                      `json:"uptime_s"`
	Stopping  bool                         `json:"stopping"`
	Renderers rendererStats                `json:"renderers"`
	Queue     queueStats                   `json:"queue"`
	Counters  map[string]uint64            `json:"counters"`
	RenderMS  map[string]float64           `json:"render_ms"`
	Caches    map[string]map[string]uint64 `json:"caches"`
	Conns     connCounters                 `json:"connections"`
	Config    map[string]any               `json:"config"`
	// LastStartError is why the last renderer start failed, if one ever did.
	LastStartError string `json:"last_start_error,omitempty"`
	// Journal is the journal's size and live records (docs/design.md §12); absent when it is off.
	Journal *journalStats `json:"journal,omitempty"`
	// Tasks are the task documents (docs/design.md §10), newest first; added by the server.
	Tasks []taskDoc `json:"tasks"`
	// TaskTotals are the task counters' figures (tasks_started_total & co.) since the start.
	TaskTotals taskTotalsDoc `json:"task_totals"`

	// Requests are finished tile requests by protocol, class and result (non-zero ones), the
	// figures of the requests_total metric.
	Requests map[string]map[string]map[string]uint64 `json:"requests"`
	// RendererRestarts are replaced renderer processes by reason (renderer_restarts_total).
	RendererRestarts map[string]uint64 `json:"renderer_restarts"`
	// RendererList says what each renderer does, by renderer number.
	RendererList []rendererDoc `json:"renderer_list"`
	// LastErrors are the last failed renders, newest first.
	LastErrors []renderErrorDoc `json:"last_errors"`
	// Rates are renders (any result) per second over the last 10 s, minute and 15 minutes.
	Rates map[string]float64 `json:"rates"`
	// RateLimit is the background rate limiter (docs/design.md §17): caches' effective rates, held
	// jobs, backoffs.
	RateLimit rateDoc `json:"rate_limit"`
}

// rendererDoc is one renderer in the status document's renderer_list.
type rendererDoc struct {
	Renderer        int       `json:"renderer"`
	PID             int       `json:"pid,omitempty"`
	State           string    `json:"state"` // starting, idle, busy
	Retiring        bool      `json:"retiring,omitempty"`
	Failing         bool      `json:"failing,omitempty"`
	CacheIdentifier string    `json:"cache_identifier,omitempty"`
	Tile            *[3]int32 `json:"tile,omitempty"`
	Priority        int       `json:"priority,omitempty"`
	Class           string    `json:"class,omitempty"`
	RunningMS       float64   `json:"running_ms,omitempty"`
}

type rendererStats struct {
	Total    int `json:"total"`
	Ready    int `json:"ready"`
	Busy     int `json:"busy"`
	BusySeed int `json:"busy_seed"`
	BusyLive int `json:"busy_live"`
	Starting int `json:"starting"`
	Failing  int `json:"failing"` // their last start failed
	Retiring int `json:"retiring"`
}

type queueStats struct {
	Length      int            `json:"length"`
	Running     int            `json:"running"`
	ByPriority  map[string]int `json:"by_priority"`
	OldestAgeMS float64        `json:"oldest_age_ms"`
	// The same per class (seed: priority below seed_priority_below).
	OldestSeedAgeMS float64 `json:"oldest_seed_age_ms"`
	OldestLiveAgeMS float64 `json:"oldest_live_age_ms"`
	MaxQueued       int     `json:"max_queued"`
	SeedQueued      int     `json:"seed"`
	LiveQueued      int     `json:"live"`
	TrackedJobs     int     `json:"jobs"`
	WaitingTotal    int     `json:"waiting_requests"`
}

func (s *scheduler) statusDoc() statusDoc {
	now := s.now()
	d := statusDoc{
		Version:  version,
		UptimeS:  float64(time.Duration(now)/time.Millisecond) / 1000,
		Stopping: s.stopping,
		Counters: map[string]uint64{
			"requested":          s.stats.requested,
			"background":         s.stats.background,
			"merged":             s.stats.merged,
			"rendered":           s.stats.rendered,
			"failed":             s.stats.failed,
			"timed_out":          s.stats.timedOut,
			"render_skipped":     s.stats.renderSkipped,
			"render_errors":      s.stats.renderErrors,
			"no_renderer_failed": s.stats.noRendererFailed,
			"dropped":            s.stats.dropped,
			"cancelled":          s.stats.cancelled,
			"busy_rejected":      s.stats.busyRejected,
			"invalid":            s.invalidTotal(),
			"shutdown_dropped":   s.stats.shutdownDropped,
			"renderer_failures":  s.stats.rendererFailures,
			"pending":            s.stats.pending,
			"prefetched":         s.stats.prefetched,
			"prefetch_hits":      s.stats.prefetchHits,
			"prefetch_dropped":   s.stats.prefetchDropped,
			"views":              s.views.taken,
			"views_unknown":      s.views.unknown,
			"views_dropped":      s.views.dropped.Load(),
		},
		RenderMS: s.renderRec.percentiles(),
		Caches:   make(map[string]map[string]uint64),
		Conns:    s.conns(),
		Config: map[string]any{
			"renderers":           s.cfg.Renderers,
			"max_seed_renderers":  s.cfg.maxSeed,
			"seed_priority_below": s.cfg.SeedPriorityBelow,
			"render_timeout":      s.cfg.RenderTimeout.String(),
		},
		LastStartError: s.lastStartErr,
		RateLimit:      s.rateStatus(),
	}
	d.Requests = make(map[string]map[string]map[string]uint64)
	for p := range nProtos {
		for c := range nClasses {
			for r, res := range requestResults {
				if n := s.m.requests[p][c][r]; n > 0 {
					byClass := d.Requests[protoNames[p]]
					if byClass == nil {
						byClass = make(map[string]map[string]uint64)
						d.Requests[protoNames[p]] = byClass
					}
					if byClass[classNames[c]] == nil {
						byClass[classNames[c]] = make(map[string]uint64)
					}
					byClass[classNames[c]][res] = n
				}
			}
		}
	}
	d.RendererRestarts = make(map[string]uint64, len(restartReasons))
	for _, r := range restartReasons {
		d.RendererRestarts[r] = s.m.restarts[r]
	}
	d.LastErrors = make([]renderErrorDoc, 0, len(s.m.lastErrors))
	for i := len(s.m.lastErrors) - 1; i >= 0; i-- {
		d.LastErrors = append(d.LastErrors, s.m.lastErrors[i])
	}
	d.Rates = map[string]float64{"renders_per_s_10s": s.m.history.rate(10), "renders_per_s_1m": s.m.history.rate(60),
		"renders_per_s_15m": s.m.history.rate(historyLen)}
	d.RendererList = make([]rendererDoc, 0, len(s.slots))
	for _, slot := range s.slots {
		rd := rendererDoc{Renderer: slot.num, PID: slot.pid, Retiring: slot.retiring, Failing: slot.failing}
		switch slot.state {
		case slotStarting:
			rd.State = "starting"
		case slotIdle:
			rd.State = "idle"
		case slotBusy:
			rd.State = "busy"
			if j := slot.job; j != nil {
				rd.CacheIdentifier = s.cacheList[j.key.cacheIdx()].id
				rd.Tile = &[3]int32{j.key.x, j.key.y, j.key.z}
				rd.Priority = int(j.priority)
				rd.Class = classNames[classOf(slot.seed)]
				rd.RunningMS = durationMS(now - slot.started)
			}
		}
		d.RendererList = append(d.RendererList, rd)
	}
	slices.SortFunc(d.RendererList, func(a, b rendererDoc) int { return a.Renderer - b.Renderer })
	rc := s.countRenderers()
	d.Renderers.Total, d.Renderers.Retiring, d.Renderers.Failing = rc.total, rc.retiring, rc.failing
	d.Renderers.Starting, d.Renderers.Ready = rc.starting, rc.ready()
	d.Renderers.BusyLive, d.Renderers.BusySeed = rc.busy[classLive], rc.busy[classSeed]
	d.Renderers.Busy = rc.busy[classLive] + rc.busy[classSeed]
	q := &d.Queue
	q.Length = s.qs.queued()
	q.Running = s.busy
	q.MaxQueued = s.qs.max
	q.TrackedJobs = len(s.qs.jobs)
	q.ByPriority = make(map[string]int)
	for p := minPriority; p <= maxPriority; p++ {
		if n := s.qs.queuedAtPriority(p); n > 0 {
			q.ByPriority[strconv.Itoa(p)] = n
		}
	}
	seedN, seedOldest := s.qs.queuedIn(minPriority, s.qs.rule.seedBelow-1)
	liveN, liveOldest := s.qs.queuedIn(s.qs.rule.seedBelow, maxPriority)
	q.SeedQueued, q.LiveQueued = seedN, liveN
	q.WaitingTotal = s.qs.waitingRequests()
	age := func(j *job) float64 {
		if j == nil {
			return 0
		}
		return durationMS(now - j.enqueued)
	}
	q.OldestSeedAgeMS, q.OldestLiveAgeMS = age(seedOldest), age(liveOldest)
	q.OldestAgeMS = max(q.OldestSeedAgeMS, q.OldestLiveAgeMS)
	ids := make([]string, 0, len(s.caches))
	for id := range s.caches {
		ids = append(ids, id)
	}
	sort.Strings(ids)
	for _, id := range ids {
		c := s.caches[id]
		if c.requested == 0 && !c.known {
			continue
		}
		d.Caches[id] = map[string]uint64{"requested": c.requested, "rendered": c.rendered, "failed": c.failed,
			"meta_x": uint64(max(c.metaX, 1)), "meta_y": uint64(max(c.metaY, 1))}
	}
	if s.journal != nil {
		js := s.journal.stats()
		d.Journal = &js
	}
	return d
}
