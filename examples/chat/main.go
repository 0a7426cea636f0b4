// Command chat is a broadcast chat server on asynctcp: each line a client
// sends is passed on to every other connected client, prefixed with the
// sender's name (its address, until it sends "/nick NAME").
//
//	go run ./examples/chat -listen 127.0.0.1:7000
//	nc 127.0.0.1 7000    # in two or more terminals
//
// What it shows is that one slow client can neither slow the others nor
// grow the server. A client that stops reading fills its kernel buffers,
// then its socket's output buffer; WriteData never blocks, so the
// broadcast to the others goes on regardless, and MaxBuffered bounds that
// output buffer to -max-behind bytes: a write that would pass the bound
// queues nothing and fails with ErrBufferFull.
//
// The policy for a client that falls that far behind is to disconnect it
// (Socket.Abort, which drops its queued output), not to skip the messages
// it cannot take: a chat with silent holes in it is worse than a dropped
// connection that the client sees and can redial. The server says how far
// behind each was, and counts them. It does not slow the senders down for
// a slow reader either (Disable on the sender, as a Pipe does), which
// would let the slowest client set the pace of the whole room.
//
// Behind that buffer is the kernel's send buffer of the connection, which
// Linux grows on its own up to net.ipv4.tcp_wmem's maximum (4 MiB by
// default) for a client that does not read; -sndbuf fixes it (the
// SendBuffer option: SO_SNDBUF, which Linux doubles for its bookkeeping), so that a slow client costs
// the server about twice -sndbuf in the kernel plus -max-behind bytes.
//
// Input is bounded too: the read-cb frames lines itself, keeping at most
// -max-line bytes of an unfinished line; a longer line is dropped, and its
// sender told. With -read-timeout a client that sends nothing for that
// long is disconnected.
//
// Every socket's end, however it comes (the client quits, resets, times
// out, is cut off, or the server shuts down), runs its close-cb (OnClose)
// exactly once, and that is the one place where a client leaves the room.
// The server prints a line per join and leave. Ctrl-C stops accepting,
// tells the clients, closes them gracefully and cuts off, after -grace,
// those whose output cannot drain.
package main

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"strconv"
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
		fmt.Fprintln(os.Stderr, "chat:", err)
		os.Exit(1)
	}
}

// maxNick bounds a name given with /nick.
const maxNick = 32

// headroom is what -max-behind must leave beyond -max-line, so that one
// message (a name, ": ", a line and "\n") always fits an empty buffer: only
// a client with a backlog is cut off.
const headroom = 256

// config is what the flags say.
type config struct {
	listen      string        // host:port to accept on
	maxBehind   int           // MaxBuffered of each client: beyond it, a client is cut off
	maxLine     int           // longest line accepted, without its newline
	readTimeout time.Duration // cut off a client silent this long (0: never)
	sndbuf      int           // the kernel's send buffer of each client (0: the system's)
	grace       time.Duration // how long clients get to take their last output at shutdown
}

func parse(out io.Writer, args []string) (config, error) {
	var c config
	fs := flag.NewFlagSet("chat", flag.ContinueOnError)
	fs.SetOutput(out)
	fs.StringVar(&c.listen, "listen", "127.0.0.1:7000", "`host:port` to accept clients on")
	fs.IntVar(&c.maxBehind, "max-behind", 256<<10, "disconnect a client that has this many `bytes` of messages queued and cannot take the next one")
	fs.IntVar(&c.maxLine, "max-line", 4<<10, "drop lines longer than this many `bytes`")
	fs.DurationVar(&c.readTimeout, "read-timeout", 0, "disconnect a client that sends nothing for this long (0: never)")
	fs.IntVar(&c.sndbuf, "sndbuf", 0, "the kernel's send buffer of each client, `bytes` (0: the system's, which grows to some MiB)")
	fs.DurationVar(&c.grace, "grace", 5*time.Second, "time clients get to take their last messages once interrupted")
	if err := fs.Parse(args); err != nil {
		return c, err
	}
	switch {
	case fs.NArg() > 0:
		return c, fmt.Errorf("unexpected argument %q", fs.Arg(0))
	case c.maxLine <= 0:
		return c, fmt.Errorf("-max-line %d is not positive", c.maxLine)
	case c.maxBehind < c.maxLine+headroom:
		return c, fmt.Errorf("-max-behind %d is below -max-line + %d: a single message might not fit", c.maxBehind, headroom)
	case c.readTimeout < 0:
		return c, fmt.Errorf("-read-timeout %v is negative", c.readTimeout)
	case c.sndbuf < 0:
		return c, fmt.Errorf("-sndbuf %d is negative", c.sndbuf)
	case c.grace < 0:
		return c, fmt.Errorf("-grace %v is negative", c.grace)
	}
	return c, nil
}

// run parses args and serves the chat until ctx ends. Everything it prints
// goes to out.
func run(ctx context.Context, out io.Writer, args []string) error {
	cfg, err := parse(out, args)
	if err != nil {
		return err
	}
	c := newChat(cfg, out)
	if err := c.listen(); err != nil {
		return err
	}
	return c.serve(ctx)
}

// chat is the server: its room is the set of clients, which each client's
// connect-cb joins and its close-cb leaves.
type chat struct {
	cfg  config
	loop *asynctcp.Loop
	srv  *asynctcp.Server
	p    *printer

	mu      sync.Mutex
	clients map[*asynctcp.Socket]*client
	closing bool // shutting down: a client that comes now is turned away

	cutOff atomic.Int64 // clients disconnected for falling -max-behind behind
	missed atomic.Int64 // messages that did not fit a client's buffer
}

// client is one connection of the room. Its name and line buffer belong
// to its own callbacks, which run one at a time: they need no lock.
type client struct {
	sock    *asynctcp.Socket
	name    string
	partial []byte // the start of a line whose newline has not come yet
	skip    bool   // dropping the rest of a line that grew past -max-line

	why    atomic.Pointer[string] // why the server closed it, if it did
	peak   atomic.Int64           // the most output seen queued on it
	closes atomic.Int32           // close-cb runs: 1 once it has left
}

func newChat(cfg config, out io.Writer) *chat {
	return &chat{
		cfg:     cfg,
		loop:    &asynctcp.Loop{},
		p:       &printer{w: out},
		clients: make(map[*asynctcp.Socket]*client),
	}
}

// listen starts the server on -listen.
func (c *chat) listen() error {
	host, portStr, err := net.SplitHostPort(c.cfg.listen)
	if err != nil {
		return fmt.Errorf("-listen: %w", err)
	}
	port, err := strconv.Atoi(portStr)
	if err != nil || port < 0 || port > 65535 {
		return fmt.Errorf("-listen: bad port in %q", c.cfg.listen)
	}
	opts := []asynctcp.Option{
		asynctcp.OnConnect(c.join),
		asynctcp.OnClose(c.leave),
		asynctcp.MaxBuffered(c.cfg.maxBehind),
		asynctcp.ReadTimeout(c.cfg.readTimeout),
	}
	if c.cfg.sndbuf > 0 {
		// A fixed SO_SNDBUF: the kernel no longer grows it by itself.
		opts = append(opts, asynctcp.SendBuffer(c.cfg.sndbuf))
	}
	c.srv, err = c.loop.Listen(host, port, c.read, c.event, opts...)
	if err != nil {
		return err
	}
	c.p.say("chat listening on %s (Ctrl-C to stop)", c.srv.Addr())
	return nil
}

// serve waits for ctx to end, then stops accepting, says goodbye, closes
// every client gracefully and cuts off, after the grace period, those
// whose output has not drained. It returns once every socket has ended.
func (c *chat) serve(ctx context.Context) error {
	<-ctx.Done()
	c.p.say("shutting down")
	c.srv.Close()
	c.mu.Lock()
	c.closing = true
	room := make([]*client, 0, len(c.clients))
	for _, cl := range c.clients {
		room = append(room, cl)
	}
	c.mu.Unlock()
	for _, cl := range room {
		cl.closeBy("server shutting down")
		cl.sock.WriteData([]byte("* server shutting down\n")) // no room: never mind
		cl.sock.Close()                                       // graceful: flushes first
	}
	gctx, cancel := context.WithTimeout(context.Background(), c.cfg.grace)
	defer cancel()
	if c.srv.Shutdown(gctx) != nil {
		for _, cl := range room {
			cl.sock.Abort() // cuts short a flush to a client that does not read
		}
	}
	err := c.loop.Wait()
	c.p.say("closed; %d client(s) cut off for falling behind", c.cutOff.Load())
	return err
}

// addr is the address the server listens on.
func (c *chat) addr() net.Addr { return c.srv.Addr() }

// clientAt returns the client whose address is remote, or nil.
func (c *chat) clientAt(remote string) *client {
	c.mu.Lock()
	defer c.mu.Unlock()
	for s, cl := range c.clients {
		if s.RemoteAddr().String() == remote {
			return cl
		}
	}
	return nil
}

// join is the connect-cb: the client enters the room.
func (c *chat) join(s *asynctcp.Socket) {
	cl := &client{sock: s, name: s.RemoteAddr().String()}
	s.SetData(cl) // for its read-cb and close-cb, which come after this
	c.mu.Lock()
	if c.closing {
		c.mu.Unlock()
		cl.closeBy("server shutting down")
		s.Close()
		return
	}
	// The welcome goes first, before the room's messages can reach cl.
	c.send(cl, fmt.Appendf(nil, "* welcome %s, with %d other client(s) here; /nick NAME renames you\n", cl.name, len(c.clients)))
	c.clients[s] = cl
	c.mu.Unlock()
	c.p.say("join %s", cl.name)
	c.broadcast(cl, fmt.Appendf(nil, "* %s joined\n", cl.name))
}

// leave is the close-cb: it runs exactly once, however the client went.
func (c *chat) leave(s *asynctcp.Socket, err error) {
	cl, _ := s.Data().(*client)
	if cl == nil {
		return // it never joined
	}
	cl.closes.Add(1)
	c.mu.Lock()
	_, in := c.clients[s]
	delete(c.clients, s)
	closing := c.closing
	c.mu.Unlock()
	if !in {
		return // turned away at shutdown
	}
	why := cl.reason(err)
	c.p.say("leave %s (%s)", cl.name, why)
	if !closing { // at shutdown everyone leaves: "server shutting down" says it all
		c.broadcast(cl, fmt.Appendf(nil, "* %s left (%s)\n", cl.name, why))
	}
}

// event is the event-cb of the server and its clients. A client's end is
// reported by its close-cb, so only the server's own events are printed.
func (c *chat) event(ev error) {
	if asynctcp.SocketOf(ev) == nil {
		c.p.say("server: %v", ev)
	}
}

// read is the read-cb: it frames lines (ended by \n or \r\n) and
// broadcasts them. data is fresh, but only the start of an unfinished line
// is kept, and never more than -max-line bytes of it (and a \r).
func (c *chat) read(s *asynctcp.Socket, data []byte) {
	cl, _ := s.Data().(*client)
	if cl == nil {
		return
	}
	var msgs [][]byte
	for len(data) > 0 {
		i := bytes.IndexByte(data, '\n')
		if i < 0 {
			// (One byte more may be the \r of a \r\n.)
			if !cl.skip && len(cl.partial)+len(data) > c.cfg.maxLine+1 {
				c.tooLong(cl)
			}
			if !cl.skip {
				cl.partial = append(cl.partial, data...)
			}
			break
		}
		line := data[:i]
		data = data[i+1:]
		if cl.skip {
			cl.skip = false // the end of the long line: the next one counts
			continue
		}
		if len(cl.partial)+len(line) > c.cfg.maxLine+1 {
			c.tooLong(cl)
			cl.skip = false
			continue
		}
		if len(cl.partial) > 0 {
			line = append(cl.partial, line...)
			cl.partial = cl.partial[:0]
		}
		line = bytes.TrimSuffix(line, []byte("\r"))
		if len(line) > c.cfg.maxLine {
			c.tooLong(cl)
			cl.skip = false
			continue
		}
		if m := c.message(cl, line); m != nil {
			msgs = append(msgs, m)
		}
	}
	if len(msgs) > 0 {
		c.broadcast(cl, msgs...)
	}
}

// tooLong drops the line cl is sending and tells it so.
func (c *chat) tooLong(cl *client) {
	cl.partial, cl.skip = nil, true
	c.send(cl, fmt.Appendf(nil, "* line longer than %d bytes dropped\n", c.cfg.maxLine))
}

// message turns a line of cl into the message for the others, or handles
// a command and returns nil.
func (c *chat) message(cl *client, line []byte) []byte {
	if len(line) == 0 {
		return nil
	}
	if nick, ok := bytes.CutPrefix(line, []byte("/nick ")); ok {
		nick = bytes.TrimSpace(nick)
		if !goodNick(nick) {
			c.send(cl, fmt.Appendf(nil, "* a name is 1 to %d letters, digits, '-' or '_'\n", maxNick))
			return nil
		}
		old := cl.name
		cl.name = string(nick)
		c.p.say("nick %s is now %s", old, cl.name)
		return fmt.Appendf(nil, "* %s is now %s\n", old, cl.name)
	}
	msg := make([]byte, 0, len(cl.name)+2+len(line)+1)
	msg = append(append(append(append(msg, cl.name...), ": "...), line...), '\n')
	return msg
}

func goodNick(b []byte) bool {
	if len(b) == 0 || len(b) > maxNick {
		return false
	}
	for _, r := range b {
		if !('a' <= r && r <= 'z' || 'A' <= r && r <= 'Z' || '0' <= r && r <= '9' || r == '-' || r == '_') {
			return false
		}
	}
	return true
}

// broadcast queues msgs, in order, on every client of the room but from.
// WriteData never blocks, so a slow client delays nobody; one whose buffer
// cannot take a message is cut off (send).
func (c *chat) broadcast(from *client, msgs ...[]byte) {
	c.mu.Lock()
	room := make([]*client, 0, len(c.clients))
	for _, cl := range c.clients {
		if cl != from {
			room = append(room, cl)
		}
	}
	c.mu.Unlock()
	for _, cl := range room {
		for _, m := range msgs {
			if !c.send(cl, m) {
				break
			}
		}
	}
}

// send queues msg on cl and reports whether it did. Where msg would take
// cl's output past -max-behind, cl is too far behind: it is cut off, and
// its close-cb tells the room.
func (c *chat) send(cl *client, msg []byte) bool {
	err := cl.sock.WriteData(msg)
	switch {
	case err == nil:
		for n := int64(cl.sock.Buffered()); ; {
			p := cl.peak.Load()
			if n <= p || cl.peak.CompareAndSwap(p, n) {
				break
			}
		}
		return true
	case errors.Is(err, asynctcp.ErrBufferFull):
		c.missed.Add(1)
		if cl.closeBy(fmt.Sprintf("too slow: %d bytes behind", cl.sock.Buffered())) {
			c.cutOff.Add(1)
		}
		cl.sock.Abort() // drops its output at once
	}
	return false // or it is closed: its close-cb is on the way
}

// closeBy records why the server closes cl, where nothing else closed it
// first, and reports whether it did.
func (cl *client) closeBy(why string) bool {
	return cl.why.CompareAndSwap(nil, &why)
}

// reason says why cl left, from the event that ended its socket.
func (cl *client) reason(err error) string {
	switch {
	case cl.why.Load() != nil:
		return *cl.why.Load()
	case err == nil:
		return "closed"
	case errors.Is(err, syscall.ECONNRESET):
		return "connection reset"
	case errors.Is(err, asynctcp.ErrTCPEOF):
		return "quit"
	case errors.Is(err, asynctcp.ErrTCPTimeout):
		return "idle too long"
	}
	return err.Error()
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
