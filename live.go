// SPDX-License-Identifier: Apache-2.0

package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"time"
)

// Live helpers (docs/design.md §13): wait_ms and pending, refresh, the live keys of renderd.yaml.
// Prefetch is in prefetch.go, renderer CPU and I/O priority in nice.go.

// maxWaitMS bounds wait_ms: a day. Longer is a client bug, not a wish.
const maxWaitMS = 24 * 3600 * 1000

// parseLiveFields parses wait_ms and refresh of a tile request. refresh is checked and
// dropped: the module sends "refresh": true on its stale-while-refresh path, and every
// client request forces its render anyway (only a task's may skip fresh tiles).
func parseLiveFields(req *Request, w *wireRequest) error {
	if len(w.WaitMS) > 0 && string(w.WaitMS) != "null" {
		n, err := parseInt(w.WaitMS)
		if err != nil || n < 0 || n > maxWaitMS {
			return fmt.Errorf("wait_ms must be an integer from 0 to %d, got %s", maxWaitMS, truncate(string(w.WaitMS), 32))
		}
		req.WaitMS, req.HasWait = n, true
	}
	if len(w.Refresh) > 0 && string(w.Refresh) != "null" {
		var refresh bool
		if json.Unmarshal(w.Refresh, &refresh) != nil {
			return errors.New("refresh must be true or false")
		}
	}
	return nil
}

// PrefetchConfig is renderd.yaml's prefetch: which caches get their next zoom levels
// rendered after a live render, how deep, and how much of the queue that may take.
type PrefetchConfig struct {
	// Caches are cache identifiers (osm_cache_GLOBAL_WEBMERCATOR) or MapProxy cache names
	// (osm_cache: every grid of it, as the renderer's ready line names them).
	Caches    []string `yaml:"caches"`
	Levels    int      `yaml:"levels"`     // zoom levels below a live render; default 1
	MaxZoom   *int     `yaml:"max_zoom"`   // nothing deeper is prefetched; default: the grid's last level
	Priority  *int     `yaml:"priority"`   // default 5, below seeding (10)
	MaxQueued int      `yaml:"max_queued"` // queued prefetch jobs; beyond it the oldest is dropped. Default 10,000
	// Area: "all" (default): the whole area of every live-rendered metatile; "centre": once
	// live renders of a cache pause, only the centre of what they covered (prefetch.go).
	// "views": from the tiles MapProxy served (views.go), while renderers would idle.
	Area string `yaml:"area"`
	// Budget: prefetch jobs over a minute at most budget × the live renders over it;
	// 0 = no limit. Default 0.5 with area views, 0 (none) otherwise.
	Budget float64 `yaml:"budget"`
}

const (
	defaultPrefetchPriority  = 5
	defaultPrefetchMaxQueued = 10000
	maxPrefetchLevels        = 8
	defaultViewsBudget       = 0.5
)

// validateLive checks the live helpers' keys and fills the prefetch defaults.
func (c *Config) validateLive() error {
	if c.SeedNice < 0 || c.SeedNice > 19 {
		return fmt.Errorf("seed_nice: want 0..19, got %d", c.SeedNice)
	}
	if c.HTTPWait < 0 {
		return fmt.Errorf("http_wait: must not be negative, got %s", c.HTTPWait)
	}
	if c.HTTPWait > 0 && time.Duration(c.HTTPWait) < time.Millisecond {
		return fmt.Errorf("http_wait: want 0 (off) or at least 1ms, got %s", c.HTTPWait)
	}
	p := c.Prefetch
	if p == nil {
		return nil
	}
	if len(p.Caches) == 0 {
		return errors.New("prefetch.caches: list at least one cache (identifier or MapProxy cache name)")
	}
	for i, id := range p.Caches {
		if err := validateCacheIdentifier(id); err != nil {
			return fmt.Errorf("prefetch.caches[%d]: %w", i, err)
		}
	}
	if p.Levels == 0 {
		p.Levels = 1
	}
	if p.Levels < 1 || p.Levels > maxPrefetchLevels {
		return fmt.Errorf("prefetch.levels: want 1..%d, got %d", maxPrefetchLevels, p.Levels)
	}
	if p.MaxZoom != nil && (*p.MaxZoom < 0 || *p.MaxZoom > maxZoom) {
		return fmt.Errorf("prefetch.max_zoom: want 0..%d, got %d", maxZoom, *p.MaxZoom)
	}
	if p.Priority == nil {
		prio := defaultPrefetchPriority
		p.Priority = &prio
	}
	if *p.Priority < minPriority || *p.Priority > maxPriority {
		return fmt.Errorf("prefetch.priority: want %d..%d, got %d", minPriority, maxPriority, *p.Priority)
	}
	if p.MaxQueued == 0 {
		p.MaxQueued = defaultPrefetchMaxQueued
	}
	if p.MaxQueued < 1 {
		return fmt.Errorf("prefetch.max_queued: must be at least 1, got %d", p.MaxQueued)
	}
	switch p.Area {
	case "":
		p.Area = "all"
	case "all", "centre", "views":
	default:
		return fmt.Errorf("prefetch.area: want all, centre or views, got %q", p.Area)
	}
	if p.Budget < 0 || math.IsNaN(p.Budget) || p.Budget > 100 {
		return fmt.Errorf("prefetch.budget: want 0 (no limit) to 100, got %v", p.Budget)
	}
	if p.Budget == 0 && p.Area == "views" {
		p.Budget = defaultViewsBudget
	}
	return nil
}

// armWait starts the wait_ms clock of a request that waits for its jobs. When it runs out
// before the answer, the scheduler answers pending (handleDue). The timer's goroutine
// exits once it has handed the request over, or when the scheduler has stopped.
func (s *scheduler) armWait(p *pendingRequest) {
	if p.req.WaitMS == 0 {
		s.handleDue(p)
		return
	}
	p.waitTimer = time.AfterFunc(time.Duration(p.req.WaitMS)*time.Millisecond, func() {
		select {
		case s.in <- schedMsg{op: opDue, p: p}:
		case <-s.done:
		}
	})
}

// handleDue answers pending to a request whose wait_ms ran out: its jobs stay queued or
// running as background jobs (they are rendered whoever waits), and the request is done.
func (s *scheduler) handleDue(p *pendingRequest) {
	if p.answered {
		return
	}
	for _, j := range p.jobs {
		if j.state == jobDone {
			continue
		}
		j.flags |= keepJob
		s.qs.removeWaiter(j, p)
	}
	s.stats.pending++
	s.answer(p, Reply{Status: statusPending, Merged: p.merged})
}
