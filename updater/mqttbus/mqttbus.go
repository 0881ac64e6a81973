// Package mqttbus connects the updater to an MQTT broker with paho: the embedded Sealcast
// broker over loopback, or any external MQTT 3.1.1 broker such as Mosquitto.
//
// A Bus is safe for concurrent use. Subscriptions are remembered and restored after a
// reconnect; publishes made while disconnected wait for the connection (up to their
// context), so a broker restart in the middle of a release loses nothing.
//
// # Connections
//
// A Bus holds Options.Subscribers connections for its subscriptions and
// Options.Publishers for its publishes. Kept apart, a fan-out of keys cannot hold up the
// acks coming in: paho sends the acknowledgement of an incoming message on the same
// connection, behind every publish already queued there, and brokers such as mochi drop
// messages for a subscriber once their queue for it is full. A shared subscription
// ($share/{group}/{filter}) is made on every subscribing connection, so the broker spreads
// its messages over them (each connection has its own queue at the broker, and its own
// paho pipeline here); any other subscription is made on the first one only, so its
// messages keep their order. Messages for one device (topics sealcast/devices/{serial}/...),
// and for any one topic, always use the same publishing connection, so their order holds.
package mqttbus

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	mqtt "github.com/eclipse/paho.mqtt.golang"
	"github.com/eclipse/paho.mqtt.golang/packets"
	"github.com/rs/zerolog"

	"github.com/sealcast/sealcast/protocol"
)

// Options configure a Bus.
type Options struct {
	URL string // tcp://host:1883, ssl://host:8883 or ws://host/mqtt
	// ClientID is the first subscribing connection's client id; the others add "-sub"
	// and their number, publishing connections "-pub" and theirs.
	ClientID string
	Username string
	Password string
	TLS      *tls.Config
	Logger   zerolog.Logger
	// MaxInFlight bounds the QoS 1 publishes awaiting PUBACK (default 1024); it keeps a
	// large fan-out from flooding the broker's inbound queue.
	MaxInFlight int
	// Publishers is the number of publishing connections (default 1). A broker that
	// handles each connection on its own thread (mochi does) takes a fan-out faster over
	// several.
	Publishers int
	// Subscribers is the number of subscribing connections (default 1); only shared
	// subscriptions use more than the first.
	Subscribers int
	// OneConnection makes the Bus publish and subscribe over a single connection
	// (Publishers and Subscribers are ignored): for brokers that allow one connection
	// per username, such as Mosquitto with use_username_as_clientid.
	OneConnection bool
}

// Bus is the updater's link to an MQTT broker.
type Bus struct {
	subs   []mqtt.Client // subscriptions: shared ones on all, others on the first
	pubs   []mqtt.Client // publishes, by device (the subscribing one with OneConnection)
	all    []mqtt.Client // every connection, each once
	log    zerolog.Logger
	slots  chan struct{}
	mu     sync.Mutex
	filter map[string]func(topic string, payload []byte) // to restore after a reconnect
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
	if o.Publishers <= 0 {
		o.Publishers = 1
	}
	if o.Subscribers <= 0 || o.OneConnection {
		o.Subscribers = 1
	}
	b := &Bus{log: o.Logger, slots: make(chan struct{}, o.MaxInFlight), filter: map[string]func(string, []byte){},
		fatal: make(chan error, 1)}
	clientOptions := func(id string, onConnect mqtt.OnConnectHandler) *mqtt.ClientOptions {
		co := mqtt.NewClientOptions().
			AddBroker(o.URL).
			SetClientID(id).
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
			// A connect attempt that gets no CONNACK is given up after 10 s, not paho's 30:
			// a broker that is shutting down can accept a connection and never answer it.
			SetConnectTimeout(10 * time.Second).
			SetKeepAlive(30 * time.Second).
			SetWriteTimeout(30 * time.Second).
			SetMessageChannelDepth(10000).
			SetCustomOpenConnectionFn(openBuffered).
			SetOnConnectHandler(onConnect).
			SetConnectionNotificationHandler(b.onNotification).
			SetConnectionLostHandler(func(_ mqtt.Client, err error) {
				b.log.Warn().Err(err).Str("client", id).Msg("mqtt connection lost; reconnecting")
			})
		if o.TLS != nil {
			co.SetTLSConfig(o.TLS)
		}
		return co
	}
	var clients []mqtt.Client
	for i := range o.Subscribers {
		id := o.ClientID
		if i > 0 {
			id = fmt.Sprintf("%s-sub%d", o.ClientID, i)
		}
		c := mqtt.NewClient(clientOptions(id, func(c mqtt.Client) { b.onConnect(c, i == 0) }))
		b.subs = append(b.subs, c)
		clients = append(clients, c)
	}
	if o.OneConnection {
		b.pubs = b.subs
		o.Publishers = 0
	}
	for i := range o.Publishers {
		id := fmt.Sprintf("%s-pub%d", o.ClientID, i)
		c := mqtt.NewClient(clientOptions(id, func(mqtt.Client) {
			b.log.Info().Str("client", id).Msg("mqtt connected")
		}))
		b.pubs = append(b.pubs, c)
		clients = append(clients, c)
	}
	b.all = clients
	for _, c := range clients {
		if err := b.awaitConnect(ctx, c.Connect()); err != nil {
			b.disconnect(clients, 0)
			return nil, fmt.Errorf("mqttbus: connecting to %s as %q: %w", o.URL, o.Username, err)
		}
	}
	return b, nil
}

// awaitConnect waits for a first connection: until it succeeds, a refusal that retrying
// cannot fix ends it, or ctx is done (the error then names the last failed attempt).
func (b *Bus) awaitConnect(ctx context.Context, tok mqtt.Token) error {
	select {
	case <-tok.Done():
		return tok.Error()
	case err := <-b.fatal:
		return err
	case <-ctx.Done():
		if last := b.lastFailure(); last != nil {
			return fmt.Errorf("%w (last attempt: %w)", ctx.Err(), last)
		}
		return ctx.Err()
	}
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

func (b *Bus) disconnect(clients []mqtt.Client, quiesce uint) {
	var wg sync.WaitGroup
	for _, c := range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c.Disconnect(quiesce)
		}()
	}
	wg.Wait()
}

// publisher returns the connection for a topic: by device for device topics, else by the
// topic's first three levels.
func (b *Bus) publisher(topic string) mqtt.Client {
	if len(b.pubs) == 1 {
		return b.pubs[0]
	}
	return b.pubs[protocol.OrderLane(topic, len(b.pubs))]
}

// onConnect restores the subscriptions of a subscribing connection: all of them on the
// first, the shared ones on the others.
func (b *Bus) onConnect(c mqtt.Client, first bool) {
	b.mu.Lock()
	filters := make(map[string]func(string, []byte), len(b.filter))
	for f, h := range b.filter {
		if first || shared(f) {
			filters[f] = h
		}
	}
	b.mu.Unlock()
	for f, h := range filters {
		// Re-subscribing on a clean session; the token is not waited for on paho's
		// callback goroutine (that would deadlock), errors are logged.
		tok := c.Subscribe(f, 1, wrap(h))
		go func(f string) {
			if tok.WaitTimeout(30*time.Second) && tok.Error() != nil {
				b.log.Error().Err(tok.Error()).Str("filter", f).Msg("re-subscribe failed")
			}
		}(f)
	}
	b.log.Info().Int("subscriptions", len(filters)).Msg("mqtt connected")
}

func shared(filter string) bool { return strings.HasPrefix(filter, "$share/") }

// subscribers returns the connections a filter is subscribed on.
func (b *Bus) subscribers(filter string) []mqtt.Client {
	if shared(filter) {
		return b.subs
	}
	return b.subs[:1]
}

func wrap(h func(string, []byte)) mqtt.MessageHandler {
	return func(_ mqtt.Client, m mqtt.Message) { h(m.Topic(), m.Payload()) }
}

// Subscribe delivers every message matching filter (QoS 1) to handle, now and after any
// reconnect. handle runs on a paho goroutine and must not block for long; with several
// subscribing connections, a shared subscription's handle runs on several at once.
func (b *Bus) Subscribe(ctx context.Context, filter string, handle func(topic string, payload []byte)) error {
	b.mu.Lock()
	b.filter[filter] = handle
	b.mu.Unlock()
	for _, c := range b.subscribers(filter) {
		tok := c.Subscribe(filter, 1, wrap(handle))
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
	}
	return nil
}

// Unsubscribe stops a subscription made with Subscribe.
func (b *Bus) Unsubscribe(ctx context.Context, filter string) error {
	b.mu.Lock()
	delete(b.filter, filter)
	b.mu.Unlock()
	var errs []error
	for _, c := range b.subscribers(filter) {
		errs = append(errs, wait(ctx, c.Unsubscribe(filter)))
	}
	return errors.Join(errs...)
}

// Publish sends the messages with QoS 1 and returns once the broker has acknowledged all
// of them, or the first error. At most MaxInFlight are unacknowledged at any time.
func (b *Bus) Publish(ctx context.Context, msgs ...protocol.Message) error {
	if len(msgs) == 0 {
		return nil
	}
	// One goroutine waits for the tokens in the order they were sent, which is the order
	// the broker acknowledges them in on each connection, and frees a slot for each.
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
		pending <- sent{b.publisher(m.Topic).Publish(m.Topic, 1, m.Retain, m.Payload), m.Topic}
	}
	close(pending)
	return <-result
}

// Check reports whether every connection of the Bus is up (for health checks); the error
// names the last reason a connection attempt failed.
func (b *Bus) Check() error {
	for i, c := range b.all {
		if !c.IsConnectionOpen() {
			if last := b.lastFailure(); last != nil {
				return fmt.Errorf("mqttbus: connection %d of %d is down (last attempt: %w)", i+1, len(b.all), last)
			}
			return fmt.Errorf("mqttbus: connection %d of %d is down", i+1, len(b.all))
		}
	}
	return nil
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
	b.disconnect(b.all, 1000)
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
