// SPDX-License-Identifier: Apache-2.0

package main

import (
	"bufio"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"
)

// Crash tests (docs/design.md §12): the real daemon (the test binary as "daemon") is SIGKILLed in
// the middle of work and started again on the same state_dir; the fake renderers' job log
// (one line per render, written when the render starts) counts what was rendered.

// crashLogTiles reads a fake renderer job log into render counts per "cache z x y".
func crashLogTiles(t *testing.T, path string) map[string]int {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil && !os.IsNotExist(err) {
		t.Fatal(err)
	}
	out := map[string]int{}
	for _, l := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		if _, rest, ok := strings.Cut(l, " "); ok {
			out[rest]++
		}
	}
	return out
}

// waitQueueEmpty polls the daemon's status until nothing is queued or running.
func waitQueueEmpty(t *testing.T, socket string, deadline time.Duration) statusDoc {
	t.Helper()
	end := time.Now().Add(deadline)
	for {
		c, err := net.Dial("unix", socket)
		if err == nil {
			fmt.Fprintln(c, `{"command":"status","id":"s"}`)
			c.SetReadDeadline(time.Now().Add(10 * time.Second))
			line, _ := bufio.NewReader(c).ReadBytes('\n')
			c.Close()
			var r struct {
				Stats statusDoc `json:"stats"`
			}
			if json.Unmarshal(line, &r) == nil && r.Stats.Queue.Length == 0 && r.Stats.Queue.Running == 0 && r.Stats.Renderers.Ready > 0 {
				return r.Stats
			}
		}
		if time.Now().After(end) {
			t.Fatalf("queue not empty within %s", deadline)
		}
		time.Sleep(50 * time.Millisecond) // polling, bounded by the deadline
	}
}

// TestJournalSIGKILLBackground: 100,000 background requests; the daemon is killed while
// they arrive. After a restart every request that was answered queued is rendered, and
// jobs rendered before the kill are (nearly all) not rendered again.
func TestJournalSIGKILLBackground(t *testing.T) {
	const requests = 100_000
	exe := lcExecutable(t)
	dir := shortTempDir(t)
	sock := dir + "/s.sock"
	gate := lcFIFO(t, dir+"/gate")
	lcConfig(t, dir+"/renderd.yaml", sock, "", 2,
		[]string{exe, "fake-renderer", "-log", dir + "/jobs.log", "-gate", dir + "/gate"}, "")
	p := startLCProc(t, []string{exe, "daemon", "-c", dir + "/renderd.yaml"}, lcEnv(), nil)
	p.out.waitFor(t, "msg=ready", 1)

	c, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	go func() { // the sender; it ends when the connection breaks
		w := bufio.NewWriter(c)
		for i := 0; i < requests; i++ {
			fmt.Fprintf(w, `{"command":"tile","id":"%d","cache_identifier":"crash_GRID","tiles":[[%d,%d,17]],"priority":10,"background":true}`+"\n", i, i%1000, i/1000)
		}
		w.Flush()
	}()
	// Let 500 renders finish, then read acknowledgements until about half are in.
	if _, err := gate.Write(make([]byte, 500)); err != nil {
		t.Fatal(err)
	}
	acked := map[string]bool{}
	r := bufio.NewReader(c)
	for len(acked) < requests/2 {
		c.SetReadDeadline(time.Now().Add(lcDeadline))
		line, err := r.ReadBytes('\n')
		if err != nil {
			t.Fatalf("after %d acknowledgements: %v", len(acked), err)
		}
		var rep struct{ ID, Status string }
		json.Unmarshal(line, &rep)
		if rep.Status != statusQueued {
			t.Fatalf("reply %s, want queued", line)
		}
		i := 0
		fmt.Sscan(rep.ID, &i)
		acked[fmt.Sprintf("crash_GRID 17 %d %d", i%1000, i/1000)] = true
	}
	deadline := time.Now().Add(lcDeadline)
	for len(crashLogTiles(t, dir+"/jobs.log")) < 500 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond) // polling, bounded by the deadline
	}
	p.signal(syscall.SIGKILL)
	p.wait(lcDeadline)
	gate.Close() // renderers blocked on the gate see EOF and exit
	before := crashLogTiles(t, dir+"/jobs.log")
	c.Close()

	// Restart on the same state_dir without the gate.
	lcConfig(t, dir+"/renderd.yaml", sock, "", 4, []string{exe, "fake-renderer", "-log", dir + "/jobs.log"}, "")
	p2 := startLCProc(t, []string{exe, "daemon", "-c", dir + "/renderd.yaml"}, lcEnv(), nil)
	p2.out.waitFor(t, "msg=ready", 1)
	waitQueueEmpty(t, sock, 120*time.Second)
	after := crashLogTiles(t, dir+"/jobs.log")
	missing := 0
	for k := range acked {
		if after[k] == 0 {
			missing++
		}
	}
	if missing > 0 {
		t.Fatalf("%d of %d acknowledged background jobs never rendered", missing, len(acked))
	}
	again := 0
	for k, n := range before {
		if after[k] > n {
			again++
		}
	}
	// Renders that had finished before the kill are retired by done records, which are not
	// waited for: only those of the last unsynced batch can come back, a few at most, plus
	// the renders running at the kill (2 renderers).
	t.Logf("%d acknowledged, %d rendered before the kill, %d of those rendered again, %d distinct after restart",
		len(acked), len(before), again, len(after))
	if again > 50 {
		t.Errorf("%d jobs rendered before the kill were rendered again, want only the last moment's", again)
	}
	p2.signal(syscall.SIGTERM)
	if err := p2.wait(lcDeadline); err != nil {
		t.Errorf("daemon exit: %v", err)
	}
}

// journaledTasks reads the tasks in a daemon's journal (a copy: the daemon keeps writing).
func journaledTasks(t *testing.T, stateDir string) []journalTask {
	t.Helper()
	data, err := os.ReadFile(stateDir + "/journal")
	if err != nil {
		return nil
	}
	tmp := t.TempDir() + "/journal"
	os.WriteFile(tmp, data, 0o600)
	j := newJournalState("", quietLog())
	if _, err := j.replayFile(tmp); err != nil {
		t.Fatal(err)
	}
	_, tasks, _ := j.liveState()
	return tasks
}

// crashTaskRun SIGKILLs the daemon in the middle of a task and checks the restart: the
// task resumes from its journaled cursor, every metatile is rendered, and the only
// metatiles rendered twice are those running at the kill.
func crashTaskRun(t *testing.T, extraYAML, startLine, cursorField string, total int) {
	const renderers, doneBeforeKill = 2, 20_000
	exe := lcExecutable(t)
	dir := shortTempDir(t)
	sock := dir + "/s.sock"
	caches := `{"exp_GRID":{"meta_size":[1,1],"xyz":"nw"}}`
	gate := lcFIFO(t, dir+"/gate")
	lcConfig(t, dir+"/renderd.yaml", sock, "", renderers,
		[]string{exe, "fake-renderer", "-log", dir + "/jobs.log", "-gate", dir + "/gate", "-caches", caches}, extraYAML)
	p := startLCProc(t, []string{exe, "daemon", "-c", dir + "/renderd.yaml"}, lcEnv(), nil)
	p.out.waitFor(t, "msg=ready", 1)
	c := lcDial(t, "unix", sock)
	c.send(startLine)
	rep := c.expectReply("start", statusQueued)
	id := taskOf(t, rep).TaskID
	if _, err := gate.Write(make([]byte, doneBeforeKill)); err != nil {
		t.Fatal(err)
	}
	// Wait until the task's checkpoint has caught up with the finished renders, to within
	// one cursor step (1,000 metatiles): the two renderers race for the gate's bytes, so the
	// finished ones need not be contiguous, and the checkpoint stops at the first one still
	// open. 20,000 renders first: a generous deadline for a loaded machine.
	deadline := time.Now().Add(120 * time.Second)
	var cur map[string]int
	for {
		for _, jt := range journaledTasks(t, dir+"/state") {
			if jt.ID == id {
				c, _ := decodeCheckpoint(jt.Cursor)
				json.Unmarshal(c, &cur)
			}
		}
		if cur[cursorField] >= doneBeforeKill-1000 {
			break
		}
		if time.Now().After(deadline) {
			c.send(`{"command":"task","id":"w","task_id":"` + id + `"}`)
			t.Fatalf("journaled cursor %v, want %s ≥ %d; task %s; %d renders logged", cur, cursorField, doneBeforeKill-1000,
				c.expectReply("w", statusOK).Task, len(crashLogTiles(t, dir+"/jobs.log")))
		}
		time.Sleep(50 * time.Millisecond) // polling the journal, bounded by the deadline
	}
	p.signal(syscall.SIGKILL)
	p.wait(lcDeadline)
	gate.Close()
	before := crashLogTiles(t, dir+"/jobs.log")

	lcConfig(t, dir+"/renderd.yaml", sock, "", 4,
		[]string{exe, "fake-renderer", "-log", dir + "/jobs.log", "-caches", caches}, extraYAML)
	p2 := startLCProc(t, []string{exe, "daemon", "-c", dir + "/renderd.yaml"}, lcEnv(), nil)
	p2.out.waitFor(t, "msg=ready", 1)
	p2.out.waitFor(t, "journal: task resumed", 1)
	deadline = time.Now().Add(120 * time.Second)
	var doc taskDoc
	for {
		c2 := lcDial(t, "unix", sock)
		c2.send(`{"command":"task","id":"w","task_id":"` + id + `"}`)
		doc = taskOf(t, c2.expectReply("w", statusOK))
		c2.c.Close()
		if doc.finished() {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("resumed task not finished: %+v", doc)
		}
		time.Sleep(50 * time.Millisecond) // polling, bounded by the deadline
	}
	if doc.State != taskStateDone {
		t.Fatalf("resumed task %+v, want done", doc)
	}
	after := crashLogTiles(t, dir+"/jobs.log")
	again := 0
	for k, n := range before {
		if after[k] > n {
			again++
		}
	}
	// A journaled cursor was read before the kill; a later one may have been written since.
	// Either way the task resumes after every metatile up to the one read, so only those
	// started after it can repeat: the renders running at the kill and the checkpoint window.
	window := len(before) - cur[cursorField]
	t.Logf("%d rendered before the kill, cursor %v, %d rendered again after it, %d distinct in all", len(before), cur, again, len(after))
	if len(after) != total {
		t.Errorf("%d distinct metatiles rendered, want %d", len(after), total)
	}
	if again > window || again > 1000+renderers {
		t.Errorf("%d metatiles rendered twice, want at most the %d started after the checkpoint (≤ one cursor step + %d running)", again, window, renderers)
	}
	p2.signal(syscall.SIGTERM)
	if err := p2.wait(lcDeadline); err != nil {
		t.Errorf("daemon exit: %v", err)
	}
	if len(journaledTasks(t, dir+"/state")) != 0 {
		t.Error("the finished task is still in the journal")
	}
}

// TestJournalSIGKILLExpireTask: an expiry run of 50,000 lines, killed after 20,000.
func TestJournalSIGKILLExpireTask(t *testing.T) {
	var b strings.Builder
	for i := 0; i < 50_000; i++ {
		fmt.Fprintf(&b, "16/%d/%d\n", i%250, i/250)
	}
	line, _ := json.Marshal(map[string]any{"command": "expire", "id": "start", "cache_identifier": "exp_GRID", "lines": b.String(), "min_zoom": 16})
	crashTaskRun(t, "max_line_bytes: 4194304\n", string(line), "lines", 50_000)
}

// TestJournalSIGKILLSeedTask: a seed task of 50,000 metatiles (fake planner, a cursor every
// 1,000), killed after 20,000.
func TestJournalSIGKILLSeedTask(t *testing.T) {
	dir := t.TempDir()
	seedYAML := dir + "/seed.yaml"
	os.WriteFile(seedYAML, []byte("seeds:\n  all: {caches: [exp]}\n"), 0o644)
	planner, _ := json.Marshal([]string{lcExecutable(t), "fake-planner", "-n", "50000", "-cache", "exp_GRID", "-z", "18", "-cursor-every", "1000"})
	crashTaskRun(t, fmt.Sprintf("seed_config: %s\nplanner_command: %s\n", seedYAML, planner),
		`{"command":"seed","id":"start","task":"all"}`, "next", 50_000)
}
