package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/crypto/bcrypt"

	"github.com/sealcast/sealcast/broker"
	"github.com/sealcast/sealcast/operator"
	"github.com/sealcast/sealcast/protocol"
)

// The command tests run sealcast as a separate process: the test binary re-executes
// itself into TestSealcastProcess, which calls main with the arguments after "--". So
// every command runs with real flags, environment, signals, exit codes, standard output
// and error, and (under -race) the race detector, without a build step or a TestMain.

const procEnv = "SEALCAST_TEST_PROCESS"

// TestSealcastProcess is the sealcast command when procEnv is set; otherwise it does
// nothing.
func TestSealcastProcess(t *testing.T) {
	if os.Getenv(procEnv) != "1" {
		t.Skip("the sealcast process of the command tests")
	}
	args := os.Args
	for i, a := range args {
		if a == "--" {
			args = args[i+1:]
			break
		}
	}
	os.Args = append([]string{"sealcast"}, args...)
	main()
	os.Exit(0)
}

// lockedBuffer is a bytes.Buffer that a process writes while the test reads.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// proc is a running sealcast process.
type proc struct {
	name           string
	cmd            *exec.Cmd
	stdout, stderr *lockedBuffer
	done           chan struct{}
	err            error
}

// startProc starts "sealcast args..." with extra environment variables; the test's
// cleanup kills it if it still runs.
func startProc(t *testing.T, env []string, args ...string) *proc {
	t.Helper()
	return startProcInput(t, env, nil, args...)
}

// startProcInput is startProc with stdin as the process's standard input.
func startProcInput(t *testing.T, env []string, stdin io.Reader, args ...string) *proc {
	t.Helper()
	cmd := exec.Command(os.Args[0], append([]string{"-test.run=^TestSealcastProcess$", "--"}, args...)...)
	cmd.Stdin = stdin
	cmd.Env = append(append(os.Environ(), procEnv+"=1"), env...)
	p := &proc{name: args[0], cmd: cmd, stdout: &lockedBuffer{}, stderr: &lockedBuffer{}, done: make(chan struct{})}
	cmd.Stdout, cmd.Stderr = p.stdout, p.stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		p.err = cmd.Wait()
		close(p.done)
	}()
	t.Cleanup(func() {
		select {
		case <-p.done:
		default:
			cmd.Process.Kill()
			<-p.done
		}
		if t.Failed() {
			t.Logf("sealcast %s stdout:\n%s\nstderr:\n%s", p.name, p.stdout, tail(p.stderr.String(), 6000))
		}
	})
	return p
}

func tail(s string, n int) string {
	if len(s) > n {
		return "..." + s[len(s)-n:]
	}
	return s
}

// runProc runs "sealcast args..." to the end.
func runProc(t *testing.T, env []string, args ...string) *proc {
	t.Helper()
	p := startProc(t, env, args...)
	p.wait(t, 2*time.Minute)
	return p
}

// wait waits for the process to exit and returns its error (nil for exit status 0).
func (p *proc) wait(t *testing.T, timeout time.Duration) error {
	t.Helper()
	select {
	case <-p.done:
		return p.err
	case <-time.After(timeout):
		t.Fatalf("sealcast %s did not exit within %v", p.name, timeout)
		return nil
	}
}

func (p *proc) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

func (p *proc) exitCode() int {
	var ee *exec.ExitError
	if errors.As(p.err, &ee) {
		return ee.ExitCode()
	}
	return 0
}

func (p *proc) signal(t *testing.T, sig syscall.Signal) {
	t.Helper()
	if err := p.cmd.Process.Signal(sig); err != nil {
		t.Fatal(err)
	}
}

// eventually polls cond every 20 ms until it holds, failing after a generous timeout
// (the machine may be busy) or when one of the processes exited.
func eventually(t *testing.T, what string, cond func() bool, watch ...*proc) {
	t.Helper()
	deadline := time.Now().Add(90 * time.Second)
	for !cond() {
		for _, p := range watch {
			if p.exited() {
				t.Fatalf("waiting until %s: sealcast %s exited: %v", what, p.name, p.err)
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting until %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func freeAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// testServer is a "sealcast serve" process on loopback with a temporary data directory.
type testServer struct {
	url, adminPW string
	data         string // the data directory
	p            *proc
	opOnce       sync.Once
	op           *operator.Client
}

// startServe starts "sealcast serve" and waits until it answers admin requests. The
// admin account is written into the data directory beforehand, so the test knows its
// password without reading it from the output.
func startServe(t *testing.T) *testServer { return startServeOn(t, "", "") }

// startServeOn starts serve on addr ("": a free port) with the admin password pw ("": a
// random one).
func startServeOn(t *testing.T, addr, pw string) *testServer {
	t.Helper()
	data := t.TempDir()
	if pw == "" {
		var b [12]byte
		rand.Read(b[:])
		pw = hex.EncodeToString(b[:])
	}
	s := &testServer{adminPW: pw, data: data}
	// The lowest bcrypt cost: every admin connection checks the hash, slowly under -race.
	h, err := bcrypt.GenerateFromPassword([]byte(s.adminPW), bcrypt.MinCost)
	if err != nil {
		t.Fatal(err)
	}
	acct := broker.Account{Username: "admin", Role: broker.RoleAdmin, PasswordHash: string(h)}
	if err := broker.SaveAccounts(filepath.Join(data, broker.AccountsFile), []broker.Account{acct}); err != nil {
		t.Fatal(err)
	}
	fixed := addr != ""
	for try := 0; ; try++ { // a free port can be taken between the check and the listen
		if !fixed {
			addr = freeAddr(t)
		}
		s.p = startProc(t, nil, "serve", "-data", data, "-listen", addr, "-http", "", "-log-level", "warn")
		s.url = "tcp://" + addr
		ok := false
		eventually(t, "serve answers admin requests", func() bool {
			if s.p.exited() {
				return true
			}
			ok = s.try() == nil
			return ok
		})
		if ok {
			break
		}
		if fixed || try == 2 || !strings.Contains(s.p.stderr.String(), "address already in use") {
			t.Fatalf("serve exited: %v\n%s", s.p.err, s.p.stderr)
		}
	}
	t.Cleanup(func() {
		if !s.p.exited() {
			s.p.signal(t, syscall.SIGTERM)
			s.p.wait(t, 30*time.Second)
		}
	})
	return s
}

func (s *testServer) try() error {
	// A request sent before the updater subscribed is lost: ask again soon.
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	op, err := operator.Dial(ctx, operator.Options{URL: s.url, Username: "admin", Password: s.adminPW, Timeout: 2 * time.Second})
	if err != nil {
		return err
	}
	defer op.Close()
	return op.Do(ctx, protocol.CmdReleaseList, nil, nil)
}

// operator returns the test's admin connection to s.
func (s *testServer) operator(t *testing.T) *operator.Client {
	t.Helper()
	s.opOnce.Do(func() {
		op, err := operator.Dial(context.Background(), operator.Options{URL: s.url, Username: "admin", Password: s.adminPW})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(op.Close)
		s.op = op
	})
	if s.op == nil {
		t.Fatal("no admin connection")
	}
	return s.op
}

// release uploads img and releases it as version v to devices (all when none).
func (s *testServer) release(t *testing.T, img []byte, v uint64, devices ...string) {
	t.Helper()
	op := s.operator(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	args := protocol.ReleaseCreateArgs{Version: v, ChunkSize: 4096, Devices: devices, All: len(devices) == 0, Label: "test v" + strconv.FormatUint(v, 10)}
	if _, err := op.Release(ctx, bytes.NewReader(img), int64(len(img)), args); err != nil {
		t.Fatalf("release v%d: %v", v, err)
	}
}

func randomImage(t *testing.T, n int) []byte {
	b := make([]byte, n)
	rand.Read(b)
	return b
}
