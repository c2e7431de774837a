// SPDX-License-Identifier: Apache-2.0

package main

import (
	"fmt"
	"io"
	"math/rand"
	"os"
	"slices"
	"strings"
	"testing"
)

func TestParseExpireLine(t *testing.T) {
	good := []struct {
		in   string
		want tileCoord
	}{
		{"0/0/0", tileCoord{0, 0, 0}},
		{"15/17000/11000", tileCoord{17000, 11000, 15}},
		{"  3/7/1\r", tileCoord{7, 1, 3}},
		{"30/1073741823/0", tileCoord{1<<30 - 1, 0, 30}},
	}
	for _, c := range good {
		got, err := parseExpireLine([]byte(c.in))
		if err != nil || got != c.want {
			t.Errorf("parseExpireLine(%q) = %v, %v; want %v", c.in, got, err, c.want)
		}
	}
	bad := []string{"1/2/0", "1/0/2", "31/0/0", "3/1", "3/1/1/1", "a/1/1", "-1/0/0", "3//1", "3/1/1x", "99999999999/0/0", "1 / 0 / 0"}
	for _, in := range bad {
		if got, err := parseExpireLine([]byte(in)); err == nil || err == errBlankLine {
			t.Errorf("parseExpireLine(%q) = %v, %v; want an error", in, got, err)
		}
	}
	if _, err := parseExpireLine([]byte(" \t\r")); err != errBlankLine {
		t.Errorf("blank line: got %v, want errBlankLine", err)
	}
}

func TestExpireReaderBadLines(t *testing.T) {
	var b strings.Builder
	b.WriteString("1/0/0\n\nnot a tile\n")
	b.WriteString(strings.Repeat("9", 100_000) + "\n") // longer than any buffer: one bad line
	for i := 0; i < 20; i++ {
		b.WriteString("5/40/1\n") // x out of range
	}
	b.WriteString("2/3/3") // last line without newline
	r := newExpireReader(strings.NewReader(b.String()))
	var got []tileCoord
	for {
		tc, err := r.next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		got = append(got, tc)
	}
	if want := []tileCoord{{0, 0, 1}, {3, 3, 2}}; !slices.Equal(got, want) {
		t.Errorf("tiles = %v, want %v", got, want)
	}
	if r.lines != 25 || r.bad != 22 {
		t.Errorf("lines %d bad %d, want 25 and 22", r.lines, r.bad)
	}
	if len(r.errors) != maxExpireErrors {
		t.Fatalf("%d errors reported, want the first %d", len(r.errors), maxExpireErrors)
	}
	if e := r.errors[0]; e.Line != 3 || e.Text != "not a tile" {
		t.Errorf("first error %+v, want line 3 \"not a tile\"", e)
	}
	if e := r.errors[1]; e.Line != 4 || len(e.Text) > 80 {
		t.Errorf("second error %+v, want line 4 with its text cut", e)
	}
	if e := r.errors[2]; e.Line != 5 || !strings.Contains(e.Message, "outside") {
		t.Errorf("third error %+v, want line 5, coordinates outside", e)
	}
}

// op is shorthand for the tests' hand-computed sets.
func op(z, x, y int32, del bool) metaOp {
	return metaOp{tile: tileCoord{X: x, Y: y, Z: z}, delete: del}
}

func TestExpandPropagation(t *testing.T) {
	nw1 := expireGrid{origin: originNW, metaX: 1, metaY: 1}
	sw1 := expireGrid{origin: originSW, metaX: 1, metaY: 1}
	nw2 := expireGrid{origin: originNW, metaX: 2, metaY: 2}
	sw2 := expireGrid{origin: originSW, metaX: 2, metaY: 2}
	cases := []struct {
		name string
		rng  expireRange
		grid expireGrid
		in   []tileCoord // XYZ
		want []metaOp    // internal coordinates, in order
	}{
		{"nw ancestors to z0", expireRange{0, -1, -1, false}, nw1, []tileCoord{{1, 2, 2}},
			[]metaOp{op(2, 1, 2, false), op(1, 0, 1, false), op(0, 0, 0, false)}},
		{"sw flips y at every zoom", expireRange{0, -1, -1, false}, sw1, []tileCoord{{1, 2, 2}},
			// z2: 3-2 = 1; z1: XYZ y 1 → 1-1 = 0
			[]metaOp{op(2, 1, 1, false), op(1, 0, 0, false), op(0, 0, 0, false)}},
		{"min_zoom stops the ancestors", expireRange{2, -1, -1, false}, nw1, []tileCoord{{5, 6, 3}},
			[]metaOp{op(3, 5, 6, false), op(2, 2, 3, false)}},
		{"metatiles nw with descendants", expireRange{1, 3, -1, false}, nw2, []tileCoord{{3, 1, 2}},
			// z2 (3,1) → meta (2,0); z1 (1,0) → (0,0); z3 x 6..7 y 2..3 → meta (6,2)
			[]metaOp{op(2, 2, 0, false), op(1, 0, 0, false), op(3, 6, 2, false)}},
		{"delete_from deletes instead", expireRange{1, 3, 2, false}, nw2, []tileCoord{{3, 1, 2}},
			[]metaOp{op(2, 2, 0, true), op(1, 0, 0, false), op(3, 6, 2, true)}},
		{"sw descendants", expireRange{1, 2, -1, false}, sw1, []tileCoord{{0, 0, 1}},
			// z1: y 1-0 = 1; z2: x 0..1, XYZ y 0..1 → internal 3..2
			[]metaOp{op(1, 0, 1, false), op(2, 0, 2, false), op(2, 1, 2, false), op(2, 0, 3, false), op(2, 1, 3, false)}},
		{"sw metatiles with descendants", expireRange{2, 3, 3, false}, sw2, []tileCoord{{1, 0, 2}},
			// z2: internal y 3 → meta (0,2); z3: x 2..3, XYZ y 0..1 → internal 7..6 → meta (2,6)
			[]metaOp{op(2, 0, 2, false), op(3, 2, 6, true)}},
		{"dedup by metatile across lines", expireRange{2, -1, -1, false}, nw2, []tileCoord{{0, 0, 3}, {1, 1, 3}, {3, 3, 3}, {4, 0, 3}},
			// (0,0),(1,1) one metatile; (3,3) → (2,2), its z2 parent (1,1) → (0,0) seen; (4,0) → (4,0), z2 (2,0) → (2,0)
			[]metaOp{op(3, 0, 0, false), op(2, 0, 0, false), op(3, 2, 2, false), op(3, 4, 0, false), op(2, 2, 0, false)}},
		{"line above max_zoom marks ancestors from max_zoom", expireRange{0, 1, -1, false}, nw1, []tileCoord{{5, 5, 3}},
			[]metaOp{op(1, 1, 1, false), op(0, 0, 0, false)}},
		{"line below min_zoom marks descendants from min_zoom", expireRange{1, 1, -1, false}, nw1, []tileCoord{{0, 0, 0}},
			[]metaOp{op(1, 0, 0, false), op(1, 1, 0, false), op(1, 0, 1, false), op(1, 1, 1, false)}},
		{"descendant already seen through an earlier line", expireRange{0, 2, -1, false}, nw1, []tileCoord{{1, 1, 2}, {0, 0, 1}},
			[]metaOp{op(2, 1, 1, false), op(1, 0, 0, false), op(0, 0, 0, false),
				op(2, 0, 0, false), op(2, 1, 0, false), op(2, 0, 1, false)}},
		{"metatile 3x3 (not a power of two)", expireRange{1, -1, -1, false}, expireGrid{origin: originNW, metaX: 3, metaY: 3},
			[]tileCoord{{4, 4, 3}, {3, 3, 3}, {6, 6, 3}},
			// (4,4) → (3,3); z2 (2,2) → (0,0); z1 (1,1) → (0,0). (3,3) same metatile. (6,6) → (6,6); z2 (3,3) → (3,3); z1 (1,1) seen
			[]metaOp{op(3, 3, 3, false), op(2, 0, 0, false), op(1, 0, 0, false), op(3, 6, 6, false), op(2, 3, 3, false)}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			if err := c.rng.validate(); err != nil {
				t.Fatal(err)
			}
			got := expandAll(c.rng, c.grid, c.in)
			if !slices.Equal(got, c.want) {
				t.Errorf("got  %v\nwant %v", got, c.want)
			}
		})
	}
}

// naiveExpand is propagation written the slow, obvious way: every tile at every zoom,
// its metatile, a set. It checks the expander on random lists.
func naiveExpand(rng expireRange, g expireGrid, list []tileCoord) map[metaOp]bool {
	out := map[metaOp]bool{}
	for _, t := range list {
		maxZ := int32(rng.MaxZoom)
		if maxZ < 0 {
			maxZ = t.Z
		}
		for z := int32(rng.MinZoom); z <= maxZ; z++ {
			var xs, ys []int32
			if z <= t.Z {
				xs, ys = []int32{t.X >> (t.Z - z)}, []int32{t.Y >> (t.Z - z)}
			} else {
				s := z - t.Z
				for i := t.X << s; i < (t.X+1)<<s; i++ {
					xs = append(xs, i)
				}
				for i := t.Y << s; i < (t.Y+1)<<s; i++ {
					ys = append(ys, i)
				}
			}
			for _, x := range xs {
				for _, y := range ys {
					if g.origin == originSW {
						y = 1<<z - 1 - y
					}
					o := metaOp{tile: tileCoord{x / g.metaX * g.metaX, y / g.metaY * g.metaY, z}}
					o.delete = rng.DeleteFrom >= 0 && int(z) >= rng.DeleteFrom
					out[o] = true
				}
			}
		}
	}
	return out
}

func TestExpandMatchesNaive(t *testing.T) {
	rnd := rand.New(rand.NewSource(1))
	for i := 0; i < 300; i++ {
		g := expireGrid{origin: originNW + xyzOrigin(rnd.Intn(2)), metaX: int32(1 + rnd.Intn(5)), metaY: int32(1 + rnd.Intn(5))}
		rng := expireRange{MinZoom: rnd.Intn(4), MaxZoom: -1, DeleteFrom: -1}
		if rnd.Intn(2) == 0 {
			rng.MaxZoom = rng.MinZoom + rnd.Intn(5)
		}
		if rnd.Intn(2) == 0 {
			rng.DeleteFrom = rnd.Intn(8)
		}
		var list []tileCoord
		for n := rnd.Intn(20); n >= 0; n-- {
			z := int32(rnd.Intn(7))
			list = append(list, tileCoord{int32(rnd.Intn(1 << z)), int32(rnd.Intn(1 << z)), z})
		}
		got := expandAll(rng, g, list)
		want := naiveExpand(rng, g, list)
		seen := map[metaOp]bool{}
		for _, o := range got {
			if seen[o] {
				t.Fatalf("case %d %+v %+v: %v came out twice", i, rng, g, o)
			}
			seen[o] = true
		}
		if len(seen) != len(want) {
			t.Fatalf("case %d %+v %+v list %v: got %d metatiles, want %d\ngot %v", i, rng, g, list, len(seen), len(want), got)
		}
		for o := range want {
			if !seen[o] {
				t.Fatalf("case %d %+v %+v list %v: missing %v", i, rng, g, list, o)
			}
		}
	}
}

func TestExpireRangeValidate(t *testing.T) {
	for _, c := range []struct {
		rng  expireRange
		want string
	}{
		{expireRange{-1, -1, -1, false}, "min_zoom"},
		{expireRange{31, -1, -1, false}, "min_zoom"},
		{expireRange{5, 4, -1, false}, "max_zoom"},
		{expireRange{0, 31, -1, false}, "max_zoom"},
		{expireRange{0, 18, 31, false}, "delete_from"},
	} {
		if err := c.rng.validate(); err == nil || !strings.HasPrefix(err.Error(), c.want) {
			t.Errorf("validate(%+v) = %v, want an error naming %s", c.rng, err, c.want)
		}
	}
}

// expireBenchList is a list shaped like osm2pgsql's: z15 tiles in clusters (edits are local).
func expireBenchList(n int) []byte {
	rnd := rand.New(rand.NewSource(7))
	var b strings.Builder
	for i := 0; i < n; {
		cx, cy := rnd.Intn(1<<15-64), rnd.Intn(1<<15-64)
		for k := 0; k < 50 && i < n; k, i = k+1, i+1 {
			fmt.Fprintf(&b, "15/%d/%d\n", cx+rnd.Intn(64), cy+rnd.Intn(64))
		}
	}
	return []byte(b.String())
}

// BenchmarkExpireIngest measures reading a 1M-line expiry list into metatiles to queue:
// parse, propagate to z0 and up to z17, dedup (8×8 metatiles, sw origin, delete from z17).
func BenchmarkExpireIngest(b *testing.B) {
	const lines = 1_000_000
	data := expireBenchList(lines)
	b.SetBytes(int64(len(data)))
	b.ResetTimer()
	var ops int
	for i := 0; i < b.N; i++ {
		r := newExpireReader(strings.NewReader(string(data)))
		e := newExpander(expireRange{MinZoom: 0, MaxZoom: 17, DeleteFrom: 17}, expireGrid{origin: originSW, metaX: 8, metaY: 8})
		buf := make([]metaOp, 0, 1024)
		ops = 0
		for {
			tc, err := r.next()
			if err == io.EOF {
				break
			}
			buf = e.start(tc, buf[:0])
			for more := true; more; {
				buf, more = e.more(buf, 1024)
				ops += len(buf)
				buf = buf[:0]
			}
		}
	}
	b.ReportMetric(float64(lines)*float64(b.N)/b.Elapsed().Seconds(), "lines/s")
	b.ReportMetric(float64(ops), "metatiles")
}

// FuzzParseExpireLine: no input panics; what parses formats back to a line that parses the same.
func FuzzParseExpireLine(f *testing.F) {
	for _, s := range []string{"15/17000/11000", " 0/0/0\r", "30/1073741823/0", "1/2/0", "a/b/c", "3//1", ""} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		tc, err := parseExpireLine([]byte(s))
		if err != nil {
			return
		}
		back, err := parseExpireLine([]byte(formatExpireLine(tc)))
		if err != nil || back != tc {
			t.Fatalf("%q → %v → %q → %v, %v", s, tc, formatExpireLine(tc), back, err)
		}
	})
}

// FuzzJournalReplay: a journal file of any content replays without panicking.
func FuzzJournalReplay(f *testing.F) {
	f.Add([]byte(journalMagic))
	f.Add(appendRecord([]byte(journalMagic), append([]byte{recCache, 0}, "c"...)))
	f.Fuzz(func(t *testing.T, data []byte) {
		path := t.TempDir() + "/journal"
		os.WriteFile(path, append([]byte(journalMagic), data...), 0o600)
		j := newJournalState("", quietLog())
		j.replayFile(path)
		j.liveState()
	})
}

// expandAll propagates every tile of list and returns the metatiles (the tests reference).
// The daemon uses start and more with a bounded buffer instead.
func expandAll(rng expireRange, grid expireGrid, list []tileCoord) []metaOp {
	e := newExpander(rng, grid)
	var out []metaOp
	for _, t := range list {
		out = e.start(t, out)
		for more := true; more; {
			out, more = e.more(out, 1<<20)
		}
	}
	return out
}
