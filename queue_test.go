// SPDX-License-Identifier: Apache-2.0

package main

import (
	"container/heap"
	"fmt"
	"math/rand/v2"
	"runtime"
	"testing"
	"unsafe"
)

func testCache(id string) *cacheInfo { return &cacheInfo{id: id} }

func key(c *cacheInfo, x int32) jobKey { return keyFor(c, tileCoord{x, 0, 10}) }

// popAll pops every job as if renderers were unlimited and returns their x in order.
func popAll(qs *queueState) []int32 {
	var xs []int32
	for {
		j := qs.next(0, 1)
		if j == nil {
			return xs
		}
		qs.finish(j)
		xs = append(xs, j.key.x)
	}
}

func TestQueueOrder(t *testing.T) {
	c := testCache("c")
	tests := []struct {
		name  string
		adds  []struct{ x, prio int }
		order []int32
	}{
		{"priority first", []struct{ x, prio int }{{1, 10}, {2, 100}, {3, 50}}, []int32{2, 3, 1}},
		{"FIFO among equals", []struct{ x, prio int }{{1, 10}, {2, 10}, {3, 10}, {4, 10}}, []int32{1, 2, 3, 4}},
		{"mixed", []struct{ x, prio int }{{1, 10}, {2, 100}, {3, 10}, {4, 100}, {5, 50}}, []int32{2, 4, 5, 1, 3}},
		{"duplicate joins", []struct{ x, prio int }{{1, 10}, {2, 10}, {1, 10}}, []int32{1, 2}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			qs := newQueueState(capacityRule{maxSeed: 10, seedBelow: 50}, 100)
			for _, a := range tt.adds {
				if _, err := qs.add([]jobKey{key(c, int32(a.x))}, a.prio, true, nil, 0); err != nil {
					t.Fatal(err)
				}
			}
			if got := popAll(qs); fmt.Sprint(got) != fmt.Sprint(tt.order) {
				t.Errorf("order: got %v, want %v", got, tt.order)
			}
		})
	}
}

// TestQueuePromotion: a live duplicate raises a queued seed job; it keeps its original
// sequence, so among jobs of its new priority it stands where its first request put it.
func TestQueuePromotion(t *testing.T) {
	c := testCache("c")
	qs := newQueueState(capacityRule{maxSeed: 10, seedBelow: 50}, 100)
	add := func(x int32, prio int) int {
		t.Helper()
		m, err := qs.add([]jobKey{key(c, x)}, prio, true, nil, 0)
		if err != nil {
			t.Fatal(err)
		}
		return m
	}
	add(1, 10) // seed, seq 1
	add(2, 10) // seed, seq 2
	add(3, 10) // seed, seq 3
	add(4, 100)
	if m := add(3, 100); m != 1 {
		t.Fatalf("merged: got %d, want 1", m)
	}
	add(5, 100)
	// 3 was queued before 4 and 5, so after promotion it goes first among the 100s.
	if got, want := fmt.Sprint(popAll(qs)), fmt.Sprint([]int32{3, 4, 5, 1, 2}); got != want {
		t.Errorf("order: got %s, want %s", got, want)
	}
	if len(qs.jobs) != 0 {
		t.Errorf("job table: got %d entries after all finished, want 0", len(qs.jobs))
	}
	// A lower priority never lowers a job.
	add(7, 100)
	add(7, 10)
	if j := qs.jobs[key(c, 7)]; j.priority != 100 {
		t.Errorf("priority after a lower duplicate: got %d, want 100", j.priority)
	}
}

// TestCapacityRuleSeedExample is the seed's example verbatim: 10 renderers, at most 6 for
// seeding; 8 live requests arrive while 6 seed renders run → 4 start at once, 4 wait; a seed
// request starts only while fewer than 6 renderers are busy.
func TestCapacityRuleSeedExample(t *testing.T) {
	const renderers, maxSeed = 10, 6
	c := testCache("c")
	qs := newQueueState(capacityRule{maxSeed: maxSeed, seedBelow: 50}, 1000)
	busy := 0
	start := func() *job {
		j := qs.next(busy, renderers-busy)
		if j != nil {
			busy++
		}
		return j
	}
	// 20 seed jobs queued: only 6 may start on 10 idle renderers.
	for x := int32(0); x < 20; x++ {
		qs.add([]jobKey{key(c, x)}, 10, true, nil, 0)
	}
	var seedRunning []*job
	for j := start(); j != nil; j = start() {
		seedRunning = append(seedRunning, j)
	}
	if len(seedRunning) != 6 {
		t.Fatalf("seed jobs started on 10 idle renderers: got %d, want 6", len(seedRunning))
	}
	// 8 live requests arrive: 4 start at once, 4 wait.
	for x := int32(100); x < 108; x++ {
		qs.add([]jobKey{key(c, x)}, 100, false, &pendingRequest{}, 0)
	}
	var liveStarted int
	for j := start(); j != nil; j = start() {
		if j.priority != 100 {
			t.Fatalf("started %v, want only live jobs", j)
		}
		liveStarted++
	}
	if liveStarted != 4 || busy != 10 {
		t.Fatalf("live started: got %d (busy %d), want 4 (busy 10)", liveStarted, busy)
	}
	live, seed := 0, 0
	for _, j := range qs.queue {
		if j.priority == 100 {
			live++
		} else {
			seed++
		}
	}
	if live != 4 || seed != 14 {
		t.Fatalf("waiting: got %d live and %d seed, want 4 and 14", live, seed)
	}
	// Renderers free up one by one: the 4 waiting live jobs go first.
	finish := func() { busy-- }
	for i := 0; i < 4; i++ {
		finish()
		j := start()
		if j == nil || j.priority != 100 {
			t.Fatalf("after a renderer freed: got %v, want a live job", j)
		}
	}
	// Now 10 busy (6 seed + 4 live), no live waiting. Seed may start only while busy < 6.
	for busy > 6 {
		finish()
		if j := start(); j != nil {
			t.Fatalf("with %d busy renderers a seed job started: %v", busy-1, j)
		}
	}
	finish() // busy 5
	if j := start(); j == nil || j.priority != 10 {
		t.Fatalf("with 5 busy renderers: got %v, want a seed job to start", j)
	}
	if j := start(); j != nil {
		t.Fatalf("with 6 busy renderers a second seed job started: %v", j)
	}
}

func TestCapacityRuleTable(t *testing.T) {
	rule := capacityRule{maxSeed: 6, seedBelow: 50}
	tests := []struct {
		prio, busy, free int
		want             bool
	}{
		{10, 5, 5, true},
		{10, 6, 4, false},
		{49, 6, 4, false},
		{50, 6, 4, true},
		{100, 9, 1, true},
		{100, 10, 0, false},
		{0, 0, 10, true},
	}
	for _, tt := range tests {
		if got := rule.mayStart(tt.prio, tt.busy, tt.free); got != tt.want {
			t.Errorf("mayStart(prio %d, busy %d, free %d): got %v, want %v", tt.prio, tt.busy, tt.free, got, tt.want)
		}
	}
	none := capacityRule{maxSeed: 0, seedBelow: 50}
	if none.mayStart(10, 0, 10) {
		t.Errorf("max_seed_renderers 0: a seed job may start, want never")
	}
}

func TestQueueMaxQueued(t *testing.T) {
	c := testCache("c")
	qs := newQueueState(capacityRule{maxSeed: 1, seedBelow: 50}, 3)
	for x := int32(0); x < 3; x++ {
		if _, err := qs.add([]jobKey{key(c, x)}, 10, true, nil, 0); err != nil {
			t.Fatalf("add %d: %v", x, err)
		}
	}
	if _, err := qs.add([]jobKey{key(c, 9)}, 10, true, nil, 0); err != errQueueFull {
		t.Fatalf("4th job: got %v, want errQueueFull", err)
	}
	// Joining a queued job needs no room.
	if m, err := qs.add([]jobKey{key(c, 1)}, 100, true, nil, 0); err != nil || m != 1 {
		t.Fatalf("duplicate at max_queued: got merged %d, %v; want 1, nil", m, err)
	}
	// A request needing two new jobs with room for one is refused whole.
	qs.next(0, 1)
	w := &pendingRequest{}
	if _, err := qs.add([]jobKey{key(c, 7), key(c, 8)}, 10, false, w, 0); err != errQueueFull {
		t.Fatalf("two new jobs, one slot: got %v, want errQueueFull", err)
	}
	if len(qs.queue) != 2 || w.jobsLeft != 0 {
		t.Fatalf("after refusal: queue %d, waiter jobs %d; want 2 and 0 (nothing changed)", len(qs.queue), w.jobsLeft)
	}
}

func TestQueueDropWhenNobodyWaits(t *testing.T) {
	c := testCache("c")
	qs := newQueueState(capacityRule{maxSeed: 1, seedBelow: 50}, 10)
	a, b := &pendingRequest{}, &pendingRequest{}
	qs.add([]jobKey{key(c, 1)}, 100, false, a, 0)
	qs.add([]jobKey{key(c, 1)}, 100, false, b, 0)
	j := qs.jobs[key(c, 1)]
	if qs.removeWaiter(j, a) {
		t.Fatal("dropped while b still waits")
	}
	if !qs.removeWaiter(j, b) {
		t.Fatal("not dropped after the last waiter left")
	}
	if len(qs.queue) != 0 || len(qs.jobs) != 0 {
		t.Fatalf("after drop: queue %d, table %d; want 0, 0", len(qs.queue), len(qs.jobs))
	}
	// A background request keeps the job.
	qs.add([]jobKey{key(c, 2)}, 100, false, a, 0)
	qs.add([]jobKey{key(c, 2)}, 10, true, nil, 0)
	if qs.removeWaiter(qs.jobs[key(c, 2)], a) {
		t.Fatal("dropped a job a background request asked for")
	}
	// A running job is never dropped.
	qs.add([]jobKey{key(c, 3)}, 200, false, b, 0)
	r := qs.next(0, 1)
	if r.key != key(c, 3) || qs.removeWaiter(r, b) {
		t.Fatalf("running job %v dropped or not first", r)
	}
}

func TestKeyForMetatile(t *testing.T) {
	c := &cacheInfo{id: "c", metaX: 4, metaY: 2}
	tests := []struct {
		in   tileCoord
		want jobKey
	}{
		{tileCoord{17, 10, 5}, jobKey{c.idx, 16, 10, 5}},
		{tileCoord{16, 11, 5}, jobKey{c.idx, 16, 10, 5}},
		{tileCoord{19, 9, 5}, jobKey{c.idx, 16, 8, 5}},
		{tileCoord{0, 0, 0}, jobKey{c.idx, 0, 0, 0}},
		{tileCoord{1, 1, 1}, jobKey{c.idx, 0, 0, 1}},
	}
	for _, tt := range tests {
		if got := keyFor(c, tt.in); got != tt.want {
			t.Errorf("keyFor(%v): got %v, want %v", tt.in, got, tt.want)
		}
	}
	plain := &cacheInfo{id: "p"}
	if got := keyFor(plain, tileCoord{17, 10, 5}); got != (jobKey{plain.idx, 17, 10, 5}) {
		t.Errorf("no meta size: got %v, want the tile itself", got)
	}
}

// TestHeapInvariant checks heap indexes after random operations, as container/heap's tests do.
func TestHeapInvariant(t *testing.T) {
	c := testCache("c")
	qs := newQueueState(capacityRule{maxSeed: 100, seedBelow: 50}, 10000)
	for i := int32(0); i < 500; i++ {
		qs.add([]jobKey{key(c, i%97)}, int(i*7919%1001), true, nil, 0)
		if i%5 == 0 {
			qs.finish(qs.next(0, 1))
		}
	}
	for i, j := range qs.queue {
		if int(j.index) != i {
			t.Fatalf("job %v: index %d, at %d", j, j.index, i)
		}
		for _, ch := range []int{2*i + 1, 2*i + 2} {
			if ch < len(qs.queue) && qs.queue.Less(ch, i) {
				t.Fatalf("heap order broken at %d/%d", i, ch)
			}
		}
	}
	heap.Init(&qs.queue)
}

// BenchmarkScheduler measures the queue's enqueue + dispatch + complete cycle with a
// backlog of 10,000 jobs at mixed priorities.
func BenchmarkScheduler(b *testing.B) {
	c := testCache("c")
	qs := newQueueState(capacityRule{maxSeed: 6, seedBelow: 50}, 1<<30)
	for i := 0; i < 10000; i++ {
		qs.add([]jobKey{keyFor(c, tileCoord{int32(i), 0, 20})}, []int{10, 100}[i%2], true, nil, 0)
	}
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		w := &pendingRequest{}
		qs.add([]jobKey{keyFor(c, tileCoord{int32(10000 + i), 1, 20})}, []int{10, 100}[i%2], false, w, 0)
		j := qs.next(0, 10)
		qs.finish(j)
	}
	b.StopTimer()
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "ops/s")
}

// BenchmarkQueuedJobMemory reports the heap bytes per queued job with 1,000,000 queued
// (background) jobs: job struct, table entry and heap slot.
func BenchmarkQueuedJobMemory(b *testing.B) {
	const n = 1_000_000
	for i := 0; i < b.N; i++ {
		c := testCache("osm_cache_GLOBAL_WEBMERCATOR")
		c.metaX, c.metaY = 4, 4
		runtime.GC()
		var before, after runtime.MemStats
		runtime.ReadMemStats(&before)
		qs := newQueueState(capacityRule{maxSeed: 6, seedBelow: 50}, n)
		keys := make([]jobKey, 1)
		for k := 0; k < n; k++ {
			keys[0] = keyFor(c, tileCoord{int32(k%4096) * 4, int32(k/4096) * 4, 18})
			if _, err := qs.add(keys, 10, true, nil, 0); err != nil {
				b.Fatal(err)
			}
		}
		runtime.GC()
		runtime.ReadMemStats(&after)
		if len(qs.queue) != n {
			b.Fatalf("queued %d, want %d", len(qs.queue), n)
		}
		b.ReportMetric(float64(after.HeapAlloc-before.HeapAlloc)/n, "B/job")
		runtime.KeepAlive(qs)
	}
}

func TestQueueOneRequestSeveralTilesOfOneMetatile(t *testing.T) {
	c := &cacheInfo{id: "c", metaX: 4, metaY: 4}
	qs := newQueueState(capacityRule{maxSeed: 1, seedBelow: 50}, 10)
	w := &pendingRequest{}
	keys := []jobKey{keyFor(c, tileCoord{0, 0, 5}), keyFor(c, tileCoord{1, 1, 5}), keyFor(c, tileCoord{4, 0, 5}), keyFor(c, tileCoord{3, 3, 5})}
	if _, err := qs.add(keys, 100, false, w, 0); err != nil {
		t.Fatal(err)
	}
	if len(qs.queue) != 2 || w.jobsLeft != 2 {
		t.Fatalf("got %d jobs, waiter on %d; want 2 and 2", len(qs.queue), w.jobsLeft)
	}
}

// TestJobStaysSmall guards the memory per queued job (BenchmarkQueuedJobMemory measures the
// whole, with the table entry and heap slot): the job itself fits the 48-byte allocation
// size class.
func TestJobStaysSmall(t *testing.T) {
	if got := unsafe.Sizeof(job{}); got > 48 {
		t.Errorf("job is %d bytes, want at most 48", got)
	}
}

// walkCounts is what the status document used to compute by walking the queue: jobs per
// priority, waiter entries on queued jobs, and the oldest queued job of seed and live.
func walkCounts(qs *queueState) (byPrio map[int]int, waiting int, oldestSeed, oldestLive *job) {
	byPrio = map[int]int{}
	for _, j := range qs.queue {
		byPrio[int(j.priority)]++
		waiting += len(j.waiting())
		o := &oldestLive
		if qs.rule.isSeed(int(j.priority)) {
			o = &oldestSeed
		}
		if *o == nil || j.seq < (*o).seq {
			*o = j
		}
	}
	return byPrio, waiting, oldestSeed, oldestLive
}

// checkCounts compares the running counts with a walk of the queue, and checks that every
// level's stale entries stay bounded.
func checkCounts(t *testing.T, qs *queueState, step string) {
	t.Helper()
	byPrio, waiting, oldSeed, oldLive := walkCounts(qs)
	for p := minPriority; p <= maxPriority; p++ {
		if got := qs.queuedAtPriority(p); got != byPrio[p] {
			t.Fatalf("%s: priority %d: got %d queued, walk says %d", step, p, got, byPrio[p])
		}
		l := &qs.levels[p]
		if stale := len(l.fifo) - l.head + len(l.raised) - l.count; stale < 0 || stale > l.count+64 {
			t.Fatalf("%s: priority %d: %d stale entries for %d live", step, p, stale, l.count)
		}
	}
	if got := qs.waitingRequests(); got != waiting {
		t.Fatalf("%s: waiting: got %d, walk says %d", step, got, waiting)
	}
	seedN, seedO := qs.queuedIn(minPriority, qs.rule.seedBelow-1)
	liveN, liveO := qs.queuedIn(qs.rule.seedBelow, maxPriority)
	if seedN+liveN != len(qs.queue) {
		t.Fatalf("%s: seed %d + live %d != queue length %d", step, seedN, liveN, len(qs.queue))
	}
	if seedO != oldSeed || liveO != oldLive {
		t.Fatalf("%s: oldest seed %v live %v; walk says %v and %v", step, seedO, liveO, oldSeed, oldLive)
	}
}

// TestQueueRunningCounts: the counts the status document reads stay equal to a walk of the
// queue through every kind of change: new jobs, joins, promotions, starts, drops, drain.
func TestQueueRunningCounts(t *testing.T) {
	type op struct {
		do   string // add, bg (background add), start, leave, drain
		x    int32
		prio int
		w    int // waiter number for add and leave
	}
	tests := []struct {
		name string
		ops  []op
	}{
		{"fifo at one priority", []op{{"add", 1, 10, 1}, {"add", 2, 10, 2}, {"add", 3, 10, 3}, {"start", 0, 0, 0}, {"start", 0, 0, 0}}},
		{"promotion of the oldest seed job", []op{{"add", 1, 10, 1}, {"add", 2, 10, 2}, {"add", 3, 100, 3}, {"add", 1, 100, 4}, {"start", 0, 0, 0}, {"start", 0, 0, 0}}},
		{"promotion from the middle", []op{{"bg", 1, 10, 0}, {"bg", 2, 10, 0}, {"bg", 3, 10, 0}, {"add", 2, 60, 1}, {"add", 2, 100, 2}, {"start", 0, 0, 0}, {"start", 0, 0, 0}}},
		{"raised job older than the level's own", []op{{"bg", 1, 10, 0}, {"bg", 2, 100, 0}, {"add", 1, 100, 1}, {"start", 0, 0, 0}}},
		{"join does not lower", []op{{"add", 1, 100, 1}, {"add", 1, 10, 2}, {"add", 1, 10, 3}}},
		{"waiters leave, job dropped", []op{{"add", 1, 10, 1}, {"add", 1, 10, 2}, {"add", 2, 10, 3}, {"leave", 1, 0, 1}, {"leave", 1, 0, 2}, {"leave", 2, 0, 3}}},
		{"waiter leaves a running job", []op{{"add", 1, 100, 1}, {"start", 0, 0, 0}, {"leave", 1, 0, 1}}},
		{"join a running job", []op{{"add", 1, 100, 1}, {"start", 0, 0, 0}, {"add", 1, 100, 2}}},
		{"background keeps a job", []op{{"add", 1, 10, 1}, {"bg", 1, 10, 0}, {"leave", 1, 0, 1}}},
		{"drain", []op{{"add", 1, 10, 1}, {"add", 2, 100, 2}, {"add", 1, 200, 3}, {"drain", 0, 0, 0}, {"add", 3, 10, 4}}},
		{"priority edges", []op{{"bg", 1, 0, 0}, {"bg", 2, 1000, 0}, {"add", 1, 49, 1}, {"add", 1, 50, 2}, {"start", 0, 0, 0}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := testCache("c")
			qs := newQueueState(capacityRule{maxSeed: 10, seedBelow: 50}, 100)
			waiters := map[int]*pendingRequest{}
			now := int64(0)
			for i, o := range tt.ops {
				now++
				step := fmt.Sprintf("op %d %+v", i, o)
				switch o.do {
				case "add", "bg":
					var w *pendingRequest
					if o.do == "add" {
						w = &pendingRequest{}
						waiters[o.w] = w
					}
					if _, err := qs.add([]jobKey{key(c, o.x)}, o.prio, o.do == "bg", w, now); err != nil {
						t.Fatalf("%s: %v", step, err)
					}
				case "start":
					if j := qs.next(0, 1); j == nil {
						t.Fatalf("%s: nothing to start", step)
					}
				case "leave":
					j := qs.jobs[key(c, o.x)]
					if j == nil {
						t.Fatalf("%s: no job", step)
					}
					qs.removeWaiter(j, waiters[o.w])
				case "drain":
					qs.drain()
				}
				checkCounts(t, qs, step)
			}
		})
	}
}

// TestQueueRunningCountsRandom drives the queue with random operations, including long
// promotion-heavy stretches that leave stale entries in the middle of levels, and checks the
// counts (and the bound on stale entries) after every one.
func TestQueueRunningCountsRandom(t *testing.T) {
	c := testCache("c")
	qs := newQueueState(capacityRule{maxSeed: 10, seedBelow: 50}, 1<<20)
	rng := rand.New(rand.NewPCG(1, 2))
	var live []*pendingRequest
	prios := []int{0, 10, 10, 10, 49, 50, 100, 100, 1000}
	for i := 0; i < 20000; i++ {
		x := int32(rng.IntN(3000))
		switch r := rng.IntN(10); {
		case r < 4:
			w := &pendingRequest{}
			if _, err := qs.add([]jobKey{key(c, x), key(c, x+1)}, prios[rng.IntN(len(prios))], false, w, int64(i)); err != nil {
				t.Fatal(err)
			}
			live = append(live, w)
		case r < 6:
			qs.add([]jobKey{key(c, x)}, prios[rng.IntN(len(prios))], true, nil, int64(i))
		case r < 8:
			if j := qs.next(0, 1); j != nil && rng.IntN(2) == 0 {
				qs.finish(j)
			}
		default:
			if len(live) > 0 {
				k := rng.IntN(len(live))
				w := live[k]
				live[k] = live[len(live)-1]
				live = live[:len(live)-1]
				for _, j := range w.jobs {
					if j.state != jobDone {
						qs.removeWaiter(j, w)
					}
				}
			}
		}
		if i%97 == 0 || i > 19900 {
			checkCounts(t, qs, fmt.Sprintf("op %d", i))
		}
	}
	for qs.next(0, 1) != nil {
	}
	checkCounts(t, qs, "emptied")
}
