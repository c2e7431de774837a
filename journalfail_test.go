// SPDX-License-Identifier: Apache-2.0

package main

import (
	"bytes"
	"errors"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// smallTmpfs mounts a tmpfs of size bytes on a new temporary directory, unmounted at the
// end of the test. It needs root; without it the test fails under CI=true, else skips.
func smallTmpfs(t *testing.T, size string) string {
	t.Helper()
	if os.Geteuid() != 0 {
		if os.Getenv("CI") == "true" {
			t.Fatal("this test mounts a tmpfs and must run as root in CI")
		}
		t.Skip("mounting a tmpfs needs root")
	}
	dir, err := os.MkdirTemp("", "mrd-tmpfs")
	if err != nil {
		t.Fatal(err)
	}
	if err := syscall.Mount("tmpfs", dir, "tmpfs", 0, "size="+size+",mode=0700"); err != nil {
		os.Remove(dir)
		t.Fatalf("mount tmpfs: %v", err)
	}
	t.Cleanup(func() {
		if err := syscall.Unmount(dir, syscall.MNT_DETACH); err != nil {
			t.Errorf("unmount %s: %v", dir, err)
		}
		os.Remove(dir)
	})
	return dir
}

// fillUp writes path until the file system is full.
func fillUp(t *testing.T, path string) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	block := make([]byte, 4096)
	for {
		if _, err := f.Write(block); err != nil {
			if !errors.Is(err, syscall.ENOSPC) {
				t.Fatal(err)
			}
			break
		}
	}
	for { // and the last bytes
		if _, err := f.Write(block[:1]); err != nil {
			return
		}
	}
}

// waitJournalWritable polls until the journal has recovered and returns how long it took.
func waitJournalWritable(t *testing.T, j *journal, from time.Time) time.Duration {
	t.Helper()
	deadline := from.Add(30 * time.Second)
	for j.failure() != nil {
		if time.Now().After(deadline) {
			t.Fatalf("journal still failed 30s after space returned: %v", j.failure())
		}
		time.Sleep(10 * time.Millisecond) // polling, bounded by the deadline
	}
	return time.Since(from)
}

// TestJournalFullStateDir (docs/design.md §8, §12): a journal on a full file system opens failed
// instead of failing the start, keeps its replayed state, refuses durable work, tracks
// retirements in memory, leaves no 0-byte journal.corrupt, and is writable again without a
// restart once space returns; reopened, it holds exactly the live state.
func TestJournalFullStateDir(t *testing.T) {
	dir := smallTmpfs(t, "256k")
	state := filepath.Join(dir, "state")
	j, _, err := openJournal(state, quietLog())
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 10; i++ {
		if err := j.addJobs("c_GRID", []tileCoord{{int32(i), 0, 10}}, 10); err != nil {
			t.Fatal(err)
		}
	}
	j.close()
	fillUp(t, filepath.Join(dir, "filler"))

	var logBuf syncBuffer
	j, rep, err := openJournalRetry(state, slog.New(slog.NewTextHandler(&logBuf, nil)), 20*time.Millisecond)
	if err != nil {
		t.Fatalf("open on a full file system: %v", err)
	}
	defer j.close()
	if len(rep.Jobs) != 10 {
		t.Errorf("replayed %d jobs, want 10", len(rep.Jobs))
	}
	if err := j.failure(); err == nil || !errors.Is(err, syscall.ENOSPC) {
		t.Fatalf("failure %v, want ENOSPC", err)
	}
	if st := j.stats(); st.Failed == "" || st.FailedSince == "" {
		t.Errorf("stats %+v do not say it failed", st)
	}
	if err := j.addJobs("c_GRID", []tileCoord{{100, 0, 10}}, 10); err == nil {
		t.Error("a durable job was accepted by a journal that cannot write")
	}
	if err := j.addTask("t9", []byte(`{}`)); err == nil {
		t.Error("a task was accepted by a journal that cannot write")
	}
	j.jobDone("c_GRID", tileCoord{0, 0, 10}) // retired while failed: not replayed later
	if _, err := os.Stat(filepath.Join(state, journalFile+".corrupt")); err == nil {
		t.Error("a journal.corrupt was left by a start on a full file system")
	}
	if n := strings.Count(logBuf.String(), "journal: cannot write"); n != 1 {
		t.Errorf("%d failure errors logged, want 1:\n%s", n, logBuf.String())
	}

	os.Remove(filepath.Join(dir, "filler"))
	took := waitJournalWritable(t, j, time.Now())
	t.Logf("journal writable again %s after space returned (retry every %s)", took.Round(time.Millisecond), j.retryEvery)
	if err := j.addJobs("c_GRID", []tileCoord{{100, 0, 10}}, 10); err != nil {
		t.Fatalf("after the recovery: %v", err)
	}
	if st := j.stats(); st.Failed != "" || st.Recoveries != 1 {
		t.Errorf("stats after the recovery %+v, want not failed and 1 recovery", st)
	}

	// Fill it again while it runs: a batch fails, and recovers the same way.
	fillUp(t, filepath.Join(dir, "filler"))
	tiles := make([]tileCoord, 20000)
	for i := range tiles {
		tiles[i] = tileCoord{int32(i), 1, 14}
	}
	if err := j.addJobs("c_GRID", tiles, 10); err == nil {
		t.Fatal("20,000 jobs journaled on a full file system")
	}
	j.jobDone("c_GRID", tileCoord{1, 0, 10})
	os.Remove(filepath.Join(dir, "filler"))
	took = waitJournalWritable(t, j, time.Now())
	t.Logf("after a failed batch: writable again %s after space returned", took.Round(time.Millisecond))
	j.close()

	_, rep = mustOpenJournal(t, state)
	live := map[tileCoord]bool{}
	for _, jj := range rep.Jobs {
		live[jj.Tile] = true
	}
	if live[tileCoord{0, 0, 10}] || live[tileCoord{1, 0, 10}] || !live[tileCoord{2, 0, 10}] || !live[tileCoord{100, 0, 10}] {
		t.Errorf("replayed %v: want the retired jobs gone and the others kept", rep.Jobs)
	}
}

// TestJournalCorruptTailOnFullDisk: a corrupt tail on a full file system is kept as
// journal.corrupt whole (a hard link), never as a 0-byte copy.
func TestJournalCorruptTailOnFullDisk(t *testing.T) {
	dir := smallTmpfs(t, "256k")
	state := filepath.Join(dir, "state")
	os.MkdirAll(state, 0o700)
	data, ends := journalWithJobs(t, 5)
	data = data[:ends[3]+2] // cut inside the fourth job record
	if err := os.WriteFile(filepath.Join(state, journalFile), data, 0o600); err != nil {
		t.Fatal(err)
	}
	fillUp(t, filepath.Join(dir, "filler"))
	j, rep, err := openJournal(state, quietLog())
	if err != nil {
		t.Fatal(err)
	}
	defer j.close()
	if rep.Corrupt == "" || len(rep.Jobs) != 3 {
		t.Errorf("corrupt %q, %d jobs; want the cut reported and 3 jobs", rep.Corrupt, len(rep.Jobs))
	}
	f, err := os.Open(filepath.Join(state, journalFile+".corrupt"))
	if err != nil {
		t.Fatal(err)
	}
	got, _ := io.ReadAll(f)
	f.Close()
	if !bytes.Equal(got, data) {
		t.Errorf("journal.corrupt has %d bytes, want the damaged file's %d", len(got), len(data))
	}
}

// TestDaemonFullStateDir (docs/design.md §8, §12): the daemon starts on a full state_dir,
// replays its journal, serves live tiles, refuses durable work clearly (background jobs,
// a spooled list, which stays in the spool), shows the failure in /healthz (200, degraded),
// /metrics and the status document, and recovers without a restart once space returns:
// then the spooled list is taken and done.
func TestDaemonFullStateDir(t *testing.T) {
	mnt := smallTmpfs(t, "512k")
	state := filepath.Join(mnt, "state")
	j, _, err := openJournal(state, quietLog())
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 3; i++ {
		if err := j.addJobs("exp_GRID", []tileCoord{{int32(2 * i), 0, 5}}, 10); err != nil { // 3 metatiles
			t.Fatal(err)
		}
	}
	j.close()
	fillUp(t, filepath.Join(mnt, "filler"))
	spool := shortTempDir(t)
	os.MkdirAll(spool+"/exp_GRID", 0o755)
	os.WriteFile(spool+"/exp_GRID/b.list", []byte(spoolList), 0o644)

	d := newTestDaemon(t, daemonOpts{maxSeed: -1, rendArgs: []string{"-caches", expireCaches},
		extraYAML: "state_dir: " + state + "\nexpire_dir: " + spool + "\nexpire_min_zoom: 3\n"})
	// The journaled jobs are rendered.
	d.waitFor("the 3 replayed jobs", func(statusDoc) bool { return len(d.jobLog()) >= 3 })
	cl := d.dial()
	cl.send(`{"command":"tile","id":"live","cache_identifier":"exp_GRID","tiles":[[8,0,5]]}`)
	if r := cl.read(); r.Status != statusOK {
		t.Errorf("live tile: %+v", r)
	}
	cl.send(`{"command":"tile","id":"bg","cache_identifier":"exp_GRID","tiles":[[10,0,5]],"background":true}`)
	if r := cl.read(); r.Status != statusError || !strings.Contains(r.ErrorMessage, "not journaled") {
		t.Errorf("background job on a failed journal: %+v, want an error saying it is not journaled", r)
	}
	waitLog(t, d, "task not started; the list stays in the spool")
	if _, err := os.Stat(spool + "/exp_GRID/b.list"); err != nil {
		t.Errorf("the spooled list is gone while its task cannot start: %v", err)
	}
	hc := httpClientFor("unix", d.socket)
	code, _, body := httpGet(t, hc, "/healthz")
	if code != 200 || !strings.Contains(string(body), `"degraded":"journal cannot write`) {
		t.Errorf("/healthz: %d %s, want 200 and degraded", code, body)
	}
	if _, _, m := httpGet(t, hc, "/metrics"); !strings.Contains(string(m), "mapproxy_renderd_journal_failed 1") {
		t.Errorf("/metrics has no journal_failed 1")
	}
	if st := d.status(); st.Journal == nil || !strings.Contains(st.Journal.Failed, "no space left") {
		t.Errorf("status journal %+v, want failed: no space left", st.Journal)
	}

	os.Remove(filepath.Join(mnt, "filler"))
	freed := time.Now()
	d.waitFor("the journal writable again", func(s statusDoc) bool { return s.Journal != nil && s.Journal.Failed == "" })
	t.Logf("journal writable again %s after space returned (retry every %s)", time.Since(freed).Round(time.Millisecond), journalRetry)
	waitFile(t, spool+"/exp_GRID/b.list", false, "the list taken once the journal writes", d)
	if code, _, body := httpGet(t, hc, "/healthz"); code != 200 || strings.Contains(string(body), "degraded") {
		t.Errorf("/healthz after the recovery: %d %s", code, body)
	}
	cl.send(`{"command":"tile","id":"bg2","cache_identifier":"exp_GRID","tiles":[[12,0,5]],"background":true}`)
	if r := cl.read(); r.Status != statusQueued {
		t.Errorf("background job after the recovery: %+v, want queued", r)
	}
	if n := strings.Count(d.stderr.String(), "task not started; the list stays in the spool"); n != 1 {
		t.Errorf("%d warnings about the spooled list, want 1 (same reason every poll)", n)
	}
}

// TestDaemonBadJournalHeader: a journal whose 8-byte header is damaged no longer stops the
// start: it is set aside as journal.corrupt and the daemon journals anew.
func TestDaemonBadJournalHeader(t *testing.T) {
	data, _ := journalWithJobs(t, 3)
	data[0] ^= 0x01
	state := filepath.Join(shortTempDir(t), "state")
	os.MkdirAll(state, 0o750)
	if err := os.WriteFile(filepath.Join(state, journalFile), data, 0o640); err != nil {
		t.Fatal(err)
	}
	d := newTestDaemon(t, daemonOpts{maxSeed: -1, extraYAML: "state_dir: " + state + "\n"})
	if got, _ := os.ReadFile(filepath.Join(state, journalFile+".corrupt")); !bytes.Equal(got, data) {
		t.Errorf("journal.corrupt holds %d bytes, want the damaged journal's %d", len(got), len(data))
	}
	cl := d.dial()
	cl.send(`{"command":"tile","id":"bg","cache_identifier":"c","tiles":[[1,2,3]],"background":true}`)
	if r := cl.read(); r.Status != statusQueued {
		t.Errorf("background job after the set-aside: %+v, want queued", r)
	}
	// The job may be rendered (and retired) by now: its records show it was journaled.
	if st := d.status(); st.Journal == nil || st.Journal.Failed != "" || st.Journal.Records < 2 {
		t.Errorf("status journal %+v, want writable with the job's records (cache, job)", st.Journal)
	}
}
