package asynctcp

import (
	"context"
)

// A socket's end, as the application sees it: Context is cancelled as soon
// as the socket starts to close (startClosingLocked), the close-cb runs
// once every goroutine of the socket has ended (reportEnd, on the finisher),
// and Done is closed after it. Loop.Exit cancels the Context and closes
// Done, but runs no close-cb.

// watchers are the Done channel and the Context of a socket, made only for
// sockets whose application asks for them.
type watchers struct {
	done   chan struct{}
	ctx    context.Context
	cancel context.CancelCauseFunc
}

// watchersLocked returns the socket's watchers, made on first use. mu is
// held.
func (s *Socket) watchersLocked() *watchers {
	if s.watch == nil {
		ctx, cancel := context.WithCancelCause(context.Background())
		s.watch = &watchers{done: make(chan struct{}), ctx: ctx, cancel: cancel}
		if s.closing != nil {
			cancel(s.closing)
		}
		if s.fin {
			close(s.watch.done)
		}
	}
	return s.watch
}

// startClosingLocked records why the socket starts to close, once, and
// cancels its Context with that cause. mu is held.
func (s *Socket) startClosingLocked(cause error) {
	if s.closing != nil {
		return
	}
	s.closing = cause
	if s.watch != nil {
		s.watch.cancel(cause)
	}
}

// reportEnd runs on the finisher once every goroutine of the socket has
// ended: the close-cb, unless Loop.Exit ended the socket or the
// application never saw it; then Done closes.
func (s *Socket) reportEnd() {
	s.mu.Lock()
	cb, err := s.onClose, s.endErr
	run := cb != nil && !s.exited && s.touched
	end := s.onEnd
	s.startClosingLocked(closedError(s)) // a socket that never came up
	s.mu.Unlock()
	if end != nil {
		end()
	}
	if run {
		held := s.loop.enter()
		if pe := s.loop.call(func() { cb(s, err) }, s); pe != nil {
			s.loop.handle(pe)
		}
		s.loop.leave(held)
	}
	s.mu.Lock()
	s.fin = true
	if s.watch != nil {
		close(s.watch.done)
	}
	s.mu.Unlock()
}

// Done returns a channel that is closed once the socket has fully closed:
// its connection is closed, its goroutines have ended and its close-cb
// (OnClose), if any, has returned. Loop.Exit closes it too. A callback may
// call Done but should not wait on it: on a Serial loop the close-cb it
// would wait for cannot run until that callback returns.
func (s *Socket) Done() <-chan struct{} {
	if s == nil {
		return nil
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.watchersLocked().done
}

// Context returns a context that is cancelled as soon as the socket starts
// to close: Close, Abort, its ending event (before the event-cb runs), or
// Loop.Exit. Its context.Cause is that event, or an ErrSocketClosed event
// where the application closed the socket.
func (s *Socket) Context() context.Context {
	if s == nil {
		return nil
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.watchersLocked().ctx
}

// BytesRead returns the number of bytes read from the connection so far.
// Once Done is closed it is final.
func (s *Socket) BytesRead() int64 {
	if s == nil {
		return 0
	}
	return s.bytesRead.Load()
}

// BytesWritten returns the number of bytes written to the connection so
// far (not those queued). Once Done is closed it is final.
func (s *Socket) BytesWritten() int64 {
	if s == nil {
		return 0
	}
	return s.bytesWritten.Load()
}
