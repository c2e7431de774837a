// SPDX-License-Identifier: Apache-2.0

// Command floor is the reference "IPC floor" for the benchmarks: the shortest
// chain from a client to a renderer and back that mapproxy-renderd could be,
// with no scheduler in it.
//
// It accepts NDJSON requests on a Unix socket and hands each line, unchanged,
// to the next free one of N renderer processes over its stdin pipe; the
// renderer's reply line goes back unchanged to the connection it came from.
// Requests wait in one FIFO channel while every renderer is busy. There is no
// priority, no dedup, no JSON parsing (with -json it decodes each request and
// re-encodes the job and the reply with encoding/json), no bound other than
// the channel's capacity and no status command; a line with
// "command":"ping" is answered {"id":"ping","status":"ok"} for readiness
// checks. The renderer must echo the request's "id", as the bench renderer
// does.
//
// On SIGTERM or SIGINT it closes the renderers' stdin, waits for them and
// prints its own CPU time (user+system) to stderr.
package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"strconv"
	"sync"
	"syscall"
	"time"
)

func main() {
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "floor:", err)
		os.Exit(1)
	}
}

// task is one request line waiting for a renderer.
type task struct {
	line []byte
	c    *client
}

// client serialises writes of replies to one connection.
type client struct {
	mu   sync.Mutex
	conn net.Conn
}

func (c *client) write(b []byte) {
	c.mu.Lock()
	c.conn.Write(b) // a failed write means the client is gone; nothing to do
	c.mu.Unlock()
}

func run(args []string) error {
	fs := flag.NewFlagSet("floor", flag.ContinueOnError)
	sock := fs.String("socket", "", "Unix socket to listen on")
	n := fs.Int("children", 4, "number of renderer processes")
	jsonMode := fs.Bool("json", false, "decode requests and re-encode jobs and replies")
	if err := fs.Parse(args); err != nil {
		return err
	}
	argv := fs.Args()
	if *sock == "" || len(argv) == 0 || *n < 1 {
		return errors.New("usage: floor -socket PATH [-children N] [-json] -- RENDERER [ARGS…]")
	}

	tasks := make(chan task, 1<<20)
	var workers sync.WaitGroup
	var cmds []*exec.Cmd
	var stdins []io.Closer
	for i := 0; i < *n; i++ {
		cmd := exec.Command(argv[0], argv[1:]...)
		cmd.Stderr = os.Stderr
		in, err := cmd.StdinPipe()
		if err != nil {
			return err
		}
		outPipe, err := cmd.StdoutPipe()
		if err != nil {
			return err
		}
		if err := cmd.Start(); err != nil {
			return err
		}
		cmds = append(cmds, cmd)
		stdins = append(stdins, in)
		out := bufio.NewReaderSize(outPipe, 64<<10)
		if _, err := out.ReadBytes('\n'); err != nil { // the ready line
			return fmt.Errorf("renderer %d: no ready line: %w", cmd.Process.Pid, err)
		}
		workers.Add(1)
		go func() {
			defer workers.Done()
			work(tasks, in, out, *jsonMode)
		}()
	}

	os.Remove(*sock)
	ln, err := net.Listen("unix", *sock)
	if err != nil {
		return err
	}
	go func() {
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			go serve(conn, tasks)
		}
	}()

	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	<-sig
	ln.Close()
	for _, in := range stdins {
		in.Close()
	}
	done := make(chan struct{})
	go func() {
		for _, cmd := range cmds {
			cmd.Wait()
		}
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		for _, cmd := range cmds {
			cmd.Process.Kill()
		}
		<-done
	}
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	cpu := time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
	fmt.Fprintf(os.Stderr, "floor: cpu %v (user %v, system %v)\n", cpu,
		time.Duration(ru.Utime.Nano()), time.Duration(ru.Stime.Nano()))
	return nil
}

// serve reads request lines from one connection into the task FIFO.
func serve(conn net.Conn, tasks chan<- task) {
	c := &client{conn: conn}
	r := bufio.NewReaderSize(conn, 64<<10)
	for {
		line, err := r.ReadBytes('\n')
		if len(line) > 0 && line[len(line)-1] == '\n' {
			if bytes.Contains(line, []byte(`"command":"ping"`)) {
				c.write([]byte(`{"id":"ping","status":"ok"}` + "\n")) // for readiness checks
				continue
			}
			tasks <- task{line: line, c: c}
		}
		if err != nil {
			return // replies still in flight are written to the closed conn and lost
		}
	}
}

// work feeds one renderer: one task at a time, line in, line out.
func work(tasks <-chan task, in io.Writer, out *bufio.Reader, jsonMode bool) {
	var seq uint64
	for t := range tasks {
		line := t.line
		var clientID json.RawMessage
		if jsonMode {
			var req struct {
				ID    json.RawMessage `json:"id"`
				Cache string          `json:"cache_identifier"`
				Tiles [][]int         `json:"tiles"`
			}
			if err := json.Unmarshal(line, &req); err != nil {
				t.c.write([]byte(`{"status":"error","error_message":"invalid json"}` + "\n"))
				continue
			}
			clientID = req.ID
			seq++
			job, _ := json.Marshal(map[string]any{
				"id": strconv.FormatUint(seq, 10), "command": "tile",
				"cache_identifier": req.Cache, "tiles": req.Tiles, "refresh": true,
			})
			line = append(job, '\n')
		}
		if _, err := in.Write(line); err != nil {
			return
		}
		reply, err := out.ReadBytes('\n')
		if err != nil {
			return
		}
		if jsonMode {
			var rep struct {
				Status string `json:"status"`
			}
			json.Unmarshal(reply, &rep)
			reply, _ = json.Marshal(map[string]any{"id": clientID, "status": rep.Status})
			reply = append(reply, '\n')
		}
		t.c.write(reply)
	}
}
