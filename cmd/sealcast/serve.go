package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"

	"github.com/peterbourgon/ff/v3/ffcli"

	"github.com/sealcast/sealcast/broker"
	"github.com/sealcast/sealcast/protocol"
)

// defaultDataDir is where serve keeps its data unless told: the XDG state directory
// ($XDG_STATE_HOME/sealcast, else ~/.local/state/sealcast), so that the fleet's secrets
// never land in a source tree by accident; ./sealcast-data without a home directory.
func defaultDataDir() string {
	if d := os.Getenv("XDG_STATE_HOME"); filepath.IsAbs(d) {
		return filepath.Join(d, "sealcast")
	}
	if home, err := os.UserHomeDir(); err == nil {
		return filepath.Join(home, ".local", "state", "sealcast")
	}
	return "sealcast-data"
}

// defaultHTTPPort is serve's metrics and health port: not Prometheus's own 9090.
const defaultHTTPPort = "9883"

func serveCommand(e *env) *ffcli.Command {
	fs := newFlags("serve", e)
	var c stackConfig
	fs.StringVar(&c.dataDir, "data", defaultDataDir(), "data directory: keys, accounts, the embedded store and broker state (created on first start; outside any repository by default)")
	fs.StringVar(&c.listen, "listen", "127.0.0.1:1883", "MQTT listener of the embedded broker (loopback unless given: 0.0.0.0:1883 or :1883 for every interface, preferably with TLS)")
	fs.StringVar(&c.tlsListen, "tls-listen", "127.0.0.1:8883", "MQTT-over-TLS listener (with -tls-cert and -tls-key; :8883 for every interface)")
	fs.StringVar(&c.tlsCert, "tls-cert", "", "PEM certificate for the TLS listener")
	fs.StringVar(&c.tlsKey, "tls-key", "", "PEM private key for the TLS listener")
	fs.StringVar(&c.clientCA, "client-ca", "", "PEM CA bundle: ask TLS clients for certificates (devices then need no password)")
	fs.StringVar(&c.wsListen, "ws-listen", "", "MQTT-over-WebSocket listener, for browser dashboards (off when empty)")
	fs.StringVar(&c.httpAddr, "http", "127.0.0.1:"+defaultHTTPPort, "HTTP listener for /metrics (Prometheus) and /healthz (off when empty; loopback unless given)")
	fs.StringVar(&c.redisURL, "redis", "", "use Redis as the store: redis://host:6379/0, redis+sentinel://..., redis+cluster://... (default: embedded store in -data)")
	fs.StringVar(&c.brokerURL, "external-broker", "", "run the updater alone against this external MQTT broker, e.g. tcp://mosquitto:1883 (default: the embedded broker); its environment twin is SEALCAST_EXTERNAL_BROKER, not the client commands' SEALCAST_BROKER")
	fs.StringVar(&c.brokerUser, "broker-user", "", "username on the external broker (needs read/write on sealcast/#)")
	fs.StringVar(&c.brokerPW, "broker-password", "", "password on the external broker")
	fs.StringVar(&c.brokerCA, "broker-ca", "", "PEM CA bundle that signed the external broker's TLS certificate (with -external-broker ssl://host:8883; default: the system's roots)")
	fs.StringVar(&c.publicURL, "public-url", "", "broker URL written into device files (default: this machine's listener)")
	fs.UintVar(&c.chainLength, "chain-length", 1024, "key chain length for new devices (a power of two, 16 to 1048576); a re-key keeps the device's length")
	fs.StringVar(&c.ackGroup, "ack-group", "", "share acks with other updaters in this group ($share/<group>/...)")
	fs.BoolVar(&c.acksOnly, "acks-only", false, "process acks only; another updater handles admin requests and releases")
	fs.StringVar(&c.adminPassword, "admin-password", "", "password of the admin account when serve creates it (first start); prefer the environment, SEALCAST_ADMIN_PASSWORD (default: generated and printed once)")
	fs.DurationVar(&c.writeDeadline, "write-deadline", broker.DefaultWriteDeadline, "disconnect a client of the embedded broker that takes no part of 64 KiB written to it within this long (a slow consumer; raise it for very slow links)")
	fs.IntVar(&c.maxPending, "max-pending", broker.DefaultMaxPending, "disconnect a client of the embedded broker once this many bytes wait to be written to it (a slow consumer)")
	fs.IntVar(&c.maxConcurrent, "max-concurrent", protocol.DefaultMaxConcurrent, "the concurrency bound of a release that gives none: at most this many online targets download it at once (-1: no bound; PROTOCOL.md 12.5)")
	fs.BoolVar(&c.dashboard, "dashboard", true, "serve the fleet dashboard at / of -http, with MQTT over WebSocket at /mqtt (embedded broker only; log in with a broker account)")
	fs.IntVar(&c.maxUploads, "max-uploads", 16, "the most unfinished or unused uploads kept at once (each holds a file and its size on disk for up to 24 h)")
	fs.String("config", "", "read flags from this file: one flag a line, its name and value separated by a space (\"listen 0.0.0.0:1883\"), # comments; the command line and SEALCAST_* variables override it")
	fs.StringVar(&c.pprofAddr, "pprof", "", "serve Go profiles on this address at /debug/pprof/ (off when empty; keep it on loopback, e.g. 127.0.0.1:6060)")
	return &ffcli.Command{
		Name:       "serve",
		ShortUsage: "sealcast serve [flags]",
		ShortHelp:  "run the service: embedded MQTT broker, updater and store",
		LongHelp: `Runs the embedded MQTT broker and the updater. On first start it creates the data
directory with the fleet root secret, the release-signing key and an admin account whose
password is printed once, or set by -admin-password (for scripted setups; it never
changes an existing account). With -redis the updater keeps its state in Redis; with
-external-broker it runs alone against an external broker. Stops cleanly on SIGINT or
SIGTERM.

Every listener is on loopback (127.0.0.1) unless given: -listen 0.0.0.0:1883 serves
other machines, and a plaintext listener on an address other machines reach logs a
warning that points to TLS (-tls-cert, -tls-key). Metrics and /healthz are on
127.0.0.1:` + defaultHTTPPort + `.

serve does not read SEALCAST_BROKER, the client commands' broker: with it set in serve's
environment it refuses to start, since an earlier serve read it as "run against an
external broker". Unset it for serve, or give -external-broker.

Every flag can also come from a file given with -config (or SEALCAST_CONFIG), e.g.
  data /var/lib/sealcast
  listen 0.0.0.0:1883
  redis redis://127.0.0.1:6379/0
The command line wins over the environment, which wins over the file.

The log line "sealcast serving" names the addresses actually bound (tcp, tls, ws, http),
so that port 0 works: -listen 127.0.0.1:0.`,
		FlagSet: fs,
		Exec: func(ctx context.Context, args []string) error {
			if len(args) > 0 {
				return usagef("serve takes no arguments (got %q)", args)
			}
			if v := os.Getenv("SEALCAST_BROKER"); v != "" {
				return usagef("SEALCAST_BROKER=%s is set: that is the client commands' broker, and serve does not read it; unset it for serve (env -u SEALCAST_BROKER sealcast serve), or give -external-broker %s to run against that broker", v, v)
			}
			if c.writeDeadline < 0 || c.maxPending < 0 {
				return fmt.Errorf("-write-deadline and -max-pending must not be negative")
			}
			if c.maxConcurrent == 0 || c.maxConcurrent < protocol.NoBound {
				return fmt.Errorf("-max-concurrent %d: give a bound, or -1 for none", c.maxConcurrent)
			}
			log := e.logger()
			s, err := startStack(ctx, c, log)
			if err != nil {
				return err
			}
			if s.adminPW != "" {
				fmt.Fprintf(e.stderr, "\nCreated the admin account. Its password is shown only this once:\n\n"+
					"    export SEALCAST_USER=admin SEALCAST_PASSWORD='%s'\n\n", s.adminPW)
			}
			ev := log.Info().Str("mqtt", s.brokerURL).Str("data", c.dataDir)
			if s.broker != nil {
				for _, l := range []string{broker.ListenerTCP, broker.ListenerTLS, broker.ListenerWS} {
					if a := s.broker.Addr(l); a != nil {
						ev = ev.Str(l, a.String())
					}
				}
			}
			if s.httpAddr != nil {
				ev = ev.Str("http", s.httpAddr.String())
			}
			if s.pprofAddr != nil {
				ev = ev.Str("pprof", s.pprofAddr.String())
			}
			ev.Msg("sealcast serving; stop with Ctrl-C")
			select {
			case <-ctx.Done():
				log.Info().Msg("stopping")
			case err := <-s.done:
				s.done <- err // close waits for it
				log.Error().Err(err).Msg("updater stopped")
			}
			return s.close()
		},
	}
}
