package asynctcp_test

import (
	"errors"
	"fmt"
	"io"
	"math/rand"
	"net"
	"runtime"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/asynctcp/asynctcp"
)

// Parking (Linux): an idle socket gives up its reader goroutine, and its
// descriptor waits in the loop's epoll set; the first byte, EOF or error
// brings a fresh reader back.

// pkIdleConns connects n raw clients to an asynctcp echo server on l and
// echoes one message on each, so that every accepted socket has run a
// callback. It returns the server, the clients and the accepted sockets.
func pkIdleConns(t *testing.T, l *asynctcp.Loop, n int, event asynctcp.EventFunc, opts ...asynctcp.Option) (*asynctcp.Server, []*net.TCPConn, []*asynctcp.Socket) {
	t.Helper()
	accepted := make(chan *asynctcp.Socket, n)
	opts = append(opts, asynctcp.OnConnect(func(s *asynctcp.Socket) { accepted <- s }))
	srv, port := listenLocal(t, l, echoBack, event, opts...)
	clients := make([]*net.TCPConn, n)
	socks := make([]*asynctcp.Socket, n)
	for i := range clients {
		c := dialRaw(t, port)
		clients[i] = c
		socks[i] = waitFor(t, accepted, "an accepted socket")
		pkEcho(t, c, fmt.Sprintf("hello %d", i))
	}
	return srv, clients, socks
}

// pkEcho writes msg on c and reads it back.
func pkEcho(t *testing.T, c *net.TCPConn, msg string) {
	t.Helper()
	c.SetDeadline(time.Now().Add(waitTimeout))
	defer c.SetDeadline(time.Time{})
	if _, err := c.Write([]byte(msg)); err != nil {
		t.Fatalf("write: %v", err)
	}
	got := make([]byte, len(msg))
	if _, err := io.ReadFull(c, got); err != nil {
		t.Fatalf("the echo of %q: %v", msg, err)
	}
	if string(got) != msg {
		t.Fatalf("echo %q, want %q", got, msg)
	}
}

// pkParked waits until at most extra goroutines beyond base remain: the
// idle sockets have parked.
func pkParked(t *testing.T, base, extra int) {
	t.Helper()
	eventually(t, fmt.Sprintf("the idle sockets to park (goroutines <= %d)", base+extra), func() bool {
		return runtime.NumGoroutine() <= base+extra
	})
}

// Idle sockets park, echo again when written to, see their peer's EOF,
// and the parker is gone once the loop is.
func TestIdleSocketsParkAndWakeUp(t *testing.T) {
	for _, serial := range []bool{false, true} {
		t.Run(fmt.Sprintf("serial %v", serial), func(t *testing.T) {
			const n = 200
			base := runtime.NumGoroutine()
			l := newTestLoop(t)
			l.Serial = serial
			rec := newEventRecorder()
			srv, clients, _ := pkIdleConns(t, l, n, rec.cb)
			// The listener's accept loop and the parker stay; the n
			// readers go. Without parking there would be n or more.
			pkParked(t, base, 10)
			for round := 0; round < 2; round++ {
				for i, c := range clients {
					pkEcho(t, c, fmt.Sprintf("round %d, conn %d", round, i))
				}
				pkParked(t, base, 10)
			}
			for _, c := range clients {
				c.Close()
			}
			eventually(t, "an EOF event for every parked socket", func() bool { return rec.n.Load() == n })
			wantClass(t, waitFor(t, rec.ch, "the EOF of a parked socket"), asynctcp.ErrTCPEOF, "a parked socket's event")
			srv.Close()
			waitLoop(t, l, waitTimeout)
		})
	}
}

// What would wake a blocked reader reaches a parked socket too: a read
// timeout set while it is parked runs, Close and Abort end it at once, a
// reset is its error, Disable holds the input back until Enable, and
// Loop.Exit ends them all.
func TestParkedSocketsAnswerEveryControl(t *testing.T) {
	base := runtime.NumGoroutine()
	l := newTestLoop(t)
	events := make(map[*asynctcp.Socket]chan error)
	evs := make(chan [2]any, 16)
	event := func(err error) {
		s := asynctcp.SocketOf(err)
		evs <- [2]any{s, err}
	}
	srv, clients, socks := pkIdleConns(t, l, 6, event)
	for _, s := range socks {
		events[s] = make(chan error, 4)
	}
	go func() {
		for e := range evs {
			if s, ok := e[0].(*asynctcp.Socket); ok {
				events[s] <- e[1].(error)
			}
		}
	}()
	defer close(evs)
	pkParked(t, base, 10)

	// 0: a read timeout set while parked fires.
	start := time.Now()
	socks[0].SetTimeouts(100*time.Millisecond, 0)
	wantClass(t, waitFor(t, events[socks[0]], "the read timeout of a parked socket"), asynctcp.ErrTCPTimeout, "read timeout")
	if d := time.Since(start); d < 90*time.Millisecond {
		t.Errorf("the read timeout fired after %v, want 100ms", d)
	}

	// 1: Close ends it; the client sees EOF.
	socks[1].Close()
	clients[1].SetReadDeadline(time.Now().Add(waitTimeout))
	if _, err := clients[1].Read(make([]byte, 1)); err != io.EOF {
		t.Errorf("client of a closed parked socket read %v, want EOF", err)
	}

	// 2: Abort ends it.
	socks[2].Abort()
	clients[2].SetReadDeadline(time.Now().Add(waitTimeout))
	if _, err := clients[2].Read(make([]byte, 1)); err == nil {
		t.Errorf("client of an aborted parked socket read no error")
	}

	// 3: a reset is its event (tcp-eof, with ECONNRESET).
	clients[3].SetLinger(0)
	clients[3].Close()
	ev := wantClass(t, waitFor(t, events[socks[3]], "the reset of a parked socket"), asynctcp.ErrTCPEOF, "reset")
	if !errors.Is(ev, syscall.ECONNRESET) {
		t.Errorf("the reset's event %v does not match ECONNRESET", ev)
	}

	// 4: Disable holds input back; Enable brings it.
	socks[4].Disable(asynctcp.EvRead)
	clients[4].Write([]byte("held"))
	clients[4].SetReadDeadline(time.Now().Add(150 * time.Millisecond))
	if n, _ := clients[4].Read(make([]byte, 4)); n != 0 {
		t.Errorf("a disabled parked socket echoed %d bytes", n)
	}
	socks[4].Enable(asynctcp.EvRead)
	clients[4].SetReadDeadline(time.Time{})
	got := make([]byte, 4)
	clients[4].SetReadDeadline(time.Now().Add(waitTimeout))
	if _, err := io.ReadFull(clients[4], got); err != nil || string(got) != "held" {
		t.Errorf("after Enable: read %q, %v; want \"held\"", got, err)
	}

	// 5 and the rest: Exit ends them all.
	pkParked(t, base, 10)
	srv.Close()
	l.Exit(nil)
	waitLoop(t, l, waitTimeout)
	for _, c := range clients {
		c.Close()
	}
}

// A storm over parking sockets: clients send bursts with pauses longer
// than the idle wait, so that their sockets park and wake up again and
// again, while another
// goroutine sets and lifts read timeouts, disables and enables reading,
// and finally closes or aborts them, Serial and not. Every echo that
// comes back is exact, every close-cb runs once, and the loop and its
// parker end.
func TestParkingStorm(t *testing.T) {
	for _, serial := range []bool{false, true} {
		t.Run(fmt.Sprintf("serial %v", serial), func(t *testing.T) {
			const n = 40
			l := newTestLoop(t)
			l.Serial = serial
			var closes sync.Map // *Socket -> *atomic.Int32
			onClose := asynctcp.OnClose(func(s *asynctcp.Socket, _ error) {
				c, _ := closes.LoadOrStore(s, new(atomic.Int32))
				c.(*atomic.Int32).Add(1)
			})
			srv, clients, socks := pkIdleConns(t, l, n, func(error) {}, onClose)
			var wg sync.WaitGroup
			stop := make(chan struct{})
			for i, c := range clients {
				wg.Add(1)
				go func() {
					defer wg.Done()
					rng := rand.New(rand.NewSource(int64(i)))
					buf := make([]byte, 64)
					for k := 0; ; k++ {
						// Bursts of ten messages, then a pause longer than the
						// idle wait they leave (10 ms): the socket parks.
						pause := time.Duration(0)
						if k%10 == 9 {
							pause = time.Duration(15+rng.Intn(25)) * time.Millisecond
						}
						select {
						case <-stop:
							return
						case <-time.After(pause):
						}
						msg := []byte(fmt.Sprintf("%d:%d", i, k))
						c.SetDeadline(time.Now().Add(waitTimeout))
						if _, err := c.Write(msg); err != nil {
							return // closed by the storm
						}
						got := buf[:len(msg)]
						if _, err := io.ReadFull(c, got); err != nil {
							return // closed by the storm, or a read timeout
						}
						if string(got) != string(msg) {
							t.Errorf("conn %d: echo %q, want %q", i, got, msg)
							return
						}
					}
				}()
			}
			rng := rand.New(rand.NewSource(1))
			deadline := time.Now().Add(600 * time.Millisecond)
			for time.Now().Before(deadline) {
				s := socks[rng.Intn(n)]
				switch rng.Intn(4) {
				case 0:
					s.SetTimeouts(time.Duration(rng.Intn(3))*40*time.Millisecond, 0)
				case 1:
					s.SetTimeouts(0, 0)
				case 2:
					s.Disable(asynctcp.EvRead)
				case 3:
					s.Enable(asynctcp.EvRead)
				}
				time.Sleep(time.Millisecond) // a pace for the storm, not a wait for an event
			}
			closeHalfAbortHalf(socks)
			close(stop)
			for _, c := range clients {
				c.Close()
			}
			wg.Wait()
			srv.Close()
			waitLoop(t, l, waitTimeout)
			for i, s := range socks {
				c, ok := closes.Load(s)
				if !ok || c.(*atomic.Int32).Load() != 1 {
					got := int32(0)
					if ok {
						got = c.(*atomic.Int32).Load()
					}
					t.Errorf("socket %d: close-cb ran %d times, want once", i, got)
				}
			}
		})
	}
}
