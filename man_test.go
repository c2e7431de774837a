// SPDX-License-Identifier: Apache-2.0

package main

import (
	"io"
	"os"
	"reflect"
	"regexp"
	"slices"
	"strings"
	"testing"
)

// configKeys returns the renderd.yaml keys: the yaml tags of Config.
func configKeys(t *testing.T) []string {
	t.Helper()
	var keys []string
	ty := reflect.TypeOf(Config{})
	for i := range ty.NumField() {
		tag, _, _ := strings.Cut(ty.Field(i).Tag.Get("yaml"), ",")
		if tag != "" && tag != "-" {
			keys = append(keys, tag)
		}
	}
	if len(keys) < 10 {
		t.Fatalf("found only %d yaml keys in Config: %q", len(keys), keys)
	}
	return keys
}

// manSection returns the text of the man page section .SH name up to the next .SH.
func manSection(t *testing.T, man, name string) string {
	t.Helper()
	_, rest, ok := strings.Cut(man, "\n.SH "+name+"\n")
	if !ok {
		t.Fatalf("the man page has no section %s", name)
	}
	sec, _, _ := strings.Cut(rest, "\n.SH ")
	return sec
}

// TestManPageCoversConfigAndUsage: every key of renderd.yaml has an entry in the man page's
// CONFIGURATION section (and every entry there is a key), every command and flag of the
// usage text appears in the man page (and every command the page describes exists), and
// every key has a row in README's key table. A key or command added later without
// documentation fails here.
func TestManPageCoversConfigAndUsage(t *testing.T) {
	b, err := os.ReadFile("packaging/mapproxy-renderd.8")
	if err != nil {
		t.Fatal(err)
	}
	man := string(b)
	keys := configKeys(t)

	conf := manSection(t, man, "CONFIGURATION")
	entry := regexp.MustCompile(`(?m)^\.(?:TP|TQ)\n\.B ([a-z0-9_]+)$`)
	var documented []string
	for _, m := range entry.FindAllStringSubmatch(conf, -1) {
		documented = append(documented, m[1])
	}
	for _, k := range keys {
		if !slices.Contains(documented, k) {
			t.Errorf("renderd.yaml key %q has no entry (.TP/.B %s) in the man page's CONFIGURATION section", k, k)
		}
	}
	for _, k := range documented {
		if !slices.Contains(keys, k) {
			t.Errorf("the man page documents %q, which is not a renderd.yaml key (Config has no yaml tag %q)", k, k)
		}
	}

	// Commands and flags, as the usage text lists them.
	// "  mapproxy-renderd NAME …", also "… | NAME ID" for commands that share a line.
	cmds := regexp.MustCompile(`(?m)(?:^\s+mapproxy-renderd|\|) ([a-z][a-z-]*)`).FindAllStringSubmatch(usage, -1)
	if len(cmds) < 4 {
		t.Fatalf("found only %d commands in the usage text", len(cmds))
	}
	for _, c := range cmds {
		if !strings.Contains(man, "\n.B "+troffEscape(c[1])) {
			t.Errorf("command %q (usage) has no .B %s entry in the man page", c[1], troffEscape(c[1]))
		}
	}
	// And the other way round: every command the COMMANDS section describes is one run knows.
	described := regexp.MustCompile(`(?m)^\.TP\n\.B ([a-z\\-]+)(?: |$)`).FindAllStringSubmatch(manSection(t, man, "COMMANDS"), -1)
	if len(described) < 5 {
		t.Fatalf("found only %d commands in the man page's COMMANDS section", len(described))
	}
	for _, c := range described {
		name := strings.ReplaceAll(c[1], `\-`, "-")
		if name == "mapproxy-renderd" {
			continue // the daemon itself
		}
		err := run(t.Context(), []string{name, "--no-such-flag"}, io.Discard, io.Discard)
		if err != nil && strings.Contains(err.Error(), "unknown command") {
			t.Errorf("the man page describes command %q, which mapproxy-renderd does not know", name)
		}
	}

	for _, f := range regexp.MustCompile(`-{1,2}[a-z][a-z-]*`).FindAllString(usage, -1) {
		if strings.HasPrefix(f, "-renderd") || f == "-config" || f == "-module" {
			continue // pieces of mapproxy-renderd, check-config and install-module
		}
		if !regexp.MustCompile(`\\fB` + regexp.QuoteMeta(troffEscape(f)) + `\b|\n\.B[IR]? ` + regexp.QuoteMeta(troffEscape(f)) + `\b`).MatchString(man) {
			t.Errorf("flag %s (usage) is not in the man page (as bold %s)", f, troffEscape(f))
		}
	}

	readme, err := os.ReadFile("README.md")
	if err != nil {
		t.Fatal(err)
	}
	var rows []string
	for _, l := range strings.Split(string(readme), "\n") {
		if strings.HasPrefix(l, "| `") {
			rows = append(rows, l)
		}
	}
	for _, k := range keys {
		found := false
		for _, r := range rows {
			cell, _, _ := strings.Cut(r[1:], "|")
			if strings.Contains(cell, "`"+k+"`") {
				found = true
				break
			}
		}
		if !found {
			t.Errorf("renderd.yaml key %q has no row in README.md's key table", k)
		}
	}
}

// troffEscape writes s as it appears in troff source: every - as \-.
func troffEscape(s string) string { return strings.ReplaceAll(s, "-", `\-`) }
