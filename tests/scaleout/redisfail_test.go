package scaleout_test

import (
	"bytes"
	"context"
	"testing"
	"time"

	"github.com/sealcast/sealcast/internal/testkit/mosquittotest"
	"github.com/sealcast/sealcast/internal/testkit/redistest"
	"github.com/sealcast/sealcast/keychain"
	"github.com/sealcast/sealcast/protocol"
)

// TestRedisClusterFailover runs releases to 1,000 simulated devices through
// `serve -redis redis+cluster://...` on a Redis Cluster of three masters with a replica
// each, and kills (SIGKILL) the master that holds the release's keys, a third of the
// devices' and the list of serials: in the middle of the fan-out, with acks coming in
// (mid-release), and just before a release's start time, so that its whole fan-out
// meets the dead master and waits for the failover (fan-out). The replica takes the
// slots over; the updater finds the new master by itself. Every device installs the
// release, the release completes with each device counted once, no counter moves twice,
// and no device got two different key messages.
func TestRedisClusterFailover(t *testing.T) {
	for _, mode := range []failMode{midRelease, duringFanout} {
		t.Run(string(mode), func(t *testing.T) {
			c := redistest.StartCluster(t, 3, 1)
			releaseAcrossStoreFailover(t, c.URL, mode, func(rel keychain.ReleaseID) string {
				master := c.MasterOf(t, "sealcast:rel:{"+rel.String()+"}")
				master.Kill()
				c.WaitOK(t, time.Minute)
				return "killed Redis Cluster master " + master.Addr + "; its replica took its slots over"
			})
		})
	}
}

// TestRedisSentinelFailover is TestRedisClusterFailover on a master and a replica under
// three Redis Sentinels, through `serve -redis redis+sentinel://...`: the master is
// killed mid-release and the sentinels promote the replica.
func TestRedisSentinelFailover(t *testing.T) {
	st := redistest.StartSentinel(t)
	releaseAcrossStoreFailover(t, st.URL, midRelease, func(keychain.ReleaseID) string {
		st.Master.Kill()
		eventually(t, time.Minute, "the sentinels promoting the replica", func() bool { return st.MasterAddr(t) == st.Replica.Addr })
		return "killed the master " + st.Master.Addr + "; the sentinels promoted " + st.Replica.Addr
	})
}

// failMode is when releaseAcrossStoreFailover makes the store fail.
type failMode string

const (
	// midRelease: when a tenth of the key messages are out, the updater's bytes to the
	// broker paced so that the rest follow over seconds, with devices acking.
	midRelease failMode = "mid-release"
	// duringFanout: 300 ms before the release's start time, so that its fan-out starts
	// while the master is down (a failover takes at least the cluster node timeout, 1 s)
	// and must retry until the replica took over.
	duringFanout failMode = "during-fanout"
)

// releaseAcrossStoreFailover runs a release to simulated devices through an updater on
// the Redis at storeURL and Mosquitto, calls fail in the middle of its fan-out, and
// checks that everything converges.
func releaseAcrossStoreFailover(t *testing.T, storeURL string, mode failMode, fail func(keychain.ReleaseID) string) {
	n := envInt("SEALCAST_SCALE_DEVICES", 1000)
	t0 := time.Now()
	m := mosquittotest.Start(t, brokerConfig)
	// As in TestUpdaterKilledMidRelease, the updater's bytes to the broker are paced from
	// the release on, so that the failure lands in the middle of the fan-out.
	g := startGate(t, m.Addr)
	up := startServe(t, "updater", nil,
		"-data", dataDir(t, ""), "-external-broker", g.URL(), "-redis", storeURL, "-http", "127.0.0.1:0", "-chain-length", "16")
	op := dialOperator(t, m.URL)
	// Bounded: a device that never gets its key keeps the simulation waiting until then.
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	files, err := op.Provision(ctx, serials("dev", n), 0)
	if err != nil {
		t.Fatal(err)
	}
	keys := watchKeys(t, m.URL)
	fleet := startAgents(t, ctx, files, "")

	img := randomImage(8 << 10)
	args := protocol.ReleaseCreateArgs{Version: 1, All: true, ChunkSize: 4096}
	startAt := time.Now().Add(5 * time.Second)
	if mode == duringFanout {
		args.StartAt = &startAt
	} else {
		g.Pace(32 << 10)
	}
	start := time.Now()
	rel, err := op.Release(ctx, bytes.NewReader(img), int64(len(img)), args)
	if err != nil {
		t.Fatal(err)
	}
	if mode == duringFanout {
		if time.Until(startAt) < 500*time.Millisecond {
			t.Fatalf("release.create took %v: the start time is too close to fail before it", time.Since(start))
		}
		time.Sleep(time.Until(startAt) - 300*time.Millisecond)
	} else {
		eventually(t, 2*time.Minute, "the first tenth of the key messages", func() bool { return keys.devices() >= max(1, n/10) })
	}
	atFail, failAt := keys.devices(), time.Since(start)
	what := fail(rel.Release)
	t.Logf("%s, %v after the release was created, when %d of %d devices had their key; failed over in %v",
		what, failAt.Round(time.Millisecond), atFail, n, (time.Since(start) - failAt).Round(time.Millisecond))
	if atFail >= n {
		t.Fatalf("the failure did not land before the end of the fan-out: %d of %d devices had their key", atFail, n)
	}
	g.Pace(0)
	failed := time.Now()

	sum := fleet.wait(t, ctx)
	completed(t, ctx, op, rel.Release, n, 2*time.Minute)
	t.Logf("release completed %v after the failure (%v in all); devices: %v", time.Since(failed).Round(time.Millisecond), time.Since(t0).Round(time.Millisecond), sum)
	keys.checkOneWrap(t, files, rel.Release)
	checkCounters(t, storeURL, files, 1)
	retries := up.metric("sealcast_fanout_retries_total")
	t.Logf("%v fan-out batches retried", retries)
	if mode == duringFanout && retries == 0 {
		t.Errorf("the fan-out never met the failed store (no batch retried): the test did not test what it says")
	}
	if up.exitErr() != nil {
		t.Errorf("the updater exited: %v\n%s", up.exitErr(), up.logTail(30))
	}
}
