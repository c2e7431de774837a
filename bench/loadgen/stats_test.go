// SPDX-License-Identifier: Apache-2.0

package main

import (
	"os"
	"path/filepath"
	"testing"
)

func TestPct(t *testing.T) {
	v := []float64{1, 2, 3, 4, 5, 6, 7, 8, 9, 10}
	for _, tc := range []struct{ p, want float64 }{{50, 5}, {99, 10}, {100, 10}, {1, 1}} {
		if got := pct(v, tc.p); got != tc.want {
			t.Errorf("pct(%v) = %v, want %v", tc.p, got, tc.want)
		}
	}
	if got := pct(nil, 50); got != -1 {
		t.Errorf("pct(nil) = %v, want -1", got)
	}
}

func TestParseReply(t *testing.T) {
	for _, tc := range []struct{ line, id, status string }{
		{`{"id":"12","status":"ok"}`, "12", "ok"},
		{`{"status": "busy", "id": "3", "error_message":"queue full"}`, "3", "busy"},
		{`{"id":"a\"b","status":"ok"}`, `a"b`, "ok"}, // escapes: encoding/json path
		{`{"id":5,"status":"queued"}`, "5", "queued"},
	} {
		id, st, ok := parseReply([]byte(tc.line))
		if !ok || id != tc.id || st != tc.status {
			t.Errorf("parseReply(%s) = %q, %q, %v; want %q, %q", tc.line, id, st, ok, tc.id, tc.status)
		}
	}
}

func TestRenderCounter(t *testing.T) {
	f := filepath.Join(t.TempDir(), "log")
	c := newRenderCounter(f, "BOX3D")
	if got := c.count(); got != 0 {
		t.Fatalf("count of a missing file = %d, want 0", got)
	}
	os.WriteFile(f, []byte("LOG: BOX3D one\nLOG: other\nLOG: BOX"), 0o644)
	if got := c.count(); got != 1 {
		t.Fatalf("count = %d, want 1", got)
	}
	fh, _ := os.OpenFile(f, os.O_APPEND|os.O_WRONLY, 0)
	fh.WriteString("3D two\n")
	fh.Close()
	if got := c.count(); got != 2 {
		t.Fatalf("count after a line was completed = %d, want 2", got)
	}
}

func TestFmtNum(t *testing.T) {
	for _, tc := range []struct {
		v    float64
		want string
	}{{1234567, "1,234,567"}, {512, "512"}, {51.23, "51.2"}, {5.123, "5.12"}, {0.1234, "0.123"}, {40, "40"}} {
		if got := fmtNum(tc.v); got != tc.want {
			t.Errorf("fmtNum(%v) = %q, want %q", tc.v, got, tc.want)
		}
	}
}

func TestTileIsMetatileOrigin(t *testing.T) {
	e := env{z: 18, start: 5}
	x, y := e.tile(0)
	if x%8 != 0 || y%8 != 0 {
		t.Errorf("tile(0) = %d,%d, want multiples of 8", x, y)
	}
	x2, y2 := e.tile(1)
	if x2 == x && y2 == y {
		t.Error("tile(0) and tile(1) are the same metatile")
	}
}
