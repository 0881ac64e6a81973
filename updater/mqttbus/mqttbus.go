// Package mqttbus connects the updater to an MQTT broker with paho: the embedded Sealcast
// broker over loopback, or any external MQTT 3.1.1 broker such as Mosquitto.
//
// A Bus is safe for concurrent use. Subscriptions are remembered and restored after a
// reconnect; publishes made while disconnected wait for the connection (up to their
// context), so a broker restart in the middle of a release loses nothing.
package mqttbus

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"sync"
	"time"

	mqtt "github.com/eclipse/paho.mqtt.golang"
	"github.com/eclipse/paho.mqtt.golang/packets"
	"github.com/rs/zerolog"

	"github.com/sealcast/sealcast/protocol"
)

// Options configure a Bus.
type Options struct {
	URL      string // tcp://host:1883, ssl://host:8883 or ws://host/mqtt
	ClientID string
	Username string
	Password string
	TLS      *tls.Config
	Logger   zerolog.Logger
	// MaxInFlight bounds the QoS 1 publishes awaiting PUBACK (default 1024); it keeps a
	// large fan-out from flooding the broker's inbound queue.
	MaxInFlight int
}

// Bus is an MQTT connection for the updater.
type Bus struct {
	c      mqtt.Client
	log    zerolog.Logger
	slots  chan struct{}
	mu     sync.Mutex
	subs   map[string]func(topic string, payload []byte)
	closed bool

	// Connection failures, as paho reports them: the last one, for Dial's error, and
	// a channel that tells Dial about one that retrying cannot fix.
	failMu    sync.Mutex
	lastFail  error
	connected bool
	fatal     chan error
}

// Dial connects to the broker, retrying until ctx is done.
func Dial(ctx context.Context, o Options) (*Bus, error) {
	if o.URL == "" {
		return nil, errors.New("mqttbus: no broker URL")
	}
	if o.MaxInFlight <= 0 {
		o.MaxInFlight = 1024
	}
	b := &Bus{log: o.Logger, slots: make(chan struct{}, o.MaxInFlight), subs: map[string]func(string, []byte){},
		fatal: make(chan error, 1)}
	co := mqtt.NewClientOptions().
		AddBroker(o.URL).
		SetClientID(o.ClientID).
		SetUsername(o.Username).
		SetPassword(o.Password).
		SetProtocolVersion(4). // MQTT 3.1.1; no silent retry as 3.1 that hides a refusal
		SetCleanSession(true). // subscriptions are restored by OnConnect, not by the broker
		// Ordered: an upload part is handled before the upload.finish sent after it.
		// Every handler the updater registers returns at once, so order costs nothing.
		SetOrderMatters(true).
		SetAutoReconnect(true).
		SetConnectRetry(true).
		SetConnectRetryInterval(500 * time.Millisecond).
		SetMaxReconnectInterval(5 * time.Second).
		SetKeepAlive(30 * time.Second).
		SetWriteTimeout(30 * time.Second).
		SetMessageChannelDepth(10000).
		SetOnConnectHandler(b.onConnect).
		SetConnectionNotificationHandler(b.onNotification).
		SetConnectionLostHandler(func(_ mqtt.Client, err error) {
			b.log.Warn().Err(err).Msg("mqtt connection lost; reconnecting")
		})
	if o.TLS != nil {
		co.SetTLSConfig(o.TLS)
	}
	b.c = mqtt.NewClient(co)
	tok := b.c.Connect()
	select {
	case <-tok.Done():
		if err := tok.Error(); err != nil {
			return nil, fmt.Errorf("mqttbus: connecting to %s as %q: %w", o.URL, o.Username, err)
		}
	case err := <-b.fatal:
		b.c.Disconnect(0)
		return nil, fmt.Errorf("mqttbus: connecting to %s as %q: %w", o.URL, o.Username, err)
	case <-ctx.Done():
		b.c.Disconnect(0)
		if last := b.lastFailure(); last != nil {
			return nil, fmt.Errorf("mqttbus: connecting to %s: %w (last attempt: %w)", o.URL, ctx.Err(), last)
		}
		return nil, fmt.Errorf("mqttbus: connecting to %s: %w", o.URL, ctx.Err())
	}
	return b, nil
}

// onNotification records why connection attempts fail. Before the first connection, a
// refusal of the credentials or of the broker's certificate ends Dial at once: retrying
// cannot fix either, and the operator should see the reason, not a timeout.
func (b *Bus) onNotification(_ mqtt.Client, n mqtt.ConnectionNotification) {
	var reason error
	switch n := n.(type) {
	case mqtt.ConnectionNotificationConnected:
		b.failMu.Lock()
		b.connected, b.lastFail = true, nil
		b.failMu.Unlock()
		return
	case mqtt.ConnectionNotificationBrokerFailed:
		reason = n.Reason
	case mqtt.ConnectionNotificationFailed:
		reason = n.Reason
	default:
		return
	}
	if reason == nil {
		return
	}
	b.failMu.Lock()
	changed := b.lastFail == nil || b.lastFail.Error() != reason.Error()
	b.lastFail = reason
	first := !b.connected
	b.failMu.Unlock()
	if changed {
		b.log.Warn().Err(reason).Msg("mqtt connection attempt failed; retrying")
	}
	if first && permanent(reason) {
		select {
		case b.fatal <- reason:
		default:
		}
	}
}

func (b *Bus) lastFailure() error {
	b.failMu.Lock()
	defer b.failMu.Unlock()
	return b.lastFail
}

// permanent reports whether a connection failure needs the operator: wrong credentials,
// or a broker certificate that does not verify.
func permanent(err error) bool {
	var (
		unknownCA x509.UnknownAuthorityError
		hostname  x509.HostnameError
		invalid   x509.CertificateInvalidError
		verify    *tls.CertificateVerificationError
	)
	return errors.Is(err, packets.ErrorRefusedBadUsernameOrPassword) ||
		errors.Is(err, packets.ErrorRefusedNotAuthorised) ||
		errors.As(err, &unknownCA) || errors.As(err, &hostname) ||
		errors.As(err, &invalid) || errors.As(err, &verify)
}

func (b *Bus) onConnect(c mqtt.Client) {
	b.mu.Lock()
	subs := make(map[string]func(string, []byte), len(b.subs))
	for f, h := range b.subs {
		subs[f] = h
	}
	b.mu.Unlock()
	for f, h := range subs {
		// Re-subscribing on a clean session; the token is not waited for on paho's
		// callback goroutine (that would deadlock), errors are logged.
		tok := c.Subscribe(f, 1, wrap(h))
		go func(f string) {
			if tok.WaitTimeout(30*time.Second) && tok.Error() != nil {
				b.log.Error().Err(tok.Error()).Str("filter", f).Msg("re-subscribe failed")
			}
		}(f)
	}
	b.log.Info().Int("subscriptions", len(subs)).Msg("mqtt connected")
}

func wrap(h func(string, []byte)) mqtt.MessageHandler {
	return func(_ mqtt.Client, m mqtt.Message) { h(m.Topic(), m.Payload()) }
}

// Subscribe delivers every message matching filter (QoS 1) to handle, now and after any
// reconnect. handle runs on a paho goroutine and must not block for long.
func (b *Bus) Subscribe(ctx context.Context, filter string, handle func(topic string, payload []byte)) error {
	b.mu.Lock()
	b.subs[filter] = handle
	b.mu.Unlock()
	tok := b.c.Subscribe(filter, 1, wrap(handle))
	if err := wait(ctx, tok); err != nil {
		return fmt.Errorf("mqttbus: subscribing to %s: %w", filter, err)
	}
	if st, ok := tok.(*mqtt.SubscribeToken); ok {
		for f, code := range st.Result() {
			if code == 0x80 {
				return fmt.Errorf("mqttbus: the broker refused the subscription to %s: check this account's permissions", f)
			}
		}
	}
	return nil
}

// Unsubscribe stops a subscription made with Subscribe.
func (b *Bus) Unsubscribe(ctx context.Context, filter string) error {
	b.mu.Lock()
	delete(b.subs, filter)
	b.mu.Unlock()
	return wait(ctx, b.c.Unsubscribe(filter))
}

// Publish sends the messages with QoS 1 and returns once the broker has acknowledged all
// of them, or the first error. At most MaxInFlight are unacknowledged at any time.
func (b *Bus) Publish(ctx context.Context, msgs ...protocol.Message) error {
	var (
		wg    sync.WaitGroup
		mu    sync.Mutex
		first error
	)
	fail := func(err error) {
		mu.Lock()
		if first == nil {
			first = err
		}
		mu.Unlock()
	}
	for _, m := range msgs {
		select {
		case b.slots <- struct{}{}:
		case <-ctx.Done():
			wg.Wait()
			return ctx.Err()
		}
		tok := b.c.Publish(m.Topic, 1, m.Retain, m.Payload)
		wg.Add(1)
		go func(topic string) {
			defer wg.Done()
			defer func() { <-b.slots }()
			if err := wait(ctx, tok); err != nil {
				fail(fmt.Errorf("mqttbus: publishing to %s: %w", topic, err))
			}
		}(m.Topic)
	}
	wg.Wait()
	return first
}

// Close disconnects, waiting up to a second for in-flight work.
func (b *Bus) Close() error {
	b.mu.Lock()
	if b.closed {
		b.mu.Unlock()
		return nil
	}
	b.closed = true
	b.mu.Unlock()
	b.c.Disconnect(1000)
	return nil
}

func wait(ctx context.Context, tok mqtt.Token) error {
	select {
	case <-tok.Done():
		return tok.Error()
	case <-ctx.Done():
		return ctx.Err()
	}
}
