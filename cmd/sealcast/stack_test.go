package main

import (
	"context"
	"io"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"golang.org/x/crypto/bcrypt"

	"github.com/sealcast/sealcast/broker"
	"github.com/sealcast/sealcast/internal/testkit/redistest"
	"github.com/sealcast/sealcast/protocol"
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

// TestHealthz: /healthz says ok while the broker answers MQTT and the store answers, and
// 503 with the reason when Redis is down, and ok again when it is back.
func TestHealthz(t *testing.T) {
	rs := redistest.Start(t)
	c := stackConfig{dataDir: filepath.Join(t.TempDir(), "data"), listen: "127.0.0.1:0",
		httpAddr: "127.0.0.1:0", redisURL: rs.URL(), chainLength: 16}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	s, err := startStack(ctx, c, zerolog.Nop())
	if err != nil {
		t.Fatal(err)
	}
	defer s.close()
	health := func() (int, string) {
		resp, err := http.Get("http://" + s.httpAddr.String() + "/healthz")
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, strings.TrimSpace(string(b))
	}
	if code, body := health(); code != http.StatusOK || body != "ok" {
		t.Fatalf("healthy stack: %d %q", code, body)
	}
	rs.Kill()
	if code, body := health(); code != http.StatusServiceUnavailable || !strings.HasPrefix(body, "store:") {
		t.Fatalf("Redis down: %d %q, want 503 naming the store", code, body)
	}
	rs.Restart(t)
	deadline := time.Now().Add(30 * time.Second)
	for {
		code, body := health()
		if code == http.StatusOK {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("Redis back: still %d %q", code, body)
		}
		time.Sleep(100 * time.Millisecond)
	}
	s.broker.Close()
	if code, body := health(); code != http.StatusServiceUnavailable || !strings.HasPrefix(body, "broker:") {
		t.Fatalf("broker closed: %d %q, want 503 naming the broker", code, body)
	}
}

// TestAccountNamedLikeADevice: serve refuses to start with a broker account named like a
// provisioned device, which the broker would take for the account ([SC-2.2]).
func TestAccountNamedLikeADevice(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "data")
	c := stackConfig{dataDir: dir, listen: freeAddr(t), chainLength: 16}
	s, err := startStack(context.Background(), c, zerolog.Nop())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.upd.Admin().Provision(context.Background(), protocol.ProvisionArgs{Serials: []string{"ops-alice"}}); err != nil {
		t.Fatal(err)
	}
	s.close()
	h, err := bcrypt.GenerateFromPassword([]byte("pw"), bcrypt.MinCost)
	if err != nil {
		t.Fatal(err)
	}
	accounts := filepath.Join(dir, broker.AccountsFile)
	if err := broker.AddAccountToFile(accounts, broker.Account{Username: "ops-alice", Role: broker.RoleMonitor, PasswordHash: string(h)}); err != nil {
		t.Fatal(err)
	}
	s, err = startStack(context.Background(), c, zerolog.Nop())
	if err == nil {
		s.close()
		t.Fatal("serve started with an account named like a provisioned device")
	}
	if !strings.Contains(err.Error(), `account "ops-alice" has the name of a provisioned device`) {
		t.Fatalf("error %q does not name the account", err)
	}
}
