// SPDX-License-Identifier: Apache-2.0

package main

import (
	"fmt"
	"html/template"
	"math"
	"slices"
	"sort"
	"strings"
	"sync"
)

// A picture of the work on the status page (docs/design.md §14), drawn on the server as SVG with the
// standard library, no JavaScript:
//   - per running task, a map of its metatiles at the zoom it is on: done, planned (taken
//     from its source, not finished yet) and failed;
//   - for one cache (?cache=NAME, default the busiest), a heat map of the views (views.go)
//     and the live renders of the last 15 minutes, at the zoom with the most of them.

// Task pictures.

// maxPictureCells bounds a task's picture: metatiles beyond it at one zoom are counted, not drawn.
const maxPictureCells = 4096

type metaState uint8

const (
	metaPlanned metaState = iota + 1
	metaDone
	metaFailed
)

// taskPicture records a task's metatiles at its current zoom. The task's run goroutine
// writes it; the status page reads a copy.
type taskPicture struct {
	mu       sync.Mutex
	zoom     int32
	cells    map[[2]int32]metaState
	overflow int // metatiles not drawn (beyond maxPictureCells)
}

// mark sets a metatile's state. A metatile at another zoom than the picture's starts a new
// picture when it is planned (the task moved on), and is ignored otherwise.
func (p *taskPicture) mark(t tileCoord, st metaState) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.cells == nil || t.Z != p.zoom {
		if st != metaPlanned {
			return
		}
		p.zoom, p.cells, p.overflow = t.Z, map[[2]int32]metaState{}, 0
	}
	k := [2]int32{t.X, t.Y}
	if _, ok := p.cells[k]; !ok && len(p.cells) >= maxPictureCells {
		p.overflow++
		return
	}
	p.cells[k] = st
}

// taskPictureSnap is a copy of a task's picture.
type taskPictureSnap struct {
	Zoom     int32
	Cells    map[[2]int32]metaState
	Overflow int
}

func (p *taskPicture) snapshot() (taskPictureSnap, bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if len(p.cells) == 0 {
		return taskPictureSnap{}, false
	}
	cells := make(map[[2]int32]metaState, len(p.cells))
	for k, v := range p.cells {
		cells[k] = v
	}
	return taskPictureSnap{Zoom: p.zoom, Cells: cells, Overflow: p.overflow}, true
}

// pictures returns the pictures of the tasks that are running, by task id.
func (m *taskManager) pictures() map[string]taskPictureSnap {
	if m == nil {
		return nil
	}
	m.mu.Lock()
	ts := slices.Clone(m.order)
	m.mu.Unlock()
	out := map[string]taskPictureSnap{}
	for _, t := range ts {
		if t.isFinished() {
			continue
		}
		if snap, ok := t.pic.snapshot(); ok {
			out[t.id] = snap
		}
	}
	return out
}

const pictureSize = 240 // px, the longer side of a map

// gridStep is the spacing of values: the gcd of their distances from the smallest (a task's
// metatiles sit on the metatile grid), 1 when they are all equal.
func gridStep(vs []int32, lo int32) int32 {
	g := int32(0)
	for _, v := range vs {
		d := v - lo
		for d != 0 {
			g, d = d, g%d
		}
	}
	return max(g, 1)
}

// svg draws the picture: one square per metatile in its place on the level, bounding box of
// the task's metatiles at this zoom. Colours: done green, planned grey, failed red.
func (s taskPictureSnap) svg(id string) template.HTML {
	xs := make([]int32, 0, len(s.Cells))
	ys := make([]int32, 0, len(s.Cells))
	counts := map[metaState]int{}
	for k, st := range s.Cells {
		xs, ys = append(xs, k[0]), append(ys, k[1])
		counts[st]++
	}
	minX, maxX := slices.Min(xs), slices.Max(xs)
	minY, maxY := slices.Min(ys), slices.Max(ys)
	sx, sy := gridStep(xs, minX), gridStep(ys, minY)
	cols, rows := int((maxX-minX)/sx)+1, int((maxY-minY)/sy)+1
	cell := max(math.Floor(float64(pictureSize)/float64(max(cols, rows))), 1)
	w, h := int(cell)*cols, int(cell)*rows
	keys := make([][2]int32, 0, len(s.Cells))
	for k := range s.Cells {
		keys = append(keys, k)
	}
	slices.SortFunc(keys, func(a, b [2]int32) int {
		if a[1] != b[1] {
			return int(a[1] - b[1])
		}
		return int(a[0] - b[0])
	})
	var b strings.Builder
	fmt.Fprintf(&b, `<svg class="taskmap" id="taskmap-%s" width="%d" height="%d" viewBox="0 0 %d %d" role="img" aria-label="metatiles at zoom %d: %d done, %d planned, %d failed">`,
		template.HTMLEscapeString(id), w, h, w, h, s.Zoom, counts[metaDone], counts[metaPlanned], counts[metaFailed])
	fmt.Fprintf(&b, `<rect width="%d" height="%d" fill="#f4f4f4"/>`, w, h)
	inner := max(cell-1, 1)
	for _, k := range keys {
		x := float64((k[0]-minX)/sx) * cell
		y := float64((k[1]-minY)/sy) * cell
		fmt.Fprintf(&b, `<rect class="%s" x="%g" y="%g" width="%g" height="%g"><title>%d/%d/%d %s</title></rect>`,
			s.Cells[k].String(), x, y, inner, inner, s.Zoom, k[0], k[1], s.Cells[k].String())
	}
	b.WriteString(`</svg>`)
	return template.HTML(b.String())
}

func (st metaState) String() string {
	switch st {
	case metaDone:
		return "done"
	case metaFailed:
		return "failed"
	}
	return "planned"
}

// Heat map.

// heatMap is a cache's views and live renders of the last heatWindow at one zoom, in tiles.
type heatMap struct {
	Caches  []string // caches with views or live renders in the window, by name
	Cache   string
	Zoom    int32
	Views   map[[2]int32]float64 // tile → views (decayed count)
	Renders map[[2]int32]int     // tile → live renders (metatile origins)
	MetaX   int32
	MetaY   int32
}

// heat asks the scheduler for a heat map ("" = the cache with the most views and live
// renders); false when it has stopped.
func (s *scheduler) heat(cache string) (heatMap, bool) {
	return ask(s, func(s *scheduler) heatMap { return s.heatOf(cache) })
}

// heatOf builds the heat map of a cache on the scheduler goroutine. It reads at most
// viewsPerCache views and recentRenders renders.
func (s *scheduler) heatOf(cache string) heatMap {
	vs := s.views
	now := s.now()
	from := now - int64(heatWindow)
	activity := map[int32]float64{} // cache idx → views + renders in the window
	for idx, vt := range vs.tables {
		for i := range vt.e {
			if vt.e[i].at >= from {
				activity[idx] += vt.e[i].weight(now)
			}
		}
	}
	for _, r := range vs.renders {
		if r.at >= from {
			activity[r.key.cacheIdx()]++
		}
	}
	h := heatMap{Views: map[[2]int32]float64{}, Renders: map[[2]int32]int{}}
	best, bestIdx := -1.0, int32(-1)
	for idx, a := range activity {
		id := s.cacheList[idx].id
		h.Caches = append(h.Caches, id)
		if (cache == "" && (a > best || (a == best && id < h.Cache))) || id == cache {
			if id == cache {
				best = math.Inf(1)
			} else {
				best = a
			}
			bestIdx, h.Cache = idx, id
		}
	}
	sort.Strings(h.Caches)
	if bestIdx < 0 {
		if c, ok := s.caches[cache]; ok {
			h.Cache = c.id
		}
		return h
	}
	c := s.cacheList[bestIdx]
	h.MetaX, h.MetaY = max(c.metaX, 1), max(c.metaY, 1)
	byZoom := map[int32]float64{}
	vt := vs.tables[bestIdx]
	if vt != nil {
		for i := range vt.e {
			if vt.e[i].at >= from {
				byZoom[vt.e[i].t.Z] += vt.e[i].weight(now)
			}
		}
	}
	for _, r := range vs.renders {
		if r.at >= from && r.key.cacheIdx() == bestIdx {
			byZoom[r.key.z]++
		}
	}
	h.Zoom = -1
	for z, a := range byZoom {
		if h.Zoom < 0 || a > byZoom[h.Zoom] || (a == byZoom[h.Zoom] && z > h.Zoom) {
			h.Zoom = z
		}
	}
	if vt != nil {
		for i := range vt.e {
			e := &vt.e[i]
			if e.at >= from && e.t.Z == h.Zoom {
				h.Views[[2]int32{e.t.X, e.t.Y}] += e.weight(now)
			}
		}
	}
	for _, r := range vs.renders {
		if r.at >= from && r.key.cacheIdx() == bestIdx && r.key.z == h.Zoom {
			h.Renders[[2]int32{r.key.x, r.key.y}]++
		}
	}
	return h
}

// heatCells is the largest number of cells per side; a wider area is binned.
const heatCells = 64

// svg draws the heat map: views as blue tiles, live renders as red outlines of their
// metatiles, over the bounding box of both, binned to at most heatCells per side.
func (h heatMap) svg() template.HTML {
	if len(h.Views) == 0 && len(h.Renders) == 0 {
		return ""
	}
	first := true
	var minX, minY, maxX, maxY int32
	grow := func(x0, y0, x1, y1 int32) { // tiles [x0, x1) × [y0, y1)
		if first {
			minX, minY, maxX, maxY, first = x0, y0, x1, y1, false
			return
		}
		minX, minY, maxX, maxY = min(minX, x0), min(minY, y0), max(maxX, x1), max(maxY, y1)
	}
	for k := range h.Views {
		grow(k[0], k[1], k[0]+1, k[1]+1)
	}
	for k := range h.Renders {
		grow(k[0], k[1], k[0]+h.MetaX, k[1]+h.MetaY)
	}
	span := max(maxX-minX, maxY-minY)
	bin := max((span+heatCells-1)/heatCells, 1) // tiles per cell
	cols, rows := (maxX-minX+bin-1)/bin, (maxY-minY+bin-1)/bin
	cell := max(math.Floor(float64(pictureSize*2)/float64(max(cols, rows))), 2)
	w, hgt := int(cell)*int(cols), int(cell)*int(rows)
	views := map[[2]int32]float64{}
	top := 0.0
	for k, v := range h.Views {
		c := [2]int32{(k[0] - minX) / bin, (k[1] - minY) / bin}
		views[c] += v
		top = max(top, views[c])
	}
	var b strings.Builder
	fmt.Fprintf(&b, `<svg id="heatmap" width="%d" height="%d" viewBox="0 0 %d %d" role="img" aria-label="%s zoom %d: %d tiles viewed, %d live renders in the last 15 minutes">`,
		w, hgt, w, hgt, template.HTMLEscapeString(h.Cache), h.Zoom, len(h.Views), sumInts(h.Renders))
	fmt.Fprintf(&b, `<rect width="%d" height="%d" fill="#f4f4f4"/>`, w, hgt)
	for _, k := range cellKeys(views) {
		op := 0.15 + 0.85*math.Sqrt(views[k]/top)
		fmt.Fprintf(&b, `<rect class="view" x="%g" y="%g" width="%g" height="%g" fill-opacity="%.2f"><title>%.1f views (decayed count)</title></rect>`,
			float64(k[0])*cell, float64(k[1])*cell, cell, cell, op, views[k])
	}
	for _, k := range cellKeys(h.Renders) {
		x := float64(k[0]-minX) / float64(bin) * cell
		y := float64(k[1]-minY) / float64(bin) * cell
		fmt.Fprintf(&b, `<rect class="render" x="%g" y="%g" width="%g" height="%g"><title>%d/%d/%d: %d live renders</title></rect>`,
			x, y, float64(h.MetaX)/float64(bin)*cell, float64(h.MetaY)/float64(bin)*cell, h.Zoom, k[0], k[1], h.Renders[k])
	}
	b.WriteString(`</svg>`)
	return template.HTML(b.String())
}

func sumInts(m map[[2]int32]int) int {
	n := 0
	for _, v := range m {
		n += v
	}
	return n
}

func cellKeys[V any](m map[[2]int32]V) [][2]int32 {
	keys := make([][2]int32, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.SortFunc(keys, func(a, b [2]int32) int {
		if a[1] != b[1] {
			return int(a[1] - b[1])
		}
		return int(a[0] - b[0])
	})
	return keys
}

// pagePicture is what page.html shows of the work: the task maps and the heat map.
type pagePicture struct {
	TaskMaps map[string]template.HTML // by task id
	Heat     heatMap
	HeatSVG  template.HTML
	Window   string
}

// picture gathers the page's pictures; cache picks the heat map's cache ("" = the busiest).
func (s *server) picture(cache string) pagePicture {
	pp := pagePicture{TaskMaps: map[string]template.HTML{}, Window: heatWindow.String()}
	for id, snap := range s.tasks.pictures() {
		pp.TaskMaps[id] = snap.svg(id)
	}
	if h, ok := s.sched.heat(cache); ok {
		pp.Heat, pp.HeatSVG = h, h.svg()
	}
	return pp
}
