package updater_test

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"fmt"
	"sync"
	"testing"
	"time"

	mqtt "github.com/eclipse/paho.mqtt.golang"
	"github.com/rs/zerolog"

	"github.com/sealcast/sealcast/internal/testkit/brokertest"
	"github.com/sealcast/sealcast/internal/testkit/updatertest"
	"github.com/sealcast/sealcast/keychain"
	"github.com/sealcast/sealcast/operator"
	"github.com/sealcast/sealcast/protocol"
	"github.com/sealcast/sealcast/updater"
	"github.com/sealcast/sealcast/updater/mqttbus"
)

// env is a broker, a store, a running updater and an operator client, all real.
type env struct {
	t      *testing.T
	b      *brokertest.Env
	store  updater.Store
	u      *updater.Updater
	op     *operator.Client
	signer ed25519.PrivateKey
	stop   func()
}

type storeOpener = updatertest.Opener

var (
	boltOpener  = updatertest.Bolt
	redisOpener = updatertest.Redis
	redisAt     = updatertest.RedisAt
)

func startEnv(t *testing.T, open storeOpener, tweak ...func(*updater.Options)) *env {
	t.Helper()
	b := brokertest.Start(t)
	_, signer, _ := ed25519.GenerateKey(rand.Reader)
	e := &env{t: t, b: b, store: open(t), signer: signer}
	e.startUpdater(tweak...)
	op, err := operator.Dial(context.Background(), operator.Options{URL: b.URL, Username: b.Admin.Username, Password: b.Admin.Password, Timeout: 20 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	e.op = op
	t.Cleanup(func() {
		op.Close()
		e.stop()
		e.store.Close()
	})
	return e
}

func (e *env) startUpdater(tweak ...func(*updater.Options)) {
	t := e.t
	ctx, cancel := context.WithCancel(context.Background())
	bus, err := mqttbus.Dial(ctx, mqttbus.Options{URL: e.b.URL, ClientID: fmt.Sprintf("updater-%p", e), Username: e.b.Updater.Username, Password: e.b.Updater.Password})
	if err != nil {
		t.Fatal(err)
	}
	o := updater.Options{
		Root: e.b.Root, SigningKey: e.signer, Store: e.store, Bus: bus, DataDir: t.TempDir(),
		ChainLength: 16, BrokerURL: e.b.URL, Revoker: e.b.Broker,
		Logger: zerolog.New(zerolog.NewTestWriter(t)).Level(zerolog.WarnLevel),
	}
	for _, f := range tweak {
		f(&o)
	}
	u, err := updater.New(o)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		u.Run(ctx)
	}()
	e.u = u
	e.stop = func() {
		cancel()
		<-done
		bus.Close()
	}
	// Wait until the updater answers admin requests.
	select {
	case <-u.Ready():
	case <-done:
		t.Fatal("the updater stopped before it was ready")
	case <-time.After(30 * time.Second):
		t.Fatal("the updater did not get ready")
	}
}

func (e *env) provision(n int) []protocol.DeviceFile {
	e.t.Helper()
	serials := make([]string, n)
	for i := range serials {
		serials[i] = fmt.Sprintf("dev-%04d", i)
	}
	files, err := e.op.Provision(context.Background(), serials, 0)
	if err != nil {
		e.t.Fatal(err)
	}
	return files
}

func (e *env) release(img []byte, version uint64, devices ...string) keychain.ReleaseID {
	e.t.Helper()
	args := protocol.ReleaseCreateArgs{Version: version, Devices: devices, All: len(devices) == 0, ChunkSize: 4096}
	res, err := e.op.Release(context.Background(), bytes.NewReader(img), int64(len(img)), args)
	if err != nil {
		e.t.Fatal(err)
	}
	return res.Release
}

func (e *env) device(serial string) *updater.Device {
	e.t.Helper()
	ds, err := e.store.Devices(context.Background(), []string{serial})
	if err != nil || ds[0] == nil {
		e.t.Fatalf("device %s: %v", serial, err)
	}
	return ds[0]
}

func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// testDevice speaks the device side of the protocol with the keychain package, so that
// these tests can observe and forge every message. The real agent lives in package device
// and is tested against this updater in tests/e2e.
type testDevice struct {
	t    *testing.T
	file protocol.DeviceFile
	c    mqtt.Client
	mu   sync.Mutex
	keys chan []byte
	rcpt chan []byte
	u    keychain.UnitData
	d    uint32 // the device's sequence number D
	ver  uint64
	used map[uint32][]byte // the key message installed at each index
}

func connectDevice(t *testing.T, url string, f protocol.DeviceFile) *testDevice {
	t.Helper()
	d := &testDevice{t: t, file: f, keys: make(chan []byte, 16), rcpt: make(chan []byte, 16), d: f.Seq, used: map[uint32][]byte{}}
	copy(d.u[:], f.UnitData)
	o := mqtt.NewClientOptions().AddBroker(url).SetClientID(f.Serial).SetUsername(f.Serial).SetPassword(f.Broker.Password).SetCleanSession(true)
	d.c = mqtt.NewClient(o)
	if tok := d.c.Connect(); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		t.Fatalf("device %s connect: %v", f.Serial, tok.Error())
	}
	sub := func(topic string, ch chan []byte) {
		tok := d.c.Subscribe(topic, 1, func(_ mqtt.Client, m mqtt.Message) {
			if len(m.Payload()) > 0 {
				ch <- append([]byte(nil), m.Payload()...)
			}
		})
		tok.Wait()
	}
	sub(protocol.KeyTopic(f.Serial), d.keys)
	sub(protocol.ReceiptTopic(f.Serial), d.rcpt)
	t.Cleanup(func() { d.c.Disconnect(0) })
	return d
}

func (d *testDevice) next(ch chan []byte, what string) []byte {
	d.t.Helper()
	select {
	case b := <-ch:
		return b
	case <-time.After(30 * time.Second):
		d.t.Fatalf("device %s: no %s", d.file.Serial, what)
		return nil
	}
}

// fetch subscribes to a retained topic and returns its payload.
func (d *testDevice) fetch(topic string) []byte {
	d.t.Helper()
	ch := make(chan []byte, 1)
	tok := d.c.Subscribe(topic, 1, func(_ mqtt.Client, m mqtt.Message) {
		select {
		case ch <- append([]byte(nil), m.Payload()...):
		default:
		}
	})
	tok.Wait()
	if code := tok.(*mqtt.SubscribeToken).Result()[topic]; code != 1 {
		d.t.Fatalf("subscribing to %s: SUBACK code %#x", topic, code)
	}
	// Not "defer d.c.Unsubscribe(topic).Wait()": that would unsubscribe at once.
	defer func() { d.c.Unsubscribe(topic).Wait() }()
	return d.next(ch, topic)
}

// install waits for a release key message, installs, and returns the ack it would send
// (not yet sent) and the image.
func (d *testDevice) install() (ack []byte, km *keychain.KeyMessage, image []byte) {
	d.t.Helper()
	raw := d.next(d.keys, "key message")
	km, err := keychain.ParseKeyMessage(raw)
	if err != nil {
		d.t.Fatal(err)
	}
	if km.Kind != keychain.KindRelease || km.Seq != d.d {
		d.t.Fatalf("device %s at %d got a %s key at %d", d.file.Serial, d.d, km.Kind, km.Seq)
	}
	k := keychain.Key(d.u, km.Seq)
	ck, err := km.Open(k, d.file.Serial)
	if err != nil {
		d.t.Fatalf("unwrap: %v", err)
	}
	mb := d.fetch(protocol.ManifestTopic(km.ID))
	m, err := keychain.ParseManifest(mb, ed25519.PublicKey(d.file.ReleasePublicKey))
	if err != nil || keychain.ManifestDigest(mb) != km.ManifestDigest {
		d.t.Fatalf("manifest: %v", err)
	}
	dec := keychain.NewImageDecryptor(keychain.ContentKey(ck).PayloadKey(km.ID), m)
	for i := uint32(0); i < m.ChunkCount; i++ {
		if image, err = dec.Open(image, i, d.fetch(protocol.ChunkTopic(km.ID, i))); err != nil {
			d.t.Fatalf("chunk %d: %v", i, err)
		}
	}
	if err := dec.Finish(); err != nil {
		d.t.Fatal(err)
	}
	ack, err = keychain.Ack{Kind: keychain.AckInstalled, Epoch: km.Epoch, Seq: km.Seq, ID: km.ID, Version: m.Version, DeviceSeq: km.Seq - 1}.Seal(k, d.file.Serial)
	if err != nil {
		d.t.Fatal(err)
	}
	d.d, d.ver = km.Seq-1, m.Version
	d.used[km.Seq] = raw
	return ack, km, image
}

// lastKeyAt returns the key message the device installed at index n.
func (d *testDevice) lastKeyAt(n uint32) []byte {
	d.t.Helper()
	raw, ok := d.used[n]
	if !ok {
		d.t.Fatalf("device %s installed nothing at %d", d.file.Serial, n)
	}
	return raw
}

// publishAsUpdater publishes a retained message with the updater's broker account.
func (e *env) publishAsUpdater(topic string, payload []byte) {
	e.t.Helper()
	o := mqtt.NewClientOptions().AddBroker(e.b.URL).SetClientID("test-as-updater").
		SetUsername(e.b.Updater.Username).SetPassword(e.b.Updater.Password).SetCleanSession(true)
	c := mqtt.NewClient(o)
	if tok := c.Connect(); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		e.t.Fatalf("connecting as the updater: %v", tok.Error())
	}
	defer c.Disconnect(100)
	if tok := c.Publish(topic, 1, true, payload); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		e.t.Fatalf("publishing %s: %v", topic, tok.Error())
	}
}

func (d *testDevice) publishAck(ack []byte) {
	d.t.Helper()
	d.publish(protocol.AckTopic(d.file.Serial), ack)
}

func (d *testDevice) publish(topic string, b []byte) {
	d.t.Helper()
	if tok := d.c.Publish(topic, 1, false, b); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		d.t.Fatalf("publish %s: %v", topic, tok.Error())
	}
}

// receipt waits for a receipt that answers ack and checks its MAC.
func (d *testDevice) receipt(ack []byte, k keychain.ChainKey) keychain.Receipt {
	d.t.Helper()
	a, _ := keychain.ParseAck(ack)
	for {
		b := d.next(d.rcpt, "receipt")
		r, err := keychain.ParseReceipt(b)
		if err != nil || !r.Answers(a) {
			continue
		}
		if err := keychain.VerifyReceipt(b, k, d.file.Serial); err != nil {
			d.t.Fatalf("receipt MAC: %v", err)
		}
		return r
	}
}

// ackUntilReceipt publishes ack every second until its receipt arrives, as a device does
// (PROTOCOL.md 10.1 step 6).
func (d *testDevice) ackUntilReceipt(ack []byte, k keychain.ChainKey) keychain.Receipt {
	d.t.Helper()
	a, _ := keychain.ParseAck(ack)
	deadline := time.Now().Add(60 * time.Second)
	for time.Now().Before(deadline) {
		d.publishAck(ack)
		select {
		case b := <-d.rcpt:
			if r, err := keychain.ParseReceipt(b); err == nil && r.Answers(a) && keychain.VerifyReceipt(b, k, d.file.Serial) == nil {
				return r
			}
		case <-time.After(time.Second):
		}
	}
	d.t.Fatalf("device %s: no receipt in 60 s", d.file.Serial)
	return keychain.Receipt{}
}

// installAll connects each device of serials (files by serial) and has it install and
// confirm the release it is offered.
func (e *env) installAll(byS map[string]protocol.DeviceFile, serials []string) {
	e.t.Helper()
	for _, s := range serials {
		d := connectDevice(e.t, e.b.URL, byS[s])
		ack, km, _ := d.install()
		d.ackUntilReceipt(ack, keychain.Key(d.u, km.Seq))
	}
}

// releaseStatus returns release id's status from the admin service.
func (e *env) releaseStatus(id keychain.ReleaseID) protocol.ReleaseStatus {
	e.t.Helper()
	st, err := e.u.Admin().Release(context.Background(), id)
	if err != nil {
		e.t.Fatal(err)
	}
	return st
}

// report sends the report (kind 3) of a failure with code for km, as the device would
// (version 1, its sequence number unchanged), and waits for its recorded receipt.
func (d *testDevice) report(km *keychain.KeyMessage, code protocol.Code) {
	d.t.Helper()
	k := keychain.Key(d.u, km.Seq)
	rep, err := keychain.Ack{Kind: keychain.AckFailed, Epoch: km.Epoch, Seq: km.Seq, ID: km.ID, Version: 1, DeviceSeq: km.Seq, Code: uint16(code)}.Seal(k, d.file.Serial)
	if err != nil {
		d.t.Fatal(err)
	}
	d.publishAck(rep)
	if r := d.receipt(rep, k); r.Status != keychain.ReceiptRecorded {
		d.t.Fatalf("device %s: receipt status %d for a report, want recorded", d.file.Serial, r.Status)
	}
}
