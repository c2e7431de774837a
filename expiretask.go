package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
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
	"syscall"
	"time"
)

// Expiry runs (DESIGN §11) as tasks: the expire command, POST /expire, the expire CLI and
// the expire_dir spool all store the list as a file (under <state_dir>/lists when the
// journal is on, so that the run resumes after a crash), then start a task of kind expire
// whose source (expireSource) reads the file, propagates each line (expire.go) and yields
// one item per metatile: re-render it (forced) or, at zooms ≥ delete_from, delete it.

// maxExpireBody bounds an expiry list sent over HTTP (and so by the CLI).
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
	From       string `json:"from,omitempty"` // where the list came from (spool file name)
}

// expireCursor is an expire task's resume point: every metatile of lines 1..Lines was
// yielded (the task journals it once they are all done, see checkpoint in tasks.go).
type expireCursor struct {
	Lines int64 `json:"lines"`
}

// listStore keeps expiry lists as files until their task ends.
type listStore struct {
	dir string
	n   atomic.Uint64
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
	d, err := m.startExpire(req.CacheIdentifier, req.Range, req.Priority, req.PrioritySet, req.Rate, list, "")
	if err != nil {
		return errorReply(req.ID, err.Error())
	}
	return Reply{ID: req.ID, Status: statusQueued, Task: mustJSON(d)}
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
func (m *taskManager) startExpireFile(cache string, rng expireRange, priority int, prioritySet bool, rate float64, path, from string) (taskDoc, error) {
	inline, _ := json.Marshal(expireTaskSpec{Cache: cache, List: path, MinZoom: rng.MinZoom, MaxZoom: rng.MaxZoom, DeleteFrom: rng.DeleteFrom, From: from})
	m.mu.Lock()
	spec := taskSpec{Kind: "expire", Name: "expire:" + cache, Inline: inline, priority: m.cfg.SeedPriority, rate: rate}
	m.mu.Unlock()
	if prioritySet {
		spec.priority = priority
	}
	d, err := m.startTask(spec)
	if err != nil {
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
	f, err := os.Open(es.List)
	if err != nil {
		return nil, fmt.Errorf("expiry list: %w", err)
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("expiry list: %w", err)
	}
	s := &expireSource{f: f, size: st.Size(), cache: es.Cache, resume: cur.Lines,
		e:  newExpander(expireRange{MinZoom: es.MinZoom, MaxZoom: es.MaxZoom, DeleteFrom: es.DeleteFrom}, grid),
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
				if !s.send(taskItem{cache: s.cache, tile: op.tile, hasTile: true, progress: -1, force: !op.delete, delete: op.delete}) {
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

// serveExpire is POST /expire?cache=ID[&min_zoom=Z][&max_zoom=Z][&delete_from=Z][&priority=P][&rate=R]
// with the list as the body.
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
	d, err := s.tasks.startExpire(cache, rng, priority, prioritySet, rate, http.MaxBytesReader(w, r.Body, maxExpireBody), "")
	if err != nil {
		writeJSON(w, http.StatusBadRequest, errorReply(nil, err.Error()))
		return
	}
	writeJSON(w, http.StatusCreated, Reply{Status: statusQueued, Task: mustJSON(d)})
}

// runExpireClient is `mapproxy-renderd expire --cache ID [--min-zoom Z] [--max-zoom Z]
// [--delete-from Z] [--priority P] [--rate R] [--wait] [FILE] < list`: it POSTs the list to /expire
// (over the daemon's Unix socket or TCP address) and prints the task document.
func runExpireClient(ctx context.Context, args []string, stdin io.Reader, stdout, stderr io.Writer) error {
	var cl clientFlags
	fs := newFlagSet("expire", stderr)
	cl.register(fs, true)
	cache := fs.String("cache", "", "cache identifier (<cache>_<grid>) the list is for (required)")
	minZoom := fs.Int("min-zoom", 0, "mark ancestors down to this zoom")
	maxZoom := fs.Int("max-zoom", -1, "mark descendants up to this zoom (default: each line's own zoom)")
	deleteFrom := fs.Int("delete-from", -1, "delete metatiles at this zoom and above instead of re-rendering (default: never)")
	priority := fs.Int("priority", -1, "priority of the task's jobs (default: the daemon's seed_priority)")
	rate := fs.Float64("rate", 0, "metatiles per second at most (default: unlimited)")
	wait := fs.Bool("wait", false, "wait until the task ends, showing progress")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *cache == "" {
		return errors.New("expire needs --cache ID")
	}
	if fs.NArg() > 1 {
		return errors.New("expire takes at most one FILE (default: standard input)")
	}
	body := stdin
	if fs.NArg() == 1 {
		f, err := os.Open(fs.Arg(0))
		if err != nil {
			return err
		}
		defer f.Close()
		body = f
	}
	network, addr, err := cl.address()
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
	hc := &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, network, addr)
	}}}
	defer hc.CloseIdleConnections()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, "http://mapproxy-renderd/expire?"+q.Encode(), bufio.NewReaderSize(body, 64<<10))
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
	call := func(line []byte) (Reply, []byte, error) { return exchange(ctx, network, addr, line) }
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
// expiry lists is renamed to <file>.rejected and the reason logged.
func (m *taskManager) runSpool(ctx context.Context, dir string, opts expireRange, priority int, prioritySet bool) {
	tick := time.NewTicker(spoolPoll)
	defer tick.Stop()
	for {
		m.spoolOnce(dir, opts, priority, prioritySet)
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
	}
}

func (m *taskManager) spoolOnce(dir string, rng expireRange, priority int, prioritySet bool) {
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
			m.takeSpoolFile(filepath.Join(dir, c.Name(), name), c.Name(), rng, priority, prioritySet)
		}
	}
}

func (m *taskManager) takeSpoolFile(path, cache string, rng expireRange, priority int, prioritySet bool) {
	log := m.log.With("file", path, "cache", cache)
	if _, err := m.sched.expireGrid(cache); err != nil {
		log.Error("expire_dir: list rejected", "error", err)
		os.Rename(path, path+".rejected")
		return
	}
	if err := os.MkdirAll(m.lists.dir, 0o750); err != nil {
		log.Error("expire_dir: cannot store the list", "error", err)
		return
	}
	_, dst, err := m.lists.createName()
	if err != nil {
		log.Error("expire_dir: cannot store the list", "error", err)
		return
	}
	if err := os.Rename(path, dst); err != nil {
		if !errors.Is(err, syscall.EXDEV) {
			log.Error("expire_dir: cannot take the list", "error", err)
			return
		}
		// Another file system: copy durably, then remove the spool file.
		src, err := os.Open(path)
		if err != nil {
			log.Error("expire_dir: cannot take the list", "error", err)
			return
		}
		stored, err := m.lists.store(src)
		src.Close()
		if err != nil {
			log.Error("expire_dir: cannot store the list", "error", err)
			return
		}
		os.Remove(path)
		dst = stored
	} else if err := syncDir(m.lists.dir); err != nil {
		log.Warn("expire_dir: fsync of the list directory failed", "error", err)
	}
	d, err := m.startExpireFile(cache, rng, priority, prioritySet, 0, dst, filepath.Base(path))
	if err != nil {
		log.Error("expire_dir: task not started", "error", err)
		return
	}
	log.Info("expire_dir: list taken", "task", d.TaskID)
}

// createName returns a fresh list path (nothing is created).
func (ls *listStore) createName() (string, string, error) {
	name := fmt.Sprintf("expire-%d-%d.list", time.Now().UnixNano(), ls.n.Add(1))
	return name, filepath.Join(ls.dir, name), nil
}

// forget removes a finished expire task's list file.
func (ls *listStore) forget(spec taskSpec) {
	if spec.Kind != "expire" {
		return
	}
	var es expireTaskSpec
	if json.Unmarshal(spec.Inline, &es) == nil && es.List != "" && filepath.Dir(es.List) == ls.dir {
		os.Remove(es.List)
	}
}
