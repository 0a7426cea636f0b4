//go:build linux && (amd64 || 386 || arm)

package asynctcp

// soReusePort is SO_REUSEPORT, which package syscall lacks on these
// platforms.
const soReusePort = 0xf
