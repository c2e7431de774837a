// SPDX-License-Identifier: Apache-2.0

package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"sync"
	"syscall"
	"time"
)

// taskItem is one thing a task's source yields: a metatile to render (hasTile), and/or
// progress, a resume cursor, a cleanup's running count of removed tiles.
type taskItem struct {
	cache         string
	tile          tileCoord
	hasTile       bool
	progress      float64 // fraction of the walk done; < 0 when the item does not say
	refreshBefore float64 // unix seconds; < 0 = none (the cache's own rules). 0 is a value: MapProxy uses it for caches without timestamps
	removed       uint64  // cumulative tiles removed (cleanup); valid when hasRemoved
	hasRemoved    bool
	cursor        json.RawMessage // where to resume from; nil when the item has none
	resolved      json.RawMessage // the planner's resolved spec (taskSpec.Resolved); nil when none
	// Expiry runs (expiretask.go): force re-renders a metatile however fresh; delete removes
	// its tiles instead; lines, when set, is the list's reading so far.
	// onlyCached renders the metatile only when one of its tiles is in the cache.
	force      bool
	delete     bool
	onlyCached bool
	lines      *expireLines
}

// taskSource yields a task's items in order, with back-pressure: it produces the next item
// only when the task reads it. items is closed at the end; then err says why (nil: the
// source completed). close stops the source early and waits for its goroutines; it is
// idempotent and may be called after the end.
type taskSource interface {
	items() <-chan taskItem
	err() error
	close()
}

// plannerTail is how many of a planner's last stderr lines a failure message carries.
const plannerTail = 8

// plannerSource is a planner subprocess (the bundled worker's plan mode, or
// planner_command): the spec goes to its stdin as one JSON line, items come from its
// stdout as NDJSON (docs/design.md §10). The daemon stops reading while the task's window is
// full, so a planner simply blocks on the full pipe: bounded memory for any task size.
type plannerSource struct {
	c    *child   // the process and its group (proc.go)
	out  *os.File // our end of its stdout; the reader goroutine closes it
	ch   chan taskItem
	quit chan struct{} // closed by close: the reader stops sending
	done chan struct{} // closed when the reader goroutine has returned
	tail *stderrTail
	log  *slog.Logger

	errv      error // written before ch is closed
	closeOnce sync.Once
}

// startPlanner starts a planner for spec, in its own process group (proc.go).
func startPlanner(argv, env []string, spec taskSpec, log *slog.Logger) (*plannerSource, error) {
	if len(argv) == 0 {
		return nil, errors.New("no planner command")
	}
	line, err := json.Marshal(spec)
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Env = append(os.Environ(), env...)
	cmd.Stdin = bytes.NewReader(append(line, '\n'))
	tail := newStderrTail(log, "planner: ", plannerTail, 500)
	cmd.Stderr = tail
	// Our own pipe, not StdoutPipe: the child's waiter may finish before the last line is
	// read, and Wait closes a StdoutPipe under the reader.
	out, outW, err := os.Pipe()
	if err != nil {
		return nil, err
	}
	cmd.Stdout = outW
	c, err := startChild(cmd, log)
	outW.Close()
	if err != nil {
		out.Close()
		return nil, fmt.Errorf("start planner %s: %w", argv[0], err)
	}
	p := &plannerSource{c: c, out: out, ch: make(chan taskItem), quit: make(chan struct{}), done: make(chan struct{}),
		tail: tail, log: log.With("planner_pid", c.pid)}
	c.log = p.log
	go p.read(out)
	return p, nil
}

func (p *plannerSource) items() <-chan taskItem { return p.ch }

// err is valid after items is closed.
func (p *plannerSource) err() error { return p.errv }

// close stops the planner (SIGTERM to its group, SIGKILL after killGrace) unless it has
// ended, and waits for the reader.
func (p *plannerSource) close() {
	p.closeOnce.Do(func() { close(p.quit) })
	p.c.stop("planner")
	t := time.NewTimer(killGrace)
	defer t.Stop()
	select {
	case <-p.done:
	case <-t.C: // something outside its group holds its stdout: stop reading
		p.out.Close()
		<-p.done
	}
}

// plannerLine is every field a planner line may carry (TASKS protocol, docs/design.md §10).
type plannerLine struct {
	Tasks []struct {
		CacheIdentifier string `json:"cache_identifier"`
	} `json:"tasks"`
	CacheIdentifier string          `json:"cache_identifier"`
	Tile            []int64         `json:"tile"`
	Progress        *float64        `json:"progress"`
	RefreshBefore   *float64        `json:"refresh_before"`
	Cursor          json.RawMessage `json:"cursor"`
	Resolved        json.RawMessage `json:"resolved"`
	Removed         *uint64         `json:"removed"`
	Done            bool            `json:"done"`
	Error           *string         `json:"error"`
}

// read is the reader goroutine: it turns stdout lines into items until the end, then
// waits for the process (bounded) and closes ch with errv set.
func (p *plannerSource) read(out io.Reader) {
	defer close(p.done)
	err := p.readItems(bufio.NewReaderSize(out, 64<<10))
	p.out.Close()
	stopped := false
	select {
	case <-p.quit:
		stopped = true
	default:
	}
	if err != nil && !stopped {
		// A protocol error: the planner may still be running; it must not outlive its task.
		p.c.signal(syscall.SIGTERM)
	}
	waitErr := p.wait()
	switch {
	case stopped:
		err = errors.New("stopped")
	case err == nil && waitErr != nil:
		err = fmt.Errorf("planner %s", exitText(waitErr))
	case err != nil && waitErr != nil:
		err = fmt.Errorf("planner %s (%w)", exitText(waitErr), err)
	}
	if err != nil && !stopped {
		if t := p.tail.String(); t != "" {
			err = fmt.Errorf("%w; its last stderr lines: %s", err, t)
		}
	}
	p.errv = err
	close(p.ch)
}

// wait waits for the process, killing its group if it has not exited within killGrace.
func (p *plannerSource) wait() error {
	if !p.c.waitFor(killGrace) {
		p.log.Warn("planner did not exit after its output ended; killing it")
		p.c.signal(syscall.SIGKILL)
		<-p.c.exited // bounded: SIGKILL, then WaitDelay for the pipes
	}
	return p.c.waitErr
}

// readItems reads lines until the done line (nil), an error line, EOF or a protocol error.
func (p *plannerSource) readItems(br *bufio.Reader) error {
	for {
		raw, err := readLimitedLine(br, maxRendererLine)
		if err != nil {
			if errors.Is(err, io.EOF) && len(raw) == 0 {
				return errors.New("planner ended without its done line")
			}
			if errors.Is(err, errLineTooLong) {
				return errors.New("planner wrote a line longer than 1 MiB")
			}
			if !errors.Is(err, io.EOF) {
				return fmt.Errorf("reading the planner: %w", err)
			}
		}
		if len(bytes.TrimSpace(raw)) == 0 {
			continue
		}
		var l plannerLine
		if jerr := json.Unmarshal(raw, &l); jerr != nil {
			return fmt.Errorf("planner wrote an invalid line: %s", truncate(string(raw), 200))
		}
		if l.Error != nil {
			return errors.New(*l.Error)
		}
		it := taskItem{progress: -1, cursor: l.Cursor, refreshBefore: -1, resolved: l.Resolved}
		if l.RefreshBefore != nil {
			it.refreshBefore = *l.RefreshBefore
		}
		if l.Progress != nil {
			it.progress = *l.Progress
		}
		if l.Removed != nil {
			it.removed, it.hasRemoved = *l.Removed, true
		}
		if l.Tile != nil {
			t, terr := plannerTile(l.Tile)
			if terr != nil || validateCacheIdentifier(l.CacheIdentifier) != nil {
				return fmt.Errorf("planner wrote an invalid metatile: %s", truncate(string(raw), 200))
			}
			it.tile, it.hasTile, it.cache = t, true, l.CacheIdentifier
		}
		if l.Done || it.hasTile || it.hasRemoved || it.cursor != nil || it.resolved != nil || it.progress >= 0 {
			select {
			case p.ch <- it:
			case <-p.quit:
				return nil
			}
		}
		if l.Done {
			return nil
		}
		if err != nil { // io.EOF after a last line without a newline
			return errors.New("planner ended without its done line")
		}
	}
}

func plannerTile(v []int64) (tileCoord, error) {
	if len(v) != 3 {
		return tileCoord{}, errors.New("want [x, y, z]")
	}
	for i, n := range v {
		if n < 0 || n > maxCoordinate || (i == 2 && n > maxZoom) {
			return tileCoord{}, errors.New("out of range")
		}
	}
	return tileCoord{int32(v[0]), int32(v[1]), int32(v[2])}, nil
}
