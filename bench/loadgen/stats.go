// SPDX-License-Identifier: Apache-2.0

package main

import (
	"bytes"
	"fmt"
	"io"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"time"
)

// recorder keeps, per request tag, when it was sent, when its final answer
// arrived and what the answer was. Send times are written by the sending
// goroutine and read by the reader goroutine, hence the atomics.
type recorder struct {
	base    time.Time
	sent    []atomic.Int64 // ns since base, 0 = not sent
	done    []atomic.Int64
	outcome []atomic.Uint32
}

func newRecorder(n int) *recorder {
	return &recorder{
		base:    time.Now(),
		sent:    make([]atomic.Int64, n),
		done:    make([]atomic.Int64, n),
		outcome: make([]atomic.Uint32, n),
	}
}

func (r *recorder) now() int64 { return int64(time.Since(r.base)) + 1 }

func (r *recorder) markSent(tag int) { r.sent[tag].Store(r.now()) }

// markDone records the first final answer for tag and reports whether it was
// the first (a second answer to one request is counted by the caller).
func (r *recorder) markDone(tag int, o outcome) bool {
	if tag < 0 || tag >= len(r.done) {
		return false
	}
	if !r.done[tag].CompareAndSwap(0, r.now()) {
		return false
	}
	r.outcome[tag].Store(uint32(o))
	return true
}

// latencies returns the send→answer times in ms of the tags in [from, to)
// that got an answer, optionally only those with outcome o (oNone = any).
func (r *recorder) latencies(from, to int, o outcome) []float64 {
	var l []float64
	for i := from; i < to; i++ {
		d, s := r.done[i].Load(), r.sent[i].Load()
		if d == 0 || s == 0 {
			continue
		}
		if o != oNone && outcome(r.outcome[i].Load()) != o {
			continue
		}
		l = append(l, float64(d-s)/1e6)
	}
	slices.Sort(l)
	return l
}

// counts returns how many of [from, to) got each outcome (oNone = no answer).
func (r *recorder) counts(from, to int) [nOutcomes]int {
	var c [nOutcomes]int
	for i := from; i < to; i++ {
		if r.done[i].Load() == 0 {
			c[oNone]++
			continue
		}
		c[r.outcome[i].Load()]++
	}
	return c
}

// pct returns the p-th percentile (nearest rank) of sorted values.
func pct(sorted []float64, p float64) float64 {
	if len(sorted) == 0 {
		return -1
	}
	i := int(p/100*float64(len(sorted))+0.5) - 1
	i = max(0, min(i, len(sorted)-1))
	return sorted[i]
}

func addLatency(m map[string]float64, prefix string, l []float64) {
	m[prefix+"p50_ms"] = round3(pct(l, 50))
	m[prefix+"p99_ms"] = round3(pct(l, 99))
	if len(l) > 0 {
		m[prefix+"min_ms"] = round3(l[0])
		m[prefix+"max_ms"] = round3(l[len(l)-1])
	}
}

func addCounts(m map[string]float64, prefix string, c [nOutcomes]int) {
	for o, n := range c {
		if n == 0 {
			continue
		}
		name := outcomeNames[o]
		if outcome(o) == oNone {
			name = "missing"
		}
		m[prefix+name] = float64(n)
	}
}

func round3(v float64) float64 {
	s := strconv.FormatFloat(v, 'g', 6, 64)
	f, _ := strconv.ParseFloat(s, 64)
	return f
}

// ---------------------------------------------------------------------------
// /proc readers.

const clockTick = 100 // USER_HZ on Linux

// cpuTime returns utime+stime of the processes, summed over their threads.
func cpuTime(pids []int) (time.Duration, error) {
	var total time.Duration
	for _, pid := range pids {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		if err != nil {
			return 0, err
		}
		i := bytes.LastIndexByte(b, ')')
		if i < 0 {
			return 0, fmt.Errorf("bad /proc/%d/stat", pid)
		}
		f := strings.Fields(string(b[i+1:]))
		if len(f) < 13 {
			return 0, fmt.Errorf("short /proc/%d/stat", pid)
		}
		ut, _ := strconv.ParseInt(f[11], 10, 64)
		st, _ := strconv.ParseInt(f[12], 10, 64)
		total += time.Duration(ut+st) * time.Second / clockTick
	}
	return total, nil
}

// rssBytes returns VmRSS of the processes, summed.
func rssBytes(pids []int) (int64, error) {
	var total int64
	for _, pid := range pids {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
		if err != nil {
			return 0, err
		}
		for _, line := range strings.Split(string(b), "\n") {
			if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
				kb, err := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 10, 64)
				if err != nil {
					return 0, err
				}
				total += kb * 1024
			}
		}
	}
	return total, nil
}

func parsePids(s string) ([]int, error) {
	var pids []int
	for _, f := range strings.FieldsFunc(s, func(r rune) bool { return r == ',' || r == ' ' }) {
		p, err := strconv.Atoi(f)
		if err != nil {
			return nil, fmt.Errorf("bad pid %q", f)
		}
		pids = append(pids, p)
	}
	return pids, nil
}

// ---------------------------------------------------------------------------
// renderCounter counts renders by counting lines that a renderer (ours),
// tirex-master (jobs.log) or PostgreSQL (slow-statement log, renderd) appends
// to a file, one per finished render.
type renderCounter struct {
	path  string
	match []byte // count only lines containing this; empty = every line
	off   int64
	carry []byte
	n     int
}

func newRenderCounter(path, match string) *renderCounter {
	if path == "" {
		return nil
	}
	return &renderCounter{path: path, match: []byte(match)}
}

// count returns the number of matching lines seen so far. A nil counter
// always returns -1.
func (c *renderCounter) count() int {
	if c == nil {
		return -1
	}
	f, err := os.Open(c.path)
	if err != nil {
		return c.n
	}
	defer f.Close()
	if _, err := f.Seek(c.off, io.SeekStart); err != nil {
		return c.n
	}
	data, _ := io.ReadAll(f)
	c.off += int64(len(data))
	data = append(c.carry, data...)
	for {
		i := bytes.IndexByte(data, '\n')
		if i < 0 {
			break
		}
		if len(c.match) == 0 || bytes.Contains(data[:i], c.match) {
			c.n++
		}
		data = data[i+1:]
	}
	c.carry = append([]byte(nil), data...)
	return c.n
}

// waitStable waits until the count is at least min and has not changed for
// quiet, or until the deadline; it returns the last count.
func (c *renderCounter) waitStable(atLeast int, quiet time.Duration, deadline time.Time) int {
	if c == nil {
		return -1
	}
	last, since := c.count(), time.Now()
	for time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
		n := c.count()
		if n != last {
			last, since = n, time.Now()
			continue
		}
		if n >= atLeast && time.Since(since) >= quiet {
			break
		}
	}
	return last
}
