package broker_test

import (
	"net"
	"net/url"
	"slices"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/sealcast/sealcast/broker"
	"github.com/sealcast/sealcast/internal/testkit/brokertest"
)

// presenceRig is a broker, a device's credentials and a monitor watching its presence.
type presenceRig struct {
	t        *testing.T
	env      *brokertest.Env
	serial   string
	presence string
	dev      brokertest.Credentials
	seen     *collector
}

func newPresenceRig(t *testing.T) *presenceRig {
	env := brokertest.Start(t)
	r := &presenceRig{t: t, env: env, serial: "dev-p", presence: "sealcast/devices/dev-p/presence", seen: newCollector()}
	r.dev = env.Device(t, r.serial)
	subscribe(t, pahoClient(t, env, "monitor-1", env.Monitor, true), r.presence, r.seen)
	return r
}

// connect opens a device connection with an "offline" will, as the agent does, and
// publishes "online". It returns the network connection, to cut it without a DISCONNECT,
// and a channel closed when paho sees the connection lost.
func (r *presenceRig) connect() (net.Conn, <-chan struct{}) {
	r.t.Helper()
	conns := make(chan net.Conn, 1)
	lost := make(chan struct{})
	c, err := pahoConnect(r.env, r.serial, r.dev, false, func(o *paho.ClientOptions) {
		o.SetBinaryWill(r.presence, []byte("offline"), 1, true)
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
		r.t.Fatal(err)
	}
	r.t.Cleanup(func() { c.Disconnect(0) })
	publish(r.t, c, r.presence, 1, true, "online")
	return <-conns, lost
}

// until collects presence payloads until want arrives (mochi may deliver a message
// twice, retained and live, to a subscription made while it is published).
func (r *presenceRig) until(want string) []string {
	r.t.Helper()
	var got []string
	for {
		m, ok := r.seen.next(r.t, 5*time.Second)
		if !ok {
			r.t.Fatalf("presence: %q, and no %q", got, want)
		}
		if got = append(got, string(m.Payload())); got[len(got)-1] == want {
			return got
		}
	}
}

// quiet collects presence payloads until none arrives for a while.
func (r *presenceRig) quiet() []string {
	var got []string
	for {
		m, ok := r.seen.next(r.t, quiet)
		if !ok {
			return got
		}
		got = append(got, string(m.Payload()))
	}
}

// retained reads the retained presence with a fresh subscription.
func (r *presenceRig) retained() string {
	r.t.Helper()
	col := newCollector()
	subscribe(r.t, pahoClient(r.t, r.env, "monitor-2", r.env.Monitor, true), r.presence, col)
	m, ok := col.next(r.t, 5*time.Second)
	if !ok {
		r.t.Fatal("no retained presence")
	}
	return string(m.Payload())
}

func waitLost(t *testing.T, lost <-chan struct{}) {
	t.Helper()
	select {
	case <-lost:
	case <-time.After(10 * time.Second):
		t.Fatal("the broker did not disconnect the old connection")
	}
}

// TestTakeoverKeepsPresence: a device whose old connection is still open (its link died
// silently, or the broker has not yet read the close) reconnects. The new connection takes
// over the session, and the old connection's will says "online", not "offline": it could
// land after the new connection's "online" and leave the device retained as offline
// while it is connected. A connection that dies with nobody taking over still publishes
// its will.
func TestTakeoverKeepsPresence(t *testing.T) {
	r := newPresenceRig(t)
	_, lostA := r.connect()
	r.until("online")
	r.quiet()
	ncB, _ := r.connect() // takes over while A's connection is open
	waitLost(t, lostA)
	got := append(r.until("online"), r.quiet()...)
	if slices.Contains(got, "offline") {
		t.Fatalf("presence during the takeover: %q; the old connection's will said offline", got)
	}
	if n := r.env.Broker.Stats().WillsCancelled; n != 1 {
		t.Fatalf("WillsCancelled = %d, want 1", n)
	}

	// B's link breaks and nobody takes over: its will is published.
	ncB.Close()
	r.until("offline")
	if got := r.retained(); got != "offline" {
		t.Fatalf("retained presence %q after the last connection died", got)
	}
}

// TestLateWillAfterTakeover: the old connection's goroutine was already publishing its
// will when the new connection took over, and its "offline" lands after the new
// connection's "online". The broker answers with "online" for the live connection, so
// the retained presence ends true; a will from the live connection itself is left alone.
func TestLateWillAfterTakeover(t *testing.T) {
	r := newPresenceRig(t)
	_, lostA := r.connect()
	r.until("online")
	oldA := broker.ClientOf(r.env.Broker, r.serial)
	ncB, _ := r.connect()
	waitLost(t, lostA)
	r.until("online")
	r.quiet()

	// A's late will: retained "offline" on the presence topic, then mochi's will-sent hook.
	upd := pahoClient(t, r.env, "updater-1", r.env.Updater, true)
	publish(t, upd, r.presence, 1, true, "offline")
	r.until("offline") // delivered (mochi acknowledges a PUBLISH before it fans it out)
	broker.WillSent(r.env.Broker, oldA, r.presence, "offline")
	if got := r.until("online"); !slices.Equal(got, []string{"online"}) {
		t.Fatalf("presence after the late will: %q, want online", got)
	}
	if got := r.retained(); got != "online" {
		t.Fatalf("retained presence %q while B is connected", got)
	}
	if n := r.env.Broker.Stats().LateWills; n != 1 {
		t.Fatalf("LateWills = %d, want 1", n)
	}

	// B's own will is the truth.
	ncB.Close()
	r.until("offline")
	if got := append([]string{r.retained()}, r.quiet()...); got[0] != "offline" || slices.Contains(got[1:], "online") {
		t.Fatalf("after B's link died: retained %q, then %q", got[0], got[1:])
	}
	if n := r.env.Broker.Stats().LateWills; n != 1 {
		t.Fatalf("LateWills = %d after B's own will, want 1", n)
	}
}
