package main

import (
	"bytes"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"
)

// userHZ is the unit of the times in /proc: clock ticks per second.
const userHZ = 100

// cpuSample holds cumulative CPU times in clock ticks; -1 where unknown.
type cpuSample struct {
	client   int64 // user+system time of this process
	server   int64 // the same for the server (-pid)
	softirqd int64 // the same for the kernel's ksoftirqd threads
	busy     int64 // every CPU's user, nice, system, irq and softirq time
}

func sampleCPU(pid int) cpuSample {
	s := cpuSample{client: procTicks("self"), server: -1, softirqd: softirqdTicks(), busy: busyTicks()}
	if pid > 0 {
		s.server = procTicks(strconv.Itoa(pid))
	}
	return s
}

// cpuUse is CPU use over a window in percent of one core; -1 where unknown.
// softirqd is the kernel's ksoftirqd threads, which take over the loopback
// packet work of both processes when there is much of it (thousands of
// connections). other is what the rest of the machine used meanwhile:
// above a few percent another workload shared the CPUs and the numbers
// are suspect.
type cpuUse struct{ client, server, softirqd, other float64 }

func (s cpuSample) since(s0 cpuSample, d time.Duration) cpuUse {
	pct := func(b, a int64) float64 {
		if a < 0 || b < 0 {
			return -1
		}
		return float64(b-a) / userHZ / d.Seconds() * 100
	}
	u := cpuUse{
		client:   pct(s.client, s0.client),
		server:   pct(s.server, s0.server),
		softirqd: pct(s.softirqd, s0.softirqd),
		other:    -1,
	}
	if busy := pct(s.busy, s0.busy); busy >= 0 && u.client >= 0 && u.server >= 0 && u.softirqd >= 0 {
		u.other = max(busy-u.client-u.server-u.softirqd, 0)
	}
	return u
}

func (u cpuUse) fields() string {
	return fmt.Sprintf("client_cpu=%.0f server_cpu=%.0f softirqd_cpu=%.0f other_cpu=%.0f",
		u.client, u.server, u.softirqd, u.other)
}

// softirqdTicks is procTicks summed over the ksoftirqd/N threads, or -1.
func softirqdTicks() int64 {
	dirs, err := os.ReadDir("/proc")
	if err != nil {
		return -1
	}
	var sum int64
	for _, d := range dirs {
		pid := d.Name()
		if pid[0] < '1' || pid[0] > '9' {
			continue
		}
		comm, err := os.ReadFile("/proc/" + pid + "/comm")
		if err != nil || !bytes.HasPrefix(comm, []byte("ksoftirqd/")) {
			continue
		}
		if t := procTicks(pid); t >= 0 {
			sum += t
		}
	}
	return sum
}

// procTicks is the user+system time of process pid ("self": this one) in
// clock ticks, or -1 when unknown.
func procTicks(pid string) int64 {
	b, err := os.ReadFile("/proc/" + pid + "/stat")
	if err != nil {
		return -1
	}
	// utime and stime are fields 14 and 15; the command name (field 2)
	// may hold spaces, so count from its closing parenthesis.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return -1
	}
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 13 {
		return -1
	}
	u, err1 := strconv.ParseInt(f[11], 10, 64)
	s, err2 := strconv.ParseInt(f[12], 10, 64)
	if err1 != nil || err2 != nil {
		return -1
	}
	return u + s
}

// busyTicks sums the busy times on the "cpu" line of /proc/stat, or is -1.
// The kernel counts a tick that lands in irq or softirq work both there
// and in the system time of the task it interrupted, so this is comparable
// with procTicks: what neither of our processes nor ksoftirqd used went
// to someone else (or to interrupts on an idle CPU).
func busyTicks() int64 {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return -1
	}
	line, _, _ := bytes.Cut(b, []byte("\n"))
	f := strings.Fields(string(line)) // cpu user nice system idle iowait irq softirq steal ...
	if len(f) < 8 || f[0] != "cpu" {
		return -1
	}
	var sum int64
	for _, i := range []int{1, 2, 3, 6, 7} {
		v, err := strconv.ParseInt(f[i], 10, 64)
		if err != nil {
			return -1
		}
		sum += v
	}
	return sum
}
