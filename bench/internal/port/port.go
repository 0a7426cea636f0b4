// Package port reads the port an echo server listens on: the first
// command-line argument, else $PORT. Every server listens on 127.0.0.1.
package port

import (
	"fmt"
	"os"
	"strconv"
)

// Addr returns "127.0.0.1:PORT", or exits with a usage message.
func Addr() string {
	return fmt.Sprintf("127.0.0.1:%d", Get())
}

// Get returns the port from os.Args[1] or $PORT, or exits.
func Get() int {
	s := os.Getenv("PORT")
	if len(os.Args) > 1 {
		s = os.Args[1]
	}
	p, err := strconv.Atoi(s)
	if err != nil || p <= 0 || p > 65535 {
		fmt.Fprintf(os.Stderr, "usage: %s PORT (or PORT=n in the environment)\n", os.Args[0])
		os.Exit(2)
	}
	return p
}
