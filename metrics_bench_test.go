// SPDX-License-Identifier: Apache-2.0

package main

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"sync"
	"testing"
	"time"
)

// schedulerWithQueue returns a scheduler (not running) holding n queued jobs at seed and live
// priorities with waiters, 3 caches with renders at 20 zoom levels, and finished renders in
// the histograms: what a scrape of a busy daemon reads.
func schedulerWithQueue(b *testing.B, n int) *scheduler {
	cfg := defaultConfig()
	cfg.RendererCommand = []string{"unused"}
	cfg.MaxQueued = n
	if err := cfg.Validate(); err != nil {
		b.Fatal(err)
	}
	s := newScheduler(cfg, slog.New(slog.NewTextHandler(io.Discard, nil)), rendererConfig{})
	var caches []*cacheInfo
	for _, id := range []string{"osm_cache_GLOBAL_WEBMERCATOR", "osm_cache_EPSG25832", "aerial_cache_GLOBAL_WEBMERCATOR"} {
		c := s.newCache(id)
		c.known, c.metaX, c.metaY = true, 4, 4
		caches = append(caches, c)
		for z := 0; z < 20; z++ {
			s.countRender(&rendererSlot{seed: z > 10}, c, &job{key: jobKey{z: int32(z)}}, rendererEvent{status: statusOK}, int64(z)*int64(time.Millisecond))
		}
	}
	prios := []int{10, 10, 10, 20, 50, 100}
	keys := make([]jobKey, 1)
	for i := 0; i < n; i++ {
		c := caches[i%len(caches)]
		keys[0] = keyFor(c, tileCoord{int32(i%4096) * 4, int32(i/4096) * 4, 18})
		var w *pendingRequest
		if i%10 == 0 {
			w = &pendingRequest{}
		}
		if _, err := s.qs.add(keys, prios[i%len(prios)], w == nil, w, int64(i)); err != nil {
			b.Fatal(err)
		}
	}
	for i := 0; i < n/100; i++ { // a few promotions, so that levels have raised jobs
		keys[0] = keyFor(caches[(i*7)%len(caches)], tileCoord{int32((i*7)%4096) * 4, int32((i*7)/4096) * 4, 18})
		s.qs.add(keys, 100, true, nil, int64(n+i))
	}
	return s
}

// BenchmarkScrape1MQueued is one /metrics scrape's work with 1,000,000 jobs queued: the
// scheduler's snapshot (the part that runs on the scheduler goroutine, so the part that
// delays scheduling) and the formatting. Goal: at most 5 ms. The status document, which
// reads the same running counts, is measured beside it.
func BenchmarkScrape1MQueued(b *testing.B) {
	s := schedulerWithQueue(b, 1_000_000)
	tv := taskView{}
	b.Run("snapshot", func(b *testing.B) {
		for b.Loop() {
			s.metricsSnapshot()
		}
		b.ReportMetric(float64(b.Elapsed().Microseconds())/float64(b.N)/1000, "ms/scrape")
	})
	b.Run("snapshot+format", func(b *testing.B) {
		buf := make([]byte, 0, 64<<10)
		size := 0
		for b.Loop() {
			out := appendTaskMetrics(s.metricsSnapshot().appendText(buf[:0]), tv)
			size = len(out)
		}
		b.ReportMetric(float64(b.Elapsed().Microseconds())/float64(b.N)/1000, "ms/scrape")
		b.ReportMetric(float64(size), "bytes")
	})
	b.Run("status-document", func(b *testing.B) {
		for b.Loop() {
			s.statusDoc()
		}
		b.ReportMetric(float64(b.Elapsed().Microseconds())/float64(b.N)/1000, "ms/doc")
	})
}

// BenchmarkScrapeHTTP1MQueued is a whole GET /metrics over the Unix socket from a daemon with
// 1,000,000 background jobs queued (its one renderer held at the gate): the scheduler's
// round trip, formatting, and HTTP.
func BenchmarkScrapeHTTP1MQueued(b *testing.B) {
	const n = 1_000_000
	d := newTestDaemon(b, daemonOpts{renderers: 1, maxSeed: -1, gate: true, extraYAML: "log_level: warn\n"})
	b.Cleanup(func() { d.release(10) })
	c, err := net.Dial("unix", d.socket)
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	// Write the requests from one goroutine and read the "queued" replies from another.
	go func() {
		buf := make([]byte, 0, 1<<20)
		for i := 0; i < n+1; i++ {
			buf = fmt.Appendf(buf, `{"command":"tile","cache_identifier":"b","tiles":[[%d,%d,20]],"priority":%d,"background":true}`+"\n", i%8192, i/8192, 10+i%2*90)
			if len(buf) > 1<<20-200 {
				c.Write(buf)
				buf = buf[:0]
			}
		}
		c.Write(buf)
	}()
	rd := make([]byte, 1<<20)
	for lines := 0; lines < n+1; {
		k, err := c.Read(rd)
		if err != nil {
			b.Fatal(err)
		}
		for _, ch := range rd[:k] {
			if ch == '\n' {
				lines++
			}
		}
	}
	d.waitFor("1M queued", func(s statusDoc) bool { return s.Queue.Length == n })
	hc := httpClientFor("unix", d.socket)
	for b.Loop() {
		resp, err := hc.Get("http://renderd/metrics")
		if err != nil {
			b.Fatal(err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
	}
	b.ReportMetric(float64(b.Elapsed().Microseconds())/float64(b.N)/1000, "ms/scrape")
}

// BenchmarkNoopThroughputScrape is BenchmarkEndToEnd's closed loop (4 no-op renderers, 8
// connections × 32 in flight) without and with a /metrics scrape every second (the usual
// Prometheus interval is 15 s or more, so this is harsher than real life). Goal: the same
// within noise.
func BenchmarkNoopThroughputScrape(b *testing.B) {
	for _, every := range []time.Duration{0, time.Second, 100 * time.Millisecond} {
		name := "no-scrape"
		if every > 0 {
			name = "scrape-every-" + every.String()
		}
		b.Run(name, func(b *testing.B) {
			d := newTestDaemon(b, daemonOpts{renderers: 4, maxSeed: -1, extraYAML: "log_level: warn\n"})
			ctx, cancel := context.WithCancel(context.Background())
			var wg sync.WaitGroup
			scrapes := 0
			if every > 0 {
				hc := httpClientFor("unix", d.socket)
				wg.Add(1)
				go func() {
					defer wg.Done()
					t := time.NewTicker(every)
					defer t.Stop()
					for {
						select {
						case <-ctx.Done():
							return
						case <-t.C:
						}
						resp, err := hc.Get("http://renderd/metrics")
						if err != nil {
							return
						}
						io.Copy(io.Discard, resp.Body)
						resp.Body.Close()
						if resp.StatusCode == http.StatusOK {
							scrapes++
						}
					}
				}()
			}
			b.ResetTimer()
			rate := closedLoop(b, d.socket, b.N)
			b.StopTimer()
			cancel()
			wg.Wait()
			b.ReportMetric(rate, "req/s")
			b.ReportMetric(float64(scrapes), "scrapes")
		})
	}
}

// closedLoop sends about total tile requests over 8 connections, each keeping 32 in flight,
// every request a distinct tile, and returns the requests per second.
func closedLoop(b *testing.B, socket string, total int) float64 {
	const conns, window = 8, 32
	per := total/conns + 1
	var wg sync.WaitGroup
	start := time.Now()
	for c := 0; c < conns; c++ {
		nc, err := net.Dial("unix", socket)
		if err != nil {
			b.Fatal(err)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer nc.Close()
			slots := make(chan struct{}, window)
			readerDone := make(chan int)
			go func() {
				buf := make([]byte, 64<<10)
				lines := 0
				for lines < per {
					k, err := nc.Read(buf)
					if err != nil {
						break
					}
					for _, ch := range buf[:k] {
						if ch == '\n' {
							lines++
							<-slots
						}
					}
				}
				readerDone <- lines
			}()
			for i := 0; i < per; i++ {
				slots <- struct{}{}
				fmt.Fprintf(nc, `{"command":"tile","id":"%d","cache_identifier":"b","tiles":[[%d,%d,20]],"priority":100}`+"\n", i, i, c)
			}
			if got := <-readerDone; got != per {
				b.Errorf("connection %d: %d replies, want %d", c, got, per)
			}
		}()
	}
	wg.Wait()
	return float64(per*conns) / time.Since(start).Seconds()
}
