package device_test

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/sha256"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/sealcast/sealcast/device"
	"github.com/sealcast/sealcast/keychain"
	"github.com/sealcast/sealcast/protocol"
)

func deviceFile() protocol.DeviceFile {
	pub, _, _ := ed25519.GenerateKey(nil)
	return protocol.DeviceFile{
		Serial: "v-1", UnitData: bytes.Repeat([]byte{7}, 32), Seq: 16, ChainLength: 16,
		ReleasePublicKey: protocol.HexBytes(pub), Broker: protocol.BrokerConfig{URL: "tcp://127.0.0.1:1883", Password: "pw"},
	}
}

func TestStateFromDeviceFile(t *testing.T) {
	if _, err := device.StateFromDeviceFile(deviceFile()); err != nil {
		t.Fatal(err)
	}
	for name, mut := range map[string]func(*protocol.DeviceFile){
		"serial":    func(f *protocol.DeviceFile) { f.Serial = "-bad" },
		"unit_data": func(f *protocol.DeviceFile) { f.UnitData = f.UnitData[:31] },
		"length":    func(f *protocol.DeviceFile) { f.ChainLength = 17 },
		"seq":       func(f *protocol.DeviceFile) { f.Seq = 32 },
		"seq0":      func(f *protocol.DeviceFile) { f.Seq = 0 },
		"pubkey":    func(f *protocol.DeviceFile) { f.ReleasePublicKey = f.ReleasePublicKey[:5] },
		"url":       func(f *protocol.DeviceFile) { f.Broker.URL = "http://x" },
		"ws":        func(f *protocol.DeviceFile) { f.Broker.URL = "ws://x:8080" },
		"url path":  func(f *protocol.DeviceFile) { f.Broker.URL = "tcp://x:1883/mqtt" },
		"url query": func(f *protocol.DeviceFile) { f.Broker.URL = "tcp://x:1883?a=b" },
		"url user":  func(f *protocol.DeviceFile) { f.Broker.URL = "tcp://u:p@x:1883" },
		"username":  func(f *protocol.DeviceFile) { f.Broker.Username = "other" },
	} {
		f := deviceFile()
		mut(&f)
		if _, err := device.StateFromDeviceFile(f); !errors.Is(err, device.ErrInvalidState) {
			t.Errorf("%s: err = %v", name, err)
		}
	}
}

func TestFileVault(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "vault.json")
	if _, err := device.NewFileVault(path).Load(); !errors.Is(err, device.ErrNoVault) {
		t.Fatalf("missing vault: %v", err)
	}
	v, err := device.CreateFileVault(path, deviceFile())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := device.CreateFileVault(path, deviceFile()); err == nil {
		t.Fatal("CreateFileVault overwrote a vault")
	}
	st, err := v.Load()
	if err != nil {
		t.Fatal(err)
	}
	k := keychain.Key(st.UnitData, 16)
	ack, _ := keychain.Ack{Kind: keychain.AckInstalled, Seq: 16, Version: 1, DeviceSeq: 15}.Seal(k, st.Serial)
	st.Seq, st.Version, st.LastAck, st.LastAckKey = 15, 1, ack, k
	// A stale temporary file from an interrupted save is never taken for the vault.
	os.WriteFile(filepath.Join(dir, ".vault.json.tmp-123"), []byte("{partial"), 0o600)
	if err := v.Save(st); err != nil {
		t.Fatal(err)
	}
	back, err := device.NewFileVault(path).Load()
	if err != nil || back.Seq != 15 || !bytes.Equal(back.LastAck, ack) || back.LastAckKey != k {
		t.Fatalf("reload: %+v %v", back.Seq, err)
	}
	fi, _ := os.Stat(path)
	if fi.Mode().Perm() != 0o600 {
		t.Fatalf("mode %v", fi.Mode())
	}
	ents, _ := os.ReadDir(dir)
	for _, e := range ents {
		if strings.Contains(e.Name(), ".tmp-") && e.Name() != ".vault.json.tmp-123" {
			t.Fatalf("temporary file %s left behind", e.Name())
		}
	}
	// An invalid state is refused and the vault stays as it was.
	bad := back
	bad.ChainLength = 3
	if err := v.Save(bad); err == nil {
		t.Fatal("invalid state saved")
	}
	if again, _ := v.Load(); again.ChainLength != 16 {
		t.Fatal("vault changed by a refused save")
	}
	// Damage is reported with what to do.
	os.WriteFile(path, []byte("{"), 0o600)
	if _, err := v.Load(); err == nil || !strings.Contains(err.Error(), "damaged") {
		t.Fatalf("damaged vault: %v", err)
	}
}

func TestMemoryVaultCopies(t *testing.T) {
	st, _ := device.StateFromDeviceFile(deviceFile())
	v := device.NewMemoryVault(st)
	got, _ := v.Load()
	got.ReleasePublicKey[0] ^= 1
	again, _ := v.Load()
	if again.ReleasePublicKey[0] == got.ReleasePublicKey[0] {
		t.Fatal("memory vault shares memory with its caller")
	}
}

func TestSlotInstaller(t *testing.T) {
	dir := t.TempDir()
	s, err := device.NewSlotInstaller(dir)
	if err != nil {
		t.Fatal(err)
	}
	man := func(v uint64, img []byte) *keychain.Manifest {
		id, _ := keychain.NewReleaseID()
		return &keychain.Manifest{Release: id, Version: v, ImageSize: uint64(len(img)), ImageSHA256: sha(img)}
	}
	install := func(m *keychain.Manifest, img []byte, commit bool) {
		t.Helper()
		in, err := s.Begin(m)
		if err != nil {
			t.Fatal(err)
		}
		in.Write(img)
		if commit {
			// Commit stages the image; Switch runs it on trial; Confirm keeps it [SC-10.5].
			if err := in.Commit(); err != nil {
				t.Fatal(err)
			}
			if err := s.Switch(m.Release); err != nil {
				t.Fatal(err)
			}
			if a, _, _ := s.Active(); !a.Trial && a.Release != m.Release {
				t.Fatalf("after Switch: active %+v, want release %s on trial", a, m.Release)
			}
			if err := s.Confirm(m.Release); err != nil {
				t.Fatal(err)
			}
		} else {
			in.Abort()
		}
	}
	m1 := man(1, []byte("one"))
	install(m1, []byte("one"), true)
	a, ok, _ := s.Active()
	if !ok || a.Slot != "a" || a.Version != 1 {
		t.Fatalf("active %+v", a)
	}
	// An aborted install leaves the active slot and no temporary file.
	install(man(2, []byte("two")), []byte("two"), false)
	if a2, _, _ := s.Active(); a2.Slot != "a" {
		t.Fatal("abort switched slots")
	}
	// Installing switches to the other slot; the old one stays as the fallback.
	m2 := man(2, []byte("two"))
	install(m2, []byte("two"), true)
	a, _, _ = s.Active()
	if a.Slot != "b" {
		t.Fatalf("active %+v", a)
	}
	// The same release again (power loss before the vault write): tolerated, nothing moves.
	install(m2, []byte("two"), true)
	a, _, _ = s.Active()
	one, _ := os.ReadFile(s.SlotPath("a"))
	two, _ := os.ReadFile(s.SlotPath("b"))
	if a.Slot != "b" || string(one) != "one" || string(two) != "two" {
		t.Fatalf("after re-install: active %s, a=%q b=%q", a.Slot, one, two)
	}
	ents, _ := os.ReadDir(dir)
	for _, e := range ents {
		if strings.Contains(e.Name(), ".tmp-") {
			t.Fatalf("temporary file %s left", e.Name())
		}
	}
	// One install at a time.
	in, _ := s.Begin(man(3, nil))
	if _, err := s.Begin(man(4, nil)); !errors.Is(err, device.ErrInstallBusy) {
		t.Fatalf("second Begin: %v", err)
	}
	in.Abort()

	// A trial that fails: the staged image runs on trial in slot a, and Revert makes
	// slot b (release 2) active again, not on trial [SC-10.5].
	m3 := man(3, []byte("three"))
	in, _ = s.Begin(m3)
	in.Write([]byte("three"))
	if err := in.Commit(); err != nil {
		t.Fatal(err)
	}
	if a, _, _ := s.Active(); a.Release != m2.Release {
		t.Fatalf("Commit made the staged image active: %+v", a)
	}
	if err := s.Switch(m3.Release); err != nil {
		t.Fatal(err)
	}
	a, _, _ = s.Active()
	if running, _ := s.Running(m3.Release); !running || a.Slot != "a" || !a.Trial || a.Previous == nil || a.Previous.Release != m2.Release {
		t.Fatalf("on trial: active %+v (running %v)", a, running)
	}
	if err := s.Health(context.Background(), m2.Release); err == nil {
		t.Fatal("the health check of an image not running passed")
	}
	if err := s.Revert(m3.Release); err != nil {
		t.Fatal(err)
	}
	a, _, _ = s.Active()
	if running, _ := s.Running(m3.Release); running || a.Release != m2.Release || a.Slot != "b" || a.Trial {
		t.Fatalf("after Revert: active %+v, want release 2 in slot b, not on trial", a)
	}
	if err := s.Revert(m3.Release); err != nil { // again, after a power loss: nothing to do
		t.Fatal(err)
	}
}

func TestCommandInstaller(t *testing.T) {
	dir := t.TempDir()
	out := filepath.Join(dir, "out")
	m := &keychain.Manifest{Version: 2}
	// Pipe mode.
	c := &device.CommandInstaller{Path: "/bin/sh", Args: []string{"-c", "cat > " + out}}
	in, err := c.Begin(m)
	if err != nil {
		t.Skip("no /bin/sh:", err)
	}
	in.Write([]byte("image"))
	if err := in.Commit(); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(out); string(b) != "image" {
		t.Fatalf("piped %q", b)
	}
	// File mode, failing with a message on stderr.
	c = &device.CommandInstaller{Path: "/bin/sh", Args: []string{"-c", `test "$SEALCAST_VERSION" = 2 && cp "$1" ` + out + `2 && echo "flash failed" >&2 && exit 3`, "sh", device.ImageArg}, Dir: dir}
	in, _ = c.Begin(m)
	in.Write([]byte("file"))
	err = in.Commit()
	if err == nil || !strings.Contains(err.Error(), "flash failed") {
		t.Fatalf("Commit = %v, want the stderr tail", err)
	}
	if b, _ := os.ReadFile(out + "2"); string(b) != "file" {
		t.Fatalf("file mode got %q", b)
	}
}

func sha(b []byte) [32]byte { return sha256.Sum256(b) }
