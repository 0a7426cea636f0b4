package asynctcp_test

import (
	"fmt"
	"io"
	"net"

	"github.com/asynctcp/asynctcp"
)

// A proxy in a few lines: each accepted socket is piped to a connection to
// the upstream (here a plain net echo server). Pipe carries the bytes both
// ways with back-pressure and closes one side once the other ends.
func ExamplePipe() {
	upstream, _ := net.Listen("tcp", "127.0.0.1:0")
	go func() { // the upstream: echo one connection
		c, err := upstream.Accept()
		if err == nil {
			io.Copy(c, c)
			c.Close()
		}
	}()
	upPort := upstream.Addr().(*net.TCPAddr).Port

	l := &asynctcp.Loop{}
	proxy, err := l.Listen("127.0.0.1", 0, nil, nil, asynctcp.OnConnect(func(client *asynctcp.Socket) {
		up, err := l.Connect("127.0.0.1", upPort, nil, nil)
		if err != nil {
			client.Abort()
			return
		}
		asynctcp.Pipe(client, up, 64<<10, 256<<10)
	}))
	if err != nil {
		fmt.Println(err)
		return
	}

	c, _ := net.Dial("tcp", proxy.Addr().String())
	msg := []byte("hello through the proxy")
	c.Write(msg)
	reply := make([]byte, len(msg))
	io.ReadFull(c, reply)
	fmt.Printf("%s\n", reply)
	c.Close() // the proxy's client socket ends, and Pipe closes the upstream
	proxy.Close()
	upstream.Close()
	l.Wait()
	// Output: hello through the proxy
}
