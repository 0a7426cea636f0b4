// Command nbio is nbio's plain echo server, nbio's defaults.
package main

import (
	"log"

	"github.com/lesismal/nbio"

	"github.com/asynctcp/asynctcp/bench/internal/port"
)

func main() {
	engine := nbio.NewEngine(nbio.Config{
		Network: "tcp",
		Addrs:   []string{port.Addr()},
	})
	engine.OnData(func(c *nbio.Conn, data []byte) {
		// data is nbio's shared read buffer: Write copies what it cannot
		// send at once, as in nbio's own echo example.
		_, _ = c.Write(data)
	})
	if err := engine.Start(); err != nil {
		log.Fatal(err)
	}
	select {}
}
