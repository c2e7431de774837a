// SPDX-License-Identifier: Apache-2.0

package main

import (
	"bytes"
	_ "embed"
	"fmt"
	"html/template"
	"math"
	"net/http"
	"sort"
	"strconv"
	"strings"
	"time"
)

// This file is the status page, GET / (docs/design.md §14): the status document and the scheduler's
// last 15 minutes as HTML, rendered on the server with html/template. It has no JavaScript:
// a meta refresh reloads it every few seconds.

//go:embed page.html
var pageHTML string

var pageTemplate = template.Must(template.New("page").Funcs(template.FuncMap{
	"ms":      fmtMS,
	"seconds": fmtSeconds,
	"pct":     func(f float64) string { return strconv.FormatFloat(100*f, 'f', 1, 64) },
	"num":     fmtNum,
	"tile": func(t *[3]int32) string {
		if t == nil {
			return ""
		}
		return fmt.Sprintf("%d/%d/%d", t[2], t[0], t[1])
	},
}).Parse(pageHTML))

// history returns the scheduler's one-second samples, oldest first, or false when it has
// stopped.
func (s *scheduler) history() ([]historySample, bool) {
	return ask(s, func(s *scheduler) []historySample { return s.m.history.samples() })
}

// pageData is what the template shows.
type pageData struct {
	Doc          statusDoc
	Now          string
	Refresh      int
	Busy         int
	Priorities   []priorityCount
	RenderSpark  sparkline
	QueueSpark   sparkline
	HasRenderMS  bool
	UptimeText   string
	RequestTotal uint64
	Tasks        []pageTask
	Picture      pagePicture // picture.go
}

// pageTask is a task with its progress bar.
type pageTask struct {
	taskDoc
	Percent   float64 // 0–100, taskFraction
	ETA       string
	Completed uint64 // done + skipped + failed
}

type priorityCount struct {
	Priority int
	Class    string
	Count    int
}

// sparkline is an SVG polyline of a series scaled into a fixed box.
type sparkline struct {
	Points string // the polyline's points attribute
	Max    float64
	Last   float64
	Width  int
	Height int
	Span   string // how much time it covers
}

const sparkWidth, sparkHeight = 600, 60

// newSparkline scales values (one per second, oldest first) into the box.
func newSparkline(values []float64) sparkline {
	sp := sparkline{Width: sparkWidth, Height: sparkHeight, Span: (time.Duration(len(values)) * time.Second).String()}
	if len(values) == 0 {
		return sp
	}
	for _, v := range values {
		sp.Max = math.Max(sp.Max, v)
	}
	sp.Last = values[len(values)-1]
	scale := 1.0
	if sp.Max > 0 {
		scale = float64(sparkHeight-2) / sp.Max
	}
	var b strings.Builder
	step := float64(sparkWidth) / float64(max(historyLen-1, 1))
	x0 := float64(sparkWidth) - step*float64(len(values)-1) // right-aligned: the newest at the right edge
	for i, v := range values {
		if i > 0 {
			b.WriteByte(' ')
		}
		fmt.Fprintf(&b, "%.1f,%.1f", x0+step*float64(i), float64(sparkHeight-1)-v*scale)
	}
	sp.Points = b.String()
	return sp
}

// newPageData assembles the page from a status document and the history.
func newPageData(doc statusDoc, hist []historySample, now time.Time) pageData {
	pd := pageData{Doc: doc, Now: now.UTC().Format(time.RFC3339), Refresh: 5, Busy: doc.Renderers.Busy,
		HasRenderMS: len(doc.RenderMS) > 0, UptimeText: fmtSeconds(doc.UptimeS)}
	seedBelow := 50
	if v, ok := doc.Config["seed_priority_below"].(int); ok {
		seedBelow = v
	}
	for p, n := range doc.Queue.ByPriority {
		pr, _ := strconv.Atoi(p)
		class := "live"
		if pr < seedBelow {
			class = "seed"
		}
		pd.Priorities = append(pd.Priorities, priorityCount{Priority: pr, Class: class, Count: n})
	}
	sort.Slice(pd.Priorities, func(i, j int) bool { return pd.Priorities[i].Priority > pd.Priorities[j].Priority })
	for _, byClass := range doc.Requests {
		for _, byResult := range byClass {
			for _, n := range byResult {
				pd.RequestTotal += n
			}
		}
	}
	if len(hist) > 0 {
		rates := make([]float64, 0, len(hist))
		queued := make([]float64, 0, len(hist))
		for i, h := range hist {
			if i > 0 {
				dt := float64(h.unix - hist[i-1].unix)
				r := 0.0
				if dt > 0 {
					r = float64(h.finished-hist[i-1].finished) / dt
				}
				rates = append(rates, r)
			}
			queued = append(queued, float64(h.queued))
		}
		pd.RenderSpark = newSparkline(rates)
		pd.QueueSpark = newSparkline(queued)
	}
	for _, t := range doc.Tasks {
		pd.Tasks = append(pd.Tasks, pageTask{taskDoc: t, Percent: 100 * taskFraction(t), ETA: etaText(t),
			Completed: t.Done + t.Skipped + t.Failed})
	}
	return pd
}

// servePage is GET /: the status page.
func (s *server) servePage(w http.ResponseWriter, r *http.Request) {
	doc, ok := s.statusDoc()
	hist, ok2 := s.sched.history()
	if !ok || !ok2 {
		http.Error(w, "mapproxy-renderd is shutting down", http.StatusServiceUnavailable)
		return
	}
	pd := newPageData(doc, hist, time.Now())
	pd.Picture = s.picture(r.URL.Query().Get("cache"))
	var buf bytes.Buffer
	if err := pageTemplate.Execute(&buf, pd); err != nil {
		s.log.Error("status page", "error", err)
		http.Error(w, "status page: "+err.Error(), http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	w.Header().Set("Cache-Control", "no-store")
	w.Header().Set("Content-Length", strconv.Itoa(buf.Len()))
	w.WriteHeader(http.StatusOK)
	_, _ = w.Write(buf.Bytes())
}

func fmtMS(ms float64) string {
	switch {
	case ms >= 10000:
		return fmtSeconds(ms / 1000)
	case ms >= 100:
		return strconv.FormatFloat(ms, 'f', 0, 64) + " ms"
	default:
		return strconv.FormatFloat(ms, 'f', 1, 64) + " ms"
	}
}

func fmtSeconds(s float64) string {
	d := time.Duration(s * float64(time.Second))
	switch {
	case d >= time.Hour:
		return d.Truncate(time.Minute).String()
	case d >= time.Minute:
		return d.Truncate(time.Second).String()
	default:
		return strconv.FormatFloat(s, 'f', 1, 64) + "s"
	}
}

// fmtNum writes a number with thin groups of three digits, or one decimal for fractions.
func fmtNum(v any) string {
	var s string
	switch x := v.(type) {
	case int:
		s = strconv.Itoa(x)
	case uint64:
		s = strconv.FormatUint(x, 10)
	case float64:
		if x != math.Trunc(x) || math.Abs(x) < 10 {
			return strconv.FormatFloat(x, 'f', 1, 64)
		}
		s = strconv.FormatFloat(x, 'f', 0, 64)
	default:
		return fmt.Sprint(v)
	}
	neg := strings.HasPrefix(s, "-")
	s = strings.TrimPrefix(s, "-")
	var b strings.Builder
	for i, c := range s {
		if i > 0 && (len(s)-i)%3 == 0 {
			b.WriteByte(',')
		}
		b.WriteRune(c)
	}
	if neg {
		return "-" + b.String()
	}
	return b.String()
}
