//go:build linux

package asynctcp_test

import (
	"errors"
	"net"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/asynctcp/asynctcp"
)

// emfileChild names the environment variable that makes
// TestAcceptErrorEMFILEBacksOffAndRecovers run its child part.
const emfileChild = "ASYNCTCP_TEST_EMFILE_CHILD"

// Rule 13: an accept failing with EMFILE reaches the server's event-cb as
// ErrTCPAcceptError (with Server and Listener), the server backs off rather
// than spinning, and it accepts again once descriptors free up. The
// descriptor limit is lowered in a child process, so that nothing else
// runs out of descriptors.
func TestAcceptErrorEMFILEBacksOffAndRecovers(t *testing.T) {
	if os.Getenv(emfileChild) == "1" {
		emfileInChild(t)
		return
	}
	cmd := exec.Command(os.Args[0], "-test.run=^TestAcceptErrorEMFILEBacksOffAndRecovers$", "-test.v")
	cmd.Env = append(os.Environ(), emfileChild+"=1")
	done := make(chan struct{})
	var out []byte
	var err error
	go func() {
		out, err = cmd.CombinedOutput()
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(60 * time.Second):
		cmd.Process.Kill()
		<-done
		t.Fatalf("child did not finish within 60s:\n%s", out)
	}
	if err != nil || !strings.Contains(string(out), "--- PASS") {
		t.Fatalf("child failed (%v):\n%s", err, out)
	}
	t.Logf("child:\n%s", out)
}

func emfileInChild(t *testing.T) {
	l := newTestLoop(t)
	acceptErrs := make(chan *asynctcp.Event, 64)
	accepted := make(chan *asynctcp.Socket, 1)
	srv, _ := listenLocal(t, l, func(s *asynctcp.Socket, data []byte) { s.WriteData(data) },
		func(err error) {
			var ev *asynctcp.Event
			if errors.As(err, &ev) && errors.Is(err, asynctcp.ErrTCPAcceptError) {
				signal(acceptErrs, ev)
				return
			}
			t.Errorf("server event %v, want only accept errors", err)
		},
		asynctcp.OnConnect(func(s *asynctcp.Socket) { signal(accepted, s) }))

	// Every free descriptor but one is taken; the client's connection
	// takes that one and completes in the kernel's backlog, so the accept
	// has none left.
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		t.Fatal(err)
	}
	low := lim
	low.Cur = 256
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &low); err != nil {
		t.Fatal(err)
	}
	defer syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim)
	var fillers []*os.File
	defer func() {
		for _, f := range fillers {
			f.Close()
		}
	}()
	for {
		f, err := os.Open(os.DevNull)
		if err != nil {
			if !errors.Is(err, syscall.EMFILE) {
				t.Fatalf("filling the descriptor table: %v", err)
			}
			break
		}
		fillers = append(fillers, f)
	}
	t.Logf("took %d descriptors up to the limit of %d", len(fillers), low.Cur)
	fillers[len(fillers)-1].Close()
	fillers = fillers[:len(fillers)-1]
	client, err := net.Dial("tcp", srv.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()

	ev := waitFor(t, acceptErrs, "an accept error")
	if ev.Server != srv || ev.Listener == nil || ev.Socket != nil {
		t.Errorf("accept error carries Server %p (want %p), Listener %v, Socket %v", ev.Server, srv, ev.Listener, ev.Socket)
	}
	if !errors.Is(ev, syscall.EMFILE) || ev.Code != int(syscall.EMFILE) {
		t.Errorf("accept error %v (code %d), want EMFILE", ev, ev.Code)
	}
	// Back-off: over half a second of EMFILE the server retries a few
	// dozen times at most (5 ms doubling to 1 s), not thousands.
	time.Sleep(500 * time.Millisecond)
	if n := len(acceptErrs) + 1; n > 20 {
		t.Errorf("%d accept errors within 0.5s: the accept loop does not back off", n)
	}

	for _, f := range fillers[len(fillers)-8:] {
		f.Close()
	}
	fillers = fillers[:len(fillers)-8]
	s := waitFor(t, accepted, "the connection to be accepted once descriptors are free")
	if _, err := client.Write([]byte("ping")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 4)
	client.SetReadDeadline(time.Now().Add(waitTimeout))
	if _, err := client.Read(buf); err != nil || string(buf) != "ping" {
		t.Fatalf("echo after recovery: %q, %v", buf, err)
	}
	s.Close()
	srv.Close()
	client.Close()
	waitLoop(t, l, waitTimeout)
}
