package simulate_test

import (
	"context"
	"crypto/ed25519"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/sealcast/sealcast/device"
	"github.com/sealcast/sealcast/device/internal/fleettest"
	"github.com/sealcast/sealcast/device/internal/mqtttest"
	"github.com/sealcast/sealcast/device/simulate"
	"github.com/sealcast/sealcast/protocol"
)

func envInt(name string, def int) int {
	if v, err := strconv.Atoi(os.Getenv(name)); err == nil && v > 0 {
		return v
	}
	return def
}

// TestFleet runs 100 devices (SEALCAST_SIM_DEVICES) taking a 64 KiB release
// (SEALCAST_SIM_IMAGE bytes, in SEALCAST_SIM_CHUNK chunks) with dropped connections,
// power losses and delayed acks.
func TestFleet(t *testing.T) {
	n := envInt("SEALCAST_SIM_DEVICES", 100)
	size := envInt("SEALCAST_SIM_IMAGE", 64<<10)
	chunk := envInt("SEALCAST_SIM_CHUNK", 4<<10)
	b := mqtttest.Start(t)
	srv, err := fleettest.New(b.URL)
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	img := make([]byte, size)
	r := rand.New(rand.NewPCG(1, 2))
	for i := range img {
		img[i] = byte(r.Uint32())
	}
	rel := srv.NewRelease(img, 1, uint32(chunk))
	if err := srv.PublishRelease(rel); err != nil {
		t.Fatal(err)
	}
	files := make([]protocol.DeviceFile, n)
	for i := range files {
		serial := fmt.Sprintf("sim-%05d", i)
		files[i] = srv.Provision(serial, 16)
		if err := srv.Wrap(rel, serial); err != nil {
			t.Fatal(err)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	sum, err := simulate.Run(ctx, simulate.Options{
		Devices: files, TargetVersion: 1, Seed: 7,
		ChunkTimeout: 5 * time.Second, AckResend: time.Second, AckResendMax: 5 * time.Second,
		ReconnectMin: 50 * time.Millisecond, ReconnectMax: time.Second,
		DropFraction: 0.1, KillFraction: 0.05, AckDelay: 20 * time.Millisecond,
		StartSpread: 200 * time.Millisecond,
		Logger:      zerolog.New(zerolog.NewTestWriter(t)).Level(zerolog.WarnLevel),
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("image %d bytes in %d-byte chunks: %v", size, chunk, sum)
	if sum.Confirmed != n || sum.T100 == 0 {
		t.Fatalf("%d of %d confirmed", sum.Confirmed, n)
	}
	if len(sum.States) != n {
		t.Fatalf("summary has %d device states, want %d", len(sum.States), n)
	}
	for i, f := range files {
		if d := srv.Dev(f.Serial); d.C != 15 || d.Version != 1 {
			t.Fatalf("server view of %s: C=%d v=%d", f.Serial, d.C, d.Version)
		}
		if st := sum.States[i]; st.Serial != f.Serial || st.Seq != 15 || st.Version != 1 || !st.LastAckConfirmed {
			t.Fatalf("vault of %s: serial %s D=%d v=%d confirmed=%v", f.Serial, st.Serial, st.Seq, st.Version, st.LastAckConfirmed)
		}
	}
	if sum.Drops == 0 || sum.Kills == 0 {
		t.Fatalf("faults injected: %d drops, %d kills; want some of each", sum.Drops, sum.Kills)
	}
	// A drop is counted as a disconnect once paho reports it, which a power loss right
	// after it can pre-empt.
	if sum.Stats.Disconnects == 0 {
		t.Fatalf("%d drops but no disconnect", sum.Drops)
	}
	// Every power loss restarts the agent, which connects again.
	if sum.Stats.Connects < uint64(n+sum.Kills) || sum.Stats.Installs < uint64(n) {
		t.Fatalf("%d connects and %d installs for %d devices and %d power losses", sum.Stats.Connects, sum.Stats.Installs, n, sum.Kills)
	}
}

// fleet is a test updater with devices and helpers.
type fleet struct {
	t     *testing.T
	srv   *fleettest.Server
	files []protocol.DeviceFile
}

func newFleet(t *testing.T, n int, prefix string) *fleet {
	t.Helper()
	b := mqtttest.Start(t)
	srv, err := fleettest.New(b.URL)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(srv.Close)
	f := &fleet{t: t, srv: srv}
	for i := range n {
		f.files = append(f.files, srv.Provision(fmt.Sprintf("%s%05d", prefix, i), 16))
	}
	return f
}

// release publishes a release of version v (8 chunks) and wraps it for every device.
func (f *fleet) release(v uint64) {
	f.t.Helper()
	img := make([]byte, 8<<10)
	r := rand.New(rand.NewPCG(v, 3))
	for i := range img {
		img[i] = byte(r.Uint32())
	}
	rel := f.srv.NewRelease(img, v, 1024)
	if err := f.srv.PublishRelease(rel); err != nil {
		f.t.Fatal(err)
	}
	for _, d := range f.files {
		if err := f.srv.Wrap(rel, d.Serial); err != nil {
			f.t.Fatal(err)
		}
	}
}

func fastOptions(t *testing.T) simulate.Options {
	return simulate.Options{
		ChunkTimeout: 5 * time.Second, AckResend: time.Second, AckResendMax: 5 * time.Second,
		ReconnectMin: 50 * time.Millisecond, ReconnectMax: time.Second,
		Logger: zerolog.New(zerolog.NewTestWriter(t)).Level(zerolog.WarnLevel),
	}
}

// eventually polls cond every 20 ms until it holds or a generous deadline passes.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(2 * time.Minute)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting until %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func TestContinuousAcrossReleases(t *testing.T) {
	const n = 20
	f := newFleet(t, n, "cont-")
	o := fastOptions(t)
	o.Devices, o.Continuous, o.Seed = f.files, true, 3
	o.DropFraction, o.KillFraction = 0.3, 0.3
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	fl, err := simulate.Start(ctx, o)
	if err != nil {
		t.Fatal(err)
	}
	if p := fl.Progress(); p.Version != 0 || p.Confirmed != 0 {
		t.Fatalf("before any release: %+v", p)
	}
	eventually(t, "every device is online", func() bool { return fl.Progress().Online == n })
	var faults [3]int
	for v := uint64(1); v <= 2; v++ {
		f.release(v)
		eventually(t, fmt.Sprintf("every device confirmed v%d", v), func() bool {
			p := fl.Progress()
			return p.Version == v && p.Confirmed == n
		})
		p := fl.Progress()
		faults[v] = p.Drops + p.Kills
		select {
		case <-fl.Done():
			t.Fatal("a continuous fleet stopped by itself")
		default:
		}
	}
	cancel()
	sum, err := fl.Wait()
	if err != nil {
		t.Fatal(err)
	}
	if p := fl.Progress(); p.Online != 0 {
		t.Fatalf("%d devices online after Wait", p.Online)
	}
	t.Logf("%v", sum)
	if sum.Version != 2 || sum.Confirmed != n || len(sum.Versions) != 2 || sum.Versions[0].Confirmed != n {
		t.Fatalf("summary: %+v", sum)
	}
	// Faults are drawn per release: the second release got its own.
	if faults[1] == 0 || faults[2] == faults[1] {
		t.Fatalf("faults after v1: %d, after v2: %d; want new faults in each release", faults[1], faults[2])
	}
	for _, d := range f.files {
		if dev := f.srv.Dev(d.Serial); dev.C != 14 || dev.Version != 2 {
			t.Fatalf("server view of %s: C=%d v=%d", d.Serial, dev.C, dev.Version)
		}
	}
}

func TestFileVaultsResume(t *testing.T) {
	// A second run on the same file vaults continues every device's counter.
	const n = 5
	f := newFleet(t, n, "fv-")
	dir := t.TempDir()
	vaults := func() []device.Vault {
		var vs []device.Vault
		for _, d := range f.files {
			vs = append(vs, device.NewFileVault(filepath.Join(dir, d.Serial+".vault")))
		}
		return vs
	}
	for _, d := range f.files {
		if _, err := device.CreateFileVault(filepath.Join(dir, d.Serial+".vault"), d); err != nil {
			t.Fatal(err)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	run := func(target uint64) simulate.Summary {
		t.Helper()
		o := fastOptions(t)
		o.Vaults, o.TargetVersion = vaults(), target
		sum, err := simulate.Run(ctx, o)
		if err != nil {
			t.Fatal(err)
		}
		if sum.Confirmed != n {
			t.Fatalf("v%d: %v", target, sum)
		}
		return sum
	}
	f.release(1)
	if sum := run(1); sum.AlreadyDone != 0 {
		t.Fatalf("first run: %v", sum)
	}
	// The same target again: every vault holds a confirmed v1, nothing to wait for.
	if sum := run(1); sum.AlreadyDone != n || sum.T100 != 0 {
		t.Fatalf("second run for v1: %v", sum)
	}
	f.release(2)
	if sum := run(2); sum.AlreadyDone != 0 || sum.Version != 2 {
		t.Fatalf("run for v2: %v", sum)
	}
	for i, v := range vaults() {
		st, err := v.Load()
		if err != nil {
			t.Fatal(err)
		}
		if st.Seq != 14 || st.Version != 2 || !st.LastAckConfirmed {
			t.Fatalf("vault of %s: D=%d v=%d confirmed=%v", f.files[i].Serial, st.Seq, st.Version, st.LastAckConfirmed)
		}
	}
}

func TestFailedForGoodEndsTheRun(t *testing.T) {
	// One device trusts another release key: bad_manifest, which the agent does not
	// retry. The run ends once the others confirmed, without waiting for ctx.
	const n = 4
	f := newFleet(t, n, "bad-")
	other, _, _ := ed25519.GenerateKey(nil)
	f.files[2].ReleasePublicKey = protocol.HexBytes(other)
	f.release(1)
	o := fastOptions(t)
	o.Devices = f.files
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	sum, err := simulate.Run(ctx, o)
	if err != nil {
		t.Fatal(err)
	}
	if ctx.Err() != nil {
		t.Fatal("the run waited for ctx")
	}
	if sum.Confirmed != n-1 || sum.Failed != 1 || sum.FailedForGood != 1 || sum.Codes["bad_manifest"] != 1 || sum.T100 != 0 || !sum.Reached(0.5, n) {
		t.Fatalf("summary: %v", sum)
	}
}

func TestStartRejectsDuplicates(t *testing.T) {
	f := protocol.DeviceFile{Serial: "dup-1", UnitData: make([]byte, 32), Seq: 16, ChainLength: 16,
		ReleasePublicKey: make([]byte, 32), Broker: protocol.BrokerConfig{URL: "tcp://127.0.0.1:1"}}
	f.UnitData[0] = 1
	_, err := simulate.Start(context.Background(), simulate.Options{Devices: []protocol.DeviceFile{f, f}})
	if err == nil || !strings.Contains(err.Error(), "both") {
		t.Fatalf("Start with a serial twice = %v", err)
	}
}
