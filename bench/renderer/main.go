// SPDX-License-Identifier: Apache-2.0

// Command renderer is the benchmark renderer for mapproxy-renderd: it speaks
// the renderer protocol of docs/design.md §5 on stdin/stdout and renders nothing.
//
// It writes one ready line that announces every cache named by -cache with an
// 8×8 metatile (so "one metatile" means the same thing as for Tirex and
// renderd), then answers each job line {"id": …} with {"id": <same id>,
// "status": "ok"} after -sleep. With -log it appends one line per finished job
// ("<pid> <cache> <x> <y> <z>") to a file opened with O_APPEND, so a benchmark
// can count renders independently of the daemon's own counters.
//
// End of input makes it exit at once, even in the middle of a sleep, so a
// daemon can always stop it by closing stdin.
package main

import (
	"bufio"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"time"
)

func main() {
	if err := run(os.Args[1:], os.Stdin, os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "bench renderer:", err)
		os.Exit(1)
	}
}

// job is the part of a job line the renderer looks at.
type job struct {
	ID      json.RawMessage `json:"id"`
	Command string          `json:"command"`
	Cache   string          `json:"cache_identifier"`
	Tiles   [][]int         `json:"tiles"`
}

func run(args []string, stdin io.Reader, stdout io.Writer) error {
	fs := flag.NewFlagSet("renderer", flag.ContinueOnError)
	sleep := fs.Duration("sleep", 0, "time each render takes")
	caches := fs.String("cache", "bench_GLOBAL_WEBMERCATOR", "comma-separated cache identifiers to announce")
	meta := fs.Int("meta", 8, "metatile size announced for every cache (0: announce no caches)")
	logPath := fs.String("log", "", "append one line per finished job to this file")
	if err := fs.Parse(args); err != nil {
		return err
	}

	var logf *os.File
	if *logPath != "" {
		f, err := os.OpenFile(*logPath, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o666)
		if err != nil {
			return err
		}
		defer f.Close()
		logf = f
	}

	out := bufio.NewWriterSize(stdout, 4096)
	if err := writeReady(out, *caches, *meta); err != nil {
		return err
	}

	in := bufio.NewReaderSize(stdin, 64<<10)
	if *sleep <= 0 {
		// The no-op path: no goroutine hand-off, one read and one write per job.
		for {
			line, err := readLine(in)
			if err != nil {
				return eofIsNil(err)
			}
			if err := answer(out, logf, line); err != nil {
				return err
			}
		}
	}

	// With a sleep, a reader goroutine notices end of input while we sleep.
	// Lines that arrive early (the protocol sends one job at a time, but a
	// benchmark renderer should not be the thing that breaks) wait in order.
	lines := make(chan []byte, 64)
	done := make(chan struct{})
	var readErr error
	go func() {
		defer close(done)
		for {
			line, err := readLine(in)
			if err != nil {
				readErr = err
				return
			}
			lines <- line
		}
	}()
	timer := time.NewTimer(time.Hour)
	timer.Stop()
	for {
		var line []byte
		select {
		case line = <-lines:
		case <-done:
			return eofIsNil(readErr)
		}
		timer.Reset(*sleep)
		select {
		case <-timer.C:
		case <-done:
			return eofIsNil(readErr)
		}
		if err := answer(out, logf, line); err != nil {
			return err
		}
	}
}

func writeReady(out *bufio.Writer, caches string, meta int) error {
	ready := map[string]any{"ready": true}
	if meta > 0 && caches != "" {
		m := map[string]any{}
		for _, c := range strings.Split(caches, ",") {
			m[c] = map[string]any{"meta_size": []int{meta, meta}}
		}
		ready["caches"] = m
	}
	b, err := json.Marshal(ready)
	if err != nil {
		return err
	}
	out.Write(b)
	out.WriteByte('\n')
	return out.Flush()
}

// answer replies to one job line and logs it.
func answer(out *bufio.Writer, logf *os.File, line []byte) error {
	var j job
	if err := json.Unmarshal(line, &j); err != nil {
		// Without an id there is nobody to answer; say so on stderr.
		fmt.Fprintf(os.Stderr, "bench renderer: bad job line: %v\n", err)
		return nil
	}
	id := j.ID
	if len(id) == 0 {
		id = json.RawMessage(`null`)
	}
	out.WriteString(`{"id":`)
	out.Write(id)
	if j.Command != "" && j.Command != "tile" {
		out.WriteString(`,"status":"error","error_message":"unknown command"}` + "\n")
		return out.Flush()
	}
	out.WriteString(`,"status":"ok"}` + "\n")
	if err := out.Flush(); err != nil {
		return err
	}
	if logf != nil {
		b := make([]byte, 0, 64)
		b = strconv.AppendInt(b, int64(os.Getpid()), 10)
		b = append(b, ' ')
		b = append(b, j.Cache...)
		for _, t := range j.Tiles {
			for _, v := range t {
				b = append(b, ' ')
				b = strconv.AppendInt(b, int64(v), 10)
			}
		}
		b = append(b, '\n')
		if _, err := logf.Write(b); err != nil {
			return err
		}
	}
	return nil
}

// readLine returns the next line without its newline; the slice is only
// valid until the next call unless copied, so it is copied here.
func readLine(r *bufio.Reader) ([]byte, error) {
	line, err := r.ReadSlice('\n')
	if errors.Is(err, bufio.ErrBufferFull) {
		rest, err2 := r.ReadBytes('\n')
		line = append(append([]byte(nil), line...), rest...)
		err = err2
	} else {
		line = append([]byte(nil), line...)
	}
	if err != nil {
		if len(line) > 0 && errors.Is(err, io.EOF) {
			return line, nil
		}
		return nil, err
	}
	return line[:len(line)-1], nil
}

func eofIsNil(err error) error {
	if errors.Is(err, io.EOF) {
		return nil
	}
	return err
}
