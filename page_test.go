// SPDX-License-Identifier: Apache-2.0

package main

import (
	"bytes"
	"context"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"
)

// runChromium runs headless Chromium with args plus URL and returns its stdout. Chromium
// starts helper processes: it runs in its own process group, and the whole group is killed
// if it outlives the deadline.
func runChromium(t *testing.T, chromium string, url string, args ...string) []byte {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	profile := t.TempDir()
	argv := append([]string{"--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
		"--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
		"--user-data-dir=" + profile}, args...)
	cmd := exec.CommandContext(ctx, chromium, append(argv, url)...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	cmd.WaitDelay = 10 * time.Second
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) // helpers left behind, if any
	if err != nil {
		t.Fatalf("chromium %v: %v\n%s", args, err, tail(stderr.String(), 2000))
	}
	return stdout.Bytes()
}

// artifactPath is where a test keeps a file for people to look at after the run: under the
// system temp dir (t.TempDir is removed when the test ends), one fixed name per test, so
// runs overwrite instead of piling up.
func artifactPath(t *testing.T, name string) string {
	dir := filepath.Join(os.TempDir(), "mapproxy-renderd-test-artifacts")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	return filepath.Join(dir, t.Name()+"-"+name)
}

// pageLoad puts a daemon in a state worth showing, frozen (every renderer waits at the gate,
// so nothing changes until the test releases renders): a seed task "all" of 40 metatiles
// with 2 done, 2 of its jobs running and the rest queued; one live job running and 5 queued;
// 40 native seed requests queued behind; one failed render in last_errors.
func pageLoad(t *testing.T) (*taskRig, taskDoc) {
	const renderers = 3
	r := newTaskRig(t, taskRigOpts{daemonOpts: daemonOpts{renderers: renderers, maxSeed: 2, gate: true, tcp: true, rendArgs: []string{"-fail", "9"}},
		plannerArgs: []string{"-n", "40"}})
	// Runs before the daemon's stop (cleanups run last first): the gated renders finish, so
	// the stop need not wait for stop_timeout.
	t.Cleanup(func() { r.release(200) })
	cl := r.dial()
	cl.send(tileReq("f", cacheID, 9, 0, 12, 100))
	r.release(1)
	if rep := cl.read(); rep.Status != statusError {
		t.Fatalf("failing render: got %+v", rep)
	}
	task := r.seed("all")
	r.waitTask(task.TaskID, "planned, 2 running", func(d taskDoc) bool { return d.Planned == 40 })
	r.waitFor("2 seed renders running", func(s statusDoc) bool { return s.Renderers.BusySeed == 2 })
	r.release(2)
	task = r.waitTask(task.TaskID, "2 done", func(d taskDoc) bool { return d.Done == 2 })
	r.waitFor("2 seed renders running again", func(s statusDoc) bool { return s.Renderers.BusySeed == 2 })
	for x := 0; x < renderers+3; x++ {
		cl.send(tileReq(fmt.Sprint("l", x), cacheID, 100+x, 7, 14, 100))
	}
	for x := 0; x < 40; x++ {
		cl.send(tileReq(fmt.Sprint("s", x), cacheID, 200+x, 9, 16, 10))
	}
	r.waitFor("every renderer busy and both classes queued", func(s statusDoc) bool {
		return s.Renderers.Busy == renderers && s.Queue.LiveQueued == 5 && s.Queue.SeedQueued == 76
	})
	return r, r.waitTask(task.TaskID, "settled", func(d taskDoc) bool { return d.Queued == 38 })
}

// TestStatusPageHTML: GET / is an HTML page with the renderers and what they render, the
// queue by class, the last error and both sparklines; on both listeners.
func TestStatusPageHTML(t *testing.T) {
	d, task := pageLoad(t)
	for name, c := range map[string]*http.Client{"tcp": httpClientFor("tcp", d.tcp), "unix": httpClientFor("unix", d.socket)} {
		code, hdr, body := httpGet(t, c, "/")
		if code != http.StatusOK || !strings.HasPrefix(hdr.Get("Content-Type"), "text/html") {
			t.Fatalf("%s: GET /: %d %s", name, code, hdr.Get("Content-Type"))
		}
		page := string(body)
		for _, want := range []string{
			`<span id="renderer-count">3</span> renderers`,
			`3 busy (1 live, 2 seed)`,
			`<td>` + cacheID + `</td><td>14/100/7</td><td class="n">100</td><td>live</td>`, // what the renderers render
			`fake failure for x=9`,
			`id="spark-renders"`, `id="spark-queue"`,
			`<td>live</td><td class="n">5</td>`,
			`<td>seed</td><td class="n">76</td>`,
			`<tr id="task-` + task.TaskID + `"><td>` + task.TaskID + `</td><td>all</td><td>seed</td><td class="running">running</td>`,
			`aria-valuenow="5.0"`, `2 of 40`, // 2 of 40 metatiles done
			`<svg class="taskmap" id="taskmap-` + task.TaskID + `"`, `aria-label="metatiles at zoom 20: 2 done, 38 planned, 0 failed"`, // picture.go
		} {
			if !strings.Contains(page, want) {
				t.Errorf("%s: page lacks %q", name, want)
			}
		}
		// Which two task jobs run depends on which renderer read the gate bytes first.
		if n := len(regexp.MustCompile(`<td>c</td><td>20/[0-9]+/0</td><td class="n">10</td><td>seed</td>`).FindAllString(page, -1)); n != 2 {
			t.Errorf("%s: %d task jobs on renderers, want 2", name, n)
		}
		if strings.Count(page, `<td class="busy">busy</td>`) != 3 {
			t.Errorf("%s: want 3 busy renderer rows", name)
		}
		if t.Failed() {
			t.Logf("page:\n%s", page)
			return
		}
	}
	// Other paths still get the JSON 404.
	code, _, _ := httpGet(t, httpClientFor("tcp", d.tcp), "/nothing-here")
	if code != http.StatusNotFound {
		t.Errorf("GET /nothing-here: %d, want 404", code)
	}
}

// TestStatusPageChromium loads the page in headless Chromium: the DOM it builds shows the
// renderer count, and a screenshot is kept as an artifact (its path is logged).
func TestStatusPageChromium(t *testing.T) {
	chromium := requireTool(t, "chromium", "chromium")
	d, task := pageLoad(t)
	url := "http://" + d.tcp + "/"
	dom := string(runChromium(t, chromium, url, "--dump-dom"))
	if m := regexp.MustCompile(`id="renderer-count">(\d+)<`).FindStringSubmatch(dom); m == nil || m[1] != "3" {
		t.Errorf("DOM renderer count: got %v, want 3\n%s", m, tail(dom, 3000))
	}
	// The task's row as the browser built it: its progress bar at 5 % (2 of 40 metatiles).
	row := regexp.MustCompile(`(?s)<tr id="task-` + task.TaskID + `">.*?</tr>`).FindString(dom)
	if !strings.Contains(row, `style="width: 5.0%"`) || !strings.Contains(row, "5.0 %") || !strings.Contains(row, "2 of 40") {
		t.Errorf("DOM task row: got %q, want a 5.0 %% bar and 2 of 40", row)
	}
	if !strings.Contains(dom, "<polyline") || !strings.Contains(dom, "fake failure for x=9") || !strings.Contains(dom, `id="taskmap-`+task.TaskID+`"`) {
		t.Errorf("DOM lacks the sparklines or the last error:\n%s", tail(dom, 3000))
	}
	shot := artifactPath(t, "status-page.png")
	os.Remove(shot)
	runChromium(t, chromium, url, "--screenshot="+shot, "--window-size=1200,900", "--hide-scrollbars")
	b, err := os.ReadFile(shot)
	if err != nil || !isPNG(b) {
		t.Fatalf("screenshot %s: %v (png: %v)", shot, err, isPNG(b))
	}
	t.Logf("status page screenshot: %s (%d bytes)", shot, len(b))
	fmt.Fprintln(os.Stderr, "status page screenshot:", shot)
}
