package scaleout_test

import (
	"bytes"
	"context"
	"testing"
	"time"

	"github.com/sealcast/sealcast/internal/testkit/mosquittotest"
	"github.com/sealcast/sealcast/internal/testkit/redistest"
	"github.com/sealcast/sealcast/protocol"
)

var rejectReasons = []string{"malformed", "unknown_device", "forged", "stale", "unassigned", "internal"}

// TestSharedAckGroup runs two updater processes on one Mosquitto and one Redis, both in
// ack group g (the second -acks-only), so that Mosquitto splits the acks between their
// $share/g/sealcast/devices/+/ack subscriptions. Every ack of a 1,000-device release is
// published twice in a row, which Mosquitto's round robin hands to one updater and then
// the other: the two race on the same counter, and the store's compare-and-set lets one
// win. Every counter moves exactly once, both updaters accepted some acks, the accepted
// acks add up to the fleet, every second copy is counted as a duplicate, and the release
// completes with each device counted once. Then the acks-only updater is killed, and
// every ack of a second release reaches the remaining one.
//
// Mosquitto and shared subscriptions: a member of a share group with a persistent
// session (clean session off) keeps getting its share while disconnected, queued for it,
// and a QoS 1 message in flight to a member that disconnects is not handed to another
// (eclipse-mosquitto/mosquitto#1747, #2662; seen with 2.0.11: with one of two members
// gone, the other got 5 of 10 messages). updater/mqttbus connects with a clean session,
// so a stopped updater leaves the group at once; what was in flight to it is lost, and
// devices re-send their acks until a receipt comes (PROTOCOL.md 10.1 step 6).
func TestSharedAckGroup(t *testing.T) {
	n := envInt("SEALCAST_SCALE_DEVICES", 1000)
	m, rds, a, b := startAckGroup(t)
	op := dialOperator(t, m.URL)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()

	files, err := op.Provision(ctx, serials("dev", n), 0)
	if err != nil {
		t.Fatal(err)
	}
	driver := driveAcks(t, m.URL, files, 1, 2)
	img := randomImage(4 << 10)
	start := time.Now()
	rel, err := op.Release(ctx, bytes.NewReader(img), int64(len(img)), protocol.ReleaseCreateArgs{Version: 1, All: true, ChunkSize: 4096})
	if err != nil {
		t.Fatal(err)
	}
	eventually(t, 5*time.Minute, "every ack confirmed by a receipt", driver.done(rel.Release))
	t.Logf("%d devices acked in %v; %v", n, time.Since(start).Round(time.Millisecond), driver)
	completed(t, ctx, op, rel.Release, n, time.Minute)
	driver.check(t)
	checkCounters(t, rds.URL(), files, 1)

	// Stats, from each process's /metrics.
	var accepted, dup float64
	for _, u := range []*serve{a, b} {
		acc, d := u.metric("sealcast_acks_accepted_total"), u.metric("sealcast_acks_duplicate_total")
		t.Logf("%s: %v acks accepted, %v duplicates", u.name, acc, d)
		if acc == 0 {
			t.Errorf("%s accepted no ack: the ack load was not shared", u.name)
		}
		for _, r := range rejectReasons {
			if v := u.metric(`sealcast_acks_rejected_total{reason="` + r + `"}`); v != 0 {
				t.Errorf("%s rejected %v acks as %s", u.name, v, r)
			}
		}
		accepted += acc
		dup += d
	}
	if accepted != float64(n) {
		t.Errorf("%v acks accepted in all, want %d: a counter moved more or less than once", accepted, n)
	}
	if dup < float64(n) {
		t.Errorf("%v duplicates for %d acks sent twice, want at least %d", dup, n, n)
	}

	// A member that dies leaves the group at once (mqttbus connects with a clean
	// session): with the acks-only updater killed, every ack of the next release, each
	// copy of it, reaches the other one, and nothing waits for the dead one.
	b.kill()
	before, sent := acksReceived(a), driver.published.Load()
	driver.setVersion(2)
	rel2, err := op.Release(ctx, bytes.NewReader(img), int64(len(img)), protocol.ReleaseCreateArgs{Version: 2, All: true, ChunkSize: 4096})
	if err != nil {
		t.Fatal(err)
	}
	eventually(t, 5*time.Minute, "every ack of release 2 confirmed", driver.done(rel2.Release))
	eventually(t, time.Minute, "every ack published reached updater-a", func() bool {
		return acksReceived(a)-before == float64(driver.published.Load()-sent)
	})
	completed(t, ctx, op, rel2.Release, n, time.Minute)
	t.Logf("with updater-b killed: %v acks reached updater-a; %v", acksReceived(a)-before, driver)
	driver.check(t)
	checkCounters(t, rds.URL(), files, 2)
}

// startAckGroup starts Mosquitto, Redis and two updater processes in ack group g on
// them: updater-a serves admin requests, updater-b (a copy of its data directory) is
// -acks-only.
func startAckGroup(t *testing.T) (*mosquittotest.Server, *redistest.Server, *serve, *serve) {
	t.Helper()
	m := mosquittotest.Start(t, brokerConfig)
	rds := redistest.Start(t)
	dirA := dataDir(t, "")
	common := []string{"-external-broker", m.URL, "-redis", rds.URL(), "-http", "127.0.0.1:0", "-ack-group", "g", "-chain-length", "16"}
	a := startServe(t, "updater-a", nil, append([]string{"-data", dirA}, common...)...)
	b := startServe(t, "updater-b", nil, append([]string{"-data", dataDir(t, dirA), "-acks-only"}, common...)...)
	return m, rds, a, b
}

// acksReceived is every ack an updater took off the wire, whatever became of it.
func acksReceived(u *serve) float64 {
	v := u.metric("sealcast_acks_accepted_total") + u.metric("sealcast_acks_duplicate_total") + u.metric("sealcast_acks_shed_total")
	for _, r := range rejectReasons {
		v += u.metric(`sealcast_acks_rejected_total{reason="` + r + `"}`)
	}
	return v
}

// TestRolloutAcrossAckGroup runs a release with waves, a concurrency bound and a failure
// threshold on two updaters in one ack group, the second -acks-only ([SC-12.5] with
// several updaters): the acks-only one records the progress of the devices whose acks
// Mosquitto hands it in the shared store, and the admin-serving one, which alone opens
// waves and offers keys, moves the rollout on from there. Both updaters accept acks,
// every wave closes with all its devices installed, no device gets more than one key,
// and every counter moves once.
func TestRolloutAcrossAckGroup(t *testing.T) {
	const n, bound = 300, 40
	m, rds, a, b := startAckGroup(t)
	op := dialOperator(t, m.URL)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	files, err := op.Provision(ctx, serials("roll", n), 0)
	if err != nil {
		t.Fatal(err)
	}
	keys := watchKeys(t, m.URL)
	driver := driveAcks(t, m.URL, files, 1, 1)
	img := randomImage(4 << 10)
	rel, err := op.Release(ctx, bytes.NewReader(img), int64(len(img)), protocol.ReleaseCreateArgs{
		Version: 1, All: true, ChunkSize: 4096, Waves: []string{"10%", "50%"}, MaxConcurrent: bound, MaxFailures: "5%"})
	if err != nil {
		t.Fatal(err)
	}
	eventually(t, 5*time.Minute, "every ack confirmed by a receipt", driver.done(rel.Release))
	st := completed(t, ctx, op, rel.Release, n, time.Minute)
	if st.Installed != n || st.Wave != 3 || len(st.Waves) != 3 {
		t.Fatalf("release status: %d installed, wave %d of %d; want %d, wave 3 of 3", st.Installed, st.Wave, len(st.Waves), n)
	}
	for _, ws := range st.Waves {
		if ws.Installed != ws.Size || ws.Opened == nil || ws.Closed == nil {
			t.Errorf("wave %d: %d of %d installed, opened %v, closed %v; want all, opened and closed", ws.Wave, ws.Installed, ws.Size, ws.Opened, ws.Closed)
		}
	}
	for _, u := range []*serve{a, b} {
		if acc := u.metric("sealcast_acks_accepted_total"); acc == 0 {
			t.Errorf("%s accepted no ack: the ack load was not shared", u.name)
		}
	}
	if opened := a.metric("sealcast_waves_opened_total"); opened != 2 {
		t.Errorf("updater-a opened %v waves, want 2", opened)
	}
	keys.checkOneWrap(t, files, rel.Release)
	driver.check(t)
	checkCounters(t, rds.URL(), files, 1)
}
