package updater_test

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/sealcast/sealcast/internal/testkit/brokertest"
	"github.com/sealcast/sealcast/internal/testkit/redistest"
	"github.com/sealcast/sealcast/operator"
	"github.com/sealcast/sealcast/updater"
	"github.com/sealcast/sealcast/updater/mqttbus"
)

// TestStartWaitsForStore: an updater started while Redis is down neither stops nor
// claims to be ready; it gets ready once Redis is back, and answers admin requests.
func TestStartWaitsForStore(t *testing.T) {
	b := brokertest.Start(t)
	rds := redistest.Start(t)
	store := redisAt(t, rds.URL())
	defer store.Close()
	rds.Kill()

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	bus, err := mqttbus.Dial(ctx, mqttbus.Options{URL: b.URL, ClientID: "updater-ready", Username: b.Updater.Username, Password: b.Updater.Password})
	if err != nil {
		t.Fatal(err)
	}
	defer bus.Close()
	_, signer, _ := ed25519.GenerateKey(rand.Reader)
	u, err := updater.New(updater.Options{
		Root: b.Root, SigningKey: signer, Store: store, Bus: bus, DataDir: t.TempDir(), ChainLength: 16,
		Logger: zerolog.New(zerolog.NewTestWriter(t)).Level(zerolog.WarnLevel),
	})
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- u.Run(ctx) }()
	select {
	case <-u.Ready():
		t.Fatal("ready while the store is down")
	case err := <-done:
		t.Fatalf("Run stopped while the store is down: %v", err)
	case <-time.After(time.Second):
	}
	rds.Restart(t)
	select {
	case <-u.Ready():
	case err := <-done:
		t.Fatalf("Run stopped: %v", err)
	case <-time.After(30 * time.Second):
		t.Fatal("not ready 30 s after the store came back")
	}
	op, err := operator.Dial(ctx, operator.Options{URL: b.URL, Username: b.Admin.Username, Password: b.Admin.Password, Timeout: 20 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer op.Close()
	if files, err := op.Provision(ctx, []string{"dev-a", "dev-b"}, 0); err != nil || len(files) != 2 {
		t.Fatalf("provisioning after the store came back: %d devices, %v", len(files), err)
	}
	cancel()
	if err := <-done; err != context.Canceled {
		t.Fatalf("Run returned %v, want context.Canceled", err)
	}
}
