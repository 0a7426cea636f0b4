package main

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// timeout bounds every wait of these tests.
const timeout = 10 * time.Second

// syncBuffer is an io.Writer that the test may read while the server
// writes.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// startChat runs a chat server with args on a free loopback port until the
// test ends. stop cancels it and returns serve's result.
func startChat(t *testing.T, args ...string) (c *chat, out *syncBuffer, stop func() error) {
	t.Helper()
	out = &syncBuffer{}
	cfg, err := parse(out, append([]string{"-listen", "127.0.0.1:0"}, args...))
	if err != nil {
		t.Fatal(err)
	}
	c = newChat(cfg, out)
	if err := c.listen(); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- c.serve(ctx) }()
	var (
		once   sync.Once
		result error
	)
	stop = func() error {
		t.Helper()
		once.Do(func() {
			cancel()
			select {
			case result = <-done:
			case <-time.After(timeout):
				result = fmt.Errorf("serve did not return %v after cancel\noutput:\n%s", timeout, out.String())
			}
		})
		return result
	}
	t.Cleanup(func() {
		if err := stop(); err != nil {
			t.Error(err)
		}
	})
	return c, out, stop
}

// peer is a test client of the chat.
type peer struct {
	t    *testing.T
	conn *net.TCPConn
	r    *bufio.Reader
	name string  // its address: the server's name for it
	srv  *client // the server's side of it
}

// join connects a client to c and waits for its welcome.
func join(t *testing.T, c *chat) *peer {
	t.Helper()
	conn, err := net.DialTimeout("tcp", c.addr().String(), timeout)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	p := &peer{t: t, conn: conn.(*net.TCPConn), r: bufio.NewReaderSize(conn, 64<<10), name: conn.LocalAddr().String()}
	if got := p.mustLine(); !strings.HasPrefix(got, "* welcome "+p.name+",") {
		t.Fatalf("%s got %q first, want its welcome", p.name, got)
	}
	// The welcome is queued after the client joined the room.
	if p.srv = c.clientAt(p.name); p.srv == nil {
		t.Fatalf("%s is welcome but not in the room", p.name)
	}
	return p
}

// line reads the next line, waiting at most timeout for it. Safe on any
// goroutine.
func (p *peer) line() (string, error) {
	p.conn.SetReadDeadline(time.Now().Add(timeout))
	s, err := p.r.ReadString('\n')
	if err != nil {
		return s, fmt.Errorf("%s read after %q: %w", p.name, s, err)
	}
	return strings.TrimSuffix(s, "\n"), nil
}

func (p *peer) mustLine() string {
	p.t.Helper()
	s, err := p.line()
	if err != nil {
		p.t.Fatal(err)
	}
	return s
}

// send writes lines, each with its newline, in one write.
func (p *peer) send(lines ...string) {
	p.t.Helper()
	p.write(strings.Join(lines, "\n") + "\n")
}

func (p *peer) write(s string) {
	p.t.Helper()
	p.conn.SetWriteDeadline(time.Now().Add(timeout))
	if _, err := p.conn.Write([]byte(s)); err != nil {
		p.t.Fatalf("%s write: %v", p.name, err)
	}
}

// waitFor reads lines until want and returns those before it.
func (p *peer) waitFor(want string) []string {
	p.t.Helper()
	var before []string
	for {
		s, err := p.line()
		if err != nil {
			p.t.Fatalf("waiting for %q: %v; read before: %q", want, err, before)
		}
		if s == want {
			return before
		}
		before = append(before, s)
	}
}

// waitForChat reads lines until a chat line (not a "* " notice) and
// returns it.
func (p *peer) waitForChat() string {
	p.t.Helper()
	for {
		if s := p.mustLine(); !strings.HasPrefix(s, "* ") {
			return s
		}
	}
}

// readToEOF reads what is left until the server closes the connection.
func (p *peer) readToEOF() []string {
	p.t.Helper()
	var lines []string
	for {
		s, err := p.line()
		if errors.Is(err, io.EOF) && s == "" {
			return lines
		}
		if err != nil {
			p.t.Fatalf("reading to EOF: %v; read before: %q", err, lines)
		}
		lines = append(lines, s)
	}
}

// waitGone waits until the server's side of p has closed (its close-cb
// has returned) and checks that its close-cb ran exactly once.
func waitGone(t *testing.T, c *chat, p *peer) {
	t.Helper()
	select {
	case <-p.srv.sock.Done():
	case <-time.After(timeout):
		t.Fatalf("the server's socket of %s did not close within %v", p.name, timeout)
	}
	if n := p.srv.closes.Load(); n != 1 {
		t.Errorf("close-cb of %s ran %d times, want 1", p.name, n)
	}
	if c.clientAt(p.name) != nil {
		t.Errorf("%s is still in the room after its close-cb", p.name)
	}
}

// eventually waits until cond holds, checking every few milliseconds, and
// fails the test with what after timeout.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("not within %v: %s", timeout, what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestEachLineReachesEveryOtherClientOnce(t *testing.T) {
	c, out, stop := startChat(t)
	peers := []*peer{join(t, c), join(t, c), join(t, c)}
	// Everyone has seen the last join: no notice is on its way any more.
	for _, p := range peers[:2] {
		p.waitFor("* " + peers[2].name + " joined")
	}

	const n = 200
	for _, p := range peers {
		lines := make([]string, n)
		for i := range lines {
			lines[i] = fmt.Sprintf("%d from %s", i, p.name)
		}
		p.send(lines...)
	}
	for _, p := range peers {
		next := map[string]int{} // sender: the number of its next line
		for got := 0; got < 2*n; got++ {
			s := p.waitForChat()
			from, text, ok := strings.Cut(s, ": ")
			switch {
			case !ok:
				t.Fatalf("%s got %q, not a chat line", p.name, s)
			case from == p.name:
				t.Fatalf("%s got its own line %q", p.name, s)
			case text != fmt.Sprintf("%d from %s", next[from], from):
				t.Fatalf("%s got %q, want line %d from %s", p.name, s, next[from], from)
			}
			next[from]++
		}
	}

	// Once the server has closed, whatever else a client got is only
	// notices: no line came twice.
	if err := stop(); err != nil {
		t.Fatal(err)
	}
	for _, p := range peers {
		rest := p.readToEOF()
		for _, s := range rest {
			if !strings.HasPrefix(s, "* ") {
				t.Errorf("%s got %q after all the lines", p.name, s)
			}
		}
		if len(rest) == 0 || rest[len(rest)-1] != "* server shutting down" {
			t.Errorf("%s's last lines are %q, want a shutdown notice", p.name, rest)
		}
		waitGone(t, c, p)
	}
	for _, p := range peers {
		for _, want := range []string{"join " + p.name + "\n", "leave " + p.name + " (server shutting down)\n"} {
			if strings.Count(out.String(), want) != 1 {
				t.Errorf("output holds %q %d times, want once:\n%s", want, strings.Count(out.String(), want), out.String())
			}
		}
	}
}

// TestSlowClientIsCutOffWithoutSlowingOthers floods the room while one
// client reads nothing: the others get every line promptly, the server
// never holds more than -max-behind for the slow client, and cuts it off.
func TestSlowClientIsCutOffWithoutSlowingOthers(t *testing.T) {
	t.Run("kernel's send buffer", func(t *testing.T) { testSlowClient(t) })
	t.Run("sndbuf 64KiB", func(t *testing.T) { testSlowClient(t, "-sndbuf", strconv.Itoa(64<<10)) })
}

func testSlowClient(t *testing.T, args ...string) {
	const (
		maxBehind  = 256 << 10
		lineLen    = 1000 // bytes of each flood line, newline included
		chunkLines = 64   // lines per write of the flooder
		minChunks  = 128  // 8 MiB at least, about twice what Linux's kernel buffers take
		maxChunks  = 1024 // 64 MiB at most, or the slow client was never cut off
		window     = 2    // chunks the flooder may be ahead of the fast reader
	)
	c, out, _ := startChat(t, append(args, "-max-behind", strconv.Itoa(maxBehind))...)
	fast := join(t, c)
	flood := join(t, c)
	slow := join(t, c)
	fast.waitFor("* " + slow.name + " joined")
	// From here on slow reads nothing, and takes little in its kernel.
	if err := slow.conn.SetReadBuffer(4 << 10); err != nil {
		t.Fatal(err)
	}

	// Sample what the server holds for the slow client while it happens.
	var sampledMax atomic.Int64
	stopSampling := make(chan struct{})
	sampled := make(chan struct{})
	go func() {
		defer close(sampled)
		tick := time.NewTicker(time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-stopSampling:
				return
			case <-tick.C:
				if n := int64(slow.srv.sock.Buffered()); n > sampledMax.Load() {
					sampledMax.Store(n)
				}
			}
		}
	}()
	defer func() { close(stopSampling); <-sampled }()

	// The fast client reads everything, each line within the timeout, and
	// reports each chunk it completes; it goes on until both the flood's
	// end line and the notice that the slow client left have come.
	type report struct {
		lines    int           // flood lines received
		maxGap   time.Duration // the longest wait for a line
		leftLine string        // the notice of the slow client's leaving
		err      error
	}
	const endLine = "end of flood"
	progress := make(chan int, maxChunks)
	result := make(chan report, 1)
	go func() {
		var r report
		defer func() { result <- r }()
		last := time.Now()
		prefix := flood.name + ": "
		ended := false
		for !ended || r.leftLine == "" {
			s, err := fast.line()
			if err != nil {
				r.err = fmt.Errorf("after %d flood lines: %w", r.lines, err)
				return
			}
			now := time.Now()
			r.maxGap = max(r.maxGap, now.Sub(last))
			last = now
			switch {
			case strings.HasPrefix(s, "* "+slow.name+" left"):
				r.leftLine = s
			case strings.HasPrefix(s, "* "):
			case s == prefix+endLine:
				ended = true
			case s != prefix+strings.TrimSuffix(floodLine(r.lines, lineLen), "\n"):
				r.err = fmt.Errorf("flood line %d is %.40q..., want %.40q...", r.lines, s, prefix+floodLine(r.lines, lineLen))
				return
			default:
				r.lines++
				if r.lines%chunkLines == 0 {
					progress <- r.lines / chunkLines
				}
			}
		}
	}()

	start := time.Now()
	var chunk strings.Builder
	sent := 0
	for ; sent < minChunks || !slow.srv.sock.Closed(); sent++ {
		if sent == maxChunks {
			t.Fatalf("the slow client was not cut off after %d bytes: the kernel took %d of them, the server holds %d",
				sent*chunkLines*lineLen, slow.srv.sock.BytesWritten(), slow.srv.sock.Buffered())
		}
		if sent >= window {
			select {
			case <-progress:
			case r := <-result:
				t.Fatalf("the fast client stopped: %v", r.err)
			case <-time.After(timeout):
				t.Fatalf("the fast client did not get chunk %d within %v", sent-window, timeout)
			}
		}
		chunk.Reset()
		for j := 0; j < chunkLines; j++ {
			chunk.WriteString(floodLine(sent*chunkLines+j, lineLen))
		}
		flood.write(chunk.String())
	}
	flood.send(endLine)
	var r report
	select {
	case r = <-result:
	case <-time.After(timeout):
		t.Fatalf("the fast client did not finish within %v", timeout)
	}
	elapsed := time.Since(start)
	if r.err != nil {
		t.Fatalf("the fast client: %v", r.err)
	}
	if r.lines != sent*chunkLines {
		t.Errorf("the fast client got %d flood lines, want %d", r.lines, sent*chunkLines)
	}
	waitGone(t, c, slow)

	peak := slow.srv.peak.Load()
	t.Logf("flooded %d lines (%d bytes) in %v; the fast client waited at most %v for a line",
		sent*chunkLines, sent*chunkLines*lineLen, elapsed.Round(time.Millisecond), r.maxGap.Round(time.Millisecond))
	t.Logf("slow client: the kernel took %d bytes; the server held at most %d bytes for it (sampled: %d), bound %d; %d message(s) missed, %d client(s) cut off",
		slow.srv.sock.BytesWritten(), peak, sampledMax.Load(), maxBehind, c.missed.Load(), c.cutOff.Load())
	if peak > maxBehind || sampledMax.Load() > maxBehind {
		t.Errorf("the server held %d bytes for the slow client (sampled: %d), above -max-behind %d", peak, sampledMax.Load(), maxBehind)
	}
	if n := c.cutOff.Load(); n != 1 {
		t.Errorf("%d clients cut off, want 1 (the slow one)", n)
	}
	if !strings.HasPrefix(r.leftLine, "* "+slow.name+" left (too slow: ") {
		t.Errorf("the fast client was told %q", r.leftLine)
	}
	if want := "leave " + slow.name + " (too slow: "; !strings.Contains(out.String(), want) {
		t.Errorf("output lacks %q:\n%s", want, out.String())
	}
	if fast.srv.sock.Closed() || flood.srv.sock.Closed() {
		t.Errorf("a fast client was closed:\n%s", out.String())
	}
}

// floodLine returns line i of the flood, n bytes with its newline.
func floodLine(i, n int) string {
	s := fmt.Sprintf("%08d ", i)
	return s + strings.Repeat(string(rune('a'+i%26)), n-len(s)-1) + "\n"
}

func TestLeavingClientIsRemovedOnceAndAnnounced(t *testing.T) {
	c, out, stop := startChat(t)
	a, b, d := join(t, c), join(t, c), join(t, c)
	b.waitFor("* " + d.name + " joined")

	// a hangs up. (A close with unread input, the joins of b and d, would
	// reset the connection: shut the write side instead.)
	a.conn.CloseWrite()
	if rest := a.readToEOF(); strings.Join(rest, "|") != "* "+b.name+" joined|* "+d.name+" joined" {
		t.Errorf("a got %q before EOF", rest)
	}
	for _, p := range []*peer{b, d} {
		p.waitFor("* " + a.name + " left (quit)")
	}
	waitGone(t, c, a)

	// e resets its connection.
	e := join(t, c)
	for _, p := range []*peer{b, d} {
		p.waitFor("* " + e.name + " joined")
	}
	e.conn.SetLinger(0)
	e.conn.Close()
	for _, p := range []*peer{b, d} {
		p.waitFor("* " + e.name + " left (connection reset)")
	}
	waitGone(t, c, e)

	// The others stay and still talk.
	b.send("still here")
	if got, want := d.waitForChat(), b.name+": still here"; got != want {
		t.Errorf("d got %q, want %q", got, want)
	}
	if err := stop(); err != nil {
		t.Fatal(err)
	}
	for _, p := range []*peer{b, d} {
		waitGone(t, c, p)
	}
	for _, want := range []string{"leave " + a.name + " (quit)", "leave " + e.name + " (connection reset)"} {
		if strings.Count(out.String(), want) != 1 {
			t.Errorf("output holds %q %d times, want once:\n%s", want, strings.Count(out.String(), want), out.String())
		}
	}
}

func TestIdleClientIsDisconnected(t *testing.T) {
	c, out, _ := startChat(t, "-read-timeout", "300ms")
	a := join(t, c)
	start := time.Now()
	if rest := a.readToEOF(); len(rest) != 0 {
		t.Errorf("the idle client got %q", rest)
	}
	t.Logf("the idle client was disconnected after %v", time.Since(start).Round(time.Millisecond))
	waitGone(t, c, a)
	if want := "leave " + a.name + " (idle too long)"; !strings.Contains(out.String(), want) {
		t.Errorf("output lacks %q:\n%s", want, out.String())
	}
}

func TestLongLinesAreDropped(t *testing.T) {
	c, _, _ := startChat(t, "-max-line", "100")
	a, b := join(t, c), join(t, c)
	a.waitFor("* " + b.name + " joined")

	a.send(strings.Repeat("x", 100)) // as long as may be
	a.write(strings.Repeat("w", 100) + "\r\n")
	// One byte too many, in pieces, then a line far longer than a read.
	a.write(strings.Repeat("y", 60))
	a.write(strings.Repeat("y", 41))
	a.write(strings.Repeat("y", 10) + "\r\nafter y\n")
	a.write(strings.Repeat("z", 200<<10) + "\nafter z\n")

	for _, want := range []string{strings.Repeat("x", 100), strings.Repeat("w", 100), "after y", "after z"} {
		if got := b.waitForChat(); got != a.name+": "+want {
			t.Fatalf("b got %.60q, want %.60q", got, a.name+": "+want)
		}
	}
	for range 2 {
		if got, want := a.mustLine(), "* line longer than 100 bytes dropped"; got != want {
			t.Errorf("a got %q, want %q", got, want)
		}
	}
}

func TestNick(t *testing.T) {
	c, out, _ := startChat(t)
	a, b := join(t, c), join(t, c)
	a.waitFor("* " + b.name + " joined")
	a.send("/nick alice", "hi", "/nick not a name")
	b.waitFor("* " + a.name + " is now alice")
	if got := b.waitForChat(); got != "alice: hi" {
		t.Errorf("b got %q, want %q", got, "alice: hi")
	}
	if got := a.mustLine(); !strings.HasPrefix(got, "* a name is ") {
		t.Errorf("a got %q for a bad name", got)
	}
	a.conn.CloseWrite()
	b.waitFor("* alice left (quit)")
	waitGone(t, c, a)
	if want := "leave alice (quit)"; !strings.Contains(out.String(), want) {
		t.Errorf("output lacks %q:\n%s", want, out.String())
	}
}

// TestShutdownCutsOffStalledClients stalls a client with output queued on
// the server, where a graceful close cannot finish: the grace period ends
// it.
func TestShutdownCutsOffStalledClients(t *testing.T) {
	c, out, stop := startChat(t, "-max-behind", strconv.Itoa(64<<20), "-grace", "200ms")
	stalled := join(t, c)
	flood := join(t, c)
	stalled.conn.SetReadBuffer(4 << 10)
	line := strings.Repeat("s", 999) + "\n"
	chunk := strings.Repeat(line, 1024)
	for i := 0; i < 8; i++ {
		flood.write(chunk)
	}
	eventually(t, "output queued on the stalled client", func() bool { return stalled.srv.sock.Buffered() > 0 })
	t.Logf("queued on the stalled client at shutdown: %d bytes", stalled.srv.sock.Buffered())
	start := time.Now()
	if err := stop(); err != nil {
		t.Fatal(err)
	}
	t.Logf("shutdown took %v", time.Since(start).Round(time.Millisecond))
	waitGone(t, c, stalled)
	waitGone(t, c, flood)
	if want := "leave " + stalled.name + " (server shutting down)"; !strings.Contains(out.String(), want) {
		t.Errorf("output lacks %q:\n%s", want, out.String())
	}
}

func TestInterruptEndsRun(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var out syncBuffer
	done := make(chan error, 1)
	go func() { done <- run(ctx, &out, []string{"-listen", "127.0.0.1:0"}) }()

	// The port is the one run says it listens on: a port picked
	// beforehand may be taken by then.
	const listening = "chat listening on "
	eventually(t, "run prints its address", func() bool { return strings.Contains(out.String(), " (Ctrl-C to stop)\n") })
	addr, _, _ := strings.Cut(strings.TrimPrefix(out.String(), listening), " ")

	// Two clients, one after the other: the connect-cbs of two sockets
	// may run in either order.
	var (
		conns   []net.Conn
		readers []*bufio.Reader
	)
	deadline := time.Now().Add(timeout)
	expect := func(r *bufio.Reader, want string) {
		t.Helper()
		if s, err := r.ReadString('\n'); !strings.HasPrefix(s, want) {
			t.Fatalf("got %q, %v; want %q...\noutput:\n%s", s, err, want, out.String())
		}
	}
	for range 2 {
		conn, err := net.DialTimeout("tcp", addr, timeout)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		conn.SetDeadline(deadline)
		conns = append(conns, conn)
		readers = append(readers, bufio.NewReader(conn))
		expect(readers[len(readers)-1], "* welcome ")
	}
	r := readers[0]
	expect(r, "* "+conns[1].LocalAddr().String()+" joined")

	cancel() // Ctrl-C
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("run: %v\noutput:\n%s", err, out.String())
		}
	case <-time.After(timeout):
		t.Fatalf("run did not return within %v of the interrupt\noutput:\n%s", timeout, out.String())
	}
	if s, err := r.ReadString('\n'); s != "* server shutting down\n" {
		t.Errorf("after the interrupt the client read %q, %v", s, err)
	}
	if s, err := r.ReadString('\n'); !errors.Is(err, io.EOF) {
		t.Errorf("after the notice the client read %q, %v; want EOF", s, err)
	}
	got := out.String()
	for _, conn := range conns {
		if want := "leave " + conn.LocalAddr().String() + " (server shutting down)"; !strings.Contains(got, want) {
			t.Errorf("output lacks %q:\n%s", want, got)
		}
	}
	if !strings.HasSuffix(got, "closed; 0 client(s) cut off for falling behind\n") {
		t.Errorf("output does not end with %q:\n%s", "closed", got)
	}
}

func TestBadFlags(t *testing.T) {
	for _, args := range [][]string{
		{"-no-such-flag"},
		{"-max-line", "0"},
		{"-max-line", "4096", "-max-behind", "4096"},
		{"-read-timeout", "-1s"},
		{"-sndbuf", "-1"},
		{"-listen", "127.0.0.1"},
		{"extra"},
	} {
		if err := run(context.Background(), io.Discard, args); err == nil {
			t.Errorf("run %q returned nil", args)
		}
	}
}
