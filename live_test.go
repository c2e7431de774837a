// SPDX-License-Identifier: Apache-2.0

package main

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestWaitMSPending: a request with wait_ms whose render has not finished by then gets
// pending; the job goes on, is rendered once and counted, and a later request for the same
// metatile joins it while it runs.
func TestWaitMSPending(t *testing.T) {
	d := newTestDaemon(t, daemonOpts{renderers: 1, maxSeed: -1, gate: true})
	cl := d.dial()
	cl.send(`{"command":"tile","id":"w","cache_identifier":"c_G","tiles":[[4,5,6]],"priority":100,"wait_ms":30}`)
	r := cl.read()
	if idOf(r) != "w" || r.Status != statusPending {
		t.Fatalf("got %+v, want w pending", r)
	}
	doc := d.status()
	if doc.Counters["pending"] != 1 || doc.Renderers.Busy != 1 || doc.Counters["rendered"] != 0 {
		t.Fatalf("after pending: counters %v, busy %d; want pending 1, busy 1, rendered 0", doc.Counters, doc.Renderers.Busy)
	}
	// A second client asks for the same tile while it renders: it joins the running job.
	cl.send(`{"command":"tile","id":"again","cache_identifier":"c_G","tiles":[[4,5,6]],"priority":100}`)
	d.waitFor("second request merged", func(s statusDoc) bool { return s.Counters["merged"] == 1 })
	d.release(1)
	if r := cl.read(); idOf(r) != "again" || r.Status != statusOK || !r.Merged {
		t.Fatalf("got %+v, want again ok merged", r)
	}
	d.waitFor("render counted", func(s statusDoc) bool { return s.Counters["rendered"] == 1 })
	if n := len(d.jobLog()); n != 1 {
		t.Errorf("renders: got %d, want 1", n)
	}

	// A wait_ms longer than the render: ok as usual. wait_ms 0 on a queued job: pending at
	// once, and the job is still rendered when its turn comes.
	cl.send(`{"command":"tile","id":"long","cache_identifier":"c_G","tiles":[[8,8,6]],"wait_ms":60000}`)
	d.waitFor("long running", func(s statusDoc) bool { return s.Renderers.Busy == 1 })
	cl.send(`{"command":"tile","id":"zero","cache_identifier":"c_G","tiles":[[12,8,6]],"wait_ms":0}`)
	if r := cl.read(); idOf(r) != "zero" || r.Status != statusPending {
		t.Fatalf("got %+v, want zero pending", r)
	}
	d.release(1)
	if r := cl.read(); idOf(r) != "long" || r.Status != statusOK {
		t.Fatalf("got %+v, want long ok", r)
	}
	d.release(1)
	d.waitFor("the pending job rendered", func(s statusDoc) bool { return s.Counters["rendered"] == 3 })
	if log := d.jobLog(); len(log) != 3 || !strings.HasSuffix(log[2], " 6 12 8") {
		t.Errorf("job log: got %q, want 3 renders, the last 6 12 8", log)
	}
}

// TestHTTPWait: with http_wait, MapProxy's POST gets pending once the render takes longer;
// without a slow render it gets ok.
func TestHTTPWait(t *testing.T) {
	d := newTestDaemon(t, daemonOpts{renderers: 1, maxSeed: -1, gate: true, tcp: true, extraYAML: "http_wait: 1s\n"})
	got := postMapProxy(t, d.tcp, "/", "c_G", 1, 1, 3, 100)
	if got["status"] != statusPending {
		t.Fatalf("got %v, want pending", got)
	}
	d.release(1)
	d.waitFor("render counted", func(s statusDoc) bool { return s.Counters["rendered"] == 1 })
	d.release(1) // the next render may finish at once
	if got := postMapProxy(t, d.tcp, "/", "c_G", 2, 2, 3, 100); got["status"] != statusOK {
		t.Fatalf("got %v, want ok", got)
	}
}

func TestLiveFieldsBadInput(t *testing.T) {
	d := newTestDaemon(t, daemonOpts{renderers: 1})
	cl := d.dial()
	for _, tc := range []struct{ line, want string }{
		{`{"command":"tile","id":"a","cache_identifier":"c","tiles":[[1,1,1]],"wait_ms":-1}`, "wait_ms must be an integer"},
		{`{"command":"tile","id":"b","cache_identifier":"c","tiles":[[1,1,1]],"wait_ms":"5"}`, "wait_ms must be an integer"},
		{fmt.Sprintf(`{"command":"tile","id":"c","cache_identifier":"c","tiles":[[1,1,1]],"wait_ms":%d}`, maxWaitMS+1), "wait_ms must be an integer"},
		{`{"command":"tile","id":"d","cache_identifier":"c","tiles":[[1,1,1]],"refresh":1}`, "refresh must be true or false"},
	} {
		cl.send(tc.line)
		r := cl.read()
		if r.Status != statusError || !strings.Contains(r.ErrorMessage, tc.want) {
			t.Errorf("%s: got %+v, want error containing %q", tc.line, r, tc.want)
		}
	}
	cl.send(`{"command":"tile","id":"e","cache_identifier":"c","tiles":[[1,1,1]],"background":true,"refresh":true}`)
	if r := cl.read(); r.Status != statusQueued {
		t.Errorf("background refresh: got %+v, want queued", r)
	}
}

// procPriority returns the niceness of every thread of pid (from /proc/<pid>/task/*/stat)
// and whether every thread is in the idle I/O class (ioprio_get).
func procPriority(t *testing.T, pid int) (nices []int, ioIdle bool) {
	t.Helper()
	ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
	if err != nil {
		t.Fatal(err)
	}
	ioIdle = true
	for _, e := range ents {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%s/stat", pid, e.Name()))
		if err != nil {
			continue // the thread exited
		}
		// Fields after the command (which may hold spaces) start after the last ')'.
		f := strings.Fields(string(b[bytes.LastIndexByte(b, ')')+1:]))
		n, err := strconv.Atoi(f[16]) // field 19 of stat(5): nice
		if err != nil {
			t.Fatalf("stat of %d/%s: %v", pid, e.Name(), err)
		}
		nices = append(nices, n)
		tid, _ := strconv.Atoi(e.Name())
		v, _, errno := unix.Syscall(unix.SYS_IOPRIO_GET, ioprioWhoProcess, uintptr(tid), 0)
		if errno != 0 {
			t.Fatalf("ioprio_get %d: %v", tid, errno)
		}
		if v>>ioprioClassShift != ioprioClassIdle {
			ioIdle = false
		}
	}
	return nices, ioIdle
}

// lastJobPID waits for the n-th job log line and returns its renderer's pid.
func lastJobPID(t *testing.T, d *testDaemon, n int) int {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		if log := d.jobLog(); len(log) >= n {
			pid, err := strconv.Atoi(strings.Fields(log[n-1])[0])
			if err != nil {
				t.Fatal(err)
			}
			return pid
		}
		if time.Now().After(deadline) {
			t.Fatalf("no job %d in the log", n)
		}
		time.Sleep(5 * time.Millisecond) // polling the renderer's job log, bounded by the deadline
	}
}

func wantPriority(t *testing.T, what string, pid, nice int, ioIdle bool) {
	t.Helper()
	nices, idle := procPriority(t, pid)
	for _, n := range nices {
		if n != nice {
			t.Errorf("%s: renderer %d thread niceness: got %v, want all %d", what, pid, nices, nice)
			break
		}
	}
	if idle != ioIdle {
		t.Errorf("%s: renderer %d idle I/O class: got %v, want %v", what, pid, idle, ioIdle)
	}
}

// TestSeedNice: a renderer runs a seed job at seed_nice in the idle I/O class and the next
// live job back at the daemon's niceness, every thread of it.
func TestSeedNice(t *testing.T) {
	if baseNice != 0 {
		t.Fatalf("the test process runs at niceness %d; run it at 0", baseNice)
	}
	if !canLowerNice() {
		t.Fatalf("this test needs CAP_SYS_NICE or RLIMIT_NICE 20 (TestSeedNiceUnprivileged covers the rest)")
	}
	d := newTestDaemon(t, daemonOpts{renderers: 1, maxSeed: -1, gate: true, extraYAML: "seed_nice: 7\n"})
	cl := d.dial()
	steps := []struct {
		prio   int
		nice   int
		ioIdle bool
	}{{10, 7, true}, {10, 7, true}, {100, 0, false}, {5, 7, true}, {50, 0, false}}
	var pid0 int
	for i, st := range steps {
		cl.send(tileReq(fmt.Sprint(i), "c_G", i, 0, 3, st.prio))
		pid := lastJobPID(t, d, i+1)
		if i == 0 {
			pid0 = pid
		} else if pid != pid0 {
			t.Fatalf("job %d ran on renderer %d, want the one renderer %d", i, pid, pid0)
		}
		wantPriority(t, fmt.Sprintf("job %d priority %d", i, st.prio), pid, st.nice, st.ioIdle)
		d.release(1)
		if r := cl.read(); r.Status != statusOK {
			t.Fatalf("job %d: got %+v", i, r)
		}
	}
}

// TestSeedNiceUnprivileged runs the daemon as nobody with no capabilities, as the unit does:
// with RLIMIT_NICE 20 (LimitNICE=+0) a renderer goes back from seed_nice to 0; with 0 it
// cannot, the daemon says so, and live jobs go to a renderer that never ran a seed job.
func TestSeedNiceUnprivileged(t *testing.T) {
	if os.Geteuid() != 0 {
		if os.Getenv("CI") == "true" {
			t.Fatal("CI runs as root; this test switches to user nobody")
		}
		t.Skip("needs root to run the daemon as another user")
	}
	t.Run("LimitNICE=+0", func(t *testing.T) {
		d := startDaemonAs(t, 20, 1)
		cl := d.dial()
		for i, st := range []struct{ prio, nice int }{{10, 7}, {100, 0}, {10, 7}} {
			cl.send(tileReq(fmt.Sprint(i), "c_G", i, 0, 3, st.prio))
			pid := lastJobPID(t, d, i+1)
			wantPriority(t, fmt.Sprintf("job %d priority %d", i, st.prio), pid, st.nice, st.nice > 0)
			d.release(1)
			if r := cl.read(); r.Status != statusOK {
				t.Fatalf("job %d: got %+v", i, r)
			}
		}
	})
	t.Run("no RLIMIT_NICE", func(t *testing.T) {
		d := startDaemonAs(t, 0, 2)
		cl := d.dial()
		cl.send(tileReq("seed", "c_G", 0, 0, 3, 10))
		seedPID := lastJobPID(t, d, 1)
		wantPriority(t, "seed job", seedPID, 7, true)
		d.release(1)
		cl.read()
		cl.send(tileReq("live1", "c_G", 1, 0, 3, 100))
		livePID := lastJobPID(t, d, 2)
		if livePID == seedPID {
			t.Fatalf("the live job went to the niced renderer %d; want the other one", seedPID)
		}
		wantPriority(t, "live job on the other renderer", livePID, 0, false)
		// Both busy next: a second live job can only go to the niced renderer, which stays
		// niced (the kernel refuses) while its I/O class goes back.
		cl.send(tileReq("live2", "c_G", 2, 0, 3, 100))
		if pid := lastJobPID(t, d, 3); pid != seedPID {
			t.Fatalf("live2 ran on %d, want the niced renderer %d", pid, seedPID)
		}
		wantPriority(t, "live job on the niced renderer", seedPID, 7, false)
		d.release(2)
		cl.read()
		cl.read()
		// The daemon's stderr reaches us through a pipe: poll for the lines.
		for deadline := time.Now().Add(30 * time.Second); ; {
			log := d.stderr.String()
			if strings.Contains(log, "LimitNICE=+0") && strings.Contains(log, "cannot change the renderer's priority") {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("daemon log: want the start-up warning naming LimitNICE=+0 and the failed change, got:\n%s", log)
			}
			time.Sleep(10 * time.Millisecond) // polling the daemon's log, bounded by the deadline
		}
	})
}

// startDaemonAs runs the test binary's daemon as user nobody, its soft and hard RLIMIT_NICE
// set to niceLimit, with seed_nice 7 and gated fake renderers.
func startDaemonAs(t *testing.T, niceLimit uint64, renderers int) *testDaemon {
	t.Helper()
	dir := shortTempDir(t)
	if err := os.Chmod(dir, 0o777); err != nil {
		t.Fatal(err)
	}
	bin := dir + "/mrd.test"
	self, err := os.ReadFile(os.Args[0])
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(bin, self, 0o755); err != nil {
		t.Fatal(err)
	}
	d := &testDaemon{t: t, dir: dir, socket: dir + "/s.sock", log: dir + "/jobs.log", stderr: &syncBuffer{}}
	if err := syscall.Mkfifo(dir+"/gate", 0o666); err != nil {
		t.Fatal(err)
	}
	g, err := os.OpenFile(dir+"/gate", os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	d.gate = g
	t.Cleanup(func() { g.Close() })
	cfg := fmt.Sprintf("socket: %s\nsocket_mode: \"0666\"\nhttp: \"\"\nrenderers: %d\nseed_nice: 7\nstop_timeout: 20s\nstate_dir: "+dir+"/state\n"+
		"renderer_command: [%q, fake-renderer, -log, %q, -gate, %q]\n", d.socket, renderers, bin, d.log, dir+"/gate")
	if err := os.WriteFile(dir+"/renderd.yaml", []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, "daemon", "-c", dir+"/renderd.yaml")
	cmd.Stderr = d.stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
	// The child inherits RLIMIT_NICE as systemd's LimitNICE= would set it; ours is put back
	// at once (tests in this package do not run in parallel).
	var old unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NICE, &old); err != nil {
		t.Fatal(err)
	}
	if err := unix.Setrlimit(unix.RLIMIT_NICE, &unix.Rlimit{Cur: niceLimit, Max: niceLimit}); err != nil {
		if niceLimit > old.Max && !hasCapability(unix.CAP_SYS_RESOURCE) {
			// Some containers withhold CAP_SYS_RESOURCE even from root.
			t.Skipf("cannot raise RLIMIT_NICE to %d here (no CAP_SYS_RESOURCE): %v", niceLimit, err)
		}
		t.Fatal(err)
	}
	err = cmd.Start()
	if rerr := unix.Setrlimit(unix.RLIMIT_NICE, &old); rerr != nil {
		t.Fatal(rerr)
	}
	if err != nil {
		t.Fatal(err)
	}
	d.done = make(chan error, 1)
	go func() { d.done <- cmd.Wait() }()
	d.cancel = func() { _ = cmd.Process.Signal(syscall.SIGTERM) }
	t.Cleanup(func() {
		d.stop()
		if t.Failed() {
			t.Logf("daemon log:\n%s", d.stderr.String())
		}
	})
	d.waitUp()
	return d
}

// TestHTTPWaitLeavesSeedingAlone: mapproxy-seed's POSTs (priority 10) wait for the render.
func TestHTTPWaitLeavesSeedingAlone(t *testing.T) {
	d := newTestDaemon(t, daemonOpts{renderers: 1, maxSeed: -1, gate: true, tcp: true, extraYAML: "http_wait: 10ms\n"})
	got := make(chan map[string]any, 1)
	go func() { got <- postMapProxy(t, d.tcp, "/", "c_G", 1, 1, 3, 10) }()
	d.waitFor("seed job running", func(s statusDoc) bool { return s.Renderers.Busy == 1 })
	d.release(1)
	select {
	case r := <-got:
		if r["status"] != statusOK {
			t.Fatalf("seed POST: got %v, want ok after the render", r)
		}
	case <-time.After(30 * time.Second): // postMapProxy failed the test in its goroutine
		t.Fatal("no answer to the seed POST")
	}
	if n := d.status().Counters["pending"]; n != 0 {
		t.Errorf("pending: got %d, want 0", n)
	}
}

func TestLiveConfig(t *testing.T) {
	for _, tc := range []struct{ yaml, want string }{
		{"seed_nice: 20\n", "seed_nice:"},
		{"seed_nice: -1\n", "seed_nice:"},
		{"http_wait: -1s\n", "http_wait:"},
		{"prefetch: {levels: 1}\n", "prefetch.caches:"},
		{"prefetch: {caches: [a/b]}\n", "prefetch.caches[0]:"},
		{"prefetch: {caches: [c], levels: 9}\n", "prefetch.levels:"},
		{"prefetch: {caches: [c], max_zoom: 256}\n", "prefetch.max_zoom:"},
		{"prefetch: {caches: [c], priority: 1001}\n", "prefetch.priority:"},
		{"prefetch: {caches: [c], max_queued: -1}\n", "prefetch.max_queued:"},
		{"prefetch: {caches: [c], depth: 2}\n", "unknown key prefetch.depth"},
		{"prefetch: {caches: [c], area: middle}\n", "prefetch.area:"},
	} {
		c := defaultConfig()
		c.RendererCommand = []string{"x"}
		err := parseConfig(&c, strings.NewReader(tc.yaml))
		if err == nil {
			err = c.Validate()
		}
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%q: got %v, want an error containing %q", tc.yaml, err, tc.want)
		}
	}
	c := defaultConfig()
	c.RendererCommand = []string{"x"}
	if err := parseConfig(&c, strings.NewReader("prefetch: {caches: [osm_cache]}\n")); err != nil {
		t.Fatal(err)
	}
	if err := c.Validate(); err != nil {
		t.Fatal(err)
	}
	p := c.Prefetch
	if c.SeedNice != 10 || !c.SeedIOPrioIdle || p.Levels != 1 || *p.Priority != 5 || p.MaxQueued != 10000 || p.MaxZoom != nil {
		t.Errorf("defaults: seed_nice %d, ioprio idle %v, prefetch %+v", c.SeedNice, c.SeedIOPrioIdle, p)
	}
}
