package device_test

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/sha256"
	"errors"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	mochi "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"
	"github.com/rs/zerolog"

	"github.com/sealcast/sealcast/device"
	"github.com/sealcast/sealcast/device/internal/fleettest"
	"github.com/sealcast/sealcast/device/internal/mqtttest"
	"github.com/sealcast/sealcast/internal/testkit/devicetest"
	"github.com/sealcast/sealcast/keychain"
	"github.com/sealcast/sealcast/protocol"
)

const testChunk = 1024

type env struct {
	t   *testing.T
	srv *fleettest.Server
	url string
	b   *mqtttest.Broker
}

func newEnv(t *testing.T) *env {
	t.Helper()
	b := mqtttest.Start(t)
	s, err := fleettest.New(b.URL)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Close)
	return &env{t: t, srv: s, url: b.URL, b: b}
}

func image(n int, seed uint64) []byte {
	r := rand.New(rand.NewPCG(seed, 1))
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return b
}

func (e *env) opts(v device.Vault, inst device.Installer, rec *devicetest.Recorder) device.Options {
	return device.Options{
		Vault: v, Installer: inst, OnEvent: rec.On,
		Logger:       zerolog.New(zerolog.NewTestWriter(e.t)).Level(zerolog.InfoLevel),
		ChunkTimeout: 2 * time.Second, AckResend: 200 * time.Millisecond, AckResendMax: time.Second,
		ReconnectMin: 20 * time.Millisecond, ReconnectMax: 200 * time.Millisecond,
		ProgressInterval: 50 * time.Millisecond,
	}
}

type runner struct {
	a      *device.Agent
	cancel context.CancelFunc
	done   chan struct{}
	err    error
}

// run starts an agent; the test's cleanup stops it.
func run(t *testing.T, o device.Options) *runner {
	t.Helper()
	a, err := device.New(o)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	r := &runner{a: a, cancel: cancel, done: make(chan struct{})}
	go func() { r.err = a.Run(ctx); close(r.done) }()
	t.Cleanup(func() { r.stop(t) })
	return r
}

func (r *runner) stop(t *testing.T) error {
	r.cancel()
	return r.wait(t)
}

func (r *runner) wait(t *testing.T) error {
	select {
	case <-r.done:
		return r.err
	case <-time.After(20 * time.Second):
		t.Fatal("Run did not return")
		return nil
	}
}

func waitVault(t *testing.T, v device.Vault, ok func(device.State) bool) device.State {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		s, err := v.Load()
		if err == nil && ok(s) {
			return s
		}
		if time.Now().After(deadline) {
			t.Fatalf("vault never reached the expected state; last %+v (err %v)", s, err)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func (e *env) provision(serial string, dir string) (*device.FileVault, *device.SlotInstaller) {
	e.t.Helper()
	f := e.srv.Provision(serial, 16)
	v, err := device.CreateFileVault(filepath.Join(dir, "vault.json"), f)
	if err != nil {
		e.t.Fatal(err)
	}
	inst, err := device.NewSlotInstaller(filepath.Join(dir, "slots"))
	if err != nil {
		e.t.Fatal(err)
	}
	return v, inst
}

func (e *env) release(img []byte, version uint64) *fleettest.Release {
	e.t.Helper()
	r := e.srv.NewRelease(img, version, testChunk)
	if err := e.srv.PublishRelease(r); err != nil {
		e.t.Fatal(err)
	}
	return r
}

func checkSlot(t *testing.T, inst *device.SlotInstaller, img []byte) {
	t.Helper()
	act, ok, err := inst.Active()
	if err != nil || !ok {
		t.Fatalf("no active slot: %v", err)
	}
	got, err := os.ReadFile(inst.SlotPath(act.Slot))
	if err != nil || !bytes.Equal(got, img) {
		t.Fatalf("active slot %s does not hold the image (%d bytes, %v)", act.Slot, len(got), err)
	}
}

func TestEndToEnd(t *testing.T) {
	e := newEnv(t)
	dir := t.TempDir()
	v, inst := e.provision("dev-1", dir)
	rec := &devicetest.Recorder{}
	run(t, e.opts(v, inst, rec))

	img := image(10*testChunk+100, 1)
	r := e.release(img, 1)
	if err := e.srv.Wrap(r, "dev-1"); err != nil {
		t.Fatal(err)
	}
	got, err := e.srv.WaitAck("dev-1", 20*time.Second, func(a keychain.Ack) bool { return a.Kind == keychain.AckInstalled })
	if err != nil {
		t.Fatal(err)
	}
	if got.Ack.Seq != 16 || got.Ack.DeviceSeq != 15 || got.Ack.Version != 1 || got.Ack.ID != r.ID {
		t.Fatalf("ack %+v", got.Ack)
	}
	st := waitVault(t, v, func(s device.State) bool { return s.LastAckConfirmed })
	if st.Seq != 15 || st.Version != 1 {
		t.Fatalf("vault D=%d v=%d, want 15, 1", st.Seq, st.Version)
	}
	checkSlot(t, inst, img)
	if d := e.srv.Dev("dev-1"); d.C != 15 {
		t.Fatalf("server C = %d", d.C)
	}

	// A second release at n-1 (a different key).
	img2 := image(3*testChunk, 2)
	r2 := e.release(img2, 2)
	if err := e.srv.Wrap(r2, "dev-1"); err != nil {
		t.Fatal(err)
	}
	if _, err := e.srv.WaitAck("dev-1", 20*time.Second, func(a keychain.Ack) bool { return a.ID == r2.ID && a.Kind == keychain.AckInstalled }); err != nil {
		t.Fatal(err)
	}
	st = waitVault(t, v, func(s device.State) bool { return s.Seq == 14 && s.LastAckConfirmed })
	if st.Version != 2 {
		t.Fatalf("version %d", st.Version)
	}
	checkSlot(t, inst, img2)
	if fi, err := os.Stat(v.Path()); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("vault mode %v %v", fi.Mode(), err)
	}
}

func TestRekey(t *testing.T) {
	e := newEnv(t)
	v, inst := e.provision("dev-rk", t.TempDir())
	rec := &devicetest.Recorder{}
	run(t, e.opts(v, inst, rec))
	id, err := e.srv.Rekey("dev-rk", 32)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := e.srv.WaitAck("dev-rk", 20*time.Second, func(a keychain.Ack) bool { return a.ID == id && a.Kind == keychain.AckRekeyed }); err != nil {
		t.Fatal(err)
	}
	st := waitVault(t, v, func(s device.State) bool { return s.LastAckConfirmed })
	want, _ := keychain.DeriveUnitData(e.srv.Root, "dev-rk", 1)
	if st.Epoch != 1 || st.Seq != 32 || st.ChainLength != 32 || st.UnitData != want {
		t.Fatalf("after re-key: epoch %d seq %d len %d", st.Epoch, st.Seq, st.ChainLength)
	}
	// A release in the new epoch.
	img := image(2*testChunk, 3)
	r := e.release(img, 1)
	e.srv.Wrap(r, "dev-rk")
	waitVault(t, v, func(s device.State) bool { return s.Seq == 31 && s.LastAckConfirmed })
	checkSlot(t, inst, img)
}

func TestDropMidDownloadResumes(t *testing.T) {
	e := newEnv(t)
	v, inst := e.provision("dev-drop", t.TempDir())
	rec := &devicetest.Recorder{}
	o := e.opts(v, inst, rec)
	o.Window = 1
	const k = 4
	var dropped sync.Once
	o.Faults.DropAfterChunk = func(i uint32) bool {
		hit := false
		if i == k {
			dropped.Do(func() { hit = true })
		}
		return hit
	}
	run(t, o)
	img := image(12*testChunk, 4)
	r := e.release(img, 1)
	e.srv.Wrap(r, "dev-drop")
	waitVault(t, v, func(s device.State) bool { return s.LastAckConfirmed })
	checkSlot(t, inst, img)
	if rec.Count(device.EventConnected) < 2 {
		t.Fatalf("connected %d times, want a reconnect", rec.Count(device.EventConnected))
	}
	f := rec.Fetches()
	t.Logf("chunk fetches per index: %v", f)
	// Chunk k+1 was subscribed just before the drop; it is fetched again after the
	// reconnect unless its delivery won the race with the drop (a busy machine).
	for i := uint32(0); i < 12; i++ {
		if f[i] != 1 && (i != k+1 || f[i] != 2) {
			t.Errorf("chunk %d fetched %d times; want once (chunk %d: once or twice)", i, f[i], k+1)
		}
	}
}

func TestWindowResume(t *testing.T) {
	// With the default window, chunks already buffered are not fetched again.
	e := newEnv(t)
	v, inst := e.provision("dev-w4", t.TempDir())
	rec := &devicetest.Recorder{}
	o := e.opts(v, inst, rec)
	var dropped sync.Once
	o.Faults.DropAfterChunk = func(i uint32) bool {
		hit := false
		if i == 6 {
			dropped.Do(func() { hit = true })
		}
		return hit
	}
	run(t, o)
	img := image(20*testChunk, 5)
	r := e.release(img, 1)
	e.srv.Wrap(r, "dev-w4")
	waitVault(t, v, func(s device.State) bool { return s.LastAckConfirmed })
	checkSlot(t, inst, img)
	f := rec.Fetches()
	t.Logf("chunk fetches per index: %v", f)
	for i := uint32(0); i < 20; i++ {
		if f[i] < 1 || f[i] > 2 || (f[i] == 2 && (i <= 6 || i > 6+4)) {
			t.Errorf("chunk %d fetched %d times", i, f[i])
		}
	}
}

func TestPowerLossBeforePersist(t *testing.T) {
	e := newEnv(t)
	dir := t.TempDir()
	v, inst := e.provision("dev-pl1", dir)
	rec := &devicetest.Recorder{}
	o := e.opts(v, inst, rec)
	o.Faults.CrashAfterInstall = true
	r0 := run(t, o)
	img := image(5*testChunk, 6)
	r := e.release(img, 1)
	e.srv.Wrap(r, "dev-pl1")
	if err := r0.wait(t); !errors.Is(err, device.ErrCrashed) {
		t.Fatalf("Run = %v, want ErrCrashed", err)
	}
	if st, _ := v.Load(); st.Seq != 16 || st.LastAck != nil {
		t.Fatalf("crash before persist changed the vault: D=%d", st.Seq)
	}
	if len(e.srv.Dev("dev-pl1").Acks) != 0 {
		t.Fatal("an ack was sent before persisting")
	}
	// Reboot: the same vault and slots; the retained key message is redone.
	rec2 := &devicetest.Recorder{}
	run(t, e.opts(device.NewFileVault(v.Path()), inst, rec2))
	st := waitVault(t, v, func(s device.State) bool { return s.LastAckConfirmed })
	if st.Seq != 15 || st.Version != 1 {
		t.Fatalf("D=%d v=%d", st.Seq, st.Version)
	}
	if rec2.Count(device.EventCommitted) != 1 {
		t.Fatalf("re-install not done")
	}
	checkSlot(t, inst, img)
}

func TestPowerLossBeforeAck(t *testing.T) {
	e := newEnv(t)
	v, inst := e.provision("dev-pl2", t.TempDir())
	rec := &devicetest.Recorder{}
	o := e.opts(v, inst, rec)
	o.Faults.CrashAfterPersist = true
	r0 := run(t, o)
	img := image(5*testChunk, 7)
	r := e.release(img, 1)
	e.srv.Wrap(r, "dev-pl2")
	if err := r0.wait(t); !errors.Is(err, device.ErrCrashed) {
		t.Fatalf("Run = %v, want ErrCrashed", err)
	}
	st, _ := v.Load()
	if st.Seq != 15 || st.LastAck == nil || st.LastAckConfirmed {
		t.Fatalf("after persist: D=%d ack=%v confirmed=%v", st.Seq, st.LastAck != nil, st.LastAckConfirmed)
	}
	if len(e.srv.Dev("dev-pl2").Acks) != 0 {
		t.Fatal("ack sent despite the crash")
	}
	rec2 := &devicetest.Recorder{}
	run(t, e.opts(device.NewFileVault(v.Path()), inst, rec2))
	waitVault(t, v, func(s device.State) bool { return s.LastAckConfirmed })
	if rec2.Count(device.EventCommitted) != 0 {
		t.Fatal("the image was installed again; only the ack should be re-sent")
	}
	got, _ := e.srv.WaitAck("dev-pl2", time.Second, func(a keychain.Ack) bool { return a.Kind == keychain.AckInstalled })
	if !bytes.Equal(got.Raw, st.LastAck) {
		t.Fatal("the re-sent ack differs from the persisted last_ack")
	}
}

func TestPowerLossMidDownload(t *testing.T) {
	// Faults.Crash at CrashDownloading: nothing is persisted, the reboot downloads the
	// whole image again, and the counter moves once.
	e := newEnv(t)
	v, inst := e.provision("dev-pl3", t.TempDir())
	rec := &devicetest.Recorder{}
	o := e.opts(v, inst, rec)
	var asked []device.CrashPoint
	var mu sync.Mutex
	o.Faults.Crash = func(p device.CrashPoint, _ keychain.ReleaseID, chunk uint32) bool {
		mu.Lock()
		defer mu.Unlock()
		asked = append(asked, p)
		return p == device.CrashDownloading && chunk == 2
	}
	r0 := run(t, o)
	img := image(6*testChunk, 9)
	r := e.release(img, 1)
	e.srv.Wrap(r, "dev-pl3")
	if err := r0.wait(t); !errors.Is(err, device.ErrCrashed) {
		t.Fatalf("Run = %v, want ErrCrashed", err)
	}
	if st, _ := v.Load(); st.Seq != 16 || st.LastAck != nil {
		t.Fatalf("a crash mid-download changed the vault: D=%d", st.Seq)
	}
	if rec.Count(device.EventCommitted) != 0 || rec.Count(device.EventChunkDone) != 3 {
		t.Fatalf("before the crash: %d commits, %d chunks done; want 0 and 3",
			rec.Count(device.EventCommitted), rec.Count(device.EventChunkDone))
	}
	mu.Lock()
	if len(asked) != 3 {
		t.Errorf("Crash asked at %v, want downloading after chunks 0, 1, 2", asked)
	}
	mu.Unlock()

	rec2 := &devicetest.Recorder{}
	o2 := e.opts(device.NewFileVault(v.Path()), inst, rec2)
	o2.Faults.Crash = func(p device.CrashPoint, _ keychain.ReleaseID, _ uint32) bool {
		mu.Lock()
		defer mu.Unlock()
		asked = append(asked, p)
		return false
	}
	run(t, o2)
	st := waitVault(t, v, func(s device.State) bool { return s.LastAckConfirmed })
	if st.Seq != 15 || st.Version != 1 {
		t.Fatalf("D=%d v=%d", st.Seq, st.Version)
	}
	if n := rec2.Count(device.EventChunkDone); n != 6 {
		t.Fatalf("after the reboot %d chunks were processed, want all 6 again", n)
	}
	checkSlot(t, inst, img)
	mu.Lock()
	defer mu.Unlock()
	var installed, persisted bool
	for _, p := range asked[3:] {
		installed = installed || p == device.CrashInstalled
		persisted = persisted || p == device.CrashPersisted
	}
	if !installed || !persisted {
		t.Fatalf("Crash asked at %v after the reboot; want the installed and persisted points too", asked[3:])
	}
}

// refuser makes the broker refuse chosen subscriptions: it rewrites their filter into
// an invalid one, which mochi answers with SUBACK 0x80 for an MQTT 3.1.1 client.
type refuser struct {
	mochi.HookBase
	mu     sync.Mutex
	refuse map[string]int // filter -> refusals left
	seen   map[string]int // filter -> SUBSCRIBEs received
}

func (h *refuser) ID() string           { return "refuser" }
func (h *refuser) Provides(b byte) bool { return b == mochi.OnSubscribe }
func (h *refuser) count(f string) int   { h.mu.Lock(); defer h.mu.Unlock(); return h.seen[f] }
func (h *refuser) OnSubscribe(_ *mochi.Client, pk packets.Packet) packets.Packet {
	h.mu.Lock()
	defer h.mu.Unlock()
	for i, f := range pk.Filters {
		h.seen[f.Filter]++
		if h.refuse[f.Filter] > 0 {
			h.refuse[f.Filter]--
			pk.Filters[i].Filter = "refused/#/x"
		}
	}
	return pk
}

func TestRefusedSubscriptionsRetried(t *testing.T) {
	// [SC-10.1a]: the key topic, the manifest and a chunk are each refused once. With one
	// fetch try, only a SUBACK-driven retry (not the chunk timeout) gets the update done.
	e := newEnv(t)
	v, inst := e.provision("dev-sub", t.TempDir())
	img := image(6*testChunk, 10)
	r := e.release(img, 1)
	chunk2 := protocol.ChunkTopic(r.ID, 2)
	h := &refuser{seen: map[string]int{}, refuse: map[string]int{
		protocol.KeyTopic("dev-sub"): 1, protocol.ManifestTopic(r.ID): 1, chunk2: 1,
	}}
	if err := e.b.Server.AddHook(h, nil); err != nil {
		t.Fatal(err)
	}
	e.srv.Wrap(r, "dev-sub")
	rec := &devicetest.Recorder{}
	o := e.opts(v, inst, rec)
	o.FetchTries = 1
	o.ChunkTimeout = 10 * time.Second
	rn := run(t, o)
	waitVault(t, v, func(s device.State) bool { return s.LastAckConfirmed })
	checkSlot(t, inst, img)
	if n := rec.Count(device.EventFailed); n != 0 {
		t.Fatalf("%d failures", n)
	}
	if got := rn.a.Stats().SubRetries; got != 3 {
		t.Errorf("SubRetries = %d, want 3", got)
	}
	if n := h.count(chunk2); n != 2 {
		t.Errorf("chunk 2 subscribed %d times, want 2 (refused, retried)", n)
	}
}

func TestAckResentUntilReceipt(t *testing.T) {
	e := newEnv(t)
	v, inst := e.provision("dev-rs", t.TempDir())
	rec := &devicetest.Recorder{}
	o := e.opts(v, inst, rec)
	o.Faults.AckDelay = 100 * time.Millisecond
	e.srv.AnswerAcks.Store(false)
	run(t, o)
	r := e.release(image(2*testChunk, 8), 1)
	e.srv.Wrap(r, "dev-rs")
	rec.Wait(t, device.EventAckSent, 3)
	if st, _ := v.Load(); st.LastAckConfirmed {
		t.Fatal("confirmed without a receipt")
	}
	e.srv.AnswerAcks.Store(true)
	if err := e.srv.Resend("dev-rs"); err != nil {
		t.Fatal(err)
	}
	waitVault(t, v, func(s device.State) bool { return s.LastAckConfirmed })
	if d := e.srv.Dev("dev-rs"); d.C != 15 || d.Confirmations != 1 {
		t.Fatalf("server C=%d confirmations=%d", d.C, d.Confirmations)
	}
}

// failEnv runs one device and returns the report it sends.
func failCase(t *testing.T, e *env, serial string, setup func(v device.Vault) []byte, o func(*device.Options), hook func(*devicetest.Recorder)) (keychain.Ack, *devicetest.Recorder, device.Vault) {
	t.Helper()
	v, inst := e.provision(serial, t.TempDir())
	rec := &devicetest.Recorder{}
	if hook != nil {
		hook(rec)
	}
	opts := e.opts(v, inst, rec)
	opts.ChunkTimeout = 500 * time.Millisecond
	if o != nil {
		o(&opts)
	}
	km := setup(v)
	run(t, opts)
	if err := e.srv.Publish(protocol.KeyTopic(serial), km, true); err != nil {
		t.Fatal(err)
	}
	got, err := e.srv.WaitAck(serial, 20*time.Second, func(a keychain.Ack) bool { return a.Kind == keychain.AckFailed })
	if err != nil {
		t.Fatal(err)
	}
	// WaitAck only returns acks whose MAC verified under K_n.
	if st, _ := v.Load(); st.Seq != 16 || st.LastAck != nil || got.Ack.DeviceSeq != 16 {
		t.Fatalf("D changed: vault %d, report device_seq %d", st.Seq, got.Ack.DeviceSeq)
	}
	return got.Ack, rec, v
}

func TestFailures(t *testing.T) {
	e := newEnv(t)
	img := image(6*testChunk, 9)

	t.Run("bad_manifest", func(t *testing.T) {
		r := e.srv.NewRelease(img, 1, testChunk)
		r.Manifest = bytes.Clone(r.Manifest)
		r.Manifest[179] ^= 1 // break the signature; the key message binds this digest
		r.Digest = keychain.ManifestDigest(r.Manifest)
		e.srv.PublishRelease(r)
		a, _, _ := failCase(t, e, "f-manifest", func(device.Vault) []byte { return e.srv.KeyMessage(r, "f-manifest") }, nil, nil)
		if protocol.Code(a.Code) != protocol.CodeBadManifest {
			t.Fatalf("code %v", protocol.Code(a.Code))
		}
	})
	t.Run("rollback", func(t *testing.T) {
		r := e.release(img, 3)
		a, _, _ := failCase(t, e, "f-rollback", func(v device.Vault) []byte {
			st, _ := v.Load()
			st.Version = 5
			v.Save(st)
			return e.srv.KeyMessage(r, "f-rollback")
		}, nil, nil)
		if protocol.Code(a.Code) != protocol.CodeRollback || a.Version != 3 {
			t.Fatalf("code %v version %d", protocol.Code(a.Code), a.Version)
		}
	})
	t.Run("unwrap_failed", func(t *testing.T) {
		r := e.release(img, 1)
		a, _, _ := failCase(t, e, "f-unwrap", func(device.Vault) []byte {
			km := bytes.Clone(e.srv.KeyMessage(r, "f-unwrap"))
			km[100] ^= 1 // tamper with the sealed content key
			return km
		}, nil, nil)
		if protocol.Code(a.Code) != protocol.CodeUnwrapFailed {
			t.Fatalf("code %v", protocol.Code(a.Code))
		}
	})
	t.Run("chunk_corrupt", func(t *testing.T) {
		r := e.srv.NewRelease(img, 1, testChunk)
		e.srv.PublishRelease(r)
		bad := bytes.Clone(r.Chunks[2])
		bad[10] ^= 1
		e.srv.Publish(protocol.ChunkTopic(r.ID, 2), bad, true)
		a, rec, _ := failCase(t, e, "f-chunk", func(device.Vault) []byte { return e.srv.KeyMessage(r, "f-chunk") }, nil, nil)
		if protocol.Code(a.Code) != protocol.CodeChunkCorrupt {
			t.Fatalf("code %v", protocol.Code(a.Code))
		}
		if n := rec.Fetches()[2]; n != 3 {
			t.Fatalf("corrupt chunk fetched %d times, want 3", n)
		}
	})
	t.Run("timeout", func(t *testing.T) {
		r := e.srv.NewRelease(img, 1, testChunk)
		e.srv.PublishRelease(r)
		e.srv.Publish(protocol.ChunkTopic(r.ID, 4), nil, true) // clear the retained chunk
		a, _, _ := failCase(t, e, "f-timeout", func(device.Vault) []byte { return e.srv.KeyMessage(r, "f-timeout") }, nil, nil)
		if protocol.Code(a.Code) != protocol.CodeTimeout {
			t.Fatalf("code %v", protocol.Code(a.Code))
		}
	})
}

func TestStaleKey(t *testing.T) {
	e := newEnv(t)
	v, inst := e.provision("f-stale2", t.TempDir())
	st, _ := v.Load()
	st.Seq = 10 // the device already used 16..11
	v.Save(st)
	r := e.release(image(testChunk, 10), 1)
	rec := &devicetest.Recorder{}
	run(t, e.opts(v, inst, rec))
	e.srv.Wrap(r, "f-stale2") // at C = 16
	got, err := e.srv.WaitAck("f-stale2", 20*time.Second, func(a keychain.Ack) bool { return a.Kind == keychain.AckFailed })
	if err != nil {
		t.Fatal(err)
	}
	if protocol.Code(got.Ack.Code) != protocol.CodeStaleKey || got.Ack.DeviceSeq != 10 || got.Ack.Seq != 16 {
		t.Fatalf("report %+v", got.Ack)
	}
}

func TestTamperedChunkRefetched(t *testing.T) {
	e := newEnv(t)
	v, inst := e.provision("dev-tamper", t.TempDir())
	img := image(6*testChunk, 11)
	r := e.srv.NewRelease(img, 1, testChunk)
	e.srv.PublishRelease(r)
	bad := bytes.Clone(r.Chunks[3])
	bad[0] ^= 0xff
	e.srv.Publish(protocol.ChunkTopic(r.ID, 3), bad, true)
	rec := &devicetest.Recorder{}
	var fixed sync.Once
	rec.Hook = func(ev device.Event) {
		if ev.Kind == device.EventChunkBad && ev.Index == 3 {
			// The operator repairs the retained chunk before the device fetches it again.
			fixed.Do(func() { e.srv.Publish(protocol.ChunkTopic(r.ID, 3), r.Chunks[3], true) })
		}
	}
	run(t, e.opts(v, inst, rec))
	e.srv.Wrap(r, "dev-tamper")
	waitVault(t, v, func(s device.State) bool { return s.LastAckConfirmed })
	checkSlot(t, inst, img)
	if f := rec.Fetches(); f[3] != 2 || rec.Count(device.EventChunkBad) != 1 {
		t.Fatalf("chunk 3 fetched %d times, %d bad", f[3], rec.Count(device.EventChunkBad))
	}
}

func TestImageHashUsed(t *testing.T) {
	// sanity: the sha of what the slot holds matches the manifest
	e := newEnv(t)
	v, inst := e.provision("dev-hash", t.TempDir())
	img := image(testChunk, 12)
	r := e.release(img, 1)
	run(t, e.opts(v, inst, &devicetest.Recorder{}))
	e.srv.Wrap(r, "dev-hash")
	waitVault(t, v, func(s device.State) bool { return s.LastAckConfirmed })
	act, _, _ := inst.Active()
	if sum := sha256.Sum256(img); act.Release != r.ID || act.Version != 1 || act.ImageSize != uint64(len(img)) || act.ImageSHA256 == "" || sum != r.M.ImageSHA256 {
		t.Fatalf("active %+v", act)
	}
}

// TestTransientFailureRetriedWhileConnected: a device whose update failed for a transient
// reason (here chunk_corrupt after three tries) asks for its key message again after
// RetryAfter without losing its connection, and installs once the chunk is repaired;
// the report stays the only one.
func TestTransientFailureRetriedWhileConnected(t *testing.T) {
	e := newEnv(t)
	v, inst := e.provision("dev-retry", t.TempDir())
	img := image(6*testChunk, 21)
	r := e.srv.NewRelease(img, 1, testChunk)
	e.srv.PublishRelease(r)
	bad := bytes.Clone(r.Chunks[2])
	bad[10] ^= 1
	e.srv.Publish(protocol.ChunkTopic(r.ID, 2), bad, true)
	rec := &devicetest.Recorder{}
	var fixed sync.Once
	rec.Hook = func(ev device.Event) {
		if ev.Kind == device.EventFailed && ev.Code == protocol.CodeChunkCorrupt {
			// The operator repairs the retained chunk after the device gave up on it.
			fixed.Do(func() { e.srv.Publish(protocol.ChunkTopic(r.ID, 2), r.Chunks[2], true) })
		}
	}
	o := e.opts(v, inst, rec)
	o.RetryAfter, o.RetryMax = 300*time.Millisecond, time.Second
	ag := run(t, o)
	e.srv.Wrap(r, "dev-retry")
	waitVault(t, v, func(s device.State) bool { return s.LastAckConfirmed })
	checkSlot(t, inst, img)
	st := ag.a.Stats()
	if st.Retries != 1 || st.Disconnects != 0 || st.ReportsSent != 1 {
		t.Fatalf("retries %d, disconnects %d, reports %d; want 1, 0, 1", st.Retries, st.Disconnects, st.ReportsSent)
	}
	if n := rec.Count(device.EventFailed); n != 1 {
		t.Fatalf("%d failures, want 1", n)
	}
}

// TestForgedChunkNeverReachesInstaller: every target knows the payload key, so a target
// with broker access can publish chunks that AES-GCM accepts for its co-targets. The
// chunk tree the manifest signs refuses them before decryption ([SC-4.3]): the installer
// never receives a byte of the forgery, and the update fails with chunk_corrupt.
func TestForgedChunkNeverReachesInstaller(t *testing.T) {
	e := newEnv(t)
	img := image(6*testChunk, 13)
	r := e.srv.NewRelease(img, 1, testChunk)
	if err := e.srv.PublishRelease(r); err != nil {
		t.Fatal(err)
	}
	const i = 2
	ctLen := testChunk + keychain.TagSize
	evil := keychain.NewChunkCipher(r.CK.PayloadKey(r.ID)).Seal(nil, i, false, bytes.Repeat([]byte{0xee}, testChunk))
	forged := append(evil, r.Chunks[i][ctLen:]...) // the genuine proof, if chunks carry one
	if err := e.srv.Publish(protocol.ChunkTopic(r.ID, i), forged, true); err != nil {
		t.Fatal(err)
	}
	var seen recordingInstaller
	a, _, _ := failCase(t, e, "f-forged", func(device.Vault) []byte { return e.srv.KeyMessage(r, "f-forged") },
		func(o *device.Options) { seen.inner, o.Installer = o.Installer, &seen }, nil)
	if protocol.Code(a.Code) != protocol.CodeChunkCorrupt {
		t.Fatalf("code %v, want chunk_corrupt", protocol.Code(a.Code))
	}
	got := seen.bytes()
	if !bytes.Equal(got, img[:len(got)]) || len(got) > i*testChunk {
		t.Fatalf("the installer received %d bytes, not a prefix of the image before chunk %d", len(got), i)
	}
}

// recordingInstaller keeps every byte its installs receive.
type recordingInstaller struct {
	inner device.Installer
	mu    sync.Mutex
	got   []byte
}

func (r *recordingInstaller) Begin(m *keychain.Manifest) (device.Install, error) {
	in, err := r.inner.Begin(m)
	if err != nil {
		return nil, err
	}
	return &recordingInstall{Install: in, r: r}, nil
}

func (r *recordingInstaller) bytes() []byte {
	r.mu.Lock()
	defer r.mu.Unlock()
	return bytes.Clone(r.got)
}

type recordingInstall struct {
	device.Install
	r *recordingInstaller
}

func (w *recordingInstall) Write(p []byte) (int, error) {
	w.r.mu.Lock()
	w.r.got = append(w.r.got, p...)
	w.r.mu.Unlock()
	return w.Install.Write(p)
}

// TestKeyRotation: a device learns a new release key from its key statement, persists it,
// installs a release signed by it, and from then on refuses a manifest signed by the
// retired key ([SC-5.3]); a forged statement is ignored.
func TestKeyRotation(t *testing.T) {
	e := newEnv(t)
	v, inst := e.provision("dev-keys", t.TempDir())
	rec := &devicetest.Recorder{}
	run(t, e.opts(v, inst, rec))
	// A statement signed by a stranger's key changes nothing.
	_, stranger, _ := ed25519.GenerateKey(nil)
	pubX, _, _ := ed25519.GenerateKey(nil)
	forged, _ := keychain.KeyStatement{Seq: 1, Key: pubX}.Sign(stranger)
	if err := e.srv.Publish(protocol.KeyStatementTopic(1), forged, true); err != nil {
		t.Fatal(err)
	}
	old, oldSeq := e.srv.SignKey, e.srv.KeySeq
	if err := e.srv.Rotate(); err != nil {
		t.Fatal(err)
	}
	st := waitVault(t, v, func(s device.State) bool { return s.KeySeq == 1 })
	if !st.ReleasePublicKey.Equal(e.srv.Pub) {
		t.Fatal("the vault holds another key than the statement's")
	}
	img := image(3*testChunk, 21)
	r := e.release(img, 1)
	e.srv.Wrap(r, "dev-keys")
	waitVault(t, v, func(s device.State) bool { return s.Version == 1 && s.LastAckConfirmed })
	checkSlot(t, inst, img)

	// The retired key signs a release: the device refuses its manifest.
	current := e.srv.SignKey
	e.srv.SignKey, e.srv.KeySeq = old, oldSeq
	r2 := e.release(image(3*testChunk, 22), 2)
	e.srv.SignKey, e.srv.KeySeq = current, 1
	e.srv.Wrap(r2, "dev-keys")
	got, err := e.srv.WaitAck("dev-keys", 20*time.Second, func(a keychain.Ack) bool { return a.Kind == keychain.AckFailed })
	if err != nil {
		t.Fatal(err)
	}
	if protocol.Code(got.Ack.Code) != protocol.CodeBadManifest {
		t.Fatalf("a manifest of the retired key: code %v, want bad_manifest", protocol.Code(got.Ack.Code))
	}
}

// TestKeyRotationCatchUp: a device offered a release whose manifest names a release key
// it has not learned waits for the key statement, then verifies and installs ([SC-5.3]).
func TestKeyRotationCatchUp(t *testing.T) {
	e := newEnv(t)
	v, inst := e.provision("dev-catchup", t.TempDir())
	rec := &devicetest.Recorder{}
	run(t, e.opts(v, inst, rec))
	pub, priv, _ := ed25519.GenerateKey(nil)
	st, err := keychain.KeyStatement{Seq: 1, Key: pub}.Sign(e.srv.SignKey)
	if err != nil {
		t.Fatal(err)
	}
	e.srv.SignKey, e.srv.Pub, e.srv.KeySeq = priv, pub, 1 // the statement is not out yet
	img := image(2*testChunk, 23)
	r := e.release(img, 1)
	e.srv.Wrap(r, "dev-catchup")
	rec.Wait(t, device.EventManifestFetch, 1)
	time.Sleep(100 * time.Millisecond) // the manifest arrives and waits
	if s, _ := v.Load(); s.Version != 0 || s.KeySeq != 0 {
		t.Fatalf("installed version %d with key %d before the key statement", s.Version, s.KeySeq)
	}
	if err := e.srv.Publish(protocol.KeyStatementTopic(1), st, true); err != nil {
		t.Fatal(err)
	}
	s := waitVault(t, v, func(s device.State) bool { return s.Version == 1 && s.LastAckConfirmed })
	if s.KeySeq != 1 {
		t.Fatalf("key %d after the install", s.KeySeq)
	}
	checkSlot(t, inst, img)
}
