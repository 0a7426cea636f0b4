package asynctcp_test

import (
	"bufio"
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/net/nettest"

	"github.com/asynctcp/asynctcp"
)

// stTimeout bounds every wait of this file: longer than waitTimeout.
const stTimeout = 15 * time.Second

// stStall waits until count stops growing across two samples 300 ms
// apart (and is not zero), and returns it.
func stStall(t *testing.T, what string, count func() int64) int64 {
	t.Helper()
	deadline := time.Now().Add(stTimeout)
	last := count()
	for {
		time.Sleep(300 * time.Millisecond)
		n := count()
		if n == last && n > 0 {
			return n
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s did not stall within %v (count %d)", what, stTimeout, n)
		}
		last = n
	}
}

// stCheckPattern checks that p is the patternAt stream from offset off;
// ref is makePatternAt(0, patternPeriod+n), n at least len(p).
func stCheckPattern(ref, p []byte, off int64) error {
	k := int(off % patternPeriod)
	want := ref[k : k+len(p)]
	if bytes.Equal(p, want) {
		return nil
	}
	for i := range p {
		if p[i] != want[i] {
			return fmt.Errorf("byte at offset %d is %d, want %d", off+int64(i), p[i], want[i])
		}
	}
	return nil
}

// stPairOpts configures stDial.
type stPairOpts struct {
	serverRead  asynctcp.StreamFunc
	serverEvent asynctcp.EventFunc
	clientRead  asynctcp.StreamFunc
	clientEvent asynctcp.EventFunc
	server      []asynctcp.Option // no OnConnect: stDial sets it
	client      []asynctcp.Option // likewise
}

// stDial connects a ConnectStream stream to a ListenStream server of l on
// loopback, and returns the client stream (connected), a fresh view of the
// accepted socket and the server.
func stDial(l *asynctcp.Loop, o stPairOpts) (c, s *asynctcp.Stream, srv *asynctcp.Server, err error) {
	accepted := make(chan *asynctcp.Stream, 1)
	srvOpts := append([]asynctcp.Option{asynctcp.OnConnect(func(sock *asynctcp.Socket) {
		select {
		case accepted <- asynctcp.NewStream(sock):
		default:
		}
	})}, o.server...)
	srv, err = l.ListenStream("127.0.0.1", 0, o.serverRead, o.serverEvent, srvOpts...)
	if err != nil {
		return nil, nil, nil, fmt.Errorf("ListenStream: %w", err)
	}
	port := srv.Addr().(*net.TCPAddr).Port
	connected := make(chan struct{}, 1)
	cliOpts := append([]asynctcp.Option{asynctcp.OnConnect(func(*asynctcp.Socket) {
		select {
		case connected <- struct{}{}:
		default:
		}
	})}, o.client...)
	c, err = l.ConnectStream("127.0.0.1", port, o.clientRead, o.clientEvent, cliOpts...)
	if err != nil {
		srv.Close()
		return nil, nil, nil, fmt.Errorf("ConnectStream: %w", err)
	}
	timer := time.NewTimer(stTimeout)
	defer timer.Stop()
	for c2, a := connected, accepted; c2 != nil || a != nil; {
		select {
		case <-c2:
			c2 = nil
		case s = <-a:
			a = nil
		case <-timer.C:
			c.Socket().Abort()
			srv.Close()
			return nil, nil, nil, fmt.Errorf("connect-cbs did not run within %v", stTimeout)
		}
	}
	return c, s, srv, nil
}

// stPair is stDial for a test.
func stPair(t *testing.T, l *asynctcp.Loop, o stPairOpts) (c, s *asynctcp.Stream, srv *asynctcp.Server) {
	t.Helper()
	c, s, srv, err := stDial(l, o)
	if err != nil {
		t.Fatal(err)
	}
	return c, s, srv
}

// stReadAll reads st until an error and returns the bytes and the error.
func stReadAll(st *asynctcp.Stream) ([]byte, error) {
	var got []byte
	buf := make([]byte, 4096)
	for {
		n, err := st.Read(buf)
		got = append(got, buf[:n]...)
		if err != nil {
			return got, err
		}
	}
}

type stReadResult struct {
	data []byte
	err  error
}

// stGoRead reads st in a goroutine until an error.
func stGoRead(st *asynctcp.Stream) <-chan stReadResult {
	ch := make(chan stReadResult, 1)
	go func() {
		data, err := stReadAll(st)
		ch <- stReadResult{data, err}
	}()
	return ch
}

// stGoReadOnce runs one Read of st in a goroutine.
func stGoReadOnce(st *asynctcp.Stream, size int) <-chan stReadResult {
	ch := make(chan stReadResult, 1)
	go func() {
		buf := make([]byte, size)
		n, err := st.Read(buf)
		ch <- stReadResult{buf[:n], err}
	}()
	return ch
}

func stWantTimeout(t *testing.T, err error, what string) {
	t.Helper()
	var ne net.Error
	if !errors.As(err, &ne) || !ne.Timeout() {
		t.Fatalf("%s: err = %v (%T), want a net.Error with Timeout() true", what, err, err)
	}
	if !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Errorf("%s: err = %v, want errors.Is(err, os.ErrDeadlineExceeded)", what, err)
	}
}

// TestStreamPassesNettestConn runs x/net/nettest's net.Conn conformance
// suite over a ConnectStream stream and the stream of its accepted socket
// (SPEC rule 17).
func TestStreamPassesNettestConn(t *testing.T) {
	nettest.TestConn(t, func() (c1, c2 net.Conn, stop func(), err error) {
		l := &asynctcp.Loop{}
		c, s, srv, err := stDial(l, stPairOpts{})
		if err != nil {
			l.Exit(err)
			select {
			case <-goWait(l):
			case <-time.After(stTimeout):
				t.Errorf("Loop.Wait did not return after Exit (stats %+v)", l.Stats())
			}
			return nil, nil, nil, err
		}
		stop = func() {
			c.Close()
			s.Close()
			srv.Close()
			select {
			case err := <-goWait(l):
				if err != nil {
					t.Errorf("Loop.Wait = %v, want nil", err)
				}
			case <-time.After(stTimeout):
				t.Errorf("stop: Loop.Wait did not return within %v (stats %+v)", stTimeout, l.Stats())
				l.Exit(errTestFailed)
				<-goWait(l)
			}
		}
		return c, s, stop, nil
	})
}

// TestStreamModeCallbacksAreNotifications checks ConnectStream and
// ListenStream: each read-cb gets the socket and a stream over its input
// buffer, and reads what is buffered from it.
func TestStreamModeCallbacksAreNotifications(t *testing.T) {
	l := newTestLoop(t)
	const ask, answer = "question from the client", "answer from the server"
	var srvGot, cliGot []byte // owned by the callbacks of one socket each
	srvDone := make(chan []byte, 1)
	cliDone := make(chan []byte, 1)
	bad := make(chan string, 4)
	srv, err := l.ListenStream("127.0.0.1", 0, func(s *asynctcp.Socket, st *asynctcp.Stream) {
		if st == nil || st.Socket() != s {
			bad <- "server read-cb: stream is not a view of its socket"
			return
		}
		buf := make([]byte, 7) // small: the callback may read in several pieces
		for {
			n, err := st.TryRead(buf)
			if err != nil {
				bad <- fmt.Sprintf("server TryRead: %v", err)
				return
			}
			if n == 0 {
				break
			}
			srvGot = append(srvGot, buf[:n]...)
		}
		if len(srvGot) == len(ask) {
			srvDone <- srvGot
			if _, err := st.WriteString(answer); err != nil {
				bad <- fmt.Sprintf("server WriteString: %v", err)
			}
		}
	}, nil)
	if err != nil {
		t.Fatal(err)
	}
	var c *asynctcp.Stream
	cStarted := make(chan struct{})
	c, err = l.ConnectStream("127.0.0.1", portOf(t, srv.Addr()), func(s *asynctcp.Socket, st *asynctcp.Stream) {
		<-cStarted
		if st == nil || st.Socket() != s || s != c.Socket() {
			bad <- "client read-cb: stream is not a view of its socket"
			return
		}
		n := st.Buffered()
		if n == 0 {
			bad <- "client read-cb ran with nothing buffered"
			return
		}
		buf := make([]byte, n)
		if _, err := io.ReadFull(st, buf); err != nil {
			bad <- fmt.Sprintf("client ReadFull of Buffered() bytes: %v", err)
			return
		}
		cliGot = append(cliGot, buf...)
		if len(cliGot) == len(answer) {
			cliDone <- cliGot
		}
	}, nil)
	if err != nil {
		t.Fatal(err)
	}
	close(cStarted)
	if _, err := c.Write([]byte(ask)); err != nil {
		t.Fatalf("Write before the connection is up: %v", err)
	}
	select {
	case got := <-srvDone:
		if string(got) != ask {
			t.Fatalf("server got %q, want %q", got, ask)
		}
	case msg := <-bad:
		t.Fatal(msg)
	case <-time.After(stTimeout):
		t.Fatal("server did not get the question")
	}
	select {
	case got := <-cliDone:
		if string(got) != answer {
			t.Fatalf("client got %q, want %q", got, answer)
		}
	case msg := <-bad:
		t.Fatal(msg)
	case <-time.After(stTimeout):
		t.Fatal("client did not get the answer")
	}
	if err := c.Close(); err != nil {
		t.Fatalf("client Close: %v", err)
	}
	srv.Close()
	waitLoopNil(t, l, stTimeout)
	select {
	case msg := <-bad:
		t.Fatal(msg)
	default:
	}
}

// TestNewStreamOnConnectSocket checks NewStream over a socket made by
// Connect (not in stream mode): it writes through the socket's output
// buffer, the read-cb still gets the input, and Read sees the end.
func TestNewStreamOnConnectSocket(t *testing.T) {
	l := newTestLoop(t)
	ln, port := listenRaw(t)
	got := make(chan []byte, 16)
	sock, err := l.Connect("127.0.0.1", port, func(s *asynctcp.Socket, data []byte) { got <- data }, nil)
	if err != nil {
		t.Fatal(err)
	}
	peer := acceptRawKeepBuf(t, ln)
	st := asynctcp.NewStream(sock)
	if st.Socket() != sock {
		t.Fatal("NewStream(s).Socket() != s")
	}
	if _, err := st.WriteString("ping"); err != nil {
		t.Fatalf("WriteString: %v", err)
	}
	if err := st.Flush(); err != nil {
		t.Fatalf("Flush: %v", err)
	}
	buf := make([]byte, 4)
	peer.SetReadDeadline(time.Now().Add(stTimeout))
	if _, err := io.ReadFull(peer, buf); err != nil || string(buf) != "ping" {
		t.Fatalf("peer read %q, %v; want \"ping\"", buf, err)
	}
	if _, err := peer.Write([]byte("pong")); err != nil {
		t.Fatal(err)
	}
	var in []byte
	for len(in) < 4 {
		in = append(in, waitForWithin(t, got, stTimeout, "the read-cb")...)
	}
	if string(in) != "pong" {
		t.Fatalf("read-cb got %q, want \"pong\"", in)
	}
	if n := st.Buffered(); n != 0 {
		t.Fatalf("Buffered() = %d on a socket whose read-cb takes the input, want 0", n)
	}
	if n, err := st.TryRead(buf); n != 0 || err != nil {
		t.Fatalf("TryRead = %d, %v; want 0, nil", n, err)
	}
	reading := stGoRead(st)
	peer.Close()
	r := waitForWithin(t, reading, stTimeout, "Read to see the end of the stream")
	if len(r.data) != 0 || r.err != io.EOF {
		t.Fatalf("Read = %q, %v; want nothing, then io.EOF", r.data, r.err)
	}
	if err := st.Close(); err != nil {
		t.Fatalf("Close after the peer's EOF = %v, want nil", err)
	}
	waitLoopNil(t, l, stTimeout)
}

// TestDontDrainReadBuffer checks DontDrainReadBuffer on Connect and on
// Listen: the read-cb gets nil data and the bytes wait in the socket's
// input buffer for a stream to read them.
func TestDontDrainReadBuffer(t *testing.T) {
	const msg = "bytes that stay in the input buffer"
	check := func(t *testing.T, sock *asynctcp.Socket, peer net.Conn, calls <-chan []byte) {
		t.Helper()
		if _, err := peer.Write([]byte(msg)); err != nil {
			t.Fatal(err)
		}
		if data := waitForWithin(t, calls, stTimeout, "the read-cb"); data != nil {
			t.Fatalf("read-cb got data %q, want nil", data)
		}
		st := asynctcp.NewStream(sock)
		buf := make([]byte, len(msg))
		st.SetReadDeadline(time.Now().Add(stTimeout))
		if _, err := io.ReadFull(st, buf); err != nil || string(buf) != msg {
			t.Fatalf("stream read %q, %v; want %q", buf, err, msg)
		}
		if n, err := st.TryRead(buf); n != 0 || err != nil {
			t.Fatalf("TryRead after reading everything = %d, %v; want 0, nil", n, err)
		}
		// The callback saw no bytes in any call.
		for {
			select {
			case data := <-calls:
				if data != nil {
					t.Fatalf("read-cb got data %q, want nil", data)
				}
				continue
			default:
			}
			break
		}
		if err := sock.Close(); err != nil {
			t.Fatalf("Close: %v", err)
		}
		peer.SetReadDeadline(time.Now().Add(stTimeout))
		if n, err := peer.Read(buf); err != io.EOF {
			t.Fatalf("peer Read after Close = %d, %v; want io.EOF", n, err)
		}
	}
	t.Run("Connect", func(t *testing.T) {
		l := newTestLoop(t)
		ln, port := listenRaw(t)
		calls := make(chan []byte, 64)
		sock, err := l.Connect("127.0.0.1", port, func(s *asynctcp.Socket, data []byte) { calls <- data }, nil,
			asynctcp.DontDrainReadBuffer())
		if err != nil {
			t.Fatal(err)
		}
		peer := acceptRawKeepBuf(t, ln)
		check(t, sock, peer, calls)
		waitLoopNil(t, l, stTimeout)
	})
	t.Run("Listen", func(t *testing.T) {
		l := newTestLoop(t)
		calls := make(chan []byte, 64)
		socks := make(chan *asynctcp.Socket, 1)
		srv, err := l.Listen("127.0.0.1", 0, func(s *asynctcp.Socket, data []byte) { calls <- data }, nil,
			asynctcp.DontDrainReadBuffer(), asynctcp.OnConnect(func(s *asynctcp.Socket) { socks <- s }))
		if err != nil {
			t.Fatal(err)
		}
		peer := dialRaw(t, portOf(t, srv.Addr()))
		sock := waitForWithin(t, socks, stTimeout, "the accepted socket")
		check(t, sock, peer, calls)
		srv.Close()
		waitLoopNil(t, l, stTimeout)
	})
}

// TestStreamReadReturnsWhatIsBuffered checks Read (what is buffered;
// blocks only while nothing is), TryRead, ReadByte, Buffered and ClearInput.
func TestStreamReadReturnsWhatIsBuffered(t *testing.T) {
	l := newTestLoop(t)
	c, s, srv := stPair(t, l, stPairOpts{})
	buf := make([]byte, 100)

	if n, err := s.TryRead(buf); n != 0 || err != nil {
		t.Fatalf("TryRead on an empty stream = %d, %v; want 0, nil", n, err)
	}
	if n := s.Buffered(); n != 0 {
		t.Fatalf("Buffered() = %d on an empty stream, want 0", n)
	}
	if _, err := c.Write([]byte("abc")); err != nil {
		t.Fatal(err)
	}
	eventuallyWithin(t, stTimeout, "3 bytes buffered", func() bool { return s.Buffered() == 3 })
	if n, err := s.Read(buf); n != 3 || err != nil || string(buf[:3]) != "abc" {
		t.Fatalf("Read = %d %q, %v; want 3 \"abc\", nil", n, buf[:n], err)
	}
	if n := s.Buffered(); n != 0 {
		t.Fatalf("Buffered() after Read = %d, want 0", n)
	}
	if n, err := s.Read(nil); n != 0 || err != nil {
		t.Fatalf("Read(nil) = %d, %v; want 0, nil without blocking", n, err)
	}

	// Nothing buffered: Read blocks until a byte arrives.
	reading := stGoReadOnce(s, 100)
	expectNone(t, reading, 150*time.Millisecond, "Read with nothing buffered")
	if err := c.WriteByte('d'); err != nil {
		t.Fatal(err)
	}
	if r := waitForWithin(t, reading, stTimeout, "the blocked Read"); string(r.data) != "d" || r.err != nil {
		t.Fatalf("blocked Read = %q, %v; want \"d\", nil", r.data, r.err)
	}

	// A short buffer takes part of what is buffered; the rest stays.
	if _, err := c.WriteString("efgh"); err != nil {
		t.Fatal(err)
	}
	eventuallyWithin(t, stTimeout, "4 bytes buffered", func() bool { return s.Buffered() == 4 })
	if n, err := s.TryRead(buf[:2]); n != 2 || err != nil || string(buf[:2]) != "ef" {
		t.Fatalf("TryRead(2) = %d %q, %v; want 2 \"ef\", nil", n, buf[:n], err)
	}
	if n := s.Buffered(); n != 2 {
		t.Fatalf("Buffered() = %d, want 2", n)
	}
	if b, err := s.ReadByte(); b != 'g' || err != nil {
		t.Fatalf("ReadByte = %q, %v; want 'g', nil", b, err)
	}
	if b, err := s.ReadByte(); b != 'h' || err != nil {
		t.Fatalf("ReadByte = %q, %v; want 'h', nil", b, err)
	}

	// ReadByte blocks like Read.
	type byteResult struct {
		b   byte
		err error
	}
	rb := make(chan byteResult, 1)
	go func() {
		b, err := s.ReadByte()
		rb <- byteResult{b, err}
	}()
	expectNone(t, rb, 100*time.Millisecond, "ReadByte with nothing buffered")
	if err := c.WriteByte('i'); err != nil {
		t.Fatal(err)
	}
	if r := waitForWithin(t, rb, stTimeout, "the blocked ReadByte"); r.b != 'i' || r.err != nil {
		t.Fatalf("ReadByte = %q, %v; want 'i', nil", r.b, r.err)
	}

	// ClearInput drops what is buffered, and only that.
	if _, err := c.WriteString("dropped"); err != nil {
		t.Fatal(err)
	}
	eventuallyWithin(t, stTimeout, "7 bytes buffered", func() bool { return s.Buffered() == 7 })
	s.ClearInput()
	if n := s.Buffered(); n != 0 {
		t.Fatalf("Buffered() after ClearInput = %d, want 0", n)
	}
	if n, err := s.TryRead(buf); n != 0 || err != nil {
		t.Fatalf("TryRead after ClearInput = %d %q, %v; want 0, nil", n, buf[:n], err)
	}
	if _, err := c.WriteString("kept"); err != nil {
		t.Fatal(err)
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	s.SetReadDeadline(time.Now().Add(stTimeout))
	if got, err := stReadAll(s); string(got) != "kept" || err != io.EOF {
		t.Fatalf("after ClearInput, read %q, %v; want \"kept\", io.EOF", got, err)
	}
	srv.Close()
	waitLoopNil(t, l, stTimeout)
}

// TestStreamWritesQueue checks that Write, WriteString and WriteByte queue
// on the socket's output buffer (visible in Socket.Buffered while writing
// is disabled) and return at once, and that ClearOutput drops what is
// queued.
func TestStreamWritesQueue(t *testing.T) {
	l := newTestLoop(t)
	c, s, srv := stPair(t, l, stPairOpts{})
	if err := c.Socket().Disable(asynctcp.EvWrite); err != nil {
		t.Fatal(err)
	}
	if n, err := c.Write([]byte("dropped ")); n != 8 || err != nil {
		t.Fatalf("Write = %d, %v; want 8, nil", n, err)
	}
	if got := c.Socket().Buffered(); got != 8 {
		t.Fatalf("Socket().Buffered() = %d, want 8", got)
	}
	c.ClearOutput()
	if got := c.Socket().Buffered(); got != 0 {
		t.Fatalf("Socket().Buffered() after ClearOutput = %d, want 0", got)
	}
	p := []byte("ab")
	if n, err := c.Write(p); n != 2 || err != nil {
		t.Fatalf("Write = %d, %v; want 2, nil", n, err)
	}
	p[0] = 'X' // Write copied p
	if n, err := c.WriteString("cd"); n != 2 || err != nil {
		t.Fatalf("WriteString = %d, %v; want 2, nil", n, err)
	}
	if err := c.WriteByte('e'); err != nil {
		t.Fatalf("WriteByte: %v", err)
	}
	if got := c.Socket().Buffered(); got != 5 {
		t.Fatalf("Socket().Buffered() = %d, want 5", got)
	}
	if err := c.Socket().Enable(asynctcp.EvWrite); err != nil {
		t.Fatal(err)
	}
	c.SetWriteDeadline(time.Now().Add(stTimeout))
	if err := c.Flush(); err != nil {
		t.Fatalf("Flush: %v", err)
	}
	if got := c.Socket().Buffered(); got != 0 {
		t.Fatalf("Socket().Buffered() after Flush = %d, want 0", got)
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	s.SetReadDeadline(time.Now().Add(stTimeout))
	if got, err := stReadAll(s); string(got) != "abcde" || err != io.EOF {
		t.Fatalf("server read %q, %v; want \"abcde\", io.EOF", got, err)
	}
	srv.Close()
	waitLoopNil(t, l, stTimeout)
}

// TestStreamFlushWaitsForOutput checks Flush: it blocks while the peer
// does not read, a write deadline bounds it (timeout, socket open), and it
// returns nil once everything was written.
func TestStreamFlushWaitsForOutput(t *testing.T) {
	l := newTestLoop(t)
	c, s, srv := stPair(t, l, stPairOpts{})
	const size = 16 << 20
	ref := makePatternAt(0, patternPeriod+size)
	if err := c.Socket().WriteData(ref[:size]); err != nil {
		t.Fatal(err)
	}
	// The peer does not read: the output cannot drain.
	c.SetWriteDeadline(time.Now().Add(200 * time.Millisecond))
	start := time.Now()
	err := c.Flush()
	stWantTimeout(t, err, "Flush past the write deadline")
	if el := time.Since(start); el < 150*time.Millisecond {
		t.Fatalf("Flush returned after %v, before the deadline", el)
	}
	if c.Socket().Closed() || c.Socket().Buffered() == 0 {
		t.Fatalf("after the Flush timeout: Closed() = %v, Buffered() = %d; want an open socket with output queued",
			c.Socket().Closed(), c.Socket().Buffered())
	}

	c.SetWriteDeadline(time.Time{})
	reading := make(chan error, 1)
	go func() {
		buf := make([]byte, size)
		if _, err := io.ReadFull(s, buf); err != nil {
			reading <- err
			return
		}
		reading <- stCheckPattern(ref, buf, 0)
	}()
	flushed := make(chan error, 1)
	go func() { flushed <- c.Flush() }()
	if err := waitForWithin(t, flushed, stTimeout, "Flush while the peer reads"); err != nil {
		t.Fatalf("Flush = %v, want nil", err)
	}
	if n := c.Socket().Buffered(); n != 0 {
		t.Fatalf("Buffered() after Flush = %d, want 0", n)
	}
	if err := waitForWithin(t, reading, stTimeout, "the server reading 16 MiB"); err != nil {
		t.Fatalf("server read: %v", err)
	}
	if err := c.Flush(); err != nil {
		t.Fatalf("Flush with nothing queued = %v, want nil", err)
	}
	c.Close()
	s.Close()
	srv.Close()
	waitLoopNil(t, l, stTimeout)
}

// TestStreamFlushReturnsSocketError checks that Flush returns the socket's
// error where the socket dies with output queued: the peer resets, so the
// error is the socket's ErrTCPEOF event with Code set (SPEC rule 5).
func TestStreamFlushReturnsSocketError(t *testing.T) {
	l := newTestLoop(t)
	events := make(chan error, 4)
	c, s, srv := stPair(t, l, stPairOpts{clientEvent: func(ev error) { events <- ev }})
	const size = 16 << 20
	if err := c.Socket().WriteData(make([]byte, size)); err != nil {
		t.Fatal(err)
	}
	flushed := make(chan error, 1)
	go func() { flushed <- c.Flush() }()
	expectNone(t, flushed, 200*time.Millisecond, "Flush while the peer does not read")
	if c.Socket().Buffered() == 0 {
		t.Fatal("all output was written while the peer did not read")
	}
	tc, ok := s.Socket().Conn().(*net.TCPConn)
	if !ok {
		t.Fatalf("server Conn() is a %T, want *net.TCPConn", s.Socket().Conn())
	}
	if err := tc.SetLinger(0); err != nil {
		t.Fatal(err)
	}
	if err := s.Socket().Abort(); err != nil { // RST
		t.Fatal(err)
	}
	err := waitForWithin(t, flushed, stTimeout, "Flush after the peer reset")
	ev := waitForWithin(t, events, stTimeout, "the client's event after the reset")
	var e *asynctcp.Event
	if !errors.As(ev, &e) || !errors.Is(ev, asynctcp.ErrTCPEOF) || e.Code == -1 {
		t.Errorf("client event after the peer's reset = %v (%T), want an ErrTCPEOF *Event with Code set", ev, ev)
	}
	if err == nil {
		t.Fatalf("Flush = nil after the peer reset the connection with output still queued "+
			"(%d bytes never written), want the socket's error", size)
	}
	var fe *asynctcp.Event
	if !errors.As(err, &fe) || !errors.Is(err, asynctcp.ErrTCPEOF) || fe.Code == -1 {
		t.Fatalf("Flush after the peer's reset = %v (%T), want the socket's ErrTCPEOF *Event with Code set", err, err)
	}
	t.Logf("Flush after reset: %v (class %v, code %d)", err, fe.Class, fe.Code)
	eventuallyWithin(t, stTimeout, "the client socket to close after the reset", c.Socket().Closed)
	srv.Close()
	waitLoopNil(t, l, stTimeout)
}

// TestStreamReadAtEOF checks that after the peer's EOF a stream returns
// the rest of the input, then io.EOF, even after asynctcp closed the
// socket; that Stream.Close then returns nil; and that on a socket the
// application closed, Close and Read return an ErrSocketClosed event.
func TestStreamReadAtEOF(t *testing.T) {
	l := newTestLoop(t)
	events := make(chan error, 4)
	c, s, srv := stPair(t, l, stPairOpts{serverEvent: func(ev error) { events <- ev }})
	if _, err := c.WriteString("the tail"); err != nil {
		t.Fatal(err)
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	ev := waitForWithin(t, events, stTimeout, "the server's EOF event")
	if !errors.Is(ev, asynctcp.ErrTCPEOF) {
		t.Fatalf("server event = %v, want ErrTCPEOF", ev)
	}
	eventuallyWithin(t, stTimeout, "asynctcp to close the server socket after its EOF", s.Socket().Closed)
	if n := s.Buffered(); n != len("the tail") {
		t.Fatalf("Buffered() after EOF = %d, want %d", n, len("the tail"))
	}
	buf := make([]byte, 3)
	var got []byte
	var err error
	for err == nil {
		var n int
		n, err = s.Read(buf)
		got = append(got, buf[:n]...)
	}
	if string(got) != "the tail" || err != io.EOF {
		t.Fatalf("reads after EOF: %q, %v; want \"the tail\", io.EOF", got, err)
	}
	if n, err := s.Read(buf); n != 0 || err != io.EOF {
		t.Fatalf("Read again = %d, %v; want 0, io.EOF", n, err)
	}
	if n, err := s.TryRead(buf); n != 0 || err != io.EOF {
		t.Fatalf("TryRead at EOF = %d, %v; want 0, io.EOF", n, err)
	}
	if _, err := s.ReadByte(); err != io.EOF {
		t.Fatalf("ReadByte at EOF = %v, want io.EOF", err)
	}
	if err := s.Close(); err != nil {
		t.Fatalf("Stream.Close after asynctcp closed the socket at EOF = %v, want nil", err)
	}

	// The client: closed by the application.
	wantSocketClosed(t, c.Close(), c.Socket(), "Stream.Close after the application closed the socket")
	n, err := c.Read(buf)
	if n != 0 {
		t.Fatalf("Read on an application-closed stream = %d bytes", n)
	}
	wantSocketClosed(t, err, c.Socket(), "Read after the application closed the socket")
	_, err = c.Write([]byte("x"))
	wantSocketClosed(t, err, c.Socket(), "Write after the application closed the socket")
	srv.Close()
	waitLoopNil(t, l, stTimeout)
}

// TestStreamReadAfterResetGivesEvent checks that after a reset by the peer
// a stream returns the rest of the input, then the socket's ErrTCPEOF
// event with Code set.
func TestStreamReadAfterResetGivesEvent(t *testing.T) {
	l := newTestLoop(t)
	ln, port := listenRaw(t)
	events := make(chan error, 4)
	c, err := l.ConnectStream("127.0.0.1", port, nil, func(ev error) { events <- ev })
	if err != nil {
		t.Fatal(err)
	}
	peer := acceptRawKeepBuf(t, ln)
	if _, err := peer.Write([]byte("the rest")); err != nil {
		t.Fatal(err)
	}
	eventuallyWithin(t, stTimeout, "8 bytes buffered", func() bool { return c.Buffered() == 8 })
	if err := peer.SetLinger(0); err != nil {
		t.Fatal(err)
	}
	peer.Close() // RST
	ev := waitForWithin(t, events, stTimeout, "the client's event after the reset")
	var e *asynctcp.Event
	if !errors.As(ev, &e) || !errors.Is(ev, asynctcp.ErrTCPEOF) || e.Code == -1 {
		t.Fatalf("event after reset = %v (%T), want an ErrTCPEOF *Event with Code set", ev, ev)
	}
	eventuallyWithin(t, stTimeout, "asynctcp to close the socket after the reset", c.Socket().Closed)
	got, err := stReadAll(c)
	if string(got) != "the rest" {
		t.Fatalf("read after reset: %q, want \"the rest\"", got)
	}
	var re *asynctcp.Event
	if !errors.As(err, &re) || !errors.Is(err, asynctcp.ErrTCPEOF) || re.Code == -1 {
		t.Fatalf("Read after the rest = %v (%T), want an ErrTCPEOF *Event with Code set", err, err)
	}
	if re.Socket != c.Socket() {
		t.Errorf("Read error's Socket = %p, want %p", re.Socket, c.Socket())
	}
	if err == io.EOF {
		t.Fatal("Read after a reset returned io.EOF, want the event")
	}
	if n, err := c.TryRead(make([]byte, 8)); n != 0 || !errors.Is(err, asynctcp.ErrTCPEOF) {
		t.Fatalf("TryRead after the reset = %d, %v; want 0, the ErrTCPEOF event", n, err)
	}
	if err := c.Close(); err != nil {
		t.Fatalf("Stream.Close after asynctcp closed the socket on a reset = %v, want nil", err)
	}
	waitLoopNil(t, l, stTimeout)
}

// TestStreamCloseAfterApplicationClose checks that Stream.Close returns an
// ErrSocketClosed event where the application closed the socket already.
func TestStreamCloseAfterApplicationClose(t *testing.T) {
	l := newTestLoop(t)
	c, s, srv := stPair(t, l, stPairOpts{})
	if err := s.Socket().Abort(); err != nil {
		t.Fatal(err)
	}
	wantSocketClosed(t, s.Close(), s.Socket(), "Stream.Close after Socket.Abort")
	// The client may see the abort first and close itself: either way the
	// first Stream.Close returns nil and the second an ErrSocketClosed.
	if err := c.Close(); err != nil {
		t.Fatalf("first Close = %v, want nil", err)
	}
	wantSocketClosed(t, c.Close(), c.Socket(), "second Stream.Close")
	srv.Close()
	waitLoopNil(t, l, stTimeout)
}

// TestStreamWriteBlocksOverOneMiB checks that Stream.Write blocks only
// while more than 1 MiB is queued, that a write deadline ends the blocked
// Write with a timeout and leaves the socket usable, and that every byte
// written arrives once the peer reads.
func TestStreamWriteBlocksOverOneMiB(t *testing.T) {
	l := newTestLoop(t)
	c, s, srv := stPair(t, l, stPairOpts{})
	const chunk = 64 << 10
	var chunks atomic.Int64
	type writeEnd struct {
		n   int // what the failing Write queued
		err error
	}
	wrote := make(chan writeEnd, 1)
	go func() {
		p := make([]byte, chunk)
		var off int64
		for {
			copy(p, patternAt(int(off), len(p)))
			if n, err := c.Write(p); err != nil {
				wrote <- writeEnd{n, err}
				return
			}
			off += chunk
			chunks.Add(1)
		}
	}()
	n := stStall(t, "the stream writer", chunks.Load)
	queued := c.Socket().Buffered()
	t.Logf("writer blocked after %d chunks (%d bytes), %d queued", n, n*chunk, queued)
	if queued <= 1<<20 || queued > 1<<20+chunk {
		t.Fatalf("writer blocked with Socket().Buffered() = %d, want over 1 MiB and at most 1 MiB + one chunk", queued)
	}
	select {
	case end := <-wrote:
		t.Fatalf("writer ended: %v", end.err)
	default:
	}
	c.SetWriteDeadline(time.Now().Add(100 * time.Millisecond))
	end := waitForWithin(t, wrote, stTimeout, "the blocked Write to time out")
	stWantTimeout(t, end.err, "blocked Write at the deadline")
	if end.n != 0 {
		t.Fatalf("the timed-out Write returned n = %d, want 0 (it queues nothing)", end.n)
	}
	if c.Socket().Closed() {
		t.Fatal("socket closed after a write deadline")
	}
	total := chunks.Load() * chunk
	if got := c.Socket().Buffered(); got != int(queued) {
		t.Fatalf("Buffered() = %d after the timed-out Write, want %d (it queues nothing)", got, queued)
	}

	c.SetWriteDeadline(time.Time{})
	reading := make(chan error, 1)
	go func() {
		ref := makePatternAt(0, patternPeriod+256<<10)
		buf := make([]byte, 256<<10)
		var off int64
		for off < total {
			m := int(min(int64(len(buf)), total-off))
			if _, err := io.ReadFull(s, buf[:m]); err != nil {
				reading <- fmt.Errorf("at offset %d: %w", off, err)
				return
			}
			if err := stCheckPattern(ref, buf[:m], off); err != nil {
				reading <- err
				return
			}
			off += int64(m)
		}
		reading <- nil
	}()
	flushed := make(chan error, 1)
	go func() { flushed <- c.Flush() }()
	if err := waitForWithin(t, flushed, stTimeout, "Flush once the peer reads"); err != nil {
		t.Fatalf("Flush after the write timeout = %v, want nil", err)
	}
	if err := waitForWithin(t, reading, stTimeout, "the server reading everything written"); err != nil {
		t.Fatalf("server read: %v", err)
	}
	if _, err := c.Write([]byte("end")); err != nil {
		t.Fatalf("Write after the timeout: %v", err)
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	s.SetReadDeadline(time.Now().Add(stTimeout))
	if got, err := stReadAll(s); string(got) != "end" || err != io.EOF {
		t.Fatalf("server read %q, %v after the flushed bytes; want \"end\", io.EOF", got, err)
	}
	srv.Close()
	waitLoopNil(t, l, stTimeout)
}

// TestStreamReadDeadlineLeavesSocketUsable checks that a read deadline
// ends a blocked Read with a timeout, and that the socket stays open: after
// the deadline is cleared, a Read gets the data.
func TestStreamReadDeadlineLeavesSocketUsable(t *testing.T) {
	l := newTestLoop(t)
	c, s, srv := stPair(t, l, stPairOpts{})
	buf := make([]byte, 16)

	s.SetReadDeadline(time.Now().Add(100 * time.Millisecond))
	start := time.Now()
	n, err := s.Read(buf)
	if n != 0 {
		t.Fatalf("Read = %d bytes, want 0", n)
	}
	stWantTimeout(t, err, "Read at the deadline")
	if el := time.Since(start); el < 80*time.Millisecond {
		t.Fatalf("Read timed out after %v, before the deadline", el)
	}
	// A deadline in the past times out at once; so does ReadByte.
	if _, err := s.Read(buf); err == nil {
		t.Fatal("Read past the deadline succeeded with nothing buffered")
	}
	_, err = s.ReadByte()
	stWantTimeout(t, err, "ReadByte past the deadline")
	if s.Socket().Closed() {
		t.Fatal("socket closed by a read deadline")
	}

	// SetDeadline covers both directions.
	s.SetDeadline(time.Now().Add(-time.Second))
	_, err = s.Write([]byte("x"))
	stWantTimeout(t, err, "Write past SetDeadline")
	_, err = s.Read(buf)
	stWantTimeout(t, err, "Read past SetDeadline")

	s.SetDeadline(time.Time{})
	reading := stGoReadOnce(s, 16)
	expectNone(t, reading, 100*time.Millisecond, "Read after the deadline was cleared")
	if _, err := c.WriteString("late"); err != nil {
		t.Fatal(err)
	}
	if r := waitForWithin(t, reading, stTimeout, "Read after the deadline was cleared"); string(r.data) != "late" || r.err != nil {
		t.Fatalf("Read = %q, %v; want \"late\", nil", r.data, r.err)
	}
	if _, err := s.WriteString("reply"); err != nil {
		t.Fatalf("Write after the deadline was cleared: %v", err)
	}
	c.SetReadDeadline(time.Now().Add(stTimeout))
	got := make([]byte, 5)
	if _, err := io.ReadFull(c, got); err != nil || string(got) != "reply" {
		t.Fatalf("client read %q, %v; want \"reply\"", got, err)
	}
	c.Close()
	s.Close()
	srv.Close()
	waitLoopNil(t, l, stTimeout)
}

// TestStreamDeadlinesBelongToEachView checks that two streams over one
// socket have their own deadlines: one view's deadline does not end a Read
// blocked on the other.
func TestStreamDeadlinesBelongToEachView(t *testing.T) {
	l := newTestLoop(t)
	c, s, srv := stPair(t, l, stPairOpts{})
	v1 := asynctcp.NewStream(s.Socket())
	v2 := asynctcp.NewStream(s.Socket())
	blocked := stGoReadOnce(v2, 16)
	v1.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
	_, err := v1.Read(make([]byte, 16))
	stWantTimeout(t, err, "Read on the view with the deadline")
	expectNone(t, blocked, 200*time.Millisecond, "Read on the view without a deadline")
	// A deadline in the past on one view: the other still writes.
	v1.SetWriteDeadline(time.Now().Add(-time.Second))
	if _, err := v1.Write([]byte("x")); err == nil {
		t.Fatal("Write on the view with a passed write deadline succeeded")
	}
	if _, err := v2.WriteString("from v2"); err != nil {
		t.Fatalf("Write on the other view: %v", err)
	}
	c.SetReadDeadline(time.Now().Add(stTimeout))
	got := make([]byte, 7)
	if _, err := io.ReadFull(c, got); err != nil || string(got) != "from v2" {
		t.Fatalf("client read %q, %v; want \"from v2\"", got, err)
	}
	if _, err := c.WriteString("hi"); err != nil {
		t.Fatal(err)
	}
	if r := waitForWithin(t, blocked, stTimeout, "the blocked Read on the view without a deadline"); string(r.data) != "hi" || r.err != nil {
		t.Fatalf("Read on the view without a deadline = %q, %v; want \"hi\", nil", r.data, r.err)
	}
	c.Close()
	s.Close()
	srv.Close()
	waitLoopNil(t, l, stTimeout)
}

// TestStreamInputLimitBoundsUnreadInput checks SPEC rule 16: a raw peer
// writes 128 MiB to a stream nobody reads; the socket stops reading at the
// input limit, and every byte arrives in order once the stream is read.
func TestStreamInputLimitBoundsUnreadInput(t *testing.T) {
	cases := []struct {
		name    string
		connect bool // ConnectStream (else ListenStream)
		limit   int
		size    int64
		opts    []asynctcp.Option
	}{
		{"ListenStream/default", false, 1 << 20, 128 << 20, nil},
		{"ConnectStream/default", true, 1 << 20, 128 << 20, nil},
		{"ListenStream/64KiB", false, 64 << 10, 32 << 20, []asynctcp.Option{asynctcp.InputLimit(64 << 10)}},
		{"ConnectStream/64KiB", true, 64 << 10, 32 << 20, []asynctcp.Option{asynctcp.InputLimit(64 << 10)}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			l := newTestLoop(t)
			var st *asynctcp.Stream
			var peer *net.TCPConn
			var srv *asynctcp.Server
			if tc.connect {
				ln, port := listenRaw(t)
				var err error
				st, err = l.ConnectStream("127.0.0.1", port, nil, nil, tc.opts...)
				if err != nil {
					t.Fatal(err)
				}
				peer = acceptRawKeepBuf(t, ln)
			} else {
				accepted := make(chan *asynctcp.Stream, 1)
				var err error
				srv, err = l.ListenStream("127.0.0.1", 0, nil, nil, append(tc.opts,
					asynctcp.OnConnect(func(s *asynctcp.Socket) { accepted <- asynctcp.NewStream(s) }))...)
				if err != nil {
					t.Fatal(err)
				}
				peer = dialRaw(t, portOf(t, srv.Addr()))
				st = waitForWithin(t, accepted, stTimeout, "the accepted socket")
			}

			var sent atomic.Int64
			wrote := make(chan error, 1)
			go func() {
				ref := makePatternAt(0, patternPeriod+64<<10)
				var off int64
				for off < tc.size {
					m := int(min(int64(64<<10), tc.size-off))
					k := int(off % patternPeriod)
					n, err := peer.Write(ref[k : k+m])
					off += int64(n)
					sent.Store(off)
					if err != nil {
						wrote <- err
						return
					}
				}
				wrote <- peer.CloseWrite()
			}()

			stalled := stStall(t, "the raw peer", sent.Load)
			buffered := st.Buffered()
			t.Logf("peer stalled after %d bytes; stream holds %d (limit %d)", stalled, buffered, tc.limit)
			if stalled >= tc.size {
				t.Fatalf("the peer wrote all %d bytes to a stream nobody reads", tc.size)
			}
			if buffered > tc.limit {
				t.Fatalf("Buffered() = %d with nobody reading, want at most the input limit %d", buffered, tc.limit)
			}
			if buffered == 0 {
				t.Fatal("Buffered() = 0: the socket read nothing")
			}

			ref := makePatternAt(0, patternPeriod+256<<10)
			buf := make([]byte, 256<<10)
			var off int64
			st.SetReadDeadline(time.Now().Add(stTimeout))
			for off < tc.size {
				m := int(min(int64(len(buf)), tc.size-off))
				if _, err := io.ReadFull(st, buf[:m]); err != nil {
					t.Fatalf("ReadFull at offset %d: %v", off, err)
				}
				if err := stCheckPattern(ref, buf[:m], off); err != nil {
					t.Fatal(err)
				}
				off += int64(m)
			}
			if n, err := st.Read(buf); n != 0 || err != io.EOF {
				t.Fatalf("Read after %d bytes = %d, %v; want 0, io.EOF", tc.size, n, err)
			}
			if err := waitForWithin(t, wrote, stTimeout, "the raw peer to finish"); err != nil {
				t.Fatalf("raw peer: %v", err)
			}
			if err := st.Close(); err != nil {
				t.Fatalf("Stream.Close after EOF = %v, want nil", err)
			}
			peer.Close()
			if srv != nil {
				srv.Close()
			}
			waitLoopNil(t, l, stTimeout)
		})
	}
}

// TestStreamBufioScannerFromAnotherGoroutine reads lines with
// bufio.Scanner over a stream, outside any callback.
func TestStreamBufioScannerFromAnotherGoroutine(t *testing.T) {
	l := newTestLoop(t)
	c, s, srv := stPair(t, l, stPairOpts{})
	const lines = 5000
	type scanResult struct {
		lines []string
		err   error
	}
	scanned := make(chan scanResult, 1)
	go func() {
		var r scanResult
		sc := bufio.NewScanner(s)
		for sc.Scan() {
			r.lines = append(r.lines, sc.Text())
		}
		r.err = sc.Err()
		scanned <- r
	}()
	wrote := make(chan error, 1)
	go func() {
		w := bufio.NewWriterSize(c, 1000) // flushes in pieces that split lines
		for i := 0; i < lines; i++ {
			if _, err := fmt.Fprintf(w, "line %d %s\n", i, strings.Repeat("x", i%97)); err != nil {
				wrote <- err
				return
			}
		}
		if err := w.Flush(); err != nil {
			wrote <- err
			return
		}
		wrote <- c.Close()
	}()
	if err := waitForWithin(t, wrote, stTimeout, "the writer"); err != nil {
		t.Fatalf("writer: %v", err)
	}
	r := waitForWithin(t, scanned, stTimeout, "the scanner")
	if r.err != nil {
		t.Fatalf("Scanner.Err() = %v, want nil at EOF", r.err)
	}
	if len(r.lines) != lines {
		t.Fatalf("scanned %d lines, want %d", len(r.lines), lines)
	}
	for i, line := range r.lines {
		if want := fmt.Sprintf("line %d %s", i, strings.Repeat("x", i%97)); line != want {
			t.Fatalf("line %d = %q, want %q", i, line, want)
		}
	}
	if err := s.Close(); err != nil {
		t.Fatalf("Close after EOF = %v, want nil", err)
	}
	srv.Close()
	waitLoopNil(t, l, stTimeout)
}

// TestStreamIOCopyEcho runs an echo server whose per-socket goroutine does
// io.Copy(st, st); the client sends 8 MiB and reads it back.
func TestStreamIOCopyEcho(t *testing.T) {
	// Registered before stLoop's cleanup, so it runs after it: on a
	// failure the loop's Exit ends the echo goroutines' streams first.
	var echoes sync.WaitGroup
	t.Cleanup(echoes.Wait)
	l := newTestLoop(t)
	copied := make(chan error, 1)
	srv, err := l.ListenStream("127.0.0.1", 0, nil, nil, asynctcp.OnConnect(func(s *asynctcp.Socket) {
		echoes.Add(1)
		go func() {
			defer echoes.Done()
			st := asynctcp.NewStream(s)
			_, err := io.Copy(st, st)
			if cerr := st.Close(); err == nil {
				err = cerr
			}
			copied <- err
		}()
	}))
	if err != nil {
		t.Fatal(err)
	}
	c, err := l.ConnectStream("127.0.0.1", portOf(t, srv.Addr()), nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	const size = 8 << 20
	ref := makePatternAt(0, patternPeriod+size)
	wrote := make(chan error, 1)
	go func() {
		for off := 0; off < size; off += 100 << 10 {
			if _, err := c.Write(ref[off:min(off+100<<10, size)]); err != nil {
				wrote <- err
				return
			}
		}
		wrote <- nil
	}()
	got := make([]byte, size)
	c.SetReadDeadline(time.Now().Add(stTimeout))
	if _, err := io.ReadFull(c, got); err != nil {
		t.Fatalf("client ReadFull of the echo: %v", err)
	}
	if err := stCheckPattern(ref, got, 0); err != nil {
		t.Fatalf("echo: %v", err)
	}
	if err := waitForWithin(t, wrote, stTimeout, "the client writer"); err != nil {
		t.Fatalf("client Write: %v", err)
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	if err := waitForWithin(t, copied, stTimeout, "the echo's io.Copy"); err != nil {
		t.Fatalf("echo io.Copy / Close = %v, want nil at EOF", err)
	}
	srv.Close()
	waitLoopNil(t, l, stTimeout)
	echoes.Wait()
}

// stCert makes a self-signed ECDSA certificate for 127.0.0.1 and
// localhost.
func stCert(t *testing.T) (tls.Certificate, *x509.CertPool) {
	t.Helper()
	cert, pool, err := newSelfSigned()
	if err != nil {
		t.Fatal(err)
	}
	return cert, pool
}

// TestStreamCarriesTLS runs crypto/tls over a pair of streams: handshake,
// then data both ways.
func TestStreamCarriesTLS(t *testing.T) {
	cert, pool := stCert(t)
	l := newTestLoop(t)
	c, s, srv := stPair(t, l, stPairOpts{})
	tc := tls.Client(c, &tls.Config{RootCAs: pool, ServerName: "localhost", MinVersion: tls.VersionTLS12})
	ts := tls.Server(s, &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12})
	tc.SetDeadline(time.Now().Add(stTimeout))
	ts.SetDeadline(time.Now().Add(stTimeout))

	const size = 1 << 20
	ref := makePatternAt(0, patternPeriod+size)
	type result struct {
		got []byte
		err error
	}
	server := make(chan result, 1)
	go func() {
		if err := ts.Handshake(); err != nil {
			server <- result{nil, fmt.Errorf("server handshake: %w", err)}
			return
		}
		buf := make([]byte, size)
		if _, err := io.ReadFull(ts, buf); err != nil {
			server <- result{nil, fmt.Errorf("server read: %w", err)}
			return
		}
		// Answer with the bytes reversed in 4 KiB blocks.
		for i := 0; i < size; i += 4096 {
			if _, err := ts.Write(buf[size-i-4096 : size-i]); err != nil {
				server <- result{nil, fmt.Errorf("server write: %w", err)}
				return
			}
		}
		server <- result{buf, nil}
	}()
	if err := tc.Handshake(); err != nil {
		t.Fatalf("client handshake: %v", err)
	}
	if st := tc.ConnectionState(); !st.HandshakeComplete || len(st.PeerCertificates) == 0 {
		t.Fatalf("client connection state: %+v", st)
	}
	wrote := make(chan error, 1)
	go func() {
		_, err := tc.Write(ref[:size])
		wrote <- err
	}()
	got := make([]byte, size)
	if _, err := io.ReadFull(tc, got); err != nil {
		t.Fatalf("client read: %v", err)
	}
	if err := waitForWithin(t, wrote, stTimeout, "the client's TLS write"); err != nil {
		t.Fatalf("client write: %v", err)
	}
	r := waitForWithin(t, server, stTimeout, "the TLS server")
	if r.err != nil {
		t.Fatal(r.err)
	}
	if err := stCheckPattern(ref, r.got, 0); err != nil {
		t.Fatalf("server got: %v", err)
	}
	for i := 0; i < size; i += 4096 {
		if !bytes.Equal(got[i:i+4096], ref[size-i-4096:size-i]) {
			t.Fatalf("client got a wrong block at %d", i)
		}
	}
	if err := tc.Close(); err != nil { // close_notify, then the stream
		t.Fatalf("client tls Close: %v", err)
	}
	if n, err := ts.Read(make([]byte, 1)); n != 0 || err != io.EOF {
		t.Fatalf("server Read after the client's close_notify = %d, %v; want 0, io.EOF", n, err)
	}
	if err := ts.Close(); err != nil {
		t.Logf("server tls Close: %v", err) // its close_notify may find the socket closed at EOF
	}
	srv.Close()
	waitLoopNil(t, l, stTimeout)
}

// TestStreamClAsyncClientServer is cl-async's tcp-stream test: the client
// writes with Stream.Write, the server (not in stream mode) answers
// through NewStream(sock).Write inside its read-cb, and the client reads
// the answer in its stream read-cb.
func TestStreamClAsyncClientServer(t *testing.T) {
	l := newTestLoop(t)
	const hello, answer = "HELLO", "thanks for all the fish"
	var srvGot []byte // owned by the server socket's callbacks
	srvDone := make(chan []byte, 1)
	bad := make(chan string, 4)
	srv, err := l.Listen("127.0.0.1", 0, func(s *asynctcp.Socket, data []byte) {
		srvGot = append(srvGot, data...)
		if len(srvGot) < len(hello) {
			return
		}
		srvDone <- srvGot
		if _, err := asynctcp.NewStream(s).Write([]byte(answer)); err != nil {
			bad <- fmt.Sprintf("server stream Write: %v", err)
		}
	}, nil)
	if err != nil {
		t.Fatal(err)
	}
	var cliGot []byte // owned by the client socket's callbacks
	cliDone := make(chan []byte, 1)
	c, err := l.ConnectStream("127.0.0.1", portOf(t, srv.Addr()), func(s *asynctcp.Socket, st *asynctcp.Stream) {
		buf := make([]byte, 128)
		n, err := st.Read(buf)
		if err != nil {
			bad <- fmt.Sprintf("client stream Read in read-cb: %v", err)
			return
		}
		cliGot = append(cliGot, buf[:n]...)
		if len(cliGot) >= len(answer) {
			cliDone <- cliGot
		}
	}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if n, err := c.Write([]byte(hello)); n != len(hello) || err != nil {
		t.Fatalf("client Write = %d, %v", n, err)
	}
	select {
	case got := <-srvDone:
		if !bytes.Equal(got, []byte(hello)) {
			t.Fatalf("server got %q, want %q", got, hello)
		}
	case msg := <-bad:
		t.Fatal(msg)
	case <-time.After(stTimeout):
		t.Fatal("server did not get the client's bytes")
	}
	select {
	case got := <-cliDone:
		if !bytes.Equal(got, []byte(answer)) {
			t.Fatalf("client got %q, want %q", got, answer)
		}
	case msg := <-bad:
		t.Fatal(msg)
	case <-time.After(stTimeout):
		t.Fatal("client did not get the answer")
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	srv.Close()
	waitLoopNil(t, l, stTimeout)
	select {
	case msg := <-bad:
		t.Fatal(msg)
	default:
	}
}

// TestStreamAddrs checks the net.Conn address methods of a pair.
func TestStreamAddrs(t *testing.T) {
	l := newTestLoop(t)
	c, s, srv := stPair(t, l, stPairOpts{})
	if c.LocalAddr() == nil || s.RemoteAddr() == nil || c.LocalAddr().String() != s.RemoteAddr().String() {
		t.Fatalf("client LocalAddr %v, server RemoteAddr %v; want equal", c.LocalAddr(), s.RemoteAddr())
	}
	if c.RemoteAddr() == nil || c.RemoteAddr().String() != srv.Addr().String() {
		t.Fatalf("client RemoteAddr %v, server Addr %v; want equal", c.RemoteAddr(), srv.Addr())
	}
	c.Close()
	s.Close()
	srv.Close()
	waitLoopNil(t, l, stTimeout)
}

// stEchoServer starts a plain net echo server on loopback: each
// connection echoes what it reads and closes after the peer's EOF. Its
// cleanup closes the listener and every connection, and waits for them;
// call it before newTestLoop, so that on a failure the loop's Exit has
// ended the proxies' sockets first.
func stEchoServer(t *testing.T) int {
	t.Helper()
	ln, port := listenRaw(t)
	var wg sync.WaitGroup
	var mu sync.Mutex
	var conns []net.Conn
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
			wg.Add(1)
			go func() {
				defer wg.Done()
				io.Copy(c, c)
				c.Close()
			}()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		for _, c := range conns {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	return port
}

// stCopied is what one io.Copy of a stream proxy copied.
type stCopied struct {
	n   int64
	err error
}

// stProxied is one connection through an stProxy: the accepted socket
// (down), the socket to the upstream (up), and with io.Copy what each
// direction's copy returned.
type stProxied struct {
	down, up     *asynctcp.Socket
	toUp, toDown <-chan stCopied
}

// How an stProxy relays.
const (
	stByWriteTo = iota // io.Copy, which takes Stream.WriteTo
	stByRead           // io.CopyBuffer through Stream.Read, 5000 bytes at a time
	stByPipe           // Pipe
)

// stProxy starts a proxy of l in front of upstream, on streams: per
// accepted stream a stream to upstream, and either a copy both ways (each
// closing its destination at its end) or Pipe. Each connection is sent on
// the returned channel; relays counts the copying goroutines.
func stProxy(t *testing.T, l *asynctcp.Loop, upstream, by int, relays *sync.WaitGroup) (*asynctcp.Server, int, <-chan stProxied) {
	t.Helper()
	proxied := make(chan stProxied, 64)
	relay := func(dst, src *asynctcp.Stream, res chan<- stCopied) {
		defer relays.Done()
		var n int64
		var err error
		if by == stByRead {
			// A small buffer, so that reads take pooled chunks in parts.
			n, err = io.CopyBuffer(dst, struct{ io.Reader }{src}, make([]byte, 5000))
		} else {
			n, err = io.Copy(dst, src)
		}
		dst.Close()
		res <- stCopied{n, err}
	}
	accepted := asynctcp.OnConnect(func(a *asynctcp.Socket) {
		up, err := l.ConnectStream("127.0.0.1", upstream, nil, func(error) {})
		if err != nil {
			t.Errorf("proxy: ConnectStream upstream: %v", err)
			a.Abort()
			return
		}
		p := stProxied{down: a, up: up.Socket()}
		if by == stByPipe {
			if err := asynctcp.Pipe(a, up.Socket(), 64<<10, 256<<10); err != nil {
				t.Errorf("Pipe: %v", err)
			}
			proxied <- p
			return
		}
		toUp, toDown := make(chan stCopied, 1), make(chan stCopied, 1)
		p.toUp, p.toDown = toUp, toDown
		down := asynctcp.NewStream(a)
		relays.Add(2)
		go relay(up, down, toUp)
		go relay(down, up, toDown)
		proxied <- p
	})
	srv, err := l.ListenStream("127.0.0.1", 0, nil, func(error) {}, accepted)
	if err != nil {
		t.Fatalf("proxy ListenStream: %v", err)
	}
	t.Cleanup(func() { srv.Close() })
	return srv, portOf(t, srv.Addr()), proxied
}

// stEchoThrough sends size bytes of the patternAt stream from offset off
// through the connection c to an echo server, in random chunks of 1 byte
// to 100 KiB, reads the echo and checks it byte for byte.
func stEchoThrough(c net.Conn, off, size int, seed int64) error {
	sent := sendInRandomChunks(c, makePatternAt(off, size), seed)
	got := make([]byte, size)
	_, rerr := io.ReadFull(c, got)
	if err := <-sent; err != nil {
		return fmt.Errorf("write: %w", err)
	}
	if rerr != nil {
		return fmt.Errorf("read of the echo: %w", rerr)
	}
	if !isPatternAt(off, got) {
		want := makePatternAt(off, size)
		return fmt.Errorf("echo differs from what was sent at byte %d of %d", firstDiff(got, want), size)
	}
	return nil
}

// TestStreamProxyKeepsEveryByteAcrossSockets sends several MiB through
// each of several connections at once, both ways through a proxy on
// streams (io.Copy, which takes Stream.WriteTo; Stream.Read in small
// parts; or Pipe) in front of an
// echo server, in random chunk sizes: every byte comes back in order,
// though the sockets share one pool of read buffers, which their input
// buffers keep and give back. io.Copy returns what went through, and the
// sockets' counters agree.
func TestStreamProxyKeepsEveryByteAcrossSockets(t *testing.T) {
	for _, mode := range []struct {
		name string
		by   int
	}{{"WriteTo", stByWriteTo}, {"Read", stByRead}, {"Pipe", stByPipe}} {
		t.Run(mode.name, func(t *testing.T) {
			upstream := stEchoServer(t)
			var relays sync.WaitGroup
			t.Cleanup(relays.Wait) // after the loop's cleanup has closed the streams
			l := newTestLoop(t)
			srv, port, proxied := stProxy(t, l, upstream, mode.by, &relays)
			const conns = 6
			sizes := make([]int, conns)
			errs := make(chan error, conns)
			for i := range conns {
				sizes[i] = 2<<20 + i*4099
				c := dialRaw(t, port)
				c.SetDeadline(time.Now().Add(stTimeout))
				go func() {
					err := stEchoThrough(c, i*37, sizes[i], int64(i)+1)
					c.Close()
					if err != nil {
						err = fmt.Errorf("connection %d: %w", i, err)
					}
					errs <- err
				}()
			}
			for range conns {
				if err := waitForWithin(t, errs, 2*stTimeout, "a connection's echo"); err != nil {
					t.Fatal(err)
				}
			}
			var counted []int
			for range conns {
				p := waitForWithin(t, proxied, stTimeout, "a proxied connection")
				waitForWithin(t, p.down.Done(), stTimeout, "the accepted socket to end")
				waitForWithin(t, p.up.Done(), stTimeout, "the upstream socket to end")
				n := p.down.BytesRead()
				counters := []int64{p.down.BytesWritten(), p.up.BytesRead(), p.up.BytesWritten()}
				for _, c := range counters {
					if c != n {
						t.Errorf("down read %d; down wrote, up read, up wrote %v: want all equal", n, counters)
					}
				}
				if p.toUp != nil {
					up := waitForWithin(t, p.toUp, stTimeout, "io.Copy to upstream")
					down := waitForWithin(t, p.toDown, stTimeout, "io.Copy from upstream")
					if up.n != n || up.err != nil {
						t.Errorf("io.Copy(up, down) = %d, %v; want %d, nil", up.n, up.err, n)
					}
					if down.n != n || (down.err != nil && !errors.Is(down.err, asynctcp.ErrSocketClosed)) {
						t.Errorf("io.Copy(down, up) = %d, %v; want %d and nil or ErrSocketClosed (up was closed)", down.n, down.err, n)
					}
				}
				counted = append(counted, int(n))
			}
			slices.Sort(counted)
			if !slices.Equal(counted, sizes) {
				t.Errorf("bytes read per accepted socket %v, want %v", counted, sizes)
			}
			srv.Close()
			waitLoopNil(t, l, stTimeout)
		})
	}
}

// stWriteToResult is what a Stream.WriteTo returned.
type stWriteToResult struct {
	n   int64
	err error
}

// stGoWriteTo runs st.WriteTo(w) in a goroutine.
func stGoWriteTo(st *asynctcp.Stream, w io.Writer) <-chan stWriteToResult {
	ch := make(chan stWriteToResult, 1)
	go func() {
		n, err := st.WriteTo(w)
		ch <- stWriteToResult{n, err}
	}()
	return ch
}

// stSink is the writer of WriteTo's tests: it keeps what it takes and
// signals each write on wrote (if set). With limit set, it takes no more
// than limit bytes in all and fails with err (a short write where err is
// nil).
type stSink struct {
	got   []byte
	wrote chan struct{}
	limit int
	err   error
}

func (w *stSink) Write(p []byte) (int, error) {
	n := len(p)
	if w.limit > 0 {
		n = min(n, w.limit-len(w.got))
	}
	w.got = append(w.got, p[:n]...)
	if w.wrote != nil {
		signal(w.wrote, struct{}{})
	}
	if n < len(p) {
		return n, w.err
	}
	return n, nil
}

// TestStreamWriteToHonoursTheReadDeadline checks that WriteTo returns a
// timeout at once where the read deadline has passed, leaving the input
// buffered; that a deadline passing while it waits for input ends it with
// what it wrote and a timeout; and that once the deadline is cleared it
// writes on until EOF, and returns nil then.
func TestStreamWriteToHonoursTheReadDeadline(t *testing.T) {
	l := newTestLoop(t)
	c, s, srv := stPair(t, l, stPairOpts{})
	if _, err := c.WriteString("abc"); err != nil {
		t.Fatal(err)
	}
	eventuallyWithin(t, stTimeout, "3 bytes buffered", func() bool { return s.Buffered() == 3 })

	s.SetReadDeadline(time.Now().Add(-time.Second))
	var w stSink
	n, err := s.WriteTo(&w)
	stWantTimeout(t, err, "WriteTo past the read deadline")
	if n != 0 || len(w.got) != 0 || s.Buffered() != 3 {
		t.Fatalf("WriteTo past the deadline wrote %d (%q), left %d buffered; want 0, 3 buffered", n, w.got, s.Buffered())
	}

	s.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
	w = stSink{}
	res := waitForWithin(t, stGoWriteTo(s, &w), stTimeout, "WriteTo to end at the read deadline")
	stWantTimeout(t, res.err, "WriteTo waiting for input at the read deadline")
	if res.n != 3 || string(w.got) != "abc" {
		t.Fatalf("WriteTo until the deadline = %d (%q), want 3 (\"abc\")", res.n, w.got)
	}

	s.SetReadDeadline(time.Time{})
	w = stSink{wrote: make(chan struct{}, 1)}
	done := stGoWriteTo(s, &w)
	if _, err := c.WriteString("def"); err != nil {
		t.Fatal(err)
	}
	waitForWithin(t, w.wrote, stTimeout, "WriteTo to write the input after the deadline was cleared")
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	res = waitForWithin(t, done, stTimeout, "WriteTo to end at EOF")
	if res.n != 3 || res.err != nil || string(w.got) != "def" {
		t.Fatalf("WriteTo to EOF = %d, %v (%q); want 3, nil (\"def\")", res.n, res.err, w.got)
	}
	srv.Close()
	waitLoopNil(t, l, stTimeout)
}

// TestStreamWriteToEndsWhenClosedFromAnotherGoroutine checks that a
// WriteTo waiting for input returns what it wrote and an ErrSocketClosed
// event once the application closes the socket, however it does.
func TestStreamWriteToEndsWhenClosedFromAnotherGoroutine(t *testing.T) {
	closes := []struct {
		name  string
		close func(st *asynctcp.Stream) error
	}{
		{"Stream.Close", func(st *asynctcp.Stream) error { return st.Close() }},
		{"Socket.Close", func(st *asynctcp.Stream) error { return st.Socket().Close() }},
		{"Socket.Abort", func(st *asynctcp.Stream) error { return st.Socket().Abort() }},
	}
	for _, tc := range closes {
		t.Run(tc.name, func(t *testing.T) {
			l := newTestLoop(t)
			c, s, srv := stPair(t, l, stPairOpts{})
			w := stSink{wrote: make(chan struct{}, 1)}
			done := stGoWriteTo(s, &w)
			if _, err := c.WriteString("hello"); err != nil {
				t.Fatal(err)
			}
			waitForWithin(t, w.wrote, stTimeout, "WriteTo to write the input")
			if err := tc.close(s); err != nil {
				t.Fatal(err)
			}
			res := waitForWithin(t, done, stTimeout, "WriteTo to end after "+tc.name)
			if res.n != 5 || string(w.got) != "hello" {
				t.Fatalf("WriteTo = %d (%q), want 5 (\"hello\")", res.n, w.got)
			}
			wantSocketClosed(t, res.err, s.Socket(), "WriteTo after "+tc.name)
			c.Close()
			srv.Close()
			waitLoopNil(t, l, stTimeout)
		})
	}
}

// TestStreamWriteToAfterResetGivesEvent checks that WriteTo writes the
// input that came before a reset, then returns the socket's ErrTCPEOF
// event with Code set.
func TestStreamWriteToAfterResetGivesEvent(t *testing.T) {
	l := newTestLoop(t)
	ln, port := listenRaw(t)
	c, err := l.ConnectStream("127.0.0.1", port, nil, func(error) {})
	if err != nil {
		t.Fatal(err)
	}
	peer := acceptRawKeepBuf(t, ln)
	w := stSink{wrote: make(chan struct{}, 1)}
	done := stGoWriteTo(c, &w)
	if _, err := peer.Write([]byte("the rest")); err != nil {
		t.Fatal(err)
	}
	waitForWithin(t, w.wrote, stTimeout, "WriteTo to write the input")
	if err := peer.SetLinger(0); err != nil {
		t.Fatal(err)
	}
	peer.Close() // RST
	res := waitForWithin(t, done, stTimeout, "WriteTo to end after the reset")
	if res.n != 8 || string(w.got) != "the rest" {
		t.Fatalf("WriteTo = %d (%q), want 8 (\"the rest\")", res.n, w.got)
	}
	var e *asynctcp.Event
	if !errors.As(res.err, &e) || !errors.Is(res.err, asynctcp.ErrTCPEOF) || e.Code == -1 {
		t.Fatalf("WriteTo after a reset = %v (%T), want an ErrTCPEOF *Event with Code set", res.err, res.err)
	}
	waitLoopNil(t, l, stTimeout)
}

// TestStreamWriteToWritesBufferedInputThenNilAtEOF checks that after the
// peer's EOF WriteTo writes what is buffered, byte for byte, and returns
// nil, as io.Copy does at EOF.
func TestStreamWriteToWritesBufferedInputThenNilAtEOF(t *testing.T) {
	l := newTestLoop(t)
	c, s, srv := stPair(t, l, stPairOpts{})
	const size = 300 << 10
	if _, err := c.Write(makePatternAt(0, size)); err != nil {
		t.Fatal(err)
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	eventuallyWithin(t, stTimeout, "asynctcp to close the socket after its EOF", s.Socket().Closed)
	if n := s.Buffered(); n != size {
		t.Fatalf("Buffered() after EOF = %d, want %d", n, size)
	}
	var w stSink
	n, err := s.WriteTo(&w)
	if n != size || err != nil {
		t.Fatalf("WriteTo after EOF = %d, %v; want %d, nil", n, err, size)
	}
	if !isPatternAt(0, w.got) {
		t.Fatalf("WriteTo wrote bytes that differ from the input at byte %d", firstDiff(w.got, makePatternAt(0, size)))
	}
	if n, err := s.WriteTo(&w); n != 0 || err != nil {
		t.Fatalf("WriteTo again = %d, %v; want 0, nil", n, err)
	}
	if got := s.Socket().BytesRead(); got != size {
		t.Errorf("BytesRead() = %d, want %d", got, size)
	}
	srv.Close()
	waitLoopNil(t, l, stTimeout)
}

// TestStreamWriteToLeavesWhatTheWriterRefusedBuffered checks that where
// the writer fails, or takes less without an error, WriteTo returns what
// it took and the writer's error (or io.ErrShortWrite), and that the bytes
// it did not take stay buffered, in order, for the next read.
func TestStreamWriteToLeavesWhatTheWriterRefusedBuffered(t *testing.T) {
	errFull := errors.New("sink full")
	for _, tc := range []struct {
		name    string
		err     error // the writer's
		wantErr error // WriteTo's
	}{
		{"error", errFull, errFull},
		{"short write", nil, io.ErrShortWrite},
	} {
		t.Run(tc.name, func(t *testing.T) {
			l := newTestLoop(t)
			c, s, srv := stPair(t, l, stPairOpts{})
			const size, limit = 300 << 10, 100<<10 + 123
			if _, err := c.Write(makePatternAt(0, size)); err != nil {
				t.Fatal(err)
			}
			eventuallyWithin(t, stTimeout, "the input to arrive", func() bool { return s.Buffered() == size })
			w := stSink{limit: limit, err: tc.err}
			n, err := s.WriteTo(&w)
			if n != limit || !errors.Is(err, tc.wantErr) {
				t.Fatalf("WriteTo = %d, %v; want %d, %v", n, err, limit, tc.wantErr)
			}
			if !isPatternAt(0, w.got) {
				t.Fatalf("the writer got bytes that differ from the input at byte %d", firstDiff(w.got, makePatternAt(0, limit)))
			}
			if got := s.Buffered(); got != size-limit {
				t.Fatalf("Buffered() after the failed WriteTo = %d, want %d", got, size-limit)
			}
			rest := make([]byte, size-limit)
			if _, err := io.ReadFull(s, rest); err != nil {
				t.Fatal(err)
			}
			if !isPatternAt(limit, rest) {
				t.Fatalf("the rest differs from the input at byte %d", limit+firstDiff(rest, makePatternAt(limit, size-limit)))
			}
			c.Close()
			s.Close()
			srv.Close()
			waitLoopNil(t, l, stTimeout)
		})
	}
}

// TestStreamWriteToStreamKeepsWhatItCouldNotWrite copies a stream into
// another whose write deadline passes while its output is full: WriteTo
// returns what the destination queued and the timeout, the destination's
// peer gets exactly those bytes, and the source's input goes on from the
// first byte not written. The counters agree.
func TestStreamWriteToStreamKeepsWhatItCouldNotWrite(t *testing.T) {
	l := newTestLoop(t)
	src, peer, srv := stPair(t, l, stPairOpts{})
	ln, port := listenRaw(t)
	dst, err := l.ConnectStream("127.0.0.1", port, nil, func(error) {},
		asynctcp.MaxBuffered(64<<10), asynctcp.SendBuffer(64<<10))
	if err != nil {
		t.Fatal(err)
	}
	sink := acceptRaw(t, ln) // not read until WriteTo has ended

	const size = 8 << 20
	sent := make(chan error, 1)
	go func() {
		_, err := peer.Write(makePatternAt(0, size))
		sent <- err
	}()
	// The sink's buffers hold far less than 8 MiB: WriteTo fills them,
	// then waits in dst.Write until the deadline.
	dst.SetWriteDeadline(time.Now().Add(time.Second))
	res := waitForWithin(t, stGoWriteTo(src, dst), stTimeout, "WriteTo to end at dst's write deadline")
	stWantTimeout(t, res.err, "WriteTo into a full stream past its write deadline")
	if res.n <= 0 || res.n >= size {
		t.Fatalf("WriteTo wrote %d of %d bytes, want some", res.n, size)
	}
	written := int(res.n)

	dst.SetWriteDeadline(time.Time{})
	if err := dst.Close(); err != nil {
		t.Fatal(err)
	}
	sinkRead := readAllAsync(sink)
	rest := make([]byte, size-written)
	src.SetReadDeadline(time.Now().Add(stTimeout))
	if _, err := io.ReadFull(src, rest); err != nil {
		t.Fatalf("reading the rest of src: %v", err)
	}
	if !isPatternAt(written, rest) {
		t.Fatalf("src's input after WriteTo differs at byte %d", written+firstDiff(rest, makePatternAt(written, size-written)))
	}
	got := waitForWithin(t, sinkRead, stTimeout, "dst's peer to read to EOF")
	if got.err != nil || len(got.data) != written || !isPatternAt(0, got.data) {
		t.Fatalf("dst's peer read %d bytes (%v), want the first %d of the input", len(got.data), got.err, written)
	}
	if err := waitForWithin(t, sent, stTimeout, "the writer of the input"); err != nil {
		t.Fatal(err)
	}
	waitForWithin(t, dst.Socket().Done(), stTimeout, "dst to end")
	if n := dst.Socket().BytesWritten(); n != res.n {
		t.Errorf("dst BytesWritten() = %d, want %d", n, res.n)
	}
	if n := src.Socket().BytesRead(); n != size {
		t.Errorf("src BytesRead() = %d, want %d", n, size)
	}
	peer.Close()
	src.Close()
	srv.Close()
	waitLoopNil(t, l, stTimeout)
}

// TestStreamClearInputDropsPooledChunksOnly fills a stream's input with
// large reads (which keep their pooled buffers) and a partly read front
// chunk, and drops it with ClearInput, round after round, while other
// connections churn the pool of read buffers: what arrives after each
// ClearInput reads back byte for byte, so no buffer went back to the pool
// while the input still held it.
func TestStreamClearInputDropsPooledChunksOnly(t *testing.T) {
	upstream := stEchoServer(t)
	var relays sync.WaitGroup
	t.Cleanup(relays.Wait)
	l := newTestLoop(t)
	c, s, srv := stPair(t, l, stPairOpts{})

	// The churn: two connections through a stream proxy while the rounds run.
	proxy, port, _ := stProxy(t, l, upstream, stByRead, &relays)
	stop := make(chan struct{})
	churned := make(chan error, 2)
	for i := range 2 {
		conn := dialRaw(t, port)
		conn.SetDeadline(time.Now().Add(2 * stTimeout))
		go func() {
			defer conn.Close()
			for k := 0; ; k++ {
				select {
				case <-stop:
					churned <- nil
					return
				default:
				}
				if err := stEchoThrough(conn, i*91+k, 256<<10, int64(k)); err != nil {
					churned <- err
					return
				}
			}
		}()
	}

	const round = 256 << 10
	off := 0
	for r := range 6 {
		if _, err := c.Write(makePatternAt(off, round)); err != nil {
			t.Fatal(err)
		}
		eventuallyWithin(t, stTimeout, "a round's input to arrive", func() bool { return s.Buffered() == round })
		head := make([]byte, 1000+r)
		if _, err := io.ReadFull(s, head); err != nil {
			t.Fatal(err)
		}
		if !isPatternAt(off, head) {
			t.Fatalf("round %d: the head of the input differs at byte %d", r, off+firstDiff(head, makePatternAt(off, len(head))))
		}
		s.ClearInput()
		if n := s.Buffered(); n != 0 {
			t.Fatalf("round %d: Buffered() after ClearInput = %d, want 0", r, n)
		}
		off += round
	}
	const last = 1 << 20
	if _, err := c.Write(makePatternAt(off, last)); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, last)
	s.SetReadDeadline(time.Now().Add(stTimeout))
	if _, err := io.ReadFull(s, got); err != nil {
		t.Fatal(err)
	}
	if !isPatternAt(off, got) {
		t.Fatalf("input after the ClearInputs differs at byte %d", off+firstDiff(got, makePatternAt(off, last)))
	}
	close(stop)
	for range 2 {
		if err := waitForWithin(t, churned, 2*stTimeout, "a churning connection"); err != nil {
			t.Fatalf("churn: %v", err)
		}
	}
	c.Close()
	s.Close()
	srv.Close()
	proxy.Close()
	waitLoopNil(t, l, stTimeout)
}

// TestStreamWriteToStreamWaitsForItsOutput copies a stream into another
// whose peer does not read: WriteTo waits for the destination's output to
// be written instead of queueing on it, so the destination holds at most
// one read's worth (32 KiB) and the rest waits in the source's input, up
// to its limit. Once the peer reads, every byte arrives in order.
func TestStreamWriteToStreamWaitsForItsOutput(t *testing.T) {
	l := newTestLoop(t)
	const limit = 256 << 10
	peer, src, srv := stPair(t, l, stPairOpts{server: []asynctcp.Option{asynctcp.InputLimit(limit)}})
	ln, port := listenRaw(t)
	dst, err := l.ConnectStream("127.0.0.1", port, nil, func(error) {}, asynctcp.SendBuffer(64<<10))
	if err != nil {
		t.Fatal(err)
	}
	sink := acceptRaw(t, ln) // not read until the source is full

	const size = 16 << 20
	sent := make(chan error, 1)
	go func() {
		_, err := peer.Write(makePatternAt(0, size))
		sent <- err
	}()
	copied := stGoWriteTo(src, dst)
	eventuallyWithin(t, stTimeout, "the source's input to fill to its limit", func() bool { return src.Buffered() == limit })
	if n := dst.Socket().Buffered(); n > 32<<10 {
		t.Fatalf("the destination queued %d bytes, want at most 32 KiB", n)
	}

	sinkRead := readAllAsync(sink)
	if err := waitForWithin(t, sent, stTimeout, "the writer of the input"); err != nil {
		t.Fatal(err)
	}
	if err := peer.Close(); err != nil {
		t.Fatal(err)
	}
	res := waitForWithin(t, copied, stTimeout, "WriteTo to end at EOF")
	if res.n != size || res.err != nil {
		t.Fatalf("WriteTo = %d, %v; want %d, nil", res.n, res.err, size)
	}
	if err := dst.Close(); err != nil {
		t.Fatal(err)
	}
	got := waitForWithin(t, sinkRead, stTimeout, "dst's peer to read to EOF")
	if got.err != nil || len(got.data) != size || !isPatternAt(0, got.data) {
		t.Fatalf("dst's peer read %d bytes (%v), want all %d in order", len(got.data), got.err, size)
	}
	srv.Close()
	waitLoopNil(t, l, stTimeout)
}

// TestStreamMutualCloseWithUnreadOutputEnds closes both streams of one
// connection, each with more output queued than the kernel's buffers and
// its peer's input buffer hold, as nettest's suite does after a test that
// left both sides writing. A stream whose input buffer is full used to
// stop reading for good once closed, and both flushes waited for ever.
func TestStreamMutualCloseWithUnreadOutputEnds(t *testing.T) {
	l := newTestLoop(t)
	small := []asynctcp.Option{asynctcp.SendBuffer(64 << 10), asynctcp.ReceiveBuffer(64 << 10)}
	c, s, srv, err := stDial(l, stPairOpts{server: small, client: small})
	if err != nil {
		t.Fatal(err)
	}
	out := pattern(4 << 20)
	for _, st := range []*asynctcp.Stream{c, s} {
		if err := st.Socket().WriteData(out); err != nil {
			t.Fatalf("WriteData: %v", err)
		}
	}
	eventually(t, "both input buffers hold bytes", func() bool {
		return c.Buffered() > 0 && s.Buffered() > 0
	})
	for _, st := range []*asynctcp.Stream{c, s} {
		if err := st.Close(); err != nil {
			t.Fatalf("Close: %v", err)
		}
	}
	srv.Close()
	waitLoopNil(t, l, waitTimeout)
}

// TestClosedWhileConnectingDrains closes a socket while it connects, with
// output queued; its peer answers with more than the kernel's buffers
// hold and closes too. The socket used to start no reader at all, so
// both flushes waited for ever; now it drains while it flushes.
func TestClosedWhileConnectingDrains(t *testing.T) {
	l := newTestLoop(t)
	out := pattern(4 << 20)
	small := []asynctcp.Option{asynctcp.SendBuffer(64 << 10), asynctcp.ReceiveBuffer(64 << 10)}
	accepted := make(chan struct{})
	srv, port := listenLocal(t, l, func(*asynctcp.Socket, []byte) {}, nil,
		append(small, asynctcp.OnConnect(func(s *asynctcp.Socket) {
			s.WriteData(out)
			s.Close()
			close(accepted)
		}))...)
	d, release := heldDialer(t)
	c := connectLocal(t, l, port, func(*asynctcp.Socket, []byte) {}, nil, append(small, asynctcp.Dialer(d))...)
	if err := c.WriteData(out); err != nil {
		t.Fatalf("WriteData while connecting: %v", err)
	}
	if err := c.Close(); err != nil {
		t.Fatalf("Close while connecting: %v", err)
	}
	release()
	waitFor(t, accepted, "the server's socket up")
	srv.Close()
	waitLoopNil(t, l, waitTimeout)
	if c.BytesWritten() == 0 {
		t.Errorf("the client wrote nothing: it never came up")
	}
}
