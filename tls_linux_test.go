package asynctcp_test

import (
	"fmt"
	"net"
	"syscall"
	"testing"
	"time"

	"github.com/asynctcp/asynctcp"
)

// TestDialerKeepAlive: the Dialer's KeepAlive reaches the connection's
// socket: SO_KEEPALIVE on, with the keep-alive idle time in TCP_KEEPIDLE,
// and off where KeepAlive is negative.
func TestDialerKeepAlive(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name      string
		keepAlive time.Duration
		wantOn    int
		wantIdle  int // seconds; checked where keep-alives are on
	}{
		{"37s", 37 * time.Second, 1, 37},
		{"off", -1, 0, 0},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			l := newTestLoop(t)
			srv, err := l.Listen("127.0.0.1", 0, nil, nil)
			if err != nil {
				t.Fatalf("Listen: %v", err)
			}
			defer srv.Close()
			type opts struct {
				on, idle int
				err      error
			}
			got := make(chan opts, 1)
			_, err = l.Connect("127.0.0.1", portOf(t, srv.Addr()), nil, nil,
				asynctcp.Dialer(&net.Dialer{KeepAlive: tc.keepAlive}),
				asynctcp.OnConnect(func(s *asynctcp.Socket) {
					defer s.Close()
					var o opts
					tcp, ok := s.Conn().(*net.TCPConn)
					if !ok {
						o.err = fmt.Errorf("Conn() is %T, want *net.TCPConn", s.Conn())
						got <- o
						return
					}
					rc, err := tcp.SyscallConn()
					if err != nil {
						o.err = err
						got <- o
						return
					}
					cerr := rc.Control(func(fd uintptr) {
						o.on, o.err = syscall.GetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_KEEPALIVE)
						if o.err == nil {
							o.idle, o.err = syscall.GetsockoptInt(int(fd), syscall.IPPROTO_TCP, syscall.TCP_KEEPIDLE)
						}
					})
					if o.err == nil {
						o.err = cerr
					}
					got <- o
				}))
			if err != nil {
				t.Fatalf("Connect: %v", err)
			}
			o := waitFor(t, got, "the connect-cb")
			if o.err != nil {
				t.Fatalf("reading the socket options: %v", o.err)
			}
			if o.on != tc.wantOn {
				t.Errorf("SO_KEEPALIVE = %d, want %d", o.on, tc.wantOn)
			}
			if tc.wantOn == 1 && o.idle != tc.wantIdle {
				t.Errorf("TCP_KEEPIDLE = %d s, want %d s", o.idle, tc.wantIdle)
			}
			srv.Close()
			waitLoopNil(t, l, waitTimeout)
		})
	}
}
