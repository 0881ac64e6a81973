package scaleout_test

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/sealcast/sealcast/operator"
)

// binDir holds the sealcast binary, built once by the first test that needs it.
var (
	binDir   string
	buildMu  sync.Mutex
	builtBin string
)

func TestMain(m *testing.M) {
	var err error
	if binDir, err = os.MkdirTemp("", "sealcast-scaleout-"); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(binDir)
	os.Exit(code)
}

// sealcastBin builds cmd/sealcast (with -race when this test binary has it, so that a
// data race in the child fails the test too) and returns its path.
func sealcastBin(t *testing.T) string {
	t.Helper()
	buildMu.Lock()
	defer buildMu.Unlock()
	if builtBin != "" {
		return builtBin
	}
	goBin, err := exec.LookPath("go")
	if err != nil {
		t.Fatalf("the go command is needed to build cmd/sealcast: %v", err)
	}
	out := filepath.Join(binDir, "sealcast")
	args := []string{"build", "-o", out}
	if raceEnabled {
		args = append(args, "-race")
	}
	args = append(args, "github.com/sealcast/sealcast/cmd/sealcast")
	start := time.Now()
	if b, err := exec.Command(goBin, args...).CombinedOutput(); err != nil {
		t.Fatalf("go %s: %v\n%s", strings.Join(args, " "), err, b)
	}
	t.Logf("built %s (race %v) in %v", out, raceEnabled, time.Since(start).Round(time.Millisecond))
	builtBin = out
	return out
}

// serve is a `sealcast serve` child process.
type serve struct {
	t       *testing.T
	name    string
	args    []string
	env     []string
	logPath string

	cmd      *exec.Cmd
	running  chan struct{} // closed when the updater logged "updater running"
	serving  chan struct{} // closed when serve logged "sealcast serving"
	done     chan struct{} // closed when the process exited
	mu       sync.Mutex
	httpAddr string
	races    int
	exit     error
}

// startServe starts `sealcast serve` with args (and -log-level info) and waits until its
// updater runs. env adds environment variables. The process is stopped (SIGTERM) when the
// test ends; a data race it reported fails the test.
func startServe(t *testing.T, name string, env []string, args ...string) *serve {
	t.Helper()
	s := &serve{t: t, name: name, args: args, env: env, logPath: filepath.Join(t.TempDir(), name+".log")}
	t.Cleanup(func() {
		s.stop()
		s.mu.Lock()
		races := s.races
		s.mu.Unlock()
		if races > 0 {
			t.Errorf("%s reported %d data races; see %s", name, races, s.logPath)
		}
		if t.Failed() {
			t.Logf("%s log (last lines):\n%s", name, s.logTail(30))
		}
	})
	s.start()
	return s
}

func (s *serve) start() {
	t := s.t
	t.Helper()
	s.cmd = exec.Command(sealcastBin(t), append([]string{"serve", "-log-level", "info"}, s.args...)...)
	// SEALCAST_* variables are flags (ff): the developer's own must not leak in.
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "SEALCAST_") {
			s.cmd.Env = append(s.cmd.Env, kv)
		}
	}
	s.cmd.Env = append(s.cmd.Env, s.env...)
	stderr, err := s.cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	logf, err := os.OpenFile(s.logPath, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	s.running, s.serving, s.done = make(chan struct{}), make(chan struct{}), make(chan struct{})
	if err := s.cmd.Start(); err != nil {
		logf.Close()
		t.Fatalf("starting %s: %v", s.name, err)
	}
	fmt.Fprintf(logf, "=== started pid %d: %s\n", s.cmd.Process.Pid, strings.Join(s.cmd.Args, " "))
	cmd, running, serving, done := s.cmd, s.running, s.serving, s.done
	go func() {
		defer close(done)
		defer logf.Close()
		var ranOnce, servedOnce sync.Once
		sc := bufio.NewScanner(stderr)
		sc.Buffer(make([]byte, 64<<10), 4<<20)
		for sc.Scan() {
			line := sc.Bytes()
			logf.Write(append(line, '\n'))
			if strings.Contains(string(line), "WARNING: DATA RACE") {
				s.mu.Lock()
				s.races++
				s.mu.Unlock()
			}
			var ev struct {
				Message string `json:"message"`
				HTTP    string `json:"http"`
			}
			if json.Unmarshal(line, &ev) != nil {
				continue
			}
			switch {
			case ev.Message == "updater running":
				ranOnce.Do(func() { close(running) })
			case strings.HasPrefix(ev.Message, "sealcast serving"):
				s.mu.Lock()
				s.httpAddr = ev.HTTP
				s.mu.Unlock()
				servedOnce.Do(func() { close(serving) })
			}
		}
		io.Copy(io.Discard, stderr)
		err := cmd.Wait()
		s.mu.Lock()
		s.exit = err
		s.mu.Unlock()
		fmt.Fprintf(logf, "=== exited: %v\n", err)
	}()
	for _, c := range []chan struct{}{running, serving} {
		select {
		case <-c:
		case <-done:
			t.Fatalf("%s exited at start (%v):\n%s", s.name, s.exitErr(), s.logTail(20))
		case <-time.After(60 * time.Second):
			t.Fatalf("%s is not running after 60 s:\n%s", s.name, s.logTail(20))
		}
	}
}

func (s *serve) exitErr() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.exit
}

// kill stops the process with SIGKILL, as a crash or an OOM kill would, and waits for it.
func (s *serve) kill() {
	s.cmd.Process.Signal(syscall.SIGKILL)
	<-s.done
}

// restart starts the process again with the same arguments and data directory.
func (s *serve) restart() {
	s.t.Helper()
	s.start()
}

// stop stops the process cleanly (SIGTERM) if it runs, and kills it after 30 s.
func (s *serve) stop() {
	select {
	case <-s.done:
		return
	default:
	}
	s.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-s.done:
	case <-time.After(30 * time.Second):
		s.t.Errorf("%s did not stop within 30 s of SIGTERM; killing it", s.name)
		s.kill()
	}
}

// metric returns the value of a Prometheus counter or gauge from the process's /metrics
// (-http must be set), e.g. metric("sealcast_acks_accepted_total").
func (s *serve) metric(name string) float64 {
	s.t.Helper()
	s.mu.Lock()
	addr := s.httpAddr
	s.mu.Unlock()
	if addr == "" {
		s.t.Fatalf("%s has no HTTP listener (start it with -http 127.0.0.1:0)", s.name)
	}
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		s.t.Fatalf("%s /metrics: %v", s.name, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		s.t.Fatal(err)
	}
	m := regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(name) + ` (\S+)$`).FindSubmatch(b)
	if m == nil {
		s.t.Fatalf("%s /metrics has no %s:\n%s", s.name, name, b)
	}
	v, err := strconv.ParseFloat(string(m[1]), 64)
	if err != nil {
		s.t.Fatal(err)
	}
	return v
}

func (s *serve) logTail(n int) string {
	b, err := os.ReadFile(s.logPath)
	if err != nil {
		return "(no log: " + err.Error() + ")"
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	return strings.Join(lines[max(0, len(lines)-n):], "\n")
}

// dataDir makes a data directory holding the keys of from (root.key and release.key), so
// that several updaters share one fleet's identity; from "" makes a fresh directory.
func dataDir(t *testing.T, from string) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "data")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	if from == "" {
		return dir
	}
	for _, f := range []string{"root.key", "release.key"} {
		b, err := os.ReadFile(filepath.Join(from, f))
		if err != nil {
			t.Fatalf("copying the fleet keys: %v", err)
		}
		if err := os.WriteFile(filepath.Join(dir, f), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

// dialOperator connects an operator client (any credentials: mosquittotest allows
// anonymous clients).
func dialOperator(t *testing.T, url string) *operator.Client {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	op, err := operator.Dial(ctx, operator.Options{URL: url, Username: "admin", Password: "admin", Timeout: 2 * time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(op.Close)
	return op
}

// eventually polls cond every 50 ms until it holds, or fails the test after timeout.
func eventually(t *testing.T, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", timeout, what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
