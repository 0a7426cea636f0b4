// Command echo-server shows asynctcp at work: an echo server and a client
// talking to it through callbacks, the way cl-async's tcp-server and
// tcp-connect do.
//
// Without flags it runs a short demo on a free port of 127.0.0.1: it starts
// the server, connects a client that sends a greeting, prints the echoed
// reply, closes both and exits.
//
//	go run ./examples/echo-server
//
// With -serve it keeps echoing on -addr until interrupted (Ctrl-C), then
// closes every connection gracefully and shuts the server down.
//
//	go run ./examples/echo-server -serve -addr 127.0.0.1:7000
//	nc 127.0.0.1 7000
package main

import (
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
	"syscall"
	"time"

	"github.com/asynctcp/asynctcp"
)

const greeting = "hello from asynctcp"

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, os.Stdout, os.Args[1:])
	stop()
	if errors.Is(err, flag.ErrHelp) {
		return
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "echo-server:", err)
		os.Exit(1)
	}
}

// run parses args and runs the demo, or with -serve the server until ctx
// ends. Everything it prints goes to out.
func run(ctx context.Context, out io.Writer, args []string) error {
	fs := flag.NewFlagSet("echo-server", flag.ContinueOnError)
	fs.SetOutput(out)
	serve := fs.Bool("serve", false, "keep serving on -addr until interrupted")
	addr := fs.String("addr", "127.0.0.1:7000", "`host:port` to serve on with -serve")
	timeout := fs.Duration("timeout", 10*time.Second, "give up the demo after this long")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected argument %q", fs.Arg(0))
	}
	p := &printer{w: out}
	if *serve {
		return serveEcho(ctx, p, *addr)
	}
	return demo(ctx, p, *timeout)
}

// echo is the server's read-cb: it writes every byte back to the sender.
// WriteData only queues the bytes; the socket's writer sends them.
func echo(p *printer) asynctcp.ReadFunc {
	return func(s *asynctcp.Socket, data []byte) {
		p.say("server echoed %d bytes", len(data))
		if err := s.WriteData(data); err != nil {
			p.say("server: %v", err)
		}
	}
}

// serverEvent is the server's event-cb. An EOF is the client hanging up;
// after it returns, asynctcp closes the socket.
func serverEvent(p *printer) asynctcp.EventFunc {
	return func(ev error) {
		if errors.Is(ev, asynctcp.ErrTCPEOF) {
			p.say("server: client closed the connection")
			return
		}
		p.say("server: %v", ev)
	}
}

// demo runs a server and one client on a loop of their own until the
// client got its greeting back, then closes both and waits for the loop to
// empty. (The package-level Listen and Connect would use DefaultLoop.)
func demo(ctx context.Context, p *printer, timeout time.Duration) error {
	loop := &asynctcp.Loop{}
	srv, err := loop.Listen("127.0.0.1", 0, echo(p), serverEvent(p),
		asynctcp.OnConnect(func(s *asynctcp.Socket) {
			p.say("server accepted %s", s.RemoteAddr())
		}))
	if err != nil {
		return err
	}
	p.say("server listening on %s", srv.Addr())

	var (
		mu    sync.Mutex
		reply []byte
		fail  error
	)
	read := func(s *asynctcp.Socket, data []byte) {
		// TCP is a byte stream: the reply may come in pieces.
		mu.Lock()
		reply = append(reply, data...)
		got := string(reply)
		mu.Unlock()
		if len(got) < len(greeting) {
			return
		}
		p.say("client got reply %q", got)
		p.say("closing client and server")
		s.Close()
		srv.Close()
	}
	event := func(ev error) {
		p.say("client: %v", ev)
		mu.Lock()
		fail = ev
		mu.Unlock()
		srv.Close() // the socket is closed by asynctcp after this returns
	}
	_, err = loop.Connect("127.0.0.1", srv.Addr().(*net.TCPAddr).Port, read, event,
		asynctcp.Data([]byte(greeting)),
		asynctcp.OnConnect(func(s *asynctcp.Socket) {
			p.say("client connected to %s", s.RemoteAddr())
		}),
		asynctcp.OnWrite(func(s *asynctcp.Socket) {
			p.say("client sent %d bytes", len(greeting))
		}))
	if err != nil {
		srv.Close()
		return errors.Join(err, loop.Wait())
	}

	// Exit (cl-async's exit-event-loop) aborts whatever is still open, so
	// Wait returns even if the reply never comes.
	errTimeout := fmt.Errorf("no reply within %v", timeout)
	start := time.Now()
	timer := time.AfterFunc(timeout, func() { loop.Exit(errTimeout) })
	stop := context.AfterFunc(ctx, func() { loop.Exit(ctx.Err()) })
	err = loop.Wait()
	stop()
	// A reply that came after the timeout is late, even where the timer
	// had not fired yet.
	if !timer.Stop() || time.Since(start) > timeout {
		return errTimeout
	}
	if ctx.Err() != nil {
		return ctx.Err()
	}
	if err != nil {
		return err
	}

	mu.Lock()
	defer mu.Unlock()
	if fail != nil {
		return fail
	}
	if string(reply) != greeting {
		return fmt.Errorf("reply %q, want %q", reply, greeting)
	}
	p.say("done")
	return nil
}

// serveEcho echoes on addr until ctx ends, then stops accepting, closes
// every open connection gracefully (queued echoes are still sent) and waits
// for them to finish.
func serveEcho(ctx context.Context, p *printer, addr string) error {
	host, portStr, err := net.SplitHostPort(addr)
	if err != nil {
		return err
	}
	port, err := strconv.Atoi(portStr)
	if err != nil {
		return fmt.Errorf("bad port in -addr %q", addr)
	}

	var live liveSockets
	loop := &asynctcp.Loop{}
	srv, err := loop.Listen(host, port, echo(p), func(ev error) {
		var e *asynctcp.Event
		if errors.As(ev, &e) && e.Socket != nil {
			live.remove(e.Socket)
		}
		serverEvent(p)(ev)
	}, asynctcp.OnConnect(func(s *asynctcp.Socket) {
		p.say("server accepted %s", s.RemoteAddr())
		live.add(s)
	}))
	if err != nil {
		return err
	}
	p.say("echo server listening on %s (Ctrl-C to stop)", srv.Addr())

	<-ctx.Done()
	p.say("shutting down")
	srv.Close()
	live.closeAll()
	sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := srv.Shutdown(sctx); err != nil {
		loop.Exit(err) // abort what did not close in time
	}
	return loop.Wait()
}

// liveSockets tracks the server's open sockets so that a shutdown can close
// them; a socket accepted after closeAll is closed as soon as it shows up.
type liveSockets struct {
	mu      sync.Mutex
	m       map[*asynctcp.Socket]bool
	closing bool
}

func (l *liveSockets) add(s *asynctcp.Socket) {
	l.mu.Lock()
	if l.closing {
		l.mu.Unlock()
		s.Close()
		return
	}
	if l.m == nil {
		l.m = make(map[*asynctcp.Socket]bool)
	}
	l.m[s] = true
	l.mu.Unlock()
}

func (l *liveSockets) remove(s *asynctcp.Socket) {
	l.mu.Lock()
	delete(l.m, s)
	l.mu.Unlock()
}

func (l *liveSockets) closeAll() {
	l.mu.Lock()
	l.closing = true
	m := l.m
	l.m = nil
	l.mu.Unlock()
	for s := range m {
		s.Close() // graceful: flushes queued output first
	}
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
