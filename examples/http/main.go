// Command http serves net/http through asynctcp: the server's Accept loop
// gets its connections from asynctcp.NewListener, so each request travels
// over an asynctcp socket (a *asynctcp.Stream, which is a net.Conn) while
// net/http runs unchanged.
//
// Without flags it runs a short demo on a free port of 127.0.0.1: it
// starts the server, makes a few requests to it with net/http's client,
// prints the responses, shuts the server down and exits.
//
//	go run ./examples/http
//
// With -serve it serves on -addr until interrupted (Ctrl-C), then shuts
// down gracefully: running requests finish, idle connections close.
//
//	go run ./examples/http -serve -addr 127.0.0.1:8080
//	curl 'http://127.0.0.1:8080/hello?name=gopher'
//	curl --data-binary 'ping' http://127.0.0.1:8080/echo
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptrace"
	"os"
	"os/signal"
	"strconv"
	"strings"
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
		fmt.Fprintln(os.Stderr, "http:", err)
		os.Exit(1)
	}
}

// run parses args and runs the demo, or with -serve the server until ctx
// ends. Everything it prints goes to out.
func run(ctx context.Context, out io.Writer, args []string) error {
	fs := flag.NewFlagSet("http", flag.ContinueOnError)
	fs.SetOutput(out)
	serve := fs.Bool("serve", false, "keep serving on -addr until interrupted")
	addr := fs.String("addr", "127.0.0.1:8080", "`host:port` to serve on with -serve")
	timeout := fs.Duration("timeout", 10*time.Second, "give up the demo after this long")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected argument %q", fs.Arg(0))
	}
	if *serve {
		return serveHTTP(ctx, out, *addr)
	}
	return demo(ctx, out, *timeout)
}

// connKey is the context key under which the server keeps each request's
// connection.
type connKey struct{}

// newServer returns the HTTP server of both modes: /hello greets, /echo
// sends the request body back.
func newServer() *http.Server {
	mux := http.NewServeMux()
	mux.HandleFunc("/hello", func(w http.ResponseWriter, r *http.Request) {
		name := r.URL.Query().Get("name")
		if name == "" {
			name = "world"
		}
		// The conn is the *asynctcp.Stream that Accept returned.
		conn := r.Context().Value(connKey{})
		fmt.Fprintf(w, "hello, %s (served over a %T from %s)", name, conn, r.RemoteAddr)
	})
	mux.HandleFunc("/echo", func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodPost {
			http.Error(w, "POST a body to echo", http.StatusMethodNotAllowed)
			return
		}
		// An HTTP/1 handler reads the body before it answers.
		body, err := io.ReadAll(r.Body)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		w.Write(body)
	})
	return &http.Server{
		Handler:           mux,
		ReadHeaderTimeout: 10 * time.Second,
		IdleTimeout:       time.Minute,
		ConnContext: func(ctx context.Context, c net.Conn) context.Context {
			return context.WithValue(ctx, connKey{}, c)
		},
	}
}

// demo serves on a free port of 127.0.0.1, on a loop of its own, makes a
// few requests with net/http's client and prints the responses; then it
// shuts the server down and waits for the loop to empty. It gives up after
// timeout.
func demo(ctx context.Context, out io.Writer, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	loop := &asynctcp.Loop{}
	ln, err := loop.NewListener("127.0.0.1", 0)
	if err != nil {
		return err
	}
	fmt.Fprintf(out, "serving on http://%s\n", ln.Addr())
	srv := newServer()
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()

	tr := &http.Transport{}
	client := &http.Client{Transport: tr}
	base := "http://" + ln.Addr().String()
	err = requests(ctx, out, client, base)
	tr.CloseIdleConnections()
	if err != nil && ctx.Err() != nil {
		err = fmt.Errorf("demo did not finish within %v: %w", timeout, err)
	}
	err = errors.Join(err, shutdown(out, srv, served, loop))
	if err == nil {
		fmt.Fprintln(out, "done")
	}
	return err
}

// requests makes the demo's requests and prints each response.
func requests(ctx context.Context, out io.Writer, client *http.Client, base string) error {
	for _, rq := range []struct {
		method, path, body string
	}{
		{http.MethodGet, "/hello?name=gopher", ""},
		{http.MethodPost, "/echo", "ping over asynctcp"},
		{http.MethodGet, "/hello?name=again", ""},
	} {
		reused := false
		trace := &httptrace.ClientTrace{GotConn: func(i httptrace.GotConnInfo) { reused = i.Reused }}
		req, err := http.NewRequestWithContext(httptrace.WithClientTrace(ctx, trace), rq.method, base+rq.path, strings.NewReader(rq.body))
		if err != nil {
			return err
		}
		resp, err := client.Do(req)
		if err != nil {
			return err
		}
		body, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		if err != nil {
			return err
		}
		fmt.Fprintf(out, "%s %s -> %s: %s (connection reused: %v)\n", rq.method, rq.path, resp.Status, body, reused)
		if resp.StatusCode != http.StatusOK {
			return fmt.Errorf("%s %s: %s", rq.method, rq.path, resp.Status)
		}
	}
	return nil
}

// serveHTTP serves on addr until ctx ends, then shuts down.
func serveHTTP(ctx context.Context, out io.Writer, addr string) error {
	host, portStr, err := net.SplitHostPort(addr)
	if err != nil {
		return err
	}
	port, err := strconv.Atoi(portStr)
	if err != nil {
		return fmt.Errorf("bad port in -addr %q", addr)
	}
	loop := &asynctcp.Loop{}
	ln, err := loop.NewListener(host, port)
	if err != nil {
		return err
	}
	fmt.Fprintf(out, "serving on http://%s (Ctrl-C to stop)\n", ln.Addr())
	srv := newServer()
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()
	select {
	case <-ctx.Done():
	case err := <-served: // Serve failed by itself
		srv.Close()
		loop.Exit(err)
		return loop.Wait()
	}
	return shutdown(out, srv, served, loop)
}

// shutdown shuts srv down gracefully (running requests finish, idle
// connections close), giving up after 5 s: then whatever is left is
// closed at once. It returns once the loop is empty.
func shutdown(out io.Writer, srv *http.Server, served <-chan error, loop *asynctcp.Loop) error {
	fmt.Fprintln(out, "shutting down")
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := srv.Shutdown(ctx); err != nil {
		srv.Close()
		loop.Exit(err) // aborts the sockets net/http did not close; Wait returns err
	}
	serr := <-served
	err := loop.Wait()
	if !errors.Is(serr, http.ErrServerClosed) {
		err = errors.Join(err, serr)
	}
	return err
}
