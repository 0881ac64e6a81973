package storetest

// The device records: create, read, list, delete, round trips.

import (
	"bytes"
	"fmt"
	"maps"
	"slices"
	"testing"
	"time"

	"github.com/sealcast/sealcast/keychain"
	"github.com/sealcast/sealcast/updater"
)

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
	if !maps.Equal(got.Tags, want.Tags) {
		add("Tags", got.Tags, want.Tags)
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

// testTags: tags are kept with a device, replaced whole by PutTags, and touched by no other
// write.
func testTags(t *testing.T, s updater.Store) {
	ctx := t.Context()
	d := NewDevice("tagged")
	d.Tags = map[string]string{"region": "eu", "hw": "rev2", "empty": ""}
	mustCreate(t, s, d, NewDevice("plain"))
	checkDevice(t, s, d)
	checkDevice(t, s, NewDevice("plain"))
	d.Tags = map[string]string{"region": "us"}
	if ok, err := s.PutTags(ctx, "tagged", d.Tags); err != nil || !ok {
		t.Fatalf("PutTags = %v, %v", ok, err)
	}
	checkDevice(t, s, d)
	// An advance keeps the tags.
	ok, err := s.Advance(ctx, []updater.Advance{{Serial: "tagged", From: d.Pos(), To: updater.Position{Seq: d.Seq - 1}, ChainLength: d.ChainLength, Chain: d.Chain, Version: 2, State: "installed", At: t0}})
	if err != nil || !ok[0] {
		t.Fatalf("Advance = %v, %v", ok, err)
	}
	if got := get(t, s, "tagged"); !maps.Equal(got.Tags, d.Tags) {
		t.Fatalf("tags after an advance: %v, want %v", got.Tags, d.Tags)
	}
	d.Tags = nil
	if ok, err := s.PutTags(ctx, "tagged", nil); err != nil || !ok {
		t.Fatalf("PutTags(nil) = %v, %v", ok, err)
	}
	if got := get(t, s, "tagged"); len(got.Tags) != 0 {
		t.Fatalf("tags after removing them all: %v", got.Tags)
	}
	if ok, err := s.PutTags(ctx, "nobody", map[string]string{"a": "b"}); err != nil || ok {
		t.Fatalf("PutTags of an unknown device = %v, %v; want false", ok, err)
	}
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

// testSerials: Serials lists every device, sorted, and DeviceCount counts them, through
// creations (a repeated one counts once) and a deletion.
func testSerials(t *testing.T, s updater.Store) {
	ss, err := s.Serials(t.Context())
	if err != nil || len(ss) != 0 {
		t.Fatalf("Serials on an empty store = %q, %v; want none", ss, err)
	}
	count := func(want int) {
		t.Helper()
		if n, err := s.DeviceCount(t.Context()); err != nil || n != want {
			t.Fatalf("DeviceCount = %d, %v; want %d", n, err, want)
		}
	}
	count(0)
	in := []string{"m", "B", "a", "z-9", "a.1", "0"}
	for _, serial := range in {
		mustCreate(t, s, NewDevice(serial))
	}
	if _, err := s.CreateDevices(t.Context(), []*updater.Device{NewDevice("m")}); err != nil {
		t.Fatal(err)
	}
	count(len(in))
	ss, err = s.Serials(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	want := slices.Clone(in)
	slices.Sort(want)
	if !slices.Equal(ss, want) {
		t.Errorf("Serials = %q, want %q", ss, want)
	}
	if _, err := s.DeleteDevice(t.Context(), "m"); err != nil {
		t.Fatal(err)
	}
	count(len(in) - 1)
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
