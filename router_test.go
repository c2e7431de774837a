// SPDX-License-Identifier: Apache-2.0

package main

import (
	"bytes"
	"encoding/json"
	"io"
	"net/http"
	"strings"
	"testing"
)

// TestRouterSameAnswerBothProtocols: one router answers every command, so a request sent as
// an NDJSON line and the same request POSTed over HTTP get the same reply (HTTP maps only
// statuses MapProxy does not know, and none of these has one).
func TestRouterSameAnswerBothProtocols(t *testing.T) {
	d := newTestDaemon(t, daemonOpts{tcp: true, extraYAML: "journal: false\n"})
	cl := d.dial()
	lines := []string{
		`{"command":"ping","id":"p"}`,
		`{"command":"health","id":"h"}`,
		`{"command":"status","id":"s"}`,
		`{"command":"tasks","id":"ts"}`,
		`{"command":"task","id":"t","task_id":"t999"}`,
		`{"command":"cancel","id":"c","task_id":"t999"}`,
		`{"command":"expire","id":"e","cache_identifier":"c","tiles":[[0,0,0]]}`,
		`{"command":"tile","id":"x","cache_identifier":"c","tiles":[[1,2,3]]}`,
		`{"command":"nope","id":"n"}`,
		`{"command":"tile","id":"b","cache_identifier":"c","tiles":[[1,2]]}`,
	}
	for _, line := range lines {
		cl.send(line)
		native := cl.read()
		resp, err := http.Post("http://"+d.tcp+"/", "", strings.NewReader(line))
		if err != nil {
			t.Fatal(err)
		}
		body, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		if err != nil {
			t.Fatal(err)
		}
		if resp.StatusCode != http.StatusOK || bytes.Count(body, []byte("\n")) != 1 {
			t.Errorf("%s over HTTP: %d %q, want 200 and one JSON line", line, resp.StatusCode, body)
			continue
		}
		var overHTTP Reply
		if err := json.Unmarshal(body, &overHTTP); err != nil {
			t.Fatalf("%s over HTTP: %v in %q", line, err, body)
		}
		if idOf(native) != idOf(overHTTP) || native.Status != overHTTP.Status || native.ErrorMessage != overHTTP.ErrorMessage {
			t.Errorf("%s: native %s %q %q, HTTP %s %q %q; want the same", line, idOf(native), native.Status, native.ErrorMessage,
				idOf(overHTTP), overHTTP.Status, overHTTP.ErrorMessage)
		}
	}
}
