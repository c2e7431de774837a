// SPDX-License-Identifier: Apache-2.0

package main

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
)

func quietLog() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

// addJobs is addJobsThen waited for: the tests drive the path the scheduler uses.
func (j *journal) addJobs(cache string, tiles []tileCoord, priority int) error {
	done := make(chan error, 1)
	j.addJobsThen(cache, tiles, priority, func(err error) { done <- err })
	return <-done
}

// sync waits until everything appended so far (jobs done included) is on disk.
func (j *journal) sync() error {
	if err := j.begin(); err != nil {
		return err
	}
	return j.end(len(j.buf) > 0)
}

func mustOpenJournal(t testing.TB, dir string) (*journal, journalReplay) {
	t.Helper()
	j, rep, err := openJournal(dir, quietLog())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(j.close)
	return j, rep
}

func TestJournalReplay(t *testing.T) {
	dir := t.TempDir()
	j, rep := mustOpenJournal(t, dir)
	if len(rep.Jobs)+len(rep.Tasks) != 0 || rep.Corrupt != "" {
		t.Fatalf("fresh journal replayed %+v", rep)
	}
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(j.addJobs("a_GRID", []tileCoord{{0, 0, 3}, {4, 0, 3}, {0, 4, 3}}, 10))
	must(j.addJobs("b_GRID", []tileCoord{{8, 8, 5}}, 20))
	must(j.addJobs("a_GRID", []tileCoord{{0, 0, 3}}, 30)) // raises the priority
	must(j.addJobs("a_GRID", []tileCoord{{4, 0, 3}}, 5))  // lower: nothing changes
	j.jobDone("a_GRID", tileCoord{0, 4, 3})
	j.jobDone("a_GRID", tileCoord{9, 9, 9}) // never journaled: ignored
	j.jobDone("c_GRID", tileCoord{0, 0, 0}) // unknown cache: ignored
	must(j.addTask("t1", []byte(`{"kind":"seed"}`)))
	must(j.addTask("t2", []byte(`{"kind":"expire"}`)))
	j.taskCursor("t1", []byte(`{"n":1}`))
	j.taskCursor("t1", []byte(`{"n":2}`))
	j.taskEnd("t2", nil)
	must(j.addTask("t3", []byte(`{"kind":"cleanup"}`)))
	must(j.sync())
	j.close()
	if err := j.addJobs("a_GRID", []tileCoord{{0, 0, 0}}, 1); !errors.Is(err, errJournalClosed) {
		t.Errorf("addJobs after close: %v, want errJournalClosed", err)
	}

	for round := 0; round < 2; round++ { // the second open replays the snapshot the first wrote
		j2, rep := mustOpenJournal(t, dir)
		wantJobs := []journalJob{
			{"a_GRID", tileCoord{0, 0, 3}, 30},
			{"a_GRID", tileCoord{4, 0, 3}, 10},
			{"b_GRID", tileCoord{8, 8, 5}, 20},
		}
		if !slices.Equal(rep.Jobs, wantJobs) {
			t.Errorf("round %d: jobs %v, want %v", round, rep.Jobs, wantJobs)
		}
		got := fmt.Sprintf("%s", rep.Tasks)
		want := fmt.Sprintf("%s", []journalTask{{"t1", []byte(`{"kind":"seed"}`), []byte(`{"n":2}`)}, {"t3", []byte(`{"kind":"cleanup"}`), nil}})
		if got != want {
			t.Errorf("round %d: tasks %s, want %s", round, got, want)
		}
		if rep.Corrupt != "" {
			t.Errorf("round %d: corrupt %q", round, rep.Corrupt)
		}
		j2.close()
	}
}

// TestJournalJobDoneOrder: jobDone takes no lock and is recorded by the next append or batch,
// yet in order: a job queued again after its done stays live, and a done just before close
// is on disk.
func TestJournalJobDoneOrder(t *testing.T) {
	dir := t.TempDir()
	j, _ := mustOpenJournal(t, dir)
	again, gone := tileCoord{1, 1, 5}, tileCoord{2, 2, 5}
	if err := j.addJobs("a_GRID", []tileCoord{again, gone}, 10); err != nil {
		t.Fatal(err)
	}
	j.jobDone("a_GRID", again)
	if err := j.addJobs("a_GRID", []tileCoord{again}, 10); err != nil { // queued again
		t.Fatal(err)
	}
	j.jobDone("a_GRID", gone)
	if st := j.stats(); st.Records < 4 {
		t.Errorf("stats before close: %+v, want at least 4 records (cache, 2 jobs, a done)", st)
	}
	j.close()
	_, rep := mustOpenJournal(t, dir)
	if want := []journalJob{{"a_GRID", again, 10}}; !slices.Equal(rep.Jobs, want) {
		t.Errorf("replayed jobs %v, want %v", rep.Jobs, want)
	}
}

// journalWithJobs writes n one-job records to a fresh journal and returns the file's bytes
// and the end offset of every record.
func journalWithJobs(t *testing.T, n int) (data []byte, ends []int) {
	t.Helper()
	dir := t.TempDir()
	j, _ := mustOpenJournal(t, dir)
	for i := 0; i < n; i++ {
		if err := j.addJobs("c_GRID", []tileCoord{{int32(i), 0, 10}}, 10); err != nil {
			t.Fatal(err)
		}
	}
	j.close()
	data, err := os.ReadFile(filepath.Join(dir, journalFile))
	if err != nil {
		t.Fatal(err)
	}
	// Walk the framing to find the record ends (the first record names the cache).
	off := len(journalMagic)
	for off < len(data) {
		var l uint64
		var k int
		for l, k = 0, 0; ; k++ {
			b := data[off+k]
			l |= uint64(b&0x7f) << (7 * k)
			if b < 0x80 {
				break
			}
		}
		off += k + 1 + 4 + int(l)
		ends = append(ends, off)
	}
	if len(ends) != n+1 || ends[len(ends)-1] != len(data) {
		t.Fatalf("journal framing: %d records ending at %v, file %d bytes", len(ends), ends, len(data))
	}
	return data, ends
}

func replayBytes(t *testing.T, data []byte) (journalReplay, string) {
	t.Helper()
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, journalFile), data, 0o600); err != nil {
		t.Fatal(err)
	}
	j, rep := mustOpenJournal(t, dir)
	j.close()
	return rep, dir
}

func TestJournalTruncatedTail(t *testing.T) {
	data, ends := journalWithJobs(t, 5)
	for cut := len(journalMagic); cut <= len(data); cut++ {
		rep, dir := replayBytes(t, data[:cut])
		complete := 0 // job records entirely before cut
		for i, e := range ends[1:] {
			if e <= cut {
				complete = i + 1
			}
		}
		atBoundary := cut == len(journalMagic) || slices.Contains(ends, cut)
		if len(rep.Jobs) != complete {
			t.Errorf("cut at %d: %d jobs replayed, want %d", cut, len(rep.Jobs), complete)
		}
		if atBoundary != (rep.Corrupt == "") {
			t.Errorf("cut at %d: corrupt %q, want it reported iff the cut is inside a record", cut, rep.Corrupt)
		}
		if !atBoundary {
			if _, err := os.Stat(filepath.Join(dir, journalFile+".corrupt")); err != nil {
				t.Errorf("cut at %d: damaged file not kept: %v", cut, err)
			}
			// The rewritten journal is clean and keeps the valid prefix.
			rep2, _ := replayBytes(t, mustRead(t, filepath.Join(dir, journalFile)))
			if rep2.Corrupt != "" || len(rep2.Jobs) != complete {
				t.Errorf("cut at %d: after the rewrite: corrupt %q, %d jobs, want clean and %d", cut, rep2.Corrupt, len(rep2.Jobs), complete)
			}
		}
	}
	// A header cut short is a truncated journal, not a foreign file.
	if rep, _ := replayBytes(t, []byte(journalMagic[:3])); rep.Corrupt == "" {
		t.Error("truncated header not reported")
	}
}

func mustRead(t *testing.T, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestJournalFlippedByte(t *testing.T) {
	data, ends := journalWithJobs(t, 5)
	// Flip every byte of the third job record in turn: the first two jobs survive.
	for off := ends[2]; off < ends[3]; off++ {
		bad := bytes.Clone(data)
		bad[off] ^= 0x10
		rep, _ := replayBytes(t, bad)
		if rep.Corrupt == "" || rep.Dropped <= 0 {
			t.Errorf("byte %d flipped: corrupt %q dropped %d, want it reported", off, rep.Corrupt, rep.Dropped)
		}
		if len(rep.Jobs) != 2 {
			t.Errorf("byte %d flipped: %d jobs replayed, want the 2 before it", off, len(rep.Jobs))
		}
	}
}

// TestJournalBadMagic: a file that is not a journal, or whose 8-byte header is damaged, is
// set aside whole as journal.corrupt, and the journal starts empty and writable.
func TestJournalBadMagic(t *testing.T) {
	data, _ := journalWithJobs(t, 3)
	damaged := bytes.Clone(data)
	damaged[3] ^= 0x40
	for name, content := range map[string][]byte{"foreign": []byte("hello, world\n"), "bad header": damaged} {
		dir := t.TempDir()
		os.WriteFile(filepath.Join(dir, journalFile), content, 0o600)
		j, rep := mustOpenJournal(t, dir)
		if !strings.Contains(rep.Corrupt, "not a mapproxy-renderd journal") || len(rep.Jobs) != 0 {
			t.Errorf("%s: corrupt %q, %d jobs; want it reported as not a journal, and no jobs", name, rep.Corrupt, len(rep.Jobs))
		}
		if got, _ := os.ReadFile(filepath.Join(dir, journalFile+".corrupt")); !bytes.Equal(got, content) {
			t.Errorf("%s: journal.corrupt holds %q, want the damaged file", name, got)
		}
		if err := j.addJobs("c_GRID", []tileCoord{{1, 2, 3}}, 10); err != nil {
			t.Errorf("%s: the new journal cannot write: %v", name, err)
		}
		j.close()
		if _, rep := mustOpenJournal(t, dir); len(rep.Jobs) != 1 || rep.Corrupt != "" {
			t.Errorf("%s: reopened: %d jobs, corrupt %q; want 1 and clean", name, len(rep.Jobs), rep.Corrupt)
		}
	}
	// A directory where the journal should be is set aside too.
	dir := t.TempDir()
	os.MkdirAll(filepath.Join(dir, journalFile, "x"), 0o700)
	if _, rep := mustOpenJournal(t, dir); !strings.Contains(rep.Corrupt, "not a regular file") {
		t.Errorf("directory: corrupt %q, want not a regular file", rep.Corrupt)
	}
}

// TestJournalCompactionUnderLoad appends and retires jobs from many goroutines with a tiny
// compaction threshold, so that the journal is rewritten many times while appends go on;
// the reopened journal must hold exactly the jobs acknowledged and not retired.
func TestJournalCompactionUnderLoad(t *testing.T) {
	dir := t.TempDir()
	var logBuf syncBuffer
	j, _, err := openJournal(dir, slog.New(slog.NewTextHandler(&logBuf, nil)))
	if err != nil {
		t.Fatal(err)
	}
	j.compactMin = 2048
	const workers, perWorker = 8, 2000
	live := make([]map[tileCoord]bool, workers)
	var wg sync.WaitGroup
	for w := 0; w < workers; w++ {
		live[w] = map[tileCoord]bool{}
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < perWorker; i++ {
				tc := tileCoord{X: int32(i), Y: int32(w), Z: 12}
				if err := j.addJobs("load_GRID", []tileCoord{tc}, 10); err != nil {
					t.Error(err)
					return
				}
				live[w][tc] = true
				if i%10 != 0 { // retire nine of ten, some time later
					old := tileCoord{X: int32(i - 5), Y: int32(w), Z: 12}
					if live[w][old] && old.X%10 != 0 {
						j.jobDone("load_GRID", old)
						delete(live[w], old)
					}
				}
			}
		}()
	}
	wg.Wait()
	if err := j.sync(); err != nil {
		t.Fatal(err)
	}
	st := j.stats()
	j.close()
	if n := strings.Count(logBuf.String(), "journal compacted"); n < 3 {
		t.Fatalf("journal compacted %d times, want several (stats %+v)", n, st)
	}
	_, rep := mustOpenJournal(t, dir)
	want := 0
	for _, m := range live {
		want += len(m)
	}
	if len(rep.Jobs) != want || rep.Corrupt != "" {
		t.Fatalf("replayed %d jobs (corrupt %q), want %d", len(rep.Jobs), rep.Corrupt, want)
	}
	for _, jj := range rep.Jobs {
		if !live[jj.Tile.Y][jj.Tile] {
			t.Fatalf("replayed %v, which was retired", jj)
		}
	}
}

// BenchmarkJournalEnqueue measures background jobs journaled per second with group commit:
// many concurrent appenders (as many clients' background requests), each waiting for its
// batch's fdatasync before it would answer queued.
func BenchmarkJournalEnqueue(b *testing.B) {
	dir := b.TempDir()
	j, _, err := openJournal(dir, quietLog())
	if err != nil {
		b.Fatal(err)
	}
	defer j.close()
	var next sync.Mutex
	n := int32(0)
	b.SetParallelism(512)
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			next.Lock()
			n++
			x := n
			next.Unlock()
			if err := j.addJobs("osm_cache_GLOBAL_WEBMERCATOR", []tileCoord{{X: x % 32768 * 8, Y: x / 32768 * 8, Z: 18}}, 10); err != nil {
				b.Error(err)
				return
			}
		}
	})
	b.StopTimer()
	st := j.stats()
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "jobs/s")
	b.ReportMetric(float64(st.Records)/float64(max(st.Batches, 1)), "records/fsync")
	b.ReportMetric(float64(st.Bytes)/float64(max(st.Jobs, 1)), "bytes/job")
}

// BenchmarkJournalReplay measures opening a journal of 1M background job records: replay,
// then the compacting rewrite.
func BenchmarkJournalReplay(b *testing.B) {
	const jobs = 1_000_000
	dir := b.TempDir()
	data := []byte(journalMagic)
	data = appendRecord(data, append([]byte{recCache, 0}, "osm_cache_GLOBAL_WEBMERCATOR"...))
	var body []byte
	for i := 0; i < jobs; i++ {
		k := jkey{cache: 0, z: 18, x: int32(i%4096) * 8, y: int32(i/4096) * 8}
		data = appendRecord(data, encodeJob(body[:0], recJob, k, 10))
	}
	path := filepath.Join(dir, journalFile)
	b.ReportMetric(float64(len(data))/jobs, "bytes/job")
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		b.StopTimer()
		if err := os.WriteFile(path, data, 0o600); err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
		j, rep, err := openJournal(dir, quietLog())
		if err != nil {
			b.Fatal(err)
		}
		if len(rep.Jobs) != jobs {
			b.Fatalf("replayed %d jobs, want %d", len(rep.Jobs), jobs)
		}
		j.close()
	}
	b.ReportMetric(b.Elapsed().Seconds()/float64(b.N), "s/replay")
}

// BenchmarkJournalEnqueueThen is BenchmarkJournalEnqueue with addJobsThen: one submitter,
// no goroutine per waiting request (as a connection handing replies to its sink).
func BenchmarkJournalEnqueueThen(b *testing.B) {
	dir := b.TempDir()
	j, _, err := openJournal(dir, quietLog())
	if err != nil {
		b.Fatal(err)
	}
	defer j.close()
	var acked sync.WaitGroup
	acked.Add(b.N)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		x := int32(i)
		j.addJobsThen("osm_cache_GLOBAL_WEBMERCATOR", []tileCoord{{X: x % 32768 * 8, Y: x / 32768 * 8, Z: 18}}, 10, func(err error) {
			if err != nil {
				b.Error(err)
			}
			acked.Done()
		})
	}
	acked.Wait()
	b.StopTimer()
	st := j.stats()
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "jobs/s")
	b.ReportMetric(float64(st.Records)/float64(max(st.Batches, 1)), "records/fsync")
	b.ReportMetric(float64(st.Bytes)/float64(max(st.Jobs, 1)), "bytes/job")
}

func TestJournalOneDaemonPerStateDir(t *testing.T) {
	dir := t.TempDir()
	j, _ := mustOpenJournal(t, dir)
	if _, _, err := openJournal(dir, quietLog()); err == nil || !strings.Contains(err.Error(), "in use") {
		t.Errorf("second open: %v, want in use", err)
	}
	j.close()
	j2, _ := mustOpenJournal(t, dir) // released by close
	j2.close()
}

// TestJournalMetricsAndStatus: a background job shows in the status document's journal
// figures and in the journal metrics until it is rendered.
func TestJournalMetricsAndStatus(t *testing.T) {
	d := newTestDaemon(t, daemonOpts{tcp: true, gate: true, maxSeed: -1})
	cl := d.dial()
	cl.send(`{"command":"tile","id":"b","cache_identifier":"m_GRID","tiles":[[1,2,3]],"background":true}`)
	if r := cl.read(); r.Status != statusQueued {
		t.Fatalf("background request: %+v", r)
	}
	if st := d.status(); st.Journal == nil || st.Journal.Jobs != 1 || st.Journal.Records < 2 || st.Journal.Batches < 1 {
		t.Errorf("status journal %+v, want 1 job, ≥ 2 records (cache name, job), ≥ 1 batch", st.Journal)
	}
	metric := func() string {
		resp, err := http.Get("http://" + d.tcp + "/metrics")
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return string(b)
	}
	if m := metric(); !strings.Contains(m, "\nmapproxy_renderd_journal_jobs 1\n") {
		t.Errorf("metrics lack journal_jobs 1:\n%s", m)
	}
	d.release(1)
	d.waitFor("the job rendered", func(s statusDoc) bool { return s.Journal != nil && s.Journal.Jobs == 0 })
	if m := metric(); !strings.Contains(m, "\nmapproxy_renderd_journal_jobs 0\n") {
		t.Errorf("metrics lack journal_jobs 0 after the render")
	}
}

// TestJournalJobKeyRange: the live set packs a job's cache number and z into one word and
// its acceptance sequence and priority into its value; coordinates at their limits, cache
// numbers past 8 bits, a job done and queued again (it moves to the end) and a raised
// priority (it keeps its place) replay as they were accepted, and a record with z past
// maxZoom ends the valid prefix.
func TestJournalJobKeyRange(t *testing.T) {
	dir := t.TempDir()
	j, _ := mustOpenJournal(t, dir)
	var want []journalJob
	for c := 0; c < 300; c++ { // cache numbers 0..299: they share no bits with z
		name := fmt.Sprintf("c%d_GRID", c)
		tile := tileCoord{X: int32(c), Y: maxCoordinate, Z: int32(c % (maxZoom + 1))}
		if err := j.addJobs(name, []tileCoord{tile}, c%(maxPriority+1)); err != nil {
			t.Fatal(err)
		}
		want = append(want, journalJob{name, tile, c % (maxPriority + 1)})
	}
	edge := []tileCoord{{0, 0, 0}, {maxCoordinate, maxCoordinate, maxZoom}}
	if err := j.addJobs("c1_GRID", edge, 7); err != nil {
		t.Fatal(err)
	}
	if err := j.addJobs("c1_GRID", edge[1:], maxPriority); err != nil { // raised: keeps its place
		t.Fatal(err)
	}
	j.jobDone("c0_GRID", want[0].Tile)
	if err := j.addJobs("c0_GRID", []tileCoord{want[0].Tile}, 3); err != nil { // again: last
		t.Fatal(err)
	}
	want = append(want[1:], journalJob{"c1_GRID", edge[0], 7}, journalJob{"c1_GRID", edge[1], maxPriority},
		journalJob{"c0_GRID", want[0].Tile, 3})
	j.close()
	for round := 0; round < 2; round++ { // the second open replays the snapshot the first wrote
		j2, rep := mustOpenJournal(t, dir)
		if !slices.Equal(rep.Jobs, want) {
			t.Fatalf("round %d: replayed %d jobs, want %d in acceptance order:\n got %v\nwant %v", round, len(rep.Jobs), len(want), rep.Jobs, want)
		}
		j2.close()
	}

	data := appendRecord([]byte(journalMagic), append([]byte{recCache, 0}, "a_GRID"...))
	data = appendRecord(data, encodeJob(nil, recJob, jkey{cache: 0, z: 3, x: 1, y: 1}, 10))
	data = appendRecord(data, encodeJob(nil, recJob, jkey{cache: 0, z: maxZoom + 1, x: 1, y: 1}, 10))
	path := t.TempDir() + "/journal"
	if err := os.WriteFile(path, data, 0o600); err != nil {
		t.Fatal(err)
	}
	j3 := newJournalState("", quietLog())
	rep, err := j3.replayFile(path)
	if err != nil || !strings.Contains(rep.Corrupt, "bad job record") || rep.Records != 2 {
		t.Errorf("z past maxZoom: %d records, corrupt %q, err %v; want 2 records and a bad job record", rep.Records, rep.Corrupt, err)
	}
	if jobs, _, _ := j3.liveState(); len(jobs) != 1 {
		t.Errorf("z past maxZoom: %d live jobs, want the 1 before it", len(jobs))
	}
}
