// SPDX-License-Identifier: Apache-2.0

package main

import (
	"os"
	"path/filepath"
	"testing"
	"time"
)

func TestMessageRoundTrip(t *testing.T) {
	in := "type=metatile_render_request\nid=7\nmap=m0\nx=8\ny=16\nz=5\nprio=1\n"
	fs := parseMsg([]byte(in))
	fs = set(fs, "result", "ok")
	fs = set(fs, "render_time", "0")
	got := string(serialize(fs))
	want := in + "result=ok\nrender_time=0\n"
	if got != want {
		t.Errorf("reply = %q, want %q", got, want)
	}
	if get(fs, "map") != "m0" {
		t.Errorf("map = %q, want m0", get(fs, "map"))
	}
}

func TestReadMaps(t *testing.T) {
	dir := t.TempDir()
	f := filepath.Join(dir, "m50.conf")
	if err := os.WriteFile(f, []byte("# comment\nname=m50\ntiledir=/x\nsleep_ms = 50 # slow\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	maps, err := readMaps([]string{f})
	if err != nil {
		t.Fatal(err)
	}
	if got := maps["m50"].sleep; got != 50*time.Millisecond {
		t.Errorf("sleep = %v, want 50ms", got)
	}
	bad := filepath.Join(dir, "bad.conf")
	os.WriteFile(bad, []byte("tiledir=/x\n"), 0o644)
	if _, err := readMaps([]string{bad}); err == nil {
		t.Error("a map config without a name was accepted")
	}
}
