package asynctcp_test

// Tests of rule 22 (SPEC section 5): Wrap adopts a connection of any kind
// and Serve accepts from a listener of any kind, and the rules of section 3
// hold over every one of them, not over TCP alone.

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/asynctcp/asynctcp"
)

// wrTransport is a kind of connection that Wrap adopts and, where it has
// one, a kind of listener that Serve accepts from. Where a rule cannot apply
// to the transport, a why string says so.
type wrTransport struct {
	name string
	// pair connects two ends: mine, to wrap, and the peer's, used raw.
	pair func(t *testing.T) (mine, peer net.Conn)
	// listen gives a listener to serve and a function that dials it; nil
	// where noListener says why.
	listen     func(t *testing.T) (ln net.Listener, dial func() (net.Conn, error))
	noListener string
	// reset makes the peer's end reset the connection; nil where noReset
	// says why.
	reset   func(peer net.Conn) error
	noReset string
	// noBacklog says why no Backlog can be given with this transport.
	noBacklog string
}

func wrTransports() []wrTransport {
	const served = "Serve takes a listener that is already listening: its backlog was fixed by whoever called listen(2), so Backlog on Serve is an error (TestWrapServeMisplacedOptions)"
	return []wrTransport{
		{name: "tcp", pair: wrPairOf(wrTCPListen), listen: wrTCPListen, reset: wrLingerReset, noBacklog: served},
		{
			name: "unix", pair: wrPairOf(wrUnixListen), listen: wrUnixListen,
			noReset:   "a Unix socket has no SO_LINGER, so the peer cannot reset the connection with SetLinger(0)",
			noBacklog: served,
		},
		{name: "tls", pair: wrPairOf(wrTLSListen), listen: wrTLSListen, reset: wrLingerReset, noBacklog: served},
		{
			name: "pipe", pair: wrPipePair,
			noListener: "net.Pipe makes a connected pair in memory; there is no listener to serve",
			noReset:    "net.Pipe cannot be reset: Close is the only way its ends part",
			noBacklog:  "net.Pipe has no listener, so nothing has a backlog",
		},
		{name: "inherited", pair: wrPairOf(wrInheritedListen), listen: wrInheritedListen, reset: wrLingerReset, noBacklog: served},
	}
}

// wrTCPListen listens on a free loopback port.
func wrTCPListen(t *testing.T) (net.Listener, func() (net.Conn, error)) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("listen tcp: %v", err)
	}
	t.Cleanup(func() { ln.Close() })
	addr := ln.Addr().String()
	return ln, func() (net.Conn, error) { return net.DialTimeout("tcp", addr, waitTimeout) }
}

// wrUnixListen listens on a Unix socket in the test's directory.
func wrUnixListen(t *testing.T) (net.Listener, func() (net.Conn, error)) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "s")
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatalf("listen unix %s: %v", path, err)
	}
	t.Cleanup(func() { ln.Close() })
	return ln, func() (net.Conn, error) { return net.DialTimeout("unix", path, waitTimeout) }
}

// wrTLSListen is a tls.NewListener over a loopback TCP listener, dialed by
// tls.Dial with a certificate made for the test.
func wrTLSListen(t *testing.T) (net.Listener, func() (net.Conn, error)) {
	t.Helper()
	inner, _ := wrTCPListen(t)
	srvCfg, cliCfg := wrTLSConfigs(t)
	addr := inner.Addr().String()
	dial := func() (net.Conn, error) {
		return tls.DialWithDialer(&net.Dialer{Timeout: waitTimeout}, "tcp", addr, cliCfg)
	}
	return tls.NewListener(inner, srvCfg), dial
}

// wrInheritedListen rebuilds a listener from a descriptor, as a service
// manager hands one over (systemd's socket activation): only the
// descriptor survives, the listener that made it is closed.
func wrInheritedListen(t *testing.T) (net.Listener, func() (net.Conn, error)) {
	t.Helper()
	orig, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("listen tcp: %v", err)
	}
	f, err := orig.(*net.TCPListener).File()
	if err != nil {
		orig.Close()
		t.Fatalf("listener's file: %v", err)
	}
	ln, err := net.FileListener(f)
	f.Close()
	orig.Close()
	if err != nil {
		t.Fatalf("net.FileListener: %v", err)
	}
	t.Cleanup(func() { ln.Close() })
	addr := ln.Addr().String()
	return ln, func() (net.Conn, error) { return net.DialTimeout("tcp", addr, waitTimeout) }
}

// wrTLSConfigs makes an ECDSA certificate for 127.0.0.1 and localhost and
// the server and client configurations that use it.
func wrTLSConfigs(t *testing.T) (server, client *tls.Config) {
	t.Helper()
	cert, pool, err := newSelfSigned()
	if err != nil {
		t.Fatalf("certificate: %v", err)
	}
	server = &tls.Config{
		Certificates: []tls.Certificate{cert},
		// No session tickets: a client that never reads would leave them
		// unread, and closing a TCP socket with unread input resets the
		// connection instead of ending it with a FIN.
		SessionTicketsDisabled: true,
	}
	client = &tls.Config{RootCAs: pool, ServerName: "localhost"}
	return server, client
}

// wrPairOf makes a pair from a listener: mine is the dialed end, the peer's
// the accepted one (with its TLS handshake done).
func wrPairOf(listen func(t *testing.T) (net.Listener, func() (net.Conn, error))) func(t *testing.T) (net.Conn, net.Conn) {
	return func(t *testing.T) (net.Conn, net.Conn) {
		t.Helper()
		ln, dial := listen(t)
		type accepted struct {
			c   net.Conn
			err error
		}
		ch := make(chan accepted, 1)
		go func() {
			c, err := ln.Accept()
			if tc, ok := c.(*tls.Conn); ok && err == nil {
				ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
				err = tc.HandshakeContext(ctx)
				cancel()
			}
			ch <- accepted{c, err}
		}()
		mine, err := dial()
		if err != nil {
			ln.Close()
			<-ch
			t.Fatalf("dial: %v", err)
		}
		t.Cleanup(func() { mine.Close() })
		a := waitFor(t, ch, "the accepted end of the pair")
		ln.Close()
		if a.err != nil {
			t.Fatalf("accept: %v", a.err)
		}
		t.Cleanup(func() { a.c.Close() })
		return mine, a.c
	}
}

func wrPipePair(t *testing.T) (net.Conn, net.Conn) {
	mine, peer := net.Pipe()
	t.Cleanup(func() {
		mine.Close()
		peer.Close()
	})
	return mine, peer
}

// wrLingerReset resets a TCP connection from the peer's end: SO_LINGER 0,
// then close. Under TLS it resets the TCP conn beneath, with no
// close_notify first.
func wrLingerReset(peer net.Conn) error {
	if tc, ok := peer.(*tls.Conn); ok {
		peer = tc.NetConn()
	}
	tcp, ok := peer.(*net.TCPConn)
	if !ok {
		return fmt.Errorf("%T is not a *net.TCPConn", peer)
	}
	if err := tcp.SetLinger(0); err != nil {
		return err
	}
	return tcp.Close()
}

// wrEvents returns an event-cb that passes every event to the channel.
func wrEvents() (asynctcp.EventFunc, chan error) {
	ch := make(chan error, 16)
	return func(ev error) { ch <- ev }, ch
}

// wrNoMore checks that no further event arrived.
func wrNoMore(t *testing.T, evs <-chan error) {
	t.Helper()
	select {
	case ev := <-evs:
		t.Errorf("a second event: %v (rule 6: at most one)", ev)
	default:
	}
}

// wrReadN reads exactly n bytes from c.
func wrReadN(t *testing.T, c net.Conn, n int, what string) []byte {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(waitTimeout))
	defer c.SetReadDeadline(time.Time{})
	p := make([]byte, n)
	if got, err := io.ReadFull(c, p); err != nil {
		t.Fatalf("%s: read %d of %d bytes: %v", what, got, n, err)
	}
	return p
}

// wrGoWrite writes p to c in the background, in pieces of chunk bytes (a
// net.Pipe write waits for the reader), and closes c after if asked to.
func wrGoWrite(c net.Conn, p []byte, chunk int, closeAfter bool) <-chan error {
	ch := make(chan error, 1)
	go func() {
		c.SetWriteDeadline(time.Now().Add(waitTimeout))
		var err error
		for len(p) > 0 && err == nil {
			n := min(chunk, len(p))
			_, err = c.Write(p[:n])
			p = p[n:]
		}
		if closeAfter {
			if cerr := c.Close(); err == nil {
				err = cerr
			}
		}
		ch <- err
	}()
	return ch
}

func wrSameAddr(a, b net.Addr) bool {
	return a != nil && b != nil && a.Network() == b.Network() && a.String() == b.String()
}

func TestWrapSocketIsUpAtOnce(t *testing.T) {
	for _, tr := range wrTransports() {
		t.Run(tr.name, func(t *testing.T) {
			l := newTestLoop(t)
			mine, peer := tr.pair(t)
			s, err := l.Wrap(mine, nil, nil, asynctcp.Data([]byte("at once")))
			if err != nil {
				t.Fatalf("Wrap: %v", err)
			}
			if got := s.Conn(); got != mine {
				t.Errorf("Conn() when Wrap returned = %v, want the wrapped conn", got)
			}
			if !wrSameAddr(s.LocalAddr(), mine.LocalAddr()) || !wrSameAddr(s.RemoteAddr(), mine.RemoteAddr()) {
				t.Errorf("addresses %v -> %v, want the conn's %v -> %v", s.LocalAddr(), s.RemoteAddr(), mine.LocalAddr(), mine.RemoteAddr())
			}
			if s.Closed() {
				t.Errorf("Closed() = true on a fresh socket")
			}
			if st := l.Stats(); st != (asynctcp.Stats{Wrapped: 1}) {
				t.Errorf("Stats = %+v, want Wrapped 1 only", st)
			}
			// Data goes out with nothing else asked of the socket.
			if got := wrReadN(t, peer, len("at once"), "Data at the peer"); string(got) != "at once" {
				t.Errorf("peer got %q, want %q", got, "at once")
			}
			if err := s.Close(); err != nil {
				t.Fatalf("Close: %v", err)
			}
			if r := waitFor(t, readAllAsync(peer), "the peer's EOF"); r.err != nil || len(r.data) != 0 {
				t.Errorf("peer after Close read %q, %v; want nothing, then EOF", r.data, r.err)
			}
			waitLoopClean(t, l, waitTimeout)
		})
	}
}

func TestWrapConnectCallbackBeforeRead(t *testing.T) {
	for _, tr := range wrTransports() {
		t.Run(tr.name, func(t *testing.T) {
			l := newTestLoop(t)
			mine, peer := tr.pair(t)
			// The peer's bytes are on their way before Wrap: they still
			// wait for the connect-cb.
			wrote := wrGoWrite(peer, []byte("early"), 5, false)
			var (
				mu       sync.Mutex
				order    []string
				got      bytes.Buffer
				cbSocket *asynctcp.Socket
			)
			all := make(chan struct{})
			read := func(s *asynctcp.Socket, data []byte) {
				mu.Lock()
				defer mu.Unlock()
				order = append(order, "read")
				got.Write(data)
				if got.Len() == len("early") {
					close(all)
				}
			}
			connect := func(s *asynctcp.Socket) {
				mu.Lock()
				defer mu.Unlock()
				order = append(order, "connect")
				cbSocket = s
			}
			s, err := l.Wrap(mine, read, nil, asynctcp.OnConnect(connect))
			if err != nil {
				t.Fatalf("Wrap: %v", err)
			}
			waitFor(t, all, "the peer's bytes at the read-cb")
			if err := waitFor(t, wrote, "the peer's write"); err != nil {
				t.Fatalf("peer write: %v", err)
			}
			mu.Lock()
			if len(order) == 0 || order[0] != "connect" || strings.Count(strings.Join(order, " "), "connect") != 1 {
				t.Errorf("callbacks ran in order %v, want the connect-cb once, first", order)
			}
			if cbSocket != s {
				t.Errorf("connect-cb got socket %p, want %p", cbSocket, s)
			}
			if got.String() != "early" {
				t.Errorf("read-cb got %q, want %q", got.String(), "early")
			}
			mu.Unlock()
			s.Close()
			waitLoopClean(t, l, waitTimeout)
		})
	}
}

func TestWrapSendsDataFirstThenWritesInOrder(t *testing.T) {
	for _, tr := range wrTransports() {
		t.Run(tr.name, func(t *testing.T) {
			l := newTestLoop(t)
			mine, peer := tr.pair(t)
			s, err := l.Wrap(mine, nil, nil, asynctcp.Data([]byte("data1,")), asynctcp.Data([]byte("data2;")))
			if err != nil {
				t.Fatalf("Wrap: %v", err)
			}
			big := pattern(3000)
			var want bytes.Buffer
			want.WriteString("data1,data2;")
			if err := s.WriteData(big); err != nil {
				t.Fatalf("WriteData: %v", err)
			}
			want.Write(big)
			if _, err := s.Write([]byte("write;")); err != nil {
				t.Fatalf("Write: %v", err)
			}
			want.WriteString("write;")
			if _, err := s.WriteString("string;"); err != nil {
				t.Fatalf("WriteString: %v", err)
			}
			want.WriteString("string;")
			if err := s.Close(); err != nil {
				t.Fatalf("Close: %v", err)
			}
			r := waitFor(t, readAllAsync(peer), "the peer's read to EOF")
			if r.err != nil {
				t.Errorf("peer read: %v", r.err)
			}
			if !bytes.Equal(r.data, want.Bytes()) {
				t.Errorf("peer got %d bytes (starting %q), want %d: Data, then each write in call order",
					len(r.data), r.data[:min(len(r.data), 20)], want.Len())
			}
			waitLoopClean(t, l, waitTimeout)
		})
	}
}

func TestWrapReadCallbackGetsBytesInOrderAsFreshSlices(t *testing.T) {
	for _, tr := range wrTransports() {
		t.Run(tr.name, func(t *testing.T) {
			l := newTestLoop(t)
			mine, peer := tr.pair(t)
			want := pattern(200 << 10)
			var (
				mu    sync.Mutex
				kept  [][]byte
				total int
			)
			all := make(chan struct{})
			read := func(s *asynctcp.Socket, data []byte) {
				mu.Lock()
				defer mu.Unlock()
				kept = append(kept, data) // kept, not copied: rule 3
				total += len(data)
				if total == len(want) {
					close(all)
				}
			}
			s, err := l.Wrap(mine, read, nil)
			if err != nil {
				t.Fatalf("Wrap: %v", err)
			}
			wrote := wrGoWrite(peer, want, 1000, false)
			waitFor(t, all, "every byte at the read-cb")
			if err := waitFor(t, wrote, "the peer's writes"); err != nil {
				t.Fatalf("peer write: %v", err)
			}
			// Only now look at the slices: had a buffer been reused, the
			// early slices would hold later bytes.
			mu.Lock()
			got := bytes.Join(kept, nil)
			calls := len(kept)
			mu.Unlock()
			if !bytes.Equal(got, want) {
				t.Errorf("the kept slices of %d read-cbs hold %d bytes that differ from the %d sent", calls, len(got), len(want))
			}
			s.Close()
			waitLoopClean(t, l, waitTimeout)
		})
	}
}

func TestWrapWriteCallbackOnDrain(t *testing.T) {
	for _, tr := range wrTransports() {
		t.Run(tr.name, func(t *testing.T) {
			l := newTestLoop(t)
			mine, peer := tr.pair(t)
			drained := make(chan int, 16)
			s, err := l.Wrap(mine, nil, nil, asynctcp.OnWrite(func(s *asynctcp.Socket) { drained <- s.Buffered() }))
			if err != nil {
				t.Fatalf("Wrap: %v", err)
			}
			for round := 0; round < 3; round++ {
				p := pattern(64<<10 + round)
				if err := s.WriteData(p); err != nil {
					t.Fatalf("round %d: WriteData: %v", round, err)
				}
				if got := wrReadN(t, peer, len(p), fmt.Sprintf("round %d at the peer", round)); !bytes.Equal(got, p) {
					t.Fatalf("round %d: the peer got other bytes than written", round)
				}
				if n := waitFor(t, drained, fmt.Sprintf("the write-cb of round %d", round)); n != 0 {
					t.Errorf("round %d: Buffered() in the write-cb = %d, want 0", round, n)
				}
			}
			s.Close()
			waitLoopClean(t, l, waitTimeout)
		})
	}
}

func TestWrapPeerCloseGivesEOFAfterAllData(t *testing.T) {
	for _, tr := range wrTransports() {
		t.Run(tr.name, func(t *testing.T) {
			l := newTestLoop(t)
			mine, peer := tr.pair(t)
			want := pattern(100 << 10)
			type atEvent struct {
				ev  error
				got int
			}
			var (
				mu  sync.Mutex
				got bytes.Buffer
			)
			evs := make(chan atEvent, 4)
			read := func(s *asynctcp.Socket, data []byte) {
				mu.Lock()
				got.Write(data)
				mu.Unlock()
			}
			event := func(ev error) {
				mu.Lock()
				n := got.Len()
				mu.Unlock()
				evs <- atEvent{ev, n}
			}
			s, err := l.Wrap(mine, read, event)
			if err != nil {
				t.Fatalf("Wrap: %v", err)
			}
			wrote := wrGoWrite(peer, want, 4096, true)
			at := waitFor(t, evs, "the EOF event")
			ev := wantEventIs(t, at.ev, asynctcp.ErrTCPEOF, "event after the peer closed")
			if at.got != len(want) {
				t.Errorf("EOF event after %d bytes, want after all %d", at.got, len(want))
			}
			if ev.Socket != s {
				t.Errorf("event's Socket = %p, want %p", ev.Socket, s)
			}
			if ev.Code != -1 {
				t.Errorf("EOF of a peer that closed has Code %d, want -1 (a reset would set it)", ev.Code)
			}
			if err := waitFor(t, wrote, "the peer's writes"); err != nil {
				t.Fatalf("peer write: %v", err)
			}
			waitLoopClean(t, l, waitTimeout)
			if !s.Closed() {
				t.Errorf("Closed() = false after the EOF event and Wait")
			}
			if len(evs) > 0 {
				t.Errorf("a second event: %v (rule 6: at most one)", (<-evs).ev)
			}
			mu.Lock()
			if !bytes.Equal(got.Bytes(), want) {
				t.Errorf("read-cb got %d bytes that differ from the %d sent", got.Len(), len(want))
			}
			mu.Unlock()
		})
	}
}

func TestWrapCloseFlushesQueuedOutput(t *testing.T) {
	for _, tr := range wrTransports() {
		t.Run(tr.name, func(t *testing.T) {
			l := newTestLoop(t)
			mine, peer := tr.pair(t)
			s, err := l.Wrap(mine, nil, nil)
			if err != nil {
				t.Fatalf("Wrap: %v", err)
			}
			want := pattern(1 << 20)
			if err := s.WriteData(want); err != nil {
				t.Fatalf("WriteData: %v", err)
			}
			if err := s.Close(); err != nil {
				t.Fatalf("Close: %v", err)
			}
			if !s.Closed() {
				t.Errorf("Closed() = false right after Close")
			}
			r := waitFor(t, readAllAsync(peer), "the peer's read to EOF")
			if r.err != nil {
				t.Errorf("peer read: %v", r.err)
			}
			if !bytes.Equal(r.data, want) {
				t.Errorf("peer got %d bytes, want the %d queued before Close, in order", len(r.data), len(want))
			}
			waitLoopClean(t, l, waitTimeout)
		})
	}
}

func TestWrapAbortDropsQueuedOutput(t *testing.T) {
	for _, tr := range wrTransports() {
		t.Run(tr.name, func(t *testing.T) {
			l := newTestLoop(t)
			mine, peer := tr.pair(t)
			s, err := l.Wrap(mine, nil, nil)
			if err != nil {
				t.Fatalf("Wrap: %v", err)
			}
			// More than the kernel's buffers hold while the peer does not
			// read, so that most of it is still queued at the Abort.
			const n = 16 << 20
			if err := s.WriteData(make([]byte, n)); err != nil {
				t.Fatalf("WriteData: %v", err)
			}
			if err := s.Abort(); err != nil {
				t.Fatalf("Abort: %v", err)
			}
			if !s.Closed() {
				t.Errorf("Closed() = false right after Abort")
			}
			r := waitFor(t, readAllAsync(peer), "the peer's read to its end")
			if len(r.data) >= n {
				t.Errorf("peer got all %d bytes after Abort, want the queued output dropped", len(r.data))
			}
			t.Logf("peer got %d of %d bytes, then %v", len(r.data), n, r.err)
			waitLoopClean(t, l, waitTimeout)
		})
	}
}

func TestWrapNoCallbackAfterClose(t *testing.T) {
	for _, tr := range wrTransports() {
		t.Run(tr.name, func(t *testing.T) {
			l := newTestLoop(t)
			mine, peer := tr.pair(t)
			var (
				closed atomic.Bool // set once Close has returned
				mu     sync.Mutex
				late   []string
				once   sync.Once
			)
			first := make(chan struct{})
			check := func(what string) {
				if closed.Load() {
					mu.Lock()
					late = append(late, what)
					mu.Unlock()
				}
			}
			read := func(s *asynctcp.Socket, data []byte) {
				check("read-cb")
				once.Do(func() { close(first) })
				s.WriteData(data) // echo, so that write-cbs run too
			}
			s, err := l.Wrap(mine, read, func(error) { check("event-cb") },
				asynctcp.OnWrite(func(*asynctcp.Socket) { check("write-cb") }))
			if err != nil {
				t.Fatalf("Wrap: %v", err)
			}
			// The peer floods the socket and drains its echo until the
			// connection ends.
			stop := make(chan struct{})
			flooded := make(chan error, 1)
			go func() {
				p := pattern(4096)
				for {
					select {
					case <-stop:
						flooded <- nil
						return
					default:
					}
					peer.SetWriteDeadline(time.Now().Add(waitTimeout))
					if _, err := peer.Write(p); err != nil {
						flooded <- nil
						return
					}
				}
			}()
			drained := readAllAsync(peer)
			waitFor(t, first, "the first read-cb")
			if err := s.Close(); err != nil {
				t.Fatalf("Close: %v", err)
			}
			closed.Store(true)
			waitLoopClean(t, l, waitTimeout)
			close(stop)
			peer.Close()
			waitFor(t, flooded, "the peer's writer to end")
			waitFor(t, drained, "the peer's reader to end")
			mu.Lock()
			defer mu.Unlock()
			if len(late) > 0 {
				t.Errorf("callbacks started after Close returned: %v", late)
			}
		})
	}
}

func TestWrapClosedSocketMethodsReturnSocketClosed(t *testing.T) {
	for _, tr := range wrTransports() {
		t.Run(tr.name, func(t *testing.T) {
			l := newTestLoop(t)
			mine, peer := tr.pair(t)
			s, err := l.Wrap(mine, nil, nil)
			if err != nil {
				t.Fatalf("Wrap: %v", err)
			}
			if err := s.Close(); err != nil {
				t.Fatalf("Close: %v", err)
			}
			calls := []struct {
				name string
				f    func() error
			}{
				{"WriteData", func() error { return s.WriteData([]byte("x")) }},
				{"Write", func() error { _, err := s.Write([]byte("x")); return err }},
				{"WriteString", func() error { _, err := s.WriteString("x"); return err }},
				{"SetTimeouts", func() error { return s.SetTimeouts(time.Second, time.Second) }},
				{"Enable", func() error { return s.Enable(asynctcp.EvRead) }},
				{"Disable", func() error { return s.Disable(asynctcp.EvWrite) }},
				{"Close", s.Close},
				{"Abort", s.Abort},
			}
			for _, c := range calls {
				err := c.f()
				if err == nil {
					t.Errorf("%s on a closed socket = nil, want an ErrSocketClosed event", c.name)
					continue
				}
				var ev *asynctcp.Event
				if !errors.As(err, &ev) || !errors.Is(err, asynctcp.ErrSocketClosed) {
					t.Errorf("%s on a closed socket = %v, want an ErrSocketClosed event", c.name, err)
					continue
				}
				if ev.Socket != s {
					t.Errorf("%s: event's Socket = %p, want %p", c.name, ev.Socket, s)
				}
			}
			r := waitFor(t, readAllAsync(peer), "the peer's EOF")
			if len(r.data) != 0 {
				t.Errorf("peer got %q after Close, want nothing: writes on a closed socket queue nothing", r.data)
			}
			waitLoopClean(t, l, waitTimeout)
		})
	}
}

// wrRecord is one write of a concurrent writer: a header (writer, sequence
// number, length) and a body of the writer's own byte.
func wrRecord(w, seq int) []byte {
	n := 500 + (w*131+seq*17)%3000
	p := make([]byte, 5+n)
	p[0] = byte(w)
	binary.BigEndian.PutUint16(p[1:], uint16(seq))
	binary.BigEndian.PutUint16(p[3:], uint16(n))
	for i := 5; i < len(p); i++ {
		p[i] = byte('A' + w)
	}
	return p
}

func TestWrapConcurrentWritersNeverInterleave(t *testing.T) {
	const writers, perWriter = 16, 40
	for _, tr := range wrTransports() {
		t.Run(tr.name, func(t *testing.T) {
			l := newTestLoop(t)
			mine, peer := tr.pair(t)
			s, err := l.Wrap(mine, nil, nil)
			if err != nil {
				t.Fatalf("Wrap: %v", err)
			}
			result := readAllAsync(peer) // before the writes: a net.Pipe write waits for its reader
			start := make(chan struct{})
			var wg sync.WaitGroup
			for w := 0; w < writers; w++ {
				wg.Add(1)
				go func(w int) {
					defer wg.Done()
					<-start
					for i := 0; i < perWriter; i++ {
						if err := s.WriteData(wrRecord(w, i)); err != nil {
							t.Errorf("writer %d: WriteData: %v", w, err)
							return
						}
					}
				}(w)
			}
			close(start)
			waitGroup(t, &wg, "the 16 writers")
			if err := s.Close(); err != nil {
				t.Fatalf("Close: %v", err)
			}
			r := waitFor(t, result, "the peer's read to EOF")
			if r.err != nil {
				t.Errorf("peer read: %v", r.err)
			}
			next := make([]int, writers)
			for p := r.data; len(p) > 0; {
				if len(p) < 5 {
					t.Fatalf("%d stray bytes at the end", len(p))
				}
				w, seq, n := int(p[0]), int(binary.BigEndian.Uint16(p[1:])), int(binary.BigEndian.Uint16(p[3:]))
				if w >= writers || len(p) < 5+n {
					t.Fatalf("a broken record header at offset %d: writes interleaved", len(r.data)-len(p))
				}
				if body := p[5 : 5+n]; !bytes.Equal(body, bytes.Repeat([]byte{byte('A' + w)}, n)) {
					t.Fatalf("record %d of writer %d holds another writer's bytes: writes interleaved", seq, w)
				}
				if seq != next[w] {
					t.Fatalf("writer %d: record %d came where %d was due", w, seq, next[w])
				}
				next[w]++
				p = p[5+n:]
			}
			for w, n := range next {
				if n != perWriter {
					t.Errorf("writer %d: %d records arrived, want %d", w, n, perWriter)
				}
			}
			waitLoopClean(t, l, waitTimeout)
		})
	}
}

func TestWrapDisableEnableReadLosesNothing(t *testing.T) {
	for _, tr := range wrTransports() {
		t.Run(tr.name, func(t *testing.T) {
			l := newTestLoop(t)
			mine, peer := tr.pair(t)
			want := pattern(256 << 10)
			var (
				mu    sync.Mutex
				got   bytes.Buffer
				off   bool // reading is disabled
				calls int
				bad   int // read-cbs that started while reading was disabled
			)
			disabled := make(chan struct{}, 1)
			read := func(s *asynctcp.Socket, data []byte) {
				mu.Lock()
				if off {
					bad++
				}
				got.Write(data)
				calls++
				pause := calls%3 == 1
				mu.Unlock()
				if !pause {
					return
				}
				if err := s.Disable(asynctcp.EvRead); err != nil {
					t.Errorf("Disable(EvRead): %v", err)
					return
				}
				mu.Lock()
				off = true
				mu.Unlock()
				disabled <- struct{}{}
			}
			event, evs := wrEvents()
			s, err := l.Wrap(mine, read, event)
			if err != nil {
				t.Fatalf("Wrap: %v", err)
			}
			wrote := wrGoWrite(peer, want, 4096, true)
			toggles := 0
			for done := false; !done; {
				select {
				case <-disabled:
					toggles++
					mu.Lock()
					off = false
					mu.Unlock()
					if err := s.Enable(asynctcp.EvRead); err != nil {
						t.Fatalf("Enable(EvRead): %v", err)
					}
				case ev := <-evs:
					wantEventIs(t, ev, asynctcp.ErrTCPEOF, "event after the peer closed")
					done = true
				case <-time.After(waitTimeout):
					t.Fatalf("timed out after %v waiting for the EOF (toggled %d times)", waitTimeout, toggles)
				}
			}
			if err := waitFor(t, wrote, "the peer's writes"); err != nil {
				t.Fatalf("peer write: %v", err)
			}
			waitLoopClean(t, l, waitTimeout)
			mu.Lock()
			defer mu.Unlock()
			if toggles == 0 {
				t.Errorf("reading was never disabled")
			}
			if bad > 0 {
				t.Errorf("%d read-cbs started while reading was disabled", bad)
			}
			if !bytes.Equal(got.Bytes(), want) {
				t.Errorf("read-cbs got %d bytes that differ from the %d sent (disabled %d times)", got.Len(), len(want), toggles)
			}
		})
	}
}

func TestWrapReadTimeoutFires(t *testing.T) {
	const timeout = 150 * time.Millisecond
	for _, tr := range wrTransports() {
		t.Run(tr.name, func(t *testing.T) {
			l := newTestLoop(t)
			mine, _ := tr.pair(t)
			event, evs := wrEvents()
			start := time.Now()
			s, err := l.Wrap(mine, nil, event, asynctcp.ReadTimeout(timeout))
			if err != nil {
				t.Fatalf("Wrap: %v", err)
			}
			ev := wantEventIs(t, waitFor(t, evs, "the read timeout"), asynctcp.ErrTCPTimeout, "event of a silent peer")
			if elapsed := time.Since(start); elapsed < timeout {
				t.Errorf("timed out after %v, before the read timeout of %v", elapsed, timeout)
			}
			if ev.Code != -1 {
				t.Errorf("timeout event's Code = %d, want -1", ev.Code)
			}
			if ev.Socket != s {
				t.Errorf("event's Socket = %p, want %p", ev.Socket, s)
			}
			waitLoopClean(t, l, waitTimeout)
			if !s.Closed() {
				t.Errorf("Closed() = false after the timeout")
			}
			wrNoMore(t, evs)
		})
	}
}

func TestWrapResetIsEOFWithCode(t *testing.T) {
	for _, tr := range wrTransports() {
		t.Run(tr.name, func(t *testing.T) {
			if tr.reset == nil {
				t.Logf("rule does not apply: %s", tr.noReset)
				return
			}
			l := newTestLoop(t)
			mine, peer := tr.pair(t)
			event, evs := wrEvents()
			s, err := l.Wrap(mine, nil, event)
			if err != nil {
				t.Fatalf("Wrap: %v", err)
			}
			if err := tr.reset(peer); err != nil {
				t.Fatalf("reset: %v", err)
			}
			ev := wantEventIs(t, waitFor(t, evs, "the reset's event"), asynctcp.ErrTCPEOF, "event of a reset")
			if ev.Code != int(syscall.ECONNRESET) {
				t.Errorf("reset's Code = %d, want ECONNRESET (%d)", ev.Code, int(syscall.ECONNRESET))
			}
			if !errors.Is(ev, syscall.ECONNRESET) {
				t.Errorf("errors.Is(%v, ECONNRESET) = false", ev)
			}
			if ev.Socket != s {
				t.Errorf("event's Socket = %p, want %p", ev.Socket, s)
			}
			waitLoopClean(t, l, waitTimeout)
			if !s.Closed() {
				t.Errorf("Closed() = false after the reset")
			}
			wrNoMore(t, evs)
		})
	}
}

func TestWrapStreamReadsAndWrites(t *testing.T) {
	for _, tr := range wrTransports() {
		t.Run(tr.name, func(t *testing.T) {
			l := newTestLoop(t)
			mine, peer := tr.pair(t)
			notified := make(chan struct{}, 1)
			notify := func(s *asynctcp.Socket, st *asynctcp.Stream) {
				select {
				case notified <- struct{}{}:
				default:
				}
			}
			event, evs := wrEvents()
			st, err := l.WrapStream(mine, notify, event, asynctcp.Data([]byte("hello;")))
			if err != nil {
				t.Fatalf("WrapStream: %v", err)
			}
			if got := st.Socket().Conn(); got != mine {
				t.Errorf("Conn() when WrapStream returned = %v, want the wrapped conn", got)
			}
			if s := l.Stats(); s != (asynctcp.Stats{Wrapped: 1}) {
				t.Errorf("Stats = %+v, want Wrapped 1 only", s)
			}
			if got := wrReadN(t, peer, 6, "Data at the peer"); string(got) != "hello;" {
				t.Errorf("peer got %q, want %q", got, "hello;")
			}
			wrote := wrGoWrite(peer, []byte("ping"), 4, false)
			waitFor(t, notified, "the stream's read-cb")
			st.SetReadDeadline(time.Now().Add(waitTimeout))
			buf := make([]byte, 4)
			if _, err := io.ReadFull(st, buf); err != nil || string(buf) != "ping" {
				t.Fatalf("Stream.Read = %q, %v; want %q", buf, err, "ping")
			}
			if err := waitFor(t, wrote, "the peer's write"); err != nil {
				t.Fatalf("peer write: %v", err)
			}
			done := make(chan error, 1)
			go func() {
				_, err := st.Write([]byte("pong"))
				done <- err
			}()
			if got := wrReadN(t, peer, 4, "the stream's write at the peer"); string(got) != "pong" {
				t.Errorf("peer got %q, want %q", got, "pong")
			}
			if err := waitFor(t, done, "Stream.Write"); err != nil {
				t.Fatalf("Stream.Write: %v", err)
			}
			wrote = wrGoWrite(peer, []byte("bye"), 3, true)
			rest, err := io.ReadAll(st)
			if err != nil || string(rest) != "bye" {
				t.Errorf("Stream read to EOF = %q, %v; want %q, then io.EOF", rest, err, "bye")
			}
			wantEventIs(t, waitFor(t, evs, "the EOF event"), asynctcp.ErrTCPEOF, "event after the peer closed")
			if err := waitFor(t, wrote, "the peer's write"); err != nil {
				t.Fatalf("peer write: %v", err)
			}
			if err := st.Close(); err != nil {
				t.Errorf("Stream.Close after the peer's EOF = %v, want nil (rule 15)", err)
			}
			waitLoopClean(t, l, waitTimeout)
			wrNoMore(t, evs)
		})
	}
}

// wrServeTransports runs f for each transport that has a listener, and says
// why for the others.
func wrServeTransports(t *testing.T, f func(t *testing.T, ln net.Listener, dial func() (net.Conn, error))) {
	for _, tr := range wrTransports() {
		t.Run(tr.name, func(t *testing.T) {
			if tr.listen == nil {
				t.Logf("rule does not apply: %s", tr.noListener)
				return
			}
			ln, dial := tr.listen(t)
			f(t, ln, dial)
		})
	}
}

// wrDial dials, failing the test on an error; the conn is closed at the
// end of the test.
func wrDial(t *testing.T, dial func() (net.Conn, error)) net.Conn {
	t.Helper()
	c, err := dial()
	if err != nil {
		t.Fatalf("dial: %v", err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func TestServeAcceptedSocketsGetCallbacksAndOptions(t *testing.T) {
	const timeout = 300 * time.Millisecond
	wrServeTransports(t, func(t *testing.T, ln net.Listener, dial func() (net.Conn, error)) {
		l := newTestLoop(t)
		connected := make(chan *asynctcp.Socket, 1)
		event, evs := wrEvents()
		srv, err := l.Serve(ln, echoBack, event,
			asynctcp.OnConnect(func(s *asynctcp.Socket) { connected <- s }),
			asynctcp.ReadTimeout(timeout))
		if err != nil {
			t.Fatalf("Serve: %v", err)
		}
		if !wrSameAddr(srv.Addr(), ln.Addr()) {
			t.Errorf("Server.Addr = %v, want the listener's %v", srv.Addr(), ln.Addr())
		}
		c := wrDial(t, dial)
		s := waitFor(t, connected, "the accepted socket's connect-cb")
		if s.Conn() == nil {
			t.Errorf("Conn() = nil in the connect-cb's socket")
		}
		if _, err := c.Write([]byte("echo me")); err != nil {
			t.Fatalf("client write: %v", err)
		}
		if got := wrReadN(t, c, 7, "the echo"); string(got) != "echo me" {
			t.Errorf("echo = %q, want %q", got, "echo me")
		}
		if st := l.Stats(); st != (asynctcp.Stats{Incoming: 1, Servers: 1}) {
			t.Errorf("Stats = %+v, want Incoming 1, Servers 1", st)
		}
		// The client is silent now: the server's ReadTimeout ends the
		// accepted socket.
		ev := wantEventIs(t, waitFor(t, evs, "the accepted socket's read timeout"), asynctcp.ErrTCPTimeout, "event of a silent client")
		if ev.Socket != s {
			t.Errorf("event's Socket = %p, want the accepted socket %p", ev.Socket, s)
		}
		if r := waitFor(t, readAllAsync(c), "the client's EOF"); len(r.data) != 0 {
			t.Errorf("client got %q after the timeout, want the end", r.data)
		}
		if err := srv.Close(); err != nil {
			t.Fatalf("Server.Close: %v", err)
		}
		waitLoopClean(t, l, waitTimeout)
		wrNoMore(t, evs)
	})
}

func TestServeCloseClosesListenerLeavesSocketsRunning(t *testing.T) {
	wrServeTransports(t, func(t *testing.T, ln net.Listener, dial func() (net.Conn, error)) {
		l := newTestLoop(t)
		connected := make(chan *asynctcp.Socket, 1)
		event, evs := wrEvents()
		srv, err := l.Serve(ln, echoBack, event, asynctcp.OnConnect(func(s *asynctcp.Socket) { connected <- s }))
		if err != nil {
			t.Fatalf("Serve: %v", err)
		}
		c := wrDial(t, dial)
		s := waitFor(t, connected, "the accepted socket's connect-cb")
		if err := srv.Close(); err != nil {
			t.Fatalf("Server.Close: %v", err)
		}
		if !srv.Closed() {
			t.Errorf("Server.Closed() = false after Close")
		}
		if c2, err := dial(); err == nil {
			c2.Close()
			t.Errorf("a dial after Server.Close succeeded: the listener is still open")
		}
		if _, err := ln.Accept(); !errors.Is(err, net.ErrClosed) {
			t.Errorf("Accept on the served listener after Server.Close = %v, want net.ErrClosed", err)
		}
		if s.Closed() {
			t.Errorf("the accepted socket is closed after Server.Close")
		}
		if _, err := c.Write([]byte("still here")); err != nil {
			t.Fatalf("client write: %v", err)
		}
		if got := wrReadN(t, c, 10, "the echo after Server.Close"); string(got) != "still here" {
			t.Errorf("echo = %q, want %q", got, "still here")
		}
		c.Close()
		wantEventIs(t, waitFor(t, evs, "the accepted socket's EOF"), asynctcp.ErrTCPEOF, "event after the client closed")
		waitLoopClean(t, l, waitTimeout)
		wrNoMore(t, evs)
	})
}

func TestServeShutdownWaitsForSockets(t *testing.T) {
	wrServeTransports(t, func(t *testing.T, ln net.Listener, dial func() (net.Conn, error)) {
		l := newTestLoop(t)
		connected := make(chan *asynctcp.Socket, 1)
		event, evs := wrEvents()
		srv, err := l.Serve(ln, nil, event, asynctcp.OnConnect(func(s *asynctcp.Socket) { connected <- s }))
		if err != nil {
			t.Fatalf("Serve: %v", err)
		}
		c := wrDial(t, dial)
		s := waitFor(t, connected, "the accepted socket's connect-cb")
		ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
		err = srv.Shutdown(ctx)
		cancel()
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Errorf("Shutdown with a socket open = %v, want it to wait until its context ends", err)
		}
		if s.Closed() {
			t.Errorf("Shutdown closed the accepted socket")
		}
		done := make(chan error, 1)
		go func() {
			ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
			defer cancel()
			done <- srv.Shutdown(ctx)
		}()
		c.Close()
		if err := waitFor(t, done, "Shutdown after the client closed"); err != nil {
			t.Errorf("Shutdown = %v, want nil once its socket closed", err)
		}
		if !s.Closed() {
			t.Errorf("Shutdown returned with its socket open")
		}
		wantEventIs(t, waitFor(t, evs, "the accepted socket's EOF"), asynctcp.ErrTCPEOF, "event after the client closed")
		waitLoopClean(t, l, waitTimeout)
	})
}

func TestServeStreamEchoes(t *testing.T) {
	wrServeTransports(t, func(t *testing.T, ln net.Listener, dial func() (net.Conn, error)) {
		l := newTestLoop(t)
		connected := make(chan *asynctcp.Socket, 1)
		event, evs := wrEvents()
		echo := func(s *asynctcp.Socket, st *asynctcp.Stream) {
			buf := make([]byte, 4096)
			for {
				n, err := st.TryRead(buf)
				if n == 0 || err != nil {
					return
				}
				if _, err := st.Write(buf[:n]); err != nil {
					t.Errorf("Stream.Write: %v", err)
					return
				}
			}
		}
		srv, err := l.ServeStream(ln, echo, event, asynctcp.OnConnect(func(s *asynctcp.Socket) { connected <- s }))
		if err != nil {
			t.Fatalf("ServeStream: %v", err)
		}
		if !wrSameAddr(srv.Addr(), ln.Addr()) {
			t.Errorf("Server.Addr = %v, want the listener's %v", srv.Addr(), ln.Addr())
		}
		c := wrDial(t, dial)
		waitFor(t, connected, "the accepted socket's connect-cb")
		msg := pattern(50 << 10)
		wrote := wrGoWrite(c, msg, 1000, false)
		if got := wrReadN(t, c, len(msg), "the echo"); !bytes.Equal(got, msg) {
			t.Errorf("the echo differs from what was sent")
		}
		if err := waitFor(t, wrote, "the client's writes"); err != nil {
			t.Fatalf("client write: %v", err)
		}
		if st := l.Stats(); st != (asynctcp.Stats{Incoming: 1, Servers: 1}) {
			t.Errorf("Stats = %+v, want Incoming 1, Servers 1", st)
		}
		c.Close()
		wantEventIs(t, waitFor(t, evs, "the accepted socket's EOF"), asynctcp.ErrTCPEOF, "event after the client closed")
		ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
		defer cancel()
		if err := srv.Shutdown(ctx); err != nil {
			t.Errorf("Shutdown: %v", err)
		}
		waitLoopClean(t, l, waitTimeout)
		wrNoMore(t, evs)
	})
}

func TestStatsWrappedCountsWrapSockets(t *testing.T) {
	for _, tr := range wrTransports() {
		t.Run(tr.name, func(t *testing.T) {
			l := newTestLoop(t)
			mine1, _ := tr.pair(t)
			mine2, _ := tr.pair(t)
			s, err := l.Wrap(mine1, nil, nil)
			if err != nil {
				t.Fatalf("Wrap: %v", err)
			}
			st, err := l.WrapStream(mine2, nil, nil)
			if err != nil {
				t.Fatalf("WrapStream: %v", err)
			}
			want := asynctcp.Stats{Wrapped: 2}
			var (
				srv *asynctcp.Server
				acc *asynctcp.Socket
			)
			if tr.listen != nil {
				ln, dial := tr.listen(t)
				connected := make(chan *asynctcp.Socket, 1)
				srv, err = l.Serve(ln, nil, nil, asynctcp.OnConnect(func(s *asynctcp.Socket) { connected <- s }))
				if err != nil {
					t.Fatalf("Serve: %v", err)
				}
				wrDial(t, dial)
				acc = waitFor(t, connected, "the accepted socket's connect-cb")
				want = asynctcp.Stats{Wrapped: 2, Incoming: 1, Servers: 1}
			} else {
				t.Logf("no Serve: %s", tr.noListener)
			}
			if got := l.Stats(); got != want {
				t.Errorf("Stats = %+v, want %+v", got, want)
			}
			if err := s.Close(); err != nil {
				t.Errorf("Close: %v", err)
			}
			if err := st.Close(); err != nil {
				t.Errorf("Stream.Close: %v", err)
			}
			if srv != nil {
				srv.Close()
				acc.Close()
			}
			waitLoopClean(t, l, waitTimeout) // and Stats is zero then
		})
	}
}

func TestWrapServeMisplacedOptions(t *testing.T) {
	l := newTestLoop(t)
	for _, tr := range wrTransports() {
		t.Logf("Backlog with %s: %s", tr.name, tr.noBacklog)
	}

	// Each call, on l and on the package (DefaultLoop), gets a conn or
	// listener of its own. Should a call succeed where it must not, what it
	// made is closed at once, and the loop it used is waited for.
	var wrongly sync.Map // *asynctcp.Loop -> true: a call made something there
	pipe := func(t *testing.T) net.Conn { mine, _ := wrPipePair(t); return mine }
	listener := func(t *testing.T) net.Listener { ln, _ := wrTCPListen(t); return ln }
	type callFunc func(t *testing.T, opts ...asynctcp.Option) error
	wrap := func(lp *asynctcp.Loop, f func(net.Conn, asynctcp.ReadFunc, asynctcp.EventFunc, ...asynctcp.Option) (*asynctcp.Socket, error)) callFunc {
		return func(t *testing.T, opts ...asynctcp.Option) error {
			s, err := f(pipe(t), nil, nil, opts...)
			if err == nil {
				wrongly.Store(lp, true)
				s.Abort()
			}
			return err
		}
	}
	wrapStream := func(lp *asynctcp.Loop, f func(net.Conn, asynctcp.StreamFunc, asynctcp.EventFunc, ...asynctcp.Option) (*asynctcp.Stream, error)) callFunc {
		return func(t *testing.T, opts ...asynctcp.Option) error {
			st, err := f(pipe(t), nil, nil, opts...)
			if err == nil {
				wrongly.Store(lp, true)
				st.Socket().Abort()
			}
			return err
		}
	}
	serve := func(lp *asynctcp.Loop, f func(net.Listener, asynctcp.ReadFunc, asynctcp.EventFunc, ...asynctcp.Option) (*asynctcp.Server, error)) callFunc {
		return func(t *testing.T, opts ...asynctcp.Option) error {
			srv, err := f(listener(t), nil, nil, opts...)
			if err == nil {
				wrongly.Store(lp, true)
				srv.Close()
			}
			return err
		}
	}
	serveStream := func(lp *asynctcp.Loop, f func(net.Listener, asynctcp.StreamFunc, asynctcp.EventFunc, ...asynctcp.Option) (*asynctcp.Server, error)) callFunc {
		return func(t *testing.T, opts ...asynctcp.Option) error {
			srv, err := f(listener(t), nil, nil, opts...)
			if err == nil {
				wrongly.Store(lp, true)
				srv.Close()
			}
			return err
		}
	}

	type named struct {
		name string
		opt  asynctcp.Option
	}
	notOnWrap := []named{
		{"Dialer", asynctcp.Dialer(&net.Dialer{})},
		{"Backlog", asynctcp.Backlog(16)},
		{"TLS", asynctcp.TLS(&tls.Config{})},
		{"OnRead", asynctcp.OnRead(nil)},
		{"OnEvent", asynctcp.OnEvent(nil)},
	}
	notOnServe := append(notOnWrap[:len(notOnWrap):len(notOnWrap)], named{"Data", asynctcp.Data([]byte("x"))})
	d := asynctcp.DefaultLoop
	calls := []struct {
		name      string
		f         callFunc
		misplaced []named
	}{
		{"Loop.Wrap", wrap(l, l.Wrap), notOnWrap},
		{"Loop.WrapStream", wrapStream(l, l.WrapStream), notOnWrap},
		{"Loop.Serve", serve(l, l.Serve), notOnServe},
		{"Loop.ServeStream", serveStream(l, l.ServeStream), notOnServe},
		{"Wrap", wrap(d, asynctcp.Wrap), notOnWrap},
		{"WrapStream", wrapStream(d, asynctcp.WrapStream), notOnWrap},
		{"Serve", serve(d, asynctcp.Serve), notOnServe},
		{"ServeStream", serveStream(d, asynctcp.ServeStream), notOnServe},
	}
	for _, c := range calls {
		for _, o := range c.misplaced {
			err := c.f(t, asynctcp.OnConnect(nil), o.opt)
			switch {
			case err == nil:
				t.Errorf("%s with %s = nil error, want an error naming %s", c.name, o.name, o.name)
			case !strings.Contains(err.Error(), o.name):
				t.Errorf("%s with %s = %q, want an error naming %s", c.name, o.name, err, o.name)
			}
		}
	}

	nilArgs := []struct {
		name string
		err  error
	}{
		{"Loop.Wrap(nil)", func() error { _, err := l.Wrap(nil, nil, nil); return err }()},
		{"Loop.WrapStream(nil)", func() error { _, err := l.WrapStream(nil, nil, nil); return err }()},
		{"Loop.Serve(nil)", func() error { _, err := l.Serve(nil, nil, nil); return err }()},
		{"Loop.ServeStream(nil)", func() error { _, err := l.ServeStream(nil, nil, nil); return err }()},
		{"Wrap(nil)", func() error { _, err := asynctcp.Wrap(nil, nil, nil); return err }()},
		{"WrapStream(nil)", func() error { _, err := asynctcp.WrapStream(nil, nil, nil); return err }()},
		{"Serve(nil)", func() error { _, err := asynctcp.Serve(nil, nil, nil); return err }()},
		{"ServeStream(nil)", func() error { _, err := asynctcp.ServeStream(nil, nil, nil); return err }()},
	}
	for _, c := range nilArgs {
		if c.err == nil {
			t.Errorf("%s = nil error, want an error", c.name)
		}
	}
	if _, ok := wrongly.Load(l); !ok {
		if st := l.Stats(); st != (asynctcp.Stats{}) {
			t.Errorf("Stats after refused calls = %+v, want all zero", st)
		}
	}
	if _, ok := wrongly.Load(d); ok {
		waitLoopClean(t, d, waitTimeout)
	}
	waitLoopClean(t, l, waitTimeout)

	// Data belongs on Wrap and WrapStream: it is sent at once.
	mine, peer := wrPipePair(t)
	s, err := l.Wrap(mine, nil, nil, asynctcp.Data([]byte("wrap;")))
	if err != nil {
		t.Fatalf("Wrap with Data: %v", err)
	}
	if got := wrReadN(t, peer, 5, "Wrap's Data"); string(got) != "wrap;" {
		t.Errorf("peer got %q, want %q", got, "wrap;")
	}
	s.Close()
	mine, peer = wrPipePair(t)
	st, err := l.WrapStream(mine, nil, nil, asynctcp.Data([]byte("stream;")))
	if err != nil {
		t.Fatalf("WrapStream with Data: %v", err)
	}
	if got := wrReadN(t, peer, 7, "WrapStream's Data"); string(got) != "stream;" {
		t.Errorf("peer got %q, want %q", got, "stream;")
	}
	st.Close()
	waitLoopClean(t, l, waitTimeout)
}
