// SPDX-License-Identifier: Apache-2.0

package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// markedProcesses lists the live (not zombie) processes whose environment holds marker.
func markedProcesses(t *testing.T, marker string) []string {
	t.Helper()
	ents, err := os.ReadDir("/proc")
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == os.Getpid() {
			continue
		}
		env, err := os.ReadFile(fmt.Sprintf("/proc/%d/environ", pid))
		if err != nil || !bytes.Contains(env, []byte("\x00"+marker+"\x00")) && !bytes.HasPrefix(env, []byte(marker+"\x00")) {
			continue
		}
		stat, _ := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		if i := bytes.LastIndexByte(stat, ')'); i > 0 && i+2 < len(stat) && stat[i+2] == 'Z' {
			continue
		}
		cmdline, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
		out = append(out, fmt.Sprintf("%d %s", pid, strings.ReplaceAll(string(bytes.TrimRight(cmdline, "\x00")), "\x00", " ")))
	}
	return out
}

// TestSIGKILLLeavesNoProcess (docs/design.md §8, §12): the real daemon is SIGKILLed while a
// renderer hangs on a render and a planner runs with a child of its own; within a deadline
// no process the daemon started, or that they started, is left.
func TestSIGKILLLeavesNoProcess(t *testing.T) {
	exe := lcExecutable(t)
	dir := shortTempDir(t)
	sock := dir + "/s.sock"
	marker := "MRD_PROC_TEST=" + dir
	seedYAML := filepath.Join(dir, "seed.yaml")
	if err := os.WriteFile(seedYAML, []byte("seeds:\n  all: {caches: [c]}\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	// The planner is a shell with a child of its own; it never writes, so the task runs on.
	planner, _ := json.Marshal([]string{"sh", "-c", "sleep 3000 & sleep 3001; :"})
	lcConfig(t, dir+"/renderd.yaml", sock, "", 2, []string{exe, "fake-renderer", "-log", dir + "/jobs.log", "-hang", "7"},
		fmt.Sprintf("seed_config: %s\nplanner_command: %s\n", seedYAML, planner))
	p := startLCProc(t, []string{exe, "daemon", "-c", dir + "/renderd.yaml"}, lcEnv(marker), nil)
	p.out.waitFor(t, "msg=ready", 1)

	c := lcDial(t, "unix", sock)
	defer c.c.Close()
	c.send(`{"command":"tile","id":"hang","cache_identifier":"c","tiles":[[7,0,10]]}`)
	c2 := lcDial(t, "unix", sock)
	defer c2.c.Close()
	c2.send(`{"command":"seed","id":"s","task":"all"}`)
	c2.expectReply("s", statusQueued)

	// Wait until the render hangs and the planner's child runs: 2 renderers, the reaper,
	// the planner and its two sleeps.
	deadline := time.Now().Add(lcDeadline)
	for {
		b, _ := os.ReadFile(dir + "/jobs.log")
		procs := markedProcesses(t, marker)
		if len(procs) >= 6 && bytes.Contains(b, []byte(" c 10 7 0")) {
			t.Logf("before SIGKILL: %d processes:\n%s", len(procs), strings.Join(procs, "\n"))
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the render did not hang or the planner did not start within %s: jobs %q, processes:\n%s", lcDeadline, b, strings.Join(procs, "\n"))
		}
		time.Sleep(20 * time.Millisecond) // polling, bounded by the deadline
	}

	p.signal(syscall.SIGKILL)
	p.wait(lcDeadline)
	killed := time.Now()
	deadline = killed.Add(30 * time.Second)
	for {
		procs := markedProcesses(t, marker)
		if len(procs) == 0 {
			t.Logf("0 survivors %s after SIGKILL", time.Since(killed).Round(time.Millisecond))
			break
		}
		if time.Now().After(deadline) {
			for _, l := range procs {
				if pid, err := strconv.Atoi(strings.Fields(l)[0]); err == nil {
					syscall.Kill(pid, syscall.SIGKILL) // leave nothing behind
				}
			}
			t.Fatalf("%d processes outlived the SIGKILLed daemon by %s:\n%s", len(procs), time.Since(killed), strings.Join(procs, "\n"))
		}
		time.Sleep(20 * time.Millisecond) // polling, bounded by the deadline
	}
}
