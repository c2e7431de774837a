// SPDX-License-Identifier: Apache-2.0

package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"
)

// docCommand is how TestDocumentedCommandsRun treats one command line of README.md or the
// man page: run (against the test daemon, with the documented paths mapped into the
// test's directory), or skip, with the reason.
type docCommand struct {
	skip string // why it is not run; "" = run
	// daemon: the line starts a daemon; it is run until it serves, then stopped.
	daemon bool
	// extra arguments appended (the flags-after-arguments rule makes that safe), and why.
	extra []string
	// want is a substring of the output; wantExit1 accepts exit status 1 when the output
	// says so (e.g. cancelling a task that has ended).
	want      string
	wantExit1 string
}

// documentedCommands lists every `mapproxy-renderd …` line of a code block in README.md
// and of a .nf block in packaging/mapproxy-renderd.8. A line missing here fails the test,
// as does an entry no document has any more.
var documentedCommands = map[string]docCommand{
	// Synopses: options in brackets or placeholders, not command lines. Each form is run by
	// TestClientFlagsEverywhere and the daemon tests.
	"mapproxy-renderd -f /etc/mapproxy/mapproxy.yaml [--renderer N] [--max-seed-renderer M] [--socket PATH] [--http ADDR]":           {skip: "synopsis"},
	"mapproxy-renderd status  [--socket /run/mapproxy-renderd.sock | --http 127.0.0.1:8111 | -f … | -c …]":                           {skip: "synopsis"},
	`mapproxy-renderd request [--socket …] '{"command":"tile","cache_identifier":"osm_cache_GLOBAL_WEBMERCATOR","tiles":[[1,2,3]]}'`: {skip: "synopsis"},
	"mapproxy-renderd request --http http://127.0.0.1:8111 '…'":                                                                      {skip: "synopsis ('…' stands for a request)"},
	"mapproxy-renderd top     [--socket …] [--once] [--interval 1s]":                                                                 {skip: "synopsis; top without --once needs a terminal (top_test.go runs it in tmux)"},

	"mapproxy-renderd check-config -f mapproxy.yaml -c renderd.yaml":                                                         {want: "ok: socket"},
	"mapproxy-renderd check-config -f /etc/mapproxy/mapproxy.yaml -s /etc/mapproxy/seed.yaml":                                {want: "ok: socket"},
	"mapproxy-renderd check-config -f /etc/mapproxy/mapproxy.yaml -c /etc/mapproxy-renderd/renderd.yaml":                     {want: "ok: socket"},
	"mapproxy-renderd expire --cache osm_cache_GLOBAL_WEBMERCATOR --min-zoom 10 --max-zoom 18 --delete-from 17 < dirty.list": {want: `"kind":"expire"`},
	// The default socket /run/mapproxy-renderd.sock is machine state: the test's instead.
	// Without -c a daemon journals into the default state_dir, machine state: -c gives it a
	// renderd.yaml that says only journal: false.
	"mapproxy-renderd -f /etc/mapproxy/mapproxy.yaml -s /etc/mapproxy/seed.yaml":         {daemon: true, extra: []string{"--socket", "SOCK2", "--renderer", "1", "-c", "NOJOURNAL"}},
	"mapproxy-renderd -f mapproxy.yaml --socket /tmp/renderd.sock --renderer 4":          {daemon: true, extra: []string{"-c", "NOJOURNAL"}},
	"mapproxy-renderd seed initial --wait":                                               {want: "initial seed done"},
	"mapproxy-renderd seed -s other refresh drop_high":                                   {want: `"name":"drop_high"`},
	"mapproxy-renderd tasks":                                                             {want: "STATE"},
	"mapproxy-renderd task t3":                                                           {want: `"task_id":"t3"`},
	"mapproxy-renderd cancel t3":                                                         {want: `"task_id":"t3"`, wantExit1: "already ended"},
	"mapproxy-renderd seed --wait refresh":                                               {want: "refresh seed done"},
	"mapproxy-renderd install-module":                                                    {skip: "writes into the system python's site directory, machine state a test must not touch; TestInstallModuleDefaultDir checks which directory, TestMapProxyModuleAsDocumented installs into its own"},
	"mapproxy-renderd seed --rate 2 initial --wait":                                      {want: "initial seed done"},
	"mapproxy-renderd expire --cache osm_cache_GLOBAL_WEBMERCATOR --rate 5 < dirty.list": {want: `"kind":"expire"`},
	"mapproxy-renderd seed old_tiles --wait":                                             {want: "old_tiles cleanup done"},
}

// documentedCommandLines extracts the command lines: trimmed, the comment after " # " cut,
// the man page's \- unescaped; a systemd ExecStart= line counts by its command.
func documentedCommandLines(t *testing.T) []string {
	t.Helper()
	var lines []string
	add := func(l string) {
		l = strings.TrimSpace(l)
		l = strings.TrimPrefix(l, "ExecStart=/usr/bin/")
		if i := strings.Index(l, "   #"); i >= 0 {
			l = l[:i]
		} else if i := strings.Index(l, "  #"); i >= 0 {
			l = l[:i]
		}
		l = strings.TrimSpace(l)
		if strings.HasPrefix(l, "mapproxy-renderd ") && !slices.Contains(lines, l) {
			lines = append(lines, l)
		}
	}
	readme, err := os.ReadFile("README.md")
	if err != nil {
		t.Fatal(err)
	}
	in := false
	for _, l := range strings.Split(string(readme), "\n") {
		if strings.HasPrefix(strings.TrimSpace(l), "```") {
			in = !in
			continue
		}
		if in {
			add(l)
		}
	}
	man, err := os.ReadFile("packaging/mapproxy-renderd.8")
	if err != nil {
		t.Fatal(err)
	}
	in = false
	for _, l := range strings.Split(string(man), "\n") {
		switch {
		case strings.HasPrefix(l, ".nf"):
			in = true
		case strings.HasPrefix(l, ".fi"):
			in = false
		case in:
			add(strings.ReplaceAll(l, `\-`, "-"))
		}
	}
	return lines
}

// splitCommand splits a documented line into words (single quotes group), and a stdin
// redirection "< FILE".
func splitCommand(l string) (words []string, stdin string) {
	var cur strings.Builder
	inWord, quoted := false, false
	for _, r := range l {
		switch {
		case r == '\'':
			quoted, inWord = !quoted, true
		case r == ' ' && !quoted:
			if inWord {
				words = append(words, cur.String())
				cur.Reset()
				inWord = false
			}
		default:
			cur.WriteRune(r)
			inWord = true
		}
	}
	if inWord {
		words = append(words, cur.String())
	}
	if i := slices.Index(words, "<"); i >= 0 && i+1 < len(words) {
		stdin = words[i+1]
		words = slices.Delete(words, i, i+2)
	}
	return words, stdin
}

// TestDocumentedCommandsRun runs every command line of README.md and the man page against
// a real daemon (fake renderers and planner; check-config and the daemon lines load the
// example mapproxy.yaml with real MapProxy), with /etc/mapproxy/…, /etc/mapproxy-renderd/…
// and /tmp/… mapped into the test's directory. Client commands get --socket of the test
// daemon appended: they document the default socket, /run/mapproxy-renderd.sock.
func TestDocumentedCommandsRun(t *testing.T) {
	requireMapProxy(t)
	lines := documentedCommandLines(t)
	for _, l := range lines {
		if _, ok := documentedCommands[l]; !ok {
			t.Errorf("documented command not in documentedCommands (run it or say why not): %q", l)
		}
	}
	for l := range documentedCommands {
		if !slices.Contains(lines, l) {
			t.Errorf("documentedCommands lists %q, which no document has", l)
		}
	}
	if t.Failed() {
		return
	}

	dir := shortTempDir(t)
	repo, _ := os.Getwd()
	mp, err := os.ReadFile(filepath.Join(repo, "examples/mapproxy.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	// The example's renderd address is 127.0.0.1:8111: a free port instead (shared machine).
	mp = bytes.ReplaceAll(mp, []byte("http://127.0.0.1:8111"), []byte("http://"+freeTCPAddr(t)))
	seedYAML := `coverages:
  small: {bbox: [8.0, 47.5, 12.0, 50.0], srs: 'EPSG:4326'}
seeds:
  initial: {caches: [wms_cache], coverages: [small], levels: {to: 3}}
  refresh: {caches: [wms_cache], coverages: [small], levels: {to: 3}, refresh_before: {seconds: 0}}
cleanups:
  drop_high: {caches: [wms_cache], levels: {from: 15}}
  old_tiles: {caches: [wms_cache], remove_before: {days: 30}}
`
	exe := lcExecutable(t)
	sock := dir + "/renderd-test.sock"
	planner, _ := json.Marshal([]string{exe, "fake-planner", "-n", "5", "-cache", "osm_cache_GLOBAL_WEBMERCATOR", "-z", "10"})
	rend, _ := json.Marshal([]string{exe, "fake-renderer", "-caches", `{"osm_cache_GLOBAL_WEBMERCATOR":{"meta_size":[1,1],"xyz":"nw"}}`})
	renderdYAML := fmt.Sprintf("socket: %s\nhttp: \"\"\nrenderers: 2\nmax_seed_renderers: 2\nrenderer_command: %s\nplanner_command: %s\nseed_config: %s/seed.yaml\nseed_configs: {other: %s/other-seed.yaml}\nstate_dir: %s/state\n",
		sock, rend, planner, dir, dir, dir)
	files := map[string]string{"mapproxy.yaml": string(mp), "seed.yaml": seedYAML, "other-seed.yaml": seedYAML,
		"renderd.yaml": renderdYAML, "nojournal.yaml": "journal: false\n", "dirty.list": "15/17000/11000\n15/17001/11000\n"}
	for name, content := range files {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	noRaceExitSleep(t)
	d := runConfiguredDaemon(t, sock, &syncBuffer{}, "-c", dir+"/renderd.yaml")
	_ = d

	mapPath := func(w string) string {
		for _, p := range []string{"/etc/mapproxy-renderd/", "/etc/mapproxy/", "/tmp/"} {
			if strings.HasPrefix(w, p) {
				return filepath.Join(dir, strings.TrimPrefix(w, p))
			}
		}
		if _, ok := files[w]; ok {
			return filepath.Join(dir, w)
		}
		if w == "NOJOURNAL" {
			return filepath.Join(dir, "nojournal.yaml")
		}
		return strings.ReplaceAll(w, "SOCK2", dir+"/daemon2.sock")
	}
	// The order of the documents: task ids (t3) refer to the tasks the lines before started.
	for _, l := range lines {
		dc := documentedCommands[l]
		t.Run(l, func(t *testing.T) {
			if dc.skip != "" {
				t.Skip(dc.skip)
			}
			words, stdinFile := splitCommand(l)
			args := append(slices.Clone(words[1:]), dc.extra...)
			for i, w := range args {
				args[i] = mapPath(w)
			}
			if dc.daemon {
				runDocumentedDaemon(t, args)
				return
			}
			client := !slices.Contains([]string{"check-config", "install-module"}, args[0])
			if client && !slices.Contains(args, "--socket") && !slices.Contains(args, "--http") {
				args = append(args, "--socket", sock)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
			defer cancel()
			var out, errOut bytes.Buffer
			if args[0] == "install-module" {
				os.MkdirAll(args[1], 0o755)
			}
			if stdinFile != "" {
				f, err := os.Open(mapPath(stdinFile))
				if err != nil {
					t.Fatal(err)
				}
				defer f.Close()
				err = runExpireClient(ctx, args[1:], f, &out, &errOut)
				checkDocRun(t, l, dc, err, out.String(), errOut.String())
				return
			}
			err := run(ctx, args, &out, &errOut)
			if args[0] == "install-module" {
				if _, serr := os.Stat(filepath.Join(args[1], "mapproxy_renderd.py")); serr != nil {
					t.Errorf("%s: %v", l, serr)
				}
				checkDocRun(t, l, dc, err, "mapproxy_renderd.py "+out.String(), errOut.String())
				return
			}
			checkDocRun(t, l, dc, err, out.String(), errOut.String())
		})
	}
}

func checkDocRun(t *testing.T, line string, dc docCommand, err error, out, errOut string) {
	t.Helper()
	var ec exitCode
	switch {
	case err == nil && strings.Contains(out, dc.want):
	case errors.As(err, &ec) && ec == 1 && dc.wantExit1 != "" && strings.Contains(out, dc.wantExit1) && strings.Contains(out, dc.want):
	default:
		t.Errorf("%s: err %v, want output containing %q; stdout:\n%s\nstderr:\n%s", line, err, dc.want, tail(out, 2000), tail(errOut, 2000))
	}
}

// runDocumentedDaemon runs a documented daemon line until it serves (its status answers),
// then stops it; it must stop cleanly.
func runDocumentedDaemon(t *testing.T, args []string) {
	t.Helper()
	sock := ""
	for i, a := range args {
		if a == "--socket" && i+1 < len(args) {
			sock = args[i+1]
		}
	}
	var log syncBuffer
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- run(ctx, args, io.Discard, &log) }()
	deadline := time.Now().Add(2 * time.Minute)
	for {
		var out bytes.Buffer
		if run(context.Background(), []string{"status", "--socket", sock, "--timeout", "5s"}, &out, io.Discard) == nil {
			break
		}
		select {
		case err := <-done:
			cancel()
			t.Fatalf("%q exited before serving: %v\n%s", args, err, tail(log.String(), 3000))
		default:
		}
		if time.Now().After(deadline) {
			cancel()
			<-done
			t.Fatalf("%q did not serve within 2 minutes:\n%s", args, tail(log.String(), 3000))
		}
		time.Sleep(50 * time.Millisecond) // polling the new daemon, bounded by the deadline
	}
	cancel()
	if err := <-done; err != nil {
		t.Errorf("%q: %v\n%s", args, err, tail(log.String(), 3000))
	}
	sc := bufio.NewScanner(strings.NewReader(log.String()))
	for sc.Scan() {
		if regexp.MustCompile(`level=ERROR`).MatchString(sc.Text()) {
			t.Errorf("%q logged an error: %s", args, sc.Text())
		}
	}
}
