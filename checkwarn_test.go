// SPDX-License-Identifier: Apache-2.0

package main

import (
	"bytes"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// typoMapProxyYAML is a mapproxy.yaml MapProxy loads with a warning: meta_sise is no key.
const typoMapProxyYAML = `services: {wmts: {}}
layers:
  - {name: l, title: l, sources: [c]}
caches:
  c: {grids: [GLOBAL_WEBMERCATOR], sources: [s], meta_sise: [4, 4]}
sources:
  s: {type: wms, supported_srs: ['EPSG:3857'], req: {url: "http://127.0.0.1:9/service", layers: x}}
`

// typoSeedYAML is a seed.yaml MapProxy's seed loader takes with a warning (and would then
// seed every level): levles is no key.
const typoSeedYAML = `seeds:
  s1:
    caches: [c]
    levles: {to: 3}
`

// TestCheckConfigShowsMapProxyWarnings: what MapProxy's loaders only warn about is shown by
// check-config, fails it with --strict, and is logged at WARN when the daemon starts.
func TestCheckConfigShowsMapProxyWarnings(t *testing.T) {
	requireMapProxy(t)
	dir := shortTempDir(t)
	mp, seed, rd := filepath.Join(dir, "mapproxy.yaml"), filepath.Join(dir, "seed.yaml"), filepath.Join(dir, "renderd.yaml")
	os.WriteFile(mp, []byte(typoMapProxyYAML), 0o644)
	os.WriteFile(seed, []byte(typoSeedYAML), 0o644)
	os.WriteFile(rd, []byte("seed_config: "+seed+"\nstate_dir: "+dir+"/state\nsocket: "+dir+"/s.sock\nhttp: \"\"\nrenderers: 1\n"), 0o644)
	wants := []string{
		"warning: " + mp + ": unknown 'meta_sise' in caches.c",
		"warning: " + seed + ": unknown 'levles' in seeds.s1",
	}

	var out bytes.Buffer
	if err := run(t.Context(), []string{"check-config", "-f", mp, "-c", rd}, &out, io.Discard); err != nil {
		t.Fatalf("check-config without --strict: %v\n%s", err, out.String())
	}
	for _, want := range wants {
		if strings.Count(out.String(), want) != 1 {
			t.Errorf("check-config: got %q, want %q once", out.String(), want)
		}
	}
	if !strings.Contains(out.String(), "ok: ") {
		t.Errorf("check-config without --strict: got %q, want ok", out.String())
	}

	out.Reset()
	err := run(t.Context(), []string{"check-config", "--strict", "-f", mp, "-c", rd}, &out, io.Discard)
	if err == nil || !strings.Contains(err.Error(), "--strict") || !strings.Contains(err.Error(), "meta_sise") || !strings.Contains(err.Error(), "levles") {
		t.Errorf("check-config --strict: got %v, want an error naming meta_sise and levles", err)
	}
	if strings.Contains(out.String(), "ok: ") {
		t.Errorf("check-config --strict: stdout says ok: %q", out.String())
	}

	// A clean configuration passes --strict.
	os.WriteFile(mp, []byte(strings.Replace(typoMapProxyYAML, "meta_sise", "meta_size", 1)), 0o644)
	os.WriteFile(seed, []byte(strings.Replace(typoSeedYAML, "levles", "levels", 1)), 0o644)
	out.Reset()
	if err := run(t.Context(), []string{"check-config", "--strict", "-f", mp, "-c", rd}, &out, io.Discard); err != nil || strings.Contains(out.String(), "warning:") {
		t.Errorf("check-config --strict on a clean configuration: %v\n%s", err, out.String())
	}

	// The daemon logs them at WARN once it has started.
	os.WriteFile(mp, []byte(typoMapProxyYAML), 0o644)
	os.WriteFile(seed, []byte(typoSeedYAML), 0o644)
	log := &syncBuffer{}
	runConfiguredDaemon(t, dir+"/s.sock", log, "-f", mp, "-c", rd)
	deadline := time.Now().Add(60 * time.Second)
	for _, want := range []string{"meta_sise", "levles"} {
		for !hasWarnLine(log.String(), want) {
			if time.Now().After(deadline) {
				t.Fatalf("daemon log has no WARN line naming %s:\n%s", want, log.String())
			}
			time.Sleep(20 * time.Millisecond) // polling the log, bounded by the deadline
		}
	}
}

func hasWarnLine(log, word string) bool {
	for line := range strings.Lines(log) {
		if strings.Contains(line, "level=WARN") && strings.Contains(line, word) {
			return true
		}
	}
	return false
}
