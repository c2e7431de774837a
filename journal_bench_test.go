// SPDX-License-Identifier: Apache-2.0

package main

import (
	"bufio"
	"fmt"
	"net"
	"os"
	"strconv"
	"syscall"
	"testing"
	"time"
)

// BenchmarkBackgroundEnqueue measures background requests answered queued per second by the
// real daemon (in-process, renderers held by a gate so that jobs stay queued), 100,000
// requests pipelined on one connection, with the journal off and on.
func BenchmarkBackgroundEnqueue(b *testing.B) {
	for _, on := range []bool{false, true} {
		b.Run("journal="+strconv.FormatBool(on), func(b *testing.B) {
			const n = 100_000
			d := newTestDaemon(b, daemonOpts{gate: true, maxSeed: -1,
				extraYAML: fmt.Sprintf("journal: %v\nmax_queued: 4000000\n", on)})
			b.ResetTimer()
			var elapsed time.Duration
			cpu0 := cpuSeconds()
			for i := 0; i < b.N; i++ {
				c, err := net.Dial("unix", d.socket)
				if err != nil {
					b.Fatal(err)
				}
				start := time.Now()
				go func() {
					w := bufio.NewWriterSize(c, 64<<10)
					for k := 0; k < n; k++ {
						fmt.Fprintf(w, `{"command":"tile","id":"%d","cache_identifier":"bench_GRID","tiles":[[%d,%d,20]],"priority":10,"background":true}`+"\n", k, k%1024, i*n/1024+k/1024)
					}
					w.Flush()
				}()
				r := bufio.NewReaderSize(c, 1<<20)
				for k := 0; k < n; k++ {
					line, err := r.ReadSlice('\n')
					if err != nil {
						b.Fatal(err)
					}
					if !containsQueued(line) {
						b.Fatalf("reply %s", line)
					}
				}
				elapsed += time.Since(start)
				c.Close()
			}
			b.StopTimer()
			b.ReportMetric(float64(n*b.N)/elapsed.Seconds(), "jobs/s")
			// CPU per job of the whole process: the daemon and this benchmark's client.
			b.ReportMetric((cpuSeconds()-cpu0)*1e6/float64(n*b.N), "cpu-µs/job")
			d.release(4) // let the gated renders go, so that the daemon can stop
		})
	}
}

// cpuSeconds is the CPU time this process (the in-process daemon) has used.
func cpuSeconds() float64 {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano()).Seconds()
}

func containsQueued(line []byte) bool {
	for i := 0; i+8 <= len(line); i++ {
		if string(line[i:i+8]) == `"queued"` {
			return true
		}
	}
	return false
}

// BenchmarkRestartJournaled measures a start on a journal of 1,000,000 background jobs until
// the daemon answers ping: replay, the compacting rewrite, and the jobs queued again.
func BenchmarkRestartJournaled(b *testing.B) {
	const jobs = 1_000_000
	data := []byte(journalMagic)
	data = appendRecord(data, append([]byte{recCache, 0}, "bench_GRID"...))
	for i := 0; i < jobs; i++ {
		k := jkey{cache: 0, z: 20, x: int32(i % 4096), y: int32(i / 4096)}
		data = appendRecord(data, encodeJob(nil, recJob, k, 10))
	}
	for i := 0; i < b.N; i++ {
		b.StopTimer()
		state := shortTempDir(b)
		if err := os.WriteFile(state+"/journal", data, 0o600); err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
		start, cpu0 := time.Now(), cpuSeconds()
		d := newTestDaemon(b, daemonOpts{gate: true, maxSeed: -1,
			extraYAML: "state_dir: " + state + "\nmax_queued: 2000000\n"})
		b.ReportMetric(time.Since(start).Seconds(), "s-to-serving")
		// The machine may be shared: the CPU time the daemon used says what a quiet one needs.
		b.ReportMetric(cpuSeconds()-cpu0, "cpu-s-to-serving")
		b.StopTimer()
		if st := d.status(); st.Queue.Length+st.Queue.Running != jobs {
			b.Fatalf("%d jobs queued after the restart, want %d", st.Queue.Length+st.Queue.Running, jobs)
		}
		d.release(4)
		d.stop()
		b.StartTimer()
	}
}
