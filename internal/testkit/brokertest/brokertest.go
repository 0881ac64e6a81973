// Package brokertest starts a real Sealcast broker on 127.0.0.1 for tests of other
// packages: fresh keys, an admin, a monitor and an updater account with known passwords,
// and device credentials minted on demand.
//
//	env := brokertest.Start(t)
//	dev := env.Device(t, "sensor-1") // username, password for serial sensor-1
//	opts := paho.NewClientOptions().AddBroker(env.URL).SetUsername(dev.Username)...
package brokertest

import (
	"fmt"
	"strings"
	"sync"
	"testing"

	"github.com/rs/zerolog"
	"golang.org/x/crypto/bcrypt"

	"github.com/sealcast/sealcast/broker"
	"github.com/sealcast/sealcast/keychain"
)

// Credentials are an MQTT username and password.
type Credentials struct {
	Username, Password string
}

// Env is a running broker and what a test needs to talk to it.
type Env struct {
	Broker  *broker.Broker
	Root    keychain.RootSecret
	AuthKey keychain.BrokerAuthKey
	// Addr is the plain TCP listener, host:port; URL is "tcp://" + Addr.
	Addr, URL string
	// Admin, Monitor and Updater are accounts of those roles.
	Admin, Monitor, Updater Credentials
	// Options are the options the broker was started with (for Restart).
	Options broker.Options
}

// Option changes the broker options before Start.
type Option func(*broker.Options)

// WithDataDir persists the broker's state in dir (Restart keeps it).
func WithDataDir(dir string) Option { return func(o *broker.Options) { o.DataDir = dir } }

// WithOptions applies f to the options.
func WithOptions(f func(*broker.Options)) Option { return Option(f) }

// Account usernames in every Env; passwords are the username + "-pw".
const (
	AdminUser   = "admin"
	MonitorUser = "monitor"
	UpdaterUser = "updater"
)

// Start starts a broker on 127.0.0.1:0 and closes it when the test ends.
func Start(t testing.TB, opts ...Option) *Env {
	t.Helper()
	root, err := keychain.NewRootSecret()
	if err != nil {
		t.Fatal(err)
	}
	env := &Env{Root: root, AuthKey: root.BrokerAuth()}
	o := broker.Options{
		TCPAddr: "127.0.0.1:0",
		AuthKey: env.AuthKey,
		Logger:  zerolog.New(newTestWriter(t)).Level(zerolog.InfoLevel).With().Timestamp().Logger(),
	}
	for _, c := range []struct {
		creds *Credentials
		name  string
		role  broker.Role
	}{
		{&env.Admin, AdminUser, broker.RoleAdmin},
		{&env.Monitor, MonitorUser, broker.RoleMonitor},
		{&env.Updater, UpdaterUser, broker.RoleUpdater},
	} {
		*c.creds = Credentials{Username: c.name, Password: c.name + "-pw"}
		// The lowest bcrypt cost keeps tests fast; production uses broker.NewAccount.
		h, err := bcrypt.GenerateFromPassword([]byte(c.creds.Password), bcrypt.MinCost)
		if err != nil {
			t.Fatal(err)
		}
		o.Accounts = append(o.Accounts, broker.Account{Username: c.name, Role: c.role, PasswordHash: string(h)})
	}
	for _, f := range opts {
		f(&o)
	}
	env.Options = o
	env.start(t)
	return env
}

func (env *Env) start(t testing.TB) {
	t.Helper()
	b, err := broker.New(env.Options)
	if err != nil {
		t.Fatalf("brokertest: %v", err)
	}
	if err := b.Start(); err != nil {
		b.Close()
		t.Fatalf("brokertest: %v", err)
	}
	t.Cleanup(func() { b.Close() })
	env.Broker = b
	env.Addr = b.Addr(broker.ListenerTCP).String()
	env.URL = "tcp://" + env.Addr
}

// Restart closes the broker and starts a new one with the same options, keys and port,
// as a process restart would. With WithDataDir, sessions and retained messages survive.
func (env *Env) Restart(t testing.TB) {
	t.Helper()
	if err := env.Broker.Close(); err != nil {
		t.Fatalf("brokertest: closing: %v", err)
	}
	env.Options.TCPAddr = env.Addr
	env.start(t)
}

// Device returns the credentials of the device with this serial (username = client id =
// serial, PROTOCOL.md 3.5).
func (env *Env) Device(t testing.TB, serial string) Credentials {
	t.Helper()
	pw, err := env.AuthKey.DevicePassword(serial)
	if err != nil {
		t.Fatal(err)
	}
	return Credentials{Username: serial, Password: pw}
}

// testWriter sends log lines to t.Log until the test ends, and drops them after, since
// testing panics on a Log after the test has completed.
type testWriter struct {
	mu   sync.Mutex
	t    testing.TB
	done bool
}

func newTestWriter(t testing.TB) *testWriter {
	w := &testWriter{t: t}
	t.Cleanup(func() { w.mu.Lock(); w.done = true; w.mu.Unlock() })
	return w
}

func (w *testWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if !w.done {
		w.t.Log(strings.TrimRight(string(p), "\n"))
	}
	return len(p), nil
}

// String describes the environment in test logs.
func (env *Env) String() string { return fmt.Sprintf("broker at %s", env.URL) }
