package redisstore_test

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// redisServer is a redis-server this test started.
type redisServer struct {
	addr string
	dir  string
	cmd  *exec.Cmd
	done chan struct{}
}

// needRedisServer returns the path of redis-server, or skips the test (fails it under
// SEALCAST_REQUIRE_TOOLS=1) if there is none.
func needRedisServer(t testing.TB) string {
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

// startRedis starts redis-server on 127.0.0.1 with its files in dir and stops it at
// cleanup. A port of 0 picks a free one.
func startRedis(t testing.TB, dir string, port int, args ...string) *redisServer {
	t.Helper()
	srv, err := launchRedis(needRedisServer(t), dir, port, args...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(srv.stop)
	return srv
}

// launchRedis starts redis-server and waits until it answers.
func launchRedis(bin, dir string, port int, args ...string) (*redisServer, error) {
	if port == 0 {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, err
		}
		port = l.Addr().(*net.TCPAddr).Port
		l.Close()
	}
	all := append([]string{"--bind", "127.0.0.1", "--port", strconv.Itoa(port), "--dir", dir,
		"--save", "", "--appendonly", "no", "--daemonize", "no", "--loglevel", "warning",
		"--logfile", filepath.Join(dir, "redis.log")}, args...)
	cmd := exec.Command(bin, all...)
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start redis-server: %w", err)
	}
	srv := &redisServer{addr: net.JoinHostPort("127.0.0.1", strconv.Itoa(port)), dir: dir, cmd: cmd, done: make(chan struct{})}
	go func() { cmd.Wait(); close(srv.done) }()

	rdb := redis.NewClient(&redis.Options{Addr: srv.addr})
	defer rdb.Close()
	deadline := time.Now().Add(10 * time.Second)
	for {
		err := rdb.Ping(context.Background()).Err()
		if err == nil {
			return srv, nil
		}
		select {
		case <-srv.done:
			log, _ := os.ReadFile(filepath.Join(dir, "redis.log"))
			return nil, fmt.Errorf("redis-server exited at start: %s", log)
		default:
		}
		if time.Now().After(deadline) {
			srv.stop()
			return nil, fmt.Errorf("redis-server on %s does not answer: %w", srv.addr, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// kill stops the server abruptly (SIGKILL), as a crash would.
func (s *redisServer) kill() {
	s.cmd.Process.Kill()
	<-s.done
}

func (s *redisServer) stop() {
	select {
	case <-s.done:
		return
	default:
	}
	s.kill()
}

var (
	sharedOnce sync.Once
	sharedURL  string
	sharedStop func()
	sharedErr  error
)

// sharedRedis returns the URL of the Redis for contract tests: REDIS_URL if set (test.sh
// starts one), else one redis-server started for this package and stopped by TestMain.
func sharedRedis(t testing.TB) string {
	t.Helper()
	if u := os.Getenv("REDIS_URL"); u != "" {
		return u
	}
	bin := needRedisServer(t)
	sharedOnce.Do(func() {
		dir, err := os.MkdirTemp("", "redisstore-test-")
		if err != nil {
			sharedErr = err
			return
		}
		srv, err := launchRedis(bin, dir, 0)
		if err != nil {
			os.RemoveAll(dir)
			sharedErr = err
			return
		}
		sharedURL = "redis://" + srv.addr + "/0"
		sharedStop = func() { srv.stop(); os.RemoveAll(dir) }
	})
	if sharedErr != nil {
		t.Fatal(sharedErr)
	}
	return sharedURL
}

func TestMain(m *testing.M) {
	code := m.Run()
	if sharedStop != nil {
		sharedStop()
	}
	os.Exit(code)
}
