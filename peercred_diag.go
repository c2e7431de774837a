// SPDX-License-Identifier: Apache-2.0

package main

// The owner of a loopback TCP client socket by one sock_diag query (NETLINK_SOCK_DIAG,
// an exact lookup by the 4-tuple): constant time, where reading /proc/net/tcp costs ~50 ms
// on a host with 3,000 sockets. Without an allow-list every loopback TCP connection is
// checked (docs/design.md §8), so HAProxy's 100 ms health checks must not wait for a table scan.

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"os"

	"golang.org/x/sys/unix"
)

// errDiagNotFound: the kernel has no such socket (the client is gone, or it is not in our
// network namespace).
var errDiagNotFound = errors.New("no such socket")

// diagTCPOwner asks the kernel for the socket whose local address is client and remote
// address is server; it returns its uid if it is in an owned state (ESTABLISHED,
// FIN_WAIT1/2: a TIME_WAIT socket reports uid 0 and has no owner).
func diagTCPOwner(client, server netip.AddrPort) (int, error) {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, unix.NETLINK_SOCK_DIAG)
	if err != nil {
		return 0, os.NewSyscallError("socket", err)
	}
	defer unix.Close(fd)
	tv := unix.Timeval{Sec: 1}
	_ = unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv)
	if err := unix.Bind(fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return 0, os.NewSyscallError("bind", err)
	}

	// nlmsghdr (16) + inet_diag_req_v2 (56).
	const hdrLen, reqLen = unix.SizeofNlMsghdr, 56
	msg := make([]byte, hdrLen+reqLen)
	ne := binary.NativeEndian
	ne.PutUint32(msg[0:], uint32(len(msg)))
	ne.PutUint16(msg[4:], unix.SOCK_DIAG_BY_FAMILY)
	ne.PutUint16(msg[6:], unix.NLM_F_REQUEST)
	ne.PutUint32(msg[8:], 1) // sequence
	req := msg[hdrLen:]
	family := byte(unix.AF_INET)
	if client.Addr().Is6() {
		family = unix.AF_INET6
	}
	req[0] = family
	req[1] = unix.IPPROTO_TCP
	ne.PutUint32(req[4:], 0xffffffff) // idiag_states: any (checked in the reply)
	id := req[8:]
	binary.BigEndian.PutUint16(id[0:], client.Port())
	binary.BigEndian.PutUint16(id[2:], server.Port())
	putDiagAddr(id[4:20], client.Addr())
	putDiagAddr(id[20:36], server.Addr())
	ne.PutUint32(id[36:], 0)          // idiag_if: any
	ne.PutUint32(id[40:], 0xffffffff) // idiag_cookie: INET_DIAG_NOCOOKIE
	ne.PutUint32(id[44:], 0xffffffff)

	if err := unix.Sendto(fd, msg, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return 0, os.NewSyscallError("sendto", err)
	}
	buf := make([]byte, 8192)
	n, _, err := unix.Recvfrom(fd, buf, 0)
	if err != nil {
		return 0, os.NewSyscallError("recvfrom", err)
	}
	if n < hdrLen || int(ne.Uint32(buf)) < hdrLen || int(ne.Uint32(buf)) > n {
		return 0, errors.New("sock_diag: malformed reply")
	}
	typ, data := ne.Uint16(buf[4:]), buf[hdrLen:ne.Uint32(buf)]
	switch typ {
	case unix.NLMSG_ERROR:
		if len(data) >= 4 {
			if e := -int32(ne.Uint32(data)); e != 0 {
				if unix.Errno(e) == unix.ENOENT {
					return 0, errDiagNotFound
				}
				return 0, fmt.Errorf("sock_diag: %w", unix.Errno(e))
			}
		}
		return 0, errors.New("sock_diag: empty error reply")
	case unix.SOCK_DIAG_BY_FAMILY:
	default:
		return 0, fmt.Errorf("sock_diag: unexpected reply type %d", typ)
	}
	// inet_diag_msg: family, state, timer, retrans (4), sockid (48), expires, rqueue,
	// wqueue (12), uid (4), inode (4).
	d := data
	if len(d) < 72 {
		return 0, errors.New("sock_diag: short reply")
	}
	if st := d[1]; st != tcpEstablished && st != tcpFinWait1 && st != tcpFinWait2 {
		return 0, errDiagNotFound
	}
	return int(ne.Uint32(d[64:])), nil
}

// putDiagAddr writes a in inet_diag_sockid's form: 4 bytes for IPv4, 16 for IPv6.
func putDiagAddr(dst []byte, a netip.Addr) {
	if a.Is4() {
		b := a.As4()
		copy(dst, b[:])
		return
	}
	b := a.As16()
	copy(dst, b[:])
}
