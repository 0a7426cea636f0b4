package asynctcp_test

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"math/rand"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/asynctcp/asynctcp"
)

// ppProxy starts a proxy on l: each connection it accepts (socket a) is
// piped to a new connection to upstream (socket b). Both sockets of each
// pair are sent on pairs once piped.
func ppProxy(t *testing.T, l *asynctcp.Loop, upstream int, streamA, streamB bool, low, high int) (srv *asynctcp.Server, port int, pairs <-chan [2]*asynctcp.Socket) {
	t.Helper()
	ch := make(chan [2]*asynctcp.Socket, 16)
	onConnect := asynctcp.OnConnect(func(a *asynctcp.Socket) {
		var b *asynctcp.Socket
		var err error
		if streamB {
			var st *asynctcp.Stream
			st, err = l.ConnectStream("127.0.0.1", upstream, nil, func(error) {})
			if err == nil {
				b = st.Socket()
			}
		} else {
			b, err = l.Connect("127.0.0.1", upstream, nil, func(error) {})
		}
		if err != nil {
			t.Errorf("proxy: Connect upstream: %v", err)
			a.Abort()
			return
		}
		if err := asynctcp.Pipe(a, b, low, high); err != nil {
			t.Errorf("Pipe: %v", err)
		}
		ch <- [2]*asynctcp.Socket{a, b}
	})
	var err error
	if streamA {
		srv, err = l.ListenStream("127.0.0.1", 0, nil, func(error) {}, onConnect)
	} else {
		srv, err = l.Listen("127.0.0.1", 0, nil, func(error) {}, onConnect)
	}
	if err != nil {
		t.Fatalf("proxy Listen: %v", err)
	}
	t.Cleanup(func() { srv.Close() })
	return srv, portOf(t, srv.Addr()), ch
}

// Every byte goes through a piped pair, both ways at once, in order, in
// random chunks, whatever the read modes of the two sockets; when the
// client closes, the upstream sees EOF.
func TestPipeRelaysEveryByteBothWays(t *testing.T) {
	const size = 4 << 20
	for _, modes := range [][2]bool{{false, false}, {true, false}, {false, true}, {true, true}} {
		t.Run(fmt.Sprintf("streamA=%v/streamB=%v", modes[0], modes[1]), func(t *testing.T) {
			l := newTestLoop(t)
			up, upPort := listenRaw(t)
			srv, port, pairs := ppProxy(t, l, upPort, modes[0], modes[1], 32<<10, 256<<10)
			client := dialRaw(t, port)
			server := acceptRaw(t, up)
			waitFor(t, pairs, "the piped pair")
			rng := rand.New(rand.NewSource(int64(len(t.Name()))))
			fromClient, fromServer := make([]byte, size), make([]byte, size)
			rng.Read(fromClient)
			rng.Read(fromServer)
			client.SetWriteDeadline(time.Now().Add(waitTimeout))
			server.SetWriteDeadline(time.Now().Add(waitTimeout))
			sentC := sendInRandomChunks(client, fromClient, 1)
			sentS := sendInRandomChunks(server, fromServer, 2)
			gotS := ftReadAsync(server, size, waitTimeout)
			gotC := ftReadAsync(client, size, waitTimeout)
			for _, x := range []struct {
				what string
				got  <-chan readResult
				want []byte
			}{{"the server", gotS, fromClient}, {"the client", gotC, fromServer}} {
				r := waitFor(t, x.got, x.what+"'s read")
				if r.err != nil {
					t.Errorf("%s read %d bytes, then %v", x.what, len(r.data), r.err)
				}
				if !bytes.Equal(r.data, x.want) {
					t.Errorf("%s read %d bytes of %d, first difference at %d", x.what, len(r.data), len(x.want), firstDiff(r.data, x.want))
				}
			}
			if err := waitFor(t, sentC, "the client's writes"); err != nil {
				t.Errorf("client write: %v", err)
			}
			if err := waitFor(t, sentS, "the server's writes"); err != nil {
				t.Errorf("server write: %v", err)
			}
			client.Close()
			if r := waitFor(t, readAllAsync(server), "the upstream's EOF"); r.err != nil || len(r.data) != 0 {
				t.Errorf("after the client closed, the upstream read %d more bytes, then %v; want EOF", len(r.data), r.err)
			}
			server.Close()
			srv.Close()
			waitLoopClean(t, l, waitTimeout)
		})
	}
}

// Behind a consumer that stops reading, each direction of a piped pair
// holds at most high plus 128 KiB, however much the producer sends; once
// the consumer reads again every byte arrives.
func TestPipeBoundsMemoryBehindAStalledConsumer(t *testing.T) {
	const high, size = 256 << 10, 32 << 20
	for _, streamA := range []bool{false, true} {
		t.Run(fmt.Sprintf("streamA=%v", streamA), func(t *testing.T) {
			l := newTestLoop(t)
			up, upPort := listenRaw(t)
			srv, port, pairs := ppProxy(t, l, upPort, streamA, false, 64<<10, high)
			client := dialRaw(t, port)
			server := acceptRaw(t, up) // it does not read yet
			pair := waitFor(t, pairs, "the piped pair")
			b := pair[1]
			data := pattern(size)
			sent := make(chan error, 1)
			go func() {
				client.SetWriteDeadline(time.Now().Add(waitTimeout))
				_, err := client.Write(data)
				sent <- err
			}()
			// Watch the pair while the producer pushes against the
			// stalled consumer; the producer blocks in TCP flow control.
			in := asynctcp.NewStream(pair[0]) // a's input buffer, in stream mode
			peak := 0
			deadline := time.Now().Add(time.Second)
			for time.Now().Before(deadline) {
				peak = max(peak, b.Buffered()+in.Buffered())
				time.Sleep(2 * time.Millisecond)
			}
			t.Logf("stalled consumer: the pair held at most %d bytes in that direction (high %d), %d read from the producer so far", peak, high, pair[0].BytesRead())
			if peak > high+128<<10 {
				t.Errorf("the pair held %d bytes towards the stalled consumer, want at most high + 128 KiB = %d", peak, high+128<<10)
			}
			if got := pair[0].BytesRead(); got >= size {
				t.Errorf("the proxy read all %d bytes from the producer while the consumer was stalled", got)
			}
			r := waitFor(t, ftReadAsync(server, size, waitTimeout), "every byte once the consumer reads")
			if r.err != nil || !bytes.Equal(r.data, data) {
				t.Errorf("the consumer read %d bytes of %d (%v), first difference at %d", len(r.data), size, r.err, firstDiff(r.data, data))
			}
			if err := waitFor(t, sent, "the producer's write"); err != nil {
				t.Errorf("producer write: %v", err)
			}
			client.Close()
			server.Close()
			srv.Close()
			waitLoopClean(t, l, waitTimeout)
		})
	}
}

// When one side ends, the other is closed gracefully after what it has
// queued is written: an upstream that answers and closes gets its answer
// through to the client before the client sees EOF.
func TestPipeEndClosesTheOtherSideAfterItsOutput(t *testing.T) {
	l := newTestLoop(t)
	up, upPort := listenRaw(t)
	srv, port, pairs := ppProxy(t, l, upPort, false, false, 0, 64<<10)
	client := dialRaw(t, port)
	server := acceptRaw(t, up)
	pair := waitFor(t, pairs, "the piped pair")
	answer := pattern(2 << 20)
	if _, err := server.Write(answer); err != nil {
		t.Fatalf("server write: %v", err)
	}
	server.Close()
	r := waitFor(t, readAllAsync(client), "the answer, then EOF")
	if r.err != nil || !bytes.Equal(r.data, answer) {
		t.Errorf("client read %d bytes of %d before EOF (%v)", len(r.data), len(answer), r.err)
	}
	for i, s := range pair {
		waitFor(t, s.Done(), fmt.Sprintf("socket %d of the pair to end", i))
	}
	client.Close()
	srv.Close()
	waitLoopClean(t, l, waitTimeout)
}

// Pipe refuses bad arguments with ErrBadArgument and closed sockets with
// ErrSocketClosed, changing neither socket.
func TestPipeArguments(t *testing.T) {
	l := newTestLoop(t)
	ln, port := listenRaw(t)
	a := connectLocal(t, l, port, nil, func(error) {})
	pa := acceptRaw(t, ln)
	b := connectLocal(t, l, port, nil, func(error) {})
	pb := acceptRaw(t, ln)
	defer pa.Close()
	defer pb.Close()
	for _, c := range []struct {
		name      string
		a, b      *asynctcp.Socket
		low, high int
	}{
		{"nil a", nil, b, 0, 1},
		{"nil b", a, nil, 0, 1},
		{"same socket", a, a, 0, 1},
		{"low == high", a, b, 8, 8},
		{"low > high", a, b, 9, 8},
		{"negative low", a, b, -1, 8},
	} {
		err := asynctcp.Pipe(c.a, c.b, c.low, c.high)
		if !errors.Is(err, asynctcp.ErrBadArgument) {
			t.Errorf("Pipe(%s) = %v, want an ErrBadArgument error", c.name, err)
		}
	}
	b.Close()
	if err := asynctcp.Pipe(a, b, 0, 8); !errors.Is(err, asynctcp.ErrSocketClosed) {
		t.Errorf("Pipe with a closed socket = %v, want an ErrSocketClosed error", err)
	}
	// a is still its own: its input reaches no one, and it still echoes
	// through its own callbacks after a refused Pipe.
	if _, err := pa.Write([]byte("x")); err != nil {
		t.Fatalf("peer write: %v", err)
	}
	a.Close()
	io.Copy(io.Discard, pb)
	waitLoopClean(t, l, waitTimeout)
}

// Many piped pairs at once, Serial and not, ended in every way (the
// client or the upstream closes, resets, or Exit comes): no pair hangs,
// every close-cb runs once, and nothing is left behind.
func TestPipeStorm(t *testing.T) {
	const pairs = 100
	for _, serial := range []bool{false, true} {
		t.Run(fmt.Sprintf("serial=%v", serial), func(t *testing.T) {
			l := newTestLoop(t)
			l.Serial = serial
			var mu sync.Mutex
			closes := map[*asynctcp.Socket]int{}
			onClose := asynctcp.OnClose(func(s *asynctcp.Socket, _ error) {
				mu.Lock()
				closes[s]++
				mu.Unlock()
			})
			up, upPort := listenRaw(t)
			upstreams := make(chan net.Conn, pairs)
			go func() {
				for {
					c, err := up.Accept()
					if err != nil {
						return
					}
					upstreams <- c
				}
			}()
			srv, err := l.Listen("127.0.0.1", 0, nil, func(error) {}, onClose, asynctcp.OnConnect(func(a *asynctcp.Socket) {
				b, err := l.Connect("127.0.0.1", upPort, nil, func(error) {}, onClose)
				if err != nil {
					a.Abort()
					return
				}
				asynctcp.Pipe(a, b, 1<<10, 8<<10)
			}))
			if err != nil {
				t.Fatalf("Listen: %v", err)
			}
			port := portOf(t, srv.Addr())
			var wg sync.WaitGroup
			for i := range pairs {
				c := dialRaw(t, port)
				u := waitFor(t, upstreams, "an upstream connection").(*net.TCPConn)
				wg.Add(1)
				go func() {
					defer wg.Done()
					defer c.Close()
					defer u.Close()
					c.Write(pattern(64 << 10))
					u.Write(pattern(64 << 10))
					switch i % 4 {
					case 0:
						c.Close()
					case 1:
						u.Close()
					case 2:
						c.SetLinger(0)
						c.Close()
					default:
						u.SetLinger(0)
						u.Close()
					}
					io.Copy(io.Discard, c)
					io.Copy(io.Discard, u)
				}()
			}
			waitGroup(t, &wg, "every pair to end")
			srv.Close()
			up.Close()
			waitLoopClean(t, l, 30*time.Second)
			mu.Lock()
			defer mu.Unlock()
			if len(closes) != 2*pairs {
				t.Errorf("%d sockets ran a close-cb, want %d", len(closes), 2*pairs)
			}
			for _, n := range closes {
				if n != 1 {
					t.Fatalf("a socket ran its close-cb %d times", n)
				}
			}
		})
	}
}

// A piped socket's relay reads into the pooled buffer, since it keeps no
// slice. A read-cb set afterwards through WriteData's OnRead may keep its
// slices again: each must still hold what was read into it.
func TestPipeThenOnReadGetsFreshSlices(t *testing.T) {
	l := newTestLoop(t)
	lnA, portA := listenRaw(t)
	lnB, portB := listenRaw(t)
	a := connectLocal(t, l, portA, nil, func(error) {})
	b := connectLocal(t, l, portB, nil, func(error) {})
	peerA, peerB := acceptRaw(t, lnA), acceptRaw(t, lnB)
	if err := asynctcp.Pipe(a, b, 0, 64<<10); err != nil {
		t.Fatalf("Pipe: %v", err)
	}
	// One byte through the pipe, so that the relay has used the buffer.
	peerA.Write([]byte("x"))
	if got := make([]byte, 1); func() error { _, err := io.ReadFull(peerB, got); return err }() != nil || got[0] != 'x' {
		t.Fatalf("the relay did not carry a byte")
	}

	got := make(chan []byte, 16)
	if err := a.WriteData(nil, asynctcp.OnRead(func(_ *asynctcp.Socket, data []byte) { got <- data })); err != nil {
		t.Fatalf("WriteData(OnRead): %v", err)
	}
	var kept [][]byte
	want := 0
	for i := 0; i < 8; i++ {
		msg := bytes.Repeat([]byte{byte('a' + i)}, 100)
		if _, err := peerA.Write(msg); err != nil {
			t.Fatalf("write: %v", err)
		}
		want += len(msg)
		for n := 0; n < want; {
			d := waitFor(t, got, fmt.Sprintf("chunk %d at the new read-cb", i))
			kept = append(kept, d)
			n = 0
			for _, k := range kept {
				n += len(k)
			}
		}
	}
	all := bytes.Join(kept, nil)
	for i := 0; i < 8; i++ {
		if c := all[i*100 : (i+1)*100]; !bytes.Equal(c, bytes.Repeat([]byte{byte('a' + i)}, 100)) {
			t.Fatalf("kept slice of chunk %d was overwritten: %q", i, c[:10])
		}
	}
}
