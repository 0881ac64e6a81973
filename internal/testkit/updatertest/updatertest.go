// Package updatertest runs a real updater for tests of other packages: a brokertest
// broker on 127.0.0.1, the updater connected to it through mqttbus as the updater
// account, an embedded (boltstore) or Redis (redisstore, with a real redis-server) store,
// and an operator client connected as admin.
//
//	e := updatertest.Start(t, updatertest.Bolt)
//	files, _ := e.Op.Provision(ctx, serials, 16)
//	rid := e.Release(t, image, 1) // upload and release.create, to every device
//
// Everything stops when the test ends.
package updatertest

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"errors"
	"fmt"
	"path/filepath"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/rs/zerolog"

	"github.com/sealcast/sealcast/internal/testkit/brokertest"
	"github.com/sealcast/sealcast/internal/testkit/redistest"
	"github.com/sealcast/sealcast/keychain"
	"github.com/sealcast/sealcast/operator"
	"github.com/sealcast/sealcast/protocol"
	"github.com/sealcast/sealcast/updater"
	"github.com/sealcast/sealcast/updater/boltstore"
	"github.com/sealcast/sealcast/updater/mqttbus"
	"github.com/sealcast/sealcast/updater/redisstore"
)

// Opener opens a fresh, empty store for a test; the Env closes it.
type Opener func(t testing.TB) updater.Store

// Bolt opens an embedded store in the test's temporary directory.
func Bolt(t testing.TB) updater.Store {
	t.Helper()
	s, err := boltstore.Open(filepath.Join(t.TempDir(), "sealcast.db"), boltstore.Options{})
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// Redis opens a Redis store under a key prefix of its own, on REDIS_URL or on a
// redis-server started for the test (skipped when there is none, see redistest.Need).
func Redis(t testing.TB) updater.Store {
	t.Helper()
	return RedisAt(t, redistest.URL(t))
}

// RedisAt opens a Redis store on the server at url, under a key prefix of its own.
func RedisAt(t testing.TB, url string) updater.Store {
	t.Helper()
	o, err := redis.ParseURL(url)
	if err != nil {
		t.Fatal(err)
	}
	return redisstore.New(redis.NewClient(o), redisstore.Options{Prefix: redistest.Prefix(t)})
}

// Stores names both stores, for tests that run on each.
var Stores = []struct {
	Name string
	Open Opener
}{{"bolt", Bolt}, {"redis", Redis}}

// Env is a broker, a store, a running updater and an operator client, all real.
type Env struct {
	Broker     *brokertest.Env
	Store      updater.Store
	Updater    *updater.Updater
	Op         *operator.Client // connected as admin
	SigningKey ed25519.PrivateKey
	tweak      []func(*updater.Options)
	stop       func() // stops the updater and closes its bus
}

// Start starts the whole stack and returns once the updater answers admin requests.
// The updater logs warnings and errors to the test log; tweak may change its options
// (the chain length of new devices and re-keys is 16 unless changed).
func Start(t testing.TB, open Opener, tweak ...func(*updater.Options)) *Env {
	t.Helper()
	b := brokertest.Start(t)
	_, signer, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	e := &Env{Broker: b, Store: open(t), SigningKey: signer, tweak: tweak}
	// Cleanups run last in, first out: the operator goes first, then the updater, then
	// the store, then the broker.
	t.Cleanup(func() { e.Store.Close() })
	t.Cleanup(func() { e.stop() })
	e.startUpdater(t)
	op, err := operator.Dial(context.Background(), operator.Options{URL: b.URL, Username: b.Admin.Username, Password: b.Admin.Password, Timeout: 30 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	e.Op = op
	t.Cleanup(op.Close)
	e.waitReady(t)
	return e
}

func (e *Env) startUpdater(t testing.TB) {
	t.Helper()
	e.stop = func() {}
	ctx, cancel := context.WithCancel(context.Background())
	bus, err := mqttbus.Dial(ctx, mqttbus.Options{URL: e.Broker.URL, ClientID: "updater", Username: e.Broker.Updater.Username, Password: e.Broker.Updater.Password})
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	o := updater.Options{
		Root: e.Broker.Root, SigningKey: e.SigningKey, Store: e.Store, Bus: bus, DataDir: t.TempDir(),
		ChainLength: 16, BrokerURL: e.Broker.URL, Revoker: e.Broker.Broker,
		Logger: zerolog.New(zerolog.NewTestWriter(t)).Level(zerolog.WarnLevel),
	}
	for _, f := range e.tweak {
		f(&o)
	}
	u, err := updater.New(o)
	if err != nil {
		cancel()
		bus.Close()
		t.Fatal(err)
	}
	e.Updater = u
	done := make(chan struct{})
	go func() {
		defer close(done)
		u.Run(ctx)
	}()
	e.stop = func() {
		cancel()
		<-done
		bus.Close()
	}
}

// RestartUpdater stops the updater and starts a new one on the same store and broker, as
// a process restart would, and returns once it answers admin requests. Uploads in
// progress are lost (PROTOCOL.md 12.3); the new updater's Stats start from zero.
func (e *Env) RestartUpdater(t testing.TB) {
	t.Helper()
	e.stop()
	e.startUpdater(t)
	e.waitReady(t)
}

// waitReady polls with release.list until the updater has subscribed to admin requests:
// a request published before that is lost, and the operator would wait its full timeout.
func (e *Env) waitReady(t testing.TB) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
		err := e.Op.Do(ctx, protocol.CmdReleaseList, nil, nil)
		cancel()
		if err == nil {
			return
		}
		if !errors.Is(err, context.DeadlineExceeded) || time.Now().After(deadline) {
			t.Fatalf("updatertest: the updater does not answer admin requests: %v", err)
		}
	}
}

// Release uploads img and creates a release of it with 1 KiB chunks, for devices (every
// provisioned device if none are named).
func (e *Env) Release(t testing.TB, img []byte, version uint64, devices ...string) keychain.ReleaseID {
	t.Helper()
	args := protocol.ReleaseCreateArgs{Version: version, Devices: devices, All: len(devices) == 0, ChunkSize: keychain.MinChunkSize, Label: fmt.Sprintf("v%d", version)}
	res, err := e.Op.Release(context.Background(), bytes.NewReader(img), int64(len(img)), args)
	if err != nil {
		t.Fatalf("updatertest: release version %d: %v", version, err)
	}
	return res.Release
}

// Device returns the store's record of serial.
func (e *Env) Device(t testing.TB, serial string) *updater.Device {
	t.Helper()
	ds, err := e.Store.Devices(context.Background(), []string{serial})
	if err != nil || ds[0] == nil {
		t.Fatalf("updatertest: device %s: %v", serial, err)
	}
	return ds[0]
}
