// SPDX-License-Identifier: Apache-2.0

package main

import (
	"bytes"
	"encoding/json"
	"strconv"
	"unicode/utf8"
)

// fastParse parses the common shape of a request (what MapProxy and our clients send)
// without reflection: one object whose keys are known and whose values are plain strings
// (no escapes), small non-negative integers, booleans or null. It returns ok=false for
// anything else, and parseRequest falls back to encoding/json, which also produces the
// error messages. FuzzParseRequest checks that both agree wherever fastParse answers.
func fastParse(line []byte) (req Request, ok bool) {
	p := fastParser{b: line}
	if !p.byte('{') {
		return req, false
	}
	var seen uint8
	var tiles []tileCoord
	priority, hasPriority := 0, false
	for first := true; ; first = false {
		p.space()
		if p.peek() == '}' && first {
			break
		}
		key, ok := p.plainString()
		if !ok || !p.byte(':') {
			return req, false
		}
		var bit uint8
		switch key {
		case "command":
			bit = 1
			req.Command, ok = p.plainString()
		case "id":
			bit = 2
			if p.literal("null") {
				break
			}
			var id string
			id, ok = p.plainString()
			req.ID = &id
		case "cache_identifier":
			bit = 4
			req.CacheIdentifier, ok = p.plainString()
		case "tiles":
			bit = 8
			tiles, ok = p.tiles()
		case "priority":
			bit = 16
			if p.literal("null") {
				break
			}
			priority, ok = p.uint(maxPriority)
			hasPriority = true
		case "background":
			bit = 32
			switch {
			case p.literal("true"):
				req.Background = true
			case p.literal("false"), p.literal("null"):
			default:
				ok = false
			}
		default:
			return req, false
		}
		if !ok || seen&bit != 0 {
			return req, false
		}
		seen |= bit
		p.space()
		if p.byte('}') {
			break
		}
		if !p.byte(',') {
			return req, false
		}
	}
	p.space()
	if p.i != len(p.b) || seen&1 == 0 {
		return req, false
	}
	switch req.Command {
	case "ping", "status":
		// The slow path ignores the other fields for these commands; so do we.
		return Request{Command: req.Command, ID: req.ID}, true
	case "tile":
	default:
		return req, false
	}
	if seen&4 == 0 || validateCacheIdentifier(req.CacheIdentifier) != nil || len(tiles) == 0 || len(tiles) > maxTilesPerReq {
		return req, false
	}
	req.Tiles = tiles
	req.Priority = defaultPriority
	if hasPriority {
		req.Priority = priority
	}
	return req, true
}

type fastParser struct {
	b []byte
	i int
}

func (p *fastParser) space() {
	for p.i < len(p.b) && (p.b[p.i] == ' ' || p.b[p.i] == '\t' || p.b[p.i] == '\r' || p.b[p.i] == '\n') {
		p.i++
	}
}

func (p *fastParser) peek() byte {
	if p.i < len(p.b) {
		return p.b[p.i]
	}
	return 0
}

// byte skips white space and consumes c if it comes next.
func (p *fastParser) byte(c byte) bool {
	p.space()
	if p.peek() == c {
		p.i++
		return true
	}
	return false
}

func (p *fastParser) literal(s string) bool {
	p.space()
	if len(p.b)-p.i >= len(s) && string(p.b[p.i:p.i+len(s)]) == s {
		p.i += len(s)
		return true
	}
	return false
}

// plainString reads a string with no escapes, no control characters and valid UTF-8
// (encoding/json replaces invalid bytes with U+FFFD: such a string takes the slow path).
func (p *fastParser) plainString() (string, bool) {
	if !p.byte('"') {
		return "", false
	}
	start := p.i
	ascii := true
	for p.i < len(p.b) {
		c := p.b[p.i]
		switch {
		case c == '"':
			if !ascii && !utf8.Valid(p.b[start:p.i]) {
				return "", false
			}
			s := string(p.b[start:p.i])
			p.i++
			return s, true
		case c == '\\' || c < 0x20:
			return "", false
		case c >= utf8.RuneSelf:
			ascii = false
		}
		p.i++
	}
	return "", false
}

// uint reads a plain decimal integer from 0 to limit (no sign, fraction or exponent).
func (p *fastParser) uint(limit int) (int, bool) {
	p.space()
	start, n := p.i, 0
	for p.i < len(p.b) && p.b[p.i] >= '0' && p.b[p.i] <= '9' {
		n = n*10 + int(p.b[p.i]-'0')
		if n > limit {
			return 0, false
		}
		p.i++
	}
	if p.i == start || (p.b[start] == '0' && p.i-start > 1) {
		return 0, false
	}
	switch p.peek() {
	case '.', 'e', 'E':
		return 0, false
	}
	return n, true
}

func (p *fastParser) tiles() ([]tileCoord, bool) {
	if !p.byte('[') {
		return nil, false
	}
	var out []tileCoord
	for {
		if !p.byte('[') {
			return nil, false
		}
		var v [3]int
		for k := range v {
			n, ok := p.uint(maxCoordinate)
			if !ok || (k < 2 && !p.byte(',')) {
				return nil, false
			}
			v[k] = n
		}
		if !p.byte(']') || v[2] > maxZoom {
			return nil, false
		}
		out = append(out, tileCoord{int32(v[0]), int32(v[1]), int32(v[2])})
		if len(out) > maxTilesPerReq {
			return nil, false
		}
		if p.byte(']') {
			return out, true
		}
		if !p.byte(',') {
			return nil, false
		}
	}
}

// appendJSONString appends s as a JSON string. Plain ASCII is copied; anything else goes
// through encoding/json, which escapes it correctly.
func appendJSONString(dst []byte, s string) []byte {
	for i := 0; i < len(s); i++ {
		if c := s[i]; c < 0x20 || c >= 0x7f || c == '"' || c == '\\' || c == '<' || c == '>' || c == '&' {
			b, _ := json.Marshal(s)
			return append(dst, b...)
		}
	}
	dst = append(dst, '"')
	dst = append(dst, s...)
	return append(dst, '"')
}

// appendReply appends r as one JSON line, as json.Marshal would write it, without reflection.
// A reply with a status document goes through encoding/json.
func appendReply(dst []byte, r Reply) []byte {
	if r.Stats != nil || r.Task != nil || r.Tasks != nil || r.Skipped || r.Degraded != "" || r.Backoff {
		b, err := json.Marshal(r)
		if err != nil {
			b, _ = json.Marshal(Reply{ID: r.ID, Status: statusError, ErrorMessage: "internal error encoding reply: " + err.Error()})
		}
		return append(append(dst, b...), '\n')
	}
	dst = append(dst, '{')
	if r.ID != nil {
		dst = append(dst, `"id":`...)
		dst = appendJSONString(dst, *r.ID)
		dst = append(dst, ',')
	}
	dst = append(dst, `"status":`...)
	dst = appendJSONString(dst, r.Status)
	if r.ErrorMessage != "" {
		dst = append(dst, `,"error_message":`...)
		dst = appendJSONString(dst, r.ErrorMessage)
	}
	if r.QueuedMS != nil {
		dst = append(dst, `,"queued_ms":`...)
		dst = strconv.AppendFloat(dst, *r.QueuedMS, 'f', -1, 64)
	}
	if r.RenderMS != nil {
		dst = append(dst, `,"render_ms":`...)
		dst = strconv.AppendFloat(dst, *r.RenderMS, 'f', -1, 64)
	}
	if r.Merged {
		dst = append(dst, `,"merged":true`...)
	}
	return append(dst, '}', '\n')
}

// appendJobLine appends the renderer protocol's job line (docs/design.md §5).
func appendJobLine(dst []byte, id string, j renderJob) []byte {
	dst = append(dst, `{"id":"`...)
	dst = append(dst, id...)
	if j.delete {
		dst = append(dst, `","command":"delete","cache_identifier":`...)
	} else {
		dst = append(dst, `","command":"tile","cache_identifier":`...)
	}
	dst = appendJSONString(dst, j.cache)
	dst = append(dst, `,"tiles":[[`...)
	dst = strconv.AppendInt(dst, int64(j.tile.X), 10)
	dst = append(dst, ',')
	dst = strconv.AppendInt(dst, int64(j.tile.Y), 10)
	dst = append(dst, ',')
	dst = strconv.AppendInt(dst, int64(j.tile.Z), 10)
	if j.refresh {
		dst = append(dst, `]],"refresh":true`...)
	} else {
		dst = append(dst, `]],"refresh":false`...)
		if j.refreshBefore >= 0 {
			dst = append(dst, `,"refresh_before":`...)
			dst = strconv.AppendFloat(dst, j.refreshBefore, 'f', -1, 64)
		}
	}
	if j.seed {
		dst = append(dst, `,"seed":true`...)
	}
	if j.onlyCached && !j.delete {
		dst = append(dst, `,"only_cached":true`...)
	}
	return append(dst, '}', '\n')
}

// isPlainOK reports whether a renderer's reply line is exactly {"id": "<id>", "status": "ok"}
// in Python's or Go's formatting; anything else is parsed with encoding/json.
func isPlainOK(line []byte, id string) bool {
	s := string(bytes.TrimSpace(line))
	return s == `{"id": "`+id+`", "status": "ok"}` || s == `{"id":"`+id+`","status":"ok"}`
}
