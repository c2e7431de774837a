// SPDX-License-Identifier: Apache-2.0

package main

import (
	"log/slog"
	"sync/atomic"
)

// Journal replay and the queue's limit (docs/design.md §12): the jobs a journal replay queues again
// were accepted before the restart. max_queued limits what the daemon accepts, not what it
// already owes, so replayed jobs are queued whatever the limit: a configuration with a
// smaller max_queued, or more journaled jobs than the queue held (jobs that were running),
// must not make the daemon discard accepted work. Until the queue drains below max_queued
// again, new requests get busy, as with any full queue.

// addReplayed is queueState.add for a replayed background job, over max_queued if need be.
func (qs *queueState) addReplayed(keys []jobKey, priority int, now int64) (merged int, err error) {
	limit := qs.max
	qs.max = max(limit, qs.queued()+len(keys))
	defer func() { qs.max = limit }()
	return qs.add(keys, priority, true, nil, now)
}

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
	logged atomic.Int64
}

// Only an error (its cache is unknown now, say) retires the job from the journal; any other
// answer (shutting_down: the daemon stops during the replay) keeps it for the next start.
func (r *replaySink) deliver(p *pendingRequest, rep Reply) {
	if rep.Status == statusQueued {
		return
	}
	what := "dropped"
	if rep.Status == statusError {
		r.j.jobDone(p.req.CacheIdentifier, p.req.Tiles[0])
	} else {
		what = "kept in the journal for the next start"
	}
	if r.logged.Add(1) <= 10 {
		t := p.req.Tiles[0]
		r.log.Warn("journal: a journaled job could not be queued again; "+what, "cache", p.req.CacheIdentifier,
			"z", t.Z, "x", t.X, "y", t.Y, "status", rep.Status, "error", rep.ErrorMessage)
	}
}
