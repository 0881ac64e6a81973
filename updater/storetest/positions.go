package storetest

// Assignments, advances and notes: the moves of a device along its chain.

import (
	"bytes"
	"context"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/sealcast/sealcast/keychain"
	"github.com/sealcast/sealcast/updater"
)

func testAssign(t *testing.T, s updater.Store) {
	ctx := t.Context()
	d := NewDevice("d")
	mustCreate(t, s, d, NewDevice("other"))
	at := d.Pos()
	id1, id2 := rid(1), rid(2)

	ok, err := s.Assign(ctx, []updater.Assignment{{Serial: "d", From: at, ID: id1, State: "wrapped"}})
	if err != nil || !slices.Equal(ok, []bool{true}) {
		t.Fatalf("Assign = %v, %v; want [true]", ok, err)
	}
	want := clone(d)
	want.Assigned, want.State = []keychain.ReleaseID{id1}, "wrapped"
	checkDevice(t, s, want)

	// Appends once, keeps order, dedupes; fails where the device moved or is gone.
	ok, err = s.Assign(ctx, []updater.Assignment{
		{Serial: "d", From: at, ID: id2, State: "wrapped"},
		{Serial: "d", From: at, ID: id1, State: "rekeying"},
		{Serial: "d", From: updater.Position{Epoch: at.Epoch, Seq: at.Seq - 1}, ID: rid(3), State: "x"},
		{Serial: "d", From: updater.Position{Epoch: at.Epoch + 1, Seq: at.Seq}, ID: rid(3), State: "x"},
		{Serial: "gone", From: at, ID: id1, State: "x"},
		{Serial: "other", From: at, ID: id2, State: "wrapped"},
	})
	if err != nil || !slices.Equal(ok, []bool{true, true, false, false, false, true}) {
		t.Fatalf("Assign = %v, %v; want [true true false false false true]", ok, err)
	}
	want.Assigned, want.State = []keychain.ReleaseID{id1, id2}, "rekeying"
	checkDevice(t, s, want)
	if d := get(t, s, "gone"); d != nil {
		t.Errorf("Assign created a device: %+v", d)
	}

	// After the device moves, assignments at the old position fail.
	if ok, err := s.Advance(ctx, []updater.Advance{{Serial: "other", From: at, To: updater.Position{Epoch: at.Epoch, Seq: at.Seq - 1}}}); err != nil || !ok[0] {
		t.Fatalf("Advance = %v, %v", ok, err)
	}
	ok, err = s.Assign(ctx, []updater.Assignment{{Serial: "other", From: at, ID: id1, State: "wrapped"}})
	if err != nil || ok[0] {
		t.Fatalf("Assign after Advance = %v, %v; want [false]", ok, err)
	}
	if got := get(t, s, "other"); len(got.Assigned) != 0 {
		t.Errorf("Assigned after Advance = %v, want none", got.Assigned)
	}
}

func testAdvance(t *testing.T, s updater.Store) {
	ctx := t.Context()
	d := NewDevice("d")
	mustCreate(t, s, d)
	if ok, err := s.Assign(ctx, []updater.Assignment{{Serial: "d", From: d.Pos(), ID: rid(1), State: "wrapped"}}); err != nil || !ok[0] {
		t.Fatalf("Assign = %v, %v", ok, err)
	}
	adv := updater.Advance{
		Serial: "d", From: d.Pos(), To: updater.Position{Epoch: 0, Seq: 999},
		ChainLength: 1000, Chain: []byte("next"), Version: 2,
		LastAck: []byte("ack"), LastReceipt: []byte("receipt"),
		State: "installed", LastResult: "ok", At: t0.Add(time.Hour),
	}
	ok, err := s.Advance(ctx, []updater.Advance{adv})
	if err != nil || !slices.Equal(ok, []bool{true}) {
		t.Fatalf("Advance = %v, %v; want [true]", ok, err)
	}
	want := clone(d)
	want.State = "wrapped"
	applyAdvance(want, adv)
	checkDevice(t, s, want)

	// The same advance again (an ack processed twice) does not apply, nor does one from
	// another epoch, nor one for an unknown device.
	again := adv
	again.To, again.Chain = updater.Position{Epoch: 0, Seq: 998}, []byte("wrong")
	otherEpoch := adv
	otherEpoch.From = updater.Position{Epoch: 1, Seq: 999}
	gone := adv
	gone.Serial = "gone"
	ok, err = s.Advance(ctx, []updater.Advance{again, otherEpoch, gone})
	if err != nil || !slices.Equal(ok, []bool{false, false, false}) {
		t.Fatalf("Advance = %v, %v; want [false false false]", ok, err)
	}
	checkDevice(t, s, want)
	if d := get(t, s, "gone"); d != nil {
		t.Errorf("Advance created a device: %+v", d)
	}

	// A batch is applied in order: two steps of one device chain. A re-key moves the epoch.
	step1 := updater.Advance{Serial: "d", From: want.Pos(), To: updater.Position{Epoch: 0, Seq: 1}, Chain: []byte("s1"), State: "rekeying"}
	step2 := updater.Advance{Serial: "d", From: step1.To, To: updater.Position{Epoch: 1, Seq: 5000}, ChainLength: 5000, Chain: []byte("e1"), Version: 2, State: "idle"}
	ok, err = s.Advance(ctx, []updater.Advance{step1, step2})
	if err != nil || !slices.Equal(ok, []bool{true, true}) {
		t.Fatalf("Advance = %v, %v; want [true true]", ok, err)
	}
	applyAdvance(want, step2)
	checkDevice(t, s, want)
}

// testAdvanceConcurrent plays an ack handled at once by many updater processes: from the
// same position, exactly one advance applies per device.
func testAdvanceConcurrent(t *testing.T, s updater.Store) {
	const workers, devices = 50, 20
	var devs []*updater.Device
	for i := range devices {
		devs = append(devs, NewDevice(fmt.Sprintf("c-%02d", i)))
	}
	mustCreate(t, s, devs...)

	applied := make([][]int, devices) // per device, the workers whose advance applied
	var mu sync.Mutex
	var wg sync.WaitGroup
	errs := make(chan error, workers)
	start := make(chan struct{})
	for w := range workers {
		wg.Go(func() {
			as := make([]updater.Advance, devices)
			for i, d := range devs {
				as[(i+w)%devices] = updater.Advance{ // a different order in each worker
					Serial: d.Serial, From: d.Pos(), To: updater.Position{Epoch: 0, Seq: d.Seq - 1},
					LastAck: []byte{byte(w)}, Chain: []byte{byte(w)},
				}
			}
			<-start
			ok, err := s.Advance(context.Background(), as)
			if err != nil {
				errs <- err
				return
			}
			mu.Lock()
			defer mu.Unlock()
			for i, a := range as {
				if ok[i] {
					n := slices.IndexFunc(devs, func(d *updater.Device) bool { return d.Serial == a.Serial })
					applied[n] = append(applied[n], w)
				}
			}
		})
	}
	close(start)
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatalf("Advance: %v", err)
	}
	for i, d := range devs {
		if len(applied[i]) != 1 {
			t.Errorf("device %s: %d advances from %v applied (workers %v), want exactly 1", d.Serial, len(applied[i]), d.Pos(), applied[i])
			continue
		}
		got := get(t, s, d.Serial)
		if got.Seq != d.Seq-1 || !bytes.Equal(got.LastAck, []byte{byte(applied[i][0])}) {
			t.Errorf("device %s: at %v with LastAck %x, want seq %d from worker %d", d.Serial, got.Pos(), got.LastAck, d.Seq-1, applied[i][0])
		}
	}
}

func testNote(t *testing.T, s updater.Store) {
	ctx := t.Context()
	d := fullDevice("n")
	mustCreate(t, s, d)
	at := t0.Add(42 * time.Minute)
	err := s.Note(ctx, []updater.Note{
		{Serial: "n", State: "downloading", At: at},
		{Serial: "gone", State: "x", LastResult: "y", At: at},
	})
	if err != nil {
		t.Fatal(err)
	}
	want := clone(d)
	want.State, want.LastSeen = "downloading", at
	checkDevice(t, s, want)

	at = at.Add(time.Second)
	if err := s.Note(ctx, []updater.Note{{Serial: "n", LastResult: "hash_mismatch", At: at}}); err != nil {
		t.Fatal(err)
	}
	want.LastResult, want.LastSeen = "hash_mismatch", at
	checkDevice(t, s, want) // counters, chain, acks and assignments untouched

	if d := get(t, s, "gone"); d != nil {
		t.Errorf("Note created a device: %+v", d)
	}
	if ss, err := s.Serials(ctx); err != nil || !slices.Equal(ss, []string{"n"}) {
		t.Errorf("Serials = %q, %v; want [n]", ss, err)
	}
}
