package asynctcp_test

import (
	"bufio"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"syscall"
	"time"

	"github.com/asynctcp/asynctcp"
)

// Connect returns at once; the connection is made in the background. The
// greeting given with Data goes out once it is up, the connect-cb runs
// before any read-cb, and the read-cb gets the bytes in order, possibly in
// several pieces.
func ExampleConnect() {
	loop := &asynctcp.Loop{}
	srv, err := loop.Listen("127.0.0.1", 0, func(s *asynctcp.Socket, data []byte) {
		s.WriteData(data) // echo
	}, nil)
	if err != nil {
		fmt.Println(err)
		return
	}

	const msg = "hello, echo"
	var reply []byte // touched only by the client's callbacks, which run one at a time
	_, err = loop.Connect("127.0.0.1", srv.Addr().(*net.TCPAddr).Port,
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
	_, err = loop.Connect("127.0.0.1", srv.Addr().(*net.TCPAddr).Port,
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
	srv, err = loop.Listen("127.0.0.1", 0, func(s *asynctcp.Socket, data []byte) {
		s.WriteData(data) // echo
	}, nil)
	if err != nil {
		fmt.Println(err)
		return
	}
	_, err = loop.Connect("127.0.0.1", srv.Addr().(*net.TCPAddr).Port, nil, nil,
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
	_, err = loop.Listen("127.0.0.1", srv.Addr().(*net.TCPAddr).Port, nil, nil)
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

// OnClose gives a socket a close-cb that runs exactly once, however the
// socket ends, after every other callback of the socket: err is nil where
// the application closed it, and the event that ended it otherwise. Done
// is closed once the close-cb has returned, so that here the sockets end
// one after another.
func ExampleOnClose() {
	loop := &asynctcp.Loop{CatchAppErrors: true} // a panicking callback ends its socket
	// The server echoes, but hangs up on "bye".
	srv, err := loop.Listen("127.0.0.1", 0,
		func(s *asynctcp.Socket, data []byte) {
			if string(data) == "bye" {
				s.Close()
				return
			}
			s.WriteData(data)
		},
		func(ev error) {}) // the server's sockets end quietly
	if err != nil {
		fmt.Println(err)
		return
	}
	port := srv.Addr().(*net.TCPAddr).Port

	// A port that nothing listens on.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		fmt.Println(err)
		srv.Close()
		return
	}
	closedPort := ln.Addr().(*net.TCPAddr).Port
	ln.Close()

	// connect runs one client to its end, which its close-cb reports.
	connect := func(way string, port int, read asynctcp.ReadFunc, opts ...asynctcp.Option) {
		opts = append(opts, asynctcp.OnClose(func(s *asynctcp.Socket, err error) {
			var pe *asynctcp.PanicError
			var ev *asynctcp.Event
			switch {
			case err == nil:
				fmt.Printf("%s: closed by the application\n", way)
			case errors.As(err, &pe):
				fmt.Printf("%s: ended by a panic: %v\n", way, pe.Value)
			case errors.As(err, &ev):
				fmt.Printf("%s: ended by %v\n", way, ev.Class)
			}
		}))
		s, err := loop.Connect("127.0.0.1", port, read, func(ev error) {}, opts...)
		if err != nil {
			fmt.Println(err)
			return
		}
		<-s.Done()
	}
	connect("Close", port, nil, asynctcp.OnConnect(func(s *asynctcp.Socket) { s.Close() }))
	connect("Abort", port, nil, asynctcp.OnConnect(func(s *asynctcp.Socket) { s.Abort() }))
	connect("CloseWrite, then the server's EOF", port, nil, asynctcp.AllowHalfOpen(),
		asynctcp.OnConnect(func(s *asynctcp.Socket) { s.CloseWrite() }))
	connect("server hangs up", port, nil, asynctcp.Data([]byte("bye")))
	connect("silent server", port, nil, asynctcp.ReadTimeout(50*time.Millisecond))
	connect("nobody listening", closedPort, nil)
	connect("read-cb panics", port,
		func(s *asynctcp.Socket, data []byte) { panic("cannot parse the reply") },
		asynctcp.Data([]byte("ping")))

	srv.Close()
	loop.Wait()
	// Output:
	// Close: closed by the application
	// Abort: closed by the application
	// CloseWrite, then the server's EOF: closed by the application
	// server hangs up: ended by tcp-eof
	// silent server: ended by tcp-timeout
	// nobody listening: ended by tcp-refused
	// read-cb panics: ended by a panic: cannot parse the reply
}

// SocketOf finds the socket an event is about, so that one event-cb can
// serve many sockets: here the event-cb of a server, which all of its
// sockets share, tells which client hung up. (It is cl-async's tcp-socket
// of an event, Event.Socket, found inside a wrapped error too.)
func ExampleSocketOf() {
	loop := &asynctcp.Loop{}
	hungUp := make(chan struct{}, 1)
	srv, err := loop.Listen("127.0.0.1", 0,
		func(s *asynctcp.Socket, data []byte) {
			name, _ := s.Data().(string) // the client's first bytes name it
			s.SetData(name + string(data))
		},
		func(ev error) {
			s := asynctcp.SocketOf(ev)
			fmt.Printf("%v: %v after %d bytes\n", s.Data(), ev, s.BytesRead())
			hungUp <- struct{}{}
		})
	if err != nil {
		fmt.Println(err)
		return
	}

	for _, name := range []string{"alice", "bob", "carol"} {
		c, err := net.Dial("tcp", srv.Addr().String())
		if err != nil {
			fmt.Println(err)
			break
		}
		c.Write([]byte(name))
		c.Close()
		<-hungUp
	}
	fmt.Println("SocketOf(io.EOF):", asynctcp.SocketOf(io.EOF))

	srv.Close()
	loop.Wait()
	// Output:
	// alice: asynctcp: tcp-eof: end of file after 5 bytes
	// bob: asynctcp: tcp-eof: end of file after 3 bytes
	// carol: asynctcp: tcp-eof: end of file after 5 bytes
	// SocketOf(io.EOF): <nil>
}

// SetTimeouts is set-socket-timeouts. Here the server gives each client
// 100 ms to say something: a silent client's socket gets a tcp-timeout
// event and is closed, which the client sees as an EOF.
func ExampleSocket_SetTimeouts() {
	loop := &asynctcp.Loop{}
	srv, err := loop.Listen("127.0.0.1", 0, nil,
		func(ev error) {
			fmt.Println("server: tcp-timeout:", errors.Is(ev, asynctcp.ErrTCPTimeout))
		},
		asynctcp.OnConnect(func(s *asynctcp.Socket) {
			s.SetTimeouts(100*time.Millisecond, 0) // a read timeout; 0: no write timeout
		}))
	if err != nil {
		fmt.Println(err)
		return
	}

	_, err = loop.Connect("127.0.0.1", srv.Addr().(*net.TCPAddr).Port, nil, func(ev error) {
		fmt.Println("client: tcp-eof:", errors.Is(ev, asynctcp.ErrTCPEOF))
		srv.Close()
	})
	if err != nil {
		fmt.Println(err)
		srv.Close()
	}
	loop.Wait()
	// Output:
	// server: tcp-timeout: true
	// client: tcp-eof: true
}

// Disable is disable-socket. As cl-async's documentation suggests, a
// server that has what it needs from a client can stop reading while it
// works on it, so that its read timeout does not fire meanwhile; Enable
// (enable-socket) resumes reading, and the timeout with it.
func ExampleSocket_Disable() {
	loop := &asynctcp.Loop{}
	var srv *asynctcp.Server
	srv, err := loop.Listen("127.0.0.1", 0,
		func(s *asynctcp.Socket, data []byte) {
			fmt.Printf("server: got %q; working, not reading\n", data)
			s.Disable(asynctcp.EvRead) // no read-cb and no read timeout until Enable
			// The work outlasts the 100 ms read timeout.
			time.AfterFunc(300*time.Millisecond, func() {
				fmt.Println("server: done; replying and reading again")
				if err := s.WriteData([]byte("result")); err != nil {
					fmt.Println("server:", err) // the socket timed out after all
					return
				}
				s.Enable(asynctcp.EvRead)
			})
		},
		func(ev error) { srv.Close() }, // the client hung up (or went quiet)
		asynctcp.ReadTimeout(100*time.Millisecond))
	if err != nil {
		fmt.Println(err)
		return
	}

	var reply []byte
	_, err = loop.Connect("127.0.0.1", srv.Addr().(*net.TCPAddr).Port,
		func(s *asynctcp.Socket, data []byte) {
			if reply = append(reply, data...); len(reply) == len("result") {
				fmt.Printf("client: got %q\n", reply)
				s.Close()
			}
		},
		func(ev error) { fmt.Println("client:", ev) },
		asynctcp.Data([]byte("job")))
	if err != nil {
		fmt.Println(err)
		srv.Close()
	}
	loop.Wait()
	// Output:
	// server: got "job"; working, not reading
	// server: done; replying and reading again
	// client: got "result"
}

// ConnectStream is tcp-connect with :stream t: the socket's input waits in
// a buffer, read through the returned *Stream. A Stream is a net.Conn, so
// bufio, encoding/json or any code written for net.Conn works on it, from
// any goroutine. With a nil read-cb nothing announces the input: the
// program reads when it likes.
func ExampleConnectStream() {
	loop := &asynctcp.Loop{}
	srv, err := loop.Listen("127.0.0.1", 0, func(s *asynctcp.Socket, data []byte) {
		s.WriteData(data) // echo
	}, nil)
	if err != nil {
		fmt.Println(err)
		return
	}
	defer func() {
		srv.Close()
		loop.Wait()
	}()

	st, err := loop.ConnectStream("127.0.0.1", srv.Addr().(*net.TCPAddr).Port, nil, nil)
	if err != nil {
		fmt.Println(err)
		return
	}
	defer st.Close()
	st.SetDeadline(time.Now().Add(5 * time.Second)) // bounds Read and Write, as on any net.Conn

	fmt.Fprintf(st, "hello, %s\n", "stream") // queued at once, sent once connected
	line, err := bufio.NewReader(st).ReadString('\n')
	if err != nil {
		fmt.Println(err)
		return
	}
	fmt.Printf("read %q\n", line)
	// Output:
	// read "hello, stream\n"
}

// NewStream is (make-instance 'async-io-stream :socket s): a Stream over
// any socket. Here a server that keeps its sockets' input in their buffers
// (DontDrainReadBuffer) hands each socket to a goroutine of its own, which
// speaks JSON through the Stream.
func ExampleNewStream() {
	loop := &asynctcp.Loop{}
	served := make(chan struct{})
	srv, err := loop.Listen("127.0.0.1", 0, nil, nil,
		asynctcp.DontDrainReadBuffer(),
		asynctcp.OnConnect(func(s *asynctcp.Socket) {
			// A callback must not wait for input: the goroutine does.
			go func() {
				defer close(served)
				st := asynctcp.NewStream(s)
				defer st.Close() // graceful: the reply is flushed first
				st.SetDeadline(time.Now().Add(5 * time.Second))
				var req struct{ Name string }
				if err := json.NewDecoder(st).Decode(&req); err != nil {
					fmt.Println("server:", err)
					return
				}
				json.NewEncoder(st).Encode(map[string]string{"greeting": "hello, " + req.Name})
			}()
		}))
	if err != nil {
		fmt.Println(err)
		return
	}

	c, err := net.Dial("tcp", srv.Addr().String())
	if err != nil {
		fmt.Println(err)
		srv.Close()
		return
	}
	c.SetDeadline(time.Now().Add(5 * time.Second))
	io.WriteString(c, `{"name": "gopher"}`+"\n")
	reply, err := io.ReadAll(c) // until the server closes
	c.Close()
	fmt.Printf("%s", reply)
	if err != nil {
		fmt.Println(err)
	}

	<-served
	srv.Close()
	loop.Wait()
	// Output:
	// {"greeting":"hello, gopher"}
}

// TLS makes Listen's sockets TLS servers and Connect's socket a TLS
// client. The handshake comes first: the connect-cb runs once it is done,
// and Conn is the *tls.Conn. The client verifies the host given to
// Connect where the config names no ServerName. Callbacks see plain bytes.
func ExampleTLS() {
	// A self-signed certificate for 127.0.0.1, made on the spot, and a
	// client config that trusts it.
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		fmt.Println(err)
		return
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1),
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
		IPAddresses:  []net.IP{net.IPv4(127, 0, 0, 1)},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		fmt.Println(err)
		return
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		fmt.Println(err)
		return
	}
	pool := x509.NewCertPool()
	pool.AddCert(leaf)
	serverConfig := &tls.Config{Certificates: []tls.Certificate{{Certificate: [][]byte{der}, PrivateKey: key}}}
	clientConfig := &tls.Config{RootCAs: pool}

	loop := &asynctcp.Loop{}
	srv, err := loop.Listen("127.0.0.1", 0, func(s *asynctcp.Socket, data []byte) {
		s.WriteData(data) // echo
	}, nil, asynctcp.TLS(serverConfig))
	if err != nil {
		fmt.Println(err)
		return
	}

	const msg = "hello over TLS"
	var reply []byte
	_, err = loop.Connect("127.0.0.1", srv.Addr().(*net.TCPAddr).Port,
		func(s *asynctcp.Socket, data []byte) {
			if reply = append(reply, data...); len(reply) == len(msg) {
				fmt.Printf("reply: %s\n", reply)
				s.Close()
				srv.Close()
			}
		},
		func(ev error) {
			fmt.Println("event:", ev) // a failed handshake would come here
			srv.Close()
		},
		asynctcp.TLS(clientConfig),
		asynctcp.Data([]byte(msg)),
		asynctcp.OnConnect(func(s *asynctcp.Socket) {
			cs := s.Conn().(*tls.Conn).ConnectionState()
			fmt.Println("handshake complete:", cs.HandshakeComplete, tls.VersionName(cs.Version))
		}))
	if err != nil {
		fmt.Println(err)
		srv.Close()
	}
	loop.Wait()
	// Output:
	// handshake complete: true TLS 1.3
	// reply: hello over TLS
}

// NewListener is ListenStream as a net.Listener, so that net/http (or
// grpc, or any accept loop) runs over asynctcp unchanged: each connection
// Accept returns is a *Stream.
func ExampleNewListener() {
	loop := &asynctcp.Loop{}
	ln, err := loop.NewListener("127.0.0.1", 0)
	if err != nil {
		fmt.Println(err)
		return
	}
	hs := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "hello from net/http over asynctcp, %s", r.URL.Query().Get("name"))
	})}
	served := make(chan error, 1)
	go func() { served <- hs.Serve(ln) }()

	client := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	resp, err := client.Get("http://" + ln.Addr().String() + "/?name=gopher")
	if err != nil {
		fmt.Println(err)
	} else {
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		fmt.Println(resp.Status, string(body))
	}

	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	hs.Shutdown(ctx) // closes the listener, then waits for the connections
	fmt.Println("serve:", <-served)
	loop.Wait()
	// Output:
	// 200 OK hello from net/http over asynctcp, gopher
	// serve: http: Server closed
}
