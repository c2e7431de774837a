// SPDX-License-Identifier: Apache-2.0

package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"slices"
	"strings"
	"testing"
	"unicode/utf8"
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
	f.Add(`{"command":"tile","id":null,"cache_identifier":"c","tiles":[[0,0,0],[1,2,3]],"priority":0,"background":false}`)
	f.Add(`{"command":"tile","cache_identifier":"c","tiles":[[1,2,3]],"priority":01}`)
	f.Add(`{"command":"tile","cache_identifier":"c","tiles":[[1,2,3]],"command":"ping"}`)
	f.Fuzz(func(t *testing.T, line string) {
		// Where the fast path answers, it must agree with encoding/json.
		if fast, ok := fastParse([]byte(line)); ok {
			slow, err := slowParse([]byte(line))
			if err != nil || !sameRequest(fast, slow) {
				t.Fatalf("fast path %s, slow path %s (%v)", describe(fast), describe(slow), err)
			}
		}
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
	b.ResetTimer()
	b.ReportMetric(closedLoop(b, d.socket, b.N), "req/s")
}

func sameRequest(a, b Request) bool {
	return a.Command == b.Command && (a.ID == nil) == (b.ID == nil) && (a.ID == nil || *a.ID == *b.ID) &&
		a.CacheIdentifier == b.CacheIdentifier && slices.Equal(a.Tiles, b.Tiles) &&
		a.Priority == b.Priority && a.Background == b.Background
}

func describe(r Request) string {
	id := "<nil>"
	if r.ID != nil {
		id = *r.ID
	}
	return fmt.Sprintf("%s id=%q cache=%q tiles=%v prio=%d bg=%v", r.Command, id, r.CacheIdentifier, r.Tiles, r.Priority, r.Background)
}

// FuzzAppendReply: the hand-written encoder writes what encoding/json writes.
func FuzzAppendReply(f *testing.F) {
	f.Add("id-1", "ok", "", int64(12), int64(48311), true, true)
	f.Add("", "error", "unknown cache \"x\" <&> \u00e9\n", int64(0), int64(0), false, false)
	f.Fuzz(func(t *testing.T, id, status, msg string, q, r int64, hasID, merged bool) {
		if !utf8.ValidString(id) || !utf8.ValidString(status) || !utf8.ValidString(msg) {
			return
		}
		qm, rm := durationMS(q*1000), durationMS(r*1000)
		rep := Reply{Status: status, ErrorMessage: msg, QueuedMS: &qm, RenderMS: &rm, Merged: merged}
		if hasID {
			rep.ID = &id
		}
		want, _ := json.Marshal(rep)
		if got := appendReply(nil, rep); string(got) != string(want)+"\n" {
			t.Fatalf("got  %s\nwant %s", got, want)
		}
	})
}

func TestJobLineIsValidJSON(t *testing.T) {
	line := appendJobLine(nil, "17", renderJob{cache: `a"b\c`, tile: tileCoord{1, 2, 3}, seed: true, refresh: true})
	var j struct {
		ID              string     `json:"id"`
		Command         string     `json:"command"`
		CacheIdentifier string     `json:"cache_identifier"`
		Tiles           [][3]int32 `json:"tiles"`
		Refresh, Seed   bool
	}
	if err := json.Unmarshal(line, &j); err != nil || j.ID != "17" || j.Command != "tile" || j.CacheIdentifier != `a"b\c` ||
		len(j.Tiles) != 1 || j.Tiles[0] != [3]int32{1, 2, 3} || !j.Refresh || !j.Seed {
		t.Fatalf("job line %s: %+v %v", line, j, err)
	}
	// A task's job: not forced, with its refresh_before.
	line = appendJobLine(nil, "18", renderJob{cache: "c", tile: tileCoord{1, 2, 3}, refreshBefore: 1700000000.25})
	var k struct {
		Refresh       *bool   `json:"refresh"`
		RefreshBefore float64 `json:"refresh_before"`
	}
	if err := json.Unmarshal(line, &k); err != nil || k.Refresh == nil || *k.Refresh || k.RefreshBefore != 1700000000.25 {
		t.Fatalf("job line %s: %+v %v", line, k, err)
	}
	// 0 is a refresh_before (MapProxy's "everything" for caches without timestamps); a
	// negative one is none.
	if line := appendJobLine(nil, "19", renderJob{cache: "c", refreshBefore: 0}); !bytes.Contains(line, []byte(`"refresh_before":0`)) {
		t.Errorf("job line %s lacks refresh_before 0", line)
	}
	if line := appendJobLine(nil, "20", renderJob{cache: "c", refreshBefore: -1}); bytes.Contains(line, []byte(`refresh_before`)) {
		t.Errorf("job line %s has a refresh_before", line)
	}
}

func TestParseExpireRequest(t *testing.T) {
	req, err := parseRequest([]byte(`{"command":"expire","id":"e","cache_identifier":"c_G","lines":"1/0/0\n","tiles":[[1,1,1]],"min_zoom":1,"max_zoom":3,"delete_from":2,"priority":5}`))
	if err != nil {
		t.Fatal(err)
	}
	if string(req.Lines) != "1/0/0\n" || len(req.Tiles) != 1 || req.Range != (expireRange{1, 3, 2, false}) || req.Priority != 5 || !req.PrioritySet {
		t.Errorf("parsed %+v", req)
	}
	req, err = parseRequest([]byte(`{"command":"expire","cache_identifier":"c_G","lines":"1/0/0"}`))
	if err != nil || req.Range != (expireRange{0, -1, -1, false}) {
		t.Errorf("defaults: %+v, %v; want min 0, max and delete_from unset", req.Range, err)
	}
	for line, want := range map[string]string{
		`{"command":"expire","cache_identifier":"c_G"}`:                              "lines",
		`{"command":"expire","lines":"1/0/0"}`:                                       "cache_identifier",
		`{"command":"expire","cache_identifier":"c_G","lines":5}`:                    "lines must be a string",
		`{"command":"expire","cache_identifier":"c_G","lines":"","max_zoom":40}`:     "max_zoom",
		`{"command":"expire","cache_identifier":"c_G","lines":"","min_zoom":-1}`:     "min_zoom",
		`{"command":"expire","cache_identifier":"c_G","lines":"","delete_from":"x"}`: "delete_from",
	} {
		if _, err := parseRequest([]byte(line)); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%s: %v, want an error about %s", line, err, want)
		}
	}
}
