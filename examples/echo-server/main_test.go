package main

import (
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
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

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

func TestDemoPrintsTheEchoedReply(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	var out syncBuffer
	if err := run(ctx, &out, nil); err != nil {
		t.Fatalf("run: %v\noutput:\n%s", err, out.String())
	}
	got := out.String()
	for _, want := range []string{
		"server listening on 127.0.0.1:",
		"client connected to 127.0.0.1:",
		`client got reply "` + greeting + `"`,
		"closing client and server",
		"done",
	} {
		if !strings.Contains(got, want) {
			t.Errorf("output lacks %q:\n%s", want, got)
		}
	}
}

func TestDemoStopsOnTimeoutOrCancel(t *testing.T) {
	canceled, cancel := context.WithCancel(context.Background())
	cancel()
	for _, tc := range []struct {
		name string
		ctx  context.Context
		args []string
		want string
	}{
		{"timeout", context.Background(), []string{"-timeout", "1ns"}, "no reply within 1ns"},
		{"canceled", canceled, nil, context.Canceled.Error()},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var out syncBuffer
			err := run(tc.ctx, &out, tc.args)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("run = %v, want an error containing %q\noutput:\n%s", err, tc.want, out.String())
			}
		})
	}
}

func TestRejectsUnknownFlag(t *testing.T) {
	var out syncBuffer
	if err := run(context.Background(), &out, []string{"-no-such-flag"}); err == nil {
		t.Fatal("run with an unknown flag returned nil")
	}
}

// freeAddr returns a loopback address that nothing listens on right now.
func freeAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	return addr
}

// dialUntil dials addr until it answers or the deadline passes.
func dialUntil(t *testing.T, addr string, deadline time.Time) net.Conn {
	t.Helper()
	for {
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err == nil {
			return c
		}
		if time.Now().After(deadline) {
			t.Fatalf("dial %s: %v", addr, err)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestServeEchoesUntilCanceled(t *testing.T) {
	addr := freeAddr(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var out syncBuffer
	done := make(chan error, 1)
	go func() { done <- run(ctx, &out, []string{"-serve", "-addr", addr}) }()

	deadline := time.Now().Add(10 * time.Second)
	c := dialUntil(t, addr, deadline)
	defer c.Close()
	c.SetDeadline(deadline)

	msg := []byte("ping over asynctcp")
	if _, err := c.Write(msg); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(msg))
	if _, err := io.ReadFull(c, got); err != nil {
		t.Fatalf("read echo: %v\noutput:\n%s", err, out.String())
	}
	if !bytes.Equal(got, msg) {
		t.Fatalf("echo %q, want %q", got, msg)
	}

	// Cancel with the connection still open: the server closes it.
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("run: %v\noutput:\n%s", err, out.String())
		}
	case <-time.After(10 * time.Second):
		t.Fatalf("run did not return after cancel\noutput:\n%s", out.String())
	}
	if n, err := c.Read(got); !errors.Is(err, io.EOF) {
		t.Errorf("after shutdown the client read (%d, %v), want io.EOF", n, err)
	}
	if !strings.Contains(out.String(), "shutting down") {
		t.Errorf("output lacks %q:\n%s", "shutting down", out.String())
	}
}
