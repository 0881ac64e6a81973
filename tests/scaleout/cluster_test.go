package scaleout_test

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"maps"
	"net"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	mqtt "github.com/eclipse/paho.mqtt.golang"

	"github.com/sealcast/sealcast/internal/testkit/aedestest"
	"github.com/sealcast/sealcast/internal/testkit/redistest"
	"github.com/sealcast/sealcast/protocol"
)

// TestClusteredBroker runs Sealcast on a clustered MQTT broker: two aedes nodes sharing
// retained messages, persistent sessions and routing through one Redis (deploy/aedes),
// with the access rules on (every device logs in with its derived password), behind a
// TCP load balancer that spreads the 1,000 simulated devices over both nodes. Two
// updaters share the store: updater-a on node a serves admin requests and releases,
// updater-b reaches the cluster through the balancer and is -acks-only. aedes has no
// shared subscriptions ($share), so both receive every ack: the store's compare-and-set
// lets one of them move each counter (the other's copy is a duplicate), which keeps it
// correct and makes the second updater a standby, not more throughput (OPERATIONS.md 6.5).
//
// In the middle of the release node b is killed (SIGKILL): its devices, and updater-b,
// reconnect through the balancer to node a and finish. Every device installs, the
// release completes with each device counted once, no counter moves twice, both
// updaters processed acks; node b, started again, serves the same retained topics as
// node a (they live in Redis).
func TestClusteredBroker(t *testing.T) {
	n := envInt("SEALCAST_SCALE_DEVICES", 1000)
	brokerRedis, storeRedis := redistest.Start(t), redistest.Start(t)
	users := map[string]aedestest.User{
		"updater-a":    {Password: "pw-a", Role: "updater"},
		"updater-b":    {Password: "pw-b", Role: "updater"},
		"admin":        {Password: "admin", Role: "admin"},
		"key-watcher":  {Password: "key-watcher", Role: "updater"},
		"retained-cmp": {Password: "retained-cmp", Role: "updater"},
	}
	// A short heartbeat: a killed node's clients are known gone within a second.
	a := aedestest.Start(t, brokerRedis.URL(), aedestest.WithID("a"), aedestest.WithUsers(users), aedestest.WithArgs("--heartbeat-interval", "300"))
	b := aedestest.Start(t, brokerRedis.URL(), aedestest.WithID("b"), aedestest.WithUsers(users), aedestest.WithArgs("--heartbeat-interval", "300"))
	lb := startBalancer(t, a.Addr, b.Addr)
	// Node c, outside the balancer, only serves the comparison of retained messages.
	c := aedestest.Start(t, brokerRedis.URL(), aedestest.WithID("c"), aedestest.WithUsers(users), aedestest.WithArgs("--heartbeat-interval", "300"))

	dirA := dataDir(t, "")
	common := []string{"-redis", storeRedis.URL(), "-http", "127.0.0.1:0", "-chain-length", "16"}
	upA := startServe(t, "updater-a", nil, append([]string{"-data", dirA, "-external-broker", a.URL,
		"-broker-user", "updater-a", "-broker-password", "pw-a"}, common...)...)
	upB := startServe(t, "updater-b", nil, append([]string{"-data", dataDir(t, dirA), "-acks-only", "-external-broker", lb.URL(),
		"-broker-user", "updater-b", "-broker-password", "pw-b"}, common...)...)
	op := dialOperator(t, a.URL)
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()

	files, err := op.Provision(ctx, serials("dev", n), 0)
	if err != nil {
		t.Fatal(err)
	}
	// The devices' accounts, from their device files (OPERATIONS.md 6.3), on both nodes.
	all := maps.Clone(users)
	for _, f := range files {
		all[f.Broker.Username] = aedestest.User{Password: f.Broker.Password, Role: "device"}
	}
	a.SetUsers(t, all)
	b.SetUsers(t, all)

	lb.count.Store(0)
	fleet := startAgents(t, ctx, files, lb.URL())
	eventually(t, time.Minute, "every device connected through the balancer", func() bool { return lb.count.Load() >= int64(n) })

	img := randomImage(2 << 10) // one chunk: aedes is slow to serve many (docs/BENCHMARKS.md)
	start := time.Now()
	rel, err := op.Release(ctx, bytes.NewReader(img), int64(len(img)), protocol.ReleaseCreateArgs{Version: 1, All: true, ChunkSize: 4096})
	if err != nil {
		t.Fatal(err)
	}
	// Node b dies when a tenth of the devices have installed.
	eventually(t, 2*time.Minute, "a tenth of the devices installed", func() bool {
		st, err := op.ReleaseStatus(ctx, rel.Release)
		return err == nil && st.Installed >= n/10
	})
	st, _ := op.ReleaseStatus(ctx, rel.Release)
	connsBefore := lb.count.Load()
	b.Kill()
	killed := time.Now()
	t.Logf("killed node b %v after the release was created, with %d of %d devices installed", killed.Sub(start).Round(time.Millisecond), st.Installed, n)
	if st.Installed >= n {
		t.Fatalf("the kill came after the release: %d of %d installed", st.Installed, n)
	}

	sum := fleet.wait(t, ctx)
	completed(t, ctx, op, rel.Release, n, 2*time.Minute)
	reconnects := lb.count.Load() - connsBefore
	t.Logf("release completed %v after the kill; %d connections through the balancer after it; devices: %v",
		time.Since(killed).Round(time.Millisecond), reconnects, sum)
	if reconnects == 0 {
		t.Error("no device reconnected after node b died: the kill tested nothing")
	}
	// No key watcher here: on this cluster a subscriber to sealcast/devices/+/key misses
	// the key messages of the devices that subscribed to theirs (OPERATIONS.md 6.5).
	checkCounters(t, storeRedis.URL(), files, 1)
	ra, rb := acksReceived(upA), acksReceived(upB)
	acceptedA, acceptedB := upA.metric("sealcast_acks_accepted_total"), upB.metric("sealcast_acks_accepted_total")
	t.Logf("acks taken off the wire: updater-a %v, updater-b %v; accepted: %v and %v", ra, rb, acceptedA, acceptedB)
	if ra == 0 || rb == 0 {
		t.Errorf("an updater processed no ack: a %v, b %v", ra, rb)
	}
	if acceptedA+acceptedB != float64(n) {
		t.Errorf("accepted acks: %v + %v, want %d in all (each counter moves once)", acceptedA, acceptedB, n)
	}

	// Node b again: it serves what the cluster keeps in Redis, the same as node a.
	b.Restart(t)
	filters := []string{protocol.StatusFilter, protocol.KeyFilter, protocol.ReceiptFilter, protocol.Root + "/releases/#"}
	onA, onB := retainedOn(t, a.URL, filters), retainedOn(t, b.URL, filters)
	if diff := retainedDiff(onA, retainedOn(t, c.URL, filters)); diff != "" {
		t.Errorf("nodes a and c retain different messages: %s", diff)
	}
	if len(onA) < 2*n {
		t.Errorf("node a retains %d messages under %v; want at least a receipt and a device status per device", len(onA), filters)
	}
	if diff := retainedDiff(onA, onB); diff != "" {
		t.Errorf("the nodes retain different messages: %s", diff)
	}
}

// retainedOn collects the retained messages under filters, as a new client connected
// to url gets them: topic -> payload. It waits until none has come for a second.
func retainedOn(t *testing.T, url string, filters []string) map[string]string {
	t.Helper()
	var mu sync.Mutex
	got := map[string]string{}
	last := time.Now()
	c := connectClient(t, url, "retained-cmp")
	for _, f := range filters {
		subscribe(t, c, f, func(_ mqtt.Client, m mqtt.Message) {
			if !m.Retained() {
				return
			}
			mu.Lock()
			got[m.Topic()] = string(m.Payload())
			last = time.Now()
			mu.Unlock()
		})
	}
	eventually(t, time.Minute, "the retained messages of "+url, func() bool {
		mu.Lock()
		defer mu.Unlock()
		return time.Since(last) > time.Second
	})
	c.Disconnect(100)
	mu.Lock()
	defer mu.Unlock()
	return maps.Clone(got)
}

// retainedDiff describes how two sets of retained messages differ, or returns "".
func retainedDiff(a, b map[string]string) string {
	var only, differ []string
	for topic, pa := range a {
		if pb, ok := b[topic]; !ok {
			only = append(only, "a:"+topic)
		} else if pa != pb && topic != protocol.FleetStatusTopic { // the fleet's is published again now and then
			differ = append(differ, topic)
		}
	}
	for topic := range b {
		if _, ok := a[topic]; !ok {
			only = append(only, "b:"+topic)
		}
	}
	if len(only)+len(differ) == 0 {
		return ""
	}
	slices.Sort(only)
	slices.Sort(differ)
	return "only on one node: " + summarize(only) + "; different payloads: " + summarize(differ)
}

func summarize(s []string) string {
	if len(s) > 5 {
		return fmt.Sprintf("%q and %d more", s[:5], len(s)-5)
	}
	return fmt.Sprintf("%q", s)
}

// balancer is a TCP load balancer on loopback in front of a clustered broker's nodes, as
// operators put one: each new connection goes to the next node in turn that accepts it;
// a connection ends when either side closes it.
type balancer struct {
	l        net.Listener
	backends []string
	next     atomic.Int64
	count    atomic.Int64 // connections passed to a node
	wg       sync.WaitGroup
	mu       sync.Mutex
	conns    map[net.Conn]bool
}

func startBalancer(t *testing.T, backends ...string) *balancer {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	lb := &balancer{l: l, backends: backends, conns: map[net.Conn]bool{}}
	lb.wg.Add(1)
	go func() {
		defer lb.wg.Done()
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			lb.wg.Add(1)
			go func() { defer lb.wg.Done(); lb.serve(c) }()
		}
	}()
	t.Cleanup(func() {
		l.Close()
		lb.mu.Lock()
		for c := range lb.conns {
			c.Close()
		}
		lb.mu.Unlock()
		lb.wg.Wait()
	})
	return lb
}

// URL is the balancer's address as an MQTT URL.
func (lb *balancer) URL() string { return "tcp://" + lb.l.Addr().String() }

func (lb *balancer) serve(c net.Conn) {
	first := int(lb.next.Add(1))
	var up net.Conn
	for i := range lb.backends {
		var err error
		if up, err = net.DialTimeout("tcp", lb.backends[(first+i)%len(lb.backends)], time.Second); err == nil {
			break
		}
	}
	if up == nil {
		c.Close()
		return
	}
	lb.count.Add(1)
	lb.mu.Lock()
	lb.conns[c], lb.conns[up] = true, true
	lb.mu.Unlock()
	var once sync.Once
	closeBoth := func() {
		once.Do(func() {
			c.Close()
			up.Close()
			lb.mu.Lock()
			delete(lb.conns, c)
			delete(lb.conns, up)
			lb.mu.Unlock()
		})
	}
	go func() { io.Copy(up, c); closeBoth() }()
	io.Copy(c, up)
	closeBoth()
}
