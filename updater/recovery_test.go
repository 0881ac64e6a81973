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
	e := startEnv(t, func(t *testing.T) updater.Store { fs.Store = boltOpener(t); return fs })
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
