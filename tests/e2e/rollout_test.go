package e2e_test

import (
	"bytes"
	"context"
	"sync"
	"testing"
	"time"

	mqtt "github.com/eclipse/paho.mqtt.golang"
	"github.com/rs/zerolog"

	"github.com/sealcast/sealcast/device"
	"github.com/sealcast/sealcast/device/simulate"
	"github.com/sealcast/sealcast/internal/testkit/updatertest"
	"github.com/sealcast/sealcast/protocol"
)

// TestRolloutStopsByItself: 200 simulated devices, four waves, and eight devices of the
// second wave whose installer fails. Their failures are transient (they retry), so they
// count once the device timeout passes; with a threshold of 5 the release pauses by
// itself, and no key of the third wave is ever published while it is paused. A resume
// accepts those failures and the rest of the fleet installs, every counter moved once
// ([SC-12.5]).
func TestRolloutStopsByItself(t *testing.T) {
	if testing.Short() {
		t.Skip("a fleet of 200; skipped under -short")
	}
	const n, L = 200, 1024
	e := updatertest.Start(t, updatertest.Bolt)
	ctx := context.Background()
	serials := numbered("wave-%03d", n)
	files, err := e.Op.Provision(ctx, serials, L)
	if err != nil {
		t.Fatal(err)
	}
	img := image(3*1024, 7)
	res, err := e.Op.Release(ctx, bytes.NewReader(img), int64(len(img)), protocol.ReleaseCreateArgs{
		Version: 1, All: true, ChunkSize: 1024, Waves: []string{"10%", "30%", "60%"}, MaxFailures: "5", DeviceTimeout: "3s"})
	if err != nil {
		t.Fatal(err)
	}
	order := protocol.RolloutOrder(res.Release, serials)
	failing := map[string]bool{}
	for _, s := range order[20:28] { // in wave 2 (devices 20 to 59)
		failing[s] = true
	}
	var mu sync.Mutex
	confirmed := map[string]bool{}
	simCtx, stopSim := context.WithCancel(ctx)
	fleet, err := simulate.Start(simCtx, simulate.Options{
		Devices: files, FailInstall: failing, ChunkTimeout: 5 * time.Second,
		AckResend: time.Second, AckResendMax: 3 * time.Second, ReconnectMin: 50 * time.Millisecond, ReconnectMax: time.Second,
		Logger: zerolog.New(zerolog.NewTestWriter(t)).Level(zerolog.ErrorLevel),
		OnEvent: func(ev device.Event) {
			if ev.Kind == device.EventConfirmed {
				mu.Lock()
				confirmed[ev.Serial] = true
				mu.Unlock()
			}
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	defer func() { stopSim(); fleet.Wait() }()
	status := func() protocol.ReleaseStatus {
		st, err := e.Op.ReleaseStatus(ctx, res.Release)
		if err != nil {
			t.Fatal(err)
		}
		return *st
	}
	eventually(t, "the release paused by its failure threshold", func() bool {
		st := status()
		return st.State == protocol.ReleasePaused && st.PauseReason == protocol.PausedByThreshold
	})
	if st := status(); st.Wave != 2 || st.TimedOut < 6 {
		t.Fatalf("paused in wave %d with %d timed out; want wave 2 and more than 5", st.Wave, st.TimedOut)
	}
	// No device of waves 3 and 4 holds a key: the retained key topics say so.
	held := retainedKeys(t, e)
	for _, s := range order[60:] {
		if held[s] {
			t.Fatalf("%s, of wave 3 or 4, got a key while the release is paused", s)
		}
	}
	if _, err := e.Updater.Admin().ResumeRelease(ctx, res.Release); err != nil {
		t.Fatal(err)
	}
	eventually(t, "every device but the failing ones installed", func() bool {
		mu.Lock()
		defer mu.Unlock()
		return len(confirmed) == n-len(failing)
	})
	devs, err := e.Store.Devices(ctx, serials)
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range devs {
		want := uint32(L - 1)
		if failing[d.Serial] {
			want = L
		}
		if d.Seq != want {
			t.Fatalf("%s: counter at %d, want %d (moved once per install)", d.Serial, d.Seq, want)
		}
	}
	if st := status(); st.Installed != n-len(failing) || st.Wave != 4 {
		t.Fatalf("status %+v; want %d installed, wave 4", st, n-len(failing))
	}
}

// retainedKeys returns which devices have a retained key message now.
func retainedKeys(t *testing.T, e *updatertest.Env) map[string]bool {
	t.Helper()
	b := e.Broker
	o := mqtt.NewClientOptions().AddBroker(b.URL).SetUsername(b.Admin.Username).SetPassword(b.Admin.Password).SetClientID("keys-reader")
	c := mqtt.NewClient(o)
	if tok := c.Connect(); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		t.Fatalf("connecting: %v", tok.Error())
	}
	defer c.Disconnect(0)
	var mu sync.Mutex
	held := map[string]bool{}
	tok := c.Subscribe(protocol.KeyFilter, 1, func(_ mqtt.Client, m mqtt.Message) {
		if serial, _, ok := protocol.DeviceOf(m.Topic()); ok && len(m.Payload()) > 0 && m.Retained() {
			mu.Lock()
			held[serial] = true
			mu.Unlock()
		}
	})
	tok.Wait()
	time.Sleep(time.Second) // the retained messages arrive at once on subscribe
	mu.Lock()
	defer mu.Unlock()
	return held
}

// TestConcurrencyBoundAtScale: 2,000 simulated devices and max_concurrent 200. Whenever a
// device receives its key, at most 200 devices hold a key they have not installed and
// persisted (a device persists before it acks, and the server offers a new key only
// once an ack is in), and every device installs ([SC-12.5]).
func TestConcurrencyBoundAtScale(t *testing.T) {
	if testing.Short() {
		t.Skip("a fleet of 2,000; skipped under -short")
	}
	const n, bound = 2000, 200
	e := updatertest.Start(t, updatertest.Bolt)
	ctx := context.Background()
	serials := numbered("cap-%04d", n)
	files, err := e.Op.Provision(ctx, serials, 1024)
	if err != nil {
		t.Fatal(err)
	}
	img := image(2*1024, 9)
	res, err := e.Op.Release(ctx, bytes.NewReader(img), int64(len(img)), protocol.ReleaseCreateArgs{
		Version: 1, All: true, ChunkSize: 1024, MaxConcurrent: bound})
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	holding, done := map[string]bool{}, map[string]bool{}
	maxHeld, over := 0, 0
	simCtx, stopSim := context.WithCancel(ctx)
	fleet, err := simulate.Start(simCtx, simulate.Options{
		Devices: files, ChunkTimeout: 10 * time.Second, AckResend: time.Second, AckResendMax: 3 * time.Second,
		ReconnectMin: 50 * time.Millisecond, ReconnectMax: time.Second, StartSpread: time.Second,
		Logger: zerolog.New(zerolog.NewTestWriter(t)).Level(zerolog.ErrorLevel),
		OnEvent: func(ev device.Event) {
			if ev.Release != res.Release {
				return
			}
			mu.Lock()
			defer mu.Unlock()
			switch ev.Kind {
			case device.EventKeyMessage:
				if !done[ev.Serial] {
					holding[ev.Serial] = true
					maxHeld = max(maxHeld, len(holding))
					if len(holding) > bound {
						over++
					}
				}
			case device.EventPersisted:
				done[ev.Serial] = true
				delete(holding, ev.Serial)
			}
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	defer func() { stopSim(); fleet.Wait() }()
	// 2,000 agents under -race beside the other suites: minutes on two loaded cores.
	end := time.Now().Add(4 * deadline)
	for {
		mu.Lock()
		installed := len(done)
		mu.Unlock()
		if installed == n {
			break
		}
		if time.Now().After(end) {
			t.Fatalf("%d of %d devices installed in %s", installed, n, 4*deadline)
		}
		time.Sleep(50 * time.Millisecond)
	}
	mu.Lock()
	defer mu.Unlock()
	t.Logf("at most %d devices held a key they had not installed", maxHeld)
	if over > 0 {
		t.Fatalf("%d times more than %d devices held a key they had not installed (at most %d)", over, bound, maxHeld)
	}
	if maxHeld < bound/2 {
		t.Fatalf("at most %d devices held a key at once; the bound of %d was never approached", maxHeld, bound)
	}
}
