package broker

import (
	"sync"
	"sync/atomic"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"
)

// pidGuard works around a mochi v2.7.9 defect (upstream issues #519 and #545): a
// session's inflight store is one map for two packet-identifier spaces, the client's
// (inbound QoS 1/2 flows) and the server's (outbound deliveries), which MQTT keeps
// independent [MQTT-2.3.1]. When a client sends a QoS 1 PUBLISH whose packet id equals
// an outbound delivery it has not yet acknowledged, mochi deletes that delivery (and its
// stored copy), so it is never re-sent after a reconnect; a QoS 2 PUBLISH overwrites it.
// A device acking (QoS 1) while its key message is in flight is exactly that case.
//
// SUBSCRIBE and UNSUBSCRIBE suffer the same confusion the other way round: mochi refuses
// one whose packet id equals an unacknowledged outbound delivery ("packet identifier in
// use", sent to an MQTT 3.1.1 client as SUBACK 0x80). A device opening its chunk window
// (PROTOCOL.md 9.2) while chunks are in flight hits this about once in a thousand
// subscriptions. For these the guard takes the delivery out of the inflight map before
// mochi looks, and puts it back afterwards; if mochi meanwhile gave the id to a retained
// message of the new subscription, the delivery is sent again under a fresh id (QoS 1
// allows the duplicate).
//
// The guard remembers the outbound delivery when such a PUBLISH is read and puts it back
// (in memory and in the store) once mochi has finished the inbound flow: right after a
// QoS 1 PUBLISH, or after the PUBREL of a QoS 2 one. Both hooks run on the client's own
// read goroutine, one packet at a time.
type pidGuard struct {
	b        *Broker
	pending  sync.Map // *mqtt.Client -> map[uint16]packets.Packet
	restored atomic.Int64
	off      atomic.Bool // tests switch the guard off to show the defect
}

func (g *pidGuard) before(cl *mqtt.Client, pk packets.Packet) {
	if g.off.Load() {
		return
	}
	switch t := pk.FixedHeader.Type; {
	case t == packets.Publish && pk.FixedHeader.Qos > 0, t == packets.Subscribe, t == packets.Unsubscribe:
	default:
		return
	}
	out, ok := cl.State.Inflight.Get(pk.PacketID)
	if !ok || out.FixedHeader.Type != packets.Publish {
		return // no outbound delivery under this id (or the client's own QoS 2 retry)
	}
	v, _ := g.pending.LoadOrStore(cl, map[uint16]packets.Packet{})
	v.(map[uint16]packets.Packet)[pk.PacketID] = out
	if pk.FixedHeader.Type != packets.Publish {
		// Hide it from mochi's "identifier in use" check; after puts it back.
		if cl.State.Inflight.Delete(pk.PacketID) {
			atomic.AddInt64(&g.b.srv.Info.Inflight, -1)
		}
	}
}

func (g *pidGuard) after(cl *mqtt.Client, pk packets.Packet) {
	switch pk.FixedHeader.Type {
	case packets.Publish:
		if pk.FixedHeader.Qos != 1 {
			return // QoS 2: the PUBREC holds the id until PUBREL
		}
	case packets.Pubrel, packets.Subscribe, packets.Unsubscribe:
	case packets.Puback:
		// The client acknowledged the outbound delivery itself while its QoS 2 flow
		// held the id: nothing to restore.
		if v, ok := g.pending.Load(cl); ok {
			delete(v.(map[uint16]packets.Packet), pk.PacketID)
		}
		return
	default:
		return
	}
	v, ok := g.pending.Load(cl)
	if !ok {
		return
	}
	m := v.(map[uint16]packets.Packet)
	out, ok := m[pk.PacketID]
	if !ok {
		return
	}
	delete(m, pk.PacketID)
	if cur, busy := cl.State.Inflight.Get(pk.PacketID); busy {
		if pk.FixedHeader.Type == packets.Publish || cur.TopicName == out.TopicName && cur.Created == out.Created {
			return // mochi did not erase it (e.g. the PUBLISH was refused)
		}
		// The id went to a retained message of the new subscription: send the
		// delivery again under a fresh id.
		id, err := cl.NextPacketID()
		if err != nil {
			g.b.log.Warn().Str("client", cl.ID).Msg("no packet id left to restore a delivery; it is re-sent at the next reconnect")
			return
		}
		out.PacketID = uint16(id)
		out.FixedHeader.Dup = false
		defer func() {
			if err := cl.WritePacket(out); err != nil {
				g.b.log.Debug().Err(err).Str("client", cl.ID).Msg("re-sending restored delivery")
			}
		}()
	}
	cl.State.Inflight.Set(out)
	atomic.AddInt64(&g.b.srv.Info.Inflight, 1)
	if g.b.store != nil {
		g.b.store.OnQosPublish(cl, out, out.Created, 0)
	}
	g.restored.Add(1)
	g.b.log.Debug().Str("client", cl.ID).Uint16("packet_id", pk.PacketID).
		Str("topic", out.TopicName).Msg("restored outbound delivery erased by a colliding packet id")
}

func (g *pidGuard) forget(cl *mqtt.Client) { g.pending.Delete(cl) }
