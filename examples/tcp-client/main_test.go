package main

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/asynctcp/asynctcp"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// timeout bounds every wait of these tests.
const timeout = 10 * time.Second

// syncBuffer is an io.Writer that the test may read while run writes.
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

// server runs a one-connection-at-a-time TCP server on loopback that hands
// each connection to handle; requests gets what handle returns, the
// request it read. It waits for its goroutines when the test ends.
func server(t *testing.T, handle func(net.Conn) string) (addr string, requests <-chan string) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ch := make(chan string, 4)
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.SetDeadline(time.Now().Add(timeout))
			ch <- handle(c)
			c.Close()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		<-done
	})
	return ln.Addr().String(), ch
}

// readRequest reads up to the blank line that ends an HTTP request head.
func readRequest(c net.Conn) string {
	br := bufio.NewReader(c)
	var req strings.Builder
	for {
		line, err := br.ReadString('\n')
		req.WriteString(line)
		if err != nil || line == "\r\n" {
			return req.String()
		}
	}
}

// runClient runs the client with args and a deadline.
func runClient(t *testing.T, ctx context.Context, args ...string) (string, error) {
	t.Helper()
	var out syncBuffer
	done := make(chan error, 1)
	go func() { done <- run(ctx, &out, args) }()
	select {
	case err := <-done:
		return out.String(), err
	case <-time.After(timeout):
		t.Fatalf("run did not return\noutput so far:\n%s", out.String())
	}
	return "", nil
}

const response = "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nhello from the test server\n"

func TestClientPrintsReply(t *testing.T) {
	addr, requests := server(t, func(c net.Conn) string {
		req := readRequest(c)
		io.WriteString(c, response)
		return req
	})
	out, err := runClient(t, context.Background(), "-addr", addr)
	if err != nil {
		t.Fatalf("run: %v\noutput:\n%s", err, out)
	}
	if out != response {
		t.Errorf("output %q, want the reply %q", out, response)
	}
	if req := <-requests; req != "GET / HTTP/1.0\r\n\r\n" {
		t.Errorf("server got %q, want the default request", req)
	}
}

// TestClientPrintsLargeReplyInOrder: a reply in many pieces comes out
// whole and in order.
func TestClientPrintsLargeReplyInOrder(t *testing.T) {
	var big strings.Builder
	for i := 0; big.Len() < 1<<20; i++ {
		big.WriteString(strings.Repeat(string(rune('a'+i%26)), 1+i%97))
		big.WriteByte('\n')
	}
	addr, _ := server(t, func(c net.Conn) string {
		req := readRequest(c)
		io.WriteString(c, big.String())
		return req
	})
	out, err := runClient(t, context.Background(), "-addr", addr)
	if err != nil {
		t.Fatalf("run: %v", err)
	}
	if out != big.String() {
		t.Errorf("output of %d bytes differs from the %d-byte reply", len(out), big.Len())
	}
}

func TestClientSendsDataWithEscapes(t *testing.T) {
	addr, requests := server(t, func(c net.Conn) string {
		b := make([]byte, 7)
		n, _ := io.ReadFull(c, b)
		io.WriteString(c, "pong\n")
		return string(b[:n])
	})
	out, err := runClient(t, context.Background(), "-addr", addr, "-data", `ping\r\n\x00`)
	if err != nil {
		t.Fatalf("run: %v", err)
	}
	if req := <-requests; req != "ping\r\n\x00" {
		t.Errorf("server got %q, want %q", req, "ping\r\n\x00")
	}
	if out != "pong\n" {
		t.Errorf("output %q", out)
	}
}

// TestClientTimesOutWithoutReply: a server that never answers costs one
// read timeout, then run returns the timeout.
func TestClientTimesOutWithoutReply(t *testing.T) {
	addr, _ := server(t, func(c net.Conn) string {
		b, _ := io.ReadAll(c) // until the client gives up
		return string(b)
	})
	start := time.Now()
	out, err := runClient(t, context.Background(), "-addr", addr, "-timeout", "200ms")
	if !errors.Is(err, asynctcp.ErrTCPTimeout) {
		t.Fatalf("run = %v, want a tcp-timeout\noutput:\n%s", err, out)
	}
	if d := time.Since(start); d < 150*time.Millisecond {
		t.Errorf("timed out after %v, before the 200ms timeout", d)
	}
	if out != "" {
		t.Errorf("output %q, want none", out)
	}
}

// TestClientKeepsReplyOfSilentServer: a server that replies and keeps the
// connection open: after the read timeout, run returns the reply and no
// error.
func TestClientKeepsReplyOfSilentServer(t *testing.T) {
	addr, _ := server(t, func(c net.Conn) string {
		req := readRequest(c)
		io.WriteString(c, response)
		io.Copy(io.Discard, c) // keep the connection until the client closes it
		return req
	})
	out, err := runClient(t, context.Background(), "-addr", addr, "-timeout", "200ms")
	if err != nil {
		t.Fatalf("run: %v", err)
	}
	if out != response {
		t.Errorf("output %q, want %q", out, response)
	}
}

func TestClientRefused(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	_, err = runClient(t, context.Background(), "-addr", addr)
	if !errors.Is(err, asynctcp.ErrTCPRefused) {
		t.Fatalf("run = %v, want a tcp-refused", err)
	}
}

func TestClientStopsOnCancel(t *testing.T) {
	accepted := make(chan struct{})
	addr, _ := server(t, func(c net.Conn) string {
		close(accepted)
		b, _ := io.ReadAll(c)
		return string(b)
	})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() {
		select {
		case <-accepted:
			cancel()
		case <-time.After(timeout):
		}
	}()
	_, err := runClient(t, ctx, "-addr", addr)
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("run = %v, want context.Canceled", err)
	}
}

func TestClientFlags(t *testing.T) {
	for _, args := range [][]string{
		{"-addr", "no-port"},
		{"-addr", "127.0.0.1:http"},
		{"-addr", "127.0.0.1:0"},
		{"-data", `bad \q escape`},
		{"extra"},
		{"-no-such-flag"},
	} {
		if err := run(context.Background(), io.Discard, args); err == nil {
			t.Errorf("run %q = nil, want an error", args)
		}
	}
}
