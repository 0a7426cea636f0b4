// Command floor is the least a goroutine-per-connection echo can cost
// while idle, the design asynctcp follows where it cannot park a socket:
// one goroutine per connection, parked on readiness through
// syscall.RawConn.Read, holding no buffer. It reads into a stack array of
// 512 bytes and writes back what it read, so it is a measure of memory,
// not a server to compare throughput with.
package main

import (
	"log"
	"net"
	"syscall"

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
		go echo(c.(*net.TCPConn))
	}
}

func echo(c *net.TCPConn) {
	defer c.Close()
	rc, err := c.SyscallConn()
	if err != nil {
		return
	}
	done := false
	step := func(fd uintptr) bool {
		var b [512]byte
		n, err := syscall.Read(int(fd), b[:])
		switch {
		case err == syscall.EAGAIN:
			return false // wait for readiness, holding nothing
		case err != nil || n == 0:
			done = true
			return true
		}
		if _, err := c.Write(b[:n]); err != nil { // waits for room as net does
			done = true
		}
		return true
	}
	for !done {
		if rc.Read(step) != nil {
			return
		}
	}
}
