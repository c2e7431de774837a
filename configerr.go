// SPDX-License-Identifier: Apache-2.0

package main

import (
	"errors"
	"fmt"
	"reflect"
	"regexp"
	"strconv"
	"strings"

	"gopkg.in/yaml.v3"
)

// yaml.v3 reports a bad renderd.yaml in Go's terms ("line 3: cannot unmarshal !!str `four`
// into int", "field renderes not found in type main.Config"). keyedYAMLError rewrites each
// of its messages to name the key, as Validate's errors do: "renderers: want an integer,
// got "four" (line 3)", "unknown key renderes (line 2); did you mean renderers?".

var (
	yamlLineRE     = regexp.MustCompile(`^line (\d+): (.*)$`)
	yamlUnknownRE  = regexp.MustCompile(`^field (\S+) not found in type (\S+)$`)
	yamlUnmarshaRE = regexp.MustCompile("^cannot unmarshal !!(\\w+) `(.*)` into (.+)$")
)

// keyedYAMLError maps err from decoding data into a Config to messages that name the key;
// errors it does not recognise are returned as they are.
func keyedYAMLError(err error, data []byte) error {
	var te *yaml.TypeError
	if !errors.As(err, &te) {
		return err
	}
	var root yaml.Node
	if yaml.Unmarshal(data, &root) != nil {
		return err
	}
	paths := yamlValuePaths(&root)
	msgs := make([]string, 0, len(te.Errors))
	for _, m := range te.Errors {
		msgs = append(msgs, keyedYAMLMessage(m, paths))
	}
	return errors.New(strings.Join(msgs, "; "))
}

// yamlPath is where a value sits: its key path ("prefetch.levels", "allowed_uids[1]").
type yamlPath struct {
	line  int
	path  string
	value string // scalar values only
}

// yamlValuePaths lists every value of a document with its key path, in document order.
func yamlValuePaths(root *yaml.Node) []yamlPath {
	var out []yamlPath
	var walk func(n *yaml.Node, path string)
	walk = func(n *yaml.Node, path string) {
		switch n.Kind {
		case yaml.DocumentNode:
			for _, c := range n.Content {
				walk(c, path)
			}
		case yaml.MappingNode:
			for i := 0; i+1 < len(n.Content); i += 2 {
				k, v := n.Content[i], n.Content[i+1]
				p := k.Value
				if path != "" {
					p = path + "." + k.Value
				}
				out = append(out, yamlPath{line: k.Line, path: p, value: "\x00key"})
				walk(v, p)
			}
		case yaml.SequenceNode:
			out = append(out, yamlPath{line: n.Line, path: path})
			for i, c := range n.Content {
				walk(c, path+"["+strconv.Itoa(i)+"]")
			}
		default:
			out = append(out, yamlPath{line: n.Line, path: path, value: n.Value})
		}
	}
	walk(root, "")
	return out
}

func keyedYAMLMessage(m string, paths []yamlPath) string {
	lm := yamlLineRE.FindStringSubmatch(m)
	if lm == nil {
		return m
	}
	line, _ := strconv.Atoi(lm[1])
	text := lm[2]
	if um := yamlUnknownRE.FindStringSubmatch(text); um != nil {
		key, where := um[1], ""
		for _, p := range paths {
			if p.line == line && p.value == "\x00key" && strings.HasSuffix("."+p.path, "."+key) {
				where = p.path
				break
			}
		}
		if where == "" {
			where = key
		}
		msg := fmt.Sprintf("unknown key %s (line %d)", where, line)
		if s := closestKey(key, yamlKeysOf(um[2])); s != "" {
			msg += "; did you mean " + s + "?"
		}
		return msg
	}
	if um := yamlUnmarshaRE.FindStringSubmatch(text); um != nil {
		got, into := um[2], um[3]
		path := ""
		for _, p := range paths { // the scalar on that line with that text, else the line's value
			if p.line == line && p.value != "\x00key" && (p.value == got || path == "") {
				path = p.path
				if p.value == got {
					break
				}
			}
		}
		want := map[string]string{"int": "an integer", "bool": "true or false", "float64": "a number",
			"string": "a string", "[]string": "a list of strings", "[]int": "a list of integers"}[into]
		if want == "" {
			want = strings.TrimPrefix(into, "main.")
		}
		if path == "" {
			return fmt.Sprintf("line %d: want %s, got %q", line, want, got)
		}
		return fmt.Sprintf("%s: want %s, got %q (line %d)", path, want, got, line)
	}
	// A field's own UnmarshalYAML (Duration) reports "line N: message": name the key.
	for _, p := range paths {
		if p.line == line && p.value != "\x00key" {
			return fmt.Sprintf("%s: %s (line %d)", p.path, text, line)
		}
	}
	return m
}

// yamlKeysOf lists the yaml keys of the struct type named as yaml.v3 names it ("main.Config"),
// among Config and the types it contains.
func yamlKeysOf(typeName string) []string {
	seen := map[reflect.Type]bool{}
	var find func(t reflect.Type) []string
	find = func(t reflect.Type) []string {
		for t.Kind() == reflect.Pointer || t.Kind() == reflect.Slice || t.Kind() == reflect.Map {
			t = t.Elem()
		}
		if t.Kind() != reflect.Struct || seen[t] {
			return nil
		}
		seen[t] = true
		var keys []string
		for i := range t.NumField() {
			f := t.Field(i)
			if k, _, _ := strings.Cut(f.Tag.Get("yaml"), ","); k != "" && k != "-" {
				keys = append(keys, k)
			}
		}
		if t.String() == typeName {
			return keys
		}
		for i := range t.NumField() {
			if k := find(t.Field(i).Type); k != nil {
				return k
			}
		}
		return nil
	}
	return find(reflect.TypeFor[Config]())
}

// closestKey is the key nearest to s by edit distance, when it is near enough to be a typo.
func closestKey(s string, keys []string) string {
	best, bestD := "", len(s)/3+2
	for _, k := range keys {
		if d := editDistance(s, k); d < bestD {
			best, bestD = k, d
		}
	}
	return best
}

// editDistance is the Levenshtein distance of a and b (bytes; keys are ASCII).
func editDistance(a, b string) int {
	prev := make([]int, len(b)+1)
	cur := make([]int, len(b)+1)
	for j := range prev {
		prev[j] = j
	}
	for i := 1; i <= len(a); i++ {
		cur[0] = i
		for j := 1; j <= len(b); j++ {
			cost := 1
			if a[i-1] == b[j-1] {
				cost = 0
			}
			cur[j] = min(prev[j]+1, cur[j-1]+1, prev[j-1]+cost)
		}
		prev, cur = cur, prev
	}
	return prev[len(b)]
}
