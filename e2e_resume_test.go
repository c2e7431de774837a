// SPDX-License-Identifier: Apache-2.0

package main

import (
	"bytes"
	"encoding/json"
	"image"
	"image/png"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// countingWMS is an upstream WMS that counts GetMap requests by bbox and size (one per metatile with
// MapProxy's meta requests) and serves only as many as the test allows: a request beyond
// the allowance waits until more are allowed.
type countingWMS struct {
	mu      sync.Mutex
	cond    *sync.Cond
	allowed int // requests that may be served; < 0: any
	served  map[string]int
	total   int
	srv     *http.Server
	addr    string
}

func startCountingWMS(t *testing.T) *countingWMS {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	w := &countingWMS{served: map[string]int{}, addr: l.Addr().String()}
	w.cond = sync.NewCond(&w.mu)
	w.srv = &http.Server{Handler: http.HandlerFunc(w.serve)}
	go w.srv.Serve(l)
	t.Cleanup(func() {
		w.allow(-1)
		w.srv.Close()
	})
	return w
}

func (w *countingWMS) serve(rw http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	width, _ := strconv.Atoi(q.Get("WIDTH") + q.Get("width"))
	height, _ := strconv.Atoi(q.Get("HEIGHT") + q.Get("height"))
	if width <= 0 || height <= 0 || width > 4096 || height > 4096 {
		http.Error(rw, "bad size", http.StatusBadRequest)
		return
	}
	// z0 and z1 have the same bbox (the world) at different sizes.
	key := q.Get("BBOX") + q.Get("bbox") + " " + strconv.Itoa(width) + "x" + strconv.Itoa(height)
	w.mu.Lock()
	for w.allowed == 0 {
		w.cond.Wait()
	}
	if w.allowed > 0 {
		w.allowed--
	}
	w.served[key]++
	w.total++
	w.mu.Unlock()
	var buf bytes.Buffer
	png.Encode(&buf, image.NewNRGBA(image.Rect(0, 0, width, height)))
	rw.Header().Set("Content-Type", "image/png")
	rw.Write(buf.Bytes())
}

// allow lets n more requests through (n < 0: all from now on).
func (w *countingWMS) allow(n int) {
	w.mu.Lock()
	if n < 0 || w.allowed < 0 {
		w.allowed = -1
	} else {
		w.allowed += n
	}
	w.cond.Broadcast()
	w.mu.Unlock()
}

func (w *countingWMS) counts() (map[string]int, int) {
	w.mu.Lock()
	defer w.mu.Unlock()
	m := make(map[string]int, len(w.served))
	for k, v := range w.served {
		m[k] = v
	}
	return m, w.total
}

// TestSeedResumesAfterSIGKILLWithMapProxy (README): a refresh seed
// (refresh_before: {seconds: 0}) with the bundled planner and renderers and real MapProxy,
// SIGKILLed in the middle, resumes after the restart from its journaled checkpoint: no
// metatile rendered before the checkpoint is rendered again, so the repeats are at most the
// metatiles rendered after it (one checkpoint interval) plus those running at the kill, and
// every metatile of the seed is rendered. Before the fix the restart re-resolved
// "seconds: 0" to the restart time and found no checkpoint: every metatile rendered
// before the kill was rendered again.
func TestSeedResumesAfterSIGKILLWithMapProxy(t *testing.T) {
	t.Parallel()
	requireMapProxy(t)
	const renderers, beforeKill = 2, 40
	wms := startCountingWMS(t)
	dir := shortTempDir(t)
	exe := lcExecutable(t)
	sock := dir + "/s.sock"
	files := map[string]string{
		"mapproxy.yaml": `globals:
  cache: {base_dir: ./cache, lock_dir: ./cache/locks}
  renderd: {address: "http://` + freeTCPAddr(t) + `"}
services: {tms: {use_grid_names: true}}
layers: [{name: l, title: l, sources: [c]}]
caches:
  c: {grids: [GLOBAL_WEBMERCATOR], sources: [up], format: image/png, meta_size: [4, 4], meta_buffer: 0}
sources:
  up: {type: wms, supported_srs: ['EPSG:3857'], req: {url: "http://` + wms.addr + `/service", layers: x}}
`,
		"seed.yaml": `coverages:
  box: {bbox: [8.0, 47.5, 12.0, 50.0], srs: 'EPSG:4326'}
seeds:
  refresh:
    caches: [c]
    grids: [GLOBAL_WEBMERCATOR]
    coverages: [box]
    levels: {from: 0, to: 11}
    refresh_before: {seconds: 0}
`,
		"renderd.yaml": "socket: " + sock + "\nhttp: \"\"\nrenderers: " + strconv.Itoa(renderers) + "\nmax_seed_renderers: " +
			strconv.Itoa(renderers) + "\nseed_config: " + dir + "/seed.yaml\nstate_dir: " + dir + "/state\nrender_timeout: 120s\n",
	}
	for name, content := range files {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	total := countPlanned(t, dir)
	if total < 2*beforeKill {
		t.Fatalf("the seed has %d metatiles, want at least %d", total, 2*beforeKill)
	}
	argv := []string{exe, "daemon", "-f", dir + "/mapproxy.yaml", "-c", dir + "/renderd.yaml"}
	p := startLCProc(t, argv, lcEnv(), nil)
	p.out.waitFor(t, "msg=ready", 1)
	c := lcDial(t, "unix", sock)
	c.send(`{"command":"seed","id":"s","task":"refresh"}`)
	id := taskOf(t, c.expectReply("s", statusQueued)).TaskID

	// The resolved spec is journaled before the first metatile: its refresh_before is the
	// start, in whole seconds. Renders in that same second count as stale for MapProxy
	// (int(mtime) <= refresh_before), so the test lets renders begin one second later.
	var refreshBefore float64
	pollUntil(t, "the resolved spec in the journal", func() bool {
		for _, jt := range journaledTasks(t, dir+"/state") {
			var js journaledSpec
			if jt.ID == id && json.Unmarshal(jt.Spec, &js) == nil && js.Spec.Resolved != nil {
				var r struct {
					RefreshBefore float64 `json:"refresh_before"`
				}
				json.Unmarshal(js.Spec.Resolved, &r)
				refreshBefore = r.RefreshBefore
				return r.RefreshBefore > 0
			}
		}
		return false
	})
	pollUntil(t, "the second after refresh_before", func() bool { return float64(time.Now().Unix()) > refreshBefore })
	wms.allow(beforeKill)

	// beforeKill renders are served; then the renderers wait on the upstream. Kill once the
	// checkpoint has caught up with the finished renders as far as the cursors allow.
	var cp *taskCounted
	pollUntil(t, "a checkpoint close to the finished renders", func() bool {
		if _, n := wms.counts(); n < beforeKill {
			return false
		}
		for _, jt := range journaledTasks(t, dir+"/state") {
			if jt.ID == id {
				_, cp = decodeCheckpoint(jt.Cursor)
			}
		}
		return cp != nil && cp.Done >= beforeKill-10
	})
	c.send(`{"command":"task","id":"b","task_id":"` + id + `"}`)
	docBefore := taskOf(t, c.expectReply("b", statusOK))
	p.signal(syscall.SIGKILL)
	p.wait(lcDeadline)
	wms.allow(-1) // the orphaned renderers finish their metatile and exit
	served, _ := wms.counts()
	t.Logf("before the kill: %d metatiles served, task done %d; checkpoint: planned %d done %d", len(served), docBefore.Done, cp.Planned, cp.Done)

	p2 := startLCProc(t, argv, lcEnv(), nil)
	p2.out.waitFor(t, "journal: task resumed", 1)
	var doc taskDoc
	pollUntil(t, "the resumed task to end", func() bool {
		c2 := lcDial(t, "unix", sock)
		defer c2.c.Close()
		c2.send(`{"command":"task","id":"w","task_id":"` + id + `"}`)
		doc = taskOf(t, c2.expectReply("w", statusOK))
		return doc.finished()
	})
	if doc.State != taskStateDone || doc.Failed != 0 {
		t.Fatalf("resumed task %+v, want done without failures", doc)
	}
	after, hits := wms.counts()
	repeats := 0
	for _, n := range after {
		repeats += n - 1
	}
	// Every metatile finished after the checkpoint may repeat, and each running at the kill.
	bound := int(docBefore.Done-cp.Done) + renderers
	t.Logf("%d metatiles, %d upstream requests, %d repeated; bound %d (%d finished after the checkpoint + %d running); resumed task planned %d done %d",
		total, hits, repeats, bound, docBefore.Done-cp.Done, renderers, doc.Planned, doc.Done)
	if len(after) != total {
		t.Errorf("%d distinct metatiles rendered, the seed has %d", len(after), total)
	}
	if repeats > bound {
		t.Errorf("%d metatiles rendered again after the restart, want at most %d", repeats, bound)
	}
	// The task keeps its id and its first start, and its counts go on from the checkpoint.
	if doc.Started != docBefore.Started || doc.Created != docBefore.Created {
		t.Errorf("resumed task created %s started %s, before the kill %s %s", doc.Created, doc.Started, docBefore.Created, docBefore.Started)
	}
	if doc.Done < cp.Done || doc.Planned < cp.Planned || doc.Done+doc.Skipped != doc.Planned {
		t.Errorf("resumed task planned %d done %d skipped %d; checkpoint planned %d done %d", doc.Planned, doc.Done, doc.Skipped, cp.Planned, cp.Done)
	}
}

// countPlanned runs the bundled planner on dir's seed.yaml entry "refresh" and counts its
// metatiles (the cache is empty: every metatile is planned).
func countPlanned(t *testing.T, dir string) int {
	t.Helper()
	script := filepath.Join(dir, "plan_worker.py")
	if err := os.WriteFile(script, bundledWorker, 0o644); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("/usr/bin/python3", script, "plan", filepath.Join(dir, "mapproxy.yaml"))
	cmd.Dir = dir
	cmd.Stdin = strings.NewReader(`{"kind":"seed","seed_config":"` + dir + `/seed.yaml","name":"refresh"}` + "\n")
	cmd.WaitDelay = 5 * time.Second
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("planner: %v\n%s", err, out)
	}
	return strings.Count(string(out), `"tile": [`)
}
