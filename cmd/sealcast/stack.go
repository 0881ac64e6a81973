package main

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/rs/zerolog"

	"github.com/sealcast/sealcast/broker"
	"github.com/sealcast/sealcast/dashboard"
	"github.com/sealcast/sealcast/internal/datadir"
	"github.com/sealcast/sealcast/protocol"
	"github.com/sealcast/sealcast/updater"
	"github.com/sealcast/sealcast/updater/boltstore"
	"github.com/sealcast/sealcast/updater/mqttbus"
	"github.com/sealcast/sealcast/updater/redisstore"
)

// stackConfig is what serve (and demo) run: the embedded broker, unless an external one
// is named, and the updater over the embedded store, unless Redis is named.
type stackConfig struct {
	dataDir                         string
	listen, tlsListen, wsListen     string
	tlsCert, tlsKey, clientCA       string
	httpAddr                        string
	redisURL                        string
	brokerURL, brokerUser, brokerPW string
	brokerCA                        string
	publicURL                       string
	chainLength                     uint
	ackGroup                        string
	acksOnly                        bool
	// adminPassword, if set, is the password of the admin account created with the
	// accounts file, instead of a generated one.
	adminPassword string
	pprofAddr     string
	// writeDeadline and maxPending are the embedded broker's slow-consumer limits
	// (broker.Limits); zero takes the broker's defaults.
	writeDeadline time.Duration
	maxPending    int
	// maxConcurrent is the concurrency bound of releases that give none.
	maxConcurrent int
	// scratch: the data directory is thrown away afterwards (demo): no warning about it.
	scratch bool
	// maxUploads bounds the uploads kept at once.
	maxUploads int
	// dashboard serves the fleet dashboard at / of the HTTP listener, with MQTT over
	// WebSocket at /mqtt (embedded broker only).
	dashboard bool
}

// stack is a running service.
type stack struct {
	dir       *datadir.Dir
	broker    *broker.Broker // nil with an external broker
	store     store
	bus       updater.Bus  // the broker's in-process client, or mbus
	mbus      *mqttbus.Bus // nil with the embedded broker
	upd       *updater.Updater
	http      *http.Server
	httpAddr  net.Addr
	pprof     *http.Server // nil without -pprof
	pprofAddr net.Addr
	brokerURL string // where local clients reach the broker
	adminPW   string // set when this start created the admin account with a generated password
	cancel    context.CancelFunc
	done      chan error
	log       zerolog.Logger
	hist      *histograms // the updater's timings, for /metrics
	// stopWatch ends the watch of the accounts file; watched is closed when it ended.
	stopWatch context.CancelFunc
	watched   chan struct{}
}

func startStack(ctx context.Context, c stackConfig, log zerolog.Logger) (_ *stack, err error) {
	// s is not the named result: "return nil, err" must not hide it from the cleanup.
	s := &stack{log: log, done: make(chan error, 1), hist: newHistograms()}
	defer func() {
		if err != nil {
			s.close()
		}
	}()
	if s.dir, err = datadir.Open(c.dataDir); err != nil {
		if errors.Is(err, fs.ErrPermission) {
			err = fmt.Errorf("%w: the data directory must be writable by this process's user, uid %d (in the container image: uid 65532; on the host, chown -R 65532:65532 the directory you mount)", err, os.Getuid())
		}
		return nil, err
	}
	if s.dir.Created {
		abs, _ := filepath.Abs(c.dataDir)
		ev := log.Warn()
		if c.scratch {
			ev = log.Debug()
		}
		ev.Str("data", abs).Msg("created a new data directory here: back up root.key and release.key (losing them strands every device), and never commit it")
	}
	if err := s.openStore(c); err != nil {
		return nil, err
	}
	if err := s.connectBroker(ctx, c); err != nil {
		return nil, err
	}
	if err := s.startUpdater(c); err != nil {
		return nil, err
	}
	if c.httpAddr != "" {
		if err := s.startHTTP(c.httpAddr); err != nil {
			return nil, err
		}
	}
	if c.pprofAddr != "" {
		if err := s.startPprof(c.pprofAddr); err != nil {
			return nil, err
		}
	}
	// Serving starts when the updater answers: an admin request published before it
	// subscribed would be lost. A store that is down keeps it waiting (it retries), and
	// /healthz says so meanwhile.
	select {
	case <-s.upd.Ready():
	case err := <-s.done:
		s.done <- err // close waits for it
		return nil, fmt.Errorf("updater: %w", err)
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	return s, nil
}

// openStore opens Redis if named, else the embedded store in the data directory.
func (s *stack) openStore(c stackConfig) error {
	if c.redisURL != "" {
		rs, err := redisstore.Open(c.redisURL)
		if err != nil {
			return err
		}
		s.store = rs
		return nil
	}
	bs, err := boltstore.Open(s.dir.File("sealcast.db"), boltstore.Options{})
	if err != nil {
		return err
	}
	s.store = bs
	return nil
}

// connectBroker starts the embedded broker, with its in-process client as the updater's
// bus, or connects to the external broker named.
func (s *stack) connectBroker(ctx context.Context, c stackConfig) (err error) {
	if c.brokerCA != "" && c.brokerURL == "" {
		return errors.New("-broker-ca is for an external broker: give -broker ssl://host:8883 too")
	}
	if c.brokerURL == "" {
		if err = s.startBroker(c); err != nil {
			return err
		}
		// With the embedded broker the updater uses its in-process client: no socket,
		// no queue that can drop acks in a burst (broker.Inline).
		s.bus = s.broker.Inline()
		return nil
	}
	s.brokerURL = c.brokerURL
	if c.adminPassword != "" {
		s.log.Warn().Msg("-admin-password is ignored with -external-broker: it sets the embedded broker's admin account; create accounts on the external broker")
	}
	if s.mbus, err = dialExternal(ctx, c, s.log); err != nil {
		return err
	}
	s.bus = s.mbus
	return nil
}

// startUpdater starts the updater over the store and the bus.
func (s *stack) startUpdater(c stackConfig) (err error) {
	publicURL := c.publicURL
	if publicURL == "" {
		publicURL = s.brokerURL
		if a, ok := s.listenAddr().(*net.TCPAddr); ok && !a.IP.IsLoopback() {
			// Listening for other machines (in a container, say), but device files would
			// send devices to their own loopback.
			s.log.Warn().Str("device_files_say", publicURL).Msg("device files name this machine's loopback address, which other machines cannot reach: give -public-url with the address devices dial, e.g. tcp://updates.example.com:1883")
		}
	}
	// With the embedded broker, the acks subscription is shared in group "sealcast" all
	// the same, so that more updaters (-acks-only, over MQTT) can join it
	// (docs/OPERATIONS.md 6.4).
	ackGroup := c.ackGroup
	if c.brokerURL == "" && ackGroup == "" {
		ackGroup = "sealcast"
	}
	uo := updater.Options{
		Root: s.dir.Root, SigningKey: s.dir.SigningKey, KeySeq: s.dir.KeySeq, KeyStatements: s.dir.Statements, KeyStore: s.dir,
		Store: s.store, Bus: s.bus,
		Logger: s.log.With().Str("component", "updater").Logger(), DataDir: c.dataDir,
		ChainLength: uint32(c.chainLength), BrokerURL: publicURL, AckGroup: ackGroup, AcksOnly: c.acksOnly,
		MaxConcurrent: c.maxConcurrent, Observer: s.hist, MaxUploads: c.maxUploads,
	}
	if s.broker != nil {
		uo.Revoker, uo.Accounts = s.broker, s.broker
	} else if c.brokerUser != "" {
		uo.Accounts = accountNames{c.brokerUser: true}
	}
	if s.upd, err = updater.New(uo); err != nil {
		return err
	}
	rctx, rcancel := context.WithCancel(context.Background())
	s.cancel = rcancel
	go func() { s.done <- s.upd.Run(rctx) }()
	if s.broker != nil {
		wctx, wcancel := context.WithCancel(context.Background())
		s.stopWatch, s.watched = wcancel, make(chan struct{})
		go func() {
			defer close(s.watched)
			s.watchAccounts(wctx, s.dir.File(broker.AccountsFile), accountsPoll)
		}()
	}
	return nil
}

// accountsPoll is how often serve looks whether `sealcast accounts` changed the
// accounts file.
const accountsPoll = time.Second

// watchAccounts gives the embedded broker the accounts file's accounts each time the file
// changes (sealcast accounts add, remove, passwd), until ctx ends.
func (s *stack) watchAccounts(ctx context.Context, path string, every time.Duration) {
	stamp := func() (time.Time, int64) {
		fi, err := os.Stat(path)
		if err != nil {
			return time.Time{}, -1
		}
		return fi.ModTime(), fi.Size()
	}
	lastT, lastN := stamp()
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		mt, n := stamp()
		if mt.Equal(lastT) && n == lastN {
			continue
		}
		lastT, lastN = mt, n
		accounts, err := broker.LoadAccounts(path)
		if err == nil {
			err = checkAccounts(ctx, s.store, accounts)
		}
		if err == nil {
			err = s.broker.SetAccounts(accounts)
		}
		if err != nil {
			s.log.Error().Err(err).Str("accounts", path).Msg("the accounts file changed but cannot be used; the accounts before stay")
			continue
		}
		s.log.Info().Str("accounts", path).Int("accounts", len(accounts)).Msg("accounts reloaded")
	}
}

// store is the updater's store, which /healthz also pings.
type store interface {
	updater.Store
	Ping(context.Context) error
}

// dialExternal connects the updater to an external broker. Such a broker may allow one
// connection per username (Mosquitto with use_username_as_clientid, as deploy/mosquitto
// has it), so the bus uses one.
func dialExternal(ctx context.Context, c stackConfig, log zerolog.Logger) (*mqttbus.Bus, error) {
	var busTLS *tls.Config
	if c.brokerCA != "" {
		var err error
		if busTLS, err = caConfig(c.brokerCA); err != nil {
			return nil, err
		}
	}
	bctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	// Unique per process start: two updaters must never take over each other's
	// connection, not even in containers that share a hostname and run as pid 1.
	host, _ := os.Hostname()
	bus, err := mqttbus.Dial(bctx, mqttbus.Options{
		URL: c.brokerURL, ClientID: fmt.Sprintf("sealcast-updater-%s-%d-%s", host, os.Getpid(), rand.Text()[:8]),
		Username: c.brokerUser, Password: c.brokerPW, TLS: busTLS, Logger: log.With().Str("component", "mqtt").Logger(),
		OneConnection: true,
	})
	if err != nil {
		return nil, fmt.Errorf("%w (the external broker comes from -broker or SEALCAST_BROKER; leave both unset to run the embedded broker)", err)
	}
	return bus, nil
}

// caConfig returns a TLS client configuration that trusts only the CAs in the PEM file.
func caConfig(path string) (*tls.Config, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("reading -broker-ca: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(b) {
		return nil, fmt.Errorf("-broker-ca %s holds no PEM certificate", path)
	}
	return &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}, nil
}

// accountNames are the broker accounts the updater knows of when the broker is external:
// its own.
type accountNames map[string]bool

func (n accountNames) IsAccount(name string) bool { return n[name] }

// checkAccounts refuses broker accounts named like a provisioned device: the broker would
// take the device for the account (PROTOCOL.md [SC-2.2]).
func checkAccounts(ctx context.Context, st updater.Store, accounts []broker.Account) error {
	names := make([]string, len(accounts))
	for i, a := range accounts {
		names[i] = a.Username
	}
	devs, err := st.Devices(ctx, names)
	if err != nil {
		return fmt.Errorf("checking the account names against the provisioned devices: %w", err)
	}
	for _, d := range devs {
		if d != nil {
			return fmt.Errorf("account %q has the name of a provisioned device; rename the account (names reserved for accounts: %s, and names beginning with %q)",
				d.Serial, strings.Join(protocol.ReservedNames, ", "), protocol.ReservedPrefix)
		}
	}
	return nil
}

// startBroker starts the embedded broker.
func (s *stack) startBroker(c stackConfig) error {
	accountsPath := s.dir.File(broker.AccountsFile)
	accounts, err := broker.LoadAccounts(accountsPath)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		admin, pw, aerr := s.newAdmin(c.adminPassword)
		if aerr != nil {
			return aerr
		}
		if err := broker.SaveAccounts(accountsPath, []broker.Account{admin}); err != nil {
			return err
		}
		accounts, err = []broker.Account{admin}, nil
		if c.adminPassword == "" {
			s.adminPW = pw
		} else {
			s.log.Info().Str("accounts", accountsPath).Msg("created the admin account with the password of -admin-password")
		}
	case err == nil && c.adminPassword != "":
		if slices.ContainsFunc(accounts, func(a broker.Account) bool { return a.Username == "admin" }) {
			s.log.Info().Str("accounts", accountsPath).Msg("the admin account exists already; -admin-password is ignored and its password is unchanged")
			break
		}
		admin, _, aerr := s.newAdmin(c.adminPassword)
		if aerr != nil {
			return aerr
		}
		if err := broker.AddAccountToFile(accountsPath, admin); err != nil {
			return err
		}
		accounts = append(accounts, admin)
		s.log.Info().Str("accounts", accountsPath).Msg("the accounts file had no admin account; added one with the password of -admin-password")
	}
	if err != nil {
		return err
	}
	if err := checkAccounts(context.Background(), s.store, accounts); err != nil {
		return fmt.Errorf("%s: %w", accountsPath, err)
	}
	o := broker.Options{
		TCPAddr: c.listen, WSAddr: c.wsListen, DataDir: filepath.Join(s.dir.Path, "broker"),
		AuthKey: s.dir.Root.BrokerAuth(), Accounts: accounts,
		Logger:           s.log, // the broker names its own components
		Limits:           broker.Limits{WriteDeadline: c.writeDeadline, MaxPending: c.maxPending},
		WebSocketHandler: c.dashboard && c.httpAddr != "",
	}
	if c.tlsCert != "" || c.tlsKey != "" {
		if o.TLSCertPEM, err = os.ReadFile(c.tlsCert); err != nil {
			return fmt.Errorf("reading -tls-cert: %w", err)
		}
		if o.TLSKeyPEM, err = os.ReadFile(c.tlsKey); err != nil {
			return fmt.Errorf("reading -tls-key: %w", err)
		}
		o.TLSAddr = c.tlsListen
		if c.clientCA != "" {
			if o.ClientCAPEM, err = os.ReadFile(c.clientCA); err != nil {
				return fmt.Errorf("reading -client-ca: %w", err)
			}
		}
	}
	if s.broker, err = broker.New(o); err != nil {
		return err
	}
	if err := s.broker.Start(); err != nil {
		return err
	}
	for _, l := range []string{broker.ListenerTCP, broker.ListenerWS} {
		if a, ok := s.broker.Addr(l).(*net.TCPAddr); ok && !a.IP.IsLoopback() {
			s.log.Warn().Str("listener", l).Str("addr", a.String()).Msg("this plaintext MQTT listener is reachable from other machines: passwords and updates' metadata travel in the clear; give it TLS (-tls-cert, -tls-key, -tls-listen) and keep -listen on 127.0.0.1, or put it on a trusted network")
		}
	}
	_, port, _ := net.SplitHostPort(s.broker.Addr("tcp").String())
	s.brokerURL = "tcp://127.0.0.1:" + port
	return nil
}

// listenAddr is the embedded broker's plain MQTT listener, nil without one.
func (s *stack) listenAddr() net.Addr {
	if s.broker == nil {
		return nil
	}
	return s.broker.Addr(broker.ListenerTCP)
}

// newAdmin returns the account "admin" with password pw, or a generated password if pw is
// empty.
func (s *stack) newAdmin(pw string) (broker.Account, string, error) {
	if pw == "" {
		var err error
		if pw, err = broker.GeneratePassword(); err != nil {
			return broker.Account{}, "", err
		}
	} else if len(pw) < 12 {
		s.log.Warn().Msg("-admin-password is shorter than 12 characters; anyone who reaches the broker can try to guess it")
	}
	a, err := broker.NewAccount("admin", broker.RoleAdmin, pw)
	return a, pw, err
}

func (s *stack) startHTTP(addr string) error {
	reg := prometheus.NewRegistry()
	reg.MustRegister(newCollector(s), s.hist.ack, s.hist.install, buildInfo(),
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	if s.broker != nil {
		if ws := s.broker.WebSocketHandler(); ws != nil {
			mux.Handle("/", dashboard.Handler(ws))
		}
	}
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-s.upd.Ready():
		default:
			http.Error(w, "updater: starting", http.StatusServiceUnavailable)
			return
		}
		if err := s.check(r.Context()); err != nil {
			http.Error(w, err.Error(), http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, "ok")
	})
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("metrics listener: %w", err)
	}
	s.httpAddr = l.Addr()
	s.http = &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	go s.http.Serve(l)
	return nil
}

// check is /healthz: the embedded broker answers MQTT on its listener, the updater's
// connections to an external broker are up, and the store answers, each within 2 s.
func (s *stack) check(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	if s.broker != nil {
		if err := s.broker.Check(ctx); err != nil {
			return err
		}
	}
	if s.mbus != nil {
		if err := s.mbus.Check(); err != nil {
			return fmt.Errorf("updater's broker connection: %w", err)
		}
	}
	if err := s.store.Ping(ctx); err != nil {
		return fmt.Errorf("store: %w", err)
	}
	return nil
}

// close stops everything in the order data flows: the updater first (it finishes what it
// is doing), then its connection, the broker, the store.
func (s *stack) close() error {
	var errs []error
	if s.stopWatch != nil {
		s.stopWatch()
		<-s.watched
	}
	if s.cancel != nil {
		s.cancel()
		if err := <-s.done; err != nil && !errors.Is(err, context.Canceled) {
			errs = append(errs, err)
		}
	}
	if s.http != nil {
		s.http.Close()
	}
	if s.pprof != nil {
		s.pprof.Close()
	}
	if s.mbus != nil {
		s.mbus.Close()
	}
	if s.broker != nil {
		errs = append(errs, s.broker.Close())
	}
	if s.store != nil {
		errs = append(errs, s.store.Close())
	}
	return errors.Join(errs...)
}
