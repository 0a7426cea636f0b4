// Command simple-proxy is cl-async's simple-proxy example on asynctcp: it
// listens on a local address and, for each connection it accepts, connects
// to a remote address and relays the bytes both ways. The two sockets of a
// connection are paired through socket-data (Socket.SetData): when one
// side closes, the proxy closes the other.
//
//	go run ./examples/simple-proxy -listen 127.0.0.1:8080 -to example.com:80
//
// Unlike the original, it never buffers without bound: when a destination
// has too much output queued (-high), the proxy stops reading from the
// source (Socket.Disable) until the destination's write-cb says its output
// fell to -low (Socket.Enable), so the slow side slows the fast one through
// TCP flow control.
//
// With -debug it prints a hex dump of every chunk it relays; with -stats,
// the open connections and the throughput of each direction every 2
// seconds. Ctrl-C stops accepting; open connections get -grace to finish,
// then they are cut.
package main

import (
	"context"
	"encoding/hex"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/asynctcp/asynctcp"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, os.Stdout, os.Args[1:])
	stop()
	if errors.Is(err, flag.ErrHelp) {
		return
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "simple-proxy:", err)
		os.Exit(1)
	}
}

// config is what the flags say.
type config struct {
	listen   string        // host:port to accept on
	to       string        // host:port to relay to
	debug    bool          // hex dump of the traffic
	stats    bool          // connections and throughput every interval
	interval time.Duration // between two stats lines
	low      int           // resume reading the source at this much queued output
	high     int           // stop reading the source at this much queued output
	grace    time.Duration // how long open connections may finish after Ctrl-C
}

func parse(out io.Writer, args []string) (config, error) {
	var c config
	fs := flag.NewFlagSet("simple-proxy", flag.ContinueOnError)
	fs.SetOutput(out)
	fs.StringVar(&c.listen, "listen", "127.0.0.1:8080", "`host:port` to accept connections on")
	fs.StringVar(&c.to, "to", "", "`host:port` to relay each connection to (required)")
	fs.BoolVar(&c.debug, "debug", false, "print a hex dump of everything relayed")
	fs.BoolVar(&c.stats, "stats", false, "print connections and throughput periodically")
	fs.DurationVar(&c.interval, "interval", 2*time.Second, "time between two -stats lines")
	fs.IntVar(&c.high, "high", 256<<10, "stop reading a source while its destination has this many `bytes` queued (0: never)")
	fs.IntVar(&c.low, "low", 64<<10, "resume reading once the destination's queue fell to this many `bytes`")
	fs.DurationVar(&c.grace, "grace", 5*time.Second, "time open connections get to finish once interrupted")
	if err := fs.Parse(args); err != nil {
		return c, err
	}
	switch {
	case fs.NArg() > 0:
		return c, fmt.Errorf("unexpected argument %q", fs.Arg(0))
	case c.to == "":
		return c, errors.New("-to host:port is required")
	case c.interval <= 0:
		return c, fmt.Errorf("-interval %v is not positive", c.interval)
	case c.high > 0 && c.low >= c.high:
		// The queue must be able to fall from the high watermark to the
		// low one: that fall runs the write-cb that resumes reading.
		return c, fmt.Errorf("-low %d is not below -high %d", c.low, c.high)
	}
	return c, nil
}

// run parses args and proxies until ctx ends. Everything it prints goes to
// out.
func run(ctx context.Context, out io.Writer, args []string) error {
	c, err := parse(out, args)
	if err != nil {
		return err
	}
	px, err := newProxy(c, out)
	if err != nil {
		return err
	}
	return px.serve(ctx)
}

// proxy relays the connections of one server.
type proxy struct {
	cfg    config
	loop   *asynctcp.Loop
	p      *printer
	toHost string
	toPort int
	opts   []asynctcp.Option // for both sockets of a pair

	up, down  atomic.Int64 // bytes relayed client to upstream, upstream to client
	pauses    atomic.Int64 // times a source was disabled for back-pressure
	maxQueued atomic.Int64 // the most output seen queued on a destination
}

func newProxy(c config, out io.Writer) (*proxy, error) {
	host, port, err := splitHostPort(c.to)
	if err != nil {
		return nil, fmt.Errorf("-to: %w", err)
	}
	px := &proxy{cfg: c, loop: &asynctcp.Loop{}, p: &printer{w: out}, toHost: host, toPort: port}
	px.opts = []asynctcp.Option{
		asynctcp.WriteWatermarks(c.low, c.high), // validated here: bad values are an error
		asynctcp.OnWrite(px.resume),
		// The read-cb only copies the bytes into the other socket's output
		// (WriteData copies), so it may borrow the read buffer.
		asynctcp.ReuseReadBuffer(),
	}
	return px, nil
}

func splitHostPort(addr string) (string, int, error) {
	host, portStr, err := net.SplitHostPort(addr)
	if err != nil {
		return "", 0, err
	}
	port, err := strconv.Atoi(portStr)
	if err != nil || port < 0 || port > 65535 {
		return "", 0, fmt.Errorf("bad port in %q", addr)
	}
	return host, port, nil
}

// serve listens, relays until ctx ends, then stops accepting and lets the
// open connections finish within the grace period.
func (px *proxy) serve(ctx context.Context) error {
	host, port, err := splitHostPort(px.cfg.listen)
	if err != nil {
		return fmt.Errorf("-listen: %w", err)
	}
	opts := append([]asynctcp.Option{asynctcp.OnConnect(px.accepted)}, px.opts...)
	srv, err := px.loop.Listen(host, port, px.fromClient, px.clientEvent, opts...)
	if err != nil {
		return err
	}
	px.p.say("proxying %s to %s", srv.Addr(), px.cfg.to)

	stopStats := px.startStats()
	<-ctx.Done()
	px.p.say("closing proxy")
	srv.Close()
	cut := time.AfterFunc(px.cfg.grace, func() { px.loop.Exit(nil) })
	err = px.loop.Wait()
	cut.Stop()
	stopStats()
	px.p.say("closed")
	return err
}

// accepted is the connect-cb of each client: it connects to the upstream
// and pairs the two sockets. Writes to the upstream before it is up are
// queued, and count against its high watermark like any other.
func (px *proxy) accepted(client *asynctcp.Socket) {
	if px.cfg.debug {
		px.p.say("--- %s connected ---", client.RemoteAddr())
	}
	opts := append([]asynctcp.Option{
		// The upstream's callbacks all come after its connect-cb.
		asynctcp.OnConnect(func(up *asynctcp.Socket) { up.SetData(client) }),
	}, px.opts...)
	up, err := px.loop.Connect(px.toHost, px.toPort, px.fromUpstream, px.upstreamEvent(client), opts...)
	if err != nil {
		px.p.say("connect to %s: %v", px.cfg.to, err)
		client.Abort()
		return
	}
	// The client's read-cb comes after this connect-cb returns.
	client.SetData(up)
}

// peer returns the other socket of s's pair, or nil.
func peer(s *asynctcp.Socket) *asynctcp.Socket {
	p, _ := s.Data().(*asynctcp.Socket)
	return p
}

func (px *proxy) fromClient(client *asynctcp.Socket, data []byte) {
	if px.cfg.debug {
		px.dump(fmt.Sprintf("%s -> %s", client.RemoteAddr(), px.cfg.to), data)
	}
	px.relay(client, data, &px.up)
}

func (px *proxy) fromUpstream(up *asynctcp.Socket, data []byte) {
	if px.cfg.debug {
		px.dump(fmt.Sprintf("%s -> %s", px.cfg.to, peer(up).RemoteAddr()), data)
	}
	px.relay(up, data, &px.down)
}

// dump prints a hex dump of data under a header that says where it goes.
func (px *proxy) dump(dir string, data []byte) {
	px.p.say("--- %s (%d bytes) ---\n%s", dir, len(data), strings.TrimSuffix(hex.Dump(data), "\n"))
}

// relay writes what src read to its peer. Where that leaves the peer with
// too much queued, it stops reading src until the peer's write-cb (resume)
// sees the queue drained; the peer's TCP window then slows the sender.
func (px *proxy) relay(src *asynctcp.Socket, data []byte, count *atomic.Int64) {
	dst := peer(src)
	if dst == nil {
		return
	}
	count.Add(int64(len(data)))
	if err := dst.WriteData(data); err != nil {
		src.Close() // the destination is gone
		return
	}
	px.noteQueued(dst.Buffered())
	if dst.Writable() {
		return
	}
	src.Disable(asynctcp.EvRead)
	px.pauses.Add(1)
	// dst's write-cb may have run between Writable and Disable, and will
	// not run again: check once more.
	if dst.Writable() {
		src.Enable(asynctcp.EvRead)
	}
}

// resume is the write-cb of every socket: its queue fell to the low
// watermark, so its peer may be read again. A write-cb runs after the
// write that caused it, not during it: where the peer's read-cb queued
// more in between, the queue may be back above the high watermark. Then
// reading stays off; the write that takes the queue down to the low
// watermark again runs the write-cb again. (A read-cb may still slip in
// between the check and Enable; the next one sees the queue full and
// disables reading again, so the queue stays within two reads of the high
// watermark.)
func (px *proxy) resume(dst *asynctcp.Socket) {
	src := peer(dst)
	if src == nil || !dst.Writable() {
		return
	}
	src.Enable(asynctcp.EvRead) // an error means src closed: nothing to resume
}

func (px *proxy) noteQueued(n int) {
	for {
		m := px.maxQueued.Load()
		if int64(n) <= m || px.maxQueued.CompareAndSwap(m, int64(n)) {
			return
		}
	}
}

// clientEvent is the event-cb of the server and its clients: when a client
// is done, the upstream is closed too, after what it has queued was sent.
func (px *proxy) clientEvent(ev error) {
	var e *asynctcp.Event
	if !errors.As(ev, &e) || e.Socket == nil {
		px.p.say("server: %v", ev)
		return
	}
	px.report("client", e)
	if up := peer(e.Socket); up != nil {
		up.Close() // an error means it closed already
	}
}

// upstreamEvent is the event-cb of the upstream of client. It closes the
// client, after what it has queued was sent; it knows the client without
// socket-data, since a failed connect comes before the upstream's
// connect-cb has paired the two.
func (px *proxy) upstreamEvent(client *asynctcp.Socket) asynctcp.EventFunc {
	return func(ev error) {
		var e *asynctcp.Event
		if errors.As(ev, &e) {
			px.report("upstream", e)
		} else {
			px.p.say("upstream: %v", ev)
		}
		client.Close()
	}
}

// report prints an event: errors always, the end of a connection with
// -debug.
func (px *proxy) report(side string, e *asynctcp.Event) {
	if errors.Is(e, asynctcp.ErrTCPEOF) {
		if px.cfg.debug {
			px.p.say("--- %s %s closed ---", side, e.Socket.RemoteAddr())
		}
		return
	}
	px.p.say("%s: %v", side, e)
}

// startStats prints the open connections and the throughput of each
// direction every interval, where -stats asks for it. The returned
// function stops it and waits until it has.
func (px *proxy) startStats() (stop func()) {
	if !px.cfg.stats {
		return func() {}
	}
	quit := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		t := time.NewTicker(px.cfg.interval)
		defer t.Stop()
		last := time.Now()
		var up, down int64
		for {
			select {
			case <-quit:
				return
			case now := <-t.C:
				secs := now.Sub(last).Seconds()
				u, d := px.up.Load(), px.down.Load()
				st := px.loop.Stats()
				px.p.say("incoming: %d  outgoing: %d  client->upstream: %s/s  upstream->client: %s/s  paused: %d",
					st.Incoming, st.Outgoing, size(float64(u-up)/secs), size(float64(d-down)/secs), px.pauses.Load())
				last, up, down = now, u, d
			}
		}
	}()
	return func() {
		close(quit)
		<-done
	}
}

// size formats a number of bytes.
func size(n float64) string {
	const unit = 1000
	if n < unit {
		return fmt.Sprintf("%.0f B", n)
	}
	div, exp := float64(unit), 0
	for n/div >= unit && exp < 3 {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %cB", n/div, "kMGT"[exp])
}

// printer writes whole lines to w for callbacks that run on several
// goroutines at once.
type printer struct {
	mu sync.Mutex
	w  io.Writer
}

func (p *printer) say(format string, args ...any) {
	p.mu.Lock()
	defer p.mu.Unlock()
	fmt.Fprintf(p.w, format+"\n", args...)
}
