package main

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"sync"
	"syscall"
)

// The journal (DESIGN §12) makes accepted background work survive a crash: background
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
// repeated render (jobs done, cursors, task ends) do not wait.
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

// Record types. Payload integers are uvarints; strings are a uvarint length and bytes.
const (
	recCache      byte = 1 // cache number, identifier: names a cache for the records after it
	recJob        byte = 2 // cache number, z, x, y, priority: a background job accepted
	recDone       byte = 3 // cache number, z, x, y: the job was rendered (or failed for good)
	recTaskSpec   byte = 4 // task id, spec (the rest): a task accepted
	recTaskCursor byte = 5 // task id, cursor (the rest): where the task resumes
	recTaskEnd    byte = 6 // task id, final task document (the rest; may be empty): the task ended (done, failed, cancelled);
	// with the id taskNumberID, the rest is the highest task number handed out (taskstore.go)
)

var crcTable = crc32.MakeTable(crc32.Castagnoli)

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

// jkey is a journaled job's identity: its cache number and metatile.
type jkey struct {
	cache   uint32
	z, x, y int32
}

// jentry is a journaled job in acceptance order (FIFO on replay); retired entries stay
// until the next snapshot drops them.
type jentry struct {
	key      jkey
	priority int16
	live     bool
}

type jtask struct {
	seq          uint64
	spec, cursor []byte
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
	failed  error // a write or fsync failed: nothing more is acknowledged (see append)
	caches  map[string]uint32
	names   []string       // by cache number
	jobs    map[jkey]int32 // live jobs: index in order
	order   []jentry
	tasks   map[string]*jtask
	ended   []journalTask // finished task documents, oldest first, at most keptFinishedTasks
	taskNum uint64
	seq     uint64
	size    int64 // bytes in the file, written or in buf
	records int64 // records appended since open (stats)
	batches int64 // fsyncs since open (stats)

	wake   chan struct{} // capacity 1: there is something in buf
	quit   chan struct{} // closed by close
	exited chan struct{} // closed when the writer goroutine returns
	f      *os.File      // owned by the writer goroutine after open
	lock   *os.File      // <dir>/lock, flocked: one daemon per state_dir
}

// openJournal replays <dir>/journal (creating dir and the file when missing), writes a
// compacted file holding the live state, and starts the writer goroutine, which close stops.
// A corrupt or truncated tail is not an error: replay.Corrupt says what was cut.
func openJournal(dir string, log *slog.Logger) (*journal, journalReplay, error) {
	if err := os.MkdirAll(dir, 0o750); err != nil {
		return nil, journalReplay{}, fmt.Errorf("state_dir: %w", err)
	}
	j := newJournalState(dir, log)
	lock, err := os.OpenFile(filepath.Join(dir, "lock"), os.O_CREATE|os.O_RDWR, 0o640)
	if err != nil {
		return nil, journalReplay{}, fmt.Errorf("state_dir: %w", err)
	}
	if err := syscall.Flock(int(lock.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		lock.Close()
		return nil, journalReplay{}, fmt.Errorf("state_dir: %s is in use by another mapproxy-renderd (%w)", dir, err)
	}
	j.lock = lock
	path := filepath.Join(dir, journalFile)
	rep, err := j.replayFile(path)
	if err != nil {
		lock.Close()
		return nil, rep, err
	}
	if rep.Corrupt != "" {
		log.Error("journal: corrupt tail cut; the valid prefix is used", "file", path, "records", rep.Records,
			"reason", rep.Corrupt, "bytes_dropped", rep.Dropped, "kept_as", path+".corrupt")
		if err := copyFile(path, path+".corrupt"); err != nil {
			log.Warn("journal: could not keep the corrupt file", "error", err)
		}
	}
	rep.Jobs, rep.Tasks = j.liveState()
	rep.Finished, rep.TaskNumber = slices.Clone(j.ended), j.taskNum
	f, size, err := j.writeSnapshot()
	if err != nil {
		lock.Close()
		return nil, rep, err
	}
	j.f, j.size = f, size
	go j.writer()
	return j, rep, nil
}

// newJournalState is an empty journal, not yet open: replayFile fills it.
func newJournalState(dir string, log *slog.Logger) *journal {
	return &journal{
		dir: dir, log: log, compactMin: defaultCompactMin,
		caches: make(map[string]uint32), jobs: make(map[jkey]int32), tasks: make(map[string]*jtask),
		group: &commitGroup{done: make(chan struct{})},
		wake:  make(chan struct{}, 1), quit: make(chan struct{}), exited: make(chan struct{}),
	}
}

// replayFile reads path into the live state. A missing file is an empty journal.
func (j *journal) replayFile(path string) (journalReplay, error) {
	var rep journalReplay
	f, err := os.Open(path)
	if errors.Is(err, os.ErrNotExist) {
		return rep, nil
	}
	if err != nil {
		return rep, fmt.Errorf("journal: %w", err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return rep, fmt.Errorf("journal: %w", err)
	}
	r := bufio.NewReaderSize(f, 1<<20)
	magic := make([]byte, len(journalMagic))
	n, _ := io.ReadFull(r, magic)
	switch {
	case n == 0:
		return rep, nil // empty file
	case n < len(magic) && journalMagic[:n] == string(magic[:n]):
		rep.Corrupt, rep.Dropped = "truncated header", int64(n)
		return rep, nil
	case string(magic) != journalMagic:
		return rep, fmt.Errorf("journal: %s is not a mapproxy-renderd journal (bad magic)", path)
	}
	off := int64(len(journalMagic))
	var body []byte
	for {
		n, err := binary.ReadUvarint(r)
		if err == io.EOF {
			return rep, nil
		}
		cut := func(why string) (journalReplay, error) {
			rep.Corrupt = fmt.Sprintf("%s at offset %d", why, off)
			rep.Dropped = st.Size() - off
			return rep, nil
		}
		if err != nil {
			if errors.Is(err, io.ErrUnexpectedEOF) {
				return cut("truncated record length")
			}
			return cut("bad record length")
		}
		if n == 0 || n > maxJournalRecord {
			return cut(fmt.Sprintf("bad record length %d", n))
		}
		var crc [4]byte
		if _, err := io.ReadFull(r, crc[:]); err != nil {
			return cut("truncated record")
		}
		if cap(body) < int(n) {
			body = make([]byte, n)
		}
		body = body[:n]
		if _, err := io.ReadFull(r, body); err != nil {
			return cut("truncated record")
		}
		if crc32.Checksum(body, crcTable) != binary.LittleEndian.Uint32(crc[:]) {
			return cut("checksum mismatch")
		}
		if err := j.apply(body); err != nil {
			return cut(err.Error())
		}
		rep.Records++
		off += int64(uvarintLen(n)) + 4 + int64(n)
	}
}

// apply changes the live state by one record body. It is the one place that knows what a
// record means, used by replay and (through appendLocked) by appends. Caller holds mu or
// owns j exclusively.
func (j *journal) apply(body []byte) error {
	d := recDecoder{b: body[1:]}
	switch body[0] {
	case recCache:
		num, name := d.uvarint(), d.rest()
		if d.bad || num != uint64(len(j.names)) {
			return errors.New("bad cache record")
		}
		j.names = append(j.names, string(name))
		j.caches[string(name)] = uint32(num)
	case recJob, recDone:
		k := jkey{cache: uint32(d.uvarint()), z: int32(d.uvarint()), x: int32(d.uvarint()), y: int32(d.uvarint())}
		prio := 0
		if body[0] == recJob {
			prio = int(d.uvarint())
		}
		if d.bad || int(k.cache) >= len(j.names) || !d.done() {
			return errors.New("bad job record")
		}
		i, ok := j.jobs[k]
		switch {
		case body[0] == recDone:
			if ok {
				j.order[i].live = false
				delete(j.jobs, k)
			}
		case ok:
			j.order[i].priority = int16(max(int(j.order[i].priority), prio))
		default:
			j.jobs[k] = int32(len(j.order))
			j.order = append(j.order, jentry{key: k, priority: int16(prio), live: true})
		}
	case recTaskSpec, recTaskCursor, recTaskEnd:
		id, rest := string(d.str()), d.rest()
		if d.bad {
			return errors.New("bad task record")
		}
		switch body[0] {
		case recTaskSpec:
			j.seq++
			j.tasks[id] = &jtask{seq: j.seq, spec: bytes.Clone(rest)}
		case recTaskCursor:
			if t := j.tasks[id]; t != nil {
				t.cursor = bytes.Clone(rest)
			}
		case recTaskEnd:
			if id == taskNumberID {
				n, err := strconv.ParseUint(string(rest), 10, 63)
				if err != nil {
					return errors.New("bad task number record")
				}
				j.taskNum = max(j.taskNum, n)
				break
			}
			delete(j.tasks, id)
			j.keepEnded(id, rest)
		}
	default:
		return fmt.Errorf("unknown record type %d", body[0])
	}
	return nil
}

// liveState lists the live jobs and tasks in acceptance order, and drops retired jobs
// from the order (their records are gone from the next snapshot). Caller holds mu.
func (j *journal) liveState() ([]journalJob, []journalTask) {
	jobs := make([]journalJob, 0, len(j.jobs))
	kept := j.order[:0]
	for i, e := range j.order {
		if !e.live {
			continue
		}
		if len(kept) != i { // an entry before moved out: this one moves down
			j.jobs[e.key] = int32(len(kept))
		}
		kept = append(kept, e)
		jobs = append(jobs, journalJob{Cache: j.names[e.key.cache], Tile: tileCoord{X: e.key.x, Y: e.key.y, Z: e.key.z}, Priority: int(e.priority)})
	}
	clear(j.order[len(kept):])
	j.order = kept
	tasks := make([]journalTask, 0, len(j.tasks))
	seqs := make(map[string]uint64, len(j.tasks))
	for id, t := range j.tasks {
		tasks = append(tasks, journalTask{ID: id, Spec: t.spec, Cursor: t.cursor})
		seqs[id] = t.seq
	}
	slices.SortFunc(tasks, func(a, b journalTask) int { return cmpU64(seqs[a.ID], seqs[b.ID]) })
	return jobs, tasks
}

func cmpU64(a, b uint64) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

// snapshotLocked encodes the live state as a journal file. Caller holds mu (or owns j).
func (j *journal) snapshotLocked() []byte {
	out := make([]byte, 0, len(journalMagic)+len(j.jobs)*16+1024)
	out = append(out, journalMagic...)
	var body []byte
	for num, name := range j.names {
		body = appendUvarint(append(body[:0], recCache), uint64(num))
		out = appendRecord(out, append(body, name...))
	}
	for _, e := range j.order {
		if e.live {
			out = appendRecord(out, encodeJob(body[:0], recJob, e.key, int(e.priority)))
		}
	}
	if j.taskNum > 0 {
		out = appendRecord(out, encodeTask(body[:0], recTaskEnd, taskNumberID, strconv.AppendUint(nil, j.taskNum, 10)))
	}
	for _, t := range j.ended {
		out = appendRecord(out, encodeTask(body[:0], recTaskEnd, t.ID, t.Spec))
	}
	_, tasks := j.liveState()
	for _, t := range tasks {
		out = appendRecord(out, encodeTask(body[:0], recTaskSpec, t.ID, t.Spec))
		if t.Cursor != nil {
			out = appendRecord(out, encodeTask(body[:0], recTaskCursor, t.ID, t.Cursor))
		}
	}
	return out
}

// writeSnapshot writes the live state to journal.new, syncs it, renames it over journal
// and syncs the directory. It returns the new file, open for appending, and its size.
func (j *journal) writeSnapshot() (*os.File, int64, error) {
	j.mu.Lock()
	data := j.snapshotLocked()
	j.mu.Unlock()
	return j.installFile(data)
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
	if err := syscall.Fdatasync(int(f.Fd())); err != nil {
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
	for {
		select {
		case <-j.wake:
		case <-j.quit:
			j.flush()
			j.f.Close()
			j.lock.Close() // the flock goes with it
			return
		}
		j.flush()
		j.maybeCompact()
	}
}

// flush writes and syncs the pending batch and wakes its appenders.
func (j *journal) flush() {
	j.mu.Lock()
	data, g := j.buf, j.group
	j.buf = nil
	j.group = &commitGroup{done: make(chan struct{})}
	failed := j.failed
	j.mu.Unlock()
	err := failed
	if err == nil && len(data) > 0 {
		if _, err = j.f.Write(data); err == nil {
			err = syscall.Fdatasync(int(j.f.Fd()))
		}
		if err != nil {
			// After a failed write or fsync the kernel's page cache and the disk may
			// disagree, so nothing written later could be trusted: refuse from now on.
			err = fmt.Errorf("journal write failed: %w", err)
			j.log.Error("journal: write failed; background work is refused until restart", "error", err)
			j.mu.Lock()
			j.failed = err
			j.mu.Unlock()
		}
	}
	j.mu.Lock()
	j.batches++
	j.mu.Unlock()
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
	// snapshot is written; the flush after the new file is in place releases them all.
	data := j.snapshotLocked()
	pending := j.buf
	j.buf = nil
	j.mu.Unlock()
	f, size, err := j.installFile(data)
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
	n := len(j.buf)
	j.buf = appendRecord(j.buf, body)
	j.size += int64(len(j.buf) - n)
	j.records++
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

// begin takes mu for an append; it fails when the journal is closed or broken.
func (j *journal) begin() error {
	j.mu.Lock()
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

// addJobs journals background jobs (metatile keys of one cache) and returns when they are
// on disk: only then may the daemon answer queued. A job already live keeps one record
// (a higher priority is recorded again).
func (j *journal) addJobs(cache string, tiles []tileCoord, priority int) error {
	if err := j.begin(); err != nil {
		return err
	}
	return j.end(j.addJobsLocked(cache, tiles, priority) || len(j.buf) > 0)
}

// addJobsThen is addJobs without a waiting goroutine: then is called once, with nil when
// the jobs are on disk or with the reason they are not. It runs on the journal's writer
// goroutine (or on the caller's, when the journal is closed or broken), so it must not
// block: hand the work on, as a replySink does.
func (j *journal) addJobsThen(cache string, tiles []tileCoord, priority int, then func(error)) {
	if err := j.begin(); err != nil {
		then(err)
		return
	}
	j.addJobsLocked(cache, tiles, priority)
	j.group.then = append(j.group.then, then)
	j.end(false)
}

// addJobsLocked appends the job records addJobs needs; it reports whether it wrote any.
func (j *journal) addJobsLocked(cache string, tiles []tileCoord, priority int) bool {
	c := j.cacheLocked(cache)
	var scratch [48]byte
	wrote := false
	for _, t := range tiles {
		k := jkey{cache: c, z: t.Z, x: t.X, y: t.Y}
		if i, ok := j.jobs[k]; ok && int(j.order[i].priority) >= priority {
			continue
		}
		j.appendLocked(encodeJob(scratch[:0], recJob, k, priority))
		wrote = true
	}
	// When every job was live already, its record may be in a batch not yet on disk: the
	// callers wait for the pending batch too (len(buf) > 0), which holds it if so.
	return wrote
}

// jobDone records that a journaled job was rendered (or failed for good). It does not
// wait: losing it costs one render after a crash. Jobs that were not journaled cost nothing.
func (j *journal) jobDone(cache string, t tileCoord) {
	if j.begin() != nil {
		return
	}
	c, ok := j.caches[cache]
	if !ok {
		j.mu.Unlock()
		return
	}
	k := jkey{cache: c, z: t.Z, x: t.X, y: t.Y}
	if _, live := j.jobs[k]; !live {
		j.mu.Unlock()
		return
	}
	var scratch [48]byte
	j.appendLocked(encodeJob(scratch[:0], recDone, k, 0))
	j.end(false)
}

// taskSpec journals an accepted task and returns when it is on disk.
func (j *journal) taskSpec(id string, spec []byte) error {
	if err := j.begin(); err != nil {
		return err
	}
	j.appendLocked(encodeTask(nil, recTaskSpec, id, spec))
	return j.end(true)
}

// taskCursor records where a task resumes. It does not wait: a lost cursor means resuming
// from the one before (more repeated work, never less).
func (j *journal) taskCursor(id string, cursor []byte) {
	if j.begin() != nil {
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
	if j.begin() != nil {
		return
	}
	if _, ok := j.tasks[id]; ok || len(doc) > 0 {
		j.appendLocked(encodeTask(nil, recTaskEnd, id, doc))
	}
	j.end(false)
}

// sync waits until everything appended so far is on disk.
func (j *journal) sync() error {
	if err := j.begin(); err != nil {
		return err
	}
	return j.end(len(j.buf) > 0)
}

// journalStats are the journal's figures for the status document.
type journalStats struct {
	Bytes   int64 `json:"bytes"`
	Jobs    int   `json:"jobs"`
	Tasks   int   `json:"tasks"`
	Records int64 `json:"records"`
	Batches int64 `json:"batches"`
}

func (j *journal) stats() journalStats {
	j.mu.Lock()
	defer j.mu.Unlock()
	return journalStats{Bytes: j.size, Jobs: len(j.jobs), Tasks: len(j.tasks), Records: j.records, Batches: j.batches}
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

// appendRecord frames body: uvarint length, CRC-32C, body.
func appendRecord(out, body []byte) []byte {
	out = appendUvarint(out, uint64(len(body)))
	out = binary.LittleEndian.AppendUint32(out, crc32.Checksum(body, crcTable))
	return append(out, body...)
}

func appendUvarint(b []byte, v uint64) []byte { return binary.AppendUvarint(b, v) }

func uvarintLen(v uint64) int {
	n := 1
	for v >= 0x80 {
		v >>= 7
		n++
	}
	return n
}

func encodeJob(b []byte, typ byte, k jkey, priority int) []byte {
	b = append(b, typ)
	b = appendUvarint(b, uint64(k.cache))
	b = appendUvarint(b, uint64(k.z))
	b = appendUvarint(b, uint64(k.x))
	b = appendUvarint(b, uint64(k.y))
	if typ == recJob {
		b = appendUvarint(b, uint64(priority))
	}
	return b
}

func encodeTask(b []byte, typ byte, id string, rest []byte) []byte {
	b = append(b, typ)
	b = appendUvarint(b, uint64(len(id)))
	b = append(b, id...)
	return append(b, rest...)
}

// recDecoder reads a record payload; bad is set on the first malformed field.
type recDecoder struct {
	b   []byte
	bad bool
}

func (d *recDecoder) uvarint() uint64 {
	v, n := binary.Uvarint(d.b)
	if n <= 0 || v > maxCoordinate {
		d.bad = true
		return 0
	}
	d.b = d.b[n:]
	return v
}

func (d *recDecoder) str() []byte {
	n := d.uvarint()
	if d.bad || n > uint64(len(d.b)) {
		d.bad = true
		return nil
	}
	s := d.b[:n]
	d.b = d.b[n:]
	return s
}

func (d *recDecoder) rest() []byte {
	r := d.b
	d.b = nil
	return r
}

func (d *recDecoder) done() bool { return len(d.b) == 0 }

// openStateJournal opens the journal the configuration asks for: nil when journal is false,
// and nil with a warning when the default state_dir cannot be used (the daemon is not root
// and has no StateDirectory=), so that `mapproxy-renderd -f mapproxy.yaml` still runs
// anywhere. A state_dir given in renderd.yaml must work.
func openStateJournal(cfg Config, log *slog.Logger) (*journal, journalReplay, error) {
	if !cfg.Journal {
		return nil, journalReplay{}, nil
	}
	j, rep, err := openJournal(cfg.StateDir, log)
	if err != nil && !cfg.stateDirSet {
		log.Warn("journal off: the default state_dir cannot be used; accepted background work will not survive a crash (set state_dir, or journal: false to silence this)",
			"state_dir", cfg.StateDir, "error", err)
		return nil, journalReplay{}, nil
	}
	return j, rep, err
}

// requeueJournaled queues the background jobs a journal replay found, as background
// requests, before the daemon serves: they keep their priority and order. A job the
// daemon cannot queue any more (its cache is gone from the renderers, say) is logged and
// retired from the journal.
func requeueJournaled(s *scheduler, j *journal, jobs []journalJob, log *slog.Logger) {
	if len(jobs) == 0 {
		return
	}
	sink := &replaySink{j: j, log: log}
	for _, jj := range jobs {
		s.submit(&pendingRequest{sink: sink, req: Request{Command: "tile", CacheIdentifier: jj.Cache,
			Tiles: []tileCoord{jj.Tile}, Priority: jj.Priority, Background: true, replayed: true}})
	}
	log.Info("journal: background jobs queued again", "jobs", len(jobs))
}

// replaySink takes the replies to requeued jobs: queued is the normal answer.
type replaySink struct {
	j      *journal
	log    *slog.Logger
	mu     sync.Mutex
	logged int
}

func (r *replaySink) deliver(p *pendingRequest, rep Reply) {
	if rep.Status == statusQueued {
		return
	}
	r.j.jobDone(p.req.CacheIdentifier, p.req.Tiles[0])
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.logged++; r.logged <= 10 {
		t := p.req.Tiles[0]
		r.log.Warn("journal: a journaled job could not be queued again; dropped", "cache", p.req.CacheIdentifier,
			"z", t.Z, "x", t.X, "y", t.Y, "status", rep.Status, "error", rep.ErrorMessage)
	}
}
