package main

import (
	"fmt"
	"strings"
	"testing"
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
