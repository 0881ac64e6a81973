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
	"errors"
	"fmt"
	"sync"
	"time"

	mqtt "github.com/eclipse/paho.mqtt.golang"
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
}

// Dial connects to the broker, retrying until ctx is done.
func Dial(ctx context.Context, o Options) (*Bus, error) {
	if o.URL == "" {
		return nil, errors.New("mqttbus: no broker URL")
	}
	if o.MaxInFlight <= 0 {
		o.MaxInFlight = 1024
	}
	b := &Bus{log: o.Logger, slots: make(chan struct{}, o.MaxInFlight), subs: map[string]func(string, []byte){}}
	co := mqtt.NewClientOptions().
		AddBroker(o.URL).
		SetClientID(o.ClientID).
		SetUsername(o.Username).
		SetPassword(o.Password).
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
		SetCustomOpenConnectionFn(openBuffered).
		SetOnConnectHandler(b.onConnect).
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
	case <-ctx.Done():
		b.c.Disconnect(0)
		return nil, fmt.Errorf("mqttbus: connecting to %s: %w", o.URL, ctx.Err())
	}
	return b, nil
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
	if len(msgs) == 0 {
		return nil
	}
	// One goroutine waits for the tokens in the order they were sent, which is the order
	// the broker acknowledges them in, and frees a slot for each.
	type sent struct {
		tok   mqtt.Token
		topic string
	}
	pending := make(chan sent, len(msgs))
	result := make(chan error, 1)
	go func() {
		var first error
		for s := range pending {
			err := wait(ctx, s.tok)
			<-b.slots
			if err != nil && first == nil {
				first = fmt.Errorf("mqttbus: publishing to %s: %w", s.topic, err)
			}
		}
		result <- first
	}()
	for _, m := range msgs {
		select {
		case b.slots <- struct{}{}:
		case <-ctx.Done():
			close(pending)
			<-result
			return ctx.Err()
		}
		pending <- sent{b.c.Publish(m.Topic, 1, m.Retain, m.Payload), m.Topic}
	}
	close(pending)
	return <-result
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
