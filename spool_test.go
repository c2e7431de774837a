// SPDX-License-Identifier: Apache-2.0

package main

import (
	"os"
	"strings"
	"testing"
	"time"
)

// waitFile polls until path exists (want true) or is gone (want false), failing at a deadline.
func waitFile(t *testing.T, path string, want bool, what string, d *testDaemon) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		_, err := os.Stat(path)
		if (err == nil) == want {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: %s exists=%v within 30s\n%s", what, path, !want, d.stderr.String())
		}
		time.Sleep(20 * time.Millisecond) // polling the spool, bounded by the deadline
	}
}

// waitLog polls the daemon's log until it holds s, failing at a deadline.
func waitLog(t *testing.T, d *testDaemon, s string) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for !strings.Contains(d.stderr.String(), s) {
		if time.Now().After(deadline) {
			t.Fatalf("log has no %q within 30s:\n%s", s, d.stderr.String())
		}
		time.Sleep(20 * time.Millisecond) // polling the log, bounded by the deadline
	}
}

const spoolList = "3/0/0\n4/2/2\n3/1/1\n"

// TestSpoolFailedTaskRejected (docs/design.md §8, §12): a spooled list whose task fails (here: it
// resumes after a restart whose renderers no longer give the cache an XYZ grid) comes back
// to the spool as <file>.rejected, whole, with a warning naming why.
func TestSpoolFailedTaskRejected(t *testing.T) {
	dir := shortTempDir(t)
	spool, state := dir+"/spool", dir+"/state"
	os.MkdirAll(spool+"/exp_GRID", 0o755)
	yaml := "expire_dir: " + spool + "\nstate_dir: " + state + "\nexpire_min_zoom: 3\n"
	d := newTestDaemon(t, daemonOpts{maxSeed: -1, gate: true, rendArgs: []string{"-caches", expireCaches}, extraYAML: yaml})
	os.WriteFile(spool+"/exp_GRID/b.list", []byte(spoolList), 0o644)
	waitFile(t, spool+"/exp_GRID/b.list", false, "list taken", d)
	d.waitFor("a render of the list", func(s statusDoc) bool { return s.Queue.Running > 0 })
	d.stop() // the task is cancelled for the shutdown: its list stays for the resumed task
	if entries, _ := os.ReadDir(spool + "/exp_GRID"); len(entries) != 0 {
		t.Fatalf("spool after a shutdown with the journal on: %v, want empty (the task resumes)", entries)
	}

	d2 := newTestDaemon(t, daemonOpts{maxSeed: -1, rendArgs: []string{"-caches", `{"exp_GRID":{"meta_size":[2,2]}}`}, extraYAML: yaml})
	waitFile(t, spool+"/exp_GRID/b.list.rejected", true, "failed task's list back in the spool", d2)
	if b, err := os.ReadFile(spool + "/exp_GRID/b.list.rejected"); err != nil || string(b) != spoolList {
		t.Errorf("rejected list %q (%v), want the list as spooled", b, err)
	}
	waitLog(t, d2, "the list's task failed; the list is back in the spool")
	if !strings.Contains(d2.stderr.String(), "does not take expiry lists") {
		t.Errorf("the warning does not say why:\n%s", d2.stderr.String())
	}
}

// TestSpoolShutdownWithoutJournal: without a journal nothing resumes, so a spooled list
// whose task is cut by a shutdown goes back to the spool under its own name.
func TestSpoolShutdownWithoutJournal(t *testing.T) {
	dir := shortTempDir(t)
	spool := dir + "/spool"
	os.MkdirAll(spool+"/exp_GRID", 0o755)
	d := newTestDaemon(t, daemonOpts{maxSeed: -1, gate: true, rendArgs: []string{"-caches", expireCaches},
		extraYAML: "expire_dir: " + spool + "\njournal: false\nexpire_min_zoom: 3\n"})
	os.WriteFile(spool+"/exp_GRID/b.list", []byte(spoolList), 0o644)
	waitFile(t, spool+"/exp_GRID/b.list", false, "list taken", d)
	d.waitFor("a render of the list", func(s statusDoc) bool { return s.Queue.Running > 0 })
	d.stop()
	if b, err := os.ReadFile(spool + "/exp_GRID/b.list"); err != nil || string(b) != spoolList {
		t.Errorf("after the shutdown the spool holds %q (%v), want the list back", b, err)
	}
	if !strings.Contains(d.stderr.String(), "the list is back in the spool") {
		t.Errorf("no warning:\n%s", d.stderr.String())
	}
}

// TestSpoolRejectRenameFails: a list for a cache that takes no lists whose rename to
// .rejected fails stays in the spool, and the failure is logged (once, not every poll).
func TestSpoolRejectRenameFails(t *testing.T) {
	dir := shortTempDir(t)
	spool := dir + "/spool"
	os.MkdirAll(spool+"/plain_GRID/a.list.rejected/x", 0o755) // a non-empty directory: the rename fails
	d := newTestDaemon(t, daemonOpts{maxSeed: -1, rendArgs: []string{"-caches", expireCaches},
		extraYAML: "expire_dir: " + spool + "\nexpire_min_zoom: 3\n"})
	os.WriteFile(spool+"/plain_GRID/a.list", []byte(spoolList), 0o644)
	waitLog(t, d, "cannot rename the rejected list; it stays in the spool")
	if b, err := os.ReadFile(spool + "/plain_GRID/a.list"); err != nil || string(b) != spoolList {
		t.Errorf("the spool holds %q (%v), want the list", b, err)
	}
	// Two lists for another cache taken one after the other: the spool was polled again
	// in between (the whole poll, since exp_GRID comes before plain_GRID).
	os.MkdirAll(spool+"/exp_GRID", 0o755)
	for _, name := range []string{"c.list", "d.list"} {
		os.WriteFile(spool+"/exp_GRID/"+name, []byte("3/0/0\n"), 0o644)
		waitFile(t, spool+"/exp_GRID/"+name, false, "list taken", d)
	}
	if n := strings.Count(d.stderr.String(), "expire_dir: list rejected"); n != 1 {
		t.Errorf("%d rejection warnings, want 1", n)
	}
}
