package asynctcp_test

// The benchmarks of SPEC section 4: each workload runs against a plain
// goroutine-per-connection net.Conn echo server (the "net" sub-benchmark)
// and then against an asynctcp echo server (the "asynctcp" one), with the
// same plain net.Conn client, over loopback. The asynctcp run reports its
// ratio to the net run of the same round:
//
//	go test -run '^$' -bench . -benchmem
//
// BenchmarkScaling and BenchmarkIdleMemory10000Conns hold up to 10,000
// connections, too many descriptors for client and server in one process,
// so their client runs in a child process: the test binary again, running
// TestBenchClientChild with bnChildEnv set.

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/asynctcp/asynctcp"
)

const (
	// bnStall is how long a benchmark waits without progress (an echo,
	// a line from its child, a server ending) before it fails.
	bnStall = 10 * time.Second
	// bnChildEnv holds the JSON bnChildConfig of a client child process.
	bnChildEnv = "ASYNCTCP_BENCH_CHILD"
	// bnChildMark starts every line the child says to its parent.
	bnChildMark = "bench-child: "
	// bnWarm and bnWindow are the warm-up and the measured window of one
	// BenchmarkScaling iteration.
	bnWarm   = 500 * time.Millisecond
	bnWindow = 1500 * time.Millisecond
	// bnDialers is how many goroutines of a child dial at once.
	bnDialers = 16
)

// bnServer is an echo server under test. stop closes it once its clients
// have gone and returns when every goroutine of it has ended.
type bnServer struct {
	addr string
	stop func() error
}

// bnListen starts an echo server on a free loopback port.
type bnListen func() (*bnServer, error)

// bnListenNet starts what a Go programmer writes by default (the
// baseline of ../shared/bench/servers/net): a goroutine per connection,
// each reading into its own 32 KiB buffer and writing back what it read.
// It tracks its connections only so that stop can end them.
func bnListenNet() (*bnServer, error) { return bnListenNetWith(false) }

// bnListenNetFresh is the net echo server handing each read on in a fresh
// slice, as asynctcp's read-cb gets it by default: the same echo with the
// allocation and the collection it drives, and nothing else of asynctcp.
func bnListenNetFresh() (*bnServer, error) { return bnListenNetWith(true) }

func bnListenNetWith(fresh bool) (*bnServer, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	var (
		mu     sync.Mutex
		conns  = map[net.Conn]struct{}{}
		wg     sync.WaitGroup
		accErr error
	)
	echo := func(c net.Conn) {
		defer wg.Done()
		defer func() {
			c.Close()
			mu.Lock()
			delete(conns, c)
			mu.Unlock()
		}()
		buf := make([]byte, 32<<10)
		for {
			n, err := c.Read(buf)
			if n > 0 {
				out := buf[:n]
				if fresh {
					out = append([]byte(nil), out...)
				}
				if _, werr := c.Write(out); werr != nil {
					return
				}
			}
			if err != nil {
				return
			}
		}
	}
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				if !errors.Is(err, net.ErrClosed) {
					mu.Lock()
					accErr = err
					mu.Unlock()
				}
				return
			}
			mu.Lock()
			conns[c] = struct{}{}
			mu.Unlock()
			wg.Add(1)
			go echo(c)
		}
	}()
	stop := func() error {
		ln.Close()
		mu.Lock()
		for c := range conns {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
		if accErr != nil {
			return fmt.Errorf("net server: accept: %w", accErr)
		}
		return nil
	}
	return &bnServer{addr: ln.Addr().String(), stop: stop}, nil
}

// bnListenAsync starts the asynctcp echo server on a loop of its own.
func bnListenAsync() (*bnServer, error) { return bnListenAsyncWith() }

// bnListenAsyncReuse is the echo server with ReuseReadBuffer: the read-cb
// borrows the read buffer, so an echo allocates nothing.
func bnListenAsyncReuse() (*bnServer, error) { return bnListenAsyncWith(asynctcp.ReuseReadBuffer()) }

func bnListenAsyncWith(opts ...asynctcp.Option) (*bnServer, error) {
	return bnListenAsyncOn(&asynctcp.Loop{}, func(s *asynctcp.Socket, data []byte) { s.WriteData(data) }, opts...)
}

// bnListenAsyncOn is bnListenAsyncWith on l, with read as the read-cb.
func bnListenAsyncOn(l *asynctcp.Loop, read asynctcp.ReadFunc, opts ...asynctcp.Option) (*bnServer, error) {
	srv, err := l.Listen("127.0.0.1", 0, read, nil, opts...)
	if err != nil {
		return nil, err
	}
	stop := func() error {
		srv.Close()
		done := make(chan error, 1)
		go func() { done <- l.Wait() }()
		select {
		case err := <-done:
			return err
		case <-time.After(bnStall):
		}
		st := l.Stats()
		l.Exit(errors.New("benchmark: Loop.Wait hung"))
		select {
		case <-done:
		case <-time.After(bnStall):
			return fmt.Errorf("asynctcp server: Loop.Wait did not return within %v after the clients closed (stats %+v), nor after Exit", bnStall, st)
		}
		return fmt.Errorf("asynctcp server: Loop.Wait did not return within %v after the clients closed (stats %+v); Exit ended it", bnStall, st)
	}
	return &bnServer{addr: srv.Addr().String(), stop: stop}, nil
}

// bnPair gives each asynctcp run the ratio of its figure to that of the
// net run of the same round. The testing package runs a sub-benchmark
// -count times (and once per -cpu value) before the next one, so round k
// of asynctcp pairs with round k of net; within a round (one *testing.B)
// the figure of the last call, the one with the reported b.N, counts.
type bnPair struct {
	nets   []float64
	netB   *testing.B
	rounds map[string]*bnRound // per asynctcp variant
}

// bnRound tracks the runs of one asynctcp variant.
type bnRound struct {
	b *testing.B
	n int
}

func (p *bnPair) net(b *testing.B, v float64) {
	if b != p.netB {
		p.netB = b
		p.nets = append(p.nets, v)
		return
	}
	p.nets[len(p.nets)-1] = v
}

func (p *bnPair) async(b *testing.B, variant string, v float64) {
	if p.rounds == nil {
		p.rounds = make(map[string]*bnRound)
	}
	r := p.rounds[variant]
	if r == nil {
		r = &bnRound{}
		p.rounds[variant] = r
	}
	if b != r.b {
		r.b = b
		r.n++
	}
	if k := r.n - 1; k < len(p.nets) && p.nets[k] > 0 {
		b.ReportMetric(v/p.nets[k], "ratio")
	}
}

// bnCompare runs measure as the net and then as the asynctcp
// sub-benchmark. measure reports its metrics and returns the one the ratio
// is taken of.
func bnCompare(b *testing.B, measure func(b *testing.B, listen bnListen) float64) {
	bnCompareWith(b, bnListenAsync, measure)
}

// bnCompareWith is bnCompare with async as the asynctcp server.
func bnCompareWith(b *testing.B, async bnListen, measure func(b *testing.B, listen bnListen) float64) {
	var p bnPair
	b.Run("net", func(b *testing.B) { p.net(b, measure(b, bnListenNet)) })
	b.Run("asynctcp", func(b *testing.B) { p.async(b, "asynctcp", measure(b, async)) })
}

// bnCompareReuse is bnCompare with a third run, asynctcp with
// ReuseReadBuffer, and a run for each of more after it.
func bnCompareReuse(b *testing.B, measure func(b *testing.B, listen bnListen) float64, more ...bnVariant) {
	var p bnPair
	b.Run("net", func(b *testing.B) { p.net(b, measure(b, bnListenNet)) })
	b.Run("asynctcp", func(b *testing.B) { p.async(b, "asynctcp", measure(b, bnListenAsync)) })
	b.Run("asynctcp-reuse", func(b *testing.B) { p.async(b, "reuse", measure(b, bnListenAsyncReuse)) })
	for _, v := range more {
		b.Run(v.name, func(b *testing.B) { p.async(b, v.name, measure(b, v.listen)) })
	}
}

// bnVariant is a further server for bnCompareReuse, with a ratio to net.
type bnVariant struct {
	name   string
	listen bnListen
}

// bnServe starts a server for the rest of b's run.
func bnServe(b *testing.B, listen bnListen) *bnServer {
	b.Helper()
	srv, err := listen()
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() {
		if err := srv.stop(); err != nil {
			b.Error(err)
		}
	})
	return srv
}

// bnDial opens n connections to addr, closed when b's run ends (before
// its server stops, as cleanups run last first).
func bnDial(b *testing.B, addr string, n int) []net.Conn {
	b.Helper()
	conns := make([]net.Conn, 0, n)
	b.Cleanup(func() {
		for _, c := range conns {
			c.Close()
		}
	})
	for range n {
		c, err := net.DialTimeout("tcp", addr, bnStall)
		if err != nil {
			b.Fatal(err)
		}
		conns = append(conns, c)
	}
	return conns
}

// bnWatch closes conns once progress has stood still for bnStall, so that
// a server that stops echoing fails the benchmark instead of hanging it.
// The returned stop ends the watch and reports whether it fired.
func bnWatch(progress *atomic.Int64, conns []net.Conn) (stop func() bool) {
	done := make(chan struct{})
	fired := make(chan bool, 1)
	go func() {
		tick := time.NewTicker(bnStall / 10)
		defer tick.Stop()
		last, still := progress.Load(), 0
		for {
			select {
			case <-done:
				fired <- false
				return
			case <-tick.C:
			}
			if p := progress.Load(); p != last {
				last, still = p, 0
				continue
			}
			if still++; still < 10 {
				continue
			}
			for _, c := range conns {
				c.Close()
			}
			fired <- true
			return
		}
	}()
	return func() bool {
		close(done)
		return <-fired
	}
}

func bnMallocs() uint64 {
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return m.Mallocs
}

// bnRun runs work on every connection at once, timed, and returns the
// elapsed time and the allocations made meanwhile (by client and server:
// the client allocates nothing per message). progress must move while the
// work goes well.
func bnRun(b *testing.B, conns []net.Conn, progress *atomic.Int64, work func(i int, c net.Conn) error) (time.Duration, uint64) {
	b.Helper()
	start := make(chan struct{})
	errs := make(chan error, len(conns))
	var wg sync.WaitGroup
	for i, c := range conns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			if err := work(i, c); err != nil {
				errs <- fmt.Errorf("connection %d: %w", i, err)
			}
		}()
	}
	stop := bnWatch(progress, conns)
	m0 := bnMallocs()
	b.ResetTimer()
	t0 := time.Now()
	close(start)
	wg.Wait()
	elapsed := time.Since(t0)
	b.StopTimer()
	allocs := bnMallocs() - m0
	if stop() {
		b.Fatalf("no progress for %v: the server stopped echoing", bnStall)
	}
	close(errs)
	for err := range errs {
		b.Fatal(err)
	}
	return elapsed, allocs
}

// bnPingPong: each of conns connections sends size bytes stamped with a
// sequence number, waits for their echo and checks it, and repeats; b.N
// round trips in all. It reports msgs/s and allocs/msg and returns msgs/s.
func bnPingPong(b *testing.B, listen bnListen, conns, size int) float64 {
	srv := bnServe(b, listen)
	cs := bnDial(b, srv.addr, conns)
	var claimed atomic.Int64
	elapsed, allocs := bnRun(b, cs, &claimed, func(i int, c net.Conn) error {
		out, in := bnMessage(i, size), make([]byte, size)
		for seq := uint64(1); claimed.Add(1) <= int64(b.N); seq++ {
			if err := bnRoundTrip(c, out, in, seq); err != nil {
				return err
			}
		}
		return nil
	})
	rate := float64(b.N) / elapsed.Seconds()
	b.ReportMetric(rate, "msgs/s")
	b.ReportMetric(float64(allocs)/float64(b.N), "allocs/msg")
	return rate
}

// bnMessage returns a message of size bytes that differs between
// connections.
func bnMessage(i, size int) []byte {
	p := make([]byte, size)
	for j := range p {
		p[j] = byte(i + j)
	}
	return p
}

// bnRoundTrip sends out stamped with seq (so that a stale or mixed-up
// echo fails) and reads its echo into in.
func bnRoundTrip(c net.Conn, out, in []byte, seq uint64) error {
	if len(out) >= 8 {
		binary.LittleEndian.PutUint64(out, seq)
	}
	if _, err := c.Write(out); err != nil {
		return err
	}
	if _, err := io.ReadFull(c, in); err != nil {
		return err
	}
	if !bytes.Equal(in, out) {
		return fmt.Errorf("echo of message %d differs from what was sent", seq)
	}
	return nil
}

func BenchmarkPingPong1Conn64B(b *testing.B) {
	bnCompareReuse(b, func(b *testing.B, listen bnListen) float64 {
		return bnPingPong(b, listen, 1, 64)
	})
}

func BenchmarkPingPong50Conns512B(b *testing.B) {
	bnCompareReuse(b, func(b *testing.B, listen bnListen) float64 {
		return bnPingPong(b, listen, 50, 512)
	})
}

// BenchmarkBulkEcho10Conns64KiB: per connection one goroutine writes
// 64 KiB chunks without pause while another reads the echo; b.N chunks in
// all, shared out evenly. MB/s counts echoed bytes; allocs/msg is per chunk.
// A fourth run, net-fresh, is the net server copying each read into a
// fresh slice before it writes it back: what the default mode's fresh
// slices cost any Go server, with a ratio to net of its own.
func BenchmarkBulkEcho10Conns64KiB(b *testing.B) {
	bnCompareReuse(b, func(b *testing.B, listen bnListen) float64 {
		return bnBulk(b, listen, 10, 64<<10)
	}, bnVariant{"net-fresh", bnListenNetFresh})
}

func bnBulk(b *testing.B, listen bnListen, conns, chunk int) float64 {
	srv := bnServe(b, listen)
	cs := bnDial(b, srv.addr, conns)
	var echoed atomic.Int64
	elapsed, allocs := bnRun(b, cs, &echoed, func(i int, c net.Conn) error {
		n := b.N / conns
		if i < b.N%conns {
			n++
		}
		werr := make(chan error, 1)
		go func() {
			out := bnMessage(i, chunk)
			for range n {
				if _, err := c.Write(out); err != nil {
					werr <- err
					return
				}
			}
			werr <- nil
		}()
		in := make([]byte, 64<<10)
		want, got := int64(n)*int64(chunk), int64(0)
		for got < want {
			k, err := c.Read(in[:min(int64(len(in)), want-got)])
			got += int64(k)
			echoed.Add(int64(k))
			if err != nil {
				<-werr // the watchdog closed c, or the server did: the writer fails too
				return fmt.Errorf("after %d of %d bytes: %w", got, want, err)
			}
		}
		return <-werr
	})
	mbs := float64(b.N) * float64(chunk) / elapsed.Seconds() / 1e6
	b.ReportMetric(mbs, "MB/s")
	b.ReportMetric(float64(allocs)/float64(b.N), "allocs/msg")
	return mbs
}

// BenchmarkScaling: ping-pong with 64 B messages at 1, 100, 1,000 and
// 10,000 connections, from a child process. Each iteration starts a server,
// lets the child connect, warm up for bnWarm and ping-pong for bnWindow,
// and reports msgs/s over the window and the p99 round trip in µs (the
// mean of the iterations' p99s where b.N > 1).
func BenchmarkScaling(b *testing.B) {
	for _, n := range []int{1, 100, 1000, 10000} {
		b.Run(fmt.Sprintf("conns=%d", n), func(b *testing.B) {
			bnCompare(b, func(b *testing.B, listen bnListen) float64 {
				return bnScaling(b, listen, n, 64)
			})
		})
	}
}

func bnScaling(b *testing.B, listen bnListen, conns, size int) float64 {
	var msgs int64
	var secs, p99 float64
	for range b.N {
		r := bnScalingOnce(b, listen, conns, size)
		msgs += r.Msgs
		secs += r.Secs
		p99 += r.P99us
	}
	rate := float64(msgs) / secs
	b.ReportMetric(rate, "msgs/s")
	b.ReportMetric(p99/float64(b.N), "p99-us")
	return rate
}

func bnScalingOnce(b *testing.B, listen bnListen, conns, size int) bnChildResult {
	srv, err := listen()
	if err != nil {
		b.Fatal(err)
	}
	defer func() {
		if err := srv.stop(); err != nil {
			b.Error(err)
		}
	}()
	child := bnStartChild(b, bnChildConfig{Mode: "pingpong", Addr: srv.addr, Conns: conns, Size: size, Warm: bnWarm, Dur: bnWindow})
	defer child.end(b)
	line := child.next(b, 2*bnStall+bnWarm+bnWindow+bnDialTime(conns))
	var r bnChildResult
	if err := json.Unmarshal([]byte(line), &r); err != nil || r.Msgs == 0 {
		b.Fatalf("child said %q (%v), want a result with messages", line, err)
	}
	return r
}

// bnDialTime bounds how long a child takes to open conns connections. A
// parent waits for its child longer than the child waits for the server,
// so that the child, which knows more, reports a server that stalls.
func bnDialTime(conns int) time.Duration {
	return time.Duration(conns) * time.Millisecond
}

// BenchmarkIdleMemory10000Conns: a child opens 10,000 connections, echoes
// one 64 B message on each and leaves them idle for a second; the
// server's heap and stack in use (after two GCs) grow by KiB/conn per
// connection. The net server's connections sit in Read on their 32 KiB
// buffers.
func BenchmarkIdleMemory10000Conns(b *testing.B) { bnIdleMemory(b, bnIdleFor, bnListenAsync) }

// BenchmarkIdleMemory10000ConnsNoWait is BenchmarkIdleMemory10000Conns
// counted as soon as the last echo is back: the sockets that answered
// last have not been idle long enough to park (or, off Linux, to hand
// their reader over) yet.
func BenchmarkIdleMemory10000ConnsNoWait(b *testing.B) { bnIdleMemory(b, 0, bnListenAsync) }

// BenchmarkIdleMemory10000ConnsReadTimeout is BenchmarkIdleMemory10000Conns
// with a read timeout (a minute, which does not pass while measured) on
// every asynctcp socket, as servers set one to drop idle clients: an idle
// socket parks with a timer for the rest of its timeout. The net server
// sets no deadline.
func BenchmarkIdleMemory10000ConnsReadTimeout(b *testing.B) {
	bnIdleMemory(b, bnIdleFor, func() (*bnServer, error) { return bnListenAsyncWith(asynctcp.ReadTimeout(time.Minute)) })
}

// BenchmarkIdleMemory10000ConnsDisabled is BenchmarkIdleMemory10000Conns
// with reading disabled on every asynctcp socket once it has echoed, as a
// server holding its clients back (a proxy whose other side is slow)
// would: a socket whose reading is disabled has no reader until Enable.
// The sockets, reading nothing, do not see their clients go: Loop.Exit
// ends them.
func BenchmarkIdleMemory10000ConnsDisabled(b *testing.B) {
	bnIdleMemory(b, bnIdleFor, func() (*bnServer, error) {
		l := &asynctcp.Loop{}
		srv, err := bnListenAsyncOn(l, func(s *asynctcp.Socket, data []byte) {
			s.WriteData(data)
			s.Disable(asynctcp.EvRead)
		})
		if err != nil {
			return nil, err
		}
		stop := srv.stop
		srv.stop = func() error {
			l.Exit(nil)
			return stop()
		}
		return srv, nil
	})
}

func bnIdleMemory(b *testing.B, idle time.Duration, async bnListen) {
	bnCompareWith(b, async, func(b *testing.B, listen bnListen) float64 {
		var kib float64
		for range b.N {
			kib += bnIdleOnce(b, listen, 10000, 64, idle)
		}
		kib /= float64(b.N)
		b.ReportMetric(kib, "KiB/conn")
		return kib
	})
}

// bnIdleOnce measures the memory in use per connection for conns
// connections that echoed size bytes each and then sat idle for idle.
func bnIdleOnce(b *testing.B, listen bnListen, conns, size int, idle time.Duration) float64 {
	srv, err := listen()
	if err != nil {
		b.Fatal(err)
	}
	defer func() {
		if err := srv.stop(); err != nil {
			b.Error(err)
		}
	}()
	before := bnInUse()
	child := bnStartChild(b, bnChildConfig{Mode: "idle", Addr: srv.addr, Conns: conns, Size: size})
	defer child.end(b)
	if line := child.next(b, 2*bnStall+bnDialTime(conns)); line != "ready" {
		b.Fatalf("child said %q, want ready", line)
	}
	// An asynctcp socket that ran a callback parks after a few idle
	// milliseconds (on Linux; elsewhere its reader hands over to a fresh
	// goroutine).
	time.Sleep(idle)
	after := bnInUse()
	return (float64(after) - float64(before)) / float64(conns) / 1024
}

// bnIdleFor is how long the connections sit idle before they are counted.
const bnIdleFor = time.Second

// bnInUse returns the heap and stack in use after the garbage is gone.
func bnInUse() uint64 {
	runtime.GC()
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return m.HeapInuse + m.StackInuse
}

// bnChildConfig tells a child what to do (in bnChildEnv, as JSON).
// "pingpong": open Conns connections to Addr, ping-pong Size-byte messages
// on all of them for Warm, then for Dur, and print a bnChildResult.
// "idle": open Conns connections, echo one Size-byte message on each,
// print "ready" and hold them until stdin closes.
type bnChildConfig struct {
	Mode        string
	Addr        string
	Conns, Size int
	Warm, Dur   time.Duration
}

// bnChildResult is what a pingpong child prints: the round trips completed
// in the measured window, its length, and the round trips' latencies.
type bnChildResult struct {
	Msgs         int64
	Secs         float64
	P50us, P99us float64
}

// bnChild is a client child process.
type bnChild struct {
	cmd    *exec.Cmd
	stdin  io.WriteCloser
	lines  chan string // the lines starting with bnChildMark, without it
	done   chan error  // the child's exit, once its stdout is read
	mu     sync.Mutex
	out    bytes.Buffer // all of the child's stdout
	stderr bytes.Buffer
	failed bool // exit has described the child's end in a failure already
}

func bnStartChild(b *testing.B, cfg bnChildConfig) *bnChild {
	b.Helper()
	js, err := json.Marshal(cfg)
	if err != nil {
		b.Fatal(err)
	}
	c := &bnChild{lines: make(chan string, 4), done: make(chan error, 1)}
	c.cmd = exec.Command(os.Args[0], "-test.run=^TestBenchClientChild$")
	c.cmd.Env = append(os.Environ(), bnChildEnv+"="+string(js))
	c.cmd.Stderr = &c.stderr
	if c.stdin, err = c.cmd.StdinPipe(); err != nil {
		b.Fatal(err)
	}
	stdout, err := c.cmd.StdoutPipe()
	if err != nil {
		b.Fatal(err)
	}
	if err := c.cmd.Start(); err != nil {
		b.Fatal(err)
	}
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			line := sc.Text()
			c.mu.Lock()
			c.out.WriteString(line + "\n")
			c.mu.Unlock()
			if rest, ok := strings.CutPrefix(line, bnChildMark); ok {
				select {
				case c.lines <- rest:
				default:
				}
			}
		}
		close(c.lines)
		c.done <- c.cmd.Wait()
	}()
	return c
}

// next returns the child's next line, failing b if it exits or says
// nothing within d.
func (c *bnChild) next(b *testing.B, d time.Duration) string {
	b.Helper()
	select {
	case line, ok := <-c.lines:
		if ok {
			return line
		}
		b.Fatalf("child ended without a word: %s", c.exit(bnStall))
	case <-time.After(d):
		b.Fatalf("child said nothing within %v: %s", d, c.exit(0))
	}
	return ""
}

// end closes the child's stdin and waits for it to exit, failing b if it
// does not exit cleanly within bnStall.
func (c *bnChild) end(b *testing.B) {
	b.Helper()
	c.stdin.Close()
	if c.failed {
		return
	}
	select {
	case err := <-c.done:
		c.done <- err // for exit, should next have failed already
		if err != nil {
			b.Errorf("child: %v\n%s%s", err, c.output(), c.stderr.String())
		}
	case <-time.After(bnStall):
		b.Errorf("child did not exit within %v: %s", bnStall, c.exit(0))
	}
}

// exit waits up to d for the child to end, kills it then, and describes
// how it ended with its output.
func (c *bnChild) exit(d time.Duration) string {
	c.failed = true
	select {
	case err := <-c.done:
		c.done <- err
		return fmt.Sprintf("%v\n%s%s", err, c.output(), c.stderr.String())
	case <-time.After(d):
	}
	c.cmd.Process.Kill()
	err := <-c.done
	c.done <- err
	return fmt.Sprintf("killed (%v)\n%s%s", err, c.output(), c.stderr.String())
}

func (c *bnChild) output() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.out.String()
}

// TestBenchClientChild is the client child process of BenchmarkScaling and
// BenchmarkIdleMemory10000Conns; without bnChildEnv it does nothing.
func TestBenchClientChild(t *testing.T) {
	env := os.Getenv(bnChildEnv)
	if env == "" {
		return
	}
	var cfg bnChildConfig
	if err := json.Unmarshal([]byte(env), &cfg); err != nil {
		t.Fatalf("%s=%q: %v", bnChildEnv, env, err)
	}
	conns, err := bnChildDial(cfg)
	defer func() {
		for _, c := range conns {
			if c != nil {
				c.Close()
			}
		}
	}()
	if err != nil {
		t.Fatal(err)
	}
	switch cfg.Mode {
	case "pingpong":
		r, err := bnChildPingPong(cfg, conns)
		if err != nil {
			t.Fatal(err)
		}
		js, err := json.Marshal(r)
		if err != nil {
			t.Fatal(err)
		}
		fmt.Println(bnChildMark + string(js))
	case "idle":
		fmt.Println(bnChildMark + "ready")
		io.Copy(io.Discard, os.Stdin)
	default:
		t.Fatalf("%s: unknown mode %q", bnChildEnv, cfg.Mode)
	}
}

// bnChildDial opens cfg.Conns connections with bnDialers goroutines,
// echoing one message on each so that the server has set every one up.
// A failed dial is tried again twice, at once: a burst of connections can
// overflow the accept queue.
func bnChildDial(cfg bnChildConfig) ([]net.Conn, error) {
	conns := make([]net.Conn, cfg.Conns)
	var (
		next     atomic.Int64
		wg       sync.WaitGroup
		mu       sync.Mutex
		firstErr error
	)
	for range min(bnDialers, cfg.Conns) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1)) - 1
				if i >= cfg.Conns {
					return
				}
				err := bnChildConnect(cfg, conns, i)
				if err == nil {
					continue
				}
				mu.Lock()
				if firstErr == nil {
					firstErr = fmt.Errorf("connection %d: %w", i, err)
				}
				mu.Unlock()
				next.Store(int64(cfg.Conns)) // stop the other dialers
				return
			}
		}()
	}
	wg.Wait()
	return conns, firstErr
}

func bnChildConnect(cfg bnChildConfig, conns []net.Conn, i int) error {
	var c net.Conn
	var err error
	for range 3 {
		if c, err = net.DialTimeout("tcp", cfg.Addr, bnStall); err == nil {
			break
		}
	}
	if err != nil {
		return err
	}
	conns[i] = c
	if err := c.SetDeadline(time.Now().Add(bnStall)); err != nil {
		return err
	}
	if err := bnRoundTrip(c, bnMessage(i, cfg.Size), make([]byte, cfg.Size), 0); err != nil {
		return err
	}
	return c.SetDeadline(time.Time{})
}

// bnChildPingPong ping-pongs on every connection at once. Throughput
// counts the round trips that end within the window; latency is the
// time of each of them.
func bnChildPingPong(cfg bnChildConfig, conns []net.Conn) (bnChildResult, error) {
	t0 := time.Now()
	from := t0.Add(cfg.Warm)
	until := from.Add(cfg.Dur)
	var (
		wg       sync.WaitGroup
		mu       sync.Mutex
		lats     []time.Duration
		firstErr error
	)
	for i, c := range conns {
		if err := c.SetDeadline(until.Add(bnStall)); err != nil {
			return bnChildResult{}, err
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			out, in := bnMessage(i, cfg.Size), make([]byte, cfg.Size)
			var local []time.Duration
			var err error
			for seq := uint64(1); ; seq++ {
				t := time.Now()
				if err = bnRoundTrip(c, out, in, seq); err != nil {
					break
				}
				end := time.Now()
				if !end.Before(until) {
					break
				}
				if !end.Before(from) {
					local = append(local, end.Sub(t))
				}
			}
			mu.Lock()
			defer mu.Unlock()
			lats = append(lats, local...)
			if err != nil && firstErr == nil {
				firstErr = fmt.Errorf("connection %d: %w", i, err)
			}
		}()
	}
	wg.Wait()
	if firstErr != nil {
		return bnChildResult{}, firstErr
	}
	if len(lats) == 0 {
		return bnChildResult{}, errors.New("no round trip ended in the measured window")
	}
	slices.Sort(lats)
	pct := func(p int) float64 {
		i := (len(lats)*p + 99) / 100 // nearest rank
		return float64(lats[max(i-1, 0)]) / 1e3
	}
	return bnChildResult{Msgs: int64(len(lats)), Secs: cfg.Dur.Seconds(), P50us: pct(50), P99us: pct(99)}, nil
}

// BenchmarkProxyBulk10Conns64KiB is the bulk echo through a proxy in
// front of the plain net echo server: a Pipe proxy on asynctcp against
// the same proxy over plain net with io.Copy both ways (which splices on
// Linux).
func BenchmarkProxyBulk10Conns64KiB(b *testing.B) {
	measure := func(b *testing.B, listen bnListen) float64 { return bnBulk(b, listen, 10, 64<<10) }
	var p bnPair
	b.Run("net", func(b *testing.B) { p.net(b, measure(b, bnListenProxyNet)) })
	b.Run("asynctcp", func(b *testing.B) { p.async(b, "asynctcp", measure(b, bnListenProxyPipe())) })
	b.Run("asynctcp-reuse", func(b *testing.B) {
		p.async(b, "reuse", measure(b, bnListenProxyPipe(asynctcp.ReuseReadBuffer())))
	})
}

// bnListenProxyNet starts a net echo server and, in front of it, a proxy
// over plain net: per connection, a dial to the echo server and io.Copy
// both ways.
func bnListenProxyNet() (*bnServer, error) {
	backend, err := bnListenNet()
	if err != nil {
		return nil, err
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		backend.stop()
		return nil, err
	}
	var (
		mu    sync.Mutex
		conns = map[net.Conn]struct{}{}
		wg    sync.WaitGroup
	)
	track := func(c net.Conn) {
		mu.Lock()
		conns[c] = struct{}{}
		mu.Unlock()
	}
	relay := func(dst, src net.Conn) {
		defer wg.Done()
		io.Copy(dst, src)
		dst.Close()
		src.Close()
	}
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			up, err := net.Dial("tcp", backend.addr)
			if err != nil {
				c.Close()
				continue
			}
			track(c)
			track(up)
			wg.Add(2)
			go relay(up, c)
			go relay(c, up)
		}
	}()
	stop := func() error {
		ln.Close()
		mu.Lock()
		for c := range conns {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
		return backend.stop()
	}
	return &bnServer{addr: ln.Addr().String(), stop: stop}, nil
}

// bnListenProxyPipe returns a bnListen that starts a net echo server and,
// in front of it, a Pipe proxy on a loop of its own; opts go to both
// sockets of each pair.
func bnListenProxyPipe(opts ...asynctcp.Option) bnListen {
	return func() (*bnServer, error) {
		backend, err := bnListenNet()
		if err != nil {
			return nil, err
		}
		l := &asynctcp.Loop{}
		accepted := asynctcp.OnConnect(func(a *asynctcp.Socket) {
			up, err := l.Connect("127.0.0.1", portNumber(backend.addr), nil, func(error) {}, opts...)
			if err != nil {
				a.Abort()
				return
			}
			asynctcp.Pipe(a, up, 64<<10, 256<<10)
		})
		srv, err := l.Listen("127.0.0.1", 0, nil, func(error) {}, append([]asynctcp.Option{accepted}, opts...)...)
		if err != nil {
			backend.stop()
			return nil, err
		}
		stop := func() error {
			srv.Close()
			l.Exit(nil)
			l.Wait()
			return backend.stop()
		}
		return &bnServer{addr: srv.Addr().String(), stop: stop}, nil
	}
}

// portNumber is the port of a host:port address.
func portNumber(addr string) int {
	_, p, _ := net.SplitHostPort(addr)
	n, _ := strconv.Atoi(p)
	return n
}

// BenchmarkStreamProxyBulk10Conns64KiB is BenchmarkProxyBulk10Conns64KiB
// with a proxy written against asynctcp's streams as net.Conns: io.Copy
// both ways between the accepted stream and a stream to the upstream.
func BenchmarkStreamProxyBulk10Conns64KiB(b *testing.B) {
	measure := func(b *testing.B, listen bnListen) float64 { return bnBulk(b, listen, 10, 64<<10) }
	var p bnPair
	b.Run("net", func(b *testing.B) { p.net(b, measure(b, bnListenProxyNet)) })
	b.Run("asynctcp", func(b *testing.B) { p.async(b, "asynctcp", measure(b, bnListenProxyStream)) })
}

// bnListenProxyStream starts a net echo server and, in front of it, a
// proxy on asynctcp streams: per accepted stream, a stream to the echo
// server and io.Copy both ways, each closing the other side at its end.
func bnListenProxyStream() (*bnServer, error) {
	backend, err := bnListenNet()
	if err != nil {
		return nil, err
	}
	l := &asynctcp.Loop{}
	var wg sync.WaitGroup
	relay := func(dst, src *asynctcp.Stream) {
		defer wg.Done()
		io.Copy(dst, src)
		dst.Close()
	}
	accepted := asynctcp.OnConnect(func(a *asynctcp.Socket) {
		up, err := l.ConnectStream("127.0.0.1", portNumber(backend.addr), nil, func(error) {})
		if err != nil {
			a.Abort()
			return
		}
		down := asynctcp.NewStream(a)
		wg.Add(2)
		go relay(up, down)
		go relay(down, up)
	})
	srv, err := l.ListenStream("127.0.0.1", 0, nil, func(error) {}, accepted)
	if err != nil {
		backend.stop()
		return nil, err
	}
	stop := func() error {
		srv.Close()
		l.Exit(nil)
		l.Wait()
		wg.Wait()
		return backend.stop()
	}
	return &bnServer{addr: srv.Addr().String(), stop: stop}, nil
}
