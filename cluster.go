// SPDX-License-Identifier: Apache-2.0

package main

import (
	"bytes"
	"context"
	"crypto/sha1"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"
)

// mapproxyRequestID is the id MapProxy 1.15 puts in its renderd request for one tile
// (cache/renderd.py): sha1 of the Python repr of (cache_identifier, [(x, y, z)]), hex.
// For a metatile MapProxy sends its top-left tile, so the id names the metatile; it does
// not depend on the priority, so live and seed requests for one metatile share it. Behind
// HAProxy (docs/design.md §15) this id is the hash key that picks the daemon. MapProxy encodes the
// repr as ASCII and fails on anything else; so does this.
func mapproxyRequestID(cacheIdentifier string, t tileCoord) (string, error) {
	repr, err := pythonStrRepr(cacheIdentifier)
	if err != nil {
		return "", err
	}
	sum := sha1.Sum([]byte("(" + repr + ", [(" + strconv.Itoa(int(t.X)) + ", " + strconv.Itoa(int(t.Y)) + ", " + strconv.Itoa(int(t.Z)) + ")])"))
	return hex.EncodeToString(sum[:]), nil
}

// pythonStrRepr is Python 3's repr() of an ASCII str: single quotes unless the string holds
// a single quote and no double quote; backslash, the quote, \t, \n, \r escaped; other
// control characters as \xhh.
func pythonStrRepr(s string) (string, error) {
	quote := byte('\'')
	if strings.IndexByte(s, '\'') >= 0 && strings.IndexByte(s, '"') < 0 {
		quote = '"'
	}
	var b strings.Builder
	b.WriteByte(quote)
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c >= 0x80:
			return "", fmt.Errorf("cache identifier %q is not ASCII: MapProxy cannot make a request id for it", truncate(s, 64))
		case c == '\\' || c == quote:
			b.WriteByte('\\')
			b.WriteByte(c)
		case c == '\t':
			b.WriteString(`\t`)
		case c == '\n':
			b.WriteString(`\n`)
		case c == '\r':
			b.WriteString(`\r`)
		case c < 0x20 || c == 0x7f:
			fmt.Fprintf(&b, `\x%02x`, c)
		default:
			b.WriteByte(c)
		}
	}
	b.WriteByte(quote)
	return b.String(), nil
}

// requestRoute is where a task sends its requests, one per metatile: the scheduler (this
// daemon renders them), or a clusterRoute (their owners do). submit never blocks for long; after cancel(p), p's sink
// gets nothing more.
type requestRoute interface {
	submit(p *pendingRequest)
	cancel(p *pendingRequest)
}

// clusterInFlight bounds the requests one task has in flight through HAProxy (and never
// more than its seed_window): enough to keep the renderers of several hosts busy, few enough
// connections for one HAProxy.
const clusterInFlight = 256

// clusterRequestTimeout bounds one request through HAProxy. HAProxy's own timeout server
// (10 minutes in examples/cluster) normally ends it first; the task retries it.
const clusterRequestTimeout = 15 * time.Minute

// clusterRoute sends a task's metatiles to HAProxy as MapProxy 1.15 does: an HTTP POST with
// MapProxy's exact body, whose id (mapproxyRequestID) HAProxy hashes to pick the daemon that
// owns the metatile. That daemon renders it as it renders MapProxy's requests (forced, as for
// mapproxy-seed) and merges it with live requests for the same metatile. It is owned by one
// task: workers goroutines take requests in order, and close stops and waits for them.
type clusterRoute struct {
	url    string
	client *http.Client
	ctx    context.Context
	stop   context.CancelFunc
	wg     sync.WaitGroup
	wake   chan struct{} // buffered 1: pending grew or the route closed

	mu       sync.Mutex
	pending  []*pendingRequest                      // submitted, not yet sent
	inflight map[*pendingRequest]context.CancelFunc // being sent
}

func newClusterRoute(url string, workers int) *clusterRoute {
	ctx, stop := context.WithCancel(context.Background())
	c := &clusterRoute{url: url, ctx: ctx, stop: stop, wake: make(chan struct{}, 1),
		inflight: make(map[*pendingRequest]context.CancelFunc),
		client: &http.Client{Timeout: clusterRequestTimeout, Transport: &http.Transport{
			MaxIdleConnsPerHost: workers, IdleConnTimeout: time.Minute, DisableCompression: true}}}
	for i := 0; i < workers; i++ {
		c.wg.Add(1)
		go func() {
			defer c.wg.Done()
			c.work()
		}()
	}
	return c
}

func (c *clusterRoute) submit(p *pendingRequest) {
	c.mu.Lock()
	c.pending = append(c.pending, p)
	c.mu.Unlock()
	notifyChan(c.wake)
}

// cancel forgets p: unsent, it is never sent; in flight, its request is aborted (HAProxy
// closes the connection to the daemon, which drops the job unless someone else waits for it).
func (c *clusterRoute) cancel(p *pendingRequest) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if i := slices.Index(c.pending, p); i >= 0 {
		c.pending = slices.Delete(c.pending, i, i+1)
		return
	}
	if abort, ok := c.inflight[p]; ok {
		delete(c.inflight, p)
		abort()
	}
}

// close aborts what is in flight, drops what is pending and waits for the workers. It may
// be called more than once.
func (c *clusterRoute) close() {
	c.stop()
	c.wg.Wait()
	c.client.CloseIdleConnections()
}

// next takes the oldest pending request, or returns nil once the route is closed.
func (c *clusterRoute) next() (*pendingRequest, context.Context) {
	for {
		c.mu.Lock()
		if c.ctx.Err() != nil {
			c.mu.Unlock()
			return nil, nil
		}
		if len(c.pending) > 0 {
			p := c.pending[0]
			c.pending = c.pending[1:]
			ctx, abort := context.WithCancel(c.ctx)
			c.inflight[p] = abort
			more := len(c.pending) > 0
			c.mu.Unlock()
			if more {
				notifyChan(c.wake) // pass the wake-up on to another worker
			}
			return p, ctx
		}
		c.mu.Unlock()
		select {
		case <-c.wake:
		case <-c.ctx.Done():
		}
	}
}

func (c *clusterRoute) work() {
	for {
		p, ctx := c.next()
		if p == nil {
			return
		}
		r := c.post(ctx, p)
		c.mu.Lock()
		abort, mine := c.inflight[p]
		delete(c.inflight, p)
		c.mu.Unlock()
		if !mine {
			continue // cancelled: its sink gets nothing
		}
		abort()
		r.ID = p.req.ID
		p.sink.deliver(p, r)
	}
}

// post sends one metatile and turns the answer into a reply. MapProxy's protocol knows only
// ok and error; the daemon words a full queue "renderd busy: …", which is busy again here so
// the task waits and retries without counting it against the metatile.
func (c *clusterRoute) post(ctx context.Context, p *pendingRequest) Reply {
	t := p.req.Tiles[0]
	id, err := mapproxyRequestID(p.req.CacheIdentifier, t)
	if err != nil {
		return errorReply(nil, err.Error())
	}
	body := fmt.Sprintf(`{"command": "tile", "id": "%s", "tiles": [[%d, %d, %d]], "cache_identifier": %s, "priority": %d}`,
		id, t.X, t.Y, t.Z, mustJSON(p.req.CacheIdentifier), p.req.Priority)
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, c.url, strings.NewReader(body))
	if err != nil {
		return errorReply(nil, "cluster: "+err.Error())
	}
	resp, err := c.client.Do(req)
	if err != nil {
		return errorReply(nil, "cluster "+c.url+": "+err.Error())
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return errorReply(nil, "cluster "+c.url+": "+err.Error())
	}
	var r struct {
		Status       string `json:"status"`
		ErrorMessage string `json:"error_message"`
	}
	if json.Unmarshal(raw, &r) != nil || r.Status == "" {
		return errorReply(nil, fmt.Sprintf("cluster %s: HTTP %d, not a renderd answer: %s", c.url, resp.StatusCode, truncate(string(bytes.TrimSpace(raw)), 200)))
	}
	switch {
	case r.Status == statusOK:
		return Reply{Status: statusOK}
	case strings.HasPrefix(r.ErrorMessage, "renderd busy: "):
		return Reply{Status: statusBusy, ErrorMessage: r.ErrorMessage}
	}
	msg := r.ErrorMessage
	if msg == "" {
		msg = "status " + r.Status
	}
	return errorReply(nil, "cluster: "+msg)
}
