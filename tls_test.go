package asynctcp_test

import (
	"bufio"
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"io"
	"math/big"
	"net"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/net/dns/dnsmessage"

	"github.com/asynctcp/asynctcp"
)

// TLS (the TLS option on Connect* and Listen*) and Dialer (the Dialer
// option on Connect*), over loopback only. The certificates are made here;
// host names resolve through a DNS server on loopback.

// tlName is a host name that only tlResolver knows: it answers 127.0.0.1.
const tlName = "tls.asynctcp.test"

// tlPKI holds a CA and a server certificate it signed, for 127.0.0.1,
// localhost and tlName.
type tlPKI struct {
	cert  tls.Certificate
	roots *x509.CertPool // trusts the CA
}

func (p *tlPKI) server() *tls.Config {
	return &tls.Config{Certificates: []tls.Certificate{p.cert}, MinVersion: tls.VersionTLS12}
}

func (p *tlPKI) client() *tls.Config {
	return &tls.Config{RootCAs: p.roots, MinVersion: tls.VersionTLS12}
}

func tlNewPKI(t *testing.T) *tlPKI {
	t.Helper()
	caKey := tlKey(t)
	ca := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "asynctcp test CA"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(time.Hour),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, ca, ca, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	caCert, err := x509.ParseCertificate(caDER)
	if err != nil {
		t.Fatal(err)
	}
	key := tlKey(t)
	leaf := &x509.Certificate{
		SerialNumber: big.NewInt(2),
		Subject:      pkix.Name{CommonName: "localhost"},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		IPAddresses:  []net.IP{net.IPv4(127, 0, 0, 1)},
		DNSNames:     []string{"localhost", tlName},
	}
	der, err := x509.CreateCertificate(rand.Reader, leaf, caCert, &key.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	roots := x509.NewCertPool()
	roots.AddCert(caCert)
	return &tlPKI{
		cert:  tls.Certificate{Certificate: [][]byte{der, caDER}, PrivateKey: key},
		roots: roots,
	}
}

func tlKey(t *testing.T) *ecdsa.PrivateKey {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return key
}

// tlResolver returns a resolver that asks a DNS server on loopback, which
// answers tlName with 127.0.0.1 (and no IPv6 address) and no other name;
// queries counts the questions about tlName.
func tlResolver(t *testing.T) (r *net.Resolver, queries *atomic.Int32) {
	t.Helper()
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("ListenPacket: %v", err)
	}
	queries = new(atomic.Int32)
	done := make(chan struct{})
	go func() {
		defer close(done)
		buf := make([]byte, 1500)
		for {
			n, from, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			if resp := tlAnswer(buf[:n], queries); resp != nil {
				pc.WriteTo(resp, from)
			}
		}
	}()
	t.Cleanup(func() {
		pc.Close()
		<-done
	})
	addr := pc.LocalAddr().String()
	r = &net.Resolver{PreferGo: true, Dial: func(ctx context.Context, network, address string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "udp", addr)
	}}
	return r, queries
}

// tlAnswer answers the DNS query q.
func tlAnswer(q []byte, queries *atomic.Int32) []byte {
	var m dnsmessage.Message
	if err := m.Unpack(q); err != nil || len(m.Questions) != 1 {
		return nil
	}
	question := m.Questions[0]
	resp := dnsmessage.Message{
		Header: dnsmessage.Header{
			ID: m.ID, Response: true, Authoritative: true,
			RecursionDesired: m.RecursionDesired, RecursionAvailable: true,
		},
		Questions: m.Questions,
	}
	switch {
	case !strings.EqualFold(question.Name.String(), tlName+"."):
		resp.RCode = dnsmessage.RCodeNameError
	case question.Type == dnsmessage.TypeA:
		queries.Add(1)
		resp.Answers = []dnsmessage.Resource{{
			Header: dnsmessage.ResourceHeader{Name: question.Name, Type: dnsmessage.TypeA, Class: dnsmessage.ClassINET, TTL: 60},
			Body:   &dnsmessage.AResource{A: [4]byte{127, 0, 0, 1}},
		}}
	default:
		queries.Add(1) // the name exists, without records of this type
	}
	b, err := resp.Pack()
	if err != nil {
		return nil
	}
	return b
}

// tlConnState is what a connect-cb saw of its socket's connection.
type tlConnState struct {
	isTLS     bool
	handshake bool
	sni       string // the server name: the SNI the server got, or the client's ServerName
	version   uint16
}

// tlState reads the TLS state of s's connection.
func tlState(s *asynctcp.Socket) tlConnState {
	tc, ok := s.Conn().(*tls.Conn)
	if !ok {
		return tlConnState{}
	}
	cs := tc.ConnectionState()
	return tlConnState{isTLS: true, handshake: cs.HandshakeComplete, sni: cs.ServerName, version: cs.Version}
}

// TestTLSClientHandshakesBeforeConnectCb: with TLS, the connect-cb runs
// once the handshake is done, on a *tls.Conn; where cfg.ServerName is
// empty, the host name given to Connect is the server name (SNI and
// verification); an IP address is verified but not sent as SNI. The
// caller's config is left as it was.
func TestTLSClientHandshakesBeforeConnectCb(t *testing.T) {
	t.Parallel()
	pki := tlNewPKI(t)
	resolver, queries := tlResolver(t)
	cases := []struct {
		name       string
		host       string
		serverName string
		wantSNI    string // what the server gets
		wantName   string // the SNI the client's connection state says it sent
	}{
		{"host name", tlName, "", tlName, tlName},
		// No SNI for an address, but the handshake succeeds only where
		// the address became the name to verify: crypto/tls refuses a
		// client config with neither ServerName nor InsecureSkipVerify.
		{"IP address", "127.0.0.1", "", "", ""},
		{"ServerName set", "127.0.0.1", "localhost", "localhost", "localhost"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			l := newTestLoop(t)
			serverSaw := make(chan tlConnState, 1)
			srvEvents := newEventRecorder()
			srv, err := l.Listen("127.0.0.1", 0, nil, srvEvents.cb, asynctcp.TLS(pki.server()),
				asynctcp.OnConnect(func(s *asynctcp.Socket) { serverSaw <- tlState(s) }))
			if err != nil {
				t.Fatalf("Listen: %v", err)
			}
			defer srv.Close()

			cfg := pki.client()
			cfg.ServerName = tc.serverName
			clientSaw := make(chan tlConnState, 1)
			events := newEventRecorder()
			_, err = l.Connect(tc.host, portOf(t, srv.Addr()), nil, events.cb, asynctcp.TLS(cfg),
				asynctcp.Dialer(&net.Dialer{Resolver: resolver}),
				asynctcp.OnConnect(func(s *asynctcp.Socket) {
					clientSaw <- tlState(s)
					s.Close()
				}))
			if err != nil {
				t.Fatalf("Connect: %v", err)
			}
			got := waitFor(t, clientSaw, "the client's connect-cb")
			if !got.isTLS || !got.handshake {
				t.Errorf("client connect-cb: *tls.Conn %v, handshake complete %v; want both", got.isTLS, got.handshake)
			}
			if got.sni != tc.wantName {
				t.Errorf("client ServerName %q, want %q", got.sni, tc.wantName)
			}
			saw := waitFor(t, serverSaw, "the server's connect-cb")
			if saw.sni != tc.wantSNI {
				t.Errorf("server got SNI %q, want %q", saw.sni, tc.wantSNI)
			}
			ev := waitFor(t, srvEvents.ch, "the server's EOF")
			wantEventIs(t, ev, asynctcp.ErrTCPEOF, "server after the client closed")
			srv.Close()
			waitLoopNil(t, l, waitTimeout)
			if cfg.ServerName != tc.serverName {
				t.Errorf("Connect changed the caller's cfg.ServerName to %q", cfg.ServerName)
			}
			if n := events.n.Load(); n != 0 {
				t.Errorf("the client got %d events, want none: %v", n, <-events.ch)
			}
		})
	}
	if queries.Load() == 0 {
		t.Errorf("the local DNS server was never asked about %s", tlName)
	}
}

// TestTLSServerSocketsAreTLSConns: with TLS on Listen, each accepted socket
// is a *tls.Conn with its handshake done by the connect-cb, and data flows
// both ways: a greeting from the server's connect-cb, then the echo of
// what the client sends, in order.
func TestTLSServerSocketsAreTLSConns(t *testing.T) {
	t.Parallel()
	pki := tlNewPKI(t)
	l := newTestLoop(t)
	const greeting = "hello from a TLS server\n"
	serverSaw := make(chan tlConnState, 1)
	srvEvents := newEventRecorder()
	srv, err := l.Listen("127.0.0.1", 0, echoBack, srvEvents.cb, asynctcp.TLS(pki.server()),
		asynctcp.OnConnect(func(s *asynctcp.Socket) {
			serverSaw <- tlState(s)
			s.WriteData([]byte(greeting))
		}))
	if err != nil {
		t.Fatalf("Listen: %v", err)
	}
	defer srv.Close()

	payload := pattern(512 << 10)
	want := append([]byte(greeting), payload...)
	var got []byte // the client's callbacks run one at a time
	done := make(chan []byte, 1)
	events := newEventRecorder()
	_, err = l.Connect("127.0.0.1", portOf(t, srv.Addr()),
		func(s *asynctcp.Socket, data []byte) {
			got = append(got, data...)
			if len(got) >= len(want) {
				done <- got
				s.Close()
			}
		},
		events.cb, asynctcp.TLS(pki.client()), asynctcp.Data(payload))
	if err != nil {
		t.Fatalf("Connect: %v", err)
	}
	saw := waitFor(t, serverSaw, "the server's connect-cb")
	if !saw.isTLS || !saw.handshake {
		t.Errorf("server connect-cb: *tls.Conn %v, handshake complete %v; want both", saw.isTLS, saw.handshake)
	}
	if b := waitFor(t, done, "the greeting and the echo"); !bytes.Equal(b, want) {
		t.Errorf("client got %d bytes, want %d (greeting + echo); first difference at %d", len(b), len(want), firstDiff(b, want))
	}
	wantEventIs(t, waitFor(t, srvEvents.ch, "the server's EOF"), asynctcp.ErrTCPEOF, "server after the client closed")
	srv.Close()
	waitLoopNil(t, l, waitTimeout)
	if n := events.n.Load(); n != 0 {
		t.Errorf("the client got %d events, want none: %v", n, <-events.ch)
	}
}

// TestTLSServerTalksToCryptoTLSClient: an asynctcp TLS server serves a
// plain crypto/tls client.
func TestTLSServerTalksToCryptoTLSClient(t *testing.T) {
	t.Parallel()
	pki := tlNewPKI(t)
	l := newTestLoop(t)
	srv, err := l.Listen("127.0.0.1", 0, echoBack, nil, asynctcp.TLS(pki.server()))
	if err != nil {
		t.Fatalf("Listen: %v", err)
	}
	defer srv.Close()
	cfg := pki.client()
	cfg.ServerName = "localhost"
	c, err := tls.DialWithDialer(&net.Dialer{Timeout: waitTimeout}, "tcp", srv.Addr().String(), cfg)
	if err != nil {
		t.Fatalf("tls.Dial: %v", err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(waitTimeout))
	payload := pattern(256 << 10)
	werr := make(chan error, 1)
	go func() {
		_, err := c.Write(payload)
		werr <- err
	}()
	got := make([]byte, len(payload))
	if _, err := io.ReadFull(c, got); err != nil {
		t.Fatalf("read the echo: %v", err)
	}
	if err := waitFor(t, werr, "the client's write"); err != nil {
		t.Fatalf("write: %v", err)
	}
	if !bytes.Equal(got, payload) {
		t.Fatalf("echo differs at byte %d", firstDiff(got, payload))
	}
	c.Close()
	srv.Close()
	waitLoopNil(t, l, waitTimeout)
}

// TestTLSClientTalksToCryptoTLSServer: an asynctcp TLS client talks to a
// plain crypto/tls server.
func TestTLSClientTalksToCryptoTLSServer(t *testing.T) {
	t.Parallel()
	pki := tlNewPKI(t)
	ln, err := tls.Listen("tcp", "127.0.0.1:0", pki.server())
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	served := make(chan error, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			served <- err
			return
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(waitTimeout))
		line, err := bufio.NewReader(c).ReadString('\n')
		if err == nil {
			_, err = io.WriteString(c, strings.ToUpper(line))
		}
		served <- err
	}()

	l := newTestLoop(t)
	var got []byte
	events := newEventRecorder()
	_, err = l.Connect("127.0.0.1", ln.Addr().(*net.TCPAddr).Port,
		func(s *asynctcp.Socket, data []byte) { got = append(got, data...) },
		events.cb, asynctcp.TLS(pki.client()), asynctcp.Data([]byte("hello over tls\n")))
	if err != nil {
		t.Fatalf("Connect: %v", err)
	}
	if err := waitFor(t, served, "the crypto/tls server"); err != nil {
		t.Fatalf("server: %v", err)
	}
	wantEventIs(t, waitFor(t, events.ch, "the client's EOF"), asynctcp.ErrTCPEOF, "client after the server closed")
	waitLoopNil(t, l, waitTimeout)
	if string(got) != "HELLO OVER TLS\n" {
		t.Errorf("client got %q, want %q", got, "HELLO OVER TLS\n")
	}
}

// TestTLSStreams: TLS in stream mode, ListenStream and ConnectStream, with
// the client's stream used from the test's goroutine as a net.Conn.
func TestTLSStreams(t *testing.T) {
	t.Parallel()
	pki := tlNewPKI(t)
	l := newTestLoop(t)
	srv, err := l.ListenStream("127.0.0.1", 0,
		func(s *asynctcp.Socket, st *asynctcp.Stream) {
			buf := make([]byte, 4096)
			for {
				n, _ := st.TryRead(buf)
				if n == 0 {
					return
				}
				st.Write(bytes.ToUpper(buf[:n]))
			}
		}, nil, asynctcp.TLS(pki.server()))
	if err != nil {
		t.Fatalf("ListenStream: %v", err)
	}
	defer srv.Close()
	st, err := l.ConnectStream("127.0.0.1", portOf(t, srv.Addr()), nil, nil, asynctcp.TLS(pki.client()))
	if err != nil {
		t.Fatalf("ConnectStream: %v", err)
	}
	st.SetDeadline(time.Now().Add(waitTimeout))
	br := bufio.NewReader(st)
	for _, line := range []string{"first line\n", "second line\n"} {
		if _, err := st.Write([]byte(line)); err != nil {
			t.Fatalf("Write: %v", err)
		}
		got, err := br.ReadString('\n')
		if err != nil {
			t.Fatalf("ReadString: %v", err)
		}
		if want := strings.ToUpper(line); got != want {
			t.Errorf("got %q, want %q", got, want)
		}
	}
	if _, ok := st.Socket().Conn().(*tls.Conn); !ok {
		t.Errorf("stream's conn is %T, want *tls.Conn", st.Socket().Conn())
	}
	st.Close()
	srv.Close()
	waitLoopNil(t, l, waitTimeout)
}

// TestTLSSocketSurvivesIdleReader: a TLS socket that sat idle for longer
// than a reader stays parked (the reader hands over to a fresh goroutine
// after 250 ms without input) still reads the next record.
func TestTLSSocketSurvivesIdleReader(t *testing.T) {
	t.Parallel()
	pki := tlNewPKI(t)
	l := newTestLoop(t)
	srv, err := l.Listen("127.0.0.1", 0, echoBack, nil, asynctcp.TLS(pki.server()))
	if err != nil {
		t.Fatalf("Listen: %v", err)
	}
	defer srv.Close()
	const idle = 700 * time.Millisecond
	var got []byte
	done := make(chan string, 1)
	events := newEventRecorder()
	_, err = l.Connect("127.0.0.1", portOf(t, srv.Addr()),
		func(s *asynctcp.Socket, data []byte) {
			got = append(got, data...)
			switch string(got) {
			case "one":
				// Let both readers idle, then talk again.
				time.AfterFunc(idle, func() { s.WriteData([]byte("two")) })
			case "onetwo":
				done <- string(got)
				s.Close()
			}
		},
		events.cb, asynctcp.TLS(pki.client()), asynctcp.Data([]byte("one")))
	if err != nil {
		t.Fatalf("Connect: %v", err)
	}
	if got := waitFor(t, done, "the echo after the idle spell"); got != "onetwo" {
		t.Errorf("got %q", got)
	}
	srv.Close()
	waitLoopNil(t, l, waitTimeout)
	if n := events.n.Load(); n != 0 {
		t.Errorf("the client got %d events, want none: %v", n, <-events.ch)
	}
}

// TestTLSHandshakeFailureIsTCPError: a client that does not trust the
// server's certificate gets an ErrTCPError event wrapping the tls error,
// and no connect-cb; the server's event-cb gets the failed handshake too.
func TestTLSHandshakeFailureIsTCPError(t *testing.T) {
	t.Parallel()
	pki := tlNewPKI(t)
	stranger := tlNewPKI(t) // a CA that did not sign the server's certificate
	l := newTestLoop(t)
	srvEvents := newEventRecorder()
	var srvConnects atomic.Int32
	srv, err := l.Listen("127.0.0.1", 0, nil, srvEvents.cb, asynctcp.TLS(pki.server()),
		asynctcp.OnConnect(func(*asynctcp.Socket) { srvConnects.Add(1) }))
	if err != nil {
		t.Fatalf("Listen: %v", err)
	}
	defer srv.Close()

	events := newEventRecorder()
	var connects atomic.Int32
	s, err := l.Connect("127.0.0.1", portOf(t, srv.Addr()), nil, events.cb, asynctcp.TLS(stranger.client()),
		asynctcp.OnConnect(func(*asynctcp.Socket) { connects.Add(1) }))
	if err != nil {
		t.Fatalf("Connect: %v", err)
	}
	ev := waitFor(t, events.ch, "the client's handshake failure")
	e := wantEventIs(t, ev, asynctcp.ErrTCPError, "client handshake failure")
	if e.Class != asynctcp.ErrTCPError {
		t.Errorf("class %v, want exactly tcp-error", e.Class)
	}
	var verr *tls.CertificateVerificationError
	if !errors.As(ev, &verr) {
		t.Errorf("errors.As(%v, *tls.CertificateVerificationError) = false; Err is %T", ev, e.Err)
	}
	var unknown x509.UnknownAuthorityError
	if !errors.As(ev, &unknown) {
		t.Errorf("errors.As(%v, x509.UnknownAuthorityError) = false", ev)
	}
	if e.Socket != s {
		t.Errorf("event Socket = %p, want the client %p", e.Socket, s)
	}
	if !strings.Contains(ev.Error(), "certificate") {
		t.Errorf("event message %q does not mention the certificate", ev.Error())
	}

	sev := waitFor(t, srvEvents.ch, "the server's handshake failure")
	wantEventIs(t, sev, asynctcp.ErrConnectionError, "server handshake failure")
	if !strings.Contains(sev.Error(), "tls") {
		t.Errorf("server event %q does not mention tls", sev.Error())
	}
	srv.Close()
	waitLoopNil(t, l, waitTimeout)
	if n := connects.Load() + srvConnects.Load(); n != 0 {
		t.Errorf("%d connect-cbs ran after a failed handshake", n)
	}
	if n := events.n.Load(); n != 1 {
		t.Errorf("the client got %d events, want 1", n)
	}
	if !s.Closed() {
		t.Error("client socket open after its handshake failed")
	}
}

// TestTLSServerHandshakeFailureIsTCPError: a client that speaks plain text
// to a TLS server makes the server's event-cb get an ErrTCPError event
// wrapping *tls.RecordHeaderError, and the connection is closed.
func TestTLSServerHandshakeFailureIsTCPError(t *testing.T) {
	t.Parallel()
	pki := tlNewPKI(t)
	l := newTestLoop(t)
	srvEvents := newEventRecorder()
	srv, err := l.Listen("127.0.0.1", 0, nil, srvEvents.cb, asynctcp.TLS(pki.server()))
	if err != nil {
		t.Fatalf("Listen: %v", err)
	}
	defer srv.Close()
	c, err := net.DialTimeout("tcp", srv.Addr().String(), waitTimeout)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(waitTimeout))
	if _, err := io.WriteString(c, "GET / HTTP/1.0\r\n\r\n"); err != nil {
		t.Fatal(err)
	}
	ev := waitFor(t, srvEvents.ch, "the server's handshake failure")
	e := wantEventIs(t, ev, asynctcp.ErrTCPError, "server handshake failure")
	if e.Class != asynctcp.ErrTCPError {
		t.Errorf("class %v, want exactly tcp-error", e.Class)
	}
	var rh tls.RecordHeaderError
	if !errors.As(ev, &rh) {
		t.Errorf("errors.As(%v, tls.RecordHeaderError) = false; Err is %T", ev, e.Err)
	}
	if _, err := io.ReadAll(c); err != nil {
		t.Errorf("the plain client read %v after the failed handshake, want EOF", err)
	}
	srv.Close()
	waitLoopNil(t, l, waitTimeout)
}

// TestTLSServerHandshakeBoundedByReadTimeout: a client that connects and
// never finishes its handshake (it sends nothing, or half a record) costs
// the server one ReadTimeout: then its socket ends with ErrTCPTimeout, the
// connection is closed, and Server.Shutdown and Loop.Wait return.
func TestTLSServerHandshakeBoundedByReadTimeout(t *testing.T) {
	t.Parallel()
	const timeout = 300 * time.Millisecond
	cases := []struct {
		name string
		send []byte
	}{
		{"sends nothing", nil},
		{"stalls in a record", []byte{0x16, 0x03, 0x01, 0x01, 0x00, 0x01}}, // a handshake record of 256 bytes, 1 sent
	}
	pki := tlNewPKI(t)
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			l := newTestLoop(t)
			srvEvents := newEventRecorder()
			var connects atomic.Int32
			srv, err := l.Listen("127.0.0.1", 0, nil, srvEvents.cb, asynctcp.TLS(pki.server()),
				asynctcp.ReadTimeout(timeout),
				asynctcp.OnConnect(func(*asynctcp.Socket) { connects.Add(1) }))
			if err != nil {
				t.Fatalf("Listen: %v", err)
			}
			defer srv.Close()
			c, err := net.DialTimeout("tcp", srv.Addr().String(), waitTimeout)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			start := time.Now()
			if _, err := c.Write(tc.send); err != nil {
				t.Fatal(err)
			}
			ev := waitFor(t, srvEvents.ch, "the server's handshake timeout")
			elapsed := time.Since(start)
			e := wantEventIs(t, ev, asynctcp.ErrTCPTimeout, "stalled handshake")
			if e.Code != -1 {
				t.Errorf("timeout event Code %d, want -1", e.Code)
			}
			if elapsed < timeout-50*time.Millisecond || elapsed > timeout+5*time.Second {
				t.Errorf("the handshake timed out after %v, want about %v", elapsed, timeout)
			}
			c.SetReadDeadline(time.Now().Add(waitTimeout))
			if _, err := io.ReadAll(c); err != nil && !errors.Is(err, syscall.ECONNRESET) {
				t.Errorf("the stalled client read %v, want the connection closed", err)
			}
			ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
			defer cancel()
			if err := srv.Shutdown(ctx); err != nil {
				t.Errorf("Shutdown: %v", err)
			}
			waitLoopNil(t, l, waitTimeout)
			if n := connects.Load(); n != 0 {
				t.Errorf("the connect-cb ran %d times for a handshake that never finished", n)
			}
			if n := srvEvents.n.Load(); n != 1 {
				t.Errorf("the server got %d events, want 1", n)
			}
		})
	}
}

// TestTLSExitEndsStalledHandshake: without a timeout a stalled handshake
// holds Server.Shutdown until its context ends; Loop.Exit aborts it, with
// no event, and Loop.Wait returns.
func TestTLSExitEndsStalledHandshake(t *testing.T) {
	t.Parallel()
	pki := tlNewPKI(t)
	l := newTestLoop(t)
	srvEvents := newEventRecorder()
	srv, err := l.Listen("127.0.0.1", 0, nil, srvEvents.cb, asynctcp.TLS(pki.server()))
	if err != nil {
		t.Fatalf("Listen: %v", err)
	}
	c, err := net.DialTimeout("tcp", srv.Addr().String(), waitTimeout)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	// No callback marks an accept whose handshake stalls: poll the books.
	deadline := time.Now().Add(waitTimeout)
	for l.Stats().Incoming == 0 {
		if time.Now().After(deadline) {
			t.Fatal("the server never accepted the connection")
		}
		time.Sleep(5 * time.Millisecond)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	if err := srv.Shutdown(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("Shutdown with a stalled handshake = %v, want context.DeadlineExceeded", err)
	}
	exitErr := errors.New("stop")
	l.Exit(exitErr)
	select {
	case err := <-goWait(l):
		if err != exitErr {
			t.Errorf("Wait = %v, want the Exit value", err)
		}
	case <-time.After(waitTimeout):
		t.Fatalf("Wait did not return after Exit (stats %+v)", l.Stats())
	}
	if n := srvEvents.n.Load(); n != 0 {
		t.Errorf("the server got %d events after Exit, want none: %v", n, <-srvEvents.ch)
	}
	c.SetReadDeadline(time.Now().Add(waitTimeout))
	if _, err := io.ReadAll(c); err != nil && !errors.Is(err, syscall.ECONNRESET) {
		t.Errorf("the stalled client read %v, want the connection closed", err)
	}
}

// tlSilentServer accepts connections and never answers: hello gets the
// first bytes each connection sent, and closed tells when the peer closed
// it.
func tlSilentServer(t *testing.T) (port int, hello <-chan []byte, closed <-chan struct{}) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	helloCh := make(chan []byte, 4)
	closedCh := make(chan struct{}, 4)
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.SetReadDeadline(time.Now().Add(waitTimeout))
			b := make([]byte, 4096)
			n, _ := c.Read(b)
			helloCh <- b[:n]
			io.Copy(io.Discard, c) // until the client gives up
			c.Close()
			closedCh <- struct{}{}
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		<-done
	})
	return ln.Addr().(*net.TCPAddr).Port, helloCh, closedCh
}

// TestTLSClientHandshakeBoundedByTimeout: a client whose server never
// answers its ClientHello gives up after the read timeout (or else the
// write timeout) with ErrTCPTimeout, and no connect-cb runs.
func TestTLSClientHandshakeBoundedByTimeout(t *testing.T) {
	t.Parallel()
	const timeout = 300 * time.Millisecond
	cases := []struct {
		name string
		opt  asynctcp.Option
	}{
		{"ReadTimeout", asynctcp.ReadTimeout(timeout)},
		{"WriteTimeout", asynctcp.WriteTimeout(timeout)},
	}
	pki := tlNewPKI(t)
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			port, hello, closed := tlSilentServer(t)
			l := newTestLoop(t)
			events := newEventRecorder()
			var connects atomic.Int32
			start := time.Now()
			s, err := l.Connect("127.0.0.1", port, nil, events.cb, asynctcp.TLS(pki.client()), tc.opt,
				asynctcp.OnConnect(func(*asynctcp.Socket) { connects.Add(1) }))
			if err != nil {
				t.Fatalf("Connect: %v", err)
			}
			ev := waitFor(t, events.ch, "the handshake timeout")
			elapsed := time.Since(start)
			e := wantEventIs(t, ev, asynctcp.ErrTCPTimeout, "unanswered ClientHello")
			if e.Code != -1 || e.Socket != s {
				t.Errorf("timeout event Code %d, Socket %p; want -1, %p", e.Code, e.Socket, s)
			}
			if elapsed < timeout-50*time.Millisecond || elapsed > timeout+5*time.Second {
				t.Errorf("the handshake timed out after %v, want about %v", elapsed, timeout)
			}
			waitLoopNil(t, l, waitTimeout)
			if b := waitFor(t, hello, "what the client sent"); len(b) == 0 || b[0] != 0x16 {
				t.Errorf("the client sent %d bytes starting %x, want a TLS handshake record (0x16)", len(b), b[:min(len(b), 1)])
			}
			waitFor(t, closed, "the client to close the connection")
			if n := connects.Load(); n != 0 {
				t.Errorf("the connect-cb ran %d times", n)
			}
			if n := events.n.Load(); n != 1 {
				t.Errorf("%d events, want 1", n)
			}
		})
	}
}

// TestTLSCloseDuringHandshake: closing a client whose handshake is under
// way ends it at once: no callback runs, the connection is closed and
// Loop.Wait returns.
func TestTLSCloseDuringHandshake(t *testing.T) {
	t.Parallel()
	pki := tlNewPKI(t)
	port, hello, closed := tlSilentServer(t)
	l := newTestLoop(t)
	events := newEventRecorder()
	var connects atomic.Int32
	s, err := l.Connect("127.0.0.1", port, nil, events.cb, asynctcp.TLS(pki.client()),
		asynctcp.OnConnect(func(*asynctcp.Socket) { connects.Add(1) }))
	if err != nil {
		t.Fatalf("Connect: %v", err)
	}
	if b := waitFor(t, hello, "the ClientHello"); len(b) == 0 || b[0] != 0x16 {
		t.Fatalf("the client sent %x, want a TLS handshake record", b)
	}
	if c := s.Conn(); c != nil {
		t.Errorf("Conn() = %T while the handshake waits for the server, want nil", c)
	}
	if err := s.Close(); err != nil {
		t.Fatalf("Close during the handshake: %v", err)
	}
	waitFor(t, closed, "the connection to close")
	waitLoopNil(t, l, waitTimeout)
	if n := events.n.Load() + connects.Load(); n != 0 {
		t.Errorf("%d callbacks ran after Close", n)
	}
}

// TestDialerResolverAnswersLocally: Connect resolves a host name with the
// Dialer's Resolver (a DNS server on loopback) and connects to what it
// answered.
func TestDialerResolverAnswersLocally(t *testing.T) {
	t.Parallel()
	resolver, queries := tlResolver(t)
	l := newTestLoop(t)
	srvEvents := newEventRecorder()
	srv, err := l.Listen("127.0.0.1", 0, echoBack, srvEvents.cb)
	if err != nil {
		t.Fatalf("Listen: %v", err)
	}
	defer srv.Close()
	remote := make(chan string, 1)
	var got []byte
	done := make(chan string, 1)
	_, err = l.Connect(tlName, portOf(t, srv.Addr()),
		func(s *asynctcp.Socket, data []byte) {
			got = append(got, data...)
			if len(got) == len("ping") {
				done <- string(got)
				s.Close()
			}
		}, nil,
		asynctcp.Dialer(&net.Dialer{Resolver: resolver}),
		asynctcp.Data([]byte("ping")),
		asynctcp.OnConnect(func(s *asynctcp.Socket) { remote <- s.RemoteAddr().String() }))
	if err != nil {
		t.Fatalf("Connect: %v", err)
	}
	if r := waitFor(t, remote, "the connect-cb"); r != srv.Addr().String() {
		t.Errorf("connected to %s, want %s", r, srv.Addr())
	}
	if got := waitFor(t, done, "the echo"); got != "ping" {
		t.Errorf("echo %q", got)
	}
	wantEventIs(t, waitFor(t, srvEvents.ch, "the server's EOF"), asynctcp.ErrTCPEOF, "server")
	srv.Close()
	waitLoopNil(t, l, waitTimeout)
	if queries.Load() == 0 {
		t.Error("the local DNS server was never asked")
	}
}

// TestDialerLocalAddr: the connection leaves from the Dialer's LocalAddr.
func TestDialerLocalAddr(t *testing.T) {
	t.Parallel()
	l := newTestLoop(t)
	fromServer := make(chan string, 1)
	srv, err := l.Listen("127.0.0.1", 0, nil, nil,
		asynctcp.OnConnect(func(s *asynctcp.Socket) { fromServer <- s.RemoteAddr().String() }))
	if err != nil {
		t.Fatalf("Listen: %v", err)
	}
	defer srv.Close()
	local := &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: closedPort(t)}
	fromClient := make(chan string, 1)
	events := newEventRecorder()
	_, err = l.Connect("127.0.0.1", portOf(t, srv.Addr()), nil, events.cb,
		asynctcp.Dialer(&net.Dialer{LocalAddr: local}),
		asynctcp.OnConnect(func(s *asynctcp.Socket) {
			fromClient <- s.LocalAddr().String()
			s.Close()
		}))
	if err != nil {
		t.Fatalf("Connect: %v", err)
	}
	if got := waitFor(t, fromClient, "the client's connect-cb"); got != local.String() {
		t.Errorf("client LocalAddr %s, want %s", got, local)
	}
	if got := waitFor(t, fromServer, "the server's connect-cb"); got != local.String() {
		t.Errorf("the server sees the client at %s, want %s", got, local)
	}
	srv.Close()
	waitLoopNil(t, l, waitTimeout)
	if n := events.n.Load(); n != 0 {
		t.Errorf("the client got %d events: %v", n, <-events.ch)
	}
}

// TestDialerTimeout: the Dialer's Timeout bounds the connect, whichever
// step hangs: a lookup whose DNS server never answers, or a connect held
// in the Dialer's ControlContext. Either way the event is a tcp-timeout
// (rule 9: a connect that runs out of its time ends in ErrTCPTimeout,
// whichever step ran out), and the cause stays wrapped.
func TestDialerTimeout(t *testing.T) {
	t.Parallel()
	const timeout = 300 * time.Millisecond
	hangingResolver := &net.Resolver{PreferGo: true, Dial: func(ctx context.Context, network, address string) (net.Conn, error) {
		<-ctx.Done()
		return nil, ctx.Err()
	}}
	srvLoop := newTestLoop(t)
	srv, err := srvLoop.Listen("127.0.0.1", 0, nil, nil)
	if err != nil {
		t.Fatalf("Listen: %v", err)
	}
	defer srv.Close()
	cases := []struct {
		name string
		host string
		d    *net.Dialer
		dns  bool // the cause is a *net.DNSError
	}{
		{"lookup", tlName, &net.Dialer{Timeout: timeout, Resolver: hangingResolver}, true},
		{"connect", "127.0.0.1", &net.Dialer{Timeout: timeout,
			ControlContext: func(ctx context.Context, network, address string, c syscall.RawConn) error {
				<-ctx.Done()
				return ctx.Err()
			}}, false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			l := newTestLoop(t)
			events := newEventRecorder()
			start := time.Now()
			_, err := l.Connect(tc.host, portOf(t, srv.Addr()), nil, events.cb, asynctcp.Dialer(tc.d))
			if err != nil {
				t.Fatalf("Connect: %v", err)
			}
			ev := waitFor(t, events.ch, "the connect's event")
			elapsed := time.Since(start)
			if elapsed < timeout-50*time.Millisecond || elapsed > timeout+5*time.Second {
				t.Errorf("the connect failed after %v, want about the Dialer's Timeout %v", elapsed, timeout)
			}
			var dnsErr *net.DNSError
			if got := errors.As(ev, &dnsErr); got != tc.dns {
				t.Errorf("errors.As(%v, *net.DNSError) = %v, want %v", ev, got, tc.dns)
			}
			wantEventIs(t, ev, asynctcp.ErrTCPTimeout, "connect past the Dialer's Timeout")
			waitLoopNil(t, l, waitTimeout)
		})
	}
	srv.Close()
	waitLoopNil(t, srvLoop, waitTimeout)
}

// TestDialerControl: the Dialer's Control runs for the connect, with the
// network and the address dialed; an error from it fails the connect
// (before any packet: the server accepts nothing) with an event that wraps
// it.
func TestDialerControl(t *testing.T) {
	t.Parallel()
	l := newTestLoop(t)
	accepted := make(chan string, 4) // the client addresses, in order
	srv, err := l.Listen("127.0.0.1", 0, nil, nil,
		asynctcp.OnConnect(func(s *asynctcp.Socket) { accepted <- s.RemoteAddr().String() }))
	if err != nil {
		t.Fatalf("Listen: %v", err)
	}
	defer srv.Close()

	type call struct{ network, address string }
	calls := make(chan call, 4)
	connected := make(chan string, 1)
	_, err = l.Connect("127.0.0.1", portOf(t, srv.Addr()), nil, nil,
		asynctcp.Dialer(&net.Dialer{Control: func(network, address string, c syscall.RawConn) error {
			calls <- call{network, address}
			return nil
		}}),
		asynctcp.OnConnect(func(s *asynctcp.Socket) {
			connected <- s.LocalAddr().String()
			s.Close()
		}))
	if err != nil {
		t.Fatalf("Connect: %v", err)
	}
	first := waitFor(t, connected, "the connect-cb")
	c := waitFor(t, calls, "the Control call")
	if c.network != "tcp4" && c.network != "tcp" {
		t.Errorf("Control network %q, want tcp4", c.network)
	}
	if c.address != srv.Addr().String() {
		t.Errorf("Control address %q, want %q", c.address, srv.Addr())
	}
	if got := waitFor(t, accepted, "the server's first accept"); got != first {
		t.Errorf("the server accepted %s, want the client at %s", got, first)
	}

	errRefusedByControl := errors.New("refused by Control")
	events := newEventRecorder()
	var connects atomic.Int32
	s, err := l.Connect("127.0.0.1", portOf(t, srv.Addr()), nil, events.cb,
		asynctcp.Dialer(&net.Dialer{Control: func(string, string, syscall.RawConn) error {
			return errRefusedByControl
		}}),
		asynctcp.OnConnect(func(*asynctcp.Socket) { connects.Add(1) }))
	if err != nil {
		t.Fatalf("Connect: %v", err)
	}
	ev := waitFor(t, events.ch, "the failed connect's event")
	wantEventIs(t, ev, asynctcp.ErrTCPError, "connect refused by Control")
	if !errors.Is(ev, errRefusedByControl) {
		t.Errorf("event %v does not wrap Control's error", ev)
	}

	// A last connect: had the refused one reached the server, the server
	// would have accepted it before this one.
	last := make(chan string, 1)
	_, err = l.Connect("127.0.0.1", portOf(t, srv.Addr()), nil, nil, asynctcp.OnConnect(func(s *asynctcp.Socket) {
		last <- s.LocalAddr().String()
		s.Close()
	}))
	if err != nil {
		t.Fatalf("Connect: %v", err)
	}
	want := waitFor(t, last, "the last connect-cb")
	if got := waitFor(t, accepted, "the server's next accept"); got != want {
		t.Errorf("the server accepted %s next, want the last client %s", got, want)
	}
	srv.Close()
	waitLoopNil(t, l, waitTimeout)
	if n := connects.Load(); n != 0 {
		t.Errorf("the connect-cb ran %d times after Control failed", n)
	}
	if !s.Closed() {
		t.Error("socket open after Control failed its connect")
	}
}
