package asynctcp_test

import (
	"bytes"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"math/rand"
	"net"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/asynctcp/asynctcp"
)

// Paused readers: a socket whose reading is disabled keeps no reader
// goroutine (the reader ends before its next read, readerPaused), and
// Enable starts a fresh one. Input that comes while reading is disabled
// waits in the kernel, and TCP flow control holds the sender; after Enable
// it reaches the read-cb in order, then the peer's EOF or reset. Close,
// Abort and Loop.Exit end a paused socket at once. These tests run on every
// system: they count goroutines with runtime.NumGoroutine and nothing more.

// pzExtra is how many goroutines beyond those the test found may remain
// once every socket of a test has paused or parked: the listener's accept
// loop, the parker (Linux), and a few the runtime or the net poller keep.
const pzExtra = 10

// pzEcho writes msg on c and reads it back, within waitTimeout; it is safe
// from any goroutine (it fails no test itself).
func pzEcho(c net.Conn, msg []byte) error {
	c.SetDeadline(time.Now().Add(waitTimeout))
	defer c.SetDeadline(time.Time{})
	if _, err := c.Write(msg); err != nil {
		return fmt.Errorf("write of %d bytes: %w", len(msg), err)
	}
	got := make([]byte, len(msg))
	if n, err := io.ReadFull(c, got); err != nil {
		return fmt.Errorf("the echo of %d bytes: %d read, then %w", len(msg), n, err)
	}
	if !bytes.Equal(got, msg) {
		return fmt.Errorf("the echo of %d bytes differs from the message at offset %d", len(msg), firstDiff(got, msg))
	}
	return nil
}

// pzGoroutinesAtMost waits until at most limit goroutines run.
func pzGoroutinesAtMost(t *testing.T, limit int, what string) {
	t.Helper()
	eventually(t, fmt.Sprintf("%s (goroutines <= %d)", what, limit), func() bool {
		return runtime.NumGoroutine() <= limit
	})
}

// pzCloses counts the runs of each socket's close-cb.
type pzCloses struct {
	mu   sync.Mutex
	runs map[*asynctcp.Socket][]error
}

func newPzCloses() *pzCloses { return &pzCloses{runs: make(map[*asynctcp.Socket][]error)} }

// option is the OnClose option that counts.
func (p *pzCloses) option() asynctcp.Option {
	return asynctcp.OnClose(func(s *asynctcp.Socket, err error) {
		p.mu.Lock()
		p.runs[s] = append(p.runs[s], err)
		p.mu.Unlock()
	})
}

// of returns the errors s's close-cb got, one per run.
func (p *pzCloses) of(s *asynctcp.Socket) []error {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]error(nil), p.runs[s]...)
}

// pzAccepted is an OnConnect option that sends each accepted socket on the
// channel it returns (room for n).
func pzAccepted(n int) (asynctcp.Option, <-chan *asynctcp.Socket) {
	ch := make(chan *asynctcp.Socket, n)
	return asynctcp.OnConnect(func(s *asynctcp.Socket) { ch <- s }), ch
}

// pzDone waits for s's Done, failing the test after d.
func pzDone(t *testing.T, s *asynctcp.Socket, d time.Duration, what string) {
	t.Helper()
	select {
	case <-s.Done():
	case <-time.After(d):
		t.Fatalf("%s: Done not closed within %v", what, d)
	}
}

// pzTLSClient makes raw a TLS client conn for ccfg and completes its
// handshake, within waitTimeout.
func pzTLSClient(t *testing.T, raw net.Conn, ccfg *tls.Config) *tls.Conn {
	t.Helper()
	cfg := ccfg.Clone()
	cfg.ServerName = "127.0.0.1"
	c := tls.Client(raw, cfg)
	c.SetDeadline(time.Now().Add(waitTimeout))
	if err := c.Handshake(); err != nil {
		t.Fatalf("TLS client handshake: %v", err)
	}
	c.SetDeadline(time.Time{})
	return c
}

// pzEchoHello echoes the i-th client's hello on c.
func pzEchoHello(t *testing.T, c net.Conn, i int) {
	t.Helper()
	if err := pzEcho(c, []byte(fmt.Sprintf("hello %d\n", i))); err != nil {
		t.Fatalf("conn %d: %v", i, err)
	}
}

// pzOpaqueConn hides a conn's type, and with it its descriptor: a socket
// that wraps it reads through net.Conn's Read and never parks, as a plain
// TCP socket does on systems other than Linux.
type pzOpaqueConn struct{ net.Conn }

// pzRecord is one callback of a socket, in the order they ran.
type pzRecord struct {
	data []byte
	err  error
}

func (r pzRecord) String() string {
	if r.err != nil {
		return "event " + r.err.Error()
	}
	return fmt.Sprintf("read-cb %q", r.data)
}

// pzPauseAfterLine is a read-cb that echoes, and disables reading once a
// chunk ends a line, before echoing it: a peer that got its whole line
// back knows that the socket is disabled. Each read-cb run is signalled on
// ran (room for one: drain it before watching it).
func pzPauseAfterLine(ran chan struct{}, disableErrs chan error) asynctcp.ReadFunc {
	return func(s *asynctcp.Socket, data []byte) {
		signal(ran, struct{}{})
		if bytes.HasSuffix(data, []byte("\n")) {
			if err := s.Disable(asynctcp.EvRead); err != nil {
				signal(disableErrs, err)
			}
		}
		s.WriteData(data)
	}
}

// N sockets that disable their reading in the read-cb keep no reader:
// the goroutines fall to what the test started with (plus the accept loop
// and the parker); input sent to them is not read; Enable from outside the
// callbacks brings every held line back, exactly, and they pause again.
func TestPauseDisabledSocketsKeepNoGoroutine(t *testing.T) {
	for _, serial := range []bool{false, true} {
		t.Run(fmt.Sprintf("serial=%v", serial), func(t *testing.T) {
			const n = 200
			base := runtime.NumGoroutine()
			l := newTestLoop(t)
			l.Serial = serial
			ran := make(chan struct{}, 1)
			disableErrs := make(chan error, 1)
			rec := newEventRecorder()
			onConnect, accepted := pzAccepted(n)
			srv, port := listenLocal(t, l, pzPauseAfterLine(ran, disableErrs), rec.cb, onConnect)
			clients := make([]*net.TCPConn, n)
			socks := make([]*asynctcp.Socket, n)
			for i := range clients {
				clients[i] = dialRaw(t, port)
				socks[i] = waitFor(t, accepted, "an accepted socket")
				pzEchoHello(t, clients[i], i)
			}
			// Each read-cb disabled its socket's reading: no reader is left.
			pzGoroutinesAtMost(t, base+pzExtra, fmt.Sprintf("the readers of %d disabled sockets to end", n))

			select {
			case <-ran: // the read-cb of the last hello
			default:
			}
			for i, c := range clients {
				c.SetWriteDeadline(time.Now().Add(waitTimeout))
				if _, err := c.Write([]byte(fmt.Sprintf("held %d\n", i))); err != nil {
					t.Fatalf("conn %d: write while disabled: %v", i, err)
				}
			}
			expectNone(t, ran, 150*time.Millisecond, "a read-cb while every socket's reading is disabled")
			if g := runtime.NumGoroutine(); g > base+pzExtra {
				t.Errorf("input for the disabled sockets started readers: %d goroutines, want at most %d", g, base+pzExtra)
			}
			for i, s := range socks {
				if got := s.BytesRead(); got != int64(len(fmt.Sprintf("hello %d\n", i))) {
					t.Errorf("socket %d read %d bytes while disabled, want only its hello", i, got)
				}
			}

			for i, s := range socks {
				if err := s.Enable(asynctcp.EvRead); err != nil {
					t.Fatalf("socket %d: Enable(EvRead): %v", i, err)
				}
			}
			for i, c := range clients {
				want := fmt.Sprintf("held %d\n", i)
				got, err := ftReadN(c, len(want), waitTimeout)
				if err != nil || string(got) != want {
					t.Fatalf("conn %d: after Enable read %q, %v; want %q", i, got, err, want)
				}
			}
			// They paused again in their read-cbs.
			pzGoroutinesAtMost(t, base+pzExtra, "the readers to end again")
			for i, s := range socks {
				if err := s.Enable(asynctcp.EvRead); err != nil {
					t.Fatalf("socket %d: second Enable(EvRead): %v", i, err)
				}
			}
			for i, c := range clients {
				if err := pzEcho(c, []byte(fmt.Sprintf("again %d\n", i))); err != nil {
					t.Fatalf("conn %d, after the second Enable: %v", i, err)
				}
			}
			for i, s := range socks {
				if err := s.Enable(asynctcp.EvRead); err != nil {
					t.Fatalf("socket %d: third Enable(EvRead): %v", i, err)
				}
			}
			for _, c := range clients {
				c.Close()
			}
			eventually(t, "an EOF event for every socket", func() bool { return rec.n.Load() == n })
			wantClass(t, waitFor(t, rec.ch, "an EOF event"), asynctcp.ErrTCPEOF, "the event after the client closed")
			select {
			case err := <-disableErrs:
				t.Errorf("Disable in the read-cb: %v", err)
			default:
			}
			srv.Close()
			waitLoopClean(t, l, waitTimeout)
		})
	}
}

// A socket that is disabled does not read: a client that writes as fast
// as it can is held by TCP flow control (its writes block), the socket
// reads nothing, and after Enable every byte reaches the read-cb in order.
func TestPauseHoldsAFastSender(t *testing.T) {
	const size = 32 << 20
	l := newTestLoop(t)
	var got atomic.Int64
	bad := make(chan string, 1)
	done := make(chan struct{})
	read := func(s *asynctcp.Socket, data []byte) {
		off := int(got.Load())
		if !isPatternAt(off, data) {
			signal(bad, fmt.Sprintf("read-cb: %d bytes at offset %d are not the pattern", len(data), off))
		}
		if got.Add(int64(len(data))) == size {
			close(done)
		}
	}
	accepted := make(chan *asynctcp.Socket, 1)
	srv, port := listenLocal(t, l, read, nil, asynctcp.OnConnect(func(s *asynctcp.Socket) {
		s.Disable(asynctcp.EvRead)
		accepted <- s
	}))
	c := dialRaw(t, port)
	s := waitFor(t, accepted, "the accepted socket")
	var sent atomic.Int64
	wrote := make(chan error, 1)
	go func() {
		c.SetWriteDeadline(time.Now().Add(waitTimeout))
		var off int
		for off < size {
			n, err := c.Write(patternAt(off, min(256<<10, size-off)))
			off += n
			sent.Store(int64(off))
			if err != nil {
				wrote <- err
				return
			}
		}
		wrote <- nil
	}()
	stalled := stStall(t, "the sender to a disabled socket", sent.Load)
	t.Logf("the sender stalled after %d bytes (of %d)", stalled, size)
	if stalled >= size {
		t.Fatalf("the sender wrote all %d bytes to a socket whose reading is disabled", size)
	}
	if n := s.BytesRead(); n != 0 || got.Load() != 0 {
		t.Fatalf("a disabled socket read %d bytes (read-cb got %d)", n, got.Load())
	}
	if err := s.Enable(asynctcp.EvRead); err != nil {
		t.Fatalf("Enable(EvRead): %v", err)
	}
	select {
	case <-done:
	case msg := <-bad:
		t.Fatal(msg)
	case <-time.After(waitTimeout):
		t.Fatalf("after Enable the read-cb got %d bytes of %d", got.Load(), size)
	}
	if err := waitFor(t, wrote, "the sender"); err != nil {
		t.Fatalf("sender: %v", err)
	}
	select {
	case msg := <-bad:
		t.Fatal(msg)
	default:
	}
	c.Close()
	srv.Close()
	waitLoopClean(t, l, waitTimeout)
}

// Held input is exact while reading is disabled and enabled at random,
// from inside the read-cb, from a timer, from another goroutine and from
// a goroutine that toggles on its own, under a sender as fast as it can
// be: the 8 MiB echo is the pattern sent, byte for byte.
func TestPauseHeldInputExactWhileToggling(t *testing.T) {
	const size = 8 << 20
	for _, serial := range []bool{false, true} {
		t.Run(fmt.Sprintf("serial=%v", serial), func(t *testing.T) {
			l := newTestLoop(t)
			l.Serial = serial
			var pending sync.WaitGroup // Enables still to come from timers and the enabler
			enables := make(chan time.Duration, 64)
			var sock atomic.Pointer[asynctcp.Socket]
			enablerDone := make(chan struct{})
			go func() { // Enables after a Disable in the read-cb
				defer close(enablerDone)
				for d := range enables {
					time.Sleep(d) // the pause the read-cb asked for, not a wait for an event
					sock.Load().Enable(asynctcp.EvRead)
					pending.Done()
				}
			}()
			defer func() {
				close(enables)
				<-enablerDone
			}()
			var toggles [4]atomic.Int32
			rng := rand.New(rand.NewSource(7)) // the socket's callbacks only, one at a time
			read := func(s *asynctcp.Socket, data []byte) {
				if err := s.WriteData(data); err != nil {
					t.Errorf("WriteData: %v", err)
				}
				switch k := rng.Intn(8); k {
				case 0, 1, 2:
					toggles[k].Add(1)
					s.Disable(asynctcp.EvRead)
					d := time.Duration(rng.Intn(2001)) * time.Microsecond
					pending.Add(1)
					switch k {
					case 0:
						s.Enable(asynctcp.EvRead)
						pending.Done()
					case 1:
						time.AfterFunc(d, func() {
							s.Enable(asynctcp.EvRead)
							pending.Done()
						})
					case 2:
						enables <- d
					}
				}
			}
			onConnect, accepted := pzAccepted(1)
			rec := newEventRecorder()
			srv, port := listenLocal(t, l, read, rec.cb, onConnect)
			c := dialRaw(t, port)
			s := waitFor(t, accepted, "the accepted socket")
			sock.Store(s)

			stop := make(chan struct{})
			toggled := make(chan struct{})
			go func() { // toggles on its own, always ending enabled
				defer close(toggled)
				rng := rand.New(rand.NewSource(8))
				for {
					select {
					case <-stop:
						return
					default:
					}
					s.Disable(asynctcp.EvRead)
					toggles[3].Add(1)
					time.Sleep(time.Duration(rng.Intn(500)) * time.Microsecond) // a pace, not a wait for an event
					s.Enable(asynctcp.EvRead)
					time.Sleep(time.Duration(rng.Intn(2000)) * time.Microsecond)
				}
			}()
			data := makePatternAt(0, size)
			c.SetDeadline(time.Now().Add(waitTimeout))
			sent := sendInRandomChunks(c, data, 3)
			echo := ftReadAsync(c, size, waitTimeout)
			r := waitFor(t, echo, "the echo")
			close(stop)
			<-toggled
			if r.err != nil {
				t.Errorf("echo: %d bytes, then %v", len(r.data), r.err)
			}
			ftCheckBytes(t, "the echo", r.data, data)
			if err := waitFor(t, sent, "the sender"); err != nil {
				t.Errorf("sender: %v", err)
			}
			t.Logf("toggles: %d in the read-cb, %d by timers, %d by the enabler, %d by the toggler",
				toggles[0].Load(), toggles[1].Load(), toggles[2].Load(), toggles[3].Load())
			for i := range toggles {
				if toggles[i].Load() == 0 {
					t.Errorf("toggle kind %d never ran: the test did not test it", i)
				}
			}
			c.Close()
			wantClass(t, waitFor(t, rec.ch, "the EOF"), asynctcp.ErrTCPEOF, "the event after the client closed")
			srv.Close()
			waitLoopClean(t, l, waitTimeout)
			// Only once the loop has ended: a read-cb may add to the group
			// until then (its echo leaves before its toggle).
			waitGroup(t, &pending, "the pending Enables")
		})
	}
}

// A socket whose reading is disabled sees neither its peer's EOF nor
// its reset: it reads nothing. After Enable the read-cb gets what the peer
// sent before it went, then the event.
func TestPausePeerEOFAndResetWaitForEnable(t *testing.T) {
	for _, reset := range []bool{false, true} {
		for _, where := range []string{"read-cb", "outside"} {
			name := "eof"
			if reset {
				name = "reset"
			}
			t.Run(name+"/disabled-"+where, func(t *testing.T) {
				l := newTestLoop(t)
				recs := make(chan pzRecord, 64)
				read := func(s *asynctcp.Socket, data []byte) {
					if string(data) == "ping\n" {
						if where == "read-cb" {
							s.Disable(asynctcp.EvRead)
						}
						s.WriteData(data)
						return
					}
					recs <- pzRecord{data: data}
				}
				event := func(err error) { recs <- pzRecord{err: err} }
				onConnect, accepted := pzAccepted(1)
				srv, port := listenLocal(t, l, read, event, onConnect)
				c := dialRaw(t, port)
				s := waitFor(t, accepted, "the accepted socket")
				if err := pzEcho(c, []byte("ping\n")); err != nil {
					t.Fatal(err)
				}
				if where == "outside" {
					if err := s.Disable(asynctcp.EvRead); err != nil {
						t.Fatalf("Disable(EvRead): %v", err)
					}
				}
				if _, err := c.Write([]byte("tail")); err != nil {
					t.Fatalf("write: %v", err)
				}
				if reset {
					c.SetLinger(0)
				}
				c.Close()
				expectNone(t, recs, 200*time.Millisecond, "a callback while reading is disabled")
				if s.Closed() {
					t.Fatal("the socket closed while its reading was disabled")
				}
				if err := s.Enable(asynctcp.EvRead); err != nil {
					t.Fatalf("Enable(EvRead): %v", err)
				}
				var tail []byte
				var ev *asynctcp.Event
				for ev == nil {
					r := waitFor(t, recs, "the callbacks after Enable")
					if r.err == nil {
						tail = append(tail, r.data...)
						continue
					}
					ev = wantClass(t, r.err, asynctcp.ErrTCPEOF, "the peer's end")
				}
				if reset {
					t.Logf("reset: the read-cb got %q before the event %v (code %d)", tail, ev, ev.Code)
					if ev.Code == -1 {
						t.Errorf("the reset's event %v has no Code", ev)
					}
					if len(tail) > 0 && string(tail) != "tail" {
						t.Errorf("before the reset the read-cb got %q, want \"tail\" or nothing", tail)
					}
				} else if string(tail) != "tail" {
					t.Errorf("before the EOF the read-cb got %q, want \"tail\"", tail)
				}
				expectNone(t, recs, 50*time.Millisecond, "a callback after the event")
				srv.Close()
				waitLoopClean(t, l, waitTimeout)
			})
		}
	}
}

// Close, Abort and Loop.Exit end a paused socket at once, with output
// queued or not: the close-cb runs once (not for Exit), Done closes, the
// loop ends, and Enable after them is refused and starts nothing.
func TestPauseCloseAbortExitOfPausedSocket(t *testing.T) {
	for _, how := range []string{"Close", "Abort", "Exit"} {
		for _, queued := range []bool{false, true} {
			t.Run(fmt.Sprintf("%s/queued=%v", how, queued), func(t *testing.T) {
				const big = 8 << 20
				l := newTestLoop(t)
				ran := make(chan struct{}, 1)
				disableErrs := make(chan error, 1)
				closes := newPzCloses()
				onConnect, accepted := pzAccepted(1)
				srv, port := listenLocal(t, l, pzPauseAfterLine(ran, disableErrs), func(error) {}, onConnect, closes.option())
				c := dialRaw(t, port)
				s := waitFor(t, accepted, "the accepted socket")
				if err := pzEcho(c, []byte("ping\n")); err != nil {
					t.Fatal(err)
				}
				<-ran
				// Input the paused socket does not read; but not where a
				// flush is to reach the client: a conn closed with unread
				// input sends a reset (the kernel's doing), which drops what
				// the client has not read yet.
				if how != "Close" || !queued {
					if _, err := c.Write([]byte("unread\n")); err != nil {
						t.Fatalf("write: %v", err)
					}
				}
				var out []byte
				if queued {
					out = pattern(big) // more than the kernel takes: the client does not read yet
					if err := s.WriteData(out); err != nil {
						t.Fatalf("WriteData: %v", err)
					}
					if s.Buffered() == 0 {
						t.Fatalf("nothing queued after WriteData of %d bytes to a client that does not read", big)
					}
				}
				start := time.Now()
				switch how {
				case "Close":
					if err := s.Close(); err != nil {
						t.Fatalf("Close: %v", err)
					}
				case "Abort":
					if err := s.Abort(); err != nil {
						t.Fatalf("Abort: %v", err)
					}
				case "Exit":
					l.Exit(nil)
				}
				if err := s.Enable(asynctcp.EvRead); err == nil {
					t.Errorf("Enable(EvRead) after %s = nil, want an ErrSocketClosed event", how)
				} else {
					wantSocketClosed(t, err, s, "Enable after "+how)
				}
				if how == "Close" && queued {
					// The flush needs the client to read.
					r := waitFor(t, readAllAsync(c), "the flushed output and the EOF")
					if r.err != nil || !bytes.Equal(r.data, out) {
						t.Errorf("after Close the client read %d bytes of %d, then %v; first difference at %d",
							len(r.data), len(out), r.err, firstDiff(r.data, out))
					}
				}
				pzDone(t, s, 2*time.Second, how+" of a paused socket")
				t.Logf("%s of a paused socket: Done after %v", how, time.Since(start))
				expectNone(t, ran, 50*time.Millisecond, "a read-cb after "+how)
				if err := s.Enable(asynctcp.EvRead); err == nil {
					t.Errorf("Enable(EvRead) after Done = nil, want an ErrSocketClosed event")
				}
				srv.Close()
				err := waitLoopEmpty(t, l, waitTimeout)
				if err != nil {
					t.Errorf("Loop.Wait = %v, want nil", err)
				}
				runs := closes.of(s)
				want := 1
				if how == "Exit" {
					want = 0 // Loop.Exit runs no close-cb
				}
				if len(runs) != want {
					t.Errorf("close-cb ran %d times after %s, want %d", len(runs), how, want)
				}
				for _, err := range runs {
					if err != nil {
						t.Errorf("close-cb after %s got %v, want nil", how, err)
					}
				}
				select {
				case err := <-disableErrs:
					t.Errorf("Disable in the read-cb: %v", err)
				default:
				}
			})
		}
	}
}

// A storm of Disable and Enable, from four goroutines on random sockets
// and from inside the read-cbs, while 40 clients echo messages of random
// sizes: once every socket is enabled every echo completes exactly; then
// half close and half abort, each close-cb runs once, and the loop ends.
// With a write-cb, which runs after each echo is written (on a dispatcher
// or behind the read-cb), input often arrives while the callback queue is
// busy or, on a Serial loop, the callback lock is taken: the reader then
// hands it on after its descriptor read has returned. With a read timeout
// far longer than the storm, no timeout may fire: a Disable wakes a
// blocked read with a deadline in the past, and an Enable that moves the
// deadline on before the reader looks must not turn that wake into a
// timeout.
func TestPauseStorm(t *testing.T) {
	for _, tc := range []struct{ serial, writeCb, timeout bool }{
		{false, false, false}, {true, false, false}, {false, true, false}, {true, true, false},
		{false, true, true}, {true, false, true},
	} {
		t.Run(fmt.Sprintf("serial=%v,write-cb=%v,read-timeout=%v", tc.serial, tc.writeCb, tc.timeout), func(t *testing.T) {
			const n = 40
			l := newTestLoop(t)
			l.Serial = tc.serial
			closes := newPzCloses()
			var timers sync.WaitGroup
			var cbToggles atomic.Int32
			read := func(s *asynctcp.Socket, data []byte) {
				s.WriteData(data)
				switch data[0] % 16 { // the message's random first byte
				case 0:
					cbToggles.Add(1)
					s.Disable(asynctcp.EvRead)
					s.Enable(asynctcp.EvRead)
				case 1:
					cbToggles.Add(1)
					s.Disable(asynctcp.EvRead)
					timers.Add(1)
					time.AfterFunc(time.Duration(data[len(data)-1]%3)*time.Millisecond, func() {
						defer timers.Done()
						s.Enable(asynctcp.EvRead)
					})
				}
			}
			onConnect, accepted := pzAccepted(n)
			opts := []asynctcp.Option{onConnect, closes.option()}
			var writeCbs atomic.Int64
			if tc.writeCb {
				opts = append(opts, asynctcp.OnWrite(func(*asynctcp.Socket) {
					if writeCbs.Add(1)%4 == 0 {
						time.Sleep(50 * time.Microsecond) // a write-cb with some work in it
					}
				}))
			}
			if tc.timeout {
				opts = append(opts, asynctcp.ReadTimeout(time.Minute))
			}
			var timeouts atomic.Int32
			event := func(err error) {
				if errors.Is(err, asynctcp.ErrTCPTimeout) {
					timeouts.Add(1)
				}
			}
			srv, port := listenLocal(t, l, read, event, opts...)
			clients := make([]*net.TCPConn, n)
			socks := make([]*asynctcp.Socket, n)
			for i := range clients {
				clients[i] = dialRaw(t, port)
				socks[i] = waitFor(t, accepted, "an accepted socket")
			}

			stopClients := make(chan struct{})
			errs := make(chan error, n)
			var echoes atomic.Int64
			var cwg sync.WaitGroup
			for i, c := range clients {
				cwg.Add(1)
				go func() {
					defer cwg.Done()
					rng := rand.New(rand.NewSource(int64(100 + i)))
					for {
						select {
						case <-stopClients:
							errs <- nil
							return
						default:
						}
						msg := make([]byte, 1+rng.Intn(16<<10))
						rng.Read(msg)
						if err := pzEcho(c, msg); err != nil {
							errs <- fmt.Errorf("conn %d, echo %d: %w", i, echoes.Load(), err)
							return
						}
						echoes.Add(1)
					}
				}()
			}
			stopHammers := make(chan struct{})
			var hwg sync.WaitGroup
			var hammered atomic.Int64
			for h := 0; h < 4; h++ {
				hwg.Add(1)
				go func() {
					defer hwg.Done()
					rng := rand.New(rand.NewSource(int64(h)))
					for {
						select {
						case <-stopHammers:
							return
						default:
						}
						s := socks[rng.Intn(n)]
						if rng.Intn(2) == 0 {
							s.Disable(asynctcp.EvRead)
						} else {
							s.Enable(asynctcp.EvRead)
						}
						hammered.Add(1)
						if rng.Intn(8) == 0 {
							time.Sleep(100 * time.Microsecond) // a pace, not a wait for an event
						}
					}
				}()
			}
			time.Sleep(800 * time.Millisecond) // the storm's length, not a wait for an event
			close(stopHammers)
			hwg.Wait()
			for i, s := range socks {
				if err := s.Enable(asynctcp.EvRead); err != nil {
					t.Fatalf("socket %d: Enable after the storm: %v", i, err)
				}
			}
			close(stopClients)
			waitGroup(t, &cwg, "every outstanding echo")
			for range clients {
				if err := <-errs; err != nil {
					t.Error(err)
				}
			}
			t.Logf("%d echoes, %d Disable/Enable calls from the hammers, %d toggles in read-cbs, %d write-cbs",
				echoes.Load(), hammered.Load(), cbToggles.Load(), writeCbs.Load())
			if echoes.Load() < n {
				t.Errorf("only %d echoes completed during the storm", echoes.Load())
			}
			if tc.writeCb && writeCbs.Load() == 0 {
				t.Error("no write-cb ran")
			}
			if n := timeouts.Load(); n > 0 {
				t.Errorf("%d read timeouts of a minute fired during a storm of under a second", n)
			}
			for i, err := range closeHalfAbortHalf(socks) {
				if err != nil {
					t.Errorf("socket %d: close: %v", i, err)
				}
			}
			for _, c := range clients {
				c.Close()
			}
			srv.Close()
			waitLoopClean(t, l, waitTimeout)
			// Only once the loop has ended: a read-cb may add to the group
			// until then (its echo leaves before its toggle).
			waitGroup(t, &timers, "the Enables of the timers")
			for i, s := range socks {
				runs := closes.of(s)
				if len(runs) != 1 || runs[0] != nil {
					t.Errorf("socket %d: close-cb runs %v, want one, with nil", i, runs)
				}
			}
		})
	}
}

// In stream mode a disabled socket reads nothing: a Stream.Read that
// blocks with a deadline gets nothing while reading is disabled, and the
// data once it is enabled. Reading is disabled from the stream read-cb
// (a notification, which never runs on the reader), from outside at once
// after the connect, and from outside once the socket went idle (parked on
// Linux; a fresh reader blocked in a read elsewhere).
func TestPauseStreamReadWaitsForEnable(t *testing.T) {
	for _, where := range []string{"read-cb", "outside", "outside-idle"} {
		t.Run("disabled-"+where, func(t *testing.T) {
			l := newTestLoop(t)
			var srvRead asynctcp.StreamFunc
			disabled := make(chan struct{}, 1)
			if where == "read-cb" {
				// The read-cb takes the first line and disables reading.
				var first atomic.Bool
				srvRead = func(s *asynctcp.Socket, st *asynctcp.Stream) {
					if !first.CompareAndSwap(false, true) {
						return // later input is the test's to read
					}
					buf := make([]byte, 64)
					n, _ := st.TryRead(buf)
					if bytes.HasSuffix(buf[:n], []byte("\n")) {
						s.Disable(asynctcp.EvRead)
						signal(disabled, struct{}{})
					}
				}
			}
			c, s, srv := stPair(t, l, stPairOpts{serverRead: srvRead})
			switch where {
			case "read-cb":
				if _, err := c.Write([]byte("first\n")); err != nil {
					t.Fatal(err)
				}
				waitFor(t, disabled, "the read-cb to disable reading")
			case "outside-idle":
				// Let the socket go quiet: after a few idle milliseconds
				// its reader parks (Linux) or hands over to a fresh one.
				time.Sleep(100 * time.Millisecond)
				fallthrough
			case "outside":
				if err := s.Socket().Disable(asynctcp.EvRead); err != nil {
					t.Fatalf("Disable(EvRead): %v", err)
				}
			}
			s.SetReadDeadline(time.Now().Add(waitTimeout))
			reading := stGoReadOnce(s, 64)
			if _, err := c.Write([]byte("data")); err != nil {
				t.Fatal(err)
			}
			expectNone(t, reading, 200*time.Millisecond, "Stream.Read while reading is disabled")
			if b := s.Buffered(); b != 0 {
				t.Errorf("Buffered() = %d while reading is disabled, want 0", b)
			}
			if err := s.Socket().Enable(asynctcp.EvRead); err != nil {
				t.Fatalf("Enable(EvRead): %v", err)
			}
			r := waitFor(t, reading, "Stream.Read after Enable")
			if r.err != nil || string(r.data) != "data" {
				t.Fatalf("Stream.Read after Enable = %q, %v; want \"data\"", r.data, r.err)
			}
			c.Close()
			s.SetReadDeadline(time.Now().Add(waitTimeout))
			if got, err := stReadAll(s); len(got) != 0 || err != io.EOF {
				t.Errorf("after the client closed: read %q, %v; want io.EOF", got, err)
			}
			s.Close()
			srv.Close()
			waitLoopNil(t, l, waitTimeout)
		})
	}
}

// pzPipeSize, pzPipeLow and pzPipeHigh shape the piped transfers: 8 MiB
// through watermarks low enough that the source is disabled many times.
const pzPipeSize, pzPipeLow, pzPipeHigh = 8 << 20, 16 << 10, 64 << 10

// pzPipeSlowConsumer pipes pzPipeSize bytes from a client through a piped
// pair (socket a, in stream mode where streamA is set, to socket b) to an
// upstream that reads 64 KiB a millisecond, and checks that every byte
// arrives in order. It returns the most the pair held in that direction,
// sampled every millisecond: b's output, then a's input buffer (in that
// order, so that bytes the relay moves between the two samples are not
// counted twice).
func pzPipeSlowConsumer(t *testing.T, streamA bool) int {
	t.Helper()
	l := newTestLoop(t)
	up, upPort := listenRaw(t)
	srv, port, pairs := ppProxy(t, l, upPort, streamA, false, pzPipeLow, pzPipeHigh)
	client := dialRaw(t, port)
	server := acceptRaw(t, up)
	pair := waitFor(t, pairs, "the piped pair")
	in := asynctcp.NewStream(pair[0]) // a's input buffer, in stream mode
	data := pattern(pzPipeSize)
	client.SetWriteDeadline(time.Now().Add(waitTimeout))
	sent := sendInRandomChunks(client, data, 5)
	got := ftSlowReader(server, pzPipeSize, time.Millisecond, waitTimeout)
	var peak maxObserved
	var r readResult
	for sampling := true; sampling; {
		select {
		case r = <-got:
			sampling = false
		case <-time.After(time.Millisecond):
			out := pair[1].Buffered()
			peak.observe(out + in.Buffered())
		}
	}
	t.Logf("streamA=%v: the pair held at most %d bytes towards the slow consumer (high %d)", streamA, peak.get(), pzPipeHigh)
	if r.err != nil {
		t.Errorf("the slow reader read %d bytes, then %v", len(r.data), r.err)
	}
	ftCheckBytes(t, "through the pipe", r.data, data)
	if err := waitFor(t, sent, "the producer"); err != nil {
		t.Errorf("producer: %v", err)
	}
	client.Close()
	if r := waitFor(t, readAllAsync(server), "the upstream's EOF"); r.err != nil || len(r.data) != 0 {
		t.Errorf("after the client closed the upstream read %d more bytes, then %v", len(r.data), r.err)
	}
	server.Close()
	srv.Close()
	waitLoopClean(t, l, waitTimeout)
	return peak.get()
}

// A Pipe whose destination drains slowly disables its source again and
// again (back-pressure): every byte arrives, in order, and each direction
// holds at most high plus one read (32 KiB) in the pair's buffers, or plus
// two reads where the reading socket is in stream mode (Pipe's doc).
// Reading is enabled again once the destination's output falls to low; an
// Enable from a write-cb that found the output under high but ran after a
// relay raised it past high would let one more read through.
func TestPausePipeHoldsAtMostHighPlusOneRead(t *testing.T) {
	for _, streamA := range []bool{false, true} {
		t.Run(fmt.Sprintf("streamA=%v", streamA), func(t *testing.T) {
			reads := 1
			if streamA {
				reads = 2
			}
			if peak, bound := pzPipeSlowConsumer(t, streamA), pzPipeHigh+reads*32<<10; peak > bound {
				t.Errorf("the pair held %d bytes towards a slow consumer, want at most high + %d read(s) = %d",
					peak, reads, bound)
			}
		})
	}
}

// A TLS socket disabled and enabled again and again while it echoes:
// each line waits while reading is disabled (from the read-cb), comes back
// after Enable (from outside); a bulk echo under random toggles is exact.
func TestPauseTLSToggleWhileEchoing(t *testing.T) {
	for _, serial := range []bool{false, true} {
		t.Run(fmt.Sprintf("serial=%v", serial), func(t *testing.T) {
			const size = 2 << 20
			scfg, ccfg := tlsConfigs(t)
			l := newTestLoop(t)
			l.Serial = serial
			var lines atomic.Bool // the read-cb disables after each line
			lines.Store(true)
			ran := make(chan struct{}, 1)
			var timers sync.WaitGroup
			rng := rand.New(rand.NewSource(9)) // the socket's callbacks only
			read := func(s *asynctcp.Socket, data []byte) {
				signal(ran, struct{}{})
				if lines.Load() {
					if bytes.HasSuffix(data, []byte("\n")) {
						s.Disable(asynctcp.EvRead)
					}
					s.WriteData(data)
					return
				}
				s.WriteData(data)
				if rng.Intn(4) == 0 {
					s.Disable(asynctcp.EvRead)
					timers.Add(1)
					time.AfterFunc(time.Duration(rng.Intn(2001))*time.Microsecond, func() {
						defer timers.Done()
						s.Enable(asynctcp.EvRead)
					})
				}
			}
			onConnect, accepted := pzAccepted(1)
			rec := newEventRecorder()
			srv, port := listenLocal(t, l, read, rec.cb, onConnect, asynctcp.TLS(scfg))
			raw := dialRaw(t, port)
			c := pzTLSClient(t, raw, ccfg)
			s := waitFor(t, accepted, "the accepted TLS socket")
			if err := pzEcho(c, []byte("hello\n")); err != nil {
				t.Fatal(err)
			}
			for round := 0; round < 5; round++ {
				msg := fmt.Sprintf("round %d\n", round)
				select {
				case <-ran:
				default:
				}
				if _, err := c.Write([]byte(msg)); err != nil {
					t.Fatalf("round %d: write: %v", round, err)
				}
				expectNone(t, ran, 50*time.Millisecond, fmt.Sprintf("round %d: a read-cb while reading is disabled", round))
				if err := s.Enable(asynctcp.EvRead); err != nil {
					t.Fatalf("round %d: Enable: %v", round, err)
				}
				if got, err := ftReadN(c, len(msg), waitTimeout); err != nil || string(got) != msg {
					t.Fatalf("round %d: echo %q, %v; want %q", round, got, err, msg)
				}
			}
			lines.Store(false)
			if err := s.Enable(asynctcp.EvRead); err != nil {
				t.Fatalf("Enable before the bulk echo: %v", err)
			}
			data := makePatternAt(0, size)
			c.SetDeadline(time.Now().Add(waitTimeout))
			sent := sendInRandomChunks(c, data, 11)
			stop := make(chan struct{})
			toggled := make(chan struct{})
			go func() { // toggles from outside too, always ending enabled
				defer close(toggled)
				for {
					select {
					case <-stop:
						return
					case <-time.After(time.Millisecond): // a pace, not a wait for an event
					}
					s.Disable(asynctcp.EvRead)
					s.Enable(asynctcp.EvRead)
				}
			}()
			r := waitFor(t, ftReadAsync(c, size, waitTimeout), "the bulk echo")
			close(stop)
			<-toggled
			if r.err != nil {
				t.Errorf("bulk echo: %d bytes, then %v", len(r.data), r.err)
			}
			ftCheckBytes(t, "the bulk echo", r.data, data)
			if err := waitFor(t, sent, "the sender"); err != nil {
				t.Errorf("sender: %v", err)
			}
			c.Close()
			wantClass(t, waitFor(t, rec.ch, "the client's end"), asynctcp.ErrTCPEOF, "the event after the client closed")
			srv.Close()
			waitLoopClean(t, l, waitTimeout)
			// Only once the loop has ended: a read-cb may add to the group
			// until then (its echo leaves before its toggle).
			waitGroup(t, &timers, "the timers' Enables")
		})
	}
}

// Disable from outside the callbacks, on idle sockets whose reader
// waits in a read: the socket's reading is disabled, so it has no reader
// ("a socket whose reading is disabled has no reader either, on every
// system: Enable starts one") and it does not see its peer's EOF until
// Enable. Plain TCP sockets on Linux are parked by then; wrapped and TLS
// sockets (and plain ones elsewhere) have a fresh reader blocked in a read
// with no deadline.
func TestPauseDisableFromOutsideIdleSocket(t *testing.T) {
	for _, kind := range []string{"tcp", "wrapped", "tls"} {
		t.Run(kind, func(t *testing.T) {
			const n = 20
			base := runtime.NumGoroutine()
			l := newTestLoop(t)
			rec := newEventRecorder()
			clients := make([]net.Conn, n)
			socks := make([]*asynctcp.Socket, n)
			var srv *asynctcp.Server // none for wrapped sockets
			switch kind {
			case "tcp", "tls":
				var opts []asynctcp.Option
				var ccfg *tls.Config
				if kind == "tls" {
					var scfg *tls.Config
					scfg, ccfg = tlsConfigs(t)
					opts = append(opts, asynctcp.TLS(scfg))
				}
				onConnect, accepted := pzAccepted(n)
				var port int
				srv, port = listenLocal(t, l, echoBack, rec.cb, append(opts, onConnect)...)
				for i := range clients {
					var c net.Conn = dialRaw(t, port)
					if kind == "tls" {
						c = pzTLSClient(t, c, ccfg)
					}
					clients[i] = c
					socks[i] = waitFor(t, accepted, "an accepted socket")
					pzEchoHello(t, c, i)
				}
			case "wrapped":
				ln, port := listenRaw(t)
				for i := range clients {
					clients[i] = dialRaw(t, port)
					conn := acceptRawKeepBuf(t, ln)
					s, err := l.Wrap(pzOpaqueConn{conn}, echoBack, rec.cb)
					if err != nil {
						t.Fatalf("Wrap: %v", err)
					}
					socks[i] = s
					pzEchoHello(t, clients[i], i)
				}
			}
			// Let the sockets go quiet: a few idle milliseconds after
			// their echo (four times their gap between reads, which the
			// echo right after the connect keeps short) their readers
			// park (Linux) or hand over to fresh ones.
			time.Sleep(150 * time.Millisecond)
			for i, s := range socks {
				if err := s.Disable(asynctcp.EvRead); err != nil {
					t.Fatalf("socket %d: Disable(EvRead): %v", i, err)
				}
			}
			deadline := time.Now().Add(time.Second)
			for runtime.NumGoroutine() > base+pzExtra && time.Now().Before(deadline) {
				time.Sleep(time.Millisecond)
			}
			if g := runtime.NumGoroutine(); g > base+pzExtra {
				t.Errorf("%d idle sockets disabled from outside their callbacks: %d goroutines after 1s, want at most %d (base %d)", n, g, base+pzExtra, base)
			}
			for _, c := range clients {
				c.Close()
			}
			select {
			case ev := <-rec.ch:
				time.Sleep(200 * time.Millisecond) // to count the others, not a wait for an event
				t.Errorf("%d of %d sockets got an event while their reading was disabled, the first: %v", rec.n.Load(), n, ev)
			case <-time.After(200 * time.Millisecond):
			}
			for i, s := range socks {
				if err := s.Enable(asynctcp.EvRead); err != nil && !s.Closed() {
					t.Errorf("socket %d: Enable(EvRead): %v", i, err)
				}
			}
			eventually(t, "an EOF event for every socket", func() bool { return rec.n.Load() == n })
			for _, s := range socks {
				pzDone(t, s, waitTimeout, "a socket after its EOF")
			}
			if srv != nil {
				srv.Close()
			}
			waitLoopClean(t, l, waitTimeout)
		})
	}
}

// A read timeout with NotifyTimeouts disables reading before its
// event: the reader ends there too. N sockets whose timeout fired keep no
// goroutine, read nothing of what their clients send, and echo it once
// enabled from outside their callbacks.
func TestPauseAfterNotifiedReadTimeout(t *testing.T) {
	const n = 50
	base := runtime.NumGoroutine()
	l := newTestLoop(t)
	ran := make(chan struct{}, 1)
	read := func(s *asynctcp.Socket, data []byte) {
		signal(ran, struct{}{})
		s.WriteData(data)
	}
	var timeouts atomic.Int32
	others := make(chan error, 1)
	event := func(err error) {
		if errors.Is(err, asynctcp.ErrTCPTimeout) {
			timeouts.Add(1)
			return
		}
		signal(others, err)
	}
	onConnect, accepted := pzAccepted(n)
	srv, port := listenLocal(t, l, read, event, onConnect,
		asynctcp.ReadTimeout(50*time.Millisecond), asynctcp.NotifyTimeouts())
	clients := make([]*net.TCPConn, n)
	socks := make([]*asynctcp.Socket, n)
	for i := range clients {
		clients[i] = dialRaw(t, port)
		socks[i] = waitFor(t, accepted, "an accepted socket")
		pzEchoHello(t, clients[i], i)
	}
	eventually(t, "a read timeout on every socket", func() bool { return timeouts.Load() >= n })
	pzGoroutinesAtMost(t, base+pzExtra, fmt.Sprintf("the readers of %d sockets whose read timeout fired to end", n))
	select {
	case <-ran:
	default:
	}
	for i, c := range clients {
		if _, err := c.Write([]byte(fmt.Sprintf("late %d\n", i))); err != nil {
			t.Fatalf("conn %d: write: %v", i, err)
		}
	}
	expectNone(t, ran, 150*time.Millisecond, "a read-cb after the read timeout disabled reading")
	if got := timeouts.Load(); got != n {
		t.Errorf("%d read timeouts, want %d: one each, none while reading is disabled", got, n)
	}
	for i, s := range socks {
		if err := s.Enable(asynctcp.EvRead); err != nil {
			t.Fatalf("socket %d: Enable(EvRead): %v", i, err)
		}
	}
	for i, c := range clients {
		want := fmt.Sprintf("late %d\n", i)
		if got, err := ftReadN(c, len(want), waitTimeout); err != nil || string(got) != want {
			t.Fatalf("conn %d: after Enable read %q, %v; want %q", i, got, err, want)
		}
	}
	select {
	case err := <-others:
		t.Errorf("unexpected event: %v", err)
	default:
	}
	srv.Close()
	l.Exit(nil)
	waitLoop(t, l, waitTimeout)
}
