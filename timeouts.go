package asynctcp

import (
	"errors"
	"net"
	"os"
	"time"
)

// Timeouts. The read timeout's clock (rclock) runs while reading is
// enabled: it starts when the reader arms a read after input, and when
// SetTimeouts or Enable sets it; Disable and lifting the timeout stop it.
// The reader waits for it through the conn's read deadline, set before
// each read (armReaderLocked) and by SetTimeouts and Enable under a blocked
// read; a parked socket waits for it on its read timer (readTimerFired),
// which starts a reader whose read fails at once. The read deadline serves
// four purposes, and rdl says which one it serves now: the read timeout,
// the idle hop of a reader (hopWaitLocked) where that comes first, a
// deadline in the past that wakes the reader (to pause after Disable, or
// to arm a linger), or a lingering close's lull and end (rdlLinger).
// Where the read timeout is lifted under a blocked read (Disable,
// SetTimeouts), rgen is bumped, so that the reader tells a stale timeout
// from a real one; and a timeout counts only once its clock has run out
// (readClockPassedLocked), since a wake that an Enable turned into the
// timeout's deadline before the reader looked keeps rdlTimeout and rgen.
//
// The write timeout (the write clock) runs while output is queued and may
// be written: writing is enabled, or the socket flushes or shuts its write
// side (writeClockRunsLocked). The writer arms it between writes, never
// under a write (armWriteLocked), and SetTimeouts, Enable, Disable and
// Close move it under a write already under way (writeClockChangedLocked).
// It takes one of two forms, by the kind of conn:
//   - A descriptor conn (TCP, Unix) takes a write deadline. A write that
//     times out there keeps what it wrote and the conn stays usable, so a
//     write that made progress goes on with a fresh deadline: only a write
//     that moves no byte for the timeout fails.
//   - Any other conn gets no write deadline, because a deadline that passes
//     under a crypto/tls Write breaks the conn for good. A timer beside the
//     write (the stall timer) stands in for it: the writer writes such a
//     conn in batches of at most smallBatch, and a batch that does not
//     complete within the timeout is a stall. The timer never touches the
//     conn: a stall aborts the socket, which closes the conn under the
//     write, or, with NotifyTimeouts, notifies while the write goes on, so
//     that Enable resumes the output where it stopped.
//
// An unset timeout costs nothing: no deadline is set. The deadlines a conn
// brings to Wrap are cleared when the socket adopts it.

// readDeadline says what the conn's read deadline is for.
type readDeadline uint8

const (
	rdlNone    readDeadline = iota // the conn has no read deadline
	rdlTimeout                     // the read timeout
	rdlHop                         // the idle hop (hopWaitLocked)
	rdlWake                        // in the past: the reader pauses (Disable), or arms a linger
	rdlUnknown                     // a timeout came from a deadline that was moved or not ours: reset it
	rdlReset                       // none, cleared after rdlUnknown: one more timeout ends the socket
	rdlLinger                      // a lingering close's lull or end (lingerLocked)
)

var aLongTimeAgo = time.Unix(1, 0)

// SetTimeouts is set-socket-timeouts: the read and write timeouts of the
// socket (see ReadTimeout and WriteTimeout), effective at once. 0 clears
// one, and with it any deadline on the connection; a negative value is an
// error.
func (s *Socket) SetTimeouts(read, write time.Duration) error {
	if s == nil {
		return nilSocket("Socket.SetTimeouts")
	}
	if read < 0 || write < 0 {
		return badArg("SetTimeouts: negative timeout (read %v, write %v)", read, write)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closer != nobody {
		return closedError(s)
	}
	s.rtimeout, s.wtimeout = read, write
	s.timeoutsChangedLocked(EvRead | EvWrite)
	return nil
}

// timeoutsChangedLocked brings the clocks of the directions in ev up to
// date after a change of timeouts or of what is enabled. mu is held.
func (s *Socket) timeoutsChangedLocked(ev Events) {
	if s.phase != open {
		return // connecting: the connect timeout was taken at the start
	}
	if ev&EvRead != 0 {
		switch {
		case s.enabled&EvRead != 0 && s.rtimeout > 0:
			s.rclock = monotime() + s.rtimeout
			if s.reader == readerParked {
				s.armReadTimerLocked()
				break
			}
			s.setReadDeadlineLocked(rdlTimeout, clockEpoch.Add(s.rclock))
		default:
			s.rclock = 0 // a parked socket's timer finds it stopped
			if s.rdl == rdlTimeout {
				s.rgen++
				s.setReadDeadlineLocked(rdlNone, time.Time{})
			}
		}
	}
	if ev&EvWrite != 0 {
		s.writeClockChangedLocked()
	}
}

func (s *Socket) setReadDeadlineLocked(what readDeadline, t time.Time) {
	s.rdl = what
	s.conn.SetReadDeadline(t)
}

// connectTimeout is the read timeout, or else the write timeout: what
// bounds a connect.
func (s *Socket) connectTimeout() time.Duration {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.rtimeout > 0 {
		return s.rtimeout
	}
	return s.wtimeout
}

// armReaderLocked arms the reader's next read, after input where input
// is set. A read timeout's clock starts afresh after input, or where it
// does not run, and otherwise runs on: a fresh reader inherits it. The
// read waits until the timeout passes, or until the idle hop of a reader
// that has run callbacks (see minHop) where that comes first; a fresh
// reader lifts a hop deadline it inherited. A lingering close's reader
// waits lingerGap at most, and not past the linger's end. mu is held.
func (s *Socket) armReaderLocked(worked, input bool) {
	if s.phase == lingering {
		s.setReadDeadlineLocked(rdlLinger, clockEpoch.Add(min(monotime()+lingerGap, s.rclock)))
		return
	}
	if s.rtimeout > 0 && s.readOpenLocked() {
		now := monotime()
		if input || s.rclock == 0 {
			s.rclock = now + s.rtimeout
		}
		if worked {
			if hop := now + s.hopWaitLocked(now); hop < s.rclock {
				s.hopAt = hop
				s.setReadDeadlineLocked(rdlHop, clockEpoch.Add(hop))
				return
			}
		}
		s.setReadDeadlineLocked(rdlTimeout, clockEpoch.Add(s.rclock))
		return
	}
	switch {
	case s.rdl == rdlUnknown:
		s.setReadDeadlineLocked(rdlReset, time.Time{})
	case worked:
		// Moving the deadline costs more than reading the clock: move it
		// only once half of the wait has passed, or where the wait shrank.
		now := monotime()
		wait := s.hopWaitLocked(now)
		if left := s.hopAt - now; s.rdl != rdlHop || left < wait/2 || left > 2*wait {
			s.hopAt = now + wait
			s.setReadDeadlineLocked(rdlHop, clockEpoch.Add(s.hopAt))
		}
	case s.rdl != rdlNone:
		s.setReadDeadlineLocked(rdlNone, time.Time{})
	}
}

// hopWaitLocked returns how long the reader waits for input before it
// parks the socket or a fresh reader takes its place: four times the
// socket's usual gap between reads, within [minHop, idleHop]. The usual
// gap follows a longer gap at once and a shorter one by a quarter per
// read, so one early input does not make a steady socket hop. now is
// monotime's. mu is held.
func (s *Socket) hopWaitLocked(now time.Duration) time.Duration {
	if s.lastArm != 0 {
		s.gap = max(now-s.lastArm, s.gap-s.gap/4)
	}
	s.lastArm = now
	return min(max(4*s.gap, minHop), idleHop)
}

// clockEpoch is where monotime counts from.
var clockEpoch = time.Now()

// monotime reads the monotonic clock alone, which costs half of
// time.Now: the reader reads it before every read.
func monotime() time.Duration { return time.Since(clockEpoch) }

// writeClockRunsLocked reports whether the write timeout counts now. mu
// is held.
func (s *Socket) writeClockRunsLocked() bool {
	return s.wtimeout > 0 && s.outLen > 0 &&
		(s.enabled&EvWrite != 0 || s.phase == flushing || s.wside == writeShutting)
}

// armWriteLocked sets the write clock for the write about to start, or
// stops it where it does not run, and returns its generation. mu is held.
func (s *Socket) armWriteLocked() uint64 {
	s.wgen++
	runs := s.writeClockRunsLocked()
	if s.raw == nil {
		s.stallGen = 0
		if runs {
			s.stallGen = s.wgen
			if s.stall == nil {
				s.stall = time.AfterFunc(s.wtimeout, s.stalled)
			} else {
				s.stall.Reset(s.wtimeout)
			}
		} else if s.stall != nil {
			s.stall.Stop()
		}
		return s.wgen
	}
	switch {
	case runs:
		s.wdlSet = true
		s.conn.SetWriteDeadline(time.Now().Add(s.wtimeout))
	case s.wdlSet:
		s.wdlSet = false
		s.conn.SetWriteDeadline(time.Time{})
	}
	return s.wgen
}

// armWrite is armWriteLocked for the writer after a write timed out
// without failing: whatever deadline the conn has now (one moved under the
// write, or one the application set through Conn) is set afresh or
// cleared, so that it cannot fail every write that follows.
func (s *Socket) armWrite() uint64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.wdlSet = true
	return s.armWriteLocked()
}

// writeClockChangedLocked moves the write clock after a change of the
// timeout or of what may be written: under a write already under way it
// starts afresh (or stops); otherwise the writer arms it before its next
// write, and a deadline that no longer counts is cleared at once. mu is
// held.
func (s *Socket) writeClockChangedLocked() {
	switch {
	case s.phase != open && s.phase != flushing:
	case s.writer == writerRunning && s.inflight > 0:
		s.armWriteLocked()
	case s.wdlSet && !s.writeClockRunsLocked():
		s.wdlSet = false
		s.wgen++
		s.conn.SetWriteDeadline(time.Time{})
	}
}

// writeTimedOut tells a real write timeout from a deadline that was moved
// under the write.
func (s *Socket) writeTimedOut(clock uint64) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return clock == s.wgen && s.writeClockRunsLocked()
}

// stopStall stops the stall timer once a write has returned.
func (s *Socket) stopStall() {
	if s.raw != nil {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.stallGen = 0
	if s.stall != nil {
		s.stall.Stop()
	}
}

// stalled runs when the stall timer fires: the write under way has not
// completed within the write timeout.
func (s *Socket) stalled() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.stallGen == 0 || s.stallGen != s.wgen || s.inflight == 0 ||
		s.phase == dead || !s.writeClockRunsLocked() {
		return // stopped or moved since
	}
	s.stallGen = 0
	err := &net.OpError{Op: "write", Net: s.conn.LocalAddr().Network(),
		Source: s.conn.LocalAddr(), Addr: s.conn.RemoteAddr(), Err: os.ErrDeadlineExceeded}
	if s.notifyTimeouts && s.phase == open {
		// NotifyTimeouts: the write under way goes on, and the writer holds
		// after it.
		s.enabled &^= EvWrite
		s.wgen++
		ev := newEvent(s, err)
		ev.Dir = EvWrite
		s.dispatch(func() { s.emit(ev) }, false)
		return
	}
	if end := s.writeFailedLocked(err); end != nil {
		s.dispatch(end, false)
	}
}

// connectTimeout is a connect (lookup, dial, handshake) that ran out of
// the socket's timeout: an ErrTCPTimeout event, whichever step failed.
type connectTimeout struct{ err error }

func (e *connectTimeout) Error() string { return "connect timed out: " + e.err.Error() }
func (e *connectTimeout) Unwrap() error { return e.err }
func (e *connectTimeout) Timeout() bool { return true }

// deadlinePassed reports whether err is a deadline of the conn passing
// (os.ErrDeadlineExceeded), as opposed to the connection failing with
// ETIMEDOUT (keep-alive probes or retransmissions unanswered), which
// net.Error's Timeout also reports.
func deadlinePassed(err error) bool { return errors.Is(err, os.ErrDeadlineExceeded) }
