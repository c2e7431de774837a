// SPDX-License-Identifier: Apache-2.0

package main

import (
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"sync"
	"time"
)

// task is one running or finished task.
type task struct {
	m       *taskManager
	route   requestRoute  // the scheduler, or cluster
	tag     *rateTag      // marks the task's requests for the rate limiter (ratelimit.go)
	cluster *clusterRoute // with cluster: set, closed when run returns
	id      string
	spec    taskSpec
	set     taskSettings
	replies taskReplyQueue // from the scheduler; never full
	stopCh  chan string    // a stop reason; buffered 1, first one wins
	ended   chan struct{}  // closed when run has returned
	stopped chan struct{}  // closed when a cancel has ended the task (its running renders may still be counted)
	created time.Time

	mu  sync.Mutex
	doc taskDoc

	// Owned by the run goroutine.
	outstanding map[*pendingRequest]*taskJob
	retrying    []*taskJob // waiting for their retry time, in due order
	outcomes    []bool     // ring of the last failureWindow finished metatiles: true = failed
	outcomeNext int
	outcomeN    int
	outcomeFail int
	rate        [rateWindowSeconds]struct {
		sec int64
		n   uint64
	}
	started       time.Time
	sourceDone    bool
	walkProgress  float64
	lastCursor    json.RawMessage
	totalFinished uint64
	pic           taskPicture // its metatiles at the zoom it is on, for the status page (picture.go)
	// Checkpoints (docs/design.md §12, journaltask.go): items taken, cursors not yet journaled, last one.
	taken          uint64
	cursors        []pendingCursor
	lastCheckpoint time.Time
	// Counts that survive a restart (taskstore.go): items finished after the last
	// checkpoint; figures before this run; a finished task restored from the journal.
	finishedSince []finishedItem
	plannedBase   uint64
	deletedBase   uint64
	resumed       int
	restored      bool
}

// taskJob is one metatile of a task while the task works on it.
type taskJob struct {
	item     taskItem
	attempts int
	due      time.Time
	seq      uint64 // order of the item in the source (checkpoints)
}

type taskReply struct {
	p *pendingRequest
	r Reply
}

func newTask(m *taskManager, id string, spec taskSpec, set taskSettings) *task {
	now := time.Now()
	t := &task{m: m, route: m.sched, id: id, spec: spec, set: set, tag: &rateTag{rate: spec.rate},
		replies: newTaskReplyQueue(), stopCh: make(chan string, 1), ended: make(chan struct{}), stopped: make(chan struct{}),
		created: now, outstanding: make(map[*pendingRequest]*taskJob), outcomes: make([]bool, failureWindow)}
	t.doc = taskDoc{TaskID: id, Name: spec.Name, Kind: spec.Kind, State: taskStateQueued, Priority: spec.priority, Rate: spec.rate,
		Created: now.Format(time.RFC3339), Errors: []taskError{}, Scheduled: spec.scheduled}
	if spec.resumed {
		t.restoreCounts(spec.resumeCounts, spec.created)
	}
	return t
}

// deliver is the task's replySink: the scheduler calls it once per request. It never
// blocks.
func (t *task) deliver(p *pendingRequest, r Reply) {
	t.replies.put(taskReply{p, r})
}

// stop asks the task to end with reason; it reports false when the task had already ended.
func (t *task) stop(reason string) bool {
	if t.isFinished() {
		return false
	}
	select {
	case t.stopCh <- reason:
	default:
	}
	return true
}

func (t *task) isFinished() bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.doc.finished()
}

// snapshot copies the document.
func (t *task) snapshot() taskDoc {
	t.mu.Lock()
	defer t.mu.Unlock()
	d := t.doc
	d.Errors = slices.Clone(d.Errors)
	if d.EtaS != nil {
		e := *d.EtaS
		d.EtaS = &e
	}
	return d
}

// end sets a final state. A task ends once.
func (t *task) end(state, reason string) {
	t.mu.Lock()
	if t.doc.finished() {
		t.mu.Unlock()
		return
	}
	t.doc.State, t.doc.Reason = state, reason
	t.doc.Finished = time.Now().Format(time.RFC3339)
	t.doc.EtaS = nil
	if state == taskStateDone {
		t.doc.Progress = 1
	}
	t.doc.Queued = 0
	var doc []byte // the final document, journaled
	if t.m.journal != nil {
		doc, _ = json.Marshal(t.doc)
	}
	t.mu.Unlock()
	t.recordEnd(state, reason, doc) // journal and list file: I/O, so not under t.mu
}

// run is the task goroutine: it reads the source while fewer than window of its requests
// are outstanding, submits them, takes replies, retries failures with backoff, and ends the
// task (done, failed, cancelled). It returns after the source is closed and every request
// it still had is cancelled at the scheduler.
func (t *task) run(ctx context.Context, src taskSource) {
	defer close(t.ended)
	defer src.close()
	if t.cluster != nil {
		defer t.cluster.close()
	}
	t.started = time.Now()
	t.mu.Lock()
	t.doc.State = taskStatePlanning
	if t.doc.Started == "" { // a resumed task keeps its first start
		t.doc.Started = t.started.Format(time.RFC3339)
	}
	t.mu.Unlock()
	retryTimer := time.NewTimer(time.Hour)
	retryTimer.Stop()
	defer retryTimer.Stop()
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for {
		var items <-chan taskItem
		if !t.sourceDone && len(t.outstanding)+len(t.retrying) < t.set.window {
			items = src.items()
		}
		select {
		case it, ok := <-items:
			if !ok {
				t.sourceDone = true
				if err := src.err(); err != nil {
					t.fail("planner: " + err.Error())
					return
				}
				break
			}
			t.take(it)
		case <-t.replies.ready:
			for _, rep := range t.replies.take() {
				t.answer(rep, retryTimer)
			}
		case <-retryTimer.C:
			t.retryDue(retryTimer)
		case reason := <-t.stopCh:
			if reason == reasonShutdown {
				t.checkpoint(true) // what finished so far: the restart resumes after it
			} else if t.cluster == nil {
				t.cancelCounting(ctx, reason, retryTimer)
				return
			}
			t.abandon()
			t.end(taskStateCancelled, reason)
			t.m.log.Info("task cancelled", "task", t.id, "reason", reason)
			return
		case <-ctx.Done():
			t.checkpoint(true) // what finished so far: the restart resumes after it
			t.abandon()
			t.end(taskStateCancelled, reasonShutdown)
			return
		case <-tick.C:
			t.checkpoint(false)
		}
		if t.failedTooOften(false) {
			return
		}
		if t.sourceDone && len(t.outstanding) == 0 && len(t.retrying) == 0 {
			if t.failedTooOften(true) {
				return
			}
			t.publish()
			t.end(taskStateDone, "")
			d := t.snapshot()
			t.m.log.Info("task done", "task", t.id, "name", d.Name, "planned", d.Planned, "done", d.Done,
				"skipped", d.Skipped, "failed", d.Failed, "deleted", d.Deleted)
			return
		}
		t.publish()
	}
}

// take handles one source item.
func (t *task) take(it taskItem) {
	if it.resolved != nil {
		t.resolve(it.resolved)
	}
	if it.progress >= 0 {
		t.walkProgress = it.progress
	}
	if it.cursor != nil {
		t.lastCursor = it.cursor
		t.cursors = append(t.cursors, pendingCursor{seq: t.taken, cursor: it.cursor})
	}
	if it.hasRemoved {
		t.mu.Lock()
		t.doc.Deleted = t.deletedBase + it.removed
		t.mu.Unlock()
	}
	if it.lines != nil {
		t.mu.Lock()
		t.doc.Lines, t.doc.BadLines, t.doc.LineErrors = it.lines.read, it.lines.bad, it.lines.errors
		t.mu.Unlock()
	}
	if !it.hasTile {
		return
	}
	t.mu.Lock()
	t.doc.Planned++
	t.mu.Unlock()
	t.pic.mark(it.tile, metaPlanned)
	t.taken++
	t.submit(&taskJob{item: it, seq: t.taken})
}

// submit sends one metatile to the scheduler.
func (t *task) submit(tj *taskJob) {
	tj.attempts++
	p := &pendingRequest{sink: t, tag: t.tag, req: Request{Command: "tile", CacheIdentifier: tj.item.cache,
		Tiles: []tileCoord{tj.item.tile}, Priority: t.spec.priority,
		NoForce: !tj.item.force, RefreshBefore: tj.item.refreshBefore, Delete: tj.item.delete, OnlyCached: tj.item.onlyCached},
		keepRunning: t.cluster == nil}
	t.outstanding[p] = tj
	t.route.submit(p)
}

// answer takes the scheduler's reply for one of the task's requests.
func (t *task) answer(rep taskReply, retryTimer *time.Timer) {
	tj, ok := t.outstanding[rep.p]
	if !ok {
		return
	}
	delete(t.outstanding, rep.p)
	switch rep.r.Status {
	case statusOK:
		t.mu.Lock()
		switch {
		case tj.item.delete:
			t.doc.Deleted++
			t.noteFinished(tj.seq, finishedDeleted)
		case rep.r.Skipped:
			t.doc.Skipped++
			t.noteFinished(tj.seq, finishedSkipped)
		default:
			t.doc.Done++
			t.noteFinished(tj.seq, finishedDone)
		}
		t.mu.Unlock()
		t.pic.mark(tj.item.tile, metaDone)
		t.outcome(false)
	case statusBusy:
		// The queue is full: not the metatile's fault. Try again shortly, uncounted.
		tj.attempts--
		t.later(tj, busyRetryDelay, retryTimer)
	case statusShuttingDown:
		// The daemon stops; the task ends through ctx. Nothing to count.
	default:
		if rep.r.Backoff {
			// The upstream is overloaded and the cache's limiter backs off (docs/design.md §17):
			// retry, uncounted; the limiter paces the retry.
			tj.attempts--
			t.mu.Lock()
			t.doc.Retried++
			t.mu.Unlock()
			t.later(tj, t.set.backoff, retryTimer)
			return
		}
		t.failed(tj, rep, retryTimer)
	}
}

// failed takes a failed metatile: retried with backoff, or counted as failed.
func (t *task) failed(tj *taskJob, rep taskReply, retryTimer *time.Timer) {
	if tj.attempts <= t.set.retries {
		t.mu.Lock()
		t.doc.Retried++
		t.mu.Unlock()
		backoff := min(t.set.backoff<<(tj.attempts-1), maxRetryBackoff)
		t.later(tj, backoff, retryTimer)
		return
	}
	t.mu.Lock()
	t.doc.Failed++
	t.noteFinished(tj.seq, finishedFailed)
	if len(t.doc.Errors) < maxTaskErrors {
		tile := tj.item.tile
		t.doc.Errors = append(t.doc.Errors, taskError{Tile: []int32{tile.X, tile.Y, tile.Z},
			CacheIdentifier: tj.item.cache, Message: rep.r.ErrorMessage})
	}
	t.mu.Unlock()
	t.pic.mark(tj.item.tile, metaFailed)
	t.outcome(true)
}

// later queues tj for another submission after d.
func (t *task) later(tj *taskJob, d time.Duration, retryTimer *time.Timer) {
	tj.due = time.Now().Add(d)
	i, _ := slices.BinarySearchFunc(t.retrying, tj.due, func(a *taskJob, due time.Time) int { return a.due.Compare(due) })
	t.retrying = slices.Insert(t.retrying, i, tj)
	if i == 0 {
		retryTimer.Reset(d)
	}
}

// retryDue resubmits every retry whose time has come and sets the timer for the next.
func (t *task) retryDue(retryTimer *time.Timer) {
	now := time.Now()
	n := 0
	for n < len(t.retrying) && !t.retrying[n].due.After(now) {
		t.submit(t.retrying[n])
		n++
	}
	t.retrying = slices.Delete(t.retrying, 0, n)
	if len(t.retrying) > 0 {
		retryTimer.Reset(time.Until(t.retrying[0].due))
	}
}

// outcome records a finished metatile for the failure ratio and the rate.
func (t *task) outcome(failed bool) {
	if t.outcomeN == failureWindow {
		if t.outcomes[t.outcomeNext] {
			t.outcomeFail--
		}
	} else {
		t.outcomeN++
	}
	t.outcomes[t.outcomeNext] = failed
	if failed {
		t.outcomeFail++
	}
	t.outcomeNext = (t.outcomeNext + 1) % failureWindow
	t.totalFinished++
	sec := time.Now().Unix()
	b := &t.rate[sec%rateWindowSeconds]
	if b.sec != sec {
		b.sec, b.n = sec, 0
	}
	b.n++
}

// failedTooOften ends the task as failed when more than seed_max_failure_ratio of its last
// 1,000 metatiles failed: checked once 100 have finished, and over all of them at the end.
func (t *task) failedTooOften(atEnd bool) bool {
	if t.outcomeFail == 0 || (!atEnd && t.outcomeN < failureMinSample) {
		return false
	}
	ratio := float64(t.outcomeFail) / float64(t.outcomeN)
	if ratio <= t.set.maxFailRatio {
		return false
	}
	t.abandon()
	t.publish()
	reason := fmt.Sprintf("%d of the last %d metatiles failed (more than seed_max_failure_ratio %g)", t.outcomeFail, t.outcomeN, t.set.maxFailRatio)
	t.end(taskStateFailed, reason)
	t.m.log.Error("task failed", "task", t.id, "name", t.spec.Name, "reason", reason)
	return true
}

// fail ends the task as failed with reason (its planner failed, say).
func (t *task) fail(reason string) {
	t.abandon()
	t.publish()
	t.mu.Lock()
	if len(t.doc.Errors) < maxTaskErrors {
		t.doc.Errors = append(t.doc.Errors, taskError{Message: reason})
	}
	t.mu.Unlock()
	t.end(taskStateFailed, reason)
	t.m.log.Error("task failed", "task", t.id, "name", t.spec.Name, "reason", reason)
}

// abandon withdraws every outstanding request: queued jobs nobody else waits for are
// dropped, jobs a live request merged into stay, running renders finish. Retries are
// forgotten.
func (t *task) abandon() {
	if t.cluster != nil {
		// Close first: a worker freed by one cancel must not send another metatile.
		t.cluster.close()
	}
	for p := range t.outstanding {
		t.route.cancel(p)
	}
	clear(t.outstanding)
	t.retrying = nil
}

// publish writes the derived figures (state, progress, rate, ETA) into the document.
func (t *task) publish() {
	now := time.Now()
	var recent uint64
	for _, b := range t.rate {
		if now.Unix()-b.sec < rateWindowSeconds {
			recent += b.n
		}
	}
	span := min(now.Sub(t.started).Seconds(), rateWindowSeconds)
	rate := 0.0
	if span > 0 {
		rate = float64(recent) / max(span, 1)
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.doc.finished() {
		return
	}
	if t.doc.Planned > 0 || t.doc.Deleted > 0 || t.sourceDone {
		t.doc.State = taskStateRunning
	}
	t.doc.Progress = t.walkProgress
	t.doc.Queued = len(t.outstanding) + len(t.retrying)
	t.doc.RatePerS = rate
	total := t.doc.Planned
	if !t.sourceDone && t.walkProgress > 0 {
		total = max(total, uint64(float64(t.doc.Planned)/t.walkProgress))
	}
	t.doc.TotalEstimate = total
	if eff := t.tag.effective(); eff > 0 || t.spec.rate > 0 {
		t.doc.EffectiveRate = minRate(t.spec.rate, eff)
	}
	t.doc.HeldJobs = t.tag.held.Load()
	t.doc.EtaS = nil
	if rate > 0 && (t.sourceDone || t.walkProgress > 0) {
		left := float64(total) - float64(t.totalFinished)
		eta := max(left, 0) / rate
		t.doc.EtaS = &eta
	}
}
