package asynctcp_test

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"runtime"
	"sort"
	"sync"
	"testing"
	"time"

	"github.com/asynctcp/asynctcp"
)

// rlFuzzMax bounds the bytes one fuzz iteration echoes, so that an
// iteration stays well under 100 ms.
const rlFuzzMax = 256 << 10

// rlToggle is a Disable of one direction at a point of the stream, and the
// Enable that follows it.
type rlToggle struct {
	at       int             // the offset of the stream where it happens
	ev       asynctcp.Events // EvRead or EvWrite
	fromPeer bool            // from the peer's writer goroutine, outside callbacks; else from the read-cb
	hold     int             // 0: Enable at once, 1: after a yield, 2: after 200µs, 3: after 1ms
}

// rlFuzzPlan is what a fuzz input asks for: a payload, the peer's write
// sizes, how the echoing socket splits its WriteData calls, the peer's read
// buffer sizes (each list cycled through), the Disable/Enable toggles, and
// how the exchange ends.
type rlFuzzPlan struct {
	data       []byte
	reuse      bool // ReuseReadBuffer on the echoing socket
	closeByUs  bool // the socket closes once it echoed everything; else the peer shuts its write side
	smallRcv   bool // the peer's receive buffer is small (32 KiB), so that output queues
	peerWrites []int
	echoSplits []int
	peerReads  []int
	toggles    []rlToggle
}

// rlFuzzSize maps a byte to a size: 1 to 128, or 512 B to 64 KiB.
func rlFuzzSize(b byte) int {
	if b < 128 {
		return 1 + int(b)
	}
	return int(b-127) * 512
}

// rlDecodePlan turns a fuzz input into a plan. The same input always gives
// the same plan. The payload is repeated (each repetition altered, so that
// a misplaced chunk shows) up to rlFuzzMax bytes.
func rlDecodePlan(payload, ctl []byte) rlFuzzPlan {
	i := 0
	next := func() byte {
		if len(ctl) == 0 {
			return 0
		}
		b := ctl[i%len(ctl)] + byte(i/len(ctl))*31
		i++
		return b
	}
	var p rlFuzzPlan
	flags := next()
	p.reuse = flags&1 != 0
	p.closeByUs = flags&2 != 0
	p.smallRcv = flags&4 != 0
	reps := 1 + int(next())
	if len(payload) > 0 {
		n := min(len(payload)*reps, rlFuzzMax)
		p.data = make([]byte, n)
		for j := range p.data {
			p.data[j] = payload[j%len(payload)] ^ byte(j/len(payload))
		}
	}
	if len(p.data) == 0 {
		p.closeByUs = false // nothing to count to: the peer ends it
	}
	for j := 0; j < 8; j++ {
		p.peerWrites = append(p.peerWrites, rlFuzzSize(next()))
		p.echoSplits = append(p.echoSplits, rlFuzzSize(next()))
		p.peerReads = append(p.peerReads, rlFuzzSize(next()))
	}
	for n := int(next() % 8); n > 0; n-- {
		at := (int(next())<<8 | int(next())) * len(p.data) / 65536
		b := next()
		tg := rlToggle{at: at, ev: asynctcp.EvWrite, fromPeer: b&2 != 0, hold: int(b>>2) & 3}
		if b&1 != 0 {
			tg.ev = asynctcp.EvRead
		}
		p.toggles = append(p.toggles, tg)
	}
	return p
}

// rlCycle hands out the sizes of a list in turn.
type rlCycle struct {
	sizes []int
	i     int
}

func (c *rlCycle) next() int {
	n := c.sizes[c.i%len(c.sizes)]
	c.i++
	return n
}

// rlEnabler enables again what a toggle disabled, after its hold, on a
// goroutine of its own, so that neither a callback nor the peer waits.
type rlEnabler struct {
	ch   chan rlToggle
	done chan struct{}
	errs chan error
}

func rlNewEnabler(s func() *asynctcp.Socket) *rlEnabler {
	e := &rlEnabler{ch: make(chan rlToggle, 64), done: make(chan struct{}), errs: make(chan error, 64)}
	go func() {
		defer close(e.done)
		for tg := range e.ch {
			rlHold(tg.hold)
			if err := s().Enable(tg.ev); err != nil && !errors.Is(err, asynctcp.ErrSocketClosed) {
				signal(e.errs, fmt.Errorf("Enable(%v): %w", tg.ev, err))
			}
		}
	}()
	return e
}

func rlHold(h int) {
	switch h {
	case 1:
		runtime.Gosched()
	case 2:
		time.Sleep(200 * time.Microsecond)
	case 3:
		time.Sleep(time.Millisecond)
	}
}

// rlToggleAt disables tg's direction on s and has it enabled again:
// at once where hold is 0, else by the enabler.
func rlToggleAt(s *asynctcp.Socket, tg rlToggle, e *rlEnabler) error {
	if err := s.Disable(tg.ev); err != nil {
		if errors.Is(err, asynctcp.ErrSocketClosed) {
			return nil
		}
		return fmt.Errorf("Disable(%v): %w", tg.ev, err)
	}
	if tg.hold == 0 {
		if err := s.Enable(tg.ev); err != nil && !errors.Is(err, asynctcp.ErrSocketClosed) {
			return fmt.Errorf("Enable(%v): %w", tg.ev, err)
		}
		return nil
	}
	e.ch <- tg
	return nil
}

// rlEchoOnce runs one exchange of plan p: a raw peer writes p.data to an
// asynctcp socket in the plan's write sizes, the socket's read-cb echoes
// it in the plan's WriteData splits while the plan's toggles disable and
// enable reading and writing, and the peer reads the echo in the plan's
// read sizes until EOF. It returns what the peer read.
func rlEchoOnce(t *testing.T, p rlFuzzPlan) []byte {
	t.Helper()
	l := &asynctcp.Loop{}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("net.Listen: %v", err)
	}
	defer ln.Close()

	var mu sync.Mutex // guards sock until Connect returned
	var sock *asynctcp.Socket
	socket := func() *asynctcp.Socket {
		mu.Lock()
		defer mu.Unlock()
		return sock
	}
	en := rlNewEnabler(socket)
	fail := make(chan error, 16)

	splits := rlCycle{sizes: p.echoSplits}
	var received int   // touched only by the socket's callbacks
	var nextToggle int // likewise: the read-cb's next toggle
	var ourToggles []rlToggle
	var peerToggles []rlToggle
	for _, tg := range p.toggles {
		if tg.fromPeer {
			peerToggles = append(peerToggles, tg)
		} else {
			ourToggles = append(ourToggles, tg)
		}
	}
	rlSortToggles(ourToggles)
	rlSortToggles(peerToggles)
	read := func(s *asynctcp.Socket, data []byte) {
		for len(data) > 0 {
			n := min(splits.next(), len(data))
			if err := s.WriteData(data[:n]); err != nil {
				signal(fail, fmt.Errorf("echo WriteData at %d: %w", received, err))
				return
			}
			data = data[n:]
			received += n
		}
		for nextToggle < len(ourToggles) && ourToggles[nextToggle].at <= received {
			if err := rlToggleAt(s, ourToggles[nextToggle], en); err != nil {
				signal(fail, err)
			}
			nextToggle++
		}
		if p.closeByUs && received == len(p.data) {
			if err := s.Close(); err != nil {
				signal(fail, fmt.Errorf("Close in the read-cb: %w", err))
			}
		}
	}
	event := func(ev error) {
		if p.closeByUs || !errors.Is(ev, asynctcp.ErrTCPEOF) {
			signal(fail, fmt.Errorf("event %v", ev))
		}
	}
	var opts []asynctcp.Option
	if p.reuse {
		opts = append(opts, asynctcp.ReuseReadBuffer())
	}
	mu.Lock()
	sock, err = l.Connect("127.0.0.1", ln.Addr().(*net.TCPAddr).Port, read, event, opts...)
	mu.Unlock()
	if err != nil {
		t.Fatalf("Connect: %v", err)
	}
	ln.(*net.TCPListener).SetDeadline(time.Now().Add(waitTimeout))
	c, err := ln.Accept()
	if err != nil {
		l.Exit(err)
		l.Wait()
		t.Fatalf("accept: %v", err)
	}
	peer := c.(*net.TCPConn)
	defer peer.Close()
	if p.smallRcv {
		peer.SetReadBuffer(32 << 10) // smaller, and the kernel stalls a loopback sender on its persist timer
	}
	peer.SetDeadline(time.Now().Add(waitTimeout))

	wrote := make(chan error, 1)
	go func() {
		writes := rlCycle{sizes: p.peerWrites}
		next := 0
		for off := 0; off < len(p.data); {
			n := min(writes.next(), len(p.data)-off)
			if _, err := peer.Write(p.data[off : off+n]); err != nil {
				wrote <- fmt.Errorf("peer write at %d: %w", off, err)
				return
			}
			off += n
			for next < len(peerToggles) && peerToggles[next].at <= off {
				if err := rlToggleAt(socket(), peerToggles[next], en); err != nil {
					wrote <- err
					return
				}
				next++
			}
		}
		if !p.closeByUs {
			if err := peer.CloseWrite(); err != nil {
				wrote <- fmt.Errorf("peer CloseWrite: %w", err)
				return
			}
		}
		wrote <- nil
	}()
	got := make([]byte, 0, len(p.data))
	reads := rlCycle{sizes: p.peerReads}
	buf := make([]byte, 64<<10)
	var rerr error
	for {
		n, err := peer.Read(buf[:reads.next()])
		got = append(got, buf[:n]...)
		if err != nil {
			if err != io.EOF {
				rerr = fmt.Errorf("peer read after %d bytes: %w", len(got), err)
			}
			break
		}
	}
	werr := <-wrote // the peer's deadline bounds it
	// Wait first: a callback that hands the enabler a toggle has returned
	// by then (the enabler serves until its channel is closed).
	select {
	case <-goWait(l):
	case <-time.After(waitTimeout):
		l.Exit(errors.New("fuzz: Wait hung"))
		<-goWait(l)
		t.Fatalf("Loop.Wait did not return within %v after the exchange (plan %s)", waitTimeout, rlPlanSummary(p))
	}
	close(en.ch)
	select {
	case <-en.done:
	case <-time.After(waitTimeout):
		t.Fatal("the enabler did not finish")
	}
	for _, err := range []error{rerr, werr} {
		if err != nil {
			t.Errorf("%v (plan %s)", err, rlPlanSummary(p))
		}
	}
	for _, ch := range []chan error{fail, en.errs} {
		select {
		case err := <-ch:
			t.Errorf("%v (plan %s)", err, rlPlanSummary(p))
		default:
		}
	}
	return got
}

// rlSortToggles orders toggles by their offset, keeping the plan's order
// among equal ones.
func rlSortToggles(tgs []rlToggle) {
	sort.SliceStable(tgs, func(i, j int) bool { return tgs[i].at < tgs[j].at })
}

func rlPlanSummary(p rlFuzzPlan) string {
	return fmt.Sprintf("{%d bytes, reuse %v, closeByUs %v, smallRcv %v, writes %v, splits %v, reads %v, toggles %+v}",
		len(p.data), p.reuse, p.closeByUs, p.smallRcv, p.peerWrites, p.echoSplits, p.peerReads, p.toggles)
}

// FuzzEchoIntegrity: whatever the payload, the peer's write sizes, the
// socket's WriteData splits, the Disable/Enable toggles of either
// direction (from the read-cb or from another goroutine, released at once
// or a little later), the peer's read sizes, ReuseReadBuffer, and whether
// the socket closes itself once it echoed everything or the peer shuts
// its write side: the bytes the peer reads back are the bytes it sent,
// and nothing more (rules 2, 3, 5, 10, 11).
//
// The seeds below run in every go test; go test -fuzz FuzzEchoIntegrity
// explores further.
func FuzzEchoIntegrity(f *testing.F) {
	f.Add([]byte(""), []byte(""))
	f.Add([]byte("x"), []byte{0})
	f.Add([]byte("hello, world"), []byte{2, 0, 1, 2, 3})
	f.Add(pattern(1000), []byte{1, 255, 200, 3, 7, 150, 0, 1, 2})
	f.Add(pattern(4096), []byte{5, 63, 0, 255, 1, 128, 129, 130, 7, 0, 40, 0x0d, 128, 0, 0x0e, 200, 0, 0x0f})
	f.Add(pattern(257), []byte{6, 255, 250, 10, 0, 7, 255, 255, 0x03, 128, 0, 0x01, 64, 0, 0x0c})
	f.Add(pattern(65536), []byte{7, 3, 255, 0, 255, 0, 255, 0, 4, 20, 0, 0x05, 60, 0, 0x06, 120, 0, 0x0b, 240, 0, 0x0a})
	f.Add(bytes.Repeat([]byte{0xAA}, 100), []byte{3, 100, 17, 31, 1, 0})
	f.Fuzz(func(t *testing.T, payload, ctl []byte) {
		p := rlDecodePlan(payload, ctl)
		got := rlEchoOnce(t, p)
		if !bytes.Equal(got, p.data) {
			t.Fatalf("the peer read %d bytes back, sent %d; first difference at %d (plan %s)",
				len(got), len(p.data), firstDiff(got, p.data), rlPlanSummary(p))
		}
	})
}
