package broker_test

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/sealcast/sealcast/broker"
	"github.com/sealcast/sealcast/internal/testkit/brokertest"
)

func heapInUse() uint64 {
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return m.HeapInuse
}

// TestOversizePacketRefused: a header claiming a packet over Limits.MaxPacketSize closes
// the connection before the broker allocates the claimed size, both before and after
// authentication.
func TestOversizePacketRefused(t *testing.T) {
	env := brokertest.Start(t)
	const claimed = 256<<20 - 1 // the largest remaining length MQTT can encode
	before := heapInUse()

	// An unauthenticated client: a CONNECT header claiming 256 MiB.
	c := dialRaw(t, env.Addr)
	c.send(appendLen([]byte{0x10}, claimed))
	c.send(make([]byte, 1024))
	if _, err := c.read(5 * time.Second); err == nil {
		t.Fatal("oversize CONNECT: connection still open")
	}

	// An authenticated device: a PUBLISH header claiming 256 MiB.
	d, code := connectRaw(t, env.Addr, "dev-a", "dev-a", env.Device(t, "dev-a").Password, true)
	if code != 0 {
		t.Fatalf("CONNACK %#x", code)
	}
	d.send(appendLen([]byte{0x32}, claimed))
	d.send(make([]byte, 1024))
	if _, err := d.read(5 * time.Second); err == nil {
		t.Fatal("oversize PUBLISH: connection still open")
	}
	after := heapInUse()
	if after > before+16<<20 {
		t.Fatalf("heap in use grew from %d to %d bytes after oversize headers", before, after)
	}
	t.Logf("heap in use before %d KiB, after %d KiB", before>>10, after>>10)
}

// TestLargestMessageAccepted: a chunk of 1 MiB + 16 bytes (PROTOCOL.md 9) passes.
func TestLargestMessageAccepted(t *testing.T) {
	env := brokertest.Start(t)
	upd := pahoClient(t, env, "updater-1", env.Updater, true)
	dev := pahoClient(t, env, "dev-a", env.Device(t, "dev-a"), true)
	got := newCollector()
	subscribe(t, dev, "sealcast/releases/r1/chunks/0", got)
	chunk := bytes.Repeat([]byte{0xa5}, 1<<20+16)
	publish(t, upd, "sealcast/releases/r1/chunks/0", 1, true, string(chunk))
	m, ok := got.next(t, 10*time.Second)
	if !ok || !bytes.Equal(m.Payload(), chunk) {
		t.Fatal("the largest chunk did not arrive intact")
	}
}

// TestConnectTimeout: a connection that never sends CONNECT is closed.
func TestConnectTimeout(t *testing.T) {
	env := brokertest.Start(t, brokertest.WithOptions(func(o *broker.Options) {
		o.Limits.ConnectTimeout = 200 * time.Millisecond
	}))
	c := dialRaw(t, env.Addr)
	start := time.Now()
	if _, err := c.read(5 * time.Second); err == nil || time.Since(start) > 4*time.Second {
		t.Fatalf("silent connection not closed by the connect timeout (err %v)", err)
	}
}

func TestHealthAndWebSocket(t *testing.T) {
	env := brokertest.Start(t, brokertest.WithOptions(func(o *broker.Options) {
		o.HealthAddr, o.WSAddr = "127.0.0.1:0", "127.0.0.1:0"
	}))
	resp, err := http.Get("http://" + env.Broker.Addr(broker.ListenerHealth).String() + "/healthz")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || strings.TrimSpace(string(body)) != "ok" {
		t.Fatalf("healthz: %d %q", resp.StatusCode, body)
	}
	wsEnv := *env
	wsEnv.URL = "ws://" + env.Broker.Addr(broker.ListenerWS).String() + "/mqtt"
	dev := pahoClient(t, &wsEnv, "dev-w", env.Device(t, "dev-w"), true)
	if code := subscribe(t, dev, "sealcast/devices/dev-w/key", nil); code != 1 {
		t.Fatalf("SUBACK over WebSocket %#x", code)
	}
}

func TestSysTopics(t *testing.T) {
	env := brokertest.Start(t, brokertest.WithOptions(func(o *broker.Options) {
		o.Limits.SysInterval = time.Second
	}))
	adm := pahoClient(t, env, "admin-1", env.Admin, true)
	got := newCollector()
	subscribe(t, adm, "$SYS/broker/clients/connected", got)
	if _, ok := got.next(t, 5*time.Second); !ok {
		t.Fatal("no $SYS statistics")
	}
}

// TestIdleConnectionMemory measures the heap and stacks held per idle, authenticated
// device connection at 5,000 connections (SEALCAST_IDLE_CONNS sets another count;
// scripts/bench.sh uses 10,000). It only logs (never asserts a figure) and runs with
// SEALCAST_HEAVY=1:
//
//	SEALCAST_HEAVY=1 SEALCAST_IDLE_CONNS=10000 go test -run TestIdleConnectionMemory -v ./broker/
//
// The clients are raw TCP connections with hand-encoded CONNECTs (no client library) held
// by a child process (this test binary running TestIdleClients), so that this process
// holds only the broker's side: one file descriptor per connection, and no client
// memory in the figure.
func TestIdleConnectionMemory(t *testing.T) {
	if os.Getenv("SEALCAST_HEAVY") != "1" {
		t.Skip("set SEALCAST_HEAVY=1 to run (opens 5,000 connections)")
	}
	n := 5000
	if v := os.Getenv("SEALCAST_IDLE_CONNS"); v != "" {
		var err error
		if n, err = strconv.Atoi(v); err != nil || n < 1 {
			t.Fatalf("SEALCAST_IDLE_CONNS=%q: want a positive number of connections", v)
		}
	}
	env := brokertest.Start(t, brokertest.WithOptions(func(o *broker.Options) { o.Logger = zerolog.Nop() }))
	// Credentials go to the child in a file: serial and password, one device a line.
	var creds strings.Builder
	for i := range n {
		serial := fmt.Sprintf("dev-%05d", i)
		fmt.Fprintf(&creds, "%s %s\n", serial, env.Device(t, serial).Password)
	}
	credFile := filepath.Join(t.TempDir(), "creds")
	if err := os.WriteFile(credFile, []byte(creds.String()), 0o600); err != nil {
		t.Fatal(err)
	}
	creds.Reset()
	stats := func() (heap, stack uint64, goroutines int) {
		runtime.GC()
		var m runtime.MemStats
		runtime.ReadMemStats(&m)
		return m.HeapInuse, m.StackInuse, runtime.NumGoroutine()
	}
	h0, s0, g0 := stats()
	rss0 := vmRSS()

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	child := exec.CommandContext(ctx, os.Args[0], "-test.run=^TestIdleClients$", "-test.v")
	child.Env = append(os.Environ(), "SEALCAST_IDLE_CLIENTS="+env.Addr+" "+credFile)
	child.Stderr = os.Stderr
	in, err := child.StdinPipe() // closing it tells the child to disconnect and exit
	if err != nil {
		t.Fatal(err)
	}
	out, err := child.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	if err := child.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() {
		in.Close()
		child.Wait()
	}()
	sc := bufio.NewScanner(out)
	connected := false
	for sc.Scan() {
		line := sc.Text()
		t.Log("client process: " + line)
		if strings.HasPrefix(line, "connected ") {
			connected = true
			break
		}
	}
	if !connected {
		t.Fatal("the client process ended before connecting every client (see its output above)")
	}
	go io.Copy(io.Discard, out)
	elapsed := time.Since(start)
	h1, s1, g1 := stats()
	rss1 := vmRSS()
	perConn := float64((h1+s1)-(h0+s0)) / float64(n)
	t.Logf("%d idle devices connected in %v; heap +%.1f MiB, stacks +%.1f MiB, goroutines +%d",
		n, elapsed.Round(time.Millisecond), float64(h1-h0)/(1<<20), float64(s1-s0)/(1<<20), g1-g0)
	t.Logf("memory per idle connection: %.1f KiB (heap in use + stack in use, after GC)", perConn/1024)
	if rss0 > 0 && rss1 > 0 {
		t.Logf("resident set per idle connection: %.1f KiB (VmRSS +%.1f MiB, includes memory the GC has not returned)",
			float64(rss1-rss0)/float64(n), float64(rss1-rss0)/1024)
	}
	if got := env.Broker.Stats().Connected; got != int64(n) {
		t.Errorf("Stats().Connected = %d, want %d", got, n)
	}
}

// vmRSS returns this process's resident set in KiB from /proc (0 where there is none).
func vmRSS() int64 {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			kb, _ := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
			return kb
		}
	}
	return 0
}

// TestIdleClients is the client side of TestIdleConnectionMemory, run in a child process:
// SEALCAST_IDLE_CLIENTS is "address credentials-file". It connects every device, prints
// "connected N", and holds the connections until its standard input closes.
func TestIdleClients(t *testing.T) {
	arg := os.Getenv("SEALCAST_IDLE_CLIENTS")
	if arg == "" {
		t.Skip("the client process of TestIdleConnectionMemory")
	}
	addr, credFile, _ := strings.Cut(arg, " ")
	b, err := os.ReadFile(credFile)
	if err != nil {
		t.Fatal(err)
	}
	var conns []net.Conn
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	ack := make([]byte, 4)
	for i, line := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		serial, pw, _ := strings.Cut(line, " ")
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatalf("connection %d: %v (raise ulimit -n: each connection is a file descriptor)", i, err)
		}
		conns = append(conns, c)
		if _, err := c.Write(connectPacket(serial, serial, pw, false)); err != nil {
			t.Fatal(err)
		}
		if _, err := io.ReadFull(c, ack); err != nil || ack[3] != 0 {
			t.Fatalf("connection %d: CONNACK %x %v", i, ack, err)
		}
	}
	fmt.Printf("connected %d\n", len(conns))
	io.Copy(io.Discard, os.Stdin)
}
