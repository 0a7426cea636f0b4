package asynctcp

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"runtime/debug"
	"strings"
	"syscall"
)

// class is a condition class of cl-async's hierarchy. Its values are the
// Err* sentinels; errors.Is follows a class's ancestors.
type class struct {
	name    string
	parents []*class
}

func (c *class) Error() string { return c.name }

// Is reports whether c is target or descends from it, so that
// errors.Is(ErrTCPTimeout, ErrTCPError) holds as it does for an event.
func (c *class) Is(target error) bool {
	t, ok := target.(*class)
	return ok && c.descends(t)
}

func (c *class) descends(t *class) bool {
	if c == t {
		return true
	}
	for _, p := range c.parents {
		if p.descends(t) {
			return true
		}
	}
	return false
}

func newClass(name string, parents ...error) *class {
	c := &class{name: name}
	for _, p := range parents {
		c.parents = append(c.parents, p.(*class))
	}
	return c
}

// The condition classes of cl-async, as error sentinels. An *Event matches
// its own class and every ancestor with errors.Is:
//
//	connection-info
//	├── connection-error
//	│   ├── tcp-error (also a tcp-info)
//	│   │   ├── tcp-timeout, tcp-refused, tcp-accept-error, socket-closed,
//	│   │   └── buffer-full
//	│   ├── dns-error
//	│   └── address-in-use
//	└── tcp-info
//	    ├── tcp-error
//	    └── tcp-eof
var (
	// ErrConnectionInfo is connection-info, the root of every condition.
	ErrConnectionInfo error = newClass("connection-info")
	// ErrConnectionError is connection-error: something went wrong.
	// Every error-class condition descends from it; info-class ones do not.
	ErrConnectionError error = newClass("connection-error", ErrConnectionInfo)
	// ErrTCPInfo is tcp-info: something happened on a TCP connection.
	ErrTCPInfo error = newClass("tcp-info", ErrConnectionInfo)
	// ErrTCPError is tcp-error: a general error on a TCP connection.
	ErrTCPError error = newClass("tcp-error", ErrConnectionError, ErrTCPInfo)
	// ErrTCPEOF is tcp-eof: the peer closed the connection (or reset it;
	// then Event.Code holds ECONNRESET or EPIPE).
	ErrTCPEOF error = newClass("tcp-eof", ErrTCPInfo)
	// ErrTCPTimeout is tcp-timeout: a read, write or connect timeout fired.
	ErrTCPTimeout error = newClass("tcp-timeout", ErrTCPError)
	// ErrTCPRefused is tcp-refused: the peer refused the connection.
	ErrTCPRefused error = newClass("tcp-refused", ErrTCPError)
	// ErrTCPAcceptError is tcp-accept-error: a server failed to accept a
	// connection. The event carries the Server and its Listener.
	ErrTCPAcceptError error = newClass("tcp-accept-error", ErrTCPError)
	// ErrSocketClosed is socket-closed: an operation on a socket that was
	// already closed.
	ErrSocketClosed error = newClass("socket-closed", ErrTCPError)
	// ErrDNSError is dns-error: the host name could not be resolved.
	ErrDNSError error = newClass("dns-error", ErrConnectionError)
	// ErrAddressInUse is address-in-use: a server could not bind its
	// address (EADDRINUSE).
	ErrAddressInUse error = newClass("address-in-use", ErrConnectionError)
	// ErrBufferFull is buffer-full: a write would take the output past
	// MaxBuffered, so nothing was queued. It is returned to the writer,
	// never given to the event-cb.
	ErrBufferFull error = newClass("buffer-full", ErrTCPError)
	// ErrBadArgument is bad-argument: a call was given an argument it
	// cannot take, or was made where it cannot work (Loop.Wait inside a
	// callback of its own loop). It stands apart from the connection
	// conditions: nothing happened on any connection.
	ErrBadArgument error = newClass("bad-argument")
)

// Event is a condition delivered to an event-cb or returned by a call: one
// value for every class, told apart with errors.Is. It wraps the error from
// the net package that caused it, if any, so errors.Is(ev, syscall.ECONNRESET)
// and errors.As(ev, &dnsErr) work too.
type Event struct {
	Class    error        // the most specific class, one of the Err* sentinels
	Socket   *Socket      // tcp-socket: the socket concerned (nil for server-level events)
	Server   *Server      // tcp-accept-error-tcp-server
	Listener net.Listener // tcp-accept-error-listener
	Code     int          // event-errcode: the errno, or -1
	Msg      string       // event-errmsg
	Err      error        // the underlying error, if any
	Dir      Events       // the direction that timed out or failed (EvRead, EvWrite), where one did
}

// Error returns the class and message, as "asynctcp: tcp-eof: connection
// reset by peer".
func (e *Event) Error() string {
	var b strings.Builder
	b.WriteString("asynctcp: ")
	if e.Class != nil {
		b.WriteString(e.Class.Error())
	} else {
		b.WriteString("event")
	}
	if e.Msg != "" {
		b.WriteString(": ")
		b.WriteString(e.Msg)
	}
	return b.String()
}

// Is reports whether target is the event's class or one of its ancestors.
func (e *Event) Is(target error) bool {
	c, ok := e.Class.(*class)
	return ok && c.Is(target)
}

// Unwrap returns the underlying error.
func (e *Event) Unwrap() error { return e.Err }

// PanicError is a panic recovered from a callback when Loop.CatchAppErrors
// is set. It is passed to the socket's event-cb (or the loop's handler).
type PanicError struct {
	Value  any     // the value given to panic
	Stack  []byte  // the goroutine's stack at the panic
	Socket *Socket // the socket whose callback panicked; nil for a server's
}

// Error describes the panic.
func (p *PanicError) Error() string {
	return fmt.Sprintf("asynctcp: panic in callback: %v", p.Value)
}

// Unwrap returns the panic value if it is an error.
func (p *PanicError) Unwrap() error {
	err, _ := p.Value.(error)
	return err
}

func newPanicError(v any, s *Socket) *PanicError {
	return &PanicError{Value: v, Stack: debug.Stack(), Socket: s}
}

// argError is an invalid argument to a call: its text names the call or
// the option, and errors.Is matches it to ErrBadArgument (and to the
// option's own reason, where it has one).
type argError struct {
	msg string
	err error
}

func (e *argError) Error() string        { return e.msg }
func (e *argError) Is(target error) bool { return target == ErrBadArgument }
func (e *argError) Unwrap() error        { return e.err }

// badArg returns an argError whose text is "asynctcp: " and the format.
func badArg(format string, args ...any) error {
	return &argError{msg: "asynctcp: " + fmt.Sprintf(format, args...)}
}

// closedError is the socket-closed event returned by methods of a closed
// socket.
func closedError(s *Socket) *Event {
	return &Event{Class: ErrSocketClosed, Socket: s, Code: -1, Msg: "socket is closed", Err: net.ErrClosed}
}

// errnoOf returns the errno inside err, or -1.
func errnoOf(err error) int {
	var errno syscall.Errno
	if errors.As(err, &errno) {
		return int(errno)
	}
	return -1
}

// newEvent classifies err, a failure of socket s (or of a dial or bind when
// s has not got a conn), into the most specific condition class.
func newEvent(s *Socket, err error) *Event {
	ev := &Event{Class: ErrTCPError, Socket: s, Code: errnoOf(err), Err: err, Msg: err.Error()}
	var dnsErr *net.DNSError
	var ct *connectTimeout
	switch {
	case errors.As(err, &ct):
		ev.Class, ev.Code = ErrTCPTimeout, -1
	case errors.Is(err, io.EOF):
		ev.Class, ev.Msg = ErrTCPEOF, "end of file"
	case isReset(err):
		ev.Class = ErrTCPEOF
	case errors.As(err, &dnsErr):
		ev.Class = ErrDNSError
	case isRefused(err):
		ev.Class = ErrTCPRefused
	case isAddrInUse(err):
		ev.Class = ErrAddressInUse
	case errors.Is(err, os.ErrDeadlineExceeded), errors.Is(err, context.DeadlineExceeded):
		ev.Class, ev.Code = ErrTCPTimeout, -1
	}
	return ev
}
