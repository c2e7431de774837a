// SPDX-License-Identifier: Apache-2.0

package main

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
)

// installBundledWorker writes the bundled worker where the renderers and the planner run
// it from, so that a daemon killed with SIGKILL leaves nothing behind that the next start
// does not reuse: the file is named by its content's hash
// (mapproxy_worker-<sha256 prefix>.py), in $RUNTIME_DIRECTORY (systemd's
// RuntimeDirectory=, removed when the service stops) when set, else in
// <temp dir>/mapproxy-renderd-<uid>, a directory of this user's alone (0700, owned by
// the uid, not a symlink; anything else there is refused). An existing file with the right
// content is used as it is; daemons of different versions each have their own. The file
// is never removed on exit (another daemon may run it): one per version, at most.
func installBundledWorker() (string, error) {
	dir := ""
	if rd := os.Getenv("RUNTIME_DIRECTORY"); rd != "" {
		dir, _, _ = strings.Cut(rd, ":") // systemd lists several with ":"
	} else {
		dir = filepath.Join(os.TempDir(), "mapproxy-renderd-"+strconv.Itoa(os.Getuid()))
		if err := ownPrivateDir(dir); err != nil {
			return "", fmt.Errorf("bundled worker: %w", err)
		}
	}
	sum := sha256.Sum256(bundledWorker)
	path := filepath.Join(dir, "mapproxy_worker-"+hex.EncodeToString(sum[:8])+".py")
	if old, err := os.ReadFile(path); err == nil && bytes.Equal(old, bundledWorker) {
		return path, nil
	}
	tmp, err := os.CreateTemp(dir, ".mapproxy_worker-*.py")
	if err != nil {
		return "", fmt.Errorf("bundled worker: %w", err)
	}
	_, err = tmp.Write(bundledWorker)
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp.Name(), path) // atomic: a concurrent start sees the old or the new file
	}
	if err != nil {
		os.Remove(tmp.Name())
		return "", fmt.Errorf("bundled worker: %w", err)
	}
	return path, nil
}

// ownPrivateDir makes dir (mode 0700) or checks that the existing one is a directory of
// this uid that nobody else can write to.
func ownPrivateDir(dir string) error {
	if err := os.Mkdir(dir, 0o700); err != nil && !errors.Is(err, os.ErrExist) {
		return err
	}
	fi, err := os.Lstat(dir)
	if err != nil {
		return err
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !fi.IsDir() || !ok || int(st.Uid) != os.Getuid() || fi.Mode().Perm()&0o022 != 0 {
		return fmt.Errorf("%s is not a directory of uid %d that only it can write to; remove it or set RUNTIME_DIRECTORY", dir, os.Getuid())
	}
	return nil
}
