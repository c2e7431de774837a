// SPDX-License-Identifier: Apache-2.0

package main

import (
	"context"
	"log/slog"
	"slices"
)

// The scheduler's side of the renderers (its goroutine alone runs this file): the slot of
// each renderer, the renderer events (started, ready, finished, exited), a job finished,
// and the one count of renderer states.

// slotState is the scheduler's view of one renderer.
type slotState uint8

const (
	slotStarting slotState = iota // process starting or restarting; no job may be sent
	slotIdle                      // ready, no job
	slotBusy                      // a job was sent; waiting for its result
)

type rendererSlot struct {
	state    slotState
	retiring bool // jobs channel closed; it exits after its current job
	initial  bool // started with the daemon; counts for the startup barrier
	ready    bool // has been ready at least once
	job      *job
	started  int64          // when job started, ns since the daemon started
	seed     bool           // the running job is in the seed class
	num      int            // the renderer's number (for logs, the status page)
	pid      int            // its current process, once ready
	failing  bool           // its last start failed; cleared when it is ready
	prio     renderPriority // what its process runs at (nice.go)
}

func (s *scheduler) startRenderer(initial bool) {
	s.nextNum++
	r := newRenderer(s.nextNum, s.rcfg, s.events, s.hardStop, s.log)
	s.slots[r] = &rendererSlot{state: slotStarting, initial: initial, num: s.nextNum, prio: renderPriority{nice: baseNice}}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		r.run()
	}()
}

// retire closes a renderer's job channel: it finishes its current job and exits.
func (s *scheduler) retire(r *renderer) {
	slot := s.slots[r]
	if slot == nil || slot.retiring {
		return
	}
	slot.retiring = true
	s.removeIdle(r)
	close(r.jobs)
}

func (s *scheduler) removeIdle(r *renderer) {
	if i := slices.Index(s.idle, r); i >= 0 {
		s.idle = slices.Delete(s.idle, i, i+1)
	}
}

func (s *scheduler) handleEvent(ev rendererEvent) {
	slot := s.slots[ev.r]
	if slot == nil {
		return
	}
	switch ev.kind {
	case evReady:
		slot.failing = false
		slot.pid = ev.pid
		s.learnCaches(ev.caches)
		s.pf.learn(ev.grids)
		if !slot.ready {
			slot.ready = true
			if slot.initial && s.startupPending > 0 {
				s.startupPending--
				if s.startupPending == 0 {
					s.startup <- nil
				}
			}
		}
		slot.prio = renderPriority{nice: baseNice} // a new process
		if slot.state == slotStarting && !slot.retiring {
			slot.state = slotIdle
			s.idle = append(s.idle, ev.r)
		}
	case evRestart:
		s.m.restarts[ev.reason]++
	case evLost:
		if slot.state == slotIdle {
			slot.state = slotStarting
			s.removeIdle(ev.r)
		}
	case evStartFailed:
		s.stats.rendererFailures++
		slot.failing = true
		s.lastStartErr = ev.err.Error()
		if slot.initial && !slot.ready && s.startupPending > 0 {
			s.startupPending = 0
			s.startup <- ev.err
		}
		if s.allFailing() {
			s.failQueue()
		}
	case evDone:
		s.finishJob(slot, ev)
		slot.job = nil
		slot.prio = ev.prio
		slot.state = slotStarting
		if ev.healthy && !slot.retiring {
			slot.state = slotIdle
			s.idle = append(s.idle, ev.r)
		}
	case evExited:
		if slot.job != nil { // cannot happen: a renderer reports its job before exiting
			s.finishJob(slot, rendererEvent{job: slot.job, status: statusError, msg: "renderer exited"})
		}
		s.removeIdle(ev.r)
		delete(s.slots, ev.r)
	}
}

func (s *scheduler) learnCaches(caches map[string]cacheReady) {
	if caches == nil {
		return
	}
	s.cachesListed = true
	for id, m := range caches {
		c, ok := s.caches[id]
		if !ok {
			c = s.newCache(id)
		}
		c.known = true
		c.metaX, c.metaY = m.meta[0], m.meta[1]
		c.xyz = m.xyz
	}
}

func (s *scheduler) finishJob(slot *rendererSlot, ev rendererEvent) {
	j := ev.job
	s.busy--
	s.qs.finish(j)
	now := s.now()
	renderNS := now - slot.started
	queuedNS := slot.started - j.enqueued
	c := s.cacheList[j.key.cacheIdx()]
	s.countRender(slot, c, j, ev, renderNS)
	backoff := ev.status != statusOK && s.rateFinished(j, slot.started, ev.overload)
	if ev.status == statusOK {
		s.stats.rendered++
		c.rendered++
		if ev.skipped {
			s.stats.renderSkipped++
		}
		s.renderRec.add(renderNS)
		if s.log.Enabled(context.Background(), slog.LevelDebug) {
			s.log.Debug("rendered", "job", j.seq, "cache", c.id, "z", j.key.z, "x", j.key.x, "y", j.key.y,
				"priority", j.priority, "waiters", len(j.waiting()), "queued_ms", durationMS(queuedNS), "render_ms", durationMS(renderNS))
		}
	} else {
		s.stats.failed++
		c.failed++
		if ev.timedOut {
			s.stats.timedOut++
		} else {
			s.stats.renderErrors++
		}
		s.log.Warn("render failed", "job", j.seq, "cache", c.id, "z", j.key.z, "x", j.key.x, "y", j.key.y, "error", ev.msg)
	}
	if s.journal != nil && j.flags&keepJob != 0 {
		// Failed renders are retired too: the client was told queued and waits for nothing.
		s.journal.jobDone(c.id, tileCoord{X: j.key.x, Y: j.key.y, Z: j.key.z})
	}
	for _, w := range j.waiting() {
		if w.answered {
			continue
		}
		w.jobsLeft--
		w.queuedNS = max(w.queuedNS, queuedNS)
		w.renderNS = max(w.renderNS, renderNS)
		if ev.status != statusOK && w.errMsg == "" {
			w.errMsg = ev.msg
			w.backoff = backoff
		}
		if w.jobsLeft > 0 {
			continue
		}
		q, r := durationMS(w.queuedNS), durationMS(w.renderNS)
		reply := Reply{Status: statusOK, QueuedMS: &q, RenderMS: &r, Merged: w.merged, Skipped: ev.skipped && len(w.jobs) == 1}
		if w.errMsg != "" {
			reply.Status = statusError
			reply.ErrorMessage = w.errMsg
			reply.Backoff = w.backoff
		}
		s.answer(w, reply)
	}
	j.waiters = nil
	s.afterRender(j, ev.status == statusOK)
}

// allFailing reports whether no renderer can render: every one that is not being retired
// failed its last start. Queued jobs would wait for ever (MapProxy waits without a
// timeout), so they are failed instead, and so are new requests, until a renderer is ready.
func (s *scheduler) allFailing() bool {
	n := 0
	for _, slot := range s.slots {
		if slot.retiring {
			continue
		}
		if !slot.failing {
			return false
		}
		n++
	}
	return n > 0
}

func (s *scheduler) noRendererMsg() string {
	return "no renderer could be started: " + s.lastStartErr
}

// failQueue answers every queued job's waiters with the start failure and drops the jobs.
func (s *scheduler) failQueue() {
	jobs := s.qs.drain()
	s.pf.resync()
	if len(jobs) == 0 {
		return
	}
	s.log.Error("every renderer fails to start; failing the queued jobs", "jobs", len(jobs), "error", s.lastStartErr)
	for _, j := range jobs {
		s.stats.failed++
		s.stats.noRendererFailed++
		s.cacheList[j.key.cacheIdx()].failed++
		for _, w := range j.waiting() {
			s.answer(w, errorReply(nil, s.noRendererMsg()))
		}
	}
}

// rendererCounts is the one count of the renderers' states; the summary line, health, the
// status document and the metrics all read it. A renderer is ready when its process is up
// and it can take a job now or after its current one (idle or busy).
type rendererCounts struct {
	total    int           // every renderer, retiring ones included
	retiring int           // its job channel is closed: it exits after its current job
	failing  int           // its last start failed
	starting int           // starting or restarting: no job may be sent
	idle     int           // ready, no job
	busy     [nClasses]int // ready, running a job of that class
	// Of the renderers not being retired, which are the ones that will take work:
	active      int
	activeReady int
}

// ready is idle plus busy, retiring renderers included.
func (c rendererCounts) ready() int { return c.idle + c.busy[classLive] + c.busy[classSeed] }

// countRenderers counts the renderers by state. It runs on the scheduler goroutine.
func (s *scheduler) countRenderers() rendererCounts {
	var c rendererCounts
	for _, slot := range s.slots {
		c.total++
		if slot.retiring {
			c.retiring++
		}
		if slot.failing {
			c.failing++
		}
		switch slot.state {
		case slotStarting:
			c.starting++
		case slotIdle:
			c.idle++
		case slotBusy:
			c.busy[classOf(slot.seed)]++
		}
		if !slot.retiring {
			c.active++
			if slot.state != slotStarting {
				c.activeReady++
			}
		}
	}
	return c
}
