//go:build !unix

package asynctcp

import (
	"errors"
	"net"
)

// rawIO is the direct descriptor path of Unix systems; elsewhere newRawIO
// returns nil and every connection goes through net.Conn's Read and Write.
type rawIO struct{}

func newRawIO(net.Conn) *rawIO { return nil }

func (r *rawIO) readSome(int, func(*[]byte, int) (int, bool)) (*[]byte, int, error) {
	return nil, 0, errors.ErrUnsupported
}

func (r *rawIO) tryWrite([]byte) int { return 0 }

// pendingInput cannot peek without a descriptor path: it reports none.
func pendingInput(net.Conn) bool { return false }
