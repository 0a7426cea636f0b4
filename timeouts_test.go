package asynctcp_test

import (
	"context"
	"errors"
	"io"
	"net"
	"os"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/asynctcp/asynctcp"
)

// These tests prove the bufferevent behaviour of SPEC rules 9 to 11 (read
// and write timeouts, Enable and Disable, graceful close) on real loopback
// connections. Timing bounds are generous: the machine is shared and noisy.

// beSlack is what an upper bound on a timer allows beyond the timer.
const beSlack = 3 * time.Second

// beStable samples f every 300ms until two samples in a row are equal and
// returns that value, failing the test after waitTimeout.
func beStable(t *testing.T, what string, f func() int) int {
	t.Helper()
	deadline := time.Now().Add(waitTimeout)
	prev := f()
	for {
		time.Sleep(300 * time.Millisecond)
		cur := f()
		if cur == prev {
			return cur
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s still changing after %v (last %d)", what, waitTimeout, cur)
		}
		prev = cur
	}
}

// beWantTimeout fails the test unless err is an ErrTCPTimeout event with
// Code -1.
func beWantTimeout(t *testing.T, err error, what string) *asynctcp.Event {
	t.Helper()
	ev := wantClass(t, err, asynctcp.ErrTCPTimeout, what)
	if ev.Code != -1 {
		t.Errorf("%s: timeout event Code %d, want -1", what, ev.Code)
	}
	return ev
}

// beWithin fails the test unless elapsed lies in [0.8*d, d+slack).
func beWithin(t *testing.T, elapsed, d, slack time.Duration, what string) {
	t.Helper()
	if elapsed < d*8/10 || elapsed >= d+slack {
		t.Errorf("%s after %v, want between %v and %v", what, elapsed, d*8/10, d+slack)
	}
}

// beDeaf makes c a peer that never reads: a small fixed receive buffer, so
// that a sender is held back after a few hundred KiB.
func beDeaf(c *net.TCPConn) { c.SetReadBuffer(64 << 10) }

// beConnected is a connect-cb that hands the socket to a channel.
func beConnected(ch chan<- *asynctcp.Socket) asynctcp.Option {
	return asynctcp.OnConnect(func(s *asynctcp.Socket) { ch <- s })
}

// bePeerClosed waits until the raw peer c sees the connection end (EOF or
// reset), discarding what it reads.
func bePeerClosed(t *testing.T, c net.Conn) {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(waitTimeout))
	_, err := io.Copy(io.Discard, c)
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		t.Fatalf("the raw peer's connection is still open after %v", waitTimeout)
	}
}

// TestReadTimeoutAbortsIdleSocket: with a read timeout (Connect, Listen,
// SetTimeouts) and nothing arriving, the socket gets ErrTCPTimeout (Code
// -1), is aborted, and the loop ends. Sub-second values work.
func TestReadTimeoutAbortsIdleSocket(t *testing.T) {
	const d = 150 * time.Millisecond
	cases := []struct {
		name string
		// start sets up an idle connection whose asynctcp end has a read
		// timeout of d, with events going to rec. It returns when the
		// timeout's clock started at the latest, the raw peer, and what
		// to do once the socket is gone.
		start func(t *testing.T, l *asynctcp.Loop, rec *eventRecorder) (time.Time, net.Conn, func())
	}{
		{"ReadTimeout on Connect", func(t *testing.T, l *asynctcp.Loop, rec *eventRecorder) (time.Time, net.Conn, func()) {
			ln, port := listenRaw(t)
			begin := time.Now()
			connectLocal(t, l, port, nil, rec.cb, asynctcp.ReadTimeout(d))
			return begin, acceptRawKeepBuf(t, ln), func() {}
		}},
		{"ReadTimeout on Listen", func(t *testing.T, l *asynctcp.Loop, rec *eventRecorder) (time.Time, net.Conn, func()) {
			srv, port := listenLocal(t, l, nil, rec.cb, asynctcp.ReadTimeout(d))
			begin := time.Now()
			c := dialRaw(t, port)
			// The server stays open until closed; close it once its
			// accepted socket is gone.
			return begin, c, func() { srv.Close() }
		}},
		{"SetTimeouts on a waiting read", func(t *testing.T, l *asynctcp.Loop, rec *eventRecorder) (time.Time, net.Conn, func()) {
			ln, port := listenRaw(t)
			conn := make(chan *asynctcp.Socket, 1)
			connectLocal(t, l, port, nil, rec.cb, beConnected(conn))
			c := acceptRawKeepBuf(t, ln)
			s := waitFor(t, conn, "connect-cb")
			begin := time.Now()
			if err := s.SetTimeouts(d, 0); err != nil {
				t.Fatalf("SetTimeouts(%v, 0): %v", d, err)
			}
			return begin, c, func() {}
		}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			l := newTestLoop(t)
			rec := newEventRecorder()
			begin, peer, after := tc.start(t, l, rec)
			ev := beWantTimeout(t, waitForWithin(t, rec.ch, d+waitTimeout, "the read timeout event"), "read timeout")
			beWithin(t, time.Since(begin), d, beSlack, "read timeout fired")
			if ev.Socket == nil {
				t.Fatal("timeout event has no Socket")
			}
			bePeerClosed(t, peer)
			after()
			waitLoopNil(t, l, waitTimeout)
			// The socket is aborted once its event-cb has returned.
			if !ev.Socket.Closed() {
				t.Error("socket not Closed() after its timeout event")
			}
			if n := rec.n.Load(); n != 1 {
				t.Errorf("%d events, want 1", n)
			}
		})
	}
}

// TestReadTimeoutRestartsOnEachArrival: a peer that sends a byte every d/4
// for about 3d keeps the socket alive; the timeout fires only once the
// peer has gone quiet for d.
func TestReadTimeoutRestartsOnEachArrival(t *testing.T) {
	const (
		d     = 500 * time.Millisecond
		every = d / 4
		sends = 12 // 3d
	)
	l := newTestLoop(t)
	ln, port := listenRaw(t)
	var got atomic.Int32
	rec := newEventRecorder()
	var atEvent atomic.Int32
	connectLocal(t, l, port,
		func(s *asynctcp.Socket, data []byte) { got.Add(int32(len(data))) },
		func(ev error) { atEvent.Store(got.Load()); rec.cb(ev) },
		asynctcp.ReadTimeout(d))
	peer := acceptRawKeepBuf(t, ln)

	lastSend := make(chan time.Time, 1)
	goOwned(t, "peer sender", func() {
		for i := 0; i < sends; i++ {
			time.Sleep(every)
			if _, err := peer.Write([]byte{byte(i)}); err != nil {
				return
			}
		}
		lastSend <- time.Now()
	}, peer)

	ev := waitForWithin(t, rec.ch, sends*every+d+waitTimeout, "the read timeout event")
	last := waitFor(t, lastSend, "the peer's last send")
	beWantTimeout(t, ev, "read timeout after the peer went quiet")
	if n := atEvent.Load(); n != sends {
		t.Errorf("the read timeout fired after %d of the peer's %d bytes, want after all of them", n, sends)
	}
	beWithin(t, time.Since(last), d, beSlack, "read timeout fired after the last byte")
	bePeerClosed(t, peer)
	waitLoopNil(t, l, waitTimeout)
}

// TestSetTimeoutsZeroClears: SetTimeouts(0, 0) clears both timeouts, from
// the connect-cb (before any read or write) or under a read that waits
// with its deadline armed.
func TestSetTimeoutsZeroClears(t *testing.T) {
	t.Run("in connect-cb, with output stuck", func(t *testing.T) {
		const (
			d    = 150 * time.Millisecond
			size = 16 << 20
		)
		l := newTestLoop(t)
		ln, port := listenRaw(t)
		rec := newEventRecorder()
		setErr := make(chan error, 1)
		reads := make(chan []byte, 16)
		drained := make(chan struct{}, 1)
		s := connectLocal(t, l, port,
			func(s *asynctcp.Socket, data []byte) { reads <- data },
			rec.cb,
			asynctcp.ReadTimeout(d), asynctcp.WriteTimeout(d),
			asynctcp.OnConnect(func(s *asynctcp.Socket) {
				setErr <- s.SetTimeouts(0, 0)
				s.WriteData(makePatternAt(0, size))
			}),
			asynctcp.OnWrite(func(*asynctcp.Socket) {
				select {
				case drained <- struct{}{}:
				default:
				}
			}))
		peer := acceptRawKeepBuf(t, ln)
		beDeaf(peer)
		if err := waitFor(t, setErr, "SetTimeouts in the connect-cb"); err != nil {
			t.Fatalf("SetTimeouts(0, 0): %v", err)
		}
		expectNone(t, rec.ch, 3*d, "event after SetTimeouts(0, 0), with no input and output stuck")
		if b := s.Buffered(); b == 0 {
			t.Fatalf("Buffered() = 0: the output was never stuck, the write timeout was not exercised")
		}

		// The socket is alive: the peer gets every byte, and it reads.
		peer.SetReadDeadline(time.Now().Add(waitTimeout))
		buf := make([]byte, size)
		if _, err := io.ReadFull(peer, buf); err != nil {
			t.Fatalf("peer reading the %d bytes: %v", size, err)
		}
		if !isPatternAt(0, buf) {
			t.Error("the peer got other bytes than were written")
		}
		waitFor(t, drained, "write-cb after the output drained")
		peer.Write([]byte("x"))
		if got := waitFor(t, reads, "read-cb"); string(got) != "x" {
			t.Errorf("read-cb got %q, want %q", got, "x")
		}
		if err := s.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
		bePeerClosed(t, peer)
		waitLoopNil(t, l, waitTimeout)
		if n := rec.n.Load(); n != 0 {
			t.Errorf("%d events, want none", n)
		}
	})

	t.Run("under a waiting read", func(t *testing.T) {
		const d = 300 * time.Millisecond
		l := newTestLoop(t)
		ln, port := listenRaw(t)
		rec := newEventRecorder()
		conn := make(chan *asynctcp.Socket, 1)
		reads := make(chan []byte, 16)
		connectLocal(t, l, port,
			func(s *asynctcp.Socket, data []byte) { reads <- data },
			rec.cb, asynctcp.ReadTimeout(d), beConnected(conn))
		peer := acceptRawKeepBuf(t, ln)
		s := waitFor(t, conn, "connect-cb")
		if err := s.SetTimeouts(0, 0); err != nil {
			t.Fatalf("SetTimeouts(0, 0): %v", err)
		}
		expectNone(t, rec.ch, 3*d, "event after SetTimeouts(0, 0)")
		peer.Write([]byte("x"))
		if got := waitFor(t, reads, "read-cb"); string(got) != "x" {
			t.Errorf("read-cb got %q, want %q", got, "x")
		}
		s.Close()
		bePeerClosed(t, peer)
		waitLoopNil(t, l, waitTimeout)
		if n := rec.n.Load(); n != 0 {
			t.Errorf("%d events, want none", n)
		}
	})
}

// TestNegativeTimeoutIsError: a negative ReadTimeout or WriteTimeout is an
// error of the call that gets it, naming the option; SetTimeouts with a
// negative value is an error and changes nothing.
func TestNegativeTimeoutIsError(t *testing.T) {
	l := newTestLoop(t)
	ln, port := listenRaw(t)

	if s, err := l.Connect("127.0.0.1", port, nil, nil, asynctcp.ReadTimeout(-time.Second)); err == nil {
		s.Abort()
		t.Error("Connect with ReadTimeout(-1s): no error")
	} else if !strings.Contains(err.Error(), "ReadTimeout") {
		t.Errorf("Connect with ReadTimeout(-1s): error %q does not name ReadTimeout", err)
	}
	if s, err := l.Connect("127.0.0.1", port, nil, nil, asynctcp.WriteTimeout(-1)); err == nil {
		s.Abort()
		t.Error("Connect with WriteTimeout(-1ns): no error")
	} else if !strings.Contains(err.Error(), "WriteTimeout") {
		t.Errorf("Connect with WriteTimeout(-1ns): error %q does not name WriteTimeout", err)
	}
	if srv, err := l.Listen("127.0.0.1", 0, nil, nil, asynctcp.ReadTimeout(-time.Millisecond)); err == nil {
		srv.Close()
		t.Error("Listen with ReadTimeout(-1ms): no error")
	} else if !strings.Contains(err.Error(), "ReadTimeout") {
		t.Errorf("Listen with ReadTimeout(-1ms): error %q does not name ReadTimeout", err)
	}
	if srv, err := l.Listen("127.0.0.1", 0, nil, nil, asynctcp.WriteTimeout(-time.Hour)); err == nil {
		srv.Close()
		t.Error("Listen with WriteTimeout(-1h): no error")
	} else if !strings.Contains(err.Error(), "WriteTimeout") {
		t.Errorf("Listen with WriteTimeout(-1h): error %q does not name WriteTimeout", err)
	}

	// The raw listener never accepts: the kernel completes the connect.
	rec := newEventRecorder()
	conn := make(chan *asynctcp.Socket, 1)
	connectLocal(t, l, port, nil, rec.cb, beConnected(conn))
	s := waitFor(t, conn, "connect-cb")
	for _, rw := range [][2]time.Duration{{-1, 0}, {0, -1}, {-time.Second, -time.Second}, {time.Second, -1}} {
		if err := s.SetTimeouts(rw[0], rw[1]); err == nil {
			t.Errorf("SetTimeouts(%v, %v): no error", rw[0], rw[1])
		}
	}
	if s.Closed() {
		t.Fatal("socket closed by a refused SetTimeouts")
	}
	// Nothing was set: the socket stays idle without an event.
	expectNone(t, rec.ch, 500*time.Millisecond, "event after refused SetTimeouts")
	if err := s.Close(); err != nil {
		t.Errorf("Close: %v", err)
	}
	ln.Close()
	waitLoopNil(t, l, waitTimeout)
}

// TestReadTimeoutOnlyWhileReadingEnabled: with reading disabled the read
// timeout does not fire; Enable(EvRead) starts it again.
func TestReadTimeoutOnlyWhileReadingEnabled(t *testing.T) {
	cases := []struct {
		name string
		d    time.Duration
		// inConnectCb: the read timeout is an option of Connect and the
		// connect-cb disables reading before the first read. Otherwise the
		// test sets the timeout under a read that waits, then disables
		// reading at once.
		inConnectCb bool
	}{
		{"disabled in connect-cb", 150 * time.Millisecond, true},
		{"disabled under a waiting read", 300 * time.Millisecond, false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			d := tc.d
			l := newTestLoop(t)
			ln, port := listenRaw(t)
			rec := newEventRecorder()
			conn := make(chan *asynctcp.Socket, 1)
			opts := []asynctcp.Option{beConnected(conn)}
			if tc.inConnectCb {
				opts = []asynctcp.Option{asynctcp.ReadTimeout(d), asynctcp.OnConnect(func(s *asynctcp.Socket) {
					if err := s.Disable(asynctcp.EvRead); err != nil {
						t.Errorf("Disable(EvRead) in connect-cb: %v", err)
					}
					conn <- s
				})}
			}
			connectLocal(t, l, port, nil, rec.cb, opts...)
			peer := acceptRawKeepBuf(t, ln)
			s := waitFor(t, conn, "connect-cb")
			if !tc.inConnectCb {
				if err := s.SetTimeouts(d, 0); err != nil {
					t.Fatalf("SetTimeouts(%v, 0): %v", d, err)
				}
				if err := s.Disable(asynctcp.EvRead); err != nil {
					t.Fatalf("Disable(EvRead): %v", err)
				}
			}
			expectNone(t, rec.ch, 3*d, "event while reading is disabled")

			begin := time.Now()
			if err := s.Enable(asynctcp.EvRead); err != nil {
				t.Fatalf("Enable(EvRead): %v", err)
			}
			ev := beWantTimeout(t, waitForWithin(t, rec.ch, d+waitTimeout, "the read timeout after Enable(EvRead)"), "read timeout after Enable")
			beWithin(t, time.Since(begin), d, beSlack, "read timeout fired after Enable(EvRead)")
			if ev.Socket != s {
				t.Errorf("event Socket %p, want %p", ev.Socket, s)
			}
			bePeerClosed(t, peer)
			waitLoopNil(t, l, waitTimeout)
			if !s.Closed() {
				t.Error("socket not Closed() after its timeout event")
			}
		})
	}
}

// TestWriteTimeoutWhenPeerNeverReads: output queued to a peer that never
// reads cannot be written; after d the socket gets ErrTCPTimeout (Code -1)
// and is aborted. On Connect and on Listen's accepted sockets.
func TestWriteTimeoutWhenPeerNeverReads(t *testing.T) {
	const (
		d    = 200 * time.Millisecond
		size = 32 << 20
	)
	cases := []struct {
		name   string
		listen bool
	}{
		{"WriteTimeout on Connect", false},
		{"WriteTimeout on Listen", true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			l := newTestLoop(t)
			rec := newEventRecorder()
			wrote := make(chan time.Time, 1)
			opts := []asynctcp.Option{
				asynctcp.WriteTimeout(d),
				asynctcp.OnConnect(func(s *asynctcp.Socket) {
					wrote <- time.Now()
					if err := s.WriteData(makePatternAt(0, size)); err != nil {
						t.Errorf("WriteData: %v", err)
					}
				}),
			}
			var peer *net.TCPConn
			var srv *asynctcp.Server
			if tc.listen {
				var port int
				srv, port = listenLocal(t, l, nil, rec.cb, opts...)
				peer = dialRaw(t, port)
			} else {
				ln, port := listenRaw(t)
				connectLocal(t, l, port, nil, rec.cb, opts...)
				peer = acceptRawKeepBuf(t, ln)
			}
			beDeaf(peer)
			begin := waitFor(t, wrote, "connect-cb")
			ev := beWantTimeout(t, waitForWithin(t, rec.ch, d+waitTimeout, "the write timeout event"), "write timeout")
			// The kernel buffers fill first, then the clock runs for d.
			beWithin(t, time.Since(begin), d, 2*beSlack, "write timeout fired")
			if ev.Socket == nil {
				t.Fatal("timeout event has no Socket")
			}
			bePeerClosed(t, peer)
			if srv != nil {
				srv.Close()
			}
			waitLoopNil(t, l, waitTimeout)
			if !ev.Socket.Closed() {
				t.Error("socket not Closed() after its timeout event")
			}
			if n := rec.n.Load(); n != 1 {
				t.Errorf("%d events, want 1", n)
			}
		})
	}
}

// TestNoWriteTimeoutWithoutQueuedOutput: the write timeout counts only
// while output is queued; an idle socket, before or after a write that
// drained, gets no event.
func TestNoWriteTimeoutWithoutQueuedOutput(t *testing.T) {
	const d = 150 * time.Millisecond
	l := newTestLoop(t)
	ln, port := listenRaw(t)
	rec := newEventRecorder()
	conn := make(chan *asynctcp.Socket, 1)
	drained := make(chan struct{}, 4)
	connectLocal(t, l, port, nil, rec.cb, asynctcp.WriteTimeout(d), beConnected(conn),
		asynctcp.OnWrite(func(*asynctcp.Socket) { drained <- struct{}{} }))
	peer := acceptRawKeepBuf(t, ln)
	s := waitFor(t, conn, "connect-cb")
	expectNone(t, rec.ch, 3*d, "event on an idle socket with a write timeout")

	if err := s.WriteData([]byte("ping")); err != nil {
		t.Fatalf("WriteData: %v", err)
	}
	peer.SetReadDeadline(time.Now().Add(waitTimeout))
	buf := make([]byte, 4)
	if _, err := io.ReadFull(peer, buf); err != nil || string(buf) != "ping" {
		t.Fatalf("peer read %q, %v; want \"ping\"", buf, err)
	}
	waitFor(t, drained, "write-cb")
	expectNone(t, rec.ch, 3*d, "event on a drained idle socket with a write timeout")

	if err := s.Close(); err != nil {
		t.Errorf("Close: %v", err)
	}
	bePeerClosed(t, peer)
	waitLoopNil(t, l, waitTimeout)
	if n := rec.n.Load(); n != 0 {
		t.Errorf("%d events, want none", n)
	}
}

// beHangingDialer returns a dialer whose DNS lookups never get an answer:
// its resolver's Dial blocks until the lookup's context ends. No traffic
// leaves the machine.
func beHangingDialer(calls *atomic.Int32) *net.Dialer {
	return &net.Dialer{Resolver: &net.Resolver{
		PreferGo: true,
		Dial: func(ctx context.Context, network, address string) (net.Conn, error) {
			calls.Add(1)
			<-ctx.Done()
			return nil, ctx.Err()
		},
	}}
}

// TestConnectBoundedByTimeout: a connect whose DNS lookup hangs ends in
// ErrTCPTimeout once the read timeout (or else the write timeout) passes.
func TestConnectBoundedByTimeout(t *testing.T) {
	const d = 200 * time.Millisecond
	cases := []struct {
		name string
		opt  asynctcp.Option
	}{
		{"ReadTimeout", asynctcp.ReadTimeout(d)},
		{"WriteTimeout", asynctcp.WriteTimeout(d)},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			l := newTestLoop(t)
			rec := newEventRecorder()
			var calls atomic.Int32
			connected := make(chan *asynctcp.Socket, 1)
			begin := time.Now()
			s, err := l.Connect("hang.test", 80, nil, rec.cb, tc.opt,
				asynctcp.Dialer(beHangingDialer(&calls)), beConnected(connected))
			if err != nil {
				t.Fatalf("Connect: %v", err)
			}
			ev := waitForWithin(t, rec.ch, d+waitTimeout, "the connect timeout event")
			elapsed := time.Since(begin)
			if calls.Load() == 0 {
				t.Errorf("the resolver was never asked: the connect did not hang in DNS (event %v)", ev)
			}
			got := beWantTimeout(t, ev, "connect with a hanging DNS lookup")
			beWithin(t, elapsed, d, 5*time.Second-d, "connect timed out")
			if got.Socket != s {
				t.Errorf("event Socket %p, want %p", got.Socket, s)
			}
			select {
			case <-connected:
				t.Error("connect-cb ran for a connect that timed out")
			default:
			}
			waitLoopNil(t, l, waitTimeout)
			if !s.Closed() {
				t.Error("socket not Closed() after its connect timeout event")
			}
			if n := rec.n.Load(); n != 1 {
				t.Errorf("%d events, want 1", n)
			}
		})
	}
}

// TestDisableReadAppliesBackPressure: with reading disabled from the
// connect-cb, a peer writing as fast as it can is stopped by TCP flow
// control once the kernel buffers fill, and no read-cb runs; after
// Enable(EvRead) every byte arrives, in order, then the peer's EOF.
func TestDisableReadAppliesBackPressure(t *testing.T) {
	const (
		total = 32 << 20
		chunk = 64 << 10
	)
	l := newTestLoop(t)
	ln, port := listenRaw(t)
	rec := newEventRecorder()
	var (
		enabled      atomic.Bool // set before Enable(EvRead)
		earlyReads   atomic.Int32
		received     int // read-cb only: callbacks never overlap
		mismatchAt   = -1
		allReceived  = make(chan struct{})
		disableError = make(chan error, 1)
	)
	read := func(s *asynctcp.Socket, data []byte) {
		if !enabled.Load() {
			earlyReads.Add(1)
		}
		if mismatchAt < 0 && !isPatternAt(received, data) {
			mismatchAt = received
		}
		received += len(data)
		if received == total {
			close(allReceived)
		}
	}
	s := connectLocal(t, l, port, read, rec.cb, asynctcp.OnConnect(func(s *asynctcp.Socket) {
		disableError <- s.Disable(asynctcp.EvRead)
	}))
	peer := acceptRawKeepBuf(t, ln)
	if err := waitFor(t, disableError, "Disable(EvRead) in the connect-cb"); err != nil {
		t.Fatalf("Disable(EvRead): %v", err)
	}

	var written atomic.Int64
	peerDone := make(chan error, 1)
	goOwned(t, "flooding peer", func() {
		for off := 0; off < total; off += chunk {
			n, err := peer.Write(patternAt(off, min(chunk, total-off)))
			written.Add(int64(n))
			if err != nil {
				peerDone <- err
				return
			}
		}
		peerDone <- peer.Close()
	}, peer)

	stalled := beStable(t, "the flooding peer's byte count", func() int { return int(written.Load()) })
	t.Logf("the peer stalled after %d bytes (%.1f MiB) with reading disabled", stalled, float64(stalled)/(1<<20))
	if stalled >= total {
		t.Fatalf("the peer wrote all %d bytes while reading was disabled: no back-pressure", total)
	}
	if stalled >= 64<<20 {
		t.Errorf("the peer wrote %d bytes while reading was disabled, want under 64 MiB", stalled)
	}
	if n := earlyReads.Load(); n != 0 {
		t.Errorf("%d read-cbs ran while reading was disabled", n)
	}
	if b := s.Buffered(); b != 0 {
		t.Errorf("Buffered() = %d on a socket that wrote nothing", b)
	}

	enabled.Store(true)
	if err := s.Enable(asynctcp.EvRead); err != nil {
		t.Fatalf("Enable(EvRead): %v", err)
	}
	if err := waitFor(t, peerDone, "the peer to finish writing"); err != nil {
		t.Fatalf("peer: %v", err)
	}
	waitFor(t, allReceived, "every byte after Enable(EvRead)")
	ev := waitFor(t, rec.ch, "the EOF event")
	if !errors.Is(ev, asynctcp.ErrTCPEOF) {
		t.Errorf("event %v, want ErrTCPEOF", ev)
	}
	waitLoopNil(t, l, waitTimeout)
	if mismatchAt >= 0 {
		t.Errorf("the bytes from offset %d are not the peer's", mismatchAt)
	}
	if received != total {
		t.Errorf("received %d bytes, want %d", received, total)
	}
}

// TestDisableWriteHoldsOutput: with writing disabled, queued output stays
// queued (the peer gets nothing) until Enable(EvWrite); enabling or
// disabling twice is harmless, for either direction.
func TestDisableWriteHoldsOutput(t *testing.T) {
	const size = 1 << 20
	l := newTestLoop(t)
	ln, port := listenRaw(t)
	rec := newEventRecorder()
	conn := make(chan *asynctcp.Socket, 1)
	reads := make(chan []byte, 16)
	drained := make(chan struct{}, 1)
	connectLocal(t, l, port,
		func(s *asynctcp.Socket, data []byte) { reads <- data },
		rec.cb, beConnected(conn),
		asynctcp.OnWrite(func(*asynctcp.Socket) {
			select {
			case drained <- struct{}{}:
			default:
			}
		}))
	peer := acceptRawKeepBuf(t, ln)
	s := waitFor(t, conn, "connect-cb")

	for i := 0; i < 2; i++ {
		if err := s.Disable(asynctcp.EvWrite); err != nil {
			t.Fatalf("Disable(EvWrite) #%d: %v", i+1, err)
		}
	}
	if err := s.WriteData(makePatternAt(0, size)); err != nil {
		t.Fatalf("WriteData: %v", err)
	}
	peer.SetReadDeadline(time.Now().Add(500 * time.Millisecond))
	var one [1]byte
	if n, err := peer.Read(one[:]); n != 0 || !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("with writing disabled the peer read %d bytes (%v), want none before its deadline", n, err)
	}
	if b := s.Buffered(); b != size {
		t.Errorf("Buffered() = %d with writing disabled, want %d", b, size)
	}
	select {
	case <-drained:
		t.Error("write-cb ran while writing was disabled")
	default:
	}

	for i := 0; i < 2; i++ {
		if err := s.Enable(asynctcp.EvWrite); err != nil {
			t.Fatalf("Enable(EvWrite) #%d: %v", i+1, err)
		}
	}
	peer.SetReadDeadline(time.Now().Add(waitTimeout))
	buf := make([]byte, size)
	if _, err := io.ReadFull(peer, buf); err != nil {
		t.Fatalf("peer reading after Enable(EvWrite): %v", err)
	}
	if !isPatternAt(0, buf) {
		t.Error("the peer got other bytes than were written")
	}
	waitFor(t, drained, "write-cb after Enable(EvWrite)")

	// Reading too survives being disabled and enabled twice.
	for i := 0; i < 2; i++ {
		if err := s.Disable(asynctcp.EvRead); err != nil {
			t.Fatalf("Disable(EvRead) #%d: %v", i+1, err)
		}
	}
	for i := 0; i < 2; i++ {
		if err := s.Enable(asynctcp.EvRead); err != nil {
			t.Fatalf("Enable(EvRead) #%d: %v", i+1, err)
		}
	}
	peer.Write([]byte("x"))
	if got := waitFor(t, reads, "read-cb"); string(got) != "x" {
		t.Errorf("read-cb got %q, want %q", got, "x")
	}

	if err := s.Close(); err != nil {
		t.Errorf("Close: %v", err)
	}
	bePeerClosed(t, peer)
	waitLoopNil(t, l, waitTimeout)
	if n := rec.n.Load(); n != 0 {
		t.Errorf("%d events, want none", n)
	}
}

// TestDisableWriteSuspendsWriteTimeout: while writing is disabled, queued
// output that cannot be written does not time out; Enable(EvWrite) starts
// the clock again. Disabled before the output is queued, or under a write
// that waits with its deadline armed.
func TestDisableWriteSuspendsWriteTimeout(t *testing.T) {
	const size = 32 << 20
	cases := []struct {
		name string
		d    time.Duration
		// underWrite: the output is queued first, the writer blocks, then
		// the timeout is set and writing disabled at once. Otherwise the
		// write timeout is an option of Connect and writing is disabled
		// before the output is queued.
		underWrite bool
	}{
		{"disabled before output", 150 * time.Millisecond, false},
		{"disabled under a waiting write", 300 * time.Millisecond, true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			d := tc.d
			l := newTestLoop(t)
			ln, port := listenRaw(t)
			rec := newEventRecorder()
			conn := make(chan *asynctcp.Socket, 1)
			opts := []asynctcp.Option{beConnected(conn)}
			if !tc.underWrite {
				opts = append(opts, asynctcp.WriteTimeout(d))
			}
			connectLocal(t, l, port, nil, rec.cb, opts...)
			peer := acceptRawKeepBuf(t, ln)
			beDeaf(peer)
			s := waitFor(t, conn, "connect-cb")

			if tc.underWrite {
				if err := s.WriteData(makePatternAt(0, size)); err != nil {
					t.Fatalf("WriteData: %v", err)
				}
				left := beStable(t, "Buffered()", s.Buffered)
				if left == 0 {
					t.Fatal("all the output was written to a peer that never reads")
				}
				if err := s.SetTimeouts(0, d); err != nil {
					t.Fatalf("SetTimeouts(0, %v): %v", d, err)
				}
				if err := s.Disable(asynctcp.EvWrite); err != nil {
					t.Fatalf("Disable(EvWrite): %v", err)
				}
			} else {
				if err := s.Disable(asynctcp.EvWrite); err != nil {
					t.Fatalf("Disable(EvWrite): %v", err)
				}
				if err := s.WriteData(makePatternAt(0, size)); err != nil {
					t.Fatalf("WriteData: %v", err)
				}
			}
			expectNone(t, rec.ch, 3*d, "event while writing is disabled")

			begin := time.Now()
			if err := s.Enable(asynctcp.EvWrite); err != nil {
				t.Fatalf("Enable(EvWrite): %v", err)
			}
			ev := beWantTimeout(t, waitForWithin(t, rec.ch, d+waitTimeout, "the write timeout after Enable(EvWrite)"), "write timeout after Enable")
			beWithin(t, time.Since(begin), d, 2*beSlack, "write timeout fired after Enable(EvWrite)")
			if ev.Socket != s {
				t.Errorf("event Socket %p, want %p", ev.Socket, s)
			}
			bePeerClosed(t, peer)
			waitLoopNil(t, l, waitTimeout)
			if !s.Closed() {
				t.Error("socket not Closed() after its timeout event")
			}
		})
	}
}

// TestCloseHonoursWriteTimeout: a graceful Close whose peer never reads
// gives up after the write timeout instead of flushing forever.
func TestCloseHonoursWriteTimeout(t *testing.T) {
	const (
		d    = 300 * time.Millisecond
		size = 64 << 20
	)
	l := newTestLoop(t)
	ln, port := listenRaw(t)
	rec := newEventRecorder()
	closed := make(chan error, 1)
	begin := time.Now()
	s := connectLocal(t, l, port, nil, rec.cb, asynctcp.WriteTimeout(d),
		asynctcp.OnConnect(func(s *asynctcp.Socket) {
			if err := s.WriteData(makePatternAt(0, size)); err != nil {
				t.Errorf("WriteData: %v", err)
			}
			closed <- s.Close()
		}))
	peer := acceptRawKeepBuf(t, ln)
	beDeaf(peer)
	if err := waitFor(t, closed, "Close in the connect-cb"); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if !s.Closed() {
		t.Error("Closed() false after Close")
	}
	waitLoopNil(t, l, 10*time.Second)
	t.Logf("Loop.Wait returned %v after Close with %d MiB queued to a peer that never reads", time.Since(begin).Round(time.Millisecond), size>>20)
	if n := rec.n.Load(); n != 0 {
		t.Errorf("%d events after Close, want none (rule 7)", n)
	}
	bePeerClosed(t, peer)
}

// TestCloseFlushesWithWriteDisabled: Close writes the queued output even
// where writing was disabled (rule 11).
func TestCloseFlushesWithWriteDisabled(t *testing.T) {
	const size = 4 << 20
	l := newTestLoop(t)
	ln, port := listenRaw(t)
	rec := newEventRecorder()
	conn := make(chan *asynctcp.Socket, 1)
	connectLocal(t, l, port, nil, rec.cb, beConnected(conn))
	peer := acceptRawKeepBuf(t, ln)
	s := waitFor(t, conn, "connect-cb")
	if err := s.Disable(asynctcp.EvWrite); err != nil {
		t.Fatalf("Disable(EvWrite): %v", err)
	}
	if err := s.WriteData(makePatternAt(0, size)); err != nil {
		t.Fatalf("WriteData: %v", err)
	}
	if err := s.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	peer.SetReadDeadline(time.Now().Add(waitTimeout))
	got, err := io.ReadAll(peer)
	if err != nil {
		t.Fatalf("peer reading to EOF: %v (after %d bytes)", err, len(got))
	}
	if len(got) != size || !isPatternAt(0, got) {
		t.Errorf("the peer got %d bytes (pattern intact: %v), want the %d queued", len(got), isPatternAt(0, got), size)
	}
	waitLoopNil(t, l, waitTimeout)
	if n := rec.n.Load(); n != 0 {
		t.Errorf("%d events, want none", n)
	}
}

// TestProxyBackPressureBoundsBuffered is cl-async's simple-proxy: each
// accepted socket is paired (SetData) with a socket connected to a slow
// backend; each side's read-cb writes to the other side, disables reading
// on its source while the destination holds more than a threshold, and the
// destination's write-cb enables it again. A client pushes 256 MiB through
// it: the backend gets every byte, in order, and the proxy's queued output
// stays bounded.
func TestProxyBackPressureBoundsBuffered(t *testing.T) {
	total := 256 << 20
	if testing.Short() {
		total = 32 << 20
	}
	const (
		threshold = 256 << 10
		bound     = threshold + 2<<20
		slowChunk = 64 << 10
		sendChunk = 64 << 10
	)
	l := newTestLoop(t)
	backLn, backPort := listenRaw(t)

	var (
		maxBuf  maxObserved
		pauses  atomic.Int32
		errs    = make(chan error, 16)
		backs   = make(chan *asynctcp.Socket, 1)
		frontEv = make(chan error, 4)
	)
	report := func(err error) {
		select {
		case errs <- err:
		default:
		}
	}
	// relay is the read-cb of both sides: src's data goes to its pair.
	relay := func(src *asynctcp.Socket, data []byte) {
		dst, _ := src.Data().(*asynctcp.Socket)
		if dst == nil {
			report(errors.New("read-cb on a socket without its pair"))
			return
		}
		if err := dst.WriteData(data); err != nil {
			report(err)
			return
		}
		b := dst.Buffered()
		maxBuf.observe(b)
		maxBuf.observe(src.Buffered())
		if b <= threshold {
			return
		}
		src.Disable(asynctcp.EvRead)
		pauses.Add(1)
		// dst's write-cb may have run between Buffered and Disable: then
		// nothing else would enable reading again.
		if dst.Buffered() == 0 {
			src.Enable(asynctcp.EvRead)
		}
	}
	// resume is the write-cb of both sides: dst drained, so its source may
	// read again. Enabling a closed source fails harmlessly.
	resume := func(dst *asynctcp.Socket) {
		if src, ok := dst.Data().(*asynctcp.Socket); ok {
			src.Enable(asynctcp.EvRead)
		}
	}
	backEvent := func(ev error) {
		report(errors.New("backend side event: " + ev.Error()))
		var e *asynctcp.Event
		if errors.As(ev, &e) && e.Socket != nil {
			if front, ok := e.Socket.Data().(*asynctcp.Socket); ok {
				front.Abort()
			}
		}
	}
	// frontEvent: the client finished (EOF), so the backend side finishes
	// too once it has flushed what it holds.
	frontEvent := func(ev error) {
		frontEv <- ev
		var e *asynctcp.Event
		if errors.As(ev, &e) && e.Socket != nil {
			if back, ok := e.Socket.Data().(*asynctcp.Socket); ok {
				if errors.Is(ev, asynctcp.ErrTCPEOF) {
					back.Close()
				} else {
					back.Abort()
				}
			}
		}
	}
	srv, port := listenLocal(t, l, relay, frontEvent, asynctcp.OnWrite(resume),
		asynctcp.OnConnect(func(front *asynctcp.Socket) {
			back, err := l.Connect("127.0.0.1", backPort, relay, backEvent, asynctcp.OnWrite(resume))
			if err != nil {
				report(err)
				front.Abort()
				return
			}
			back.SetData(front)
			front.SetData(back)
			backs <- back
		}))

	client := dialRaw(t, port)
	back := waitFor(t, backs, "the proxy's backend connection")
	backend := acceptRawKeepBuf(t, backLn)

	type backendResult struct {
		n        int
		mismatch int // offset of the first wrong chunk, or -1
		err      error
	}
	backDone := make(chan backendResult, 1)
	goOwned(t, "slow backend", func() {
		res := backendResult{mismatch: -1}
		buf := make([]byte, slowChunk)
		for {
			n, err := io.ReadFull(backend, buf)
			if res.mismatch < 0 && !isPatternAt(res.n, buf[:n]) {
				res.mismatch = res.n
			}
			res.n += n
			if err == io.EOF || err == io.ErrUnexpectedEOF {
				break
			}
			if err != nil {
				res.err = err
				break
			}
			time.Sleep(time.Millisecond)
		}
		backend.Close()
		backDone <- res
	}, backend)

	clientDone := make(chan error, 1)
	goOwned(t, "client", func() {
		for off := 0; off < total; off += sendChunk {
			if _, err := client.Write(patternAt(off, min(sendChunk, total-off))); err != nil {
				clientDone <- err
				return
			}
		}
		if err := client.CloseWrite(); err != nil {
			clientDone <- err
			return
		}
		// The proxy closes its side once it has seen the client's EOF.
		_, err := io.Copy(io.Discard, client)
		clientDone <- err
	}, client)

	begin := time.Now()
	res := waitForWithin(t, backDone, 120*time.Second, "the backend to receive everything")
	elapsed := time.Since(begin)
	if err := waitFor(t, clientDone, "the client to finish"); err != nil {
		t.Errorf("client: %v", err)
	}
	if ev := waitFor(t, frontEv, "the proxy's client-side EOF event"); !errors.Is(ev, asynctcp.ErrTCPEOF) {
		t.Errorf("client-side event %v, want ErrTCPEOF", ev)
	}
	srv.Close()
	waitLoopNil(t, l, waitTimeout)
	if !back.Closed() {
		t.Error("the backend side is not closed")
	}
	close(errs)
	for err := range errs {
		t.Errorf("proxy: %v", err)
	}

	peak := int(maxBuf.v.Load())
	t.Logf("proxied %d MiB in %v (%.0f MiB/s); max Buffered() %d bytes (%.0f KiB), %d pauses",
		total>>20, elapsed.Round(time.Millisecond), float64(total)/(1<<20)/elapsed.Seconds(), peak, float64(peak)/1024, pauses.Load())
	if res.err != nil {
		t.Errorf("backend: %v", res.err)
	}
	if res.n != total {
		t.Errorf("the backend got %d bytes, want %d", res.n, total)
	}
	if res.mismatch >= 0 {
		t.Errorf("the backend's bytes from offset %d are not the client's", res.mismatch)
	}
	if pauses.Load() == 0 {
		t.Error("reading was never disabled: the slow backend did not hold the proxy back")
	}
	if peak >= bound {
		t.Errorf("max Buffered() %d bytes, want under %d (threshold %d + 2 MiB)", peak, bound, threshold)
	}
}
