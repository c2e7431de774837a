package main

import (
	"fmt"
	"net"
	"strings"
	"sync"
	"testing"
	"time"
)

func TestParseRequestMapProxyBody(t *testing.T) {
	req, err := parseRequest([]byte(mapproxyBody("wms_cache_GLOBAL_WEBMERCATOR", 16, 8, 5, 100)))
	if err != nil {
		t.Fatal(err)
	}
	if req.Command != "tile" || req.CacheIdentifier != "wms_cache_GLOBAL_WEBMERCATOR" || len(req.Tiles) != 1 ||
		req.Tiles[0] != (tileCoord{16, 8, 5}) || req.Priority != 100 || *req.ID != "a8a4fb883bf7e0f285fc11104200e8e7dda6b9d5" {
		t.Fatalf("got %+v", req)
	}
	req, err = parseRequest([]byte(`{"command":"tile","cache_identifier":"c","tiles":[[1,2,3],[4,5,6]],"background":true}`))
	if err != nil || req.Priority != defaultPriority || !req.Background || len(req.Tiles) != 2 || req.ID != nil {
		t.Fatalf("defaults: got %+v, %v", req, err)
	}
	if _, err := parseRequest([]byte("   ")); err != errEmptyLine {
		t.Fatalf("blank line: got %v, want errEmptyLine", err)
	}
	if _, err := parseRequest([]byte{'{', 0xff, '}'}); err == nil || !strings.Contains(err.Error(), "UTF-8") {
		t.Fatalf("invalid UTF-8: got %v", err)
	}
}

// FuzzParseRequest: the parser never panics, and what it accepts is valid.
func FuzzParseRequest(f *testing.F) {
	f.Add(mapproxyBody("wms_cache_GLOBAL_WEBMERCATOR", 16, 8, 5, 100))
	f.Add(`{"command":"tile","cache_identifier":"c","tiles":[[1,2,3]],"priority":1e2,"background":true,"id":"x"}`)
	f.Add(`{"command":"status"}`)
	f.Add(`{"command":"tile","tiles":[[1.5,-2,3]]}`)
	f.Add(`[{"command":"ping"}]`)
	f.Fuzz(func(t *testing.T, line string) {
		req, err := parseRequest([]byte(line))
		if err != nil {
			if _, ok := err.(*requestError); !ok && err != errEmptyLine {
				t.Fatalf("error of type %T: %v", err, err)
			}
			return
		}
		switch req.Command {
		case "ping", "status":
		case "tile":
			if validateCacheIdentifier(req.CacheIdentifier) != nil || len(req.Tiles) == 0 ||
				req.Priority < minPriority || req.Priority > maxPriority {
				t.Fatalf("accepted an invalid request: %+v", req)
			}
			for _, c := range req.Tiles {
				if c.X < 0 || c.Y < 0 || c.Z < 0 || c.Z > maxZoom {
					t.Fatalf("accepted bad coordinates: %+v", c)
				}
			}
		default:
			t.Fatalf("accepted command %q", req.Command)
		}
	})
}

func TestReadLimitedLine(t *testing.T) {
	d := newTestDaemon(t, daemonOpts{renderers: 1, maxSeed: -1, extraYAML: "max_line_bytes: 2048\n"})
	cl := d.dial()
	// A line just at the limit parses; one byte more is refused; the stream stays in sync.
	pad := func(n int) string {
		base := `{"command":"ping","id":"`
		return base + strings.Repeat("p", n-len(base)-2) + `"}`
	}
	cl.send(pad(2048))
	if r := cl.read(); r.Status != statusOK {
		t.Fatalf("line of 2048 bytes: got %+v", r)
	}
	cl.send(pad(2049))
	if r := cl.read(); r.Status != statusError || !strings.Contains(r.ErrorMessage, "longer than max_line_bytes") {
		t.Fatalf("line of 2049 bytes: got %+v", r)
	}
	cl.send(`{"command":"ping","id":"after"}`)
	if r := cl.read(); idOf(r) != "after" {
		t.Fatalf("after an over-long line: got %+v", r)
	}
}

// BenchmarkEndToEnd measures requests/s through the Unix socket with 4 no-op renderers:
// 8 connections, each a closed loop with 32 requests in flight, every request a distinct tile.
func BenchmarkEndToEnd(b *testing.B) {
	d := newTestDaemon(b, daemonOpts{renderers: 4, maxSeed: -1, extraYAML: "log_level: warn\n"})
	const conns, window = 8, 32
	per := b.N/conns + 1
	var wg sync.WaitGroup
	b.ResetTimer()
	start := time.Now()
	for c := 0; c < conns; c++ {
		nc, err := net.Dial("unix", d.socket)
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
	b.ReportMetric(float64(per*conns)/time.Since(start).Seconds(), "req/s")
}
