package updater_test

// Benchmarks of the updater's two hot paths through real parts: the embedded broker over
// TCP loopback, paho, a real redis-server or a bbolt file (docs/BENCHMARKS.md, "Updater";
// scripts/bench-updater.sh runs them).
//
// Each reports, next to its own rate, the rate of the part that should bound it, measured
// in the same run on the same machine, so that the ratio means something on a noisy one.
//
// The broker keeps its state in memory, as internal/testkit/brokertest starts it;
// SEALCAST_BENCH_BROKER_DATADIR=1 gives it a data directory (pebble, synced writes), as
// sealcast serve runs it. The updater reaches the broker through its in-process client
// (broker.Inline), as sealcast serve runs it; SEALCAST_BENCH_BUS=mqtt makes it use
// updater/mqttbus over TCP instead (four publishing and four subscribing connections, as
// serve did before the in-process client), for a before/after comparison in one session.
// The raw reference publisher (raw-pub/s, x-broker) is of the same kind as the bus: the
// in-process client, or one paho client.

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"runtime/pprof"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	mqtt "github.com/eclipse/paho.mqtt.golang"
	"github.com/redis/go-redis/v9"
	"github.com/rs/zerolog"

	"github.com/sealcast/sealcast/broker"
	"github.com/sealcast/sealcast/internal/testkit/brokertest"
	"github.com/sealcast/sealcast/internal/testkit/redistest"
	"github.com/sealcast/sealcast/keychain"
	"github.com/sealcast/sealcast/operator"
	"github.com/sealcast/sealcast/protocol"
	"github.com/sealcast/sealcast/updater"
	"github.com/sealcast/sealcast/updater/boltstore"
	"github.com/sealcast/sealcast/updater/mqttbus"
	"github.com/sealcast/sealcast/updater/redisstore"
)

// benchChainLength is the production default, so that sealed chain states and the
// pebbling's cost per step are the real ones.
const benchChainLength = keychain.DefaultChainLength

// benchRoot is one root secret for every benchmark in the process, so that the devices
// provisioned for one benchmark serve the next.
var benchRoot = func() keychain.RootSecret {
	r, err := keychain.NewRootSecret()
	if err != nil {
		panic(err)
	}
	return r
}()

// fleet is a set of provisioned devices as the store holds them, plus what the devices
// themselves know (their chain traversals), computed once and shared by the benchmarks.
type fleet struct {
	mu   sync.Mutex
	devs []*updater.Device
	trs  [][]byte // the traversal of each device at its provisioned position, marshalled
}

var benchFleet fleet

// devices returns n devices at their first position, deriving the missing ones in
// parallel (each costs a chain of benchChainLength hashes, as provisioning does).
func (f *fleet) devices(b *testing.B, n int) ([]*updater.Device, [][]byte) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if have := len(f.devs); have < n {
		devs := make([]*updater.Device, n-have)
		trs := make([][]byte, n-have)
		var wg sync.WaitGroup
		workers := runtime.GOMAXPROCS(0)
		errs := make([]error, workers)
		for w := range workers {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := w; i < len(devs); i += workers {
					serial := fmt.Sprintf("bench-%06d", have+i)
					u, err := keychain.DeriveUnitData(benchRoot, serial, 0)
					if err != nil {
						errs[w] = err
						return
					}
					tr, err := keychain.NewTraversal(u, benchChainLength)
					if err != nil {
						errs[w] = err
						return
					}
					sealed, err := keychain.SealTraversal(benchRoot, serial, 0, tr)
					if err != nil {
						errs[w] = err
						return
					}
					trs[i], _ = tr.MarshalBinary()
					devs[i] = &updater.Device{Serial: serial, Seq: benchChainLength, ChainLength: benchChainLength,
						Chain: sealed, State: protocol.DeviceIdle, Provisioned: time.Now()}
				}
			}()
		}
		wg.Wait()
		for _, err := range errs {
			if err != nil {
				b.Fatal(err)
			}
		}
		f.devs = append(f.devs, devs...)
		f.trs = append(f.trs, trs...)
	}
	return f.devs[:n], f.trs[:n]
}

// provisionStore writes the devices into a store in batches, as many devices per call as
// a store round trip handles well.
func provisionStore(b *testing.B, s updater.Store, devs []*updater.Device) {
	const batch = 10_000
	for i := 0; i < len(devs); i += batch {
		existing, err := s.CreateDevices(b.Context(), devs[i:min(i+batch, len(devs))])
		if err != nil || len(existing) > 0 {
			b.Fatalf("provisioning: %d existed, %v", len(existing), err)
		}
	}
}

// With SEALCAST_BENCH_BUS=mqtt, the updater's link to the broker as cmd/sealcast set it
// up before the in-process client: acks through a shared subscription over several
// connections, so that a burst of acks is spread over several queues at the broker
// instead of overflowing one. The in-process bus takes acks in the same shared group.
const (
	benchPublishers  = 4
	benchSubscribers = 4
	benchAckGroup    = "sealcast"
)

// benchMQTTBus: SEALCAST_BENCH_BUS=mqtt (see the file comment).
var benchMQTTBus = os.Getenv("SEALCAST_BENCH_BUS") == "mqtt"

// benchEnv is a broker, a store and an updater with an operator client, all real.
type benchEnv struct {
	b     *testing.B
	env   *brokertest.Env
	store updater.Store
	u     *updater.Updater
	op    *operator.Client
	redis *redistest.Server // nil for bolt
	cpu   cpuMeter
	// provisioned is how long writing the devices into the store took.
	provisioned time.Duration
}

func startBench(b *testing.B, storeName string, devs []*updater.Device) *benchEnv {
	b.Helper()
	ctx := context.Background()
	be := &benchEnv{b: b}
	be.env = brokertest.Start(b, brokertest.WithOptions(func(o *broker.Options) {
		o.AuthKey = benchRoot.BrokerAuth()
		o.Logger = o.Logger.Level(zerolog.WarnLevel) // one line per connection would drown the figures
		if os.Getenv("SEALCAST_BENCH_BROKER_DATADIR") == "1" {
			// Persistent sessions and retained messages, as sealcast serve runs the broker.
			o.DataDir = b.TempDir()
		}
	}))
	switch storeName {
	case "bolt":
		s, err := boltstore.Open(filepath.Join(b.TempDir(), "sealcast.db"), boltstore.Options{})
		if err != nil {
			b.Fatal(err)
		}
		be.store = s
	case "redis":
		be.redis = redistest.Start(b)
		o, err := redis.ParseURL(be.redis.URL())
		if err != nil {
			b.Fatal(err)
		}
		rdb := redis.NewClient(o)
		b.Cleanup(func() { rdb.Close() })
		be.store = redisstore.New(rdb, redisstore.Options{Prefix: "bench"})
		be.cpu.rdb = rdb
	}
	b.Cleanup(func() { be.store.Close() })
	start := time.Now()
	provisionStore(b, be.store, devs)
	be.provisioned = time.Since(start)

	_, signer, _ := ed25519.GenerateKey(rand.Reader)
	rctx, cancel := context.WithCancel(ctx)
	var bus updater.Bus = be.env.Broker.Inline()
	closeBus := func() {}
	if benchMQTTBus {
		mb, err := mqttbus.Dial(rctx, mqttbus.Options{URL: be.env.URL, ClientID: "bench-updater",
			Username: be.env.Updater.Username, Password: be.env.Updater.Password,
			Publishers: benchPublishers, Subscribers: benchSubscribers})
		if err != nil {
			b.Fatal(err)
		}
		bus, closeBus = mb, func() { mb.Close() }
	}
	var err error
	be.u, err = updater.New(updater.Options{
		Root: benchRoot, SigningKey: signer, Store: be.store, Bus: bus, DataDir: b.TempDir(),
		ChainLength: benchChainLength, BrokerURL: be.env.URL, Revoker: be.env.Broker,
		Logger: zerolog.New(io.Discard).Level(zerolog.InfoLevel), AckGroup: benchAckGroup,
	})
	if err != nil {
		b.Fatal(err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		be.u.Run(rctx)
	}()
	b.Cleanup(func() {
		cancel()
		<-done
		closeBus()
	})
	be.op, err = operator.Dial(ctx, operator.Options{URL: be.env.URL, Username: be.env.Admin.Username,
		Password: be.env.Admin.Password, Timeout: 60 * time.Second})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(be.op.Close)
	// The first admin request is answered once the updater has subscribed.
	be.eventually("the updater answering", 30*time.Second, func() bool {
		c, cancel := context.WithTimeout(ctx, time.Second)
		defer cancel()
		return be.op.Do(c, protocol.CmdReleaseList, nil, nil) == nil
	})
	return be
}

func (be *benchEnv) eventually(what string, timeout time.Duration, cond func() bool) {
	be.b.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			be.b.Fatalf("timed out waiting for %s; updater %+v; broker %+v", what, be.u.Stats(), be.env.Broker.Stats())
		}
		time.Sleep(time.Millisecond)
	}
}

// upload sends a small image and returns its upload id.
func (be *benchEnv) upload() string {
	be.b.Helper()
	img := make([]byte, 4096)
	rand.Read(img)
	id, err := be.op.Upload(be.b.Context(), bytes.NewReader(img), int64(len(img)))
	if err != nil {
		be.b.Fatal(err)
	}
	return id
}

// release creates a release of an uploaded image for every device and waits until the
// broker has acknowledged want more key messages than before. It returns the release id,
// how long that took from the command, and how long until the command's reply.
func (be *benchEnv) release(upload string, version uint64, want int64) (keychain.ReleaseID, time.Duration, time.Duration) {
	be.b.Helper()
	before := be.u.Stats().KeysPublished
	start := time.Now()
	var res protocol.ReleaseCreateResult
	// No bound: what is measured is the fan-out, as fast as it goes.
	args := protocol.ReleaseCreateArgs{Upload: upload, Version: version, All: true, ChunkSize: 4096, MaxConcurrent: protocol.NoBound}
	if err := be.op.Do(be.b.Context(), protocol.CmdReleaseCreate, args, &res); err != nil {
		be.b.Fatal(err)
	}
	reply := time.Since(start)
	be.eventually("the key fan-out", 5*time.Minute, func() bool { return be.u.Stats().KeysPublished-before >= want })
	return res.Release, time.Since(start), reply
}

// client connects a paho client with the updater account (which may publish anywhere
// under sealcast/), as a stand-in for many devices.
func (be *benchEnv) client(id string) mqtt.Client {
	be.b.Helper()
	o := mqtt.NewClientOptions().AddBroker(be.env.URL).SetClientID(id).
		SetUsername(be.env.Updater.Username).SetPassword(be.env.Updater.Password).SetCleanSession(true)
	c := mqtt.NewClient(o)
	if tok := c.Connect(); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		be.b.Fatalf("connecting %s: %v", id, tok.Error())
	}
	be.b.Cleanup(func() { c.Disconnect(100) })
	return c
}

// rawPublisher returns the reference publisher of the fan-out: the broker's in-process
// client publishing from one goroutine, or with SEALCAST_BENCH_BUS=mqtt one paho client.
func (be *benchEnv) rawPublisher() func([]protocol.Message) error {
	if !benchMQTTBus {
		in := be.env.Broker.Inline()
		return func(msgs []protocol.Message) error { return in.Publish(context.Background(), msgs...) }
	}
	c := be.client("bench-raw")
	return func(msgs []protocol.Message) error { return publishAll(c, msgs, 1024) }
}

// publishAll publishes the messages with QoS 1 from one paho client, at most window
// unacknowledged, and returns when the broker has acknowledged all of them.
func publishAll(c mqtt.Client, msgs []protocol.Message, window int) error {
	toks := make(chan mqtt.Token, window)
	errc := make(chan error, 1)
	go func() {
		var first error
		for t := range toks {
			if t.Wait(); t.Error() != nil && first == nil {
				first = t.Error()
			}
		}
		errc <- first
	}()
	for _, m := range msgs {
		toks <- c.Publish(m.Topic, 1, m.Retain, m.Payload)
	}
	close(toks)
	return <-errc
}

// profiled runs f under the CPU profiler if SEALCAST_BENCH_CPUPROFILE names a file, so
// that a profile shows the timed part of a benchmark only (-cpuprofile would include the
// provisioning and the reference measurements). Later calls append nothing: the file
// holds the first timed run.
func profiled(b *testing.B, f func()) {
	path := os.Getenv("SEALCAST_BENCH_CPUPROFILE")
	if path == "" || profileTaken {
		f()
		return
	}
	profileTaken = true
	out, err := os.Create(path)
	if err != nil {
		b.Fatal(err)
	}
	defer out.Close()
	if err := pprof.StartCPUProfile(out); err != nil {
		b.Fatal(err)
	}
	defer pprof.StopCPUProfile()
	f()
}

var profileTaken bool

// cpuMeter measures the CPU time this process and the Redis server (if any) spend, which
// on a shared machine is steadier than wall-clock rates: other work slows the benchmark
// down but adds little to its own CPU time.
type cpuMeter struct {
	rdb *redis.Client // nil without Redis
}

// read returns the CPU time used so far by this process (user + system) and by Redis.
func (m cpuMeter) read(b *testing.B) (self, rds time.Duration) {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		b.Fatal(err)
	}
	self = time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
	if m.rdb == nil {
		return self, 0
	}
	info, err := m.rdb.Info(context.Background(), "cpu").Result()
	if err != nil {
		b.Fatal(err)
	}
	for _, line := range strings.Split(info, "\r\n") {
		k, v, _ := strings.Cut(line, ":")
		if k == "used_cpu_user" || k == "used_cpu_sys" {
			f, _ := strconv.ParseFloat(v, 64)
			rds += time.Duration(f * float64(time.Second))
		}
	}
	return self, rds
}

// measure runs f and adds the wall and CPU time it took to the totals.
func (m cpuMeter) measure(b *testing.B, wall, self, rds *time.Duration, f func()) {
	s0, r0 := m.read(b)
	start := time.Now()
	f()
	*wall += time.Since(start)
	s1, r1 := m.read(b)
	*self += s1 - s0
	*rds += r1 - r0
}

func perItem(d time.Duration, n int) float64 { return float64(d.Microseconds()) / float64(n) }

// stepRate measures keychain.Step on one goroutine for d.
func stepRate(d time.Duration) float64 {
	k := keychain.ChainKey{1}
	n := 0
	start := time.Now()
	for time.Since(start) < d {
		for range 1000 {
			k = keychain.Step(k)
		}
		n += 1000
	}
	return float64(n) / time.Since(start).Seconds()
}

// BenchmarkFanout measures a release to every provisioned (not connected) device, from
// the release.create command until the broker has acknowledged every wrapped key. Per
// iteration it also measures, on the same broker, one paho client publishing the same
// number of retained QoS 1 messages of the same size to the same topics (raw-pub/s), and
// the rate of keychain.Step on one core (step/s). It reports devices/s and the ratios
// x-broker = devices/s / raw-pub/s and x-chain = devices/s / (step/s / steps per device).
func BenchmarkFanout(b *testing.B) {
	for _, n := range []int{10_000, 100_000} {
		for _, store := range []string{"bolt", "redis"} {
			b.Run(fmt.Sprintf("devices=%d/store=%s", n, store), func(b *testing.B) {
				devs, _ := benchFleet.devices(b, n)
				be := startBench(b, store, devs)
				rawc := be.rawPublisher()
				rawMsgs := make([]protocol.Message, n)
				for i, d := range devs {
					rawMsgs[i] = protocol.Message{Topic: protocol.KeyTopic(d.Serial), Payload: make([]byte, keychain.KeyMessageReleaseSize), Retain: true}
				}
				var (
					fanout, fanCPU, fanRedis time.Duration
					raw, rawCPU, rawRedis    time.Duration
					reply                    time.Duration
					steps                    float64
					stepsPerSec              float64
					version                  uint64
				)
				for b.Loop() {
					b.StopTimer()
					be.cpu.measure(b, &raw, &rawCPU, &rawRedis, func() {
						if err := rawc(rawMsgs); err != nil {
							b.Fatal(err)
						}
					})
					stepsPerSec += stepRate(50 * time.Millisecond)
					up := be.upload()
					version++
					s0 := be.u.Stats().ChainSteps
					b.StartTimer()
					profiled(b, func() {
						be.cpu.measure(b, &fanout, &fanCPU, &fanRedis, func() {
							_, _, r := be.release(up, version, int64(n))
							reply += r
						})
					})
					steps += float64(be.u.Stats().ChainSteps - s0)
				}
				total := n * b.N
				rate := float64(total) / fanout.Seconds()
				rawRate := float64(total) / raw.Seconds()
				perDevice := steps / float64(total)
				stepRate := stepsPerSec / float64(b.N)
				b.ReportMetric(rate, "devices/s")
				b.ReportMetric(rawRate, "raw-pub/s")
				b.ReportMetric(rate/rawRate, "x-broker")
				b.ReportMetric(float64(reply.Milliseconds())/float64(b.N), "reply-ms")
				b.ReportMetric(float64(be.provisioned.Milliseconds()), "provision-ms")
				b.ReportMetric(perItem(fanCPU, total), "cpu-us/device")
				b.ReportMetric(perItem(rawCPU, total), "cpu-us/raw-pub")
				if be.cpu.rdb != nil {
					b.ReportMetric(perItem(fanRedis, total), "redis-cpu-us/device")
				}
				b.ReportMetric(perDevice, "steps/device")
				b.ReportMetric(stepRate, "step/s")
				if perDevice > 0 {
					b.ReportMetric(rate/(stepRate/perDevice), "x-chain")
				}
				if st := be.env.Broker.Stats(); st.DroppedQueueFull+st.DroppedInflight > 0 {
					b.Errorf("the broker dropped deliveries: %+v", st)
				}
			})
		}
	}
}

// BenchmarkAcks measures acks against Redis: valid acks published over MQTT (by one paho
// client with the updater account, standing in for the devices), verified, the counters
// moved by the store's compare-and-set, receipts published. Per iteration a release is
// wrapped for every device first (not timed); the timer runs from the first ack published
// to the last receipt acknowledged by the broker. After the loop, redis-benchmark runs the
// same Advance script on the same server (lua/s unpipelined with 50 connections, lua-P16/s
// pipelined 16 deep), and the ratios x-lua and x-lua-P16 compare acks/s with them.
func BenchmarkAcks(b *testing.B) {
	const n = 50_000 // below the updater's ack queue (65,536), so nothing is shed
	devs, trs := benchFleet.devices(b, n)
	be := startBench(b, "redis", devs)
	inject := make([]mqtt.Client, ackClients)
	for i := range inject {
		inject[i] = be.client(fmt.Sprint("bench-acks-", i))
	}
	// The devices' side: their traversals, advanced one step per release.
	dtr := make([]*keychain.Traversal, n)
	for i, raw := range trs {
		dtr[i] = new(keychain.Traversal)
		if err := dtr[i].UnmarshalBinary(raw); err != nil {
			b.Fatal(err)
		}
	}
	var (
		elapsed, cpu, rds time.Duration
		version           uint64
		steps, dropped    int64
	)
	for b.Loop() {
		b.StopTimer()
		version++
		rid, _, _ := be.release(be.upload(), version, int64(n))
		acks := make([]protocol.Message, n)
		for i, d := range devs {
			tr := dtr[i]
			k := tr.Current()
			ack, err := keychain.Ack{Kind: keychain.AckInstalled, Seq: tr.Pos(), ID: rid, Version: version, DeviceSeq: tr.Pos() - 1}.Seal(k, d.Serial)
			if err != nil {
				b.Fatal(err)
			}
			acks[i] = protocol.Message{Topic: protocol.AckTopic(d.Serial), Payload: ack}
			if err := tr.Advance(); err != nil {
				b.Fatal(err)
			}
		}
		st0, bs0 := be.u.Stats(), be.env.Broker.Stats()
		b.StartTimer()
		profiled(b, func() {
			be.cpu.measure(b, &elapsed, &cpu, &rds, func() {
				accepted := func() int64 { return be.u.Stats().AcksAccepted - st0.AcksAccepted }
				if err := publishPaced(inject, acks, ackWindow, accepted); err != nil {
					b.Fatal(err)
				}
				// Devices re-send an ack until its receipt arrives ([SC-10.1] step 6): those
				// the broker dropped are sent again once the updater stops making progress
				// (a device would wait 30 s; dropped/op says how many would have).
				for round := 0; !be.awaitAcks(st0, n) && round < 5; round++ {
					if err := publishPaced(inject[:1], missing(b, be.store, devs, acks, dtr), ackWindow, accepted); err != nil {
						b.Fatal(err)
					}
				}
				if got := be.u.Stats().AcksAccepted - st0.AcksAccepted; got < n {
					b.Fatalf("only %d of %d acks accepted after re-sending", got, n)
				}
			})
		})
		dropped += be.env.Broker.Stats().DroppedQueueFull - bs0.DroppedQueueFull
		steps += be.u.Stats().ChainSteps - st0.ChainSteps
	}
	rate := float64(n) * float64(b.N) / elapsed.Seconds()
	b.ReportMetric(rate, "acks/s")
	b.ReportMetric(perItem(cpu, n*b.N), "cpu-us/ack")
	b.ReportMetric(perItem(rds, n*b.N), "redis-cpu-us/ack")
	b.ReportMetric(float64(steps)/float64(n*b.N), "steps/ack")
	b.ReportMetric(float64(dropped)/float64(b.N), "dropped/op")
	unpiped, piped, err := rawAdvanceRate(be.redis, n)
	if errors.Is(err, exec.ErrNotFound) && os.Getenv("SEALCAST_REQUIRE_TOOLS") != "1" {
		b.Logf("redis-benchmark not found: no raw Lua figures (set SEALCAST_REQUIRE_TOOLS=1 to fail instead)")
		return
	}
	if err != nil {
		b.Fatalf("redis-benchmark: %v", err)
	}
	b.ReportMetric(unpiped, "lua/s")
	b.ReportMetric(piped, "lua-P16/s")
	b.ReportMetric(rate/unpiped, "x-lua")
	b.ReportMetric(rate/piped, "x-lua-P16")
}

// awaitAcks waits until n acks since st0 are accepted and their receipts published, and
// returns true; or returns false once no ack has been accepted for half a second.
func (be *benchEnv) awaitAcks(st0 updater.Stats, n int64) bool {
	last, since := int64(-1), time.Now()
	for {
		st := be.u.Stats()
		if st.AcksShed > 0 || len(st.AcksRejected) > 0 {
			be.b.Fatalf("acks lost in the updater: %d rejected, %d shed", len(st.AcksRejected), st.AcksShed)
		}
		if st.AcksAccepted-st0.AcksAccepted >= n && st.ReceiptsPublished-st0.ReceiptsPublished >= n {
			return true
		}
		if st.AcksAccepted != last {
			last, since = st.AcksAccepted, time.Now()
		} else if time.Since(since) > 500*time.Millisecond {
			return false
		}
		time.Sleep(time.Millisecond)
	}
}

// missing returns the acks of the devices the store still has at the position before
// their ack (whose traversal has since moved one step down).
func missing(b *testing.B, s updater.Store, devs []*updater.Device, acks []protocol.Message, dtr []*keychain.Traversal) []protocol.Message {
	serials := make([]string, len(devs))
	for i, d := range devs {
		serials[i] = d.Serial
	}
	got, err := s.Devices(b.Context(), serials)
	if err != nil {
		b.Fatal(err)
	}
	var out []protocol.Message
	for i, d := range got {
		if d != nil && d.Seq == dtr[i].Pos()+1 {
			out = append(out, acks[i])
		}
	}
	return out
}

// The acks come from ackClients connections, as they would from many devices (the broker
// handles each connection on its own goroutine), at most ackWindow ahead of the acks the
// updater has accepted, as devices that each wait for their receipt would be. Without the
// window the injectors outrun the updater's one connection and the broker drops what its
// queue to the updater cannot hold (see docs/BENCHMARKS.md).
const (
	ackClients = 4
	ackWindow  = 4096
)

// publishPaced publishes msgs round-robin over the clients, each with at most 256
// unacknowledged, and never more than window ahead of done().
func publishPaced(clients []mqtt.Client, msgs []protocol.Message, window int64, done func() int64) error {
	errs := make(chan error, len(clients))
	var sent atomic.Int64
	for k, c := range clients {
		go func() {
			var part []protocol.Message
			for i := k; i < len(msgs); i += len(clients) {
				part = append(part, msgs[i])
			}
			for start := 0; start < len(part); start += 64 {
				for sent.Load()-done() > window {
					time.Sleep(100 * time.Microsecond)
				}
				chunk := part[start:min(start+64, len(part))]
				sent.Add(int64(len(chunk)))
				if err := publishAll(c, chunk, 256); err != nil {
					errs <- err
					return
				}
			}
			errs <- nil
		}()
	}
	var first error
	for range clients {
		if err := <-errs; err != nil && first == nil {
			first = err
		}
	}
	return first
}

// rawAdvanceRate runs the store's Advance script with redis-benchmark on hashes shaped
// like devices (from = to, so every call applies and writes every field), unpipelined and
// pipelined 16 deep, 50 connections each, and returns the calls per second.
func rawAdvanceRate(srv *redistest.Server, keys int) (unpiped, piped float64, err error) {
	bin, err := exec.LookPath("redis-benchmark")
	if err != nil {
		return 0, 0, err
	}
	host, port, _ := net.SplitHostPort(srv.Addr)
	rdb := redis.NewClient(&redis.Options{Addr: srv.Addr})
	defer rdb.Close()
	ctx := context.Background()
	// Device-shaped hashes raw:dev:{000000000000}.. as redis-benchmark's __rand_int__ names them.
	err = rdb.Eval(ctx, `for i = 0, tonumber(ARGV[1]) - 1 do
  redis.call('HSET', string.format('raw:dev:{%012d}', i), 'epoch', '0', 'seq', '1024', 'chain_length', '1024')
end
return 1`, nil, keys).Err()
	if err != nil {
		return 0, 0, err
	}
	sha := redisstore.AdvanceScriptHash()
	if ok, err := rdb.ScriptExists(ctx, sha).Result(); err != nil || !ok[0] {
		return 0, 0, fmt.Errorf("the Advance script is not loaded (%v)", err)
	}
	run := func(pipeline int) (float64, error) {
		args := []string{"-h", host, "-p", port, "-n", "200000", "-r", strconv.Itoa(keys), "-c", "50",
			"-P", strconv.Itoa(pipeline), "--csv", "EVALSHA", sha, "1", "raw:dev:{__rand_int__}",
			"0", "1024", "0", "1024", "1024", "2", strings.Repeat("c", 355), strings.Repeat("a", keychain.AckSize),
			strings.Repeat("r", keychain.ReceiptSize), string(protocol.DeviceInstalled), "ok", time.Now().UTC().Format(time.RFC3339Nano)}
		out, err := exec.Command(bin, args...).CombinedOutput()
		if err != nil {
			return 0, fmt.Errorf("%v: %s", err, out)
		}
		// CSV: a header line, then "EVALSHA ...","<rps>",...
		lines := strings.Split(strings.TrimSpace(string(out)), "\n")
		fields := strings.Split(lines[len(lines)-1], ",")
		if len(fields) < 2 {
			return 0, fmt.Errorf("unexpected output: %s", out)
		}
		return strconv.ParseFloat(strings.Trim(fields[1], `"`), 64)
	}
	if unpiped, err = run(1); err != nil {
		return 0, 0, err
	}
	if piped, err = run(16); err != nil {
		return 0, 0, err
	}
	return unpiped, piped, nil
}
