// SPDX-License-Identifier: Apache-2.0

package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestRendererAnswersEveryJob(t *testing.T) {
	logPath := filepath.Join(t.TempDir(), "renders.log")
	in := strings.NewReader(`{"id":"a","command":"tile","cache_identifier":"c","tiles":[[8,16,5]]}` + "\n" +
		`{"id":"b","command":"seed"}` + "\n")
	var out bytes.Buffer
	if err := run([]string{"-log", logPath}, in, &out); err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSpace(out.String()), "\n")
	if len(lines) != 3 {
		t.Fatalf("got %d lines %q, want ready + 2 answers", len(lines), lines)
	}
	var ready struct {
		Ready  bool                                  `json:"ready"`
		Caches map[string]map[string]json.RawMessage `json:"caches"`
	}
	if err := json.Unmarshal([]byte(lines[0]), &ready); err != nil || !ready.Ready {
		t.Fatalf("ready line = %q, %v", lines[0], err)
	}
	if got := string(ready.Caches["bench_GLOBAL_WEBMERCATOR"]["meta_size"]); got != "[8,8]" {
		t.Errorf("meta_size = %s, want [8,8]", got)
	}
	if lines[1] != `{"id":"a","status":"ok"}` {
		t.Errorf("first answer = %q, want ok for a", lines[1])
	}
	if !strings.Contains(lines[2], `"id":"b","status":"error"`) {
		t.Errorf("second answer = %q, want an error for an unknown command", lines[2])
	}
	b, err := os.ReadFile(logPath)
	if err != nil {
		t.Fatal(err)
	}
	if first, _, _ := strings.Cut(string(b), "\n"); !strings.HasSuffix(first, " c 8 16 5") {
		t.Errorf("render log = %q, want a line ending in \" c 8 16 5\"", b)
	}
}

func TestRendererSleepsAndStopsAtEndOfInput(t *testing.T) {
	inR, inW := io.Pipe()
	outR, outW := io.Pipe()
	done := make(chan error, 1)
	go func() {
		done <- run([]string{"-sleep", "20ms"}, inR, outW)
		outW.Close()
	}()
	r := bufio.NewReader(outR)
	if _, err := r.ReadString('\n'); err != nil {
		t.Fatalf("ready line: %v", err)
	}
	start := time.Now()
	io.WriteString(inW, `{"id":"a","command":"tile","cache_identifier":"c","tiles":[[0,0,1]]}`+"\n")
	line, err := r.ReadString('\n')
	if err != nil || line != `{"id":"a","status":"ok"}`+"\n" {
		t.Fatalf("answer = %q, %v", line, err)
	}
	if d := time.Since(start); d < 20*time.Millisecond {
		t.Errorf("answered after %v, want at least the 20ms sleep", d)
	}
	// A job in progress must not keep the renderer alive after end of input.
	go io.Copy(io.Discard, r)
	io.WriteString(inW, `{"id":"b","command":"tile","cache_identifier":"c","tiles":[[0,0,1]]}`+"\n")
	inW.Close()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("run = %v, want nil at end of input", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("renderer did not stop at end of input")
	}
}
