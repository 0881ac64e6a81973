package broker_test

import (
	"net"
	"net/url"
	"slices"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/sealcast/sealcast/internal/brokertest"
)

// TestTakeoverKeepsPresence: a device whose old connection is still open (its link died
// silently, or the broker has not yet read the close) reconnects. The new connection takes
// over the session, and the old connection's will ("offline") is not published: it could
// land after the new connection's "online" and leave the device retained as offline
// while it is connected. A connection that dies with nobody taking over still publishes
// its will.
func TestTakeoverKeepsPresence(t *testing.T) {
	env := brokertest.Start(t)
	const serial = "dev-p"
	const presence = "sealcast/devices/" + serial + "/presence"
	dev := env.Device(t, serial)
	mon := pahoClient(t, env, "monitor-1", env.Monitor, true)
	seen := newCollector()
	subscribe(t, mon, presence, seen)

	// connect opens a device connection with an "offline" will and publishes "online". It
	// returns the network connection, to cut it without a DISCONNECT.
	connect := func(lost chan<- struct{}) net.Conn {
		t.Helper()
		conns := make(chan net.Conn, 1)
		c, err := pahoConnect(env, serial, dev, false, func(o *paho.ClientOptions) {
			o.SetBinaryWill(presence, []byte("offline"), 1, true)
			o.SetConnectionLostHandler(func(paho.Client, error) { close(lost) })
			o.SetCustomOpenConnectionFn(func(u *url.URL, _ paho.ClientOptions) (net.Conn, error) {
				nc, err := net.Dial("tcp", u.Host)
				if err == nil {
					conns <- nc
				}
				return nc, err
			})
		})
		if err != nil {
			t.Fatal(err)
		}
		publish(t, c, presence, 1, true, "online")
		return <-conns
	}
	// until collects presence payloads until want arrives (mochi may deliver a message
	// twice, retained and live, to a subscription made while it is published).
	until := func(want string) []string {
		t.Helper()
		var got []string
		for {
			m, ok := seen.next(t, 5*time.Second)
			if !ok {
				t.Fatalf("presence: %q, and no %q", got, want)
			}
			if got = append(got, string(m.Payload())); got[len(got)-1] == want {
				return got
			}
		}
	}
	quietAfter := func() []string {
		var got []string
		for {
			m, ok := seen.next(t, quiet)
			if !ok {
				return got
			}
			got = append(got, string(m.Payload()))
		}
	}

	lostA, lostB := make(chan struct{}), make(chan struct{})
	connect(lostA)
	until("online")
	quietAfter()
	ncB := connect(lostB) // takes over while A's connection is open
	select {
	case <-lostA:
	case <-time.After(10 * time.Second):
		t.Fatal("the broker did not disconnect the old connection")
	}
	got := append(until("online"), quietAfter()...)
	if slices.Contains(got, "offline") {
		t.Fatalf("presence during the takeover: %q; the old connection's will was published", got)
	}
	if n := env.Broker.Stats().WillsCancelled; n != 1 {
		t.Fatalf("WillsCancelled = %d, want 1", n)
	}

	// B's link breaks and nobody takes over: its will is published.
	ncB.Close()
	until("offline")
}
