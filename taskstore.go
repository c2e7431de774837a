// SPDX-License-Identifier: Apache-2.0

package main

import (
	"encoding/json"
	"slices"
	"strconv"
	"strings"
	"time"
)

// What the journal keeps of tasks beyond specs and cursors, so that a restart forgets
// nothing an operator looks at (docs/design.md §10):
//   - the highest task number handed out: ids are never reused, even when every task that
//     had one is gone from the journal. It is a task-end record of the pseudo task
//     taskNumberID, which a daemon that does not know it takes for the end of a task it does
//     not have: a downgrade reads the journal as before;
//   - the final documents of the last keptFinishedTasks tasks that ended (recTaskEnd's
//     payload): `tasks` lists them after a restart as before it;
//   - with every checkpoint, the task's counts as of its cursor (taskCheckpoint): a
//     resumed task goes on counting from there instead of from zero, and keeps its
//     created and started times.
//
// A task's counts after a crash are those of its last checkpoint plus what it does after
// the restart: the metatiles it repeats (those after the checkpoint) are counted once.

// taskCheckpoint is a checkpoint record's payload: where the task resumes and its counts
// there. Records written before it existed hold a bare cursor; decodeCheckpoint reads both.
type taskCheckpoint struct {
	Version int             `json:"renderd_checkpoint"` // 1; absent in a bare cursor
	Cursor  json.RawMessage `json:"cursor,omitempty"`
	Counts  taskCounted     `json:"counts"`
}

// taskCounted is what a checkpoint restores of a task's document.
type taskCounted struct {
	Planned  uint64      `json:"planned"`
	Done     uint64      `json:"done"`
	Skipped  uint64      `json:"skipped"`
	Failed   uint64      `json:"failed"`
	Deleted  uint64      `json:"deleted"`
	Retried  uint64      `json:"retried"`
	Started  string      `json:"started,omitempty"`
	Errors   []taskError `json:"errors,omitempty"`
	Resumed  int         `json:"resumed,omitempty"` // restarts survived so far
	Progress float64     `json:"progress,omitempty"`
}

// decodeCheckpoint splits a journaled cursor record into the cursor and the counts
// (nil when the record is a bare cursor from an older daemon).
func decodeCheckpoint(b []byte) (json.RawMessage, *taskCounted) {
	if len(b) == 0 {
		return nil, nil
	}
	var cp taskCheckpoint
	if err := json.Unmarshal(b, &cp); err != nil || cp.Version != 1 {
		return b, nil
	}
	if string(cp.Cursor) == "null" {
		cp.Cursor = nil
	}
	return cp.Cursor, &cp.Counts
}

// finishedItem is a metatile that finished after the last checkpoint, and how.
type finishedItem struct {
	seq  uint64
	kind uint8 // finishedDone, ...
}

const (
	finishedDone uint8 = iota
	finishedSkipped
	finishedFailed
	finishedDeleted
)

// noteFinished records how item seq ended, for the counts of a later checkpoint. It runs
// on the task goroutine.
func (t *task) noteFinished(seq uint64, kind uint8) {
	if t.m.journal != nil {
		t.finishedSince = append(t.finishedSince, finishedItem{seq: seq, kind: kind})
	}
}

// countsAt returns the task's counts as of the cursor taken after item seq: the document's
// figures minus the items after seq that have finished already (they are walked again
// after a crash, and counted again then), and forgets the items up to seq. t.mu is held.
func (t *task) countsAt(seq uint64) taskCounted {
	c := taskCounted{Planned: t.plannedBase + seq, Done: t.doc.Done, Skipped: t.doc.Skipped, Failed: t.doc.Failed,
		Deleted: t.doc.Deleted, Retried: t.doc.Retried, Started: t.doc.Started, Errors: t.doc.Errors,
		Resumed: t.resumed, Progress: t.doc.Progress}
	kept := t.finishedSince[:0]
	for _, f := range t.finishedSince {
		if f.seq <= seq {
			continue
		}
		kept = append(kept, f)
		switch f.kind {
		case finishedDone:
			c.Done--
		case finishedSkipped:
			c.Skipped--
		case finishedFailed:
			c.Failed--
		case finishedDeleted:
			c.Deleted--
		}
	}
	t.finishedSince = kept
	return c
}

// restoreCounts sets a resumed task's document from its last checkpoint. It runs before
// the task's goroutine starts.
func (t *task) restoreCounts(c *taskCounted, created string) {
	if created != "" {
		t.doc.Created = created
	}
	t.resumed = 1
	if c == nil {
		return
	}
	t.plannedBase = c.Planned
	t.doc.Planned, t.doc.Done, t.doc.Skipped, t.doc.Failed = c.Planned, c.Done, c.Skipped, c.Failed
	t.doc.Deleted, t.doc.Retried, t.doc.Started = c.Deleted, c.Retried, c.Started
	t.deletedBase = c.Deleted
	t.doc.Progress, t.walkProgress = c.Progress, c.Progress
	if len(c.Errors) > 0 {
		t.doc.Errors = slices.Clone(c.Errors)
	}
	t.resumed = c.Resumed + 1
}

// keepEnded keeps a finished task's document among the last keptFinishedTasks. Caller
// holds mu (apply).
func (j *journal) keepEnded(id string, doc []byte) {
	if len(doc) == 0 {
		return
	}
	j.ended = slices.DeleteFunc(j.ended, func(t journalTask) bool { return t.ID == id })
	if len(j.ended) >= keptFinishedTasks {
		j.ended = slices.Delete(j.ended, 0, len(j.ended)-keptFinishedTasks+1)
	}
	j.ended = append(j.ended, journalTask{ID: id, Spec: slices.Clone(doc)})
}

// taskNumberID is the pseudo task id of the task number record; no task id starts with #.
const taskNumberID = "#task-number"

// taskNumber records the highest task number handed out. It does not wait: the task's
// spec, appended next, waits for the batch that holds both.
func (j *journal) taskNumber(n uint64) {
	if j.beginState() != nil {
		return
	}
	if n > j.taskNum {
		j.appendLocked(encodeTask(nil, recTaskEnd, taskNumberID, strconv.AppendUint(nil, n, 10)))
	}
	j.end(false)
}

// taskNumberOf is the number in a task id ("t12" → 12), or 0.
func taskNumberOf(id string) int {
	n, err := strconv.Atoi(strings.TrimPrefix(id, "t"))
	if err != nil || n < 0 {
		return 0
	}
	return n
}

// restoreFinished lists again the finished tasks a journal replay found, and continues
// the task numbers after the highest one ever handed out. It runs before the resumed tasks
// start, so they stay after these in the list.
func (m *taskManager) restoreFinished(docs []journalTask, highest uint64) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.nextID = max(m.nextID, int(min(highest, 1<<31)))
	for _, jt := range docs {
		var d taskDoc
		if err := json.Unmarshal(jt.Spec, &d); err != nil || !d.finished() || m.tasks[jt.ID] != nil {
			continue
		}
		m.nextID = max(m.nextID, taskNumberOf(jt.ID))
		if d.Errors == nil {
			d.Errors = []taskError{}
		}
		t := &task{m: m, id: jt.ID, doc: d, ended: make(chan struct{}), restored: true,
			spec: taskSpec{Kind: d.Kind, Name: d.Name, priority: d.Priority, scheduled: d.Scheduled}}
		close(t.ended)
		if c, err := time.Parse(time.RFC3339, d.Created); err == nil {
			t.created = c
		}
		m.tasks[t.id] = t
		m.order = append(m.order, t)
	}
	m.forgetOld()
}
