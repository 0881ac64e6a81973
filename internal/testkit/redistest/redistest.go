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
	"strings"
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
	// confFirst is a configuration file given before every option (a sentinel's).
	confFirst string
	cmd       *exec.Cmd
	done      chan struct{}
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
		var err error
		if port, err = freePort(); err != nil {
			return nil, err
		}
	}
	s := &Server{Addr: net.JoinHostPort("127.0.0.1", strconv.Itoa(port)), Dir: dir, bin: bin, args: args}
	return s, s.start()
}

func (s *Server) start() error {
	_, port, _ := net.SplitHostPort(s.Addr)
	var all []string
	if s.confFirst != "" {
		all = append(all, s.confFirst)
	}
	all = append(all, "--bind", "127.0.0.1", "--port", port, "--dir", s.Dir,
		"--save", "", "--appendonly", "no", "--daemonize", "no", "--loglevel", "warning",
		"--logfile", filepath.Join(s.Dir, "redis.log"))
	all = append(all, s.args...)
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

// Cluster is a Redis Cluster a test started on loopback: masters with replicas, each
// node its own redis-server process in its own directory.
type Cluster struct {
	// Nodes are every node, in the order started; which is a master changes with a
	// failover (Master tells).
	Nodes []*Server
	// URL names every node for redisstore.Open: redis+cluster://node1?addr=node2&...
	URL string
}

// ClusterNodeTimeout is the cluster-node-timeout of the clusters StartCluster starts:
// a master unreachable for longer is failed over to its replica.
const ClusterNodeTimeout = time.Second

// StartCluster starts a Redis Cluster of masters masters, each with replicas replicas,
// with redis-cli --cluster create, waits until every node says the cluster is ok, and
// stops every node when the test ends. It needs redis-cli beside redis-server.
func StartCluster(t testing.TB, masters, replicas int) *Cluster {
	t.Helper()
	bin := Need(t)
	cli, err := exec.LookPath("redis-cli")
	if err != nil {
		t.Fatalf("redis-cli not found (apt-get install -y redis-tools): %v", err)
	}
	c := &Cluster{}
	var addrs []string
	for i := range masters * (1 + replicas) {
		dir := filepath.Join(t.TempDir(), fmt.Sprintf("node%d", i))
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		// The cluster bus port, by default the client port + 10,000, is chosen free too:
		// the default one could belong to another test's server.
		bus, err := freePort()
		if err != nil {
			t.Fatal(err)
		}
		s, err := Launch(bin, dir, 0, "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
			"--cluster-port", strconv.Itoa(bus),
			"--cluster-node-timeout", strconv.Itoa(int(ClusterNodeTimeout/time.Millisecond)), "--repl-diskless-sync-delay", "0")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(s.Stop)
		c.Nodes = append(c.Nodes, s)
		addrs = append(addrs, s.Addr)
	}
	args := append([]string{"--cluster", "create"}, addrs...)
	args = append(args, "--cluster-replicas", strconv.Itoa(replicas), "--cluster-yes")
	if out, err := exec.Command(cli, args...).CombinedOutput(); err != nil {
		t.Fatalf("redis-cli %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	c.URL = "redis+cluster://" + addrs[0] + "?addr=" + strings.Join(addrs[1:], "&addr=")
	c.WaitOK(t, 30*time.Second)
	// A replica that never finished its first sync is not eligible for a failover (its
	// data is too old): wait for every replica to be in sync.
	waitFor(t, 30*time.Second, "every replica in sync with its master", func() bool {
		synced := 0
		for _, s := range c.Nodes {
			if inSync(s.Addr) {
				synced++
			}
		}
		return synced == masters*replicas
	})
	return c
}

// inSync reports whether the node at addr is a replica whose link to its master is up
// and whose first sync is done.
func inSync(addr string) bool {
	rdb := redis.NewClient(&redis.Options{Addr: addr})
	defer rdb.Close()
	info, err := rdb.Info(context.Background(), "replication").Result()
	return err == nil && strings.Contains(info, "role:slave") && strings.Contains(info, "master_link_status:up") &&
		strings.Contains(info, "master_sync_in_progress:0")
}

// WaitOK waits until every running node says cluster_state:ok and knows every other
// running node, and every slot is served by a running master.
func (c *Cluster) WaitOK(t testing.TB, timeout time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		why := c.notOK()
		if why == "" {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("Redis Cluster not ok after %v: %s\n%s", timeout, why, c.describe())
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func (c *Cluster) notOK() string {
	ctx := context.Background()
	for _, s := range c.Nodes {
		if !s.Running() {
			continue
		}
		rdb := redis.NewClient(&redis.Options{Addr: s.Addr})
		info, err := rdb.ClusterInfo(ctx).Result()
		var slots []redis.ClusterSlot
		if err == nil {
			slots, err = rdb.ClusterSlots(ctx).Result()
		}
		rdb.Close()
		if err != nil {
			return fmt.Sprintf("%s: %v", s.Addr, err)
		}
		if !strings.Contains(info, "cluster_state:ok") {
			return s.Addr + " says the cluster is not ok"
		}
		served := 0
		for _, sl := range slots {
			if len(sl.Nodes) == 0 || !c.running(sl.Nodes[0].Addr) {
				return fmt.Sprintf("%s: slots %d-%d are served by %v, which is down", s.Addr, sl.Start, sl.End, sl.Nodes)
			}
			served += sl.End - sl.Start + 1
		}
		if served != 16384 {
			return fmt.Sprintf("%s: %d of 16384 slots served", s.Addr, served)
		}
	}
	return ""
}

// describe is what a running node says of the cluster, and the end of every node's
// log, for a failure message.
func (c *Cluster) describe() string {
	var b strings.Builder
	for _, s := range c.Nodes {
		if s.Running() {
			rdb := redis.NewClient(&redis.Options{Addr: s.Addr})
			nodes, _ := rdb.ClusterNodes(context.Background()).Result()
			rdb.Close()
			fmt.Fprintf(&b, "CLUSTER NODES from %s:\n%s\n", s.Addr, nodes)
			break
		}
	}
	for _, s := range c.Nodes {
		log, _ := os.ReadFile(filepath.Join(s.Dir, "redis.log"))
		lines := strings.Split(strings.TrimSpace(string(log)), "\n")
		fmt.Fprintf(&b, "log of %s (running %v):\n%s\n", s.Addr, s.Running(), strings.Join(lines[max(0, len(lines)-8):], "\n"))
	}
	return b.String()
}

func (c *Cluster) running(addr string) bool {
	for _, s := range c.Nodes {
		if s.Addr == addr {
			return s.Running()
		}
	}
	return false
}

// MasterOf returns the running node that serves key's slot now, as the cluster says.
func (c *Cluster) MasterOf(t testing.TB, key string) *Server {
	t.Helper()
	rdb := redis.NewClusterClient(&redis.ClusterOptions{Addrs: c.addrs()})
	defer rdb.Close()
	node, err := rdb.MasterForKey(context.Background(), key)
	if err != nil {
		t.Fatalf("the master of %q: %v", key, err)
	}
	addr := node.Options().Addr
	for _, s := range c.Nodes {
		if s.Addr == addr {
			return s
		}
	}
	t.Fatalf("the master of %q is %s, not a node of this cluster", key, addr)
	return nil
}

// Client returns a cluster client for the running nodes; the test closes it.
func (c *Cluster) Client() *redis.ClusterClient {
	return redis.NewClusterClient(&redis.ClusterOptions{Addrs: c.addrs(), ClusterStateReloadInterval: time.Second})
}

func (c *Cluster) addrs() []string {
	var out []string
	for _, s := range c.Nodes {
		if s.Running() {
			out = append(out, s.Addr)
		}
	}
	return out
}

// Running reports whether the server's process has not exited.
func (s *Server) Running() bool {
	select {
	case <-s.done:
		return false
	default:
		return true
	}
}

// Sentinel is a Redis master with one replica, watched by three sentinels, all on
// loopback: a master down for SentinelDownAfter is failed over to the replica.
type Sentinel struct {
	Master, Replica *Server
	Sentinels       []*Server
	// URL names the sentinels for redisstore.Open:
	// redis+sentinel://s1?addr=s2&addr=s3&master_name=<MasterName>
	URL string
}

// SentinelMaster is the name the sentinels monitor the master under; SentinelDownAfter
// is their down-after-milliseconds.
const (
	SentinelMaster    = "sealcast"
	SentinelDownAfter = time.Second
)

// StartSentinel starts a master, its replica (linked and in sync) and three sentinels
// that monitor it with a quorum of two, and stops them when the test ends.
func StartSentinel(t testing.TB) *Sentinel {
	t.Helper()
	bin := Need(t)
	sub := func(name string) string {
		dir := filepath.Join(t.TempDir(), name)
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		return dir
	}
	master, err := Launch(bin, sub("master"), 0, "--repl-diskless-sync-delay", "0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(master.Stop)
	mhost, mport, _ := net.SplitHostPort(master.Addr)
	replica, err := Launch(bin, sub("replica"), 0, "--replicaof", mhost, mport)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(replica.Stop)
	waitFor(t, 20*time.Second, "the replica in sync with the master", func() bool { return inSync(replica.Addr) })
	st := &Sentinel{Master: master, Replica: replica}
	var addrs []string
	for i := range 3 {
		dir := sub(fmt.Sprintf("sentinel%d", i))
		conf := filepath.Join(dir, "sentinel.conf")
		text := fmt.Sprintf("sentinel monitor %s %s %s 2\nsentinel down-after-milliseconds %s %d\nsentinel failover-timeout %s 10000\nsentinel parallel-syncs %s 1\n",
			SentinelMaster, mhost, mport, SentinelMaster, SentinelDownAfter.Milliseconds(), SentinelMaster, SentinelMaster)
		if err := os.WriteFile(conf, []byte(text), 0o644); err != nil {
			t.Fatal(err)
		}
		s, err := launchSentinel(bin, dir, conf)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(s.Stop)
		st.Sentinels = append(st.Sentinels, s)
		addrs = append(addrs, s.Addr)
	}
	st.URL = "redis+sentinel://" + addrs[0] + "?addr=" + addrs[1] + "&addr=" + addrs[2] + "&master_name=" + SentinelMaster
	waitFor(t, 30*time.Second, "every sentinel knowing the replica and the other sentinels", func() bool {
		for _, s := range st.Sentinels {
			rdb := redis.NewSentinelClient(&redis.Options{Addr: s.Addr})
			m, err := rdb.Master(context.Background(), SentinelMaster).Result()
			rdb.Close()
			if err != nil || m["num-slaves"] != "1" || m["num-other-sentinels"] != "2" {
				return false
			}
		}
		return true
	})
	return st
}

// Client returns a client that asks the sentinels for the master; the test closes it.
func (st *Sentinel) Client() *redis.Client {
	var addrs []string
	for _, s := range st.Sentinels {
		addrs = append(addrs, s.Addr)
	}
	return redis.NewFailoverClient(&redis.FailoverOptions{MasterName: SentinelMaster, SentinelAddrs: addrs})
}

// MasterAddr asks the sentinels which node is the master now.
func (st *Sentinel) MasterAddr(t testing.TB) string {
	t.Helper()
	for _, s := range st.Sentinels {
		if !s.Running() {
			continue
		}
		rdb := redis.NewSentinelClient(&redis.Options{Addr: s.Addr})
		a, err := rdb.GetMasterAddrByName(context.Background(), SentinelMaster).Result()
		rdb.Close()
		if err == nil && len(a) == 2 {
			return net.JoinHostPort(a[0], a[1])
		}
	}
	t.Fatal("no sentinel answers")
	return ""
}

// freePort returns a TCP port of 127.0.0.1 that was free a moment ago.
func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// launchSentinel runs redis-server in sentinel mode with the configuration file conf
// (which the sentinel rewrites as it learns) on a free port.
func launchSentinel(bin, dir, conf string) (*Server, error) {
	port, err := freePort()
	if err != nil {
		return nil, err
	}
	s := &Server{Addr: net.JoinHostPort("127.0.0.1", strconv.Itoa(port)), Dir: dir, bin: bin, confFirst: conf,
		args: []string{"--sentinel"}}
	return s, s.start()
}

// waitFor polls cond every 50 ms until it holds, or fails the test after timeout.
func waitFor(t testing.TB, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("waited %v for %s", timeout, what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
