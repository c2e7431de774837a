// SPDX-License-Identifier: Apache-2.0

package main

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// pcAcceptOne accepts one connection on l with a deadline.
func pcAcceptOne(t *testing.T, l net.Listener) net.Conn {
	t.Helper()
	l.(interface{ SetDeadline(time.Time) error }).SetDeadline(time.Now().Add(30 * time.Second))
	c, err := l.Accept()
	if err != nil {
		t.Fatalf("accept on %s: %v", l.Addr(), err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func pcDial(t *testing.T, network, addr string) net.Conn {
	t.Helper()
	c, err := net.DialTimeout(network, addr, 10*time.Second)
	if err != nil {
		t.Fatalf("dial %s %s: %v", network, addr, err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func TestPeerCredUnix(t *testing.T) {
	self := peerCred{UID: os.Getuid(), GID: os.Getgid(), PID: os.Getpid()}

	t.Run("listener", func(t *testing.T) {
		l, err := net.Listen("unix", filepath.Join(t.TempDir(), "p.sock"))
		if err != nil {
			t.Fatal(err)
		}
		defer l.Close()
		client := pcDial(t, "unix", l.Addr().String())
		server := pcAcceptOne(t, l)
		for name, c := range map[string]net.Conn{"server side": server, "client side": client} {
			got, err := peerCredentials(c)
			if err != nil || got != self {
				t.Errorf("%s: peerCredentials() = %+v, %v, want %+v", name, got, err, self)
			}
		}
	})

	t.Run("socketpair", func(t *testing.T) {
		fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			t.Fatal(err)
		}
		for _, fd := range fds {
			f := os.NewFile(uintptr(fd), "socketpair")
			c, err := net.FileConn(f)
			f.Close()
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			got, err := peerCredentials(c)
			if err != nil || got != self {
				t.Errorf("peerCredentials() = %+v, %v, want %+v", got, err, self)
			}
		}
	})
}

// pcDialMappedV6 connects an AF_INET6 socket (not v6-only) to the IPv4 address
// ap through its IPv4-mapped form, as a dual-stack client does; its row is in
// /proc/net/tcp6. net.Dial cannot do this: it makes "tcp6" sockets v6-only.
func pcDialMappedV6(t *testing.T, ap netip.AddrPort) net.Conn {
	t.Helper()
	fd, err := unix.Socket(unix.AF_INET6, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Skipf("no IPv6 sockets: %v", err)
	}
	f := os.NewFile(uintptr(fd), "v6client")
	defer f.Close()
	if err := unix.SetsockoptInt(fd, unix.IPPROTO_IPV6, unix.IPV6_V6ONLY, 0); err != nil {
		t.Fatal(err)
	}
	if err := unix.Connect(fd, &unix.SockaddrInet6{Addr: netip.AddrFrom16(ap.Addr().As16()).As16(), Port: int(ap.Port())}); err != nil {
		t.Fatalf("connect to mapped %s: %v", ap, err)
	}
	c, err := net.FileConn(f)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func TestPeerCredTCPLoopback(t *testing.T) {
	want := peerCred{UID: os.Getuid(), GID: -1, PID: -1}
	tests := []struct {
		name              string
		listenNet, listen string
		dialNet, dialHost string // dialNet "mapped6": pcDialMappedV6
		clientHalfCloses  bool
	}{
		{name: "ipv4", listenNet: "tcp4", listen: "127.0.0.1:0", dialNet: "tcp4", dialHost: "127.0.0.1"},
		{name: "ipv4 other loopback address", listenNet: "tcp4", listen: "127.0.0.2:0", dialNet: "tcp4", dialHost: "127.0.0.2"},
		{name: "ipv6", listenNet: "tcp6", listen: "[::1]:0", dialNet: "tcp6", dialHost: "::1"},
		{name: "dual-stack listener, ipv4 client", listenNet: "tcp", listen: "[::]:0", dialNet: "tcp4", dialHost: "127.0.0.1"},
		{name: "ipv4 listener, dual-stack client", listenNet: "tcp4", listen: "127.0.0.1:0", dialNet: "mapped6", dialHost: "127.0.0.1"},
		{name: "client half-closed", listenNet: "tcp4", listen: "127.0.0.1:0", dialNet: "tcp4", dialHost: "127.0.0.1", clientHalfCloses: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			l, err := net.Listen(tt.listenNet, tt.listen)
			if err != nil {
				t.Skipf("listen %s %s: %v", tt.listenNet, tt.listen, err)
			}
			defer l.Close()
			port := l.Addr().(*net.TCPAddr).Port
			var client net.Conn
			if tt.dialNet == "mapped6" {
				client = pcDialMappedV6(t, netip.AddrPortFrom(netip.MustParseAddr(tt.dialHost), uint16(port)))
			} else {
				client = pcDial(t, tt.dialNet, net.JoinHostPort(tt.dialHost, fmt.Sprint(port)))
			}
			server := pcAcceptOne(t, l)
			if tt.clientHalfCloses {
				// As socat does at the end of its input: FIN sent; once the
				// server has read EOF the client socket is in FIN_WAIT2.
				if err := client.(*net.TCPConn).CloseWrite(); err != nil {
					t.Fatal(err)
				}
				server.SetReadDeadline(time.Now().Add(10 * time.Second))
				if n, err := server.Read(make([]byte, 1)); err != io.EOF {
					t.Fatalf("server read = %d, %v, want EOF", n, err)
				}
			}
			got, err := peerCredentials(server)
			if err != nil || got != want {
				t.Errorf("server side: peerCredentials() = %+v, %v, want %+v", got, err, want)
			}
			if tt.clientHalfCloses {
				return // the server's socket is in CLOSE_WAIT, not a client's state
			}
			// And the other way round: the server's socket is ours too.
			got, err = peerCredentials(client)
			if err != nil || got != want {
				t.Errorf("client side: peerCredentials() = %+v, %v, want %+v", got, err, want)
			}
		})
	}
}

func TestPeerCredUnsupported(t *testing.T) {
	a, b := net.Pipe()
	defer a.Close()
	defer b.Close()
	if got, err := peerCredentials(a); err == nil {
		t.Errorf("net.Pipe: peerCredentials() = %+v, nil, want an error", got)
	}

	u, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer u.Close()
	if got, err := peerCredentials(u); err == nil {
		t.Errorf("udp: peerCredentials() = %+v, nil, want an error", got)
	}

	t.Run("non-loopback tcp", func(t *testing.T) {
		var ip net.IP
		addrs, _ := net.InterfaceAddrs()
		for _, a := range addrs {
			if n, ok := a.(*net.IPNet); ok && n.IP.To4() != nil && !n.IP.IsLoopback() && !n.IP.IsLinkLocalUnicast() {
				ip = n.IP
				break
			}
		}
		if ip == nil {
			t.Skip("no non-loopback IPv4 address on this host")
		}
		l, err := net.Listen("tcp4", net.JoinHostPort(ip.String(), "0"))
		if err != nil {
			t.Skipf("listen on %s: %v", ip, err)
		}
		defer l.Close()
		pcDial(t, "tcp4", l.Addr().String())
		server := pcAcceptOne(t, l)
		got, err := peerCredentials(server)
		if err == nil || !strings.Contains(err.Error(), "not a loopback") {
			t.Errorf("peerCredentials() = %+v, %v, want a not-loopback error", got, err)
		}
	})
}

// pcFormatProcAddrPort writes ap as the kernel does in /proc/net/tcp{,6}: each
// 32-bit word of the address read in host byte order, printed %08X.
func pcFormatProcAddrPort(ap netip.AddrPort) string {
	raw := ap.Addr().AsSlice()
	var sb strings.Builder
	for w := 0; w < len(raw); w += 4 {
		fmt.Fprintf(&sb, "%08X", binary.NativeEndian.Uint32(raw[w:]))
	}
	fmt.Fprintf(&sb, ":%04X", ap.Port())
	return sb.String()
}

func pcProcRow(local, remote netip.AddrPort, st string, uid int) string {
	return fmt.Sprintf("   7: %s %s %s 00000000:00000000 00:00000000 00000000 %5d        0 4242 1 0000000000000000 20 4 30 10 -1",
		pcFormatProcAddrPort(local), pcFormatProcAddrPort(remote), st, uid)
}

const pcProcHeader = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode"

func TestPeerCredParseProcAddr(t *testing.T) {
	if binary.NativeEndian.Uint16([]byte{1, 0}) != 1 {
		t.Skip("literal rows below are from a little-endian kernel")
	}
	tests := []struct {
		in      string
		want    string
		wantErr bool
	}{
		{in: "0100007F:1F90", want: "127.0.0.1:8080"},
		{in: "0101007F:0050", want: "127.0.1.1:80"},
		{in: "00000000000000000000000001000000:1F90", want: "[::1]:8080"},
		{in: "0000000000000000FFFF00000100007F:A3C2", want: "[::ffff:127.0.0.1]:41922"},
		{in: "B80D0120000000000000000001000000:0016", want: "[2001:db8::1]:22"},
		{in: "0100007F", wantErr: true},
		{in: "0100007:1F90", wantErr: true},
		{in: "0100007G:1F90", wantErr: true},
		{in: "0100007F:1F9000", wantErr: true},
		{in: "0100007F:", wantErr: true},
		{in: "", wantErr: true},
	}
	for _, tt := range tests {
		got, err := parseProcAddrPort([]byte(tt.in))
		if tt.wantErr {
			if err == nil {
				t.Errorf("parseProcAddrPort(%q) = %v, nil, want an error", tt.in, got)
			}
			continue
		}
		if err != nil || got.String() != tt.want {
			t.Errorf("parseProcAddrPort(%q) = %v, %v, want %s", tt.in, got, err, tt.want)
		}
	}
}

func TestPeerCredScanTable(t *testing.T) {
	cli := netip.MustParseAddrPort("127.0.0.1:41922")
	srv := netip.MustParseAddrPort("127.0.0.1:8111")
	other := netip.MustParseAddrPort("127.0.0.1:41923")
	cli6 := netip.MustParseAddrPort("[::1]:41922")
	srv6 := netip.MustParseAddrPort("[::1]:8111")
	tests := []struct {
		name      string
		rows      []string
		cli, srv  netip.AddrPort
		wantUID   int
		wantFound bool
		wantErr   bool
	}{
		{name: "client row", rows: []string{pcProcRow(srv, cli, "01", 0), pcProcRow(cli, srv, "01", 1000)}, cli: cli, srv: srv, wantUID: 1000, wantFound: true},
		{name: "only the server's row", rows: []string{pcProcRow(srv, cli, "01", 0)}, cli: cli, srv: srv},
		{name: "other port", rows: []string{pcProcRow(other, srv, "01", 1000)}, cli: cli, srv: srv},
		{name: "listening row", rows: []string{pcProcRow(srv, netip.MustParseAddrPort("0.0.0.0:0"), "0A", 0)}, cli: cli, srv: srv},
		{name: "time wait is nobody's", rows: []string{pcProcRow(cli, srv, "06", 0)}, cli: cli, srv: srv},
		{name: "fin wait 1", rows: []string{pcProcRow(cli, srv, "04", 33)}, cli: cli, srv: srv, wantUID: 33, wantFound: true},
		{name: "fin wait 2", rows: []string{pcProcRow(cli, srv, "05", 33)}, cli: cli, srv: srv, wantUID: 33, wantFound: true},
		{name: "ipv6", rows: []string{pcProcRow(cli6, srv6, "01", 65534)}, cli: cli6, srv: srv6, wantUID: 65534, wantFound: true},
		{name: "empty table", cli: cli, srv: srv},
		{name: "blank line", rows: []string{"", pcProcRow(cli, srv, "01", 7)}, cli: cli, srv: srv, wantUID: 7, wantFound: true},
		{name: "short row", rows: []string{"   0: 0100007F:1F90 0100007F:A3C2 01"}, cli: cli, srv: srv, wantErr: true},
		{name: "bad address", rows: []string{"   0: 0100007X:1F90 0100007F:A3C2 01 0:0 0:0 0 1000 0 1"}, cli: cli, srv: srv, wantErr: true},
		{name: "bad uid", rows: []string{strings.Replace(pcProcRow(cli, srv, "01", 1000), " 1000 ", " -1 ", 1)}, cli: cli, srv: srv, wantErr: true},
		{name: "overlong row", rows: []string{pcProcRow(cli, srv, "01", 1000) + strings.Repeat(" x", 4096)}, cli: cli, srv: srv, wantErr: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			in := pcProcHeader + "\n" + strings.Join(tt.rows, "\n") + "\n"
			uid, found, err := scanTCPTable(strings.NewReader(in), tt.cli, tt.srv)
			if tt.wantErr {
				if err == nil {
					t.Errorf("scanTCPTable = %d, %v, nil, want an error", uid, found)
				}
				return
			}
			if err != nil || found != tt.wantFound || uid != tt.wantUID {
				t.Errorf("scanTCPTable = %d, %v, %v, want %d, %v, nil", uid, found, err, tt.wantUID, tt.wantFound)
			}
		})
	}
}

func TestPeerCredOwnerLookupTables(t *testing.T) {
	dir := t.TempDir()
	v4, v6 := filepath.Join(dir, "tcp"), filepath.Join(dir, "tcp6")
	saved := procNetTCP
	t.Cleanup(func() { procNetTCP = saved })
	procNetTCP.v4, procNetTCP.v6 = v4, v6

	cli := netip.MustParseAddrPort("127.0.0.1:41922")
	srv := netip.MustParseAddrPort("127.0.0.1:8111")
	write := func(path string, rows ...string) {
		t.Helper()
		if err := os.WriteFile(path, []byte(pcProcHeader+"\n"+strings.Join(rows, "\n")+"\n"), 0o644); err != nil {
			t.Fatal(err)
		}
	}

	// An IPv4 client found through its IPv4-mapped row in tcp6.
	write(v4, pcProcRow(srv, cli, "01", 0))
	write(v6, pcProcRow(ipv4Mapped(cli), ipv4Mapped(srv), "01", 4321))
	if uid, err := loopbackTCPOwner(cli, srv); err != nil || uid != 4321 {
		t.Errorf("mapped row: loopbackTCPOwner = %d, %v, want 4321", uid, err)
	}
	// No tcp6 at all (IPv6 disabled) is no match, not an error.
	os.Remove(v6)
	write(v4, pcProcRow(cli, srv, "01", 1234))
	if uid, err := loopbackTCPOwner(cli, srv); err != nil || uid != 1234 {
		t.Errorf("without tcp6: loopbackTCPOwner = %d, %v, want 1234", uid, err)
	}
	write(v4)
	if uid, err := loopbackTCPOwner(cli, srv); err == nil {
		t.Errorf("no row: loopbackTCPOwner = %d, nil, want an error", uid)
	}
	if uid, err := loopbackTCPOwner(netip.MustParseAddrPort("10.0.0.1:41922"), srv); err == nil {
		t.Errorf("non-loopback client: loopbackTCPOwner = %d, nil, want an error", uid)
	}
}

func FuzzPeerCredScanTable(f *testing.F) {
	cli := netip.MustParseAddrPort("127.0.0.1:41922")
	srv := netip.MustParseAddrPort("127.0.0.1:8111")
	f.Add(pcProcHeader + "\n" + pcProcRow(cli, srv, "01", 1000) + "\n")
	f.Add(pcProcHeader + "\n" + pcProcRow(ipv4Mapped(cli), ipv4Mapped(srv), "01", 1000) + "\n")
	f.Add("x\n   0: 0100007F:1F90 0100007F:A3C2 01 0:0 0:0 0 1000 0 1\n")
	f.Fuzz(func(t *testing.T, in string) {
		for _, c := range [][2]netip.AddrPort{{cli, srv}, {ipv4Mapped(cli), ipv4Mapped(srv)}} {
			uid, found, err := scanTCPTable(strings.NewReader(in), c[0], c[1])
			if err != nil && found {
				t.Errorf("found with an error: %d, %v", uid, err)
			}
			if found && uid < 0 {
				t.Errorf("uid %d out of range", uid)
			}
		}
	})
}

// Helper child for TestPeerCredOtherUID: connect to the address in
// peerCredHelperEnv ("network address") and hold the connection until stdin ends.
const peerCredHelperEnv = "MAPPROXY_RENDERD_TEST_PEERCRED_HELPER"

// TestPeerCredHelperProcess is not a test: it is the client that
// TestPeerCredOtherUID runs as another user, and does nothing unless
// peerCredHelperEnv is set.
func TestPeerCredHelperProcess(t *testing.T) {
	spec := os.Getenv(peerCredHelperEnv)
	if spec == "" {
		return
	}
	network, addr, _ := strings.Cut(spec, " ")
	c, err := net.DialTimeout(network, addr, 10*time.Second)
	if err != nil {
		t.Fatalf("dial %s %s: %v", network, addr, err)
	}
	defer c.Close()
	io.Copy(io.Discard, os.Stdin) // hold until the parent closes stdin
}

func TestPeerCredOtherUID(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("needs root to run a client as uid 65534")
	}
	const nobody = 65534

	// The test binary must be reachable for uid 65534, which go test's build
	// directory (0700) is not: copy it to a world-readable directory.
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	dir, err := os.MkdirTemp("", "peercred")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(dir, "helper.test")
	src, err := os.ReadFile(exe)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(bin, src, 0o755); err != nil {
		t.Fatal(err)
	}

	type listener struct {
		name, network, addr string
		l                   net.Listener
	}
	var listeners []listener
	ul, err := net.Listen("unix", filepath.Join(dir, "p.sock"))
	if err != nil {
		t.Fatal(err)
	}
	defer ul.Close()
	if err := os.Chmod(ul.Addr().String(), 0o777); err != nil {
		t.Fatal(err)
	}
	listeners = append(listeners, listener{"unix", "unix", ul.Addr().String(), ul})
	tl, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer tl.Close()
	listeners = append(listeners, listener{"tcp4", "tcp4", tl.Addr().String(), tl})
	if tl6, err := net.Listen("tcp6", "[::1]:0"); err == nil {
		defer tl6.Close()
		listeners = append(listeners, listener{"tcp6", "tcp6", tl6.Addr().String(), tl6})
	}

	for _, ln := range listeners {
		t.Run(ln.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
			defer cancel()
			cmd := exec.CommandContext(ctx, bin, "-test.run=^TestPeerCredHelperProcess$", "-test.count=1")
			cmd.Dir = dir
			cmd.Env = append(os.Environ(), peerCredHelperEnv+"="+ln.network+" "+ln.addr, sdHelperGORACE())
			cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: nobody, Gid: nobody}}
			cmd.WaitDelay = 5 * time.Second
			var out strings.Builder
			cmd.Stdout, cmd.Stderr = &out, &out
			stdin, err := cmd.StdinPipe()
			if err != nil {
				t.Fatal(err)
			}
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			defer func() {
				stdin.Close()
				if err := cmd.Wait(); err != nil {
					t.Errorf("helper: %v\n%s", err, out.String())
				}
			}()

			server := pcAcceptOne(t, ln.l)
			got, err := peerCredentials(server)
			want := peerCred{UID: nobody, GID: -1, PID: -1}
			if ln.network == "unix" {
				want = peerCred{UID: nobody, GID: nobody, PID: cmd.Process.Pid}
			}
			if err != nil || got != want {
				t.Fatalf("peerCredentials() = %+v, %v, want %+v", got, err, want)
			}

			// The policy decides on these credentials with the real databases.
			for _, c := range []struct {
				name       string
				uids, gids []int
				want       bool
			}{
				{"uid listed", []int{nobody}, nil, true},
				{"uid not listed", []int{12345}, nil, false},
				{"primary group listed", nil, []int{nobody}, true}, // nobody:x:65534:65534 in /etc/passwd
				{"group not listed", nil, []int{12345}, false},
			} {
				if got := newAccessPolicy(c.uids, c.gids).allows(got); got != c.want {
					t.Errorf("%s: allows(%+v) = %v, want %v", c.name, want, got, c.want)
				}
			}
		})
	}
}

func TestAccessPolicy(t *testing.T) {
	const self = 4000
	groups := map[int][]int{
		1000: {1000, 27, 500}, // primary 1000, member of 27 and 500
		1001: {1001},
	}
	groupsOf := func(uid int) ([]int, error) {
		g, ok := groups[uid]
		if !ok {
			return nil, errors.New("unknown user")
		}
		return g, nil
	}
	policy := func(uids, gids []int) accessPolicy {
		p := newAccessPolicy(uids, gids)
		p.selfUID = self
		p.groupsOf = groupsOf
		return p
	}
	tests := []struct {
		name        string
		p           accessPolicy
		peer        peerCred
		wantEnabled bool
		want        bool
	}{
		{"zero value allows anyone", accessPolicy{}, peerCred{UID: 1234, GID: 1234, PID: 1}, false, true},
		{"zero value allows an unknown uid", accessPolicy{}, peerCred{UID: -1, GID: -1, PID: -1}, false, true},
		{"empty lists allow anyone", policy(nil, []int{}), peerCred{UID: 1234, GID: -1, PID: -1}, false, true},
		{"uid listed", policy([]int{1000}, nil), peerCred{UID: 1000, GID: -1, PID: -1}, true, true},
		{"uid not listed", policy([]int{1000}, nil), peerCred{UID: 1001, GID: 1001, PID: 9}, true, false},
		{"root always", policy([]int{1000}, nil), peerCred{UID: 0, GID: -1, PID: -1}, true, true},
		{"self always", policy([]int{1000}, nil), peerCred{UID: self, GID: -1, PID: -1}, true, true},
		{"unknown uid refused", policy([]int{1000}, []int{27}), peerCred{UID: -1, GID: 27, PID: -1}, true, false},
		{"peer gid listed", policy(nil, []int{77}), peerCred{UID: 1001, GID: 77, PID: 9}, true, true},
		{"supplementary group listed", policy(nil, []int{500}), peerCred{UID: 1000, GID: -1, PID: -1}, true, true},
		{"primary group listed", policy(nil, []int{1000}), peerCred{UID: 1000, GID: -1, PID: -1}, true, true},
		{"no group listed", policy(nil, []int{500}), peerCred{UID: 1001, GID: 1001, PID: 9}, true, false},
		{"user without account", policy(nil, []int{500}), peerCred{UID: 2222, GID: -1, PID: -1}, true, false},
		{"user without account, gid known", policy(nil, []int{500}), peerCred{UID: 2222, GID: 500, PID: 9}, true, true},
		{"uid list only ignores groups", policy([]int{1}, nil), peerCred{UID: 1000, GID: 27, PID: 9}, true, false},
		{"both lists, neither matches", policy([]int{1}, []int{2}), peerCred{UID: 1000, GID: 1000, PID: 9}, true, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := tt.p.enabled(); got != tt.wantEnabled {
				t.Errorf("enabled() = %v, want %v", got, tt.wantEnabled)
			}
			if got := tt.p.allows(tt.peer); got != tt.want {
				t.Errorf("allows(%+v) = %v, want %v", tt.peer, got, tt.want)
			}
		})
	}

	t.Run("lists are copied", func(t *testing.T) {
		uids := []int{1000}
		p := policy(uids, nil)
		uids[0] = 1
		if !p.allows(peerCred{UID: 1000, GID: -1, PID: -1}) {
			t.Error("changing the caller's slice changed the policy")
		}
	})
}
