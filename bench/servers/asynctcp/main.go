// Command asynctcp is an echo server on asynctcp: Listen with a read-cb
// that writes the data back, then DefaultLoop.Wait.
//
// With -reuse (or ASYNCTCP_REUSE=1) it adds ReuseReadBuffer, the
// "asynctcp-reuse" variant of the run script.
package main

import (
	"flag"
	"log"
	"os"

	"github.com/asynctcp/asynctcp"
	"github.com/asynctcp/asynctcp/bench/internal/port"
)

func main() {
	reuse := flag.Bool("reuse", os.Getenv("ASYNCTCP_REUSE") == "1", "lend the read-cb the read buffer (ReuseReadBuffer)")
	flag.Parse()
	os.Args = append(os.Args[:1], flag.Args()...) // the port is the first non-flag argument
	var opts []asynctcp.Option
	if *reuse {
		opts = append(opts, asynctcp.ReuseReadBuffer())
	}
	// A nil event-cb leaves events to DefaultLoop.EventHandler: EOF and
	// resets from the load generator closing its connections are expected.
	_, err := asynctcp.Listen("127.0.0.1", port.Get(), func(s *asynctcp.Socket, data []byte) {
		s.WriteData(data)
	}, func(error) {}, opts...)
	if err != nil {
		log.Fatal(err)
	}
	asynctcp.DefaultLoop.Wait()
}
