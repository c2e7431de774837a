// SPDX-License-Identifier: Apache-2.0

package main

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"
)

// TestTopOnce: `top --once` prints one plain view (no escapes) of a busy daemon: the
// renderer count, what each renderer renders, the queue by class and priority, the last error.
func TestTopOnce(t *testing.T) {
	d, task := pageLoad(t)
	var out, errb bytes.Buffer
	if err := run(context.Background(), []string{"top", "--once", "--socket", d.socket}, &out, &errb); err != nil {
		t.Fatalf("top --once: %v\n%s", err, errb.String())
	}
	view := out.String()
	if strings.Contains(view, "\x1b") {
		t.Errorf("--once output has terminal escapes:\n%q", view)
	}
	for _, re := range []string{
		`(?m)^renderers +3 total, 3 busy \(1 live, 2 seed\), 0 starting, 0 failing$`,
		`(?m)^queue +81 queued \(5 live, 76 seed\), oldest live [0-9.]+ ?m?s, oldest seed [0-9.]+ ?m?s, 81 waiting requests$`,
		`(?m)^ +[123] [0-9]+ +busy +live +100 +[0-9.]+ ?m?s +` + cacheID + ` +14/100/7$`,
		`(?m)^ +[123] [0-9]+ +busy +seed +10 +[0-9.]+ ?m?s +c +20/[0-9]+/0$`,
		`(?m)^ +100 +5$`,
		`(?m)^ +10 +76$`,
		`(?m)^` + task.TaskID + ` +all +seed +running +\[\.{16}\] +5\.0% +2/40 +[0-9.]+/s +\S* +-$`, // LIMIT "-": no rate
		`(?m)^\S+ ` + cacheID + ` 12/9/0 fake failure for x=9$`,
	} {
		if !regexp.MustCompile(re).MatchString(view) {
			t.Errorf("view lacks %s", re)
		}
	}
	if n := len(regexp.MustCompile(`(?m)^ +[0-9]+ [0-9]+ +busy `).FindAllString(view, -1)); n != 3 {
		t.Errorf("%d busy renderer rows, want 3", n)
	}
	if t.Failed() {
		t.Logf("view:\n%s", view)
	}
	// Over TCP too, and a bad flag is an error.
	out.Reset()
	if err := run(context.Background(), []string{"top", "--once", "--http", d.tcp}, &out, &errb); err != nil || !strings.Contains(out.String(), "3 total") {
		t.Errorf("top --once --http: %v\n%s", err, out.String())
	}
	if err := run(context.Background(), []string{"top", "--interval", "1ms", "--socket", d.socket}, &out, &errb); err == nil {
		t.Error("--interval 1ms: no error")
	}
}

// TestTopLive: the live view redraws (clear screen, bold headings) until its context ends,
// then leaves the alternate screen.
func TestTopLive(t *testing.T) {
	d := newTestDaemon(t, daemonOpts{renderers: 2, maxSeed: -1})
	ctx, cancel := context.WithCancel(context.Background())
	w := &cancelAfterWriter{n: 3, cancel: cancel}
	if err := run(ctx, []string{"top", "--interval", "100ms", "--socket", d.socket}, w, &bytes.Buffer{}); err != nil {
		t.Fatalf("top: %v", err)
	}
	view := w.b.String()
	if n := strings.Count(view, "\x1b[H\x1b[2J"); n < 2 {
		t.Errorf("%d redraws, want at least 2", n)
	}
	if !strings.Contains(view, "\x1b[1mrenderers \x1b[0m 2 total") || !strings.HasSuffix(view, "\x1b[?25h\x1b[?1049l") {
		t.Errorf("live view:\n%q", view)
	}
}

// cancelAfterWriter collects output and cancels after n writes that contain a screen.
type cancelAfterWriter struct {
	b      bytes.Buffer
	n      int
	cancel context.CancelFunc
}

func (w *cancelAfterWriter) Write(p []byte) (int, error) {
	if bytes.Contains(p, []byte("renderers")) {
		if w.n--; w.n == 0 {
			w.cancel()
		}
	}
	return w.b.Write(p)
}

// TestTopInTmux runs the live view in a real terminal (tmux) and reads the screen twice: it
// shows the daemon, and it is redrawn (the clock in its first line moves on).
func TestTopInTmux(t *testing.T) {
	tmux := requireTool(t, "tmux", "tmux")
	d := newTestDaemon(t, daemonOpts{renderers: 2, maxSeed: -1})
	sock := filepath.Join(shortTempDir(t), "tmux.sock")
	tm := func(args ...string) string {
		t.Helper()
		out, err := exec.Command(tmux, append([]string{"-S", sock}, args...)...).CombinedOutput()
		if err != nil {
			t.Fatalf("tmux %v: %v\n%s", args, err, out)
		}
		return string(out)
	}
	// The test binary runs run() when its first argument is "daemon" (TestMain).
	tm("new-session", "-d", "-x", "120", "-y", "40", os.Args[0], "daemon", "top", "--interval", "200ms", "--socket", d.socket)
	t.Cleanup(func() { _ = exec.Command(tmux, "-S", sock, "kill-server").Run() })
	screen := func(cond func(string) bool) string {
		t.Helper()
		deadline := time.Now().Add(30 * time.Second)
		for {
			s := tm("capture-pane", "-p")
			if cond(s) {
				return s
			}
			if time.Now().After(deadline) {
				t.Fatalf("screen never showed what was expected:\n%s", s)
			}
			time.Sleep(50 * time.Millisecond) // polling the terminal, bounded by the deadline
		}
	}
	first := screen(func(s string) bool { return strings.Contains(s, "renderers  2 total, 0 busy") })
	clock := regexp.MustCompile(`\d\d:\d\d:\d\d UTC`)
	firstClock := clock.FindString(first)
	screen(func(s string) bool { c := clock.FindString(s); return c != "" && c != firstClock })
	tm("send-keys", "C-c")
}
