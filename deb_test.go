// SPDX-License-Identifier: Apache-2.0

package main

import (
	"context"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// debTestTools are the programs TestDebianPackage needs; .ci/run installs them.
var debTestTools = []string{"dpkg-deb", "dpkg", "dpkg-query", "lintian", "systemd-analyze", "man", "objdump", "git"}

// requireDebTools fails under CI=true and skips elsewhere when a tool or root is missing.
func requireDebTools(t *testing.T) {
	t.Helper()
	var missing []string
	for _, tool := range debTestTools {
		if _, err := exec.LookPath(tool); err != nil {
			missing = append(missing, tool)
		}
	}
	msg := ""
	switch {
	case len(missing) > 0:
		msg = "missing " + strings.Join(missing, ", ") + " (apt-get install dpkg lintian systemd man-db binutils git)"
	case os.Getuid() != 0:
		msg = "installing a package needs root"
	}
	if msg != "" {
		if os.Getenv("CI") == "true" {
			t.Fatal(msg)
		}
		t.Skip(msg)
	}
}

// debPackage is the package's name in dpkg.
const debPackage = "mapproxy-renderd"

// debInstalled reports whether dpkg knows the package in any state but not-installed.
func debInstalled(t *testing.T) bool {
	out, err := exec.Command("dpkg-query", "-W", "-f=${db:Status-Abbrev}", debPackage).Output()
	return err == nil && len(out) > 1 && out[1] != 'n'
}

// debRun runs a command, bounded, and returns its combined output; it fails the test when
// the command fails.
func debRun(t *testing.T, timeout time.Duration, env []string, name string, args ...string) string {
	t.Helper()
	out, err := debRunErr(timeout, env, nil, name, args...)
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return out
}

func debRunErr(timeout time.Duration, env []string, cred *syscall.Credential, name string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Env = append(os.Environ(), env...)
	cmd.WaitDelay = 5 * time.Second
	if cred != nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: cred}
		cmd.Dir = "/"
	}
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// debSnapshotRoots are where a package could leave files behind. dpkg's and apt's own
// databases, caches and logs change with every installation and are left out.
var (
	// debPurgedDirs are what packaging/debian/postrm removes on purge beyond the file list.
	debPurgedDirs    = []string{"/var/lib/mapproxy-renderd", "/var/cache/mapproxy", "/etc/mapproxy-renderd"}
	debSnapshotRoots = []string{"/etc", "/usr", "/lib", "/var/lib", "/var/cache", "/opt", "/srv"}
	debSnapshotSkip  = []string{"/var/lib/dpkg", "/var/lib/apt", "/var/cache/apt", "/var/cache/debconf",
		"/var/cache/man", "/var/cache/ldconfig", "/var/lib/ucf", "/var/lib/lintian"}
)

// debSnapshot lists every path under debSnapshotRoots.
func debSnapshot(t *testing.T) map[string]bool {
	t.Helper()
	paths := map[string]bool{}
	for _, root := range debSnapshotRoots {
		filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
			if err != nil {
				return nil // vanished or unreadable: not ours
			}
			if d.IsDir() && slices.Contains(debSnapshotSkip, p) {
				return filepath.SkipDir
			}
			if strings.Contains(p, "/__pycache__") {
				return nil // python byte-compiles modules of other packages at any time
			}
			paths[p] = true
			return nil
		})
	}
	return paths
}

// TestDebianPackage builds the .deb with packaging/build-deb.sh, requires lintian to
// report no error, installs it with dpkg -i, checks the installed units with
// systemd-analyze verify, the version, check-config on the installed example (as the
// service user) and the man page, then purges it and requires that no file is left
// behind and none removed. It runs as root (CI) and changes the system for a minute; a
// mapproxy-renderd package that was installed before the test is never touched.
func TestDebianPackage(t *testing.T) {
	requireDebTools(t)
	// Concurrent runs of this test on one machine would fight over dpkg's lock.
	lock, err := os.OpenFile("/run/lock/mapproxy-renderd-deb-test.lock", os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer lock.Close()
	if err := syscall.Flock(int(lock.Fd()), syscall.LOCK_EX); err != nil {
		t.Fatal(err)
	}
	if debInstalled(t) {
		msg := debPackage + " is installed on this machine; the test installs and purges it, so it leaves it alone"
		if os.Getenv("CI") == "true" {
			t.Fatal(msg)
		}
		t.Skip(msg)
	}
	// The purge removes the state directory (and the package's directories if empty): one
	// the test did not create (a daemon run by hand, the demo of an older version) is left
	// alone, as an installed package is.
	for _, p := range debPurgedDirs {
		if _, err := os.Lstat(p); err == nil {
			msg := p + " exists and the package's purge would remove it; the test leaves this machine alone"
			if os.Getenv("CI") == "true" {
				t.Fatal(msg)
			}
			t.Skip(msg)
		}
	}

	start := time.Now()
	outDir := t.TempDir()
	// The go that runs this test builds the package too, whether or not it is on PATH.
	var env []string
	if goBin := filepath.Join(runtime.GOROOT(), "bin", "go"); runtime.GOROOT() != "" {
		if _, err := os.Stat(goBin); err == nil {
			env = append(env, "GO="+goBin)
		}
	}
	out := debRun(t, 10*time.Minute, env, "bash", "packaging/build-deb.sh", outDir)
	lines := strings.Split(strings.TrimSpace(out), "\n")
	deb := lines[len(lines)-1]
	if !strings.HasSuffix(deb, "_amd64.deb") && !strings.HasSuffix(deb, "_arm64.deb") {
		t.Fatalf("build-deb.sh: last line %q is not the .deb\n%s", deb, out)
	}
	t.Logf("built %s in %s", filepath.Base(deb), time.Since(start).Round(time.Millisecond))
	describe := strings.TrimSpace(debRun(t, time.Minute, nil, "git", "describe", "--tags", "--always", "--dirty"))

	fields := debRun(t, time.Minute, nil, "dpkg-deb", "-f", deb, "Package", "Version", "Architecture", "Depends", "Recommends")
	for _, want := range []string{"Package: mapproxy-renderd", "python3-mapproxy", "python3-requests", "Recommends: python3-requests-unixsocket"} {
		if !strings.Contains(fields, want) {
			t.Errorf("control fields: want %q in\n%s", want, fields)
		}
	}
	if !strings.HasPrefix(filepath.Base(deb), "mapproxy-renderd_") {
		t.Errorf("file name %q, want mapproxy-renderd_<version>_<arch>.deb", filepath.Base(deb))
	}

	// lintian only reads the .deb: it runs while the package is installed and checked. The
	// test waits for it on every path out (bounded by the command's timeout).
	var lint struct {
		out  string
		err  error
		took time.Duration
	}
	lintFinished := make(chan struct{})
	go func() {
		defer close(lintFinished)
		lt := time.Now()
		lint.out, lint.err = debRunErr(5*time.Minute, nil, nil, "lintian", "--tag-display-limit", "0", deb)
		lint.took = time.Since(lt)
	}()
	defer func() { <-lintFinished }()

	before := debSnapshot(t)
	t.Cleanup(func() {
		if debInstalled(t) {
			if out, err := debRunErr(2*time.Minute, nil, nil, "dpkg", "--purge", debPackage); err != nil {
				t.Errorf("cleanup: dpkg --purge: %v\n%s", err, out)
			}
		}
	})
	debRun(t, 2*time.Minute, []string{"DEBIAN_FRONTEND=noninteractive"}, "dpkg", "-i", deb)

	for _, p := range []string{"/usr/bin/mapproxy-renderd", "/lib/systemd/system/mapproxy-renderd.service",
		"/lib/systemd/system/mapproxy-renderd.socket", "/etc/mapproxy-renderd/renderd.yaml",
		"/usr/share/man/man8/mapproxy-renderd.8.gz", "/usr/share/doc/mapproxy-renderd/copyright",
		"/usr/share/doc/mapproxy-renderd/changelog.Debian.gz", "/var/cache/mapproxy"} {
		if _, err := os.Stat(p); err != nil {
			t.Errorf("after dpkg -i: %v", err)
		}
	}
	// A first install enables nothing (docs/design.md §16): deb-systemd-helper's was-enabled answers
	// true for units it has never seen, which the postinst must not take for the admin's choice.
	for _, link := range []string{"/etc/systemd/system/sockets.target.wants/mapproxy-renderd.socket",
		"/etc/systemd/system/multi-user.target.wants/mapproxy-renderd.service"} {
		if _, err := os.Lstat(link); err == nil {
			t.Errorf("after the first dpkg -i: %s exists: the unit was enabled", link)
		}
	}
	if c := debRun(t, time.Minute, nil, "dpkg-query", "-W", "-f=${Conffiles}", debPackage); !strings.Contains(c, "/etc/mapproxy-renderd/renderd.yaml") {
		t.Errorf("conffiles: got %q, want /etc/mapproxy-renderd/renderd.yaml", c)
	}
	u, err := user.Lookup("mapproxy-renderd")
	if err != nil {
		t.Fatalf("system user: %v", err)
	}
	g, err := user.LookupGroup("mapproxy")
	if err != nil {
		t.Fatalf("system group: %v", err)
	}
	if u.Gid != g.Gid {
		t.Errorf("user mapproxy-renderd has gid %s, want group mapproxy (%s)", u.Gid, g.Gid)
	}
	if uid, _ := strconv.Atoi(u.Uid); uid == 0 || uid >= 1000 {
		t.Errorf("user mapproxy-renderd has uid %d, want a system uid", uid)
	}

	// The installed units, with the installed binary, user and man page.
	verify, verr := debRunErr(time.Minute, []string{"SYSTEMD_LOG_COLOR=0", "SYSTEMD_PAGER="}, nil, "systemd-analyze", "verify",
		"/lib/systemd/system/mapproxy-renderd.socket", "/lib/systemd/system/mapproxy-renderd.service")
	var ours []string
	for _, l := range strings.Split(verify, "\n") {
		if strings.Contains(l, "mapproxy-renderd") {
			ours = append(ours, l)
		}
	}
	if len(ours) > 0 {
		t.Errorf("systemd-analyze verify on the installed units:\n%s", strings.Join(ours, "\n"))
	} else if verr != nil {
		t.Logf("systemd-analyze verify exited with %v (no line names our units):\n%s", verr, verify)
	}

	if v := debRun(t, time.Minute, nil, "/usr/bin/mapproxy-renderd", "version"); strings.TrimSpace(v) != "mapproxy-renderd "+describe {
		t.Errorf("mapproxy-renderd version: got %q, want %q", strings.TrimSpace(v), "mapproxy-renderd "+describe)
	}

	// check-config on the installed example, as the service user would run it.
	uid, _ := strconv.Atoi(u.Uid)
	gid, _ := strconv.Atoi(g.Gid)
	cc, err := debRunErr(2*time.Minute, nil, &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)},
		"/usr/bin/mapproxy-renderd", "check-config", "-c", "/etc/mapproxy-renderd/renderd.yaml",
		"-f", "/usr/share/doc/mapproxy-renderd/examples/mapproxy.yaml")
	if err != nil || !strings.Contains(cc, "loaded it: 3 caches") || !strings.Contains(cc, "ok: ") {
		t.Errorf("check-config on the installed example: %v\n%s", err, cc)
	}

	if w := strings.TrimSpace(debRun(t, time.Minute, nil, "man", "-w", "mapproxy-renderd")); w != "/usr/share/man/man8/mapproxy-renderd.8.gz" {
		t.Errorf("man -w mapproxy-renderd: got %q", w)
	}
	// The page renders without groff warnings.
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	man := exec.CommandContext(ctx, "man", "--warnings", "mapproxy-renderd")
	man.Env = append(os.Environ(), "MANWIDTH=80", "MANPAGER=cat", "PAGER=cat")
	var manErr strings.Builder
	man.Stdout, man.Stderr = io.Discard, &manErr
	man.WaitDelay = 5 * time.Second
	if err := man.Run(); err != nil || strings.TrimSpace(manErr.String()) != "" {
		t.Errorf("man --warnings mapproxy-renderd: %v\n%s", err, manErr.String())
	}

	debRun(t, 2*time.Minute, nil, "dpkg", "--purge", debPackage)
	after := debSnapshot(t)
	var added, removed []string
	for p := range after {
		if !before[p] {
			added = append(added, p)
		}
	}
	for p := range before {
		if !after[p] {
			removed = append(removed, p)
		}
	}
	slices.Sort(added)
	slices.Sort(removed)
	if len(added) > 0 {
		t.Errorf("dpkg --purge left %d paths behind:\n%s", len(added), strings.Join(added, "\n"))
	}
	if len(removed) > 0 {
		t.Errorf("install and purge removed %d paths that were there before:\n%s", len(removed), strings.Join(removed, "\n"))
	}
	<-lintFinished // lint is written before lintFinished is closed
	var errorTags, otherTags []string
	for _, l := range strings.Split(lint.out, "\n") {
		switch {
		case strings.HasPrefix(l, "E: "):
			errorTags = append(errorTags, l)
		case strings.HasPrefix(l, "W: "), strings.HasPrefix(l, "I: "):
			otherTags = append(otherTags, l)
		}
	}
	if len(errorTags) > 0 {
		t.Errorf("lintian reports errors:\n%s", strings.Join(errorTags, "\n"))
	}
	if lint.err != nil && len(errorTags) == 0 {
		t.Errorf("lintian failed without an error tag: %v\n%s", lint.err, lint.out)
	}
	t.Logf("lintian in %s, warnings and notes:\n%s", lint.took.Round(time.Millisecond), strings.Join(otherTags, "\n"))
	t.Logf("compared %d paths before and after; whole test %s", len(before), time.Since(start).Round(time.Millisecond))
}
