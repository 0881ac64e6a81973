package redisstore

import (
	"testing"

	"github.com/sealcast/sealcast/keychain"
)

// FuzzRecords: a device or release hash in Redis, however damaged (a field out of range,
// bad base64, a corrupt meta), decodes to a record or to an error, never a panic.
func FuzzRecords(f *testing.F) {
	f.Add("16", "16", "AAEC", "00112233445566778899aabbccddeeff", `{"version":3,"state":"active"}`, "1")
	f.Add("-1", "99999999999", "!!", "zz", `{`, "x")
	f.Fuzz(func(t *testing.T, seq, length, chain, assigned, meta, count string) {
		h := map[string]string{"epoch": "0", "seq": seq, "chain_length": length, "chain": chain, "assigned": assigned,
			"version": count, "last_ack": chain, "state": "idle", "last_seen": seq}
		if d, err := parseDevice("d1", h); err == nil && d.Serial != "d1" {
			t.Fatalf("device %+v", d)
		}
		rh := map[string]string{"meta": meta, "installed": count, "failed": seq}
		if r, err := parseRelease(keychain.ReleaseID{1}, rh); err == nil && r.ID != (keychain.ReleaseID{1}) {
			t.Fatalf("release %+v", r)
		}
	})
}
