// SPDX-License-Identifier: Apache-2.0

package main

// Who is on the other end of a connection, and may they use the daemon (docs/design.md §8).

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/user"
	"slices"
	"strconv"

	"golang.org/x/sys/unix"
)

// peerCred identifies the process at the other end of a connection.
type peerCred struct{ UID, GID, PID int } // PID and GID are -1 when unknown (TCP gives only the uid)

// peerCredentials returns the peer of c: SO_PEERCRED for *net.UnixConn; for a *net.TCPConn whose
// both ends are loopback, the uid that owns the client's socket from sock_diag (peercred_diag.go),
// else from /proc/net/tcp or /proc/net/tcp6
// (the row whose local address is c.RemoteAddr() and remote address is c.LocalAddr(), state ESTABLISHED),
// as identd does. Anything else, or no matching row, is an error (the caller refuses the peer when an allow-list is set).
//
// Unix: the credentials are those the peer had when it called connect (or socketpair),
// as the kernel recorded them; a pid the kernel cannot map into our pid namespace is -1.
// TCP: besides ESTABLISHED, the client's row may be in FIN_WAIT1/FIN_WAIT2 — a client
// that half-closed after sending (socat does) still owns its socket. TIME_WAIT rows
// (uid 0, no owner) never match. A TCP lookup reads the kernel's socket table, which
// costs time on hosts with many connections: call it only when a policy is enabled.
func peerCredentials(c net.Conn) (peerCred, error) {
	switch c := c.(type) {
	case *net.UnixConn:
		return unixPeerCred(c)
	case *net.TCPConn:
		local, ok1 := c.LocalAddr().(*net.TCPAddr)
		remote, ok2 := c.RemoteAddr().(*net.TCPAddr)
		if !ok1 || !ok2 {
			return peerCred{}, errors.New("peer credentials: tcp connection without addresses")
		}
		uid, err := loopbackTCPOwner(tcpAddrPort(remote), tcpAddrPort(local))
		if err != nil {
			return peerCred{}, fmt.Errorf("peer credentials of %s: %w", remote, err)
		}
		return peerCred{UID: uid, GID: -1, PID: -1}, nil
	default:
		return peerCred{}, fmt.Errorf("peer credentials: unsupported connection type %T", c)
	}
}

func unixPeerCred(c *net.UnixConn) (peerCred, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return peerCred{}, fmt.Errorf("peer credentials: %w", err)
	}
	var ucred *unix.Ucred
	var serr error
	err = rc.Control(func(fd uintptr) {
		ucred, serr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	})
	if err == nil {
		err = serr
	}
	if err != nil {
		return peerCred{}, fmt.Errorf("peer credentials: SO_PEERCRED: %w", err)
	}
	pc := peerCred{UID: int(ucred.Uid), GID: int(ucred.Gid), PID: int(ucred.Pid)}
	if pc.PID == 0 {
		pc.PID = -1 // peer outside our pid namespace
	}
	return pc, nil
}

// tcpAddrPort converts a *net.TCPAddr to a netip.AddrPort with IPv4 (also
// IPv4-mapped IPv6) addresses in their 4-byte form and no zone.
func tcpAddrPort(a *net.TCPAddr) netip.AddrPort {
	ip, _ := netip.AddrFromSlice(a.IP)
	return netip.AddrPortFrom(ip.Unmap(), uint16(a.Port))
}

// procNetTCP names the kernel socket tables; tests may point them elsewhere.
var procNetTCP = realProcNetTCP

var realProcNetTCP = struct{ v4, v6 string }{"/proc/net/tcp", "/proc/net/tcp6"}

// maxProcNetBytes bounds how much of one socket table is read (~150 bytes a row:
// about 400,000 sockets). A busier host gets an error, not a stall.
const maxProcNetBytes = 64 << 20

// TCP states (include/net/tcp_states.h) in which the client's socket still has an owner.
const (
	tcpEstablished = 0x01
	tcpFinWait1    = 0x04
	tcpFinWait2    = 0x05
)

// loopbackTCPOwner returns the uid owning the socket whose local address is client
// and whose remote address is server, both on loopback.
func loopbackTCPOwner(client, server netip.AddrPort) (int, error) {
	if !client.Addr().IsLoopback() || !server.Addr().IsLoopback() {
		return 0, errors.New("not a loopback connection")
	}
	// One sock_diag query first (peercred_diag.go); the table scan below when netlink
	// cannot answer (or tests point the tables elsewhere). A socket sock_diag does not know
	// is gone, the client having hung up: no scan (~50 ms on a busy host) for it.
	uid, err := diagTCPOwner(client, server)
	if err == nil {
		return uid, nil
	}
	if errors.Is(err, errDiagNotFound) && client.Addr().Is4() {
		// Or a dual-stack client socket connected to an IPv4 address.
		if uid, err = diagTCPOwner(ipv4Mapped(client), ipv4Mapped(server)); err == nil {
			return uid, nil
		}
	}
	if errors.Is(err, errDiagNotFound) && procNetTCP == realProcNetTCP {
		return 0, errors.New("no owner found: the client's socket is gone")
	}
	// An IPv4 client socket is in tcp; an IPv6 socket connected to an IPv4
	// address (dual-stack) is in tcp6 under IPv4-mapped addresses.
	type table struct {
		path           string
		client, server netip.AddrPort
	}
	var tables []table
	if client.Addr().Is4() {
		tables = []table{
			{procNetTCP.v4, client, server},
			{procNetTCP.v6, ipv4Mapped(client), ipv4Mapped(server)},
		}
	} else {
		tables = []table{{procNetTCP.v6, client, server}}
	}
	for _, t := range tables {
		uid, found, err := findTCPOwner(t.path, t.client, t.server)
		if err != nil {
			return 0, err
		}
		if found {
			return uid, nil
		}
	}
	return 0, errors.New("no owner found in the kernel's socket table")
}

// ipv4Mapped returns ap with its IPv4 address in IPv4-mapped IPv6 form.
func ipv4Mapped(ap netip.AddrPort) netip.AddrPort {
	return netip.AddrPortFrom(netip.AddrFrom16(ap.Addr().As16()), ap.Port())
}

// findTCPOwner scans one /proc/net/tcp{,6} file for the row local=client,
// remote=server in an owned state. A missing file (no IPv6) is no match.
func findTCPOwner(path string, client, server netip.AddrPort) (uid int, found bool, err error) {
	f, err := os.Open(path)
	if errors.Is(err, os.ErrNotExist) {
		return 0, false, nil
	}
	if err != nil {
		return 0, false, err
	}
	defer f.Close()
	return scanTCPTable(io.LimitReader(f, maxProcNetBytes), client, server)
}

// scanTCPTable parses the format of /proc/net/tcp{,6}:
//
//	sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
//	 0: 0100007F:1F8F 0100007F:A3C2 01 00000000:00000000 00:00000000 00000000  1000        0 12345 ...
//
// Addresses are hex of the raw in*_addr read as 32-bit words in host byte order;
// ports are hex in host order. A malformed row is an error: guessing about the
// kernel's table is how a wrong uid would slip through.
func scanTCPTable(r io.Reader, client, server netip.AddrPort) (uid int, found bool, err error) {
	sc := bufio.NewScanner(r)
	// Rows are ~150 (tcp) or ~180 (tcp6) bytes; allow some slack, refuse more.
	sc.Buffer(make([]byte, 0, 4096), 4096)
	first := true
	for sc.Scan() {
		if first { // header
			first = false
			continue
		}
		fields := bytes.Fields(sc.Bytes())
		if len(fields) == 0 {
			continue
		}
		if len(fields) < 8 {
			return 0, false, fmt.Errorf("malformed socket table row %q", sc.Bytes())
		}
		local, err := parseProcAddrPort(fields[1])
		if err != nil {
			return 0, false, err
		}
		remote, err := parseProcAddrPort(fields[2])
		if err != nil {
			return 0, false, err
		}
		if local != client || remote != server {
			continue
		}
		st, err := strconv.ParseUint(string(fields[3]), 16, 8)
		if err != nil {
			return 0, false, fmt.Errorf("malformed socket state %q", fields[3])
		}
		if st != tcpEstablished && st != tcpFinWait1 && st != tcpFinWait2 {
			continue
		}
		u, err := strconv.ParseUint(string(fields[7]), 10, 32)
		if err != nil {
			return 0, false, fmt.Errorf("malformed socket uid %q", fields[7])
		}
		return int(u), true, nil
	}
	if err := sc.Err(); err != nil {
		return 0, false, fmt.Errorf("reading socket table: %w", err)
	}
	return 0, false, nil
}

// parseProcAddrPort parses "0100007F:1F8F" (IPv4) or
// "00000000000000000000000001000000:1F8F" (IPv6) from /proc/net/tcp{,6}.
func parseProcAddrPort(b []byte) (netip.AddrPort, error) {
	i := bytes.IndexByte(b, ':')
	if i < 0 || (i != 8 && i != 32) {
		return netip.AddrPort{}, fmt.Errorf("malformed socket address %q", b)
	}
	raw := make([]byte, i/2)
	if _, err := hex.Decode(raw, b[:i]); err != nil {
		return netip.AddrPort{}, fmt.Errorf("malformed socket address %q", b)
	}
	// The kernel printed each 32-bit word of the network-order address as a
	// host-order integer; undo that word by word.
	for w := 0; w < len(raw); w += 4 {
		binary.NativeEndian.PutUint32(raw[w:], binary.BigEndian.Uint32(raw[w:]))
	}
	port, err := strconv.ParseUint(string(b[i+1:]), 16, 16)
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("malformed socket port %q", b)
	}
	ip, _ := netip.AddrFromSlice(raw)
	return netip.AddrPortFrom(ip, uint16(port)), nil
}

// accessPolicy is the allow-list from the config (allowed_uids, allowed_gids). The zero value allows everyone.
type accessPolicy struct {
	uids, gids []int
	selfUID    int
	// groupsOf returns the gids of uid's primary group (/etc/passwd) and of the
	// groups listing it as a member (/etc/group). nil means the system's databases.
	groupsOf func(uid int) ([]int, error)
}

func newAccessPolicy(uids, gids []int) accessPolicy {
	return accessPolicy{
		uids:    slices.Clone(uids),
		gids:    slices.Clone(gids),
		selfUID: os.Getuid(),
	}
}

// enabled reports whether an allow-list is set (then peers whose uid cannot be established are refused).
func (p accessPolicy) enabled() bool {
	return len(p.uids) > 0 || len(p.gids) > 0
}

// allows reports whether the peer may use the daemon: uid in allowed_uids, or uid 0, or the daemon's own uid,
// or the peer's GID (when known) or any group the uid belongs to per /etc/group and the user's primary
// group per /etc/passwd (use os/user, which is pure Go here) is in allowed_gids.
//
// A negative UID (unknown) is refused when the policy is enabled. The group
// databases are read on every call that gets that far, so changes apply at once;
// a uid without an account has no groups.
func (p accessPolicy) allows(c peerCred) bool {
	if !p.enabled() {
		return true
	}
	if c.UID < 0 {
		return false
	}
	if c.UID == 0 || c.UID == p.selfUID || slices.Contains(p.uids, c.UID) {
		return true
	}
	if len(p.gids) == 0 {
		return false
	}
	if c.GID >= 0 && slices.Contains(p.gids, c.GID) {
		return true
	}
	groupsOf := p.groupsOf
	if groupsOf == nil {
		groupsOf = systemGroupsOf
	}
	groups, err := groupsOf(c.UID)
	if err != nil {
		return false
	}
	for _, g := range groups {
		if slices.Contains(p.gids, g) {
			return true
		}
	}
	return false
}

// systemGroupsOf looks uid up in the user and group databases.
func systemGroupsOf(uid int) ([]int, error) {
	u, err := user.LookupId(strconv.Itoa(uid))
	if err != nil {
		return nil, err
	}
	ids, err := u.GroupIds()
	if err != nil {
		return nil, err
	}
	gids := make([]int, 0, len(ids)+1)
	if g, err := strconv.Atoi(u.Gid); err == nil {
		gids = append(gids, g)
	}
	for _, s := range ids {
		if g, err := strconv.Atoi(s); err == nil {
			gids = append(gids, g)
		}
	}
	return gids, nil
}

// socketRule is who the Unix socket admits by its mode and group: root, the daemon's uid,
// members of its group (socket_group, else the daemon's group) when the mode lets the
// group in, everyone when it lets others in. Loopback TCP peers are held to it when no
// allow-list is set (docs/design.md §8): otherwise the TCP port would admit every local user that
// the socket's permissions keep out.
type socketRule struct {
	mode     os.FileMode
	uid, gid int // the daemon's uid; the socket's group (-1: none could be found)
	// groupsOf as in accessPolicy; nil means the system's databases.
	groupsOf func(uid int) ([]int, error)
}

func newSocketRule(cfg Config) socketRule {
	r := socketRule{mode: cfg.socketMode, uid: os.Getuid(), gid: os.Getgid()}
	if cfg.SocketGroup != "" {
		g, err := lookupGroup(cfg.SocketGroup)
		if err != nil {
			g = -1 // the socket cannot be bound either; nobody gets in by group
		}
		r.gid = g
	}
	return r
}

// allows reports whether the socket's rule admits the peer. An unknown uid is refused.
func (r socketRule) allows(c peerCred) bool {
	switch {
	case c.UID < 0:
		return false
	case c.UID == 0 || c.UID == r.uid || r.mode&0o002 != 0:
		return true
	case r.mode&0o020 == 0 || r.gid < 0:
		return false
	case c.GID >= 0 && c.GID == r.gid:
		return true
	}
	groupsOf := r.groupsOf
	if groupsOf == nil {
		groupsOf = systemGroupsOf
	}
	groups, err := groupsOf(c.UID)
	return err == nil && slices.Contains(groups, r.gid)
}
