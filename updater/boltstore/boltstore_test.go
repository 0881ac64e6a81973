package boltstore_test

import (
	"errors"
	"path/filepath"
	"testing"
	"time"

	"github.com/sealcast/sealcast/updater"
	"github.com/sealcast/sealcast/updater/boltstore"
	"github.com/sealcast/sealcast/updater/storetest"
)

func open(t testing.TB, path string) *boltstore.Store {
	t.Helper()
	s, err := boltstore.Open(path, boltstore.Options{})
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func TestContract(t *testing.T) {
	storetest.Run(t, func(t *testing.T) updater.Store {
		s := open(t, filepath.Join(t.TempDir(), "sealcast.db"))
		t.Cleanup(func() { s.Close() })
		return s
	})
}

func TestReopen(t *testing.T) {
	path := filepath.Join(t.TempDir(), "sealcast.db")
	s := open(t, path)
	d := storetest.NewDevice("r-1")
	d.LastSeen = time.Date(2030, 1, 2, 3, 4, 5, 6, time.UTC)
	if _, err := s.CreateDevices(t.Context(), []*updater.Device{d}); err != nil {
		t.Fatal(err)
	}
	adv := updater.Advance{Serial: d.Serial, From: d.Pos(), To: updater.Position{Seq: d.Seq - 1}, Chain: []byte("next")}
	if ok, err := s.Advance(t.Context(), []updater.Advance{adv}); err != nil || !ok[0] {
		t.Fatalf("Advance = %v, %v", ok, err)
	}
	rel := storetest.NewRelease([16]byte{1}, time.Now())
	if err := s.PutRelease(t.Context(), rel); err != nil {
		t.Fatal(err)
	}
	if err := s.RecordResults(t.Context(), rel.ID, []updater.Result{{Serial: d.Serial, Result: updater.ResultInstalled}}); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}

	s = open(t, path)
	defer s.Close()
	ds, err := s.Devices(t.Context(), []string{d.Serial})
	if err != nil || ds[0] == nil {
		t.Fatalf("Devices after reopen = %v, %v", ds, err)
	}
	if ds[0].Pos() != adv.To || string(ds[0].Chain) != "next" {
		t.Errorf("after reopen: at %v with chain %q, want %v and %q", ds[0].Pos(), ds[0].Chain, adv.To, "next")
	}
	r, err := s.Release(t.Context(), rel.ID)
	if err != nil || r.Installed != 1 || !r.Created.Equal(rel.Created) {
		t.Errorf("Release after reopen = %+v, %v", r, err)
	}
}

// TestLocked shows that a second Open of a file in use fails after the timeout instead
// of hanging. (bbolt's flock is per open file, so a second Open in the same process
// conflicts just as another process would.)
func TestLocked(t *testing.T) {
	path := filepath.Join(t.TempDir(), "sealcast.db")
	s := open(t, path)
	defer s.Close()
	start := time.Now()
	_, err := boltstore.Open(path, boltstore.Options{LockTimeout: 100 * time.Millisecond})
	if !errors.Is(err, boltstore.ErrLocked) {
		t.Fatalf("second Open: %v, want an error wrapping ErrLocked", err)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("second Open took %v", d)
	}
	t.Logf("second Open: %v", err)
}

func TestTimePrecision(t *testing.T) {
	s := open(t, filepath.Join(t.TempDir(), "sealcast.db"))
	defer s.Close()
	d := storetest.NewDevice("p")
	d.LastSeen = time.Date(2030, 1, 2, 3, 4, 5, 123456789, time.FixedZone("x", -7200))
	if _, err := s.CreateDevices(t.Context(), []*updater.Device{d}); err != nil {
		t.Fatal(err)
	}
	ds, err := s.Devices(t.Context(), []string{"p"})
	if err != nil {
		t.Fatal(err)
	}
	if got := ds[0].LastSeen; !got.Equal(d.LastSeen) || got.Location() != time.UTC {
		t.Errorf("LastSeen = %v, want %v in UTC (nanosecond precision)", got, d.LastSeen)
	}
}

const benchBatch = 1000

func benchStore(b *testing.B) *boltstore.Store {
	s := open(b, filepath.Join(b.TempDir(), "sealcast.db"))
	b.Cleanup(func() { s.Close() })
	return s
}

func BenchmarkAdvance(b *testing.B) {
	b.Run("batch=1", func(b *testing.B) { storetest.BenchmarkAdvance(b, benchStore(b), 1) })
	b.Run("batch=1000", func(b *testing.B) { storetest.BenchmarkAdvance(b, benchStore(b), benchBatch) })
}

func BenchmarkDevicesBatch(b *testing.B) {
	storetest.BenchmarkDevices(b, benchStore(b), benchBatch)
}
