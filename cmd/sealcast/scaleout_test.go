package main

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/sealcast/sealcast/broker"
	"github.com/sealcast/sealcast/internal/testkit/redistest"
	"github.com/sealcast/sealcast/operator"
)

// copyKeys gives a second updater the first one's root secret and release-signing key,
// as docs/OPERATIONS.md 6.4 says to do before its first start.
func copyKeys(t *testing.T, from, to string) {
	t.Helper()
	if err := os.MkdirAll(to, 0o700); err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{"root.key", "release.key"} {
		b, err := os.ReadFile(filepath.Join(from, f))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(to, f), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
}

const helperEnv = "SEALCAST_TEST_HELPER_ARGS"

// TestHelperSealcast is not a test: run as a child process with SEALCAST_TEST_HELPER_ARGS
// set (a JSON list of arguments), it runs the sealcast command line until SIGTERM. It lets
// a test run a second serve in its own process, with its own pid and client id.
func TestHelperSealcast(t *testing.T) {
	raw := os.Getenv(helperEnv)
	if raw == "" {
		t.Skip("helper process for other tests")
	}
	var args []string
	if err := json.Unmarshal([]byte(raw), &args); err != nil {
		t.Fatal(err)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM)
	defer stop()
	if err := run(ctx, args, os.Stdout, os.Stderr); err != nil {
		t.Fatal(err)
	}
}

// startSealcast runs `sealcast args...` in a child process until the test ends.
func startSealcast(t *testing.T, args ...string) {
	t.Helper()
	b, _ := json.Marshal(args)
	cmd := exec.Command(os.Args[0], "-test.run=^TestHelperSealcast$", "-test.count=1")
	cmd.Env = append(os.Environ(), helperEnv+"="+string(b))
	out, err := os.Create(filepath.Join(t.TempDir(), "sealcast.log"))
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Signal(syscall.SIGTERM)
		done := make(chan struct{})
		go func() { cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(20 * time.Second):
			cmd.Process.Kill()
			<-done
		}
		out.Close()
		if t.Failed() {
			b, _ := os.ReadFile(out.Name())
			t.Logf("sealcast %s:\n%s", strings.Join(args, " "), b)
		}
	})
}

// scrape returns a metric's value from a /metrics endpoint.
func scrape(t *testing.T, url, metric string) (float64, error) {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), metric+" "); ok {
			return strconv.ParseFloat(v, 64)
		}
	}
	return 0, fmt.Errorf("%s has no %s", url, metric)
}

func freePort(t *testing.T) string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// TestEmbeddedBrokerTwoUpdaters attaches a second, -acks-only updater, in its own
// process, to the embedded broker of a first serve (docs/OPERATIONS.md 6.4, last
// paragraph): an updater-role account, $share acks, one Redis.
func TestEmbeddedBrokerTwoUpdaters(t *testing.T) {
	rs := redistest.Start(t, "--appendonly", "yes", "--appendfsync", "always")
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	log := zerolog.New(zerolog.NewTestWriter(t)).Level(zerolog.WarnLevel)

	dirA, dirB := filepath.Join(t.TempDir(), "a"), filepath.Join(t.TempDir(), "b")
	a, err := startStack(ctx, stackConfig{
		dataDir: dirA, listen: "127.0.0.1:0", redisURL: rs.URL(), chainLength: 16, ackGroup: "sealcast",
	}, log)
	if err != nil {
		t.Fatal(err)
	}
	defer a.close()
	pw := randomPassword(t)
	acct, err := broker.NewAccount("sealcast-updater-2", broker.RoleUpdater, pw)
	if err != nil {
		t.Fatal(err)
	}
	if err := a.broker.AddAccount(acct); err != nil {
		t.Fatal(err)
	}
	copyKeys(t, dirA, dirB)
	httpB := freePort(t)
	startSealcast(t, "serve", "-data", dirB, "-external-broker", a.brokerURL, "-broker-user", acct.Username,
		"-broker-password", pw, "-redis", rs.URL(), "-ack-group", "sealcast", "-acks-only", "-http", httpB)
	metricsB := "http://" + httpB + "/metrics"
	eventuallyWithin(t, 60*time.Second, "the second updater's /metrics", func() bool {
		_, err := scrape(t, metricsB, "sealcast_acks_accepted_total")
		return err == nil
	})
	waitUpdaterReady(ctx, t, a.brokerURL, "admin", a.adminPW)
	op, err := operator.Dial(ctx, operator.Options{URL: a.brokerURL, Username: "admin", Password: a.adminPW})
	if err != nil {
		t.Fatal(err)
	}
	defer op.Close()

	serials := make([]string, 40)
	for i := range serials {
		serials[i] = fmt.Sprintf("emb-%d", i+1)
	}
	files, err := op.Provision(ctx, serials, 0)
	if err != nil {
		t.Fatal(err)
	}
	installRelease(ctx, t, op, files, log)
	checkInstalled(ctx, t, a, files)
	accA := a.upd.Stats().AcksAccepted
	accB, err := scrape(t, metricsB, "sealcast_acks_accepted_total")
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("acks accepted: %d by the first updater, %.0f by the acks-only one", accA, accB)
	if accA+int64(accB) != int64(len(files)) {
		t.Errorf("acks accepted: %d + %.0f, want %d in all", accA, accB, len(files))
	}
	// mochi gives each shared delivery to a member picked by Go's map iteration order: a
	// random split, not round-robin, but with 40 acks each updater gets some.
	if accB == 0 {
		t.Error("the acks-only updater accepted no ack: the shared subscription did not split the acks")
	}
}
