package datadir

import (
	"crypto/ed25519"
	"encoding/hex"
	"os"
	"path/filepath"
	"testing"

	"github.com/sealcast/sealcast/keychain"
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

// TestRotatedKeys: a rotated key and its statement are kept; Open makes the last one of
// an unbroken chain current, and refuses a statement that the key before did not sign.
func TestRotatedKeys(t *testing.T) {
	path := t.TempDir()
	d, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	first := d.SigningKey
	pub, priv, _ := ed25519.GenerateKey(nil)
	st, err := keychain.KeyStatement{Seq: 1, Key: pub}.Sign(first)
	if err != nil {
		t.Fatal(err)
	}
	if err := d.AddKey(2, priv, st); err == nil {
		t.Fatal("key 2 added after key 0")
	}
	if err := d.AddKey(1, priv, st); err != nil {
		t.Fatal(err)
	}
	again, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	if again.KeySeq != 1 || !again.SigningKey.Equal(priv) || len(again.Statements) != 1 {
		t.Fatalf("reopened: key %d, %d statements", again.KeySeq, len(again.Statements))
	}
	if b, _ := os.ReadFile(filepath.Join(path, "release.pub")); string(b) != hex.EncodeToString(pub)+"\n" {
		t.Fatalf("release.pub is %q, not the current key", b)
	}
	// A statement signed by the key it names, not by the key before, is damage.
	forged, _ := keychain.KeyStatement{Seq: 1, Key: pub}.Sign(priv)
	if err := os.WriteFile(filepath.Join(path, "keys", "statement-1.bin"), forged, 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := Open(path); err == nil {
		t.Fatal("Open accepted a key statement the key before did not sign")
	}
}
