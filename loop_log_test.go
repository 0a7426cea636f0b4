package asynctcp_test

import (
	"encoding/json"
	"log/slog"
	"regexp"
	"strings"
	"testing"

	"github.com/asynctcp/asynctcp"
)

// panickingReadCb is a read-cb that panics, for the stack that the loop logs.
func panickingReadCb(s *asynctcp.Socket, data []byte) {
	panic("read-cb gave up")
}

// logPanic makes a read-cb of a CatchAppErrors loop panic, with a nil event-cb, and returns what the loop's Logger, of handler h, wrote.
func logPanic(t *testing.T, h func(*syncBuffer) slog.Handler) string {
	t.Helper()
	var buf syncBuffer
	l := newTestLoop(t)
	l.CatchAppErrors = true
	l.Logger = slog.New(h(&buf))
	srv, port := listenLocal(t, l, panickingReadCb, nil) // nil event-cb: the panic is logged
	c := dialRaw(t, port)
	c.Write([]byte("x"))
	waitFor(t, readAllAsync(c), "the panicking socket to end")
	srv.Close()
	waitLoop(t, l, waitTimeout)
	return buf.String()
}

// frameOfCb matches the frame of panickingReadCb, its location joined to it.
var frameOfCb = regexp.MustCompile(`^github\.com/asynctcp/asynctcp_test\.panickingReadCb\(.*\) .*loop_log_test\.go:\d+( \+0x[0-9a-f]+)?$`)

// TestLogPanicStackText: with a text handler, the stack of a caught panic
// is logged one frame per attribute, each with its location, not as one
// string full of escaped line breaks.
func TestLogPanicStackText(t *testing.T) {
	t.Parallel()
	out := logPanic(t, func(b *syncBuffer) slog.Handler { return slog.NewTextHandler(b, nil) })
	if !regexp.MustCompile(`msg="asynctcp: callback panicked" panic="read-cb gave up" stack\.0="goroutine \d+ \[running\]:" stack\.1="panic\(`).MatchString(out) {
		t.Errorf("log lacks the panic, the goroutine's header and the panic's frame:\n%s", out)
	}
	if strings.Contains(out, `\n`) || strings.Contains(out, `\t`) {
		t.Errorf("log holds escaped line breaks or tabs:\n%s", out)
	}
	found := false
	for _, m := range regexp.MustCompile(`stack\.\d+="([^"]*)"`).FindAllStringSubmatch(out, -1) {
		found = found || frameOfCb.MatchString(m[1])
	}
	if !found {
		t.Errorf("no attribute of the stack is the read-cb's frame with its location:\n%s", out)
	}
}

// TestLogPanicStackJSON: with a JSON handler, the stack is an object of
// one string per frame, the first the goroutine's header.
func TestLogPanicStackJSON(t *testing.T) {
	t.Parallel()
	out := logPanic(t, func(b *syncBuffer) slog.Handler { return slog.NewJSONHandler(b, nil) })
	var rec struct {
		Msg   string
		Panic string
		Stack map[string]string
	}
	line, _, _ := strings.Cut(out, "\n")
	if err := json.Unmarshal([]byte(line), &rec); err != nil {
		t.Fatalf("log record %q: %v", line, err)
	}
	if rec.Msg != "asynctcp: callback panicked" || rec.Panic != "read-cb gave up" {
		t.Errorf("record has msg %q, panic %q; want the panic logged", rec.Msg, rec.Panic)
	}
	if !strings.HasPrefix(rec.Stack["0"], "goroutine ") || !strings.HasPrefix(rec.Stack["1"], "panic(") {
		t.Errorf("stack starts with %q, %q; want the goroutine's header, then the panic's frame", rec.Stack["0"], rec.Stack["1"])
	}
	found := false
	for _, f := range rec.Stack {
		if strings.ContainsAny(f, "\n\t") {
			t.Errorf("frame %q holds a line break or a tab", f)
		}
		found = found || frameOfCb.MatchString(f)
	}
	if !found {
		t.Errorf("no frame of the stack is the read-cb's with its location: %q", rec.Stack)
	}
}
