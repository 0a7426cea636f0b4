package asynctcp

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"time"

	"golang.org/x/sync/errgroup"
)

// Events names the directions of a socket for Enable and Disable.
type Events uint8

// The directions of a socket.
const (
	EvRead  Events = 1 << iota // reading from the connection
	EvWrite                    // writing queued output to the connection
)

// String names the directions, as "EvRead|EvWrite".
func (ev Events) String() string {
	switch ev {
	case EvRead:
		return "EvRead"
	case EvWrite:
		return "EvWrite"
	case EvRead | EvWrite:
		return "EvRead|EvWrite"
	}
	return fmt.Sprintf("Events(%d)", uint8(ev))
}

// state is where a socket is in its life.
type state uint8

const (
	connecting state = iota // dialing (or handshaking)
	open                    // reading and writing
	flushing                // closed gracefully: writing what is queued, then closing
	dead                    // the connection is closed (or never came up)
)

// readBufSize is the most one read takes from the connection.
const readBufSize = 64 << 10

var errNilSocket = errors.New("asynctcp: nil *Socket")

// Socket is cl-async's socket: one connection with a reader goroutine, a
// writer goroutine draining its output buffer, and a queue on which its
// callbacks run one at a time. Its methods are safe to call from any
// goroutine, inside or outside its callbacks.
type Socket struct {
	loop    *Loop
	server  *Server // the server that accepted it; nil for Connect and Wrap
	wrapped bool    // made by Wrap
	grp     errgroup.Group
	stream  *Stream // the view given to stream-mode callbacks

	mu             sync.Mutex
	rcond          sync.Cond // the reader waits here while reading is disabled
	wcond          sync.Cond // the writer waits here for output
	state          state
	closed         bool // Close or Abort was called, or the socket closed after its event
	failed         bool // an EOF or error event was dispatched (rule 6)
	conn           net.Conn
	data           any
	read           ReadFunc
	sread          StreamFunc
	event          EventFunc
	write          WriteFunc
	connectCb      ConnectFunc
	streaming      bool // stream mode: input stays in the input buffer
	enabled        Events
	rgen           uint64 // bumped where the read deadline is lifted under the reader
	wgen           uint64 // likewise for the write deadline
	rtimeout       time.Duration
	wtimeout       time.Duration
	out            [][]byte // queued output, oldest first
	outLen         int      // bytes queued, including those being written
	wgone          bool     // the writer ended on an error
	dropped        bool     // the socket ended with output unwritten
	inflight       bool     // the writer is writing
	settling       bool     // the reader waits for the write in flight (settleWrite)
	selfClosed     bool     // closed by asynctcp after an event, not by the application
	rerr           error    // what reads return once the input is drained: io.EOF or the event
	in             []byte   // stream mode: received bytes not yet read
	inLimit        int
	inWait         chan struct{} // closed when input, EOF or an error arrives
	outWait        chan struct{} // closed when output is written or the socket ends
	notifying      bool          // a stream notification is queued and has not started
	renotify       bool          // a notification was held back while reading was disabled
	lowWater       int           // the write-cb runs when output falls to this
	highWater      int           // Writable is false from here; 0: no high watermark
	maxBuf         int           // WriteData refuses to queue past this; 0: no bound
	halfOpen       bool          // AllowHalfOpen
	wshut          bool          // CloseWrite was called: shut the write side once flushed
	wdone          bool          // the write side is shut
	rshut          bool          // the peer's EOF was delivered on a half-open socket
	notifyTimeouts bool
	rlims          []*limit // read rate limits: the socket's own, its groups'
	wlims          []*limit
	cancel         context.CancelFunc // stops a dial or handshake
	raw            *rawIO             // direct descriptor I/O, where the conn has it
	writerOn       bool               // the writer goroutine runs
	hopping        bool               // the read deadline is the idle hop's
	hopAt          time.Time          // when the idle hop's deadline passes
	reuse          bool               // ReuseReadBuffer

	qmu      sync.Mutex
	queue    []func() // callbacks waiting to run
	draining bool     // a goroutine is running the queue
	readDone chan bool
}

func newSocket(l *Loop, srv *Server, cfg *config, read ReadFunc, sread StreamFunc, event EventFunc, streaming bool) *Socket {
	s := &Socket{
		loop:           l,
		server:         srv,
		read:           read,
		sread:          sread,
		event:          event,
		write:          cfg.onWrite,
		connectCb:      cfg.onConnect,
		streaming:      streaming || cfg.dontDrain,
		inLimit:        cfg.inputLimit,
		lowWater:       cfg.lowWater,
		highWater:      cfg.highWater,
		maxBuf:         cfg.maxBuffered,
		halfOpen:       cfg.halfOpen,
		notifyTimeouts: cfg.notifyTimeouts,
		reuse:          cfg.reuse,
		enabled:        EvRead | EvWrite,
		rtimeout:       cfg.readTimeout,
		wtimeout:       cfg.writeTimeout,
	}
	var greads, gwrites []*limit
	for _, g := range cfg.groups {
		g.members.Add(1)
		greads = append(greads, &g.read)
		gwrites = append(gwrites, &g.write)
	}
	s.rlims = limits(cfg.readRate, greads)
	s.wlims = limits(cfg.writeRate, gwrites)
	s.rcond.L = &s.mu
	s.wcond.L = &s.mu
	if s.streaming {
		s.stream = NewStream(s)
	}
	if len(cfg.data) > 0 {
		s.out = [][]byte{cfg.data}
		s.outLen = len(cfg.data)
	}
	l.addSocket(s)
	return s
}

// start brings the socket up in the background with connect (a dial, or
// a TLS handshake on an accepted conn), bounded by the connect timeout and
// cancelled by Abort, then runs it.
func (s *Socket) start(connect func(ctx context.Context) (net.Conn, error)) {
	ctx, cancel := context.WithCancel(context.Background())
	s.cancel = cancel
	s.grp.Go(func() error {
		defer cancel()
		if t := s.connectTimeout(); t > 0 {
			var stop context.CancelFunc
			ctx, stop = context.WithTimeout(ctx, t)
			defer stop()
		}
		conn, err := connect(ctx)
		if err != nil && ctx.Err() == context.DeadlineExceeded {
			err = &connectTimeout{err} // whatever step ran out of time
		}
		if err != nil {
			s.fail(err, 0)
			return err
		}
		return s.run(conn)
	})
}

// dialer dials addr with d, then runs the TLS client handshake where one is
// configured.
func dialer(d *net.Dialer, addr, host string, cfg *tls.Config) func(context.Context) (net.Conn, error) {
	if d == nil {
		d = &net.Dialer{}
	}
	return func(ctx context.Context) (net.Conn, error) {
		if d.Timeout > 0 {
			// The Dialer's own timeout bounds the whole connect, as
			// tls.DialWithDialer's does, and is a connect timeout too,
			// whichever step (lookup, dial, handshake) it cuts short.
			var stop context.CancelFunc
			ctx, stop = context.WithTimeout(ctx, d.Timeout)
			defer stop()
		}
		conn, err := dialTLS(ctx, d, addr, host, cfg)
		if err != nil && ctx.Err() == context.DeadlineExceeded {
			return nil, &connectTimeout{err}
		}
		return conn, err
	}
}

func dialTLS(ctx context.Context, d *net.Dialer, addr, host string, cfg *tls.Config) (net.Conn, error) {
	conn, err := d.DialContext(ctx, "tcp", addr)
	if err != nil || cfg == nil {
		return conn, err
	}
	if cfg.ServerName == "" {
		cfg = cfg.Clone()
		cfg.ServerName = host
	}
	return handshake(ctx, tls.Client(conn, cfg))
}

func handshake(ctx context.Context, tc *tls.Conn) (net.Conn, error) {
	if err := tc.HandshakeContext(ctx); err != nil {
		tc.Close()
		return nil, err
	}
	return tc, nil
}

// run brings up a socket whose connect just succeeded.
func (s *Socket) run(conn net.Conn) error {
	s.adopt(conn)
	return nil
}

// adopt brings the socket up on an established conn: it starts the reader
// (a fresh goroutine, so that an idle socket's parked stack stays small)
// and, where output is queued, the writer. A socket closed while
// connecting only flushes.
func (s *Socket) adopt(conn net.Conn) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.attach(conn) {
		s.grp.Go(s.readLoop)
	}
}

// attach gives the socket its conn and starts the writer where output is
// queued. It reports whether the socket is open to read. s.mu is held.
func (s *Socket) attach(conn net.Conn) bool {
	if s.state == dead {
		conn.Close()
		return false
	}
	s.conn = conn
	s.raw = newRawIO(conn)
	if s.cancel != nil {
		s.cancel() // the connect is over: release its context
	}
	if s.state == flushing {
		s.kick() // closed while connecting: only flush
		return false
	}
	s.state = open
	// The connect-cb is queued before anything can queue a write-cb or a
	// read-cb; the reader runs it when it starts.
	s.qmu.Lock()
	s.queue = append(s.queue, s.connected)
	s.qmu.Unlock()
	s.kick()
	return true
}

func (s *Socket) connected() {
	s.mu.Lock()
	cb := s.connectCb
	skip := s.closed
	s.mu.Unlock()
	if skip || cb == nil {
		return
	}
	s.invoke(func() { cb(s) })
}

// readLoop reads the connection until it fails or the socket stops reading.
// Each chunk goes to the read-cb before the next read, so a slow callback
// slows the peer, not memory; in stream mode chunks go to the input buffer,
// which is bounded by the input limit.
//
// It runs the connect-cb first, unless a write-cb's goroutine runs the
// queue already; in stream mode a callback may block in Stream.Read, so
// none runs on the reader.
func (s *Socket) readLoop() error {
	s.runQueue(!s.streaming) // the connect-cb, queued by attach
	return s.reads(s.connectCb != nil)
}

// idleHop is how long a reader that has run callbacks stays idle before it
// hands its place to a fresh goroutine. Callbacks grow the reader's stack,
// and the runtime never shrinks a stack below 4 KiB under a parked
// goroutine; a fresh one parks on 2 KiB, which is most of what an idle
// socket costs.
const idleHop = 250 * time.Millisecond

// hop is the reader that takes over after idleHop.
func (s *Socket) hop() error { return s.reads(false) }

// reads is the reader's loop; worked tells whether this goroutine has run
// callbacks yet.
func (s *Socket) reads(worked bool) error {
	for {
		room, gen, ok := s.beforeRead(readBufSize, worked)
		if !ok {
			return nil
		}
		var buf *[]byte
		var n int
		var err error
		if s.raw != nil { // no buffer held while waiting
			buf, n, err = s.raw.readSome(room)
		} else {
			buf, n, err = readConn(s.conn, room)
		}
		spend(s.rlims, n)
		if n > 0 {
			worked = true
			if !s.received(buf, n) {
				return nil
			}
		}
		if err == nil {
			continue
		}
		switch s.readFailed(err, gen) {
		case readOn:
			continue
		case readHop:
			s.grp.Go(s.hop)
		}
		return nil
	}
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

// received passes the n bytes read into buf to the read-cb, or to the input
// buffer in stream mode, and gives buf back to the pool. It reports false
// once the socket no longer reads.
func (s *Socket) received(buf *[]byte, n int) bool {
	p := (*buf)[:n]
	if !s.streaming && s.reuse {
		more := s.deliver(p) // valid until the read-cb returns
		putBuf(buf)
		return more
	}
	if !s.streaming {
		data := make([]byte, n) // fresh: the read-cb may keep it (rule 3)
		copy(data, p)
		putBuf(buf) // not held while the read-cb waits or runs
		return s.deliver(data)
	}
	s.mu.Lock()
	defer putBuf(buf)
	if s.state != open {
		s.mu.Unlock()
		return false
	}
	s.in = append(s.in, p...)
	wake(&s.inWait)
	notify := !s.notifying
	s.notifying = true
	s.mu.Unlock()
	if notify {
		s.dispatch(s.notify, false)
	}
	return true
}

// notify runs the stream-mode read-cb: it tells the application that the
// stream has bytes to read.
func (s *Socket) notify() {
	s.mu.Lock()
	s.notifying = false
	s.renotify = s.enabled&EvRead == 0 && len(s.in) > 0
	skip := s.closed || s.enabled&EvRead == 0 || len(s.in) == 0
	read, sread := s.read, s.sread
	s.mu.Unlock()
	switch {
	case skip:
	case sread != nil:
		s.invoke(func() { sread(s, s.stream) })
	case read != nil:
		s.invoke(func() { read(s, nil) })
	}
}

// wake closes a waiters' channel, if anyone waits on it.
func wake(ch *chan struct{}) {
	if *ch != nil {
		close(*ch)
		*ch = nil
	}
}

// waiter returns the channel that the next wake of ch closes.
func waiter(ch *chan struct{}) chan struct{} {
	if *ch == nil {
		*ch = make(chan struct{})
	}
	return *ch
}

// beforeRead waits while reading is disabled (or, in stream mode, the
// input buffer is full, or the read rate is spent), then arms the read
// timeout. It returns how much the next read may take, and false once the
// socket no longer reads.
func (s *Socket) beforeRead(want int, worked bool) (int, uint64, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for {
		for s.state == open && (s.enabled&EvRead == 0 || (s.streaming && len(s.in) >= s.inLimit)) {
			s.rcond.Wait()
		}
		if s.state != open {
			return 0, 0, false
		}
		n := want
		if s.streaming {
			n = min(n, s.inLimit-len(s.in))
		}
		n, wait := quota(s.rlims, n, time.Now())
		if wait == 0 {
			s.armReader(worked)
			return n, s.rgen, true
		}
		s.sleep(&s.rcond, wait)
	}
}

// sleep waits on c for at most d. s.mu is held.
func (s *Socket) sleep(c *sync.Cond, d time.Duration) {
	t := time.AfterFunc(d, func() {
		s.mu.Lock()
		c.Broadcast()
		s.mu.Unlock()
	})
	c.Wait()
	t.Stop()
}

// What the reader does after a read error.
const (
	readOn   = iota // read again
	readDone        // the reader is done
	readHop         // a fresh reader takes over (idleHop)
)

// readFailed handles a read error and says what the reader does next.
func (s *Socket) readFailed(err error, gen uint64) int {
	s.mu.Lock()
	if s.state != open {
		s.mu.Unlock()
		return readDone // we closed it: no event
	}
	if isTimeout(err) && s.hopping && s.rtimeout == 0 {
		s.mu.Unlock()
		return readHop
	}
	if isTimeout(err) && !s.readTimedOut(gen) {
		// The deadline was moved under the read (Disable, SetTimeouts):
		// not a timeout of this socket.
		s.mu.Unlock()
		return readOn
	}
	if isTimeout(err) && s.notifyTimeouts {
		// Rule 28: disable reading before the event-cb runs, so that an
		// Enable inside it holds.
		s.suspend(EvRead)
		s.enabled &^= EvRead
		s.mu.Unlock()
		ev := newEvent(s, err)
		ev.Dir = EvRead
		s.dispatch(func() { s.emit(ev) }, !s.streaming)
		return readOn
	}
	s.settleWrite()
	s.mu.Unlock()
	s.fail(err, EvRead)
	return readDone
}

// settleTime bounds how long a read failure waits for the write in flight.
const settleTime = 100 * time.Millisecond

// settleWrite waits, briefly, until a write in flight has been accounted
// for. A peer may answer a request and close before the writer, whose
// write the kernel already took, has run again; so the write-cb of the
// request comes before the EOF of the answer, not after the socket closed.
// A write blocked on a full connection ends the wait at settleTime. s.mu
// is held.
func (s *Socket) settleWrite() {
	if !s.inflight {
		return
	}
	expired := false
	t := time.AfterFunc(settleTime, func() {
		s.mu.Lock()
		expired = true
		s.rcond.Broadcast()
		s.mu.Unlock()
	})
	defer t.Stop()
	s.settling = true
	for s.inflight && !expired {
		s.rcond.Wait()
	}
	s.settling = false
}

// deliver hands data to the read-cb, waiting while reading is disabled. It
// reports false once the socket no longer reads.
func (s *Socket) deliver(data []byte) bool {
	for {
		s.mu.Lock()
		for s.state == open && s.enabled&EvRead == 0 {
			s.rcond.Wait()
		}
		if s.state != open {
			s.mu.Unlock()
			return false
		}
		s.mu.Unlock()
		if s.dispatchRead(data) {
			return true
		}
	}
}

// dispatchRead runs the read-cb on the dispatch queue and waits for it. It
// reports false where reading was disabled before the callback started:
// the data is then still the reader's.
func (s *Socket) dispatchRead(data []byte) bool {
	s.qmu.Lock()
	if !s.draining && len(s.queue) == 0 {
		// The queue is idle: run the read-cb here, without queueing it.
		s.draining = true
		s.qmu.Unlock()
		ok := s.readCallback(data)
		s.drain()
		return ok
	}
	if s.readDone == nil {
		s.readDone = make(chan bool, 1)
	}
	done := s.readDone
	s.queue = append(s.queue, func() { done <- s.readCallback(data) })
	idle := !s.draining
	s.draining = true
	s.qmu.Unlock()
	if idle {
		s.drain()
	}
	return <-done
}

// readCallback runs the read-cb with data, unless the socket is closed (the
// data is dropped) or reading was disabled (it reports false).
func (s *Socket) readCallback(data []byte) bool {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return true
	}
	if s.enabled&EvRead == 0 {
		s.mu.Unlock()
		return false
	}
	cb := s.read
	s.mu.Unlock()
	if cb != nil {
		s.invoke(func() { cb(s, data) })
	}
	return true
}

// writeLoop drains the output buffer into the connection. After CloseWrite
// it shuts the write side once the buffer is empty; after a graceful Close
// it writes what is queued, then closes the connection.
func (s *Socket) writeLoop() error {
	for {
		bufs, shut, ok := s.nextWrite()
		switch {
		case !ok:
			return nil
		case shut:
			if err := s.shutWrite(); err != nil {
				return err
			}
			continue
		}
		n, rest, err := s.writeOut(s.conn, bufs)
		spend(s.wlims, n)
		if err := s.wrote(n, rest, err); err != nil {
			return err
		}
	}
}

// nextWrite waits until there is output to write (taking all of it) or
// the write side to shut. It reports false once the writer is done.
func (s *Socket) nextWrite() (bufs [][]byte, shut, ok bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for {
		finishing := s.state == flushing || s.wshut // written even where EvWrite is disabled
		switch {
		case s.state == dead:
			s.writerOn = false
			return nil, false, false
		case len(s.out) > 0 && (s.enabled&EvWrite != 0 || finishing):
			n, wait := quota(s.wlims, s.outLen, time.Now())
			if wait == 0 {
				s.inflight = true
				return s.takeOut(n), false, true
			}
			s.sleep(&s.wcond, wait)
			continue
		case s.state == flushing && s.outLen == 0:
			s.writerOn = false
			s.die()
			return nil, false, false
		case s.wshut && !s.wdone && s.outLen == 0:
			return nil, true, true
		}
		s.writerOn = false // nothing to do: kick starts a writer again
		return nil, false, false
	}
}

// kick starts the writer where there is something for it to do and it
// does not run. The socket is not dead, so the errgroup has not been
// waited for. s.mu is held.
func (s *Socket) kick() {
	if s.writerOn || s.conn == nil || s.state == dead || s.state == connecting {
		return
	}
	finishing := s.state == flushing || s.wshut
	if (len(s.out) > 0 && (s.enabled&EvWrite != 0 || finishing)) ||
		(s.state == flushing && s.outLen == 0) || (s.wshut && !s.wdone && s.outLen == 0) {
		s.writerOn = true
		s.grp.Go(s.writeLoop)
	}
}

// takeOut takes up to n bytes of queued output for the writer; the writer
// is not writing, so everything queued is in s.out. s.mu is held.
func (s *Socket) takeOut(n int) [][]byte {
	if n >= s.outLen {
		bufs := s.out
		s.out = nil
		return bufs
	}
	var bufs [][]byte
	for n > 0 {
		b := s.out[0]
		if len(b) > n {
			bufs = append(bufs, b[:n:n])
			s.out[0] = b[n:]
			break
		}
		bufs = append(bufs, b)
		s.out = s.out[1:]
		n -= len(b)
	}
	return bufs
}

// wrote accounts for a write of n bytes: it wakes blocked Stream writers,
// runs the write-cb where the buffer fell to the low watermark, and handles
// a failure (it returns the error where the writer must end).
func (s *Socket) wrote(n int, rest [][]byte, err error) error {
	s.mu.Lock()
	before := s.outLen
	s.outLen -= n
	wake(&s.outWait)
	if err != nil {
		s.inflight = false
		if s.settling {
			s.rcond.Broadcast()
		}
	}
	if err != nil && isTimeout(err) && s.notifyTimeouts && s.state == open {
		// Rule 28: keep the socket, hold the output, tell the event-cb.
		s.out = append(rest, s.out...)
		s.suspend(EvWrite)
		s.enabled &^= EvWrite
		s.mu.Unlock()
		ev := newEvent(s, err)
		ev.Dir = EvWrite
		s.dispatch(func() { s.emit(ev) }, false)
		return nil
	}
	if err != nil {
		end := s.writeFailed(err)
		s.mu.Unlock()
		if end != nil {
			s.dispatch(end, false)
		}
		return err
	}
	if before > s.lowWater && s.outLen <= s.lowWater && s.write != nil {
		// Never on the writer: a write-cb may block in Stream.Write.
		// Queued before inflight clears: see settleWrite.
		s.dispatch(s.drained, false)
	}
	s.inflight = false
	if s.settling {
		s.rcond.Broadcast()
	}
	s.mu.Unlock()
	return nil
}

// writeFailed ends the writer on err and claims the socket's event (see
// claim). s.mu is held.
func (s *Socket) writeFailed(err error) func() {
	s.wgone = true
	s.writerOn = false
	s.out, s.outLen = nil, 0
	ev := newEvent(s, err)
	ev.Dir = EvWrite
	return s.claim(ev)
}

// shutWrite shuts the write side of the conn (CloseWrite); once the peer
// has shut its side too, the socket closes by itself (rule 27).
func (s *Socket) shutWrite() error {
	err := errors.ErrUnsupported
	if cw, ok := s.conn.(interface{ CloseWrite() error }); ok {
		err = cw.CloseWrite()
	}
	s.mu.Lock()
	s.wdone = true
	if err != nil {
		end := s.writeFailed(err)
		s.mu.Unlock()
		if end != nil {
			s.dispatch(end, false)
		}
		return err
	}
	both := s.rshut
	s.mu.Unlock()
	if both {
		s.shut(false)
	}
	return nil
}

func (s *Socket) drained() {
	s.mu.Lock()
	cb := s.write
	skip := s.closed
	s.mu.Unlock()
	if skip || cb == nil {
		return
	}
	s.invoke(func() { cb(s) })
}

// fail ends the socket with err, a failure of direction dir (0 for a
// connect): the event-cb gets it (once: rule 6), then the socket closes,
// gracefully after an EOF, at once otherwise. Where the application closed
// the socket already, there is no event: a failed dial or flush just ends
// it. A peer's EOF on a socket that allows half-open connections only ends
// reading. The event runs on the caller where the queue is idle, except on
// the writer.
func (s *Socket) fail(err error, dir Events) {
	ev := newEvent(s, err)
	ev.Dir = dir
	s.mu.Lock()
	end := s.claim(ev)
	s.mu.Unlock()
	if end != nil {
		s.dispatch(end, dir != EvWrite)
	}
}

// claim records ev as the end of the socket's input and, where it is the
// socket's first EOF or error, returns what delivers it (nil where there
// is nothing to deliver). Claiming under the lock that saw the failure
// keeps a reset that the writer saw first from passing for the plain EOF
// that the reader sees after it. s.mu is held.
func (s *Socket) claim(ev *Event) func() {
	eof := ev.Class == ErrTCPEOF && ev.Code == -1
	if s.rerr == nil {
		s.rerr = ev
		if eof {
			s.rerr = io.EOF
		}
		wake(&s.inWait)
	}
	if s.closed {
		s.die()
		return nil
	}
	if s.failed {
		return nil
	}
	halfOpen := eof && ev.Dir == EvRead && s.halfOpen
	s.failed = !halfOpen
	return func() {
		s.emit(ev)
		if halfOpen {
			s.readShut()
			return
		}
		s.shut(!eof) // a reset is aborted
	}
}

// readShut notes that the peer's EOF was delivered on a half-open socket;
// once the write side is shut too, the socket closes by itself.
func (s *Socket) readShut() {
	s.mu.Lock()
	s.rshut = true
	both := s.wdone
	s.mu.Unlock()
	if both {
		s.shut(false)
	}
}

// emit gives ev to the socket's event-cb, or the loop's handler. A panic in
// the event-cb goes to the loop's handler, never back to the event-cb.
func (s *Socket) emit(ev error) {
	s.mu.Lock()
	cb := s.event
	skip := s.closed
	s.mu.Unlock()
	if skip {
		return
	}
	if cb == nil {
		s.loop.handle(ev)
		return
	}
	if pe := s.loop.run(func() { cb(ev) }, s); pe != nil {
		s.loop.handle(pe)
	}
}

// invoke runs a read, write or connect callback. A recovered panic
// (CatchAppErrors) goes to the event-cb, and the socket is aborted.
func (s *Socket) invoke(f func()) {
	pe := s.loop.run(f, s)
	if pe == nil {
		return
	}
	s.mu.Lock()
	first := !s.failed
	s.failed = true
	s.mu.Unlock()
	if first {
		s.emit(pe)
	} else {
		s.loop.handle(pe)
	}
	s.shut(true)
}

// dispatch adds f to the socket's callback queue. If no goroutine is
// running the queue, the caller runs it when inline is set, else a new
// goroutine does. A callback never runs on an application's goroutine: the
// reader runs callbacks inline where it waits for them anyway, and no
// callback runs on the writer. Callers are the socket's own goroutines, or
// hold s.mu on a socket that is not dead, so the errgroup is not waited for
// yet when dispatch adds to it.
func (s *Socket) dispatch(f func(), inline bool) {
	s.qmu.Lock()
	s.queue = append(s.queue, f)
	s.qmu.Unlock()
	s.runQueue(inline)
}

// runQueue runs the queued callbacks where no goroutine runs them: on the
// caller when inline is set, else on a new goroutine of the socket.
func (s *Socket) runQueue(inline bool) {
	s.qmu.Lock()
	idle := !s.draining && len(s.queue) > 0
	if idle {
		s.draining = true
	}
	s.qmu.Unlock()
	switch {
	case !idle:
	case inline:
		s.drain()
	default:
		s.grp.Go(func() error { s.drain(); return nil })
	}
}

func (s *Socket) drain() {
	for {
		s.qmu.Lock()
		if len(s.queue) == 0 {
			s.draining = false
			s.queue = s.queue[:0]
			s.qmu.Unlock()
			return
		}
		f := s.queue[0]
		s.queue[0] = nil
		s.queue = s.queue[1:]
		s.qmu.Unlock()
		f()
	}
}

// shut closes the socket from inside: gracefully (flush first) or not.
// Where the application closed it already, shut leaves it as it is.
func (s *Socket) shut(abort bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		if abort && s.state != dead {
			s.die()
		}
		return
	}
	s.closed, s.selfClosed = true, true
	if abort {
		s.die()
		return
	}
	s.beginFlush()
}

// beginFlush stops reading and lets the writer flush, then close. s.mu is
// held.
func (s *Socket) beginFlush() {
	switch s.state {
	case connecting:
		if s.outLen == 0 {
			s.die()
			return
		}
		s.state = flushing
	case open:
		if s.wgone {
			s.die()
			return
		}
		if s.outLen == 0 && !s.writerOn {
			s.die() // nothing to flush
			return
		}
		s.state = flushing
		s.conn.SetReadDeadline(aLongTimeAgo) // wake the reader
		s.armFlush()
		s.rcond.Broadcast()
		s.wcond.Broadcast()
		s.kick() // the writer flushes, then closes
	}
	wake(&s.inWait)
}

var aLongTimeAgo = time.Unix(1, 0)

// die closes the connection at once and lets every goroutine of the socket
// end; once they have, the socket leaves its loop and server. s.mu is held.
func (s *Socket) die() {
	if s.state == dead {
		return
	}
	s.state = dead
	s.dropped = s.outLen > 0
	s.out, s.outLen = nil, 0
	if s.cancel != nil {
		s.cancel()
	}
	if s.conn != nil {
		s.conn.Close()
	}
	s.rcond.Broadcast()
	s.wcond.Broadcast()
	wake(&s.inWait)
	wake(&s.outWait)
	go s.finish()
}

func (s *Socket) finish() {
	s.grp.Wait()
	for _, l := range s.rlims {
		if l.group != nil {
			l.group.members.Add(-1)
		}
	}
	// The loop first, so that Stats no longer counts a socket once
	// Server.Shutdown has seen it end.
	s.loop.removeSocket(s)
	if s.server != nil {
		s.server.forget(s)
	}
}

// Conn is socket-c: the connection, or nil while connecting.
func (s *Socket) Conn() net.Conn {
	if s == nil {
		return nil
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.conn
}

// Data is socket-data: the value stored with SetData.
func (s *Socket) Data() any {
	if s == nil {
		return nil
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.data
}

// SetData sets socket-data: any value the application keeps with the
// socket, such as the other end of a proxy.
func (s *Socket) SetData(v any) {
	if s == nil {
		return
	}
	s.mu.Lock()
	s.data = v
	s.mu.Unlock()
}

// WriteData is write-socket-data: it copies data into the output buffer and
// returns at once; the writer sends it in order, after what was queued
// before. OnRead, OnWrite and OnEvent replace the socket's callbacks for
// every event dispatched after WriteData returns. On a closed socket it
// returns an ErrSocketClosed event and queues nothing.
func (s *Socket) WriteData(data []byte, opts ...Option) error {
	if s == nil {
		return errNilSocket
	}
	var cfg *config
	if len(opts) > 0 {
		var err error
		if cfg, err = newConfig(callWriteData, opts); err != nil {
			return err
		}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.refuse(len(data)); err != nil {
		return err
	}
	if cfg != nil {
		s.override(cfg)
	}
	s.enqueue(data)
	return nil
}

// refuse returns why n more bytes cannot be queued: the socket or its
// write side is closed, or they would take the output past MaxBuffered.
// s.mu is held.
func (s *Socket) refuse(n int) error {
	switch {
	case s.closed || s.wshut:
		return closedError(s)
	case s.maxBuf > 0 && s.outLen+n > s.maxBuf:
		return &Event{Class: ErrBufferFull, Socket: s, Code: -1, Dir: EvWrite,
			Msg: fmt.Sprintf("%d bytes queued, %d more would pass MaxBuffered(%d)", s.outLen, n, s.maxBuf)}
	}
	return nil
}

func (s *Socket) override(cfg *config) {
	if cfg.setRead {
		s.read = cfg.onRead
	}
	if cfg.setWrite {
		s.write = cfg.onWrite
	}
	if cfg.setEvent {
		s.event = cfg.onEvent
	}
}

// enqueue copies p into the output buffer. s.mu is held.
func (s *Socket) enqueue(p []byte) {
	if len(p) == 0 {
		return
	}
	if s.raw != nil && s.state == open && !s.writerOn && s.outLen == 0 &&
		s.enabled&EvWrite != 0 && !s.wshut && len(s.wlims) == 0 {
		// Nothing is queued: write what the conn takes without blocking,
		// and queue only the rest.
		n := s.raw.tryWrite(p)
		if len(p) > s.lowWater && len(p)-n <= s.lowWater && s.write != nil {
			// This write took the output to the low watermark (rule 4 and
			// 24, where the output started empty).
			s.dispatch(s.drained, false)
		}
		if n == len(p) {
			return
		}
		p = p[n:]
	}
	if n := len(s.out); n > 0 && cap(s.out[n-1])-len(s.out[n-1]) >= len(p) {
		s.out[n-1] = append(s.out[n-1], p...)
	} else {
		s.out = append(s.out, append(make([]byte, 0, max(len(p), 512)), p...))
	}
	s.outLen += len(p)
	s.kick()
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
		return 0, errNilSocket
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.refuse(len(str)); err != nil {
		return 0, err
	}
	if len(str) > 0 {
		s.enqueue([]byte(str))
	}
	return len(str), nil
}

func checkEvents(name string, ev Events) error {
	if ev&^(EvRead|EvWrite) != 0 {
		return fmt.Errorf("asynctcp: %s: unknown events %d", name, uint8(ev))
	}
	return nil
}

// Enable is enable-socket: it resumes reading (EvRead) and writing
// (EvWrite). Enabling an enabled direction does nothing.
func (s *Socket) Enable(ev Events) error {
	if s == nil {
		return errNilSocket
	}
	if err := checkEvents("Enable", ev); err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return closedError(s)
	}
	s.rearm(ev &^ s.enabled)
	s.enabled |= ev
	s.rcond.Broadcast()
	s.kick()
	if ev&EvRead != 0 && s.renotify && s.state == open {
		// Input that came while reading was disabled was not announced.
		s.renotify = false
		s.notifying = true
		s.dispatch(s.notify, false)
	}
	return nil
}

// Disable is disable-socket: EvRead stops reading from the connection (no
// read-cb, no read timeout, and TCP flow control slows the peer); EvWrite
// holds queued output unwritten (and the write timeout) until Enable.
func (s *Socket) Disable(ev Events) error {
	if s == nil {
		return errNilSocket
	}
	if err := checkEvents("Disable", ev); err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return closedError(s)
	}
	s.suspend(ev & s.enabled)
	s.enabled &^= ev
	return nil
}

// Closed is socket-closed-p: true once Close or Abort was called, or the
// socket closed itself after its EOF or error event.
func (s *Socket) Closed() bool {
	if s == nil {
		return true
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.closed
}

// Close is close-socket, made graceful: it stops reading, and in the
// background writes what is queued, then closes the connection (bounded by
// the write timeout, if set). It returns at once; no callback of the socket
// starts after it. On a closed socket it returns an ErrSocketClosed event.
func (s *Socket) Close() error {
	if s == nil {
		return errNilSocket
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return closedError(s)
	}
	s.closed = true
	s.beginFlush()
	return nil
}

// Abort closes the socket at once, dropping queued output. No callback of
// the socket starts after it. On a closed socket it returns an
// ErrSocketClosed event (and still ends a flush that Close began).
func (s *Socket) Abort() error {
	if s == nil {
		return errNilSocket
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	wasClosed := s.closed
	s.closed = true
	s.die()
	if wasClosed {
		return closedError(s)
	}
	return nil
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
// Netty's shutdownOutput). Later writes return an ErrSocketClosed event.
// With AllowHalfOpen, once the peer has shut its side too, the socket
// closes by itself. A connection that cannot half-close (net.Pipe) gives an
// ErrTCPError event wrapping errors.ErrUnsupported.
func (s *Socket) CloseWrite() error {
	if s == nil {
		return errNilSocket
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed || s.wshut {
		return closedError(s)
	}
	if _, ok := s.conn.(interface{ CloseWrite() error }); s.conn != nil && !ok {
		return &Event{Class: ErrTCPError, Socket: s, Code: -1, Dir: EvWrite,
			Msg: fmt.Sprintf("%T cannot half-close", s.conn), Err: errors.ErrUnsupported}
	}
	s.wshut = true
	s.kick()
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

// LocalAddr returns the local address of the connection, or nil while
// connecting.
func (s *Socket) LocalAddr() net.Addr {
	if c := s.Conn(); c != nil {
		return c.LocalAddr()
	}
	return nil
}

// RemoteAddr returns the peer's address, or nil while connecting.
func (s *Socket) RemoteAddr() net.Addr {
	if c := s.Conn(); c != nil {
		return c.RemoteAddr()
	}
	return nil
}
