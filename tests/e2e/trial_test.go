package e2e_test

import (
	"bytes"
	"context"
	"sync"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/sealcast/sealcast/device"
	"github.com/sealcast/sealcast/device/simulate"
	"github.com/sealcast/sealcast/internal/testkit/updatertest"
	"github.com/sealcast/sealcast/protocol"
	"github.com/sealcast/sealcast/updater"
)

// TestUnhealthyDevices: 100 simulated devices run every new image on trial, and on 5 of
// them it fails its health check, while a tenth of the fleet loses power once on trial.
// The 5 go back to their image and report unhealthy, their counters stay; the other 95
// confirm, their counters moved once; the release completes with 95 installed and 5
// failed. A second release with a threshold of 3 % and an unhealthy canary pauses by
// itself on its report, before any other wave opens ([SC-10.5], [SC-12.5]).
func TestUnhealthyDevices(t *testing.T) {
	if testing.Short() {
		t.Skip("a fleet of 100; skipped under -short")
	}
	const n, L = 100, 1024
	e := updatertest.Start(t, updatertest.Bolt)
	ctx := context.Background()
	serials := numbered("trial-%03d", n)
	unhealthy := map[string]bool{}
	for i := 7; i < n; i += 20 {
		unhealthy[serials[i]] = true
	}
	files, err := e.Op.Provision(ctx, serials, L)
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	confirmed, reported := map[string]uint64{}, map[string]uint64{}
	simCtx, stopSim := context.WithCancel(ctx)
	fleet, err := simulate.Start(simCtx, simulate.Options{
		Devices: files, Unhealthy: unhealthy, CrashInTrialFraction: 0.1, Continuous: true,
		ChunkTimeout: 5 * time.Second, AckResend: time.Second, AckResendMax: 3 * time.Second,
		ReconnectMin: 50 * time.Millisecond, ReconnectMax: time.Second, RestartDelay: 50 * time.Millisecond,
		Logger: zerolog.New(zerolog.NewTestWriter(t)).Level(zerolog.ErrorLevel),
		OnEvent: func(ev device.Event) {
			mu.Lock()
			defer mu.Unlock()
			switch {
			case ev.Kind == device.EventConfirmed:
				confirmed[ev.Serial] = ev.Version
			case ev.Kind == device.EventReportSent && ev.Code == protocol.CodeUnhealthy:
				reported[ev.Serial]++
			}
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	defer func() { stopSim(); fleet.Wait() }()

	img := image(3*1024, 11)
	res, err := e.Op.Release(ctx, bytes.NewReader(img), int64(len(img)), protocol.ReleaseCreateArgs{Version: 1, All: true, ChunkSize: 1024})
	if err != nil {
		t.Fatal(err)
	}
	var st *protocol.ReleaseStatus
	eventually(t, "release 1 completed", func() bool {
		st, err = e.Op.ReleaseStatus(ctx, res.Release)
		return err == nil && st.State == protocol.ReleaseCompleted
	})
	if st.Installed != n-len(unhealthy) || st.Failed != len(unhealthy) {
		t.Fatalf("release 1: %d installed, %d failed; want %d and %d", st.Installed, st.Failed, n-len(unhealthy), len(unhealthy))
	}
	// A device's last result is noted after its report's receipt, so a moment after the
	// release's counts.
	var devs []*updater.Device
	eventually(t, "the unhealthy devices' results noted", func() bool {
		devs, err = e.Store.Devices(ctx, serials)
		if err != nil {
			t.Fatal(err)
		}
		for _, d := range devs {
			if unhealthy[d.Serial] && d.LastResult == "" {
				return false
			}
		}
		return true
	})
	mu.Lock()
	for _, d := range devs {
		switch {
		case unhealthy[d.Serial] && (d.Seq != L || d.Version != 0 || d.LastResult != "unhealthy" || reported[d.Serial] == 0):
			t.Errorf("%s, unhealthy: counter %d, version %d, result %q, %d reports; want %d, 0, unhealthy, reported", d.Serial, d.Seq, d.Version, d.LastResult, reported[d.Serial], L)
		case !unhealthy[d.Serial] && (d.Seq != L-1 || d.Version != 1 || confirmed[d.Serial] != 1):
			t.Errorf("%s: counter %d, version %d, confirmed %d; want %d, 1, 1", d.Serial, d.Seq, d.Version, confirmed[d.Serial], L-1)
		}
	}
	mu.Unlock()

	// An unhealthy device among three canaries: its failure is over 3 % of the canary
	// wave, so the release pauses before any other wave opens (and cannot complete
	// first, which it could if every target got its key at once).
	res2, err := e.Op.Release(ctx, bytes.NewReader(img), int64(len(img)), protocol.ReleaseCreateArgs{
		Version: 2, All: true, ChunkSize: 1024, Canary: []string{serials[7], serials[0], serials[1]}, Waves: []string{"20%"}, MaxFailures: "3%"})
	if err != nil {
		t.Fatal(err)
	}
	eventually(t, "release 2 paused by its failure threshold", func() bool {
		st, err = e.Op.ReleaseStatus(ctx, res2.Release)
		return err == nil && st.State == protocol.ReleasePaused && st.PauseReason == protocol.PausedByThreshold
	})
	if w := st.Waves[0]; st.Wave != 1 || w.Opened == nil || w.Failed != 1 || st.Waves[1].Opened != nil {
		t.Fatalf("release 2 paused in wave %d with waves %+v; want the canary wave, its unhealthy device counted, no later wave opened", st.Wave, st.Waves)
	}
	stopSim()
	sum, err := fleet.Wait()
	if err != nil || sum.Kills == 0 || sum.Stats.Trials < uint64(n) || sum.Stats.Unhealthy < uint64(len(unhealthy)) {
		t.Fatalf("fleet: %v; %d power losses on trial, %d trials, %d unhealthy; want some, at least %d and %d", err, sum.Kills, sum.Stats.Trials, sum.Stats.Unhealthy, n, len(unhealthy))
	}
}
