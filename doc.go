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
//   - queue.go: the heap, the job table (dedup), the seed's capacity rule. No goroutines.
//   - scheduler.go: the scheduler goroutine, the one owner of queue.go's state, the renderers'
//     states and the counters. Everyone else talks to it through its channels.
//   - worker.go: the renderer pool: one goroutine per renderer slot owns its subprocess.
//   - server.go: listeners, HTTP/NDJSON sniffing, one goroutine pair per NDJSON connection.
//   - http.go: the HTTP routes, MapProxy 1.15's renderd protocol among them.
//   - client.go: the client subcommands (request, status).
//   - stats.go: the status document.
//   - systemd.go, peercred.go: socket activation, sd_notify, peer credentials.
//
// Goroutines and their owners: run owns the scheduler goroutine and the server; the scheduler
// owns the renderer goroutines (and waits for them before it returns); the server owns its
// accept loops and connection goroutines (shutdown waits for them). Every wait on a child
// process is bounded (SIGTERM, then SIGKILL).
package main
