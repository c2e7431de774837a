// SPDX-License-Identifier: Apache-2.0

// Command fragileup is a fragile upstream WMS for bench/ratelimit.sh: it answers GetMap
// with an opaque PNG of the asked size and, with -limit N, 503 to any request beyond N
// answered in the last second (the upstream of MapProxy issues #89 and #529). On SIGTERM
// or SIGINT it writes every request's arrival time and status to -out as CSV
// (unix_ns,status) and exits.
package main

import (
	"bufio"
	"bytes"
	"context"
	"flag"
	"fmt"
	"image"
	"image/png"
	"log"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

type upstream struct {
	limit int
	delay time.Duration
	mu    sync.Mutex
	ok    []time.Time
	hits  []hit
	pngs  map[[2]int][]byte
}

type hit struct {
	ns     int64
	status int
}

func (u *upstream) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	now := time.Now()
	var wid, hei int
	for k, v := range r.URL.Query() {
		switch strings.ToUpper(k) {
		case "WIDTH":
			wid, _ = strconv.Atoi(v[0])
		case "HEIGHT":
			hei, _ = strconv.Atoi(v[0])
		}
	}
	u.mu.Lock()
	i := 0
	for i < len(u.ok) && now.Sub(u.ok[i]) >= time.Second {
		i++
	}
	u.ok = u.ok[i:]
	status := http.StatusOK
	if u.limit > 0 && len(u.ok) >= u.limit {
		status = http.StatusServiceUnavailable
	} else {
		u.ok = append(u.ok, now)
	}
	u.hits = append(u.hits, hit{now.UnixNano(), status})
	body := u.png(min(max(wid, 1), 4096), min(max(hei, 1), 4096))
	u.mu.Unlock()
	if status != http.StatusOK {
		http.Error(w, "overloaded", status)
		return
	}
	time.Sleep(u.delay) // the upstream's own render time
	w.Header().Set("Content-Type", "image/png")
	w.Write(body)
}

// png returns an opaque PNG of w×h, cached by size. u.mu is held.
func (u *upstream) png(w, h int) []byte {
	if b, ok := u.pngs[[2]int{w, h}]; ok {
		return b
	}
	img := image.NewNRGBA(image.Rect(0, 0, w, h))
	for i := 0; i < len(img.Pix); i += 4 {
		img.Pix[i], img.Pix[i+1], img.Pix[i+2], img.Pix[i+3] = 40, 120, 200, 255
	}
	var buf bytes.Buffer
	png.Encode(&buf, img)
	u.pngs[[2]int{w, h}] = buf.Bytes()
	return buf.Bytes()
}

func main() {
	addr := flag.String("addr", "127.0.0.1:0", "listen address")
	limit := flag.Int("limit", 0, "answer 503 beyond this many requests in the last second (0: never)")
	delay := flag.Duration("delay", 0, "time to answer a GetMap")
	out := flag.String("out", "hits.csv", "where to write unix_ns,status per request at exit")
	flag.Parse()
	u := &upstream{limit: *limit, delay: *delay, pngs: make(map[[2]int][]byte)}
	l, err := net.Listen("tcp", *addr)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Printf("listening on http://%s/\n", l.Addr())
	os.Stdout.Sync()
	srv := &http.Server{Handler: u, ReadHeaderTimeout: 10 * time.Second}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	go func() { <-ctx.Done(); srv.Shutdown(context.Background()) }()
	if err := srv.Serve(l); err != http.ErrServerClosed {
		log.Fatal(err)
	}
	f, err := os.Create(*out)
	if err != nil {
		log.Fatal(err)
	}
	w := bufio.NewWriter(f)
	u.mu.Lock()
	for _, h := range u.hits {
		fmt.Fprintf(w, "%d,%d\n", h.ns, h.status)
	}
	u.mu.Unlock()
	if err := w.Flush(); err != nil {
		log.Fatal(err)
	}
	if err := f.Close(); err != nil {
		log.Fatal(err)
	}
}
