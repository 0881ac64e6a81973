package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/mattn/go-isatty"

	"github.com/sealcast/sealcast/keychain"
	"github.com/sealcast/sealcast/operator"
	"github.com/sealcast/sealcast/protocol"
)

// clientFlags are the flags of every command that talks to a running service over its
// broker, as any MQTT client could (PROTOCOL.md 12 and 13).
type clientFlags struct {
	broker, user, password, ca string
	cert, key                  string
	timeout                    time.Duration
}

func (c *clientFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&c.broker, "broker", "tcp://127.0.0.1:1883", "MQTT broker of the service: tcp://host:1883, or ssl://host:8883 for TLS")
	fs.StringVar(&c.user, "user", "admin", "account on the broker (the admin role can do everything; a monitor account can only read status)")
	fs.StringVar(&c.password, "password", "", "password of -user; prefer the environment: export SEALCAST_PASSWORD=... (serve prints it on first start)")
	fs.StringVar(&c.ca, "ca", "", "PEM CA bundle to verify the broker's TLS certificate (ssl:// URLs; default: the system's roots)")
	fs.StringVar(&c.cert, "cert", "", "PEM client certificate to present to the broker (ssl:// URLs, with -key), for a broker that asks for one")
	fs.StringVar(&c.key, "key", "", "PEM private key of -cert")
	fs.DurationVar(&c.timeout, "timeout", 30*time.Second, "how long to wait for the connection and for each reply of the service")
}

// clientHelp is appended to the help of every client command.
const clientHelp = `
The client flags (-broker, -user, -password, -ca, -timeout) have environment twins
SEALCAST_BROKER, SEALCAST_USER, SEALCAST_PASSWORD, SEALCAST_CA and SEALCAST_TIMEOUT.`

// dial connects to the broker as the configured user.
func (c *clientFlags) dial(ctx context.Context) (*operator.Client, error) {
	if c.password == "" {
		return nil, usagef("no password: export SEALCAST_PASSWORD (serve prints the admin password on its first start) or pass -password")
	}
	if c.timeout <= 0 {
		return nil, usagef("-timeout must be positive (got %s)", c.timeout)
	}
	url := c.broker
	if !strings.Contains(url, "://") {
		url = "tcp://" + url
	}
	o := operator.Options{URL: url, Username: c.user, Password: c.password, Timeout: c.timeout}
	var err error
	if o.TLS, err = clientTLS(c.ca, c.cert, c.key, "-ca", "-cert", "-key"); err != nil {
		return nil, err
	}
	dctx, cancel := context.WithTimeout(ctx, c.timeout)
	defer cancel()
	op, err := operator.Dial(dctx, o)
	if errors.Is(err, context.DeadlineExceeded) {
		return nil, exitCodeError{fmt.Errorf("connecting to %s: no answer within %s (is the service running there?)", url, c.timeout), exitConnect}
	}
	if err != nil {
		return nil, exitCodeError{err, exitConnect}
	}
	return op, nil
}

// clientTLS is the TLS configuration of a client: the broker's CA bundle caFile (none:
// the system's roots) and a client certificate certFile with its key keyFile (none: no
// certificate); nil when none is given. The flag names are for the errors.
func clientTLS(caFile, certFile, keyFile, caFlag, certFlag, keyFlag string) (*tls.Config, error) {
	if caFile == "" && certFile == "" && keyFile == "" {
		return nil, nil
	}
	conf := &tls.Config{MinVersion: tls.VersionTLS12}
	if caFile != "" {
		pem, err := os.ReadFile(caFile)
		if err != nil {
			return nil, fmt.Errorf("reading %s: %w", caFlag, err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("%s %s holds no PEM certificate", caFlag, caFile)
		}
		conf.RootCAs = pool
	}
	if (certFile == "") != (keyFile == "") {
		return nil, usagef("give %s and %s together", certFlag, keyFlag)
	}
	if certFile != "" {
		pair, err := tls.LoadX509KeyPair(certFile, keyFile)
		if err != nil {
			return nil, fmt.Errorf("reading %s and %s: %w", certFlag, keyFlag, err)
		}
		conf.Certificates = []tls.Certificate{pair}
	}
	return conf, nil
}

// adminError rewords the errors of admin requests for a person at a terminal. A refusal
// by the service reads "<code>: <message>", its stable code first (PROTOCOL.md 15.2).
func adminError(err error) error {
	if errors.Is(err, operator.ErrNoReply) {
		return exitCodeError{errors.New("no reply from the service in time (is `sealcast serve` running and connected to this broker? raise -timeout for a slow store)"), exitTimeout}
	}
	return err
}

// resolveRelease turns a release id, or an unambiguous prefix of one, into an id.
func resolveRelease(ctx context.Context, op *operator.Client, s string) (keychain.ReleaseID, error) {
	if id, err := keychain.ParseReleaseID(s); err == nil {
		return id, nil
	}
	if s == "" || len(s) > 32 || strings.Trim(s, "0123456789abcdef") != "" {
		return keychain.ReleaseID{}, fmt.Errorf("%q is not a release id: give its 32 lowercase hex digits, or a prefix of them", s)
	}
	var list protocol.ReleaseListResult
	if err := op.Do(ctx, protocol.CmdReleaseList, nil, &list); err != nil {
		return keychain.ReleaseID{}, adminError(err)
	}
	var found []keychain.ReleaseID
	for _, r := range list.Releases {
		if strings.HasPrefix(r.Release.String(), s) {
			found = append(found, r.Release)
		}
	}
	switch len(found) {
	case 0:
		return keychain.ReleaseID{}, fmt.Errorf("no release id starts with %q (sealcast status lists them)", s)
	case 1:
		return found[0], nil
	}
	return keychain.ReleaseID{}, fmt.Errorf("%d release ids start with %q; give more digits", len(found), s)
}

// positional returns a command's positional arguments, parsing flags that follow them
// too: "sealcast cancel 4f1c -json" works like "sealcast cancel -json 4f1c". After "--"
// everything is positional.
func positional(fs *flag.FlagSet, args []string) ([]string, error) {
	var pos []string
	for len(args) > 0 {
		switch a := args[0]; {
		case a == "--":
			return append(pos, args[1:]...), nil
		case len(a) < 2 || a[0] != '-':
			pos, args = append(pos, a), args[1:]
		default:
			if err := fs.Parse(args); err != nil {
				if errors.Is(err, flag.ErrHelp) {
					return nil, err
				}
				return nil, usagef("%v; run with -h for help", err)
			}
			args = fs.Args()
		}
	}
	return pos, nil
}

// isTerminal reports whether w is a terminal, for progress bars and redrawn screens.
func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	return ok && (isatty.IsTerminal(f.Fd()) || isatty.IsCygwinTerminal(f.Fd()))
}

// printJSON writes v as indented JSON and a newline.
func printJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}
