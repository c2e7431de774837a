// SPDX-License-Identifier: Apache-2.0

package main

import (
	"errors"
	"log/slog"
	"os"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// Renderer CPU and I/O priority (seed_nice, seed_ioprio_idle; docs/design.md §13).
//
// A renderer runs a seed-class job (priority below seed_priority_below, prefetch included)
// at niceness seed_nice and, with seed_ioprio_idle, in the idle I/O class; a live job at the
// daemon's own niceness and the default I/O class (best effort, derived from the niceness).
// The renderer goroutine changes the process just before it sends a job, and only when the
// job's class differs from the process's current one. Every thread of the process is
// changed: on Linux both setpriority(PRIO_PROCESS) and ioprio_set(IOPRIO_WHO_PROCESS) act on
// one thread, and a renderer may have started threads (MapProxy's concurrent_tile_creators).
//
// Raising a niceness is always allowed; lowering it back needs CAP_SYS_NICE or an
// RLIMIT_NICE of at least 20-nice on the *renderer* (the kernel checks the target's limit).
// The unit (empty capability set) therefore sets LimitNICE=+0; at start the daemon raises its
// own soft RLIMIT_NICE to the hard limit so that renderers inherit it (raiseNiceLimit). When
// a renderer still cannot be brought back, it stays niced: the scheduler then keeps it for
// seed jobs (takeIdle prefers a renderer already in the job's class), a live job lands on it
// only when no other renderer is idle, and a warning names the fix. The I/O class can always
// be changed back without privileges (idle and best effort need none).

const (
	ioprioWhoProcess = 1
	ioprioClassShift = 13
	ioprioClassNone  = 0 // "derive from the CPU niceness", the kernel's default
	ioprioClassIdle  = 3
)

// renderPriority is a renderer process's CPU niceness and I/O class.
type renderPriority struct {
	nice   int
	ioIdle bool
}

// baseNice is the daemon's niceness when it started: live jobs run at it.
var baseNice = func() int {
	// getpriority(2) returns 20-nice from the raw system call.
	p, err := unix.Getpriority(unix.PRIO_PROCESS, 0)
	if err != nil {
		return 0
	}
	return 20 - p
}()

// raiseNiceLimit sets the daemon's soft RLIMIT_NICE to its hard limit, which any process
// may do, so that renderers (which inherit it) may go back from seed_nice to baseNice. It
// reports whether that is now allowed, and a warning when seed_nice is in use and it is not.
func raiseNiceLimit(cfg Config, log *slog.Logger) bool {
	var lim unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NICE, &lim); err == nil && lim.Cur < lim.Max {
		lim.Cur = lim.Max
		_ = unix.Setrlimit(unix.RLIMIT_NICE, &lim)
	}
	ok := canLowerNice()
	if !ok && cfg.SeedNice > 0 {
		log.Warn("renderers cannot go back from seed_nice to the daemon's niceness after a seed job "+
			"(no CAP_SYS_NICE and RLIMIT_NICE too low): set LimitNICE=+0 in the unit or run with ulimit -e 20; "+
			"until then renderers that ran seed jobs stay niced and are kept for seed jobs",
			"seed_nice", cfg.SeedNice, "nice", baseNice)
	}
	return ok
}

// canLowerNice reports whether this process (and so its renderers) may lower a niceness
// from seed_nice back to baseNice: CAP_SYS_NICE, or RLIMIT_NICE ≥ 20-baseNice.
func canLowerNice() bool {
	if hasCapability(unix.CAP_SYS_NICE) {
		return true
	}
	var lim unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NICE, &lim); err != nil {
		return false
	}
	return lim.Cur >= uint64(20-baseNice)
}

// hasCapability reads the effective capability set from /proc/self/status.
func hasCapability(c int) bool {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return false
	}
	for _, line := range strings.Split(string(b), "\n") {
		if hex, ok := strings.CutPrefix(line, "CapEff:"); ok {
			v, err := strconv.ParseUint(strings.TrimSpace(hex), 16, 64)
			return err == nil && v&(1<<uint(c)) != 0
		}
	}
	return false
}

// jobPriority is the priority a renderer runs job j at.
func (s *scheduler) jobPriority(seedClass bool) renderPriority {
	if !seedClass {
		return renderPriority{nice: baseNice}
	}
	return renderPriority{nice: max(baseNice, min(19, baseNice+s.cfg.SeedNice)), ioIdle: s.cfg.SeedIOPrioIdle}
}

// takeIdle removes and returns the idle renderer for a job of the given class: the most
// recently idle one whose process already runs at that class's priority, else the most
// recently idle one (its priority is changed before the job is sent).
func (s *scheduler) takeIdle(seedClass bool) *renderer {
	want := s.jobPriority(seedClass)
	at := len(s.idle) - 1
	for i := len(s.idle) - 1; i >= 0; i-- {
		if s.slots[s.idle[i]].prio == want {
			at = i
			break
		}
	}
	r := s.idle[at]
	s.idle = append(s.idle[:at], s.idle[at+1:]...)
	return r
}

// setPriority brings every thread of process pid to want. A niceness that may not be
// lowered is left as it is; the returned priority is what the process runs at now, and err
// says what failed.
func setPriority(pid int, cur, want renderPriority) (renderPriority, error) {
	tids := []int{pid}
	if ents, err := os.ReadDir("/proc/" + strconv.Itoa(pid) + "/task"); err == nil {
		tids = tids[:0]
		for _, e := range ents {
			if n, err := strconv.Atoi(e.Name()); err == nil {
				tids = append(tids, n)
			}
		}
	}
	var errs []error
	got := cur
	if want.nice != cur.nice {
		got.nice = want.nice
		for _, tid := range tids {
			if err := unix.Setpriority(unix.PRIO_PROCESS, tid, want.nice); err != nil && !errors.Is(err, unix.ESRCH) {
				errs = append(errs, err)
				got.nice = cur.nice
				break
			}
		}
	}
	if want.ioIdle != cur.ioIdle {
		class := ioprioClassNone
		if want.ioIdle {
			class = ioprioClassIdle
		}
		got.ioIdle = want.ioIdle
		for _, tid := range tids {
			_, _, e := unix.Syscall(unix.SYS_IOPRIO_SET, ioprioWhoProcess, uintptr(tid), uintptr(class<<ioprioClassShift))
			if e != 0 && e != unix.ESRCH {
				errs = append(errs, e)
				got.ioIdle = cur.ioIdle
				break
			}
		}
	}
	return got, errors.Join(errs...)
}
