// SPDX-License-Identifier: Apache-2.0

package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"regexp"
	"strconv"
	"sync"
	"sync/atomic"
	"time"
)

// server accepts connections on every listener, tells HTTP from NDJSON by the first line,
// and turns requests into scheduler submissions.
type server struct {
	log    *slog.Logger
	sched  *scheduler
	tasks  *taskManager // set before openUp; used only by requests served after it
	limits atomic.Pointer[serverLimits]

	httpSrv   *http.Server
	httpConns *chanListener

	// openCh is closed by openUp once the renderers are ready; until then requests wait
	// (health checks excepted). stopCh is closed when the listeners close (stopping).
	openCh, stopCh chan struct{}
	openOnce       sync.Once
	stopOnce       sync.Once

	mu        sync.Mutex
	listeners []net.Listener
	conns     map[*ndjsonConn]struct{}
	unsniffed map[net.Conn]struct{} // accepted, first line not seen yet
	closing   bool
	wg        sync.WaitGroup // accept loops and NDJSON connection goroutines

	open     atomic.Int64
	accepted atomic.Uint64
	refused  atomic.Uint64
	invalid  atomic.Uint64
}

func newServer(cfg Config, sched *scheduler, log *slog.Logger) *server {
	s := &server{
		log: log, sched: sched,
		conns:     make(map[*ndjsonConn]struct{}),
		unsniffed: make(map[net.Conn]struct{}),
		httpConns: newChanListener(),
		openCh:    make(chan struct{}),
		stopCh:    make(chan struct{}),
	}
	s.setLimits(cfg)
	s.httpSrv = &http.Server{
		Handler:           nil, // set below: the routes need s
		ReadHeaderTimeout: 30 * time.Second,
		IdleTimeout:       2 * time.Minute,
		MaxHeaderBytes:    64 << 10,
		ErrorLog:          slog.NewLogLogger(log.Handler(), slog.LevelDebug),
	}
	s.httpSrv.Handler = s.gate(s.routes())
	sched.connStats = s.counters
	return s
}

// serverLimits are the connection settings from the configuration; a reload swaps them
// whole. The allow-list applies to connections accepted after the swap.
type serverLimits struct {
	policy        accessPolicy
	tcpRule       socketRule // loopback TCP peers without an allow-list
	maxLine       int
	maxInFlight   int
	maxConns      int
	clientTimeout time.Duration // client_timeout: a first line, a POST body
	httpWait      time.Duration // http_wait: MapProxy's live POSTs get pending after this (0 = wait)
	seedBelow     int           // seed_priority_below: http_wait leaves the seed class alone
}

func (s *server) setLimits(cfg Config) {
	s.limits.Store(&serverLimits{
		policy:        newAccessPolicy(cfg.AllowedUIDs, cfg.AllowedGIDs),
		tcpRule:       newSocketRule(cfg),
		maxLine:       cfg.MaxLineBytes,
		maxInFlight:   cfg.MaxInFlight,
		maxConns:      cfg.MaxConnections,
		clientTimeout: time.Duration(cfg.ClientTimeout),
		httpWait:      time.Duration(cfg.HTTPWait),
		seedBelow:     cfg.SeedPriorityBelow,
	})
}

func (s *server) counters() connCounters {
	return connCounters{Open: s.open.Load(), Accepted: s.accepted.Load(), Refused: s.refused.Load(), Invalid: s.invalid.Load()}
}

// start serves HTTP connections handed over by the sniffer and every listener.
func (s *server) start(ls []net.Listener) {
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		_ = s.httpSrv.Serve(s.httpConns)
	}()
	s.mu.Lock()
	s.listeners = append(s.listeners, ls...)
	s.mu.Unlock()
	for _, l := range ls {
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			s.acceptLoop(l)
		}()
	}
}

// acceptLoop accepts until the listener is closed, backing off on temporary errors
// (EMFILE and friends) as net/http does.
func (s *server) acceptLoop(l net.Listener) {
	var delay time.Duration
	for {
		c, err := l.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			delay = min(max(2*delay, 5*time.Millisecond), time.Second)
			s.log.Warn("accept failed; retrying", "listener", l.Addr().String(), "error", err, "delay", delay)
			t := time.NewTimer(delay)
			<-t.C
			continue
		}
		delay = 0
		if !s.takeSlot() {
			s.refused.Add(1)
			s.log.Warn("too many connections; refusing one", "remote", c.RemoteAddr().String())
			_ = c.SetWriteDeadline(time.Now().Add(time.Second))
			_, _ = c.Write(marshalReply(errorReply(nil, "too many connections")))
			c.Close()
			continue
		}
		s.accepted.Add(1)
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			s.handle(c)
		}()
	}
}

// takeSlot counts a new connection if max_connections allows it.
func (s *server) takeSlot() bool {
	limit := int64(s.limits.Load().maxConns)
	for {
		n := s.open.Load()
		if n >= limit {
			return false
		}
		if s.open.CompareAndSwap(n, n+1) {
			return true
		}
	}
}

func (s *server) releaseSlot() { s.open.Add(-1) }

// httpRequestLine matches "METHOD SP target SP HTTP/1.x" (docs/design.md §2).
var httpRequestLine = regexp.MustCompile(`^[A-Z]{1,16} [^ \r\n]+ HTTP/1\.[0-9]\r?\n$`)

// sniff looks at the first line without consuming it and reports whether it is HTTP.
// A first byte that cannot start an HTTP method decides at once (NDJSON clients start with '{').
func sniff(br *bufio.Reader) (isHTTP bool, err error) {
	b, err := br.Peek(1)
	if err != nil {
		return false, err
	}
	if b[0] < 'A' || b[0] > 'Z' {
		return false, nil
	}
	for n := 1; ; n++ {
		b, err := br.Peek(n)
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			// client_timeout passed mid-line: the connection is closed, not handed on as
			// a native one without a deadline (docs/design.md §8).
			return false, err
		}
		if err != nil {
			return false, nil // EOF or buffer full: not an HTTP request line we can serve
		}
		last := b[n-1]
		if last == '\n' {
			return httpRequestLine.Match(b), nil
		}
		if n > 8192 {
			return false, nil
		}
	}
}

// handle serves one accepted connection until it is done.
func (s *server) handle(c net.Conn) {
	br := bufio.NewReaderSize(c, 64<<10)
	if !s.trackUnsniffed(c) {
		c.Close()
		s.releaseSlot()
		return
	}
	// The first line has client_timeout whatever the protocol: sniff reads the start of it
	// and the native reader the rest (it clears the deadline after the first line); net/http
	// sets its own (ReadHeaderTimeout) for the headers.
	_ = c.SetReadDeadline(time.Now().Add(s.limits.Load().clientTimeout))
	isHTTP, err := sniff(br)
	s.untrackUnsniffed(c)
	if err != nil {
		c.Close()
		s.releaseSlot()
		return
	}
	if who, ok := s.permit(c); !ok {
		s.refused.Add(1)
		s.log.Warn(who.why, "peer", who.peer, "remote", c.RemoteAddr().String())
		body := marshalReply(errorReply(nil, "permission denied"))
		_ = c.SetWriteDeadline(time.Now().Add(time.Second))
		if isHTTP {
			_, _ = io.WriteString(c, "HTTP/1.1 403 Forbidden\r\nContent-Type: application/json\r\nConnection: close\r\nContent-Length: "+strconv.Itoa(len(body))+"\r\n\r\n")
		}
		_, _ = c.Write(body)
		c.Close()
		s.releaseSlot()
		return
	}
	if isHTTP {
		_ = c.SetReadDeadline(time.Time{})
		hc := &sniffedConn{Conn: c, r: br, release: s.releaseSlot}
		if !s.httpConns.push(hc) {
			hc.Close()
		}
		return
	}
	nc := newNDJSONConn(s, c, br)
	if !s.track(nc) {
		nc.c.Close()
		s.releaseSlot()
		return
	}
	nc.serve()
	s.untrack(nc)
	s.releaseSlot()
}

// permit applies the allow-list, or without one holds loopback TCP peers to the Unix
// socket's rule (the kernel applies it to the socket itself); who describes the peer for
// the log. A remote TCP peer (allow_remote_http) has no uid to check: without an
// allow-list it is admitted, as the operator opened the port deliberately.
func (s *server) permit(c net.Conn) (who refusal, ok bool) {
	lim := s.limits.Load()
	policy := lim.policy
	if !policy.enabled() && !isLoopbackTCP(c) {
		return who, true
	}
	who.why = "peer refused by allowed_uids/allowed_gids"
	if !policy.enabled() {
		who.why = "peer refused: without allowed_uids/allowed_gids, loopback TCP admits whom the Unix socket admits (root, the daemon's user, socket_group)"
	}
	cred, err := peerCredentials(c)
	if err != nil {
		who.peer = "unknown (" + err.Error() + ")"
		return who, false
	}
	who.peer = "uid " + strconv.Itoa(cred.UID)
	if cred.PID > 0 {
		who.peer += " pid " + strconv.Itoa(cred.PID)
	}
	if !policy.enabled() {
		return who, lim.tcpRule.allows(cred)
	}
	return who, policy.allows(cred)
}

// refusal says who a refused peer is and by which rule, for the log.
type refusal struct{ peer, why string }

// isLoopbackTCP reports whether c is a TCP connection from a loopback address.
func isLoopbackTCP(c net.Conn) bool {
	tc, ok := c.(*net.TCPConn)
	if !ok {
		return false
	}
	ra, ok := tc.RemoteAddr().(*net.TCPAddr)
	return ok && ra.IP.IsLoopback()
}

func (s *server) trackUnsniffed(c net.Conn) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closing {
		return false
	}
	s.unsniffed[c] = struct{}{}
	return true
}

func (s *server) untrackUnsniffed(c net.Conn) {
	s.mu.Lock()
	delete(s.unsniffed, c)
	s.mu.Unlock()
}

func (s *server) track(nc *ndjsonConn) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closing {
		return false
	}
	s.conns[nc] = struct{}{}
	return true
}

func (s *server) untrack(nc *ndjsonConn) {
	s.mu.Lock()
	delete(s.conns, nc)
	s.mu.Unlock()
}

// openUp lets requests through: the renderers are ready. Before it, connections are
// accepted and health checks answered (not ready), but every other request waits.
func (s *server) openUp() { s.openOnce.Do(func() { close(s.openCh) }) }

func (s *server) isOpen() bool {
	select {
	case <-s.openCh:
		return true
	default:
		return false
	}
}

func (s *server) isClosing() bool {
	select {
	case <-s.stopCh:
		return true
	default:
		return false
	}
}

// waitOpen blocks until the server is open (true), or it stops or done is closed first (false).
func (s *server) waitOpen(done <-chan struct{}) bool {
	if s.isOpen() {
		return true
	}
	select {
	case <-s.openCh:
		return true
	case <-s.stopCh:
		return false
	case <-done:
		return false
	}
}

// gate holds every HTTP request but the health check until the server is open.
func (s *server) gate(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		isHealth := (r.Method == http.MethodGet || r.Method == http.MethodHead) && r.URL.Path == "/healthz"
		if !isHealth && !s.waitOpen(r.Context().Done()) {
			writeJSON(w, http.StatusServiceUnavailable, forMapProxy(Reply{Status: statusShuttingDown, ErrorMessage: "daemon is shutting down"}))
			return
		}
		h.ServeHTTP(w, r)
	})
}

// closeListeners stops accepting (health checks say "stopping" from now on). Connections
// already open keep being served.
func (s *server) closeListeners() {
	s.mu.Lock()
	for _, l := range s.listeners {
		l.Close()
	}
	s.listeners = nil
	s.mu.Unlock()
	// Only now: "stopping" promises that no new connection is accepted.
	s.stopOnce.Do(func() { close(s.stopCh) })
}

// shutdown closes every connection once its replies are written (the scheduler has answered
// every request by now), waiting at most until ctx is done; then it closes what is left.
// It returns ctx.Err() if it had to cut connections short.
func (s *server) shutdown(ctx context.Context) error {
	s.closeListeners()
	s.mu.Lock()
	s.closing = true
	conns := make([]*ndjsonConn, 0, len(s.conns))
	for nc := range s.conns {
		conns = append(conns, nc)
	}
	for c := range s.unsniffed {
		_ = c.SetReadDeadline(time.Now()) // its sniff fails now; the connection is closed
	}
	s.mu.Unlock()
	s.httpConns.Close()
	for _, nc := range conns {
		nc.stopReading()
	}
	herr := s.httpSrv.Shutdown(ctx)
	done := make(chan struct{})
	go func() { s.wg.Wait(); close(done) }()
	select {
	case <-done:
		return herr
	case <-ctx.Done():
		s.httpSrv.Close()
		s.mu.Lock()
		for nc := range s.conns {
			nc.c.Close()
		}
		s.mu.Unlock()
		<-done
		return ctx.Err()
	}
}

// statusDoc is the scheduler's status document with the tasks and their totals, or false
// when the scheduler has stopped.
func (s *server) statusDoc() (statusDoc, bool) {
	doc, ok := s.sched.status()
	if !ok {
		return doc, false
	}
	if s.tasks != nil {
		doc.Tasks = s.tasks.list()
	}
	tv := s.tasks.view()
	doc.TaskTotals = tv.totals.doc()
	return doc, true
}

// statusReply is the status document (docs/design.md §9) with the tasks, as a reply.
func (s *server) statusReply(id *string) Reply {
	doc, ok := s.statusDoc()
	if !ok {
		return Reply{ID: id, Status: statusShuttingDown, ErrorMessage: "daemon is shutting down"}
	}
	b, err := json.Marshal(doc)
	if err != nil {
		return errorReply(id, "status: "+err.Error())
	}
	return Reply{ID: id, Status: statusOK, Stats: b}
}

// sniffedConn is a connection whose first bytes sit in a bufio.Reader; it is handed to net/http.
type sniffedConn struct {
	net.Conn
	r       *bufio.Reader
	once    sync.Once
	release func()
}

func (c *sniffedConn) Read(p []byte) (int, error) { return c.r.Read(p) }

func (c *sniffedConn) Close() error {
	err := c.Conn.Close()
	c.once.Do(c.release)
	return err
}

// chanListener is a net.Listener fed with connections that were already accepted and sniffed.
type chanListener struct {
	ch     chan net.Conn
	mu     sync.Mutex
	closed bool
	done   chan struct{}
}

func newChanListener() *chanListener {
	return &chanListener{ch: make(chan net.Conn), done: make(chan struct{})}
}

// push hands c to the HTTP server; false if the listener is closed.
func (l *chanListener) push(c net.Conn) bool {
	select {
	case l.ch <- c:
		return true
	case <-l.done:
		return false
	}
}

func (l *chanListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.ch:
		return c, nil
	case <-l.done:
		return nil, net.ErrClosed
	}
}

func (l *chanListener) Close() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if !l.closed {
		l.closed = true
		close(l.done)
	}
	return nil
}

func (l *chanListener) Addr() net.Addr { return &net.UnixAddr{Name: "sniffed", Net: "unix"} }
