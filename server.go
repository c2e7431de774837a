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

	"golang.org/x/sys/unix"
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
	policy      accessPolicy
	maxLine     int
	maxInFlight int
	maxConns    int
	httpWait    time.Duration // http_wait: MapProxy's live POSTs get pending after this (0 = wait)
	seedBelow   int           // seed_priority_below: http_wait leaves the seed class alone
}

func (s *server) setLimits(cfg Config) {
	s.limits.Store(&serverLimits{
		policy:      newAccessPolicy(cfg.AllowedUIDs, cfg.AllowedGIDs),
		maxLine:     cfg.MaxLineBytes,
		maxInFlight: cfg.MaxInFlight,
		maxConns:    cfg.MaxConnections,
		httpWait:    time.Duration(cfg.HTTPWait),
		seedBelow:   cfg.SeedPriorityBelow,
	})
}

// sniffTimeout bounds the wait for a connection's first line, so that a client that
// connects and says nothing does not hold a connection slot for ever.
const sniffTimeout = time.Minute

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

// httpRequestLine matches "METHOD SP target SP HTTP/1.x" (DESIGN §2).
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
	_ = c.SetReadDeadline(time.Now().Add(sniffTimeout))
	isHTTP, err := sniff(br)
	_ = c.SetReadDeadline(time.Time{})
	s.untrackUnsniffed(c)
	if err != nil {
		c.Close()
		s.releaseSlot()
		return
	}
	if who, ok := s.permit(c); !ok {
		s.refused.Add(1)
		s.log.Warn("peer refused by allowed_uids/allowed_gids", "peer", who, "remote", c.RemoteAddr().String())
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

// permit applies the allow-list; who describes the peer for the log.
func (s *server) permit(c net.Conn) (who string, ok bool) {
	policy := s.limits.Load().policy
	if !policy.enabled() {
		return "", true
	}
	cred, err := peerCredentials(c)
	if err != nil {
		return "unknown (" + err.Error() + ")", false
	}
	who = "uid " + strconv.Itoa(cred.UID)
	if cred.PID > 0 {
		who += " pid " + strconv.Itoa(cred.PID)
	}
	return who, policy.allows(cred)
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
	gone     bool // the client is gone: nothing more is written
	wake     chan struct{}
	space    chan struct{} // signalled when in-flight drops below the limit
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
	if !nc.gone {
		nc.out = append(nc.out, r)
	}
	if len(nc.inflight) < nc.s.limits.Load().maxInFlight {
		notifyChan(nc.space)
	}
	nc.mu.Unlock()
	notifyChan(nc.wake)
}

func (nc *ndjsonConn) push(r Reply) {
	nc.mu.Lock()
	if !nc.gone {
		nc.out = append(nc.out, r)
	}
	nc.mu.Unlock()
	notifyChan(nc.wake)
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
	_ = nc.c.SetReadDeadline(time.Now())
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
	for {
		maxLine := nc.s.limits.Load().maxLine
		line, err := readLimitedLine(nc.br, maxLine)
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
		n, gone := len(nc.inflight), nc.gone
		nc.mu.Unlock()
		if gone {
			return false
		}
		if n < nc.s.limits.Load().maxInFlight {
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
		var re *requestError
		if errors.As(err, &re) {
			nc.push(errorReply(re.id, re.msg))
		} else {
			nc.push(errorReply(nil, err.Error()))
		}
		return
	}
	if req.Command == "health" {
		nc.push(nc.s.health().reply(req.ID))
		return
	}
	// Until the renderers are ready, only health is answered; the rest waits (the reader
	// with it), as it would in the listen backlog.
	if !nc.s.waitOpen(nil) {
		nc.push(Reply{ID: req.ID, Status: statusShuttingDown, ErrorMessage: "daemon is shutting down"})
		return
	}
	switch req.Command {
	case "ping":
		nc.push(Reply{ID: req.ID, Status: statusOK})
	case "status":
		nc.push(nc.s.statusReply(req.ID))
	case "seed", "tasks", "task", "cancel":
		nc.push(nc.s.tasks.handle(req))
	case "expire":
		nc.push(nc.s.tasks.handleExpire(req))
	case "views":
		nc.push(nc.s.viewsReply(req))
	case "tile":
		p := &pendingRequest{req: req, sink: nc, proto: protoNative}
		nc.mu.Lock()
		if nc.gone {
			nc.mu.Unlock()
			return
		}
		nc.inflight[p] = struct{}{}
		nc.mu.Unlock()
		nc.s.sched.submit(p)
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

// statusReply is the status document (DESIGN §9) with the tasks, as a reply.
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
		for i := range batch {
			bw.Write(marshalReply(batch[i]))
			batch[i] = Reply{}
		}
		if err := bw.Flush(); err != nil {
			nc.s.log.Debug("client gone: write failed", "remote", nc.c.RemoteAddr().String(), "error", err)
			nc.clientGone()
			return
		}
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
