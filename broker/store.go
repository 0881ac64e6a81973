package broker

import (
	"fmt"
	"sync"

	pebbledb "github.com/cockroachdb/pebble"
	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/hooks/storage"
	mochipebble "github.com/mochi-mqtt/server/v2/hooks/storage/pebble"
	"github.com/mochi-mqtt/server/v2/packets"
	"github.com/mochi-mqtt/server/v2/system"
	"github.com/rs/zerolog"
)

// store persists sessions, subscriptions, inflight (queued) QoS 1 deliveries and retained
// messages in a pebble database under the data directory, with every write synced.
//
// mochi v2.7.9's redis and bolt hooks lose the packet identifiers of inflight messages on
// reload; its pebble hook keeps them (TestRestartKeepsRetainedAndQueued checks). This
// wrapper adds what the pebble hook lacks: its Stop sets its database to nil while mochi's
// event loop may still deliver a $SYS tick, so every call here is guarded by a lock and
// ignored after Stop.
type store struct {
	*mochipebble.Hook
	mu     sync.RWMutex
	closed bool
}

func newStore(dir string, log zerolog.Logger) (*store, mochipebble.Options) {
	return &store{Hook: new(mochipebble.Hook)}, mochipebble.Options{
		Path: dir,
		Mode: mochipebble.Sync,
		Options: &pebbledb.Options{
			Logger: pebbleLogger{log},
		},
	}
}

// pebbleLogger routes pebble's own log lines to zerolog at debug level.
type pebbleLogger struct{ log zerolog.Logger }

func (l pebbleLogger) Infof(format string, args ...any) { l.log.Debug().Msgf(format, args...) }
func (l pebbleLogger) Fatalf(format string, args ...any) {
	l.log.Error().Msgf(format, args...)
	panic(fmt.Sprintf(format, args...)) // pebble's contract: Fatalf does not return
}

func (s *store) ID() string { return "sealcast-pebble" }

func (s *store) Stop() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil
	}
	s.closed = true
	return s.Hook.Stop()
}

// with runs f under the read lock unless the store is stopped.
func (s *store) with(f func()) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	if !s.closed {
		f()
	}
}

func (s *store) OnSessionEstablished(cl *mqtt.Client, pk packets.Packet) {
	s.with(func() { s.Hook.OnSessionEstablished(cl, pk) })
}
func (s *store) OnWillSent(cl *mqtt.Client, pk packets.Packet) {
	s.with(func() { s.Hook.OnWillSent(cl, pk) })
}
func (s *store) OnDisconnect(cl *mqtt.Client, err error, expire bool) {
	s.with(func() { s.Hook.OnDisconnect(cl, err, expire) })
}
func (s *store) OnSubscribed(cl *mqtt.Client, pk packets.Packet, codes []byte) {
	s.with(func() { s.Hook.OnSubscribed(cl, pk, codes) })
}
func (s *store) OnUnsubscribed(cl *mqtt.Client, pk packets.Packet) {
	s.with(func() { s.Hook.OnUnsubscribed(cl, pk) })
}
func (s *store) OnRetainMessage(cl *mqtt.Client, pk packets.Packet, r int64) {
	s.with(func() { s.Hook.OnRetainMessage(cl, pk, r) })
}
func (s *store) OnQosPublish(cl *mqtt.Client, pk packets.Packet, sent int64, resends int) {
	s.with(func() { s.Hook.OnQosPublish(cl, pk, sent, resends) })
}
func (s *store) OnQosComplete(cl *mqtt.Client, pk packets.Packet) {
	s.with(func() { s.Hook.OnQosComplete(cl, pk) })
}
func (s *store) OnQosDropped(cl *mqtt.Client, pk packets.Packet) {
	s.with(func() { s.Hook.OnQosDropped(cl, pk) })
}
func (s *store) OnSysInfoTick(info *system.Info) {
	s.with(func() { s.Hook.OnSysInfoTick(info) })
}
func (s *store) OnRetainedExpired(filter string) {
	s.with(func() { s.Hook.OnRetainedExpired(filter) })
}
func (s *store) OnClientExpired(cl *mqtt.Client) {
	s.with(func() { s.Hook.OnClientExpired(cl) })
}
func (s *store) StoredClients() (v []storage.Client, err error) {
	s.with(func() { v, err = s.Hook.StoredClients() })
	return
}
func (s *store) StoredSubscriptions() (v []storage.Subscription, err error) {
	s.with(func() { v, err = s.Hook.StoredSubscriptions() })
	return
}
func (s *store) StoredInflightMessages() (v []storage.Message, err error) {
	s.with(func() { v, err = s.Hook.StoredInflightMessages() })
	return
}
func (s *store) StoredRetainedMessages() (v []storage.Message, err error) {
	s.with(func() { v, err = s.Hook.StoredRetainedMessages() })
	return
}
func (s *store) StoredSysInfo() (v storage.SystemInfo, err error) {
	s.with(func() { v, err = s.Hook.StoredSysInfo() })
	return
}
