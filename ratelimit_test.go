// SPDX-License-Identifier: Apache-2.0

package main

import (
	"io"
	"log/slog"
	"math"
	"testing"
	"time"
)

// sec is n seconds on the limiter's clock (ns).
func sec(n float64) int64 { return int64(n * float64(time.Second)) }

func TestRateBucketNoWindowAboveItsRate(t *testing.T) {
	// A job is ready every 10 ms of fake time; the bucket at 5/s lets through what it
	// lets through. Any 2-s window holds at most 1 + 5·2 = 11 starts.
	for _, rate := range []float64{0.5, 2, 5, 20, 100} {
		b := newRateBucket("cache c", rate, 0)
		var starts []int64
		for now := int64(0); now < sec(30); now += sec(0.01) {
			if b.ready(now) {
				b.take(now)
				starts = append(starts, now)
			}
		}
		win := maxInWindow(starts, sec(2))
		if limit := 1 + int(math.Max(1, rate/5)) + int(rate*2); win > limit {
			t.Errorf("rate %g: %d starts in a 2-s window, want at most %d", rate, win, limit)
		}
		if got, want := float64(len(starts))/30, rate; math.Abs(got-want) > want*0.05+0.1 {
			t.Errorf("rate %g: %.2f starts/s over 30 s", rate, got)
		}
	}
}

// maxInWindow returns the most sorted times within any half-open window of length w.
func maxInWindow(ts []int64, w int64) int {
	best, j := 0, 0
	for i := range ts {
		for ts[i]-ts[j] >= w {
			j++
		}
		best = max(best, i-j+1)
	}
	return best
}

func TestRateBucketAIMD(t *testing.T) {
	b := newRateBucket("cache c", 8, 0)
	o503 := overloadInfo{status: 503}
	if !b.overload(sec(10), sec(9), o503) || b.eff != 4 || !b.backoff {
		t.Fatalf("first overload: eff %g backoff %v, want 4 true", b.eff, b.backoff)
	}
	// A job started before the cut fails too: same flight, no second cut.
	if b.overload(sec(10.5), sec(9.5), o503) || b.eff != 4 {
		t.Fatalf("same flight: eff %g, want 4", b.eff)
	}
	// A job started after the cut: halves again.
	if !b.overload(sec(11), sec(10.2), o503) || b.eff != 2 {
		t.Fatalf("second flight: eff %g, want 2", b.eff)
	}
	for i := 0; i < 20; i++ {
		b.overload(sec(12+float64(i)), sec(11.5+float64(i)), overloadInfo{timeout: true})
	}
	if b.eff != minEffectiveRate {
		t.Fatalf("floor: eff %g, want %g", b.eff, minEffectiveRate)
	}
	// Recovery: 10 % per clean period, up to the cap, then the backoff ends.
	at := b.lastCut
	b.recover(at+sec(59), time.Minute)
	if b.eff != minEffectiveRate {
		t.Fatalf("before a period: eff %g", b.eff)
	}
	b.recover(at+sec(60), time.Minute)
	if math.Abs(b.eff-0.11) > 1e-9 {
		t.Fatalf("after a period: eff %g, want 0.11", b.eff)
	}
	b.recover(at+sec(60*60), time.Minute)
	if b.eff != 8 || b.backoff {
		t.Fatalf("after an hour: eff %g backoff %v, want 8 false", b.eff, b.backoff)
	}
	if b.cuts != 1+1+20 {
		// 20 timeouts, each of a job started after the previous cut.
		t.Errorf("cuts: got %d", b.cuts)
	}
}

func TestRateBucketUnlimitedBacksOffFromObservedRate(t *testing.T) {
	b := newRateBucket("cache c", 0, 0)
	for now := sec(0); now < sec(10); now += sec(0.05) { // 20/s, unlimited
		if !b.ready(now) {
			t.Fatal("an unlimited bucket held a job")
		}
		b.take(now)
		b.observe(now)
	}
	b.overload(sec(10), sec(9.99), overloadInfo{status: 429})
	if math.Abs(b.eff-10) > 1.5 {
		t.Fatalf("eff %g, want about half the observed 20/s", b.eff)
	}
	b.recover(sec(10)+sec(3600), time.Minute)
	if b.eff != 0 || b.backoff {
		t.Fatalf("recovered: eff %g backoff %v, want unlimited again", b.eff, b.backoff)
	}
}

func TestRateBucketRetryAfterPauses(t *testing.T) {
	b := newRateBucket("cache c", 0, 0)
	b.overload(sec(1), sec(0.5), overloadInfo{status: 503, retryAfter: 7})
	if b.ready(sec(7.9)) {
		t.Fatal("ready during Retry-After")
	}
	if at := b.readyAt(sec(2)); at != sec(8) {
		t.Fatalf("readyAt: got %v, want 8s", time.Duration(at))
	}
	if !b.ready(sec(8)) {
		t.Fatal("not ready after Retry-After")
	}
	// Recovery counts from the end of the pause, not from the cut.
	eff := b.eff
	b.recover(sec(8)+sec(59), time.Minute)
	if b.eff != eff {
		t.Fatalf("recovered during the pause: eff %g, want %g", b.eff, eff)
	}
	// Back to unlimited, then a Retry-After from a job of an old flight: a pause, no cut;
	// when it is over the backoff ends.
	b.recover(sec(8)+sec(3600), time.Minute)
	if b.eff != 0 || b.backoff {
		t.Fatalf("not unlimited again: %+v", b)
	}
	b.overload(sec(4000), sec(0.9), overloadInfo{status: 503, retryAfter: 2})
	if b.eff != 0 || !b.backoff || b.ready(sec(4001)) {
		t.Fatalf("old flight with Retry-After: eff %g backoff %v", b.eff, b.backoff)
	}
	b.recover(sec(4002), time.Minute)
	if b.backoff || !b.ready(sec(4002)) {
		t.Fatalf("after the pause: backoff %v", b.backoff)
	}
}

func TestQueueHeldJobs(t *testing.T) {
	qs := newQueueState(capacityRule{maxSeed: 4, seedBelow: 50}, 100)
	b := newRateBucket("task", 1, 0)
	keys := []jobKey{{x: 1}, {x: 2}, {x: 3}}
	if _, err := qs.add(keys, 10, true, nil, 0); err != nil {
		t.Fatal(err)
	}
	// Hold two of them.
	for range 2 {
		qs.holdIn(qs.queue[0], b)
	}
	if qs.queued() != 3 || qs.held() != 2 || len(qs.queue) != 1 || qs.queuedAtPriority(10) != 3 {
		t.Fatalf("after hold: queued %d held %d heap %d", qs.queued(), qs.held(), len(qs.queue))
	}
	// A live request merges into held job x=1: it is back in the heap, raised.
	w := &pendingRequest{req: Request{Priority: 100}}
	if m, err := qs.add([]jobKey{{x: 1}}, 100, false, w, 0); err != nil || m != 1 {
		t.Fatalf("merge: %d %v", m, err)
	}
	if qs.held() != 1 || qs.queue[0].key.x != 1 || qs.queue[0].priority != 100 {
		t.Fatalf("after merge: held %d head %v", qs.held(), qs.queue[0])
	}
	// Dropping a held job (cancel) takes it out of the bucket.
	j2 := qs.jobs[jobKey{x: 2}]
	qs.drop(j2)
	if qs.held() != 0 || len(b.held) != 0 || qs.queuedAtPriority(10) != 1 {
		t.Fatalf("after drop: held %d bucket %d", qs.held(), len(b.held))
	}
	// Start a held one, and drain with one held.
	qs.holdIn(qs.jobs[jobKey{x: 3}], b)
	j3 := b.held[0]
	qs.startHeld(j3)
	if j3.state != jobRunning || qs.queuedAtPriority(10) != 0 || qs.held() != 0 {
		t.Fatalf("startHeld: state %v", j3.state)
	}
	qs.add([]jobKey{{x: 4}}, 10, true, nil, 0)
	qs.holdIn(qs.jobs[jobKey{x: 4}], b)
	if out := qs.drain(); len(out) != 2 || qs.queued() != 0 || len(b.held) != 0 {
		t.Fatalf("drain: %d jobs, %d queued", len(out), qs.queued())
	}
}

// BenchmarkNextJob: a job queued and started through the limiter's dispatch path (add,
// nextJob, finish), against queueState.next alone; and a live job started while 100,000
// background jobs of the cache are held (the held backlog costs the live job one look at
// its bucket, not a walk).
func BenchmarkNextJob(b *testing.B) {
	setup := func(b *testing.B, rate float64) (*scheduler, *cacheInfo) {
		cfg := defaultConfig()
		cfg.RendererCommand = []string{"unused"}
		cfg.MaxQueued = 1 << 20
		if rate > 0 {
			cfg.BackgroundRate = map[string]float64{"c": rate}
		}
		if err := cfg.Validate(); err != nil {
			b.Fatal(err)
		}
		s := newScheduler(cfg, slog.New(slog.NewTextHandler(io.Discard, nil)), rendererConfig{})
		s.idle = []*renderer{nil} // one idle renderer: nextJob only counts them
		c := s.newCache("c")
		return s, c
	}
	key := func(c *cacheInfo, i int) []jobKey {
		return []jobKey{keyFor(c, tileCoord{int32(i % 65536), int32(i / 65536), 20})}
	}
	b.Run("queueState.next", func(b *testing.B) {
		s, c := setup(b, 0)
		for i := 0; b.Loop(); i++ {
			s.qs.add(key(c, i), 10, true, nil, 0)
			s.qs.finish(s.qs.next(0, 1))
		}
	})
	b.Run("nextJob unlimited", func(b *testing.B) {
		s, c := setup(b, 0)
		for i := 0; b.Loop(); i++ {
			s.qs.add(key(c, i), 10, true, nil, 0)
			s.qs.finish(s.nextJob())
		}
	})
	b.Run("nextJob live over 100k held", func(b *testing.B) {
		s, c := setup(b, 0.001)
		for i := range 100000 {
			s.qs.add(key(c, 1<<24+i), 10, true, nil, 0)
		}
		s.qs.finish(s.nextJob()) // the one token; then every background job is held
		if j := s.nextJob(); j != nil || s.qs.held() != 100000-1 {
			b.Fatalf("held %d, next %v", s.qs.held(), j)
		}
		for i := 0; b.Loop(); i++ {
			w := &pendingRequest{req: Request{Priority: 100}}
			s.qs.add(key(c, i), 100, false, w, 0)
			j := s.nextJob()
			if j == nil {
				b.Fatal("the live job was held")
			}
			s.qs.finish(j)
		}
	})
}
