// Package mqtttest starts a plain MQTT broker (mochi, the same patched copy the Sealcast
// broker embeds) on 127.0.0.1 for tests of the device package: real TCP, real MQTT 3.1.1,
// every client allowed, so that a test of the agent's MQTT handling needs no fleet keys.
// Tests of the agent against the Sealcast broker and updater, with real credentials and
// access rules, are in tests/e2e.
package mqtttest

import (
	"io"
	"log/slog"
	"net"
	"testing"

	mochi "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/hooks/auth"
	"github.com/mochi-mqtt/server/v2/listeners"
)

// Broker is a running broker.
type Broker struct {
	URL    string // tcp://127.0.0.1:port
	Server *mochi.Server
}

// Start starts a broker and stops it when the test ends.
func Start(t testing.TB) *Broker {
	t.Helper()
	b, err := StartBroker()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { b.Server.Close() })
	return b
}

// StartBroker starts a broker; the caller closes b.Server.
func StartBroker() (*Broker, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	caps := mochi.NewDefaultServerCapabilities()
	caps.MaximumClientWritesPending = 64 * 1024
	s := mochi.New(&mochi.Options{
		Capabilities: caps,
		Logger:       slog.New(slog.NewTextHandler(io.Discard, nil)),
	})
	if err := s.AddHook(new(auth.AllowHook), nil); err != nil {
		return nil, err
	}
	if err := s.AddListener(listeners.NewNet("t1", ln)); err != nil {
		return nil, err
	}
	if err := s.Serve(); err != nil {
		return nil, err
	}
	return &Broker{URL: "tcp://" + ln.Addr().String(), Server: s}, nil
}
