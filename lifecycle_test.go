// SPDX-License-Identifier: Apache-2.0

package main

// Lifecycle tests (docs/design.md §7–§8): the real daemon as a child process — started by
// systemd-socket-activate or with fds passed the way systemd passes them, reloaded with
// SIGHUP under load, stopped with SIGTERM — with a unixgram socket standing in for
// systemd's NOTIFY_SOCKET; and the connection guards (allow-list, max_connections).

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// lcDeadline bounds every wait in these tests; nothing normally comes near it.
const lcDeadline = 30 * time.Second

// lcExecutable is the test binary, which plays the daemon and the fake renderer.
func lcExecutable(t *testing.T) string {
	t.Helper()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	return exe
}

// lcEnv is the test's environment without anything systemd might have set for the test
// itself, with the race detector's exit sleep dropped (children exit often), plus extra.
func lcEnv(extra ...string) []string {
	var env []string
	for _, kv := range os.Environ() {
		k, _, _ := strings.Cut(kv, "=")
		switch k {
		case "LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID":
			continue
		}
		env = append(env, kv)
	}
	return append(append(env, sdHelperGORACE()), extra...)
}

// noRaceExitSleep spares the renderers of an in-process daemon the race detector's sleep
// at exit, which would make stopping the daemon take a second.
func noRaceExitSleep(t testing.TB) {
	v, _ := strings.CutPrefix(sdHelperGORACE(), "GORACE=")
	t.Setenv("GORACE", v)
}

// lcLog collects a child's output and lets the test wait for a piece of it.
type lcLog struct {
	mu      sync.Mutex
	b       strings.Builder
	changed chan struct{} // closed (and replaced) by every write
}

func newLCLog() *lcLog { return &lcLog{changed: make(chan struct{})} }

func (l *lcLog) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.b.Write(p)
	close(l.changed)
	l.changed = make(chan struct{})
	return len(p), nil
}

func (l *lcLog) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// waitFor waits until the output contains substr at least n times.
func (l *lcLog) waitFor(t *testing.T, substr string, n int) {
	t.Helper()
	timer := time.NewTimer(lcDeadline)
	defer timer.Stop()
	for {
		l.mu.Lock()
		got, changed := strings.Count(l.b.String(), substr), l.changed
		l.mu.Unlock()
		if got >= n {
			return
		}
		select {
		case <-changed:
		case <-timer.C:
			t.Fatalf("timed out waiting for %d× %q in the output:\n%s", n, substr, l.String())
		}
	}
}

// lcProc is a child process (the daemon, directly or through a wrapper).
type lcProc struct {
	t    *testing.T
	cmd  *exec.Cmd
	out  *lcLog // stdout and stderr
	done chan struct{}
	err  error // Wait's result, written before done is closed
}

func startLCProc(t *testing.T, argv, env []string, files []*os.File) *lcProc {
	t.Helper()
	p := &lcProc{t: t, cmd: exec.Command(argv[0], argv[1:]...), out: newLCLog(), done: make(chan struct{})}
	p.cmd.Env = env
	p.cmd.Stdout, p.cmd.Stderr = p.out, p.out
	p.cmd.ExtraFiles = files
	p.cmd.WaitDelay = 5 * time.Second
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		p.err = p.cmd.Wait()
		close(p.done)
	}()
	t.Cleanup(func() {
		select {
		case <-p.done:
		default:
			p.cmd.Process.Signal(syscall.SIGTERM)
			select {
			case <-p.done:
			case <-time.After(15 * time.Second):
				p.cmd.Process.Kill()
				<-p.done
			}
		}
		if t.Failed() {
			t.Logf("%s output:\n%s", filepath.Base(argv[0]), p.out.String())
		}
	})
	return p
}

func (p *lcProc) signal(sig os.Signal) {
	p.t.Helper()
	if err := p.cmd.Process.Signal(sig); err != nil {
		p.t.Fatalf("signal %v: %v", sig, err)
	}
}

// wait waits at most d for the process to exit and returns Wait's error.
func (p *lcProc) wait(d time.Duration) error {
	p.t.Helper()
	select {
	case <-p.done:
		return p.err
	case <-time.After(d):
		p.t.Fatalf("process did not exit within %s", d)
		return nil
	}
}

// lcNotify is a unixgram socket standing in for systemd's NOTIFY_SOCKET. It records every
// datagram in order.
type lcNotify struct {
	t    *testing.T
	path string
	conn *net.UnixConn
	seen []string
	proc *lcProc // the daemon, when known: a failed wait says whether it died
}

func newLCNotify(t *testing.T, path string) *lcNotify {
	t.Helper()
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return &lcNotify{t: t, path: path, conn: conn}
}

// read returns the next datagram, or an error at the deadline.
func (n *lcNotify) read(deadline time.Time) (string, error) {
	buf := make([]byte, 4096)
	n.conn.SetReadDeadline(deadline)
	k, err := n.conn.Read(buf)
	if err != nil {
		return "", err
	}
	msg := string(buf[:k])
	n.seen = append(n.seen, msg)
	return msg, nil
}

// expect reads datagrams until one has a line starting with prefix and returns it.
func (n *lcNotify) expect(prefix string) string {
	n.t.Helper()
	deadline := time.Now().Add(lcDeadline)
	for {
		msg, err := n.read(deadline)
		if err != nil {
			exit := "still running"
			if n.proc != nil {
				select {
				case <-n.proc.done:
					exit = fmt.Sprintf("exited: %v", n.proc.err)
				default:
				}
			}
			n.t.Fatalf("waiting for %q from the daemon (%s): %v; got so far %q", prefix, exit, err, n.seen)
		}
		if notifyLine(msg, prefix) != "" {
			return msg
		}
	}
}

// none fails if a datagram with a line starting with prefix arrives within d.
func (n *lcNotify) none(prefix string, d time.Duration) {
	n.t.Helper()
	deadline := time.Now().Add(d)
	for {
		msg, err := n.read(deadline)
		if errors.Is(err, os.ErrDeadlineExceeded) {
			return
		}
		if err != nil {
			n.t.Fatal(err)
		}
		if notifyLine(msg, prefix) != "" {
			n.t.Fatalf("got %q too early (all so far: %q)", msg, n.seen)
		}
	}
}

// order returns the states among want in the order they were received, e.g.
// [READY=1 RELOADING=1 READY=1 STOPPING=1]; STATUS= and other lines are left out.
func (n *lcNotify) order(want ...string) []string {
	var got []string
	for _, msg := range n.seen {
		for _, line := range strings.Split(msg, "\n") {
			if slices.Contains(want, line) {
				got = append(got, line)
			}
		}
	}
	return got
}

// notifyLine returns the line of an sd_notify datagram that starts with prefix, or "".
func notifyLine(msg, prefix string) string {
	for _, line := range strings.Split(msg, "\n") {
		if strings.HasPrefix(line, prefix) {
			return line
		}
	}
	return ""
}

// lcFIFO makes a FIFO and holds it open read-write: the renderers reading it never see
// EOF while the test runs, and the test writes one byte per renderer it lets go.
func lcFIFO(t *testing.T, path string) *os.File {
	t.Helper()
	if err := syscall.Mkfifo(path, 0o600); err != nil {
		t.Fatal(err)
	}
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f
}

// lcConfig is a renderd.yaml for the daemon under test.
func lcConfig(t *testing.T, path, socket, tcp string, renderers int, rendCmd []string, extra string) {
	t.Helper()
	cmd, _ := json.Marshal(rendCmd)
	y := fmt.Sprintf("socket: %s\nhttp: %q\nrenderers: %d\nrenderer_command: %s\n", socket, tcp, renderers, cmd)
	if !strings.Contains(extra, "state_dir:") {
		y += fmt.Sprintf("state_dir: %s/state\n", filepath.Dir(path)) // never the shared default
	}
	if err := os.WriteFile(path, []byte(y+extra), 0o644); err != nil {
		t.Fatal(err)
	}
}

// twoFreeTCPAddrs returns two different free loopback addresses.
func twoFreeTCPAddrs(t *testing.T) (string, string) {
	t.Helper()
	a := freeTCPAddr(t)
	for {
		if b := freeTCPAddr(t); b != a {
			return a, b
		}
	}
}

// readEnvLog returns the fake renderers' env log lines (one per process start).
func readEnvLog(t *testing.T, path string) []envLogLine {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil && !os.IsNotExist(err) {
		t.Fatal(err)
	}
	var out []envLogLine
	for _, line := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		if line == "" {
			continue
		}
		var l envLogLine
		if err := json.Unmarshal([]byte(line), &l); err != nil {
			t.Fatalf("env log line %q: %v", line, err)
		}
		out = append(out, l)
	}
	return out
}

// waitEnvLog waits (polling the file, bounded) until n renderer processes have started.
func waitEnvLog(t *testing.T, path string, n int) []envLogLine {
	t.Helper()
	deadline := time.Now().Add(lcDeadline)
	for {
		if ls := readEnvLog(t, path); len(ls) >= n {
			return ls
		}
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %d renderer starts in %s; got %d", n, path, len(readEnvLog(t, path)))
		}
		time.Sleep(5 * time.Millisecond) // polling a file, bounded by the deadline
	}
}

// checkRenderersInheritedNothing: no renderer saw systemd's variables or a socket fd.
func checkRenderersInheritedNothing(t *testing.T, ls []envLogLine) {
	t.Helper()
	for _, l := range ls {
		if len(l.Env) > 0 || len(l.SocketFDs) > 0 {
			t.Errorf("renderer pid %d inherited env %v and socket fds %v; want neither", l.PID, l.Env, l.SocketFDs)
		}
	}
}

// lcDial connects to a daemon, retrying while the socket is not there yet (start-up).
func lcDial(t *testing.T, network, addr string) *client {
	t.Helper()
	deadline := time.Now().Add(lcDeadline)
	for {
		c, err := net.DialTimeout(network, addr, lcDeadline)
		if err == nil {
			t.Cleanup(func() { c.Close() })
			return &client{t: t, c: c, r: bufio.NewReaderSize(c, 1<<20)}
		}
		if (!errors.Is(err, syscall.ENOENT) && !errors.Is(err, syscall.ECONNREFUSED)) || time.Now().After(deadline) {
			t.Fatalf("dial %s %s: %v", network, addr, err)
		}
		time.Sleep(5 * time.Millisecond) // waiting for the socket to appear, bounded by the deadline
	}
}

// expectReply reads one reply and checks its id and status.
func (c *client) expectReply(id, status string) Reply {
	c.t.Helper()
	r := c.read()
	if idOf(r) != id || r.Status != status {
		c.t.Fatalf("got %+v, want id %s status %s", r, id, status)
	}
	return r
}

// expectEOF checks that the daemon closed the connection with nothing more to say.
func (c *client) expectEOF() {
	c.t.Helper()
	c.c.SetReadDeadline(time.Now().Add(lcDeadline))
	if rest, err := io.ReadAll(c.r); err != nil || len(rest) > 0 {
		c.t.Fatalf("want EOF, got %q, %v", rest, err)
	}
}

// postMapProxyOn sends MapProxy 1.15's POST over any stream connection and returns the reply.
func postMapProxyOn(t *testing.T, network, addr string, x, y, z int) map[string]any {
	t.Helper()
	c, err := net.DialTimeout(network, addr, lcDeadline)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	body := mapproxyBody(cacheID, x, y, z, 100)
	fmt.Fprintf(c, "POST / HTTP/1.1\r\nHost: localhost\r\nUser-Agent: python-requests/2.28.1\r\nAccept: */*\r\nConnection: keep-alive\r\nContent-Length: %d\r\n\r\n%s", len(body), body)
	c.SetReadDeadline(time.Now().Add(lcDeadline))
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatalf("HTTP over %s: %v", network, err)
	}
	defer resp.Body.Close()
	var out map[string]any
	if resp.StatusCode != 200 || json.NewDecoder(resp.Body).Decode(&out) != nil {
		t.Fatalf("HTTP over %s: got %d, want 200 with a JSON body", network, resp.StatusCode)
	}
	return out
}

// checkNotListening: nobody accepts connections at addr (the configured socket or port
// that socket activation must leave alone).
func checkNotListening(t *testing.T, network, addr string) {
	t.Helper()
	if network == "unix" {
		if _, err := os.Lstat(addr); !os.IsNotExist(err) {
			t.Errorf("configured socket %s: Lstat = %v, want it never created", addr, err)
		}
		return
	}
	if c, err := net.DialTimeout(network, addr, 5*time.Second); err == nil {
		c.Close()
		t.Errorf("configured address %s accepts connections; want nothing listening", addr)
	}
}

// TestSocketActivationWithSystemdTool runs the real daemon the way systemd does, through
// systemd-socket-activate (which listens, and on the first connection execs the daemon with
// LISTEN_FDS/LISTEN_PID/LISTEN_FDNAMES, the sockets on fds 3 and 4): both inherited sockets
// serve the native protocol and MapProxy's HTTP, the configured socket and port stay
// unbound, READY=1 comes only after the renderers' ready lines and STOPPING=1 at SIGTERM,
// the renderers inherit neither the fds nor the variables, and the daemon exits 0.
func TestSocketActivationWithSystemdTool(t *testing.T) {
	tool, err := exec.LookPath("systemd-socket-activate")
	if err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatal("systemd-socket-activate is missing (CI installs systemd)")
		}
		t.Skip("systemd-socket-activate not installed")
	}
	exe := lcExecutable(t)
	dir := shortTempDir(t)
	actSock, cfgSock := dir+"/activated.sock", dir+"/configured.sock"
	actTCP, cfgTCP := twoFreeTCPAddrs(t)
	notify := newLCNotify(t, dir+"/notify")
	readyGate := lcFIFO(t, dir+"/ready-gate")
	envLog, jobLog := dir+"/env.log", dir+"/jobs.log"
	lcConfig(t, dir+"/renderd.yaml", cfgSock, cfgTCP, 2,
		[]string{exe, "fake-renderer", "-log", jobLog, "-env-log", envLog, "-ready-gate", dir + "/ready-gate"},
		"stop_timeout: 10s\n")

	// Without --accept the tool execs the daemon itself (same pid) on the first connection.
	// Its environment for the daemon is only what -E names (plus PATH, HOME, …).
	p := startLCProc(t, []string{tool, "-l", actSock, "-l", actTCP, "--fdname=native:mapproxy",
		"-E", "NOTIFY_SOCKET=" + notify.path, "-E", sdHelperGORACE(),
		exe, "daemon", "-c", dir + "/renderd.yaml"}, lcEnv(), nil)
	notify.proc = p
	// The tool opens every socket before it waits for a connection: once this one connects,
	// the TCP socket is there too.
	first := lcDial(t, "unix", actSock)
	first.send(`{"command":"ping","id":"first"}`)
	notify.expect("STATUS=starting 2 renderers")
	// Both renderers run and wait at the ready gate: no READY=1 yet, nothing accepted yet.
	started := waitEnvLog(t, envLog, 2)
	checkRenderersInheritedNothing(t, started)
	notify.none("READY=1", 300*time.Millisecond)
	first.c.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
	if line, err := first.r.ReadBytes('\n'); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("before the renderers were ready: read %q, %v; want no reply yet", line, err)
	}
	if _, err := readyGate.Write([]byte{1, 1}); err != nil {
		t.Fatal(err)
	}
	notify.expect("READY=1")
	first.expectReply("first", statusOK)

	// Native requests and MapProxy's POST on both inherited sockets.
	first.send(tileReq("unix", cacheID, 1, 0, 5, 100))
	first.expectReply("unix", statusOK)
	tc := lcDial(t, "tcp", actTCP)
	tc.send(tileReq("tcp", cacheID, 2, 0, 5, 100))
	tc.expectReply("tcp", statusOK)
	if got := postMapProxyOn(t, "tcp", actTCP, 3, 0, 5); got["status"] != "ok" {
		t.Errorf("HTTP POST on the inherited TCP socket: got %v, want ok", got)
	}
	if got := postMapProxyOn(t, "unix", actSock, 4, 0, 5); got["status"] != "ok" {
		t.Errorf("HTTP POST on the inherited Unix socket: got %v, want ok", got)
	}
	d := &testDaemon{t: t, socket: actSock, log: jobLog}
	if n := len(d.jobLog()); n != 4 {
		t.Errorf("renders: got %d, want 4", n)
	}
	checkNotListening(t, "unix", cfgSock)
	checkNotListening(t, "tcp", cfgTCP)
	if out := p.out.String(); !strings.Contains(out, "socket activation: using inherited listeners") || !strings.Contains(out, "count=2") {
		t.Errorf("log does not say that 2 inherited listeners are used:\n%s", out)
	}

	p.signal(syscall.SIGTERM)
	notify.expect("STOPPING=1")
	if err := p.wait(lcDeadline); err != nil {
		t.Fatalf("daemon exit: %v, want status 0", err)
	}
	if got, want := notify.order("READY=1", "STOPPING=1", "RELOADING=1"), []string{"READY=1", "STOPPING=1"}; !slices.Equal(got, want) {
		t.Errorf("notify states: got %q, want %q", got, want)
	}
	if !strings.HasPrefix(notify.seen[0], "STATUS=starting") {
		t.Errorf("first notification: got %q, want STATUS=starting …", notify.seen[0])
	}
	// The socket belongs to whoever made it (systemd): the daemon leaves the path alone.
	if fi, err := os.Lstat(actSock); err != nil || fi.Mode().Type() != os.ModeSocket {
		t.Errorf("activated socket path after exit: %v, want it still there", err)
	}
	checkNotListening(t, "unix", cfgSock)
	checkRenderersInheritedNothing(t, readEnvLog(t, envLog))
}

// TestActivationFDPassingEdgeCases starts the daemon with listeners in ExtraFiles and
// LISTEN_FDS, as systemd would: TCP first then Unix is served as well as the usual order;
// LISTEN_PID naming another process means "not activated" (the configured socket and port
// are bound); an fd that is not a listening socket stops the start with an error naming it.
func TestActivationFDPassingEdgeCases(t *testing.T) {
	exe := lcExecutable(t)
	type setup struct {
		dir, cfgSock, cfgTCP, actSock, actTCP, envLog string
		files                                         []*os.File
	}
	prepare := func(t *testing.T, first string) *setup {
		s := &setup{dir: shortTempDir(t)}
		s.cfgSock, s.actSock, s.envLog = s.dir+"/configured.sock", s.dir+"/activated.sock", s.dir+"/env.log"
		s.cfgTCP = freeTCPAddr(t)
		ul, err := net.ListenUnix("unix", &net.UnixAddr{Name: s.actSock, Net: "unix"})
		if err != nil {
			t.Fatal(err)
		}
		ul.SetUnlinkOnClose(false) // made here, served by the child, as with systemd
		defer ul.Close()
		tl, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
		if err != nil {
			t.Fatal(err)
		}
		defer tl.Close()
		s.actTCP = tl.Addr().String()
		uf, tf := sdListenerFile(t, ul), sdListenerFile(t, tl)
		switch first {
		case "tcp":
			s.files = []*os.File{tf, uf}
		case "unix":
			s.files = []*os.File{uf, tf}
		case "not listening":
			fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
			if err != nil {
				t.Fatal(err)
			}
			f := os.NewFile(uintptr(fd), "unlistened")
			t.Cleanup(func() { f.Close() })
			s.files = []*os.File{f, uf}
		}
		lcConfig(t, s.dir+"/renderd.yaml", s.cfgSock, s.cfgTCP, 1,
			[]string{exe, "fake-renderer", "-env-log", s.envLog}, "stop_timeout: 10s\n")
		return s
	}
	// start runs the daemon with LISTEN_PID set to its own pid (the shell's, which exec keeps)
	// unless listenPID is given.
	start := func(t *testing.T, s *setup, listenPID string, names string) *lcProc {
		argv := []string{"/bin/sh", "-c", `export LISTEN_PID=$$; exec "$0" "$@"`, exe, "daemon", "-c", s.dir + "/renderd.yaml"}
		env := lcEnv("LISTEN_FDS="+strconv.Itoa(len(s.files)), "LISTEN_FDNAMES="+names)
		if listenPID != "" {
			argv = argv[3:]
			env = append(env, "LISTEN_PID="+listenPID)
		}
		p := startLCProc(t, argv, env, s.files)
		for _, f := range s.files {
			f.Close() // only the child may accept
		}
		return p
	}
	stop := func(t *testing.T, p *lcProc) {
		p.signal(syscall.SIGTERM)
		if err := p.wait(lcDeadline); err != nil {
			t.Fatalf("daemon exit: %v, want status 0", err)
		}
	}

	t.Run("tcp then unix", func(t *testing.T) {
		s := prepare(t, "tcp")
		p := start(t, s, "", "mapproxy:native")
		// The listeners exist already: these connections wait in the backlog until the
		// daemon is up.
		uc := lcDial(t, "unix", s.actSock)
		uc.send(tileReq("unix", cacheID, 1, 1, 3, 100))
		tc := lcDial(t, "tcp", s.actTCP)
		tc.send(tileReq("tcp", cacheID, 2, 1, 3, 100))
		uc.expectReply("unix", statusOK)
		tc.expectReply("tcp", statusOK)
		if got := postMapProxyOn(t, "tcp", s.actTCP, 3, 1, 3); got["status"] != "ok" {
			t.Errorf("HTTP POST on the inherited TCP socket: got %v, want ok", got)
		}
		if got := postMapProxyOn(t, "unix", s.actSock, 4, 1, 3); got["status"] != "ok" {
			t.Errorf("HTTP POST on the inherited Unix socket: got %v, want ok", got)
		}
		checkNotListening(t, "unix", s.cfgSock)
		checkNotListening(t, "tcp", s.cfgTCP)
		if out := p.out.String(); !strings.Contains(out, "count=2") || !strings.Contains(out, "listen=tcp:"+s.actTCP+",unix:"+s.actSock) {
			t.Errorf("log does not show both inherited listeners in fd order:\n%s", out)
		}
		checkRenderersInheritedNothing(t, readEnvLog(t, s.envLog))
		stop(t, p)
	})

	t.Run("LISTEN_PID of another process", func(t *testing.T) {
		s := prepare(t, "unix")
		p := start(t, s, "1", "native:mapproxy")
		c := lcDial(t, "unix", s.cfgSock)
		c.send(tileReq("configured", cacheID, 1, 1, 3, 100))
		c.expectReply("configured", statusOK)
		tc := lcDial(t, "tcp", s.cfgTCP)
		tc.send(`{"command":"ping","id":"tcp"}`)
		tc.expectReply("tcp", statusOK)
		if out := p.out.String(); strings.Contains(out, "socket activation") {
			t.Errorf("the daemon took fds meant for another process:\n%s", out)
		}
		// The variables are never passed on, even when they were not ours.
		for _, l := range readEnvLog(t, s.envLog) {
			if len(l.Env) > 0 {
				t.Errorf("renderer pid %d inherited %v", l.PID, l.Env)
			}
		}
		stop(t, p)
	})

	t.Run("not a listening socket", func(t *testing.T) {
		s := prepare(t, "not listening")
		p := start(t, s, "", "")
		err := p.wait(lcDeadline)
		var ee *exec.ExitError
		if !errors.As(err, &ee) || ee.ExitCode() != 1 {
			t.Fatalf("daemon exit: %v, want status 1", err)
		}
		if out := p.out.String(); !strings.Contains(out, "socket activation: fd 3 (LISTEN_FD_3) is not a listening socket") {
			t.Errorf("error does not name the bad fd:\n%s", out)
		}
		if ls := readEnvLog(t, s.envLog); len(ls) > 0 {
			t.Errorf("%d renderers started; want none", len(ls))
		}
		checkNotListening(t, "unix", s.cfgSock)
	})
}

// lcLoad keeps pipelined tile requests going on several connections (each with at most
// window in flight) until stopped, and checks that every request gets exactly one reply.
type lcLoad struct {
	t       *testing.T
	stop    chan struct{}
	wg      sync.WaitGroup
	mu      sync.Mutex
	sent    int
	replies int
	bad     []string
}

func startLoad(t *testing.T, socket string, conns, minPerConn, window int) *lcLoad {
	l := &lcLoad{t: t, stop: make(chan struct{})}
	for ci := range conns {
		cl := lcDial(t, "unix", socket)
		slots := make(chan struct{}, window)
		sentCh := make(chan int, 1)
		l.wg.Add(2)
		go func() { // writer
			defer l.wg.Done()
			i := 0
			defer func() { sentCh <- i }()
			defer cl.c.(*net.UnixConn).CloseWrite() // "no more requests"; replies still come
			for ; ; i++ {
				if i >= minPerConn {
					select {
					case <-l.stop:
						return
					default:
					}
				}
				slots <- struct{}{}
				prio := 100
				if i%3 == 0 {
					prio = 10 // some seeding too, under max_seed_renderers
				}
				line := tileReq(fmt.Sprintf("c%d-%d", ci, i), cacheID, ci*100000+i, 0, 18, prio) + "\n"
				if _, err := io.WriteString(cl.c, line); err != nil {
					l.problem("connection %d: write: %v", ci, err)
					return
				}
			}
		}()
		go func() { // reader
			defer l.wg.Done()
			got := map[string]int{}
			for {
				cl.c.SetReadDeadline(time.Now().Add(lcDeadline))
				line, err := cl.r.ReadBytes('\n')
				if errors.Is(err, io.EOF) && len(line) == 0 {
					break
				}
				if err != nil {
					l.problem("connection %d: read: %v", ci, err)
					break
				}
				var r Reply
				if err := json.Unmarshal(line, &r); err != nil {
					l.problem("connection %d: reply is not JSON: %q", ci, line)
					continue
				}
				got[idOf(r)]++
				if r.Status != statusOK {
					l.problem("connection %d: %s: got %s %q, want ok", ci, idOf(r), r.Status, r.ErrorMessage)
				}
				<-slots
			}
			sent := <-sentCh
			replies := 0
			for i := range sent {
				id := fmt.Sprintf("c%d-%d", ci, i)
				if n := got[id]; n != 1 {
					l.problem("connection %d: %s got %d replies, want 1", ci, id, n)
				}
				replies += got[id]
			}
			if len(got) != sent {
				l.problem("connection %d: replies for %d distinct ids, sent %d requests", ci, len(got), sent)
			}
			l.mu.Lock()
			l.sent += sent
			l.replies += replies
			l.mu.Unlock()
		}()
	}
	return l
}

func (l *lcLoad) problem(format string, args ...any) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(l.bad) < 20 {
		l.bad = append(l.bad, fmt.Sprintf(format, args...))
	}
}

// finish stops sending, waits for every reply and returns how many requests were sent.
func (l *lcLoad) finish() int {
	l.t.Helper()
	close(l.stop)
	done := make(chan struct{})
	go func() { l.wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(2 * lcDeadline):
		l.t.Fatal("load did not finish")
	}
	for _, b := range l.bad {
		l.t.Error(b)
	}
	if l.replies != l.sent {
		l.t.Errorf("replies: got %d, want one for each of %d requests", l.replies, l.sent)
	}
	return l.sent
}

// monotonicNow is CLOCK_MONOTONIC in µs, as systemd wants it in MONOTONIC_USEC.
func monotonicNow(t *testing.T) int64 {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err != nil {
		t.Fatal(err)
	}
	return ts.Nano() / 1000
}

// hup sends SIGHUP and checks the notifications around it: RELOADING=1 with a current
// MONOTONIC_USEC in the same datagram, then READY=1.
func hup(t *testing.T, p *lcProc, notify *lcNotify) {
	t.Helper()
	before := monotonicNow(t)
	p.signal(syscall.SIGHUP)
	msg := notify.expect("RELOADING=1")
	after := monotonicNow(t)
	v, ok := strings.CutPrefix(notifyLine(msg, "MONOTONIC_USEC="), "MONOTONIC_USEC=")
	usec, err := strconv.ParseInt(v, 10, 64)
	if !ok || err != nil || usec < before || usec > after {
		t.Errorf("RELOADING=1 datagram %q: want MONOTONIC_USEC between %d and %d", msg, before, after)
	}
	notify.expect("READY=1")
}

// TestReloadChangesRendererCountUnderLoad reloads the real daemon three times while
// pipelined requests keep coming on six connections: renderers 2 → 5 with
// max_seed_renderers 3 (renderers added, none replaced), then a changed renderer_command
// (all five replaced by new processes), then a file with an unknown key (logged, the
// running configuration kept). Each reload is RELOADING=1 … READY=1 to systemd, and at
// the end every request got exactly one reply, ok.
func TestReloadChangesRendererCountUnderLoad(t *testing.T) {
	exe := lcExecutable(t)
	dir := shortTempDir(t)
	sock, cfg := dir+"/s.sock", dir+"/renderd.yaml"
	envLog, jobs1, jobs2 := dir+"/env.log", dir+"/jobs1.log", dir+"/jobs2.log"
	notify := newLCNotify(t, dir+"/notify")
	rend := func(log string) []string {
		return []string{exe, "fake-renderer", "-delay", "20ms", "-log", log, "-env-log", envLog}
	}
	lcConfig(t, cfg, sock, "", 2, rend(jobs1), "stop_timeout: 10s\n")
	p := startLCProc(t, []string{exe, "daemon", "-c", cfg}, lcEnv("NOTIFY_SOCKET="+notify.path), nil)
	notify.proc = p
	// The daemon handles SIGHUP only from a moment after it sends READY=1 (main.go registers
	// the handler after the notification; until then SIGHUP kills it): the first SIGHUP is
	// sent well after READY=1, once 20 renders have been done.
	notify.expect("READY=1")
	d := &testDaemon{t: t, socket: sock, log: jobs1}
	config := func(s statusDoc, key string) float64 { f, _ := s.Config[key].(float64); return f }

	load := startLoad(t, sock, 6, 50, 10)
	rendered := func(n uint64) func(statusDoc) bool {
		return func(s statusDoc) bool { return s.Counters["rendered"] >= n }
	}
	d.waitFor("load under way", rendered(20))

	// 1. More renderers, a different seed reservation: the two running ones stay.
	lcConfig(t, cfg, sock, "", 5, rend(jobs1), "stop_timeout: 10s\nmax_seed_renderers: 3\n")
	hup(t, p, notify)
	s := d.waitFor("5 ready renderers", func(s statusDoc) bool { return s.Renderers.Total == 5 && s.Renderers.Ready == 5 })
	if got := config(s, "max_seed_renderers"); got != 3 {
		t.Errorf("config max_seed_renderers after reload: got %v, want 3", got)
	}
	if got := config(s, "renderers"); got != 5 {
		t.Errorf("config renderers after reload: got %v, want 5", got)
	}
	if n := len(readEnvLog(t, envLog)); n != 5 {
		t.Errorf("renderer processes started: got %d, want 2 + 3 (none replaced)", n)
	}
	d.waitFor("load continues", rendered(s.Counters["rendered"]+20))

	// 2. A changed renderer_command (another job log): every renderer is replaced.
	lcConfig(t, cfg, sock, "", 5, rend(jobs2), "stop_timeout: 10s\nmax_seed_renderers: 3\n")
	hup(t, p, notify)
	s = d.waitFor("5 new renderers", func(s statusDoc) bool {
		return s.Renderers.Total == 5 && s.Renderers.Ready == 5 && s.Renderers.Retiring == 0
	})
	oldJobs := len(d.jobLog()) // final: every old renderer has exited
	d.waitFor("load on the new renderers", rendered(s.Counters["rendered"]+20))
	d2 := &testDaemon{t: t, log: jobs2}
	pids := func(lines []string) map[string]bool {
		m := map[string]bool{}
		for _, l := range lines {
			m[strings.Fields(l)[0]] = true
		}
		return m
	}
	oldPIDs, newPIDs := pids(d.jobLog()), pids(d2.jobLog())
	if len(newPIDs) == 0 {
		t.Errorf("no render by a new renderer after the command changed")
	}
	for pid := range newPIDs {
		if oldPIDs[pid] {
			t.Errorf("renderer pid %s rendered with both commands; want it replaced", pid)
		}
	}

	// 3. A bad file: logged, nothing changes, the daemon keeps serving.
	lcConfig(t, cfg, sock, "", 3, rend(jobs1), "colour: blue\n")
	hup(t, p, notify)
	p.out.waitFor(t, "reload failed; keeping the running configuration", 1)
	if out := p.out.String(); !strings.Contains(out, "unknown key colour") {
		t.Errorf("the failed reload's log does not name the bad key:\n%s", out)
	}
	s = d.waitFor("load after the failed reload", rendered(d.status().Counters["rendered"]+20))
	if s.Renderers.Total != 5 || config(s, "renderers") != 5 || config(s, "max_seed_renderers") != 3 {
		t.Errorf("after a bad reload: %d renderers, config %v; want 5 and the previous config", s.Renderers.Total, s.Config)
	}

	sent := load.finish()
	if sent < 300 {
		t.Errorf("load: %d requests, want at least 300", sent)
	}
	s = d.status()
	if c := s.Counters; c["requested"] != uint64(sent) || c["rendered"] != uint64(sent) || c["failed"] != 0 || c["merged"] != 0 {
		t.Errorf("counters: got %v, want %d requested and rendered, none failed or merged", c, sent)
	}
	if n := len(d.jobLog()); n != oldJobs {
		t.Errorf("old renderers rendered after they were replaced: %d jobs, then %d", oldJobs, n)
	}
	if got := len(d.jobLog()) + len(d2.jobLog()); got != sent {
		t.Errorf("renders: got %d, want %d", got, sent)
	}
	started := readEnvLog(t, envLog)
	if len(started) != 10 {
		t.Errorf("renderer processes started: got %d, want 2 + 3 + 5", len(started))
	}
	checkRenderersInheritedNothing(t, started)

	p.signal(syscall.SIGTERM)
	notify.expect("STOPPING=1")
	if err := p.wait(lcDeadline); err != nil {
		t.Fatalf("daemon exit: %v, want status 0", err)
	}
	want := []string{"READY=1", "RELOADING=1", "READY=1", "RELOADING=1", "READY=1", "RELOADING=1", "READY=1", "STOPPING=1"}
	if got := notify.order("READY=1", "RELOADING=1", "STOPPING=1"); !slices.Equal(got, want) {
		t.Errorf("notify states: got %q, want %q", got, want)
	}
}

// TestSigtermDrain stops the real daemon with SIGTERM while one render runs (held at the
// gate) and two requests are queued: the queued ones get shutting_down at once, so does a
// request sent afterwards on an open connection, new connections are refused, and the
// running render finishes — or, with stop_timeout 1s and a render that never ends, is
// killed at the deadline with an error saying so. Either way the daemon exits 0.
func TestSigtermDrain(t *testing.T) {
	for _, tt := range []struct {
		name        string
		stopTimeout time.Duration
		release     bool
	}{
		{"render finishes", 20 * time.Second, true},
		{"stop_timeout 1s", time.Second, false},
	} {
		t.Run(tt.name, func(t *testing.T) {
			exe := lcExecutable(t)
			dir := shortTempDir(t)
			sock, tcp := dir+"/s.sock", freeTCPAddr(t)
			gate := lcFIFO(t, dir+"/gate")
			lcConfig(t, dir+"/renderd.yaml", sock, tcp, 1,
				[]string{exe, "fake-renderer", "-log", dir + "/jobs.log", "-gate", dir + "/gate"},
				fmt.Sprintf("stop_timeout: %s\n", tt.stopTimeout))
			p := startLCProc(t, []string{exe, "daemon", "-c", dir + "/renderd.yaml"}, lcEnv(), nil)
			d := &testDaemon{t: t, socket: sock, log: dir + "/jobs.log"}

			running := lcDial(t, "unix", sock)
			running.send(tileReq("running", cacheID, 0, 0, 4, 100))
			d.waitFor("render running", func(s statusDoc) bool { return s.Renderers.Busy == 1 })
			queued := lcDial(t, "unix", sock)
			queued.send(tileReq("q1", cacheID, 1, 0, 4, 100))
			queued.send(tileReq("q2", cacheID, 2, 0, 4, 10))
			d.waitFor("2 queued", func(s statusDoc) bool { return s.Queue.Length == 2 })

			sigterm := time.Now()
			p.signal(syscall.SIGTERM)
			got := map[string]string{}
			for range 2 {
				r := queued.read()
				got[idOf(r)] = r.Status
			}
			if got["q1"] != statusShuttingDown || got["q2"] != statusShuttingDown {
				t.Fatalf("queued requests: got %v, want both shutting_down", got)
			}
			// Listeners are closed by now; a connection that is open takes no new work.
			for _, a := range []struct{ network, addr string }{{"unix", sock}, {"tcp", tcp}} {
				if c, err := net.DialTimeout(a.network, a.addr, 5*time.Second); err == nil {
					c.Close()
					t.Errorf("%s %s: a new connection was accepted while stopping", a.network, a.addr)
				}
			}
			running.send(tileReq("late", cacheID, 3, 0, 4, 100))
			running.expectReply("late", statusShuttingDown)

			if tt.release {
				if _, err := gate.Write([]byte{1}); err != nil {
					t.Fatal(err)
				}
				running.expectReply("running", statusOK)
			} else {
				r := running.expectReply("running", statusError)
				if !strings.Contains(r.ErrorMessage, "shutting down") {
					t.Errorf("killed render: got %q, want an error about the shutdown", r.ErrorMessage)
				}
				if el := time.Since(sigterm); el < tt.stopTimeout-100*time.Millisecond {
					t.Errorf("render killed %s after SIGTERM; want it to run until stop_timeout %s", el, tt.stopTimeout)
				}
			}
			running.expectEOF()
			queued.expectEOF()
			if err := p.wait(lcDeadline); err != nil {
				t.Fatalf("daemon exit: %v, want status 0", err)
			}
			// At most: stop_timeout, then SIGTERM→SIGKILL (killGrace), plus slack for a busy machine.
			if el, limit := time.Since(sigterm), tt.stopTimeout+killGrace+3*time.Second; !tt.release && el > limit {
				t.Errorf("daemon took %s to exit after SIGTERM with stop_timeout %s; want at most %s", el, tt.stopTimeout, limit)
			}
			if n := len(d.jobLog()); n != 1 {
				t.Errorf("renders: got %d, want only the running one", n)
			}
			for _, a := range []struct{ network, addr string }{{"unix", sock}, {"tcp", tcp}} {
				if c, err := net.DialTimeout(a.network, a.addr, 5*time.Second); err == nil {
					c.Close()
					t.Errorf("%s %s: connection accepted after exit", a.network, a.addr)
				}
			}
		})
	}
}

// lcClientHelperEnv makes the test binary a one-shot client (TestLifecycleClientHelperProcess):
// "ndjson|http network address".
const lcClientHelperEnv = "MAPPROXY_RENDERD_TEST_LIFECYCLE_CLIENT"

const lcClientResult = "lifecycle-client-result "

// TestLifecycleClientHelperProcess is not a test: it is the client TestPeerCredentialAllowList
// runs as another user. It sends a ping (or GET /status) and prints everything it reads until
// the daemon closes the connection.
func TestLifecycleClientHelperProcess(t *testing.T) {
	spec := os.Getenv(lcClientHelperEnv)
	if spec == "" {
		return
	}
	f := strings.Fields(spec)
	c, err := net.DialTimeout(f[1], f[2], 10*time.Second)
	if err != nil {
		t.Fatalf("dial %s %s: %v", f[1], f[2], err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if f[0] == "http" {
		_, err = io.WriteString(c, "GET /status HTTP/1.1\r\nHost: localhost\r\n\r\n")
	} else {
		_, err = io.WriteString(c, `{"command":"ping","id":"nobody"}`+"\n")
	}
	if err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(c)
	if err != nil {
		t.Fatalf("read: %v (got %q)", err, got)
	}
	fmt.Println(lcClientResult + strconv.Quote(string(got)))
}

// TestPeerCredentialAllowList: with allowed_uids set, a client running as uid 65534 gets
// one "permission denied" error and EOF on the Unix socket and on loopback TCP (HTTP: 403
// with the JSON error), the refusal is logged with the uid, and root is served on both.
func TestPeerCredentialAllowList(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("needs root to run a client as uid 65534")
	}
	const nobody = 65534
	noRaceExitSleep(t)
	d := newTestDaemon(t, daemonOpts{renderers: 1, maxSeed: -1, tcp: true,
		extraYAML: "allowed_uids: [0]\nsocket_mode: \"0666\"\n"})
	if err := os.Chmod(d.dir, 0o755); err != nil { // let uid 65534 reach the socket at all
		t.Fatal(err)
	}
	// The test binary must be readable for uid 65534; go test's build directory is not.
	exe, err := os.ReadFile(lcExecutable(t))
	if err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(d.dir, "client.test")
	if err := os.WriteFile(bin, exe, 0o755); err != nil {
		t.Fatal(err)
	}
	asNobody := func(t *testing.T, mode, network, addr string) string {
		t.Helper()
		cmd := exec.Command(bin, "-test.run=^TestLifecycleClientHelperProcess$", "-test.count=1")
		cmd.Dir = d.dir
		cmd.Env = lcEnv(lcClientHelperEnv + "=" + mode + " " + network + " " + addr)
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: nobody, Gid: nobody}}
		cmd.WaitDelay = 5 * time.Second
		out, err := cmd.CombinedOutput()
		_, res, ok := strings.Cut(string(out), lcClientResult)
		res, _, _ = strings.Cut(res, "\n")
		got, qerr := strconv.Unquote(res)
		if err != nil || !ok || qerr != nil {
			t.Fatalf("client as uid %d: %v\n%s", nobody, err, out)
		}
		return got
	}
	const denied = `{"status":"error","error_message":"permission denied"}` + "\n"

	for _, tt := range []struct{ network, addr string }{{"unix", d.socket}, {"tcp", d.tcp}} {
		t.Run("nobody "+tt.network, func(t *testing.T) {
			if got := asNobody(t, "ndjson", tt.network, tt.addr); got != denied {
				t.Errorf("got %q, then EOF; want exactly %q", got, denied)
			}
		})
	}
	t.Run("nobody http", func(t *testing.T) {
		got := asNobody(t, "http", "tcp", d.tcp)
		resp, err := http.ReadResponse(bufio.NewReader(strings.NewReader(got)), nil)
		if err != nil {
			t.Fatalf("%q: %v", got, err)
		}
		body, _ := io.ReadAll(resp.Body)
		if resp.StatusCode != http.StatusForbidden || resp.Header.Get("Content-Type") != "application/json" || string(body) != denied {
			t.Errorf("got %d %q %q; want 403 application/json %q", resp.StatusCode, resp.Header.Get("Content-Type"), body, denied)
		}
	})

	t.Run("root", func(t *testing.T) {
		uc := d.dial()
		uc.send(`{"command":"ping","id":"root-unix"}`)
		uc.expectReply("root-unix", statusOK)
		tc := lcDial(t, "tcp", d.tcp)
		tc.send(tileReq("root-tcp", cacheID, 1, 2, 3, 100))
		tc.expectReply("root-tcp", statusOK)
		resp, err := (&http.Client{Timeout: lcDeadline}).Get("http://" + d.tcp + "/status")
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			t.Errorf("GET /status as root: got %d, want 200", resp.StatusCode)
		}
	})

	if n := strings.Count(d.stderr.String(), "peer refused by allowed_uids/allowed_gids"); n != 3 {
		t.Errorf("refusals logged: got %d, want 3\n%s", n, d.stderr.String())
	}
	if !strings.Contains(d.stderr.String(), `peer="uid 65534 pid `) || !strings.Contains(d.stderr.String(), `peer="uid 65534"`) {
		t.Errorf("the log does not name uid 65534 (with its pid on the Unix socket):\n%s", d.stderr.String())
	}
	if n := d.status().Conns.Refused; n != 3 {
		t.Errorf("refused connections counter: got %d, want 3", n)
	}
}

// TestMaxConnections: with max_connections 3 and three connections open, a fourth (Unix or
// TCP) gets one "too many connections" error and is closed; the three keep working, and a
// slot freed by a close is usable again.
func TestMaxConnections(t *testing.T) {
	noRaceExitSleep(t)
	d := newTestDaemon(t, daemonOpts{renderers: 1, maxSeed: -1, tcp: true, extraYAML: "max_connections: 3\n"})
	ping := func(c *client, id string) {
		t.Helper()
		c.send(`{"command":"ping","id":"` + id + `"}`)
		c.expectReply(id, statusOK)
	}
	// waitOpen polls the status document on c until the daemon counts n open connections
	// (a closed connection gives its slot back asynchronously).
	waitOpen := func(c *client, n int64) {
		t.Helper()
		deadline := time.Now().Add(lcDeadline)
		for {
			c.send(`{"command":"status","id":"st"}`)
			var s statusDoc
			if r := c.read(); json.Unmarshal(r.Stats, &s) != nil {
				t.Fatalf("status: %+v", r)
			}
			if s.Conns.Open == n {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("open connections: got %d, want %d", s.Conns.Open, n)
			}
			time.Sleep(5 * time.Millisecond) // polling the daemon's state, bounded by the deadline
		}
	}
	c1 := d.dial()
	ping(c1, "1")
	waitOpen(c1, 1) // waitUp's connection has given its slot back
	c2 := d.dial()
	ping(c2, "2")
	c3 := lcDial(t, "tcp", d.tcp)
	ping(c3, "3")

	for _, a := range []struct{ network, addr string }{{"unix", d.socket}, {"tcp", d.tcp}} {
		c := lcDial(t, a.network, a.addr)
		r := c.read()
		if r.Status != statusError || r.ErrorMessage != "too many connections" {
			t.Fatalf("4th connection (%s): got %+v, want error too many connections", a.network, r)
		}
		c.expectEOF()
	}
	for i, c := range []*client{c1, c2, c3} {
		id := fmt.Sprint("t", i)
		c.send(tileReq(id, cacheID, i, 0, 7, 100))
		c.expectReply(id, statusOK)
	}
	c3.c.Close()
	waitOpen(c1, 2)
	c4 := d.dial()
	ping(c4, "4")
	c4.send(`{"command":"status","id":"st"}`)
	r := c4.read()
	var s statusDoc
	if json.Unmarshal(r.Stats, &s) != nil || s.Conns.Refused != 2 {
		t.Errorf("refused connections counter: got %d (%+v), want 2", s.Conns.Refused, r)
	}
}

// TestSighupDuringStartup: a SIGHUP that arrives while renderers are still starting (systemd
// runs a reload queued during start-up right after READY=1) must not kill the daemon; it
// is applied once the daemon is ready.
func TestSighupDuringStartup(t *testing.T) {
	exe := lcExecutable(t)
	dir := shortTempDir(t)
	sock := dir + "/s.sock"
	gate := lcFIFO(t, dir+"/ready")
	lcConfig(t, dir+"/renderd.yaml", sock, "", 2,
		[]string{exe, "fake-renderer", "-ready-gate", dir + "/ready", "-env-log", dir + "/env.log"}, "")
	p := startLCProc(t, []string{exe, "daemon", "-c", dir + "/renderd.yaml"}, lcEnv(), nil)
	waitEnvLog(t, dir+"/env.log", 2) // both renderers started, neither ready
	p.signal(syscall.SIGHUP)
	if _, err := gate.Write([]byte{1, 1}); err != nil {
		t.Fatal(err)
	}
	p.out.waitFor(t, "msg=reloaded", 1)
	c := lcDial(t, "unix", sock)
	c.send(`{"command":"ping","id":"alive"}`)
	c.expectReply("alive", statusOK)
	p.signal(syscall.SIGTERM)
	if err := p.wait(lcDeadline); err != nil {
		t.Fatalf("daemon exit: %v, want status 0", err)
	}
}

// TestReloadConnectionSettings: connection settings (here max_line_bytes) take effect on
// SIGHUP like the scheduler's.
func TestReloadConnectionSettings(t *testing.T) {
	exe := lcExecutable(t)
	dir := shortTempDir(t)
	sock := dir + "/s.sock"
	rend := []string{exe, "fake-renderer"}
	lcConfig(t, dir+"/renderd.yaml", sock, "", 1, rend, "")
	p := startLCProc(t, []string{exe, "daemon", "-c", dir + "/renderd.yaml"}, lcEnv(), nil)
	long := `{"command":"ping","id":"` + strings.Repeat("x", 2000) + `"}`
	c := lcDial(t, "unix", sock)
	c.send(long)
	if r := c.read(); r.Status != statusOK {
		t.Fatalf("2 kB line with the default max_line_bytes: got %s %q", r.Status, r.ErrorMessage)
	}
	lcConfig(t, dir+"/renderd.yaml", sock, "", 1, rend, "max_line_bytes: 1024\n")
	p.signal(syscall.SIGHUP)
	p.out.waitFor(t, "msg=reloaded", 1)
	c2 := lcDial(t, "unix", sock)
	c2.send(long)
	if r := c2.read(); r.Status != statusError || !strings.Contains(r.ErrorMessage, "max_line_bytes (1024 bytes)") {
		t.Fatalf("2 kB line after reloading max_line_bytes 1024: got %s %q, want the line-length error", r.Status, r.ErrorMessage)
	}
}

// TestShutdownWithSilentConnection: a client that connected but never sent a full first
// line does not hold up shutdown.
func TestShutdownWithSilentConnection(t *testing.T) {
	noRaceExitSleep(t)
	d := newTestDaemon(t, daemonOpts{renderers: 1, maxSeed: -1, tcp: true})
	silent := d.dial()
	half, err := net.Dial("tcp", d.tcp)
	if err != nil {
		t.Fatal(err)
	}
	defer half.Close()
	if _, err := io.WriteString(half, "GET /sta"); err != nil {
		t.Fatal(err)
	}
	d.waitFor("3 connections open", func(s statusDoc) bool { return s.Conns.Open >= 3 })
	d.cancel()
	select {
	case err := <-d.done:
		d.done <- err
		if err != nil {
			t.Fatalf("run: %v", err)
		}
	case <-time.After(lcDeadline):
		t.Fatal("the daemon did not stop while a connection had sent nothing")
	}
	silent.c.SetReadDeadline(time.Now().Add(lcDeadline))
	if _, err := silent.r.ReadByte(); err == nil {
		t.Error("the silent connection got data, want EOF")
	}
}

// TestWatchdog: with WATCHDOG_USEC set, the scheduler loop sends WATCHDOG=1 every half
// interval, and a start that never becomes ready sends no READY=1 and exits non-zero.
func TestWatchdog(t *testing.T) {
	exe := lcExecutable(t)
	dir := shortTempDir(t)
	sock := dir + "/s.sock"
	notify := newLCNotify(t, dir+"/notify")
	lcConfig(t, dir+"/renderd.yaml", sock, "", 1, []string{exe, "fake-renderer"}, "")
	p := startLCProc(t, []string{exe, "daemon", "-c", dir + "/renderd.yaml"},
		lcEnv("NOTIFY_SOCKET="+dir+"/notify", "WATCHDOG_USEC=200000"), nil)
	notify.proc = p
	notify.expect("READY=1")
	for range 3 {
		notify.expect("WATCHDOG=1")
	}
	p.signal(syscall.SIGTERM)
	notify.expect("STOPPING=1")
	if err := p.wait(lcDeadline); err != nil {
		t.Fatalf("daemon exit: %v", err)
	}

	// Renderers that never send their ready line: no READY=1, exit status 1 with the reason.
	notify2 := newLCNotify(t, dir+"/notify2")
	lcConfig(t, dir+"/bad.yaml", dir+"/s2.sock", "", 1, []string{"/bin/sleep", "60"}, "start_timeout: 300ms\n")
	p2 := startLCProc(t, []string{exe, "daemon", "-c", dir + "/bad.yaml"}, lcEnv("NOTIFY_SOCKET="+dir+"/notify2"), nil)
	err := p2.wait(lcDeadline)
	if err == nil || !strings.Contains(p2.out.String(), "no ready line within start_timeout") {
		t.Fatalf("renderers never ready: got exit %v, output %s", err, p2.out.String())
	}
	notify2.none("READY=1", 100*time.Millisecond)
}
