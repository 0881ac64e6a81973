package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"maps"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	mqtt "github.com/eclipse/paho.mqtt.golang"
	"github.com/rs/zerolog"

	"github.com/sealcast/sealcast/device/simulate"
	"github.com/sealcast/sealcast/internal/testkit/redistest"
	"github.com/sealcast/sealcast/operator"
	"github.com/sealcast/sealcast/protocol"
)

// needTool returns the path of an outside tool, or skips the test (fails it under
// SEALCAST_REQUIRE_TOOLS=1) when it is missing.
func needTool(t *testing.T, name, pkg string) string {
	t.Helper()
	path, err := exec.LookPath(name)
	if err != nil {
		if os.Getenv("SEALCAST_REQUIRE_TOOLS") == "1" {
			t.Fatalf("%s not found (apt-get install -y %s): %v", name, pkg, err)
		}
		t.Skipf("%s not found; skipping (set SEALCAST_REQUIRE_TOOLS=1 to fail instead)", name)
	}
	return path
}

// mosquitto is a mosquitto process running deploy/mosquitto's example configuration.
type mosquitto struct {
	t          *testing.T
	cmd        *exec.Cmd
	passwdTool string
	dir        string
	url        string
}

// startMosquitto runs mosquitto with deploy/mosquitto/mosquitto.conf and sealcast.acl as
// shipped, changing only file locations and binding the listener to 127.0.0.1 on a free
// port. The password file holds the given users; extraACL is appended to the ACL file.
func startMosquitto(t *testing.T, users map[string]string, extraACL string) *mosquitto {
	t.Helper()
	bin := needTool(t, "mosquitto", "mosquitto")
	m := &mosquitto{t: t, passwdTool: needTool(t, "mosquitto_passwd", "mosquitto"), dir: t.TempDir()}
	if err := os.Mkdir(filepath.Join(m.dir, "data"), 0o700); err != nil {
		t.Fatal(err)
	}
	acl, err := os.ReadFile(filepath.Join(repoRoot, "deploy/mosquitto/sealcast.acl"))
	if err != nil {
		t.Fatal(err)
	}
	acl = append(acl, extraACL...)
	if err := os.WriteFile(filepath.Join(m.dir, "sealcast.acl"), acl, 0o600); err != nil {
		t.Fatal(err)
	}
	m.writePasswords(users)

	conf, err := os.ReadFile(filepath.Join(repoRoot, "deploy/mosquitto/mosquitto.conf"))
	if err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := l.Addr().(*net.TCPAddr).Port
	l.Close()
	c := string(conf)
	for _, r := range [][2]string{
		{"/etc/mosquitto/sealcast.passwd", filepath.Join(m.dir, "sealcast.passwd")},
		{"/etc/mosquitto/sealcast.acl", filepath.Join(m.dir, "sealcast.acl")},
		{"/var/lib/mosquitto/", filepath.Join(m.dir, "data") + "/"},
		{"\nlistener 1883\n", "\nlistener " + strconv.Itoa(port) + " 127.0.0.1\n"},
	} {
		if strings.Count(c, r[0]) != 1 {
			t.Fatalf("deploy/mosquitto/mosquitto.conf no longer has %q exactly once: update this test with it", r[0])
		}
		c = strings.Replace(c, r[0], r[1], 1)
	}
	if os.Geteuid() == 0 {
		// Run as root, mosquitto would switch to the mosquitto user, who cannot read
		// the test's private temporary directory.
		c += "\nuser root\n"
	}
	confPath := filepath.Join(m.dir, "mosquitto.conf")
	if err := os.WriteFile(confPath, []byte(c), 0o600); err != nil {
		t.Fatal(err)
	}
	log, err := os.Create(filepath.Join(m.dir, "mosquitto.log"))
	if err != nil {
		t.Fatal(err)
	}
	m.cmd = exec.Command(bin, "-c", confPath)
	m.cmd.Stdout, m.cmd.Stderr = log, log
	if err := m.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() { m.cmd.Wait(); close(exited) }()
	t.Cleanup(func() {
		m.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(10 * time.Second):
			m.cmd.Process.Kill()
			<-exited
		}
		log.Close()
		if t.Failed() {
			b, _ := os.ReadFile(log.Name())
			t.Logf("mosquitto log:\n%s", b)
		}
	})
	m.url = fmt.Sprintf("tcp://127.0.0.1:%d", port)
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	eventuallyWithin(t, 10*time.Second, "mosquitto listening on "+addr, func() bool {
		select {
		case <-exited:
			b, _ := os.ReadFile(log.Name())
			t.Fatalf("mosquitto exited:\n%s", b)
		default:
		}
		c, err := net.Dial("tcp", addr)
		if err == nil {
			c.Close()
		}
		return err == nil
	})
	return m
}

// writePasswords replaces the password file the way docs/OPERATIONS.md tells operators
// to: "username:password" lines, hashed in place by mosquitto_passwd -U, then renamed
// over the live file.
func (m *mosquitto) writePasswords(users map[string]string) {
	m.t.Helper()
	var b strings.Builder
	for u, pw := range users {
		fmt.Fprintf(&b, "%s:%s\n", u, pw)
	}
	tmp := filepath.Join(m.dir, "sealcast.passwd.new")
	if err := os.WriteFile(tmp, []byte(b.String()), 0o600); err != nil {
		m.t.Fatal(err)
	}
	if out, err := exec.Command(m.passwdTool, "-U", tmp).CombinedOutput(); err != nil {
		m.t.Fatalf("mosquitto_passwd -U: %v\n%s", err, out)
	}
	if err := os.Rename(tmp, filepath.Join(m.dir, "sealcast.passwd")); err != nil {
		m.t.Fatal(err)
	}
}

// reload makes mosquitto re-read its password and ACL files.
func (m *mosquitto) reload() {
	if err := m.cmd.Process.Signal(syscall.SIGHUP); err != nil {
		m.t.Fatal(err)
	}
}

func eventuallyWithin(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", d, what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// pahoClient connects one MQTT client; messages of every subscription go to msgs in the
// order mosquitto sent them.
func pahoClient(url, clientID, user, pw string, msgs chan<- mqtt.Message) (mqtt.Client, error) {
	o := mqtt.NewClientOptions().AddBroker(url).SetClientID(clientID).SetUsername(user).SetPassword(pw).
		SetCleanSession(true).SetAutoReconnect(false).SetOrderMatters(true).SetConnectTimeout(5 * time.Second).
		SetDefaultPublishHandler(func(_ mqtt.Client, m mqtt.Message) {
			if msgs != nil {
				msgs <- m
			}
		})
	c := mqtt.NewClient(o)
	tok := c.Connect()
	if !tok.WaitTimeout(10 * time.Second) {
		return nil, fmt.Errorf("connecting as %s: timed out", user)
	}
	if err := tok.Error(); err != nil {
		return nil, err
	}
	return c, nil
}

func waitTok(t *testing.T, tok mqtt.Token, what string) {
	t.Helper()
	if !tok.WaitTimeout(10 * time.Second) {
		t.Fatalf("%s: no answer from mosquitto", what)
	}
	if err := tok.Error(); err != nil {
		t.Fatalf("%s: %v", what, err)
	}
}

func randomPassword(t *testing.T) string {
	b := make([]byte, 18)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(b)
}

// waitUpdaterReady waits until the updater is subscribed to admin requests. startStack
// returns before that, and a request published earlier is lost. The updater publishes its
// first fleet status after that subscription, so on a fresh broker the retained status
// means it is ready.
func waitUpdaterReady(ctx context.Context, t *testing.T, url, user, pw string) {
	t.Helper()
	ready := make(chan mqtt.Message, 1)
	mon, err := pahoClient(url, user, user, pw, ready)
	if err != nil {
		t.Fatal(err)
	}
	defer mon.Disconnect(0)
	waitTok(t, mon.Subscribe(protocol.FleetStatusTopic, 1, nil), "subscribing")
	select {
	case <-ready:
	case <-ctx.Done():
		t.Fatal("the updater never published sealcast/status/fleet")
	}
}

// provisionDevices provisions serials through op and gives each device a mosquitto
// account from its device file, as docs/OPERATIONS.md describes. users is updated.
func provisionDevices(ctx context.Context, t *testing.T, m *mosquitto, op *operator.Client, users map[string]string, serials []string) []protocol.DeviceFile {
	t.Helper()
	files, err := op.Provision(ctx, serials, 0)
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range files {
		if f.Broker.URL != m.url || f.Broker.Username != f.Serial {
			t.Fatalf("device file broker %+v: want %s, username %s", f.Broker, m.url, f.Serial)
		}
		users[f.Broker.Username] = f.Broker.Password
	}
	m.writePasswords(users)
	m.reload()
	last := files[len(files)-1].Broker
	eventuallyWithin(t, 10*time.Second, "mosquitto to accept the devices' passwords", func() bool {
		c, err := pahoClient(m.url, last.Username, last.Username, last.Password, nil)
		if err == nil {
			c.Disconnect(0)
		}
		return err == nil
	})
	return files
}

// installRelease releases a small image to every device and runs the devices until each
// has installed and confirmed it.
func installRelease(ctx context.Context, t *testing.T, op *operator.Client, files []protocol.DeviceFile, log zerolog.Logger) {
	t.Helper()
	simDone := make(chan simResult, 1)
	go func() {
		sum, err := simulate.Run(ctx, simulate.Options{Devices: files, TargetVersion: 1, Logger: log})
		simDone <- simResult{sum, err}
	}()
	img := make([]byte, 5000)
	rand.Read(img)
	if _, err := op.Release(ctx, bytes.NewReader(img), int64(len(img)), protocol.ReleaseCreateArgs{Version: 1, All: true, ChunkSize: 1024}); err != nil {
		t.Fatal(err)
	}
	r := <-simDone
	if r.err != nil || r.sum.Confirmed != len(files) {
		t.Fatalf("simulated devices: %d of %d confirmed, %d failed (%v): %v", r.sum.Confirmed, len(files), r.sum.Failed, r.sum.Codes, r.err)
	}
}

// checkInstalled checks the server's record of every device: version 1, one step down.
func checkInstalled(ctx context.Context, t *testing.T, s *stack, files []protocol.DeviceFile) {
	t.Helper()
	serials := make([]string, len(files))
	for i, f := range files {
		serials[i] = f.Serial
	}
	devs, err := s.store.Devices(ctx, serials)
	if err != nil {
		t.Fatal(err)
	}
	for i, d := range devs {
		if d == nil || d.Version != 1 || d.Seq != files[i].Seq-1 {
			t.Errorf("%s on the server: %+v, want version 1 at seq %d", serials[i], d, files[i].Seq-1)
		}
	}
}

// TestMosquittoExample runs the updater against mosquitto configured with
// deploy/mosquitto (docs/OPERATIONS.md, "Scaling out"): devices provisioned through it
// update over it, and its ACL file enforces PROTOCOL.md 9.2 on the wire.
func TestMosquittoExample(t *testing.T) {
	accounts := map[string]string{
		"admin": randomPassword(t), "monitor": randomPassword(t), "sealcast-updater": randomPassword(t),
	}
	m := startMosquitto(t, accounts, "")
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	log := zerolog.New(zerolog.NewTestWriter(t)).Level(zerolog.WarnLevel)

	// The updater alone, as `sealcast serve -external-broker ... -ack-group sealcast` runs it:
	// its ack subscription is $share/sealcast/sealcast/devices/+/ack.
	s, err := startStack(ctx, stackConfig{
		dataDir: filepath.Join(t.TempDir(), "data"), brokerURL: m.url,
		brokerUser: "sealcast-updater", brokerPW: accounts["sealcast-updater"],
		chainLength: 16, ackGroup: "sealcast",
	}, log)
	if err != nil {
		t.Fatal(err)
	}
	defer s.close()
	waitUpdaterReady(ctx, t, m.url, "monitor", accounts["monitor"])
	op, err := operator.Dial(ctx, operator.Options{URL: m.url, Username: "admin", Password: accounts["admin"]})
	if err != nil {
		t.Fatal(err)
	}
	defer op.Close()

	users := maps.Clone(accounts)
	files := provisionDevices(ctx, t, m, op, users, []string{"mq-1", "mq-2", "mq-3"})
	pw := func(serial string) string { return users[serial] }
	installRelease(ctx, t, op, files, log)
	checkInstalled(ctx, t, s, files)
	if st := s.upd.Stats(); st.AcksAccepted != int64(len(files)) {
		t.Errorf("acks accepted: %d, want %d", st.AcksAccepted, len(files))
	}

	t.Run("device reads only its own topics", func(t *testing.T) {
		// mosquitto grants every SUBSCRIBE and applies read rules to each delivery.
		// Every device has a retained receipt now; a wildcard subscription must deliver
		// only mq-1's. Subscribing to the own receipt again afterwards delivers it a
		// second time, after everything the first subscription delivered.
		msgs := make(chan mqtt.Message, 100)
		c, err := pahoClient(m.url, "mq-1", "mq-1", pw("mq-1"), msgs)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Disconnect(0)
		waitTok(t, c.Subscribe("sealcast/devices/+/receipt", 1, nil), "subscribing")
		waitTok(t, c.Subscribe("sealcast/devices/mq-1/receipt", 1, nil), "subscribing")
		for own := 0; own < 2; {
			select {
			case msg := <-msgs:
				if msg.Topic() != "sealcast/devices/mq-1/receipt" {
					t.Fatalf("device mq-1 received %s", msg.Topic())
				}
				own++
			case <-ctx.Done():
				t.Fatalf("device mq-1 received its own receipt %d times, want 2", own)
			}
		}
	})

	t.Run("monitor reads status, state and presence only; devices write only their own", func(t *testing.T) {
		msgs := make(chan mqtt.Message, 1000)
		mon, err := pahoClient(m.url, "monitor", "monitor", accounts["monitor"], msgs)
		if err != nil {
			t.Fatal(err)
		}
		defer mon.Disconnect(0)
		waitTok(t, mon.Subscribe("sealcast/#", 1, nil), "subscribing")
		dev, err := pahoClient(m.url, "mq-1", "mq-1", pw("mq-1"), nil)
		if err != nil {
			t.Fatal(err)
		}
		defer dev.Disconnect(0)
		// Denied (another device's topic): mosquitto acknowledges and drops it. Then an
		// allowed one, which reaches the monitor after anything published before it.
		waitTok(t, dev.Publish("sealcast/devices/mq-2/state", 1, false, "forged"), "publishing")
		waitTok(t, dev.Publish("sealcast/devices/mq-1/state", 1, false, "barrier"), "publishing")
		// The simulated devices left retained state and presence; the updater retained
		// its status. The monitor must see all three kinds before the barrier.
		var sawStatus, sawState, sawPresence bool
		for {
			select {
			case msg := <-msgs:
				topic := msg.Topic()
				if string(msg.Payload()) == "barrier" {
					if !sawStatus || !sawState || !sawPresence {
						t.Errorf("the monitor received status %v, device state %v, presence %v; want all", sawStatus, sawState, sawPresence)
					}
					return
				}
				switch {
				case string(msg.Payload()) == "forged":
					t.Fatalf("a device's publish to %s reached the monitor", topic)
				case topic == protocol.FleetStatusTopic:
					sawStatus = true
				case strings.HasPrefix(topic, "sealcast/status/"):
				case strings.HasSuffix(topic, "/state") && strings.HasPrefix(topic, "sealcast/devices/"):
					sawState = true
				case strings.HasSuffix(topic, "/presence") && strings.HasPrefix(topic, "sealcast/devices/"):
					sawPresence = true
				default:
					t.Fatalf("the monitor received %s", topic)
				}
			case <-ctx.Done():
				t.Fatal("the monitor never received the device's own state")
			}
		}
	})

	t.Run("a client id cannot take over another device's session", func(t *testing.T) {
		a, err := pahoClient(m.url, "mq-1", "mq-1", pw("mq-1"), nil)
		if err != nil {
			t.Fatal(err)
		}
		defer a.Disconnect(0)
		// mq-2 asks for client id mq-1; use_username_as_clientid makes it mq-2.
		b, err := pahoClient(m.url, "mq-1", "mq-2", pw("mq-2"), nil)
		if err != nil {
			t.Fatal(err)
		}
		defer b.Disconnect(0)
		// A taken-over connection is closed by mosquitto and gets no PUBACK.
		waitTok(t, a.Publish("sealcast/devices/mq-1/state", 1, false, "still here"), "mq-1 publishing after mq-2 connected")
	})
}

// TestMosquittoTwoUpdaters runs the scale-out of docs/OPERATIONS.md: two updaters on one
// Redis and one mosquitto, both in ack group "sealcast", the second with -acks-only, its
// own broker user and a copy of the first one's keys. The acks are split between them and
// every device's counter moves exactly once.
func TestMosquittoTwoUpdaters(t *testing.T) {
	rs := redistest.Start(t, "--appendonly", "yes", "--appendfsync", "always")
	accounts := map[string]string{
		"admin": randomPassword(t), "monitor": randomPassword(t),
		"sealcast-updater": randomPassword(t), "sealcast-updater-2": randomPassword(t),
	}
	m := startMosquitto(t, accounts, "\nuser sealcast-updater-2\ntopic readwrite sealcast/#\n")
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	log := zerolog.New(zerolog.NewTestWriter(t)).Level(zerolog.WarnLevel)

	dirA, dirB := filepath.Join(t.TempDir(), "a"), filepath.Join(t.TempDir(), "b")
	a, err := startStack(ctx, stackConfig{
		dataDir: dirA, brokerURL: m.url, redisURL: rs.URL(),
		brokerUser: "sealcast-updater", brokerPW: accounts["sealcast-updater"],
		chainLength: 16, ackGroup: "sealcast",
	}, log)
	if err != nil {
		t.Fatal(err)
	}
	defer a.close()
	copyKeys(t, dirA, dirB) // the same root secret and release-signing key
	b, err := startStack(ctx, stackConfig{
		dataDir: dirB, brokerURL: m.url, redisURL: rs.URL(),
		brokerUser: "sealcast-updater-2", brokerPW: accounts["sealcast-updater-2"],
		chainLength: 16, ackGroup: "sealcast", acksOnly: true,
	}, log)
	if err != nil {
		t.Fatal(err)
	}
	defer b.close()
	waitUpdaterReady(ctx, t, m.url, "monitor", accounts["monitor"])
	op, err := operator.Dial(ctx, operator.Options{URL: m.url, Username: "admin", Password: accounts["admin"]})
	if err != nil {
		t.Fatal(err)
	}
	defer op.Close()

	serials := make([]string, 8)
	for i := range serials {
		serials[i] = fmt.Sprintf("mq2-%d", i+1)
	}
	files := provisionDevices(ctx, t, m, op, maps.Clone(accounts), serials)
	installRelease(ctx, t, op, files, log)
	checkInstalled(ctx, t, a, files)
	sa, sb := a.upd.Stats(), b.upd.Stats()
	t.Logf("acks accepted: %d by the first updater, %d by the acks-only one", sa.AcksAccepted, sb.AcksAccepted)
	if sa.AcksAccepted+sb.AcksAccepted != int64(len(files)) {
		t.Errorf("acks accepted: %d + %d, want %d in all", sa.AcksAccepted, sb.AcksAccepted, len(files))
	}
	if sb.AcksAccepted == 0 {
		t.Error("the acks-only updater accepted no ack: the shared subscription did not split the acks")
	}
}
