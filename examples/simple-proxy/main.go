// Command simple-proxy is cl-async's simple-proxy example on asynctcp: it
// listens on a local address and, for each connection it accepts, connects
// to a remote address and relays the bytes both ways: the two sockets of a
// connection are a Pipe, which closes one side once the other ends.
//
//	go run ./examples/simple-proxy -listen 127.0.0.1:8080 -to example.com:80
//
// Unlike the original, it never buffers without bound: when a destination
// has too much output queued (-high), Pipe stops reading from the source
// until the destination's output fell to -low, so the slow side slows the
// fast one through TCP flow control.
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
	"math"
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

// proxy relays the connections of one server: each client's socket and
// its upstream's are a Pipe, which carries the bytes and the back-pressure
// both ways and closes one side when the other ends.
type proxy struct {
	cfg    config
	loop   *asynctcp.Loop
	p      *printer
	toHost string
	toPort int

	mu      sync.Mutex
	clients map[*asynctcp.Socket]bool // open clients
	ups     map[*asynctcp.Socket]bool // open upstreams
	up      int64                     // bytes closed upstreams were sent (client to upstream)
	down    int64                     // bytes closed clients were sent (upstream to client)

	maxQueued atomic.Int64 // the most output seen queued on one side (sampled by queued)
}

func newProxy(c config, out io.Writer) (*proxy, error) {
	host, port, err := splitHostPort(c.to)
	if err != nil {
		return nil, fmt.Errorf("-to: %w", err)
	}
	if c.high == 0 { // never pause: a high watermark nothing reaches
		c.high = math.MaxInt
	}
	return &proxy{cfg: c, loop: &asynctcp.Loop{}, p: &printer{w: out}, toHost: host, toPort: port,
		clients: make(map[*asynctcp.Socket]bool), ups: make(map[*asynctcp.Socket]bool)}, nil
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
// open connections finish within the grace period. With -debug it serves a
// listener whose connections print what passes through them.
func (px *proxy) serve(ctx context.Context) error {
	host, port, err := splitHostPort(px.cfg.listen)
	if err != nil {
		return fmt.Errorf("-listen: %w", err)
	}
	opts := []asynctcp.Option{asynctcp.OnConnect(px.accepted), asynctcp.OnClose(px.clientClosed)}
	var srv *asynctcp.Server
	if px.cfg.debug {
		ln, err := net.Listen("tcp", net.JoinHostPort(host, strconv.Itoa(port)))
		if err != nil {
			return err
		}
		srv, err = px.loop.Serve(dumpListener{ln, px}, nil, px.clientEvent, opts...)
		if err != nil {
			ln.Close()
			return err
		}
	} else if srv, err = px.loop.Listen(host, port, nil, px.clientEvent, opts...); err != nil {
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
// and pipes the two sockets. Writes to the upstream before it is up are
// queued, and count against its high watermark like any other.
func (px *proxy) accepted(client *asynctcp.Socket) {
	if px.cfg.debug {
		px.p.say("--- %s connected ---", client.RemoteAddr())
	}
	up, err := px.loop.Connect(px.toHost, px.toPort, nil, px.upstreamEvent(client), asynctcp.OnClose(px.upClosed))
	if err != nil {
		px.p.say("connect to %s: %v", px.cfg.to, err)
		client.Abort()
		return
	}
	if err := asynctcp.Pipe(client, up, px.cfg.low, px.cfg.high); err != nil {
		px.p.say("pipe: %v", err)
		client.Abort()
		up.Abort()
		return
	}
	px.mu.Lock()
	px.clients[client], px.ups[up] = true, true
	px.mu.Unlock()
}

// clientClosed and upClosed are the close-cbs: a closed socket's bytes go
// to the totals. Pipe closes each side when the other ends.
func (px *proxy) clientClosed(client *asynctcp.Socket, _ error) {
	px.mu.Lock()
	defer px.mu.Unlock()
	if px.clients[client] {
		delete(px.clients, client)
		px.down += client.BytesWritten()
	}
}

func (px *proxy) upClosed(up *asynctcp.Socket, _ error) {
	px.mu.Lock()
	defer px.mu.Unlock()
	if px.ups[up] {
		delete(px.ups, up)
		px.up += up.BytesWritten()
	}
}

// totals returns the bytes relayed each way so far.
func (px *proxy) totals() (up, down int64) {
	px.mu.Lock()
	defer px.mu.Unlock()
	up, down = px.up, px.down
	for s := range px.ups {
		up += s.BytesWritten()
	}
	for s := range px.clients {
		down += s.BytesWritten()
	}
	return up, down
}

// queued returns the most output queued on one socket of the open pairs,
// and keeps the most it has seen in maxQueued.
func (px *proxy) queued() int {
	px.mu.Lock()
	defer px.mu.Unlock()
	most := 0
	for _, set := range []map[*asynctcp.Socket]bool{px.clients, px.ups} {
		for s := range set {
			most = max(most, s.Buffered())
		}
	}
	for {
		m := px.maxQueued.Load()
		if int64(most) <= m || px.maxQueued.CompareAndSwap(m, int64(most)) {
			return most
		}
	}
}

// clientEvent is the event-cb of the server and its clients.
func (px *proxy) clientEvent(ev error) {
	s := asynctcp.SocketOf(ev)
	if s == nil {
		px.p.say("server: %v", ev)
		return
	}
	px.report("client", ev)
}

// upstreamEvent is the event-cb of the upstream of client. A failed
// connect ends the upstream before Pipe could close the client for it.
func (px *proxy) upstreamEvent(client *asynctcp.Socket) asynctcp.EventFunc {
	return func(ev error) {
		px.report("upstream", ev)
		if errors.Is(ev, asynctcp.ErrTCPRefused) || errors.Is(ev, asynctcp.ErrDNSError) {
			client.Close()
		}
	}
}

// report prints an event: errors always, the end of a connection with
// -debug.
func (px *proxy) report(side string, ev error) {
	if errors.Is(ev, asynctcp.ErrTCPEOF) {
		if px.cfg.debug {
			px.p.say("--- %s %s closed ---", side, asynctcp.SocketOf(ev).RemoteAddr())
		}
		return
	}
	px.p.say("%s: %v", side, ev)
}

// dumpListener is the listener of -debug: its connections print a hex dump
// of every chunk read from and written to the client.
type dumpListener struct {
	net.Listener
	px *proxy
}

func (l dumpListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return dumpConn{c, l.px}, nil
}

type dumpConn struct {
	net.Conn
	px *proxy
}

func (c dumpConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	if n > 0 {
		c.px.dump(fmt.Sprintf("%s -> %s", c.RemoteAddr(), c.px.cfg.to), p[:n])
	}
	return n, err
}

func (c dumpConn) Write(p []byte) (int, error) {
	n, err := c.Conn.Write(p)
	if n > 0 {
		c.px.dump(fmt.Sprintf("%s -> %s", c.px.cfg.to, c.RemoteAddr()), p[:n])
	}
	return n, err
}

// CloseWrite keeps half-close working through the dump.
func (c dumpConn) CloseWrite() error {
	if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return errors.ErrUnsupported
}

// dump prints a hex dump of data under a header that says where it goes.
func (px *proxy) dump(dir string, data []byte) {
	px.p.say("--- %s (%d bytes) ---\n%s", dir, len(data), strings.TrimSuffix(hex.Dump(data), "\n"))
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
				u, d := px.totals()
				st := px.loop.Stats()
				px.p.say("incoming: %d  outgoing: %d  client->upstream: %s/s  upstream->client: %s/s  queued: %s",
					st.Incoming, st.Outgoing, size(float64(u-up)/secs), size(float64(d-down)/secs), size(float64(px.queued())))
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
