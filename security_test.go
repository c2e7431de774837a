// SPDX-License-Identifier: Apache-2.0

package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// what a local user can send must not hurt the daemon or read files through it.

// vmRSS is this process's resident set in KiB (the test daemons run in it).
func vmRSS(t *testing.T) int {
	t.Helper()
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "VmRSS:"); ok {
			n, _ := strconv.Atoi(strings.TrimSuffix(strings.TrimSpace(v), " kB"))
			return n
		}
	}
	t.Fatal("no VmRSS in /proc/self/status")
	return 0
}

// hostileFiles makes what the probe named: a FIFO (nobody writes it), a 1 TiB sparse file,
// and returns them with /dev/zero and /etc/passwd.
func hostileFiles(t *testing.T) map[string]string {
	t.Helper()
	dir := t.TempDir()
	fifo := filepath.Join(dir, "fifo")
	if err := syscall.Mkfifo(fifo, 0o644); err != nil {
		t.Fatal(err)
	}
	sparse := filepath.Join(dir, "sparse")
	f, err := os.Create(sparse)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(1 << 40); err != nil {
		t.Fatal(err)
	}
	f.Close()
	return map[string]string{"fifo": fifo, "sparse": sparse, "zero": "/dev/zero", "passwd": "/etc/passwd", "dir": dir}
}

// TestReadRegularRefusesWhatIsNotARegularFile: the one helper every configured path goes
// through refuses a FIFO without blocking, devices and directories, files over the cap; and
// a YAML error does not quote the file.
func TestReadRegularRefusesWhatIsNotARegularFile(t *testing.T) {
	h := hostileFiles(t)
	for _, tc := range []struct{ name, path, want string }{
		{"fifo", h["fifo"], "not a regular file (a FIFO)"},
		{"zero", h["zero"], "not a regular file (a character device)"},
		{"dir", h["dir"], "not a regular file (a directory)"},
		{"sparse", h["sparse"], "1099511627776 bytes, more than the 16777216"},
	} {
		done := make(chan error, 1)
		go func() {
			_, err := readRegular(tc.path, maxConfigFileBytes)
			done <- err
		}()
		select {
		case err := <-done:
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("%s: got %v, want an error containing %q", tc.name, err, tc.want)
			}
		case <-time.After(30 * time.Second):
			t.Fatalf("%s: readRegular blocked", tc.name)
		}
	}
	// A file that grows past the cap between fstat and read is cut at the cap.
	small := filepath.Join(h["dir"], "small")
	os.WriteFile(small, bytes.Repeat([]byte("a"), 100), 0o644)
	if _, err := readRegular(small, 99); err == nil {
		t.Errorf("100 bytes with a cap of 99: no error")
	}
	if b, err := readRegular(small, 100); err != nil || len(b) != 100 {
		t.Errorf("100 bytes with a cap of 100: got %d bytes, %v", len(b), err)
	}
	// /etc/passwd as a seed configuration: an error, without its bytes.
	_, err := seedEntryKind("/etc/passwd", "x")
	if err == nil || strings.Contains(err.Error(), "root:") || !strings.Contains(err.Error(), "not a valid seed configuration") {
		t.Errorf("/etc/passwd as seed.yaml: got %v, want a YAML error without the file's bytes", err)
	}
	for _, name := range []string{"fifo", "zero", "sparse"} {
		if _, err := seedEntryKind(h[name], "x"); err == nil {
			t.Errorf("%s as seed.yaml: no error", name)
		}
	}
}

// TestSeedRequestCannotNameAFile: seed_config in a request is a name from renderd.yaml's
// seed_configs; the probe's paths are refused at once, over the native protocol and POST
// /tasks, and the daemon's memory does not move. A listed name runs with its file.
func TestSeedRequestCannotNameAFile(t *testing.T) {
	h := hostileFiles(t)
	other := filepath.Join(t.TempDir(), "other-seed.yaml")
	if err := os.WriteFile(other, []byte("seeds:\n  elsewhere: {caches: [c]}\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	r := newTaskRig(t, taskRigOpts{daemonOpts: daemonOpts{renderers: 1, maxSeed: -1, tcp: true}, plannerArgs: []string{"-n", "3"},
		extraYAML: "seed_configs: {other: " + other + "}\n"})
	rssBefore := vmRSS(t)
	start := time.Now()
	attempts := 0
	for _, name := range []string{"zero", "fifo", "sparse", "passwd"} {
		for i := 0; i < 25; i++ { // the probe's FIFO attack needed thousands; 25 each shows none is held
			line, _ := json.Marshal(map[string]any{"command": "seed", "task": "all", "seed_config": h[name]})
			rep := r.call(string(line))
			attempts++
			if rep.Status != statusError || !strings.Contains(rep.ErrorMessage, "a request names one by its name or by the path renderd.yaml gives it") || strings.Contains(rep.ErrorMessage, "root:") {
				t.Fatalf("%s: got %+v, want a refusal naming seed_configs", name, rep)
			}
			body, _ := json.Marshal(map[string]any{"task": "all", "seed_config": h[name]})
			resp, err := http.Post("http://"+r.tcp+"/tasks", "application/json", bytes.NewReader(body))
			if err != nil {
				t.Fatal(err)
			}
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			attempts++
			if resp.StatusCode != http.StatusBadRequest || !bytes.Contains(b, []byte("by the path renderd.yaml gives it")) {
				t.Fatalf("POST /tasks %s: HTTP %d %s", name, resp.StatusCode, b)
			}
		}
	}
	took := time.Since(start)
	rssAfter := vmRSS(t)
	t.Logf("%d client-named-path attempts refused in %s (%s each); RSS of the test process %d KiB before, %d KiB after",
		attempts, took.Round(time.Millisecond), (took / time.Duration(attempts)).Round(time.Microsecond), rssBefore, rssAfter)
	if rssAfter > rssBefore+64<<10 {
		t.Errorf("RSS grew from %d KiB to %d KiB", rssBefore, rssAfter)
	}
	// The daemon still serves everyone: health, and a task from a listed configuration.
	if rep := r.call(`{"command":"health"}`); rep.Status != statusOK {
		t.Fatalf("health after the attempts: %+v", rep)
	}
	rep := r.call(`{"command":"seed","task":"elsewhere","seed_config":"other"}`)
	if rep.Status != statusQueued {
		t.Fatalf("seed from seed_configs.other: %+v", rep)
	}
	d := r.waitEnded(taskOf(t, rep).TaskID)
	if d.State != taskStateDone || d.Done != 3 {
		t.Fatalf("task from seed_configs.other: %+v", d)
	}
	spec, _ := os.ReadFile(r.plannerLog)
	if !strings.Contains(string(spec), `"seed_config":"`+other+`"`) {
		t.Errorf("the planner did not get seed_configs.other's path: %s", spec)
	}
	if rep := r.call(`{"command":"seed","task":"nope","seed_config":"other"}`); rep.Status != statusError || !strings.Contains(rep.ErrorMessage, "elsewhere") {
		t.Errorf("unknown entry of a listed configuration: %+v", rep)
	}
}

// TestSeedConfigsValidation: names that could pass for paths are refused; paths are made absolute.
func TestSeedConfigsValidation(t *testing.T) {
	for _, tc := range []struct{ yaml, want string }{
		{"seed_configs: {../x: /a.yaml}", `seed_configs: name "../x"`},
		{"seed_configs: {/etc/passwd: /a.yaml}", `seed_configs: name "/etc/passwd"`},
		{"seed_configs: {a: ''}", "seed_configs.a: want the path"},
		{"max_tasks: 0", "max_tasks: want 1..1000"},
		{"client_timeout: 10ms", "client_timeout: want at least 100ms"},
	} {
		c := defaultConfig()
		c.RendererCommand = []string{"/bin/true"}
		c.Journal = false
		if err := parseConfig(&c, strings.NewReader(tc.yaml)); err != nil {
			t.Fatalf("%s: %v", tc.yaml, err)
		}
		if err := c.Validate(); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: got %v, want %q", tc.yaml, err, tc.want)
		}
	}
}

// runAs runs name args as uid/gid 65534 (nobody) and returns its output.
func runAs(t *testing.T, stdin string, name string, args ...string) string {
	t.Helper()
	if os.Getuid() != 0 {
		if os.Getenv("CI") == "true" {
			t.Fatal("this test runs a client as another user: it needs root")
		}
		t.Skip("needs root to run a client as nobody")
	}
	path, err := exec.LookPath(name)
	if err != nil {
		t.Fatalf("%s: %v (CI installs it)", name, err)
	}
	cmd := exec.Command(path, args...)
	cmd.Stdin = strings.NewReader(stdin)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
	cmd.WaitDelay = 10 * time.Second
	out, _ := cmd.CombinedOutput()
	return string(out)
}

// TestTCPPeerHeldToTheSocketRule: without an allow-list, a loopback TCP peer gets in only
// as the Unix socket would let it: a real other user (nobody) is refused over the native
// protocol and HTTP, admitted when socket_mode lets others in, when socket_group is its
// group, or when the allow-list names it.
func TestTCPPeerHeldToTheSocketRule(t *testing.T) {
	ping := `{"command":"ping","id":"p"}`
	for _, tc := range []struct {
		name, yaml string
		admitted   bool
	}{
		{"default 0660, the daemon's group", "", false},
		{"socket_mode 0666", "socket_mode: \"0666\"\n", true},
		{"socket_group nobody's group", "socket_group: \"65534\"\n", true},
		{"socket_group nobody's group, mode 0600", "socket_group: \"65534\"\nsocket_mode: \"0600\"\n", false},
		{"allow-list names nobody", "allowed_uids: [65534]\n", true},
		{"allow-list without nobody", "allowed_uids: [4242]\n", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d := newTestDaemon(t, daemonOpts{renderers: 1, maxSeed: -1, tcp: true, extraYAML: tc.yaml})
			native := runAs(t, ping+"\n", "socat", "-t", "5", "-", "TCP:"+d.tcp)
			httpOut := runAs(t, "", "curl", "-sS", "-m", "10", "-o", "-", "-w", " HTTP %{http_code}", "-d", ping, "http://"+d.tcp+"/")
			if tc.admitted {
				if !strings.Contains(native, `"status":"ok"`) || !strings.Contains(httpOut, `"status":"ok"`) || !strings.Contains(httpOut, "HTTP 200") {
					t.Fatalf("nobody should be admitted: native %q, HTTP %q", native, httpOut)
				}
				return
			}
			if !strings.Contains(native, "permission denied") || !strings.Contains(httpOut, "HTTP 403") {
				t.Fatalf("nobody should be refused: native %q, HTTP %q", native, httpOut)
			}
			// Root (this process) still gets in over TCP.
			c, err := net.Dial("tcp", d.tcp)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			cl := &client{t: t, c: c, r: bufio.NewReader(c)}
			cl.send(ping)
			if rep := cl.read(); rep.Status != statusOK {
				t.Fatalf("root over TCP: %+v", rep)
			}
			if !strings.Contains(d.stderr.String(), "uid 65534") {
				t.Errorf("the refusal's WARN does not name uid 65534:\n%s", d.stderr.String())
			}
		})
	}
}

// dialRaw opens a TCP connection to the daemon's HTTP/native port with a read deadline for
// the whole test step.
func dialRaw(t *testing.T, addr string) net.Conn {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	c.SetReadDeadline(time.Now().Add(30 * time.Second))
	return c
}

// TestSlowClientsAreCut: with client_timeout 1s, a first line that does not finish (native,
// or an HTTP request line: it used to become a native connection without a deadline) and a
// POST body that does not arrive (/, /tasks, /expire) end the connection; an established
// native connection may stay idle; a half-sent list leaves nothing in state_dir.
func TestSlowClientsAreCut(t *testing.T) {
	r := newTaskRig(t, taskRigOpts{daemonOpts: daemonOpts{renderers: 1, tcp: true, rendArgs: []string{"-caches", expireCaches}},
		extraYAML: "client_timeout: 1s\n"})
	t.Run("native first line", func(t *testing.T) {
		c := dialRaw(t, r.tcp)
		io.WriteString(c, `{"command":"pi`)
		if b, err := io.ReadAll(c); err != nil || len(b) != 0 {
			t.Fatalf("got %q, %v; want the connection closed", b, err)
		}
	})
	t.Run("HTTP request line", func(t *testing.T) {
		c := dialRaw(t, r.tcp)
		io.WriteString(c, "GET /status HTT")
		if b, err := io.ReadAll(c); err != nil || len(b) != 0 {
			t.Fatalf("got %q, %v; want the connection closed", b, err)
		}
	})
	t.Run("native idle after the first line", func(t *testing.T) {
		c := dialRaw(t, r.tcp)
		cl := &client{t: t, c: c, r: bufio.NewReader(c)}
		cl.send(`{"command":"ping"}`)
		if rep := cl.read(); rep.Status != statusOK {
			t.Fatal(rep)
		}
		// Three times client_timeout without a request: still open (the read times out here,
		// on our side, rather than seeing EOF).
		c.SetReadDeadline(time.Now().Add(3 * time.Second))
		if _, err := cl.r.ReadByte(); !errors.Is(err, os.ErrDeadlineExceeded) {
			t.Fatalf("idle native connection: got %v, want it still open", err)
		}
		c.SetReadDeadline(time.Now().Add(30 * time.Second))
		cl.send(`{"command":"ping"}`)
		if rep := cl.read(); rep.Status != statusOK {
			t.Fatal(rep)
		}
	})
	for _, path := range []string{"/", "/tasks", "/expire?cache=exp_GRID"} {
		t.Run("POST "+path+" body", func(t *testing.T) {
			c := dialRaw(t, r.tcp)
			fmt.Fprintf(c, "POST %s HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{\"comm", path)
			b, err := io.ReadAll(c)
			if err != nil {
				t.Fatalf("%v after %q", err, b)
			}
			if !bytes.Contains(b, []byte("not received in time")) {
				t.Fatalf("got %q, want an error reply saying the body did not arrive in time", b)
			}
		})
	}
	t.Run("POST / body a byte at a time", func(t *testing.T) {
		// The probe's trickle (a byte per 1.5 s kept a body open for minutes): each byte
		// earns no time, so client_timeout ends it.
		c := dialRaw(t, r.tcp)
		fmt.Fprintf(c, "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n")
		stop := make(chan struct{})
		defer close(stop)
		go func() {
			tick := time.NewTicker(100 * time.Millisecond)
			defer tick.Stop()
			for {
				select {
				case <-stop:
					return
				case <-tick.C:
					if _, err := c.Write([]byte(" ")); err != nil {
						return
					}
				}
			}
		}()
		// The daemon closes after its reply; our next byte may then draw a reset.
		b, err := io.ReadAll(c)
		if (err != nil && !errors.Is(err, syscall.ECONNRESET)) || !bytes.Contains(b, []byte("not received in time")) {
			t.Fatalf("got %q, %v; want an error reply saying the body did not arrive in time", b, err)
		}
	})
	lists, err := os.ReadDir(filepath.Join(r.testDaemon.dir, "state", "lists"))
	if err != nil {
		t.Fatalf("state_dir/lists (POST /expire creates it before reading the body): %v", err)
	}
	for _, e := range lists {
		t.Errorf("a half-sent list left %s in state_dir", e.Name())
	}
}

// TestMaxTasks: with max_tasks 1, a second and third task wait in state queued, a queued one
// can be cancelled at once, and the next starts when the running one ends.
func TestMaxTasks(t *testing.T) {
	r := newTaskRig(t, taskRigOpts{daemonOpts: daemonOpts{renderers: 1, maxSeed: -1, gate: true}, plannerArgs: []string{"-n", "2"},
		extraYAML: "max_tasks: 1\n"})
	first, second, third := r.seed("all"), r.seed("all"), r.seed("all")
	if second.State != taskStateQueued || third.State != taskStateQueued {
		t.Fatalf("tasks beyond max_tasks: got %s and %s, want queued", second.State, third.State)
	}
	r.waitTask(first.TaskID, "running", func(d taskDoc) bool { return d.State == taskStateRunning })
	if d := r.waitTask(second.TaskID, "queued", func(taskDoc) bool { return true }); d.State != taskStateQueued {
		t.Fatalf("second task while the first runs: %s, want queued", d.State)
	}
	rep := r.call(`{"command":"cancel","task_id":"` + third.TaskID + `"}`)
	if d := taskOf(t, rep); rep.Status != statusOK || d.State != taskStateCancelled {
		t.Fatalf("cancel of a queued task: %+v", rep)
	}
	r.release(2)
	if d := r.waitEnded(first.TaskID); d.State != taskStateDone {
		t.Fatalf("first task: %+v", d)
	}
	r.release(2)
	if d := r.waitEnded(second.TaskID); d.State != taskStateDone || d.Done != 2 {
		t.Fatalf("second task after the first ended: %+v", d)
	}
	if n := strings.Count(readFile(t, r.plannerLog), "\n"); n != 2 {
		t.Errorf("planners started: %d, want 2 (the cancelled queued task never starts one)", n)
	}
}

func readFile(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// TestUnreadRepliesStopReading: a client that pipelines status requests without reading
// its replies is not read further once max_in_flight_per_connection replies wait (its
// writes stall), and gets every reply once it reads.
func TestUnreadRepliesStopReading(t *testing.T) {
	d := newTestDaemon(t, daemonOpts{renderers: 1, maxSeed: -1, extraYAML: "max_in_flight_per_connection: 10\n"})
	c, err := net.Dial("unix", d.socket)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	const n = 5000
	pad := strings.Repeat("x", 1000)
	var buf bytes.Buffer
	for i := 0; i < n; i++ {
		fmt.Fprintf(&buf, `{"command":"status","id":"%s%d"}`+"\n", pad, i)
	}
	// 5 MB of requests: far beyond the socket's buffers. Without back-pressure the daemon
	// reads them all (and holds 5,000 status documents); with it the write stalls.
	c.SetWriteDeadline(time.Now().Add(3 * time.Second))
	written, err := c.Write(buf.Bytes())
	if !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("write of %d bytes without reading: got %v after %d bytes, want it to stall", buf.Len(), err, written)
	}
	t.Logf("the daemon stopped reading after %d of %d bytes", written, buf.Len())
	// Now read: the rest goes through and every request is answered.
	c.SetWriteDeadline(time.Time{})
	go func() { c.Write(buf.Bytes()[written:]) }()
	c.SetReadDeadline(time.Now().Add(2 * time.Minute))
	br := bufio.NewReaderSize(c, 1<<20)
	for i := 0; i < n; i++ {
		line, err := br.ReadBytes('\n')
		if err != nil {
			t.Fatalf("reply %d: %v", i, err)
		}
		var rep Reply
		if json.Unmarshal(line, &rep) != nil || rep.Status != statusOK || rep.ID == nil || *rep.ID != pad+strconv.Itoa(i) {
			t.Fatalf("reply %d: %.200s", i, line)
		}
	}
}

// TestHTTPHealthCommandAnswersOnce: POST {"command":"health"} gets one response (it used to
// fall through into the tile path: a second response and an invalid request counted).
func TestHTTPHealthCommandAnswersOnce(t *testing.T) {
	d := newTestDaemon(t, daemonOpts{renderers: 1, maxSeed: -1, tcp: true})
	c := dialRaw(t, d.tcp)
	body := `{"command":"health","id":"h"}`
	fmt.Fprintf(c, "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s", len(body), body)
	fmt.Fprintf(c, "POST / HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s", len(body), body)
	b, err := io.ReadAll(c)
	if err != nil {
		t.Fatal(err)
	}
	if n := bytes.Count(b, []byte("HTTP/1.1 200")); n != 2 || bytes.Count(b, []byte(`"id":"h"`)) != 2 {
		t.Fatalf("two health requests: got %d responses:\n%s", n, b)
	}
	if !bytes.Contains(b, []byte(`"status":"ok"`)) {
		t.Errorf("health reply: %s", b)
	}
	doc := d.status()
	if doc.Conns.Invalid != 0 || doc.Counters["invalid"] != 0 || len(doc.Requests) != 0 {
		t.Errorf("health counted as a request: connections %+v, invalid %d, requests %v", doc.Conns, doc.Counters["invalid"], doc.Requests)
	}
}

// TestDiagTCPOwnerAgreesWithTheTable: the sock_diag lookup finds the same owner as the
// /proc/net/tcp scan for a live loopback connection (IPv4 and IPv6), and nothing for a
// tuple without a socket.
func TestDiagTCPOwnerAgreesWithTheTable(t *testing.T) {
	for _, network := range []string{"tcp4", "tcp6"} {
		addr := "127.0.0.1:0"
		if network == "tcp6" {
			addr = "[::1]:0"
		}
		l, err := net.Listen(network, addr)
		if err != nil {
			t.Logf("%s: %v (skipped)", network, err)
			continue
		}
		defer l.Close()
		c, err := net.Dial(network, l.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		client, server := tcpAddrPort(c.LocalAddr().(*net.TCPAddr)), tcpAddrPort(c.RemoteAddr().(*net.TCPAddr))
		got, err := diagTCPOwner(client, server)
		if err != nil || got != os.Getuid() {
			t.Errorf("%s: diagTCPOwner = %d, %v; want %d", network, got, err, os.Getuid())
		}
		table := procNetTCP.v4
		if network == "tcp6" {
			table = procNetTCP.v6
		}
		if uid, found, err := findTCPOwner(table, client, server); err != nil || !found || uid != got {
			t.Errorf("%s: the table says %d, %v, %v", network, uid, found, err)
		}
		gone := netip.AddrPortFrom(client.Addr(), 1)
		if _, err := diagTCPOwner(gone, server); !errors.Is(err, errDiagNotFound) {
			t.Errorf("%s: a tuple without a socket: got %v, want errDiagNotFound", network, err)
		}
	}
}
