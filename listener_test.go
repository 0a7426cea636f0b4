package asynctcp_test

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log"
	mrand "math/rand"
	"net"
	"net/http"
	"net/http/httptrace"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/asynctcp/asynctcp"
)

// lsQueue is how many connections NewListener holds for Accept (its doc).
const lsQueue = 64

// lsListen starts a listener on a free loopback port of l.
func lsListen(t *testing.T, l *asynctcp.Loop, opts ...asynctcp.Option) net.Listener {
	t.Helper()
	ln, err := l.NewListener("127.0.0.1", 0, opts...)
	if err != nil {
		t.Fatalf("NewListener: %v", err)
	}
	t.Cleanup(func() { ln.Close() })
	return ln
}

type lsAccepted struct {
	conn net.Conn
	err  error
}

// lsGoAccept calls Accept in a goroutine and delivers what it returns.
func lsGoAccept(ln net.Listener) <-chan lsAccepted {
	ch := make(chan lsAccepted, 1)
	go func() {
		c, err := ln.Accept()
		ch <- lsAccepted{c, err}
	}()
	return ch
}

// lsAccept accepts one connection, failing the test after waitTimeout (the
// cleanup's Close ends the Accept then).
func lsAccept(t *testing.T, ln net.Listener) *asynctcp.Stream {
	t.Helper()
	a := waitFor(t, lsGoAccept(ln), "Accept")
	if a.err != nil {
		t.Fatalf("Accept: %v", a.err)
	}
	st, ok := a.conn.(*asynctcp.Stream)
	if !ok {
		t.Fatalf("Accept returned a %T, want *asynctcp.Stream", a.conn)
	}
	st.SetDeadline(time.Now().Add(waitTimeout))
	return st
}

// lsDial connects to ln with a deadline on the conn.
func lsDial(t *testing.T, ln net.Listener) *net.TCPConn {
	t.Helper()
	c := dialRaw(t, portOf(t, ln.Addr()))
	c.SetDeadline(time.Now().Add(waitTimeout))
	return c
}

// lsWantClosed checks that err is what net's listeners return once
// closed: a *net.OpError wrapping net.ErrClosed.
func lsWantClosed(t *testing.T, err error, op string, ln net.Listener) {
	t.Helper()
	if !errors.Is(err, net.ErrClosed) {
		t.Fatalf("%s returned %v, want an error wrapping net.ErrClosed", op, err)
	}
	var oe *net.OpError
	if !errors.As(err, &oe) {
		t.Fatalf("%s returned a %T, want a *net.OpError", op, err)
	}
	if oe.Op != strings.ToLower(op) || oe.Addr.String() != ln.Addr().String() {
		t.Errorf("%s returned OpError{Op: %q, Addr: %v}, want Op %q, Addr %v", op, oe.Op, oe.Addr, strings.ToLower(op), ln.Addr())
	}
}

// lsPeerGone reads c until the listener's side is closed: EOF, or a reset.
func lsPeerGone(t *testing.T, c net.Conn, what string) {
	t.Helper()
	buf := make([]byte, 512)
	for {
		_, err := c.Read(buf)
		if err == nil {
			continue
		}
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			t.Fatalf("%s: still open after %v", what, waitTimeout)
		}
		return // io.EOF, or a reset of a conn closed with unread input
	}
}

// lsStaysOpen fails the test if st's socket closes within d.
func lsStaysOpen(t *testing.T, st *asynctcp.Stream, d time.Duration, what string) {
	t.Helper()
	for end := time.Now().Add(d); time.Now().Before(end); time.Sleep(time.Millisecond) {
		if st.Socket().Closed() {
			t.Fatalf("%s closed by itself", what)
		}
	}
}

// lsSite is a net/http server serving through a listener of its own loop,
// and a client with a transport of its own.
type lsSite struct {
	loop   *asynctcp.Loop
	ln     net.Listener
	srv    *http.Server
	served chan error
	url    string
	tr     *http.Transport
	client *http.Client
	conns  atomic.Int32 // connections the server saw open (StateNew)
	kinds  sync.Map     // the net.Conn types Serve got from Accept
}

// lsServeHTTP runs h with net/http's Server.Serve over NewListener.
func lsServeHTTP(t *testing.T, h http.Handler) *lsSite {
	t.Helper()
	site := &lsSite{loop: newTestLoop(t), served: make(chan error, 1)}
	site.ln = lsListen(t, site.loop)
	site.srv = &http.Server{
		Handler:           h,
		ReadHeaderTimeout: waitTimeout,
		ErrorLog:          log.New(io.Discard, "", 0),
		ConnState: func(_ net.Conn, s http.ConnState) {
			if s == http.StateNew {
				site.conns.Add(1)
			}
		},
		ConnContext: func(ctx context.Context, c net.Conn) context.Context {
			site.kinds.Store(fmt.Sprintf("%T", c), true)
			return ctx
		},
	}
	go func() { site.served <- site.srv.Serve(site.ln) }()
	site.url = "http://" + site.ln.Addr().String()
	site.tr = &http.Transport{MaxIdleConnsPerHost: 32}
	site.client = &http.Client{Transport: site.tr, Timeout: waitTimeout}
	t.Cleanup(func() {
		if t.Failed() {
			site.srv.Close()
			site.tr.CloseIdleConnections()
		}
	})
	return site
}

// shutdown shuts the server down and checks that everything ended:
// Shutdown returns nil, Serve returns http.ErrServerClosed, the loop
// empties, and Serve only ever got *asynctcp.Stream conns.
func (site *lsSite) shutdown(t *testing.T) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
	defer cancel()
	if err := site.srv.Shutdown(ctx); err != nil {
		t.Fatalf("Server.Shutdown: %v", err)
	}
	if err := waitFor(t, site.served, "Server.Serve to return"); !errors.Is(err, http.ErrServerClosed) {
		t.Errorf("Server.Serve returned %v, want http.ErrServerClosed", err)
	}
	site.tr.CloseIdleConnections()
	if err := waitLoopEmpty(t, site.loop, waitTimeout); err != nil {
		t.Errorf("Loop.Wait: %v", err)
	}
	site.kinds.Range(func(k, _ any) bool {
		if k != "*asynctcp.Stream" {
			t.Errorf("Serve got a %v from Accept, want *asynctcp.Stream", k)
		}
		return true
	})
}

// get fetches path and returns the body, failing the test on an error or
// a status other than 200.
func (site *lsSite) get(t *testing.T, ctx context.Context, path string) string {
	t.Helper()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, site.url+path, nil)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := site.client.Do(req)
	if err != nil {
		t.Fatalf("GET %s: %v", path, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("GET %s: status %d, body %q, %v", path, resp.StatusCode, body, err)
	}
	return string(body)
}

func lsHello(w http.ResponseWriter, r *http.Request) {
	fmt.Fprintf(w, "hello %s", r.URL.Query().Get("n"))
}

func TestListenerServesConcurrentHTTPRequests(t *testing.T) {
	site := lsServeHTTP(t, http.HandlerFunc(lsHello))
	const workers, each = 20, 10
	var wg sync.WaitGroup
	var reused atomic.Int32
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < each; i++ {
				n := fmt.Sprint(w*each + i)
				ctx := httptrace.WithClientTrace(context.Background(), &httptrace.ClientTrace{
					GotConn: func(info httptrace.GotConnInfo) {
						if info.Reused {
							reused.Add(1)
						}
					},
				})
				req, _ := http.NewRequestWithContext(ctx, http.MethodGet, site.url+"/?n="+n, nil)
				resp, err := site.client.Do(req)
				if err != nil {
					t.Errorf("request %s: %v", n, err)
					return
				}
				body, err := io.ReadAll(resp.Body)
				resp.Body.Close()
				if err != nil || string(body) != "hello "+n {
					t.Errorf("request %s: body %q, %v; want %q", n, body, err, "hello "+n)
					return
				}
			}
		}()
	}
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	waitFor(t, done, fmt.Sprintf("%d requests over %d goroutines", workers*each, workers))
	if t.Failed() {
		return
	}
	if reused.Load() == 0 {
		t.Errorf("none of %d requests reused a connection", workers*each)
	}
	t.Logf("%d requests over %d connections (%d reused)", workers*each, site.conns.Load(), reused.Load())
	site.shutdown(t)
}

func TestListenerEchoesA3MiBPostByteExact(t *testing.T) {
	site := lsServeHTTP(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		// HTTP/1 handlers read the body before they answer.
		body, err := io.ReadAll(r.Body)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		w.Header().Set("Content-Type", "application/octet-stream")
		w.Write(body)
	}))
	payload := make([]byte, 3<<20)
	mrand.New(mrand.NewSource(1)).Read(payload)
	resp, err := site.client.Post(site.url+"/echo", "application/octet-stream", bytes.NewReader(payload))
	if err != nil {
		t.Fatalf("POST: %v", err)
	}
	got, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("POST: status %d, read %d bytes, %v", resp.StatusCode, len(got), err)
	}
	if !bytes.Equal(got, payload) {
		t.Fatalf("echo of %d bytes came back as %d bytes that differ", len(payload), len(got))
	}
	site.shutdown(t)
}

func TestListenerKeepsHTTPConnectionsAlive(t *testing.T) {
	site := lsServeHTTP(t, http.HandlerFunc(lsHello))
	const requests = 10
	for i := 0; i < requests; i++ {
		var info httptrace.GotConnInfo
		ctx := httptrace.WithClientTrace(context.Background(), &httptrace.ClientTrace{
			GotConn: func(i httptrace.GotConnInfo) { info = i },
		})
		n := fmt.Sprint(i)
		if body := site.get(t, ctx, "/?n="+n); body != "hello "+n {
			t.Fatalf("request %d: body %q", i, body)
		}
		if i > 0 && !info.Reused {
			t.Errorf("request %d did not reuse the connection", i)
		}
	}
	if n := site.conns.Load(); n != 1 {
		t.Errorf("the server saw %d connections for %d sequential requests, want 1", n, requests)
	}
	site.shutdown(t)
}

func TestListenerHTTPShutdownWaitsForActiveRequests(t *testing.T) {
	entered, release := make(chan struct{}), make(chan struct{})
	site := lsServeHTTP(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		close(entered)
		<-release
		io.WriteString(w, "finished")
	}))
	got := make(chan string, 1)
	go func() {
		resp, err := site.client.Get(site.url + "/slow")
		if err != nil {
			got <- err.Error()
			return
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		got <- string(b)
	}()
	waitFor(t, entered, "the handler to start")

	ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
	defer cancel()
	shut := make(chan error, 1)
	go func() { shut <- site.srv.Shutdown(ctx) }()
	// The listener closes at once, while the request still runs: Serve
	// returns, and so does any Accept.
	if err := waitFor(t, site.served, "Serve to return"); !errors.Is(err, http.ErrServerClosed) {
		t.Errorf("Serve returned %v, want http.ErrServerClosed", err)
	}
	_, err := site.ln.Accept()
	lsWantClosed(t, err, "Accept", site.ln)
	select {
	case err := <-shut:
		t.Fatalf("Shutdown returned %v while a request was running", err)
	default:
	}
	close(release)
	if body := waitFor(t, got, "the response"); body != "finished" {
		t.Errorf("response %q, want %q", body, "finished")
	}
	if err := waitFor(t, shut, "Shutdown to return"); err != nil {
		t.Fatalf("Shutdown: %v", err)
	}
	site.tr.CloseIdleConnections()
	waitLoopEmpty(t, site.loop, waitTimeout)
}

func TestListenerAcceptAfterCloseReturnsErrClosed(t *testing.T) {
	l := newTestLoop(t)
	ln := lsListen(t, l)
	if err := ln.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	c, err := ln.Accept()
	if c != nil {
		t.Errorf("Accept after Close returned a conn %v", c)
	}
	lsWantClosed(t, err, "Accept", ln)
	waitLoopEmpty(t, l, waitTimeout)
}

func TestListenerCloseEndsPendingAccept(t *testing.T) {
	l := newTestLoop(t)
	ln := lsListen(t, l)
	pending := lsGoAccept(ln)
	if err := ln.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	a := waitFor(t, pending, "the pending Accept to return after Close")
	lsWantClosed(t, a.err, "Accept", ln)
	waitLoopEmpty(t, l, waitTimeout)
}

func TestListenerCloseTwiceReturnsErrClosed(t *testing.T) {
	l := newTestLoop(t)
	ln := lsListen(t, l)
	if err := ln.Close(); err != nil {
		t.Fatalf("first Close: %v", err)
	}
	lsWantClosed(t, ln.Close(), "Close", ln)
	_, err := ln.Accept()
	lsWantClosed(t, err, "Accept", ln)
	waitLoopEmpty(t, l, waitTimeout)
}

func TestListenerAddrIsTheBoundAddress(t *testing.T) {
	l := newTestLoop(t)
	ln := lsListen(t, l)
	addr, ok := ln.Addr().(*net.TCPAddr)
	if !ok || !addr.IP.Equal(net.IPv4(127, 0, 0, 1)) || addr.Port == 0 {
		t.Fatalf("Addr() = %#v, want 127.0.0.1 with the port picked", ln.Addr())
	}
	c := lsDial(t, ln)
	st := lsAccept(t, ln)
	if st.LocalAddr().String() != addr.String() || st.RemoteAddr().String() != c.LocalAddr().String() {
		t.Errorf("accepted stream %v <- %v, want %v <- %v", st.LocalAddr(), st.RemoteAddr(), addr, c.LocalAddr())
	}
	st.Close()
	ln.Close()
	if ln.Addr().String() != addr.String() {
		t.Errorf("Addr() after Close = %v, want %v", ln.Addr(), addr)
	}
	waitLoopEmpty(t, l, waitTimeout)
}

// TestListenerStreamIsAConn exchanges bytes both ways over an accepted
// stream, with the peer's half-close: the stream reads io.EOF and can
// still answer, as a net.Conn does.
func TestListenerStreamIsAConn(t *testing.T) {
	l := newTestLoop(t)
	ln := lsListen(t, l)
	c := lsDial(t, ln)
	st := lsAccept(t, ln)
	if _, err := c.Write([]byte("request")); err != nil {
		t.Fatal(err)
	}
	if err := c.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	req, err := io.ReadAll(st)
	if err != nil || string(req) != "request" {
		t.Fatalf("server read %q, %v; want %q then EOF", req, err, "request")
	}
	// The socket outlives the peer's EOF until the application closes it.
	lsStaysOpen(t, st, 100*time.Millisecond, "a socket after its peer's EOF")
	if _, err := st.Write([]byte("reply after your EOF")); err != nil {
		t.Fatalf("Write after the peer's EOF: %v", err)
	}
	if err := st.Close(); err != nil {
		t.Fatalf("Stream.Close: %v", err)
	}
	reply, err := io.ReadAll(c)
	if err != nil || string(reply) != "reply after your EOF" {
		t.Fatalf("client read %q, %v", reply, err)
	}
	ln.Close()
	waitLoopEmpty(t, l, waitTimeout)
}

func TestListenerCloseClosesStreamsNotYetAccepted(t *testing.T) {
	l := newTestLoop(t)
	up := make(chan *asynctcp.Socket, 8)
	ln := lsListen(t, l, asynctcp.OnConnect(func(s *asynctcp.Socket) { up <- s }))
	const n = 5
	clients := make([]*net.TCPConn, n)
	for i := range clients {
		clients[i] = lsDial(t, ln)
		if _, err := clients[i].Write([]byte("unread")); err != nil {
			t.Fatal(err)
		}
	}
	for i := 0; i < n; i++ {
		waitFor(t, up, "the server to accept every client")
	}
	if err := ln.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	for i, c := range clients {
		lsPeerGone(t, c, fmt.Sprintf("client %d, never taken by Accept", i))
	}
	waitLoopEmpty(t, l, waitTimeout)
}

func TestListenerCloseLeavesAcceptedStreamsOpen(t *testing.T) {
	l := newTestLoop(t)
	ln := lsListen(t, l)
	c := lsDial(t, ln)
	st := lsAccept(t, ln)
	if err := ln.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if _, err := c.Write([]byte("ping")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 4)
	if _, err := io.ReadFull(st, buf); err != nil || string(buf) != "ping" {
		t.Fatalf("stream read %q, %v after the listener closed", buf, err)
	}
	if _, err := st.Write([]byte("pong")); err != nil {
		t.Fatalf("stream write after the listener closed: %v", err)
	}
	if _, err := io.ReadFull(c, buf); err != nil || string(buf) != "pong" {
		t.Fatalf("client read %q, %v", buf, err)
	}
	st.Close()
	waitLoopEmpty(t, l, waitTimeout)
}

// TestListenerQueueFullHoldsBackAndLosesNothing dials more clients than
// the queue holds while nobody calls Accept: the listener stops at the
// bound (the rest wait in the kernel's backlog), and Accept then returns
// every client, each once.
func TestListenerQueueFullHoldsBackAndLosesNothing(t *testing.T) {
	l := newTestLoop(t)
	var up atomic.Int32
	queued := make(chan struct{})
	ln := lsListen(t, l, asynctcp.OnConnect(func(*asynctcp.Socket) {
		if up.Add(1) == lsQueue {
			close(queued)
		}
	}))
	const n = lsQueue + 16
	clients := make([]*net.TCPConn, n)
	for i := range clients {
		clients[i] = lsDial(t, ln)
		if err := binary.Write(clients[i], binary.BigEndian, uint32(i)); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, queued, fmt.Sprintf("%d connections to wait for Accept", lsQueue))
	if st := l.Stats(); st.Incoming != lsQueue {
		t.Errorf("with the queue full and no Accept, the loop holds %d sockets, want %d", st.Incoming, lsQueue)
	}

	seen := make(map[uint32]bool)
	for i := 0; i < n; i++ {
		st := lsAccept(t, ln)
		var id uint32
		if err := binary.Read(st, binary.BigEndian, &id); err != nil {
			t.Fatalf("accepted stream %d: %v", i, err)
		}
		if id >= n || seen[id] {
			t.Fatalf("accepted stream %d says it is client %d (seen before: %v)", i, id, seen[id])
		}
		seen[id] = true
		st.Write([]byte{byte(id)})
		st.Close()
	}
	for i, c := range clients {
		b := make([]byte, 1)
		if _, err := io.ReadFull(c, b); err != nil || b[0] != byte(i) {
			t.Errorf("client %d read %v, %v", i, b, err)
		}
	}
	if got := up.Load(); got != n {
		t.Errorf("OnConnect ran %d times, want %d", got, n)
	}
	ln.Close()
	waitLoopEmpty(t, l, waitTimeout)
}

func TestListenerOnConnectRunsBeforeAccept(t *testing.T) {
	l := newTestLoop(t)
	ln := lsListen(t, l, asynctcp.OnConnect(func(s *asynctcp.Socket) {
		s.SetData("greeted")
		s.WriteData([]byte("welcome"))
	}))
	c := lsDial(t, ln)
	st := lsAccept(t, ln)
	if d := st.Socket().Data(); d != "greeted" {
		t.Errorf("accepted socket's Data() = %v, want what OnConnect set", d)
	}
	buf := make([]byte, len("welcome"))
	if _, err := io.ReadFull(c, buf); err != nil || string(buf) != "welcome" {
		t.Errorf("client read %q, %v", buf, err)
	}
	st.Close()
	ln.Close()
	waitLoopEmpty(t, l, waitTimeout)
}

// TestListenerOnConnectCloseSkipsAccept: a socket that OnConnect closes is
// not handed to Accept, and frees its place in the queue.
func TestListenerOnConnectCloseSkipsAccept(t *testing.T) {
	l := newTestLoop(t)
	var refused atomic.Int32
	ln := lsListen(t, l, asynctcp.OnConnect(func(s *asynctcp.Socket) {
		if refused.Add(1) <= lsQueue+1 {
			s.Close()
		}
	}))
	for i := 0; i <= lsQueue; i++ {
		lsPeerGone(t, lsDial(t, ln), fmt.Sprintf("client %d, closed by OnConnect", i))
	}
	c := lsDial(t, ln)
	st := lsAccept(t, ln)
	if st.RemoteAddr().String() != c.LocalAddr().String() {
		t.Errorf("Accept returned the stream of %v, want the one client OnConnect kept, %v", st.RemoteAddr(), c.LocalAddr())
	}
	st.Close()
	ln.Close()
	waitLoopEmpty(t, l, waitTimeout)
}

// TestListenerStreamReportsItsTimeout: events of an accepted socket come
// back from the stream's Read, as a net.Conn's errors do.
func TestListenerStreamReportsItsTimeout(t *testing.T) {
	l := newTestLoop(t)
	ln := lsListen(t, l, asynctcp.ReadTimeout(50*time.Millisecond))
	c := lsDial(t, ln)
	st := lsAccept(t, ln)
	_, err := st.Read(make([]byte, 8))
	if !errors.Is(err, asynctcp.ErrTCPTimeout) {
		t.Fatalf("Read of a silent peer returned %v, want an ErrTCPTimeout event", err)
	}
	lsPeerGone(t, c, "client of the timed-out socket")
	if err := st.Close(); err != nil {
		t.Errorf("Stream.Close after the socket timed out: %v, want nil as net.Conn gives", err)
	}
	ln.Close()
	waitLoopEmpty(t, l, waitTimeout)
}

func TestListenerLoopExitClosesIt(t *testing.T) {
	l := newTestLoop(t)
	ln := lsListen(t, l)
	pending := lsGoAccept(ln)
	stop := errors.New("stop")
	l.Exit(stop)
	lsWantClosed(t, waitFor(t, pending, "Accept to return after Loop.Exit").err, "Accept", ln)
	if err := waitLoopEmpty(t, l, waitTimeout); err != stop {
		t.Errorf("Loop.Wait = %v, want the value given to Exit", err)
	}
	if err := ln.Close(); err != nil {
		t.Errorf("the first Close after Loop.Exit returned %v, want nil", err)
	}
}

func TestListenerTLSHandshakesBeforeAccept(t *testing.T) {
	l := newTestLoop(t)
	server, client := tlsConfigs(t)
	ln := lsListen(t, l, asynctcp.TLS(server))
	d := &net.Dialer{Timeout: waitTimeout}
	tc, err := tls.DialWithDialer(d, "tcp", ln.Addr().String(), client)
	if err != nil {
		t.Fatalf("TLS dial: %v", err)
	}
	defer tc.Close()
	tc.SetDeadline(time.Now().Add(waitTimeout))
	st := lsAccept(t, ln)
	if _, ok := st.Socket().Conn().(*tls.Conn); !ok {
		t.Errorf("the accepted socket's Conn() is a %T, want *tls.Conn", st.Socket().Conn())
	}
	if _, err := tc.Write([]byte("secret")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 6)
	if _, err := io.ReadFull(st, buf); err != nil || string(buf) != "secret" {
		t.Fatalf("stream read %q, %v; want the decrypted bytes", buf, err)
	}
	st.Close()
	ln.Close()
	waitLoopEmpty(t, l, waitTimeout)
}

// TestListenerFailedHandshakesFreeTheirPlaces: more failed TLS handshakes
// than the queue holds go to the loop's EventHandler, and the listener
// still accepts after them.
func TestListenerFailedHandshakesFreeTheirPlaces(t *testing.T) {
	l := newTestLoop(t)
	failures := make(chan error, 2*lsQueue)
	l.EventHandler = func(ev error) { failures <- ev }
	server, client := tlsConfigs(t)
	ln := lsListen(t, l, asynctcp.TLS(server))
	const n = lsQueue + 8
	for i := 0; i < n; i++ {
		c := lsDial(t, ln)
		c.Write([]byte("GET / HTTP/1.0\r\n\r\n")) // not a TLS client
	}
	for i := 0; i < n; i++ {
		ev := waitFor(t, failures, fmt.Sprintf("handshake failure %d of %d", i+1, n))
		if !errors.Is(ev, asynctcp.ErrTCPError) {
			t.Errorf("handshake failure: %v, want an ErrTCPError event", ev)
		}
	}
	tc, err := tls.DialWithDialer(&net.Dialer{Timeout: waitTimeout}, "tcp", ln.Addr().String(), client)
	if err != nil {
		t.Fatalf("TLS dial after the failures: %v", err)
	}
	defer tc.Close()
	lsAccept(t, ln).Close()
	ln.Close()
	waitLoopEmpty(t, l, waitTimeout)
}

// TestListenerCloseAbortsHandshakingConnections: a client that never
// finishes its TLS handshake is closed by Close.
func TestListenerCloseAbortsHandshakingConnections(t *testing.T) {
	l := newTestLoop(t)
	server, _ := tlsConfigs(t)
	ln := lsListen(t, l, asynctcp.TLS(server))
	c := lsDial(t, ln) // sends nothing
	eventually(t, "the server to accept the silent client", func() bool { return l.Stats().Incoming == 1 })
	if err := ln.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	lsPeerGone(t, c, "a client in its handshake")
	waitLoopEmpty(t, l, waitTimeout)
}

func TestNewListenerRejectsOptionsThatDoNotApply(t *testing.T) {
	l := newTestLoop(t)
	for _, tc := range []struct {
		opt  asynctcp.Option
		want string
	}{
		{asynctcp.Data([]byte("x")), "Data"},
		{asynctcp.Dialer(&net.Dialer{}), "Dialer"},
		{asynctcp.OnRead(nil), "OnRead"},
		{asynctcp.OnEvent(nil), "OnEvent"},
		{asynctcp.ReuseReadBuffer(), "ReuseReadBuffer"},
		{asynctcp.NotifyTimeouts(), "NotifyTimeouts"},
		{asynctcp.InputLimit(0), "InputLimit"},
		{asynctcp.ReadTimeout(-time.Second), "ReadTimeout"},
		{asynctcp.TLS(nil), "TLS"},
		{asynctcp.Option{}, "zero Option"},
	} {
		ln, err := l.NewListener("127.0.0.1", 0, tc.opt)
		if err == nil {
			ln.Close()
			t.Errorf("NewListener with %s returned no error", tc.want)
			continue
		}
		if !strings.Contains(err.Error(), tc.want) {
			t.Errorf("NewListener with %s: error %q does not name it", tc.want, err)
		}
	}
	if _, err := l.NewListener("127.0.0.1", 65536); err == nil || !strings.Contains(err.Error(), "65536") {
		t.Errorf("NewListener on port 65536: %v, want an error naming the port", err)
	}
	waitLoopEmpty(t, l, waitTimeout)
}

func TestNewListenerTakesListenStreamOptions(t *testing.T) {
	l := newTestLoop(t)
	server, _ := tlsConfigs(t)
	ln, err := l.NewListener("127.0.0.1", 0,
		asynctcp.Backlog(16), asynctcp.TLS(server), asynctcp.ReadTimeout(time.Minute),
		asynctcp.WriteTimeout(time.Minute), asynctcp.InputLimit(4096),
		asynctcp.OnConnect(nil), asynctcp.OnWrite(nil), asynctcp.AllowHalfOpen(),
		asynctcp.MaxBuffered(1<<20), asynctcp.WriteWatermarks(0, 1<<16),
		asynctcp.DontDrainReadBuffer(), asynctcp.ReadRate(0, 0), asynctcp.WriteRate(0, 0))
	if err != nil {
		t.Fatalf("NewListener with ListenStream's options: %v", err)
	}
	if st := l.Stats(); st.Servers != 1 {
		t.Errorf("Stats() = %+v, want the listener counted as a server", st)
	}
	ln.Close()
	waitLoopEmpty(t, l, waitTimeout)
}

func TestNewListenerBindFailureIsAddressInUse(t *testing.T) {
	l := newTestLoop(t)
	taken := lsListen(t, l)
	port := taken.Addr().(*net.TCPAddr).Port
	ln, err := l.NewListener("127.0.0.1", port)
	if err == nil {
		ln.Close()
		t.Fatalf("NewListener on the taken port %d returned no error", port)
	}
	if !errors.Is(err, asynctcp.ErrAddressInUse) {
		t.Errorf("NewListener on a taken port: %v, want ErrAddressInUse", err)
	}
	taken.Close()
	waitLoopEmpty(t, l, waitTimeout)
}
