package main

import (
	"context"
	"net"
	"path/filepath"
	"strings"
	"testing"

	"github.com/rs/zerolog"
)

// TestStartStackFailsCleanly: when a late step of the start fails (here the metrics
// listener's address is taken), startStack returns the error instead of panicking, and
// closes what it had started, so the broker's port is free again.
func TestStartStackFailsCleanly(t *testing.T) {
	taken, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer taken.Close()
	mqtt := freeAddr(t)
	c := stackConfig{dataDir: filepath.Join(t.TempDir(), "data"), listen: mqtt, httpAddr: taken.Addr().String(), chainLength: 16}
	s, err := startStack(context.Background(), c, zerolog.Nop())
	if err == nil {
		s.close()
		t.Fatal("startStack succeeded with its metrics address taken")
	}
	if s != nil || !strings.Contains(err.Error(), "metrics listener") {
		t.Fatalf("startStack = %v, %v; want nil and the listener error", s, err)
	}
	l, err := net.Listen("tcp", mqtt)
	if err != nil {
		t.Fatalf("the broker's address is still taken after the failed start: %v", err)
	}
	l.Close()
}
