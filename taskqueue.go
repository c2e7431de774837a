// SPDX-License-Identifier: Apache-2.0

package main

// Bounded task work (docs/design.md §10): at most max_tasks tasks run at once, the rest wait in
// state queued; a task's replies take memory for the replies actually waiting, not a
// channel sized for its whole window.

import "sync"

// maxWaitingTasks bounds the tasks queued behind max_tasks: a new one beyond it is refused
// (a resumed one never is: it was accepted before).
const maxWaitingTasks = 1000

// launchWaiting starts waiting tasks while fewer than max_tasks run. m.mu is held.
func (m *taskManager) launchWaiting() {
	for !m.stopping && m.running < m.cfg.MaxTasks && len(m.waiting) > 0 {
		t := m.waiting[0]
		m.waiting = m.waiting[1:]
		m.launch(t, false)
	}
}

// dequeue ends a waiting task (cancelled, with reason) and reports whether t was waiting.
// m.mu is held.
func (m *taskManager) dequeue(t *task, reason string) bool {
	for i, w := range m.waiting {
		if w == t {
			m.waiting = append(m.waiting[:i:i], m.waiting[i+1:]...)
			t.end(taskStateCancelled, reason)
			close(t.ended)
			m.log.Info("task cancelled before it started", "task", t.id, "reason", reason)
			return true
		}
	}
	return false
}

// taskReplyQueue is a task's mailbox for scheduler replies: put never blocks, and memory is
// what waits in it (a channel with room for seed_window replies per task cost ~3 MB of
// address space each, up front).
type taskReplyQueue struct {
	mu    sync.Mutex
	q     []taskReply
	ready chan struct{} // has a value while q may be non-empty
}

func newTaskReplyQueue() taskReplyQueue { return taskReplyQueue{ready: make(chan struct{}, 1)} }

func (b *taskReplyQueue) put(r taskReply) {
	b.mu.Lock()
	b.q = append(b.q, r)
	b.mu.Unlock()
	notifyChan(b.ready)
}

// take returns every reply waiting, oldest first.
func (b *taskReplyQueue) take() []taskReply {
	b.mu.Lock()
	q := b.q
	b.q = nil
	b.mu.Unlock()
	return q
}
