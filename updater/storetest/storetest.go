// Package storetest is the contract suite for [updater.Store]: every implementation runs
// the same tests through [Run], so the Redis store and the embedded store cannot drift.
//
// # What the suite requires beyond the doc comments of updater.Store
//
// Where the Store contract is silent the suite pins one reading, shared by every store:
//
//   - A batch is applied in order, as if each element were a separate call: a device that
//     appears twice in one CreateDevices is "existing" the second time; two Advances of
//     one device in one batch chain (A->B then B->C both apply).
//   - Advance clears Assigned (Assigned lists what was wrapped at the current position, and
//     the position has moved) and sets every other field it carries literally, empty
//     State and LastResult included. Note is the only method where empty means unchanged.
//   - Note, Assign and Advance never create a device.
//   - Every release method given an unknown release id returns an error wrapping
//     [updater.ErrNotFound] (the doc of ErrNotFound: "wrapped by store errors for a missing
//     release").
//   - RecordResults rejects a result that is neither ResultInstalled nor ResultFailed
//     followed by ":" and a code, and records nothing of that batch.
//   - Times come back Equal to what was stored, to at least one-second precision, in any
//     location (stores may normalise to UTC); a zero time comes back zero. Byte slices come
//     back bytes.Equal (nil and empty are the same).
//   - The store does not keep references to the caller's slices.
package storetest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/sealcast/sealcast/keychain"
	"github.com/sealcast/sealcast/updater"
)

// Run runs the contract suite. open must return a new, empty store for each call and
// arrange for it to be closed (t.Cleanup); subtests run in parallel.
func Run(t *testing.T, open func(t *testing.T) updater.Store) {
	tests := []struct {
		name string
		f    func(*testing.T, updater.Store)
	}{
		{"CreateDevices", testCreateDevices},
		{"Devices", testDevices},
		{"Serials", testSerials},
		{"DeleteDevice", testDeleteDevice},
		{"RoundTrip", testRoundTrip},
		{"NoAliasing", testNoAliasing},
		{"Assign", testAssign},
		{"Advance", testAdvance},
		{"AdvanceConcurrent", testAdvanceConcurrent},
		{"Note", testNote},
		{"Release", testRelease},
		{"Releases", testReleases},
		{"Targets", testTargets},
		{"RecordResults", testRecordResults},
		{"RecordResultsConcurrent", testRecordResultsConcurrent},
		{"UnknownRelease", testUnknownRelease},
		{"EmptyBatches", testEmptyBatches},
		{"LargeBatch", testLargeBatch},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			tc.f(t, open(t))
		})
	}
}

var (
	zone = time.FixedZone("UTC+5:30", 5*3600+30*60) // not UTC, to catch lost offsets
	t0   = time.Date(2025, 3, 14, 15, 9, 26, 0, zone)
)

// NewDevice returns a freshly provisioned device at (0, 1000) with every field that
// CreateDevices takes set.
func NewDevice(serial string) *updater.Device {
	return &updater.Device{
		Serial:      serial,
		Epoch:       0,
		Seq:         1000,
		ChainLength: 1000,
		Version:     1,
		Chain:       []byte("chain\x00\xff" + serial),
		State:       "pending",
		Provisioned: t0,
	}
}

func rid(b byte) keychain.ReleaseID {
	var id keychain.ReleaseID
	for i := range id {
		id[i] = b ^ byte(i*37) // includes 0x00 and high bytes
	}
	return id
}

func mustCreate(t *testing.T, s updater.Store, devs ...*updater.Device) {
	t.Helper()
	existing, err := s.CreateDevices(t.Context(), devs)
	if err != nil {
		t.Fatalf("CreateDevices: %v", err)
	}
	if len(existing) != 0 {
		t.Fatalf("CreateDevices: existing = %q, want none", existing)
	}
}

func get(t *testing.T, s updater.Store, serial string) *updater.Device {
	t.Helper()
	ds, err := s.Devices(t.Context(), []string{serial})
	if err != nil {
		t.Fatalf("Devices(%q): %v", serial, err)
	}
	if len(ds) != 1 {
		t.Fatalf("Devices(%q) returned %d devices, want 1", serial, len(ds))
	}
	return ds[0]
}

// sameTime reports whether got is want, to one-second precision or better.
func sameTime(got, want time.Time) bool {
	if want.IsZero() {
		return got.IsZero()
	}
	if got.Equal(want) {
		return true
	}
	d := want.Sub(got)
	return d > 0 && d < time.Second && got.Equal(got.Truncate(time.Second))
}

// diffDevice describes how got differs from want, or returns "".
func diffDevice(got, want *updater.Device) string {
	if got == nil || want == nil {
		if got == want {
			return ""
		}
		return fmt.Sprintf("got %v, want %v", got, want)
	}
	var d []string
	add := func(field string, g, w any) { d = append(d, fmt.Sprintf("%s = %v, want %v", field, g, w)) }
	if got.Serial != want.Serial {
		add("Serial", got.Serial, want.Serial)
	}
	if got.Epoch != want.Epoch || got.Seq != want.Seq {
		add("Pos", got.Pos(), want.Pos())
	}
	if got.ChainLength != want.ChainLength {
		add("ChainLength", got.ChainLength, want.ChainLength)
	}
	if got.Version != want.Version {
		add("Version", got.Version, want.Version)
	}
	if !bytes.Equal(got.Chain, want.Chain) {
		add("Chain", got.Chain, want.Chain)
	}
	if len(got.Assigned) != len(want.Assigned) || (len(want.Assigned) > 0 && !slices.Equal(got.Assigned, want.Assigned)) {
		add("Assigned", got.Assigned, want.Assigned)
	}
	if !bytes.Equal(got.LastAck, want.LastAck) {
		add("LastAck", got.LastAck, want.LastAck)
	}
	if !bytes.Equal(got.LastReceipt, want.LastReceipt) {
		add("LastReceipt", got.LastReceipt, want.LastReceipt)
	}
	if got.State != want.State {
		add("State", got.State, want.State)
	}
	if got.LastResult != want.LastResult {
		add("LastResult", got.LastResult, want.LastResult)
	}
	if !sameTime(got.LastSeen, want.LastSeen) {
		add("LastSeen", got.LastSeen, want.LastSeen)
	}
	if !sameTime(got.Provisioned, want.Provisioned) {
		add("Provisioned", got.Provisioned, want.Provisioned)
	}
	if len(d) == 0 {
		return ""
	}
	return fmt.Sprint(d)
}

func checkDevice(t *testing.T, s updater.Store, want *updater.Device) {
	t.Helper()
	if diff := diffDevice(get(t, s, want.Serial), want); diff != "" {
		t.Errorf("device %q: %s", want.Serial, diff)
	}
}

func clone(d *updater.Device) *updater.Device {
	c := *d
	c.Chain = slices.Clone(d.Chain)
	c.Assigned = slices.Clone(d.Assigned)
	c.LastAck = slices.Clone(d.LastAck)
	c.LastReceipt = slices.Clone(d.LastReceipt)
	return &c
}

func testCreateDevices(t *testing.T, s updater.Store) {
	ctx := t.Context()
	a, b := NewDevice("a-1"), NewDevice("b-2")
	mustCreate(t, s, a, b)

	// Existing devices are returned, in input order, and left unchanged.
	a2, b2, c := clone(a), clone(b), NewDevice("c-3")
	a2.Seq, a2.Chain, a2.State = 5, []byte("other"), "installed"
	b2.Version = 9
	existing, err := s.CreateDevices(ctx, []*updater.Device{b2, c, a2})
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(existing, []string{"b-2", "a-1"}) {
		t.Errorf("existing = %q, want [b-2 a-1]", existing)
	}
	checkDevice(t, s, a)
	checkDevice(t, s, b)
	checkDevice(t, s, c)

	// Within one batch, the second device with a serial is existing.
	d1, d2 := NewDevice("dup"), NewDevice("dup")
	d2.Seq = 7
	existing, err = s.CreateDevices(ctx, []*updater.Device{d1, d2})
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(existing, []string{"dup"}) {
		t.Errorf("existing = %q, want [dup]", existing)
	}
	checkDevice(t, s, d1)
}

func testDevices(t *testing.T, s updater.Store) {
	a, b := NewDevice("a"), NewDevice("b")
	b.Seq = 17
	mustCreate(t, s, a, b)
	ds, err := s.Devices(t.Context(), []string{"b", "nope", "a", "b"})
	if err != nil {
		t.Fatal(err)
	}
	want := []*updater.Device{b, nil, a, b}
	if len(ds) != len(want) {
		t.Fatalf("Devices returned %d, want %d", len(ds), len(want))
	}
	for i := range want {
		if diff := diffDevice(ds[i], want[i]); diff != "" {
			t.Errorf("Devices[%d]: %s", i, diff)
		}
	}
	if ds[0] == ds[3] {
		t.Errorf("Devices returned the same *Device twice; callers may modify what they get")
	}
}

func testSerials(t *testing.T, s updater.Store) {
	ss, err := s.Serials(t.Context())
	if err != nil || len(ss) != 0 {
		t.Fatalf("Serials on an empty store = %q, %v; want none", ss, err)
	}
	in := []string{"m", "B", "a", "z-9", "a.1", "0"}
	for _, serial := range in {
		mustCreate(t, s, NewDevice(serial))
	}
	ss, err = s.Serials(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	want := slices.Clone(in)
	slices.Sort(want)
	if !slices.Equal(ss, want) {
		t.Errorf("Serials = %q, want %q", ss, want)
	}
}

func testDeleteDevice(t *testing.T, s updater.Store) {
	ctx := t.Context()
	mustCreate(t, s, NewDevice("x"), NewDevice("y"))
	if ok, err := s.DeleteDevice(ctx, "x"); err != nil || !ok {
		t.Fatalf("DeleteDevice(x) = %v, %v; want true", ok, err)
	}
	if ok, err := s.DeleteDevice(ctx, "x"); err != nil || ok {
		t.Fatalf("second DeleteDevice(x) = %v, %v; want false", ok, err)
	}
	if ok, err := s.DeleteDevice(ctx, "never"); err != nil || ok {
		t.Fatalf("DeleteDevice(never) = %v, %v; want false", ok, err)
	}
	if d := get(t, s, "x"); d != nil {
		t.Errorf("deleted device still returned: %+v", d)
	}
	if ss, err := s.Serials(ctx); err != nil || !slices.Equal(ss, []string{"y"}) {
		t.Errorf("Serials after delete = %q, %v; want [y]", ss, err)
	}
	// A deleted serial can be provisioned again, from scratch.
	x := NewDevice("x")
	x.Epoch = 3
	mustCreate(t, s, x)
	checkDevice(t, s, x)
}

// fullDevice has every field set, with extreme values.
func fullDevice(serial string) *updater.Device {
	return &updater.Device{
		Serial:      serial,
		Epoch:       1<<32 - 1,
		Seq:         1<<32 - 2,
		ChainLength: 1<<32 - 1,
		Version:     1<<64 - 1,
		Chain:       []byte{0, 1, 2, 0xff, 0xfe, '\n', '"', '\\', 0},
		Assigned:    []keychain.ReleaseID{rid(1), rid(2)},
		LastAck:     bytes.Repeat([]byte{0, 0xa5}, 60),
		LastReceipt: []byte{0xff},
		State:       "wrapped",
		LastResult:  "unwrap_failed",
		LastSeen:    time.Date(2031, 12, 31, 23, 59, 59, 999_999_999, zone),
		Provisioned: time.Date(2001, 2, 3, 4, 5, 6, 7, time.UTC),
	}
}

func testRoundTrip(t *testing.T, s updater.Store) {
	ctx := t.Context()
	full, bare := fullDevice("full"), &updater.Device{Serial: "bare"}
	mustCreate(t, s, full, bare)
	checkDevice(t, s, full)
	checkDevice(t, s, bare)

	got := get(t, s, "full")
	if !got.LastSeen.Equal(full.LastSeen) {
		t.Logf("store keeps times to %v precision", full.LastSeen.Sub(got.LastSeen).Round(time.Nanosecond))
	}

	// And through Advance.
	adv := updater.Advance{
		Serial: "full", From: full.Pos(), To: updater.Position{Epoch: 0, Seq: 1<<32 - 1},
		ChainLength: 7, Chain: []byte{0, 0, 0}, Version: 1<<63 + 1,
		LastAck: []byte{0x80, 0}, LastReceipt: []byte{0, 0x80}, State: "installed", LastResult: "ok",
		At: time.Date(2099, 1, 1, 0, 0, 0, 1, zone),
	}
	if ok, err := s.Advance(ctx, []updater.Advance{adv}); err != nil || !ok[0] {
		t.Fatalf("Advance = %v, %v", ok, err)
	}
	want := clone(full)
	applyAdvance(want, adv)
	checkDevice(t, s, want)
}

func applyAdvance(d *updater.Device, a updater.Advance) {
	d.Epoch, d.Seq = a.To.Epoch, a.To.Seq
	d.ChainLength, d.Chain, d.Version = a.ChainLength, slices.Clone(a.Chain), a.Version
	d.LastAck, d.LastReceipt = slices.Clone(a.LastAck), slices.Clone(a.LastReceipt)
	d.State, d.LastResult, d.LastSeen = a.State, a.LastResult, a.At
	d.Assigned = nil
}

func testNoAliasing(t *testing.T, s updater.Store) {
	ctx := t.Context()
	d := fullDevice("alias")
	want := clone(d)
	mustCreate(t, s, d)
	d.Chain[0], d.LastAck[0], d.Assigned[0][0] = 0x55, 0x55, 0x55
	checkDevice(t, s, want)

	got := get(t, s, "alias")
	got.Chain[0], got.LastAck[0], got.Assigned[0][0] = 0x66, 0x66, 0x66
	checkDevice(t, s, want)

	adv := updater.Advance{Serial: "alias", From: want.Pos(), To: updater.Position{Epoch: 1, Seq: 5}, Chain: []byte{1, 2, 3}, LastAck: []byte{4}}
	if ok, err := s.Advance(ctx, []updater.Advance{adv}); err != nil || !ok[0] {
		t.Fatalf("Advance = %v, %v", ok, err)
	}
	applyAdvance(want, adv)
	adv.Chain[0], adv.LastAck[0] = 9, 9
	checkDevice(t, s, want)
}

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

// NewRelease returns a release with every field PutRelease takes set.
func NewRelease(id keychain.ReleaseID, created time.Time) *updater.Release {
	return &updater.Release{
		ID:         id,
		Version:    1<<64 - 1,
		Label:      "spring \"fixes\" ✓",
		State:      "active",
		All:        true,
		Created:    created,
		Manifest:   []byte{0, 1, 0xff, '{'},
		ContentKey: bytes.Repeat([]byte{0, 0x80}, 30),
		ImageSize:  1<<40 + 3,
		ChunkSize:  1<<32 - 1,
		ChunkCount: 77,
	}
}

func diffRelease(got, want *updater.Release) string {
	if got == nil {
		return "got nil"
	}
	var d []string
	add := func(field string, g, w any) { d = append(d, fmt.Sprintf("%s = %v, want %v", field, g, w)) }
	if got.ID != want.ID {
		add("ID", got.ID, want.ID)
	}
	if got.Version != want.Version {
		add("Version", got.Version, want.Version)
	}
	if got.Label != want.Label {
		add("Label", got.Label, want.Label)
	}
	if got.State != want.State {
		add("State", got.State, want.State)
	}
	if got.All != want.All {
		add("All", got.All, want.All)
	}
	if !sameTime(got.Created, want.Created) {
		add("Created", got.Created, want.Created)
	}
	if !bytes.Equal(got.Manifest, want.Manifest) {
		add("Manifest", got.Manifest, want.Manifest)
	}
	if !bytes.Equal(got.ContentKey, want.ContentKey) {
		add("ContentKey", got.ContentKey, want.ContentKey)
	}
	if got.ImageSize != want.ImageSize {
		add("ImageSize", got.ImageSize, want.ImageSize)
	}
	if got.ChunkSize != want.ChunkSize {
		add("ChunkSize", got.ChunkSize, want.ChunkSize)
	}
	if got.ChunkCount != want.ChunkCount {
		add("ChunkCount", got.ChunkCount, want.ChunkCount)
	}
	if got.Installed != want.Installed || got.Failed != want.Failed {
		add("Installed/Failed", [2]int{got.Installed, got.Failed}, [2]int{want.Installed, want.Failed})
	}
	if len(d) == 0 {
		return ""
	}
	return fmt.Sprint(d)
}

func checkRelease(t *testing.T, s updater.Store, want *updater.Release) {
	t.Helper()
	got, err := s.Release(t.Context(), want.ID)
	if err != nil {
		t.Fatalf("Release(%v): %v", want.ID, err)
	}
	if diff := diffRelease(got, want); diff != "" {
		t.Errorf("release %v: %s", want.ID, diff)
	}
}

func testRelease(t *testing.T, s updater.Store) {
	ctx := t.Context()
	r := NewRelease(rid(1), t0.Add(123456789*time.Nanosecond))
	if err := s.PutRelease(ctx, r); err != nil {
		t.Fatal(err)
	}
	checkRelease(t, s, r)
	bare := &updater.Release{ID: rid(2)}
	if err := s.PutRelease(ctx, bare); err != nil {
		t.Fatal(err)
	}
	checkRelease(t, s, bare)

	// Replacing keeps the counts, which PutRelease ignores.
	if err := s.RecordResults(ctx, r.ID, []updater.Result{{Serial: "a", Result: updater.ResultInstalled}, {Serial: "b", Result: "failed:x"}}); err != nil {
		t.Fatal(err)
	}
	r2 := NewRelease(r.ID, r.Created)
	r2.State, r2.Label, r2.Manifest, r2.Installed, r2.Failed = "paused", "", nil, 50, 60
	if err := s.PutRelease(ctx, r2); err != nil {
		t.Fatal(err)
	}
	r2.Installed, r2.Failed = 1, 1
	checkRelease(t, s, r2)
	if got, err := s.Results(ctx, r.ID, []string{"a", "b"}); err != nil || !slices.Equal(got, []string{"installed", "failed:x"}) {
		t.Errorf("Results after PutRelease = %q, %v", got, err)
	}
}

func testReleases(t *testing.T, s updater.Store) {
	ctx := t.Context()
	rs, err := s.Releases(ctx)
	if err != nil || len(rs) != 0 {
		t.Fatalf("Releases on an empty store = %v, %v; want none", rs, err)
	}
	// Put out of order; ids sort differently from creation times.
	created := []time.Duration{3 * time.Hour, time.Hour, 2 * time.Hour, 0}
	for i, c := range created {
		if err := s.PutRelease(ctx, NewRelease(rid(byte(10-i)), t0.Add(c))); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.RecordResults(ctx, rid(9), []updater.Result{{Serial: "s", Result: "failed:x"}}); err != nil {
		t.Fatal(err)
	}
	rs, err = s.Releases(ctx)
	if err != nil {
		t.Fatal(err)
	}
	wantIDs := []keychain.ReleaseID{rid(7), rid(9), rid(8), rid(10)}
	if len(rs) != len(wantIDs) {
		t.Fatalf("Releases returned %d, want %d", len(rs), len(wantIDs))
	}
	for i, r := range rs {
		if r.ID != wantIDs[i] {
			t.Errorf("Releases[%d] = %v, want %v (oldest first)", i, r.ID, wantIDs[i])
		}
	}
	want := NewRelease(rid(9), t0.Add(time.Hour))
	want.Failed = 1
	if diff := diffRelease(rs[1], want); diff != "" {
		t.Errorf("Releases[1]: %s", diff)
	}
}

func testTargets(t *testing.T, s updater.Store) {
	ctx := t.Context()
	id := rid(1)
	if err := s.PutRelease(ctx, NewRelease(id, t0)); err != nil {
		t.Fatal(err)
	}
	if got, err := s.Targets(ctx, id); err != nil || len(got) != 0 {
		t.Fatalf("Targets of a new release = %q, %v; want none", got, err)
	}
	if err := s.AddTargets(ctx, id, []string{"q", "b", "q", "a"}); err != nil {
		t.Fatal(err)
	}
	if err := s.AddTargets(ctx, id, []string{"b", "c", "A"}); err != nil {
		t.Fatal(err)
	}
	if err := s.AddTargets(ctx, id, nil); err != nil {
		t.Fatal(err)
	}
	got, err := s.Targets(ctx, id)
	if want := []string{"A", "a", "b", "c", "q"}; err != nil || !slices.Equal(got, want) {
		t.Errorf("Targets = %q, %v; want %q", got, err, want)
	}
	// Targets are per release.
	if err := s.PutRelease(ctx, NewRelease(rid(2), t0)); err != nil {
		t.Fatal(err)
	}
	if got, err := s.Targets(ctx, rid(2)); err != nil || len(got) != 0 {
		t.Errorf("Targets of another release = %q, %v; want none", got, err)
	}
}

func testRecordResults(t *testing.T, s updater.Store) {
	ctx := t.Context()
	id := rid(1)
	r := NewRelease(id, t0)
	if err := s.PutRelease(ctx, r); err != nil {
		t.Fatal(err)
	}
	step := func(rs []updater.Result, installed, failed int) {
		t.Helper()
		if err := s.RecordResults(ctx, id, rs); err != nil {
			t.Fatalf("RecordResults(%v): %v", rs, err)
		}
		r.Installed, r.Failed = installed, failed
		checkRelease(t, s, r)
	}
	step([]updater.Result{{Serial: "a", Result: updater.ResultInstalled}}, 1, 0)
	step([]updater.Result{{Serial: "a", Result: updater.ResultInstalled}}, 1, 0)                       // repeated
	step([]updater.Result{{Serial: "b", Result: "failed:hash_mismatch"}}, 1, 1)                        // first failure
	step([]updater.Result{{Serial: "b", Result: "failed:unwrap_failed"}}, 1, 1)                        // repeated failure counts once
	step([]updater.Result{{Serial: "b", Result: updater.ResultInstalled}}, 2, 0)                       // failed -> installed
	step([]updater.Result{{Serial: "a", Result: "failed:stale_key"}}, 2, 0)                            // installed is final
	step([]updater.Result{{Serial: "c", Result: "failed:x"}, {Serial: "c", Result: "failed:y"}}, 2, 1) // in one batch
	step([]updater.Result{{Serial: "d", Result: "failed:x"}, {Serial: "d", Result: updater.ResultInstalled}, {Serial: "e", Result: "failed:z"}}, 3, 2)

	got, err := s.Results(ctx, id, []string{"a", "b", "c", "d", "e", "none", "a"})
	want := []string{"installed", "installed", "failed:y", "installed", "failed:z", updater.ResultNone, "installed"}
	if err != nil || !slices.Equal(got, want) {
		t.Errorf("Results = %q, %v; want %q", got, err, want)
	}

	// Results are per release.
	if err := s.PutRelease(ctx, NewRelease(rid(2), t0)); err != nil {
		t.Fatal(err)
	}
	if got, err := s.Results(ctx, rid(2), []string{"a"}); err != nil || !slices.Equal(got, []string{updater.ResultNone}) {
		t.Errorf("Results of another release = %q, %v", got, err)
	}

	// A malformed result is rejected and nothing of its batch is recorded.
	for _, bad := range []string{"", "ok", "failedx", "installed:"} {
		err := s.RecordResults(ctx, id, []updater.Result{{Serial: "f", Result: "failed:x"}, {Serial: "g", Result: bad}})
		if err == nil {
			t.Errorf("RecordResults with result %q: no error", bad)
		}
	}
	checkRelease(t, s, r)
	if got, err := s.Results(ctx, id, []string{"f"}); err != nil || got[0] != updater.ResultNone {
		t.Errorf("Results(f) after a rejected batch = %q, %v; want none", got, err)
	}
}

func testRecordResultsConcurrent(t *testing.T, s updater.Store) {
	const workers, perWorker = 20, 25
	id := rid(1)
	if err := s.PutRelease(t.Context(), NewRelease(id, t0)); err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	errs := make(chan error, 2*workers)
	for w := range workers {
		wg.Go(func() {
			var rs []updater.Result
			for i := range perWorker {
				res := updater.ResultInstalled
				if i%5 == 0 {
					res = "failed:x"
				}
				rs = append(rs, updater.Result{Serial: fmt.Sprintf("w%d-%d", w, i), Result: res})
			}
			// And every worker reports the same two devices: one fails, one fails then installs.
			rs = append(rs, updater.Result{Serial: "shared-failed", Result: fmt.Sprintf("failed:w%d", w)},
				updater.Result{Serial: "shared-installed", Result: "failed:x"})
			if err := s.RecordResults(context.Background(), id, rs); err != nil {
				errs <- err
			}
			if err := s.RecordResults(context.Background(), id, []updater.Result{{Serial: "shared-installed", Result: updater.ResultInstalled}}); err != nil {
				errs <- err
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatalf("RecordResults: %v", err)
	}
	r, err := s.Release(t.Context(), id)
	if err != nil {
		t.Fatal(err)
	}
	wantFailed := workers*perWorker/5 + 1
	wantInstalled := workers*perWorker - workers*perWorker/5 + 1
	if r.Installed != wantInstalled || r.Failed != wantFailed {
		t.Errorf("counts = %d installed, %d failed; want %d, %d", r.Installed, r.Failed, wantInstalled, wantFailed)
	}
}

func testUnknownRelease(t *testing.T, s updater.Store) {
	ctx := t.Context()
	id := rid(99)
	check := func(method string, err error) {
		t.Helper()
		if !errors.Is(err, updater.ErrNotFound) {
			t.Errorf("%s of an unknown release: error %v, want one wrapping ErrNotFound", method, err)
		}
	}
	_, err := s.Release(ctx, id)
	check("Release", err)
	check("AddTargets", s.AddTargets(ctx, id, []string{"a"}))
	_, err = s.Targets(ctx, id)
	check("Targets", err)
	check("RecordResults", s.RecordResults(ctx, id, []updater.Result{{Serial: "a", Result: updater.ResultInstalled}}))
	_, err = s.Results(ctx, id, []string{"a"})
	check("Results", err)
	if rs, err := s.Releases(ctx); err != nil || len(rs) != 0 {
		t.Errorf("Releases after calls for an unknown release = %v, %v; want none", rs, err)
	}
}

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
