package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"time"
)

// runClient implements `request` and `status`: one NDJSON request on the daemon's socket
// (or its TCP address), the reply printed. The exit status is 0 for ok and queued, 1 otherwise.
func runClient(ctx context.Context, cmd string, args []string, stdout, stderr io.Writer) error {
	var cf configFlags
	fs := newFlagSet(cmd, stderr)
	cf.register(fs, false)
	socket := fs.String("s", "", "Unix socket of the daemon (default: from -c/-f, else "+defaultSocket+")")
	tcp := fs.String("http", "", "TCP address of the daemon, host:port (instead of the socket)")
	timeout := fs.Duration("timeout", 10*time.Minute, "give up after this long")
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
	network, addr := "unix", *socket
	switch {
	case *tcp != "":
		network, addr = "tcp", *tcp
	case addr == "" && (cf.mapproxy != "" || cf.renderd != ""):
		cfg, err := cf.load()
		if err != nil {
			return err
		}
		if cfg.Socket != "" {
			addr = cfg.Socket
		} else {
			network, addr = "tcp", cfg.httpAddr
		}
	case addr == "":
		addr = defaultSocket
	}
	ctx, cancel := context.WithTimeout(ctx, *timeout)
	defer cancel()
	var d net.Dialer
	c, err := d.DialContext(ctx, network, addr)
	if err != nil {
		return err
	}
	defer c.Close()
	if dl, ok := ctx.Deadline(); ok {
		_ = c.SetDeadline(dl)
	}
	go func() {
		<-ctx.Done()
		_ = c.SetDeadline(time.Now())
	}()
	if _, err := c.Write(append(line, '\n')); err != nil {
		return err
	}
	reply, err := bufio.NewReaderSize(c, 64<<10).ReadBytes('\n')
	if err != nil && len(reply) == 0 {
		if errors.Is(err, io.EOF) {
			return errors.New("the daemon closed the connection without a reply")
		}
		return err
	}
	var r Reply
	if err := json.Unmarshal(reply, &r); err != nil {
		return fmt.Errorf("invalid reply: %s", bytes.TrimSpace(reply))
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
	if r.Status != statusOK && r.Status != statusQueued {
		return exitCode(1)
	}
	return nil
}
