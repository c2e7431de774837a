// SPDX-License-Identifier: Apache-2.0

// Command clusterload is the load generator of bench/cluster.sh: it POSTs MapProxy 1.15's
// exact renderd requests (id = sha1 of the Python repr of (cache, [(x, y, z)])) over HTTP,
// each on a new connection as MapProxy does, to a daemon or to HAProxy in front of several.
//
//	clusterload closed  -url U -window 64 -duration 10s   closed loop: renders/s, latency
//	clusterload latency -url U -n 2000                     one request at a time: latency
//	clusterload plan -n 3000                               a planner (planner_command) for seed tasks
//
// Every request names its own metatile (8×8 apart at -z, from index -start), so nothing is
// merged. It prints one JSON line: completed, failed, per_s, p50_ms, p90_ms, p99_ms and the
// machine's CPU use during the run (cpu_busy, 0–1, from /proc/stat). Every loop is bounded
// in count and in time.
package main

import (
	"bufio"
	"context"
	"crypto/sha1"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

func main() {
	if len(os.Args) >= 2 && os.Args[1] == "plan" {
		if err := plan(os.Args[2:]); err != nil {
			fmt.Fprintln(os.Stderr, "clusterload plan:", err)
			os.Exit(1)
		}
		return
	}
	if len(os.Args) < 2 || (os.Args[1] != "closed" && os.Args[1] != "latency") {
		fmt.Fprintln(os.Stderr, "usage: clusterload closed|latency|plan [flags]")
		os.Exit(2)
	}
	if err := run(os.Args[1], os.Args[2:]); err != nil {
		fmt.Fprintln(os.Stderr, "clusterload:", err)
		os.Exit(1)
	}
}

type result struct {
	Label     string  `json:"label,omitempty"`
	Completed int     `json:"completed"`
	Failed    int     `json:"failed"`
	FirstErr  string  `json:"first_error,omitempty"`
	PerS      float64 `json:"per_s"`
	P50MS     float64 `json:"p50_ms"`
	P90MS     float64 `json:"p90_ms"`
	P99MS     float64 `json:"p99_ms"`
	CPUBusy   float64 `json:"cpu_busy"`
	Seconds   float64 `json:"seconds"`
}

func run(mode string, args []string) error {
	fs := flag.NewFlagSet(mode, flag.ContinueOnError)
	url := fs.String("url", "", "where to POST (http://host:port/)")
	cache := fs.String("cache", "bench_GLOBAL_WEBMERCATOR", "cache identifier")
	z := fs.Int("z", 18, "zoom level")
	start := fs.Int("start", 0, "index of the first metatile (keeps runs on distinct metatiles)")
	window := fs.Int("window", 64, "closed: requests in flight")
	duration := fs.Duration("duration", 10*time.Second, "closed: how long to measure")
	warmup := fs.Int("warmup", 100, "requests before measuring")
	n := fs.Int("n", 2000, "latency: requests to time")
	label := fs.String("label", "", "label for the result line")
	timeout := fs.Duration("timeout", 3*time.Minute, "hard limit for the whole run")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *url == "" {
		return errors.New("-url is required")
	}
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	client := &http.Client{Timeout: time.Minute, Transport: &http.Transport{DisableKeepAlives: true}}
	next := int64(*start)
	post := func() (time.Duration, error) {
		i := int(atomic.AddInt64(&next, 1) - 1)
		return postOne(ctx, client, *url, *cache, 8*(i%32768), 8*(i/32768), *z)
	}
	for i := 0; i < *warmup; i++ {
		if _, err := post(); err != nil {
			return fmt.Errorf("warm-up: %w", err)
		}
	}
	var (
		mu       sync.Mutex
		lat      []time.Duration
		failed   int
		firstErr string
	)
	record := func(d time.Duration, err error) {
		mu.Lock()
		defer mu.Unlock()
		if err != nil {
			failed++
			if firstErr == "" {
				firstErr = err.Error()
			}
			return
		}
		lat = append(lat, d)
	}
	cpu0 := cpuTimes()
	began := time.Now()
	switch mode {
	case "closed":
		end := began.Add(*duration)
		var wg sync.WaitGroup
		for w := 0; w < *window; w++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for time.Now().Before(end) && ctx.Err() == nil {
					record(post())
				}
			}()
		}
		wg.Wait()
	case "latency":
		for i := 0; i < *n && ctx.Err() == nil; i++ {
			record(post())
		}
	}
	took := time.Since(began)
	cpu1 := cpuTimes()
	slices.Sort(lat)
	at := func(p float64) float64 {
		if len(lat) == 0 {
			return 0
		}
		return float64(lat[int(p*float64(len(lat)-1))].Microseconds()) / 1000
	}
	r := result{Label: *label, Completed: len(lat), Failed: failed, FirstErr: firstErr,
		PerS: float64(len(lat)) / took.Seconds(), P50MS: at(0.5), P90MS: at(0.9), P99MS: at(0.99),
		CPUBusy: busyShare(cpu0, cpu1), Seconds: took.Seconds()}
	b, _ := json.Marshal(r)
	fmt.Println(string(b))
	if ctx.Err() != nil {
		return fmt.Errorf("run cut short at -timeout %v", *timeout)
	}
	return nil
}

// postOne sends MapProxy's exact body for the metatile at (x, y, z) and times it until the
// JSON answer is read; anything but status ok is an error.
func postOne(ctx context.Context, c *http.Client, url, cache string, x, y, z int) (time.Duration, error) {
	coord := fmt.Sprintf("(%d, %d, %d)", x, y, z)
	sum := sha1.Sum([]byte("('" + cache + "', [" + coord + "])"))
	body := fmt.Sprintf(`{"command": "tile", "id": "%s", "tiles": [[%d, %d, %d]], "cache_identifier": "%s", "priority": 100}`,
		hex.EncodeToString(sum[:]), x, y, z, cache)
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, url, strings.NewReader(body))
	if err != nil {
		return 0, err
	}
	t0 := time.Now()
	resp, err := c.Do(req)
	if err != nil {
		return 0, err
	}
	b, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	d := time.Since(t0)
	if err != nil {
		return 0, err
	}
	var r struct {
		Status       string `json:"status"`
		ErrorMessage string `json:"error_message"`
	}
	if json.Unmarshal(b, &r) != nil || r.Status != "ok" {
		return 0, fmt.Errorf("HTTP %d: %.200s", resp.StatusCode, b)
	}
	return d, nil
}

// cpuTimes returns the machine's busy and total CPU ticks from /proc/stat.
func cpuTimes() [2]uint64 {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return [2]uint64{}
	}
	line, _, _ := strings.Cut(string(b), "\n")
	f := strings.Fields(line)
	var busy, total uint64
	for i, s := range f[1:] {
		v, _ := strconv.ParseUint(s, 10, 64)
		total += v
		if i != 3 && i != 4 { // idle, iowait
			busy += v
		}
	}
	return [2]uint64{busy, total}
}

func busyShare(a, b [2]uint64) float64 {
	if b[1] <= a[1] {
		return 0
	}
	return float64(b[0]-a[0]) / float64(b[1]-a[1])
}

// plan is a planner for the daemon's seed tasks (the planner protocol of README "Seeding"):
// it reads the spec line and plans -n metatiles 8 apart at -z, each its own, without
// looking at any cache, as fast as the daemon reads them.
func plan(args []string) error {
	fs := flag.NewFlagSet("plan", flag.ContinueOnError)
	n := fs.Int("n", 3000, "metatiles to plan")
	cache := fs.String("cache", "bench_GLOBAL_WEBMERCATOR", "cache identifier")
	z := fs.Int("z", 18, "zoom level")
	start := fs.Int("start", 0, "index of the first metatile")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if _, err := bufio.NewReader(os.Stdin).ReadString('\n'); err != nil {
		return fmt.Errorf("no spec line: %w", err)
	}
	out := bufio.NewWriterSize(os.Stdout, 64<<10)
	fmt.Fprintf(out, "{\"tasks\": [{\"cache_identifier\": %q, \"levels\": [%d]}]}\n", *cache, *z)
	for i := 0; i < *n; i++ {
		k := *start + i
		fmt.Fprintf(out, "{\"cache_identifier\": %q, \"tile\": [%d, %d, %d], \"progress\": %g}\n",
			*cache, 8*(k%32768), 8*(k/32768), *z, float64(i+1)/float64(*n))
	}
	fmt.Fprintln(out, `{"done": true}`)
	return out.Flush()
}
