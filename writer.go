package asynctcp

import (
	"errors"
	"fmt"
	"net"
)

// The writer: output queues in s.out; a writer goroutine, started on
// demand, takes one batch at a time and writes it with no lock held.
// Bounding the batch keeps Disable(EvWrite) holding within one batch, and
// Buffered, Writable and the watermarks moving in small steps.

// maxBatch is the most the writer takes for one write to a descriptor
// conn (TCP, Unix); other conns (TLS, pipes) get smallBatch, which is
// also the step of their write clock (see timeouts.go).
const (
	maxBatch   = 256 << 10
	smallBatch = 16 << 10
)

// WriteData is write-socket-data: it copies data into the output buffer and
// returns at once; the writer sends it in order, after what was queued
// before. OnRead, OnWrite and OnEvent replace the socket's callbacks for
// every event dispatched after WriteData returns. On a closed socket it
// returns an ErrSocketClosed event and queues nothing.
func (s *Socket) WriteData(data []byte, opts ...Option) error {
	if s == nil {
		return nilSocket("Socket.WriteData")
	}
	var cfg *config
	if len(opts) > 0 {
		var err error
		if cfg, err = newConfig(callWriteData, opts); err != nil {
			return err
		}
	}
	s.mu.Lock()
	if err := s.mayQueueLocked(len(data)); err != nil {
		s.mu.Unlock()
		return err
	}
	if cfg != nil {
		s.overrideLocked(cfg)
	}
	inline := s.queueLocked(data)
	s.mu.Unlock()
	if inline {
		s.writeInline(data)
	}
	return nil
}

// overrideLocked replaces the callbacks that WriteData's options name.
// mu is held.
func (s *Socket) overrideLocked(cfg *config) {
	if cfg.setRead {
		s.read = cfg.onRead
		s.relaying.Store(false) // the new read-cb may keep its slices
	}
	if cfg.setWrite {
		s.write = cfg.onWrite
	}
	if cfg.setEvent {
		s.event = cfg.onEvent
	}
}

// Write is io.Writer: WriteData(p), returning len(p).
func (s *Socket) Write(p []byte) (int, error) {
	if err := s.WriteData(p); err != nil {
		return 0, err
	}
	return len(p), nil
}

// WriteString is io.StringWriter: WriteData of the string's bytes.
func (s *Socket) WriteString(str string) (int, error) {
	if s == nil {
		return 0, nilSocket("Socket.WriteString")
	}
	if err := s.WriteData([]byte(str)); err != nil {
		return 0, err
	}
	return len(str), nil
}

// Writable reports whether the output is below the high watermark
// (WriteWatermarks): false while Buffered() >= high, true otherwise, and
// always true without a high watermark. A proxy disables reading on its
// source while its destination is not writable, and enables it again from
// the destination's write-cb.
func (s *Socket) Writable() bool {
	if s == nil {
		return false
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.highWater == 0 || s.outLen < s.highWater
}

// CloseWrite flushes the queued output, then shuts the write side of the
// connection: the peer reads EOF while reading goes on (Node's end(),
// Netty's shutdownOutput). Later writes return an ErrSocketClosed event,
// and a Stream.Write blocked for room returns one too. With AllowHalfOpen,
// once the peer has shut its side too, the socket closes by itself. A
// connection that cannot half-close (net.Pipe) gives an ErrTCPError event
// wrapping errors.ErrUnsupported.
func (s *Socket) CloseWrite() error {
	if s == nil {
		return nilSocket("Socket.CloseWrite")
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closer != nobody || s.wside != writeOpen {
		return closedError(s)
	}
	if _, ok := s.conn.(closeWriter); s.conn != nil && !ok {
		return &Event{Class: ErrTCPError, Socket: s, Code: -1, Dir: EvWrite,
			Msg: fmt.Sprintf("%T cannot half-close", s.conn), Err: errors.ErrUnsupported}
	}
	s.wside = writeShutting
	wake(&s.outWait)
	s.writeClockChangedLocked()
	s.kickLocked()
	return nil
}

// Buffered returns the number of bytes queued for output and not yet
// written to the connection.
func (s *Socket) Buffered() int {
	if s == nil {
		return 0
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.outLen
}

// queueLocked queues p for output. Where nothing is queued, the conn is a
// descriptor, and the writer may write now, it reports true instead: the
// caller then writes p inline with writeInline, after unlocking, and
// nothing else writes meanwhile. Otherwise p is copied and the writer
// started. mu is held.
func (s *Socket) queueLocked(p []byte) bool {
	if len(p) == 0 {
		return false
	}
	if s.raw != nil && s.phase == open && s.writer == writerIdle && s.outLen == 0 &&
		s.enabled&EvWrite != 0 && s.wside == writeOpen && s.tuning.writeLimits() == nil {
		s.writer = writerInline
		s.outLen, s.inflight = len(p), len(p)
		return true
	}
	if n := len(s.out); n > 0 && cap(s.out[n-1])-len(s.out[n-1]) >= len(p) {
		s.out[n-1] = append(s.out[n-1], p...)
	} else {
		s.out = append(s.out, append(make([]byte, 0, max(len(p), 512)), p...))
	}
	s.outLen += len(p)
	s.kickLocked()
	return false
}

// writeInline writes what of p the descriptor takes without blocking, and
// queues the rest ahead of anything queued meanwhile (queueLocked).
func (s *Socket) writeInline(p []byte) {
	n := s.raw.tryWrite(p)
	s.bytesWritten.Add(int64(n))
	s.mu.Lock()
	defer s.mu.Unlock()
	s.writer = writerIdle
	s.inflight = 0
	s.cond.Broadcast() // settleWriteLocked
	if s.outputDroppedLocked() {
		return
	}
	if n < len(p) {
		rest := append(make([]byte, 0, max(len(p)-n, 512)), p[n:]...)
		s.out = append([][]byte{rest}, s.out...)
	}
	s.wroteLocked(n)
	s.kickLocked()
}

// outputDroppedLocked reports whether the output was dropped (teardown, a
// failed write) while a write was under way: its bytes are no longer
// counted, so the write is not either. mu is held.
func (s *Socket) outputDroppedLocked() bool { return s.phase == dead || s.wside == writeFailed }

// wroteLocked accounts for n bytes written to the conn: it wakes blocked
// Stream writers and runs the write-cb where the output fell to the low
// watermark. mu is held.
func (s *Socket) wroteLocked(n int) {
	before := s.outLen
	s.outLen -= n
	wake(&s.outWait)
	if before > s.lowWater && s.outLen <= s.lowWater && s.write != nil {
		// Never on the writer: a write-cb may block in Stream.Write.
		s.dispatch(s.drained, false)
	}
}

// writerWorkLocked reports whether the writer has something it may do
// now: output it may write (even where EvWrite is disabled, once the
// socket flushes or shuts its write side), a write side to shut, or a
// flushed socket to end. mu is held.
func (s *Socket) writerWorkLocked() bool {
	if s.phase != open && s.phase != flushing {
		return false
	}
	finishing := s.phase == flushing || s.wside == writeShutting
	return (len(s.out) > 0 && (s.enabled&EvWrite != 0 || finishing)) ||
		(s.outLen == 0 && finishing)
}

// kickLocked starts the writer where it has work and nobody writes. The
// socket is not dead, so the errgroup has not been waited for. mu is held.
func (s *Socket) kickLocked() {
	if s.writer == writerIdle && s.conn != nil && s.writerWorkLocked() {
		s.writer = writerRunning
		s.grp.Go(s.writeLoop)
	}
}

// What the writer does next, besides writing a batch.
const (
	writeBatch     = iota
	writeShutSide  // shut the write side (CloseWrite, or a lingering close)
	writePeekInput // a flushed socket: look for input that closing would reset (awaitAcked)
)

// writeLoop is the writer: it writes batches until there is nothing it may
// write, shuts the write side after CloseWrite, and ends a flushed socket.
func (s *Socket) writeLoop() error {
	peeked := false
	for {
		bufs, g, clock, act, ok := s.nextWrite(peeked)
		switch {
		case !ok:
			return nil
		case act == writeShutSide:
			s.shutWrite()
			continue
		case act == writePeekInput:
			s.awaitAcked()
			peeked = true
			continue
		}
		n, rest, err := s.writeOut(bufs, clock)
		s.bytesWritten.Add(int64(n))
		g.settle(n)
		if !s.wrote(n, rest, err) {
			return nil
		}
	}
}

// nextWrite waits until the writer may write (taking one batch), must shut
// the write side, or is done (ok false); a flushed socket lingers or ends
// here, once the writer has peeked for input (peeked).
func (s *Socket) nextWrite(peeked bool) (bufs [][]byte, g grant, clock uint64, act int, ok bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for {
		if !s.writerWorkLocked() {
			s.writer = writerIdle
			return nil, grant{}, 0, writeBatch, false
		}
		switch {
		case len(s.out) > 0:
			batch := maxBatch
			if s.raw == nil {
				batch = smallBatch
			}
			n, g, wait := take(s.tuning.writeLimits(), min(s.outLen, batch))
			if wait > 0 {
				s.sleepLocked(wait)
				continue
			}
			s.inflight = n
			bufs := s.takeOutLocked(n)
			return bufs, g, s.armWriteLocked(), writeBatch, true
		case !peeked && s.awaitsAckLocked():
			return nil, grant{}, 0, writePeekInput, true
		case s.phase == flushing && s.lingersLocked() && s.wside != writeShut:
			// Flushed, and the peer is still sending: shut the write
			// side, then linger (shutWrite).
		case s.phase == flushing:
			s.writer = writerIdle
			if s.lingersLocked() {
				s.lingerLocked() // shut already (CloseWrite)
			} else {
				s.dieLocked(false)
			}
			return nil, grant{}, 0, writeBatch, false
		}
		return nil, grant{}, 0, writeShutSide, true
	}
}

// takeOutLocked takes n bytes of queued output for the writer. mu is held.
func (s *Socket) takeOutLocked(n int) [][]byte {
	var bufs [][]byte
	for n > 0 {
		b := s.out[0]
		if len(b) > n {
			bufs = append(bufs, b[:n:n])
			s.out[0] = b[n:]
			break
		}
		bufs = append(bufs, b)
		s.out[0] = nil
		s.out = s.out[1:]
		n -= len(b)
	}
	if len(s.out) == 0 {
		s.out = nil
	}
	return bufs
}

// wrote accounts for a write of n bytes, with rest unwritten after err, and
// reports whether the writer goes on.
func (s *Socket) wrote(n int, rest [][]byte, err error) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.inflight = 0
	s.cond.Broadcast() // settleWriteLocked
	if s.outputDroppedLocked() {
		s.writer = writerIdle
		return false
	}
	s.wroteLocked(n)
	switch {
	case err == nil:
		return true
	case deadlinePassed(err) && s.notifyTimeouts && s.phase == open:
		// NotifyTimeouts: keep the socket, hold the output, tell the event-cb.
		s.out = append(rest, s.out...)
		s.enabled &^= EvWrite
		s.timeoutsChangedLocked(EvWrite)
		ev := newEvent(s, err)
		ev.Dir = EvWrite
		s.dispatch(func() { s.emit(ev) }, false)
		return true
	}
	s.writer = writerIdle
	end := s.writeFailedLocked(err)
	if end != nil {
		s.dispatch(end, false)
	}
	return false
}

// writeFailedLocked drops the output after a failed write and claims the
// socket's event (see claimLocked). mu is held.
func (s *Socket) writeFailedLocked(err error) func() {
	s.wside = writeFailed
	s.out, s.outLen = nil, 0
	wake(&s.outWait)
	ev := newEvent(s, err)
	ev.Dir = EvWrite
	return s.claimLocked(ev)
}

// closeWriter is a conn that can shut its write side alone (TCP, Unix,
// TLS): CloseWrite, and a lingering close, need one.
type closeWriter interface{ CloseWrite() error }

// shutWrite shuts the write side of the conn (CloseWrite); once the peer
// has shut its side too, the socket closes by itself.
func (s *Socket) shutWrite() {
	err := errors.ErrUnsupported
	if cw, ok := s.conn.(closeWriter); ok {
		err = cw.CloseWrite()
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.phase == dead {
		return
	}
	if err != nil {
		if end := s.writeFailedLocked(err); end != nil {
			s.dispatch(end, false)
		}
		return
	}
	s.wside = writeShut
	wake(&s.outWait)
	if s.phase == flushing {
		s.lingerLocked()
		return
	}
	s.shutIfBothLocked()
}

// writeOut writes bufs to the conn, with writev where the conn has it,
// under the write clock armed for it (clock is its generation). On a
// descriptor conn a write that times out after some bytes goes on with a
// fresh deadline: only a write that makes no progress for the timeout
// fails. It returns what it wrote, and on an error what is left.
func (s *Socket) writeOut(bufs [][]byte, clock uint64) (int, [][]byte, error) {
	nb := net.Buffers(bufs)
	total := 0
	for len(nb) > 0 {
		n, err := nb.WriteTo(s.conn)
		total += int(n)
		if err == nil {
			continue
		}
		if s.raw == nil || !deadlinePassed(err) || (n == 0 && s.writeTimedOut(clock)) {
			s.stopStall()
			return total, nb, err
		}
		clock = s.armWrite()
	}
	s.stopStall()
	return total, nil, nil
}
