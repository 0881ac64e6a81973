package broker

import (
	"fmt"
	"strings"
	"sync"

	pebbledb "github.com/cockroachdb/pebble"
	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/hooks/storage"
	mochipebble "github.com/mochi-mqtt/server/v2/hooks/storage/pebble"
	"github.com/mochi-mqtt/server/v2/packets"
	"github.com/mochi-mqtt/server/v2/system"
	"github.com/rs/zerolog"

	"github.com/sealcast/sealcast/protocol"
)

// store persists sessions, subscriptions, inflight (queued) QoS 1 deliveries and retained
// messages in a pebble database under the data directory, with every write synced.
//
// Except on release topics: retained manifests and chunks are stored, but a client's
// subscriptions to release topics and its deliveries in flight from them are not. A
// device opens and closes a chunk subscription for every chunk it fetches ([SC-9.4]), so
// storing them cost three synced writes per chunk per device and most of the broker's CPU
// in a fleet-wide download (docs/BENCHMARKS.md); they are worth nothing after a restart,
// since a reconnecting device subscribes again to what it still needs ([SC-9.5]).
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

	// inflight holds the keys (client id, packet id) of the inflight messages that are
	// in the database, so that completing a release delivery, which was never stored,
	// costs no synced delete. mochi reports completion with the PUBACK, which has no
	// topic.
	inflightMu sync.Mutex
	inflight   map[inflightID]struct{}
	persistent map[string]bool // stored sessions at start: client id -> outlives a disconnect
}

type inflightID struct {
	client string
	id     uint16
}

func newStore(dir string, log zerolog.Logger) (*store, mochipebble.Options) {
	return &store{Hook: new(mochipebble.Hook), inflight: map[inflightID]struct{}{}}, mochipebble.Options{
		Path: dir,
		Mode: mochipebble.Sync,
		// Key messages and receipts are written without their own sync: the updater
		// publishes them again after a crash (active releases resume and re-wrap; a
		// device re-sends its ack until it sees a receipt, PROTOCOL.md 10.4). They become
		// durable with the next synced write. Everything else is synced.
		RetainNoSync: republished,
		Options: &pebbledb.Options{
			Logger: pebbleLogger{log},
		},
	}
}

// republished reports whether topic is a device's key or receipt topic.
func republished(topic string) bool {
	return filterWithin(topic, protocol.KeyFilter) || filterWithin(topic, protocol.ReceiptFilter)
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
	if expire { // the session ends: mochi forgets its inflight messages without completing them
		s.inflightMu.Lock()
		for k := range s.inflight {
			if k.client == cl.ID {
				delete(s.inflight, k)
			}
		}
		s.inflightMu.Unlock()
	}
	s.with(func() { s.Hook.OnDisconnect(cl, err, expire) })
}
func (s *store) OnSubscribed(cl *mqtt.Client, pk packets.Packet, codes []byte) {
	if sessionEnds(cl) {
		return // nothing of a clean session survives it, so nothing is stored
	}
	if pk, codes, ok := durableFilters(pk, codes); ok {
		s.with(func() { s.Hook.OnSubscribed(cl, pk, codes) })
	}
}
func (s *store) OnUnsubscribed(cl *mqtt.Client, pk packets.Packet) {
	if sessionEnds(cl) {
		return
	}
	if pk, _, ok := durableFilters(pk, nil); ok {
		s.with(func() { s.Hook.OnUnsubscribed(cl, pk) })
	}
}
func (s *store) OnRetainMessage(cl *mqtt.Client, pk packets.Packet, r int64) {
	s.with(func() { s.Hook.OnRetainMessage(cl, pk, r) })
}
func (s *store) OnQosPublish(cl *mqtt.Client, pk packets.Packet, sent int64, resends int) {
	if isReleaseTopic(pk.TopicName) || sessionEnds(cl) {
		return
	}
	s.inflightMu.Lock()
	s.inflight[inflightID{cl.ID, pk.PacketID}] = struct{}{}
	s.inflightMu.Unlock()
	s.with(func() { s.Hook.OnQosPublish(cl, pk, sent, resends) })
}
func (s *store) OnQosComplete(cl *mqtt.Client, pk packets.Packet) {
	if s.forgetInflight(cl, pk) {
		s.with(func() { s.Hook.OnQosComplete(cl, pk) })
	}
}
func (s *store) OnQosDropped(cl *mqtt.Client, pk packets.Packet) {
	if s.forgetInflight(cl, pk) {
		s.with(func() { s.Hook.OnQosDropped(cl, pk) })
	}
}

// forgetInflight reports whether the inflight message of pk's packet id was stored, and
// forgets it.
func (s *store) forgetInflight(cl *mqtt.Client, pk packets.Packet) bool {
	k := inflightID{cl.ID, pk.PacketID}
	s.inflightMu.Lock()
	defer s.inflightMu.Unlock()
	_, ok := s.inflight[k]
	delete(s.inflight, k)
	return ok
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

// StoredClients also remembers which stored sessions outlive a disconnect: mochi
// restores every stored subscription, also those of clean sessions that a crash left in
// the store, and such a ghost subscriber takes its share of a shared subscription's
// messages and drops them.
func (s *store) StoredClients() (v []storage.Client, err error) {
	s.with(func() { v, err = s.Hook.StoredClients() })
	s.inflightMu.Lock()
	s.persistent = map[string]bool{}
	for _, c := range v {
		ends := c.ProtocolVersion < 5 && c.Clean || c.ProtocolVersion == 5 && c.Properties.SessionExpiryInterval == 0
		s.persistent[c.ID] = !ends
	}
	s.inflightMu.Unlock()
	return
}

// StoredSubscriptions returns the stored subscriptions of the sessions that outlive a
// disconnect (StoredClients is read first).
func (s *store) StoredSubscriptions() (v []storage.Subscription, err error) {
	s.with(func() { v, err = s.Hook.StoredSubscriptions() })
	s.inflightMu.Lock()
	defer s.inflightMu.Unlock()
	if s.persistent == nil {
		return v, err
	}
	kept := v[:0]
	for _, sub := range v {
		if s.persistent[sub.Client] {
			kept = append(kept, sub)
		}
	}
	return kept, err
}
func (s *store) StoredInflightMessages() (v []storage.Message, err error) {
	s.with(func() { v, err = s.Hook.StoredInflightMessages() })
	s.inflightMu.Lock()
	for _, m := range v {
		s.inflight[inflightID{m.Client, m.PacketID}] = struct{}{}
	}
	s.inflightMu.Unlock()
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

// isReleaseTopic reports whether topic is a release topic (a manifest or a chunk).
func isReleaseTopic(topic string) bool {
	return strings.HasPrefix(topic, protocol.ReleasesPrefix)
}

// durableFilters returns pk without its release-topic filters (and codes without theirs,
// when given), and whether any filter is left to store.
func durableFilters(pk packets.Packet, codes []byte) (packets.Packet, []byte, bool) {
	keep := 0
	for _, f := range pk.Filters {
		if !strings.HasPrefix(f.Filter, protocol.ReleasesPrefix) {
			keep++
		}
	}
	if keep == len(pk.Filters) {
		return pk, codes, keep > 0
	}
	if keep == 0 {
		return pk, codes, false
	}
	out := pk
	out.Filters = make(packets.Subscriptions, 0, keep)
	var outCodes []byte
	for i, f := range pk.Filters {
		if strings.HasPrefix(f.Filter, protocol.ReleasesPrefix) {
			continue
		}
		out.Filters = append(out.Filters, f)
		if i < len(codes) {
			outCodes = append(outCodes, codes[i])
		}
	}
	return out, outCodes, true
}

// sessionEnds reports whether cl's session ends with its connection (clean session, or
// an MQTT 5 session expiry of 0): nothing of it needs to survive a restart.
func sessionEnds(cl *mqtt.Client) bool {
	// Field by field: mochi writes other fields of Properties (the will) concurrently.
	if cl.Net.Inline {
		return true // the in-process client: its subscriptions are made anew at every start
	}
	v := cl.Properties.ProtocolVersion
	return v < 5 && cl.Properties.Clean || v == 5 && cl.Properties.Props.SessionExpiryInterval == 0
}
