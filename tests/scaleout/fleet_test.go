package scaleout_test

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	mqtt "github.com/eclipse/paho.mqtt.golang"
	"github.com/rs/zerolog"

	"github.com/sealcast/sealcast/device/simulate"
	"github.com/sealcast/sealcast/keychain"
	"github.com/sealcast/sealcast/operator"
	"github.com/sealcast/sealcast/protocol"
)

// connectClient connects a paho client with a random client id and a clean session,
// reconnecting by itself, and disconnects it when the test ends.
func connectClient(t *testing.T, url, prefix string) mqtt.Client {
	t.Helper()
	var rnd [4]byte
	rand.Read(rnd[:])
	o := mqtt.NewClientOptions().AddBroker(url).SetClientID(prefix + "-" + hex.EncodeToString(rnd[:])).
		SetUsername(prefix).SetPassword(prefix).SetCleanSession(true).SetOrderMatters(false).
		SetAutoReconnect(true).SetConnectTimeout(10 * time.Second).SetMessageChannelDepth(100_000)
	c := mqtt.NewClient(o)
	if tok := c.Connect(); !tok.WaitTimeout(30*time.Second) || tok.Error() != nil {
		t.Fatalf("%s: connecting to %s: %v", prefix, url, tok.Error())
	}
	t.Cleanup(func() { c.Disconnect(100) })
	return c
}

func subscribe(t *testing.T, c mqtt.Client, filter string, h mqtt.MessageHandler) {
	t.Helper()
	tok := c.Subscribe(filter, 1, h)
	if !tok.WaitTimeout(30*time.Second) || tok.Error() != nil {
		t.Fatalf("subscribing to %s: %v", filter, tok.Error())
	}
	if code := tok.(*mqtt.SubscribeToken).Result()[filter]; code != 1 {
		t.Fatalf("subscribing to %s: SUBACK code %#x", filter, code)
	}
}

// keyLog records every non-empty key message the broker delivers, per device, as a
// client subscribed to sealcast/devices/+/key (QoS 1) sees them.
type keyLog struct {
	mu    sync.Mutex
	keys  map[string][][]byte
	total atomic.Int64
}

func watchKeys(t *testing.T, url string) *keyLog {
	t.Helper()
	kl := &keyLog{keys: map[string][][]byte{}}
	c := connectClient(t, url, "key-watcher")
	subscribe(t, c, protocol.KeyFilter, func(_ mqtt.Client, m mqtt.Message) {
		serial, _, ok := protocol.DeviceOf(m.Topic())
		if !ok || len(m.Payload()) == 0 { // an empty retained message clears the topic
			return
		}
		kl.mu.Lock()
		kl.keys[serial] = append(kl.keys[serial], append([]byte(nil), m.Payload()...))
		kl.mu.Unlock()
		kl.total.Add(1)
	})
	return kl
}

// devices returns how many devices got at least one key message.
func (kl *keyLog) devices() int {
	kl.mu.Lock()
	defer kl.mu.Unlock()
	return len(kl.keys)
}

// settle waits until no key message arrived for quiet (at most limit), and returns the
// number of devices with a key.
func (kl *keyLog) settle(quiet, limit time.Duration) int {
	deadline := time.Now().Add(limit)
	last, since := kl.total.Load(), time.Now()
	for time.Now().Before(deadline) && time.Since(since) < quiet {
		time.Sleep(20 * time.Millisecond)
		if n := kl.total.Load(); n != last {
			last, since = n, time.Now()
		}
	}
	return kl.devices()
}

// checkOneWrap checks that every device got the release's key, and that every key
// message it got for the release was wrapped at its position (epoch 0, seq L) under its
// own K_L and opens to the release's one content key: no device was skipped, none was
// wrapped twice under different keys. It returns how many devices got the key more than
// once (the same wrap re-published, as a restarted fan-out does).
func (kl *keyLog) checkOneWrap(t *testing.T, files []protocol.DeviceFile, id keychain.ReleaseID) (again int) {
	t.Helper()
	kl.mu.Lock()
	defer kl.mu.Unlock()
	var ck *[keychain.Size]byte
	bad := 0
	fail := func(format string, args ...any) {
		if bad++; bad <= 10 {
			t.Errorf(format, args...)
		}
	}
	for _, f := range files {
		msgs := kl.keys[f.Serial]
		if len(msgs) == 0 {
			fail("%s: no key message: the device was skipped", f.Serial)
			continue
		}
		if len(msgs) > 1 {
			again++
		}
		var u keychain.UnitData
		copy(u[:], f.UnitData)
		for i, raw := range msgs {
			km, err := keychain.ParseKeyMessage(raw)
			if err != nil {
				fail("%s: key message %d: %v", f.Serial, i, err)
				continue
			}
			if km.Kind != keychain.KindRelease || km.ID != id || km.Epoch != 0 || km.Seq != f.Seq {
				fail("%s: key message %d is a %s of %s at epoch %d seq %d; want the release %s at epoch 0 seq %d",
					f.Serial, i, km.Kind, km.ID, km.Epoch, km.Seq, id, f.Seq)
				continue
			}
			got, err := km.Open(keychain.Key(u, km.Seq), f.Serial)
			if err != nil {
				fail("%s: key message %d does not open under K_%d: %v", f.Serial, i, km.Seq, err)
				continue
			}
			if ck == nil {
				ck = &got
			} else if got != *ck {
				fail("%s: key message %d wraps a different content key", f.Serial, i)
			}
		}
	}
	if bad > 10 {
		t.Errorf("... and %d more", bad-10)
	}
	return again
}

// ackDriver plays devices at the protocol level, over one MQTT connection: for each
// release key message of one of its devices it derives K_n from the device's unit data,
// opens the key message, and publishes the installed ack, again every second until a
// receipt with a valid MAC answers it (PROTOCOL.md 10.1 step 6). It does not download
// the image: package device does that, and the tests run real agents for part of the
// fleet. Each ack is published copies times in a row, and names the version that
// setVersion set last.
type ackDriver struct {
	t      *testing.T
	c      mqtt.Client
	files  map[string]protocol.DeviceFile
	copies int

	mu        sync.Mutex
	version   uint64
	pending   map[string]*sentAck
	confirmed map[string]keychain.Ack // the last confirmed ack of each device
	problems  []string
	published atomic.Int64
	cancel    context.CancelFunc
	wg        sync.WaitGroup
}

type sentAck struct {
	raw []byte
	ack keychain.Ack
	k   keychain.ChainKey
}

func driveAcks(t *testing.T, url string, files []protocol.DeviceFile, version uint64, copies int) *ackDriver {
	t.Helper()
	d := &ackDriver{t: t, files: map[string]protocol.DeviceFile{}, version: version, copies: copies,
		pending: map[string]*sentAck{}, confirmed: map[string]keychain.Ack{}}
	for _, f := range files {
		d.files[f.Serial] = f
	}
	d.c = connectClient(t, url, "ack-driver")
	subscribe(t, d.c, protocol.ReceiptFilter, d.onReceipt)
	subscribe(t, d.c, protocol.KeyFilter, d.onKey)
	ctx, cancel := context.WithCancel(context.Background())
	d.cancel = cancel
	d.wg.Add(1)
	go func() {
		defer d.wg.Done()
		d.resend(ctx)
	}()
	t.Cleanup(func() { cancel(); d.wg.Wait() })
	return d
}

func (d *ackDriver) problem(format string, args ...any) {
	d.mu.Lock()
	d.problems = append(d.problems, fmt.Sprintf(format, args...))
	d.mu.Unlock()
}

func (d *ackDriver) onKey(_ mqtt.Client, m mqtt.Message) {
	serial, _, ok := protocol.DeviceOf(m.Topic())
	f, mine := d.files[serial]
	if !ok || !mine || len(m.Payload()) == 0 {
		return
	}
	km, err := keychain.ParseKeyMessage(m.Payload())
	if err != nil || km.Kind != keychain.KindRelease {
		d.problem("%s: unexpected key message (%v)", serial, err)
		return
	}
	var u keychain.UnitData
	copy(u[:], f.UnitData)
	k := keychain.Key(u, km.Seq)
	if _, err := km.Open(k, serial); err != nil {
		d.problem("%s: key message at %d does not open: %v", serial, km.Seq, err)
		return
	}
	d.mu.Lock()
	a := keychain.Ack{Kind: keychain.AckInstalled, Epoch: km.Epoch, Seq: km.Seq, ID: km.ID, Version: d.version, DeviceSeq: km.Seq - 1}
	if p := d.pending[serial]; d.confirmed[serial] == a || (p != nil && p.ack == a) {
		d.mu.Unlock()
		return // the same key re-published: the ack is already out
	}
	raw, err := a.Seal(k, serial)
	if err != nil {
		d.mu.Unlock()
		d.problem("%s: sealing ack: %v", serial, err)
		return
	}
	d.pending[serial] = &sentAck{raw: raw, ack: a, k: k}
	d.mu.Unlock()
	d.send(serial, raw)
}

func (d *ackDriver) send(serial string, raw []byte) {
	for i := 0; i < d.copies; i++ {
		d.c.Publish(protocol.AckTopic(serial), 1, false, raw)
		d.published.Add(1)
	}
}

func (d *ackDriver) onReceipt(_ mqtt.Client, m mqtt.Message) {
	serial, _, ok := protocol.DeviceOf(m.Topic())
	if !ok || len(m.Payload()) == 0 {
		return
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	p := d.pending[serial]
	if p == nil {
		return
	}
	r, err := keychain.ParseReceipt(m.Payload())
	if err != nil || !r.Answers(p.ack) {
		return // an older receipt
	}
	if err := keychain.VerifyReceipt(m.Payload(), p.k, serial); err != nil || r.Status != keychain.ReceiptAccepted {
		d.problems = append(d.problems, fmt.Sprintf("%s: receipt status %d, MAC %v", serial, r.Status, err))
		return
	}
	delete(d.pending, serial)
	d.confirmed[serial] = p.ack
}

// setVersion sets the version that the next acks name (the release's).
func (d *ackDriver) setVersion(v uint64) {
	d.mu.Lock()
	d.version = v
	d.mu.Unlock()
}

// resend re-publishes unconfirmed acks every second until ctx is done.
func (d *ackDriver) resend(ctx context.Context) {
	t := time.NewTicker(time.Second)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		d.mu.Lock()
		out := map[string][]byte{}
		for s, p := range d.pending {
			out[s] = p.raw
		}
		d.mu.Unlock()
		for s, raw := range out {
			d.send(s, raw)
		}
	}
}

// done returns a condition: every device's ack of release id was confirmed.
func (d *ackDriver) done(id keychain.ReleaseID) func() bool {
	return func() bool {
		d.mu.Lock()
		defer d.mu.Unlock()
		for s := range d.files {
			if d.confirmed[s].ID != id {
				return false
			}
		}
		return true
	}
}

func (d *ackDriver) String() string {
	d.mu.Lock()
	defer d.mu.Unlock()
	return fmt.Sprintf("ack driver: %d of %d confirmed, %d pending, %d acks published, problems %q",
		len(d.confirmed), len(d.files), len(d.pending), d.published.Load(), d.problems)
}

func (d *ackDriver) check(t *testing.T) {
	t.Helper()
	d.mu.Lock()
	defer d.mu.Unlock()
	if len(d.problems) > 0 {
		t.Errorf("ack driver saw %d problems: %q", len(d.problems), d.problems[:min(10, len(d.problems))])
	}
}

// agents runs device agents (device/simulate: each its own MQTT connection, downloading,
// verifying, installing and acking) for a fleet, in the background, until every one has
// confirmed version 1 or the context ends.
type agents struct {
	n    int
	done chan error
	sum  simulate.Summary // set before done is sent on
}

// startAgents starts agents for files; brokerURL, if set, replaces their device files'.
// None start for no files.
func startAgents(t *testing.T, ctx context.Context, files []protocol.DeviceFile, brokerURL string) *agents {
	a := &agents{n: len(files), done: make(chan error, 1)}
	if len(files) == 0 {
		a.done <- nil
		return a
	}
	go func() {
		var err error
		a.sum, err = simulate.Run(ctx, simulate.Options{
			Devices: files, TargetVersion: 1, Seed: 1, BrokerURL: brokerURL,
			ChunkTimeout: 10 * time.Second, AckResend: time.Second, AckResendMax: 4 * time.Second,
			ReconnectMin: 100 * time.Millisecond, ReconnectMax: 2 * time.Second,
			StartSpread: 500 * time.Millisecond,
			Logger:      zerolog.New(zerolog.NewTestWriter(t)).Level(zerolog.ErrorLevel),
		})
		a.done <- err
	}()
	return a
}

// wait waits for the agents to end, checks that every one confirmed and none failed, and
// returns their summary.
func (a *agents) wait(t *testing.T, ctx context.Context) simulate.Summary {
	t.Helper()
	select {
	case err := <-a.done:
		if err != nil {
			t.Fatalf("simulated devices: %v", err)
		}
	case <-ctx.Done():
		t.Fatal("simulated devices did not finish")
	}
	if a.n > 0 && (a.sum.Confirmed != a.n || a.sum.Failed != 0) {
		t.Errorf("devices: %d of %d confirmed, %d failed (%v)", a.sum.Confirmed, a.n, a.sum.Failed, a.sum.Codes)
	}
	return a.sum
}

// completed waits up to timeout until release id has completed and checks that each of
// its n targets was counted installed, once.
func completed(t *testing.T, ctx context.Context, op *operator.Client, id keychain.ReleaseID, n int, timeout time.Duration) *protocol.ReleaseStatus {
	t.Helper()
	var st *protocol.ReleaseStatus
	eventually(t, timeout, "release "+id.String()+" completed", func() bool {
		var err error
		st, err = op.ReleaseStatus(ctx, id)
		return err == nil && st.State == protocol.ReleaseCompleted
	})
	if st.Installed != n || st.Targets != n || st.Failed != 0 {
		t.Errorf("release status: %d installed, %d failed of %d targets; want all %d installed", st.Installed, st.Failed, st.Targets, n)
	}
	return st
}
