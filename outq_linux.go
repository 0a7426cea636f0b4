package asynctcp

import (
	"net"
	"syscall"
	"unsafe"
)

// unacked returns how many bytes of conn's output (under TLS, of the TCP
// conn beneath) the kernel holds that the peer has not acknowledged yet:
// sent or not (SIOCOUTQ). It returns 0 where it cannot tell.
func unacked(conn net.Conn) int {
	tcp, ok := beneathTLS(conn).(*net.TCPConn)
	if !ok {
		return 0
	}
	rc, err := tcp.SyscallConn()
	if err != nil {
		return 0
	}
	var n int32
	rc.Control(func(fd uintptr) {
		if _, _, e := syscall.Syscall(syscall.SYS_IOCTL, fd, syscall.TIOCOUTQ, uintptr(unsafe.Pointer(&n))); e != 0 {
			n = 0
		}
	})
	return int(n)
}
