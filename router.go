// SPDX-License-Identifier: Apache-2.0

package main

import (
	"errors"
	"io"
	"net/http"
	"strconv"
)

// The command router: the one place that maps a parsed request to its answer, for the
// native protocol (an NDJSON line) and for HTTP (a request POSTed as a body) alike. A new
// command is added to parseRequest and to route, and both protocols have it.

// route answers one parsed request that came over proto. Every command but tile is answered
// here and now: route returns its reply and a nil request. A tile request is answered later,
// by the scheduler: route returns it as a pendingRequest (proto and the protocol's settings
// applied, no sink yet) for the caller to give a sink and submit, since NDJSON pipelines
// replies while HTTP waits for its one.
//
// Until the daemon is open (its renderers ready) only health is answered; any other
// request waits, and is answered shutting_down when the daemon stops or done is closed first.
func (s *server) route(req Request, proto reqProto, done <-chan struct{}) (Reply, *pendingRequest) {
	if req.Command == "health" {
		return s.health().reply(req.ID), nil
	}
	if !s.waitOpen(done) {
		return Reply{ID: req.ID, Status: statusShuttingDown, ErrorMessage: "daemon is shutting down"}, nil
	}
	switch req.Command {
	case "ping":
		return Reply{ID: req.ID, Status: statusOK}, nil
	case "status":
		return s.statusReply(req.ID), nil
	case "seed", "tasks", "task", "cancel":
		return s.tasks.handle(req), nil
	case "expire":
		return s.tasks.handleExpire(req), nil
	case "views":
		return s.viewsReply(req), nil
	case "tile":
		// http_wait is for MapProxy's live requests: mapproxy-seed (priority 10) takes any
		// answer but error for done and would move on while its tiles are still queued.
		if lim := s.limits.Load(); proto == protoHTTP && lim.httpWait > 0 && !req.HasWait && req.Priority >= lim.seedBelow && !req.Background {
			req.WaitMS, req.HasWait = lim.httpWait.Milliseconds(), true
		}
		return Reply{}, &pendingRequest{req: req, proto: proto}
	}
	// parseRequest refuses unknown commands; this is a command it learnt and route did not.
	return errorReply(req.ID, "command "+strconv.Quote(truncate(req.Command, 64))+" is not served"), nil
}

// requestErrorReply is the reply to a request that could not be parsed: the error's
// message, with the request's id when it had a usable one.
func requestErrorReply(err error) Reply {
	var re *requestError
	if errors.As(err, &re) {
		return errorReply(re.id, re.msg)
	}
	return errorReply(nil, "invalid request: "+err.Error())
}

// readBody reads an HTTP request body from body (a server.clientBody: capped at max bytes,
// with a deadline); a failure comes with the reply that says why.
func readBody(body io.Reader, max int) ([]byte, Reply, bool) {
	b, err := io.ReadAll(body)
	if err == nil {
		return b, Reply{}, true
	}
	var mbe *http.MaxBytesError
	if errors.As(err, &mbe) {
		return nil, errorReply(nil, "invalid request: body longer than max_line_bytes ("+strconv.Itoa(max)+" bytes)"), false
	}
	return nil, errorReply(nil, "invalid request: "+err.Error()), false
}
