package broker_test

import (
	"context"
	"fmt"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sealcast/sealcast/broker"
	"github.com/sealcast/sealcast/internal/brokertest"
	"github.com/sealcast/sealcast/internal/bustest"
	"github.com/sealcast/sealcast/protocol"
)

// TestInlineContract: the in-process client passes the updater bus's contract suite, as
// updater/mqttbus does.
func TestInlineContract(t *testing.T) {
	bustest.Run(t, func(t *testing.T, env *brokertest.Env) bustest.Bus { return env.Broker.Inline() })
}

// TestInlineAckBurst: 2,000 connected devices send 10 acks each at once; the in-process
// subscriber gets all 20,000, so no device has to send one again, and the broker drops
// nothing. (Over a network connection the broker's queue for the updater overflows in
// such a burst and drops acks, which devices then re-send.)
func TestInlineAckBurst(t *testing.T) {
	const devices, per = 2000, 10
	env := brokertest.Start(t)
	var got atomic.Int64
	all := make(chan struct{})
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	if err := env.Broker.Inline().Subscribe(ctx, protocol.AckFilter, func(string, []byte) {
		if got.Add(1) == devices*per {
			close(all)
		}
	}); err != nil {
		t.Fatal(err)
	}
	conns := make([]*rawConn, devices)
	for i := range conns {
		serial := fmt.Sprintf("burst-%04d", i)
		c, code := connectRaw(t, env.Addr, serial, serial, env.Device(t, serial).Password, false)
		if code != 0 {
			t.Fatalf("%s: CONNACK %#x", serial, code)
		}
		conns[i] = c
	}
	ack := make([]byte, 75)
	for i, c := range conns { // every device writes its 10 acks before any PUBACK is read
		var b []byte
		for k := range per {
			b = append(b, publishPacket(protocol.AckTopic(fmt.Sprintf("burst-%04d", i)), ack, 1, uint16(k+1), false)...)
		}
		c.send(b)
	}
	for _, c := range conns {
		for range per {
			c.expect(4)
		}
	}
	select {
	case <-all:
	case <-time.After(time.Minute):
		t.Fatalf("the subscriber got %d of %d acks", got.Load(), devices*per)
	}
	st := env.Broker.Stats()
	if st.DroppedQueueFull+st.DroppedInflight+st.DroppedDeviceQueue != 0 {
		t.Fatalf("the broker dropped deliveries: %+v", st)
	}
	if n := got.Load(); n != devices*per {
		t.Fatalf("the subscriber got %d acks, want %d", n, devices*per)
	}
}

// TestInlineClosed: the in-process client refuses work once the broker is closed.
func TestInlineClosed(t *testing.T) {
	env := brokertest.Start(t)
	in := env.Broker.Inline()
	env.Broker.Close()
	err := in.Publish(context.Background(), protocol.Message{Topic: protocol.FleetStatusTopic, Payload: []byte("x")})
	if err != broker.ErrClosed {
		t.Fatalf("publish after Close: %v", err)
	}
}

// TestCheck: the health probe gets CONNACK and PINGRESP from a running broker, cannot be
// used without its in-memory password (TestHealthProbeHasNoRights: nor could it do
// anything), and fails once the broker is closed.
func TestCheck(t *testing.T) {
	env := brokertest.Start(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for range 3 {
		if err := env.Broker.Check(ctx); err != nil {
			t.Fatalf("Check on a running broker: %v", err)
		}
	}
	if _, code := connectRaw(t, env.Addr, "$health-x", "$health", "guess", true); code == 0 {
		t.Fatal("the health username was accepted with a guessed password")
	}
	if st := env.Broker.Stats(); st.AuthFailures != 1 {
		t.Fatalf("auth failures %d, want 1 (the guess; probes are no failures)", st.AuthFailures)
	}
	env.Broker.Close()
	if err := env.Broker.Check(ctx); err == nil {
		t.Fatal("Check passed on a closed broker")
	}
}
