package broker

import (
	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"
)

// SetPIDGuard switches the packet-id collision guard on or off, so that a test can show
// mochi's behaviour without it.
func SetPIDGuard(b *Broker, on bool) { b.guard.off.Store(!on) }

// Inflight returns how many unacknowledged QoS 1 and 2 flows the session of client holds
// in memory (-1 for no session).
func Inflight(b *Broker, client string) int {
	cl, ok := b.srv.Clients.Get(client)
	if !ok {
		return -1
	}
	return cl.State.Inflight.Len()
}

// ClientOf returns the session mochi holds for client id, nil if none.
func ClientOf(b *Broker, id string) *mqtt.Client {
	cl, _ := b.srv.Clients.Get(id)
	return cl
}

// WillSent runs the broker's will-sent hook, if it provides one, as mochi does after
// publishing old's will.
func WillSent(b *Broker, old *mqtt.Client, topic, payload string) {
	if h := (&hook{b: b}); h.Provides(mqtt.OnWillSent) {
		h.OnWillSent(old, packets.Packet{TopicName: topic, Payload: []byte(payload)})
	}
}

// ForgetClient removes a client from mochi's list without ending its connection, the
// state a shutdown once found a connection in.
func ForgetClient(b *Broker, id string) { b.srv.Clients.Delete(id) }
