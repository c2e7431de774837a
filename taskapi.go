// SPDX-License-Identifier: Apache-2.0

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
	"text/tabwriter"
	"time"

	"golang.org/x/sys/unix"
)

// The task API over HTTP (docs/design.md §10): POST /tasks (body: the native seed command without
// "command"), GET /tasks, GET /tasks/{id}, DELETE /tasks/{id}. Bodies are the native replies.

func (s *server) serveStartTask(w http.ResponseWriter, r *http.Request) {
	body, rep, ok := readBody(s.clientBody(w, r, int64(s.limits.Load().maxLine)), s.limits.Load().maxLine)
	if !ok {
		writeJSON(w, http.StatusBadRequest, rep)
		return
	}
	body = bytes.TrimSpace(body)
	if len(body) < 2 || body[0] != '{' {
		writeJSON(w, http.StatusBadRequest, errorReply(nil, `invalid request: want a JSON object such as {"task": "NAME"}`))
		return
	}
	req, err := parseCommandBody(body, "seed")
	if err == nil && req.Command != "seed" {
		err = &requestError{id: req.ID, msg: `invalid request: "command" does not belong in POST /tasks`}
	}
	if err != nil {
		writeJSON(w, http.StatusBadRequest, requestErrorReply(err))
		return
	}
	rep = s.tasks.handle(req)
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
//	seed [-s NAME|seed.yaml] [--priority P] [--rate R] [--wait] NAME…   start seed.yaml entries (seeds: or cleanups:)
//	tasks [--json]                                        list tasks and schedules
//	task ID                                               one task's document
//	cancel ID                                             cancel a task
//
// With --wait, seed waits for its tasks to end, drawing a progress bar on a terminal, and
// exits 0 only if every task is done (1 when one failed or was cancelled).
func runTaskClient(ctx context.Context, cmd string, args []string, stdout, stderr io.Writer) error {
	var cl clientFlags
	fs := newFlagSet(cmd, stderr)
	if cmd == "seed" {
		cl.register(fs, nil)
	} else {
		cl.register(fs, stderr)
	}
	seedPath := ""
	priority := -1
	rate := 0.0
	wait, asJSON := false, false
	switch cmd {
	case "seed":
		fs.Func("s", "one of the daemon's seed configurations: its `NAME` in seed_configs, or the seed.yaml path renderd.yaml gives (default: its seed_config)", func(v string) error {
			seedPath = cl.seedOrSocket(v, stderr)
			return nil
		})
		fs.IntVar(&priority, "priority", -1, "priority of the task's jobs (default: the daemon's seed_priority)")
		fs.Float64Var(&rate, "rate", 0, "metatiles per second at most (default: unlimited)")
		fs.BoolVar(&wait, "wait", false, "wait until the tasks end, showing progress")
	case "tasks":
		fs.BoolVar(&asJSON, "json", false, "print the JSON reply")
	}
	pos, err := parseArgs(fs, args)
	if err != nil {
		return err
	}
	target, err := cl.target()
	if err != nil {
		return err
	}
	// --timeout bounds each exchange, not the wait: a seed may run for hours.
	call := func(line []byte) (Reply, []byte, error) {
		ctx, cancel := context.WithTimeout(ctx, cl.timeout)
		defer cancel()
		return target.call(ctx, cmd, line)
	}

	switch cmd {
	case "tasks":
		if err := errNoArgs("tasks", pos); err != nil {
			return err
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
		if len(pos) != 1 {
			return fmt.Errorf("%s takes one task id, got %q", cmd, pos)
		}
		line, _ := json.Marshal(map[string]string{"command": cmd, "id": "cli", "task_id": pos[0]})
		rep, raw, err := call(line)
		if err != nil {
			return err
		}
		stdout.Write(raw)
		return exitStatus(rep)
	}
	// seed
	if len(pos) == 0 {
		return errors.New("seed needs at least one NAME (a seeds: or cleanups: entry of seed.yaml)")
	}
	if strings.ContainsRune(seedPath, '/') {
		// A path: the daemon finds the configuration renderd.yaml gives that path (absolute).
		if seedPath, err = filepath.Abs(seedPath); err != nil {
			return err
		}
	}
	var ids []string
	failed := false
	for _, name := range pos {
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
	// Columns as wide as their widest cell (a long name shifts nothing); DONE counts
	// metatiles rendered or found fresh, DELETED tiles a cleanup removed or metatiles an
	// expiry run deleted.
	tw := tabwriter.NewWriter(out, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "ID\tNAME\tKIND\tSTATE\tDONE\tDELETED\tPLANNED\tFAILED\tRATE/S\tWALK\tETA\t")
	for _, d := range tasks {
		eta := "-"
		if d.EtaS != nil {
			eta = (time.Duration(*d.EtaS) * time.Second).Round(time.Second).String()
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%d\t%d\t%d\t%d\t%.1f\t%.0f%%\t%s\t\n", d.TaskID, tableCell(d.Name), d.Kind, d.State,
			d.Done+d.Skipped, d.Deleted, d.Planned, d.Failed, d.RatePerS, 100*d.Progress, eta)
	}
	if err := tw.Flush(); err != nil {
		return err
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

// tableCell is a value as one table cell: no tabs or line breaks, at most 60 characters.
func tableCell(s string) string {
	s = strings.Map(func(r rune) rune {
		if r == '\t' || r == '\n' || r == '\r' {
			return ' '
		}
		return r
	}, s)
	return truncate(s, 60)
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
