// SPDX-License-Identifier: Apache-2.0

package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"sort"
	"strconv"
	"strings"
	"time"
)

// runTop implements `mapproxy-renderd top`: a live terminal view of the status document
// (like tirex-status), redrawn every interval with plain ANSI escapes (clear screen, bold);
// with --once it prints one view without escapes and exits, for scripts.
func runTop(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	var cl clientFlags
	fs := newFlagSet("top", stderr)
	cl.register(fs, stderr)
	once := fs.Bool("once", false, "print one view without terminal escapes and exit")
	interval := fs.Duration("interval", time.Second, "time between refreshes")
	pos, err := parseArgs(fs, args)
	if err != nil {
		return err
	}
	if err := errNoArgs("top", pos); err != nil {
		return err
	}
	if *interval < 100*time.Millisecond {
		return fmt.Errorf("--interval: at least 100ms, got %s", *interval)
	}
	target, err := cl.target()
	if err != nil {
		return err
	}
	var status func() (statusDoc, error)
	if target.url != "" {
		status = func() (statusDoc, error) { return topStatusHTTP(ctx, target, cl.timeout) }
	} else {
		dctx, cancel := context.WithTimeout(ctx, cl.timeout)
		var d net.Dialer
		c, err := d.DialContext(dctx, target.network, target.addr)
		cancel()
		if err != nil {
			return err
		}
		defer c.Close()
		// The connection stays open between refreshes; closing it when ctx ends unblocks a read.
		stop := context.AfterFunc(ctx, func() { _ = c.SetDeadline(time.Now()) })
		defer stop()
		br := bufio.NewReaderSize(c, 1<<20)
		status = func() (statusDoc, error) { return topStatus(c, br, cl.timeout) }
	}
	if *once {
		doc, err := status()
		if err != nil {
			return err
		}
		_, err = io.WriteString(stdout, topView(doc, time.Now(), false))
		return err
	}
	const (
		altScreen  = "\x1b[?1049h\x1b[?25l" // alternate screen, cursor hidden
		mainScreen = "\x1b[?25h\x1b[?1049l"
		home       = "\x1b[H\x1b[2J"
	)
	io.WriteString(stdout, altScreen)
	defer io.WriteString(stdout, mainScreen)
	t := time.NewTicker(*interval)
	defer t.Stop()
	for {
		doc, err := status()
		if err != nil {
			if ctx.Err() != nil {
				return nil // Ctrl-C
			}
			return err
		}
		if _, err := io.WriteString(stdout, home+topView(doc, time.Now(), true)); err != nil {
			return err
		}
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
	}
}

// topStatus asks for the status document on an open connection.
// Each exchange must finish within timeout (--timeout).
func topStatus(c net.Conn, br *bufio.Reader, timeout time.Duration) (statusDoc, error) {
	_ = c.SetDeadline(time.Now().Add(timeout))
	if _, err := io.WriteString(c, `{"command":"status","id":"top"}`+"\n"); err != nil {
		return statusDoc{}, err
	}
	line, err := br.ReadBytes('\n')
	if err != nil {
		if errors.Is(err, io.EOF) {
			return statusDoc{}, errors.New("the daemon closed the connection")
		}
		return statusDoc{}, err
	}
	var r Reply
	if err := json.Unmarshal(line, &r); err != nil {
		return statusDoc{}, fmt.Errorf("invalid reply: %s", truncate(string(line), 200))
	}
	return statusFromReply(r)
}

// statusFromReply is the status document a status reply carries, or why there is none.
func statusFromReply(r Reply) (statusDoc, error) {
	if r.Status != statusOK {
		return statusDoc{}, fmt.Errorf("status: %s %s", r.Status, r.ErrorMessage)
	}
	var doc statusDoc
	if err := json.Unmarshal(r.Stats, &doc); err != nil {
		return statusDoc{}, fmt.Errorf("status document: %w", err)
	}
	return doc, nil
}

// topStatusHTTP asks for the status document with GET /status (--http URL).
func topStatusHTTP(ctx context.Context, target daemonTarget, timeout time.Duration) (statusDoc, error) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	r, _, err := target.call(ctx, "status", nil)
	if err != nil {
		return statusDoc{}, err
	}
	return statusFromReply(r)
}

// topView formats one screen. With ansi, headings are bold.
func topView(d statusDoc, now time.Time, ansi bool) string {
	var b strings.Builder
	head := func(s string) string {
		if ansi {
			return "\x1b[1m" + s + "\x1b[0m"
		}
		return s
	}
	f1 := func(v float64) string { return strconv.FormatFloat(v, 'f', 1, 64) }
	fmt.Fprintf(&b, "%s %s   up %s   %s", head("mapproxy-renderd"), d.Version, fmtSeconds(d.UptimeS), now.UTC().Format("2006-01-02 15:04:05 UTC"))
	if d.Stopping {
		b.WriteString("   STOPPING")
	}
	b.WriteString("\n\n")
	r := d.Renderers
	fmt.Fprintf(&b, "%s %d total, %d busy (%d live, %d seed), %d starting, %d failing\n", head("renderers "), r.Total, r.Busy, r.BusyLive, r.BusySeed, r.Starting, r.Failing)
	q := d.Queue
	fmt.Fprintf(&b, "%s %d queued (%d live, %d seed), oldest live %s, oldest seed %s, %d waiting requests\n", head("queue     "),
		q.Length, q.LiveQueued, q.SeedQueued, fmtMS(q.OldestLiveAgeMS), fmtMS(q.OldestSeedAgeMS), q.WaitingTotal)
	fmt.Fprintf(&b, "%s %s/s last 10 s, %s/s last minute, %s/s last 15 minutes\n", head("renders   "),
		f1(d.Rates["renders_per_s_10s"]), f1(d.Rates["renders_per_s_1m"]), f1(d.Rates["renders_per_s_15m"]))
	fmt.Fprintf(&b, "%s rendered %d, failed %d, timed out %d, merged %d, dropped %d, busy %d\n", head("counters  "),
		d.Counters["rendered"], d.Counters["failed"], d.Counters["timed_out"], d.Counters["merged"], d.Counters["dropped"], d.Counters["busy_rejected"])
	if len(d.RenderMS) > 0 {
		fmt.Fprintf(&b, "%s p50 %s, p90 %s, p99 %s, max %s (last %d renders)\n", head("render    "),
			fmtMS(d.RenderMS["p50"]), fmtMS(d.RenderMS["p90"]), fmtMS(d.RenderMS["p99"]), fmtMS(d.RenderMS["max"]), int(d.RenderMS["samples"]))
	}
	if d.LastStartError != "" {
		fmt.Fprintf(&b, "%s %s\n", head("start err "), truncate(d.LastStartError, 200))
	}
	if rl := rateLine(d.RateLimit); rl != "" {
		fmt.Fprintf(&b, "%s %s\n", head("rate      "), rl)
	}

	b.WriteString("\n" + head(fmt.Sprintf("%3s %-8s %-9s %-5s %5s %9s  %-32s %s", "#", "PID", "STATE", "CLASS", "PRIO", "RUNNING", "CACHE", "TILE z/x/y")) + "\n")
	for _, rd := range d.RendererList {
		state := rd.State
		if rd.Retiring {
			state += "*"
		}
		if rd.Failing {
			state = "failing"
		}
		pid, prio, running, tile := "", "", "", ""
		if rd.PID > 0 {
			pid = strconv.Itoa(rd.PID)
		}
		if rd.Class != "" {
			prio, running = strconv.Itoa(rd.Priority), fmtMS(rd.RunningMS)
		}
		if rd.Tile != nil {
			tile = fmt.Sprintf("%d/%d/%d", rd.Tile[2], rd.Tile[0], rd.Tile[1])
		}
		fmt.Fprintf(&b, "%3d %-8s %-9s %-5s %5s %9s  %-32s %s\n", rd.Renderer, pid, state, rd.Class, prio, running, truncate(rd.CacheIdentifier, 32), tile)
	}

	active := 0
	for _, t := range d.Tasks {
		if !t.finished() {
			active++
		}
	}
	if active > 0 {
		b.WriteString("\n" + head(fmt.Sprintf("%-6s %-16s %-7s %-8s %-24s %15s %9s %9s %9s", "TASK", "NAME", "KIND", "STATE", "PROGRESS", "METATILES", "RATE", "ETA", "LIMIT")) + "\n")
		for _, t := range d.Tasks {
			if t.finished() {
				continue
			}
			f := taskFraction(t)
			bar := strings.Repeat("#", int(f*16)) + strings.Repeat(".", 16-int(f*16))
			limit := "-"
			if t.EffectiveRate > 0 {
				limit = strconv.FormatFloat(t.EffectiveRate, 'f', 1, 64) + "/s"
			}
			fmt.Fprintf(&b, "%-6s %-16s %-7s %-8s [%s] %5.1f%% %15s %8.1f/s %9s %9s\n", t.TaskID, truncate(t.Name, 16), t.Kind, t.State, bar, 100*f,
				strconv.FormatUint(t.Done+t.Skipped+t.Failed, 10)+"/"+strconv.FormatUint(t.TotalEstimate, 10), t.RatePerS, etaText(t), limit)
		}
	}
	if len(q.ByPriority) > 0 {
		b.WriteString("\n" + head(fmt.Sprintf("%8s %10s", "PRIORITY", "QUEUED")) + "\n")
		prios := make([]int, 0, len(q.ByPriority))
		for p := range q.ByPriority {
			n, _ := strconv.Atoi(p)
			prios = append(prios, n)
		}
		sort.Sort(sort.Reverse(sort.IntSlice(prios)))
		for _, p := range prios {
			fmt.Fprintf(&b, "%8d %10d\n", p, q.ByPriority[strconv.Itoa(p)])
		}
	}
	if len(d.LastErrors) > 0 {
		b.WriteString("\n" + head("LAST ERRORS") + "\n")
		for i, e := range d.LastErrors {
			if i == 5 {
				break
			}
			fmt.Fprintf(&b, "%s %s %d/%d/%d %s\n", e.Time, e.CacheIdentifier, e.Tile[2], e.Tile[0], e.Tile[1], truncate(e.Message, 120))
		}
	}
	return b.String()
}
