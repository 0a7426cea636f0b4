// Package asynctcp brings cl-async's TCP layer to Go: callback-driven
// sockets and servers with libevent bufferevent behaviour, over plain
// net.Conn.
//
// A Socket wraps one connection. Its read-cb gets the bytes as they arrive,
// its write-cb runs each time its output buffer drains, its event-cb gets
// the conditions (end of file, errors, timeouts) as *Event values of a class
// hierarchy that errors.Is follows. WriteData never blocks: it copies the
// bytes into the socket's output buffer, which a writer goroutine drains.
// Every callback of a socket runs one at a time, in order; with Loop.Serial,
// every callback of the loop does.
//
//	srv, err := asynctcp.Listen("127.0.0.1", 8080,
//		func(s *asynctcp.Socket, data []byte) { s.WriteData(data) }, // echo
//		nil) // nil: the loop's event handler
//	...
//	asynctcp.DefaultLoop.Wait()
//
// # From cl-async
//
//	cl-async                        asynctcp
//	tcp-connect                     Connect (ConnectStream with :stream t)
//	tcp-send                        Send (deprecated: Connect with Data)
//	tcp-server                      Listen (ListenStream with :stream t)
//	close-tcp-server                Server.Close (Server.Shutdown waits too)
//	socket                          *Socket
//	socket-c                        Socket.Conn
//	socket-data                     Socket.Data, Socket.SetData
//	write-socket-data               Socket.WriteData (OnRead, OnWrite, OnEvent)
//	set-socket-timeouts             Socket.SetTimeouts
//	enable-socket                   Socket.Enable
//	disable-socket                  Socket.Disable
//	socket-closed-p                 Socket.Closed
//	close-socket                    Socket.Close (graceful), Socket.Abort
//	:data :connect-cb :write-cb     Data, OnConnect, OnWrite
//	:read-timeout :write-timeout    ReadTimeout, WriteTimeout
//	:dont-drain-read-buffer         DontDrainReadBuffer
//	:backlog                        Backlog
//	connection-info                 ErrConnectionInfo
//	connection-error                ErrConnectionError
//	tcp-info, tcp-socket            ErrTCPInfo, Event.Socket
//	tcp-error                       ErrTCPError
//	tcp-eof                         ErrTCPEOF
//	tcp-timeout                     ErrTCPTimeout
//	tcp-refused                     ErrTCPRefused
//	tcp-accept-error                ErrTCPAcceptError, Event.Server, Event.Listener
//	socket-closed                   ErrSocketClosed
//	dns-error                       ErrDNSError
//	address-in-use                  ErrAddressInUse
//	event-errcode, event-errmsg     Event.Code, Event.Msg
//	async-io-stream                 *Stream (NewStream)
//	with-event-loop                 Loop.Wait
//	exit-event-loop                 Loop.Exit
//	*default-event-handler*         Loop.EventHandler
//	*catch-application-errors*      Loop.CatchAppErrors
//
// # Beyond cl-async
//
// Wrap and Serve adopt any net.Conn and any net.Listener. WriteWatermarks,
// Socket.Writable and MaxBuffered give output flow control; CloseWrite and
// AllowHalfOpen half-close; NotifyTimeouts makes timeouts notify instead of
// closing; ReadRate, WriteRate and RateGroup limit throughput;
// ReuseReadBuffer lends the read-cb the read buffer.
//
// # Differences from cl-async
//
// Close is graceful: no input reaches the application after it, the queued
// output is flushed in the background (the socket drains its input
// meanwhile) and then the connection closes, after a short linger where
// the peer is still sending, so that no reset cuts the output short
// (Abort drops the output). Each
// socket's callbacks run on goroutines of that socket, one at a time; two
// sockets' callbacks may run at once unless the loop is Serial. There is no
// event loop to start: Connect and Listen work at once, and Loop.Wait plays
// the part of with-event-loop.
//
// # What a socket costs
//
// A socket that is reading has a reader goroutine, which also runs its
// callbacks, and a writer goroutine only while output is queued that the
// kernel did not take at once. An idle socket over a TCP or Unix
// connection on Linux has no goroutine at all: after a few idle
// milliseconds (four times its usual gap between inputs, at most 1 s)
// its descriptor waits in an epoll set of its loop, which one goroutine
// per loop watches, and a fresh reader starts when bytes, the peer's EOF
// or an error arrive. A read timeout does not keep it from parking: its
// rest waits on a timer. A socket whose reading is disabled has no reader
// either, on every system: Enable starts one. Such a socket costs about 1.3 KiB of memory,
// 1.5 KiB with a read timeout. Other idle sockets (TLS, other systems)
// keep a reader waiting on a fresh 2 KiB stack.
package asynctcp

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"strconv"
	"syscall"
	"time"
)

// ReadFunc is a read-cb: it gets the bytes read from the socket. data is a
// fresh slice that the callee may keep, except with ReuseReadBuffer, where
// it is the socket's read buffer, lent until the read-cb returns. It is nil
// where the socket does not drain its input (DontDrainReadBuffer): the
// bytes wait in the socket's input buffer, to be read with a Stream.
type ReadFunc func(s *Socket, data []byte)

// StreamFunc is a read-cb in stream mode: it is told that st has bytes to
// read.
type StreamFunc func(s *Socket, st *Stream)

// EventFunc is an event-cb: it gets the conditions of a socket or server,
// as *Event values (or a *PanicError with Loop.CatchAppErrors).
type EventFunc func(ev error)

// ConnectFunc is a connect-cb: it runs once the connection is up, before
// any read-cb.
type ConnectFunc func(s *Socket)

// CloseFunc is a close-cb (OnClose): it runs once the socket has ended,
// with the event that ended it, or nil where the application closed it.
type CloseFunc func(s *Socket, err error)

// WriteFunc is a write-cb: it runs each time the socket's output buffer has
// been drained into the connection.
type WriteFunc func(s *Socket)

// call names the functions that take options, so that each option can say
// where it applies.
type call uint16

const (
	callConnect call = 1 << iota
	callConnectStream
	callListen
	callListenStream
	callWriteData
	callWrap
	callWrapStream
	callServe
	callServeStream
)

const (
	connects = callConnect | callConnectStream
	listens  = callListen | callListenStream
	wraps    = callWrap | callWrapStream
	serves   = callServe | callServeStream
	sockets  = connects | listens | wraps | serves
	streams  = callConnectStream | callListenStream | callWrapStream | callServeStream
)

func (c call) String() string {
	switch c {
	case callConnect:
		return "Connect"
	case callConnectStream:
		return "ConnectStream"
	case callListen:
		return "Listen"
	case callListenStream:
		return "ListenStream"
	case callWriteData:
		return "WriteData"
	case callWrap:
		return "Wrap"
	case callWrapStream:
		return "WrapStream"
	case callServe:
		return "Serve"
	case callServeStream:
		return "ServeStream"
	}
	return "call"
}

// Option is a keyword argument of cl-async: built by Data, OnConnect,
// OnWrite and the other option functions, and given to Connect, Listen or
// WriteData. An option given to a call it does not apply to makes the call
// return an error naming the option, and so does a bad value. What an
// option's doc says of Connect* (Connect, ConnectStream, Send) holds for
// Wrap* too, and what it says of Listen* holds for Serve*, except that
// Dialer applies to Connect* only, Backlog to Listen* only, and TLS to
// Connect* and Listen* only (wrap a *tls.Conn or serve a tls.NewListener
// instead).
type Option struct {
	name    string
	where   call
	err     error // a bad value, reported by the call that gets it
	notices bool  // it makes events reach the event-cb that would not otherwise
	apply   func(*config)
}

// config gathers what a call's options set.
type config struct {
	data           []byte
	onConnect      ConnectFunc
	onClose        CloseFunc
	onWrite        WriteFunc
	onRead         ReadFunc
	onEvent        EventFunc
	setWrite       bool // OnWrite was given (nil clears the write-cb)
	setRead        bool
	setEvent       bool
	readTimeout    time.Duration
	writeTimeout   time.Duration
	dontDrain      bool
	backlog        int
	reusePort      bool
	keepAlive      *net.KeepAliveConfig
	sendBuf        int
	recvBuf        int
	tls            *tls.Config
	dialer         *net.Dialer
	inputLimit     int
	lowWater       int
	highWater      int
	maxBuffered    int
	halfOpen       bool
	notifyTimeouts bool
	reuse          bool
	readRate       rateConfig
	writeRate      rateConfig
	groups         []*RateGroup
}

const defaultInputLimit = 1 << 20

func newConfig(c call, opts []Option) (*config, error) {
	cfg := &config{backlog: -1, inputLimit: defaultInputLimit}
	for _, o := range opts {
		if o.apply == nil {
			return nil, badArg("%s: zero Option (build options with the option functions)", c)
		}
		if o.where&c == 0 {
			return nil, badArg("option %s does not apply to %s", o.name, c)
		}
		if o.err != nil {
			return nil, &argError{msg: fmt.Sprintf("asynctcp: option %s: %v", o.name, o.err), err: o.err}
		}
		o.apply(cfg)
	}
	return cfg, nil
}

// Data is cl-async's :data: bytes sent once the connection is up, before
// anything given to WriteData (Connect*; Wrap*: sent at once). Several Data
// options are sent in order. The bytes are copied.
func Data(p []byte) Option {
	p = append([]byte(nil), p...)
	return Option{name: "Data", where: connects | wraps, apply: func(c *config) { c.data = append(c.data, p...) }}
}

// OnClose makes f the socket's close-cb (Node's 'close' event): it runs
// exactly once for every socket that ran any callback or was returned to
// the application, however the socket ends (Close, Abort, EOF, an error, a
// timeout, a panic caught with CatchAppErrors), after every other callback
// of the socket, one at a time with them. err is the event that ended the
// socket (an *Event, or the *PanicError of a panic caught with
// CatchAppErrors), or nil where the application closed it (Close, Abort, or
// CloseWrite followed by the peer's EOF). Loop.Exit runs no close-cb, as it
// runs no other callback (Connect*, Listen*: for each accepted socket).
func OnClose(f CloseFunc) Option {
	return Option{name: "OnClose", where: sockets, apply: func(c *config) { c.onClose = f }}
}

// OnConnect is :connect-cb: f runs once the connection is up, before any
// read-cb (Connect*, Listen*: for each accepted socket). The connect-cbs of
// two sockets may run in either order, or at once unless the loop is
// Serial, whatever order they were accepted or dialed in.
func OnConnect(f ConnectFunc) Option {
	return Option{name: "OnConnect", where: sockets, apply: func(c *config) { c.onConnect = f }}
}

// OnWrite is :write-cb: f runs each time the output buffer has been drained
// into the connection (Connect*, Listen*, WriteData: replaces the socket's
// write-cb; nil removes it).
func OnWrite(f WriteFunc) Option {
	return Option{name: "OnWrite", where: sockets | callWriteData, apply: func(c *config) { c.onWrite, c.setWrite = f, true }}
}

// OnRead replaces the socket's read-cb for every read after WriteData
// returns (WriteData's :read-cb). nil discards incoming data.
func OnRead(f ReadFunc) Option {
	return Option{name: "OnRead", where: callWriteData, apply: func(c *config) { c.onRead, c.setRead = f, true }}
}

// OnEvent replaces the socket's event-cb for every event after WriteData
// returns (WriteData's :event-cb). nil hands events to the loop's handler.
func OnEvent(f EventFunc) Option {
	return Option{name: "OnEvent", where: callWriteData, apply: func(c *config) { c.onEvent, c.setEvent = f, true }}
}

// ReadTimeout is :read-timeout: while reading is enabled and nothing
// arrives for d, the socket gets an ErrTCPTimeout event and is aborted. It
// also bounds a connect. 0 means none (Connect*; Listen*: for each accepted
// socket).
func ReadTimeout(d time.Duration) Option {
	return Option{name: "ReadTimeout", where: sockets, err: checkTimeout(d), apply: func(c *config) { c.readTimeout = d }}
}

// WriteTimeout is :write-timeout: while output is queued and no byte can
// be written for d, the socket gets an ErrTCPTimeout event and is aborted.
// On TCP and Unix connections (on Unix systems) any byte written restarts
// the clock. On other connections (TLS, pipes, wrappers), whose writes a
// deadline could break, output goes out in pieces of at most 16 KiB and
// the clock restarts with each: a peer that takes less than that in d has
// stalled. Where no read timeout is set, it also bounds a connect. 0 means
// none (Connect*; Listen*: for each accepted socket).
func WriteTimeout(d time.Duration) Option {
	return Option{name: "WriteTimeout", where: sockets, err: checkTimeout(d), apply: func(c *config) { c.writeTimeout = d }}
}

func checkTimeout(d time.Duration) error {
	if d < 0 {
		return fmt.Errorf("negative timeout %v", d)
	}
	return nil
}

// DontDrainReadBuffer is :dont-drain-read-buffer t: received bytes stay in
// the socket's input buffer, to be read through a Stream (NewStream); the
// read-cb is a notification and gets nil data (Connect, Listen, Wrap,
// Serve: the stream-mode calls keep their input so anyway).
//
// The stream-mode calls (ConnectStream, ListenStream, WrapStream,
// ServeStream) keep the input in the same buffer and are simpler: their
// read-cb gets the socket's own Stream, the same at every call, so that a
// deadline set on it holds at the next, where NewStream makes a new view
// at each call, with deadlines of its own and none set. This option is for
// code that keeps a ReadFunc, such as code ported from cl-async that
// passes :dont-drain-read-buffer.
func DontDrainReadBuffer() Option {
	return Option{name: "DontDrainReadBuffer", where: sockets, apply: func(c *config) { c.dontDrain = true }}
}

// ReusePort sets SO_REUSEPORT on the server's socket before it binds, so
// that several servers, in one process or several, can listen on one port
// while the kernel spreads the connections among them (Listen,
// ListenStream, NewListener). Where the platform lacks SO_REUSEPORT,
// Listen returns an ErrBadArgument error wrapping errors.ErrUnsupported.
func ReusePort() Option {
	var err error
	if !haveReusePort {
		err = errors.ErrUnsupported
	}
	return Option{name: "ReusePort", where: listens, err: err, apply: func(c *config) { c.reusePort = true }}
}

// KeepAlive sets TCP keep-alive on the connection (Connect*, Wrap* of a
// TCP connection or a *tls.Conn over one) or on every accepted connection
// (Listen*, Serve*), with net.KeepAliveConfig's meaning: a peer that stops
// answering the probes ends the socket with an error event. On a
// connection that is not TCP it does nothing.
func KeepAlive(cfg net.KeepAliveConfig) Option {
	return Option{name: "KeepAlive", where: sockets, apply: func(c *config) { c.keepAlive = &cfg }}
}

// SendBuffer sets the kernel's send buffer of the connection (SO_SNDBUF)
// to n bytes (n > 0), on Connect* and Wrap* of a TCP connection (or a
// *tls.Conn over one) and on every connection Listen* and Serve* accept.
// A fixed size stops the kernel from growing the buffer by itself (Linux
// grows it to some MiB for a peer that reads slowly), so that with
// MaxBuffered it bounds what a slow peer costs. Linux doubles the value
// for its bookkeeping. On a connection that is not TCP it does nothing.
func SendBuffer(n int) Option {
	return Option{name: "SendBuffer", where: sockets, err: checkPositive("size", n), apply: func(c *config) { c.sendBuf = n }}
}

// ReceiveBuffer sets the kernel's receive buffer of the connection
// (SO_RCVBUF) to n bytes (n > 0), as SendBuffer does the send buffer: a
// small one makes a fast peer feel the back-pressure of Disable(EvRead)
// sooner.
func ReceiveBuffer(n int) Option {
	return Option{name: "ReceiveBuffer", where: sockets, err: checkPositive("size", n), apply: func(c *config) { c.recvBuf = n }}
}

// checkPositive is the error of an option's size, limit or bound n that is
// not positive (what names it), or nil.
func checkPositive(what string, n int) error {
	if n <= 0 {
		return fmt.Errorf("%s %d is not positive", what, n)
	}
	return nil
}

// Backlog is :backlog: the listen(2) backlog of the server's socket. n < 0
// means the system default (Listen*).
func Backlog(n int) Option {
	return Option{name: "Backlog", where: listens, apply: func(c *config) { c.backlog = n }}
}

// TLS makes the socket a TLS client (Connect*) or the server's sockets TLS
// servers (Listen*) with cfg.
func TLS(cfg *tls.Config) Option {
	var err error
	if cfg == nil {
		err = errors.New("nil *tls.Config")
	}
	return Option{name: "TLS", where: connects | listens, err: err, apply: func(c *config) { c.tls = cfg }}
}

// Dialer makes Connect dial with d: its Resolver, LocalAddr, KeepAlive,
// Timeout and Control apply (Connect*).
func Dialer(d *net.Dialer) Option {
	var err error
	if d == nil {
		err = errors.New("nil *net.Dialer")
	}
	return Option{name: "Dialer", where: connects, err: err, apply: func(c *config) { c.dialer = d }}
}

// InputLimit bounds the unread input of a socket in stream mode to n bytes
// (default 1 MiB): when it is full the socket stops reading until the
// application reads (Connect*, Listen*).
func InputLimit(n int) Option {
	return Option{name: "InputLimit", where: sockets, err: checkPositive("limit", n), apply: func(c *config) { c.inputLimit = n }}
}

// WriteWatermarks sets libevent's write watermarks (Node's highWaterMark,
// Netty's writability): the write-cb runs each time a write to the
// connection takes the queued output from above low to low or below (the
// default, low 0, runs it when the output is drained), and Writable is
// false while Buffered() >= high. high 0 means no high watermark; low must
// not be negative, nor above a high watermark.
func WriteWatermarks(low, high int) Option {
	var err error
	if low < 0 || high < 0 || (high > 0 && low > high) {
		err = fmt.Errorf("want 0 <= low <= high (or high 0), got low %d, high %d", low, high)
	}
	return Option{name: "WriteWatermarks", where: sockets, err: err, apply: func(c *config) { c.lowWater, c.highWater = low, high }}
}

// MaxBuffered bounds the socket's queued output to n bytes (n > 0): a
// WriteData or Socket.Write that would pass it queues nothing and returns
// an ErrBufferFull event; the socket stays open. A write is queued whole or
// not at all, so one larger than n never fits, not even in an empty
// buffer. Stream.Write blocks instead until its bytes fit, queueing a large
// write in pieces.
func MaxBuffered(n int) Option {
	return Option{name: "MaxBuffered", where: sockets, err: checkPositive("bound", n), apply: func(c *config) { c.maxBuffered = n }}
}

// AllowHalfOpen keeps a socket writable after the peer's EOF (Node's
// allowHalfOpen): the event-cb gets the ErrTCPEOF event after every byte,
// but the socket stays open for writing until the application closes it or
// shuts its write side too (CloseWrite), which closes it.
func AllowHalfOpen() Option {
	return Option{name: "AllowHalfOpen", where: sockets, apply: func(c *config) { c.halfOpen = true }}
}

// ReuseReadBuffer lends the read-cb the socket's read buffer instead of
// a fresh slice: data is valid only until the read-cb returns, and the
// read-cb must copy what it keeps (WriteData copies). It spares one
// allocation per read, and the garbage collection it drives, where a
// socket moves bulk data (a proxy, an echo). It applies to Connect, Send,
// Listen, Wrap and Serve; the stream-mode calls refuse it, and with
// DontDrainReadBuffer there is no data to lend.
func ReuseReadBuffer() Option {
	return Option{name: "ReuseReadBuffer", where: callConnect | callListen | callWrap | callServe, apply: func(c *config) { c.reuse = true }}
}

// NotifyTimeouts makes read and write timeouts notify instead of closing,
// as libevent does: the event-cb gets an ErrTCPTimeout event with Dir set,
// and the socket stays open with that direction disabled (before the
// event-cb runs, so an Enable inside it holds); Enable re-arms it, and
// the output resumes where it stopped, over TLS too. A connect timeout
// still ends the socket.
func NotifyTimeouts() Option {
	return Option{name: "NotifyTimeouts", where: sockets, notices: true, apply: func(c *config) { c.notifyTimeouts = true }}
}

// Connect opens a TCP connection to host (a name, or an IP address such as
// "::1") and port on DefaultLoop; see Loop.Connect.
func Connect(host string, port int, read ReadFunc, event EventFunc, opts ...Option) (*Socket, error) {
	return DefaultLoop.Connect(host, port, read, event, opts...)
}

// ConnectStream is Connect in stream mode on DefaultLoop, host as for
// Connect; see Loop.ConnectStream.
func ConnectStream(host string, port int, read StreamFunc, event EventFunc, opts ...Option) (*Stream, error) {
	return DefaultLoop.ConnectStream(host, port, read, event, opts...)
}

// Send is tcp-send: Connect with data sent first.
//
// Deprecated: use Connect with Data.
func Send(host string, port int, data []byte, read ReadFunc, event EventFunc, opts ...Option) (*Socket, error) {
	return DefaultLoop.Send(host, port, data, read, event, opts...)
}

// Listen starts a TCP server on DefaultLoop, on bindAddress (an IP
// address such as "::1", a name, or "" for every address of the local
// system) and port; see Loop.Listen.
func Listen(bindAddress string, port int, read ReadFunc, event EventFunc, opts ...Option) (*Server, error) {
	return DefaultLoop.Listen(bindAddress, port, read, event, opts...)
}

// ListenStream starts a TCP server in stream mode on DefaultLoop,
// bindAddress as for Listen; see Loop.ListenStream.
func ListenStream(bindAddress string, port int, read StreamFunc, event EventFunc, opts ...Option) (*Server, error) {
	return DefaultLoop.ListenStream(bindAddress, port, read, event, opts...)
}

// Connect is tcp-connect: it opens a TCP connection to host and port, and
// returns at once; the lookup and the connect run in the background. The
// connect-cb (OnConnect) runs once the connection is up, read gets what
// arrives, event gets the conditions (nil: the loop's EventHandler).
// Writes before the connection is up are queued.
//
// host is an IP address, IPv6 without brackets ("::1", "fe80::1%eth0";
// "[::1]" fails with an ErrTCPError event), or a name, looked up in the
// background with the Resolver of the Dialer option, else with
// net.DefaultResolver; a failed lookup is an ErrDNSError event. A name
// with several addresses is dialled as net.Dialer dials it, trying them
// until one answers. "" connects to the local system, as net.Dial does.
// The connect timeout (the read timeout, else the write timeout) and the
// Dialer's Timeout bound the lookup and the connect together; running out
// is an ErrTCPTimeout event. With TLS, the server's certificate is
// verified for host unless the tls.Config names a ServerName.
func (l *Loop) Connect(host string, port int, read ReadFunc, event EventFunc, opts ...Option) (*Socket, error) {
	return l.connect(callConnect, host, port, read, nil, event, opts)
}

// ConnectStream is tcp-connect with :stream t: Connect (host as there)
// whose socket keeps its input in a buffer, read through the returned
// Stream; read is told when bytes arrive.
func (l *Loop) ConnectStream(host string, port int, read StreamFunc, event EventFunc, opts ...Option) (*Stream, error) {
	s, err := l.connect(callConnectStream, host, port, nil, read, event, opts)
	if err != nil {
		return nil, err
	}
	return s.stream, nil
}

// Send is tcp-send: Connect with data sent first.
//
// Deprecated: use Connect with Data.
func (l *Loop) Send(host string, port int, data []byte, read ReadFunc, event EventFunc, opts ...Option) (*Socket, error) {
	return l.Connect(host, port, read, event, append([]Option{Data(data)}, opts...)...)
}

func (l *Loop) connect(c call, host string, port int, read ReadFunc, sread StreamFunc, event EventFunc, opts []Option) (*Socket, error) {
	if l == nil {
		return nil, errNilLoop
	}
	if port < 1 || port > 65535 {
		return nil, badArg("%s: port %d is outside 1-65535", c, port)
	}
	cfg, err := newConfig(c, opts)
	if err != nil {
		return nil, err
	}
	s := newSocket(l, nil, cfg, read, sread, event, c == callConnectStream)
	s.start(dialer(cfg.dialer, net.JoinHostPort(host, strconv.Itoa(port)), host, cfg.tls))
	return s, nil
}

// Wrap adopts conn, an established connection of any kind (TCP, Unix, a
// *tls.Conn, an end of net.Pipe), as a socket of DefaultLoop; see
// Loop.Wrap.
func Wrap(conn net.Conn, read ReadFunc, event EventFunc, opts ...Option) (*Socket, error) {
	return DefaultLoop.Wrap(conn, read, event, opts...)
}

// WrapStream is Wrap in stream mode on DefaultLoop; see Loop.WrapStream.
func WrapStream(conn net.Conn, read StreamFunc, event EventFunc, opts ...Option) (*Stream, error) {
	return DefaultLoop.WrapStream(conn, read, event, opts...)
}

// Serve accepts from ln, a listener of any kind, on DefaultLoop; see
// Loop.Serve.
func Serve(ln net.Listener, read ReadFunc, event EventFunc, opts ...Option) (*Server, error) {
	return DefaultLoop.Serve(ln, read, event, opts...)
}

// ServeStream is Serve in stream mode on DefaultLoop; see Loop.ServeStream.
func ServeStream(ln net.Listener, read StreamFunc, event EventFunc, opts ...Option) (*Server, error) {
	return DefaultLoop.ServeStream(ln, read, event, opts...)
}

// Wrap adopts conn, an established connection of any kind (TCP, Unix, a
// *tls.Conn, an end of net.Pipe), as cl-async's init-tcp-socket :fd does:
// the socket is up at once, its connect-cb runs before any read-cb, and it
// behaves as a socket from Connect. Data is sent at once. Dialer, Backlog
// and TLS do not apply (wrap a *tls.Conn instead). A *tls.Conn whose
// handshake has not run is up once the handshake is done, bounded by the
// connect timeout (ReadTimeout, else WriteTimeout) as for a Connect with
// TLS; a failed handshake is the socket's event. From then on the socket
// owns conn, as Socket.Conn says: close the socket, not conn.
func (l *Loop) Wrap(conn net.Conn, read ReadFunc, event EventFunc, opts ...Option) (*Socket, error) {
	return l.wrap(callWrap, conn, read, nil, event, opts)
}

// WrapStream is Wrap in stream mode: the socket keeps its input in a
// buffer, read through the returned Stream; read is told when bytes arrive.
func (l *Loop) WrapStream(conn net.Conn, read StreamFunc, event EventFunc, opts ...Option) (*Stream, error) {
	s, err := l.wrap(callWrapStream, conn, nil, read, event, opts)
	if err != nil {
		return nil, err
	}
	return s.stream, nil
}

func (l *Loop) wrap(c call, conn net.Conn, read ReadFunc, sread StreamFunc, event EventFunc, opts []Option) (*Socket, error) {
	if l == nil {
		return nil, errNilLoop
	}
	if conn == nil {
		return nil, badArg("%s: nil net.Conn", c)
	}
	cfg, err := newConfig(c, opts)
	if err != nil {
		return nil, err
	}
	s := newSocket(l, nil, cfg, read, sread, event, c == callWrapStream)
	s.wrapped = true
	s.adoptOrHandshake(conn)
	return s, nil
}

// Listen is tcp-server: it binds bindAddress and port (0 picks a free one,
// see Server.Addr) and accepts connections in the background. Each
// accepted socket gets read, event and the options (OnConnect, OnWrite,
// timeouts...). A bind failure is returned at once, as an *Event
// (ErrAddressInUse for EADDRINUSE).
//
// bindAddress is an IP address, IPv6 without brackets ("::1"), or a name.
// "" stands for 0.0.0.0, which, like "::", listens on every address of the
// local system as net.Listen does: where the system has dual-stack
// sockets, IPv4 and IPv6 connections alike, and Server.Addr then shows
// [::]. To accept IPv4 only, Serve a listener from net.Listen("tcp4",
// ...). A name is looked up once, by Listen itself (which waits for it),
// with net.DefaultResolver, and the server listens on one of its
// addresses only, the first IPv4 one where there is one, as net.Listen
// does; a failed lookup is returned as an ErrDNSError event.
func (l *Loop) Listen(bindAddress string, port int, read ReadFunc, event EventFunc, opts ...Option) (*Server, error) {
	return l.listen(callListen, bindAddress, port, read, nil, event, opts)
}

// ListenStream is tcp-server in stream mode, bindAddress as for Listen:
// each accepted socket keeps its input in a buffer, read through a Stream;
// read is told when bytes arrive.
//
// Prefer it to Listen with DontDrainReadBuffer, which keeps the input the
// same way. ListenStream's read is a StreamFunc, given the socket's own
// Stream, the same at every call, so that a deadline set on it holds at
// the next call. With DontDrainReadBuffer the read-cb is a ReadFunc,
// called with nil data, and the Stream comes from NewStream, which makes a
// new view at each call, with deadlines of its own and none set.
// ReuseReadBuffer, which stream mode has no use for, is refused by
// ListenStream and ignored with DontDrainReadBuffer. A goroutine that
// reads a socket on its own takes a Stream from NewStream in the
// connect-cb (OnConnect), in either mode.
func (l *Loop) ListenStream(bindAddress string, port int, read StreamFunc, event EventFunc, opts ...Option) (*Server, error) {
	return l.listen(callListenStream, bindAddress, port, nil, read, event, opts)
}

func (l *Loop) listen(c call, bindAddress string, port int, read ReadFunc, sread StreamFunc, event EventFunc, opts []Option) (*Server, error) {
	if l == nil {
		return nil, errNilLoop
	}
	if err := checkListenPort(c.String(), port); err != nil {
		return nil, err
	}
	cfg, err := newConfig(c, opts)
	if err != nil {
		return nil, err
	}
	ln, err := bind(bindAddress, port, cfg.backlog, cfg.reusePort)
	if err != nil {
		return nil, err
	}
	return serve(l, ln, cfg, read, sread, event, c == callListenStream), nil
}

func checkListenPort(name string, port int) error {
	if port < 0 || port > 65535 {
		return badArg("%s: port %d is outside 0-65535", name, port)
	}
	return nil
}

// bind listens on bindAddress ("" is 0.0.0.0: every address of the local
// system, IPv6 too where the system has dual-stack sockets) and port, with
// the backlog asked for (< 0: the system's) and SO_REUSEPORT where asked.
// A failure is an *Event.
func bind(bindAddress string, port, backlog int, reuse bool) (net.Listener, error) {
	if bindAddress == "" {
		bindAddress = "0.0.0.0"
	}
	var lc net.ListenConfig
	if reuse {
		lc.Control = func(_, _ string, c syscall.RawConn) error { return reusePort(c) }
	}
	ln, err := lc.Listen(context.Background(), "tcp", net.JoinHostPort(bindAddress, strconv.Itoa(port)))
	if err != nil {
		return nil, newEvent(nil, err)
	}
	if backlog >= 0 {
		if err := setBacklog(ln, backlog); err != nil {
			ln.Close()
			return nil, newEvent(nil, err)
		}
	}
	return ln, nil
}

// Serve accepts connections from ln, a listener of any kind (Unix, a
// tls.NewListener, one handed over by a service manager through
// net.FileListener), exactly as Listen does, as cl-async's tcp-server :fd
// does. Server.Close closes ln; Server.Addr is ln's address. Backlog and
// TLS do not apply (serve a tls.NewListener instead): the handshake of each
// *tls.Conn it accepts runs before the socket is up, bounded by the connect
// timeout, as with Listen and TLS.
func (l *Loop) Serve(ln net.Listener, read ReadFunc, event EventFunc, opts ...Option) (*Server, error) {
	return l.serveListener(callServe, ln, read, nil, event, opts)
}

// ServeStream is Serve in stream mode: each accepted socket keeps its input
// in a buffer, read through a Stream; read is told when bytes arrive.
func (l *Loop) ServeStream(ln net.Listener, read StreamFunc, event EventFunc, opts ...Option) (*Server, error) {
	return l.serveListener(callServeStream, ln, nil, read, event, opts)
}

func (l *Loop) serveListener(c call, ln net.Listener, read ReadFunc, sread StreamFunc, event EventFunc, opts []Option) (*Server, error) {
	if l == nil {
		return nil, errNilLoop
	}
	if ln == nil {
		return nil, badArg("%s: nil net.Listener", c)
	}
	cfg, err := newConfig(c, opts)
	if err != nil {
		return nil, err
	}
	return serve(l, ln, cfg, read, sread, event, c == callServeStream), nil
}
