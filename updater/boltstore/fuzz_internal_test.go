package boltstore

import (
	"testing"

	bolt "go.etcd.io/bbolt"
)

// FuzzDeviceRecord: a damaged device record in the file is an error that names the
// device, never a panic or a device with a counter nobody wrote.
func FuzzDeviceRecord(f *testing.F) {
	for _, s := range []string{`{"epoch":0,"seq":16,"chain_length":16,"chain":"AAEC","assigned":["00112233445566778899aabbccddeeff"]}`,
		`{"seq":-1}`, `{"assigned":["zz"]}`, `{"last_seen":"yesterday"}`, `[]`, `null`, `{`} {
		f.Add([]byte(s))
	}
	db, err := bolt.Open(f.TempDir()+"/fuzz.db", 0o600, nil)
	if err != nil {
		f.Fatal(err)
	}
	defer db.Close()
	f.Fuzz(func(t *testing.T, v []byte) {
		err := db.Update(func(tx *bolt.Tx) error {
			b, err := tx.CreateBucketIfNotExists([]byte("fuzz"))
			if err != nil {
				return err
			}
			if err := b.Put([]byte("d1"), v); err != nil {
				return err
			}
			r, err := getDevice(b, "d1")
			if err != nil || r == nil {
				return nil // refused, or a null record: no device
			}
			d := r.device("d1")
			if d.Serial != "d1" {
				t.Fatalf("device %+v from %q", d, v)
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
	})
}
