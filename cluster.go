package main

import (
	"crypto/sha1"
	"encoding/hex"
	"fmt"
	"strconv"
	"strings"
)

// mapproxyRequestID is the id MapProxy 1.15 puts in its renderd request for one tile
// (cache/renderd.py): sha1 of the Python repr of (cache_identifier, [(x, y, z)]), hex.
// For a metatile MapProxy sends its top-left tile, so the id names the metatile; it does
// not depend on the priority, so live and seed requests for one metatile share it. Behind
// HAProxy (DESIGN §15) this id is the hash key that picks the daemon. MapProxy encodes the
// repr as ASCII and fails on anything else; so does this.
func mapproxyRequestID(cacheIdentifier string, t tileCoord) (string, error) {
	repr, err := pythonStrRepr(cacheIdentifier)
	if err != nil {
		return "", err
	}
	sum := sha1.Sum([]byte("(" + repr + ", [(" + strconv.Itoa(int(t.X)) + ", " + strconv.Itoa(int(t.Y)) + ", " + strconv.Itoa(int(t.Z)) + ")])"))
	return hex.EncodeToString(sum[:]), nil
}

// pythonStrRepr is Python 3's repr() of an ASCII str: single quotes unless the string holds
// a single quote and no double quote; backslash, the quote, \t, \n, \r escaped; other
// control characters as \xhh.
func pythonStrRepr(s string) (string, error) {
	quote := byte('\'')
	if strings.IndexByte(s, '\'') >= 0 && strings.IndexByte(s, '"') < 0 {
		quote = '"'
	}
	var b strings.Builder
	b.WriteByte(quote)
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c >= 0x80:
			return "", fmt.Errorf("cache identifier %q is not ASCII: MapProxy cannot make a request id for it", truncate(s, 64))
		case c == '\\' || c == quote:
			b.WriteByte('\\')
			b.WriteByte(c)
		case c == '\t':
			b.WriteString(`\t`)
		case c == '\n':
			b.WriteString(`\n`)
		case c == '\r':
			b.WriteString(`\r`)
		case c < 0x20 || c == 0x7f:
			fmt.Fprintf(&b, `\x%02x`, c)
		default:
			b.WriteByte(c)
		}
	}
	b.WriteByte(quote)
	return b.String(), nil
}
