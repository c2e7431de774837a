// SPDX-License-Identifier: Apache-2.0

package main

import (
	"bufio"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// TestMain lets the test binary play two other programs, as os/exec's tests do:
// "fake-renderer" (a renderer speaking docs/design.md §5) and "daemon" (the real daemon, run()).
func TestMain(m *testing.M) {
	if os.Getenv(reaperEnv) == "1" { // a daemon's reaper (proc.go), as main does
		os.Exit(reaperMain(os.Stdin))
	}
	if len(os.Args) > 1 {
		switch os.Args[1] {
		case "fake-renderer":
			os.Exit(fakeRenderer(os.Args[2:]))
		case "fake-planner":
			os.Exit(fakePlanner(os.Args[2:]))
		case "daemon":
			ctx, stop := signalContext()
			err := run(ctx, os.Args[2:], os.Stdout, os.Stderr)
			stop()
			if err != nil {
				fmt.Fprintln(os.Stderr, "mapproxy-renderd:", err)
				os.Exit(1)
			}
			os.Exit(0)
		}
	}
	os.Exit(guardDefaultStateDir(m.Run))
}

// guardDefaultStateDir fails a CI run in which some test created the daemon's default
// state_dir (tests keep their state in their own temp dirs; the demo too). Only
// under CI=true: on a shared machine another process may create it meanwhile.
func guardDefaultStateDir(run func() int) int {
	_, err := os.Lstat(defaultStateDir)
	existed := err == nil
	code := run()
	if _, err := os.Lstat(defaultStateDir); err == nil && !existed && os.Getenv("CI") == "true" {
		fmt.Fprintf(os.Stderr, "FAIL: a test created %s (the default state_dir): give every daemon its own state_dir or journal: false\n", defaultStateDir)
		return 1
	}
	return code
}

// fakeRenderer is a renderer for tests. Behaviour per job is chosen by the tile's x:
// x == crash → exit 3; x == hang → never answer; x == stall → never answer, exit when
// stdin ends (the daemon died); x == garbage → write garbage; x == fail → answer error;
// x == skip → answer ok with "skipped": true. It logs "pid cache z x y" per job to -log,
// and with -gate it reads one byte from that FIFO before answering, so tests decide when
// renders finish.
// With -ready-gate it reads one byte from that FIFO before its ready line (tests decide when
// start-up ends), and -env-log appends one JSON line per process start (see writeEnvLog).
func fakeRenderer(args []string) int {
	fs := flag.NewFlagSet("fake-renderer", flag.ContinueOnError)
	logPath := fs.String("log", "", "append one line per job")
	gate := fs.String("gate", "", "FIFO to read one byte from before each answer")
	delay := fs.Duration("delay", 0, "render time")
	caches := fs.String("caches", "", "JSON object for the ready line's caches")
	noReady := fs.Bool("no-ready", false, "exit 2 without a ready line")
	stderrLines := fs.Int("stderr-lines", 0, "write this many numbered lines to stderr first")
	crash := fs.Int("crash", -1, "x that makes the renderer exit")
	hang := fs.Int("hang", -1, "x that makes the renderer hang")
	stall := fs.Int("stall", -1, "x that the renderer never answers; it exits when its stdin ends")
	garbage := fs.Int("garbage", -1, "x that makes the renderer write garbage")
	fail := fs.Int("fail", -1, "x that makes the renderer answer error")
	skip := fs.Int("skip", -1, "x that the renderer answers ok with \"skipped\": true")
	exitAfter := fs.Int("exit-after", 0, "exit (while idle) after answering this many jobs")
	startOnce := fs.String("start-once", "", "start only if this file does not exist, and create it")
	readyGate := fs.String("ready-gate", "", "FIFO to read one byte from before the ready line")
	envLog := fs.String("env-log", "", "append what this process inherited (see writeEnvLog)")
	failMod := fs.Int("fail-mod", 0, "answer error for every x divisible by this")
	flaky := fs.String("flaky", "", "directory: fail a tile's first job, answer ok after that")
	jobLines := fs.String("job-lines", "", "append every job line as received")
	stampLog := fs.String("stamp-log", "", `append "unix-ns cache z x y" per job as it arrives (rate tests)`)
	overload := fs.String("overload-file", "", "while this file exists, answer every job error with upstream_status 503")
	retryAfter := fs.Float64("retry-after", 0, "with -overload-file: the retry_after of the 503 replies")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if *envLog != "" && writeEnvLog(*envLog) != nil {
		return 2
	}
	for i := 1; i <= *stderrLines; i++ {
		fmt.Fprintf(os.Stderr, "fake renderer: stderr line %d\n", i)
	}
	if *startOnce != "" {
		f, err := os.OpenFile(*startOnce, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o644)
		if err != nil {
			fmt.Fprintln(os.Stderr, "fake renderer: started before; refusing to start again")
			return 2
		}
		f.Close()
	}
	if *noReady {
		fmt.Fprintln(os.Stderr, "fake renderer: refusing to start")
		return 2
	}
	var gateF *os.File
	if *gate != "" {
		f, err := os.OpenFile(*gate, os.O_RDONLY, 0)
		if err != nil {
			fmt.Fprintln(os.Stderr, "gate:", err)
			return 2
		}
		gateF = f
	}
	var logF *os.File
	if *logPath != "" {
		f, err := os.OpenFile(*logPath, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o644)
		if err != nil {
			return 2
		}
		logF = f
	}
	if *readyGate != "" {
		f, err := os.OpenFile(*readyGate, os.O_RDONLY, 0)
		if err == nil {
			_, err = f.Read(make([]byte, 1))
			f.Close()
		}
		if err != nil {
			fmt.Fprintln(os.Stderr, "ready gate:", err)
			return 2
		}
	}
	out := bufio.NewWriter(os.Stdout)
	ready := `{"ready": true}`
	if *caches != "" {
		ready = `{"ready": true, "caches": ` + *caches + `}`
	}
	fmt.Fprintln(out, ready)
	out.Flush()
	in := bufio.NewScanner(os.Stdin)
	in.Buffer(make([]byte, 64<<10), 4<<20)
	for in.Scan() {
		var j struct {
			ID              string     `json:"id"`
			Command         string     `json:"command"`
			CacheIdentifier string     `json:"cache_identifier"`
			Tiles           [][3]int64 `json:"tiles"`
		}
		if err := json.Unmarshal(in.Bytes(), &j); err != nil || len(j.Tiles) != 1 {
			fmt.Fprintf(out, `{"id": %q, "status": "error", "error_message": "bad job"}`+"\n", j.ID)
			out.Flush()
			continue
		}
		x, y, z := j.Tiles[0][0], j.Tiles[0][1], j.Tiles[0][2]
		if *jobLines != "" {
			appendLine(*jobLines, in.Text())
		}
		if *stampLog != "" {
			appendLine(*stampLog, fmt.Sprintf("%d %s %d %d %d", time.Now().UnixNano(), j.CacheIdentifier, z, x, y))
		}
		upstream503 := false
		if *overload != "" {
			_, err := os.Stat(*overload)
			upstream503 = err == nil
		}
		flakyFail := false
		if *flaky != "" {
			f, err := os.OpenFile(fmt.Sprintf("%s/%s-%d-%d-%d", *flaky, j.CacheIdentifier, z, x, y), os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o644)
			if err == nil {
				f.Close()
				flakyFail = true
			}
		}
		if logF != nil {
			if j.Command == "delete" { // an expiry run's delete job (docs/design.md §11)
				fmt.Fprintf(logF, "%d %s %d %d %d delete\n", os.Getpid(), j.CacheIdentifier, z, x, y)
			} else {
				fmt.Fprintf(logF, "%d %s %d %d %d\n", os.Getpid(), j.CacheIdentifier, z, x, y)
			}
		}
		if gateF != nil {
			var b [1]byte
			if _, err := gateF.Read(b[:]); err != nil {
				return 4
			}
		}
		if *delay > 0 {
			time.Sleep(*delay) // the simulated render
		}
		switch {
		case int(x) == *stall:
			for in.Scan() { // the daemon's jobs go unanswered until it is gone
			}
			return 0
		case upstream503:
			ra := ""
			if *retryAfter > 0 {
				ra = fmt.Sprintf(`, "retry_after": %g`, *retryAfter)
			}
			fmt.Fprintf(out, `{"id": %q, "status": "error", "error_message": "HTTP Error: 503", "upstream_status": 503%s}`+"\n", j.ID, ra)
		case flakyFail:
			fmt.Fprintf(out, `{"id": %q, "status": "error", "error_message": "flaky first try"}`+"\n", j.ID)
		case *failMod > 0 && int(x)%*failMod == 0:
			fmt.Fprintf(out, `{"id": %q, "status": "error", "error_message": "fake failure for x=%d"}`+"\n", j.ID, x)
		case int(x) == *skip:
			fmt.Fprintf(out, `{"id": %q, "status": "ok", "skipped": true}`+"\n", j.ID)
		default:
			fakeAnswer(out, j.ID, int(x), *crash, *hang, *garbage, *fail)
		}
		out.Flush()
		if *exitAfter--; *exitAfter == 0 {
			return 0
		}
	}
	return 0
}

// fakeAnswer writes the fake renderer's answer for tile column x.
func fakeAnswer(out *bufio.Writer, id string, x, crash, hang, garbage, fail int) {
	switch x {
	case crash:
		fmt.Fprintln(os.Stderr, "fake renderer: crashing on purpose")
		os.Exit(3)
	case hang:
		select {}
	case garbage:
		fmt.Fprintln(out, "this is not json")
	case fail:
		fmt.Fprintf(out, `{"id": %q, "status": "error", "error_message": "fake failure for x=%d"}`+"\n", id, x)
	default:
		fmt.Fprintf(out, `{"id": %q, "status": "ok"}`+"\n", id)
	}
}

// envLogLine is what a fake renderer inherited: the systemd variables that are set, and
// its open descriptors above stderr that are sockets.
type envLogLine struct {
	PID       int               `json:"pid"`
	Env       map[string]string `json:"env"`
	SocketFDs []string          `json:"socket_fds"`
}

// writeEnvLog appends this process's envLogLine to path. It runs first thing, before the
// renderer opens anything itself.
func writeEnvLog(path string) error {
	l := envLogLine{PID: os.Getpid(), Env: map[string]string{}, SocketFDs: []string{}}
	for _, k := range []string{"LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"} {
		if v, ok := os.LookupEnv(k); ok {
			l.Env[k] = v
		}
	}
	fds, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		return err
	}
	for _, fd := range fds {
		if n, err := strconv.Atoi(fd.Name()); err != nil || n <= 2 {
			continue
		}
		if target, err := os.Readlink("/proc/self/fd/" + fd.Name()); err == nil && strings.HasPrefix(target, "socket:") {
			l.SocketFDs = append(l.SocketFDs, fd.Name()+" -> "+target)
		}
	}
	b, _ := json.Marshal(l)
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o644)
	if err != nil {
		return err
	}
	_, err = f.Write(append(b, '\n'))
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}

// testDaemon is a daemon started with run() in this process.
type testDaemon struct {
	t      testing.TB
	dir    string
	socket string
	tcp    string
	log    string // fake renderer job log
	gate   *os.File
	stderr *syncBuffer
	cancel context.CancelFunc
	done   chan error
}

type daemonOpts struct {
	renderers  int
	maxSeed    int // -1: no reservation
	extraYAML  string
	rendArgs   []string // extra fake renderer flags
	gate       bool
	tcp        bool
	noWaitUp   bool
	mapproxyFn string
}

// syncBuffer is an io.Writer safe for concurrent use, for the daemon's log.
type syncBuffer struct {
	mu sync.Mutex
	b  strings.Builder
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// shortTempDir returns a temp dir with a path short enough for a Unix socket.
func shortTempDir(t testing.TB) string {
	dir, err := os.MkdirTemp("", "mrd")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

func freeTCPAddr(t testing.TB) string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

func (o daemonOpts) rendererCommand(d *testDaemon) []string {
	cmd := []string{os.Args[0], "fake-renderer", "-log", d.log}
	if d.gate != nil {
		cmd = append(cmd, "-gate", d.dir+"/gate")
	}
	return append(cmd, o.rendArgs...)
}

func (o daemonOpts) configYAML(d *testDaemon) string {
	if o.renderers == 0 {
		o.renderers = 2
	}
	cmd, _ := json.Marshal(o.rendererCommand(d))
	y := fmt.Sprintf("socket: %s\nhttp: %q\nrenderers: %d\nrenderer_command: %s\nstop_timeout: 20s\n",
		d.socket, d.tcp, o.renderers, cmd)
	if o.maxSeed >= 0 {
		y += fmt.Sprintf("max_seed_renderers: %d\n", o.maxSeed)
	}
	if !strings.Contains(o.extraYAML, "state_dir:") {
		y += fmt.Sprintf("state_dir: %s/state\n", d.dir) // never the shared default
	}
	return y + o.extraYAML
}

func newTestDaemon(t testing.TB, o daemonOpts) *testDaemon {
	t.Helper()
	noRaceExitSleep(t) // renderers exit often; the race detector's exit sleep would slow every stop
	dir := shortTempDir(t)
	d := &testDaemon{t: t, dir: dir, socket: dir + "/s.sock", log: dir + "/jobs.log", stderr: &syncBuffer{}}
	if o.tcp {
		d.tcp = freeTCPAddr(t)
	}
	if o.gate {
		if err := syscall.Mkfifo(dir+"/gate", 0o600); err != nil {
			t.Fatal(err)
		}
		// O_RDWR: opening does not block, and the renderers never see EOF while we hold it.
		g, err := os.OpenFile(dir+"/gate", os.O_RDWR, 0)
		if err != nil {
			t.Fatal(err)
		}
		d.gate = g
		t.Cleanup(func() { g.Close() })
	}
	cfgPath := filepath.Join(dir, "renderd.yaml")
	if err := os.WriteFile(cfgPath, []byte(o.configYAML(d)), 0o644); err != nil {
		t.Fatal(err)
	}
	args := []string{"-c", cfgPath}
	if o.mapproxyFn != "" {
		args = append(args, "-f", o.mapproxyFn)
	}
	ctx, cancel := context.WithCancel(context.Background())
	d.cancel = cancel
	d.done = make(chan error, 1)
	go func() { d.done <- run(ctx, args, io.Discard, d.stderr) }()
	t.Cleanup(func() {
		d.stop()
		if t.Failed() {
			t.Logf("daemon log:\n%s", d.stderr.String())
		}
	})
	if !o.noWaitUp {
		d.waitUp()
	}
	return d
}

// waitUp waits until the daemon answers ping, or fails the test at a deadline.
func (d *testDaemon) waitUp() {
	d.t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		select {
		case err := <-d.done:
			d.done <- err
			d.t.Fatalf("daemon exited during start: %v\n%s", err, d.stderr.String())
		default:
		}
		c, err := net.Dial("unix", d.socket)
		if err == nil {
			cl := &client{t: d.t, c: c, r: bufio.NewReader(c)}
			cl.send(`{"command":"ping","id":"up"}`)
			if r := cl.read(); r.Status == statusOK {
				c.Close()
				return
			}
			c.Close()
		}
		if time.Now().After(deadline) {
			d.t.Fatalf("daemon not up within 30s: %v\n%s", err, d.stderr.String())
		}
		time.Sleep(20 * time.Millisecond) // polling for start-up, bounded by the deadline
	}
}

// stop cancels the daemon and waits for run to return.
func (d *testDaemon) stop() error {
	d.cancel()
	select {
	case err := <-d.done:
		d.done <- err
		return err
	case <-time.After(60 * time.Second):
		d.t.Errorf("daemon did not stop within 60s")
		return nil
	}
}

// release lets n gated renders finish.
func (d *testDaemon) release(n int) {
	d.t.Helper()
	if _, err := d.gate.Write(make([]byte, n)); err != nil {
		d.t.Fatal(err)
	}
}

// jobLog returns the fake renderers' job log lines.
func (d *testDaemon) jobLog() []string {
	b, err := os.ReadFile(d.log)
	if err != nil && !os.IsNotExist(err) {
		d.t.Fatal(err)
	}
	s := strings.TrimSpace(string(b))
	if s == "" {
		return nil
	}
	return strings.Split(s, "\n")
}

func (d *testDaemon) dial() *client {
	d.t.Helper()
	c, err := net.Dial("unix", d.socket)
	if err != nil {
		d.t.Fatal(err)
	}
	d.t.Cleanup(func() { c.Close() })
	return &client{t: d.t, c: c, r: bufio.NewReaderSize(c, 1<<20)}
}

// status returns the status document.
func (d *testDaemon) status() statusDoc {
	d.t.Helper()
	cl := d.dial()
	defer cl.c.Close()
	cl.send(`{"command":"status","id":"st"}`)
	r := cl.read()
	var doc statusDoc
	if r.Status != statusOK || json.Unmarshal(r.Stats, &doc) != nil {
		d.t.Fatalf("status: got %+v", r)
	}
	return doc
}

// waitFor polls the status document until cond holds, failing at a deadline.
func (d *testDaemon) waitFor(what string, cond func(statusDoc) bool) statusDoc {
	d.t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		doc := d.status()
		if cond(doc) {
			return doc
		}
		if time.Now().After(deadline) {
			b, _ := json.MarshalIndent(doc, "", " ")
			d.t.Fatalf("timed out waiting for %s; status:\n%s", what, b)
		}
		time.Sleep(5 * time.Millisecond) // polling the daemon's state, bounded by the deadline
	}
}

// client is a native-protocol test client.
type client struct {
	t testing.TB
	c net.Conn
	r *bufio.Reader
}

func (c *client) send(line string) {
	c.t.Helper()
	if _, err := io.WriteString(c.c, line+"\n"); err != nil {
		c.t.Fatal(err)
	}
}

// read reads one reply, failing the test after 30 s.
func (c *client) read() Reply {
	c.t.Helper()
	c.c.SetReadDeadline(time.Now().Add(30 * time.Second))
	line, err := c.r.ReadBytes('\n')
	if err != nil {
		c.t.Fatalf("read reply: %v (got %q)", err, line)
	}
	var r Reply
	if err := json.Unmarshal(line, &r); err != nil {
		c.t.Fatalf("reply is not JSON: %q", line)
	}
	return r
}

func tileReq(id, cache string, x, y, z, prio int) string {
	return fmt.Sprintf(`{"command":"tile","id":%q,"cache_identifier":%q,"tiles":[[%d,%d,%d]],"priority":%d}`, id, cache, x, y, z, prio)
}

func idOf(r Reply) string {
	if r.ID == nil {
		return "<nil>"
	}
	return *r.ID
}

func signalContext() (context.Context, context.CancelFunc) {
	return signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
}

// appendLine appends one line to a file (fake programs' logs).
func appendLine(path, line string) {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o644)
	if err != nil {
		return
	}
	fmt.Fprintln(f, line)
	f.Close()
}

// fakePlanner is a planner for tests (docs/design.md §10's planner protocol). It reads the spec
// line, logs it to -log, and for kind seed emits -n metatiles of cache -cache at zoom -z
// with x = 0, 1, … (y = 0), each with its walk progress; for kind cleanup it reports -n
// removed tiles in steps. -crash-after K exits 3 after K metatiles (with a stderr line),
// -error MSG answers an error line and exits 1.
func fakePlanner(args []string) int {
	fs := flag.NewFlagSet("fake-planner", flag.ContinueOnError)
	n := fs.Int("n", 10, "metatiles to plan")
	cache := fs.String("cache", "c", "cache identifier")
	z := fs.Int("z", 20, "zoom of the metatiles")
	logPath := fs.String("log", "", "append the spec line here")
	crashAfter := fs.Int("crash-after", -1, "exit 3 after this many metatiles")
	errMsg := fs.String("error", "", "answer this error")
	refreshBefore := fs.Float64("refresh-before", 0, "refresh_before of every metatile")
	xStep := fs.Int("x-step", 1, "metatile i is at x = i·step (one metatile per tile of a 4×4 metatile cache: 4)")
	offsets := fs.String("x-offset", "", "NAME=N,…: the task named NAME plans from x = N (two tasks, different tiles)")
	cursorEvery := fs.Int("cursor-every", 0, `write {"cursor": {"next": i}} before every K-th metatile; resume from such a cursor`)
	width := fs.Int("width", 0, "plan 4×4 metatiles in rows of this many (docs/picture.sh); 0: tiles [i, 0, z]")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	in := bufio.NewReader(os.Stdin)
	spec, err := in.ReadString('\n')
	if err != nil {
		fmt.Fprintln(os.Stderr, "fake planner: no spec:", err)
		return 2
	}
	if *logPath != "" {
		appendLine(*logPath, strings.TrimSpace(spec))
	}
	var s taskSpec
	if err := json.Unmarshal([]byte(spec), &s); err != nil {
		fmt.Fprintln(os.Stderr, "fake planner: bad spec:", err)
		return 2
	}
	out := bufio.NewWriterSize(os.Stdout, 64<<10)
	defer out.Flush()
	if *errMsg != "" {
		fmt.Fprintf(out, "{\"error\": %q}\n", *errMsg)
		return 1
	}
	fmt.Fprintf(out, "{\"tasks\": [{\"cache_identifier\": %q, \"levels\": [%d]}]}\n", *cache, *z)
	if s.Kind == "cleanup" {
		for i := 1; i <= *n; i++ {
			fmt.Fprintf(out, "{\"removed\": %d, \"progress\": %g}\n", i, float64(i)/float64(*n))
		}
		fmt.Fprintf(out, "{\"done\": true, \"removed\": %d}\n", *n)
		return 0
	}
	rb := ""
	if *refreshBefore > 0 {
		rb = fmt.Sprintf(", \"refresh_before\": %g", *refreshBefore)
	}
	first := 0
	if len(s.Cursor) > 0 {
		var c struct{ Next int }
		if json.Unmarshal(s.Cursor, &c) != nil {
			fmt.Fprintln(os.Stderr, "fake planner: bad cursor:", string(s.Cursor))
			return 2
		}
		first = c.Next
	}
	x0 := 0
	for _, kv := range strings.Split(*offsets, ",") {
		if name, off, ok := strings.Cut(kv, "="); ok && name == s.Name {
			x0, _ = strconv.Atoi(off)
		}
	}
	for i := first; i < *n; i++ {
		if *cursorEvery > 0 && i%*cursorEvery == 0 {
			fmt.Fprintf(out, "{\"cursor\": {\"next\": %d}, \"progress\": %g}\n", i, float64(i)/float64(*n))
		}
		if i == *crashAfter {
			out.Flush()
			fmt.Fprintln(os.Stderr, "fake planner: Traceback: something broke on purpose")
			return 3
		}
		x, y := x0+i**xStep, 0
		if *width > 0 {
			x, y = i%*width*4, i / *width * 4
		}
		fmt.Fprintf(out, "{\"cache_identifier\": %q, \"tile\": [%d, %d, %d], \"progress\": %g%s}\n", *cache, x, y, *z, float64(i+1)/float64(*n), rb)
	}
	fmt.Fprintln(out, `{"done": true}`)
	return 0
}

// runConfiguredDaemon runs the real daemon (run) with args, logging to log, answering on the
// Unix socket; it returns once the daemon answers ping. At cleanup it stops it, fails the
// test if it does not stop within 90 s or returns an error, and shows the end of its log
// when the test failed.
func runConfiguredDaemon(t *testing.T, socket string, log *syncBuffer, args ...string) *testDaemon {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- run(ctx, args, io.Discard, log) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("daemon: %v", err)
			}
		case <-time.After(90 * time.Second):
			t.Errorf("daemon did not stop")
		}
		if t.Failed() {
			t.Logf("daemon log (tail):\n%s", tail(log.String(), 6000))
		}
	})
	d := &testDaemon{t: t, socket: socket, done: done, stderr: log, cancel: cancel}
	d.waitUp()
	return d
}

// startTestGroup starts cmd in a process group of its own and ends the group when the test
// ends: SIGTERM, then SIGKILL after grace, the wait bounded; onFailure runs after that when
// the test failed (logs to show). The channel it returns is closed when cmd has exited.
func startTestGroup(t *testing.T, cmd *exec.Cmd, grace time.Duration, onFailure func()) <-chan struct{} {
	t.Helper()
	if cmd.SysProcAttr == nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{}
	}
	cmd.SysProcAttr.Setpgid = true
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	t.Cleanup(func() {
		syscall.Kill(-cmd.Process.Pid, syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(grace):
			syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
			<-exited
		}
		if t.Failed() && onFailure != nil {
			onFailure()
		}
	})
	return exited
}

// pollUntil polls cond until it holds, failing after a generous deadline.
func pollUntil(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(3 * time.Minute)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(20 * time.Millisecond) // polling, bounded by the deadline
	}
}
