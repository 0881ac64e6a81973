package chaos

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	mrand "math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// sealcastBin is the binary TestMain built.
var sealcastBin string

// buildSealcast builds ./cmd/sealcast into dir, without the race detector: the server
// is a separate process, its packages are race-tested on their own, and the suite's time
// budget goes to the devices in the test process. (A race-built server is several times
// slower: on a loaded 2-core machine its restart, with 500 devices reconnecting at once,
// did not get its own updater connected to its broker within the 30 s it allows.)
func buildSealcast(dir string) (string, error) {
	bin := filepath.Join(dir, "sealcast")
	args := []string{"build", "-o", bin, "github.com/sealcast/sealcast/cmd/sealcast"}
	gobin, err := exec.LookPath("go")
	if err != nil {
		gobin = filepath.Join(runtime.GOROOT(), "bin", "go")
	}
	cmd := exec.Command(gobin, args...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("go %s: %v\n%s", strings.Join(args, " "), err, out.Bytes())
	}
	return bin, nil
}

// freePort returns a loopback address that nothing listens on, with a port below the
// kernel's ephemeral range. The serve process binds it again after every restart, and a
// port from the ephemeral range (what ":0" gives) may meanwhile become the source port
// of one of the fleet's hundreds of outgoing connections.
func freePort(t testing.TB) string {
	t.Helper()
	lo := 32768
	if b, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range"); err == nil {
		if f := strings.Fields(string(b)); len(f) == 2 {
			if v, err := strconv.Atoi(f[0]); err == nil && v > 11000 {
				lo = v
			}
		}
	}
	for range 100 {
		addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(10000+mrand.IntN(lo-10000)))
		if l, err := net.Listen("tcp", addr); err == nil {
			l.Close()
			return addr
		}
	}
	t.Fatalf("no free port below %d on 127.0.0.1 after 100 tries", lo)
	return ""
}

// serveProc is `sealcast serve`, run as a child process that can be killed and started
// again on the same data directory, ports and Redis.
type serveProc struct {
	t        testing.TB
	dataDir  string
	redisURL string
	mqttAddr string // 127.0.0.1:port
	httpAddr string
	adminPW  string
	pwFlag   bool // the binary has -admin-password

	cmd   *exec.Cmd
	done  chan struct{}
	err   error // exit status, set before done closes
	logs  []string
	lives int
}

var passwordLine = regexp.MustCompile(`SEALCAST_PASSWORD='([^']+)'`)

// startServe starts the first lifetime of a serve process and stops it when the test ends.
func startServe(t testing.TB, redisURL string) *serveProc {
	t.Helper()
	s := &serveProc{t: t, dataDir: filepath.Join(t.TempDir(), "data"), redisURL: redisURL,
		mqttAddr: freePort(t), httpAddr: freePort(t)}
	// Another branch adds -admin-password; use it when the binary has it, else read the
	// password the first start prints.
	help, _ := exec.Command(sealcastBin, "serve", "-h").CombinedOutput()
	if bytes.Contains(help, []byte("-admin-password")) {
		var b [12]byte
		rand.Read(b[:])
		s.adminPW, s.pwFlag = hex.EncodeToString(b[:]), true
	}
	t.Cleanup(func() {
		s.stop()
		if t.Failed() {
			t.Logf("errors and warnings of sealcast serve (first 60 of each lifetime; SEALCAST_CHAOS_LOGS=dir keeps the logs):\n%s", s.problems(60))
		}
		if dir := os.Getenv("SEALCAST_CHAOS_LOGS"); dir != "" {
			for _, p := range s.logs {
				if b, err := os.ReadFile(p); err == nil {
					os.WriteFile(filepath.Join(dir, filepath.Base(p)), b, 0o644)
				}
			}
		}
	})
	s.start()
	return s
}

// problems returns up to n error and warning lines of each lifetime's log, other than
// the expected "ack rejected" ones.
func (s *serveProc) problems(n int) string {
	var b strings.Builder
	for i, p := range s.logs {
		data, _ := os.ReadFile(p)
		fmt.Fprintf(&b, "--- lifetime %d\n", i+1)
		k := 0
		for _, line := range strings.Split(string(data), "\n") {
			if k < n && (strings.Contains(line, `"level":"error"`) || strings.Contains(line, `"level":"warn"`)) &&
				!strings.Contains(line, "ack rejected") {
				b.WriteString(line + "\n")
				k++
			}
		}
	}
	return b.String()
}

// URL is the MQTT URL of the embedded broker.
func (s *serveProc) URL() string { return "tcp://" + s.mqttAddr }

// start starts a new lifetime and waits until /healthz answers and, on the first start,
// the admin password is known.
func (s *serveProc) start() {
	t := s.t
	t.Helper()
	s.lives++
	logPath := filepath.Join(filepath.Dir(s.dataDir), fmt.Sprintf("serve-%d.log", s.lives))
	s.logs = append(s.logs, logPath)
	logf, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	args := []string{"serve", "-listen", s.mqttAddr, "-http", s.httpAddr, "-data", s.dataDir,
		"-redis", s.redisURL, "-log-level", "warn"}
	if s.pwFlag {
		args = append(args, "-admin-password", s.adminPW)
	}
	cmd := exec.Command(sealcastBin, args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.Env = cleanEnv()
	setDeathSignal(cmd)
	if err := cmd.Start(); err != nil {
		logf.Close()
		t.Fatalf("starting sealcast serve: %v", err)
	}
	s.cmd, s.done = cmd, make(chan struct{})
	done := s.done
	go func() {
		s.err = cmd.Wait()
		logf.Close()
		close(done)
	}()
	deadline := time.Now().Add(60 * time.Second)
	for {
		select {
		case <-done:
			t.Fatalf("sealcast serve (lifetime %d) exited at start: %v\n%s", s.lives, s.err, s.tail(40))
		default:
		}
		if s.healthy() && s.passwordKnown(logPath) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("sealcast serve (lifetime %d) not ready after 60 s\n%s", s.lives, s.tail(40))
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// cleanEnv is the environment without SEALCAST_* variables, which the binary would read
// as flags.
func cleanEnv() []string {
	var env []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "SEALCAST_") {
			env = append(env, kv)
		}
	}
	return env
}

func (s *serveProc) passwordKnown(logPath string) bool {
	if s.adminPW != "" {
		return true
	}
	b, _ := os.ReadFile(logPath)
	if m := passwordLine.FindSubmatch(b); m != nil {
		s.adminPW = string(m[1])
		return true
	}
	return false
}

func (s *serveProc) healthy() bool {
	c := http.Client{Timeout: 2 * time.Second}
	resp, err := c.Get("http://" + s.httpAddr + "/healthz")
	if err != nil {
		return false
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return false
	}
	nc, err := net.DialTimeout("tcp", s.mqttAddr, 2*time.Second)
	if err != nil {
		return false
	}
	nc.Close()
	return true
}

// kill ends the process with SIGKILL, as a crash or the OOM killer would.
func (s *serveProc) kill() {
	s.t.Helper()
	s.cmd.Process.Signal(syscall.SIGKILL)
	select {
	case <-s.done:
	case <-time.After(30 * time.Second):
		s.t.Fatal("sealcast serve did not die of SIGKILL within 30 s")
	}
}

// terminate stops the process with SIGTERM and returns its exit error, or fails if it
// does not stop in time.
func (s *serveProc) terminate() error {
	s.t.Helper()
	s.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-s.done:
		return s.err
	case <-time.After(30 * time.Second):
		s.cmd.Process.Kill()
		<-s.done
		return fmt.Errorf("sealcast serve did not stop within 30 s of SIGTERM\n%s", s.tail(40))
	}
}

func (s *serveProc) stop() {
	if s.cmd == nil {
		return
	}
	select {
	case <-s.done:
	default:
		s.cmd.Process.Kill()
		<-s.done
	}
}

// tail returns the last n lines of the current lifetime's log.
func (s *serveProc) tail(n int) string {
	if len(s.logs) == 0 {
		return ""
	}
	b, _ := os.ReadFile(s.logs[len(s.logs)-1])
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	return strings.Join(lines[max(0, len(lines)-n):], "\n")
}

// failedAdvances sums the acks of the Advance calls that failed in a lifetime (from 1),
// as the updater logs them.
func (s *serveProc) failedAdvances(life int) int {
	b, _ := os.ReadFile(s.logs[life-1])
	n := 0
	for _, line := range strings.Split(string(b), "\n") {
		if !strings.Contains(line, "advancing counters; devices will re-send") {
			continue
		}
		var ev struct{ Acks int }
		if json.Unmarshal([]byte(line), &ev) == nil {
			n += ev.Acks
		}
	}
	return n
}

// metrics is one scrape of /metrics: "name{labels}" -> value.
type metrics map[string]float64

// scrape reads /metrics of the running lifetime.
func (s *serveProc) scrape(ctx context.Context) (metrics, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+s.httpAddr+"/metrics", nil)
	if err != nil {
		return nil, err
	}
	resp, err := (&http.Client{Timeout: 10 * time.Second}).Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("GET /metrics: %s", resp.Status)
	}
	m := metrics{}
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		line := sc.Text()
		if line == "" || line[0] == '#' {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		if i < 0 {
			continue
		}
		v, err := strconv.ParseFloat(line[i+1:], 64)
		if err != nil {
			return nil, fmt.Errorf("GET /metrics: line %q: %w", line, err)
		}
		m[line[:i]] = v
	}
	return m, sc.Err()
}

// Names of the counters the suite checks (cmd/sealcast/metrics.go).
const (
	mAccepted  = "sealcast_acks_accepted_total"
	mDuplicate = "sealcast_acks_duplicate_total"
	mShed      = "sealcast_acks_shed_total"
	mReports   = "sealcast_install_failures_total"
	mResyncs   = "sealcast_resyncs_total"
	mKeys      = "sealcast_keys_published_total"
)

func mRejected(reason string) string { return `sealcast_acks_rejected_total{reason="` + reason + `"}` }

var rejectReasons = []string{"malformed", "unknown_device", "forged", "stale", "unassigned", "internal"}

func (m metrics) int(name string) int { return int(m[name]) }

func (m metrics) String() string {
	var b strings.Builder
	fmt.Fprintf(&b, "accepted %d, duplicate %d, shed %d, reports %d, resyncs %d, keys %d, rejected",
		m.int(mAccepted), m.int(mDuplicate), m.int(mShed), m.int(mReports), m.int(mResyncs), m.int(mKeys))
	for _, r := range rejectReasons {
		if n := m.int(mRejected(r)); n > 0 {
			fmt.Fprintf(&b, " %s=%d", r, n)
		}
	}
	for _, r := range []string{"queue_full", "inflight", "device_queue"} {
		if n := m.int(`sealcast_broker_dropped_total{reason="` + r + `"}`); n > 0 {
			fmt.Fprintf(&b, ", broker dropped %s=%d", r, n)
		}
	}
	return b.String()
}
