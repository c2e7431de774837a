package main

import (
	"container/heap"
	"fmt"
	"time"
)

// jobState says where a job is: in the queue, or on a renderer.
type jobState uint8

const (
	jobQueued jobState = iota
	jobRunning
	jobDone
)

// jobKey identifies a job for deduplication: a cache and one metatile of it
// (the tile itself when the cache's metatile size is unknown or 1×1).
type jobKey struct {
	cache   int32 // cacheInfo.idx
	x, y, z int32 // the metatile's origin tile: x//mx*mx, y//my*my
}

// job is what is queued and rendered once, whoever asked for it.
// All fields are owned by the scheduler goroutine.
// Memory per queued job matters (a seed can queue millions): it is 48 bytes, plus its table
// entry and heap slot. A running job's start time lives in its renderer's slot.
type job struct {
	key      jobKey
	seq      uint64     // FIFO order among equal priority, and the job id sent to the renderer
	enqueued int64      // ns since the daemon started
	waiters  *waiterSet // nil while nobody waits (background jobs)
	index    int32      // position in the heap; -1 when not queued
	priority int16
	state    jobState
	flags    jobFlags // packed with state so that a job stays in the 80-byte size class
}

// waiterSet holds the requests waiting for a job.
type waiterSet struct{ list []*pendingRequest }

// waiting returns the requests waiting for j.
func (j *job) waiting() []*pendingRequest {
	if j.waiters == nil {
		return nil
	}
	return j.waiters.list
}

// jobFlags say who asked for a job besides its waiters.
type jobFlags uint8

const (
	keepJob  jobFlags = 1 << iota // a background request asked for it: render even if nobody waits
	seedJob                       // a seed-class request asked for it: render it as mapproxy-seed would
	forceJob                      // someone asked for a forced render (every request but a task's)
)

// jobQueue is a max-heap of queued jobs: higher priority first, then lower seq (FIFO).
// It implements heap.Interface; items keep their own index so that heap.Fix and
// heap.Remove work in O(log n).
type jobQueue []*job

func (q jobQueue) Len() int { return len(q) }

func (q jobQueue) Less(i, j int) bool {
	if q[i].priority != q[j].priority {
		return q[i].priority > q[j].priority
	}
	return q[i].seq < q[j].seq
}

func (q jobQueue) Swap(i, j int) {
	q[i], q[j] = q[j], q[i]
	q[i].index = int32(i)
	q[j].index = int32(j)
}

func (q *jobQueue) Push(x any) {
	j := x.(*job)
	j.index = int32(len(*q))
	*q = append(*q, j)
}

func (q *jobQueue) Pop() any {
	old := *q
	n := len(old)
	j := old[n-1]
	old[n-1] = nil // let the GC have it
	j.index = -1
	*q = old[:n-1]
	return j
}

// capacityRule is the seed's reservation: with renderers N and maxSeed M, a job whose
// priority is below seedBelow may start only while fewer than M renderers are busy.
// Jobs at or above seedBelow may use every renderer.
type capacityRule struct {
	maxSeed   int
	seedBelow int
}

// mayStart reports whether a job of priority p may start while busy renderers are busy
// and free renderers are idle and ready.
func (c capacityRule) mayStart(p, busy, free int) bool {
	if free <= 0 {
		return false
	}
	if p < c.seedBelow {
		return busy < c.maxSeed
	}
	return true
}

// isSeed reports whether priority p is in the seed class.
func (c capacityRule) isSeed(p int) bool { return p < c.seedBelow }

// pendingRequest is a client's tile request while the scheduler works on it.
// The scheduler owns every field after submit; the sink gets exactly one Reply.
type pendingRequest struct {
	req      Request
	sink     replySink
	jobsLeft int
	jobs     []*job
	errMsg   string
	merged   bool
	received int64 // ns since the daemon started
	queuedNS int64 // longest wait in the queue over its jobs
	renderNS int64 // longest render over its jobs
	answered bool
	// waitTimer runs out at wait_ms (live.go); stopped when the request is answered.
	waitTimer *time.Timer
}

// replySink receives the one final reply of a request. deliver must not block:
// the scheduler calls it.
type replySink interface {
	deliver(p *pendingRequest, r Reply)
}

// chanSink is a replySink for one request: a channel with room for the reply.
type chanSink chan Reply

func (c chanSink) deliver(_ *pendingRequest, r Reply) { c <- r }

// newChanSink makes a sink that never blocks its single deliver.
func newChanSink() chanSink { return make(chanSink, 1) }

// cacheInfo is what the daemon knows about one cache identifier. Pointers are interned:
// one *cacheInfo per identifier for the life of the daemon.
type cacheInfo struct {
	id           string
	idx          int32 // its number in the scheduler's cache list, used in job keys
	metaX, metaY int32
	known        bool // a renderer's ready line listed it
	requested    uint64
	rendered     uint64
	failed       uint64
}

// refreshBefore is what a job that is not forced sends to the renderer: the latest
// refresh_before its waiters asked for (0: the cache's own rules).
func (j *job) refreshBefore() float64 {
	rb := 0.0
	for _, w := range j.waiting() {
		rb = max(rb, w.req.RefreshBefore)
	}
	return rb
}

// keyFor returns the job key of tile t in cache c: its metatile.
func keyFor(c *cacheInfo, t tileCoord) jobKey {
	mx, my := c.metaX, c.metaY
	if mx < 1 {
		mx = 1
	}
	if my < 1 {
		my = 1
	}
	return jobKey{cache: c.idx, x: t.X / mx * mx, y: t.Y / my * my, z: t.Z}
}

// String names a job in logs and test failures.
func (j *job) String() string {
	return fmt.Sprintf("job %d cache #%d %d/%d/%d prio %d", j.seq, j.key.cache, j.key.z, j.key.x, j.key.y, j.priority)
}

// queueState is the scheduler's queue and job table. Only the scheduler goroutine touches it;
// it has no locks and no goroutines, so tests drive it directly.
type queueState struct {
	queue   jobQueue
	jobs    map[jobKey]*job
	nextSeq uint64
	rule    capacityRule
	max     int // max_queued
}

func newQueueState(rule capacityRule, maxQueued int) *queueState {
	return &queueState{jobs: make(map[jobKey]*job), rule: rule, max: maxQueued}
}

// errQueueFull is returned by add when the request would need more queue room than is left.
var errQueueFull = fmt.Errorf("queue full")

// add registers a tile request: every key joins its queued or running job, or creates one.
// A higher priority raises a queued job (heap.Fix keeps its seq, so it keeps its place among
// jobs of its new priority). A request that would create more jobs than max allows is refused
// whole, before anything changes. waiter may be nil (a background request).
// It returns how many of the keys joined an existing job.
func (qs *queueState) add(keys []jobKey, priority int, keep bool, waiter *pendingRequest, now int64) (merged int, err error) {
	keys = uniqueKeys(keys)
	fresh := 0
	for _, k := range keys {
		if _, ok := qs.jobs[k]; !ok {
			fresh++
		}
	}
	if fresh > 0 && len(qs.queue)+fresh > qs.max {
		return 0, errQueueFull
	}
	for _, k := range keys {
		j, ok := qs.jobs[k]
		if ok {
			merged++
			if j.state == jobQueued && int(j.priority) < priority {
				j.priority = int16(priority)
				heap.Fix(&qs.queue, int(j.index))
			}
		} else {
			qs.nextSeq++
			j = &job{key: k, seq: qs.nextSeq, enqueued: now, priority: int16(priority), index: -1}
			qs.jobs[k] = j
			heap.Push(&qs.queue, j)
		}
		if keep {
			j.flags |= keepJob
		}
		if qs.rule.isSeed(priority) {
			j.flags |= seedJob
		}
		if waiter == nil || !waiter.req.NoForce {
			j.flags |= forceJob
		}
		if waiter != nil {
			if j.waiters == nil {
				j.waiters = &waiterSet{}
			}
			j.waiters.list = append(j.waiters.list, waiter)
			waiter.jobs = append(waiter.jobs, j)
			waiter.jobsLeft++
		}
	}
	return merged, nil
}

// uniqueKeys drops repeated keys (several tiles of one metatile in one request), keeping order.
func uniqueKeys(keys []jobKey) []jobKey {
	if len(keys) < 2 {
		return keys
	}
	seen := make(map[jobKey]struct{}, len(keys))
	out := keys[:0:0]
	for _, k := range keys {
		if _, dup := seen[k]; !dup {
			seen[k] = struct{}{}
			out = append(out, k)
		}
	}
	return out
}

// next pops the job that may start now with busy renderers busy and free ready, or nil.
// The head of the queue is the most urgent job; if it may not start, nothing behind it may either.
func (qs *queueState) next(busy, free int) *job {
	if len(qs.queue) == 0 || !qs.rule.mayStart(int(qs.queue[0].priority), busy, free) {
		return nil
	}
	j := heap.Pop(&qs.queue).(*job)
	j.state = jobRunning
	return j
}

// finish removes a running job from the table; a new request for its key makes a new job.
func (qs *queueState) finish(j *job) {
	if qs.jobs[j.key] == j {
		delete(qs.jobs, j.key)
	}
	j.state = jobDone
}

// removeWaiter detaches w from j. A queued job that nobody waits for any more and that no
// background request asked for is dropped; it reports whether that happened.
func (qs *queueState) removeWaiter(j *job, w *pendingRequest) (dropped bool) {
	ws := j.waiting()
	for i, o := range ws {
		if o == w {
			last := len(ws) - 1
			ws[i] = ws[last]
			ws[last] = nil
			j.waiters.list = ws[:last]
			break
		}
	}
	if j.state != jobQueued || len(j.waiting()) > 0 || j.flags&keepJob != 0 {
		return false
	}
	heap.Remove(&qs.queue, int(j.index))
	delete(qs.jobs, j.key)
	j.state = jobDone
	return true
}

// drain empties the queue (shutdown) and returns the jobs that were queued.
func (qs *queueState) drain() []*job {
	out := make([]*job, 0, len(qs.queue))
	for len(qs.queue) > 0 {
		j := heap.Pop(&qs.queue).(*job)
		delete(qs.jobs, j.key)
		j.state = jobDone
		out = append(out, j)
	}
	return out
}

// durationMS converts nanoseconds to milliseconds with µs precision.
func durationMS(ns int64) float64 {
	return float64(ns/int64(time.Microsecond)) / 1000
}
