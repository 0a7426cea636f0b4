package asynctcp

import (
	"errors"
	"fmt"
	"net"
	"time"
)

// The timeouts of a socket are the deadlines of its conn, armed by the
// reader before each read and by the writer before each write, and only
// where a timeout is set, so that an unset timeout costs nothing. A read
// timeout counts while reading is enabled; a write timeout while output is
// queued and writing is enabled (or a graceful Close flushes). Where a
// deadline is lifted under a blocked read or write (Disable, SetTimeouts),
// a generation counter tells a stale timeout from a real one.

// SetTimeouts is set-socket-timeouts: the read and write timeouts of the
// socket (see ReadTimeout and WriteTimeout), effective at once. 0 clears
// one; a negative value is an error.
func (s *Socket) SetTimeouts(read, write time.Duration) error {
	if s == nil {
		return errNilSocket
	}
	if read < 0 || write < 0 {
		return fmt.Errorf("asynctcp: SetTimeouts: negative timeout (read %v, write %v)", read, write)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return closedError(s)
	}
	s.rtimeout, s.wtimeout = read, write
	if s.state != open {
		return nil // the connect timeout was taken at the start; a flush keeps its deadline
	}
	if s.enabled&EvRead != 0 {
		s.hopping = false
		s.conn.SetReadDeadline(fromNow(read))
	}
	s.wgen++
	if s.outLen > 0 && s.enabled&EvWrite != 0 {
		s.conn.SetWriteDeadline(fromNow(write))
	}
	return nil
}

// fromNow is d from now, or no deadline for 0.
func fromNow(d time.Duration) time.Time {
	if d == 0 {
		return time.Time{}
	}
	return time.Now().Add(d)
}

// connectTimeout is the read timeout, or else the write timeout (rule 9).
func (s *Socket) connectTimeout() time.Duration {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.rtimeout > 0 {
		return s.rtimeout
	}
	return s.wtimeout
}

// armRead starts the read timeout for the next read. s.mu is held.
func (s *Socket) armRead() {
	if s.rtimeout > 0 {
		s.hopping = false
		s.conn.SetReadDeadline(time.Now().Add(s.rtimeout))
	}
}

// armReader arms the reader's next read: the read timeout, or without one
// the idle hop of a reader that has run callbacks (see idleHop); a fresh
// reader lifts a hop deadline it inherited. s.mu is held.
func (s *Socket) armReader(worked bool) {
	switch {
	case s.rtimeout > 0:
		s.armRead()
	case worked:
		// Moving the deadline costs more than reading the clock: move it
		// only once half of it has passed.
		now := time.Now()
		if !s.hopping || s.hopAt.Sub(now) < idleHop/2 {
			s.hopping, s.hopAt = true, now.Add(idleHop)
			s.conn.SetReadDeadline(s.hopAt)
		}
	case s.hopping:
		s.hopping = false
		s.conn.SetReadDeadline(time.Time{})
	}
}

// armFlush bounds a graceful Close's flush by the write timeout, even where
// writing was disabled. s.mu is held.
func (s *Socket) armFlush() {
	if s.wtimeout > 0 && s.outLen > 0 {
		s.conn.SetWriteDeadline(time.Now().Add(s.wtimeout))
	}
}

// suspend lifts the timeouts of the directions being disabled. s.mu is
// held.
func (s *Socket) suspend(ev Events) {
	if s.state != open {
		return
	}
	if ev&EvRead != 0 && s.rtimeout > 0 {
		s.rgen++
		s.conn.SetReadDeadline(time.Time{})
	}
	if ev&EvWrite != 0 && s.wtimeout > 0 {
		s.wgen++
		s.conn.SetWriteDeadline(time.Time{})
	}
}

// rearm starts the timeouts of the directions being enabled again. s.mu is
// held.
func (s *Socket) rearm(ev Events) {
	if s.state != open {
		return
	}
	if ev&EvRead != 0 {
		s.armRead()
	}
	if ev&EvWrite != 0 && s.wtimeout > 0 && s.outLen > 0 {
		s.conn.SetWriteDeadline(time.Now().Add(s.wtimeout))
	}
}

// writeOut writes bufs to conn, with writev where the conn has it. Under a
// write timeout each write must make progress within it: a write that
// times out after some bytes starts the clock again. It returns what it
// wrote, and on an error what is left.
func (s *Socket) writeOut(conn net.Conn, bufs [][]byte) (int, [][]byte, error) {
	nb := net.Buffers(bufs)
	total := 0
	for len(nb) > 0 {
		gen := s.armWrite()
		n, err := nb.WriteTo(conn)
		total += int(n)
		if err == nil {
			continue
		}
		if !isTimeout(err) || (n == 0 && s.writeTimedOut(gen)) {
			return total, nb, err
		}
	}
	return total, nil, nil
}

// armWrite starts the write timeout for the next write, where it counts.
func (s *Socket) armWrite() uint64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.wtimeout > 0 && s.writing() {
		s.conn.SetWriteDeadline(time.Now().Add(s.wtimeout))
	}
	return s.wgen
}

// writeTimedOut tells a real write timeout from a deadline that was lifted
// under the write.
func (s *Socket) writeTimedOut(gen uint64) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return gen == s.wgen && s.wtimeout > 0 && s.writing()
}

// writing reports whether the write timeout counts now. s.mu is held.
func (s *Socket) writing() bool {
	return s.enabled&EvWrite != 0 || s.state == flushing
}

// readTimedOut tells a real read timeout from a deadline that was lifted
// under the read. s.mu is held.
func (s *Socket) readTimedOut(gen uint64) bool {
	return gen == s.rgen && s.rtimeout > 0 && s.enabled&EvRead != 0
}

// connectTimeout is a connect (lookup, dial, handshake) that ran out of
// the socket's timeout: an ErrTCPTimeout event, whichever step failed.
type connectTimeout struct{ err error }

func (e *connectTimeout) Error() string { return "connect timed out: " + e.err.Error() }
func (e *connectTimeout) Unwrap() error { return e.err }
func (e *connectTimeout) Timeout() bool { return true }

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}
