module github.com/asynctcp/asynctcp

go 1.22

require (
	go.uber.org/goleak v1.3.0 // indirect
	golang.org/x/net v0.33.0 // indirect
	golang.org/x/sync v0.11.0 // indirect
)
