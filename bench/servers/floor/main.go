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
	var rest []byte // what the kernel did not take at once
	step := func(fd uintptr) bool {
		var b [512]byte // on the stack: nothing held while waiting
		n, err := syscall.Read(int(fd), b[:])
		switch {
		case err == syscall.EAGAIN:
			return false // wait for readiness
		case err != nil || n == 0:
			done = true
			return true
		}
		// Written here, so that the goroutine's stack stays at its first
		// 2 KiB: a deeper call (net's Write) would grow it for good.
		p := b[:n]
		for len(p) > 0 {
			m, err := syscall.Write(int(fd), p)
			if err != nil {
				if err == syscall.EAGAIN {
					rest = append(rest[:0], p...)
				} else {
					done = true
				}
				break
			}
			p = p[m:]
		}
		return true
	}
	for !done {
		if rc.Read(step) != nil {
			return
		}
		if len(rest) > 0 {
			if _, err := c.Write(rest); err != nil { // waits for room
				return
			}
			rest = rest[:0]
		}
	}
}
