module github.com/asynctcp/asynctcp

go 1.23

require (
	go.uber.org/goleak v1.3.0
	golang.org/x/net v0.33.0
	golang.org/x/sync v0.11.0
	golang.org/x/time v0.10.0
)
