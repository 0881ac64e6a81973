package broker

import (
	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/sealcast/sealcast/protocol"
)

// Presence payloads (PROTOCOL.md 9): a device publishes "online" after CONNACK, and its
// will says "offline".
const (
	presenceOnline  = "online"
	presenceOffline = "offline"
)

// A device that reconnects while the broker still holds its old connection (a link that
// died silently, or a reconnect faster than the broker processed the old socket's close)
// has its session taken over by the new connection. mochi then publishes the old
// connection's will, "offline", from the old connection's goroutine, which can run after
// the new connection has published "online": the device would stay retained as offline
// while it is connected, and the updater would count it so. Three hooks prevent that,
// without touching mochi's client state from another goroutine:
//
//   - OnSessionEstablish (the new connection, before mochi takes over) marks the old
//     connection as superseded;
//   - OnWill (the old connection, before its will goes out) turns a superseded device's
//     "offline" into "online";
//   - OnWillSent (the old connection, after its will went out) catches the will that
//     was already on its way when the new connection arrived: if a newer connection is
//     open, it publishes "online" again, as that connection.

// presenceTopic reports whether topic is the presence topic of client id.
func presenceTopic(topic, id string) bool { return topic == protocol.PresenceTopic(id) }

func (h *hook) OnSessionEstablish(cl *mqtt.Client, _ packets.Packet) {
	if old, ok := h.b.srv.Clients.Get(cl.ID); ok && old != cl {
		h.b.superseded.Store(cl.ID, old)
	}
}

func (h *hook) OnWill(cl *mqtt.Client, will mqtt.Will) (mqtt.Will, error) {
	if old, ok := h.b.superseded.Load(cl.ID); !ok || old != cl {
		return will, nil
	}
	if presenceTopic(will.TopicName, cl.ID) && string(will.Payload) == presenceOffline {
		will.Payload = []byte(presenceOnline)
		h.b.willsCancelled.Add(1)
		h.b.log.Info().Str("client", cl.ID).Str("remote", cl.Net.Remote).
			Msg("session taken over by a new connection; the old connection's will says online, not offline")
	}
	return will, nil
}

func (h *hook) OnWillSent(old *mqtt.Client, pk packets.Packet) {
	h.b.superseded.CompareAndDelete(old.ID, old)
	if string(pk.Payload) != presenceOffline || !presenceTopic(pk.TopicName, old.ID) {
		return
	}
	cur, ok := h.b.srv.Clients.Get(old.ID)
	if !ok || cur == old || cur.Closed() {
		return
	}
	err := h.b.srv.InjectPacket(cur, packets.Packet{
		FixedHeader: packets.FixedHeader{Type: packets.Publish, Retain: true},
		TopicName:   pk.TopicName,
		Payload:     []byte(presenceOnline),
	})
	if err != nil {
		h.b.log.Warn().Err(err).Str("client", old.ID).Msg("re-publishing the presence of a taken-over session")
		return
	}
	h.b.lateWills.Add(1)
	h.b.log.Info().Str("client", old.ID).Str("old_remote", old.Net.Remote).Str("remote", cur.Net.Remote).
		Msg("a taken-over connection's will went out after the new connection came; presence set online again")
}
