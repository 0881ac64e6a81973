package e2e_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	mqtt "github.com/eclipse/paho.mqtt.golang"
	"github.com/rs/zerolog"

	"github.com/sealcast/sealcast/device"
	"github.com/sealcast/sealcast/internal/testkit/brokertest"
	"github.com/sealcast/sealcast/internal/testkit/devicetest"
	"github.com/sealcast/sealcast/internal/testkit/updatertest"
	"github.com/sealcast/sealcast/keychain"
	"github.com/sealcast/sealcast/protocol"
)

// deadline bounds every wait: generous, because the machine may be loaded (five minutes
// for the 2,000 devices of SEALCAST_HEAVY=1); tests poll and return as soon as the
// condition holds.
var deadline = func() time.Duration {
	if heavy() {
		return 5 * time.Minute
	}
	return time.Minute
}()

// numbered returns n serials made by format (one %d verb) from 0 to n-1.
func numbered(format string, n int) []string {
	serials := make([]string, n)
	for i := range serials {
		serials[i] = fmt.Sprintf(format, i)
	}
	return serials
}

func image(n int, seed uint64) []byte {
	r := rand.New(rand.NewPCG(seed, 7))
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return b
}

func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	end := time.Now().Add(deadline)
	for !cond() {
		if time.Now().After(end) {
			t.Fatalf("timed out after %v waiting for %s", deadline, what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// ---------------------------------------------------------------------------------------
// One device: a file vault and A/B slots on disk, an agent that can be stopped, crashed
// and started again on them.

type dev struct {
	t      *testing.T
	serial string
	file   protocol.DeviceFile
	vault  *device.FileVault
	inst   *device.SlotInstaller
}

// provision provisions serials through the admin protocol (device.provision with
// chainLength, 0 for the updater's default) and creates their vaults.
func provision(t *testing.T, e *updatertest.Env, chainLength uint32, serials ...string) []*dev {
	t.Helper()
	files, err := e.Op.Provision(context.Background(), serials, chainLength)
	if err != nil {
		t.Fatal(err)
	}
	ds := make([]*dev, len(files))
	for i, f := range files {
		dir := t.TempDir()
		v, err := device.CreateFileVault(filepath.Join(dir, "vault.json"), f)
		if err != nil {
			t.Fatal(err)
		}
		inst, err := device.NewSlotInstaller(filepath.Join(dir, "slots"))
		if err != nil {
			t.Fatal(err)
		}
		ds[i] = &dev{t: t, serial: f.Serial, file: f, vault: v, inst: inst}
	}
	return ds
}

// options are agent options for tests: short timeouts and re-send intervals.
func (d *dev) options(rec *devicetest.Recorder) device.Options {
	return device.Options{
		Vault: d.vault, Installer: d.inst, OnEvent: rec.On,
		Logger:       zerolog.New(zerolog.NewTestWriter(d.t)).Level(zerolog.WarnLevel),
		ChunkTimeout: 2 * time.Second, AckResend: 200 * time.Millisecond, AckResendMax: time.Second,
		ReconnectMin: 20 * time.Millisecond, ReconnectMax: 200 * time.Millisecond,
		ProgressInterval: 50 * time.Millisecond,
	}
}

// state loads the vault.
func (d *dev) state() device.State {
	d.t.Helper()
	s, err := d.vault.Load()
	if err != nil {
		d.t.Fatal(err)
	}
	return s
}

// waitVault polls the vault until ok holds.
func (d *dev) waitVault(what string, ok func(device.State) bool) device.State {
	d.t.Helper()
	var s device.State
	eventually(d.t, d.serial+": "+what, func() bool {
		var err error
		s, err = d.vault.Load()
		return err == nil && ok(s)
	})
	return s
}

// waitConfirmed waits until the vault holds a confirmed install of version.
func (d *dev) waitConfirmed(version uint64) device.State {
	d.t.Helper()
	return d.waitVault("confirmed install", func(s device.State) bool { return s.Version == version && s.LastAckConfirmed })
}

// checkSlot checks that the active slot holds img.
func (d *dev) checkSlot(img []byte) {
	d.t.Helper()
	act, ok, err := d.inst.Active()
	if err != nil || !ok {
		d.t.Fatalf("%s: no active slot: %v", d.serial, err)
	}
	got, err := os.ReadFile(d.inst.SlotPath(act.Slot))
	if err != nil || !bytes.Equal(got, img) {
		d.t.Fatalf("%s: active slot %s does not hold the image (%d bytes, %v)", d.serial, act.Slot, len(got), err)
	}
}

// agent is one run of a device agent, from power-on to Run's return.
type agent struct {
	a      *device.Agent
	rec    *devicetest.Recorder
	cancel context.CancelFunc
	done   chan struct{}
	err    error
}

// start runs an agent on the device's vault and slots; tweak may change its options.
// The test's cleanup stops it.
func (d *dev) start(tweak func(*device.Options)) *agent {
	d.t.Helper()
	rec := &devicetest.Recorder{}
	o := d.options(rec)
	if tweak != nil {
		tweak(&o)
	}
	a, err := device.New(o)
	if err != nil {
		d.t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	r := &agent{a: a, rec: rec, cancel: cancel, done: make(chan struct{})}
	go func() { r.err = a.Run(ctx); close(r.done) }()
	d.t.Cleanup(func() { r.stop(d.t) })
	return r
}

// wait waits for Run to return (after a crash fault or stop) and returns its error.
func (r *agent) wait(t *testing.T) error {
	t.Helper()
	select {
	case <-r.done:
		return r.err
	case <-time.After(deadline):
		t.Fatal("the agent's Run did not return")
		return nil
	}
}

func (r *agent) stop(t *testing.T) error {
	r.cancel()
	return r.wait(t)
}

// ---------------------------------------------------------------------------------------
// Watching topics as an MQTT client of the broker.

// watcher records every message on some topics, in arrival order.
type watcher struct {
	mu   sync.Mutex
	msgs map[string][][]byte
}

// watch subscribes with the given account (monitor for status topics, admin for anything)
// until the test ends. It returns once the broker granted every subscription, so nothing
// published after it is missed.
func watch(t *testing.T, b *brokertest.Env, who brokertest.Credentials, filters ...string) *watcher {
	t.Helper()
	w := &watcher{msgs: map[string][][]byte{}}
	w.add(t, b, who, filters...)
	return w
}

// watchEach watches one topic per item of names, spread over connections of at most 100
// subscriptions: the broker drops deliveries to a connection whose outbound queue (256)
// is full, which one connection subscribed to a whole fleet's topics reaches in a burst.
func watchEach(t *testing.T, b *brokertest.Env, who brokertest.Credentials, names []string, topic func(string) string) *watcher {
	t.Helper()
	w := &watcher{msgs: map[string][][]byte{}}
	for i := 0; i < len(names); i += 100 {
		var filters []string
		for _, n := range names[i:min(i+100, len(names))] {
			filters = append(filters, topic(n))
		}
		w.add(t, b, who, filters...)
	}
	return w
}

// add subscribes to filters on a new connection that records into w.
func (w *watcher) add(t *testing.T, b *brokertest.Env, who brokertest.Credentials, filters ...string) {
	t.Helper()
	o := mqtt.NewClientOptions().AddBroker(b.URL).SetClientID(fmt.Sprintf("watch-%s-%p-%s", who.Username, w, filters[0])).
		SetUsername(who.Username).SetPassword(who.Password).SetCleanSession(true).SetOrderMatters(true)
	c := mqtt.NewClient(o)
	if tok := c.Connect(); !tok.WaitTimeout(deadline) || tok.Error() != nil {
		t.Fatalf("watcher: connect as %s: %v", who.Username, tok.Error())
	}
	t.Cleanup(func() { c.Disconnect(100) })
	subs := map[string]byte{}
	for _, f := range filters {
		subs[f] = 1
	}
	tok := c.SubscribeMultiple(subs, func(_ mqtt.Client, m mqtt.Message) {
		w.mu.Lock()
		w.msgs[m.Topic()] = append(w.msgs[m.Topic()], bytes.Clone(m.Payload()))
		w.mu.Unlock()
	})
	if !tok.WaitTimeout(deadline) || tok.Error() != nil {
		t.Fatalf("watcher: subscribe: %v", tok.Error())
	}
	for f, code := range tok.(*mqtt.SubscribeToken).Result() {
		if code != 1 {
			t.Fatalf("watcher: subscription to %s as %s refused (SUBACK %#x)", f, who.Username, code)
		}
	}
}

// all returns the messages seen on topic.
func (w *watcher) all(topic string) [][]byte {
	w.mu.Lock()
	defer w.mu.Unlock()
	return append([][]byte(nil), w.msgs[topic]...)
}

// last returns the last message on topic, nil if none.
func (w *watcher) last(topic string) []byte {
	w.mu.Lock()
	defer w.mu.Unlock()
	if m := w.msgs[topic]; len(m) > 0 {
		return m[len(m)-1]
	}
	return nil
}

// deviceStatus waits until the updater's retained view of serial satisfies ok.
func (w *watcher) deviceStatus(t *testing.T, serial, what string, ok func(protocol.DeviceStatus) bool) protocol.DeviceStatus {
	t.Helper()
	var st protocol.DeviceStatus
	eventually(t, "status of "+serial+": "+what, func() bool {
		b := w.last(protocol.DeviceStatusTopic(serial))
		return b != nil && json.Unmarshal(b, &st) == nil && ok(st)
	})
	return st
}

// releaseStatus waits until the updater's retained status of release id satisfies ok.
func (w *watcher) releaseStatus(t *testing.T, id keychain.ReleaseID, what string, ok func(protocol.ReleaseStatus) bool) protocol.ReleaseStatus {
	t.Helper()
	var st protocol.ReleaseStatus
	eventually(t, "status of release "+id.String()+": "+what, func() bool {
		b := w.last(protocol.ReleaseStatusTopic(id))
		return b != nil && json.Unmarshal(b, &st) == nil && ok(st)
	})
	return st
}

// waitFleet waits up to d until the updater's retained fleet status satisfies ok, and
// reports whether it did.
func (w *watcher) waitFleet(d time.Duration, ok func(protocol.FleetStatus) bool) (protocol.FleetStatus, bool) {
	var fs protocol.FleetStatus
	for end := time.Now().Add(d); time.Now().Before(end); time.Sleep(10 * time.Millisecond) {
		if b := w.last(protocol.FleetStatusTopic); b != nil && json.Unmarshal(b, &fs) == nil && ok(fs) {
			return fs, true
		}
	}
	return fs, false
}

// ---------------------------------------------------------------------------------------
// Both sides of an update.

// waitInstalled polls release.get until n targets installed the release.
func waitInstalled(t *testing.T, e *updatertest.Env, id keychain.ReleaseID, n int) protocol.ReleaseStatus {
	t.Helper()
	var st *protocol.ReleaseStatus
	eventually(t, fmt.Sprintf("%d installs of release %s", n, id), func() bool {
		var err error
		st, err = e.Op.ReleaseStatus(context.Background(), id)
		if err != nil {
			t.Fatal(err)
		}
		return st.Installed == n
	})
	if st.Failed != 0 || st.Targets != n {
		t.Fatalf("release %s: %d targets, %d failed", id, st.Targets, st.Failed)
	}
	return *st
}

// converged waits until the device confirmed an install of version, and checks that its
// vault and the updater's store agree: same position, same version (PROTOCOL.md 10), and
// that this is the device's updates-th update of its first chain.
func converged(t *testing.T, e *updatertest.Env, d *dev, version uint64, updates uint32) {
	t.Helper()
	s := d.waitConfirmed(version)
	eventually(t, d.serial+": server counter meets the device", func() bool {
		got := e.Device(t, d.serial)
		return got.Epoch == s.Epoch && got.Seq == s.Seq && got.Version == s.Version
	})
	if want := d.file.Seq - updates; s.Epoch != 0 || s.Seq != want {
		t.Fatalf("%s: device at (%d, %d) after %d updates, want (0, %d)", d.serial, s.Epoch, s.Seq, updates, want)
	}
}

// between checks the invariant of PROTOCOL.md 10 at a point where the two sides may
// differ: the device is never behind the server, and at most one ahead.
func between(t *testing.T, e *updatertest.Env, d *dev) (dSeq, cSeq uint32) {
	t.Helper()
	s, got := d.state(), e.Device(t, d.serial)
	if s.Epoch != got.Epoch || s.Seq > got.Seq || got.Seq-s.Seq > 1 {
		t.Fatalf("%s: device at (%d, %d), server at (%d, %d): the invariant of PROTOCOL.md 10 is broken", d.serial, s.Epoch, s.Seq, got.Epoch, got.Seq)
	}
	return s.Seq, got.Seq
}

// nextRelease releases version v to the device and checks that it installs it with the
// next index, on both sides: its updates-th update.
func nextRelease(t *testing.T, e *updatertest.Env, d *dev, v uint64, updates uint32) {
	t.Helper()
	img := image(3*1024, 100+v)
	rid := e.Release(t, img, v, d.serial)
	converged(t, e, d, v, updates)
	d.checkSlot(img)
	waitInstalled(t, e, rid, 1)
}
