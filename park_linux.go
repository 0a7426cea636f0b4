//go:build linux

package asynctcp

import (
	"os"
	"sync"
	"syscall"
	"time"
)

// Parking. A socket idle for longer than usual (hopWaitLocked) gives up its
// reader goroutine: its descriptor waits, one-shot, in an epoll set of its
// loop, and the loop's parker, one goroutine waiting on that set through
// the runtime's poller, starts a fresh reader for each socket that becomes
// readable (input, EOF, an error). An idle socket then costs no goroutine
// and no stack. The parker runs while any socket of the loop is parked and
// ends, closing the set, once none is; Loop.Wait waits for it.
//
// A socket is parked exactly while s.parked is set, and then it is in
// socks under its descriptor; both change under s.mu, socks under p.mu
// too (Socket.mu before parking.mu). Whatever would wake a reader blocked
// in a read (a close, Exit) takes a parked socket out instead
// (unparkLocked). A read timeout that runs waits on the socket's read
// timer, which takes it out and starts a reader once the timeout passes
// (readTimerFired).
type parking struct {
	mu      sync.Mutex
	socks   map[int]*Socket // the parked sockets, by descriptor
	epfd    int             // the epoll set, while the parker runs
	file    *os.File        // epfd, as the runtime's poller sees it
	rc      syscall.RawConn
	gen     uint64        // bumped each time a set is made: a descriptor added to an older one is added again
	running bool          // the parker runs
	idle    chan struct{} // see Loop.Wait: closed when the parker ends
}

// epollOneShot is EPOLLONESHOT, which package syscall names only as a
// negative int32 on some platforms.
const epollOneShot = 1 << 30

// addLocked parks s: its descriptor waits in the set for input, and the
// parker runs. s.mu is held.
func (p *parking) addLocked(s *Socket) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if !p.running {
		if err := p.openLocked(); err != nil {
			return err
		}
	}
	fd := s.raw.fd
	ev := syscall.EpollEvent{Events: syscall.EPOLLIN | syscall.EPOLLRDHUP | epollOneShot, Fd: int32(fd)}
	op := syscall.EPOLL_CTL_ADD
	if s.raw.setGen == p.gen {
		op = syscall.EPOLL_CTL_MOD // in this set already: arm it again
	}
	err := syscall.EpollCtl(p.epfd, op, fd, &ev)
	switch {
	case err == syscall.EEXIST:
		err = syscall.EpollCtl(p.epfd, syscall.EPOLL_CTL_MOD, fd, &ev)
	case err == syscall.ENOENT:
		err = syscall.EpollCtl(p.epfd, syscall.EPOLL_CTL_ADD, fd, &ev)
	}
	if err != nil {
		p.stopIfEmptyLocked()
		return err
	}
	s.raw.setGen = p.gen
	p.socks[fd] = s
	return nil
}

// openLocked makes the epoll set and starts the parker. p.mu is held.
func (p *parking) openLocked() error {
	fd, err := syscall.EpollCreate1(syscall.EPOLL_CLOEXEC)
	if err != nil {
		return os.NewSyscallError("epoll_create1", err)
	}
	if err := syscall.SetNonblock(fd, true); err != nil {
		syscall.Close(fd)
		return os.NewSyscallError("setnonblock", err)
	}
	f := os.NewFile(uintptr(fd), "asynctcp-parking") // non-blocking: on the runtime's poller
	rc, err := f.SyscallConn()
	if err != nil {
		f.Close()
		return err
	}
	p.epfd, p.file, p.rc = fd, f, rc
	p.gen++
	if p.socks == nil {
		p.socks = make(map[int]*Socket)
	}
	p.running = true
	go p.run()
	return nil
}

// removeLocked takes s out of the parked sockets; the parker ends once
// none is left. s.mu is held.
func (p *parking) removeLocked(s *Socket) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.socks[s.raw.fd] == s {
		delete(p.socks, s.raw.fd)
	}
	p.stopIfEmptyLocked()
}

// stopIfEmptyLocked wakes the parker to end where no socket is parked.
// p.mu is held.
func (p *parking) stopIfEmptyLocked() {
	if p.running && len(p.socks) == 0 {
		p.file.SetReadDeadline(aLongTimeAgo)
	}
}

// run is the parker: it waits for parked descriptors to become readable
// and hands each socket back to a fresh reader (unparked).
func (p *parking) run() {
	var evs [128]syscall.EpollEvent
	n := 0
	poll := func(fd uintptr) bool {
		var err error
		for {
			n, err = syscall.EpollWait(int(fd), evs[:], 0)
			if err != syscall.EINTR {
				break
			}
		}
		return n > 0
	}
	for {
		err := p.rc.Read(poll)
		for _, ev := range evs[:max(n, 0)] {
			p.mu.Lock()
			s := p.socks[int(ev.Fd)]
			p.mu.Unlock()
			if s != nil {
				s.unparked()
			}
		}
		n = 0
		p.mu.Lock()
		if len(p.socks) == 0 {
			p.file.Close()
			p.file, p.rc, p.epfd = nil, nil, -1
			p.running = false
			wake(&p.idle)
			p.mu.Unlock()
			return
		}
		if err != nil { // woken to end, and a socket parked since
			p.file.SetReadDeadline(time.Time{})
		}
		p.mu.Unlock()
	}
}

// wait returns once the parker has ended.
func (p *parking) wait() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for p.running {
		idle := waiter(&p.idle)
		p.mu.Unlock()
		<-idle
		p.mu.Lock()
	}
}
