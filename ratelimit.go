package asynctcp

import (
	"errors"
	"fmt"
	"math"
	"sync/atomic"
	"time"

	"golang.org/x/time/rate"
)

// Rate limits are token buckets over bytes (golang.org/x/time/rate), as
// libevent's bufferevent rate limits: the reader waits for tokens before it
// reads and reads no more than it has, the writer likewise before it
// writes. Waiting for tokens happens before a read or write deadline is
// armed, so it never counts as inactivity for the timeouts.

// minChunk is the least a throttled socket waits for, so that a slow rate
// means fewer, larger reads rather than a read per token.
const minChunk = 4 << 10

// maxWait bounds one wait for tokens, so that a socket notices a group's
// new rates (SetRates) soon.
const maxWait = 100 * time.Millisecond

// limit is one token bucket: a socket's own, or one direction of a group's.
type limit struct {
	lim   *rate.Limiter
	group *RateGroup // nil for a socket's own
}

// rateConfig is what ReadRate or WriteRate asked for: each socket gets a
// bucket of its own.
type rateConfig struct{ bytesPerSec, burst int }

// limits returns the buckets of one direction of a socket: its own, if it
// has a rate, and its groups'.
func limits(own rateConfig, groups []*limit) []*limit {
	var lims []*limit
	if own.bytesPerSec > 0 {
		lims = append(lims, &limit{lim: rate.NewLimiter(limitOf(own.bytesPerSec), own.burst)})
	}
	return append(lims, groups...)
}

func limitOf(bytesPerSec int) rate.Limit {
	if bytesPerSec == 0 {
		return rate.Inf
	}
	return rate.Limit(bytesPerSec)
}

func checkRate(bytesPerSec, burst int) error {
	switch {
	case bytesPerSec < 0:
		return fmt.Errorf("negative rate %d", bytesPerSec)
	case bytesPerSec > 0 && burst <= 0:
		return fmt.Errorf("burst %d is not positive", burst)
	}
	return nil
}

// ReadRate caps the socket's reading at bytesPerSec with bursts of up to
// burst bytes: over any t seconds it reads at most burst + bytesPerSec*t
// bytes. A rate of 0 means unlimited.
func ReadRate(bytesPerSec, burst int) Option {
	return Option{name: "ReadRate", where: sockets, err: checkRate(bytesPerSec, burst), apply: func(c *config) {
		c.readRate = rateConfig{bytesPerSec, burst}
	}}
}

// WriteRate caps the socket's writing as ReadRate caps its reading.
func WriteRate(bytesPerSec, burst int) Option {
	return Option{name: "WriteRate", where: sockets, err: checkRate(bytesPerSec, burst), apply: func(c *config) {
		c.writeRate = rateConfig{bytesPerSec, burst}
	}}
}

// RateGroup is libevent's rate-limit group: one budget shared by all its
// sockets, so that together they stay under its rates, each member taking
// at most its share of a burst at a time so that none starves.
type RateGroup struct {
	read    limit
	write   limit
	burst   int
	members atomic.Int64
	err     error // a bad argument to NewRateGroup, reported by InRateGroup
}

// NewRateGroup returns a group whose sockets together read at most
// readBytesPerSec and write at most writeBytesPerSec, with bursts of up to
// burst bytes. A rate of 0 means unlimited. Bad values (a negative rate, or
// a rate without a positive burst) make InRateGroup return an error.
func NewRateGroup(readBytesPerSec, writeBytesPerSec, burst int) *RateGroup {
	g := &RateGroup{burst: burst}
	g.err = errors.Join(checkRate(readBytesPerSec, burst), checkRate(writeBytesPerSec, burst))
	b := max(burst, 1)
	g.read = limit{lim: rate.NewLimiter(limitOf(max(readBytesPerSec, 0)), b), group: g}
	g.write = limit{lim: rate.NewLimiter(limitOf(max(writeBytesPerSec, 0)), b), group: g}
	return g
}

// SetRates changes the rates of a live group; its sockets follow within a
// tenth of a second. 0 means unlimited; a negative rate leaves that
// direction's rate as it was.
func (g *RateGroup) SetRates(readBytesPerSec, writeBytesPerSec int) {
	if g == nil {
		return
	}
	now := time.Now()
	if readBytesPerSec >= 0 {
		g.read.lim.SetLimitAt(now, limitOf(readBytesPerSec))
	}
	if writeBytesPerSec >= 0 {
		g.write.lim.SetLimitAt(now, limitOf(writeBytesPerSec))
	}
}

// InRateGroup makes the socket (each accepted socket, on Listen*) a member
// of g: it shares g's budget, besides its own ReadRate and WriteRate.
func InRateGroup(g *RateGroup) Option {
	err := errors.New("nil *RateGroup")
	if g != nil {
		err = g.err
	}
	return Option{name: "InRateGroup", where: sockets, err: err, apply: func(c *config) { c.groups = append(c.groups, g) }}
}

// quota returns how many bytes (at most want) the limits let through now,
// or, where they let through too few, how long to wait first.
func quota(lims []*limit, want int, now time.Time) (int, time.Duration) {
	n, wait := want, time.Duration(0)
	for _, l := range lims {
		if l.lim.Limit() == rate.Inf {
			continue
		}
		share := l.lim.Burst()
		if g := l.group; g != nil {
			share = max(share/int(max(g.members.Load(), 1)), 1)
		}
		need := min(want, share, minChunk)
		tokens := l.lim.TokensAt(now)
		if tokens < float64(need) {
			secs := (float64(need) - tokens) / float64(l.lim.Limit())
			wait = max(wait, min(time.Duration(math.Ceil(secs*1e9)), maxWait))
			continue
		}
		n = min(n, share, int(tokens))
	}
	if wait > 0 {
		return 0, wait
	}
	return n, 0
}

// retryWait is how long a socket waits where another member of its group
// took the tokens it counted on.
const retryWait = time.Millisecond

// grant is the tokens take reserved for one read or write: n bytes' worth
// from each limiter.
type grant struct {
	n  int
	rs []reservation
}

type reservation struct {
	lim *rate.Limiter
	r   *rate.Reservation
}

// take reserves, from every limit at once, the tokens for up to want bytes
// (quota says how many), so that two sockets of a group never count the
// same tokens; or it says how long to wait first. Without limits it
// grants want and costs nothing.
func take(lims []*limit, want int) (int, grant, time.Duration) {
	if len(lims) == 0 {
		return want, grant{}, 0 // no clock read: this is every read's path
	}
	now := time.Now()
	n, wait := quota(lims, want, now)
	if wait > 0 {
		return 0, grant{}, wait
	}
	g := grant{n: n}
	for _, l := range lims {
		if l.lim.Limit() == rate.Inf {
			continue
		}
		r := l.lim.ReserveN(now, n)
		if !r.OK() || r.DelayFrom(now) > 0 { // taken meanwhile
			r.CancelAt(now)
			g.settle(0)
			return 0, grant{}, retryWait
		}
		g.rs = append(g.rs, reservation{l.lim, r})
	}
	return n, g, 0
}

// settle gives back the tokens of the bytes a read or write reserved and
// did not use.
func (g grant) settle(used int) {
	if len(g.rs) == 0 || used >= g.n {
		return
	}
	now := time.Now()
	for _, res := range g.rs {
		res.r.CancelAt(now)
		if used > 0 {
			res.lim.ReserveN(now, used)
		}
	}
}
