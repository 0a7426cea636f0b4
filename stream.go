package asynctcp

import (
	"errors"
	"io"
	"net"
	"os"
	"sync"
	"time"
)

// streamWriteLimit is how much queued output makes Stream.Write block.
const streamWriteLimit = 1 << 20

// Stream is cl-async's async-io-stream: a view of a socket as a net.Conn.
// It reads from the socket's input buffer (filled in stream mode:
// ConnectStream, ListenStream, DontDrainReadBuffer) and writes to its output
// buffer, so it can be handed to anything that takes a net.Conn or an
// io.Reader: bufio, io.Copy, crypto/tls, net/http. Its methods are safe
// from any goroutine; deadlines belong to each Stream of a socket.
//
// A callback of the socket may read what is buffered, but must not wait in
// Read for more: the bytes it waits for arrive through the same socket.
type Stream struct {
	s   *Socket
	rdl deadline
	wdl deadline
}

// NewStream is (make-instance 'async-io-stream :socket s): a stream over
// the input and output buffers of s, usable beside the socket's callbacks.
// On a socket that is not in stream mode the read-cb takes the input, so
// Read only sees the end of the stream.
func NewStream(s *Socket) *Stream { return &Stream{s: s} }

// Socket returns the stream's socket.
func (st *Stream) Socket() *Socket { return st.s }

// Read reads what is buffered into p. It blocks only while nothing is, and
// returns the rest of the input, then io.EOF after the peer closed (or the
// event that ended the socket, after an error), or a timeout at the read
// deadline (a net.Error whose Timeout is true; the socket stays open).
func (st *Stream) Read(p []byte) (int, error) {
	if st == nil || st.s == nil {
		return 0, nilSocket("Stream.Read")
	}
	st.s.mu.Lock()
	defer st.s.mu.Unlock()
	if len(p) > 0 {
		if err := st.awaitInputLocked(); err != nil {
			return 0, err
		}
	}
	n, err, _ := st.takeLocked(p)
	return n, err
}

// awaitInputLocked waits until input is buffered, and returns nil then, or
// what a read returns instead: the end of the input, the socket's close,
// or a timeout at the read deadline, which counts even with input
// buffered, as net.Conn's does. s.mu is held.
func (st *Stream) awaitInputLocked() error {
	s := st.s
	for {
		if st.rdl.passed() {
			return os.ErrDeadlineExceeded
		}
		if ready, err := s.inputLocked(); ready || err != nil {
			return err
		}
		s.awaitLocked(&s.inWait, &st.rdl)
	}
}

// takeLocked reads from the input buffer, without blocking; done is false when
// the caller would have to wait. s.mu is held.
func (st *Stream) takeLocked(p []byte) (n int, err error, done bool) {
	s := st.s
	if len(p) == 0 && s.closer != byApp {
		return 0, nil, true
	}
	ready, err := s.inputLocked()
	switch {
	case err != nil:
		return 0, err, true
	case !ready:
		return 0, nil, false
	}
	n = s.in.read(p)
	s.cond.Broadcast() // the reader may go on where the buffer was full
	return n, nil, true
}

// inputLocked says what a stream read finds: input (ready), the end of
// the reading with what a read returns then (err), or neither, where it
// has to wait. s.mu is held.
func (s *Socket) inputLocked() (ready bool, err error) {
	switch {
	case s.closer == byApp:
		return false, closedError(s)
	case s.in.len() > 0:
		return true, nil
	case s.inEnd != nil:
		return false, s.inEnd
	case s.closer != nobody || s.phase == dead:
		return false, closedError(s)
	}
	return false, nil
}

// input is a stream-mode socket's input buffer: the chunks the reader
// received, oldest first. Chunks rather than one growing slice: a reader
// ahead of the application would otherwise copy what is buffered each
// time the slice grew (with 1 MiB buffered, several copies of every byte).
// A large read keeps the reader's pooled buffer as its chunk, uncopied,
// and the buffer goes back to the pool once its bytes are consumed; small
// reads share chunks of their own. It is guarded by the socket's mu.
type input struct {
	chunks []chunk // chunks[head:] are buffered; the list is reused once drained
	head   int
	n      int // bytes buffered
}

// chunk is a run of bytes read: buffered in stream mode, or on its way to
// a read-cb (received). Where b lies in a pooled read buffer,
// pool is that buffer: it is owned by whoever holds the chunk, and given
// back with putBuf once nothing refers to it. A chunk whose bytes code
// that may keep a slice has seen is never given back (the garbage
// collector takes it).
type chunk struct {
	b    []byte
	pool *[]byte
}

// release gives a consumed chunk's pooled buffer back.
func (c chunk) release() {
	if c.pool != nil {
		putBuf(c.pool)
	}
}

// inputChunk is the chunk that small reads share.
const inputChunk = 4 << 10

// keepRead is the smallest read that keeps its pooled buffer (32 KiB)
// instead of being copied: large enough that a buffer holds at most twice
// the bytes it carries, so that the input limit still bounds the memory.
const keepRead = readBufSize / 2

// maxSpareChunks is the largest chunk list kept for reuse once drained:
// room for the default input limit (1 MiB) in large reads, 2 KiB. A
// socket whose application falls behind fills that many, and dropping the
// list each time it drains would grow it again from one chunk.
const maxSpareChunks = 2 * defaultInputLimit / readBufSize

// len returns the number of bytes buffered.
func (in *input) len() int { return in.n }

// add takes the n bytes read into the pooled buffer buf, which it owns
// from then on: it keeps buf as a chunk for a large read, and otherwise
// copies the bytes into the last chunk where they fit, or a new one, and
// gives buf back.
func (in *input) add(buf *[]byte, n int) {
	p := (*buf)[:n]
	in.n += n
	if n >= keepRead {
		in.push(chunk{b: p, pool: buf})
		return
	}
	defer putBuf(buf)
	if k := len(in.chunks); k > in.head {
		// The last chunk's spare room is the input's own, pooled or not:
		// nothing past its bytes is referred to.
		if last := in.chunks[k-1].b; cap(last)-len(last) >= n {
			in.chunks[k-1].b = append(last, p...)
			return
		}
	}
	c := make([]byte, n, max(n, inputChunk)) // small reads share a chunk
	copy(c, p)
	in.push(chunk{b: c})
}

// push appends c to the list. Where the list is full and at least half of
// it lies before head, the buffered chunks move down to make room, so
// that a list that never quite drains does not grow.
func (in *input) push(c chunk) {
	if k := len(in.chunks); k == cap(in.chunks) && in.head > 0 && in.head >= k/2 {
		live := copy(in.chunks, in.chunks[in.head:])
		clear(in.chunks[live:])
		in.chunks, in.head = in.chunks[:live], 0
	}
	in.chunks = append(in.chunks, c)
}

// read copies up to len(p) bytes out, and drops them.
func (in *input) read(p []byte) int {
	n := 0
	for n < len(p) && in.n > 0 {
		c := copy(p[n:], in.chunks[in.head].b)
		in.drop(c)
		n += c
	}
	return n
}

// drop drops the first n bytes, and gives back the pooled buffers that
// held them.
func (in *input) drop(n int) {
	for n > 0 {
		c := &in.chunks[in.head]
		if n < len(c.b) {
			c.b = c.b[n:]
			in.n -= n
			return
		}
		n -= len(c.b)
		in.popFront().release()
	}
}

// popFront takes the first chunk off the list.
func (in *input) popFront() chunk {
	c := in.chunks[in.head]
	in.chunks[in.head] = chunk{}
	in.head++
	in.n -= len(c.b)
	if in.head == len(in.chunks) {
		in.head = 0
		in.chunks = in.chunks[:0]
		if cap(in.chunks) > maxSpareChunks {
			in.chunks = nil // let a long list go
		}
	}
	return c
}

// pushFront puts c back in front, where it was taken from.
func (in *input) pushFront(c chunk) {
	in.n += len(c.b)
	if in.head > 0 {
		in.head--
		in.chunks[in.head] = c
		return
	}
	in.chunks = append(in.chunks, chunk{})
	copy(in.chunks[1:], in.chunks)
	in.chunks[0] = c
}

// takeAll empties the buffer and returns what it held. The caller owns
// the chunks: it gives each back (release) once nothing refers to its
// bytes, or lets the garbage collector take it.
func (in *input) takeAll() []chunk {
	c := in.chunks[in.head:]
	in.chunks, in.head, in.n = nil, 0, 0
	return c
}

// TryRead reads what is buffered into p and never blocks: it returns
// (0, nil) when nothing is, and io.EOF (or the socket's event) once the
// input has ended.
func (st *Stream) TryRead(p []byte) (int, error) {
	if st == nil || st.s == nil {
		return 0, nilSocket("Stream.TryRead")
	}
	st.s.mu.Lock()
	defer st.s.mu.Unlock()
	n, err, _ := st.takeLocked(p)
	return n, err
}

// ReadByte reads one byte, blocking like Read.
func (st *Stream) ReadByte() (byte, error) {
	var b [1]byte
	for {
		n, err := st.Read(b[:])
		if n == 1 {
			return b[0], nil
		}
		if err != nil {
			return 0, err
		}
	}
}

// WriteTo is io.WriterTo, which io.Copy uses: it writes the input to w
// as it arrives, straight from the input buffer, until the input ends. It
// blocks for input as Read does, and returns the number of bytes written
// with nil after the peer's EOF, the socket's event after an error, the
// ErrSocketClosed event once the application closed the socket, or a
// timeout at the read deadline (checked before each write to w, which it
// does not bound). Where w fails, WriteTo returns w's error (or
// io.ErrShortWrite where w took less without one); the bytes w did not
// take stay buffered, and a later Read returns them.
//
// Where w is a Stream, WriteTo writes to it only once the output queued
// on it has been written (or its write deadline has passed, or it can no
// longer write): the input then goes to w's connection as it is, rather
// than being copied into w's output queue, and w queues at most what its
// connection did not take of one write, not the 1 MiB that w.Write
// allows. Until then the input stays buffered, up to the input limit.
func (st *Stream) WriteTo(w io.Writer) (int64, error) {
	if st == nil || st.s == nil {
		return 0, nilSocket("Stream.WriteTo")
	}
	dst, _ := w.(*Stream)
	// The input's pooled buffers go back to the pool only after a writer
	// known to keep no slice (io.Writer's rule, which a writer may break:
	// a reused buffer would show it another socket's bytes).
	keepsNone := dst != nil
	if _, ok := w.(*Socket); ok {
		keepsNone = true
	}
	var total int64
	for {
		if dst != nil {
			dst.awaitWritten() // with the input left as it is meanwhile
		}
		c, err := st.nextChunk()
		if err == io.EOF {
			return total, nil
		}
		if err != nil {
			return total, err
		}
		n, err := w.Write(c.b)
		if n < 0 || n > len(c.b) {
			n, err = 0, errInvalidWrite
		}
		total += int64(n)
		if n < len(c.b) && err == nil {
			err = io.ErrShortWrite
		}
		st.s.putBack(c, n, keepsNone)
		if err != nil {
			return total, err
		}
	}
}

// awaitWritten waits until the output queued on the stream's socket has
// been written, or until no more will be: the socket or its write side
// closed or failed, or the write deadline passed (a Write then says
// which).
func (st *Stream) awaitWritten() {
	s := st.s
	if s == nil {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	for s.outLen > 0 && !s.writeClosedLocked() && !st.wdl.passed() {
		s.awaitLocked(&s.outWait, &st.wdl)
	}
}

// errInvalidWrite is WriteTo's error for a writer that reports an
// impossible count, as io.Copy's.
var errInvalidWrite = errors.New("asynctcp: invalid write result")

// nextChunk waits for input, as Read does, and takes the first chunk off
// the input buffer.
func (st *Stream) nextChunk() (chunk, error) {
	s := st.s
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := st.awaitInputLocked(); err != nil {
		return chunk{}, err
	}
	c := s.in.popFront()
	s.cond.Broadcast() // the reader may go on where the buffer was full
	return c, nil
}

// putBack returns a chunk that WriteTo took, after n of its bytes were
// written: the rest goes back in front of the input, and a pooled buffer
// that is done with goes back to the pool where nothing may refer to it
// (keepsNone); otherwise the garbage collector takes it.
func (s *Socket) putBack(c chunk, n int, keepsNone bool) {
	if !keepsNone {
		c.pool = nil
	}
	if n == len(c.b) {
		c.release()
		return
	}
	c.b = c.b[n:]
	s.mu.Lock()
	defer s.mu.Unlock()
	s.in.pushFront(c)
	wake(&s.inWait)
}

// Write queues p on the socket's output buffer and returns len(p). It
// blocks only while more than 1 MiB is queued (or, with MaxBuffered, until
// its bytes fit, queueing a larger write in pieces), up to the write
// deadline: then it returns what it queued and a timeout. It returns the
// socket's ErrSocketClosed event once the socket (or its write side) is
// closed, and a Write blocked for room returns then too (Close,
// Socket.Close, CloseWrite, Abort).
func (st *Stream) Write(p []byte) (int, error) {
	if st == nil || st.s == nil {
		return 0, nilSocket("Stream.Write")
	}
	s := st.s
	s.mu.Lock()
	defer s.mu.Unlock()
	n := 0
	for {
		switch {
		case s.wside == writeFailed && s.inEnd != nil:
			return n, s.inEnd
		case s.writeClosedLocked():
			return n, closedError(s)
		case st.wdl.passed():
			return n, os.ErrDeadlineExceeded
		}
		if room := s.streamRoomLocked(len(p)); room > 0 || len(p) == 0 {
			if s.queueLocked(p[:room]) {
				// Written inline: outside the lock, as WriteData does.
				s.mu.Unlock()
				s.writeInline(p[:room])
				s.mu.Lock()
			}
			n += room
			if p = p[room:]; len(p) == 0 {
				return n, nil
			}
			continue
		}
		s.awaitLocked(&s.outWait, &st.wdl)
	}
}

// awaitLocked waits, with s.mu released, until the next wake of ch or until dl
// has passed. s.mu is held.
func (s *Socket) awaitLocked(ch *chan struct{}, dl *deadline) {
	woken := waiter(ch)
	s.mu.Unlock()
	select {
	case <-woken:
	case <-dl.done():
	}
	s.mu.Lock()
}

// streamRoomLocked returns how many of n bytes Stream.Write may queue now.
// s.mu is held.
func (s *Socket) streamRoomLocked(n int) int {
	switch {
	case s.maxBuf > 0:
		return max(min(n, s.maxBuf-s.outLen), 0)
	case s.outLen <= streamWriteLimit:
		return n
	}
	return 0
}

// WriteString is Write of the string's bytes.
func (st *Stream) WriteString(str string) (int, error) { return st.Write([]byte(str)) }

// WriteByte is Write of one byte.
func (st *Stream) WriteByte(c byte) error {
	_, err := st.Write([]byte{c})
	return err
}

// Buffered returns the number of input bytes that Read returns without
// blocking.
func (st *Stream) Buffered() int {
	if st == nil || st.s == nil {
		return 0
	}
	st.s.mu.Lock()
	defer st.s.mu.Unlock()
	return st.s.in.len()
}

// ClearInput is clear-input: it drops the buffered input.
func (st *Stream) ClearInput() {
	if st == nil || st.s == nil {
		return
	}
	st.s.mu.Lock()
	defer st.s.mu.Unlock()
	st.s.in.drop(st.s.in.len())
	st.s.cond.Broadcast()
}

// ClearOutput is clear-output: it drops the output queued and not yet
// being written.
func (st *Stream) ClearOutput() {
	if st == nil || st.s == nil {
		return
	}
	s := st.s
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, b := range s.out {
		s.outLen -= len(b)
	}
	s.out = nil
	wake(&s.outWait)
}

// Flush is finish-output: it waits until the queued output has been
// written to the connection, and returns nil then, the socket's error if it
// ended first, or a timeout at the write deadline.
func (st *Stream) Flush() error {
	if st == nil || st.s == nil {
		return nilSocket("Stream.Flush")
	}
	s := st.s
	s.mu.Lock()
	defer s.mu.Unlock()
	for {
		switch {
		case s.wside == writeFailed && s.inEnd != nil:
			return s.inEnd
		case s.outLen == 0 && !s.dropped:
			return nil
		case s.phase == dead:
			return closedError(s)
		case st.wdl.passed():
			return os.ErrDeadlineExceeded
		}
		s.awaitLocked(&s.outWait, &st.wdl)
	}
}

// Close closes the socket gracefully (Socket.Close). It returns nil where
// asynctcp closed the socket already after its EOF or error, as net.Conn
// does, and an ErrSocketClosed event where the application had.
func (st *Stream) Close() error {
	if st == nil || st.s == nil {
		return nilSocket("Stream.Close")
	}
	s := st.s
	s.mu.Lock()
	if s.closer == bySelf {
		s.closer = byApp // from now on, closed by the application
		s.mu.Unlock()
		return nil
	}
	s.mu.Unlock()
	return s.Close()
}

// LocalAddr returns the local address of the connection.
func (st *Stream) LocalAddr() net.Addr { return st.s.LocalAddr() }

// RemoteAddr returns the peer's address.
func (st *Stream) RemoteAddr() net.Addr { return st.s.RemoteAddr() }

// SetDeadline sets the read and write deadlines of the stream.
func (st *Stream) SetDeadline(t time.Time) error {
	st.rdl.set(t)
	st.wdl.set(t)
	return nil
}

// SetReadDeadline bounds the stream's blocking reads: at t, a blocked or
// later Read returns a timeout; the zero time means none. It does not
// touch the socket or its read timeout.
func (st *Stream) SetReadDeadline(t time.Time) error {
	st.rdl.set(t)
	return nil
}

// SetWriteDeadline bounds the stream's blocking writes and Flush, as
// SetReadDeadline does reads.
func (st *Stream) SetWriteDeadline(t time.Time) error {
	st.wdl.set(t)
	return nil
}

// deadline is one deadline of a stream: its channel is closed once the
// deadline has passed, and replaced when a new deadline is set after.
type deadline struct {
	mu    sync.Mutex
	timer *time.Timer
	gen   uint64 // the timer of an older deadline closes nothing
	ch    chan struct{}
}

func (d *deadline) set(t time.Time) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.gen++
	if d.timer != nil {
		d.timer.Stop()
		d.timer = nil
	}
	expired := d.ch != nil && closed(d.ch)
	if t.IsZero() || time.Until(t) > 0 {
		if expired || d.ch == nil {
			d.ch = make(chan struct{})
		}
		if !t.IsZero() {
			gen, ch := d.gen, d.ch
			d.timer = time.AfterFunc(time.Until(t), func() { d.expire(gen, ch) })
		}
		return
	}
	if d.ch == nil {
		d.ch = make(chan struct{})
	}
	if !expired {
		close(d.ch)
	}
}

func (d *deadline) expire(gen uint64, ch chan struct{}) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.gen == gen && !closed(ch) {
		close(ch)
	}
}

// done returns a channel closed once the deadline has passed.
func (d *deadline) done() <-chan struct{} {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.ch == nil {
		d.ch = make(chan struct{})
	}
	return d.ch
}

func (d *deadline) passed() bool { return closed(d.done()) }

func closed[T any](ch <-chan T) bool {
	select {
	case <-ch:
		return true
	default:
		return false
	}
}

var _ net.Conn = (*Stream)(nil)
var _ io.ByteReader = (*Stream)(nil)
var _ io.WriterTo = (*Stream)(nil)
