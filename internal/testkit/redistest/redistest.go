// Package redistest starts real redis-server processes for tests: on 127.0.0.1, on a
// free port, in a temporary directory, stopped when the test ends. Tests that need Redis
// skip when redis-server is missing, or fail under SEALCAST_REQUIRE_TOOLS=1 (as CI runs).
package redistest

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// Server is a redis-server a test started.
type Server struct {
	Addr string // 127.0.0.1:port
	Dir  string
	bin  string
	args []string
	cmd  *exec.Cmd
	done chan struct{}
}

// URL returns redis://Addr/0.
func (s *Server) URL() string { return "redis://" + s.Addr + "/0" }

// Need returns the path of redis-server, or skips the test (fails it under
// SEALCAST_REQUIRE_TOOLS=1) if there is none.
func Need(t testing.TB) string {
	t.Helper()
	path, err := exec.LookPath("redis-server")
	if err != nil {
		if os.Getenv("SEALCAST_REQUIRE_TOOLS") == "1" {
			t.Fatalf("redis-server not found (apt-get install -y redis-server): %v", err)
		}
		t.Skipf("redis-server not found; skipping (set SEALCAST_REQUIRE_TOOLS=1 to fail instead)")
	}
	return path
}

// Start starts redis-server with extra arguments (for example "--appendonly", "yes") and
// stops it when the test ends.
func Start(t testing.TB, args ...string) *Server {
	t.Helper()
	s, err := Launch(Need(t), t.TempDir(), 0, args...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Stop)
	return s
}

// Launch starts redis-server with its files in dir (port 0 picks a free port) and waits
// until it answers. The caller stops it.
func Launch(bin, dir string, port int, args ...string) (*Server, error) {
	if port == 0 {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, err
		}
		port = l.Addr().(*net.TCPAddr).Port
		l.Close()
	}
	s := &Server{Addr: net.JoinHostPort("127.0.0.1", strconv.Itoa(port)), Dir: dir, bin: bin, args: args}
	return s, s.start()
}

func (s *Server) start() error {
	_, port, _ := net.SplitHostPort(s.Addr)
	all := append([]string{"--bind", "127.0.0.1", "--port", port, "--dir", s.Dir,
		"--save", "", "--appendonly", "no", "--daemonize", "no", "--loglevel", "warning",
		"--logfile", filepath.Join(s.Dir, "redis.log")}, s.args...)
	s.cmd = exec.Command(s.bin, all...)
	if err := s.cmd.Start(); err != nil {
		return fmt.Errorf("start redis-server: %w", err)
	}
	done := make(chan struct{})
	s.done = done
	cmd := s.cmd
	go func() { cmd.Wait(); close(done) }()
	rdb := redis.NewClient(&redis.Options{Addr: s.Addr})
	defer rdb.Close()
	deadline := time.Now().Add(10 * time.Second)
	for {
		err := rdb.Ping(context.Background()).Err()
		if err == nil {
			return nil
		}
		select {
		case <-done:
			log, _ := os.ReadFile(filepath.Join(s.Dir, "redis.log"))
			return fmt.Errorf("redis-server exited at start: %s", log)
		default:
		}
		if time.Now().After(deadline) {
			s.Stop()
			return fmt.Errorf("redis-server on %s does not answer: %w", s.Addr, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Kill stops the server abruptly (SIGKILL), as a crash would.
func (s *Server) Kill() {
	s.cmd.Process.Kill()
	<-s.done
}

// Stop stops the server if it is running.
func (s *Server) Stop() {
	select {
	case <-s.done:
	default:
		s.Kill()
	}
}

// Restart kills the server and starts it again on the same port and directory, so that
// what it persisted (AOF) is all that survives.
func (s *Server) Restart(t testing.TB) {
	t.Helper()
	s.Kill()
	if err := s.start(); err != nil {
		t.Fatal(err)
	}
}

// URL returns a Redis URL for a test: REDIS_URL if set (scripts/test.sh starts one), else
// a redis-server started for this test.
func URL(t testing.TB) string {
	t.Helper()
	if u := os.Getenv("REDIS_URL"); u != "" {
		return u
	}
	return Start(t).URL()
}

// Prefix returns a key prefix unique to this test, so tests sharing one Redis never see
// each other's keys.
func Prefix(t testing.TB) string {
	var b [6]byte
	rand.Read(b[:])
	return "t" + hex.EncodeToString(b[:])
}
