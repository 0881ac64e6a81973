package scaleout_test

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/sealcast/sealcast/broker"
	"github.com/sealcast/sealcast/internal/testkit/brokertest"
	"github.com/sealcast/sealcast/internal/testkit/mosquittotest"
	"github.com/sealcast/sealcast/internal/testkit/redistest"
	"github.com/sealcast/sealcast/internal/testkit/testca"
	"github.com/sealcast/sealcast/operator"
	"github.com/sealcast/sealcast/protocol"
)

// TestExternalBrokerTLS runs the updater against an external broker's TLS listener,
// whose certificate a CA generated in the test signed: `sealcast serve -external-broker ssl://...
// -broker-ca ca.pem`. The CA is in no system store, so a release going through shows
// that the updater verified the broker with -broker-ca; the operator talks TLS too. The
// devices (device/simulate agents) use the plain listener of the same broker: device TLS
// is package device's to test.
//
// Two brokers: Mosquitto (anonymous on loopback), and the embedded Sealcast broker run
// on its own, which checks every password (the updater's from -broker-user and
// -broker-password, the devices' derived from the fleet root) and every topic against
// its ACLs.
func TestExternalBrokerTLS(t *testing.T) {
	t.Run("mosquitto", func(t *testing.T) {
		m := mosquittotest.Start(t, mosquittotest.WithTLS())
		releaseOverTLS(t, tlsBroker{url: m.TLSURL, caFile: m.CAFile, pool: m.CA.Pool(), public: m.URL}, dataDir(t, ""))
	})
	t.Run("embedded", func(t *testing.T) {
		ca := testca.New(t)
		certPEM, keyPEM := ca.Server(t)
		b := brokertest.Start(t, brokertest.WithOptions(func(o *broker.Options) {
			o.TLSAddr, o.TLSCertPEM, o.TLSKeyPEM = "127.0.0.1:0", certPEM, keyPEM
		}))
		// The updater must hold the broker's fleet root: device passwords derive from it.
		dir := dataDir(t, "")
		if err := os.WriteFile(filepath.Join(dir, "root.key"), b.Root[:], 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, "release.key"), randomImage(32), 0o600); err != nil {
			t.Fatal(err)
		}
		releaseOverTLS(t, tlsBroker{
			url: "ssl://" + b.Broker.Addr(broker.ListenerTLS).String(), caFile: ca.WriteCert(t, t.TempDir()), pool: ca.Pool(),
			public: b.URL, updater: b.Updater, admin: b.Admin,
		}, dir)
	})
}

type tlsBroker struct {
	url, caFile    string
	pool           *x509.CertPool
	public         string // the plain listener, for devices
	updater, admin brokertest.Credentials
}

// releaseOverTLS starts the updater on the broker's TLS listener and releases an image
// to 20 devices, which all confirm it; every counter moves once.
func releaseOverTLS(t *testing.T, b tlsBroker, dir string) {
	const n = 20
	rds := redistest.Start(t)
	startServe(t, "updater", nil, "-data", dir, "-external-broker", b.url, "-broker-ca", b.caFile,
		"-broker-user", b.updater.Username, "-broker-password", b.updater.Password,
		"-public-url", b.public, "-redis", rds.URL(), "-http", "", "-chain-length", "16")
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	op, err := operator.Dial(ctx, operator.Options{URL: b.url, TLS: &tls.Config{RootCAs: b.pool},
		Username: b.admin.Username, Password: b.admin.Password, Timeout: time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	defer op.Close()

	files, err := op.Provision(ctx, serials("tls", n), 0)
	if err != nil {
		t.Fatal(err)
	}
	if got := files[0].Broker.URL; got != b.public {
		t.Fatalf("device files name broker %s, want the -public-url %s", got, b.public)
	}
	fleet := startAgents(t, ctx, files, "")
	img := randomImage(20 << 10)
	rel, err := op.Release(ctx, bytes.NewReader(img), int64(len(img)), protocol.ReleaseCreateArgs{Version: 1, All: true, ChunkSize: 4096})
	if err != nil {
		t.Fatal(err)
	}
	fleet.wait(t, ctx)
	completed(t, ctx, op, rel.Release, n, 2*time.Minute)
	checkCounters(t, rds.URL(), files, 1)
}

// TestServeStartErrors: serve refuses bad external-broker settings, and a store it cannot
// reach, with an error that says what to do, and exits 1 (it panicked on any failure to
// start before).
func TestServeStartErrors(t *testing.T) {
	bin := sealcastBin(t)
	dir := t.TempDir()
	notPEM := filepath.Join(dir, "not.pem")
	if err := os.WriteFile(notPEM, []byte("not a certificate"), 0o600); err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		name string
		args []string
		want string
	}{
		{"ca without broker", []string{"-broker-ca", notPEM}, "-broker-ca is for an external broker"},
		{"missing ca", []string{"-external-broker", "ssl://127.0.0.1:1", "-broker-ca", filepath.Join(dir, "nothing.pem")}, "reading -broker-ca"},
		{"ca not PEM", []string{"-external-broker", "ssl://127.0.0.1:1", "-broker-ca", notPEM}, "holds no PEM certificate"},
		{"redis unreachable", []string{"-redis", "redis://127.0.0.1:1/0"}, "cannot reach Redis"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			cmd := exec.Command(bin, append([]string{"serve", "-data", filepath.Join(t.TempDir(), "data"), "-http", "", "-listen", "127.0.0.1:0"}, c.args...)...)
			out, err := cmd.CombinedOutput()
			var ee *exec.ExitError
			if err == nil || !errors.As(err, &ee) || ee.ExitCode() != 1 {
				t.Fatalf("exit %v, want status 1:\n%s", err, out)
			}
			if !strings.Contains(string(out), c.want) || strings.Contains(string(out), "panic") {
				t.Fatalf("output does not say %q (or panicked):\n%s", c.want, out)
			}
		})
	}
}
