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

// register adds the flags; -s names the socket unless the command uses -s for seed.yaml
// (`seed`, as mapproxy-seed does), where --socket does.
func (c *clientFlags) register(fs *flag.FlagSet, sIsSocket bool) {
	c.cf.register(fs, false)
	usage := "Unix socket of the daemon (default: from -c/-f, else " + defaultSocket + ")"
	fs.StringVar(&c.socket, "socket", "", usage)
	if sIsSocket {
		fs.StringVar(&c.socket, "s", "", usage)
	}
	fs.StringVar(&c.tcp, "http", "", "TCP address of the daemon, host:port (instead of the socket)")
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
	cl.register(fs, true)
	if err := fs.Parse(args); err != nil {
		return err
	}
	var line []byte
	switch cmd {
	case "status":
		if fs.NArg() > 0 {
			return fmt.Errorf("status takes no arguments")
		}
		line = []byte(`{"command":"status","id":"cli"}`)
	case "request":
		if fs.NArg() != 1 {
			return fmt.Errorf("request takes one JSON argument, e.g. '{\"command\":\"ping\"}'")
		}
		line = []byte(fs.Arg(0))
		if bytes.ContainsAny(line, "\n") {
			var buf bytes.Buffer
			if err := json.Compact(&buf, line); err != nil {
				return fmt.Errorf("request: %w", err)
			}
			line = buf.Bytes()
		}
	}
	network, addr, err := cl.address()
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, cl.timeout)
	defer cancel()
	r, reply, err := exchange(ctx, network, addr, line)
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
