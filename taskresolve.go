// SPDX-License-Identifier: Apache-2.0

package main

import "encoding/json"

// A seed or cleanup names an entry of seed.yaml, whose times may be relative
// (refresh_before: {days: 7}) and whose file may change. What a task does is fixed when
// it starts: the planner's first line is the entry as MapProxy resolved it (the entry and
// the coverages it names, copied; refresh_before and remove_before as absolute unix
// seconds: worker/mapproxy_worker.py, plan mode), and the task journals its spec again with
// that line in Resolved before it submits a single metatile. A resumed task hands it back to
// the planner, which then walks the same tiles with the same refresh time, however seed.yaml
// was named or has changed, and however long the daemon was down: with a relative
// refresh_before recomputed at the restart, every metatile rendered before the crash
// would count as stale and be rendered again.

// resolve takes the planner's resolved spec. It runs on the task goroutine, which alone
// writes t.spec.Resolved (others read only Name, Kind and Inline).
func (t *task) resolve(resolved json.RawMessage) {
	if t.spec.Resolved != nil {
		return // resumed from a resolved spec: the planner sends none; nothing to change
	}
	t.spec.Resolved = resolved
	if t.m.journal == nil {
		return
	}
	if err := t.m.journal.addTask(t.id, marshalJournaledSpec(t.spec)); err != nil {
		// The spec journaled at the start still resumes the task, re-resolved.
		t.m.log.Warn("journal: the task's resolved spec could not be journaled", "task", t.id, "error", err)
	}
}
