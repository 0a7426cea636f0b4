package main

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// timeout bounds every wait of these tests.
const timeout = 20 * time.Second

// syncBuffer is an io.Writer that the test may read while run writes.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// freeAddr returns a loopback address that nothing listens on right now.
func freeAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	return addr
}

// dialUntil dials addr until it answers or the deadline passes.
func dialUntil(t *testing.T, addr string, deadline time.Time) net.Conn {
	t.Helper()
	for {
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err == nil {
			c.SetDeadline(deadline)
			return c
		}
		if time.Now().After(deadline) {
			t.Fatalf("dial %s: %v", addr, err)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// backend runs a TCP server on loopback that hands each connection to
// handle, and waits for the handlers when the test ends.
func backend(t *testing.T, handle func(net.Conn)) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer c.Close()
				c.SetDeadline(time.Now().Add(timeout))
				handle(c)
			}()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		wg.Wait()
	})
	return ln.Addr().String()
}

func echo(c net.Conn) { io.Copy(c, c) }

// startProxy runs the proxy with args until the test ends; it returns the
// address it listens on, its output and its result.
func startProxy(t *testing.T, args ...string) (addr string, out *syncBuffer, stop func() error) {
	t.Helper()
	addr = freeAddr(t)
	out = &syncBuffer{}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- run(ctx, out, append([]string{"-listen", addr}, args...)) }()
	stopped := false
	stop = func() error {
		t.Helper()
		cancel()
		if stopped {
			return nil
		}
		stopped = true
		select {
		case err := <-done:
			return err
		case <-time.After(timeout):
			t.Fatalf("run did not return after cancel\noutput:\n%s", out.String())
		}
		return nil
	}
	t.Cleanup(func() { stop() })
	return addr, out, stop
}

// pattern returns n bytes that do not repeat with a short period.
func pattern(n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(i*7 + i/251)
	}
	return b
}

// exchange writes msg to c while it reads back len(msg) bytes.
func exchange(c net.Conn, msg []byte) ([]byte, error) {
	werr := make(chan error, 1)
	go func() {
		_, err := c.Write(msg)
		werr <- err
	}()
	got := make([]byte, len(msg))
	_, rerr := io.ReadFull(c, got)
	return got, errors.Join(rerr, <-werr)
}

// mustExchange is exchange on the test's goroutine.
func mustExchange(t *testing.T, c net.Conn, msg []byte) string {
	t.Helper()
	got, err := exchange(c, msg)
	if err != nil {
		t.Fatalf("exchange through the proxy: %v", err)
	}
	return string(got)
}

func TestProxyRelaysBothWays(t *testing.T) {
	to := backend(t, echo)
	addr, out, stop := startProxy(t, "-to", to)
	deadline := time.Now().Add(timeout)

	// Several clients at once, each with a pair of sockets of its own.
	c := dialUntil(t, addr, deadline) // the proxy is up
	if got := mustExchange(t, c, []byte("first")); got != "first" {
		t.Errorf("echo %q", got)
	}
	c.Close()
	var wg sync.WaitGroup
	for i := 0; i < 4; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c, err := net.DialTimeout("tcp", addr, timeout)
			if err != nil {
				t.Errorf("client %d: %v", i, err)
				return
			}
			defer c.Close()
			c.SetDeadline(deadline)
			msg := pattern(1<<20 + i)
			got, err := exchange(c, msg)
			if err != nil {
				t.Errorf("client %d: %v", i, err)
			} else if !bytes.Equal(got, msg) {
				t.Errorf("client %d: the echo through the proxy differs", i)
			}
		}()
	}
	wg.Wait()

	if err := stop(); err != nil {
		t.Fatalf("run: %v\noutput:\n%s", err, out.String())
	}
	for _, want := range []string{"proxying " + addr + " to " + to, "closing proxy", "closed"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("output lacks %q:\n%s", want, out.String())
		}
	}
}

// TestProxyBackPressure: while the backend does not read, the proxy stops
// reading from the client once the upstream has -high bytes queued, so its
// memory stays bounded however much the client sends; once the backend
// reads, every byte arrives, in order.
func TestProxyBackPressure(t *testing.T) {
	const total = 16 << 20
	const high = 64 << 10
	gate := make(chan struct{})
	received := make(chan []byte, 1)
	to := backend(t, func(c net.Conn) {
		<-gate
		b := make([]byte, total)
		n, _ := io.ReadFull(c, b)
		received <- b[:n]
	})
	cfg, err := parse(io.Discard, []string{"-listen", freeAddr(t), "-to", to, "-high", "65536", "-low", "16384"})
	if err != nil {
		t.Fatal(err)
	}
	var out syncBuffer
	px, err := newProxy(cfg, &out)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- px.serve(ctx) }()

	deadline := time.Now().Add(timeout)
	c := dialUntil(t, cfg.listen, deadline)
	defer c.Close()
	msg := pattern(total)
	werr := make(chan error, 1)
	go func() {
		_, err := c.Write(msg)
		werr <- err
	}()
	// While the backend does not read, the pair's queues stay bounded and
	// the client cannot send everything: Pipe has paused its reading.
	watch := time.Now().Add(time.Second)
	for time.Now().Before(watch) {
		px.queued()
		time.Sleep(2 * time.Millisecond)
	}
	up, _ := px.totals()
	if up >= total {
		t.Fatalf("the proxy relayed all %d bytes to a backend that did not read (max queued %d)", up, px.maxQueued.Load())
	}
	close(gate)
	select {
	case got := <-received:
		if !bytes.Equal(got, msg) {
			t.Errorf("backend got %d bytes, want %d, equal %v", len(got), len(msg), bytes.Equal(got, msg))
		}
	case <-time.After(timeout):
		t.Fatal("the backend did not get every byte")
	}
	if err := <-werr; err != nil {
		t.Fatalf("client write: %v", err)
	}
	c.Close()
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("serve: %v\n%s", err, out.String())
		}
	case <-time.After(timeout):
		t.Fatal("serve did not return after cancel")
	}
	// A read (at most 32 KiB) may land on top of a queue just under the
	// high watermark, and the write-cb that enables the client may let one
	// more read land on top of that.
	const bound = high + 2*64<<10
	if m := px.maxQueued.Load(); m >= bound {
		t.Errorf("up to %d bytes queued on the upstream, want under %d", m, bound)
	}
	t.Logf("at most %d bytes queued on one socket while the backend did not read", px.maxQueued.Load())
}

func TestProxyDebugDumpsTraffic(t *testing.T) {
	to := backend(t, echo)
	addr, out, stop := startProxy(t, "-to", to, "-debug")
	c := dialUntil(t, addr, time.Now().Add(timeout))
	if got := mustExchange(t, c, []byte("hello")); got != "hello" {
		t.Errorf("echo %q", got)
	}
	local := c.LocalAddr().String()
	c.Close()
	// The proxy reports the client's end before it stops.
	deadline := time.Now().Add(timeout)
	for !strings.Contains(out.String(), "client "+local+" closed") && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	if err := stop(); err != nil {
		t.Fatalf("run: %v", err)
	}
	got := out.String()
	for _, want := range []string{
		"--- " + local + " connected ---",
		"--- " + local + " -> " + to + " (5 bytes) ---",
		"--- " + to + " -> " + local + " (5 bytes) ---",
		"00000000  68 65 6c 6c 6f                                    |hello|",
		"--- client " + local + " closed ---",
	} {
		if !strings.Contains(got, want) {
			t.Errorf("output lacks %q:\n%s", want, got)
		}
	}
}

func TestProxyStats(t *testing.T) {
	to := backend(t, echo)
	addr, out, stop := startProxy(t, "-to", to, "-stats", "-interval", "20ms")
	c := dialUntil(t, addr, time.Now().Add(timeout))
	defer c.Close()
	mustExchange(t, c, pattern(64<<10))
	deadline := time.Now().Add(timeout)
	for !strings.Contains(out.String(), "incoming: 1  outgoing: 1") && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	c.Close()
	if err := stop(); err != nil {
		t.Fatalf("run: %v", err)
	}
	if got := out.String(); !strings.Contains(got, "incoming: 1  outgoing: 1  client->upstream: ") {
		t.Errorf("no stats line with the open pair:\n%s", got)
	}
}

// TestProxyClosesClientWhenUpstreamRefuses: a client whose upstream cannot
// be reached is closed, and the refusal is printed.
func TestProxyClosesClientWhenUpstreamRefuses(t *testing.T) {
	addr, out, stop := startProxy(t, "-to", freeAddr(t))
	c := dialUntil(t, addr, time.Now().Add(timeout))
	defer c.Close()
	if _, err := io.ReadAll(c); err != nil {
		t.Errorf("client read %v, want EOF", err)
	}
	if err := stop(); err != nil {
		t.Fatalf("run: %v", err)
	}
	if got := out.String(); !strings.Contains(got, "upstream: asynctcp: tcp-refused") {
		t.Errorf("output lacks the refusal:\n%s", got)
	}
}

// TestProxyCutsConnectionsAfterGrace: an open connection keeps the proxy
// running for -grace after it was interrupted, then it is cut.
func TestProxyCutsConnectionsAfterGrace(t *testing.T) {
	to := backend(t, echo)
	addr, out, stop := startProxy(t, "-to", to, "-grace", "100ms")
	c := dialUntil(t, addr, time.Now().Add(timeout))
	defer c.Close()
	mustExchange(t, c, []byte("still here"))
	start := time.Now()
	if err := stop(); err != nil {
		t.Fatalf("run: %v\n%s", err, out.String())
	}
	if d := time.Since(start); d < 100*time.Millisecond {
		t.Errorf("run returned %v after cancel, before the grace period", d)
	}
	if _, err := io.ReadAll(c); err != nil && !errors.Is(err, net.ErrClosed) && !strings.Contains(err.Error(), "reset") {
		t.Errorf("client read %v after the cut", err)
	}
}

func TestProxyFlags(t *testing.T) {
	for _, args := range [][]string{
		{},                // no -to
		{"-to", "nohost"}, // no port
		{"-to", "127.0.0.1:1", "-listen", "x"},
		{"-to", "127.0.0.1:1", "-low", "10", "-high", "5"},
		{"-to", "127.0.0.1:1", "extra"},
		{"-no-such-flag"},
	} {
		if err := run(context.Background(), io.Discard, args); err == nil {
			t.Errorf("run %q = nil, want an error", args)
		}
	}
}
