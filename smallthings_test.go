// SPDX-License-Identifier: Apache-2.0

package main

import (
	"bytes"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
)

// The tasks table: DONE, DELETED (a cleanup's removed tiles) and columns that a long name
// does not shift (README).
func TestTaskTableColumns(t *testing.T) {
	docs := []taskDoc{
		{TaskID: "t12", Name: "drop_high", Kind: "cleanup", State: taskStateDone, Deleted: 96, Progress: 1},
		{TaskID: "t3", Name: strings.Repeat("a_very_long_seed_name_", 3), Kind: "seed", State: taskStateRunning, Planned: 1200, Done: 700, Skipped: 5, Progress: 0.5},
		{TaskID: "t4", Name: "tab\there", Kind: "expire", State: taskStateFailed, Failed: 3},
	}
	var out bytes.Buffer
	if err := printTaskTable(&out, Reply{Tasks: mustJSON(docs)}); err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimRight(out.String(), "\n"), "\n")
	if len(lines) != 4 {
		t.Fatalf("%d lines, want a header and 3 rows:\n%s", len(lines), out.String())
	}
	// Every column starts where its heading starts (in characters: the cut name ends in "…").
	head := []rune(lines[0])
	for _, l := range lines[1:] {
		row := []rune(l)
		for i := 1; i < len(head); i++ {
			if head[i] != ' ' && head[i-1] == ' ' && (i >= len(row) || row[i] == ' ' || row[i-1] != ' ') {
				t.Errorf("row %q: no cell starts under the heading at column %d:\n%s", l, i, out.String())
				break
			}
		}
	}
	if !strings.Contains(lines[3], "tab here") {
		t.Errorf("a tab in a name is not a space in the table: %q", lines[3])
	}
	f := strings.Fields(lines[1])
	if f[4] != "0" || f[5] != "96" {
		t.Errorf("cleanup row %q: DONE %s DELETED %s, want 0 and 96", lines[1], f[4], f[5])
	}
	if f := strings.Fields(lines[2]); f[4] != "705" || f[6] != "1200" {
		t.Errorf("seed row %q: DONE %s PLANNED %s, want 705 and 1200", lines[2], f[4], f[6])
	}
}

// One count of invalid requests: counters.invalid, connections.invalid_requests and
// invalid_requests_total agree, whether the listener or the scheduler refused the request.
func TestInvalidRequestsAreOneCount(t *testing.T) {
	d := newTestDaemon(t, daemonOpts{renderers: 1, rendArgs: []string{"-caches", `{"known_GRID":{"meta_size":[1,1]}}`}})
	c := d.dial()
	defer c.c.Close()
	c.send(`{"command":"tile","id":"u","cache_identifier":"unknown_GRID","tiles":[[1,1,1]]}`) // the scheduler refuses it
	if r := c.read(); r.Status != statusError {
		t.Fatalf("unknown cache: %+v", r)
	}
	c.send(`{"command":"nope","id":"n"}`) // the listener refuses it
	if r := c.read(); r.Status != statusError {
		t.Fatalf("unknown command: %+v", r)
	}
	doc := d.status()
	_, _, body := httpGet(t, httpClientFor("unix", d.socket), "/metrics")
	m := regexp.MustCompile(`(?m)^mapproxy_renderd_invalid_requests_total (\d+)$`).FindSubmatch(body)
	if doc.Counters["invalid"] != 2 || doc.Conns.Invalid != 2 || m == nil || string(m[1]) != "2" {
		t.Errorf("counters.invalid %d, connections.invalid_requests %d, invalid_requests_total %q; want 2 each",
			doc.Counters["invalid"], doc.Conns.Invalid, m)
	}
}

// The bundled worker is written once per content and reused by every start, even after
// kill -9; the directory is this user's alone.
func TestBundledWorkerFileIsReused(t *testing.T) {
	tmp := t.TempDir()
	t.Setenv("TMPDIR", tmp)
	t.Setenv("RUNTIME_DIRECTORY", "")
	a, err := installBundledWorker()
	if err != nil {
		t.Fatal(err)
	}
	b, err := installBundledWorker()
	if err != nil || a != b {
		t.Fatalf("second install: %q, %v; want %q", b, err, a)
	}
	if got, _ := os.ReadFile(a); !bytes.Equal(got, bundledWorker) {
		t.Errorf("%s does not hold the bundled worker", a)
	}
	if fi, err := os.Stat(filepath.Dir(a)); err != nil || fi.Mode().Perm() != 0o700 {
		t.Errorf("worker directory mode %v (%v), want 0700", fi.Mode().Perm(), err)
	}
	// A damaged file is replaced.
	os.WriteFile(a, []byte("garbage"), 0o600)
	if c, err := installBundledWorker(); err != nil || c != a {
		t.Fatalf("after damage: %q, %v", c, err)
	}
	if got, _ := os.ReadFile(a); !bytes.Equal(got, bundledWorker) {
		t.Errorf("a damaged worker file was not replaced")
	}
	// Somebody else's (or a writable) directory is refused.
	os.Chmod(filepath.Dir(a), 0o777)
	if _, err := installBundledWorker(); err == nil || !strings.Contains(err.Error(), "only it can write") {
		t.Errorf("a world-writable worker directory: got %v, want refused", err)
	}
	os.Chmod(filepath.Dir(a), 0o700)
	rt := t.TempDir()
	t.Setenv("RUNTIME_DIRECTORY", rt)
	if c, err := installBundledWorker(); err != nil || filepath.Dir(c) != rt {
		t.Errorf("with RUNTIME_DIRECTORY: %q, %v; want a file in %s", c, err, rt)
	}

	// Real daemons killed with SIGKILL, twice: one worker file in all.
	t.Setenv("RUNTIME_DIRECTORY", "")
	exe := lcExecutable(t)
	dir := shortTempDir(t)
	mp, _ := filepath.Abs("examples/mapproxy.yaml")
	lcConfig(t, dir+"/renderd.yaml", dir+"/s.sock", "", 1, []string{exe, "fake-renderer"}, "mapproxy_config: "+mp+"\n")
	for i := 0; i < 2; i++ {
		p := startLCProc(t, []string{exe, "daemon", "-c", dir + "/renderd.yaml"}, lcEnv("TMPDIR="+tmp), nil)
		p.out.waitFor(t, "msg=ready", 1)
		p.signal(syscall.SIGKILL)
		p.wait(lcDeadline)
	}
	entries, _ := os.ReadDir(filepath.Dir(a))
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	if len(names) != 1 || names[0] != filepath.Base(a) {
		t.Errorf("after two SIGKILLed daemons the worker directory holds %q, want only %s", names, filepath.Base(a))
	}
}
