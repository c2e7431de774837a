// SPDX-License-Identifier: Apache-2.0

package main

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"os/signal"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// Child processes (renderers, planners, check-config's MapProxy check) are started by one
// helper, so that none outlives the daemon, however the daemon ends:
//
//   - Each child leads its own process group (a terminal's Ctrl-C reaches only the daemon,
//     which stops children in order), and stopping a child signals the whole group, so
//     anything the child started goes with it: SIGTERM, then SIGKILL after a bound.
//   - Each child is started with Pdeathsig SIGKILL: the kernel kills it when the daemon dies,
//     SIGKILL included. The kernel sends it when the *thread* that forked the child exits,
//     and the Go runtime ends threads when their goroutine exits while locked to them, so
//     every child is forked by one goroutine locked to its thread that never returns (the
//     spawner). The alternative, a child re-checking its parent, would need the cooperation
//     of every renderer_command and planner_command; the spawner needs none.
//   - Pdeathsig is not inherited: a child's own children (a planner_command's helpers, a
//     renderer's subprocesses) would survive a SIGKILLed daemon with PPid 1. The reaper, a
//     copy of this binary started once (reaperEnv), is told every child's process group over
//     a pipe; when the pipe ends because the daemon died (or exited), it sends SIGTERM, then
//     SIGKILL, to every group still registered, and exits. The bundled Python worker starts
//     no processes of its own, and needs nothing more.
//   - Wait is bounded (WaitDelay) even when a grandchild keeps the child's pipes open.

// childGrace is how long a child gets between SIGTERM and SIGKILL, and after SIGKILL.
const childGrace = killGrace

// spawnReq asks the spawner to start cmd; the result goes to done.
type spawnReq struct {
	cmd  *exec.Cmd
	done chan error
}

var (
	spawnOnce sync.Once
	spawnCh   chan spawnReq
)

// spawn starts cmd on the spawner's thread, so that its Pdeathsig fires only when the
// daemon dies. The spawner goroutine lives as long as the process, by design: its thread
// must never exit.
func spawn(cmd *exec.Cmd) error {
	spawnOnce.Do(func() {
		spawnCh = make(chan spawnReq)
		go func() {
			runtime.LockOSThread() // never unlocked: the thread stays until the process ends
			for r := range spawnCh {
				r.done <- r.cmd.Start()
			}
		}()
	})
	r := spawnReq{cmd: cmd, done: make(chan error, 1)}
	spawnCh <- r
	return <-r.done
}

// child is a started subprocess in its own process group.
type child struct {
	cmd     *exec.Cmd
	pid     int
	exited  chan struct{} // closed when the process has been waited for
	waitErr error         // written before exited is closed
	log     *slog.Logger
}

// startChild starts cmd (argv, environment and standard files set by the caller) in its
// own process group with Pdeathsig, registers the group with the reaper and waits for it
// in a goroutine that ends when the process has exited (bounded by WaitDelay after the
// exit, whoever holds its pipes).
func startChild(cmd *exec.Cmd, log *slog.Logger) (*child, error) {
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	cmd.WaitDelay = childGrace
	if err := spawn(cmd); err != nil {
		return nil, err
	}
	c := &child{cmd: cmd, pid: cmd.Process.Pid, exited: make(chan struct{}), log: log}
	reaperAdd(c.pid, log)
	go func() {
		c.waitErr = cmd.Wait()
		reaperRemove(c.pid)
		close(c.exited)
	}()
	return c, nil
}

// signal sends sig to the child's whole process group while the child has not been waited
// for (after that, the group id may name someone else's processes).
func (c *child) signal(sig syscall.Signal) {
	select {
	case <-c.exited:
	default:
		_ = syscall.Kill(-c.pid, sig)
	}
}

// stop ends the child and its group: SIGTERM, then SIGKILL after childGrace. Every wait is
// bounded; a process that survives SIGKILL (uninterruptible sleep) is left behind with a
// log line. what names the child in log lines ("renderer", "planner").
func (c *child) stop(what string) {
	select {
	case <-c.exited:
		return
	default:
	}
	_ = syscall.Kill(-c.pid, syscall.SIGTERM)
	t := time.NewTimer(childGrace)
	defer t.Stop()
	select {
	case <-c.exited:
		return
	case <-t.C:
	}
	c.log.Warn(what+" ignored SIGTERM; sending SIGKILL to its process group", "pid", c.pid)
	_ = syscall.Kill(-c.pid, syscall.SIGKILL)
	t.Reset(2 * childGrace) // SIGKILL, then WaitDelay for the pipes
	select {
	case <-c.exited:
	case <-t.C:
		c.log.Error(what+" survived SIGKILL; abandoning it", "pid", c.pid)
	}
}

// waitFor waits at most d for the child to exit and reports whether it did.
func (c *child) waitFor(d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-c.exited:
		return true
	case <-t.C:
		return false
	}
}

// stderrTail logs a child's stderr line by line (prefixed, "renderer: …") and keeps the
// last max lines for error messages. It is an io.Writer for exec.Cmd.Stderr.
type stderrTail struct {
	log    *slog.Logger
	prefix string
	tail   lineTail
	mu     sync.Mutex
	buf    []byte
}

// newStderrTail keeps the last lines lines, each shortened to width bytes.
func newStderrTail(log *slog.Logger, prefix string, lines, width int) *stderrTail {
	return &stderrTail{log: log, prefix: prefix, tail: lineTail{max: lines, width: width}}
}

func (w *stderrTail) Write(b []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.buf = append(w.buf, b...)
	for {
		i := bytes.IndexByte(w.buf, '\n')
		if i < 0 {
			if len(w.buf) > 16<<10 {
				w.emit(w.buf)
				w.buf = w.buf[:0]
			}
			return len(b), nil
		}
		w.emit(w.buf[:i])
		w.buf = w.buf[i+1:]
	}
}

func (w *stderrTail) emit(line []byte) {
	s := strings.TrimRight(string(line), "\r")
	if strings.TrimSpace(s) == "" {
		return
	}
	w.tail.add(s)
	w.log.Info(w.prefix + s)
}

// String is the kept lines joined with " | ".
func (w *stderrTail) String() string { return w.tail.String() }

// lineTail keeps the last max lines written to it, each shortened to width bytes.
type lineTail struct {
	mu    sync.Mutex
	max   int
	width int
	lines []string
}

func (t *lineTail) add(line string) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if len(t.lines) == t.max {
		copy(t.lines, t.lines[1:])
		t.lines = t.lines[:t.max-1]
	}
	t.lines = append(t.lines, truncate(line, t.width))
}

// String joins the kept lines with " | ".
func (t *lineTail) String() string {
	t.mu.Lock()
	defer t.mu.Unlock()
	return strings.Join(t.lines, " | ")
}

// The reaper (see the top of this file).

// reaperEnv, set to "1", makes this binary the reaper: main runs reaperMain instead.
const reaperEnv = "MAPPROXY_RENDERD_REAPER"

var reaper struct {
	once sync.Once
	mu   sync.Mutex
	w    *os.File // the pipe to the reaper's stdin; nil when it could not be started
}

// reaperAdd registers a child's process group with the reaper, starting the reaper first.
// Without a reaper (it could not be started) children still die with the daemon through
// Pdeathsig; only their own children might not, which is logged once.
func reaperAdd(pgid int, log *slog.Logger) {
	reaper.once.Do(func() { startReaper(log) })
	reaperSend('+', pgid)
}

func reaperRemove(pgid int) { reaperSend('-', pgid) }

func reaperSend(op byte, pgid int) {
	reaper.mu.Lock()
	defer reaper.mu.Unlock()
	if reaper.w == nil {
		return
	}
	// A few bytes to a pipe the reaper drains: this does not block in practice (the
	// deadline bounds it if the reaper hangs), and a dead reaper (EPIPE) only loses the
	// grandchildren guarantee.
	_ = reaper.w.SetWriteDeadline(time.Now().Add(time.Second))
	if _, err := reaper.w.Write([]byte(string(op) + strconv.Itoa(pgid) + "\n")); err != nil {
		reaper.w.Close()
		reaper.w = nil
	}
}

func startReaper(log *slog.Logger) {
	exe, err := os.Executable()
	if err == nil {
		var r, w *os.File
		if r, w, err = os.Pipe(); err == nil {
			cmd := exec.Command(exe)
			cmd.Env = append(os.Environ(), reaperEnv+"=1")
			cmd.Stdin = r
			// Its own group: a terminal's Ctrl-C must not end it before the daemon has
			// stopped its children.
			cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
			err = cmd.Start()
			r.Close()
			if err == nil {
				reaper.w = w
				// Nobody waits for it while the daemon runs; it exits when the pipe ends.
				go func() { _ = cmd.Wait() }()
				return
			}
			w.Close()
		}
	}
	log.Warn("cannot start the reaper: processes that renderers or planners start themselves may outlive a killed daemon", "error", err)
}

// reaperMain is the reaper: it reads "+pgid" and "-pgid" lines from in until EOF (the
// daemon has gone), then ends every process group still registered: SIGTERM, SIGKILL after
// childGrace to the groups left. It ignores the signals a terminal or a service manager
// sends to the daemon's group, so that it outlives the daemon it watches.
func reaperMain(in io.Reader) int {
	signal.Ignore(syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP, syscall.SIGQUIT)
	groups := map[int]bool{}
	sc := bufio.NewScanner(in)
	for sc.Scan() {
		l := sc.Text()
		if len(l) < 2 {
			continue
		}
		n, err := strconv.Atoi(l[1:])
		if err != nil || n <= 1 {
			continue
		}
		if l[0] == '+' {
			groups[n] = true
		} else {
			delete(groups, n)
		}
	}
	reapGroups(groups, childGrace)
	return 0
}

// reapGroups sends SIGTERM to every group, waits at most grace for them to be gone, then
// sends SIGKILL to those left.
func reapGroups(groups map[int]bool, grace time.Duration) {
	for g := range groups {
		_ = syscall.Kill(-g, syscall.SIGTERM)
	}
	deadline := time.Now().Add(grace)
	for len(groups) > 0 && time.Now().Before(deadline) {
		for g := range groups {
			if err := syscall.Kill(-g, 0); errors.Is(err, syscall.ESRCH) {
				delete(groups, g)
			}
		}
		if len(groups) > 0 {
			time.Sleep(20 * time.Millisecond) // polling, bounded by grace
		}
	}
	for g := range groups {
		_ = syscall.Kill(-g, syscall.SIGKILL)
	}
}

// exitText says how a waited-for process ended, from Wait's error.
func exitText(err error) string {
	if err == nil {
		return "exited with status 0"
	}
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
			return "was killed by signal " + ws.Signal().String()
		}
		return fmt.Sprintf("exited with status %d", ee.ExitCode())
	}
	return "failed: " + err.Error()
}
