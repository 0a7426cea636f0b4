package asynctcp_test

import (
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/asynctcp/asynctcp"
)

// keepAliveOf reads SO_KEEPALIVE, TCP_KEEPIDLE, TCP_KEEPINTVL and
// TCP_KEEPCNT back from conn's socket.
func keepAliveOf(t *testing.T, conn net.Conn) (on, idle, intvl, cnt int) {
	t.Helper()
	tcp, ok := conn.(*net.TCPConn)
	if !ok {
		t.Fatalf("conn is %T, want *net.TCPConn", conn)
	}
	rc, err := tcp.SyscallConn()
	if err != nil {
		t.Fatalf("SyscallConn: %v", err)
	}
	var gerr error
	get := func(fd uintptr, level, opt int) int {
		v, err := syscall.GetsockoptInt(int(fd), level, opt)
		if err != nil && gerr == nil {
			gerr = err
		}
		return v
	}
	rc.Control(func(fd uintptr) {
		on = get(fd, syscall.SOL_SOCKET, syscall.SO_KEEPALIVE)
		idle = get(fd, syscall.IPPROTO_TCP, syscall.TCP_KEEPIDLE)
		intvl = get(fd, syscall.IPPROTO_TCP, syscall.TCP_KEEPINTVL)
		cnt = get(fd, syscall.IPPROTO_TCP, syscall.TCP_KEEPCNT)
	})
	if gerr != nil {
		t.Fatalf("getsockopt: %v", gerr)
	}
	return on, idle, intvl, cnt
}

// KeepAlive reaches the socket: read back with getsockopt on a dialed
// connection, on an accepted one, and on a wrapped one. (That a dead peer
// is then found end to end is TestKeepAliveDetectsADeadPeer.)
func TestKeepAliveReachesTheSocket(t *testing.T) {
	l := newTestLoop(t)
	accepted := make(chan *asynctcp.Socket, 1)
	srvCfg := net.KeepAliveConfig{Enable: true, Idle: 11 * time.Second, Interval: 5 * time.Second, Count: 6}
	cliCfg := net.KeepAliveConfig{Enable: true, Idle: 7 * time.Second, Interval: 3 * time.Second, Count: 4}
	srv, port := listenLocal(t, l, nil, func(error) {}, asynctcp.KeepAlive(srvCfg),
		asynctcp.OnConnect(func(s *asynctcp.Socket) { accepted <- s }))
	c := connectLocal(t, l, port, nil, func(error) {}, asynctcp.KeepAlive(cliCfg))
	a := waitFor(t, accepted, "the accepted socket")
	eventually(t, "the client to connect", func() bool { return c.Conn() != nil })

	ln, rawPort := listenRaw(t)
	raw := dialRaw(t, rawPort)
	peer := acceptRaw(t, ln)
	defer peer.Close()
	wrCfg := net.KeepAliveConfig{Enable: true, Idle: 13 * time.Second, Interval: 2 * time.Second, Count: 3}
	w, err := l.Wrap(raw, nil, func(error) {}, asynctcp.KeepAlive(wrCfg))
	if err != nil {
		t.Fatalf("Wrap: %v", err)
	}
	for _, x := range []struct {
		name string
		s    *asynctcp.Socket
		cfg  net.KeepAliveConfig
	}{{"dialed", c, cliCfg}, {"accepted", a, srvCfg}, {"wrapped", w, wrCfg}} {
		on, idle, intvl, cnt := keepAliveOf(t, x.s.Conn())
		if on == 0 || idle != int(x.cfg.Idle/time.Second) || intvl != int(x.cfg.Interval/time.Second) || cnt != x.cfg.Count {
			t.Errorf("%s: SO_KEEPALIVE %d, TCP_KEEPIDLE %d, TCP_KEEPINTVL %d, TCP_KEEPCNT %d; want on, %v, %v, %d",
				x.name, on, idle, intvl, cnt, x.cfg.Idle, x.cfg.Interval, x.cfg.Count)
		}
	}
	// Not TCP: ignored.
	pa, pb := net.Pipe()
	defer pb.Close()
	p, err := l.Wrap(pa, nil, func(error) {}, asynctcp.KeepAlive(wrCfg))
	if err != nil {
		t.Fatalf("Wrap(net.Pipe) with KeepAlive: %v", err)
	}
	for _, s := range []*asynctcp.Socket{c, a, w, p} {
		s.Close()
	}
	srv.Close()
	waitLoopClean(t, l, waitTimeout)
}

// With ReusePort two servers listen on one port and both receive
// connections; without it the second bind fails with address-in-use.
func TestReusePortSharesAPort(t *testing.T) {
	l := newTestLoop(t)
	var got [2]chan struct{}
	var srvs [2]*asynctcp.Server
	port := 0
	for i := range srvs {
		got[i] = make(chan struct{}, 256)
		ch := got[i]
		srv, err := l.Listen("127.0.0.1", port, nil, func(error) {}, asynctcp.ReusePort(),
			asynctcp.OnConnect(func(s *asynctcp.Socket) { ch <- struct{}{}; s.Close() }))
		if err != nil {
			t.Fatalf("Listen %d with ReusePort: %v", i, err)
		}
		srvs[i] = srv
		port = portOf(t, srv.Addr())
	}
	if _, err := l.Listen("127.0.0.1", port, nil, nil); err == nil {
		t.Errorf("a third Listen on the port without ReusePort succeeded")
	} else {
		wantClass(t, err, asynctcp.ErrAddressInUse, "Listen without ReusePort")
	}
	for range 128 {
		c := dialRaw(t, port)
		c.Close()
	}
	eventually(t, "128 connections accepted", func() bool { return len(got[0])+len(got[1]) == 128 })
	if len(got[0]) == 0 || len(got[1]) == 0 {
		t.Errorf("the kernel gave %d and %d connections to the two servers, want some to each", len(got[0]), len(got[1]))
	}
	srvs[0].Close()
	srvs[1].Close()
	waitLoopClean(t, l, waitTimeout)
}

// ktNetns makes a network namespace joined to this one by a veth pair:
// this side is 10.199.0.1, the namespace's side 10.199.0.2. It returns the
// namespace's name and a function that cuts the link (its side goes down,
// so that nothing this side sends is answered). The test is skipped where
// namespaces cannot be made (it needs root and the ip tool).
func ktNetns(t *testing.T) (ns string, cut func()) {
	t.Helper()
	if _, err := exec.LookPath("ip"); err != nil {
		t.Skip("no ip tool (iproute2): cannot make a network namespace to freeze a peer in")
	}
	ns = fmt.Sprintf("asynctcp-ka-%d", os.Getpid())
	host, peer := fmt.Sprintf("akh%d", os.Getpid()%100000), fmt.Sprintf("akp%d", os.Getpid()%100000)
	run := func(args ...string) error {
		out, err := exec.Command("ip", args...).CombinedOutput()
		if err != nil {
			return fmt.Errorf("ip %s: %v: %s", strings.Join(args, " "), err, out)
		}
		return nil
	}
	if err := run("netns", "add", ns); err != nil {
		t.Skipf("cannot make a network namespace (%v): a dead peer cannot be shown here", err)
	}
	t.Cleanup(func() {
		run("link", "del", host)
		run("netns", "del", ns)
	})
	for _, args := range [][]string{
		{"link", "add", host, "type", "veth", "peer", "name", peer},
		{"link", "set", peer, "netns", ns},
		{"addr", "add", "10.199.0.1/30", "dev", host},
		{"link", "set", host, "up"},
		{"netns", "exec", ns, "ip", "addr", "add", "10.199.0.2/30", "dev", peer},
		{"netns", "exec", ns, "ip", "link", "set", peer, "up"},
	} {
		if err := run(args...); err != nil {
			t.Skipf("cannot set up the namespace's link (%v): a dead peer cannot be shown here", err)
		}
	}
	return ns, func() {
		if err := run("netns", "exec", ns, "ip", "link", "set", peer, "down"); err != nil {
			t.Errorf("cutting the link: %v", err)
		}
	}
}

// A peer that stops answering (its link cut, inside a network namespace)
// is found by the keep-alive probes: the socket ends with an ErrTCPError
// (ETIMEDOUT) or ErrTCPTimeout event, in about Idle + Count*Interval.
func TestKeepAliveDetectsADeadPeer(t *testing.T) {
	ns, cut := ktNetns(t)
	l := newTestLoop(t)
	events := newEventRecorder()
	accepted := make(chan *asynctcp.Socket, 1)
	srv, err := l.Listen("10.199.0.1", 0, nil, events.cb,
		asynctcp.KeepAlive(net.KeepAliveConfig{Enable: true, Idle: time.Second, Interval: 500 * time.Millisecond, Count: 2}),
		asynctcp.OnConnect(func(s *asynctcp.Socket) { accepted <- s }))
	if err != nil {
		t.Fatalf("Listen on the veth address: %v", err)
	}
	port := portOf(t, srv.Addr())
	// The peer: a shell in the namespace holding a connection open.
	peer := exec.Command("ip", "netns", "exec", ns, "bash", "-c",
		fmt.Sprintf("exec 3<>/dev/tcp/10.199.0.1/%d; sleep 30", port))
	if err := peer.Start(); err != nil {
		t.Skipf("cannot start a peer in the namespace: %v", err)
	}
	t.Cleanup(func() {
		peer.Process.Kill()
		peer.Wait()
	})
	s := waitFor(t, accepted, "the peer's connection")
	cut()
	start := time.Now()
	ev := waitForWithin(t, events.ch, 20*time.Second, "the keep-alive to find the dead peer")
	if !errors.Is(ev, asynctcp.ErrTCPError) {
		t.Errorf("dead peer: event %v, want an ErrTCPError (or ErrTCPTimeout) event", ev)
	}
	if asynctcp.SocketOf(ev) != s {
		t.Errorf("the event is not the accepted socket's")
	}
	t.Logf("dead peer found after %v: %v", time.Since(start).Round(10*time.Millisecond), ev)
	srv.Close()
	waitLoopClean(t, l, waitTimeout)
}

// SendBuffer and ReceiveBuffer reach the socket: read back with
// getsockopt (Linux doubles what it is given) on dialed and accepted
// conns.
func TestSocketBuffersReachTheSocket(t *testing.T) {
	const snd, rcv = 48 << 10, 24 << 10
	l := newTestLoop(t)
	accepted := make(chan *asynctcp.Socket, 1)
	opts := []asynctcp.Option{asynctcp.SendBuffer(snd), asynctcp.ReceiveBuffer(rcv)}
	srv, port := listenLocal(t, l, nil, func(error) {}, append(opts, asynctcp.OnConnect(func(s *asynctcp.Socket) { accepted <- s }))...)
	c := connectLocal(t, l, port, nil, func(error) {}, opts...)
	a := waitFor(t, accepted, "the accepted socket")
	eventually(t, "the client to connect", func() bool { return c.Conn() != nil })
	for _, x := range []struct {
		name string
		s    *asynctcp.Socket
	}{{"dialed", c}, {"accepted", a}} {
		rc, err := x.s.Conn().(*net.TCPConn).SyscallConn()
		if err != nil {
			t.Fatalf("SyscallConn: %v", err)
		}
		var gotSnd, gotRcv int
		rc.Control(func(fd uintptr) {
			gotSnd, _ = syscall.GetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_SNDBUF)
			gotRcv, _ = syscall.GetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF)
		})
		if gotSnd != 2*snd || gotRcv != 2*rcv {
			t.Errorf("%s: SO_SNDBUF %d, SO_RCVBUF %d; want %d and %d (twice what was set)", x.name, gotSnd, gotRcv, 2*snd, 2*rcv)
		}
	}
	c.Close()
	a.Close()
	srv.Close()
	waitLoopClean(t, l, waitTimeout)
}
