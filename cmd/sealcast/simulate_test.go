package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
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

func TestSimulateSerialTaken(t *testing.T) {
	// Without -state the devices are provisioned for the run; serials the server knows
	// give a clear error naming the ways out.
	t.Parallel()
	s := startServe(t)
	dir := t.TempDir()
	provisionFile(t, s, dir, "taken-00001")
	p := runProc(t, nil, "simulate", "-broker", s.url, "-password", s.adminPW, "-devices", "2", "-prefix", "taken-", "-until-version", "1")
	if p.exitCode() != 1 {
		t.Fatalf("exit %d, want 1", p.exitCode())
	}
	if e := p.stderr.String(); !strings.Contains(e, "already") || !strings.Contains(e, "-prefix") || !strings.Contains(e, "-state") {
		t.Fatalf("stderr does not explain the collision:\n%s", e)
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
		if p.exitCode() != 1 || !strings.Contains(p.stderr.String(), tc.want) {
			t.Errorf("sealcast %s: exit %d, stderr %q; want exit 1 and %q", strings.Join(tc.args, " "), p.exitCode(), p.stderr, tc.want)
		}
	}
}
