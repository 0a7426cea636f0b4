package asynctcp

import (
	"errors"
	"log/slog"
	"reflect"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
)

// Loop plays the part of cl-async's event loop: it owns sockets and
// servers, holds the default event handler and the loop-wide settings, and
// Wait returns once all of them are closed. The zero value is ready to use;
// set the fields before the loop's first socket or server.
type Loop struct {
	// EventHandler is *default-event-handler*: it gets the events of
	// sockets and servers whose event-cb is nil. Where it is nil too,
	// error-class events are logged on Logger and info-class events
	// (tcp-eof) are dropped.
	EventHandler EventFunc
	// CatchAppErrors is *catch-application-errors*: a panic in a callback
	// is recovered and passed as a *PanicError to the socket's event-cb,
	// and the socket is aborted. Off, the panic propagates.
	CatchAppErrors bool
	// Serial makes every callback of the loop's sockets and servers run
	// one at a time, as on cl-async's single-threaded loop.
	Serial bool
	// Logger logs the events no callback takes; nil means slog.Default().
	Logger *slog.Logger

	// Guarded by mu.
	mu      sync.Mutex
	sockets map[*Socket]struct{}
	servers map[*Server]struct{}
	idle    chan struct{} // closed when the last socket or server ends
	exitErr error

	park    parking      // idle sockets that wait with no reader (park_linux.go)
	serial  sync.Mutex   // the callback lock: held around each job when Serial
	calling atomic.Int64 // callbacks of the loop under way
}

var errNilLoop = badArg("nil *Loop")

// DefaultLoop is the loop of the package-level functions.
var DefaultLoop = &Loop{}

// Stats counts a loop's open sockets and servers.
type Stats struct {
	Incoming int // sockets accepted by a server, open
	Outgoing int // sockets made by Connect, open (connecting included)
	Wrapped  int // sockets made by Wrap, open
	Servers  int // servers open
}

// Stats returns the numbers of the loop's open sockets and servers. A
// socket counts until its connection is closed and its goroutines ended.
func (l *Loop) Stats() Stats {
	l.mu.Lock()
	defer l.mu.Unlock()
	st := Stats{Servers: len(l.servers)}
	for s := range l.sockets {
		switch {
		case s.server != nil:
			st.Incoming++
		case s.wrapped:
			st.Wrapped++
		default:
			st.Outgoing++
		}
	}
	return st
}

// Wait blocks until the loop has no open socket or server, and returns nil,
// or the value given to Exit if Exit ended them. It returns at once if the
// loop has nothing open. When it returns, the goroutines of every socket
// and server of the loop have ended. Called from inside a callback of the
// loop, where it would wait for itself, it returns an ErrBadArgument error
// at once.
func (l *Loop) Wait() error {
	if l.insideCallback() {
		return badArg("Loop.Wait called inside a callback of its own loop, which it would wait for forever")
	}
	l.mu.Lock()
	for len(l.sockets)+len(l.servers) > 0 {
		idle := waiter(&l.idle)
		l.mu.Unlock()
		<-idle
		l.mu.Lock()
	}
	err := l.exitErr
	l.mu.Unlock()
	l.park.wait() // the parker ends once no socket is parked
	return err
}

// Exit is exit-event-loop: it aborts every socket of the loop (no event
// reaches their callbacks) and closes every server; Wait returns err once
// they have ended. The loop may be used again after.
func (l *Loop) Exit(err error) {
	l.mu.Lock()
	l.exitErr = err
	srvs := make([]*Server, 0, len(l.servers))
	for srv := range l.servers {
		srvs = append(srvs, srv)
	}
	l.mu.Unlock()
	// Servers first, so that none accepts a socket the aborts would miss.
	for _, srv := range srvs {
		srv.Close()
	}
	l.mu.Lock()
	socks := make([]*Socket, 0, len(l.sockets))
	for s := range l.sockets {
		socks = append(socks, s)
	}
	l.mu.Unlock()
	// Close them all before aborting any, so that no socket sees another's
	// abort as an event.
	for _, s := range socks {
		s.mu.Lock()
		if s.closer == nobody {
			s.closer = byApp
			s.startClosingLocked(closedError(s))
		}
		s.exited = true
		s.mu.Unlock()
	}
	for _, s := range socks {
		s.Abort()
	}
}

// addSocket and the other three keep the loop's books; the first thing
// opened after the loop was idle clears a previous Exit's value.
func (l *Loop) addSocket(s *Socket) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.busyLocked()
	if l.sockets == nil {
		l.sockets = make(map[*Socket]struct{})
	}
	l.sockets[s] = struct{}{}
}

func (l *Loop) addServer(srv *Server) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.busyLocked()
	if l.servers == nil {
		l.servers = make(map[*Server]struct{})
	}
	l.servers[srv] = struct{}{}
}

// busyLocked forgets an Exit value once the loop, idle again, gets new
// work. l.mu is held.
func (l *Loop) busyLocked() {
	if len(l.sockets)+len(l.servers) == 0 {
		l.exitErr = nil
	}
}

func (l *Loop) removeSocket(s *Socket) {
	l.mu.Lock()
	defer l.mu.Unlock()
	delete(l.sockets, s)
	l.idleLocked()
}

func (l *Loop) removeServer(srv *Server) {
	l.mu.Lock()
	defer l.mu.Unlock()
	delete(l.servers, srv)
	l.idleLocked()
}

// idleLocked wakes the waiters once nothing is open. l.mu is held.
func (l *Loop) idleLocked() {
	if len(l.sockets)+len(l.servers) == 0 {
		wake(&l.idle)
	}
}

// enter takes the loop's callback lock where the loop is Serial, and
// reports whether it did (held); leave gives it back. Where wait is false
// and the lock is taken, it takes nothing and reports !ok.
func (l *Loop) enter(wait bool) (held, ok bool) {
	switch {
	case !l.Serial:
		return false, true
	case wait:
		l.serial.Lock()
		return true, true
	}
	ok = l.serial.TryLock()
	return ok, ok
}

func (l *Loop) leave(held bool) {
	if held {
		l.serial.Unlock()
	}
}

// call runs f, a user callback, inside a job (the callback lock, where the
// loop is Serial, is held already). With CatchAppErrors a panic comes back
// as a *PanicError. Its frame marks a goroutine that runs a callback (see
// insideCallback).
//
//go:noinline
func (l *Loop) call(f func(), s *Socket) (pe *PanicError) {
	l.calling.Add(1)
	defer l.calling.Add(-1)
	if l.CatchAppErrors {
		defer func() {
			if v := recover(); v != nil {
				pe = newPanicError(v, s)
			}
		}()
	}
	f()
	return nil
}

// callFrame is the name of call's frame in a stack.
var callFrame = sync.OnceValue(func() string {
	return runtime.FuncForPC(reflect.ValueOf((*Loop).call).Pointer()).Name()
})

// insideCallback reports whether the calling goroutine runs a callback of
// the loop: one of its callbacks is under way, and a callback's frame is
// on this goroutine's stack. (A goroutine that runs a callback of another
// loop while one of this loop's runs elsewhere counts too: waiting there
// for this loop is a mistake of the same kind.)
func (l *Loop) insideCallback() bool {
	if l.calling.Load() == 0 {
		return false
	}
	pcs := make([]uintptr, 512)
	frames := runtime.CallersFrames(pcs[:runtime.Callers(2, pcs)])
	want := callFrame()
	for {
		f, more := frames.Next()
		if f.Function == want {
			return true
		}
		if !more {
			return false
		}
	}
}

// handle gives ev to the loop's EventHandler, or logs it when there is none
// and ev is of the error class. A panic in the handler is logged. It runs
// inside a job, or holds the callback lock itself (acceptFailed).
func (l *Loop) handle(ev error) {
	if h := l.EventHandler; h != nil {
		if pe := l.call(func() { h(ev) }, socketOf(ev)); pe != nil {
			l.log(pe)
		}
		return
	}
	l.log(ev)
}

// log logs ev where it is a panic or of the error class. A panic's stack
// goes in as a group of attributes, one per frame (see stackAttr): given
// as one string, its line breaks would come out escaped, as slog's text
// and JSON handlers quote every value and message that holds one.
func (l *Loop) log(ev error) {
	var pe *PanicError
	if errors.As(ev, &pe) {
		l.logger().Error("asynctcp: callback panicked", "panic", pe.Value, stackAttr(pe.Stack))
		return
	}
	if errors.Is(ev, ErrConnectionError) {
		l.logger().Error("asynctcp: unhandled event", "event", ev)
	}
}

// stackAttr turns stack, a trace as runtime/debug.Stack writes it where a
// panic was recovered, into the group "stack" of one attribute per line of
// the trace, keyed by its position, where a frame's function and location
// make one line. slog's text handler writes them as
//
//	stack.0="goroutine 7 [running]:"
//	stack.1="panic({0x6f0b40?, 0x7e6c10?}) /go/src/runtime/panic.go:860 +0x13a"
//	stack.2="main.handle(...) /src/main.go:12 +0x1d" ...
//
// (all on the record's one line), and its JSON handler as
// "stack":{"0":"goroutine 7 [running]:",...}. As in the trace of a panic
// that ends a program, the frames start at the panic: those of the
// recovery above it are left out.
func stackAttr(stack []byte) slog.Attr {
	var lines []string
	for _, line := range strings.Split(strings.TrimRight(string(stack), "\n"), "\n") {
		if where, ok := strings.CutPrefix(line, "\t"); ok && len(lines) > 0 {
			lines[len(lines)-1] += " " + where
			continue
		}
		lines = append(lines, line)
	}
	for i := 1; i < len(lines); i++ {
		if strings.HasPrefix(lines[i], "panic(") {
			lines = append(lines[:1], lines[i:]...)
			break
		}
	}
	frames := make([]slog.Attr, len(lines))
	for i, line := range lines {
		frames[i] = slog.String(strconv.Itoa(i), line)
	}
	return slog.Attr{Key: "stack", Value: slog.GroupValue(frames...)}
}

func (l *Loop) logger() *slog.Logger {
	if l.Logger != nil {
		return l.Logger
	}
	return slog.Default()
}

// SocketOf returns the socket of ev, an *Event or a *PanicError (found
// with errors.As, so a wrapped one counts too), and nil for any other
// error and for a server's events.
func SocketOf(ev error) *Socket { return socketOf(ev) }

func socketOf(ev error) *Socket {
	var e *Event
	if errors.As(ev, &e) {
		return e.Socket
	}
	var pe *PanicError
	if errors.As(ev, &pe) {
		return pe.Socket
	}
	return nil
}
