//go:build !unix

package asynctcp

import "net"

// rawIO is the direct descriptor path of Unix systems; elsewhere every
// connection goes through net.Conn's Read and Write.
type rawIO struct{}

func newRawIO(net.Conn) *rawIO { return nil }

func (r *rawIO) readSome(int) (*[]byte, int, error) { panic("asynctcp: no raw reads on this system") }

func (r *rawIO) tryWrite([]byte) int { return 0 }
