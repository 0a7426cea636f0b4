// Command gnet is gnet v2's plain echo server, multicore, gnet's defaults.
package main

import (
	"log"

	"github.com/panjf2000/gnet/v2"

	"github.com/asynctcp/asynctcp/bench/internal/port"
)

type echo struct {
	gnet.BuiltinEventEngine
}

func (*echo) OnTraffic(c gnet.Conn) gnet.Action {
	buf, _ := c.Next(-1)
	_, _ = c.Write(buf)
	return gnet.None
}

func main() {
	log.Fatal(gnet.Run(&echo{}, "tcp://"+port.Addr(), gnet.WithMulticore(true)))
}
