package main

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/sealcast/sealcast/device"
	"github.com/sealcast/sealcast/protocol"
)

// provisionFile provisions serial on s and writes its device file into dir.
func provisionFile(t *testing.T, s *testServer, dir, serial string) (string, protocol.DeviceFile) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	files, err := s.operator(t).Provision(ctx, []string{serial}, 0)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := json.Marshal(files[0])
	path := filepath.Join(dir, serial+".json")
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
	return path, files[0]
}

func loadVault(t *testing.T, path string) device.State {
	t.Helper()
	st, err := device.NewFileVault(path).Load()
	if err != nil {
		t.Fatal(err)
	}
	return st
}

func TestDeviceInstallsIntoSlots(t *testing.T) {
	t.Parallel()
	s := startServe(t)
	dir := t.TempDir()
	file, df := provisionFile(t, s, dir, "dev-slot-1")
	slots := filepath.Join(dir, "slots")
	args := []string{"device", "-file", file, "-install-dir", slots, "-broker", s.url, "-chunk-timeout", "10s"}
	p := startProc(t, nil, args...)

	img1 := randomImage(t, 100<<10)
	s.release(t, img1, 1, df.Serial)
	eventually(t, "the device confirmed v1", func() bool { return strings.Contains(p.stdout.String(), "confirmed version 1") }, p)
	if out := p.stdout.String(); !strings.Contains(out, "installed version 1 ") || !strings.Contains(out, "into slot a") {
		t.Fatalf("stdout does not report the install into slot a:\n%s", out)
	}
	checkSlotFile(t, slots, "a", img1)
	vaultPath := filepath.Join(dir, "dev-slot-1.vault")
	if st := loadVault(t, vaultPath); st.Version != 1 || st.Seq != df.Seq-1 || !st.LastAckConfirmed {
		t.Fatalf("vault after v1: version %d, seq %d (from %d), confirmed %v", st.Version, st.Seq, df.Seq, st.LastAckConfirmed)
	}

	p.signal(t, syscall.SIGTERM)
	if err := p.wait(t, 30*time.Second); err != nil {
		t.Fatalf("SIGTERM: exit %v, want a clean stop", err)
	}
	if !strings.Contains(p.stderr.String(), "stopped") {
		t.Fatalf("no clean stop logged:\n%s", p.stderr)
	}

	// Restart without the device file: the vault is the truth. The retained topics are
	// delivered again; nothing is installed until v2.
	if err := os.Remove(file); err != nil {
		t.Fatal(err)
	}
	p2 := startProc(t, nil, args...)
	eventually(t, "the restarted device connected", func() bool { return strings.Contains(p2.stderr.String(), "connected") }, p2)
	img2 := randomImage(t, 50<<10)
	s.release(t, img2, 2, df.Serial)
	eventually(t, "the device confirmed v2", func() bool { return strings.Contains(p2.stdout.String(), "confirmed version 2") }, p2)
	if out := p2.stdout.String(); strings.Contains(out, "version 1") || !strings.Contains(out, "into slot b") {
		t.Fatalf("after the restart:\n%s\nwant only v2, installed into slot b", out)
	}
	checkSlotFile(t, slots, "b", img2)
	checkSlotFile(t, slots, "a", img1) // the fallback
	if st := loadVault(t, vaultPath); st.Version != 2 || st.Seq != df.Seq-2 {
		t.Fatalf("vault after v2: version %d, seq %d; want 2, %d (one step per install)", st.Version, st.Seq, df.Seq-2)
	}
	p2.signal(t, syscall.SIGINT)
	if err := p2.wait(t, 30*time.Second); err != nil {
		t.Fatalf("SIGINT: exit %v", err)
	}
}

func checkSlotFile(t *testing.T, dir, slot string, img []byte) {
	t.Helper()
	inst, err := device.NewSlotInstaller(dir)
	if err != nil {
		t.Fatal(err)
	}
	got, err := os.ReadFile(inst.SlotPath(slot))
	if err != nil || !bytes.Equal(got, img) {
		t.Fatalf("slot %s holds %d bytes (err %v), not the %d-byte image", slot, len(got), err, len(img))
	}
}

func TestDeviceInstallCommand(t *testing.T) {
	// Both forms of -install-cmd: the image on standard input, and {image} as a file.
	t.Parallel()
	s := startServe(t)
	dir := t.TempDir()
	fileA, _ := provisionFile(t, s, dir, "dev-cmd-a")
	fileB, _ := provisionFile(t, s, dir, "dev-cmd-b")
	outA, outB := filepath.Join(dir, "a.bin"), filepath.Join(dir, "b.bin")
	pa := startProc(t, nil, "device", "-file", fileA, "-broker", s.url,
		"-install-cmd", "cat > '"+outA+"' && echo $SEALCAST_VERSION > '"+outA+".version'")
	pb := startProc(t, []string{"SEALCAST_INSTALL_CMD=cp {image} '" + outB + "'"}, "device", "-file", fileB, "-broker", s.url)
	img := randomImage(t, 30<<10)
	s.release(t, img, 3, "dev-cmd-a", "dev-cmd-b")
	for _, p := range []*proc{pa, pb} {
		eventually(t, "both devices confirmed v3", func() bool { return strings.Contains(p.stdout.String(), "confirmed version 3") }, pa, pb)
	}
	for _, out := range []string{outA, outB} {
		if got, err := os.ReadFile(out); err != nil || !bytes.Equal(got, img) {
			t.Fatalf("%s: %d bytes (err %v), not the image", out, len(got), err)
		}
	}
	if v, _ := os.ReadFile(outA + ".version"); strings.TrimSpace(string(v)) != "3" {
		t.Fatalf("the command saw SEALCAST_VERSION=%q", v)
	}
}

func TestDeviceFlagErrors(t *testing.T) {
	dir := t.TempDir()
	for _, tc := range []struct {
		args []string
		want string
		code int // 2: a usage error; 1: another
	}{
		{[]string{"device", "-file", "x.json"}, "exactly one of -install-dir", 2},
		{[]string{"device", "-file", "x.json", "-install-dir", dir, "-install-cmd", "true"}, "exactly one of -install-dir", 2},
		{[]string{"device", "-install-dir", dir}, "give -file", 2},
		{[]string{"device", "-file", filepath.Join(dir, "missing.json"), "-install-dir", dir}, "no such file", 1},
		{[]string{"device", "-file", "x.json", "-install-dir", dir, "-window", "65"}, "-window 65", 2},
	} {
		p := runProc(t, nil, tc.args...)
		if p.exitCode() != tc.code || !strings.Contains(p.stderr.String(), tc.want) {
			t.Errorf("sealcast %s: exit %d, stderr %q; want exit %d and %q", strings.Join(tc.args, " "), p.exitCode(), p.stderr, tc.code, tc.want)
		}
	}
}
