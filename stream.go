package asynctcp

import (
	"errors"
	"net"
	"time"
)

// errStreamsNotYet is returned by the stream API until stream mode lands.
var errStreamsNotYet = errors.New("asynctcp: streams are not implemented yet")

// Stream is cl-async's async-io-stream: a view of a socket as a net.Conn,
// reading from the socket's input buffer and writing to its output buffer.
type Stream struct {
	s *Socket
}

// NewStream is (make-instance 'async-io-stream :socket s): a stream over s.
func NewStream(s *Socket) *Stream { return &Stream{s: s} }

// Socket returns the stream's socket.
func (st *Stream) Socket() *Socket { return st.s }

// Read reads buffered input, blocking only while nothing is buffered.
func (st *Stream) Read(p []byte) (int, error) { return 0, errStreamsNotYet }

// TryRead reads buffered input and never blocks.
func (st *Stream) TryRead(p []byte) (int, error) { return 0, errStreamsNotYet }

// ReadByte reads one byte.
func (st *Stream) ReadByte() (byte, error) { return 0, errStreamsNotYet }

// Write queues p on the socket.
func (st *Stream) Write(p []byte) (int, error) { return 0, errStreamsNotYet }

// WriteString queues s on the socket.
func (st *Stream) WriteString(s string) (int, error) { return 0, errStreamsNotYet }

// WriteByte queues c on the socket.
func (st *Stream) WriteByte(c byte) error { return errStreamsNotYet }

// Buffered returns the number of input bytes readable without blocking.
func (st *Stream) Buffered() int { return 0 }

// ClearInput is clear-input: it drops buffered input.
func (st *Stream) ClearInput() {}

// ClearOutput is clear-output: it drops queued output.
func (st *Stream) ClearOutput() {}

// Flush is finish-output: it waits until queued output is written.
func (st *Stream) Flush() error { return errStreamsNotYet }

// Close closes the socket.
func (st *Stream) Close() error { return st.s.Close() }

// LocalAddr returns the local address.
func (st *Stream) LocalAddr() net.Addr { return st.s.LocalAddr() }

// RemoteAddr returns the peer's address.
func (st *Stream) RemoteAddr() net.Addr { return st.s.RemoteAddr() }

// SetDeadline sets the read and write deadlines of the stream.
func (st *Stream) SetDeadline(t time.Time) error { return errStreamsNotYet }

// SetReadDeadline bounds blocking reads.
func (st *Stream) SetReadDeadline(t time.Time) error { return errStreamsNotYet }

// SetWriteDeadline bounds blocking writes.
func (st *Stream) SetWriteDeadline(t time.Time) error { return errStreamsNotYet }
