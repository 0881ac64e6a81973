package broker_test

import (
	"fmt"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/sealcast/sealcast/broker"
	"github.com/sealcast/sealcast/internal/testkit/brokertest"
)

// TestRestartKeepsRetainedAndQueued: a retained key and a QoS 1 delivery queued for an
// offline device with a persistent session survive Close and New on the same DataDir; the
// device reconnects (clean session false, no new SUBSCRIBE) and receives the queued
// message, and its subscription still works.
func TestRestartKeepsRetainedAndQueued(t *testing.T) {
	env := brokertest.Start(t, brokertest.WithDataDir(t.TempDir()))
	dev := env.Device(t, "dev-a")
	const keyTopic = "sealcast/devices/dev-a/key"

	got := newCollector()
	withHandler := func(o *paho.ClientOptions) { o.SetDefaultPublishHandler(got.handle) }
	c, err := pahoConnect(env, "dev-a", dev, false, withHandler)
	if err != nil {
		t.Fatal(err)
	}
	if code := subscribe(t, c, keyTopic, got); code != 1 {
		t.Fatalf("SUBACK %#x", code)
	}
	c.Disconnect(100)

	upd := pahoClient(t, env, "updater-1", env.Updater, true)
	publish(t, upd, keyTopic, 1, true, "key-1")
	publish(t, upd, "sealcast/releases/r1/manifest", 1, true, "manifest-1")
	upd.Disconnect(100)

	env.Restart(t)

	c, err = pahoConnect(env, "dev-a", dev, false, withHandler)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Disconnect(100)
	m, ok := got.next(t, 5*time.Second)
	if !ok || string(m.Payload()) != "key-1" {
		t.Fatalf("queued key not delivered after restart: %v", m)
	}
	// The subscription survived too.
	upd = pahoClient(t, env, "updater-1", env.Updater, true)
	publish(t, upd, keyTopic, 1, true, "key-2")
	if m, ok := got.next(t, 5*time.Second); !ok || string(m.Payload()) != "key-2" {
		t.Fatalf("persisted subscription did not deliver: %v", m)
	}
	// Retained messages survived.
	adm := pahoClient(t, env, "admin-1", env.Admin, true)
	ret := newCollector()
	subscribe(t, adm, "sealcast/releases/#", ret)
	if m, ok := ret.next(t, 5*time.Second); !ok || string(m.Payload()) != "manifest-1" || !m.Retained() {
		t.Fatalf("retained manifest lost: %v", m)
	}
}

// TestInMemoryForgets: without DataDir nothing survives a restart.
func TestInMemoryForgets(t *testing.T) {
	env := brokertest.Start(t)
	upd := pahoClient(t, env, "updater-1", env.Updater, true)
	publish(t, upd, "sealcast/releases/r1/manifest", 1, true, "manifest-1")
	upd.Disconnect(100)
	env.Restart(t)
	adm := pahoClient(t, env, "admin-1", env.Admin, true)
	ret := newCollector()
	subscribe(t, adm, "sealcast/releases/#", ret)
	if m, ok := ret.next(t, quiet); ok {
		t.Fatalf("in-memory broker kept %q", m.Payload())
	}
}

// TestPacketIDCollision shows mochi v2.7.9's defect (issues #519/#545) and the guard: a
// device receives its key (QoS 1, packet id X) and, before acknowledging it, publishes
// its own QoS 1 ack choosing the same packet id X from its own id space, then loses the
// connection. mochi erases the key delivery from the session, so it is not re-sent on
// reconnect; with the guard it is.
func TestPacketIDCollision(t *testing.T) {
	for _, guard := range []bool{false, true} {
		name := map[bool]string{false: "mochi", true: "guarded"}[guard]
		t.Run(name, func(t *testing.T) {
			env := brokertest.Start(t, brokertest.WithDataDir(t.TempDir()))
			broker.SetPIDGuard(env.Broker, guard)
			dev := env.Device(t, "dev-a")
			const keyTopic = "sealcast/devices/dev-a/key"

			c, code := connectRaw(t, env.Addr, "dev-a", "dev-a", dev.Password, false)
			if code != 0 {
				t.Fatalf("CONNACK %#x", code)
			}
			c.send(subscribePacket(1, keyTopic, 1))
			c.expect(9) // SUBACK
			upd := pahoClient(t, env, "updater-1", env.Updater, true)
			publish(t, upd, keyTopic, 1, false, "key-1")
			_, id, payload := c.expect(3).publish()
			if string(payload) != "key-1" {
				t.Fatalf("got %q", payload)
			}
			// The device's own QoS 1 ack, with the packet id of the unacknowledged key.
			c.send(publishPacket("sealcast/devices/dev-a/ack", []byte("ack"), 1, id, false))
			if p := c.expect(4); p.body[0] != byte(id>>8) || p.body[1] != byte(id) {
				t.Fatalf("PUBACK for another id: %x", p.body)
			}
			c.Close() // lost before the device acknowledged the key

			// Restarting also checks the store holds what memory holds.
			env.Restart(t)
			c, code = connectRaw(t, env.Addr, "dev-a", "dev-a", dev.Password, false)
			if code != 0 {
				t.Fatalf("CONNACK %#x", code)
			}
			p, err := c.read(time.Second)
			redelivered := err == nil && p.typ == 3
			if redelivered {
				_, _, payload := p.publish()
				redelivered = string(payload) == "key-1"
			}
			switch {
			case guard && !redelivered:
				t.Fatal("the key delivery was lost despite the guard")
			case !guard && redelivered:
				t.Log("mochi kept the delivery: the upstream defect seems fixed; the guard may be removable")
			case !guard:
				t.Log("mochi lost the unacknowledged key delivery (issues #519/#545), as expected without the guard")
			}
		})
	}
}

// TestSubscribePacketIDCollision: mochi v2.7.9 refuses a SUBSCRIBE whose packet id equals
// an unacknowledged outbound delivery (SUBACK 0x80), which is what a device opening its
// chunk window while chunks are in flight runs into. With the guard the subscription is
// granted, its retained message delivered, and the earlier delivery still re-sent.
func TestSubscribePacketIDCollision(t *testing.T) {
	for _, guard := range []bool{false, true} {
		name := map[bool]string{false: "mochi", true: "guarded"}[guard]
		t.Run(name, func(t *testing.T) {
			env := brokertest.Start(t, brokertest.WithDataDir(t.TempDir()))
			broker.SetPIDGuard(env.Broker, guard)
			dev := env.Device(t, "dev-a")
			const keyTopic = "sealcast/devices/dev-a/key"
			const manifest = "sealcast/releases/00112233445566778899aabbccddeeff/manifest"
			upd := pahoClient(t, env, "updater-1", env.Updater, true)
			publish(t, upd, manifest, 1, true, "manifest")

			c, code := connectRaw(t, env.Addr, "dev-a", "dev-a", dev.Password, false)
			if code != 0 {
				t.Fatalf("CONNACK %#x", code)
			}
			c.send(subscribePacket(1, keyTopic, 1))
			c.expect(9)
			publish(t, upd, keyTopic, 1, false, "key-1")
			_, id, _ := c.expect(3).publish()
			// Subscribe with the id of the unacknowledged key delivery.
			c.send(subscribePacket(id, manifest, 1))
			ack := c.expect(9)
			granted := ack.body[2] == 1
			switch {
			case guard && !granted:
				t.Fatalf("SUBACK %#x despite the guard", ack.body[2])
			case !guard && granted:
				t.Log("mochi granted the subscription: the upstream defect seems fixed")
			case !guard:
				t.Logf("mochi refused the subscription with %#x, as expected without the guard", ack.body[2])
				return
			}
			p := c.expect(3)
			if topic, _, payload := p.publish(); topic != manifest || string(payload) != "manifest" {
				t.Fatalf("got %s %q", topic, payload)
			}
			// The guard restores the delivery after mochi has processed the SUBSCRIBE,
			// which may be just after the client read its SUBACK: wait for it, so that
			// the reconnect below does not take the session over before it. (A device
			// that does reconnect in that instant gets its retained key when it
			// subscribes again, [SC-9.3].)
			eventually(t, "the guard restored the key delivery", func() bool { return env.Broker.Stats().DeliveriesRestored >= 1 })
			c.Close()
			// The key, never acknowledged, is re-sent after a reconnect.
			c, _ = connectRaw(t, env.Addr, "dev-a", "dev-a", dev.Password, false)
			seen := map[string]bool{}
			for {
				p, err := c.read(time.Second)
				if err != nil {
					break
				}
				if p.typ == 3 {
					_, _, payload := p.publish()
					seen[string(payload)] = true
				}
			}
			if !seen["key-1"] {
				t.Fatalf("the key delivery was lost; re-sent after reconnect: %v", seen)
			}
		})
	}
}

// TestReleaseSessionStateNotStored: with DataDir, a device's subscriptions to release
// topics and its deliveries in flight from them are not kept across a restart (the
// device subscribes again, [SC-9.5]), while its key subscription, a key delivery queued
// for it and the retained chunk itself are; a key delivery the device acknowledged is not
// sent again after the restart.
func TestReleaseSessionStateNotStored(t *testing.T) {
	env := brokertest.Start(t, brokertest.WithDataDir(t.TempDir()))
	dev := env.Device(t, "dev-a")
	const (
		keyTopic   = "sealcast/devices/dev-a/key"
		chunkTopic = "sealcast/releases/r1/chunks/0"
	)
	got := newCollector()
	withHandler := func(o *paho.ClientOptions) { o.SetDefaultPublishHandler(got.handle) }
	c, err := pahoConnect(env, "dev-a", dev, false, withHandler)
	if err != nil {
		t.Fatal(err)
	}
	subscribe(t, c, keyTopic, got)
	subscribe(t, c, chunkTopic, got)
	upd := pahoClient(t, env, "updater-1", env.Updater, true)
	publish(t, upd, keyTopic, 1, false, "key-acked")
	if m, ok := got.next(t, 5*time.Second); !ok || string(m.Payload()) != "key-acked" {
		t.Fatalf("key not delivered: %v", m)
	}
	eventually(t, "the broker received the PUBACK of key-acked", func() bool { return broker.Inflight(env.Broker, "dev-a") == 0 })
	c.Disconnect(100)

	// Queued for the offline device: one key and one chunk.
	publish(t, upd, keyTopic, 1, false, "key-queued")
	publish(t, upd, chunkTopic, 1, false, "chunk-queued")
	upd.Disconnect(100)

	env.Restart(t)

	c, err = pahoConnect(env, "dev-a", dev, false, withHandler)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Disconnect(100)
	if m, ok := got.next(t, 5*time.Second); !ok || string(m.Payload()) != "key-queued" {
		t.Fatalf("queued key not delivered after restart: %v", m)
	}
	if m, ok := got.next(t, quiet); ok {
		t.Fatalf("after the restart the device got %q (acknowledged or release deliveries must not come back)", m.Payload())
	}
	upd = pahoClient(t, env, "updater-1", env.Updater, true)
	publish(t, upd, chunkTopic, 1, true, "chunk-retained")
	if m, ok := got.next(t, quiet); ok {
		t.Fatalf("the chunk subscription survived the restart: got %q", m.Payload())
	}
	publish(t, upd, keyTopic, 1, false, "key-after")
	if m, ok := got.next(t, 5*time.Second); !ok || string(m.Payload()) != "key-after" {
		t.Fatalf("key subscription did not survive: %v", m)
	}
	// Subscribing again, as a device does, delivers the retained chunk; after one more
	// restart the retained chunk is still there.
	subscribe(t, c, chunkTopic, got)
	if m, ok := got.next(t, 5*time.Second); !ok || string(m.Payload()) != "chunk-retained" {
		t.Fatalf("retained chunk not delivered on subscribe: %v", m)
	}
	c.Disconnect(100)
	upd.Disconnect(100)
	env.Restart(t)
	adm := pahoClient(t, env, "admin-1", env.Admin, true)
	ret := newCollector()
	subscribe(t, adm, chunkTopic, ret)
	if m, ok := ret.next(t, 5*time.Second); !ok || string(m.Payload()) != "chunk-retained" {
		t.Fatalf("retained chunk lost in a restart: %v", m)
	}
}

// TestCleanSessionSubscriptionsNotRestored: the subscriptions of a clean session are not
// brought back by a restart. mochi restores every stored subscription, so before the
// broker kept clean sessions out of its store, the shared ack subscription of an updater
// from before the restart became a ghost member of the group, which took its share of
// the acks and dropped them.
func TestCleanSessionSubscriptionsNotRestored(t *testing.T) {
	env := brokertest.Start(t, brokertest.WithDataDir(t.TempDir()))
	const group = "$share/updaters/sealcast/devices/+/ack"
	old := pahoClient(t, env, "updater-old", env.Updater, true)
	subscribe(t, old, group, newCollector())
	old.Disconnect(100)

	env.Restart(t)

	got := newCollector()
	upd := pahoClient(t, env, "updater-new", env.Updater, true)
	defer upd.Disconnect(100)
	subscribe(t, upd, group, got)
	const n = 20
	for i := range n {
		serial := fmt.Sprintf("dev-%02d", i)
		dev, err := pahoConnect(env, serial, env.Device(t, serial), true, nil)
		if err != nil {
			t.Fatal(err)
		}
		publish(t, dev, "sealcast/devices/"+serial+"/ack", 1, false, "ack")
		dev.Disconnect(100)
	}
	for i := range n {
		if _, ok := got.next(t, 5*time.Second); !ok {
			t.Fatalf("the live member of the group got %d of %d acks", i, n)
		}
	}
}
