// SPDX-License-Identifier: Apache-2.0

package main

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"time"
)

// request is one tile request as the load generator sees it; each protocol
// turns it into its own wire format.
type request struct {
	tag     int // index into the recorder; the request's id on the wire
	x, y, z int
	live    bool // live class (else seed class)
	bg      bool // fire-and-forget: no completion reply wanted
}

// outcome is the kind of final answer a request got.
type outcome uint32

const (
	oNone     outcome = iota // no answer (yet)
	oOK                      // ok / result=ok / Done
	oQueued                  // background accepted (ours)
	oBusy                    // queue full (ours)
	oNotDone                 // renderd NotDone
	oError                   // error of any kind
	oShutdown                // shutting_down (ours)
	oOther                   // anything else
	nOutcomes
)

var outcomeNames = [nOutcomes]string{"none", "ok", "queued", "busy", "notdone", "error", "shutting_down", "other"}

// onReply is called from a session's reader goroutine, once per reply, in
// arrival order.
type onReply func(tag int, o outcome)

// session is one client connection to a daemon.
type session interface {
	// send writes the requests in order, as few writes as the protocol allows.
	send(reqs ...request) error
	close() error
}

// target says where and how to talk to a daemon.
type target struct {
	proto     string // ndjson | tirex | renderd
	addr      string // Unix socket path
	name      string // cache identifier (ndjson) or map name (tirex, renderd)
	livePrio  int
	seedPrio  int
	clientDir string // tirex: where to bind the client's datagram socket
}

func (t *target) defaults() error {
	switch t.proto {
	case "ndjson":
		if t.name == "" {
			t.name = "bench_GLOBAL_WEBMERCATOR"
		}
		if t.livePrio == 0 {
			t.livePrio = 100
		}
		if t.seedPrio == 0 {
			t.seedPrio = 10
		}
	case "tirex":
		if t.name == "" {
			t.name = "m0"
		}
		if t.livePrio == 0 {
			t.livePrio = 1
		}
		if t.seedPrio == 0 {
			t.seedPrio = 20
		}
		if t.clientDir == "" {
			t.clientDir = filepath.Dir(t.addr)
		}
	case "renderd":
		if t.name == "" {
			t.name = "m0"
		}
		if t.livePrio == 0 {
			t.livePrio = cmdRenderPrio
		}
		if t.seedPrio == 0 {
			t.seedPrio = cmdRenderBulk
		}
	default:
		return fmt.Errorf("unknown protocol %q (want ndjson, tirex or renderd)", t.proto)
	}
	if t.addr == "" {
		return errors.New("missing -addr")
	}
	return nil
}

func dial(t target, cb onReply) (session, error) {
	switch t.proto {
	case "ndjson":
		return dialNDJSON(t, cb)
	case "tirex":
		return dialTirex(t, cb)
	case "renderd":
		return dialRenderd(t, cb)
	}
	return nil, fmt.Errorf("unknown protocol %q", t.proto)
}

// ---------------------------------------------------------------------------
// Our NDJSON protocol (docs/design.md §2).

type ndjsonSession struct {
	t    target
	conn *net.UnixConn
	cb   onReply
	mu   sync.Mutex // serialises writes
	buf  []byte
	done chan struct{}
}

func dialNDJSON(t target, cb onReply) (*ndjsonSession, error) {
	conn, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: t.addr, Net: "unix"})
	if err != nil {
		return nil, err
	}
	conn.SetReadBuffer(4 << 20)
	conn.SetWriteBuffer(4 << 20)
	s := &ndjsonSession{t: t, conn: conn, cb: cb, done: make(chan struct{})}
	go s.read()
	return s, nil
}

func (s *ndjsonSession) send(reqs ...request) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	b := s.buf[:0]
	for _, r := range reqs {
		b = append(b, `{"id":"`...)
		b = strconv.AppendInt(b, int64(r.tag), 10)
		b = append(b, `","command":"tile","cache_identifier":"`...)
		b = append(b, s.t.name...)
		b = append(b, `","tiles":[[`...)
		b = strconv.AppendInt(b, int64(r.x), 10)
		b = append(b, ',')
		b = strconv.AppendInt(b, int64(r.y), 10)
		b = append(b, ',')
		b = strconv.AppendInt(b, int64(r.z), 10)
		b = append(b, `]],"priority":`...)
		p := s.t.seedPrio
		if r.live {
			p = s.t.livePrio
		}
		b = strconv.AppendInt(b, int64(p), 10)
		if r.bg {
			b = append(b, `,"background":true}`+"\n"...)
		} else {
			b = append(b, "}\n"...)
		}
		if len(b) >= 64<<10 {
			if _, err := s.conn.Write(b); err != nil {
				return err
			}
			b = b[:0]
		}
	}
	s.buf = b[:0]
	if len(b) > 0 {
		_, err := s.conn.Write(b)
		return err
	}
	return nil
}

func (s *ndjsonSession) read() {
	defer close(s.done)
	r := bufio.NewReaderSize(s.conn, 256<<10)
	for {
		line, err := r.ReadSlice('\n')
		if errors.Is(err, bufio.ErrBufferFull) {
			rest, err2 := r.ReadBytes('\n')
			line = append(append([]byte(nil), line...), rest...)
			err = err2
		}
		if err != nil {
			return
		}
		id, status, ok := parseReply(line)
		if !ok {
			fmt.Fprintf(os.Stderr, "loadgen: unparsable reply: %.200s\n", line)
			continue
		}
		tag, err := strconv.Atoi(id)
		if err != nil {
			fmt.Fprintf(os.Stderr, "loadgen: reply with foreign id: %.200s\n", line)
			continue
		}
		s.cb(tag, ndjsonOutcome(status))
	}
}

func (s *ndjsonSession) close() error {
	err := s.conn.Close()
	<-s.done
	return err
}

func ndjsonOutcome(status string) outcome {
	switch status {
	case "ok":
		return oOK
	case "queued":
		return oQueued
	case "busy":
		return oBusy
	case "error", "expired":
		return oError
	case "shutting_down":
		return oShutdown
	}
	return oOther
}

// parseReply pulls "id" and "status" out of a reply line. It tries a cheap
// scan first (the daemon's replies are small and flat) and falls back to
// encoding/json.
func parseReply(line []byte) (id, status string, ok bool) {
	id, ok1 := scanString(line, `"id":`)
	status, ok2 := scanString(line, `"status":`)
	if ok1 && ok2 {
		return id, status, true
	}
	var v struct {
		ID     any    `json:"id"`
		Status string `json:"status"`
	}
	if err := json.Unmarshal(line, &v); err != nil {
		return "", "", false
	}
	switch x := v.ID.(type) {
	case string:
		id = x
	case float64:
		id = strconv.FormatFloat(x, 'f', -1, 64)
	}
	return id, v.Status, true
}

// scanString finds key (including its quotes and colon) and returns the
// plain string value after it; it gives up on escapes.
func scanString(line []byte, key string) (string, bool) {
	i := bytes.Index(line, []byte(key))
	if i < 0 {
		return "", false
	}
	rest := bytes.TrimLeft(line[i+len(key):], " ")
	if len(rest) == 0 || rest[0] != '"' {
		return "", false
	}
	rest = rest[1:]
	j := bytes.IndexByte(rest, '"')
	if j < 0 || bytes.IndexByte(rest[:j], '\\') >= 0 {
		return "", false
	}
	return string(rest[:j]), true
}

// ndjsonCall sends one request on a fresh connection and returns the decoded
// reply (status, ping).
func ndjsonCall(addr string, req map[string]any, timeout time.Duration) (map[string]any, error) {
	conn, err := net.DialTimeout("unix", addr, timeout)
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(timeout))
	b, _ := json.Marshal(req)
	if _, err := conn.Write(append(b, '\n')); err != nil {
		return nil, err
	}
	line, err := bufio.NewReaderSize(conn, 1<<20).ReadBytes('\n')
	if err != nil {
		return nil, err
	}
	var doc map[string]any
	if err := json.Unmarshal(line, &doc); err != nil {
		return nil, fmt.Errorf("bad reply %.200q: %w", line, err)
	}
	return doc, nil
}

// ---------------------------------------------------------------------------
// Tirex's command protocol: key=value datagrams on master.sock.

type tirexSession struct {
	t     target
	conn  *net.UnixConn
	raddr *net.UnixAddr
	path  string
	cb    onReply
	mu    sync.Mutex
	buf   []byte
	done  chan struct{}
}

var tirexSeq int

func dialTirex(t target, cb onReply) (*tirexSession, error) {
	tirexSeq++
	path := filepath.Join(t.clientDir, fmt.Sprintf("loadgen-%d-%d.sock", os.Getpid(), tirexSeq))
	os.Remove(path)
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		return nil, err
	}
	// tirex-master runs as its own user and must be able to answer us.
	if err := os.Chmod(path, 0o777); err != nil {
		conn.Close()
		return nil, err
	}
	conn.SetReadBuffer(8 << 20)
	s := &tirexSession{t: t, conn: conn, path: path, cb: cb, done: make(chan struct{}),
		raddr: &net.UnixAddr{Name: t.addr, Net: "unixgram"}}
	go s.read()
	return s, nil
}

func (s *tirexSession) send(reqs ...request) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, r := range reqs {
		b := s.buf[:0]
		b = append(b, "type=metatile_enqueue_request\n"...)
		if !r.bg {
			b = append(b, "id="...)
			b = strconv.AppendInt(b, int64(r.tag), 10)
			b = append(b, '\n')
		}
		b = append(b, "map="...)
		b = append(b, s.t.name...)
		b = append(b, "\nx="...)
		b = strconv.AppendInt(b, int64(r.x), 10)
		b = append(b, "\ny="...)
		b = strconv.AppendInt(b, int64(r.y), 10)
		b = append(b, "\nz="...)
		b = strconv.AppendInt(b, int64(r.z), 10)
		b = append(b, "\nprio="...)
		p := s.t.seedPrio
		if r.live {
			p = s.t.livePrio
		}
		b = strconv.AppendInt(b, int64(p), 10)
		b = append(b, '\n')
		s.buf = b
		if _, err := s.conn.WriteToUnix(b, s.raddr); err != nil {
			return err
		}
	}
	return nil
}

// sendRaw sends one datagram built from key=value pairs (control messages).
func (s *tirexSession) sendRaw(kv ...string) error {
	var b []byte
	for i := 0; i+1 < len(kv); i += 2 {
		b = append(b, kv[i]...)
		b = append(b, '=')
		b = append(b, kv[i+1]...)
		b = append(b, '\n')
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	_, err := s.conn.WriteToUnix(b, s.raddr)
	return err
}

// read hands the answers to a second goroutine that runs the callback: the
// callback may send, a send blocks while tirex-master's queue is full, and
// tirex-master blocks while ours is (net.unix.max_dgram_qlen is 10 here), so
// the socket must keep being drained while a send waits.
func (s *tirexSession) read() {
	type answer struct {
		tag int
		o   outcome
	}
	answers := make(chan answer, 1<<16)
	dispatched := make(chan struct{})
	go func() {
		defer close(dispatched)
		for a := range answers {
			s.cb(a.tag, a.o)
		}
	}()
	defer func() {
		close(answers)
		<-dispatched
		close(s.done)
	}()
	buf := make([]byte, 4096)
	for {
		n, _, err := s.conn.ReadFromUnix(buf)
		if err != nil {
			return
		}
		var id, result string
		for _, line := range bytes.Split(buf[:n], []byte{'\n'}) {
			k, v, ok := bytes.Cut(line, []byte{'='})
			if !ok {
				continue
			}
			switch string(k) {
			case "id":
				id = string(v)
			case "result":
				result = string(v)
			}
		}
		tag, err := strconv.Atoi(id)
		if err != nil {
			fmt.Fprintf(os.Stderr, "loadgen: tirex reply without our id: %q\n", buf[:n])
			continue
		}
		o := oError
		if result == "ok" {
			o = oOK
		}
		answers <- answer{tag, o}
	}
}

func (s *tirexSession) close() error {
	err := s.conn.Close()
	<-s.done
	os.Remove(s.path)
	return err
}

// ---------------------------------------------------------------------------
// renderd's protocol: the 64-byte mod_tile v2 struct (native x86-64 layout):
// int ver, cmd, x, y, z; char xmlname[41]; 3 bytes padding.

const (
	cmdRender     = 1
	cmdDone       = 3
	cmdNotDone    = 4
	cmdRenderPrio = 5
	cmdRenderBulk = 6
	renderdMsgLen = 64
)

type tileKey struct{ x, y, z int32 }

type renderdSession struct {
	t       target
	conn    *net.UnixConn
	cb      onReply
	mu      sync.Mutex // serialises writes
	pmu     sync.Mutex // guards pending
	pending map[tileKey][]int
	buf     []byte
	done    chan struct{}
}

func dialRenderd(t target, cb onReply) (*renderdSession, error) {
	if len(t.name) > 40 {
		return nil, fmt.Errorf("map name %q too long for xmlname[41]", t.name)
	}
	conn, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: t.addr, Net: "unix"})
	if err != nil {
		return nil, err
	}
	s := &renderdSession{t: t, conn: conn, cb: cb, pending: map[tileKey][]int{}, done: make(chan struct{})}
	go s.read()
	return s, nil
}

func (s *renderdSession) send(reqs ...request) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	// renderd reads one struct per poll wake-up with MSG_DONTWAIT and does not
	// cope with a struct split across reads, so write whole structs, at most
	// 4 KiB at a time (one socket buffer each).
	const chunk = 4096 / renderdMsgLen
	for len(reqs) > 0 {
		n := min(len(reqs), chunk)
		b := s.buf[:0]
		s.pmu.Lock()
		for _, r := range reqs[:n] {
			var m [renderdMsgLen]byte
			cmd := s.t.seedPrio
			if r.live {
				cmd = s.t.livePrio
			}
			binary.LittleEndian.PutUint32(m[0:], 2)
			binary.LittleEndian.PutUint32(m[4:], uint32(cmd))
			binary.LittleEndian.PutUint32(m[8:], uint32(r.x))
			binary.LittleEndian.PutUint32(m[12:], uint32(r.y))
			binary.LittleEndian.PutUint32(m[16:], uint32(r.z))
			copy(m[20:60], s.t.name)
			b = append(b, m[:]...)
			k := tileKey{int32(r.x), int32(r.y), int32(r.z)}
			s.pending[k] = append(s.pending[k], r.tag)
		}
		s.pmu.Unlock()
		s.buf = b
		if _, err := s.conn.Write(b); err != nil {
			return err
		}
		reqs = reqs[n:]
	}
	return nil
}

func (s *renderdSession) read() {
	defer close(s.done)
	r := bufio.NewReaderSize(s.conn, 64<<10)
	var m [renderdMsgLen]byte
	for {
		if _, err := io.ReadFull(r, m[:]); err != nil {
			return
		}
		cmd := binary.LittleEndian.Uint32(m[4:])
		k := tileKey{int32(binary.LittleEndian.Uint32(m[8:])), int32(binary.LittleEndian.Uint32(m[12:])),
			int32(binary.LittleEndian.Uint32(m[16:]))}
		s.pmu.Lock()
		tags := s.pending[k]
		tag := -1
		if len(tags) > 0 {
			tag = tags[0]
			if len(tags) == 1 {
				delete(s.pending, k)
			} else {
				s.pending[k] = tags[1:]
			}
		}
		s.pmu.Unlock()
		if tag < 0 {
			fmt.Fprintf(os.Stderr, "loadgen: renderd answer for a tile we did not ask for: %v\n", k)
			continue
		}
		o := oOther
		switch cmd {
		case cmdDone:
			o = oOK
		case cmdNotDone:
			o = oNotDone
		}
		s.cb(tag, o)
	}
}

func (s *renderdSession) close() error {
	err := s.conn.Close()
	<-s.done
	return err
}
