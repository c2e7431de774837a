// SPDX-License-Identifier: Apache-2.0

package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"gopkg.in/yaml.v3"
)

// Tasks (docs/design.md §10): long-running background work the daemon owns. A task feeds jobs into
// the one queue exactly as a client does: one waited-for tile request per metatile, at the
// task's priority, submitted to the scheduler. Dedup with live requests, promotion and the
// seed's capacity rule therefore apply unchanged, and the scheduler stays the one owner of
// the queue. Each task has one goroutine (run) that owns its source, its outstanding
// requests and its retries; the task manager owns the task table and the schedules.

const (
	maxTaskErrors      = 20   // errors kept per task (the first ones)
	keptFinishedTasks  = 100  // finished tasks listed by `tasks`; older ones are forgotten
	failureWindow      = 1000 // the failure ratio is taken over this many last metatiles
	failureMinSample   = 100  // ... once this many have finished (and over all at the end)
	rateWindowSeconds  = 60
	maxRetryBackoff    = 5 * time.Minute
	busyRetryDelay     = time.Second // queue full: try again after this, not counted as a failure
	taskStatePlanning  = "planning"
	taskStateQueued    = "queued"
	taskStateRunning   = "running"
	taskStateDone      = "done"
	taskStateFailed    = "failed"
	taskStateCancelled = "cancelled"
)

// taskSpec is what a task does. Its JSON form is the planner's stdin line.
type taskSpec struct {
	Kind       string          `json:"kind"` // seed | cleanup
	Name       string          `json:"name,omitempty"`
	SeedConfig string          `json:"seed_config,omitempty"`
	Inline     json.RawMessage `json:"inline,omitempty"`
	Cursor     json.RawMessage `json:"cursor,omitempty"`
	// Resolved is the planner's resolved line (taskresolve.go): the entry as MapProxy
	// resolved it at the task's start. With it the planner ignores SeedConfig, Name and
	// Inline, so a resumed task walks exactly what it started to walk.
	Resolved json.RawMessage `json:"resolved,omitempty"`

	priority  int
	scheduled bool
	// A resumed task's journaled figures (taskstore.go): set by resumeJournaled.
	resumed      bool
	resumeCounts *taskCounted
	created      string
	rate         float64 // metatiles per second; 0: unlimited (docs/design.md §17)
}

// taskError is one failed metatile (or a task-level error without a tile).
type taskError struct {
	Tile            []int32 `json:"tile,omitempty"`
	CacheIdentifier string  `json:"cache_identifier,omitempty"`
	Message         string  `json:"message"`
}

// taskDoc is the task document (docs/design.md §10).
type taskDoc struct {
	TaskID        string      `json:"task_id"`
	Name          string      `json:"name"`
	Kind          string      `json:"kind"`
	State         string      `json:"state"`
	Priority      int         `json:"priority"`
	Rate          float64     `json:"rate,omitempty"`           // metatiles per second; absent: unlimited
	EffectiveRate float64     `json:"effective_rate,omitempty"` // what the limiter allows now (backoff, background_rate)
	HeldJobs      int64       `json:"held_jobs,omitempty"`      // jobs the limiter holds in the queue
	Planned       uint64      `json:"planned"`
	Done          uint64      `json:"done"`
	Skipped       uint64      `json:"skipped"`
	Failed        uint64      `json:"failed"`
	Deleted       uint64      `json:"deleted"`
	Retried       uint64      `json:"retried"`
	Queued        int         `json:"queued"`         // requests outstanding in the daemon's queue
	Progress      float64     `json:"progress"`       // fraction of the walk done (planner)
	TotalEstimate uint64      `json:"total_estimate"` // metatiles the whole walk will plan, estimated
	RatePerS      float64     `json:"rate_per_s"`     // finished metatiles per second, last minute
	EtaS          *float64    `json:"eta_s"`
	Created       string      `json:"created"`
	Started       string      `json:"started,omitempty"`
	Finished      string      `json:"finished,omitempty"`
	Errors        []taskError `json:"errors"`
	// Expiry runs (docs/design.md §11): lines of the list read, bad lines, the first bad ones.
	Lines      int64             `json:"lines,omitempty"`
	BadLines   int64             `json:"bad_lines,omitempty"`
	LineErrors []expireLineError `json:"line_errors,omitempty"`
	Reason     string            `json:"reason,omitempty"`
	Scheduled  bool              `json:"scheduled,omitempty"`
	NextRun    string            `json:"next_run,omitempty"`
}

// finished reports whether the task has ended.
func (d *taskDoc) finished() bool {
	return d.State == taskStateDone || d.State == taskStateFailed || d.State == taskStateCancelled
}

// taskSettings are the configuration a task runs with, fixed at its start.
type taskSettings struct {
	window       int
	retries      int
	backoff      time.Duration
	maxFailRatio float64
}

// taskManager owns the task table and the schedules. Its methods are safe for concurrent
// use (the API calls them from connection goroutines); each task's progress is written by
// the task's own goroutine under the task's lock.
type taskManager struct {
	log   *slog.Logger
	sched *scheduler

	ctx  context.Context // cancelled by stop: every task ends
	stop context.CancelFunc
	wg   sync.WaitGroup // task goroutines and the schedule loop

	mu         sync.Mutex
	cfg        Config
	plannerCmd []string
	plannerEnv []string
	tasks      map[string]*task
	order      []*task // creation order
	nextID     int
	stopping   bool
	running    int     // tasks whose goroutine runs (at most max_tasks)
	waiting    []*task // queued for a free max_tasks slot, oldest first
	schedules  *scheduleLoop
	forgotten  taskCounts // figures of the finished tasks forgetOld dropped (metrics)

	// Set by run before start (docs/design.md §12): the journal (nil: off) keeps task specs, cursors and
	// ends; lists keeps expiry lists until their task ends.
	journal *journal
	lists   *listStore
}

// newTaskManager makes the manager; plannerArgv is the planner command (the bundled worker's
// plan mode unless planner_command is set), plannerEnv what it gets beyond the daemon's
// environment. start begins the schedules.
func newTaskManager(cfg Config, sched *scheduler, plannerArgv, plannerEnv []string, log *slog.Logger) *taskManager {
	ctx, cancel := context.WithCancel(context.Background())
	m := &taskManager{log: log, sched: sched, ctx: ctx, stop: cancel, cfg: cfg,
		plannerCmd: plannerArgv, plannerEnv: plannerEnv, tasks: make(map[string]*task)}
	m.schedules = newScheduleLoop(m.startScheduled)
	m.schedules.set(cfg.Schedules)
	return m
}

// start runs the schedule loop until shutdown.
func (m *taskManager) start() {
	m.wg.Add(1)
	go func() {
		defer m.wg.Done()
		m.schedules.run(m.ctx)
	}()
	m.startSpool()
}

// shutdown cancels every running task (their queued jobs are dropped unless someone else
// waits for them; running renders finish) and waits for the task goroutines and planners.
func (m *taskManager) shutdown() {
	m.mu.Lock()
	m.stopping = true
	for _, t := range slices.Clone(m.waiting) {
		m.dequeue(t, reasonShutdown) // resumed at the next start, as a running one is
	}
	for _, t := range m.order {
		t.stop(reasonShutdown)
	}
	m.mu.Unlock()
	m.stop()
	m.wg.Wait()
}

// reload takes a new configuration: schedules at once; planner and window settings for
// tasks started from now on.
func (m *taskManager) reload(cfg Config, plannerArgv, plannerEnv []string) {
	m.mu.Lock()
	m.cfg = cfg
	m.plannerCmd, m.plannerEnv = plannerArgv, plannerEnv
	m.launchWaiting() // max_tasks may have grown
	m.mu.Unlock()
	m.schedules.set(cfg.Schedules)
}

// errNoTask and errTaskConflict are cancelTask's failures: no such task, or it has ended.
var (
	errNoTask       = errors.New("no such task")
	errTaskConflict = errors.New("task already ended")
)

// specFor turns a seed command into a spec: a named entry of seed_config (kind from
// the section it is in) or an inline seed.
func (m *taskManager) specFor(req Request) (taskSpec, error) {
	m.mu.Lock()
	cfg := m.cfg
	m.mu.Unlock()
	spec := taskSpec{SeedConfig: cfg.SeedConfig, priority: cfg.SeedPriority}
	if req.SeedConfig != "" {
		// A request names one of the files renderd.yaml lists (by its name, or by the path
		// renderd.yaml gives it: a lookup, never a file the request makes the daemon open).
		p, ok := lookupSeedConfig(cfg, req.SeedConfig)
		if !ok {
			return spec, fmt.Errorf("seed_config: no seed configuration %q in renderd.yaml's seed_configs (it has: %v); a request names one by its name or by the path renderd.yaml gives it",
				truncate(req.SeedConfig, 64), slices.Sorted(maps.Keys(cfg.SeedConfigs)))
		}
		spec.SeedConfig = p
	}
	if req.PrioritySet {
		spec.priority = req.Priority
	}
	spec.rate = req.Rate
	if req.Seed != nil {
		var inline struct {
			Cache string `json:"cache"`
		}
		if err := json.Unmarshal(req.Seed, &inline); err != nil || inline.Cache == "" {
			return spec, errors.New(`inline seed: "cache" (a cache name of mapproxy.yaml) is required`)
		}
		spec.Kind, spec.Name, spec.Inline = "seed", "inline:"+inline.Cache, req.Seed
		return spec, nil
	}
	if spec.SeedConfig == "" {
		return spec, errors.New("no seed configuration: set seed_config in renderd.yaml, start the daemon with -s seed.yaml, or send seed_config naming one of seed_configs")
	}
	kind, err := seedEntryKind(spec.SeedConfig, req.Task)
	if err != nil {
		return spec, err
	}
	spec.Kind, spec.Name = kind, req.Task
	return spec, nil
}

// seedEntryKind finds name in seed.yaml: "seed" under seeds:, "cleanup" under cleanups:
// (seeds: first, as a name can stand in both).
func seedEntryKind(path, name string) (string, error) {
	data, err := readRegular(path, maxConfigFileBytes)
	if err != nil {
		return "", fmt.Errorf("seed_config: %w", err)
	}
	var doc struct {
		Seeds    map[string]yaml.Node `yaml:"seeds"`
		Cleanups map[string]yaml.Node `yaml:"cleanups"`
	}
	if err := yaml.Unmarshal(data, &doc); err != nil {
		// The reply goes to a client: where, not what (yaml.v3 quotes the file's bytes).
		return "", fmt.Errorf("seed_config %s: %w", path, yamlErrorWithoutBytes(err))
	}
	if _, ok := doc.Seeds[name]; ok {
		return "seed", nil
	}
	if _, ok := doc.Cleanups[name]; ok {
		return "cleanup", nil
	}
	names := make([]string, 0, len(doc.Seeds)+len(doc.Cleanups))
	for n := range doc.Seeds {
		names = append(names, n)
	}
	for n := range doc.Cleanups {
		names = append(names, n)
	}
	slices.Sort(names)
	return "", fmt.Errorf("no seed or cleanup %q in %s (it has: %v)", truncate(name, 64), path, names)
}

// checkSeedNames checks that seed_config can be read and names every scheduled task; it
// returns a summary for check-config.
func checkSeedNames(cfg Config) (string, error) {
	if cfg.SeedConfig == "" && len(cfg.SeedConfigs) == 0 {
		return "no seed_config", nil
	}
	for i, s := range cfg.Schedules {
		if _, err := seedEntryKind(cfg.SeedConfig, s.Task); err != nil {
			return "", fmt.Errorf("schedules[%d].task: %w", i, err)
		}
	}
	if cfg.SeedConfig != "" {
		if _, err := seedEntryKind(cfg.SeedConfig, ""); err != nil && !strings.HasPrefix(err.Error(), "no seed or cleanup") {
			return "", err
		}
	}
	for _, name := range slices.Sorted(maps.Keys(cfg.SeedConfigs)) {
		if _, err := seedEntryKind(cfg.SeedConfigs[name], ""); err != nil && !strings.HasPrefix(err.Error(), "no seed or cleanup") {
			return "", fmt.Errorf("seed_configs.%s: %w", name, err)
		}
	}
	return fmt.Sprintf("seed_config %s, %d more seed_configs, %d schedules", cfg.SeedConfig, len(cfg.SeedConfigs), len(cfg.Schedules)), nil
}

// startTask creates a task for spec and starts it.
func (m *taskManager) startTask(spec taskSpec) (taskDoc, error) {
	return m.startTaskAs("", spec)
}

// startTaskAs is startTask; a non-empty id resumes a journaled task under its old id.
// A new task is in the journal before it is reported started. m.mu is not held across the
// journal's fsync, the planner's start or the expiry source's question to the scheduler:
// the task joins the table once its source runs.
func (m *taskManager) startTaskAs(id string, spec taskSpec) (taskDoc, error) {
	m.mu.Lock()
	if m.stopping {
		m.mu.Unlock()
		return taskDoc{}, errors.New("daemon is shutting down")
	}
	if len(m.plannerCmd) == 0 && spec.Kind != "expire" {
		m.mu.Unlock()
		return taskDoc{}, errors.New("seeding needs mapproxy_config (-f) or planner_command")
	}
	resumed := id != ""
	if !resumed && len(m.waiting) >= maxWaitingTasks {
		n, running := len(m.waiting), m.running
		m.mu.Unlock()
		return taskDoc{}, fmt.Errorf("task not started: %d tasks are already queued behind max_tasks (%d running); try again later", n, running)
	}
	if !resumed {
		m.nextID++
		id = "t" + strconv.Itoa(m.nextID)
		spec.created = time.Now().Format(time.RFC3339)
	}
	cfg := m.cfg
	m.mu.Unlock()
	if !resumed && m.journal != nil {
		// The id is not reused when this fails: a later task may have taken the next one.
		m.journal.taskNumber(uint64(taskNumberOf(id)))
		if err := m.journal.addTask(id, marshalJournaledSpec(spec)); err != nil {
			return taskDoc{}, fmt.Errorf("task not started: %w", err)
		}
	}
	t := newTask(m, id, spec, taskSettings{
		window: cfg.SeedWindow, retries: cfg.SeedRetries,
		backoff: time.Duration(cfg.SeedRetryBackoff), maxFailRatio: cfg.SeedMaxFailureRatio,
	})
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.stopping {
		// Shutdown began meanwhile: a journaled task resumes at the next start, as the
		// tasks shutdown cancels do.
		return taskDoc{}, errors.New("daemon is shutting down")
	}
	m.tasks[t.id] = t
	m.order = append(m.order, t)
	m.forgetOld()
	if m.running >= m.cfg.MaxTasks {
		// max_tasks run at once (each may be a planner of tens of MB); the rest wait.
		m.waiting = append(m.waiting, t)
		m.log.Info("task queued: max_tasks are running", "task", t.id, "name", spec.Name, "kind", spec.Kind, "max_tasks", m.cfg.MaxTasks)
		return t.snapshot(), nil
	}
	m.launch(t, resumed)
	return t.snapshot(), nil
}

// launch counts t as running and starts its goroutine, which opens t's source (a planner
// start or a question to the scheduler: not under m.mu), runs t, and starts the next waiting
// task when t ends. m.mu is held; shutdown, which sets stopping under it, waits for the
// goroutine, and a task it stopped before its source opened ends as shutdown ends any.
func (m *taskManager) launch(t *task, resumed bool) {
	spec := t.spec
	cfg, plannerCmd, plannerEnv := m.cfg, m.plannerCmd, m.plannerEnv
	// Expiry runs stay local: their delete jobs and forced renders have no MapProxy request
	// form to send through HAProxy (the tile cache is shared, so any host may do them).
	if cfg.Cluster != "" && spec.Kind != "expire" {
		t.cluster = newClusterRoute(cfg.Cluster, min(cfg.SeedWindow, clusterInFlight))
		t.route = t.cluster
	}
	m.running++
	m.wg.Add(1)
	go func() {
		defer m.wg.Done()
		var src taskSource
		var err error
		if spec.Kind == "expire" {
			src, err = m.openExpireSource(spec)
		} else {
			src, err = startPlanner(plannerCmd, plannerEnv, spec, m.log.With("task", t.id))
		}
		if err != nil {
			t.end(taskStateFailed, err.Error())
			close(t.ended)
		} else {
			m.log.Info("task started", "task", t.id, "name", spec.Name, "kind", spec.Kind, "priority", spec.priority, "scheduled", spec.scheduled, "resumed", resumed)
			t.run(m.ctx, src)
		}
		m.mu.Lock()
		m.running--
		m.launchWaiting()
		m.mu.Unlock()
	}()
}

// forgetOld drops the oldest finished tasks beyond keptFinishedTasks. m.mu is held.
func (m *taskManager) forgetOld() {
	finished := 0
	for _, t := range m.order {
		if t.isFinished() {
			finished++
		}
	}
	for i := 0; finished > keptFinishedTasks && i < len(m.order); {
		t := m.order[i]
		if !t.isFinished() {
			i++
			continue
		}
		if !t.restored { // counted by the daemon that ran it
			m.forgotten.add(t.snapshot())
		}
		delete(m.tasks, t.id)
		m.order = slices.Delete(m.order, i, i+1)
		finished--
	}
}

// startScheduled runs a scheduled name unless a task of that name is still running; it
// reports whether it started one.
func (m *taskManager) startScheduled(s Schedule) bool {
	name := s.Task
	m.mu.Lock()
	for _, t := range m.order {
		if t.spec.Name == name && t.spec.Inline == nil && !t.isFinished() {
			m.mu.Unlock()
			m.log.Info("scheduled task skipped: the previous run is still going", "name", name, "task", t.id)
			return false
		}
	}
	m.mu.Unlock()
	spec, err := m.specFor(Request{Task: name, Rate: s.Rate})
	if err != nil {
		m.log.Error("scheduled task could not start", "name", name, "error", err)
		return false
	}
	spec.scheduled = true
	if _, err := m.startTask(spec); err != nil {
		m.log.Error("scheduled task could not start", "name", name, "error", err)
		return false
	}
	return true
}

// list returns every task, newest first, with next_run for scheduled names.
func (m *taskManager) list() []taskDoc {
	m.mu.Lock()
	ts := slices.Clone(m.order)
	m.mu.Unlock()
	next := m.schedules.nextRuns()
	docs := make([]taskDoc, 0, len(ts))
	for i := len(ts) - 1; i >= 0; i-- {
		d := ts[i].snapshot()
		if n, ok := next[d.Name]; ok && d.Kind != "expire" {
			d.NextRun = n
		}
		docs = append(docs, d)
	}
	return docs
}

// get returns one task's document.
func (m *taskManager) get(id string) (taskDoc, bool) {
	m.mu.Lock()
	t, ok := m.tasks[id]
	m.mu.Unlock()
	if !ok {
		return taskDoc{}, false
	}
	d := t.snapshot()
	if n, ok := m.schedules.nextRuns()[d.Name]; ok {
		d.NextRun = n
	}
	return d, true
}

// cancelTask cancels a task that has not ended and returns its document once it has
// ended (its goroutine cancels its requests and stops its planner, which is bounded).
func (m *taskManager) cancelTask(id string) (taskDoc, error) {
	m.mu.Lock()
	t, ok := m.tasks[id]
	if ok && m.dequeue(t, "cancelled by request") {
		m.mu.Unlock()
		return t.snapshot(), nil
	}
	m.mu.Unlock()
	if !ok {
		return taskDoc{}, errNoTask
	}
	if !t.stop("cancelled by request") {
		return t.snapshot(), errTaskConflict
	}
	select {
	case <-t.ended:
	case <-t.stopped:
	}
	return t.snapshot(), nil
}

// handle answers the native task commands: seed, tasks, task, cancel.
func (m *taskManager) handle(req Request) Reply {
	rep := Reply{ID: req.ID, Status: statusOK}
	switch req.Command {
	case "seed":
		spec, err := m.specFor(req)
		if err != nil {
			return errorReply(req.ID, err.Error())
		}
		d, err := m.startTask(spec)
		if err != nil {
			return errorReply(req.ID, err.Error())
		}
		rep.Status = statusQueued
		rep.Task = mustJSON(d)
	case "tasks":
		rep.Tasks = mustJSON(m.list())
		rep.Schedules = mustJSON(m.schedules.docs())
	case "task":
		d, ok := m.get(req.TaskID)
		if !ok {
			return errorReply(req.ID, "no task "+strconv.Quote(truncate(req.TaskID, 64)))
		}
		rep.Task = mustJSON(d)
	case "cancel":
		d, err := m.cancelTask(req.TaskID)
		switch {
		case errors.Is(err, errNoTask):
			return errorReply(req.ID, "no task "+strconv.Quote(truncate(req.TaskID, 64)))
		case errors.Is(err, errTaskConflict):
			rep = errorReply(req.ID, "task "+d.TaskID+" already ended ("+d.State+")")
		}
		rep.Task = mustJSON(d)
	default:
		return errorReply(req.ID, "not a task command: "+req.Command)
	}
	return rep
}

func mustJSON(v any) json.RawMessage {
	b, err := json.Marshal(v)
	if err != nil {
		panic(err) // our own documents always encode
	}
	return b
}

// lookupSeedConfig finds the seed configuration a request names: a key of seed_configs, or
// the path that seed_config or an entry of seed_configs gives (as `seed -s seed.yaml` sends
// it). Anything else is not found: a request never names a file of its own.
func lookupSeedConfig(cfg Config, name string) (string, bool) {
	if p, ok := cfg.SeedConfigs[name]; ok {
		return p, true
	}
	if !filepath.IsAbs(name) {
		return "", false
	}
	name = filepath.Clean(name)
	for _, p := range append([]string{cfg.SeedConfig}, slices.Collect(maps.Values(cfg.SeedConfigs))...) {
		if p != "" && filepath.Clean(p) == name {
			return p, true
		}
	}
	return "", false
}
