// SPDX-License-Identifier: Apache-2.0

package main

import (
	"context"
	_ "embed"
	"errors"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

//go:embed worker/mapproxy_worker.py
var bundledWorker []byte

// defaultPython runs the bundled worker: Debian's python3, which has python3-mapproxy
// (a python3 earlier on PATH, say from pyenv, usually does not).
const defaultPython = "/usr/bin/python3"

func main() {
	if os.Getenv(reaperEnv) == "1" { // this process is the daemon's reaper (proc.go)
		os.Exit(reaperMain(os.Stdin))
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, unix.SIGTERM)
	go func() {
		<-ctx.Done()
		stop() // a second signal kills at once
	}()
	err := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	if err != nil {
		var code exitCode
		if errors.As(err, &code) {
			os.Exit(int(code))
		}
		fmt.Fprintln(os.Stderr, "mapproxy-renderd:", err)
		os.Exit(1)
	}
}

// exitCode is an error that only sets the exit status (the output said everything).
type exitCode int

func (e exitCode) Error() string { return "exit status " + strconv.Itoa(int(e)) }

const usage = `usage:
  mapproxy-renderd [-f mapproxy.yaml] [-c renderd.yaml] [-s seed.yaml] [--renderer N] [--max-seed-renderer M]
                   [--socket PATH] [--http ADDR]
  mapproxy-renderd check-config [--strict] [-f mapproxy.yaml] [-c renderd.yaml] [-s seed.yaml] [--socket PATH] [--http ADDR] …
  mapproxy-renderd request [--socket PATH | --http host:port|http://URL | -f … | -c …] [--timeout d] '<json>'
  mapproxy-renderd status  [--socket PATH | --http host:port|http://URL | -f … | -c …]
  mapproxy-renderd seed [-s NAME|seed.yaml] [--priority P] [--rate R] [--wait] [--socket PATH | --http …] NAME…
  mapproxy-renderd tasks [--json] [--socket PATH | --http … | -f … | -c …]
  mapproxy-renderd task ID | cancel ID [--socket PATH | --http … | -f … | -c …]
  mapproxy-renderd top     [--socket PATH | --http … | -f … | -c …] [--once] [--interval 1s]
  mapproxy-renderd install-module [DIR] (writes mapproxy_renderd.py, the module for MapProxy, into DIR;
                                         default: /usr/bin/python3's site directory, on MapProxy's sys.path)
  mapproxy-renderd expire --cache ID [--min-zoom Z] [--max-zoom Z] [--delete-from Z] [--priority P] [--rate R] [--only-cached=false] [--wait] [FILE] < list
  mapproxy-renderd version
Options go before or after the other arguments; -s is always seed.yaml (the socket: --socket).
`

// run is the whole program; main only wires signals and exit codes.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	cmd := ""
	if len(args) > 0 && !strings.HasPrefix(args[0], "-") {
		cmd, args = args[0], args[1:]
	}
	switch cmd {
	case "":
		return runDaemon(ctx, args, stderr)
	case "check-config":
		return runCheckConfig(ctx, args, stdout, stderr)
	case "request":
		return runClient(ctx, "request", args, stdout, stderr)
	case "status":
		return runClient(ctx, "status", args, stdout, stderr)
	case "seed", "tasks", "task", "cancel":
		return runTaskClient(ctx, cmd, args, stdout, stderr)
	case "top":
		return runTop(ctx, args, stdout, stderr)
	case "install-module":
		return runInstallModule(ctx, args, stdout, stderr)
	case "expire":
		return runExpireClient(ctx, args, os.Stdin, stdout, stderr)
	case "version":
		fmt.Fprintln(stdout, "mapproxy-renderd", version)
		return nil
	case "help":
		fmt.Fprint(stdout, usage)
		return nil
	default:
		fmt.Fprint(stderr, usage)
		return fmt.Errorf("unknown command %q", cmd)
	}
}

// configFlags are the flags that select the configuration, shared by every command.
// The override flags exist on the daemon and check-config only; their zero values
// (renderers 0, maxSeed -1, socket and http nil) mean "not given".
type configFlags struct {
	mapproxy, renderd  string
	renderers, maxSeed int
	seed               string
	socket, http       *string // --socket, --http: "" disables that listener
}

func (f *configFlags) register(fs *flag.FlagSet, withOverrides bool) {
	fs.StringVar(&f.mapproxy, "f", "", "MapProxy configuration (mapproxy.yaml)")
	fs.StringVar(&f.renderd, "c", "", "mapproxy-renderd configuration (renderd.yaml)")
	f.renderers, f.maxSeed = 0, -1
	if withOverrides {
		fs.IntVar(&f.renderers, "renderer", 0, "number of renderer processes (overrides renderers)")
		fs.IntVar(&f.maxSeed, "max-seed-renderer", -1, "renderers seeding may use (overrides max_seed_renderers)")
		fs.StringVar(&f.seed, "s", "", "MapProxy seed configuration (seed.yaml; overrides seed_config)")
		fs.Func("socket", "Unix socket `PATH` (overrides socket; \"\" = none)", func(s string) error { f.socket = &s; return nil })
		fs.Func("http", "TCP `ADDR` host:port (overrides http; \"\" = none)", func(s string) error { f.http = &s; return nil })
	}
}

func (f *configFlags) load() (Config, error) {
	return loadConfig(*f)
}

func newFlagSet(name string, stderr io.Writer) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() { fmt.Fprint(stderr, usage) }
	return fs
}

// runCheckConfig validates renderd.yaml and the flags, then loads the MapProxy configuration
// as the renderers will (checkMapProxy), and prints the effective settings.
func runCheckConfig(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	var cf configFlags
	fs := newFlagSet("check-config", stderr)
	cf.register(fs, true)
	strict := fs.Bool("strict", false, "fail when MapProxy warns about mapproxy.yaml or seed.yaml (e.g. an unknown key)")
	pos, err := parseArgs(fs, args)
	if err != nil {
		return err
	}
	if len(pos) > 0 {
		return fmt.Errorf("unexpected argument %q", pos[0])
	}
	cfg, err := cf.load()
	if err != nil {
		return err
	}
	if err := checkStateDir(cfg); err != nil {
		if cfg.stateDirSet {
			return err
		}
		fmt.Fprintf(stdout, "note: %v: the daemon will run with the journal off (set state_dir, or journal: false)\n", err)
	}
	mp, err := checkMapProxy(ctx, cfg, stdout)
	if err != nil {
		return err
	}
	if err := checkPrefetchCaches(cfg, mp); err != nil {
		return err
	}
	seeding, err := checkSeedNames(cfg)
	if err != nil {
		return err
	}
	if len(mp.Warnings) > 0 && *strict {
		return fmt.Errorf("--strict: MapProxy warned about what it ignores (%d): %s", len(mp.Warnings), strings.Join(mp.Warnings, "; "))
	}
	fmt.Fprintf(stdout, "ok: socket %q, http %q, %d renderers (at most %d seeding below priority %d), renderer %q, %s\n",
		cfg.Socket, cfg.httpAddr, cfg.Renderers, cfg.maxSeed, cfg.SeedPriorityBelow, rendererArgv(cfg, "<bundled MapProxy worker>"), seeding)
	return nil
}

func rendererArgv(cfg Config, script string) []string {
	if len(cfg.RendererCommand) > 0 {
		return cfg.RendererCommand
	}
	return []string{defaultPython, script}
}

// plannerArgv is the planner command (docs/design.md §10): planner_command, or the bundled worker's
// plan mode when there is a MapProxy configuration to plan with; nil when seeding cannot work.
func plannerArgv(cfg Config, script string) []string {
	switch {
	case len(cfg.PlannerCommand) > 0:
		return cfg.PlannerCommand
	case script != "" && cfg.MapProxyConfig != "":
		return []string{defaultPython, script, "plan"}
	}
	return nil
}

func rendererConfigFrom(cfg Config, script string) rendererConfig {
	rc := rendererConfig{argv: rendererArgv(cfg, script), startTimeout: time.Duration(cfg.StartTimeout), workerScript: script}
	if cfg.MapProxyConfig != "" {
		abs, err := filepath.Abs(cfg.MapProxyConfig)
		if err != nil {
			abs = cfg.MapProxyConfig
		}
		rc.env = []string{"MAPPROXY_CONFIG=" + abs}
	}
	if script != "" && len(cfg.RendererCommand) == 0 {
		// The bundled worker's tile locks go to the daemon's private directory, not to
		// <cache_dir>/tile_locks, which MapProxy's web processes create with their own
		// umask (README "Tile locks").
		rc.env = append(rc.env, "MAPPROXY_RENDERD_LOCK_DIR="+filepath.Join(filepath.Dir(script), "tile_locks"))
	}
	return rc
}

// newLogger makes the daemon's logger: log/slog's text handler (key=value) or, with
// log_format: json, its JSON handler (one object per line, for journald or a log shipper).
func newLogger(w io.Writer, format string, level *slog.LevelVar) *slog.Logger {
	opts := &slog.HandlerOptions{Level: level}
	if format == "json" {
		return slog.New(slog.NewJSONHandler(w, opts))
	}
	return slog.New(slog.NewTextHandler(w, opts))
}

func parseLogLevel(s string) (slog.Level, error) {
	var l slog.Level
	err := l.UnmarshalText([]byte(s))
	if err != nil {
		return l, fmt.Errorf("want debug, info, warn or error, got %q", s)
	}
	return l, nil
}

// runDaemon starts the renderers, serves until ctx is done, and stops in order:
// listeners closed, queued waiters answered shutting_down, running renders finished (or
// killed at stop_timeout), renderers stopped, connections flushed and closed.
func runDaemon(ctx context.Context, args []string, stderr io.Writer) error {
	var cf configFlags
	fs := newFlagSet("mapproxy-renderd", stderr)
	cf.register(fs, true)
	pos, err := parseArgs(fs, args)
	if err != nil {
		return err
	}
	if len(pos) > 0 {
		return fmt.Errorf("unexpected argument %q", pos[0])
	}
	cfg, err := cf.load()
	if err != nil {
		return err
	}
	if _, err := checkSeedNames(cfg); err != nil {
		return err
	}
	// Catch SIGHUP from the start: its default action kills, and systemd runs a reload queued
	// during start-up right after READY=1. An early one waits here and is applied then.
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, unix.SIGHUP)
	defer signal.Stop(hup)

	var level slog.LevelVar
	lvl, _ := parseLogLevel(cfg.LogLevel)
	level.Set(lvl)
	log := newLogger(stderr, cfg.LogFormat, &level)

	// Read systemd's variables first: renderers must inherit neither them nor the fds.
	notify, err := newSDNotifierFromEnv()
	if err != nil {
		return fmt.Errorf("systemd notify socket: %w", err)
	}
	defer notify.Close()
	inherited, err := listenersFromSystemd()
	if err != nil {
		return fmt.Errorf("socket activation: %w", err)
	}

	script := ""
	if len(cfg.RendererCommand) == 0 || (len(cfg.PlannerCommand) == 0 && cfg.MapProxyConfig != "") {
		if script, err = installBundledWorker(); err != nil {
			return err
		}
	}

	listeners := inherited
	if listeners != nil {
		log.Info("socket activation: using inherited listeners; socket and http settings are ignored", "count", len(listeners))
	} else {
		listeners, err = bindListeners(cfg, log)
		if err != nil {
			return err
		}
	}
	raiseNiceLimit(cfg, log) // renderers inherit it: back from seed_nice after a seed job
	sched := newScheduler(cfg, log, rendererConfigFrom(cfg, script))
	sched.onTick = func(sum string) { _ = notify.Notify("STATUS=" + sum) }
	if wd := notify.WatchdogInterval(); wd > 0 {
		sched.watchdog = wd
		sched.onWatch = func() { _ = notify.Notify("WATCHDOG=1") }
	}
	jr, jrep, err := openStateJournal(cfg, log)
	if err != nil {
		for _, l := range listeners {
			l.Close()
		}
		return err
	}
	if jr != nil {
		defer jr.close() // after the scheduler has stopped (deferred earlier, runs later)
		sched.journal = jr
	}
	srv := newServer(cfg, sched, log)
	schedCtx, stopSched := context.WithCancel(context.Background())
	defer stopSched()
	go sched.run(schedCtx)
	stopScheduler := func(timeout time.Duration) {
		stopSched()
		t := time.AfterFunc(timeout, sched.killRunning)
		defer t.Stop()
		<-sched.done
	}
	// abandonStart stops a daemon whose renderers never became ready: requests that waited
	// for them are answered shutting_down.
	abandonStart := func() {
		srv.closeListeners()
		stopScheduler(0)
		flushCtx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = srv.shutdown(flushCtx)
	}

	// Serve from now on, so that health checks get "starting" (503) rather than silence;
	// every other request waits until the renderers are ready (srv.openUp).
	srv.start(listeners)
	_ = notify.Notify("STATUS=starting " + strconv.Itoa(cfg.Renderers) + " renderers")
	select {
	case err := <-sched.startup:
		if err != nil {
			abandonStart()
			return fmt.Errorf("renderers did not start: %w", err)
		}
	case <-ctx.Done():
		abandonStart()
		return nil
	}

	if jr != nil {
		requeueJournaled(sched, jr, jrep.Jobs, log)
	}
	warnCtx, stopWarn := context.WithCancel(ctx)
	waitWarn := logMapProxyWarnings(warnCtx, cfg, log)
	defer func() { stopWarn(); waitWarn() }()
	tasks := newTaskManager(cfg, sched, plannerArgv(cfg, script), rendererConfigFrom(cfg, script).env, log)
	tasks.journal = jr
	lists, dropLists, err := newListStore(jr, cfg.StateDir)
	if err != nil {
		abandonStart()
		return fmt.Errorf("expiry lists: %w", err)
	}
	defer dropLists()
	tasks.lists = lists
	if jr != nil {
		tasks.restoreFinished(jrep.Finished, jrep.TaskNumber)
		tasks.resumeJournaled(jrep.Tasks)
	}
	tasks.start()
	srv.tasks = tasks // before openUp: handlers use it only once the server is open
	srv.openUp()
	addrs := make([]string, 0, len(listeners))
	for _, l := range listeners {
		addrs = append(addrs, l.Addr().Network()+":"+l.Addr().String())
	}
	log.Info("ready", "version", version, "listen", strings.Join(addrs, ","), "renderers", cfg.Renderers,
		"max_seed_renderers", cfg.maxSeed, "renderer", strings.Join(rendererArgv(cfg, script), " "))
	_ = notify.Notify("READY=1", "STATUS=ready: "+strconv.Itoa(cfg.Renderers)+" renderers")

	for running := true; running; {
		select {
		case <-hup:
			_ = notify.Notify("RELOADING=1", monotonicUsec())
			cfg = reload(cf, cfg, sched, srv, &level, log)
			tasks.reload(cfg, plannerArgv(cfg, script), rendererConfigFrom(cfg, script).env)
			_ = notify.Notify("READY=1")
		case <-ctx.Done():
			running = false
		}
	}

	log.Info("stopping", "stop_timeout", cfg.StopTimeout.String())
	_ = notify.Notify("STOPPING=1", "STATUS=stopping: finishing running renders")
	srv.closeListeners()
	tasks.shutdown() // tasks withdraw their queued jobs and stop their planners first
	stopScheduler(time.Duration(cfg.StopTimeout))
	flushCtx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := srv.shutdown(flushCtx); err != nil {
		log.Warn("some connections were cut at shutdown", "error", err)
	}
	log.Info("stopped")
	return nil
}

// reload re-reads the configuration files (SIGHUP) and returns the configuration now in
// force. A bad configuration is logged and the running one kept. Listener settings need a
// restart; the allow-list and connection limits apply to connections accepted from now on.
func reload(cf configFlags, old Config, sched *scheduler, srv *server, level *slog.LevelVar, log *slog.Logger) Config {
	cfg, err := cf.load()
	if err == nil {
		_, err = checkSeedNames(cfg)
	}
	if err != nil {
		log.Error("reload failed; keeping the running configuration", "error", err)
		return old
	}
	if cfg.Socket != old.Socket || cfg.httpAddr != old.httpAddr || cfg.socketMode != old.socketMode || cfg.SocketGroup != old.SocketGroup {
		log.Warn("reload: listener settings (socket, socket_mode, socket_group, http) change only with a restart")
	}
	if cfg.LogFormat != old.LogFormat {
		log.Warn("reload: log_format changes only with a restart", "log_format", old.LogFormat)
		cfg.LogFormat = old.LogFormat
	}
	if err := sched.reload(cfg); err != nil {
		log.Error("reload failed", "error", err)
		return old
	}
	srv.setLimits(cfg)
	lvl, _ := parseLogLevel(cfg.LogLevel)
	level.Set(lvl)
	log.Info("reloaded", "renderers", cfg.Renderers, "max_seed_renderers", cfg.maxSeed)
	return cfg
}

// bindListeners creates the Unix socket and the TCP listener from the configuration.
func bindListeners(cfg Config, log *slog.Logger) ([]net.Listener, error) {
	var ls []net.Listener
	if cfg.Socket != "" {
		l, err := listenUnix(cfg.Socket, cfg.socketMode, cfg.SocketGroup)
		if err != nil {
			return nil, fmt.Errorf("socket %s: %w", cfg.Socket, socketDirProblem(cfg.Socket, err))
		}
		ls = append(ls, l)
	}
	if cfg.httpAddr != "" {
		l, err := net.Listen("tcp", cfg.httpAddr)
		if err != nil {
			for _, o := range ls {
				o.Close()
			}
			return nil, fmt.Errorf("http %s: %w", cfg.httpAddr, err)
		}
		ls = append(ls, l)
	}
	if len(ls) == 0 {
		return nil, errors.New("nothing to listen on: set socket or http")
	}
	return ls, nil
}

// socketDirProblem turns a failure to create the socket file into a message that says
// what to change when the cause is its directory (missing or not writable, typically
// the default /run as a non-root user); other errors are returned as they are.
func socketDirProblem(path string, err error) error {
	dir := filepath.Dir(path)
	hint := `pass --socket PATH (--socket "" for none) or set socket: in renderd.yaml`
	if _, serr := os.Stat(dir); errors.Is(serr, fs.ErrNotExist) {
		return fmt.Errorf("directory %s does not exist: %s (%w)", dir, hint, err)
	}
	// W_OK|X_OK: creating an entry needs both. access(2) uses the real uid, which is the
	// daemon's (it is not setuid).
	if unix.Access(dir, unix.W_OK|unix.X_OK) != nil {
		return fmt.Errorf("directory %s is not writable by uid %d: %s (%w)", dir, os.Getuid(), hint, err)
	}
	return err
}

// listenUnix binds a Unix socket at path. An existing file there is removed only if it is
// a socket that nobody answers on (a stale one); then the mode and group are set.
func listenUnix(path string, mode os.FileMode, group string) (net.Listener, error) {
	if fi, err := os.Lstat(path); err == nil {
		if fi.Mode()&os.ModeSocket == 0 {
			return nil, errors.New("exists and is not a socket; not removing it")
		}
		if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
			c.Close()
			return nil, errors.New("another process is listening on it")
		}
		if err := os.Remove(path); err != nil {
			return nil, fmt.Errorf("removing stale socket: %w", err)
		}
	}
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return nil, err
	}
	if err := os.Chmod(path, mode); err != nil {
		l.Close()
		return nil, fmt.Errorf("chmod: %w", err)
	}
	if group != "" {
		gid, err := lookupGroup(group)
		if err == nil {
			err = os.Chown(path, -1, gid)
		}
		if err != nil {
			l.Close()
			return nil, fmt.Errorf("socket_group %q: %w", group, err)
		}
	}
	return l, nil
}

func lookupGroup(name string) (int, error) {
	if gid, err := strconv.Atoi(name); err == nil {
		return gid, nil
	}
	g, err := user.LookupGroup(name)
	if err != nil {
		return 0, err
	}
	return strconv.Atoi(g.Gid)
}
