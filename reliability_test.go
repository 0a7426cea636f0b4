package asynctcp_test

// Reliability: what real networks and careless callers do to a socket
// (issue 6). Peer faults (resets, half-closes, peers that never read or
// never write, slowloris), caller faults (closing from inside callbacks,
// writers racing a close, callbacks replaced in flight, panics, nil
// callbacks), server churn, and a soak test behind the -soak flag. The
// data-integrity fuzz test is in fuzz_test.go.

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"runtime"
	"runtime/debug"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/asynctcp/asynctcp"
)

var soak = flag.Duration("soak", 0, "run TestSoak for this long: 1,000 connections echoing random sizes (go test -run TestSoak -soak 60s .)")

// rlFDs returns the number of open descriptors of the process, where the
// system lists them: /proc/self/fd on Linux, /dev/fd on macOS and the BSDs.
func rlFDs() (int, bool) {
	for _, dir := range []string{"/proc/self/fd", "/dev/fd"} {
		if ents, err := os.ReadDir(dir); err == nil {
			return len(ents), true
		}
	}
	return 0, false
}

// rlWarmNet makes the runtime set up its network poller, whose descriptors
// stay open for the life of the process, before a test counts descriptors.
func rlWarmNet(t *testing.T) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("net.Listen: %v", err)
	}
	ln.Close()
}

// rlWaitFDs waits until the process holds at most base descriptors again,
// failing the test after waitTimeout. Where the system does not list them
// it only logs.
func rlWaitFDs(t *testing.T, base int, what string) {
	t.Helper()
	if _, ok := rlFDs(); !ok {
		t.Logf("%s: this system does not list open descriptors; not counted", what)
		return
	}
	deadline := time.Now().Add(waitTimeout)
	for {
		n, _ := rlFDs()
		if n <= base {
			t.Logf("%s: %d descriptors open, %d before", what, n, base)
			return
		}
		if time.Now().After(deadline) {
			t.Errorf("%s: %d descriptors open, %d before: %d leaked", what, n, base, n-base)
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// rlBig is 64 MiB that does not repeat within a MiB: each MiB of
// pattern(1 MiB) carries its index in its first four bytes. Shared,
// read-only (WriteData copies).
var rlBig = sync.OnceValue(func() []byte {
	const mib = 1 << 20
	base := pattern(mib)
	b := make([]byte, 64*mib)
	for i := 0; i < 64; i++ {
		copy(b[i*mib:], base)
		binary.BigEndian.PutUint32(b[i*mib:], uint32(i))
	}
	return b
})

// rlPeer drives the raw end of a connection: goroutines that flood it,
// drain it or pace bytes into it, each ending when the connection does.
type rlPeer struct {
	c  net.Conn
	wg sync.WaitGroup
}

func rlNewPeer(t *testing.T, c net.Conn) *rlPeer {
	t.Helper()
	c.SetDeadline(time.Now().Add(waitTimeout))
	return &rlPeer{c: c}
}

// flood writes 4 KiB writes until the connection fails.
func (p *rlPeer) flood() {
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		b := pattern(4096)
		for {
			if _, err := p.c.Write(b); err != nil {
				return
			}
		}
	}()
}

// drain reads until the connection ends.
func (p *rlPeer) drain() {
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		b := make([]byte, 64<<10)
		for {
			if _, err := p.c.Read(b); err != nil {
				return
			}
		}
	}()
}

// wait waits for the peer's goroutines, which end once the socket's end is
// closed (or at the peer's deadline, which fails the test).
func (p *rlPeer) wait(t *testing.T, what string) {
	t.Helper()
	waitGroup(t, &p.wg, what)
}

// rlResetCode reports whether code is the errno of a reset: ECONNRESET
// (read or write) or EPIPE (a write after the reset).
func rlResetCode(code int) bool {
	return code == int(syscall.ECONNRESET) || code == int(syscall.EPIPE)
}

// --- Peer faults ---------------------------------------------------------

// TestPeerResetDuringLargeWriteIsOneEOF: a peer that resets (SO_LINGER 0,
// close) while the socket writes 64 MiB gives exactly one ErrTCPEOF event,
// with Code ECONNRESET or EPIPE, and no hang: the socket closes, later
// writes are refused, Wait returns (rule 5 and 6). A socket that the
// application closed, still flushing, ends at the reset with no event
// (rule 7).
func TestPeerResetDuringLargeWriteIsOneEOF(t *testing.T) {
	t.Parallel()
	big := rlBig()
	cases := []struct {
		name      string
		accepted  bool // the writing socket is a server's
		peerReads int  // bytes the peer reads before its reset
		closing   bool // the application closed the socket first: it flushes when the reset comes
	}{
		{"connected socket, peer read 1 MiB", false, 1 << 20, false},
		{"connected socket, peer read nothing", false, 0, false},
		{"accepted socket, peer read 1 MiB", true, 1 << 20, false},
		{"connected socket flushing after Close", false, 1 << 20, true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			l := newTestLoop(t)
			events := newEventRecorder()
			var after atomic.Bool // the event arrived
			var late atomic.Int32
			sockets := make(chan *asynctcp.Socket, 1)
			opts := []asynctcp.Option{
				asynctcp.OnConnect(func(s *asynctcp.Socket) {
					if err := s.WriteData(big); err != nil {
						t.Errorf("WriteData of 64 MiB: %v", err)
					}
					signal(sockets, s)
				}),
				asynctcp.OnWrite(func(*asynctcp.Socket) {
					if after.Load() {
						late.Add(1)
					}
				}),
			}
			event := func(ev error) {
				if after.Swap(true) {
					late.Add(1)
				}
				events.cb(ev)
			}
			read := func(*asynctcp.Socket, []byte) {
				if after.Load() {
					late.Add(1)
				}
			}
			var peer *net.TCPConn
			var srv *asynctcp.Server
			if tc.accepted {
				var port int
				srv, port = listenLocal(t, l, read, event, opts...)
				peer = dialRaw(t, port)
			} else {
				ln, port := listenRaw(t)
				connectLocal(t, l, port, read, event, opts...)
				peer = acceptRaw(t, ln)
			}
			s := waitFor(t, sockets, "the connect-cb to queue 64 MiB")
			if tc.peerReads > 0 {
				got := make([]byte, tc.peerReads)
				peer.SetReadDeadline(time.Now().Add(waitTimeout))
				if _, err := io.ReadFull(peer, got); err != nil {
					t.Fatalf("peer read: %v", err)
				}
				if !bytes.Equal(got, big[:tc.peerReads]) {
					t.Fatal("the peer read other bytes than the socket wrote")
				}
			}
			if tc.closing {
				if err := s.Close(); err != nil {
					t.Fatalf("Close: %v", err)
				}
			}
			if err := peer.SetLinger(0); err != nil {
				t.Fatalf("SetLinger(0): %v", err)
			}
			peer.Close()

			if tc.closing {
				// No event: the application closed the socket. The flush
				// ends at the reset, and so does the socket.
				waitLoop(t, l, waitTimeout)
				if n := events.n.Load(); n != 0 {
					t.Errorf("%d events after Close, want none", n)
				}
				if n := late.Load(); n != 0 {
					t.Errorf("%d callbacks after Close", n)
				}
				return
			}
			ev := wantClass(t, waitFor(t, events.ch, "the reset's event"), asynctcp.ErrTCPEOF, "reset during a large write")
			if !rlResetCode(ev.Code) {
				t.Errorf("reset event Code = %d (%v), want ECONNRESET (%d) or EPIPE (%d)", ev.Code, ev, int(syscall.ECONNRESET), int(syscall.EPIPE))
			}
			if errors.Is(ev, asynctcp.ErrTCPError) {
				t.Errorf("reset event %v is a tcp-error", ev)
			}
			if ev.Socket != s {
				t.Errorf("event Socket = %p, want the writing socket %p", ev.Socket, s)
			}
			eventually(t, "Closed() after the reset's event", s.Closed)
			if err := s.WriteData([]byte("late")); !errors.Is(err, asynctcp.ErrSocketClosed) {
				t.Errorf("WriteData after the reset: %v, want ErrSocketClosed", err)
			}
			if srv != nil {
				srv.Close()
			}
			waitLoop(t, l, waitTimeout)
			if n := events.n.Load(); n != 1 {
				t.Errorf("%d events, want exactly one", n)
			}
			if n := late.Load(); n != 0 {
				t.Errorf("%d callbacks after the reset's event", n)
			}
			if n := s.Buffered(); n != 0 {
				t.Errorf("Buffered() = %d after the socket ended, want 0", n)
			}
		})
	}
}

// TestPeerHalfCloseEOFAfterAllDataOutputStillFlushed: a peer that shuts its
// write side (CloseWrite) while the socket has 16 MiB queued for it gets
// every byte: the event-cb gets ErrTCPEOF after every byte went to the
// read-cb, may still write, and the close that follows flushes the whole
// output, then ends the connection (rules 5, 6 and 11).
func TestPeerHalfCloseEOFAfterAllDataOutputStillFlushed(t *testing.T) {
	t.Parallel()
	const (
		greeting = 16 << 20
		request  = 1 << 20
	)
	big := rlBig()
	l := newTestLoop(t)
	ln, port := listenRaw(t)
	type atEOF struct {
		ev       error
		received int64
		buffered int
		bye      error
	}
	eofs := make(chan atEOF, 4)
	var received atomic.Int64
	var n atomic.Int32
	connectLocal(t, l, port,
		func(s *asynctcp.Socket, data []byte) {
			received.Add(int64(len(data)))
			if err := s.WriteData(data); err != nil { // echo, after the greeting
				t.Errorf("echo: %v", err)
			}
		},
		func(ev error) {
			n.Add(1)
			var e *asynctcp.Event
			if !errors.As(ev, &e) || e.Socket == nil {
				t.Errorf("event %v carries no socket", ev)
				return
			}
			eofs <- atEOF{ev, received.Load(), e.Socket.Buffered(), e.Socket.WriteData([]byte("bye"))}
		},
		asynctcp.OnConnect(func(s *asynctcp.Socket) {
			if err := s.WriteData(big[:greeting]); err != nil {
				t.Errorf("greeting: %v", err)
			}
		}))
	peer := acceptRaw(t, ln)
	// The peer writes its request without reading anything, then shuts its
	// write side.
	peer.SetWriteDeadline(time.Now().Add(waitTimeout))
	if _, err := peer.Write(big[greeting : greeting+request]); err != nil {
		t.Fatalf("peer write: %v", err)
	}
	if err := peer.CloseWrite(); err != nil {
		t.Fatalf("peer CloseWrite: %v", err)
	}
	e := waitFor(t, eofs, "the EOF event")
	wantClass(t, e.ev, asynctcp.ErrTCPEOF, "the peer's CloseWrite")
	if e.received != request {
		t.Errorf("EOF event after %d bytes reached the read-cb, want all %d", e.received, request)
	}
	if e.buffered == 0 {
		t.Errorf("no output queued at the EOF: the test did not test a flush after EOF")
	}
	if e.bye != nil {
		t.Errorf("WriteData inside the EOF event-cb: %v", e.bye)
	}
	r := waitFor(t, readAllAsync(peer), "the peer to read to EOF")
	if r.err != nil {
		t.Errorf("peer read: %v", r.err)
	}
	want := append(append(append([]byte(nil), big[:greeting]...), big[greeting:greeting+request]...), "bye"...)
	if !bytes.Equal(r.data, want) {
		t.Errorf("peer got %d bytes, want %d (greeting, echo, bye); first difference at %d", len(r.data), len(want), firstDiff(r.data, want))
	}
	waitLoop(t, l, waitTimeout)
	if got := n.Load(); got != 1 {
		t.Errorf("%d events, want one", got)
	}
}

// TestEchoToPeerThatNeverReadsEndsInWriteTimeout: an echo server with a
// write timeout, flooded by a peer that never reads, queues the echo until
// no byte can be written for the timeout; then its socket gets one
// ErrTCPTimeout event (Dir EvWrite, Code -1) and is aborted, and the peer,
// blocked or not, sees the end (rule 9).
func TestEchoToPeerThatNeverReadsEndsInWriteTimeout(t *testing.T) {
	t.Parallel()
	const (
		d     = 300 * time.Millisecond
		flood = 16 << 20
	)
	l := newTestLoop(t)
	events := newEventRecorder()
	var after atomic.Bool
	var late atomic.Int32
	srv, port := listenLocal(t, l,
		func(s *asynctcp.Socket, data []byte) {
			if after.Load() {
				late.Add(1)
			}
			s.WriteData(data)
		},
		func(ev error) {
			after.Store(true)
			events.cb(ev)
		},
		asynctcp.WriteTimeout(d))
	peer := dialRaw(t, port)
	peer.SetReadBuffer(64 << 10)
	wrote := make(chan error, 1)
	go func() {
		peer.SetWriteDeadline(time.Now().Add(waitTimeout))
		_, err := peer.Write(rlBig()[:flood])
		wrote <- err
	}()
	ev := wantClass(t, waitFor(t, events.ch, "the write timeout"), asynctcp.ErrTCPTimeout, "echo to a peer that never reads")
	if ev.Dir != asynctcp.EvWrite || ev.Code != -1 {
		t.Errorf("write timeout Dir %v, Code %d; want EvWrite, -1", ev.Dir, ev.Code)
	}
	if ev.Socket == nil {
		t.Fatal("write timeout event has no Socket")
	}
	eventually(t, "Closed() after the write timeout", ev.Socket.Closed)
	if err := waitFor(t, wrote, "the peer's flood to end"); err != nil && !errors.Is(err, syscall.ECONNRESET) && !errors.Is(err, syscall.EPIPE) {
		t.Errorf("peer write: %v, want it complete or reset", err)
	}
	waitFor(t, readAllAsync(peer), "the peer to see the end")
	srv.Close()
	waitLoop(t, l, waitTimeout)
	if n := events.n.Load(); n != 1 {
		t.Errorf("%d events, want one", n)
	}
	if n := late.Load(); n != 0 {
		t.Errorf("%d read-cbs after the timeout's event", n)
	}
}

// TestSilentPeersTimeOutWhileServerServesOthers: twenty peers that connect
// and never send each get one read timeout (Dir EvRead) and see their
// connection end, while a live client on the same server is served all
// along; once it goes quiet, it times out too (rule 9).
func TestSilentPeersTimeOutWhileServerServesOthers(t *testing.T) {
	t.Parallel()
	const (
		d      = 500 * time.Millisecond
		silent = 20
		pings  = 20
		every  = 50 * time.Millisecond
	)
	l := newTestLoop(t)
	events := make(chan *asynctcp.Event, silent+4)
	var nev atomic.Int32
	srv, port := listenLocal(t, l,
		func(s *asynctcp.Socket, data []byte) { s.WriteData(data) },
		func(ev error) {
			nev.Add(1)
			var e *asynctcp.Event
			if !errors.As(ev, &e) {
				t.Errorf("server event %T (%v), want an *Event", ev, ev)
				return
			}
			events <- e
		},
		asynctcp.ReadTimeout(d))
	quiet := make([]*rlPeer, silent)
	for i := range quiet {
		quiet[i] = rlNewPeer(t, dialRaw(t, port))
		quiet[i].drain()
	}
	live := dialRaw(t, port)
	live.SetDeadline(time.Now().Add(waitTimeout))
	var lastPing time.Time
	for i := 0; i < pings; i++ {
		if _, err := live.Write([]byte{byte(i)}); err != nil {
			t.Fatalf("live client ping %d: %v", i, err)
		}
		var b [1]byte
		if _, err := io.ReadFull(live, b[:]); err != nil || b[0] != byte(i) {
			t.Fatalf("live client echo %d: %v %v", i, b, err)
		}
		lastPing = time.Now()
		time.Sleep(every) // a paced peer
	}
	liveAddr := live.LocalAddr().String()
	for i := 0; i < silent+1; i++ {
		e := waitFor(t, events, "a read timeout")
		if e.Class != asynctcp.ErrTCPTimeout || e.Dir != asynctcp.EvRead || e.Code != -1 {
			t.Errorf("event %v (Dir %v, Code %d), want a read timeout", e, e.Dir, e.Code)
		}
		if e.Socket != nil && e.Socket.RemoteAddr().String() == liveAddr && time.Since(lastPing) < d/2 {
			t.Errorf("the live client timed out %v after its last ping, before going quiet for %v", time.Since(lastPing), d)
		}
	}
	for i, p := range quiet {
		p.wait(t, fmt.Sprintf("silent peer %d to see its connection end", i))
	}
	waitFor(t, readAllAsync(live), "the live client to see its connection end")
	srv.Close()
	waitLoop(t, l, waitTimeout)
	if n := nev.Load(); n != silent+1 {
		t.Errorf("%d events, want %d read timeouts", n, silent+1)
	}
}

// rlSlowloris sends one byte every period on c until it has sent n (n < 0:
// until a write fails). It returns when the last byte went and the longest
// gap between two writes, which a test compares with a timeout, since the
// pacing is only as good as the machine.
func rlSlowloris(c net.Conn, n int, period time.Duration) (last time.Time, worstGap time.Duration, err error) {
	prev := time.Now()
	for i := 0; n < 0 || i < n; i++ {
		if _, err = c.Write([]byte{byte('a' + i%26)}); err != nil {
			return last, worstGap, err
		}
		last = time.Now()
		if i > 0 {
			worstGap = max(worstGap, last.Sub(prev))
		}
		prev = last
		time.Sleep(period)
	}
	return last, worstGap, nil
}

// TestSlowlorisStaysConnectedUnderReadTimeout: a peer that sends one byte
// every 50 ms for a second keeps a server socket with a 200 ms read timeout
// open, since each byte restarts the clock, as in libevent; the timeout
// fires once the peer stops. (A cap on a connection's lifetime is the
// application's: TestLifetimeCapAbortsSlowloris.) Not parallel: its
// margins are a few dozen milliseconds.
func TestSlowlorisStaysConnectedUnderReadTimeout(t *testing.T) {
	const (
		d      = 200 * time.Millisecond
		every  = 50 * time.Millisecond
		nbytes = 20
	)
	l := newTestLoop(t)
	var got atomic.Int32
	type timedOut struct {
		ev  error
		got int32
		at  time.Time
	}
	events := make(chan timedOut, 4)
	var nev atomic.Int32
	sockets := make(chan *asynctcp.Socket, 1)
	srv, port := listenLocal(t, l,
		func(s *asynctcp.Socket, data []byte) { got.Add(int32(len(data))) },
		func(ev error) {
			nev.Add(1)
			events <- timedOut{ev, got.Load(), time.Now()}
		},
		asynctcp.ReadTimeout(d),
		asynctcp.OnConnect(func(s *asynctcp.Socket) { signal(sockets, s) }))
	peer := dialRaw(t, port)
	peer.SetDeadline(time.Now().Add(waitTimeout))
	s := waitFor(t, sockets, "the server's connect-cb")
	last, gap, err := rlSlowloris(peer, nbytes, every)
	if err != nil {
		t.Fatalf("slowloris write: %v", err)
	}
	select {
	case e := <-events:
		t.Fatalf("event %v after %d of %d bytes, during the slowloris (longest gap between its bytes %v, timeout %v)", e.ev, e.got, nbytes, gap, d)
	default:
	}
	if s.Closed() {
		t.Fatalf("the socket closed during the slowloris (longest gap %v)", gap)
	}
	e := waitFor(t, events, "the read timeout once the peer stopped")
	wantClass(t, e.ev, asynctcp.ErrTCPTimeout, "read timeout after the slowloris")
	if e.got != nbytes {
		t.Errorf("the timeout came after %d of the %d bytes", e.got, nbytes)
	}
	if quiet := e.at.Sub(last); quiet < d*3/4 {
		t.Errorf("the timeout came %v after the last byte, want about %v", quiet, d)
	}
	waitFor(t, readAllAsync(peer), "the peer to see the end")
	srv.Close()
	waitLoop(t, l, waitTimeout)
	if n := nev.Load(); n != 1 {
		t.Errorf("%d events, want one", n)
	}
}

// TestLifetimeCapAbortsSlowloris: the pattern that caps a connection's
// lifetime, which a read timeout does not (each byte restarts it): the
// connect-cb arms time.AfterFunc(cap, Abort) and keeps the timer in
// SetData; the event-cb stops it where the socket ends otherwise. A
// slowloris peer is cut off at the cap; no event follows the Abort (rule
// 7), and a well-behaved client that leaves early stops its timer.
func TestLifetimeCapAbortsSlowloris(t *testing.T) {
	const (
		d        = 200 * time.Millisecond
		lifetime = 600 * time.Millisecond
		every    = 50 * time.Millisecond
	)
	l := newTestLoop(t)
	type capped struct {
		err error
		age time.Duration
	}
	caps := make(chan capped, 4)
	stopped := make(chan bool, 4)
	events := newEventRecorder()
	srv, port := listenLocal(t, l,
		func(s *asynctcp.Socket, data []byte) {},
		func(ev error) {
			var e *asynctcp.Event
			if errors.As(ev, &e) && e.Socket != nil {
				if timer, ok := e.Socket.Data().(*time.Timer); ok {
					stopped <- timer.Stop()
				}
			}
			events.cb(ev)
		},
		asynctcp.ReadTimeout(d),
		asynctcp.OnConnect(func(s *asynctcp.Socket) {
			born := time.Now()
			s.SetData(time.AfterFunc(lifetime, func() {
				caps <- capped{s.Abort(), time.Since(born)}
			}))
		}))

	// A client that says its piece and leaves: its timer is stopped.
	polite := dialRaw(t, port)
	polite.Write([]byte("hello"))
	polite.Close()
	wantClass(t, waitFor(t, events.ch, "the polite client's EOF"), asynctcp.ErrTCPEOF, "polite client")
	if !waitFor(t, stopped, "the event-cb to stop the polite client's timer") {
		t.Error("the polite client's timer had fired already")
	}

	peer := dialRaw(t, port)
	peer.SetDeadline(time.Now().Add(waitTimeout))
	start := time.Now()
	_, gap, err := rlSlowloris(peer, -1, every)
	lasted := time.Since(start)
	if err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("slowloris write: %v, want the connection cut", err)
	}
	c := waitFor(t, caps, "the lifetime cap")
	if c.err != nil {
		t.Errorf("Abort from the lifetime timer: %v", c.err)
	}
	if c.age < lifetime {
		t.Errorf("the cap fired at %v, before the lifetime %v", c.age, lifetime)
	}
	if lasted < lifetime || lasted > lifetime+3*time.Second {
		t.Errorf("the slowloris lasted %v, want about %v (longest gap between its bytes %v)", lasted, lifetime, gap)
	}
	srv.Close()
	waitLoop(t, l, waitTimeout)
	if n := events.n.Load(); n != 1 {
		t.Errorf("%d events, want the polite client's EOF alone (no event after the cap's Abort)", n)
	}
}

// --- Caller faults -------------------------------------------------------

// rlCloser closes a socket from inside one of its callbacks and counts the
// callbacks that start after that close returned.
type rlCloser struct {
	abort  bool
	done   atomic.Bool
	late   atomic.Int32
	lateAt sync.Map // callback kind -> true
	result chan [2]error
}

func rlNewCloser(abort bool) *rlCloser {
	return &rlCloser{abort: abort, result: make(chan [2]error, 1)}
}

// enter is the first thing every callback does.
func (c *rlCloser) enter(kind string) {
	if c.done.Load() {
		c.late.Add(1)
		c.lateAt.Store(kind, true)
	}
}

// close closes s, then tries once more, which must be refused.
func (c *rlCloser) close(s *asynctcp.Socket) {
	if c.done.Load() {
		return
	}
	var err error
	if c.abort {
		err = s.Abort()
	} else {
		err = s.Close()
	}
	c.done.Store(true)
	signal(c.result, [2]error{err, s.Close()})
}

func (c *rlCloser) lateKinds() string {
	var kinds []string
	c.lateAt.Range(func(k, _ any) bool {
		kinds = append(kinds, k.(string))
		return true
	})
	sort.Strings(kinds)
	return strings.Join(kinds, ", ")
}

// TestCloseAndAbortInsideEveryCallback: Close or Abort from inside each
// kind of callback (connect-cb, read-cb, write-cb, event-cb at EOF, at a
// read timeout and at a reset, stream notification; a client's and an
// accepted socket's) returns nil, a second close is refused, nothing
// deadlocks, and no callback of the socket starts after (rule 7), while
// the peer keeps every kind of callback coming.
func TestCloseAndAbortInsideEveryCallback(t *testing.T) {
	t.Parallel()
	type setup struct {
		accepted bool              // a server's socket, rather than a client's
		stream   bool              // ConnectStream / ListenStream
		opts     []asynctcp.Option // beyond the callbacks
		peer     func(p *rlPeer)   // drives the raw end
		resets   bool              // the peer resets: an echo may fail before the event-cb runs
	}
	floodAndDrain := func(p *rlPeer) { p.flood(); p.drain() }
	cases := []struct {
		name  string
		where string // the callback kind that closes
		setup setup
	}{
		{"connect-cb", "connect", setup{peer: floodAndDrain, opts: []asynctcp.Option{asynctcp.Data(pattern(1 << 20))}}},
		{"read-cb", "read", setup{peer: floodAndDrain}},
		{"write-cb", "write", setup{peer: floodAndDrain}},
		{"event-cb at EOF", "event", setup{peer: func(p *rlPeer) {
			p.drain()
			p.c.Write(pattern(64 << 10))
			p.c.(*net.TCPConn).CloseWrite()
		}}},
		{"event-cb at a read timeout", "event", setup{opts: []asynctcp.Option{asynctcp.ReadTimeout(100 * time.Millisecond)}, peer: func(p *rlPeer) { p.drain() }}},
		{"event-cb at a reset", "event", setup{resets: true, peer: func(p *rlPeer) {
			p.c.Write(pattern(64 << 10))
			p.c.(*net.TCPConn).SetLinger(0)
			p.c.Close()
		}}},
		{"stream notification", "read", setup{stream: true, peer: floodAndDrain}},
		{"accepted connect-cb", "connect", setup{accepted: true, peer: floodAndDrain}},
		{"accepted read-cb", "read", setup{accepted: true, peer: floodAndDrain}},
		{"accepted stream notification", "read", setup{accepted: true, stream: true, peer: floodAndDrain}},
	}
	for _, tc := range cases {
		for _, abort := range []bool{false, true} {
			how := "Close"
			if abort {
				how = "Abort"
			}
			t.Run(how+" in "+tc.name, func(t *testing.T) {
				t.Parallel()
				l := newTestLoop(t)
				c := rlNewCloser(abort)
				var reads, writes int // touched only by the socket's callbacks
				events := newEventRecorder()
				read := func(s *asynctcp.Socket, data []byte) {
					c.enter("read-cb")
					reads++
					// After a reset, the echo's write fails and ends the
					// socket; the event-cb runs after this read-cb.
					if err := s.WriteData(data); err != nil && !c.done.Load() && !tc.setup.resets {
						t.Errorf("echo: %v", err)
					}
					if tc.where == "read" && reads == 3 {
						c.close(s)
					}
				}
				sread := func(s *asynctcp.Socket, st *asynctcp.Stream) {
					c.enter("stream notification")
					reads++
					buf := make([]byte, 64<<10)
					for {
						n, _ := st.TryRead(buf)
						if n == 0 {
							break
						}
						s.WriteData(buf[:n])
					}
					if tc.where == "read" && reads == 3 {
						c.close(s)
					}
				}
				event := func(ev error) {
					c.enter("event-cb")
					events.cb(ev)
					var e *asynctcp.Event
					if tc.where == "event" && errors.As(ev, &e) && e.Socket != nil {
						c.close(e.Socket)
					}
				}
				opts := append([]asynctcp.Option{
					asynctcp.OnConnect(func(s *asynctcp.Socket) {
						c.enter("connect-cb")
						if tc.where == "connect" {
							c.close(s)
						}
					}),
					asynctcp.OnWrite(func(s *asynctcp.Socket) {
						c.enter("write-cb")
						writes++
						if tc.where == "write" && writes == 3 {
							c.close(s)
						}
					}),
				}, tc.setup.opts...)
				var raw net.Conn
				if tc.setup.accepted {
					var err error
					var srv *asynctcp.Server
					if tc.setup.stream {
						srv, err = l.ListenStream("127.0.0.1", 0, sread, event, opts...)
					} else {
						srv, err = l.Listen("127.0.0.1", 0, read, event, opts...)
					}
					if err != nil {
						t.Fatalf("Listen: %v", err)
					}
					raw = dialRaw(t, portOf(t, srv.Addr()))
					defer func() {
						srv.Close()
						waitLoop(t, l, waitTimeout)
					}()
				} else {
					ln, port := listenRaw(t)
					var err error
					if tc.setup.stream {
						_, err = l.ConnectStream("127.0.0.1", port, sread, event, opts...)
					} else {
						_, err = l.Connect("127.0.0.1", port, read, event, opts...)
					}
					if err != nil {
						t.Fatalf("Connect: %v", err)
					}
					raw = acceptRaw(t, ln)
					defer waitLoop(t, l, waitTimeout)
				}
				p := rlNewPeer(t, raw)
				tc.setup.peer(p)
				res := waitFor(t, c.result, "the close inside the "+tc.name)
				if res[0] != nil {
					t.Errorf("%s inside the %s: %v", how, tc.name, res[0])
				}
				if !errors.Is(res[1], asynctcp.ErrSocketClosed) {
					t.Errorf("a second Close inside the %s: %v, want ErrSocketClosed", tc.name, res[1])
				}
				p.wait(t, "the peer to see the connection end")
				raw.Close()
				// The deferred wait for the loop runs next; then nothing
				// can start any more.
				t.Cleanup(func() {
					if n := c.late.Load(); n != 0 {
						t.Errorf("%d callbacks (%s) started after %s returned inside the %s", n, c.lateKinds(), how, tc.name)
					}
					if tc.where == "event" && events.n.Load() != 1 {
						t.Errorf("%d events, want one", events.n.Load())
					}
					if tc.where != "event" && events.n.Load() != 0 {
						t.Errorf("%d events after the application closed the socket, want none", events.n.Load())
					}
				})
			})
		}
	}
}

// rlRecord is a framed record of the concurrent-writers test: writer (1
// byte), sequence number (4), body length (4), then the body, whose bytes
// derive from all three.
func rlRecord(w, seq, n int) []byte {
	m := make([]byte, 9+n)
	m[0] = byte(w)
	binary.BigEndian.PutUint32(m[1:], uint32(seq))
	binary.BigEndian.PutUint32(m[5:], uint32(n))
	for i := 0; i < n; i++ {
		m[9+i] = byte(w*31 + seq*7 + i)
	}
	return m
}

// rlParseRecords reads records from r until it ends. It returns how many
// records of each writer arrived (they must arrive in sequence, whole and
// intact), whether the stream ended inside a record, and the first
// violation.
func rlParseRecords(r io.Reader, writers int) (got []int, torn bool, err error) {
	br := bufio.NewReaderSize(r, 64<<10)
	got = make([]int, writers)
	for count := 0; ; count++ {
		var h [9]byte
		if n, rerr := io.ReadFull(br, h[:]); rerr != nil {
			return got, n > 0, nil
		}
		w, seq, n := int(h[0]), int(binary.BigEndian.Uint32(h[1:])), int(binary.BigEndian.Uint32(h[5:]))
		if w >= writers || seq != got[w] || n > 1<<20 {
			return got, false, fmt.Errorf("record %d: writer %d, seq %d, length %d (want seq %d): torn, interleaved or reordered", count, w, seq, n, got[min(w, writers-1)])
		}
		body := make([]byte, 9+n)
		copy(body, h[:])
		if _, rerr := io.ReadFull(br, body[9:]); rerr != nil {
			return got, true, nil
		}
		if !bytes.Equal(body, rlRecord(w, seq, n)) {
			return got, false, fmt.Errorf("record %d (writer %d, seq %d): body corrupted", count, w, seq)
		}
		got[w]++
	}
}

// TestWritersRacingCloseQueueWholeOrNothing: 64 goroutines call WriteData,
// Write and WriteString with framed records of random sizes while another
// goroutine (or the read-cb) closes the socket. No panic, no race; every
// call returns nil or ErrSocketClosed; with Close the peer receives exactly
// the accepted records, each whole (rule 7); with Abort, whole records
// that were accepted and then a torn one at most.
func TestWritersRacingCloseQueueWholeOrNothing(t *testing.T) {
	t.Parallel()
	const writers = 64
	for _, how := range []string{"Close", "Abort", "Close in the read-cb"} {
		abort := how == "Abort"
		name := how
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			l := newTestLoop(t)
			ln, port := listenRaw(t)
			connected := make(chan struct{}, 1)
			closed := make(chan error, 1)
			s := connectLocal(t, l, port,
				func(s *asynctcp.Socket, data []byte) { closed <- s.Close() }, // the peer's go-ahead
				nil,
				asynctcp.OnConnect(func(*asynctcp.Socket) { signal(connected, struct{}{}) }))
			peer := acceptRaw(t, ln)
			peer.SetReadDeadline(time.Now().Add(waitTimeout))
			type parsed struct {
				got  []int
				torn bool
				err  error
			}
			parsedc := make(chan parsed, 1)
			go func() {
				got, torn, err := rlParseRecords(peer, writers)
				parsedc <- parsed{got, torn, err}
			}()
			waitFor(t, connected, "the connect-cb")

			accepted := make([]int, writers) // each writer's accepted records: seq 0 .. n-1
			var total atomic.Int32
			start := make(chan struct{})
			var wg sync.WaitGroup
			for w := 0; w < writers; w++ {
				wg.Add(1)
				go func(w int) {
					defer wg.Done()
					rng := rand.New(rand.NewPCG(uint64(w), 6))
					<-start
					for seq := 0; ; seq++ {
						n := rng.IntN(2048)
						if rng.IntN(16) == 0 {
							n = rng.IntN(64 << 10)
						}
						m := rlRecord(w, seq, n)
						var err error
						switch seq % 3 {
						case 0:
							err = s.WriteData(m)
						case 1:
							_, err = s.Write(m)
						default:
							_, err = s.WriteString(string(m))
						}
						if err == nil {
							accepted[w]++
							total.Add(1)
							continue
						}
						var ev *asynctcp.Event
						if !errors.Is(err, asynctcp.ErrSocketClosed) || !errors.As(err, &ev) || ev.Socket != s {
							t.Errorf("writer %d: %v, want an ErrSocketClosed event of the socket", w, err)
						}
						return
					}
				}(w)
			}
			go func() {
				<-start
				for total.Load() < 2000 {
					runtime.Gosched()
				}
				switch how {
				case "Abort":
					closed <- s.Abort()
				case "Close":
					closed <- s.Close()
				default:
					if _, err := peer.Write([]byte{1}); err != nil {
						closed <- err
					}
				}
			}()
			close(start)
			if err := waitFor(t, closed, "the close racing the writers"); err != nil {
				t.Errorf("%s: %v", name, err)
			}
			waitGroup(t, &wg, "the writers to be refused")
			p := waitFor(t, parsedc, "the peer to read to the end")
			if p.err != nil {
				t.Fatal(p.err)
			}
			var sum int
			for w := range accepted {
				sum += accepted[w]
				switch {
				case !abort && p.got[w] != accepted[w]:
					t.Errorf("writer %d: peer got %d records, WriteData accepted %d", w, p.got[w], accepted[w])
				case abort && p.got[w] > accepted[w]:
					t.Errorf("writer %d: peer got %d records, more than the %d accepted", w, p.got[w], accepted[w])
				}
			}
			if !abort && p.torn {
				t.Error("the stream ended inside a record after a graceful Close")
			}
			t.Logf("%d records accepted before the %s", sum, name)
			waitLoop(t, l, waitTimeout)
		})
	}
}

// TestCallbacksReplacedWhileEventsInFlight: eight goroutines echo framed
// records through a server while replacing the socket's read-, write- and
// event-cb with every WriteData, and a read-cb replaces the read-cb too.
// Every byte reaches one of the read-cbs in order (one parser, touched
// only by the socket's callbacks, which never overlap), the race detector
// stays quiet, and the EOF goes to the event-cb that the last WriteData
// named (rule 8).
func TestCallbacksReplacedWhileEventsInFlight(t *testing.T) {
	t.Parallel()
	const goroutines, each = 8, 250
	l := newTestLoop(t)
	accepted := make(chan *asynctcp.Socket, 1)
	srv, port := listenLocal(t, l, func(s *asynctcp.Socket, data []byte) { s.WriteData(data) }, nil,
		asynctcp.OnConnect(func(s *asynctcp.Socket) { signal(accepted, s) }))

	var inFlight atomic.Int32 // callbacks of the client running now
	var overlaps atomic.Int32
	enter := func() func() {
		if inFlight.Add(1) != 1 {
			overlaps.Add(1)
		}
		return func() { inFlight.Add(-1) }
	}
	var stream []byte // the echo, as the read-cbs got it; touched only by callbacks
	var records int
	// At most window records are in flight, so that the writers replace
	// callbacks while the echo comes back.
	const window = 16
	tokens := make(chan struct{}, window)
	for i := 0; i < window; i++ {
		tokens <- struct{}{}
	}
	var parseErr error
	allEchoed := make(chan struct{})
	var readers [4]atomic.Int32
	var s *asynctcp.Socket
	var readCbs [4]asynctcp.ReadFunc
	for i := range readCbs {
		readCbs[i] = func(s *asynctcp.Socket, data []byte) {
			defer enter()()
			readers[i].Add(1)
			stream = append(stream, data...)
			for parseErr == nil && len(stream) >= 9 {
				n := int(binary.BigEndian.Uint32(stream[5:]))
				if len(stream) < 9+n {
					break
				}
				w, seq := int(stream[0]), int(binary.BigEndian.Uint32(stream[1:]))
				if w >= goroutines || seq >= each || !bytes.Equal(stream[:9+n], rlRecord(w, seq, n)) {
					parseErr = fmt.Errorf("echoed record %d corrupted (writer %d, seq %d, length %d)", records, w, seq, n)
					break
				}
				stream = stream[9+n:]
				records++
				tokens <- struct{}{}
				if records == goroutines*each {
					close(allEchoed)
				}
			}
			if i == 0 { // a read-cb may replace itself
				s.WriteData(nil, asynctcp.OnRead(readCbs[1]))
			}
		}
	}
	var writeCalls atomic.Int32
	writeCb := func(*asynctcp.Socket) {
		defer enter()()
		writeCalls.Add(1)
	}
	var stray atomic.Int32
	strayEvent := func(ev error) {
		defer enter()()
		stray.Add(1)
		t.Errorf("event %v went to a replaced event-cb", ev)
	}
	final := make(chan error, 1)
	up := make(chan struct{}, 1)
	s = connectLocal(t, l, port, readCbs[3], strayEvent,
		asynctcp.OnConnect(func(*asynctcp.Socket) { signal(up, struct{}{}) }))
	peer := waitFor(t, accepted, "the server's connect-cb")
	waitFor(t, up, "the client's connect-cb")

	var wg sync.WaitGroup
	for g := 0; g < goroutines; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(g), 8))
			for seq := 0; seq < each; seq++ {
				select {
				case <-tokens:
				case <-time.After(waitTimeout):
					t.Errorf("writer %d: no echo for %v", g, waitTimeout)
					return
				}
				opts := []asynctcp.Option{asynctcp.OnRead(readCbs[rng.IntN(len(readCbs))])}
				if rng.IntN(2) == 0 {
					opts = append(opts, asynctcp.OnWrite(writeCb))
				} else {
					opts = append(opts, asynctcp.OnWrite(nil))
				}
				opts = append(opts, asynctcp.OnEvent(strayEvent))
				rng.Shuffle(len(opts), func(i, j int) { opts[i], opts[j] = opts[j], opts[i] })
				if err := s.WriteData(rlRecord(g, seq, rng.IntN(1024)), opts...); err != nil {
					t.Errorf("WriteData with overrides: %v", err)
					return
				}
			}
		}(g)
	}
	waitGroup(t, &wg, "the writers")
	waitFor(t, allEchoed, "every record to come back")
	// Every event from here on goes to this event-cb.
	if err := s.WriteData(nil, asynctcp.OnEvent(func(ev error) {
		defer enter()()
		final <- ev
	})); err != nil {
		t.Fatalf("WriteData(nil, OnEvent): %v", err)
	}
	peer.Close()
	wantClass(t, waitFor(t, final, "the EOF at the last event-cb"), asynctcp.ErrTCPEOF, "server closed")
	srv.Close()
	waitLoop(t, l, waitTimeout)
	if parseErr != nil {
		t.Error(parseErr)
	}
	if len(stream) != 0 {
		t.Errorf("%d echoed bytes left over", len(stream))
	}
	if n := overlaps.Load(); n != 0 {
		t.Errorf("%d callbacks of the socket overlapped another", n)
	}
	if stray.Load() != 0 {
		t.Errorf("%d events at replaced event-cbs", stray.Load())
	}
	t.Logf("read-cbs ran %d, %d, %d, %d times; write-cb %d times", readers[0].Load(), readers[1].Load(), readers[2].Load(), readers[3].Load(), writeCalls.Load())
}

// rlPanicKinds are the callbacks that TestPanicInEachCallback* make panic.
var rlPanicKinds = []string{
	"connect-cb",
	"read-cb",
	"write-cb",
	"write-cb set by WriteData",
	"read-cb set by WriteData",
	"stream notification",
	"DontDrainReadBuffer notification",
	"accepted connect-cb",
	"accepted read-cb",
	"event-cb",
}

// rlPanicking sets up a socket of l whose callback of the given kind
// panics with v, and a raw peer that makes it run: the peer writes a few
// bytes, and for the event-cb shuts its write side. Every callback of the
// socket calls enter first. It returns the peer and the server, if any.
func rlPanicking(t *testing.T, l *asynctcp.Loop, kind string, v any, event asynctcp.EventFunc, enter func(string)) (*rlPeer, *asynctcp.Server) {
	t.Helper()
	boom := func(string) {
		enter("panic")
		panic(v)
	}
	read := func(s *asynctcp.Socket, data []byte) { enter("read-cb") }
	var sread asynctcp.StreamFunc
	var opts []asynctcp.Option
	onConnect := func(s *asynctcp.Socket) { enter("connect-cb") }
	onWrite := func(s *asynctcp.Socket) { enter("write-cb") }
	events := func(ev error) {
		enter("event-cb")
		event(ev)
	}
	accepted := strings.HasPrefix(kind, "accepted ")
	switch kind {
	case "connect-cb", "accepted connect-cb":
		onConnect = func(*asynctcp.Socket) { boom("connect-cb") }
	case "read-cb", "accepted read-cb":
		read = func(*asynctcp.Socket, []byte) { boom("read-cb") }
	case "write-cb":
		opts = append(opts, asynctcp.Data([]byte("x")))
		onWrite = func(*asynctcp.Socket) { boom("write-cb") }
	case "write-cb set by WriteData":
		onConnect = func(s *asynctcp.Socket) {
			enter("connect-cb")
			s.WriteData([]byte("x"), asynctcp.OnWrite(func(*asynctcp.Socket) { boom("write-cb") }))
		}
	case "read-cb set by WriteData":
		onConnect = func(s *asynctcp.Socket) {
			enter("connect-cb")
			s.WriteData(nil, asynctcp.OnRead(func(*asynctcp.Socket, []byte) { boom("read-cb") }))
		}
	case "stream notification":
		sread = func(*asynctcp.Socket, *asynctcp.Stream) { boom("stream notification") }
	case "DontDrainReadBuffer notification":
		opts = append(opts, asynctcp.DontDrainReadBuffer())
		read = func(*asynctcp.Socket, []byte) { boom("notification") }
	case "event-cb":
		events = func(ev error) { boom("event-cb") }
	default:
		t.Fatalf("unknown callback kind %q", kind)
	}
	opts = append(opts, asynctcp.OnConnect(onConnect), asynctcp.OnWrite(onWrite))
	var raw net.Conn
	var srv *asynctcp.Server
	var err error
	if accepted {
		srv, err = l.Listen("127.0.0.1", 0, read, events, opts...)
		if err != nil {
			t.Fatalf("Listen: %v", err)
		}
		t.Cleanup(func() { srv.Close() })
		raw = dialRaw(t, portOf(t, srv.Addr()))
	} else {
		ln, port := listenRaw(t)
		if sread != nil {
			_, err = l.ConnectStream("127.0.0.1", port, sread, events, opts...)
		} else {
			_, err = l.Connect("127.0.0.1", port, read, events, opts...)
		}
		if err != nil {
			t.Fatalf("Connect: %v", err)
		}
		raw = acceptRaw(t, ln)
	}
	p := rlNewPeer(t, raw)
	p.drain()
	raw.Write([]byte("boom"))
	if kind == "event-cb" {
		raw.(*net.TCPConn).CloseWrite()
	}
	return p, srv
}

// rlBoom is the panic value of TestPanicInEachCallbackWithCatchAppErrors.
type rlBoom struct{ kind string }

// TestPanicInEachCallbackWithCatchAppErrors: with CatchAppErrors a panic
// in each kind of callback reaches the socket's event-cb as a *PanicError
// (the event-cb's own panic reaches the EventHandler), the socket is
// aborted, the peer sees the end, and no callback of the socket starts
// after (rule 19).
func TestPanicInEachCallbackWithCatchAppErrors(t *testing.T) {
	t.Parallel()
	for _, kind := range rlPanicKinds {
		t.Run(kind, func(t *testing.T) {
			t.Parallel()
			l := newTestLoop(t)
			l.CatchAppErrors = true
			handled := newEventRecorder()
			l.EventHandler = handled.cb
			var panicked, delivered atomic.Bool
			var late atomic.Int32
			enter := func(what string) {
				switch {
				case what == "panic":
					if panicked.Swap(true) {
						late.Add(1)
						t.Error("a second panicking callback ran")
					}
				case !panicked.Load():
				case what == "event-cb" && kind != "event-cb" && !delivered.Swap(true):
					// The event-cb that gets the *PanicError.
				default:
					late.Add(1)
					t.Errorf("%s started after the panic", what)
				}
			}
			events := newEventRecorder()
			got := events
			want := rlBoom{kind}
			if kind == "event-cb" {
				got = handled
			}
			p, srv := rlPanicking(t, l, kind, want, events.cb, enter)
			ev := waitFor(t, got.ch, "the *PanicError")
			var pe *asynctcp.PanicError
			if !errors.As(ev, &pe) {
				t.Fatalf("got %T (%v), want a *PanicError", ev, ev)
			}
			if pe.Value != want {
				t.Errorf("PanicError.Value = %v, want %v", pe.Value, want)
			}
			if pe.Socket == nil {
				t.Fatal("PanicError.Socket is nil")
			}
			if len(pe.Stack) == 0 {
				t.Error("PanicError has no stack")
			}
			eventually(t, "the socket to be closed after the panic", pe.Socket.Closed)
			p.wait(t, "the peer to see the socket aborted")
			if srv != nil {
				srv.Close()
			}
			waitLoop(t, l, waitTimeout)
			if kind == "event-cb" {
				if n := events.n.Load(); n != 0 {
					t.Errorf("the panicking event-cb's own panic came back to an event-cb %d times", n)
				}
			} else if n := events.n.Load(); n != 1 {
				t.Errorf("%d events, want the *PanicError alone", n)
			}
			if n := handled.n.Load(); kind != "event-cb" && n != 0 {
				t.Errorf("the EventHandler got %d events, want none", n)
			}
			if n := late.Load(); n != 0 {
				t.Errorf("%d callbacks after the panic", n)
			}
		})
	}
}

// rlPanicChild names the environment variable that makes
// TestPanicWithoutCatchAppErrorsCrashes run one kind in a child process.
const rlPanicChild = "ASYNCTCP_TEST_PANIC_CHILD"

// TestPanicWithoutCatchAppErrorsCrashes: without CatchAppErrors a panic in
// each kind of callback propagates and crashes the process, as a panic on
// any goroutine does (rule 19). Each kind runs in a child process, which
// must exit non-zero with the panic value in its output.
func TestPanicWithoutCatchAppErrorsCrashes(t *testing.T) {
	if kind := os.Getenv(rlPanicChild); kind != "" {
		rlPanicInChild(t, kind)
		return
	}
	t.Parallel()
	for _, kind := range rlPanicKinds {
		t.Run(kind, func(t *testing.T) {
			t.Parallel()
			cmd := exec.Command(os.Args[0], "-test.run=^TestPanicWithoutCatchAppErrorsCrashes$", "-test.v", "-test.timeout=60s")
			cmd.Env = append(os.Environ(), rlPanicChild+"="+kind)
			done := make(chan struct{})
			var out []byte
			var err error
			go func() {
				out, err = cmd.CombinedOutput()
				close(done)
			}()
			select {
			case <-done:
			case <-time.After(60 * time.Second):
				cmd.Process.Kill()
				<-done
				t.Fatalf("child did not finish within 60s:\n%s", out)
			}
			var exit *exec.ExitError
			if !errors.As(err, &exit) || exit.ExitCode() == 0 {
				t.Errorf("child exited with %v, want a non-zero status from the panic", err)
			}
			if !strings.Contains(string(out), "panic: "+rlUncaught(kind)) {
				t.Errorf("the child's output lacks the panic value %q:\n%s", rlUncaught(kind), out)
			}
			if strings.Contains(string(out), "--- PASS") {
				t.Errorf("the child's test passed: the panic did not propagate:\n%s", out)
			}
		})
	}
}

func rlUncaught(kind string) string { return "rl-uncaught " + kind }

func rlPanicInChild(t *testing.T, kind string) {
	l := newTestLoop(t) // CatchAppErrors off
	ended := make(chan error, 4)
	p, srv := rlPanicking(t, l, kind, rlUncaught(kind), func(ev error) { signal(ended, ev) }, func(string) {})
	// The panic ends this process. Should it not, the connection ends
	// (the socket was aborted, the panic swallowed) or the wait times out.
	select {
	case <-time.After(waitTimeout):
	case ev := <-ended:
		t.Logf("event %v", ev)
	}
	p.c.Close()
	if srv != nil {
		srv.Close()
	}
	t.Errorf("no crash: the %s's panic did not propagate", kind)
}

// TestNilCallbacksEverywhere: nil read-, event-, write- and connect-cbs,
// on clients and servers, in stream mode and not, and nil overrides in
// WriteData, through data, EOF, a reset, a read timeout and a refused
// connect, crash nothing; the loop's Logger gets the error-class events,
// and in stream mode with no read-cb the bytes wait in the input buffer.
func TestNilCallbacksEverywhere(t *testing.T) {
	t.Parallel()
	var logs syncBuffer
	l := newTestLoop(t)
	l.Logger = slog.New(slog.NewTextHandler(&logs, nil))
	nilOpts := []asynctcp.Option{asynctcp.OnConnect(nil), asynctcp.OnWrite(nil)}

	// Server and client of asynctcp, every callback nil.
	srv, port := listenLocal(t, l, nil, nil, nilOpts...)
	ssrv, err := l.ListenStream("127.0.0.1", 0, nil, nil, nilOpts...)
	if err != nil {
		t.Fatalf("ListenStream: %v", err)
	}
	defer ssrv.Close()
	for _, p := range []int{port, portOf(t, ssrv.Addr())} {
		c := connectLocal(t, l, p, nil, nil, append([]asynctcp.Option{asynctcp.Data([]byte("hello"))}, nilOpts...)...)
		if err := c.WriteData([]byte("more"), asynctcp.OnRead(nil), asynctcp.OnWrite(nil), asynctcp.OnEvent(nil)); err != nil {
			t.Errorf("WriteData with nil overrides: %v", err)
		}
		if err := c.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	}
	// A raw client whose server socket has nil callbacks: data, then EOF.
	for _, p := range []int{port, portOf(t, ssrv.Addr())} {
		rc := dialRaw(t, p)
		rc.Write([]byte("data"))
		rc.CloseWrite()
		waitFor(t, readAllAsync(rc), "the server socket to close after the EOF")
	}

	// Stream mode, no read-cb: the bytes wait in the input buffer, then
	// a reset ends them.
	ln, rport := listenRaw(t)
	st, err := l.ConnectStream("127.0.0.1", rport, nil, nil, nilOpts...)
	if err != nil {
		t.Fatalf("ConnectStream: %v", err)
	}
	peer := acceptRaw(t, ln)
	peer.Write([]byte("abc"))
	st.SetReadDeadline(time.Now().Add(waitTimeout))
	got, err := io.ReadAll(io.LimitReader(st, 3))
	if string(got) != "abc" || err != nil {
		t.Errorf("stream with no read-cb read %q, %v; want the bytes from the input buffer", got, err)
	}
	peer.SetLinger(0)
	peer.Close()
	// DontDrainReadBuffer with a nil read-cb, and a nil event-cb at a
	// read timeout and at a refused connect: logged.
	s := connectLocal(t, l, rport, nil, nil, asynctcp.DontDrainReadBuffer(), asynctcp.ReadTimeout(100*time.Millisecond))
	silent := acceptRaw(t, ln)
	silent.Write([]byte("unread"))
	connectLocal(t, l, closedPort(t), nil, nil)
	eventually(t, "the read timeout to close the socket", s.Closed)
	waitFor(t, readAllAsync(silent), "the timed-out socket's peer to see the end")

	srv.Close()
	ssrv.Close()
	waitLoop(t, l, waitTimeout)
	out := logs.String()
	for _, want := range []string{"tcp-timeout", "tcp-refused"} {
		if !strings.Contains(out, want) {
			t.Errorf("the Logger did not get the %s event: %q", want, out)
		}
	}
	if strings.Contains(out, "tcp-eof") {
		t.Errorf("an info-class event was logged: %q", out)
	}
}

// --- Server faults -------------------------------------------------------

// TestConnectionChurnLeavesNothingBehind: 2,000 connections opened and
// closed as fast as possible against a Listen echo server, in every manner
// (closed at once, after an echo, reset, asynctcp clients closed while
// connecting or after an echo), leave no goroutine and no descriptor behind
// once the loop's Wait returns (rule 21). Not parallel, so that goroutines
// and descriptors can be counted; the garbage collector is off meanwhile.
func TestConnectionChurnLeavesNothingBehind(t *testing.T) {
	const conns, workers = 2000, 16
	// No garbage collection meanwhile: a finalizer would close a conn that
	// leaked unreferenced, and hide the leak from the descriptor count.
	defer debug.SetGCPercent(debug.SetGCPercent(-1))
	rlWarmNet(t)
	before := goleak.IgnoreCurrent()
	fds, fdsOK := rlFDs()
	l := newTestLoop(t)
	var serverEvents, clientErrs atomic.Int32
	srv, err := l.Listen("127.0.0.1", 0,
		func(s *asynctcp.Socket, data []byte) { s.WriteData(data) },
		func(ev error) {
			if !errors.Is(ev, asynctcp.ErrTCPEOF) {
				serverEvents.Add(1)
				t.Errorf("server event %v, want EOFs (and resets) only", ev)
			}
		},
		asynctcp.Backlog(1024))
	if err != nil {
		t.Fatalf("Listen: %v", err)
	}
	addr := srv.Addr().String()
	port := portOf(t, srv.Addr())
	rawConn := func(i int) error {
		c, err := net.DialTimeout("tcp", addr, waitTimeout)
		if err != nil {
			return err
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(waitTimeout))
		switch i % 3 {
		case 0: // closed at once
		case 1: // an echo, then closed
			if _, err := c.Write([]byte("ping")); err != nil {
				return err
			}
			var b [4]byte
			if _, err := io.ReadFull(c, b[:]); err != nil || string(b[:]) != "ping" {
				return fmt.Errorf("echo %q: %v", b, err)
			}
		case 2: // reset
			c.Write([]byte("ping"))
			c.(*net.TCPConn).SetLinger(0)
		}
		return nil
	}
	asyncConn := func(i int, done chan<- struct{}) error {
		if i%2 == 0 { // closed while connecting: flushes its Data, then closes
			s, err := l.Connect("127.0.0.1", port, nil, func(ev error) {
				clientErrs.Add(1)
				t.Errorf("client event %v", ev)
			}, asynctcp.Data([]byte("ping")))
			if err != nil {
				return err
			}
			done <- struct{}{}
			return s.Close()
		}
		_, err := l.Connect("127.0.0.1", port,
			func(s *asynctcp.Socket, data []byte) { // the echo: done
				s.Close()
				done <- struct{}{}
			},
			func(ev error) {
				clientErrs.Add(1)
				t.Errorf("client event %v", ev)
				done <- struct{}{}
			},
			asynctcp.Data([]byte("ping")))
		return err
	}
	start := time.Now()
	done := make(chan struct{}, 2*conns)
	var next atomic.Int32
	var wg sync.WaitGroup
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1)) - 1
				if i >= conns {
					return
				}
				var err error
				if i%4 == 3 {
					err = asyncConn(i/4, done)
				} else {
					err = rawConn(i)
					done <- struct{}{}
				}
				if err != nil {
					t.Errorf("connection %d: %v", i, err)
					done <- struct{}{}
				}
			}
		}()
	}
	waitGroup(t, &wg, "the workers")
	for i := 0; i < conns; i++ {
		waitFor(t, done, fmt.Sprintf("connection %d of %d to finish", i, conns))
	}
	srv.Close()
	waitLoop(t, l, 2*waitTimeout)
	t.Logf("%d connections in %v", conns, time.Since(start).Round(time.Millisecond))
	if st := l.Stats(); st != (asynctcp.Stats{}) {
		t.Errorf("Stats after Wait = %+v, want zero", st)
	}
	if t.Failed() {
		return
	}
	verifyNoGoroutines(t, before)
	if fdsOK {
		rlWaitFDs(t, fds, "after 2,000 connections")
	}
}

// --- Soak ----------------------------------------------------------------

// rlStream is an endless stream of pseudo-random bytes: a sender and a
// checker seeded alike produce the same bytes, however each cuts them up,
// so that a soak client checks its echo without keeping what it sent.
type rlStream struct {
	rng  *rand.Rand
	w    uint64
	left int // bytes of w not handed out yet
}

func rlNewStream(seed uint64) *rlStream { return &rlStream{rng: rand.New(rand.NewPCG(seed, 2024))} }

// fill writes the next len(p) bytes of the stream into p.
func (g *rlStream) fill(p []byte) {
	for len(p) > 0 {
		if g.left == 0 && len(p) >= 8 {
			binary.LittleEndian.PutUint64(p, g.rng.Uint64())
			p = p[8:]
			continue
		}
		if g.left == 0 {
			g.w, g.left = g.rng.Uint64(), 8
		}
		p[0] = byte(g.w)
		g.w >>= 8
		g.left--
		p = p[1:]
	}
}

// rlSoakBufs holds the buffers that soak clients build their messages in,
// since WriteData copies.
var rlSoakBufs = sync.Pool{New: func() any { b := make([]byte, 64<<10); return &b }}

// rlSoakClient is one connection of TestSoak: it sends a message of random
// size (in one to three writes), checks its echo against the checker
// stream as it comes back, and sends the next once the whole echo is in.
// Its fields are touched only by its socket's callbacks.
type rlSoakClient struct {
	sizes    *rand.Rand
	gen, chk *rlStream
	scratch  [4096]byte
	left     int // bytes of the echo still due
	msgs     int64
	bytes    int64
	bad      string // the first corruption seen
	stopping *atomic.Bool
	done     chan<- *rlSoakClient
}

// send queues a new message of random size: 1 B to 4 KiB nine times in
// ten, up to 64 KiB otherwise.
func (c *rlSoakClient) send(s *asynctcp.Socket) {
	n := 1 + c.sizes.IntN(4096)
	if c.sizes.IntN(10) == 0 {
		n = 1 + c.sizes.IntN(64<<10)
	}
	bp := rlSoakBufs.Get().(*[]byte)
	defer rlSoakBufs.Put(bp)
	msg := (*bp)[:n]
	c.gen.fill(msg)
	c.left = n
	for p := 1 + c.sizes.IntN(3); p > 0; p-- {
		k := len(msg)
		if p > 1 {
			k = c.sizes.IntN(len(msg) + 1)
		}
		if err := s.WriteData(msg[:k]); err != nil && c.bad == "" {
			c.bad = fmt.Sprintf("WriteData: %v", err)
		}
		msg = msg[k:]
	}
}

func (c *rlSoakClient) read(s *asynctcp.Socket, data []byte) {
	if c.bad != "" {
		return
	}
	if len(data) > c.left {
		c.fail(s, fmt.Sprintf("message %d: %d bytes came back where %d were due", c.msgs, len(data), c.left))
		return
	}
	for p := data; len(p) > 0; {
		k := min(len(p), len(c.scratch))
		c.chk.fill(c.scratch[:k])
		if !bytes.Equal(p[:k], c.scratch[:k]) {
			c.fail(s, fmt.Sprintf("message %d: the echo differs from what was sent, %d bytes before its end", c.msgs, c.left-(len(data)-len(p))))
			return
		}
		p = p[k:]
	}
	c.left -= len(data)
	c.bytes += int64(len(data))
	if c.left > 0 {
		return
	}
	c.msgs++
	if c.stopping.Load() {
		s.Close()
		c.done <- c
		return
	}
	c.send(s)
}

func (c *rlSoakClient) fail(s *asynctcp.Socket, why string) {
	c.bad = why
	s.Close()
	c.done <- c
}

// TestSoak keeps 1,000 connections echoing messages of random sizes
// through two asynctcp servers (one lending its read buffer) for the time
// given by -soak, then asserts: no corruption (every echoed byte checked),
// no unexpected event, no leak (goroutines and descriptors back to where
// they were, the heap back to its start once collected), and a bounded
// heap while it runs.
//
// The heap bound. The test itself keeps a few KiB a connection (it checks
// the echo against a twin of the stream it sent, not a copy). Each
// connection has one message in flight, 5 KiB on average (1 B to 4 KiB
// nine times in ten, up to 64 KiB otherwise), held at most four times: the
// client's queued output, the server's copy of what it read, its queued
// echo, the client's copy of the echo; and each of the 2,000 sockets may
// hold a pooled 64 KiB read buffer while its read-cb waits or runs. That
// makes a live heap of about 20 MiB plus the read buffers in use, which
// the garbage collector lets grow to about twice that before it collects
// (GOGC 100): measured, 10 to 35 MiB live and HeapInuse peaks of 80 to
// 125 MiB. The worst case, every connection at a 64 KiB message at once,
// is 1,000 x 4 x 64 KiB = 250 MiB live. The bound, 256 MiB over the heap
// at the start, holds that worst case's live heap, twice the peaks
// seen, and still catches a leak of 100 bytes a message within a minute
// (some 2 million messages). Separately, the median of the last third of
// the samples must not pass that of the first third by more than half
// (plus 16 MiB), so that slow growth shows in a long run.
//
// Run it with: go test -run TestSoak -soak 60s .
func TestSoak(t *testing.T) {
	if *soak <= 0 {
		t.Log("TestSoak runs only when given a duration: go test -run TestSoak -soak 60s .")
		return
	}
	const (
		conns     = 1000
		heapBound = 256 << 20
	)
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	baseHeap := ms.HeapInuse
	rlWarmNet(t)
	before := goleak.IgnoreCurrent()
	fds, fdsOK := rlFDs()

	l := &asynctcp.Loop{}
	var serverErrs atomic.Int32
	serverEvent := func(ev error) {
		if !errors.Is(ev, asynctcp.ErrTCPEOF) {
			serverErrs.Add(1)
			t.Errorf("server event %v", ev)
		}
	}
	echo := func(s *asynctcp.Socket, data []byte) { s.WriteData(data) }
	var srvs []*asynctcp.Server
	for _, opts := range [][]asynctcp.Option{{asynctcp.Backlog(conns)}, {asynctcp.Backlog(conns), asynctcp.ReuseReadBuffer()}} {
		srv, err := l.Listen("127.0.0.1", 0, echo, serverEvent, opts...)
		if err != nil {
			t.Fatalf("Listen: %v", err)
		}
		srvs = append(srvs, srv)
	}
	var stopping atomic.Bool
	var clientErrs atomic.Int32
	done := make(chan *rlSoakClient, conns)
	for i := 0; i < conns; i++ {
		c := &rlSoakClient{sizes: rand.New(rand.NewPCG(uint64(i), 6)), gen: rlNewStream(uint64(i)), chk: rlNewStream(uint64(i)), stopping: &stopping, done: done}
		_, err := l.Connect("127.0.0.1", portOf(t, srvs[i%2].Addr()), c.read,
			func(ev error) {
				clientErrs.Add(1)
				t.Errorf("client %d event %v", i, ev)
			},
			asynctcp.OnConnect(c.send))
		if err != nil {
			t.Fatalf("Connect %d: %v", i, err)
		}
	}

	start := time.Now()
	var samples []uint64
	tick := time.NewTicker(time.Second)
	for time.Since(start) < *soak && !t.Failed() {
		<-tick.C
		runtime.ReadMemStats(&ms)
		samples = append(samples, ms.HeapInuse)
	}
	tick.Stop()
	stopping.Store(true)
	var msgs, nbytes int64
	deadline := time.After(30 * time.Second)
	for i := 0; i < conns; i++ {
		select {
		case c := <-done:
			msgs += c.msgs
			nbytes += c.bytes
			if c.bad != "" {
				t.Errorf("corruption: %s", c.bad)
			}
		case <-deadline:
			l.Exit(errors.New("soak: clients did not finish"))
			l.Wait()
			t.Fatalf("only %d of %d clients finished their last message within 30s of the stop (stats %+v)", i, conns, l.Stats())
		}
	}
	elapsed := time.Since(start)
	for _, srv := range srvs {
		srv.Close()
	}
	select {
	case <-goWait(l):
	case <-time.After(30 * time.Second):
		l.Exit(errors.New("soak: Wait hung"))
		t.Fatalf("Loop.Wait did not return within 30s (stats %+v)", l.Stats())
	}

	var peak uint64
	for _, s := range samples {
		peak = max(peak, s)
	}
	third := len(samples) / 3
	median := func(xs []uint64) uint64 {
		if len(xs) == 0 {
			return 0
		}
		xs = append([]uint64(nil), xs...)
		sort.Slice(xs, func(i, j int) bool { return xs[i] < xs[j] })
		return xs[len(xs)/2]
	}
	early, late := median(samples[:third]), median(samples[len(samples)-third:])
	mib := func(b uint64) string { return fmt.Sprintf("%.1f MiB", float64(b)/(1<<20)) }
	t.Logf("%d connections for %v: %d messages echoed (%.0f/s), %.1f MiB each way (%.1f MiB/s)",
		conns, elapsed.Round(time.Millisecond), msgs, float64(msgs)/elapsed.Seconds(),
		float64(nbytes)/(1<<20), float64(nbytes)/(1<<20)/elapsed.Seconds())
	t.Logf("HeapInuse: %s at the start, peak %s, median of the first third %s, of the last third %s (bound: start + %s)",
		mib(baseHeap), mib(peak), mib(early), mib(late), mib(heapBound))
	if peak > baseHeap+heapBound {
		t.Errorf("HeapInuse peaked at %s, over the bound of %s", mib(peak), mib(baseHeap+heapBound))
	}
	if third > 0 && late > early+early/2+16<<20 {
		t.Errorf("HeapInuse grew from a median of %s (first third) to %s (last third)", mib(early), mib(late))
	}
	if msgs == 0 {
		t.Error("no message echoed")
	}
	if t.Failed() {
		return
	}
	verifyNoGoroutines(t, before)
	if fdsOK {
		rlWaitFDs(t, fds, "after the soak")
	}
	runtime.GC()
	runtime.GC() // the second empties the pools' victim caches
	runtime.ReadMemStats(&ms)
	t.Logf("HeapInuse after the soak, collected: %s", mib(ms.HeapInuse))
	if ms.HeapInuse > baseHeap+16<<20 {
		t.Errorf("HeapInuse is %s once everything closed and was collected, %s at the start: the heap leaked", mib(ms.HeapInuse), mib(baseHeap))
	}
}
