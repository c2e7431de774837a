// SPDX-License-Identifier: Apache-2.0

package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"time"

	"golang.org/x/sys/unix"
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
// such a file and ignores the key, which is rarely what the operator meant. And it returns
// the caches MapProxy built (nil when nothing was checked).
func checkMapProxy(ctx context.Context, cfg Config, stdout io.Writer) (rep mapproxyReport, err error) {
	if len(cfg.RendererCommand) > 0 {
		fmt.Fprintf(stdout, "mapproxy: not checked: renderer_command is set (%s), and that renderer loads its configuration itself\n",
			strings.Join(cfg.RendererCommand, " "))
		return rep, nil
	}
	script, cleanup, err := writeBundledWorker()
	if err != nil {
		return rep, err
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
	var outBuf, errBuf bytes.Buffer
	cmd.Stdout, cmd.Stderr = &outBuf, &errBuf
	c, err := startChild(cmd, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		return rep, fmt.Errorf("mapproxy_config %s: cannot run the MapProxy check: %w", cfg.MapProxyConfig, err)
	}
	select {
	case <-c.exited:
	case <-ctx.Done():
		c.stop("the MapProxy check") // its group: SIGTERM, then SIGKILL (bounded)
		if !c.waitFor(0) {
			return rep, fmt.Errorf("mapproxy_config %s: the MapProxy check (pid %d) did not finish within start_timeout %s and survived SIGKILL", cfg.MapProxyConfig, c.pid, cfg.StartTimeout)
		}
	}
	err = c.waitErr
	stdout.Write(outBuf.Bytes())
	for line := range strings.Lines(outBuf.String()) {
		line = strings.TrimRight(line, "\n")
		if w, ok := strings.CutPrefix(line, "warning: "); ok {
			rep.Warnings = append(rep.Warnings, w)
		} else if m := checkCacheLineRE.FindStringSubmatch(line); m != nil {
			if rep.Caches == nil {
				rep.Caches = map[string]string{}
			}
			rep.Caches[m[1]] = m[2]
		}
	}
	if err == nil {
		return rep, nil
	}
	msg := strings.TrimSpace(errBuf.String())
	if msg == "" {
		msg = "(no message)"
	}
	var ee *exec.ExitError
	switch {
	case ctx.Err() != nil:
		return rep, fmt.Errorf("mapproxy_config %s: MapProxy did not finish loading it within start_timeout %s:\n%s", cfg.MapProxyConfig, cfg.StartTimeout, msg)
	case errors.As(err, &ee):
		what := "mapproxy_config " + cfg.MapProxyConfig
		if withSeed {
			what += " / seed_config " + cfg.SeedConfig
		}
		return rep, fmt.Errorf("%s: MapProxy cannot load it (%s %s check: %s):\n%s",
			what, rc.argv[0], filepath.Base(script), ee.ProcessState, msg)
	default:
		return rep, fmt.Errorf("mapproxy_config %s: cannot run the MapProxy check: %w", cfg.MapProxyConfig, err)
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
		rep, err := checkMapProxy(ctx, cfg, io.Discard)
		if err != nil {
			if ctx.Err() == nil {
				log.Warn("MapProxy configuration check failed", "err", err)
			}
			return
		}
		if err := checkPrefetchCaches(cfg, rep); err != nil {
			log.Warn("renderd.yaml: " + err.Error() + " (nothing of it is prefetched)")
		}
		for _, w := range rep.Warnings {
			log.Warn("MapProxy configuration: " + w + " (MapProxy ignores it; check-config --strict fails on it)")
		}
	}()
	return func() { <-done }
}

// mapproxyReport is what the MapProxy check found.
type mapproxyReport struct {
	Warnings []string          // "FILE: message"
	Caches   map[string]string // cache identifier → MapProxy cache name; nil: not checked
}

// checkCacheLineRE is the check mode's line for one cache: "  ID (metatile 4x4) of cache NAME".
var checkCacheLineRE = regexp.MustCompile(`^  (\S+) \(metatile \d+x\d+\) of cache (\S+)$`)

// checkPrefetchCaches checks that every prefetch.caches entry is a cache identifier or a
// MapProxy cache name of the checked configuration (nothing to check when none was).
func checkPrefetchCaches(cfg Config, rep mapproxyReport) error {
	if cfg.Prefetch == nil || rep.Caches == nil {
		return nil
	}
	var known []string
	names := map[string]bool{}
	for id, name := range rep.Caches {
		known = append(known, id)
		if !names[name] {
			names[name] = true
			known = append(known, name)
		}
	}
	slices.Sort(known)
	for i, c := range cfg.Prefetch.Caches {
		if _, ok := rep.Caches[c]; ok || names[c] {
			continue
		}
		msg := fmt.Sprintf("prefetch.caches[%d]: %q is neither a cache identifier nor a cache name of mapproxy_config (it has %s)",
			i, c, strings.Join(known, ", "))
		if s := closestKey(c, known); s != "" {
			msg += "; did you mean " + s + "?"
		}
		return errors.New(msg)
	}
	return nil
}

// checkStateDir tries what the journal needs of state_dir, without changing it: an existing
// directory must take a new file (the daemon creates its lock and journal there: a probe
// file is created and removed; for the default state_dir access(2) is asked instead); a
// missing one must be creatable in its nearest existing parent.
func checkStateDir(cfg Config) error {
	if !cfg.Journal {
		return nil
	}
	dir := cfg.StateDir
	fi, err := os.Stat(dir)
	switch {
	case err == nil && !fi.IsDir():
		return fmt.Errorf("state_dir: %s is not a directory", dir)
	case err == nil && !cfg.stateDirSet:
		// The default directory: only asked (check-config never writes to /var unbidden).
		if err := unix.Access(dir, unix.W_OK|unix.X_OK); err != nil {
			return fmt.Errorf("state_dir: the daemon cannot create its journal in %s: %w", dir, err)
		}
		return nil
	case err == nil:
		f, err := os.CreateTemp(dir, ".check-config-*")
		if err != nil {
			return fmt.Errorf("state_dir: the daemon cannot create its journal in %s: %w", dir, err)
		}
		f.Close()
		os.Remove(f.Name())
		return nil
	case !errors.Is(err, fs.ErrNotExist):
		return fmt.Errorf("state_dir: %w", err)
	}
	parent := filepath.Dir(dir)
	for {
		fi, err := os.Stat(parent)
		if err == nil {
			if !fi.IsDir() {
				return fmt.Errorf("state_dir: %s is not a directory", parent)
			}
			break
		}
		if parent == filepath.Dir(parent) {
			return fmt.Errorf("state_dir: %w", err)
		}
		parent = filepath.Dir(parent)
	}
	if err := unix.Access(parent, unix.W_OK|unix.X_OK); err != nil {
		return fmt.Errorf("state_dir: the daemon cannot create %s: %s: %w", dir, parent, err)
	}
	return nil
}
