// SPDX-License-Identifier: Apache-2.0

package main

// Cluster tests (docs/design.md §15): three daemons on loopback behind a real HAProxy running
// examples/cluster/haproxy.cfg (addresses and check interval changed, nothing else).

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

func TestMapProxyRequestID(t *testing.T) {
	// Values from Python: hashlib.sha1(str((cache, [(x, y, z)])).encode('ascii')).hexdigest().
	for _, c := range []struct {
		cache   string
		x, y, z int32
		want    string
	}{
		{"wms_cache_GLOBAL_MERCATOR", 15, 17, 5, "aeb52b506e4e82d0a1edf649d56e0451cfd5862c"},   // MapProxy's own test value
		{"wms_cache_GLOBAL_WEBMERCATOR", 16, 8, 5, "a8a4fb883bf7e0f285fc11104200e8e7dda6b9d5"}, // captured from MapProxy
		{"it's_GLOBAL", 1, 2, 3, "3d76ddb4d066bb4dc7aca4cf11738eb309561920"},
		{`a"b'c\d_G`, 0, 0, 0, "0989da4e1a3203a05421929e7925b54d65604d26"},
		{"tab\there", 0, 0, 0, "b8424badcd823308b4f1ee400b2a49ac43ccad17"},
	} {
		got, err := mapproxyRequestID(c.cache, tileCoord{c.x, c.y, c.z})
		if err != nil || got != c.want {
			t.Errorf("mapproxyRequestID(%q, %d %d %d): got %s, %v; want %s", c.cache, c.x, c.y, c.z, got, err, c.want)
		}
	}
	if _, err := mapproxyRequestID("café_G", tileCoord{}); err == nil {
		t.Errorf("a non-ASCII cache identifier: got no error; MapProxy cannot encode it either")
	}
}

// requireHAProxy returns haproxy's path: $RENDERD_HAPROXY when set (another HAProxy
// version, e.g. trixie's 3.0 through packaging/deploy-test/haproxy-from-root), else haproxy
// on PATH. It fails under CI=true and skips elsewhere when HAProxy is missing.
func requireHAProxy(t *testing.T) string {
	t.Helper()
	exe := "haproxy"
	if env := os.Getenv("RENDERD_HAPROXY"); env != "" {
		exe = env
	}
	path, err := exec.LookPath(exe)
	if err != nil {
		msg := "haproxy is missing (apt-get install haproxy): " + err.Error()
		if os.Getenv("CI") == "true" {
			t.Fatal(msg)
		}
		t.Skip(msg)
	}
	return path
}

// clusterHAProxyConfig is examples/cluster/haproxy.cfg for this test: HAProxy listens on
// front, the servers are the daemons' addresses, the stats socket is in dir, logs go to
// stdout and health checks run every 100 ms. Each change must apply exactly once, so the
// test breaks if the example changes shape.
func clusterHAProxyConfig(t *testing.T, dir, front string, daemons []string) string {
	t.Helper()
	repo, _ := os.Getwd()
	b, err := os.ReadFile(filepath.Join(repo, "examples/cluster/haproxy.cfg"))
	if err != nil {
		t.Fatal(err)
	}
	cfg := string(b)
	replace := func(old, new string) {
		if n := strings.Count(cfg, old); n != 1 {
			t.Fatalf("examples/cluster/haproxy.cfg: %q occurs %d times, want 1", old, n)
		}
		cfg = strings.Replace(cfg, old, new, 1)
	}
	replace("log /dev/log local0", "log stdout format raw local0")
	replace("stats socket /run/haproxy/admin.sock", "stats socket "+dir+"/haproxy.sock")
	replace("bind 127.0.0.1:8111", "bind "+front)
	replace("default-server inter 2s", "default-server inter 100ms")
	servers := regexp.MustCompile(`(?m)^    server r(\d) 10\.0\.0\.1\d:8111 `)
	if got := len(servers.FindAllString(cfg, -1)); got != len(daemons) {
		t.Fatalf("examples/cluster/haproxy.cfg: %d servers, want %d", got, len(daemons))
	}
	cfg = servers.ReplaceAllStringFunc(cfg, func(m string) string {
		i, _ := strconv.Atoi(servers.FindStringSubmatch(m)[1])
		return "    server r" + strconv.Itoa(i) + " " + daemons[i-1] + " "
	})
	path := filepath.Join(dir, "haproxy.cfg")
	if err := os.WriteFile(path, []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

// clusterHAProxy is a running HAProxy.
type clusterHAProxy struct {
	t     *testing.T
	proc  *lcProc
	front string // host:port MapProxy posts to
	stats string // admin socket
}

// startClusterHAProxy starts HAProxy in front of daemons, listening on front (a free port
// when "").
func startClusterHAProxy(t *testing.T, dir, front string, daemons []string) *clusterHAProxy {
	t.Helper()
	exe := requireHAProxy(t)
	if front == "" {
		front = freeTCPAddr(t)
	}
	h := &clusterHAProxy{t: t, front: front, stats: dir + "/haproxy.sock"}
	cfg := clusterHAProxyConfig(t, dir, h.front, daemons)
	if out, err := exec.Command(exe, "-c", "-f", cfg).CombinedOutput(); err != nil {
		t.Fatalf("haproxy -c: %v\n%s", err, out)
	}
	// -db: foreground; startLCProc's cleanup stops it (SIGTERM, SIGKILL after 15 s).
	h.proc = startLCProc(t, []string{exe, "-db", "-f", cfg}, lcEnv(), nil)
	return h
}

// states returns each server's status from HAProxy's stats socket ("UP", "DOWN", …),
// or nil while the socket is not there yet.
func (h *clusterHAProxy) states() map[string]string {
	c, err := net.Dial("unix", h.stats)
	if err != nil {
		return nil
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(lcDeadline))
	io.WriteString(c, "show stat\n")
	b, _ := io.ReadAll(c)
	st := map[string]string{}
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Split(line, ",")
		if len(f) > 17 && f[0] == "renderers" && f[1] != "BACKEND" {
			st[f[1]] = f[17]
		}
	}
	return st
}

// command sends one command to HAProxy's admin socket and fails on an answer.
func (h *clusterHAProxy) command(cmd string) {
	h.t.Helper()
	c, err := net.Dial("unix", h.stats)
	if err != nil {
		h.t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(lcDeadline))
	io.WriteString(c, cmd+"\n")
	b, _ := io.ReadAll(c)
	if out := strings.TrimSpace(string(b)); out != "" {
		h.t.Fatalf("haproxy %q: %s", cmd, out)
	}
}

// waitStates waits until HAProxy reports every server in want with that status.
func (h *clusterHAProxy) waitStates(want map[string]string) {
	h.t.Helper()
	deadline := time.Now().Add(lcDeadline)
	for {
		got := h.states()
		ok := got != nil
		for s, w := range want {
			ok = ok && strings.HasPrefix(got[s], w)
		}
		if ok {
			return
		}
		select {
		case <-h.proc.done:
			h.t.Fatalf("haproxy exited: %v\n%s", h.proc.err, h.proc.out.String())
		default:
		}
		if time.Now().After(deadline) {
			h.t.Fatalf("haproxy server states: got %v, want %v", got, want)
		}
		time.Sleep(20 * time.Millisecond) // polling HAProxy's health checks, bounded by the deadline
	}
}

// clusterDaemon is one daemon of the cluster, run as a child process so that it can be
// killed with SIGKILL and started again on the same address.
type clusterDaemon struct {
	t    *testing.T
	name string // HAProxy's server name: r1, r2, r3
	addr string
	cfg  string
	args []string // extra daemon arguments (-f mapproxy.yaml)
	log  string   // the fake renderers' job log
	proc *lcProc
}

func newClusterDaemon(t *testing.T, dir string, n int, rendererCmd []string, extraYAML string, args ...string) *clusterDaemon {
	t.Helper()
	d := &clusterDaemon{t: t, name: "r" + strconv.Itoa(n), addr: freeTCPAddr(t), args: args,
		cfg: filepath.Join(dir, fmt.Sprintf("renderd-%d.yaml", n)), log: filepath.Join(dir, fmt.Sprintf("jobs-%d.log", n))}
	y := fmt.Sprintf("socket: \"\"\nhttp: %s\nstop_timeout: 5s\nrender_timeout: 5m\nstate_dir: %s\n", d.addr, filepath.Join(dir, fmt.Sprintf("state-%d", n)))
	if rendererCmd != nil {
		cmd, _ := json.Marshal(append(rendererCmd, "-log", d.log))
		y += "renderer_command: " + string(cmd) + "\n"
	}
	if err := os.WriteFile(d.cfg, []byte(y+extraYAML), 0o644); err != nil {
		t.Fatal(err)
	}
	d.start()
	return d
}

// start runs the daemon and waits until its /healthz says ok.
func (d *clusterDaemon) start() {
	d.t.Helper()
	argv := append([]string{lcExecutable(d.t), "daemon", "-c", d.cfg}, d.args...)
	d.proc = startLCProc(d.t, argv, lcEnv(), nil)
	waitHealth(d.t, d.addr, d.name+" up", func(code int, _ Reply) bool { return code == http.StatusOK })
}

// kill ends the daemon with SIGKILL (no shutdown at all) and waits for it.
func (d *clusterDaemon) kill() {
	d.t.Helper()
	d.proc.cmd.Process.Kill()
	d.proc.wait(lcDeadline)
}

func (d *clusterDaemon) status() statusDoc {
	d.t.Helper()
	c := &http.Client{Timeout: lcDeadline}
	resp, err := c.Get("http://" + d.addr + "/status")
	if err != nil {
		d.t.Fatal(err)
	}
	defer resp.Body.Close()
	var doc statusDoc
	if err := json.NewDecoder(resp.Body).Decode(&doc); err != nil {
		d.t.Fatalf("%s status: %v", d.name, err)
	}
	return doc
}

// jobs returns the metatiles the daemon's fake renderers were given, "z/x/y" → count.
func (d *clusterDaemon) jobs() map[string]int {
	m := map[string]int{}
	for _, l := range (&testDaemon{t: d.t, log: d.log}).jobLog() {
		f := strings.Fields(l) // pid cache z x y
		m[f[2]+"/"+f[3]+"/"+f[4]]++
	}
	return m
}

// mapproxyPost sends MapProxy 1.15's exact request for one metatile (id included) to url
// on a new connection, as MapProxy does, and returns the JSON reply.
func mapproxyPost(client *http.Client, url, cache string, x, y, z, prio int) (map[string]any, error) {
	id, err := mapproxyRequestID(cache, tileCoord{int32(x), int32(y), int32(z)})
	if err != nil {
		return nil, err
	}
	body := fmt.Sprintf(`{"command": "tile", "id": "%s", "tiles": [[%d, %d, %d]], "cache_identifier": "%s", "priority": %d}`, id, x, y, z, cache, prio)
	resp, err := client.Post(url, "", strings.NewReader(body))
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	var out map[string]any
	if err := json.NewDecoder(resp.Body).Decode(&out); err != nil {
		return nil, fmt.Errorf("HTTP %d, body is not JSON: %w", resp.StatusCode, err)
	}
	return out, nil
}

// metatile is a metatile's top-left tile at z 12 on a 4x4 grid.
type metatile struct{ x, y int }

func (m metatile) key() string { return fmt.Sprintf("12/%d/%d", m.x, m.y) }

// postAll posts one MapProxy request per metatile through HAProxy, 32 at a time, and
// returns the replies' failures (request → error message).
func postAll(t *testing.T, front string, tiles []metatile) map[string]string {
	t.Helper()
	client := &http.Client{Timeout: 2 * time.Minute, Transport: &http.Transport{DisableKeepAlives: true}}
	var mu sync.Mutex
	failed := map[string]string{}
	work := make(chan metatile)
	var wg sync.WaitGroup
	for w := 0; w < 32; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for m := range work {
				r, err := mapproxyPost(client, "http://"+front+"/", cacheID, m.x, m.y, 12, 100)
				if err == nil && r["status"] != "ok" {
					err = fmt.Errorf("%v: %v", r["status"], r["error_message"])
				}
				if err != nil {
					mu.Lock()
					failed[m.key()] = err.Error()
					mu.Unlock()
				}
			}
		}()
	}
	for _, m := range tiles {
		work <- m
	}
	close(work)
	wg.Wait()
	return failed
}

// TestClusterSpreadAndFailover: 3,000 distinct metatiles through HAProxy are each rendered
// exactly once, spread evenly over three daemons; when one daemon is killed, the requests
// it was rendering get errors, its share moves to the other two and nothing else fails or
// moves; when it returns, its share moves back to it.
func TestClusterSpreadAndFailover(t *testing.T) {
	requireHAProxy(t)
	dir := shortTempDir(t)
	exe := lcExecutable(t)
	const stallX = 4000 // the victim's renderers never answer jobs at this x
	var daemons []*clusterDaemon
	for n := 1; n <= 3; n++ {
		cmd := []string{exe, "fake-renderer", "-delay", "1ms"}
		if n == 2 {
			cmd = append(cmd, "-stall", strconv.Itoa(stallX))
		}
		daemons = append(daemons, newClusterDaemon(t, dir, n, cmd, "renderers: 4\n"))
	}
	victim := daemons[1]
	h := startClusterHAProxy(t, dir, "", []string{daemons[0].addr, daemons[1].addr, daemons[2].addr})
	h.waitStates(map[string]string{"r1": "UP", "r2": "UP", "r3": "UP"})

	var tiles []metatile
	for i := 0; i < 3000; i++ {
		tiles = append(tiles, metatile{4 * (i % 60), 4 * (i / 60)})
	}
	// renders returns, per metatile, the daemons (by index) that rendered it since before.
	renders := func(before []map[string]int) map[string][]int {
		m := map[string][]int{}
		for i, d := range daemons {
			for k, n := range d.jobs() {
				for ; n > before[i][k]; n-- {
					m[k] = append(m[k], i)
				}
			}
		}
		return m
	}
	snapshot := func() []map[string]int {
		var s []map[string]int
		for _, d := range daemons {
			s = append(s, d.jobs())
		}
		return s
	}

	// 1. Each metatile once, evenly spread; owner records who has it.
	start := time.Now()
	if failed := postAll(t, h.front, tiles); len(failed) > 0 {
		t.Fatalf("%d of 3000 requests failed, e.g. %v", len(failed), firstOf(failed))
	}
	took := time.Since(start)
	owner := map[string]int{}
	perDaemon := make([]int, len(daemons))
	got := renders([]map[string]int{{}, {}, {}})
	for _, m := range tiles {
		r := got[m.key()]
		if len(r) != 1 {
			t.Fatalf("metatile %s rendered by daemons %v, want exactly one", m.key(), r)
		}
		owner[m.key()] = r[0]
		perDaemon[r[0]]++
	}
	if len(got) != len(tiles) {
		t.Errorf("renders of other metatiles: %d rendered, want %d", len(got), len(tiles))
	}
	for i, n := range perDaemon {
		if n < 800 || n > 1200 {
			t.Errorf("%s rendered %d of 3000 metatiles, want 1000 ± 20 %%", daemons[i].name, n)
		}
	}
	t.Logf("3000 distinct metatiles through HAProxy in %v (%.0f/s): per daemon %v", took.Round(time.Millisecond), 3000/took.Seconds(), perDaemon)

	// 2. Requests in flight on the victim: metatiles at x = stallX that HAProxy sends there
	// never finish until it dies; those sent elsewhere are answered.
	type result struct {
		key string
		r   map[string]any
		err error
	}
	var stalled []metatile
	for i := 0; i < 30; i++ {
		stalled = append(stalled, metatile{stallX, 4 * i})
	}
	victimBefore := victim.status().Counters["requested"]
	client := &http.Client{Timeout: 2 * time.Minute, Transport: &http.Transport{DisableKeepAlives: true}}
	results := make(chan result, len(stalled))
	for _, m := range stalled {
		go func() {
			r, err := mapproxyPost(client, "http://"+h.front+"/", cacheID, m.x, m.y, 12, 100)
			results <- result{m.key(), r, err}
		}()
	}
	// Every stalled request is either answered (another daemon) or taken by the victim
	// (rendering, or queued behind its four stalled renderers).
	answered := map[string]result{}
	deadline := time.Now().Add(lcDeadline)
	for {
		n := int(victim.status().Counters["requested"] - victimBefore)
		if n > 0 && n+len(answered) == len(stalled) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("stalled requests: %d taken by the victim, %d answered, of %d", n, len(answered), len(stalled))
		}
		select {
		case res := <-results:
			answered[res.key] = res
		case <-time.After(20 * time.Millisecond): // polling the victim's job log, bounded by the deadline
		}
	}
	for k, res := range answered {
		if res.err != nil || res.r["status"] != "ok" {
			t.Errorf("request %s answered by a surviving daemon: got %v, %v; want ok", k, res.r, res.err)
		}
	}
	inFlight := len(stalled) - len(answered)

	victim.kill()
	for i := 0; i < inFlight; i++ {
		var res result
		select {
		case res = <-results:
		case <-time.After(lcDeadline):
			t.Fatalf("the requests in flight on the killed daemon got no answer")
		}
		if res.err != nil || res.r["status"] != "error" || !strings.Contains(fmt.Sprint(res.r["error_message"]), "HAProxy 502") {
			t.Errorf("request %s in flight on the killed daemon: got %v, %v; want HAProxy's JSON 502 error", res.key, res.r, res.err)
		}
	}
	t.Logf("%d requests in flight on the killed daemon got an error; %d others were answered", inFlight, len(answered))

	// 3. At once, before HAProxy's health check has noticed: every request succeeds (a
	// connection refused is sent to another daemon); only the victim's share moves.
	before := snapshot()
	if failed := postAll(t, h.front, tiles); len(failed) > 0 {
		t.Fatalf("with one daemon killed, %d of 3000 requests failed, e.g. %v", len(failed), firstOf(failed))
	}
	h.waitStates(map[string]string{"r2": "DOWN"})
	got = renders(before)
	moved := 0
	for _, m := range tiles {
		r := got[m.key()]
		switch {
		case len(r) != 1:
			t.Errorf("after the kill, metatile %s rendered by %v, want exactly one daemon", m.key(), r)
		case owner[m.key()] == 1 && r[0] == 1, owner[m.key()] != 1 && r[0] != owner[m.key()]:
			t.Errorf("after the kill, metatile %s (owner %s) rendered by %s", m.key(), daemons[owner[m.key()]].name, daemons[r[0]].name)
		case owner[m.key()] == 1:
			moved++
		}
	}
	t.Logf("after the kill: %d metatiles moved from %s to the others, the rest stayed", moved, victim.name)

	// 4. The victim returns: once HAProxy sees it up, every metatile goes to its first owner.
	victim.start()
	h.waitStates(map[string]string{"r1": "UP", "r2": "UP", "r3": "UP"})
	before = snapshot()
	if failed := postAll(t, h.front, tiles); len(failed) > 0 {
		t.Fatalf("after the daemon returned, %d of 3000 requests failed, e.g. %v", len(failed), firstOf(failed))
	}
	got = renders(before)
	for _, m := range tiles {
		if r := got[m.key()]; len(r) != 1 || r[0] != owner[m.key()] {
			t.Errorf("after the return, metatile %s rendered by %v, want only its owner %s", m.key(), r, daemons[owner[m.key()]].name)
		}
	}

	// 5. Draining r1 as README says (HAProxy's admin socket): its metatiles go to the
	// others; back to ready, they return to it.
	h.command("set server renderers/r1 state drain")
	h.waitStates(map[string]string{"r1": "DRAIN"})
	before = snapshot()
	if failed := postAll(t, h.front, tiles[:600]); len(failed) > 0 {
		t.Fatalf("with r1 drained, %d of 600 requests failed, e.g. %v", len(failed), firstOf(failed))
	}
	for k, r := range renders(before) {
		if len(r) != 1 || r[0] == 0 || (owner[k] != 0 && r[0] != owner[k]) {
			t.Errorf("with r1 drained, metatile %s (owner %s) rendered by %v", k, daemons[owner[k]].name, r)
		}
	}
	h.command("set server renderers/r1 state ready")
	h.waitStates(map[string]string{"r1": "UP"})
	before = snapshot()
	if failed := postAll(t, h.front, tiles[:600]); len(failed) > 0 {
		t.Fatalf("after the drain, %d of 600 requests failed, e.g. %v", len(failed), firstOf(failed))
	}
	for k, r := range renders(before) {
		if len(r) != 1 || r[0] != owner[k] {
			t.Errorf("after the drain, metatile %s rendered by %v, want its owner %s", k, r, daemons[owner[k]].name)
		}
	}

	// 6. The CLI through HAProxy: a tile request without an id gets MapProxy's, so it goes
	// to the metatile's owner; one HAProxy cannot place is refused with its JSON error.
	cli := func(args ...string) (string, error) {
		var out strings.Builder
		err := run(t.Context(), append([]string{"request"}, args...), &out, io.Discard)
		return out.String(), err
	}
	for _, m := range tiles[:30] {
		before = snapshot()
		line := fmt.Sprintf(`{"command":"tile","cache_identifier":%q,"tiles":[[%d,%d,12]]}`, cacheID, m.x, m.y)
		if out, err := cli("--http", "http://"+h.front+"/", line); err != nil || !strings.Contains(out, `"status":"ok"`) {
			t.Fatalf("request --http through HAProxy: got %q, %v", out, err)
		}
		if r := renders(before)[m.key()]; len(r) != 1 || r[0] != owner[m.key()] {
			t.Errorf("request --http for %s: rendered by %v, want its owner %s", m.key(), r, daemons[owner[m.key()]].name)
		}
	}
	out, err := cli("--http", "http://"+h.front, `{"command":"ping"}`)
	if err == nil || !strings.Contains(out, "no id in the request body") {
		t.Errorf("ping through HAProxy: got %q, %v; want HAProxy's error and exit status 1", out, err)
	}
	var st strings.Builder
	if err := run(t.Context(), []string{"status", "--http", "http://" + daemons[0].addr}, &st, io.Discard); err != nil || !strings.Contains(st.String(), `"renderers"`) {
		t.Errorf("status --http URL of a daemon: got %q, %v; want the status document", st.String(), err)
	}
	// host:port is still the native protocol, straight to one daemon.
	if out, err := cli("--http", daemons[0].addr, `{"command":"health","id":"h"}`); err != nil || !strings.Contains(out, `"status":"ok"`) {
		t.Errorf("request --http host:port (native): got %q, %v", out, err)
	}
}

func firstOf(m map[string]string) string {
	for k, v := range m {
		return k + ": " + v
	}
	return ""
}

// TestClusterMapProxyOneMetatile: three real MapProxy front ends (each with its own lock
// directories, as on separate hosts, and one shared tile cache) post through HAProxy to
// three daemons running the bundled MapProxy renderer. 1,000 requests for the tiles of
// one metatile, spread over the three front ends, make exactly one render cluster-wide.
func TestClusterMapProxyOneMetatile(t *testing.T) {
	requireMapProxy(t)
	requireHAProxy(t)
	repo, _ := os.Getwd()
	dir := shortTempDir(t)
	rig := &mapproxyRig{t: t, dir: dir}
	upstream := rig.serveWSGI(filepath.Join(repo, "examples/upstream.yaml"), nil)

	// config writes a MapProxy configuration whose cache is shared and whose locks are local.
	config := func(name, renderd string) string {
		conf := rig.readYAML(filepath.Join(repo, "examples/mapproxy.yaml"))
		conf["sources"].(map[string]any)["upstream_wms"].(map[string]any)["req"].(map[string]any)["url"] = upstream + "service"
		conf["globals"].(map[string]any)["cache"] = map[string]any{
			"base_dir":      dir + "/cache_data", // the shared file system
			"lock_dir":      dir + "/" + name + "/locks",
			"tile_lock_dir": dir + "/" + name + "/tile_locks",
		}
		conf["globals"].(map[string]any)["renderd"] = map[string]any{"address": renderd}
		rig.writeYAML(name+".yaml", conf)
		return filepath.Join(dir, name+".yaml")
	}
	var daemons []*clusterDaemon
	for n := 1; n <= 3; n++ {
		mp := config(fmt.Sprintf("render-%d", n), "http://127.0.0.1:1")
		daemons = append(daemons, newClusterDaemon(t, dir, n, nil, "renderers: 2\n", "-f", mp))
	}
	h := startClusterHAProxy(t, dir, "", []string{daemons[0].addr, daemons[1].addr, daemons[2].addr})
	h.waitStates(map[string]string{"r1": "UP", "r2": "UP", "r3": "UP"})
	var fronts []string
	for n := 1; n <= 3; n++ {
		mp := config(fmt.Sprintf("front-%d", n), "http://"+h.front)
		fronts = append(fronts, rig.serveWSGI(filepath.Join(repo, "examples/mapproxy_wsgi.py"), []string{"MAPPROXY_CONFIG=" + mp}))
	}

	const wms = "wms_cache_GLOBAL_WEBMERCATOR"
	const requests = 1000
	work := make(chan int)
	var mu sync.Mutex
	codes := map[int]int{}
	var wg sync.WaitGroup
	start := time.Now()
	for w := 0; w < 60; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			client := &http.Client{Timeout: 2 * time.Minute}
			for i := range work {
				// The 16 tiles of the 4x4 metatile at z 7 whose top-left tile is (32, 20).
				u := fmt.Sprintf("%swmts/wmsl/GLOBAL_WEBMERCATOR/7/%d/%d.png", fronts[i%3], 32+i%4, 20+(i/4)%4)
				code := 0
				if resp, err := client.Get(u); err == nil {
					b, _ := io.ReadAll(resp.Body)
					resp.Body.Close()
					code = resp.StatusCode
					if code == 200 && !isPNG(b) {
						code = -1
					}
				}
				mu.Lock()
				codes[code]++
				mu.Unlock()
			}
		}()
	}
	for i := 0; i < requests; i++ {
		work <- i
	}
	close(work)
	wg.Wait()
	took := time.Since(start)
	if codes[200] != requests {
		t.Errorf("responses: got %v (status → count; -1 = not a PNG), want %d × 200", codes, requests)
	}
	var rendered, posted, merged uint64
	var by []string
	for _, d := range daemons {
		s := d.status()
		rendered += s.Caches[wms]["rendered"]
		posted += s.Counters["requested"]
		merged += s.Counters["merged"]
		by = append(by, fmt.Sprintf("%s: %d rendered of %d posted", d.name, s.Caches[wms]["rendered"], s.Counters["requested"]))
	}
	if rendered != 1 {
		t.Errorf("renders cluster-wide: got %d (%s), want exactly 1", rendered, strings.Join(by, ", "))
	}
	if files := rig.pngFiles("wms_cache_EPSG3857/07"); len(files) != 16 {
		t.Errorf("tiles in the shared cache: got %d, want the metatile's 16", len(files))
	}
	t.Logf("%d requests for one metatile over 3 MapProxy front ends in %v: %d POSTs reached the daemons (%d merged), %d render; %s",
		requests, took.Round(time.Millisecond), posted, merged, rendered, strings.Join(by, ", "))
}

// nativeCall sends one native-protocol request to addr (TCP) and returns the reply.
func nativeCall(t *testing.T, addr, line string) Reply {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, lcDeadline)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	cl := &client{t: t, c: c, r: bufio.NewReader(c)}
	cl.send(line)
	return cl.read()
}

// TestClusterSeedTask: a seed task started on one daemon with cluster: (HAProxy's address)
// sends each metatile through HAProxy with MapProxy's id, so every metatile is rendered
// exactly once in the whole cluster, by its owner, and the task counts them all done.
func TestClusterSeedTask(t *testing.T) {
	requireHAProxy(t)
	dir := shortTempDir(t)
	exe := lcExecutable(t)
	front := freeTCPAddr(t)
	seedConfig := filepath.Join(dir, "seed.yaml")
	if err := os.WriteFile(seedConfig, []byte("seeds:\n  all: {caches: [c]}\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	const n = 900
	planner, _ := json.Marshal([]string{exe, "fake-planner", "-n", strconv.Itoa(n), "-cache", cacheID})
	var daemons []*clusterDaemon
	for i := 1; i <= 3; i++ {
		extra := "renderers: 4\n"
		if i == 1 {
			extra += fmt.Sprintf("seed_config: %s\nplanner_command: %s\ncluster: http://%s/\n", seedConfig, planner, front)
		}
		daemons = append(daemons, newClusterDaemon(t, dir, i, []string{exe, "fake-renderer", "-delay", "1ms"}, extra))
	}
	h := startClusterHAProxy(t, dir, front, []string{daemons[0].addr, daemons[1].addr, daemons[2].addr})
	h.waitStates(map[string]string{"r1": "UP", "r2": "UP", "r3": "UP"})

	rep := nativeCall(t, daemons[0].addr, `{"command":"seed","id":"s","task":"all"}`)
	if rep.Status != statusQueued {
		t.Fatalf("seed: got %+v", rep)
	}
	id := taskOf(t, rep).TaskID
	var doc taskDoc
	deadline := time.Now().Add(2 * lcDeadline)
	for {
		doc = taskOf(t, nativeCall(t, daemons[0].addr, `{"command":"task","task_id":"`+id+`"}`))
		if doc.finished() {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the task did not end; it is %+v", doc)
		}
		time.Sleep(20 * time.Millisecond) // polling the task, bounded by the deadline
	}
	if doc.State != taskStateDone || doc.Planned != n || doc.Done != n || doc.Failed != 0 {
		t.Fatalf("task: got %+v, want done with %d planned and done", doc, n)
	}
	seen := map[string][]string{}
	for _, d := range daemons {
		for k, c := range d.jobs() {
			for ; c > 0; c-- {
				seen[k] = append(seen[k], d.name)
			}
		}
	}
	if len(seen) != n {
		t.Errorf("distinct metatiles rendered: got %d, want %d", len(seen), n)
	}
	per := map[string]int{}
	for k, by := range seen {
		if len(by) != 1 {
			t.Errorf("metatile %s rendered by %v, want exactly once", k, by)
			continue
		}
		per[by[0]]++
	}
	for _, d := range daemons {
		if per[d.name] < n/5 {
			t.Errorf("%s rendered %d of %d metatiles; the task's work is not split (%v)", d.name, per[d.name], n, per)
		}
	}
	// The metatiles went through HAProxy as MapProxy's requests: every daemon counted them as
	// requests at the task's priority, including the one that runs the task.
	for _, d := range daemons {
		if got := d.status().Counters["requested"]; got != uint64(per[d.name]) {
			t.Errorf("%s: %d requests, want %d (its share)", d.name, got, per[d.name])
		}
	}
	t.Logf("seed task of %d metatiles on %s through HAProxy: rendered per daemon %v", n, daemons[0].name, per)
}

func TestClusterConfigValidation(t *testing.T) {
	for _, tc := range []struct {
		yaml string
		ok   bool
	}{
		{"cluster: http://127.0.0.1:8111/", true},
		{"cluster: http://haproxy.local:8111", true},
		{"cluster: 127.0.0.1:8111", false},
		{"cluster: https://haproxy.local/", true},
		{"cluster: ftp://127.0.0.1:8111/", false},
		{"cluster: http://", false},
		{"cluster: http://u:p@127.0.0.1:8111/", false},
	} {
		c := defaultConfig()
		c.RendererCommand = []string{"/bin/true"}
		err := parseConfig(&c, strings.NewReader(tc.yaml))
		if err == nil {
			err = c.Validate()
		}
		if tc.ok && err != nil {
			t.Errorf("%s: got %v, want it accepted", tc.yaml, err)
		}
		if !tc.ok && (err == nil || !strings.HasPrefix(err.Error(), "cluster: ")) {
			t.Errorf("%s: got %v, want an error naming cluster", tc.yaml, err)
		}
	}
}

// TestClusterSeedTaskCancel: a task that sends its metatiles through HAProxy has at most
// clusterInFlight of them in flight, stops sending when it is cancelled, and aborts those
// on its side. HAProxy 2.6 does not pass the hang-up on, so the daemons finish them, and
// nothing beyond them. The renderers wait at a gate, so nothing is answered before the end.
func TestClusterSeedTaskCancel(t *testing.T) {
	requireHAProxy(t)
	dir := shortTempDir(t)
	exe := lcExecutable(t)
	front := freeTCPAddr(t)
	gate := lcFIFO(t, dir+"/gate")
	seedConfig := filepath.Join(dir, "seed.yaml")
	if err := os.WriteFile(seedConfig, []byte("seeds:\n  all: {caches: [c]}\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	const n = 1000
	planner, _ := json.Marshal([]string{exe, "fake-planner", "-n", strconv.Itoa(n), "-cache", cacheID})
	var daemons []*clusterDaemon
	for i := 1; i <= 3; i++ {
		extra := "renderers: 2\n"
		if i == 1 {
			extra += fmt.Sprintf("seed_config: %s\nplanner_command: %s\ncluster: http://%s/\n", seedConfig, planner, front)
		}
		daemons = append(daemons, newClusterDaemon(t, dir, i, []string{exe, "fake-renderer", "-gate", dir + "/gate"}, extra))
	}
	h := startClusterHAProxy(t, dir, front, []string{daemons[0].addr, daemons[1].addr, daemons[2].addr})
	h.waitStates(map[string]string{"r1": "UP", "r2": "UP", "r3": "UP"})
	counts := func() (requested, rendered, busy uint64) {
		for _, d := range daemons {
			s := d.status()
			requested += s.Counters["requested"]
			rendered += s.Counters["rendered"]
			busy += uint64(s.Queue.Length + s.Queue.Running)
		}
		return
	}
	waitCounts := func(what string, cond func(requested, rendered, busy uint64) bool) {
		t.Helper()
		deadline := time.Now().Add(lcDeadline)
		for {
			r, d, b := counts()
			if cond(r, d, b) {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("timed out waiting for %s: %d requested, %d rendered, %d queued or running", what, r, d, b)
			}
			time.Sleep(20 * time.Millisecond) // polling the daemons, bounded by the deadline
		}
	}

	rep := nativeCall(t, daemons[0].addr, `{"command":"seed","id":"s","task":"all"}`)
	if rep.Status != statusQueued {
		t.Fatalf("seed: got %+v", rep)
	}
	id := taskOf(t, rep).TaskID
	waitCounts("the task's requests in flight", func(r, _, _ uint64) bool { return r >= clusterInFlight })
	rep = nativeCall(t, daemons[0].addr, `{"command":"cancel","task_id":"`+id+`"}`)
	if d := taskOf(t, rep); d.State != taskStateCancelled || d.Done != 0 {
		t.Fatalf("cancel: got %+v, want cancelled with nothing done", d)
	}
	if _, err := gate.Write(make([]byte, 2*clusterInFlight)); err != nil {
		t.Fatal(err)
	}
	waitCounts("the daemons to finish", func(_, _, b uint64) bool { return b == 0 })
	if r, d, _ := counts(); r != clusterInFlight || d != clusterInFlight {
		t.Errorf("after the cancel: %d requests reached the daemons and %d were rendered, want the %d in flight and no more", r, d, clusterInFlight)
	}
}
