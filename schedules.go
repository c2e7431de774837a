// SPDX-License-Identifier: Apache-2.0

package main

import (
	"context"
	"sync"
	"time"
)

// scheduleLoop starts named tasks on their schedules (renderd.yaml schedules:). A run is
// skipped, and counted, while a task of the same name still runs (start reports that).
// One goroutine (run) owns the timer; set and the readers take mu.
type scheduleLoop struct {
	start func(s Schedule) bool

	mu      sync.Mutex
	entries []*scheduleEntry
	wake    chan struct{} // set changed the entries
}

type scheduleEntry struct {
	Schedule
	next          time.Time
	runs, skipped uint64
}

// scheduleDoc is one schedule in the `tasks` reply.
type scheduleDoc struct {
	Task    string  `json:"task"`
	Every   string  `json:"every,omitempty"`
	At      string  `json:"at,omitempty"`
	NextRun string  `json:"next_run"`
	Runs    uint64  `json:"runs"`
	Skipped uint64  `json:"skipped"`
	Rate    float64 `json:"rate,omitempty"`
}

func newScheduleLoop(start func(s Schedule) bool) *scheduleLoop {
	return &scheduleLoop{start: start, wake: make(chan struct{}, 1)}
}

// set replaces the schedules; an unchanged schedule keeps its next run and counters.
func (l *scheduleLoop) set(ss []Schedule) {
	now := time.Now()
	l.mu.Lock()
	old := l.entries
	l.entries = make([]*scheduleEntry, 0, len(ss))
	for _, s := range ss {
		e := &scheduleEntry{Schedule: s, next: firstRun(s, now)}
		for _, o := range old {
			if o.Schedule == s {
				e = o
				break
			}
		}
		l.entries = append(l.entries, e)
	}
	l.mu.Unlock()
	select {
	case l.wake <- struct{}{}:
	default:
	}
}

// firstRun is when a schedule first fires after now: at the next At (local time), or one
// Every from now.
func firstRun(s Schedule, now time.Time) time.Time {
	if s.At != "" {
		h, m, _ := parseClock(s.At) // validated with the configuration
		t := time.Date(now.Year(), now.Month(), now.Day(), h, m, 0, 0, now.Location())
		for !t.After(now) {
			t = t.AddDate(0, 0, 1)
		}
		return t
	}
	return now.Add(time.Duration(s.Every))
}

// nextRun is when a schedule fires after firing at planned (now is later or equal): Every
// after the planned time, or the next day's At; a time already past moves to the next one
// after now, so a daemon that was busy or suspended does not catch up with a burst.
func nextRun(s Schedule, planned, now time.Time) time.Time {
	if s.Every > 0 {
		t := planned.Add(time.Duration(s.Every))
		if !t.After(now) {
			t = now.Add(time.Duration(s.Every))
		}
		return t
	}
	return firstRun(s, now)
}

// run fires schedules until ctx is done.
func (l *scheduleLoop) run(ctx context.Context) {
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	for {
		l.mu.Lock()
		var earliest time.Time
		for _, e := range l.entries {
			if earliest.IsZero() || e.next.Before(earliest) {
				earliest = e.next
			}
		}
		l.mu.Unlock()
		timer.Stop()
		var fire <-chan time.Time
		if !earliest.IsZero() {
			timer.Reset(time.Until(earliest))
			fire = timer.C
		}
		select {
		case <-ctx.Done():
			return
		case <-l.wake:
		case <-fire:
			l.fireDue()
		}
	}
}

// fireDue starts every schedule whose time has come.
func (l *scheduleLoop) fireDue() {
	now := time.Now()
	l.mu.Lock()
	var due []*scheduleEntry
	for _, e := range l.entries {
		if !e.next.After(now) {
			due = append(due, e)
		}
	}
	l.mu.Unlock()
	for _, e := range due {
		started := l.start(e.Schedule)
		l.mu.Lock()
		if started {
			e.runs++
		} else {
			e.skipped++
		}
		e.next = nextRun(e.Schedule, e.next, now)
		l.mu.Unlock()
	}
}

// nextRuns maps each scheduled name to its next run (RFC 3339), the earliest if it has several.
func (l *scheduleLoop) nextRuns() map[string]string {
	l.mu.Lock()
	defer l.mu.Unlock()
	next := make(map[string]time.Time, len(l.entries))
	for _, e := range l.entries {
		if t, ok := next[e.Task]; !ok || e.next.Before(t) {
			next[e.Task] = e.next
		}
	}
	out := make(map[string]string, len(next))
	for n, t := range next {
		out[n] = t.Format(time.RFC3339)
	}
	return out
}

// docs describes every schedule.
func (l *scheduleLoop) docs() []scheduleDoc {
	l.mu.Lock()
	defer l.mu.Unlock()
	out := make([]scheduleDoc, 0, len(l.entries))
	for _, e := range l.entries {
		d := scheduleDoc{Task: e.Task, At: e.At, NextRun: e.next.Format(time.RFC3339), Runs: e.runs, Skipped: e.skipped, Rate: e.Rate}
		if e.Every > 0 {
			d.Every = e.Every.String()
		}
		out = append(out, d)
	}
	return out
}
