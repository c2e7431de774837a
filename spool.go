// SPDX-License-Identifier: Apache-2.0

package main

import (
	"encoding/json"
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"syscall"
)

// What becomes of a list taken from expire_dir (docs/design.md §11): it is removed only when its task
// ends done or cancelled. When its task cannot start (the journal cannot write, the daemon
// is stopping) it is put back in the spool under its own name, to be taken again; when its
// task fails, it comes back to the spool as <file>.rejected. Each with a warning that says
// why; a rename that fails is logged as an error naming where the list is.

// spoolWarnings remembers, per spool file, the last warning logged about it, so that a file
// that keeps failing for the same reason (the journal is full, say) is not logged every poll.
// It is owned by the spool goroutine.
type spoolWarnings map[string]string

// maxSpoolWarnings bounds spoolWarnings; when full it is cleared (warnings repeat once).
const maxSpoolWarnings = 4096

func (w spoolWarnings) warn(log *slog.Logger, path, msg string, err error) {
	key := msg + ": " + errReason(err)
	if w[path] == key {
		return
	}
	if len(w) >= maxSpoolWarnings {
		clear(w)
	}
	w[path] = key
	log.Warn(msg, "error", err)
}

// errReason is err without the file name: the same failure on a fresh temporary file each
// poll is the same reason.
func errReason(err error) string {
	var pe *os.PathError
	if errors.As(err, &pe) {
		return pe.Op + ": " + pe.Err.Error()
	}
	var le *os.LinkError
	if errors.As(err, &le) {
		return le.Op + ": " + le.Err.Error()
	}
	return err.Error()
}

// putBackList returns a list whose task did not start to the spool at path: the stored copy
// is removed when the spool file is still there (copied), else it is renamed back.
func (m *taskManager) putBackList(log *slog.Logger, stored, path string, copied bool, why error, warned spoolWarnings) {
	if copied {
		if err := os.Remove(stored); err != nil {
			log.Warn("expire_dir: cannot remove the stored copy of a list whose task did not start", "list", stored, "error", err)
		}
	} else if err := os.Rename(stored, path); err != nil {
		log.Error("expire_dir: the list's task did not start and the list cannot be put back in the spool; it is kept in the list store",
			"kept_as", stored, "reason", why, "error", err)
		return
	}
	warned.warn(log, path, "expire_dir: task not started; the list stays in the spool and is tried again", why)
}

// release disposes of an expire task's list file when the task ends: removed when the task
// is done or cancelled, or when the list did not come from the spool (its client has it);
// a spooled list whose task failed goes back to the spool as <file>.rejected. At shutdown
// (cancelled with reasonShutdown) a list is kept for the resumed task, unless the store is
// volatile (no journal, so no resumption): then it goes back to the spool under its name.
func (ls *listStore) release(spec taskSpec, state, reason string, log *slog.Logger) {
	if spec.Kind != "expire" {
		return
	}
	var es expireTaskSpec
	if json.Unmarshal(spec.Inline, &es) != nil || es.List == "" || filepath.Dir(es.List) != ls.dir {
		return
	}
	log = log.With("list", es.List)
	shutdown := state == taskStateCancelled && reason == reasonShutdown
	switch {
	case shutdown && (!ls.volatile || es.Spool == ""):
		return
	case shutdown:
		if err := moveFile(es.List, es.Spool); err != nil {
			log.Error("expire_dir: the daemon stops before the list's task ended, and the list cannot be put back in the spool", "spool_file", es.Spool, "error", err)
			return
		}
		log.Warn("expire_dir: the daemon stops before the list's task ended; the list is back in the spool", "file", es.Spool)
		return
	case state == taskStateDone || state == taskStateCancelled || es.Spool == "":
		if err := os.Remove(es.List); err != nil && !errors.Is(err, os.ErrNotExist) {
			log.Warn("expiry list: cannot remove it after its task ended", "error", err)
		}
		return
	}
	dst := es.Spool + ".rejected"
	if err := moveFile(es.List, dst); err != nil {
		kept := es.List + ".rejected"
		if rerr := os.Rename(es.List, kept); rerr != nil {
			kept = es.List
		}
		log.Error("expire_dir: the list's task failed and the list cannot be put back in the spool", "reason", reason,
			"kept_as", kept, "error", err)
		return
	}
	log.Warn("expire_dir: the list's task failed; the list is back in the spool", "file", dst, "reason", reason)
}

// moveFile renames from to to, copying (durably) and removing from when they are on
// different file systems.
func moveFile(from, to string) error {
	err := os.Rename(from, to)
	if !errors.Is(err, syscall.EXDEV) {
		return err
	}
	data, err := os.ReadFile(from)
	if err != nil {
		return err
	}
	f, err := os.OpenFile(to+".tmp", os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o640)
	if err != nil {
		return err
	}
	_, err = f.Write(data)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(to+".tmp", to)
	}
	if err != nil {
		os.Remove(to + ".tmp")
		return err
	}
	return os.Remove(from)
}
