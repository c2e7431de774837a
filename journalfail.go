// SPDX-License-Identifier: Apache-2.0

package main

import (
	"errors"
	"fmt"
	"golang.org/x/sys/unix"
	"os"
	"path/filepath"
	"time"
)

// A journal that cannot write (docs/design.md §12). A full state_dir (ENOSPC, EDQUOT) or a failing
// disk (EIO) must not stop the daemon: live rendering needs no journal. So the journal
// fails instead of the daemon: at open (the snapshot, the lock file or the directory cannot
// be written) or when a batch's write or fdatasync fails. While failed:
//   - durable work is refused with the reason (background jobs are queued but the client
//     is told they are not journaled; tasks are not started; spooled lists stay put);
//   - records that retire work (jobs done, cursors, task ends) still change the live state
//     in memory, so that the state stays exact;
//   - every journalRetry the writer goroutine writes a fresh snapshot of the live state
//     (the old file cannot be trusted after a failed write); when that succeeds the journal
//     is writable again, without a restart;
//   - the status document ("journal": {"failed": …}), /metrics (journal_failed) and a
//     warning at most once a minute say so; /healthz stays 200 (live requests are served)
//     with "degraded" naming the journal.
//
// A damaged journal file, whatever the damage (a bad header, a foreign or unreadable file),
// is set aside as journal.corrupt by renaming or hard-linking, which needs no free space,
// and the daemon starts with what could be read.

// journalRetry is how often a failed journal tries to write a fresh snapshot.
const journalRetry = 2 * time.Second

// journalWarnEvery bounds the "journal failed" warnings.
const journalWarnEvery = time.Minute

// journalDamage is a journal file that cannot be read at all: it is set aside.
type journalDamage struct {
	why  string
	size int64
}

func (e *journalDamage) Error() string { return "journal: " + e.why }

// storageError reports whether err is the storage failing (full, over quota, I/O error,
// read-only) rather than a configuration the operator must fix.
func storageError(err error) bool {
	return errors.Is(err, unix.ENOSPC) || errors.Is(err, unix.EDQUOT) || errors.Is(err, unix.EIO) ||
		errors.Is(err, unix.EROFS)
}

// fail marks the journal failed (the first reason stays) and logs it.
func (j *journal) fail(err error) {
	j.mu.Lock()
	first := j.failed == nil
	if first {
		j.failed, j.failedAt, j.lastWarn = err, time.Now(), time.Now()
		j.statFailed.Store(&journalFailure{err: err, at: j.failedAt})
	}
	j.mu.Unlock()
	if first {
		j.log.Error("journal: cannot write; durable work (background jobs, tasks, expiry lists) is refused until it can, live requests are served",
			"state_dir", j.dir, "error", err, "retry_every", j.retryEvery)
	}
}

// journalFailure is a failed journal's reason and since when, published for stats.
type journalFailure struct {
	err error
	at  time.Time
}

// failure is why the journal cannot write, or nil.
func (j *journal) failure() error {
	j.mu.Lock()
	defer j.mu.Unlock()
	return j.failed
}

// beginState takes mu for a record that only retires work: it fails only when the journal
// is closed, so that a failed journal's live state stays exact (appendLocked does not
// buffer while failed).
func (j *journal) beginState() error {
	j.mu.Lock()
	if j.closed {
		j.mu.Unlock()
		return errJournalClosed
	}
	return nil
}

// takeLock creates and flocks <dir>/lock. Another daemon holding it is an error, whatever
// else happens.
func (j *journal) takeLock() error {
	lock, err := os.OpenFile(filepath.Join(j.dir, "lock"), os.O_CREATE|os.O_RDWR, 0o640)
	if err != nil {
		return fmt.Errorf("state_dir: %w", err)
	}
	if err := unix.Flock(int(lock.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		lock.Close()
		return fmt.Errorf("state_dir: %s is in use by another mapproxy-renderd (%w)", j.dir, err)
	}
	j.lock = lock
	return nil
}

func (j *journal) closeLock() {
	if j.lock != nil {
		j.lock.Close()
		j.lock = nil
	}
}

// retryFailed runs on the writer goroutine every retryEvery: a failed journal writes a
// snapshot of its live state; when it is in place the journal is writable again. Records
// appended while the snapshot is written are buffered (recovering) and go to the new file.
func (j *journal) retryFailed() {
	j.mu.Lock()
	if j.failed == nil || j.closed {
		j.mu.Unlock()
		return
	}
	failed, since := j.failed, j.failedAt
	if time.Since(j.lastWarn) >= journalWarnEvery {
		j.lastWarn = time.Now()
		j.mu.Unlock()
		j.log.Warn("journal: still cannot write; durable work is refused", "state_dir", j.dir, "error", failed,
			"since", since.UTC().Format(time.RFC3339))
		j.mu.Lock()
	}
	j.mu.Unlock()
	if j.lock == nil {
		if err := os.MkdirAll(j.dir, 0o750); err != nil {
			return
		}
		if err := j.takeLock(); err != nil {
			return
		}
	}
	j.mu.Lock()
	j.recovering = true
	data := j.snapshotLocked()
	j.buf = nil // nothing is buffered while failed and not recovering
	j.mu.Unlock()
	f, size, err := j.installFile(encodeSnapshot(data))
	j.mu.Lock()
	j.recovering = false
	if err != nil {
		j.buf = nil // the live state has them; the next snapshot writes them
		j.mu.Unlock()
		return
	}
	old := j.f
	j.f, j.size = f, size+int64(len(j.buf))
	j.failed, j.recoveries = nil, j.recoveries+1
	j.statFailed.Store(nil)
	j.statRecoveries.Store(j.recoveries)
	j.mu.Unlock()
	if old != nil {
		old.Close()
	}
	j.log.Info("journal: writable again; durable work is accepted", "state_dir", j.dir,
		"failed_for", time.Since(since).Round(time.Millisecond), "bytes", size)
	j.flush()
}

// keepCorrupt keeps the journal file as journal.corrupt before it is replaced: a hard link,
// which needs no free space (a copy when the file system has no links). A copy that fails
// leaves no partial journal.corrupt behind.
func keepCorrupt(path string) error {
	os.Remove(path + ".corrupt")
	if err := os.Link(path, path+".corrupt"); err == nil {
		return nil
	}
	if err := copyFile(path, path+".corrupt"); err != nil {
		os.Remove(path + ".corrupt")
		return err
	}
	return nil
}

func boolInt(b bool) int {
	if b {
		return 1
	}
	return 0
}
