package updater_test

import (
	"context"
	"errors"
	"sync/atomic"
	"testing"

	"github.com/sealcast/sealcast/keychain"
	"github.com/sealcast/sealcast/protocol"
	"github.com/sealcast/sealcast/updater"
)

// flakyStore is a real store whose RecordResults and Release can be made to fail, as
// they do while Redis restarts.
type flakyStore struct {
	updater.Store
	failRecords   atomic.Int32 // RecordResults calls still to fail
	failRelease   atomic.Bool
	releaseFailed atomic.Int32
}

var errFlaky = errors.New("flaky store: connection refused")

func (s *flakyStore) RecordResults(ctx context.Context, id keychain.ReleaseID, rs []updater.Result) error {
	if s.failRecords.Add(-1) >= 0 {
		return errFlaky
	}
	return s.Store.RecordResults(ctx, id, rs)
}

func (s *flakyStore) Release(ctx context.Context, id keychain.ReleaseID) (*updater.Release, error) {
	if s.failRelease.Load() {
		s.releaseFailed.Add(1)
		return nil, errFlaky
	}
	return s.Store.Release(ctx, id)
}

func releaseState(t *testing.T, e *env, id keychain.ReleaseID) *protocol.ReleaseStatus {
	st, err := e.op.ReleaseStatus(context.Background(), id)
	if err != nil {
		t.Fatal(err)
	}
	return st
}

// TestResultRecordedAfterStoreFailure: the store moves the counter but fails to record
// the release result (Redis went away between the two calls). The receipt must wait, so
// that the device re-sends its ack and the duplicate records the result; otherwise the
// release never completes. The same path covers a crash between the two calls.
func TestResultRecordedAfterStoreFailure(t *testing.T) {
	fs := &flakyStore{}
	e := startEnv(t, func(t testing.TB) updater.Store { fs.Store = boltOpener(t); return fs })
	f := e.provision(1)[0]
	d := connectDevice(t, e.b.URL, f)
	rid := e.release(randomImage(5000), 1)
	ack, km, _ := d.install()
	fs.failRecords.Store(1)
	d.ackUntilReceipt(ack, keychain.Key(d.u, km.Seq))
	if fs.failRecords.Load() > 0 {
		t.Fatal("RecordResults was not called")
	}
	eventually(t, "release completed with the device installed", func() bool {
		st := releaseState(t, e, rid)
		return st.State == protocol.ReleaseCompleted && st.Installed == 1
	})
	if got := e.device(f.Serial); got.Seq != f.Seq-1 || got.Version != 1 {
		t.Fatalf("counter %d version %d, want %d and 1", got.Seq, got.Version, f.Seq-1)
	}
	if s := e.u.Stats(); s.AcksAccepted != 1 || s.AcksDuplicate < 1 {
		t.Errorf("stats %+v: want 1 accepted and the re-sent ack as a duplicate", s)
	}
}

// TestCompletionSurvivesStoreOutage: the status loop cannot read the release while the
// store is down; once it is back, the release is still found complete.
func TestCompletionSurvivesStoreOutage(t *testing.T) {
	fs := &flakyStore{}
	e := startEnv(t, func(t testing.TB) updater.Store { fs.Store = boltOpener(t); return fs })
	f := e.provision(1)[0]
	d := connectDevice(t, e.b.URL, f)
	rid := e.release(randomImage(5000), 1)
	ack, km, _ := d.install()
	fs.failRelease.Store(true)
	d.ackUntilReceipt(ack, keychain.Key(d.u, km.Seq))
	// The receipt follows the recorded result, which marks the release for the status
	// loop; let the loop fail on it at least once.
	seen := fs.releaseFailed.Load()
	eventually(t, "the status loop meets the outage", func() bool { return fs.releaseFailed.Load() > seen })
	fs.failRelease.Store(false)
	eventually(t, "release completed", func() bool { return releaseState(t, e, rid).State == protocol.ReleaseCompleted })
}

// TestCompletionAfterRestart: a process recorded the last result and died before it
// marked the release completed; the next process completes it.
func TestCompletionAfterRestart(t *testing.T) {
	e := startEnv(t, boltOpener)
	f := e.provision(1)[0]
	d := connectDevice(t, e.b.URL, f)
	rid := e.release(randomImage(5000), 1)
	ack, km, _ := d.install()
	d.ackUntilReceipt(ack, keychain.Key(d.u, km.Seq))
	eventually(t, "release completed", func() bool { return releaseState(t, e, rid).State == protocol.ReleaseCompleted })

	e.stop()
	// Put the store back where the crash left it: result recorded, release active.
	ctx := context.Background()
	rel, err := e.store.Release(ctx, rid)
	if err != nil {
		t.Fatal(err)
	}
	rel.State = protocol.ReleaseActive
	if err := e.store.PutRelease(ctx, rel); err != nil {
		t.Fatal(err)
	}
	e.startUpdater()
	eventually(t, "release completed by the restarted updater", func() bool {
		st := releaseState(t, e, rid)
		return st.State == protocol.ReleaseCompleted && st.Installed == 1
	})
}
