//go:build darwin || dragonfly || freebsd || netbsd || openbsd || aix || (linux && !(amd64 || 386 || arm))

package asynctcp

import "syscall"

const soReusePort = syscall.SO_REUSEPORT
