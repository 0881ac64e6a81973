package mosquittotest_test

import (
	"crypto/tls"
	"testing"
	"time"

	mqtt "github.com/eclipse/paho.mqtt.golang"

	"github.com/sealcast/sealcast/internal/testkit/mosquittotest"
)

func connect(t *testing.T, url, id string, cfg *tls.Config) mqtt.Client {
	t.Helper()
	o := mqtt.NewClientOptions().AddBroker(url).SetClientID(id).SetConnectTimeout(10 * time.Second)
	if cfg != nil {
		o.SetTLSConfig(cfg)
	}
	c := mqtt.NewClient(o)
	if tok := c.Connect(); !tok.WaitTimeout(15*time.Second) || tok.Error() != nil {
		t.Fatalf("connecting to %s: %v", url, tok.Error())
	}
	t.Cleanup(func() { c.Disconnect(0) })
	return c
}

func retained(t *testing.T, c mqtt.Client, topic string) string {
	t.Helper()
	got := make(chan string, 1)
	if tok := c.Subscribe(topic, 1, func(_ mqtt.Client, m mqtt.Message) {
		select {
		case got <- string(m.Payload()):
		default:
		}
	}); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		t.Fatalf("subscribe %s: %v", topic, tok.Error())
	}
	select {
	case s := <-got:
		return s
	case <-time.After(10 * time.Second):
		t.Fatalf("no retained message on %s", topic)
		return ""
	}
}

// TestPlainAndTLS: a message published on the plain listener is read back over TLS with
// the certificate verified against the test CA; a client that does not trust the CA is
// refused.
func TestPlainAndTLS(t *testing.T) {
	m := mosquittotest.Start(t, mosquittotest.WithTLS())
	pub := connect(t, m.URL, "pub", nil)
	if tok := pub.Publish("t/hello", 1, true, "hi"); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		t.Fatal(tok.Error())
	}
	sub := connect(t, m.TLSURL, "sub", &tls.Config{RootCAs: m.CA.Pool()})
	if got := retained(t, sub, "t/hello"); got != "hi" {
		t.Fatalf("got %q over TLS, want hi", got)
	}
	o := mqtt.NewClientOptions().AddBroker(m.TLSURL).SetClientID("untrusting").SetConnectTimeout(5 * time.Second).SetTLSConfig(&tls.Config{})
	c := mqtt.NewClient(o)
	if tok := c.Connect(); tok.WaitTimeout(10*time.Second) && tok.Error() == nil {
		c.Disconnect(0)
		t.Fatal("a client that does not trust the test CA connected")
	}
}

// TestRestartWithPersistence: retained messages survive a clean restart with
// persistence on, and not without it.
func TestRestartWithPersistence(t *testing.T) {
	for _, persist := range []bool{true, false} {
		var opts []mosquittotest.Option
		if persist {
			opts = append(opts, mosquittotest.WithPersistence())
		}
		m := mosquittotest.Start(t, opts...)
		c := connect(t, m.URL, "c", nil)
		if tok := c.Publish("t/kept", 1, true, "v"); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
			t.Fatal(tok.Error())
		}
		c.Disconnect(0)
		m.Restart(t)
		c = connect(t, m.URL, "c2", nil)
		got := make(chan struct{}, 1)
		c.Subscribe("t/kept", 1, func(mqtt.Client, mqtt.Message) { got <- struct{}{} }).Wait()
		select {
		case <-got:
			if !persist {
				t.Fatal("retained message survived a restart without persistence")
			}
		case <-time.After(2 * time.Second):
			if persist {
				t.Fatal("retained message lost across a restart with persistence")
			}
		}
	}
}
