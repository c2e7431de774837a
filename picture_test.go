// SPDX-License-Identifier: Apache-2.0

package main

import (
	"encoding/xml"
	"regexp"
	"strings"
	"testing"
	"time"
)

// wellFormed fails the test when svg is not well-formed XML.
func wellFormed(t *testing.T, svg string) {
	t.Helper()
	d := xml.NewDecoder(strings.NewReader(svg))
	for {
		_, err := d.Token()
		if err != nil {
			if err.Error() != "EOF" {
				t.Fatalf("not well-formed XML: %v\n%s", err, svg)
			}
			return
		}
	}
}

var rectRE = regexp.MustCompile(`<rect class="(\w+)" x="([\d.]+)" y="([\d.]+)" width="([\d.]+)"`)

// TestTaskPictureSVG: a task's metatiles at its zoom, placed on the metatile grid (4×4
// metatiles: origins 4 apart), coloured by state; a metatile of another zoom starts a new
// picture only when planned.
func TestTaskPictureSVG(t *testing.T) {
	var p taskPicture
	for _, tc := range []tileCoord{{8, 4, 5}, {12, 4, 5}, {16, 4, 5}, {8, 8, 5}, {16, 12, 5}} {
		p.mark(tc, metaPlanned)
	}
	p.mark(tileCoord{8, 4, 5}, metaDone)
	p.mark(tileCoord{12, 4, 5}, metaDone)
	p.mark(tileCoord{8, 8, 5}, metaFailed)
	p.mark(tileCoord{0, 0, 4}, metaDone) // a late answer from the level before: ignored
	snap, ok := p.snapshot()
	if !ok || snap.Zoom != 5 || len(snap.Cells) != 5 {
		t.Fatalf("snapshot: got %+v, %v", snap, ok)
	}
	svg := string(snap.svg("t1"))
	wellFormed(t, svg)
	// 3 columns × 3 rows of 80 px (240 / 3); squares of 79 px.
	var got []string
	for _, m := range rectRE.FindAllStringSubmatch(svg, -1) {
		got = append(got, m[1]+"@"+m[2]+","+m[3]+"/"+m[4])
	}
	want := []string{"done@0,0/79", "done@80,0/79", "planned@160,0/79", "failed@0,80/79", "planned@160,160/79"}
	if strings.Join(got, " ") != strings.Join(want, " ") {
		t.Errorf("rects: got %v, want %v", got, want)
	}
	if !strings.Contains(svg, `aria-label="metatiles at zoom 5: 2 done, 2 planned, 1 failed"`) || !strings.Contains(svg, `width="240" height="240"`) {
		t.Errorf("label or size wrong: %s", svg)
	}
	p.mark(tileCoord{32, 16, 6}, metaPlanned) // the task moved on
	if snap, _ := p.snapshot(); snap.Zoom != 6 || len(snap.Cells) != 1 {
		t.Errorf("after the next level started: got %+v", snap)
	}
}

// TestHeatMapSVG: the views and live renders of one cache at its busiest zoom; older than
// the window and other caches' are left out.
func TestHeatMapSVG(t *testing.T) {
	s := newScheduler(Config{SeedPriorityBelow: 50, MaxQueued: 10, Renderers: 1}, nil, rendererConfig{})
	c := s.newCache("osm_EPSG3857")
	c.metaX, c.metaY = 4, 4
	o := s.newCache("other_EPSG3857")
	now := s.now()
	vt := newViewTable()
	s.views.tables[c.idx] = vt
	for range 4 {
		vt.add(tileCoord{10, 20, 7}, now)
	}
	vt.add(tileCoord{11, 21, 7}, now)
	vt.add(tileCoord{3, 3, 6}, now)                       // another zoom, less busy
	vt.add(tileCoord{99, 99, 7}, now-int64(heatWindow)-1) // too old
	s.views.renders = []liveRender{{jobKey{cache: c.idx, x: 8, y: 20, z: 7}, now}, {jobKey{cache: o.idx, x: 0, y: 0, z: 7}, now - int64(time.Second)}}
	h := s.heatOf("")
	if h.Cache != "osm_EPSG3857" || h.Zoom != 7 || len(h.Views) != 2 || h.Renders[[2]int32{8, 20}] != 1 || len(h.Renders) != 1 {
		t.Fatalf("heat map: got %+v", h)
	}
	if strings.Join(h.Caches, ",") != "osm_EPSG3857,other_EPSG3857" {
		t.Errorf("caches: got %v", h.Caches)
	}
	svg := string(h.svg())
	wellFormed(t, svg)
	// Box: tiles x 8..12, y 20..24 (the render's metatile): 4×4 cells of 120 px.
	var got []string
	for _, m := range rectRE.FindAllStringSubmatch(svg, -1) {
		got = append(got, m[1]+"@"+m[2]+","+m[3]+"/"+m[4])
	}
	want := []string{"view@240,0/120", "view@360,120/120", "render@0,0/480"}
	if strings.Join(got, " ") != strings.Join(want, " ") {
		t.Errorf("rects: got %v, want %v", got, want)
	}
	if !strings.Contains(svg, `fill-opacity="1.00"`) {
		t.Errorf("the most viewed tile is not the darkest: %s", svg)
	}
	if h := s.heatOf("other_EPSG3857"); h.Cache != "other_EPSG3857" || len(h.Renders) != 1 || len(h.Views) != 0 {
		t.Errorf("chosen cache: got %+v", h)
	}
}
