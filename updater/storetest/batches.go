package storetest

// Empty and large batches.

import (
	"fmt"
	"slices"
	"testing"

	"github.com/sealcast/sealcast/keychain"
	"github.com/sealcast/sealcast/updater"
)

func testEmptyBatches(t *testing.T, s updater.Store) {
	ctx := t.Context()
	if ex, err := s.CreateDevices(ctx, nil); err != nil || len(ex) != 0 {
		t.Errorf("CreateDevices(nil) = %v, %v", ex, err)
	}
	if ds, err := s.Devices(ctx, nil); err != nil || len(ds) != 0 {
		t.Errorf("Devices(nil) = %v, %v", ds, err)
	}
	if ok, err := s.Assign(ctx, nil); err != nil || len(ok) != 0 {
		t.Errorf("Assign(nil) = %v, %v", ok, err)
	}
	if ok, err := s.Advance(ctx, nil); err != nil || len(ok) != 0 {
		t.Errorf("Advance(nil) = %v, %v", ok, err)
	}
	if err := s.Note(ctx, nil); err != nil {
		t.Errorf("Note(nil) = %v", err)
	}
	if err := s.PutRelease(ctx, NewRelease(rid(1), t0)); err != nil {
		t.Fatal(err)
	}
	if err := s.RecordResults(ctx, rid(1), nil); err != nil {
		t.Errorf("RecordResults(nil) = %v", err)
	}
	if rs, err := s.Results(ctx, rid(1), nil); err != nil || len(rs) != 0 {
		t.Errorf("Results(nil) = %v, %v", rs, err)
	}
}

// testLargeBatch runs a release's worth of batch calls over a few thousand devices.
func testLargeBatch(t *testing.T, s updater.Store) {
	const n = 3000
	ctx := t.Context()
	devs := make([]*updater.Device, n)
	serials := make([]string, n)
	for i := range devs {
		devs[i] = NewDevice(fmt.Sprintf("dev-%05d", (i*7919)%n)) // created out of order
		serials[i] = devs[i].Serial
	}
	mustCreate(t, s, devs...)
	if existing, err := s.CreateDevices(ctx, devs); err != nil || len(existing) != n {
		t.Fatalf("CreateDevices again: %d existing, %v; want %d", len(existing), err, n)
	}
	all, err := s.Serials(ctx)
	if err != nil || len(all) != n || !slices.IsSorted(all) {
		t.Fatalf("Serials: %d, sorted %v, %v", len(all), slices.IsSorted(all), err)
	}

	id := rid(1)
	if err := s.PutRelease(ctx, NewRelease(id, t0)); err != nil {
		t.Fatal(err)
	}
	if err := s.AddTargets(ctx, id, serials); err != nil {
		t.Fatal(err)
	}
	if targets, err := s.Targets(ctx, id); err != nil || !slices.Equal(targets, all) {
		t.Fatalf("Targets: %d, %v; want the %d serials", len(targets), err, n)
	}

	advs, results := applyLargeBatch(t, s, id, devs)
	got, err := s.Devices(ctx, serials)
	if err != nil || len(got) != n {
		t.Fatalf("Devices: %d, %v", len(got), err)
	}
	for i, d := range got {
		want := clone(devs[i])
		want.Assigned, want.State = []keychain.ReleaseID{id}, "wrapped"
		if i%3 != 0 {
			applyAdvance(want, advs[i])
		}
		want.LastResult, want.LastSeen = "ok", t0
		if diff := diffDevice(d, want); diff != "" {
			t.Fatalf("device %s: %s", want.Serial, diff)
		}
	}
	res, err := s.Results(ctx, id, serials)
	if err != nil || len(res) != n {
		t.Fatalf("Results: %d, %v", len(res), err)
	}
	for i := range res {
		if res[i] != results[i].Result {
			t.Fatalf("Results[%d] = %q, want %q", i, res[i], results[i].Result)
		}
	}
	r, err := s.Release(ctx, id)
	if err != nil || r.Installed != n-n/3 || r.Failed != n/3 {
		t.Fatalf("Release counts = %+v, %v; want %d installed, %d failed", r, err, n-n/3, n/3)
	}
}

// applyLargeBatch assigns id to every device, advances two thirds of them (the others'
// advances are stale), notes them all and records their results, each in one call. It
// returns the advances and results it applied.
func applyLargeBatch(t *testing.T, s updater.Store, id keychain.ReleaseID, devs []*updater.Device) ([]updater.Advance, []updater.Result) {
	ctx := t.Context()
	n := len(devs)
	as := make([]updater.Assignment, n)
	advs := make([]updater.Advance, n)
	notes := make([]updater.Note, n)
	results := make([]updater.Result, n)
	for i, d := range devs {
		as[i] = updater.Assignment{Serial: d.Serial, From: d.Pos(), ID: id, State: "wrapped"}
		advs[i] = updater.Advance{Serial: d.Serial, From: d.Pos(), To: updater.Position{Seq: d.Seq - 1}, Chain: []byte(d.Serial), Version: 2, State: "installed", At: t0}
		notes[i] = updater.Note{Serial: d.Serial, LastResult: "ok", At: t0}
		results[i] = updater.Result{Serial: d.Serial, Result: updater.ResultInstalled}
		if i%3 == 0 {
			advs[i].From.Seq++ // stale: must not apply
			results[i].Result = "failed:x"
		}
	}
	ok, err := s.Assign(ctx, as)
	if err != nil || len(ok) != n || slices.Contains(ok, false) {
		t.Fatalf("Assign: %d results, %v, all ok %v", len(ok), err, !slices.Contains(ok, false))
	}
	ok, err = s.Advance(ctx, advs)
	if err != nil || len(ok) != n {
		t.Fatalf("Advance: %d results, %v", len(ok), err)
	}
	for i := range ok {
		if ok[i] != (i%3 != 0) {
			t.Fatalf("Advance ok[%d] = %v, want %v", i, ok[i], i%3 != 0)
		}
	}
	if err := s.Note(ctx, notes); err != nil {
		t.Fatal(err)
	}
	if err := s.RecordResults(ctx, id, results); err != nil {
		t.Fatal(err)
	}
	return advs, results
}
