// SPDX-License-Identifier: Apache-2.0

package main

import (
	"encoding/json"
	"math"
	"os"
	"path/filepath"
	"slices"
	"time"
)

// Tasks in the journal (docs/design.md §12): a task's spec is journaled before the task is
// reported started; its cursor (the planner's position, an expiry list's lines) is
// checkpointed every checkpointEvery once every item before it has finished; its end is
// journaled when it is done, failed or cancelled by request (not when the daemon stops:
// then it resumes from its last checkpoint at the next start).
//
// Exactly-once where it matters: after a crash, a resumed task repeats only the items
// between its last journaled cursor and the crash: at most the items it finished in the
// last checkpointEvery (plus the cursor interval of its source: 1,000 lines for expiry
// lists, the planner's own for seeds) and those running at the kill (one per renderer).

// reasonShutdown is the reason of tasks cancelled because the daemon stops.
const reasonShutdown = "daemon is shutting down"

// checkpointEvery is how often a running task journals its cursor (at most).
const checkpointEvery = 2 * time.Second

// pendingCursor is a cursor a task's source gave after its seq-th item.
type pendingCursor struct {
	seq    uint64
	cursor json.RawMessage
}

// journaledSpec is a task spec as the journal keeps it (taskSpec's priority and
// scheduled flag are not part of its planner JSON).
type journaledSpec struct {
	Spec      taskSpec `json:"spec"`
	Priority  int      `json:"priority"`
	Scheduled bool     `json:"scheduled,omitempty"`
	Created   string   `json:"created,omitempty"` // RFC 3339; the task document's created
	Rate      float64  `json:"rate,omitempty"`    // metatiles per second (docs/design.md §17)
}

// marshalJournaledSpec is spec's journaledSpec, as JSON.
func marshalJournaledSpec(spec taskSpec) []byte {
	spec.Cursor = nil
	created := spec.created
	if created == "" {
		created = time.Now().Format(time.RFC3339)
	}
	b, _ := json.Marshal(journaledSpec{Spec: spec, Priority: spec.priority, Scheduled: spec.scheduled, Created: created, Rate: spec.rate})
	return b
}

// checkpoint journals the newest cursor whose items have all finished, with the task's
// counts as of that cursor (taskstore.go), at most every checkpointEvery unless force. A
// cleanup, which has no cursor (it starts over), journals its counts alone. It runs on the
// task goroutine.
func (t *task) checkpoint(force bool) {
	if t.m.journal == nil {
		return
	}
	if !force && time.Since(t.lastCheckpoint) < checkpointEvery {
		return
	}
	if len(t.cursors) == 0 {
		if t.spec.Kind == "cleanup" {
			t.mu.Lock()
			b, _ := json.Marshal(taskCheckpoint{Version: 1, Counts: t.countsAt(t.taken)})
			t.mu.Unlock()
			t.m.journal.taskCursor(t.id, b)
			t.lastCheckpoint = time.Now()
		}
		return
	}
	minOpen := uint64(math.MaxUint64)
	for _, tj := range t.outstanding {
		minOpen = min(minOpen, tj.seq)
	}
	for _, tj := range t.retrying {
		minOpen = min(minOpen, tj.seq)
	}
	i := -1
	for k, c := range t.cursors {
		if c.seq >= minOpen {
			break
		}
		i = k
	}
	if i < 0 {
		return
	}
	t.mu.Lock()
	b, _ := json.Marshal(taskCheckpoint{Version: 1, Cursor: t.cursors[i].cursor, Counts: t.countsAt(t.cursors[i].seq)})
	t.mu.Unlock()
	t.m.journal.taskCursor(t.id, b)
	t.cursors = slices.Delete(t.cursors, 0, i+1)
	t.lastCheckpoint = time.Now()
}

// recordEnd journals a task's end and drops its expiry list, unless the daemon is only
// stopping. end calls it once, without t.mu, with the final document.
func (t *task) recordEnd(state, reason string, doc []byte) {
	if state == taskStateCancelled && reason == reasonShutdown {
		if t.m.lists != nil && t.m.journal == nil { // no resumption: a spooled list goes back
			t.m.lists.release(t.spec, state, reason, t.m.log)
		}
		return
	}
	if t.m.journal != nil {
		t.m.journal.taskEnd(t.id, doc)
	}
	if t.m.lists != nil {
		t.m.lists.release(t.spec, state, reason, t.m.log)
	}
}

// resumeJournaled starts again the tasks a journal replay found, under their old ids,
// from their last checkpoint. Task ids of new tasks continue after theirs.
func (m *taskManager) resumeJournaled(tasks []journalTask) {
	specs := make([]taskSpec, len(tasks))
	ok := make([]bool, len(tasks))
	for i, jt := range tasks {
		var js journaledSpec
		if err := json.Unmarshal(jt.Spec, &js); err != nil {
			m.log.Error("journal: a task spec cannot be read; dropped", "task", jt.ID, "error", err)
			m.journal.taskEnd(jt.ID, nil)
			continue
		}
		specs[i], ok[i] = js.Spec, true
		specs[i].priority, specs[i].scheduled = js.Priority, js.Scheduled
		specs[i].Cursor, specs[i].resumeCounts = decodeCheckpoint(jt.Cursor)
		specs[i].resumed, specs[i].created = true, js.Created
		specs[i].rate = js.Rate
		m.mu.Lock()
		m.nextID = max(m.nextID, taskNumberOf(jt.ID))
		m.mu.Unlock()
	}
	for i, jt := range tasks {
		if !ok[i] {
			continue
		}
		d, err := m.startTaskAs(jt.ID, specs[i])
		if err != nil {
			m.log.Error("journal: a task could not be resumed", "task", jt.ID, "error", err)
			continue
		}
		m.log.Info("journal: task resumed", "task", d.TaskID, "name", d.Name, "kind", d.Kind, "cursor", string(jt.Cursor), "state", d.State)
	}
}

// startSpool starts the expire_dir watcher (owned by the manager: it stops with shutdown).
func (m *taskManager) startSpool() {
	m.mu.Lock()
	cfg := m.cfg
	m.mu.Unlock()
	if cfg.ExpireDir == "" {
		return
	}
	m.wg.Add(1)
	go func() {
		defer m.wg.Done()
		m.runSpool(m.ctx, cfg.ExpireDir, cfg.spoolRange(), cfg.SeedPriority, false)
	}()
}

// newListStore returns where expiry lists are kept: <state_dir>/lists with the journal (so
// that interrupted runs resume), else a directory of its own that cleanup removes.
func newListStore(j *journal, stateDir string) (ls *listStore, cleanup func(), err error) {
	if j != nil {
		return &listStore{dir: filepath.Join(stateDir, "lists")}, func() {}, nil
	}
	dir, err := os.MkdirTemp("", "mapproxy-renderd-lists-")
	if err != nil {
		return nil, nil, err
	}
	return &listStore{dir: dir, volatile: true}, func() { os.RemoveAll(dir) }, nil
}
