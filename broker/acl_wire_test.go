package broker_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/sealcast/sealcast/broker"
	"github.com/sealcast/sealcast/internal/testkit/brokertest"
)

const quiet = 300 * time.Millisecond // how long "nothing arrives" is watched

// TestAccessRulesPaho checks [SC-9.2] with paho clients: denied subscriptions get SUBACK
// 0x80, denied publishes reach no subscriber.
func TestAccessRulesPaho(t *testing.T) {
	env := brokertest.Start(t)
	// The updater sees everything under sealcast/, so it observes denied publishes.
	upd := pahoClient(t, env, "updater-1", env.Updater, true)
	seen := newCollector()
	if code := subscribe(t, upd, "sealcast/#", seen); code != 1 {
		t.Fatalf("updater subscribe: %#x", code)
	}
	// B's key is retained, so a subscription that reaches it would deliver it at once.
	publish(t, upd, "sealcast/devices/dev-b/key", 1, true, "key-of-b")
	publish(t, upd, "sealcast/releases/r1/manifest", 1, true, "manifest")
	publish(t, upd, "sealcast/devices/dev-a/key", 1, true, "key-of-a")
	drain(seen)

	a := pahoClient(t, env, "dev-a", env.Device(t, "dev-a"), false)
	got := newCollector()
	for _, f := range []string{
		"sealcast/devices/dev-b/key", "sealcast/devices/+/key", "sealcast/devices/#", "#",
		"+/devices/dev-b/key", "$share/g/sealcast/devices/dev-b/key", "$share/g/#",
		"sealcast/devices/dev-b/receipt", "sealcast/admin/#", "sealcast/status/#", "$SYS/#",
	} {
		if code := subscribe(t, a, f, got); code != 0x80 {
			t.Errorf("device A subscribing %q: SUBACK %#x, want 0x80", f, code)
		}
	}
	if m, ok := got.next(t, quiet); ok {
		t.Fatalf("device A received %q on %s", m.Payload(), m.Topic())
	}
	for _, f := range []string{"sealcast/devices/dev-a/key", "sealcast/releases/+/manifest"} {
		if code := subscribe(t, a, f, got); code != 1 {
			t.Errorf("device A subscribing %q: SUBACK %#x, want 1", f, code)
		}
	}
	for range 2 {
		m, ok := got.next(t, 5*time.Second)
		if !ok {
			t.Fatal("device A did not receive its retained key and the manifest")
		}
		if p := string(m.Payload()); p != "key-of-a" && p != "manifest" {
			t.Fatalf("device A received %q", p)
		}
	}

	// Denied publishes (QoS 0, so that the device stays connected) reach nobody.
	for _, topic := range []string{
		"sealcast/devices/dev-b/ack", "sealcast/admin/requests",
		"sealcast/releases/r1/manifest", "sealcast/releases/r1/chunks/0", "sealcast/devices/dev-a/key",
	} {
		publish(t, a, topic, 0, true, "forged")
	}
	publish(t, a, "sealcast/devices/dev-a/ack", 1, false, "real-ack")
	m, ok := seen.next(t, 5*time.Second)
	if !ok || string(m.Payload()) != "real-ack" {
		t.Fatalf("updater: want only the real ack first, got %v", m)
	}
	if m, ok := seen.next(t, quiet); ok {
		t.Fatalf("a denied publish reached the updater: %q on %s", m.Payload(), m.Topic())
	}

	// A monitor may read status and device state, and publish nothing.
	mon := pahoClient(t, env, "mon-1", env.Monitor, true)
	monSeen := newCollector()
	for f, want := range map[string]byte{
		"sealcast/status/#": 1, "sealcast/devices/+/state": 1, "sealcast/devices/dev-a/presence": 1,
		"sealcast/devices/+/key": 0x80, "sealcast/#": 0x80, "#": 0x80,
	} {
		if code := subscribe(t, mon, f, monSeen); code != want {
			t.Errorf("monitor subscribing %q: SUBACK %#x, want %#x", f, code, want)
		}
	}
	for _, topic := range []string{"sealcast/status/fleet", "sealcast/admin/requests", "sealcast/devices/dev-a/state"} {
		publish(t, mon, topic, 0, false, "from-monitor")
	}
	if m, ok := seen.next(t, quiet); ok {
		t.Fatalf("a monitor's publish reached the updater: %q on %s", m.Payload(), m.Topic())
	}
	// The retained image topics still hold the updater's messages.
	check := pahoClient(t, env, "admin-1", env.Admin, true)
	retained := newCollector()
	subscribe(t, check, "sealcast/releases/#", retained)
	if m, ok := retained.next(t, 5*time.Second); !ok || string(m.Payload()) != "manifest" {
		t.Fatalf("retained manifest changed: %v", m)
	}
	if s := env.Broker.Stats(); s.ACLDenials == 0 {
		t.Error("Stats().ACLDenials is 0")
	}
}

// TestDeniedQoS1PublishDisconnects documents mochi's answer to a denied QoS 1 publish from
// an MQTT 3.1.1 client, which has no negative PUBACK: it disconnects the client.
func TestDeniedQoS1PublishDisconnects(t *testing.T) {
	env := brokertest.Start(t)
	c, code := connectRaw(t, env.Addr, "dev-a", "dev-a", env.Device(t, "dev-a").Password, true)
	if code != 0 {
		t.Fatal(code)
	}
	c.send(publishPacket("sealcast/devices/dev-b/ack", []byte("x"), 1, 7, false))
	for {
		p, err := c.read(5 * time.Second)
		if err != nil {
			return // connection closed
		}
		if p.typ == 4 {
			t.Fatal("denied QoS 1 publish was acknowledged")
		}
	}
}

func drain(c *collector) {
	for {
		select {
		case <-c.ch:
		case <-time.After(quiet):
			return
		}
	}
}

// requireTool returns the path of an outside tool, skipping the test if it is missing
// unless SEALCAST_REQUIRE_TOOLS=1.
func requireTool(t *testing.T, name string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		if os.Getenv("SEALCAST_REQUIRE_TOOLS") == "1" {
			t.Fatalf("%s not found in PATH (apt-get install mosquitto-clients)", name)
		}
		t.Skipf("%s not found in PATH; set SEALCAST_REQUIRE_TOOLS=1 to fail instead", name)
	}
	return p
}

type mosq struct {
	t          *testing.T
	pub, sub   string
	host, port string
}

func newMosq(t *testing.T, env *brokertest.Env) *mosq {
	host, port, _ := strings.Cut(env.Addr, ":")
	return &mosq{t: t, pub: requireTool(t, "mosquitto_pub"), sub: requireTool(t, "mosquitto_sub"), host: host, port: port}
}

func (m *mosq) args(clientID string, cr brokertest.Credentials) []string {
	return []string{"-h", m.host, "-p", m.port, "-V", "mqttv311", "-i", clientID, "-u", cr.Username, "-P", cr.Password}
}

// run runs a mosquitto tool and returns its combined output and exit error.
func (m *mosq) run(tool string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	var out bytes.Buffer
	cmd := exec.CommandContext(ctx, tool, args...)
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	return out.String(), err
}

// startSub starts mosquitto_sub in the background; wait returns what it printed.
func (m *mosq) startSub(args ...string) (wait func() string) {
	var out bytes.Buffer
	cmd := exec.Command(m.sub, args...)
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		m.t.Fatal(err)
	}
	return func() string {
		_ = cmd.Wait()
		return out.String()
	}
}

// TestAccessRulesMosquitto repeats the essential checks with mosquitto_pub and
// mosquitto_sub as outside clients.
func TestAccessRulesMosquitto(t *testing.T) {
	env := brokertest.Start(t)
	m := newMosq(t, env)
	devA, devB := env.Device(t, "dev-a"), env.Device(t, "dev-b")

	if out, err := m.run(m.pub, append(m.args("updater-1", env.Updater),
		"-t", "sealcast/devices/dev-b/key", "-m", "key-of-b", "-q", "1", "-r")...); err != nil {
		t.Fatalf("updater publish: %v: %s", err, out)
	}
	// Device A cannot read B's key, directly or through wildcards or $share.
	for _, f := range []string{"sealcast/devices/dev-b/key", "sealcast/devices/+/key", "sealcast/devices/#", "#", "$share/g/sealcast/devices/dev-b/key"} {
		out, _ := m.run(m.sub, append(m.args("dev-a", devA), "-t", f, "-q", "1", "-C", "1", "-W", "2", "-v")...)
		if strings.Contains(out, "key-of-b") {
			t.Errorf("device A read B's key via %q: %s", f, out)
		}
		if !strings.Contains(out, "denied") {
			t.Errorf("mosquitto_sub %q as device A: want a denied subscription, got %q", f, out)
		}
	}
	// Wrong passwords and unknown users are refused.
	for _, cr := range []brokertest.Credentials{{Username: "dev-a", Password: devB.Password}, {Username: "nobody!", Password: "x"}, {Username: env.Admin.Username, Password: "wrong"}} {
		out, err := m.run(m.pub, append(m.args(cr.Username, cr), "-t", "sealcast/devices/dev-a/state", "-m", "x")...)
		if err == nil {
			t.Errorf("mosquitto_pub as %q with a wrong password succeeded: %s", cr.Username, out)
		}
	}
	// Client id different from the username is refused.
	if out, err := m.run(m.pub, append(m.args("dev-b", devA), "-t", "sealcast/devices/dev-a/state", "-m", "x")...); err == nil {
		t.Errorf("client id != username accepted: %s", out)
	}

	// An observer with the updater account sees what gets through.
	wait := m.startSub(append(m.args("observer", env.Updater), "-t", "sealcast/#", "-v", "-W", "3", "-R")...)
	time.Sleep(500 * time.Millisecond) // let it subscribe
	forged := map[string]brokertest.Credentials{
		"sealcast/devices/dev-b/ack":     devA,        // ack as B
		"sealcast/admin/requests":        devA,        // admin topic
		"sealcast/releases/r1/manifest":  devA,        // retained image topic
		"sealcast/releases/r1/chunks/0":  devA,        //
		"sealcast/status/fleet":          env.Monitor, // monitors publish nothing
		"sealcast/devices/dev-a/state":   env.Monitor, //
		"sealcast/devices/dev-a/ack":     env.Monitor, //
		"sealcast/releases/r2/manifest":  env.Admin,   // admins publish only admin topics
		"sealcast/devices/dev-b/receipt": devB,        // a device cannot write its receipt
	}
	i := 0
	for topic, cr := range forged {
		i++
		id := cr.Username
		if cr.Username == env.Monitor.Username || cr.Username == env.Admin.Username {
			id += "-" + strconv.Itoa(i)
		}
		_, _ = m.run(m.pub, append(m.args(id, cr), "-t", topic, "-m", "forged", "-q", "0", "-r")...)
	}
	if out, err := m.run(m.pub, append(m.args("dev-a", devA), "-t", "sealcast/devices/dev-a/ack", "-m", "real-ack", "-q", "1")...); err != nil {
		t.Fatalf("device A's own ack: %v: %s", err, out)
	}
	out := wait()
	if strings.Contains(out, "forged") {
		t.Errorf("a denied publish got through:\n%s", out)
	}
	if !strings.Contains(out, "sealcast/devices/dev-a/ack real-ack") {
		t.Errorf("the observer missed device A's own ack:\n%s", out)
	}
}

// TestRetainRefused: a retained PUBLISH to a topic the protocol does not retain (a
// device's ack topic, the admin topics) is refused like a denied publish, and nothing is
// retained there; the same message without the retain flag goes through.
func TestRetainRefused(t *testing.T) {
	env := brokertest.Start(t)
	dev := env.Device(t, "dev-a")
	for _, tc := range []struct {
		name, user, pass, topic string
	}{
		{"device ack", "dev-a", dev.Password, "sealcast/devices/dev-a/ack"},
		{"admin request", env.Admin.Username, env.Admin.Password, "sealcast/admin/requests"},
		{"admin upload", env.Admin.Username, env.Admin.Password, "sealcast/admin/uploads/u1/0"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			id := "c-" + tc.user
			if tc.user == "dev-a" {
				id = "dev-a"
			}
			// QoS 0: dropped. QoS 1 (MQTT 3.1.1): disconnected, not acknowledged.
			c, code := connectRaw(t, env.Addr, id, tc.user, tc.pass, true)
			if code != 0 {
				t.Fatalf("CONNACK %#x", code)
			}
			c.send(publishPacket(tc.topic, []byte("garbage-0"), 0, 0, true))
			c.send(publishPacket(tc.topic, []byte("garbage-1"), 1, 7, true))
			for {
				p, err := c.read(5 * time.Second)
				if err != nil {
					break // disconnected
				}
				if p.typ == 4 {
					t.Fatal("retained QoS 1 publish was acknowledged")
				}
			}
			// Nothing was retained: a new subscriber gets nothing.
			sub := pahoClient(t, env, "sub-"+id, env.Updater, true)
			got := newCollector()
			subscribe(t, sub, tc.topic, got)
			if m, ok := got.next(t, quiet); ok {
				t.Fatalf("retained %q on %s", m.Payload(), tc.topic)
			}
			// Without the retain flag the same publish goes through.
			c2, _ := connectRaw(t, env.Addr, id, tc.user, tc.pass, true)
			c2.send(publishPacket(tc.topic, []byte("fine"), 1, 8, false))
			if p := c2.expect(4); len(p.body) != 2 {
				t.Fatalf("PUBACK %x", p.body)
			}
			if m, ok := got.next(t, 5*time.Second); !ok || string(m.Payload()) != "fine" {
				t.Fatalf("plain publish not delivered: %v", m)
			}
		})
	}
}

// TestRetainRefusedMQTT5: an MQTT 5 client's retained QoS 1 PUBLISH to its ack topic is
// answered with PUBACK reason 0x87 (not authorized) and the client stays connected; the
// refused payload appears in no log line, even at debug level, where mochi logs the
// refused packet.
func TestRetainRefusedMQTT5(t *testing.T) {
	var logs syncBuffer
	env := brokertest.Start(t, brokertest.WithOptions(func(o *broker.Options) {
		o.Logger = zerolog.New(&logs).Level(zerolog.DebugLevel)
	}))
	dev := env.Device(t, "dev-a")
	c := dialRaw(t, env.Addr)
	// CONNECT, protocol level 5: flags (user, password, clean), keepalive 60, no properties.
	b := appendStr(nil, "MQTT")
	b = append(b, 5, 0xc2, 0, 60, 0)
	b = appendStr(appendStr(appendStr(b, "dev-a"), "dev-a"), dev.Password)
	c.send(packet(0x10, b))
	if p := c.expect(2); len(p.body) < 2 || p.body[1] != 0 {
		t.Fatalf("CONNACK %x", p.body)
	}
	const secret = "SECRET-firmware-bytes"
	// PUBLISH QoS 1, retained, packet id 5, no properties.
	b = binary.BigEndian.AppendUint16(appendStr(nil, "sealcast/devices/dev-a/ack"), 5)
	c.send(packet(0x33, append(append(b, 0), secret...)))
	p := c.expect(4)
	if len(p.body) < 3 || binary.BigEndian.Uint16(p.body) != 5 || p.body[2] != 0x87 {
		t.Fatalf("PUBACK %x, want id 5 and reason 0x87", p.body)
	}
	// Still connected: a PINGREQ is answered.
	c.send([]byte{0xc0, 0})
	c.expect(13)
	env.Broker.Close()
	if out := logs.String(); strings.Contains(out, secret) {
		t.Fatalf("a refused payload reached the log:\n%s", out)
	} else if !strings.Contains(out, "retained publish refused") {
		t.Fatalf("refusal not logged:\n%s", out)
	} else if !strings.Contains(out, fmt.Sprintf(`"packet.payload_bytes":%d`, len(secret))) {
		t.Fatalf("mochi's log of the refused packet is missing (nothing was redacted):\n%s", out)
	}
}
