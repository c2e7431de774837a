// SPDX-License-Identifier: Apache-2.0

package main

import (
	"context"
	"encoding/json"
	"time"
)

// A task cancelled by request ends at once (its document says cancelled, the cancel
// command returns), but the renders running at that moment still finish (a running job is
// never killed for a client that leaves, docs/design.md §4) and are counted in the document when
// they end: its queued metatiles are withdrawn, its running ones kept (keepRunning), and
// the task goroutine takes their results before it returns. That wait is bounded by
// render_timeout and ends at shutdown.

// keptRunning reports whether a cancel leaves p in place: p wants its running renders
// (keepRunning) and every job of p is running. It runs on the scheduler goroutine.
func (s *scheduler) keptRunning(p *pendingRequest) bool {
	if !p.keepRunning || len(p.jobs) == 0 {
		return false
	}
	for _, j := range p.jobs {
		if j.state != jobRunning {
			return false
		}
	}
	return true
}

// cancelCounting ends the task as cancelled with reason, then counts the renders that were
// running at the cancel as they end. Retries are dropped; a failure now is counted failed.
func (t *task) cancelCounting(ctx context.Context, reason string, retryTimer *time.Timer) {
	for p := range t.outstanding {
		t.route.cancel(p) // queued: withdrawn (a withdrawn reply); running: kept
	}
	t.retrying = nil
	t.end(taskStateCancelled, reason)
	close(t.stopped)
	t.m.log.Info("task cancelled", "task", t.id, "reason", reason, "running", len(t.outstanding))
	running := len(t.outstanding)
	t.set.retries = 0
	for len(t.outstanding) > 0 {
		select {
		case <-t.replies.ready:
			for _, rep := range t.replies.take() {
				if rep.r.Status == statusWithdrawn {
					delete(t.outstanding, rep.p)
					running--
					continue
				}
				t.answer(rep, retryTimer)
			}
		case <-ctx.Done():
			t.abandon()
			return
		}
	}
	if running > 0 && t.m.journal != nil {
		t.mu.Lock()
		b, _ := json.Marshal(t.doc)
		t.mu.Unlock()
		t.m.journal.taskEnd(t.id, b) // the final document, with the late renders
	}
}
