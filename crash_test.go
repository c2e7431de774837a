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

// Crash tests (DESIGN §12): the real daemon (the test binary as "daemon") is SIGKILLed in
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
