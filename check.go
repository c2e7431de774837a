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
func checkMapProxy(ctx context.Context, cfg Config, stdout io.Writer) error {
	if len(cfg.RendererCommand) > 0 {
		fmt.Fprintf(stdout, "mapproxy: not checked: renderer_command is set (%s), and that renderer loads its configuration itself\n",
			strings.Join(cfg.RendererCommand, " "))
		return nil
	}
	script, cleanup, err := writeBundledWorker()
	if err != nil {
		return err
	}
	defer cleanup()
	rc := rendererConfigFrom(cfg, script)
	ctx, cancel := context.WithTimeout(ctx, time.Duration(cfg.StartTimeout))
	defer cancel()
	cmd := exec.Command(rc.argv[0], append(rc.argv[1:], "check")...)
	cmd.Env = append(os.Environ(), rc.env...)
	withSeed := cfg.SeedConfig != "" && len(cfg.PlannerCommand) == 0
	if withSeed {
		cmd.Env = append(cmd.Env, "MAPPROXY_SEED_CONFIG="+cfg.SeedConfig)
	}
	var errBuf bytes.Buffer
	cmd.Stdout, cmd.Stderr = stdout, &errBuf
	c, err := startChild(cmd, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		return fmt.Errorf("mapproxy_config %s: cannot run the MapProxy check: %w", cfg.MapProxyConfig, err)
	}
	select {
	case <-c.exited:
	case <-ctx.Done():
		c.stop("the MapProxy check") // its group: SIGTERM, then SIGKILL (bounded)
		if !c.waitFor(0) {
			return fmt.Errorf("mapproxy_config %s: the MapProxy check (pid %d) did not finish within start_timeout %s and survived SIGKILL", cfg.MapProxyConfig, c.pid, cfg.StartTimeout)
		}
	}
	err = c.waitErr
	if err == nil {
		return nil
	}
	msg := strings.TrimSpace(errBuf.String())
	if msg == "" {
		msg = "(no message)"
	}
	var ee *exec.ExitError
	switch {
	case ctx.Err() != nil:
		return fmt.Errorf("mapproxy_config %s: MapProxy did not finish loading it within start_timeout %s:\n%s", cfg.MapProxyConfig, cfg.StartTimeout, msg)
	case errors.As(err, &ee):
		what := "mapproxy_config " + cfg.MapProxyConfig
		if withSeed {
			what += " / seed_config " + cfg.SeedConfig
		}
		return fmt.Errorf("%s: MapProxy cannot load it (%s %s check: %s):\n%s",
			what, rc.argv[0], filepath.Base(script), ee.ProcessState, msg)
	default:
		return fmt.Errorf("mapproxy_config %s: cannot run the MapProxy check: %w", cfg.MapProxyConfig, err)
	}
}
