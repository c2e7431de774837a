// SPDX-License-Identifier: Apache-2.0

package main

import (
	"net/http"
	"runtime"
	"slices"
	"sort"
	"strconv"
	"strings"
	"time"
)

// This file is GET /metrics (docs/design.md §14): the Prometheus text format 0.0.4, written by hand,
// every name prefixed mapproxy_renderd_. The scheduler goroutine owns every figure; a scrape
// asks it for a metricsSnap through its channel (as status does) and formats the copy on the
// caller's goroutine. A snapshot costs O(priorities + caches × zooms): it reads running
// counts and never walks the queue.

// reqProto is how a request reached the daemon (the protocol label).
type reqProto uint8

const (
	protoInternal reqProto = iota // made by the daemon itself (tasks): the zero value
	protoNative                   // NDJSON on the socket or TCP port
	protoHTTP                     // HTTP: MapProxy's renderd client, or POST by hand
	nProtos
)

var protoNames = [nProtos]string{"internal", "native", "http"}

// Request classes: seed is a priority below seed_priority_below (docs/design.md §4), live the rest.
const (
	classLive = 0
	classSeed = 1
	nClasses  = 2
)

var classNames = [nClasses]string{"live", "seed"}

func classOf(seed bool) int {
	if seed {
		return classSeed
	}
	return classLive
}

// requestResults are the final outcomes of a tile request: the reply statuses of docs/design.md §2
// (the status the daemon decided; MapProxy's HTTP client is sent "error" for several of them)
// and "cancelled" for a request whose client left before its answer.
var requestResults = [nResults]string{statusOK, statusError, statusQueued, statusBusy, statusExpired, "pending", statusShuttingDown, "cancelled"}

const nResults = 8

func resultIndex(status string) int {
	if i := slices.Index(requestResults[:], status); i >= 0 {
		return i
	}
	return 1 // an unknown status counts as error
}

// Render results per cache and zoom: skipped is an ok render of a job that was not forced
// (a task's) for which the renderer found every tile fresh.
const (
	renderOK      = 0
	renderSkipped = 1
	renderError   = 2
	renderTimeout = 3
	nRenderResult = 4
)

var renderResultNames = [nRenderResult]string{"ok", "skipped", "error", "timeout"}

// durationBuckets are the histogram buckets in seconds, suited to metatile renders (a few ms
// for a cached no-op, tens of seconds for a big metatile, render_timeout at most).
var durationBuckets = [...]float64{0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300}

const nBuckets = len(durationBuckets)

// histogram counts observations per bucket (not cumulative; the last slot is above every
// bucket) and their sum. Owned by the scheduler goroutine; copied by value into a snapshot.
type histogram struct {
	counts [nBuckets + 1]uint64
	sum    float64
	count  uint64
}

func (h *histogram) observe(seconds float64) {
	h.counts[sort.SearchFloat64s(durationBuckets[:], seconds)]++
	h.sum += seconds
	h.count++
}

// historyLen is how many one-second samples the status page's sparkline shows (15 minutes).
const historyLen = 900

// historySample is the scheduler's state at one tick.
type historySample struct {
	unix     int64  // wall-clock second
	finished uint64 // renders finished so far (any result)
	queued   int32  // queue length
}

// historyRing keeps the last historyLen samples.
type historyRing struct {
	buf  [historyLen]historySample
	n    int
	next int
}

func (h *historyRing) add(s historySample) {
	h.buf[h.next] = s
	h.next = (h.next + 1) % historyLen
	if h.n < historyLen {
		h.n++
	}
}

// samples returns the kept samples, oldest first.
func (h *historyRing) samples() []historySample {
	out := make([]historySample, 0, h.n)
	start := (h.next - h.n + historyLen) % historyLen
	for i := 0; i < h.n; i++ {
		out = append(out, h.buf[(start+i)%historyLen])
	}
	return out
}

// rate returns renders per second over the last secs seconds (fewer if the daemon is younger).
func (h *historyRing) rate(secs int) float64 {
	if h.n < 2 {
		return 0
	}
	last := h.buf[(h.next-1+historyLen)%historyLen]
	back := min(secs, h.n-1)
	first := h.buf[(h.next-1-back+2*historyLen)%historyLen]
	if last.unix <= first.unix {
		return 0
	}
	return float64(last.finished-first.finished) / float64(last.unix-first.unix)
}

// maxLastErrors is how many render errors the status document keeps.
const maxLastErrors = 20

// renderErrorDoc is one failed render in the status document's last_errors.
type renderErrorDoc struct {
	Time            string   `json:"time"`
	CacheIdentifier string   `json:"cache_identifier"`
	Tile            [3]int32 `json:"tile"`
	Message         string   `json:"message"`
}

// metricsState is what the scheduler counts for metrics beyond the status counters.
// Owned by the scheduler goroutine.
type metricsState struct {
	requests   [nProtos][nClasses][nResults]uint64
	queueWait  [nClasses]histogram
	renderTime [nClasses]histogram
	restarts   map[string]uint64
	finished   uint64 // renders finished, any result
	history    historyRing
	lastErrors []renderErrorDoc // newest last, at most maxLastErrors
}

// countRequest records a request's final outcome.
func (s *scheduler) countRequest(p *pendingRequest, status string) {
	s.m.requests[p.proto][classOf(s.qs.rule.isSeed(p.req.Priority))][resultIndex(status)]++
}

// countRender records a finished render of job j that ran on slot.
func (s *scheduler) countRender(slot *rendererSlot, c *cacheInfo, j *job, ev rendererEvent, renderNS int64) {
	s.m.finished++
	s.m.renderTime[classOf(slot.seed)].observe(float64(renderNS) / 1e9)
	res := renderOK
	switch {
	case ev.status == statusOK && ev.skipped:
		res = renderSkipped
	case ev.status == statusOK:
	case ev.timedOut:
		res = renderTimeout
	default:
		res = renderError
	}
	z := int(j.key.z)
	if z >= len(c.renders) {
		c.renders = append(c.renders, make([][nRenderResult]uint64, z+1-len(c.renders))...)
	}
	c.renders[z][res]++
	if res != renderOK {
		if len(s.m.lastErrors) == maxLastErrors {
			s.m.lastErrors = slices.Delete(s.m.lastErrors, 0, 1)
		}
		s.m.lastErrors = append(s.m.lastErrors, renderErrorDoc{
			Time: time.Now().UTC().Format(time.RFC3339), CacheIdentifier: c.id,
			Tile: [3]int32{j.key.x, j.key.y, j.key.z}, Message: truncate(ev.msg, 300),
		})
	}
}

// sample adds the current state to the history ring (each second, from the scheduler's tick).
func (s *scheduler) sample(now time.Time) {
	s.m.history.add(historySample{unix: now.Unix(), finished: s.m.finished, queued: int32(s.qs.queued())})
}

// cacheRenders is one cache's render counts by zoom, copied into a snapshot.
type cacheRenders struct {
	id    string
	zooms [][nRenderResult]uint64 // by zoom; a zoom never rendered has zeros and is not shown
}

// metricsSnap is a copy of every figure a scrape shows, taken on the scheduler goroutine.
type metricsSnap struct {
	started       time.Time
	requests      [nProtos][nClasses][nResults]uint64
	stats         counters
	queueLen      [nClasses]int
	oldestUnix    [nClasses]float64 // 0: none queued
	maxQueued     int
	renderers     int
	busy          [nClasses]int
	starting      int
	failing       int
	queueWait     [nClasses]histogram
	renderTime    [nClasses]histogram
	caches        []cacheRenders
	restarts      map[string]uint64
	conns         connCounters
	stopping      bool
	renderersConf int
	maxSeed       int
	journal       *journalStats // nil: the journal is off
	rate          rateDoc
}

// metricsSnapshot builds a metricsSnap. It runs on the scheduler goroutine.
func (s *scheduler) metricsSnapshot() *metricsSnap {
	var js *journalStats
	if s.journal != nil {
		st := s.journal.stats()
		js = &st
	}
	m := &metricsSnap{
		journal:       js,
		started:       s.epoch,
		requests:      s.m.requests,
		stats:         s.stats,
		maxQueued:     s.qs.max,
		queueWait:     s.m.queueWait,
		renderTime:    s.m.renderTime,
		restarts:      make(map[string]uint64, len(restartReasons)),
		conns:         s.conns(),
		stopping:      s.stopping,
		renderersConf: s.cfg.Renderers,
		maxSeed:       s.cfg.maxSeed,
		rate:          s.rateStatus(),
	}
	for k, v := range s.m.restarts {
		m.restarts[k] = v
	}
	seedBelow := s.qs.rule.seedBelow
	var oldest [nClasses]*job
	m.queueLen[classSeed], oldest[classSeed] = s.qs.queuedIn(minPriority, seedBelow-1)
	m.queueLen[classLive], oldest[classLive] = s.qs.queuedIn(seedBelow, maxPriority)
	for c, j := range oldest {
		if j != nil {
			m.oldestUnix[c] = float64(s.epoch.Add(time.Duration(j.enqueued)).UnixNano()) / 1e9
		}
	}
	rc := s.countRenderers()
	m.renderers, m.failing, m.starting, m.busy = rc.total, rc.failing, rc.starting, rc.busy
	for _, c := range s.cacheList {
		if c.requested == 0 && !c.known && len(c.renders) == 0 {
			continue
		}
		m.caches = append(m.caches, cacheRenders{id: c.id, zooms: slices.Clone(c.renders)})
	}
	return m
}

// metrics returns a snapshot, or false when the scheduler has stopped.
func (s *scheduler) metrics() (*metricsSnap, bool) { return ask(s, (*scheduler).metricsSnapshot) }

// serveMetrics is GET /metrics.
func (s *server) serveMetrics(w http.ResponseWriter, r *http.Request) {
	m, ok := s.sched.metrics()
	if !ok {
		writeJSON(w, http.StatusServiceUnavailable, Reply{Status: statusShuttingDown, ErrorMessage: "daemon is shutting down"})
		return
	}
	b := m.appendText(make([]byte, 0, 16<<10))
	b = appendTaskMetrics(b, s.tasks.view())
	w.Header().Set("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
	w.Header().Set("Content-Length", strconv.Itoa(len(b)))
	w.WriteHeader(http.StatusOK)
	_, _ = w.Write(b)
}

const metricPrefix = "mapproxy_renderd_"

// promWriter appends metric families in the text format.
type promWriter struct{ b []byte }

func (w *promWriter) family(name, typ, help string) {
	w.b = append(w.b, "# HELP "+metricPrefix+name+" "+help+"\n# TYPE "+metricPrefix+name+" "+typ+"\n"...)
}

// sample appends one line; labels alternate name, value.
func (w *promWriter) sample(name string, v float64, labels ...string) {
	w.b = append(w.b, metricPrefix...)
	w.b = append(w.b, name...)
	if len(labels) > 0 {
		w.b = append(w.b, '{')
		for i := 0; i+1 < len(labels); i += 2 {
			if i > 0 {
				w.b = append(w.b, ',')
			}
			w.b = append(w.b, labels[i]...)
			w.b = append(w.b, '=', '"')
			w.b = appendLabelValue(w.b, labels[i+1])
			w.b = append(w.b, '"')
		}
		w.b = append(w.b, '}')
	}
	w.b = append(w.b, ' ')
	w.b = appendFloat(w.b, v)
	w.b = append(w.b, '\n')
}

func (w *promWriter) counter(name string, v uint64, labels ...string) {
	w.sample(name, float64(v), labels...)
}

// histogram appends the _bucket, _sum and _count lines of h.
func (w *promWriter) histogram(name string, h *histogram, labels ...string) {
	cum := uint64(0)
	for i, le := range durationBuckets {
		cum += h.counts[i]
		w.sample(name+"_bucket", float64(cum), append(labels, "le", strconv.FormatFloat(le, 'g', -1, 64))...)
	}
	cum += h.counts[nBuckets]
	w.sample(name+"_bucket", float64(cum), append(labels, "le", "+Inf")...)
	w.sample(name+"_sum", h.sum, labels...)
	w.sample(name+"_count", float64(h.count), labels...)
}

// appendLabelValue escapes backslash, double quote and newline, as the format requires.
func appendLabelValue(b []byte, v string) []byte {
	if !strings.ContainsAny(v, "\\\"\n") {
		return append(b, v...)
	}
	for i := 0; i < len(v); i++ {
		switch v[i] {
		case '\\':
			b = append(b, `\\`...)
		case '"':
			b = append(b, `\"`...)
		case '\n':
			b = append(b, `\n`...)
		default:
			b = append(b, v[i])
		}
	}
	return b
}

func appendFloat(b []byte, v float64) []byte {
	if v == float64(uint64(v)) && v < 1e15 {
		return strconv.AppendUint(b, uint64(v), 10)
	}
	return strconv.AppendFloat(b, v, 'g', -1, 64)
}

// appendText formats the snapshot. Every series that can exist is written, at 0 when
// nothing happened yet, so that rate() and absent() work from the first scrape; render
// counts appear per cache and zoom once that zoom was rendered (every result at once).
func (m *metricsSnap) appendText(b []byte) []byte {
	w := &promWriter{b: b}
	w.family("build_info", "gauge", "Version of the daemon and of Go it was built with; always 1.")
	w.sample("build_info", 1, "version", version, "goversion", runtime.Version())
	w.family("start_time_seconds", "gauge", "When the daemon started, in seconds since the Unix epoch.")
	w.sample("start_time_seconds", float64(m.started.UnixNano())/1e9)
	w.family("stopping", "gauge", "1 while the daemon is shutting down.")
	stopping := 0.0
	if m.stopping {
		stopping = 1
	}
	w.sample("stopping", stopping)

	w.family("requests_total", "counter", "Tile requests finished, by how they came (protocol), their class (priority below seed_priority_below: seed) and their outcome (the reply status, or cancelled when the client left first).")
	for p := range nProtos {
		for c := range nClasses {
			for r, res := range requestResults {
				w.counter("requests_total", m.requests[p][c][r], "protocol", protoNames[p], "class", classNames[c], "result", res)
			}
		}
	}
	w.family("merged_total", "counter", "Tiles of requests that joined a job already queued or running (deduplicated).")
	w.counter("merged_total", m.stats.merged)
	w.family("jobs_dropped_total", "counter", "Queued jobs that were never rendered: abandoned (every waiting client left), shutdown (the daemon stopped), no_renderer (no renderer could be started).")
	w.counter("jobs_dropped_total", m.stats.dropped, "reason", "abandoned")
	w.counter("jobs_dropped_total", m.stats.shutdownDropped, "reason", "shutdown")
	w.counter("jobs_dropped_total", m.stats.noRendererFailed, "reason", "no_renderer")

	w.family("queue_length", "gauge", "Jobs queued (not running), by class.")
	for c := range nClasses {
		w.sample("queue_length", float64(m.queueLen[c]), "class", classNames[c])
	}
	w.family("queue_oldest_timestamp_seconds", "gauge", "When the oldest queued job of the class was queued, in seconds since the Unix epoch; 0 when none is queued.")
	for c := range nClasses {
		w.sample("queue_oldest_timestamp_seconds", m.oldestUnix[c], "class", classNames[c])
	}
	w.family("queue_max", "gauge", "max_queued: the queue's bound.")
	w.sample("queue_max", float64(m.maxQueued))

	w.family("renderers", "gauge", "Renderer processes (starting, idle or busy; retiring ones included).")
	w.sample("renderers", float64(m.renderers))
	w.family("renderers_configured", "gauge", "renderers and max_seed_renderers from the configuration.")
	w.sample("renderers_configured", float64(m.renderersConf), "class", "all")
	w.sample("renderers_configured", float64(m.maxSeed), "class", "seed")
	w.family("renderers_busy", "gauge", "Renderers running a job, by the class of the job.")
	for c := range nClasses {
		w.sample("renderers_busy", float64(m.busy[c]), "class", classNames[c])
	}
	w.family("renderers_starting", "gauge", "Renderers starting or restarting (not ready for jobs).")
	w.sample("renderers_starting", float64(m.starting))
	w.family("renderers_failing", "gauge", "Renderers whose last start failed.")
	w.sample("renderers_failing", float64(m.failing))
	w.family("renderer_restarts_total", "counter", "Renderer processes replaced, by reason: exited, timeout (render_timeout), protocol (garbage or an invalid reply), recycle (recycle_after), shutdown.")
	for _, r := range restartReasons {
		w.counter("renderer_restarts_total", m.restarts[r], "reason", r)
	}
	w.family("renderer_start_failures_total", "counter", "Renderer processes that failed to start or to send their ready line.")
	w.counter("renderer_start_failures_total", m.stats.rendererFailures)

	w.family("queue_wait_seconds", "histogram", "Time a job waited in the queue before a renderer took it, by the class it started in.")
	for c := range nClasses {
		w.histogram("queue_wait_seconds", &m.queueWait[c], "class", classNames[c])
	}
	w.family("render_duration_seconds", "histogram", "Time a renderer took for a job (any result), by class.")
	for c := range nClasses {
		w.histogram("render_duration_seconds", &m.renderTime[c], "class", classNames[c])
	}
	w.family("renders_total", "counter", "Jobs rendered, by cache, zoom level and result (ok, skipped: every tile was fresh, error, timeout).")
	for _, c := range m.caches {
		for z, rs := range c.zooms {
			if rs == ([nRenderResult]uint64{}) {
				continue
			}
			zs := strconv.Itoa(z)
			for r, v := range rs {
				w.counter("renders_total", v, "cache", c.id, "zoom", zs, "result", renderResultNames[r])
			}
		}
	}

	w.family("connections_open", "gauge", "Client connections open.")
	w.sample("connections_open", float64(m.conns.Open))
	w.family("connections_accepted_total", "counter", "Client connections accepted.")
	w.counter("connections_accepted_total", m.conns.Accepted)
	w.family("connections_refused_total", "counter", "Client connections refused (max_connections, allowed_uids/allowed_gids).")
	w.counter("connections_refused_total", m.conns.Refused)
	w.family("invalid_requests_total", "counter", "Requests refused before they reached the queue: malformed, over-long, unknown command or field, unknown cache.")
	w.counter("invalid_requests_total", m.conns.Invalid)
	if j := m.journal; j != nil {
		w.family("journal_bytes", "gauge", "Size of the journal file (state_dir/journal), records not yet synced included.")
		w.sample("journal_bytes", float64(j.Bytes))
		w.family("journal_jobs", "gauge", "Background jobs in the journal not yet done.")
		w.sample("journal_jobs", float64(j.Jobs))
		w.family("journal_tasks", "gauge", "Tasks in the journal not yet ended.")
		w.sample("journal_tasks", float64(j.Tasks))
		w.family("journal_records_total", "counter", "Journal records appended since start.")
		w.counter("journal_records_total", uint64(j.Records))
		w.family("journal_syncs_total", "counter", "Journal batches written and fdatasynced since start (group commit).")
		w.counter("journal_syncs_total", uint64(j.Batches))
		w.family("journal_failed", "gauge", "1 while the journal cannot write (state_dir full or failing): durable work is refused.")
		w.sample("journal_failed", float64(boolInt(j.Failed != "")))
		w.family("journal_recoveries_total", "counter", "Times a failed journal became writable again without a restart.")
		w.counter("journal_recoveries_total", uint64(j.Recoveries))
	}
	appendRateMetrics(w, m.rate)
	return w.b
}
