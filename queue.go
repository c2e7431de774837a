// SPDX-License-Identifier: Apache-2.0

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
	cache   int32 // cacheInfo.idx, with deleteKeyBit for a delete job
	x, y, z int32 // the metatile's origin tile: x//mx*mx, y//my*my
}

// deleteKeyBit in jobKey.cache marks a delete job (docs/design.md §11: an expiry run removes the
// metatile's tiles from the cache instead of rendering them). A delete and a render of one
// metatile are different jobs; they never merge. Cache numbers stay far below the bit
// (maxInternedCaches), and the key keeps its 16 bytes.
const deleteKeyBit int32 = 1 << 30

// cacheIdx is the key's cache number without the delete bit.
func (k jobKey) cacheIdx() int32 { return k.cache &^ deleteKeyBit }

// isDelete reports whether the key is a delete job's.
func (k jobKey) isDelete() bool { return k.cache&deleteKeyBit != 0 }

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
	flags    jobFlags // packed with state so that a job stays in the 48-byte size class (TestJobStaysSmall)
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
	keepJob     jobFlags = 1 << iota // a background request asked for it: render even if nobody waits
	seedJob                          // a seed-class request asked for it: render it as mapproxy-seed would
	forceJob                         // someone asked for a forced render (every request but a task's)
	anyCacheJob                      // someone asked for a render cached or not (all but an expiry run's only_cached)
	prefetchJob                      // prefetch queued it and no request has joined it since (prefetch.go)
	heldJob                          // the rate limiter holds it in a bucket's heap, not the queue's (ratelimit.go)
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
	proto    reqProto
	received int64 // ns since the daemon started
	queuedNS int64 // longest wait in the queue over its jobs
	renderNS int64 // longest render over its jobs
	answered bool
	// keepRunning: a cancel withdraws the request's queued jobs but not a running one, whose
	// result still comes (a cancelled task counts the renders running at the cancel); a
	// withdrawn request is told so with a statusWithdrawn reply (taskdrain.go).
	keepRunning bool
	// tag marks a task's request (ratelimit.go): never live, limited at the task's rate.
	tag *rateTag
	// backoff: a job failed on an overloaded upstream while its cache's limiter backs off.
	backoff bool
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
	known        bool      // a renderer's ready line listed it
	xyz          xyzOrigin // its grid is the XYZ pyramid (expiry lists apply), from the ready line
	requested    uint64
	rendered     uint64
	failed       uint64
	renders      [][nRenderResult]uint64 // finished renders by zoom and result (metrics)
}

// refreshBefore is what a job that is not forced sends to the renderer: the latest
// refresh_before its waiters asked for (negative: none; the cache's own rules).
func (j *job) refreshBefore() float64 {
	rb := -1.0
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
	return fmt.Sprintf("job %d cache #%d %d/%d/%d prio %d", j.seq, j.key.cacheIdx(), j.key.z, j.key.x, j.key.y, j.priority)
}

// queueState is the scheduler's queue and job table. Only the scheduler goroutine touches it;
// it has no locks and no goroutines, so tests drive it directly.
//
// It keeps running counts so that the status document and a metrics scrape never walk the
// queue (docs/design.md §14): queued jobs per priority, requests waiting on queued jobs, and per
// priority the oldest queued job (see prioLevel). Every change to the queue goes through
// add, next, removeWaiter and drain, which keep them exact.
type queueState struct {
	queue   jobQueue
	jobs    map[jobKey]*job
	nextSeq uint64
	rule    capacityRule
	max     int // max_queued

	levels  [maxPriority + 1]prioLevel // by priority
	waiting int                        // waiter entries on queued jobs (a request counts once per job it waits for)
	hold    heldJobs                   // queued jobs the rate limiter holds outside the heap (ratelimit.go)
}

func newQueueState(rule capacityRule, maxQueued int) *queueState {
	return &queueState{jobs: make(map[jobKey]*job), rule: rule, max: maxQueued}
}

// prioLevel accounts for the queued jobs of one priority: how many there are, and which is
// the oldest, exactly and without a walk.
//
// Jobs of one priority leave the heap in sequence order (FIFO), and a new job always has the
// highest sequence yet, so the jobs created at a priority form a FIFO: fifo, appended on
// creation. The only jobs that join a priority out of order are those raised to it from a
// lower one (a promotion keeps the job's sequence); they go into raised, a min-heap by
// sequence, which stays small because promotions are rare next to new jobs. The oldest job
// of the priority is the older of fifo's head and raised's top.
//
// Jobs leave a level by starting (next), by being dropped (removeWaiter, drain) or by being
// raised to a higher priority. Their entries are not searched for: an entry is stale once its
// job is no longer queued at this priority (priorities only go up, and a job never returns to
// the queue), and settle discards stale entries at the head of fifo and the top of raised, so
// that both heads are always live. Stale entries further in are dropped by a compaction when
// they outnumber the live ones, so memory stays within twice the live entries and every
// operation is amortised O(1) (fifo) or O(log r) (raised, r promoted jobs).
type prioLevel struct {
	count  int     // queued jobs at this priority
	fifo   []*job  // jobs created at this priority, by sequence; fifo[head:] is in use
	head   int     //
	raised seqHeap // jobs raised to this priority from a lower one, by sequence
}

// queuedAt reports whether j is queued at priority p (its entry in level p is live).
func queuedAt(j *job, p int) bool { return j.state == jobQueued && int(j.priority) == p }

// settle discards stale entries at the heads of level p, and compacts the level when stale
// entries outnumber live ones.
func (qs *queueState) settle(p int) {
	l := &qs.levels[p]
	for l.head < len(l.fifo) && !queuedAt(l.fifo[l.head], p) {
		l.fifo[l.head] = nil
		l.head++
	}
	for len(l.raised) > 0 && !queuedAt(l.raised[0], p) {
		heap.Pop(&l.raised)
	}
	switch {
	case l.head == len(l.fifo):
		l.head = 0
		if cap(l.fifo) > 4096 {
			l.fifo = nil // a drained backlog gives its memory back
		} else {
			l.fifo = l.fifo[:0]
		}
	case l.head >= 1024 && l.head > len(l.fifo)/2:
		n := copy(l.fifo, l.fifo[l.head:])
		clear(l.fifo[n:])
		l.fifo, l.head = l.fifo[:n], 0
	}
	if stale := len(l.fifo) - l.head + len(l.raised) - l.count; stale > l.count+64 {
		l.compact(p)
	}
}

// compact drops every stale entry of level p.
func (l *prioLevel) compact(p int) {
	live := l.fifo[:0]
	for _, j := range l.fifo[l.head:] {
		if queuedAt(j, p) {
			live = append(live, j)
		}
	}
	clear(l.fifo[len(live):])
	l.fifo, l.head = live, 0
	r := l.raised[:0]
	for _, j := range l.raised {
		if queuedAt(j, p) {
			r = append(r, j)
		}
	}
	clear(l.raised[len(r):])
	l.raised = r
	heap.Init(&l.raised)
}

// oldest returns the oldest job queued at priority p, or nil. Level p must be settled.
func (l *prioLevel) oldest() *job {
	var o *job
	if l.head < len(l.fifo) {
		o = l.fifo[l.head]
	}
	if len(l.raised) > 0 && (o == nil || l.raised[0].seq < o.seq) {
		o = l.raised[0]
	}
	return o
}

// seqHeap is a min-heap of jobs by sequence (oldest first), for prioLevel.raised.
type seqHeap []*job

func (h seqHeap) Len() int           { return len(h) }
func (h seqHeap) Less(i, j int) bool { return h[i].seq < h[j].seq }
func (h seqHeap) Swap(i, j int)      { h[i], h[j] = h[j], h[i] }
func (h *seqHeap) Push(x any)        { *h = append(*h, x.(*job)) }
func (h *seqHeap) Pop() any {
	old := *h
	j := old[len(old)-1]
	old[len(old)-1] = nil
	*h = old[:len(old)-1]
	return j
}

// queuedAtPriority returns how many jobs are queued at priority p.
func (qs *queueState) queuedAtPriority(p int) int { return qs.levels[p].count }

// queuedIn returns how many jobs are queued at priorities lo..hi (inclusive), and the oldest
// of them (nil if none). It costs one step per priority, never a walk of the queue.
func (qs *queueState) queuedIn(lo, hi int) (n int, oldest *job) {
	lo, hi = max(lo, minPriority), min(hi, maxPriority)
	for p := lo; p <= hi; p++ {
		l := &qs.levels[p]
		if l.count == 0 {
			continue
		}
		n += l.count
		if o := l.oldest(); o != nil && (oldest == nil || o.seq < oldest.seq) {
			oldest = o
		}
	}
	return n, oldest
}

// waitingRequests returns the waiter entries on queued jobs: a request waiting for three
// queued jobs counts three times.
func (qs *queueState) waitingRequests() int { return qs.waiting }

// errQueueFull is returned by add when the request would need more queue room than is left.
var errQueueFull = fmt.Errorf("queue full")

// errPriority is returned by add for a priority outside minPriority..maxPriority.
var errPriority = fmt.Errorf("priority out of range %d..%d", minPriority, maxPriority)

// add registers a tile request: every key joins its queued or running job, or creates one.
// A higher priority raises a queued job (heap.Fix keeps its seq, so it keeps its place among
// jobs of its new priority). A request that would create more jobs than max allows is refused
// whole, before anything changes. waiter may be nil (a background request).
// It returns how many of the keys joined an existing job.
func (qs *queueState) add(keys []jobKey, priority int, keep bool, waiter *pendingRequest, now int64) (merged int, err error) {
	if priority < minPriority || priority > maxPriority {
		return 0, errPriority
	}
	keys = uniqueKeys(keys)
	fresh := 0
	for _, k := range keys {
		if _, ok := qs.jobs[k]; !ok {
			fresh++
		}
	}
	if fresh > 0 && qs.queued()+fresh > qs.max {
		return 0, errQueueFull
	}
	for _, k := range keys {
		j, ok := qs.jobs[k]
		if ok {
			merged++
			if j.flags&heldJob != 0 {
				qs.unhold(j) // a new waiter may be live, or raise it: back to the heap
			}
			if j.state == jobQueued && int(j.priority) < priority {
				old := int(j.priority)
				j.priority = int16(priority)
				heap.Fix(&qs.queue, int(j.index))
				qs.levels[old].count--
				qs.settle(old)
				l := &qs.levels[priority]
				l.count++
				heap.Push(&l.raised, j)
			}
		} else {
			qs.nextSeq++
			j = &job{key: k, seq: qs.nextSeq, enqueued: now, priority: int16(priority), index: -1}
			qs.insert(j)
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
		if waiter == nil || !waiter.req.OnlyCached {
			j.flags |= anyCacheJob
		}
		if waiter != nil {
			if j.waiters == nil {
				j.waiters = &waiterSet{}
			}
			j.waiters.list = append(j.waiters.list, waiter)
			waiter.jobs = append(waiter.jobs, j)
			waiter.jobsLeft++
			if j.state == jobQueued {
				qs.waiting++
			}
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
	p := int(j.priority)
	qs.levels[p].count--
	qs.waiting -= len(j.waiting())
	qs.settle(p)
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
			if j.state == jobQueued {
				qs.waiting--
			}
			break
		}
	}
	if j.state != jobQueued || len(j.waiting()) > 0 || j.flags&keepJob != 0 {
		return false
	}
	qs.drop(j)
	return true
}

// addUnasked queues a job that no request asked for (prefetch): a new job of key k with the
// given priority and flags and nobody waiting. It returns nil, changing nothing, when k is
// queued or running already or the queue is full (max_queued).
func (qs *queueState) addUnasked(k jobKey, priority int, flags jobFlags, now int64) *job {
	if _, ok := qs.jobs[k]; ok || qs.queued() >= qs.max {
		return nil
	}
	qs.nextSeq++
	j := &job{key: k, seq: qs.nextSeq, enqueued: now, priority: int16(priority), index: -1, flags: flags}
	qs.insert(j)
	return j
}

// dropUnasked drops j when it is still queued and no request asked for it (nobody waits, no
// background request keeps it); it reports whether it did.
func (qs *queueState) dropUnasked(j *job) bool {
	if j.state != jobQueued || j.flags&keepJob != 0 || len(j.waiting()) > 0 {
		return false
	}
	qs.drop(j)
	return true
}

// insert queues a new job (its key is not in the table; its seq is the newest) and counts it.
// Every job enters the queue here, so the per-priority counts stay exact.
func (qs *queueState) insert(j *job) {
	qs.jobs[j.key] = j
	heap.Push(&qs.queue, j)
	l := &qs.levels[j.priority]
	l.count++
	l.fifo = append(l.fifo, j)
}

// drop removes a queued job from the queue and the table without running it, keeping the
// counts exact; its waiters (if any) are the caller's to answer.
func (qs *queueState) drop(j *job) {
	if j.flags&heldJob != 0 {
		qs.removeHeld(j)
	} else {
		heap.Remove(&qs.queue, int(j.index))
	}
	delete(qs.jobs, j.key)
	j.state = jobDone
	p := int(j.priority)
	qs.levels[p].count--
	qs.waiting -= len(j.waiting())
	qs.settle(p)
}

// drain empties the queue (shutdown) and returns the jobs that were queued.
func (qs *queueState) drain() []*job {
	out := qs.drainHeld()
	for len(qs.queue) > 0 {
		j := heap.Pop(&qs.queue).(*job)
		delete(qs.jobs, j.key)
		j.state = jobDone
		out = append(out, j)
	}
	qs.levels = [maxPriority + 1]prioLevel{}
	qs.waiting = 0
	return out
}

// durationMS converts nanoseconds to milliseconds with µs precision.
func durationMS(ns int64) float64 {
	return float64(ns/int64(time.Microsecond)) / 1000
}
