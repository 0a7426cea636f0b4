// Command tcp-client is cl-async's tcp-client example on asynctcp: it
// connects to a server, sends a request, and prints the reply as it
// arrives, until the server closes the connection or stays silent for the
// read timeout.
//
//	go run ./examples/tcp-client -addr example.com:80
//	go run ./examples/tcp-client -addr 127.0.0.1:7000 -data 'ping\n' -timeout 2s
//
// The request (-data, an HTTP/1.0 GET by default) may hold Go escapes such
// as \r, \n and \x00. The read timeout bounds the connect too; a silent
// server is an error only where nothing came back at all.
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
	"strings"
	"sync"
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
		fmt.Fprintln(os.Stderr, "tcp-client:", err)
		os.Exit(1)
	}
}

// run parses args, sends the request and copies the reply to out. It
// returns once the server closed the connection, or stayed silent for the
// timeout after replying; or with an error when the connect failed,
// nothing came back in time, or ctx ended.
func run(ctx context.Context, out io.Writer, args []string) error {
	fs := flag.NewFlagSet("tcp-client", flag.ContinueOnError)
	fs.SetOutput(out)
	addr := fs.String("addr", "localhost:80", "`host:port` of the server")
	data := fs.String("data", "GET / HTTP/1.0\r\n\r\n", "the request to send; Go escapes such as \\r\\n are understood")
	timeout := fs.Duration("timeout", 5*time.Second, "give up when the connect, or the server's reply, stalls this long")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected argument %q", fs.Arg(0))
	}
	host, portStr, err := net.SplitHostPort(*addr)
	if err != nil {
		return fmt.Errorf("-addr: %w", err)
	}
	port, err := strconv.Atoi(portStr)
	if err != nil {
		return fmt.Errorf("-addr: bad port %q", portStr)
	}
	req, err := unescape(*data)
	if err != nil {
		return fmt.Errorf("-data: %w", err)
	}

	var r reply
	loop := &asynctcp.Loop{}
	_, err = loop.Connect(host, port, r.read(out), r.event,
		asynctcp.Data([]byte(req)),
		asynctcp.ReadTimeout(*timeout))
	if err != nil {
		return err
	}
	stop := context.AfterFunc(ctx, func() { loop.Exit(ctx.Err()) })
	err = loop.Wait()
	stop()
	if err != nil {
		return err
	}
	return r.result()
}

// reply follows the connection: how much came back and how it ended.
type reply struct {
	mu  sync.Mutex
	n   int
	err error // the event that ended the connection, unless an EOF
}

// read is the read-cb: it copies each piece of the reply to out as it
// comes. The socket's callbacks run one at a time, so the pieces stay in
// order.
func (r *reply) read(out io.Writer) asynctcp.ReadFunc {
	return func(s *asynctcp.Socket, data []byte) {
		r.mu.Lock()
		r.n += len(data)
		r.mu.Unlock()
		if _, err := out.Write(data); err != nil {
			r.fail(err)
			s.Abort()
		}
	}
}

// event is the event-cb: the server's EOF ends the exchange; any other
// event is kept for result. asynctcp closes the socket after it returns.
func (r *reply) event(ev error) {
	if !errors.Is(ev, asynctcp.ErrTCPEOF) {
		r.fail(ev)
	}
}

func (r *reply) fail(err error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.err == nil {
		r.err = err
	}
}

// result is nil where the server replied and then closed or went quiet;
// a read timeout before any reply is an error.
func (r *reply) result() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.n > 0 && errors.Is(r.err, asynctcp.ErrTCPTimeout) {
		return nil // the server keeps the connection open: the reply is all there is
	}
	return r.err
}

// unescape interprets the Go escapes in s (\r, \n, \t, \\, \xhh, \u...),
// leaving quotes as they are.
func unescape(s string) (string, error) {
	var b strings.Builder
	for len(s) > 0 {
		r, multibyte, tail, err := strconv.UnquoteChar(s, 0)
		if err != nil {
			return "", fmt.Errorf("bad escape in %q", s)
		}
		if multibyte {
			b.WriteRune(r)
		} else {
			b.WriteByte(byte(r)) // a byte escape (\xff) is that byte, not a rune
		}
		s = tail
	}
	return b.String(), nil
}
