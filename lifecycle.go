package asynctcp

import (
	"context"
	"io"
	"net"
	"time"
)

// A socket's end. Its ending event (EOF, an error, a panic) is claimed
// once (fail, claimLocked); the socket then closes itself, gracefully
// after an EOF (shut, beginFlushLocked), and is torn down (dieLocked) by
// the finisher (finish), which closes the conn once its goroutines are
// done. As the application sees it: Context is cancelled as soon as the
// socket starts to close (startClosingLocked), the close-cb runs once
// every goroutine of the socket has ended (reportEnd, on the finisher),
// and Done is closed after it. Loop.Exit cancels the Context and closes
// Done, but runs no close-cb.

// watchers are the Done channel and the Context of a socket, made only for
// sockets whose application asks for them.
type watchers struct {
	done   chan struct{}
	ctx    context.Context
	cancel context.CancelCauseFunc
}

// watchersLocked returns the socket's watchers, made on first use. mu is
// held.
func (s *Socket) watchersLocked() *watchers {
	if s.watch == nil {
		ctx, cancel := context.WithCancelCause(context.Background())
		s.watch = &watchers{done: make(chan struct{}), ctx: ctx, cancel: cancel}
		if s.closing != nil {
			cancel(s.closing)
		}
		if s.fin {
			close(s.watch.done)
		}
	}
	return s.watch
}

// startClosingLocked records why the socket starts to close, once, and
// cancels its Context with that cause. mu is held.
func (s *Socket) startClosingLocked(cause error) {
	if s.closing != nil {
		return
	}
	s.closing = cause
	if s.watch != nil {
		s.watch.cancel(cause)
	}
}

// reportEnd runs on the finisher once every goroutine of the socket has
// ended: the close-cb, unless Loop.Exit ended the socket or the
// application never saw it; then Done closes.
func (s *Socket) reportEnd() {
	s.mu.Lock()
	cb, err := s.onClose, s.endErr
	run := cb != nil && !s.exited && s.touched
	end := s.onEnd
	s.startClosingLocked(closedError(s)) // a socket that never came up
	s.mu.Unlock()
	if end != nil {
		end()
	}
	if run {
		held, _ := s.loop.enter(true)
		if pe := s.loop.call(func() { cb(s, err) }, s); pe != nil {
			s.loop.handle(pe)
		}
		s.loop.leave(held)
	}
	s.mu.Lock()
	s.fin = true
	if s.watch != nil {
		close(s.watch.done)
	}
	s.mu.Unlock()
}

// Done returns a channel that is closed once the socket has fully closed:
// its connection is closed, its goroutines have ended and its close-cb
// (OnClose), if any, has returned. Loop.Exit closes it too. A callback may
// call Done but should not wait on it: on a Serial loop the close-cb it
// would wait for cannot run until that callback returns.
func (s *Socket) Done() <-chan struct{} {
	if s == nil {
		return nil
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.watchersLocked().done
}

// Context returns a context that is cancelled as soon as the socket starts
// to close: Close, Abort, its ending event (before the event-cb runs), or
// Loop.Exit. Its context.Cause is that event, or an ErrSocketClosed event
// where the application closed the socket.
func (s *Socket) Context() context.Context {
	if s == nil {
		return nil
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.watchersLocked().ctx
}

// BytesRead returns the number of bytes read from the connection so far.
// Once Done is closed it is final.
func (s *Socket) BytesRead() int64 {
	if s == nil {
		return 0
	}
	return s.bytesRead.Load()
}

// BytesWritten returns the number of bytes written to the connection so
// far (not those queued). Once Done is closed it is final.
func (s *Socket) BytesWritten() int64 {
	if s == nil {
		return 0
	}
	return s.bytesWritten.Load()
}

// fail ends the socket with err, a failure of direction dir (0 for a
// connect): the event-cb gets it (a socket gets one such event), then the
// socket closes, gracefully after an EOF, at once otherwise. The caller is
// the reader or the connector, which end after it: the event runs on the
// caller where the queue is idle.
func (s *Socket) fail(err error, dir Events) {
	ev := newEvent(s, err)
	ev.Dir = dir
	s.mu.Lock()
	end := s.claimLocked(ev)
	s.mu.Unlock()
	if end != nil {
		s.dispatch(end, true)
	}
}

// claimLocked records ev as the end of the socket's input and, where it is
// the socket's first EOF or error, returns the job that delivers it (nil
// where there is nothing to deliver). Where the application closed the
// socket already, there is no event: a failed dial or flush just ends it.
// A peer's EOF on a half-open socket only ends reading. Claiming under the
// lock that saw the failure keeps a reset that the writer saw first from
// passing for the plain EOF the reader sees after it. mu is held.
func (s *Socket) claimLocked(ev *Event) func() {
	eof := ev.Class == ErrTCPEOF && ev.Code == -1
	if s.inEnd == nil {
		s.inEnd = ev
		if eof {
			s.inEnd = io.EOF
		}
		wake(&s.inWait)
	}
	if ev.Dir != EvWrite && s.rside == reading {
		s.rside = stopped
	}
	if s.closer != nobody {
		s.dieLocked(true)
		return nil
	}
	if s.ended {
		return nil
	}
	halfOpen := eof && ev.Dir == EvRead && s.halfOpen
	s.ended = !halfOpen
	switch {
	case !s.ended:
	case eof && (s.wside == writeShutting || s.wside == writeShut):
		// The application's CloseWrite, answered by the peer's EOF: the
		// application closed it (the event-cb still gets the EOF).
		s.startClosingLocked(closedError(s))
	default:
		s.endErr = ev
		s.startClosingLocked(ev)
	}
	return func() {
		s.emit(ev)
		if halfOpen {
			s.eofDelivered()
			return
		}
		s.shut(!eof) // a reset is aborted
	}
}

// eofDelivered notes that the peer's EOF reached the event-cb of a
// half-open socket; once the write side is shut too, the socket closes
// itself.
func (s *Socket) eofDelivered() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.rside = eofDelivered
	s.shutIfBothLocked()
}

// shutIfBothLocked closes a socket whose two directions are shut. mu is
// held.
func (s *Socket) shutIfBothLocked() {
	if s.rside == eofDelivered && s.wside == writeShut {
		s.shutLocked(false)
	}
}

// shut closes the socket from inside: gracefully (flush first) or not.
func (s *Socket) shut(abort bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.shutLocked(abort)
}

// shutLocked closes the socket from inside. Where the application closed
// it already, it leaves it as it is, except that an abort ends a flush.
// mu is held.
func (s *Socket) shutLocked(abort bool) {
	if s.closer != nobody {
		if abort {
			s.dieLocked(true)
		}
		return
	}
	s.closer = bySelf
	s.startClosingLocked(closedError(s))
	if abort {
		s.dieLocked(true)
		return
	}
	s.beginFlushLocked()
}

// beginFlushLocked stops reading for the application and lets the writer
// flush, then end the socket. mu is held.
func (s *Socket) beginFlushLocked() {
	switch s.phase {
	case connecting:
		if s.outLen == 0 {
			s.dieLocked(false)
			return
		}
		s.phase = flushing // attach starts the writer once up
	case open:
		if s.wside == writeFailed {
			s.dieLocked(false) // nothing to flush
			return
		}
		// With nothing queued too, the writer looks for unread input
		// before it ends the socket: it may linger (nextWrite).
		s.phase = flushing
		s.drainLocked()
		s.writeClockChangedLocked() // a flush is bounded even where EvWrite was disabled
		s.cond.Broadcast()
		s.kickLocked()
	}
	wake(&s.inWait)
	wake(&s.outWait)
}

// drainLocked turns a read side that still reads into a drain, as a
// graceful close begins: the reader reads on, whatever is enabled, and
// drops what it reads, with no read timeout. A peer that is flushing to
// the socket in turn (two sockets closed at once, each with output the
// other has not read) would otherwise wait on a full window for ever, and
// the flush with it. A paused socket gets a reader; a parked one gets one
// when its descriptor is readable. mu is held.
func (s *Socket) drainLocked() {
	if s.rside != reading {
		return
	}
	s.rside = draining
	s.rclock = 0 // a parked socket's read timer finds it stopped
	s.resumeLocked()
}

// A lingering close waits, after the flush, for the peer's EOF, for at most
// lingerGap without input and lingerMax in all: a peer that goes on
// sending holds a closed socket for lingerMax at most. net/http waits
// 500 ms before it closes a connection with unread input, for the same
// reason.
const (
	lingerGap = 500 * time.Millisecond
	lingerMax = time.Second
)

// lingersLocked reports whether a flushed socket lingers before it closes
// (see lingering): the peer sent input after the close and has not ended
// it, and the conn can shut its write side. mu is held.
func (s *Socket) lingersLocked() bool {
	if s.rside != draining || !s.late {
		return false
	}
	_, ok := s.conn.(closeWriter)
	return ok
}

// awaitAcked runs on the writer as a graceful close's flush ends, where
// the peer has not ended its side: input that comes once the socket has
// closed makes the kernel reset the connection, and the reset drops the
// output the peer has not acknowledged yet. So it looks for input pending
// (the socket lingers then), and waits while the kernel holds output the
// peer has not acknowledged (SIOCOUTQ, on Linux), until input comes (the
// drain sees it: the socket lingers), for lingerMax at most.
func (s *Socket) awaitAcked() {
	end := time.Now().Add(lingerMax)
	for wait := time.Millisecond; ; wait = min(2*wait, 50*time.Millisecond) {
		if pendingInput(s.conn) {
			s.mu.Lock()
			s.late = true
			s.mu.Unlock()
			return
		}
		s.mu.Lock()
		waits := s.awaitsAckLocked()
		s.mu.Unlock()
		if !waits || unacked(s.conn) == 0 || time.Now().After(end) {
			return
		}
		time.Sleep(wait)
	}
}

// awaitsAckLocked reports whether a flushed socket has awaitAcked to run,
// or to go on with: it drains, and no input came after the close yet. mu
// is held.
func (s *Socket) awaitsAckLocked() bool {
	return s.phase == flushing && s.rside == draining && !s.late
}

// lingerLocked begins the lingering of a flushed socket whose write side
// is shut: its reader drains until the peer's EOF, or until its read
// deadline passes (armReaderLocked), and the socket dies then
// (drainFailedLocked). mu is held.
func (s *Socket) lingerLocked() {
	if s.rside != draining { // the peer's EOF came meanwhile
		s.dieLocked(false)
		return
	}
	s.phase = lingering
	s.rclock = monotime() + lingerMax
	s.rgen++ // a read armed before the linger does not end it
	if s.reader == readerParked {
		s.takeOverLocked() // a fresh reader arms the linger's deadline
		return
	}
	// Wake the reader, so that it arms the linger's deadline with the
	// linger's generation (beforeRead).
	s.setReadDeadlineLocked(rdlWake, aLongTimeAgo)
}

// dieLocked tears the socket down: it drops the output, stops the connect,
// wakes every waiter and starts the finisher, which closes the conn (at
// once where abort is set: a TLS conn then sends no close_notify) outside
// the lock. mu is held.
func (s *Socket) dieLocked(abort bool) {
	if s.phase == dead {
		return
	}
	s.phase = dead
	s.abortive = abort
	s.dropped = s.outLen > 0
	s.out, s.outLen = nil, 0
	if s.cancel != nil {
		s.cancel()
	}
	if s.stall != nil {
		s.stall.Stop()
	}
	s.unparkLocked()
	s.cond.Broadcast()
	wake(&s.inWait)
	wake(&s.outWait)
	go s.finish()
}

// finish closes the conn, waits for the socket's goroutines, and takes the
// socket out of its loop and server.
func (s *Socket) finish() {
	s.mu.Lock()
	conn, abort := s.conn, s.abortive
	s.mu.Unlock()
	if conn != nil {
		closeConn(conn, abort)
	}
	s.grp.Wait()
	for _, l := range s.tuning.readLimits() {
		if l.group != nil {
			l.group.members.Add(-1)
		}
	}
	s.reportEnd()
	// The loop first, so that Stats no longer counts a socket once
	// Server.Shutdown has seen it end.
	s.loop.removeSocket(s)
	if s.server != nil {
		s.server.forget(s)
	}
}

// closeConn closes conn: at once where abort is set, which for a TLS conn
// means closing the conn under it, so that close_notify is not sent to a
// peer that may never read it.
func closeConn(conn net.Conn, abort bool) {
	if abort {
		conn = beneathTLS(conn)
	}
	conn.Close()
}
