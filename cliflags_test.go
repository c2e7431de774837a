// SPDX-License-Identifier: Apache-2.0

package main

import (
	"bytes"
	"context"
	"flag"
	"io"
	"slices"
	"strings"
	"testing"
	"time"
)

func TestParseArgsTakesFlagsAnywhere(t *testing.T) {
	for _, tc := range []struct {
		args []string
		pos  []string
		wait bool
		sock string
	}{
		{[]string{"initial", "--wait"}, []string{"initial"}, true, ""},
		{[]string{"--wait", "initial"}, []string{"initial"}, true, ""},
		{[]string{"a", "--socket", "S", "b", "-wait"}, []string{"a", "b"}, true, "S"},
		{[]string{"t3", "--socket=S"}, []string{"t3"}, false, "S"},
		{[]string{"a", "--", "--wait", "-x"}, []string{"a", "--wait", "-x"}, false, ""},
		{[]string{"--", "b"}, []string{"b"}, false, ""},
		{[]string{"-", "--wait"}, []string{"-"}, true, ""},
		{nil, nil, false, ""},
	} {
		fs := flag.NewFlagSet("x", flag.ContinueOnError)
		fs.SetOutput(io.Discard)
		wait := fs.Bool("wait", false, "")
		sock := fs.String("socket", "", "")
		pos, err := parseArgs(fs, tc.args)
		if err != nil || !slices.Equal(pos, tc.pos) || *wait != tc.wait || *sock != tc.sock {
			t.Errorf("%q: got %q wait %v socket %q (%v), want %q %v %q", tc.args, pos, *wait, *sock, err, tc.pos, tc.wait, tc.sock)
		}
	}
	fs := flag.NewFlagSet("x", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	if _, err := parseArgs(fs, []string{"a", "--nope"}); err == nil {
		t.Error("an unknown flag after a positional argument was accepted")
	}
}

func TestParseHTTPTarget(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want daemonTarget
		bad  bool
	}{
		{"127.0.0.1:8111", daemonTarget{network: "tcp", addr: "127.0.0.1:8111"}, false},
		{"[::1]:8111", daemonTarget{network: "tcp", addr: "[::1]:8111"}, false},
		{"http://127.0.0.1:8111", daemonTarget{url: "http://127.0.0.1:8111"}, false},
		{"http://127.0.0.1:8111/", daemonTarget{url: "http://127.0.0.1:8111"}, false},
		{"https://tiles.example/renderd/", daemonTarget{url: "https://tiles.example/renderd"}, false},
		{"http://", daemonTarget{}, true},
		{"localhost", daemonTarget{}, true},
		{"http://h:1/?q=1", daemonTarget{}, true},
	} {
		got, err := parseHTTPTarget(tc.in)
		if (err != nil) != tc.bad || got != tc.want {
			t.Errorf("%q: got %+v, %v; want %+v, error %v", tc.in, got, err, tc.want, tc.bad)
		}
		if err != nil && !strings.Contains(err.Error(), "--http") {
			t.Errorf("%q: error %q does not name --http", tc.in, err)
		}
	}
}

// TestClientFlagsEverywhere runs the client commands against a real daemon (fake planner
// and renderers) with flags after names, --http as host:port and as a URL, and the old
// -s spelling for the socket.
func TestClientFlagsEverywhere(t *testing.T) {
	r := newTaskRig(t, taskRigOpts{daemonOpts: daemonOpts{renderers: 2, maxSeed: 2, tcp: true}, plannerArgs: []string{"-n", "5"}})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cli := func(args ...string) (string, string, error) {
		var out, errOut bytes.Buffer
		err := run(ctx, args, &out, &errOut)
		return out.String(), errOut.String(), err
	}
	// README's own line: flags after the name.
	out, errOut, err := cli("seed", "all", "--wait", "--socket", r.socket)
	if err != nil || !strings.Contains(out, "all seed done") || strings.Contains(errOut, "--wait") {
		t.Fatalf("seed all --wait --socket: err %v, out %q, stderr %q", err, out, errOut)
	}
	if rep := r.call(`{"command":"task","task_id":"t2"}`); rep.Status != statusError {
		t.Errorf("seed all --wait started a second task (a task named --wait?): %+v", rep)
	}
	for _, args := range [][]string{
		{"task", "t1", "--socket", r.socket},
		{"task", "--socket", r.socket, "t1"},
		{"task", "t1", "--http", r.tcp},
		{"task", "t1", "--http", "http://" + r.tcp},
		{"task", "t1", "--http", "http://" + r.tcp + "/"},
		{"task", "t1", "-c", r.testDaemon.dir + "/renderd.yaml"}, // the socket from renderd.yaml
		{"cancel", "t1", "-c", r.testDaemon.dir + "/renderd.yaml"},
	} {
		out, errOut, err := cli(args...)
		if args[0] == "cancel" && strings.Contains(out, "already ended") { // exit 1: t1 is done
			err = nil
		}
		if err != nil || !strings.Contains(out, `"task_id":"t1"`) || !strings.Contains(out, `"state":"done"`) {
			t.Errorf("%q: err %v, out %q, stderr %q", args, err, out, errOut)
		}
	}
	for _, args := range [][]string{
		{"tasks", "--http", "http://" + r.tcp},
		{"tasks", "--http", r.tcp},
		{"tasks", "--socket", r.socket},
	} {
		out, errOut, err := cli(args...)
		if err != nil || !strings.Contains(out, "t1") || !strings.Contains(out, "done") {
			t.Errorf("%q: err %v, out %q, stderr %q", args, err, out, errOut)
		}
	}
	for _, args := range [][]string{
		{"top", "--once", "--http", "http://" + r.tcp},
		{"top", "--http", r.tcp, "--once"},
		{"status", "--http", "http://" + r.tcp},
		{"status", "--http", r.tcp},
	} {
		out, errOut, err := cli(args...)
		if err != nil || !strings.Contains(out, "renderers") {
			t.Errorf("%q: err %v, out %q, stderr %q", args, err, tail(out, 300), errOut)
		}
	}
	// The old spelling: -s PATH for the socket, with a deprecation line.
	for _, args := range [][]string{
		{"status", "-s", r.socket},
		{"task", "t1", "-s", r.socket},
		{"seed", "-s", r.socket, "all"}, // seed's -s is seed.yaml; a socket there is the old spelling
	} {
		out, errOut, err := cli(args...)
		if err != nil || out == "" || !strings.Contains(errOut, "deprecated; use --socket") {
			t.Errorf("%q: err %v, out %q, stderr %q; want the reply and a deprecation line", args, err, out, errOut)
		}
	}
	// seed -s is seed.yaml (as for mapproxy-seed), wherever it stands.
	if out, errOut, err := cli("seed", "all", "-s", r.seedConfig, "--socket", r.socket); err != nil || !strings.Contains(out, `"status":"queued"`) || errOut != "" {
		t.Errorf("seed all -s seed.yaml: err %v, out %q, stderr %q", err, out, errOut)
	}
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"task", "t1", "t2", "--socket", r.socket}, `task takes one task id, got ["t1" "t2"]`},
		{[]string{"tasks", "extra", "--socket", r.socket}, "tasks takes no arguments"},
		{[]string{"tasks", "--http", "nohost"}, "--http: want host:port"},
		{[]string{"top", "--once", "--http", "localhost"}, "--http: want host:port"},
	} {
		if _, _, err := cli(tc.args...); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%q: got error %v, want %q", tc.args, err, tc.want)
		}
	}
}
