package asynctcp_test

import (
	"context"
	"crypto/tls"
	"errors"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/asynctcp/asynctcp"
)

// Every error returned for an invalid argument (ports, Events, option
// values, negative timeouts, a nil receiver, an option where it does not
// apply) matches ErrBadArgument, matches no connection condition, and
// names the function or option in its text.
func TestArgumentErrorsMatchErrBadArgument(t *testing.T) {
	l := newTestLoop(t)
	srv, port := listenLocal(t, l, nil, nil)
	ln, rawPort := listenRaw(t)
	s := connectLocal(t, l, rawPort, nil, func(error) {})
	peer := acceptRaw(t, ln)
	defer peer.Close()
	var nilLoop *asynctcp.Loop
	var nilSocket *asynctcp.Socket
	var nilServer *asynctcp.Server
	var nilStream *asynctcp.Stream
	connect := func(opts ...asynctcp.Option) error {
		_, err := l.Connect("127.0.0.1", port, nil, nil, opts...)
		return err
	}
	listen := func(opts ...asynctcp.Option) error {
		srv, err := l.Listen("127.0.0.1", 0, nil, nil, opts...)
		if err == nil {
			srv.Close()
		}
		return err
	}
	a, b := net.Pipe()
	defer a.Close()
	defer b.Close()
	cases := []struct {
		name string
		err  error
		says string // the function or option the text must name
	}{
		{"Connect port 0", connect2(l.Connect("127.0.0.1", 0, nil, nil)), "Connect"},
		{"Connect port 65536", connect2(l.Connect("127.0.0.1", 65536, nil, nil)), "Connect"},
		{"ConnectStream port -1", stream2(l.ConnectStream("127.0.0.1", -1, nil, nil)), "ConnectStream"},
		{"Listen port -1", server2(l.Listen("127.0.0.1", -1, nil, nil)), "Listen"},
		{"ListenStream port 70000", server2(l.ListenStream("127.0.0.1", 70000, nil, nil)), "ListenStream"},
		{"NewListener port 70000", listener2(l.NewListener("127.0.0.1", 70000)), "NewListener"},
		{"nil Loop Connect", connect2(nilLoop.Connect("127.0.0.1", port, nil, nil)), "nil *Loop"},
		{"nil Loop Listen", server2(nilLoop.Listen("127.0.0.1", 0, nil, nil)), "nil *Loop"},
		{"nil Loop NewListener", listener2(nilLoop.NewListener("127.0.0.1", 0)), "nil *Loop"},
		{"Wrap nil", connect2(l.Wrap(nil, nil, nil)), "Wrap"},
		{"WrapStream nil", stream2(l.WrapStream(nil, nil, nil)), "WrapStream"},
		{"Serve nil", server2(l.Serve(nil, nil, nil)), "Serve"},
		{"ServeStream nil", server2(l.ServeStream(nil, nil, nil)), "ServeStream"},
		{"ReadTimeout -1", connect(asynctcp.ReadTimeout(-1)), "ReadTimeout"},
		{"WriteTimeout -1", connect(asynctcp.WriteTimeout(-time.Second)), "WriteTimeout"},
		{"InputLimit 0", connect(asynctcp.InputLimit(0)), "InputLimit"},
		{"WriteWatermarks 5 1", connect(asynctcp.WriteWatermarks(5, 1)), "WriteWatermarks"},
		{"WriteWatermarks -1 0", connect(asynctcp.WriteWatermarks(-1, 0)), "WriteWatermarks"},
		{"MaxBuffered 0", connect(asynctcp.MaxBuffered(0)), "MaxBuffered"},
		{"SendBuffer 0", connect(asynctcp.SendBuffer(0)), "SendBuffer"},
		{"ReceiveBuffer -1", connect(asynctcp.ReceiveBuffer(-1)), "ReceiveBuffer"},
		{"ReusePort on Connect", connect(asynctcp.ReusePort()), "ReusePort"},
		{"TLS nil", connect(asynctcp.TLS(nil)), "TLS"},
		{"Dialer nil", connect(asynctcp.Dialer(nil)), "Dialer"},
		{"ReadRate -1", connect(asynctcp.ReadRate(-1, 1)), "ReadRate"},
		{"WriteRate without burst", connect(asynctcp.WriteRate(100, 0)), "WriteRate"},
		{"InRateGroup nil", connect(asynctcp.InRateGroup(nil)), "InRateGroup"},
		{"InRateGroup bad group", connect(asynctcp.InRateGroup(asynctcp.NewRateGroup(-1, 0, 0))), "InRateGroup"},
		{"zero Option", connect(asynctcp.Option{}), "Connect"},
		{"Backlog on Connect", connect(asynctcp.Backlog(8)), "Backlog"},
		{"Dialer on Listen", listen(asynctcp.Dialer(&net.Dialer{})), "Dialer"},
		{"Data on Listen", listen(asynctcp.Data([]byte("x"))), "Data"},
		{"OnRead on Connect", connect(asynctcp.OnRead(nil)), "OnRead"},
		{"TLS on Wrap", connect2(l.Wrap(a, nil, nil, asynctcp.TLS(&tls.Config{}))), "TLS"},
		{"ReuseReadBuffer on ConnectStream", stream2(l.ConnectStream("127.0.0.1", port, nil, nil, asynctcp.ReuseReadBuffer())), "ReuseReadBuffer"},
		{"NotifyTimeouts on NewListener", listener2(l.NewListener("127.0.0.1", 0, asynctcp.NotifyTimeouts())), "NotifyTimeouts"},
		{"Data on WriteData", s.WriteData(nil, asynctcp.Data([]byte("x"))), "Data"},
		{"SetTimeouts -1", s.SetTimeouts(-1, 0), "SetTimeouts"},
		{"Enable 8", s.Enable(8), "Enable"},
		{"Disable 8", s.Disable(8), "Disable"},
		{"nil Socket WriteData", nilSocket.WriteData([]byte("x")), "WriteData"},
		{"nil Socket Close", nilSocket.Close(), "Close"},
		{"nil Socket Abort", nilSocket.Abort(), "Abort"},
		{"nil Socket SetTimeouts", nilSocket.SetTimeouts(0, 0), "SetTimeouts"},
		{"nil Socket CloseWrite", nilSocket.CloseWrite(), "CloseWrite"},
		{"nil Server Close", nilServer.Close(), "Close"},
		{"nil Server Shutdown", nilServer.Shutdown(context.Background()), "Shutdown"},
		{"nil Stream Read", func() error { _, err := nilStream.Read(make([]byte, 1)); return err }(), "Read"},
		{"nil Stream Write", func() error { _, err := nilStream.Write([]byte("x")); return err }(), "Write"},
	}
	for _, c := range cases {
		switch {
		case c.err == nil:
			t.Errorf("%s: no error", c.name)
		case !errors.Is(c.err, asynctcp.ErrBadArgument):
			t.Errorf("%s: %v does not match ErrBadArgument", c.name, c.err)
		case errors.Is(c.err, asynctcp.ErrConnectionInfo):
			t.Errorf("%s: %v matches a connection condition", c.name, c.err)
		case !strings.Contains(c.err.Error(), c.says):
			t.Errorf("%s: %q does not name %s", c.name, c.err, c.says)
		}
	}
	s.Close()
	srv.Close()
	waitLoopClean(t, l, waitTimeout)
}

// connect2, stream2, server2 and listener2 keep the error of a call that
// returns a value too.
func connect2(_ *asynctcp.Socket, err error) error { return err }
func stream2(_ *asynctcp.Stream, err error) error  { return err }
func server2(_ *asynctcp.Server, err error) error  { return err }
func listener2(ln net.Listener, err error) error {
	if ln != nil {
		ln.Close()
	}
	return err
}
