package asynctcp_test

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os/exec"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"go.uber.org/goleak"

	"github.com/asynctcp/asynctcp"
)

// Rule 1: Connect returns at once; DNS lookup and connect run in the
// background.
func TestConnectReturnsAtOnce(t *testing.T) {
	t.Parallel()
	l := newTestLoop(t)
	release := make(chan struct{})
	var releaseOnce sync.Once
	free := func() { releaseOnce.Do(func() { close(release) }) }
	t.Cleanup(free)
	asked := make(chan struct{}, 1)
	r := &net.Resolver{PreferGo: true, Dial: func(ctx context.Context, network, address string) (net.Conn, error) {
		signal(asked, struct{}{})
		select {
		case <-release:
		case <-ctx.Done():
		}
		return nil, errors.New("test resolver: no answer")
	}}
	events := newEventRecorder()
	returned := make(chan *asynctcp.Socket, 1)
	go func() {
		s, err := l.Connect("held.asynctcp.test.", 80, nil, events.cb, asynctcp.Dialer(&net.Dialer{Resolver: r}))
		if err != nil {
			t.Errorf("Connect: %v", err)
		}
		returned <- s
	}()
	s := waitFor(t, returned, "Connect to return while its DNS lookup is held")
	free()
	ev := waitFor(t, events.ch, "the failed lookup's event")
	if !errors.Is(ev, asynctcp.ErrConnectionError) {
		t.Errorf("event %v is not a connection error", ev)
	}
	select {
	case <-asked:
	default:
		t.Error("the Dialer's resolver was never asked")
	}
	waitLoop(t, l, waitTimeout)
	if s != nil && !s.Closed() {
		t.Error("socket not closed after its failed lookup")
	}
}

// Rule 1: the connect-cb runs before any read-cb, on both sides.
func TestConnectCallbackBeforeRead(t *testing.T) {
	t.Parallel()
	t.Run("client", func(t *testing.T) {
		t.Parallel()
		l := newTestLoop(t)
		ln, port := listenRaw(t)
		var order []string // touched only by the socket's callbacks
		done := make(chan []string, 1)
		read := func(s *asynctcp.Socket, data []byte) { order = append(order, "read") }
		event := func(ev error) {
			if !errors.Is(ev, asynctcp.ErrTCPEOF) {
				t.Errorf("event %v, want EOF", ev)
			}
			done <- append(order, "event")
		}
		connectLocal(t, l, port, read, event, asynctcp.OnConnect(func(s *asynctcp.Socket) {
			if s.Conn() == nil {
				t.Error("Conn() is nil in the connect-cb")
			}
			order = append(order, "connect")
		}))
		c := acceptRaw(t, ln)
		c.Write([]byte("hello"))
		c.Close()
		got := waitFor(t, done, "the client's EOF event")
		if len(got) < 3 || got[0] != "connect" {
			t.Errorf("callback order %v, want connect, read..., event", got)
		}
		waitLoop(t, l, waitTimeout)
	})
	t.Run("server", func(t *testing.T) {
		t.Parallel()
		l := newTestLoop(t)
		var order []string
		done := make(chan []string, 1)
		read := func(s *asynctcp.Socket, data []byte) { order = append(order, "read") }
		event := func(ev error) { done <- append(order, "event") }
		srv, port := listenLocal(t, l, read, event, asynctcp.OnConnect(func(s *asynctcp.Socket) {
			if s.Conn() == nil {
				t.Error("Conn() is nil in the server's connect-cb")
			}
			order = append(order, "connect")
		}))
		c := dialRaw(t, port)
		c.Write([]byte("hello")) // already waiting when the socket is accepted
		c.Close()
		got := waitFor(t, done, "the server socket's EOF event")
		if len(got) < 3 || got[0] != "connect" {
			t.Errorf("callback order %v, want connect, read..., event", got)
		}
		srv.Close()
		waitLoop(t, l, waitTimeout)
	})
}

// Rule 8: WriteData copies and returns; a peer that reads nothing cannot
// block it.
func TestWriteDataNeverBlocks(t *testing.T) {
	t.Parallel()
	l := newTestLoop(t)
	ln, port := listenRaw(t)
	events := newEventRecorder()
	s := connectLocal(t, l, port, nil, events.cb)
	const chunk, chunks = 1 << 20, 16
	buf := pattern(chunk)
	done := make(chan error, 1)
	go func() {
		for i := 0; i < chunks; i++ {
			if err := s.WriteData(buf); err != nil {
				done <- err
				return
			}
		}
		done <- nil
	}()
	c := acceptRaw(t, ln) // never reads
	if err := waitFor(t, done, fmt.Sprintf("%d WriteData calls of %d bytes to a peer that does not read", chunks, chunk)); err != nil {
		t.Fatalf("WriteData: %v", err)
	}
	if n := s.Buffered(); n <= 0 || n > chunk*chunks {
		t.Errorf("Buffered() = %d, want in (0, %d]", n, chunk*chunks)
	}
	if err := s.Abort(); err != nil {
		t.Errorf("Abort: %v", err)
	}
	c.Close()
	waitLoop(t, l, waitTimeout)
	if n := events.n.Load(); n != 0 {
		t.Errorf("%d events after Abort, want none", n)
	}
}

// Rule 8: Buffered shows the queued bytes; it reaches 0 when the write-cb
// runs.
func TestBufferedShowsQueuedBytes(t *testing.T) {
	t.Parallel()
	l := newTestLoop(t)
	ln, port := listenRaw(t)
	const total = 16 << 20
	drained := make(chan int, 16)
	connected := make(chan struct{}, 1)
	s := connectLocal(t, l, port, nil, nil,
		asynctcp.OnConnect(func(s *asynctcp.Socket) { signal(connected, struct{}{}) }),
		asynctcp.OnWrite(func(s *asynctcp.Socket) { drained <- s.Buffered() }))
	c := acceptRaw(t, ln)
	waitFor(t, connected, "the connect-cb")
	if err := s.WriteData(pattern(total)); err != nil {
		t.Fatalf("WriteData: %v", err)
	}
	if n := s.Buffered(); n <= 0 {
		t.Fatalf("Buffered() = %d right after queueing %d bytes to a peer that does not read", n, total)
	}
	select {
	case n := <-drained:
		t.Fatalf("write-cb ran (Buffered %d) while the peer had read nothing", n)
	default:
	}
	got := make(chan error, 1)
	go func() {
		c.SetReadDeadline(time.Now().Add(waitTimeout))
		b := make([]byte, total)
		_, err := io.ReadFull(c, b)
		if err == nil && !bytes.Equal(b, pattern(total)) {
			err = errors.New("peer received different bytes")
		}
		got <- err
	}()
	if n := waitFor(t, drained, "the write-cb after the peer read everything"); n != 0 {
		t.Errorf("Buffered() = %d in the write-cb, want 0", n)
	}
	if n := s.Buffered(); n != 0 {
		t.Errorf("Buffered() = %d after the write-cb, want 0", n)
	}
	if err := waitFor(t, got, "the peer to read every byte"); err != nil {
		t.Errorf("peer: %v", err)
	}
	s.Close()
	waitLoop(t, l, waitTimeout)
}

// Rule 5: the EOF event comes after every byte reached the read-cb.
func TestEOFEventAfterAllData(t *testing.T) {
	t.Parallel()
	l := newTestLoop(t)
	ln, port := listenRaw(t)
	const total = 4 << 20
	var got []byte // touched only by the socket's callbacks
	var atEOF []byte
	events := newEventRecorder()
	connectLocal(t, l, port,
		func(s *asynctcp.Socket, data []byte) { got = append(got, data...) },
		func(ev error) {
			atEOF = got
			events.cb(ev)
		})
	c := acceptRaw(t, ln)
	wrote := make(chan struct{})
	go func() {
		defer close(wrote)
		c.Write(pattern(total))
		c.Close()
	}()
	ev := waitFor(t, events.ch, "the EOF event")
	waitFor(t, wrote, "the peer's write")
	wantClass(t, ev, asynctcp.ErrTCPEOF, "peer close")
	if errors.Is(ev, asynctcp.ErrConnectionError) || errors.Is(ev, asynctcp.ErrTCPError) {
		t.Errorf("EOF event %v is an error class", ev)
	}
	if !bytes.Equal(atEOF, pattern(total)) {
		t.Errorf("read-cb had %d bytes when EOF came, want the %d sent", len(atEOF), total)
	}
	waitLoop(t, l, waitTimeout)
	if n := events.n.Load(); n != 1 {
		t.Errorf("%d events, want 1", n)
	}
}

// Rule 3: each data slice is fresh; the callee may keep it.
func TestReadSlicesMayBeKept(t *testing.T) {
	t.Parallel()
	l := newTestLoop(t)
	ln, port := listenRaw(t)
	const total = 1 << 20
	var kept [][]byte
	done := make(chan [][]byte, 1)
	connectLocal(t, l, port,
		func(s *asynctcp.Socket, data []byte) { kept = append(kept, data) },
		func(ev error) { done <- kept })
	c := acceptRaw(t, ln)
	wrote := make(chan struct{})
	go func() {
		defer close(wrote)
		want := pattern(total)
		for i := 0; i < total; i += 1000 { // many small segments
			c.Write(want[i:min(i+1000, total)])
		}
		c.Close()
	}()
	got := bytes.Join(waitFor(t, done, "the EOF event"), nil)
	waitFor(t, wrote, "the peer's writes")
	if !bytes.Equal(got, pattern(total)) {
		t.Errorf("the kept slices hold %d bytes that differ from the %d sent: a slice was reused", len(got), total)
	}
	waitLoop(t, l, waitTimeout)
}

// ReuseReadBuffer lends the read-cb the read buffer: the bytes are right
// while the callback runs (copied here), and the buffer is reused after,
// so that a slice kept past the callback may change. Stream calls refuse
// the option.
func TestReuseReadBufferLendsTheBuffer(t *testing.T) {
	t.Parallel()
	l := newTestLoop(t)
	ln, port := listenRaw(t)
	const total = 1 << 20
	var got []byte
	done := make(chan []byte, 1)
	connectLocal(t, l, port,
		func(s *asynctcp.Socket, data []byte) { got = append(got, data...) },
		func(ev error) { done <- got },
		asynctcp.ReuseReadBuffer())
	c := acceptRaw(t, ln)
	go func() {
		want := pattern(total)
		for i := 0; i < total; i += 1000 {
			c.Write(want[i:min(i+1000, total)])
		}
		c.Close()
	}()
	if got := waitFor(t, done, "the EOF event"); !bytes.Equal(got, pattern(total)) {
		t.Errorf("copied in the read-cb: %d bytes that differ from the %d sent", len(got), total)
	}
	waitLoop(t, l, waitTimeout)
	for _, call := range []func() error{
		func() error {
			_, err := l.ConnectStream("127.0.0.1", port, nil, nil, asynctcp.ReuseReadBuffer())
			return err
		},
		func() error {
			_, err := l.ListenStream("127.0.0.1", 0, nil, nil, asynctcp.ReuseReadBuffer())
			return err
		},
	} {
		if err := call(); err == nil || !strings.Contains(err.Error(), "ReuseReadBuffer") {
			t.Errorf("a stream call with ReuseReadBuffer: %v, want an error naming the option", err)
		}
	}
}

// Rule 5: a reset by the peer is an EOF event with its errno.
func TestResetIsEOFWithCode(t *testing.T) {
	t.Parallel()
	l := newTestLoop(t)
	ln, port := listenRaw(t)
	connected := make(chan struct{}, 1)
	events := newEventRecorder()
	connectLocal(t, l, port, nil, events.cb,
		asynctcp.OnConnect(func(s *asynctcp.Socket) { signal(connected, struct{}{}) }))
	c := acceptRaw(t, ln)
	waitFor(t, connected, "the connect-cb")
	c.SetLinger(0)
	c.Close()
	ev := waitFor(t, events.ch, "the reset's event")
	e := wantClass(t, ev, asynctcp.ErrTCPEOF, "reset")
	if e.Code != int(syscall.ECONNRESET) {
		t.Errorf("Code = %d, want ECONNRESET (%d)", e.Code, int(syscall.ECONNRESET))
	}
	if !errors.Is(ev, syscall.ECONNRESET) {
		t.Errorf("errors.Is(%v, ECONNRESET) = false", ev)
	}
	if errors.Is(ev, asynctcp.ErrTCPError) {
		t.Errorf("reset event %v is a tcp-error", ev)
	}
	waitLoop(t, l, waitTimeout)
	if n := events.n.Load(); n != 1 {
		t.Errorf("%d events, want 1", n)
	}
}

// Port of cl-async's refused-connection test: reported exactly once.
func TestRefusedReportedOnce(t *testing.T) {
	t.Parallel()
	l := newTestLoop(t)
	port := closedPort(t)
	events := newEventRecorder()
	var connects atomic.Int32
	s := connectLocal(t, l, port, nil, events.cb,
		asynctcp.OnConnect(func(*asynctcp.Socket) { connects.Add(1) }))
	ev := waitFor(t, events.ch, "the refused event")
	e := wantClass(t, ev, asynctcp.ErrTCPRefused, "refused")
	for _, c := range []error{asynctcp.ErrTCPError, asynctcp.ErrConnectionError, asynctcp.ErrTCPInfo, asynctcp.ErrConnectionInfo} {
		if !errors.Is(ev, c) {
			t.Errorf("refused event is not %v", c)
		}
	}
	if e.Code != int(syscall.ECONNREFUSED) {
		t.Errorf("Code = %d, want ECONNREFUSED (%d)", e.Code, int(syscall.ECONNREFUSED))
	}
	if e.Socket != s {
		t.Errorf("event Socket = %p, want the connecting socket %p", e.Socket, s)
	}
	if err := waitLoop(t, l, waitTimeout); err != nil {
		t.Errorf("Wait = %v, want nil", err)
	}
	if n := events.n.Load(); n != 1 {
		t.Errorf("refused reported %d times, want once", n)
	}
	if n := connects.Load(); n != 0 {
		t.Errorf("connect-cb ran %d times on a refused connection", n)
	}
	if !s.Closed() {
		t.Error("refused socket not closed")
	}
	if st := l.Stats(); st != (asynctcp.Stats{}) {
		t.Errorf("Stats after Wait = %+v, want zero", st)
	}
}

// Rules 7 and 11: Close returns at once and flushes queued output in the
// background; Wait waits for the flush.
func TestCloseFlushesQueuedOutput(t *testing.T) {
	t.Parallel()
	l := newTestLoop(t)
	ln, port := listenRaw(t)
	const total = 16 << 20
	connected := make(chan struct{}, 1)
	events := newEventRecorder()
	s := connectLocal(t, l, port, nil, events.cb,
		asynctcp.OnConnect(func(*asynctcp.Socket) { signal(connected, struct{}{}) }))
	c := acceptRaw(t, ln)
	waitFor(t, connected, "the connect-cb")
	if err := s.WriteData(pattern(total)); err != nil {
		t.Fatalf("WriteData: %v", err)
	}
	closed := make(chan error, 1)
	go func() { closed <- s.Close() }()
	if err := waitFor(t, closed, "Close to return while the peer reads nothing"); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if !s.Closed() {
		t.Error("Closed() false after Close")
	}
	if st := l.Stats(); st.Outgoing != 1 {
		t.Errorf("Stats().Outgoing = %d while the close still flushes, want 1", st.Outgoing)
	}
	r := waitFor(t, readAllAsync(c), "the peer to read to EOF")
	if r.err != nil {
		t.Errorf("peer read: %v", r.err)
	}
	if !bytes.Equal(r.data, pattern(total)) {
		t.Errorf("peer got %d bytes, want the %d queued before Close", len(r.data), total)
	}
	waitLoop(t, l, waitTimeout)
	if st := l.Stats(); st != (asynctcp.Stats{}) {
		t.Errorf("Stats after Wait = %+v, want zero", st)
	}
	if n := events.n.Load(); n != 0 {
		t.Errorf("%d events after Close, want none", n)
	}
}

// Rule 11: Abort drops queued output and closes at once.
func TestAbortDropsQueuedOutput(t *testing.T) {
	t.Parallel()
	l := newTestLoop(t)
	ln, port := listenRaw(t)
	const total = 16 << 20
	connected := make(chan struct{}, 1)
	events := newEventRecorder()
	s := connectLocal(t, l, port, nil, events.cb,
		asynctcp.OnConnect(func(*asynctcp.Socket) { signal(connected, struct{}{}) }))
	c := acceptRaw(t, ln)
	waitFor(t, connected, "the connect-cb")
	if err := s.WriteData(pattern(total)); err != nil {
		t.Fatalf("WriteData: %v", err)
	}
	aborted := make(chan error, 1)
	go func() { aborted <- s.Abort() }()
	if err := waitFor(t, aborted, "Abort to return"); err != nil {
		t.Fatalf("Abort: %v", err)
	}
	if !s.Closed() {
		t.Error("Closed() false after Abort")
	}
	waitLoop(t, l, waitTimeout) // no flush to wait for: the peer still reads nothing
	if st := l.Stats(); st != (asynctcp.Stats{}) {
		t.Errorf("Stats after Wait = %+v, want zero", st)
	}
	r := waitFor(t, readAllAsync(c), "the peer to read to the end")
	if len(r.data) >= total {
		t.Errorf("peer got all %d bytes after Abort; queued output was not dropped", len(r.data))
	}
	if n := events.n.Load(); n != 0 {
		t.Errorf("%d events after Abort, want none", n)
	}
}

// Rule 7: once Close or Abort has returned, no callback of the socket starts.
func TestNoCallbackAfterClose(t *testing.T) {
	t.Parallel()
	// floodingPeer writes until the connection breaks, then closes.
	floodingPeer := func(t *testing.T, ln net.Listener) <-chan struct{} {
		c := acceptRaw(t, ln)
		done := make(chan struct{})
		go func() {
			defer close(done)
			defer c.Close()
			b := pattern(4096)
			c.SetWriteDeadline(time.Now().Add(waitTimeout))
			for {
				if _, err := c.Write(b); err != nil {
					return
				}
			}
		}()
		return done
	}
	for _, how := range []string{"Close", "Abort"} {
		t.Run(how+" inside the read-cb", func(t *testing.T) {
			t.Parallel()
			l := newTestLoop(t)
			ln, port := listenRaw(t)
			var closed bool // touched only by the socket's callbacks
			var late atomic.Int32
			read := func(s *asynctcp.Socket, data []byte) {
				if closed {
					late.Add(1)
					return
				}
				closed = true
				var err error
				if how == "Close" {
					err = s.Close()
				} else {
					err = s.Abort()
				}
				if err != nil {
					t.Errorf("%s in read-cb: %v", how, err)
				}
			}
			event := func(ev error) {
				if closed {
					late.Add(1)
				}
			}
			connectLocal(t, l, port, read, event, asynctcp.OnWrite(func(*asynctcp.Socket) {
				if closed {
					late.Add(1)
				}
			}))
			peer := floodingPeer(t, ln)
			waitLoop(t, l, waitTimeout)
			waitFor(t, peer, "the flooding peer to stop")
			if n := late.Load(); n != 0 {
				t.Errorf("%d callbacks started after %s returned", n, how)
			}
		})
		t.Run(how+" from another goroutine", func(t *testing.T) {
			t.Parallel()
			l := newTestLoop(t)
			ln, port := listenRaw(t)
			var returned atomic.Bool
			var late atomic.Int32
			inRead := make(chan struct{}, 1)
			resume := make(chan struct{})
			var resumeOnce sync.Once
			unblock := func() { resumeOnce.Do(func() { close(resume) }) }
			t.Cleanup(unblock)
			read := func(s *asynctcp.Socket, data []byte) {
				if returned.Load() {
					late.Add(1)
					return
				}
				signal(inRead, struct{}{})
				<-resume
			}
			event := func(ev error) {
				if returned.Load() {
					late.Add(1)
				}
			}
			s := connectLocal(t, l, port, read, event)
			peer := floodingPeer(t, ln)
			waitFor(t, inRead, "a read-cb")
			// The read-cb now in progress started before the close; any
			// callback after it starts after.
			closed := make(chan error, 1)
			go func() {
				var err error
				if how == "Close" {
					err = s.Close()
				} else {
					err = s.Abort()
				}
				returned.Store(true)
				closed <- err
			}()
			if err := waitFor(t, closed, how+" to return while a read-cb runs"); err != nil {
				t.Errorf("%s: %v", how, err)
			}
			unblock()
			waitLoop(t, l, waitTimeout)
			waitFor(t, peer, "the flooding peer to stop")
			if n := late.Load(); n != 0 {
				t.Errorf("%d callbacks started after %s returned", n, how)
			}
		})
	}
}

// Rule 2: writes before the connection is up are queued and sent once it
// is, after Data.
func TestWriteBeforeConnectIsQueued(t *testing.T) {
	t.Parallel()
	l := newTestLoop(t)
	ln, port := listenRaw(t)
	d, release := heldDialer(t)
	s := connectLocal(t, l, port, nil, nil, asynctcp.Data([]byte("0")), asynctcp.Dialer(d))
	if s.Conn() != nil {
		t.Error("Conn() is not nil before the connection is up")
	}
	if s.Closed() {
		t.Error("Closed() true on a connecting socket")
	}
	if err := s.WriteData([]byte("abc")); err != nil {
		t.Errorf("WriteData before connect: %v", err)
	}
	if n, err := s.WriteString("def"); n != 3 || err != nil {
		t.Errorf("WriteString before connect = %d, %v", n, err)
	}
	if n, err := s.Write([]byte("ghi")); n != 3 || err != nil {
		t.Errorf("Write before connect = %d, %v", n, err)
	}
	if n := s.Buffered(); n != 10 {
		t.Errorf("Buffered() = %d before connect, want 10 (Data and three writes)", n)
	}
	release()
	c := acceptRaw(t, ln)
	got := make([]byte, 10)
	c.SetReadDeadline(time.Now().Add(waitTimeout))
	if _, err := io.ReadFull(c, got); err != nil {
		t.Fatalf("peer read: %v", err)
	}
	if string(got) != "0abcdefghi" {
		t.Errorf("peer got %q, want %q", got, "0abcdefghi")
	}
	s.Close()
	waitLoop(t, l, waitTimeout)
}

// Rule 2: the bytes of one write are never interleaved with another's, even
// with 64 goroutines writing at once.
func TestConcurrentWritersNeverInterleave(t *testing.T) {
	t.Parallel()
	l := newTestLoop(t)
	ln, port := listenRaw(t)
	connected := make(chan struct{}, 1)
	s := connectLocal(t, l, port, nil, nil,
		asynctcp.OnConnect(func(*asynctcp.Socket) { signal(connected, struct{}{}) }))
	const writers, perWriter, maxBody = 64, 32, 8192
	message := func(g, seq int) []byte {
		n := (g*131 + seq*977) % maxBody
		m := make([]byte, 9+n)
		m[0] = byte(g)
		binary.BigEndian.PutUint32(m[1:], uint32(seq))
		binary.BigEndian.PutUint32(m[5:], uint32(n))
		for i := 9; i < len(m); i++ {
			m[i] = byte(g)
		}
		return m
	}
	var wg sync.WaitGroup
	for g := 0; g < writers; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			for seq := 0; seq < perWriter; seq++ {
				m := message(g, seq)
				var err error
				switch seq % 3 {
				case 0:
					err = s.WriteData(m)
				case 1:
					_, err = s.Write(m)
				default:
					_, err = s.WriteString(string(m))
				}
				if err != nil {
					t.Errorf("writer %d: %v", g, err)
					return
				}
			}
		}(g)
	}
	c := acceptRaw(t, ln)
	parsed := make(chan error, 1)
	go func() {
		c.SetReadDeadline(time.Now().Add(waitTimeout))
		r := bufio.NewReader(c)
		next := make([]int, writers)
		for count := 0; ; count++ {
			var h [9]byte
			if _, err := io.ReadFull(r, h[:]); err != nil {
				if err == io.EOF && count == writers*perWriter {
					parsed <- nil
				} else {
					parsed <- fmt.Errorf("after %d messages: %v", count, err)
				}
				return
			}
			g, seq, n := int(h[0]), int(binary.BigEndian.Uint32(h[1:])), int(binary.BigEndian.Uint32(h[5:]))
			if g >= writers || seq != next[g] || n >= maxBody {
				parsed <- fmt.Errorf("message %d: header writer %d seq %d len %d (want seq %d): bytes interleaved or reordered", count, g, seq, n, next[min(g, writers-1)])
				return
			}
			next[g]++
			body := make([]byte, n)
			if _, err := io.ReadFull(r, body); err != nil {
				parsed <- fmt.Errorf("message %d body: %v", count, err)
				return
			}
			if !bytes.Equal(body, bytes.Repeat([]byte{byte(g)}, n)) {
				parsed <- fmt.Errorf("message %d of writer %d: body interleaved with another write", count, g)
				return
			}
		}
	}()
	waitGroup(t, &wg, "the 64 writers")
	waitFor(t, connected, "the connect-cb")
	s.Close()
	if err := waitFor(t, parsed, "the peer to parse every message"); err != nil {
		t.Error(err)
	}
	waitLoop(t, l, waitTimeout)
}

// Rule 7: a WriteData racing a Close is queued whole and flushed, or refused
// with ErrSocketClosed, queueing nothing.
func TestWriteRacingCloseIsWholeOrRefused(t *testing.T) {
	t.Parallel()
	l := newTestLoop(t)
	ln, port := listenRaw(t)
	connected := make(chan struct{}, 1)
	s := connectLocal(t, l, port, nil, nil,
		asynctcp.OnConnect(func(*asynctcp.Socket) { signal(connected, struct{}{}) }))
	c := acceptRaw(t, ln)
	peer := readAllAsync(c)
	waitFor(t, connected, "the connect-cb")
	const writers, size = 16, 1024
	accepted := make([][]int, writers)
	var acceptedCount atomic.Int32
	start := make(chan struct{})
	var wg sync.WaitGroup
	for g := 0; g < writers; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			<-start
			for seq := 0; ; seq++ {
				m := bytes.Repeat([]byte{byte(g)}, size)
				binary.BigEndian.PutUint32(m, uint32(seq))
				err := s.WriteData(m)
				if err == nil {
					accepted[g] = append(accepted[g], seq)
					acceptedCount.Add(1)
					continue
				}
				if !errors.Is(err, asynctcp.ErrSocketClosed) {
					t.Errorf("writer %d: %v, want ErrSocketClosed", g, err)
				}
				return
			}
		}(g)
	}
	close(start)
	eventually(t, "the writers to queue 256 writes", func() bool { return acceptedCount.Load() >= 256 })
	if err := s.Close(); err != nil {
		t.Errorf("Close: %v", err)
	}
	waitGroup(t, &wg, "the writers to be refused after Close")
	r := waitFor(t, peer, "the peer to read to EOF")
	if r.err != nil {
		t.Errorf("peer read: %v", r.err)
	}
	if len(r.data)%size != 0 {
		t.Fatalf("peer got %d bytes, not a whole number of %d-byte writes", len(r.data), size)
	}
	got := make([][]int, writers)
	for i := 0; i < len(r.data); i += size {
		m := r.data[i : i+size]
		g := int(m[size-1])
		if g >= writers || !bytes.Equal(m[4:], bytes.Repeat([]byte{byte(g)}, size-4)) {
			t.Fatalf("write at offset %d is torn", i)
		}
		got[g] = append(got[g], int(binary.BigEndian.Uint32(m)))
	}
	for g := range got {
		if fmt.Sprint(got[g]) != fmt.Sprint(accepted[g]) {
			t.Errorf("writer %d: peer got writes %v, WriteData accepted %v", g, got[g], accepted[g])
		}
	}
	waitLoop(t, l, waitTimeout)
}

// Rule 4: the write-cb runs each time the output buffer drains.
func TestWriteCallbackOnEveryDrain(t *testing.T) {
	t.Parallel()
	l := newTestLoop(t)
	ln, port := listenRaw(t)
	const writes = 5
	var drains int // touched only by the socket's callbacks
	done := make(chan int, 1)
	connectLocal(t, l, port, nil, nil,
		asynctcp.OnConnect(func(s *asynctcp.Socket) {
			if err := s.WriteData([]byte("0")); err != nil {
				t.Errorf("WriteData: %v", err)
			}
		}),
		asynctcp.OnWrite(func(s *asynctcp.Socket) {
			drains++
			if n := s.Buffered(); n != 0 {
				t.Errorf("Buffered() = %d in the write-cb", n)
			}
			if drains == writes {
				done <- drains
				s.Close()
				return
			}
			if err := s.WriteData([]byte(strconv.Itoa(drains))); err != nil {
				t.Errorf("WriteData: %v", err)
			}
		}))
	c := acceptRaw(t, ln)
	r := waitFor(t, readAllAsync(c), "the peer to read to EOF")
	if string(r.data) != "01234" {
		t.Errorf("peer got %q, want %q", r.data, "01234")
	}
	waitFor(t, done, "the fifth write-cb")
	waitLoop(t, l, waitTimeout)
	if drains != writes {
		t.Errorf("write-cb ran %d times for %d drains", drains, writes)
	}
}

// Rule 4 with rule 6: the write-cb of a write the peer answered runs before
// the EOF event that follows the answer; it is not lost.
func TestWriteCallbackBeforeReplyEOF(t *testing.T) {
	t.Parallel()
	l := newTestLoop(t)
	ln, port := listenRaw(t)
	const rounds, sockets = 5, 200
	var lost, total atomic.Int32
	for r := 0; r < rounds; r++ {
		peers := make(chan struct{})
		go func() { // answers each request with one byte, then closes
			defer close(peers)
			var wg sync.WaitGroup
			defer wg.Wait()
			for i := 0; i < sockets; i++ {
				ln.(*net.TCPListener).SetDeadline(time.Now().Add(waitTimeout))
				c, err := ln.Accept()
				if err != nil {
					t.Errorf("raw peer accept: %v", err)
					return
				}
				wg.Add(1)
				go func() {
					defer wg.Done()
					defer c.Close()
					c.SetDeadline(time.Now().Add(waitTimeout))
					b := make([]byte, 1)
					if _, err := io.ReadFull(c, b); err == nil {
						c.Write(b)
					}
				}()
			}
		}()
		for i := 0; i < sockets; i++ {
			wrote := false // touched only by this socket's callbacks
			connectLocal(t, l, port, nil,
				func(ev error) {
					total.Add(1)
					if !wrote {
						lost.Add(1)
					}
				},
				asynctcp.Data([]byte("x")),
				asynctcp.OnWrite(func(*asynctcp.Socket) { wrote = true }))
		}
		waitLoop(t, l, waitTimeout)
		waitFor(t, peers, "the raw peers to finish")
	}
	if n := total.Load(); n != rounds*sockets {
		t.Errorf("%d EOF events, want %d", n, rounds*sockets)
	}
	if n := lost.Load(); n != 0 {
		t.Errorf("%d of %d sockets got the EOF event without the write-cb of their request, which was written and answered", n, rounds*sockets)
	}
}

// Rule 8: callbacks given to WriteData replace the socket's for every event
// after WriteData returns.
func TestWriteDataCallbackOverrides(t *testing.T) {
	t.Parallel()
	l := newTestLoop(t)
	accepted := make(chan *asynctcp.Socket, 1)
	srv, port := listenLocal(t, l, func(s *asynctcp.Socket, data []byte) { s.WriteData(data) }, nil,
		asynctcp.OnConnect(func(s *asynctcp.Socket) { accepted <- s }))
	var r1, w1, e1 atomic.Int32
	var got []byte // touched only by the socket's callbacks
	echoed := make(chan string, 1)
	wrote := make(chan struct{}, 1)
	events := newEventRecorder()
	d, release := heldDialer(t)
	s := connectLocal(t, l, port,
		func(*asynctcp.Socket, []byte) { r1.Add(1) },
		func(error) { e1.Add(1) },
		asynctcp.OnWrite(func(*asynctcp.Socket) { w1.Add(1) }),
		asynctcp.Dialer(d))
	// Not connected yet, so every event of this socket comes after the
	// overrides are in place.
	err := s.WriteData([]byte("x"),
		asynctcp.OnRead(func(s *asynctcp.Socket, data []byte) {
			got = append(got, data...)
			signal(echoed, string(got))
		}),
		asynctcp.OnWrite(func(*asynctcp.Socket) { signal(wrote, struct{}{}) }),
		asynctcp.OnEvent(events.cb))
	if err != nil {
		t.Fatalf("WriteData with overrides: %v", err)
	}
	release()
	peer := waitFor(t, accepted, "the server's connect-cb")
	srv.Close() // its socket lives on
	waitFor(t, wrote, "the overriding write-cb")
	if e := waitFor(t, echoed, "the overriding read-cb"); e != "x" {
		t.Errorf("overriding read-cb got %q, want %q", e, "x")
	}
	peer.Close()
	wantClass(t, waitFor(t, events.ch, "the EOF event at the overriding event-cb"), asynctcp.ErrTCPEOF, "server close")
	waitLoop(t, l, waitTimeout)
	if r1.Load() != 0 || w1.Load() != 0 || e1.Load() != 0 {
		t.Errorf("replaced callbacks ran: read %d, write %d, event %d", r1.Load(), w1.Load(), e1.Load())
	}
}

// SPEC section 2: every method listed returns an ErrSocketClosed event on a
// closed socket.
func TestClosedSocketErrors(t *testing.T) {
	t.Parallel()
	closers := []struct {
		name  string
		close func(t *testing.T, l *asynctcp.Loop) *asynctcp.Socket
	}{
		{"Close", func(t *testing.T, l *asynctcp.Loop) *asynctcp.Socket {
			_, port := listenRaw(t)
			s := connectLocal(t, l, port, nil, nil)
			if err := s.Close(); err != nil {
				t.Errorf("Close: %v", err)
			}
			return s
		}},
		{"Abort", func(t *testing.T, l *asynctcp.Loop) *asynctcp.Socket {
			_, port := listenRaw(t)
			s := connectLocal(t, l, port, nil, nil)
			if err := s.Abort(); err != nil {
				t.Errorf("Abort: %v", err)
			}
			return s
		}},
		{"EOF", func(t *testing.T, l *asynctcp.Loop) *asynctcp.Socket {
			ln, port := listenRaw(t)
			s := connectLocal(t, l, port, nil, func(error) {})
			acceptRaw(t, ln).Close()
			waitLoop(t, l, waitTimeout)
			return s
		}},
		{"refused", func(t *testing.T, l *asynctcp.Loop) *asynctcp.Socket {
			s := connectLocal(t, l, closedPort(t), nil, func(error) {})
			waitLoop(t, l, waitTimeout)
			return s
		}},
	}
	for _, cl := range closers {
		t.Run("after "+cl.name, func(t *testing.T) {
			t.Parallel()
			l := newTestLoop(t)
			s := cl.close(t, l)
			if !s.Closed() {
				t.Error("Closed() = false")
			}
			methods := []struct {
				name string
				call func() error
			}{
				{"WriteData", func() error { return s.WriteData([]byte("x")) }},
				{"Write", func() error {
					n, err := s.Write([]byte("x"))
					if n != 0 {
						t.Errorf("Write on a closed socket = %d bytes", n)
					}
					return err
				}},
				{"WriteString", func() error {
					n, err := s.WriteString("x")
					if n != 0 {
						t.Errorf("WriteString on a closed socket = %d bytes", n)
					}
					return err
				}},
				{"SetTimeouts", func() error { return s.SetTimeouts(time.Second, time.Second) }},
				{"Enable", func() error { return s.Enable(asynctcp.EvRead | asynctcp.EvWrite) }},
				{"Disable", func() error { return s.Disable(asynctcp.EvRead) }},
				{"Close", s.Close},
				{"Abort", s.Abort},
			}
			for _, m := range methods {
				err := m.call()
				if err == nil {
					t.Errorf("%s on a closed socket returned nil", m.name)
					continue
				}
				var ev *asynctcp.Event
				if !errors.As(err, &ev) {
					t.Errorf("%s: %T (%v), want an *asynctcp.Event", m.name, err, err)
					continue
				}
				if ev.Class != asynctcp.ErrSocketClosed || !errors.Is(err, asynctcp.ErrSocketClosed) || !errors.Is(err, asynctcp.ErrTCPError) {
					t.Errorf("%s: class %v (%v), want socket-closed", m.name, ev.Class, err)
				}
				if ev.Socket != s {
					t.Errorf("%s: event Socket = %p, want %p", m.name, ev.Socket, s)
				}
			}
			waitLoop(t, l, waitTimeout)
		})
	}
}

// SPEC section 2: an option passed to a call it does not apply to is an
// error naming it.
func TestMisplacedOptionIsError(t *testing.T) {
	t.Parallel()
	l := newTestLoop(t)
	ln, port := listenRaw(t)
	connected := make(chan struct{}, 1)
	s := connectLocal(t, l, port, nil, nil,
		asynctcp.OnConnect(func(*asynctcp.Socket) { signal(connected, struct{}{}) }))
	c := acceptRaw(t, ln)
	waitFor(t, connected, "the connect-cb")

	read := func(*asynctcp.Socket, []byte) {}
	event := func(error) {}
	connect := func(o asynctcp.Option) error {
		s, err := l.Connect("127.0.0.1", port, read, event, o)
		if err == nil {
			s.Abort()
		}
		return err
	}
	send := func(o asynctcp.Option) error {
		s, err := l.Send("127.0.0.1", port, []byte("x"), read, event, o)
		if err == nil {
			s.Abort()
		}
		return err
	}
	listen := func(o asynctcp.Option) error {
		srv, err := l.Listen("127.0.0.1", 0, read, event, o)
		if err == nil {
			srv.Close()
		}
		return err
	}
	writeData := func(o asynctcp.Option) error { return s.WriteData([]byte("BAD"), o) }
	calls := map[string]func(asynctcp.Option) error{"Connect": connect, "Send": send, "Listen": listen, "WriteData": writeData}
	tests := []struct {
		call   string
		option string
		opt    asynctcp.Option
	}{
		{"Connect", "OnRead", asynctcp.OnRead(read)},
		{"Connect", "OnEvent", asynctcp.OnEvent(event)},
		{"Connect", "Backlog", asynctcp.Backlog(10)},
		{"Send", "Backlog", asynctcp.Backlog(10)},
		{"Send", "OnRead", asynctcp.OnRead(read)},
		{"Listen", "Data", asynctcp.Data([]byte("x"))},
		{"Listen", "OnRead", asynctcp.OnRead(read)},
		{"Listen", "OnEvent", asynctcp.OnEvent(event)},
		{"Listen", "Dialer", asynctcp.Dialer(&net.Dialer{})},
		{"WriteData", "Data", asynctcp.Data([]byte("x"))},
		{"WriteData", "OnConnect", asynctcp.OnConnect(func(*asynctcp.Socket) {})},
		{"WriteData", "ReadTimeout", asynctcp.ReadTimeout(time.Second)},
		{"WriteData", "WriteTimeout", asynctcp.WriteTimeout(time.Second)},
		{"WriteData", "DontDrainReadBuffer", asynctcp.DontDrainReadBuffer()},
		{"WriteData", "Backlog", asynctcp.Backlog(10)},
		{"WriteData", "TLS", asynctcp.TLS(&tls.Config{})},
		{"WriteData", "Dialer", asynctcp.Dialer(&net.Dialer{})},
		{"WriteData", "InputLimit", asynctcp.InputLimit(4096)},
	}
	for _, tt := range tests {
		err := calls[tt.call](tt.opt)
		if err == nil {
			t.Errorf("%s with %s: no error", tt.call, tt.option)
			continue
		}
		if !strings.Contains(err.Error(), tt.option) {
			t.Errorf("%s with %s: error %q does not name the option", tt.call, tt.option, err)
		}
	}
	// The refused WriteData calls queued nothing.
	s.WriteData([]byte("ok"))
	s.Close()
	r := waitFor(t, readAllAsync(c), "the peer to read to EOF")
	if string(r.data) != "ok" {
		t.Errorf("peer got %q, want %q: a refused WriteData queued its bytes", r.data, "ok")
	}
	waitLoop(t, l, waitTimeout)
}

// Bad arguments are errors, never panics.
func TestBadArguments(t *testing.T) {
	t.Parallel()
	t.Run("calls", func(t *testing.T) {
		t.Parallel()
		l := newTestLoop(t)
		_, port := listenRaw(t)
		connect := func(port int, opts ...asynctcp.Option) func() error {
			return func() error {
				s, err := l.Connect("127.0.0.1", port, nil, nil, opts...)
				if err == nil {
					s.Abort()
				}
				return err
			}
		}
		listen := func(port int, opts ...asynctcp.Option) func() error {
			return func() error {
				srv, err := l.Listen("127.0.0.1", port, nil, nil, opts...)
				if err == nil {
					srv.Close()
				}
				return err
			}
		}
		tests := []struct {
			name   string
			call   func() error
			option string // the option the error must name, if any
		}{
			{"Connect port 0", connect(0), ""},
			{"Connect port 65536", connect(65536), ""},
			{"Connect port -1", connect(-1), ""},
			{"Listen port -1", listen(-1), ""},
			{"Listen port 65536", listen(65536), ""},
			{"Connect negative ReadTimeout", connect(port, asynctcp.ReadTimeout(-time.Second)), "ReadTimeout"},
			{"Connect negative WriteTimeout", connect(port, asynctcp.WriteTimeout(-time.Second)), "WriteTimeout"},
			{"Listen negative ReadTimeout", listen(0, asynctcp.ReadTimeout(-time.Second)), "ReadTimeout"},
			{"Listen negative WriteTimeout", listen(0, asynctcp.WriteTimeout(-time.Second)), "WriteTimeout"},
			{"Connect InputLimit 0", connect(port, asynctcp.InputLimit(0)), "InputLimit"},
			{"Connect InputLimit -1", connect(port, asynctcp.InputLimit(-1)), "InputLimit"},
		}
		for _, tt := range tests {
			err := tt.call()
			if err == nil {
				t.Errorf("%s: no error", tt.name)
				continue
			}
			if tt.option != "" && !strings.Contains(err.Error(), tt.option) {
				t.Errorf("%s: error %q does not name %s", tt.name, err, tt.option)
			}
		}
		waitLoop(t, l, waitTimeout)
	})
	t.Run("negative SetTimeouts", func(t *testing.T) {
		t.Parallel()
		l := newTestLoop(t)
		_, port := listenRaw(t)
		s := connectLocal(t, l, port, nil, nil)
		if err := s.SetTimeouts(-time.Second, 0); err == nil {
			t.Error("SetTimeouts(-1s, 0): no error")
		}
		if err := s.SetTimeouts(0, -time.Second); err == nil {
			t.Error("SetTimeouts(0, -1s): no error")
		}
		s.Abort()
		waitLoop(t, l, waitTimeout)
	})
	t.Run("nil socket", func(t *testing.T) {
		t.Parallel()
		var s *asynctcp.Socket
		calls := []struct {
			name    string
			call    func() error
			wantErr bool
		}{
			{"Conn", func() error { s.Conn(); return nil }, false},
			{"Data", func() error { s.Data(); return nil }, false},
			{"SetData", func() error { s.SetData(1); return nil }, false},
			{"Buffered", func() error { s.Buffered(); return nil }, false},
			{"LocalAddr", func() error { s.LocalAddr(); return nil }, false},
			{"RemoteAddr", func() error { s.RemoteAddr(); return nil }, false},
			{"Closed", func() error {
				if !s.Closed() {
					return errors.New("Closed() = false")
				}
				return nil
			}, false},
			{"WriteData", func() error { return s.WriteData([]byte("x")) }, true},
			{"Write", func() error { _, err := s.Write([]byte("x")); return err }, true},
			{"WriteString", func() error { _, err := s.WriteString("x"); return err }, true},
			{"SetTimeouts", func() error { return s.SetTimeouts(time.Second, 0) }, true},
			{"Enable", func() error { return s.Enable(asynctcp.EvRead) }, true},
			{"Disable", func() error { return s.Disable(asynctcp.EvRead) }, true},
			{"Close", s.Close, true},
			{"Abort", s.Abort, true},
		}
		for _, c := range calls {
			func() {
				defer func() {
					if v := recover(); v != nil {
						t.Errorf("(*Socket)(nil).%s panicked: %v", c.name, v)
					}
				}()
				err := c.call()
				if c.wantErr && err == nil {
					t.Errorf("(*Socket)(nil).%s returned no error", c.name)
				}
				if !c.wantErr && err != nil {
					t.Errorf("(*Socket)(nil).%s: %v", c.name, err)
				}
			}()
		}
	})
}

// Rule 12: bind address "" binds every address.
func TestListenEmptyBindAddress(t *testing.T) {
	t.Parallel()
	l := newTestLoop(t)
	accepted := make(chan struct{}, 1)
	srv, err := l.Listen("", 0, nil, nil,
		asynctcp.OnConnect(func(*asynctcp.Socket) { signal(accepted, struct{}{}) }))
	if err != nil {
		t.Fatalf("Listen(\"\", 0): %v", err)
	}
	defer srv.Close()
	a, ok := srv.Addr().(*net.TCPAddr)
	if !ok || !a.IP.IsUnspecified() || a.Port == 0 {
		t.Errorf("Addr() = %v, want the unspecified address (0.0.0.0) and a port", srv.Addr())
	}
	c := dialRaw(t, portOf(t, srv.Addr()))
	waitFor(t, accepted, "the server's connect-cb for a loopback client")
	c.Close()
	srv.Close()
	waitLoop(t, l, waitTimeout)
}

// Rule 12: port 0 picks a free port, reported by Addr.
func TestListenPortZero(t *testing.T) {
	t.Parallel()
	l := newTestLoop(t)
	accepted := make(chan int, 2)
	srv1, port1 := listenLocal(t, l, nil, nil, asynctcp.OnConnect(func(*asynctcp.Socket) { accepted <- 1 }))
	srv2, port2 := listenLocal(t, l, nil, nil, asynctcp.OnConnect(func(*asynctcp.Socket) { accepted <- 2 }))
	if port1 == port2 {
		t.Errorf("two servers on port 0 share port %d", port1)
	}
	dialRaw(t, port1).Close()
	if n := waitFor(t, accepted, "the first server's connect-cb"); n != 1 {
		t.Errorf("server %d accepted the connection to server 1's port", n)
	}
	dialRaw(t, port2).Close()
	if n := waitFor(t, accepted, "the second server's connect-cb"); n != 2 {
		t.Errorf("server %d accepted the connection to server 2's port", n)
	}
	srv1.Close()
	srv2.Close()
	waitLoop(t, l, waitTimeout)
}

// Rule 12: Backlog(n) is the listen(2) backlog, as ss shows it.
func TestBacklogIsListenBacklog(t *testing.T) {
	if runtime.GOOS != "linux" {
		t.Skip("ss -ltn reports the backlog on linux only")
	}
	l := newTestLoop(t)
	const backlog = 17
	srv, port := listenLocal(t, l, nil, nil, asynctcp.Backlog(backlog))
	out, err := exec.Command("ss", "-ltn").Output()
	if err != nil {
		t.Fatalf("ss -ltn: %v", err)
	}
	found := false
	for _, line := range strings.Split(string(out), "\n") {
		f := strings.Fields(line)
		if len(f) < 4 || f[3] != "127.0.0.1:"+strconv.Itoa(port) {
			continue
		}
		found = true
		if f[2] != strconv.Itoa(backlog) {
			t.Errorf("ss shows Send-Q (backlog) %s for the server, want %d: %q", f[2], backlog, line)
		}
	}
	if !found {
		t.Fatalf("ss -ltn does not list 127.0.0.1:%d:\n%s", port, out)
	}
	srv.Close()
	waitLoop(t, l, waitTimeout)
}

// Port of cl-async's address-in-use test: a bind failure is returned at
// once and matches ErrAddressInUse and EADDRINUSE.
func TestAddressInUse(t *testing.T) {
	t.Parallel()
	check := func(t *testing.T, l *asynctcp.Loop, port int) {
		t.Helper()
		srv, err := l.Listen("127.0.0.1", port, nil, nil)
		if err == nil {
			srv.Close()
			t.Fatalf("Listen on the busy port %d succeeded", port)
		}
		ev := wantClass(t, err, asynctcp.ErrAddressInUse, "bind")
		if !errors.Is(err, syscall.EADDRINUSE) {
			t.Errorf("errors.Is(%v, EADDRINUSE) = false", err)
		}
		if !errors.Is(err, asynctcp.ErrConnectionError) || errors.Is(err, asynctcp.ErrTCPError) {
			t.Errorf("%v: want a connection-error that is not a tcp-error", err)
		}
		if ev.Code != int(syscall.EADDRINUSE) {
			t.Errorf("Code = %d, want EADDRINUSE (%d)", ev.Code, int(syscall.EADDRINUSE))
		}
		if n := l.Stats().Servers; n > 1 {
			t.Errorf("Stats().Servers = %d after a failed Listen", n)
		}
	}
	t.Run("net listener holds the port", func(t *testing.T) {
		t.Parallel()
		l := newTestLoop(t)
		_, port := listenRaw(t)
		check(t, l, port)
		waitLoop(t, l, waitTimeout)
	})
	t.Run("asynctcp server holds the port", func(t *testing.T) {
		t.Parallel()
		l := newTestLoop(t)
		srv, port := listenLocal(t, l, nil, nil)
		check(t, l, port)
		srv.Close()
		waitLoop(t, l, waitTimeout)
	})
}

// Port of cl-async's server-close test: closing a server leaves its sockets
// talking.
func TestServerCloseLeavesSocketsRunning(t *testing.T) {
	t.Parallel()
	l := newTestLoop(t)
	accepted := make(chan struct{}, 1)
	srv, port := listenLocal(t, l,
		func(s *asynctcp.Socket, data []byte) { s.WriteData(data) },
		nil,
		asynctcp.OnConnect(func(*asynctcp.Socket) { signal(accepted, struct{}{}) }))
	connected := make(chan struct{}, 1)
	var got []byte // touched only by the client's callbacks
	echoed := make(chan string, 4)
	client := connectLocal(t, l, port,
		func(s *asynctcp.Socket, data []byte) {
			got = append(got, data...)
			if len(got) == 4 {
				echoed <- string(got)
				got = nil
			}
		}, nil,
		asynctcp.OnConnect(func(*asynctcp.Socket) { signal(connected, struct{}{}) }))
	waitFor(t, accepted, "the server's connect-cb")
	waitFor(t, connected, "the client's connect-cb")
	if err := srv.Close(); err != nil {
		t.Fatalf("Server.Close: %v", err)
	}
	if !srv.Closed() {
		t.Error("Server.Closed() = false after Close")
	}
	if c, err := net.DialTimeout("tcp", "127.0.0.1:"+strconv.Itoa(port), waitTimeout); err == nil {
		c.Close()
		t.Error("a closed server still accepts connections")
	}
	for _, msg := range []string{"ping", "pong"} {
		client.WriteData([]byte(msg))
		if e := waitFor(t, echoed, "the echo from the closed server's socket"); e != msg {
			t.Errorf("echo %q, want %q", e, msg)
		}
	}
	if st := l.Stats(); st.Incoming != 1 || st.Outgoing != 1 {
		t.Errorf("Stats = %+v, want the accepted and the connected socket open", st)
	}
	client.Close()
	waitLoop(t, l, waitTimeout)
}

// close-tcp-server on a closed server does nothing.
func TestServerCloseIdempotent(t *testing.T) {
	t.Parallel()
	l := newTestLoop(t)
	srv, _ := listenLocal(t, l, nil, nil)
	if srv.Closed() {
		t.Error("Closed() = true on a new server")
	}
	for i := 0; i < 3; i++ {
		if err := srv.Close(); err != nil {
			t.Errorf("Close #%d: %v", i+1, err)
		}
		if !srv.Closed() {
			t.Errorf("Closed() = false after Close #%d", i+1)
		}
	}
	waitLoop(t, l, waitTimeout)
	if err := srv.Close(); err != nil {
		t.Errorf("Close after Wait: %v", err)
	}
}

// Rule 14: Shutdown waits for the server's sockets to close.
func TestShutdownWaitsForSockets(t *testing.T) {
	t.Parallel()
	l := newTestLoop(t)
	accepted := make(chan struct{}, 1)
	inEvent := make(chan struct{}, 1)
	resume := make(chan struct{})
	var resumeOnce sync.Once
	unblock := func() { resumeOnce.Do(func() { close(resume) }) }
	t.Cleanup(unblock)
	var eventReturned atomic.Bool
	srv, port := listenLocal(t, l, nil,
		func(ev error) {
			signal(inEvent, struct{}{})
			<-resume
			eventReturned.Store(true)
		},
		asynctcp.OnConnect(func(*asynctcp.Socket) { signal(accepted, struct{}{}) }))
	c := dialRaw(t, port)
	waitFor(t, accepted, "the server's connect-cb")
	shut := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
		defer cancel()
		shut <- srv.Shutdown(ctx)
	}()
	c.Close()
	waitFor(t, inEvent, "the server socket's EOF event")
	select {
	case err := <-shut:
		t.Fatalf("Shutdown returned (%v) while its socket's event-cb still ran", err)
	case <-time.After(100 * time.Millisecond): // a window for a wrong early return
	}
	unblock()
	if err := waitFor(t, shut, "Shutdown to return"); err != nil {
		t.Errorf("Shutdown: %v", err)
	}
	if !eventReturned.Load() {
		t.Error("Shutdown returned before the socket's event-cb returned")
	}
	if !srv.Closed() {
		t.Error("server not closed after Shutdown")
	}
	if st := l.Stats(); st.Incoming != 0 || st.Servers != 0 {
		t.Errorf("Stats after Shutdown = %+v, want no server and no accepted socket", st)
	}
	waitLoop(t, l, waitTimeout)
}

// Rule 14: Shutdown returns the context's error when it ends first.
func TestShutdownContextExpires(t *testing.T) {
	t.Parallel()
	l := newTestLoop(t)
	accepted := make(chan struct{}, 1)
	srv, port := listenLocal(t, l, nil, nil,
		asynctcp.OnConnect(func(*asynctcp.Socket) { signal(accepted, struct{}{}) }))
	c := dialRaw(t, port)
	waitFor(t, accepted, "the server's connect-cb")
	shut := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
		defer cancel()
		shut <- srv.Shutdown(ctx)
	}()
	if err := waitFor(t, shut, "Shutdown to return when its context expires"); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("Shutdown = %v, want context.DeadlineExceeded", err)
	}
	if !srv.Closed() {
		t.Error("server not closed after Shutdown")
	}
	if n := l.Stats().Incoming; n != 1 {
		t.Errorf("Stats().Incoming = %d, want the socket still open", n)
	}
	c.Close()
	waitLoop(t, l, waitTimeout)
}

// Rule 18: Wait returns nil once nothing is open, and not before.
func TestLoopWaitReturnsWhenIdle(t *testing.T) {
	before := goleak.IgnoreCurrent()
	l := newTestLoop(t)
	accepted := make(chan struct{}, 1)
	serverEOF := make(chan struct{}, 1)
	srv, port := listenLocal(t, l, nil, func(error) { signal(serverEOF, struct{}{}) },
		asynctcp.OnConnect(func(*asynctcp.Socket) { signal(accepted, struct{}{}) }))
	connected := make(chan struct{}, 1)
	s := connectLocal(t, l, port, nil, nil,
		asynctcp.OnConnect(func(*asynctcp.Socket) { signal(connected, struct{}{}) }))
	waitFor(t, accepted, "the server's connect-cb")
	waitFor(t, connected, "the client's connect-cb")
	var lastClosed atomic.Bool
	done := goWait(l)
	s.Close()
	waitFor(t, serverEOF, "the server socket's EOF event")
	select {
	case err := <-done:
		t.Fatalf("Wait returned (%v) while the server was open", err)
	default:
	}
	lastClosed.Store(true)
	srv.Close()
	if err := waitFor(t, done, "Wait to return"); err != nil {
		t.Errorf("Wait = %v, want nil", err)
	}
	if !lastClosed.Load() {
		t.Error("Wait returned before the server was closed")
	}
	if st := l.Stats(); st != (asynctcp.Stats{}) {
		t.Errorf("Stats after Wait = %+v, want zero", st)
	}
	verifyNoGoroutines(t, before)
}

// Rule 18: Wait returns at once on a loop that never had anything.
func TestLoopWaitAtOnceWhenUnused(t *testing.T) {
	t.Parallel()
	l := &asynctcp.Loop{}
	if err := waitLoop(t, l, waitTimeout); err != nil {
		t.Errorf("Wait on an unused loop = %v, want nil", err)
	}
	if st := l.Stats(); st != (asynctcp.Stats{}) {
		t.Errorf("Stats of an unused loop = %+v", st)
	}
}

// Rule 18: Exit aborts every socket and server without any event; Wait
// returns the Exit value once their goroutines ended.
func TestLoopExitAbortsEverything(t *testing.T) {
	before := goleak.IgnoreCurrent()
	l := newTestLoop(t)
	var events atomic.Int32
	lastEvent := make(chan error, 16)
	countEvent := func(ev error) {
		events.Add(1)
		signal(lastEvent, ev)
	}
	accepted := make(chan struct{}, 1)
	srv, port := listenLocal(t, l, func(s *asynctcp.Socket, data []byte) { s.WriteData(data) }, countEvent,
		asynctcp.OnConnect(func(*asynctcp.Socket) { signal(accepted, struct{}{}) }))
	connected := make(chan struct{}, 2)
	onConnect := asynctcp.OnConnect(func(*asynctcp.Socket) { signal(connected, struct{}{}) })
	echo := connectLocal(t, l, port, nil, countEvent, onConnect, asynctcp.Data([]byte("hi")))
	ln, rawPort := listenRaw(t)
	flooded := connectLocal(t, l, rawPort, nil, countEvent, onConnect)
	c := acceptRaw(t, ln)
	peer := make(chan struct{})
	go func() { // writes until the aborted socket breaks the connection
		defer close(peer)
		c.SetWriteDeadline(time.Now().Add(waitTimeout))
		for {
			if _, err := c.Write(pattern(4096)); err != nil {
				return
			}
		}
	}()
	waitFor(t, accepted, "the server's connect-cb")
	waitFor(t, connected, "a client's connect-cb")
	waitFor(t, connected, "the other client's connect-cb")
	errExit := errors.New("exit-event-loop")
	done := goWait(l)
	l.Exit(errExit)
	if err := waitFor(t, done, "Wait to return after Exit"); err != errExit {
		t.Errorf("Wait = %v, want the Exit value %v", err, errExit)
	}
	if st := l.Stats(); st != (asynctcp.Stats{}) {
		t.Errorf("Stats after Exit and Wait = %+v, want zero", st)
	}
	if !srv.Closed() || !echo.Closed() || !flooded.Closed() {
		t.Errorf("after Exit: server closed %v, sockets closed %v %v", srv.Closed(), echo.Closed(), flooded.Closed())
	}
	if n := events.Load(); n != 0 {
		t.Errorf("%d events reached callbacks after Exit, want none; the first: %v", n, <-lastEvent)
	}
	waitFor(t, peer, "the raw peer to see the abort")
	c.Close()
	verifyNoGoroutines(t, before)

	// The loop may be used again.
	srv2, _ := listenLocal(t, l, nil, nil)
	srv2.Close()
	if err := waitLoop(t, l, waitTimeout); err != nil {
		t.Errorf("Wait on the reused loop = %v, want nil", err)
	}
}

// Stats counts open accepted sockets, connected (or connecting) sockets and
// servers.
func TestStatsCounts(t *testing.T) {
	t.Parallel()
	l := newTestLoop(t)
	want := func(what string, st asynctcp.Stats) {
		t.Helper()
		if got := l.Stats(); got != st {
			t.Errorf("%s: Stats = %+v, want %+v", what, got, st)
		}
	}
	want("new loop", asynctcp.Stats{})
	accepted := make(chan struct{}, 1)
	serverEOF := make(chan struct{}, 1)
	srv, port := listenLocal(t, l, nil, func(error) { signal(serverEOF, struct{}{}) },
		asynctcp.OnConnect(func(*asynctcp.Socket) { signal(accepted, struct{}{}) }))
	want("after Listen", asynctcp.Stats{Servers: 1})
	d, release := heldDialer(t)
	s := connectLocal(t, l, port, nil, nil, asynctcp.Dialer(d))
	want("while connecting", asynctcp.Stats{Outgoing: 1, Servers: 1})
	release()
	waitFor(t, accepted, "the server's connect-cb")
	want("connected", asynctcp.Stats{Incoming: 1, Outgoing: 1, Servers: 1})
	srv.Close()
	eventually(t, "Servers to reach 0 after Server.Close", func() bool { return l.Stats().Servers == 0 })
	want("server closed", asynctcp.Stats{Incoming: 1, Outgoing: 1})
	s.Close()
	waitFor(t, serverEOF, "the server socket's EOF event")
	eventually(t, "every socket to close", func() bool { return l.Stats() == asynctcp.Stats{} })
	waitLoop(t, l, waitTimeout)
	want("after Wait", asynctcp.Stats{})
}

// SPEC section 2: with neither event-cb nor EventHandler, error events are
// logged on Logger and info events dropped.
func TestDefaultHandlerLogsErrorsDropsInfo(t *testing.T) {
	t.Parallel()
	var buf syncBuffer
	l := newTestLoop(t)
	l.Logger = slog.New(slog.NewTextHandler(&buf, nil))

	ln, port := listenRaw(t)
	connectLocal(t, l, port, nil, nil)
	acceptRaw(t, ln).Close() // EOF: info
	waitLoop(t, l, waitTimeout)
	if s := buf.String(); s != "" {
		t.Errorf("an EOF event was logged: %q", s)
	}

	connectLocal(t, l, closedPort(t), nil, nil) // refused: error
	waitLoop(t, l, waitTimeout)
	if buf.String() == "" {
		t.Error("a refused event with no event-cb and no EventHandler was not logged")
	}
}

// SPEC section 2: a nil event-cb means the loop's EventHandler is used.
func TestEventHandlerUsedWhenEventCbNil(t *testing.T) {
	t.Parallel()
	var buf syncBuffer
	handled := newEventRecorder()
	l := newTestLoop(t)
	l.Logger = slog.New(slog.NewTextHandler(&buf, nil))
	l.EventHandler = handled.cb

	connectLocal(t, l, closedPort(t), nil, nil)
	wantClass(t, waitFor(t, handled.ch, "the refused event at the EventHandler"), asynctcp.ErrTCPRefused, "refused")
	waitLoop(t, l, waitTimeout)

	ln, port := listenRaw(t)
	connectLocal(t, l, port, nil, nil)
	acceptRaw(t, ln).Close()
	wantClass(t, waitFor(t, handled.ch, "the EOF event at the EventHandler"), asynctcp.ErrTCPEOF, "peer close")
	waitLoop(t, l, waitTimeout)

	// A callback given explicitly wins over the handler.
	own := newEventRecorder()
	connectLocal(t, l, closedPort(t), nil, own.cb)
	waitFor(t, own.ch, "the refused event at the socket's own event-cb")
	waitLoop(t, l, waitTimeout)
	if n := handled.n.Load(); n != 2 {
		t.Errorf("EventHandler got %d events, want 2", n)
	}
	if s := buf.String(); s != "" {
		t.Errorf("events went to the Logger despite the EventHandler: %q", s)
	}
}

// Rule 19: with CatchAppErrors, a callback panic reaches the event-cb as a
// *PanicError and the socket is aborted.
func TestCatchAppErrorsPanicToEventCb(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name string
		opts func(boom func()) []asynctcp.Option
		read func(boom func()) asynctcp.ReadFunc
	}{
		{"read-cb",
			func(func()) []asynctcp.Option { return nil },
			func(boom func()) asynctcp.ReadFunc { return func(*asynctcp.Socket, []byte) { boom() } }},
		{"connect-cb",
			func(boom func()) []asynctcp.Option {
				return []asynctcp.Option{asynctcp.OnConnect(func(*asynctcp.Socket) { boom() })}
			},
			func(func()) asynctcp.ReadFunc { return nil }},
		{"write-cb",
			func(boom func()) []asynctcp.Option {
				return []asynctcp.Option{asynctcp.Data([]byte("x")), asynctcp.OnWrite(func(*asynctcp.Socket) { boom() })}
			},
			func(func()) asynctcp.ReadFunc { return nil }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			l := newTestLoop(t)
			l.CatchAppErrors = true
			ln, port := listenRaw(t)
			type kaboom struct{ where string }
			var panics atomic.Int32
			boom := func() {
				panics.Add(1)
				panic(kaboom{tt.name})
			}
			events := newEventRecorder()
			s := connectLocal(t, l, port, tt.read(boom), events.cb, tt.opts(boom)...)
			c := acceptRaw(t, ln)
			c.Write([]byte("boom"))
			ev := waitFor(t, events.ch, "the panic at the event-cb")
			var pe *asynctcp.PanicError
			if !errors.As(ev, &pe) {
				t.Fatalf("event %T (%v), want a *PanicError", ev, ev)
			}
			if pe.Value != (kaboom{tt.name}) {
				t.Errorf("PanicError.Value = %v, want the panic value", pe.Value)
			}
			if len(pe.Stack) == 0 || pe.Error() == "" {
				t.Errorf("PanicError has stack %d bytes, message %q", len(pe.Stack), pe.Error())
			}
			waitFor(t, readAllAsync(c), "the peer to see the abort")
			waitLoop(t, l, waitTimeout)
			if !s.Closed() {
				t.Error("socket not aborted after its callback panicked")
			}
			if n := events.n.Load(); n != 1 {
				t.Errorf("%d events, want the panic alone", n)
			}
			if n := panics.Load(); n != 1 {
				t.Errorf("%d panics: a callback ran after the socket was aborted", n)
			}
		})
	}
}

// Rule 19: a panic in an event-cb goes to the EventHandler, or the Logger,
// never back to the same event-cb.
func TestPanicInEventCbGoesToHandler(t *testing.T) {
	t.Parallel()
	type kaboom struct{}
	t.Run("EventHandler", func(t *testing.T) {
		t.Parallel()
		handled := newEventRecorder()
		l := newTestLoop(t)
		l.CatchAppErrors = true
		l.EventHandler = handled.cb
		var calls atomic.Int32
		connectLocal(t, l, closedPort(t), nil, func(error) {
			calls.Add(1)
			panic(kaboom{})
		})
		ev := waitFor(t, handled.ch, "the event-cb's panic at the EventHandler")
		var pe *asynctcp.PanicError
		if !errors.As(ev, &pe) || pe.Value != (kaboom{}) {
			t.Errorf("EventHandler got %T (%v), want a *PanicError with the panic value", ev, ev)
		}
		waitLoop(t, l, waitTimeout)
		if n := calls.Load(); n != 1 {
			t.Errorf("event-cb ran %d times, want once", n)
		}
		if n := handled.n.Load(); n != 1 {
			t.Errorf("EventHandler ran %d times, want once", n)
		}
	})
	t.Run("Logger", func(t *testing.T) {
		t.Parallel()
		var buf syncBuffer
		l := newTestLoop(t)
		l.CatchAppErrors = true
		l.Logger = slog.New(slog.NewTextHandler(&buf, nil))
		var calls atomic.Int32
		connectLocal(t, l, closedPort(t), nil, func(error) {
			calls.Add(1)
			panic(kaboom{})
		})
		waitLoop(t, l, waitTimeout)
		if n := calls.Load(); n != 1 {
			t.Errorf("event-cb ran %d times, want once", n)
		}
		if buf.String() == "" {
			t.Error("the event-cb's panic was not logged")
		}
	})
}

// overlapDetector counts callbacks in flight.
type overlapDetector struct {
	inFlight, worst, calls atomic.Int32
}

func (d *overlapDetector) enter() {
	d.calls.Add(1)
	n := d.inFlight.Add(1)
	for {
		w := d.worst.Load()
		if n <= w || d.worst.CompareAndSwap(w, n) {
			break
		}
	}
	runtime.Gosched() // give an overlapping callback its chance
}

func (d *overlapDetector) leave() { d.inFlight.Add(-1) }

// pingPongLoad runs clients ping-pong clients against an echo server, all on
// l, every callback bracketed by detect(s).enter and leave. Each client also
// has a goroutine of its own writing half its pings.
func pingPongLoad(t *testing.T, l *asynctcp.Loop, clients, rounds int, detect func(*asynctcp.Socket) *overlapDetector) {
	t.Helper()
	wrap := func(s *asynctcp.Socket) func() {
		d := detect(s)
		d.enter()
		return d.leave
	}
	srv, port := listenLocal(t, l,
		func(s *asynctcp.Socket, data []byte) {
			defer wrap(s)()
			s.WriteData(data)
		},
		func(ev error) {
			var e *asynctcp.Event
			if errors.As(ev, &e) && e.Socket != nil {
				defer wrap(e.Socket)()
			}
			if !errors.Is(ev, asynctcp.ErrTCPEOF) {
				t.Errorf("server socket event %v", ev)
			}
		},
		asynctcp.OnConnect(func(s *asynctcp.Socket) { defer wrap(s)() }),
		asynctcp.OnWrite(func(s *asynctcp.Socket) { defer wrap(s)() }))
	const ping = "ping"
	var writers sync.WaitGroup
	finished := make(chan struct{}, clients)
	for i := 0; i < clients; i++ {
		received := 0 // touched only by this client's callbacks
		s := connectLocal(t, l, port,
			func(s *asynctcp.Socket, data []byte) {
				defer wrap(s)()
				received += len(data)
				if received == 2*rounds*len(ping) {
					s.Close()
					finished <- struct{}{}
				}
			},
			func(ev error) { t.Errorf("client event %v", ev) },
			asynctcp.OnConnect(func(s *asynctcp.Socket) {
				defer wrap(s)()
				for j := 0; j < rounds; j++ {
					s.WriteData([]byte(ping))
				}
			}),
			asynctcp.OnWrite(func(s *asynctcp.Socket) { defer wrap(s)() }))
		writers.Add(1)
		go func() {
			defer writers.Done()
			for j := 0; j < rounds; j++ {
				if err := s.WriteData([]byte(ping)); err != nil {
					t.Errorf("WriteData from another goroutine: %v", err)
					return
				}
			}
		}()
	}
	for i := 0; i < clients; i++ {
		waitFor(t, finished, "every client to get its echoes")
	}
	waitGroup(t, &writers, "the clients' writer goroutines")
	srv.Close()
	waitLoop(t, l, waitTimeout)
}

// Rule 20: with Serial, no two callbacks of the loop run at once.
func TestSerialRunsOneCallbackAtATime(t *testing.T) {
	t.Parallel()
	l := newTestLoop(t)
	l.Serial = true
	var d overlapDetector
	pingPongLoad(t, l, 16, 50, func(*asynctcp.Socket) *overlapDetector { return &d })
	if w := d.worst.Load(); w != 1 {
		t.Errorf("%d callbacks ran at once on a Serial loop (of %d calls)", w, d.calls.Load())
	}
}

// Rule 1: the callbacks of one socket never run at the same time.
func TestCallbacksOfOneSocketNeverOverlap(t *testing.T) {
	t.Parallel()
	l := newTestLoop(t)
	var mu sync.Mutex
	detectors := map[*asynctcp.Socket]*overlapDetector{}
	detect := func(s *asynctcp.Socket) *overlapDetector {
		mu.Lock()
		defer mu.Unlock()
		d := detectors[s]
		if d == nil {
			d = &overlapDetector{}
			detectors[s] = d
		}
		return d
	}
	pingPongLoad(t, l, 16, 50, detect)
	mu.Lock()
	defer mu.Unlock()
	if len(detectors) != 32 {
		t.Errorf("callbacks ran on %d sockets, want 32", len(detectors))
	}
	for s, d := range detectors {
		if w := d.worst.Load(); w != 1 {
			t.Errorf("socket %p: %d of its callbacks ran at once", s, w)
		}
	}
}

// The condition classes and their hierarchy, as errors.Is on an *Event sees
// them.
func TestConditionHierarchy(t *testing.T) {
	t.Parallel()
	classes := map[string]error{
		"connection-info":  asynctcp.ErrConnectionInfo,
		"connection-error": asynctcp.ErrConnectionError,
		"tcp-info":         asynctcp.ErrTCPInfo,
		"tcp-error":        asynctcp.ErrTCPError,
		"tcp-eof":          asynctcp.ErrTCPEOF,
		"tcp-timeout":      asynctcp.ErrTCPTimeout,
		"tcp-refused":      asynctcp.ErrTCPRefused,
		"tcp-accept-error": asynctcp.ErrTCPAcceptError,
		"socket-closed":    asynctcp.ErrSocketClosed,
		"dns-error":        asynctcp.ErrDNSError,
		"address-in-use":   asynctcp.ErrAddressInUse,
	}
	tcpError := []string{"tcp-error", "connection-error", "tcp-info", "connection-info"}
	ancestors := map[string][]string{ // each class and every class above it
		"connection-info":  {"connection-info"},
		"connection-error": {"connection-error", "connection-info"},
		"tcp-info":         {"tcp-info", "connection-info"},
		"tcp-error":        tcpError,
		"tcp-eof":          {"tcp-eof", "tcp-info", "connection-info"},
		"tcp-timeout":      append([]string{"tcp-timeout"}, tcpError...),
		"tcp-refused":      append([]string{"tcp-refused"}, tcpError...),
		"tcp-accept-error": append([]string{"tcp-accept-error"}, tcpError...),
		"socket-closed":    append([]string{"socket-closed"}, tcpError...),
		"dns-error":        {"dns-error", "connection-error", "connection-info"},
		"address-in-use":   {"address-in-use", "connection-error", "connection-info"},
	}
	for name, c := range classes {
		if c == nil {
			t.Fatalf("class %s is nil", name)
		}
		for other, o := range classes {
			if name != other && c == o {
				t.Errorf("classes %s and %s are the same value", name, other)
			}
		}
	}
	for name, c := range classes {
		ev := &asynctcp.Event{Class: c, Code: -1, Msg: "test"}
		if ev.Error() == "" {
			t.Errorf("%s event: empty Error()", name)
		}
		above := map[string]bool{}
		for _, a := range ancestors[name] {
			above[a] = true
		}
		for target, tc := range classes {
			if got := errors.Is(ev, tc); got != above[target] {
				t.Errorf("errors.Is(%s event, %s) = %v, want %v", name, target, got, above[target])
			}
		}
		var wrapped error = fmt.Errorf("wrapped: %w", ev)
		if !errors.Is(wrapped, c) {
			t.Errorf("a wrapped %s event is not %s", name, name)
		}
	}
	// The cause stays reachable, and does not change the class.
	ev := &asynctcp.Event{Class: asynctcp.ErrTCPEOF, Code: -1, Err: io.EOF}
	if !errors.Is(ev, io.EOF) || errors.Is(ev, asynctcp.ErrTCPError) {
		t.Errorf("EOF event with Err io.EOF: Is(io.EOF) %v, Is(tcp-error) %v", errors.Is(ev, io.EOF), errors.Is(ev, asynctcp.ErrTCPError))
	}
}

// An event's Unwrap gives the net package's error.
func TestEventUnwrapGivesNetError(t *testing.T) {
	t.Parallel()
	l := newTestLoop(t)
	events := newEventRecorder()
	connectLocal(t, l, closedPort(t), nil, events.cb)
	ev := waitFor(t, events.ch, "the refused event")
	e := asEvent(t, ev)
	if e.Unwrap() == nil || e.Unwrap() != e.Err {
		t.Errorf("Unwrap() = %v, want Err %v", e.Unwrap(), e.Err)
	}
	var op *net.OpError
	if !errors.As(ev, &op) {
		t.Errorf("errors.As(%v, *net.OpError) = false; Err is %T", ev, e.Err)
	}
	if !errors.Is(ev, syscall.ECONNREFUSED) {
		t.Errorf("errors.Is(%v, ECONNREFUSED) = false", ev)
	}
	if e.Msg == "" || e.Error() == "" {
		t.Errorf("refused event: Msg %q, Error %q", e.Msg, e.Error())
	}
	waitLoop(t, l, waitTimeout)
}

// nxdomainReply answers a DNS query with NXDOMAIN, or returns nil.
func nxdomainReply(q []byte) []byte {
	if len(q) < 12 {
		return nil
	}
	i := 12
	for i < len(q) && q[i] != 0 { // QNAME labels
		i += int(q[i]) + 1
	}
	i += 1 + 4 // root label, QTYPE, QCLASS
	if i > len(q) {
		return nil
	}
	resp := append([]byte(nil), q[:i]...)
	resp[2] = 0x80 | q[2]&0x79 // QR, the query's opcode and RD
	resp[3] = 0x80 | 3         // RA, RCODE NXDOMAIN
	binary.BigEndian.PutUint16(resp[4:], 1)
	binary.BigEndian.PutUint16(resp[6:], 0)
	binary.BigEndian.PutUint16(resp[8:], 0)
	binary.BigEndian.PutUint16(resp[10:], 0)
	return resp
}

// startNXDomainServer runs a loopback UDP DNS server that knows no name.
func startNXDomainServer(t *testing.T) (addr string, queries *atomic.Int32) {
	t.Helper()
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("ListenPacket: %v", err)
	}
	queries = new(atomic.Int32)
	done := make(chan struct{})
	go func() {
		defer close(done)
		buf := make([]byte, 1500)
		for {
			n, from, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			if resp := nxdomainReply(buf[:n]); resp != nil {
				queries.Add(1)
				pc.WriteTo(resp, from)
			}
		}
	}()
	t.Cleanup(func() {
		pc.Close()
		<-done
	})
	return pc.LocalAddr().String(), queries
}

// Rule 5: a failed lookup is an ErrDNSError event wrapping *net.DNSError;
// the resolver answers on loopback.
func TestDNSErrorViaLocalResolver(t *testing.T) {
	t.Parallel()
	l := newTestLoop(t)
	dnsAddr, queries := startNXDomainServer(t)
	r := &net.Resolver{PreferGo: true, Dial: func(ctx context.Context, network, address string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "udp", dnsAddr)
	}}
	events := newEventRecorder()
	var connects atomic.Int32
	s := connectLocal0(t, l, "nxdomain.asynctcp.test.", 80, events.cb,
		asynctcp.Dialer(&net.Dialer{Resolver: r}),
		asynctcp.OnConnect(func(*asynctcp.Socket) { connects.Add(1) }))
	ev := waitFor(t, events.ch, "the DNS error event")
	e := wantClass(t, ev, asynctcp.ErrDNSError, "lookup")
	if !errors.Is(ev, asynctcp.ErrConnectionError) || errors.Is(ev, asynctcp.ErrTCPError) {
		t.Errorf("DNS event %v: want a connection-error that is not a tcp-error", ev)
	}
	var dnsErr *net.DNSError
	if !errors.As(ev, &dnsErr) {
		t.Fatalf("errors.As(%v, *net.DNSError) = false; Err is %T", ev, e.Err)
	}
	if !dnsErr.IsNotFound {
		t.Errorf("DNSError %v: IsNotFound = false for NXDOMAIN", dnsErr)
	}
	if e.Socket != s {
		t.Errorf("event Socket = %p, want %p", e.Socket, s)
	}
	waitLoop(t, l, waitTimeout)
	if queries.Load() == 0 {
		t.Error("the local DNS server got no query")
	}
	if n := events.n.Load(); n != 1 {
		t.Errorf("%d events, want 1", n)
	}
	if n := connects.Load(); n != 0 {
		t.Errorf("connect-cb ran %d times", n)
	}
	if !s.Closed() {
		t.Error("socket not closed after the DNS error")
	}
}

// connectLocal0 connects a socket of l to host:port with no read callback.
func connectLocal0(t *testing.T, l *asynctcp.Loop, host string, port int, event asynctcp.EventFunc, opts ...asynctcp.Option) *asynctcp.Socket {
	t.Helper()
	s, err := l.Connect(host, port, nil, event, opts...)
	if err != nil {
		t.Fatalf("Connect to %s:%d: %v", host, port, err)
	}
	return s
}

// socket-data, socket-c and the addresses.
func TestDataAndConnAccessors(t *testing.T) {
	t.Parallel()
	l := newTestLoop(t)
	type check struct {
		conn          net.Conn
		local, remote net.Addr
		data          any
	}
	serverSide := make(chan check, 1)
	srv, port := listenLocal(t, l, nil, nil, asynctcp.OnConnect(func(s *asynctcp.Socket) {
		if s.Data() != nil {
			t.Errorf("a new accepted socket has Data %v", s.Data())
		}
		s.SetData("server")
		serverSide <- check{s.Conn(), s.LocalAddr(), s.RemoteAddr(), s.Data()}
	}))
	clientSide := make(chan check, 1)
	d, release := heldDialer(t)
	s := connectLocal(t, l, port, nil, nil, asynctcp.Dialer(d), asynctcp.OnConnect(func(s *asynctcp.Socket) {
		clientSide <- check{s.Conn(), s.LocalAddr(), s.RemoteAddr(), s.Data()}
	}))
	if s.Data() != nil {
		t.Errorf("a new socket has Data %v", s.Data())
	}
	type payload struct{ n int }
	p := &payload{42}
	s.SetData(p)
	if s.Data() != p {
		t.Errorf("Data() = %v after SetData(%v)", s.Data(), p)
	}
	release()
	cl := waitFor(t, clientSide, "the client's connect-cb")
	sv := waitFor(t, serverSide, "the server's connect-cb")
	if cl.conn == nil || sv.conn == nil {
		t.Fatalf("Conn() in the connect-cb: client %v, server %v", cl.conn, sv.conn)
	}
	if cl.data != p {
		t.Errorf("Data() in the connect-cb = %v, want %v", cl.data, p)
	}
	if sv.data != "server" {
		t.Errorf("server Data() = %v after SetData", sv.data)
	}
	same := func(what string, a, b net.Addr) {
		t.Helper()
		if a == nil || b == nil || a.String() != b.String() {
			t.Errorf("%s: %v, want %v", what, a, b)
		}
	}
	same("client LocalAddr", cl.local, cl.conn.LocalAddr())
	same("client RemoteAddr", cl.remote, cl.conn.RemoteAddr())
	same("client RemoteAddr", cl.remote, srv.Addr())
	same("server LocalAddr", sv.local, sv.conn.LocalAddr())
	same("server RemoteAddr", sv.remote, sv.conn.RemoteAddr())
	same("server RemoteAddr", sv.remote, cl.local)
	s.Close()
	srv.Close()
	waitLoop(t, l, waitTimeout)
}

// Port of cl-async's client/server test: the request is split between Data
// and WriteData; both sides see the exact bytes.
func TestClientServerExchangeSplitBetweenDataAndWriteData(t *testing.T) {
	t.Parallel()
	const request, reply = "hai", "thxlol"
	for _, how := range []string{"Connect with Data", "Send"} {
		t.Run(how, func(t *testing.T) {
			t.Parallel()
			l := newTestLoop(t)
			var serverGot []byte // touched only by the server socket's callbacks
			serverSaw := make(chan string, 1)
			srv, port := listenLocal(t, l, func(s *asynctcp.Socket, data []byte) {
				serverGot = append(serverGot, data...)
				if len(serverGot) < len(request) {
					return
				}
				serverSaw <- string(serverGot)
				s.WriteData([]byte(reply), asynctcp.OnWrite(func(s *asynctcp.Socket) { s.Close() }))
			}, func(ev error) {
				if !errors.Is(ev, asynctcp.ErrTCPEOF) {
					t.Errorf("server socket event %v", ev)
				}
			})
			var clientGot []byte
			clientSaw := make(chan string, 1)
			read := func(s *asynctcp.Socket, data []byte) { clientGot = append(clientGot, data...) }
			event := func(ev error) {
				if !errors.Is(ev, asynctcp.ErrTCPEOF) {
					t.Errorf("client event %v", ev)
				}
				clientSaw <- string(clientGot)
			}
			var s *asynctcp.Socket
			var err error
			if how == "Send" {
				s, err = l.Send("127.0.0.1", port, []byte("ha"), read, event)
			} else {
				s, err = l.Connect("127.0.0.1", port, read, event, asynctcp.Data([]byte("ha")))
			}
			if err != nil {
				t.Fatalf("%s: %v", how, err)
			}
			if err := s.WriteData([]byte("i")); err != nil {
				t.Fatalf("WriteData: %v", err)
			}
			if got := waitFor(t, serverSaw, "the server to read the request"); got != request {
				t.Errorf("server read %q, want %q", got, request)
			}
			if got := waitFor(t, clientSaw, "the client's EOF event"); got != reply {
				t.Errorf("client read %q, want %q", got, reply)
			}
			srv.Close()
			waitLoop(t, l, waitTimeout)
		})
	}
}

// Port of cl-async's sub-sequence write test: WriteData sends exactly the
// slice given, copied when the call returns (rule 8).
func TestWriteDataSendsSubSliceAndCopies(t *testing.T) {
	t.Parallel()
	l := newTestLoop(t)
	ln, port := listenRaw(t)
	d, release := heldDialer(t)
	connected := make(chan struct{}, 1)
	s := connectLocal(t, l, port, nil, nil, asynctcp.Dialer(d),
		asynctcp.OnConnect(func(*asynctcp.Socket) { signal(connected, struct{}{}) }))
	buf := []byte("0123456789")
	if err := s.WriteData(buf[2:5]); err != nil {
		t.Fatalf("WriteData: %v", err)
	}
	copy(buf[2:5], "XYZ") // not connected yet, so nothing was sent
	if _, err := s.Write(buf[7:9]); err != nil {
		t.Fatalf("Write: %v", err)
	}
	copy(buf[7:9], "UV")
	release()
	c := acceptRaw(t, ln)
	waitFor(t, connected, "the connect-cb")
	s.Close()
	r := waitFor(t, readAllAsync(c), "the peer to read to EOF")
	if string(r.data) != "23478" {
		t.Errorf("peer got %q, want %q", r.data, "23478")
	}
	waitLoop(t, l, waitTimeout)
}

// Rule 6: after the event-cb returns the socket is closed: on EOF after its
// queued output is flushed; the event-cb may close it itself.
func TestSocketClosedAfterEventCb(t *testing.T) {
	t.Parallel()
	t.Run("EOF flushes output queued by the event-cb", func(t *testing.T) {
		t.Parallel()
		l := newTestLoop(t)
		ln, port := listenRaw(t)
		events := newEventRecorder()
		s := connectLocal(t, l, port, nil, func(ev error) {
			var e *asynctcp.Event
			if errors.As(ev, &e) && e.Socket != nil {
				if err := e.Socket.WriteData([]byte("bye")); err != nil {
					t.Errorf("WriteData in the EOF event-cb: %v", err)
				}
			}
			events.cb(ev)
		})
		c := acceptRaw(t, ln)
		c.CloseWrite()
		r := waitFor(t, readAllAsync(c), "the peer to read to EOF")
		if string(r.data) != "bye" {
			t.Errorf("peer got %q, want %q", r.data, "bye")
		}
		wantClass(t, waitFor(t, events.ch, "the EOF event"), asynctcp.ErrTCPEOF, "half-close")
		waitLoop(t, l, waitTimeout)
		if !s.Closed() {
			t.Error("socket not closed after its EOF event")
		}
	})
	t.Run("event-cb closes the socket", func(t *testing.T) {
		t.Parallel()
		l := newTestLoop(t)
		ln, port := listenRaw(t)
		closeErr := make(chan error, 1)
		events := newEventRecorder()
		s := connectLocal(t, l, port, nil, func(ev error) {
			var e *asynctcp.Event
			if errors.As(ev, &e) && e.Socket != nil {
				closeErr <- e.Socket.Close()
			}
			events.cb(ev)
		})
		acceptRaw(t, ln).Close()
		if err := waitFor(t, closeErr, "Close in the event-cb"); err != nil {
			t.Errorf("Close in the event-cb: %v", err)
		}
		waitLoop(t, l, waitTimeout)
		if n := events.n.Load(); n != 1 {
			t.Errorf("%d events, want 1", n)
		}
		if !s.Closed() {
			t.Error("socket not closed")
		}
	})
}

// Section 1: the package-level functions use DefaultLoop.
func TestPackageFunctionsUseDefaultLoop(t *testing.T) {
	echoed := make(chan string, 1)
	srv, err := asynctcp.Listen("127.0.0.1", 0, func(s *asynctcp.Socket, data []byte) {
		s.WriteData(data, asynctcp.OnWrite(func(s *asynctcp.Socket) { s.Close() }))
	}, nil)
	if err != nil {
		t.Fatalf("Listen: %v", err)
	}
	defer srv.Close()
	var got []byte
	d, release := heldDialer(t)
	s, err := asynctcp.Connect("127.0.0.1", portOf(t, srv.Addr()),
		func(s *asynctcp.Socket, data []byte) { got = append(got, data...) },
		func(error) { echoed <- string(got) },
		asynctcp.Data([]byte("hello")), asynctcp.Dialer(d))
	if err != nil {
		t.Fatalf("Connect: %v", err)
	}
	if st := asynctcp.DefaultLoop.Stats(); st.Servers != 1 || st.Outgoing != 1 {
		t.Errorf("DefaultLoop.Stats() = %+v, want the server and the connecting socket", st)
	}
	release()
	if e := waitFor(t, echoed, "the echo and EOF"); e != "hello" {
		t.Errorf("echo %q, want %q", e, "hello")
	}
	srv.Close()
	waitLoop(t, asynctcp.DefaultLoop, waitTimeout)
	if !s.Closed() {
		t.Error("socket not closed after EOF")
	}
}

// A Socket fits the runtime's 640-byte size class: a field more (or a
// field that adds padding) moves every socket to the 704-byte class, 64
// bytes more per connection, idle or not.
func TestSocketFitsItsSizeClass(t *testing.T) {
	if size := unsafe.Sizeof(asynctcp.Socket{}); size > 640 {
		t.Errorf("a Socket takes %d bytes, over the 640-byte size class: group small fields to fill the padding, or move rarely used ones out", size)
	}
}
