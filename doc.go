// SPDX-License-Identifier: Apache-2.0

// Command mapproxy-renderd renders map tiles in the background for MapProxy: a priority
// queue in front of long-lived render subprocesses, speaking MapProxy 1.15's renderd HTTP
// protocol and a native newline-delimited JSON protocol on the same sockets.
//
// The design (the contract with clients, renderers and operators) is docs/design.md; the
// code cites its sections as "docs/design.md §n".
//
// # Map of the package
//
// Who owns what (one flat package; one file per concern):
//   - main.go: the thin main, run(ctx, args, stdout, stderr), the daemon's lifecycle
//     (start, SIGHUP reload, ordered shutdown) and the listeners it binds.
//   - config.go: renderd.yaml and the flags: defaults, parsing, Validate naming the bad key.
//   - configerr.go: yaml.v3's decoding errors rewritten to name the key (unknown keys with a
//     "did you mean", type errors with the key path and line).
//   - proto.go, fastparse.go: the native protocol's requests and replies (fastparse is the
//     reflection-free hot path, checked against encoding/json by fuzzing).
//   - queue.go: the heap, the job table (dedup), the seed's capacity rule, and running counts
//     per priority (jobs, oldest job) so that nothing walks the queue. No goroutines.
//   - scheduler.go: the scheduler goroutine, the one owner of queue.go's state, the renderers'
//     states and the counters. Everyone else talks to it through its channel: typed messages
//     where order matters (submit, cancel, due, reload) and ask[T] for every query.
//   - slots.go: the scheduler's side of the renderers (run by its goroutine alone): a slot
//     per renderer, renderer events, a finished job, and countRenderers, the one count of
//     renderer states that the summary line, health, the status document and metrics read.
//   - worker.go: the renderer pool: one goroutine per renderer slot owns its subprocess.
//   - proc.go: the one way children are started and stopped (renderers, planners, the
//     MapProxy check): own process group, Pdeathsig from the spawner's locked thread, the
//     reaper process that ends their groups when the daemon dies, SIGTERM → SIGKILL, stderr tail.
//   - server.go: listeners, admission (peer rule, connection slots), HTTP/NDJSON sniffing
//     with a first-line deadline, ordered shutdown.
//   - ndjson.go: one NDJSON connection: its reader and writer goroutines, replies counted
//     against the in-flight limit, a client that vanishes.
//   - router.go: the command router: one function answers a parsed request for both
//     protocols (NDJSON and HTTP POST), and one turns a request error into its reply.
//   - http.go: the HTTP routes, MapProxy 1.15's renderd protocol among them.
//   - health.go: GET /healthz and the native health command: may this daemon be sent work now.
//   - cluster.go: MapProxy's request id (sha1 of a Python repr), the key HAProxy hashes to
//     split metatiles across hosts (examples/cluster, docs/design.md §15).
//   - client.go: the client subcommands (request, status) and how they reach the daemon.
//   - tasks.go: tasks (docs/design.md §10): the task manager (task table, start, max_tasks,
//     cancel, the seed command), which owns one goroutine per task.
//   - task.go: one task's goroutine: reads its source with back-pressure, feeds the scheduler
//     as a client does, retries, counts, ends.
//   - planner.go: a task's source when it is a planner subprocess (MapProxy's seed code in the
//     bundled worker's plan mode).
//   - schedules.go: the schedule loop (renderd.yaml schedules:), owned by the task manager.
//   - taskapi.go: the task API over HTTP and the seed, tasks, task and cancel subcommands.
//   - stats.go: the status document.
//   - metrics.go: GET /metrics (Prometheus text, by hand) and the counters behind it that the
//     scheduler owns (requests by protocol/class/result, histograms, renders by cache and
//     zoom, restarts, the one-second history ring); a scrape gets a snapshot through the
//     scheduler's channel.
//   - metrics_tasks.go: task totals and gauges for metrics and the status document.
//   - page.go, page.html: the status page, GET / (html/template, SVG sparklines, no JS).
//   - top.go: the top subcommand, a live terminal view of the status document.
//   - live.go, nice.go, prefetch.go (docs/design.md §13): wait_ms and pending, the live keys of
//     renderd.yaml; renderer CPU and I/O priority for seed jobs; next-zoom prefetch.
//   - views.go (docs/design.md §18): the views command, the recent-views table per cache, and
//     prefetch.area views (next-zoom metatiles chosen from views within prefetch.budget).
//   - picture.go: the status page's pictures: per running task its metatiles at its zoom,
//     and a heat map of views and live renders (SVG, drawn on the server).
//   - module.go, python/mapproxy_renderd.py: the MapProxy-side module, embedded, and the
//     install-module subcommand that writes it out (enable_views(): a reporter thread per
//     process that sends the served tiles as views commands).
//   - systemd.go, peercred.go, peercred_diag.go: socket activation, sd_notify, peer
//     credentials (sock_diag for loopback TCP) and who may connect (README "Security").
//   - safefile.go: the one way the daemon reads a file its configuration names: regular
//     files only, opened without blocking on a FIFO, with a size cap; YAML errors without
//     the file's bytes. No request names a file.
//   - clientio.go: request bodies with a size cap and a deadline (client_timeout).
//   - taskqueue.go: max_tasks (tasks beyond it wait queued) and a task's reply mailbox.
//   - check.go: check-config's MapProxy check (the bundled worker's check mode: MapProxy's
//     warnings, the caches for prefetch.caches), the state_dir probe, and the same check run
//     in the background at daemon start to log MapProxy's warnings.
//   - packaging/: the Debian package (build-deb.sh, the man page mapproxy-renderd.8, the
//     packaged renderd.yaml, maintainer scripts); deb_test.go builds, installs and purges it,
//     man_test.go keeps the man page and README's key table in step with Config.
//     packaging/deploy-test/ boots Debian 12 and 13 with systemd-nspawn and follows README's
//     production section there (deploy_test.go runs it; haproxy-from-root runs trixie's
//     HAProxy 3.0 for the cluster tests).
//   - worker/mapproxy_worker.py (embedded as bundledWorker): the bundled renderer, and in
//     "plan" mode the planner that walks seed.yaml tasks with MapProxy's own seed code.
//   - expire.go: expiry lists (z/x/y) parsed and propagated to metatiles; pure functions.
//   - expiretask.go: expiry runs as tasks: the expire command, POST /expire, the expire CLI,
//     the expire_dir spool, the list store and the task source reading a stored list.
//   - spool.go: what becomes of a spooled list: removed only when its task is done or
//     cancelled; put back when its task cannot start, <file>.rejected when it fails.
//   - journal.go: the append-only journal's writer: open, group commit (one write and one
//     fdatasync per batch, run by its writer goroutine), compaction, the append API.
//   - journalrec.go: the record format: framing (length, CRC-32C), record types, encoder and
//     decoder. No state.
//   - journalstate.go: the live state (jobs not done, tasks not ended), replay of a file into
//     it, apply (the one place that changes it), snapshots copied under the lock.
//   - replay.go: opening the journal the configuration asks for, and re-queueing journaled
//     background jobs at start, whatever max_queued (accepted work is owed).
//   - journalfail.go: a journal that cannot write (full or failing state_dir): it fails
//     instead of the daemon, refuses durable work, retries a snapshot until it recovers;
//     a damaged file is set aside whatever the damage.
//   - journaltask.go: tasks in the journal: specs, checkpointed cursors, ends, resumption.
//   - taskresolve.go: a task's resolved spec (the planner's resolved line), journaled before
//     its first metatile so that a resumed task walks what it started to walk.
//   - taskstore.go: what survives a restart besides specs and cursors: the task number,
//     the last finished tasks' documents, a checkpoint's counts.
//   - cliflags.go: the command line's shared rules: flags anywhere (parseArgs), -s is
//     seed.yaml, --socket and --http (one parser) reach the daemon.
//   - workerfile.go: where the bundled worker is written (content-addressed, reused).
//   - taskdrain.go: a cancelled task counts the renders running at the cancel.
//   - ratelimit.go (docs/design.md §17): the background rate limiter: token buckets per cache
//     (background_rate, AIMD backoff on upstream 429/503/timeouts) and per task (rate) that
//     hold jobs in the queue (a held job sits in its bucket's heap, still queued); pure
//     bucket logic with the clock passed in, and the scheduler's hooks (nextJob in dispatch,
//     armRateTimer, rateFinished, rateTick). ratestatus.go: the limiter in the status
//     document, /metrics and top.
//
// Goroutines and their owners: run owns the scheduler goroutine, the task manager and the
// server; the scheduler owns the renderer goroutines (and waits for them before it returns);
// the task manager owns the task goroutines and the schedule loop (shutdown cancels and waits
// for them; each task owns its planner and the planner's reader goroutine); the server owns
// its accept loops and connection goroutines (shutdown waits for them). The task manager also
// owns the expire_dir spool watcher; each task owns its source's goroutine (a planner's
// reader, an expiry list's expander). run owns the journal, whose writer goroutine it closes
// after the scheduler has stopped. A wait_ms timer is a time.AfterFunc whose goroutine ends
// when its message is sent or the scheduler exits. The rate limiter's wake-up is one time.Timer the
// scheduler owns and selects on (no goroutine). Views (views.go) start no goroutine: a connection hands a batch to the
// scheduler's viewsIn without waiting (dropped when it is full). Tasks never touch the queue: they submit
// requests and take replies like any client. Every wait on a child process is bounded
// (SIGTERM, then SIGKILL). Two goroutines live as long as the process, by design (proc.go):
// the spawner, whose locked thread forks every child so that Pdeathsig fires only when the
// daemon dies, and the one that waits for the reaper process.
package main
