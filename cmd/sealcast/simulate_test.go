package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/sealcast/sealcast/device"
	"github.com/sealcast/sealcast/protocol"
)

func TestSimulateStateKeepsDevices(t *testing.T) {
	const n = 30
	t.Parallel()
	s := startServe(t)
	state := t.TempDir()
	env := []string{"SEALCAST_USER=admin", "SEALCAST_PASSWORD=" + s.adminPW}
	common := []string{"-broker", s.url, "-devices", "30", "-state", state, "-timeout", "2m", "-chunk-timeout", "10s", "-start-spread", "200ms"}

	// First run: provisions 30 devices into the state directory, with faults.
	p := startProc(t, env, append([]string{"simulate", "-until-version", "1", "-drop", "0.2", "-kill", "0.2", "-seed", "5"}, common...)...)
	vaults := func() []string {
		m, _ := filepath.Glob(filepath.Join(state, "*.vault"))
		return m
	}
	eventually(t, "30 vaults exist", func() bool { return len(vaults()) == n }, p)
	s.release(t, randomImage(t, 64<<10), 1)
	if err := p.wait(t, 2*time.Minute); err != nil {
		t.Fatalf("first run: %v", err)
	}
	out := p.stdout.String()
	for _, want := range []string{"Summary", "confirmed v1 or newer: 30 of 30 (0 were already)", "time to 50/90/100 %", "faults injected:", "peak memory:"} {
		if !strings.Contains(out, want) {
			t.Fatalf("first run's summary lacks %q:\n%s", want, out)
		}
	}
	first := map[string]uint32{}
	var l uint32
	for _, v := range vaults() {
		st := loadVault(t, v)
		if st.Version != 1 || !st.LastAckConfirmed || st.Seq != st.ChainLength-1 {
			t.Fatalf("%s after v1: version %d, seq %d of %d, confirmed %v", v, st.Version, st.Seq, st.ChainLength, st.LastAckConfirmed)
		}
		first[st.Serial], l = st.Seq, st.ChainLength
	}
	deviceFile := filepath.Join(state, "sim-00001.json")
	before, err := os.ReadFile(deviceFile)
	if err != nil {
		t.Fatal(err)
	}

	// Second run, same state: the devices are reused (provisioning them again would
	// fail: the server has them), and their counters continue.
	s.release(t, randomImage(t, 32<<10), 2)
	p2 := runProc(t, env, append([]string{"simulate", "-until-version", "2"}, common...)...)
	if p2.err != nil {
		t.Fatalf("second run: %v", p2.err)
	}
	if !strings.Contains(p2.stdout.String(), "confirmed v2 or newer: 30 of 30") || !strings.Contains(p2.stderr.String(), "reused") {
		t.Fatalf("second run:\n%s", p2.stdout)
	}
	for _, v := range vaults() {
		st := loadVault(t, v)
		if st.Version != 2 || st.Seq != first[st.Serial]-1 || st.Seq != l-2 {
			t.Fatalf("%s after v2: version %d, seq %d (after v1: %d, chain %d)", v, st.Version, st.Seq, first[st.Serial], l)
		}
	}
	if after, _ := os.ReadFile(deviceFile); string(after) != string(before) {
		t.Fatal("the second run rewrote a device file")
	}

	// A third run for a version every vault already holds ends at once.
	p3 := runProc(t, env, append([]string{"simulate", "-until-version", "2"}, common...)...)
	if p3.err != nil || !strings.Contains(p3.stdout.String(), "30 of 30 (30 were already)") {
		t.Fatalf("third run: %v\n%s", p3.err, p3.stdout)
	}
}

func TestSimulateRunsUntilStopped(t *testing.T) {
	// Without -until-version the simulator installs every release until SIGTERM, then
	// exits 0 with a summary of each version.
	t.Parallel()
	const n = 5
	s := startServe(t)
	state := t.TempDir()
	p := startProc(t, []string{"SEALCAST_PASSWORD=" + s.adminPW}, "simulate", "-broker", s.url, "-devices", "5",
		"-state", state, "-prefix", "svc-", "-start-spread", "100ms", "-drop", "0.5", "-seed", "9")
	atVersion := func(v uint64) func() bool {
		return func() bool {
			m, _ := filepath.Glob(filepath.Join(state, "*.vault"))
			if len(m) != n {
				return false
			}
			for _, path := range m {
				if st, err := device.NewFileVault(path).Load(); err != nil || st.Version != v || !st.LastAckConfirmed {
					return false
				}
			}
			return true
		}
	}
	eventually(t, "5 vaults exist", func() bool {
		m, _ := filepath.Glob(filepath.Join(state, "*.vault"))
		return len(m) == n
	}, p)
	for v := uint64(1); v <= 2; v++ {
		s.release(t, randomImage(t, 16<<10), v)
		eventually(t, fmt.Sprintf("every vault confirmed v%d", v), atVersion(v), p)
	}
	p.signal(t, syscall.SIGTERM)
	if err := p.wait(t, 30*time.Second); err != nil {
		t.Fatalf("SIGTERM: %v, want exit 0", err)
	}
	out := p.stdout.String()
	for _, want := range []string{"confirmed v2 or newer: 5 of 5", "v1      ", "v2      "} {
		if !strings.Contains(out, want) {
			t.Fatalf("summary lacks %q:\n%s", want, out)
		}
	}
}

func TestSimulateWaitsForServer(t *testing.T) {
	// Started before the server (as a compose file may), the simulator waits for it.
	t.Parallel()
	addr, pw := freeAddr(t), "waiting-admin-pw"
	state := t.TempDir()
	p := startProc(t, []string{"SEALCAST_PASSWORD=" + pw}, "simulate", "-broker", "tcp://"+addr, "-devices", "3",
		"-state", state, "-until-version", "1", "-timeout", "2m", "-start-spread", "100ms")
	eventually(t, "the simulator waits", func() bool { return strings.Contains(p.stderr.String(), "waiting for the server") }, p)
	s := startServeOn(t, addr, pw)
	eventually(t, "3 vaults exist", func() bool {
		m, _ := filepath.Glob(filepath.Join(state, "*.vault"))
		return len(m) == 3
	}, p)
	s.release(t, randomImage(t, 8<<10), 1)
	if err := p.wait(t, 2*time.Minute); err != nil {
		t.Fatalf("simulate: %v", err)
	}
}

func TestSimulateFilesFailedForGood(t *testing.T) {
	// -files runs existing device files. One of them trusts another release key, so its
	// device reports bad_manifest, which is not retried: the run ends with exit 1.
	t.Parallel()
	s := startServe(t)
	dir := t.TempDir()
	provisionFile(t, s, dir, "file-good")
	bad, df := provisionFile(t, s, dir, "file-bad")
	df.ReleasePublicKey[0] ^= 1
	b, _ := json.Marshal(df)
	if err := os.WriteFile(bad, b, 0o600); err != nil {
		t.Fatal(err)
	}
	s.release(t, randomImage(t, 8<<10), 1, "file-good", "file-bad")
	p := runProc(t, nil, "simulate", "-broker", s.url, "-files", dir, "-until-version", "1", "-timeout", "2m", "-start-spread", "100ms")
	if p.exitCode() != 1 || !strings.Contains(p.stderr.String(), "1 of 2 devices failed for good (bad_manifest: 1)") {
		t.Fatalf("exit %d; want 1 and the failure named\n%s", p.exitCode(), p.stderr)
	}
	if out := p.stdout.String(); !strings.Contains(out, "confirmed v1 or newer: 1 of 2") || !strings.Contains(out, "(vaults in memory)") {
		t.Fatalf("summary:\n%s", out)
	}
}

func TestSimulateSerialTaken(t *testing.T) {
	// Without -state the devices are provisioned for the run; serials the server knows
	// give a clear error naming the ways out.
	t.Parallel()
	s := startServe(t)
	dir := t.TempDir()
	provisionFile(t, s, dir, "taken-00001")
	p := runProc(t, nil, "simulate", "-broker", s.url, "-password", s.adminPW, "-devices", "2", "-prefix", "taken-", "-until-version", "1")
	if p.exitCode() != exitConflict {
		t.Fatalf("exit %d, want %d (conflict)", p.exitCode(), exitConflict)
	}
	if e := p.stderr.String(); !strings.Contains(e, "already") || !strings.Contains(e, "-prefix") || !strings.Contains(e, "-state") || !strings.Contains(e, "sealcast deprovision taken-00001 ... taken-00002") {
		t.Fatalf("stderr does not explain the collision:\n%s", e)
	}
	// A wrong password is not waited out.
	p = runProc(t, nil, "simulate", "-broker", s.url, "-password", "wrong", "-devices", "2", "-prefix", "free-", "-until-version", "1")
	if e := p.stderr.String(); p.exitCode() != exitConnect || !strings.Contains(e, "bad user name or password") || strings.Contains(e, "waiting") {
		t.Fatalf("wrong password: exit %d\n%s", p.exitCode(), e)
	}
}

func TestSimulateFlagErrors(t *testing.T) {
	dir := t.TempDir()
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"simulate", "-state", dir, "-files", dir}, "not both"},
		{[]string{"simulate", "-devices", "0"}, "at least one device"},
		{[]string{"simulate", "-drop", "1.5"}, "-drop 1.5"},
		{[]string{"simulate", "-prefix", "bad/"}, "-prefix"},
		{[]string{"simulate", "-devices", "3"}, "admin password"},
		{[]string{"simulate", "-files", dir}, "no device files"},
	} {
		p := runProc(t, []string{"SEALCAST_PASSWORD="}, tc.args...)
		if p.exitCode() != exitUsage || !strings.Contains(p.stderr.String(), tc.want) {
			t.Errorf("sealcast %s: exit %d, stderr %q; want exit %d (usage) and %q", strings.Join(tc.args, " "), p.exitCode(), p.stderr, exitUsage, tc.want)
		}
	}
}

// TestSimulateHeavy measures a fleet through the binary: "sealcast serve" and "sealcast
// simulate -devices 1000" (SEALCAST_SIM_DEVICES) taking a 1 MiB release
// (SEALCAST_SIM_IMAGE bytes) in the default chunk size. Run it without -race:
//
//	SEALCAST_HEAVY=1 go test -count=1 -run TestSimulateHeavy -v ./cmd/sealcast/
func TestSimulateHeavy(t *testing.T) {
	if os.Getenv("SEALCAST_HEAVY") != "1" {
		t.Skip("set SEALCAST_HEAVY=1 to run (1,000 devices, a 1 MiB image)")
	}
	n, size := envInt("SEALCAST_SIM_DEVICES", 1000), envInt("SEALCAST_SIM_IMAGE", 1<<20)
	s := startServe(t)
	state := t.TempDir()
	p := startProc(t, []string{"SEALCAST_PASSWORD=" + s.adminPW}, "simulate", "-broker", s.url,
		"-devices", strconv.Itoa(n), "-state", state, "-until-version", "1", "-timeout", "10m", "-start-spread", "2s")
	eventually(t, "the vaults exist", func() bool {
		m, _ := filepath.Glob(filepath.Join(state, "*.vault"))
		return len(m) == n
	}, p)
	img := randomImage(t, size)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	t0 := time.Now()
	if _, err := s.operator(t).Release(ctx, bytes.NewReader(img), int64(size), protocol.ReleaseCreateArgs{Version: 1, All: true}); err != nil {
		t.Fatal(err)
	}
	t.Logf("upload and release.create: %v", time.Since(t0).Round(time.Millisecond))
	if err := p.wait(t, 10*time.Minute); err != nil {
		t.Fatalf("simulate: %v\n%s", err, p.stdout)
	}
	t.Logf("%d devices, %d-byte image, release to last confirmation %v:\n%s", n, size, time.Since(t0).Round(time.Millisecond), p.stdout)
}

func envInt(name string, def int) int {
	if v, err := strconv.Atoi(os.Getenv(name)); err == nil && v > 0 {
		return v
	}
	return def
}
