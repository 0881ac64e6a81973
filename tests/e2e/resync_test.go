package e2e_test

import (
	"context"
	"slices"
	"testing"
	"time"

	"github.com/sealcast/sealcast/device"
	"github.com/sealcast/sealcast/internal/testkit/updatertest"
	"github.com/sealcast/sealcast/keychain"
	"github.com/sealcast/sealcast/protocol"
	"github.com/sealcast/sealcast/updater"
)

// forget rolls the store's record of d back by one confirmed update, to version 0 and no
// last ack, as a store that lost its latest writes would (Redis with appendfsync everysec
// killed right after an ack). The device keeps its confirmed install.
func forget(t *testing.T, e *updatertest.Env, d *dev) {
	t.Helper()
	got := e.Device(t, d.serial)
	var u keychain.UnitData
	copy(u[:], d.file.UnitData)
	tr, err := keychain.NewTraversal(u, got.ChainLength)
	if err != nil {
		t.Fatal(err)
	}
	for tr.Pos() > got.Seq+1 {
		if err := tr.Advance(); err != nil {
			t.Fatal(err)
		}
	}
	sealed, err := keychain.SealTraversal(e.Broker.Root, d.serial, got.Epoch, tr)
	if err != nil {
		t.Fatal(err)
	}
	ok, err := e.Store.Advance(context.Background(), []updater.Advance{{
		Serial: d.serial, From: got.Pos(), To: updater.Position{Epoch: got.Epoch, Seq: got.Seq + 1},
		ChainLength: got.ChainLength, Chain: sealed, State: protocol.DeviceIdle, At: time.Now(),
	}})
	if err != nil || !ok[0] {
		t.Fatalf("rolling the store back: %v %v", ok, err)
	}
}

// TestStoreLostWrites: the updater's store loses the counter move of a confirmed install
// (PROTOCOL.md 10.4, last row). The device, one index ahead, meets the server again
// either way the next key message comes:
//   - same_id: the restarted updater resumes the release and wraps it again at the old
//     index; the device re-sends its confirmed last ack, which the updater accepts.
//   - other_id: a new release is wrapped at the old index; the device reports stale_key,
//     the updater moves down to the device's index and wraps the release there.
//
// Nothing is installed twice, and the counter ends where the device is.
func TestStoreLostWrites(t *testing.T) {
	for _, s := range updatertest.Stores {
		t.Run(s.Name, func(t *testing.T) {
			t.Run("same_id", func(t *testing.T) { lostWritesSameID(t, s.Open) })
			t.Run("other_id", func(t *testing.T) { lostWritesOtherID(t, s.Open) })
		})
	}
}

func lostWritesSameID(t *testing.T, open updatertest.Opener) {
	e := updatertest.Start(t, open)
	// The second device never runs, so that release 1 stays active across the restart.
	devs := provision(t, e, 0, "lost-1", "lost-idle")
	d := devs[0]
	r := d.start(nil)
	e.Release(t, image(4*1024, 20), 1)
	converged(t, e, d, 1, 1)
	acks := r.rec.Count(device.EventAckSent)

	forget(t, e, d)
	e.RestartUpdater(t)
	eventually(t, "the updater accepts the re-sent ack", func() bool {
		got := e.Device(t, d.serial)
		return got.Seq == d.file.Seq-1 && got.Version == 1
	})
	if st := e.Updater.Stats(); st.AcksAccepted != 1 || st.Resyncs != 0 || len(st.AcksRejected) != 0 {
		t.Fatalf("updater stats %+v; want the re-sent ack accepted", st)
	}
	if n := r.rec.Count(device.EventAckSent); n <= acks {
		t.Fatal("the device did not re-send its confirmed ack")
	}
	if n, codes := r.rec.Count(device.EventCommitted), r.rec.Codes(); n != 1 || len(codes) != 0 {
		t.Fatalf("%d installs and reports %v; want one install, no report", n, codes)
	}
	nextRelease(t, e, d, 2, 2)
}

func lostWritesOtherID(t *testing.T, open updatertest.Opener) {
	e := updatertest.Start(t, open)
	d := provision(t, e, 0, "lost-2")[0]
	r := d.start(nil)
	e.Release(t, image(4*1024, 21), 1)
	converged(t, e, d, 1, 1)

	forget(t, e, d)
	nextRelease(t, e, d, 2, 2) // wrapped at L first, then, after the resync, at L-1
	if codes := r.rec.Codes(); !slices.Equal(codes, []protocol.Code{protocol.CodeStaleKey}) {
		t.Fatalf("reports %v, want one stale_key", codes)
	}
	if st := e.Updater.Stats(); st.Resyncs != 1 || st.AcksAccepted != 2 || len(st.AcksRejected) != 0 {
		t.Fatalf("updater stats %+v; want one resync and two accepted acks", st)
	}
	if n := r.rec.Count(device.EventCommitted); n != 2 {
		t.Fatalf("%d installs, want 2", n)
	}
}
