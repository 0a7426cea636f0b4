//go:build !windows

package asynctcp

import (
	"errors"
	"syscall"
)

// The errno tests of the condition mapping; Windows has its own.

func isReset(err error) bool {
	return errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE) || errors.Is(err, syscall.ECONNABORTED)
}

func isRefused(err error) bool { return errors.Is(err, syscall.ECONNREFUSED) }

func isAddrInUse(err error) bool { return errors.Is(err, syscall.EADDRINUSE) }
