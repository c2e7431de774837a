// SPDX-License-Identifier: Apache-2.0

package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/url"
	"os"
	"strings"
)

// Command-line conventions shared by every subcommand:
//   - flags go before, between and after positional arguments (parseArgs): `seed initial
//     --wait` and `task t3 --socket S` mean what they say; "--" ends the flags;
//   - the flags mean one thing everywhere, as for mapproxy-seed and the old renderd:
//     -f mapproxy.yaml, -s seed.yaml, -c renderd.yaml; --socket PATH and --http ADDR reach
//     the daemon (clientFlags). `-s PATH` for the socket, the old spelling of the client
//     commands, still works with a deprecation line on stderr;
//   - --http takes host:port (the native protocol over TCP) or an http:// URL (HTTP, e.g.
//     through HAProxy), parsed by one function (parseHTTPTarget) for every command.

// parseArgs parses args with fs, taking flags wherever they are: Go's flag package stops at
// the first positional argument, so it parses, takes that argument, and goes on. Everything
// after "--" is positional. It returns the positional arguments in order.
func parseArgs(fs *flag.FlagSet, args []string) ([]string, error) {
	var pos []string
	for {
		if err := fs.Parse(args); err != nil {
			return nil, err
		}
		rest := fs.Args()
		if len(rest) == 0 {
			return pos, nil
		}
		if n := len(args) - len(rest); n > 0 && args[n-1] == "--" {
			return append(pos, rest...), nil
		}
		pos = append(pos, rest[0])
		args = rest[1:]
	}
}

// deprecatedSocketFlag is -s PATH on commands where -s used to name the socket.
const deprecatedSocketFlag = "-s PATH for the daemon's socket is deprecated; use --socket PATH (-s is seed.yaml, as for mapproxy-seed)"

// daemonTarget is how a client command reaches the daemon: a Unix socket or TCP address
// (network, addr: the native protocol), or an http:// URL (url: HTTP, as MapProxy does).
type daemonTarget struct {
	network, addr string
	url           string
}

// parseHTTPTarget reads --http: host:port, or an http:// or https:// URL.
func parseHTTPTarget(v string) (daemonTarget, error) {
	if strings.HasPrefix(v, "http://") || strings.HasPrefix(v, "https://") {
		u, err := url.Parse(v)
		if err != nil || u.Host == "" || u.RawQuery != "" || u.Fragment != "" {
			return daemonTarget{}, fmt.Errorf("--http: want host:port or an http:// URL, got %q", v)
		}
		return daemonTarget{url: strings.TrimSuffix(v, "/")}, nil
	}
	if _, _, err := net.SplitHostPort(v); err != nil {
		return daemonTarget{}, fmt.Errorf("--http: want host:port or an http:// URL, got %q", v)
	}
	return daemonTarget{network: "tcp", addr: v}, nil
}

// target returns where to connect: --http, else --socket (or the deprecated -s), else the
// socket or address the configuration files name, else the default socket.
func (c *clientFlags) target() (daemonTarget, error) {
	if c.tcp != "" {
		return parseHTTPTarget(c.tcp)
	}
	network, addr, err := c.address()
	return daemonTarget{network: network, addr: addr}, err
}

// call sends one native request and returns the parsed reply and its line. Over HTTP the
// line is POSTed (status: GET /status), which every native command accepts.
func (d daemonTarget) call(ctx context.Context, cmd string, line []byte) (Reply, []byte, error) {
	if d.url != "" {
		return httpExchange(ctx, cmd, d.url, line)
	}
	return exchange(ctx, d.network, d.addr, line)
}

// registerDeprecatedS makes -s PATH set the socket, with the deprecation line, on client
// commands that have no seed.yaml.
func (c *clientFlags) registerDeprecatedS(fs *flag.FlagSet, stderr io.Writer) {
	fs.Func("s", "deprecated: use --socket PATH", func(v string) error {
		fmt.Fprintln(stderr, "mapproxy-renderd: "+deprecatedSocketFlag)
		c.socket = v
		return nil
	})
}

// seedOrSocket is seed's -s: seed.yaml, unless it names a Unix socket, which the old
// spelling meant (then it is the socket, with the deprecation line).
func (c *clientFlags) seedOrSocket(v string, stderr io.Writer) (seedPath string) {
	if fi, err := os.Stat(v); err == nil && fi.Mode()&os.ModeSocket != 0 {
		fmt.Fprintln(stderr, "mapproxy-renderd: "+deprecatedSocketFlag)
		c.socket = v
		return ""
	}
	return v
}

// errNoArgs is the error of a command given positional arguments it does not take.
func errNoArgs(cmd string, args []string) error {
	if len(args) == 0 {
		return nil
	}
	return errors.New(cmd + " takes no arguments, got " + fmt.Sprintf("%q", args))
}
