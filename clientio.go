// SPDX-License-Identifier: Apache-2.0

package main

// Slow clients (docs/design.md §8): a request body must arrive in bounded time, whatever its size
// cap, so that a client sending a byte now and then cannot hold a connection, a goroutine
// and a half-written list for ever.

import (
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"time"
)

// minBodyRate is the slowest upload that goes on past client_timeout: each such many bytes
// received earn the body one more second.
const minBodyRate = 64 << 10

// clientBody returns r's body capped at maxBytes (a longer one reads as *http.MaxBytesError)
// with a read deadline: the body must arrive within client_timeout plus one second per
// minBodyRate bytes received.
func (s *server) clientBody(w http.ResponseWriter, r *http.Request, maxBytes int64) io.Reader {
	rc := http.NewResponseController(w)
	b := &deadlineBody{r: http.MaxBytesReader(w, r.Body, maxBytes), rc: rc, start: time.Now(), base: s.limits.Load().clientTimeout}
	b.extend()
	return b
}

type deadlineBody struct {
	r     io.Reader
	rc    *http.ResponseController
	start time.Time
	base  time.Duration
	n     int64
}

func (b *deadlineBody) extend() {
	_ = b.rc.SetReadDeadline(b.start.Add(b.base + time.Duration(b.n/minBodyRate)*time.Second))
}

func (b *deadlineBody) Read(p []byte) (int, error) {
	n, err := b.r.Read(p)
	if n > 0 {
		b.n += int64(n)
		b.extend()
	}
	if err != nil && errors.Is(err, os.ErrDeadlineExceeded) {
		err = fmt.Errorf("request body not received in time (client_timeout %s, plus a second per %d KiB): %w", b.base, minBodyRate>>10, err)
	}
	return n, err
}
