// SPDX-License-Identifier: Apache-2.0

package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"net"
	"net/http"
	"os"
	"os/exec"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// requireTool returns the path of an external program a test needs. Missing, it fails the
// test under CI=true (.ci/run installs pkg) and skips it elsewhere.
func requireTool(t *testing.T, name, pkg string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		msg := name + " is missing (apt-get install " + pkg + "): " + err.Error()
		if os.Getenv("CI") == "true" {
			t.Fatal(msg)
		}
		t.Skip(msg)
	}
	return p
}

// httpClientFor returns a client that reaches the daemon over network/addr whatever the URL's
// host says, with keep-alive: successive requests share one connection, so reading the
// status and the metrics does not change the connection counters in between.
func httpClientFor(network, addr string) *http.Client {
	return &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, network, addr)
		},
		MaxIdleConnsPerHost: 1,
	}}
}

func httpGet(t *testing.T, c *http.Client, path string) (int, http.Header, []byte) {
	t.Helper()
	resp, err := c.Get("http://renderd" + path)
	if err != nil {
		t.Fatalf("GET %s: %v", path, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("GET %s: %v", path, err)
	}
	return resp.StatusCode, resp.Header, b
}

// promSample is one line of a scrape.
type promSample struct {
	name   string
	labels map[string]string
	value  float64
}

// scrape is a parsed /metrics body.
type scrape struct {
	samples []promSample
	types   map[string]string // family name → type
	text    string
}

// parseScrape parses the text format strictly enough to catch our own mistakes: every line
// is a comment or name{labels} value; every sample belongs to a declared family.
func parseScrape(t *testing.T, text string) *scrape {
	t.Helper()
	s := &scrape{types: map[string]string{}, text: text}
	for i, line := range strings.Split(strings.TrimSuffix(text, "\n"), "\n") {
		if strings.HasPrefix(line, "# TYPE ") {
			f := strings.Fields(line)
			s.types[f[2]] = f[3]
			continue
		}
		if strings.HasPrefix(line, "#") {
			continue
		}
		sp := strings.LastIndexByte(line, ' ')
		if sp < 0 {
			t.Fatalf("line %d: no value: %q", i+1, line)
		}
		v, err := strconv.ParseFloat(line[sp+1:], 64)
		if err != nil {
			t.Fatalf("line %d: value: %v", i+1, err)
		}
		series := line[:sp]
		ps := promSample{name: series, labels: map[string]string{}, value: v}
		if b := strings.IndexByte(series, '{'); b >= 0 {
			ps.name = series[:b]
			body := strings.TrimSuffix(series[b+1:], "}")
			for body != "" {
				eq := strings.Index(body, `="`)
				if eq < 0 {
					t.Fatalf("line %d: bad labels %q", i+1, series)
				}
				name := body[:eq]
				rest := body[eq+2:]
				var val strings.Builder
				j := 0
				for ; j < len(rest) && rest[j] != '"'; j++ {
					if rest[j] == '\\' && j+1 < len(rest) {
						j++
						if rest[j] == 'n' {
							val.WriteByte('\n')
							continue
						}
					}
					val.WriteByte(rest[j])
				}
				ps.labels[name] = val.String()
				body = strings.TrimPrefix(rest[min(j+1, len(rest)):], ",")
			}
		}
		if s.family(ps.name) == "" {
			t.Fatalf("line %d: sample %s of no declared family", i+1, ps.name)
		}
		s.samples = append(s.samples, ps)
	}
	return s
}

// family returns the declared family a sample name belongs to.
func (s *scrape) family(name string) string {
	if _, ok := s.types[name]; ok {
		return name
	}
	for _, suf := range []string{"_bucket", "_sum", "_count"} {
		if f, ok := strings.CutSuffix(name, suf); ok && s.types[f] == "histogram" {
			return f
		}
	}
	return ""
}

// sum adds the samples of name whose labels include match (name=value pairs).
func (s *scrape) sum(name string, match ...string) float64 {
	total := 0.0
	for _, ps := range s.samples {
		if ps.name != metricPrefix+name {
			continue
		}
		ok := true
		for i := 0; i+1 < len(match); i += 2 {
			if ps.labels[match[i]] != match[i+1] {
				ok = false
			}
		}
		if ok {
			total += ps.value
		}
	}
	return total
}

// find returns the samples of name whose labels include match.
func (s *scrape) find(name string, match ...string) []promSample {
	var out []promSample
	for _, ps := range s.samples {
		if ps.name != metricPrefix+name {
			continue
		}
		ok := true
		for i := 0; i+1 < len(match); i += 2 {
			if ps.labels[match[i]] != match[i+1] {
				ok = false
			}
		}
		if ok {
			out = append(out, ps)
		}
	}
	return out
}

// counters returns every counter sample keyed by its series text.
func (s *scrape) counters() map[string]float64 {
	out := map[string]float64{}
	for _, ps := range s.samples {
		if s.types[s.family(ps.name)] == "counter" {
			keys := make([]string, 0, len(ps.labels))
			for k, v := range ps.labels {
				keys = append(keys, k+"="+v)
			}
			sort.Strings(keys)
			out[ps.name+"{"+strings.Join(keys, ",")+"}"] = ps.value
		}
	}
	return out
}

// checkHistograms checks every histogram series: buckets with le strictly increasing and
// counts not decreasing, ending with +Inf equal to _count; _sum present and not negative.
func checkHistograms(t *testing.T, s *scrape) {
	t.Helper()
	type series struct {
		les    []float64
		counts []float64
		count  float64
		sum    float64
		seen   int
	}
	all := map[string]*series{}
	keyOf := func(ps promSample) string {
		keys := []string{}
		for k, v := range ps.labels {
			if k != "le" {
				keys = append(keys, k+"="+v)
			}
		}
		sort.Strings(keys)
		return s.family(ps.name) + "{" + strings.Join(keys, ",") + "}"
	}
	for _, ps := range s.samples {
		f := s.family(ps.name)
		if s.types[f] != "histogram" {
			continue
		}
		k := keyOf(ps)
		h := all[k]
		if h == nil {
			h = &series{}
			all[k] = h
		}
		switch ps.name {
		case f + "_bucket":
			le, err := strconv.ParseFloat(ps.labels["le"], 64)
			if err != nil {
				t.Fatalf("%s: bad le %q", k, ps.labels["le"])
			}
			h.les = append(h.les, le)
			h.counts = append(h.counts, ps.value)
		case f + "_count":
			h.count = ps.value
			h.seen++
		case f + "_sum":
			h.sum = ps.value
			h.seen++
		}
	}
	if len(all) == 0 {
		t.Fatal("no histograms in the scrape")
	}
	for k, h := range all {
		if h.seen != 2 || len(h.les) != nBuckets+1 {
			t.Errorf("%s: %d buckets and %d of _sum/_count, want %d and 2", k, len(h.les), h.seen, nBuckets+1)
			continue
		}
		for i := 1; i < len(h.les); i++ {
			if !(h.les[i] > h.les[i-1]) || h.counts[i] < h.counts[i-1] {
				t.Errorf("%s: bucket %d (le %g, %g) after (le %g, %g)", k, i, h.les[i], h.counts[i], h.les[i-1], h.counts[i-1])
			}
		}
		if last := len(h.les) - 1; !math.IsInf(h.les[last], 1) || h.counts[last] != h.count {
			t.Errorf("%s: last bucket le %g = %g, _count %g; want +Inf equal to _count", k, h.les[last], h.counts[last], h.count)
		}
		if h.sum < 0 || (h.count == 0 && h.sum != 0) {
			t.Errorf("%s: _sum %g with _count %g", k, h.sum, h.count)
		}
	}
}

// promtoolCheck runs `promtool check metrics` on a scrape.
func promtoolCheck(t *testing.T, promtool string, body []byte) {
	t.Helper()
	cmd := exec.Command(promtool, "check", "metrics")
	cmd.Stdin = bytes.NewReader(body)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("promtool check metrics: %v\n%s\nscrape:\n%s", err, out, body)
	}
}

// TestMetricsScrape: /metrics under load (queued and running jobs of both classes, native and
// HTTP clients, a seed task, failures, a crash and a timeout) passes promtool, over TCP and the Unix
// socket; in a quiet moment every counter equals the status document's figure; the
// histograms keep their invariants.
func TestMetricsScrape(t *testing.T) {
	promtool := requireTool(t, "promtool", "prometheus")
	rig := newTaskRig(t, taskRigOpts{daemonOpts: daemonOpts{renderers: 2, maxSeed: 1, gate: true, tcp: true,
		rendArgs:  []string{"-skip", "104", "-fail", "105", "-crash", "106", "-hang", "107"}, // the task's tiles have x 0..29
		extraYAML: "render_timeout: 1s\n"}, plannerArgs:                                      []string{"-n", "30"}})
	d := rig.testDaemon
	tcp := httpClientFor("tcp", d.tcp)
	unix := httpClientFor("unix", d.socket)

	cl := d.dial()
	n := 0
	send := func(x, z, prio int) {
		n++
		cl.send(tileReq(fmt.Sprint(n), cacheID, x, 0, z, prio))
	}
	for x := 100; x < 108; x++ { // live: 104 is skipped (fresh), 105 fails, 106 crashes its renderer, 107 hangs past render_timeout
		send(x, 3, 100)
	}
	for x := 10; x < 20; x++ {
		send(x, 4, 10)
	}
	send(101, 3, 10) // joins a queued live job: merged
	cl.send(`{"command":"tile","id":"bg","cache_identifier":"` + cacheID + `","tiles":[[30,0,5]],"priority":10,"background":true}`)
	if r := cl.read(); r.Status != statusQueued {
		t.Fatalf("background: got %+v", r)
	}
	var posts sync.WaitGroup
	posts.Add(1)
	go func() {
		defer posts.Done()
		postMapProxy(t, d.tcp, "/", cacheID, 40, 0, 3, 100)
	}()
	task := rig.seed("all")
	rig.waitTask(task.TaskID, "planned", func(d taskDoc) bool { return d.Planned == 30 })
	d.waitFor("two renders running and a queue", func(s statusDoc) bool {
		return s.Renderers.Busy == 2 && s.Queue.SeedQueued > 0 && s.Queue.LiveQueued > 0 && s.Queue.WaitingTotal > 0
	})

	// Under load, on both listeners.
	for name, c := range map[string]*http.Client{"tcp": tcp, "unix": unix} {
		code, hdr, body := httpGet(t, c, "/metrics")
		if code != http.StatusOK || !strings.HasPrefix(hdr.Get("Content-Type"), "text/plain; version=0.0.4") {
			t.Fatalf("%s: GET /metrics: %d %q", name, code, hdr.Get("Content-Type"))
		}
		promtoolCheck(t, promtool, body)
		s := parseScrape(t, string(body))
		checkHistograms(t, s)
		if s.sum("queue_length", "class", "seed") == 0 || s.sum("queue_length", "class", "live") == 0 {
			t.Errorf("%s: under load, queue_length: seed %g live %g; want both > 0", name, s.sum("queue_length", "class", "seed"), s.sum("queue_length", "class", "live"))
		}
		if ts := s.sum("queue_oldest_timestamp_seconds", "class", "seed"); ts < float64(time.Now().Add(-time.Minute).Unix()) || ts > float64(time.Now().Unix()+1) {
			t.Errorf("%s: oldest seed job queued at %g, want within the last minute", name, ts)
		}
		if s.sum("renderers_busy") != 2 {
			t.Errorf("%s: renderers_busy: got %g, want 2", name, s.sum("renderers_busy"))
		}
		if s.sum("tasks_active", "kind", "seed", "state", "running") != 1 || len(s.find("task_progress_ratio", "task_id", task.TaskID, "name", "all", "kind", "seed")) != 1 {
			t.Errorf("%s: the running task is not shown", name)
		}
	}

	// Let everything finish: one gate byte per job (the hang and the crash each take one).
	d.release(100)
	for i := 0; i < n; i++ {
		cl.read()
	}
	posts.Wait()
	rig.waitEnded(task.TaskID)
	d.waitFor("a quiet daemon", func(s statusDoc) bool {
		return s.Queue.Length == 0 && s.Renderers.Busy == 0 && s.Renderers.Starting == 0 &&
			s.RendererRestarts[restartExited] == 1 && s.RendererRestarts[restartTimeout] == 1
	})

	// The quiet moment: metrics, status, metrics again, on one kept-alive connection.
	get := func() *scrape {
		code, _, body := httpGet(t, tcp, "/metrics")
		if code != http.StatusOK {
			t.Fatalf("GET /metrics: %d", code)
		}
		promtoolCheck(t, promtool, body)
		return parseScrape(t, string(body))
	}
	m1 := get()
	_, _, sb := httpGet(t, tcp, "/status")
	var doc statusDoc
	if err := json.Unmarshal(sb, &doc); err != nil {
		t.Fatalf("status: %v", err)
	}
	m2 := get()
	if a, b := fmt.Sprint(m1.counters()), fmt.Sprint(m2.counters()); a != b {
		t.Fatalf("counters moved in the quiet moment:\n%s\n%s", a, b)
	}
	checkHistograms(t, m2)

	// Every counter family is compared with the status document; a new counter without a
	// counterpart there fails here.
	checked := map[string]bool{}
	eq := func(what string, got float64, want uint64) {
		t.Helper()
		checked[strings.Fields(what)[0]] = true
		if got != float64(want) {
			t.Errorf("%s: metric %g, status document %d", what, got, want)
		}
	}
	cnt := doc.Counters
	for p := range nProtos {
		for c := range nClasses {
			for _, res := range requestResults {
				pn, cn := protoNames[p], classNames[c]
				eq("requests_total "+pn+" "+cn+" "+res, m2.sum("requests_total", "protocol", pn, "class", cn, "result", res), doc.Requests[pn][cn][res])
			}
		}
	}
	eq("merged_total", m2.sum("merged_total"), cnt["merged"])
	eq("jobs_dropped_total abandoned", m2.sum("jobs_dropped_total", "reason", "abandoned"), cnt["dropped"])
	eq("jobs_dropped_total shutdown", m2.sum("jobs_dropped_total", "reason", "shutdown"), cnt["shutdown_dropped"])
	eq("jobs_dropped_total no_renderer", m2.sum("jobs_dropped_total", "reason", "no_renderer"), cnt["no_renderer_failed"])
	for _, r := range restartReasons {
		eq("renderer_restarts_total "+r, m2.sum("renderer_restarts_total", "reason", r), doc.RendererRestarts[r])
	}
	eq("renderer_start_failures_total", m2.sum("renderer_start_failures_total"), cnt["renderer_failures"])
	eq("renders_total ok", m2.sum("renders_total", "result", "ok"), cnt["rendered"]-cnt["render_skipped"])
	eq("renders_total skipped", m2.sum("renders_total", "result", "skipped"), cnt["render_skipped"])
	eq("renders_total error", m2.sum("renders_total", "result", "error"), cnt["render_errors"])
	eq("renders_total timeout", m2.sum("renders_total", "result", "timeout"), cnt["timed_out"])
	for id, c := range doc.Caches {
		eq("renders_total ok+skipped "+id, m2.sum("renders_total", "cache", id, "result", "ok")+m2.sum("renders_total", "cache", id, "result", "skipped"), c["rendered"])
	}
	eq("connections_accepted_total", m2.sum("connections_accepted_total"), doc.Conns.Accepted)
	eq("connections_refused_total", m2.sum("connections_refused_total"), doc.Conns.Refused)
	eq("invalid_requests_total", m2.sum("invalid_requests_total"), doc.Conns.Invalid)
	if doc.Journal == nil {
		t.Fatal("the test daemon runs with a journal, but the status document has none")
	}
	eq("journal_records_total", m2.sum("journal_records_total"), uint64(doc.Journal.Records))
	eq("journal_syncs_total", m2.sum("journal_syncs_total"), uint64(doc.Journal.Batches))
	eq("journal_recoveries_total", m2.sum("journal_recoveries_total"), uint64(doc.Journal.Recoveries))
	eq("rate_backoffs_total", m2.sum("rate_backoffs_total"), doc.RateLimit.BackoffEvents)
	tt := doc.TaskTotals
	for _, kind := range taskKinds {
		eq("tasks_started_total "+kind, m2.sum("tasks_started_total", "kind", kind), tt.Started[kind])
		for _, st := range taskEndStates {
			eq("tasks_finished_total "+kind+" "+st, m2.sum("tasks_finished_total", "kind", kind, "state", st), tt.Finished[kind][st])
		}
		for _, res := range taskTileResults {
			eq("task_metatiles_total "+kind+" "+res, m2.sum("task_metatiles_total", "kind", kind, "result", res), tt.Tiles[kind][res])
		}
	}
	for f, typ := range m2.types {
		if typ == "counter" && !checked[strings.TrimPrefix(f, metricPrefix)] {
			t.Errorf("counter %s is not compared with the status document", f)
		}
	}
	// Histograms against the counters: every job that started finished (quiet).
	finished := cnt["rendered"] + cnt["render_errors"] + cnt["timed_out"]
	eq("render_duration_seconds_count", m2.sum("render_duration_seconds_count"), finished)
	eq("queue_wait_seconds_count", m2.sum("queue_wait_seconds_count"), finished)
	// Gauges in the quiet moment.
	eq("queue_length", m2.sum("queue_length"), 0)
	eq("queue_oldest_timestamp_seconds", m2.sum("queue_oldest_timestamp_seconds"), 0)
	eq("renderers", m2.sum("renderers"), uint64(doc.Renderers.Total))
	eq("renderers_busy", m2.sum("renderers_busy"), 0)

	// And what the load did, so that the comparisons above compared something.
	wants := []struct {
		what string
		got  float64
		want float64
	}{
		{"native live ok", m2.sum("requests_total", "protocol", "native", "class", "live", "result", "ok"), 5},
		{"native live error", m2.sum("requests_total", "protocol", "native", "class", "live", "result", "error"), 3},
		{"native seed ok", m2.sum("requests_total", "protocol", "native", "class", "seed", "result", "ok"), 11},
		{"native seed queued", m2.sum("requests_total", "protocol", "native", "class", "seed", "result", "queued"), 1},
		{"http live ok", m2.sum("requests_total", "protocol", "http", "class", "live", "result", "ok"), 1},
		{"task jobs ok", m2.sum("requests_total", "protocol", "internal", "class", "seed", "result", "ok"), 30},
		{"task done", m2.sum("tasks_finished_total", "kind", "seed", "state", "done"), 1},
		{"task metatiles done", m2.sum("task_metatiles_total", "kind", "seed", "result", "done"), 30},
		{"merged", m2.sum("merged_total"), 1},
		{"renders ok", m2.sum("renders_total", "result", "ok"), 46},
		{"renders skipped", m2.sum("renders_total", "result", "skipped"), 1},
		{"renders ok at zoom 20", m2.sum("renders_total", "cache", "c", "zoom", "20", "result", "ok"), 30},
		{"renders ok at zoom 4", m2.sum("renders_total", "zoom", "4", "result", "ok"), 10},
		{"render errors", m2.sum("renders_total", "result", "error"), 2},
		{"timeouts", m2.sum("renders_total", "result", "timeout"), 1},
		{"live renders timed", m2.sum("render_duration_seconds_count", "class", "live"), 9},
		{"seed renders timed", m2.sum("render_duration_seconds_count", "class", "seed"), 41},
	}
	for _, w := range wants {
		if w.got != w.want {
			t.Errorf("%s: got %g, want %g", w.what, w.got, w.want)
		}
	}
	if t.Failed() {
		t.Logf("scrape:\n%s", m2.text)
	}
}

// TestMetricsBeforeAnyWork: a fresh daemon's scrape already has every known series at 0.
func TestMetricsBeforeAnyWork(t *testing.T) {
	d := newTestDaemon(t, daemonOpts{renderers: 1, maxSeed: -1})
	_, _, body := httpGet(t, httpClientFor("unix", d.socket), "/metrics")
	s := parseScrape(t, string(body))
	want := map[string]int{
		"requests_total":                 int(nProtos) * nClasses * len(requestResults),
		"renderer_restarts_total":        len(restartReasons),
		"jobs_dropped_total":             3,
		"queue_length":                   nClasses,
		"renderers_busy":                 nClasses,
		"queue_wait_seconds_bucket":      nClasses * (nBuckets + 1),
		"render_duration_seconds_bucket": nClasses * (nBuckets + 1),
		"build_info":                     1,
		"tasks_started_total":            len(taskKinds),
		"tasks_finished_total":           len(taskKinds) * len(taskEndStates),
		"task_metatiles_total":           len(taskKinds) * len(taskTileResults),
		"tasks_active":                   len(taskKinds) * len(taskActiveStates),
	}
	got := map[string]int{}
	for _, ps := range s.samples {
		got[strings.TrimPrefix(ps.name, metricPrefix)]++
		if ps.value != 0 && !strings.Contains("build_info start_time_seconds renderers renderers_configured connections_open connections_accepted_total queue_max journal_bytes", strings.TrimPrefix(ps.name, metricPrefix)) {
			t.Errorf("fresh daemon: %s%v = %g, want 0", ps.name, ps.labels, ps.value)
		}
	}
	for name, n := range want {
		if got[name] != n {
			t.Errorf("%s: %d series, want %d", name, got[name], n)
		}
	}
	checkHistograms(t, s)
}

// TestPromLabelEscaping: label values with a quote, a backslash or a newline are escaped.
func TestPromLabelEscaping(t *testing.T) {
	w := &promWriter{}
	w.sample("x", 1.5, "cache", "a\"b\\c\nd")
	if got, want := string(w.b), `mapproxy_renderd_x{cache="a\"b\\c\nd"} 1.5`+"\n"; got != want {
		t.Errorf("got %q, want %q", got, want)
	}
}

// TestLogFormatJSON: with log_format: json every log line is a JSON object from slog's JSON
// handler; the default stays key=value text.
func TestLogFormatJSON(t *testing.T) {
	for _, format := range []string{"json", "text"} {
		t.Run(format, func(t *testing.T) {
			d := newTestDaemon(t, daemonOpts{renderers: 1, maxSeed: -1, extraYAML: "log_format: " + format + "\n"})
			cl := d.dial()
			cl.send(tileReq("1", cacheID, 1, 2, 3, 100))
			cl.read()
			d.stop()
			lines := strings.Split(strings.TrimSpace(d.stderr.String()), "\n")
			if len(lines) < 3 {
				t.Fatalf("log: %q", lines)
			}
			for _, l := range lines {
				var obj map[string]any
				isJSON := json.Unmarshal([]byte(l), &obj) == nil
				if isJSON != (format == "json") {
					t.Errorf("log_format %s: line %q (JSON: %v)", format, l, isJSON)
				}
				if format == "json" && (obj["msg"] == nil || obj["level"] == nil || obj["time"] == nil) {
					t.Errorf("JSON line without time, level or msg: %q", l)
				}
			}
			if want := map[string]string{"json": `"msg":"ready"`, "text": "msg=ready"}[format]; !strings.Contains(d.stderr.String(), want) {
				t.Errorf("log lacks %s:\n%s", want, d.stderr.String())
			}
		})
	}
}

// TestTaskTotalsSurviveForgetting: the task counters keep counting the tasks the manager
// forgets (it lists only the last keptFinishedTasks finished ones), so they never go down.
func TestTaskTotalsSurviveForgetting(t *testing.T) {
	m := &taskManager{tasks: map[string]*task{}}
	add := func(i int, kind, state string, done uint64) {
		tk := &task{id: fmt.Sprint("t", i), doc: taskDoc{TaskID: fmt.Sprint("t", i), Kind: kind, State: state, Done: done, Deleted: done}}
		m.mu.Lock()
		m.tasks[tk.id] = tk
		m.order = append(m.order, tk)
		m.forgetOld()
		m.mu.Unlock()
	}
	var prev taskCounts
	n := keptFinishedTasks + 50
	for i := 0; i < n; i++ {
		add(i, "seed", taskStateDone, 10)
		v := m.view()
		if v.totals.started[0] != prev.started[0]+1 || v.totals.tiles[0][0] != prev.tiles[0][0]+10 {
			t.Fatalf("after task %d: started %d, done %d; before %d, %d", i, v.totals.started[0], v.totals.tiles[0][0], prev.started[0], prev.tiles[0][0])
		}
		prev = v.totals
	}
	add(n, "cleanup", taskStateRunning, 7)
	v := m.view()
	if len(m.order) != keptFinishedTasks+1 {
		t.Fatalf("manager lists %d tasks, want %d (the rest forgotten)", len(m.order), keptFinishedTasks+1)
	}
	want := taskTotalsDoc{
		Started:  map[string]uint64{"seed": uint64(n), "cleanup": 1, "expire": 0},
		Finished: map[string]map[string]uint64{"seed": {"done": uint64(n), "failed": 0, "cancelled": 0}, "cleanup": {"done": 0, "failed": 0, "cancelled": 0}, "expire": {"done": 0, "failed": 0, "cancelled": 0}},
	}
	got := v.totals.doc()
	if fmt.Sprint(got.Started) != fmt.Sprint(want.Started) || fmt.Sprint(got.Finished) != fmt.Sprint(want.Finished) ||
		got.Tiles["seed"]["done"] != uint64(10*n) || got.Tiles["cleanup"]["deleted"] != 7 {
		t.Errorf("totals: got %+v", got)
	}
	if len(v.active) != 1 || v.active[0].Kind != "cleanup" {
		t.Errorf("active: got %+v, want the running cleanup", v.active)
	}
	var nilManager *taskManager
	if v := nilManager.view(); v.totals.started != [3]uint64{} || v.active != nil {
		t.Errorf("nil manager: %+v", v)
	}
}
