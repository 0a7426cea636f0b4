package asynctcp

// The callback queue: every callback of a socket runs as a job of its
// queue, one job at a time, in order. The queue is a slice guarded by qmu;
// whoever finds it idle claims it (claimQueueLocked) and runs its jobs:
// the reader inline, where it would wait for them anyway, or a dispatcher
// goroutine. No job runs on the writer (a write-cb may block in
// Stream.Write) or on an application's goroutine. Inside the descriptor's
// read (see reads) the reader waits for no lock and no other runner
// (wait false): where the callback lock is taken, a dispatcher takes the
// queue over, and a read-cb that cannot start at once goes back to the
// reader's loop.
//
// A job runs under the loop's callback lock (Loop.Serial), and each
// callback checks that the socket may still run callbacks after taking
// that lock and just before it starts: so once Close, Abort or Exit has
// returned, no callback of the socket starts, even on a Serial loop where
// another callback closed it. A callback starts at that check, which takes
// mu as Close does: a Close that returned before it wins. (Without Serial
// the callback's first line runs a moment after its check, and a Close on
// another goroutine may return in that moment; nothing short of holding a
// lock across the callback would close that gap, and that lock would
// deadlock two sockets that close each other from their callbacks.)

// dispatch adds job to the socket's callback queue. If no goroutine runs
// the queue, the caller runs it when inline is set, else a new goroutine
// does. Callers are the socket's own goroutines, or hold mu on a socket
// that is not dead, so that the errgroup is not yet waited for when
// dispatch adds to it.
func (s *Socket) dispatch(job func(), inline bool) {
	s.qmu.Lock()
	s.queue = append(s.queue, job)
	claimed := s.claimQueueLocked()
	s.qmu.Unlock()
	s.runClaimed(claimed, inline)
}

// runQueue runs the queued jobs where no goroutine runs them: on the
// caller when inline is set, else on a new goroutine of the socket.
func (s *Socket) runQueue(inline bool) {
	s.qmu.Lock()
	claimed := len(s.queue) > 0 && s.claimQueueLocked()
	s.qmu.Unlock()
	s.runClaimed(claimed, inline)
}

// claimQueueLocked makes the caller the queue's runner, where nobody runs
// it. qmu is held.
func (s *Socket) claimQueueLocked() bool {
	if s.running {
		return false
	}
	s.running = true
	return true
}

func (s *Socket) runClaimed(claimed, inline bool) {
	switch {
	case !claimed:
	case inline:
		s.runJobs(true)
	default:
		s.grp.Go(s.dispatcher)
	}
}

// dispatcher runs the queue on a goroutine of its own. The caller has
// claimed it.
func (s *Socket) dispatcher() error {
	s.runJobs(true)
	return nil
}

// runJobs runs the queue's jobs until it is empty, then gives it up. The
// caller has claimed it. Where wait is false (the reader, inside the
// descriptor's read: see reads) and a Serial loop's callback lock is
// taken, a dispatcher takes the queue over instead of waiting.
func (s *Socket) runJobs(wait bool) {
	for {
		s.qmu.Lock()
		if len(s.queue) == 0 {
			s.running = false
			s.queue = s.queue[:0]
			s.qmu.Unlock()
			return
		}
		s.qmu.Unlock()
		held, ok := s.loop.enter(wait)
		if !ok {
			s.grp.Go(s.dispatcher)
			return
		}
		s.qmu.Lock()
		job := s.queue[0] // still there: only the runner takes jobs
		s.queue[0] = nil
		s.queue = s.queue[1:]
		s.qmu.Unlock()
		job()
		s.loop.leave(held)
	}
}

// dispatchRead runs the read-cb on the queue and waits for it. It reports
// heldBack where reading was disabled before the callback started, and,
// where wait is false, where the read-cb cannot start at once: the queue
// is another goroutine's, or a Serial loop's callback lock is taken. The
// data is then still the reader's.
func (s *Socket) dispatchRead(data []byte, wait bool) handed {
	held, ok := false, true
	if !wait {
		// The lock before the queue: a claimed queue would have to be
		// handed on where the lock then proved taken.
		if held, ok = s.loop.enter(false); !ok {
			return heldBack
		}
	}
	s.qmu.Lock()
	if len(s.queue) == 0 && s.claimQueueLocked() {
		// The queue is idle: run the read-cb here, without queueing it.
		s.qmu.Unlock()
		if wait {
			held, _ = s.loop.enter(true)
		}
		ran := s.readJob(data)
		s.loop.leave(held)
		s.runJobs(wait)
		if !ran {
			return heldBack
		}
		return passedOn
	}
	if !wait {
		s.qmu.Unlock()
		s.loop.leave(held)
		return heldBack
	}
	if s.readResult == nil {
		s.readResult = make(chan bool, 1)
	}
	result := s.readResult
	s.queue = append(s.queue, func() { result <- s.readJob(data) })
	claimed := s.claimQueueLocked()
	s.qmu.Unlock()
	s.runClaimed(claimed, true)
	if !<-result {
		return heldBack
	}
	return passedOn
}

// readJob runs the read-cb with data, unless the socket is closed (the
// data is dropped) or reading was disabled (it reports false).
func (s *Socket) readJob(data []byte) bool {
	ok := true
	s.invoke(func() {
		s.mu.Lock()
		cb, open := s.read, s.startLocked()
		if open && s.enabled&EvRead == 0 {
			ok, open = false, false
		}
		s.mu.Unlock()
		if open && cb != nil {
			cb(s, data)
		}
	})
	return ok
}

// connected runs the connect-cb.
func (s *Socket) connected() {
	s.invoke(func() {
		s.mu.Lock()
		cb, open := s.connectCb, s.startLocked()
		s.mu.Unlock()
		if open && cb != nil {
			cb(s)
		}
	})
}

// drained runs the write-cb: the output fell to the low watermark.
func (s *Socket) drained() {
	s.invoke(func() {
		s.mu.Lock()
		cb, open := s.write, s.startLocked()
		s.mu.Unlock()
		if open && cb != nil {
			cb(s)
		}
	})
}

// emit gives ev to the socket's event-cb, or the loop's handler. A panic in
// the event-cb goes to the loop's handler, never back to the event-cb.
func (s *Socket) emit(ev error) {
	pe := s.loop.call(func() {
		s.mu.Lock()
		cb, open := s.event, s.startLocked()
		s.mu.Unlock()
		switch {
		case !open:
		case cb == nil:
			s.loop.handle(ev)
		default:
			cb(ev)
		}
	}, s)
	if pe != nil {
		s.loop.handle(pe)
	}
}

// startLocked is the check that starts a callback: it reports whether one
// may start (callbacksOpenLocked) and notes that the socket ran one. The
// callback runs right after it, inside Loop.call, so that nothing but the
// unlock lies between the check and the callback. mu is held.
func (s *Socket) startLocked() bool {
	open := s.callbacksOpenLocked()
	if open {
		s.touched = true
	}
	return open
}

// invoke runs a read, write or connect callback. A recovered panic
// (CatchAppErrors) goes to the event-cb, and the socket is aborted.
func (s *Socket) invoke(f func()) {
	pe := s.loop.call(f, s)
	if pe == nil {
		return
	}
	s.mu.Lock()
	first := !s.ended
	s.ended = true
	if first {
		s.endErr = pe
		s.startClosingLocked(pe)
	}
	s.mu.Unlock()
	if first {
		s.emit(pe)
	} else {
		s.loop.handle(pe)
	}
	s.shut(true)
}
