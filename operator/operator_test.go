package operator_test

import (
	"context"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sealcast/sealcast/internal/testkit/brokertest"
	"github.com/sealcast/sealcast/operator"
	"github.com/sealcast/sealcast/protocol"
)

// TestWatchStoppedWhileSubscribing: a watcher whose context ends while its SUBSCRIBE is
// in flight returns without error. The status command's reader stops from inside fn as
// soon as the retained message it wants arrives, and the broker sends that message in
// the same write as the SUBACK: when the message won the race, the command failed with
// "subscribing to sealcast/status/fleet: context canceled".
func TestWatchStoppedWhileSubscribing(t *testing.T) {
	env := brokertest.Start(t)
	ctx := context.Background()
	op, err := operator.Dial(ctx, operator.Options{URL: env.URL, Username: env.Monitor.Username, Password: env.Monitor.Password})
	if err != nil {
		t.Fatal(err)
	}
	defer op.Close()
	wctx, stop := context.WithCancel(ctx)
	stop()
	if err := op.Watch(wctx, []string{protocol.FleetStatusTopic}, func(string, []byte) {}); err != nil {
		t.Fatalf("watch ended by its context: %v", err)
	}
	// A watch that runs still gets the retained message.
	if err := env.Broker.Inline().Publish(ctx, protocol.Message{Topic: protocol.FleetStatusTopic, Payload: []byte("{}"), Retain: true}); err != nil {
		t.Fatal(err)
	}
	wctx, stop = context.WithTimeout(ctx, 10*time.Second)
	defer stop()
	var got atomic.Bool
	if err := op.Watch(wctx, []string{protocol.FleetStatusTopic}, func(string, []byte) { got.Store(true); stop() }); err != nil || !got.Load() {
		t.Fatalf("watch: %v (message received: %v)", err, got.Load())
	}
}
