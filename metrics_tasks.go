// SPDX-License-Identifier: Apache-2.0

package main

import "slices"

// Task figures for metrics and the status document. The task manager forgets old finished
// tasks (keptFinishedTasks), so its running totals are the forgotten tasks' figures, kept
// when they are forgotten, plus the figures of the tasks it still lists; both are read under
// its lock at once, so a task is counted exactly once and every total only grows.

// taskKinds and the result names are the label values of the task metrics.
var (
	taskKinds        = []string{"seed", "cleanup", "expire"}
	taskEndStates    = []string{taskStateDone, taskStateFailed, taskStateCancelled}
	taskActiveStates = []string{taskStateQueued, taskStatePlanning, taskStateRunning}
	taskTileResults  = []string{"done", "skipped", "failed", "deleted", "retried"}
)

// taskCounts are totals over tasks, by kind (taskKinds order).
type taskCounts struct {
	started  [3]uint64    // every task ever created
	finished [3][3]uint64 // by taskEndStates
	tiles    [3][5]uint64 // by taskTileResults
}

// add counts one task's document.
func (c *taskCounts) add(d taskDoc) {
	k := slices.Index(taskKinds, d.Kind)
	if k < 0 {
		return
	}
	c.started[k]++
	if s := slices.Index(taskEndStates, d.State); s >= 0 {
		c.finished[k][s]++
	}
	for r, v := range [5]uint64{d.Done, d.Skipped, d.Failed, d.Deleted, d.Retried} {
		c.tiles[k][r] += v
	}
}

// taskView is what metrics and the status document show of the tasks.
type taskView struct {
	totals taskCounts
	active []taskDoc // not finished, newest first
}

// view returns the totals over every task since the daemon started and the active tasks.
// A nil manager (no tasks configured) has none.
func (m *taskManager) view() taskView {
	var v taskView
	if m == nil {
		return v
	}
	m.mu.Lock()
	ts := slices.Clone(m.order)
	v.totals = m.forgotten
	m.mu.Unlock()
	for i := len(ts) - 1; i >= 0; i-- {
		d := ts[i].snapshot()
		if ts[i].restored {
			continue // counted by the daemon that ran it; never active
		}
		v.totals.add(d)
		if !d.finished() {
			v.active = append(v.active, d)
		}
	}
	return v
}

// taskTotalsDoc is the status document's task_totals: the figures of the task counters.
type taskTotalsDoc struct {
	Started  map[string]uint64            `json:"started"`  // by kind
	Finished map[string]map[string]uint64 `json:"finished"` // by kind, then end state
	Tiles    map[string]map[string]uint64 `json:"tiles"`    // by kind, then result
}

func (c *taskCounts) doc() taskTotalsDoc {
	d := taskTotalsDoc{Started: map[string]uint64{}, Finished: map[string]map[string]uint64{}, Tiles: map[string]map[string]uint64{}}
	for k, kind := range taskKinds {
		d.Started[kind] = c.started[k]
		d.Finished[kind] = map[string]uint64{}
		for s, st := range taskEndStates {
			d.Finished[kind][st] = c.finished[k][s]
		}
		d.Tiles[kind] = map[string]uint64{}
		for r, res := range taskTileResults {
			d.Tiles[kind][res] = c.tiles[k][r]
		}
	}
	return d
}

// appendTaskMetrics writes the task families: counters pre-initialised for every kind, and
// per active task its progress, rate and ETA.
func appendTaskMetrics(b []byte, v taskView) []byte {
	w := &promWriter{b: b}
	w.family("tasks_started_total", "counter", "Tasks created (seed, cleanup, expire), scheduled ones included.")
	for k, kind := range taskKinds {
		w.counter("tasks_started_total", v.totals.started[k], "kind", kind)
	}
	w.family("tasks_finished_total", "counter", "Tasks that ended, by kind and final state.")
	for k, kind := range taskKinds {
		for s, st := range taskEndStates {
			w.counter("tasks_finished_total", v.totals.finished[k][s], "kind", kind, "state", st)
		}
	}
	w.family("task_metatiles_total", "counter", "Metatiles tasks finished, by kind and result: done (rendered), skipped (already fresh), failed (after retries), deleted (cleanup: tiles removed), retried (attempts repeated).")
	for k, kind := range taskKinds {
		for r, res := range taskTileResults {
			w.counter("task_metatiles_total", v.totals.tiles[k][r], "kind", kind, "result", res)
		}
	}
	var active [3][3]int
	for _, d := range v.active {
		k, s := slices.Index(taskKinds, d.Kind), slices.Index(taskActiveStates, d.State)
		if k >= 0 && s >= 0 {
			active[k][s]++
		}
	}
	w.family("tasks_active", "gauge", "Tasks not finished, by kind and state.")
	for k, kind := range taskKinds {
		for s, st := range taskActiveStates {
			w.sample("tasks_active", float64(active[k][s]), "kind", kind, "state", st)
		}
	}
	w.family("task_progress_ratio", "gauge", "Progress of an active task, 0 to 1: metatiles finished over the estimated total (cleanup: the walk).")
	for _, d := range v.active {
		w.sample("task_progress_ratio", taskFraction(d), "task_id", d.TaskID, "name", d.Name, "kind", d.Kind)
	}
	w.family("task_rate_per_second", "gauge", "Metatiles an active task finished per second over the last minute.")
	for _, d := range v.active {
		w.sample("task_rate_per_second", d.RatePerS, "task_id", d.TaskID, "name", d.Name, "kind", d.Kind)
	}
	w.family("task_rate_limit_per_second", "gauge", "Metatiles per second an active task with a rate may start now: its rate, lowered by its cache's backoff (docs/design.md §17).")
	for _, d := range v.active {
		if d.EffectiveRate > 0 {
			w.sample("task_rate_limit_per_second", d.EffectiveRate, "task_id", d.TaskID, "name", d.Name, "kind", d.Kind)
		}
	}
	w.family("task_eta_seconds", "gauge", "Estimated seconds until an active task ends (only while it can be estimated).")
	for _, d := range v.active {
		if d.EtaS != nil {
			w.sample("task_eta_seconds", *d.EtaS, "task_id", d.TaskID, "name", d.Name, "kind", d.Kind)
		}
	}
	return w.b
}

// taskFraction is how far a task is, 0 to 1: for seeds and expiry runs the metatiles
// finished over the estimated total (the walk's own progress says how much was planned,
// not rendered); for cleanups, which render nothing, the walk's progress.
func taskFraction(d taskDoc) float64 {
	if d.State == taskStateDone {
		return 1
	}
	if d.Kind == "cleanup" || d.TotalEstimate == 0 {
		return d.Progress
	}
	return min(float64(d.Done+d.Skipped+d.Failed)/float64(d.TotalEstimate), 1)
}

// etaText formats a task's ETA for people.
func etaText(d taskDoc) string {
	if d.EtaS == nil {
		return ""
	}
	return fmtSeconds(*d.EtaS)
}
