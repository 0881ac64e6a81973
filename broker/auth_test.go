package broker_test

import (
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/sealcast/sealcast/broker"
	"github.com/sealcast/sealcast/internal/testkit/brokertest"
)

// CONNACK return codes of MQTT 3.1.1.
const (
	connAccepted     = 0x00
	connBadUserOrPwd = 0x04
	connNotAuthzd    = 0x05
)

func TestConnectRefusals(t *testing.T) {
	env := brokertest.Start(t)
	devA := env.Device(t, "dev-a")
	tests := []struct {
		name                 string
		clientID, user, pass string
		want                 byte
	}{
		{"device", "dev-a", "dev-a", devA.Password, connAccepted},
		{"device wrong password", "dev-a", "dev-a", devA.Password[:42] + "x", connBadUserOrPwd},
		{"device password of another serial", "dev-b", "dev-b", devA.Password, connBadUserOrPwd},
		{"device no password", "dev-a", "dev-a", "", connBadUserOrPwd},
		{"client id differs from username", "dev-b", "dev-a", devA.Password, connNotAuthzd},
		{"unknown user (not a serial)", "x", "no such user!", "pw", connBadUserOrPwd},
		{"no username", "dev-a", "", "", connBadUserOrPwd},
		{"admin", "any-id", env.Admin.Username, env.Admin.Password, connAccepted},
		{"admin wrong password", "any-id", env.Admin.Username, "nope", connBadUserOrPwd},
		{"monitor", "mon-1", env.Monitor.Username, env.Monitor.Password, connAccepted},
		{"updater", "upd-1", env.Updater.Username, env.Updater.Password, connAccepted},
		// Account names take precedence over serials: "admin" is a valid serial, but its
		// device password does not open the admin account.
		{"device password for an account name", "admin", "admin", env.Device(t, "admin").Password, connBadUserOrPwd},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, code := connectRaw(t, env.Addr, tt.clientID, tt.user, tt.pass, false)
			c.Close()
			if code != tt.want {
				t.Fatalf("CONNACK code %#x, want %#x", code, tt.want)
			}
		})
	}
	// A clean session may have an empty client id, which mochi replaces: still refused.
	if c, code := connectRaw(t, env.Addr, "", "dev-a", devA.Password, true); code != connNotAuthzd {
		t.Errorf("empty client id: CONNACK %#x, want %#x", code, connNotAuthzd)
	} else {
		c.Close()
	}
	if s := env.Broker.Stats(); s.AuthFailures != 9 {
		t.Errorf("Stats().AuthFailures = %d, want 9", s.AuthFailures)
	}
}

func TestPahoRefused(t *testing.T) {
	env := brokertest.Start(t)
	if _, err := pahoConnect(env, "dev-a", brokertest.Credentials{Username: "dev-a", Password: "wrong"}, true, nil); err == nil {
		t.Fatal("paho connected with a wrong password")
	}
	if _, err := pahoConnect(env, "dev-b", env.Device(t, "dev-a"), true, nil); err == nil {
		t.Fatal("paho connected with client id != username")
	}
}

func TestRevoke(t *testing.T) {
	env := brokertest.Start(t)
	dev := env.Device(t, "dev-r")
	lost := make(chan error, 1)
	c, err := pahoConnect(env, "dev-r", dev, true, func(o *paho.ClientOptions) {
		o.SetConnectionLostHandler(func(_ paho.Client, err error) { lost <- err })
	})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Disconnect(0)
	env.Broker.Revoke("dev-r")
	select {
	case <-lost:
	case <-time.After(5 * time.Second):
		t.Fatal("a revoked device stayed connected")
	}
	if _, code := connectRaw(t, env.Addr, "dev-r", "dev-r", dev.Password, true); code != connNotAuthzd {
		t.Fatalf("revoked device: CONNACK %#x, want %#x", code, connNotAuthzd)
	}
	env.Broker.Unrevoke("dev-r")
	if _, code := connectRaw(t, env.Addr, "dev-r", "dev-r", dev.Password, true); code != connAccepted {
		t.Fatalf("unrevoked device: CONNACK %#x", code)
	}
}

func TestWillTopicChecked(t *testing.T) {
	env := brokertest.Start(t)
	will := func(topic string) func(*paho.ClientOptions) {
		return func(o *paho.ClientOptions) { o.SetWill(topic, "offline", 1, true) }
	}
	if _, err := pahoConnect(env, "dev-a", env.Device(t, "dev-a"), true, will("sealcast/devices/dev-b/presence")); err == nil {
		t.Fatal("a device connected with a will on another device's presence topic")
	}
	c, err := pahoConnect(env, "dev-a", env.Device(t, "dev-a"), true, will("sealcast/devices/dev-a/presence"))
	if err != nil {
		t.Fatalf("own presence will refused: %v", err)
	}
	c.Disconnect(0)
}

func TestInMemoryAccount(t *testing.T) {
	env := brokertest.Start(t)
	pw, err := broker.GeneratePassword()
	if err != nil {
		t.Fatal(err)
	}
	a, err := broker.NewAccount("embedded-updater", broker.RoleUpdater, pw)
	if err != nil {
		t.Fatal(err)
	}
	if err := env.Broker.AddAccount(a); err != nil {
		t.Fatal(err)
	}
	c := pahoClient(t, env, "upd-x", brokertest.Credentials{Username: a.Username, Password: pw}, true)
	if code := subscribe(t, c, "$share/updater/sealcast/devices/+/ack", nil); code != 1 {
		t.Fatalf("updater shared subscription: SUBACK %#x", code)
	}
}

// TestRevokeSurvivesRestart: with a data directory, a revoked serial is still refused
// after the broker restarts, and a serial revoked and then let in again is accepted.
func TestRevokeSurvivesRestart(t *testing.T) {
	env := brokertest.Start(t, brokertest.WithDataDir(t.TempDir()))
	gone, back := env.Device(t, "dev-gone"), env.Device(t, "dev-back")
	for _, s := range []string{"dev-gone", "dev-back"} {
		if err := env.Broker.Revoke(s); err != nil {
			t.Fatal(err)
		}
	}
	if err := env.Broker.Unrevoke("dev-back"); err != nil {
		t.Fatal(err)
	}
	env.Restart(t)
	if _, code := connectRaw(t, env.Addr, "dev-gone", "dev-gone", gone.Password, true); code != connNotAuthzd {
		t.Fatalf("revoked device after a restart: CONNACK %#x, want %#x", code, connNotAuthzd)
	}
	if _, code := connectRaw(t, env.Addr, "dev-back", "dev-back", back.Password, true); code != connAccepted {
		t.Fatalf("unrevoked device after a restart: CONNACK %#x", code)
	}
}
