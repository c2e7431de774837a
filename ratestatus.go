// SPDX-License-Identifier: Apache-2.0

package main

import (
	"fmt"
	"strconv"
	"strings"
)

// The rate limiter (ratelimit.go) in the status document, /metrics and top.

// rateCacheDoc is one cache's limiter in the status document.
type rateCacheDoc struct {
	Cache         string  `json:"cache"`
	Rate          float64 `json:"rate,omitempty"`           // background_rate; absent: none
	EffectiveRate float64 `json:"effective_rate,omitempty"` // absent: unlimited
	ObservedRate  float64 `json:"observed_rate"`            // starts per second, last 10 s
	Held          int     `json:"held"`                     // in this bucket; a task's held jobs are in its own
	Backoff       bool    `json:"backoff,omitempty"`
	BackoffEvents uint64  `json:"backoff_events"`
	PausedS       float64 `json:"paused_s,omitempty"` // Retry-After left
}

// rateDoc is the limiter's part of the status document.
type rateDoc struct {
	Caches        []rateCacheDoc `json:"caches"`
	HeldJobs      int            `json:"held_jobs"`
	BackoffEvents uint64         `json:"backoff_events"`
}

// rateStatus describes every cache bucket that limits, held or started anything.
func (s *scheduler) rateStatus() rateDoc {
	now := s.now()
	d := rateDoc{Caches: []rateCacheDoc{}, HeldJobs: s.qs.held(), BackoffEvents: s.rl.backoffs}
	for i, b := range s.rl.byCache {
		if b == nil {
			continue
		}
		cd := rateCacheDoc{Cache: s.cacheList[i].id, Rate: b.rate, EffectiveRate: b.eff, ObservedRate: b.observed(now),
			Held: len(b.held), Backoff: b.backoff, BackoffEvents: b.cuts}
		if b.paused > now {
			cd.PausedS = float64(b.paused-now) / 1e9
		}
		d.Caches = append(d.Caches, cd)
	}
	return d
}

// appendRateMetrics writes the limiter's families: per cache its effective rate (where it
// limits), held jobs and backoffs.
func appendRateMetrics(w *promWriter, d rateDoc) {
	w.family("rate_limit_per_second", "gauge", "Metatiles per second a cache's non-live work may start now: background_rate, lowered while backing off (absent: unlimited).")
	for _, c := range d.Caches {
		if c.EffectiveRate > 0 {
			w.sample("rate_limit_per_second", c.EffectiveRate, "cache", c.Cache)
		}
	}
	w.family("rate_held_jobs", "gauge", "Queued jobs the rate limiter holds back, in every bucket (caches' and tasks').")
	w.sample("rate_held_jobs", float64(d.HeldJobs))
	w.family("rate_cache_held_jobs", "gauge", "Queued jobs a cache's bucket holds back (a task's held jobs are in its own bucket).")
	for _, c := range d.Caches {
		w.sample("rate_cache_held_jobs", float64(c.Held), "cache", c.Cache)
	}
	w.family("rate_backoffs_total", "counter", "Times a cache's rate was halved because its upstream was overloaded (429, 503, timeout).")
	for _, c := range d.Caches {
		w.counter("rate_backoffs_total", c.BackoffEvents, "cache", c.Cache)
	}
}

// rateLine is top's summary of the limiter: "" while nothing is limited or held.
func rateLine(d rateDoc) string {
	var parts []string
	for _, c := range d.Caches {
		if c.EffectiveRate == 0 && c.Held == 0 && !c.Backoff {
			continue
		}
		s := c.Cache + " "
		if c.EffectiveRate > 0 {
			s += strconv.FormatFloat(c.EffectiveRate, 'f', 2, 64) + "/s"
		} else {
			s += "unlimited"
		}
		if c.Backoff {
			s += " backing off"
		}
		parts = append(parts, s+", "+strconv.Itoa(c.Held)+" held")
	}
	if len(parts) == 0 && d.HeldJobs == 0 {
		return ""
	}
	return fmt.Sprintf("%d held, %d backoffs: %s", d.HeldJobs, d.BackoffEvents, strings.Join(parts, "; "))
}
