// SPDX-License-Identifier: Apache-2.0

package main

import (
	"bytes"
	"context"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

// requireGunicorn fails under CI=true and skips elsewhere when Debian's gunicorn is missing.
func requireGunicorn(t *testing.T) string {
	t.Helper()
	path, err := exec.LookPath("gunicorn")
	if err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatal("gunicorn is missing (apt-get install gunicorn)")
		}
		t.Skip("gunicorn is missing (apt-get install gunicorn)")
	}
	return path
}

// serveGunicorn runs README's gunicorn line (--chdir DIR module:application) on a free
// loopback port and returns its base URL once it answers.
func (r *moduleRig) serveGunicorn(gunicorn, dir, app string, workers, threads int) string {
	t := r.t
	addr := freeTCPAddr(t)
	cmd := exec.Command(gunicorn, "--workers", fmt.Sprint(workers), "--threads", fmt.Sprint(threads), "--bind", addr, "--chdir", dir, app)
	logs := &syncBuffer{}
	cmd.Stdout, cmd.Stderr = logs, logs
	exited := startTestGroup(t, cmd, 30*time.Second, func() { t.Logf("gunicorn log (tail):\n%s", tail(logs.String(), 3000)) })
	base := "http://" + addr + "/"
	c := &http.Client{Timeout: 5 * time.Second}
	deadline := time.Now().Add(60 * time.Second)
	for {
		resp, err := c.Get(base + "wmts/1.0.0/WMTSCapabilities.xml")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == 200 {
				return base
			}
		}
		select {
		case <-exited:
			t.Fatalf("gunicorn exited:\n%s", logs.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("gunicorn did not answer: %v\n%s", err, logs.String())
		}
		time.Sleep(50 * time.Millisecond) // polling for start-up, bounded by the deadline
	}
}

// TestMapProxyModuleAsDocumented follows README's "The MapProxy-side module" literally:
// install-module into the WSGI script's directory, the one line in the script, then the
// script served as README says (serve_wsgi.py; gunicorn --chdir with two workers), with
// nothing added to sys.path by hand. The module must be active in each (a slow render gives
// the waiting tile). With gunicorn's two workers a burst for one metatile is answered
// within wait_ms too.
func TestMapProxyModuleAsDocumented(t *testing.T) {
	gunicorn := requireGunicorn(t)
	r := newModuleRig(t)
	etc := filepath.Join(r.dir, "etc")
	if err := os.Mkdir(etc, 0o755); err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	if err := run(context.Background(), []string{"install-module", etc}, &out, &out); err != nil {
		t.Fatalf("install-module: %v\n%s", err, out.String())
	}
	if !strings.Contains(out.String(), "python-path="+etc) || !strings.Contains(out.String(), "--chdir "+etc) {
		t.Errorf("install-module DIR: got %q, want it to say how mod_wsgi and gunicorn find DIR", out.String())
	}
	// README's three lines, the configuration path ours (mapproxy-front.yaml: MapProxy's lock
	// timeout 3 s, see startBurstFrontEnds).
	script := fmt.Sprintf(`import mapproxy_renderd; mapproxy_renderd.enable(wait_ms=1000)
from mapproxy.wsgiapp import make_wsgi_app
application = make_wsgi_app(%q)
`, r.writeFrontYAML())
	if err := os.WriteFile(filepath.Join(etc, "mapproxy_wsgi.py"), []byte(script), 0o644); err != nil {
		t.Fatal(err)
	}

	for i, srv := range []struct {
		name  string
		start func() string
	}{
		{"serve_wsgi.py", func() string { return r.serveWSGI(filepath.Join(etc, "mapproxy_wsgi.py"), nil) }},
		{"gunicorn --workers 2 --chdir", func() string { return r.serveGunicorn(gunicorn, etc, "mapproxy_wsgi:application", 2, 8) }},
	} {
		t.Run(srv.name, func(t *testing.T) {
			r.t = t
			base := srv.start()
			r.setDelay(3)
			_, cc := r.fetch(base, 3, 7, 2*i)
			r.setDelay(0)
			if !strings.Contains(cc, "max-age=5") {
				t.Errorf("slow render: Cache-Control %q, want the waiting tile's max-age=5 (is the module enabled?)", cc)
			}
			r.waitFile(r.tileFile(3, 7, 2*i), "the render that went on", func(_ os.FileInfo, err error) bool { return err == nil })
		})
	}
	// 16 threads per worker: gunicorn does not spread connections evenly, and a worker with
	// more requests than threads queues the rest behind the first wait_ms.
	t.Run("gunicorn: a burst over two workers", func(t *testing.T) {
		r.t = t
		r.checkBurst([]string{r.serveGunicorn(gunicorn, etc, "mapproxy_wsgi:application", 2, 16)}, 8, "gunicorn with 2 workers × 16 threads")
	})
}

// TestInstallModuleDefaultDir: without DIR, install-module picks the directory that
// /usr/bin/python3's site module puts on sys.path (asked, not written here: the test does not
// touch the system's python).
func TestInstallModuleDefaultDir(t *testing.T) {
	requireMapProxy(t)
	dir, err := moduleSiteDir(t.Context(), defaultPython)
	if err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(defaultPython, "-c", "import site; print('\\n'.join(site.getsitepackages()))").Output()
	if err != nil {
		t.Fatal(err)
	}
	if sites := strings.Fields(string(out)); !slices.Contains(sites, dir) {
		t.Errorf("install-module's default %s is not among %s's site directories %q", dir, defaultPython, sites)
	}
	if err := run(t.Context(), []string{"install-module", "a", "b"}, &bytes.Buffer{}, &bytes.Buffer{}); err == nil {
		t.Errorf("install-module with two directories: no error")
	}
}

// requireApacheModWSGI fails under CI=true and skips elsewhere when Apache or mod_wsgi is missing.
func requireApacheModWSGI(t *testing.T) {
	t.Helper()
	for _, f := range []string{"/usr/sbin/apache2", "/usr/lib/apache2/modules/mod_wsgi.so", "/usr/lib/apache2/modules/mod_mpm_event.so"} {
		if _, err := os.Stat(f); err != nil {
			msg := "Apache with mod_wsgi is missing (apt-get install apache2 libapache2-mod-wsgi-py3): " + err.Error()
			if os.Getenv("CI") == "true" {
				t.Fatal(msg)
			}
			t.Skip(msg)
		}
	}
}

// TestMapProxyModuleModWSGI: README's mod_wsgi lines (WSGIDaemonProcess processes=3
// python-path=DIR) with the module installed in DIR, Apache on a loopback port run by the
// test: a burst for one metatile over three mod_wsgi processes is answered within wait_ms,
// and the metatile is rendered once. Apache's children run as nobody, so the test opens the
// daemon's socket and a tile-lock directory to everyone (its own temporary files only).
func TestMapProxyModuleModWSGI(t *testing.T) {
	requireApacheModWSGI(t)
	if os.Geteuid() != 0 {
		t.Skip("Apache switches to its User (nobody) only when started as root")
	}
	r := newModuleRig(t)
	for _, p := range []string{r.dir, r.socket} {
		if err := os.Chmod(p, 0o777); err != nil {
			t.Fatal(err)
		}
	}
	locks, site := filepath.Join(r.dir, "wsgi_locks"), filepath.Join(r.dir, "site")
	for _, d := range []string{locks, site} {
		if err := os.Mkdir(d, 0o777); err != nil {
			t.Fatal(err)
		}
		os.Chmod(d, 0o777) // past the umask: nobody writes its tile locks here
	}
	front, err := os.ReadFile(r.writeFrontYAML())
	if err != nil {
		t.Fatal(err)
	}
	conf := strings.Replace(string(front), "tile_lock_dir: "+r.dir+"/cache_data/tile_locks", "tile_lock_dir: "+locks, 1)
	if conf == string(front) {
		t.Fatal("the rig's mapproxy.yaml has no tile_lock_dir to replace")
	}
	os.WriteFile(filepath.Join(site, "mapproxy.yaml"), []byte(conf), 0o644)
	var out bytes.Buffer
	if err := run(context.Background(), []string{"install-module", site}, &out, &out); err != nil {
		t.Fatalf("install-module: %v\n%s", err, out.String())
	}
	os.WriteFile(filepath.Join(site, "mapproxy_wsgi.py"), []byte(fmt.Sprintf(`import mapproxy_renderd; mapproxy_renderd.enable(wait_ms=1000)
from mapproxy.wsgiapp import make_wsgi_app
application = make_wsgi_app(%q)
`, filepath.Join(site, "mapproxy.yaml"))), 0o644)
	addr := freeTCPAddr(t)
	apacheConf := fmt.Sprintf(`ServerRoot %[1]s
ServerName localhost
Listen %[2]s
PidFile %[1]s/apache.pid
DefaultRuntimeDir %[1]s
Mutex file:%[1]s default
ErrorLog %[1]s/apache_error.log
LogLevel warn
User nobody
Group nogroup
LoadModule mpm_event_module /usr/lib/apache2/modules/mod_mpm_event.so
LoadModule authz_core_module /usr/lib/apache2/modules/mod_authz_core.so
LoadModule wsgi_module /usr/lib/apache2/modules/mod_wsgi.so
WSGISocketPrefix %[1]s/wsgi
# README's lines:
WSGIDaemonProcess mapproxy processes=3 threads=16 python-path=%[1]s
WSGIScriptAlias / %[1]s/mapproxy_wsgi.py process-group=mapproxy application-group=%%{GLOBAL}
<Directory %[1]s>
  Require all granted
</Directory>
`, site, addr)
	os.WriteFile(filepath.Join(site, "apache.conf"), []byte(apacheConf), 0o644)
	cmd := exec.Command("/usr/sbin/apache2", "-f", filepath.Join(site, "apache.conf"), "-DFOREGROUND")
	logs := &syncBuffer{}
	cmd.Stdout, cmd.Stderr = logs, logs
	exited := startTestGroup(t, cmd, 30*time.Second, func() {
		errLog, _ := os.ReadFile(filepath.Join(site, "apache_error.log"))
		t.Logf("apache output:\n%s\nerror log (tail):\n%s", logs.String(), tail(string(errLog), 4000))
	})
	base := "http://" + addr + "/"
	c := &http.Client{Timeout: 10 * time.Second}
	deadline := time.Now().Add(60 * time.Second)
	for {
		resp, err := c.Get(base + "wmts/1.0.0/WMTSCapabilities.xml")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == 200 {
				break
			}
		}
		select {
		case <-exited:
			t.Fatalf("apache exited")
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("apache did not answer: %v", err)
		}
		time.Sleep(50 * time.Millisecond) // polling for start-up, bounded by the deadline
	}
	r.checkBurst([]string{base}, 12, "Apache mod_wsgi, 3 processes × 16 threads")
}
