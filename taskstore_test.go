// SPDX-License-Identifier: Apache-2.0

package main

import (
	"encoding/json"
	"fmt"
	"os"
	"strconv"
	"syscall"
	"testing"
)

// TestJournalKeepsTaskNumberAndFinishedTasks: the journal replays the highest task number
// and the last keptFinishedTasks finished documents, across a snapshot.
func TestJournalKeepsTaskNumberAndFinishedTasks(t *testing.T) {
	dir := t.TempDir()
	j, _, err := openJournal(dir, quietLog())
	if err != nil {
		t.Fatal(err)
	}
	for i := 1; i <= keptFinishedTasks+5; i++ {
		id := "t" + strconv.Itoa(i)
		j.taskNumber(uint64(i))
		if err := j.addTask(id, []byte(`{}`)); err != nil {
			t.Fatal(err)
		}
		j.taskEnd(id, []byte(fmt.Sprintf(`{"task_id":%q,"state":"done"}`, id)))
	}
	j.taskNumber(200) // a task whose spec was never journaled still used its number
	if err := j.sync(); err != nil {
		t.Fatal(err)
	}
	j.close()
	for round := 0; round < 2; round++ { // the replay, then the snapshot it wrote
		j, rep, err := openJournal(dir, quietLog())
		if err != nil {
			t.Fatal(err)
		}
		j.close()
		if rep.TaskNumber != 200 || len(rep.Finished) != keptFinishedTasks || len(rep.Tasks) != 0 {
			t.Fatalf("round %d: task number %d, %d finished, %d live; want 200, %d, 0", round, rep.TaskNumber, len(rep.Finished), len(rep.Tasks), keptFinishedTasks)
		}
		if first, last := rep.Finished[0].ID, rep.Finished[len(rep.Finished)-1].ID; first != "t6" || last != "t105" {
			t.Errorf("round %d: finished %s … %s, want t6 … t105 (the last %d, oldest first)", round, first, last, keptFinishedTasks)
		}
	}
}

// TestTasksSurviveRestarts (README): finished tasks are listed after a restart,
// ids are never reused, and a task stopped by the restart keeps its id, its created and
// started times, and its counts, which go on from its checkpoint.
func TestTasksSurviveRestarts(t *testing.T) {
	exe := lcExecutable(t)
	dir := shortTempDir(t)
	sock := dir + "/s.sock"
	seedYAML := dir + "/seed.yaml"
	os.WriteFile(seedYAML, []byte("seeds:\n  all: {caches: [c]}\n"), 0o644)
	const n = 1000
	planner, _ := json.Marshal([]string{exe, "fake-planner", "-n", strconv.Itoa(n), "-cache", "c_GRID", "-z", "18", "-cursor-every", "1"})
	extra := fmt.Sprintf("seed_config: %s\nplanner_command: %s\nmax_seed_renderers: 2\n", seedYAML, planner)
	rend := []string{exe, "fake-renderer", "-delay", "10ms", "-caches", `{"c_GRID":{"meta_size":[1,1]}}`}
	lcConfig(t, dir+"/renderd.yaml", sock, "", 2, rend, extra)
	argv := []string{exe, "daemon", "-c", dir + "/renderd.yaml"}

	ask := func(line string) Reply {
		t.Helper()
		c := lcDial(t, "unix", sock)
		defer c.c.Close()
		c.send(line)
		return c.read()
	}
	doc := func(id string) taskDoc {
		t.Helper()
		return taskOf(t, ask(`{"command":"task","id":"w","task_id":"`+id+`"}`))
	}
	seed := func() string {
		t.Helper()
		return taskOf(t, ask(`{"command":"seed","id":"s","task":"all"}`)).TaskID
	}

	p := startLCProc(t, argv, lcEnv(), nil)
	p.out.waitFor(t, "msg=ready", 1)
	t1 := seed()
	pollUntil(t, "t1 done", func() bool { return doc(t1).State == taskStateDone })
	t1doc := doc(t1)
	t2 := seed()
	pollUntil(t, "t2 to have rendered 100 and checkpointed", func() bool {
		d := doc(t2)
		return d.Done >= 100
	})
	p.signal(syscall.SIGTERM)
	p.wait(lcDeadline)
	var cp *taskCounted
	for _, jt := range journaledTasks(t, dir+"/state") {
		if jt.ID == t2 {
			_, cp = decodeCheckpoint(jt.Cursor)
		}
	}
	if cp == nil || cp.Done == 0 || cp.Planned < cp.Done {
		t.Fatalf("t2's checkpoint after SIGTERM: %+v, want counts", cp)
	}

	p2 := startLCProc(t, argv, lcEnv(), nil)
	p2.out.waitFor(t, "journal: task resumed", 1)
	if got := doc(t1); got.State != taskStateDone || got.Done != t1doc.Done || got.Planned != n || got.Started != t1doc.Started || got.Finished != t1doc.Finished {
		t.Errorf("finished task after the restart: %+v, before %+v", got, t1doc)
	}
	resumed := doc(t2)
	if resumed.Done < cp.Done || resumed.Started != cp.Started || resumed.TaskID != t2 {
		t.Errorf("resumed task %+v, want its id %s, started %s and done ≥ %d", resumed, t2, cp.Started, cp.Done)
	}
	t3 := seed()
	if t3 == t1 || t3 == t2 || t3 != "t3" {
		t.Errorf("a new task after the restart got id %s, want t3", t3)
	}
	pollUntil(t, "t2 and t3 done", func() bool {
		return doc(t2).State == taskStateDone && doc(t3).State == taskStateDone
	})
	if d := doc(t2); d.Planned != n || d.Done != n {
		t.Errorf("resumed task ended with planned %d done %d, want %d and %d (counts go on from the checkpoint)", d.Planned, d.Done, n, n)
	}
	p2.signal(syscall.SIGTERM)
	p2.wait(lcDeadline)

	p3 := startLCProc(t, argv, lcEnv(), nil)
	p3.out.waitFor(t, "msg=ready", 1)
	var list []taskDoc
	json.Unmarshal(ask(`{"command":"tasks","id":"l"}`).Tasks, &list)
	if len(list) != 3 {
		t.Errorf("tasks after the second restart: %d, want the 3 finished ones", len(list))
	}
	if t4 := seed(); t4 != "t4" {
		t.Errorf("next id %s, want t4", t4)
	}
}
