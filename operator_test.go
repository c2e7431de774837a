// SPDX-License-Identifier: Apache-2.0

package main

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime/debug"
	"strings"
	"syscall"
	"testing"
	"time"
)

// Tests for what an operator meets first: the listener flags, check-config's
// MapProxy check, and the message when renderers cannot start.

// fakeRendererYAML is a renderer_command line for the fake renderer (so check-config does
// not need MapProxy) plus extra.
func fakeRendererYAML(extra string) string {
	return fmt.Sprintf("renderer_command: [%q, fake-renderer]\n", os.Args[0]) + extra
}

// TestListenFlags: --socket and --http override renderd.yaml and globals.renderd.address;
// "" switches that listener off.
func TestListenFlags(t *testing.T) {
	dir := t.TempDir()
	tcpMP := filepath.Join(dir, "tcp.yaml")
	unixMP := filepath.Join(dir, "unix.yaml")
	os.WriteFile(tcpMP, []byte("globals:\n  renderd:\n    address: http://127.0.0.1:8111\n"), 0o644)
	os.WriteFile(unixMP, []byte("globals:\n  renderd:\n    address: http+unix://%2Ftmp%2Fmp.sock/\n"), 0o644)
	withFile := filepath.Join(dir, "with.yaml")
	os.WriteFile(withFile, []byte(fakeRendererYAML("socket: /tmp/file.sock\nhttp: 127.0.0.1:9001\n")), 0o644)
	bare := filepath.Join(dir, "bare.yaml")
	os.WriteFile(bare, []byte(fakeRendererYAML("")), 0o644)

	tests := []struct {
		name       string
		args       []string
		wantSocket string
		wantHTTP   string
	}{
		{"file only", []string{"-c", withFile}, "/tmp/file.sock", "127.0.0.1:9001"},
		{"flags override the file", []string{"-c", withFile, "--socket", "/tmp/flag.sock", "--http", "127.0.0.1:9002"}, "/tmp/flag.sock", "127.0.0.1:9002"},
		{"empty flags disable", []string{"-c", withFile, "--socket", "", "--http", ""}, "", ""},
		{"single dash works too", []string{"-c", withFile, "-socket=/tmp/one.sock"}, "/tmp/one.sock", "127.0.0.1:9001"},
		{"default socket, address from mapproxy.yaml", []string{"-c", bare, "-f", tcpMP}, defaultSocket, "127.0.0.1:8111"},
		{"--http over globals.renderd.address", []string{"-c", bare, "-f", tcpMP, "--http", "127.0.0.1:9003"}, defaultSocket, "127.0.0.1:9003"},
		{"--http \"\" over globals.renderd.address", []string{"-c", bare, "-f", tcpMP, "--http="}, defaultSocket, ""},
		{"unix address from mapproxy.yaml", []string{"-c", bare, "-f", unixMP}, "/tmp/mp.sock", ""},
		{"--socket over an http+unix address", []string{"-c", bare, "-f", unixMP, "--socket", "/tmp/flag.sock"}, "/tmp/flag.sock", ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var out bytes.Buffer
			if err := run(t.Context(), append([]string{"check-config"}, tt.args...), &out, io.Discard); err != nil {
				t.Fatalf("check-config %q: %v", tt.args, err)
			}
			want := fmt.Sprintf("socket %q, http %q", tt.wantSocket, tt.wantHTTP)
			if !strings.Contains(out.String(), want) {
				t.Errorf("check-config %q: got %q, want it to contain %q", tt.args, out.String(), want)
			}
		})
	}

	var out bytes.Buffer
	err := run(t.Context(), []string{"check-config", "-c", bare, "--http", "0.0.0.0:80"}, &out, io.Discard)
	if err == nil || !strings.Contains(err.Error(), "not a loopback address") || !strings.HasPrefix(err.Error(), "--http (overrides http): ") {
		t.Errorf("--http 0.0.0.0:80: got %v, want the loopback error naming the flag", err)
	}
	err = run(t.Context(), []string{"check-config", "-c", bare, "--renderer", "2", "--max-seed-renderer", "3"}, &out, io.Discard)
	if err == nil || !strings.HasPrefix(err.Error(), "--max-seed-renderer (overrides max_seed_renderers): max_seed_renderers: ") {
		t.Errorf("--max-seed-renderer 3 with 2 renderers: got %v, want an error naming the flag", err)
	}
}

// TestListenFlagsDaemon: a real daemon listens where the flags say, not where the file says.
func TestListenFlagsDaemon(t *testing.T) {
	noRaceExitSleep(t)
	dir := shortTempDir(t)
	fileSock, flagSock := dir+"/file.sock", dir+"/flag.sock"
	tcp := freeTCPAddr(t)
	cfg := filepath.Join(dir, "r.yaml")
	os.WriteFile(cfg, []byte(fakeRendererYAML(fmt.Sprintf("renderers: 1\nsocket: %s\nhttp: %q\nstate_dir: %s/state\n", fileSock, freeTCPAddr(t), dir))), 0o644)

	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	var log syncBuffer
	go func() { done <- run(ctx, []string{"-c", cfg, "--socket", flagSock, "--http", tcp}, io.Discard, &log) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("daemon: %v\n%s", err, log.String())
		}
	}()
	deadline := time.Now().Add(lcDeadline)
	for {
		var out bytes.Buffer
		if run(t.Context(), []string{"status", "--socket", flagSock}, &out, io.Discard) == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("daemon not up on --socket %s:\n%s", flagSock, log.String())
		}
		time.Sleep(20 * time.Millisecond) // polling for start-up, bounded by the deadline
	}
	resp, err := http.Get("http://" + tcp + "/status")
	if err != nil {
		t.Fatalf("GET /status on --http %s: %v", tcp, err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Errorf("GET /status on --http: %s", resp.Status)
	}
	if _, err := os.Lstat(fileSock); err == nil {
		t.Errorf("the file's socket %s was created although --socket overrides it", fileSock)
	}
}

// TestSocketDirNotWritable: a socket whose directory the daemon may not write to fails
// with a message naming the directory, the uid, the flag and the key. As root (CI) the
// daemon runs as uid 65534 (root may write anywhere); otherwise in this process.
func TestSocketDirNotWritable(t *testing.T) {
	dir := shortTempDir(t)
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	locked := filepath.Join(dir, "locked")
	if err := os.Mkdir(locked, 0o555); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(locked, "r.sock")
	cfg := filepath.Join(dir, "r.yaml")
	os.WriteFile(cfg, []byte("renderers: 1\nhttp: \"\"\nrenderer_command: [/bin/false]\n"), 0o644)
	args := []string{"-c", cfg, "--socket", sock}

	var msg string
	uid := os.Getuid()
	if uid == 0 {
		const nobody = 65534
		uid = nobody
		bin := filepath.Join(dir, "daemon.test")
		src, err := os.ReadFile(os.Args[0])
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(bin, src, 0o755); err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(t.Context(), lcDeadline)
		defer cancel()
		cmd := exec.CommandContext(ctx, bin, append([]string{"daemon"}, args...)...)
		cmd.Env = lcEnv()
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: nobody, Gid: nobody}}
		cmd.WaitDelay = 5 * time.Second
		out, err := cmd.CombinedOutput()
		if err == nil {
			t.Fatalf("daemon as uid %d started with an unwritable socket directory:\n%s", nobody, out)
		}
		msg = string(out)
	} else {
		err := run(t.Context(), args, io.Discard, io.Discard)
		if err == nil {
			t.Fatal("daemon started with an unwritable socket directory")
		}
		msg = err.Error()
	}
	for _, want := range []string{
		"socket " + sock,
		fmt.Sprintf("directory %s is not writable by uid %d", locked, uid),
		"--socket PATH", "socket: in renderd.yaml",
	} {
		if !strings.Contains(msg, want) {
			t.Errorf("got %q, want it to contain %q", msg, want)
		}
	}

	err := run(t.Context(), []string{"-c", cfg, "--socket", filepath.Join(dir, "missing", "r.sock")}, io.Discard, io.Discard)
	if err == nil || !strings.Contains(err.Error(), "directory "+filepath.Join(dir, "missing")+" does not exist") || !strings.Contains(err.Error(), "--socket PATH") {
		t.Errorf("missing directory: got %v", err)
	}
	if _, err := net.Dial("unix", sock); err == nil {
		t.Error("something listens on the socket")
	}
}

// TestStartFailureCarriesStderr: when the renderers fail at start, the fatal error carries
// the last stderr lines of the failing renderer, oldest first.
func TestStartFailureCarriesStderr(t *testing.T) {
	noRaceExitSleep(t)
	dir := shortTempDir(t)
	cfg := fmt.Sprintf("socket: %s/s.sock\nhttp: \"\"\nrenderers: 2\nrenderer_command: [%q, fake-renderer, -stderr-lines, 8, -no-ready]\nstate_dir: %s/state\n", dir, os.Args[0], dir)
	os.WriteFile(dir+"/r.yaml", []byte(cfg), 0o644)
	err := run(t.Context(), []string{"-c", dir + "/r.yaml"}, io.Discard, io.Discard)
	if err == nil {
		t.Fatal("the daemon started with renderers that cannot")
	}
	msg := err.Error()
	want := "closed its output before its ready line (exited with status 2); its last stderr lines: " +
		"fake renderer: stderr line 5 | fake renderer: stderr line 6 | fake renderer: stderr line 7 | " +
		"fake renderer: stderr line 8 | fake renderer: refusing to start"
	if !strings.HasPrefix(msg, "renderers did not start: renderer ") || !strings.HasSuffix(msg, want) {
		t.Errorf("got  %q\nwant \"renderers did not start: renderer … (pid …): %s\"", msg, want)
	}
}

func TestLineTail(t *testing.T) {
	r := lineTail{max: stderrTailLines, width: stderrTailBytes}
	if got := r.String(); got != "" {
		t.Errorf("empty tail: got %q", got)
	}
	for i := 1; i <= 3; i++ {
		r.add(fmt.Sprint(i))
	}
	if got := r.String(); got != "1 | 2 | 3" {
		t.Errorf("3 lines: got %q, want 1 | 2 | 3", got)
	}
	for i := 4; i <= 12; i++ {
		r.add(fmt.Sprint(i))
	}
	if got := r.String(); got != "8 | 9 | 10 | 11 | 12" {
		t.Errorf("12 lines: got %q, want 8 | 9 | 10 | 11 | 12", got)
	}
	r.add(strings.Repeat("x", 1000))
	if got := r.lines[4]; len(got) > stderrTailBytes+len("…") {
		t.Errorf("a long line is kept with %d bytes, want at most %d", len(got), stderrTailBytes)
	}
}

// brokenMapProxyConfigs are MapProxy configurations that MapProxy 1.15 cannot load, each
// with a piece of MapProxy's own message.
var brokenMapProxyConfigs = []struct{ name, yaml, want string }{
	{"unknown source", `
caches:
  c:
    grids: [GLOBAL_WEBMERCATOR]
    sources: [nosuch]
layers:
  - name: l
    title: l
    sources: [c]
services:
  wms:
`, "ConfigurationError: unknown source nosuch"},
	// yaml.v3 reads the first document (no renderd address) and says nothing; PyYAML
	// refuses the file.
	{"two YAML documents", `
services:
  wms:
---
globals:
  renderd:
    address: http://127.0.0.1:8111
`, "expected a single document in the stream"},
}

// TestCheckConfigLoadsMapProxy: check-config loads mapproxy.yaml with MapProxy, as the
// renderers will, and reports MapProxy's message and failure; a good one lists its caches.
func TestCheckConfigLoadsMapProxy(t *testing.T) {
	requireMapProxy(t)
	dir := t.TempDir()
	for _, tt := range brokenMapProxyConfigs {
		t.Run(tt.name, func(t *testing.T) {
			path := filepath.Join(dir, strings.ReplaceAll(tt.name, " ", "_")+".yaml")
			os.WriteFile(path, []byte(tt.yaml), 0o644)
			var out bytes.Buffer
			err := run(t.Context(), []string{"check-config", "-f", path}, &out, io.Discard)
			if err == nil {
				t.Fatalf("check-config said ok for a configuration MapProxy cannot load:\n%s", out.String())
			}
			if msg := err.Error(); !strings.Contains(msg, "MapProxy cannot load it") || !strings.Contains(msg, "exit status 1") || !strings.Contains(msg, tt.want) {
				t.Errorf("got %q, want MapProxy's message %q and its exit status", msg, tt.want)
			}
			if strings.Contains(out.String(), "ok:") {
				t.Errorf("stdout says ok: %q", out.String())
			}
		})
	}

	// The shipped example loads, and the caches are listed.
	var out bytes.Buffer
	if err := run(t.Context(), []string{"check-config", "-f", "examples/mapproxy.yaml", "-c", "examples/renderd.yaml"}, &out, io.Discard); err != nil {
		t.Fatalf("examples: %v\n%s", err, out.String())
	}
	for _, want := range []string{"loaded it: 3 caches", "wms_cache_GLOBAL_WEBMERCATOR (metatile 4x4)", "ok: "} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("examples: got %q, want it to contain %q", out.String(), want)
		}
	}

	if strings.Contains(out.String(), "warning:") {
		t.Errorf("examples (TCP address): got a warning: %q", out.String())
	}

	// An http+unix:// address: a warning naming the clients that need the monkeypatch or
	// the module (docs/design.md §16).
	example, err := os.ReadFile("examples/mapproxy.yaml")
	if err != nil {
		t.Fatal(err)
	}
	unixConf := filepath.Join(dir, "unix.yaml")
	os.WriteFile(unixConf, []byte(strings.Replace(string(example), "address: http://127.0.0.1:8111",
		"address: http+unix://%2Frun%2Fmapproxy-renderd.sock/", 1)), 0o644)
	out.Reset()
	if err := run(t.Context(), []string{"check-config", "-f", unixConf, "-c", "examples/renderd.yaml"}, &out, io.Discard); err != nil {
		t.Fatalf("http+unix address: %v\n%s", err, out.String())
	}
	for _, want := range []string{"warning: globals: renderd.address is http+unix://", "requests_unixsocket.monkeypatch()",
		"install-module", "mapproxy-seed", "invalid JSON", "ok: "} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("http+unix address: got %q, want it to contain %q", out.String(), want)
		}
	}

	// A custom renderer: not checked, and check-config says so.
	rd := filepath.Join(dir, "custom.yaml")
	os.WriteFile(rd, []byte(fakeRendererYAML("")), 0o644)
	out.Reset()
	bad := filepath.Join(dir, "unknown_source.yaml")
	if err := run(t.Context(), []string{"check-config", "-f", bad, "-c", rd}, &out, io.Discard); err != nil {
		t.Fatalf("custom renderer: %v", err)
	}
	if !strings.Contains(out.String(), "mapproxy: not checked: renderer_command is set") {
		t.Errorf("custom renderer: got %q, want it to say the MapProxy check was skipped", out.String())
	}
}

// TestMapProxyStartFailureMessage: the bundled worker on a configuration MapProxy cannot
// load: the daemon exits with MapProxy's message in its fatal error.
func TestMapProxyStartFailureMessage(t *testing.T) {
	requireMapProxy(t)
	dir := shortTempDir(t)
	rd := filepath.Join(dir, "renderd.yaml") // only a state_dir of its own, never the shared default
	os.WriteFile(rd, []byte("state_dir: "+dir+"/state\n"), 0o644)
	for _, tt := range brokenMapProxyConfigs {
		t.Run(tt.name, func(t *testing.T) {
			path := filepath.Join(dir, strings.ReplaceAll(tt.name, " ", "_")+".yaml")
			os.WriteFile(path, []byte(tt.yaml), 0o644)
			err := run(t.Context(), []string{"-f", path, "-c", rd, "--renderer", "1", "--socket", dir + "/s.sock", "--http", ""}, io.Discard, io.Discard)
			if err == nil || !strings.Contains(err.Error(), "renderers did not start") || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("got %v, want a start error with MapProxy's message %q", err, tt.want)
			}
		})
	}
}

// TestCheckConfigLoadsSeedConfig: with seed_config (-s), check-config also builds every seed
// and cleanup with MapProxy's seed loader; a seed naming an unknown cache fails with
// MapProxy's message.
func TestCheckConfigLoadsSeedConfig(t *testing.T) {
	requireMapProxy(t)
	dir := t.TempDir()
	var out bytes.Buffer
	if err := run(t.Context(), []string{"check-config", "-f", "examples/mapproxy.yaml", "-s", "examples/seed.yaml"}, &out, io.Discard); err != nil {
		t.Fatalf("examples: %v\n%s", err, out.String())
	}
	if !strings.Contains(out.String(), "2 seed tasks (initial, refresh), 0 cleanup tasks") {
		t.Errorf("examples: got %q, want the seed tasks listed", out.String())
	}
	bad := filepath.Join(dir, "seed.yaml")
	os.WriteFile(bad, []byte("seeds:\n  x:\n    caches: [nosuch_cache]\n    levels: {to: 3}\n"), 0o644)
	out.Reset()
	err := run(t.Context(), []string{"check-config", "-f", "examples/mapproxy.yaml", "-s", bad}, &out, io.Discard)
	if err == nil || !strings.Contains(err.Error(), "cache nosuch_cache not found") || !strings.Contains(err.Error(), "seed_config "+bad) {
		t.Errorf("unknown cache in seed.yaml: got %v, want MapProxy's message naming seed_config", err)
	}
}

func TestDevVersion(t *testing.T) {
	rev := []debug.BuildSetting{{Key: "vcs.revision", Value: "0123456789abcdef0123"}}
	tests := []struct {
		name string
		info *debug.BuildInfo
		ok   bool
		want string
	}{
		{"no build info", nil, false, "dev"},
		{"no VCS", &debug.BuildInfo{}, true, "dev"},
		{"clean", &debug.BuildInfo{Settings: append(rev, debug.BuildSetting{Key: "vcs.modified", Value: "false"})}, true, "dev+0123456789ab"},
		{"modified", &debug.BuildInfo{Settings: append(rev, debug.BuildSetting{Key: "vcs.modified", Value: "true"})}, true, "dev+0123456789ab-dirty"},
	}
	for _, tt := range tests {
		if got := devVersion(tt.info, tt.ok); got != tt.want {
			t.Errorf("%s: devVersion = %q, want %q", tt.name, got, tt.want)
		}
	}
}
