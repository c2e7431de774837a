// SPDX-License-Identifier: Apache-2.0

package main

import (
	"bytes"
	"encoding/json"
	"io"
	"net/http"
	"os"
	"slices"
	"strings"
	"testing"
	"time"
)

// expireCaches is the fake renderers' ready line: exp_GRID is an sw-origin XYZ pyramid with
// 2×2 metatiles; plain_GRID is not an XYZ pyramid.
const expireCaches = `{"exp_GRID":{"meta_size":[2,2],"xyz":"sw"},"plain_GRID":{"meta_size":[1,1]}}`

// waitTaskDone polls a task until it has ended, failing at a deadline.
func waitTaskDone(t *testing.T, d *testDaemon, id string) taskDoc {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		cl := d.dial()
		cl.send(`{"command":"task","id":"w","task_id":"` + id + `"}`)
		r := cl.read()
		cl.c.Close()
		var doc taskDoc
		if err := json.Unmarshal(r.Task, &doc); err != nil {
			t.Fatalf("task %s: %+v", id, r)
		}
		if doc.finished() {
			return doc
		}
		if time.Now().After(deadline) {
			t.Fatalf("task %s not finished: %+v\njob log: %q", id, doc, d.jobLog())
		}
		time.Sleep(10 * time.Millisecond) // polling, bounded by the deadline
	}
}

// jobLogSet is the job log without pids, sorted.
func jobLogSet(d *testDaemon) []string {
	var out []string
	for _, l := range d.jobLog() {
		_, rest, _ := strings.Cut(l, " ")
		out = append(out, rest)
	}
	slices.Sort(out)
	return out
}

func TestExpireCommand(t *testing.T) {
	d := newTestDaemon(t, daemonOpts{tcp: true, maxSeed: -1, rendArgs: []string{"-caches", expireCaches}})
	cl := d.dial()
	// sw origin, 2×2 metatiles, min 1, max 3, delete from 3 (hand-computed):
	// 2/1/2 → z2 internal (1,1) → meta (0,0); z1 (0,0) → (0,0); z3 x 2..3 internal y 2..3 → (2,2) delete.
	// 3/7/7 → z3 internal (7,0) → (6,0) delete; z2 (3,0) → (2,0); z1 (1,0) → (0,0) seen.
	cl.send(`{"command":"expire","id":"e1","cache_identifier":"exp_GRID","lines":"2/1/2\nnot a tile\n3/7/7\n","min_zoom":1,"max_zoom":3,"delete_from":3,"priority":7}`)
	r := cl.read()
	if r.Status != statusQueued {
		t.Fatalf("expire: %+v", r)
	}
	var doc taskDoc
	json.Unmarshal(r.Task, &doc)
	if doc.Kind != "expire" || doc.Priority != 7 {
		t.Errorf("task %+v, want kind expire, priority 7", doc)
	}
	doc = waitTaskDone(t, d, doc.TaskID)
	if doc.State != taskStateDone || doc.Planned != 5 || doc.Done != 3 || doc.Deleted != 2 || doc.Lines != 3 || doc.BadLines != 1 {
		t.Errorf("task %+v, want done: planned 5, done 3, deleted 2, lines 3, bad_lines 1", doc)
	}
	if len(doc.LineErrors) != 1 || doc.LineErrors[0].Line != 2 || doc.LineErrors[0].Text != "not a tile" {
		t.Errorf("line errors %+v, want line 2 \"not a tile\"", doc.LineErrors)
	}
	want := []string{"exp_GRID 1 0 0", "exp_GRID 2 0 0", "exp_GRID 2 2 0", "exp_GRID 3 2 2 delete", "exp_GRID 3 6 0 delete"}
	if got := jobLogSet(d); !slices.Equal(got, want) {
		t.Errorf("renders %q, want %q", got, want)
	}

	// A cache whose grid is not the XYZ pyramid, and one nobody knows: errors naming them.
	cl.send(`{"command":"expire","id":"e2","cache_identifier":"plain_GRID","lines":"1/0/0"}`)
	if r := cl.read(); r.Status != statusError || !strings.Contains(r.ErrorMessage, "plain_GRID") || !strings.Contains(r.ErrorMessage, "XYZ") {
		t.Errorf("non-XYZ cache: %+v", r)
	}
	cl.send(`{"command":"expire","id":"e3","cache_identifier":"nope_GRID","tiles":[[0,0,0]]}`)
	if r := cl.read(); r.Status != statusError || !strings.Contains(r.ErrorMessage, "nope_GRID") {
		t.Errorf("unknown cache: %+v", r)
	}
	cl.send(`{"command":"expire","id":"e4","cache_identifier":"exp_GRID","lines":"1/0/0","min_zoom":5,"max_zoom":3}`)
	if r := cl.read(); r.Status != statusError || !strings.Contains(r.ErrorMessage, "max_zoom") {
		t.Errorf("bad range: %+v", r)
	}

	// HTTP POST /expire: tiles as the body, the range in the query.
	resp, err := http.Post("http://"+d.tcp+"/expire?cache=exp_GRID&min_zoom=4", "text/plain", strings.NewReader("4/0/0\n4/1/1\n"))
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	var hr Reply
	if json.Unmarshal(body, &hr) != nil || resp.StatusCode != http.StatusCreated || hr.Status != statusQueued {
		t.Fatalf("POST /expire: %d %s", resp.StatusCode, body)
	}
	json.Unmarshal(hr.Task, &doc)
	if doc = waitTaskDone(t, d, doc.TaskID); doc.Done != 1 || doc.Planned != 1 {
		t.Errorf("POST /expire task %+v, want one metatile (4/0/0 and 4/1/1 share it)", doc)
	}
	resp, err = http.Post("http://"+d.tcp+"/expire?cache=plain_GRID", "text/plain", strings.NewReader("1/0/0\n"))
	if err != nil {
		t.Fatal(err)
	}
	body, _ = io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusBadRequest || !bytes.Contains(body, []byte("plain_GRID")) {
		t.Errorf("POST /expire non-XYZ: %d %s", resp.StatusCode, body)
	}

	// The CLI, from a file, waiting for the end.
	list := d.dir + "/list"
	os.WriteFile(list, []byte("5/3/3\n"), 0o644)
	var out, errOut bytes.Buffer
	if err := run(t.Context(), []string{"expire", "--socket", d.socket, "--cache", "exp_GRID", "--min-zoom", "5", "--wait", list}, &out, &errOut); err != nil {
		t.Fatalf("expire CLI: %v\n%s%s", err, out.String(), errOut.String())
	}
	if !slices.Contains(jobLogSet(d), "exp_GRID 5 2 28") { // sw: 31-3 = 28
		t.Errorf("CLI list not rendered: %q", jobLogSet(d))
	}
}

func TestExpireSpoolDir(t *testing.T) {
	dir := shortTempDir(t)
	spool := dir + "/spool"
	os.MkdirAll(spool+"/exp_GRID", 0o755)
	os.MkdirAll(spool+"/plain_GRID", 0o755)
	d := newTestDaemon(t, daemonOpts{maxSeed: -1, rendArgs: []string{"-caches", expireCaches},
		extraYAML: "expire_dir: " + spool + "\nexpire_min_zoom: 3\nexpire_delete_from: 4\n"})
	// A half-written file (dot name) is left alone; renamed into place it is taken.
	os.WriteFile(spool+"/exp_GRID/.incoming", []byte("3/0/0\n4/2"), 0o644)
	os.WriteFile(spool+"/plain_GRID/a.list", []byte("3/0/0\n"), 0o644)
	deadline := time.Now().Add(30 * time.Second)
	for {
		if _, err := os.Stat(spool + "/plain_GRID/a.list.rejected"); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("list for a non-XYZ cache not rejected")
		}
		time.Sleep(20 * time.Millisecond) // polling the spool, bounded by the deadline
	}
	if n := len(d.jobLog()); n != 0 {
		t.Fatalf("%d renders from a half-written list", n)
	}
	f, _ := os.OpenFile(spool+"/exp_GRID/.incoming", os.O_APPEND|os.O_WRONLY, 0)
	f.WriteString("/2\n")
	f.Close()
	if err := os.Rename(spool+"/exp_GRID/.incoming", spool+"/exp_GRID/b.list"); err != nil {
		t.Fatal(err)
	}
	d.waitFor("the spooled list's task", func(s statusDoc) bool {
		cl := d.dial()
		cl.send(`{"command":"tasks","id":"t"}`)
		r := cl.read()
		cl.c.Close()
		var docs []taskDoc
		json.Unmarshal(r.Tasks, &docs)
		return len(docs) == 1 && docs[0].State == taskStateDone
	})
	if _, err := os.Stat(spool + "/exp_GRID/b.list"); !os.IsNotExist(err) {
		t.Errorf("spooled list still there: %v", err)
	}
	// 3/0/0 → z3 internal (0,7) → meta (0,6); 4/2/2 → z4 internal (2,13) → (2,12) delete; z3 (1,1) → internal (1,6) → (0,6) seen.
	want := []string{"exp_GRID 3 0 6", "exp_GRID 4 2 12 delete"}
	if got := jobLogSet(d); !slices.Equal(got, want) {
		t.Errorf("renders %q, want %q", got, want)
	}
}

// TestMapProxyExpire runs expiry lists through the bundled worker and a real MapProxy
// cache: its ready line marks GLOBAL_WEBMERCATOR caches "xyz": "nw" (and not the geodetic
// one), deletes remove a metatile's files, and re-renders write them.
func TestMapProxyExpire(t *testing.T) {
	cli := run // the program; run below is this test's expiry helper
	r := newMapProxyRig(t)
	d := &testDaemon{t: t, socket: r.socket}
	call := func(line string) Reply {
		cl := d.dial()
		defer cl.c.Close()
		cl.send(line)
		return cl.read()
	}
	if rep := call(`{"command":"expire","id":"g","cache_identifier":"geo_cache_GLOBAL_GEODETIC","lines":"1/0/0"}`); rep.Status != statusError || !strings.Contains(rep.ErrorMessage, "XYZ") {
		t.Errorf("geodetic cache: %+v, want an error: not the XYZ pyramid", rep)
	}
	if code, _, body, _ := r.get(r.mpTCP + "wmts/wmsl/GLOBAL_WEBMERCATOR/5/17/10.png"); code != 200 || !isPNG(body) {
		t.Fatalf("wmts: %d", code)
	}
	if n := len(r.pngFiles("wms_cache_EPSG3857/05")); n != 16 {
		t.Fatalf("%d tiles at level 5 after the render, want 16", n)
	}
	run := func(line string) taskDoc {
		rep := call(line)
		if rep.Status != statusQueued {
			t.Fatalf("expire: %+v", rep)
		}
		var doc taskDoc
		json.Unmarshal(rep.Task, &doc)
		return waitTaskDone(t, d, doc.TaskID)
	}
	// Only what is cached is re-rendered (the default, as mod_tile's render_expired):
	// 6/34/20's metatile was never cached and is skipped; its parent 5/17/10 is re-rendered.
	old := time.Now().Add(-2 * time.Hour)
	for _, f := range r.pngFiles("wms_cache_EPSG3857/05") {
		os.Chtimes(r.dir+"/cache_data/wms_cache_EPSG3857/05/"+f, old, old)
	}
	doc := run(`{"command":"expire","id":"e0","cache_identifier":"wms_cache_GLOBAL_WEBMERCATOR","lines":"6/34/20\n","min_zoom":5}`)
	if doc.State != taskStateDone || doc.Done != 1 || doc.Skipped != 1 {
		t.Errorf("run over a cached and a never-cached metatile: %+v, want done 1, skipped 1", doc)
	}
	if files := r.pngFiles("wms_cache_EPSG3857/06"); len(files) != 0 {
		t.Errorf("level 6, never cached, after the expiry: %v, want no tiles", files)
	}
	for _, f := range r.pngFiles("wms_cache_EPSG3857/05") {
		if fi, err := os.Stat(r.dir + "/cache_data/wms_cache_EPSG3857/05/" + f); err != nil || !fi.ModTime().After(old.Add(time.Hour)) {
			t.Errorf("level 5 tile %s was not re-rendered (%v)", f, err)
		}
	}

	doc = run(`{"command":"expire","id":"e1","cache_identifier":"wms_cache_GLOBAL_WEBMERCATOR","lines":"5/17/10\n","min_zoom":5,"delete_from":5}`)
	if doc.State != taskStateDone || doc.Deleted != 1 || doc.Done != 0 {
		t.Errorf("delete run: %+v, want done with 1 deleted", doc)
	}
	if files := r.pngFiles("wms_cache_EPSG3857/05"); len(files) != 0 {
		t.Errorf("level 5 after the delete: %v, want no tiles", files)
	}
	// 6/40/21 and its parent 5/20/10, never cached: nothing is rendered.
	renders := func() uint64 { // renderer jobs that rendered (rendered counts skipped ones too)
		st := r.status()
		return st.Counters["rendered"] - st.Counters["render_skipped"]
	}
	rendered := renders()
	doc = run(`{"command":"expire","id":"e2","cache_identifier":"wms_cache_GLOBAL_WEBMERCATOR","lines":"6/40/21\n","min_zoom":5}`)
	if doc.State != taskStateDone || doc.Done != 0 || doc.Skipped != 2 || doc.Deleted != 0 {
		t.Errorf("run over a never-cached area: %+v, want done 0, skipped 2", doc)
	}
	if n5, n6 := len(r.pngFiles("wms_cache_EPSG3857/05")), len(r.pngFiles("wms_cache_EPSG3857/06")); n5 != 0 || n6 != 0 {
		t.Errorf("after expiring a never-cached area: %d tiles at level 5 and %d at level 6, want none", n5, n6)
	}
	if got := renders(); got != rendered {
		t.Errorf("renders of the cache: %d before, %d after expiring a never-cached area; want no render", rendered, got)
	}
	// The CLI's --only-cached=false (POST /expire?only_cached=false): both metatiles rendered.
	list := r.dir + "/list"
	os.WriteFile(list, []byte("6/40/21\n"), 0o644)
	var out, errOut bytes.Buffer
	if err := cli(t.Context(), []string{"expire", "--socket", r.socket, "--cache", "wms_cache_GLOBAL_WEBMERCATOR", "--min-zoom", "5", "--only-cached=false", "--wait", list}, &out, &errOut); err != nil {
		t.Fatalf("expire --only-cached=false: %v\n%s%s", err, out.String(), errOut.String())
	}
	if n5, n6 := len(r.pngFiles("wms_cache_EPSG3857/05")), len(r.pngFiles("wms_cache_EPSG3857/06")); n5 != 16 || n6 != 16 {
		t.Errorf("after the re-render: %d tiles at level 5 and %d at level 6, want 16 and 16", n5, n6)
	}
}

// TestExpireOnlyCachedJob: an expiry run's job asks the renderer for only_cached; a request
// that joins it (live, seed, prefetch: they want the render) takes that away.
func TestExpireOnlyCachedJob(t *testing.T) {
	s := newScheduler(Config{SeedPriorityBelow: 50, MaxQueued: 10, Renderers: 1}, nil, rendererConfig{})
	c := s.newCache("c")
	keys := []jobKey{{cache: c.idx, x: 4, y: 4, z: 3}}
	expiry := &pendingRequest{req: Request{Command: "tile", OnlyCached: true}}
	if _, err := s.qs.add(keys, 10, false, expiry, 0); err != nil {
		t.Fatal(err)
	}
	j := s.qs.jobs[keys[0]]
	if j == nil || j.flags&anyCacheJob != 0 {
		t.Fatalf("expiry job %v: want one without anyCacheJob", j)
	}
	line := string(appendJobLine(nil, "1", renderJob{cache: "c", tile: tileCoord{4, 4, 3}, refresh: true, onlyCached: j.flags&anyCacheJob == 0}))
	if !strings.Contains(line, `"only_cached":true`) || !json.Valid([]byte(line)) {
		t.Errorf("got %s, want valid JSON with \"only_cached\":true", line)
	}
	if line := string(appendJobLine(nil, "2", renderJob{cache: "c", delete: true, onlyCached: true})); strings.Contains(line, "only_cached") {
		t.Errorf("delete job line %s: only_cached means nothing to a delete", line)
	}
	live := &pendingRequest{req: Request{Command: "tile"}}
	if _, err := s.qs.add(keys, 100, false, live, 0); err != nil {
		t.Fatal(err)
	}
	if j.flags&anyCacheJob == 0 {
		t.Errorf("after a live request joined: flags %b, want anyCacheJob (render cached or not)", j.flags)
	}
	line = string(appendJobLine(nil, "3", renderJob{cache: "c", tile: tileCoord{4, 4, 3}, refresh: true, onlyCached: j.flags&anyCacheJob == 0}))
	if strings.Contains(line, "only_cached") {
		t.Errorf("got %s after a live request joined, want no only_cached", line)
	}
}

// TestExpireOnlyCachedKey: expire_only_cached sets what spooled lists do (default: only
// what is cached).
func TestExpireOnlyCachedKey(t *testing.T) {
	for _, tt := range []struct {
		yaml      string
		renderAll bool
	}{{"", false}, {"expire_only_cached: true\n", false}, {"expire_only_cached: false\n", true}} {
		c := defaultConfig()
		if err := parseConfig(&c, strings.NewReader(tt.yaml)); err != nil {
			t.Fatal(err)
		}
		if got := c.spoolRange().RenderAll; got != tt.renderAll {
			t.Errorf("%q: spooled lists render all: got %v, want %v", tt.yaml, got, tt.renderAll)
		}
	}
}
