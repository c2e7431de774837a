// SPDX-License-Identifier: Apache-2.0

package main

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"strconv"
)

// Expiry lists (docs/design.md §11): `z/x/y` lines in the XYZ web-mercator scheme, as
// `osm2pgsql --expire-tiles` writes them. This file holds the pure part: parsing lines,
// and propagating each tile to the metatiles to re-render or delete. Nothing here touches
// the scheduler or the disk; expire tasks (tasks.go) drive it.

const (
	// maxExpireZoom bounds the zoom of an expiry line and of propagation: 2^30 tiles a side
	// still fits the int32 coordinates of a job key.
	maxExpireZoom = 30
	// maxExpireLine bounds one line of an expiry list; longer is a bad line, skipped.
	maxExpireLine = 256
	// maxExpireErrors is how many bad lines an expiry run reports by number and text;
	// the rest are only counted.
	maxExpireErrors = 10
)

// xyzOrigin says how a cache's internal tile rows relate to the XYZ scheme's
// (from the renderer's ready line, "xyz": "nw" | "sw").
type xyzOrigin uint8

const (
	originNone xyzOrigin = iota // the cache's grid is not the XYZ web-mercator pyramid
	originNW                    // internal y = XYZ y (row 0 at the north)
	originSW                    // internal y = 2^z-1-y (row 0 at the south)
)

// parseOrigin reads the ready line's "xyz" value.
func parseOrigin(s string) (xyzOrigin, error) {
	switch s {
	case "":
		return originNone, nil
	case "nw":
		return originNW, nil
	case "sw":
		return originSW, nil
	}
	return originNone, fmt.Errorf(`xyz: want "nw" or "sw", got %q`, s)
}

// expireRange is what an expiry run propagates to. Zooms are XYZ zoom levels.
type expireRange struct {
	MinZoom int // ancestors down to this zoom (inclusive)
	// MaxZoom: descendants up to this zoom (inclusive); lines above it mark only their
	// ancestors from MaxZoom down. Negative: each line's own zoom (no descendants).
	MaxZoom int
	// DeleteFrom: metatiles at this zoom and above are deleted from the cache instead of
	// re-rendered. Negative: never.
	DeleteFrom int
	// RenderAll re-renders every metatile of the run. Otherwise (the default, as mod_tile's
	// render_expired) only metatiles with at least one tile in the cache are re-rendered: a
	// metatile nobody ever viewed costs no render (the renderer skips it, the task counts it
	// as skipped).
	RenderAll bool
}

// validate checks the range; errors name the request field.
func (r expireRange) validate() error {
	if r.MinZoom < 0 || r.MinZoom > maxExpireZoom {
		return fmt.Errorf("min_zoom: want 0..%d, got %d", maxExpireZoom, r.MinZoom)
	}
	if r.MaxZoom > maxExpireZoom {
		return fmt.Errorf("max_zoom: want 0..%d, got %d", maxExpireZoom, r.MaxZoom)
	}
	if r.MaxZoom >= 0 && r.MaxZoom < r.MinZoom {
		return fmt.Errorf("max_zoom: %d is below min_zoom %d", r.MaxZoom, r.MinZoom)
	}
	if r.DeleteFrom > maxExpireZoom {
		return fmt.Errorf("delete_from: want 0..%d, got %d", maxExpireZoom, r.DeleteFrom)
	}
	return nil
}

// expireGrid is what propagation needs to know about a cache.
type expireGrid struct {
	origin       xyzOrigin
	metaX, metaY int32 // metatile size in tiles; < 1 counts as 1
}

// metaOp is one metatile of an expiry run: re-render it, or delete its tiles.
// tile is the metatile's origin tile in the cache's internal coordinates, as keyFor makes it.
type metaOp struct {
	tile   tileCoord
	delete bool
}

// parseExpireLine parses `z/x/y` (surrounding spaces, tabs and a CR allowed). It returns
// errBlankLine for an empty line, which callers skip without counting it as bad.
func parseExpireLine(b []byte) (tileCoord, error) {
	b = bytes.TrimSpace(b)
	if len(b) == 0 {
		return tileCoord{}, errBlankLine
	}
	var v [3]int64
	i := 0
	for n := 0; n < 3; n++ {
		if n > 0 {
			if i >= len(b) || b[i] != '/' {
				return tileCoord{}, errors.New("want z/x/y")
			}
			i++
		}
		start := i
		var x int64
		for i < len(b) && b[i] >= '0' && b[i] <= '9' {
			x = x*10 + int64(b[i]-'0')
			if x > maxCoordinate {
				return tileCoord{}, errors.New("number out of range")
			}
			i++
		}
		if i == start {
			return tileCoord{}, errors.New("want z/x/y with non-negative integers")
		}
		v[n] = x
	}
	if i != len(b) {
		return tileCoord{}, errors.New("want z/x/y (trailing characters)")
	}
	z, x, y := v[0], v[1], v[2]
	if z > maxExpireZoom {
		return tileCoord{}, fmt.Errorf("zoom %d above %d", z, maxExpireZoom)
	}
	if x >= 1<<z || y >= 1<<z {
		return tileCoord{}, fmt.Errorf("x or y outside 0..%d at zoom %d", int64(1)<<z-1, z)
	}
	return tileCoord{X: int32(x), Y: int32(y), Z: int32(z)}, nil
}

var errBlankLine = errors.New("blank line")

// expireLineError is one bad line of an expiry list, as reported to the client.
type expireLineError struct {
	Line    int64  `json:"line"` // 1-based
	Text    string `json:"text"`
	Message string `json:"message"`
}

// expireReader reads an expiry list line by line. Bad lines are counted and the first
// maxExpireErrors kept; they never stop the reading. It does its own line splitting so
// that a line of any length costs at most maxExpireLine bytes of memory.
type expireReader struct {
	r      *bufio.Reader
	lines  int64 // lines consumed, good, bad and blank
	bad    int64
	errors []expireLineError
}

func newExpireReader(r io.Reader) *expireReader {
	return &expireReader{r: bufio.NewReaderSize(r, 64<<10)}
}

// next returns the next good tile, or io.EOF at the end, or the reader's own error.
func (e *expireReader) next() (tileCoord, error) {
	for {
		line, err := e.readLine()
		if line == nil && err != nil {
			return tileCoord{}, err
		}
		e.lines++
		t, perr := parseExpireLine(line)
		if perr == nil {
			return t, nil
		}
		if perr != errBlankLine {
			e.badLine(line, perr)
		}
	}
}

func (e *expireReader) badLine(line []byte, err error) {
	e.bad++
	if len(e.errors) < maxExpireErrors {
		e.errors = append(e.errors, expireLineError{Line: e.lines, Text: truncate(string(line), 64), Message: err.Error()})
	}
}

// readLine returns the next line without its newline (nil and io.EOF at the end). A last
// line without a newline counts. Over-long lines come back cut, and parse as bad.
func (e *expireReader) readLine() ([]byte, error) {
	line, err := e.r.ReadSlice('\n')
	if err == bufio.ErrBufferFull {
		// Drop the rest of an over-long line; keep its start for the error report.
		head := append([]byte(nil), line[:min(len(line), maxExpireLine)]...)
		for err == bufio.ErrBufferFull {
			_, err = e.r.ReadSlice('\n')
		}
		if err != nil && err != io.EOF {
			return nil, err
		}
		return append(head, "…"...), nil
	}
	if err != nil && (err != io.EOF || len(line) == 0) {
		return nil, err
	}
	line = bytes.TrimSuffix(line, []byte{'\n'})
	if len(line) > maxExpireLine {
		return append(line[:maxExpireLine:maxExpireLine], "…"...), nil
	}
	if line == nil {
		line = []byte{}
	}
	return line, nil
}

// seenSet records metatiles already handled by an expiry run. It is a sparse bitmap:
// one 64-bit word per block of 8×8 metatiles of one zoom, so the clustered lists that
// osm2pgsql writes cost about one bit per metatile, and a scattered one about 24 bytes.
type seenSet map[uint64]uint64

// mark sets the bit of metatile index (mx, my) at zoom z and reports whether it was set before.
func (s seenSet) mark(z, mx, my int32) (was bool) {
	key := uint64(z)<<54 | uint64(mx>>3)<<27 | uint64(my>>3)
	bit := uint64(1) << (uint(my&7)<<3 | uint(mx&7))
	w := s[key]
	if w&bit != 0 {
		return true
	}
	s[key] = w | bit
	return false
}

// expander propagates expiry tiles to metatiles (docs/design.md §11): each tile marks its ancestors
// down to MinZoom and its descendants up to MaxZoom, at every zoom (no gap at z0–2 as in
// render_expired); every metatile comes out at most once per run. Descendants come out
// lazily (a z5 tile propagated to z18 is millions of tiles), so memory is the seen-set only.
type expander struct {
	rng  expireRange
	grid expireGrid
	seen seenSet
	desc descent // the descent in progress, continued by more
}

// descent walks the metatiles over a rectangle of tiles at zooms z..maxZ.
type descent struct {
	active         bool
	tx, ty, tz     int32 // the expired tile (XYZ)
	z, maxZ        int32 // current zoom
	x0, x1, y0, y1 int32 // metatile origins (internal coordinates) to visit at z, inclusive
	cx, cy         int32 // next metatile origin to visit
	stepX, stepY   int32
}

func newExpander(rng expireRange, grid expireGrid) *expander {
	if grid.metaX < 1 {
		grid.metaX = 1
	}
	if grid.metaY < 1 {
		grid.metaY = 1
	}
	return &expander{rng: rng, grid: grid, seen: make(seenSet)}
}

// internalY converts an XYZ row at zoom z to the cache's row.
func (e *expander) internalY(y, z int32) int32 {
	if e.grid.origin == originSW {
		return int32(1)<<z - 1 - y
	}
	return y
}

func (e *expander) op(x, yi, z int32) metaOp {
	return metaOp{
		tile:   tileCoord{X: x / e.grid.metaX * e.grid.metaX, Y: yi / e.grid.metaY * e.grid.metaY, Z: z},
		delete: e.rng.DeleteFrom >= 0 && int(z) >= e.rng.DeleteFrom,
	}
}

// markOne marks the metatile of internal tile (x, yi, z); it reports whether it is new.
func (e *expander) markOne(x, yi, z int32) bool {
	return !e.seen.mark(z, x/e.grid.metaX, yi/e.grid.metaY)
}

// start begins propagating tile t (XYZ): it appends t's own metatile and its ancestors'
// that are new to out, and prepares the descent that more() continues. Any descent still
// in progress is abandoned, so callers drain more() first.
func (e *expander) start(t tileCoord, out []metaOp) []metaOp {
	maxZ := int32(e.rng.MaxZoom)
	if maxZ < 0 {
		maxZ = t.Z
	}
	minZ := int32(e.rng.MinZoom)
	top := min(t.Z, maxZ)
	for z := top; z >= minZ; z-- {
		d := t.Z - z
		x, yi := t.X>>d, e.internalY(t.Y>>d, z)
		if e.markOne(x, yi, z) {
			out = append(out, e.op(x, yi, z))
		} else {
			// Every ancestor of a seen metatile is seen: the parents of the tiles of metatile
			// [m·k, m·k+m-1] are [⌊m·k/2⌋, ⌊(m·k+m-1)/2⌋], inside metatile ⌊k/2⌋ for any m,
			// and halving commutes with the sw flip (2^z-1-y)>>1 = 2^(z-1)-1-(y>>1).
			// Descents keep it too: they finish each zoom before the next.
			break
		}
	}
	e.desc = descent{}
	if maxZ > t.Z {
		e.desc = descent{active: true, tx: t.X, ty: t.Y, tz: t.Z, z: max(t.Z+1, minZ) - 1, maxZ: maxZ}
		e.desc.nextZoom(e)
	}
	return out
}

// nextZoom moves the descent to its next zoom; it clears active past maxZ.
func (d *descent) nextZoom(e *expander) {
	d.z++
	if d.z > d.maxZ {
		d.active = false
		return
	}
	s := d.z - d.tz
	xlo, xhi := d.tx<<s, (d.tx+1)<<s-1
	ylo, yhi := e.internalY(d.ty<<s, d.z), e.internalY((d.ty+1)<<s-1, d.z)
	if ylo > yhi {
		ylo, yhi = yhi, ylo
	}
	mx, my := e.grid.metaX, e.grid.metaY
	d.x0, d.x1 = xlo/mx*mx, xhi/mx*mx
	d.y0, d.y1 = ylo/my*my, yhi/my*my
	d.cx, d.cy = d.x0, d.y0
	d.stepX, d.stepY = mx, my
}

// more appends up to limit new descendant metatiles of the current tile to out. It
// returns false when the descent is over (out may still have gained some).
func (e *expander) more(out []metaOp, limit int) ([]metaOp, bool) {
	d := &e.desc
	n := 0
	for d.active {
		if d.cy > d.y1 {
			d.nextZoom(e)
			continue
		}
		if n >= limit {
			return out, true
		}
		x, y := d.cx, d.cy
		d.cx += d.stepX
		if d.cx > d.x1 {
			d.cx = d.x0
			d.cy += d.stepY
		}
		if e.markOne(x, y, d.z) {
			out = append(out, e.op(x, y, d.z))
			n++
		}
	}
	return out, false
}

// formatExpireLine writes t as an expiry line (the CLI and tests).
func formatExpireLine(t tileCoord) string {
	return strconv.Itoa(int(t.Z)) + "/" + strconv.Itoa(int(t.X)) + "/" + strconv.Itoa(int(t.Y))
}
