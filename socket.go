package asynctcp

import (
	"context"
	"fmt"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sync/errgroup"
)

// How a socket works
//
// Goroutines. Each is started by the socket and ends with it; s.grp joins
// all of them but the finisher, and goleak proves that none outlives its
// socket.
//   - The connector (start, dial.go) dials, or runs an accepted conn's TLS
//     handshake. It ends when the connect succeeds (it then becomes the
//     first reader), fails, or is cancelled (Abort, Exit, the connect
//     timeout).
//   - The reader (reader.go) reads the conn while the read side is open
//     and reading is enabled, one read at a time, and drains it after a
//     graceful close. It runs the callback queue itself where the queue
//     is idle, except in stream mode, where a callback may block in
//     Stream.Read for input that only the reader can bring. On a
//     descriptor (rawIO), a read that empties the kernel's queue is handed
//     on from inside the descriptor's read, which then waits for readiness
//     with no read that would find nothing. There it waits for nothing
//     but the read-cb (and the jobs queued meanwhile, which it runs after
//     it where it needs no lock to): input it cannot pass on at once is
//     passed on after the descriptor's read has returned. The conn's read
//     side is held while the read-cb runs, so the conn is closed by the
//     finisher alone (Abort leaves it to it). It ends when the read side
//     stops (EOF, a failure, teardown, the end of a linger), when reading
//     is disabled (paused: Enable starts another), or
//     once the socket has been idle for longer than usual (hopWaitLocked):
//     then it parks the socket (park: on Linux, the descriptor waits in
//     the loop's epoll set, with no goroutine) or, where it cannot, starts
//     a fresh reader on a small stack.
//   - The parker (park_linux.go), one per loop while any of its sockets is
//     parked, waits on the loop's epoll set and starts a fresh reader for
//     each parked socket that becomes readable. It ends once none is
//     parked; Loop.Wait waits for it.
//   - The writer (writer.go) runs only while there is output it may write:
//     kickLocked starts it, and it ends as soon as it finds nothing to do.
//     It writes one batch at a time (at most maxBatch bytes), shuts the
//     write side after CloseWrite, and ends a graceful Close once the
//     output is flushed: it peeks for input the peer sent meanwhile, and
//     where there is some, shuts the write side and leaves the socket to
//     linger (see lingering below) instead. WriteData writes inline,
//     without the writer, where nothing is queued and the descriptor
//     takes the bytes at once.
//   - A dispatcher (dispatch.go) runs the callback queue where no reader
//     runs it: started by dispatch when it queues a job on an idle queue,
//     it ends when the queue is empty. The queue is a slice guarded by
//     qmu, not a channel: a goroutine runs it only while it has jobs.
//   - Timers run their function on a goroutine of their own, which takes
//     mu and ends: the write stall timer (timeouts.go) and a parked
//     socket's read timer (readTimerFired), which starts a reader at most.
//   - The finisher (dieLocked, lifecycle.go) closes the conn, waits for
//     s.grp, runs the close-cb (OnClose) after every other callback,
//     closes Done, and takes the socket out of its loop and server. It is
//     not in s.grp: it waits for it.
//
// s.grp is an errgroup.Group used for joining only, without its context:
// the first failure of a socket does not simply cancel the others. An EOF
// must let the writer flush, a reset must abort, a half-open socket keeps
// writing after the peer's EOF, and the event must reach the event-cb
// after every read-cb. So a failure is claimed under mu (claimLocked),
// exactly once, and the socket's phase, not a context, tells each
// goroutine when to stop.
//
// Locks, outermost first: Server.mu, or a Pipe direction's gate
// (pipeTo), then Socket.mu, then Socket.qmu;
// Socket.mu, then the loop's parking.mu, which nothing holds while taking
// another. Loop.mu is taken with no socket lock held, or under Server.mu
// alone. The loop's callback lock (Loop.Serial) is taken by the queue
// runner around each job, before Socket.mu and never while holding it. No
// user code and no I/O runs under mu or qmu (setting a conn's deadline,
// or arming its descriptor in the parking set, is not I/O).
//
// Waits. cond (on mu) is broadcast on every change that may let the reader
// or the writer go on: reading enabled, input consumed, a write finished
// (settleWriteLocked), a rate-limit wait over, teardown. inWait is closed
// when input or the end of input arrives, or the socket ends: blocked
// Stream reads wait on it. outWait is closed when output is written, the
// write side closes, or the socket ends: blocked Stream writes and Flush
// wait on it. readResult carries the outcome of a read-cb that the reader
// had to queue behind other jobs.
//
// States. A socket's phase:
//
//	connecting ──► open ──► flushing ──► lingering ──► dead
//	    │            │          │                        ▲
//	    │            │          └─ flushed, no late input ┤
//	    │            └─ Abort, an error, nothing to flush ┤
//	    ├─ Close: flushing once up ───────────────────────┤
//	    └─ Abort, a failed connect ───────────────────────┘
//
// connecting: dialing or handshaking; output queues. open: reading and
// writing. flushing: closed gracefully; the writer writes what is
// queued, and the reader drains meanwhile; once it is written, the
// writer looks for input pending and waits, on Linux, while the kernel
// holds output the peer has not acknowledged (awaitAcked). lingering:
// flushed, and the peer sent input after the close (late), so closing
// now would reset the connection and drop what the peer has not
// acknowledged: the write side is shut, and the reader drains until the
// peer's EOF, a lull of lingerGap, or lingerMax in all (lingerLocked).
// dead: torn down; every goroutine ends, and the finisher closes the
// conn.
//
// The read side: reading ──► stopped (the reader met EOF or a failure) ──►
// eofDelivered (half-open only: the EOF event ran; once the write side is
// shut too, the socket closes itself); and reading ──► draining ──►
// stopped, as a graceful close begins (drainLocked): the reader reads on
// and drops what it reads, so that a peer flushing to the socket in turn
// is not stuck behind a full window. While reading or draining, its
// reader:
//
//	          idle for longer than usual (park)
//	  runs ─────────────────────────────────────► parked
//	  ▲  │ ◄──────────────────────────────────────  │
//	  │  │   readable, the read timeout passed,     │ torn down:
//	  │  │   a linger begins: a fresh reader        │ no reader
//	  │  │   takes over                             ▼
//	  │  └─ reading disabled (beforeRead) ──► paused
//	  └──── Enable, a graceful close ◄───────────┘
//
// runs: a reader goroutine runs. parked: none; the descriptor waits in
// the loop's parking set, and the read timeout, where one runs, on the
// read timer (rtimer); the parker starts a reader when the descriptor is
// readable, the timer when the timeout passes (the reader's read then
// fails at once with it), and teardown takes the socket out of the set
// (unparkLocked, in dieLocked). paused: none, while reading is disabled;
// Enable starts one, and so does a graceful close, whose drain reads
// whatever is enabled. A parked socket whose reading is disabled stays
// parked: the reader it gets pauses.
//
// The write side: writeOpen ──► writeShutting (CloseWrite: writes are
// refused, and the side is shut once flushed) ──► writeShut; and from
// either, writeFailed (a write failed; the output was dropped).
//
// Who closed it: nobody ──► byApp (Close, Abort, Exit) or bySelf (after its
// ending event); bySelf ──► byApp where Stream.Close follows (it returns
// nil once, as net.Conn's does). No callback but the close-cb starts once
// it is not nobody (callbacksOpenLocked); the ending event (EOF, error,
// panic) is claimed once (ended, endErr). The first step towards closing
// records why (closing) and cancels the Context.
//
// The questions, one method each: may the application queue output
// (mayQueueLocked); has the writer work (writerWorkLocked); may the reader
// read (readBlockedLocked, readOpenLocked, readerWorkLocked); may a callback start
// (callbacksOpenLocked); does the write timeout run (writeClockRunsLocked).

// tuning is what only some sockets ask for, kept apart so that the others
// do not carry it: rate limits (the socket's own and its groups') and the
// TCP settings applied when the socket adopts its conn.
type tuning struct {
	rlims     []*limit
	wlims     []*limit
	keepAlive *net.KeepAliveConfig
	sendBuf   int // SendBuffer; 0: the system's
	recvBuf   int // ReceiveBuffer; 0: the system's
}

// readLimits and writeLimits return the rate limits of each direction.
func (t *tuning) readLimits() []*limit {
	if t == nil {
		return nil
	}
	return t.rlims
}

func (t *tuning) writeLimits() []*limit {
	if t == nil {
		return nil
	}
	return t.wlims
}

// phase is where a socket is in its life; see the model above.
type phase uint8

const (
	connecting phase = iota
	open
	flushing
	lingering
	dead
)

// closer says who closed the socket.
type closer uint8

const (
	nobody closer = iota
	byApp
	bySelf
)

// readSide is the state of the socket's read direction.
type readSide uint8

const (
	reading      readSide = iota
	draining              // closed gracefully: the reader drops what it reads while the output flushes
	stopped               // the reader met EOF or a failure and ended
	eofDelivered          // half-open: the peer's EOF event ran
)

// readerState says, while the read side is reading, whether a reader
// goroutine runs, and what starts one where none does.
type readerState uint8

const (
	readerRuns   readerState = iota // a reader runs, or is about to
	readerParked                    // none: the descriptor waits in the loop's parking set
	readerPaused                    // none: reading is disabled, and Enable starts one
)

// writeSide is the state of the socket's write direction.
type writeSide uint8

const (
	writeOpen     writeSide = iota
	writeShutting           // CloseWrite: shut once flushed
	writeShut
	writeFailed
)

// writerState says who writes the output now.
type writerState uint8

const (
	writerIdle    writerState = iota // nobody: kickLocked may start the writer
	writerInline                     // WriteData writes, on the caller, outside mu
	writerRunning                    // the writer goroutine runs
)

// notice is where a stream-mode read-cb (a notification) is.
type notice uint8

const (
	noticeNone   notice = iota
	noticeQueued        // queued and not started
	noticeHeld          // input came while reading was disabled: Enable sends it
)

// nilSocket is the error of a method called on a nil *Socket (or a Stream
// without one).
func nilSocket(method string) error { return badArg("%s: nil *Socket", method) }

// Socket is cl-async's socket: one connection, with a reader goroutine, a
// writer that drains its output buffer while there is output (started on
// demand, so an idle socket has none), and a queue on which its callbacks
// run one at a time, in order. Its methods are safe to call from any
// goroutine, inside or outside its callbacks.
type Socket struct {
	// Set when the socket is made, then only read.
	loop           *Loop
	server         *Server // the server that accepted it; nil for Connect and Wrap
	stream         *Stream // the view given to stream-mode callbacks
	wrapped        bool    // made by Wrap
	streaming      bool    // stream mode: input stays in the input buffer
	reuse          bool    // ReuseReadBuffer
	halfOpen       bool    // AllowHalfOpen
	notifyTimeouts bool
	maxBuf         int     // WriteData refuses to queue past this; 0: no bound
	tuning         *tuning // rate limits and TCP settings; nil where none is asked for
	onClose        CloseFunc
	grp            errgroup.Group

	// Atomic: the counters, and whether Pipe's relay is the read-cb.
	relaying     atomic.Bool // set by Pipe: the read-cb keeps no slice
	bytesRead    atomic.Int64
	bytesWritten atomic.Int64

	// Guarded by mu: the state.
	mu       sync.Mutex
	cond     sync.Cond // see "Waits" above
	phase    phase
	closer   closer
	ended    bool // the ending event (EOF, error, panic) is claimed
	rside    readSide
	wside    writeSide
	enabled  Events
	conn     net.Conn
	raw      *rawIO             // descriptor I/O, where the conn has it
	cancel   context.CancelFunc // stops the connect
	abortive bool               // the finisher closes the conn at once (no TLS close_notify)
	exited   bool               // Loop.Exit closed it: no close-cb
	touched  bool               // it ran a callback or was returned: it gets a close-cb
	fin      bool               // the finisher is done: Done is closed
	endErr   error              // the event that ended it, for the close-cb
	closing  error              // why it started to close: the Context's cause
	watch    *watchers          // Done and Context, made on first use
	data     any

	// Guarded by mu: the callbacks, and what Pipe sets with them.
	lowWater  int    // the write-cb runs when output falls to this
	highWater int    // Writable is false from here; 0: no high watermark
	onEnd     func() // Pipe: closes the other socket once this one ended
	read      ReadFunc
	sread     StreamFunc
	event     EventFunc
	write     WriteFunc
	connectCb ConnectFunc

	// Guarded by mu: read state.
	inLimit  int           // stream mode: the reader stops while in holds this much
	in       input         // stream mode: received bytes not yet read
	inEnd    error         // what reads return once the input is drained: io.EOF or the event
	inWait   chan struct{} // see "Waits"
	rtimeout time.Duration
	rclock   time.Duration // when the read timeout passes, or a lingering close ends (monotime); 0: no clock runs
	rtimer   *time.Timer   // runs the read timeout of a parked socket (readTimerFired)
	rgen     uint64        // bumped where the read timeout is lifted under the reader
	hopAt    time.Duration // when the idle hop's deadline passes (monotime)
	lastArm  time.Duration // when the reader last armed a read after work (monotime)
	gap      time.Duration // the socket's usual time between reads (hopWaitLocked)
	notice   notice
	rdl      readDeadline // what the conn's read deadline is for
	reader   readerState  // while reading: is there a reader, and if not, what starts one
	late     bool         // input came after a graceful close: a lingering close waits for the peer's EOF

	// Guarded by mu: write state.
	out      [][]byte      // queued output, oldest first
	outLen   int           // bytes queued, including those being written
	inflight int           // bytes taken by a write that has not returned
	outWait  chan struct{} // see "Waits"
	wtimeout time.Duration
	wgen     uint64      // bumped each time the write clock is set, moved or stopped
	stall    *time.Timer // the write clock of other conns (see timeouts.go)
	stallGen uint64      // the wgen the stall timer was armed at
	writer   writerState
	dropped  bool // the socket ended with output unwritten
	wdlSet   bool // the conn has a write deadline (descriptor conns)

	// Guarded by qmu: the callback queue.
	qmu        sync.Mutex
	running    bool     // a goroutine runs the queue
	queue      []func() // jobs waiting to run
	readResult chan bool
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
		onClose:        cfg.onClose,
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
	t := tuning{
		rlims:     limits(cfg.readRate, greads),
		wlims:     limits(cfg.writeRate, gwrites),
		keepAlive: cfg.keepAlive,
		sendBuf:   cfg.sendBuf,
		recvBuf:   cfg.recvBuf,
	}
	if t.rlims != nil || t.wlims != nil || t.keepAlive != nil || t.sendBuf > 0 || t.recvBuf > 0 {
		s.tuning = &t
	}
	s.cond.L = &s.mu
	if s.streaming {
		s.stream = NewStream(s)
	}
	if len(cfg.data) > 0 {
		s.out = [][]byte{cfg.data}
		s.outLen = len(cfg.data)
	}
	s.touched = srv == nil // Connect and Wrap return it
	l.addSocket(s)
	return s
}

// callbacksOpenLocked reports whether a callback of the socket may start:
// not once Close, Abort or Exit was called, or the socket closed itself.
// mu is held.
func (s *Socket) callbacksOpenLocked() bool { return s.closer == nobody }

// mayQueueLocked returns why n more bytes cannot be queued: the socket or
// its write side is closed, or they would take the output past
// MaxBuffered. mu is held.
func (s *Socket) mayQueueLocked(n int) error {
	switch {
	case s.writeClosedLocked():
		return closedError(s)
	case s.maxBuf > 0 && s.outLen+n > s.maxBuf:
		return &Event{Class: ErrBufferFull, Socket: s, Code: -1, Dir: EvWrite,
			Msg: fmt.Sprintf("%d bytes queued, %d more would pass MaxBuffered(%d)", s.outLen, n, s.maxBuf)}
	}
	return nil
}

// writeClosedLocked reports whether the application may no longer write:
// the socket or its write side is closed. mu is held.
func (s *Socket) writeClosedLocked() bool {
	return s.closer != nobody || s.wside != writeOpen || s.phase == dead
}

// Conn is socket-c: the connection, or nil while connecting, for its
// addresses and settings (SetNoDelay, SetLinger, CloseWrite and the like).
// The socket reads and writes it and sets its deadlines: close the socket,
// not the conn, and do not read the conn. A TCP or Unix socket holds its
// conn's read side from one read to the next, read-cb included (it waits
// for more input there without a system call that would find nothing), so
// a Close or Read of the conn waits until the socket's running callback
// returns: made inside one of the socket's own callbacks, it never
// returns. (The socket runs a read-cb there only where it can start at
// once, so a callback of another socket, on a Serial loop too, is not
// held up by it.) An idle socket, with no read under way, notices a conn
// closed under it only at its next write.
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

func checkEvents(name string, ev Events) error {
	if ev&^(EvRead|EvWrite) != 0 {
		return badArg("%s: unknown events %d", name, uint8(ev))
	}
	return nil
}

// Enable is enable-socket: it resumes reading (EvRead) and writing
// (EvWrite). Enabling an enabled direction does nothing.
func (s *Socket) Enable(ev Events) error {
	if s == nil {
		return nilSocket("Socket.Enable")
	}
	if err := checkEvents("Enable", ev); err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closer != nobody {
		return closedError(s)
	}
	turned := ev &^ s.enabled
	s.enabled |= ev
	s.timeoutsChangedLocked(turned)
	s.cond.Broadcast()
	if turned&EvRead != 0 {
		s.resumeLocked()
	}
	s.kickLocked()
	if turned&EvRead != 0 && s.notice == noticeHeld && s.phase == open {
		// Input that came while reading was disabled was not announced.
		s.notice = noticeQueued
		s.dispatch(s.notify, false)
	}
	return nil
}

// Disable is disable-socket: EvRead stops reading from the connection (no
// read-cb, no read timeout, and TCP flow control slows the peer; a read
// under way returns, and the socket keeps no reader goroutine until
// Enable, nor sees the peer's EOF or reset before it); EvWrite
// holds queued output unwritten (and the write timeout) until Enable. A
// write already under way finishes: that is at most one batch of 256 KiB.
func (s *Socket) Disable(ev Events) error {
	if s == nil {
		return nilSocket("Socket.Disable")
	}
	if err := checkEvents("Disable", ev); err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closer != nobody {
		return closedError(s)
	}
	turned := ev & s.enabled
	s.enabled &^= ev
	s.timeoutsChangedLocked(turned)
	if turned&EvRead != 0 {
		s.pauseLocked()
	}
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
	return s.closer != nobody
}

// Close is close-socket, made graceful: it stops reading for the
// application, and in the background writes what is queued, then closes
// the connection (bounded by the write timeout, if set). It returns at
// once; no callback of the socket starts after it. On a closed socket it
// returns an ErrSocketClosed event.
//
// While the output flushes, the socket reads on and drops what arrives,
// even where reading was disabled: a peer that is flushing to it in turn
// (two sockets closed at once, each with output the other has not read)
// can finish, instead of both waiting on full windows for ever.
//
// The kernel resets a TCP connection that is closed with input nobody
// read, or that gets input once closed, and a reset drops what the peer
// has not acknowledged yet of the output. So where the peer sent input
// after Close, the socket lingers once flushed: it shuts its write side
// (the peer sees EOF after the whole output) and drains until the peer's
// EOF, or until no input came for 500 ms, or for 1 s in all; then it
// closes. On Linux, a flushed socket whose kernel still holds output the
// peer has not acknowledged first waits for the acknowledgement, for 1 s
// at most, and lingers if input comes meanwhile. Loop.Wait and
// Server.Shutdown wait for all of it. A peer that sends again only after
// that may still meet a reset; where its output may outlast the close,
// shut the write side with CloseWrite and close once its EOF comes.
func (s *Socket) Close() error {
	if s == nil {
		return nilSocket("Socket.Close")
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closer != nobody {
		return closedError(s)
	}
	s.closer = byApp
	s.startClosingLocked(closedError(s))
	s.beginFlushLocked()
	return nil
}

// Abort closes the socket at once, dropping queued output. No callback of
// the socket starts after it. It never waits for the peer: a TLS socket
// sends no close_notify. On a closed socket it returns an ErrSocketClosed
// event (and still cuts short a flush that Close began).
func (s *Socket) Abort() error {
	if s == nil {
		return nilSocket("Socket.Abort")
	}
	s.mu.Lock()
	wasClosed := s.closer != nobody
	if !wasClosed {
		s.closer = byApp
		s.startClosingLocked(closedError(s))
	}
	var cut net.Conn // a graceful close under way, to cut short
	if s.phase == dead && !s.abortive {
		s.abortive = true
		// A TLS conn's close may wait on its close_notify: close the conn
		// under it. A conn read through its descriptor closes at once in
		// the finisher; closing it here could wait for a read-cb of this
		// socket that is under way (Conn), even the caller's own.
		if s.raw == nil {
			cut = s.conn
		}
	}
	s.dieLocked(true)
	s.mu.Unlock()
	if cut != nil {
		closeConn(cut, true)
	}
	if wasClosed {
		return closedError(s)
	}
	return nil
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
