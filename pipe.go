package asynctcp

import "sync"

// Pipe makes two open sockets a proxy pair, as Node's pipe and cl-async's
// simple-proxy do: every byte read from one is written to the other, in
// order, whatever the two sockets' read modes (a stream-mode socket's
// input buffer is drained into the other). It replaces both sockets'
// read-cb and write-cb; their event-cbs and close-cbs still get their
// events.
//
// Reading from one side is disabled while the other side has high or more
// bytes queued, and enabled again once that falls to low (0 <= low < high,
// else an ErrBadArgument error). So behind a consumer that stops reading,
// each direction holds at most high plus one read (32 KiB) in the pair's
// buffers, or plus two reads where the reading socket is in stream mode
// (its reader fills its input buffer while the relay empties it), and TCP
// flow control slows the producer. When one side ends
// (EOF, an error, or a close), the other is closed gracefully, after what
// it has queued is written.
//
// On a closed socket Pipe returns an ErrSocketClosed event and changes
// neither socket.
func Pipe(a, b *Socket, low, high int) error {
	switch {
	case a == nil || b == nil:
		return badArg("Pipe: nil *Socket")
	case a == b:
		return badArg("Pipe: a socket cannot be piped to itself")
	case low < 0 || low >= high:
		return badArg("Pipe: want 0 <= low < high, got low %d, high %d", low, high)
	}
	for _, s := range []*Socket{a, b} {
		if s.Closed() {
			return closedError(s)
		}
	}
	ab, ba := new(sync.Mutex), new(sync.Mutex)
	a.pipeTo(b, low, high, ab, ba)
	b.pipeTo(a, low, high, ba, ab)
	return nil
}

// pipeInput bounds the input buffer of a piped stream-mode socket, which
// the relay empties into the other socket at once: one read.
const pipeInput = readBufSize

// pipeTo makes src's input go to dst, and src's write-cb enable dst's
// reading, since src's output is what dst read. Each direction has a gate,
// a lock under which its relay compares the destination's output with
// high and disables the source, and the destination's write-cb compares
// it and enables the source: out is the gate of src to dst, in that of
// dst to src. Without it, a write-cb that found the output under high
// could enable the source after a relay raised it past high and disabled
// the source, and let one more read through. Gates come before Socket.mu.
func (src *Socket) pipeTo(dst *Socket, low, high int, out, in *sync.Mutex) {
	src.mu.Lock()
	defer src.mu.Unlock()
	src.read = func(_ *Socket, data []byte) { src.relay(dst, data, high, out) }
	src.sread = nil
	// The relay keeps no slice (WriteData copies what it queues), so the
	// reader may lend it its pooled buffer: no allocation per read. Set
	// after read, under mu, where the reader reads read.
	src.relaying.Store(true)
	// A write-cb queued when the output fell to low may run after it rose
	// to high again: dst then stays disabled until the next one.
	src.write = func(*Socket) {
		in.Lock()
		defer in.Unlock()
		if src.Buffered() < high {
			dst.Enable(EvRead)
		}
	}
	src.lowWater, src.highWater = low, high
	src.onEnd = func() { dst.Close() }
	src.inLimit = min(src.inLimit, pipeInput)
	if src.in.len() > 0 && src.notice != noticeQueued && src.phase == open {
		// Input that arrived before Pipe goes the same way.
		src.notice = noticeQueued
		src.dispatch(src.notify, false)
	}
}

// relay writes what src read (data, or in stream mode src's input buffer)
// to dst, and stops src's reading while dst has high or more bytes queued;
// gate is the direction's (pipeTo).
func (src *Socket) relay(dst *Socket, data []byte, high int, gate *sync.Mutex) {
	chunks := []chunk{{b: data}}
	if data == nil {
		src.mu.Lock()
		chunks = src.in.takeAll()
		src.cond.Broadcast()
		src.mu.Unlock()
	}
	for _, c := range chunks {
		if len(c.b) > 0 && dst.WriteData(c.b) != nil {
			return // dst is closed: its end closes src
		}
		c.release() // WriteData keeps no slice: it copies what it queues
	}
	gate.Lock()
	defer gate.Unlock()
	if dst.Buffered() >= high {
		src.Disable(EvRead)
	}
}
