package broker_test

import (
	"context"
	"encoding/binary"
	"fmt"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/sealcast/sealcast/broker"
	"github.com/sealcast/sealcast/internal/testkit/brokertest"
	"github.com/sealcast/sealcast/internal/testkit/bustest"
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

// TestRetainedExpiryStillApplies: the patched mochi skips its expiry sweeps until a
// message with an expiry has been seen (docs/BROKER.md, "The patched mochi"); a retained
// message an MQTT 5 client publishes with a message expiry interval of 1 s still expires.
func TestRetainedExpiryStillApplies(t *testing.T) {
	env := brokertest.Start(t)
	c := dialRaw(t, env.Addr)
	b := appendStr(nil, "MQTT")
	b = append(b, 5, 0xc2, 0, 60, 0) // MQTT 5, user+password+clean, keepalive 60, no properties
	b = appendStr(appendStr(appendStr(b, "dev-x"), "dev-x"), env.Device(t, "dev-x").Password)
	c.send(packet(0x10, b))
	if p := c.expect(2); len(p.body) < 2 || p.body[1] != 0 {
		t.Fatalf("CONNACK %x", p.body)
	}
	// PUBLISH QoS 1, retained, to its own state topic, with Message Expiry Interval 1 s.
	b = binary.BigEndian.AppendUint16(appendStr(nil, "sealcast/devices/dev-x/state"), 3)
	b = append(b, 5, 0x02, 0, 0, 0, 1)
	c.send(packet(0x33, append(b, `{"v":1}`...)))
	c.expect(4)
	retained := func() bool {
		got := newCollector()
		sub := pahoClient(t, env, fmt.Sprintf("mon-%d", time.Now().UnixNano()), env.Monitor, true)
		defer sub.Disconnect(0)
		subscribe(t, sub, "sealcast/devices/dev-x/state", got)
		_, ok := got.next(t, quiet)
		return ok
	}
	if !retained() {
		t.Fatal("the message was not retained")
	}
	eventually(t, "the retained message expires", func() bool { return !retained() })
}

// BenchmarkIdleRetained reports the CPU an idle broker spends per second holding 100,000
// retained messages (mochi v2.7.9 copied all of them once a second; docs/BENCHMARKS.md).
func BenchmarkIdleRetained(b *testing.B) {
	env := brokertest.Start(b)
	msgs := make([]protocol.Message, 100_000)
	for i := range msgs {
		msgs[i] = protocol.Message{Topic: protocol.DeviceStatusTopic(fmt.Sprintf("d-%06d", i)), Payload: make([]byte, 121), Retain: true}
	}
	if err := env.Broker.Inline().Publish(context.Background(), msgs...); err != nil {
		b.Fatal(err)
	}
	var cpu time.Duration
	for b.Loop() {
		before := processCPU()
		time.Sleep(3 * time.Second)
		cpu += processCPU() - before
	}
	b.ReportMetric(float64(cpu.Milliseconds())/float64(3*b.N), "cpu-ms/s")
}

func processCPU() time.Duration {
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
