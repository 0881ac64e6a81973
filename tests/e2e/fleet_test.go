package e2e_test

import (
	"context"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/sealcast/sealcast/device"
	"github.com/sealcast/sealcast/device/simulate"
	"github.com/sealcast/sealcast/internal/testkit/updatertest"
	"github.com/sealcast/sealcast/keychain"
	"github.com/sealcast/sealcast/protocol"
	"github.com/sealcast/sealcast/updater"
)

// TestFleetTwoReleases: 200 simulated devices (2,000 with SEALCAST_HEAVY=1) take two
// releases created through the admin protocol; 5 % of them lose their connection in the
// middle of a download and 5 % lose power between install and persist. After the first
// release every server counter is L-1, after the second L-2. Each device's second key
// message is at n-1 and wraps the content key under K_{n-1}, which is not K_n: every
// update uses a fresh one-time key (claims 3-5).
func TestFleetTwoReleases(t *testing.T) {
	for _, s := range updatertest.Stores {
		t.Run(s.Name, func(t *testing.T) { testFleet(t, s.Open, fleetSize()) })
	}
}

func heavy() bool { return os.Getenv("SEALCAST_HEAVY") == "1" }

func fleetSize() int {
	if heavy() {
		return 2000
	}
	return 200
}

func testFleet(t *testing.T, open updatertest.Opener, n int) {
	const L = 1024
	e := updatertest.Start(t, open)
	serials := numbered("fleet-%04d", n)
	keys := watchEach(t, e.Broker, e.Broker.Admin, serials, protocol.KeyTopic)
	fleet := watchEach(t, e.Broker, e.Broker.Monitor, serials, protocol.PresenceTopic)
	fleet.add(t, e.Broker, e.Broker.Monitor, protocol.FleetStatusTopic)
	ctx := context.Background()
	files, err := e.Op.Provision(ctx, serials, L)
	if err != nil {
		t.Fatal(err)
	}

	// The fleet runs until every device confirmed version 2.
	var (
		mu        sync.Mutex
		confirmed = map[uint64]map[string]bool{} // version -> serials
	)
	simCtx, stopSim := context.WithTimeout(ctx, 3*deadline)
	simDone := make(chan simulate.Summary, 1)
	simExited := make(chan struct{})
	defer func() { stopSim(); <-simExited }() // the agents log to t: stop them before it ends
	go func() {
		defer close(simExited)
		sum, err := simulate.Run(simCtx, simulate.Options{
			Devices: files, TargetVersion: 2, Seed: 11,
			ChunkTimeout: 5 * time.Second, AckResend: time.Second, AckResendMax: 5 * time.Second,
			ReconnectMin: 50 * time.Millisecond, ReconnectMax: time.Second,
			StartSpread: 300 * time.Millisecond, DropFraction: 0.05, KillFraction: 0.05, DropAfter: 3,
			Logger: zerolog.New(zerolog.NewTestWriter(t)).Level(zerolog.WarnLevel),
			OnEvent: func(ev device.Event) {
				if ev.Kind == device.EventConfirmed {
					mu.Lock()
					if confirmed[ev.Version] == nil {
						confirmed[ev.Version] = map[string]bool{}
					}
					confirmed[ev.Version][ev.Serial] = true
					mu.Unlock()
				}
			},
		})
		if err != nil {
			t.Errorf("simulate: %v", err)
		}
		simDone <- sum
	}()
	confirmedCount := func(v uint64) int {
		mu.Lock()
		defer mu.Unlock()
		return len(confirmed[v])
	}
	counters := func(wantSeq uint32, wantVersion uint64) {
		t.Helper()
		devs, err := e.Store.Devices(ctx, serials)
		if err != nil {
			t.Fatal(err)
		}
		for _, d := range devs {
			if d.Epoch != 0 || d.Seq != wantSeq || d.Version != wantVersion {
				t.Fatalf("%s: server counter (%d, %d) version %d; want (0, %d) version %d", d.Serial, d.Epoch, d.Seq, d.Version, wantSeq, wantVersion)
			}
		}
	}

	t0 := time.Now()
	rid1 := e.Release(t, image(6*1024+100, 1), 1)
	waitInstalled(t, e, rid1, n)
	eventually(t, "every device confirmed version 1", func() bool { return confirmedCount(1) == n })
	t.Logf("release 1 to %d devices: %v", n, time.Since(t0).Round(time.Millisecond))
	counters(L-1, 1)
	// The updater counts the agents' presence: all online.
	presence := func(what, want string, ok func(protocol.FleetStatus) bool) {
		t.Helper()
		wait := deadline
		if heavy() {
			wait = time.Minute
		}
		if _, done := fleet.waitFleet(wait, ok); done {
			return
		}
		t.Logf("last fleet status: %s", fleet.last(protocol.FleetStatusTopic))
		shown := 0
		for _, s := range serials {
			if h := fleet.all(protocol.PresenceTopic(s)); (len(h) == 0 || string(h[len(h)-1]) != want) && shown < 20 {
				t.Logf("%s presence history: %q", s, h)
				shown++
			}
		}
		if drops := e.Broker.Broker.Stats().DroppedQueueFull; heavy() && drops > 0 {
			// The updater's one connection receives every device's presence and ack; a
			// burst over its 256-slot outbound queue is dropped (docs/BROKER.md).
			t.Logf("fleet status never showed %s: the broker dropped %d deliveries to full client queues", what, drops)
			return
		}
		t.Fatalf("timed out waiting for the fleet status to show %s", what)
	}
	presence("every device online", protocol.Online, func(fs protocol.FleetStatus) bool {
		return fs.Devices == n && fs.Online == n && fs.Releases[protocol.ReleaseCompleted] == 1
	})

	t1 := time.Now()
	rid2 := e.Release(t, image(5*1024, 2), 2)
	var sum simulate.Summary
	select {
	case sum = <-simDone:
	case <-time.After(3 * deadline):
		t.Fatal("the fleet did not finish")
	}
	t.Logf("release 2 to %d devices: %v; fleet: %v", n, time.Since(t1).Round(time.Millisecond), sum)
	if sum.Confirmed != n || sum.Failed != 0 {
		t.Fatalf("%d of %d devices confirmed version 2, %d failed %v", sum.Confirmed, n, sum.Failed, sum.Codes)
	}
	waitInstalled(t, e, rid2, n)
	counters(L-2, 2)
	// The agents stopped and said so on their presence topics.
	presence("every device offline", protocol.Offline, func(fs protocol.FleetStatus) bool {
		return fs.Online == 0 && fs.Releases[protocol.ReleaseCompleted] == 2
	})

	// Every device saw exactly two key messages: release 1 at L under K_L, release 2 at L-1
	// under K_{L-1}.
	for _, f := range files {
		var u keychain.UnitData
		copy(u[:], f.UnitData)
		kms := distinctKeys(t, keys.all(protocol.KeyTopic(f.Serial)))
		if len(kms) != 2 {
			t.Fatalf("%s: %d distinct key messages, want 2", f.Serial, len(kms))
		}
		first, second := kms[0], kms[1]
		if first.Seq != L || first.ID != rid1 || second.Seq != L-1 || second.ID != rid2 {
			t.Fatalf("%s: key messages at %d (%s) and %d (%s); want %d (%s) and %d (%s)",
				f.Serial, first.Seq, first.ID, second.Seq, second.ID, L, rid1, L-1, rid2)
		}
		kn, kn1 := keychain.Key(u, L), keychain.Key(u, L-1)
		if kn == kn1 {
			t.Fatalf("%s: K_n equals K_n-1", f.Serial)
		}
		if _, err := first.Open(kn, f.Serial); err != nil {
			t.Fatalf("%s: first key message does not open under K_n: %v", f.Serial, err)
		}
		if _, err := second.Open(kn1, f.Serial); err != nil {
			t.Fatalf("%s: second key message does not open under K_n-1: %v", f.Serial, err)
		}
		if _, err := second.Open(kn, f.Serial); err == nil {
			t.Fatalf("%s: second key message opens under the used key K_n", f.Serial)
		}
	}
	st := e.Updater.Stats()
	t.Logf("updater: %+v", st)
	t.Logf("broker: %+v", e.Broker.Broker.Stats())
	if st.AcksAccepted != int64(2*n) || len(st.AcksRejected) != 0 {
		t.Errorf("updater accepted %d acks, want %d; rejected %v", st.AcksAccepted, 2*n, st.AcksRejected)
	}
}

// distinctKeys parses the non-empty key messages in arrival order, keeping the first of
// each (epoch, seq, id): a retained message can be delivered again, and the updater
// re-publishes the same wrap when it resumes a release.
func distinctKeys(t *testing.T, raw [][]byte) []*keychain.KeyMessage {
	t.Helper()
	type pos struct {
		e, n uint32
		id   keychain.ReleaseID
	}
	seen := map[pos]bool{}
	var out []*keychain.KeyMessage
	for _, b := range raw {
		if len(b) == 0 {
			continue // cleared after an ack
		}
		km, err := keychain.ParseKeyMessage(b)
		if err != nil {
			t.Fatalf("key message: %v", err)
		}
		p := pos{km.Epoch, km.Seq, km.ID}
		if !seen[p] {
			seen[p] = true
			out = append(out, km)
		}
	}
	return out
}

// TestRekeyThenUpdate: devices provisioned with a chain of 16 take 15 releases (indices 16
// down to 2); at index 1 the updater re-keys them into a fresh chain of 16, their own
// length, although new devices get 32 ([SC-10.3]), and the 16th release goes through in
// the new epoch.
func TestRekeyThenUpdate(t *testing.T) {
	for _, s := range updatertest.Stores {
		t.Run(s.Name, func(t *testing.T) { testRekey(t, s.Open) })
	}
}

func testRekey(t *testing.T, open updatertest.Opener) {
	const L, L2 = 16, 16 // L2: the re-key keeps the device's length, not the updater's 32
	e := updatertest.Start(t, open, func(o *updater.Options) { o.ChainLength = 32 })
	keys := watch(t, e.Broker, e.Broker.Admin, protocol.KeyFilter)
	devs := provision(t, e, L, "rk-1", "rk-2", "rk-3")
	for _, d := range devs {
		d.start(nil)
	}
	release := func(v uint64) {
		t.Helper()
		img := image(1500, v)
		rid := e.Release(t, img, v)
		for _, d := range devs {
			d.waitConfirmed(v)
			d.checkSlot(img)
		}
		waitInstalled(t, e, rid, len(devs))
	}
	t0 := time.Now()
	for v := uint64(1); v <= L-1; v++ {
		release(v)
	}
	t.Logf("%d releases: %v", L-1, time.Since(t0).Round(time.Millisecond))
	// The updater re-keys every device at index 1 without being asked.
	for _, d := range devs {
		s := d.waitVault("re-keyed and confirmed", func(s device.State) bool { return s.Epoch == 1 && s.LastAckConfirmed })
		want, err := keychain.DeriveUnitData(e.Broker.Root, d.serial, 1)
		if err != nil {
			t.Fatal(err)
		}
		if s.Seq != L2 || s.ChainLength != L2 || s.UnitData != want || s.Version != L-1 {
			t.Fatalf("%s: after the re-key (%d, %d) length %d version %d, right unit data %v", d.serial, s.Epoch, s.Seq, s.ChainLength, s.Version, s.UnitData == want)
		}
		if got := e.Device(t, d.serial); got.Epoch != 1 || got.Seq != L2 || got.ChainLength != L2 {
			t.Fatalf("%s: server at (%d, %d) length %d after the re-key", d.serial, got.Epoch, got.Seq, got.ChainLength)
		}
	}
	release(L)
	for _, d := range devs {
		if s := d.state(); s.Epoch != 1 || s.Seq != L2-1 {
			t.Fatalf("%s: device at (%d, %d) after release %d, want (1, %d)", d.serial, s.Epoch, s.Seq, L, L2-1)
		}
		if got := e.Device(t, d.serial); got.Epoch != 1 || got.Seq != L2-1 || got.Version != L {
			t.Fatalf("%s: server at (%d, %d) version %d, want (1, %d) version %d", d.serial, got.Epoch, got.Seq, got.Version, L2-1, L)
		}
		// The key topic carried L-1 releases at 16..2, one re-key at 1, then a release at
		// the top of the new chain.
		kms := distinctKeys(t, keys.all(protocol.KeyTopic(d.serial)))
		if len(kms) != L+1 {
			t.Fatalf("%s: %d distinct key messages, want %d", d.serial, len(kms), L+1)
		}
		for i, km := range kms[:L-1] {
			if km.Kind != keychain.KindRelease || km.Epoch != 0 || km.Seq != uint32(L-i) {
				t.Fatalf("%s: key message %d is a %s at (%d, %d)", d.serial, i, km.Kind, km.Epoch, km.Seq)
			}
		}
		if rk := kms[L-1]; rk.Kind != keychain.KindRekey || rk.Epoch != 0 || rk.Seq != 1 || rk.NewLength != L2 {
			t.Fatalf("%s: expected the re-key at (0, 1), got a %s at (%d, %d)", d.serial, rk.Kind, rk.Epoch, rk.Seq)
		}
		if last := kms[L]; last.Kind != keychain.KindRelease || last.Epoch != 1 || last.Seq != L2 {
			t.Fatalf("%s: expected release %d at (1, %d), got a %s at (%d, %d)", d.serial, L, L2, last.Kind, last.Epoch, last.Seq)
		}
	}
	if st := e.Updater.Stats(); st.Rekeys != int64(len(devs)) || st.AcksAccepted != int64(len(devs)*(L+1)) || len(st.AcksRejected) != 0 {
		t.Errorf("updater stats %+v; want %d re-keys and %d accepted acks", st, len(devs), len(devs)*(L+1))
	}
}
