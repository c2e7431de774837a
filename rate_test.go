// SPDX-License-Identifier: Apache-2.0

package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

// Rate limiting end to end (docs/design.md §17), with the fake renderer stamping each job as it
// arrives: windows are measured on the renderers' own clock.

// stamp is one job as a fake renderer saw it arrive.
type stamp struct {
	ns      int64
	cache   string
	z, x, y int
}

func readStamps(t *testing.T, path string) []stamp {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var out []stamp
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		var s stamp
		if _, err := fmt.Sscanf(sc.Text(), "%d %s %d %d %d", &s.ns, &s.cache, &s.z, &s.x, &s.y); err != nil {
			t.Fatalf("stamp line %q: %v", sc.Text(), err)
		}
		out = append(out, s)
	}
	slices.SortFunc(out, func(a, b stamp) int { return int(a.ns - b.ns) })
	return out
}

// windowFigures returns the most jobs in any 2-s window and the span from first to last.
func windowFigures(ss []stamp) (max2s int, span time.Duration) {
	ns := make([]int64, len(ss))
	for i, s := range ss {
		ns[i] = s.ns
	}
	if len(ns) > 0 {
		span = time.Duration(ns[len(ns)-1] - ns[0])
	}
	return maxInWindow(ns, int64(2*time.Second)), span
}

// waitTaskLong is waitTask with room for slow rates on a loaded machine.
func (r *taskRig) waitTaskLong(id, what string, cond func(taskDoc) bool) taskDoc {
	r.t.Helper()
	return r.waitTaskWithin(3*time.Minute, id, what, cond)
}

// waitStatusLong polls the status document until cond holds (3-minute deadline).
func (r *taskRig) waitStatusLong(what string, cond func(statusDoc) bool) statusDoc {
	r.t.Helper()
	deadline := time.Now().Add(3 * time.Minute)
	for {
		st := r.status()
		if cond(st) {
			return st
		}
		if time.Now().After(deadline) {
			r.t.Fatalf("timed out waiting for %s; rate_limit %+v", what, st.RateLimit)
		}
		time.Sleep(20 * time.Millisecond) // polling the daemon's state, bounded by the deadline
	}
}

func rateOf(st statusDoc, cache string) rateCacheDoc {
	for _, c := range st.RateLimit.Caches {
		if c.Cache == cache {
			return c
		}
	}
	return rateCacheDoc{}
}

// TestRateTaskAtFive: a task at rate 5 with four renderers free renders its 60 metatiles
// in at least 11 s (1 token at the start, then 5 a second: 11.8 s), and no 2-s window on
// the renderers' clock has more than 12 (the bucket allows 11).
func TestRateTaskAtFive(t *testing.T) {
	stamps := filepath.Join(t.TempDir(), "stamps")
	r := newTaskRig(t, taskRigOpts{daemonOpts: daemonOpts{renderers: 4, maxSeed: 4, rendArgs: []string{"-stamp-log", stamps}},
		plannerArgs: []string{"-n", "60"}})
	rep := r.call(`{"command":"seed","id":"s","task":"all","rate":5}`)
	d := taskOf(t, rep)
	if rep.Status != statusQueued || d.Rate != 5 {
		t.Fatalf("seed: got %+v", rep)
	}
	held := r.waitTaskLong(d.TaskID, "holding jobs", func(d taskDoc) bool { return d.HeldJobs > 0 || d.finished() })
	if held.HeldJobs == 0 || held.EffectiveRate != 5 {
		t.Errorf("while running: held %d, effective rate %g; want jobs held at 5/s", held.HeldJobs, held.EffectiveRate)
	}
	d = r.waitTaskLong(d.TaskID, "ended", func(d taskDoc) bool { return d.finished() })
	if d.State != taskStateDone || d.Done != 60 {
		t.Fatalf("task: got %+v", d)
	}
	ss := readStamps(t, stamps)
	max2s, span := windowFigures(ss)
	t.Logf("rate 5: %d metatiles over %v, at most %d in any 2-s window", len(ss), span.Round(time.Millisecond), max2s)
	if len(ss) != 60 || span < 11*time.Second || max2s > 12 {
		t.Fatalf("got %d renders over %v with %d in a 2-s window; want 60 over at least 11 s, at most 12 in 2 s", len(ss), span, max2s)
	}
}

// TestBackgroundRateSharedByTasksAndPrefetch: background_rate caps two unlimited tasks
// and the prefetch jobs of live renders together; the live renders are not held.
func TestBackgroundRateSharedByTasksAndPrefetch(t *testing.T) {
	stamps := filepath.Join(t.TempDir(), "stamps")
	r := newTaskRig(t, taskRigOpts{daemonOpts: daemonOpts{renderers: 4, maxSeed: 4,
		rendArgs: []string{"-caches", prefetchCaches, "-stamp-log", stamps}},
		plannerArgs: []string{"-n", "30", "-cache", "c_G", "-x-step", "4", "-x-offset", "second=100000"},
		extraYAML:   "background_rate: {c_G: 5}\nprefetch: {caches: [c_G]}\n"})
	if err := os.WriteFile(r.seedConfig, []byte("seeds:\n  all: {caches: [c]}\n  second: {caches: [c]}\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	a, b := r.seed("all"), r.seed("second")
	// Three live renders at z2, each prefetching its four z3 children (priority 5).
	live := r.dial()
	for i := range 3 {
		live.send(tileReq(fmt.Sprint("live", i), "c_G", 4*i, 0, 2, 100))
	}
	for range 3 {
		if rep := live.read(); rep.Status != statusOK {
			t.Fatalf("live: got %+v", rep)
		}
	}
	for _, id := range []string{a.TaskID, b.TaskID} {
		if d := r.waitTaskLong(id, "ended", func(d taskDoc) bool { return d.finished() }); d.State != taskStateDone || d.Done != 30 {
			t.Fatalf("task: got %+v", d)
		}
	}
	st := r.waitStatusLong("prefetch rendered", func(s statusDoc) bool { return s.Queue.Length == 0 && s.Queue.Running == 0 })
	var bg []stamp
	for _, s := range readStamps(t, stamps) {
		if s.z != 2 { // the live renders are not limited
			bg = append(bg, s)
		}
	}
	max2s, span := windowFigures(bg)
	prefetched := st.Counters["prefetched"] - st.Counters["prefetch_dropped"]
	t.Logf("background_rate 5: %d background metatiles (60 task, %d prefetch) over %v, at most %d in any 2-s window; rate_limit %+v",
		len(bg), prefetched, span.Round(time.Millisecond), max2s, st.RateLimit)
	if prefetched != 12 || len(bg) != 72 {
		t.Fatalf("renders: got %d background, %d prefetched; want 72 and 12", len(bg), prefetched)
	}
	if max2s > 12 || span < 13*time.Second {
		t.Fatalf("got %d in a 2-s window over %v; want at most 12, at least 13 s for 72 at 5/s", max2s, span)
	}
}

// TestLiveRequestDuringHeldTask: while a slow task's jobs are held, a live request for a
// new metatile and one that merges into a held job are both rendered before the task's
// next job: they never wait for a token.
func TestLiveRequestDuringHeldTask(t *testing.T) {
	stamps := filepath.Join(t.TempDir(), "stamps")
	r := newTaskRig(t, taskRigOpts{daemonOpts: daemonOpts{renderers: 2, maxSeed: 2, rendArgs: []string{"-stamp-log", stamps}},
		plannerArgs: []string{"-n", "40"}})
	d := taskOf(t, r.call(`{"command":"seed","id":"s","task":"all","rate":0.5}`))
	r.waitTaskLong(d.TaskID, "holding its jobs", func(d taskDoc) bool { return d.HeldJobs >= 30 })
	live := r.dial()
	live.send(tileReq("new", "c", 5000, 0, 20, 100))
	live.send(tileReq("held", "c", 39, 0, 20, 100)) // the task's last metatile, held
	for range 2 {
		if rep := live.read(); rep.Status != statusOK || (idOf(rep) == "held" && !rep.Merged) {
			t.Fatalf("live: got %+v", rep)
		}
	}
	done := taskOf(t, r.call(`{"command":"task","task_id":"`+d.TaskID+`"}`)).Done
	r.call(`{"command":"cancel","task_id":"` + d.TaskID + `"}`)
	var order []int
	for _, s := range readStamps(t, stamps) {
		order = append(order, s.x)
	}
	t.Logf("renders in order: %v (task had %d done when both live requests were answered)", order, done)
	i39 := slices.Index(order, 39)
	if i39 < 0 || !slices.Contains(order, 5000) {
		t.Fatalf("live renders missing: %v", order)
	}
	// The task's jobs start in order x = 0, 1, …: without the jump x=39 would come last.
	for _, x := range order[:i39] {
		if x >= 30 && x < 39 {
			t.Fatalf("task job x=%d rendered before the merged live job: %v", x, order)
		}
	}
	if done >= 30 {
		t.Fatalf("the live requests were answered only after %d task renders", done)
	}
}

// TestUpstream503HalvesRateThenRecovers: while the upstream answers 503 the cache's rate
// halves (per flight of jobs, down to 0.1/s); the failures are retried without counting
// (seed_retries 0 and seed_max_failure_ratio 0 would end the task at the first counted
// failure); once the upstream recovers, the rate grows back to background_rate. The
// recovery period is shortened to 100 ms (a package variable: this test must not be
// parallel; the parallel MapProxy tests start their daemons only after it).
func TestUpstream503HalvesRateThenRecovers(t *testing.T) {
	old := rateRecoverEvery
	rateRecoverEvery = 100 * time.Millisecond
	t.Cleanup(func() { rateRecoverEvery = old })
	overload := filepath.Join(t.TempDir(), "overloaded")
	if err := os.WriteFile(overload, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	r := newTaskRig(t, taskRigOpts{daemonOpts: daemonOpts{renderers: 2, maxSeed: 2, rendArgs: []string{"-overload-file", overload}},
		plannerArgs: []string{"-n", "100"},
		extraYAML:   "background_rate: {c: 10}\nseed_retries: 0\nseed_max_failure_ratio: 0\nseed_retry_backoff: 10ms\n"})
	d := r.seed("all")
	var trace []string
	note := func(c rateCacheDoc) {
		s := fmt.Sprintf("%.3g", c.EffectiveRate)
		if c.Backoff {
			s += "*"
		}
		if len(trace) == 0 || trace[len(trace)-1] != s {
			trace = append(trace, s)
		}
	}
	st := r.waitStatusLong("a backoff", func(s statusDoc) bool { note(rateOf(s, "c")); return rateOf(s, "c").BackoffEvents >= 1 })
	if c := rateOf(st, "c"); !c.Backoff || c.EffectiveRate > 5 || c.EffectiveRate < minEffectiveRate {
		t.Fatalf("after the first 503: %+v; want backing off at 5/s or less", c)
	}
	// The upstream keeps refusing for a while: each flight of jobs halves the rate again.
	st = r.waitStatusLong("three backoffs", func(s statusDoc) bool { note(rateOf(s, "c")); return rateOf(s, "c").BackoffEvents >= 3 })
	if c := rateOf(st, "c"); c.EffectiveRate > 10.0/8 {
		t.Fatalf("after three backoffs: %+v; want at most 10/8 per second", c)
	}
	os.Remove(overload) // the upstream recovers
	st = r.waitStatusLong("recovered", func(s statusDoc) bool {
		c := rateOf(s, "c")
		note(c)
		return !c.Backoff && c.EffectiveRate == 10
	})
	d = r.waitTaskLong(d.TaskID, "ended", func(d taskDoc) bool { return d.finished() })
	t.Logf("effective rate trace (* backing off): %s; backoffs %d; task %s done %d retried %d failed %d",
		strings.Join(trace, " → "), rateOf(st, "c").BackoffEvents, d.State, d.Done, d.Retried, d.Failed)
	if d.State != taskStateDone || d.Done != 100 || d.Failed != 0 || d.Retried == 0 {
		t.Fatalf("task: got %+v; want done, all 100, the 503s retried uncounted", d)
	}
}

// TestRateOverEveryEntryPoint: rate reaches a task's document from the native seed and
// expire commands, POST /tasks, POST /expire?rate=, the seed and expire CLI and schedules:
// entries; bad rates are refused naming the field.
func TestRateOverEveryEntryPoint(t *testing.T) {
	r := newTaskRig(t, taskRigOpts{daemonOpts: daemonOpts{renderers: 2, maxSeed: 2, tcp: true, rendArgs: []string{"-caches", expireCaches}},
		plannerArgs: []string{"-n", "2", "-cache", "exp_GRID"},
		extraYAML:   "schedules:\n  - {task: all, every: 24h, rate: 3}\n"})
	rateIn := func(what string, rep Reply, want float64) {
		t.Helper()
		if d := taskOf(t, rep); rep.Status != statusQueued || d.Rate != want {
			t.Errorf("%s: got %+v (rate %g), want a task at rate %g", what, rep, d.Rate, want)
		}
	}
	rateIn("native seed", r.call(`{"command":"seed","task":"all","rate":2}`), 2)
	rateIn("native expire", r.call(`{"command":"expire","cache_identifier":"exp_GRID","lines":"1/0/0","rate":1.5}`), 1.5)
	for _, bad := range []string{`-1`, `0`, `"fast"`, `1e9`} {
		for _, cmd := range []string{`{"command":"seed","task":"all","rate":` + bad + `}`,
			`{"command":"expire","cache_identifier":"exp_GRID","lines":"1/0/0","rate":` + bad + `}`} {
			if rep := r.call(cmd); rep.Status != statusError || !strings.Contains(rep.ErrorMessage, "rate") {
				t.Errorf("%s: got %+v, want an error naming rate", cmd, rep)
			}
		}
	}
	post := func(path, body string) (int, Reply) {
		t.Helper()
		resp, err := http.Post("http://"+r.tcp+path, "text/plain", strings.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		var rep Reply
		if err := json.NewDecoder(resp.Body).Decode(&rep); err != nil {
			t.Fatal(err)
		}
		return resp.StatusCode, rep
	}
	_, rep := post("/tasks", `{"task":"all","rate":4}`)
	rateIn("POST /tasks", rep, 4)
	_, rep = post("/expire?cache=exp_GRID&rate=0.5", "1/0/0\n")
	rateIn("POST /expire", rep, 0.5)
	if code, rep := post("/expire?cache=exp_GRID&rate=0", "1/0/0\n"); code != http.StatusBadRequest || !strings.Contains(rep.ErrorMessage, "rate") {
		t.Errorf("POST /expire rate=0: %d %+v", code, rep)
	}
	var out bytes.Buffer
	if err := run(t.Context(), []string{"seed", "--socket", r.socket, "--rate", "2.5", "all"}, &out, io.Discard); err != nil {
		t.Fatal(err)
	}
	var cli Reply
	json.Unmarshal(out.Bytes(), &cli)
	rateIn("seed --rate", cli, 2.5)
	list := filepath.Join(t.TempDir(), "list")
	os.WriteFile(list, []byte("1/0/0\n"), 0o644)
	out.Reset()
	if err := run(t.Context(), []string{"expire", "--socket", r.socket, "--cache", "exp_GRID", "--rate", "7", list}, &out, io.Discard); err != nil {
		t.Fatal(err)
	}
	cli = Reply{}
	json.Unmarshal(out.Bytes(), &cli)
	rateIn("expire --rate", cli, 7)
	// The schedule shows its rate; its runs get it (startScheduled is what the loop calls).
	var scheds []scheduleDoc
	json.Unmarshal(r.call(`{"command":"tasks"}`).Schedules, &scheds)
	if len(scheds) != 1 || scheds[0].Rate != 3 {
		t.Errorf("schedules: got %+v, want one at rate 3", scheds)
	}
}

func TestRateConfigAndJournal(t *testing.T) {
	for _, tc := range []struct{ yaml, want string }{
		{"background_rate: {c: 0}", "background_rate.c"},
		{"background_rate: {c: -2}", "background_rate.c"},
		{"seed_config: /x\nschedules: [{task: a, every: 1h, rate: -1}]", "schedules[0].rate"},
	} {
		err := taskConfigError(tc.yaml)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: got %v, want an error naming %s", tc.yaml, err, tc.want)
		}
	}
	// A task's rate is part of its journaled spec, so a resumed task keeps it.
	var js journaledSpec
	if err := json.Unmarshal(marshalJournaledSpec(taskSpec{Kind: "seed", Name: "all", priority: 10, rate: 2.5}), &js); err != nil || js.Rate != 2.5 {
		t.Fatalf("journaled spec: %+v %v, want rate 2.5", js, err)
	}
}
