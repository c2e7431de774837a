// SPDX-License-Identifier: Apache-2.0

package main

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestDebianPackageDeployment runs packaging/deploy-test/run.sh: README's section
// "Production on Debian 12 or 13", followed to the letter on bookworm and trixie booted
// with systemd-nspawn (see the script). It needs root, debootstrap and systemd-nspawn; it
// is skipped without them and fails under CI=true. DEPLOY_TEST_SUITES narrows the suites
// (e.g. "trixie"). Its name starts with TestDebianPackage so that `-skip TestDebianPackage`
// leaves out everything that installs system-wide.
func TestDebianPackageDeployment(t *testing.T) {
	var missing []string
	for _, tool := range []string{"debootstrap", "systemd-nspawn", "dpkg-deb", "git"} {
		if _, err := exec.LookPath(tool); err != nil {
			missing = append(missing, tool)
		}
	}
	msg := ""
	switch {
	case len(missing) > 0:
		msg = "missing " + strings.Join(missing, ", ") + " (apt-get install debootstrap systemd-container)"
	case os.Getuid() != 0:
		msg = "the deployment test needs root (debootstrap, systemd-nspawn)"
	case testing.Short():
		msg = "-short: the deployment test boots two Debian containers"
	}
	if msg != "" {
		if os.Getenv("CI") == "true" {
			t.Fatal(msg)
		}
		t.Skip(msg)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 75*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "packaging/deploy-test/run.sh", strings.Fields(os.Getenv("DEPLOY_TEST_SUITES"))...)
	cmd.WaitDelay = time.Minute
	out, err := cmd.CombinedOutput()
	t.Logf("packaging/deploy-test/run.sh:\n%s", out)
	if err != nil {
		t.Fatalf("deployment test: %v", err)
	}
}

// TestRenderersLockInTheDaemonsDirectory: the bundled renderers take MapProxy's tile locks
// in the daemon's own directory, not in <cache base_dir>/tile_locks, which MapProxy's web
// processes create with their own umask (README "Tile locks"). Here tile_locks is
// a regular file, which no process (root included) can lock in: a render that locks there
// fails.
func TestRenderersLockInTheDaemonsDirectory(t *testing.T) {
	requireMapProxy(t)
	dir := shortTempDir(t)
	socket := dir + "/renderd.sock"
	mapproxyYAML := `globals:
  cache: {base_dir: ` + dir + `/cache_data, lock_dir: ` + dir + `/cache_data/locks}
services:
  tms:
layers:
  - {name: dbg, title: debug, sources: [dbg_cache]}
caches:
  dbg_cache: {grids: [GLOBAL_WEBMERCATOR], sources: [debug_src], format: image/png}
sources:
  debug_src: {type: debug}
`
	if err := os.MkdirAll(dir+"/cache_data", 0o755); err != nil {
		t.Fatal(err)
	}
	for name, body := range map[string]string{
		"mapproxy.yaml":         mapproxyYAML,
		"renderd.yaml":          "socket: " + socket + "\nhttp: \"\"\nrenderers: 1\nstate_dir: " + dir + "/state\n",
		"cache_data/tile_locks": "not a directory\n",
	} {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	d := runConfiguredDaemon(t, socket, &syncBuffer{}, "-f", dir+"/mapproxy.yaml", "-c", dir+"/renderd.yaml")
	c := d.dial()
	c.send(tileReq("a", "dbg_cache_GLOBAL_WEBMERCATOR", 1, 2, 3, 100))
	if r := c.read(); r.Status != "ok" {
		t.Fatalf("render with <base_dir>/tile_locks unusable: got %q %q, want ok", r.Status, r.ErrorMessage)
	}
	pngs, _ := filepath.Glob(filepath.Join(dir, "cache_data/dbg_cache_*/03/*/*/*/*/*/*.png"))
	if len(pngs) != 1 {
		t.Errorf("tiles written at level 3: %v, want one", pngs)
	}
}
