// SPDX-License-Identifier: Apache-2.0

package main

import (
	"bufio"
	"errors"
	"io"
	"net"
	"strconv"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// ndjsonConn is one native-protocol connection. The reading goroutine parses requests and
// submits them; the writer goroutine writes replies as the scheduler delivers them.
type ndjsonConn struct {
	s  *server
	c  net.Conn
	br *bufio.Reader

	mu       sync.Mutex
	out      []Reply
	inflight map[*pendingRequest]struct{}
	readDone bool // no more requests will come (EOF, error, or shutdown)
	stopped  bool // stopReading was called: its deadline must stay
	gone     bool // the client is gone: nothing more is written
	wake     chan struct{}
	space    chan struct{} // signalled when in-flight drops below the limit

	// Replies not yet written (in out or being written), and their size: they count
	// against max_in_flight_per_connection, so that a client pipelining requests without
	// reading its replies stops being read instead of growing the daemon (docs/design.md §8).
	unwritten, unwrittenBytes int
}

func newNDJSONConn(s *server, c net.Conn, br *bufio.Reader) *ndjsonConn {
	return &ndjsonConn{s: s, c: c, br: br, inflight: make(map[*pendingRequest]struct{}),
		wake: make(chan struct{}, 1), space: make(chan struct{}, 1)}
}

func notifyChan(ch chan struct{}) {
	select {
	case ch <- struct{}{}:
	default:
	}
}

// deliver is the scheduler's replySink; it never blocks.
func (nc *ndjsonConn) deliver(p *pendingRequest, r Reply) {
	nc.mu.Lock()
	delete(nc.inflight, p)
	nc.queueLocked(r)
	nc.mu.Unlock()
	notifyChan(nc.wake)
}

func (nc *ndjsonConn) push(r Reply) {
	nc.mu.Lock()
	nc.queueLocked(r)
	nc.mu.Unlock()
	notifyChan(nc.wake)
}

// queueLocked adds a reply to be written. nc.mu is held.
func (nc *ndjsonConn) queueLocked(r Reply) {
	if nc.gone {
		return
	}
	nc.out = append(nc.out, r)
	nc.unwritten++
	nc.unwrittenBytes += replyWeight(r)
}

// maxUnwrittenBytes bounds the replies a connection holds for a client that does not read
// them (status documents are kilobytes each): past it the connection is not read.
const maxUnwrittenBytes = 4 << 20

// replyWeight estimates the bytes a reply holds: its documents and a fixed part.
func replyWeight(r Reply) int {
	return 128 + len(r.ErrorMessage) + len(r.Stats) + len(r.Task) + len(r.Tasks) + len(r.Schedules)
}

// hasSpaceLocked reports whether another request may be read. nc.mu is held.
func (nc *ndjsonConn) hasSpaceLocked() bool {
	return len(nc.inflight)+nc.unwritten < nc.s.limits.Load().maxInFlight && nc.unwrittenBytes < maxUnwrittenBytes
}

// serve runs the connection to its end: the client is gone, or it sent EOF and every reply
// has been written.
func (nc *ndjsonConn) serve() {
	writerDone := make(chan struct{})
	go func() {
		defer close(writerDone)
		nc.writeLoop()
	}()
	err := nc.readLoop()
	nc.mu.Lock()
	nc.readDone = true
	nc.mu.Unlock()
	notifyChan(nc.wake)
	if err != nil && !errors.Is(err, io.EOF) && !errors.Is(err, errStopReading) {
		nc.clientGone() // a read error other than EOF: the connection is broken
	}
	hupDone := make(chan struct{})
	var hupWG sync.WaitGroup
	if uc, ok := nc.c.(*net.UnixConn); ok && !nc.isGone() {
		// EOF only means "no more requests"; a Unix peer that closed completely shows POLLHUP.
		hupWG.Add(1)
		go func() {
			defer hupWG.Done()
			if waitHangup(uc, hupDone) {
				nc.clientGone()
			}
		}()
	}
	<-writerDone
	close(hupDone)
	hupWG.Wait()
	nc.c.Close()
}

var errStopReading = errors.New("stop reading")

// stopReading makes the reading goroutine stop at its next read (daemon shutdown). Replies
// already owed are still written.
func (nc *ndjsonConn) stopReading() {
	nc.mu.Lock()
	nc.stopped = true
	nc.mu.Unlock()
	_ = nc.c.SetReadDeadline(time.Now())
}

// firstLineRead lifts client_timeout once the first line is in: a native client may then
// stay idle between requests (max_connections bounds how many do).
func (nc *ndjsonConn) firstLineRead() {
	nc.mu.Lock()
	if !nc.stopped {
		_ = nc.c.SetReadDeadline(time.Time{})
	}
	nc.mu.Unlock()
}

func (nc *ndjsonConn) isGone() bool {
	nc.mu.Lock()
	defer nc.mu.Unlock()
	return nc.gone
}

// clientGone stops writing and cancels every request still in flight, so queued jobs that
// nobody else waits for are dropped.
func (nc *ndjsonConn) clientGone() {
	nc.mu.Lock()
	if nc.gone {
		nc.mu.Unlock()
		return
	}
	nc.gone = true
	nc.out = nil
	nc.unwritten, nc.unwrittenBytes = 0, 0
	pending := make([]*pendingRequest, 0, len(nc.inflight))
	for p := range nc.inflight {
		pending = append(pending, p)
	}
	nc.inflight = map[*pendingRequest]struct{}{}
	nc.mu.Unlock()
	notifyChan(nc.wake)
	notifyChan(nc.space)
	for _, p := range pending {
		nc.s.sched.cancel(p)
	}
	nc.c.Close()
}

func (nc *ndjsonConn) readLoop() error {
	for first := true; ; first = false {
		maxLine := nc.s.limits.Load().maxLine
		line, err := readLimitedLine(nc.br, maxLine)
		if first && (err == nil || errors.Is(err, errLineTooLong)) {
			nc.firstLineRead()
		}
		if errors.Is(err, errLineTooLong) {
			nc.s.invalid.Add(1)
			nc.push(errorReply(nil, "invalid request: line longer than max_line_bytes ("+strconv.Itoa(maxLine)+" bytes)"))
			continue
		}
		if len(line) > 0 {
			nc.handleLine(line)
		}
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				return errStopReading
			}
			return err
		}
		if !nc.waitForSpace() {
			return errStopReading
		}
	}
}

// waitForSpace blocks while the connection has max_in_flight_per_connection requests in
// flight (back-pressure: we stop reading). It returns false if the client is gone.
func (nc *ndjsonConn) waitForSpace() bool {
	for {
		nc.mu.Lock()
		space, gone := nc.hasSpaceLocked(), nc.gone
		nc.mu.Unlock()
		if gone {
			return false
		}
		if space {
			return true
		}
		<-nc.space
	}
}

func (nc *ndjsonConn) handleLine(line []byte) {
	req, err := parseRequest(line)
	if err != nil {
		if errors.Is(err, errEmptyLine) {
			return
		}
		nc.s.invalid.Add(1)
		nc.push(requestErrorReply(err))
		return
	}
	// Until the renderers are ready, route waits (the reader with it), as a connection
	// would in the listen backlog.
	rep, p := nc.s.route(req, protoNative, nil)
	if p == nil {
		nc.push(rep)
		return
	}
	p.sink = nc
	nc.mu.Lock()
	if nc.gone {
		nc.mu.Unlock()
		return
	}
	nc.inflight[p] = struct{}{}
	nc.mu.Unlock()
	nc.s.sched.submit(p)
}

// writeLoop writes replies as they come. It returns when the client is gone, or when reading
// is done and nothing is in flight or waiting to be written.
func (nc *ndjsonConn) writeLoop() {
	bw := bufio.NewWriterSize(nc.c, 32<<10)
	var batch []Reply
	for {
		nc.mu.Lock()
		batch, nc.out = nc.out, batch[:0]
		finished := nc.gone || (nc.readDone && len(nc.inflight) == 0 && len(batch) == 0)
		nc.mu.Unlock()
		if finished {
			return
		}
		if len(batch) == 0 {
			<-nc.wake
			continue
		}
		_ = nc.c.SetWriteDeadline(time.Now().Add(writeTimeout))
		weight := 0
		for i := range batch {
			weight += replyWeight(batch[i])
			bw.Write(marshalReply(batch[i]))
			batch[i] = Reply{}
		}
		if err := bw.Flush(); err != nil {
			nc.s.log.Debug("client gone: write failed", "remote", nc.c.RemoteAddr().String(), "error", err)
			nc.clientGone()
			return
		}
		nc.mu.Lock()
		if !nc.gone {
			nc.unwritten -= len(batch)
			nc.unwrittenBytes -= weight
		}
		nc.mu.Unlock()
		notifyChan(nc.space)
	}
}

// writeTimeout bounds one write to a client; one that does not read its replies for this
// long counts as gone.
const writeTimeout = 30 * time.Second

// waitHangup waits until the Unix peer has closed its end completely (POLLHUP; a half-close
// shows only POLLRDHUP) or done is closed. It polls in short rounds so that done is noticed.
func waitHangup(c *net.UnixConn, done <-chan struct{}) bool {
	raw, err := c.SyscallConn()
	if err != nil {
		return false
	}
	for {
		select {
		case <-done:
			return false
		default:
		}
		hup := false
		cerr := raw.Control(func(fd uintptr) {
			fds := []unix.PollFd{{Fd: int32(fd), Events: 0}}
			n, err := unix.Poll(fds, 200)
			hup = err == nil && n > 0 && fds[0].Revents&(unix.POLLHUP|unix.POLLERR) != 0
		})
		if cerr != nil {
			return false
		}
		if hup {
			return true
		}
	}
}
