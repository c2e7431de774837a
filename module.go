// SPDX-License-Identifier: Apache-2.0

package main

import (
	_ "embed"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
)

// The MapProxy-side module (python/mapproxy_renderd.py, docs/design.md §13), embedded so that an
// installed binary can write out the copy that matches it.
//
//go:embed python/mapproxy_renderd.py
var bundledModule []byte

// moduleName is the file install-module writes.
const moduleName = "mapproxy_renderd.py"

// runInstallModule is `mapproxy-renderd install-module DIR`: it writes the module into DIR
// (an existing directory, e.g. the WSGI script's), replacing an older copy atomically.
func runInstallModule(args []string, stdout, stderr io.Writer) error {
	if len(args) != 1 || args[0] == "" || args[0][0] == '-' {
		fmt.Fprint(stderr, usage)
		return errors.New("install-module: want one argument, the directory to write " + moduleName + " into")
	}
	dir := args[0]
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
	fmt.Fprintf(stdout, "wrote %s; enable it with this line in the WSGI script, before make_wsgi_app:\n"+
		"import mapproxy_renderd; mapproxy_renderd.enable()\n", dst)
	return nil
}
