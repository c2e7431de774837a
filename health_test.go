// SPDX-License-Identifier: Apache-2.0

package main

import (
	"bufio"
	"encoding/json"
	"errors"
	"io"
	"net"
	"net/http"
	"os"
	"strings"
	"testing"
	"time"
)

// healthConn is one kept-alive HTTP connection for GET /healthz, so that a check can be
// made after the daemon has closed its listeners (as HAProxy's would on a reused connection).
type healthConn struct {
	t testing.TB
	c net.Conn
	r *bufio.Reader
}

func dialHealth(t testing.TB, network, addr string) *healthConn {
	t.Helper()
	c, err := net.DialTimeout(network, addr, 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return &healthConn{t: t, c: c, r: bufio.NewReader(c)}
}

// get sends GET /healthz and returns the HTTP status and the JSON body.
func (h *healthConn) get() (int, Reply) {
	h.t.Helper()
	if _, err := io.WriteString(h.c, "GET /healthz HTTP/1.1\r\nHost: renderd\r\n\r\n"); err != nil {
		h.t.Fatal(err)
	}
	h.c.SetReadDeadline(time.Now().Add(30 * time.Second))
	resp, err := http.ReadResponse(h.r, nil)
	if err != nil {
		h.t.Fatalf("GET /healthz: %v", err)
	}
	defer resp.Body.Close()
	var r Reply
	if err := json.NewDecoder(resp.Body).Decode(&r); err != nil {
		h.t.Fatalf("GET /healthz: body is not JSON: %v", err)
	}
	if ct := resp.Header.Get("Content-Type"); ct != "application/json" {
		h.t.Errorf("GET /healthz: Content-Type %q, want application/json", ct)
	}
	return resp.StatusCode, r
}

// getHealthz checks /healthz once on a new connection.
func getHealthz(t testing.TB, addr string) (int, Reply) {
	t.Helper()
	h := dialHealth(t, "tcp", addr)
	defer h.c.Close()
	return h.get()
}

// waitHealth polls GET /healthz on new connections until want(code, reply) holds, failing
// at a deadline. It waits for the TCP port to be bound first.
func waitHealth(t testing.TB, addr, what string, want func(int, Reply) bool) (int, Reply) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		code, r := 0, Reply{}
		if c, err := net.Dial("tcp", addr); err == nil {
			c.Close()
			code, r = getHealthz(t, addr)
			if want(code, r) {
				return code, r
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for /healthz: %s; last: %d %+v", what, code, r)
		}
		time.Sleep(10 * time.Millisecond) // polling the daemon's state, bounded by the deadline
	}
}

// nativeHealth sends {"command":"health"} on cl and returns the reply.
func nativeHealth(cl *client, id string) Reply {
	cl.send(`{"command":"health","id":"` + id + `"}`)
	r := cl.read()
	if idOf(r) != id {
		cl.t.Fatalf("health reply: id %q, want %q", idOf(r), id)
	}
	return r
}

func TestHealthReady(t *testing.T) {
	d := newTestDaemon(t, daemonOpts{renderers: 2, maxSeed: -1, tcp: true})
	code, r := getHealthz(t, d.tcp)
	if code != http.StatusOK || r.Status != statusOK || r.ErrorMessage != "" {
		t.Errorf("GET /healthz: got %d %+v, want 200 ok", code, r)
	}
	if r := nativeHealth(d.dial(), "h"); r.Status != statusOK {
		t.Errorf("native health: got %+v, want ok", r)
	}
	// MapProxy may POST to any path, /healthz included: that is still a tile request.
	if got := postMapProxy(t, d.tcp, "/healthz", cacheID, 3, 4, 5, 100); got["status"] != "ok" {
		t.Errorf("POST /healthz with MapProxy's body: got %v, want the tile rendered", got)
	}
	if n := len(d.jobLog()); n != 1 {
		t.Errorf("renders: got %d, want 1", n)
	}
	// A health check is no tile request and not counted as one.
	if s := d.status(); s.Counters["requested"] != 1 {
		t.Errorf("requested: got %d, want 1", s.Counters["requested"])
	}
}

// TestHealthWhileStarting: the daemon serves health checks while its renderers start (503
// with how many are ready), holds every other request until they are, then says ok.
func TestHealthWhileStarting(t *testing.T) {
	dir := shortTempDir(t)
	gate := lcFIFO(t, dir+"/ready")
	d := newTestDaemon(t, daemonOpts{renderers: 2, maxSeed: -1, tcp: true, noWaitUp: true,
		rendArgs: []string{"-ready-gate", dir + "/ready"}})
	code, r := waitHealth(t, d.tcp, "answered while starting", func(code int, r Reply) bool { return code != 0 })
	if code != http.StatusServiceUnavailable || r.Status != statusError || r.ErrorMessage != "not ready: starting: 0 of 2 renderers ready" {
		t.Fatalf("GET /healthz while starting: got %d %+v, want 503 with \"not ready: starting: 0 of 2 renderers ready\"", code, r)
	}
	waiting := d.dial()
	waiting.send(`{"command":"ping","id":"early"}`)
	waiting.send(tileReq("early-tile", cacheID, 1, 1, 4, 100))
	if r := nativeHealth(d.dial(), "h1"); r.Status != statusError || !strings.Contains(r.ErrorMessage, "starting") {
		t.Errorf("native health while starting: got %+v, want an error saying starting", r)
	}

	if _, err := gate.Write([]byte{1}); err != nil {
		t.Fatal(err)
	}
	waitHealth(t, d.tcp, "one renderer ready", func(code int, r Reply) bool {
		return code == http.StatusServiceUnavailable && r.ErrorMessage == "not ready: starting: 1 of 2 renderers ready"
	})
	// Requests other than health wait: nothing has answered the early ping.
	waiting.c.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
	if line, err := waiting.r.ReadBytes('\n'); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("before the renderers were ready: read %q, %v; want no reply yet", line, err)
	}

	if _, err := gate.Write([]byte{1}); err != nil {
		t.Fatal(err)
	}
	waitHealth(t, d.tcp, "ready", func(code int, r Reply) bool { return code == http.StatusOK && r.Status == statusOK })
	for _, want := range []string{"early", "early-tile"} {
		if r := waiting.read(); idOf(r) != want || r.Status != statusOK {
			t.Errorf("held request: got %+v, want %s ok", r, want)
		}
	}
}

// TestHealthEveryRendererFailing: once no renderer can start, health says why (503); it is
// ok again when one starts.
func TestHealthEveryRendererFailing(t *testing.T) {
	dir := shortTempDir(t)
	marker := dir + "/started"
	d := newTestDaemon(t, daemonOpts{renderers: 1, maxSeed: -1, tcp: true, rendArgs: []string{"-exit-after", "1", "-start-once", marker}})
	if code, _ := getHealthz(t, d.tcp); code != http.StatusOK {
		t.Fatalf("GET /healthz at start: got %d, want 200", code)
	}
	cl := d.dial()
	cl.send(tileReq("last", cacheID, 1, 0, 6, 100))
	if r := cl.read(); r.Status != statusOK {
		t.Fatalf("tile: got %+v", r)
	}
	// The renderer exits after that job and its replacement refuses to start.
	_, r := waitHealth(t, d.tcp, "every renderer failing", func(code int, r Reply) bool {
		return code == http.StatusServiceUnavailable && strings.HasPrefix(r.ErrorMessage, "not ready: every renderer fails to start: ")
	})
	if !strings.Contains(r.ErrorMessage, "before its ready line") {
		t.Errorf("reason: got %q, want the start failure", r.ErrorMessage)
	}
	if r := nativeHealth(cl, "h"); r.Status != statusError || !strings.HasPrefix(r.ErrorMessage, "not ready: every renderer fails to start: ") {
		t.Errorf("native health: got %+v, want the same error", r)
	}
	os.Remove(marker) // the next restart (after backoff) succeeds
	waitHealth(t, d.tcp, "a renderer started again", func(code int, r Reply) bool { return code == http.StatusOK })
}

// TestHealthWhileStopping: from the moment the daemon stops accepting, health says
// "stopping" (503) on connections that are still open, while a running render finishes.
func TestHealthWhileStopping(t *testing.T) {
	d := newTestDaemon(t, daemonOpts{renderers: 1, maxSeed: -1, tcp: true, gate: true})
	kept := dialHealth(t, "tcp", d.tcp)
	if code, r := kept.get(); code != http.StatusOK {
		t.Fatalf("GET /healthz: got %d %+v, want 200", code, r)
	}
	cl := d.dial()
	cl.send(tileReq("running", cacheID, 1, 0, 6, 100))
	d.waitFor("render running", func(s statusDoc) bool { return s.Renderers.Busy == 1 })
	if r := nativeHealth(cl, "busy"); r.Status != statusOK {
		t.Errorf("native health with every renderer busy: got %+v, want ok", r)
	}

	d.cancel() // SIGTERM: the running render is allowed to finish
	deadline := time.Now().Add(30 * time.Second)
	for {
		r := nativeHealth(cl, "stopping")
		if r.Status == statusError {
			if r.ErrorMessage != "not ready: stopping" {
				t.Errorf("native health while stopping: got %q, want \"not ready: stopping\"", r.ErrorMessage)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("health still %+v after the daemon was told to stop", r)
		}
		time.Sleep(5 * time.Millisecond) // polling until the stop begins, bounded by the deadline
	}
	if code, r := kept.get(); code != http.StatusServiceUnavailable || r.ErrorMessage != "not ready: stopping" {
		t.Errorf("GET /healthz on a kept-alive connection while stopping: got %d %+v, want 503 stopping", code, r)
	}
	if c, err := net.Dial("tcp", d.tcp); err == nil {
		c.Close()
		t.Errorf("new connections are accepted while stopping")
	}
	d.release(1)
	if r := cl.read(); idOf(r) != "running" || r.Status != statusOK {
		t.Errorf("running render: got %+v, want ok", r)
	}
	if err := d.stop(); err != nil {
		t.Errorf("daemon: %v", err)
	}
}

// TestHealthCommandParses: health takes no other fields, like ping.
func TestHealthCommandParses(t *testing.T) {
	for _, line := range []string{`{"command":"health"}`, `{"command": "health", "id": "x"}`} {
		req, err := parseRequest([]byte(line))
		if err != nil || req.Command != "health" {
			t.Errorf("parseRequest(%s): got %+v, %v", line, req, err)
		}
	}
	_, err := parseRequest([]byte(`{"command":"healthz"}`))
	if err == nil || !strings.Contains(err.Error(), "health") {
		t.Errorf("unknown command: got %v, want an error listing health", err)
	}
}
