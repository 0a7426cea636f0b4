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
	"testing"
	"time"

	"github.com/asynctcp/asynctcp"
)

// Parking with a read timeout (Linux): an idle socket whose read timeout
// runs parks too, and its timeout behaves as on a reader blocked in a read
// with a deadline: it fires d after the last input while reading is
// enabled, notifies with NotifyTimeouts, follows SetTimeouts, Disable and
// Enable at once, and dies with the socket.
//
// Only TestReadTimeoutSocketsPark observes the parking itself (through
// runtime.NumGoroutine, as park_linux_test.go does). The other tests let a
// socket go idle for ptIdle before they act on it, which is long enough
// for it to park where it can (an idle wait of 10 to 40 ms after one
// quick input), and check the timeout's behaviour alone.

// ptIdle is how long the tests leave a socket idle so that it parks: four
// times its usual gap between reads (within 10 ms and 1 s) is what an
// idle socket waits before parking, and a socket that got one input right
// after its accept has a gap of a few milliseconds.
const ptIdle = 80 * time.Millisecond

// ptEvent is an event of a socket and when its event-cb got it.
type ptEvent struct {
	err error
	at  time.Time
}

func (e ptEvent) String() string {
	return fmt.Sprintf("%v (at %s)", e.err, e.at.Format("15:04:05.000"))
}

// ptLog records, per socket, the events and the close-cbs.
type ptLog struct {
	mu     sync.Mutex
	events map[*asynctcp.Socket][]ptEvent
	chans  map[*asynctcp.Socket]chan ptEvent
	closes map[*asynctcp.Socket][]error
	nev    atomic.Int32
	nclose atomic.Int32
}

func newPtLog() *ptLog {
	return &ptLog{
		events: make(map[*asynctcp.Socket][]ptEvent),
		chans:  make(map[*asynctcp.Socket]chan ptEvent),
		closes: make(map[*asynctcp.Socket][]error),
	}
}

// chanLocked returns the channel of s's events. mu is held.
func (p *ptLog) chanLocked(s *asynctcp.Socket) chan ptEvent {
	ch := p.chans[s]
	if ch == nil {
		ch = make(chan ptEvent, 16)
		p.chans[s] = ch
	}
	return ch
}

// event is the event-cb.
func (p *ptLog) event(err error) {
	e := ptEvent{err, time.Now()}
	s := asynctcp.SocketOf(err)
	p.mu.Lock()
	p.events[s] = append(p.events[s], e)
	ch := p.chanLocked(s)
	p.mu.Unlock()
	p.nev.Add(1)
	signal(ch, e)
}

// onClose is the close-cb option.
func (p *ptLog) onClose() asynctcp.Option {
	return asynctcp.OnClose(func(s *asynctcp.Socket, err error) {
		p.mu.Lock()
		p.closes[s] = append(p.closes[s], err)
		p.mu.Unlock()
		p.nclose.Add(1)
	})
}

// of returns the channel of s's events.
func (p *ptLog) of(s *asynctcp.Socket) <-chan ptEvent {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.chanLocked(s)
}

// eventsOf returns s's events so far.
func (p *ptLog) eventsOf(s *asynctcp.Socket) []ptEvent {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]ptEvent(nil), p.events[s]...)
}

// closesOf returns the errors s's close-cb got so far, one per run.
func (p *ptLog) closesOf(s *asynctcp.Socket) []error {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]error(nil), p.closes[s]...)
}

// wantClosedOnce fails the test unless s's close-cb ran exactly once, with
// want (nil where the application closed s).
func (p *ptLog) wantClosedOnce(t *testing.T, s *asynctcp.Socket, want error, what string) {
	t.Helper()
	errs := p.closesOf(s)
	if len(errs) != 1 {
		t.Errorf("%s: close-cb ran %d times, want once", what, len(errs))
		return
	}
	if errs[0] != want {
		t.Errorf("%s: close-cb got %v, want %v", what, errs[0], want)
	}
}

// ptWithin fails the test unless elapsed, measured from a moment at or
// before the timeout's clock started, lies in [0.9*d, d+beSlack].
func ptWithin(t *testing.T, elapsed, d time.Duration, what string) {
	t.Helper()
	if elapsed < d*9/10 || elapsed > d+beSlack {
		t.Errorf("%s fired after %v, want between %v and %v", what, elapsed, d*9/10, d+beSlack)
	}
}

// wantTimeout waits for s's next event and fails the test unless it is a
// read timeout (Dir EvRead) that fired d after since (ptWithin).
func (p *ptLog) wantTimeout(t *testing.T, s *asynctcp.Socket, since time.Time, d time.Duration, what string) ptEvent {
	t.Helper()
	e := waitFor(t, p.of(s), what)
	ptTimeout(t, e, s, asynctcp.EvRead, what)
	ptWithin(t, e.at.Sub(since), d, what)
	return e
}

// ptNoEvent fails the test if ch holds an event now.
func ptNoEvent(t *testing.T, ch <-chan ptEvent, what string) {
	t.Helper()
	select {
	case e := <-ch:
		t.Errorf("%s: got %v", what, e.err)
	default:
	}
}

// ptTimeout fails the test unless e is an ErrTCPTimeout event of s with
// Dir dir.
func ptTimeout(t *testing.T, e ptEvent, s *asynctcp.Socket, dir asynctcp.Events, what string) {
	t.Helper()
	ev := wantClass(t, e.err, asynctcp.ErrTCPTimeout, what)
	if ev.Socket != s {
		t.Errorf("%s: event of socket %p, want %p", what, ev.Socket, s)
	}
	if ev.Dir != dir {
		t.Errorf("%s: event Dir %v, want %v", what, ev.Dir, dir)
	}
}

// Many idle sockets with a read timeout park; they echo when written to,
// and then their timeouts fire on time, once each, and end them.
func TestReadTimeoutSocketsPark(t *testing.T) {
	for _, serial := range []bool{false, true} {
		t.Run(fmt.Sprintf("serial %v", serial), func(t *testing.T) {
			const (
				n = 200
				d = time.Second
			)
			base := runtime.NumGoroutine()
			l := newTestLoop(t)
			l.Serial = serial
			lg := newPtLog()
			start := time.Now() // before any socket's clock starts
			srv, clients, socks := pkIdleConns(t, l, n, lg.event, asynctcp.ReadTimeout(d), lg.onClose())
			setup := time.Since(start)

			// The parking must show before any timeout can fire: sockets
			// that time out end their readers too, and would pass for
			// parked ones.
			deadline := start.Add(d * 8 / 10)
			for runtime.NumGoroutine() > base+10 {
				if time.Now().After(deadline) {
					t.Fatalf("the %d idle sockets with a read timeout of %v did not park: %d goroutines %v after the setup began (it took %v), want <= %d (base %d + 10)",
						n, d, runtime.NumGoroutine(), time.Since(start).Round(time.Millisecond), setup.Round(time.Millisecond), base+10, base)
				}
				time.Sleep(time.Millisecond)
			}
			if k := lg.nev.Load(); k != 0 {
				t.Fatalf("%d events before the sockets were seen parked (after %v): the count fell because sockets ended", k, time.Since(start))
			}

			// Parked, each still echoes; this is its last input.
			last := make([]time.Time, n)
			for i, c := range clients {
				last[i] = time.Now()
				pkEcho(t, c, fmt.Sprintf("again %d", i))
			}

			// Then each times out, once, d after that input, and ends.
			eventually(t, fmt.Sprintf("the close-cb of all %d sockets after their read timeouts", n), func() bool {
				return lg.nclose.Load() == n
			})
			for i, s := range socks {
				if t.Failed() {
					t.Fatalf("stopping at socket %d of %d", i, n)
				}
				evs := lg.eventsOf(s)
				if len(evs) != 1 {
					t.Errorf("socket %d: %d events, want one read timeout (%v)", i, len(evs), evs)
					continue
				}
				what := fmt.Sprintf("socket %d's read timeout", i)
				ptTimeout(t, evs[0], s, asynctcp.EvRead, what)
				ptWithin(t, evs[0].at.Sub(last[i]), d, what+" after its last input")
				lg.wantClosedOnce(t, s, evs[0].err, fmt.Sprintf("socket %d", i))
			}
			for _, c := range clients {
				bePeerClosed(t, c)
			}
			srv.Close()
			waitLoop(t, l, waitTimeout)
		})
	}
}

// The clock restarts on each input, while the socket parks and wakes up
// between inputs: a client that sends a burst of messages every ~d/3 for
// over 3d never times out, and once it stops the timeout fires d after its
// last message. The bursts of quick round trips keep the socket's usual gap
// short, so that its idle wait (four times that gap) ends within each
// pause: it parks in each.
func TestReadTimeoutRestartsAcrossParking(t *testing.T) {
	const (
		d     = 300 * time.Millisecond
		pause = d / 3
		burst = 12
		run   = time.Second
	)
	l := newTestLoop(t)
	lg := newPtLog()
	srv, clients, socks := pkIdleConns(t, l, 1, lg.event, asynctcp.ReadTimeout(d), lg.onClose())
	c, s := clients[0], socks[0]
	var last time.Time
	begin := time.Now()
	for k := 0; time.Since(begin) < run; k++ {
		// The client's pace: the pause is the idle time in which the
		// socket parks, not a wait for anything.
		time.Sleep(pause)
		select {
		case e := <-lg.of(s):
			t.Fatalf("after %v of a client sending every %v: %v, %v after its last message; want no timeout while it sends",
				time.Since(begin), pause, e.err, e.at.Sub(last))
		default:
		}
		for j := 0; j < burst; j++ {
			last = time.Now()
			pkEcho(t, c, fmt.Sprintf("burst %d, message %d", k, j))
		}
	}
	e := lg.wantTimeout(t, s, last, d, "the read timeout after the client's last message")
	bePeerClosed(t, c)
	srv.Close()
	waitLoop(t, l, waitTimeout)
	lg.wantClosedOnce(t, s, e.err, "the socket")
	if evs := lg.eventsOf(s); len(evs) != 1 {
		t.Errorf("%d events, want the one read timeout (%v)", len(evs), evs)
	}
}

// NotifyTimeouts on a parked socket: the timeout notifies (Dir EvRead),
// reading stops and the socket stays open; input sent then waits for
// Enable, which delivers it and starts the clock again.
func TestReadTimeoutNotifiesParkedSocket(t *testing.T) {
	for _, serial := range []bool{false, true} {
		t.Run(fmt.Sprintf("serial %v", serial), func(t *testing.T) {
			const d = 200 * time.Millisecond
			l := newTestLoop(t)
			l.Serial = serial
			lg := newPtLog()
			begin := time.Now()
			srv, clients, socks := pkIdleConns(t, l, 1, lg.event, asynctcp.ReadTimeout(d), asynctcp.NotifyTimeouts(), lg.onClose())
			c, s := clients[0], socks[0]

			lg.wantTimeout(t, s, begin, d, "the first read timeout after the socket's only input")
			if s.Closed() {
				t.Fatal("the socket is closed after a notified read timeout")
			}

			// Reading is disabled: the input waits.
			if _, err := c.Write([]byte("held")); err != nil {
				t.Fatalf("write while reading is disabled: %v", err)
			}
			c.SetReadDeadline(time.Now().Add(150 * time.Millisecond))
			if n, err := c.Read(make([]byte, 4)); n != 0 {
				t.Fatalf("the socket echoed %d bytes (%v) with reading disabled by its timeout", n, err)
			}
			ptNoEvent(t, lg.of(s), "an event while reading is disabled")

			enabled := time.Now()
			if err := s.Enable(asynctcp.EvRead); err != nil {
				t.Fatalf("Enable(EvRead): %v", err)
			}
			c.SetReadDeadline(time.Now().Add(waitTimeout))
			got := make([]byte, 4)
			if _, err := io.ReadFull(c, got); err != nil || string(got) != "held" {
				t.Fatalf("after Enable: read %q, %v; want \"held\"", got, err)
			}
			c.SetReadDeadline(time.Time{})

			lg.wantTimeout(t, s, enabled, d, "the read timeout after Enable")

			// Still open: it echoes once enabled again, then closes.
			if err := s.Enable(asynctcp.EvRead); err != nil {
				t.Fatalf("Enable(EvRead) after the second timeout: %v", err)
			}
			pkEcho(t, c, "still open")
			if err := s.Close(); err != nil {
				t.Fatalf("Close: %v", err)
			}
			bePeerClosed(t, c)
			srv.Close()
			waitLoop(t, l, waitTimeout)
			lg.wantClosedOnce(t, s, nil, "the socket")
			if evs := lg.eventsOf(s); len(evs) != 2 {
				t.Errorf("%d events, want the two read timeouts (%v)", len(evs), evs)
			}
		})
	}
}

// SetTimeouts on parked sockets takes effect at once: lifting the read
// timeout, shortening it, lengthening it.
func TestSetTimeoutsOnParkedSocket(t *testing.T) {
	const (
		short = 200 * time.Millisecond
		long  = 1500 * time.Millisecond
	)
	l := newTestLoop(t)
	lg := newPtLog()
	conn := func(d time.Duration) (*asynctcp.Server, *net.TCPConn, *asynctcp.Socket) {
		srv, clients, socks := pkIdleConns(t, l, 1, lg.event, asynctcp.ReadTimeout(d), lg.onClose())
		return srv, clients[0], socks[0]
	}
	srvA, cA, sA := conn(300 * time.Millisecond) // lifted
	srvB, cB, sB := conn(10 * time.Second)       // shortened
	srvC, cC, sC := conn(200 * time.Millisecond) // lengthened
	// Idle, so that they park; within the first timeouts.
	time.Sleep(ptIdle)
	set := time.Now()
	for _, x := range []struct {
		s    *asynctcp.Socket
		read time.Duration
	}{{sA, 0}, {sB, short}, {sC, long}} {
		if err := x.s.SetTimeouts(x.read, 0); err != nil {
			t.Fatalf("SetTimeouts(%v, 0): %v", x.read, err)
		}
	}

	// (b) fires short after the call.
	lg.wantTimeout(t, sB, set, short, "the shortened read timeout after SetTimeouts")

	// Up to 1s after the call: nothing from (a) nor (c).
	expectNone(t, lg.of(sC), time.Until(set.Add(time.Second)), "the lengthened read timeout within 1s of SetTimeouts(1.5s)")
	ptNoEvent(t, lg.of(sA), "the lifted read timeout, within 1s")
	pkEcho(t, cA, "no timeout")

	// (c) fires long after the call.
	lg.wantTimeout(t, sC, set, long, "the lengthened read timeout after SetTimeouts")

	// (a) still nothing, and it echoes.
	ptNoEvent(t, lg.of(sA), "the lifted read timeout, within 1.5s")
	pkEcho(t, cA, "still no timeout")
	if err := sA.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	for _, c := range []*net.TCPConn{cA, cB, cC} {
		bePeerClosed(t, c)
	}
	srvA.Close()
	srvB.Close()
	srvC.Close()
	waitLoop(t, l, waitTimeout)
	lg.wantClosedOnce(t, sA, nil, "the socket whose timeout was lifted")
	lg.wantClosedOnce(t, sB, lg.eventsOf(sB)[0].err, "the socket whose timeout was shortened")
	lg.wantClosedOnce(t, sC, lg.eventsOf(sC)[0].err, "the socket whose timeout was lengthened")
	for _, s := range []*asynctcp.Socket{sA, sB, sC} {
		if k := len(lg.eventsOf(s)); k > 1 {
			t.Errorf("socket %p: %d events, want at most one", s, k)
		}
	}
}

// Disable(EvRead) on a parked socket stops its read clock; Enable starts
// it from the Enable.
func TestDisableStopsParkedReadTimeout(t *testing.T) {
	for _, serial := range []bool{false, true} {
		t.Run(fmt.Sprintf("serial %v", serial), func(t *testing.T) {
			const d = 150 * time.Millisecond
			l := newTestLoop(t)
			l.Serial = serial
			lg := newPtLog()
			srv, clients, socks := pkIdleConns(t, l, 1, lg.event, asynctcp.ReadTimeout(d), lg.onClose())
			c, s := clients[0], socks[0]
			time.Sleep(ptIdle) // idle, so that it parks; within d
			if err := s.Disable(asynctcp.EvRead); err != nil {
				t.Fatalf("Disable(EvRead): %v", err)
			}
			expectNone(t, lg.of(s), 3*d, "a read timeout while reading is disabled")
			enabled := time.Now()
			if err := s.Enable(asynctcp.EvRead); err != nil {
				t.Fatalf("Enable(EvRead): %v", err)
			}
			e := lg.wantTimeout(t, s, enabled, d, "the read timeout after Enable")
			bePeerClosed(t, c)
			srv.Close()
			waitLoop(t, l, waitTimeout)
			lg.wantClosedOnce(t, s, e.err, "the socket")
			if evs := lg.eventsOf(s); len(evs) != 1 {
				t.Errorf("%d events, want the one read timeout (%v)", len(evs), evs)
			}
		})
	}
}

// Close and Abort end parked sockets whose read timeouts are pending: no
// timeout comes after, each close-cb runs once; Exit ends a third one with
// no callback at all, and the loop ends.
func TestCloseParkedSocketWithReadTimeout(t *testing.T) {
	for _, serial := range []bool{false, true} {
		t.Run(fmt.Sprintf("serial %v", serial), func(t *testing.T) {
			const d = 250 * time.Millisecond
			l := newTestLoop(t)
			l.Serial = serial
			lg := newPtLog()
			srv, clients, socks := pkIdleConns(t, l, 3, lg.event, asynctcp.ReadTimeout(d), lg.onClose())
			time.Sleep(ptIdle) // idle, so that they park; within d
			if err := socks[0].Close(); err != nil {
				t.Fatalf("Close: %v", err)
			}
			if err := socks[1].Abort(); err != nil {
				t.Fatalf("Abort: %v", err)
			}
			bePeerClosed(t, clients[0])
			bePeerClosed(t, clients[1])
			eventually(t, "the close-cbs of the closed and the aborted socket", func() bool { return lg.nclose.Load() == 2 })
			srv.Close()
			l.Exit(nil) // the third, parked with its timeout pending
			if err := waitLoop(t, l, waitTimeout); err != nil {
				t.Errorf("Loop.Wait = %v, want nil", err)
			}
			bePeerClosed(t, clients[2])
			// The pending timeouts would have fired within d.
			quiet := time.Now().Add(2 * d)
			for i, s := range socks {
				expectNone(t, lg.of(s), time.Until(quiet), fmt.Sprintf("socket %d: an event after it was closed", i))
			}
			lg.wantClosedOnce(t, socks[0], nil, "the closed socket")
			lg.wantClosedOnce(t, socks[1], nil, "the aborted socket")
			if errs := lg.closesOf(socks[2]); len(errs) != 0 {
				t.Errorf("the socket that Exit ended: close-cb ran %d times, want never", len(errs))
			}
			if k := lg.nev.Load(); k != 0 {
				t.Errorf("%d events, want none", k)
			}
		})
	}
}

// A storm over parking sockets with read timeouts: random timeouts, half
// of them notifying, clients with random pauses, and another goroutine
// setting timeouts, disabling and enabling reading at random, then closing
// everything. Every echo is exact, every event a read timeout, every
// close-cb runs once and after the socket's events, and the loop ends.
func TestReadTimeoutParkingStorm(t *testing.T) {
	for _, serial := range []bool{false, true} {
		t.Run(fmt.Sprintf("serial %v", serial), func(t *testing.T) {
			const (
				n     = 30
				storm = 700 * time.Millisecond
			)
			l := newTestLoop(t)
			l.Serial = serial
			lg := newPtLog()
			var mu sync.Mutex
			notifying := make(map[*asynctcp.Socket]bool)
			var reenable atomic.Int32
			event := func(err error) {
				lg.event(err)
				s := asynctcp.SocketOf(err)
				var ev *asynctcp.Event
				if !errors.As(err, &ev) {
					t.Errorf("event %T (%v), want an *asynctcp.Event", err, err)
					return
				}
				if ev.Class != asynctcp.ErrTCPTimeout || ev.Dir != asynctcp.EvRead {
					t.Errorf("event %v (class %v, Dir %v), want a read timeout", err, ev.Class, ev.Dir)
				}
				if k := len(lg.closesOf(s)); k != 0 {
					t.Errorf("event %v after the socket's close-cb", err)
				}
				mu.Lock()
				notify := notifying[s]
				mu.Unlock()
				if notify && reenable.Add(1)%2 == 0 {
					s.Enable(asynctcp.EvRead) // from inside the event-cb: it holds
				}
			}
			// Half the sockets notify. The first timeout is long, so that
			// none fires while the clients connect.
			srvN, clientsN, socksN := pkIdleConns(t, l, n/2, event, asynctcp.ReadTimeout(time.Second), asynctcp.NotifyTimeouts(), lg.onClose())
			srvA, clientsA, socksA := pkIdleConns(t, l, n/2, event, asynctcp.ReadTimeout(time.Second), lg.onClose())
			clients := append(clientsN, clientsA...)
			socks := append(socksN, socksA...)
			mu.Lock()
			for _, s := range socksN {
				notifying[s] = true
			}
			mu.Unlock()
			rng := rand.New(rand.NewSource(7))
			randTimeout := func() time.Duration { return time.Duration(50+rng.Intn(351)) * time.Millisecond }
			for _, s := range socks {
				if err := s.SetTimeouts(randTimeout(), 0); err != nil {
					t.Fatalf("SetTimeouts: %v", err)
				}
			}

			var wg sync.WaitGroup
			stop := make(chan struct{})
			var echoes atomic.Int32
			for i, c := range clients {
				wg.Add(1)
				go func() {
					defer wg.Done()
					rng := rand.New(rand.NewSource(int64(i)))
					buf := make([]byte, 64)
					for k := 0; ; k++ {
						select { // the client's pace, not a wait for anything
						case <-stop:
							return
						case <-time.After(time.Duration(rng.Intn(151)) * time.Millisecond):
						}
						msg := []byte(fmt.Sprintf("%d:%d", i, k))
						c.SetDeadline(time.Now().Add(waitTimeout))
						if _, err := c.Write(msg); err != nil {
							return // ended by a timeout or the storm
						}
						got := buf[:len(msg)]
						if _, err := io.ReadFull(c, got); err != nil {
							return // ended by a timeout or the storm
						}
						if string(got) != string(msg) {
							t.Errorf("conn %d: echo %q, want %q", i, got, msg)
							return
						}
						echoes.Add(1)
					}
				}()
			}
			deadline := time.Now().Add(storm)
			for time.Now().Before(deadline) {
				s := socks[rng.Intn(n)]
				switch rng.Intn(5) {
				case 0, 1:
					s.SetTimeouts(randTimeout(), 0)
				case 2:
					s.SetTimeouts(0, 0)
				case 3:
					s.Disable(asynctcp.EvRead)
				case 4:
					s.Enable(asynctcp.EvRead)
				}
				time.Sleep(4 * time.Millisecond) // a pace for the storm, not a wait for an event
			}
			closeHalfAbortHalf(socks)
			close(stop)
			for _, c := range clients {
				c.Close()
			}
			waitGroup(t, &wg, "the storm's clients")
			srvN.Close()
			srvA.Close()
			waitLoop(t, l, waitTimeout)
			t.Logf("%d echoes, %d events", echoes.Load(), lg.nev.Load())
			for i, s := range socks {
				if k := len(lg.closesOf(s)); k != 1 {
					t.Errorf("socket %d: close-cb ran %d times, want once", i, k)
				}
				if k := len(lg.eventsOf(s)); k > 1 && i >= n/2 {
					t.Errorf("socket %d, without NotifyTimeouts: %d events, want at most one", i, k)
				}
			}
		})
	}
}
