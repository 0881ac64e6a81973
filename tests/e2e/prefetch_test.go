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

// clock is a server clock the test moves by hand.
type clock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *clock) Now() time.Time      { c.mu.Lock(); defer c.mu.Unlock(); return c.t }
func (c *clock) Add(d time.Duration) { c.mu.Lock(); c.t = c.t.Add(d); c.mu.Unlock() }

// TestPrefetchThenActivate: a release with prefetch and a start time an hour away is
// announced to 60 simulated devices, which download and keep every chunk while no key
// is out; the release status counts them. When the server's clock reaches the start
// time the keys go out, and every device installs from what it kept, fetching no chunk
// ([SC-9.9], [SC-12.7]).
func TestPrefetchThenActivate(t *testing.T) {
	if testing.Short() {
		t.Skip("a fleet of 60; skipped under -short")
	}
	const n = 60
	clk := &clock{t: time.Now()}
	e := updatertest.Start(t, updatertest.Bolt, func(o *updater.Options) { o.Now = clk.Now })
	ctx := context.Background()
	serials := numbered("pre-%03d", n)
	files, err := e.Op.Provision(ctx, serials, 1024)
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	fetchedAfterKey, confirmed := map[string]int{}, map[string]bool{}
	keyed := map[string]bool{}
	simCtx, stopSim := context.WithCancel(ctx)
	fleet, err := simulate.Start(simCtx, simulate.Options{
		Devices: files, PrefetchLimit: 1 << 20, Continuous: true,
		ChunkTimeout: 5 * time.Second, AckResend: time.Second, AckResendMax: 3 * time.Second,
		ReconnectMin: 50 * time.Millisecond, ReconnectMax: time.Second,
		Logger: zerolog.New(zerolog.NewTestWriter(t)).Level(zerolog.ErrorLevel),
		OnEvent: func(ev device.Event) {
			mu.Lock()
			defer mu.Unlock()
			switch ev.Kind {
			case device.EventKeyMessage:
				keyed[ev.Serial] = true
			case device.EventChunkFetch:
				if keyed[ev.Serial] {
					fetchedAfterKey[ev.Serial]++
				}
			case device.EventConfirmed:
				confirmed[ev.Serial] = true
			}
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	defer func() { stopSim(); fleet.Wait() }()

	img := image(20*1024+5, 13)
	start := clk.Now().Add(time.Hour)
	res, err := e.Op.Release(ctx, bytes.NewReader(img), int64(len(img)), protocol.ReleaseCreateArgs{
		Version: 1, All: true, ChunkSize: 1024, Prefetch: true, PrefetchJitter: "1s", StartAt: &start})
	if err != nil {
		t.Fatal(err)
	}
	var st *protocol.ReleaseStatus
	eventually(t, "every device prefetched the release", func() bool {
		st, err = e.Op.ReleaseStatus(ctx, res.Release)
		return err == nil && st.Prefetched == n
	})
	mu.Lock()
	nKeyed := len(keyed)
	mu.Unlock()
	if nKeyed != 0 || st.Installed != 0 || !st.Prefetch {
		t.Fatalf("before the start time: %d devices saw a key, %d installed, prefetch %v; want none, none, true", nKeyed, st.Installed, st.Prefetch)
	}
	clk.Add(time.Hour)
	eventually(t, "every device installed once the start time came", func() bool {
		mu.Lock()
		defer mu.Unlock()
		return len(confirmed) == n
	})
	mu.Lock()
	defer mu.Unlock()
	for s, k := range fetchedAfterKey {
		t.Errorf("%s fetched %d chunks after its key; it should install from what it prefetched", s, k)
	}
}
