package asynctcp_test

import (
	"context"
	"errors"
	"fmt"
	"math/rand"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/asynctcp/asynctcp"
)

// lcTrace records the callbacks of one socket, in order, and its close-cb.
type lcTrace struct {
	mu     sync.Mutex
	seq    []string
	closes int
	err    error
	early  bool // Done was closed while the close-cb ran
	done   chan struct{}
}

func newLCTrace() *lcTrace { return &lcTrace{done: make(chan struct{})} }

func (tr *lcTrace) add(name string) {
	tr.mu.Lock()
	tr.seq = append(tr.seq, name)
	tr.mu.Unlock()
}

// opts returns the options that trace every callback of the socket.
func (tr *lcTrace) opts() []asynctcp.Option {
	return []asynctcp.Option{
		asynctcp.OnConnect(func(*asynctcp.Socket) { tr.add("connect") }),
		asynctcp.OnWrite(func(*asynctcp.Socket) { tr.add("write") }),
		asynctcp.OnClose(func(s *asynctcp.Socket, err error) {
			tr.add("close")
			tr.mu.Lock()
			tr.closes++
			tr.err = err
			select {
			case <-s.Done():
				tr.early = true
			default:
			}
			first := tr.closes == 1
			tr.mu.Unlock()
			if first {
				close(tr.done)
			}
		}),
	}
}

// A close-cb runs exactly once, after every other callback of the socket,
// however the socket ends, with the ending event or nil where the
// application closed it; Done closes after it returns, and the Context is
// cancelled with the same cause. Loop.Exit runs no close-cb but closes
// Done.
func TestOnCloseRunsOnceLastInEveryWayASocketEnds(t *testing.T) {
	type way struct {
		name  string
		opts  []asynctcp.Option
		catch bool
		// end ends the socket; peer is nil for "refused".
		end  func(t *testing.T, l *asynctcp.Loop, s *asynctcp.Socket, peer *net.TCPConn)
		want error // the class of err; nil: the application closed it
		exit bool
	}
	ways := []way{
		{name: "Close", end: func(_ *testing.T, _ *asynctcp.Loop, s *asynctcp.Socket, _ *net.TCPConn) { s.Close() }},
		{name: "Abort", end: func(_ *testing.T, _ *asynctcp.Loop, s *asynctcp.Socket, _ *net.TCPConn) { s.Abort() }},
		{name: "peer EOF", want: asynctcp.ErrTCPEOF,
			end: func(_ *testing.T, _ *asynctcp.Loop, _ *asynctcp.Socket, peer *net.TCPConn) { peer.Close() }},
		{name: "peer reset", want: asynctcp.ErrTCPEOF,
			end: func(_ *testing.T, _ *asynctcp.Loop, _ *asynctcp.Socket, peer *net.TCPConn) {
				peer.SetLinger(0)
				peer.Close()
			}},
		{name: "read timeout", want: asynctcp.ErrTCPTimeout, opts: []asynctcp.Option{asynctcp.ReadTimeout(50 * time.Millisecond)},
			end: func(*testing.T, *asynctcp.Loop, *asynctcp.Socket, *net.TCPConn) {}},
		{name: "write timeout", want: asynctcp.ErrTCPTimeout, opts: []asynctcp.Option{asynctcp.WriteTimeout(100 * time.Millisecond)},
			end: func(_ *testing.T, _ *asynctcp.Loop, s *asynctcp.Socket, _ *net.TCPConn) {
				s.WriteData(make([]byte, 64<<20))
			}},
		{name: "panic caught", catch: true, want: &asynctcp.PanicError{},
			end: func(t *testing.T, _ *asynctcp.Loop, _ *asynctcp.Socket, peer *net.TCPConn) {
				if _, err := peer.Write([]byte("boom")); err != nil {
					t.Errorf("peer write: %v", err)
				}
			}},
		{name: "CloseWrite then peer EOF", opts: []asynctcp.Option{asynctcp.AllowHalfOpen()},
			end: func(t *testing.T, _ *asynctcp.Loop, s *asynctcp.Socket, peer *net.TCPConn) {
				if err := s.CloseWrite(); err != nil {
					t.Errorf("CloseWrite: %v", err)
				}
				peer.Close()
			}},
		{name: "CloseWrite then peer EOF, not half-open",
			end: func(t *testing.T, _ *asynctcp.Loop, s *asynctcp.Socket, peer *net.TCPConn) {
				if err := s.CloseWrite(); err != nil {
					t.Errorf("CloseWrite: %v", err)
				}
				peer.Close()
			}},
		{name: "refused", want: asynctcp.ErrTCPRefused},
		{name: "Exit", exit: true, end: func(_ *testing.T, l *asynctcp.Loop, _ *asynctcp.Socket, _ *net.TCPConn) { l.Exit(nil) }},
	}
	for _, serial := range []bool{false, true} {
		for _, w := range ways {
			t.Run(fmt.Sprintf("%s/serial=%v", w.name, serial), func(t *testing.T) {
				l := newTestLoop(t)
				l.Serial, l.CatchAppErrors = serial, w.catch
				tr := newLCTrace()
				read := func(s *asynctcp.Socket, data []byte) {
					tr.add("read")
					if string(data) == "boom" {
						panic("boom")
					}
				}
				event := func(error) { tr.add("event") }
				opts := append(tr.opts(), w.opts...)
				var s *asynctcp.Socket
				var peer *net.TCPConn
				if w.name == "refused" {
					var err error
					if s, err = l.Connect("127.0.0.1", closedPort(t), read, event, opts...); err != nil {
						t.Fatalf("Connect: %v", err)
					}
				} else {
					ln, port := listenRaw(t)
					s = connectLocal(t, l, port, read, event, opts...)
					peer = acceptRaw(t, ln)
					defer peer.Close()
				}
				ctx := s.Context()
				if w.end != nil {
					eventually(t, "the socket to connect", func() bool { return s.Conn() != nil })
					w.end(t, l, s, peer)
				}
				waitFor(t, s.Done(), "Done")
				waitLoopClean(t, l, waitTimeout)

				tr.mu.Lock()
				defer tr.mu.Unlock()
				if w.exit {
					if tr.closes != 0 {
						t.Errorf("close-cb ran %d times after Exit, want none", tr.closes)
					}
				} else {
					if tr.closes != 1 {
						t.Fatalf("close-cb ran %d times, want once (callbacks %v)", tr.closes, tr.seq)
					}
					if last := tr.seq[len(tr.seq)-1]; last != "close" {
						t.Errorf("callbacks %v: %q ran after the close-cb", tr.seq, last)
					}
					if tr.early {
						t.Errorf("Done was closed while the close-cb ran")
					}
					switch want := w.want.(type) {
					case nil:
						if tr.err != nil {
							t.Errorf("close-cb err = %v, want nil: the application closed it", tr.err)
						}
					case *asynctcp.PanicError:
						var pe *asynctcp.PanicError
						if !errors.As(tr.err, &pe) {
							t.Errorf("close-cb err = %v, want the *PanicError", tr.err)
						}
					default:
						if !errors.Is(tr.err, want) {
							t.Errorf("close-cb err = %v, want %v", tr.err, want)
						}
						if asynctcp.SocketOf(tr.err) != s {
							t.Errorf("SocketOf(close-cb err) is not the socket")
						}
					}
				}
				select {
				case <-ctx.Done():
				default:
					t.Fatalf("the Context taken before the end is not cancelled after Done")
				}
				cause := context.Cause(ctx)
				switch {
				case w.exit || w.want == nil:
					if !errors.Is(cause, asynctcp.ErrSocketClosed) {
						t.Errorf("context.Cause = %v, want an ErrSocketClosed event", cause)
					}
				case w.name == "panic caught":
					var pe *asynctcp.PanicError
					if !errors.As(cause, &pe) {
						t.Errorf("context.Cause = %v, want the *PanicError", cause)
					}
				default:
					if !errors.Is(cause, w.want) {
						t.Errorf("context.Cause = %v, want %v", cause, w.want)
					}
				}
				if c2 := s.Context(); c2.Err() == nil {
					t.Errorf("a Context taken after Done is not cancelled")
				}
			})
		}
	}
}

// The Context is cancelled as soon as the socket starts to close: before
// the event-cb of its ending event runs, and as Close returns, while the
// flush of a graceful Close still goes on.
func TestContextCancelledAsClosingStarts(t *testing.T) {
	t.Run("before the event-cb", func(t *testing.T) {
		l := newTestLoop(t)
		ln, port := listenRaw(t)
		seen := make(chan error, 1)
		var s *asynctcp.Socket
		s = connectLocal(t, l, port, nil, func(ev error) {
			seen <- context.Cause(s.Context())
		})
		peer := acceptRaw(t, ln)
		eventually(t, "the socket to connect", func() bool { return s.Conn() != nil })
		peer.Close()
		if cause := waitFor(t, seen, "the EOF event"); !errors.Is(cause, asynctcp.ErrTCPEOF) {
			t.Errorf("inside the event-cb context.Cause = %v, want the EOF event", cause)
		}
		waitLoopClean(t, l, waitTimeout)
	})
	t.Run("as Close returns", func(t *testing.T) {
		l := newTestLoop(t)
		ln, port := listenRaw(t)
		s := connectLocal(t, l, port, nil, nil)
		peer := acceptRaw(t, ln)
		eventually(t, "the socket to connect", func() bool { return s.Conn() != nil })
		ctx := s.Context()
		s.WriteData(make([]byte, 8<<20)) // the peer reads later: Close flushes
		if err := s.Close(); err != nil {
			t.Fatalf("Close: %v", err)
		}
		if ctx.Err() == nil {
			t.Errorf("the Context is not cancelled once Close returned")
		}
		select {
		case <-s.Done():
			t.Errorf("Done is closed while the flush still goes on")
		default:
		}
		r := waitFor(t, readAllAsync(peer), "the flushed output")
		if len(r.data) != 8<<20 {
			t.Errorf("peer read %d bytes, want %d (%v)", len(r.data), 8<<20, r.err)
		}
		waitFor(t, s.Done(), "Done after the flush")
		waitLoopClean(t, l, waitTimeout)
	})
}

// SocketOf finds the socket of an *Event or a *PanicError, wrapped or not,
// and returns nil for other errors and for server events.
func TestSocketOf(t *testing.T) {
	s := &asynctcp.Socket{}
	ev := &asynctcp.Event{Class: asynctcp.ErrTCPEOF, Socket: s}
	pe := &asynctcp.PanicError{Value: "boom", Socket: s}
	cases := []struct {
		name string
		err  error
		want *asynctcp.Socket
	}{
		{"event", ev, s},
		{"wrapped event", fmt.Errorf("context: %w", ev), s},
		{"panic", pe, s},
		{"wrapped panic", fmt.Errorf("context: %w", pe), s},
		{"server event", &asynctcp.Event{Class: asynctcp.ErrTCPAcceptError}, nil},
		{"other error", errors.New("other"), nil},
		{"nil", nil, nil},
	}
	for _, c := range cases {
		if got := asynctcp.SocketOf(c.err); got != c.want {
			t.Errorf("SocketOf(%s) = %p, want %p", c.name, got, c.want)
		}
	}
}

// BytesRead and BytesWritten count exactly what crossed the connection,
// on both ends of an echo of random sizes, and are final once Done is
// closed.
func TestByteCountersAreExact(t *testing.T) {
	l := newTestLoop(t)
	var srvSock atomic.Pointer[asynctcp.Socket]
	srv, port := listenLocal(t, l, func(s *asynctcp.Socket, data []byte) { s.WriteData(data) }, func(error) {},
		asynctcp.OnConnect(func(s *asynctcp.Socket) { srvSock.Store(s) }))
	rng := rand.New(rand.NewSource(1))
	var total int64
	var chunks [][]byte
	for range 200 {
		b := pattern(1 + rng.Intn(64<<10))
		chunks = append(chunks, b)
		total += int64(len(b))
	}
	var got atomic.Int64
	all := make(chan struct{})
	c := connectLocal(t, l, port, func(s *asynctcp.Socket, data []byte) {
		if got.Add(int64(len(data))) == total {
			close(all)
		}
	}, func(error) {})
	for _, b := range chunks {
		if err := c.WriteData(b); err != nil {
			t.Fatalf("WriteData: %v", err)
		}
	}
	waitFor(t, all, "the whole echo")
	c.Close()
	waitFor(t, c.Done(), "the client's Done")
	s := srvSock.Load()
	waitFor(t, s.Done(), "the server socket's Done")
	srv.Close()
	waitLoopClean(t, l, waitTimeout)
	for _, x := range []struct {
		name string
		got  int64
	}{
		{"client BytesWritten", c.BytesWritten()},
		{"client BytesRead", c.BytesRead()},
		{"server BytesRead", s.BytesRead()},
		{"server BytesWritten", s.BytesWritten()},
	} {
		if x.got != total {
			t.Errorf("%s = %d, want %d", x.name, x.got, total)
		}
	}
}

// Thousands of sockets ended in every way at once, on both ends, each
// run their close-cb exactly once.
func TestOnCloseStormExactlyOnce(t *testing.T) {
	const n = 1000
	for _, serial := range []bool{false, true} {
		t.Run(fmt.Sprintf("serial=%v", serial), func(t *testing.T) {
			l := newTestLoop(t)
			l.Serial, l.CatchAppErrors = serial, true
			l.EventHandler = func(error) {}
			var mu sync.Mutex
			closes := make(map[*asynctcp.Socket]int)
			onClose := asynctcp.OnClose(func(s *asynctcp.Socket, err error) {
				mu.Lock()
				closes[s]++
				mu.Unlock()
			})
			// The server side ends its sockets by what the client sends.
			srv, port := listenLocal(t, l, func(s *asynctcp.Socket, data []byte) {
				switch data[0] {
				case 'c':
					s.Close()
				case 'a':
					s.Abort()
				case 'p':
					panic("storm")
				default:
					s.WriteData(data)
				}
			}, nil, onClose)
			var wg sync.WaitGroup
			clients := make([]*asynctcp.Socket, n)
			for i := range n {
				wg.Add(1)
				var once sync.Once
				up := func() { once.Do(wg.Done) }
				s, err := l.Connect("127.0.0.1", port, func(s *asynctcp.Socket, data []byte) {
					if data[0] == 'P' {
						panic("storm")
					}
				}, func(error) { up() }, onClose, asynctcp.OnConnect(func(*asynctcp.Socket) { up() }))
				if err != nil {
					t.Fatalf("Connect: %v", err)
				}
				clients[i] = s
			}
			waitGroup(t, &wg, "every client up")
			var storm sync.WaitGroup
			for i, s := range clients {
				storm.Add(1)
				go func() {
					defer storm.Done()
					switch i % 6 {
					case 0:
						s.Close()
					case 1:
						s.Abort()
					case 2:
						s.WriteData([]byte("c"))
					case 3:
						s.WriteData([]byte("a"))
					case 4:
						s.WriteData([]byte("p"))
					default:
						s.WriteData([]byte("P")) // echoed: the client's read-cb panics
					}
				}()
			}
			waitGroup(t, &storm, "the storm")
			for _, s := range clients {
				waitFor(t, s.Done(), "every client's Done")
			}
			srv.Close()
			waitLoopClean(t, l, 30*time.Second)
			mu.Lock()
			defer mu.Unlock()
			clientCloses := 0
			for _, s := range clients {
				if closes[s] != 1 {
					t.Fatalf("a client's close-cb ran %d times, want once", closes[s])
				}
				clientCloses++
			}
			if len(closes) != 2*n {
				t.Errorf("%d sockets ran a close-cb, want %d (%d clients and as many accepted)", len(closes), 2*n, clientCloses)
			}
			for s, c := range closes {
				if c != 1 {
					t.Errorf("socket %p ran its close-cb %d times", s, c)
				}
			}
		})
	}
}
