package mqttbus_test

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/sealcast/sealcast/internal/brokertest"
	"github.com/sealcast/sealcast/protocol"
	"github.com/sealcast/sealcast/updater/mqttbus"
)

func dial(t *testing.T, env *brokertest.Env, id string) *mqttbus.Bus {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	b, err := mqttbus.Dial(ctx, mqttbus.Options{URL: env.URL, ClientID: id, Username: env.Updater.Username, Password: env.Updater.Password})
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
