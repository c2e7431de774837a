// SPDX-License-Identifier: Apache-2.0

package main

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
)

// TestModuleViewsPython runs python/views_test.py: the module's view reporter batches (at
// most 256 tiles, at most every 100 ms, from its own thread), keeps its buffer bounded,
// drops views while the daemon is down, and its hook reports the tiles MapProxy served
// (hits included) for caches that render through renderd only.
func TestModuleViewsPython(t *testing.T) {
	requireMapProxy(t)
	out, err := exec.Command("/usr/bin/python3", "python/views_test.py", "-v").CombinedOutput()
	if err != nil {
		t.Fatalf("python/views_test.py: %v\n%s", err, out)
	}
}

// TestMapProxyModuleViews: real MapProxy with the module and enable_views() in front of the
// daemon: every tile it serves, rendered or found in its cache, reaches the daemon's
// recent-views table.
func TestMapProxyModuleViews(t *testing.T) {
	r := newModuleRig(t)
	wsgi := fmt.Sprintf(`import sys
sys.path.insert(0, %q)
import mapproxy_renderd; mapproxy_renderd.enable(); mapproxy_renderd.enable_views()
from mapproxy.wsgiapp import make_wsgi_app
application = make_wsgi_app(%q)
`, r.dir, filepath.Join(r.dir, "mapproxy.yaml"))
	if err := os.WriteFile(r.dir+"/views_wsgi.py", []byte(wsgi), 0o644); err != nil {
		t.Fatal(err)
	}
	base := r.serveWSGI(r.dir+"/views_wsgi.py", nil)
	for round := 0; round < 2; round++ { // renders, then hits
		for x := 0; x < 3; x++ {
			r.fetch(base, 4, x, 5)
		}
	}
	d := &testDaemon{t: t, socket: r.socket}
	doc := d.waitFor("six views", func(s statusDoc) bool { return s.Counters["views"] >= 6 })
	if doc.Counters["views"] != 6 || doc.Counters["views_unknown"] != 0 {
		t.Errorf("counters %v: want 6 views (3 renders, 3 hits), none of unknown caches", doc.Counters)
	}
}
