// SPDX-License-Identifier: Apache-2.0

package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"time"
)

// clientFlags choose the daemon a client command talks to: its Unix socket, its TCP
// address, or the one the configuration files name.
type clientFlags struct {
	cf      configFlags
	socket  string
	tcp     string
	timeout time.Duration
}

// register adds the flags. --socket names the socket; with deprecatedS (stderr), -s does
// too, with a deprecation line (cliflags.go): commands without a seed.yaml.
func (c *clientFlags) register(fs *flag.FlagSet, deprecatedS io.Writer) {
	c.cf.register(fs, false)
	usage := "Unix socket of the daemon (default: from -c/-f, else " + defaultSocket + ")"
	fs.StringVar(&c.socket, "socket", "", usage)
	if deprecatedS != nil {
		c.registerDeprecatedS(fs, deprecatedS)
	}
	fs.StringVar(&c.tcp, "http", "", "the daemon's TCP address, host:port (native protocol, instead of the socket), "+
		"or an http:// URL (HTTP, e.g. through HAProxy, see README)")
	fs.DurationVar(&c.timeout, "timeout", 10*time.Minute, "give up after this long")
}

// address returns where to connect.
func (c *clientFlags) address() (network, addr string, err error) {
	switch {
	case c.tcp != "":
		return "tcp", c.tcp, nil
	case c.socket != "":
		return "unix", c.socket, nil
	case c.cf.mapproxy != "" || c.cf.renderd != "":
		cfg, err := c.cf.load()
		if err != nil {
			return "", "", err
		}
		if cfg.Socket != "" {
			return "unix", cfg.Socket, nil
		}
		return "tcp", cfg.httpAddr, nil
	}
	return "unix", defaultSocket, nil
}

// exchange sends one NDJSON request on a new connection and returns the parsed reply and
// its raw line.
func exchange(ctx context.Context, network, addr string, line []byte) (Reply, []byte, error) {
	var d net.Dialer
	c, err := d.DialContext(ctx, network, addr)
	if err != nil {
		return Reply{}, nil, err
	}
	defer c.Close()
	if dl, ok := ctx.Deadline(); ok {
		_ = c.SetDeadline(dl)
	}
	stop := context.AfterFunc(ctx, func() { _ = c.SetDeadline(time.Now()) })
	defer stop()
	if _, err := c.Write(append(line, '\n')); err != nil {
		return Reply{}, nil, err
	}
	raw, err := bufio.NewReaderSize(c, 64<<10).ReadBytes('\n')
	if err != nil && len(raw) == 0 {
		if errors.Is(err, io.EOF) {
			return Reply{}, nil, errors.New("the daemon closed the connection without a reply")
		}
		return Reply{}, nil, err
	}
	var r Reply
	if err := json.Unmarshal(raw, &r); err != nil {
		return Reply{}, nil, fmt.Errorf("invalid reply: %s", bytes.TrimSpace(raw))
	}
	return r, raw, nil
}

// runClient implements `request` and `status`: one NDJSON request on the daemon's socket
// (or its TCP address), the reply printed. The exit status is 0 for ok and queued, 1 otherwise.
func runClient(ctx context.Context, cmd string, args []string, stdout, stderr io.Writer) error {
	var cl clientFlags
	fs := newFlagSet(cmd, stderr)
	cl.register(fs, stderr)
	pos, err := parseArgs(fs, args)
	if err != nil {
		return err
	}
	var line []byte
	switch cmd {
	case "status":
		if err := errNoArgs("status", pos); err != nil {
			return err
		}
		line = []byte(`{"command":"status","id":"cli"}`)
	case "request":
		if len(pos) != 1 {
			return fmt.Errorf("request takes one JSON argument, e.g. '{\"command\":\"ping\"}'")
		}
		line = []byte(pos[0])
		if bytes.ContainsAny(line, "\n") {
			var buf bytes.Buffer
			if err := json.Compact(&buf, line); err != nil {
				return fmt.Errorf("request: %w", err)
			}
			line = buf.Bytes()
		}
	}
	ctx, cancel := context.WithTimeout(ctx, cl.timeout)
	defer cancel()
	target, err := cl.target()
	if err != nil {
		return err
	}
	r, reply, err := target.call(ctx, cmd, line)
	if err != nil {
		return err
	}
	if cmd == "status" && r.Status == statusOK && r.Stats != nil {
		var buf bytes.Buffer
		if json.Indent(&buf, r.Stats, "", "  ") == nil {
			buf.WriteByte('\n')
			_, err := stdout.Write(buf.Bytes())
			return err
		}
	}
	if _, err := stdout.Write(reply); err != nil {
		return err
	}
	return exitStatus(r)
}

// httpExchange sends the request the way MapProxy does, as an HTTP POST to url (status: GET
// url's /status), so that it can go through HAProxy (examples/cluster), and returns the
// parsed reply and its line. A tile request for one tile without an id gets MapProxy's id
// for it (mapproxyRequestID), the key HAProxy hashes to pick the daemon; to reach the
// metatile's owner, name its top-left tile, as MapProxy does.
func httpExchange(ctx context.Context, cmd, url string, line []byte) (Reply, []byte, error) {
	method, body := http.MethodPost, line
	if cmd == "status" {
		method, body = http.MethodGet, nil
		url = strings.TrimSuffix(url, "/") + "/status"
	} else {
		var err error
		if body, err = withMapProxyID(line); err != nil {
			return Reply{}, nil, err
		}
	}
	req, err := http.NewRequestWithContext(ctx, method, url, bytes.NewReader(body))
	if err != nil {
		return Reply{}, nil, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return Reply{}, nil, err
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(io.LimitReader(resp.Body, 64<<20))
	if err != nil {
		return Reply{}, nil, err
	}
	raw = bytes.TrimSpace(raw)
	if cmd == "status" && resp.StatusCode == http.StatusOK {
		// GET /status answers the document itself; wrap it as the status command's reply.
		raw = append(append([]byte(`{"status":"ok","stats":`), raw...), '}')
	}
	var r Reply
	if err := json.Unmarshal(raw, &r); err != nil {
		return Reply{}, nil, fmt.Errorf("HTTP %s: the answer is not a JSON reply: %s", resp.Status, truncate(string(raw), 500))
	}
	return r, append(raw, '\n'), nil
}

// withMapProxyID adds MapProxy's request id to a tile request for one tile that has none.
// Anything else is sent as it is (the daemon judges it).
func withMapProxyID(line []byte) ([]byte, error) {
	req, err := parseRequest(line)
	if err != nil || req.Command != "tile" || req.ID != nil || len(req.Tiles) != 1 {
		return line, nil
	}
	id, err := mapproxyRequestID(req.CacheIdentifier, req.Tiles[0])
	if err != nil {
		return nil, err
	}
	var m map[string]json.RawMessage
	if err := json.Unmarshal(line, &m); err != nil {
		return line, nil
	}
	m["id"], _ = json.Marshal(id)
	return json.Marshal(m)
}
