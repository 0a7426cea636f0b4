//go:build darwin || dragonfly || freebsd || netbsd || openbsd || aix || linux

package asynctcp

import "syscall"

// reusePort sets SO_REUSEPORT on a socket before it binds.
func reusePort(c syscall.RawConn) error {
	var err error
	if cerr := c.Control(func(fd uintptr) {
		err = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, soReusePort, 1)
	}); cerr != nil {
		return cerr
	}
	return err
}

const haveReusePort = true
