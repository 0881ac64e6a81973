package mqttbus_test

import (
	"context"
	"crypto/tls"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/sealcast/sealcast/broker"
	"github.com/sealcast/sealcast/internal/testkit/brokertest"
	"github.com/sealcast/sealcast/internal/testkit/testca"
	"github.com/sealcast/sealcast/protocol"
	"github.com/sealcast/sealcast/updater/mqttbus"
)

// TestDialRefusals checks that Dial gives up at once, with the reason, when retrying
// cannot help (wrong password, a broker certificate that does not verify), and names the
// last failure when its context ends while the broker is unreachable.
func TestDialRefusals(t *testing.T) {
	ca := testca.New(t)
	certPEM, keyPEM := ca.Server(t)
	b := brokertest.Start(t, brokertest.WithOptions(func(o *broker.Options) {
		o.TLSAddr, o.TLSCertPEM, o.TLSKeyPEM = "127.0.0.1:0", certPEM, keyPEM
	}))
	tlsURL := "ssl://" + b.Broker.Addr(broker.ListenerTLS).String()
	other := testca.New(t) // a CA that did not sign the broker's certificate

	for _, c := range []struct {
		name, url, user, password string
		tls                       *tls.Config
		want                      string
	}{
		{"wrong password", b.URL, b.Updater.Username, "wrong", nil, "bad user name or password"},
		{"unknown user", b.URL, "nobody", "x", nil, "bad user name or password"},
		{"untrusted certificate", tlsURL, b.Updater.Username, b.Updater.Password,
			&tls.Config{RootCAs: other.Pool()}, "certificate"},
	} {
		t.Run(c.name, func(t *testing.T) {
			// The deadline is far away: a refusal must end Dial long before it.
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			bus, err := mqttbus.Dial(ctx, mqttbus.Options{URL: c.url, ClientID: "updater-test", Username: c.user,
				Password: c.password, TLS: c.tls, Logger: zerolog.Nop()})
			if err == nil {
				bus.Close()
				t.Fatal("Dial succeeded")
			}
			if ctx.Err() != nil {
				t.Fatalf("Dial waited for its deadline: %v", err)
			}
			if !strings.Contains(err.Error(), c.want) {
				t.Fatalf("error %q does not say %q", err, c.want)
			}
		})
	}

	t.Run("unreachable", func(t *testing.T) {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		addr := l.Addr().String()
		l.Close() // nothing listens there now
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		_, err = mqttbus.Dial(ctx, mqttbus.Options{URL: "tcp://" + addr, ClientID: "updater-test", Logger: zerolog.Nop()})
		if err == nil || !strings.Contains(err.Error(), "last attempt") || !strings.Contains(err.Error(), "refused") {
			t.Fatalf("error %v does not name the last failure", err)
		}
	})

	t.Run("good credentials", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		bus, err := mqttbus.Dial(ctx, mqttbus.Options{URL: tlsURL, ClientID: "updater-test", Username: b.Updater.Username,
			Password: b.Updater.Password, TLS: &tls.Config{RootCAs: ca.Pool()}, Logger: zerolog.Nop()})
		if err != nil {
			t.Fatal(err)
		}
		defer bus.Close()
		got := make(chan string, 1)
		if err := bus.Subscribe(ctx, "sealcast/status/fleet", func(_ string, p []byte) { got <- string(p) }); err != nil {
			t.Fatal(err)
		}
		if err := bus.Publish(ctx, protocol.Message{Topic: "sealcast/status/fleet", Payload: []byte(`{"devices":0}`)}); err != nil {
			t.Fatal(err)
		}
		select {
		case p := <-got:
			if p != `{"devices":0}` {
				t.Fatalf("got %q", p)
			}
		case <-ctx.Done():
			t.Fatal("own publish not delivered")
		}
	})
}
