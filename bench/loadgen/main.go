// SPDX-License-Identifier: Apache-2.0

// Command loadgen drives the mapproxy-renderd benchmarks. It speaks three
// protocols — our NDJSON (docs/design.md §2), Tirex's key=value datagrams on
// master.sock, and renderd's 64-byte mod_tile v2 struct — and runs one
// scenario per invocation, printing one JSON result line on stdout.
//
//	loadgen closed   closed loop: -window requests in flight (scenarios 1, 2)
//	loadgen live     seed backlog, then live requests at a fixed pace (3)
//	loadgen promote  live requests for tiles already queued as seed (4)
//	loadgen storm    many requests for one metatile at once (5)
//	loadgen overflow many requests in flight at once (6)
//	loadgen enqueue  fire-and-forget enqueue rate and memory per job (7)
//	loadgen wait     wait until a daemon answers
//	loadgen status   print our daemon's status document
//	loadgen tirexcmd send one control message to tirex-master
//	loadgen idle     wait until processes stop using CPU
//	loadgen quiet    wait until the whole machine is (nearly) idle
//	loadgen report   turn result lines into BENCHMARKS.md
//
// Every request is timed from just before it is written to the arrival of
// its own final answer. Every loop is bounded in count and in time.
package main

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: loadgen closed|live|promote|storm|overflow|enqueue|wait|status|tirexcmd|idle|quiet|report [flags]")
		os.Exit(2)
	}
	cmds := map[string]func([]string) error{
		"closed": cmdClosed, "live": cmdLive, "promote": cmdPromote, "storm": cmdStorm,
		"overflow": cmdOverflow, "enqueue": cmdEnqueue, "wait": cmdWait, "status": cmdStatus,
		"tirexcmd": cmdTirex, "report": cmdReport, "idle": cmdIdle, "quiet": cmdQuiet,
	}
	f, ok := cmds[os.Args[1]]
	if !ok {
		fmt.Fprintf(os.Stderr, "loadgen: unknown subcommand %q\n", os.Args[1])
		os.Exit(2)
	}
	if err := f(os.Args[2:]); err != nil {
		fmt.Fprintf(os.Stderr, "loadgen %s: %v\n", os.Args[1], err)
		os.Exit(1)
	}
}

// env holds what every scenario needs.
type env struct {
	t       target
	system  string
	variant string
	rep     int
	z       int
	start   int
	pidList string
	pids    []int
	logPath string
	logWant string
	counter *renderCounter
	timeout time.Duration

	busyBefore float64
}

func newFlags(name string, e *env) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.StringVar(&e.t.proto, "proto", "ndjson", "ndjson | tirex | renderd")
	fs.StringVar(&e.t.addr, "addr", "", "Unix socket of the daemon (tirex: master.sock)")
	fs.StringVar(&e.t.name, "name", "", "cache identifier (ndjson) or map name (tirex, renderd)")
	fs.IntVar(&e.t.livePrio, "live-prio", 0, "live priority (ndjson 100, tirex 1, renderd cmd 5 RenderPrio)")
	fs.IntVar(&e.t.seedPrio, "seed-prio", 0, "seed priority (ndjson 10, tirex 20, renderd cmd 6 RenderBulk)")
	fs.StringVar(&e.t.clientDir, "client-dir", "", "tirex: directory for the client's datagram socket")
	fs.StringVar(&e.system, "system", "", "label: which system this is (ours, floor, tirex, renderd)")
	fs.StringVar(&e.variant, "variant", "", "label: scenario variant")
	fs.IntVar(&e.rep, "rep", 0, "label: repetition number")
	fs.IntVar(&e.z, "z", 16, "zoom level of the tiles")
	fs.IntVar(&e.start, "start", 0, "index of the first metatile (keeps runs on distinct metatiles)")
	fs.StringVar(&e.pidList, "pid", "", "daemon pid(s), comma-separated: CPU and RSS are read from /proc")
	fs.StringVar(&e.logPath, "render-log", "", "file that gets one line per finished render")
	fs.StringVar(&e.logWant, "render-match", "", "count only render-log lines containing this")
	fs.DurationVar(&e.timeout, "timeout", 60*time.Second, "hard limit for the whole scenario")
	fs.Float64Var(&e.busyBefore, "busy-before", -1, "label: the machine's CPU share just before the run (from loadgen quiet)")
	return fs
}

// parse parses a scenario's flags and then fills in the environment from them.
func (e *env) parse(fs *flag.FlagSet, args []string) error {
	if err := fs.Parse(args); err != nil {
		return err
	}
	return e.init()
}

func (e *env) init() error {
	if err := e.t.defaults(); err != nil {
		return err
	}
	pids, err := parsePids(e.pidList)
	if err != nil {
		return err
	}
	e.pids = pids
	e.counter = newRenderCounter(e.logPath, e.logWant)
	if e.system == "" {
		e.system = e.t.proto
	}
	if e.z < 3 || e.z > 24 {
		return fmt.Errorf("-z %d out of range 3..24", e.z)
	}
	return nil
}

// tile returns the top-left tile of the idx-th metatile (8×8) at zoom z.
func (e *env) tile(idx int) (x, y int) {
	perRow := (1 << e.z) / 8
	idx += e.start
	return (idx % perRow) * 8, ((idx / perRow) % perRow) * 8
}

func (e *env) req(tag, idx int, live bool) request {
	x, y := e.tile(idx)
	return request{tag: tag, x: x, y: y, z: e.z, live: live}
}

func (e *env) emit(scenario string, m map[string]float64) {
	if b, err := os.ReadFile("/proc/loadavg"); err == nil {
		if f := strings.Fields(string(b)); len(f) > 0 {
			m["loadavg1"], _ = strconv.ParseFloat(f[0], 64)
		}
	}
	if e.busyBefore >= 0 {
		m["machine_busy_before"] = e.busyBefore
	}
	out := map[string]any{
		"scenario": scenario, "system": e.system, "variant": e.variant, "rep": e.rep,
		"proto": e.t.proto, "time": time.Now().UTC().Format(time.RFC3339), "metrics": m,
	}
	b, _ := json.Marshal(out)
	fmt.Println(string(b))
}

// tracker connects a session to a recorder and counts answers.
type tracker struct {
	rec      *recorder
	sess     session
	answered atomic.Int64
	extra    atomic.Int64 // answers to a request that already had one
	hook     func(tag int, o outcome)

	mu     sync.Mutex
	wantN  int64 // signal when answered reaches wantN
	wantCh chan struct{}
}

func (e *env) open(n int, hook func(tag int, o outcome)) (*tracker, error) {
	tr := &tracker{rec: newRecorder(n), hook: hook}
	sess, err := dial(e.t, func(tag int, o outcome) {
		if !tr.rec.markDone(tag, o) {
			tr.extra.Add(1)
			return
		}
		a := tr.answered.Add(1)
		if tr.hook != nil {
			tr.hook(tag, o)
		}
		tr.mu.Lock()
		if tr.wantCh != nil && a >= tr.wantN {
			close(tr.wantCh)
			tr.wantCh = nil
		}
		tr.mu.Unlock()
	})
	if err != nil {
		return nil, err
	}
	tr.sess = sess
	return tr, nil
}

// send marks the requests sent and writes them.
func (tr *tracker) send(reqs ...request) error {
	for _, r := range reqs {
		tr.rec.markSent(r.tag)
	}
	return tr.sess.send(reqs...)
}

// waitAnswered waits until n answers arrived or the deadline passed.
func (tr *tracker) waitAnswered(n int64, deadline time.Time) bool {
	tr.mu.Lock()
	if tr.answered.Load() >= n {
		tr.mu.Unlock()
		return true
	}
	ch := make(chan struct{})
	tr.wantN, tr.wantCh = n, ch
	tr.mu.Unlock()
	select {
	case <-ch:
		return true
	case <-time.After(time.Until(deadline)):
		tr.mu.Lock()
		tr.wantCh = nil
		tr.mu.Unlock()
		return tr.answered.Load() >= n
	}
}

// waitIdle waits until n answers arrived, or no answer arrived for idle, or
// the deadline passed; it returns the time of the last answer seen.
func (tr *tracker) waitIdle(n int64, idle time.Duration, deadline time.Time) {
	last, since := tr.answered.Load(), time.Now()
	for time.Now().Before(deadline) && last < n {
		next := time.Now().Add(idle / 10)
		tr.waitAnswered(n, next)
		a := tr.answered.Load()
		if a != last {
			last, since = a, time.Now()
		} else if time.Since(since) >= idle {
			return
		}
	}
}

// lastDone is the latest answer time among tags [from, to), as ns since base.
func (tr *tracker) lastDone(from, to int) int64 {
	var m int64
	for i := from; i < to; i++ {
		m = max(m, tr.rec.done[i].Load())
	}
	return m
}

// ---------------------------------------------------------------------------
// Scenario 1 and 2: closed loop.

func cmdClosed(args []string) error {
	var e env
	fs := newFlags("closed", &e)
	window := fs.Int("window", 32, "requests in flight")
	n := fs.Int("n", 200000, "at most this many requests")
	dur := fs.Duration("duration", 3*time.Second, "stop sending this long after the warm-up")
	warmup := fs.Int("warmup", 500, "answers before measuring starts")
	live := fs.Bool("live", true, "send live-class requests (else seed class)")
	if err := e.parse(fs, args); err != nil {
		return err
	}
	if *warmup >= *n || *window < 1 {
		return errors.New("need -n > -warmup and -window ≥ 1")
	}
	hardDeadline := time.Now().Add(e.timeout)

	var (
		next     atomic.Int64 // next tag to send
		stop     atomic.Bool
		deadline atomic.Int64 // ns since base; 0 until warmed up
		warmAt   atomic.Int64
		cpu0     time.Duration
		sendErr  atomic.Value
		tr       *tracker
		doneOnce sync.Once
		done     = make(chan struct{})
	)
	sendNext := func() {
		if stop.Load() {
			return
		}
		if d := deadline.Load(); d != 0 && tr.rec.now() > d {
			stop.Store(true)
			return
		}
		tag := int(next.Add(1) - 1)
		if tag >= *n {
			stop.Store(true)
			return
		}
		if err := tr.send(e.req(tag, tag, *live)); err != nil {
			sendErr.Store(err)
			stop.Store(true)
		}
	}
	hook := func(tag int, o outcome) {
		a := tr.answered.Load()
		if a == int64(*warmup) {
			warmAt.Store(tr.rec.now())
			cpu0, _ = cpuTime(e.pids)
			deadline.Store(tr.rec.now() + int64(*dur))
		}
		sendNext()
		if stop.Load() && a >= min(next.Load(), int64(*n)) {
			doneOnce.Do(func() { close(done) })
		}
	}
	var err error
	tr, err = e.open(*n, hook)
	if err != nil {
		return err
	}
	defer tr.sess.close()
	if *warmup == 0 {
		warmAt.Store(tr.rec.now())
		cpu0, _ = cpuTime(e.pids)
		deadline.Store(tr.rec.now() + int64(*dur))
	}
	for i := 0; i < *window; i++ {
		sendNext()
	}
	select {
	case <-done:
	case <-time.After(time.Until(hardDeadline)):
		stop.Store(true)
	}
	cpu1, _ := cpuTime(e.pids)
	if err, _ := sendErr.Load().(error); err != nil {
		return err
	}
	issued := int(min(next.Load(), int64(*n)))
	last := tr.lastDone(*warmup, issued)
	span := time.Duration(last - warmAt.Load())
	c := tr.rec.counts(*warmup, issued)
	measured := issued - *warmup - c[oNone]
	m := map[string]float64{
		"window": float64(*window), "requests": float64(issued - *warmup),
		"seconds": round3(span.Seconds()),
		"rps":     round3(float64(measured) / span.Seconds()),
		"ok_rps":  round3(float64(c[oOK]) / span.Seconds()),
	}
	addCounts(m, "", c)
	addLatency(m, "", tr.rec.latencies(*warmup, issued, oNone))
	// Completions only: renderd's instant NotDone answers are not renders.
	addLatency(m, "ok_", tr.rec.latencies(*warmup, issued, oOK))
	if len(e.pids) > 0 && measured > 0 {
		m["cpu_us_per_req"] = round3(float64((cpu1 - cpu0).Microseconds()) / float64(measured))
		if c[oOK] > 0 {
			m["cpu_us_per_ok"] = round3(float64((cpu1 - cpu0).Microseconds()) / float64(c[oOK]))
		}
	}
	e.emit("closed", m)
	return nil
}

// ---------------------------------------------------------------------------
// Scenario 3: seed backlog, then live requests one every -every.

func cmdLive(args []string) error {
	var e env
	fs := newFlags("live", &e)
	seeds := fs.Int("seed", 600, "seed backlog (requests, distinct metatiles)")
	lives := fs.Int("live", 40, "live requests")
	every := fs.Duration("every", 50*time.Millisecond, "interval between live requests")
	settle := fs.Duration("settle", 300*time.Millisecond, "pause between the backlog and the first live request")
	if err := e.parse(fs, args); err != nil {
		return err
	}
	deadline := time.Now().Add(e.timeout)
	tr, err := e.open(*seeds+*lives, nil)
	if err != nil {
		return err
	}
	defer tr.sess.close()

	cStart := e.counter.count()
	cpu0, _ := cpuTime(e.pids)
	var c0 int
	t0, err := backlogThenLive(&e, tr, *seeds, *lives, *every, *settle, deadline,
		func() { c0 = e.counter.count() },
		func(k int) int { return *seeds + k }) // live requests for fresh metatiles
	if err != nil {
		return err
	}
	c1 := e.counter.count()
	window := time.Duration(tr.lastDone(*seeds, *seeds+*lives)) - t0.Sub(tr.rec.base)
	liveC := tr.rec.counts(*seeds, *seeds+*lives)
	seedsAtEnd := tr.rec.counts(0, *seeds)

	m := map[string]float64{"seed": float64(*seeds), "live": float64(*lives),
		"window_s": round3(window.Seconds())}
	addLatency(m, "live_", tr.rec.latencies(*seeds, *seeds+*lives, oNone))
	addCounts(m, "live_", liveC)
	if e.counter != nil {
		inWindow := c1 - c0 - liveC[oOK]
		m["seed_rps"] = round3(float64(inWindow) / window.Seconds())
		m["backlog_left"] = float64(*seeds - (c1 - cStart - liveC[oOK]))
	}
	m["seed_answered_by_end"] = float64(*seeds - seedsAtEnd[oNone])

	// Drain, so the next run starts on an idle daemon.
	tr.waitIdle(int64(*seeds+*lives), 10*time.Second, deadline)
	total := e.counter.waitStable(cStart+*seeds+*lives, 400*time.Millisecond, deadline)
	cpu1, _ := cpuTime(e.pids)
	addCounts(m, "seed_", tr.rec.counts(0, *seeds))
	if e.counter != nil {
		m["renders"] = float64(total - cStart)
	}
	if len(e.pids) > 0 {
		m["cpu_us_per_req"] = round3(float64((cpu1 - cpu0).Microseconds()) / float64(*seeds+*lives))
	}
	e.emit("live", m)
	return nil
}

// backlogThenLive sends a backlog of seeds seed requests (tags and metatiles 0..seeds-1) at
// once, waits settle, calls beforeLive, then sends lives live requests (tags seeds..) one
// every every, live request k for metatile liveTile(k), and waits until every live request is
// answered or deadline passes. It returns when the first live request was due.
func backlogThenLive(e *env, tr *tracker, seeds, lives int, every, settle time.Duration, deadline time.Time,
	beforeLive func(), liveTile func(k int) int) (time.Time, error) {
	seedReqs := make([]request, seeds)
	for i := range seedReqs {
		seedReqs[i] = e.req(i, i, false)
	}
	if err := tr.send(seedReqs...); err != nil {
		return time.Time{}, err
	}
	time.Sleep(settle) // part of the scenario: the backlog settles into the queue
	beforeLive()
	t0 := time.Now()
	for k := 0; k < lives; k++ {
		time.Sleep(time.Until(t0.Add(time.Duration(k) * every))) // the scenario's request pacing
		if err := tr.send(e.req(seeds+k, liveTile(k), true)); err != nil {
			return t0, err
		}
	}
	// Wait for the live answers; seed answers may arrive in between.
	for time.Now().Before(deadline) {
		if c := tr.rec.counts(seeds, seeds+lives); c[oNone] == 0 {
			break
		}
		time.Sleep(2 * time.Millisecond) // polling the recorder, bounded by the deadline
	}
	return t0, nil
}

// ---------------------------------------------------------------------------
// Scenario 4: promotion. Live requests for the tail of a queued seed backlog.

func cmdPromote(args []string) error {
	var e env
	fs := newFlags("promote", &e)
	seeds := fs.Int("seed", 300, "seed backlog (requests, distinct metatiles)")
	lives := fs.Int("live", 20, "live requests, for the last -live seed metatiles, newest first")
	every := fs.Duration("every", 50*time.Millisecond, "interval between live requests")
	settle := fs.Duration("settle", 300*time.Millisecond, "pause between the backlog and the first live request")
	if err := e.parse(fs, args); err != nil {
		return err
	}
	if *lives > *seeds {
		return errors.New("-live must not exceed -seed")
	}
	deadline := time.Now().Add(e.timeout)
	tr, err := e.open(*seeds+*lives, nil)
	if err != nil {
		return err
	}
	defer tr.sess.close()

	cStart := e.counter.count()
	_, err = backlogThenLive(&e, tr, *seeds, *lives, *every, *settle, deadline, func() {},
		func(k int) int { return *seeds - 1 - k }) // the backlog's metatiles, newest first
	if err != nil {
		return err
	}
	m := map[string]float64{"seed": float64(*seeds), "live": float64(*lives)}
	addLatency(m, "live_", tr.rec.latencies(*seeds, *seeds+*lives, oNone))
	addCounts(m, "live_", tr.rec.counts(*seeds, *seeds+*lives))

	tr.waitIdle(int64(*seeds+*lives), 10*time.Second, deadline)
	total := e.counter.waitStable(cStart+*seeds, 400*time.Millisecond, deadline)
	addCounts(m, "seed_", tr.rec.counts(0, *seeds))
	if e.counter != nil {
		m["renders"] = float64(total - cStart)
		m["renders_per_tile"] = round3(float64(total-cStart) / float64(*seeds))
	}
	e.emit("promote", m)
	return nil
}

// ---------------------------------------------------------------------------
// Scenario 5: dedup storm. -n requests for the tiles of one metatile at once.

func cmdStorm(args []string) error {
	var e env
	fs := newFlags("storm", &e)
	n := fs.Int("n", 1000, "requests, all for one metatile")
	if err := e.parse(fs, args); err != nil {
		return err
	}
	deadline := time.Now().Add(e.timeout)
	tr, err := e.open(*n, nil)
	if err != nil {
		return err
	}
	defer tr.sess.close()
	mx, my := e.tile(0)
	reqs := make([]request, *n)
	for i := range reqs {
		reqs[i] = request{tag: i, x: mx + i%8, y: my + (i/8)%8, z: e.z, live: true}
	}
	cStart := e.counter.count()
	cpu0, _ := cpuTime(e.pids)
	t0 := tr.rec.now()
	if err := tr.send(reqs...); err != nil {
		return err
	}
	sendSpan := time.Duration(tr.rec.now() - t0)
	tr.waitIdle(int64(*n), 5*time.Second, deadline)
	total := e.counter.waitStable(cStart+1, 400*time.Millisecond, deadline)
	cpu1, _ := cpuTime(e.pids)
	m := map[string]float64{"requests": float64(*n), "send_ms": round3(float64(sendSpan) / 1e6),
		"extra_answers": float64(tr.extra.Load())}
	c := tr.rec.counts(0, *n)
	addCounts(m, "", c)
	m["answers"] = float64(*n - c[oNone])
	addLatency(m, "", tr.rec.latencies(0, *n, oNone))
	if e.counter != nil {
		m["renders"] = float64(total - cStart)
	}
	if len(e.pids) > 0 {
		m["cpu_us_per_req"] = round3(float64((cpu1 - cpu0).Microseconds()) / float64(*n))
	}
	e.emit("storm", m)
	return nil
}

// ---------------------------------------------------------------------------
// Scenario 6: overflow. -n distinct requests in flight at once.

func cmdOverflow(args []string) error {
	var e env
	fs := newFlags("overflow", &e)
	n := fs.Int("n", 5000, "requests, all sent at once")
	idle := fs.Duration("idle", 5*time.Second, "give up when no answer arrived for this long")
	if err := e.parse(fs, args); err != nil {
		return err
	}
	deadline := time.Now().Add(e.timeout)
	var before map[string]float64
	if e.t.proto == "ndjson" {
		before, _ = statusNumbers(e.t.addr)
	}
	tr, err := e.open(*n, nil)
	if err != nil {
		return err
	}
	defer tr.sess.close()
	reqs := make([]request, *n)
	for i := range reqs {
		reqs[i] = e.req(i, i, true)
	}
	cStart := e.counter.count()
	t0 := tr.rec.now()
	if err := tr.send(reqs...); err != nil {
		return err
	}
	tr.waitIdle(int64(*n), *idle, deadline)
	last := tr.lastDone(0, *n)
	c := tr.rec.counts(0, *n)
	m := map[string]float64{"requests": float64(*n), "seconds": round3(float64(last-t0) / 1e9),
		"answers": float64(*n - c[oNone]), "extra_answers": float64(tr.extra.Load())}
	addCounts(m, "", c)
	l := tr.rec.latencies(0, *n, oOK)
	if len(l) > 0 {
		m["ok_max_ms"] = round3(l[len(l)-1])
	}
	if e.counter != nil {
		m["renders"] = float64(e.counter.waitStable(cStart, 300*time.Millisecond, deadline) - cStart)
	}
	if e.t.proto == "ndjson" {
		if after, err := statusNumbers(e.t.addr); err == nil {
			for k, v := range after {
				if k != "queue_length" && k != "running" {
					m["daemon_"+k] = v - before[k]
				}
			}
		}
	}
	e.emit("overflow", m)
	return nil
}

// ---------------------------------------------------------------------------
// Scenario 7: fire-and-forget enqueue rate and memory per queued job.

func cmdEnqueue(args []string) error {
	var e env
	fs := newFlags("enqueue", &e)
	n := fs.Int("n", 1000000, "background jobs, distinct metatiles")
	batch := fs.Int("batch", 1000, "requests per write")
	settle := fs.Duration("settle", time.Second, "pause before the final RSS reading")
	if err := e.parse(fs, args); err != nil {
		return err
	}
	if e.t.proto == "renderd" {
		return errors.New("renderd has no fire-and-forget request")
	}
	deadline := time.Now().Add(e.timeout)
	rss0, err := rssBytes(e.pids)
	if err != nil {
		return fmt.Errorf("need -pid: %w", err)
	}
	// One extra tag: the Tirex ping that marks the end of the intake.
	tr, err := e.open(*n+1, nil)
	if err != nil {
		return err
	}
	defer tr.sess.close()
	t0 := time.Now()
	reqs := make([]request, 0, *batch)
	for i := 0; i < *n && time.Now().Before(deadline); i += *batch {
		reqs = reqs[:0]
		for j := i; j < min(i+*batch, *n); j++ {
			r := e.req(j, j, false)
			r.bg = true
			reqs = append(reqs, r)
		}
		if err := tr.sess.send(reqs...); err != nil {
			return err
		}
	}
	sendSpan := time.Since(t0)
	switch e.t.proto {
	case "ndjson":
		tr.waitIdle(int64(*n), 10*time.Second, deadline)
	case "tirex":
		// The master handles datagrams in order: its answer to a ping sent
		// after the last job means every job has been taken in.
		ts := tr.sess.(*tirexSession)
		tr.rec.markSent(*n)
		if err := ts.sendRaw("type", "ping", "id", strconv.Itoa(*n)); err != nil {
			return err
		}
		tr.waitAnswered(1, deadline)
	}
	intake := time.Since(t0)
	m := map[string]float64{"jobs": float64(*n), "send_s": round3(sendSpan.Seconds()),
		"seconds": round3(intake.Seconds()), "rate": round3(float64(*n) / intake.Seconds())}
	if e.t.proto == "ndjson" {
		addCounts(m, "", tr.rec.counts(0, *n))
		// Wait until the status document shows the jobs queued.
		var q float64 = -1
		for time.Now().Before(deadline) {
			st, err := statusNumbers(e.t.addr)
			if err == nil {
				q = st["queue_length"]
				if q+st["running"] >= float64(*n) || q >= float64(*n)-64 {
					break
				}
			}
			time.Sleep(100 * time.Millisecond)
		}
		m["queue_length"] = q
	}
	time.Sleep(*settle)
	rss1, err := rssBytes(e.pids)
	if err != nil {
		return err
	}
	m["rss_before_mb"] = round3(float64(rss0) / (1 << 20))
	m["rss_after_mb"] = round3(float64(rss1) / (1 << 20))
	m["bytes_per_job"] = round3(float64(rss1-rss0) / float64(*n))
	e.emit("enqueue", m)
	return nil
}

// ---------------------------------------------------------------------------
// Helpers: wait, status, tirexcmd.

func cmdWait(args []string) error {
	var e env
	fs := newFlags("wait", &e)
	if err := e.parse(fs, args); err != nil {
		return err
	}
	deadline := time.Now().Add(e.timeout)
	var last error
	for time.Now().Before(deadline) {
		if last = ping(&e); last == nil {
			return nil
		}
		time.Sleep(200 * time.Millisecond)
	}
	return fmt.Errorf("no answer from %s within %v: %w", e.t.addr, e.timeout, last)
}

// ping checks that a daemon answers: ping (ours, Tirex) or one render
// request (renderd, which has no ping).
func ping(e *env) error {
	switch e.t.proto {
	case "ndjson":
		doc, err := ndjsonCall(e.t.addr, map[string]any{"command": "ping", "id": "ping"}, 2*time.Second)
		if err != nil {
			return err
		}
		if doc["status"] != "ok" {
			return fmt.Errorf("ping answered %v", doc)
		}
		return nil
	case "tirex":
		tr, err := e.open(1, nil)
		if err != nil {
			return err
		}
		defer tr.sess.close()
		if err := tr.sess.(*tirexSession).sendRaw("type", "ping", "id", "0"); err != nil {
			return err
		}
		if !tr.waitAnswered(1, time.Now().Add(2*time.Second)) {
			return errors.New("no ping answer")
		}
		return nil
	default:
		tr, err := e.open(1, nil)
		if err != nil {
			return err
		}
		defer tr.sess.close()
		x, y := e.tile(0)
		if err := tr.send(request{tag: 0, x: x, y: y, z: e.z, live: true}); err != nil {
			return err
		}
		if !tr.waitAnswered(1, time.Now().Add(5*time.Second)) {
			return errors.New("no answer to a render request")
		}
		return nil
	}
}

// statusPaths says where each figure lives in our daemon's status document.
// Adjust here if the document changes; everything else uses these names.
var statusPaths = map[string]string{
	"queue_length":  "stats.queue.length",
	"running":       "stats.renderers.busy",
	"requested":     "stats.counters.requested",
	"rendered":      "stats.counters.rendered",
	"merged":        "stats.counters.merged",
	"dropped":       "stats.counters.dropped",
	"busy_rejected": "stats.counters.busy_rejected",
	"failed":        "stats.counters.failed",
}

// statusNumbers asks our daemon for its status and extracts statusPaths;
// figures it cannot find are left out.
func statusNumbers(addr string) (map[string]float64, error) {
	doc, err := ndjsonCall(addr, map[string]any{"command": "status", "id": "status"}, 5*time.Second)
	if err != nil {
		return nil, err
	}
	out := map[string]float64{}
	for name, path := range statusPaths {
		var v any = doc
		for _, k := range strings.Split(path, ".") {
			obj, ok := v.(map[string]any)
			if !ok {
				v = nil
				break
			}
			v = obj[k]
		}
		if f, ok := v.(float64); ok {
			out[name] = f
		}
	}
	return out, nil
}

func cmdStatus(args []string) error {
	var e env
	fs := newFlags("status", &e)
	if err := fs.Parse(args); err != nil {
		return err
	}
	doc, err := ndjsonCall(e.t.addr, map[string]any{"command": "status", "id": "status"}, 5*time.Second)
	if err != nil {
		return err
	}
	b, _ := json.MarshalIndent(doc, "", "  ")
	fmt.Println(string(b))
	nums, _ := statusNumbers(e.t.addr)
	b, _ = json.Marshal(nums)
	fmt.Fprintln(os.Stderr, "extracted:", string(b))
	return nil
}

// cmdTirex sends one control message (key=value arguments) to tirex-master
// and waits for its answer.
func cmdTirex(args []string) error {
	var e env
	e.t.proto = "tirex"
	fs := newFlags("tirexcmd", &e)
	if err := fs.Parse(args); err != nil {
		return err
	}
	e.t.proto = "tirex"
	if err := e.init(); err != nil {
		return err
	}
	tr, err := e.open(1, nil)
	if err != nil {
		return err
	}
	defer tr.sess.close()
	kv := []string{}
	for _, a := range fs.Args() {
		k, v, ok := strings.Cut(a, "=")
		if !ok {
			return fmt.Errorf("argument %q is not key=value", a)
		}
		kv = append(kv, k, v)
	}
	kv = append(kv, "id", "0")
	if err := tr.sess.(*tirexSession).sendRaw(kv...); err != nil {
		return err
	}
	if !tr.waitAnswered(1, time.Now().Add(5*time.Second)) {
		return errors.New("no answer")
	}
	if outcome(tr.rec.outcome[0].Load()) != oOK {
		return errors.New("tirex-master answered with an error")
	}
	return nil
}

// cmdIdle waits until the processes used less than -max of one CPU over the
// last -quiet (e.g. renderd still rendering its Dirty queue after a run), so
// the next run starts on an idle daemon.
func cmdIdle(args []string) error {
	fs := flag.NewFlagSet("idle", flag.ContinueOnError)
	pidList := fs.String("pid", "", "pids, comma-separated")
	quiet := fs.Duration("quiet", 300*time.Millisecond, "window that must be quiet")
	maxShare := fs.Float64("max", 0.05, "CPU share of one core below which a window counts as quiet")
	timeout := fs.Duration("timeout", 30*time.Second, "give up after this long")
	if err := fs.Parse(args); err != nil {
		return err
	}
	pids, err := parsePids(*pidList)
	if err != nil || len(pids) == 0 {
		return fmt.Errorf("need -pid: %v", err)
	}
	deadline := time.Now().Add(*timeout)
	for time.Now().Before(deadline) {
		c0, err := cpuTime(pids)
		if err != nil {
			return err
		}
		time.Sleep(*quiet)
		c1, err := cpuTime(pids)
		if err != nil {
			return err
		}
		if float64(c1-c0) <= *maxShare*float64(*quiet) {
			return nil
		}
	}
	return fmt.Errorf("processes %v still busy after %v", pids, *timeout)
}

// cmdQuiet waits until the whole machine's CPU use over -window is below
// -max (a share of all cores), so that a run does not start while other work
// (a test suite, a build) is using the cores; it gives up after -timeout and
// prints the last share seen either way.
func cmdQuiet(args []string) error {
	fs := flag.NewFlagSet("quiet", flag.ContinueOnError)
	maxShare := fs.Float64("max", 0.25, "busy share of all cores below which the machine counts as quiet")
	window := fs.Duration("window", 500*time.Millisecond, "measuring window")
	timeout := fs.Duration("timeout", 15*time.Second, "give up after this long")
	if err := fs.Parse(args); err != nil {
		return err
	}
	deadline := time.Now().Add(*timeout)
	share := -1.0
	for {
		b0, t0, err := machineCPU()
		if err != nil {
			return err
		}
		time.Sleep(*window)
		b1, t1, err := machineCPU()
		if err != nil {
			return err
		}
		if t1 > t0 {
			share = float64(b1-b0) / float64(t1-t0)
		}
		if share < *maxShare || !time.Now().Before(deadline) {
			break
		}
	}
	fmt.Printf("%.2f\n", share)
	return nil
}

// machineCPU returns busy and total jiffies over all cores from /proc/stat.
func machineCPU() (busy, total int64, err error) {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0, 0, err
	}
	line, _, _ := strings.Cut(string(b), "\n")
	f := strings.Fields(line)
	if len(f) < 8 || f[0] != "cpu" {
		return 0, 0, errors.New("unexpected /proc/stat")
	}
	for i, s := range f[1:] {
		if i >= 8 { // guest time is already counted in user
			break
		}
		v, _ := strconv.ParseInt(s, 10, 64)
		total += v
		if i != 3 && i != 4 { // idle, iowait
			busy += v
		}
	}
	return busy, total, nil
}
