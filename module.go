// SPDX-License-Identifier: Apache-2.0

package main

import (
	"context"
	_ "embed"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"
)

// The MapProxy-side module (python/mapproxy_renderd.py, docs/design.md §13), embedded so that an
// installed binary can write out the copy that matches it.
//
//go:embed python/mapproxy_renderd.py
var bundledModule []byte

// moduleName is the file install-module writes.
const moduleName = "mapproxy_renderd.py"

// runInstallModule is `mapproxy-renderd install-module [DIR]`: it writes the module into DIR
// (an existing directory), replacing an older copy atomically. Without DIR it writes it into
// the site directory of /usr/bin/python3 (moduleSiteDir), creating that directory: every
// WSGI server running that python (mod_wsgi, gunicorn, serve_wsgi.py) imports it from there
// without a python-path setting.
func runInstallModule(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	if len(args) > 1 || (len(args) == 1 && (args[0] == "" || args[0][0] == '-')) {
		fmt.Fprint(stderr, usage)
		return errors.New("install-module: want at most one argument, the directory to write " + moduleName + " into")
	}
	var dir string
	if len(args) == 1 {
		dir = args[0]
	} else {
		var err error
		if dir, err = moduleSiteDir(ctx, defaultPython); err != nil {
			return fmt.Errorf("install-module: %w", err)
		}
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return fmt.Errorf("install-module: %w", err)
		}
	}
	if fi, err := os.Stat(dir); err != nil {
		return fmt.Errorf("install-module: %w", err)
	} else if !fi.IsDir() {
		return fmt.Errorf("install-module: %s is not a directory", dir)
	}
	tmp, err := os.CreateTemp(dir, "."+moduleName+".*")
	if err != nil {
		return fmt.Errorf("install-module: %w", err)
	}
	_, err = tmp.Write(bundledModule)
	if err == nil {
		err = tmp.Chmod(0o644)
	}
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	dst := filepath.Join(dir, moduleName)
	if err == nil {
		err = os.Rename(tmp.Name(), dst)
	}
	if err != nil {
		os.Remove(tmp.Name())
		return fmt.Errorf("install-module: %w", err)
	}
	where := "the WSGI server must have " + dir + " on sys.path (mod_wsgi: python-path=" + dir +
		"; gunicorn: --chdir " + dir + " or --pythonpath " + dir + ")"
	if len(args) == 0 {
		where = dir + " is on " + defaultPython + "'s sys.path: every WSGI server running it imports the module"
	}
	fmt.Fprintf(stdout, "wrote %s; %s. Enable it with this line in the WSGI script, before make_wsgi_app:\n"+
		"import mapproxy_renderd; mapproxy_renderd.enable()\n", dst, where)
	return nil
}

// moduleSiteDir asks python for the directory its site module puts on sys.path for locally
// installed modules (Debian: /usr/local/lib/python3.X/dist-packages), where MapProxy's
// WSGI processes find the module without a python-path setting.
func moduleSiteDir(ctx context.Context, python string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))")
	cmd.WaitDelay = killGrace
	out, err := cmd.Output()
	dir := strings.TrimSpace(string(out))
	if err != nil || !filepath.IsAbs(dir) {
		return "", fmt.Errorf("cannot ask %s for its site directory (%v, %q): give the directory", python, err, dir)
	}
	return dir, nil
}
