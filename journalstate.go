// SPDX-License-Identifier: Apache-2.0

package main

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"os"
	"slices"
	"strconv"
)

// The journal's live state (docs/design.md §12): background jobs not done and tasks not
// ended, kept in memory so that a snapshot can replace the file; replay fills it, apply is
// the one place that changes it, and a snapshot copies it under the journal's lock and
// encodes it outside.

// jkey is a journaled job's identity: its cache number and metatile.
type jkey struct {
	cache   uint32
	z, x, y int32
}

// A live job's value in journal.jobs packs its acceptance sequence number (FIFO on replay)
// above jobPrioBits bits of priority: one map entry per job, no list to keep in order.
const jobPrioBits = 16

// jmkey is a jkey as journal.jobs keeps it, 12 bytes: the cache number above 8 bits of z
// (z is at most maxZoom; a journal never numbers 1<<24 caches). With a jval of 4-byte
// words an entry takes 20 bytes, where jkey and a uint64 would take 24.
type jmkey struct{ cz, x, y uint32 }

// jval is a live job's value (sequence << jobPrioBits | priority) in two 4-byte words.
type jval struct{ lo, hi uint32 }

const maxJournalCaches = 1 << 24

func (k jkey) packed() jmkey {
	return jmkey{cz: k.cache<<8 | uint32(k.z), x: uint32(k.x), y: uint32(k.y)}
}

func (k jmkey) unpacked() jkey {
	return jkey{cache: k.cz >> 8, z: int32(k.cz & 0xff), x: int32(k.x), y: int32(k.y)}
}

func packJval(v uint64) jval { return jval{lo: uint32(v), hi: uint32(v >> 32)} }

func (v jval) u64() uint64 { return uint64(v.hi)<<32 | uint64(v.lo) }

// jentry is a live job as a snapshot copies it: its key and its value in journal.jobs.
type jentry struct {
	key jkey
	v   uint64
}

func (e jentry) priority() int { return int(e.v & (1<<jobPrioBits - 1)) }

// sortJobs puts snapshot entries in acceptance order.
func sortJobs(es []jentry) {
	slices.SortFunc(es, func(a, b jentry) int { return cmpU64(a.v>>jobPrioBits, b.v>>jobPrioBits) })
}

type jtask struct {
	seq          uint64
	spec, cursor []byte
}

// replayFile reads path into the live state. A missing file is an empty journal.
func (j *journal) replayFile(path string) (journalReplay, error) {
	var rep journalReplay
	f, err := os.Open(path)
	if errors.Is(err, os.ErrNotExist) {
		return rep, nil
	}
	if err != nil {
		return rep, fmt.Errorf("journal: %w", err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return rep, fmt.Errorf("journal: %w", err)
	}
	if !st.Mode().IsRegular() {
		return rep, &journalDamage{why: "not a regular file (" + st.Mode().Type().String() + ")"}
	}
	r := bufio.NewReaderSize(f, 1<<20)
	magic := make([]byte, len(journalMagic))
	n, err := io.ReadFull(r, magic)
	if err != nil && !errors.Is(err, io.EOF) && !errors.Is(err, io.ErrUnexpectedEOF) {
		return rep, &journalDamage{why: "cannot read its header: " + err.Error(), size: st.Size()}
	}
	switch {
	case n == 0:
		return rep, nil // empty file
	case n < len(magic) && journalMagic[:n] == string(magic[:n]):
		rep.Corrupt, rep.Dropped = "truncated header", int64(n)
		return rep, nil
	case string(magic) != journalMagic:
		return rep, &journalDamage{why: fmt.Sprintf("%s is not a mapproxy-renderd journal (bad magic)", path), size: st.Size()}
	}
	off := int64(len(journalMagic))
	var body []byte
	for {
		n, err := binary.ReadUvarint(r)
		if err == io.EOF {
			return rep, nil
		}
		cut := func(why string) (journalReplay, error) {
			rep.Corrupt = fmt.Sprintf("%s at offset %d", why, off)
			rep.Dropped = st.Size() - off
			return rep, nil
		}
		if err != nil {
			if errors.Is(err, io.ErrUnexpectedEOF) {
				return cut("truncated record length")
			}
			if errors.As(err, new(*os.PathError)) {
				return cut("read error (" + err.Error() + ")")
			}
			return cut("bad record length")
		}
		if n == 0 || n > maxJournalRecord {
			return cut(fmt.Sprintf("bad record length %d", n))
		}
		var crc [4]byte
		if _, err := io.ReadFull(r, crc[:]); err != nil {
			return cut("truncated record")
		}
		if cap(body) < int(n) {
			body = make([]byte, n)
		}
		body = body[:n]
		if _, err := io.ReadFull(r, body); err != nil {
			return cut("truncated record")
		}
		if crc32.Checksum(body, crcTable) != binary.LittleEndian.Uint32(crc[:]) {
			return cut("checksum mismatch")
		}
		if err := j.apply(body); err != nil {
			return cut(err.Error())
		}
		rep.Records++
		off += int64(uvarintLen(n)) + 4 + int64(n)
	}
}

// apply changes the live state by one record body. It is the one place that knows what a
// record means, used by replay and (through appendLocked) by appends. Caller holds mu or
// owns j exclusively.
func (j *journal) apply(body []byte) error {
	d := recDecoder{b: body[1:]}
	switch body[0] {
	case recCache:
		num, name := d.uvarint(), d.rest()
		if d.bad || num != uint64(len(j.names)) || num >= maxJournalCaches {
			return errors.New("bad cache record")
		}
		j.names = append(j.names, string(name))
		j.caches[string(name)] = uint32(num)
	case recJob, recDone:
		k := jkey{cache: uint32(d.uvarint()), z: int32(d.uvarint()), x: int32(d.uvarint()), y: int32(d.uvarint())}
		prio := 0
		if body[0] == recJob {
			prio = int(d.uvarint())
		}
		if d.bad || int(k.cache) >= len(j.names) || k.z > maxZoom || !d.done() {
			return errors.New("bad job record")
		}
		prio = min(prio, 1<<jobPrioBits-1) // requests hold it to maxPriority
		mk := k.packed()
		jv, ok := j.jobs[mk]
		switch {
		case body[0] == recDone:
			delete(j.jobs, mk)
		case ok:
			if v := jv.u64(); prio > (jentry{v: v}).priority() {
				j.jobs[mk] = packJval(v&^(1<<jobPrioBits-1) | uint64(prio))
			}
		default:
			j.seq++
			j.jobs[mk] = packJval(j.seq<<jobPrioBits | uint64(prio))
		}
	case recTaskSpec, recTaskCursor, recTaskEnd:
		id, rest := string(d.str()), d.rest()
		if d.bad {
			return errors.New("bad task record")
		}
		switch body[0] {
		case recTaskSpec:
			j.seq++
			j.tasks[id] = &jtask{seq: j.seq, spec: bytes.Clone(rest)}
		case recTaskCursor:
			if t := j.tasks[id]; t != nil {
				t.cursor = bytes.Clone(rest)
			}
		case recTaskEnd:
			if id == taskNumberID {
				n, err := strconv.ParseUint(string(rest), 10, 63)
				if err != nil {
					return errors.New("bad task number record")
				}
				j.taskNum = max(j.taskNum, n)
				break
			}
			delete(j.tasks, id)
			j.keepEnded(id, rest)
		}
	default:
		return fmt.Errorf("unknown record type %d", body[0])
	}
	return nil
}

// liveState lists the live jobs and tasks in acceptance order, with the snapshot they come
// from (sorted once for both) for the compacting rewrite. Caller holds mu (or owns j).
func (j *journal) liveState() ([]journalJob, []journalTask, journalSnapshot) {
	snap := j.snapshotLocked()
	sortJobs(snap.jobs)
	return j.journalJobs(snap.jobs), snap.tasks, snap
}

// jobEntriesLocked copies the live jobs, in no particular order. Caller holds mu.
func (j *journal) jobEntriesLocked() []jentry {
	es := make([]jentry, 0, len(j.jobs))
	for k, v := range j.jobs {
		es = append(es, jentry{key: k.unpacked(), v: v.u64()})
	}
	return es
}

// journalJobs names the jobs of es for the replay. Caller holds mu (or owns j): names.
func (j *journal) journalJobs(es []jentry) []journalJob {
	jobs := make([]journalJob, len(es))
	for i, e := range es {
		jobs[i] = journalJob{Cache: j.names[e.key.cache], Tile: tileCoord{X: e.key.x, Y: e.key.y, Z: e.key.z}, Priority: e.priority()}
	}
	return jobs
}

// liveTasksLocked lists the live tasks in acceptance order. Caller holds mu (or owns j).
func (j *journal) liveTasksLocked() []journalTask {
	tasks := make([]journalTask, 0, len(j.tasks))
	seqs := make(map[string]uint64, len(j.tasks))
	for id, t := range j.tasks {
		tasks = append(tasks, journalTask{ID: id, Spec: t.spec, Cursor: t.cursor})
		seqs[id] = t.seq
	}
	slices.SortFunc(tasks, func(a, b journalTask) int { return cmpU64(seqs[a.ID], seqs[b.ID]) })
	return tasks
}

func cmpU64(a, b uint64) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

// journalSnapshot is a copy of the live state, taken under mu and encoded without it.
type journalSnapshot struct {
	names   []string
	jobs    []jentry // in no particular order until encodeSnapshot sorts them
	tasks   []journalTask
	ended   []journalTask
	taskNum uint64
}

// snapshotLocked copies the live state for encodeSnapshot. Caller holds mu (or owns j).
// It copies the entries (O(jobs), no encoding, no sorting): both are done outside mu.
func (j *journal) snapshotLocked() journalSnapshot {
	return journalSnapshot{names: slices.Clone(j.names), jobs: j.jobEntriesLocked(), tasks: j.liveTasksLocked(), ended: slices.Clone(j.ended), taskNum: j.taskNum}
}

// encodeSnapshot encodes a copy of the live state as a journal file, the jobs in
// acceptance order (it sorts snap.jobs).
func encodeSnapshot(snap journalSnapshot) []byte {
	sortJobs(snap.jobs)
	out := make([]byte, 0, len(journalMagic)+len(snap.jobs)*16+1024)
	out = append(out, journalMagic...)
	var body []byte
	for num, name := range snap.names {
		body = appendUvarint(append(body[:0], recCache), uint64(num))
		out = appendRecord(out, append(body, name...))
	}
	for _, e := range snap.jobs {
		out = appendRecord(out, encodeJob(body[:0], recJob, e.key, e.priority()))
	}
	if snap.taskNum > 0 {
		out = appendRecord(out, encodeTask(body[:0], recTaskEnd, taskNumberID, strconv.AppendUint(nil, snap.taskNum, 10)))
	}
	for _, t := range snap.ended {
		out = appendRecord(out, encodeTask(body[:0], recTaskEnd, t.ID, t.Spec))
	}
	for _, t := range snap.tasks {
		out = appendRecord(out, encodeTask(body[:0], recTaskSpec, t.ID, t.Spec))
		if t.Cursor != nil {
			out = appendRecord(out, encodeTask(body[:0], recTaskCursor, t.ID, t.Cursor))
		}
	}
	return out
}
