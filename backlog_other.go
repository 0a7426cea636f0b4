//go:build !unix

package asynctcp

import "net"

// setBacklog keeps the system's backlog where listen(2) cannot be called
// again on a bound socket.
func setBacklog(ln net.Listener, n int) error { return nil }
