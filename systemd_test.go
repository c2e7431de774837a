// SPDX-License-Identifier: Apache-2.0

package main

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// The test binary plays a socket-activated daemon: the parent starts it through
// `sh -c 'export LISTEN_PID=$$; exec …'` (the shell's pid becomes the test binary's
// pid at exec, so LISTEN_PID is right without a race) with the sockets in ExtraFiles,
// which land on fds 3, 4, … as systemd would put them.
const (
	sdHelperEnv     = "MAPPROXY_RENDERD_TEST_SYSTEMD_HELPER" // mode: "activation" or "activation-error"
	sdHelperWantEnv = "MAPPROXY_RENDERD_TEST_SYSTEMD_WANT"   // activation: "unix,tcp"; activation-error: error substring
	sdHelperOK      = "systemd-helper: ok"
)

// TestSystemdHelperProcess is not a test: it is the child of the activation tests
// and does nothing unless sdHelperEnv is set.
func TestSystemdHelperProcess(t *testing.T) {
	mode := os.Getenv(sdHelperEnv)
	if mode == "" {
		return
	}
	want := os.Getenv(sdHelperWantEnv)
	nfds, _ := strconv.Atoi(os.Getenv("LISTEN_FDS"))
	listeners, err := listenersFromSystemd()

	for _, k := range []string{"LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"} {
		if v, ok := os.LookupEnv(k); ok {
			t.Errorf("%s=%q still set after listenersFromSystemd", k, v)
		}
	}
	// Every inherited fd is closed or close-on-exec now, and so is every
	// listener's. (Only these: the test may run with other fds inherited from
	// outside, which are none of listenersFromSystemd's business.)
	for fd := 3; fd < 3+nfds; fd++ {
		if sdInheritable(t, fd) {
			t.Errorf("inherited fd %d open without close-on-exec", fd)
		}
	}
	for _, l := range listeners {
		rc, err := l.(syscall.Conn).SyscallConn()
		if err != nil {
			t.Fatal(err)
		}
		rc.Control(func(fd uintptr) {
			if sdInheritable(t, int(fd)) {
				t.Errorf("listener %s: fd %d without close-on-exec", l.Addr(), fd)
			}
		})
	}

	switch mode {
	case "activation-error":
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Fatalf("listenersFromSystemd() error = %v, want one containing %q", err, want)
		}
		if listeners != nil {
			t.Errorf("listenersFromSystemd() = %v with an error, want nil", listeners)
		}
	case "activation":
		if err != nil {
			t.Fatalf("listenersFromSystemd() error = %v", err)
		}
		nets := strings.Split(want, ",")
		if len(listeners) != len(nets) {
			t.Fatalf("got %d listeners, want %d (%s)", len(listeners), len(nets), want)
		}
		for i, l := range listeners {
			if got := l.Addr().Network(); got != nets[i] {
				t.Errorf("listener %d: network %q, want %q", i, got, nets[i])
			}
		}
		deadline := time.Now().Add(30 * time.Second)
		for _, l := range listeners {
			if err := sdEchoOnce(l, deadline); err != nil {
				t.Errorf("echo on %s %s: %v", l.Addr().Network(), l.Addr(), err)
			}
		}
		for _, l := range listeners {
			if err := l.Close(); err != nil {
				t.Errorf("close %s: %v", l.Addr(), err)
			}
			if l.Addr().Network() == "unix" {
				if _, err := os.Lstat(l.Addr().String()); err != nil {
					t.Errorf("socket path after Close: %v, want it left in place for systemd", err)
				}
			}
		}
	default:
		t.Fatalf("unknown %s=%q", sdHelperEnv, mode)
	}
	if !t.Failed() {
		fmt.Println(sdHelperOK)
	}
}

// sdEchoOnce accepts one connection on l and echoes one line back.
func sdEchoOnce(l net.Listener, deadline time.Time) error {
	if dl, ok := l.(interface{ SetDeadline(time.Time) error }); ok {
		dl.SetDeadline(deadline)
	}
	c, err := l.Accept()
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetDeadline(deadline)
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return err
	}
	_, err = c.Write([]byte("echo " + line))
	return err
}

// sdInheritable reports whether fd is open and would survive an exec.
func sdInheritable(t *testing.T, fd int) bool {
	t.Helper()
	flags, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0)
	if errors.Is(err, unix.EBADF) {
		return false
	}
	if err != nil {
		t.Fatalf("fcntl(%d, F_GETFD): %v", fd, err)
	}
	return flags&unix.FD_CLOEXEC == 0
}

// sdHelperCmd prepares the test binary as a socket-activated child with files on
// fds 3, 4, … and LISTEN_FDS set to their number. extraEnv comes last and wins.
func sdHelperCmd(t *testing.T, ctx context.Context, mode, want string, files []*os.File, extraEnv ...string) (*exec.Cmd, *bytes.Buffer) {
	t.Helper()
	exe, err := os.Executable()
	if err != nil {
		t.Fatalf("os.Executable: %v", err)
	}
	cmd := exec.CommandContext(ctx, "/bin/sh", "-c", `export LISTEN_PID=$$; exec "$0" "$@"`,
		exe, "-test.run=^TestSystemdHelperProcess$", "-test.count=1")
	cmd.WaitDelay = 5 * time.Second
	cmd.ExtraFiles = files
	cmd.Env = append(os.Environ(),
		sdHelperEnv+"="+mode,
		sdHelperWantEnv+"="+want,
		"LISTEN_FDS="+strconv.Itoa(len(files)),
		"LISTEN_FDNAMES=",
		"NOTIFY_SOCKET=",
		sdHelperGORACE(),
	)
	cmd.Env = append(cmd.Env, extraEnv...)
	var out bytes.Buffer
	cmd.Stdout = &out
	cmd.Stderr = &out
	return cmd, &out
}

// sdHelperGORACE keeps the user's race detector options for a helper child but
// drops the race runtime's one-second sleep at exit (atexit_sleep_ms).
func sdHelperGORACE() string {
	opts := os.Getenv("GORACE")
	if opts != "" {
		opts += " "
	}
	return "GORACE=" + opts + "atexit_sleep_ms=0"
}

func sdListenerFile(t *testing.T, l interface{ File() (*os.File, error) }) *os.File {
	t.Helper()
	f, err := l.File()
	if err != nil {
		t.Fatalf("listener file: %v", err)
	}
	t.Cleanup(func() { f.Close() })
	return f
}

func TestSystemdActivation(t *testing.T) {
	for _, unixFirst := range []bool{true, false} {
		name := "tcp,unix"
		if unixFirst {
			name = "unix,tcp"
		}
		t.Run(name, func(t *testing.T) {
			sock := filepath.Join(t.TempDir(), "a.sock")
			ul, err := net.ListenUnix("unix", &net.UnixAddr{Name: sock, Net: "unix"})
			if err != nil {
				t.Fatal(err)
			}
			ul.SetUnlinkOnClose(false) // the child serves it; we only made it, as systemd does
			defer ul.Close()
			tl, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
			if err != nil {
				t.Fatal(err)
			}
			defer tl.Close()
			tcpAddr := tl.Addr().String()

			files := []*os.File{sdListenerFile(t, ul), sdListenerFile(t, tl)}
			if !unixFirst {
				files[0], files[1] = files[1], files[0]
			}
			ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
			defer cancel()
			cmd, out := sdHelperCmd(t, ctx, "activation", name, files, "LISTEN_FDNAMES=one:two")
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			// Only the child may accept: drop our copies (the path stays, see above).
			for _, f := range files {
				f.Close()
			}
			ul.Close()
			tl.Close()

			// The child serves the listeners one after the other in fd order:
			// connect and send on both before waiting for either echo.
			var clients []*sdEchoClient
			for _, c := range []struct{ network, addr string }{{"unix", sock}, {"tcp", tcpAddr}} {
				ec, err := sdDialEcho(c.network, c.addr)
				if err != nil {
					t.Errorf("%s %s: %v", c.network, c.addr, err)
					continue
				}
				defer ec.conn.Close()
				clients = append(clients, ec)
			}
			for _, ec := range clients {
				if err := ec.check(); err != nil {
					t.Errorf("%s %s: %v", ec.network, ec.conn.RemoteAddr(), err)
				}
			}
			err = cmd.Wait()
			if err != nil || !strings.Contains(out.String(), sdHelperOK) {
				t.Fatalf("helper: %v\n%s", err, out)
			}
			if fi, err := os.Lstat(sock); err != nil || fi.Mode().Type() != os.ModeSocket {
				t.Errorf("socket path after the child closed its listener: %v, want it still there", err)
			}
		})
	}
}

// sdEchoClient is one connection to the activated child.
type sdEchoClient struct {
	network, msg string
	conn         net.Conn
}

// sdDialEcho connects and sends one line.
func sdDialEcho(network, addr string) (*sdEchoClient, error) {
	c, err := net.DialTimeout(network, addr, 10*time.Second)
	if err != nil {
		return nil, err
	}
	c.SetDeadline(time.Now().Add(30 * time.Second))
	ec := &sdEchoClient{network: network, msg: "hello " + network + "\n", conn: c}
	if _, err := c.Write([]byte(ec.msg)); err != nil {
		c.Close()
		return nil, err
	}
	return ec, nil
}

// check reads the echo.
func (ec *sdEchoClient) check() error {
	got, err := bufio.NewReader(ec.conn).ReadString('\n')
	if err != nil {
		return err
	}
	if want := "echo " + ec.msg; got != want {
		return fmt.Errorf("got %q, want %q", got, want)
	}
	return nil
}

func TestSystemdActivationBadFD(t *testing.T) {
	dir := t.TempDir()
	regular := func(t *testing.T) *os.File {
		f, err := os.Create(filepath.Join(dir, "regular"))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { f.Close() })
		return f
	}
	socketFile := func(t *testing.T, typ int, listen bool) *os.File {
		fd, err := unix.Socket(unix.AF_INET, typ|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			t.Fatal(err)
		}
		f := os.NewFile(uintptr(fd), "socket")
		t.Cleanup(func() { f.Close() })
		if err := unix.Bind(fd, &unix.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}); err != nil {
			t.Fatal(err)
		}
		if listen {
			if err := unix.Listen(fd, 8); err != nil {
				t.Fatal(err)
			}
		}
		return f
	}
	unixListener := func(t *testing.T) *os.File {
		l, err := net.ListenUnix("unix", &net.UnixAddr{Name: filepath.Join(dir, "l.sock"), Net: "unix"})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { l.Close() })
		return sdListenerFile(t, l)
	}
	pipe := func(t *testing.T) *os.File {
		r, w, err := os.Pipe()
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { r.Close(); w.Close() })
		return r
	}

	tests := []struct {
		name    string
		files   func(t *testing.T) []*os.File
		names   string
		wantErr string
	}{
		{"regular file", func(t *testing.T) []*os.File { return []*os.File{regular(t)} }, "", "fd 3 (LISTEN_FD_3) is not a socket"},
		{"pipe", func(t *testing.T) []*os.File { return []*os.File{pipe(t)} }, "", "fd 3 (LISTEN_FD_3) is not a socket"},
		{"udp socket", func(t *testing.T) []*os.File { return []*os.File{socketFile(t, unix.SOCK_DGRAM, false)} }, "", "fd 3 (LISTEN_FD_3) is not a stream socket"},
		{"not listening", func(t *testing.T) []*os.File { return []*os.File{socketFile(t, unix.SOCK_STREAM, false)} }, "", "fd 3 (LISTEN_FD_3) is not a listening socket"},
		{"good then bad, named", func(t *testing.T) []*os.File { return []*os.File{unixListener(t), regular(t)} }, "good:bad", "fd 4 (bad) is not a socket"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
			defer cancel()
			cmd, out := sdHelperCmd(t, ctx, "activation-error", tt.wantErr, tt.files(t), "LISTEN_FDNAMES="+tt.names)
			if err := cmd.Run(); err != nil || !strings.Contains(out.String(), sdHelperOK) {
				t.Fatalf("helper: %v\n%s", err, out)
			}
		})
	}
}

// sdClearEnv sets the variables for the duration of the test (t.Setenv restores
// them) and unsets those given as "".
func sdClearEnv(t *testing.T, kv map[string]string) {
	t.Helper()
	for k, v := range kv {
		t.Setenv(k, v)
		if v == "" {
			os.Unsetenv(k)
		}
	}
}

// In-process cases only: none of them may touch fds 3 and up, which belong to
// the Go runtime and the test framework here.
func TestSystemdListenersNotActivated(t *testing.T) {
	me := strconv.Itoa(os.Getpid())
	other := strconv.Itoa(os.Getpid() + 1)
	tests := []struct {
		name, pid, fds string
		wantErr        string
	}{
		{"unset", "", "", ""},
		{"another process", other, "2", ""},
		{"pid without fds", me, "", ""},
		{"fds without pid", "", "2", ""},
		{"zero fds", me, "0", ""},
		{"bad pid", "x", "1", "invalid LISTEN_PID"},
		{"bad fds", me, "x", "invalid LISTEN_FDS"},
		{"negative fds", me, "-1", "invalid LISTEN_FDS"},
		{"absurd fds", me, "100000", "invalid LISTEN_FDS"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			sdClearEnv(t, map[string]string{"LISTEN_PID": tt.pid, "LISTEN_FDS": tt.fds, "LISTEN_FDNAMES": "a:b"})
			ls, err := listenersFromSystemd()
			if ls != nil {
				t.Errorf("listenersFromSystemd() = %v, want nil", ls)
			}
			switch {
			case tt.wantErr == "" && err != nil:
				t.Errorf("listenersFromSystemd() error = %v, want nil", err)
			case tt.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tt.wantErr)):
				t.Errorf("listenersFromSystemd() error = %v, want one containing %q", err, tt.wantErr)
			}
			for _, k := range []string{"LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"} {
				if v, ok := os.LookupEnv(k); ok {
					t.Errorf("%s=%q still set", k, v)
				}
			}
		})
	}
}

// sdNotifyListener listens on a unixgram socket named name and returns a func
// reading the next datagram with a deadline.
func sdNotifyListener(t *testing.T, name string) func() (string, error) {
	t.Helper()
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: name, Net: "unixgram"})
	if err != nil {
		t.Fatalf("listen %q: %v", name, err)
	}
	t.Cleanup(func() { conn.Close() })
	return func() (string, error) {
		buf := make([]byte, 4096)
		conn.SetReadDeadline(time.Now().Add(10 * time.Second))
		n, err := conn.Read(buf)
		return string(buf[:n]), err
	}
}

func TestSystemdNotifier(t *testing.T) {
	for _, tt := range []struct{ name, addr string }{
		{"path", filepath.Join(t.TempDir(), "notify")},
		{"abstract", fmt.Sprintf("@mapproxy-renderd-test-%d-%d", os.Getpid(), time.Now().UnixNano())},
	} {
		t.Run(tt.name, func(t *testing.T) {
			next := sdNotifyListener(t, tt.addr)
			sdClearEnv(t, map[string]string{"NOTIFY_SOCKET": tt.addr, "WATCHDOG_USEC": "", "WATCHDOG_PID": ""})
			n, err := newSDNotifierFromEnv()
			if err != nil || n == nil {
				t.Fatalf("newSDNotifierFromEnv() = %v, %v, want a notifier", n, err)
			}
			if v, ok := os.LookupEnv("NOTIFY_SOCKET"); ok {
				t.Errorf("NOTIFY_SOCKET=%q still set", v)
			}

			for _, c := range []struct {
				send []string
				want string
			}{
				{[]string{"READY=1", "STATUS=serving"}, "READY=1\nSTATUS=serving"},
				{[]string{"STATUS=two\nlines", "WATCHDOG=1"}, "STATUS=two lines\nWATCHDOG=1"},
				{nil, ""}, // sends nothing: the next read gets the next message
				{[]string{"RELOADING=1", "MONOTONIC_USEC=42"}, "RELOADING=1\nMONOTONIC_USEC=42"},
			} {
				if err := n.Notify(c.send...); err != nil {
					t.Fatalf("Notify(%q) = %v", c.send, err)
				}
				if c.want == "" {
					continue
				}
				got, err := next()
				if err != nil || got != c.want {
					t.Errorf("Notify(%q) delivered %q, %v, want %q", c.send, got, err, c.want)
				}
			}

			if err := n.Close(); err != nil {
				t.Errorf("Close() = %v", err)
			}
			if err := n.Notify("STOPPING=1"); !errors.Is(err, net.ErrClosed) {
				t.Errorf("Notify after Close = %v, want net.ErrClosed", err)
			}
			if err := n.Close(); err != nil {
				t.Errorf("second Close() = %v", err)
			}
		})
	}
}

func TestSystemdNotifierNoListener(t *testing.T) {
	sdClearEnv(t, map[string]string{"NOTIFY_SOCKET": filepath.Join(t.TempDir(), "nobody-here"), "WATCHDOG_USEC": "", "WATCHDOG_PID": ""})
	n, err := newSDNotifierFromEnv()
	if err != nil {
		t.Fatal(err)
	}
	if err := n.Notify("READY=1"); err == nil {
		t.Error("Notify to a missing socket = nil, want an error")
	}
}

func TestSystemdNotifierNil(t *testing.T) {
	var n *sdNotifier
	if err := n.Notify("READY=1"); err != nil {
		t.Errorf("nil Notify = %v, want nil", err)
	}
	if d := n.WatchdogInterval(); d != 0 {
		t.Errorf("nil WatchdogInterval = %v, want 0", d)
	}
	if err := n.Close(); err != nil {
		t.Errorf("nil Close = %v, want nil", err)
	}
}

func TestSystemdNotifierFromEnv(t *testing.T) {
	me := strconv.Itoa(os.Getpid())
	sock := filepath.Join(t.TempDir(), "notify") // never written to here
	tests := []struct {
		name                string
		socket, usec, wdPID string
		wantNil             bool
		wantWatchdog        time.Duration
		wantErr             string
	}{
		{name: "not under systemd", wantNil: true},
		{name: "watchdog without socket", usec: "30000000", wantNil: true},
		{name: "no watchdog", socket: sock},
		{name: "watchdog, no pid", socket: sock, usec: "30000000", wantWatchdog: 15 * time.Second},
		{name: "watchdog, our pid", socket: sock, usec: "30000000", wdPID: me, wantWatchdog: 15 * time.Second},
		{name: "watchdog, other pid", socket: sock, usec: "30000000", wdPID: "1"},
		{name: "watchdog zero", socket: sock, usec: "0"},
		{name: "abstract", socket: "@renderd-test", usec: "1000", wantWatchdog: 500 * time.Microsecond},
		{name: "bad usec", socket: sock, usec: "30s", wantErr: "invalid WATCHDOG_USEC"},
		{name: "negative usec", socket: sock, usec: "-1", wantErr: "invalid WATCHDOG_USEC"},
		{name: "bad pid", socket: sock, usec: "1000", wdPID: "me", wantErr: "invalid WATCHDOG_PID"},
		{name: "relative socket", socket: "run/notify", wantErr: "unsupported NOTIFY_SOCKET"},
		{name: "vsock", socket: "vsock:2:1234", wantErr: "unsupported NOTIFY_SOCKET"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			sdClearEnv(t, map[string]string{"NOTIFY_SOCKET": tt.socket, "WATCHDOG_USEC": tt.usec, "WATCHDOG_PID": tt.wdPID})
			n, err := newSDNotifierFromEnv()
			for _, k := range []string{"NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"} {
				if v, ok := os.LookupEnv(k); ok {
					t.Errorf("%s=%q still set", k, v)
				}
			}
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Errorf("error = %v, want one containing %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("error = %v", err)
			}
			if (n == nil) != tt.wantNil {
				t.Fatalf("notifier = %v, want nil: %v", n, tt.wantNil)
			}
			if got := n.WatchdogInterval(); got != tt.wantWatchdog {
				t.Errorf("WatchdogInterval() = %v, want %v", got, tt.wantWatchdog)
			}
		})
	}
}

func TestSystemdMonotonicUsec(t *testing.T) {
	parse := func(s string) int64 {
		t.Helper()
		v, ok := strings.CutPrefix(s, "MONOTONIC_USEC=")
		if !ok {
			t.Fatalf("monotonicUsec() = %q, want MONOTONIC_USEC=<n>", s)
		}
		n, err := strconv.ParseInt(v, 10, 64)
		if err != nil || n <= 0 {
			t.Fatalf("monotonicUsec() = %q, want a positive integer", s)
		}
		return n
	}
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err != nil {
		t.Fatal(err)
	}
	before := ts.Nano() / 1000
	a := parse(monotonicUsec())
	b := parse(monotonicUsec())
	if a < before || b < a {
		t.Errorf("monotonicUsec went %d, %d after clock %d, want non-decreasing", a, b, before)
	}
}

// TestSystemdUnitsVerify runs systemd-analyze verify on the shipped units, with
// ExecStart pointed at an executable that exists here (the test binary).
func TestSystemdUnitsVerify(t *testing.T) {
	analyze, err := exec.LookPath("systemd-analyze")
	if err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("systemd-analyze not installed: %v", err)
		}
		t.Skipf("systemd-analyze not installed: %v", err)
	}
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	units := []string{"renderd.socket", "renderd.service"}
	execStart := regexp.MustCompile(`(?m)^(ExecStart=[-@:+!]*)\S+`)
	var paths []string
	for _, u := range units {
		b, err := os.ReadFile(u)
		if err != nil {
			t.Fatal(err)
		}
		b = execStart.ReplaceAll(b, []byte("${1}"+exe))
		p := filepath.Join(dir, u)
		if err := os.WriteFile(p, b, 0o644); err != nil {
			t.Fatal(err)
		}
		paths = append(paths, p)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	// --man=no: Documentation=man:mapproxy-renderd(8) exists only once the package is
	// installed (TestDebianPackage verifies the installed units with it).
	cmd := exec.CommandContext(ctx, analyze, append([]string{"verify", "--man=no"}, paths...)...)
	cmd.WaitDelay = 5 * time.Second
	cmd.Env = append(os.Environ(), "SYSTEMD_LOG_COLOR=0", "SYSTEMD_PAGER=")
	out, runErr := cmd.CombinedOutput()
	// systemd-analyze also complains about the host's own units at times; only
	// lines naming ours count.
	var ours []string
	for _, line := range strings.Split(string(out), "\n") {
		for _, u := range units {
			if strings.Contains(line, u) {
				ours = append(ours, line)
				break
			}
		}
	}
	if len(ours) > 0 {
		t.Errorf("systemd-analyze verify on our units:\n%s", strings.Join(ours, "\n"))
	}
	if runErr != nil {
		t.Logf("systemd-analyze verify exited with %v (no line names our units):\n%s", runErr, out)
	}
}
