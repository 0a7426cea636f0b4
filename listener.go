package asynctcp

import (
	"errors"
	"net"
	"sync"
)

// acceptQueue bounds the connections a listener has accepted and not yet
// handed to Accept (those in their TLS handshake included).
const acceptQueue = 64

// NewListener starts a TCP server in stream mode on DefaultLoop and returns
// it as a net.Listener; see Loop.NewListener.
func NewListener(bindAddress string, port int, opts ...Option) (net.Listener, error) {
	return DefaultLoop.NewListener(bindAddress, port, opts...)
}

// NewListener is ListenStream as a net.Listener, for code written against
// net's accept loop: net/http's Server.Serve, grpc, or a loop of your own.
// It binds bindAddress ("" is 0.0.0.0) and port (0 picks a free one, see
// Addr), and each connection it accepts becomes a socket of the loop in
// stream mode, which Accept returns as its *Stream (a net.Conn; the
// *Socket is Stream.Socket). A bind failure is returned at once, as
// ListenStream returns it (ErrAddressInUse for EADDRINUSE).
//
// Accept blocks until a connection is up (with TLS: handshaken) or the
// listener is closed. Up to 64 connections wait for Accept; while that
// many do, the listener stops accepting, so further clients wait in the
// kernel's listen backlog (Backlog) exactly as they do for a net listener
// whose Accept is not called. Nothing waiting is lost: each waiting
// connection is returned by an Accept or closed by Close.
//
// Close stops accepting and returns at once: pending and later Accepts
// return a *net.OpError wrapping net.ErrClosed, as net's listeners do;
// the connections that were accepted but not yet returned by Accept are
// closed, and those Accept returned stay open, each until its application
// closes it. A second Close returns such an error too. The listener is a
// server of the loop until it is closed, and Loop.Wait waits for its
// streams as for any socket; Loop.Exit closes it.
//
// The options are ListenStream's, for every accepted socket: Backlog, TLS,
// ReadTimeout, WriteTimeout, InputLimit, WriteWatermarks, MaxBuffered, read
// and write rates, and OnConnect (it runs before Accept returns the
// socket) and OnWrite. Options that do not apply make NewListener return
// an error naming them: those ListenStream refuses, and NotifyTimeouts,
// whose notices would have no event-cb to go to.
//
// Where cl-async's callbacks would see events, a net.Conn's user sees
// errors: a socket's EOF, reset or timeout comes back from the Stream's
// Read and Write, not through an event-cb. Accept failures and failed TLS
// handshakes go to the loop's EventHandler (logged where it is nil). The
// sockets allow half-open connections (AllowHalfOpen), as a net.Conn
// does: after the peer's EOF, Read returns io.EOF while writes still go
// out, until the application closes the stream. With TLS the Stream
// carries the decrypted bytes and net/http does not know it is TLS
// (Request.TLS is nil); to serve HTTPS with net/http, call its ServeTLS
// on a listener without the TLS option.
func (l *Loop) NewListener(bindAddress string, port int, opts ...Option) (net.Listener, error) {
	if l == nil {
		return nil, errNilLoop
	}
	if err := checkListenPort("NewListener", port); err != nil {
		return nil, err
	}
	cfg, err := listenerConfig(opts)
	if err != nil {
		return nil, err
	}
	tcp, err := bind(bindAddress, port, cfg.backlog, cfg.reusePort)
	if err != nil {
		return nil, err
	}
	ln := &listener{
		loop:      l,
		addr:      tcp.Addr(),
		onConnect: cfg.onConnect,
		conns:     make(chan *Stream, acceptQueue),
		slots:     make(chan struct{}, acceptQueue),
		done:      make(chan struct{}),
	}
	cfg.onConnect = ln.connected
	cfg.halfOpen = true
	// The server accepts through the gate, which waits for a free slot:
	// that is the back-pressure ListenStream's own accept loop lacks.
	srv := serve(l, gate{tcp, ln}, cfg, nil, nil, ln.event, true)
	ln.mu.Lock()
	ln.srv = srv
	ln.mu.Unlock()
	return ln, nil
}

// listenerConfig checks opts as ListenStream does, naming NewListener in
// its errors, and refuses the options that send notices to an event-cb
// (NotifyTimeouts): a listener's sockets have none.
func listenerConfig(opts []Option) (*config, error) {
	for _, o := range opts {
		switch {
		case o.apply == nil:
			return nil, badArg("NewListener: zero Option (build options with the option functions)")
		case o.where&callListenStream == 0, o.notices:
			return nil, badArg("option %s does not apply to NewListener", o.name)
		}
	}
	return newConfig(callListenStream, opts)
}

// listener is the net.Listener of NewListener. A slot is held for each
// connection accepted and not yet returned by Accept: taken by the gate
// before it accepts, given back by Accept, or where the connection never
// reaches the queue (a failed handshake, a socket closed by OnConnect).
type listener struct {
	loop      *Loop
	addr      net.Addr
	onConnect ConnectFunc   // the application's OnConnect
	conns     chan *Stream  // up and waiting for Accept; never fuller than slots
	slots     chan struct{} // one per connection accepted and not yet taken
	done      chan struct{} // closed once the listener is closed

	mu        sync.Mutex
	srv       *Server
	closed    bool // done is closed; nothing joins conns any more
	closeSeen bool // Close was called
}

// Accept waits for a connection and returns its *Stream.
func (ln *listener) Accept() (net.Conn, error) {
	if closed(ln.done) { // a closed listener never returns a waiting conn
		return nil, ln.opError("accept", net.ErrClosed)
	}
	select {
	case st := <-ln.conns:
		ln.release()
		return st, nil
	case <-ln.done:
		return nil, ln.opError("accept", net.ErrClosed)
	}
}

// Close stops accepting and closes the connections waiting for Accept.
func (ln *listener) Close() error {
	ln.mu.Lock()
	again := ln.closeSeen
	ln.closeSeen = true
	srv := ln.srv
	ln.mu.Unlock()
	if again {
		return ln.opError("close", net.ErrClosed)
	}
	err := srv.Close() // closes the gate, which shuts the listener
	ln.shut()          // where Loop.Exit had closed the server already
	return err
}

// Addr returns the address the listener is bound to.
func (ln *listener) Addr() net.Addr { return ln.addr }

func (ln *listener) opError(op string, err error) error {
	return &net.OpError{Op: op, Net: "tcp", Addr: ln.addr, Err: err}
}

// release gives a slot back.
func (ln *listener) release() {
	select {
	case <-ln.slots:
	default: // cannot happen: every release follows a take
	}
}

// connected is the connect-cb of every accepted socket: the application's
// OnConnect, then the socket joins the queue.
func (ln *listener) connected(s *Socket) {
	queued := false
	defer func() {
		if !queued { // OnConnect panicked: the socket is aborted
			ln.release()
		}
	}()
	if ln.onConnect != nil {
		ln.onConnect(s)
	}
	queued = true
	ln.arrived(s)
}

// arrived queues s for Accept, unless OnConnect closed it or the listener
// was closed meanwhile.
func (ln *listener) arrived(s *Socket) {
	if s.Closed() {
		ln.release()
		return
	}
	ln.mu.Lock()
	if !ln.closed {
		ln.conns <- s.stream // never blocks: s holds a slot
		ln.mu.Unlock()
		return
	}
	ln.mu.Unlock()
	s.Close()
}

// event is the event-cb of the server and its sockets. A socket's EOF or
// error reaches its application through the Stream's Read and Write;
// what no Stream can report goes to the loop's handler.
func (ln *listener) event(ev error) {
	var e *Event
	switch {
	case !errors.As(ev, &e): // a panic of OnConnect or OnWrite
		ln.loop.handle(ev)
	case e.Socket == nil: // an accept failure
		ln.loop.handle(ev)
	case e.Socket.Conn() == nil: // a failed handshake: it never queued
		ln.release()
		ln.loop.handle(ev)
	}
}

// shut closes the listener: once, where its server closes the gate (on
// Close, or Loop.Exit). The sockets accepted and not yet taken are closed:
// those queued, and those still in their handshake.
func (ln *listener) shut() {
	ln.mu.Lock()
	if ln.closed {
		ln.mu.Unlock()
		return
	}
	ln.closed = true
	close(ln.done)
	srv := ln.srv
	ln.mu.Unlock()
	for drained := false; !drained; {
		select {
		case st := <-ln.conns:
			st.s.Close()
		default:
			drained = true
		}
	}
	if srv == nil { // Loop.Exit ran before NewListener returned: it aborts all
		return
	}
	// The server is closed, so its set of sockets no longer grows.
	srv.mu.Lock()
	socks := make([]*Socket, 0, len(srv.sockets))
	for s := range srv.sockets {
		socks = append(socks, s)
	}
	srv.mu.Unlock()
	for _, s := range socks {
		if s.Conn() == nil { // handshaking: Accept never saw it
			s.Abort()
		}
	}
}

// gate is the listener the server accepts from: the bound TCP listener,
// accepting only while a slot is free.
type gate struct {
	net.Listener
	ln *listener
}

// Accept takes a slot, then accepts; it gives up once the listener is
// closed.
func (g gate) Accept() (net.Conn, error) {
	select {
	case g.ln.slots <- struct{}{}:
	case <-g.ln.done:
		return nil, g.ln.opError("accept", net.ErrClosed)
	}
	if closed(g.ln.done) {
		g.ln.release()
		return nil, g.ln.opError("accept", net.ErrClosed)
	}
	conn, err := g.Listener.Accept()
	if err != nil {
		g.ln.release()
	}
	return conn, err
}

// Close closes the TCP listener and the net.Listener over it.
func (g gate) Close() error {
	err := g.Listener.Close()
	g.ln.shut()
	return err
}
