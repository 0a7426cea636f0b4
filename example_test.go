package asynctcp_test

import (
	"errors"
	"fmt"
	"net"
	"syscall"

	"github.com/asynctcp/asynctcp"
)

// exPort is the port a server was bound to (Listen with port 0 picks one).
func exPort(srv *asynctcp.Server) int {
	return srv.Addr().(*net.TCPAddr).Port
}

// exEcho is a read-cb that writes every byte back to the sender.
func exEcho(s *asynctcp.Socket, data []byte) {
	s.WriteData(data)
}

// Connect returns at once; the connection is made in the background. The
// greeting given with Data goes out once it is up, the connect-cb runs
// before any read-cb, and the read-cb gets the bytes in order, possibly in
// several pieces.
func ExampleConnect() {
	loop := &asynctcp.Loop{}
	srv, err := loop.Listen("127.0.0.1", 0, exEcho, nil)
	if err != nil {
		fmt.Println(err)
		return
	}

	const msg = "hello, echo"
	var reply []byte // touched only by the client's callbacks, which run one at a time
	_, err = loop.Connect("127.0.0.1", exPort(srv),
		func(s *asynctcp.Socket, data []byte) {
			reply = append(reply, data...)
			if len(reply) < len(msg) {
				return
			}
			fmt.Printf("reply: %s\n", reply)
			s.Close()
			srv.Close()
		},
		func(ev error) {
			fmt.Println("event:", ev)
			srv.Close()
		},
		asynctcp.Data([]byte(msg)),
		asynctcp.OnConnect(func(s *asynctcp.Socket) {
			fmt.Println("connected")
		}))
	if err != nil {
		fmt.Println(err)
		srv.Close()
	}

	// Like leaving cl-async's with-event-loop: Wait returns once every
	// socket and server of the loop is closed.
	if err := loop.Wait(); err != nil {
		fmt.Println("wait:", err)
	}
	// Output:
	// connected
	// reply: hello, echo
}

// Listen binds at once (port 0 picks a free port) and accepts in the
// background. Each accepted socket gets the server's callbacks: here the
// connect-cb, then the read-cb, then an EOF event when the client hangs up,
// after which asynctcp closes the socket.
func ExampleListen() {
	loop := &asynctcp.Loop{}
	hungUp := make(chan struct{})
	srv, err := loop.Listen("127.0.0.1", 0,
		func(s *asynctcp.Socket, data []byte) {
			fmt.Printf("server read %q\n", data)
		},
		func(ev error) { // a socket gets at most one EOF or error event
			if errors.Is(ev, asynctcp.ErrTCPEOF) {
				fmt.Println("server: client hung up")
			} else {
				fmt.Println("server:", ev)
			}
			close(hungUp)
		},
		asynctcp.OnConnect(func(s *asynctcp.Socket) {
			fmt.Println("server: accepted a connection")
		}))
	if err != nil {
		fmt.Println(err)
		return
	}

	// Any TCP client will do; this one is plain net.
	c, err := net.Dial("tcp", srv.Addr().String())
	if err != nil {
		fmt.Println(err)
		srv.Close()
		return
	}
	c.Write([]byte("hi"))
	c.Close()

	<-hungUp
	srv.Close() // stop accepting; sockets already accepted would stay open
	if err := loop.Wait(); err != nil {
		fmt.Println("wait:", err)
	}
	// Output:
	// server: accepted a connection
	// server read "hi"
	// server: client hung up
}

// WriteData queues bytes and returns at once. Closing right after it could
// race the flush in cl-async; a write-cb runs once the bytes were written
// to the connection, so closing there is the idiom for "send this, then
// hang up", as in cl-async's documentation. (asynctcp's Close also flushes
// queued output first.)
func ExampleSocket_WriteData() {
	loop := &asynctcp.Loop{}
	srv, err := loop.Listen("127.0.0.1", 0,
		func(s *asynctcp.Socket, data []byte) {
			s.WriteData([]byte("invalid command, closing connection"),
				asynctcp.OnWrite(func(s *asynctcp.Socket) {
					s.Close()
				}))
		}, nil)
	if err != nil {
		fmt.Println(err)
		return
	}

	var reply []byte
	_, err = loop.Connect("127.0.0.1", exPort(srv),
		func(s *asynctcp.Socket, data []byte) {
			reply = append(reply, data...)
		},
		func(ev error) {
			// Every byte reached the read-cb before the EOF event.
			if errors.Is(ev, asynctcp.ErrTCPEOF) {
				fmt.Printf("client got %q, then EOF\n", reply)
			} else {
				fmt.Println("client:", ev)
			}
			srv.Close()
		},
		asynctcp.Data([]byte("frobnicate")))
	if err != nil {
		fmt.Println(err)
		srv.Close()
	}

	if err := loop.Wait(); err != nil {
		fmt.Println("wait:", err)
	}
	// Output:
	// client got "invalid command, closing connection", then EOF
}

// A Loop stands for cl-async's event loop. Wait blocks until the loop has
// nothing open, like the end of with-event-loop; Exit, like
// exit-event-loop, aborts everything the loop has open and makes Wait
// return the given error. The loop can be used again afterwards.
func ExampleLoop() {
	loop := &asynctcp.Loop{}

	// Wait returns nil once everything is closed.
	srv, err := loop.Listen("127.0.0.1", 0, nil, nil)
	if err != nil {
		fmt.Println(err)
		return
	}
	fmt.Println("servers open:", loop.Stats().Servers)
	srv.Close()
	fmt.Println("wait:", loop.Wait())

	// Exit ends a loop that would otherwise run on: this server and its
	// connection stay open until Exit aborts them.
	srv, err = loop.Listen("127.0.0.1", 0, exEcho, nil)
	if err != nil {
		fmt.Println(err)
		return
	}
	_, err = loop.Connect("127.0.0.1", exPort(srv), nil, nil,
		asynctcp.OnConnect(func(s *asynctcp.Socket) {
			st := loop.Stats()
			fmt.Println("connected; outgoing:", st.Outgoing, "servers:", st.Servers)
			loop.Exit(errors.New("done for today"))
		}))
	if err != nil {
		fmt.Println(err)
		loop.Exit(err)
	}
	fmt.Println("wait:", loop.Wait())

	st := loop.Stats()
	fmt.Println("open after Wait:", st.Incoming+st.Outgoing+st.Servers, srv.Closed())
	// Output:
	// servers open: 1
	// wait: <nil>
	// connected; outgoing: 1 servers: 1
	// wait: done for today
	// open after Wait: 0 true
}

// Events reach the event-cb as *Event values whose Class is one of the
// Err* classes. errors.Is follows cl-async's condition hierarchy, so a
// handler can ask for a class or any of its ancestors; the net package's
// cause stays wrapped, so syscall errnos match as well.
func ExampleEvent() {
	// A port that nothing listens on.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		fmt.Println(err)
		return
	}
	port := ln.Addr().(*net.TCPAddr).Port
	ln.Close()

	loop := &asynctcp.Loop{}
	s, err := loop.Connect("127.0.0.1", port, nil, func(ev error) {
		fmt.Println("tcp-refused:", errors.Is(ev, asynctcp.ErrTCPRefused))
		fmt.Println("tcp-error:", errors.Is(ev, asynctcp.ErrTCPError))
		fmt.Println("connection-error:", errors.Is(ev, asynctcp.ErrConnectionError))
		fmt.Println("connection-info:", errors.Is(ev, asynctcp.ErrConnectionInfo))
		fmt.Println("tcp-eof:", errors.Is(ev, asynctcp.ErrTCPEOF))
		fmt.Println("ECONNREFUSED:", errors.Is(ev, syscall.ECONNREFUSED))
		var e *asynctcp.Event
		if errors.As(ev, &e) {
			fmt.Println("class is tcp-refused:", e.Class == asynctcp.ErrTCPRefused)
			fmt.Println("event names its socket:", e.Socket != nil)
		}
	})
	if err != nil {
		fmt.Println(err)
		return
	}
	loop.Wait()
	fmt.Println("closed after the event-cb:", s.Closed())

	// Errors returned by calls are *Events too: a bind to a busy port.
	srv, err := loop.Listen("127.0.0.1", 0, nil, nil)
	if err != nil {
		fmt.Println(err)
		return
	}
	_, err = loop.Listen("127.0.0.1", exPort(srv), nil, nil)
	fmt.Println("address-in-use:", errors.Is(err, asynctcp.ErrAddressInUse))
	fmt.Println("EADDRINUSE:", errors.Is(err, syscall.EADDRINUSE))
	srv.Close()
	loop.Wait()
	// Output:
	// tcp-refused: true
	// tcp-error: true
	// connection-error: true
	// connection-info: true
	// tcp-eof: false
	// ECONNREFUSED: true
	// class is tcp-refused: true
	// event names its socket: true
	// closed after the event-cb: true
	// address-in-use: true
	// EADDRINUSE: true
}
