package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"
)

// writeBundledWorker writes the embedded MapProxy worker to a private temporary directory.
// The caller runs cleanup when no process needs the script any more.
func writeBundledWorker() (script string, cleanup func(), err error) {
	dir, err := os.MkdirTemp("", "mapproxy-renderd-")
	if err != nil {
		return "", nil, fmt.Errorf("bundled worker: %w", err)
	}
	script = filepath.Join(dir, "mapproxy_worker.py")
	if err := os.WriteFile(script, bundledWorker, 0o600); err != nil {
		os.RemoveAll(dir)
		return "", nil, fmt.Errorf("bundled worker: %w", err)
	}
	return script, func() { os.RemoveAll(dir) }, nil
}

// checkMapProxy loads the MapProxy configuration the way the renderers will: the bundled
// worker in its check mode, with the same python, arguments and environment as a renderer
// (MAPPROXY_CONFIG). With seed_config set and the bundled planner, the worker also loads
// seed.yaml with MapProxy's seed loader (MAPPROXY_SEED_CONFIG), building every seed and
// cleanup as mapproxy-seed would. The worker's report goes to stdout; when MapProxy cannot
// load a file the error carries MapProxy's own message and the worker's exit status.
// With a renderer_command nothing is checked (the program is not ours to start in a check
// mode), and stdout says so. The check is bounded by start_timeout.
//
// It returns what MapProxy's loaders only warned about (unknown keys such as meta_sise or
// levles, deprecated options), as "FILE: message", also shown in the report: MapProxy loads
// such a file and ignores the key, which is rarely what the operator meant.
func checkMapProxy(ctx context.Context, cfg Config, stdout io.Writer) (warnings []string, err error) {
	if len(cfg.RendererCommand) > 0 {
		fmt.Fprintf(stdout, "mapproxy: not checked: renderer_command is set (%s), and that renderer loads its configuration itself\n",
			strings.Join(cfg.RendererCommand, " "))
		return nil, nil
	}
	script, cleanup, err := writeBundledWorker()
	if err != nil {
		return nil, err
	}
	defer cleanup()
	rc := rendererConfigFrom(cfg, script)
	ctx, cancel := context.WithTimeout(ctx, time.Duration(cfg.StartTimeout))
	defer cancel()
	cmd := exec.CommandContext(ctx, rc.argv[0], append(rc.argv[1:], "check")...)
	cmd.Env = append(os.Environ(), rc.env...)
	withSeed := cfg.SeedConfig != "" && len(cfg.PlannerCommand) == 0
	if withSeed {
		cmd.Env = append(cmd.Env, "MAPPROXY_SEED_CONFIG="+cfg.SeedConfig)
	}
	cmd.WaitDelay = killGrace
	var outBuf, errBuf bytes.Buffer
	cmd.Stdout, cmd.Stderr = &outBuf, &errBuf
	err = cmd.Run()
	stdout.Write(outBuf.Bytes())
	for line := range strings.Lines(outBuf.String()) {
		if w, ok := strings.CutPrefix(strings.TrimRight(line, "\n"), "warning: "); ok {
			warnings = append(warnings, w)
		}
	}
	if err == nil {
		return warnings, nil
	}
	msg := strings.TrimSpace(errBuf.String())
	if msg == "" {
		msg = "(no message)"
	}
	var ee *exec.ExitError
	switch {
	case ctx.Err() != nil:
		return nil, fmt.Errorf("mapproxy_config %s: MapProxy did not finish loading it within start_timeout %s:\n%s", cfg.MapProxyConfig, cfg.StartTimeout, msg)
	case errors.As(err, &ee):
		what := "mapproxy_config " + cfg.MapProxyConfig
		if withSeed {
			what += " / seed_config " + cfg.SeedConfig
		}
		return nil, fmt.Errorf("%s: MapProxy cannot load it (%s %s check: %s):\n%s",
			what, rc.argv[0], filepath.Base(script), ee.ProcessState, msg)
	default:
		return nil, fmt.Errorf("mapproxy_config %s: cannot run the MapProxy check: %w", cfg.MapProxyConfig, err)
	}
}

// logMapProxyWarnings runs the check of checkMapProxy in the background at daemon start and
// logs what MapProxy's loaders warned about at WARN, so that a typo in mapproxy.yaml or
// seed.yaml shows in the daemon's log too. Cancelling ctx stops the check (its process is
// killed); the returned wait returns once the goroutine has ended.
func logMapProxyWarnings(ctx context.Context, cfg Config, log *slog.Logger) (wait func()) {
	done := make(chan struct{})
	go func() {
		defer close(done)
		warnings, err := checkMapProxy(ctx, cfg, io.Discard)
		if err != nil {
			if ctx.Err() == nil {
				log.Warn("MapProxy configuration check failed", "err", err)
			}
			return
		}
		for _, w := range warnings {
			log.Warn("MapProxy configuration: " + w + " (MapProxy ignores it; check-config --strict fails on it)")
		}
	}()
	return func() { <-done }
}
