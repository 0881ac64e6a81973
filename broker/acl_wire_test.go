package broker_test

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/sealcast/sealcast/internal/brokertest"
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
