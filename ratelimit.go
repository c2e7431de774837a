// SPDX-License-Identifier: Apache-2.0

package main

import (
	"container/heap"
	"math"
	"sort"
	"sync/atomic"
	"time"
)

// Background rate (docs/design.md §17): token buckets that hold non-live jobs in the queue.
//
// There are two kinds of bucket. A cache's bucket caps all non-live work of the cache
// (tasks, prefetch, background requests, seed-class requests) at background_rate, and backs
// off when the upstream is overloaded (AIMD: halve on a 429, 503 or upstream timeout, add
// 10 % per clean minute up to the cap); every cache has one, unlimited until configured or
// until the first overload. A task's bucket caps the task's jobs at its rate.
//
// Holding: the scheduler's dispatch takes the most urgent startable job, as before, from
// the queue's heap or from the top of a bucket's own heap of held jobs. A job at the head of
// the queue whose bucket has no token is moved into that bucket's heap (it stays queued:
// in the job table, in the per-priority counts), so the jobs behind it are reached without a
// walk. A job with a live waiter is never held; a live request that merges into a held job
// moves it back to the queue's heap (queueState.add), where it starts at once. Dedup,
// promotion (unhold, then heap.Fix) and cancel (drop) work on held jobs as on others.
//
// No goroutine per job and no sleep: the scheduler owns one timer, armed for the earliest
// moment a held job may start while a renderer is idle.
//
// Everything here is owned by the scheduler goroutine, except rateTag's atomics.

const (
	minEffectiveRate = 0.1 // floor of the AIMD decrease, metatiles per second
	rateRecoverStep  = 1.1 // growth per clean recovery period
	rateObserveSecs  = 10  // the rate observed before a first backoff is taken over this window
	// taskBucketIdle: a task's bucket with no held job, unused this long, is forgotten.
	taskBucketIdle = 2 * time.Minute
)

// rateRecoverEvery is the AIMD recovery period (docs/design.md §17: a minute). Tests shorten it
// before starting a daemon; the scheduler copies it at creation.
var rateRecoverEvery = time.Minute

// rateTag marks a task's requests: the task's rate (0: unlimited) and, for the task's
// document, its effective rate and held jobs, which the scheduler stores atomically.
// The task creates it; the scheduler keys the task's bucket by its pointer.
type rateTag struct {
	rate float64
	eff  atomic.Uint64 // math.Float64bits of the effective rate; 0 while unknown/unlimited
	held atomic.Int64
}

// effective returns the task's effective rate (0: unlimited).
func (t *rateTag) effective() float64 { return math.Float64frombits(t.eff.Load()) }

// overloadInfo is what a renderer's error reply said about the upstream (docs/design.md §17).
type overloadInfo struct {
	status     int     // 429 or 503; 0 when not an HTTP overload
	timeout    bool    // the upstream timed out
	retryAfter float64 // seconds, from the upstream's Retry-After; 0 when absent
}

// overloaded reports whether the upstream was overloaded.
func (o overloadInfo) overloaded() bool { return o.status == 429 || o.status == 503 || o.timeout }

// rateBucket is one token bucket with its AIMD state. Times are ns on the scheduler's clock.
type rateBucket struct {
	name    string
	rate    float64 // configured cap; 0: none
	eff     float64 // current rate; 0: unlimited
	tokens  float64
	last    int64 // refilled up to here
	paused  int64 // no token before this (Retry-After)
	backoff bool  // eff is below the cap after an overload (or a pause is running)
	ceiling float64
	lastCut int64 // the last decrease: failures of jobs started before it do not cut again
	step    int64 // the last decrease or recovery step
	cuts    uint64
	started uint64 // jobs started through this bucket (all jobs, for a cache's bucket)
	held    jobQueue
	holding bool // listed in limiter.holding
	used    int64
	born    int64       // created; the observed rate is over at most its age
	tag     *rateTag    // a task's bucket
	cache   *rateBucket // a task's bucket: the cache of its last job
	obs     [rateObserveSecs]struct {
		sec int64
		n   uint32
	}
}

func newRateBucket(name string, rate float64, now int64) *rateBucket {
	return &rateBucket{name: name, rate: rate, eff: rate, ceiling: rate, tokens: 1, last: now, used: now, born: now}
}

// burst is how many jobs may start back to back: a fifth of a second's worth, at least one.
// The bucket holds just under burst+1 tokens, so that a scheduler that wakes a little late
// (a loaded machine) loses no token, while any window of t seconds still starts fewer than
// burst + 1 + rate·t jobs (rate 5: at most 11 in 2 s).
func (b *rateBucket) burst() float64 { return max(1, b.eff/5) }

// refill adds the tokens earned since the last refill (none while paused).
func (b *rateBucket) refill(now int64) {
	if now <= b.last {
		return
	}
	if from := max(b.last, b.paused); b.eff > 0 && now > from {
		b.tokens = min(b.burst()+1-1e-9, b.tokens+b.eff*float64(now-from)/1e9)
	}
	b.last = now
}

// ready reports whether a job may start through b now.
func (b *rateBucket) ready(now int64) bool {
	if b == nil {
		return true
	}
	b.refill(now)
	return now >= b.paused && (b.eff == 0 || b.tokens >= 1)
}

// readyAt is the earliest time ready can be true (now if it is).
func (b *rateBucket) readyAt(now int64) int64 {
	if b == nil {
		return now
	}
	b.refill(now)
	at := max(now, b.paused)
	if b.eff > 0 && b.tokens < 1 {
		at = max(at, now+int64(math.Ceil((1-b.tokens)/b.eff*1e9)))
	}
	return at
}

// take spends a token for a job that starts now (ready was true).
func (b *rateBucket) take(now int64) {
	if b == nil {
		return
	}
	b.used = now
	if b.eff > 0 {
		b.tokens--
	}
}

// observe counts a job start for the observed rate.
func (b *rateBucket) observe(now int64) {
	b.started++
	sec := now / int64(time.Second)
	o := &b.obs[sec%rateObserveSecs]
	if o.sec != sec {
		o.sec, o.n = sec, 0
	}
	o.n++
}

// observed is the start rate over the last rateObserveSecs seconds (the current one
// included), or over the bucket's life when that is shorter (at least a second).
func (b *rateBucket) observed(now int64) float64 {
	sec := now / int64(time.Second)
	var n uint32
	for _, o := range b.obs {
		if sec-o.sec < rateObserveSecs {
			n += o.n
		}
	}
	span := min(max(float64(now-b.born)/1e9, 1), rateObserveSecs)
	return float64(n) / span
}

// overload takes an upstream overload of a job that started at started: the rate halves
// (from the observed rate when none is set; floor minEffectiveRate) unless it was cut after
// the job started (one cut per flight of jobs, as TCP), and a Retry-After pauses the bucket.
// It reports whether the rate was cut.
func (b *rateBucket) overload(now, started int64, o overloadInfo) bool {
	if o.retryAfter > 0 {
		b.refill(now)
		b.paused = max(b.paused, now+int64(o.retryAfter*1e9))
		b.step = max(b.step, b.paused) // recovery counts from the end of the pause
		b.backoff = true
	}
	if b.cuts > 0 && started < b.lastCut {
		return false
	}
	base := b.eff
	if !b.backoff || base == 0 {
		if base == 0 {
			base = max(b.observed(now), minEffectiveRate)
		}
		b.ceiling = base
		if b.rate > 0 {
			b.ceiling = b.rate
		}
	}
	floor := minEffectiveRate
	if b.rate > 0 {
		floor = min(floor, b.rate)
	}
	b.refill(now)
	b.eff = max(floor, base/2)
	b.tokens = 0 // the next start waits a full interval at the new rate
	if b.paused > now {
		b.tokens = 1 // … or the upstream's Retry-After, which the pause already waits for
	}
	b.backoff = true
	b.lastCut, b.step = now, max(now, b.paused)
	b.cuts++
	return true
}

// recover grows a backing-off rate by rateRecoverStep per clean period since the last cut or
// step, up to the ceiling; there the backoff ends (and a cache without background_rate is
// unlimited again).
func (b *rateBucket) recover(now int64, every time.Duration) {
	if !b.backoff || now < b.paused || every <= 0 {
		return
	}
	if b.eff == 0 { // unlimited and only paused (Retry-After): the pause is over
		b.backoff = false
		return
	}
	steps := (now - b.step) / int64(every)
	if steps <= 0 {
		return
	}
	b.refill(now)
	b.step += steps * int64(every)
	b.eff = min(b.ceiling, b.eff*math.Pow(rateRecoverStep, float64(steps)))
	if b.eff >= b.ceiling {
		b.backoff = false
		b.eff = b.rate // the cap, or unlimited
	}
}

// effective is the rate jobs may start at now (0: unlimited; paused counts as 0.0…).
func (b *rateBucket) effective() float64 {
	if b == nil {
		return 0
	}
	return b.eff
}

// limiter is the scheduler's set of buckets.
type limiter struct {
	cfg          map[string]float64 // background_rate
	byCache      []*rateBucket      // by cacheInfo.idx; nil until the cache's first start or overload
	byTag        map[*rateTag]*rateBucket
	holding      []*rateBucket // buckets that have (or recently had) held jobs
	recoverEvery time.Duration
	backoffs     uint64 // cuts over every bucket (metrics)
	timer        *time.Timer
	timerAt      int64 // when timer fires; 0: not armed
}

func newLimiter(cfg map[string]float64) *limiter {
	t := time.NewTimer(time.Hour)
	t.Stop()
	return &limiter{cfg: cfg, byTag: make(map[*rateTag]*rateBucket), recoverEvery: rateRecoverEvery, timer: t}
}

// cacheBucket returns cache c's bucket, creating it.
func (l *limiter) cacheBucket(c *cacheInfo, now int64) *rateBucket {
	for int(c.idx) >= len(l.byCache) {
		l.byCache = append(l.byCache, nil)
	}
	b := l.byCache[c.idx]
	if b == nil {
		b = newRateBucket("cache "+c.id, l.cfg[c.id], now)
		l.byCache[c.idx] = b
	}
	return b
}

// taskBucket returns the bucket of a task's tag, creating it.
func (l *limiter) taskBucket(t *rateTag, now int64) *rateBucket {
	b := l.byTag[t]
	if b == nil {
		b = newRateBucket("task", t.rate, now)
		b.tag = t
		l.byTag[t] = b
	}
	return b
}

// reconfigure takes a new background_rate: caps change at once; a cache whose cap went
// away keeps backing off toward unlimited.
func (l *limiter) reconfigure(cfg map[string]float64, caches []*cacheInfo) {
	l.cfg = cfg
	for i, b := range l.byCache {
		if b == nil {
			continue
		}
		r := cfg[caches[i].id]
		if r == b.rate {
			continue
		}
		b.rate = r
		if b.backoff {
			b.ceiling = r
			if r > 0 {
				b.eff = min(b.eff, r)
			}
			if r == 0 {
				b.ceiling = max(b.eff, minEffectiveRate)
			}
		} else {
			b.eff, b.ceiling = r, r
		}
	}
}

// heldJobs tracks the jobs held in buckets (part of queueState).
type heldJobs struct {
	by map[*job]*rateBucket
}

// held returns how many jobs are held.
func (qs *queueState) held() int { return len(qs.hold.by) }

// queued returns how many jobs are queued, held ones included.
func (qs *queueState) queued() int { return len(qs.queue) + len(qs.hold.by) }

// holdIn moves the queued job j from the queue's heap into b's.
func (qs *queueState) holdIn(j *job, b *rateBucket) {
	if qs.hold.by == nil {
		qs.hold.by = make(map[*job]*rateBucket)
	}
	heap.Remove(&qs.queue, int(j.index))
	heap.Push(&b.held, j)
	j.flags |= heldJob
	qs.hold.by[j] = b
}

// removeHeld takes a held job out of its bucket's heap (it is then in no heap).
func (qs *queueState) removeHeld(j *job) {
	b := qs.hold.by[j]
	heap.Remove(&b.held, int(j.index))
	delete(qs.hold.by, j)
	j.flags &^= heldJob
}

// unhold moves a held job back into the queue's heap.
func (qs *queueState) unhold(j *job) {
	qs.removeHeld(j)
	heap.Push(&qs.queue, j)
}

// startHeld takes a held job out of its bucket to run it, with next's accounting.
func (qs *queueState) startHeld(j *job) {
	qs.removeHeld(j)
	j.state = jobRunning
	p := int(j.priority)
	qs.levels[p].count--
	qs.waiting -= len(j.waiting())
	qs.settle(p)
}

// drainHeld empties every bucket's heap (shutdown) and returns the held jobs.
func (qs *queueState) drainHeld() []*job {
	out := make([]*job, 0, len(qs.hold.by))
	for j, b := range qs.hold.by {
		clear(b.held)
		b.held = b.held[:0]
		j.flags &^= heldJob
		j.index = -1
		j.state = jobDone
		delete(qs.jobs, j.key)
		out = append(out, j)
	}
	clear(qs.hold.by)
	// Map order is random; hand them back by sequence like the heap's.
	sort.Slice(out, func(a, b int) bool { return out[a].seq < out[b].seq })
	return out
}

// before reports whether job a goes before b in the queue's order.
func before(a, b *job) bool {
	if a.priority != b.priority {
		return a.priority > b.priority
	}
	return a.seq < b.seq
}

// limitsOf returns the buckets job j must pass: none when a live request waits for it; its
// task's when every waiter is a task with a rate and no background request asked for it;
// its cache's unless it is a delete job (which does not reach the upstream).
func (s *scheduler) limitsOf(j *job, now int64) (task, cache *rateBucket) {
	var tag *rateTag
	taskOnly := j.flags&keepJob == 0
	for _, w := range j.waiting() {
		if w.tag == nil {
			if !s.qs.rule.isSeed(w.req.Priority) {
				return nil, nil // live
			}
			taskOnly = false
			continue
		}
		if w.tag.rate <= 0 {
			taskOnly = false
		} else if tag == nil {
			tag = w.tag
		}
	}
	if taskOnly && tag != nil {
		task = s.rl.taskBucket(tag, now)
	}
	if !j.key.isDelete() {
		cache = s.rl.cacheBucket(s.cacheList[j.key.cacheIdx()], now)
	}
	return task, cache
}

// nextJob pops the job that may start now: the most urgent of the queue's head and the
// held jobs whose buckets have tokens. A queue head whose bucket is dry is held on the way.
// It replaces queueState.next in dispatch.
func (s *scheduler) nextJob() *job {
	qs := s.qs
	now := s.now()
	for {
		var best *job
		var from bool
		if len(qs.queue) > 0 {
			best = qs.queue[0]
		}
		if len(qs.hold.by) > 0 {
			for _, b := range s.rl.holding {
				if len(b.held) == 0 {
					continue
				}
				top := b.held[0]
				if best != nil && !before(top, best) {
					continue
				}
				if t, c := s.limitsOf(top, now); !t.ready(now) || !c.ready(now) {
					continue
				}
				best, from = top, true
			}
		}
		if best == nil || !qs.rule.mayStart(int(best.priority), s.busy, len(s.idle)) {
			return nil
		}
		t, c := s.limitsOf(best, now)
		if !from {
			dry := t
			if t.ready(now) {
				dry = nil
				if !c.ready(now) {
					dry = c
				}
			}
			if dry != nil {
				qs.holdIn(best, dry)
				s.rl.listHolding(dry)
				continue
			}
		}
		t.take(now)
		c.take(now)
		s.rl.cacheBucket(s.cacheList[best.key.cacheIdx()], now).observe(now)
		if t != nil {
			t.observe(now)
			t.cache = c // the task's effective rate is also its cache's
		}
		if from {
			qs.startHeld(best)
			return best
		}
		return qs.next(s.busy, len(s.idle))
	}
}

// listHolding adds b to the buckets nextJob looks at.
func (l *limiter) listHolding(b *rateBucket) {
	if !b.holding {
		b.holding = true
		l.holding = append(l.holding, b)
	}
}

// armRateTimer runs after dispatch: while a renderer is idle and jobs are held, the timer
// fires when the first of them may start. It also drops emptied buckets from the list.
func (s *scheduler) armRateTimer() {
	l := s.rl
	keep := l.holding[:0]
	for _, b := range l.holding {
		if len(b.held) > 0 {
			keep = append(keep, b)
		} else {
			b.holding = false
		}
	}
	clear(l.holding[len(keep):])
	l.holding = keep
	if len(keep) == 0 || len(s.idle) == 0 {
		return
	}
	now := s.now()
	var at int64 = math.MaxInt64
	for _, b := range keep {
		t, c := s.limitsOf(b.held[0], now)
		at = min(at, max(t.readyAt(now), c.readyAt(now)))
	}
	if l.timerAt != 0 && l.timerAt <= at && l.timerAt > now {
		return // armed early enough already
	}
	l.timerAt = at
	l.timer.Reset(time.Duration(max(at-now, 0)))
}

// rateTimerC is the scheduler's wake-up for held jobs.
func (s *scheduler) rateTimerC() <-chan time.Time { return s.rl.timer.C }

// rateWoke clears the armed time when the timer fired (dispatch follows).
func (s *scheduler) rateWoke() { s.rl.timerAt = 0 }

// rateFinished takes a finished job's outcome: an upstream overload cuts its cache's rate.
// It reports whether the cache's limiter is backing off (the failure is then retried
// without counting, docs/design.md §17).
func (s *scheduler) rateFinished(j *job, started int64, o overloadInfo) bool {
	if !o.overloaded() {
		return false
	}
	now := s.now()
	b := s.rl.cacheBucket(s.cacheList[j.key.cacheIdx()], now)
	if b.overload(now, started, o) {
		s.rl.backoffs++
		s.log.Warn("upstream overloaded: halving the cache's background rate", "cache", b.name[len("cache "):],
			"upstream_status", o.status, "upstream_timeout", o.timeout, "retry_after_s", o.retryAfter, "rate", b.eff)
	}
	return b.backoff
}

// rateTick runs every second: recovery steps, task documents' effective rates, and the
// forgetting of idle task buckets.
func (s *scheduler) rateTick() {
	now := s.now()
	l := s.rl
	for _, b := range l.byCache {
		if b != nil {
			b.recover(now, l.recoverEvery)
		}
	}
	for tag, b := range l.byTag {
		if len(b.held) == 0 && now-b.used > int64(taskBucketIdle) {
			delete(l.byTag, tag)
			continue
		}
		tag.held.Store(int64(len(b.held)))
	}
	for _, b := range l.byTag {
		b.tag.eff.Store(math.Float64bits(minRate(b.eff, b.cache.effective())))
	}
}

// minRate is the smaller of two rates where 0 is unlimited.
func minRate(a, b float64) float64 {
	switch {
	case a == 0:
		return b
	case b == 0:
		return a
	}
	return min(a, b)
}
