package aedestest_test

import (
	"bytes"
	"fmt"
	"net"
	"strings"
	"testing"
	"time"

	mqtt "github.com/eclipse/paho.mqtt.golang"
	"github.com/eclipse/paho.mqtt.golang/packets"

	"github.com/sealcast/sealcast/internal/testkit/aedestest"
	"github.com/sealcast/sealcast/internal/testkit/redistest"
)

// quiet is how long a test waits to be sure a message does not arrive. Every such wait
// comes after a message published later on the same path did arrive.
const quiet = 300 * time.Millisecond

type msg struct {
	topic, payload string
	retained       bool
}

// inbox collects the messages a client receives.
type inbox chan msg

func newInbox() inbox { return make(inbox, 64) }

func (in inbox) handler(_ mqtt.Client, m mqtt.Message) {
	in <- msg{m.Topic(), string(m.Payload()), m.Retained()}
}

// next returns the next message, failing the test after 10 s.
func (in inbox) next(t *testing.T) msg {
	t.Helper()
	select {
	case m := <-in:
		return m
	case <-time.After(10 * time.Second):
		t.Fatal("no message within 10 s")
		return msg{}
	}
}

// want waits for a message with this topic and payload; any other message fails the test.
func (in inbox) want(t *testing.T, topic, payload string) msg {
	t.Helper()
	m := in.next(t)
	if m.topic != topic || m.payload != payload {
		t.Fatalf("got %q on %s, want %q on %s", short(m.payload), m.topic, payload, topic)
	}
	return m
}

// until waits for a message with each of these topics, ignoring any others.
func (in inbox) until(t *testing.T, topics ...string) {
	t.Helper()
	left := map[string]bool{}
	for _, topic := range topics {
		left[topic] = true
	}
	for len(left) > 0 {
		delete(left, in.next(t).topic)
	}
}

// none fails the test if a message arrives within quiet.
func (in inbox) none(t *testing.T) {
	t.Helper()
	select {
	case m := <-in:
		t.Fatalf("unexpected message %q on %s", short(m.payload), m.topic)
	case <-time.After(quiet):
	}
}

func short(s string) string {
	if len(s) > 40 {
		return fmt.Sprintf("%s... (%d bytes)", s[:40], len(s))
	}
	return s
}

type opt func(*mqtt.ClientOptions)

func user(name, password string) opt {
	return func(o *mqtt.ClientOptions) { o.SetUsername(name).SetPassword(password) }
}

func persistent(in inbox) opt {
	return func(o *mqtt.ClientOptions) { o.SetCleanSession(false).SetDefaultPublishHandler(in.handler) }
}

func will(topic, payload string) opt {
	return func(o *mqtt.ClientOptions) { o.SetWill(topic, payload, 1, true) }
}

// lost is closed when the client's connection drops.
func lost(ch chan struct{}) opt {
	return func(o *mqtt.ClientOptions) {
		o.SetConnectionLostHandler(func(mqtt.Client, error) { close(ch) })
	}
}

// dial connects a client, without automatic reconnects, and returns the CONNECT's token.
func dial(t *testing.T, url, id string, opts ...opt) (mqtt.Client, *mqtt.ConnectToken) {
	t.Helper()
	o := mqtt.NewClientOptions().AddBroker(url).SetClientID(id).
		SetConnectTimeout(10 * time.Second).SetAutoReconnect(false).SetConnectRetry(false)
	for _, f := range opts {
		f(o)
	}
	c := mqtt.NewClient(o)
	tok := c.Connect()
	if !tok.WaitTimeout(15 * time.Second) {
		t.Fatalf("connecting %s to %s: no CONNACK within 15 s", id, url)
	}
	t.Cleanup(func() { c.Disconnect(0) })
	return c, tok.(*mqtt.ConnectToken)
}

func connect(t *testing.T, url, id string, opts ...opt) mqtt.Client {
	t.Helper()
	c, tok := dial(t, url, id, opts...)
	if tok.Error() != nil {
		t.Fatalf("connecting %s to %s: %v", id, url, tok.Error())
	}
	return c
}

// refused checks that a CONNECT is answered with this return code.
func refused(t *testing.T, url, id string, code byte, opts ...opt) {
	t.Helper()
	_, tok := dial(t, url, id, opts...)
	if tok.Error() == nil {
		t.Fatalf("%s connected; want return code %d", id, code)
	}
	if tok.ReturnCode() != code {
		t.Fatalf("%s refused with return code %d (%v), want %d", id, tok.ReturnCode(), tok.Error(), code)
	}
}

// subscribe subscribes at QoS 1 and returns the SUBACK's code.
func subscribe(t *testing.T, c mqtt.Client, filter string, in inbox) byte {
	t.Helper()
	tok := c.Subscribe(filter, 1, in.handler)
	if !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		t.Fatalf("subscribe %s: %v", filter, tok.Error())
	}
	// paho keys the result by the filter without its $share/{group}/ prefix: take the one.
	for _, code := range tok.(*mqtt.SubscribeToken).Result() {
		return code
	}
	t.Fatalf("subscribe %s: no SUBACK code", filter)
	return 0
}

func mustSubscribe(t *testing.T, c mqtt.Client, filter string, in inbox) {
	t.Helper()
	if code := subscribe(t, c, filter, in); code != 1 {
		t.Fatalf("subscribe %s: SUBACK code %#x, want 1", filter, code)
	}
}

func publish(t *testing.T, c mqtt.Client, topic string, retained bool, payload string) {
	t.Helper()
	tok := c.Publish(topic, 1, retained, payload)
	if !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		t.Fatalf("publish %s: %v", topic, tok.Error())
	}
}

// forbidden publishes what the broker must refuse, and checks that it closes the
// connection (aedes's answer to a refused PUBLISH).
func forbidden(t *testing.T, url, id, topic string, retained bool, payload string, opts ...opt) {
	t.Helper()
	gone := make(chan struct{})
	c := connect(t, url, id, append(opts, lost(gone))...)
	c.Publish(topic, 1, retained, payload)
	select {
	case <-gone:
	case <-time.After(10 * time.Second):
		t.Fatalf("%s publishing to %s (retained %v): connection still open after 10 s", id, topic, retained)
	}
}

// TestCluster: two nodes on one Redis. A retained message published on node 1 reaches a
// live subscriber on node 2 and then a new subscriber on node 2; a QoS 1 publish on node
// 1 reaches a live subscriber on node 2. Without users too, $SYS/ publishes and $share/
// subscriptions are refused.
func TestCluster(t *testing.T) {
	r := redistest.Start(t)
	n1 := aedestest.Start(t, r.URL())
	n2 := aedestest.Start(t, r.URL())

	live := newInbox()
	l := connect(t, n2.URL, "live")
	mustSubscribe(t, l, "t/retained", live)
	mustSubscribe(t, l, "t/live", live)

	pub := connect(t, n1.URL, "pub")
	publish(t, pub, "t/retained", true, "kept")
	// aedes stores a retained message before routing it: once it arrives, it is stored.
	live.want(t, "t/retained", "kept")
	// Nobody may publish on $SYS/ (the nodes tell each other there which client ids
	// connected, to close older connections): this would disconnect "live".
	forbidden(t, n1.URL, "sys", "$SYS/x/new/clients", false, "live")
	refused(t, n1.URL, "sys-will", packets.ErrRefusedNotAuthorised, will("$SYS/x/new/clients", "live"))
	// aedes has no shared subscriptions; it refuses them rather than deliver nothing.
	if code := subscribe(t, connect(t, n2.URL, "share"), "$share/g/t/live", newInbox()); code != 0x80 {
		t.Fatalf("$share subscription: SUBACK %#x, want 0x80", code)
	}
	publish(t, pub, "t/live", false, "hello")
	live.want(t, "t/live", "hello")

	fresh := newInbox()
	mustSubscribe(t, connect(t, n2.URL, "fresh"), "t/#", fresh)
	if m := fresh.want(t, "t/retained", "kept"); !m.retained {
		t.Fatal("the stored message arrived without the retain flag")
	}
	fresh.none(t) // t/live was not retained
}

// TestSessionMovesNodes: a persistent session made on node 1 gets, when it reconnects to
// node 2, the QoS 1 message published on node 2 while it was away; the session survives
// a restart of node 1 as well.
func TestSessionMovesNodes(t *testing.T) {
	r := redistest.Start(t)
	n1 := aedestest.Start(t, r.URL())
	n2 := aedestest.Start(t, r.URL())

	away := newInbox()
	s := connect(t, n1.URL, "sess", persistent(away))
	mustSubscribe(t, s, "t/queued", away)
	s.Disconnect(100)

	pub := connect(t, n2.URL, "pub")
	publish(t, pub, "t/queued", false, "while away")

	back := newInbox()
	_, tok := dial(t, n2.URL, "sess", persistent(back))
	if tok.Error() != nil {
		t.Fatal(tok.Error())
	}
	if !tok.SessionPresent() {
		t.Fatal("reconnecting to node 2: no session present")
	}
	back.want(t, "t/queued", "while away")

	// The session and its subscription live in Redis: node 1, restarted, has them too.
	n1.Restart(t)
	publish(t, pub, "t/queued", false, "after restart")
	_, tok = dial(t, n1.URL, "sess", persistent(back)) // takes the session over from node 2
	if tok.Error() != nil || !tok.SessionPresent() {
		t.Fatalf("reconnecting to the restarted node 1: %v, session present %v", tok.Error(), tok.SessionPresent())
	}
	for {
		// The message may come on either connection: node 2's until node 1 takes over.
		if m := back.next(t); m.payload == "after restart" {
			break
		}
	}
	select {
	case m := <-away:
		t.Fatalf("the first connection got %q after disconnecting", m.payload)
	default:
	}
}

const (
	pw   = "secret"
	devA = "dev-a"
	devB = "dev-b"
)

func users() map[string]aedestest.User {
	return map[string]aedestest.User{
		devA:           {Password: pw, Role: "device"},
		devB:           {Password: pw, Role: "device"},
		"upd":          {Password: pw, Role: "updater"},
		"admin":        {Password: pw, Role: "admin"},
		"monitor":      {Password: pw, Role: "monitor"},
		"monitor-evil": {Password: pw, Role: "monitor"},
	}
}

// TestAccessRules: with users, two nodes enforce PROTOCOL.md 9.2 (deploy/aedes/broker.js).
func TestAccessRules(t *testing.T) {
	r := redistest.Start(t)
	n1 := aedestest.Start(t, r.URL(), aedestest.WithUsers(users()))
	n2 := aedestest.Start(t, r.URL(), aedestest.WithUsers(users()))
	as := func(name string) opt { return user(name, pw) }

	upd := connect(t, n1.URL, "upd-1", as("upd"))
	// The admin reads everything: once it has a message, every node has had it.
	all := newInbox()
	admin := connect(t, n1.URL, "admin-1", as("admin"))
	mustSubscribe(t, admin, "#", all)

	t.Run("refused", func(t *testing.T) {
		refused(t, n1.URL, devA, packets.ErrRefusedBadUsernameOrPassword, user(devA, "wrong"))
		refused(t, n1.URL, devA, packets.ErrRefusedBadUsernameOrPassword, user(devA, ""))
		refused(t, n1.URL, "nobody", packets.ErrRefusedBadUsernameOrPassword, user("nobody", pw))
		refused(t, n2.URL, devB, packets.ErrRefusedNotAuthorised, as(devA)) // dev-a taking dev-b's session
		refused(t, n2.URL, devB, packets.ErrRefusedNotAuthorised, as("monitor-evil"))
		refused(t, n2.URL, devA, packets.ErrRefusedNotAuthorised, as(devA),
			will("sealcast/devices/"+devB+"/presence", "offline"))
		// (A DISCONNECT, so the will is not published.)
		connect(t, n2.URL, devA, as(devA), will("sealcast/devices/"+devA+"/presence", "offline")).Disconnect(250)
	})

	t.Run("keys", func(t *testing.T) {
		keys := newInbox()
		a := connect(t, n2.URL, devA, as(devA))
		if code := subscribe(t, a, "sealcast/devices/"+devB+"/key", keys); code != 0x80 {
			t.Fatalf("dev-a subscribing to dev-b's key: SUBACK %#x, want 0x80", code)
		}
		mustSubscribe(t, a, "sealcast/devices/+/key", keys)
		publish(t, upd, "sealcast/devices/"+devB+"/key", true, "key-b")
		publish(t, upd, "sealcast/devices/"+devA+"/key", true, "key-a")
		all.until(t, "sealcast/devices/"+devA+"/key", "sealcast/devices/"+devB+"/key")
		keys.want(t, "sealcast/devices/"+devA+"/key", "key-a")
		keys.none(t)
		// The retained messages: dev-a's only.
		again := newInbox()
		mustSubscribe(t, connect(t, n1.URL, devA, as(devA)), "sealcast/devices/+/key", again)
		again.want(t, "sealcast/devices/"+devA+"/key", "key-a")
		again.none(t)
	})

	t.Run("acks", func(t *testing.T) {
		acks := newInbox()
		mustSubscribe(t, upd, "sealcast/devices/+/ack", acks)
		forbidden(t, n2.URL, devA, "sealcast/devices/"+devB+"/ack", false, "forged", as(devA))
		forbidden(t, n2.URL, devB, "sealcast/devices/"+devB+"/ack", true, "retained ack", as(devB))
		forbidden(t, n2.URL, devA, "sealcast/releases/r1/manifest", true, "forged", as(devA))
		b := connect(t, n2.URL, devB, as(devB))
		publish(t, b, "sealcast/devices/"+devB+"/ack", false, "ack-b")
		acks.want(t, "sealcast/devices/"+devB+"/ack", "ack-b")
		acks.none(t)
		all.want(t, "sealcast/devices/"+devB+"/ack", "ack-b") // nor did the forged ones reach the admin
	})

	t.Run("monitor", func(t *testing.T) {
		seen := newInbox()
		m := connect(t, n2.URL, "monitor-1", as("monitor"))
		if code := subscribe(t, m, "sealcast/releases/#", seen); code != 0x80 {
			t.Fatalf("monitor subscribing to releases: SUBACK %#x, want 0x80", code)
		}
		mustSubscribe(t, m, "sealcast/#", seen)
		forbidden(t, n2.URL, "monitor-2", "sealcast/status/fleet", false, "{}", as("monitor"))
		publish(t, upd, "sealcast/releases/r1/manifest", true, "manifest")
		publish(t, upd, "sealcast/keys/1", true, "statement")
		publish(t, upd, "sealcast/devices/"+devA+"/receipt", true, "receipt")
		publish(t, upd, "sealcast/status/fleet", true, "fleet")
		publish(t, connect(t, n1.URL, devA, as(devA)), "sealcast/devices/"+devA+"/state", true, "state-a")
		all.until(t, "sealcast/releases/r1/manifest", "sealcast/keys/1", "sealcast/devices/"+devA+"/receipt",
			"sealcast/status/fleet", "sealcast/devices/"+devA+"/state")
		got := map[string]string{}
		for len(got) < 2 {
			x := seen.next(t)
			got[x.topic] = x.payload
		}
		seen.none(t)
		if got["sealcast/status/fleet"] != "fleet" || got["sealcast/devices/"+devA+"/state"] != "state-a" {
			t.Fatalf("monitor got %v", got)
		}
	})

	t.Run("largest", func(t *testing.T) {
		chunks := newInbox()
		mustSubscribe(t, connect(t, n2.URL, devB, as(devB)), "sealcast/releases/r2/chunks/+", chunks)
		big := strings.Repeat("\xa5", 1<<20+4<<10)
		forbidden(t, n1.URL, "upd-2", "sealcast/releases/r2/chunks/1", false, big+"!", as("upd"))
		publish(t, upd, "sealcast/releases/r2/chunks/0", false, big)
		if m := chunks.next(t); m.topic != "sealcast/releases/r2/chunks/0" || !bytes.Equal([]byte(m.payload), []byte(big)) {
			t.Fatalf("got %s (%d bytes), want chunks/0 of %d bytes", m.topic, len(m.payload), len(big))
		}
		chunks.none(t)
	})
}

// TestWillsAfterCrash: when a node is killed, another node publishes the wills of its
// clients, except of a client that has reconnected since (to another node). A node
// restarted after the crash has the retained wills.
func TestWillsAfterCrash(t *testing.T) {
	r := redistest.Start(t)
	fast := aedestest.WithArgs("--heartbeat-interval", "150") // dead after 3 heartbeats, checked every 4
	n1 := aedestest.Start(t, r.URL(), fast)
	n2 := aedestest.Start(t, r.URL(), fast)

	presence := newInbox()
	mustSubscribe(t, connect(t, n2.URL, "monitor"), "sealcast/devices/+/presence", presence)
	for _, d := range []string{devA, devB} {
		c := connect(t, n1.URL, d, persistent(newInbox()), will("sealcast/devices/"+d+"/presence", "offline"))
		publish(t, c, "sealcast/devices/"+d+"/presence", true, "online")
		presence.want(t, "sealcast/devices/"+d+"/presence", "online")
	}
	start := time.Now()
	n1.Kill()
	connect(t, n2.URL, devA, persistent(newInbox()), will("sealcast/devices/"+devA+"/presence", "offline"))
	presence.want(t, "sealcast/devices/"+devB+"/presence", "offline")
	t.Logf("dev-b's will published %v after the crash", time.Since(start).Round(time.Millisecond))
	presence.none(t)
	time.Sleep(4 * 150 * time.Millisecond) // one more round of will checks
	presence.none(t)

	n1.Restart(t)
	now := newInbox()
	mustSubscribe(t, connect(t, n1.URL, "monitor-2"), "sealcast/devices/+/presence", now)
	got := map[string]string{}
	for len(got) < 2 {
		m := now.next(t)
		got[m.topic] = m.payload
	}
	if got["sealcast/devices/"+devA+"/presence"] != "online" || got["sealcast/devices/"+devB+"/presence"] != "offline" {
		t.Fatalf("retained presence after the restart: %v", got)
	}
}

// TestTakeoverKeepsPresence: a device that connects again while its old connection is
// still open, to another node or to the same one, takes the session over, and the old
// connection's will ("offline") is not published: the device stays "online". The will
// of a connection that just drops is published.
func TestTakeoverKeepsPresence(t *testing.T) {
	r := redistest.Start(t)
	n1 := aedestest.Start(t, r.URL())
	n2 := aedestest.Start(t, r.URL())

	presence := newInbox()
	mustSubscribe(t, connect(t, n2.URL, "monitor"), "sealcast/devices/+/presence", presence)
	topic := "sealcast/devices/" + devA + "/presence"
	gone := make(chan struct{})
	c := connect(t, n1.URL, devA, persistent(newInbox()), will(topic, "offline"), lost(gone))
	publish(t, c, topic, true, "online")
	presence.want(t, topic, "online")
	for i, n := range []*aedestest.Node{n2, n2, n1} { // to another node, the same node, back
		next := make(chan struct{})
		connect(t, n.URL, devA, persistent(newInbox()), will(topic, "offline"), lost(next))
		select {
		case <-gone:
		case <-time.After(10 * time.Second):
			t.Fatalf("takeover %d: the old connection is still open", i)
		}
		presence.none(t)
		gone = next
	}

	// A connection that closes without DISCONNECT (paho cannot): its will goes out.
	conn, err := net.DialTimeout("tcp", n2.Addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	cp := packets.NewControlPacket(packets.Connect).(*packets.ConnectPacket)
	cp.ProtocolName, cp.ProtocolVersion, cp.ClientIdentifier, cp.Keepalive = "MQTT", 4, devA, 30
	cp.WillFlag, cp.WillTopic, cp.WillMessage, cp.WillQos, cp.WillRetain = true, topic, []byte("offline"), 1, true
	if err := cp.Write(conn); err != nil {
		t.Fatal(err)
	}
	conn.SetReadDeadline(time.Now().Add(10 * time.Second))
	if p, err := packets.ReadPacket(conn); err != nil {
		t.Fatal(err)
	} else if ca, ok := p.(*packets.ConnackPacket); !ok || ca.ReturnCode != 0 {
		t.Fatalf("raw CONNECT answered with %v", p)
	}
	select {
	case <-gone:
	case <-time.After(10 * time.Second):
		t.Fatal("last takeover: the old connection is still open")
	}
	presence.none(t)
	conn.Close()
	presence.want(t, topic, "offline")
}

// TestPersistentMultiSubscribe: a persistent session's SUBSCRIBE of several topics at
// once, as every Sealcast device sends (its key, receipt and key statement topics), gets
// its SUBACK and its messages. aedes 0.51 with the Redis persistence left it without a
// SUBACK until broker.js kept every waiter (see persistence._waitFor there).
func TestPersistentMultiSubscribe(t *testing.T) {
	n := aedestest.Start(t, redistest.Start(t).URL())
	in := newInbox()
	d := connect(t, n.URL, "dev-1", persistent(in))
	topics := map[string]byte{"sealcast/devices/dev-1/key": 1, "sealcast/devices/dev-1/receipt": 1, "sealcast/keys/1": 1}
	tok := d.SubscribeMultiple(topics, nil)
	if !tok.WaitTimeout(10 * time.Second) {
		t.Fatal("no SUBACK within 10 s for a persistent session's SUBSCRIBE of three topics")
	}
	if got := tok.(*mqtt.SubscribeToken).Result(); len(got) != 3 || got["sealcast/devices/dev-1/key"] != 1 {
		t.Fatalf("SUBACK %v, want QoS 1 for all three", got)
	}
	up := connect(t, n.URL, "up")
	publish(t, up, "sealcast/devices/dev-1/receipt", false, "r")
	in.want(t, "sealcast/devices/dev-1/receipt", "r")
}
