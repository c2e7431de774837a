// Command mapproxy-renderd renders map tiles in the background for MapProxy: a priority
// queue in front of long-lived render subprocesses, speaking MapProxy 1.15's renderd HTTP
// protocol and a native newline-delimited JSON protocol on the same sockets.
//
// # Map of the package
//
// Who owns what (one flat package; one file per concern):
//   - main.go: the thin main, run(ctx, args, stdout, stderr), the daemon's lifecycle
//     (start, SIGHUP reload, ordered shutdown) and the listeners it binds.
//   - config.go: renderd.yaml and the flags: defaults, parsing, Validate naming the bad key.
//   - proto.go, fastparse.go: the native protocol's requests and replies (fastparse is the
//     reflection-free hot path, checked against encoding/json by fuzzing).
//   - queue.go: the heap, the job table (dedup), the seed's capacity rule, and running counts
//     per priority (jobs, oldest job) so that nothing walks the queue. No goroutines.
//   - scheduler.go: the scheduler goroutine, the one owner of queue.go's state, the renderers'
//     states and the counters. Everyone else talks to it through its channels.
//   - worker.go: the renderer pool: one goroutine per renderer slot owns its subprocess.
//   - server.go: listeners, HTTP/NDJSON sniffing, one goroutine pair per NDJSON connection.
//   - http.go: the HTTP routes, MapProxy 1.15's renderd protocol among them.
//   - health.go: GET /healthz and the native health command: may this daemon be sent work now.
//   - cluster.go: MapProxy's request id (sha1 of a Python repr), the key HAProxy hashes to
//     split metatiles across hosts (examples/cluster, DESIGN §15).
//   - client.go: the client subcommands (request, status) and how they reach the daemon.
//   - tasks.go: tasks (DESIGN §10): the task manager (task table, API) and one goroutine per
//     task that reads its source with back-pressure and feeds the scheduler as a client does.
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
//   - live.go, nice.go, prefetch.go (DESIGN §13): wait_ms and pending, the live keys of
//     renderd.yaml; renderer CPU and I/O priority for seed jobs; next-zoom prefetch.
//   - views.go (DESIGN §18): the views command, the recent-views table per cache, and
//     prefetch.area views (next-zoom metatiles chosen from views within prefetch.budget).
//   - picture.go: the status page's pictures: per running task its metatiles at its zoom,
//     and a heat map of views and live renders (SVG, drawn on the server).
//   - module.go, python/mapproxy_renderd.py: the MapProxy-side module, embedded, and the
//     install-module subcommand that writes it out (enable_views(): a reporter thread per
//     process that sends the served tiles as views commands).
//   - systemd.go, peercred.go: socket activation, sd_notify, peer credentials.
//   - check.go: check-config's MapProxy check (the bundled worker's check mode).
//   - packaging/: the Debian package (build-deb.sh, the man page mapproxy-renderd.8, the
//     packaged renderd.yaml, maintainer scripts); deb_test.go builds, installs and purges it,
//     man_test.go keeps the man page and README's key table in step with Config.
//   - worker/mapproxy_worker.py (embedded as bundledWorker): the bundled renderer, and in
//     "plan" mode the planner that walks seed.yaml tasks with MapProxy's own seed code.
//   - expire.go: expiry lists (z/x/y) parsed and propagated to metatiles; pure functions.
//   - expiretask.go: expiry runs as tasks: the expire command, POST /expire, the expire CLI,
//     the expire_dir spool, the list store and the task source reading a stored list.
//   - journal.go: the append-only journal (group commit, CRC-framed records, compaction,
//     replay) and the re-queueing of journaled background jobs at start.
//   - journaltask.go: tasks in the journal: specs, checkpointed cursors, ends, resumption.
//
// Goroutines and their owners: run owns the scheduler goroutine, the task manager and the
// server; the scheduler owns the renderer goroutines (and waits for them before it returns);
// the task manager owns the task goroutines and the schedule loop (shutdown cancels and waits
// for them; each task owns its planner and the planner's reader goroutine); the server owns
// its accept loops and connection goroutines (shutdown waits for them). The task manager also
// owns the expire_dir spool watcher; each task owns its source's goroutine (a planner's
// reader, an expiry list's expander). run owns the journal, whose writer goroutine it closes
// after the scheduler has stopped. A wait_ms timer is a time.AfterFunc whose goroutine ends
// when its message is sent or the scheduler exits. Views (views.go) start no goroutine: a connection hands
// a batch to the scheduler's viewsIn without waiting (dropped when it is full). Tasks never touch the queue: they submit
// requests and take replies like any client. Every wait on a child process is bounded
// (SIGTERM, then SIGKILL).
package main
