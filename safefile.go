// SPDX-License-Identifier: Apache-2.0

package main

// Files the daemon opens by a name from its configuration or its state (renderd.yaml,
// mapproxy.yaml, seed configurations, expiry lists): never a name a client chose (docs/design.md §8).
// Whatever sits at that name, opening it does not block (a FIFO), reading it does not
// exhaust memory (/dev/zero, a huge sparse file), and a parse error does not show the
// file's bytes to a client.

import (
	"errors"
	"fmt"
	"io"
	"os"
	"regexp"

	"golang.org/x/sys/unix"
)

// Size caps for files read whole. A renderd.yaml, mapproxy.yaml or seed.yaml is a few KB;
// these leave room for generated ones.
const (
	maxConfigFileBytes = 16 << 20
)

// openRegular opens path for reading if it is a regular file: O_NONBLOCK makes open return
// at once on a FIFO (or a device), and fstat on the open descriptor (not the name, which
// may change between the two) then refuses anything else. A size above maxBytes (0: no cap)
// is an error. Symlinks are followed: the name comes from the administrator.
func openRegular(path string, maxBytes int64) (*os.File, os.FileInfo, error) {
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_NONBLOCK|unix.O_CLOEXEC|unix.O_NOCTTY, 0)
	if err != nil {
		return nil, nil, &os.PathError{Op: "open", Path: path, Err: err}
	}
	f := os.NewFile(uintptr(fd), path)
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, nil, err
	}
	if !st.Mode().IsRegular() {
		f.Close()
		return nil, nil, fmt.Errorf("%s: not a regular file (%s)", path, fileKind(st.Mode()))
	}
	if maxBytes > 0 && st.Size() > maxBytes {
		f.Close()
		return nil, nil, fmt.Errorf("%s: %d bytes, more than the %d this file may have", path, st.Size(), maxBytes)
	}
	return f, st, nil
}

// readRegular reads the regular file at path whole, at most maxBytes (a file that grew
// past the cap after fstat is an error; the excess is not read).
func readRegular(path string, maxBytes int64) ([]byte, error) {
	f, _, err := openRegular(path, maxBytes)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, maxBytes+1))
	if err != nil {
		return nil, err
	}
	if int64(len(data)) > maxBytes {
		return nil, fmt.Errorf("%s: more than the %d bytes this file may have", path, maxBytes)
	}
	return data, nil
}

func fileKind(m os.FileMode) string {
	switch {
	case m.IsDir():
		return "a directory"
	case m&os.ModeNamedPipe != 0:
		return "a FIFO"
	case m&os.ModeCharDevice != 0:
		return "a character device"
	case m&os.ModeDevice != 0:
		return "a block device"
	case m&os.ModeSocket != 0:
		return "a socket"
	default:
		return m.Type().String()
	}
}

// yamlLine finds the position yaml.v3 reports ("line 3", "line 3: column 2").
var yamlLine = regexp.MustCompile(`line [0-9]+(: column [0-9]+)?`)

// yamlErrorWithoutBytes is a YAML decoding error reduced to where it is: yaml.v3 quotes
// the offending value ("cannot unmarshal !!str `root:x:0:0...`"), which must not reach a
// client.
func yamlErrorWithoutBytes(err error) error {
	if loc := yamlLine.FindString(err.Error()); loc != "" {
		return errors.New("not a valid seed configuration (YAML error at " + loc + ")")
	}
	return errors.New("not a valid seed configuration (YAML error)")
}
