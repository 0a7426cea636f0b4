//go:build !(darwin || dragonfly || freebsd || netbsd || openbsd || aix || linux)

package asynctcp

import (
	"errors"
	"syscall"
)

func reusePort(syscall.RawConn) error { return errors.ErrUnsupported }

const haveReusePort = false
