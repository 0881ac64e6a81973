package updater_test

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"encoding/json"
	"maps"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/sealcast/sealcast/keychain"
	"github.com/sealcast/sealcast/protocol"
	"github.com/sealcast/sealcast/updater"
)

// TestServerDecidesVersion: a device's authenticated ack that claims a version above the
// release it installed (a firmware bug, or a compromised device) does not make the server
// believe it: the server records the release's version, and the next release is wrapped
// for the device as for any other ([SC-10.2b]).
func TestServerDecidesVersion(t *testing.T) {
	e := startEnv(t, boltOpener)
	f := e.provision(1)[0]
	d := connectDevice(t, e.b.URL, f)
	e.release(randomImage(2000), 1)
	_, km, _ := d.install()
	k := keychain.Key(d.u, km.Seq)
	lying, err := keychain.Ack{Kind: keychain.AckInstalled, Epoch: km.Epoch, Seq: km.Seq, ID: km.ID, Version: 999_999, DeviceSeq: km.Seq - 1}.Seal(k, f.Serial)
	if err != nil {
		t.Fatal(err)
	}
	if r := d.ackUntilReceipt(lying, k); r.Status != keychain.ReceiptAccepted {
		t.Fatalf("receipt status %d, want accepted (the MAC proves the install)", r.Status)
	}
	if got := e.device(f.Serial); got.Version != 1 || got.Seq != km.Seq-1 {
		t.Fatalf("the server recorded version %d at %d; want the release's version 1 at %d", got.Version, got.Seq, km.Seq-1)
	}
	if n := e.u.Stats().Claims; n != 1 {
		t.Fatalf("%d version claims counted, want 1", n)
	}
	rel2 := e.release(randomImage(2000), 2)
	ack2, km2, _ := d.install()
	if km2.ID != rel2 {
		t.Fatalf("the device was offered %s, want release 2 (%s)", km2.ID, rel2)
	}
	d.ackUntilReceipt(ack2, keychain.Key(d.u, km2.Seq))
	if got := e.device(f.Serial); got.Version != 2 {
		t.Fatalf("version %d after release 2, want 2", got.Version)
	}
}

// TestStaleKeyReportCannotRaiseVersion: a stale_key report that moves the counter down
// ([SC-10.2] 4) raises the recorded version at most to the highest version released to
// the device, however high the report's version ([SC-10.2c]); the next release still
// reaches it.
func TestStaleKeyReportCannotRaiseVersion(t *testing.T) {
	e := startEnv(t, boltOpener)
	f := e.provision(1)[0]
	d := connectDevice(t, e.b.URL, f)
	rel1 := e.release(randomImage(2000), 1)
	raw := d.next(d.keys, "key message")
	km, err := keychain.ParseKeyMessage(raw)
	if err != nil || km.ID != rel1 {
		t.Fatalf("key message %v, %v", km, err)
	}
	k := keychain.Key(d.u, km.Seq)
	report, err := keychain.Ack{Kind: keychain.AckFailed, Epoch: km.Epoch, Seq: km.Seq, ID: km.ID, Version: ^uint64(0), DeviceSeq: km.Seq - 5, Code: uint16(protocol.CodeStaleKey)}.Seal(k, f.Serial)
	if err != nil {
		t.Fatal(err)
	}
	d.publishAck(report)
	d.receipt(report, k)
	eventually(t, "the counter moved down to the report's index", func() bool { return e.device(f.Serial).Seq == km.Seq-5 })
	if got := e.device(f.Serial); got.Version != 1 {
		t.Fatalf("the server recorded version %d; want 1, the highest it released to the device", got.Version)
	}
	if n := e.u.Stats().Claims; n != 1 {
		t.Fatalf("%d version claims counted, want 1", n)
	}
	d.d = km.Seq - 5
	rel2 := e.release(randomImage(2000), 2)
	ack2, km2, _ := d.install()
	if km2.ID != rel2 || km2.Seq != km.Seq-5 {
		t.Fatalf("the device was offered %s at %d, want release 2 at %d", km2.ID, km2.Seq, km.Seq-5)
	}
	d.ackUntilReceipt(ack2, keychain.Key(d.u, km2.Seq))
	eventually(t, "release 2 counted as installed", func() bool {
		st, err := e.op.ReleaseStatus(context.Background(), rel2)
		return err == nil && st.Installed == 1
	})
}

// TestRetireRelease: a release with a mistyped version is refused unless meant; one that
// was meant, and blocks every later release, is retired, and later releases go out with
// lower versions; the device that runs the retired version counts as rollback, so the
// next release completes ([SC-12.2a]).
func TestRetireRelease(t *testing.T) {
	e := startEnv(t, boltOpener)
	ctx := context.Background()
	files := e.provision(2)
	img := randomImage(3000)
	create := func(args protocol.ReleaseCreateArgs) (keychain.ReleaseID, error) {
		args.ChunkSize = 1024
		res, err := e.op.Release(ctx, bytes.NewReader(img), int64(len(img)), args)
		if err != nil {
			return keychain.ReleaseID{}, err
		}
		return res.Release, nil
	}
	top := ^uint64(0)
	if _, err := create(protocol.ReleaseCreateArgs{Version: top, Devices: []string{files[0].Serial}}); protocol.CodeOf(err) != protocol.ErrBadRequest {
		t.Fatalf("a version 2^64-1 without allow_jump: %v, want bad_request", err)
	}
	high, err := create(protocol.ReleaseCreateArgs{Version: top, Devices: []string{files[0].Serial}, AllowJump: true})
	if err != nil {
		t.Fatal(err)
	}
	d0 := connectDevice(t, e.b.URL, files[0])
	ack, km, _ := d0.install()
	d0.ackUntilReceipt(ack, keychain.Key(d0.u, km.Seq))
	eventually(t, "the high release completed", func() bool {
		st, err := e.u.Admin().Release(ctx, high)
		return err == nil && st.State == protocol.ReleaseCompleted
	})
	if _, err := create(protocol.ReleaseCreateArgs{Version: 2, All: true}); protocol.CodeOf(err) != protocol.ErrVersionNotNewer {
		t.Fatalf("a release under the high one: %v, want version_not_newer", err)
	}
	if _, err := e.u.Admin().CancelRelease(ctx, high); protocol.CodeOf(err) != protocol.ErrConflict {
		t.Fatalf("cancelling a completed release: %v, want conflict", err)
	}
	var st protocol.ReleaseStatus
	if err := e.op.Do(ctx, protocol.CmdReleaseRetire, protocol.ReleaseArgs{Release: high}, &st); err != nil || st.State != protocol.ReleaseRetired {
		t.Fatalf("release.retire: %+v, %v", st, err)
	}
	if _, err := e.u.Admin().RetireRelease(ctx, high); protocol.CodeOf(err) != protocol.ErrConflict {
		t.Fatalf("retiring twice: %v, want conflict", err)
	}
	rel2, err := create(protocol.ReleaseCreateArgs{Version: 2, All: true})
	if err != nil {
		t.Fatalf("a release after the high one was retired: %v", err)
	}
	d1 := connectDevice(t, e.b.URL, files[1])
	ack, km, _ = d1.install()
	if km.ID != rel2 {
		t.Fatalf("device 1 was offered %s, want %s", km.ID, rel2)
	}
	d1.ackUntilReceipt(ack, keychain.Key(d1.u, km.Seq))
	eventually(t, "release 2 completed: one install, one device already newer", func() bool {
		st, err := e.u.Admin().Release(ctx, rel2)
		return err == nil && st.State == protocol.ReleaseCompleted && st.Installed == 1 && st.Failed == 1
	})
	if got := e.device(files[0].Serial); got.Version != top {
		t.Fatalf("device 0 is recorded at version %d; it keeps %d", got.Version, top)
	}
}

// memKeys is a KeyStore in memory.
type memKeys struct {
	seqs       []uint32
	statements [][]byte
}

func (m *memKeys) AddKey(seq uint32, _ ed25519.PrivateKey, st []byte) error {
	m.seqs, m.statements = append(m.seqs, seq), append(m.statements, st)
	return nil
}

// TestRotateKey: keys.rotate is refused while a release is active, then makes a new key
// whose statement, signed by the old key, is retained; later manifests name and verify
// under the new key, and devices provisioned now start with it ([SC-5.3]).
func TestRotateKey(t *testing.T) {
	store := &memKeys{}
	e := startEnv(t, boltOpener, func(o *updater.Options) { o.KeyStore = store })
	ctx := context.Background()
	f := e.provision(1)[0]
	rel := e.release(randomImage(500), 1)
	if err := e.op.Do(ctx, protocol.CmdKeysRotate, nil, nil); protocol.CodeOf(err) != protocol.ErrConflict {
		t.Fatalf("rotating with release %s active: %v, want conflict", rel, err)
	}
	if _, err := e.u.Admin().CancelRelease(ctx, rel); err != nil {
		t.Fatal(err)
	}
	var res protocol.KeyRotateResult
	if err := e.op.Do(ctx, protocol.CmdKeysRotate, nil, &res); err != nil || res.Seq != 1 || len(store.seqs) != 1 {
		t.Fatalf("keys.rotate: %+v, %v (store %v)", res, err, store.seqs)
	}
	d := connectDevice(t, e.b.URL, f)
	st, err := keychain.ParseKeyStatement(d.fetch(protocol.KeyStatementTopic(1)), ed25519.PublicKey(f.ReleasePublicKey))
	if err != nil || !st.Key.Equal(ed25519.PublicKey(res.PublicKey)) {
		t.Fatalf("the retained key statement: %+v, %v", st, err)
	}
	rel2 := e.release(randomImage(500), 2)
	mb := d.fetch(protocol.ManifestTopic(rel2))
	if m, err := keychain.ParseManifest(mb, st.Key); err != nil || m.KeySeq != 1 {
		t.Fatalf("a manifest after the rotation: %+v, %v", m, err)
	}
	if _, err := keychain.ParseManifest(mb, ed25519.PublicKey(f.ReleasePublicKey)); err == nil {
		t.Fatal("a manifest after the rotation verifies under the old key")
	}
	files, err := e.op.Provision(ctx, []string{"after-rotation"}, 0)
	if err != nil || files[0].KeySeq != 1 || !bytes.Equal(files[0].ReleasePublicKey, res.PublicKey) {
		t.Fatalf("a device provisioned after the rotation: key %d %x, %v", files[0].KeySeq, files[0].ReleasePublicKey, err)
	}
}

// TestWaves: keys go out wave by wave in the documented order; a wave opens once the
// waves before it have settled; permanent failures past the threshold pause the release
// by itself, with no key of a later wave published; a resume goes on to the end
// ([SC-12.5]). The open wave survives a restart of the updater.
func TestWaves(t *testing.T) {
	e := startEnv(t, boltOpener)
	ctx := context.Background()
	files := e.provision(12)
	byS, serials := bySerial(files)
	img := randomImage(600)
	res, err := e.op.Release(ctx, bytes.NewReader(img), int64(len(img)),
		protocol.ReleaseCreateArgs{Version: 1, All: true, ChunkSize: 1024, Waves: []string{"25%", "50%"}, MaxFailures: "1"})
	if err != nil {
		t.Fatal(err)
	}
	order := protocol.RolloutOrder(res.Release, serials)
	wave1, wave2, wave3 := order[:3], order[3:6], order[6:]
	devs := map[string]*testDevice{}
	for _, s := range order {
		devs[s] = connectDevice(t, e.b.URL, byS[s])
	}
	keyOf := func(serial string) []byte { return e.retained(protocol.KeyTopic(serial)) }
	status := func() protocol.ReleaseStatus {
		st, err := e.u.Admin().Release(ctx, res.Release)
		if err != nil {
			t.Fatal(err)
		}
		return st
	}
	install := func(serials []string) {
		for _, s := range serials {
			d := devs[s]
			ack, km, _ := d.install()
			d.ackUntilReceipt(ack, keychain.Key(d.u, km.Seq))
		}
	}
	fail := func(serial string) { devs[serial].report(devs[serial].nextKey(devs[serial].d), protocol.CodeRollback) }
	eventually(t, "wave 1 wrapped", func() bool { return len(keyOf(wave1[2])) > 0 })
	if st := status(); st.Wave != 1 || len(st.Waves) != 3 {
		t.Fatalf("status wave %d of %d, want 1 of 3", st.Wave, len(st.Waves))
	}
	for _, s := range append(slices.Clone(wave2), wave3...) {
		if len(keyOf(s)) != 0 {
			t.Fatalf("%s, in a later wave, has a key while wave 1 is open", s)
		}
	}
	install(wave1)
	eventually(t, "wave 2 opened", func() bool { return status().Wave == 2 })
	if ws := status().Waves; ws[0].Opened == nil || ws[0].Closed == nil || ws[1].Opened == nil || ws[1].Closed != nil || ws[2].Opened != nil ||
		ws[0].Size != 3 || ws[1].Size != 3 || ws[2].Size != 6 || ws[0].Opened.After(*ws[0].Closed) || ws[0].Closed.After(*ws[1].Opened) {
		t.Fatalf("waves %s; want wave 1 opened and closed, then wave 2 opened, sizes 3, 3, 6", waveDump(ws))
	}
	eventually(t, "wave 1 counted", func() bool { ws := status().Waves; return ws[0].Installed == 3 && ws[0].Failed == 0 })
	// The open wave is kept in the store: a restarted updater goes on with it.
	e.stop()
	e.startUpdater()
	if st := status(); st.Wave != 2 || st.State != protocol.ReleaseActive {
		t.Fatalf("after a restart: wave %d, %s; want wave 2, active", st.Wave, st.State)
	}
	fail(wave2[0])
	fail(wave2[1]) // two permanent failures: past the threshold of 1
	eventually(t, "the release paused by itself", func() bool {
		st := status()
		return st.State == protocol.ReleasePaused && st.PauseReason == protocol.PausedByThreshold
	})
	if ws := status().Waves; ws[1].Failed != 2 || ws[1].Installed != 0 || ws[1].Closed != nil {
		t.Fatalf("waves %s; want 2 failed in wave 2, still open", waveDump(ws))
	}
	if f := status().Failures; len(f) != 1 || f["rollback"] != 2 {
		t.Fatalf("failures by code %v; want rollback: 2", f)
	}
	if s := e.u.Stats(); s.RolloutStops != 1 || s.WavesOpened != 0 { // wave 2 opened in the updater before the restart
		t.Fatalf("stats: %d rollout stops, %d waves opened; want 1 and 0", s.RolloutStops, s.WavesOpened)
	}
	time.Sleep(2 * rolloutIntervalForTests)
	for _, s := range wave3 {
		if len(keyOf(s)) != 0 {
			t.Fatalf("%s, in wave 3, got a key after the release paused", s)
		}
	}
	if _, err := e.u.Admin().ResumeRelease(ctx, res.Release); err != nil {
		t.Fatal(err)
	}
	install(wave2[2:])
	eventually(t, "wave 3 opened", func() bool { return status().Wave == 3 })
	install(wave3)
	eventually(t, "the release completed", func() bool {
		st := status()
		return st.State == protocol.ReleaseCompleted && st.Installed == 10 && st.Failed == 2
	})
	// A completed release keeps how each wave ended.
	ws := status().Waves
	for i, want := range [][2]int{{3, 0}, {1, 2}, {6, 0}} {
		if ws[i].Installed != want[0] || ws[i].Failed != want[1] || ws[i].Opened == nil || ws[i].Closed == nil {
			t.Fatalf("waves of the completed release %s; want installed and failed %v", waveDump(ws), [][2]int{{3, 0}, {1, 2}, {6, 0}})
		}
	}
}

// waveDump prints a release status's waves for a failure message.
func waveDump(ws []protocol.WaveStatus) string {
	b, _ := json.Marshal(ws)
	return string(b)
}

// TestWaveThreshold: a failure threshold applies to each wave as well as to the release
// ([SC-12.5]): one failure in a one-device wave is over 20 % of that wave, though not
// over 20 % of the devices offered so far, and pauses the release; after a resume, the
// waves open then are exempt, and the next wave opens.
func TestWaveThreshold(t *testing.T) {
	e := startEnv(t, boltOpener)
	ctx := context.Background()
	files := e.provision(12)
	byS, serials := bySerial(files)
	img := randomImage(600)
	res, err := e.op.Release(ctx, bytes.NewReader(img), int64(len(img)),
		protocol.ReleaseCreateArgs{Version: 1, All: true, ChunkSize: 1024, Waves: []string{"6", "7"}, MaxFailures: "20%"})
	if err != nil {
		t.Fatal(err)
	}
	order := protocol.RolloutOrder(res.Release, serials)
	status := func() protocol.ReleaseStatus { return e.releaseStatus(res.Release) }
	e.installAll(byS, order[:6])
	eventually(t, "wave 2 opened", func() bool { return status().Wave == 2 })
	d := connectDevice(t, e.b.URL, byS[order[6]])
	d.report(d.nextKey(d.d), protocol.CodeRollback)
	eventually(t, "the release paused by wave 2's threshold", func() bool {
		st := status()
		return st.State == protocol.ReleasePaused && st.PauseReason == protocol.PausedByThreshold
	})
	if _, err := e.u.Admin().ResumeRelease(ctx, res.Release); err != nil {
		t.Fatal(err)
	}
	eventually(t, "wave 3 opened after the resume", func() bool { return status().Wave == 3 })
	if st := status(); st.State != protocol.ReleaseActive {
		t.Fatalf("after the resume: %s, want active", st.State)
	}
}

const rolloutIntervalForTests = time.Second

// TestMaxConcurrent: with max_concurrent 4, at no time do more than 4 targets hold a key
// they have not settled; keys go out as the others install, until every target has
// ([SC-12.5]).
func TestMaxConcurrent(t *testing.T) {
	e := startEnv(t, boltOpener)
	ctx := context.Background()
	const n, cap = 20, 4
	files := e.provision(n)
	devs := make([]*testDevice, n)
	for i, f := range files {
		devs[i] = connectDevice(t, e.b.URL, f)
	}
	img := randomImage(600)
	res, err := e.op.Release(ctx, bytes.NewReader(img), int64(len(img)),
		protocol.ReleaseCreateArgs{Version: 1, All: true, ChunkSize: 1024, MaxConcurrent: cap})
	if err != nil {
		t.Fatal(err)
	}
	holding := map[*testDevice][]byte{} // a key seen, not yet acked
	done := map[*testDevice]bool{}
	deadline := time.Now().Add(60 * time.Second)
	maxHeld := 0
	for len(done) < n {
		if time.Now().After(deadline) {
			t.Fatalf("%d of %d installed in 60 s; %d hold keys", len(done), n, len(holding))
		}
		for _, d := range devs {
			select {
			case raw := <-d.keys:
				if !done[d] {
					holding[d] = raw
				}
			default:
			}
		}
		maxHeld = max(maxHeld, len(holding))
		if len(holding) > cap {
			t.Fatalf("%d targets hold an unsettled key; the bound is %d", len(holding), cap)
		}
		for d, raw := range holding { // install one
			d.keys <- raw
			ack, km, _ := d.install()
			d.ackUntilReceipt(ack, keychain.Key(d.u, km.Seq))
			delete(holding, d)
			done[d] = true
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if maxHeld != cap {
		t.Fatalf("at most %d targets held a key at once; with %d targets and a bound of %d, want %d", maxHeld, n, cap, cap)
	}
	eventually(t, "the release completed", func() bool {
		st, err := e.u.Admin().Release(ctx, res.Release)
		return err == nil && st.State == protocol.ReleaseCompleted && st.Installed == n && st.Offered == n
	})
}

// TestDefaultBound: a release that gives no max_concurrent gets the server's default
// bound, which counts only targets online (by their presence): offline targets get
// their key at once, retained for when they come back, and hold no place; at most the
// bound of online targets hold an unsettled key ([SC-12.5]). max_concurrent -1 sets none.
func TestDefaultBound(t *testing.T) {
	e := startEnv(t, boltOpener, func(o *updater.Options) { o.MaxConcurrent = 2 })
	ctx := context.Background()
	files := e.provision(8)
	byS, serials := bySerial(files)
	img := randomImage(600)
	res, err := e.op.Release(ctx, bytes.NewReader(img), int64(len(img)), protocol.ReleaseCreateArgs{Version: 1, All: true, ChunkSize: 1024})
	if err != nil {
		t.Fatal(err)
	}
	// Three targets online, late in the rollout order so that offline ones come first.
	order := protocol.RolloutOrder(res.Release, serials)
	online := map[string]*testDevice{}
	for _, s := range order[4:7] {
		d := connectDevice(t, e.b.URL, byS[s])
		if tok := d.c.Publish(protocol.PresenceTopic(s), 1, true, protocol.Online); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
			t.Fatalf("presence: %v", tok.Error())
		}
		online[s] = d
	}
	hasKey := func(s string) bool { return len(e.retained(protocol.KeyTopic(s))) > 0 }
	eventually(t, "the first two online targets and the offline ones before them have their key", func() bool {
		for _, s := range order[:6] {
			if !hasKey(s) {
				return false
			}
		}
		return true
	})
	time.Sleep(2 * rolloutIntervalForTests)
	if hasKey(order[6]) || hasKey(order[7]) {
		t.Fatal("a third online target, or one after it, got its key while two online targets hold theirs")
	}
	st, err := e.u.Admin().Release(ctx, res.Release)
	if err != nil || st.MaxConcurrent != 2 || !st.DefaultBound || st.Offered != 6 {
		t.Fatalf("status %+v, %v; want the default bound 2, 6 offered", st, err)
	}
	d := online[order[4]]
	ack, km, _ := d.install()
	d.ackUntilReceipt(ack, keychain.Key(d.u, km.Seq))
	eventually(t, "the third online target got its key once one installed", func() bool { return hasKey(order[6]) })

	res2, err := e.op.Release(ctx, bytes.NewReader(img), int64(len(img)), protocol.ReleaseCreateArgs{Version: 2, All: true, ChunkSize: 1024, MaxConcurrent: protocol.NoBound})
	if err != nil {
		t.Fatal(err)
	}
	if st, err := e.u.Admin().Release(ctx, res2.Release); err != nil || st.MaxConcurrent != 0 || st.DefaultBound {
		t.Fatalf("release with max_concurrent -1: status %+v, %v; want no bound", st, err)
	}
}

// testClock is a clock a test moves by hand.
type testClock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *testClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *testClock) Add(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

// TestSoakAndApprove: once a wave has settled, the next waits for its soak time (on the
// server's clock, moved here by hand) and then for an operator's approval ([SC-12.5]).
func TestSoakAndApprove(t *testing.T) {
	clock := &testClock{t: time.Date(2026, 12, 24, 1, 0, 0, 0, time.UTC)}
	e := startEnv(t, boltOpener, func(o *updater.Options) { o.Now = clock.Now })
	ctx := context.Background()
	files := e.provision(4)
	byS, serials := bySerial(files)
	img := randomImage(500)
	res, err := e.op.Release(ctx, bytes.NewReader(img), int64(len(img)),
		protocol.ReleaseCreateArgs{Version: 1, All: true, ChunkSize: 1024, Waves: []string{"50%"}, Soak: "10m", Approve: true})
	if err != nil {
		t.Fatal(err)
	}
	order := protocol.RolloutOrder(res.Release, serials)
	status := func() protocol.ReleaseStatus { return e.releaseStatus(res.Release) }
	e.installAll(byS, order[:2])
	eventually(t, "wave 1 settled, soaking", func() bool { return status().NextWave == "soak" })
	if st := status(); st.NextWaveAt == nil || !st.NextWaveAt.Equal(clock.Now().Add(10*time.Minute)) {
		t.Fatalf("next wave at %v, want 10 minutes after %v", st.NextWaveAt, clock.Now())
	}
	clock.Add(11 * time.Minute)
	eventually(t, "soaked, waiting for approval", func() bool { return status().NextWave == "approval" })
	time.Sleep(2 * rolloutIntervalForTests)
	if st := status(); st.Wave != 1 {
		t.Fatalf("wave %d opened without approval", st.Wave)
	}
	if len(e.retained(protocol.KeyTopic(order[2]))) != 0 {
		t.Fatalf("%s, in wave 2, has a key before the approval", order[2])
	}
	if err := e.op.Do(ctx, protocol.CmdReleaseApprove, protocol.ReleaseArgs{Release: res.Release}, nil); err != nil {
		t.Fatal(err)
	}
	eventually(t, "wave 2 opened", func() bool { return status().Wave == 2 })
	d := connectDevice(t, e.b.URL, byS[order[2]])
	if _, km, _ := d.install(); km.ID != res.Release {
		t.Fatalf("a wave 2 device was offered %s", km.ID)
	}
}

// TestStartAtAndWindow: no key goes out before start_at or outside the window; at the
// window's end no new key goes out, and the next window goes on ([SC-12.6]). The
// server's clock is moved by hand.
func TestStartAtAndWindow(t *testing.T) {
	clock := &testClock{t: time.Date(2026, 12, 24, 6, 0, 0, 0, time.UTC)} // a Thursday
	e := startEnv(t, boltOpener, func(o *updater.Options) { o.Now = clock.Now })
	ctx := context.Background()
	files := e.provision(3)
	img := randomImage(500)
	start := clock.Now().Add(time.Hour)
	res, err := e.op.Release(ctx, bytes.NewReader(img), int64(len(img)), protocol.ReleaseCreateArgs{
		Version: 1, All: true, ChunkSize: 1024, MaxConcurrent: 1, StartAt: &start, Window: "Thu-Fri 06:30-09:00 UTC"})
	if err != nil {
		t.Fatal(err)
	}
	keys := func() (n int, holder protocol.DeviceFile) {
		for _, f := range files {
			if len(e.retained(protocol.KeyTopic(f.Serial))) > 0 {
				n, holder = n+1, f
			}
		}
		return n, holder
	}
	time.Sleep(2 * rolloutIntervalForTests)
	if n, _ := keys(); n != 0 {
		t.Fatalf("%d keys out before start_at, inside the window", n)
	}
	clock.Add(65 * time.Minute) // 07:05: started, in the window
	eventually(t, "the first key out", func() bool { n, _ := keys(); return n == 1 })
	_, f := keys()
	d := connectDevice(t, e.b.URL, f)
	ack, km, _ := d.install()
	clock.Add(2 * time.Hour) // 09:05: the window closed
	time.Sleep(2 * rolloutIntervalForTests)
	d.ackUntilReceipt(ack, keychain.Key(d.u, km.Seq))
	time.Sleep(2 * rolloutIntervalForTests)
	if n, _ := keys(); n != 0 { // the first device's key topic is cleared after its ack
		t.Fatalf("%d keys out after the window closed", n)
	}
	clock.Add(22 * time.Hour) // Friday 07:05
	eventually(t, "the next key out in the next window", func() bool { n, _ := keys(); return n == 1 })
	if st, err := e.u.Admin().Release(ctx, res.Release); err != nil || st.Installed != 1 || st.Offered != 2 {
		t.Fatalf("status %+v, %v; want 1 installed, 2 offered", st, err)
	}
}

// TestDeviceTimeout: a target that got its key and has not settled within the device
// timeout counts as timed out, toward the wave and the threshold, and its late install is
// still accepted ([SC-12.5]).
func TestDeviceTimeout(t *testing.T) {
	clock := &testClock{t: time.Date(2026, 12, 24, 1, 0, 0, 0, time.UTC)}
	e := startEnv(t, boltOpener, func(o *updater.Options) { o.Now = clock.Now })
	ctx := context.Background()
	files := e.provision(4)
	byS, serials := bySerial(files)
	img := randomImage(500)
	res, err := e.op.Release(ctx, bytes.NewReader(img), int64(len(img)), protocol.ReleaseCreateArgs{
		Version: 1, All: true, ChunkSize: 1024, Waves: []string{"50%"}, MaxFailures: "1", DeviceTimeout: "10m"})
	if err != nil {
		t.Fatal(err)
	}
	order := protocol.RolloutOrder(res.Release, serials)
	status := func() protocol.ReleaseStatus {
		st, err := e.u.Admin().Release(ctx, res.Release)
		if err != nil {
			t.Fatal(err)
		}
		return st
	}
	a := connectDevice(t, e.b.URL, byS[order[0]])
	ack, km, _ := a.install()
	a.ackUntilReceipt(ack, keychain.Key(a.u, km.Seq))
	late := connectDevice(t, e.b.URL, byS[order[1]])
	lateAck, lateKM, _ := late.install() // installs, but does not ack yet
	time.Sleep(2 * rolloutIntervalForTests)
	if st := status(); st.Wave != 1 || st.TimedOut != 0 {
		t.Fatalf("before the timeout: wave %d, %d timed out", st.Wave, st.TimedOut)
	}
	clock.Add(11 * time.Minute)
	eventually(t, "the silent device timed out and wave 2 opened", func() bool {
		st := status()
		return st.TimedOut == 1 && st.Wave == 2 && st.State == protocol.ReleaseActive
	})
	late.ackUntilReceipt(lateAck, keychain.Key(late.u, lateKM.Seq))
	eventually(t, "the late install accepted", func() bool { st := status(); return st.Installed == 2 && st.TimedOut == 0 })
}

// TestCanary: canaries form a first wave of their own, in the order given; the other
// targets follow in rollout order ([SC-12.5]).
func TestCanary(t *testing.T) {
	e := startEnv(t, boltOpener)
	ctx := context.Background()
	files := e.provision(6)
	canary := []string{files[4].Serial, files[1].Serial}
	img := randomImage(500)
	res, err := e.op.Release(ctx, bytes.NewReader(img), int64(len(img)),
		protocol.ReleaseCreateArgs{Version: 1, All: true, ChunkSize: 1024, Canary: canary, Waves: []string{"50%"}})
	if err != nil {
		t.Fatal(err)
	}
	eventually(t, "the canaries wrapped", func() bool { return len(e.retained(protocol.KeyTopic(canary[1]))) > 0 })
	st, err := e.u.Admin().Release(ctx, res.Release)
	if err != nil || st.Wave != 1 || len(st.Waves) != 3 || st.Offered != 2 {
		t.Fatalf("status %+v, %v; want wave 1 of 3 (canaries, 50 %%, all), 2 offered", st, err)
	}
	for _, f := range files {
		if f.Serial != canary[0] && f.Serial != canary[1] && len(e.retained(protocol.KeyTopic(f.Serial))) > 0 {
			t.Fatalf("%s, not a canary, has a key in the canary wave", f.Serial)
		}
	}
	for _, s := range canary {
		d := connectDevice(t, e.b.URL, files[slices.IndexFunc(files, func(f protocol.DeviceFile) bool { return f.Serial == s })])
		ack, km, _ := d.install()
		d.ackUntilReceipt(ack, keychain.Key(d.u, km.Seq))
	}
	eventually(t, "wave 2 opened after the canaries", func() bool {
		st, err := e.u.Admin().Release(ctx, res.Release)
		return err == nil && st.Wave == 2 && st.Offered == 3
	})
}

// bySerial indexes device files by serial and lists their serials in order.
func bySerial(files []protocol.DeviceFile) (map[string]protocol.DeviceFile, []string) {
	byS := make(map[string]protocol.DeviceFile, len(files))
	serials := make([]string, len(files))
	for i, f := range files {
		byS[f.Serial], serials[i] = f, f.Serial
	}
	return byS, serials
}

// TestInstallTimes: the release status's time-to-installed curve counts each device's
// install, on the server's clock, in the bucket of the time since the release's start,
// cumulatively (13.2).
func TestInstallTimes(t *testing.T) {
	clock := &testClock{t: time.Date(2026, 12, 24, 1, 0, 0, 0, time.UTC)}
	e := startEnv(t, boltOpener, func(o *updater.Options) { o.Now = clock.Now })
	files := e.provision(3)
	byS, serials := bySerial(files)
	img := randomImage(500)
	res, err := e.op.Release(context.Background(), bytes.NewReader(img), int64(len(img)),
		protocol.ReleaseCreateArgs{Version: 1, All: true, ChunkSize: 1024})
	if err != nil {
		t.Fatal(err)
	}
	e.installAll(byS, serials[:1]) // within 5 s
	clock.Add(7 * time.Second)
	e.installAll(byS, serials[1:2]) // within 10 s
	clock.Add(2 * time.Hour)
	e.installAll(byS, serials[2:]) // within 4 h
	var st protocol.ReleaseStatus
	eventually(t, "three installs counted", func() bool { st = e.releaseStatus(res.Release); return st.Installed == 3 })
	var want []protocol.InstallTime
	for _, p := range [][2]int{{5, 1}, {10, 2}, {20, 2}, {30, 2}, {60, 2}, {120, 2}, {300, 2}, {600, 2},
		{1200, 2}, {1800, 2}, {3600, 2}, {7200, 2}, {14400, 3}} {
		want = append(want, protocol.InstallTime{Within: int64(p[0]), Installed: p[1]})
	}
	if !slices.Equal(st.InstallTimes, want) {
		t.Fatalf("install_times = %v, want %v", st.InstallTimes, want)
	}
}

// TestFleetVersions: the fleet status counts devices by installed version (13.1); a
// completed release is counted at once, and devices provisioned since the last count are
// added at version 0 without waiting for the next count.
func TestFleetVersions(t *testing.T) {
	e := startEnv(t, boltOpener)
	files := e.provision(3)
	byS, _ := bySerial(files)
	fleet := func() map[string]int {
		var fs protocol.FleetStatus
		if err := e.op.Do(context.Background(), protocol.CmdFleetGet, struct{}{}, &fs); err != nil {
			t.Fatal(err)
		}
		return fs.Versions
	}
	if got := fleet(); !maps.Equal(got, map[string]int{"0": 3}) {
		t.Fatalf("versions %v, want 3 at 0", got)
	}
	rid := e.release(randomImage(500), 1, files[0].Serial)
	e.installAll(byS, []string{files[0].Serial})
	eventually(t, "the release completed and counted", func() bool {
		st := e.releaseStatus(rid)
		return st.State == protocol.ReleaseCompleted && maps.Equal(fleet(), map[string]int{"0": 2, "1": 1})
	})
	if _, err := e.op.Provision(context.Background(), []string{"late-1", "late-2"}, 0); err != nil {
		t.Fatal(err)
	}
	if got := fleet(); !maps.Equal(got, map[string]int{"0": 4, "1": 1}) {
		t.Fatalf("after provisioning two more: versions %v, want 4 at 0 and 1 at 1", got)
	}
}
