// SPDX-License-Identifier: Apache-2.0

package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"testing/synctest"
	"time"
)

// taskRig is a test daemon with the fake planner and a seed.yaml naming "all" (a seed) and
// "drop" (a cleanup).
type taskRig struct {
	*testDaemon
	dir        string
	seedConfig string
	plannerLog string
	jobLines   string
}

type taskRigOpts struct {
	daemonOpts
	plannerArgs []string
	extraYAML   string
}

func newTaskRig(t *testing.T, o taskRigOpts) *taskRig {
	t.Helper()
	dir := t.TempDir()
	r := &taskRig{dir: dir, seedConfig: filepath.Join(dir, "seed.yaml"), plannerLog: filepath.Join(dir, "planner.log"),
		jobLines: filepath.Join(dir, "joblines.log")}
	if err := os.WriteFile(r.seedConfig, []byte("seeds:\n  all: {caches: [c]}\ncleanups:\n  drop: {caches: [c]}\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	planner, _ := json.Marshal(append([]string{os.Args[0], "fake-planner", "-log", r.plannerLog}, o.plannerArgs...))
	o.daemonOpts.extraYAML += fmt.Sprintf("seed_config: %s\nplanner_command: %s\n", r.seedConfig, planner) + o.extraYAML
	o.daemonOpts.rendArgs = append(o.daemonOpts.rendArgs, "-job-lines", r.jobLines)
	r.testDaemon = newTestDaemon(t, o.daemonOpts)
	return r
}

// call sends one native request on a new connection and returns the reply.
func (r *taskRig) call(line string) Reply {
	r.t.Helper()
	cl := r.dial()
	defer cl.c.Close()
	cl.send(line)
	return cl.read()
}

func (r *taskRig) seed(name string) taskDoc {
	r.t.Helper()
	rep := r.call(`{"command":"seed","id":"s","task":"` + name + `"}`)
	if rep.Status != statusQueued {
		r.t.Fatalf("seed %s: got %+v", name, rep)
	}
	return taskOf(r.t, rep)
}

func taskOf(t testing.TB, rep Reply) taskDoc {
	t.Helper()
	var d taskDoc
	if err := json.Unmarshal(rep.Task, &d); err != nil {
		t.Fatalf("reply has no task document: %+v", rep)
	}
	return d
}

// waitTask polls the task until cond holds, failing after 30 s.
func (r *taskRig) waitTask(id, what string, cond func(taskDoc) bool) taskDoc {
	r.t.Helper()
	return r.waitTaskWithin(30*time.Second, id, what, cond)
}

// waitTaskWithin polls the task until cond holds, failing after within.
func (r *taskRig) waitTaskWithin(within time.Duration, id, what string, cond func(taskDoc) bool) taskDoc {
	r.t.Helper()
	deadline := time.Now().Add(within)
	for {
		rep := r.call(`{"command":"task","task_id":"` + id + `"}`)
		if rep.Status != statusOK {
			r.t.Fatalf("task %s: %+v", id, rep)
		}
		d := taskOf(r.t, rep)
		if cond(d) {
			return d
		}
		if time.Now().After(deadline) {
			r.t.Fatalf("timed out waiting for task %s to be %s; it is %+v", id, what, d)
		}
		time.Sleep(5 * time.Millisecond) // polling the daemon's state, bounded by the deadline
	}
}

func (r *taskRig) waitEnded(id string) taskDoc {
	return r.waitTask(id, "ended", func(d taskDoc) bool { return d.finished() })
}

func TestSeedTaskRendersEveryMetatileOnce(t *testing.T) {
	r := newTaskRig(t, taskRigOpts{daemonOpts: daemonOpts{renderers: 4, maxSeed: 2}, plannerArgs: []string{"-n", "300", "-refresh-before", "1700000000.5"}})
	d := r.seed("all")
	if d.Kind != "seed" || d.Name != "all" || d.Priority != 10 {
		t.Fatalf("task document: got %+v, want kind seed, name all, priority 10", d)
	}
	d = r.waitEnded(d.TaskID)
	if d.State != taskStateDone || d.Planned != 300 || d.Done != 300 || d.Failed != 0 || d.Progress != 1 {
		t.Fatalf("final document: got %+v, want done with 300 planned and done", d)
	}
	if d.Started == "" || d.Finished == "" {
		t.Errorf("started/finished missing: %+v", d)
	}
	seen := map[string]int{}
	for _, l := range r.jobLog() {
		f := strings.Fields(l)
		seen[strings.Join(f[1:], " ")]++
	}
	if len(seen) != 300 {
		t.Fatalf("rendered %d distinct metatiles, want 300", len(seen))
	}
	for k, n := range seen {
		if n != 1 {
			t.Errorf("metatile %s rendered %d times, want 1", k, n)
		}
	}
	// The renderer was told not to force, with the seed's refresh_before, as a seed job.
	lines, _ := os.ReadFile(r.jobLines)
	first := strings.SplitN(string(lines), "\n", 2)[0]
	for _, want := range []string{`"refresh":false`, `"refresh_before":1700000000.5`, `"seed":true`} {
		if !strings.Contains(first, want) {
			t.Errorf("job line %s lacks %s", first, want)
		}
	}
	// The planner got the spec: kind, name and the absolute seed.yaml.
	spec, _ := os.ReadFile(r.plannerLog)
	var s taskSpec
	if err := json.Unmarshal(bytes.TrimSpace(spec), &s); err != nil || s.Kind != "seed" || s.Name != "all" || s.SeedConfig != r.seedConfig {
		t.Errorf("planner spec: got %s", spec)
	}
	// The status document lists the task.
	if st := r.status(); len(st.Tasks) != 1 || st.Tasks[0].TaskID != d.TaskID {
		t.Errorf("status tasks: got %+v", st.Tasks)
	}
}

func TestSeedTaskWindowBoundsQueueAndCancelDropsIt(t *testing.T) {
	// A planner with a million metatiles, renders held at the gate: the task keeps exactly
	// seed_window requests in the daemon and reads no further.
	r := newTaskRig(t, taskRigOpts{daemonOpts: daemonOpts{renderers: 2, maxSeed: 2, gate: true},
		plannerArgs: []string{"-n", "1000000"}, extraYAML: "seed_window: 50\n"})
	d := r.seed("all")
	d = r.waitTask(d.TaskID, "at its window", func(d taskDoc) bool { return d.Planned == 50 })
	st := r.waitFor("2 renders running, 48 queued", func(s statusDoc) bool { return s.Queue.Running == 2 && s.Queue.Length == 48 })
	if st.Queue.Length+st.Queue.Running != 50 {
		t.Fatalf("queue: got %+v", st.Queue)
	}
	// A live request merges into one of the task's queued jobs (x=10).
	live := r.dial()
	live.send(tileReq("live", "c", 10, 0, 20, 100))
	r.waitFor("the live request merged", func(s statusDoc) bool { return s.Counters["merged"] == 1 })
	d = r.waitTask(d.TaskID, "still at its window", func(d taskDoc) bool { return true })
	if d.Planned != 50 || d.State != taskStateRunning {
		t.Fatalf("task read past its window: %+v", d)
	}

	rep := r.call(`{"command":"cancel","id":"c1","task_id":"` + d.TaskID + `"}`)
	if rep.Status != statusOK || taskOf(t, rep).State != taskStateCancelled {
		t.Fatalf("cancel: got %+v", rep)
	}
	// Queued task jobs are gone but the live one, which the live request keeps (it moved
	// to the front: priority 100).
	st = r.waitFor("only the live job queued", func(s statusDoc) bool { return s.Queue.Length == 1 })
	if st.Counters["dropped"] != 47 {
		t.Errorf("dropped: got %d, want 47", st.Counters["dropped"])
	}
	r.release(3) // the two running renders, then the live one
	if got := live.read(); got.Status != statusOK || idOf(got) != "live" {
		t.Fatalf("live request: got %+v", got)
	}
	r.waitFor("3 rendered", func(s statusDoc) bool { return s.Counters["rendered"] == 3 })
	if n := len(r.jobLog()); n != 3 {
		t.Errorf("renders: got %d, want 3 (two running at the cancel, one live)", n)
	}
	// The two renders running at the cancel count in the cancelled task's document.
	if d := r.waitTask(d.TaskID, "counting the renders running at the cancel", func(d taskDoc) bool { return d.Done == 2 }); d.State != taskStateCancelled {
		t.Errorf("cancelled task: %+v", d)
	}
	// Cancelling again is a conflict that still shows the document.
	rep = r.call(`{"command":"cancel","task_id":"` + d.TaskID + `"}`)
	if rep.Status != statusError || taskOf(t, rep).State != taskStateCancelled {
		t.Errorf("second cancel: got %+v", rep)
	}
}

func TestSeedTaskRetriesFailedMetatiles(t *testing.T) {
	flaky := t.TempDir()
	r := newTaskRig(t, taskRigOpts{daemonOpts: daemonOpts{renderers: 2, maxSeed: 2, rendArgs: []string{"-flaky", flaky}},
		plannerArgs: []string{"-n", "20"}, extraYAML: "seed_retry_backoff: 10ms\n"})
	d := r.waitEnded(r.seed("all").TaskID)
	if d.State != taskStateDone || d.Done != 20 || d.Retried != 20 || d.Failed != 0 {
		t.Fatalf("got %+v, want done: 20 done after 20 retries", d)
	}
	if n := len(r.jobLog()); n != 40 {
		t.Errorf("renders: got %d, want 40 (each metatile failed once)", n)
	}
}

func TestSeedTaskGivesUpAfterRetriesAndFailsAboveTheRatio(t *testing.T) {
	r := newTaskRig(t, taskRigOpts{daemonOpts: daemonOpts{renderers: 2, maxSeed: 2, rendArgs: []string{"-fail-mod", "4"}},
		plannerArgs: []string{"-n", "400"}, extraYAML: "seed_retry_backoff: 1ms\nseed_retries: 2\nseed_window: 20\n"})
	d := r.waitEnded(r.seed("all").TaskID)
	// Every fourth metatile fails: 25 % > 10 %, noticed once 100 metatiles have finished.
	if d.State != taskStateFailed || !strings.Contains(d.Reason, "seed_max_failure_ratio") {
		t.Fatalf("got %+v, want failed for the failure ratio", d)
	}
	if d.Failed <= 10 || d.Planned >= 400 {
		t.Errorf("got %d failed of %d planned; want more than 10 of the first 100 failed and the task stopped early", d.Failed, d.Planned)
	}
	if len(d.Errors) == 0 || d.Errors[0].CacheIdentifier != "c" || len(d.Errors[0].Tile) != 3 || d.Errors[0].Tile[0]%4 != 0 ||
		!strings.Contains(d.Errors[0].Message, "fake failure") {
		t.Errorf("errors: got %+v", d.Errors)
	}
	// A failed metatile was tried 1 + seed_retries times.
	perTile := map[string]int{}
	for _, l := range r.jobLog() {
		f := strings.Fields(l)
		perTile[f[3]]++
	}
	if perTile["0"] != 3 {
		t.Errorf("metatile x=0 rendered %d times, want 3", perTile["0"])
	}
	// The failed task withdrew its queued jobs.
	r.waitFor("queue empty", func(s statusDoc) bool { return s.Queue.Length == 0 && s.Queue.Running == 0 })
}

func TestSeedTaskBelowTheRatioEndsDoneWithFailures(t *testing.T) {
	r := newTaskRig(t, taskRigOpts{daemonOpts: daemonOpts{renderers: 2, maxSeed: 2, rendArgs: []string{"-fail-mod", "50"}},
		plannerArgs: []string{"-n", "500"}, extraYAML: "seed_retries: 0\n"})
	d := r.waitEnded(r.seed("all").TaskID)
	if d.State != taskStateDone || d.Failed != 10 || d.Done != 490 || len(d.Errors) != 10 {
		t.Fatalf("got %+v, want done with 10 failed (2 %%, under 10 %%)", d)
	}
}

func TestPlannerCrashFailsTheTaskWithItsStderr(t *testing.T) {
	r := newTaskRig(t, taskRigOpts{daemonOpts: daemonOpts{renderers: 2}, plannerArgs: []string{"-n", "100", "-crash-after", "5"}})
	d := r.waitEnded(r.seed("all").TaskID)
	if d.State != taskStateFailed || !strings.Contains(d.Reason, "exited with status 3") || !strings.Contains(d.Reason, "something broke on purpose") {
		t.Fatalf("got %+v, want failed with the exit status and the stderr line", d)
	}
	// The daemon keeps serving.
	if rep := r.call(tileReq("after", "c", 999, 0, 20, 100)); rep.Status != statusOK {
		t.Fatalf("tile after the crash: got %+v", rep)
	}
}

func TestPlannerErrorLineFailsTheTask(t *testing.T) {
	r := newTaskRig(t, taskRigOpts{daemonOpts: daemonOpts{renderers: 1}, plannerArgs: []string{"-error", "coverage foo not found"}})
	d := r.waitEnded(r.seed("all").TaskID)
	if d.State != taskStateFailed || !strings.Contains(d.Reason, "coverage foo not found") {
		t.Fatalf("got %+v", d)
	}
}

func TestCleanupTaskReportsRemovedTiles(t *testing.T) {
	r := newTaskRig(t, taskRigOpts{daemonOpts: daemonOpts{renderers: 1}, plannerArgs: []string{"-n", "37"}})
	d := r.waitEnded(r.seed("drop").TaskID)
	if d.Kind != "cleanup" || d.State != taskStateDone || d.Deleted != 37 || d.Planned != 0 {
		t.Fatalf("got %+v, want a done cleanup with 37 deleted", d)
	}
	if n := len(r.jobLog()); n != 0 {
		t.Errorf("a cleanup rendered %d jobs", n)
	}
}

func TestTaskCommandErrors(t *testing.T) {
	r := newTaskRig(t, taskRigOpts{daemonOpts: daemonOpts{renderers: 1}})
	for _, tc := range []struct{ line, want string }{
		{`{"command":"seed","task":"nope"}`, `no seed or cleanup "nope"`},
		{`{"command":"seed"}`, `seed needs either "task"`},
		{`{"command":"seed","task":"all","seed":{"cache":"c"}}`, `seed needs either "task"`},
		{`{"command":"seed","seed":{"levels":[1]}}`, `"cache" (a cache name of mapproxy.yaml) is required`},
		{`{"command":"seed","seed":[1]}`, `seed must be an object`},
		{`{"command":"seed","task":"all","priority":5000}`, `priority must be an integer`},
		{`{"command":"seed","task":"all","seed_config":"/nonexistent/seed.yaml"}`, `a request names one by its name or by the path renderd.yaml gives it`},
		{`{"command":"task"}`, `task needs task_id`},
		{`{"command":"task","task_id":"t99"}`, `no task "t99"`},
		{`{"command":"cancel","task_id":"t99"}`, `no task "t99"`},
		{`{"command":"cancel","task_id":7}`, `task_id must be a string`},
	} {
		rep := r.call(tc.line)
		if rep.Status != statusError || !strings.Contains(rep.ErrorMessage, tc.want) {
			t.Errorf("%s: got %+v, want error containing %q", tc.line, rep, tc.want)
		}
	}
}

func TestTaskAPIOverHTTPAndCLI(t *testing.T) {
	r := newTaskRig(t, taskRigOpts{daemonOpts: daemonOpts{renderers: 2, maxSeed: 2, tcp: true, gate: true}, plannerArgs: []string{"-n", "5"},
		extraYAML: "schedules:\n  - {task: all, every: 24h}\n"})
	base := "http://" + r.tcp
	do := func(method, path, body string) (int, Reply) {
		t.Helper()
		req, _ := http.NewRequest(method, base+path, strings.NewReader(body))
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		var rep Reply
		if err := json.Unmarshal(b, &rep); err != nil {
			t.Fatalf("%s %s: not JSON: %s", method, path, b)
		}
		return resp.StatusCode, rep
	}
	code, rep := do("POST", "/tasks", `{"task": "all", "priority": 20}`)
	if code != http.StatusCreated || rep.Status != statusQueued {
		t.Fatalf("POST /tasks: %d %+v", code, rep)
	}
	d := taskOf(t, rep)
	if d.Priority != 20 || !strings.HasPrefix(d.TaskID, "t") {
		t.Fatalf("POST /tasks: task %+v", d)
	}
	if code, rep := do("POST", "/tasks", `{"task": "nope"}`); code != http.StatusBadRequest || rep.Status != statusError {
		t.Errorf("POST /tasks unknown name: %d %+v", code, rep)
	}
	if code, rep := do("POST", "/tasks", `{"command": "tile", "task": "all"}`); code != http.StatusBadRequest || rep.Status != statusError {
		t.Errorf("POST /tasks with a command: %d %+v", code, rep)
	}
	code, rep = do("GET", "/tasks", "")
	var list []taskDoc
	var scheds []scheduleDoc
	json.Unmarshal(rep.Tasks, &list)
	json.Unmarshal(rep.Schedules, &scheds)
	if code != 200 || len(list) != 1 || list[0].TaskID != d.TaskID || list[0].NextRun == "" {
		t.Errorf("GET /tasks: %d %+v", code, list)
	}
	if len(scheds) != 1 || scheds[0].Task != "all" || scheds[0].Every != "24h0m0s" || scheds[0].NextRun == "" {
		t.Errorf("GET /tasks schedules: %+v", scheds)
	}
	if code, rep := do("GET", "/tasks/"+d.TaskID, ""); code != 200 || taskOf(t, rep).TaskID != d.TaskID {
		t.Errorf("GET /tasks/id: %d %+v", code, rep)
	}
	if code, _ := do("GET", "/tasks/t404", ""); code != http.StatusNotFound {
		t.Errorf("GET /tasks/t404: %d", code)
	}
	if code, rep := do("DELETE", "/tasks/"+d.TaskID, ""); code != 200 || taskOf(t, rep).State != taskStateCancelled {
		t.Errorf("DELETE: %d %+v", code, rep)
	}
	if code, _ := do("DELETE", "/tasks/"+d.TaskID, ""); code != http.StatusConflict {
		t.Errorf("second DELETE: %d", code)
	}
	if code, _ := do("DELETE", "/tasks/t404", ""); code != http.StatusNotFound {
		t.Errorf("DELETE t404: %d", code)
	}
	r.release(2) // the renders that were running when it was cancelled

	// The CLI: seed --wait ends with exit 0 once the task is done; tasks prints a table.
	go func() { // keep the gate open for the CLI's task
		for i := 0; i < 5; i++ {
			if _, err := r.gate.Write([]byte{0}); err != nil {
				return
			}
		}
	}()
	var out, errOut bytes.Buffer
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	err := run(ctx, []string{"seed", "--socket", r.socket, "--wait", "all"}, &out, &errOut)
	if err != nil || !strings.Contains(out.String(), "all seed done") || !strings.Contains(out.String(), "5/5 metatiles") {
		t.Fatalf("seed --wait: err %v, out %q, stderr %q", err, out.String(), errOut.String())
	}
	out.Reset()
	if err := run(ctx, []string{"tasks", "--socket", r.socket}, &out, &errOut); err != nil || !strings.Contains(out.String(), "cancelled") ||
		!strings.Contains(out.String(), "schedule all every 24h0m0s") {
		t.Errorf("tasks: err %v, out %q", err, out.String())
	}
	out.Reset()
	if err := run(ctx, []string{"cancel", "--socket", r.socket, d.TaskID}, &out, &errOut); err == nil || !strings.Contains(out.String(), "already ended") {
		t.Errorf("cancel of an ended task: err %v, out %q", err, out.String())
	}
	out.Reset()
	if err := run(ctx, []string{"seed", "--socket", r.socket, "nope"}, &out, &errOut); err == nil || !strings.Contains(errOut.String(), `no seed or cleanup "nope"`) {
		t.Errorf("seed nope: err %v, stderr %q", err, errOut.String())
	}
}

func TestSeedWaitExitsNonZeroWhenTheTaskFails(t *testing.T) {
	r := newTaskRig(t, taskRigOpts{daemonOpts: daemonOpts{renderers: 1}, plannerArgs: []string{"-error", "broken coverage"}})
	var out, errOut bytes.Buffer
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	err := run(ctx, []string{"seed", "--socket", r.socket, "--wait", "all"}, &out, &errOut)
	if err == nil || !strings.Contains(out.String(), "failed") || !strings.Contains(out.String(), "broken coverage") {
		t.Fatalf("err %v, out %q", err, out.String())
	}
}

func TestScheduleLoop(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var mu sync.Mutex
		var started []time.Time
		running := false
		l := newScheduleLoop(func(Schedule) bool {
			mu.Lock()
			defer mu.Unlock()
			if running {
				return false
			}
			started = append(started, time.Now())
			return true
		})
		// The loop goroutine is durably blocked whenever synctest.Wait returns; the lock
		// only tells the race detector so.
		starts := func() []time.Time { mu.Lock(); defer mu.Unlock(); return slices.Clone(started) }
		setRunning := func(v bool) { mu.Lock(); running = v; mu.Unlock() }
		t0 := time.Now()
		l.set([]Schedule{{Task: "a", Every: Duration(time.Hour)}})
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan struct{})
		go func() { defer close(done); l.run(ctx) }()
		time.Sleep(3*time.Hour + time.Minute)
		synctest.Wait()
		if started := starts(); len(started) != 3 || !started[0].Equal(t0.Add(time.Hour)) || !started[2].Equal(t0.Add(3*time.Hour)) {
			t.Fatalf("started at %v, want t0+1h, +2h, +3h (t0 %v)", started, t0)
		}
		setRunning(true) // the previous run is still going: the next two are skipped
		time.Sleep(2 * time.Hour)
		synctest.Wait()
		d := l.docs()[0]
		if n := len(starts()); n != 3 || d.Runs != 3 || d.Skipped != 2 {
			t.Fatalf("got %d starts, doc %+v; want 3 runs and 2 skipped", n, d)
		}
		if want := t0.Add(6 * time.Hour).Format(time.RFC3339); d.NextRun != want || l.nextRuns()["a"] != want {
			t.Errorf("next run %s, want %s", d.NextRun, want)
		}
		setRunning(false)
		// Daily at a time of day: the next 03:00 local, then every day.
		l.set([]Schedule{{Task: "b", At: "03:00"}})
		now := time.Now()
		next := time.Date(now.Year(), now.Month(), now.Day(), 3, 0, 0, 0, time.Local)
		if !next.After(now) {
			next = next.AddDate(0, 0, 1)
		}
		time.Sleep(next.Sub(now) + 24*time.Hour)
		synctest.Wait()
		if started := starts(); len(started) != 5 || !started[3].Equal(next) || !started[4].Equal(next.AddDate(0, 0, 1)) {
			t.Fatalf("started at %v, want %v and a day later", starts(), next)
		}
		cancel()
		<-done
	})
}

func TestNextRunDoesNotCatchUp(t *testing.T) {
	t0 := time.Date(2026, 1, 1, 12, 0, 0, 0, time.UTC)
	s := Schedule{Task: "a", Every: Duration(time.Hour)}
	if got := nextRun(s, t0, t0.Add(time.Minute)); !got.Equal(t0.Add(time.Hour)) {
		t.Errorf("on time: got %v", got)
	}
	if got := nextRun(s, t0, t0.Add(5*time.Hour)); !got.Equal(t0.Add(6 * time.Hour)) {
		t.Errorf("late by 5h: got %v, want one interval after now", got)
	}
	both := Schedule{Task: "a", Every: Duration(6 * time.Hour), At: "03:00"}
	first := firstRun(both, time.Date(2026, 1, 1, 12, 0, 0, 0, time.Local))
	if want := time.Date(2026, 1, 2, 3, 0, 0, 0, time.Local); !first.Equal(want) {
		t.Errorf("first run of at+every: got %v, want %v", first, want)
	}
	if got := nextRun(both, first, first); !got.Equal(first.Add(6 * time.Hour)) {
		t.Errorf("then every 6h: got %v", got)
	}
}

func TestTaskConfigValidation(t *testing.T) {
	for _, tc := range []struct{ yaml, want string }{
		{"seed_window: 0", "seed_window"},
		{"seed_retries: -1", "seed_retries"},
		{"seed_max_failure_ratio: 1.5", "seed_max_failure_ratio"},
		{"seed_priority: 2000", "seed_priority"},
		{"seed_retry_backoff: -1s", "seed_retry_backoff"},
		{"planner_command: ['']", "planner_command"},
		{"schedules: [{task: a, every: 1h}]", "schedules: need seed_config"},
		{"seed_config: /x\nschedules: [{every: 1h}]", "schedules[0].task"},
		{"seed_config: /x\nschedules: [{task: a}]", "set every, at, or both"},
		{"seed_config: /x\nschedules: [{task: a, at: '25:00'}]", "schedules[0].at"},
		{"seed_config: /x\nschedules: [{task: a, every: 10ms}]", "schedules[0].every"},
		{"seed_config: /x\nschedules: [{task: a, evry: 1h}]", "evry"},
	} {
		err := taskConfigError(tc.yaml)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: got %v, want an error naming %s", tc.yaml, err, tc.want)
		}
	}
}

func TestCheckConfigValidatesScheduledNames(t *testing.T) {
	dir := t.TempDir()
	seed := filepath.Join(dir, "seed.yaml")
	os.WriteFile(seed, []byte("seeds:\n  all: {caches: [c]}\ncleanups:\n  drop: {caches: [c]}\n"), 0o644)
	for _, tc := range []struct{ yaml, want string }{
		{"schedules: [{task: all, every: 1h}, {task: drop, at: '03:00'}]", "ok: "},
		{"schedules: [{task: nope, every: 1h}]", `schedules[0].task: no seed or cleanup "nope"`},
	} {
		cfgPath := filepath.Join(dir, "renderd.yaml")
		os.WriteFile(cfgPath, []byte("renderer_command: [/bin/true]\nplanner_command: [/bin/true]\nsocket: "+dir+"/s.sock\nseed_config: "+seed+"\n"+tc.yaml+"\n"), 0o644)
		var out bytes.Buffer
		err := run(context.Background(), []string{"check-config", "-c", cfgPath}, &out, io.Discard)
		got := out.String()
		if err != nil {
			got = err.Error()
		}
		if !strings.Contains(got, tc.want) {
			t.Errorf("%s: got %q, want %q", tc.yaml, got, tc.want)
		}
	}
}

// BenchmarkSeedTask measures the task path's own cost: a planner (the fake one, as fast as
// a pipe) streaming b.N metatiles through the task, the queue and 4 no-op renderers.
func BenchmarkSeedTask(b *testing.B) {
	dir := b.TempDir()
	seed := filepath.Join(dir, "seed.yaml")
	os.WriteFile(seed, []byte("seeds:\n  all: {caches: [c]}\n"), 0o644)
	planner, _ := json.Marshal([]string{os.Args[0], "fake-planner", "-n", fmt.Sprint(b.N)})
	d := newTestDaemon(b, daemonOpts{renderers: 4, maxSeed: -1,
		extraYAML: fmt.Sprintf("log_level: warn\nseed_config: %s\nplanner_command: %s\n", seed, planner)})
	r := &taskRig{testDaemon: d}
	cl := r.dial()
	b.ResetTimer()
	start := time.Now()
	cl.send(`{"command":"seed","task":"all"}`)
	id := taskOf(b, cl.read()).TaskID
	var doc taskDoc
	for {
		cl.send(`{"command":"task","task_id":"` + id + `"}`)
		doc = taskOf(b, cl.read())
		if doc.finished() {
			break
		}
		time.Sleep(20 * time.Millisecond) // polling for the end; the figure is the task's wall time
	}
	el := time.Since(start)
	if doc.State != taskStateDone || doc.Done != uint64(b.N) {
		b.Fatalf("task: %+v", doc)
	}
	b.ReportMetric(float64(b.N)/el.Seconds(), "metatiles/s")
}

// BenchmarkLiveBehindSeedTask: with the bench setup (4 renderers, at most 2 seeding) and
// 50 ms renders, a running seed task keeps 2 renderers busy; each live request's latency
// beyond its own render time is what the seed costs it (goal: at most 2 ms).
func BenchmarkLiveBehindSeedTask(b *testing.B) {
	dir := b.TempDir()
	seed := filepath.Join(dir, "seed.yaml")
	os.WriteFile(seed, []byte("seeds:\n  all: {caches: [c]}\n"), 0o644)
	planner, _ := json.Marshal([]string{os.Args[0], "fake-planner", "-n", "1000000"})
	d := newTestDaemon(b, daemonOpts{renderers: 4, maxSeed: 2, rendArgs: []string{"-delay", "50ms"},
		extraYAML: fmt.Sprintf("log_level: warn\nseed_config: %s\nplanner_command: %s\n", seed, planner)})
	r := &taskRig{testDaemon: d}
	id := taskOf(b, r.call(`{"command":"seed","task":"all"}`)).TaskID
	r.waitTask(id, "rendering", func(t taskDoc) bool { return t.Done > 4 })
	cl := r.dial()
	over := make([]float64, 0, b.N)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		t0 := time.Now()
		cl.send(tileReq("l", "live", i, 1, 15, 100))
		rep := cl.read()
		el := float64(time.Since(t0).Microseconds()) / 1000
		if rep.Status != statusOK || rep.RenderMS == nil {
			b.Fatalf("live: %+v", rep)
		}
		over = append(over, el-*rep.RenderMS)
	}
	b.StopTimer()
	slices.Sort(over)
	b.ReportMetric(over[len(over)/2], "overhead-p50-ms")
	b.ReportMetric(over[len(over)*99/100], "overhead-p99-ms")
	if st := r.status(); st.Renderers.BusySeed > 2 {
		b.Errorf("seed renders: %d busy, want at most 2", st.Renderers.BusySeed)
	}
	r.call(`{"command":"cancel","task_id":"` + id + `"}`)
}

func TestSeedWaitOutlastsTheTimeoutOfOneExchange(t *testing.T) {
	r := newTaskRig(t, taskRigOpts{daemonOpts: daemonOpts{renderers: 1, maxSeed: 1, gate: true}, plannerArgs: []string{"-n", "1"}})
	done := make(chan error, 1)
	var out bytes.Buffer
	go func() {
		done <- run(context.Background(), []string{"seed", "--socket", r.socket, "--wait", "--timeout", "300ms", "all"}, &out, io.Discard)
	}()
	start := time.Now()
	r.waitFor("the CLI's task running", func(s statusDoc) bool { return len(s.Tasks) == 1 && s.Tasks[0].State == taskStateRunning })
	// What is tested is wall time passing beyond the CLI's 300 ms: not a synchronisation,
	// the render stays held at the gate meanwhile.
	<-time.After(time.Until(start.Add(1200 * time.Millisecond)))
	r.release(1)
	select {
	case err := <-done:
		if err != nil || !strings.Contains(out.String(), "done") {
			t.Fatalf("seed --wait: %v, output %q", err, out.String())
		}
	case <-time.After(30 * time.Second):
		t.Fatal("seed --wait did not return")
	}
}

// taskConfigError parses yaml over the defaults (with a renderer and a MapProxy
// configuration set) and validates it: the error a renderd.yaml with these keys gets.
func taskConfigError(yaml string) error {
	c := defaultConfig()
	c.RendererCommand = []string{"/bin/true"}
	c.MapProxyConfig = "/etc/mapproxy/mapproxy.yaml"
	if err := parseConfig(&c, strings.NewReader(yaml)); err != nil {
		return err
	}
	return c.Validate()
}
