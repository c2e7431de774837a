// SPDX-License-Identifier: Apache-2.0

package main

import (
	"encoding/binary"
	"hash/crc32"
)

// The journal's record format (docs/design.md §12): framing (uvarint length, CRC-32C, body),
// the record types, and the encoder and decoder of their payloads. The writer (journal.go)
// and the live state (journalstate.go) use them; nothing here keeps state.

// appendRecord frames body: uvarint length, CRC-32C, body.
func appendRecord(out, body []byte) []byte {
	out = appendUvarint(out, uint64(len(body)))
	out = binary.LittleEndian.AppendUint32(out, crc32.Checksum(body, crcTable))
	return append(out, body...)
}

func appendUvarint(b []byte, v uint64) []byte { return binary.AppendUvarint(b, v) }

func uvarintLen(v uint64) int {
	n := 1
	for v >= 0x80 {
		v >>= 7
		n++
	}
	return n
}

func encodeJob(b []byte, typ byte, k jkey, priority int) []byte {
	b = append(b, typ)
	b = appendUvarint(b, uint64(k.cache))
	b = appendUvarint(b, uint64(k.z))
	b = appendUvarint(b, uint64(k.x))
	b = appendUvarint(b, uint64(k.y))
	if typ == recJob {
		b = appendUvarint(b, uint64(priority))
	}
	return b
}

func encodeTask(b []byte, typ byte, id string, rest []byte) []byte {
	b = append(b, typ)
	b = appendUvarint(b, uint64(len(id)))
	b = append(b, id...)
	return append(b, rest...)
}

// recDecoder reads a record payload; bad is set on the first malformed field.
type recDecoder struct {
	b   []byte
	bad bool
}

func (d *recDecoder) uvarint() uint64 {
	v, n := binary.Uvarint(d.b)
	if n <= 0 || v > maxCoordinate {
		d.bad = true
		return 0
	}
	d.b = d.b[n:]
	return v
}

func (d *recDecoder) str() []byte {
	n := d.uvarint()
	if d.bad || n > uint64(len(d.b)) {
		d.bad = true
		return nil
	}
	s := d.b[:n]
	d.b = d.b[n:]
	return s
}

func (d *recDecoder) rest() []byte {
	r := d.b
	d.b = nil
	return r
}

func (d *recDecoder) done() bool { return len(d.b) == 0 }

// Record types. Payload integers are uvarints; strings are a uvarint length and bytes.
const (
	recCache      byte = 1 // cache number, identifier: names a cache for the records after it
	recJob        byte = 2 // cache number, z, x, y, priority: a background job accepted
	recDone       byte = 3 // cache number, z, x, y: the job was rendered (or failed for good)
	recTaskSpec   byte = 4 // task id, spec (the rest): a task accepted
	recTaskCursor byte = 5 // task id, cursor (the rest): where the task resumes
	recTaskEnd    byte = 6 // task id, final task document (the rest; may be empty): the task ended (done, failed, cancelled);
	// with the id taskNumberID, the rest is the highest task number handed out (taskstore.go)
)

var crcTable = crc32.MakeTable(crc32.Castagnoli)
