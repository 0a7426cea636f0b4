//go:build unix

package asynctcp

import (
	"errors"
	"io"
	"net"
	"os"
	"syscall"
)

// rawIO reads and writes a TCP or Unix connection's descriptor directly:
// the reader parks on readiness holding no buffer, and takes a pooled one
// only once the descriptor is readable; WriteData writes without blocking
// when nothing is queued. The closures are made once per socket, so that
// neither path allocates.
type rawIO struct {
	rc     syscall.RawConn
	fd     int    // the descriptor, for the loop's parking set
	setGen uint64 // the parking set it was added to (park_linux.go); guarded by the socket's mu
	rbuf   *[]byte
	rmax   int
	rn     int
	rerr   error
	read   func(fd uintptr) bool
	next   func(b *[]byte, n int) (int, bool) // for one readSome: see there
	wp     []byte
	wn     int
	werr   error
	write  func(fd uintptr) bool
}

// newRawIO returns the raw path for conn, or nil where conn is not a plain
// TCP or Unix connection (a wrapper may frame or encrypt what it reads).
func newRawIO(conn net.Conn) *rawIO {
	var sc syscall.Conn
	switch c := conn.(type) {
	case *net.TCPConn:
		sc = c
	case *net.UnixConn:
		sc = c
	default:
		return nil
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return nil
	}
	r := &rawIO{rc: rc}
	if rc.Control(func(fd uintptr) { r.fd = int(fd) }) != nil {
		return nil
	}
	r.read = r.readFD
	r.write = r.writeFD
	return r
}

func (r *rawIO) readFD(fd uintptr) bool {
	b := getBuf()
	var n int
	var err error
	for {
		n, err = syscall.Read(int(fd), (*b)[:r.rmax])
		if err != syscall.EINTR {
			break
		}
	}
	if err == syscall.EAGAIN {
		putBuf(b) // hold no buffer while waiting
		return false
	}
	if err == nil && n > 0 && n <= r.rmax/2 && r.next != nil {
		// The read emptied the kernel's queue far short of its room: the
		// end of a message, after which the next read would find nothing.
		// Hand it on and wait for readiness (see readSome). A read close to
		// its room is taken as part of a stream whose next bytes are on
		// their way: the caller reads again at once and finds them without
		// a trip through the poller (bulk echo measured 3% slower waiting
		// after such reads too).
		room, ok := r.next(b, n)
		if ok {
			r.rmax = room
			return false
		}
		b, n = nil, 0 // the turn goes back to readSome's caller
	}
	r.rbuf, r.rn, r.rerr = b, n, err
	return true
}

// readSome reads at most max bytes into a pooled buffer, which the caller
// returns with putBuf. Where next is not nil, a read that returns at most
// half of what it asked for goes to next instead, which takes the buffer and
// grants the next read's size, and readSome waits for readiness and reads
// on within the same descriptor read: a read that would only find nothing
// (the kernel's queue was empty when the last read returned) is not made,
// and no readiness is lost, as it would be between two descriptor reads
// (each starts by forgetting the readiness seen before it). Where next
// reports false, readSome returns a nil buffer and a nil error: the caller
// asks again what its next read may be.
func (r *rawIO) readSome(max int, next func(b *[]byte, n int) (int, bool)) (*[]byte, int, error) {
	r.rmax, r.next = max, next
	err := r.rc.Read(r.read)
	b, n, rerr := r.rbuf, r.rn, r.rerr
	r.rbuf, r.rerr, r.next = nil, nil, nil
	switch {
	case err != nil:
		if b != nil {
			putBuf(b)
		}
		return nil, 0, asRead(err)
	case b == nil:
		return nil, 0, nil // next handed the turn back
	case rerr != nil:
		putBuf(b)
		return nil, 0, &net.OpError{Op: "read", Net: "tcp", Err: os.NewSyscallError("read", rerr)}
	case n == 0:
		putBuf(b)
		return nil, 0, io.EOF
	}
	return b, n, nil
}

func (r *rawIO) writeFD(fd uintptr) bool {
	for {
		r.wn, r.werr = syscall.Write(int(fd), r.wp)
		if r.werr != syscall.EINTR {
			return true
		}
	}
}

// tryWrite writes what p it can without blocking, and reports how much.
// Errors are left to the writer, which meets them again.
func (r *rawIO) tryWrite(p []byte) int {
	r.wp = p
	err := r.rc.Write(r.write)
	n, werr := r.wn, r.werr
	r.wp, r.werr = nil, nil
	if err != nil || werr != nil || n < 0 {
		return 0
	}
	return n
}

// asRead names a failed readiness wait (net's "raw-read", its internal
// name for this path) as the read it stands for, as a plain conn's Read
// would.
func asRead(err error) error {
	var oe *net.OpError
	if errors.As(err, &oe) && oe.Op == "raw-read" {
		named := *oe
		named.Op = "read"
		return &named
	}
	return err
}

// pendingInput reports whether the kernel holds input of conn (under TLS,
// of the TCP conn beneath) that nobody has read: a peek that does not
// wait (net's descriptors are non-blocking). A conn with no descriptor has
// none that it can tell.
func pendingInput(conn net.Conn) bool {
	sc, ok := beneathTLS(conn).(syscall.Conn)
	if !ok {
		return false
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return false
	}
	n := 0
	var b [1]byte
	rc.Control(func(fd uintptr) {
		n, _, _ = syscall.Recvfrom(int(fd), b[:], syscall.MSG_PEEK)
	})
	return n > 0
}
