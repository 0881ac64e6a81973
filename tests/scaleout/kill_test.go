package scaleout_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"fmt"
	"os"
	"strconv"
	"testing"
	"time"

	"github.com/sealcast/sealcast/internal/testkit/mosquittotest"
	"github.com/sealcast/sealcast/internal/testkit/redistest"
	"github.com/sealcast/sealcast/protocol"
	"github.com/sealcast/sealcast/updater/redisstore"
)

func envInt(name string, def int) int {
	if v, err := strconv.Atoi(os.Getenv(name)); err == nil && v >= 0 {
		return v
	}
	return def
}

// brokerConfig lifts Mosquitto's per-client limits (20 QoS 1 messages in flight, 1,000
// queued) so that the test's observers, which take every key message of the fleet, lose
// none while they are slow under -race. The updater loses none either, which the test
// does not rely on: devices re-send acks.
var brokerConfig = mosquittotest.WithConfig("max_inflight_messages 1000", "max_queued_messages 1000000")

func serials(prefix string, n int) []string {
	s := make([]string, n)
	for i := range s {
		s[i] = fmt.Sprintf("%s-%05d", prefix, i)
	}
	return s
}

func randomImage(n int) []byte {
	b := make([]byte, n)
	rand.Read(b)
	return b
}

// TestUpdaterKilledMidRelease kills the updater process (SIGKILL) in the middle of the
// key fan-out of a release to 1,000 devices and starts it again on the same data
// directory and Redis: the release completes, no device is skipped, no device gets its
// key wrapped twice under different keys (every key message a device got opens under its
// K_L to the one content key), and every counter moved exactly once, from L to L-1.
//
// The devices are device agents from device/simulate (each its own MQTT connection,
// downloading and hashing the image, acking until a receipt comes). The whole test takes
// about 10 s under -race on two idle cores, 30 s when other work loads them (load
// average 14; measured, not asserted). SEALCAST_SCALE_AGENTS=k runs only k agents and
// plays the other devices with an ack driver over one connection (it acks each key
// message without downloading the image), for slower machines; SEALCAST_SCALE_DEVICES
// changes the fleet size.
func TestUpdaterKilledMidRelease(t *testing.T) {
	n := envInt("SEALCAST_SCALE_DEVICES", 1000)
	agents := min(n, envInt("SEALCAST_SCALE_AGENTS", n))
	t0 := time.Now()
	m := mosquittotest.Start(t, brokerConfig)
	rds := redistest.Start(t)
	dir := dataDir(t, "")
	// The updater reaches the broker through a gate that, from the release on, passes its
	// bytes at 32 KiB/s: the ~160 KB of key messages take seconds to reach the broker
	// however fast the updater wraps them, so a kill when a tenth of them were seen lands
	// in the middle of the fan-out even on a loaded machine. At the kill the gate freezes
	// first: what the updater had written and the broker had not read is lost, as in a
	// crash.
	g := startGate(t, m.Addr)
	up := startServe(t, "updater", nil,
		"-data", dir, "-external-broker", g.URL(), "-redis", rds.URL(), "-http", "", "-chain-length", "16")
	op := dialOperator(t, m.URL)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()

	start := time.Now()
	files, err := op.Provision(ctx, serials("dev", n), 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("provisioned %d devices in %v", n, time.Since(start).Round(time.Millisecond))
	keys := watchKeys(t, m.URL)
	driver := driveAcks(t, m.URL, files[agents:], 1, 1)
	fleet := startAgents(t, ctx, files[:agents], "")

	img := randomImage(8 << 10)
	g.Pace(32 << 10)
	start = time.Now()
	rel, err := op.Release(ctx, bytes.NewReader(img), int64(len(img)), protocol.ReleaseCreateArgs{Version: 1, All: true, ChunkSize: 4096})
	if err != nil {
		t.Fatal(err)
	}
	// Kill when a tenth of the keys are out.
	eventually(t, 2*time.Minute, "the first tenth of the key messages", func() bool { return keys.devices() >= max(1, n/10) })
	g.Freeze()
	up.kill()
	g.Cut()
	killed := time.Now()
	atKill := keys.settle(500*time.Millisecond, 10*time.Second)
	t.Logf("killed the updater %v after the release was created; %d of %d devices had their key",
		killed.Sub(start).Round(time.Millisecond), atKill, n)
	if atKill == 0 || atKill >= n {
		t.Fatalf("the kill did not land in the middle of the fan-out: %d of %d devices had their key", atKill, n)
	}

	up.restart()
	restarted := time.Now()
	eventually(t, 5*time.Minute, "every device confirmed by the ack driver", driver.done(rel.Release))
	sum := fleet.wait(t, ctx)
	completed(t, ctx, op, rel.Release, n, 2*time.Minute)
	t.Logf("release completed %v after the restart (%v in all); %v; agents: %v",
		time.Since(restarted).Round(time.Millisecond), time.Since(t0).Round(time.Millisecond), driver, sum)
	again := keys.checkOneWrap(t, files, rel.Release)
	t.Logf("%d devices got their (same) key message more than once", again)
	driver.check(t)
	checkCounters(t, rds.URL(), files, 1)
}

// checkCounters reads every device from the Redis store and checks that its counter
// moved exactly moves times from L, within epoch 0, and that it runs version moves.
func checkCounters(t *testing.T, redisURL string, files []protocol.DeviceFile, moves uint32) {
	t.Helper()
	st, err := redisstore.Open(redisURL)
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	ss := make([]string, len(files))
	for i, f := range files {
		ss[i] = f.Serial
	}
	devs, err := st.Devices(context.Background(), ss)
	if err != nil {
		t.Fatal(err)
	}
	bad := 0
	for i, d := range devs {
		f := files[i]
		if d == nil || d.Epoch != 0 || d.Seq != f.Seq-moves || d.Version != uint64(moves) {
			if bad++; bad <= 10 {
				t.Errorf("%s: store has %+v; want epoch 0, seq %d, version %d", f.Serial, d, f.Seq-moves, moves)
			}
		}
	}
	if bad > 0 {
		t.Errorf("%d of %d counters did not move exactly %d times", bad, len(files), moves)
	}
}

// TestUpdaterKilledMidWave kills the updater (SIGKILL) while the second of three waves of
// a release to 300 devices is out, and starts it again on the same data directory and
// Redis: the same wave goes on, no device of the last wave gets its key before the
// second has settled, the release completes, no device got its key wrapped twice under
// different keys, and every counter moved exactly once ([SC-12.5]).
func TestUpdaterKilledMidWave(t *testing.T) {
	const n = 300
	m := mosquittotest.Start(t, brokerConfig)
	rds := redistest.Start(t)
	dir := dataDir(t, "")
	up := startServe(t, "updater", nil,
		"-data", dir, "-external-broker", m.URL, "-redis", rds.URL(), "-http", "", "-chain-length", "16")
	op := dialOperator(t, m.URL)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	files, err := op.Provision(ctx, serials("wave", n), 0)
	if err != nil {
		t.Fatal(err)
	}
	keys := watchKeys(t, m.URL)
	// The ack driver acks every key message at once, without downloading the image.
	driver := driveAcks(t, m.URL, files, 1, 1)
	img := randomImage(4 << 10)
	rel, err := op.Release(ctx, bytes.NewReader(img), int64(len(img)),
		protocol.ReleaseCreateArgs{Version: 1, All: true, ChunkSize: 4096, Waves: []string{"10%", "40%"}})
	if err != nil {
		t.Fatal(err)
	}
	status := func() *protocol.ReleaseStatus {
		st, err := op.ReleaseStatus(ctx, rel.Release)
		if err != nil {
			t.Fatal(err)
		}
		return st
	}
	eventually(t, 2*time.Minute, "wave 2 opened", func() bool { return status().Wave == 2 })
	up.kill()
	atKill := keys.settle(500*time.Millisecond, 10*time.Second)
	if atKill > 120 {
		t.Fatalf("%d devices had their key at the kill; waves 1 and 2 hold 120", atKill)
	}
	up.restart()
	if st := status(); st.Wave != 2 && st.Wave != 3 {
		t.Fatalf("after the restart: wave %d, want 2 going on (or 3 once it settled)", st.Wave)
	}
	eventually(t, 5*time.Minute, "every device confirmed by the ack driver", driver.done(rel.Release))
	var st *protocol.ReleaseStatus
	eventually(t, 2*time.Minute, "the release completed", func() bool {
		st = status()
		return st.State == protocol.ReleaseCompleted
	})
	if st.Installed != n || st.Wave != 3 {
		t.Errorf("release status: %d installed, wave %d; want %d, wave 3", st.Installed, st.Wave, n)
	}
	keys.checkOneWrap(t, files, rel.Release)
	driver.check(t)
	checkCounters(t, rds.URL(), files, 1)
}
