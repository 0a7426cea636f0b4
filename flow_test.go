//go:build unix

package asynctcp_test

// Tests of SPEC section 5, rules 24-29: output flow control (write
// watermarks, Writable, MaxBuffered), half-close (CloseWrite,
// AllowHalfOpen), timeouts that notify (NotifyTimeouts, Event.Dir) and
// rate limits (ReadRate, WriteRate, RateGroup). Every peer is a plain
// net.Conn on loopback; every wait has a deadline. The file measures CPU
// time with getrusage(2) and sizes a peer's receive buffer with
// setsockopt(2) before it connects, so it builds on Unix only.

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/asynctcp/asynctcp"
)

// flReadChunk is the most one read of a socket takes from its conn (the
// library's read buffer): the unit by which a read-cb can overshoot.
const flReadChunk = 64 << 10

// flSmallBuf is the receive buffer of a slow peer and the send buffer of
// the socket writing to it, so that a few hundred KiB fill the way
// between them.
const flSmallBuf = 16 << 10

// flRawListenBuf is listenRaw whose accepted connections have a receive
// buffer of rcvbuf bytes (0: the system's). It is set on the listener,
// before any connection: shrinking the receive buffer of an established
// loopback connection can stall it for seconds.
func flRawListenBuf(t *testing.T, rcvbuf int) (net.Listener, int) {
	t.Helper()
	var lc net.ListenConfig
	if rcvbuf > 0 {
		lc.Control = func(_, _ string, c syscall.RawConn) error {
			var serr error
			if err := c.Control(func(fd uintptr) {
				serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, rcvbuf)
			}); err != nil {
				return err
			}
			return serr
		}
	}
	ln, err := lc.Listen(context.Background(), "tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("net.Listen: %v", err)
	}
	t.Cleanup(func() { ln.Close() })
	return ln, portOf(t, ln.Addr())
}

// flPair connects a socket of l to a raw peer and returns both once the
// socket's connect-cb has run.
func flPair(t *testing.T, l *asynctcp.Loop, read asynctcp.ReadFunc, event asynctcp.EventFunc, opts ...asynctcp.Option) (*asynctcp.Socket, *net.TCPConn) {
	t.Helper()
	return flPairHook(t, l, nil, read, event, opts...)
}

// flPairHook is flPair whose connect-cb runs hook first (nil: none).
func flPairHook(t *testing.T, l *asynctcp.Loop, hook func(*asynctcp.Socket), read asynctcp.ReadFunc, event asynctcp.EventFunc, opts ...asynctcp.Option) (*asynctcp.Socket, *net.TCPConn) {
	t.Helper()
	ln, port := listenRaw(t)
	return flPairOn(t, l, ln, port, hook, read, event, opts...)
}

// flPairSmall is flPairHook with small buffers between the socket and its
// peer (flSmallBuf), so that a peer that does not read holds the socket's
// writer back after a few hundred KiB.
func flPairSmall(t *testing.T, l *asynctcp.Loop, hook func(*asynctcp.Socket), read asynctcp.ReadFunc, event asynctcp.EventFunc, opts ...asynctcp.Option) (*asynctcp.Socket, *net.TCPConn) {
	t.Helper()
	ln, port := flRawListenBuf(t, flSmallBuf)
	s, peer := flPairOn(t, l, ln, port, hook, read, event, opts...)
	tc, ok := s.Conn().(*net.TCPConn)
	if !ok {
		t.Fatalf("socket conn is %T, want *net.TCPConn", s.Conn())
	}
	if err := tc.SetWriteBuffer(flSmallBuf); err != nil {
		t.Fatalf("SetWriteBuffer: %v", err)
	}
	return s, peer
}

// flPairOn is flPairHook on the raw listener ln.
func flPairOn(t *testing.T, l *asynctcp.Loop, ln net.Listener, port int, hook func(*asynctcp.Socket), read asynctcp.ReadFunc, event asynctcp.EventFunc, opts ...asynctcp.Option) (*asynctcp.Socket, *net.TCPConn) {
	t.Helper()
	up := make(chan *asynctcp.Socket, 1)
	opts = append(opts, asynctcp.OnConnect(func(s *asynctcp.Socket) {
		if hook != nil {
			hook(s)
		}
		up <- s
	}))
	s, err := l.Connect("127.0.0.1", port, read, event, opts...)
	if err != nil {
		t.Fatalf("Connect to 127.0.0.1:%d: %v", port, err)
	}
	peer := acceptRawKeepBuf(t, ln)
	if got := waitFor(t, up, "the socket's connect-cb"); got != s {
		t.Fatalf("connect-cb got socket %p, want %p", got, s)
	}
	return s, peer
}

// flBufferFull fails the test unless err is the ErrBufferFull event of s.
func flBufferFull(t *testing.T, err error, s *asynctcp.Socket, what string) {
	t.Helper()
	ev := wantClass(t, err, asynctcp.ErrBufferFull, what)
	if ev.Socket != s {
		t.Errorf("%s: event Socket %p, want %p", what, ev.Socket, s)
	}
	if !errors.Is(err, asynctcp.ErrTCPError) {
		t.Errorf("%s: errors.Is(err, ErrTCPError) is false for %v", what, err)
	}
}

// flReadPattern reads exactly n bytes from c and fails the test unless
// they are the pattern from offset off.
func flReadPattern(t *testing.T, c net.Conn, off, n int, what string) {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(waitTimeout))
	buf := make([]byte, n)
	if got, err := io.ReadFull(c, buf); err != nil {
		t.Fatalf("%s: read %d of %d bytes: %v", what, got, n, err)
	}
	if !isPatternAt(off, buf) {
		t.Fatalf("%s: the %d bytes from offset %d are not the pattern", what, n, off)
	}
}

// flReadToEOF reads c to its end and returns what came, failing the test
// if the end does not come within waitTimeout.
func flReadToEOF(t *testing.T, c net.Conn, what string) []byte {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(waitTimeout))
	b, err := io.ReadAll(c)
	if err != nil {
		t.Fatalf("%s: reading to EOF after %d bytes: %v", what, len(b), err)
	}
	return b
}

// TestFlowOptionsRejectBadValues: bad values of the flow control and rate
// options make Connect and Listen fail with an error naming the option;
// good boundary values are accepted.
func TestFlowOptionsRejectBadValues(t *testing.T) {
	bad := []struct {
		opt  asynctcp.Option
		name string
	}{
		{asynctcp.WriteWatermarks(-1, 0), "WriteWatermarks"},
		{asynctcp.WriteWatermarks(0, -1), "WriteWatermarks"},
		{asynctcp.WriteWatermarks(10, 5), "WriteWatermarks"},
		{asynctcp.MaxBuffered(0), "MaxBuffered"},
		{asynctcp.MaxBuffered(-1), "MaxBuffered"},
		{asynctcp.ReadRate(-1, 10), "ReadRate"},
		{asynctcp.ReadRate(10, 0), "ReadRate"},
		{asynctcp.ReadRate(10, -1), "ReadRate"},
		{asynctcp.WriteRate(-1, 10), "WriteRate"},
		{asynctcp.WriteRate(10, 0), "WriteRate"},
		{asynctcp.InRateGroup(nil), "InRateGroup"},
		{asynctcp.InRateGroup(asynctcp.NewRateGroup(-1, 0, 10)), "InRateGroup"},
		{asynctcp.InRateGroup(asynctcp.NewRateGroup(0, 10, 0)), "InRateGroup"},
	}
	l := newTestLoop(t)
	for i, tc := range bad {
		s, err := l.Connect("127.0.0.1", 1, nil, nil, tc.opt)
		if err == nil || !strings.Contains(err.Error(), tc.name) {
			t.Errorf("case %d: Connect with a bad %s: error %v, want one naming %s", i, tc.name, err, tc.name)
		}
		if s != nil {
			t.Errorf("case %d: Connect with a bad %s returned a socket", i, tc.name)
			s.Abort()
		}
		srv, err := l.Listen("127.0.0.1", 0, nil, nil, tc.opt)
		if err == nil || !strings.Contains(err.Error(), tc.name) {
			t.Errorf("case %d: Listen with a bad %s: error %v, want one naming %s", i, tc.name, err, tc.name)
		}
		if srv != nil {
			srv.Close()
		}
	}
	good := []asynctcp.Option{
		asynctcp.WriteWatermarks(0, 0),
		asynctcp.WriteWatermarks(10, 0),
		asynctcp.WriteWatermarks(5, 5),
		asynctcp.MaxBuffered(1),
		asynctcp.ReadRate(0, 0),
		asynctcp.WriteRate(1, 1),
		asynctcp.InRateGroup(asynctcp.NewRateGroup(0, 0, 0)),
		asynctcp.InRateGroup(asynctcp.NewRateGroup(10, 10, 10)),
	}
	for i, opt := range good {
		srv, err := l.Listen("127.0.0.1", 0, nil, nil, opt)
		if err != nil {
			t.Errorf("good case %d: Listen: %v", i, err)
			continue
		}
		srv.Close()
	}
	waitLoopNil(t, l, waitTimeout)
}

// TestWritableFollowsHighWatermark: Writable is false while Buffered() is
// at or above the high watermark, true below it, and always true without
// a high watermark. Output is held (Disable(EvWrite)) so Buffered() is
// exact; once it is let go, the peer gets every byte.
func TestWritableFollowsHighWatermark(t *testing.T) {
	cases := []struct {
		name string
		opts []asynctcp.Option
		high int // 0: none
	}{
		{"high 1000", []asynctcp.Option{asynctcp.WriteWatermarks(0, 1000)}, 1000},
		{"low and high 1000", []asynctcp.Option{asynctcp.WriteWatermarks(1000, 1000)}, 1000},
		{"low only", []asynctcp.Option{asynctcp.WriteWatermarks(100, 0)}, 0},
		{"no watermarks", nil, 0},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			l := newTestLoop(t)
			s, peer := flPair(t, l, nil, nil, tc.opts...)
			if err := s.Disable(asynctcp.EvWrite); err != nil {
				t.Fatalf("Disable(EvWrite): %v", err)
			}
			if !s.Writable() {
				t.Fatal("Writable() false with nothing queued")
			}
			off := 0
			queue := func(n int) {
				t.Helper()
				if err := s.WriteData(patternAt(off, n)); err != nil {
					t.Fatalf("WriteData(%d bytes): %v", n, err)
				}
				off += n
			}
			if tc.high > 0 {
				queue(tc.high - 1)
				if !s.Writable() {
					t.Errorf("Writable() false at Buffered() %d, below high %d", s.Buffered(), tc.high)
				}
				queue(1)
				if s.Writable() {
					t.Errorf("Writable() true at Buffered() %d, the high watermark", s.Buffered())
				}
				queue(1)
				if s.Writable() {
					t.Errorf("Writable() true at Buffered() %d, above high %d", s.Buffered(), tc.high)
				}
			} else {
				for range 4 {
					queue(1 << 20)
					if !s.Writable() {
						t.Fatalf("Writable() false at Buffered() %d without a high watermark", s.Buffered())
					}
				}
			}
			if got := s.Buffered(); got != off {
				t.Fatalf("Buffered() %d with output held, want %d", got, off)
			}
			if err := s.Enable(asynctcp.EvWrite); err != nil {
				t.Fatalf("Enable(EvWrite): %v", err)
			}
			flReadPattern(t, peer, 0, off, "the peer")
			eventually(t, "Buffered() == 0 after the peer read everything", func() bool { return s.Buffered() == 0 })
			if !s.Writable() {
				t.Error("Writable() false once drained")
			}
			s.Close()
			if rest := flReadToEOF(t, peer, "the peer after Close"); len(rest) != 0 {
				t.Errorf("the peer got %d bytes more than were written", len(rest))
			}
			waitLoopNil(t, l, waitTimeout)
		})
	}
}

// TestWriteWatermarksLowRunsWriteCbAtLow: with a low watermark the write-cb
// runs as soon as a write takes the output from above low to low or below,
// not only once it is empty; with the default (low 0) only when it is
// empty (rule 4). A is taken by the writer in one batch (a batch is at
// most 256 KiB, so that Disable(EvWrite) holds within one) and held up by a
// slow peer; B is queued behind it with writing disabled, so that A's
// completion leaves exactly len(B) queued; then D is written to show the
// count.
func TestWriteWatermarksLowRunsWriteCbAtLow(t *testing.T) {
	const (
		lenA = 256 << 10
		lenB = 32 << 10
		lenD = 128 << 10
	)
	cases := []struct {
		name string
		opts []asynctcp.Option
		low  int
	}{
		{"low 64 KiB", []asynctcp.Option{asynctcp.WriteWatermarks(64<<10, 256<<10)}, 64 << 10},
		{"default low 0", nil, 0},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			l := newTestLoop(t)
			type call struct {
				buffered int
				enabled  bool // EvWrite had been enabled again when it ran
			}
			var enabled atomic.Bool
			var count atomic.Int32
			calls := make(chan call, 16)
			onWrite := func(s *asynctcp.Socket) {
				count.Add(1)
				calls <- call{s.Buffered(), enabled.Load()}
			}
			opts := append([]asynctcp.Option{asynctcp.OnWrite(onWrite)}, tc.opts...)
			s, peer := flPairSmall(t, l, nil, nil, nil, opts...)

			// A is queued whole while writing is disabled, so that the
			// writer takes all of it in one batch once enabled (WriteData
			// would write part of it at once otherwise).
			if err := s.Disable(asynctcp.EvWrite); err != nil {
				t.Fatalf("Disable(EvWrite): %v", err)
			}
			if err := s.WriteData(makePatternAt(0, lenA)); err != nil {
				t.Fatalf("WriteData(A): %v", err)
			}
			if err := s.Enable(asynctcp.EvWrite); err != nil {
				t.Fatalf("Enable(EvWrite): %v", err)
			}
			flReadPattern(t, peer, 0, 1, "the first byte of A") // the writer has taken A
			if err := s.Disable(asynctcp.EvWrite); err != nil {
				t.Fatalf("Disable(EvWrite): %v", err)
			}
			if err := s.WriteData(patternAt(lenA, lenB)); err != nil {
				t.Fatalf("WriteData(B): %v", err)
			}
			// WriteData may write part of A at once; the rest of A, and B,
			// stay queued.
			if got := s.Buffered(); got <= lenB || got > lenA+lenB {
				t.Fatalf("Buffered() %d after queueing B, want above %d (B and the rest of A) and at most %d: A was written before B was queued", got, lenB, lenA+lenB)
			}
			flReadPattern(t, peer, 1, lenA-1, "the rest of A")

			if tc.low > 0 {
				c := waitFor(t, calls, "the write-cb once A is written (Buffered() falls to len(B) <= low)")
				if c.buffered != lenB || c.enabled {
					t.Errorf("first write-cb saw Buffered() %d (EvWrite enabled again: %v), want %d with B held", c.buffered, c.enabled, lenB)
				}
			} else {
				expectNone(t, calls, 300*time.Millisecond, "write-cb with B still queued and low 0")
			}
			enabled.Store(true)
			if err := s.Enable(asynctcp.EvWrite); err != nil {
				t.Fatalf("Enable(EvWrite): %v", err)
			}
			flReadPattern(t, peer, lenA, lenB, "B")
			if tc.low == 0 {
				c := waitFor(t, calls, "the write-cb once B is written")
				if c.buffered != 0 || !c.enabled {
					t.Errorf("write-cb saw Buffered() %d (after Enable: %v), want 0 after Enable", c.buffered, c.enabled)
				}
			}
			eventually(t, "Buffered() == 0 after B", func() bool { return s.Buffered() == 0 })

			if err := s.WriteData(makePatternAt(lenA+lenB, lenD)); err != nil {
				t.Fatalf("WriteData(D): %v", err)
			}
			flReadPattern(t, peer, lenA+lenB, lenD, "D")
			c := waitFor(t, calls, "the write-cb once D is written")
			if c.buffered > tc.low {
				t.Errorf("write-cb after D saw Buffered() %d, want <= low %d", c.buffered, tc.low)
			}
			s.Close()
			if rest := flReadToEOF(t, peer, "the peer after Close"); len(rest) != 0 {
				t.Errorf("the peer got %d bytes more than were written", len(rest))
			}
			waitLoopNil(t, l, waitTimeout)
			if n := count.Load(); n != 2 {
				t.Errorf("write-cb ran %d times, want 2 (once for A+B, once for D)", n)
			}
		})
	}
}

// TestWriteWatermarksPumpRefillsAtLow is the watermark's use: the
// connect-cb and each write-cb top the output up to the high watermark in
// one write, against a peer slowed by small buffers. A refill adds at
// least high-low bytes, more than low, so no write in flight can take the
// output to low while a refill is under way: each write-cb then comes
// from the fall that follows a refill, and finds Buffered() at or below
// low. Buffered() never passes high, and the number of write-cbs is what
// the refills take:
// between (total-high)/high and (total-high)/(high-low) + 1.
func TestWriteWatermarksPumpRefillsAtLow(t *testing.T) {
	const (
		low   = 64 << 10
		high  = 256 << 10
		total = 16 << 20
	)
	l := newTestLoop(t)
	var (
		off      int // the pump's place: touched only by callbacks of one socket
		cbs      atomic.Int32
		overLow  maxObserved // the largest Buffered() a write-cb found
		peak     maxObserved
		pumpErrs = make(chan error, 4)
	)
	report := func(err error) {
		select {
		case pumpErrs <- err:
		default:
		}
	}
	pump := func(s *asynctcp.Socket) {
		if off == total {
			return
		}
		n := min(high-s.Buffered(), total-off)
		if err := s.WriteData(patternAt(off, n)); err != nil {
			report(err)
			return
		}
		off += n
		peak.observe(s.Buffered())
		if off == total {
			s.Close()
		}
	}
	onWrite := func(s *asynctcp.Socket) {
		cbs.Add(1)
		overLow.observe(s.Buffered())
		pump(s)
	}
	ln, port := flRawListenBuf(t, flSmallBuf)
	s, err := l.Connect("127.0.0.1", port, nil, nil,
		asynctcp.WriteWatermarks(low, high), asynctcp.OnWrite(onWrite), asynctcp.OnConnect(pump))
	if err != nil {
		t.Fatalf("Connect: %v", err)
	}
	peer := acceptRawKeepBuf(t, ln)

	peer.SetReadDeadline(time.Now().Add(waitTimeout))
	got, mismatch := 0, -1
	buf := make([]byte, 16<<10)
	for {
		n, err := peer.Read(buf)
		if mismatch < 0 && !isPatternAt(got, buf[:n]) {
			mismatch = got
		}
		got += n
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatalf("peer read after %d bytes: %v (write-cbs %d, Buffered() %d)", got, err, cbs.Load(), s.Buffered())
		}
	}
	waitLoopNil(t, l, waitTimeout)
	close(pumpErrs)
	for err := range pumpErrs {
		t.Errorf("pump: %v", err)
	}
	n := int(cbs.Load())
	minCbs := (total - high) / high
	maxCbs := (total-high)/(high-low) + 1
	t.Logf("%d MiB pumped: %d write-cbs (bounds %d..%d), max Buffered() %d, max Buffered() in a write-cb %d",
		total>>20, n, minCbs, maxCbs, peak.get(), overLow.get())
	if got != total || mismatch >= 0 {
		t.Errorf("the peer got %d bytes (first mismatch at %d), want the %d pattern bytes", got, mismatch, total)
	}
	if overLow.get() > low {
		t.Errorf("a write-cb found Buffered() %d, above low %d", overLow.get(), low)
	}
	if peak.get() > high {
		t.Errorf("max Buffered() %d, want at most high %d", peak.get(), high)
	}
	if n < minCbs || n > maxCbs {
		t.Errorf("%d write-cbs, want %d..%d", n, minCbs, maxCbs)
	}
}

// TestProxyWritableBoundsBuffered is the proxy of
// TestProxyBackPressureBoundsBuffered rewritten on Writable() and the low
// watermark (rule 24): each side's read-cb writes to the other side and,
// once the destination is not writable, disables reading on its source,
// then checks Writable() again (the destination's write-cb may have run in
// between); the destination's write-cb, run at the low watermark, enables
// the source again. A client pushes 256 MiB to a slow backend through it:
// the backend gets every byte, in order, and the proxy's queued output
// stays bounded by high + 2 read chunks: one chunk written while the
// destination was still writable, and one more where a write-cb from an
// earlier fall to low enables the source after it was disabled again.
func TestProxyWritableBoundsBuffered(t *testing.T) {
	total := 256 << 20
	if testing.Short() {
		total = 32 << 20
	}
	const (
		low       = 64 << 10
		high      = 256 << 10
		bound     = high + 2*flReadChunk
		slowChunk = 64 << 10
		sendChunk = 64 << 10
	)
	l := newTestLoop(t)
	backLn, backPort := listenRaw(t)

	var (
		maxBuf   maxObserved
		pauses   atomic.Int32
		rechecks atomic.Int32
		errs     = make(chan error, 16)
		backs    = make(chan *asynctcp.Socket, 1)
		frontEv  = make(chan error, 4)
	)
	report := func(err error) {
		select {
		case errs <- err:
		default:
		}
	}
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
		maxBuf.observe(dst.Buffered())
		if dst.Writable() {
			return
		}
		src.Disable(asynctcp.EvRead)
		pauses.Add(1)
		if dst.Writable() { // dst's write-cb ran between the check and Disable
			rechecks.Add(1)
			src.Enable(asynctcp.EvRead)
		}
	}
	resume := func(dst *asynctcp.Socket) {
		if src, ok := dst.Data().(*asynctcp.Socket); ok {
			src.Enable(asynctcp.EvRead) // fails harmlessly on a closed source
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
	marks := asynctcp.WriteWatermarks(low, high)
	srv, port := listenLocal(t, l, relay, frontEvent, marks, asynctcp.OnWrite(resume),
		asynctcp.OnConnect(func(front *asynctcp.Socket) {
			back, err := l.Connect("127.0.0.1", backPort, relay, backEvent, marks, asynctcp.OnWrite(resume))
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
		mismatch int // offset of the first wrong byte's chunk, or -1
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
			time.Sleep(time.Millisecond) // a slow backend
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
		_, err := io.Copy(io.Discard, client)
		clientDone <- err
	}, client)

	begin := time.Now()
	var res backendResult
	select {
	case res = <-backDone:
	case <-time.After(60 * time.Second):
		t.Fatalf("the backend did not receive everything within 60s (max Buffered() so far %d)", maxBuf.get())
	}
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

	peak := maxBuf.get()
	t.Logf("proxied %d MiB in %v (%.0f MiB/s); max Buffered() %d bytes (high + %d), %d pauses, %d re-enabled by the re-check",
		total>>20, elapsed.Round(time.Millisecond), float64(total)/(1<<20)/elapsed.Seconds(), peak, peak-high, pauses.Load(), rechecks.Load())
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
	if peak > bound {
		t.Errorf("max Buffered() %d bytes, want at most %d (high %d + 2 read chunks)", peak, bound, high)
	}
}

// TestMaxBufferedRefusesWholeWrite: a WriteData, Write or WriteString that
// would take Buffered() past MaxBuffered queues nothing and returns an
// ErrBufferFull event of the socket; the socket stays open, writes that
// fit succeed, the event-cb never hears of it, and the peer gets exactly
// the accepted bytes.
func TestMaxBufferedRefusesWholeWrite(t *testing.T) {
	const limit = 1000
	l := newTestLoop(t)
	rec := newEventRecorder()
	s, peer := flPair(t, l, nil, rec.cb, asynctcp.MaxBuffered(limit))
	if err := s.Disable(asynctcp.EvWrite); err != nil { // so that Buffered() is exact
		t.Fatalf("Disable(EvWrite): %v", err)
	}
	fill := func(c byte, n int) []byte { return bytes.Repeat([]byte{c}, n) }

	if err := s.WriteData(fill('a', 600)); err != nil {
		t.Fatalf("WriteData(600) under MaxBuffered(%d): %v", limit, err)
	}
	flBufferFull(t, s.WriteData(fill('b', 500)), s, "WriteData(500) at 600 queued")
	if n, err := s.Write(fill('c', 500)); n != 0 {
		t.Errorf("Write(500) at 600 queued: n = %d, want 0", n)
	} else {
		flBufferFull(t, err, s, "Write(500) at 600 queued")
	}
	if n, err := s.WriteString(string(fill('c', 401))); n != 0 {
		t.Errorf("WriteString(401) at 600 queued: n = %d, want 0", n)
	} else {
		flBufferFull(t, err, s, "WriteString(401) at 600 queued")
	}
	if got := s.Buffered(); got != 600 {
		t.Errorf("Buffered() %d after refused writes, want 600 (a refused write queues nothing)", got)
	}
	if s.Closed() {
		t.Fatal("socket closed after a refused write")
	}
	if err := s.WriteData(fill('d', 400)); err != nil { // exactly the bound: fits
		t.Fatalf("WriteData(400) at 600 queued, up to MaxBuffered(%d): %v", limit, err)
	}
	flBufferFull(t, s.WriteData([]byte{'e'}), s, "WriteData(1) at MaxBuffered")
	if err := s.Enable(asynctcp.EvWrite); err != nil {
		t.Fatalf("Enable(EvWrite): %v", err)
	}
	want := append(fill('a', 600), fill('d', 400)...)
	peer.SetReadDeadline(time.Now().Add(waitTimeout))
	got := make([]byte, len(want))
	if _, err := io.ReadFull(peer, got); err != nil {
		t.Fatalf("peer read: %v", err)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("the peer got %q..., want 600 'a' then 400 'd'", got[:min(len(got), 40)])
	}
	eventually(t, "Buffered() == 0", func() bool { return s.Buffered() == 0 })
	flBufferFull(t, s.WriteData(fill('x', limit+1)), s, "WriteData larger than MaxBuffered on an empty buffer")
	if n, err := s.Write(fill('f', limit)); err != nil || n != limit {
		t.Fatalf("Write(%d) once drained: %d, %v", limit, n, err)
	}
	s.Close()
	rest := flReadToEOF(t, peer, "the peer after Close")
	if !bytes.Equal(rest, fill('f', limit)) {
		t.Errorf("after the first 1000 bytes the peer got %d bytes %q..., want %d 'f'", len(rest), rest[:min(len(rest), 40)], limit)
	}
	waitLoopNil(t, l, waitTimeout)
	if n := rec.n.Load(); n != 0 {
		t.Errorf("the event-cb got %d events (first %v), want none", n, <-rec.ch)
	}
}

// TestStreamWriteUnderMaxBufferedQueuesPieces: Stream.Write on a socket
// with MaxBuffered blocks instead of refusing, queueing a write larger
// than the bound in pieces: the slow peer gets every byte in order and
// Buffered() never passes the bound.
func TestStreamWriteUnderMaxBufferedQueuesPieces(t *testing.T) {
	const (
		limit = 64 << 10
		total = 4<<20 + 123
	)
	l := newTestLoop(t)
	s, peer := flPairSmall(t, l, nil, nil, nil, asynctcp.MaxBuffered(limit))
	st := asynctcp.NewStream(s)

	var peak maxObserved
	stop := make(chan struct{})
	sampled := make(chan int, 1)
	go func() {
		n := 0
		for {
			select {
			case <-stop:
				sampled <- n
				return
			default:
			}
			peak.observe(s.Buffered())
			n++
			time.Sleep(50 * time.Microsecond)
		}
	}()
	type result struct {
		n   int
		err error
	}
	wrote := make(chan result, 1)
	go func() {
		n, err := st.Write(makePatternAt(0, total))
		wrote <- result{n, err}
	}()

	peer.SetReadDeadline(time.Now().Add(waitTimeout))
	buf := make([]byte, 8<<10)
	got, mismatch := 0, -1
	for got < total {
		n, err := peer.Read(buf)
		if mismatch < 0 && !isPatternAt(got, buf[:n]) {
			mismatch = got
		}
		got += n
		if err != nil {
			t.Fatalf("peer read after %d bytes: %v", got, err)
		}
		time.Sleep(100 * time.Microsecond) // a slow peer
	}
	r := waitFor(t, wrote, "Stream.Write to return")
	close(stop)
	samples := waitFor(t, sampled, "the sampler")
	if r.err != nil || r.n != total {
		t.Errorf("Stream.Write: %d, %v; want %d, nil", r.n, r.err, total)
	}
	if mismatch >= 0 {
		t.Errorf("the peer's bytes from offset %d are not the pattern", mismatch)
	}
	t.Logf("%d samples, max Buffered() %d (MaxBuffered %d)", samples, peak.get(), limit)
	if peak.get() > limit {
		t.Errorf("max Buffered() %d, want <= MaxBuffered %d", peak.get(), limit)
	}
	if err := st.Flush(); err != nil {
		t.Errorf("Flush: %v", err)
	}
	s.Close()
	if rest := flReadToEOF(t, peer, "the peer after Close"); len(rest) != 0 {
		t.Errorf("the peer got %d bytes more than were written", len(rest))
	}
	waitLoopNil(t, l, waitTimeout)
}

// TestCloseWriteFlushesThenShutsWriteSide: CloseWrite lets the queued
// output go out, then the raw peer reads EOF, while the socket still reads
// what the peer sends; writes after it return ErrSocketClosed.
func TestCloseWriteFlushesThenShutsWriteSide(t *testing.T) {
	const total = 1 << 20
	l := newTestLoop(t)
	rec := newEventRecorder()
	reads := make(chan []byte, 16)
	s, peer := flPair(t, l, func(_ *asynctcp.Socket, data []byte) { reads <- data }, rec.cb)
	if err := s.WriteData(makePatternAt(0, total)); err != nil {
		t.Fatalf("WriteData: %v", err)
	}
	if err := s.CloseWrite(); err != nil {
		t.Fatalf("CloseWrite: %v", err)
	}
	if s.Closed() {
		t.Error("Closed() true after CloseWrite: the read side should stay open")
	}
	wantSocketClosed(t, s.WriteData([]byte("late")), s, "WriteData after CloseWrite")
	if _, err := s.Write([]byte("late")); err == nil {
		t.Error("Write after CloseWrite succeeded")
	} else {
		wantSocketClosed(t, err, s, "Write after CloseWrite")
	}
	if _, err := s.WriteString("late"); err == nil {
		t.Error("WriteString after CloseWrite succeeded")
	} else {
		wantSocketClosed(t, err, s, "WriteString after CloseWrite")
	}

	got := flReadToEOF(t, peer, "the peer")
	if len(got) != total || !isPatternAt(0, got) {
		t.Fatalf("the peer got %d bytes before EOF, want the %d queued", len(got), total)
	}
	msg := []byte("the socket still reads")
	if _, err := peer.Write(msg); err != nil {
		t.Fatalf("peer write after its EOF: %v", err)
	}
	var in []byte
	for len(in) < len(msg) {
		in = append(in, waitFor(t, reads, "the read-cb after CloseWrite")...)
	}
	if !bytes.Equal(in, msg) {
		t.Errorf("read-cb got %q, want %q", in, msg)
	}
	peer.Close()
	wantClass(t, waitFor(t, rec.ch, "the EOF event"), asynctcp.ErrTCPEOF, "event after the peer closed")
	waitLoopNil(t, l, waitTimeout)
	if !s.Closed() {
		t.Error("socket not closed after its EOF")
	}
}

// TestCloseWriteOnPipeIsUnsupported: a net.Pipe end cannot half-close, so
// CloseWrite returns an ErrTCPError event wrapping errors.ErrUnsupported,
// and the socket goes on working.
func TestCloseWriteOnPipeIsUnsupported(t *testing.T) {
	l := newTestLoop(t)
	c1, c2 := net.Pipe()
	defer c2.Close()
	rec := newEventRecorder()
	s, err := l.Wrap(c1, nil, rec.cb)
	if err != nil {
		c1.Close()
		t.Fatalf("Wrap(net.Pipe end): %v", err)
	}
	err = s.CloseWrite()
	ev := wantClass(t, err, asynctcp.ErrTCPError, "CloseWrite on net.Pipe")
	if !errors.Is(err, errors.ErrUnsupported) {
		t.Errorf("CloseWrite on net.Pipe: %v does not wrap errors.ErrUnsupported", err)
	}
	if ev.Socket != s {
		t.Errorf("event Socket %p, want %p", ev.Socket, s)
	}
	if s.Closed() {
		t.Fatal("socket closed by a failed CloseWrite")
	}
	msg := []byte("still writable")
	if err := s.WriteData(msg); err != nil {
		t.Fatalf("WriteData after the refused CloseWrite: %v", err)
	}
	c2.SetReadDeadline(time.Now().Add(waitTimeout))
	buf := make([]byte, len(msg))
	if _, err := io.ReadFull(c2, buf); err != nil || !bytes.Equal(buf, msg) {
		t.Fatalf("pipe peer read %q, %v; want %q", buf, err, msg)
	}
	s.Close()
	if rest := flReadToEOF(t, c2, "the pipe peer after Close"); len(rest) != 0 {
		t.Errorf("the pipe peer got %d unexpected bytes", len(rest))
	}
	waitLoopNil(t, l, waitTimeout)
	if n := rec.n.Load(); n != 0 {
		t.Errorf("the event-cb got %d events (first %v), want none", n, <-rec.ch)
	}
}

// flHalfOpenSide makes one end of a half-open test: an asynctcp socket of
// l (by Connect or from Listen) and its raw peer.
type flHalfOpenSide func(t *testing.T, l *asynctcp.Loop, read asynctcp.ReadFunc, event asynctcp.EventFunc, opts ...asynctcp.Option) (*asynctcp.Socket, *net.TCPConn)

// flAccepted is flPair's counterpart on the server side: a raw client
// dials a server of l, which is closed once it has accepted the socket.
func flAccepted(t *testing.T, l *asynctcp.Loop, read asynctcp.ReadFunc, event asynctcp.EventFunc, opts ...asynctcp.Option) (*asynctcp.Socket, *net.TCPConn) {
	t.Helper()
	up := make(chan *asynctcp.Socket, 1)
	opts = append(opts, asynctcp.OnConnect(func(s *asynctcp.Socket) { up <- s }))
	srv, port := listenLocal(t, l, read, event, opts...)
	peer := dialRaw(t, port)
	s := waitFor(t, up, "the accepted socket's connect-cb")
	srv.Close()
	return s, peer
}

// TestAllowHalfOpenWritesAfterPeerEOF: with AllowHalfOpen, the peer's
// CloseWrite reaches the event-cb as ErrTCPEOF after every byte, but the
// socket stays open for writing; once it shuts its own write side too, it
// closes by itself.
func TestAllowHalfOpenWritesAfterPeerEOF(t *testing.T) {
	const total = 256 << 10
	cases := []struct {
		name string
		side flHalfOpenSide
	}{
		{"Connect", flPair},
		{"Listen", flAccepted},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			l := newTestLoop(t)
			var (
				mu       sync.Mutex
				got      []byte
				gotAtEOF = make(chan int, 1)
				events   = make(chan error, 4)
				written  = make(chan struct{}, 4)
			)
			read := func(_ *asynctcp.Socket, data []byte) {
				mu.Lock()
				got = append(got, data...)
				mu.Unlock()
			}
			event := func(ev error) {
				mu.Lock()
				n := len(got)
				mu.Unlock()
				select {
				case gotAtEOF <- n:
				default:
				}
				events <- ev
			}
			s, peer := tc.side(t, l, read, event, asynctcp.AllowHalfOpen(),
				asynctcp.OnWrite(func(*asynctcp.Socket) { written <- struct{}{} }))
			if _, err := peer.Write(makePatternAt(0, total)); err != nil {
				t.Fatalf("peer write: %v", err)
			}
			if err := peer.CloseWrite(); err != nil {
				t.Fatalf("peer CloseWrite: %v", err)
			}
			wantClass(t, waitFor(t, events, "the EOF event"), asynctcp.ErrTCPEOF, "event after the peer's CloseWrite")
			if n := <-gotAtEOF; n != total {
				t.Errorf("the EOF event came after %d bytes, want all %d", n, total)
			}
			mu.Lock()
			n, ok := len(got), isPatternAt(0, got)
			mu.Unlock()
			if n != total || !ok {
				t.Errorf("the read-cb got %d bytes (pattern: %v), want the peer's %d", n, ok, total)
			}

			reply := []byte("half-open reply")
			if err := s.WriteData(reply); err != nil {
				t.Fatalf("WriteData after the peer's EOF: %v", err)
			}
			// The write-cb runs after the EOF event's handling is over.
			waitFor(t, written, "the write-cb of the reply")
			if s.Closed() {
				t.Fatal("socket closed after the peer's EOF despite AllowHalfOpen")
			}
			if err := s.CloseWrite(); err != nil {
				t.Fatalf("CloseWrite: %v", err)
			}
			if in := flReadToEOF(t, peer, "the peer"); !bytes.Equal(in, reply) {
				t.Errorf("the peer got %q before EOF, want %q", in, reply)
			}
			waitLoopNil(t, l, waitTimeout)
			if !s.Closed() {
				t.Error("Closed() false once both directions were shut")
			}
			select {
			case ev := <-events:
				t.Errorf("a second event: %v", ev)
			default:
			}
		})
	}
}

// TestAllowHalfOpenStreamReadsEOFThenWrites: in stream mode with
// AllowHalfOpen, Read returns the peer's bytes, then io.EOF, and Write
// still works; shutting the write side closes the socket.
func TestAllowHalfOpenStreamReadsEOFThenWrites(t *testing.T) {
	const total = 256 << 10
	cases := []struct {
		name string
		open func(t *testing.T, l *asynctcp.Loop, event asynctcp.EventFunc) (*asynctcp.Stream, *net.TCPConn)
	}{
		{"ConnectStream", func(t *testing.T, l *asynctcp.Loop, event asynctcp.EventFunc) (*asynctcp.Stream, *net.TCPConn) {
			ln, port := listenRaw(t)
			st, err := l.ConnectStream("127.0.0.1", port, nil, event, asynctcp.AllowHalfOpen())
			if err != nil {
				t.Fatalf("ConnectStream: %v", err)
			}
			return st, acceptRawKeepBuf(t, ln)
		}},
		{"ListenStream", func(t *testing.T, l *asynctcp.Loop, event asynctcp.EventFunc) (*asynctcp.Stream, *net.TCPConn) {
			up := make(chan *asynctcp.Stream, 1)
			srv, err := l.ListenStream("127.0.0.1", 0, nil, event, asynctcp.AllowHalfOpen(),
				asynctcp.OnConnect(func(s *asynctcp.Socket) { up <- asynctcp.NewStream(s) }))
			if err != nil {
				t.Fatalf("ListenStream: %v", err)
			}
			defer srv.Close()
			peer := dialRaw(t, portOf(t, srv.Addr()))
			return waitFor(t, up, "the accepted stream"), peer
		}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			l := newTestLoop(t)
			rec := newEventRecorder()
			st, peer := tc.open(t, l, rec.cb)
			if _, err := peer.Write(makePatternAt(0, total)); err != nil {
				t.Fatalf("peer write: %v", err)
			}
			if err := peer.CloseWrite(); err != nil {
				t.Fatalf("peer CloseWrite: %v", err)
			}
			st.SetReadDeadline(time.Now().Add(waitTimeout))
			in, err := io.ReadAll(st) // nil error: ReadAll stopped at io.EOF
			if err != nil {
				t.Fatalf("Stream.Read after %d bytes: %v, want io.EOF at the end", len(in), err)
			}
			if len(in) != total || !isPatternAt(0, in) {
				t.Errorf("Stream.Read gave %d bytes, not the peer's %d", len(in), total)
			}
			wantClass(t, waitFor(t, rec.ch, "the EOF event"), asynctcp.ErrTCPEOF, "event after the peer's CloseWrite")

			reply := []byte("stream reply after EOF")
			if n, err := st.Write(reply); err != nil || n != len(reply) {
				t.Fatalf("Stream.Write after the peer's EOF: %d, %v", n, err)
			}
			if err := st.Flush(); err != nil {
				t.Fatalf("Stream.Flush after the peer's EOF: %v", err)
			}
			if st.Socket().Closed() {
				t.Fatal("socket closed after the peer's EOF despite AllowHalfOpen")
			}
			if err := st.Socket().CloseWrite(); err != nil {
				t.Fatalf("CloseWrite: %v", err)
			}
			if got := flReadToEOF(t, peer, "the peer"); !bytes.Equal(got, reply) {
				t.Errorf("the peer got %q before EOF, want %q", got, reply)
			}
			waitLoopNil(t, l, waitTimeout)
			if !st.Socket().Closed() {
				t.Error("Closed() false once both directions were shut")
			}
			if n := rec.n.Load(); n != 1 {
				t.Errorf("the event-cb got %d events, want the one EOF", n)
			}
		})
	}
}

// TestPeerCloseWriteWithoutHalfOpenClosesAfterFlush: without
// AllowHalfOpen the peer's CloseWrite ends the socket after its EOF event
// (rule 6), but what the socket had queued still reaches the peer.
func TestPeerCloseWriteWithoutHalfOpenClosesAfterFlush(t *testing.T) {
	const total = 1 << 20
	l := newTestLoop(t)
	rec := newEventRecorder()
	replied := make(chan error, 1)
	read := func(s *asynctcp.Socket, data []byte) {
		select {
		case replied <- s.WriteData(makePatternAt(0, total)):
		default:
		}
	}
	s, peer := flPairSmall(t, l, nil, read, rec.cb)
	if _, err := peer.Write([]byte("request")); err != nil {
		t.Fatalf("peer write: %v", err)
	}
	if err := waitFor(t, replied, "the read-cb's reply"); err != nil {
		t.Fatalf("WriteData in the read-cb: %v", err)
	}
	if err := peer.CloseWrite(); err != nil {
		t.Fatalf("peer CloseWrite: %v", err)
	}
	wantClass(t, waitFor(t, rec.ch, "the EOF event"), asynctcp.ErrTCPEOF, "event after the peer's CloseWrite")
	eventually(t, "Closed() after the EOF event", s.Closed)
	wantSocketClosed(t, s.WriteData([]byte("late")), s, "WriteData after the EOF closed the socket")
	got := flReadToEOF(t, peer, "the peer")
	if len(got) != total || !isPatternAt(0, got) {
		t.Errorf("the peer got %d bytes before EOF, want the %d queued", len(got), total)
	}
	waitLoopNil(t, l, waitTimeout)
}

// TestNotifyReadTimeoutDisablesReading: with NotifyTimeouts a read timeout
// is an ErrTCPTimeout event with Dir EvRead; the socket stays open with
// reading disabled (no read-cb, no further timeout) until Enable, which
// re-arms the timeout.
func TestNotifyReadTimeoutDisablesReading(t *testing.T) {
	const d = 200 * time.Millisecond
	l := newTestLoop(t)
	rec := newEventRecorder()
	reads := make(chan []byte, 16)
	s, peer := flPair(t, l, func(_ *asynctcp.Socket, data []byte) { reads <- data }, rec.cb,
		asynctcp.ReadTimeout(d), asynctcp.NotifyTimeouts())

	ev := wantClass(t, waitFor(t, rec.ch, "the read timeout event"), asynctcp.ErrTCPTimeout, "read timeout")
	if ev.Dir != asynctcp.EvRead || ev.Code != -1 || ev.Socket != s {
		t.Errorf("read timeout event Dir %v Code %d Socket %p, want EvRead, -1, %p", ev.Dir, ev.Code, ev.Socket, s)
	}
	if s.Closed() {
		t.Fatal("socket closed by a notifying read timeout")
	}
	msg := []byte("sent while reading is disabled")
	if _, err := peer.Write(msg); err != nil {
		t.Fatalf("peer write: %v", err)
	}
	expectNone(t, reads, 4*d, "read-cb while reading is disabled after the timeout")
	expectNone(t, rec.ch, 0, "a second event while reading is disabled")

	if err := s.Enable(asynctcp.EvRead); err != nil {
		t.Fatalf("Enable(EvRead): %v", err)
	}
	var in []byte
	for len(in) < len(msg) {
		in = append(in, waitFor(t, reads, "the read-cb after Enable")...)
	}
	if !bytes.Equal(in, msg) {
		t.Errorf("read-cb got %q, want %q", in, msg)
	}
	ev = wantClass(t, waitFor(t, rec.ch, "the second read timeout, after Enable"), asynctcp.ErrTCPTimeout, "second read timeout")
	if ev.Dir != asynctcp.EvRead {
		t.Errorf("second timeout Dir %v, want EvRead", ev.Dir)
	}
	if s.Closed() {
		t.Fatal("socket closed by the second notifying timeout")
	}
	s.Close()
	waitLoopNil(t, l, waitTimeout)
	if n := rec.n.Load(); n != 2 {
		t.Errorf("the event-cb got %d events, want the 2 timeouts", n)
	}
}

// TestNotifyReadTimeoutEnableInEventCbHolds: reading is disabled before
// the event-cb runs, so an Enable(EvRead) inside it holds: data keeps
// coming and the timeout fires again.
func TestNotifyReadTimeoutEnableInEventCbHolds(t *testing.T) {
	const d = 150 * time.Millisecond
	l := newTestLoop(t)
	events := make(chan error, 16)
	enableErr := make(chan error, 1)
	var first atomic.Bool
	first.Store(true)
	var sock atomic.Pointer[asynctcp.Socket]
	event := func(ev error) {
		if first.CompareAndSwap(true, false) {
			enableErr <- sock.Load().Enable(asynctcp.EvRead)
		}
		events <- ev
	}
	reads := make(chan []byte, 16)
	s, peer := flPairHook(t, l, func(s *asynctcp.Socket) { sock.Store(s) },
		func(_ *asynctcp.Socket, data []byte) { reads <- data }, event,
		asynctcp.ReadTimeout(d), asynctcp.NotifyTimeouts())

	ev := wantClass(t, waitFor(t, events, "the first read timeout"), asynctcp.ErrTCPTimeout, "first read timeout")
	if ev.Dir != asynctcp.EvRead {
		t.Errorf("first timeout Dir %v, want EvRead", ev.Dir)
	}
	if err := waitFor(t, enableErr, "Enable in the event-cb"); err != nil {
		t.Fatalf("Enable(EvRead) in the event-cb: %v", err)
	}
	msg := []byte("after the timeout")
	if _, err := peer.Write(msg); err != nil {
		t.Fatalf("peer write: %v", err)
	}
	var in []byte
	for len(in) < len(msg) {
		in = append(in, waitFor(t, reads, "the read-cb, reading enabled by the event-cb")...)
	}
	if !bytes.Equal(in, msg) {
		t.Errorf("read-cb got %q, want %q", in, msg)
	}
	ev = wantClass(t, waitFor(t, events, "the second read timeout"), asynctcp.ErrTCPTimeout, "second read timeout")
	if ev.Dir != asynctcp.EvRead {
		t.Errorf("second timeout Dir %v, want EvRead", ev.Dir)
	}
	if s.Closed() {
		t.Fatal("socket closed by a notifying timeout")
	}
	s.Close()
	waitLoopNil(t, l, waitTimeout)
}

// TestNotifyWriteTimeoutKeepsOutput: with NotifyTimeouts a write timeout
// is an ErrTCPTimeout event with Dir EvWrite; the output is kept (what the
// peer gets plus Buffered() is everything), writing stays disabled while
// the peer drains, and Enable(EvWrite) sends the rest in order.
func TestNotifyWriteTimeoutKeepsOutput(t *testing.T) {
	const (
		d     = 300 * time.Millisecond
		total = 8 << 20
	)
	l := newTestLoop(t)
	type note struct {
		ev       error
		buffered int
	}
	notes := make(chan note, 4)
	var sock atomic.Pointer[asynctcp.Socket]
	event := func(ev error) { notes <- note{ev, sock.Load().Buffered()} }
	s, peer := flPairSmall(t, l, func(s *asynctcp.Socket) { sock.Store(s) }, nil, event,
		asynctcp.WriteTimeout(d), asynctcp.NotifyTimeouts())
	if err := s.WriteData(makePatternAt(0, total)); err != nil {
		t.Fatalf("WriteData: %v", err)
	}
	n := waitFor(t, notes, "the write timeout event")
	ev := wantClass(t, n.ev, asynctcp.ErrTCPTimeout, "write timeout")
	if ev.Dir != asynctcp.EvWrite || ev.Code != -1 || ev.Socket != s {
		t.Errorf("write timeout event Dir %v Code %d Socket %p, want EvWrite, -1, %p", ev.Dir, ev.Code, ev.Socket, s)
	}
	if s.Closed() {
		t.Fatal("socket closed by a notifying write timeout")
	}
	if n.buffered <= 0 || n.buffered >= total {
		t.Fatalf("Buffered() %d in the event-cb, want some of the %d bytes still queued", n.buffered, total)
	}
	sent := total - n.buffered
	flReadPattern(t, peer, 0, sent, "what was written before the timeout")
	if got := s.Buffered(); got != n.buffered {
		t.Errorf("Buffered() %d after the peer drained, want %d as at the event", got, n.buffered)
	}
	peer.SetReadDeadline(time.Now().Add(2 * d))
	if k, err := peer.Read(make([]byte, 1)); k != 0 || !flIsTimeout(err) {
		t.Fatalf("peer read with writing disabled: %d bytes, %v; want nothing until Enable", k, err)
	}
	if err := s.Enable(asynctcp.EvWrite); err != nil {
		t.Fatalf("Enable(EvWrite): %v", err)
	}
	flReadPattern(t, peer, sent, n.buffered, "the rest after Enable(EvWrite)")
	s.Close()
	if rest := flReadToEOF(t, peer, "the peer after Close"); len(rest) != 0 {
		t.Errorf("the peer got %d bytes more than were written", len(rest))
	}
	waitLoopNil(t, l, waitTimeout)
	select {
	case n := <-notes:
		t.Errorf("a second event: %v", n.ev)
	default:
	}
}

// flIsTimeout reports whether err is a net.Error timeout.
func flIsTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// TestNotifyTimeoutsConnectTimeoutStillEnds: a connect that runs out of
// the read timeout ends the socket even with NotifyTimeouts.
func TestNotifyTimeoutsConnectTimeoutStillEnds(t *testing.T) {
	l := newTestLoop(t)
	rec := newEventRecorder()
	hang := &net.Dialer{Resolver: &net.Resolver{
		PreferGo: true,
		Dial: func(ctx context.Context, network, address string) (net.Conn, error) {
			<-ctx.Done()
			return nil, ctx.Err()
		},
	}}
	s, err := l.Connect("hang.test", 80, nil, rec.cb,
		asynctcp.Dialer(hang), asynctcp.ReadTimeout(200*time.Millisecond), asynctcp.NotifyTimeouts())
	if err != nil {
		t.Fatalf("Connect: %v", err)
	}
	ev := wantClass(t, waitFor(t, rec.ch, "the connect timeout"), asynctcp.ErrTCPTimeout, "connect timeout")
	if ev.Dir != 0 {
		t.Errorf("connect timeout Dir %v, want 0 (no direction)", ev.Dir)
	}
	waitLoopNil(t, l, waitTimeout)
	if !s.Closed() {
		t.Error("socket open after its connect timed out")
	}
	if n := rec.n.Load(); n != 1 {
		t.Errorf("the event-cb got %d events, want 1", n)
	}
}

// TestEventDirNamesFailingDirection: a failure that belongs to one
// direction says which: a reset seen while writing is Dir EvWrite, one
// seen while reading Dir EvRead (both ErrTCPEOF with Code set, rule 5).
func TestEventDirNamesFailingDirection(t *testing.T) {
	t.Run("write", func(t *testing.T) {
		l := newTestLoop(t)
		rec := newEventRecorder()
		// Reading is disabled before the reader's first read, so that only
		// the writer can see the reset.
		s, peer := flPairSmall(t, l, func(s *asynctcp.Socket) { s.Disable(asynctcp.EvRead) }, nil, rec.cb)
		if err := s.WriteData(makePatternAt(0, 8<<20)); err != nil {
			t.Fatalf("WriteData: %v", err)
		}
		flReadPattern(t, peer, 0, 1, "the first byte")
		peer.SetLinger(0)
		peer.Close() // a reset
		ev := wantClass(t, waitFor(t, rec.ch, "the write error event"), asynctcp.ErrTCPEOF, "reset while writing")
		if ev.Dir != asynctcp.EvWrite {
			t.Errorf("event Dir %v, want EvWrite (%v)", ev.Dir, ev)
		}
		if !errors.Is(ev, syscall.ECONNRESET) && !errors.Is(ev, syscall.EPIPE) || ev.Code == -1 {
			t.Errorf("event %v (Code %d), want ECONNRESET or EPIPE with Code set", ev, ev.Code)
		}
		waitLoopNil(t, l, waitTimeout)
	})
	t.Run("read", func(t *testing.T) {
		l := newTestLoop(t)
		rec := newEventRecorder()
		reads := make(chan []byte, 4)
		_, peer := flPair(t, l, func(_ *asynctcp.Socket, data []byte) { reads <- data }, rec.cb)
		if _, err := peer.Write([]byte("x")); err != nil {
			t.Fatalf("peer write: %v", err)
		}
		waitFor(t, reads, "the read-cb")
		peer.SetLinger(0)
		peer.Close() // a reset
		ev := wantClass(t, waitFor(t, rec.ch, "the read error event"), asynctcp.ErrTCPEOF, "reset while reading")
		if ev.Dir != asynctcp.EvRead {
			t.Errorf("event Dir %v, want EvRead (%v)", ev.Dir, ev)
		}
		if !errors.Is(ev, syscall.ECONNRESET) || ev.Code == -1 {
			t.Errorf("event %v (Code %d), want ECONNRESET with Code set", ev, ev.Code)
		}
		waitLoopNil(t, l, waitTimeout)
	})
}

// flSample is a count at a moment of a rate test.
type flSample struct {
	at time.Duration // since the first sample
	n  int64
}

// flSampleFor samples count every `every` for d.
func flSampleFor(d, every time.Duration, count func() int64) []flSample {
	begin := time.Now()
	s := []flSample{{0, count()}}
	for time.Since(begin) < d {
		time.Sleep(every)
		s = append(s, flSample{time.Since(begin), count()})
	}
	return s
}

// flCheckRate fails the test if over any interval between two samples the
// count grew by more than burst + rate*t, plus a margin for the sampling:
// 10% and one read chunk. It returns the average rate over the samples.
func flCheckRate(t *testing.T, what string, samples []flSample, rate, burst int) float64 {
	t.Helper()
	worst := 0.0 // the largest share of the allowed bytes taken
	for i := range samples {
		for j := i + 1; j < len(samples); j++ {
			dt := (samples[j].at - samples[i].at).Seconds()
			got := float64(samples[j].n - samples[i].n)
			allowed := float64(burst) + float64(rate)*dt
			if got > allowed*1.1+flReadChunk {
				t.Errorf("%s: %.0f bytes in %.2fs, want at most burst %d + %d*t = %.0f (+10%% + %d)", what, got, dt, burst, rate, allowed, flReadChunk)
				return 0
			}
			worst = max(worst, got/allowed)
		}
	}
	first, last := samples[0], samples[len(samples)-1]
	avg := float64(last.n-first.n) / (last.at - first.at).Seconds()
	t.Logf("%s: average %.0f B/s (rate %d B/s, %.2f of it); worst interval took %.2f of burst + rate*t", what, avg, rate, avg/float64(rate), worst)
	return avg
}

// flFlood writes to c until it fails: a peer that always has data ready.
func flFlood(t *testing.T, c net.Conn) {
	t.Helper()
	goOwned(t, "flooding peer", func() {
		buf := make([]byte, 64<<10)
		for {
			if _, err := c.Write(buf); err != nil {
				return
			}
		}
	}, c)
}

// flDrain reads c until it fails, counting the bytes and checking that
// they are the pattern.
func flDrain(t *testing.T, c net.Conn, count *atomic.Int64) (mismatch func() bool) {
	t.Helper()
	var bad atomic.Bool
	goOwned(t, "draining peer", func() {
		buf := make([]byte, 64<<10)
		off := 0
		for {
			n, err := c.Read(buf)
			if !isPatternAt(off, buf[:n]) {
				bad.Store(true)
			}
			off += n
			count.Add(int64(n))
			if err != nil {
				return
			}
		}
	}, c)
	return bad.Load
}

// TestReadRateCapsThroughput: a socket with ReadRate(r, burst) reading
// from a peer that always has data reads at most burst + r*t over any
// interval, and makes progress (at least half of r on average).
func TestReadRateCapsThroughput(t *testing.T) {
	const (
		rate  = 256 << 10
		burst = 32 << 10
	)
	l := newTestLoop(t)
	var n atomic.Int64
	s, peer := flPair(t, l, func(_ *asynctcp.Socket, data []byte) { n.Add(int64(len(data))) }, nil,
		asynctcp.ReadRate(rate, burst))
	flFlood(t, peer)
	samples := flSampleFor(2*time.Second, 100*time.Millisecond, n.Load)
	if avg := flCheckRate(t, "ReadRate", samples, rate, burst); avg < rate/2 {
		t.Errorf("ReadRate: average %.0f B/s, want at least half of %d", avg, rate)
	}
	s.Close()
	waitLoopNil(t, l, waitTimeout)
}

// TestWriteRateCapsThroughput: a socket with WriteRate(r, burst) and much
// queued writes at most burst + r*t over any interval (counted as the
// fall of Buffered()), makes progress, and the peer gets the pattern.
func TestWriteRateCapsThroughput(t *testing.T) {
	const (
		rate   = 256 << 10
		burst  = 32 << 10
		queued = 2 << 20
	)
	l := newTestLoop(t)
	s, peer := flPair(t, l, nil, nil, asynctcp.WriteRate(rate, burst))
	var received atomic.Int64
	bad := flDrain(t, peer, &received)
	if err := s.WriteData(makePatternAt(0, queued)); err != nil {
		t.Fatalf("WriteData: %v", err)
	}
	written := func() int64 { return int64(queued - s.Buffered()) }
	samples := flSampleFor(2*time.Second, 100*time.Millisecond, written)
	if avg := flCheckRate(t, "WriteRate", samples, rate, burst); avg < rate/2 {
		t.Errorf("WriteRate: average %.0f B/s, want at least half of %d", avg, rate)
	}
	if w, r := written(), received.Load(); r > w {
		t.Errorf("the peer got %d bytes, more than the %d written", r, w)
	}
	if bad() {
		t.Error("the peer's bytes are not the pattern")
	}
	if s.Buffered() == 0 {
		t.Errorf("all %d bytes went out within 2s at %d B/s", queued, rate)
	}
	s.Abort()
	waitLoopNil(t, l, waitTimeout)
}

// TestRateGroupSharesBudget: four saturated sockets of one RateGroup read
// together at most burst + rate*t, each of them makes progress, and
// SetRates on the live group raises their throughput.
func TestRateGroupSharesBudget(t *testing.T) {
	const (
		rate    = 512 << 10
		burst   = 64 << 10
		members = 4
	)
	l := newTestLoop(t)
	g := asynctcp.NewRateGroup(rate, 0, burst)
	counts := make([]atomic.Int64, members)
	var next atomic.Int32
	up := make(chan *asynctcp.Socket, members)
	read := func(s *asynctcp.Socket, data []byte) {
		s.Data().(*atomic.Int64).Add(int64(len(data)))
	}
	srv, port := listenLocal(t, l, read, nil, asynctcp.InRateGroup(g),
		asynctcp.OnConnect(func(s *asynctcp.Socket) {
			s.SetData(&counts[next.Add(1)-1])
			up <- s
		}))
	socks := make([]*asynctcp.Socket, 0, members)
	for range members {
		flFlood(t, dialRaw(t, port))
		socks = append(socks, waitFor(t, up, "an accepted member"))
	}
	srv.Close()
	total := func() int64 {
		var n int64
		for i := range counts {
			n += counts[i].Load()
		}
		return n
	}
	var before [members]int64
	for i := range counts {
		before[i] = counts[i].Load()
	}
	const phase = 2 * time.Second
	samples := flSampleFor(phase, 100*time.Millisecond, total)
	avg := flCheckRate(t, "group of 4", samples, rate, burst)
	if avg < rate/2 {
		t.Errorf("group of 4: average %.0f B/s, want at least half of %d", avg, rate)
	}
	fair := float64(rate) * phase.Seconds() / members
	for i := range counts {
		got := counts[i].Load() - before[i]
		t.Logf("member %d: %d bytes (%.2f of a fair share)", i, got, float64(got)/fair)
		if float64(got) < fair/10 {
			t.Errorf("member %d read %d bytes in %v, want at least a tenth of a fair share %.0f", i, got, phase, fair)
		}
	}

	g.SetRates(4*rate, 0)
	time.Sleep(200 * time.Millisecond) // SetRates takes effect within ~100ms: skip that
	samples = flSampleFor(1500*time.Millisecond, 100*time.Millisecond, total)
	raised := flCheckRate(t, "group after SetRates(4x)", samples, 4*rate, burst)
	if raised < 2*avg || raised < 2*rate {
		t.Errorf("after SetRates(4x): average %.0f B/s, want at least twice the %.0f B/s before and half the new rate %d", raised, avg, 4*rate)
	}
	for _, s := range socks {
		s.Close()
	}
	waitLoopNil(t, l, waitTimeout)
}

// TestRateWaitIsNotInactivity: a socket waiting for tokens longer than
// its timeout, with the peer ready all along, gets no timeout.
func TestRateWaitIsNotInactivity(t *testing.T) {
	const (
		rate    = 8 << 10 // 4 KiB at a time: a wait of 0.5s per read or write
		burst   = 4 << 10
		timeout = 150 * time.Millisecond
		watch   = 1500 * time.Millisecond
	)
	t.Run("read", func(t *testing.T) {
		l := newTestLoop(t)
		rec := newEventRecorder()
		var n atomic.Int64
		s, peer := flPair(t, l, func(_ *asynctcp.Socket, data []byte) { n.Add(int64(len(data))) }, rec.cb,
			asynctcp.ReadRate(rate, burst), asynctcp.ReadTimeout(timeout))
		flFlood(t, peer)
		expectNone(t, rec.ch, watch, "event while throttled below the read timeout")
		if got := n.Load(); got < 2*burst {
			t.Errorf("read %d bytes in %v at %d B/s, want at least %d", got, watch, rate, 2*burst)
		}
		s.Close()
		waitLoopNil(t, l, waitTimeout)
		if k := rec.n.Load(); k != 0 {
			t.Errorf("the event-cb got %d events, want none", k)
		}
	})
	t.Run("write", func(t *testing.T) {
		l := newTestLoop(t)
		rec := newEventRecorder()
		s, peer := flPair(t, l, nil, rec.cb, asynctcp.WriteRate(rate, burst), asynctcp.WriteTimeout(timeout))
		var received atomic.Int64
		flDrain(t, peer, &received)
		if err := s.WriteData(makePatternAt(0, 256<<10)); err != nil {
			t.Fatalf("WriteData: %v", err)
		}
		expectNone(t, rec.ch, watch, "event while throttled below the write timeout")
		if got := received.Load(); got < 2*burst {
			t.Errorf("the peer got %d bytes in %v at %d B/s, want at least %d", got, watch, rate, 2*burst)
		}
		s.Abort()
		waitLoopNil(t, l, waitTimeout)
		if k := rec.n.Load(); k != 0 {
			t.Errorf("the event-cb got %d events, want none", k)
		}
	})
}

// flCPU returns the process's user+system CPU time.
func flCPU(t *testing.T) time.Duration {
	t.Helper()
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		t.Fatalf("getrusage: %v", err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// TestThrottledSocketDoesNotSpin: a socket throttled to a tiny rate in
// both directions, with data to read and to write all along, sleeps while
// it waits for tokens: the process uses well under a core meanwhile.
func TestThrottledSocketDoesNotSpin(t *testing.T) {
	l := newTestLoop(t)
	reads := make(chan struct{}, 1)
	s, peer := flPair(t, l, func(*asynctcp.Socket, []byte) {
		select {
		case reads <- struct{}{}:
		default:
		}
	}, nil, asynctcp.ReadRate(1024, 1024), asynctcp.WriteRate(1024, 1024))
	var received atomic.Int64
	flDrain(t, peer, &received)
	flFlood(t, peer)
	if err := s.WriteData(makePatternAt(0, 256<<10)); err != nil {
		t.Fatalf("WriteData: %v", err)
	}
	waitFor(t, reads, "the first throttled read")
	eventually(t, "the first throttled write", func() bool { return received.Load() > 0 })

	wall0, cpu0 := time.Now(), flCPU(t)
	time.Sleep(time.Second) // the measurement window
	wall, cpu := time.Since(wall0), flCPU(t)-cpu0
	share := cpu.Seconds() / wall.Seconds()
	t.Logf("throttled for %v: %v CPU (%.1f%% of one core)", wall.Round(time.Millisecond), cpu.Round(time.Millisecond), 100*share)
	if share > 0.3 {
		t.Errorf("process used %v CPU in %v while the socket waited for tokens (%.0f%% of a core), want under 30%%", cpu, wall, 100*share)
	}
	s.Abort()
	waitLoopNil(t, l, waitTimeout)
}
