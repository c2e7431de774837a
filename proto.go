// SPDX-License-Identifier: Apache-2.0

package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strconv"
	"unicode/utf8"
)

// Status values of a reply (docs/design.md §2).
const (
	statusOK           = "ok"
	statusError        = "error"
	statusQueued       = "queued"
	statusBusy         = "busy"
	statusExpired      = "expired"
	statusPending      = "pending"
	statusShuttingDown = "shutting_down"
	// statusWithdrawn is internal: the answer to a cancelled keepRunning request (taskdrain.go).
	statusWithdrawn = "withdrawn"
)

const (
	minPriority     = 0
	maxPriority     = 1000
	defaultPriority = 50
	maxCacheIDBytes = 256
	maxCoordinate   = 1<<31 - 1
	maxZoom         = 255
	maxTilesPerReq  = 4096
)

// tileCoord is a MapProxy-internal grid coordinate.
type tileCoord struct{ X, Y, Z int32 }

// Request is one parsed client request.
type Request struct {
	Command         string
	ID              *string
	CacheIdentifier string
	Tiles           []tileCoord
	Priority        int
	Background      bool

	// Task commands (docs/design.md §10): seed names a seeds:/cleanups: entry (Task) or carries an
	// inline seed (Seed); task and cancel name a task (TaskID).
	Task       string
	TaskID     string
	SeedConfig string
	Seed       json.RawMessage
	// PrioritySet says the client gave a priority (a task's default is seed_priority).
	PrioritySet bool
	// Rate of a seed or expire task, metatiles per second; 0: unlimited (docs/design.md §17).
	Rate float64

	// Set by tasks only, never from the wire: render the metatile only when a tile of it is
	// missing or stale (older than RefreshBefore, unix seconds, when that is not negative).
	NoForce       bool
	RefreshBefore float64
	// WaitMS: with HasWait, answer pending when the job has not finished after this many ms (§13).
	WaitMS  int64
	HasWait bool
	// Set by expiry tasks only: remove the metatile's tiles from the cache (docs/design.md §11).
	Delete bool
	// Set by expiry tasks only: render the metatile only when one of its tiles is cached.
	OnlyCached bool
	// The expire command's only_cached (nil: absent, renderd.yaml's expire_only_cached).
	ExpireOnlyCached *bool

	// The expire command (docs/design.md §11): an expiry list as text (Lines) and/or XYZ tiles
	// (Tiles, [x, y, z] in the XYZ scheme), propagated over Range.
	Lines []byte
	Range expireRange

	// replayed marks a background job queued again from the journal at start: it is in the
	// journal already.
	replayed bool
}

// Reply is the one final answer to a request.
type Reply struct {
	ID           *string  `json:"id,omitempty"`
	Status       string   `json:"status"`
	ErrorMessage string   `json:"error_message,omitempty"`
	QueuedMS     *float64 `json:"queued_ms,omitempty"`
	RenderMS     *float64 `json:"render_ms,omitempty"`
	Merged       bool     `json:"merged,omitempty"`
	Skipped      bool     `json:"skipped,omitempty"` // the renderer found every tile fresh
	// Backoff: the render failed on an overloaded upstream (429, 503, timeout) and the
	// cache's rate limiter backs off (docs/design.md §17); retrying later is expected to work.
	Backoff   bool            `json:"backoff,omitempty"`
	Stats     json.RawMessage `json:"stats,omitempty"`
	Task      json.RawMessage `json:"task,omitempty"`
	Tasks     json.RawMessage `json:"tasks,omitempty"`
	Schedules json.RawMessage `json:"schedules,omitempty"`
	// Degraded: health is ok (live requests are served) but something is wrong: the journal
	// cannot write, so durable work is refused (journalfail.go).
	Degraded string `json:"degraded,omitempty"`
}

// requestError is a request that cannot be served; id is echoed when it was parsed.
type requestError struct {
	id  *string
	msg string
}

func (e *requestError) Error() string { return e.msg }

// wireRequest keeps every field raw so that each gets its own clear error message.
type wireRequest struct {
	Command         json.RawMessage `json:"command"`
	ID              json.RawMessage `json:"id"`
	CacheIdentifier json.RawMessage `json:"cache_identifier"`
	Tiles           json.RawMessage `json:"tiles"`
	Priority        json.RawMessage `json:"priority"`
	Background      json.RawMessage `json:"background"`
	Task            json.RawMessage `json:"task"`
	TaskID          json.RawMessage `json:"task_id"`
	SeedConfig      json.RawMessage `json:"seed_config"`
	Seed            json.RawMessage `json:"seed"`
	WaitMS          json.RawMessage `json:"wait_ms"`
	Refresh         json.RawMessage `json:"refresh"`
	Lines           json.RawMessage `json:"lines"`
	MinZoom         json.RawMessage `json:"min_zoom"`
	MaxZoom         json.RawMessage `json:"max_zoom"`
	DeleteFrom      json.RawMessage `json:"delete_from"`
	OnlyCached      json.RawMessage `json:"only_cached"`
	Rate            json.RawMessage `json:"rate"`
}

var errEmptyLine = errors.New("empty line")

// parseRequest parses and validates one NDJSON line (or one HTTP body).
// It never panics; every error is a *requestError carrying the id when the line had a usable one.
func parseRequest(line []byte) (Request, error) {
	var req Request
	line = bytes.TrimSpace(line)
	if len(line) == 0 {
		return req, errEmptyLine
	}
	if !utf8.Valid(line) {
		return req, &requestError{msg: "invalid request: not UTF-8"}
	}
	if fast, ok := fastParse(line); ok {
		return fast, nil
	}
	return slowParse(line)
}

// parseCommandBody parses an HTTP body whose route names the command (POST /tasks is
// seed): the body is the request without "command", which is command. A body that names
// a command anyway has it parsed as parseRequest does: the caller checks it. Errors are as
// parseRequest's.
func parseCommandBody(body []byte, command string) (Request, error) {
	body = bytes.TrimSpace(body)
	if len(body) == 0 {
		return Request{}, errEmptyLine
	}
	if !utf8.Valid(body) {
		return Request{}, &requestError{msg: "invalid request: not UTF-8"}
	}
	return slowParseAs(body, command)
}

// slowParse is parseRequest with encoding/json: every shape, every error message.
func slowParse(line []byte) (Request, error) { return slowParseAs(line, "") }

// slowParseAs is slowParse; a non-empty command is the command of a line that names none.
func slowParseAs(line []byte, command string) (Request, error) {
	var req Request
	var w wireRequest
	dec := json.NewDecoder(bytes.NewReader(line))
	dec.DisallowUnknownFields()
	err := dec.Decode(&w)
	if err == nil {
		if _, terr := dec.Token(); terr != io.EOF {
			err = errors.New("trailing data after the JSON object")
		}
	}
	// The id is worth echoing even when another field is bad.
	if len(w.ID) > 0 && string(w.ID) != "null" {
		var id string
		if json.Unmarshal(w.ID, &id) != nil {
			return req, &requestError{msg: "invalid request: id must be a string"}
		}
		req.ID = &id
	}
	if err != nil {
		return req, &requestError{id: req.ID, msg: "invalid request: " + jsonErrorText(err)}
	}
	switch {
	case command != "" && len(w.Command) == 0:
		req.Command = command
	case len(w.Command) == 0:
		return req, &requestError{id: req.ID, msg: "invalid request: missing command"}
	case json.Unmarshal(w.Command, &req.Command) != nil:
		return req, &requestError{id: req.ID, msg: "invalid request: command must be a string"}
	}
	var ferr error
	switch req.Command {
	case "ping", "status", "health":
		return req, nil
	case "tile":
		ferr = parseTileFields(&req, &w)
	case "seed", "tasks", "task", "cancel":
		ferr = parseTaskFields(&req, &w)
	case "expire":
		ferr = parseExpireFields(&req, &w)
	case "views": // views.go
		if ferr = parseCacheIdentifier(&req, &w); ferr == nil {
			req.Tiles, ferr = parseTiles(w.Tiles)
		}
	default:
		return req, &requestError{id: req.ID, msg: fmt.Sprintf("unknown command %q (want tile, status, health, ping, seed, tasks, task, cancel, expire or views)", truncate(req.Command, 64))}
	}
	if ferr != nil {
		return req, &requestError{id: req.ID, msg: "invalid request: " + ferr.Error()}
	}
	return req, nil
}

// parseTaskFields reads the fields of the task commands (docs/design.md §10).
func parseTaskFields(req *Request, w *wireRequest) error {
	str := func(raw json.RawMessage, name string, dst *string) error {
		if len(raw) == 0 || string(raw) == "null" {
			return nil
		}
		if json.Unmarshal(raw, dst) != nil {
			return fmt.Errorf("%s must be a string", name)
		}
		return nil
	}
	if err := str(w.Task, "task", &req.Task); err != nil {
		return err
	}
	if err := str(w.TaskID, "task_id", &req.TaskID); err != nil {
		return err
	}
	if err := str(w.SeedConfig, "seed_config", &req.SeedConfig); err != nil {
		return err
	}
	if len(w.Seed) > 0 && string(w.Seed) != "null" {
		if bytes.TrimSpace(w.Seed)[0] != '{' {
			return errors.New("seed must be an object ({\"cache\": …, \"levels\": …})")
		}
		req.Seed = w.Seed
	}
	if err := parsePriority(req, w); err != nil {
		return err
	}
	if err := parseRate(req, w); err != nil {
		return err
	}
	switch req.Command {
	case "seed":
		if (req.Task == "") == (req.Seed == nil) {
			return errors.New(`seed needs either "task" (a seeds: or cleanups: entry of seed_config) or "seed" (an inline seed)`)
		}
	case "task", "cancel":
		if req.TaskID == "" {
			return fmt.Errorf("%s needs task_id", req.Command)
		}
	}
	return nil
}

// parseExpireFields reads the expire command's fields (docs/design.md §11): cache_identifier,
// lines (a string of z/x/y lines) and/or tiles ([x, y, z], XYZ scheme), min_zoom (0),
// max_zoom (absent: each line's own zoom), delete_from (absent: never), priority.
func parseExpireFields(req *Request, w *wireRequest) error {
	if err := parseCacheIdentifier(req, w); err != nil {
		return err
	}
	if len(w.Lines) > 0 && string(w.Lines) != "null" {
		var s string
		if json.Unmarshal(w.Lines, &s) != nil {
			return errors.New(`lines must be a string of z/x/y lines ("15/17000/11000\n…")`)
		}
		req.Lines = []byte(s)
	}
	if len(w.Tiles) > 0 && string(w.Tiles) != "null" {
		tiles, err := parseTiles(w.Tiles)
		if err != nil {
			return err
		}
		req.Tiles = tiles
	}
	if req.Lines == nil && req.Tiles == nil {
		return errors.New(`expire needs "lines" (z/x/y lines) or "tiles" ([[x, y, z], …] in the XYZ scheme)`)
	}
	req.Range = expireRange{MinZoom: 0, MaxZoom: -1, DeleteFrom: -1}
	zoom := func(raw json.RawMessage, dst *int) {
		if len(raw) > 0 && string(raw) != "null" {
			v, err := parseInt(raw)
			if err != nil || v < 0 || v > maxExpireZoom {
				v = -2 // reported by validate below, naming the field
			}
			*dst = int(v)
		}
	}
	zoom(w.MinZoom, &req.Range.MinZoom)
	zoom(w.MaxZoom, &req.Range.MaxZoom)
	zoom(w.DeleteFrom, &req.Range.DeleteFrom)
	for _, f := range []struct {
		name string
		v    int
	}{{"min_zoom", req.Range.MinZoom}, {"max_zoom", req.Range.MaxZoom}, {"delete_from", req.Range.DeleteFrom}} {
		if f.v == -2 {
			return fmt.Errorf("%s must be an integer from 0 to %d", f.name, maxExpireZoom)
		}
	}
	if err := req.Range.validate(); err != nil {
		return err
	}
	if len(w.OnlyCached) > 0 && string(w.OnlyCached) != "null" {
		var b bool
		if json.Unmarshal(w.OnlyCached, &b) != nil {
			return errors.New("only_cached must be true or false")
		}
		req.ExpireOnlyCached = &b
	}
	if err := parsePriority(req, w); err != nil {
		return err
	}
	return parseRate(req, w)
}

// parseRate reads a task's rate when the request has one (a positive number).
func parseRate(req *Request, w *wireRequest) error {
	if len(w.Rate) == 0 || string(w.Rate) == "null" {
		return nil
	}
	var r float64
	if json.Unmarshal(w.Rate, &r) != nil || checkRate(r, false) != nil {
		return fmt.Errorf("rate must be a positive number of metatiles per second (at most %g), got %s", float64(maxRate), truncate(string(w.Rate), 32))
	}
	req.Rate = r
	return nil
}

// parsePriority reads priority when the request has one (0–1000).
func parsePriority(req *Request, w *wireRequest) error {
	if len(w.Priority) == 0 || string(w.Priority) == "null" {
		return nil
	}
	p, err := parseInt(w.Priority)
	if err != nil || p < minPriority || p > maxPriority {
		return fmt.Errorf("priority must be an integer from %d to %d, got %s", minPriority, maxPriority, truncate(string(w.Priority), 32))
	}
	req.Priority, req.PrioritySet = int(p), true
	return nil
}

// parseCacheIdentifier reads the required cache_identifier (docs/design.md §2).
func parseCacheIdentifier(req *Request, w *wireRequest) error {
	if len(w.CacheIdentifier) == 0 {
		return errors.New("missing cache_identifier")
	}
	if json.Unmarshal(w.CacheIdentifier, &req.CacheIdentifier) != nil {
		return errors.New("cache_identifier must be a string")
	}
	return validateCacheIdentifier(req.CacheIdentifier)
}

func parseTileFields(req *Request, w *wireRequest) error {
	if err := parseCacheIdentifier(req, w); err != nil {
		return err
	}
	tiles, err := parseTiles(w.Tiles)
	if err != nil {
		return err
	}
	req.Tiles = tiles
	req.Priority = defaultPriority
	if err := parsePriority(req, w); err != nil {
		return err
	}
	if len(w.Background) > 0 && string(w.Background) != "null" {
		if json.Unmarshal(w.Background, &req.Background) != nil {
			return errors.New("background must be true or false")
		}
	}
	return parseLiveFields(req, w)
}

// validateCacheIdentifier enforces docs/design.md §2: non-empty, at most 256 bytes, no '/', no control characters.
func validateCacheIdentifier(s string) error {
	if s == "" {
		return errors.New("cache_identifier must not be empty")
	}
	if len(s) > maxCacheIDBytes {
		return fmt.Errorf("cache_identifier longer than %d bytes", maxCacheIDBytes)
	}
	for _, r := range s {
		if r == '/' || r < 0x20 || r == 0x7f {
			return fmt.Errorf("cache_identifier %q contains '/' or a control character", truncate(s, 64))
		}
	}
	return nil
}

func parseTiles(raw json.RawMessage) ([]tileCoord, error) {
	if len(raw) == 0 || string(raw) == "null" {
		return nil, errors.New("missing tiles (want [[x, y, z], ...])")
	}
	var list []json.RawMessage
	if json.Unmarshal(raw, &list) != nil {
		return nil, errors.New("tiles must be a list of [x, y, z]")
	}
	if len(list) == 0 {
		return nil, errors.New("tiles must not be empty")
	}
	if len(list) > maxTilesPerReq {
		return nil, fmt.Errorf("too many tiles (%d, at most %d)", len(list), maxTilesPerReq)
	}
	tiles := make([]tileCoord, 0, len(list))
	for i, t := range list {
		var nums []json.RawMessage
		if json.Unmarshal(t, &nums) != nil || len(nums) != 3 {
			return nil, fmt.Errorf("tiles[%d] must be [x, y, z], got %s", i, truncate(string(t), 64))
		}
		var v [3]int64
		for j, n := range nums {
			x, err := parseInt(n)
			if err != nil || x < 0 || x > maxCoordinate || (j == 2 && x > maxZoom) {
				return nil, fmt.Errorf("tiles[%d] must hold non-negative integers (z at most %d), got %s", i, maxZoom, truncate(string(t), 64))
			}
			v[j] = x
		}
		tiles = append(tiles, tileCoord{int32(v[0]), int32(v[1]), int32(v[2])})
	}
	return tiles, nil
}

// parseInt accepts a JSON number that is an integer (1, 1.0 and 1e2 are fine; 1.5 is not).
func parseInt(raw json.RawMessage) (int64, error) {
	s := string(raw)
	if n, err := strconv.ParseInt(s, 10, 64); err == nil {
		return n, nil
	}
	f, err := strconv.ParseFloat(s, 64)
	if err != nil || f != float64(int64(f)) {
		return 0, errors.New("not an integer")
	}
	return int64(f), nil
}

func jsonErrorText(err error) string {
	var syn *json.SyntaxError
	if errors.As(err, &syn) {
		return fmt.Sprintf("malformed JSON at byte %d: %v", syn.Offset, syn)
	}
	var typ *json.UnmarshalTypeError
	if errors.As(err, &typ) {
		return fmt.Sprintf("want a JSON object, got %s", typ.Value)
	}
	if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
		return "malformed JSON: unexpected end of line"
	}
	msg := err.Error()
	if len(msg) > 5 && msg[:5] == "json:" {
		msg = msg[6:]
	}
	return msg
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "…"
}

// marshalReply encodes a reply as one line, newline included.
func marshalReply(r Reply) []byte { return appendReply(nil, r) }

func errorReply(id *string, msg string) Reply {
	return Reply{ID: id, Status: statusError, ErrorMessage: msg}
}
