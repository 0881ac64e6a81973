package broker

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/listeners"
	"github.com/mochi-mqtt/server/v2/packets"
	"github.com/rs/zerolog"

	"github.com/sealcast/sealcast/internal/atomicfile"
	"github.com/sealcast/sealcast/keychain"
)

// Defaults for Options and Limits. docs/BROKER.md explains each choice.
const (
	DefaultTCPAddr = ":1883"
	DefaultTLSAddr = ":8883"

	// DefaultMaxPacketSize is 1 MiB + 4 KiB: the largest Sealcast message is a chunk of
	// 1 MiB + 16 bytes or an upload part of 1 MiB (PROTOCOL.md 9).
	DefaultMaxPacketSize = 1<<20 + 4<<10
	// DefaultMaxInflight bounds each session's unacknowledged QoS 1/2 deliveries. mochi drops
	// deliveries past it silently (counted in Stats.DroppedInflight); the updater's
	// subscription to every device's ack topic is what can reach it.
	DefaultMaxInflight = 8192
	// DefaultDeviceMaxInflight bounds the deliveries queued for one device: a device needs
	// its key, receipt, manifest and at most 64 chunks (PROTOCOL.md 9.2, [SC-9.4]).
	DefaultDeviceMaxInflight = 256
	// DefaultConnectTimeout is how long a new connection may take to finish TLS and send
	// CONNECT.
	DefaultConnectTimeout = 10 * time.Second
	// DefaultSysInterval is how often $SYS statistics are published.
	DefaultSysInterval = 10 * time.Second
	// DefaultWriteDeadline is how long a client may take to accept 64 KiB of what the
	// broker writes to it before it is disconnected as a slow consumer (NATS's default).
	DefaultWriteDeadline = 10 * time.Second
	// DefaultMaxPending bounds the bytes waiting to be written to one client; past it the
	// client is disconnected as a slow consumer. It is twice the largest burst a device
	// asks for: a window of 64 chunks of 1 MiB ([SC-9.4]).
	DefaultMaxPending = 128 << 20
)

// ErrBadOptions wraps every error New returns for unusable Options.
var ErrBadOptions = errors.New("broker: bad options")

// Options configure a Broker. The zero value of every field but AuthKey is usable.
type Options struct {
	// TCPAddr is the plain MQTT listener address; "" means DefaultTCPAddr, "-" disables it.
	TCPAddr string
	// TLSAddr is the MQTT-over-TLS listener address; "" means DefaultTLSAddr. The TLS
	// listener runs only if TLSCertPEM and TLSKeyPEM are set.
	TLSAddr    string
	TLSCertPEM []byte
	TLSKeyPEM  []byte
	// ClientCAPEM, if set, makes the TLS listener ask for client certificates and verify
	// them against these CAs. A device presenting a verified certificate authenticates as
	// the serial in its subject CN, without a password.
	ClientCAPEM []byte
	// WSAddr is the MQTT-over-WebSocket listener address; "" disables it.
	WSAddr string
	// WebSocketHandler makes WebSocketHandler serve MQTT over WebSocket on an HTTP
	// server of the caller's (the dashboard's same-origin /mqtt).
	WebSocketHandler bool
	// HealthAddr is the HTTP address serving GET /healthz; "" disables it.
	HealthAddr string

	// DataDir holds the session store (pebble, synced writes). "" keeps everything in
	// memory: retained messages and sessions are lost on restart.
	DataDir string

	// AuthKey is A (PROTOCOL.md 3.5), from keychain.RootSecret.BrokerAuth. Required.
	AuthKey keychain.BrokerAuthKey
	// Accounts are the admin, monitor and updater users, e.g. from LoadAccounts. More can
	// be added in memory with (*Broker).AddAccount.
	Accounts []Account

	// Logger receives the broker's and mochi's logs. The zero Logger discards them.
	Logger zerolog.Logger

	Limits Limits
}

// Limits are per-connection and per-session limits; zero fields take the defaults above.
type Limits struct {
	MaxPacketSize     uint32        // DefaultMaxPacketSize
	MaxInflight       uint16        // DefaultMaxInflight
	DeviceMaxInflight int           // DefaultDeviceMaxInflight
	MaxClients        int64         // 0: no limit
	ConnectTimeout    time.Duration // DefaultConnectTimeout
	SysInterval       time.Duration // DefaultSysInterval
	WriteDeadline     time.Duration // DefaultWriteDeadline
	MaxPending        int           // DefaultMaxPending
}

func (l *Limits) setDefaults() {
	if l.MaxPacketSize == 0 {
		l.MaxPacketSize = DefaultMaxPacketSize
	}
	if l.MaxInflight == 0 {
		l.MaxInflight = DefaultMaxInflight
	}
	if l.DeviceMaxInflight == 0 {
		l.DeviceMaxInflight = DefaultDeviceMaxInflight
	}
	if l.ConnectTimeout == 0 {
		l.ConnectTimeout = DefaultConnectTimeout
	}
	if l.SysInterval == 0 {
		l.SysInterval = DefaultSysInterval
	}
	if l.WriteDeadline == 0 {
		l.WriteDeadline = DefaultWriteDeadline
	}
	if l.MaxPending == 0 {
		l.MaxPending = DefaultMaxPending
	}
}

// Broker is the embedded MQTT broker: mochi-mqtt with Sealcast's authentication, access
// rules and persistence. Its methods are safe for concurrent use.
type Broker struct {
	srv     *mqtt.Server
	log     zerolog.Logger
	authKey keychain.BrokerAuthKey
	limits  Limits
	store   *store // nil without DataDir

	logins *loginGuard // failed logins by source address

	mu       sync.RWMutex
	accounts map[string]Account
	inMemory map[string]bool     // accounts added by AddAccount, which SetAccounts keeps
	revoked  map[string]struct{} // deprovisioned serials, kept in dataDir/RevokedFile
	dataDir  string

	idents     sync.Map // *mqtt.Client -> identity, for connected clients
	connsMu    sync.Mutex
	conns      map[*clientConn]struct{} // open connections, for Close (closeConns)
	guard      pidGuard
	superseded sync.Map // client id -> *mqtt.Client whose session a newer connection took over (takeover.go)

	inline      *Inline
	healthToken string // the password of Check's probe
	listeners   []*connListener
	addrs       map[string]net.Addr
	health      *http.Server
	healthLn    net.Listener
	ws          *wsListener
	wsHandler   *wsListener    // MQTT over WebSocket on the caller's HTTP server (Options.WebSocketHandler)
	wg          sync.WaitGroup // the health server goroutine

	started   atomic.Bool
	closeOnce sync.Once
	closeErr  error

	authFailures, aclDenials, deviceDrops, queueDrops, willsCancelled, lateWills, slowConsumers atomic.Int64
}

// Listener ids, also used as keys of Addr.
const (
	ListenerTCP = "tcp"
	ListenerTLS = "tls"
	ListenerWS  = "ws"
	// ListenerWSHTTP is MQTT over WebSocket through WebSocketHandler, on another HTTP
	// server (the dashboard's).
	ListenerWSHTTP = "ws-http"
	ListenerHealth = "health"
)

// New builds a broker and binds its listeners, so that Addr works before Start; nothing
// is accepted until Start. New opens the store in Options.DataDir if set.
func New(opts Options) (*Broker, error) {
	if opts.AuthKey == (keychain.BrokerAuthKey{}) {
		return nil, fmt.Errorf("%w: AuthKey is zero; set it to keychain.RootSecret.BrokerAuth()", ErrBadOptions)
	}
	if opts.Limits.WriteDeadline < 0 || opts.Limits.MaxPending < 0 {
		return nil, fmt.Errorf("%w: Limits.WriteDeadline and Limits.MaxPending must not be negative (0 takes the default)", ErrBadOptions)
	}
	opts.Limits.setDefaults()
	b := &Broker{
		log:      opts.Logger.With().Str("component", "broker").Logger(),
		authKey:  opts.AuthKey,
		limits:   opts.Limits,
		accounts: make(map[string]Account),
		logins:   newLoginGuard(),
		revoked:  make(map[string]struct{}),
		addrs:    make(map[string]net.Addr),
		conns:    make(map[*clientConn]struct{}),
	}
	b.inline = &Inline{b: b, shared: make(map[string]int)}
	b.healthToken = rand.Text()
	if err := b.SetAccounts(opts.Accounts); err != nil {
		return nil, err
	}

	b.srv = newMochi(opts)
	b.guard.b = b

	ok := false
	defer func() {
		if !ok {
			b.closeListeners()
			if b.store != nil {
				_ = b.store.Stop()
			}
		}
	}()

	if err := b.srv.AddHook(&hook{b: b}, nil); err != nil {
		return nil, fmt.Errorf("broker: adding auth hook: %w", err)
	}
	if opts.DataDir != "" {
		if err := b.openStore(opts.DataDir); err != nil {
			return nil, err
		}
	}

	if err := b.listen(opts); err != nil {
		return nil, err
	}
	ok = true
	return b, nil
}

// newMochi is the MQTT server the broker wraps, configured from opts.
func newMochi(opts Options) *mqtt.Server {
	caps := mqtt.NewDefaultServerCapabilities() // a partial literal would make mochi refuse clients
	// 0 disables mochi's forced expiry: retained images and keys must live until replaced,
	// and queued deliveries until acknowledged. Clients' own v5 expiry still applies.
	caps.MaximumMessageExpiryInterval = 0
	caps.MaximumPacketSize = opts.Limits.MaxPacketSize
	caps.MaximumInflight = opts.Limits.MaxInflight
	if opts.Limits.MaxClients > 0 {
		caps.MaximumClients = opts.Limits.MaxClients
	}
	sysInterval := int64(opts.Limits.SysInterval / time.Second)
	if sysInterval < 1 {
		sysInterval = 1
	}
	mochiLog := opts.Logger.With().Str("component", "mochi").Logger()
	return mqtt.New(&mqtt.Options{
		Capabilities: caps,
		InlineClient: true, // Inline
		// Every connection is a clientConn, whose Write never blocks: deliveries are
		// written by the publishing goroutine, with no write loop or queue per client
		// (third_party/mochi, docs/BROKER.md "The patched mochi").
		WritesNeverBlock:       true,
		Logger:                 slog.New(redactHandler{zerolog.NewSlogHandler(mochiLog)}),
		SysTopicResendInterval: sysInterval,
	})
}

// openStore loads the revocations kept in dir and opens the session store there.
func (b *Broker) openStore(dir string) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("broker: creating data directory: %w", err)
	}
	revoked, err := loadRevoked(dir)
	if err != nil {
		return err
	}
	b.revoked = revoked
	b.dataDir = dir
	st, cfg := newStore(filepath.Join(dir, "mqtt"), b.log)
	if err := b.srv.AddHook(st, &cfg); err != nil {
		return fmt.Errorf("broker: opening session store in %s (is another broker using it?): %w", dir, err)
	}
	b.store = st
	return nil
}

func (b *Broker) listen(opts Options) error {
	addTCP := func(id, addr string, tlsConf *tls.Config) error {
		ln, err := net.Listen("tcp", addr)
		if err != nil {
			return fmt.Errorf("broker: %s listener on %s: %w", id, addr, err)
		}
		if tlsConf != nil {
			ln = tls.NewListener(ln, tlsConf)
		}
		cl := newConnListener(ln, b.limits.ConnectTimeout, b.wrapConn)
		b.listeners = append(b.listeners, cl)
		b.addrs[id] = ln.Addr()
		return b.srv.AddListener(listeners.NewNet(id, cl))
	}
	if opts.TCPAddr != "-" {
		addr := opts.TCPAddr
		if addr == "" {
			addr = DefaultTCPAddr
		}
		if err := addTCP(ListenerTCP, addr, nil); err != nil {
			return err
		}
	}
	var tlsConf *tls.Config
	if len(opts.TLSCertPEM) > 0 || len(opts.TLSKeyPEM) > 0 {
		cert, err := tls.X509KeyPair(opts.TLSCertPEM, opts.TLSKeyPEM)
		if err != nil {
			return fmt.Errorf("%w: TLS certificate and key: %v", ErrBadOptions, err)
		}
		tlsConf = &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
		if len(opts.ClientCAPEM) > 0 {
			pool := x509.NewCertPool()
			if !pool.AppendCertsFromPEM(opts.ClientCAPEM) {
				return fmt.Errorf("%w: ClientCAPEM holds no PEM certificate", ErrBadOptions)
			}
			tlsConf.ClientCAs = pool
			// Devices without a certificate may still use their password over TLS.
			tlsConf.ClientAuth = tls.VerifyClientCertIfGiven
		}
		addr := opts.TLSAddr
		if addr == "" {
			addr = DefaultTLSAddr
		}
		if err := addTCP(ListenerTLS, addr, tlsConf); err != nil {
			return err
		}
	} else if len(opts.ClientCAPEM) > 0 {
		return fmt.Errorf("%w: ClientCAPEM needs a TLS listener; set TLSCertPEM and TLSKeyPEM", ErrBadOptions)
	}
	if opts.WebSocketHandler {
		b.wsHandler = newWSListener(ListenerWSHTTP, nil, b.limits.ConnectTimeout, b.wrapConn)
		if err := b.srv.AddListener(b.wsHandler); err != nil {
			return err
		}
	}
	if opts.WSAddr != "" {
		ln, err := net.Listen("tcp", opts.WSAddr)
		if err != nil {
			return fmt.Errorf("broker: websocket listener on %s: %w", opts.WSAddr, err)
		}
		b.addrs[ListenerWS] = ln.Addr()
		b.ws = newWSListener(ListenerWS, ln, b.limits.ConnectTimeout, b.wrapConn)
		if err := b.srv.AddListener(b.ws); err != nil {
			return err
		}
	}
	if opts.HealthAddr != "" {
		ln, err := net.Listen("tcp", opts.HealthAddr)
		if err != nil {
			return fmt.Errorf("broker: health listener on %s: %w", opts.HealthAddr, err)
		}
		b.healthLn = ln
		b.addrs[ListenerHealth] = ln.Addr()
		mux := http.NewServeMux()
		mux.HandleFunc("GET /healthz", b.serveHealth)
		b.health = &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	}
	return nil
}

// wrapConn wraps an accepted connection for mochi (clientConn): writes that never block,
// and slow consumers cut off.
func (b *Broker) wrapConn(c net.Conn) *clientConn {
	cc := newClientConn(c, b.limits.MaxPending, b.limits.WriteDeadline, b.slowConsumer)
	b.connsMu.Lock()
	b.conns[cc] = struct{}{}
	b.connsMu.Unlock()
	cc.onClose = func() {
		b.connsMu.Lock()
		delete(b.conns, cc)
		b.connsMu.Unlock()
	}
	return cc
}

// closeConns closes the socket of every connection still open. Close calls it once the
// clients were asked to go: a connection that mochi no longer lists (seen once in a
// reconnect storm before a shutdown) would otherwise keep its reader, and mochi's Close
// waits for every reader.
func (b *Broker) closeConns() {
	b.connsMu.Lock()
	left := make([]*clientConn, 0, len(b.conns))
	for cc := range b.conns {
		left = append(left, cc)
	}
	b.connsMu.Unlock()
	for _, cc := range left {
		_ = cc.Conn.Close()
	}
	if len(left) > 0 {
		b.log.Warn().Int("connections", len(left)).Msg("closed connections that had not ended at shutdown")
	}
}

// slowConsumer counts and logs a client cut off by its clientConn.
func (b *Broker) slowConsumer(c *clientConn, err error) {
	b.slowConsumers.Add(1)
	c.mu.Lock()
	client := c.client
	c.mu.Unlock()
	ev := b.log.Warn().Str("client", client).Str("remote", c.RemoteAddr().String())
	var sc *SlowConsumerError
	if errors.As(err, &sc) {
		ev = ev.Str("reason", sc.Reason).Int("pending_bytes", sc.Pending)
	}
	ev.Msg("slow consumer disconnected: it did not read what it was sent")
}

func (b *Broker) serveHealth(w http.ResponseWriter, _ *http.Request) {
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	if !b.started.Load() {
		w.WriteHeader(http.StatusServiceUnavailable)
		fmt.Fprintln(w, "starting")
		return
	}
	fmt.Fprintln(w, "ok")
}

// Start loads the store and starts accepting connections. It returns at once.
func (b *Broker) Start() error {
	if err := b.srv.Serve(); err != nil {
		return fmt.Errorf("broker: starting: %w", err)
	}
	if b.health != nil {
		b.wg.Add(1)
		go func() {
			defer b.wg.Done()
			if err := b.health.Serve(b.healthLn); err != nil && !errors.Is(err, http.ErrServerClosed) {
				b.log.Error().Err(err).Msg("health endpoint stopped")
			}
		}()
	}
	b.started.Store(true)
	b.log.Info().Interface("addrs", b.addrStrings()).Msg("broker started")
	return nil
}

// Close disconnects every client, stops the listeners, waits for the goroutines the
// broker started, and closes the store. It is safe to call more than once.
func (b *Broker) Close() error {
	b.closeOnce.Do(func() {
		if b.health != nil {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			_ = b.health.Shutdown(ctx)
			cancel()
			if !b.started.Load() {
				b.healthLn.Close()
			}
		}
		// Stop accepting first and wait for the accept loops to return, so that no
		// connection starts being established while mochi closes: mochi v2.7.9 races
		// there (upstream issue #541, seen under -race).
		if b.started.Load() {
			for _, l := range b.listeners {
				_ = l.Close()
				l.wait(time.Second)
				l.settle(time.Second)
			}
			if b.ws != nil {
				_ = b.ws.ln.Close()
				b.ws.wait()
			}
		}
		// Disconnect every client and wait for their goroutines before mochi's Close,
		// so that clean sessions have ended and nothing writes to mochi's client map
		// while it closes. (Upstream v2.7.9's Clients.GetByListener took its read lock
		// twice and deadlocked against such a write; third_party/mochi fixes it.)
		if b.started.Load() {
			for _, cl := range b.srv.Clients.GetAll() {
				if !cl.Net.Inline && !cl.Closed() {
					_ = b.srv.DisconnectClient(cl, packets.ErrServerShuttingDown)
				}
			}
			// Wait (not on mochi's ClientsWg, whose Add races with Wait, upstream #424)
			// until every connection has ended and every clean session is deleted.
			deadline := time.Now().Add(5 * time.Second)
			for b.clientsEnding() && time.Now().Before(deadline) {
				time.Sleep(5 * time.Millisecond)
			}
			b.closeConns()
		}
		// mochi closes its listeners (already closed), disconnects clients (none left)
		// and waits for their goroutines, then stops the hooks (closing the store).
		b.closeErr = b.srv.Close()
		b.wg.Wait()
		b.started.Store(false)
		b.log.Info().Msg("broker stopped")
	})
	return b.closeErr
}

func (b *Broker) closeListeners() {
	for _, l := range b.listeners {
		_ = l.Close()
	}
	if b.ws != nil {
		_ = b.ws.ln.Close()
	}
	if b.healthLn != nil {
		_ = b.healthLn.Close()
	}
}

// WebSocketHandler returns the handler of MQTT over WebSocket (Options.WebSocketHandler),
// nil without one. Its clients authenticate and are authorized as on any listener.
func (b *Broker) WebSocketHandler() http.Handler {
	if b.wsHandler == nil {
		return nil
	}
	return http.HandlerFunc(b.wsHandler.handle)
}

// Addr returns the bound address of a listener (ListenerTCP, ListenerTLS, ListenerWS,
// ListenerHealth), or nil if it is not enabled. With port 0 in Options, this is how to
// learn the port.
func (b *Broker) Addr(listener string) net.Addr { return b.addrs[listener] }

func (b *Broker) addrStrings() map[string]string {
	m := make(map[string]string, len(b.addrs))
	for k, v := range b.addrs {
		m[k] = v.String()
	}
	return m
}

// AddAccount adds or replaces an account in memory (not in the accounts file). The
// embedded updater uses it with a random password at startup.
func (b *Broker) AddAccount(a Account) error {
	if err := a.validate(); err != nil {
		return err
	}
	b.mu.Lock()
	b.accounts[a.Username] = a
	if b.inMemory == nil {
		b.inMemory = map[string]bool{}
	}
	b.inMemory[a.Username] = true
	b.mu.Unlock()
	return nil
}

// SetAccounts replaces the accounts with those of the accounts file (as `sealcast
// accounts` changed it), keeping the ones AddAccount added. New connections use them at
// once; connected clients stay connected.
func (b *Broker) SetAccounts(accounts []Account) error {
	m := make(map[string]Account, len(accounts))
	for _, a := range accounts {
		if err := a.validate(); err != nil {
			return err
		}
		m[a.Username] = a
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	for name := range b.inMemory {
		m[name] = b.accounts[name]
	}
	b.accounts = m
	return nil
}

// IsAccount reports whether name is the name of an account (not a device), so that the
// updater provisions no device under it (PROTOCOL.md [SC-2.2]).
func (b *Broker) IsAccount(name string) bool {
	_, ok := b.account([]byte(name))
	return ok
}

func (b *Broker) account(username []byte) (Account, bool) {
	b.mu.RLock()
	a, ok := b.accounts[string(username)]
	b.mu.RUnlock()
	return a, ok
}

// RevokedFile is the file in Options.DataDir that keeps revoked serials across restarts.
const RevokedFile = "revoked.json"

// Revoke refuses the device with this serial from now on and disconnects it if it is
// connected (a deprovisioned device, PROTOCOL.md 12.1). With Options.DataDir the set is
// written to RevokedFile before Revoke returns, so it survives a restart; an error means
// it was not written, and the serial is not revoked.
func (b *Broker) Revoke(serial string) error {
	b.mu.Lock()
	_, had := b.revoked[serial]
	b.revoked[serial] = struct{}{}
	if err := b.saveRevokedLocked(); err != nil {
		if !had {
			delete(b.revoked, serial)
		}
		b.mu.Unlock()
		return err
	}
	b.mu.Unlock()
	if cl, ok := b.srv.Clients.Get(serial); ok && !cl.Closed() {
		if id := b.identityOf(cl); id.role == RoleDevice && id.serial == serial {
			b.log.Info().Str("serial", serial).Msg("disconnecting revoked device")
			_ = b.srv.DisconnectClient(cl, packets.ErrNotAuthorized)
		}
	}
	return nil
}

// Unrevoke lets a revoked serial connect again (a serial provisioned anew). Like Revoke,
// it is written to RevokedFile before it returns.
func (b *Broker) Unrevoke(serial string) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if _, ok := b.revoked[serial]; !ok {
		return nil
	}
	delete(b.revoked, serial)
	if err := b.saveRevokedLocked(); err != nil {
		b.revoked[serial] = struct{}{}
		return err
	}
	return nil
}

// saveRevokedLocked writes the revoked set to RevokedFile (with DataDir). b.mu is held.
func (b *Broker) saveRevokedLocked() error {
	if b.dataDir == "" {
		return nil
	}
	serials := make([]string, 0, len(b.revoked))
	for s := range b.revoked {
		serials = append(serials, s)
	}
	slices.Sort(serials)
	data, _ := json.Marshal(revokedDoc{Revoked: serials})
	if err := atomicfile.Write(filepath.Join(b.dataDir, RevokedFile), append(data, '\n'), 0o600); err != nil {
		return fmt.Errorf("broker: saving revoked serials: %w", err)
	}
	return nil
}

type revokedDoc struct {
	Revoked []string `json:"revoked"`
}

// loadRevoked reads RevokedFile from dir, if there is one.
func loadRevoked(dir string) (map[string]struct{}, error) {
	m := map[string]struct{}{}
	data, err := os.ReadFile(filepath.Join(dir, RevokedFile))
	if errors.Is(err, fs.ErrNotExist) {
		return m, nil
	}
	if err != nil {
		return nil, fmt.Errorf("broker: reading revoked serials: %w", err)
	}
	var doc revokedDoc
	if err := json.Unmarshal(data, &doc); err != nil {
		return nil, fmt.Errorf("broker: reading %s: %w", filepath.Join(dir, RevokedFile), err)
	}
	for _, s := range doc.Revoked {
		m[s] = struct{}{}
	}
	return m, nil
}

func (b *Broker) isRevoked(serial string) bool {
	b.mu.RLock()
	_, ok := b.revoked[serial]
	b.mu.RUnlock()
	return ok
}

// Stats are counters since New; mochi's own figures are also on $SYS/broker/#.
type Stats struct {
	Connected    int64 // clients connected now
	Sessions     int64 // sessions known, connected or not
	AuthFailures int64 // CONNECTs refused
	ACLDenials   int64 // subscriptions, publishes and deliveries refused by [SC-9.2]
	// Dropped deliveries, by cause: a client's outbound queue was full (always 0 now:
	// deliveries are written directly, with no queue; docs/BROKER.md), a session's
	// inflight store was full (Limits.MaxInflight)
	// or packet ids ran out, a device's queue was full (Limits.DeviceMaxInflight).
	DroppedQueueFull   int64
	DroppedInflight    int64
	DroppedDeviceQueue int64
	// DeliveriesRestored counts outbound QoS 1 deliveries that a client's own PUBLISH
	// with the same packet id would have erased (mochi issues #519/#545).
	DeliveriesRestored int64
	// WillsCancelled counts device wills ("offline") turned into "online" because a new
	// connection of the same device took over the session first; LateWills counts those
	// already on their way, answered with "online" for the new connection.
	WillsCancelled int64
	LateWills      int64
	// SlowConsumers counts clients disconnected because they did not read what they were
	// sent (Limits.WriteDeadline, Limits.MaxPending).
	SlowConsumers int64
}

// Stats returns the broker's counters.
func (b *Broker) Stats() Stats {
	return Stats{
		Connected:          atomic.LoadInt64(&b.srv.Info.ClientsConnected),
		Sessions:           int64(b.srv.Clients.Len()),
		AuthFailures:       b.authFailures.Load(),
		ACLDenials:         b.aclDenials.Load(),
		DroppedQueueFull:   b.queueDrops.Load(),
		DroppedInflight:    atomic.LoadInt64(&b.srv.Info.InflightDropped),
		DroppedDeviceQueue: b.deviceDrops.Load(),
		DeliveriesRestored: b.guard.restored.Load(),
		WillsCancelled:     b.willsCancelled.Load(),
		LateWills:          b.lateWills.Load(),
		SlowConsumers:      b.slowConsumers.Load(),
	}
}

// clientsEnding reports whether a client connection is still open, or a clean session
// still waits for mochi to delete it.
func (b *Broker) clientsEnding() bool {
	for _, cl := range b.srv.Clients.GetAll() {
		if cl.Net.Inline {
			continue
		}
		if !cl.Closed() || sessionEnds(cl) && !cl.IsTakenOver() {
			return true
		}
	}
	return false
}
