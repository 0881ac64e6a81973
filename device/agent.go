package device

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	mqtt "github.com/eclipse/paho.mqtt.golang"
	"github.com/rs/zerolog"

	"github.com/sealcast/sealcast/keychain"
	"github.com/sealcast/sealcast/protocol"
)

// Vault is the device's protected memory, as the agent uses it. Save must replace the
// stored State atomically: after a power loss Load returns either the previous or the new
// State [SC-10.1 step 5]. FileVault and MemoryVault implement it; a device with a secure
// element implements it there.
type Vault interface {
	Load() (State, error)
	Save(State) error
}

// Options configure an Agent. Vault and Installer are required; every zero duration or
// count takes the default in its comment.
type Options struct {
	Vault     Vault
	Installer Installer
	// Logger receives the agent's log; the zero value logs nothing.
	Logger zerolog.Logger

	// Window is W, the number of chunk subscriptions open at once, 1..64 (4) [SC-9.4].
	Window int
	// ChunkTimeout bounds the wait for the manifest or the next chunk (30 s).
	ChunkTimeout time.Duration
	// FetchTries is how many times a chunk or the manifest is fetched before the update
	// fails with chunk_corrupt or timeout (3) [SC-9.4].
	FetchTries int
	// MaxChunkSize is the largest chunk the device accepts; larger is code unsupported
	// (1 MiB, the protocol's maximum).
	MaxChunkSize uint32

	// AckResend is the first re-send interval of an unconfirmed ack (30 s), doubling up
	// to AckResendMax (10 min) [SC-10.1 step 6].
	AckResend, AckResendMax time.Duration
	// RetryAfter is how long after a transient failure (timeout, chunk_corrupt,
	// image_corrupt, install_failed) a connected device asks for its key message again
	// (30 s, with jitter), doubling per failed attempt up to RetryMax (10 min) [SC-10.1].
	// A reconnect retries at once.
	RetryAfter, RetryMax time.Duration
	// ReconnectMin and ReconnectMax bound the exponential reconnect backoff with full
	// jitter (1 s, 60 s) [SC-9.3].
	ReconnectMin, ReconnectMax time.Duration
	// ConnectTimeout bounds one connection attempt (10 s); KeepAlive is the MQTT keep
	// alive (60 s).
	ConnectTimeout, KeepAlive time.Duration
	// ProgressInterval is the least time between two "downloading" state publications
	// (2 s).
	ProgressInterval time.Duration
	// Prefetch, if set, keeps the chunks of releases announced by a prefetch notice,
	// fetched ahead of their key [SC-9.9]; nil: the device does not prefetch.
	Prefetch ChunkStore

	// TrialBoots bounds, with a TrialInstaller, both the switches to an image on trial
	// and the starts with it running before it passes its health check (3); past it the
	// trial fails. HealthTimeout bounds the health check (5 min) [SC-10.5].
	TrialBoots    int
	HealthTimeout time.Duration

	// BrokerURL, if set, replaces the vault's broker URL (tests, simulators, a changed
	// broker address). TLSConfig is used for ssl://, tls:// and mqtts:// URLs.
	BrokerURL string
	TLSConfig *tls.Config

	// OnEvent, if set, is called on the agent's goroutine for every Event. It must return
	// quickly; while it runs the agent waits (messages still queue).
	OnEvent func(Event)
	// Faults injects failures (tests, simulator only).
	Faults Faults
}

func (o *Options) setDefaults() error {
	if o.Vault == nil {
		return errors.New("device: Options.Vault is nil: give the agent its protected memory (FileVault, MemoryVault)")
	}
	if o.Installer == nil {
		return errors.New("device: Options.Installer is nil: give the agent a SlotInstaller, CommandInstaller or your own")
	}
	def := func(d *time.Duration, v time.Duration) {
		if *d <= 0 {
			*d = v
		}
	}
	if o.Window == 0 {
		o.Window = 4
	}
	if o.Window < 1 || o.Window > 64 {
		return fmt.Errorf("device: Options.Window %d is outside 1..64 [SC-9.4]", o.Window)
	}
	if o.FetchTries <= 0 {
		o.FetchTries = 3
	}
	if o.MaxChunkSize == 0 {
		o.MaxChunkSize = keychain.MaxChunkSize
	}
	def(&o.ChunkTimeout, 30*time.Second)
	def(&o.AckResend, 30*time.Second)
	def(&o.AckResendMax, 10*time.Minute)
	def(&o.RetryAfter, 30*time.Second)
	def(&o.RetryMax, 10*time.Minute)
	def(&o.ReconnectMin, time.Second)
	def(&o.ReconnectMax, time.Minute)
	def(&o.ConnectTimeout, 10*time.Second)
	def(&o.KeepAlive, time.Minute)
	def(&o.ProgressInterval, 2*time.Second)
	def(&o.HealthTimeout, trialDeadline)
	if o.TrialBoots <= 0 {
		o.TrialBoots = 3
	}
	if o.RetryMax < o.RetryAfter {
		o.RetryMax = o.RetryAfter
	}
	if o.AckResendMax < o.AckResend {
		o.AckResendMax = o.AckResend
	}
	if o.ReconnectMax < o.ReconnectMin {
		o.ReconnectMax = o.ReconnectMin
	}
	return nil
}

// ErrCrashed is returned by Run when a crash fault fired (Faults.CrashAfterInstall,
// CrashAfterPersist, Crash): the agent stopped as if the power went out. Start a new Agent on the
// same Vault to model the reboot.
var ErrCrashed = errors.New("device: agent crashed by fault injection")

// Agent is the device side of Sealcast: it connects to the broker, takes key messages,
// downloads, verifies and installs releases, and acks them. Create it with New and run
// it with Run. Stats and Serial are safe to call from any goroutine; Run may be called
// once.
type Agent struct {
	opts    Options
	log     zerolog.Logger
	c       counters
	serial  string
	started atomic.Bool

	// inbox: filled by paho's goroutines, drained by Run's goroutine. Handlers never
	// block: they append and poke wake.
	mu    sync.Mutex
	inbox []inbound
	wake  chan struct{}
	// subWatch counts the goroutines that wait for SUBACKs; stopped ends them.
	subWatch sync.WaitGroup
	stopped  chan struct{}

	// Everything below is owned by Run's goroutine.
	st           State
	lastAck      *keychain.Ack // parsed st.LastAck
	conn         *connection   // nil while disconnected
	closing      *connection   // force-closed, waiting for paho to report the loss
	closingUntil time.Time
	gen          uint64
	attempt      int
	reconnectAt  time.Time
	job          *job
	failed       *failure
	report       []byte // a report that could not be sent yet
	ackAt        time.Time
	ackEvery     time.Duration
	ackHeld      bool // a new ack waits for Faults.AckDelay
	unsub        map[string]bool
	resub        map[string]time.Time // refused subscriptions, retried at the time [SC-10.1a]
	doc          protocol.DeviceState
	fatal        error
	runCtx       context.Context
	heldKey      []byte         // a key message that arrived during a trial [SC-10.5]
	pre          *prefetch      // the release announced for prefetch [SC-9.9]
	trialWait    sync.WaitGroup // the health check running
}

type inbound struct {
	gen     uint64
	topic   string
	payload []byte
	lost    bool
	err     error
	refused []string    // subscriptions the broker refused
	health  *healthDone // a health check ended
}

// connection is one paho client and its network connection.
type connection struct {
	gen    uint64
	client mqtt.Client
	lostCh chan struct{} // closed when paho reported the loss (its workers stopped)
	mu     sync.Mutex
	nc     *brokenConn
}

func (c *connection) setConn(nc *brokenConn) {
	c.mu.Lock()
	c.nc = nc
	c.mu.Unlock()
}

// closeNet force-closes the network connection, as a broken link would.
func (c *connection) closeNet() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.nc != nil {
		c.nc.breakLink()
	}
}

// errLinkDropped is what reads and writes return after closeNet.
var errLinkDropped = errors.New("device: network link dropped")

// brokenConn lets the agent cut its own connection so that paho sees a network error.
// paho treats "use of closed network connection" as its own clean shutdown and would
// never report the loss, so a plain Close is not enough.
type brokenConn struct {
	net.Conn
	broken atomic.Bool
}

func (b *brokenConn) breakLink() {
	b.broken.Store(true)
	b.Conn.Close()
}

func (b *brokenConn) Read(p []byte) (int, error) {
	n, err := b.Conn.Read(p)
	if err != nil && b.broken.Load() {
		err = errLinkDropped
	}
	return n, err
}

func (b *brokenConn) Write(p []byte) (int, error) {
	n, err := b.Conn.Write(p)
	if err != nil && b.broken.Load() {
		err = errLinkDropped
	}
	return n, err
}

// New checks opts and loads the vault.
func New(opts Options) (*Agent, error) {
	if err := opts.setDefaults(); err != nil {
		return nil, err
	}
	st, err := opts.Vault.Load()
	if err != nil {
		return nil, fmt.Errorf("device: loading the vault: %w", err)
	}
	if err := st.Validate(); err != nil {
		return nil, fmt.Errorf("device: the vault holds an invalid state: %w", err)
	}
	a := &Agent{
		opts: opts, serial: st.Serial, st: st, wake: make(chan struct{}, 1), stopped: make(chan struct{}),
		unsub: map[string]bool{}, resub: map[string]time.Time{}, ackEvery: opts.AckResend,
	}
	a.log = opts.Logger.With().Str("serial", st.Serial).Logger()
	if st.LastAck != nil {
		ack, err := keychain.ParseAck(st.LastAck)
		if err != nil {
			return nil, fmt.Errorf("device: the vault's last ack is damaged: %w", err)
		}
		a.lastAck = &ack
	}
	a.doc = protocol.DeviceState{Serial: st.Serial, State: protocol.AgentIdle}
	return a, nil
}

// Serial returns the device's serial.
func (a *Agent) Serial() string { return a.serial }

// Stats returns a snapshot of the counters.
func (a *Agent) Stats() Stats { return a.c.snapshot() }

func (a *Agent) push(in inbound) {
	a.mu.Lock()
	a.inbox = append(a.inbox, in)
	a.mu.Unlock()
	select {
	case a.wake <- struct{}{}:
	default:
	}
}

func (a *Agent) emit(e Event) {
	if a.opts.OnEvent == nil {
		return
	}
	e.Serial = a.serial
	if e.Seq == 0 {
		e.Seq = a.st.Seq
	}
	e.Time = time.Now()
	a.opts.OnEvent(e)
}

// Run connects and works until ctx is done, then publishes "offline", disconnects and
// returns nil once every goroutine it started has stopped. It returns early with
// ErrCrashed when a crash fault fires, or with an error when the vault cannot be written
// (the device must not go on acking what it cannot remember).
func (a *Agent) Run(ctx context.Context) error {
	if !a.started.CompareAndSwap(false, true) {
		return errors.New("device: Agent.Run called twice: create a new Agent")
	}
	a.runCtx = ctx
	defer func() {
		close(a.stopped)
		a.subWatch.Wait()
		a.trialWait.Wait()
	}()
	a.resumeTrial()
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	for {
		now := time.Now()
		if a.conn == nil && a.closing == nil && !now.Before(a.reconnectAt) {
			a.connect(ctx)
		}
		if a.fatal == nil && ctx.Err() == nil {
			timer.Reset(a.nextWake(time.Now()))
			select {
			case <-ctx.Done():
			case <-a.wake:
				a.drain()
			case <-timer.C:
				a.tick(time.Now())
			}
		}
		if a.fatal != nil {
			a.stop(false)
			return a.fatal
		}
		if ctx.Err() != nil {
			a.stop(true)
			return nil
		}
	}
}

// stop ends the connection: gracefully (offline presence, DISCONNECT) or, for a crash,
// by closing the network connection so the broker publishes the will.
func (a *Agent) stop(graceful bool) {
	if a.job != nil {
		a.job.abort()
		a.job = nil
	}
	wait := func(c *connection) {
		select {
		case <-c.lostCh:
		case <-time.After(a.opts.ConnectTimeout):
			a.log.Warn().Msg("paho did not report the closed connection in time")
		}
	}
	if a.closing != nil {
		wait(a.closing)
		a.closing = nil
	}
	if c := a.conn; c != nil {
		a.conn = nil
		if graceful {
			t := c.client.Publish(protocol.PresenceTopic(a.serial), 1, true, protocol.Offline)
			t.WaitTimeout(time.Second)
			c.client.Disconnect(250)
		} else {
			c.closeNet()
			wait(c)
		}
	}
}

func (a *Agent) drain() {
	for {
		a.mu.Lock()
		batch := a.inbox
		a.inbox = nil
		a.mu.Unlock()
		if len(batch) == 0 {
			return
		}
		for i := range batch {
			if a.fatal != nil {
				return
			}
			a.handle(&batch[i])
			batch[i] = inbound{} // let the payload go
		}
	}
}

func (a *Agent) handle(in *inbound) {
	if in.lost {
		a.onLost(in.gen, in.err)
		return
	}
	if in.refused != nil {
		a.onRefused(in.gen, in.refused)
		return
	}
	if in.health != nil {
		a.onHealth(in.health)
		return
	}
	switch in.topic {
	case protocol.KeyTopic(a.serial):
		a.onKey(in.payload)
	case protocol.ReceiptTopic(a.serial):
		a.onReceipt(in.payload)
	case protocol.KeyStatementTopic(a.st.KeySeq + 1):
		a.onKeyStatement(in.payload)
	case protocol.PrefetchTopic(a.serial):
		a.onPrefetch(in.payload)
	default:
		a.onRelease(in.topic, in.payload)
	}
}

// nextWake returns how long Run may sleep before tick has something to do.
func (a *Agent) nextWake(now time.Time) time.Duration {
	next := now.Add(time.Hour)
	at := func(t time.Time) {
		if t.Before(next) {
			next = t
		}
	}
	switch {
	case a.closing != nil:
		at(a.closingUntil)
	case a.conn == nil:
		at(a.reconnectAt)
	default:
		if a.job != nil {
			at(a.job.deadline)
		}
		if a.lastAck != nil && !a.st.LastAckConfirmed {
			at(a.ackAt)
		}
		for _, t := range a.resub {
			at(t)
		}
		if f := a.failed; f != nil && f.transient() && !f.retrying {
			at(f.retryAt)
		}
		if pf := a.pre; pf != nil && a.prefetchIdle() {
			if pf.started {
				at(pf.due)
			} else {
				at(pf.startAt)
			}
		}
	}
	if d := next.Sub(now); d > 0 {
		return d
	}
	return 0
}

func (a *Agent) tick(now time.Time) {
	if a.closing != nil {
		if !now.Before(a.closingUntil) {
			a.log.Warn().Msg("paho did not report the closed connection; reconnecting anyway")
			a.closing = nil
			a.scheduleReconnect(now)
		}
		return
	}
	if a.conn == nil {
		return // Run connects
	}
	for topic, t := range a.resub {
		if !now.Before(t) {
			delete(a.resub, topic)
			if a.wanted(topic) {
				a.c.subRetries.Add(1)
				a.subscribe(topic)
			}
		}
	}
	if a.job != nil && !now.Before(a.job.deadline) {
		a.jobTimeout(now)
	}
	if f := a.failed; f != nil && f.transient() && !f.retrying && a.job == nil && !now.Before(f.retryAt) {
		// Subscribing again makes the broker re-send the retained key message
		// [MQTT-3.8.4-3]; onKey then tries it once more.
		f.retrying = true
		a.c.retries.Add(1)
		a.log.Info().Int("attempt", f.attempts+1).Stringer("code", f.code).Msg("retrying a failed update")
		a.subscribe(protocol.KeyTopic(a.serial))
	}
	a.stepPrefetch(now)
	if a.lastAck != nil && !a.st.LastAckConfirmed && !now.Before(a.ackAt) {
		a.sendAck()
		a.ackHeld = false
		a.ackAt = now.Add(a.ackEvery)
		a.ackEvery = min(2*a.ackEvery, a.opts.AckResendMax)
	}
}

// scheduleReconnect sets the next attempt with exponential backoff and full jitter
// [SC-9.3].
func (a *Agent) scheduleReconnect(now time.Time) {
	ceil := a.opts.ReconnectMin
	for i := 0; i < a.attempt && ceil < a.opts.ReconnectMax; i++ {
		ceil *= 2
	}
	ceil = min(ceil, a.opts.ReconnectMax)
	a.attempt++
	a.reconnectAt = now.Add(rand.N(ceil + 1))
}

func (a *Agent) brokerURL() (*url.URL, error) {
	raw := a.st.Broker.URL
	if a.opts.BrokerURL != "" {
		raw = a.opts.BrokerURL
	}
	u, err := url.Parse(raw)
	if err != nil || u.Host == "" {
		return nil, fmt.Errorf("device: broker url %q is not a URL like tcp://host:1883", raw)
	}
	return u, nil
}

// connect makes one connection attempt [SC-9.3].
func (a *Agent) connect(ctx context.Context) {
	u, err := a.brokerURL()
	if err != nil {
		a.fatal = err
		return
	}
	a.gen++
	c := &connection{gen: a.gen, lostCh: make(chan struct{})}
	gen := a.gen
	o := mqtt.NewClientOptions().
		AddBroker(u.String()).
		SetClientID(a.serial).
		SetUsername(a.serial).
		SetPassword(a.st.Broker.Password).
		SetProtocolVersion(4).
		SetCleanSession(false).
		SetAutoReconnect(false). // the agent reconnects, with jitter
		SetConnectRetry(false).
		SetResumeSubs(false).
		SetOrderMatters(true).
		SetConnectTimeout(a.opts.ConnectTimeout).
		SetKeepAlive(a.opts.KeepAlive).
		SetPingTimeout(a.opts.ConnectTimeout).
		SetWriteTimeout(a.opts.ConnectTimeout).
		SetBinaryWill(protocol.PresenceTopic(a.serial), []byte(protocol.Offline), 1, true).
		SetDefaultPublishHandler(func(_ mqtt.Client, m mqtt.Message) {
			// Runs on paho's goroutine in order: never block [paho: handlers must not block].
			a.push(inbound{gen: gen, topic: m.Topic(), payload: m.Payload()})
		}).
		SetConnectionLostHandler(func(_ mqtt.Client, err error) {
			close(c.lostCh)
			a.push(inbound{gen: gen, lost: true, err: err})
		}).
		SetCustomOpenConnectionFn(func(u *url.URL, _ mqtt.ClientOptions) (net.Conn, error) {
			nc, err := a.dial(ctx, u)
			if err != nil {
				return nil, err
			}
			bc := &brokenConn{Conn: nc}
			c.setConn(bc)
			return bc, nil
		})
	c.client = mqtt.NewClient(o)
	tok := c.client.Connect()
	select {
	case <-tok.Done():
	case <-ctx.Done():
		c.closeNet()
		<-tok.Done()
		if tok.Error() == nil {
			c.client.Disconnect(0)
		}
		return
	}
	if err := tok.Error(); err != nil {
		a.scheduleReconnect(time.Now())
		a.log.Warn().Err(err).Str("broker", u.Redacted()).Time("retry_at", a.reconnectAt).Msg("connecting to the broker failed; will retry")
		return
	}
	a.conn = c
	a.attempt = 0
	a.onConnected()
}

func (a *Agent) dial(ctx context.Context, u *url.URL) (net.Conn, error) {
	host := u.Host
	secure := u.Scheme == "ssl" || u.Scheme == "tls" || u.Scheme == "mqtts"
	if u.Port() == "" {
		if secure {
			host = net.JoinHostPort(u.Hostname(), "8883")
		} else {
			host = net.JoinHostPort(u.Hostname(), "1883")
		}
	}
	d := &net.Dialer{Timeout: a.opts.ConnectTimeout}
	if secure {
		td := &tls.Dialer{NetDialer: d, Config: a.opts.TLSConfig}
		return td.DialContext(ctx, "tcp", host)
	}
	return d.DialContext(ctx, "tcp", host)
}

// onConnected runs after CONNACK [SC-9.3]: presence, subscriptions, unconfirmed ack,
// and the download where it stopped [SC-9.4].
func (a *Agent) onConnected() {
	a.c.connects.Add(1)
	a.log.Info().Msg("connected")
	a.emit(Event{Kind: EventConnected})
	cl := a.conn.client
	cl.Publish(protocol.PresenceTopic(a.serial), 1, true, protocol.Online)
	if len(a.unsub) > 0 {
		topics := make([]string, 0, len(a.unsub))
		for t := range a.unsub {
			topics = append(topics, t)
		}
		cl.Unsubscribe(topics...)
		clear(a.unsub)
	}
	subs := map[string]byte{protocol.KeyTopic(a.serial): 1, protocol.ReceiptTopic(a.serial): 1, protocol.KeyStatementTopic(a.st.KeySeq + 1): 1}
	if a.opts.Prefetch != nil {
		subs[protocol.PrefetchTopic(a.serial)] = 1
	}
	a.watchSuback(a.conn, cl.SubscribeMultiple(subs, nil))
	if a.failed != nil && a.failed.transient() {
		a.failed = nil // a redelivered key message is tried again
	}
	if a.report != nil {
		a.publishReport(a.report)
	}
	if a.lastAck != nil && !a.st.LastAckConfirmed && !a.ackHeld {
		a.sendAck()
		a.ackAt = time.Now().Add(a.ackEvery)
	}
	if a.job != nil {
		a.job.resume(time.Now())
		a.process()
	}
	if pf := a.pre; pf != nil && pf.started && a.prefetchIdle() {
		if pf.m == nil {
			a.prefetchManifest(time.Now())
		} else {
			clear(pf.subbed)
			a.prefetchFill(time.Now())
		}
	}
	a.publishState()
}

func (a *Agent) onLost(gen uint64, err error) {
	now := time.Now()
	switch {
	case a.closing != nil && a.closing.gen == gen:
		a.closing = nil
	case a.conn != nil && a.conn.gen == gen:
		a.conn = nil
	default:
		return // an older connection
	}
	a.c.disconnects.Add(1)
	clear(a.resub) // the next connection subscribes to what it needs
	a.log.Warn().Err(err).Msg("connection lost")
	a.emit(Event{Kind: EventDisconnected, Err: err})
	if a.job != nil {
		a.job.disconnected()
	}
	if a.pre != nil {
		clear(a.pre.subbed)
	}
	a.scheduleReconnect(now)
}

// dropConnection force-closes the network connection (Faults.DropAfterChunk).
func (a *Agent) dropConnection() {
	if a.conn == nil {
		return
	}
	a.log.Warn().Msg("fault injection: dropping the connection")
	a.closing, a.conn = a.conn, nil
	a.closingUntil = time.Now().Add(a.opts.ConnectTimeout)
	a.closing.closeNet()
	if a.job != nil {
		a.job.disconnected()
	}
}

// crashAt asks Faults.Crash whether to crash at p.
func (a *Agent) crashAt(p CrashPoint, id keychain.ReleaseID, chunk uint32) bool {
	f := a.opts.Faults.Crash
	return f != nil && f(p, id, chunk)
}

func (a *Agent) crash() {
	a.log.Warn().Msg("fault injection: crashing")
	a.fatal = ErrCrashed
}

func (a *Agent) subscribe(topic string) bool {
	delete(a.unsub, topic)
	delete(a.resub, topic)
	if a.conn == nil {
		return false
	}
	a.watchSuback(a.conn, a.conn.client.Subscribe(topic, 1, nil))
	return true
}

// watchSuback waits, on a goroutine of its own, for the SUBACK of tok and queues the
// subscriptions the broker refused [SC-10.1a]. The goroutine ends with the SUBACK, the
// connection, or Run.
func (a *Agent) watchSuback(c *connection, tok mqtt.Token) {
	st, ok := tok.(*mqtt.SubscribeToken)
	if !ok {
		return
	}
	a.subWatch.Add(1)
	go func() {
		defer a.subWatch.Done()
		select {
		case <-tok.Done():
		case <-c.lostCh:
			return
		case <-a.stopped:
			return
		}
		var refused []string
		for topic, code := range st.Result() {
			if code >= 0x80 { // 0x80 failure; 0x91 "packet identifier in use" from v5 brokers
				refused = append(refused, topic)
			}
		}
		if len(refused) > 0 {
			a.push(inbound{gen: c.gen, refused: refused})
		}
	}()
}

// subRetryDelay is the least wait before a refused subscription is tried again.
const subRetryDelay = 100 * time.Millisecond

// onRefused schedules refused subscriptions of the current connection again after a
// short, jittered delay [SC-10.1a].
func (a *Agent) onRefused(gen uint64, topics []string) {
	if a.conn == nil || a.conn.gen != gen {
		return // an older connection: the current one subscribed afresh
	}
	now := time.Now()
	for _, t := range topics {
		a.log.Warn().Str("topic", t).Msg("the broker refused a subscription; retrying [SC-10.1a]")
		a.resub[t] = now.Add(subRetryDelay + rand.N(subRetryDelay))
	}
}

// wanted reports whether topic is still worth subscribing to: the key and receipt
// topics always, the manifest and chunks while the job waits for them.
func (a *Agent) wanted(topic string) bool {
	if topic == protocol.KeyTopic(a.serial) || topic == protocol.ReceiptTopic(a.serial) || topic == protocol.KeyStatementTopic(a.st.KeySeq+1) ||
		a.opts.Prefetch != nil && topic == protocol.PrefetchTopic(a.serial) {
		return true
	}
	if pf := a.pre; pf != nil && pf.started {
		if pf.m == nil && topic == protocol.ManifestTopic(pf.n.ID) {
			return true
		}
		if rest, ok := strings.CutPrefix(topic, pf.prefix); ok && pf.m != nil {
			n, err := strconv.ParseUint(rest, 10, 32)
			return err == nil && pf.subbed[uint32(n)]
		}
	}
	j := a.job
	if j == nil {
		return false
	}
	if j.phase == phaseManifest {
		return topic == protocol.ManifestTopic(j.km.ID)
	}
	rest, ok := strings.CutPrefix(topic, j.prefix)
	if !ok {
		return false
	}
	n, err := strconv.ParseUint(rest, 10, 32)
	i := uint32(n)
	return err == nil && i >= j.next && j.subbed[i] && j.buf[i] == nil
}

func (a *Agent) unsubscribe(topic string) {
	if a.conn == nil {
		a.unsub[topic] = true // on the broker the session keeps it: drop it at reconnect
		return
	}
	a.conn.client.Unsubscribe(topic)
}

func (a *Agent) publish(topic string, retained bool, payload []byte) bool {
	if a.conn == nil {
		return false
	}
	a.conn.client.Publish(topic, 1, retained, payload)
	return true
}
