package asynctcp

import (
	"context"
	"crypto/tls"
	"net"
	"time"
)

// start brings the socket up in the background with connect (a dial, or
// a TLS handshake on an accepted conn), bounded by the connect timeout and
// cancelled by Abort, then runs it.
func (s *Socket) start(connect func(ctx context.Context) (net.Conn, error)) {
	ctx, cancel := context.WithCancel(context.Background())
	s.cancel = cancel
	timeout := s.connectTimeout()
	s.grp.Go(func() error {
		defer cancel()
		ctx := ctx
		if timeout > 0 {
			var stop context.CancelFunc
			ctx, stop = context.WithTimeout(ctx, timeout)
			defer stop()
		}
		conn, err := connect(ctx)
		if err != nil && ctx.Err() == context.DeadlineExceeded {
			err = &connectTimeout{err} // whatever step ran out of time
		}
		if err != nil {
			s.fail(err, 0)
			return nil
		}
		s.adopt(conn)
		return nil
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

// pendingHandshake returns conn as a *tls.Conn whose handshake has not run
// (one from tls.NewListener's Accept, or handed to Wrap before it spoke),
// or nil. The connector runs that handshake, bounded by the connect
// timeout, as for the TLS option: left to the first read, it would run
// under the reader's deadlines, and crypto/tls keeps a handshake's timeout
// for good.
func pendingHandshake(conn net.Conn) *tls.Conn {
	tc, ok := conn.(*tls.Conn)
	if !ok || tc.ConnectionState().HandshakeComplete {
		return nil
	}
	return tc
}

// adoptOrHandshake adopts conn, after its TLS handshake where that has
// not run (pendingHandshake).
func (s *Socket) adoptOrHandshake(conn net.Conn) {
	tc := pendingHandshake(conn)
	if tc == nil {
		s.adopt(conn)
		return
	}
	s.start(func(ctx context.Context) (net.Conn, error) { return handshake(ctx, tc) })
}

func handshake(ctx context.Context, tc *tls.Conn) (net.Conn, error) {
	if err := tc.HandshakeContext(ctx); err != nil {
		tc.Close()
		return nil, err
	}
	return tc, nil
}

// adopt brings the socket up on an established conn and starts its reader
// on a fresh goroutine (so that an idle socket's parked stack stays small).
// A socket closed while connecting only flushes (its reader drains); one
// aborted meanwhile closes conn.
func (s *Socket) adopt(conn net.Conn) {
	s.tuneTCP(conn)
	s.mu.Lock()
	up := s.attachLocked(conn)
	if up {
		s.grp.Go(s.readLoop)
	}
	late := s.phase == dead && s.conn == nil
	s.mu.Unlock()
	if late {
		conn.Close()
	}
}

// attachLocked gives the socket its conn, cleared of any deadline it
// carries (a conn handed to Wrap may have one), and starts the writer
// where output is queued. It reports whether the socket is open to read.
// mu is held.
func (s *Socket) attachLocked(conn net.Conn) bool {
	if s.phase == dead {
		return false
	}
	conn.SetDeadline(time.Time{})
	s.conn = conn
	s.raw = newRawIO(conn)
	if s.cancel != nil {
		s.cancel() // the connect is over: release its context
	}
	if s.phase == flushing {
		// Closed while connecting: flush, and drain the input meanwhile.
		s.rside = draining
		s.kickLocked()
		return true
	}
	s.phase = open
	// The connect-cb is queued before anything can queue a write-cb or a
	// read-cb; the reader runs it when it starts.
	s.qmu.Lock()
	s.queue = append(s.queue, s.connected)
	s.qmu.Unlock()
	s.kickLocked()
	return true
}

// beneathTLS returns the conn under a *tls.Conn, and any other conn as it
// is: what the kernel's socket options and queues belong to.
func beneathTLS(conn net.Conn) net.Conn {
	if tc, ok := conn.(*tls.Conn); ok {
		return tc.NetConn()
	}
	return conn
}

// tuneTCP applies KeepAlive, SendBuffer and ReceiveBuffer to conn, or to
// the TCP conn under a *tls.Conn; other conns have no such settings.
func (s *Socket) tuneTCP(conn net.Conn) {
	t := s.tuning
	if t == nil || (t.keepAlive == nil && t.sendBuf == 0 && t.recvBuf == 0) {
		return
	}
	tcp, ok := beneathTLS(conn).(*net.TCPConn)
	if !ok {
		return
	}
	if t.keepAlive != nil {
		tcp.SetKeepAliveConfig(*t.keepAlive)
	}
	if t.sendBuf > 0 {
		tcp.SetWriteBuffer(t.sendBuf)
	}
	if t.recvBuf > 0 {
		tcp.SetReadBuffer(t.recvBuf)
	}
}
