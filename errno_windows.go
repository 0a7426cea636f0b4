package asynctcp

import (
	"errors"
	"syscall"
)

// Winsock's error numbers, which syscall names only in part.
const (
	wsaEADDRINUSE          syscall.Errno = 10048
	wsaECONNREFUSED        syscall.Errno = 10061
	errorConnectionRefused syscall.Errno = 1225 // ERROR_CONNECTION_REFUSED
)

func isReset(err error) bool {
	return errors.Is(err, syscall.WSAECONNRESET) || errors.Is(err, syscall.WSAECONNABORTED) ||
		errors.Is(err, syscall.ERROR_NETNAME_DELETED) || errors.Is(err, syscall.EPIPE)
}

func isRefused(err error) bool {
	return errors.Is(err, wsaECONNREFUSED) || errors.Is(err, errorConnectionRefused)
}

func isAddrInUse(err error) bool { return errors.Is(err, wsaEADDRINUSE) }
