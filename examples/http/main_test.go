package main

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"net/http"
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

func TestDemoPrintsTheResponses(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	var out syncBuffer
	if err := run(ctx, &out, nil); err != nil {
		t.Fatalf("run: %v\noutput:\n%s", err, out.String())
	}
	got := out.String()
	for _, want := range []string{
		"serving on http://127.0.0.1:",
		"GET /hello?name=gopher -> 200 OK: hello, gopher (served over a *asynctcp.Stream from 127.0.0.1:",
		"POST /echo -> 200 OK: ping over asynctcp (connection reused: true)",
		"GET /hello?name=again -> 200 OK: hello, again",
		"shutting down",
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
		want error
	}{
		{"timeout", context.Background(), []string{"-timeout", "1ns"}, context.DeadlineExceeded},
		{"canceled", canceled, nil, context.Canceled},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var out syncBuffer
			err := run(tc.ctx, &out, tc.args)
			if !errors.Is(err, tc.want) {
				t.Fatalf("run = %v, want an error wrapping %v\noutput:\n%s", err, tc.want, out.String())
			}
		})
	}
}

func TestRejectsBadArguments(t *testing.T) {
	for _, args := range [][]string{
		{"-no-such-flag"},
		{"extra"},
		{"-serve", "-addr", "no-port"},
		{"-serve", "-addr", "127.0.0.1:http"},
	} {
		var out syncBuffer
		if err := run(context.Background(), &out, args); err == nil {
			t.Errorf("run %q returned nil", args)
		}
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

// getUntil fetches url with client until the server answers or the
// deadline passes.
func getUntil(t *testing.T, client *http.Client, url string, deadline time.Time) string {
	t.Helper()
	for {
		resp, err := client.Get(url)
		if err == nil {
			body, err := io.ReadAll(resp.Body)
			resp.Body.Close()
			if err != nil || resp.StatusCode != http.StatusOK {
				t.Fatalf("GET %s: %s, %q, %v", url, resp.Status, body, err)
			}
			return string(body)
		}
		if time.Now().After(deadline) {
			t.Fatalf("GET %s: %v", url, err)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestServeAnswersUntilCanceled(t *testing.T) {
	addr := freeAddr(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var out syncBuffer
	done := make(chan error, 1)
	go func() { done <- run(ctx, &out, []string{"-serve", "-addr", addr}) }()

	tr := &http.Transport{}
	defer tr.CloseIdleConnections()
	client := &http.Client{Transport: tr, Timeout: 10 * time.Second}
	deadline := time.Now().Add(10 * time.Second)
	if body := getUntil(t, client, "http://"+addr+"/hello?name=test", deadline); !strings.HasPrefix(body, "hello, test (served over a *asynctcp.Stream") {
		t.Errorf("GET /hello: %q", body)
	}
	resp, err := client.Post("http://"+addr+"/echo", "text/plain", strings.NewReader("echo me"))
	if err != nil {
		t.Fatalf("POST /echo: %v", err)
	}
	body, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil || string(body) != "echo me" {
		t.Errorf("POST /echo: %q, %v", body, err)
	}

	// Cancel with the client's keep-alive connection still open: the
	// shutdown closes it.
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("run: %v\noutput:\n%s", err, out.String())
		}
	case <-time.After(10 * time.Second):
		t.Fatalf("run did not return after cancel\noutput:\n%s", out.String())
	}
	if _, err := client.Get("http://" + addr + "/hello"); err == nil {
		t.Error("the server still answers after run returned")
	}
	for _, want := range []string{"serving on http://" + addr, "shutting down"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("output lacks %q:\n%s", want, out.String())
		}
	}
}
