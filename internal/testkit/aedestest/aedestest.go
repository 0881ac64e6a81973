// Package aedestest starts nodes of a clustered MQTT broker for tests: aedes (Node.js)
// processes running deploy/aedes/broker.js, each on a free port of 127.0.0.1, sharing
// retained messages, persistent sessions and routed publishes through one Redis, stopped
// when the test ends. Tests that need it skip when node or deploy/aedes/node_modules is
// missing, or fail under SEALCAST_REQUIRE_TOOLS=1 (as CI runs), like
// internal/testkit/mosquittotest.
//
//	r := redistest.Start(t)                // a Redis of the cluster's own
//	n1 := aedestest.Start(t, r.URL())      // n1.URL is tcp://127.0.0.1:port
//	n2 := aedestest.Start(t, r.URL())      // a second node of the same cluster
//
// # Configuration
//
// Without [WithUsers], every client may connect with any username and password, and
// publish and subscribe to every topic (except $SYS/, which the nodes use among
// themselves), as with mosquittotest's default configuration. With WithUsers, the nodes
// enforce Sealcast's access rules (PROTOCOL.md 9.2) for the given accounts; deploy/aedes/
// broker.js describes them, and what aedes does not support (MQTT 5, $share/ shared
// subscriptions).
//
// Give every cluster a Redis of its own (redistest.Start, not a shared REDIS_URL): the
// nodes' keys carry no prefix and Redis pub/sub ignores the database number.
//
// A node's output (its "listening" line, refusals and errors) is in Dir/aedes.log; the
// last lines are written to the test log if the test fails. deploy/aedes/node_modules
// comes from `npm ci --prefix deploy/aedes` (scripts/test.sh runs it).
package aedestest

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// User is an account of the users file: Role is device, updater, admin or monitor. A
// device's name is its serial and must be its client id.
type User struct {
	Password string
	Role     string
}

// Node is a running broker node.
type Node struct {
	// Addr is the MQTT listener (127.0.0.1:port); URL is "tcp://" + Addr.
	Addr, URL string
	// ID names the node in its log lines ("n1", "n2", ... unless WithID).
	ID string
	// Dir holds aedes.log and, with WithUsers, users.json.
	Dir string

	node, script string
	args         []string // flags other than --host and --port
	log          string
	cmd          *exec.Cmd
	done         chan struct{}
}

type config struct {
	users map[string]User
	id    string
	extra []string
}

// Option changes how a node is started.
type Option func(*config)

// WithUsers turns authentication and the access rules on, with these accounts (name ->
// User), written to Dir/users.json.
func WithUsers(users map[string]User) Option { return func(c *config) { c.users = users } }

// WithID names the node in its log lines.
func WithID(id string) Option { return func(c *config) { c.id = id } }

// WithArgs appends flags of broker.js, e.g. "--heartbeat-interval", "200".
func WithArgs(args ...string) Option {
	return func(c *config) { c.extra = append(c.extra, args...) }
}

var nodes atomic.Int64 // numbers the nodes of a test binary, for their default IDs

// Need returns the path of node and of deploy/aedes/broker.js, or skips the test (fails it
// under SEALCAST_REQUIRE_TOOLS=1) if node or deploy/aedes/node_modules is missing.
func Need(t testing.TB) (node, script string) {
	t.Helper()
	missing := func(what string) {
		t.Helper()
		if os.Getenv("SEALCAST_REQUIRE_TOOLS") == "1" {
			t.Fatalf("%s (apt-get install -y nodejs npm, then run npm ci --prefix deploy/aedes)", what)
		}
		t.Skipf("%s; skipping (run npm ci --prefix deploy/aedes; set SEALCAST_REQUIRE_TOOLS=1 to fail instead)", what)
	}
	node, err := exec.LookPath("node")
	if err != nil {
		missing(fmt.Sprintf("node not found: %v", err))
	}
	root, err := moduleRoot()
	if err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(root, "deploy", "aedes")
	if _, err := os.Stat(filepath.Join(dir, "node_modules", "aedes", "package.json")); err != nil {
		missing(fmt.Sprintf("%s has no aedes", filepath.Join(dir, "node_modules")))
	}
	return node, filepath.Join(dir, "broker.js")
}

// moduleRoot walks up from the working directory (a test's is its package's directory)
// to the directory holding go.mod.
func moduleRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("aedestest: no go.mod above the working directory")
		}
		dir = parent
	}
}

// Start starts a broker node using the Redis at redisURL (a redis:// URL) and stops it
// when the test ends. Nodes started with the same Redis form one cluster.
func Start(t testing.TB, redisURL string, opts ...Option) *Node {
	t.Helper()
	var c config
	for _, o := range opts {
		o(&c)
	}
	if c.id == "" {
		c.id = "n" + strconv.FormatInt(nodes.Add(1), 10)
	}
	n := &Node{ID: c.id, Dir: t.TempDir()}
	n.node, n.script = Need(t)
	n.log = filepath.Join(n.Dir, "aedes.log")
	n.args = []string{"--redis", redisURL, "--id", c.id}
	if c.users != nil {
		path := filepath.Join(n.Dir, "users.json")
		writeUsers(t, path, c.users)
		n.args = append(n.args, "--users", path)
	}
	n.args = append(n.args, c.extra...)
	t.Cleanup(func() {
		n.Stop()
		if t.Failed() {
			t.Logf("aedes %s log (last lines):\n%s", n.ID, n.logTail(40))
		}
	})
	// A free port can be taken between choosing it and node binding it; try again.
	var err error
	for attempt := 0; attempt < 3; attempt++ {
		n.Addr = freeAddr(t)
		if err = n.start(); err == nil {
			break
		}
	}
	if err != nil {
		t.Fatal(err)
	}
	n.URL = "tcp://" + n.Addr
	return n
}

func writeUsers(t testing.TB, path string, users map[string]User) {
	t.Helper()
	type entry struct {
		PasswordSHA256 string `json:"password_sha256"`
		Role           string `json:"role"`
	}
	doc := struct {
		Users map[string]entry `json:"users"`
	}{Users: map[string]entry{}}
	for name, u := range users {
		sum := sha256.Sum256([]byte(u.Password))
		doc.Users[name] = entry{PasswordSHA256: hex.EncodeToString(sum[:]), Role: u.Role}
	}
	b, err := json.MarshalIndent(doc, "", "  ")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
}

// start runs the node and waits until it prints its "listening" line.
func (n *Node) start() error {
	f, err := os.OpenFile(n.log, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return err
	}
	defer f.Close() // the child has its own copy
	st, err := f.Stat()
	if err != nil {
		return err
	}
	from := st.Size() // a restart appends: look for the line after this offset
	host, port, _ := net.SplitHostPort(n.Addr)
	n.cmd = exec.Command(n.node, append([]string{n.script, "--host", host, "--port", port}, n.args...)...)
	n.cmd.Stdout, n.cmd.Stderr = f, f
	if err := n.cmd.Start(); err != nil {
		return fmt.Errorf("aedestest: starting %s: %w", n.node, err)
	}
	done := make(chan struct{})
	n.done = done
	cmd := n.cmd
	go func() { cmd.Wait(); close(done) }()
	want := []byte(fmt.Sprintf("aedes %s listening on %s\n", n.ID, n.Addr))
	deadline := time.Now().Add(20 * time.Second)
	for {
		if b, err := os.ReadFile(n.log); err == nil && int64(len(b)) > from && bytes.Contains(b[from:], want) {
			return nil
		}
		select {
		case <-done:
			return fmt.Errorf("aedestest: node %s exited at start (%v):\n%s", n.ID, cmd.ProcessState, n.logTail(20))
		default:
		}
		if time.Now().After(deadline) {
			n.Kill()
			return fmt.Errorf("aedestest: node %s does not listen on %s after 20 s:\n%s", n.ID, n.Addr, n.logTail(20))
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// SetUsers replaces the accounts of a node started WithUsers and has it re-read them
// (SIGHUP), as an operator does after provisioning devices. The node reads the file
// asynchronously: a client of a new account may need to retry its first connection.
func (n *Node) SetUsers(t testing.TB, users map[string]User) {
	t.Helper()
	path := filepath.Join(n.Dir, "users.json")
	if !slices.Contains(n.args, path) {
		t.Fatal("aedestest: SetUsers on a node started without WithUsers")
	}
	writeUsers(t, path, users)
	if err := n.cmd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatalf("aedestest: SIGHUP to node %s: %v", n.ID, err)
	}
}

// Kill stops the node abruptly (SIGKILL), as a crash would: its clients' connections
// drop, and what it had only in memory (clean sessions, messages in flight) is lost.
func (n *Node) Kill() {
	n.cmd.Process.Kill()
	<-n.done
}

// Stop stops the node cleanly (SIGTERM) if it is running, and waits for it to exit.
func (n *Node) Stop() {
	if n.cmd == nil {
		return
	}
	select {
	case <-n.done:
		return
	default:
	}
	n.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-n.done:
	case <-time.After(10 * time.Second):
		n.Kill()
	}
}

// Restart stops the node cleanly and starts it again on the same port. Clients see their
// connections drop; everything the cluster keeps in Redis survives.
func (n *Node) Restart(t testing.TB) {
	t.Helper()
	n.Stop()
	var err error
	for deadline := time.Now().Add(10 * time.Second); ; {
		if err = n.start(); err == nil || time.Now().After(deadline) {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if err != nil {
		t.Fatal(err)
	}
}

func (n *Node) logTail(lines int) string {
	b, err := os.ReadFile(n.log)
	if err != nil {
		return "(no log: " + err.Error() + ")"
	}
	l := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	return strings.Join(l[max(0, len(l)-lines):], "\n")
}

func freeAddr(t testing.TB) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return net.JoinHostPort("127.0.0.1", strconv.Itoa(l.Addr().(*net.TCPAddr).Port))
}
