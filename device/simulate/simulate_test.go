package simulate_test

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"strconv"
	"testing"
	"time"

	"github.com/rs/zerolog"

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
	if sum.Drops > 0 && sum.Stats.Disconnects == 0 {
		t.Fatal("no connection was dropped")
	}
	if sum.Kills > 0 && sum.Stats.Installs < uint64(n+sum.Kills) {
		t.Fatalf("%d installs for %d devices and %d power losses", sum.Stats.Installs, n, sum.Kills)
	}
}
