// SPDX-License-Identifier: Apache-2.0

package main

// The two halves of the systemd protocol this daemon speaks: socket activation
// (sd_listen_fds(3)) and readiness/status/watchdog notification (sd_notify(3)).
// About a hundred lines of stdlib and x/sys instead of a dependency on go-systemd.

import (
	"errors"
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// listenFDsStart is SD_LISTEN_FDS_START: systemd passes sockets from fd 3 on.
const listenFDsStart = 3

// maxListenFDs bounds LISTEN_FDS so that a bogus value cannot make us walk
// (and set flags on) an absurd range of descriptors.
const maxListenFDs = 1 << 12

// listenersFromSystemd returns the listeners systemd passed by socket activation
// (LISTEN_PID == os.Getpid(), LISTEN_FDS = n, fds 3 .. 3+n-1), in fd order.
// Not activated (variables unset or LISTEN_PID another process) is the normal path and returns nil, nil.
// It sets close-on-exec on every inherited fd and unsets LISTEN_PID, LISTEN_FDS and LISTEN_FDNAMES
// so that renderer subprocesses inherit neither the fds nor the variables.
// Unix stream and TCP listeners both come back as net.Listener (tell apart via Addr().Network() "unix"/"tcp").
// An fd that is not a listening stream socket is an error naming the fd.
//
// The variables are unset on every path, also when they name another process: they
// are never meant for our children. On error, the listeners made so far are closed;
// inherited fds not yet turned into listeners stay open but close-on-exec (they may
// not even be ours when LISTEN_FDS lies, so they are not closed).
// Unix listeners never unlink their socket path on Close: systemd owns it.
// Call it once, early, before starting any subprocess; it reads and changes the
// process environment, so it must not run concurrently with other environment users.
func listenersFromSystemd() ([]net.Listener, error) {
	pidStr, havePID := os.LookupEnv("LISTEN_PID")
	fdsStr, haveFDs := os.LookupEnv("LISTEN_FDS")
	names := os.Getenv("LISTEN_FDNAMES")
	os.Unsetenv("LISTEN_PID")
	os.Unsetenv("LISTEN_FDS")
	os.Unsetenv("LISTEN_FDNAMES")

	if !havePID || !haveFDs {
		return nil, nil
	}
	pid, err := strconv.Atoi(pidStr)
	if err != nil {
		return nil, fmt.Errorf("invalid LISTEN_PID %q", pidStr)
	}
	if pid != os.Getpid() {
		return nil, nil
	}
	n, err := strconv.Atoi(fdsStr)
	if err != nil || n < 0 || n > maxListenFDs {
		return nil, fmt.Errorf("invalid LISTEN_FDS %q", fdsStr)
	}
	if n == 0 {
		return nil, nil
	}

	// Close-on-exec first, on all of them, so that even an error below leaves
	// nothing for a child to inherit.
	for fd := listenFDsStart; fd < listenFDsStart+n; fd++ {
		unix.CloseOnExec(fd)
	}

	var fdNames []string
	if names != "" {
		fdNames = strings.Split(names, ":")
	}
	listeners := make([]net.Listener, 0, n)
	for i := range n {
		fd := listenFDsStart + i
		name := "LISTEN_FD_" + strconv.Itoa(fd)
		if i < len(fdNames) && fdNames[i] != "" {
			name = fdNames[i]
		}
		l, err := inheritedListener(fd, name)
		if err != nil {
			for _, l := range listeners {
				l.Close()
			}
			return nil, err
		}
		listeners = append(listeners, l)
	}
	return listeners, nil
}

// inheritedListener turns the inherited listening socket fd into a net.Listener
// and closes fd (the listener holds a close-on-exec duplicate). fd is checked
// before it is wrapped, so on error it is left open.
func inheritedListener(fd int, name string) (net.Listener, error) {
	typ, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_TYPE)
	if errors.Is(err, unix.ENOTSOCK) {
		return nil, fmt.Errorf("fd %d (%s) is not a socket", fd, name)
	}
	if err != nil {
		return nil, fmt.Errorf("fd %d (%s): %w", fd, name, err)
	}
	if typ != unix.SOCK_STREAM {
		return nil, fmt.Errorf("fd %d (%s) is not a stream socket", fd, name)
	}
	acc, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ACCEPTCONN)
	if err != nil {
		return nil, fmt.Errorf("fd %d (%s): %w", fd, name, err)
	}
	if acc == 0 {
		return nil, fmt.Errorf("fd %d (%s) is not a listening socket", fd, name)
	}

	f := os.NewFile(uintptr(fd), name)
	l, err := net.FileListener(f) // dups fd (close-on-exec)
	f.Close()
	if err != nil {
		return nil, fmt.Errorf("fd %d (%s): %w", fd, name, err)
	}
	switch l := l.(type) {
	case *net.UnixListener:
		l.SetUnlinkOnClose(false)
	case *net.TCPListener:
	default:
		l.Close()
		return nil, fmt.Errorf("fd %d (%s) is a %s listener, want unix or tcp", fd, name, l.Addr().Network())
	}
	return l, nil
}

// sdNotifier sends sd_notify(3) datagrams to $NOTIFY_SOCKET (a path or an abstract "@name").
// A nil *sdNotifier is valid: every method is a no-op, so callers never branch on systemd.
//
// Each Notify dials the socket afresh, as sd_notify does, so a notify socket that
// systemd re-created (daemon-reexec) keeps working. Methods are safe for concurrent use.
type sdNotifier struct {
	addr     *net.UnixAddr
	watchdog time.Duration // half of WATCHDOG_USEC, 0 when disabled

	closed atomic.Bool
}

// notifyTimeout bounds one send: systemd drains its socket promptly, and a stuck
// manager must not stall the caller (the watchdog then fires, as it should).
const notifyTimeout = 5 * time.Second

// newSDNotifierFromEnv reads NOTIFY_SOCKET, WATCHDOG_USEC and WATCHDOG_PID, then unsets all three
// (children must not notify on our behalf). Unset NOTIFY_SOCKET → nil, nil.
//
// The three are unset on every path, errors included. NOTIFY_SOCKET must be an
// absolute path or start with "@" (abstract); other forms (vsock:…) are an error.
// An unparsable WATCHDOG_USEC or WATCHDOG_PID is an error naming the variable.
func newSDNotifierFromEnv() (*sdNotifier, error) {
	sock := os.Getenv("NOTIFY_SOCKET")
	usecStr, haveUsec := os.LookupEnv("WATCHDOG_USEC")
	pidStr, havePID := os.LookupEnv("WATCHDOG_PID")
	os.Unsetenv("NOTIFY_SOCKET")
	os.Unsetenv("WATCHDOG_USEC")
	os.Unsetenv("WATCHDOG_PID")

	if sock == "" {
		return nil, nil
	}
	if sock[0] != '/' && sock[0] != '@' {
		return nil, fmt.Errorf("unsupported NOTIFY_SOCKET %q: want an absolute path or @abstract name", sock)
	}
	n := &sdNotifier{addr: &net.UnixAddr{Name: sock, Net: "unixgram"}}
	if haveUsec {
		usec, err := strconv.ParseUint(usecStr, 10, 63)
		if err != nil {
			return nil, fmt.Errorf("invalid WATCHDOG_USEC %q", usecStr)
		}
		ours := true
		if havePID {
			pid, err := strconv.Atoi(pidStr)
			if err != nil {
				return nil, fmt.Errorf("invalid WATCHDOG_PID %q", pidStr)
			}
			ours = pid == os.Getpid()
		}
		if ours {
			n.watchdog = time.Duration(usec) * time.Microsecond / 2
		}
	}
	return n, nil
}

// Notify sends the given state lines ("READY=1", "STATUS=…", "RELOADING=1", "STOPPING=1", "WATCHDOG=1",
// "MONOTONIC_USEC=…") as one datagram joined by "\n".
//
// A newline inside a state would start another assignment, so it is replaced by a
// space. No states sends nothing. After Close it returns net.ErrClosed.
func (n *sdNotifier) Notify(state ...string) error {
	if n == nil || len(state) == 0 {
		return nil
	}
	if n.closed.Load() {
		return fmt.Errorf("sd_notify: %w", net.ErrClosed)
	}

	lines := make([]string, len(state))
	for i, s := range state {
		lines[i] = strings.ReplaceAll(s, "\n", " ")
	}
	msg := strings.Join(lines, "\n")

	conn, err := net.DialUnix("unixgram", nil, n.addr)
	if err != nil {
		return fmt.Errorf("sd_notify: %w", err)
	}
	defer conn.Close()
	conn.SetWriteDeadline(time.Now().Add(notifyTimeout))
	if _, err := conn.Write([]byte(msg)); err != nil {
		return fmt.Errorf("sd_notify: %w", err)
	}
	return nil
}

// WatchdogInterval is half of WATCHDOG_USEC when the watchdog is enabled for this process
// (WATCHDOG_PID unset or our pid), else 0.
// Send "WATCHDOG=1" at least this often.
func (n *sdNotifier) WatchdogInterval() time.Duration {
	if n == nil {
		return 0
	}
	return n.watchdog
}

// Close makes later Notify calls fail. It tells systemd nothing: send
// "STOPPING=1" first. Closing twice is fine.
func (n *sdNotifier) Close() error {
	if n == nil {
		return nil
	}
	n.closed.Store(true)
	return nil
}

// monotonicUsec returns "MONOTONIC_USEC=<CLOCK_MONOTONIC in µs>", which systemd
// v253+ wants in the same datagram as "RELOADING=1".
func monotonicUsec() string {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err != nil {
		// CLOCK_MONOTONIC cannot fail on Linux; should it, send no
		// number rather than a wrong one.
		return "MONOTONIC_USEC="
	}
	usec := int64(ts.Sec)*1_000_000 + int64(ts.Nsec)/1_000
	return "MONOTONIC_USEC=" + strconv.FormatInt(usec, 10)
}
