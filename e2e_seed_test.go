// SPDX-License-Identifier: Apache-2.0

package main

import (
	"encoding/json"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// The daemon's own seed and cleanup tasks (bundled planner, bundled renderers, the common
// queue) against plain mapproxy-seed on a separate cache, with the scenario of
// compareWithMapProxySeed (planner_test.go).
func TestSeedTasksMatchMapProxySeed(t *testing.T) {
	t.Parallel() // minutes of subprocesses: overlap with the other MapProxy tests
	r := newPlannerRig(t)
	socket := filepath.Join(r.dir, "renderd.sock")
	conf := "socket: " + socket + "\nrenderers: 2\nmax_seed_renderers: 2\nrender_timeout: 60s\nseed_config: " + filepath.Join(r.dir, "seed.yaml") + "\nstate_dir: " + filepath.Join(r.dir, "state") + "\n"
	if err := os.WriteFile(filepath.Join(r.dir, "renderd.yaml"), []byte(conf), 0o644); err != nil {
		t.Fatal(err)
	}
	d := runConfiguredDaemon(t, socket, &syncBuffer{}, "-f", filepath.Join(r.dir, "a.yaml"), "-c", filepath.Join(r.dir, "renderd.yaml"))
	tr := &taskRig{testDaemon: d}

	// runTask sends one seed command and waits for the task to end; it must end done.
	runTask := func(t *testing.T, command string) taskDoc {
		d.t = t
		rep := tr.call(command)
		if rep.Status != statusQueued {
			t.Fatalf("%s: got %+v", command, rep)
		}
		id := taskOf(t, rep).TaskID
		deadline := time.Now().Add(3 * time.Minute)
		for {
			rep := tr.call(`{"command":"task","task_id":"` + id + `"}`)
			doc := taskOf(t, rep)
			if doc.finished() {
				if doc.State != taskStateDone || doc.Failed != 0 {
					b, _ := json.Marshal(doc)
					t.Fatalf("%s: task ended %s", command, b)
				}
				return doc
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s: task did not end within 3 minutes: %+v", command, doc)
			}
			time.Sleep(20 * time.Millisecond) // polling the task, bounded by the deadline
		}
	}

	runs := map[string]int{}
	daemonSide := func(t *testing.T, kind, name string) uint64 {
		doc := runTask(t, `{"command":"seed","id":"s","task":"`+name+`"}`)
		if doc.Kind != kind || doc.Progress != 1 {
			t.Errorf("task %s: kind %q progress %v, want %q and 1", name, doc.Kind, doc.Progress, kind)
		}
		if runs[name]++; runs[name] > 1 && name == "geo_union" && doc.Planned != 0 {
			t.Errorf("rerun of %s planned %d metatiles, want 0", name, doc.Planned)
		}
		if kind == "seed" && doc.Done+doc.Skipped != doc.Planned {
			t.Errorf("task %s: planned %d, done %d, skipped %d", name, doc.Planned, doc.Done, doc.Skipped)
		}
		t.Logf("task %s %s: planned %d, rendered %d, skipped %d, deleted %d", kind, name, doc.Planned, doc.Done, doc.Skipped, doc.Deleted)
		return doc.Deleted
	}
	r.compareWithMapProxySeed(t, daemonSide)

	t.Run("an inline seed equals its seed.yaml entry", func(t *testing.T) {
		r.t = t
		before := len(r.tiles("a"))
		runTask(t, `{"command":"seed","seed":{"cache":"inl_cache","levels":{"from":0,"to":6},"bbox":[8,47.5,12,50],"srs":"EPSG:4326"}}`)
		r.mapproxySeed("--seed", "inl_box")
		if n := r.sameTiles("inline inl_box"); n-before < 5 {
			t.Errorf("the inline seed added only %d tiles", n-before)
		}
	})
}
