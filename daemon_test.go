// SPDX-License-Identifier: Apache-2.0

package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"
)

const cacheID = "osm_cache_GLOBAL_WEBMERCATOR"

func TestPipeliningRepliesMatchedByID(t *testing.T) {
	d := newTestDaemon(t, daemonOpts{renderers: 2, maxSeed: -1, gate: true})
	cl := d.dial()
	cl.send(tileReq("a", cacheID, 1, 1, 5, 100))
	cl.send(tileReq("b", cacheID, 2, 1, 5, 100))
	cl.send(`{"command":"ping","id":"p"}`)
	// The ping is answered while both renders are held at the gate.
	if r := cl.read(); idOf(r) != "p" || r.Status != statusOK {
		t.Fatalf("first reply: got %+v, want ping ok", r)
	}
	d.waitFor("2 busy renderers", func(s statusDoc) bool { return s.Renderers.Busy == 2 })
	d.release(2)
	got := map[string]string{}
	for i := 0; i < 2; i++ {
		r := cl.read()
		got[idOf(r)] = r.Status
	}
	if got["a"] != statusOK || got["b"] != statusOK {
		t.Fatalf("replies: got %v, want a and b ok", got)
	}
}

// TestDedupThousandIdenticalRequests: 1,000 concurrent identical requests → exactly one
// render and 1,000 ok answers.
func TestDedupThousandIdenticalRequests(t *testing.T) {
	d := newTestDaemon(t, daemonOpts{renderers: 4, maxSeed: -1, gate: true})
	const n = 1000
	var wg sync.WaitGroup
	results := make(chan Reply, n)
	for i := 0; i < 10; i++ {
		cl := d.dial()
		wg.Add(1)
		go func() {
			defer wg.Done()
			for k := 0; k < n/10; k++ {
				fmt.Fprintf(cl.c, "%s\n", tileReq(fmt.Sprintf("r%d-%d", i, k), cacheID, 7, 7, 7, 100))
			}
			for k := 0; k < n/10; k++ {
				cl.c.SetReadDeadline(time.Now().Add(30 * time.Second))
				line, err := cl.r.ReadBytes('\n')
				if err != nil {
					t.Errorf("read: %v", err)
					return
				}
				var r Reply
				json.Unmarshal(line, &r)
				results <- r
			}
		}()
	}
	d.waitFor("1000 requests accepted", func(s statusDoc) bool { return s.Counters["requested"] == n })
	d.release(1)
	wg.Wait()
	close(results)
	ok := 0
	for r := range results {
		if r.Status == statusOK {
			ok++
		}
	}
	if ok != n {
		t.Errorf("ok answers: got %d, want %d", ok, n)
	}
	if renders := len(d.jobLog()); renders != 1 {
		t.Errorf("renders: got %d, want 1", renders)
	}
	if m := d.status().Counters["merged"]; m != n-1 {
		t.Errorf("merged counter: got %d, want %d", m, n-1)
	}
}

// TestPromotionLiveRequestForQueuedSeedTile: one renderer busy, seed jobs queued; a live
// request for the last queued seed tile is rendered next, once, and both waiters get ok.
func TestPromotionLiveRequestForQueuedSeedTile(t *testing.T) {
	d := newTestDaemon(t, daemonOpts{renderers: 1, maxSeed: -1, gate: true})
	seed := d.dial()
	seed.send(tileReq("blocker", cacheID, 0, 0, 9, 10))
	d.waitFor("blocker running", func(s statusDoc) bool { return s.Renderers.Busy == 1 })
	for x := 1; x <= 3; x++ {
		seed.send(tileReq(fmt.Sprintf("seed%d", x), cacheID, x, 0, 9, 10))
	}
	d.waitFor("3 seed jobs queued", func(s statusDoc) bool { return s.Queue.Length == 3 })
	live := d.dial()
	live.send(tileReq("live", cacheID, 3, 0, 9, 100))
	d.waitFor("promotion", func(s statusDoc) bool { return s.Queue.ByPriority["100"] == 1 })
	d.release(1) // blocker
	if r := seed.read(); idOf(r) != "blocker" {
		t.Fatalf("got %+v, want blocker", r)
	}
	d.release(1) // the promoted job
	if r := live.read(); idOf(r) != "live" || r.Status != statusOK || !r.Merged {
		t.Fatalf("live: got %+v, want ok, merged", r)
	}
	if r := seed.read(); idOf(r) != "seed3" || r.Status != statusOK {
		t.Fatalf("seed waiter of the promoted job: got %+v, want seed3 ok", r)
	}
	d.release(2)
	seed.read()
	seed.read()
	log := d.jobLog()
	var xs []string
	for _, l := range log {
		f := strings.Fields(l)
		xs = append(xs, f[3])
	}
	if got, want := strings.Join(xs, ","), "0,3,1,2"; got != want {
		t.Errorf("render order (x): got %s, want %s", got, want)
	}
}

// TestSeedReservationWithRealRenderers: 10 renderers, at most 6 seeding; 6 seed renders
// running and 8 live requests → 4 start at once and 4 wait.
func TestSeedReservationWithRealRenderers(t *testing.T) {
	d := newTestDaemon(t, daemonOpts{renderers: 10, maxSeed: 6, gate: true})
	seed := d.dial()
	for x := 0; x < 8; x++ {
		seed.send(tileReq(fmt.Sprintf("s%d", x), cacheID, x, 1, 12, 10))
	}
	d.waitFor("6 seed renders and 2 queued", func(s statusDoc) bool {
		return s.Renderers.BusySeed == 6 && s.Queue.SeedQueued == 2
	})
	live := d.dial()
	for x := 0; x < 8; x++ {
		live.send(tileReq(fmt.Sprintf("l%d", x), cacheID, x, 2, 12, 100))
	}
	s := d.waitFor("8 live accepted", func(s statusDoc) bool { return s.Counters["requested"] == 16 })
	s = d.waitFor("4 live started", func(s statusDoc) bool { return s.Renderers.BusyLive == 4 })
	if s.Renderers.Busy != 10 || s.Queue.LiveQueued != 4 || s.Queue.SeedQueued != 2 {
		t.Fatalf("got busy %d, live queued %d, seed queued %d; want 10, 4, 2", s.Renderers.Busy, s.Queue.LiveQueued, s.Queue.SeedQueued)
	}
	d.release(100)
	for i := 0; i < 8; i++ {
		if r := live.read(); r.Status != statusOK {
			t.Fatalf("live: got %+v", r)
		}
		if r := seed.read(); r.Status != statusOK {
			t.Fatalf("seed: got %+v", r)
		}
	}
}

func TestRendererFailures(t *testing.T) {
	d := newTestDaemon(t, daemonOpts{renderers: 2, maxSeed: -1, rendArgs: []string{"-crash", "1", "-hang", "2", "-garbage", "3", "-fail", "4"},
		extraYAML: "render_timeout: 1s\n"})
	cl := d.dial()
	tests := []struct {
		x    int
		want string
	}{
		{1, "exited with status 3"},
		{2, "render timeout"},
		{3, "invalid reply"},
		{4, "fake failure for x=4"},
	}
	for _, tt := range tests {
		cl.send(tileReq(fmt.Sprint(tt.x), cacheID, tt.x, 0, 3, 100))
		r := cl.read()
		if r.Status != statusError || !strings.Contains(r.ErrorMessage, tt.want) {
			t.Errorf("x=%d: got %+v, want error containing %q", tt.x, r, tt.want)
		}
		// Everyone else is still served, by a replacement where one was needed.
		cl.send(tileReq("after", cacheID, 100+tt.x, 0, 3, 100))
		if r := cl.read(); r.Status != statusOK {
			t.Errorf("after x=%d: got %+v, want ok", tt.x, r)
		}
	}
	s := d.status()
	if s.Counters["failed"] != 4 || s.Counters["timed_out"] != 1 {
		t.Errorf("counters: failed %d timed_out %d; want 4 and 1", s.Counters["failed"], s.Counters["timed_out"])
	}
	if s.Counters["render_errors"] != 3 {
		t.Errorf("render_errors: got %d, want 3 (crash, garbage, failure)", s.Counters["render_errors"])
	}
	// Each broken process was replaced once, for its reason; the renderer that answered an
	// error lives on. (The restart is reported just after the failed job's answer.)
	want := map[string]uint64{restartExited: 1, restartTimeout: 1, restartProtocol: 1, restartRecycle: 0, restartShutdown: 0}
	d.waitFor("restarts by reason", func(s statusDoc) bool { return fmt.Sprint(s.RendererRestarts) == fmt.Sprint(want) })
}

func TestRecycleAfter(t *testing.T) {
	d := newTestDaemon(t, daemonOpts{renderers: 1, maxSeed: -1, extraYAML: "recycle_after: 2\n"})
	cl := d.dial()
	for x := 0; x < 6; x++ {
		cl.send(tileReq("r", cacheID, x, 0, 4, 100))
		if r := cl.read(); r.Status != statusOK {
			t.Fatalf("x=%d: %+v", x, r)
		}
	}
	pids := map[string]int{}
	for _, l := range d.jobLog() {
		pids[strings.Fields(l)[0]]++
	}
	if len(pids) != 3 {
		t.Errorf("renderer pids: got %v, want 3 processes with 2 jobs each", pids)
	}
	d.waitFor("3 recycles", func(s statusDoc) bool { return s.RendererRestarts[restartRecycle] == 3 })
}

// TestClientDisconnectWhileQueued: a client that closes while its job is queued stops
// waiting; the job, which nobody else waits for, is dropped and never rendered.
func TestClientDisconnectWhileQueued(t *testing.T) {
	d := newTestDaemon(t, daemonOpts{renderers: 1, maxSeed: -1, gate: true})
	keep := d.dial()
	keep.send(tileReq("blocker", cacheID, 0, 0, 6, 100))
	d.waitFor("blocker running", func(s statusDoc) bool { return s.Renderers.Busy == 1 })
	gone := d.dial()
	gone.send(tileReq("gone", cacheID, 5, 5, 6, 100))
	d.waitFor("queued", func(s statusDoc) bool { return s.Queue.Length == 1 })
	gone.c.Close()
	s := d.waitFor("dropped", func(s statusDoc) bool { return s.Counters["dropped"] == 1 })
	if s.Queue.Length != 0 {
		t.Fatalf("queue length after drop: got %d, want 0", s.Queue.Length)
	}
	d.release(1)
	if r := keep.read(); r.Status != statusOK {
		t.Fatalf("blocker: %+v", r)
	}
	// Half-close is not gone: the reply still arrives.
	hc := d.dial()
	hc.send(tileReq("half", cacheID, 9, 9, 6, 100))
	hc.c.(*net.UnixConn).CloseWrite()
	d.release(1)
	if r := hc.read(); idOf(r) != "half" || r.Status != statusOK {
		t.Fatalf("after half-close: got %+v, want ok", r)
	}
	keep.send(`{"command":"ping"}`)
	keep.read()
	for _, l := range d.jobLog() {
		if strings.HasSuffix(l, " 6 5 5") {
			t.Errorf("the dropped job was rendered: %q", l)
		}
	}
}

// TestBadInput: every malformed request gets a clear error on its own connection, the id
// echoed where it parsed, and the connection stays usable.
func TestBadInput(t *testing.T) {
	d := newTestDaemon(t, daemonOpts{renderers: 1, maxSeed: -1, extraYAML: "max_line_bytes: 4096\n",
		rendArgs: []string{"-caches", `{"` + cacheID + `": {"meta_size": [4, 4]}}`}})
	cl := d.dial()
	tests := []struct {
		line, id, want string
	}{
		{`{"command":"tile",`, "", "malformed JSON"},
		{`not json at all`, "", "malformed JSON"},
		{`[1,2,3]`, "", "want a JSON object"},
		{`{"command":"explode","id":"u"}`, "u", `unknown command "explode"`},
		{`{"id":"m"}`, "m", "missing command"},
		{`{"command":"tile","id":"nc","tiles":[[1,2,3]]}`, "nc", "missing cache_identifier"},
		{`{"command":"tile","id":"nt","cache_identifier":"` + cacheID + `"}`, "nt", "missing tiles"},
		{`{"command":"tile","id":"et","cache_identifier":"` + cacheID + `","tiles":[]}`, "et", "tiles must not be empty"},
		{`{"command":"tile","id":"neg","cache_identifier":"` + cacheID + `","tiles":[[-1,2,3]]}`, "neg", "non-negative integers"},
		{`{"command":"tile","id":"fl","cache_identifier":"` + cacheID + `","tiles":[[1.5,2,3]]}`, "fl", "non-negative integers"},
		{`{"command":"tile","id":"two","cache_identifier":"` + cacheID + `","tiles":[[1,2]]}`, "two", "must be [x, y, z]"},
		{`{"command":"tile","id":"pt","cache_identifier":"` + cacheID + `","tiles":[[1,2,3]],"priority":"high"}`, "pt", "priority must be an integer"},
		{`{"command":"tile","id":"pr","cache_identifier":"` + cacheID + `","tiles":[[1,2,3]],"priority":5000}`, "pr", "priority must be an integer"},
		{`{"command":"tile","id":"uf","cache_identifier":"` + cacheID + `","tiles":[[1,2,3]],"colour":"red"}`, "uf", `unknown field "colour"`},
		{`{"command":"tile","id":"sl","cache_identifier":"a/b","tiles":[[1,2,3]]}`, "sl", "contains '/'"},
		{`{"command":"tile","id":"uc","cache_identifier":"nope_GLOBAL","tiles":[[1,2,3]]}`, "uc", `unknown cache "nope_GLOBAL"`},
		{`{"command":5,"id":"ci"}`, "ci", "command must be a string"},
		{`{"command":"ping","id":7}`, "", "id must be a string"},
		{`{"command":"ping"} {"command":"ping"}`, "", "trailing data"},
		{`{"command":"tile","id":"big","cache_identifier":"` + cacheID + `","tiles":[[1,2,3]],"x":"` + strings.Repeat("x", 5000) + `"}`, "", "line longer than max_line_bytes"},
	}
	for _, tt := range tests {
		cl.send(tt.line)
		r := cl.read()
		if r.Status != statusError || !strings.Contains(r.ErrorMessage, tt.want) || (tt.id != "" && idOf(r) != tt.id) {
			t.Errorf("%.60s: got %s %q id %s; want error containing %q, id %q", tt.line, r.Status, r.ErrorMessage, idOf(r), tt.want, tt.id)
		}
	}
	cl.send(tileReq("fine", cacheID, 1, 2, 3, 100))
	if r := cl.read(); r.Status != statusOK || idOf(r) != "fine" {
		t.Fatalf("after the bad input: got %+v, want ok", r)
	}
	// Another client was never affected, and the daemon counted the bad lines.
	if n := d.status().Conns.Invalid; n < uint64(len(tests))-1 {
		t.Errorf("invalid counter: got %d, want at least %d", n, len(tests)-1)
	}
}

func TestMetatileDedup(t *testing.T) {
	d := newTestDaemon(t, daemonOpts{renderers: 1, maxSeed: -1, gate: true,
		rendArgs: []string{"-caches", `{"` + cacheID + `": {"meta_size": [4, 4]}}`}})
	cl := d.dial()
	cl.send(tileReq("a", cacheID, 17, 10, 5, 100))
	d.waitFor("running", func(s statusDoc) bool { return s.Renderers.Busy == 1 })
	cl.send(tileReq("b", cacheID, 16, 11, 5, 100))
	cl.send(tileReq("c", cacheID, 19, 8, 5, 100))
	d.waitFor("merged", func(s statusDoc) bool { return s.Counters["merged"] == 2 })
	d.release(1)
	for i := 0; i < 3; i++ {
		if r := cl.read(); r.Status != statusOK {
			t.Fatalf("got %+v", r)
		}
	}
	if log := d.jobLog(); len(log) != 1 || !strings.HasSuffix(log[0], cacheID+" 5 16 8") {
		t.Fatalf("renders: got %q, want one render of the metatile at 16,8", log)
	}
}

func TestMaxQueuedBusy(t *testing.T) {
	d := newTestDaemon(t, daemonOpts{renderers: 1, maxSeed: -1, gate: true, tcp: true, extraYAML: "max_queued: 2\n"})
	cl := d.dial()
	cl.send(tileReq("run", cacheID, 0, 0, 8, 100))
	d.waitFor("running", func(s statusDoc) bool { return s.Renderers.Busy == 1 })
	cl.send(tileReq("q1", cacheID, 1, 0, 8, 100))
	cl.send(tileReq("q2", cacheID, 2, 0, 8, 100))
	cl.send(tileReq("over", cacheID, 3, 0, 8, 100))
	if r := cl.read(); idOf(r) != "over" || r.Status != statusBusy {
		t.Fatalf("over the limit: got %+v, want busy", r)
	}
	// MapProxy over HTTP gets "error" with "queue full": it would take "busy" for success.
	resp := postMapProxy(t, d.tcp, "/", cacheID, 4, 0, 8, 100)
	if resp["status"] != "error" || !strings.Contains(resp["error_message"].(string), "queue full") {
		t.Fatalf("HTTP over the limit: got %v, want error with queue full", resp)
	}
	d.release(3)
	for i := 0; i < 3; i++ {
		if r := cl.read(); r.Status != statusOK {
			t.Fatalf("got %+v", r)
		}
	}
}

// mapproxyBody is MapProxy 1.15's body, byte for byte (json.dumps default separators).
func mapproxyBody(cache string, x, y, z, prio int) string {
	return fmt.Sprintf(`{"command": "tile", "id": "a8a4fb883bf7e0f285fc11104200e8e7dda6b9d5", "tiles": [[%d, %d, %d]], "cache_identifier": %q, "priority": %d}`, x, y, z, cache, prio)
}

// postMapProxy sends exactly what MapProxy 1.15 sends (docs/design.md §3) on a new connection.
func postMapProxy(t *testing.T, addr, path, cache string, x, y, z, prio int) map[string]any {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	body := mapproxyBody(cache, x, y, z, prio)
	req := "POST " + path + " HTTP/1.1\r\nHost: " + addr + "\r\nUser-Agent: python-requests/2.28.1\r\nAccept-Encoding: gzip, deflate\r\nAccept: */*\r\nConnection: keep-alive\r\nContent-Length: " + fmt.Sprint(len(body)) + "\r\n\r\n" + body
	if _, err := io.WriteString(c, req); err != nil {
		t.Fatal(err)
	}
	c.SetReadDeadline(time.Now().Add(30 * time.Second))
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 || resp.Header.Get("Content-Type") != "application/json" {
		t.Fatalf("HTTP: got %d %q, want 200 application/json", resp.StatusCode, resp.Header.Get("Content-Type"))
	}
	var out map[string]any
	if err := json.NewDecoder(resp.Body).Decode(&out); err != nil {
		t.Fatal(err)
	}
	return out
}

func TestMapProxyHTTP(t *testing.T) {
	d := newTestDaemon(t, daemonOpts{renderers: 2, maxSeed: -1, tcp: true, rendArgs: []string{"-fail", "66"}})
	if got := postMapProxy(t, d.tcp, "/", cacheID, 16, 8, 5, 100); got["status"] != "ok" {
		t.Fatalf("POST /: got %v, want ok", got)
	}
	if got := postMapProxy(t, d.tcp, "/render/path?x=1", cacheID, 20, 8, 5, 10); got["status"] != "ok" {
		t.Fatalf("POST on another path: got %v, want ok", got)
	}
	got := postMapProxy(t, d.tcp, "/", cacheID, 66, 8, 5, 100)
	if got["status"] != "error" || !strings.Contains(got["error_message"].(string), "fake failure") {
		t.Fatalf("failing render: got %v, want error with the renderer's message", got)
	}
	if log := d.jobLog(); len(log) != 3 {
		t.Errorf("renders: got %d, want 3", len(log))
	}
	hc := &http.Client{Timeout: 10 * time.Second}
	for _, tt := range []struct {
		method, path string
		code         int
		want         string
	}{
		{"GET", "/status", 200, `"renderers"`},
		{"GET", "/_status", 200, `"counters"`},
		{"GET", "/nothing", 404, `"status":"error"`},
		{"PUT", "/", 405, `"status":"error"`},
	} {
		req, _ := http.NewRequest(tt.method, "http://"+d.tcp+tt.path, nil)
		resp, err := hc.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != tt.code || !strings.Contains(string(b), tt.want) || resp.Header.Get("Content-Type") != "application/json" {
			t.Errorf("%s %s: got %d %s, want %d containing %s", tt.method, tt.path, resp.StatusCode, b, tt.code, tt.want)
		}
	}
	// Garbage in the body is an error, not a hang; HTTP/1.0 closes after the reply.
	c, err := net.Dial("tcp", d.tcp)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	fmt.Fprintf(c, "POST / HTTP/1.0\r\nContent-Length: 5\r\n\r\n{{{{{")
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	all, err := io.ReadAll(c)
	if err != nil || !bytes.Contains(all, []byte(`"status":"error"`)) || !bytes.Contains(all, []byte("malformed JSON")) {
		t.Fatalf("HTTP/1.0 garbage: got %q, %v", all, err)
	}
	// The Unix socket speaks HTTP as well (requests-unixsocket's path).
	uc, err := net.Dial("unix", d.socket)
	if err != nil {
		t.Fatal(err)
	}
	defer uc.Close()
	body := mapproxyBody(cacheID, 24, 8, 5, 100)
	fmt.Fprintf(uc, "POST / HTTP/1.1\r\nHost: %%2Frun%%2Fmapproxy-renderd.sock\r\nContent-Length: %d\r\n\r\n%s", len(body), body)
	resp, err := http.ReadResponse(bufio.NewReader(uc), nil)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	if !strings.Contains(string(b), `"status":"ok"`) {
		t.Fatalf("HTTP over the Unix socket: got %s", b)
	}
}

func TestSocat(t *testing.T) {
	if _, err := exec.LookPath("socat"); err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatal("socat is missing (CI installs it)")
		}
		t.Skip("socat not installed")
	}
	d := newTestDaemon(t, daemonOpts{renderers: 1, maxSeed: -1})
	cmd := exec.Command("socat", "-t", "30", "-", "UNIX-CONNECT:"+d.socket)
	cmd.Stdin = strings.NewReader(`{"command":"tile","cache_identifier":"osm_cache_GLOBAL_WEBMERCATOR","tiles":[[1,2,3]]}` + "\n")
	out, err := cmd.Output()
	if err != nil || !strings.Contains(string(out), `"status":"ok"`) {
		t.Fatalf("socat: got %q, %v", out, err)
	}
}

// TestShutdownDrain: cancelling the daemon with a render running and jobs queued lets the
// render finish (its waiter gets ok), answers queued waiters shutting_down, and run returns nil.
func TestShutdownDrain(t *testing.T) {
	d := newTestDaemon(t, daemonOpts{renderers: 1, maxSeed: -1, gate: true})
	cl := d.dial()
	cl.send(tileReq("running", cacheID, 0, 0, 4, 100))
	d.waitFor("running", func(s statusDoc) bool { return s.Renderers.Busy == 1 })
	cl.send(tileReq("queued", cacheID, 1, 0, 4, 100))
	d.waitFor("queued", func(s statusDoc) bool { return s.Queue.Length == 1 })
	d.cancel()
	if r := cl.read(); idOf(r) != "queued" || r.Status != statusShuttingDown {
		t.Fatalf("queued waiter: got %+v, want shutting_down", r)
	}
	d.release(1)
	if r := cl.read(); idOf(r) != "running" || r.Status != statusOK {
		t.Fatalf("running waiter: got %+v, want ok", r)
	}
	if err := d.stop(); err != nil {
		t.Fatalf("run returned %v, want nil", err)
	}
}

func TestStartFailure(t *testing.T) {
	dir := shortTempDir(t)
	cfg := fmt.Sprintf("socket: %s/s.sock\nhttp: \"\"\nrenderers: 2\nrenderer_command: [%q, fake-renderer, -no-ready]\nstate_dir: %s/state\n", dir, os.Args[0], dir)
	os.WriteFile(dir+"/r.yaml", []byte(cfg), 0o644)
	var stderr syncBuffer
	err := run(t.Context(), []string{"-c", dir + "/r.yaml"}, io.Discard, &stderr)
	if err == nil || !strings.Contains(err.Error(), "renderers did not start") || !strings.Contains(stderr.String(), "refusing to start") {
		t.Fatalf("got %v, want a start error (log: %s)", err, stderr.String())
	}
}

func TestConfigErrors(t *testing.T) {
	tests := []struct{ yaml, want string }{
		{"renderers: 0\nrenderer_command: [x]\n", "renderers:"},
		{"renderers: 4\nmax_seed_renderers: 5\nrenderer_command: [x]\n", "max_seed_renderers:"},
		{"colour: blue\nrenderer_command: [x]\n", "unknown key colour"},
		{"render_timeout: soon\nrenderer_command: [x]\n", "want a duration"},
		{"socket_mode: rw\nrenderer_command: [x]\n", "socket_mode:"},
		{"http: 0.0.0.0:8111\nrenderer_command: [x]\n", "not a loopback address"},
		{"renderers: 2\n", "mapproxy_config: required"},
		{"log_level: loud\nrenderer_command: [x]\n", "log_level:"},
		{"log_format: xml\nrenderer_command: [x]\n", "log_format: want text or json"},
	}
	for _, tt := range tests {
		dir := t.TempDir()
		os.WriteFile(dir+"/r.yaml", []byte(tt.yaml), 0o644)
		var out bytes.Buffer
		err := run(t.Context(), []string{"check-config", "-c", dir + "/r.yaml"}, &out, io.Discard)
		if err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("%q: got %v, want an error containing %q", tt.yaml, err, tt.want)
		}
	}
	// -f: the listen address comes from globals.renderd.address. (A fake renderer_command,
	// so that check-config does not load the file with MapProxy: see TestCheckConfigLoadsMapProxy.)
	dir := t.TempDir()
	os.WriteFile(dir+"/mapproxy.yaml", []byte("globals:\n  renderd:\n    address: http://127.0.0.1:8111\n"), 0o644)
	os.WriteFile(dir+"/fake.yaml", []byte(fakeRendererYAML("")), 0o644)
	var out bytes.Buffer
	if err := run(t.Context(), []string{"check-config", "-f", dir + "/mapproxy.yaml", "-c", dir + "/fake.yaml", "--renderer", "10", "--max-seed-renderer", "6"}, &out, io.Discard); err != nil {
		t.Fatal(err)
	}
	if s := out.String(); !strings.Contains(s, `http "127.0.0.1:8111"`) || !strings.Contains(s, "10 renderers (at most 6 seeding") {
		t.Errorf("check-config -f: got %q", s)
	}
	os.WriteFile(dir+"/unix.yaml", []byte("globals:\n  renderd:\n    address: http+unix://%2Ftmp%2Fx.sock/\n"), 0o644)
	out.Reset()
	if err := run(t.Context(), []string{"check-config", "-f", dir + "/unix.yaml", "-c", dir + "/fake.yaml"}, &out, io.Discard); err != nil {
		t.Fatal(err)
	}
	if s := out.String(); !strings.Contains(s, `socket "/tmp/x.sock", http ""`) {
		t.Errorf("check-config http+unix: got %q", s)
	}
}

func TestClientCommands(t *testing.T) {
	d := newTestDaemon(t, daemonOpts{renderers: 1, maxSeed: -1, rendArgs: []string{"-fail", "9"}})
	var out bytes.Buffer
	if err := run(t.Context(), []string{"request", "--socket", d.socket, tileReq("x", cacheID, 1, 1, 1, 100)}, &out, io.Discard); err != nil || !strings.Contains(out.String(), `"status":"ok"`) {
		t.Fatalf("request: %v %q", err, out.String())
	}
	out.Reset()
	err := run(t.Context(), []string{"request", "--socket", d.socket, tileReq("x", cacheID, 9, 1, 1, 100)}, &out, io.Discard)
	if code, ok := err.(exitCode); !ok || code != 1 || !strings.Contains(out.String(), "fake failure") {
		t.Fatalf("failing request: got %v %q, want exit 1 and the error", err, out.String())
	}
	out.Reset()
	if err := run(t.Context(), []string{"status", "--socket", d.socket}, &out, io.Discard); err != nil || !strings.Contains(out.String(), `"rendered": 1`) {
		t.Fatalf("status: %v %q", err, out.String())
	}
}

func TestStaleSocketHandling(t *testing.T) {
	dir := shortTempDir(t)
	// A regular file is never removed.
	os.WriteFile(dir+"/f.sock", []byte("keep"), 0o644)
	if _, err := listenUnix(dir+"/f.sock", 0o660, ""); err == nil || !strings.Contains(err.Error(), "not a socket") {
		t.Fatalf("regular file: got %v", err)
	}
	// A live socket is not taken over.
	l, err := net.Listen("unix", dir+"/live.sock")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	if _, err := listenUnix(dir+"/live.sock", 0o660, ""); err == nil || !strings.Contains(err.Error(), "another process") {
		t.Fatalf("live socket: got %v", err)
	}
	// A stale socket is replaced, and the mode is set.
	ul, _ := net.ListenUnix("unix", &net.UnixAddr{Name: dir + "/stale.sock", Net: "unix"})
	ul.SetUnlinkOnClose(false)
	ul.Close()
	nl, err := listenUnix(dir+"/stale.sock", 0o660, "")
	if err != nil {
		t.Fatalf("stale socket: %v", err)
	}
	defer nl.Close()
	fi, _ := os.Stat(dir + "/stale.sock")
	if fi.Mode().Perm() != 0o660 {
		t.Errorf("mode: got %v, want 0660", fi.Mode().Perm())
	}
}

// TestRendererExitingWhileIdle: a renderer that exits after every job (while idle) is
// replaced at once, without backoff, and no request fails for it, also not one sent to a
// process that was already gone.
func TestRendererExitingWhileIdle(t *testing.T) {
	d := newTestDaemon(t, daemonOpts{renderers: 1, maxSeed: -1, rendArgs: []string{"-exit-after", "1"}})
	cl := d.dial()
	const n = 12
	for x := 0; x < n; x++ {
		cl.send(tileReq(fmt.Sprint(x), cacheID, x, 0, 6, 100))
		if r := cl.read(); r.Status != statusOK {
			t.Fatalf("request %d: got %+v, want ok", x, r)
		}
	}
	pids := map[string]bool{}
	for _, l := range d.jobLog() {
		pids[strings.Fields(l)[0]] = true
	}
	if len(pids) != n {
		t.Errorf("renderer processes: got %d, want %d (one per job)", len(pids), n)
	}
	if s := d.status(); s.Counters["failed"] != 0 || s.Counters["rendered"] != n {
		t.Errorf("counters: rendered %d failed %d, want %d and 0", s.Counters["rendered"], s.Counters["failed"], n)
	}
	t.Logf("jobs handed to a replacement process: %d", strings.Count(d.stderr.String(), "goes to its replacement"))
}

// TestRenderersThatCannotRestart: when every renderer fails to start, requests are answered
// with the reason instead of waiting for ever; once a renderer starts again, they are served.
func TestRenderersThatCannotRestart(t *testing.T) {
	dir := shortTempDir(t)
	marker := dir + "/started"
	d := newTestDaemon(t, daemonOpts{renderers: 1, maxSeed: -1, rendArgs: []string{"-exit-after", "1", "-start-once", marker}})
	cl := d.dial()
	cl.send(tileReq("first", cacheID, 1, 0, 6, 100))
	if r := cl.read(); r.Status != statusOK {
		t.Fatalf("first: got %+v", r)
	}
	cl.send(tileReq("second", cacheID, 2, 0, 6, 100))
	r := cl.read()
	if r.Status != statusError || !strings.Contains(r.ErrorMessage, "before its ready line") {
		t.Fatalf("second, with no renderer able to start: got %s %q, want an error naming the start failure", r.Status, r.ErrorMessage)
	}
	os.Remove(marker) // the next restart (after backoff) succeeds
	deadline := time.Now().Add(lcDeadline)
	for i := 0; ; i++ {
		cl.send(tileReq(fmt.Sprint("retry", i), cacheID, 3, 0, 6, 100))
		if r := cl.read(); r.Status == statusOK {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("no renderer came back after the start failure was fixed")
		}
		time.Sleep(50 * time.Millisecond) // waiting for the backoff to end, bounded by the deadline
	}
}

// TestHTTPClientGoneWhileQueued: a MapProxy process that dies while its POST waits in the
// queue stops waiting; the job, which nobody else wants, is dropped and never rendered.
func TestHTTPClientGoneWhileQueued(t *testing.T) {
	d := newTestDaemon(t, daemonOpts{renderers: 1, maxSeed: -1, gate: true, tcp: true})
	keep := d.dial()
	keep.send(tileReq("blocker", cacheID, 0, 0, 6, 100))
	d.waitFor("blocker running", func(s statusDoc) bool { return s.Renderers.Busy == 1 })
	c, err := net.Dial("tcp", d.tcp)
	if err != nil {
		t.Fatal(err)
	}
	body := mapproxyBody(cacheID, 44, 44, 6, 100)
	fmt.Fprintf(c, "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s", len(body), body)
	d.waitFor("queued", func(s statusDoc) bool { return s.Queue.Length == 1 })
	c.Close()
	d.waitFor("dropped", func(s statusDoc) bool { return s.Counters["dropped"] == 1 && s.Queue.Length == 0 })
	d.release(1)
	if r := keep.read(); r.Status != statusOK {
		t.Fatalf("blocker: %+v", r)
	}
	for _, l := range d.jobLog() {
		if strings.HasSuffix(l, " 6 44 44") {
			t.Errorf("the dropped job was rendered: %q", l)
		}
	}
}
