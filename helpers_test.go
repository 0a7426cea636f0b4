package asynctcp_test

// The helpers shared by the test files of this package: one copy of each.
// A helper used by one file only lives next to its caller.

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"io"
	"math/big"
	mrand "math/rand"
	"net"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/asynctcp/asynctcp"
)

// TestMain fails the run if a goroutine outlives the tests.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// waitTimeout bounds every wait of the tests on a callback or a peer.
const waitTimeout = 10 * time.Second

// errTestFailed is the error with which a failed test's cleanup exits its loop.
var errTestFailed = errors.New("asynctcp_test: test failed")

// newTestLoop returns a fresh loop, which a cleanup exits should the test fail before waiting for it.
func newTestLoop(t *testing.T) *asynctcp.Loop {
	t.Helper()
	l := &asynctcp.Loop{}
	t.Cleanup(func() {
		if !t.Failed() {
			return
		}
		l.Exit(errTestFailed)
		select {
		case <-goWait(l):
		case <-time.After(waitTimeout):
			t.Errorf("cleanup: Loop.Wait did not return after Exit (stats %+v)", l.Stats())
		}
	})
	return l
}

// goWait runs l.Wait in a goroutine and delivers its result.
func goWait(l *asynctcp.Loop) <-chan error {
	done := make(chan error, 1)
	go func() { done <- l.Wait() }()
	return done
}

// waitLoop waits for l.Wait to return, failing the test after d.
func waitLoop(t *testing.T, l *asynctcp.Loop, d time.Duration) error {
	t.Helper()
	select {
	case err := <-goWait(l):
		return err
	case <-time.After(d):
		t.Fatalf("Loop.Wait did not return within %v (stats %+v)", d, l.Stats())
	}
	return nil
}

// waitLoopNil waits for l.Wait to return nil, failing the test after d.
func waitLoopNil(t *testing.T, l *asynctcp.Loop, d time.Duration) {
	t.Helper()
	if err := waitLoop(t, l, d); err != nil {
		t.Errorf("Loop.Wait = %v, want nil", err)
	}
}

// waitLoopEmpty is waitLoop that also fails the test unless every count of l.Stats is zero after Wait.
func waitLoopEmpty(t *testing.T, l *asynctcp.Loop, d time.Duration) error {
	t.Helper()
	err := waitLoop(t, l, d)
	if st := l.Stats(); st != (asynctcp.Stats{}) {
		t.Errorf("Stats after Loop.Wait = %+v, want all zero", st)
	}
	return err
}

// waitLoopClean waits for l.Wait, which must return nil within d and leave every count of l.Stats zero.
func waitLoopClean(t *testing.T, l *asynctcp.Loop, d time.Duration) {
	t.Helper()
	if err := waitLoopEmpty(t, l, d); err != nil {
		t.Errorf("Loop.Wait = %v, want nil", err)
	}
}

// waitFor receives from ch, failing the test after waitTimeout.
func waitFor[T any](t *testing.T, ch <-chan T, what string) T {
	t.Helper()
	return waitForWithin(t, ch, waitTimeout, what)
}

// waitForWithin receives from ch, failing the test after d.
func waitForWithin[T any](t *testing.T, ch <-chan T, d time.Duration, what string) T {
	t.Helper()
	select {
	case v := <-ch:
		return v
	case <-time.After(d):
		t.Fatalf("timed out after %v waiting for %s", d, what)
	}
	var zero T
	return zero
}

// expectNone fails the test if ch delivers anything within d (nothing may happen, a call must stay blocked).
func expectNone[T any](t *testing.T, ch <-chan T, d time.Duration, what string) {
	t.Helper()
	select {
	case v := <-ch:
		t.Fatalf("%s: got %v, want nothing within %v", what, v, d)
	case <-time.After(d):
	}
}

// waitGroup waits for wg, failing the test after waitTimeout.
func waitGroup(t *testing.T, wg *sync.WaitGroup, what string) {
	t.Helper()
	done := make(chan struct{})
	go func() {
		wg.Wait()
		close(done)
	}()
	waitFor(t, done, what)
}

// eventually polls cond until it holds, failing the test after waitTimeout.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	eventuallyWithin(t, waitTimeout, what, cond)
}

// eventuallyWithin polls cond until it holds, failing the test after d.
func eventuallyWithin(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", d, what)
		}
		time.Sleep(time.Millisecond)
	}
}

// goOwned runs f in a goroutine that the test's cleanup unblocks (closing closers) and waits for.
func goOwned(t *testing.T, what string, f func(), closers ...io.Closer) {
	t.Helper()
	done := make(chan struct{})
	go func() {
		defer close(done)
		f()
	}()
	t.Cleanup(func() {
		for _, c := range closers {
			c.Close()
		}
		select {
		case <-done:
		case <-time.After(waitTimeout):
			t.Errorf("cleanup: %s goroutine did not end", what)
		}
	})
}

// signal sends v on ch without blocking; ch is buffered by its maker.
func signal[T any](ch chan T, v T) {
	select {
	case ch <- v:
	default:
	}
}

// eventRecorder is an event-cb that counts and forwards its events.
type eventRecorder struct {
	n  atomic.Int32
	ch chan error
}

// newEventRecorder returns a recorder that holds up to 64 unread events; later ones are only counted.
func newEventRecorder() *eventRecorder {
	return &eventRecorder{ch: make(chan error, 64)}
}

// cb is the event-cb: it counts ev and forwards it.
func (r *eventRecorder) cb(ev error) {
	r.n.Add(1)
	signal(r.ch, ev)
}

// asEvent returns err as an *asynctcp.Event, failing the test otherwise.
func asEvent(t *testing.T, err error) *asynctcp.Event {
	t.Helper()
	var ev *asynctcp.Event
	if !errors.As(err, &ev) {
		t.Fatalf("got %T (%v), want an *asynctcp.Event", err, err)
	}
	return ev
}

// wantClass fails the test unless err is an *asynctcp.Event of class c.
func wantClass(t *testing.T, err error, c error, what string) *asynctcp.Event {
	t.Helper()
	ev := asEvent(t, err)
	if ev.Class != c {
		t.Errorf("%s: event class %v, want %v (event %v)", what, ev.Class, c, ev)
	}
	if !errors.Is(err, c) {
		t.Errorf("%s: errors.Is(%v, %v) = false", what, err, c)
	}
	return ev
}

// wantEventIs fails the test unless err is an *asynctcp.Event of class c or of a class below it.
func wantEventIs(t *testing.T, err error, c error, what string) *asynctcp.Event {
	t.Helper()
	var ev *asynctcp.Event
	if !errors.As(err, &ev) {
		t.Fatalf("%s: got %T (%v), want an *asynctcp.Event", what, err, err)
	}
	if !errors.Is(err, c) {
		t.Fatalf("%s: event %v has class %v, want %v", what, err, ev.Class, c)
	}
	return ev
}

// wantSocketClosed fails the test unless err is the ErrSocketClosed event of s.
func wantSocketClosed(t *testing.T, err error, s *asynctcp.Socket, what string) {
	t.Helper()
	ev := wantClass(t, err, asynctcp.ErrSocketClosed, what)
	if ev.Socket != s {
		t.Errorf("%s: event Socket %p, want %p", what, ev.Socket, s)
	}
}

// portOf returns the TCP port of a.
func portOf(t *testing.T, a net.Addr) int {
	t.Helper()
	tcp, ok := a.(*net.TCPAddr)
	if !ok || tcp.Port == 0 {
		t.Fatalf("address %v (%T) has no TCP port", a, a)
	}
	return tcp.Port
}

// listenLocal starts an asynctcp server of l on a free loopback port.
func listenLocal(t *testing.T, l *asynctcp.Loop, read asynctcp.ReadFunc, event asynctcp.EventFunc, opts ...asynctcp.Option) (*asynctcp.Server, int) {
	t.Helper()
	srv, err := l.Listen("127.0.0.1", 0, read, event, opts...)
	if err != nil {
		t.Fatalf("Listen on 127.0.0.1:0: %v", err)
	}
	t.Cleanup(func() { srv.Close() })
	return srv, portOf(t, srv.Addr())
}

// connectLocal connects a socket of l to the loopback port.
func connectLocal(t *testing.T, l *asynctcp.Loop, port int, read asynctcp.ReadFunc, event asynctcp.EventFunc, opts ...asynctcp.Option) *asynctcp.Socket {
	t.Helper()
	s, err := l.Connect("127.0.0.1", port, read, event, opts...)
	if err != nil {
		t.Fatalf("Connect to 127.0.0.1:%d: %v", port, err)
	}
	if s == nil {
		t.Fatal("Connect returned a nil socket and no error")
	}
	return s
}

// listenRaw starts a plain net.Listener peer on a free loopback port.
func listenRaw(t *testing.T) (net.Listener, int) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("net.Listen: %v", err)
	}
	t.Cleanup(func() { ln.Close() })
	return ln, portOf(t, ln.Addr())
}

// acceptRaw accepts one raw peer connection, with a deadline, and shrinks its receive buffer to 256 KiB.
func acceptRaw(t *testing.T, ln net.Listener) *net.TCPConn {
	t.Helper()
	tc := acceptRawKeepBuf(t, ln)
	tc.SetReadBuffer(256 << 10)
	return tc
}

// acceptRawKeepBuf is acceptRaw that keeps the receive buffer the listener gave the connection.
func acceptRawKeepBuf(t *testing.T, ln net.Listener) *net.TCPConn {
	t.Helper()
	ln.(*net.TCPListener).SetDeadline(time.Now().Add(waitTimeout))
	c, err := ln.Accept()
	if err != nil {
		t.Fatalf("raw peer accept: %v", err)
	}
	t.Cleanup(func() { c.Close() })
	return c.(*net.TCPConn)
}

// dialRaw connects a plain net.Conn peer to the loopback port.
func dialRaw(t *testing.T, port int) *net.TCPConn {
	t.Helper()
	c, err := net.DialTimeout("tcp", "127.0.0.1:"+strconv.Itoa(port), waitTimeout)
	if err != nil {
		t.Fatalf("raw peer dial: %v", err)
	}
	t.Cleanup(func() { c.Close() })
	return c.(*net.TCPConn)
}

// closedPort returns a loopback port that nothing listens on any more.
func closedPort(t *testing.T) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("net.Listen: %v", err)
	}
	port := portOf(t, ln.Addr())
	ln.Close()
	return port
}

// readResult is what readAllAsync read, and the error that ended it (nil at EOF).
type readResult struct {
	data []byte
	err  error
}

// readAllAsync reads c to its end in a goroutine and delivers what it read.
func readAllAsync(c net.Conn) <-chan readResult {
	ch := make(chan readResult, 1)
	go func() {
		c.SetReadDeadline(time.Now().Add(waitTimeout))
		b, err := io.ReadAll(c)
		ch <- readResult{b, err}
	}()
	return ch
}

// heldDialer returns a dialer whose connect attempts wait until release is called.
func heldDialer(t *testing.T) (d *net.Dialer, release func()) {
	t.Helper()
	ch := make(chan struct{})
	var once sync.Once
	release = func() { once.Do(func() { close(ch) }) }
	t.Cleanup(release)
	d = &net.Dialer{Control: func(network, address string, c syscall.RawConn) error {
		select {
		case <-ch:
			return nil
		case <-time.After(waitTimeout):
			return errors.New("heldDialer: never released")
		}
	}}
	return d, release
}

// closeHalfAbortHalf ends socks as the storms do: Close on the even ones,
// Abort on the odd ones. It returns each call's error.
func closeHalfAbortHalf(socks []*asynctcp.Socket) []error {
	errs := make([]error, len(socks))
	for i, s := range socks {
		if i%2 == 0 {
			errs[i] = s.Close()
		} else {
			errs[i] = s.Abort()
		}
	}
	return errs
}

// pattern returns n bytes that do not repeat with a short period.
func pattern(n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(i*7 + i/251)
	}
	return b
}

// patternPeriod is the period of the patternAt stream.
const patternPeriod = 251

// patternTable is the first MiB of the patternAt stream, and a period more.
var patternTable = sync.OnceValue(func() []byte {
	b := make([]byte, 1<<20+patternPeriod)
	for i := range b {
		b[i] = byte(i % patternPeriod)
	}
	return b
})

// patternAt returns bytes off to off+n (n <= 1 MiB) of the stream byte(i % 251); shared, read-only.
func patternAt(off, n int) []byte {
	o := off % patternPeriod
	return patternTable()[o : o+n : o+n]
}

// makePatternAt returns a fresh copy of bytes off to off+n of the patternAt stream, for any n.
func makePatternAt(off, n int) []byte {
	b := make([]byte, n)
	for i := 0; i < n; i += 1 << 20 {
		copy(b[i:], patternAt(off+i, min(1<<20, n-i)))
	}
	return b
}

// isPatternAt reports whether p is the patternAt stream from offset off.
func isPatternAt(off int, p []byte) bool {
	for len(p) > 0 {
		n := min(len(p), 1<<20)
		if !bytes.Equal(p[:n], patternAt(off, n)) {
			return false
		}
		off, p = off+n, p[n:]
	}
	return true
}

// firstDiff returns the first offset where a and b differ, or the length of the shorter.
func firstDiff(a, b []byte) int {
	n := min(len(a), len(b))
	for i := 0; i < n; i++ {
		if a[i] != b[i] {
			return i
		}
	}
	return n
}

// maxObserved keeps the largest value observed, from any goroutine.
type maxObserved struct{ v atomic.Int64 }

// observe records x if it is the largest so far.
func (m *maxObserved) observe(x int) {
	for {
		cur := m.v.Load()
		if int64(x) <= cur || m.v.CompareAndSwap(cur, int64(x)) {
			return
		}
	}
}

// get returns the largest value observed.
func (m *maxObserved) get() int { return int(m.v.Load()) }

// syncBuffer is a bytes.Buffer safe for concurrent use, for slog handlers.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

// Write appends p to the buffer.
func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

// String returns what was written so far.
func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}

// verifyNoGoroutines fails a non-parallel test if a goroutine is left but those in before.
func verifyNoGoroutines(t *testing.T, before goleak.Option) {
	t.Helper()
	goleak.VerifyNone(t, before)
}

// newSelfSigned makes a self-signed ECDSA certificate for 127.0.0.1 and localhost, and a pool trusting it.
func newSelfSigned() (tls.Certificate, *x509.CertPool, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "localhost"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(time.Hour),
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
		IsCA:                  true,
		IPAddresses:           []net.IP{net.IPv4(127, 0, 0, 1)},
		DNSNames:              []string{"localhost"},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return tls.Certificate{}, nil, err
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		return tls.Certificate{}, nil, err
	}
	pool := x509.NewCertPool()
	pool.AddCert(leaf)
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key, Leaf: leaf}, pool, nil
}

// tlsConfigs returns a server configuration with a self-signed certificate
// for 127.0.0.1 and a client configuration that trusts it.
func tlsConfigs(t *testing.T) (server, client *tls.Config) {
	t.Helper()
	cert, pool, err := newSelfSigned()
	if err != nil {
		t.Fatalf("newSelfSigned: %v", err)
	}
	return &tls.Config{Certificates: []tls.Certificate{cert}}, &tls.Config{RootCAs: pool}
}

// echoBack is a read-cb that writes every byte back to the sender.
func echoBack(s *asynctcp.Socket, data []byte) {
	s.WriteData(data)
}

// sendInRandomChunks writes data to c on a goroutine of its own, in
// chunks of 1 byte to 100 KiB chosen by seed, and sends the first write
// error, or nil once all is written.
func sendInRandomChunks(c net.Conn, data []byte, seed int64) <-chan error {
	done := make(chan error, 1)
	go func() {
		rng := mrand.New(mrand.NewSource(seed))
		for len(data) > 0 {
			n := min(len(data), 1+rng.Intn(100<<10))
			if _, err := c.Write(data[:n]); err != nil {
				done <- err
				return
			}
			data = data[n:]
		}
		done <- nil
	}()
	return done
}

// floodPeer writes chunk to c once, so that the flood has begun when it
// returns, then over and over on a goroutine of its own until a write
// fails or stop is called; done gets the write error (nil once stopped).
// The test's cleanup stops it, closes c and waits for it.
func floodPeer(t *testing.T, c net.Conn, chunk []byte) (stop func(), done <-chan error) {
	t.Helper()
	return floodPeerWith(t, c, func() []byte { return chunk })
}

// floodPeerWith is floodPeer writing what next returns, one call per write.
func floodPeerWith(t *testing.T, c net.Conn, next func() []byte) (stop func(), done <-chan error) {
	t.Helper()
	c.SetWriteDeadline(time.Now().Add(waitTimeout))
	if _, err := c.Write(next()); err != nil {
		t.Fatalf("peer's first write: %v", err)
	}
	c.SetWriteDeadline(time.Time{})
	quit := make(chan struct{})
	var once sync.Once
	stop = func() { once.Do(func() { close(quit) }) }
	ch := make(chan error, 1)
	goOwned(t, "flood", func() {
		for {
			select {
			case <-quit:
				ch <- nil
				return
			default:
			}
			if _, err := c.Write(next()); err != nil {
				ch <- err
				return
			}
		}
	}, closerFunc(stop), c)
	return stop, ch
}

// closerFunc makes a function an io.Closer, for goOwned.
type closerFunc func()

func (f closerFunc) Close() error { f(); return nil }

// closeConnWithin closes s's conn on another goroutine and reports whether
// that returned within d. A callback that calls it and finds false returns
// anyway, which ends the deadlock a hanging Close would otherwise be, so
// that the test fails instead of hanging.
func closeConnWithin(s *asynctcp.Socket, d time.Duration) bool {
	done := make(chan struct{})
	go func() {
		s.Conn().Close()
		close(done)
	}()
	select {
	case <-done:
		return true
	case <-time.After(d):
		return false
	}
}

// wantConnClosedInCallback checks that a callback's closeConnWithin
// returned in time (closed), then wantConnClosedEvent.
func wantConnClosedInCallback(t *testing.T, l *asynctcp.Loop, closed <-chan bool, events <-chan error, what string) {
	t.Helper()
	if !waitFor(t, closed, what) {
		t.Fatalf("%s did not return within 2s", what)
	}
	wantConnClosedEvent(t, l, events)
}

// wantConnClosedEvent checks that a socket whose conn was closed under it
// ended with an event matching net.ErrClosed, then exits l and waits for
// it to empty.
func wantConnClosedEvent(t *testing.T, l *asynctcp.Loop, events <-chan error) {
	t.Helper()
	if ev := waitFor(t, events, "the event of a socket whose conn was closed under it"); !errors.Is(ev, net.ErrClosed) {
		t.Errorf("event = %v, want one matching net.ErrClosed", ev)
	}
	l.Exit(nil)
	waitLoopClean(t, l, waitTimeout)
}
