package mqttbus_test

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/sealcast/sealcast/internal/testkit/brokertest"
	"github.com/sealcast/sealcast/protocol"
	"github.com/sealcast/sealcast/updater/mqttbus"
)

func dial(t *testing.T, env *brokertest.Env, id string) *mqttbus.Bus {
	t.Helper()
	return dialWith(t, env, mqttbus.Options{ClientID: id})
}

func dialWith(t *testing.T, env *brokertest.Env, o mqttbus.Options) *mqttbus.Bus {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	o.URL, o.Username, o.Password = env.URL, env.Updater.Username, env.Updater.Password
	b, err := mqttbus.Dial(ctx, o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { b.Close() })
	return b
}

// received collects payloads per topic.
type received struct {
	mu  sync.Mutex
	got map[string]string
}

func (r *received) handle(topic string, payload []byte) {
	r.mu.Lock()
	r.got[topic] = string(payload)
	r.mu.Unlock()
}

func (r *received) count() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.got)
}

func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestPublishBurst: several Publish calls at once, each with more messages than
// MaxInFlight, return only when the broker has every message; the retained messages are
// there to be read.
func TestPublishBurst(t *testing.T) {
	env := brokertest.Start(t)
	pub, check := dial(t, env, "bus-pub"), dial(t, env, "bus-check")
	ctx := context.Background()
	const calls, per = 4, 2500
	var wg sync.WaitGroup
	for c := range calls {
		msgs := make([]protocol.Message, per)
		for i := range msgs {
			topic := fmt.Sprintf("sealcast/test/%d/%d", c, i)
			msgs[i] = protocol.Message{Topic: topic, Payload: []byte(topic), Retain: true}
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := pub.Publish(ctx, msgs...); err != nil {
				t.Error(err)
			}
		}()
	}
	wg.Wait()
	// A sample, one subscription per topic: a wildcard would ask the broker to queue
	// 10,000 retained messages at once, more than a client's outbound queue holds.
	r := &received{got: map[string]string{}}
	var want []string
	for c := range calls {
		for _, i := range []int{0, 1, 511, 1023, 1024, 2047, per - 1} {
			topic := fmt.Sprintf("sealcast/test/%d/%d", c, i)
			want = append(want, topic)
			if err := check.Subscribe(ctx, topic, r.handle); err != nil {
				t.Fatal(err)
			}
		}
	}
	eventually(t, "the retained messages", func() bool { return r.count() == len(want) })
	for _, topic := range want {
		if r.got[topic] != topic {
			t.Fatalf("%s carried %q", topic, r.got[topic])
		}
	}
}

// TestBrokerRestart: across a broker restart the bus reconnects, restores its
// subscriptions, and publishes made while it was away complete.
func TestBrokerRestart(t *testing.T) {
	env := brokertest.Start(t, brokertest.WithDataDir(t.TempDir()))
	pub, sub := dial(t, env, "bus-pub"), dial(t, env, "bus-sub")
	r := &received{got: map[string]string{}}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	if err := sub.Subscribe(ctx, "sealcast/test/#", r.handle); err != nil {
		t.Fatal(err)
	}
	if err := pub.Publish(ctx, protocol.Message{Topic: "sealcast/test/before", Payload: []byte("1"), Retain: true}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the first message", func() bool { return r.count() == 1 })
	env.Restart(t)
	// Published while the bus may still be reconnecting: it waits, then completes.
	// Retained, so that the subscriber gets it whether it re-subscribes before or after.
	if err := pub.Publish(ctx, protocol.Message{Topic: "sealcast/test/after", Payload: []byte("2"), Retain: true}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the message after the restart", func() bool {
		r.mu.Lock()
		defer r.mu.Unlock()
		return r.got["sealcast/test/after"] == "2"
	})
}

// counter counts deliveries per topic, and remembers the payloads in arrival order.
type counter struct {
	mu    sync.Mutex
	n     map[string]int
	order map[string][]string
}

func newCounter() *counter { return &counter{n: map[string]int{}, order: map[string][]string{}} }

func (c *counter) handle(topic string, payload []byte) {
	c.mu.Lock()
	c.n[topic]++
	c.order[topic] = append(c.order[topic], string(payload))
	c.mu.Unlock()
}

func (c *counter) total() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	t := 0
	for _, n := range c.n {
		t += n
	}
	return t
}

// TestSharedSubscription: a shared subscription is made on every subscribing connection
// and each message arrives once; a plain one is made on one connection only, so it too
// delivers each message once, in order.
func TestSharedSubscription(t *testing.T) {
	env := brokertest.Start(t)
	sub := dialWith(t, env, mqttbus.Options{ClientID: "bus-sub", Subscribers: 3})
	pub := dial(t, env, "bus-pub")
	ctx := context.Background()
	shared, plain := newCounter(), newCounter()
	if err := sub.Subscribe(ctx, "$share/g/sealcast/test/shared/#", shared.handle); err != nil {
		t.Fatal(err)
	}
	if err := sub.Subscribe(ctx, "sealcast/test/plain", plain.handle); err != nil {
		t.Fatal(err)
	}
	const n = 3000
	for start := 0; start < n; start += 100 {
		var msgs []protocol.Message
		for i := start; i < start+100; i++ {
			msgs = append(msgs,
				protocol.Message{Topic: fmt.Sprintf("sealcast/test/shared/%d", i), Payload: []byte("x")},
				protocol.Message{Topic: "sealcast/test/plain", Payload: []byte(fmt.Sprint(i))})
		}
		if err := pub.Publish(ctx, msgs...); err != nil {
			t.Fatal(err)
		}
	}
	eventually(t, "every message", func() bool { return shared.total() >= n && plain.total() >= n })
	time.Sleep(100 * time.Millisecond) // room for a duplicate to show up
	shared.mu.Lock()
	for topic, c := range shared.n {
		if c != 1 {
			t.Errorf("%s arrived %d times", topic, c)
		}
	}
	shared.mu.Unlock()
	plain.mu.Lock()
	defer plain.mu.Unlock()
	if got := plain.order["sealcast/test/plain"]; len(got) != n {
		t.Fatalf("the plain subscription delivered %d messages, want %d", len(got), n)
	} else {
		for i, p := range got {
			if p != fmt.Sprint(i) {
				t.Fatalf("message %d of the plain subscription is %s: out of order", i, p)
			}
		}
	}
}

// TestPublishersKeepDeviceOrder: with several publishing connections, the messages for
// one device arrive in the order they were published, across topics and Publish calls.
func TestPublishersKeepDeviceOrder(t *testing.T) {
	env := brokertest.Start(t)
	pub := dialWith(t, env, mqttbus.Options{ClientID: "bus-pub", Publishers: 4})
	sub := dial(t, env, "bus-sub")
	ctx := context.Background()
	var (
		mu  sync.Mutex
		got = map[string][]string{} // serial -> payloads in arrival order
	)
	err := sub.Subscribe(ctx, "sealcast/devices/+/+", func(topic string, payload []byte) {
		serial, _, _ := protocol.DeviceOf(topic)
		mu.Lock()
		got[serial] = append(got[serial], string(payload))
		mu.Unlock()
	})
	if err != nil {
		t.Fatal(err)
	}
	const devices, rounds = 16, 50
	for r := range rounds {
		var msgs []protocol.Message
		for d := range devices {
			serial := fmt.Sprintf("dev-%d", d)
			// A receipt, then a key, then a status: three topics of one device.
			msgs = append(msgs,
				protocol.Message{Topic: protocol.ReceiptTopic(serial), Payload: []byte(fmt.Sprint(3 * r))},
				protocol.Message{Topic: protocol.KeyTopic(serial), Payload: []byte(fmt.Sprint(3*r + 1))},
				protocol.Message{Topic: "sealcast/devices/" + serial + "/x", Payload: []byte(fmt.Sprint(3*r + 2))})
		}
		if err := pub.Publish(ctx, msgs...); err != nil {
			t.Fatal(err)
		}
	}
	eventually(t, "every message", func() bool {
		mu.Lock()
		defer mu.Unlock()
		n := 0
		for _, p := range got {
			n += len(p)
		}
		return n == devices*rounds*3
	})
	mu.Lock()
	defer mu.Unlock()
	for serial, ps := range got {
		for i, p := range ps {
			if p != fmt.Sprint(i) {
				t.Fatalf("%s: message %d is %s: out of order", serial, i, p)
			}
		}
	}
}
