// SPDX-License-Identifier: Apache-2.0

package main

import (
	"fmt"
	"io"
	"net/http"
	"os"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
)

// startBurstFrontEnds starts n MapProxy processes with the module (wait_ms 1000) on the
// rig's cache, tile locks and daemon, and returns their base URLs. Their mapproxy.yaml sets
// http.client_timeout to 3 s, which is also how long MapProxy waits for a tile lock: a
// module that queued behind the lock for wait_ms per request would make the fourth request
// of a burst fail with MapProxy's lock timeout instead of answering it.
func (r *moduleRig) startBurstFrontEnds(n int) []string {
	t := r.t
	r.writeFrontYAML()
	wsgi := fmt.Sprintf(`import sys
sys.path.insert(0, %q)
import mapproxy_renderd; mapproxy_renderd.enable(wait_ms=1000)
from mapproxy.wsgiapp import make_wsgi_app
application = make_wsgi_app(%q)
`, r.dir, r.dir+"/mapproxy-front.yaml")
	if err := os.WriteFile(r.dir+"/burst_wsgi.py", []byte(wsgi), 0o644); err != nil {
		t.Fatal(err)
	}
	var bases []string
	for range n {
		bases = append(bases, r.serveWSGI(r.dir+"/burst_wsgi.py", nil))
	}
	return bases
}

// writeFrontYAML writes mapproxy-front.yaml: the rig's mapproxy.yaml with MapProxy's lock
// timeout (http.client_timeout) at 3 s.
func (r *moduleRig) writeFrontYAML() string {
	conf, err := os.ReadFile(r.dir + "/mapproxy.yaml")
	if err != nil {
		r.t.Fatal(err)
	}
	front := strings.Replace(string(conf), "globals:\n", "globals:\n  http: {client_timeout: 3}\n", 1)
	if err := os.WriteFile(r.dir+"/mapproxy-front.yaml", []byte(front), 0o644); err != nil {
		r.t.Fatal(err)
	}
	return r.dir + "/mapproxy-front.yaml"
}

type burstAnswer struct {
	status int
	cc     string
	body   []byte
	took   time.Duration
	err    error
}

// burst GETs the 16 WMTS tiles of the 4×4 metatile of burst_cache at z4 whose first column
// is x0, all at once, spread over the front ends in turn.
func (r *moduleRig) burst(bases []string, x0 int) []burstAnswer {
	answers := make([]burstAnswer, 16)
	var wg sync.WaitGroup
	start := make(chan struct{})
	for i := range answers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			u := fmt.Sprintf("%swmts/burst/GLOBAL_WEBMERCATOR/4/%d/%d.png", bases[i%len(bases)], x0+i%4, i/4)
			c := &http.Client{Timeout: 120 * time.Second}
			<-start
			t0 := time.Now()
			resp, err := c.Get(u)
			a := &answers[i]
			if err != nil {
				a.err = err
				return
			}
			a.body, a.err = io.ReadAll(resp.Body)
			resp.Body.Close()
			a.status, a.cc, a.took = resp.StatusCode, resp.Header.Get("Cache-Control"), time.Since(t0)
		}()
	}
	close(start)
	wg.Wait()
	return answers
}

// TestMapProxyModuleBurst: a map view asks for every tile of a metatile at once. With the
// module every request of the burst gets the waiting tile after its own wait_ms (none waits
// for another's), on one MapProxy process and across three, and the metatile is rendered once.
func TestMapProxyModuleBurst(t *testing.T) {
	r := newModuleRig(t)
	for i, n := range []int{1, 3} {
		t.Run(fmt.Sprintf("%d MapProxy processes", n), func(t *testing.T) {
			r.t = t
			r.checkBurst(r.startBurstFrontEnds(n), 4*i, fmt.Sprintf("%d serve_wsgi.py process(es)", n))
		})
	}
}

// checkBurst sends a burst of 16 (burst) for the metatile at z4 whose first column is x0,
// while its render takes 6 s: every request must get the waiting tile, the metatile must be
// rendered once, and afterwards the real tile is served.
func (r *moduleRig) checkBurst(bases []string, x0 int, what string) {
	t := r.t
	const cacheID = "burst_cache_GLOBAL_WEBMERCATOR"
	before := r.status().Caches[cacheID]["rendered"]
	r.setDelay(6) // the render takes longer than the whole burst may
	answers := r.burst(bases, x0)
	r.setDelay(0)
	var took []time.Duration
	for j, a := range answers {
		if a.err != nil || a.status != 200 || !isPNG(a.body) || !strings.Contains(a.cc, "max-age=5") {
			t.Errorf("request %d: got %v, HTTP %d, Cache-Control %q, %.200q; want the waiting tile (max-age=5)",
				j, a.err, a.status, a.cc, a.body)
		}
		took = append(took, a.took)
	}
	slices.Sort(took)
	t.Logf("burst of 16 over %s, wait_ms 1000, render 6 s: answered after %v (fastest) .. %v (median) .. %v (slowest)",
		what, took[0].Round(time.Millisecond), took[8].Round(time.Millisecond), took[15].Round(time.Millisecond))

	// The render goes on and happens once for the whole burst.
	deadline := time.Now().Add(60 * time.Second)
	for r.status().Caches[cacheID]["rendered"] == before {
		if time.Now().After(deadline) {
			t.Fatalf("the burst's metatile was not rendered")
		}
		time.Sleep(50 * time.Millisecond) // polling the status, bounded by the deadline
	}
	if got := r.status().Caches[cacheID]["rendered"] - before; got != 1 {
		t.Errorf("renders of the burst's metatile: got %d, want 1", got)
	}
	c := &http.Client{Timeout: 60 * time.Second}
	resp, err := c.Get(fmt.Sprintf("%swmts/burst/GLOBAL_WEBMERCATOR/4/%d/3.png", bases[0], x0+3))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if cc := resp.Header.Get("Cache-Control"); resp.StatusCode != 200 || !strings.Contains(cc, mapproxyMaxAge) {
		t.Errorf("after the render: HTTP %d, Cache-Control %q; want the cached tile (%s)", resp.StatusCode, cc, mapproxyMaxAge)
	}
}
