//go:build unix

package asynctcp

import (
	"net"
	"syscall"
)

// setBacklog makes n the listen(2) backlog of ln. The net package listens
// with the system's maximum; listening again on the bound socket changes
// the backlog in place.
func setBacklog(ln net.Listener, n int) error {
	tl, ok := ln.(*net.TCPListener)
	if !ok {
		return nil
	}
	rc, err := tl.SyscallConn()
	if err != nil {
		return err
	}
	var lerr error
	if err := rc.Control(func(fd uintptr) { lerr = syscall.Listen(int(fd), n) }); err != nil {
		return err
	}
	if lerr != nil {
		return &net.OpError{Op: "listen", Net: "tcp", Addr: ln.Addr(), Err: lerr}
	}
	return nil
}
