// Command net is the baseline echo server: one goroutine per connection,
// a 32 KiB buffer, write back what was read.
package main

import (
	"log"
	"net"

	"github.com/asynctcp/asynctcp/bench/internal/port"
)

func main() {
	ln, err := net.Listen("tcp", port.Addr())
	if err != nil {
		log.Fatal(err)
	}
	for {
		c, err := ln.Accept()
		if err != nil {
			log.Fatal(err)
		}
		go echo(c)
	}
}

func echo(c net.Conn) {
	defer c.Close()
	buf := make([]byte, 32<<10)
	for {
		n, err := c.Read(buf)
		if n > 0 {
			if _, werr := c.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}
