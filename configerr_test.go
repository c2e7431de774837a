// SPDX-License-Identifier: Apache-2.0

package main

import (
	"bytes"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestConfigErrorsNameTheKey: every renderd.yaml mistake is reported with the key it is
// about, in the operator's terms rather than Go's, by check-config as by the daemon.
func TestConfigErrorsNameTheKey(t *testing.T) {
	dir := t.TempDir()
	for _, tt := range []struct {
		name, yaml, want string
	}{
		{"a word for a number", "renderers: four\n", `renderers: want an integer, got "four" (line 2)`},
		{"unknown key with a suggestion", "renderes: 4\n", "unknown key renderes (line 2); did you mean renderers?"},
		{"unknown nested key", "prefetch:\n  caches: [c]\n  levls: 2\n", "unknown key prefetch.levls (line 4); did you mean levels?"},
		{"unknown key, nothing near", "zzzzzzzz: 1\n", "unknown key zzzzzzzz (line 2)"},
		{"a list item", "allowed_uids: [1, x]\n", `allowed_uids[1]: want an integer, got "x" (line 2)`},
		{"a nested number", "prefetch:\n  caches: [c]\n  levels: deep\n", `prefetch.levels: want an integer, got "deep" (line 4)`},
		{"a bool", "journal: maybe\n", `journal: want true or false, got "maybe" (line 2)`},
		{"a duration", "render_timeout: soon\n", `render_timeout: want a duration such as 60s, got "soon" (line 2)`},
		{"a duration as a list", "stop_timeout: [1]\n", "stop_timeout: want a duration such as 60s (line 2)"},
		{"two mistakes", "renderers: four\nmax_queued: lots\n", `renderers: want an integer, got "four" (line 2); max_queued: want an integer, got "lots" (line 3)`},
		{"expire_delete_from negative", "expire_delete_from: -5\n", "expire_delete_from: want 0..30, got -5"},
		{"expire_delete_from too deep", "expire_delete_from: 31\n", "expire_delete_from: want 0..30, got 31"},
		{"expire_max_zoom negative", "expire_max_zoom: -1\n", "expire_max_zoom: want 0..30, got -1"},
		{"state_dir the daemon cannot use", "state_dir: /proc/sys\n", "state_dir: "},
	} {
		t.Run(tt.name, func(t *testing.T) {
			path := filepath.Join(dir, strings.ReplaceAll(tt.name, " ", "_")+".yaml")
			yaml := fakeRendererYAML(tt.yaml)
			if !strings.Contains(tt.yaml, "state_dir:") {
				yaml += "state_dir: " + dir + "/state\n"
			}
			os.WriteFile(path, []byte(yaml), 0o644)
			var out bytes.Buffer
			err := run(t.Context(), []string{"check-config", "-c", path}, &out, io.Discard)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("check-config: got %v (stdout %q), want an error containing %q", err, out.String(), tt.want)
			}
			// The daemon refuses it with the same words, before it binds anything.
			err = run(t.Context(), []string{"-c", path, "--socket", dir + "/never.sock", "--http", ""}, io.Discard, io.Discard)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("daemon: got %v, want an error containing %q", err, tt.want)
			}
		})
	}

	// A state_dir that does not exist yet but can be created passes, and is not created.
	path := filepath.Join(dir, "fresh.yaml")
	os.WriteFile(path, []byte(fakeRendererYAML("state_dir: "+dir+"/new/state\n")), 0o644)
	if err := run(t.Context(), []string{"check-config", "-c", path}, io.Discard, io.Discard); err != nil {
		t.Errorf("check-config with a state_dir to be created: %v", err)
	}
	if _, err := os.Stat(dir + "/new"); err == nil {
		t.Errorf("check-config created the state_dir's parent")
	}
}

// TestCheckConfigPrefetchCaches: prefetch.caches are checked against the caches MapProxy
// builds from mapproxy_config.
func TestCheckConfigPrefetchCaches(t *testing.T) {
	requireMapProxy(t)
	dir := t.TempDir()
	for _, tt := range []struct {
		caches, want string
	}{
		{"[wms_cache]", ""},
		{"[wms_cache_GLOBAL_WEBMERCATOR]", ""},
		{"[wms_cache, wms_cach]", `prefetch.caches[1]: "wms_cach" is neither a cache identifier nor a cache name of mapproxy_config`},
		{"[osm_cache_GLOBAL_WEBMERCATR]", "did you mean"},
	} {
		path := filepath.Join(dir, "renderd.yaml")
		os.WriteFile(path, []byte("state_dir: "+dir+"/state\nprefetch:\n  caches: "+tt.caches+"\n"), 0o644)
		var out bytes.Buffer
		err := run(t.Context(), []string{"check-config", "-f", "examples/mapproxy.yaml", "-c", path}, &out, io.Discard)
		switch {
		case tt.want == "" && err != nil:
			t.Errorf("prefetch.caches %s: %v\n%s", tt.caches, err, out.String())
		case tt.want != "" && (err == nil || !strings.Contains(err.Error(), tt.want)):
			t.Errorf("prefetch.caches %s: got %v, want an error containing %q", tt.caches, err, tt.want)
		}
	}
}
