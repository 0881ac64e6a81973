package device_test

import (
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/sealcast/sealcast/device"
	"github.com/sealcast/sealcast/protocol"
)

// FuzzDeviceFileAndVault: a device file or a vault file, however damaged, loads into a
// state that passes Validate or fails with ErrInvalidState, never a panic; a state that
// loads saves and loads back the same.
func FuzzDeviceFileAndVault(f *testing.F) {
	good, _ := json.Marshal(deviceFile())
	for _, s := range [][]byte{good, []byte(`{"serial":"x","seq":16,"chain_length":16}`), []byte(`{"unit_data":"zz"}`),
		[]byte(`{"broker":{"url":"tcp://u:p@h:1/x"}}`), []byte(`null`), []byte(`{`)} {
		f.Add(s)
	}
	dir := f.TempDir()
	f.Fuzz(func(t *testing.T, b []byte) {
		var df protocol.DeviceFile
		if json.Unmarshal(b, &df) == nil {
			if st, err := device.StateFromDeviceFile(df); err != nil && !errors.Is(err, device.ErrInvalidState) {
				t.Fatalf("device file %q: %v", b, err)
			} else if err == nil && st.Validate() != nil {
				t.Fatalf("device file %q loaded into an invalid state", b)
			}
		}
		path := filepath.Join(dir, "vault.json")
		if err := os.WriteFile(path, b, 0o600); err != nil {
			t.Fatal(err)
		}
		v := device.NewFileVault(path)
		st, err := v.Load()
		if err != nil {
			if !errors.Is(err, device.ErrInvalidState) {
				t.Fatalf("vault %q: %v", b, err)
			}
			return
		}
		if err := v.Save(st); err != nil {
			t.Fatal(err)
		}
		again, err := v.Load()
		if err != nil || again.Serial != st.Serial || again.Seq != st.Seq || again.UnitData != st.UnitData {
			t.Fatalf("vault %q: saved and loaded back as %+v, %v", b, again, err)
		}
	})
}
