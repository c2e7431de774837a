// SPDX-License-Identifier: Apache-2.0

package main

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// The journal (docs/design.md §12) makes accepted background work survive a crash: background
// jobs, task specs, task cursors, and the records that retire them (jobs done, tasks ended).
//
// File: <state_dir>/journal. An 8-byte magic, then records:
//
//	uvarint n | crc32c(body) as 4 bytes little-endian | body (n bytes: type byte + payload)
//
// A record whose length runs past the end, or whose CRC does not match, ends the valid
// prefix: replay uses everything before it, logs where it cut and how much it dropped, and
// keeps the damaged file as journal.corrupt for a post-mortem.
//
// Group commit: appenders encode their records into a shared buffer under a mutex; one
// writer goroutine takes the whole buffer, writes it and fdatasyncs once, then wakes every
// appender of that batch. An appender that must not acknowledge before its work is on disk
// (a background job, a task spec) waits for its batch; records whose loss costs only a
// repeated render (jobs done, cursors, task ends) do not wait. No lock is held across the
// write, the fsync or a snapshot's encoding; the scheduler hands jobs done over through a
// small queue of their own (jobDone) and reads stats without a lock, so its stalls do not
// grow with the journal.
//
// Compaction keeps the file bounded: the journal keeps the live state (background jobs not
// done, tasks not ended with their last cursor) in memory, and when the file has grown past
// twice its estimated snapshot size (and at least compactMin), the writer, between two
// batches, writes a snapshot of the live state to journal.new, fdatasyncs it, renames it
// over journal and fsyncs the directory. A crash before the rename leaves the old journal,
// which holds everything acknowledged so far; after it, the new one does. Records appended
// while the snapshot is written wait for the next batch, which goes to the new file. Opening
// the journal replays it and always writes such a snapshot, so a restart also compacts.

const (
	journalMagic = "MRDJNL1\n"
	journalFile  = "journal"
	// maxJournalRecord bounds one record on replay; a longer length is corruption.
	maxJournalRecord = 64 << 20
	// defaultCompactMin is the smallest journal that compaction bothers with.
	defaultCompactMin = 64 << 20
)

// errJournalClosed is returned by appends after close.
var errJournalClosed = errors.New("journal closed")

// journalJob is a background job from the journal: a metatile of a cache, as the job key
// has it (internal coordinates), and its priority.
type journalJob struct {
	Cache    string
	Tile     tileCoord
	Priority int
}

// journalTask is a task from the journal: its spec and its last cursor (nil: none yet).
// Both are opaque to the journal (the task manager's JSON).
type journalTask struct {
	ID     string
	Spec   []byte
	Cursor []byte
}

// journalReplay is what opening a journal found: the live state, in the order it was
// accepted, and what was wrong with the file, if anything.
type journalReplay struct {
	Jobs  []journalJob
	Tasks []journalTask
	// Finished are the documents of the last keptFinishedTasks tasks that ended, oldest
	// first; TaskNumber is the highest task number ever handed out (taskstore.go).
	Finished   []journalTask
	TaskNumber uint64
	Records    int64  // valid records read
	Corrupt    string // why the valid prefix ended early ("" = clean)
	Dropped    int64  // bytes after the valid prefix
}

// journalDone is a job done, waiting for its record (see journal.dones).
type journalDone struct {
	cache string
	tile  tileCoord
}

// commitGroup is one batch: closed done after its records are on disk (or failed with err).
// err is written before done is closed and read after.
type commitGroup struct {
	done chan struct{}
	err  error
	then []func(error) // run by the writer goroutine after the batch, in append order
}

// journal is the append-only journal. Every method is safe for concurrent use.
type journal struct {
	dir        string
	log        *slog.Logger
	compactMin int64

	mu      sync.Mutex // guards everything below, and orders records with the live state
	buf     []byte     // records not yet written
	group   *commitGroup
	closed  bool
	failed  error // the journal cannot write: durable work is refused until it recovers (journalfail.go)
	caches  map[string]uint32
	names   []string       // by cache number
	jobs    map[jmkey]jval // live jobs: acceptance sequence << jobPrioBits | priority
	tasks   map[string]*jtask
	ended   []journalTask // finished task documents, oldest first, at most keptFinishedTasks
	taskNum uint64
	seq     uint64 // acceptance sequence of tasks and jobs
	size    int64  // bytes in the file, written or in buf

	// doneMu guards dones: jobs done that are not yet recorded. jobDone (the scheduler,
	// once per finished background job) takes only doneMu, never mu; the next append or
	// flush records them, in order, before anything else.
	doneMu sync.Mutex
	dones  []journalDone

	// The figures of stats, published so that reading them takes no lock (the scheduler
	// reads them for every status document and metrics scrape).
	statBytes, statJobs, statTasks, statRecords, statBatches, statRecoveries atomic.Int64
	statFailed                                                               atomic.Pointer[journalFailure] // nil while the journal can write

	wake   chan struct{} // capacity 1: there is something in buf
	quit   chan struct{} // closed by close
	exited chan struct{} // closed when the writer goroutine returns
	f      *os.File      // owned by the writer goroutine after open; nil while failed from the start
	lock   *os.File      // <dir>/lock, flocked: one daemon per state_dir; nil until it could be created

	// A failed journal (journalfail.go), guarded by mu: failedAt is when failed was set;
	// recovering: a recovery snapshot is being written, so appends are buffered for the new
	// file; recoveries counts them; lastWarn is the last warning (at most one a minute).
	failedAt   time.Time
	recovering bool
	recoveries int64
	lastWarn   time.Time
	retryEvery time.Duration
}

// openJournal replays <dir>/journal (creating dir and the file when missing), writes a
// compacted file holding the live state, and starts the writer goroutine, which close stops.
// A corrupt or truncated tail is not an error: replay.Corrupt says what was cut.
//
// A journal that cannot be written (a full or failing state_dir) is not an error: the
// journal opens failed (journalfail.go), durable work is refused until a retry succeeds, and
// the daemon serves live requests meanwhile. A damaged file, whatever the damage, is set
// aside as journal.corrupt. Errors are what an operator must fix: another daemon holds the
// state_dir, or it cannot be used at all (permissions, not a directory).
func openJournal(dir string, log *slog.Logger) (*journal, journalReplay, error) {
	return openJournalRetry(dir, log, journalRetry)
}

// openJournalRetry is openJournal with a failed journal retrying every retry.
func openJournalRetry(dir string, log *slog.Logger, retry time.Duration) (*journal, journalReplay, error) {
	j := newJournalState(dir, log)
	j.retryEvery = retry
	if err := os.MkdirAll(dir, 0o750); err != nil {
		if !storageError(err) {
			return nil, journalReplay{}, fmt.Errorf("state_dir: %w", err)
		}
		j.fail(fmt.Errorf("state_dir: %w", err))
	} else if err := j.takeLock(); err != nil {
		if !storageError(err) {
			return nil, journalReplay{}, err
		}
		j.fail(err)
	}
	path := filepath.Join(dir, journalFile)
	rep, err := j.replayFile(path)
	if err != nil {
		var de *journalDamage
		if !errors.As(err, &de) {
			j.closeLock()
			return nil, rep, err
		}
		// Nothing of it can be read: it is set aside whole, and the journal starts empty.
		rep = journalReplay{Corrupt: de.why, Dropped: de.size}
		log.Error("journal: unreadable; set aside, and the journal starts empty", "file", path, "reason", de.why, "kept_as", path+".corrupt")
		if err := os.Rename(path, path+".corrupt"); err != nil {
			j.closeLock()
			return nil, rep, fmt.Errorf("journal: cannot set the damaged file aside: %w", err)
		}
	} else if rep.Corrupt != "" {
		log.Error("journal: corrupt tail cut; the valid prefix is used", "file", path, "records", rep.Records,
			"reason", rep.Corrupt, "bytes_dropped", rep.Dropped, "kept_as", path+".corrupt")
		if err := keepCorrupt(path); err != nil {
			log.Warn("journal: could not keep the corrupt file", "error", err)
		}
	}
	var snap journalSnapshot
	rep.Jobs, rep.Tasks, snap = j.liveState()
	rep.Finished, rep.TaskNumber = slices.Clone(j.ended), j.taskNum
	if j.failed == nil {
		f, size, err := j.installFile(encodeSnapshot(snap))
		if err != nil {
			if !storageError(err) {
				j.closeLock()
				return nil, rep, err
			}
			j.fail(err)
		} else {
			j.f, j.size = f, size
		}
	}
	j.publishLocked()
	go j.writer()
	return j, rep, nil
}

// newJournalState is an empty journal, not yet open: replayFile fills it.
func newJournalState(dir string, log *slog.Logger) *journal {
	return &journal{
		dir: dir, log: log, compactMin: defaultCompactMin, retryEvery: journalRetry,
		caches: make(map[string]uint32), jobs: make(map[jmkey]jval), tasks: make(map[string]*jtask),
		group: &commitGroup{done: make(chan struct{})},
		wake:  make(chan struct{}, 1), quit: make(chan struct{}), exited: make(chan struct{}),
	}
}

// installFile makes data the journal, durably (write, fdatasync, rename, fsync the directory).
func (j *journal) installFile(data []byte) (*os.File, int64, error) {
	path := filepath.Join(j.dir, journalFile)
	tmp := path + ".new"
	f, err := os.OpenFile(tmp, os.O_CREATE|os.O_TRUNC|os.O_WRONLY|os.O_APPEND, 0o640)
	if err != nil {
		return nil, 0, fmt.Errorf("journal: %w", err)
	}
	fail := func(err error) (*os.File, int64, error) {
		f.Close()
		os.Remove(tmp)
		return nil, 0, fmt.Errorf("journal: %w", err)
	}
	if _, err := f.Write(data); err != nil {
		return fail(err)
	}
	if err := unix.Fdatasync(int(f.Fd())); err != nil {
		return fail(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return fail(err)
	}
	if err := syncDir(j.dir); err != nil {
		f.Close()
		return nil, 0, fmt.Errorf("journal: %w", err)
	}
	return f, int64(len(data)), nil
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

func copyFile(from, to string) error {
	data, err := os.ReadFile(from)
	if err != nil {
		return err
	}
	return os.WriteFile(to, data, 0o640)
}

// writer is the journal's goroutine: it writes each batch and syncs it once, and compacts
// between batches. It returns after close, having written what was appended before.
func (j *journal) writer() {
	defer close(j.exited)
	retry := time.NewTicker(j.retryEvery)
	defer retry.Stop()
	for {
		select {
		case <-j.wake:
		case <-retry.C:
			j.retryFailed()
			continue
		case <-j.quit:
			j.flush()
			if j.f != nil {
				j.f.Close()
			}
			j.closeLock() // the flock goes with it
			return
		}
		j.flush()
		j.maybeCompact()
	}
}

// flush writes and syncs the pending batch and wakes its appenders.
func (j *journal) flush() {
	j.mu.Lock()
	j.recordDonesLocked()
	data, g := j.buf, j.group
	j.buf = nil
	j.group = &commitGroup{done: make(chan struct{})}
	failed := j.failed
	j.mu.Unlock()
	err := failed
	synced := false
	if err == nil && len(data) > 0 {
		if _, err = j.f.Write(data); err == nil {
			err = unix.Fdatasync(int(j.f.Fd()))
		}
		if err != nil {
			// After a failed write or fsync the kernel's page cache and the disk may
			// disagree, so nothing more is appended to this file: durable work is refused
			// until a fresh snapshot is in place (journalfail.go).
			err = fmt.Errorf("journal write failed: %w", err)
			j.fail(err)
		} else {
			synced = true
		}
	}
	if synced {
		j.statBatches.Add(1)
	}
	g.err = err
	close(g.done)
	for _, f := range g.then {
		f(err)
	}
}

// maybeCompact rewrites the journal as a snapshot when it has grown past twice the size a
// snapshot would have (and past compactMin).
func (j *journal) maybeCompact() {
	j.mu.Lock()
	if j.failed != nil || j.size < j.compactMin || j.size < 2*j.snapshotEstimateLocked() {
		j.mu.Unlock()
		return
	}
	// The snapshot is taken under mu, so it holds exactly the records appended so far,
	// including those still in buf: they must not be written again to the new file. Their
	// appenders keep waiting on the current group, as do those who append while the
	// snapshot is encoded and written (without mu); the flush after the new file is in
	// place releases them all.
	j.recordDonesLocked()
	snap := j.snapshotLocked()
	pending := j.buf
	j.buf = nil
	j.mu.Unlock()
	f, size, err := j.installFile(encodeSnapshot(snap))
	j.mu.Lock()
	if err != nil {
		// The old file is intact and still ours: the pending records go to it after all.
		j.buf = append(pending, j.buf...)
		j.mu.Unlock()
		j.log.Warn("journal: compaction failed; keeping the old file", "error", err)
		j.flush()
		return
	}
	old := j.f
	j.f = f
	j.size = size + int64(len(j.buf))
	j.publishLocked()
	j.mu.Unlock()
	old.Close()
	j.log.Info("journal compacted", "bytes", size)
	j.flush()
}

// snapshotEstimateLocked is about what a snapshot of the live state takes on disk.
func (j *journal) snapshotEstimateLocked() int64 {
	n := int64(len(j.jobs)) * 16
	for _, t := range j.ended {
		n += int64(len(t.Spec)) + 64
	}
	for _, t := range j.tasks {
		n += int64(len(t.spec)+len(t.cursor)) + 64
	}
	return n + 4096
}

// appendLocked frames body, applies it to the live state, and queues it for the writer.
func (j *journal) appendLocked(body []byte) {
	if err := j.apply(body); err != nil {
		panic("journal: appending a record it cannot read back: " + err.Error())
	}
	j.statRecords.Add(1)
	defer j.publishLocked()
	if j.failed != nil && !j.recovering {
		return // the live state has it; the recovery snapshot writes it
	}
	n := len(j.buf)
	j.buf = appendRecord(j.buf, body)
	j.size += int64(len(j.buf) - n)
}

// publishLocked publishes the figures stats reads. Caller holds mu.
func (j *journal) publishLocked() {
	j.statBytes.Store(j.size)
	j.statJobs.Store(int64(len(j.jobs)))
	j.statTasks.Store(int64(len(j.tasks)))
}

// cacheLocked returns the cache's number, appending its record the first time.
func (j *journal) cacheLocked(name string) uint32 {
	if num, ok := j.caches[name]; ok {
		return num
	}
	num := uint64(len(j.names))
	body := appendUvarint([]byte{recCache}, num)
	j.appendLocked(append(body, name...))
	return uint32(num)
}

// begin takes mu for an append; it fails when the journal is closed or broken. Jobs done
// before are recorded first, so that a job queued again after its done is live.
func (j *journal) begin() error {
	j.mu.Lock()
	j.recordDonesLocked()
	if j.closed {
		j.mu.Unlock()
		return errJournalClosed
	}
	if j.failed != nil {
		err := j.failed
		j.mu.Unlock()
		return err
	}
	return nil
}

// end releases mu, wakes the writer, and waits for the batch when wait is set.
func (j *journal) end(wait bool) error {
	g := j.group
	j.mu.Unlock()
	select {
	case j.wake <- struct{}{}:
	default:
	}
	if !wait {
		return nil
	}
	<-g.done
	return g.err
}

// addJobsThen journals background jobs (metatile keys of one cache) and calls then once,
// with nil when they are on disk (only then may the daemon answer queued) or with the
// reason they are not. A job already live keeps one record (a higher priority is recorded
// again). then runs on the journal's writer goroutine (or on the caller's, when the journal
// is closed or broken), so it must not block: hand the work on, as a replySink does. The
// caller does not wait for the disk.
func (j *journal) addJobsThen(cache string, tiles []tileCoord, priority int, then func(error)) {
	if err := j.begin(); err != nil {
		then(err)
		return
	}
	j.addJobsLocked(cache, tiles, priority)
	// When every job was live already, its record may be in a batch not yet on disk: then
	// waits for the pending batch, which holds it if so.
	j.group.then = append(j.group.then, then)
	j.end(false)
}

// addJobsLocked appends the job records addJobsThen needs.
func (j *journal) addJobsLocked(cache string, tiles []tileCoord, priority int) {
	c := j.cacheLocked(cache)
	var scratch [48]byte
	for _, t := range tiles {
		k := jkey{cache: c, z: t.Z, x: t.X, y: t.Y}
		if v, ok := j.jobs[k.packed()]; ok && (jentry{v: v.u64()}).priority() >= priority {
			continue
		}
		j.appendLocked(encodeJob(scratch[:0], recJob, k, priority))
	}
}

// jobDone records that a journaled job was rendered (or failed for good). It does not
// wait, and it does not take mu: the record is written by the next append or batch. Losing
// it costs one render after a crash. Jobs that were not journaled cost nothing.
func (j *journal) jobDone(cache string, t tileCoord) {
	j.doneMu.Lock()
	j.dones = append(j.dones, journalDone{cache: cache, tile: t})
	first := len(j.dones) == 1
	j.doneMu.Unlock()
	if first {
		select {
		case j.wake <- struct{}{}:
		default:
		}
	}
}

// recordDonesLocked appends the records of the jobs done so far. Caller holds mu.
func (j *journal) recordDonesLocked() {
	j.doneMu.Lock()
	dones := j.dones
	j.dones = nil
	j.doneMu.Unlock()
	var scratch [48]byte
	for _, d := range dones {
		c, ok := j.caches[d.cache]
		if !ok || d.tile.Z < 0 || d.tile.Z > maxZoom { // not journaled: apply holds z to maxZoom
			continue
		}
		k := jkey{cache: c, z: d.tile.Z, x: d.tile.X, y: d.tile.Y}
		if _, live := j.jobs[k.packed()]; live {
			j.appendLocked(encodeJob(scratch[:0], recDone, k, 0))
		}
	}
}

// addTask journals an accepted task's spec and returns when it is on disk.
func (j *journal) addTask(id string, spec []byte) error {
	if err := j.begin(); err != nil {
		return err
	}
	j.appendLocked(encodeTask(nil, recTaskSpec, id, spec))
	err := j.end(true)
	if err != nil {
		// The task is refused: a recovery snapshot must not bring it back.
		j.mu.Lock()
		delete(j.tasks, id)
		j.mu.Unlock()
	}
	return err
}

// taskCursor records where a task resumes. It does not wait: a lost cursor means resuming
// from the one before (more repeated work, never less).
func (j *journal) taskCursor(id string, cursor []byte) {
	if j.beginState() != nil {
		return
	}
	if _, ok := j.tasks[id]; ok {
		j.appendLocked(encodeTask(nil, recTaskCursor, id, cursor))
	}
	j.end(false)
}

// taskEnd records that a task ended with its final document doc (kept among the last
// keptFinishedTasks; nil: not kept); it is not resumed after a restart. It does not wait.
func (j *journal) taskEnd(id string, doc []byte) {
	if j.beginState() != nil {
		return
	}
	if _, ok := j.tasks[id]; ok || len(doc) > 0 {
		j.appendLocked(encodeTask(nil, recTaskEnd, id, doc))
	}
	j.end(false)
}

// journalStats are the journal's figures for the status document.
type journalStats struct {
	Bytes   int64 `json:"bytes"`
	Jobs    int   `json:"jobs"`
	Tasks   int   `json:"tasks"`
	Records int64 `json:"records"`
	Batches int64 `json:"batches"`
	// Failed says why the journal cannot write ("" = it can): durable work is refused.
	Failed      string `json:"failed,omitempty"`
	FailedSince string `json:"failed_since,omitempty"` // RFC 3339
	Recoveries  int64  `json:"recoveries"`             // times it became writable again
}

// stats returns the journal's figures without taking its lock.
func (j *journal) stats() journalStats {
	st := journalStats{Bytes: j.statBytes.Load(), Jobs: int(j.statJobs.Load()), Tasks: int(j.statTasks.Load()),
		Records: j.statRecords.Load(), Batches: j.statBatches.Load(), Recoveries: j.statRecoveries.Load()}
	if f := j.statFailed.Load(); f != nil {
		st.Failed, st.FailedSince = f.err.Error(), f.at.UTC().Format(time.RFC3339)
	}
	return st
}

// close writes what was appended, stops the writer goroutine and closes the file.
// Appends after close fail with errJournalClosed. It is idempotent.
func (j *journal) close() {
	j.mu.Lock()
	already := j.closed
	j.closed = true
	j.mu.Unlock()
	if !already {
		close(j.quit)
	}
	<-j.exited
}
