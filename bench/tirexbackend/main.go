// SPDX-License-Identifier: Apache-2.0

// Command tirexbackend is a Tirex rendering backend for benchmarks: it speaks
// the backend protocol of tirex-backend-manager (Tirex 0.7.0) and renders
// nothing, so a comparison measures tirex-master, not a renderer.
//
// The backend manager starts it with TIREX_BACKEND_* in the environment, the
// renderer's UDP socket inherited as TIREX_BACKEND_SOCKET_FILENO and the write
// end of an "alive" pipe as TIREX_BACKEND_PIPE_FILENO. For every
// type=metatile_render_request datagram it sleeps for the map's sleep_ms
// option (map config files are listed in TIREX_BACKEND_MAP_CONFIGS), then
// sends the request back to the sender with result=ok and render_time=<ms>.
// It writes one byte down the pipe before each wait, as the manager expects.
// It writes no metatile.
//
// Exit codes follow Tirex: 10 (disable this renderer) for a configuration
// error, 9 (restart me) for a socket error.
package main

import (
	"bufio"
	"bytes"
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"
	"time"
)

const (
	exitRestart = 9
	exitDisable = 10
	maxPacket   = 512 // Tirex::MAX_PACKET_SIZE
)

func main() {
	name := os.Getenv("TIREX_BACKEND_NAME")
	if name == "" {
		die(exitDisable, "missing TIREX_BACKEND_NAME")
	}
	maps, err := readMaps(strings.Fields(os.Getenv("TIREX_BACKEND_MAP_CONFIGS")))
	if err != nil {
		die(exitDisable, err.Error())
	}

	pipeFD, err := strconv.Atoi(os.Getenv("TIREX_BACKEND_PIPE_FILENO"))
	if err != nil {
		die(exitDisable, "missing or bad TIREX_BACKEND_PIPE_FILENO")
	}
	pipe := os.NewFile(uintptr(pipeFD), "alive-pipe")

	conn, err := openSocket()
	if err != nil {
		die(exitDisable, err.Error())
	}

	buf := make([]byte, maxPacket)
	alive := []byte{'a'}
	for {
		if _, err := pipe.Write(alive); err != nil {
			die(exitRestart, "cannot write to alive pipe: "+err.Error())
		}
		n, addr, err := conn.ReadFrom(buf)
		if err != nil {
			die(exitRestart, "error reading from socket: "+err.Error())
		}
		start := time.Now()
		fields := parseMsg(buf[:n])
		result := "ok"
		if m, ok := maps[get(fields, "map")]; !ok {
			result = "error_unknown_map"
		} else if m.sleep > 0 {
			time.Sleep(m.sleep)
		}
		fields = set(fields, "result", result)
		fields = set(fields, "render_time", strconv.FormatInt(time.Since(start).Milliseconds(), 10))
		if _, err := conn.WriteTo(serialize(fields), addr); err != nil {
			die(exitRestart, "error when sending: "+err.Error())
		}
	}
}

// mapConfig is the part of a Tirex map config this backend uses.
type mapConfig struct {
	name  string
	sleep time.Duration
}

// readMaps reads Tirex map config files: key=value lines, # comments.
func readMaps(files []string) (map[string]mapConfig, error) {
	maps := map[string]mapConfig{}
	for _, file := range files {
		data, err := os.ReadFile(file)
		if err != nil {
			return nil, fmt.Errorf("error reading map config %q: %w", file, err)
		}
		var m mapConfig
		sc := bufio.NewScanner(bytes.NewReader(data))
		for sc.Scan() {
			line, _, _ := strings.Cut(sc.Text(), "#")
			k, v, ok := strings.Cut(strings.TrimSpace(line), "=")
			if !ok {
				continue
			}
			k, v = strings.TrimSpace(k), strings.TrimSpace(v)
			switch k {
			case "name":
				m.name = v
			case "sleep_ms":
				ms, err := strconv.Atoi(v)
				if err != nil || ms < 0 {
					return nil, fmt.Errorf("map config %q: bad sleep_ms %q", file, v)
				}
				m.sleep = time.Duration(ms) * time.Millisecond
			}
		}
		if m.name == "" {
			return nil, fmt.Errorf("map config %q: missing name", file)
		}
		maps[m.name] = m
	}
	return maps, nil
}

// openSocket uses the socket the manager passed down, or opens the UDP port
// itself when started by hand.
func openSocket() (net.PacketConn, error) {
	if s := os.Getenv("TIREX_BACKEND_SOCKET_FILENO"); s != "" {
		fd, err := strconv.Atoi(s)
		if err != nil {
			return nil, fmt.Errorf("bad TIREX_BACKEND_SOCKET_FILENO %q", s)
		}
		f := os.NewFile(uintptr(fd), "backend-socket")
		conn, err := net.FilePacketConn(f)
		f.Close() // FilePacketConn dups the descriptor
		if err != nil {
			return nil, fmt.Errorf("cannot use inherited socket %d: %w", fd, err)
		}
		return conn, nil
	}
	port := os.Getenv("TIREX_BACKEND_PORT")
	if port == "" {
		return nil, fmt.Errorf("missing TIREX_BACKEND_PORT")
	}
	return net.ListenPacket("udp", "127.0.0.1:"+port)
}

// A message is an ordered list of key=value fields.
type field struct{ k, v string }

func parseMsg(b []byte) []field {
	var fs []field
	for _, line := range strings.Split(string(b), "\n") {
		line = strings.TrimSuffix(line, "\r")
		k, v, ok := strings.Cut(line, "=")
		if !ok {
			continue
		}
		fs = append(fs, field{k, v})
	}
	return fs
}

func get(fs []field, k string) string {
	for _, f := range fs {
		if f.k == k {
			return f.v
		}
	}
	return ""
}

func set(fs []field, k, v string) []field {
	for i := range fs {
		if fs[i].k == k {
			fs[i].v = v
			return fs
		}
	}
	return append(fs, field{k, v})
}

func serialize(fs []field) []byte {
	var b []byte
	for _, f := range fs {
		b = append(b, f.k...)
		b = append(b, '=')
		b = append(b, f.v...)
		b = append(b, '\n')
	}
	return b
}

func die(code int, msg string) {
	fmt.Fprintln(os.Stderr, "tirexbackend:", msg)
	os.Exit(code)
}
