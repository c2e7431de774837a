package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// The task API over HTTP (DESIGN §10): POST /tasks (body: the native seed command without
// "command"), GET /tasks, GET /tasks/{id}, DELETE /tasks/{id}. Bodies are the native replies.

func (s *server) serveStartTask(w http.ResponseWriter, r *http.Request) {
	maxLine := s.limits.Load().maxLine
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, int64(maxLine)))
	if err != nil {
		writeJSON(w, http.StatusBadRequest, errorReply(nil, "invalid request: "+err.Error()))
		return
	}
	body = bytes.TrimSpace(body)
	if len(body) < 2 || body[0] != '{' {
		writeJSON(w, http.StatusBadRequest, errorReply(nil, `invalid request: want a JSON object such as {"task": "NAME"}`))
		return
	}
	line := []byte(`{"command":"seed"`)
	if rest := bytes.TrimSpace(body[1:]); len(rest) > 0 && rest[0] != '}' {
		line = append(line, ',')
	}
	line = append(line, body[1:]...)
	req, err := parseRequest(line)
	if err == nil && req.Command != "seed" {
		err = &requestError{id: req.ID, msg: `invalid request: "command" does not belong in POST /tasks`}
	}
	if err != nil {
		var re *requestError
		if errors.As(err, &re) {
			writeJSON(w, http.StatusBadRequest, errorReply(re.id, re.msg))
		} else {
			writeJSON(w, http.StatusBadRequest, errorReply(nil, "invalid request: "+err.Error()))
		}
		return
	}
	rep := s.tasks.handle(req)
	code := http.StatusCreated
	if rep.Status == statusError {
		code = http.StatusBadRequest
	}
	writeJSON(w, code, rep)
}

func (s *server) serveTasks(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("id")
	if id == "" {
		writeJSON(w, http.StatusOK, s.tasks.handle(Request{Command: "tasks"}))
		return
	}
	rep := s.tasks.handle(Request{Command: "task", TaskID: id})
	code := http.StatusOK
	if rep.Status == statusError {
		code = http.StatusNotFound
	}
	writeJSON(w, code, rep)
}

func (s *server) serveCancelTask(w http.ResponseWriter, r *http.Request) {
	rep := s.tasks.handle(Request{Command: "cancel", TaskID: r.PathValue("id")})
	code := http.StatusOK
	switch {
	case rep.Status == statusError && rep.Task == nil:
		code = http.StatusNotFound
	case rep.Status == statusError:
		code = http.StatusConflict
	}
	writeJSON(w, code, rep)
}

// runTaskClient implements `seed`, `tasks`, `task` and `cancel`.
//
//	seed [-s seed.yaml] [--priority P] [--rate R] [--wait] NAME…   start seed.yaml entries (seeds: or cleanups:)
//	tasks [--json]                                        list tasks and schedules
//	task ID                                               one task's document
//	cancel ID                                             cancel a task
//
// With --wait, seed waits for its tasks to end, drawing a progress bar on a terminal, and
// exits 0 only if every task is done (1 when one failed or was cancelled).
func runTaskClient(ctx context.Context, cmd string, args []string, stdout, stderr io.Writer) error {
	var cl clientFlags
	fs := newFlagSet(cmd, stderr)
	cl.register(fs, cmd != "seed")
	seedPath := ""
	priority := -1
	rate := 0.0
	wait, asJSON := false, false
	switch cmd {
	case "seed":
		fs.StringVar(&seedPath, "s", "", "MapProxy seed configuration (default: the daemon's seed_config)")
		fs.IntVar(&priority, "priority", -1, "priority of the task's jobs (default: the daemon's seed_priority)")
		fs.Float64Var(&rate, "rate", 0, "metatiles per second at most (default: unlimited)")
		fs.BoolVar(&wait, "wait", false, "wait until the tasks end, showing progress")
	case "tasks":
		fs.BoolVar(&asJSON, "json", false, "print the JSON reply")
	}
	if err := fs.Parse(args); err != nil {
		return err
	}
	network, addr, err := cl.address()
	if err != nil {
		return err
	}
	// --timeout bounds each exchange, not the wait: a seed may run for hours.
	call := func(line []byte) (Reply, []byte, error) {
		ctx, cancel := context.WithTimeout(ctx, cl.timeout)
		defer cancel()
		return exchange(ctx, network, addr, line)
	}

	switch cmd {
	case "tasks":
		if fs.NArg() > 0 {
			return errors.New("tasks takes no arguments")
		}
		rep, raw, err := call([]byte(`{"command":"tasks","id":"cli"}`))
		if err != nil {
			return err
		}
		if asJSON || rep.Status != statusOK {
			stdout.Write(raw)
			return exitStatus(rep)
		}
		return printTaskTable(stdout, rep)
	case "task", "cancel":
		if fs.NArg() != 1 {
			return fmt.Errorf("%s takes one task id", cmd)
		}
		line, _ := json.Marshal(map[string]string{"command": cmd, "id": "cli", "task_id": fs.Arg(0)})
		rep, raw, err := call(line)
		if err != nil {
			return err
		}
		stdout.Write(raw)
		return exitStatus(rep)
	}
	// seed
	if fs.NArg() == 0 {
		return errors.New("seed needs at least one NAME (a seeds: or cleanups: entry of seed.yaml)")
	}
	if seedPath != "" {
		if seedPath, err = filepath.Abs(seedPath); err != nil {
			return err
		}
	}
	var ids []string
	failed := false
	for _, name := range fs.Args() {
		msg := map[string]any{"command": "seed", "id": "cli", "task": name}
		if seedPath != "" {
			msg["seed_config"] = seedPath
		}
		if priority >= 0 {
			msg["priority"] = priority
		}
		if rate != 0 {
			msg["rate"] = rate
		}
		line, _ := json.Marshal(msg)
		rep, raw, err := call(line)
		if err != nil {
			return err
		}
		if rep.Status != statusQueued {
			fmt.Fprintf(stderr, "seed %s: %s\n", name, rep.ErrorMessage)
			failed = true
			continue
		}
		var d taskDoc
		_ = json.Unmarshal(rep.Task, &d)
		ids = append(ids, d.TaskID)
		if !wait {
			stdout.Write(raw)
		}
	}
	if wait {
		for _, id := range ids {
			d, err := waitTask(ctx, call, id, stdout)
			if err != nil {
				return err
			}
			if d.State != taskStateDone {
				failed = true
			}
		}
	}
	if failed {
		return exitCode(1)
	}
	return nil
}

// waitTask polls a task until it ends, drawing a progress line on a terminal (one line per
// state change otherwise), and returns its final document.
func waitTask(ctx context.Context, call func([]byte) (Reply, []byte, error), id string, out io.Writer) (taskDoc, error) {
	tty := isTerminal(out)
	line, _ := json.Marshal(map[string]string{"command": "task", "id": "cli", "task_id": id})
	lastState := ""
	tick := time.NewTicker(500 * time.Millisecond)
	defer tick.Stop()
	for {
		rep, _, err := call(line)
		if err != nil {
			return taskDoc{}, err
		}
		if rep.Status != statusOK {
			return taskDoc{}, fmt.Errorf("task %s: %s", id, rep.ErrorMessage)
		}
		var d taskDoc
		if err := json.Unmarshal(rep.Task, &d); err != nil {
			return taskDoc{}, err
		}
		switch {
		case tty:
			fmt.Fprintf(out, "\r\x1b[K%s", progressLine(d, 30))
			if d.finished() {
				fmt.Fprintln(out)
			}
		case d.State != lastState || d.finished():
			fmt.Fprintln(out, progressLine(d, 0))
		}
		lastState = d.State
		if d.finished() {
			if d.Reason != "" {
				fmt.Fprintf(out, "%s %s: %s\n", d.TaskID, d.State, d.Reason)
			}
			for _, e := range d.Errors {
				fmt.Fprintf(out, "  error %s %v: %s\n", e.CacheIdentifier, e.Tile, e.Message)
			}
			return d, nil
		}
		select {
		case <-tick.C:
		case <-ctx.Done():
			return d, ctx.Err()
		}
	}
}

// progressLine is "t3 initial seed running [#####-----] 120/400 metatiles 35.2/s ETA 8s";
// width 0 leaves out the bar.
func progressLine(d taskDoc, width int) string {
	var b strings.Builder
	fmt.Fprintf(&b, "%s %s %s %s", d.TaskID, d.Name, d.Kind, d.State)
	finished := d.Done + d.Skipped + d.Failed
	total := max(d.TotalEstimate, d.Planned, finished)
	if width > 0 {
		frac := 0.0
		if total > 0 {
			frac = float64(finished) / float64(total)
		}
		if d.State == taskStateDone {
			frac = 1
		}
		n := int(frac * float64(width))
		b.WriteString(" [" + strings.Repeat("#", n) + strings.Repeat("-", width-n) + "]")
	}
	if d.Kind == "cleanup" {
		fmt.Fprintf(&b, " %d tiles removed, walk %.0f%%", d.Deleted, 100*d.Progress)
		return b.String()
	}
	fmt.Fprintf(&b, " %d/%d metatiles", finished, total)
	if d.Skipped > 0 || d.Failed > 0 {
		fmt.Fprintf(&b, " (%d fresh, %d failed)", d.Skipped, d.Failed)
	}
	fmt.Fprintf(&b, " %.1f/s", d.RatePerS)
	if d.EtaS != nil {
		fmt.Fprintf(&b, " ETA %s", (time.Duration(*d.EtaS) * time.Second).Round(time.Second))
	}
	return b.String()
}

// printTaskTable prints the `tasks` reply as a table.
func printTaskTable(out io.Writer, rep Reply) error {
	var tasks []taskDoc
	var scheds []scheduleDoc
	_ = json.Unmarshal(rep.Tasks, &tasks)
	_ = json.Unmarshal(rep.Schedules, &scheds)
	fmt.Fprintf(out, "%-6s %-20s %-8s %-10s %10s %10s %8s %8s %7s %9s\n", "ID", "NAME", "KIND", "STATE", "DONE", "PLANNED", "FAILED", "RATE/S", "WALK", "ETA")
	for _, d := range tasks {
		eta := "-"
		if d.EtaS != nil {
			eta = (time.Duration(*d.EtaS) * time.Second).Round(time.Second).String()
		}
		fmt.Fprintf(out, "%-6s %-20s %-8s %-10s %10d %10d %8d %8.1f %6.0f%% %9s\n", d.TaskID, truncate(d.Name, 20), d.Kind, d.State,
			d.Done+d.Skipped, d.Planned, d.Failed, d.RatePerS, 100*d.Progress, eta)
	}
	for _, s := range scheds {
		when := "every " + s.Every
		if s.At != "" {
			when = "at " + s.At
			if s.Every != "" {
				when += " then every " + s.Every
			}
		}
		fmt.Fprintf(out, "schedule %s %s: next %s (%d runs, %d skipped)\n", s.Task, when, s.NextRun, s.Runs, s.Skipped)
	}
	return nil
}

func exitStatus(r Reply) error {
	if r.Status != statusOK && r.Status != statusQueued {
		return exitCode(1)
	}
	return nil
}

// isTerminal reports whether w is a terminal.
func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	_, err := unix.IoctlGetTermios(int(f.Fd()), unix.TCGETS)
	return err == nil
}
