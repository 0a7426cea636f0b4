package asynctcp

import (
	"context"
	"crypto/tls"
	"errors"
	"net"
	"sync"
	"time"
)

// nilServer is the error of a method called on a nil *Server.
func nilServer(method string) error { return badArg("%s: nil *Server", method) }

// Server is cl-async's tcp-server: a listener whose accepted connections
// become sockets with the server's callbacks and options.
type Server struct {
	loop      *Loop
	ln        net.Listener
	cfg       *config
	read      ReadFunc
	sread     StreamFunc
	event     EventFunc
	streaming bool          // stream mode
	quit      chan struct{} // closed by Close
	done      chan struct{} // closed when the accept loop has ended

	mu      sync.Mutex
	closed  bool
	sockets map[*Socket]struct{}
	idle    chan struct{} // closed when the last socket ends
}

func serve(l *Loop, ln net.Listener, cfg *config, read ReadFunc, sread StreamFunc, event EventFunc, stream bool) *Server {
	srv := &Server{
		loop: l, ln: ln, cfg: cfg,
		read: read, sread: sread, event: event, streaming: stream,
		quit:    make(chan struct{}),
		done:    make(chan struct{}),
		sockets: make(map[*Socket]struct{}),
	}
	l.addServer(srv)
	go srv.acceptLoop()
	return srv
}

// acceptLoop accepts until the server is closed. An accept failure goes to
// the event-cb; the loop backs off (5 ms doubling to 1 s) and goes on, so
// that running out of descriptors does not spin.
func (srv *Server) acceptLoop() {
	defer func() {
		close(srv.done)
		srv.loop.removeServer(srv)
	}()
	var delay time.Duration
	for {
		conn, err := srv.ln.Accept()
		if err == nil {
			delay = 0
			srv.adopt(conn)
			continue
		}
		if srv.Closed() || errors.Is(err, net.ErrClosed) {
			return
		}
		srv.acceptFailed(err)
		delay = min(max(2*delay, 5*time.Millisecond), time.Second)
		if !srv.pause(delay) {
			return
		}
	}
}

// pause sleeps for d, or until the server is closed.
func (srv *Server) pause(d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-srv.quit:
		return false
	}
}

func (srv *Server) acceptFailed(err error) {
	ev := newEvent(nil, err)
	ev.Class, ev.Server, ev.Listener = ErrTCPAcceptError, srv, srv.ln
	held, _ := srv.loop.enter(true)
	defer srv.loop.leave(held)
	cb := srv.event
	if cb == nil {
		srv.loop.handle(ev)
		return
	}
	if pe := srv.loop.call(func() { cb(ev) }, nil); pe != nil {
		srv.loop.handle(pe)
	}
}

// adopt makes a socket of an accepted conn, unless the server was closed
// meanwhile.
func (srv *Server) adopt(conn net.Conn) {
	srv.mu.Lock()
	defer srv.mu.Unlock()
	if srv.closed {
		conn.Close()
		return
	}
	s := newSocket(srv.loop, srv, srv.cfg, srv.read, srv.sread, srv.event, srv.streaming)
	srv.sockets[s] = struct{}{}
	if cfg := srv.cfg.tls; cfg != nil {
		s.start(func(ctx context.Context) (net.Conn, error) {
			return handshake(ctx, tls.Server(conn, cfg))
		})
		return
	}
	s.adoptOrHandshake(conn)
}

// forget removes an ended socket from the server's books.
func (srv *Server) forget(s *Socket) {
	srv.mu.Lock()
	defer srv.mu.Unlock()
	delete(srv.sockets, s)
	if len(srv.sockets) == 0 {
		wake(&srv.idle)
	}
}

// Close is close-tcp-server: it stops accepting and closes the listener,
// leaving the server's open sockets running. On a closed server it does
// nothing and returns nil.
func (srv *Server) Close() error {
	if srv == nil {
		return nilServer("Server.Close")
	}
	srv.mu.Lock()
	if srv.closed {
		srv.mu.Unlock()
		return nil
	}
	srv.closed = true
	close(srv.quit)
	srv.mu.Unlock()
	if err := srv.ln.Close(); err != nil && !errors.Is(err, net.ErrClosed) {
		return newEvent(nil, err)
	}
	return nil
}

// Closed reports whether Close was called.
func (srv *Server) Closed() bool {
	if srv == nil {
		return true
	}
	srv.mu.Lock()
	defer srv.mu.Unlock()
	return srv.closed
}

// Addr returns the address the server is bound to (with the port that
// port 0 picked).
func (srv *Server) Addr() net.Addr {
	if srv == nil {
		return nil
	}
	return srv.ln.Addr()
}

// Shutdown closes the server, then waits until its sockets have closed
// (each as its application or peer closes it) or ctx is done, and returns
// ctx's error then. Called from inside a callback of the server's loop,
// where it could wait for its own socket, it does nothing and returns an
// ErrBadArgument error at once.
func (srv *Server) Shutdown(ctx context.Context) error {
	if srv == nil {
		return nilServer("Server.Shutdown")
	}
	if srv.loop.insideCallback() {
		return badArg("Server.Shutdown called inside a callback of its loop, where it could wait for itself")
	}
	if err := srv.Close(); err != nil {
		return err
	}
	select {
	case <-srv.done:
	case <-ctx.Done():
		return ctx.Err()
	}
	for {
		srv.mu.Lock()
		if len(srv.sockets) == 0 {
			srv.mu.Unlock()
			return nil
		}
		idle := waiter(&srv.idle)
		srv.mu.Unlock()
		select {
		case <-idle:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}
