// SPDX-License-Identifier: Apache-2.0

package main

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"strconv"
	"sync"
	"time"
)

const (
	// killGrace is how long a renderer gets between SIGTERM (or closed stdin) and SIGKILL.
	killGrace = 5 * time.Second
	// maxRendererLine bounds one line from a renderer; longer is garbage.
	maxRendererLine = 1 << 20
	// healthyRun is how long a process must live for its exit not to count toward backoff.
	healthyRun = 10 * time.Second
	minBackoff = 100 * time.Millisecond
	maxBackoff = 30 * time.Second
)

// rendererConfig is how renderers are started; it is fixed for a renderer's life.
type rendererConfig struct {
	argv         []string
	env          []string // added to the daemon's environment
	startTimeout time.Duration
	workerScript string // path of the bundled worker, when it was written out
}

// cacheReady is what a renderer's ready line says about one cache: its metatile size, and
// whether its grid is the XYZ web-mercator pyramid (docs/design.md §11: "xyz": "nw" | "sw").
type cacheReady struct {
	meta [2]int32
	xyz  xyzOrigin
}

// renderJob is what the scheduler sends to a renderer. job is an opaque token handed back
// in the result; the renderer reads only the copied fields.
type renderJob struct {
	job     *job
	seq     uint64
	cache   string
	tile    tileCoord
	timeout time.Duration
	recycle int
	seed    bool
	// refresh false: render only what is missing or stale (older than refreshBefore, unix
	// seconds, when that is not negative). Task jobs; every other job is a forced render.
	refresh       bool
	refreshBefore float64
	prio          renderPriority // the process's CPU and I/O priority for this job (nice.go)
	// delete: remove the metatile's tiles from the cache instead of rendering (command "delete")
	delete bool
	// onlyCached: render only when a tile of the metatile is in the cache ("only_cached")
	onlyCached bool
	// handedOver counts moves to a replacement process after one that never took the job.
	handedOver int
}

type eventKind uint8

const (
	evReady       eventKind = iota // a process is ready for jobs (caches listed, maybe)
	evLost                         // the idle process died; a replacement is starting
	evStartFailed                  // a process failed to start or to become ready
	evDone                         // a job finished (status, msg); healthy says whether the process lives on
	evExited                       // the renderer goroutine ends (retired)
	evRestart                      // a process ended and another is being started (reason)
)

// Why a renderer's process was replaced (evRestart's reason; the metric's reason label).
const (
	restartExited   = "exited"   // it exited or closed its output on its own
	restartTimeout  = "timeout"  // render_timeout passed; it was killed
	restartProtocol = "protocol" // it wrote garbage, an invalid reply, or wrote while idle
	restartRecycle  = "recycle"  // recycle_after jobs were done
	restartShutdown = "shutdown" // the stop deadline passed during a render; it was killed
)

// restartReasons lists every reason, in the order metrics and the status document show them.
var restartReasons = []string{restartExited, restartTimeout, restartProtocol, restartRecycle, restartShutdown}

// rendererEvent is what a renderer tells the scheduler.
type rendererEvent struct {
	r        *renderer
	kind     eventKind
	caches   map[string]cacheReady
	grids    map[string]*gridInfo // evReady: the ready line's grid details (prefetch.go)
	err      error
	job      *job
	status   string
	msg      string
	healthy  bool
	timedOut bool
	skipped  bool           // the renderer found every tile fresh (a job that was not forced)
	pid      int            // evReady: the process's pid
	reason   string         // evRestart: one of restartReasons
	prio     renderPriority // evDone: what the process runs at now
	overload overloadInfo   // evDone: what an error reply said about the upstream (ratelimit.go)
}

// renderer owns one render subprocess at a time and replaces it when it dies, with backoff.
// It gets jobs on jobs (capacity 1; the scheduler sends only when it knows the renderer is
// idle) and reports on events. Closing jobs retires it: it finishes a job it holds, asks the
// process to exit (closes stdin), and returns. Closing hardStop kills a running render.
type renderer struct {
	num      int
	cfg      rendererConfig
	jobs     chan renderJob
	events   chan<- rendererEvent
	hardStop <-chan struct{}
	log      *slog.Logger
}

func newRenderer(num int, cfg rendererConfig, events chan<- rendererEvent, hardStop <-chan struct{}, log *slog.Logger) *renderer {
	return &renderer{num: num, cfg: cfg, jobs: make(chan renderJob, 1), events: events, hardStop: hardStop,
		log: log.With("renderer", num)}
}

func (r *renderer) send(ev rendererEvent) {
	ev.r = r
	r.events <- ev
}

// run is the renderer goroutine. It returns after its jobs channel is closed and its
// process has exited (or was killed).
func (r *renderer) run() {
	defer r.send(rendererEvent{kind: evExited})
	backoff := time.Duration(0)
	var held *renderJob // a job that arrived while no process was up
	for {
		p, caches, err := startProcess(r.cfg, r.hardStop, r.log)
		if err != nil {
			r.log.Error("renderer failed to start", "error", err)
			r.send(rendererEvent{kind: evStartFailed, err: err})
			if held != nil {
				// The job came to a process that left without taking it, and no replacement
				// starts: its waiters get the reason instead of waiting for a renderer that
				// may never come back.
				r.send(rendererEvent{kind: evDone, job: held.job, status: statusError,
					msg: "renderer could not be restarted: " + err.Error()})
				held = nil
			}
			backoff = nextBackoff(backoff)
		} else {
			r.send(rendererEvent{kind: evReady, caches: caches, grids: p.grids, pid: p.pid})
			retired, proven, reason := r.serve(p, &held)
			if retired {
				return
			}
			r.send(rendererEvent{kind: evRestart, reason: reason})
			if proven || time.Since(p.started) >= healthyRun {
				backoff = 0
			} else {
				backoff = nextBackoff(backoff)
			}
		}
		if backoff > 0 {
			r.log.Info("restarting renderer after backoff", "backoff", backoff)
			if !r.wait(backoff, &held) {
				return
			}
		}
	}
}

func nextBackoff(b time.Duration) time.Duration {
	return min(max(2*b, minBackoff), maxBackoff)
}

// wait waits d before a restart. A job that arrives meanwhile is held for the next process.
// It returns false if the renderer was retired (and holds no job) or hard-stopped.
func (r *renderer) wait(d time.Duration, held **renderJob) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	for {
		var jobs <-chan renderJob
		if *held == nil {
			jobs = r.jobs
		}
		select {
		case <-t.C:
			return true
		case <-r.hardStop:
			if *held != nil {
				r.send(rendererEvent{kind: evDone, job: (*held).job, status: statusError, msg: "daemon is shutting down; the renderer was restarting"})
			}
			return false
		case j, ok := <-jobs:
			if !ok {
				return false
			}
			*held = &j
		}
	}
}

// serve hands jobs to a ready process until it dies, is recycled, or the renderer is retired.
// It reports whether the renderer was retired, whether the process proved that it works
// (it answered a job properly): then its replacement starts without backoff, as after a
// planned recycle, and otherwise why the process was replaced (one of restartReasons).
func (r *renderer) serve(p *rendererProcess, held **renderJob) (retired, proven bool, reason string) {
	done := 0
	defer func() { proven = done > 0 }()
	for {
		var j renderJob
		if *held != nil {
			j, *held = **held, nil
		} else {
			select {
			case jj, ok := <-r.jobs:
				if !ok {
					p.stop(r.log)
					return true, false, ""
				}
				j = jj
			case <-p.exited:
				r.log.Warn("renderer exited while idle", "pid", p.pid, "exit", p.exitText())
				p.kill(r.log)
				r.send(rendererEvent{kind: evLost})
				return false, false, restartExited
			case line, ok := <-p.lines:
				msg, why := "closed its output", restartExited
				if ok {
					msg, why = "wrote while idle: "+truncate(string(line), 200), restartProtocol
				}
				r.log.Warn("renderer misbehaved; replacing it", "pid", p.pid, "problem", msg)
				p.kill(r.log)
				r.send(rendererEvent{kind: evLost})
				return false, false, why
			}
		}
		// A process that died while idle, whose stdin is already gone, or that exited cleanly
		// without answering never saw the job: it goes to the replacement once instead of
		// failing for nothing it did.
		select {
		case <-p.exited:
			if j.handedOver == 0 {
				j.handedOver++
				*held = &j
				r.log.Warn("renderer exited before taking a job; the job goes to its replacement", "pid", p.pid, "exit", p.exitText())
				p.kill(r.log)
				return false, false, restartExited
			}
		default:
		}
		if j.prio != p.prio {
			var err error
			if p.prio, err = setPriority(p.pid, p.prio, j.prio); err != nil && !p.prioWarned {
				p.prioWarned = true
				r.log.Warn("cannot change the renderer's priority", "pid", p.pid, "nice", p.prio.nice,
					"want_nice", j.prio.nice, "ioprio_idle", p.prio.ioIdle, "error", err)
			}
		}
		status, msg, healthy, timedOut := p.render(j, r.hardStop)
		if p.notTaken && j.handedOver == 0 {
			j.handedOver++
			*held = &j
			r.log.Warn("renderer exited or closed its input without taking a job; the job goes to its replacement", "pid", p.pid)
			p.kill(r.log)
			return false, false, restartExited
		}
		if !healthy {
			reason = p.failure(timedOut, r.hardStop)
			p.kill(r.log)
		} else if done++; j.recycle > 0 && done >= j.recycle {
			r.log.Info("recycling renderer", "pid", p.pid, "jobs", done)
			p.stop(r.log)
			healthy, reason = false, restartRecycle
		}
		r.send(rendererEvent{kind: evDone, job: j.job, status: status, msg: msg, healthy: healthy, timedOut: timedOut, skipped: p.skipped, prio: p.prio, overload: p.overload})
		if !healthy {
			return false, false, reason
		}
	}
}

// rendererProcess is one running render subprocess and the goroutines that read its output.
type rendererProcess struct {
	c       *child // the process and its group (proc.go)
	pid     int
	started time.Time
	stdin   *os.File
	stdout  *os.File
	lines   chan []byte   // stdout lines; closed at EOF, error or an over-long line
	readers chan struct{} // closed when the stdout reader has returned
	quit    chan struct{} // closed to stop the stdout reader
	exited  chan struct{} // the child's: closed when the process has been waited for
	readErr error         // written before lines is closed
	// notTaken: the last job never reached the renderer: writing it failed, or the process
	// exited with status 0 without answering (renderers exit cleanly only between jobs,
	// e.g. to recycle themselves, so it left before reading the job).
	notTaken bool
	skipped  bool         // the last reply said "skipped": true
	overload overloadInfo // what the last error reply said about the upstream
	lineBuf  []byte       // reused for job lines
	// stderrTail keeps the last stderr lines: when a renderer fails to start, its reason
	// (a MapProxy configuration error, say) goes into the start error, not only the log.
	stderrTail *stderrTail
	// prio is what the process runs at (it starts at the daemon's); prioWarned: a change
	// failed and was logged.
	prio       renderPriority
	prioWarned bool
	grids      map[string]*gridInfo // from the ready line

	releaseOnce sync.Once
}

// startProcess starts a renderer and waits for its ready line (bounded by startTimeout).
func startProcess(cfg rendererConfig, hardStop <-chan struct{}, log *slog.Logger) (*rendererProcess, map[string]cacheReady, error) {
	if len(cfg.argv) == 0 {
		return nil, nil, errors.New("no renderer command")
	}
	inR, inW, err := os.Pipe()
	if err != nil {
		return nil, nil, err
	}
	outR, outW, err := os.Pipe()
	if err != nil {
		inR.Close()
		inW.Close()
		return nil, nil, err
	}
	cmd := exec.Command(cfg.argv[0], cfg.argv[1:]...)
	cmd.Env = append(os.Environ(), cfg.env...)
	tail := newStderrTail(log, "renderer: ", stderrTailLines, stderrTailBytes)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = inR, outW, tail
	c, err := startChild(cmd, log)
	inR.Close()
	outW.Close()
	if err != nil {
		inW.Close()
		outR.Close()
		return nil, nil, fmt.Errorf("start %s: %w", cfg.argv[0], err)
	}
	p := &rendererProcess{
		c: c, pid: c.pid, started: time.Now(), prio: renderPriority{nice: baseNice},
		stdin: inW, stdout: outR, stderrTail: tail, exited: c.exited,
		lines: make(chan []byte, 4), readers: make(chan struct{}), quit: make(chan struct{}),
	}
	plog := log.With("pid", p.pid)
	go func() { defer close(p.readers); p.readLines() }()

	caches, err := p.handshake(cfg.startTimeout, hardStop)
	if err != nil {
		p.kill(plog) // the process has been waited for: its stderr tail is complete
		if tail := p.stderrTail.String(); tail != "" {
			err = fmt.Errorf("%w; its last stderr lines: %s", err, tail)
		}
		return nil, nil, fmt.Errorf("renderer %s (pid %d): %w", cfg.argv[0], p.pid, err)
	}
	plog.Info("renderer ready", "caches", len(caches))
	return p, caches, nil
}

// readLines sends stdout lines to p.lines until EOF, an error, an over-long line or quit.
func (p *rendererProcess) readLines() {
	defer close(p.lines)
	br := bufio.NewReaderSize(p.stdout, 64<<10)
	for {
		line, err := readLimitedLine(br, maxRendererLine)
		if err != nil {
			p.readErr = err
			return
		}
		select {
		case p.lines <- line:
		case <-p.quit:
			return
		}
	}
}

// errLineTooLong is returned by readLimitedLine for a line over the limit.
var errLineTooLong = errors.New("line too long")

// readLimitedLine reads one '\n'-terminated line of at most limit bytes (without the newline).
// A longer line returns errLineTooLong after the whole line has been consumed, so the stream
// is in sync again; at EOF without a newline, the partial line comes with io.EOF.
func readLimitedLine(br *bufio.Reader, limit int) ([]byte, error) {
	var buf []byte
	tooLong := false
	for {
		frag, err := br.ReadSlice('\n')
		if !tooLong {
			if len(buf)+len(frag) > limit+1 {
				tooLong = true
				buf = nil
			} else {
				buf = append(buf, frag...)
			}
		}
		switch {
		case err == nil:
			if tooLong {
				return nil, errLineTooLong
			}
			return buf[:len(buf)-1], nil
		case errors.Is(err, bufio.ErrBufferFull):
			continue
		default:
			if tooLong {
				return nil, errLineTooLong
			}
			if len(buf) > 0 && errors.Is(err, io.EOF) {
				return buf, io.EOF
			}
			return nil, err
		}
	}
}

const (
	stderrTailLines = 5   // a renderer's last stderr lines in its start error
	stderrTailBytes = 300 // each shortened to this
)

func (p *rendererProcess) handshake(timeout time.Duration, hardStop <-chan struct{}) (map[string]cacheReady, error) {
	t := time.NewTimer(timeout)
	defer t.Stop()
	select {
	case line, ok := <-p.lines:
		if !ok {
			return nil, fmt.Errorf("closed its output before its ready line (%s)", p.exitTextWithin(killGrace))
		}
		var ready struct {
			Ready  *bool `json:"ready"`
			Caches map[string]struct {
				MetaSize []int32 `json:"meta_size"`
				XYZ      string  `json:"xyz"`
			} `json:"caches"`
		}
		if err := json.Unmarshal(line, &ready); err != nil || ready.Ready == nil || !*ready.Ready {
			return nil, fmt.Errorf("want a ready line {\"ready\": true, …}, got %s", truncate(string(line), 200))
		}
		if ready.Caches == nil {
			return nil, nil
		}
		p.grids = parseGridInfo(line)
		caches := make(map[string]cacheReady, len(ready.Caches))
		for id, c := range ready.Caches {
			m := cacheReady{meta: [2]int32{1, 1}}
			if len(c.MetaSize) == 2 && c.MetaSize[0] > 0 && c.MetaSize[1] > 0 {
				m.meta = [2]int32{c.MetaSize[0], c.MetaSize[1]}
			}
			o, err := parseOrigin(c.XYZ)
			if err != nil {
				return nil, fmt.Errorf("ready line, cache %q: %w", truncate(id, 64), err)
			}
			m.xyz = o
			caches[id] = m
		}
		return caches, nil
	case <-t.C:
		return nil, fmt.Errorf("no ready line within start_timeout %s", timeout)
	case <-hardStop:
		return nil, errors.New("daemon stopped before the renderer was ready")
	}
}

type jobReply struct {
	ID           *string `json:"id"`
	Status       string  `json:"status"`
	ErrorMessage string  `json:"error_message"`
	Skipped      bool    `json:"skipped"`
	// docs/design.md §17: the upstream's HTTP status when it refused (429, 503), a timeout, and its
	// Retry-After in seconds.
	UpstreamStatus  int     `json:"upstream_status"`
	UpstreamTimeout bool    `json:"upstream_timeout"`
	RetryAfter      float64 `json:"retry_after"`
}

// render sends one job and waits for its reply, at most j.timeout. healthy is false when the
// process must be replaced: it exited, wrote garbage, timed out, or the daemon is stopping hard.
func (p *rendererProcess) render(j renderJob, hardStop <-chan struct{}) (status, msg string, healthy, timedOut bool) {
	p.overload = overloadInfo{}
	id := strconv.FormatUint(j.seq, 10)
	line := appendJobLine(p.lineBuf[:0], id, j)
	p.lineBuf = line
	p.stdin.SetWriteDeadline(time.Now().Add(j.timeout))
	if _, err := p.stdin.Write(line); err != nil {
		p.notTaken = true
		return statusError, fmt.Sprintf("renderer (pid %d) did not take the job: %v", p.pid, err), false, false
	}
	t := time.NewTimer(j.timeout)
	defer t.Stop()
	select {
	case out, ok := <-p.lines:
		if !ok {
			exit := p.exitTextWithin(killGrace)
			p.notTaken = p.exitedCleanly()
			return statusError, fmt.Sprintf("renderer (pid %d) closed its output while rendering (%s)", p.pid, exit), false, false
		}
		return p.parseReply(out, id)
	case <-p.exited:
		// A reply written just before exiting still counts.
		select {
		case out, ok := <-p.lines:
			if ok {
				status, msg, _, _ := p.parseReply(out, id)
				return status, msg, false, false
			}
		case <-time.After(killGrace):
		}
		p.notTaken = p.exitedCleanly()
		return statusError, fmt.Sprintf("renderer (pid %d) %s while rendering", p.pid, p.exitText()), false, false
	case <-t.C:
		return statusError, fmt.Sprintf("render timeout: no answer within %s (renderer pid %d killed)", j.timeout, p.pid), false, true
	case <-hardStop:
		return statusError, "daemon is shutting down; the render was interrupted at the stop deadline", false, false
	}
}

func (p *rendererProcess) parseReply(out []byte, id string) (status, msg string, healthy, timedOut bool) {
	p.skipped = false
	if isPlainOK(out, id) {
		return statusOK, "", true, false
	}
	var rep jobReply
	if err := json.Unmarshal(out, &rep); err != nil || rep.ID == nil || rep.Status == "" {
		return statusError, fmt.Sprintf("renderer (pid %d) wrote an invalid reply: %s", p.pid, truncate(string(out), 200)), false, false
	}
	if *rep.ID != id {
		return statusError, fmt.Sprintf("renderer (pid %d) answered job %q while job %s was running", p.pid, truncate(*rep.ID, 40), id), false, false
	}
	switch rep.Status {
	case statusOK:
		p.skipped = rep.Skipped
		return statusOK, "", true, false
	case statusError:
		m := rep.ErrorMessage
		if m == "" {
			m = "renderer reported an error without a message"
		}
		p.overload = overloadInfo{status: rep.UpstreamStatus, timeout: rep.UpstreamTimeout, retryAfter: min(max(rep.RetryAfter, 0), 3600)}
		return statusError, m, true, false
	default:
		return statusError, fmt.Sprintf("renderer (pid %d) answered unknown status %q", p.pid, truncate(rep.Status, 40)), false, false
	}
}

// failure classifies why a render left the process unusable, before it is killed: one of
// restartReasons.
func (p *rendererProcess) failure(timedOut bool, hardStop <-chan struct{}) string {
	if timedOut {
		return restartTimeout
	}
	select {
	case <-hardStop:
		return restartShutdown
	default:
	}
	select {
	case <-p.exited:
		return restartExited
	default:
		return restartProtocol
	}
}

// exitTextWithin describes the exit, waiting at most d for it.
func (p *rendererProcess) exitTextWithin(d time.Duration) string {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-p.exited:
	case <-t.C:
	}
	return p.exitText()
}

// exitedCleanly reports whether the process has exited with status 0.
func (p *rendererProcess) exitedCleanly() bool {
	select {
	case <-p.exited:
		return p.c.waitErr == nil
	default:
		return false
	}
}

func (p *rendererProcess) exitText() string {
	select {
	case <-p.exited:
	default:
		return "is running"
	}
	return exitText(p.c.waitErr)
}

// stop asks the process to exit by closing its stdin, then kills it if it has not exited
// within killGrace.
func (p *rendererProcess) stop(log *slog.Logger) {
	p.stdin.Close()
	t := time.NewTimer(killGrace)
	defer t.Stop()
	select {
	case <-p.exited:
		p.release()
	case <-t.C:
		log.Warn("renderer did not exit after its input closed; killing it", "pid", p.pid)
		p.kill(log)
	}
}

// kill ends the process and its group: SIGTERM, then SIGKILL after killGrace (proc.go).
func (p *rendererProcess) kill(log *slog.Logger) {
	p.c.stop("renderer")
	p.release()
}

// release closes our ends of the pipes and waits for the output readers. The process has
// exited; what it wrote to stderr last (a traceback, say) is still logged, but a grandchild
// that holds the pipes open cannot keep us waiting: the read ends are closed after killGrace.
func (p *rendererProcess) release() {
	p.releaseOnce.Do(func() {
		p.stdin.Close()
		close(p.quit)
		t := time.NewTimer(killGrace)
		defer t.Stop()
		select {
		case <-p.readers:
		case <-t.C:
		}
		p.stdout.Close()
		<-p.readers
	})
}
