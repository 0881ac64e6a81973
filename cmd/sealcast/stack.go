package main

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/rs/zerolog"

	"github.com/sealcast/sealcast/broker"
	"github.com/sealcast/sealcast/internal/datadir"
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
	publicURL                       string
	chainLength                     uint
	ackGroup                        string
	acksOnly                        bool
}

// stack is a running service.
type stack struct {
	dir       *datadir.Dir
	broker    *broker.Broker // nil with an external broker
	store     updater.Store
	bus       *mqttbus.Bus
	upd       *updater.Updater
	http      *http.Server
	httpAddr  net.Addr
	brokerURL string // where local clients reach the broker
	adminPW   string // set when this start created the admin account
	cancel    context.CancelFunc
	done      chan error
	log       zerolog.Logger
}

func startStack(ctx context.Context, c stackConfig, log zerolog.Logger) (s *stack, err error) {
	s = &stack{log: log, done: make(chan error, 1)}
	defer func() {
		if err != nil {
			s.close()
		}
	}()
	if s.dir, err = datadir.Open(c.dataDir); err != nil {
		return nil, err
	}
	if s.dir.Created {
		log.Info().Str("data", c.dataDir).Msg("created a new data directory: back up root.key and release.key; losing them strands every device")
	}

	if c.redisURL != "" {
		rs, err := redisstore.Open(c.redisURL)
		if err != nil {
			return nil, err
		}
		s.store = rs
	} else {
		bs, err := boltstore.Open(s.dir.File("sealcast.db"), boltstore.Options{})
		if err != nil {
			return nil, err
		}
		s.store = bs
	}

	busUser, busPW := c.brokerUser, c.brokerPW
	if c.brokerURL == "" {
		if busPW, err = s.startBroker(c); err != nil {
			return nil, err
		}
		busUser = updaterUser
	} else {
		s.brokerURL = c.brokerURL
	}
	publicURL := c.publicURL
	if publicURL == "" {
		publicURL = s.brokerURL
	}

	// Acks arrive through a shared subscription spread over several connections, so that
	// a burst of acks fills several of the broker's per-client queues instead of
	// overflowing one (mqttbus package comment). The embedded broker supports shared
	// subscriptions; with another broker that is the operator's call (-ack-group).
	ackGroup, subscribers := c.ackGroup, 1
	if ackGroup == "" && c.brokerURL == "" {
		ackGroup = "sealcast"
	}
	if ackGroup != "" {
		subscribers = 4
	}
	bctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	host, _ := os.Hostname()
	if s.bus, err = mqttbus.Dial(bctx, mqttbus.Options{
		URL: s.brokerURL, ClientID: fmt.Sprintf("sealcast-updater-%s-%d", host, os.Getpid()),
		Username: busUser, Password: busPW, Logger: log.With().Str("component", "mqtt").Logger(),
		Subscribers: subscribers,
	}); err != nil {
		return nil, err
	}
	uo := updater.Options{
		Root: s.dir.Root, SigningKey: s.dir.SigningKey, Store: s.store, Bus: s.bus,
		Logger: log.With().Str("component", "updater").Logger(), DataDir: c.dataDir,
		ChainLength: uint32(c.chainLength), BrokerURL: publicURL, AckGroup: ackGroup, AcksOnly: c.acksOnly,
	}
	if s.broker != nil {
		uo.Revoker = s.broker
	}
	if s.upd, err = updater.New(uo); err != nil {
		return nil, err
	}
	rctx, rcancel := context.WithCancel(context.Background())
	s.cancel = rcancel
	go func() { s.done <- s.upd.Run(rctx) }()

	if c.httpAddr != "" {
		if err := s.startHTTP(c.httpAddr); err != nil {
			return nil, err
		}
	}
	return s, nil
}

const updaterUser = "sealcast-updater"

// startBroker starts the embedded broker and returns the in-memory password of the
// updater's own account.
func (s *stack) startBroker(c stackConfig) (string, error) {
	accountsPath := s.dir.File(broker.AccountsFile)
	accounts, err := broker.LoadAccounts(accountsPath)
	if errors.Is(err, fs.ErrNotExist) {
		pw, gerr := broker.GeneratePassword()
		if gerr != nil {
			return "", gerr
		}
		admin, aerr := broker.NewAccount("admin", broker.RoleAdmin, pw)
		if aerr != nil {
			return "", aerr
		}
		if err := broker.SaveAccounts(accountsPath, []broker.Account{admin}); err != nil {
			return "", err
		}
		accounts, s.adminPW, err = []broker.Account{admin}, pw, nil
	}
	if err != nil {
		return "", err
	}
	o := broker.Options{
		TCPAddr: c.listen, WSAddr: c.wsListen, DataDir: filepath.Join(s.dir.Path, "broker"),
		AuthKey: s.dir.Root.BrokerAuth(), Accounts: accounts,
		Logger: s.log, // the broker names its own components
	}
	if c.tlsCert != "" || c.tlsKey != "" {
		if o.TLSCertPEM, err = os.ReadFile(c.tlsCert); err != nil {
			return "", fmt.Errorf("reading -tls-cert: %w", err)
		}
		if o.TLSKeyPEM, err = os.ReadFile(c.tlsKey); err != nil {
			return "", fmt.Errorf("reading -tls-key: %w", err)
		}
		o.TLSAddr = c.tlsListen
		if c.clientCA != "" {
			if o.ClientCAPEM, err = os.ReadFile(c.clientCA); err != nil {
				return "", fmt.Errorf("reading -client-ca: %w", err)
			}
		}
	}
	if s.broker, err = broker.New(o); err != nil {
		return "", err
	}
	pw, err := broker.GeneratePassword()
	if err != nil {
		return "", err
	}
	acct, err := broker.NewAccount(updaterUser, broker.RoleUpdater, pw)
	if err != nil {
		return "", err
	}
	if err := s.broker.AddAccount(acct); err != nil {
		return "", err
	}
	if err := s.broker.Start(); err != nil {
		return "", err
	}
	_, port, _ := net.SplitHostPort(s.broker.Addr("tcp").String())
	s.brokerURL = "tcp://127.0.0.1:" + port
	return pw, nil
}

func (s *stack) startHTTP(addr string) error {
	reg := prometheus.NewRegistry()
	reg.MustRegister(newCollector(s))
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) {
		ctx, cancel := context.WithTimeout(r.Context(), 2*time.Second)
		defer cancel()
		if _, err := s.store.Serials(ctx); err != nil {
			http.Error(w, "store: "+err.Error(), http.StatusServiceUnavailable)
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

// close stops everything in the order data flows: the updater first (it finishes what it
// is doing), then its connection, the broker, the store.
func (s *stack) close() error {
	var errs []error
	if s.cancel != nil {
		s.cancel()
		if err := <-s.done; err != nil && !errors.Is(err, context.Canceled) {
			errs = append(errs, err)
		}
	}
	if s.http != nil {
		s.http.Close()
	}
	if s.bus != nil {
		s.bus.Close()
	}
	if s.broker != nil {
		errs = append(errs, s.broker.Close())
	}
	if s.store != nil {
		errs = append(errs, s.store.Close())
	}
	return errors.Join(errs...)
}
