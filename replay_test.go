// SPDX-License-Identifier: Apache-2.0

package main

import (
	"bufio"
	"encoding/json"
	"fmt"
	"syscall"
	"testing"
	"time"
)

// TestJournalReplayOverMaxQueued (docs/design.md §8, §12): 200 background jobs are acknowledged
// while the one renderer hangs, the daemon is SIGKILLed and restarted with max_queued 10.
// Every acknowledged job is rendered after the restart: none is dropped as busy.
func TestJournalReplayOverMaxQueued(t *testing.T) {
	const jobs = 200
	exe := lcExecutable(t)
	dir := shortTempDir(t)
	sock := dir + "/s.sock"
	gate := lcFIFO(t, dir+"/gate")
	lcConfig(t, dir+"/renderd.yaml", sock, "", 1,
		[]string{exe, "fake-renderer", "-log", dir + "/jobs.log", "-gate", dir + "/gate"}, "")
	p := startLCProc(t, []string{exe, "daemon", "-c", dir + "/renderd.yaml"}, lcEnv(), nil)
	p.out.waitFor(t, "msg=ready", 1)
	c := lcDial(t, "unix", sock)
	w := bufio.NewWriter(c.c)
	for i := 0; i < jobs; i++ {
		fmt.Fprintf(w, `{"command":"tile","id":"%d","cache_identifier":"r_GRID","tiles":[[%d,0,12]],"priority":10,"background":true}`+"\n", i, i)
	}
	w.Flush()
	r := bufio.NewReader(c.c)
	for i := 0; i < jobs; i++ {
		c.c.SetReadDeadline(time.Now().Add(lcDeadline))
		line, err := r.ReadBytes('\n')
		if err != nil {
			t.Fatalf("after %d acknowledgements: %v", i, err)
		}
		var rep Reply
		if json.Unmarshal(line, &rep); rep.Status != statusQueued {
			t.Fatalf("reply %s, want queued", line)
		}
	}
	p.signal(syscall.SIGKILL)
	p.wait(lcDeadline)
	gate.Close()
	c.c.Close()
	before := crashLogTiles(t, dir+"/jobs.log")

	lcConfig(t, dir+"/renderd.yaml", sock, "", 2, []string{exe, "fake-renderer", "-log", dir + "/jobs.log"}, "max_queued: 10\n")
	p2 := startLCProc(t, []string{exe, "daemon", "-c", dir + "/renderd.yaml"}, lcEnv(), nil)
	p2.out.waitFor(t, "msg=ready", 1)
	waitQueueEmpty(t, sock, lcDeadline)
	after := crashLogTiles(t, dir+"/jobs.log")
	replayed := 0
	for i := 0; i < jobs; i++ {
		k := fmt.Sprintf("r_GRID 12 %d 0", i)
		if after[k] > before[k] {
			replayed++
		}
	}
	t.Logf("%d jobs accepted, %d rendered after the restart with max_queued 10", jobs, replayed)
	if replayed != jobs {
		t.Errorf("%d of %d accepted jobs rendered after the restart, want all", replayed, jobs)
	}
	p2.signal(syscall.SIGTERM)
	if err := p2.wait(lcDeadline); err != nil {
		t.Errorf("daemon exit: %v", err)
	}
}
