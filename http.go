package main

import (
	"errors"
	"io"
	"net/http"
	"strconv"
)

// routes is every HTTP endpoint. POST on any other path is MapProxy 1.15's renderd protocol
// (DESIGN §3); other GET paths get 404 and other methods 405, both with a JSON error body.
// Each feature registers its endpoints here, with its handler in its own file.
func (s *server) routes() *http.ServeMux {
	mux := http.NewServeMux()
	mux.HandleFunc("POST /", s.servePost)
	mux.HandleFunc("GET /status", s.serveStatus)
	mux.HandleFunc("GET /_status", s.serveStatus)
	mux.HandleFunc("POST /tasks", s.serveStartTask)
	mux.HandleFunc("GET /tasks", s.serveTasks)
	mux.HandleFunc("GET /tasks/{id}", s.serveTasks)
	mux.HandleFunc("DELETE /tasks/{id}", s.serveCancelTask)
	mux.HandleFunc("GET /metrics", s.serveMetrics)
	mux.HandleFunc("GET /{$}", s.servePage)
	mux.HandleFunc("GET /healthz", s.serveHealthz)
	mux.HandleFunc("POST /expire", s.serveExpire)
	mux.HandleFunc("/", s.serveNoRoute)
	return mux
}

// serveStatus is GET /status (and /_status, as the old renderd): the status document.
func (s *server) serveStatus(w http.ResponseWriter, r *http.Request) {
	rep := s.statusReply(nil)
	if rep.Status != statusOK {
		writeJSON(w, http.StatusServiceUnavailable, rep)
		return
	}
	writeBody(w, http.StatusOK, append(rep.Stats, '\n'))
}

// serveNoRoute answers what no route takes: 404 for GET and HEAD, 405 for other methods.
func (s *server) serveNoRoute(w http.ResponseWriter, r *http.Request) {
	if r.Method == http.MethodGet || r.Method == http.MethodHead {
		writeJSON(w, http.StatusNotFound, errorReply(nil, "not found: POST a request to any path, or GET /status"))
		return
	}
	w.Header().Set("Allow", "GET, HEAD, POST")
	writeJSON(w, http.StatusMethodNotAllowed, errorReply(nil, "method "+r.Method+" not allowed: POST a request, or GET /status"))
}

// servePost takes one request from MapProxy's renderd client: answered 200
// application/json. MapProxy reads only status and error_message and treats any status other
// than "error" and "lock" as success, so every failure is "error" here, with the cause in
// error_message.
func (s *server) servePost(w http.ResponseWriter, r *http.Request) {
	maxLine := s.limits.Load().maxLine
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, int64(maxLine)))
	if err != nil {
		s.invalid.Add(1)
		var mbe *http.MaxBytesError
		if errors.As(err, &mbe) {
			writeJSON(w, http.StatusOK, errorReply(nil, "invalid request: body longer than max_line_bytes ("+strconv.Itoa(maxLine)+" bytes)"))
			return
		}
		writeJSON(w, http.StatusOK, errorReply(nil, "invalid request: "+err.Error()))
		return
	}
	req, err := parseRequest(body)
	if err != nil {
		s.invalid.Add(1)
		var re *requestError
		if errors.As(err, &re) {
			writeJSON(w, http.StatusOK, errorReply(re.id, re.msg))
		} else {
			writeJSON(w, http.StatusOK, errorReply(nil, "invalid request: "+err.Error()))
		}
		return
	}
	switch req.Command {
	case "ping":
		writeJSON(w, http.StatusOK, Reply{ID: req.ID, Status: statusOK})
		return
	case "status":
		writeJSON(w, http.StatusOK, s.statusReply(req.ID))
		return
	case "seed", "tasks", "task", "cancel":
		writeJSON(w, http.StatusOK, s.tasks.handle(req))
		return
	case "health":
		writeJSON(w, http.StatusOK, s.health().reply(req.ID))
	case "expire":
		writeJSON(w, http.StatusOK, s.tasks.handleExpire(req))
		return
	case "views":
		writeJSON(w, http.StatusOK, s.viewsReply(req))
		return
	}
	// http_wait is for live requests: mapproxy-seed (priority 10) takes any answer but error
	// for done and would move on while its tiles are still queued.
	if lim := s.limits.Load(); lim.httpWait > 0 && !req.HasWait && req.Priority >= lim.seedBelow && !req.Background {
		req.WaitMS, req.HasWait = lim.httpWait.Milliseconds(), true
	}
	sink := newChanSink()
	p := &pendingRequest{req: req, sink: sink, proto: protoHTTP}
	s.sched.submit(p)
	select {
	case rep := <-sink:
		writeJSON(w, http.StatusOK, forMapProxy(rep))
	case <-r.Context().Done():
		// The client hung up (net/http noticed the closed connection): stop waiting.
		s.sched.cancel(p)
	}
}

// forMapProxy maps statuses MapProxy 1.15 does not know to "error": it would take
// busy, expired or shutting_down for success and serve a transparent tile. pending (only
// with http_wait or wait_ms) goes out as it is: MapProxy takes it for success, which is what
// http_wait asks for (README: "Answering MapProxy early").
func forMapProxy(r Reply) Reply {
	switch r.Status {
	case statusOK, statusError, statusQueued, statusPending:
		return r
	case statusBusy:
		r.ErrorMessage = "renderd busy: " + r.ErrorMessage
	case statusShuttingDown:
		r.ErrorMessage = "renderd is shutting down: " + r.ErrorMessage
	case statusExpired:
		r.ErrorMessage = "renderd: deadline expired: " + r.ErrorMessage
	}
	r.Status = statusError
	return r
}

func writeJSON(w http.ResponseWriter, code int, r Reply) {
	writeBody(w, code, marshalReply(r))
}

func writeBody(w http.ResponseWriter, code int, b []byte) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Content-Length", strconv.Itoa(len(b)))
	w.WriteHeader(code)
	_, _ = w.Write(b)
}
