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
		{"Tags", testTags},
		{"RoundTrip", testRoundTrip},
		{"NoAliasing", testNoAliasing},
		{"Assign", testAssign},
		{"Advance", testAdvance},
		{"AdvanceConcurrent", testAdvanceConcurrent},
		{"Note", testNote},
		{"Release", testRelease},
		{"Releases", testReleases},
		{"Targets", testTargets},
		{"RemoveTarget", testRemoveTarget},
		{"RecordResults", testRecordResults},
		{"RecordResultsConcurrent", testRecordResultsConcurrent},
		{"InstallTimes", testInstallTimes},
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
