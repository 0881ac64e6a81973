package main

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
)

// TestSmoke builds sealcast and this tool and runs the tool in its smallest mode (-short:
// 50 devices, a 64 KiB image), so that scripts/bench.sh cannot rot unnoticed. It checks
// what the run observed, not how fast it was.
func TestSmoke(t *testing.T) {
	dir := t.TempDir()
	// moduleDir is where pkg is built: sealcast in its own module (the repository root),
	// as scripts/bench.sh builds it, and this tool here.
	bin := func(name, moduleDir, pkg string) string {
		out := filepath.Join(dir, name)
		cmd := exec.Command("go", "build", "-o", out, pkg)
		cmd.Dir = moduleDir
		if b, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("go build %s: %v\n%s", pkg, err, b)
		}
		return out
	}
	sealcast := bin("sealcast", "../../..", "./cmd/sealcast")
	e2e := bin("e2e", ".", ".")
	scenarios := "envelope,perdevice,mosquitto"
	if _, err := findMosquitto("mosquitto"); err != nil {
		if os.Getenv("SEALCAST_REQUIRE_TOOLS") == "1" {
			t.Fatal(err)
		}
		t.Logf("without the Mosquitto scenario: %v", err)
		scenarios = "envelope,perdevice"
	}
	out := filepath.Join(dir, "out")
	cmd := exec.Command(e2e, "-short", "-sealcast", sealcast, "-out", out, "-scenarios", scenarios, "-timeout", "5m")
	b, err := cmd.CombinedOutput()
	t.Logf("e2e output:\n%s", b)
	if err != nil {
		t.Fatalf("e2e -short: %v", err)
	}
	var rs []result
	if b, err = os.ReadFile(filepath.Join(out, "e2e.json")); err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(b, &rs); err != nil {
		t.Fatal(err)
	}
	byKey := map[string]result{}
	for _, r := range rs {
		byKey[r.Key] = r
		if r.Confirmed != r.Devices || r.ServerInstalled != r.Devices || r.T100 <= 0 || len(r.Times) != r.Devices {
			t.Errorf("%s: %d devices, %d confirmed, server counted %d, t100 %v", r.Key, r.Devices, r.Confirmed, r.ServerInstalled, r.T100)
		}
		// CPU is counted in clock ticks (10 ms): a 50-device smoke run of a server that
		// only wraps keys (the Mosquitto scenario) can take less than one.
		if r.Server.CPU < 0 || r.Server.PeakRSS <= 0 || r.Sim.PeakRSS <= 0 {
			t.Errorf("%s: no process figures: %+v %+v", r.Key, r.Server, r.Sim)
		}
		if len(r.Profiles) == 0 {
			t.Errorf("%s: no profile of the server", r.Key)
		}
	}
	env, per := byKey["envelope"], byKey["perdevice"]
	if len(byKey) != len(rs) || env.Key == "" || per.Key == "" {
		t.Fatalf("scenarios run: %v", byKey)
	}
	// The envelope retains one image; the baseline one per device.
	img := int64(env.ImageSize)
	if env.Retained.ImageBytes < img || env.Retained.ImageBytes > 2*img {
		t.Errorf("envelope retains %d image bytes for a %d-byte image", env.Retained.ImageBytes, img)
	}
	if per.Releases != per.Devices || per.Retained.ImageBytes < int64(per.Devices)*img {
		t.Errorf("baseline: %d releases, %d image bytes retained for %d devices", per.Releases, per.Retained.ImageBytes, per.Devices)
	}
	if m, ok := byKey["mosquitto"]; ok && (m.Mosquitto == nil || m.Mosquitto.PeakRSS <= 0) {
		t.Errorf("mosquitto: no figures for the Mosquitto process")
	}
	for _, f := range []string{"e2e.md", "e2e.csv"} {
		if st, err := os.Stat(filepath.Join(out, f)); err != nil || st.Size() == 0 {
			t.Errorf("%s not written: %v", f, err)
		}
	}
}
