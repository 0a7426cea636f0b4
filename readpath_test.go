package asynctcp_test

import (
	"fmt"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/asynctcp/asynctcp"
)

// A TCP socket hands a read that emptied the kernel's queue to its read-cb
// from inside the descriptor's read, then waits there for readiness
// without reading again. Input that arrives while the read-cb runs must
// still wake it: each message here is sent while the read-cb of the one
// before is blocked, and the runtime's poller is given a moment to see
// its readiness before that read-cb returns (a reader that began a fresh
// descriptor read and skipped its first read would lose it, until its
// idle hop, up to a second later, found it).
func TestInputDuringReadCbIsRead(t *testing.T) {
	for _, tc := range []struct {
		name   string
		serial bool
		opts   []asynctcp.Option
	}{
		{"plain", false, nil},
		{"serial", true, nil},
		{"reuse", false, []asynctcp.Option{asynctcp.ReuseReadBuffer()}},
		{"read timeout", false, []asynctcp.Option{asynctcp.ReadTimeout(time.Minute)}},
		// A small burst: reads get little room, and a turn with no tokens
		// left goes back to the reader's loop to wait for them.
		{"read rate", false, []asynctcp.Option{asynctcp.ReadRate(64<<10, 16)}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			l := newTestLoop(t)
			l.Serial = tc.serial
			const msgs = 100
			got := make(chan string, msgs)
			release := make(chan struct{})
			t.Cleanup(func() { close(release) }) // before the loop's cleanup, should the test fail
			read := func(s *asynctcp.Socket, data []byte) {
				got <- string(data)
				<-release
			}
			_, port := listenLocal(t, l, read, func(error) {}, tc.opts...)
			peer := dialRaw(t, port)
			for i := range msgs {
				msg := fmt.Sprintf("m%03d;", i)
				if _, err := peer.Write([]byte(msg)); err != nil {
					t.Fatalf("write %d: %v", i, err)
				}
				if i > 0 {
					time.Sleep(time.Millisecond) // the poller sees the input (not a synchronization)
					release <- struct{}{}        // the previous read-cb returns
				}
				// Within far less than the idle hop's second, which would
				// find a lost input at last.
				if data := waitForWithin(t, got, 500*time.Millisecond, fmt.Sprintf("read-cb with message %d", i)); data != msg {
					t.Fatalf("read-cb got %q, want %q", data, msg)
				}
			}
			release <- struct{}{}
			peer.Close()
			l.Exit(nil)
			waitLoopClean(t, l, waitTimeout)
		})
	}
}

// Closing a socket's conn from another goroutine while its read-cb runs
// waits for the read-cb to return (the socket holds the conn's read side
// around it); then the socket ends with an event, as for any conn closed
// under it.
func TestConnClosedUnderReadCbWaitsForIt(t *testing.T) {
	l := newTestLoop(t)
	in := make(chan *asynctcp.Socket, 1)
	release := make(chan struct{})
	events := make(chan error, 1)
	read := func(s *asynctcp.Socket, data []byte) {
		signal(in, s)
		<-release
	}
	_, port := listenLocal(t, l, read, func(err error) { signal(events, err) })
	peer := dialRaw(t, port)
	if _, err := peer.Write([]byte("x")); err != nil {
		t.Fatal(err)
	}
	s := waitFor(t, in, "read-cb")
	closed := make(chan error, 1)
	go func() { closed <- s.Conn().Close() }()
	expectNone(t, closed, 50*time.Millisecond, "Conn().Close while the read-cb runs")
	close(release)
	if err := waitFor(t, closed, "Conn().Close after the read-cb returned"); err != nil {
		t.Errorf("Conn().Close = %v, want nil", err)
	}
	wantConnClosedEvent(t, l, events)
}

// On a Serial loop, a callback of one socket closes another socket's conn
// while input for that socket has arrived: that socket's reader, which
// read the input inside its descriptor's read, cannot run its read-cb
// until the callback returns, so it must not wait for the callback lock
// there, where it holds the conn's read side that Close waits for.
func TestSerialCallbackClosesOtherConnUnderItsInput(t *testing.T) {
	l := newTestLoop(t)
	l.Serial = true
	first := make(chan *asynctcp.Socket, 1)
	closed := make(chan bool, 1)
	events := make(chan error, 2)
	var peerA net.Conn
	var sockA *asynctcp.Socket
	read := func(s *asynctcp.Socket, data []byte) {
		switch string(data) {
		case "a1":
			signal(first, s)
		case "b":
			// Input for A arrives while this callback holds the lock, and
			// A's reader reads it meanwhile.
			if _, err := peerA.Write([]byte("a2")); err != nil {
				t.Errorf("write a2: %v", err)
			}
			time.Sleep(50 * time.Millisecond) // A's reader reads a2 (not a synchronization)
			signal(closed, closeConnWithin(sockA, 2*time.Second))
		}
	}
	_, port := listenLocal(t, l, read, func(err error) { signal(events, err) })
	peerA = dialRaw(t, port)
	if _, err := peerA.Write([]byte("a1")); err != nil {
		t.Fatal(err)
	}
	sockA = waitFor(t, first, "A's read-cb")
	peerB := dialRaw(t, port)
	if _, err := peerB.Write([]byte("b")); err != nil {
		t.Fatal(err)
	}
	wantConnClosedInCallback(t, l, closed, events, "A's Conn().Close inside B's read-cb")
}

// A write-cb runs on a goroutine of its own while input arrives: the
// reader, which read the input inside its descriptor's read, must not
// wait there for the busy callback queue, or a Close of the conn inside
// that write-cb would wait for the reader, and the reader for it.
func TestWriteCbClosesConnUnderInput(t *testing.T) {
	l := newTestLoop(t)
	up := make(chan *asynctcp.Socket, 1)
	closed := make(chan bool, 1)
	events := make(chan error, 1)
	var once sync.Once
	var peer net.Conn
	read := func(s *asynctcp.Socket, data []byte) {
		if string(data) == "hello" {
			signal(up, s)
		}
	}
	write := func(s *asynctcp.Socket) {
		once.Do(func() {
			if _, err := peer.Write([]byte("more")); err != nil {
				t.Errorf("write: %v", err)
			}
			time.Sleep(50 * time.Millisecond) // the reader reads it (not a synchronization)
			signal(closed, closeConnWithin(s, 2*time.Second))
		})
	}
	_, port := listenLocal(t, l, read, func(err error) { signal(events, err) }, asynctcp.OnWrite(write))
	peer = dialRaw(t, port)
	if _, err := peer.Write([]byte("hello")); err != nil {
		t.Fatal(err)
	}
	s := waitFor(t, up, "read-cb")
	if err := s.WriteData([]byte("answer")); err != nil { // its write-cb runs on a dispatcher
		t.Fatal(err)
	}
	wantConnClosedInCallback(t, l, closed, events, "Conn().Close inside the write-cb, with input waiting")
}
