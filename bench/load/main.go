// Command load drives an echo server on 127.0.0.1 and prints what it
// measured: a human line, then a line "RESULT key=value ..." for scripts.
//
//	load pingpong -port P -conns N -size S -dur D [-warmup W] [-pid PID]
//	load bulk     -port P -conns N -size S -dur D [-warmup W] [-pid PID]
//	load idle     -port P -conns N -size S -pid PID
//	load freeport
//
// pingpong: every connection sends S bytes that start with a sequence
// number, reads the whole echo, checks it, and repeats; it reports round
// trips per second and their p50/p99 latency over the measured window.
// bulk: per connection one goroutine writes S-byte chunks without pause and
// another reads the echo; it reports MB/s echoed over the window. idle:
// opens N connections, echoes S bytes on each, waits a second and reports
// how much the server's VmRSS grew per connection. freeport prints a TCP
// port on 127.0.0.1 that was free a moment ago.
//
// With -pid, pingpong and bulk also report the CPU used over the window by
// the client, by the server and by the rest of the machine, in percent of
// one core. pingpong and bulk raise RLIMIT_NOFILE when -conns needs it.
package main

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

type opts struct {
	addr   string
	conns  int
	size   int
	dur    time.Duration
	warmup time.Duration
	pid    int
	settle time.Duration
}

func main() {
	if len(os.Args) < 2 {
		usage()
	}
	mode := os.Args[1]
	if mode == "freeport" {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			fatal(err)
		}
		fmt.Println(ln.Addr().(*net.TCPAddr).Port)
		ln.Close()
		return
	}
	fs := flag.NewFlagSet(mode, flag.ExitOnError)
	var o opts
	port := fs.Int("port", 0, "server port on 127.0.0.1 (required)")
	fs.IntVar(&o.conns, "conns", 1, "connections")
	fs.IntVar(&o.size, "size", 64, "bytes per message (pingpong, idle) or per write (bulk)")
	fs.DurationVar(&o.dur, "dur", 5*time.Second, "measured window")
	fs.DurationVar(&o.warmup, "warmup", 500*time.Millisecond, "unmeasured run before the window")
	fs.IntVar(&o.pid, "pid", 0, "server process id (CPU use; idle: VmRSS, required)")
	fs.DurationVar(&o.settle, "settle", time.Second, "idle: wait after the last echo before reading VmRSS")
	_ = fs.Parse(os.Args[2:])
	if *port <= 0 || o.conns <= 0 || o.size <= 0 || o.dur <= 0 {
		fatal(errors.New("-port, -conns, -size and -dur must be positive"))
	}
	o.addr = net.JoinHostPort("127.0.0.1", strconv.Itoa(*port))
	var err error
	switch mode {
	case "pingpong":
		err = pingpong(o)
	case "bulk":
		err = bulk(o)
	case "idle":
		err = idle(o)
	default:
		usage()
	}
	if err != nil {
		fatal(fmt.Errorf("%s: %w", mode, err))
	}
}

func usage() {
	fmt.Fprintln(os.Stderr, "usage: load pingpong|bulk|idle -port P [-conns N] [-size S] [-dur D] [-warmup W] [-pid PID]\n       load freeport")
	os.Exit(2)
}

func fatal(err error) {
	fmt.Fprintln(os.Stderr, "load:", err)
	os.Exit(1)
}

// dial opens n connections one after another, first raising
// RLIMIT_NOFILE if n of them would not fit.
func dial(o opts, n int) ([]net.Conn, error) {
	if err := raiseNoFile(uint64(n) + 100); err != nil {
		return nil, err
	}
	conns := make([]net.Conn, 0, n)
	for range n {
		c, err := net.DialTimeout("tcp", o.addr, 5*time.Second)
		if err != nil {
			closeAll(conns)
			return nil, err
		}
		conns = append(conns, c) // Go sets TCP_NODELAY by default
	}
	return conns, nil
}

func closeAll(conns []net.Conn) {
	for _, c := range conns {
		if c != nil {
			c.Close()
		}
	}
}

// run lets the workers warm up, then opens the measured window for o.dur:
// measuring is true during it and stop is set after it. It returns the
// window's length and the CPU use over it as "key=value ..." fields.
func run(o opts, measuring, stop *atomic.Bool, atStart, atEnd func()) (time.Duration, string) {
	time.Sleep(o.warmup)
	c0 := sampleCPU(o.pid)
	t0 := time.Now()
	atStart()
	measuring.Store(true)
	time.Sleep(o.dur)
	measuring.Store(false)
	atEnd()
	stop.Store(true)
	d := time.Since(t0)
	return d, sampleCPU(o.pid).since(c0, d).fields()
}

func pingpong(o opts) error {
	conns, err := dial(o, o.conns)
	if err != nil {
		return err
	}
	defer closeAll(conns)
	var (
		measuring, stop atomic.Bool
		wg              sync.WaitGroup
		mu              sync.Mutex
		lats            []time.Duration
		firstErr        error
	)
	deadline := time.Now().Add(o.warmup + o.dur + 10*time.Second)
	for i, c := range conns {
		c.SetDeadline(deadline) // a stuck server fails the run instead of hanging it
		wg.Add(1)
		go func() {
			defer wg.Done()
			out, in := make([]byte, o.size), make([]byte, o.size)
			for j := range out {
				out[j] = byte(i*7 + j)
			}
			var local []time.Duration
			var err error
			for seq := uint64(1); !stop.Load(); seq++ {
				// The sequence number makes a stale or misplaced echo differ.
				var b [8]byte
				binary.LittleEndian.PutUint64(b[:], seq)
				copy(out, b[:])
				t := time.Now()
				if _, err = c.Write(out); err != nil {
					break
				}
				if _, err = io.ReadFull(c, in); err != nil {
					break
				}
				d := time.Since(t)
				if !bytes.Equal(in, out) {
					err = fmt.Errorf("message %d: echo differs from what was sent", seq)
					break
				}
				if measuring.Load() {
					local = append(local, d)
				}
			}
			mu.Lock()
			lats = append(lats, local...)
			if err != nil && firstErr == nil {
				firstErr = err
			}
			mu.Unlock()
		}()
	}
	d, cpu := run(o, &measuring, &stop, func() {}, func() {})
	wg.Wait()
	if firstErr != nil {
		return firstErr
	}
	if len(lats) == 0 {
		return errors.New("no round trip in the measured window")
	}
	slices.Sort(lats)
	rate := float64(len(lats)) / d.Seconds()
	p50, p99 := percentile(lats, 50), percentile(lats, 99)
	fmt.Printf("pingpong conns=%d size=%d: %.0f msgs/s, p50 %.1f us, p99 %.1f us, %s\n",
		o.conns, o.size, rate, p50, p99, cpu)
	fmt.Printf("RESULT msgs_per_s=%.0f p50_us=%.1f p99_us=%.1f %s\n", rate, p50, p99, cpu)
	return nil
}

// percentile returns the nearest-rank percentile of sorted, in µs.
func percentile(sorted []time.Duration, p int) float64 {
	i := (len(sorted)*p+99)/100 - 1
	return float64(sorted[max(i, 0)]) / 1e3
}

func bulk(o opts) error {
	conns, err := dial(o, o.conns)
	if err != nil {
		return err
	}
	var (
		measuring, stop atomic.Bool
		sent, echoed    atomic.Int64
		wg              sync.WaitGroup
		mu              sync.Mutex
		firstErr        error
		from, to        int64
	)
	fail := func(err error) {
		if stop.Load() {
			return // we closed the connections ourselves
		}
		mu.Lock()
		if firstErr == nil {
			firstErr = err
		}
		mu.Unlock()
	}
	for _, c := range conns {
		wg.Add(2)
		go func() { // writer
			defer wg.Done()
			out := make([]byte, o.size)
			for j := range out {
				out[j] = byte(j)
			}
			for !stop.Load() {
				n, err := c.Write(out)
				sent.Add(int64(n))
				if err != nil {
					fail(err)
					return
				}
			}
		}()
		go func() { // reader
			defer wg.Done()
			in := make([]byte, 64<<10)
			for {
				n, err := c.Read(in)
				echoed.Add(int64(n))
				if err != nil {
					if err == io.EOF {
						err = errors.New("server closed the connection")
					}
					fail(err)
					return
				}
			}
		}()
	}
	d, cpu := run(o, &measuring, &stop,
		func() { from = echoed.Load() },
		func() { to = echoed.Load() })
	closeAll(conns) // ends the writers and readers
	wg.Wait()
	if firstErr != nil {
		return firstErr
	}
	if e, s := echoed.Load(), sent.Load(); e > s {
		return fmt.Errorf("echoed %d bytes, more than the %d sent", e, s)
	}
	mbps := float64(to-from) / d.Seconds() / 1e6
	if mbps == 0 {
		return errors.New("nothing echoed in the measured window")
	}
	fmt.Printf("bulk conns=%d size=%d: %.1f MB/s echoed, %s\n", o.conns, o.size, mbps, cpu)
	fmt.Printf("RESULT mb_per_s=%.1f %s\n", mbps, cpu)
	return nil
}

func idle(o opts) error {
	if o.pid <= 0 {
		return errors.New("-pid is required")
	}
	if err := raiseNoFile(uint64(o.conns) + 100); err != nil {
		return err
	}
	before, err := vmRSS(o.pid)
	if err != nil {
		return err
	}
	conns := make([]net.Conn, o.conns)
	defer func() { closeAll(conns) }()
	msg := make([]byte, o.size)
	for j := range msg {
		msg[j] = byte('a' + j%26)
	}
	var (
		next     atomic.Int64
		wg       sync.WaitGroup
		mu       sync.Mutex
		firstErr error
	)
	for range min(50, o.conns) { // 50 dialers at a time
		wg.Add(1)
		go func() {
			defer wg.Done()
			in := make([]byte, o.size)
			for {
				i := int(next.Add(1) - 1)
				if i >= o.conns {
					return
				}
				c, err := net.DialTimeout("tcp", o.addr, 10*time.Second)
				if err == nil {
					conns[i] = c
					c.SetDeadline(time.Now().Add(10 * time.Second))
					if _, err = c.Write(msg); err == nil {
						_, err = io.ReadFull(c, in)
					}
					if err == nil && !bytes.Equal(in, msg) {
						err = errors.New("echo differs from what was sent")
					}
				}
				if err != nil {
					mu.Lock()
					if firstErr == nil {
						firstErr = fmt.Errorf("connection %d: %w", i, err)
					}
					mu.Unlock()
					next.Store(int64(o.conns)) // stop the other dialers
					return
				}
			}
		}()
	}
	wg.Wait()
	if firstErr != nil {
		return firstErr
	}
	time.Sleep(o.settle)
	after, err := vmRSS(o.pid)
	if err != nil {
		return err
	}
	per := float64(after-before) / float64(o.conns)
	fmt.Printf("idle conns=%d size=%d: server VmRSS %d KiB -> %d KiB, %.2f KiB per connection\n",
		o.conns, o.size, before, after, per)
	fmt.Printf("RESULT kib_per_conn=%.2f rss_before_kib=%d rss_after_kib=%d\n", per, before, after)
	return nil
}

// raiseNoFile lets this process hold need descriptors: the soft limit goes
// up, and the hard one too where that is allowed (as root).
func raiseNoFile(need uint64) error {
	var r syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &r); err != nil {
		return err
	}
	if r.Cur >= need {
		return nil
	}
	w := syscall.Rlimit{Cur: need, Max: max(r.Max, need)}
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &w); err != nil {
		return fmt.Errorf("RLIMIT_NOFILE is %d (hard %d), %d needed: %w", r.Cur, r.Max, need, err)
	}
	return nil
}

// vmRSS reads the resident set size of a process, in KiB.
func vmRSS(pid int) (int64, error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "VmRSS:"); ok {
			return strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
		}
	}
	return 0, fmt.Errorf("no VmRSS in /proc/%d/status", pid)
}
