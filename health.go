// SPDX-License-Identifier: Apache-2.0

package main

import (
	"net/http"
	"strconv"
)

// health is whether the daemon should be sent work now (docs/design.md §15): a load balancer's
// health check asks GET /healthz, a script the native command "health".
type health struct {
	ok       bool
	reason   string // why not, when !ok
	degraded string // when ok: what does not work (the journal), see journalfail.go
}

// healthNow is the scheduler's side of the answer; it runs on the scheduler goroutine.
// Ready means able to take a job now or after its current one: started and not being
// retired. A renderer busy with a job counts as ready, so a loaded daemon stays healthy.
func (s *scheduler) healthNow() health {
	if s.stopping {
		return health{reason: "stopping"}
	}
	rc := s.countRenderers()
	ready, total := rc.activeReady, rc.active
	switch {
	case s.startupPending > 0:
		return health{reason: "starting: " + strconv.Itoa(ready) + " of " + strconv.Itoa(total) + " renderers ready"}
	case s.allFailing():
		return health{reason: "every renderer fails to start: " + truncate(s.lastStartErr, 300)}
	case ready == 0:
		return health{reason: "no renderer ready: " + strconv.Itoa(total) + " restarting"}
	}
	if s.journal != nil {
		if err := s.journal.failure(); err != nil {
			return health{ok: true, degraded: "journal cannot write; durable work is refused: " + truncate(err.Error(), 300)}
		}
	}
	return health{ok: true}
}

// health asks the scheduler goroutine for healthNow. A stopped scheduler is "stopping".
func (s *scheduler) health() health {
	h, ok := ask(s, (*scheduler).healthNow)
	if !ok {
		return health{reason: "stopping"}
	}
	return h
}

// health is the daemon's answer: not ok before the server opens (renderers still starting),
// after it closes its listeners (stopping), or whenever the scheduler says so.
func (s *server) health() health {
	if s.isClosing() {
		return health{reason: "stopping"}
	}
	h := s.sched.health()
	if h.ok && !s.isOpen() {
		return health{reason: "starting"}
	}
	return h
}

func (h health) reply(id *string) Reply {
	if h.ok {
		return Reply{ID: id, Status: statusOK, Degraded: h.degraded}
	}
	return errorReply(id, "not ready: "+h.reason)
}

// serveHealthz is GET /healthz, for load balancers (HAProxy's option httpchk): 200
// {"status":"ok"} while the daemon takes work, else 503 with the reason in error_message.
// A journal that cannot write leaves it 200, since live requests are served, with
// "degraded" saying why durable work is refused.
// It is answered at once, also while the renderers are still starting.
func (s *server) serveHealthz(w http.ResponseWriter, r *http.Request) {
	h := s.health()
	code := http.StatusOK
	if !h.ok {
		code = http.StatusServiceUnavailable
	}
	w.Header().Set("Cache-Control", "no-store")
	writeJSON(w, code, h.reply(nil))
}
