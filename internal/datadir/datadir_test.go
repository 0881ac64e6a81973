package datadir

import (
	"os"
	"path/filepath"
	"testing"
)

func TestOpenCreatesThenReuses(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "data")
	a, err := Open(dir)
	if err != nil || !a.Created {
		t.Fatalf("first Open: created=%v err=%v", a != nil && a.Created, err)
	}
	for _, f := range []string{"root.key", "release.key"} {
		st, err := os.Stat(filepath.Join(dir, f))
		if err != nil || st.Mode().Perm() != 0o600 {
			t.Errorf("%s: mode %v, %v", f, st.Mode(), err)
		}
	}
	b, err := Open(dir)
	if err != nil || b.Created || b.Root != a.Root || !b.SigningKey.Equal(a.SigningKey) {
		t.Fatalf("second Open did not reuse the keys (err %v)", err)
	}
	os.Remove(filepath.Join(dir, "release.key"))
	if _, err := Open(dir); err == nil {
		t.Fatal("Open with a missing release.key silently made a new one")
	}
}
