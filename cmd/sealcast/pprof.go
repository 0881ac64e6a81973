package main

import (
	"fmt"
	"net"
	"net/http"
	"net/http/pprof"
	"time"
)

// startPprof serves Go's profiles (net/http/pprof) on their own listener, so that they are
// never exposed by accident on the /metrics port. Off unless -pprof is given; bind it to
// loopback: profiles reveal memory contents.
func (s *stack) startPprof(addr string) error {
	mux := http.NewServeMux()
	mux.HandleFunc("/debug/pprof/", pprof.Index) // also serves heap, goroutine, allocs...
	mux.HandleFunc("/debug/pprof/cmdline", pprof.Cmdline)
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
	mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("pprof listener: %w", err)
	}
	s.pprofAddr = l.Addr()
	s.pprof = &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	go s.pprof.Serve(l)
	return nil
}
