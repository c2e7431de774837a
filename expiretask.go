// SPDX-License-Identifier: Apache-2.0

package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// Expiry runs (docs/design.md §11) as tasks: the expire command, POST /expire, the expire CLI and
// the expire_dir spool all store the list as a file (under <state_dir>/lists when the
// journal is on, so that the run resumes after a crash), then start a task of kind expire
// whose source (expireSource) reads the file, propagates each line (expire.go) and yields
// one item per metatile: re-render it (forced) or, at zooms ≥ delete_from, delete it.

// maxExpireBody bounds an expiry list sent over HTTP (and so by the CLI), and any list the
// daemon reads (a spooled one included).
const maxExpireBody = 1 << 30

// expireLines is an expiry run's reading so far: lines read, bad lines, the first bad ones.
// Items carry a fresh copy, never shared with the source goroutine.
type expireLines struct {
	read, bad int64
	errors    []expireLineError
}

// expireTaskSpec is an expire task's taskSpec.Inline: what the journal keeps to resume it.
type expireTaskSpec struct {
	Cache      string `json:"cache_identifier"`
	List       string `json:"list"` // the stored list file
	MinZoom    int    `json:"min_zoom"`
	MaxZoom    int    `json:"max_zoom"`
	DeleteFrom int    `json:"delete_from"`
	RenderAll  bool   `json:"render_all,omitempty"` // also metatiles that were never cached
	From       string `json:"from,omitempty"`       // where the list came from (spool file name)
	// Spool is the spool file's path when the list came from expire_dir: a task that fails
	// puts the list back there as <file>.rejected (spool.go).
	Spool string `json:"spool,omitempty"`
}

// expireCursor is an expire task's resume point: every metatile of lines 1..Lines was
// yielded (the task journals it once they are all done, see checkpoint in tasks.go).
type expireCursor struct {
	Lines int64 `json:"lines"`
}

// listStore keeps expiry lists as files until their task ends.
type listStore struct {
	dir      string
	volatile bool // a temporary directory, removed at exit (no journal): nothing resumes
	n        atomic.Uint64
}

// create returns a new list file open for writing and its final path; finish makes it
// durable (fsync, rename, fsync the directory) before the task that reads it is journaled.
func (ls *listStore) create() (*os.File, string, error) {
	if err := os.MkdirAll(ls.dir, 0o750); err != nil {
		return nil, "", err
	}
	_, path, _ := ls.createName()
	f, err := os.OpenFile(path+".tmp", os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o640)
	return f, path, err
}

func (ls *listStore) finish(f *os.File, path string) error {
	err := f.Sync()
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(f.Name(), path)
	}
	if err == nil {
		err = syncDir(ls.dir)
	}
	if err != nil {
		os.Remove(f.Name())
	}
	return err
}

// store writes data as a new list file.
func (ls *listStore) store(data io.Reader) (string, error) {
	f, path, err := ls.create()
	if err != nil {
		return "", err
	}
	if _, err := io.Copy(f, data); err != nil {
		f.Close()
		os.Remove(f.Name())
		return "", err
	}
	return path, ls.finish(f, path)
}

// handleExpire answers the expire command: the list is stored, then a task started.
func (m *taskManager) handleExpire(req Request) Reply {
	var list io.Reader = strings.NewReader(string(req.Lines))
	if len(req.Tiles) > 0 {
		var b strings.Builder
		b.Write(req.Lines)
		if len(req.Lines) > 0 && req.Lines[len(req.Lines)-1] != '\n' {
			b.WriteByte('\n')
		}
		for _, t := range req.Tiles { // [x, y, z] in the XYZ scheme
			b.WriteString(formatExpireLine(t))
			b.WriteByte('\n')
		}
		list = strings.NewReader(b.String())
	}
	rng := req.Range
	rng.RenderAll = !m.onlyCached(req.ExpireOnlyCached)
	d, err := m.startExpire(req.CacheIdentifier, rng, req.Priority, req.PrioritySet, req.Rate, list, "")
	if err != nil {
		return errorReply(req.ID, err.Error())
	}
	return Reply{ID: req.ID, Status: statusQueued, Task: mustJSON(d)}
}

// onlyCached is whether an expiry run re-renders only cached metatiles: what the run asked
// for (only_cached), else renderd.yaml's expire_only_cached (default true).
func (m *taskManager) onlyCached(asked *bool) bool {
	if asked != nil {
		return *asked
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.cfg.ExpireOnlyCached == nil || *m.cfg.ExpireOnlyCached
}

// startExpire checks that the cache takes expiry lists, stores the list and starts its task.
func (m *taskManager) startExpire(cache string, rng expireRange, priority int, prioritySet bool, rate float64, list io.Reader, from string) (taskDoc, error) {
	if err := rng.validate(); err != nil {
		return taskDoc{}, err
	}
	if _, err := m.sched.expireGrid(cache); err != nil {
		return taskDoc{}, err
	}
	path, err := m.lists.store(list)
	if err != nil {
		return taskDoc{}, fmt.Errorf("storing the expiry list: %w", err)
	}
	return m.startExpireFile(cache, rng, priority, prioritySet, rate, path, from)
}

// startExpireFile starts the expire task of a stored list file (the task owns it from now on).
// from is the spool file's path for a list taken from expire_dir: when the task cannot
// start, the caller puts the list back; otherwise the stored file is removed.
func (m *taskManager) startExpireFile(cache string, rng expireRange, priority int, prioritySet bool, rate float64, path, from string) (taskDoc, error) {
	es := expireTaskSpec{Cache: cache, List: path, MinZoom: rng.MinZoom, MaxZoom: rng.MaxZoom, DeleteFrom: rng.DeleteFrom, RenderAll: rng.RenderAll}
	if from != "" {
		es.From, es.Spool = filepath.Base(from), from
	}
	inline, _ := json.Marshal(es)
	m.mu.Lock()
	spec := taskSpec{Kind: "expire", Name: "expire:" + cache, Inline: inline, priority: m.cfg.SeedPriority, rate: rate}
	m.mu.Unlock()
	if prioritySet {
		spec.priority = priority
	}
	d, err := m.startTask(spec)
	if err != nil && from == "" {
		os.Remove(path)
	}
	return d, err
}

// openExpireSource is the source of an expire task (startTask calls it).
func (m *taskManager) openExpireSource(spec taskSpec) (taskSource, error) {
	var es expireTaskSpec
	if err := json.Unmarshal(spec.Inline, &es); err != nil {
		return nil, fmt.Errorf("expire task spec: %w", err)
	}
	grid, err := m.sched.expireGrid(es.Cache)
	if err != nil {
		return nil, err
	}
	var cur expireCursor
	if len(spec.Cursor) > 0 {
		if err := json.Unmarshal(spec.Cursor, &cur); err != nil {
			return nil, fmt.Errorf("expire task cursor: %w", err)
		}
	}
	f, st, err := openRegular(es.List, maxExpireBody)
	if err != nil {
		return nil, fmt.Errorf("expiry list: %w", err)
	}
	s := &expireSource{f: f, size: st.Size(), cache: es.Cache, resume: cur.Lines,
		e:  newExpander(expireRange{MinZoom: es.MinZoom, MaxZoom: es.MaxZoom, DeleteFrom: es.DeleteFrom, RenderAll: es.RenderAll}, grid),
		ch: make(chan taskItem), quit: make(chan struct{}), done: make(chan struct{})}
	go s.run()
	return s, nil
}

// expireSource reads a stored expiry list and yields its metatiles, with back-pressure:
// its goroutine blocks until the task takes an item. Memory is the expander's seen-set.
type expireSource struct {
	f      *os.File
	size   int64
	read   atomic.Int64 // bytes read, for progress
	cache  string
	resume int64 // lines 1..resume were done before a restart: rebuild the seen-set only
	e      *expander

	ch        chan taskItem
	quit      chan struct{} // closed by close
	done      chan struct{} // closed when run returns
	errv      error         // written before ch is closed
	closeOnce sync.Once
}

func (s *expireSource) items() <-chan taskItem { return s.ch }
func (s *expireSource) err() error             { return s.errv }

func (s *expireSource) close() {
	s.closeOnce.Do(func() { close(s.quit) })
	<-s.done
}

type countingReader struct {
	r io.Reader
	n *atomic.Int64
}

func (c countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n.Add(int64(n))
	return n, err
}

// cursorEvery is how many lines pass between two cursor items.
const cursorEvery = 1000

func (s *expireSource) run() {
	defer close(s.done)
	defer close(s.ch)
	defer s.f.Close()
	r := newExpireReader(countingReader{s.f, &s.read})
	buf := make([]metaOp, 0, 256)
	// Resuming: lines 1..resume were yielded and done before; propagate them again without
	// yielding, so that the seen-set (dedup) is what it was.
	var pending *tileCoord
	for r.lines < s.resume {
		t, err := r.next()
		if err != nil {
			if err != io.EOF {
				s.errv = err
			}
			break
		}
		if r.lines > s.resume {
			pending = &t
			break
		}
		buf = s.e.start(t, buf[:0])
		for more := true; more; {
			buf, more = s.e.more(buf[:0], 1<<16)
		}
	}
	lastCursor := s.resume
	for {
		var t tileCoord
		if pending != nil {
			t, pending = *pending, nil
		} else {
			var err error
			t, err = r.next()
			if err == io.EOF {
				break
			}
			if err != nil {
				s.errv = fmt.Errorf("reading the expiry list: %w", err)
				return
			}
		}
		// Every metatile of the lines before this one has been yielded: say so now and then.
		if line := r.lines - 1; line-lastCursor >= cursorEvery {
			if !s.send(s.cursorItem(r, line)) {
				return
			}
			lastCursor = line
		}
		buf = s.e.start(t, buf[:0])
		for more := true; ; {
			for _, op := range buf {
				if !s.send(taskItem{cache: s.cache, tile: op.tile, hasTile: true, progress: -1, force: !op.delete, delete: op.delete,
					onlyCached: !op.delete && !s.e.rng.RenderAll}) {
					return
				}
			}
			if !more {
				break
			}
			buf, more = s.e.more(buf[:0], 256)
		}
	}
	s.send(s.cursorItem(r, r.lines))
}

func (s *expireSource) cursorItem(r *expireReader, line int64) taskItem {
	cur, _ := json.Marshal(expireCursor{Lines: line})
	progress := 1.0
	if s.size > 0 {
		progress = min(float64(s.read.Load())/float64(s.size), 1)
	}
	return taskItem{progress: progress, cursor: cur,
		lines: &expireLines{read: r.lines, bad: r.bad, errors: slices.Clone(r.errors)}}
}

func (s *expireSource) send(it taskItem) bool {
	select {
	case s.ch <- it:
		return true
	case <-s.quit:
		return false
	}
}

// serveExpire is POST /expire?cache=ID[&min_zoom=Z][&max_zoom=Z][&delete_from=Z][&priority=P]
// [&rate=R][&only_cached=true|false] with the list as the body.
func (s *server) serveExpire(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	cache := q.Get("cache")
	if err := validateCacheIdentifier(cache); err != nil {
		writeJSON(w, http.StatusBadRequest, errorReply(nil, "cache: "+err.Error()))
		return
	}
	rng := expireRange{MinZoom: 0, MaxZoom: -1, DeleteFrom: -1}
	priority, prioritySet := 0, false
	for _, p := range []struct {
		name string
		dst  *int
	}{{"min_zoom", &rng.MinZoom}, {"max_zoom", &rng.MaxZoom}, {"delete_from", &rng.DeleteFrom}, {"priority", &priority}} {
		v := q.Get(p.name)
		if v == "" {
			continue
		}
		n, err := strconv.Atoi(v)
		if err != nil || n < 0 {
			writeJSON(w, http.StatusBadRequest, errorReply(nil, p.name+": want a non-negative integer, got "+strconv.Quote(truncate(v, 32))))
			return
		}
		*p.dst = n
		prioritySet = prioritySet || p.name == "priority"
	}
	if prioritySet && priority > maxPriority {
		writeJSON(w, http.StatusBadRequest, errorReply(nil, fmt.Sprintf("priority: want 0..%d, got %d", maxPriority, priority)))
		return
	}
	rate := 0.0
	if v := q.Get("rate"); v != "" {
		r, err := strconv.ParseFloat(v, 64)
		if err == nil {
			err = checkRate(r, false)
		}
		if err != nil {
			writeJSON(w, http.StatusBadRequest, errorReply(nil, "rate: want a positive number of metatiles per second, got "+strconv.Quote(truncate(v, 32))))
			return
		}
		rate = r
	}
	var asked *bool
	if v := q.Get("only_cached"); v != "" {
		b, err := strconv.ParseBool(v)
		if err != nil {
			writeJSON(w, http.StatusBadRequest, errorReply(nil, "only_cached: want true or false, got "+strconv.Quote(truncate(v, 32))))
			return
		}
		asked = &b
	}
	rng.RenderAll = !s.tasks.onlyCached(asked)
	d, err := s.tasks.startExpire(cache, rng, priority, prioritySet, rate, s.clientBody(w, r, maxExpireBody), "")
	if err != nil {
		writeJSON(w, http.StatusBadRequest, errorReply(nil, err.Error()))
		return
	}
	writeJSON(w, http.StatusCreated, Reply{Status: statusQueued, Task: mustJSON(d)})
}

// runExpireClient is `mapproxy-renderd expire --cache ID [--min-zoom Z] [--max-zoom Z]
// [--delete-from Z] [--priority P] [--rate R] [--only-cached=false] [--wait] [FILE] < list`: it POSTs the list to /expire
// (over the daemon's Unix socket or TCP address) and prints the task document.
func runExpireClient(ctx context.Context, args []string, stdin io.Reader, stdout, stderr io.Writer) error {
	var cl clientFlags
	fs := newFlagSet("expire", stderr)
	cl.register(fs, stderr)
	cache := fs.String("cache", "", "cache identifier (<cache>_<grid>) the list is for (required)")
	minZoom := fs.Int("min-zoom", 0, "mark ancestors down to this zoom")
	maxZoom := fs.Int("max-zoom", -1, "mark descendants up to this zoom (default: each line's own zoom)")
	deleteFrom := fs.Int("delete-from", -1, "delete metatiles at this zoom and above instead of re-rendering (default: never)")
	priority := fs.Int("priority", -1, "priority of the task's jobs (default: the daemon's seed_priority)")
	rate := fs.Float64("rate", 0, "metatiles per second at most (default: unlimited)")
	wait := fs.Bool("wait", false, "wait until the task ends, showing progress")
	onlyCached := fs.Bool("only-cached", true, "re-render only metatiles with a tile in the cache; --only-cached=false renders all (default: the daemon's expire_only_cached)")
	pos, err := parseArgs(fs, args)
	if err != nil {
		return err
	}
	onlyCachedSet := false
	fs.Visit(func(f *flag.Flag) { onlyCachedSet = onlyCachedSet || f.Name == "only-cached" })
	if *cache == "" {
		return errors.New("expire needs --cache ID")
	}
	if len(pos) > 1 {
		return errors.New("expire takes at most one FILE (default: standard input)")
	}
	body := stdin
	if len(pos) == 1 {
		f, err := os.Open(pos[0])
		if err != nil {
			return err
		}
		defer f.Close()
		body = f
	}
	target, err := cl.target()
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, cl.timeout)
	defer cancel()
	q := url.Values{"cache": {*cache}, "min_zoom": {strconv.Itoa(*minZoom)}}
	if *maxZoom >= 0 {
		q.Set("max_zoom", strconv.Itoa(*maxZoom))
	}
	if *deleteFrom >= 0 {
		q.Set("delete_from", strconv.Itoa(*deleteFrom))
	}
	if *priority >= 0 {
		q.Set("priority", strconv.Itoa(*priority))
	}
	if *rate != 0 {
		q.Set("rate", strconv.FormatFloat(*rate, 'g', -1, 64))
	}
	if onlyCachedSet {
		q.Set("only_cached", strconv.FormatBool(*onlyCached))
	}
	base, hc := target.url, http.DefaultClient
	if base == "" {
		base = "http://mapproxy-renderd"
		hc = &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, target.network, target.addr)
		}}}
		defer hc.CloseIdleConnections()
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, base+"/expire?"+q.Encode(), bufio.NewReaderSize(body, 64<<10))
	if err != nil {
		return err
	}
	resp, err := hc.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return err
	}
	var rep Reply
	if err := json.Unmarshal(raw, &rep); err != nil {
		return fmt.Errorf("invalid reply (HTTP %d): %s", resp.StatusCode, strings.TrimSpace(string(raw)))
	}
	if rep.Status != statusQueued || !*wait {
		stdout.Write(raw)
		return exitStatus(rep)
	}
	var d taskDoc
	_ = json.Unmarshal(rep.Task, &d)
	call := func(line []byte) (Reply, []byte, error) { return target.call(ctx, "task", line) }
	d, err = waitTask(ctx, call, d.TaskID, stdout)
	if err != nil {
		return err
	}
	if d.State != taskStateDone {
		return exitCode(1)
	}
	return nil
}

// spoolPoll is how often expire_dir is looked at.
const spoolPoll = time.Second

// runSpool ingests expire_dir until ctx ends: every regular file in a subdirectory named
// after a cache identifier (<expire_dir>/<cache_identifier>/<file>) is an expiry list for
// that cache. Writers must create the file under a name starting with "." or ending in
// ".tmp" and rename it when complete: the daemon ignores those names, so it never reads a
// half-written list. A file is taken by renaming it into the list store (a copy when that
// is on another file system), then its task starts; a file for a cache that does not take
// expiry lists is renamed to <file>.rejected and the reason logged. A list is removed only
// when its task ends done or cancelled (spool.go): when the task cannot start it is put
// back, and when the task fails it comes back as <file>.rejected, each with a warning.
func (m *taskManager) runSpool(ctx context.Context, dir string, opts expireRange, priority int, prioritySet bool) {
	tick := time.NewTicker(spoolPoll)
	defer tick.Stop()
	warned := spoolWarnings{}
	for {
		m.spoolOnce(ctx, dir, opts, priority, prioritySet, warned)
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
	}
}

func (m *taskManager) spoolOnce(ctx context.Context, dir string, rng expireRange, priority int, prioritySet bool, warned spoolWarnings) {
	caches, err := os.ReadDir(dir)
	if err != nil {
		m.log.Warn("expire_dir: cannot read it", "dir", dir, "error", err)
		return
	}
	for _, c := range caches {
		if !c.IsDir() || validateCacheIdentifier(c.Name()) != nil {
			continue
		}
		files, err := os.ReadDir(filepath.Join(dir, c.Name()))
		if err != nil {
			continue
		}
		for _, f := range files {
			name := f.Name()
			if !f.Type().IsRegular() || strings.HasPrefix(name, ".") || strings.HasSuffix(name, ".tmp") || strings.HasSuffix(name, ".rejected") {
				continue
			}
			if ctx.Err() != nil { // stopping: the rest stay in the spool for the next start
				return
			}
			m.takeSpoolFile(ctx, filepath.Join(dir, c.Name(), name), c.Name(), rng, priority, prioritySet, warned)
		}
	}
}

func (m *taskManager) takeSpoolFile(ctx context.Context, path, cache string, rng expireRange, priority int, prioritySet bool, warned spoolWarnings) {
	log := m.log.With("file", path, "cache", cache)
	if m.journal != nil {
		if err := m.journal.failure(); err != nil { // its task could not start: leave it
			warned.warn(log, path, "expire_dir: task not started; the list stays in the spool and is tried again", err)
			return
		}
	}
	if _, err := m.sched.expireGrid(cache); err != nil {
		if ctx.Err() != nil { // the daemon is stopping: not a reason to reject the list
			return
		}
		warned.warn(log, path, "expire_dir: list rejected", err)
		if rerr := os.Rename(path, path+".rejected"); rerr != nil {
			warned.warn(log, path+".rejected", "expire_dir: cannot rename the rejected list; it stays in the spool", rerr)
		}
		return
	}
	if err := os.MkdirAll(m.lists.dir, 0o750); err != nil {
		warned.warn(log, path, "expire_dir: cannot store the list; it stays in the spool", err)
		return
	}
	_, dst, err := m.lists.createName()
	if err != nil {
		warned.warn(log, path, "expire_dir: cannot store the list; it stays in the spool", err)
		return
	}
	copied := false
	if err := os.Rename(path, dst); err != nil {
		if !errors.Is(err, unix.EXDEV) {
			warned.warn(log, path, "expire_dir: cannot take the list; it stays in the spool", err)
			return
		}
		// Another file system: copy durably; the spool file goes once its task has started.
		src, _, err := openRegular(path, maxExpireBody)
		if err != nil {
			warned.warn(log, path, "expire_dir: cannot read the list; it stays in the spool", err)
			return
		}
		stored, err := m.lists.store(src)
		src.Close()
		if err != nil {
			warned.warn(log, path, "expire_dir: cannot store the list; it stays in the spool", err)
			return
		}
		dst, copied = stored, true
	} else if err := syncDir(m.lists.dir); err != nil {
		log.Warn("expire_dir: fsync of the list directory failed", "error", err)
	}
	d, err := m.startExpireFile(cache, rng, priority, prioritySet, 0, dst, path)
	if err != nil {
		m.putBackList(log, dst, path, copied, err, warned)
		return
	}
	if copied {
		if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
			log.Error("expire_dir: the list was taken but cannot be removed from the spool; it will be taken again", "error", err)
		}
	}
	delete(warned, path)
	log.Info("expire_dir: list taken", "task", d.TaskID)
}

// createName returns a fresh list path (nothing is created).
func (ls *listStore) createName() (string, string, error) {
	name := fmt.Sprintf("expire-%d-%d.list", time.Now().UnixNano(), ls.n.Add(1))
	return name, filepath.Join(ls.dir, name), nil
}
