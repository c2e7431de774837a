// SPDX-License-Identifier: Apache-2.0

package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"image/png"
	"io"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// moduleRig is real MapProxy with and without python/mapproxy_renderd.py in front of the
// daemon (Unix socket, bundled worker), and an upstream WMS whose answers take as long as
// the file "delay" says.
type moduleRig struct {
	*mapproxyRig
	withModule string // base URL of the MapProxy with the module
	plain      string // base URL of the MapProxy without it (requests_unixsocket)
}

func newModuleRig(t *testing.T) *moduleRig {
	requireMapProxy(t)
	repo, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	dir := shortTempDir(t)
	r := &moduleRig{mapproxyRig: &mapproxyRig{t: t, dir: dir, socket: dir + "/renderd.sock", log: &syncBuffer{}}}
	r.setDelay(0)
	slow := fmt.Sprintf(`import time
from mapproxy.wsgiapp import make_wsgi_app
_app = make_wsgi_app(%q)
def application(environ, start_response):
    with open(%q) as f:
        time.sleep(float(f.read()))
    return _app(environ, start_response)
`, filepath.Join(repo, "examples/upstream.yaml"), dir+"/delay")
	if err := os.WriteFile(dir+"/slow_wsgi.py", []byte(slow), 0o644); err != nil {
		t.Fatal(err)
	}
	upstream := r.serveWSGI(dir+"/slow_wsgi.py", nil)
	conf := fmt.Sprintf(`globals:
  cache: {base_dir: %[1]s/cache_data, lock_dir: %[1]s/cache_data/locks, tile_lock_dir: %[1]s/cache_data/tile_locks}
  renderd: {address: "http+unix://%[2]s/"}
services: {wmts: {}}
layers:
  - {name: slow, title: slow upstream, sources: [slow_cache]}
  - {name: burst, title: slow upstream in 4x4 metatiles, sources: [burst_cache]}
caches:
  slow_cache:
    grids: [GLOBAL_WEBMERCATOR]
    sources: [slow_wms]
    format: image/png
    meta_size: [2, 2]
    refresh_before: {minutes: 30}
  burst_cache: {grids: [GLOBAL_WEBMERCATOR], sources: [slow_wms], format: image/png, meta_size: [4, 4]}
sources:
  slow_wms: {type: wms, supported_srs: ['EPSG:3857'], req: {url: "%[3]sservice", layers: dbg, transparent: true}}
`, dir, url.PathEscape(r.socket), upstream)
	if err := os.WriteFile(dir+"/mapproxy.yaml", []byte(conf), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(dir+"/renderd.yaml", []byte("socket: "+r.socket+"\nhttp: \"\"\nrenderers: 2\nrender_timeout: 30s\nstate_dir: "+dir+"/state\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	runConfiguredDaemon(t, r.socket, r.log, "-f", dir+"/mapproxy.yaml", "-c", dir+"/renderd.yaml")

	// The module as an operator installs it, and the one line that enables it.
	var out bytes.Buffer
	if err := run(context.Background(), []string{"install-module", dir}, &out, &out); err != nil {
		t.Fatalf("install-module: %v\n%s", err, out.String())
	}
	wsgi := fmt.Sprintf(`import sys
sys.path.insert(0, %q)
import mapproxy_renderd; mapproxy_renderd.enable(wait_ms=1500)
from mapproxy.wsgiapp import make_wsgi_app
application = make_wsgi_app(%q)
`, dir, dir+"/mapproxy.yaml")
	if err := os.WriteFile(dir+"/module_wsgi.py", []byte(wsgi), 0o644); err != nil {
		t.Fatal(err)
	}
	r.withModule = r.serveWSGI(dir+"/module_wsgi.py", nil)
	r.plain = r.serveWSGI(filepath.Join(repo, "examples/mapproxy_wsgi.py"), []string{"MAPPROXY_CONFIG=" + dir + "/mapproxy.yaml"})
	return r
}

func (r *moduleRig) setDelay(s float64) {
	if err := os.WriteFile(r.dir+"/delay", []byte(fmt.Sprint(s)), 0o644); err != nil {
		r.t.Fatal(err)
	}
}

// tileFile is where MapProxy stores WMTS tile z/x/y of slow_cache (nw grid: y is the row).
func (r *moduleRig) tileFile(z, x, y int) string {
	return fmt.Sprintf("%s/cache_data/slow_cache_EPSG3857/%02d/000/000/%03d/000/000/%03d.png", r.dir, z, x, y)
}

// fetch GETs a WMTS tile and returns the body and the Cache-Control header.
func (r *moduleRig) fetch(base string, z, x, y int) ([]byte, string) {
	r.t.Helper()
	c := &http.Client{Timeout: 120 * time.Second}
	resp, err := c.Get(fmt.Sprintf("%swmts/slow/GLOBAL_WEBMERCATOR/%d/%d/%d.png", base, z, x, y))
	if err != nil {
		r.t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != 200 || !isPNG(b) {
		r.t.Fatalf("tile %d/%d/%d: got %d %.300q", z, x, y, resp.StatusCode, b)
	}
	return b, resp.Header.Get("Cache-Control")
}

// waitFile polls until cond holds for the file's state, failing at a deadline.
func (r *moduleRig) waitFile(path, what string, cond func(fi os.FileInfo, err error) bool) {
	r.t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for {
		fi, err := os.Stat(path)
		if cond(fi, err) {
			return
		}
		if time.Now().After(deadline) {
			r.t.Fatalf("%s: timed out waiting for %s", path, what)
		}
		time.Sleep(20 * time.Millisecond) // polling the tile cache, bounded by the deadline
	}
}

func (r *moduleRig) sameAsFile(body []byte, path string) bool {
	b, err := os.ReadFile(path)
	return err == nil && bytes.Equal(b, body)
}

const mapproxyMaxAge = "max-age=259200" // MapProxy's default tiles.expires_hours: 72

// startEarlyDaemon starts a second daemon with http_wait on another socket, and an
// unmodified MapProxy (requests_unixsocket) in front of it; it returns MapProxy's base URL.
func (r *moduleRig) startEarlyDaemon() string {
	t := r.t
	repo, _ := os.Getwd()
	sock := r.dir + "/early.sock"
	conf, err := os.ReadFile(r.dir + "/mapproxy.yaml")
	if err != nil {
		t.Fatal(err)
	}
	early := strings.Replace(string(conf), url.PathEscape(r.socket), url.PathEscape(sock), 1)
	if err := os.WriteFile(r.dir+"/mapproxy-early.yaml", []byte(early), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(r.dir+"/renderd-early.yaml", []byte("socket: "+sock+"\nhttp: \"\"\nrenderers: 1\nhttp_wait: 500ms\nstate_dir: "+r.dir+"/state-early\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	runConfiguredDaemon(t, sock, &syncBuffer{}, "-f", r.dir+"/mapproxy-early.yaml", "-c", r.dir+"/renderd-early.yaml")
	return r.serveWSGI(filepath.Join(repo, "examples/mapproxy_wsgi.py"), []string{"MAPPROXY_CONFIG=" + r.dir + "/mapproxy-early.yaml"})
}

func TestMapProxyModuleEndToEnd(t *testing.T) {
	r := newModuleRig(t)

	t.Run("fast render: the real tile", func(t *testing.T) {
		r.t = t
		body, cc := r.fetch(r.withModule, 3, 1, 1)
		if !r.sameAsFile(body, r.tileFile(3, 1, 1)) || !strings.Contains(cc, mapproxyMaxAge) {
			t.Fatalf("got %d bytes with Cache-Control %q; want the cached file with %s", len(body), cc, mapproxyMaxAge)
		}
	})

	t.Run("slow render: the waiting image with a short max-age, later the real tile", func(t *testing.T) {
		r.t = t
		r.setDelay(4)
		body, cc := r.fetch(r.withModule, 3, 5, 5)
		if !strings.Contains(cc, "max-age=5") {
			t.Errorf("waiting image: Cache-Control %q, want max-age=5", cc)
		}
		if _, err := os.Stat(r.tileFile(3, 5, 5)); err == nil {
			t.Fatalf("the tile is already on disk: the module waited for the render instead of answering early")
		}
		r.waitFile(r.tileFile(3, 5, 5), "the render that went on", func(_ os.FileInfo, err error) bool { return err == nil })
		r.setDelay(0)
		real, cc := r.fetch(r.withModule, 3, 5, 5)
		if !r.sameAsFile(real, r.tileFile(3, 5, 5)) || !strings.Contains(cc, mapproxyMaxAge) {
			t.Fatalf("after the render: got %d bytes, Cache-Control %q; want the cached file with %s", len(real), cc, mapproxyMaxAge)
		}
		if bytes.Equal(real, body) {
			t.Errorf("the waiting image is the real tile")
		}
		if n := r.status().Counters["pending"]; n != 1 {
			t.Errorf("pending answers: got %d, want 1", n)
		}
	})

	t.Run("without the module MapProxy waits for the render as before", func(t *testing.T) {
		r.t = t
		r.setDelay(2)
		defer r.setDelay(0)
		body, cc := r.fetch(r.plain, 3, 1, 6)
		if !r.sameAsFile(body, r.tileFile(3, 1, 6)) || !strings.Contains(cc, mapproxyMaxAge) {
			t.Fatalf("got %d bytes with Cache-Control %q; want the rendered file with %s", len(body), cc, mapproxyMaxAge)
		}
	})

	t.Run("stale tile: served at once with a short max-age, rewritten in the background", func(t *testing.T) {
		r.t = t
		old := time.Now().Add(-2 * time.Hour) // refresh_before: 30 minutes
		for _, xy := range [][2]int{{0, 0}, {1, 0}, {0, 1}, {1, 1}} {
			if err := os.Chtimes(r.tileFile(3, xy[0], xy[1]), old, old); err != nil {
				t.Fatal(err)
			}
		}
		r.setDelay(3)
		defer r.setDelay(0)
		staleBody, err := os.ReadFile(r.tileFile(3, 1, 1))
		if err != nil {
			t.Fatal(err)
		}
		body, cc := r.fetch(r.withModule, 3, 1, 1)
		fi, err := os.Stat(r.tileFile(3, 1, 1))
		if err != nil || !fi.ModTime().Before(old.Add(time.Second)) {
			t.Fatalf("the tile was rewritten before the answer (%v): the module waited for the refresh", err)
		}
		if !bytes.Equal(body, staleBody) || !strings.Contains(cc, "max-age=5") {
			t.Errorf("got %d bytes with Cache-Control %q; want the stale file with max-age=5", len(body), cc)
		}
		r.waitFile(r.tileFile(3, 1, 1), "the background refresh", func(fi os.FileInfo, err error) bool {
			return err == nil && fi.ModTime().After(old.Add(time.Hour))
		})
		// Plain MapProxy on a stale tile waits for the re-render.
		for _, xy := range [][2]int{{0, 0}, {1, 0}, {0, 1}, {1, 1}} {
			os.Chtimes(r.tileFile(3, xy[0], xy[1]), old, old)
		}
		r.setDelay(0)
		body, cc = r.fetch(r.plain, 3, 1, 1)
		if fi, err := os.Stat(r.tileFile(3, 1, 1)); err != nil || !fi.ModTime().After(old.Add(time.Hour)) || !r.sameAsFile(body, r.tileFile(3, 1, 1)) {
			t.Errorf("without the module: want the re-rendered tile at once, got %d bytes, %q", len(body), cc)
		}
	})

	// http_wait with unmodified MapProxy: what README "Answering MapProxy early" says.
	t.Run("http_wait: unmodified MapProxy serves a transparent tile cached for 72 h", func(t *testing.T) {
		r.t = t
		plainEarly := r.startEarlyDaemon()
		r.setDelay(3)
		defer r.setDelay(0)
		body, cc := r.fetch(plainEarly, 3, 6, 1)
		if !strings.Contains(cc, mapproxyMaxAge) {
			t.Errorf("Cache-Control %q, want MapProxy's %s", cc, mapproxyMaxAge)
		}
		if _, err := os.Stat(r.tileFile(3, 6, 1)); err == nil {
			t.Fatalf("the tile is on disk already: the daemon did not answer early")
		}
		img, err := png.Decode(bytes.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		b := img.Bounds()
		for y := b.Min.Y; y < b.Max.Y; y++ {
			for x := b.Min.X; x < b.Max.X; x++ {
				if _, _, _, a := img.At(x, y).RGBA(); a != 0 {
					t.Fatalf("pixel (%d, %d) is not transparent: MapProxy served something else than its empty tile", x, y)
				}
			}
		}
		r.waitFile(r.tileFile(3, 6, 1), "the render that went on", func(_ os.FileInfo, err error) bool { return err == nil })
	})

	t.Run("refuses a MapProxy whose classes differ", func(t *testing.T) {
		r.t = t
		src := fmt.Sprintf(`import sys
sys.path.insert(0, %q)
import mapproxy.cache.renderd as r
def init(self, renderd_address, tile_mgr, priority=100): pass
r.RenderdTileCreator.__init__ = init
try:
    import mapproxy_renderd
except ImportError as e:
    print(e)
    sys.exit(3)
`, r.dir)
		out, err := exec.Command("/usr/bin/python3", "-c", src).CombinedOutput()
		var ee *exec.ExitError
		if !errors.As(err, &ee) || ee.ExitCode() != 3 || !strings.Contains(string(out), "does not look like MapProxy 1.15") ||
			!strings.Contains(string(out), "RenderdTileCreator.__init__") {
			t.Errorf("got %v: %s; want ImportError naming RenderdTileCreator.__init__", err, out)
		}
	})
}
