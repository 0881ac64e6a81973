// Package bustest is the contract suite of the updater's link to its broker (updater.Bus):
// the embedded broker's in-process client (broker.Inline) and updater/mqttbus, which
// speaks MQTT to any broker, pass the same tests against a real broker on 127.0.0.1.
//
//	bustest.Run(t, func(t *testing.T, env *brokertest.Env) bustest.Bus { ... })
package bustest

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/sealcast/sealcast/internal/testkit/brokertest"
	"github.com/sealcast/sealcast/protocol"
)

// Bus is what the updater needs (updater.Bus).
type Bus interface {
	Publish(ctx context.Context, msgs ...protocol.Message) error
	Subscribe(ctx context.Context, filter string, handle func(topic string, payload []byte)) error
}

// Factory returns a Bus to env's broker with the updater's rights; the test's cleanup
// closes it.
type Factory func(t *testing.T, env *brokertest.Env) Bus

// Run runs the contract suite; each subtest starts its own broker.
func Run(t *testing.T, newBus Factory) {
	t.Run("PublishReachesClients", func(t *testing.T) { testPublish(t, newBus) })
	t.Run("RetainedOnSubscribe", func(t *testing.T) { testRetained(t, newBus) })
	t.Run("ClientPublishesReachHandler", func(t *testing.T) { testInbound(t, newBus) })
	t.Run("SharedSubscription", func(t *testing.T) { testShared(t, newBus) })
	t.Run("CancelledContext", func(t *testing.T) { testCancelled(t, newBus) })
}

func ctx(t *testing.T) context.Context {
	c, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return c
}

// Client connects a paho client (MQTT 3.1.1, clean session) and, unless filter is empty,
// subscribes it to filter, sending every message to the returned channel.
func Client(t *testing.T, env *brokertest.Env, id string, cr brokertest.Credentials, filter string) (paho.Client, <-chan paho.Message) {
	t.Helper()
	ch := make(chan paho.Message, 4096)
	o := paho.NewClientOptions().AddBroker(env.URL).SetClientID(id).SetUsername(cr.Username).
		SetPassword(cr.Password).SetProtocolVersion(4).SetCleanSession(true).SetOrderMatters(true).
		SetAutoReconnect(false)
	c := paho.NewClient(o)
	if tok := c.Connect(); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		t.Fatalf("connecting %s: %v", id, tok.Error())
	}
	t.Cleanup(func() { c.Disconnect(100) })
	if filter != "" {
		tok := c.Subscribe(filter, 1, func(_ paho.Client, m paho.Message) { ch <- m })
		if !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
			t.Fatalf("subscribing %s: %v", id, tok.Error())
		}
	}
	return c, ch
}

// nothing fails the test if a message arrives on ch within d.
func nothing(t *testing.T, ch <-chan paho.Message, d time.Duration, what string) {
	t.Helper()
	select {
	case m := <-ch:
		t.Fatalf("%s: %s holds %q", what, m.Topic(), m.Payload())
	case <-time.After(d):
	}
}

func next(t *testing.T, ch <-chan paho.Message) paho.Message {
	t.Helper()
	select {
	case m := <-ch:
		return m
	case <-time.After(10 * time.Second):
		t.Fatal("no message within 10 s")
		return nil
	}
}

// testPublish: QoS 1 publishes reach a device subscribed to its key topic and a monitor
// on the status topics, in the order published, with the retain flag as sent on a new
// subscription.
func testPublish(t *testing.T, newBus Factory) {
	env := brokertest.Start(t)
	bus := newBus(t, env)
	_, dev := Client(t, env, "dev-1", env.Device(t, "dev-1"), protocol.KeyTopic("dev-1"))
	_, mon := Client(t, env, "mon", env.Monitor, protocol.StatusFilter)
	var msgs []protocol.Message
	for i := range 50 {
		msgs = append(msgs, protocol.Message{Topic: protocol.KeyTopic("dev-1"), Payload: fmt.Appendf(nil, "key-%d", i)},
			protocol.Message{Topic: protocol.FleetStatusTopic, Payload: fmt.Appendf(nil, "status-%d", i)})
	}
	if err := bus.Publish(ctx(t), msgs...); err != nil {
		t.Fatal(err)
	}
	for i := range 50 {
		if m := next(t, dev); string(m.Payload()) != fmt.Sprintf("key-%d", i) || m.Qos() != 1 {
			t.Fatalf("device got %q at QoS %d, want key-%d at QoS 1", m.Payload(), m.Qos(), i)
		}
		if m := next(t, mon); string(m.Payload()) != fmt.Sprintf("status-%d", i) {
			t.Fatalf("monitor got %q, want status-%d", m.Payload(), i)
		}
	}
}

// testRetained: a retained publish is delivered to later subscribers, network and
// in-process alike, and an empty retained publish clears it.
func testRetained(t *testing.T, newBus Factory) {
	env := brokertest.Start(t)
	bus := newBus(t, env)
	key := protocol.KeyTopic("dev-2")
	if err := bus.Publish(ctx(t), protocol.Message{Topic: key, Payload: []byte("wrapped"), Retain: true}); err != nil {
		t.Fatal(err)
	}
	_, dev := Client(t, env, "dev-2", env.Device(t, "dev-2"), key)
	if m := next(t, dev); string(m.Payload()) != "wrapped" || !m.Retained() {
		t.Fatalf("got %q retained=%v", m.Payload(), m.Retained())
	}
	got := make(chan string, 10)
	if err := bus.Subscribe(ctx(t), protocol.KeyFilter, func(topic string, p []byte) {
		got <- topic + "=" + string(p)
	}); err != nil {
		t.Fatal(err)
	}
	select {
	case s := <-got:
		if s != key+"=wrapped" {
			t.Fatalf("handler got %s", s)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the bus's subscription did not get the retained message")
	}
	if err := bus.Publish(ctx(t), protocol.Message{Topic: key, Retain: true}); err != nil {
		t.Fatal(err)
	}
	_, dev2 := Client(t, env, "dev-2b", env.Admin, key)
	nothing(t, dev2, 300*time.Millisecond, "a cleared retained topic")
}

// testInbound: what devices publish on their ack topics reaches the handler, each message
// once, in order per device.
func testInbound(t *testing.T, newBus Factory) {
	env := brokertest.Start(t)
	bus := newBus(t, env)
	var mu sync.Mutex
	seen := map[string][]string{}
	total := make(chan struct{}, 1000)
	if err := bus.Subscribe(ctx(t), protocol.AckFilter, func(topic string, p []byte) {
		serial, _, _ := protocol.DeviceOf(topic)
		mu.Lock()
		seen[serial] = append(seen[serial], string(p))
		mu.Unlock()
		total <- struct{}{}
	}); err != nil {
		t.Fatal(err)
	}
	const devices, per = 5, 40
	for d := range devices {
		serial := fmt.Sprintf("dev-%d", d)
		c, _ := Client(t, env, serial, env.Device(t, serial), "")
		for i := range per {
			c.Publish(protocol.AckTopic(serial), 1, false, fmt.Sprintf("ack-%d", i))
		}
	}
	for range devices * per {
		select {
		case <-total:
		case <-time.After(10 * time.Second):
			t.Fatal("acks missing")
		}
	}
	mu.Lock()
	defer mu.Unlock()
	for serial, acks := range seen {
		for i, a := range acks {
			if a != fmt.Sprintf("ack-%d", i) {
				t.Fatalf("%s: ack %d is %q", serial, i, a)
			}
		}
	}
}

// testShared: a shared subscription of the bus and a network member of the same group
// split the messages: each goes to exactly one of them, and both get some.
func testShared(t *testing.T, newBus Factory) {
	env := brokertest.Start(t)
	bus := newBus(t, env)
	filter := "$share/g/" + protocol.AckFilter
	var busGot sync.Map
	const acks = 200
	if err := bus.Subscribe(ctx(t), filter, func(_ string, p []byte) {
		busGot.Store(string(p), true)
	}); err != nil {
		t.Fatal(err)
	}
	_, other := Client(t, env, "other-updater", env.Updater, filter)
	otherGot := map[string]bool{}
	c, _ := Client(t, env, "dev-s2", env.Device(t, "dev-s2"), "")
	for i := range acks {
		if tok := c.Publish(protocol.AckTopic("dev-s2"), 1, false, fmt.Sprintf("a%d", i)); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
			t.Fatalf("publish %d not acknowledged: %v", i, tok.Error())
		}
	}
	deadline := time.After(10 * time.Second)
	for {
		busN := 0
		busGot.Range(func(_, _ any) bool { busN++; return true })
		if busN+len(otherGot) == acks {
			break
		}
		select {
		case m := <-other:
			otherGot[string(m.Payload())] = true
		case <-time.After(10 * time.Millisecond):
		case <-deadline:
			t.Fatalf("%d to the bus + %d to the other member, want %d in all", busN, len(otherGot), acks)
		}
	}
	for p := range otherGot {
		if _, dup := busGot.Load(p); dup {
			t.Fatalf("%s went to both members", p)
		}
	}
	busN := acks - len(otherGot)
	if busN == 0 || len(otherGot) == 0 {
		t.Fatalf("split %d / %d: a member got nothing", busN, len(otherGot))
	}
	nothing(t, other, 200*time.Millisecond, "after the split")
}

// testCancelled: a publish with a cancelled context fails with the context's error.
func testCancelled(t *testing.T, newBus Factory) {
	env := brokertest.Start(t)
	bus := newBus(t, env)
	c, cancel := context.WithCancel(context.Background())
	cancel()
	if err := bus.Publish(c, protocol.Message{Topic: protocol.FleetStatusTopic, Payload: []byte("x")}); err == nil {
		t.Fatal("publish with a cancelled context succeeded")
	}
}
