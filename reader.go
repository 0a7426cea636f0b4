package asynctcp

import (
	"net"
	"sync"
	"time"
)

// The reader: one goroutine at a time reads the conn, hands each chunk to
// the read-cb (or to the input buffer in stream mode) before it reads
// again, so that a slow callback slows the peer, not memory.

// readBufSize is the most one read takes from the connection: 32 KiB, as
// net's own echo loops read. 64 KiB reads measured slower in bulk echo
// (0.81 of net's throughput against 1.00 with ReuseReadBuffer): their
// copies fall out of the cache.
const readBufSize = 32 << 10

// A reader that has run callbacks gives up its goroutine once the socket
// has been idle for longer than usual. Callbacks grow the reader's stack,
// and the runtime never shrinks a stack below 4 KiB under a parked
// goroutine. On Linux the socket parks (park): no goroutine at all until
// its descriptor is readable. Elsewhere, or where it cannot park, a fresh
// reader takes over on a 2 KiB stack. The wait is four times the socket's
// usual gap between reads (hopWaitLocked), within [minHop, idleHop]: a
// socket that answered a request and went quiet lets go within
// milliseconds, so a burst of new connections leaves no grown stacks
// behind (their freed memory would stay with the process); a busy socket,
// whose gaps are short but steady, does not pay for a new goroutine per
// message. The bound is high enough for ping-pong over 10,000 connections,
// whose round trips take 100-200 ms: with 250 ms, the slowest round trips
// parked their sockets and waking them up stretched the tail (p99 198 ms
// against 143 ms with 1 s, bench/ pp10k, 2 runs each).
const (
	minHop  = 10 * time.Millisecond
	idleHop = time.Second
)

// settleTime bounds how long a read failure waits for the write in flight.
const settleTime = 100 * time.Millisecond

// What the reader does after a read error.
const (
	readAgain = iota // read again
	readStop         // the reader is done
	readHop          // a fresh reader takes over (hopWaitLocked)
)

// readLoop is the first reader. It runs the connect-cb first (queued by
// attachLocked), unless a dispatcher runs the queue already; in stream
// mode no callback runs on the reader.
func (s *Socket) readLoop() error {
	s.runQueue(!s.streaming)
	return s.reads(s.connectCb != nil)
}

// hop is the reader that takes over from an idle one (hopWaitLocked).
func (s *Socket) hop() error { return s.reads(false) }

// reads is the reader's loop; worked tells whether this goroutine has run
// callbacks yet.
//
// On the descriptor path a read that empties the kernel's queue (it
// returns at most half of what it asked for) is handed on from inside the
// descriptor's read (next), and the reader then waits for readiness
// there, without the read that would only find nothing: one read and one
// write per echo, as an event loop makes. So the socket holds the conn's
// read side while such a read-cb runs (Conn says what that rules out).
// Inside the descriptor's read the reader waits for nothing but the
// read-cb itself: input that could not be passed on at once (reading
// disabled, the callback queue another goroutine's, a Serial loop's
// callback lock taken) is held, and passed on by the loop below, after
// the descriptor's read has returned; and so is a turn that would wait
// (beforeRead).
func (s *Socket) reads(worked bool) error {
	input := false   // the last read brought bytes: the read timeout starts afresh
	stopped := false // the socket no longer reads: the reader ends
	var held chunk   // input next could not pass on without waiting
	var turn readTurn
	// took hands on the n bytes read into buf, waiting where wait is set
	// (and where it is not, holding what would have to wait).
	took := func(buf *[]byte, n int, wait bool) handed {
		turn.grant.settle(n)
		s.bytesRead.Add(int64(n))
		worked = true
		if turn.discard {
			putBuf(buf)
			return passedOn
		}
		c := s.chunkOf(buf, n)
		h := s.received(c, wait)
		if h == heldBack {
			held = c
		}
		return h
	}
	var next func(buf *[]byte, n int) (int, bool)
	if s.raw != nil {
		// next takes a read that emptied the kernel's queue and grants the
		// next read without waiting; false hands the turn back to the loop
		// below, which passes on what is held, waits where it must, or
		// ends.
		next = func(buf *[]byte, n int) (int, bool) {
			input = true
			switch took(buf, n, false) {
			case readEnded:
				stopped = true
				return 0, false
			case heldBack:
				return 0, false
			}
			t, ok := s.beforeRead(worked, true, false)
			turn = t // on false, no grant: nothing to settle below
			return t.room, ok
		}
	}
	for {
		if held.b != nil {
			c := held
			held = chunk{}
			if s.received(c, true) == readEnded {
				return nil
			}
		}
		var ok bool
		if turn, ok = s.beforeRead(worked, input, true); !ok {
			return nil
		}
		var buf *[]byte
		var n int
		var err error
		if s.raw != nil { // no buffer held while waiting
			buf, n, err = s.raw.readSome(turn.room, next)
			if stopped {
				return nil
			}
			if buf == nil && err == nil {
				continue // next handed the turn back
			}
		} else {
			buf, n, err = readConn(s.conn, turn.room)
		}
		input = n > 0
		if !input {
			turn.grant.settle(0)
		} else if took(buf, n, true) == readEnded {
			return nil
		}
		if err == nil {
			continue
		}
		switch s.readFailed(err, turn.gen) {
		case readAgain:
			continue
		case readHop:
			if !s.park() {
				s.grp.Go(s.hop)
			}
		}
		return nil
	}
}

// park ends the reader of an idle socket with no successor: the socket's
// descriptor waits in the loop's parking set, whose parker starts a fresh
// reader once it is readable (park_linux.go), and a read timeout that runs
// waits on the socket's read timer. It reports false where the socket
// cannot park (a conn with no descriptor, no parking on this system, a
// read timeout already passed, the socket closing): the caller hops
// instead, and the fresh reader finds the timeout passed or the socket
// closed.
func (s *Socket) park() bool {
	if s.raw == nil {
		return false
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.readerWorkLocked() || s.readClockPassedLocked() || s.loop.park.addLocked(s) != nil {
		return false
	}
	s.reader = readerParked
	if s.rclock != 0 {
		s.armReadTimerLocked()
	}
	return true
}

// readClockPassedLocked reports whether the read clock (rclock: the read
// timeout, or a lingering close's bound) has run out. mu is held.
func (s *Socket) readClockPassedLocked() bool { return s.rclock != 0 && s.rclock <= monotime() }

// armReadTimerLocked sets the read timer of a parked socket to when its
// read timeout passes. mu is held.
func (s *Socket) armReadTimerLocked() {
	d := s.rclock - monotime()
	if s.rtimer == nil {
		s.rtimer = time.AfterFunc(d, s.readTimerFired)
		return
	}
	s.rtimer.Reset(d)
}

// readTimerFired runs when the read timeout of a parked socket may have
// passed: a fresh reader takes over, and its read fails at once with the
// passed deadline (armReaderLocked), which is the timeout's event.
func (s *Socket) readTimerFired() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.reader != readerParked || s.rclock == 0 {
		return // woken, closed, or the timeout lifted since
	}
	if left := s.rclock - monotime(); left > 0 {
		s.rtimer.Reset(left) // fired early, or moved since
		return
	}
	s.takeOverLocked()
}

// resumeLocked starts a reader for a paused socket whose reading was
// enabled again, or which drains its input now (a graceful close). mu is
// held.
func (s *Socket) resumeLocked() {
	if s.reader == readerPaused && s.readerWorkLocked() {
		s.reader = readerRuns
		s.grp.Go(s.hop)
	}
}

// pauseLocked makes a reader blocked in a read return once reading is
// disabled, so that it pauses (beforeRead) instead of reading on: a
// deadline in the past (rdlWake), which the reader's next arm replaces. A
// parked socket stays parked: the reader its descriptor brings pauses. mu
// is held.
func (s *Socket) pauseLocked() {
	if s.reader == readerRuns && s.readOpenLocked() {
		s.setReadDeadlineLocked(rdlWake, aLongTimeAgo)
	}
}

// unparked is the parker's call for a parked socket whose descriptor
// became readable: a fresh reader takes over.
func (s *Socket) unparked() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.takeOverLocked()
}

// takeOverLocked takes a parked socket out of the parking set and starts
// a fresh reader, where it is parked and still reads. mu is held.
func (s *Socket) takeOverLocked() {
	if s.unparkLocked() && s.readerWorkLocked() {
		s.grp.Go(s.hop)
	}
}

// unparkLocked takes a parked socket out of its loop's parking set, and
// reports whether it was parked: the caller starts a reader where one is
// needed. mu is held.
func (s *Socket) unparkLocked() bool {
	if s.reader != readerParked {
		return false
	}
	s.reader = readerRuns
	s.loop.park.removeLocked(s)
	if s.rtimer != nil {
		s.rtimer.Stop()
	}
	return true
}

// readConn reads at most max bytes from conn into a pooled buffer.
func readConn(conn net.Conn, max int) (*[]byte, int, error) {
	b := getBuf()
	n, err := conn.Read((*b)[:max])
	if n == 0 {
		putBuf(b)
		return nil, 0, err
	}
	return b, n, err
}

var bufPool = sync.Pool{New: func() any {
	b := make([]byte, readBufSize)
	return &b
}}

func getBuf() *[]byte  { return bufPool.Get().(*[]byte) }
func putBuf(b *[]byte) { bufPool.Put(b) }

// readOpenLocked reports whether the socket reads for the application:
// it is open and its read side has not ended. mu is held.
func (s *Socket) readOpenLocked() bool { return s.phase == open && s.rside == reading }

// readerWorkLocked reports whether the reader reads on (as opposed to
// ending): the socket reads for the application, or it drains its input
// while a graceful close flushes. mu is held.
func (s *Socket) readerWorkLocked() bool {
	return s.readOpenLocked() || ((s.phase == flushing || s.phase == lingering) && s.rside == draining)
}

// readBlockedLocked reports whether the reader must wait before its next
// read: reading is disabled, or the input buffer is full. mu is held.
func (s *Socket) readBlockedLocked() bool {
	return s.enabled&EvRead == 0 || (s.streaming && s.in.len() >= s.inLimit)
}

// readTurn is what beforeRead grants the reader's next read.
type readTurn struct {
	room    int    // the most the read may take
	gen     uint64 // the read timeout's generation (rgen) it was armed with
	grant   grant  // the rate limits' tokens, settled after the read
	discard bool   // draining: the bytes read go nowhere
}

// beforeRead waits while the reader may not read (the input buffer full,
// the read rate spent), then arms the read timeout and takes the rate's
// tokens. input tells whether the last read brought bytes. It returns the
// read's turn, and false where the reader ends: the socket no longer
// reads, or its reading is disabled (paused: Enable starts a reader). A
// draining socket reads whatever is enabled or buffered, within its rate
// limits: they bound what it reads from the connection, dropped or not.
// Where wait is false (next, inside the descriptor's read), it reports
// false instead of waiting, and changes nothing then.
func (s *Socket) beforeRead(worked, input, wait bool) (readTurn, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for {
		for s.readOpenLocked() && s.readBlockedLocked() {
			if !wait {
				return readTurn{}, false
			}
			if s.enabled&EvRead == 0 {
				s.reader = readerPaused // Enable starts a reader
				return readTurn{}, false
			}
			s.cond.Wait()
		}
		if !s.readerWorkLocked() {
			return readTurn{}, false
		}
		drain := s.rside == draining
		want := readBufSize
		if s.streaming && !drain {
			want = min(want, s.inLimit-s.in.len())
		}
		n, g, pause := take(s.tuning.readLimits(), want)
		if pause > 0 && !wait {
			return readTurn{}, false
		}
		s.late = s.late || (drain && input)
		if pause == 0 {
			s.armReaderLocked(worked, input)
			return readTurn{room: n, gen: s.rgen, grant: g, discard: drain}, true
		}
		if s.phase == lingering {
			// The linger's bound holds while the rate makes it wait: no
			// read, so no read deadline, would end it.
			left := s.rclock - monotime()
			if left <= 0 {
				s.dieLocked(false)
				return readTurn{}, false
			}
			pause = min(pause, left)
		}
		s.sleepLocked(pause)
	}
}

// sleepLocked waits on cond for at most d. mu is held.
func (s *Socket) sleepLocked(d time.Duration) {
	t := time.AfterFunc(d, func() {
		s.mu.Lock()
		s.cond.Broadcast()
		s.mu.Unlock()
	})
	s.cond.Wait()
	t.Stop()
}

// handed says what became of input the reader passed on.
type handed uint8

const (
	passedOn  handed = iota // the read-cb or the input buffer took it (or dropped it, draining): read on
	readEnded               // the socket no longer reads: the reader ends
	heldBack                // passing it on would wait: it is still the reader's (see received)
)

// chunkOf makes the n bytes read into buf a chunk for the read-cb: a fresh
// copy, which the read-cb may keep, and buf back to the pool, so that no
// buffer is held while the read-cb waits or runs; buf itself with
// ReuseReadBuffer or Pipe's relay (valid until the read-cb returns), and
// in stream mode (the input buffer takes buf).
func (s *Socket) chunkOf(buf *[]byte, n int) chunk {
	p := (*buf)[:n]
	if s.streaming || s.reuse || s.relaying.Load() {
		return chunk{p, buf}
	}
	data := make([]byte, n) // fresh: the read-cb may keep it
	copy(data, p)
	putBuf(buf)
	return chunk{data, nil}
}

// received passes c to the read-cb, or in stream mode to the input
// buffer, and gives its buffer back. Where wait is false (the reader is
// inside the descriptor's read), it passes c on only where that needs no
// wait, and otherwise keeps it and reports heldBack: the caller passes it
// again with wait set.
func (s *Socket) received(c chunk, wait bool) handed {
	if !s.streaming {
		h := s.deliver(c.b, wait)
		if h != heldBack {
			c.release()
		}
		return h
	}
	s.mu.Lock()
	if !wait && s.heldByDisableLocked() {
		s.mu.Unlock()
		return heldBack
	}
	if !s.awaitReadingLocked() { // read before a Disable: the input waits for Enable
		more := s.readerWorkLocked() // closed meanwhile: drain on, or end
		s.mu.Unlock()
		c.release()
		return ended(more)
	}
	s.in.add(c.pool, len(c.b)) // the input owns the buffer from here
	wake(&s.inWait)
	// Without a read-cb there is nobody to tell: a stream read takes the
	// input. (Pipe announces what is buffered when it sets its read-cb.)
	announce := s.notice != noticeQueued && (s.read != nil || s.sread != nil)
	if announce {
		s.notice = noticeQueued
		s.dispatch(s.notify, false)
	}
	s.mu.Unlock()
	return passedOn
}

// ended is readEnded where the reader reads no more, else passedOn.
func ended(more bool) handed {
	if more {
		return passedOn
	}
	return readEnded
}

// deliver hands data to the read-cb, waiting while reading is disabled
// (where wait is false it reports heldBack instead, as dispatchRead does
// where the read-cb cannot start at once). It reports readEnded once the
// socket no longer reads; where it was closed meanwhile and drains, data
// is dropped and the reader reads on.
func (s *Socket) deliver(data []byte, wait bool) handed {
	for {
		s.mu.Lock()
		if !wait && s.heldByDisableLocked() {
			s.mu.Unlock()
			return heldBack
		}
		up := s.awaitReadingLocked()
		more := up || s.readerWorkLocked() // asked only once closed
		s.mu.Unlock()
		if !up {
			return ended(more)
		}
		if h := s.dispatchRead(data, wait); h == passedOn || !wait {
			return h
		}
	}
}

// heldByDisableLocked reports whether input read now waits for Enable
// (awaitReadingLocked). mu is held.
func (s *Socket) heldByDisableLocked() bool {
	return s.phase == open && s.enabled&EvRead == 0
}

// awaitReadingLocked holds bytes the reader has read while reading is
// disabled: it waits for Enable, and reports whether the socket is still
// open then. mu is held.
func (s *Socket) awaitReadingLocked() bool {
	for s.heldByDisableLocked() {
		s.cond.Wait()
	}
	return s.phase == open
}

// readFailed handles a read error and says what the reader does next.
func (s *Socket) readFailed(err error, gen uint64) int {
	s.mu.Lock()
	if s.phase != open {
		next := s.drainFailedLocked(err, gen)
		s.mu.Unlock()
		return next
	}
	if deadlinePassed(err) {
		switch {
		case s.rdl == rdlHop:
			s.mu.Unlock()
			return readHop
		case s.rdl == rdlWake:
			// Woken by Disable (pauseLocked): beforeRead pauses the
			// reader, or reads on where reading was enabled again.
			s.mu.Unlock()
			return readAgain
		case s.rdl == rdlReset:
			// A timeout again, with no deadline set since the last one:
			// the conn keeps failing its reads (a wrapper whose timeout
			// sticks). Reading again would spin: the socket ends with it.
		case s.rdl != rdlTimeout || gen != s.rgen || s.rtimeout == 0 || s.enabled&EvRead == 0 ||
			!s.readClockPassedLocked():
			// The deadline was moved under the read (Disable, SetTimeouts),
			// or set by the application through Conn: not a timeout of
			// this socket. A timeout counts only once its clock has run
			// out: a Disable's wake (rdlWake) that an Enable or SetTimeouts
			// turned into a timeout's deadline before the reader looked
			// is a wake still. beforeRead sets the deadline afresh, or
			// clears it, so that it cannot fail every read that follows.
			s.rdl = rdlUnknown
			s.mu.Unlock()
			return readAgain
		case s.notifyTimeouts:
			// NotifyTimeouts: disable reading before the event-cb runs, so that
			// an Enable inside it holds.
			s.enabled &^= EvRead
			s.timeoutsChangedLocked(EvRead)
			ev := newEvent(s, err)
			ev.Dir = EvRead
			s.dispatch(func() { s.emit(ev) }, false)
			s.mu.Unlock()
			return readAgain
		}
	}
	s.settleWriteLocked()
	s.mu.Unlock()
	s.fail(err, EvRead)
	return readStop
}

// drainFailedLocked handles a read error of a socket that no longer reads
// for the application: no event, whatever it is. A draining reader reads
// on after a deadline armed before the close or its idle hop; a lingering
// close ends at its own deadline (one armed for a read of this linger:
// gen is rgen's), and at the peer's EOF or a failure. mu is held.
func (s *Socket) drainFailedLocked(err error, gen uint64) int {
	switch {
	case !s.readerWorkLocked():
		return readStop
	case s.rdl == rdlLinger && deadlinePassed(err) && gen == s.rgen:
		s.dieLocked(false) // a lull, or the linger's bound
		return readStop
	case deadlinePassed(err) && s.rdl != rdlReset:
		if s.rdl == rdlHop {
			return readHop
		}
		s.rdl = rdlUnknown // beforeRead sets it afresh
		return readAgain
	}
	s.rside = stopped // the peer's EOF, or a failure
	if s.phase == lingering {
		s.dieLocked(false)
	}
	return readStop
}

// settleWriteLocked waits, briefly, until a write in flight has been
// accounted for. A peer may answer a request and close before the writer,
// whose write the kernel already took, has run again; so the write-cb of
// the request comes before the EOF of the answer, not after the socket
// closed. A write blocked on a full connection ends the wait at
// settleTime. mu is held.
func (s *Socket) settleWriteLocked() {
	if s.inflight == 0 {
		return
	}
	expired := false
	t := time.AfterFunc(settleTime, func() {
		s.mu.Lock()
		expired = true
		s.cond.Broadcast()
		s.mu.Unlock()
	})
	defer t.Stop()
	for s.inflight > 0 && !expired {
		s.cond.Wait()
	}
}

// notify runs the stream-mode read-cb: it tells the application that the
// stream has bytes to read. Input that arrives while reading is disabled
// is announced by Enable.
func (s *Socket) notify() {
	s.mu.Lock()
	s.notice = noticeNone
	if s.enabled&EvRead == 0 && s.in.len() > 0 {
		s.notice = noticeHeld
	}
	s.mu.Unlock()
	s.invoke(func() {
		s.mu.Lock()
		open := s.enabled&EvRead != 0 && s.in.len() > 0 && s.startLocked()
		read, sread := s.read, s.sread
		s.mu.Unlock()
		switch {
		case !open:
		case sread != nil:
			sread(s, s.stream)
		case read != nil:
			read(s, nil)
		}
	})
}
