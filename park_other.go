//go:build !linux

package asynctcp

import "errors"

// parking is the loop's set of parked sockets (park_linux.go); elsewhere
// no socket parks, and an idle reader hands over to a fresh goroutine
// instead.
type parking struct{}

func (p *parking) addLocked(*Socket) error { return errors.ErrUnsupported }

func (p *parking) removeLocked(*Socket) {}

func (p *parking) wait() {}
