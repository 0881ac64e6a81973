package broker_test

import (
	"bytes"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/sealcast/sealcast/broker"
	"github.com/sealcast/sealcast/internal/brokertest"
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
// device connection at 5,000 connections. It only logs (never asserts a figure) and runs
// with SEALCAST_HEAVY=1:
//
//	SEALCAST_HEAVY=1 go test -run TestIdleConnectionMemory -v ./broker/
//
// The clients are raw TCP connections in the same process with hand-encoded CONNECTs
// (no client library, no client goroutines), so the client side adds only its socket
// (about 0.3 KiB); the figure is therefore a slight over-estimate for the broker.
func TestIdleConnectionMemory(t *testing.T) {
	if os.Getenv("SEALCAST_HEAVY") != "1" {
		t.Skip("set SEALCAST_HEAVY=1 to run (opens 5,000 connections)")
	}
	const n = 5000
	env := brokertest.Start(t, brokertest.WithOptions(func(o *broker.Options) { o.Logger = zerolog.Nop() }))
	conns := make([]net.Conn, 0, n)
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	// Compute passwords and packets first so they are not counted.
	pkts := make([][]byte, n)
	for i := range pkts {
		serial := fmt.Sprintf("dev-%05d", i)
		pkts[i] = connectPacket(serial, serial, env.Device(t, serial).Password, false)
	}
	stats := func() (heap, stack uint64, goroutines int) {
		runtime.GC()
		var m runtime.MemStats
		runtime.ReadMemStats(&m)
		return m.HeapInuse, m.StackInuse, runtime.NumGoroutine()
	}
	h0, s0, g0 := stats()
	start := time.Now()
	ack := make([]byte, 4)
	for i := range n {
		c, err := net.Dial("tcp", env.Addr)
		if err != nil {
			t.Fatalf("connection %d: %v", i, err)
		}
		conns = append(conns, c)
		if _, err := c.Write(pkts[i]); err != nil {
			t.Fatal(err)
		}
		if _, err := io.ReadFull(c, ack); err != nil || ack[3] != 0 {
			t.Fatalf("connection %d: CONNACK %x %v", i, ack, err)
		}
	}
	elapsed := time.Since(start)
	pkts = nil
	h1, s1, g1 := stats()
	perConn := float64((h1+s1)-(h0+s0)) / n
	t.Logf("%d idle devices connected in %v; heap +%.1f MiB, stacks +%.1f MiB, goroutines +%d",
		n, elapsed.Round(time.Millisecond), float64(h1-h0)/(1<<20), float64(s1-s0)/(1<<20), g1-g0)
	t.Logf("memory per idle connection: %.1f KiB (heap in use + stack in use, after GC)", perConn/1024)
	if got := env.Broker.Stats().Connected; got != n {
		t.Errorf("Stats().Connected = %d, want %d", got, n)
	}
}
